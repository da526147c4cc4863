"""The whole loop on CPU, as an operator runs it: `alignloop up` on the demo model, simulated
users and labellers through the HTTP API, `alignloop retrain` with DPO, the gate, promotion; then
from the base again on the same data, a PPO cycle (reward model refreshed on the labels) and a KTO
cycle (on the simulated users' thumbs).
The gate judges with what a real deployment has (the reward model refreshed on the labels each
cycle); the demo rule only stands for the simulated people: it labels in `simulate` and grades the
result here. Then the failure cases: a candidate trained on labels flipped against the people,
gated by a system whose judge learned from true labels (it must reject), a trainer killed mid-run
(serving untouched, the run failed, the next run fine), two triggers at once (one run).
Last, the same loop on a second base model shaped like the Hugging Face chat models users bring
(`loop.demo.qwen`: a tiny Qwen2 in Qwen2.5-Instruct's layout), given as `model.base`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time

import httpx
import pytest

from loop.client import GatewayClient
from loop.demo import continual

from tests.serving import free_port, pid_alive, start

pytestmark = pytest.mark.slow

PAIRS = 400  # pairs of live traffic to label; about a third are ties for the judge and left out


def judged_win_rate(server, candidate: str, base: str, seeds=(0, 1)) -> float:
    """The demo judge's win rate of `candidate` over `base` on the demo domain's held-out prompts,
    sampled at temperature 1 (what a client gets by default), ties counting half."""
    client = GatewayClient.for_config(server.cfg, timeout=600)
    try:
        return continual.win_rate(client, candidate, base, {}, seeds=[1000 * s for s in seeds])[0]
    finally:
        client.close()


@pytest.fixture(scope="module")
def up(tmp_path_factory, demo_model):
    root = tmp_path_factory.mktemp("up")
    # the session's demo model where `up` looks for it (it checks the build and does not rebuild it)
    shutil.copytree(demo_model, root / "alignloop-data" / "models" / "demo")
    # a fifth of the pairs held out: the gate's reward model is measured on ~50 of them (on ~25, with
    # a tenth, its accuracy's standard error was ~0.09, and a sound judge once measured 0.609 < 0.65)
    s = start(root, None, free_port(), free_port(), [f"labeling.app_port={free_port()}", "gateway.pair_share=1.0",
                                                     "store.heldout_share=0.2"], timeout=900, command="up")
    yield s
    s.stop(signal.SIGTERM, timeout=180)  # not SIGINT: a shell that starts the suite in the background makes children ignore it


@pytest.fixture(scope="module")
def simulated(up) -> float:
    """The data every cycle below trains on, made once by whichever test asks first (so no test needs
    another to have run before it): PAIRS pairs of live traffic labelled by 4 scripted labellers, and
    the simulated users' thumbs. Returns the seconds it took."""
    started = time.monotonic()
    up.cli("simulate", "--labellers", "4", "--pairs", str(PAIRS))
    return time.monotonic() - started


def test_one_cycle_raises_the_judged_win_rate(up, simulated):
    up.cli("promote", "base")  # gated against the base, whichever cycle ran before
    started = time.monotonic()
    out = up.cli("retrain")
    cycle = simulated + time.monotonic() - started
    with up.client() as c:
        status = c.get("/api/status").json()
        run = c.get("/api/runs").json()[0]
    assert run["status"] == "promoted", out.stdout + out.stderr
    assert status["serving"] == run["candidate_version_id"] != 0
    metrics = json.loads(run["metrics"])
    # the gate judged with the reward model refreshed this cycle, not the demo rule
    assert metrics["judge"].startswith("reward model") and metrics["judge_model_id"] is not None
    assert metrics["win_rate_lower"] > 0.5
    rate = judged_win_rate(up, f"v{status['serving']}", "base")
    print(f"\nE2E: {metrics['train_pairs']} training pairs, gate win rate {metrics['win_rate']:.3f} "
          f"({metrics['win_rate_lower']:.3f}-{metrics['win_rate_upper']:.3f}) by {metrics['judge']}, "
          f"held-out judged win rate over base by the demo rule {rate:.3f}, KL {metrics['kl_to_base']:.2f}; "
          f"simulate {simulated:.0f} s, whole cycle {cycle:.0f} s")
    assert metrics["train_pairs"] <= 500
    # Measured: offline, 400 pairs, judged as here (ops/bench/results/dpo_demo.md) 0.737 / 0.776 / 0.783
    # for seeds 0-2; README (compare) 0.781, 0.762-0.812; this test 0.787 / 0.779. Here 136 judgements
    # (68 prompts x 2 seeds): standard error ~0.035, so 0.70 is ~2.2 standard errors under the mean of
    # the runs: a build that misses it has lost learning, not drawn bad luck (0.75 would fail ~1 run in 6).
    assert rate >= 0.70
    with up.client() as c:  # the run and its curve are there for the dashboard
        stats = c.get("/api/stats").json()
    assert stats["runs"][0]["curve"] and any(m["name"] == "loss" for m in stats["runs"][0]["curve"])
    status_json = json.loads(up.cli("status", "--json").stdout)
    assert status_json["serving"] == status["serving"] and status_json["last_runs"][0]["id"] == run["id"]
    text = up.cli("status").stdout
    assert f"run: {run['id']} dpo (manual) promoted: " in text
    # one row a version: the candidate serves, and its parent (what served when it was trained) by name
    rows = {line.split()[0]: line.split()[1:] for line in up.cli("versions").stdout.splitlines()[1:]}
    assert rows[f"v{status['serving']}"][:3] == ["serving", "dpo", "base"] and rows["base"][:3] == ["base", "base", "-"]
    assert "errors: pair maker " in text and "{" not in text  # no dict printed raw


def test_rlhf_cycle_refreshes_the_reward_model_and_ppo_beats_the_base(up, simulated):
    """The same labels, the other method: the reward model is fitted on them, PPO rolls out on the
    logged prompts against it (on a vLLM engine of the run's own: `ppo.rollouts = "dedicated"`),
    and the candidate is gated against the base."""
    up.cli("promote", "base")
    started = time.monotonic()
    out = up.cli("retrain", "--method", "ppo", "--set", "ppo.rollouts=dedicated")
    cycle = time.monotonic() - started
    with up.client() as c:
        run = c.get("/api/runs").json()[0]
        reward_models = c.get("/api/reward_models", params={"purpose": "reward"}).json()
        status = c.get("/api/status").json()
    assert run["method"] == "ppo" and run["status"] == "promoted", out.stdout + out.stderr
    metrics = json.loads(run["metrics"])
    assert reward_models[0]["run_id"] == run["id"] and metrics["reward_model_id"] == reward_models[0]["id"]
    # every rollout was sampled on the run's own engine, which the scheduler's job asked for (the
    # default, the serving engine, is sampled through the gateway in tests/test_serving.py)
    assert metrics["rollouts_on"] == "dedicated engine", metrics
    assert metrics["rollout_engine_steps"] == up.cfg.ppo.steps, metrics
    rate = judged_win_rate(up, f"v{status['serving']}", "base")
    print(f"\nE2E PPO: reward model held-out accuracy {reward_models[0]['accuracy']:.3f} on "
          f"{metrics['reward_model_heldout_pairs']} pairs, reward {metrics['reward_first']:.2f} -> "
          f"{metrics['reward_last']:.2f}, gate win rate {metrics['win_rate']:.3f}, held-out judged win rate over "
          f"base {rate:.3f}, KL {metrics['kl_to_base']:.2f}; rollouts on its own engine at "
          f"{metrics['rollout_engine_tokens_per_s']} tokens/s; whole cycle {cycle:.0f} s")
    # Offline (ops/bench/results/compare.md) the reward model scores 0.80-0.90 on the held-out pairs and
    # PPO reaches 0.63-0.66 over the base, 3 seeds. The held-out set here is ~23 pairs, so one pair is
    # 0.043 and the standard error near 0.08: 0.60 is better than a coin by 2 standard errors and 3
    # below the offline mean (0.70 failed once at 0.696, 16 of 23).
    assert reward_models[0]["accuracy"] >= 0.60
    assert rate >= 0.58


def test_kto_cycle_learns_from_thumbs_and_is_gated(up, simulated):
    up.cli("promote", "base")
    out = up.cli("retrain", "--method", "kto")
    with up.client() as c:
        run = c.get("/api/runs").json()[0]
        status = c.get("/api/status").json()
    assert run["method"] == "kto" and run["metrics"], out.stdout + out.stderr
    metrics = json.loads(run["metrics"])
    rate = judged_win_rate(up, f"v{run['candidate_version_id']}", "base", seeds=(0,))
    print(f"\nE2E KTO: {metrics.get('desirable')} up / {metrics.get('undesirable')} down, gate win rate "
          f"{metrics.get('win_rate')}: {run['status']} ({run['reason']}); held-out judged win rate over base by "
          f"the demo rule {rate:.3f}")
    assert metrics["desirable"] > 0 and metrics["undesirable"] > 0
    with up.client() as c:  # on the labels the cycles before it had, the gate's reward model is not refitted
        judges = c.get("/api/reward_models", params={"purpose": "judge"}).json()
    assert len(judges) == 1 and metrics["judge_model_id"] == judges[0]["id"], out.stdout
    # Learning, by the simulated people: offline (README/compare.md) 0.723-0.738 over 3 seeds; 68
    # judgements here, standard error ~0.055, so 0.55 is ~3 standard errors under them.
    assert rate > 0.55
    # Gated by the reward model refreshed on the pairs: it learned politeness far better than topic
    # (ops/bench/results/compare.md), and KTO's gain is partly topic, so the gate has measured KTO's
    # candidates at 0.56 (rejected: lower bound 0.496) as well as above; both decisions are honest ones.
    assert metrics["judge"].startswith("reward model") and run["status"] in ("promoted", "rejected"), run["reason"]
    assert (status["serving"] == run["candidate_version_id"]) == (run["status"] == "promoted")


def test_the_gates_reward_model_ranks_the_labelling_queue(up, simulated):
    """`alignloop rank` (what every cycle does with labeling.order = "active"): the gate's newest
    reward model scores both replies of each pair nobody has labelled yet, and the gateway keeps
    each pair's score and its parts, which admins see."""
    with up.client() as c:
        if not c.get("/api/reward_models", params={"purpose": "judge"}).json():
            up.cli("retrain")  # the first cycle fits the gate's reward model
    up.cli("simulate", "--labellers", "0", "--requests", "16", "--pairs", "1000000")  # new live pairs, unlabelled
    out = up.cli("rank", "--set", "labeling.order=active")
    with up.client() as c:
        waiting = c.get("/api/queue", params={"limit": 1000}).json()["pairs"]
        judge = c.get("/api/reward_models", params={"purpose": "judge"}).json()[0]
    assert f"ranked {len(waiting)} waiting pairs by the reward model {judge['id']}" in out.stdout, out.stdout
    assert len(waiting) >= 16 and all(p["reward_model_id"] == judge["id"] for p in waiting)
    for p in waiting:
        assert 0 <= p["uncertainty"] <= 1 and 0 < p["novelty"] <= 1
        assert p["score"] == pytest.approx(max(p["uncertainty"], p["disagreement"]) * p["novelty"])
    assert len({round(p["uncertainty"], 6) for p in waiting}) > 1  # the model tells pairs apart
    assert "not ranked: labeling.order is 'arrival'" in up.cli("rank").stdout  # this server's own order


def test_an_empty_night_skips_the_retrain_and_still_grades_what_serves(up):
    """`simulate --nights` with no traffic: nothing new to label, so the nightly retrain is skipped with
    its reason (whether or not a cycle trained on these labels before), and the night is graded.
    No labellers either: pairs left in the queue by other tests stay unlabelled."""
    with up.client() as c:
        before = c.get("/api/status").json()
    out = up.cli("simulate", "--nights", "1", "--pairs", "0", "--labellers", "0")
    records = [json.loads(line) for line in open(out.stdout.split("every number: ")[1].strip())]
    assert [r["night"] for r in records] == [0, 1]
    night = records[1]
    assert night["requests"] == night["labels"] == 0
    assert night["decision"] == "skipped" and night["reason"].startswith("no "), night
    assert night["serving"] == records[0]["serving"] and night["win_over_previous"] is None
    assert 0.0 <= night["good"] <= 1.0 and not night["worse_than_previous"]
    with up.client() as c:
        assert c.get("/api/status").json()["serving"] == before["serving"]
    assert "| 1 | 0 (" in out.stdout and "skipped" in out.stdout
    bad = up.cli("simulate", "--nights", "2", "--flip", check=False)
    assert bad.returncode != 0 and "--nights takes" in bad.stderr and "Traceback" not in bad.stderr


def test_up_serves_the_labelling_app(up):
    port = up.cfg.labeling.app_port
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
    assert "alignloop is up" in up.log() and "labeller token" in up.log()


@pytest.fixture(scope="module")
def flipped(up, tmp_path_factory):
    """A second, fresh system whose labellers choose against the judge (same demo model)."""
    root = tmp_path_factory.mktemp("flipped")
    s = start(root, up.cfg.demo_model_dir, free_port(), free_port(),
              ["gateway.pair_share=1.0", "engine.max_model_len=512", "schedule.enabled=false"])
    yield s
    s.stop(signal.SIGTERM, timeout=90)


@pytest.fixture(scope="module")
def flipped_labels(flipped) -> None:
    """Its labels, made once by whichever test below asks first, so none needs another to run before it."""
    flipped.cli("simulate", "--labellers", "2", "--pairs", "200", "--flip")


@pytest.fixture(scope="module")
def truthful_judge(up, simulated) -> dict:
    """The gate's reward model of `up`, refreshed on its true labels by a cycle (one is run if no test
    ran one before)."""
    with up.client() as c:
        if not c.get("/api/reward_models", params={"purpose": "judge"}).json():
            up.cli("retrain", "--force")
        return c.get("/api/reward_models", params={"purpose": "judge"}).json()[0]


@pytest.fixture(scope="module")
def flipped_adapter(flipped, flipped_labels):
    """The adapter a DPO cycle trains on the flipped labels (made once, by whichever test asks first)."""
    out = flipped.cli("retrain")
    with flipped.client() as c:
        run = c.get("/api/runs").json()[0]
        versions = {v["id"]: v for v in c.get("/api/versions").json()}
    assert run["status"] in ("promoted", "rejected", "held") and run["candidate_version_id"], out.stdout + out.stderr
    return flipped.cfg.data_dir / versions[run["candidate_version_id"]]["adapter_path"]  # absolute or not


def register(server, adapter) -> str:
    """`alignloop versions --add`: the adapter as a new candidate; its name."""
    return server.cli("versions", "--add", str(adapter)).stdout.split()[1]


def test_a_candidate_trained_on_flipped_labels_is_rejected_by_the_gate(up, truthful_judge, flipped_adapter):
    """Trained where labellers chose against the people, the candidate is worse by the demo rule; the
    other system's gate, whose reward model learned from true labels, rejects it and serves on. (In
    the flipped system itself the judge learned the flipped labels too: no label-trained judge can see
    that every labeller is wrong; labeller reliability and gold pairs are what catch that.)"""
    with up.client() as c:
        serving = c.get("/api/status").json()["serving"]
    name = register(up, flipped_adapter)
    rate = judged_win_rate(up, name, "base", seeds=(0,))
    gated = up.cli("gate", name)
    with up.client() as c:
        status = c.get("/api/status").json()
        versions = {v["name"]: v for v in c.get("/api/versions").json()}
    print(f"\nE2E flipped: the flipped candidate by the demo rule over base {rate:.3f}; {gated.stdout.strip()}")
    assert rate < 0.5  # truly worse than the base, by the simulated people
    assert f"{name} vs " in gated.stdout and ": reject: " in gated.stdout, gated.stdout
    assert versions[name]["status"] == "rejected" and status["serving"] == serving


def test_a_worse_version_pushed_live_is_rolled_back_by_the_monitor(up, simulated, flipped_adapter):
    """An admin pushes the flipped candidate live past the gate; the monitor compares its live thumbs
    (and errors, cut-off and empty answers) with the base's and rolls it back by itself."""
    up.cli("promote", "base")
    name = register(up, flipped_adapter)
    up.cli("promote", name)
    vid = int(name[1:])
    log = up.root / "monitor-users.log"
    with log.open("w") as out:
        users = subprocess.Popen([*up.cli_args(), "simulate", "--labellers", "0", "--pairs", str(10**9),
                                  "--requests", "360", "--seed", "7"], stdout=out, stderr=subprocess.STDOUT)
    with up.client() as c:
        deadline = time.monotonic() + 900
        while users.poll() is None and c.get("/api/status").json()["serving"] == vid and time.monotonic() < deadline:
            time.sleep(1)
        users.terminate()  # once it rolled back, the rest of the 360 requests would go to the base
        assert users.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()
        deadline = time.monotonic() + 60
        while c.get("/api/status").json()["serving"] == vid and time.monotonic() < deadline:
            time.sleep(1)  # the last batch of thumbs may still be on its way to the store
        status = c.get("/api/status").json()
        served = sum(e["version_id"] == vid for e in c.get("/api/exchanges", params={"limit": 2000}).json())
        metrics = c.get("/metrics").text
    monitor = status["monitor"]
    print(f"\nE2E monitor: {served} live requests answered by {name} before the rollback; "
          f"{monitor['last_rollback']}")
    assert status["serving"] == 0, monitor
    assert monitor["last_rollback"]["version"] == vid and monitor["rollbacks"] >= 1
    assert "alignloop_automatic_rollbacks 1.0" in metrics or "alignloop_automatic_rollbacks 2.0" in metrics
    assert served <= 360
    out = up.cli("status", "--json").stdout
    assert json.loads(out)["monitor"]["last_rollback"]["version"] == vid


def test_a_stopped_retrain_ends_its_trainer_and_fails_its_run_so_the_next_one_starts(flipped, flipped_labels):
    """SIGTERM to `alignloop retrain` while its trainer runs (as a supervisor stops it; Ctrl-C takes
    the same path, but a shell that starts the suite in the background makes children ignore SIGINT)."""
    with flipped.client() as c:
        known = {r["id"] for r in c.get("/api/runs").json()}
        retrain = subprocess.Popen([*flipped.cli_args(), "retrain", "--force"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        trainer, deadline = "", time.monotonic() + 600
        while not trainer and time.monotonic() < deadline:
            new = [r["id"] for r in c.get("/api/runs").json() if r["id"] not in known]
            pid_file = flipped.cfg.data_dir / "runs" / f"run-{new[0] if new else 0}" / "train.pid"
            trainer = pid_file.read_text().strip() if pid_file.exists() else ""  # written just after it appears
            time.sleep(0.2)
        assert trainer, "the trainer never started"
        trainer = int(trainer)
        retrain.send_signal(signal.SIGTERM)
        out, _ = retrain.communicate(timeout=60)
        run = c.get("/api/runs").json()[0]
    assert retrain.returncode == 130 and "Traceback" not in out and "alignloop: interrupted" in out, out
    assert f"run {new[0]}: failed (interrupted" in out, out
    assert run["id"] == new[0] and run["status"] == "failed" and run["reason"].startswith("interrupted"), run
    assert not pid_alive(trainer), "the trainer outlived its retrain"
    # the run is over, not left `running` for the next one to wait on until its heartbeat is stale
    with flipped.client() as c:
        assert c.post("/api/runs", json={"method": "dpo", "trigger": "manual"}).status_code == 200
        latest = c.get("/api/runs").json()[0]
        assert c.post(f"/api/runs/{latest['id']}/finish", json={"status": "failed", "reason": "test"}).status_code == 200


def test_a_killed_trainer_fails_the_run_and_the_next_run_resumes_it(flipped, flipped_labels):
    with flipped.client() as c:
        serving = c.get("/api/status").json()["serving"]
        known = {r["id"] for r in c.get("/api/runs").json()}
        retrain = subprocess.Popen([*flipped.cli_args(), "retrain", "--force"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        pid_file, checkpoint, deadline = None, [], time.monotonic() + 600
        while not checkpoint and time.monotonic() < deadline:  # mid-run: once its first checkpoint is written
            new = [r["id"] for r in c.get("/api/runs").json() if r["id"] not in known]
            if new and (flipped.cfg.data_dir / "runs" / f"run-{new[0]}" / "train.pid").exists():
                pid_file = flipped.cfg.data_dir / "runs" / f"run-{new[0]}" / "train.pid"
                checkpoint = list((flipped.cfg.data_dir / "checkpoints").glob("dpo-*/trainer/checkpoint-*/trainer_state.json"))
            time.sleep(0.5)
        assert pid_file is not None and checkpoint, "the trainer never started or never wrote a checkpoint"
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        out, _ = retrain.communicate(timeout=300)
        run = c.get("/api/runs").json()[0]
        assert c.get("/api/status").json()["serving"] == serving
    assert run["status"] == "failed" and "training failed" in run["reason"], out
    again = flipped.cli("retrain", "--force")
    with flipped.client() as c:
        last = c.get("/api/runs").json()[0]
    # the next cycle on the same snapshot goes on from the checkpoint, to the end, and the gate decides
    metrics = json.loads(last["metrics"])
    assert "it resumes from them" in again.stdout, again.stdout
    assert metrics["resumed_from_step"] >= flipped.cfg.train.checkpoint_steps, metrics
    assert last["status"] in ("promoted", "rejected", "held") and metrics["judge"], again.stdout


def test_two_triggers_at_once_make_one_run(flipped, flipped_labels):
    with flipped.client() as c:
        before = len(c.get("/api/runs").json())
    results = []

    def trigger():
        results.append(flipped.cli("retrain", "--force", check=False))

    threads = [threading.Thread(target=trigger) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with flipped.client() as c:
        runs = c.get("/api/runs").json()
    assert len(runs) == before + 1
    assert sum("skipped" in r.stdout and "one run at a time" in r.stdout for r in results) == 1


# ------------------------------------------------------------------------------------------------
# The same loop on a second, real-shaped base model: a tiny Qwen2 in the layout of the Hugging Face
# chat models users bring (ChatML, a chat template with a default system turn, two EOS ids, pad != EOS,
# tied embeddings, grouped-query attention, Qwen's sampling defaults in generation_config.json), given
# as `model.base` like any downloaded model. One server start and one set of labels for every step.

QWEN_PAIRS = 200
QWEN_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from loop.demo.qwen import build_qwen_model
    from loop.sections import DemoModelConfig

    root = tmp_path_factory.mktemp("qwen")
    started = time.monotonic()
    # half the demo model's training steps: this test is about the model's shape, and 400 steps learn
    # the styles well enough for DPO to be promoted (judged win rate 0.74) in half the build time
    model = build_qwen_model(root / "Qwen2-tiny-Instruct", DemoModelConfig(steps=400), progress=False)
    built = time.monotonic() - started
    # 3 in 10 of the ~130 labelled pairs held out (~39), so the gate's reward model is measured on at least
    # gate.reward_min_heldout = 16 of them: the split hashes random uids, and a fifth once held out 15
    s = start(root / "system", model, free_port(), free_port(),
              ["gateway.pair_share=1.0", "ppo.steps=8", "store.heldout_share=0.3"], timeout=600)
    print(f"\nQwen2-shaped model built in {built:.0f} s, served in {time.monotonic() - started - built:.0f} s")
    yield s
    s.stop(signal.SIGTERM, timeout=90)


def _chat(server, model: str = "alignloop") -> dict:
    with server.client(timeout=120) as c:
        r = c.post("/v1/chat/completions", json={"model": model, "max_tokens": 64, "temperature": 1.0, "seed": 3,
                                                  "messages": [{"role": "user", "content": "How do I grow basil?"}]})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_whole_loop_on_a_qwen2_shaped_chat_model(qwen):
    started = time.monotonic()
    # served by vLLM: the answer stops at an EOS id of generation_config.json, with no ChatML left in it
    answer = _chat(qwen)["choices"][0]
    assert answer["finish_reason"] == "stop" and answer["message"]["content"].strip()
    assert "<|im_" not in answer["message"]["content"] and "<|endoftext|>" not in answer["message"]["content"]

    qwen.cli("simulate", "--labellers", "2", "--pairs", str(QWEN_PAIRS))
    simulated = time.monotonic() - started
    times = {}

    def cycle(method: str) -> tuple[dict, dict]:
        qwen.cli("promote", "base")  # each method gated against the base
        t0 = time.monotonic()
        out = qwen.cli("retrain", "--method", method)
        times[method] = time.monotonic() - t0
        with qwen.client() as c:
            run = c.get("/api/runs").json()[0]
        assert run["method"] == method and run["status"] in ("promoted", "rejected"), out.stdout + out.stderr
        return run, json.loads(run["metrics"])

    # DPO: trained with LoRA on the targets found in the model, loaded by vLLM, judged, promoted
    dpo, m_dpo = cycle("dpo")
    with qwen.client() as c:
        versions = {v["id"]: v for v in c.get("/api/versions").json()}
        status = c.get("/api/status").json()
    adapter_dir = qwen.cfg.data_dir / versions[dpo["candidate_version_id"]]["adapter_path"]  # absolute or not
    adapter = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == QWEN_TARGETS
    assert dpo["status"] == "promoted", dpo["reason"]
    assert status["serving"] == dpo["candidate_version_id"]
    assert _chat(qwen)["choices"][0]["finish_reason"] in ("stop", "length")  # the alias answers from the adapter

    # reward model + PPO, then KTO on the users' thumbs: each runs to the gate on this model
    ppo, m_ppo = cycle("ppo")
    with qwen.client() as c:
        reward_models = c.get("/api/reward_models", params={"purpose": "reward"}).json()
    assert reward_models[0]["run_id"] == ppo["id"] and m_ppo["reward_model_id"] == reward_models[0]["id"]
    kto, m_kto = cycle("kto")
    assert m_kto["desirable"] > 0 and m_kto["undesirable"] > 0
    for m in (m_dpo, m_ppo, m_kto):
        assert 0 <= m["kl_to_base"] < 20 and 0 <= m["win_rate"] <= 1

    # promote and roll back by hand
    qwen.cli("promote", f"v{dpo['candidate_version_id']}")
    qwen.cli("promote", "base")
    qwen.cli("rollback")
    with qwen.client() as c:
        assert c.get("/api/status").json()["serving"] == dpo["candidate_version_id"]
    assert _chat(qwen)["choices"][0]["message"]["content"]
    print(f"\nE2E Qwen2-shaped: simulate {simulated:.0f} s; DPO {dpo['status']} (win rate {m_dpo['win_rate']:.3f}, "
          f"KL {m_dpo['kl_to_base']:.2f}) {times['dpo']:.0f} s; PPO {ppo['status']} (reward model accuracy "
          f"{reward_models[0]['accuracy']:.3f}, win rate {m_ppo['win_rate']:.3f}) {times['ppo']:.0f} s; KTO "
          f"{kto['status']} (win rate {m_kto['win_rate']:.3f}) {times['kto']:.0f} s; whole test "
          f"{time.monotonic() - started:.0f} s")
