"""The hot path, as plain ASGI in front of the FastAPI app: `POST /v1/chat/completions` and
`POST /v1/completions`.

Every live request comes here, so it skips what a framework route costs (routing, dependency
injection, a thread for the caller's key, two exception middlewares: together ~1 ms of CPU a
request on this machine, more than the rest of the gateway). It does what that route would do, in
the same order: read and check the body (`limits.read_body`: 413, 415, 400), find the caller and
count it against its rate limit (`auth.api_caller`: 401, 429), parse the body once (`protocol`:
400), then `Gateway.complete`. Every other path goes on to the FastAPI app, whose schema lists
these two as well (`loop.serving.app`).
"""

from __future__ import annotations

from loop.serving.auth import TokenCache, api_caller
from loop.serving.gateway import Gateway
from loop.serving.limits import ASGIApp, Receive, Scope, Send, read_body
from loop.serving.protocol import ChatRequest, CompletionRequest, HTTPProblem, internal_error, json_object, parse
from loop.serving.rate_limit import RateLimiter

# path -> (the endpoint's name in the log and metrics, the model its body is parsed with)
PATHS = {"/v1/chat/completions": ("chat.completions", ChatRequest),
         "/v1/completions": ("completions", CompletionRequest)}


class Completions:
    def __init__(self, app: ASGIApp, gw: Gateway, tokens: TokenCache, limiter: RateLimiter) -> None:
        self.app, self.gw, self.tokens, self.limiter = app, gw, tokens, limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = PATHS.get(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        try:
            response = await self._answer(scope, receive, *route)
        except HTTPProblem as e:  # refused here or by the engine, or no engine: counted as the caller got it
            response = e.response()
            self.gw.metrics.requests.labels(route[0], str(e.status)).inc()
        except Exception as e:  # a bug: logged under an id, never shown to the caller
            response = internal_error(scope["method"], scope["path"], e)
            self.gw.metrics.requests.labels(route[0], "500").inc()
        if response is not None:
            await response(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive, endpoint: str, model: type):
        if scope["method"] != "POST":
            raise HTTPProblem(405, "Method Not Allowed", headers={"Allow": "POST"})
        g = self.gw.cfg.gateway
        raw = await read_body(scope, receive, g.max_body_kb * 1024, g.max_json_depth)
        if raw is None:  # the client went away before its body was in
            return None
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
        client = scope.get("client")
        who = await api_caller(self.tokens, self.limiter, g.require_api_key, header, client[0] if client else "-")
        body = json_object(raw)
        return await self.gw.complete(endpoint, scope["path"], parse(model, body), body, who["id"] if who else None)
