"""What the gateway itself costs: CPU per proxied request and requests/s, in isolation.

The real gateway (`alignloop serve`, pair making off so every request is one upstream call) fronts a
fake upstream: a bare asyncio server in its own process that answers `/health`, `/v1/models` and
every chat request at once with a canned OpenAI answer, so what is measured is the gateway and not an
engine. A bare asyncio load generator (keep-alive connections, one pre-built request, no HTTP
library) sends chat requests as fast as the gateway answers them. The gateway is pinned to one core,
the load generator and the fake upstream to the other, and the same load is also sent straight at
the fake upstream, interleaved, as the baseline: what the load generator and upstream can do alone.

CPU per request is the gateway process's user + system time (all its threads: the log writer's
DuckDB inserts included) over the requests it answered, from /proc.

    .venv/bin/python ops/bench/gateway.py [--seconds 5] [--rounds 3] [--pause-ms 30] [--out ops/bench/results/gateway.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.serving import free_port, start  # noqa: E402

ANSWER = json.dumps({
    "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "base",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Water it once a week."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}}).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": "base", "object": "model", "owned_by": "fake"}]}).encode()
BODY = json.dumps({"model": "alignloop", "max_tokens": 16, "temperature": 0.0,
                   "messages": [{"role": "user", "content": "How often should I water basil?"}]}).encode()


def _response(status: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
            .encode() + body)


class FakeUpstream(asyncio.Protocol):
    """HTTP/1.1 with keep-alive, just enough for the gateway's client: a request line, headers with
    a Content-Length, a body; the answer depends on the path only."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport, self.buf = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            path = head.split(" ", 2)[1]
            if path.startswith("/v1/chat/completions"):
                self.transport.write(_response("200 OK", ANSWER))
            elif path.startswith("/v1/models"):
                self.transport.write(_response("200 OK", MODELS))
            else:
                self.transport.write(_response("200 OK", b"{}"))


def serve_upstream(port: int) -> None:
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(FakeUpstream, "127.0.0.1", port))
    try:
        loop.run_forever()
    finally:
        server.close()


class Client(asyncio.Protocol):
    """One keep-alive connection sending the same request again as soon as the answer is in."""

    def __init__(self, request: bytes, counts: list[int]) -> None:
        self.request, self.counts, self.buf = request, counts, b""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end]
            i = head.lower().find(b"content-length:")
            length = int(head[i + 15:].split(b"\r\n", 1)[0]) if i >= 0 else 0
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self.counts[0 if head.startswith(b"HTTP/1.1 200") else 1] += 1
            self.next()

    def next(self) -> None:
        self.transport.write(self.request)


class PacedClient(Client):
    """One connection that waits `pause` seconds after each answer before it asks again: the few tens
    of requests a second a small engine serves, where each request finds the gateway idle."""

    pause = 0.0

    def next(self) -> None:
        asyncio.get_running_loop().call_later(self.pause, self.transport.write, self.request)


async def _load(port: int, path: str, connections: int, seconds: float, pause: float = 0.0) -> tuple[int, int, float]:
    request = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
               f"authorization: Bearer bench\r\ncontent-length: {len(BODY)}\r\n\r\n").encode() + BODY
    counts = [0, 0]
    loop = asyncio.get_running_loop()
    kind = type("Paced", (PacedClient,), {"pause": pause}) if pause else Client
    transports = [(await loop.create_connection(lambda: kind(request, counts), "127.0.0.1", port))[0]
                  for _ in range(connections)]
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    elapsed = time.perf_counter() - started
    ok, failed = counts
    for t in transports:
        t.close()
    return ok, failed, elapsed


def load(port: int, path: str, connections: int, seconds: float, pause: float = 0.0) -> tuple[int, int, float]:
    """(answered 200, answered otherwise, seconds); `pause`: seconds each connection waits between
    an answer and its next request (0: at once)."""
    return asyncio.run(_load(port, path, connections, seconds, pause))


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(gateway_pid: int, gateway_port: int, upstream_port: int, connections: int, seconds: float,
            rounds: int, pause: float = 0.0) -> dict:
    through, direct, cpu = [], [], []
    for _ in range(rounds):  # interleaved: drift in the machine's load hits both sides alike
        ok, failed, elapsed = load(upstream_port, "/v1/chat/completions", connections, seconds, pause)
        direct.append(ok / elapsed)
        load(gateway_port, "/v1/chat/completions", connections, 0.5, pause)  # warm-up
        before = cpu_s(gateway_pid)
        ok, failed, elapsed = load(gateway_port, "/v1/chat/completions", connections, seconds, pause)
        used = cpu_s(gateway_pid) - before
        if failed or not ok:
            raise RuntimeError(f"{failed} of {ok + failed} requests through the gateway failed")
        through.append(ok / elapsed)
        cpu.append(used / ok * 1000)
    return {"connections": connections, "pause": pause, "gateway_rps": statistics.median(through),
            "direct_rps": statistics.median(direct), "cpu_ms": statistics.median(cpu),
            "cpu_ms_min": min(cpu), "cpu_ms_max": max(cpu)}


def report(rows: list[dict], seconds: float, rounds: int) -> str:
    lines = [
        "# The gateway in isolation", "",
        f"Command: `.venv/bin/python ops/bench/gateway.py --seconds {seconds:g} --rounds {rounds}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs. The real gateway (`alignloop serve`, "
        "`gateway.pair_share = 0`) in front of a fake upstream that answers at once; the gateway on one "
        "core, the load generator and the fake upstream on the other. CPU: the gateway process's user + "
        "system time per answered request (its log writer included). Medians of the rounds, each side "
        "measured interleaved with the other.", "",
        "| connections | through the gateway req/s | straight to the upstream req/s | gateway CPU ms/request (min-max) |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        paced = f", {r['pause'] * 1000:g} ms between requests" if r["pause"] else ""
        lines.append(f"| {r['connections']}{paced} | {r['gateway_rps']:.0f} | {r['direct_rps']:.0f} | "
                     f"{r['cpu_ms']:.3f} ({r['cpu_ms_min']:.3f}-{r['cpu_ms_max']:.3f}) |")
    lines += ["", "Goal: ≤ 0.5 ms of gateway CPU per request, ≥ 2,000 requests/s from one gateway process.",
              "", "The paced row is the rate the demo engine serves on this machine (ops/bench/results/serving.md): "
              "each request finds the gateway idle and its caches cold, and the log writer's batch every "
              "`gateway.log_flush_ms` (a few ms of CPU, whatever its size) is shared by a few requests, not "
              "hundreds.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", type=int, help=argparse.SUPPRESS)  # run as the fake upstream on this port
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per load run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row")
    ap.add_argument("--connections", default="1,16,64", help="concurrent connections, one row each")
    ap.add_argument("--pause-ms", type=float, default=30.0,
                    help="one more row: one connection pausing this long between requests (0: none)")
    ap.add_argument("--out", type=Path, default=REPO / "ops/bench/results/gateway.md")
    args = ap.parse_args(argv)
    if args.upstream:
        serve_upstream(args.upstream)
        return 0
    cores = sorted(os.sched_getaffinity(0))
    client_cores, gateway_cores = ({cores[0]}, set(cores[1:])) if len(cores) > 1 else (set(cores), set(cores))
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, __file__, "--upstream", str(upstream_port)],
                                preexec_fn=lambda: os.sched_setaffinity(0, client_cores))
    os.sched_setaffinity(0, client_cores)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            server = start(Path(tmp), Path(tmp) / "no-model", free_port(), free_port(),
                           ["engine.replicas=0", f"engine.external=http://127.0.0.1:{upstream_port}",
                            "gateway.pair_share=0", "gateway.rate_limit_per_s=0", "monitor.enabled=false"],
                           timeout=60)
            try:
                for pid in [server.proc.pid, *_threads(server.proc.pid)]:
                    os.sched_setaffinity(pid, gateway_cores)
                gateway_port = int(server.url.rsplit(":", 1)[1])
                rows = [measure(server.proc.pid, gateway_port, upstream_port, int(c), args.seconds, args.rounds)
                        for c in args.connections.split(",")]
                if args.pause_ms:
                    rows.append(measure(server.proc.pid, gateway_port, upstream_port, 1, args.seconds, args.rounds,
                                        args.pause_ms / 1000))
            finally:
                server.stop()
    finally:
        upstream.terminate()
        upstream.wait()
    text = report(rows, args.seconds, args.rounds)
    print(text)
    args.out.write_text(text)
    return 0


def _threads(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


if __name__ == "__main__":
    sys.exit(main())
