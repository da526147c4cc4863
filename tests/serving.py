"""A real `alignloop serve` (gateway + vLLM CPU engine) in a child process, for the slow tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from loop import config as configuration
from loop.vllm_server import die_with_parent


@dataclass
class Server:
    root: Path
    proc: subprocess.Popen
    url: str
    cfg: configuration.Config

    @property
    def admin_token(self) -> str:
        return self.cfg.admin_token_path.read_text().strip()

    def client(self, token: str | None = None, timeout: float = 60.0) -> httpx.Client:
        token = self.admin_token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def log(self) -> str:
        return (self.root / "serve.log").read_text(errors="replace")

    def cli_args(self) -> list[str]:
        return [sys.executable, "-m", "loop.cli", "--config", str(self.root / "alignloop.toml")]

    def cli(self, *command: str, timeout: float = 1200, check: bool = True) -> subprocess.CompletedProcess:
        """Run an `alignloop` command against this server's config."""
        out = subprocess.run([*self.cli_args(), *command], capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"alignloop {' '.join(command)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start(root: Path, model_dir: Path | None, port: int, engine_port: int, extra: list[str] | None = None,
          timeout: float = 300.0, command: str = "serve", new_session: bool = False) -> Server:
    """`alignloop serve` (or `up`) in `root`; model_dir None: the demo model, built on first use.
    new_session: in a process group of its own (one a test may signal as a whole)."""
    root.mkdir(parents=True, exist_ok=True)
    settings = [f"gateway.port={port}", f"engine.port={engine_port}", *(extra or [])]
    if model_dir is not None:
        settings += [f"model.base={model_dir}", "engine.max_model_len=256"]
    args = [sys.executable, "-m", "loop.cli", "--config", str(root / "alignloop.toml")]
    for s in settings:
        args += ["--set", s]
    subprocess.run(args + ["init"], check=True, capture_output=True)
    log = (root / "serve.log").open("wb")
    proc = subprocess.Popen(args + [command], stdout=log, stderr=subprocess.STDOUT, cwd=root,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=new_session,
                            preexec_fn=die_with_parent)  # a killed test run or bench leaves no server behind
    server = Server(root, proc, f"http://127.0.0.1:{port}", configuration.load(root / "alignloop.toml"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"alignloop serve exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"alignloop serve was not ready in {timeout} s:\n{server.log()}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> int:
    """The first of n consecutive free ports (local engine replicas take port, port+1, ...)."""
    import random
    import socket

    for _ in range(100):
        first = random.randint(20000, 60000)
        try:
            socks = []
            for port in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def make_adapter(model_dir, out, seed: int):
    """A LoRA adapter with random (non-zero) weights: a version that answers differently."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    model.save_pretrained(out)
    return out
