"""What a request body may be, checked before any route sees it: JSON, not too big, not too deep.

`BodyLimits` is plain ASGI middleware: it reads the body of a POST, PUT or PATCH once, answers
413 when it is larger than the limit (by its Content-Length, or while it arrives), 415 when a
non-empty body is not declared JSON (so a web page cannot post to the gateway with a "simple"
`text/plain` request), and 400 when it nests deeper than the limit (Python's parser would hit
its recursion limit on a 100,000-deep body), then hands the same bytes to the app.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from loop.serving.protocol import error

Scope = Message = dict[str, Any]  # ASGI's, as plain types
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_WITH_BODY = {"POST", "PUT", "PATCH"}
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def too_deep(raw: bytes, limit: int) -> bool:
    """Whether the JSON text `raw` nests arrays and objects deeper than `limit`."""
    if raw.count(b"{") + raw.count(b"[") <= limit:  # the usual case, at C speed
        return False
    depth = 0
    for b in _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS):
        depth += 1 if b in b"[{" else -1
        if depth > limit:
            return True
    return False


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class BodyLimits:
    def __init__(self, app: ASGIApp, max_bytes: int, max_depth: int) -> None:
        self.app, self.max_bytes, self.max_depth = app, max_bytes, max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _WITH_BODY:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length", "")
        if declared.isdecimal() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, 413, self._too_big())
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, 413, self._too_big())
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if body and not is_json(headers.get("content-type", "")):
            await self._refuse(scope, receive, send, 415,
                               "send the body as JSON with the header 'Content-Type: application/json'")
            return
        if too_deep(body, self.max_depth):
            await self._refuse(scope, receive, send, 400, f"the JSON body nests deeper than {self.max_depth} levels")
            return
        await self.app(scope, _replay(body, receive), send)

    def _too_big(self) -> str:
        return f"the request body is larger than {self.max_bytes // 1024} KiB (gateway.max_body_kb)"

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
        code = {413: "request_too_large", 415: "unsupported_media_type"}.get(status)
        await error(status, message, code=code)(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the body already read, then whatever the client sends next
    (a disconnect, which streaming responses listen for)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
