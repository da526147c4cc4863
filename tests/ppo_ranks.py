"""PPO on the toy reward of tests/test_ppo.py in however many processes it is launched in (run by
tests/test_ppo.py under `accelerate launch`): every rank saves the weights it ends with, rank 0 the
metrics, so the test can check that the processes stayed in step and compare with one process.

    accelerate launch --multi_gpu --num_processes 2 tests/ppo_ranks.py MODEL OUT_DIR [STEPS [SEED]]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(model: str, out: Path, steps: int, seed: int) -> None:
    import torch

    from loop.config import PPOConfig, TrainConfig
    from loop.training import ppo
    from tests.test_ppo import PROMPTS, ShareOfE

    world, rank = ppo.processes()
    cfg = PPOConfig(steps=steps, rollout_batch=32, minibatch=8, max_new_tokens=16, learning_rate=1e-2,
                    kl_coef=0.05, missing_eos_penalty=0.0)
    metrics, policy = ppo.run(PROMPTS, ShareOfE(), model, None, cfg, TrainConfig(seed=seed),
                              metrics_path=out / "metrics.jsonl", log=lambda m: None)
    weights = {k: v.detach().clone() for k, v in policy.named_parameters() if v.requires_grad}
    torch.save(weights, out / f"weights-{rank}.pt")
    if rank == 0:
        (out / "result.json").write_text(json.dumps({"world": world, **metrics}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), *(int(a) for a in (sys.argv[3:] + ['48', '0'][len(sys.argv) - 3:])))
