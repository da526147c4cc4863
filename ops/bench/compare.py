"""DPO vs RLHF (reward model + PPO) on the demo model: the benchmark behind the README's table.

It builds one labelled snapshot offline, the way the loop would: the demo model answers N train
prompts twice (temperatures 1.0 and 1.0, like simulated clients and the pair maker), the demo
judge labels each pair (ties dropped; ~10% held out by a hash of the id), every train prompt of the
demo corpus stands for live traffic (PPO's rollouts; no labels needed), and the judge's verdict on
single answers gives thumbs up/down (KTO's data). Then `loop.evaluation.compare.compare` trains each method
with each seed on that snapshot, in a child process as a retrain does, and judges the candidates
against the base on the held-out prompts.

    .venv/bin/python ops/bench/compare.py [--model DIR] [--pairs 400] [--methods dpo,ppo] \
        [--seeds 0,1,2] [--samples 2] [--out DIR] [--set ppo.kl_coef=0.3 ...]

With no --model it uses the demo model under ./alignloop-data/models/demo (building it if needed).
`--set` changes any config field (`section.field=value`); the rest are the defaults. Results and
the commands that made them: ops/bench/results/compare.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "ops" / "bench"))

from dpo_demo import make_pairs  # noqa: E402

from loop.config import Config, load  # noqa: E402
from loop.demo import corpus as demo_corpus  # noqa: E402
from loop.demo import judge
from loop.demo import model as demo_model
from loop.evaluation.compare import compare, sample  # noqa: E402
from store.export import Manifest, content_hash, write_rows  # noqa: E402


def demo_snapshot(model_dir: Path, out: Path, pairs: int, seed: int = 0, feedback: int = 400) -> Path:
    """pairs.parquet, prompts.parquet, feedback.parquet and manifest.json, as `alignloop retrain` reads them."""
    train, heldout, stats = make_pairs(model_dir, pairs, 1.0, seed)
    rows = [{"id": i, **r, "split": split, "source": "bench"}
            for i, (r, split) in enumerate([(r, "train") for r in train] + [(r, "heldout") for r in heldout])]
    prompts = [{"id": i, "prompt": [{"role": "user", "content": p}], "source": "live"}
               for i, p in enumerate(demo_corpus.prompts("train"))]
    asked = [demo_corpus.prompts("train")[i % len(prompts)] for i in range(feedback)]
    answers = demo_model.sample(model_dir, asked, temperature=1.0, seed=1000 + seed)
    thumbs = [{"id": i, "prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": a}],
               "label": judge.is_good(p, a), "kind": "thumbs", "value": float(judge.is_good(p, a))}
              for i, (p, a) in enumerate(zip(asked, answers))]
    manifest = Manifest(cutoff="bench", heldout_share=0.1)
    for kind, data in (("pairs", rows), ("prompts", prompts), ("feedback", thumbs)):
        write_rows(data, out / f"{kind}.parquet", "parquet")
        manifest.counts[kind] = len(data)
        manifest.files[kind] = f"{kind}.parquet"
        manifest.content_hash[kind] = content_hash(data)
    manifest.counts["heldout"] = len(heldout)
    manifest.skipped["ties"] = stats["ties"]
    manifest.write(out / "manifest.json")
    return out


def policy_pairs(cfg: Config, adapter: str, n: int, seed: int, first_id: int) -> list[dict]:
    """n pairs sampled from a trained policy (base + adapter) on train prompts, labelled by the
    judge (ties dropped), split as the store splits them: the next night's labels."""
    from peft import PeftModel

    from loop.training.toolkit import load_policy
    from store.export import split_of

    base, tok = load_policy(cfg.base_model_dir, None)
    model = PeftModel.from_pretrained(base, adapter).eval()
    pool = demo_corpus.prompts("train")
    asked = [[{"role": "user", "content": pool[(i * 7 + seed) % len(pool)]}] for i in range(n)]
    first = sample(model, tok, asked, 1.0, 64, seed=3 * seed + 1)
    second = sample(model, tok, asked, 1.0, 64, seed=3 * seed + 2)
    rows = []
    for p, a, b in zip(asked, first, second):
        verdict = judge.prefer(p[0]["content"], a, b)
        if verdict == "tie":
            continue
        chosen, rejected = (a, b) if verdict == "a" else (b, a)
        uid = first_id + len(rows)
        rows.append({"id": uid, "prompt": p, "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}],
                     "split": split_of(str(uid), 0.1), "source": "bench:round2"})
    return rows


def second_round(cfg: Config, first: dict, snapshot: Path, out: Path, pairs: int, samples: int, log) -> str:
    """Each method's round-1 policy answers new prompts, the judge labels them, the method retrains
    from its own adapter on all labels so far (PPO: the reward model refreshed on them)."""
    import pyarrow.parquet as pq

    from loop.evaluation.compare import grader, markdown, summarise, trial
    from loop.evaluation.gate import heldout_prompts

    old = pq.read_table(snapshot / "pairs.parquet").to_pylist()
    eval_prompts = heldout_prompts(snapshot, cfg.gate.eval_prompts)
    rows = []
    for r in first["rows"]:
        if "error" in r:
            continue
        snap = out / "round2" / f"snapshot-{r['method']}-seed{r['seed']}"
        new = policy_pairs(cfg, r["adapter"], pairs, r["seed"], first_id=len(old))
        new = [x for x in new if x["split"] == "train"]  # the held-out prompts stay those of round 1
        write_snapshot_like(snapshot, snap, old + new)
        log(f"round 2: {r['method']} seed {r['seed']}: {len(new)} new training pairs from its own answers")
        rows.append(trial(cfg, snap, r["method"], r["seed"], out / "round2", eval_prompts, samples,
                          grader(cfg), log, init_adapter=r["adapter"]))
    return markdown(summarise(rows))


def write_snapshot_like(template: Path, out: Path, pairs: list[dict]) -> None:
    """A copy of the snapshot `template` with these pairs."""
    import json
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for name in ("prompts.parquet", "feedback.parquet"):
        shutil.copy(template / name, out / name)
    write_rows(pairs, out / "pairs.parquet", "parquet")
    manifest = json.loads((template / "manifest.json").read_text())
    manifest["counts"]["pairs"] = len(pairs)
    manifest["content_hash"]["pairs"] = content_hash(pairs)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="demo model directory")
    ap.add_argument("--pairs", type=int, default=400, help="pairs sampled and judged (ties are then dropped)")
    ap.add_argument("--methods", default="dpo,ppo")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samples", type=int, default=2, help="answers per held-out prompt when judging")
    ap.add_argument("--out", type=Path, default=REPO / "alignloop-data" / "bench-compare")
    ap.add_argument("--snapshot", type=Path, default=None, help="reuse a snapshot this script made before")
    ap.add_argument("--round2-pairs", type=int, default=0,
                    help="then a second night: each policy's answers to this many prompts are labelled and "
                         "each method retrains from its own adapter on all labels (0: no second round)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = ap.parse_args(argv)

    model_dir = args.model or demo_model.ensure_demo_model(REPO / "alignloop-data" / "models" / "demo")
    cfg: Config = load(None, [*args.set, f"model.base={Path(model_dir).resolve()}"], missing_ok=True)
    print(f"# {platform.node()} python {platform.python_version()}; model {model_dir}; overrides {args.set}",
          file=sys.stderr)
    snapshot = args.snapshot or demo_snapshot(Path(model_dir), args.out / "snapshot", args.pairs)
    (args.out / "trials.jsonl").unlink(missing_ok=True)
    result = compare(cfg, snapshot, args.out, [m.strip() for m in args.methods.split(",")],
                     [int(s) for s in args.seeds.split(",")], samples=args.samples,
                     log=lambda m: print(m, file=sys.stderr, flush=True))
    print((args.out / "report.md").read_text())
    print(f"plot: {result['plot']}", file=sys.stderr)
    if args.round2_pairs:
        table = second_round(cfg, result, snapshot, args.out, args.round2_pairs, args.samples,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
        (args.out / "round2" / "report.md").write_text(table)
        print("Second round (each method from its own round-1 adapter, on all labels so far):\n")
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
