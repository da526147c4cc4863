"""`alignloop compare`: DPO and RLHF (reward model + PPO) from the same base on the same labelled
pairs, side by side, measured instead of claimed.

For each method and seed, the trainer child (`python -m loop.training.child RUN_DIR`, the code a retrain
runs) trains on one snapshot; this process measures its wall time and peak memory (the child's
maximum resident set, from `wait4`; GPU memory the child reports where there is CUDA), then lets
base and candidate answer the snapshot's held-out prompts (HF `generate`, the gate's temperature
and length, `samples` answers per prompt) and a grader compares them (`grader`: the demo rule on the demo model, an LLM judge on a
real one). Nothing here
touches what serves.

The report: per method, the weights it holds (parameters and buffers of every model, counted in
the child), peak memory, wall time, copies of the base weights held in memory, its
number of knobs (config fields of its own), the final judged win rate over the base (mean of the
seeds) and its run-to-run spread; as a Markdown table (`report.md`), every number (`trials.jsonl`),
and plots (`compare.png`).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from loop.config import Config, KTOConfig, PPOConfig, RewardConfig, TrainConfig
from loop.training import launch, rollout_engine
from loop.training.engine_sampler import TOKEN_ENV

# What each method holds while it trains (by construction of loop.training.dpo, loop.training.ppo, loop.training.reward):
MODELS_IN_MEMORY = {
    "dpo": ("policy (base + LoRA) and reference (the same weights, adapter off)", 1),
    "ppo": ("policy (base + LoRA), reference (adapter off), value head, reward model (base + LoRA + head)", 2),
    "kto": ("policy (base + LoRA) and reference (the same weights, adapter off)", 1),
}
DPO_KNOBS = ("learning_rate", "epochs", "batch_size", "beta", "loss_type")  # of [train]; LoRA fields are shared


def knobs(method: str) -> int:
    """Config fields that belong to the method alone (LoRA, max_length and seed are shared by all)."""
    if method == "ppo":
        rm = [f for f in dataclasses.fields(RewardConfig) if f.name not in ("lora", "weight", "extra")]
        operations = ("checkpoint_steps", "rollouts", "sync_steps", "rollout_engine_share")  # where and how safely, not what is learned
        ppo = [f for f in dataclasses.fields(PPOConfig) if f.name not in operations]
        return len(rm) + len(ppo)
    if method == "kto":
        return len(dataclasses.fields(KTOConfig)) - 1  # heldout_share is not a training knob
    return len(DPO_KNOBS)


def run_trainer(job: dict[str, Any], run_dir: Path, timeout_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The trainer child on `job`, as one plain process (so its peak RSS is the trainer's own); its
    result.json plus wall_s and peak_rss_mb (or an error)."""
    cmd = launch.command(TrainConfig(**job["train"]), Path.cwd(), run_dir, accelerate=False)
    done = launch.launch(job, run_dir, cmd, timeout_s, env=env)
    out = {"wall_s": done.wall_s, "peak_rss_mb": done.peak_rss_mb, "exit": done.returncode}
    return {**out, "error": done.error} if done.error else {**out, **done.result}


def sample(model, tok, prompts: list[list[dict[str, str]]], temperature: float, max_new_tokens: int,
           seed: int) -> list[str]:
    """One answer per prompt from a loaded model (HF generate, left padding), sampled from the
    model itself (none of its generation_config's sampling defaults)."""
    import torch

    from loop.training.toolkit import policy_sampling

    side, tok.padding_side = tok.padding_side, "left"
    out: list[str] = []
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        for i in range(0, len(prompts), 32):
            texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts[i: i + 32]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, **policy_sampling(temperature),
                                 max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
            out.extend(t.strip() for t in tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    tok.padding_side = side
    return out


def judge_against_base(cfg: Config, adapter: str, prompts: list[list[dict[str, str]]], samples: int,
                       seed: int, judge) -> dict[str, float]:
    """The candidate's judged win rate over the base (ties half) on `prompts` x `samples`."""
    from peft import PeftModel

    from loop.training.toolkit import load_policy

    base, tok = load_policy(cfg.base_model_dir, None)
    model = PeftModel.from_pretrained(base, adapter)
    model.eval()
    asked = prompts * samples
    g = cfg.gate
    cand = sample(model, tok, asked, g.temperature, g.max_tokens, seed=10_000 + seed)
    with model.disable_adapter():
        serv = sample(model, tok, asked, g.temperature, g.max_tokens, seed=20_000 + seed)
    return win_rate(judge.verdicts(asked, cand, serv))


def win_rate(verdicts: list[str]) -> dict[str, float]:
    """The candidate's win rate (ties half; invalid verdicts left out) and the counts behind it."""
    from loop.evaluation.gate import POINTS, counts

    points = [POINTS[v] for v in verdicts if v in POINTS]
    return {"win_rate": sum(points) / max(len(points), 1), **counts([verdicts])}


def grader(cfg: Config):
    """What grades a comparison: on a model of the demo world (built by `loop.demo`) the demo rule,
    the simulated people whose preferences are the truth there; on any other model the configured
    LLM judge. Never a reward model trained on the candidates' labels (PPO optimises against one)."""
    from loop.demo.model import demo_info
    from loop.evaluation.judges import llm_judge

    if demo_info(cfg.base_model_dir) is not None:
        from loop.demo.judge import Grader

        return Grader()
    if cfg.gate.judge_url:
        return llm_judge(cfg.gate)
    raise ValueError("compare grades a real model with an LLM judge: set gate.judge_url and gate.judge_model "
                     "(the demo rule knows only the demo model's world)")


def trial(cfg: Config, snapshot: Path, method: str, seed: int, work: Path, eval_prompts: list, samples: int,
          judge, log=print, init_adapter: str | None = None, gateway: tuple[str, str] | None = None,
          dedicated: bool = False) -> dict[str, Any]:
    """Train `method` with `seed` on `snapshot` (from `init_adapter`, or a fresh adapter) in
    work/METHOD-seedSEED, and judge it against the base. `gateway`: (URL, admin token) of a running
    gateway whose engine samples PPO's rollouts; `dedicated`: PPO samples on an engine of its own
    (`loop.training.rollout_engine`); neither: HF `generate`."""
    train = dataclasses.replace(cfg.train, seed=seed, num_processes=1)
    run_dir = work / f"{method}-seed{seed}"
    job = {"method": method, "snapshot": str(snapshot), "base_model": str(cfg.base_model_dir),
           "init_adapter": init_adapter,
           "output_adapter": str(run_dir / "adapter"), "train": dataclasses.asdict(train),
           "reward": dataclasses.asdict(cfg.reward), "ppo": dataclasses.asdict(cfg.ppo),
           "kto": dataclasses.asdict(cfg.kto), "eval_prompts": eval_prompts}
    env = None
    if gateway and method == "ppo":
        job["rollouts"], env = {"gateway": gateway[0]}, {TOKEN_ENV: gateway[1]}
    elif dedicated and method == "ppo":
        job["rollouts"] = {"dedicated": rollout_engine.job_settings(cfg.engine, rollout_engine.free_port(),
                                                                          cfg.ppo.rollout_engine_share)}
    log(f"compare: {method} seed {seed}: training ({run_dir})")
    done = run_trainer(job, run_dir, cfg.train.timeout_s, env)
    row: dict[str, Any] = {"method": method, "seed": seed, "wall_s": done["wall_s"], "peak_rss_mb": done["peak_rss_mb"]}
    if "error" in done:
        log(f"compare: {method} seed {seed}: failed: {done['error']}")
        return {**row, "error": done["error"]}
    m = done["metrics"]
    row["adapter"] = done["adapter"]
    row.update({"kl_to_base": m.get("kl_to_base"), "peak_gpu_mb": m.get("peak_gpu_mb"), "weights_mb": m.get("weights_mb"),
                "reward_model_accuracy": m.get("reward_model_accuracy"), "train_seconds": m.get("train_seconds"),
                **{k: m[k] for k in ("rollouts_on", "rollout_engine_tokens_per_s", "rollout_fallback") if k in m}})
    row.update(judge_against_base(cfg, done["adapter"], eval_prompts, samples, seed, judge))
    log(f"compare: {method} seed {seed}: win rate {row['win_rate']:.3f}, {row['wall_s']} s, "
        f"peak RSS {row['peak_rss_mb']} MB")
    return row


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per method: means, spread (population std and range) of the win rate over seeds."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        ok = [r for r in rows if r["method"] == method and "error" not in r]
        failed = sum(1 for r in rows if r["method"] == method and "error" in r)
        wins = [r["win_rate"] for r in ok]
        line = {"method": method, "seeds": len(ok), "failed": failed,
                "models_in_memory": MODELS_IN_MEMORY[method][0], "base_copies": MODELS_IN_MEMORY[method][1],
                "knobs": knobs(method)}
        if ok:
            line.update({
                "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
                "weights_mb": max((r.get("weights_mb") or 0) for r in ok) or None,
                "peak_gpu_mb": max((r["peak_gpu_mb"] or 0) for r in ok) or None,
                "wall_s": statistics.mean(r["wall_s"] for r in ok),
                "win_rate": statistics.mean(wins), "win_rate_std": statistics.pstdev(wins),
                "win_rate_min": min(wins), "win_rate_max": max(wins),
                "kl_to_base": statistics.mean(r["kl_to_base"] for r in ok if r["kl_to_base"] is not None)
                if any(r["kl_to_base"] is not None for r in ok) else None,
            })
        out.append(line)
    return out


def markdown(summary: list[dict[str, Any]], base: dict[str, float] | None = None) -> str:
    """The comparison table; `base` = {"rss_mb", "weights_mb"} of a process holding only the base model."""
    head = ("| method | weights in memory | peak RSS | wall time | models in memory | knobs "
            "| win rate over base (mean of seeds) | spread (std; min-max) | KL to base |")
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        if not s["seeds"]:
            lines.append(f"| {s['method']} | failed ({s['failed']} runs) | | | | | | | |")
            continue
        weights = f"{s['weights_mb']:.1f} MB" if s.get("weights_mb") else "?"
        rss = f"{s['peak_rss_mb']:.0f} MB"
        if base:
            weights += f" ({s['weights_mb'] / base['weights_mb']:.2f}x base)" if s.get("weights_mb") else ""
            rss += f" ({s['peak_rss_mb'] / base['rss_mb']:.1f}x)"
        gpu = f", GPU {s['peak_gpu_mb']:.0f} MB" if s.get("peak_gpu_mb") else ""
        kl = f"{s['kl_to_base']:.2f}" if s["kl_to_base"] is not None else ""
        copies = f"{s['base_copies']} cop{'ies' if s['base_copies'] > 1 else 'y'} of the base"
        lines.append(
            f"| {s['method']} | {weights} | {rss}{gpu} | {s['wall_s']:.0f} s | {s['models_in_memory']} ({copies}) | "
            f"{s['knobs']} | **{s['win_rate']:.3f}** ({s['seeds']} seed{'s' if s['seeds'] > 1 else ''}) | "
            f"{s['win_rate_std']:.3f}; "
            f"{s['win_rate_min']:.3f}-{s['win_rate_max']:.3f} | {kl} |")
    return "\n".join(lines) + "\n"


def base_footprint(cfg: Config) -> dict[str, float]:
    """Peak RSS and weights of a process that only loads the base model and runs one forward pass:
    the unit of the "x base" figures (Python, torch and the libraries included in the RSS, as in
    every training child)."""
    code = ("import resource, sys, torch; from loop.training.toolkit import load_policy, weights_mb; "
            "m, t = load_policy(sys.argv[1], None); m(**t('hello', return_tensors='pt')); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, weights_mb(m))")
    out = subprocess.run([sys.executable, "-c", code, str(cfg.base_model_dir)], capture_output=True, text=True,
                         check=True)
    rss, weights = out.stdout.strip().splitlines()[-1].split()
    return {"rss_mb": float(rss), "weights_mb": float(weights)}


def plot(rows: list[dict[str, Any]], work: Path, path: Path) -> Path:
    """Win rate per seed and weights held per method, and each run's training signal per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    methods = list(dict.fromkeys(r["method"] for r in ok))
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for i, m in enumerate(methods):
        wins = [r["win_rate"] for r in ok if r["method"] == m]
        ax[0].scatter([i] * len(wins), wins, label=m)
        ax[1].bar(i, max((r.get("weights_mb") or 0) for r in ok if r["method"] == m))
    for a, title in ((ax[0], "judged win rate over the base (per seed)"),
                     (ax[1], "weights held while training (MB)")):
        a.set_xticks(range(len(methods)), methods)
        a.set_title(title)
    ax[0].axhline(0.5, color="grey", lw=0.5)
    for r in ok:
        metrics = work / f"{r['method']}-seed{r['seed']}" / "metrics.jsonl"
        if not metrics.exists():
            continue
        points = [json.loads(line) for line in metrics.read_text().splitlines()]
        name = {"dpo": "rewards/margins", "ppo": "reward", "kto": "rewards/margins"}.get(r["method"])
        series = [(p["step"], p["value"]) for p in points if p["name"] == name]
        if series:
            ax[2].plot(*zip(*series), label=f"{r['method']} {name} (seed {r['seed']})", lw=1)
    ax[2].set_title("training signal per step")
    ax[2].set_xlabel("step")
    ax[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(cfg: Config, snapshot: Path, out: Path, methods: list[str], seeds: list[int], samples: int = 2,
            judge=None, log=print) -> dict[str, Any]:
    """Train every method with every seed on `snapshot`; write report.md, trials.jsonl, compare.png to `out`."""
    from loop.evaluation.gate import heldout_prompts

    out.mkdir(parents=True, exist_ok=True)
    eval_prompts = heldout_prompts(snapshot, cfg.gate.eval_prompts)
    if not eval_prompts:
        raise ValueError(f"{snapshot} has no held-out prompts to judge on")
    judge = judge or grader(cfg)
    rows = []
    for method in methods:
        for seed in seeds:
            row = trial(cfg, snapshot, method, seed, out, eval_prompts, samples, judge, log)
            rows.append(row)
            with (out / "trials.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    summary = summarise(rows)
    base = base_footprint(cfg)
    table = markdown(summary, base)
    manifest = json.loads((snapshot / "manifest.json").read_text())
    header = (f"Snapshot {snapshot} ({manifest['counts']}); {len(eval_prompts)} held-out prompts x {samples} "
              f"answers per seed, judged by {judge.name} at temperature {cfg.gate.temperature}; a process holding only "
              f"the base model: {base['weights_mb']:.1f} MB of weights, {base['rss_mb']:.0f} MB RSS.\n\n")
    (out / "report.md").write_text(header + table, encoding="utf-8")
    plot(rows, out, out / "compare.png")
    return {"rows": rows, "summary": summary, "table": table, "report": str(out / "report.md"),
            "plot": str(out / "compare.png")}
