"""The gateway's FastAPI app: assembly only. State lives in `loop.serving.gateway.Gateway`, who
may call what in `loop.serving.auth`, the routes of each audience in `loop.serving.routes`."""

from __future__ import annotations

import asyncio
import sys
import traceback
import uuid
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
from loop.serving.protocol import HTTPProblem, error
from loop.serving.rate_limit import RateLimiter
from loop.serving.routes import admin, labelling, openai


def create_app(gw: Gateway) -> FastAPI:
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
    app.state.tokens = TokenCache(gw.store)
    app.state.limiter = RateLimiter(g.rate_limit_per_s, g.rate_burst)
    app.add_middleware(BodyLimits, max_bytes=g.max_body_kb * 1024, max_depth=g.max_json_depth)
    app.add_exception_handler(HTTPProblem, _problem)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _bug)
    for routes in (openai, labelling, admin):
        app.include_router(routes.router)
    app.openapi = partial(_schema, app, app.openapi)
    return app


def _schema(app: FastAPI, generate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """FastAPI's schema, plus the request bodies of the routes that parse their body themselves."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = generate()
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in openai.RAW_BODIES.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    return schema


async def _problem(request: Request, exc: HTTPProblem) -> JSONResponse:
    return exc.response()


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """The framework's own errors (an unknown path, a method not allowed, a body it cannot parse),
    in the same OpenAI shape as every other error."""
    return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error(400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3]))


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    """A bug: the details go to the gateway's log under an id, never to the caller."""
    incident = uuid.uuid4().hex[:12]
    print(f"alignloop gateway: internal error {incident} on {request.method} {request.url.path}:",
          file=sys.stderr, flush=True)
    traceback.print_exception(exc)
    return error(500, f"internal error {incident} (the gateway's log has the details)", "internal_error")
