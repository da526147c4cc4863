"""A small HTTP client of the gateway, for the CLI and the scheduler (they never open the store
while the gateway runs). It signs in with the local admin token that `serve` writes."""

from __future__ import annotations

from typing import Any

import httpx

from loop.config import Config


class GatewayError(RuntimeError):
    pass


class GatewayClient:
    def __init__(self, cfg: Config, token: str | None = None, timeout: float = 120.0) -> None:
        host = "127.0.0.1" if cfg.gateway.host in ("0.0.0.0", "::") else cfg.gateway.host
        self.url = f"http://{host}:{cfg.gateway.port}"
        if token is None and cfg.admin_token_path.exists():
            token = cfg.admin_token_path.read_text().strip()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def running(self) -> bool:
        try:
            self.http.get("/healthz", timeout=2.0)
            return True
        except httpx.HTTPError:
            return False

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise GatewayError(f"no gateway is running at {self.url}: start it with `alignloop serve` "
                               "(or `alignloop up`)") from None
        except httpx.HTTPError as e:
            raise GatewayError(f"the gateway at {self.url} did not answer: {e}") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text
            raise GatewayError(f"{method} {path}: {r.status_code}: {message}")
        return r.json()

    def close(self) -> None:
        self.http.close()
