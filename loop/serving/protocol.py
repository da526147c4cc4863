"""The gateway's protocol: request models of every surface, and OpenAI-shaped errors.

Requests are checked here, before anything reaches the engine: wrong types, missing fields and
absurd values get a 400 in OpenAI's error shape. Fields the gateway does not know are passed to
vLLM untouched (it checks them itself), so every sampling option vLLM has keeps working.
`HTTPProblem` is the one way any code below a route answers with an error.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from loop.sections import METHODS

MAX_N = 8


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: StrictStr
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    stream: StrictBool = False
    temperature: StrictFloat | StrictInt | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | StrictInt | None = Field(default=None, gt=0, le=1)
    seed: StrictInt | None = None
    user: StrictStr | None = None

    def sampling(self) -> dict[str, Any]:
        """The sampling parameters worth keeping with a logged response."""
        keys = ("max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "seed", "stop",
                "presence_penalty", "frequency_penalty")
        data = self.model_dump(exclude_none=True)
        return {k: data[k] for k in keys if k in data}


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: StrictStr = Field(min_length=1)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictStr = Field(min_length=1, description="the response id the gateway returned")
    choice: StrictInt = Field(default=0, ge=0)
    thumbs: Literal["up", "down"] | None = None
    score: StrictFloat | StrictInt | None = Field(default=None, ge=0, le=1)
    comment: StrictStr | None = Field(default=None, max_length=4000)


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


def validation_message(err: ValidationError) -> tuple[str, str | None]:
    """One readable sentence from pydantic's errors, and the first offending field."""
    parts, param = [], None
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e["loc"])
        param = param or loc or None
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(parts), param


def parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """`body` as `model`, or a 400 naming the first offending field."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        message, param = validation_message(e)
        raise HTTPProblem(400, message, param=param) from None


# --- the labelling and admin API (/api) ----------------------------------------------------------

class PromoteRequest(BaseModel):
    version: str | int
    reason: str | None = None


class CanaryRequest(BaseModel):
    version: str | int | None
    share: float = 0.1


class LabelRequest(BaseModel):
    pair_id: int
    choice: Literal["first", "second", "tie", "both_bad", "skip"]
    rationale: str | None = Field(default=None, max_length=500)
    seconds: float | None = Field(default=None, ge=0)


class ArenaRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=4000)
    max_tokens: int = Field(default=64, ge=1, le=1024)


class GuidelinesRequest(BaseModel):
    text: str = Field(max_length=100_000)


class RunStart(BaseModel):
    method: str
    trigger: str = "manual"
    config: dict | None = None


class RunMetrics(BaseModel):
    metrics: list[dict[str, Any]] = []


class RunFinish(BaseModel):
    status: Literal["promoted", "rejected", "failed", "skipped"]
    reason: str | None = None
    metrics: dict | None = None
    candidate_version_id: int | None = None
    snapshot_hash: str | None = None


class RewardModelIn(BaseModel):
    path: str
    run_id: int | None = None
    base_model: str | None = None
    snapshot_hash: str | None = None
    accuracy: float | None = None
    metrics: dict | None = None


class GenerateRequest(BaseModel):
    model: str
    prompts: list[list[dict[str, str]]] = Field(min_length=1, max_length=2048)
    max_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.7, ge=0, le=2)
    seed: int = 0


class RetrainRequest(BaseModel):
    method: Literal[METHODS] | None = None  # type: ignore[valid-type]
    force: bool = False


class StatusRequest(BaseModel):
    status: Literal["candidate", "rejected", "failed", "retired"]


class UserRequest(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    role: Literal["labeller", "admin"]


class VersionRequest(BaseModel):
    adapter_path: str
    method: str
    parent_id: int | None = None
    snapshot_hash: str | None = None
    config: dict | None = None
    metrics: dict | None = None
