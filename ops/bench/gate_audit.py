"""An audit of the gate: candidates whose true quality is known, through the real gate, against the truth.

Per seed, on the demo model:

1. a snapshot labelled by the demo rule (the simulated people), as the loop would make it
   (`compare.demo_snapshot`);
2. the gate's judge, as a real deployment has it: the reward model refreshed on those labels
   (`loop.training.child.train_judge`, through the trainer child), trusted only above
   `gate.reward_floor` (`loop.evaluation.judges.choose`);
3. candidates, each trained in the trainer child as a retrain trains them: DPO on the labels (good),
   DPO briefly (weak), a zero-effect adapter (neutral by construction: LoRA B = 0, the base
   itself), DPO on coin-flip labels (random: changed, with no direction), DPO on flipped labels,
   DPO over-trained (10x the learning rate, 4x the epochs), DPO towards empty answers (stops at
   once) and towards answers that ramble to the length limit;
4. each candidate through the real gate (`loop.evaluation.gate.decide` on the judge's verdicts for
   `gate.eval_samples` answers per held-out prompt; answers from HF generate here, from the engine in
   a retrain) against the base;
5. the truth: the demo rule's win rate over the base on the demo corpus's 68 held-out prompts,
   `--truth-samples` answers each with seeds the gate never used; "better" when its two-sided 95%
   interval is above 0.5, "worse" when below, else "neutral".

It prints every candidate and the confusion matrix (truth x decision). The issue's bar: no truly
worse candidate promoted, a neutral one promoted in at most 5% of trials, at least 90% of truly
better ones promoted.

    .venv/bin/python ops/bench/gate_audit.py [--model DIR] [--seeds 0,1,2] [--pairs 400] [--out DIR]
        [--candidates good,weak,neutral,flipped,overtrained,silent,rambling] [--set section.field=value]

Results and the command that made them: ops/bench/results/gate_audit.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "ops" / "bench"))

from compare import demo_snapshot, write_snapshot_like  # noqa: E402

from loop.config import Config, load  # noqa: E402
from loop.demo import corpus as demo_corpus  # noqa: E402
from loop.demo import judge as demo_rule  # noqa: E402
from loop.demo import model as demo_model  # noqa: E402
from loop.evaluation import judges  # noqa: E402
from loop.evaluation.compare import run_trainer, sample  # noqa: E402
from loop.evaluation.gate import POINTS, confidence_bounds, decide, heldout_prompts  # noqa: E402

CANDIDATES = ("good", "weak", "neutral", "random", "flipped", "overtrained", "silent", "rambling")


def reshaped(snapshot: Path, out: Path, how: str) -> Path:
    """A copy of the snapshot whose pairs teach `how`: flipped preferences, coin-flip ones, empty
    answers, or rambling ones."""
    import random

    import pyarrow.parquet as pq

    pairs = pq.read_table(snapshot / "pairs.parquet").to_pylist()
    coin = random.Random(f"{snapshot}:{how}")
    for p in pairs:
        good, bad = p["chosen"], p["rejected"]
        if how == "flipped" or (how == "random" and coin.random() < 0.5):
            p["chosen"], p["rejected"] = bad, good
        elif how == "silent":
            p["chosen"], p["rejected"] = [{"role": "assistant", "content": ""}], good
        elif how == "rambling":
            text = " ".join([bad[-1]["content"], good[-1]["content"]] * 4)
            p["chosen"], p["rejected"] = [{"role": "assistant", "content": text}], good
    write_snapshot_like(snapshot, out, pairs)
    return out


def zero_adapter(cfg: Config, out: Path) -> Path:
    """A LoRA adapter whose B matrices are zero, as PEFT initialises them: exactly the base model."""
    from peft import get_peft_model

    from loop.training import toolkit

    model, _ = toolkit.load_policy(cfg.base_model_dir, None)
    get_peft_model(model, toolkit.lora_config(cfg.train, model)).save_pretrained(out)
    return out


def train(cfg: Config, snapshot: Path, run_dir: Path, train_overrides: dict[str, Any], judge: bool = False) -> dict:
    job = {"method": "dpo", "snapshot": str(snapshot), "base_model": str(cfg.base_model_dir), "init_adapter": None,
           "output_adapter": str(run_dir / "adapter"),
           "train": dataclasses.asdict(dataclasses.replace(cfg.train, num_processes=1, **train_overrides)),
           "reward": dataclasses.asdict(cfg.reward), "ppo": dataclasses.asdict(cfg.ppo),
           "kto": dataclasses.asdict(cfg.kto), "eval_prompts": [], "judge": judge}
    done = run_trainer(job, run_dir, cfg.train.timeout_s)
    if "error" in done:
        raise RuntimeError(f"{run_dir.name}: {done['error']}")
    return done


def answers(cfg: Config, adapter: Path, prompts: list, seeds: list[int]) -> tuple[list[list[str]], list[list[str]]]:
    """Candidate and base answers to every prompt, one list per seed (the same seed for both)."""
    from peft import PeftModel

    from loop.training.toolkit import load_policy

    base, tok = load_policy(cfg.base_model_dir, None)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    g = cfg.gate
    cand = [sample(model, tok, prompts, g.temperature, g.max_tokens, seed=s) for s in seeds]
    with model.disable_adapter():
        serv = [sample(model, tok, prompts, g.temperature, g.max_tokens, seed=s) for s in seeds]
    return cand, serv


def truth(cfg: Config, adapter: Path, samples: int, seed: int) -> dict[str, Any]:
    """The demo rule's win rate over the base on the demo corpus's held-out prompts, per prompt, and its class."""
    prompts = [[{"role": "user", "content": p}] for p in demo_corpus.prompts("heldout")]
    cand, serv = answers(cfg, adapter, prompts, [50_000 + 100 * seed + k for k in range(samples)])
    grader = demo_rule.Grader()
    verdicts = [grader.verdicts(prompts, c, s) for c, s in zip(cand, serv)]
    scores = [sum(POINTS[v] for v in per) / len(per) for per in zip(*verdicts)]
    mean, lower, upper = confidence_bounds(scores, 0.025)
    kind = "better" if lower > 0.5 else "worse" if upper < 0.5 else "neutral"
    return {"truth": kind, "true_win_rate": mean, "true_lower": lower, "true_upper": upper}


def audit_seed(cfg: Config, model_dir: Path, out: Path, seed: int, pairs: int, names: list[str],
               truth_samples: int, log) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    snapshot = out / "snapshot"
    if not (snapshot / "manifest.json").exists():
        demo_snapshot(model_dir, snapshot, pairs, seed=seed)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
    log(f"seed {seed}: the gate's reward model and the good candidate")
    good = train(cfg, snapshot, out / "good", {}, judge=True)
    judge_model = good["judge_model"]
    judge, why = judges.choose(cfg.gate, judge_model)
    log(f"seed {seed}: judge: {why}")
    built = {"good": (Path(good["adapter"]), good["metrics"]["kl_to_base"])}
    lr, epochs = cfg.train.learning_rate, cfg.train.epochs
    recipes = {"weak": (snapshot, {"epochs": epochs / 8}), "overtrained": (snapshot, {"learning_rate": lr * 10,
                                                                                         "epochs": epochs * 4}),
               "flipped": (reshaped(snapshot, out / "snap-flipped", "flipped"), {}),
               "random": (reshaped(snapshot, out / "snap-random", "random"), {}),
               "silent": (reshaped(snapshot, out / "snap-silent", "silent"), {}),
               "rambling": (reshaped(snapshot, out / "snap-rambling", "rambling"), {})}
    for name in names:
        if name in recipes:
            log(f"seed {seed}: training {name}")
            done = train(cfg, recipes[name][0], out / name, recipes[name][1])
            built[name] = (Path(done["adapter"]), done["metrics"]["kl_to_base"])
        elif name == "neutral":
            built[name] = (zero_adapter(cfg, out / "neutral" / "adapter"), 0.0)
    prompts = heldout_prompts(snapshot, cfg.gate.eval_prompts)
    gate_seeds = [cfg.train.seed + 1000 * k for k in range(cfg.gate.eval_samples)]
    rows = []
    for name in names:
        adapter, kl = built[name]
        row: dict[str, Any] = {"seed": seed, "candidate": name, "kl_to_base": kl}
        if judge is None:
            row.update(decision="hold", reason=why)
        else:
            cand, serv = answers(cfg, adapter, prompts, gate_seeds)
            d = decide([judge.verdicts(prompts, c, s) for c, s in zip(cand, serv)], kl, cfg.gate)
            row.update(decision=d.outcome, reason=d.reason, gate_win_rate=d.stats.get("win_rate"),
                       gate_lower=d.stats.get("win_rate_lower"))
        row.update(truth(cfg, adapter, truth_samples, seed))
        if name == "neutral":
            row["truth"] = "neutral"  # by construction: the base itself
        row["judge_accuracy"] = judge_model["accuracy"] if judge_model else None
        log(f"seed {seed}: {name}: truth {row['truth']} ({row['true_win_rate']:.3f}), gate {row['decision']}: "
            f"{row['reason']}")
        rows.append(row)
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    lines = ["| seed | candidate | truth (demo rule over base, 95% interval) | gate | gate's win rate (lower bound) | KL |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        gate_rate = f"{r['gate_win_rate']:.3f} ({r['gate_lower']:.3f})" if r.get("gate_win_rate") is not None else "-"
        kl = f"{r['kl_to_base']:.2f}" if r["kl_to_base"] is not None else "-"  # none without held-out prompts
        lines.append(f"| {r['seed']} | {r['candidate']} | {r['truth']} {r['true_win_rate']:.3f} "
                     f"({r['true_lower']:.3f}-{r['true_upper']:.3f}) | {r['decision']} | {gate_rate} | {kl} |")
    matrix = Counter((r["truth"], r["decision"]) for r in rows)
    lines += ["", "| truth \\ gate | promote | reject | hold |", "| --- | --- | --- | --- |"]
    for kind in ("better", "neutral", "worse"):
        lines.append(f"| {kind} | " + " | ".join(str(matrix[(kind, d)]) for d in ("promote", "reject", "hold")) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="demo model directory")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--pairs", type=int, default=400, help="pairs sampled and labelled by the demo rule per seed")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--truth-samples", type=int, default=4, help="answers per held-out prompt for the truth")
    ap.add_argument("--out", type=Path, default=REPO / "alignloop-data" / "bench-gate-audit")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = ap.parse_args(argv)

    model_dir = args.model or demo_model.ensure_demo_model(REPO / "alignloop-data" / "models" / "demo")
    cfg = load(None, [*args.set, f"model.base={Path(model_dir).resolve()}"], missing_ok=True)
    names = [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        ap.error(f"unknown candidate(s) {', '.join(unknown)}; known: {', '.join(CANDIDATES)}")
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        rows += audit_seed(cfg, Path(model_dir), args.out / f"seed{seed}", seed, args.pairs, names,
                           args.truth_samples, log=lambda m: print(m, file=sys.stderr, flush=True))
        with (args.out / "rows.jsonl").open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r["seed"] == seed)
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
