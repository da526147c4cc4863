"""A streamed answer passed through: the engine's server-sent events out under the gateway's id and
the requested model name, the whole answer collected for the log.

`Relay` is the response itself, so that its end is certain: `on_end` runs exactly once however the
stream ends: complete, the engine gone mid-answer, or the client gone, even before the first byte
(a generator that never started never runs its `finally`, and Starlette cancels the response as
soon as the client disconnects, so cleanup inside the generator alone would leak the replica's
in-flight count, the adapter's hold and the exchange's log row).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from store.database import Exchange


class Relay(StreamingResponse):
    def __init__(self, upstream: aiohttp.ClientResponse, record: Exchange, response_id: str, wants_usage: bool,
                 on_end: Callable[[Relay], None]) -> None:
        self.upstream, self.record, self.response_id, self.wants_usage = upstream, record, response_id, wants_usage
        self.on_end = on_end
        self.texts: dict[int, list[str]] = {}
        self.finish: dict[int, str | None] = {}
        self.usage: dict | None = None
        self.done = False  # the engine's [DONE] went through
        self.engine_failed = False
        self._ended = False
        super().__init__(self._events(), media_type="text/event-stream")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # also on cancellation: the client disconnected
            self.end()

    def end(self) -> None:
        """Log the answer as far as it went (status 499 when the client left before [DONE], unless
        it was complete: clients may close the connection as soon as they read it); once."""
        if self._ended:
            return
        self._ended = True
        if not self.done and self.record.status == 200:
            self.record.status = 499
        self.record.choices = [("".join(self.texts[i]), self.finish.get(i)) for i in sorted(self.texts)]
        self.on_end(self)

    async def _events(self) -> AsyncIterator[bytes]:
        try:
            async for raw in self.upstream.content:
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data: ") or line == "data: [DONE]":
                    self.done = self.done or line == "data: [DONE]"
                    if line:
                        yield f"{line}\n\n".encode()
                    continue
                chunk = orjson.loads(line[6:])
                if "error" in chunk:  # the engine failed mid-answer: pass its error event on
                    code = chunk["error"].get("code") if isinstance(chunk["error"], dict) else None
                    self.record.status = code if isinstance(code, int) and 400 <= code < 500 else 503
                    yield f"{line}\n\n".encode()
                    continue
                out = self._rewrite(chunk)
                if out is not None:
                    yield b"data: " + orjson.dumps(out) + b"\n\n"
        except (aiohttp.ClientError, TimeoutError):
            err = {"error": {"message": "the model engine stopped mid-answer", "type": "service_unavailable"}}
            yield b"data: " + orjson.dumps(err) + b"\n\n"
            self.record.status = 503
            self.engine_failed = True

    def _rewrite(self, chunk: dict) -> dict | None:
        """Collect one chunk's text and return it as the client sees it (None: not for the client)."""
        chunk["id"], chunk["model"] = self.response_id, self.record.model_requested
        for c in chunk.get("choices", []):
            delta = c.get("delta") or {}
            self.texts.setdefault(c["index"], []).append(delta.get("content") or c.get("text") or "")
            if c.get("finish_reason"):
                self.finish[c["index"]] = c["finish_reason"]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
            if not self.wants_usage:
                if not chunk.get("choices"):
                    return None  # the usage chunk the gateway asked for, not the client
                chunk.pop("usage")
        return chunk
