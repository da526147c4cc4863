"""What the refreshed reward model learned, criterion by criterion, on the demo domain.

The demo judge rewards two things: staying on the prompt's topic, and being polite. This fits the
reward model exactly as a PPO run does (`loop.training.reward.train`, the `[reward]` defaults or `--set`) on
a snapshot's pairs, then scores probe pairs made from the demo corpus for each held-out prompt:

- topic: two polite replies, one on the prompt's topic, one on another topic;
- politeness: two on-topic replies, one polite, one rude.

Accuracy is the share of probe pairs where the better reply scores higher (0.5: chance).

    .venv/bin/python ops/bench/reward_probe.py --snapshot DIR [--model DIR] [--seeds 0,1] [--set reward.epochs=6]

DIR: a snapshot, e.g. the one `ops/bench/compare.py` writes (`OUT/snapshot`).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from loop.config import RewardConfig, TrainConfig, _parse_override  # noqa: E402
from loop.demo import corpus as demo_corpus  # noqa: E402
from loop.demo import model as demo_model
from loop.training import reward  # noqa: E402
from loop.training.dpo import load_pairs  # noqa: E402


def probe_pairs(seed: int = 0) -> list[tuple[str, str, str, str]]:
    """(prompt, polite on-topic, polite off-topic, rude on-topic) per held-out prompt with a topic."""
    rng = random.Random(seed)
    out = []
    for prompt in demo_corpus.prompts("heldout"):
        topic = demo_corpus.topic_of(prompt)
        if topic is None:
            continue
        out.append((prompt, *(demo_corpus.reply(topic, style, rng)[0] for style in ("polite_on", "polite_off",
                                                                                     "rude_on"))))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=None, help="base model (default: the demo model)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--set", action="append", default=[], metavar="reward.FIELD=VALUE")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.set:
        _, key, value = _parse_override(item)
        overrides[key] = value
    model_dir = args.model or demo_model.ensure_demo_model(REPO / "alignloop-data" / "models" / "demo")
    train, heldout = load_pairs(args.snapshot)
    probe = probe_pairs()
    prompts = [[{"role": "user", "content": p[0]}] for p in probe]
    print("| seed | held-out pairs accuracy | topic accuracy | politeness accuracy | probe pairs |")
    print("| --- | --- | --- | --- | --- |")
    for seed in [int(s) for s in args.seeds.split(",")]:
        with tempfile.TemporaryDirectory(prefix="reward-probe-") as work:
            metrics = reward.train(train, heldout, model_dir, Path(work) / "rm", RewardConfig(**overrides),
                                   TrainConfig(seed=seed), work)
            rm = reward.RewardModel.load(Path(work) / "rm")
            good, off, rude = (rm.score(prompts, [p[i] for p in probe]) for i in (1, 2, 3))
        print(f"| {seed} | {metrics['accuracy']:.3f} | {float((good > off).float().mean()):.3f} | "
              f"{float((good > rude).float().mean()):.3f} | {len(probe)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
