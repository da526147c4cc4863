"""Active learning against random order: how well does the reward model learn from the labels each
order picks?

Per seed, on the demo model (no engine: the pairs are sampled with `transformers.generate`):

1. `--pool` pairs sampled from the demo model on train prompts (two answers at temperature 1),
   labelled by the demo rule (the simulated people); a quarter of them held out (ties left out of
   those), the rest the queue. Ties stay in the queue: a label on one costs a label and teaches the
   reward model nothing, as in the real queue;
2. `--start` labels drawn at random from the queue; then rounds of `--step` more labels, picked either
   at random (the baseline, `labeling.order = "random"`) or by active learning
   (`loop.evaluation.active.rank` on the margins of the reward model fitted on the labels so far,
   with novelty counting the labelled pairs of each prompt: what `alignloop rank` does);
3. after each round, the reward model is fitted on the labels so far (`loop.training.reward.train`,
   the [reward] defaults, as the gate's is) and its accuracy measured on the held-out pairs against
   the demo rule, which nothing here was fitted or ranked on.

It measures the reward model (the gate's judge, and PPO's reward), not the policy DPO trains: that
takes the continual run (`ops/bench/continual.py`), hours a seed on 2 cores.

    .venv/bin/python ops/bench/active.py [--model DIR] [--seeds 0,1,2] [--pool 800] [--start 40] [--step 40] [--rounds 5]

Results and the command that made them: ops/bench/results/active.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "ops" / "bench"))

from loop.config import load  # noqa: E402
from loop.evaluation.active import Candidate, rank  # noqa: E402


ENSEMBLE = {"margin": 1, "ensemble": 3}  # reward models behind each active order


def key(pair: dict) -> str:
    return json.dumps(pair["prompt"])


def sampled_pairs(model_dir: Path, n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(queue, held out): pairs with "prompt", "chosen", "rejected" (reply a and b when the rule
    calls a tie) and "tie"; the held-out ones without ties."""
    from loop.demo import corpus as demo_corpus
    from loop.demo import judge
    from loop.demo import model as demo_model

    pool = demo_corpus.prompts("train")
    prompts = [pool[(i * 7 + seed * 97) % len(pool)] for i in range(n)]
    first = demo_model.sample(model_dir, prompts, temperature=1.0, seed=2 * seed)
    second = demo_model.sample(model_dir, prompts, temperature=1.0, seed=2 * seed + 1)
    queue, heldout = [], []
    for i, (p, a, b) in enumerate(zip(prompts, first, second)):
        verdict = judge.prefer(p, a, b)
        chosen, rejected = (b, a) if verdict == "b" else (a, b)
        row = {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}], "tie": verdict == "tie"}
        if random.Random(f"split:{seed}:{i}").random() < 0.25:
            if verdict != "tie":
                heldout.append(row)
        else:
            queue.append(row)
    return queue, heldout


def fit(labelled: list[dict], heldout: list[dict], model_dir: Path, out: Path, cfg, seed: int = 0) -> tuple[float, Path]:
    """The reward model on the labels so far (a tie label gives no training pair)."""
    from loop.training import reward

    pairs = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in labelled if not p["tie"]]
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's log lines
        metrics = reward.train(pairs, heldout, model_dir, out, cfg.reward, dataclasses.replace(cfg.train, seed=seed),
                               out.parent / "tmp")
    return metrics["accuracy"], out


def margins(rm_dir: Path, pool: list[dict]) -> list[float]:
    """Reward of the chosen reply minus the rejected one's. Only |margin| and the members' spread
    enter a score, so the ranking never learns which reply the people chose."""
    from loop.training.reward import RewardModel

    scorer = RewardModel.load(rm_dir)
    prompts = [p["prompt"] for p in pool]
    chosen = scorer.score(prompts, [p["chosen"][-1]["content"] for p in pool]).tolist()
    rejected = scorer.score(prompts, [p["rejected"][-1]["content"] for p in pool]).tolist()
    return [c - r for c, r in zip(chosen, rejected)]


def pick_active(pool: list[dict], labelled: list[dict], members: list[Path], n: int) -> list[int]:
    """Indices into `pool` of the `n` pairs active learning hands out first (one reward model, or
    an ensemble: the first is the one fitted on every label)."""
    each = [margins(m, pool) for m in members]
    ranked = rank([Candidate(i, key(p), each[0][i], others=tuple(e[i] for e in each[1:])) for i, p in enumerate(pool)],
                  Counter(key(p) for p in labelled))
    return [s.pair_id for s in ranked[:n]]


def run(model_dir: Path, seed: int, start: int, step: int, rounds: int, order: str,
        pool: list[dict], heldout: list[dict], cfg) -> list[tuple[int, float, int]]:
    rng = random.Random(f"active:{seed}")
    waiting = list(pool)
    rng.shuffle(waiting)
    labelled, waiting = waiting[:start], waiting[start:]
    curve = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds + 1):
            accuracy, rm_dir = fit(labelled, heldout, model_dir, Path(tmp) / f"rm-{r}", cfg)
            curve.append((len(labelled), accuracy, sum(p["tie"] for p in labelled)))
            print(f"seed {seed} {order}: {len(labelled)} labels ({sum(p['tie'] for p in labelled)} ties), held-out "
                  f"accuracy {accuracy:.3f}", file=sys.stderr, flush=True)
            if len(curve) > rounds or not waiting:
                break
            if order == "random":
                chosen = list(range(min(step, len(waiting))))
            else:  # the ensemble's other members: fitted on resamples of the labels, with other seeds
                members = [rm_dir] + [fit([rng.choice(labelled) for _ in labelled], heldout, model_dir,
                                          Path(tmp) / f"rm-{r}-{k}", cfg, seed=k)[1]
                                      for k in range(1, ENSEMBLE[order])]
                chosen = pick_active(waiting, labelled, members, step)
            taken = set(chosen)
            labelled += [waiting[i] for i in chosen]
            waiting = [p for i, p in enumerate(waiting) if i not in taken]
    return curve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "alignloop-data" / "models" / "demo"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--pool", type=int, default=800, help="pairs sampled (a quarter held out)")
    parser.add_argument("--start", type=int, default=40)
    parser.add_argument("--step", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--orders", default="random,margin,ensemble",
                        help="random; margin (one reward model); ensemble (3, BALD)")
    args = parser.parse_args()
    from loop.demo.model import ensure_demo_model

    model_dir = ensure_demo_model(args.model)
    cfg = load(None, [])
    curves: dict[str, list[list[tuple[int, float, int]]]] = {order: [] for order in args.orders.split(",")}
    for seed in (int(s) for s in args.seeds.split(",")):
        pool, heldout = sampled_pairs(model_dir, args.pool, seed)
        print(f"seed {seed}: {len(pool)} pairs in the queue ({sum(p['tie'] for p in pool)} ties), "
              f"{len(heldout)} held out", file=sys.stderr, flush=True)
        for order in curves:
            curves[order].append(run(model_dir, seed, args.start, args.step, args.rounds, order, pool,
                                     heldout, cfg))
    print("| labels | " + " | ".join(f"{o}: held-out accuracy, mean [per seed] | ties labelled" for o in curves) + " |")
    print("| --- |" + " --- | --- |" * len(curves))
    for i, (labels, *_) in enumerate(next(iter(curves.values()))[0]):
        cells = []
        for order in curves:
            rows = [c[i] for c in curves[order] if i < len(c)]
            cells.append(f"{statistics.mean(r[1] for r in rows):.3f} [{', '.join(f'{r[1]:.3f}' for r in rows)}] | "
                         f"{statistics.mean(r[2] for r in rows):.0f}")
        print(f"| {labels} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
