"""How much the single DuckDB writer takes on this machine: exchanges and labels per second.

Exchanges go in as the gateway's log writer sends them, in batches (`Store.log_batch`, one
transaction each); the run compares batch sizes against one exchange per transaction, and at each
size the two ways `store.database._insert` can bulk insert (lists bound and unnested, or an Arrow
table), interleaved, which is where `ARROW_FROM_ROWS` comes from. Labels go
through the labelling queue as the API does it (hand out the next pair, then submit the label, each
in its own transaction), beside the bare insert (`Store.add_label`).

    .venv/bin/python ops/bench/store_limits.py [--exchanges 4000] [--labels 2000] [--out ops/bench/results/store_limits.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import store.database as database  # noqa: E402
from store.database import Exchange, NewPair, Store  # noqa: E402
from store.labelling import LabelQueue  # noqa: E402

BATCHES = (1, 20, 200, 500, 1000)


def exchange(i: int) -> Exchange:
    messages = [{"role": "user", "content": f"How often should I water plant number {i}? " * 3}]
    return Exchange(f"chatcmpl-{uuid.uuid4().hex}", "chat.completions", "alignloop", 0, messages,
                    [(f"Water it every {i % 7 + 1} days, in the morning. " * 4, "stop")],
                    {"max_tokens": 64, "temperature": 0.7}, latency_ms=12.0, prompt_tokens=30, completion_tokens=40)


def exchanges_per_s(path: Path, n: int, batch: int, arrow_from: int = database.ARROW_FROM_ROWS) -> float:
    """Exchanges a second written in batches of `batch`, with `_insert` switching to Arrow from
    `arrow_from` rows."""
    default, database.ARROW_FROM_ROWS = database.ARROW_FROM_ROWS, arrow_from
    try:
        with Store(path) as store:
            records = [exchange(i) for i in range(n)]
            started = time.perf_counter()
            for i in range(0, n, batch):
                store.log_batch(records[i:i + batch], [])
            return n / (time.perf_counter() - started)
    finally:
        database.ARROW_FROM_ROWS = default


def labels_per_s(path: Path, n: int, labellers: int = 4, through_queue: bool = True) -> float:
    with Store(path) as store:
        store.add_labelled_pairs([NewPair([{"role": "user", "content": f"question {i}"}], f"good {i}", f"bad {i}")
                                  for i in range(n)], "import:bench", "dataset:bench")
        users = [store.user_by_token(store.add_user(f"lab{i}", "labeller"))["id"] for i in range(labellers)]
        pair_ids = [row["id"] for row in store._dicts("SELECT id FROM pairs ORDER BY id")]
        queue = LabelQueue(store, overlap=1, lease_s=600)
        held = {user: queue.next_pair(user) for user in users}  # the first call loads the index
        count = n - labellers if through_queue else n  # each labeller holds one pair already
        started = time.perf_counter()
        for i in range(count):
            user = users[i % labellers]
            if through_queue:
                _, held[user] = queue.submit_and_next(user, held[user]["pair_id"], "first")
            else:
                store.add_label(pair_ids[i], user, "a")
        return count / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exchanges", type=int, default=4000)
    ap.add_argument("--labels", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=REPO / "ops/bench/results/store_limits.md")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rates, paths = {}, {}
        for b in BATCHES:
            n = args.exchanges if b > 1 else args.exchanges // 4
            rates[b] = exchanges_per_s(Path(tmp) / f"ex{b}.duckdb", n, b)
            paths[b] = {way: exchanges_per_s(Path(tmp) / f"ex{b}-{way}.duckdb", n, b, 10**9 if way == "unnest" else 0)
                        for way in ("unnest", "arrow")}
        queued = labels_per_s(Path(tmp) / "labels.duckdb", args.labels)
        bare = labels_per_s(Path(tmp) / "bare.duckdb", args.labels, through_queue=False)
    lines = ["# The single DuckDB writer's limits", "",
             f"Command: `.venv/bin/python ops/bench/store_limits.py --exchanges {args.exchanges} --labels {args.labels}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, a local disk; one process, one connection "
             "(as in the gateway). Absolute rates move with the machine; the ratios are from the same run.", "",
             "## Exchanges (`Store.log_batch`: prompt, exchange and response rows in one transaction)", "",
             "| batch | exchanges/s | × one per transaction | unnested lists, exchanges/s | Arrow, exchanges/s |",
             "|---:|---:|---:|---:|---:|"]
    for b, rate in rates.items():
        lines.append(f"| {b} | {rate:,.0f} | {rate / rates[1]:.1f} | {paths[b]['unnest']:,.0f} | {paths[b]['arrow']:,.0f} |")
    lines += ["", f"The store unnests lists below `ARROW_FROM_ROWS` = {database.ARROW_FROM_ROWS} rows a table and "
              "goes through Arrow from there (the first column is what it does)."]
    lines += ["", "The gateway writes a batch every `gateway.log_flush_ms` (1 s), so under load its batches are "
              "what arrived in a second.", "",
              "## Labels", "",
              "| path | labels/s |", "|---|---:|",
              f"| the API's path: `LabelQueue.submit_and_next` (the label and the next pair, one transaction) | {queued:,.0f} |",
              f"| the bare insert, `Store.add_label` | {bare:,.0f} |", ""]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
