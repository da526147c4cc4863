"""Model versions in the running engine: promote, roll back, canary, restore after a restart.

A promotion loads the version's LoRA adapter into vLLM under a fresh, unique name
(`POST /v1/load_lora_adapter`), then flips the router's alias in one assignment and records it in
the store. The previous version stays loaded, so a rollback is just another flip. Requests in
flight keep the engine name they resolved, which stays loaded until two promotions later.
"""

from __future__ import annotations

import secrets
import sys
import threading
import time
from typing import Any

import httpx

from loop.serving.router import Router
from store.database import Store, StoreError


class VersionError(RuntimeError):
    pass


class StaleServing(VersionError):
    """What serves changed since the caller looked."""


def engine_headers(api_key: str | None) -> dict[str, str]:
    """What every call to the engine carries: its API key, when the gateway started it with one."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Versions:
    def __init__(self, store: Store, router: Router, engine_url: str, timeout: float = 60.0,
                 api_key: str | None = None) -> None:
        self.store, self.router = store, router
        self.http = httpx.Client(base_url=engine_url, timeout=timeout, headers=engine_headers(api_key))
        self._lock = threading.Lock()
        self.unload_failures = 0  # shown in status and /metrics; the adapter stays loaded until a restart

    def _load(self, version: dict[str, Any]) -> str:
        if version["id"] == 0:
            return self.router.routes.base_name
        if not version["adapter_path"]:
            raise VersionError(f"version {version['name']} has no adapter")
        name = f"{version['name']}-{secrets.token_hex(3)}"
        try:
            r = self.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": version["adapter_path"]})
        except httpx.HTTPError as e:
            raise VersionError(f"the engine is not answering: {e}") from None
        if r.status_code != 200:
            raise VersionError(f"the engine could not load {version['name']} from {version['adapter_path']}: {r.text}")
        return name

    def _unload_unused(self, keep: set[int]) -> None:
        routes = self.router.routes
        for vid, name in list(routes.engine_names.items()):
            if vid in keep or vid == 0:
                continue
            try:
                self.http.post("/v1/unload_lora_adapter", json={"lora_name": name})
            except httpx.HTTPError as e:
                self.unload_failures += 1
                print(f"alignloop: could not unload adapter {name}: {e}", file=sys.stderr)
            names = {k: v for k, v in self.router.routes.engine_names.items() if k != vid}
            self.router.update(engine_names=names)

    def ensure_loaded(self, version: dict[str, Any]) -> None:
        """Load a version's adapter into the engine (no traffic goes to it until promoted)."""
        routes = self.router.routes
        if version["id"] == 0 or version["id"] in routes.engine_names:
            return
        name = self._load(version)
        self.router.update(engine_names={**self.router.routes.engine_names, version["id"]: name},
                           version_names={**self.router.routes.version_names, version["name"]: version["id"]})

    def promote(self, ref: int | str, actor: str | None = None, reason: str | None = None,
                expect_serving: int | None = None) -> dict[str, Any]:
        """Point the alias at a version; returns what changed and how long it took. With
        `expect_serving`, only if that version still serves (the monitor's rollback of what it watched)."""
        started = time.perf_counter()
        with self._lock:
            if expect_serving is not None and self.router.routes.serving != expect_serving:
                raise StaleServing(f"version {self.router.routes.serving} serves now, not {expect_serving}")
            try:
                version = self.store.version(ref)
            except StoreError as e:
                raise VersionError(str(e)) from None
            if version["status"] in ("rejected", "failed"):
                raise VersionError(f"version {version['name']} was {version['status']}; it cannot serve")
            self.ensure_loaded(version)
            routes = self.router.routes
            previous = routes.serving
            if version["id"] == previous:
                return {"serving": previous, "previous": routes.previous, "changed": False, "seconds": 0.0}
            canary = None if routes.canary == version["id"] else routes.canary
            self.router.update(serving=version["id"], previous=previous, canary=canary,
                               canary_share=routes.canary_share if canary is not None else 0.0)
            self.store.record_promotion(routes.alias, version["id"], previous, actor, reason)
            self._unload_unused({version["id"], previous, canary} - {None})
        return {"serving": version["id"], "previous": previous, "changed": True,
                "seconds": round(time.perf_counter() - started, 4)}

    def load(self, ref: int | str) -> str:
        """Make a version answerable by name (e.g. to evaluate it); returns its engine name."""
        with self._lock:
            try:
                version = self.store.version(ref)
            except StoreError as e:
                raise VersionError(str(e)) from None
            self.ensure_loaded(version)
            return self.router.routes.engine_name(version["id"])

    def rollback(self, actor: str | None = None) -> dict[str, Any]:
        previous = self.router.routes.previous
        if previous is None:
            raise VersionError("nothing to roll back to: no version was promoted before this one")
        return self.promote(previous, actor=actor, reason="rollback")

    def set_canary(self, ref: int | str | None, share: float) -> dict[str, Any]:
        """Send `share` of the alias's traffic to a version (None: stop the canary)."""
        if not 0.0 <= share <= 1.0:
            raise VersionError("canary share must be in [0, 1]")
        with self._lock:
            if ref is None:
                self.router.update(canary=None, canary_share=0.0)
                return {"canary": None, "share": 0.0}
            try:
                version = self.store.version(ref)
            except StoreError as e:
                raise VersionError(str(e)) from None
            self.ensure_loaded(version)
            self.router.update(canary=version["id"], canary_share=share)
        return {"canary": version["id"], "share": share}

    def restore(self) -> None:
        """After the engine (re)starts: load what serves, and what served before, under fresh names."""
        with self._lock:
            serving, previous = self.store.serving(self.router.routes.alias)
            # one consistent table while the adapters load again: no route names an unloaded adapter
            self.router.update(engine_names={0: ""}, canary=None, canary_share=0.0,
                               version_names={"base": 0}, serving=0, previous=None)
            for vid in (serving, previous):
                if vid:
                    try:
                        self.ensure_loaded(self.store.version(vid))
                    except VersionError as e:  # serve the base rather than nothing
                        print(f"alignloop: cannot restore version {vid}: {e}", file=sys.stderr)
            loaded = self.router.routes.engine_names
            self.router.update(serving=serving if serving in loaded else 0,
                               previous=previous if previous in loaded else None)

    def close(self) -> None:
        self.http.close()
