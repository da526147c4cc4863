"""The gateway's app: assembly only. State lives in `loop.serving.gateway.Gateway`, who may call
what in `loop.serving.auth`, the routes of each audience in `loop.serving.routes`. The outermost
layer is the hot path (`routes.completions`, plain ASGI); everything else is a FastAPI app."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loop.serving.auth import TokenCache
from loop.serving.gateway import Gateway
from loop.serving.limits import BodyLimits
from loop.serving.protocol import FeedbackRequest, HTTPProblem, error, errors, internal_error
from loop.serving.rate_limit import RateLimiter
from loop.serving.routes import admin, completions, labelling, openai
from loop.serving.routes.completions import Completions


def create_app(gw: Gateway) -> Completions:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pair_task = asyncio.create_task(gw.pairs.run())
        monitor_task = asyncio.create_task(gw.monitor.run())
        yield
        pair_task.cancel()
        monitor_task.cancel()
        await gw.close()

    g = gw.cfg.gateway
    docs = {} if g.public_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="alignloop gateway", lifespan=lifespan, **docs)
    app.state.gateway = gw
    app.state.tokens = tokens = TokenCache(gw.store)
    app.state.limiter = limiter = RateLimiter(g.rate_limit_per_s, g.rate_burst)
    app.add_middleware(BodyLimits, max_bytes=g.max_body_kb * 1024, max_depth=g.max_json_depth)
    app.add_exception_handler(HTTPProblem, _problem)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _bug)
    for routes in (openai, labelling, admin):
        app.include_router(routes.router)
    app.openapi = partial(_schema, app, app.openapi)
    return Completions(app, gw, tokens, limiter)


# The routes that read their body raw (to pass unknown fields to vLLM untouched and parse once),
# and the model each parses it with, for the schema
RAW_BODIES = {"/v1/feedback": FeedbackRequest, **{path: model for path, (_, model) in completions.PATHS.items()}}
COMPLETION_ERRORS = (400, 401, 404, 405, 413, 415, 429, 503, 504)


def _schema(app: FastAPI, generate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """FastAPI's schema, plus the hot path's two operations and the request bodies of the routes
    that parse their body themselves."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = generate()
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, (endpoint, _) in completions.PATHS.items():
        answers = {str(status): {"description": why, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ErrorBody"}}}} for status, why in _errors(COMPLETION_ERRORS)}
        answers["200"] = {"description": "the answer; with `stream: true`, server-sent events",
                          "content": {"application/json": {}, "text/event-stream": {}}}
        schema["paths"][path] = {"post": {"summary": endpoint.replace(".", " ").capitalize(),
                                          "operationId": endpoint.replace(".", "_"), "responses": answers}}
    for path, model in RAW_BODIES.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    return schema


def _errors(statuses: tuple[int, ...]) -> list[tuple[int, str]]:
    return [(status, spec["description"]) for status, spec in errors(*statuses).items()]


async def _problem(request: Request, exc: HTTPProblem) -> JSONResponse:
    return exc.response()


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """The framework's own errors (an unknown path, a method not allowed, a body it cannot parse),
    in the same OpenAI shape as every other error."""
    return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error(400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3]))


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    return internal_error(request.method, request.url.path, exc)
