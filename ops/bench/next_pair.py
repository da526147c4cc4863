"""Labelling queue benchmark: server-side time to hand out the next pair, with 20 labellers at once
and 100,000 pairs in the store.

    .venv/bin/python ops/bench/next_pair.py [--pairs 100000] [--labellers 20] [--labels-each 30]

The real gateway app (no engine: labelling needs none) runs in a child process over a real DuckDB
file; 20 client threads label through the HTTP API, twice: with no pause between labels (a stress
test: 20 machines, not people) and with 1 s per label (still faster than any person). Like the
labelling app, each labeller asks for its first pair once and then gets each next pair in the answer
to its label. All of it twice, in one run: each label in a transaction of its own (the baseline,
`labeling.max_batch=1`), and labels sent meanwhile written together (the default). "Server-side" is the gateway's own `Server-Timing: next;dur=...` of that answer: the
label written and the next pair handed out, waiting for the store's lock included; client round
trips are shown beside it. Writes ops/bench/results/next_pair.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from store import Store  # noqa: E402
from store.database import NewPair  # noqa: E402
from tests.serving import free_port  # noqa: E402

SERVE = """
import sys, uvicorn
from loop import config as configuration
from loop.serving.server import build
cfg = configuration.load(None, sys.argv[1:])
app, gw = build(cfg, engines=False)
uvicorn.run(app, host="127.0.0.1", port=cfg.gateway.port, log_level="warning")
"""


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(settings: list[str], port: int, tmp: Path, max_batch: int, args) -> list[tuple]:
    """Start the gateway with these settings and label at full speed, then with a 1 s pause."""
    server = subprocess.Popen([sys.executable, "-c", SERVE, *settings], cwd=REPO)
    rows = []
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {(tmp / 'admin.token').read_text().strip()}"})
        tokens = [admin.post("/api/users", json={"name": f"lab{max_batch}-{i}", "role": "labeller"}).json()["token"]
                  for i in range(args.labellers)]
        for think in (0.0, 1.0):
            server_ms: list[float] = []
            client_ms: list[float] = []

            def labeller(token: str) -> None:
                # as the labelling app does: one GET for the first pair, then each label's answer
                # carries the next pair (its Server-Timing covers the label and the hand-out)
                with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
                    pair = c.get("/api/label/next").json()["pair"]
                    for _ in range(args.labels_each):
                        time.sleep(think)
                        t0 = time.perf_counter()
                        r = c.post("/api/label", json={"pair_id": pair["pair_id"], "choice": "first"})
                        r.raise_for_status()
                        client_ms.append((time.perf_counter() - t0) * 1000)
                        server_ms.append(float(r.headers["Server-Timing"].split("dur=")[1]))
                        pair = r.json()["pair"]

            t = time.perf_counter()
            with ThreadPoolExecutor(args.labellers) as pool:
                list(pool.map(labeller, tokens))
            wall = time.perf_counter() - t
            rows.append((max_batch, think, len(server_ms), len(server_ms) / wall, server_ms, client_ms))
    finally:
        server.terminate()
        server.wait(30)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--labellers", type=int, default=20)
    ap.add_argument("--labels-each", type=int, default=40)
    ap.add_argument("--out", type=Path, default=REPO / "ops/bench/results/next_pair.md")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        settings = [f"data.dir={tmp}", f"gateway.port={port}", "labeling.overlap=2"]
        t = time.perf_counter()
        with Store(Path(tmp) / "alignloop.duckdb") as store:
            store.add_labelled_pairs([NewPair([{"role": "user", "content": f"question {i}"}], f"good answer {i}",
                                              f"bad answer {i}") for i in range(args.pairs)], "import:bench", "dataset:bench")
        fill_s = time.perf_counter() - t
        rows = []
        for max_batch in (1, 64):  # 1: each label in a transaction of its own, the baseline
            rows += measure(settings + [f"labeling.max_batch={max_batch}"], port, Path(tmp), max_batch, args)
    lines = [
        "# Labelling queue: time to hand out the next pair", "",
        f"Command: `.venv/bin/python ops/bench/next_pair.py --pairs {args.pairs} --labellers {args.labellers} "
        f"--labels-each {args.labels_each}`  ",
        f"{args.pairs:,} pairs in the store (filled in {fill_s:.1f} s), overlap 2, {args.labellers} labellers "
        "labelling at once through the HTTP API. Client and server share the machine's 2 cores.", "",
        "| labels per transaction (max) | pause per label | hand-outs | labels/s | server p50 ms | server p95 ms | "
        "server p99 ms | client p50 ms | client p95 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for max_batch, think, n, rate, srv, cli in sorted(rows, key=lambda r: (r[1], r[0])):
        lines.append(f"| {max_batch} | {think:g} s | {n} | {rate:.0f} | {pct(srv, .5):.1f} | {pct(srv, .95):.1f} | {pct(srv, .99):.1f} | "
                     f"{pct(cli, .5):.1f} | {pct(cli, .95):.1f} |")
    lines += ["", "Each hand-out here is a label's answer (`POST /api/label`), as the labelling app works: its "
              "server time covers writing the label and handing out the next pair, waiting for the store included. "
              "Labels that arrive while a transaction runs are written together in the next one (group commit, "
              "`loop/serving/label_batcher.py`, at most `labeling.max_batch`), so with no pause the 20 clients share "
              "commits instead of queueing behind one another's; `max_batch` 1 is the baseline, each label in a "
              "transaction of its own, measured in the same run. Goal: server-side p95 ≤ 50 ms with 20 concurrent "
              "labellers and no pause (issue 10).", ""]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
