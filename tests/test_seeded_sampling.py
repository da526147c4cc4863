"""Seeded sampling under load must not crash the vLLM CPU engine.

vLLM's model runner rewinds the per-request `torch.Generator` of a request whose prompt was only
partly prefilled in a step (`gen.set_offset(gen.get_offset() - 4)` in
`GPUModelRunner._bookkeeping_sync`). A request has its own generator only when it carries a `seed`,
and on CPU that generator has no offset: `RuntimeError: CPU Generator does not use offset` kills
the engine core, every request in flight gets a 503 and the supervisor restarts the engine. A
prompt is split over steps only with chunked prefill, when the waiting prompts outgrow the step's
token budget (max_num_batched_tokens), as 64 concurrent multi-turn prompts do. The engine runs
with chunked prefill off, so a prompt is prefilled in one step or waits for the next.
"""

from __future__ import annotations

import json
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serving import free_port, start

pytestmark = pytest.mark.slow

CONCURRENCY = 64
MAX_TOKENS = 24


def multi_turn_prompts(hh_sample) -> list[list[dict[str, str]]]:
    """The sample's multi-turn HH conversations as chat messages, up to the last user turn."""
    prompts = []
    for line in hh_sample.read_text().splitlines():
        parts = re.split(r"\n\n(Human|Assistant): ", json.loads(line)["chosen"])[1:]
        turns = [{"role": "user" if role == "Human" else "assistant", "content": text.strip()}
                 for role, text in zip(parts[::2], parts[1::2])]
        if len(turns) >= 4:  # user, assistant, user, (the reply, dropped)
            prompts.append(turns[:-1])
    assert len(prompts) >= 4, "the HH sample should hold several multi-turn conversations"
    return prompts


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("seeded")
    # only the test's own requests reach the engine; 64 at once from one address is the point here
    settings = ["gateway.pair_share=0.0", "gateway.rate_limit_per_s=0"]
    s = start(root, tiny_model, free_port(), free_port(), settings)
    yield s
    s.stop(signal.SIGKILL) if s.proc.poll() is None else None


def test_concurrent_seeded_multi_turn_chats_do_not_crash_the_engine(server, hh_sample):
    prompts = multi_turn_prompts(hh_sample)
    # 64 callers, each with its own system prompt: without it the 8 conversations would repeat and
    # prefix caching would leave next to nothing to prefill (and the crash would be down to luck).
    bodies = [{"model": "alignloop", "seed": 1000 + i, "temperature": 1.0, "max_tokens": MAX_TOKENS,
               "messages": [{"role": "system", "content": f"You are assistant number {i}."},
                            *prompts[i % len(prompts)]]}
              for i in range(CONCURRENCY)]

    def ask(body):
        try:
            r = client.post("/v1/chat/completions", json=body)
            return r.status_code, r.text[:200]
        except httpx.HTTPError as e:
            return None, repr(e)

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    with httpx.Client(base_url=server.url, timeout=120.0, limits=limits) as client, \
            ThreadPoolExecutor(CONCURRENCY) as pool:
        t0 = time.monotonic()
        results = list(pool.map(ask, bodies))
        elapsed = time.monotonic() - t0

    failed = [(i, code, text) for i, (code, text) in enumerate(results) if code != 200]
    with server.client() as admin:
        engine = admin.get("/api/status").json()["engine"]
    log = (server.cfg.data_dir / "logs" / "engine.log").read_text(errors="replace")
    assert not failed, (f"{len(failed)} of {CONCURRENCY} seeded requests failed in {elapsed:.1f} s; "
                        f"'CPU Generator does not use offset' in the engine log: {'does not use offset' in log}; "
                        f"engine {engine}; first: {failed[0]}")
    assert engine["restarts"] == 0, f"the engine restarted: {engine}"
    assert "does not use offset" not in log

    # Same seed, same prompt, same answer: the seed still does what clients expect.
    with server.client() as c:
        again = [c.post("/v1/chat/completions", json=bodies[0]) for _ in range(2)]
    assert [r.status_code for r in again] == [200, 200]
    assert again[0].json()["choices"][0]["message"]["content"] == again[1].json()["choices"][0]["message"]["content"]


def test_the_gates_seeded_evaluation_of_hh_prompts_completes(server, hh_sample):
    """What a retrain on imported HH pairs does at evaluation: every held-out prompt answered with a
    seed (`/api/generate`), many at once, behind live traffic."""
    prompts = multi_turn_prompts(hh_sample)
    batch = [[{"role": "system", "content": f"Evaluation {i}."}, *prompts[i % len(prompts)]] for i in range(CONCURRENCY)]
    with server.client(timeout=300) as admin:
        r = admin.post("/api/generate", json={"model": "base", "prompts": batch, "max_tokens": MAX_TOKENS,
                                              "temperature": 1.0, "seed": 7})
        assert r.status_code == 200, r.text
        assert len(r.json()["answers"]) == CONCURRENCY
        assert admin.get("/api/status").json()["engine"]["restarts"] == 0
