"""The OpenAI-compatible surface (`/v1`), for applications, plus health and metrics."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from loop.serving.auth import api_user
from loop.serving.protocol import ChatRequest, CompletionRequest, FeedbackRequest, HTTPProblem, errors, parse

router = APIRouter(responses=errors(400, 401, 404, 413, 415, 429, 503, 504))
SSE = {200: {"content": {"application/json": {}, "text/event-stream": {}},
              "description": "the answer; with `stream: true`, server-sent events"}}

# The routes that read their body raw (to pass unknown fields to vLLM untouched and parse once),
# and the model each parses it with: `loop.serving.app` puts these in the OpenAPI schema.
RAW_BODIES = {"/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest, "/v1/feedback": FeedbackRequest}


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPProblem(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise HTTPProblem(400, "the request body must be a JSON object")
    return body


def _user_id(who: dict[str, Any] | None) -> int | None:
    return who["id"] if who else None


@router.post("/v1/chat/completions", responses=SSE)
async def chat_completions(request: Request, who=Depends(api_user)) -> Response:
    body = await json_body(request)
    req = parse(ChatRequest, body)
    return await request.app.state.gateway.complete("chat.completions", "/v1/chat/completions", req, body,
                                                     _user_id(who))


@router.post("/v1/completions", responses=SSE)
async def completions(request: Request, who=Depends(api_user)) -> Response:
    body = await json_body(request)
    req = parse(CompletionRequest, body)
    return await request.app.state.gateway.complete("completions", "/v1/completions", req, body, _user_id(who))


STARTED = int(time.time())  # `created` of every model: the names are the gateway's, made at its start


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": STARTED, "owned_by": "alignloop"}


@router.get("/v1/models")
async def models(request: Request, who=Depends(api_user)) -> dict[str, Any]:
    return {"object": "list", "data": [_model(name) for name in request.app.state.gateway.router.names()]}


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str, who=Depends(api_user)) -> dict[str, Any]:
    names = request.app.state.gateway.router.names()
    if model_id not in names:
        raise HTTPProblem(404, f"the model {model_id!r} does not exist; available: {', '.join(names)}",
                          param="model", code="model_not_found")
    return _model(model_id)


@router.post("/v1/feedback")
async def feedback(request: Request, who=Depends(api_user)) -> dict[str, Any]:
    req = parse(FeedbackRequest, await json_body(request))
    feedback_id = await asyncio.to_thread(request.app.state.gateway.feedback, req, _user_id(who))
    return {"id": feedback_id, "object": "feedback", "status": "recorded"}


@router.get("/healthz")
async def healthz(request: Request) -> Response:
    gw = request.app.state.gateway
    ready = gw.engine_ready()
    body = {"status": "ok" if ready else "engine_unavailable", "engine_ready": ready,
            "serving": gw.router.routes.serving}
    return JSONResponse(body, status_code=200 if ready else 503,
                        headers=None if ready else {"Retry-After": str(gw.cfg.gateway.retry_after_s)})


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.gateway.render_metrics(), media_type="text/plain; version=0.0.4")
