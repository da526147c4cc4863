"""PPO's rollouts on a vLLM engine of the run's own (`ppo.rollouts = "dedicated"`), not the serving one.

The main process starts a vLLM server of the base model with no LoRA layers, on loopback at the
port the job names, and stops it (its whole process group) when the run ends. Every `ppo.sync_steps`
rollout steps it folds the policy's adapter into the base weights, saves them, and has the engine
reload them in place (vLLM's `reload_weights`, through `/collective_rpc`), then empties the engine's
prefix cache (its keys and values were computed with the old weights). Every process sends its
prompts as token ids straight to the engine's `/v1/completions`, one request for all of them.

Why: on the CPU build the LoRA layers of the serving engine halve its tokens/s even for requests
that use no adapter, and with the adapter it is slower still (ops/bench/results/rollouts.md). The
price: a second engine (its start-up, ~20-30 s here, and its memory) for the length of a run, and
on a GPU a share of the trainer's first GPU (`ppo.rollout_engine_share`, counted by
`loop.training.memory.check` before the run starts). The engine runs with vLLM's development
endpoints on (`VLLM_SERVER_DEV_MODE`), which vLLM does not guard with the API key: any local
process could call them while the run lasts.

As with the serving engine, the first failure (the engine does not start, a reload or a request
fails) is logged and the rest of the run samples with HF `generate`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from loop import vllm_server
from loop.config import EngineConfig
from loop.training.engine_sampler import TIMEOUT_S, EngineSampler
from loop.vllm_server import NEUTRAL_SAMPLING

KEY_ENV = "ALIGNLOOP_ROLLOUT_ENGINE_KEY"  # the engine's API key, the same in every process (set by the scheduler)
SERVED_NAME = "policy"


def free_port() -> int:
    """A loopback port nothing listens on now (the scheduler picks it for the job)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_settings(engine: EngineConfig, port: int, gpu_share: float = 0.3) -> dict[str, Any]:
    """What a job's `"rollouts": {"dedicated": ...}` holds: the port, the [engine] sizes, and on a
    GPU the share of it this engine takes (`ppo.rollout_engine_share`)."""
    return {"port": port, "max_model_len": engine.max_model_len, "kv_cache_gb": engine.kv_cache_gb,
            "gpu_memory_share": gpu_share, "startup_timeout_s": engine.startup_timeout_s}


def merged_weights(model) -> dict[str, Any]:
    """The policy's weights with its LoRA adapter folded in, under the base model's names (what vLLM
    loads); the model itself is not changed (no merge and unmerge, so no rounding drift)."""
    import torch
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    out: dict[str, Any] = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                out[f"{name}.weight"] = (weight + delta).contiguous()
        for key, tensor in base.state_dict().items():
            if "lora_" not in key:
                out.setdefault(key.replace(".base_layer.", "."), tensor.detach().clone().contiguous())
    return out


class RolloutEngine(EngineSampler):
    """A run's own engine: what `EngineSampler` does, without the gateway. `adapter_at(step)` still
    names the policy a step samples from (the engine serves one at a time, under SERVED_NAME)."""

    WHERE = "dedicated engine"
    ERRORS = (httpx.HTTPError, RuntimeError, OSError, KeyError, TypeError)

    def __init__(self, url: str, api_key: str | None, folder: Path, tag: str, sync_steps: int, first_step: int = 1,
                 log=print) -> None:
        super().__init__(None, folder, tag, sync_steps, first_step, log)
        self.url = url
        self.proc: subprocess.Popen | None = None  # the engine, on the main process
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, timeout=TIMEOUT_S, headers=headers)

    @classmethod
    def start(cls, settings: dict[str, Any], base_model: str, run_dir: Path, sync_steps: int, first_step: int,
              log=print, main: bool = True) -> RolloutEngine:
        """On the main process start the engine and wait for it; elsewhere only connect (the main
        process has loaded the policy before anyone samples: ppo.run's barrier)."""
        tag = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:10]
        port, key = int(settings["port"]), os.environ.get(KEY_ENV) or None
        engine = cls(f"http://127.0.0.1:{port}", key, run_dir / "rollout-weights", tag, sync_steps, first_step, log)
        if not main:
            return engine
        cfg = EngineConfig(port=port, max_model_len=settings.get("max_model_len", 512),
                           kv_cache_gb=settings.get("kv_cache_gb", 1),
                           gpu_memory_share=settings.get("gpu_memory_share", 0.3))
        env = vllm_server.environment(cfg, key or "")
        if not key:  # a run started by hand, not by the scheduler: on loopback, without a key
            del env["VLLM_API_KEY"]
        env["VLLM_SERVER_DEV_MODE"] = "1"
        log_path = run_dir / "rollout-engine.log"
        with log_path.open("ab") as out:
            engine.proc = subprocess.Popen(vllm_server.command(Path(base_model), cfg, SERVED_NAME, port, lora=False),
                                           env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True, preexec_fn=vllm_server.die_with_parent)
        problem = engine._wait_healthy(float(settings.get("startup_timeout_s", 300.0)))
        if problem:
            said = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-1:]
            engine._fail("starting the rollout engine",
                         RuntimeError(f"{problem}; {said[0][:300] if said else 'nothing in its log'} (log: {log_path})"))
            engine._stop_engine()
        else:
            log(f"ppo: rollout engine up on {engine.url} (pid {engine.proc.pid})")
        return engine

    def _wait_healthy(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"it exited with status {self.proc.returncode}"
            try:
                if self.http.get("/health", timeout=2).status_code == 200:
                    return None
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return f"not healthy after {timeout:.0f} s"

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        response = self.http.post(path, json=body)
        if response.status_code >= 400:
            raise RuntimeError(f"{path}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json() if response.content else None

    def _load(self, model, name: str, folder: Path) -> None:
        """The policy as it is now into the engine's weights."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(merged_weights(model), str(folder / "model.safetensors"))
        self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(folder.resolve())}})
        self._post("/reset_prefix_cache", {})

    def _sample(self, step: int, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float,
                min_new_tokens: int) -> list[dict[str, Any]]:
        data = self._post("/v1/completions", {
            "model": SERVED_NAME, "prompt": prompt_ids, "max_tokens": max_new_tokens, "min_tokens": min_new_tokens,
            "temperature": temperature, **NEUTRAL_SAMPLING, "return_token_ids": True, "logprobs": 0})
        return [{"token_ids": c["token_ids"], "finish_reason": c["finish_reason"],
                 "logprobs": (c.get("logprobs") or {}).get("token_logprobs")}
                for c in sorted(data["choices"], key=lambda c: c["index"])]

    def _stop_engine(self) -> None:
        if self.proc is None:
            return
        vllm_server.signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        vllm_server.end_group(self.proc.pid)
        self.proc.wait()
        self.proc = None

    def close(self) -> None:
        """Main process: stop the engine (its whole process group) and remove the saved weights."""
        self._stop_engine()
        self.http.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def for_job(job: dict[str, Any], run_dir: Path, sync_steps: int, first_step: int, log=print) -> EngineSampler | None:
    """The sampler a PPO job asks for: `"rollouts": {"dedicated": {...}}` its own engine,
    `{"gateway": URL}` the serving one, nothing: None (HF `generate`)."""
    settings = (job.get("rollouts") or {}).get("dedicated")
    if settings:
        main = int(os.environ.get("RANK", "0")) == 0
        return RolloutEngine.start(settings, job["base_model"], run_dir, sync_steps, first_step, log, main)
    return EngineSampler.for_job(job, run_dir, sync_steps, first_step, log)
