"""Model versions in the running engines: promote, roll back, canary, and a replica's sync.

A promotion loads the version's LoRA adapter into every ready vLLM replica under one fresh, unique
name (`POST /v1/load_lora_adapter`), then flips the router's alias in one assignment and records
it in the store; a replica that refuses the adapter aborts it, and what serves is untouched. The
previous version stays loaded, so a rollback is just another flip. Requests in flight keep the
engine name they resolved, which stays loaded until two promotions later. A replica that
(re)joins is given every adapter of the route table before it takes traffic (`sync`).
"""

from __future__ import annotations

import re
import secrets
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from loop.serving.engine import Replica
from loop.serving.protocol import ROLLOUT_NAME_PATTERN
from loop.serving.replicas import Replicas
from loop.serving.router import Router
from store.database import Store, StoreError


class VersionError(RuntimeError):
    pass


class StaleServing(VersionError):
    """What serves changed since the caller looked."""


ADAPTER_NAME = re.compile(r"v\d+-[0-9a-f]{6}")  # the names _load gives (others on an external server are not ours)
ROLLOUT_NAME = re.compile(ROLLOUT_NAME_PATTERN)  # the PPO trainer's policy, for its rollouts only


RETIRE_GRACE_S = 1.0
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what PEFT saves, and vLLM loads


def adapter_problem(path: str) -> str | None:
    """Why `path` is not a LoRA adapter the engine could load (as the gateway sees it), or None."""
    folder = Path(path)
    if not folder.is_dir():
        return f"no adapter at {path}: not a directory the gateway can read"
    if not (folder / "adapter_config.json").is_file():
        return f"no adapter at {path}: it has no adapter_config.json (PEFT's save_pretrained writes one)"
    if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        return f"no adapter at {path}: it has no {' or '.join(ADAPTER_WEIGHTS)}"
    return None


class ReplicaGone(VersionError):
    """The replica did not answer (as opposed to refusing): it leaves rotation and syncs when back."""


class Versions:
    """The route table and the adapters behind it, on every replica. Everything that changes either
    runs under one lock: a promotion, a canary, an evaluation load, and a replica's sync."""

    def __init__(self, store: Store, router: Router, replicas: Replicas) -> None:
        self.store, self.router, self.replicas = store, router, replicas
        self._lock = threading.Lock()
        self._restored = False  # the table is read from the store when the first replica is ready
        self._retiring: dict[str, float] = {}  # engine name out of the table -> since when; unloaded when unused
        self._drainer: threading.Thread | None = None
        self.unload_failures = 0  # shown in status and /metrics; the adapter stays loaded until a restart

    # --- one replica ----------------------------------------------------------------------------

    def _load_on(self, replica: Replica, name: str, path: str) -> None:
        try:
            r = replica.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        except httpx.HTTPError as e:
            raise ReplicaGone(f"replica {replica.name} is not answering: {type(e).__name__}") from None
        if r.status_code != 200:
            raise VersionError(f"replica {replica.name} could not load the adapter from {path}: {r.text[:300]}")
        replica.adapters[name] = path

    def _unload_on(self, replica: Replica, name: str) -> None:
        try:
            replica.http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        except httpx.HTTPError as e:
            self.unload_failures += 1
            print(f"alignloop: could not unload adapter {name} on {replica.name}: {e}", file=sys.stderr)
        replica.adapters.pop(name, None)

    def _held(self, replica: Replica) -> set[str]:
        """The adapter names a replica holds now, as it says."""
        try:
            r = replica.http.get("/v1/models")
            return {m["id"] for m in r.json()["data"]} - {self.router.routes.base_name}
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            raise ReplicaGone(f"replica {replica.name} did not list its models: {type(e).__name__}") from None

    # --- every replica --------------------------------------------------------------------------

    def _load(self, version: dict[str, Any], targets: list[Replica] | None = None) -> str:
        """Load a version's adapter on every ready replica (or on `targets`) under one fresh name.
        A replica that refuses aborts the load (it is unloaded from the others again); one that
        does not answer leaves rotation and gets the adapter when it syncs."""
        if version["id"] == 0:
            return self.router.routes.base_name
        if not version["adapter_path"]:
            raise VersionError(f"version {version['name']} has no adapter")
        explicit = targets is not None
        targets = self.replicas.ready() if targets is None else targets
        if not targets:
            raise VersionError("no engine replica is ready; try again once one is")
        name = f"{version['name']}-{secrets.token_hex(3)}"

        def attempt(replica: Replica) -> VersionError | None:
            try:
                self._load_on(replica, name, version["adapter_path"])
            except VersionError as e:
                return e
            return None

        # on every replica at once: a promotion waits for the slowest load, not for their sum
        with ThreadPoolExecutor(max_workers=len(targets)) as pool:
            outcomes = list(pool.map(attempt, targets))
        loaded = [r for r, e in zip(targets, outcomes) if e is None]
        refused = [e for e in outcomes if e is not None and not isinstance(e, ReplicaGone)]
        gone = [(r, e) for r, e in zip(targets, outcomes) if isinstance(e, ReplicaGone)]
        if refused or (gone and explicit):
            for done in loaded:
                self._unload_on(done, name)
            if refused:
                raise VersionError(f"{refused[0]}; version {version['name']} was loaded nowhere, nothing changed")
            raise gone[0][1]
        for replica, e in gone:
            replica.mark_down(str(e))
        if not loaded:
            raise VersionError("no engine replica answered; try again once one is ready")
        return name

    def _unload_unused(self, keep: set[int]) -> None:
        """Take every other version out of the table now; unload its adapter once no request uses it."""
        routes = self.router.routes
        for vid, name in list(routes.engine_names.items()):
            if vid in keep or vid == 0:
                continue
            names = {k: v for k, v in self.router.routes.engine_names.items() if k != vid}
            self.router.update(engine_names=names)
            self._retiring[name] = time.monotonic()
        if self._retiring and self._drainer is None:
            self._drainer = threading.Thread(target=self._drain, name="adapter-drain", daemon=True)
            self._drainer.start()

    def _drain(self) -> None:
        """Unload retired adapters once no request holds them (vLLM never finishes a request whose
        adapter is unloaded under it), and not before RETIRE_GRACE_S: a request that read the old
        table may not have said it holds the name yet."""
        while True:
            time.sleep(0.2)
            with self._lock:
                now = time.monotonic()
                for name, since in list(self._retiring.items()):
                    if now - since >= RETIRE_GRACE_S and self.router.in_use(name) == 0:
                        for replica in self.replicas.ready():
                            self._unload_on(replica, name)
                        del self._retiring[name]
                if not self._retiring:
                    self._drainer = None
                    return

    def sync(self, replica: Replica) -> bool:
        """A replica's `on_ready`: give it every adapter of the route table before it takes
        traffic (the first replica ready after start reads the table from the store). False: it
        stays out of rotation and tries again."""
        with self._lock:
            try:
                if not self._restored:
                    self._restore_on(replica)
                    self._restored = True
                    return True
                held = self._held(replica)
            except ReplicaGone:
                return False
            routes = self.router.routes
            failed: list[int] = []
            for vid, name in routes.engine_names.items():
                if vid == 0 or name in held:
                    continue
                try:
                    self._load_on(replica, name, self.store.version(vid)["adapter_path"])
                except ReplicaGone:
                    return False
                except (VersionError, StoreError) as e:
                    print(f"alignloop: replica {replica.name} cannot load version {vid}: {e}", file=sys.stderr)
                    failed.append(vid)
            for name in held - set(routes.engine_names.values()) - set(self._retiring):
                if ADAPTER_NAME.fullmatch(name):  # ours, unloaded elsewhere while it was away
                    self._unload_on(replica, name)
            if not failed:
                return True
            if any(r is not replica for r in self.replicas.ready()):
                replica.problem = f"cannot load versions {failed}; the other replicas serve them"
                return False
            self._drop(failed)  # the only replica: serve without them rather than serve nothing
            return True

    def _drop(self, vids: list[int]) -> None:
        routes = self.router.routes
        names = {k: v for k, v in routes.engine_names.items() if k not in vids}
        self.router.update(engine_names=names,
                           serving=0 if routes.serving in vids else routes.serving,
                           previous=None if routes.previous in vids else routes.previous,
                           canary=None if routes.canary in vids else routes.canary,
                           canary_share=0.0 if routes.canary in vids else routes.canary_share)

    def _restore_on(self, replica: Replica) -> None:
        """At start: serve what the newest promotion says (and keep what served before it loaded),
        falling back to the base for a version that cannot load."""
        serving, previous = self.store.serving(self.router.routes.alias)
        self.router.update(engine_names={0: ""}, canary=None, canary_share=0.0,
                           version_names={"base": 0}, serving=0, previous=None)
        for vid in (serving, previous):
            if vid:
                try:
                    self.ensure_loaded(self.store.version(vid), [replica])
                except ReplicaGone:
                    raise
                except VersionError as e:  # serve the base rather than nothing
                    print(f"alignloop: cannot restore version {vid}: {e}", file=sys.stderr)
        loaded = self.router.routes.engine_names
        self.router.update(serving=serving if serving in loaded else 0,
                           previous=previous if previous in loaded else None)

    def ensure_loaded(self, version: dict[str, Any], targets: list[Replica] | None = None) -> None:
        """Load a version's adapter on the replicas (no traffic goes to it until promoted)."""
        routes = self.router.routes
        if version["id"] == 0 or version["id"] in routes.engine_names:
            return
        name = self._load(version, targets)
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

    # --- the PPO trainer's rollout adapters (never in the route table: no user reaches them) -----

    def load_rollout(self, name: str, path: str) -> list[str]:
        """Load a training policy's adapter on every ready replica under the trainer's `name`, then
        unload every other rollout adapter: a trainer that died leaves at most one behind. Returns
        the replicas that hold it (one that refuses is left out; rollouts go to the others)."""
        if not ROLLOUT_NAME.fullmatch(name):
            raise VersionError(f"{name!r} is not a rollout adapter name (rollout-...)")
        with self._lock:
            targets = self.replicas.ready()
            if not targets:
                raise VersionError("no engine replica is ready; try again once one is")
            held: list[str] = []
            refused: list[VersionError] = []
            for replica in targets:
                try:
                    if name in replica.adapters:  # a killed run's, under the name its resumed run gives: stale weights
                        self._unload_on(replica, name)
                    self._load_on(replica, name, path)
                    held.append(replica.name)
                except ReplicaGone as e:
                    replica.mark_down(str(e))
                except VersionError as e:
                    refused.append(e)
            if not held:
                raise refused[0] if refused else VersionError("no engine replica answered; try again once one is")
            for replica in self.replicas.members:
                for old in [n for n in replica.adapters if ROLLOUT_NAME.fullmatch(n) and n != name]:
                    self._unload_on(replica, old)
            return held

    def unload_rollout(self, name: str) -> list[str]:
        """Unload a rollout adapter wherever it is loaded; returns those replicas."""
        with self._lock:
            holders = [r for r in self.replicas.members if name in r.adapters]
            for replica in holders:
                self._unload_on(replica, name)
            return [r.name for r in holders]

    def set_canary(self, ref: int | str | None, share: float, expect_canary: int | None = None) -> dict[str, Any]:
        """Send `share` of the alias's traffic to a version (None: stop the canary). With
        `expect_canary`, only if that version is still the canary (the monitor stopping it)."""
        if not 0.0 <= share <= 1.0:
            raise VersionError("canary share must be in [0, 1]")
        with self._lock:
            if expect_canary is not None and self.router.routes.canary != expect_canary:
                raise StaleServing(f"the canary is {self.router.routes.canary} now, not {expect_canary}")
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

