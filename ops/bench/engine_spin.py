"""Does an idle vLLM engine (CPU build) take the cores a trainer needs, right after a request?

Starts the engine as a PPO run's own rollout engine is started (`loop.vllm_server.command`,
no LoRA), and times a small torch workload (a 64x64 matmul loop, on this process's torch threads,
as a trainer's optimiser step runs) alone, with the engine idle for seconds, and right after each
of its rollout-sized requests; and the engine's tokens/s on those requests. `--waits 0,0.02`
repeats it with vLLM's worker-side busy-wait (`SpinCondition.busy_loop_s`, 1 s, not configurable)
cut to those seconds: an experiment only, by a `sitecustomize` put on the engine's PYTHONPATH that
changes the default when vLLM's module is imported. alignloop does not ship that patch.

    .venv/bin/python ops/bench/engine_spin.py [--waits 0,0.02] [--prompts 32,128]

Results: ops/bench/results/rollouts.md ("Faster rollouts, a slower run: why").
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "ops" / "bench"))

PATCH = '''import importlib.abc, importlib.machinery, os, sys
NAME = "vllm.distributed.device_communicators.shm_broadcast"
class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != NAME:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            defaults = list(module.SpinCondition.__init__.__defaults__)
            defaults[-1] = float(os.environ["BENCH_BUSY_LOOP_S"])
            module.SpinCondition.__init__.__defaults__ = tuple(defaults)
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, Finder())
'''


def workload() -> float:
    import torch

    x = torch.randn(64, 64)
    t = time.perf_counter()
    for _ in range(2000):
        x @ x
    return time.perf_counter() - t


def measure(model: Path, prompts: list[list[int]], sizes: list[int], wait_s: float | None, work: Path) -> dict:
    import httpx

    from loop.config import EngineConfig
    from loop import vllm_server as engine
    from loop.training.rollout_engine import free_port

    cfg = EngineConfig(port=free_port())
    env = engine.environment(cfg, "bench")
    env.pop("VLLM_API_KEY")
    if wait_s is not None:
        (work / "sitecustomize.py").write_text(PATCH, encoding="utf-8")
        env.update(PYTHONPATH=str(work), BENCH_BUSY_LOOP_S=str(wait_s))
    log = (work / f"engine-{wait_s}.log").open("wb")
    proc = subprocess.Popen(engine.command(model, cfg, "policy", cfg.port, lora=False), env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{cfg.port}"
    try:
        with httpx.Client(base_url=url, timeout=600) as c:
            for _ in range(600):
                try:
                    if c.get("/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)

            def body(n: int, tokens: int = 48) -> dict:
                return {"model": "policy", "prompt": prompts[:n], "max_tokens": tokens, "min_tokens": tokens,
                        "temperature": 1.0, "top_p": 1.0, "top_k": 0, "return_token_ids": True, "logprobs": 0}

            c.post("/v1/completions", json=body(8, 4)).raise_for_status()  # warm-up
            time.sleep(3)
            idle = statistics.median(workload() for _ in range(3))
            after, tok_s = [], {}
            for n in sizes:
                rates = []
                for _ in range(3):
                    t = time.perf_counter()
                    c.post("/v1/completions", json=body(n)).raise_for_status()
                    rates.append(n * 48 / (time.perf_counter() - t))
                    after.append(workload())
                tok_s[n] = statistics.median(rates)
        return {"wait_s": wait_s, "idle": idle, "after": statistics.median(after), "tok_s": tok_s}
    finally:
        engine.signal_group(proc.pid, 15)
        proc.wait(60)
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--waits", default="0,0.02", help="busy-wait seconds to try besides vLLM's own (1 s)")
    ap.add_argument("--prompts", default="32,128")
    args = ap.parse_args()
    from loop import config as configuration
    from rollouts import encode, policy

    model = args.model
    if model is None:
        from loop.cli import ensure_demo_model

        model = ensure_demo_model(configuration.load())
    sizes = [int(n) for n in args.prompts.split(",")]
    _, tok = policy(model)
    enc = encode(tok, max(sizes))
    prompts = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    alone = statistics.median(workload() for _ in range(3))
    print(f"workload alone: {alone:.3f} s")
    with tempfile.TemporaryDirectory() as tmp:
        for wait in [None, *(float(w) for w in args.waits.split(",") if w.strip())]:
            r = measure(model, prompts, sizes, wait, Path(tmp))
            rates = ", ".join(f"{n} prompts {v:.0f} tok/s" for n, v in r["tok_s"].items())
            print(f"busy-wait {'1 s (vLLM)' if wait is None else f'{wait} s (patched)'}: workload with the engine idle "
                  f"{r['idle']:.3f} s, right after a request {r['after']:.3f} s; {rates}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
