"""Whether a training run fits on its GPUs beside the engine: checked before the engine starts
(`alignloop up`) and before every trainer child (the retrain cycle), so that a run which cannot fit
is refused with the numbers instead of dying out of memory halfway.

On a GPU that the engine also uses, the engine takes `engine.gpu_memory_share` of it (vLLM's
--gpu-memory-utilization) and the trainer gets the rest; on a GPU of its own (`train.devices`
apart from `engine.devices`) the trainer gets all of it. What a run needs is a lower bound: the
weights its largest stage holds at once, in fp32 as the trainers load them (`toolkit.load_policy`,
`reward.load_classifier`), counted from the safetensors headers without loading anything, plus the
gradients and Adam moments of every weight when the reward model is trained in full. Activations,
the LoRA weights and the CUDA context come on top, so a run this check passes may still not fit;
one it refuses cannot.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from loop.sections import EngineConfig, RewardConfig, TrainConfig, extra_rewards

GiB = 2**30
FP32 = 4
ADAM_FULL = 3  # gradients + two Adam moments, each the size of the weights (fp32)


class DoesNotFit(RuntimeError):
    """The trainer cannot fit on its GPU beside the engine; the message has the numbers."""


def parameters(model_dir: str | Path) -> int:
    """How many numbers the model's safetensors files hold (a tied embedding counts once, as it is
    stored once), read from their headers only."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors file to count the weights of")
    total = 0
    for f in files:
        with f.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


@dataclass(frozen=True)
class Need:
    """What the largest stage of a run holds at once: (what, bytes) parts."""

    stage: str
    parts: tuple[tuple[str, int], ...]

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.parts)

    def __str__(self) -> str:
        return f"{self.stage}: " + " + ".join(f"{what} {b / GiB:.1f}" for what, b in self.parts) + " GiB"


def need(method: str, params: int, reward: RewardConfig) -> Need:
    """The lower bound of what a run of `method` holds at once on each of its GPUs (every process
    of a data-parallel run holds all of it), for a base of `params` numbers."""
    weights = params * FP32
    reward_fit = Need("reward model fit", (("classifier", weights),) if reward.lora else
                      (("classifier", weights), ("its gradients and Adam moments", ADAM_FULL * weights)))
    stages = [reward_fit]  # the gate's reward model is fitted after every method (one stage at a time)
    if method in ("dpo", "kto"):
        stages.append(Need(method.upper(), (("policy (reference = adapter off)", weights),)))
    else:
        extra = [(f"reward model {Path(d).name}", weights) for d, _ in extra_rewards(reward.extra)]
        stages.append(Need("PPO", (("policy (reference = adapter off)", weights), ("reward model", weights), *extra)))
    return max(stages, key=lambda n: n.bytes)


def trainer_devices(train: TrainConfig) -> list[str]:
    return [d.strip() for d in train.devices.split(",") if d.strip()] or [str(i) for i in range(train.num_processes)]


def engine_devices(engine: EngineConfig) -> set[str]:
    """The GPUs the local replicas use (none: external servers only)."""
    if engine.replicas == 0:
        return set()
    groups = engine.device_groups() or [",".join(str(i) for i in range(engine.tensor_parallel_size))]
    return {d.strip() for g in groups for d in g.split(",") if d.strip()}


def check(method: str, params: int, train: TrainConfig, reward: RewardConfig, engine: EngineConfig,
          totals: dict[str, int], rollout_share: float = 0.0) -> Need:
    """Raise `DoesNotFit` when a run of `method` cannot fit on one of its GPUs (`totals`: each GPU's
    memory in bytes, by the number CUDA_VISIBLE_DEVICES names it with); else return its need.
    `rollout_share`: what a PPO run's own rollout engine takes of the trainer's first GPU."""
    n = need(method, params, reward)
    shared = engine_devices(engine)
    for i, d in enumerate(trainer_devices(train)):
        if d not in totals:
            raise DoesNotFit(f"train.devices names GPU {d}, but this machine has {len(totals)} "
                             f"({', '.join(sorted(totals)) or 'none'})")
        takers = [(engine.gpu_memory_share, "the engine", "engine.gpu_memory_share")] if d in shared else []
        if i == 0 and rollout_share:
            takers.append((rollout_share, "the run's own rollout engine", "ppo.rollout_engine_share"))
        left = totals[d] * (1 - sum(share for share, _, _ in takers))
        if n.bytes > left:
            beside = (f"of which {' and '.join(f'{who} takes {share:.0%} ({key})' for share, who, key in takers)}, "
                      f"leaving {max(left, 0) / GiB:.1f} GiB" if takers else "and nothing else on it")
            lower = " or ".join(key for _, _, key in takers) or "engine.gpu_memory_share"
            raise DoesNotFit(
                f"a {method} run needs at least {n.bytes / GiB:.1f} GiB on GPU {d} ({n}; weights in fp32, "
                f"{params / 1e9:.2f}B parameters), but GPU {d} has {totals[d] / GiB:.1f} GiB {beside}. "
                f"Lower {lower}, give the trainer a GPU of its own (train.devices), or train a smaller model")
    return n


def gpu_totals() -> dict[str, int] | None:
    """Each visible GPU's memory in bytes, or None without CUDA (nothing to check then)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return {str(i): torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())}


def preflight(cfg, methods: list[str]) -> list[Need]:
    """`check` for each method on this machine's GPUs with `cfg` (a `loop.config.Config`); nothing
    on a machine without CUDA, or before the demo model is built (it is tiny)."""
    totals = gpu_totals()
    if totals is None or not Path(cfg.base_model_dir).is_dir():
        return []
    params = parameters(cfg.base_model_dir)
    return [check(m, params, cfg.train, cfg.reward, cfg.engine, totals,
                  cfg.ppo.rollout_engine_share if m == "ppo" and cfg.ppo.rollouts == "dedicated" else 0.0)
            for m in methods]
