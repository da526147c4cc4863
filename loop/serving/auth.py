"""Who sent a request, and what they may do: FastAPI dependencies for the three audiences.

- `api_user`: the OpenAI-compatible `/v1`; clients always send some API key, and an unknown one is
  anonymous unless `gateway.require_api_key` is on. Every caller is rate-limited (`RateLimiter`):
  by its key, or by its address when anonymous (so made-up keys do not buy a fresh allowance).
- `signed_in`: the labelling API; a person's token is required (an app's key is for `/v1` only).
- `admin`: the admin API; an admin's token is required.

Roles: `admin`, `labeller` (people), `app` (an application's API key: `/v1` only), `system`
(imports and the demo; cannot sign in).

Tokens are looked up in the store and cached for a few seconds, because every /v1 request carries
one and the store's lock is better left to the writer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Request

from loop.serving.protocol import HTTPProblem
from loop.serving.rate_limit import RateLimiter, retry_after
from store.database import Store

TOKEN_CACHE_S = 5.0  # a new token works at once; a replaced one stops at once too (`TokenCache.clear`)
TOKEN_CACHE_MAX = 10_000
PEOPLE = ("labeller", "admin")  # the roles that may sign in to the labelling app and its API


class TokenCache:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}

    def user(self, token: str) -> dict[str, Any] | None:
        hit = self._cache.get(token)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        return self._remember(token, self.store.user_by_token(token))

    async def user_async(self, token: str) -> dict[str, Any] | None:
        """The same, for the event loop: a cache miss asks the store in a thread."""
        hit = self._cache.get(token)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        return self._remember(token, await asyncio.to_thread(self.store.user_by_token, token))

    def clear(self) -> None:
        """Forget every lookup: after a token is replaced, the old one must stop now, not in seconds."""
        self._cache.clear()

    def _remember(self, token: str, found: dict[str, Any] | None) -> dict[str, Any] | None:
        if len(self._cache) > TOKEN_CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (time.monotonic() + TOKEN_CACHE_S, found)
        return found


def user(request: Request) -> dict[str, Any] | None:
    """Who sent the request, if the token is a user's; None without a token."""
    header = request.headers.get("authorization", "")
    if not header:
        return None
    token = header.removeprefix("Bearer ").strip()
    found = request.app.state.tokens.user(token) if token else None
    if found is None:
        raise HTTPProblem(401, "unknown or malformed token", "authentication_error")
    return found


async def api_user(request: Request) -> dict[str, Any] | None:
    state = request.app.state
    return await api_caller(state.tokens, state.limiter, state.gateway.cfg.gateway.require_api_key,
                            request.headers.get("authorization", ""), request.client.host if request.client else "-")


async def api_caller(tokens: TokenCache, limiter: RateLimiter, require_key: bool, header: str,
                     address: str) -> dict[str, Any] | None:
    """The caller of a /v1 request from its Authorization header (an unknown key is anonymous
    unless keys are required), counted against its rate limit."""
    token = header.removeprefix("Bearer ").strip()
    who = await tokens.user_async(token) if token else None
    if who is None and require_key:
        raise HTTPProblem(401, "send an API key ('Authorization: Bearer <key>'); an admin makes one with "
                               "`alignloop user add NAME --role app`", "authentication_error")
    key = f"user:{who['id']}" if who else f"address:{address}"
    wait = limiter.wait_s(key)
    if wait > 0:
        raise HTTPProblem(429, f"too many requests from this {'API key' if who else 'address'}; retry in "
                               f"{wait:.2f} s", "rate_limit_error", code="rate_limit_exceeded",
                          headers={"Retry-After": retry_after(wait)})
    return who


def signed_in(request: Request) -> dict[str, Any]:
    who = user(request)
    if who is None:
        raise HTTPProblem(401, "sign in: send 'Authorization: Bearer <token>'", "authentication_error")
    if who["role"] not in PEOPLE:
        raise HTTPProblem(403, f"{who['name']} is an {who['role']} key: it may call /v1 only", "permission_error")
    return who


def admin(request: Request) -> dict[str, Any]:
    who = signed_in(request)
    if who["role"] != "admin":
        raise HTTPProblem(403, f"{who['name']} is a {who['role']}; this needs an admin", "permission_error")
    return who
