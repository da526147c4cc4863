"""The gateway's FastAPI app: assembly only. State lives in `loop.serving.gateway.Gateway`, who
may call what in `loop.serving.auth`, the routes of each audience in `loop.serving.routes`."""

from __future__ import annotations

import asyncio
import traceback
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from loop.serving.auth import TokenCache
from loop.serving.gateway import Gateway
from loop.serving.protocol import HTTPProblem, error
from loop.serving.routes import admin, labelling, openai


def create_app(gw: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pair_task = asyncio.create_task(gw.pairs.run())
        yield
        pair_task.cancel()
        await gw.close()

    app = FastAPI(title="alignloop gateway", lifespan=lifespan)
    app.state.gateway = gw
    app.state.tokens = TokenCache(gw.store)
    app.add_exception_handler(HTTPProblem, _problem)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _bug)
    for routes in (openai, labelling, admin):
        app.include_router(routes.router)
    return app


async def _problem(request: Request, exc: HTTPProblem) -> JSONResponse:
    return exc.response()


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error(400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3]))


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    traceback.print_exception(exc)
    return error(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")
