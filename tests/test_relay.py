"""The streamed answer's end runs exactly once, however the stream ends: the unit around
loop.serving.relay (the engine's side is a list of SSE lines; the real engine streams in
test_serving and test_clients)."""

from __future__ import annotations

import asyncio

import orjson

from loop.serving.relay import Relay
from store.database import Exchange

LINES = [b'data: {"id":"x","model":"m","choices":[{"index":0,"delta":{"content":"Hel"}}]}\n', b"\n",
         b'data: {"id":"x","model":"m","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}\n',
         b'data: {"id":"x","model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n',
         b"data: [DONE]\n"]


class Upstream:
    """What Relay reads of an aiohttp response: `content`, async-iterable lines."""

    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines

    @property
    def content(self):
        async def lines():
            for line in self.lines:
                await asyncio.sleep(0)
                yield line
        return lines()


def relay(ends: list[Relay], wants_usage: bool = False) -> Relay:
    record = Exchange(request_id="chatcmpl-1", endpoint="chat.completions", model_requested="alignloop",
                      version_id=0, messages=[{"role": "user", "text": "hi"}], choices=[], sampling={})
    return Relay(Upstream(LINES), record, "chatcmpl-1", wants_usage, ends.append)


def run(r: Relay, receive) -> list[dict]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        await asyncio.sleep(0)
        sent.append(message)

    asyncio.run(r({"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}, receive, send))
    return sent


async def never_disconnects() -> dict:
    await asyncio.Event().wait()
    return {}


async def disconnected() -> dict:
    return {"type": "http.disconnect"}


def test_a_whole_stream_is_passed_through_and_logged_once():
    ends: list[Relay] = []
    sent = run(relay(ends), never_disconnects)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    events = [e for e in body.decode().split("\n\n") if e]
    chunks = [orjson.loads(e[6:]) for e in events if e != "data: [DONE]"]
    assert events[-1] == "data: [DONE]"
    assert all(c["id"] == "chatcmpl-1" and c["model"] == "alignloop" for c in chunks)
    assert all("usage" not in c for c in chunks)  # the client did not ask for usage: the gateway did
    assert len(ends) == 1
    record = ends[0].record
    assert record.status == 200 and record.choices == [("Hello", "stop")]
    assert ends[0].usage == {"prompt_tokens": 3, "completion_tokens": 2}


def test_the_usage_chunk_reaches_a_client_that_asked_for_it():
    ends: list[Relay] = []
    sent = run(relay(ends, wants_usage=True), never_disconnects)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert b'"usage":{"prompt_tokens":3' in body


def test_a_client_gone_before_the_first_byte_still_ends_the_stream_once():
    """Starlette cancels the response as soon as the client disconnects, before the generator has
    started: the end (replica in-flight count, adapter hold, the exchange's log row) must still run."""
    ends: list[Relay] = []
    r = relay(ends)
    run(r, disconnected)
    assert len(ends) == 1
    assert ends[0].record.status == 499 and ends[0].record.choices == []
    r.end()  # a second call does nothing
    assert len(ends) == 1
