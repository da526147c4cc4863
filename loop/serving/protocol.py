"""The gateway's protocol: request models of every surface, and OpenAI-shaped errors.

Requests are checked here, before anything reaches the engine: wrong types, missing fields and
absurd values get a 400 in OpenAI's error shape. Fields the gateway does not know are passed to
vLLM untouched (it checks them itself), so every sampling option vLLM has keeps working.
`HTTPProblem` is the one way any code below a route answers with an error.
"""

from __future__ import annotations

import json
import sys
import traceback
import uuid
from typing import Annotated, Any, Literal

import orjson

from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from loop.sections import METHODS

MAX_N = 8


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: StrictStr


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: StrictStr
    type: Literal["function"] = "function"
    function: ToolFunction


class Message(BaseModel):
    """A chat message as OpenAI clients send it. `content` is a string, a list of text parts (the
    engine joins them with newlines), or null on an assistant message that carries `tool_calls`.
    Other parts (images, audio, files) are refused: the models served here read text only."""
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None
    name: StrictStr | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        if content is None or isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ValueError("content must be a string, a list of text parts or null")
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                what = f"of type {kind!r}" if kind else "not a content part"
                raise ValueError(f"part {i} is {what}: the models served here take text only (parts of type 'text')")
        return content

    @model_validator(mode="after")
    def _shape(self) -> Message:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message may carry tool_calls")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only on an assistant message that carries "
                             "tool_calls)")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        """The content as one string: text parts joined with newlines, as the engine joins them."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: StrictStr
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    stream: StrictBool = False
    temperature: StrictFloat | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | None = Field(default=None, gt=0, le=1)
    seed: StrictInt | None = None
    user: StrictStr | None = None
    stream_options: StreamOptions | None = None

    def sampling(self) -> dict[str, Any]:
        """The sampling parameters worth keeping with a logged response."""
        known = {k: getattr(self, k) for k in ("max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "seed")}
        extra = self.model_extra or {}
        return {**{k: v for k, v in known.items() if v is not None},
                **{k: extra[k] for k in ("stop", "presence_penalty", "frequency_penalty") if extra.get(k) is not None}}


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)

    def uses_tools(self) -> bool:
        """Tool definitions, tool calls or tool results: a prompt that is more than text turns."""
        extra = self.model_extra or {}
        return bool(extra.get("tools") or extra.get("functions")) or any(
            m.role == "tool" or m.tool_calls for m in self.messages)

    def text_messages(self) -> list[dict[str, str]]:
        """The conversation as the store keeps it: role and text content."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(SamplingFields):
    prompt: StrictStr = Field(min_length=1)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictStr = Field(min_length=1, description="the response id the gateway returned")
    choice: StrictInt = Field(default=0, ge=0)
    thumbs: Literal["up", "down"] | None = None
    score: StrictFloat | None = Field(default=None, ge=0, le=1)
    comment: StrictStr | None = Field(default=None, max_length=4000)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error the gateway answers, in OpenAI's shape."""
    error: ErrorDetail


_WHY = {400: "the request is invalid (the message names the field)", 401: "no token, or an unknown one",
        403: "the token's role may not do this", 404: "no such thing", 405: "the path takes another method",
        409: "it conflicts with the state",
        413: "the body is too large", 415: "the body is not JSON", 429: "too many requests (see Retry-After)",
        503: "the engine is unavailable (see Retry-After)", 504: "the engine did not answer in time"}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a router may give, for its OpenAPI schema."""
    return {status: {"model": ErrorBody, "description": _WHY[status]} for status in statuses}


class HTTPProblem(Exception):
    """An error answer in OpenAI's shape, raised from anywhere below a route."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status, message, type_, param, code, headers)

    def response(self) -> JSONResponse:
        return error(self.status, self.message, self.type, self.param, self.code, self.headers)


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def internal_error(method: str, path: str, exc: BaseException) -> JSONResponse:
    """A bug: the details go to the gateway's log under an id, never to the caller."""
    incident = uuid.uuid4().hex[:12]
    print(f"alignloop gateway: internal error {incident} on {method} {path}:", file=sys.stderr, flush=True)
    traceback.print_exception(exc)
    return error(500, f"internal error {incident} (the gateway's log has the details)", "internal_error")


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:  # also NaN, invalid UTF-8, lone surrogates, integers beyond 64 bits
        raise HTTPProblem(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise HTTPProblem(400, "the request body must be a JSON object")
    return body


NO_TOOL_PARSER = "--enable-auto-tool-choice"  # in vLLM's refusal of `tools` when it runs without a parser


def engine_refusal(status: int, body: bytes) -> HTTPProblem:
    """The engine's own 4xx answer in the gateway's shape, as OpenAI types it (`invalid_request_error`,
    not vLLM's `BadRequestError`): vLLM's `code` is the status as a number, where OpenAI's (and this
    schema's) is a string or null, so it is dropped; the message and param are kept, but for advice
    only the engine's operator could follow, which is said as what it means to the caller."""
    try:
        data = json.loads(body)
        err = data.get("error", data)
        message, param = str(err["message"]), err.get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        return HTTPProblem(status, f"the engine refused the request: {body[:300]!r}")
    if NO_TOOL_PARSER in message:
        message, param = ("this server does not call tools: its engine runs without a tool-call parser for "
                          "this model (send the conversation without 'tools', or ask the operator)"), "tools"
    return HTTPProblem(status, message, "invalid_request_error", param if isinstance(param, str) else None)


def validation_message(err: ValidationError) -> tuple[str, str | None]:
    """One readable sentence from pydantic's errors, and the first offending field."""
    parts, param = [], None
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e["loc"])
        param = param or loc or None
        msg = e["msg"].removeprefix("Value error, ")  # a validator's own sentence, as it wrote it
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts), param


def parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """`body` as `model`, or a 400 naming the first offending field."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        message, param = validation_message(e)
        raise HTTPProblem(400, message, param=param) from None


# --- the labelling and admin API (/api) ----------------------------------------------------------

INT64_MAX = 2**63 - 1  # the store's ids are BIGINT; a larger number is no id, not a crash
Id = Annotated[int, Field(ge=0, le=INT64_MAX)]
Seed = Annotated[int, Field(ge=0, le=INT64_MAX)]
Ref = Annotated[str, Field(min_length=1, max_length=100)] | Id  # a version by name ("v3") or id


class ApiModel(BaseModel):
    """A body of the /api surface: types as declared (no "1" for 1, no false for 0) and finite
    numbers only (JSON's NaN and Infinity, or 1e999, are refused)."""
    model_config = ConfigDict(allow_inf_nan=False, strict=True)


class PromoteRequest(ApiModel):
    version: Ref
    reason: str | None = None


class CanaryRequest(ApiModel):
    version: Ref | None
    share: float = Field(default=0.1, ge=0, le=1)


class LabelRequest(ApiModel):
    pair_id: Id
    choice: Literal["first", "second", "tie", "both_bad", "skip"]
    rationale: str | None = Field(default=None, max_length=500)
    seconds: float | None = Field(default=None, ge=0, le=86_400)


class ArenaRequest(ApiModel):
    prompt: str = Field(min_length=1, max_length=4000)
    max_tokens: int = Field(default=64, ge=1, le=1024)


class GuidelinesRequest(ApiModel):
    text: str = Field(max_length=100_000)


class RunStart(ApiModel):
    method: str = Field(max_length=100)
    trigger: str = Field(default="manual", max_length=200)
    config: dict | None = None


class RunMetric(ApiModel):
    step: int = Field(ge=0, le=2**31 - 1)
    name: str = Field(min_length=1, max_length=200)
    value: float


class RunMetrics(ApiModel):
    metrics: list[RunMetric] = Field(default=[], max_length=100_000)


class RunFinish(ApiModel):
    status: Literal["promoted", "rejected", "held", "failed", "skipped"]
    reason: str | None = None
    metrics: dict | None = None
    candidate_version_id: Id | None = None
    snapshot_hash: str | None = None


class RewardModelIn(ApiModel):
    path: str
    run_id: Id | None = None
    base_model: str | None = None
    snapshot_hash: str | None = None
    accuracy: float | None = Field(default=None, ge=0, le=1)
    metrics: dict | None = None
    purpose: Literal["reward", "judge"] = "reward"


class Margin(ApiModel):
    pair_id: Id
    margin: float = Field(ge=-1e6, le=1e6)  # reward of reply a minus reward of reply b


class MarginsRequest(ApiModel):
    """The current reward model's margins on waiting pairs (`alignloop rank`): the gateway ranks the
    queue by them (loop/evaluation/active.py)."""
    reward_model_id: Id | None = None
    margins: list[Margin] = Field(max_length=100_000)


class GenerateRequest(ApiModel):
    model: str
    prompts: list[list[dict[str, str]]] = Field(min_length=1, max_length=2048)
    max_tokens: int = Field(default=64, ge=1, le=100_000)
    temperature: float = Field(default=0.7, ge=0, le=2)
    seed: Seed = 0


ROLLOUT_NAME_PATTERN = r"^rollout-[A-Za-z0-9_-]{1,60}$"  # the PPO trainer's adapter names (never a version's)
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=100_000)]


class RolloutAdapterRequest(ApiModel):
    """The PPO trainer's current policy adapter, for its rollouts (loop/training/engine_sampler.py)."""
    name: str = Field(pattern=ROLLOUT_NAME_PATTERN)
    path: str = Field(min_length=1, max_length=4096)


class RolloutRequest(ApiModel):
    """Answers sampled from a rollout adapter, as token ids, to prompts given as token ids."""
    adapter: str = Field(pattern=ROLLOUT_NAME_PATTERN)
    prompts: list[TokenIds] = Field(min_length=1, max_length=2048)
    max_tokens: int = Field(default=48, ge=1, le=100_000)
    min_tokens: int = Field(default=0, ge=0, le=100_000)
    temperature: float = Field(default=1.0, gt=0, le=10)


class RetrainRequest(ApiModel):
    method: Literal[METHODS] | None = None  # type: ignore[valid-type]
    force: bool = False


class StatusRequest(ApiModel):
    status: Literal["candidate", "rejected", "failed", "retired"]


class UserRequest(ApiModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f]+$")
    role: Literal["labeller", "admin", "app"]


class ExcludeRequest(ApiModel):
    excluded: bool = True


class VersionRequest(ApiModel):
    adapter_path: str
    method: str = Field(max_length=100)
    parent_id: Id | None = None
    snapshot_hash: str | None = None
    config: dict | None = None
    metrics: dict | None = None
