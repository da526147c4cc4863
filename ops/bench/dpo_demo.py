"""Offline DPO experiment on the demo model: does one cycle raise the demo judge's win rate?

It reproduces one retrain cycle without serving: the same model answers each of N train prompts
twice (the first answer with a client's temperature, the second with temperature 1.0, as the
gateway's pair maker does), the demo judge labels each pair (ties are left out), about 10% of the
pairs are held out by a hash of their id, and `loop.training.dpo.run` trains on the rest (the code
`python -m loop.training.child` runs). Then base and trained model each answer every held-out prompt
`--eval-samples` times at the gate's temperature (1.0), and the judge compares them prompt by prompt.

Reported per run: pairs used, train time, held-out preference accuracy, KL to the base, the judge's
win rate of trained over base (ties count half), the share of good answers before and after, and
the ceiling: the win rate of a model whose every answer is good, 1 - good_base / 2 (it can only tie
a good base answer).

    .venv/bin/python ops/bench/dpo_demo.py [--model DIR] [--pairs 500] [--seeds 0,1,2] \
        [--set learning_rate=1e-3 --set beta=0.1 ...] [--jsonl results.jsonl]

With no --model it uses the demo model under ./alignloop-data/models/demo (building it if needed).
`--set` changes a [train] field (loop.config.TrainConfig); everything else is the TrainConfig default.
Results and the commands that produced them: ops/bench/results/dpo_demo.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from loop.config import GateConfig, TrainConfig, _parse_override  # noqa: E402
from loop.demo import corpus as demo_corpus  # noqa: E402
from loop.demo import judge
from loop.demo import model as demo_model


def make_pairs(model_dir: Path, n: int, client_temperature: float, seed: int, heldout_share: float = 0.1):
    """n pairs on train prompts, judged; ties dropped. Returns (train, heldout, stats)."""
    pool = demo_corpus.prompts("train")
    prompts = [pool[(i + seed * 97) % len(pool)] for i in range(n)]
    first = demo_model.sample(model_dir, prompts, temperature=client_temperature, seed=2 * seed)
    second = demo_model.sample(model_dir, prompts, temperature=1.0, seed=2 * seed + 1)
    train, heldout, ties = [], [], 0
    for i, (p, a, b) in enumerate(zip(prompts, first, second)):
        verdict = judge.prefer(p, a, b)
        if verdict == "tie":
            ties += 1
            continue
        chosen, rejected = (a, b) if verdict == "a" else (b, a)
        row = {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}]}
        bucket = int(hashlib.sha256(f"split:{seed}:{i}".encode()).hexdigest()[:8], 16) / 0x1_0000_0000
        (heldout if bucket < heldout_share else train).append(row)
    return train, heldout, {"sampled": n, "ties": ties}


def sample_model(model, tok, prompts: list[str], temperature: float, seed: int, max_new_tokens: int = 64) -> list[str]:
    """One answer per single-turn prompt from a loaded (PEFT) model (`loop.evaluation.compare.sample`)."""
    from loop.evaluation.compare import sample

    return sample(model, tok, [[{"role": "user", "content": p}] for p in prompts], temperature, max_new_tokens, seed)


def judge_trained(model, tok, samples_per_prompt: int, temperature: float, seed: int) -> dict[str, Any]:
    """Base (adapter disabled) vs trained on every held-out prompt, judged pairwise."""
    prompts = demo_corpus.prompts("heldout") * samples_per_prompt
    model.eval()
    trained = sample_model(model, tok, prompts, temperature, seed=10_000 + seed)
    with model.disable_adapter():
        base = sample_model(model, tok, prompts, temperature, seed=20_000 + seed)
    verdicts = [judge.prefer(p, t, b) for p, t, b in zip(prompts, trained, base)]
    n = len(prompts)
    return {
        "eval_n": n,
        "win_rate": (verdicts.count("a") + 0.5 * verdicts.count("tie")) / n,
        "good_base": sum(judge.is_good(p, r) for p, r in zip(prompts, base)) / n,
        "good_trained": sum(judge.is_good(p, r) for p, r in zip(prompts, trained)) / n,
        "examples": [{"prompt": p, "trained": t, "base": b} for p, t, b in list(zip(prompts, trained, base))[:3]],
        "not_good": [{"prompt": p, "trained": t} for p, t in zip(prompts, trained) if not judge.is_good(p, t)][:5],
    }


def one_run(model_dir: Path, cfg: TrainConfig, pairs: int, client_temperature: float, eval_samples: int,
            eval_temperature: float, seed: int) -> dict[str, Any]:
    from loop.training import dpo

    cfg = dataclasses.replace(cfg, seed=seed)
    t0 = time.perf_counter()
    train, heldout, stats = make_pairs(model_dir, pairs, client_temperature, seed)
    label_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="dpo-demo-") as work:
        metrics, policy = dpo.run(train, heldout, model_dir, None, cfg, work_dir=work)
    tok = demo_model.load(model_dir)[1]
    judged = judge_trained(policy, tok, eval_samples, eval_temperature, seed)
    return {"seed": seed, "config": dataclasses.asdict(cfg), "client_temperature": client_temperature,
            "eval_temperature": eval_temperature, **stats, "sample_label_s": round(label_s, 1),
            **{k: metrics.get(k) for k in ("train_pairs", "heldout_pairs", "train_seconds", "steps", "kl_to_base",
                                          "eval_rewards/accuracies", "eval_loss")}, **judged}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="demo model directory")
    ap.add_argument("--pairs", type=int, default=500, help="pairs sampled and judged (ties are then dropped)")
    ap.add_argument("--client-temperature", type=float, default=1.0,
                    help="temperature of each pair's first answer (the simulated clients use 1.0)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (pairs, training and evaluation)")
    ap.add_argument("--eval-samples", type=int, default=2, help="answers per held-out prompt and model")
    ap.add_argument("--eval-temperature", type=float, default=GateConfig().temperature,
                    help="sampling temperature when judging (default: the gate's, [gate] temperature)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a [train] field")
    ap.add_argument("--jsonl", type=Path, default=None, help="append one JSON line per run here")
    ap.add_argument("--show", action="store_true", help="print a few judged answers")
    args = ap.parse_args(argv)

    overrides = {}
    for item in args.set:
        _, key, value = _parse_override(f"train.{item}")
        overrides[key] = value
    cfg = TrainConfig(**overrides)
    model_dir = args.model or demo_model.ensure_demo_model(REPO / "alignloop-data" / "models" / "demo")
    print(f"# {platform.node()} python {platform.python_version()}; model {model_dir}; [train] {overrides}",
          file=sys.stderr)
    print("| seed | pairs (train/heldout/ties) | train s | steps | eval acc | KL | good base | good trained | win rate "
          "| ceiling |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for seed in [int(s) for s in args.seeds.split(",")]:
        r = one_run(Path(model_dir), cfg, args.pairs, args.client_temperature, args.eval_samples,
                    args.eval_temperature, seed)
        acc = r["eval_rewards/accuracies"]
        print(f"| {seed} | {r['train_pairs']}/{r['heldout_pairs']}/{r['ties']} | {r['train_seconds']:.0f} | "
              f"{r['steps']} | {acc if acc is None else f'{acc:.2f}'} | {r['kl_to_base']} | {r['good_base']:.2f} | "
              f"{r['good_trained']:.2f} | **{r['win_rate']:.3f}** | {1 - r['good_base'] / 2:.3f} |", flush=True)
        if args.show:
            for ex in r["examples"]:
                print(f"  {ex['prompt']!r}\n    trained: {ex['trained']!r}\n    base:    {ex['base']!r}",
                      file=sys.stderr)
            for ex in r["not_good"]:
                print(f"  not good: {ex['prompt']!r} -> {ex['trained']!r}", file=sys.stderr)
        if args.jsonl:
            with args.jsonl.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"overrides": overrides, **r}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
