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

from loop.serving.protocol import HTTPProblem

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
        try:
            body = await read_body(scope, receive, self.max_bytes, self.max_depth)
        except HTTPProblem as e:
            await e.response()(scope, receive, send)
            return
        if body is not None:  # None: the client went away
            await self.app(scope, _replay(body, receive), send)


async def read_body(scope: Scope, receive: Receive, max_bytes: int, max_depth: int) -> bytes | None:
    """The whole body of a request, checked; None when the client disconnects first."""
    content_type = declared = ""
    for k, v in scope["headers"]:
        name = k.lower()
        if name == b"content-length":
            declared = v.decode("latin-1")
        elif name == b"content-type":
            content_type = v.decode("latin-1")
    if declared.isdecimal() and int(declared) > max_bytes:
        raise _too_big(max_bytes)
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise _too_big(max_bytes)
        chunks.append(chunk)
        more = message.get("more_body", False)
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if body and not is_json(content_type):
        raise HTTPProblem(415, "send the body as JSON with the header 'Content-Type: application/json'",
                          code="unsupported_media_type")
    if too_deep(body, max_depth):
        raise HTTPProblem(400, f"the JSON body nests deeper than {max_depth} levels")
    return body


def _too_big(max_bytes: int) -> HTTPProblem:
    return HTTPProblem(413, f"the request body is larger than {max_bytes // 1024} KiB (gateway.max_body_kb)",
                       code="request_too_large")


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
