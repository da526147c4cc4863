"""Serving benchmarks, side by side in one run (ratios, not absolute times: machines are noisy).

1. Gateway overhead: the same vLLM engine hit directly and through the gateway, interleaved, at
   1, 8 and 32 concurrent clients: added p50/p99 latency and the throughput ratio.
2. Engine vs plain transformers `generate` on the same model and prompts: throughput ratio.
3. Promotion: time from `POST /api/promote` to the first answer from the new version, with one
   engine and again with two local replicas (`engine.replicas = 2`: the adapter loads on both).

    .venv/bin/python ops/bench/serving.py [--model DIR] [--seconds 8] [--out ops/bench/results/serving.md]

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
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.serving import free_port, free_ports, make_adapter, start  # noqa: E402

# The engine's API key, chosen here so the bench can call the engine directly beside the gateway
# (the gateway sends it to the engine; sent to the gateway it is an unknown key: anonymous).
ENGINE_KEY = secrets.token_urlsafe(16)
AUTH = {"Authorization": f"Bearer {ENGINE_KEY}"}

PROMPTS = [f"How often should I water {p}?" for p in ("basil", "tomatoes", "mint", "roses", "carrots", "lettuce",
                                                     "parsley", "peppers")]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def load(url: str, model: str, clients: int, seconds: float, max_tokens: int) -> tuple[list[float], float]:
    """`clients` loops sending chat requests for `seconds`; returns latencies (s) and requests/s."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients),
                                 headers=AUTH) as http:
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


def gateway_overhead(gateway: str, engine: str, seconds: float, rounds: int = 2) -> list[dict]:
    rows = []
    for clients in (1, 8, 32):
        direct, through, rps_d, rps_g = [], [], [], []
        for _ in range(rounds):  # interleaved, so drift in machine load hits both sides alike
            lat, rps = asyncio.run(load(engine, "base", clients, seconds, max_tokens=4))
            direct += lat
            rps_d.append(rps)
            lat, rps = asyncio.run(load(gateway, "alignloop", clients, seconds, max_tokens=4))
            through += lat
            rps_g.append(rps)
        rows.append({"clients": clients, "requests": len(direct) + len(through),
                     "direct_p50_ms": pct(direct, 0.5) * 1000, "gateway_p50_ms": pct(through, 0.5) * 1000,
                     "added_p50_ms": (pct(through, 0.5) - pct(direct, 0.5)) * 1000,
                     "added_p99_ms": (pct(through, 0.99) - pct(direct, 0.99)) * 1000,
                     "throughput_ratio": statistics.mean(rps_g) / statistics.mean(rps_d)})
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


def report(rows: list[dict], vs: dict, promo: dict, promo2: dict, model_dir: Path, seconds: float) -> str:
    lines = [
        "# Serving benchmarks", "",
        f"Command: `.venv/bin/python ops/bench/serving.py --seconds {seconds:g}`  ",
        f"Model: `{model_dir}`; machine: {platform.machine()}, {__import__('os').cpu_count()} CPUs, "
        "vLLM CPU build. Client, gateway and engine share the same cores, so absolute times are noisy; "
        "each row compares both sides in the same run, interleaved.", "",
        "## Gateway overhead (chat, max_tokens 4, temperature 0)", "",
        "| clients | requests | direct p50 ms | gateway p50 ms | added p50 ms | added p99 ms | throughput ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['direct_p50_ms']:.1f} | {r['gateway_p50_ms']:.1f} | "
                     f"{r['added_p50_ms']:.2f} | {r['added_p99_ms']:.2f} | {r['throughput_ratio']:.3f} |")
    lines += ["", "Goal: ≤ 1 ms added at p50 and ≥ 0.95 of direct throughput.", "",
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
            rows = gateway_overhead(server.url, engine, args.seconds)
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
    text = report(rows, vs, promo, promo2, model, args.seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
