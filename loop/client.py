"""The one HTTP client of the gateway: for the CLI, the scheduler, the retrain cycle, the simulated
users and the labelling app. None of them opens the store while the gateway runs.

Failures come back as `GatewayError`, whose `status` is the HTTP status (None when the gateway did
not answer) and whose `message` is fit to show a person: the gateway's own error message where it
sent one, never a traceback. This module imports nothing else of alignloop, so the labelling app
can use it without the rest.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from loop.config import Config

TIMEOUT_S = 120.0


def version_name(version_id: int) -> str:
    """A version as the gateway names it (and people read it): base, v1, v2."""
    return "base" if version_id == 0 else f"v{version_id}"


class GatewayError(RuntimeError):
    def __init__(self, status: int | None, message: str, where: str = "") -> None:
        super().__init__(f"{where}: {status}: {message}" if where else message)
        self.status, self.message = status, message


class GatewayClient:
    """Calls to one gateway. `token` signs every call in; `call(..., token=...)` overrides it for one
    call (the labelling app shares one client among its signed-in people). Thread-safe."""

    def __init__(self, url: str, token: str | None = None, timeout: float = TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.http = httpx.Client(base_url=self.url, timeout=timeout)

    @classmethod
    def for_config(cls, cfg: Config, token: str | None = None, timeout: float = TIMEOUT_S) -> GatewayClient:
        """The gateway `cfg` describes, signed in with the local admin token `serve` writes."""
        host = "127.0.0.1" if cfg.gateway.host in ("0.0.0.0", "::") else cfg.gateway.host
        if token is None and cfg.admin_token_path.exists():
            token = cfg.admin_token_path.read_text().strip()
        return cls(f"http://{host}:{cfg.gateway.port}", token, timeout)

    def running(self) -> bool:
        """True when the gateway answers at all (its engine may still be starting)."""
        try:
            self.http.get("/healthz", timeout=2.0)
            return True
        except httpx.HTTPError:
            return False

    def ready(self) -> bool:
        """True when the gateway and its engine answer."""
        try:
            return self.http.get("/healthz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def call(self, method: str, path: str, *, json: Any = None, params: dict | None = None,
             timeout: float | None = None, raw: bool = False, token: str | None = None) -> Any:
        token = token or self.token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kwargs: dict[str, Any] = {"json": json, "params": params, "headers": headers}
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise GatewayError(None, f"the gateway at {self.url} did not answer {method} {path} in time") from None
        except httpx.TransportError as e:
            raise GatewayError(None, f"cannot reach the gateway at {self.url} ({type(e).__name__}); is it running? "
                                     "Start it with `alignloop up` (or `alignloop serve`).") from None
        if r.status_code >= 400:
            raise GatewayError(r.status_code, _message(r, method, path), where=f"{method} {path}")
        return r.content if raw else r.json()

    def user_token(self, name: str, role: str) -> str:
        """A sign-in token for `name`: the user is created, or, when it exists already, given a fresh
        token (the old one stops working). Any other failure is raised."""
        try:
            return self.call("POST", "/api/users", json={"name": name, "role": role})["token"]
        except GatewayError as e:
            if e.status != 409:
                raise
        return self.call("POST", f"/api/users/{name}/token")["token"]

    def signs_in(self, token: str, name: str) -> bool:
        """True when `token` is `name`'s working token (False for any other answer, a 401 included)."""
        try:
            return self.call("GET", "/api/me", token=token).get("name") == name
        except GatewayError as e:
            if e.status is None or e.status >= 500:
                raise
            return False

    def close(self) -> None:
        self.http.close()


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
            return f"this gateway has no {method} {path} endpoint ({r.status_code})"
        if isinstance(body.get("detail"), str):
            return body["detail"]
    text = r.text.strip()[:300]
    return f"the gateway answered {r.status_code} {r.reason_phrase}" + (f": {text}" if text else "")


_shared: dict[str, GatewayClient] = {}
_lock = threading.Lock()


def shared(url: str) -> GatewayClient:
    """One keep-alive client per gateway URL for the whole process (httpx clients are thread-safe)."""
    with _lock:
        if url not in _shared:
            _shared[url] = GatewayClient(url)
        return _shared[url]
