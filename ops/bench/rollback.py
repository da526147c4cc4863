"""How fast the monitor rolls back a worse version, and how often it rolls back one that is not worse.

1. On the demo model, a snapshot labelled by the demo rule (the simulated people), and two DPO
   candidates trained on it in the trainer child: one on the labels (good) and one on the labels
   flipped (worse by the demo rule; `gate_audit.py` measures both).
2. Each version (base, good, flipped) answers `--answers` prompts of simulated traffic (the demo
   corpus's train prompts, temperature 1, 64 tokens, HF generate): for each answer, whether it was
   cut off, empty, and the thumb the simulated user gives (down unless the demo rule calls it good).
3. Trials, replayed through the real `loop.serving.monitor.Monitor` on a real DuckDB store: the
   base serves `--baseline` requests (its answers drawn at random), then the candidate is promoted
   and serves requests drawn from its own answers, a share `--thumbs` of them rated, in batches of
   20 between the monitor's checks, until it is rolled back or kept.

It prints, per candidate, the share of trials rolled back and the requests served before the
rollback (median, quartiles). The issue's bar: a worse version rolled back within 300 live requests
(median over >= 5 trials); a good one rolled back in at most 2% of trials.

    .venv/bin/python ops/bench/rollback.py [--model DIR] [--trials 200] [--answers 600] [--seed 0] [--out DIR]

Results and the command that made them: ops/bench/results/rollback.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "ops" / "bench"))

from compare import demo_snapshot  # noqa: E402
from gate_audit import reshaped, train  # noqa: E402

from loop.config import Config, load  # noqa: E402
from loop.demo import corpus as demo_corpus  # noqa: E402
from loop.demo import judge as demo_rule  # noqa: E402
from loop.demo import model as demo_model  # noqa: E402
from loop.sections import MonitorConfig  # noqa: E402
from loop.serving.monitor import Monitor  # noqa: E402
from loop.serving.router import Router  # noqa: E402
from store import Store  # noqa: E402
from store.database import Exchange  # noqa: E402

BATCH = 20  # requests between two checks of the monitor (it checks every 2 s; ~10 requests/s of traffic)


def answers(cfg: Config, adapter: Path | None, n: int, seed: int) -> list[dict]:
    """n answers to simulated users' prompts: text, cut off (no end token within 64), thumb down."""
    import torch
    from peft import PeftModel

    from loop.training.toolkit import load_policy, policy_sampling

    model, tok = load_policy(cfg.base_model_dir, None)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    rng = random.Random(seed)
    pool = demo_corpus.prompts("train")
    prompts = [rng.choice(pool) for _ in range(n)]
    tok.padding_side = "left"
    out = []
    with torch.inference_mode():
        torch.manual_seed(seed)
        for i in range(0, n, 32):
            batch = prompts[i: i + 32]
            texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                     for p in batch]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, **policy_sampling(1.0), max_new_tokens=64, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:]
            for p, ids in zip(batch, gen):
                text = tok.decode(ids, skip_special_tokens=True).strip()
                out.append({"text": text, "cut_off": tok.eos_token_id not in ids.tolist(),
                            "down": not demo_rule.is_good(p, text)})
    return out


class Promoter:
    """What the monitor calls to roll back: flip the routes and record it (no engine in a replay)."""

    def __init__(self, store: Store, router: Router) -> None:
        self.store, self.router = store, router

    def promote(self, ref, actor=None, reason=None, expect_serving=None):
        routes = self.router.routes
        self.router.update(serving=ref, previous=routes.serving)
        self.store.record_promotion(routes.alias, ref, routes.serving, actor, reason)


def serve(store: Store, version: int, pool: list[dict], n: int, thumbs: float, rng: random.Random) -> None:
    drawn = [rng.choice(pool) for _ in range(n)]
    batch = [Exchange(f"chatcmpl-{uuid.uuid4()}", "chat.completions", "alignloop", version,
                      [{"role": "user", "content": "q"}], [(a["text"], "length" if a["cut_off"] else "stop")], {})
             for a in drawn]
    store.log_batch(batch, [])
    ids = dict(store._all("""SELECT x.request_id, r.id FROM responses r JOIN exchanges x ON x.id = r.exchange_id
                             WHERE x.version_id = ? ORDER BY r.id DESC LIMIT ?""", [version, n]))
    for e, a in zip(batch, drawn):
        if rng.random() < thumbs:
            store.add_feedback(ids[e.request_id], "thumbs", 0.0 if a["down"] else 1.0)


def trial(base: list[dict], candidate: list[dict], baseline: int, thumbs: float, limit: int, seed: int,
          cfg: MonitorConfig) -> tuple[bool, int]:
    """(rolled back, requests the candidate served until then or until it was kept)."""
    rng = random.Random(seed)
    with Store(":memory:") as store:
        store.add_version("/candidate", "dpo")
        router = Router("alignloop", "base")
        promoter = Promoter(store, router)
        monitor = Monitor(cfg, store, router, promoter, lambda: True, log=lambda m: None)
        serve(store, 0, base, baseline, thumbs, rng)
        promoter.promote(1, actor="admin")
        monitor.check()
        served = 0
        while router.routes.serving == 1 and monitor.watch.outcome == "watching" and served < limit:
            serve(store, 1, candidate, BATCH, thumbs, rng)
            served += BATCH
            monitor.check()
        return router.routes.serving == 0, served


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--answers", type=int, default=600, help="answers sampled per version")
    ap.add_argument("--baseline", type=int, default=500, help="requests the base serves before the promotion")
    ap.add_argument("--thumbs", type=float, default=0.5, help="share of answers the simulated users rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--out", type=Path, default=REPO / "alignloop-data" / "bench-rollback")
    args = ap.parse_args(argv)

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    model_dir = args.model or demo_model.ensure_demo_model(REPO / "alignloop-data" / "models" / "demo")
    cfg = load(None, [f"model.base={Path(model_dir).resolve()}"], missing_ok=True)
    snapshot = args.out / "snapshot"
    if not (snapshot / "manifest.json").exists():
        demo_snapshot(Path(model_dir), snapshot, args.pairs, seed=args.seed)
    adapters = {"base": None}
    for name, snap in (("good", snapshot), ("flipped", reshaped(snapshot, args.out / "snap-flipped", "flipped"))):
        log(f"training {name}")
        adapters[name] = Path(train(cfg, snap, args.out / name, {})["adapter"])
    pools = {}
    for name, adapter in adapters.items():
        pools[name] = answers(cfg, adapter, args.answers, args.seed + 1)
        share = lambda k: sum(a[k] for a in pools[name]) / len(pools[name])  # noqa: E731
        log(f"{name}: thumbs down {share('down'):.3f}, cut off {share('cut_off'):.3f}")
    mcfg = MonitorConfig()
    print(f"| candidate | thumbs down (base {sum(a['down'] for a in pools['base']) / len(pools['base']):.3f}) | "
          f"trials | rolled back | requests served before the rollback: median (quartiles) |")
    print("| --- | --- | --- | --- | --- |")
    for name in ("good", "flipped", "base"):
        results = [trial(pools["base"], pools[name], args.baseline, args.thumbs, mcfg.watch_requests, args.seed * 10_000 + t,
                         mcfg) for t in range(args.trials)]
        back = [served for rolled, served in results if rolled]
        down = sum(a["down"] for a in pools[name]) / len(pools[name])
        spread = (f"{statistics.median(back):.0f} ({statistics.quantiles(back, n=4)[0]:.0f}-"
                  f"{statistics.quantiles(back, n=4)[2]:.0f})" if len(back) >= 2 else "-")
        label = {"base": "neutral (the base itself)"}.get(name, name)
        print(f"| {label} | {down:.3f} | {len(results)} | {len(back)} ({len(back) / len(results):.1%}) | {spread} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
