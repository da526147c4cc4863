"""The continual run: the whole loop night after night on the demo model, per seed.

For each seed, a fresh `alignloop serve` (the real vLLM engine and gateway, on its own DuckDB file)
and `loop.demo.continual.nights` against it: each night simulated users send traffic to what serves,
simulated labellers label the queue through the HTTP API, the scheduler's nightly trigger retrains,
gates (its judge: the reward model refreshed on the labels) and promotes; then the demo rule (the
simulated people, never the gate's judge) grades what serves on the 68 held-out prompts.

It writes every night of every seed to OUT/nights.jsonl, a table per seed and the plot
OUT/continual.png (good-answer share against human labels used).

    .venv/bin/python ops/bench/continual.py [--nights 5] [--seeds 0,1,2] [--pairs 150] [--labellers 4]
        [--labels N] [--out DIR] [--set section.field=value ...]

Active learning against random order: the same command twice, `--labels` under `--pairs` (so the
order decides which pairs get labels), with `--set labeling.order=random` and
`--set labeling.order=active`.

Results and the command that made them: ops/bench/results/continual.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from loop.client import GatewayClient  # noqa: E402
from loop.demo import continual  # noqa: E402
from loop.demo import model as demo_model  # noqa: E402
from tests.serving import free_port, start  # noqa: E402

# as the end-to-end test runs it: every exchange gets a second answer (a pair), a fifth of the pairs
# held out (the gate's reward model is measured on them)
SETTINGS = ["gateway.pair_share=1.0", "store.heldout_share=0.2"]


def run_seed(seed: int, root: Path, nights: int, pairs: int, labellers: int, extra: list[str],
             labels: int | None = None) -> list[dict]:
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(demo_model.ensure_demo_model(REPO / "alignloop-data" / "models" / "demo"),
                    root / "alignloop-data" / "models" / "demo")
    server = start(root, None, free_port(), free_port(), [*SETTINGS, f"train.seed={seed}", *extra], timeout=900)
    try:
        client = GatewayClient.for_config(server.cfg, timeout=900)
        log = lambda m: print(f"seed {seed}: {m}", file=sys.stderr, flush=True)  # noqa: E731
        return [{"seed": seed, **r}
                for r in continual.nights(server.cfg, client, nights, pairs, labellers, seed, log, labels)]
    finally:
        server.stop(signal.SIGINT, timeout=180)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for seed in sorted({r["seed"] for r in records}):
        rows = [r for r in records if r["seed"] == seed]
        ax.plot([r["labels_total"] for r in rows], [r["good"] for r in rows], marker="o", label=f"seed {seed}")
    ax.axhline(0.95, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("human labels given, in all")
    ax.set_ylabel("good answers (demo rule, held-out)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("what serves after each night")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nights", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--pairs", type=int, default=150, help="new pairs of traffic each night")
    ap.add_argument("--labellers", type=int, default=4)
    ap.add_argument("--labels", type=int, default=None, help="at most this many labels a night (default: all)")
    ap.add_argument("--out", type=Path, default=REPO / "alignloop-data" / "bench-continual")
    ap.add_argument("--set", action="append", default=[], help="section.field=value for every seed's server")
    args = ap.parse_args(argv)
    args.out = args.out.resolve()  # each server runs in its own folder: a relative path would be read from there
    args.out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        rows = run_seed(seed, args.out / f"seed-{seed}", args.nights, args.pairs, args.labellers, args.set, args.labels)
        records += rows
        with (args.out / "nights.jsonl").open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"\nseed {seed}\n\n{continual.table(rows)}", flush=True)
        plot(records, args.out / "continual.png")
    worse = [r for r in records if r["worse_than_previous"]]
    print(f"\nnights that promoted a version worse than the one it replaced: {len(worse)}")
    print(f"plot: {args.out / 'continual.png'}; every number: {args.out / 'nights.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
