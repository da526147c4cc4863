"""The gateway's request models and OpenAI-shaped errors.

Requests are checked here, before anything reaches the engine: wrong types, missing fields and
absurd values get a 400 in OpenAI's error shape. Fields the gateway does not know are passed to
vLLM untouched (it checks them itself), so every sampling option vLLM has keeps working.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

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
