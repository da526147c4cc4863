"""Labeller reliability on the demo model: does weighting votes by estimated accuracy beat a majority?

Per seed:

1. a snapshot sampled from the demo model and labelled by the demo rule, the truth
   (`compare.demo_snapshot`);
2. six simulated labellers vote on every training pair, `--overlap` of them each, drawn at random:
   three follow the rule, two flip 30% of their answers, one always picks the worse reply;
3. `loop.evaluation.reliability.estimate` ranks the labellers from their agreement alone (the AUC:
   the share of (good, bad) labeller pairs in which the good one is ranked higher);
4. the same votes become training labels twice: by majority (`store.export.majority`; a split vote
   drops the pair) and weighted by the estimated accuracies (`store.export.weighted`);
5. DPO trains on each, in the trainer child as a retrain does, and the demo rule (the simulated
   people, never the thing trained on) grades each candidate against the base on the held-out
   prompts (`loop.evaluation.compare.trial`).

    .venv/bin/python ops/bench/reliability.py [--model DIR] [--seeds 0,1,2] [--pairs 400] [--overlap 2]

Results and the command that made them: ops/bench/results/reliability.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "ops" / "bench"))

from compare import demo_snapshot, write_snapshot_like  # noqa: E402

from loop.config import load  # noqa: E402
from loop.evaluation.compare import grader, trial  # noqa: E402
from loop.evaluation.gate import heldout_prompts  # noqa: E402
from loop.evaluation.reliability import estimate  # noqa: E402
from store.export import majority, weighted  # noqa: E402

# P(picks the better reply): three careful labellers, two who flip 30% of their answers, one always wrong
LABELLERS = {"good-1": 1.0, "good-2": 1.0, "good-3": 1.0, "flips-1": 0.7, "flips-2": 0.7, "wrong": 0.0}
GOOD, BAD = ("good-1", "good-2", "good-3"), ("flips-1", "flips-2", "wrong")


def votes_for(pairs: list[dict], overlap: int, seed: int) -> list[tuple[int, str, str]]:
    """(pair index, labeller, 'a' or 'b') with reply a the chosen (better) one of each pair."""
    rng = random.Random(f"votes:{seed}")
    out = []
    for i in range(len(pairs)):
        for name in rng.sample(sorted(LABELLERS), overlap):
            out.append((i, name, "a" if rng.random() < LABELLERS[name] else "b"))
    return out


def auc(accuracy: dict[str, float]) -> float:
    return sum(accuracy[g] > accuracy[b] for g in GOOD for b in BAD) / (len(GOOD) * len(BAD))


def relabelled(pairs: list[dict], votes: list[tuple[int, str, str]], decide) -> tuple[list[dict], float]:
    """The training pairs as `decide` labels them from the votes (None: dropped), and the share of
    the kept ones whose label is the truth."""
    by_pair: dict[int, list[tuple[str, str]]] = {}
    for i, name, choice in votes:
        by_pair.setdefault(i, []).append((name, choice))
    out, right = [], 0
    for i, p in enumerate(pairs):
        winner = decide(by_pair.get(i, []))
        if winner is None:
            continue
        right += winner == "a"
        out.append(p if winner == "a" else {**p, "chosen": p["rejected"], "rejected": p["chosen"]})
    return out, right / max(len(out), 1)


def run_seed(cfg, model_dir: Path, work: Path, seed: int, pairs: int, overlap: int, log) -> dict:
    import pyarrow.parquet as pq

    snapshot = demo_snapshot(model_dir, work / "truth", pairs, seed=seed)
    rows = pq.read_table(snapshot / "pairs.parquet").to_pylist()
    train = [r for r in rows if r["split"] == "train"]
    heldout = [r for r in rows if r["split"] == "heldout"]
    votes = votes_for(train, overlap, seed)
    people, _ = estimate([(i, name, c) for i, name, c in votes])
    accuracy = {name: r.accuracy for name, r in people.items()}
    result = {"seed": seed, "train_pairs": len(train), "votes": len(votes), "auc": auc(accuracy),
              "accuracy": accuracy}
    deciders = {
        "majority": lambda vs: majority(sum(c == "a" for _, c in vs), sum(c == "b" for _, c in vs), 0, 0),
        "reliability": lambda vs: weighted([n for n, _ in vs], [c for _, c in vs], accuracy),
    }
    eval_prompts = heldout_prompts(snapshot, cfg.gate.eval_prompts)
    for name, decide in deciders.items():
        labelled, label_accuracy = relabelled(train, votes, decide)
        snap = work / name
        write_snapshot_like(snapshot, snap, labelled + heldout)
        row = trial(cfg, snap, "dpo", seed, work / f"{name}-runs", eval_prompts, 2, grader(cfg), log)
        result[name] = {"pairs": len(labelled), "label_accuracy": label_accuracy,
                        "win_rate": row.get("win_rate"), "error": row.get("error")}
        log(f"reliability: seed {seed}: {name}: {len(labelled)} pairs, {label_accuracy:.3f} right, "
            f"win rate {row.get('win_rate')}")
    return result


def report(results: list[dict], args) -> str:
    lines = ["# Labeller reliability: weighted labels against a majority", "",
             f"Command: `.venv/bin/python ops/bench/reliability.py --seeds {args.seeds} --pairs {args.pairs} "
             f"--overlap {args.overlap}`  ",
             "Six simulated labellers (three follow the demo rule, two flip 30% of their answers, one always picks "
             f"the worse reply), {args.overlap} of them on each training pair. Reliability is estimated from their "
             "agreement alone (`loop.evaluation.reliability`); DPO trains on the labels each aggregate makes of the "
             "same votes, and the demo rule (the truth, which neither saw) grades each candidate against the base "
             "on the held-out prompts, 2 answers each.", "",
             "| seed | AUC (bad below good) | estimated accuracy | majority: pairs kept, labels right, win rate | "
             "reliability: pairs kept, labels right, win rate |", "|---:|---:|---|---|---|"]
    for r in results:
        acc = ", ".join(f"{n} {r['accuracy'][n]:.2f}" for n in LABELLERS if n in r["accuracy"])
        cells = []
        for name in ("majority", "reliability"):
            x = r[name]
            win = "failed" if x["win_rate"] is None else f"**{x['win_rate']:.3f}**"
            cells.append(f"{x['pairs']}, {x['label_accuracy']:.3f}, {win}")
        lines.append(f"| {r['seed']} | {r['auc']:.2f} | {acc} | {cells[0]} | {cells[1]} |")
    wins = {name: [r[name]["win_rate"] for r in results if r[name]["win_rate"] is not None]
            for name in ("majority", "reliability")}
    if all(wins.values()):
        lines += ["", f"Mean win rate over the base: majority {statistics.mean(wins['majority']):.3f}, "
                      f"reliability {statistics.mean(wins['reliability']):.3f}; reliability ahead in "
                      f"{sum(r['reliability']['win_rate'] > r['majority']['win_rate'] for r in results)} of "
                      f"{len(results)} seeds. Goal (issue 10): AUC ≥ 0.95, and the candidate trained on weighted "
                      "labels judged better than one trained on majority votes."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model directory (default: the demo model)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--pairs", type=int, default=400, help="pairs sampled per seed (ties are dropped)")
    ap.add_argument("--overlap", type=int, default=2, help="labellers voting on each pair")
    ap.add_argument("--out", type=Path, default=REPO / "ops/bench/results/reliability.md")
    args = ap.parse_args(argv)
    from loop.demo import model as demo_model

    model_dir = args.model or demo_model.ensure_demo_model(REPO / "alignloop-data" / "models" / "demo")
    cfg = load(None, [f"model.base={Path(model_dir).resolve()}"], missing_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            results.append(run_seed(cfg, Path(model_dir), Path(tmp) / f"seed{seed}", seed, args.pairs,
                                    args.overlap, log=print))
    text = report(results, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
