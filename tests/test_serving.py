"""The real thing: `alignloop serve` with the vLLM CPU engine on the tiny model, through the
official `openai` client and plain HTTP. One server for the whole module; the tests that break it
(engine crash, gateway SIGKILL) run last, in file order."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import openai
import pytest

from loop.vllm_server import group_members
from store import Store
from tests.serving import free_port, make_adapter, pid_alive, start

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "How often should I water basil?"}]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    # load tests; no monitor: versions here are random adapters answering 4 tokens, always cut off, and
    # it rolled one back mid-test (its own end-to-end test is tests/test_loop_e2e.py)
    s = start(root, tiny_model, free_port(), free_port(), ["gateway.pair_share=1.0", "gateway.log_flush_ms=100",
                                                               "gateway.rate_limit_per_s=0", "monitor.enabled=false"])
    yield s
    s.stop(signal.SIGKILL) if s.proc.poll() is None else None


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model, root / f"a{i}", seed=i) for i in range(2)]


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def exchanges(server, limit=1000):
    with server.client() as c:
        return c.get("/api/exchanges", params={"limit": limit}).json()


def test_openai_client_chat_stream_n_and_completions(server, oai):
    models = [m.id for m in oai.models.list()]
    assert models[0] == "alignloop" and "base" in models

    chat = oai.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=16, temperature=0.8)
    assert chat.model == "alignloop" and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens > 0

    two = oai.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=8, n=2, temperature=1.0)
    assert [c.index for c in two.choices] == [0, 1]

    pieces = []
    for chunk in oai.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=12, stream=True):
        assert chunk.model == "alignloop"
        pieces += [c.delta.content or "" for c in chunk.choices]
    streamed = "".join(pieces)

    text = oai.completions.create(model="base", prompt="Basil likes", max_tokens=8)
    assert text.choices[0].text is not None

    logged = {e["request_id"]: e for e in exchanges(server)}
    assert logged[chat.id]["texts"] == [chat.choices[0].message.content]
    assert logged[chat.id]["version_id"] == 0 and logged[chat.id]["model_requested"] == "alignloop"
    assert logged[chat.id]["completion_tokens"] == chat.usage.completion_tokens
    assert logged[two.id]["texts"] == [c.message.content for c in two.choices]
    assert logged[text.id]["endpoint"] == "completions"
    streamed_log = [e for e in logged.values() if e["texts"] == [streamed] and e["endpoint"] == "chat.completions"]
    assert streamed_log and streamed_log[0]["completion_tokens"] > 0


def test_every_answered_request_is_logged_with_its_version(server, oai):
    ids = set()
    for i in range(12):
        r = oai.chat.completions.create(model="alignloop", messages=[{"role": "user", "content": f"Tell me about mint {i}"}],
                                        max_tokens=6)
        ids.add(r.id)
    logged = {e["request_id"]: e for e in exchanges(server)}
    assert ids <= set(logged)
    assert all(logged[i]["version_id"] == 0 and json.loads(logged[i]["messages"])[0]["content"].startswith("Tell me")
               for i in ids)


def test_feedback_on_a_response(server, oai):
    r = oai.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=6)
    with server.client(token="") as anon:  # every thumb is a training example: anonymous ones are refused
        assert anon.post("/v1/feedback", json={"id": r.id, "thumbs": "up"}).status_code == 401
    with server.client() as admin:
        before = admin.get("/api/status").json()["counts"]["feedback"]
        keys = [admin.post("/api/users", json={"name": f"shop-{i}", "role": "app"}).json()["token"] for i in range(2)]
    with server.client(token=keys[0]) as c:
        ok = c.post("/v1/feedback", json={"id": r.id, "thumbs": "up", "comment": "nice"})
        assert ok.status_code == 200 and ok.json()["status"] == "recorded"
        assert c.post("/v1/feedback", json={"id": r.id, "score": 0.3}).status_code == 200  # replaces the thumb
        missing = c.post("/v1/feedback", json={"id": "chatcmpl-nope", "thumbs": "down"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        both = c.post("/v1/feedback", json={"id": r.id, "thumbs": "up", "score": 1})
        assert both.status_code == 400
        assert c.post("/v1/feedback", json={"id": r.id, "thumbs": "sideways"}).status_code == 400
    with server.client(token=keys[1]) as c:
        assert c.post("/v1/feedback", json={"id": r.id, "thumbs": "down"}).status_code == 200
    with server.client() as c:
        assert c.get("/api/status").json()["counts"]["feedback"] == before + 2  # one per caller


def test_the_llm_judge_asks_a_real_openai_compatible_server_in_both_orders(server):
    """The gate's LLM judge against a real server (the project's own engine, as an RLAIF judge would
    be served): every comparison is asked twice, the replies swapped, and whatever the tiny model
    answers (rarely a clean letter) the verdicts are well-formed and never promote on their own."""
    from loop.evaluation.gate import decide
    from loop.evaluation.judges import LLMJudge
    from loop.sections import GateConfig

    prompts = [[{"role": "user", "content": f"How often should I water basil, plant {i}?"}] for i in range(3)]
    cand, serv = [f"CANDIDATE reply {i}" for i in range(3)], [f"SERVING reply {i}" for i in range(3)]
    verdicts = LLMJudge(f"{server.url}/v1", "alignloop", timeout_s=60).verdicts(prompts, cand, serv)
    assert len(verdicts) == 3 and set(verdicts) <= {"a", "b", "tie", "invalid"}
    asked = []
    deadline = time.monotonic() + 10
    while len(asked) < 6 and time.monotonic() < deadline:  # the log is written in batches
        asked = [json.loads(e["messages"])[0]["content"] for e in exchanges(server, 50)
                 if "Reply A:" in (e["messages"] or "")]
        time.sleep(0.2)
    for i in range(3):
        mine = [q for q in asked if f"plant {i}?" in q]
        first = sorted(q.index(f"CANDIDATE reply {i}") < q.index(f"SERVING reply {i}") for q in mine)
        assert first == [False, True], mine  # once as A, once as B
    assert decide([verdicts * 10], 1.0, GateConfig()).outcome != "promote"


def test_a_judge_that_is_unreachable_or_answers_garbage_holds_the_candidate(server, adapters):
    """The gate through the real engine, with a judge that cannot be had: nothing is promoted or
    rejected, what serves is untouched, and the decision says why."""
    import dataclasses

    from loop.client import GatewayClient
    from loop.retrain import judge_candidate, settle
    from loop.sections import GateConfig

    client = GatewayClient(server.url, server.admin_token, timeout=300)
    before = client.call("GET", "/api/status")["serving"]
    version = client.call("POST", "/api/versions", json={"adapter_path": str(adapters[0]), "method": "dpo"})
    prompts = [[{"role": "user", "content": f"How often should I water basil, plant {i}?"}] for i in range(30)]
    judges = {"unreachable": f"http://127.0.0.1:{free_port()}/v1",
              "garbage": f"{server.url}/v1"}  # the tiny garden model asked to judge: not a letter
    for what, url in judges.items():
        gate = GateConfig(judge="llm", judge_url=url, judge_model="alignloop", judge_timeout_s=60, eval_samples=1,
                          max_tokens=8)
        decision = judge_candidate(dataclasses.replace(server.cfg, gate=gate), client, version["name"], "base",
                                   prompts, None, 1.0)
        settle(client, version, decision, "test")
        assert decision.outcome == "hold", (what, decision)
        assert ("ConnectError" in decision.reason) if what == "unreachable" else ("no usable verdict" in decision.reason)
        assert "what serves is untouched" in decision.reason
    versions = {v["id"]: v for v in client.call("GET", "/api/versions")}
    assert versions[version["id"]]["status"] == "candidate" and client.call("GET", "/api/status")["serving"] == before


def test_pairs_are_made_from_live_traffic(server, oai):
    for i in range(4):
        oai.chat.completions.create(model="alignloop", messages=[{"role": "user", "content": f"Pair me {i}"}],
                                    max_tokens=8, temperature=0.0)
    with server.client() as c:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = c.get("/api/status").json()
            if status["counts"]["pairs"] >= 3 and status["pair_queue"] == 0:
                break
            time.sleep(0.5)
    assert status["counts"]["pairs"] >= 3  # pair_share is 1; an identical second answer makes no pair


BAD_REQUESTS = [
    ("malformed JSON", b'{"model": "alignloop", "messages": [', 400),
    ("not an object", b'["alignloop"]', 400),
    ("missing messages", json.dumps({"model": "alignloop"}).encode(), 400),
    ("missing model", json.dumps({"messages": HELLO}).encode(), 400),
    ("unknown model", json.dumps({"model": "gpt-17", "messages": HELLO}).encode(), 404),
    ("content not a string", json.dumps({"model": "alignloop", "messages": [{"role": "user", "content": 7}]}).encode(), 400),
    ("unknown role", json.dumps({"model": "alignloop", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
    ("max_tokens a string", json.dumps({"model": "alignloop", "messages": HELLO, "max_tokens": "ten"}).encode(), 400),
    ("absurd max_tokens", json.dumps({"model": "alignloop", "messages": HELLO, "max_tokens": 10**9}).encode(), 400),
    ("negative max_tokens", json.dumps({"model": "alignloop", "messages": HELLO, "max_tokens": -1}).encode(), 400),
    ("n too large", json.dumps({"model": "alignloop", "messages": HELLO, "n": 1000}).encode(), 400),
    ("temperature out of range", json.dumps({"model": "alignloop", "messages": HELLO, "temperature": 9}).encode(), 400),
    ("prompt longer than the context",
     json.dumps({"model": "alignloop", "messages": [{"role": "user", "content": "basil " * 2000}]}).encode(), 400),
    ("empty messages", json.dumps({"model": "alignloop", "messages": []}).encode(), 400),
]


@pytest.mark.parametrize("what, body, status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_clear_4xx_in_openai_shape(server, what, body, status):
    with server.client(token="") as c:
        r = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["message"] and err["type"]
        assert c.get("/healthz").status_code == 200


def test_bad_completions_input(server):
    with server.client(token="") as c:
        assert c.post("/v1/completions", json={"model": "alignloop", "prompt": ""}).status_code == 400
        assert c.post("/v1/completions", json={"model": "alignloop", "prompt": ["a", 1]}).status_code == 400


def test_roles_and_tokens(server):
    with server.client(token="") as anon:
        assert anon.get("/api/status").status_code == 401
        assert anon.post("/api/promote", json={"version": "base"}).status_code == 401
    with server.client(token="not-a-token") as bad:
        assert bad.get("/api/me").status_code == 401
        # OpenAI clients always send a key: an unknown one is anonymous (gateway.require_api_key is off)
        assert bad.post("/v1/chat/completions", json={"model": "alignloop", "messages": HELLO,
                                                      "max_tokens": 2}).status_code == 200
    with server.client() as admin:
        made = admin.post("/api/users", json={"name": "lab", "role": "labeller"})
        assert made.status_code == 200
        again = admin.post("/api/users", json={"name": "lab", "role": "labeller"})
        assert (again.status_code, again.json()["error"]["code"]) == (409, "user_exists")  # callers tell it apart
    with server.client(token=made.json()["token"]) as labeller:
        assert labeller.get("/api/me").json()["role"] == "labeller"
        refused = labeller.post("/api/promote", json={"version": "base"})
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
        assert labeller.post("/api/users", json={"name": "x", "role": "admin"}).status_code == 403


def test_the_engine_answers_only_the_gateway(server):
    """No other local process (or web page) can answer through the engine or unload what serves."""
    engine = f"http://127.0.0.1:{server.cfg.engine.port}"
    assert httpx.get(f"{engine}/v1/models", timeout=10).status_code == 401
    unload = httpx.post(f"{engine}/v1/unload_lora_adapter", json={"lora_name": "anything"}, timeout=10)
    assert unload.status_code == 401
    answer = httpx.post(f"{engine}/v1/chat/completions", json={"model": "base", "messages": HELLO, "max_tokens": 2},
                        headers={"Authorization": "Bearer guess"}, timeout=10)
    assert answer.status_code == 401
    with server.client() as c:  # the gateway holds the key
        assert c.post("/v1/chat/completions", json={"model": "alignloop", "messages": HELLO,
                                                    "max_tokens": 2}).status_code == 200


def test_cli_goes_through_the_running_gateway(server):
    import subprocess
    import sys

    cli = [sys.executable, "-m", "loop.cli", "--config", str(server.root / "alignloop.toml")]
    status = subprocess.run(cli + ["status", "--json"], capture_output=True, text=True, check=True)
    with server.client() as admin:  # what serves depends on the tests that ran before: compare, don't assume
        serving = admin.get("/api/status").json()["serving"]
    assert json.loads(status.stdout)["serving"] == serving and json.loads(status.stdout)["gateway"] == server.url
    runs = json.loads(status.stdout)["last_runs"]
    shown = subprocess.run(cli + ["status"], capture_output=True, text=True, check=True).stdout
    assert (f"run: {runs[0]['id']} " if runs else "run: none yet") in shown
    added = subprocess.run(cli + ["user", "add", "ana", "--role", "labeller"], capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    assert "sign-in token" in added.stdout


def rollout_adapters(server) -> list[list[str]]:
    with server.client() as c:
        return [[a for a in r["adapters"] if a.startswith("rollout-")] for r in c.get("/api/status").json()["replicas"]]


def test_ppo_rollouts_on_the_engine_come_from_the_trainers_own_policy(server, tiny_model, adapters):
    """The engine samples with the policy the trainer holds: its log-probs of the sampled tokens
    match the trainer's own and not the base's; min = max tokens gives exact lengths; the adapter
    is loaded once per sync_steps steps, the older one unloaded, the last one unloaded at the end."""
    from loop.client import GatewayClient
    from loop.config import PPOConfig
    from loop.training import ppo
    from loop.training.engine_sampler import EngineSampler
    from loop.training.toolkit import load_policy

    model, tok = load_policy(tiny_model, adapters[0])  # random LoRA weights: far from the base
    head = ppo.value_head(model.config.hidden_size)
    folder = adapters[0].parent / "rollout-adapters"
    sampler = EngineSampler(GatewayClient(server.url, server.admin_token), folder, "t", sync_steps=2)
    prompts = [HELLO, [{"role": "user", "content": "What goes with tomatoes?"}]] * 4
    cfg = PPOConfig(max_new_tokens=12)
    sampler.sync(model, 1)
    assert sampler.failed is None and rollout_adapters(server) == [["rollout-t-1"]]
    r = ppo.rollout(model, head, tok, prompts, cfg, 7, sampler=sampler, step=1)
    assert sampler.steps == 1 and sampler.tokens == int(r["mask"].sum())
    base_gap = float(((r["ref_logprobs"] - r["logprobs"]).abs() * r["mask"]).sum() / r["mask"].sum())
    assert r["engine_logprob_gap"] < 0.05 and base_gap > 10 * r["engine_logprob_gap"], (r["engine_logprob_gap"], base_gap)
    sampler.sync(model, 2)  # sync_steps = 2: step 2 samples from step 1's adapter
    assert rollout_adapters(server) == [["rollout-t-1"]]
    exact = ppo.rollout(model, head, tok, prompts, cfg, 8, sampler=sampler, step=2, min_new_tokens=12)
    assert (exact["mask"].sum(dim=1) == 12).all() and not exact["has_eos"].any()
    sampler.sync(model, 3)
    assert rollout_adapters(server) == [["rollout-t-3"]] and not (folder / "rollout-t-1").exists()
    # a resumed run loads under a name its killed run used: the engine must take the new weights
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.mul_(-1.0)
    sampler.loaded = None
    sampler.sync(model, 3)
    again = ppo.rollout(model, head, tok, prompts, cfg, 9, sampler=sampler, step=3)
    assert again["engine_logprob_gap"] < 0.05, again["engine_logprob_gap"]
    with server.client() as c:  # what the engine refuses comes back as a 400 with its reason
        r = c.post("/api/rollouts", json={"adapter": "rollout-t-3", "prompts": [[10**6]]})
        assert r.status_code == 400 and "out of vocabulary" in r.json()["error"]["message"], r.text
    sampler.close()
    assert rollout_adapters(server) == [[]] and not folder.exists()


def test_ppo_through_the_engine_follows_the_policy_as_it_moves(server, tiny_model, tmp_path):
    """PPO steps with every rollout sampled on the engine (the adapter reloaded at every step): the
    engine's log-probs stay those of the trainer's policy while the policy moves away from where it
    started. (That a PPO cycle through the engine beats the base is tests/test_loop_e2e.py's.)"""
    from loop.client import GatewayClient
    from loop.config import PPOConfig, TrainConfig
    from loop.training import ppo
    from loop.training.engine_sampler import EngineSampler
    from tests.test_ppo import PROMPTS, ShareOfE

    client = GatewayClient(server.url, server.admin_token)
    cfg = PPOConfig(steps=6, rollout_batch=16, minibatch=8, max_new_tokens=16, learning_rate=3e-2, kl_coef=0.0,
                    missing_eos_penalty=0.0)
    metrics_path = tmp_path / "metrics.jsonl"
    metrics, _ = ppo.run(PROMPTS, ShareOfE(), tiny_model, None, cfg, TrainConfig(), metrics_path=metrics_path,
                         log=lambda m: None, sampler=lambda first: EngineSampler(client, tmp_path / "ra", "toy", 1, first))
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    assert metrics["rollouts_on"] == "engine" and metrics["rollout_engine_steps"] == 6, metrics
    gaps = [r["value"] for r in rows if r["name"] == "engine_logprob_gap"]
    kl = [r["value"] for r in rows if r["name"] == "kl"]
    print("engine/trainer log-prob gap per step", gaps, "KL to the start per step", kl)
    assert len(gaps) == 6 and max(gaps) < 0.05, gaps
    assert kl[-1] > 20 * max(gaps) * 16, kl  # moved: a stale adapter on the engine would show in the gap
    assert rollout_adapters(server) == [[]]


def test_ppo_in_two_processes_samples_every_rollout_on_the_engine_in_step(server, tiny_model, tmp_path):
    """`accelerate launch` with 2 processes (gloo), as `train.num_processes = 2` runs a PPO job: rank 0
    loads each step's adapter, both ranks sample their halves of the batch on the engine with it, and
    they stay in step. (That 2 processes learn as 1 does is tests/test_ppo.py's, with HF generate.)"""
    import torch

    from loop.training.engine_sampler import TOKEN_ENV
    from tests.test_ppo import ranks_run

    steps = 6
    result = ranks_run(tiny_model, tmp_path / "two", 2, "--steps", str(steps), "--gateway", server.url,
                       env={TOKEN_ENV: server.admin_token})
    assert result["world"] == 2 and result["rollouts_on"] == "engine", result
    assert result["rollout_engine_steps"] == steps and result["rollout_fallback"] is None, result
    a, b = torch.load(tmp_path / "two" / "weights-0.pt"), torch.load(tmp_path / "two" / "weights-1.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    # every answer of both ranks came from the engine: its tokens are all the tokens trained on
    # (32 answers a step between the two, of the mean length the processes logged)
    trained_on = sum(r["value"] for r in rows if r["name"] == "length") * 32
    assert result["rollout_engine_tokens"] == pytest.approx(trained_on), (result, trained_on)
    gaps = [r["value"] for r in rows if r["name"] == "engine_logprob_gap"]
    assert len(gaps) == steps and max(gaps) < 0.05, gaps  # both ranks sampled with the policy of the step
    assert rollout_adapters(server) == [[]] and not (tmp_path / "two" / "rollout-adapters").exists()


def test_the_rollout_api_refuses_bad_input_clearly(server, tmp_path):
    with server.client() as c:
        r = c.post("/api/rollouts", json={"adapter": "rollout-none", "prompts": [[1, 2]]})
        assert r.status_code == 404 and "POST /api/rollouts/adapters" in r.json()["error"]["message"]
        r = c.post("/api/rollouts/adapters", json={"name": "rollout-bad", "path": str(tmp_path / "missing")})
        assert r.status_code == 400 and "could not load" in r.json()["error"]["message"], r.text
        for body in ({"name": "v3-abcdef", "path": "/x"}, {"name": "rollout-x", "path": ""}):
            assert c.post("/api/rollouts/adapters", json=body).status_code in (400, 422)
        assert rollout_adapters(server) == [[]]
        assert c.delete("/api/rollouts/adapters/rollout-none").json()["replicas"] == []
        assert c.delete("/api/rollouts/adapters/v1-abcdef").status_code in (400, 404, 422)
        for bad in ({"prompts": []}, {"prompts": [[]]}, {"prompts": [[-1]]}, {"max_tokens": 0}, {"temperature": 0}):
            r = c.post("/api/rollouts", json={"adapter": "rollout-none", "prompts": [[1]], **bad})
            assert r.status_code in (400, 422), (bad, r.text)


def test_the_arena_answers_within_the_engines_context_and_marks_a_reply_cut_off(server):
    """The arena offered 1,024 tokens to a 256-token engine, which refused with vLLM's own text; and
    its pairs kept no finish reason, so a reply cut off at its limit was shown as a whole one."""
    with server.client() as admin:
        token = admin.post("/api/users", json={"name": "arena-ann", "role": "labeller"}).json()["token"]
    with server.client(token=token) as labeller:
        long = labeller.post("/api/arena", json={"prompt": "Tell me all about basil.", "max_tokens": 1024})
        assert long.status_code == 200, long.text
        short = labeller.post("/api/arena", json={"prompt": "And about mint?", "max_tokens": 4})
        assert short.status_code == 200, short.text
    pair = short.json()["pair"]  # answers of a sentence or more, stopped at 4 tokens: cut off (both ending by then: never seen)
    assert pair["first_cut_off"] or pair["second_cut_off"], pair


def test_a_candidate_that_is_not_loaded_is_refused_as_such_not_as_unknown(server, oai, adapters):
    """A new user asked for a held candidate by its name and read only 'does not exist'."""
    with server.client() as admin:
        candidate = admin.post("/api/versions", json={"adapter_path": str(adapters[0]), "method": "test"}).json()
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model=candidate["name"], messages=HELLO, max_tokens=4)
    assert e.value.code == "model_not_found"
    assert f"the version '{candidate['name']}' does not exist or is not loaded" in str(e.value), str(e.value)
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=4)
    assert "the model 'gpt-4o' does not exist;" in str(e.value)


def test_promote_and_rollback_under_load_lose_no_request(server, oai, adapters):
    with server.client() as admin:
        v1 = admin.post("/api/versions", json={"adapter_path": str(adapters[0]), "method": "test"}).json()
        v2 = admin.post("/api/versions", json={"adapter_path": str(adapters[1]), "method": "test"}).json()
        failures, done, versions_seen = [], [0], set()
        stop = threading.Event()

        def load():
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
            while not stop.is_set():
                try:
                    client.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=4)
                    done[0] += 1
                except Exception as e:  # every failure is a test failure
                    failures.append(repr(e))

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(1)
            timings = []
            for step in ({"version": v1["name"]}, {"version": v2["name"]}, None, {"version": v1["name"]}):
                r = admin.post("/api/promote", json=step) if step else admin.post("/api/rollback")
                assert r.status_code == 200, r.text
                timings.append(r.json()["seconds"])
                versions_seen.add(r.json()["serving"])
                time.sleep(1)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert failures == [] and done[0] > 10
        status = admin.get("/api/status").json()
        assert status["serving"] == v1["id"] and status["previous"] == v2["id"]
        served = {e["version_id"] for e in exchanges(server, 5000)}
        assert {0, v1["id"], v2["id"]} <= served
        # no bound on these seconds: time is measured in ops/bench/serving.py (results/serving.md), not
        # asserted in tests, where shared cores make it noise (a promote under this load took 4 s once)
        print(f"promotion seconds: {timings}")

        # the served alias answers from the promoted adapter (as logged: greedy text of this tiny model
        # differs with batch numerics while the load's last requests drain), and the version can be named
        alias = oai.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=4)
        named = oai.chat.completions.create(model=v1["name"], messages=HELLO, max_tokens=4)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            answered = {e["request_id"]: e["version_id"] for e in exchanges(server, 5000)}
            if {alias.id, named.id} <= set(answered):
                break
            time.sleep(0.2)
        assert answered.get(alias.id) == answered.get(named.id) == v1["id"]
        assert admin.post("/api/promote", json={"version": "v99"}).status_code == 400


def test_engine_crash_gives_503_then_recovers_with_the_promoted_adapter(server, oai, adapters):
    with server.client() as admin:
        # its own promoted version, whatever ran before
        version = admin.post("/api/versions", json={"adapter_path": str(adapters[0]), "method": "test"}).json()
        assert admin.post("/api/promote", json={"version": version["name"]}).status_code == 200
        before = admin.get("/api/status").json()
        assert before["serving"] == version["id"]
        pid = before["engine"]["pid"]
        import os

        old_group = group_members(pid)
        assert len(old_group) >= 2, old_group  # vLLM's API server and its engine core
        os.kill(pid, signal.SIGKILL)  # the API server alone, as the OOM killer would
        saw_503 = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "alignloop", "messages": HELLO,
                                                                    "max_tokens": 4}, timeout=30)
            if r.status_code == 503:
                saw_503 = saw_503 or r
            elif r.status_code == 200 and saw_503 is not None:
                break
            else:
                assert r.status_code in (200, 503), r.text
            time.sleep(0.5)
        assert saw_503 is not None and saw_503.headers["Retry-After"]
        assert saw_503.json()["error"]["code"] == "engine_unavailable"
        assert r.status_code == 200
        after = admin.get("/api/status").json()
        assert after["engine"]["restarts"] == 1 and after["engine"]["pid"] != pid
        # nothing of the old engine is left (its engine core would hold the memory the new one needs)
        assert not [p for p in old_group if pid_alive(p)], group_members(pid)
        assert after["serving"] == before["serving"]
        name = f"v{after['serving']}"
        assert name in after["models"]
        same = dict(messages=HELLO, max_tokens=12, temperature=0.0)
        assert (oai.chat.completions.create(model="alignloop", **same).choices[0].message.content
                == oai.chat.completions.create(model=name, **same).choices[0].message.content)


def test_an_idle_client_connection_is_kept_past_uvicorns_5_s(server):
    """A client that pauses between bursts reuses its pooled connection; were the gateway to close
    it after uvicorn's default 5 s, the next request could meet "Server disconnected"."""
    host, port = server.url.removeprefix("http://").split(":")
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    def response(sock: socket.socket) -> bytes:
        """One whole HTTP response (headers and body may come in separate reads)."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return data  # closed
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += sock.recv(4096)
        return head

    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        assert response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(7)
        sock.sendall(request)
        assert response(sock).startswith(b"HTTP/1.1 200"), "the gateway closed an idle connection after < 7 s"


def test_metrics_in_prometheus_format(server):
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("alignloop_requests_total", "alignloop_request_latency_seconds_bucket", "alignloop_tokens_total",
                 "alignloop_log_queue_depth", "alignloop_serving_version", "alignloop_engine_up 1.0"):
        assert name in text


def test_a_killed_gateway_loses_nothing_older_than_the_flush_window_and_leaves_no_orphan(server, oai):
    ids = [oai.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=4).id for _ in range(5)]
    with server.client() as admin:
        engine_pid = admin.get("/api/status").json()["engine"]["pid"]
    time.sleep(0.1 * 3)  # three flush windows (log_flush_ms = 100)
    server.stop(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while pid_alive(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not pid_alive(engine_pid), "the engine outlived its gateway"
    with Store(server.cfg.db_path) as store:
        logged = {e["request_id"] for e in store.exchanges(10_000)}
    assert set(ids) <= logged


def test_sigterm_to_the_whole_process_group_of_up_leaves_nothing_running(tiny_model, tmp_path):
    """As `timeout`, supervisord's killasgroup and container runtimes stop a service: SIGTERM to every
    process of its group at once (the gateway, the app and `up` itself; the engine has its own group).
    Then, while they stop, an impatient Ctrl-C (SIGINT to the group, which makes uvicorn skip the app's
    shutdown): nothing is left running, and every answer given is in the store all the same."""
    import os

    s = start(tmp_path, tiny_model, free_port(), free_port(), [f"labeling.app_port={free_port()}",
              "schedule.enabled=false", "gateway.log_flush_ms=600000"], command="up", new_session=True)
    engine = None
    try:
        deadline = time.monotonic() + 120
        while "alignloop is up" not in s.log() and time.monotonic() < deadline:
            time.sleep(0.5)
        with s.client() as admin:
            engine = admin.get("/api/status").json()["engine"]["pid"]
        ours = set(group_members(s.proc.pid))  # up, serve, the labelling app
        engines = set(group_members(engine))  # vLLM's API server and its engine core
        assert len(ours) >= 3 and len(engines) >= 2, (ours, engines)
        with httpx.Client(base_url=s.url, timeout=60) as c:  # answered, queued for the log, not yet written
            ids = [c.post("/v1/chat/completions", json={"model": "alignloop", "messages": HELLO, "max_tokens": 4})
                   .json()["id"] for _ in range(3)]
        os.killpg(s.proc.pid, signal.SIGTERM)
        time.sleep(0.05)  # within the gateway's shutdown
        os.killpg(s.proc.pid, signal.SIGINT)
        s.proc.wait(60)
        deadline = time.monotonic() + 60
        while [p for p in ours | engines if pid_alive(p)] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [p for p in ours | engines if pid_alive(p)], s.log()[-3000:]
        assert "the engines are stopped and the store closed" in s.log()  # by the gateway, not by luck
        assert "alignloop up: stopped" in s.log(), s.log()[-3000:]
        with Store(s.cfg.db_path) as store:
            assert set(ids) <= {e["request_id"] for e in store.exchanges(100)}
    finally:  # whatever the outcome, nothing of it outlives the test
        for group in (s.proc.pid, engine):
            if group is not None and group_members(group):
                os.killpg(group, signal.SIGKILL)
