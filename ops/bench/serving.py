"""Serving benchmarks, side by side in one run (ratios, not absolute times: machines are noisy).

1. Gateway overhead: the same vLLM engine hit directly, through the gateway and through LiteLLM's
   proxy, interleaved, at 1, 8 and 32 concurrent clients: added p50/p99 latency, the throughput
   ratio, and CPU per request of each front process (vLLM's own API server process, the gateway,
   LiteLLM's proxy), read from /proc; then one client sending one request to each in turn, for the
   added latency at p50. LiteLLM's proxy runs from .venv-litellm (`bash ops/bench/litellm.sh` makes
   it); without it that column is left out.
2. Engine vs plain transformers `generate` on the same model and prompts: throughput ratio.
3. Promotion: time from `POST /api/promote` to the first answer from the new version, with one
   engine and again with two local replicas (`engine.replicas = 2`: the adapter loads on both).

    .venv/bin/python ops/bench/serving.py [--model DIR] [--seconds 8] [--alternating 400] [--out ops/bench/results/serving.md]

With no --model it uses the demo model under ./alignloop-data (building it if needed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import signal
import statistics
import sys
import tempfile
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.serving import free_port, free_ports, make_adapter, start  # noqa: E402

# The engine's API key, chosen here so the bench can call the engine directly beside the gateway
# (the gateway sends it to the engine; sent to the gateway it is an unknown key: anonymous).
ENGINE_KEY = secrets.token_urlsafe(16)
AUTH = {"Authorization": f"Bearer {ENGINE_KEY}"}
LITELLM_KEY = "sk-" + secrets.token_hex(32)

PROMPTS = [f"How often should I water {p}?" for p in ("basil", "tomatoes", "mint", "roses", "carrots", "lettuce",
                                                     "parsley", "peppers")]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def load(url: str, model: str, clients: int, seconds: float, max_tokens: int,
               headers: dict | None = None) -> tuple[list[float], float]:
    """`clients` loops sending chat requests for `seconds`; returns latencies (s) and requests/s."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients),
                                 headers=headers or AUTH) as http:
        async def client(i: int) -> None:
            n = 0
            while time.perf_counter() < deadline:
                body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0,
                        "messages": [{"role": "user", "content": PROMPTS[(i + n) % len(PROMPTS)]}]}
                t = time.perf_counter()
                r = await http.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                latencies.append(time.perf_counter() - t)
                n += 1

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
    return latencies, len(latencies) / elapsed


@dataclass
class Front:
    """One way to reach the engine: its URL, the model name it takes, and the process doing the work."""
    name: str
    url: str
    model: str
    pid: int
    headers: dict | None = None


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError):
            pass
    return out


def engine_api_pid(gateway_pid: int) -> int:
    """vLLM's API server: the child of `alignloop serve` that runs vllm (its EngineCore is its own child)."""
    for pid in children(gateway_pid):
        if b"vllm" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise RuntimeError("no vLLM API server process under the gateway")


def start_litellm(engine: str, port: int, work: Path) -> subprocess.Popen | None:
    """LiteLLM's proxy in front of the same engine, or None when .venv-litellm is not there."""
    exe = REPO / ".venv-litellm/bin/litellm"
    if not exe.exists():
        return None
    config = work / "litellm.yaml"
    config.write_text(f"model_list:\n  - model_name: base\n    litellm_params:\n      model: hosted_vllm/base\n"
                      f"      api_base: {engine}/v1\n      api_key: {ENGINE_KEY}\n")
    env = {**os.environ, "LITELLM_MASTER_KEY": LITELLM_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "LITELLM_LOG": "ERROR"}
    proc = subprocess.Popen([str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=work, stdout=(work / "litellm.log").open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"LiteLLM's proxy did not start:\n{(work / 'litellm.log').read_text()[-2000:]}")


async def alternating(fronts: list[Front], requests: int, max_tokens: int = 4) -> dict[str, dict[str, float]]:
    """One client, one request to each front in turn, `requests` times: the fairest latency
    comparison on a noisy machine, as every drift in load hits each front within milliseconds.
    Returns each front's p50 and the median of its paired difference from the first front."""
    lat: dict[str, list[float]] = {f.name: [] for f in fronts}
    clients = [httpx.AsyncClient(base_url=f.url, timeout=120, headers=f.headers or AUTH) for f in fronts]
    try:
        for n in range(requests + 20):  # the first 20 rounds warm connections up and are not counted
            for f, http in zip(fronts, clients):
                body = {"model": f.model, "max_tokens": max_tokens, "temperature": 0.0,
                        "messages": [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}]}
                t = time.perf_counter()
                (await http.post("/v1/chat/completions", json=body)).raise_for_status()
                if n >= 20:
                    lat[f.name].append(time.perf_counter() - t)
    finally:
        for http in clients:
            await http.aclose()
    base = lat[fronts[0].name]
    return {f.name: {"p50_ms": statistics.median(lat[f.name]) * 1000,
                     "paired_added_ms": statistics.median(a - b for a, b in zip(lat[f.name], base)) * 1000}
            for f in fronts}


def overhead(fronts: list[Front], seconds: float, rounds: int = 2) -> list[dict]:
    """Each front in turn (the first is the engine hit directly), interleaved `rounds` times, at
    1, 8 and 32 clients: latency percentiles, requests/s and the front process's CPU per request."""
    rows = []
    for clients in (1, 8, 32):
        lat: dict[str, list[float]] = {f.name: [] for f in fronts}
        rps: dict[str, list[float]] = {f.name: [] for f in fronts}
        cpu: dict[str, list[float]] = {f.name: [] for f in fronts}
        for _ in range(rounds):  # interleaved, so drift in machine load hits every side alike
            for f in fronts:
                before = cpu_s(f.pid)
                got, r = asyncio.run(load(f.url, f.model, clients, seconds, max_tokens=4, headers=f.headers))
                cpu[f.name].append((cpu_s(f.pid) - before) / len(got) * 1000)
                lat[f.name] += got
                rps[f.name].append(r)
        direct = fronts[0].name
        row = {"clients": clients, "requests": sum(len(v) for v in lat.values())}
        for f in fronts:
            row[f.name] = {"p50_ms": pct(lat[f.name], 0.5) * 1000,
                           "added_p50_ms": (pct(lat[f.name], 0.5) - pct(lat[direct], 0.5)) * 1000,
                           "added_p99_ms": (pct(lat[f.name], 0.99) - pct(lat[direct], 0.99)) * 1000,
                           "throughput_ratio": statistics.mean(rps[f.name]) / statistics.mean(rps[direct]),
                           "cpu_ms": statistics.median(cpu[f.name])}
        rows.append(row)
    return rows


def engine_vs_transformers(engine: str, model_dir: Path, max_tokens: int = 32, n: int = 32) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]

    async def via_engine() -> tuple[float, int]:
        async with httpx.AsyncClient(base_url=engine, timeout=300, headers=AUTH) as http:
            t = time.perf_counter()
            rs = await asyncio.gather(*(http.post("/v1/chat/completions", json={
                "model": "base", "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                "messages": [{"role": "user", "content": p}]}) for p in prompts))
            elapsed = time.perf_counter() - t
        return elapsed, sum(r.json()["usage"]["completion_tokens"] for r in rs)

    engine_s, engine_tokens = asyncio.run(via_engine())
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    hf_s = time.perf_counter() - t
    hf_tokens = (out.shape[1] - batch["input_ids"].shape[1]) * n
    return {"prompts": n, "max_tokens": max_tokens, "engine_tokens_per_s": engine_tokens / engine_s,
            "transformers_tokens_per_s": hf_tokens / hf_s,
            "ratio": (engine_tokens / engine_s) / (hf_tokens / hf_s)}


def promotion(gateway: str, token: str, model_dir: Path, work: Path, times: int = 6) -> dict:
    adapters = [make_adapter(model_dir, work / f"adapter{i}", seed=i) for i in range(2)]
    admin = httpx.Client(base_url=gateway, headers={"Authorization": f"Bearer {token}"}, timeout=120)
    names = [admin.post("/api/versions", json={"adapter_path": str(a), "method": "bench"}).json() for a in adapters]
    promote_s, first_answer_s = [], []
    for i in range(times):
        v = names[i % 2]
        t = time.perf_counter()
        r = admin.post("/api/promote", json={"version": v["name"]})
        r.raise_for_status()
        promote_s.append(time.perf_counter() - t)
        answer = admin.post("/v1/chat/completions", json={"model": "alignloop", "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": PROMPTS[0]}]})
        answer.raise_for_status()
        first_answer_s.append(time.perf_counter() - t)
        served = [e for e in admin.get("/api/exchanges", params={"limit": 1}).json()]
        assert served[0]["version_id"] == v["id"], "the answer did not come from the promoted version"
    admin.close()
    return {"promotions": times, "promote_call_median_s": statistics.median(promote_s),
            "to_first_answer_median_s": statistics.median(first_answer_s), "to_first_answer_max_s": max(first_answer_s)}


def wait_for_replicas(server, n: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    with server.client() as admin:
        while admin.get("/api/status").json()["engine"]["replicas_ready"] < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} replicas were not ready in {timeout:.0f} s")
            time.sleep(1)


def report(rows: list[dict], alt: dict, vs: dict, promo: dict, promo2: dict, model_dir: Path, seconds: float,
           requests: int) -> str:
    proxies = [name for name in rows[0] if isinstance(rows[0][name], dict) and name != "direct"]
    lines = [
        "# Serving benchmarks", "",
        f"Command: `.venv/bin/python ops/bench/serving.py --seconds {seconds:g} --alternating {requests}`  ",
        f"Model: `{model_dir}`; machine: {platform.machine()}, {__import__('os').cpu_count()} CPUs, "
        "vLLM CPU build. Client, gateway and engine share the same cores, so absolute times are noisy; "
        "each row compares both sides in the same run, interleaved.", "",
        "## Gateway overhead (chat, max_tokens 4, temperature 0)", "",
        "Latency added over the engine hit directly, and throughput as a share of direct:", "",
        "| clients | requests | direct p50 ms | " + " | ".join(
            f"{f} added p50 ms | {f} added p99 ms | {f} throughput ratio" for f in proxies) + " |",
        "|---:|---:|---:|" + "---:|" * (3 * len(proxies)),
    ]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['direct']['p50_ms']:.1f} | " + " | ".join(
            f"{r[f]['added_p50_ms']:.2f} | {r[f]['added_p99_ms']:.2f} | {r[f]['throughput_ratio']:.3f}"
            for f in proxies) + " |")
    lines += ["", f"One client, one request to each front in turn, {requests} times (every drift in machine load hits "
              "each front within milliseconds): direct p50 " + f"{alt['direct']['p50_ms']:.2f} ms; " + "; ".join(
                  f"{f} p50 {alt[f]['p50_ms']:.2f} ms, added {alt[f]['p50_ms'] - alt['direct']['p50_ms']:+.2f} ms "
                  f"(median of paired differences {alt[f]['paired_added_ms']:+.2f} ms)" for f in proxies) + "."]
    lines += ["", "CPU per request of each front process on the same engine (median of the rounds; vLLM's API "
              "server while hit directly: the process in front of its EngineCore, which it would be without "
              "any gateway):", "",
              "| clients | vLLM API server ms | " + " | ".join(f"{f} ms | {f} / vLLM API server" for f in proxies)
              + " |", "|---:|---:|" + "---:|" * (2 * len(proxies))]
    for r in rows:
        api = r["direct"]["cpu_ms"]
        lines.append(f"| {r['clients']} | {api:.2f} | " + " | ".join(
            f"{r[f]['cpu_ms']:.2f} | {r[f]['cpu_ms'] / api:.2f}" for f in proxies) + " |")
    if "LiteLLM" not in proxies:
        lines += ["", "LiteLLM's proxy: not measured (no .venv-litellm; `bash ops/bench/litellm.sh` makes it)."]
    lines += ["", "Goal: the gateway adds ≤ 1 ms at p50 at one client and spends ≤ 0.5 ms of CPU per request. At "
              "the few tens of requests a second this engine serves on 2 shared cores, the gateway's CPU per "
              "request also carries costs that come per second, not per request (the log writer's batch every "
              "`gateway.log_flush_ms`, the monitor's check), and every request finds caches cold after the "
              "engine ran; the hot path's own cost at a high rate is measured in isolation, in front of a fake "
              "upstream, in `ops/bench/results/gateway.md`.", "",
              "## Engine vs transformers `generate`", "",
              f"{vs['prompts']} prompts, {vs['max_tokens']} new tokens each, greedy: vLLM (concurrent requests) "
              f"{vs['engine_tokens_per_s']:.0f} tokens/s, transformers (one padded batch) "
              f"{vs['transformers_tokens_per_s']:.0f} tokens/s: ratio **{vs['ratio']:.2f}**.", "",
              "## Promotion", "",
              f"{promo['promotions']} promotions alternating two adapters: the promote call takes "
              f"{promo['promote_call_median_s'] * 1000:.0f} ms (median); promote to the first answer from the new "
              f"version {promo['to_first_answer_median_s'] * 1000:.0f} ms (median), "
              f"{promo['to_first_answer_max_s'] * 1000:.0f} ms (max). Goal: under 2 s.", "",
              "## Promotion across two replicas", "",
              f"The same with `engine.replicas = 2` (each replica on its own core): the promote call takes "
              f"{promo2['promote_call_median_s'] * 1000:.0f} ms (median); promote to the first answer "
              f"{promo2['to_first_answer_median_s'] * 1000:.0f} ms (median), "
              f"{promo2['to_first_answer_max_s'] * 1000:.0f} ms (max). Goal: ≤ 200 ms.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model directory (default: the demo model)")
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds per load run")
    ap.add_argument("--alternating", type=int, default=400, help="requests to each front, one client, in turn")
    ap.add_argument("--out", type=Path, default=REPO / "ops/bench/results/serving.md")
    args = ap.parse_args(argv)
    model = args.model
    if model is None:
        from loop import config as configuration
        from loop.cli import ensure_demo_model

        model = ensure_demo_model(configuration.load())
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ALIGNLOOP_ENGINE_KEY"] = ENGINE_KEY  # the server started next inherits it
        server = start(Path(tmp) / "serve", model, free_port(), free_port(),
                       ["gateway.pair_share=0.0", "gateway.rate_limit_per_s=0"])
        try:
            engine = f"http://127.0.0.1:{server.cfg.engine.port}"
            litellm = start_litellm(engine, free_port(), Path(tmp))
            fronts = [Front("direct", engine, "base", engine_api_pid(server.proc.pid)),
                      Front("gateway", server.url, "alignloop", server.proc.pid)]
            if litellm is not None:
                fronts.append(Front("LiteLLM", f"http://127.0.0.1:{litellm.args[-1]}", "base", litellm.pid,
                                    {"Authorization": f"Bearer {LITELLM_KEY}"}))
            try:
                rows = overhead(fronts, args.seconds)
                alt = asyncio.run(alternating(fronts, args.alternating))
            finally:
                if litellm is not None:
                    litellm.terminate()
                    litellm.wait(30)
            vs = engine_vs_transformers(engine, model)
            promo = promotion(server.url, server.admin_token, model, Path(tmp))
        finally:
            server.stop(signal.SIGTERM)
        server = start(Path(tmp) / "serve2", model, free_port(), free_ports(2),
                       ["gateway.pair_share=0.0", "gateway.rate_limit_per_s=0", "engine.replicas=2"])
        try:
            wait_for_replicas(server, 2)
            promo2 = promotion(server.url, server.admin_token, model, Path(tmp) / "two")
        finally:
            server.stop(signal.SIGTERM)
    text = report(rows, alt, vs, promo, promo2, model, args.seconds, args.alternating)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
