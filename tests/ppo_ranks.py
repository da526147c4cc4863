"""PPO on the toy reward of tests/test_ppo.py in however many processes it is launched in (run by
tests/test_ppo.py and tests/test_serving.py under `accelerate launch`): every rank saves the weights it
ends with, rank 0 the metrics, so the test can check that the processes stayed in step and compare
with one process. With `--gateway URL` (the admin token in ALIGNLOOP_GATEWAY_TOKEN) the rollouts are
sampled on that gateway's engine, as a PPO job of the scheduler's does; with `--dedicated PORT` on an
engine of the run's own on that port (`ppo.rollouts = "dedicated"`).

    accelerate launch --multi_gpu --num_processes 2 tests/ppo_ranks.py MODEL OUT_DIR [--steps 48] [--seed 0]
        [--gateway URL | --dedicated PORT]
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(model: str, out: Path, steps: int, seed: int, gateway: str | None, dedicated: int | None) -> None:
    import torch

    from loop.config import PPOConfig, TrainConfig
    from loop.training import ppo
    from loop.config import EngineConfig
    from loop.training import rollout_engine
    from tests.test_ppo import PROMPTS, ShareOfE

    world, rank = ppo.processes()
    cfg = PPOConfig(steps=steps, rollout_batch=32, minibatch=8, max_new_tokens=16, learning_rate=1e-2,
                    kl_coef=0.05, missing_eos_penalty=0.0)
    rollouts = {"gateway": gateway} if gateway else None
    if dedicated:
        rollouts = {"dedicated": rollout_engine.job_settings(EngineConfig(max_model_len=256), dedicated)}
    job = {"rollouts": rollouts, "base_model": model}
    sampler = partial(rollout_engine.for_job, job, out, 1, log=print) if rollouts else None
    metrics, policy = ppo.run(PROMPTS, ShareOfE(), model, None, cfg, TrainConfig(seed=seed),
                              metrics_path=out / "metrics.jsonl", log=lambda m: None, sampler=sampler)
    weights = {k: v.detach().clone() for k, v in policy.named_parameters() if v.requires_grad}
    torch.save(weights, out / f"weights-{rank}.pt")
    if rank == 0:
        (out / "result.json").write_text(json.dumps({"world": world, **metrics}))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gateway")
    p.add_argument("--dedicated", type=int, metavar="PORT")
    a = p.parse_args()
    main(a.model, a.out, a.steps, a.seed, a.gateway, a.dedicated)
