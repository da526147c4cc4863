"""The gateway's HTTP API as the labelling app uses it: one function per call, failures as ApiError.

The app never opens the store; every call goes through the project's one gateway client
(`loop.client`). The gateway's address comes from ALIGNLOOP_GATEWAY_URL (default
http://127.0.0.1:8000), read at every call. ApiError carries a sentence fit to show a person (the
gateway's own error message where it sent one), never a traceback.
"""

from __future__ import annotations

import os
from typing import Any

from loop.client import GatewayError as ApiError  # noqa: F401  (the app catches api.ApiError)
from loop.client import shared

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 15.0
ARENA_TIMEOUT_S = 300.0  # two answers from the engine; slow on CPU


def gateway_url() -> str:
    return os.environ.get("ALIGNLOOP_GATEWAY_URL", DEFAULT_URL).rstrip("/")


def call(method: str, path: str, token: str | None, *, json: Any = None, params: dict | None = None,
         timeout: float = TIMEOUT_S, raw: bool = False) -> Any:
    return shared(gateway_url()).call(method, path, json=json, params=params, timeout=timeout, raw=raw, token=token)


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


def queue(token: str, limit: int) -> dict[str, Any]:
    return call("GET", "/api/queue", token, params={"limit": limit})


def versions(token: str) -> list[dict[str, Any]]:
    return call("GET", "/api/versions", token)


def users(token: str) -> list[dict[str, Any]]:
    return call("GET", "/api/users", token)


def add_user(token: str, name: str, role: str) -> dict[str, Any]:
    return call("POST", "/api/users", token, json={"name": name, "role": role})


def exclude(token: str, name: str, excluded: bool = True) -> dict[str, Any]:
    return call("POST", f"/api/users/{name}/exclude", token, json={"excluded": excluded})


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
