"""PPO's rollouts sampled by the serving vLLM engine, through the gateway, instead of HF `generate`.

Every `ppo.sync_steps` rollout steps the main process saves the policy's LoRA adapter and loads it
on the engine under a fresh name (`POST /api/rollouts/adapters`; the gateway unloads the older
rollout adapter there); every process then sends its prompts as token ids (`POST /api/rollouts`,
at the engine's lowest priority, so live users come first) and gets the sampled token ids back.
The trainer recomputes every log-probability itself, as after `generate`: the engine only picks the
tokens. With `sync_steps` > 1 the tokens come from a policy up to `sync_steps - 1` steps old (the
ratio PPO clips is still taken against the current one), and the engine may compute in another
precision than the trainer: both shift the sampling distribution slightly, as in any system that
samples with vLLM (OpenRLHF, verl).

The first failure (no gateway, an engine that cannot read the adapter's folder, a timeout) is
logged and the rest of the run samples with `generate`: a run never fails for want of an engine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

from loop.client import GatewayClient, GatewayError

TOKEN_ENV = "ALIGNLOOP_GATEWAY_TOKEN"  # the admin token, passed by the scheduler in the environment (not in job.json)
TIMEOUT_S = 600.0


class EngineSampler:
    """One PPO run's rollouts on the engine. Every process has one; only the main one loads adapters.
    The adapter for a step is named by the step it was loaded at, on a schedule every process knows
    (every `sync_steps` steps from `first_step`), so the others need not be told."""

    WHERE = "engine"  # what a run's `rollouts_on` and its fallback message say
    ERRORS: tuple[type[Exception], ...] = (GatewayError, OSError)  # a failure of the engine, not a bug

    def __init__(self, client: GatewayClient, folder: Path, tag: str, sync_steps: int, first_step: int = 1,
                 log=print) -> None:
        self.client, self.folder, self.tag, self.log = client, folder, tag, log
        self.sync_steps, self.first_step = sync_steps, first_step
        self.loaded: str | None = None  # the rollout adapter the main process loaded last
        self.failed: str | None = None
        self.steps = self.tokens = 0  # rollout steps sampled on the engine, and their answer tokens
        self.seconds = 0.0

    @classmethod
    def for_job(cls, job: dict[str, Any], run_dir: Path, sync_steps: int, first_step: int, log=print) -> EngineSampler | None:
        """The sampler a job asks for (`"rollouts": {"gateway": URL}`), or None: HF `generate`."""
        url = (job.get("rollouts") or {}).get("gateway")
        if not url:
            return None
        tag = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:10]  # the same in every process
        return cls(GatewayClient(url, os.environ.get(TOKEN_ENV), timeout=TIMEOUT_S), run_dir / "rollout-adapters",
                   tag, sync_steps, first_step, log)

    def _fail(self, what: str, e: Exception) -> None:
        self.failed = f"{what}: {e}"
        self.log(f"ppo: rollouts fall back to HF generate for the rest of the run ({self.failed})")

    def adapter_at(self, step: int) -> str:
        synced = self.first_step + (step - self.first_step) // self.sync_steps * self.sync_steps
        return f"rollout-{self.tag}-{synced}"

    def sync(self, model, step: int) -> None:
        """Main process, before a step's rollouts: load the policy as it is now, when it is due."""
        name = self.adapter_at(step)
        if self.failed is not None or name == self.loaded:
            return
        try:
            self._load(model, name, self.folder / name)
        except self.ERRORS as e:
            self._fail(f"loading the policy on the {self.WHERE}", e)
            return
        if self.loaded:  # the engine no longer holds it
            shutil.rmtree(self.folder / self.loaded, ignore_errors=True)
        self.loaded = name

    def sample(self, step: int, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float,
               min_new_tokens: int = 0) -> list[dict[str, Any]] | None:
        """One answer per prompt: [{"token_ids", "finish_reason", "logprobs"}], or None once the engine failed."""
        if self.failed is not None:
            return None
        started = time.perf_counter()
        try:
            completions = self._sample(step, prompt_ids, max_new_tokens, temperature, min_new_tokens)
        except self.ERRORS as e:
            self._fail(f"sampling on the {self.WHERE}", e)
            return None
        self.seconds += time.perf_counter() - started
        self.steps += 1
        self.tokens += sum(len(c["token_ids"]) for c in completions)
        return completions

    def _load(self, model, name: str, folder: Path) -> None:
        """Save the adapter and load it on every ready replica (the gateway unloads the older one)."""
        model.save_pretrained(folder)
        self.client.call("POST", "/api/rollouts/adapters", json={"name": name, "path": str(folder.resolve())})

    def _sample(self, step: int, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float,
                min_new_tokens: int) -> list[dict[str, Any]]:
        return self.client.call("POST", "/api/rollouts", json={
            "adapter": self.adapter_at(step), "prompts": prompt_ids, "max_tokens": max_new_tokens,
            "min_tokens": min_new_tokens, "temperature": temperature})["completions"]

    def close(self) -> None:
        """Unload the last rollout adapter and remove the saved ones (main process)."""
        if self.loaded:
            try:
                self.client.call("DELETE", f"/api/rollouts/adapters/{self.loaded}")
            except GatewayError as e:
                self.log(f"ppo: could not unload the rollout adapter {self.loaded}: {e}")
        shutil.rmtree(self.folder, ignore_errors=True)

    def state(self) -> tuple[int, int, float, str | None]:
        """What `summary` needs from this process: (steps, tokens, seconds, failure)."""
        return self.steps, self.tokens, self.seconds, self.failed


def summary(states: list[tuple[int, int, float, str | None]], where: str = "engine") -> dict[str, Any]:
    """A run's rollout numbers from its processes' `EngineSampler.state()`s: the steps every process
    sampled on the engine (the fewest), the answer tokens of all, tokens per second (all of them over
    the slowest process's seconds: the processes sample at once), the first failure of any process
    (it fell back to `generate` from there, and `rollouts_on` says so). `where`: the sampler's WHERE."""
    seconds = max(s[2] for s in states)
    tokens = sum(s[1] for s in states)
    failed = next((s[3] for s in states if s[3] is not None), None)
    return {"rollouts_on": where if failed is None else f"{where}, then hf-generate",
            "rollout_engine_steps": min(s[0] for s in states), "rollout_engine_tokens": tokens,
            "rollout_engine_tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "rollout_fallback": failed}
