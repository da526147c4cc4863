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

import time
from typing import Any

from fastapi import Request

from loop.serving.protocol import HTTPProblem
from loop.serving.rate_limit import retry_after
from store.database import Store

TOKEN_CACHE_S = 5.0  # a new or rotated token works at once; an old one stops within this
TOKEN_CACHE_MAX = 10_000
PEOPLE = ("labeller", "admin")  # the roles that may sign in to the labelling app and its API


class TokenCache:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}

    def user(self, token: str) -> dict[str, Any] | None:
        now = time.monotonic()
        hit = self._cache.get(token)
        if hit and hit[0] > now:
            return hit[1]
        found = self.store.user_by_token(token)
        if len(self._cache) > TOKEN_CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (now + TOKEN_CACHE_S, found)
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


def api_user(request: Request) -> dict[str, Any] | None:
    try:
        who = user(request)
    except HTTPProblem:
        who = None
    if who is None and request.app.state.gateway.cfg.gateway.require_api_key:
        raise HTTPProblem(401, "send an API key ('Authorization: Bearer <key>'); an admin makes one with "
                               "`alignloop user add NAME --role app`", "authentication_error")
    key = f"user:{who['id']}" if who else f"address:{request.client.host if request.client else '-'}"
    wait = request.app.state.limiter.wait_s(key)
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
