"""The gateway's HTTP API as the labelling app uses it: one function per call, failures as ApiError.

The app never opens the store; everything goes through these calls. The gateway's address comes
from ALIGNLOOP_GATEWAY_URL (default http://127.0.0.1:8000), read at every call. ApiError carries a
sentence fit to show a person (the gateway's own error message where it sent one), never a traceback.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 15.0
ARENA_TIMEOUT_S = 300.0  # two answers from the engine; slow on CPU

_clients: dict[str, httpx.Client] = {}
_lock = threading.Lock()


class ApiError(Exception):
    """A call that failed: `status` is the HTTP status, or None when the gateway did not answer."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def gateway_url() -> str:
    return os.environ.get("ALIGNLOOP_GATEWAY_URL", DEFAULT_URL).rstrip("/")


def _client(url: str) -> httpx.Client:
    """One keep-alive client per gateway, shared by all sessions (httpx clients are thread-safe)."""
    with _lock:
        if url not in _clients:
            _clients[url] = httpx.Client(base_url=url, timeout=TIMEOUT_S)
        return _clients[url]


def call(method: str, path: str, token: str | None, *, json: Any = None, params: dict | None = None,
         timeout: float = TIMEOUT_S, raw: bool = False) -> Any:
    url = gateway_url()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = _client(url).request(method, path, json=json, params=params, headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        raise ApiError(None, f"the gateway at {url} did not answer {method} {path} within {timeout:.0f} s") from None
    except httpx.TransportError as e:
        raise ApiError(None, f"cannot reach the gateway at {url} ({type(e).__name__}); is it running? "
                             "Start it with `alignloop up` or set ALIGNLOOP_GATEWAY_URL.") from None
    if r.status_code >= 400:
        raise ApiError(r.status_code, _message(r, method, path))
    return r.content if raw else r.json()


def _message(r: httpx.Response, method: str, path: str) -> str:
    try:
        body = r.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if r.status_code in (404, 405) and body.get("detail") in ("Not Found", "Method Not Allowed"):
            return f"this gateway has no {method} {path} endpoint yet ({r.status_code})"
        if isinstance(body.get("detail"), str):
            return body["detail"]
    text = r.text.strip()[:300]
    return f"the gateway answered {r.status_code} {r.reason_phrase}" + (f": {text}" if text else "")


# --- everyone ---------------------------------------------------------------------------------

def me(token: str) -> dict[str, Any]:
    return call("GET", "/api/me", token)


def next_pair(token: str) -> dict[str, Any]:
    return call("GET", "/api/label/next", token)


def label(token: str, pair_id: int, choice: str, rationale: str | None = None,
          seconds: float | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"pair_id": pair_id, "choice": choice}
    if rationale:
        body["rationale"] = rationale
    if seconds is not None:
        body["seconds"] = seconds
    return call("POST", "/api/label", token, json=body)


def undo(token: str) -> dict[str, Any]:
    return call("POST", "/api/label/undo", token)


def guidelines(token: str) -> str:
    return call("GET", "/api/guidelines", token)["text"]


def arena(token: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return call("POST", "/api/arena", token, json={"prompt": prompt, "max_tokens": max_tokens},
                timeout=ARENA_TIMEOUT_S)


def stats(token: str) -> dict[str, Any]:
    return call("GET", "/api/stats", token)


# --- admins -----------------------------------------------------------------------------------

def status(token: str) -> dict[str, Any]:
    return call("GET", "/api/status", token)


def versions(token: str) -> list[dict[str, Any]]:
    return call("GET", "/api/versions", token)


def add_user(token: str, name: str, role: str) -> dict[str, Any]:
    return call("POST", "/api/users", token, json={"name": name, "role": role})


def set_guidelines(token: str, text: str) -> str:
    return call("PUT", "/api/guidelines", token, json={"text": text})["text"]


def promote(token: str, version: str) -> dict[str, Any]:
    return call("POST", "/api/promote", token, json={"version": version}, timeout=120.0)


def rollback(token: str) -> dict[str, Any]:
    return call("POST", "/api/rollback", token, timeout=120.0)


def retrain(token: str, method: str | None = None, force: bool = False) -> dict[str, Any]:
    """Start `alignloop retrain` on the gateway's machine; None means the configured method."""
    return call("POST", "/api/retrain", token, json={"method": method, "force": force})


def new_token(token: str, name: str) -> dict[str, Any]:
    return call("POST", f"/api/users/{name}/token", token)


def export(token: str, kind: str, fmt: str = "jsonl") -> bytes:
    """An export file (kind: pairs, prompts or feedback; fmt: jsonl or parquet), as `alignloop export` writes it."""
    return call("GET", f"/api/export/{kind}", token, params={"format": fmt}, timeout=300.0, raw=True)
