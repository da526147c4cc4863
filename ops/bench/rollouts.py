"""PPO's rollouts on vLLM engines against HF `generate`: tokens per second, and the win rate.

Part 1, throughput, measured in one run and interleaved (HF, serving engine, dedicated engine, ...
per round): the same policy (the demo model + a LoRA adapter of the PPO shape), the same prompts,
every answer exactly `--tokens` long (min = max new tokens), sampled at temperature 1. "HF" is
`model.generate` on one left-padded batch, as `loop.training.ppo.rollout` calls it; "serving
engine" is the path PPO takes with `ppo.rollouts = "engine"`: `EngineSampler.sample`, i.e.
`POST /api/rollouts` on a running `alignloop serve` (the adapter on its LoRA-enabled engine, up to
64 prompts per engine request, at the lowest priority); "dedicated" is `ppo.rollouts =
"dedicated"`: `RolloutEngine.sample` on an engine of the run's own, no LoRA layers, the policy's
merged weights reloaded into it. Each sync (save + load, once per `ppo.sync_steps` steps) is timed
on its own.

Part 2 (`--ppo-seeds`), the result: the trainer child runs PPO on the benchmark snapshot of
`ops/bench/compare.py` with HF `generate`, through the serving engine and on a dedicated engine,
for each seed, and the demo rule (the simulated people) judges each candidate against the base on
the held-out prompts.

    .venv/bin/python ops/bench/rollouts.py [--model DIR] [--batches 32,128] [--tokens 48] [--rounds 3] \
        [--ppo-seeds 0,1,2] [--out ops/bench/results/rollouts.md]

Results and the command that made them: ops/bench/results/rollouts.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "ops" / "bench"))

from loop import config as configuration  # noqa: E402
from loop.client import GatewayClient  # noqa: E402
from loop.demo import corpus as demo_corpus  # noqa: E402
from loop.training import rollout_engine  # noqa: E402
from loop.training.engine_sampler import EngineSampler  # noqa: E402
from tests.serving import free_port, start  # noqa: E402


def policy(model_dir: Path, seed: int = 0):
    """The demo model with a LoRA adapter as PPO trains it ([train]'s LoRA), B weights random so
    it is not the base."""
    import torch
    from peft import get_peft_model

    from loop.config import TrainConfig
    from loop.training.toolkit import load_policy, lora_config

    torch.manual_seed(seed)
    model, tok = load_policy(model_dir, None)
    model = get_peft_model(model, lora_config(TrainConfig(), model))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return model.eval(), tok


def encode(tok, n: int):
    pool = demo_corpus.prompts("train")
    messages = [[{"role": "user", "content": pool[i % len(pool)]}] for i in range(n)]
    tok.padding_side = "left"
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def hf_tokens_per_s(model, tok, enc, tokens: int, seed: int) -> float:
    import torch

    from loop.training.toolkit import policy_sampling

    torch.manual_seed(seed)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, **policy_sampling(1.0), max_new_tokens=tokens, min_new_tokens=tokens,
                             pad_token_id=tok.pad_token_id)
    elapsed = time.perf_counter() - t
    return (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0] / elapsed


def engine_tokens_per_s(sampler: EngineSampler, enc, tokens: int, step: int = 5) -> float:
    """Through the gateway, on the adapter the sampler loaded last (at `step`)."""
    ids = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    t = time.perf_counter()
    out = sampler.sample(step, ids, tokens, 1.0, min_new_tokens=tokens)
    elapsed = time.perf_counter() - t
    if out is None:
        raise RuntimeError(f"the engine failed: {sampler.failed}")
    assert all(len(c["token_ids"]) == tokens for c in out)
    return sum(len(c["token_ids"]) for c in out) / elapsed


def synced(sampler: EngineSampler, model) -> float:
    """Five syncs, once per step as with ppo.sync_steps = 1; the median seconds of one."""
    syncs = []
    for step in range(1, 6):
        t = time.perf_counter()
        sampler.sync(model, step)
        syncs.append(time.perf_counter() - t)
        if sampler.failed:
            raise RuntimeError(sampler.failed)
    return statistics.median(syncs)


def throughput(server, model_dir: Path, batches: list[int], tokens: int, rounds: int, work: Path) -> dict:
    model, tok = policy(model_dir)
    cfg = configuration.load(server.root / "alignloop.toml")
    work.joinpath("dedicated").mkdir(parents=True, exist_ok=True)
    samplers = {
        "engine": EngineSampler(GatewayClient(server.url, server.admin_token, timeout=600), work / "rollout-adapters",
                                "bench", sync_steps=1),
        "dedicated": rollout_engine.RolloutEngine.start(
            rollout_engine.job_settings(cfg.engine, free_port()), str(model_dir), work / "dedicated", 1, 1)}
    sync_ms = {name: synced(s, model) * 1000 for name, s in samplers.items()}
    rows = []
    for n in batches:
        enc = encode(tok, n)
        hf_tokens_per_s(model, tok, enc, 4, 0)  # warm-up, every way
        for s in samplers.values():
            engine_tokens_per_s(s, enc, 4)
        runs: dict[str, list[float]] = {"hf": [], **{name: [] for name in samplers}}
        for r in range(rounds):
            runs["hf"].append(hf_tokens_per_s(model, tok, enc, tokens, r))
            for name, s in samplers.items():
                runs[name].append(engine_tokens_per_s(s, enc, tokens))
        row = {"prompts": n, "tokens": tokens, **{k: statistics.median(v) for k, v in runs.items()},
               **{f"{name}_ratio": statistics.median(e / h for e, h in zip(runs[name], runs["hf"])) for name in samplers},
               "all": runs}
        rows.append(row)
        print(f"rollouts: {n} prompts x {tokens} tokens: HF {row['hf']:.0f} tok/s, serving engine {row['engine']:.0f} "
              f"({row['engine_ratio']:.2f}x), dedicated engine {row['dedicated']:.0f} ({row['dedicated_ratio']:.2f}x)",
              flush=True)
    for s in samplers.values():
        s.close()
    return {"rows": rows, "sync_ms": sync_ms}


def ppo_win_rates(server, model_dir: Path, seeds: list[int], work: Path) -> list[dict]:
    from compare import demo_snapshot

    from loop.evaluation.compare import grader, trial
    from loop.evaluation.gate import heldout_prompts

    cfg = configuration.load(server.root / "alignloop.toml")
    snapshot = demo_snapshot(model_dir, work / "snapshot", 400)
    eval_prompts = heldout_prompts(snapshot, cfg.gate.eval_prompts)
    rows = []
    for seed in seeds:
        for mode, gateway in (("generate", None), ("engine", (server.url, server.admin_token)), ("dedicated", None)):
            row = trial(cfg, snapshot, "ppo", seed, work / mode, eval_prompts, 2, grader(cfg), gateway=gateway,
                        dedicated=mode == "dedicated")
            rows.append({"mode": mode, **row})
            print(f"ppo seed {seed} via {mode}: {json.dumps({k: row.get(k) for k in ('win_rate', 'train_seconds', 'rollouts_on', 'rollout_engine_tokens_per_s', 'kl_to_base', 'error')})}",
                  flush=True)
    return rows


def report(tp: dict, ppo: list[dict], model_dir: Path, command: str) -> str:
    lines = [f"# PPO rollouts: vLLM engines vs HF `generate` (`ops/bench/rollouts.py`)\n",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared), no GPU. Model: `{model_dir}` with a LoRA "
             "adapter of [train]'s shape (the policy PPO trains).\n", f"    {command}\n",
             "## Rollout tokens per second (median of the rounds; every answer exactly as long)\n",
             "| prompts | tokens each | HF generate tok/s | serving engine (through the gateway) tok/s | serving / HF "
             "| dedicated engine tok/s | dedicated / HF |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in tp["rows"]:
        lines.append(f"| {r['prompts']} | {r['tokens']} | {r['hf']:.0f} | {r['engine']:.0f} | **{r['engine_ratio']:.2f}** "
                     f"| {r['dedicated']:.0f} | **{r['dedicated_ratio']:.2f}** |")
    lines.append(f"\nLoading the policy (median, once per `ppo.sync_steps` rollout steps): on the serving engine (save "
                 f"the adapter, `POST /api/rollouts/adapters`) {tp['sync_ms']['engine']:.0f} ms; on the dedicated one "
                 f"(merge, save, reload the weights, empty the prefix cache) {tp['sync_ms']['dedicated']:.0f} ms.\n")
    if ppo:
        lines += ["## PPO with each sampler (judged by the demo rule against the base)\n",
                  "| seed | rollouts | win rate over base | KL to base | train s | rollout tok/s on the engine |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in ppo:
            lines.append(f"| {r['seed']} | {r['mode']} ({r.get('rollouts_on', '-')}) | {r.get('win_rate', float('nan')):.3f} | "
                         f"{r.get('kl_to_base') or float('nan'):.2f} | {r.get('train_seconds') or float('nan'):.0f} | "
                         f"{r.get('rollout_engine_tokens_per_s') or '-'} |")
        for mode in ("generate", "engine", "dedicated"):
            rates = [r["win_rate"] for r in ppo if r["mode"] == mode and "win_rate" in r]
            if rates:
                lines.append(f"\n{mode}: mean win rate {statistics.mean(rates):.3f} "
                             f"(std {statistics.pstdev(rates):.3f}, {len(rates)} seeds)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model directory (default: the demo model)")
    ap.add_argument("--batches", default="32,128", help="prompts per rollout batch, comma-separated")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per answer (ppo.max_new_tokens)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ppo-seeds", default="", help="also train PPO both ways with these seeds and judge the results")
    ap.add_argument("--out", type=Path, default=REPO / "ops/bench/results/rollouts.md")
    args = ap.parse_args(argv)
    model = args.model
    if model is None:
        from loop.cli import ensure_demo_model

        model = ensure_demo_model(configuration.load())
    command = "python ops/bench/rollouts.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        server = start(Path(tmp) / "serve", model, free_port(), free_port(),
                       ["gateway.pair_share=0.0", "monitor.enabled=false"])
        try:
            tp = throughput(server, model, [int(b) for b in args.batches.split(",")], args.tokens, args.rounds,
                            Path(tmp))
            seeds = [int(s) for s in args.ppo_seeds.split(",") if s.strip()]
            ppo = ppo_win_rates(server, model, seeds, Path(tmp) / "ppo") if seeds else []
        finally:
            server.stop()
    text = report(tp, ppo, model, command)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
