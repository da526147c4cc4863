"""The OpenAI-compatible surface (`/v1`), for applications, plus health and metrics. The two
completion endpoints, the hot path, are plain ASGI in front of these (`routes.completions`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from loop.serving.auth import api_user
from loop.serving.protocol import FeedbackRequest, HTTPProblem, errors, json_object, parse

router = APIRouter(responses=errors(400, 401, 404, 413, 415, 429, 503, 504))


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
    req = parse(FeedbackRequest, json_object(await request.body()))
    feedback_id = await asyncio.to_thread(request.app.state.gateway.feedback, req, who["id"] if who else None)
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
