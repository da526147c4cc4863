"""A vLLM server the gateway sends requests to: one replica, started here or run by someone else.

`Engine` starts the real vLLM OpenAI server (the CPU build here, CUDA where there is a GPU) on
loopback with LoRA and runtime adapter loading on, and with an API key made fresh for each gateway
(`VLLM_API_KEY`, never on disk or on the command line) so no other local process can call its
`/v1` (answer, or load and unload adapters) behind the gateway's back; waits for `/health`, restarts it when it dies
and then calls `on_ready` (the gateway loads the adapters of the route table there), and stops it with
its whole process group. The child also gets SIGTERM if the parent dies without cleaning up.

`ExternalEngine` is a vLLM server at a URL: it is probed (health, and that it serves `base`), taken
out of rotation when it stops answering and let back in through `on_ready` when it answers again.

Either one takes traffic only while `ready` is set: after `on_ready` returned True.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from loop.config import EngineConfig
from loop.vllm_server import command, die_with_parent, end_group, environment, signal_group

HEALTH_TIMEOUT_S = 2.0
RETRY_S = 2.0  # after a failed on_ready, wait this long before trying again


class Replica:
    """What the gateway knows of one vLLM server: whether it takes traffic (`ready`), its load, why
    it is out (`problem`), and a sync HTTP client for adapter loads. Subclasses supervise it."""

    kind = "replica"

    def __init__(self, name: str, url: str, api_key: str | None, base_name: str,
                 on_ready: Callable[[Replica], bool] | None = None) -> None:
        self.name, self.url, self.api_key, self.base_name = name, url, api_key, base_name
        self.on_ready = on_ready
        self.ready = threading.Event()
        self.restarts = 0          # local: respawns; external: times it came back after going away
        self.in_flight = 0         # requests of any kind being answered on it now (the gateway counts)
        self.answered = 0
        self.failed = 0            # requests that found it gone (connection refused, dropped mid-answer)
        self.problem: str | None = "starting"
        self.adapters: dict[str, str] = {}  # engine name -> path, as loaded on this replica (by Versions)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, timeout=60.0, headers=headers)
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._retry_at = 0.0

    @property
    def pid(self) -> int | None:
        return None

    def mark_down(self, why: str) -> None:
        """Out of rotation until the watcher finds it healthy again and `on_ready` syncs it."""
        if self.ready.is_set():
            print(f"alignloop: replica {self.name} out of rotation: {why}", file=sys.stderr, flush=True)
        self.ready.clear()
        self.problem = why

    def healthy(self) -> str | None:
        """Why it fails its health check now, or None: the check while it takes traffic. What it
        serves was checked when it joined, and a server restarted here misses checks while it loads."""
        try:
            status = self.http.get("/health", timeout=HEALTH_TIMEOUT_S).status_code
        except httpx.TimeoutException:
            return f"health check took longer than {HEALTH_TIMEOUT_S:.0f} s"
        except httpx.HTTPError as e:
            return f"not answering ({type(e).__name__})"
        return None if status == 200 else f"not healthy (/health answered {status})"

    def probe(self) -> str | None:
        """Why this server cannot take traffic now, or None: it answers health checks and serves the base."""
        if problem := self.healthy():
            return problem
        try:
            r = self.http.get("/v1/models", timeout=HEALTH_TIMEOUT_S)
        except httpx.TimeoutException:
            return f"health check took longer than {HEALTH_TIMEOUT_S:.0f} s"
        except httpx.HTTPError as e:
            return f"not answering ({type(e).__name__})"
        try:
            served = [m["id"] for m in r.json()["data"]] if r.status_code == 200 else None
        except (ValueError, KeyError, TypeError):
            served = None
        if served is None:
            return f"not a vLLM server (GET /v1/models answered {r.status_code}: {r.text[:120]!r})"
        if self.base_name not in served:
            return f"serves {served}, not the base model as {self.base_name!r}"
        return None

    def _try_ready(self) -> None:
        if time.monotonic() < self._retry_at:
            return
        problem = self.probe()
        if problem is not None:
            self.problem = problem
            return
        ok = True
        if self.on_ready:
            try:
                ok = self.on_ready(self)
            except Exception as e:  # keep trying: the next attempt may work
                ok, self.problem = False, f"could not load the adapters: {e}"
                print(f"alignloop: replica {self.name} is healthy, but loading its adapters failed: {e}",
                      file=sys.stderr, flush=True)
        if not ok:
            self._retry_at = time.monotonic() + RETRY_S
            return
        self.problem = None
        self.ready.set()

    def wait_ready(self, timeout: float) -> None:
        if not self.ready.wait(timeout):
            raise RuntimeError(f"replica {self.name} ({self.url}) did not become ready in {timeout:.0f} s: "
                               f"{self.problem}")

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "url": self.url, "ready": self.ready.is_set(),
                "problem": self.problem, "in_flight": self.in_flight, "answered": self.answered,
                "failed": self.failed, "restarts": self.restarts, "pid": self.pid,
                "adapters": sorted(self.adapters.copy())}

    def start(self, wait: bool = True) -> None:
        self._watcher = threading.Thread(target=self._watch, name=f"replica-{self.name}", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 20.0) -> None:
        self._stopping.set()
        self.ready.clear()
        if self._watcher:
            self._watcher.join(2)
        self.http.close()


class Engine(Replica):
    """One vLLM server this process starts and supervises."""

    kind = "local"

    def __init__(self, model_dir: Path, cfg: EngineConfig, base_name: str, log_path: Path,
                 on_ready: Callable[[Replica], bool] | None = None, name: str = "local-0",
                 port: int | None = None, devices: str | None = None) -> None:
        self.model_dir, self.cfg, self.log_path = model_dir, cfg, log_path
        self.port = cfg.port if port is None else port
        self.devices = devices
        # only the gateway that started the engine holds it (a benchmark that calls the engine
        # directly, beside the gateway, chooses it with ALIGNLOOP_ENGINE_KEY)
        api_key = os.environ.get("ALIGNLOOP_ENGINE_KEY") or secrets.token_urlsafe(32)
        super().__init__(name, f"http://127.0.0.1:{self.port}", api_key, base_name, on_ready)
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, wait: bool = True) -> None:
        """Start the server and a watcher thread that restarts it when it dies."""
        self._spawn()
        super().start()
        if wait:
            self.wait_ready(self.cfg.startup_timeout_s)

    def wait_ready(self, timeout: float) -> None:
        if not self.ready.wait(timeout):
            raise RuntimeError(f"the vLLM engine did not become healthy in {timeout:.0f} s; "
                               f"its log is {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            command(self.model_dir, self.cfg, self.base_name, self.port),
            env=environment(self.cfg, self.api_key, self.devices),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=die_with_parent)
        log.close()
        self.problem = "starting"

    def probe(self) -> str | None:
        # while it loads, /health refuses connections: a plain "starting" says more than the error
        try:
            httpx.get(f"{self.url}/health", timeout=HEALTH_TIMEOUT_S)
        except httpx.HTTPError:
            return "starting"
        return super().probe()

    def _watch(self) -> None:
        while not self._stopping.is_set():
            proc = self._proc
            if proc is not None and proc.poll() is not None:
                self.mark_down(f"the server exited ({proc.returncode}); restarting it")
                # A server killed hard (SIGKILL, the OOM killer) leaves its engine core behind in its
                # process group, holding memory (on a GPU, the card's): end the group before a new one.
                end_group(proc.pid)
                if self._stopping.is_set():
                    return
                self.restarts += 1
                self.adapters = {}
                self._spawn()
                continue
            if not self.ready.is_set():
                self._try_ready()
            self._stopping.wait(0.5)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server and everything it started (its process group)."""
        self._stopping.set()
        self.ready.clear()
        proc = self._proc
        if proc is not None:
            if proc.poll() is not None:  # the server is gone; what it started may not be
                end_group(proc.pid)
            else:
                signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    signal_group(proc.pid, signal.SIGKILL)
                    proc.wait(5)
                end_group(proc.pid)  # stragglers the server left in its group
        super().stop()


class ExternalEngine(Replica):
    """A vLLM server run by someone else, at a URL: probed, never started or stopped from here."""

    kind = "external"
    DOWN_AFTER = 2  # failed health checks in a row (0.5 s apart) before it leaves rotation

    def _watch(self) -> None:
        misses = 0
        while not self._stopping.is_set():
            if self.ready.is_set():
                problem = self.healthy()
                misses = misses + 1 if problem else 0
                if misses >= self.DOWN_AFTER:
                    self.mark_down(problem)
                    self.adapters = {}  # what it holds is checked again when it comes back
                    self.restarts += 1
                    misses = 0
            else:
                self._try_ready()
            self._stopping.wait(0.5)
