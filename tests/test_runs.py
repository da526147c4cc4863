"""Retrain runs: one at a time, dead runs detected by heartbeat, the scheduler's skip (the gate: tests/test_gate.py)."""

import threading
import time

import pytest

from loop import config as configuration
from store.runs import RunBusy, Runs
from tests.ui_gateway import running


def test_one_run_at_a_time_and_a_dead_one_is_marked_failed(store):
    runs = Runs(store, stale_s=0.3)
    first = runs.start("dpo", "cron")
    with pytest.raises(RunBusy, match=f"run {first['id']} is going"):
        runs.start("dpo", "labels")
    runs.heartbeat(first["id"], [{"step": 1, "name": "loss", "value": 0.69}])
    time.sleep(0.4)  # no heartbeat: its process died
    second = runs.start("dpo", "cron")
    dead = runs.get(first["id"])
    assert dead["status"] == "failed" and "no heartbeat since" in dead["reason"]
    assert store.run_metrics(first["id"]) == [{"step": 1, "name": "loss", "value": 0.69}]
    done = runs.finish(second["id"], "promoted", "win rate 0.8", {"win_rate": 0.8}, snapshot_hash="abc")
    assert done["status"] == "promoted" and done["finished_at"] is not None
    with pytest.raises(Exception, match="not running"):
        runs.finish(second["id"], "failed")
    with pytest.raises(Exception, match="finishes as one of"):
        runs.finish(runs.start("dpo", "x")["id"], "great")


def test_a_dead_run_is_listed_failed_without_waiting_for_the_next_start(store):
    runs = Runs(store, stale_s=0.3)
    alive = runs.start("dpo", "cron")
    with pytest.raises(RunBusy, match=r"its last heartbeat \d+ s ago\); one run at a time.* 0 s without a heartbeat"):
        runs.start("dpo", "labels")
    assert runs.recent()[0]["status"] == "running"  # heartbeat fresh: alive
    time.sleep(0.4)
    listed = runs.recent()[0]
    assert listed["id"] == alive["id"] and listed["status"] == "failed" and "no heartbeat since" in listed["reason"]


def test_a_cycle_beats_by_itself_while_nothing_trains(tmp_path):
    """Between the trainer's metrics (snapshot, gate) the cycle's own pulse keeps the run alive."""
    from loop.retrain import Pulse

    with running(tmp_path, pairs=1) as gateway:
        run = gateway.gw.runs.start("dpo", "manual")
        with Pulse(gateway.gw.cfg, run["id"], every_s=0.05):
            deadline = time.monotonic() + 10
            while gateway.gw.runs.get(run["id"])["heartbeat_at"] == run["heartbeat_at"] and time.monotonic() < deadline:
                time.sleep(0.05)
        assert gateway.gw.runs.get(run["id"])["heartbeat_at"] > run["heartbeat_at"]
        assert gateway.gw.runs.get(run["id"])["status"] == "running"


def test_two_triggers_at_once_make_one_run(store):
    runs = Runs(store)
    results, barrier = [], threading.Barrier(8)

    def trigger():
        barrier.wait()
        try:
            results.append(runs.start("dpo", "cron")["id"])
        except RunBusy:
            results.append(None)

    threads = [threading.Thread(target=trigger) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([r for r in results if r is not None]) == 1


def test_the_scheduler_takes_the_methods_in_turn():
    from loop.scheduler import next_in_turn

    assert next_in_turn(["dpo", "ppo"], None) == "dpo"
    assert next_in_turn(["dpo", "ppo"], "dpo") == "ppo"
    assert next_in_turn(["dpo", "ppo"], "ppo") == "dpo"
    assert next_in_turn(["dpo", "ppo", "kto"], "kto") == "dpo"
    assert next_in_turn(["ppo"], "dpo") == "ppo"
    with pytest.raises(ValueError, match="unknown method"):
        configuration.ScheduleConfig(alternate="dpo,grpo")


def test_retrain_learns_from_the_methods_own_data():
    from loop.retrain import training_data

    manifest = {"counts": {"pairs": 10, "heldout": 2, "feedback": 5, "prompts": 40},
                "content_hash": {"pairs": "P", "feedback": "F", "prompts": "Q"}}
    assert training_data(manifest, "dpo") == ("P", 8, "labelled pairs")
    assert training_data(manifest, "ppo") == ("P+Q", 8, "labelled pairs")  # new prompts alone are new data
    assert training_data(manifest, "kto") == ("F", 5, "feedback (thumbs up/down)")


def test_a_reward_model_is_recorded_with_its_accuracy(store):
    from store.reward_models import RewardModels

    rms = RewardModels(store)
    assert rms.latest() is None
    first = rms.add("/rm/1", run_id=1, snapshot_hash="h1", accuracy=0.81, metrics={"steps": 3})
    second = rms.add("/rm/2", run_id=2, snapshot_hash="h2", accuracy=0.9)
    assert rms.latest()["id"] == second["id"] and [r["path"] for r in rms.list()] == ["/rm/2", "/rm/1"]
    assert first["accuracy"] == pytest.approx(0.81)


def test_a_run_is_skipped_only_when_its_own_method_already_trained_on_the_same_data():
    from loop.retrain import trained_on

    runs = [{"id": 3, "status": "promoted", "method": "ppo", "snapshot_hash": "P+Q"},
            {"id": 2, "status": "rejected", "method": "dpo", "snapshot_hash": "P2"},
            {"id": 1, "status": "promoted", "method": "dpo", "snapshot_hash": "P"}]
    assert trained_on(runs, "dpo", "P") == 1  # a PPO run in between does not hide it
    assert trained_on(runs, "dpo", "P2") is None  # new labels (the rejected run does not count)
    assert trained_on(runs, "ppo", "P+Q") == 3
    assert trained_on(runs, "kto", "F") is None
    held = [{"id": 4, "status": "held", "method": "dpo", "snapshot_hash": "P3"}, *runs]
    assert trained_on(held, "dpo", "P3") == 4  # its candidate waits for a person; another would too


def test_the_gates_reward_model_is_refitted_only_when_its_pairs_or_settings_change():
    import dataclasses

    from loop.retrain import judge_fingerprint

    cfg = configuration.load(None, [], missing_ok=True)
    same = judge_fingerprint(cfg, "pairs-1")
    assert judge_fingerprint(cfg, "pairs-1") == same  # another method on the same labels: fitted once
    assert judge_fingerprint(cfg, "pairs-2") != same  # new labels
    epochs = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, epochs=cfg.reward.epochs + 1))
    assert judge_fingerprint(epochs, "pairs-1") != same
    seed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + 1))
    assert judge_fingerprint(seed, "pairs-1") != same


def test_the_log_tells_the_trainers_own_seconds_apart_from_the_cycles():
    from loop.retrain import trained_summary

    line = trained_summary({"train_seconds": 10.03, "steps": 32, "kl_to_base": 1.2749, "eval_loss": None,
                            "eval_logits/chosen": -1.9, "resumed_from_step": 0})
    assert line == "10 s of training steps, steps 32, kl_to_base 1.27"  # a fresh run: no resumed_from_step 0
    assert trained_summary({"steps": 32, "resumed_from_step": 8}) == "steps 32, resumed_from_step 8"
    ppo = trained_summary({"steps": 16, "rollouts_on": "dedicated engine", "rollout_engine_tokens_per_s": 3696.2})
    assert ppo == "steps 16, rollouts_on dedicated engine at 3696 tok/s"


def test_the_log_says_how_many_pairs_a_reward_models_accuracy_was_measured_on():
    from loop.retrain import held_out

    assert held_out({"accuracy": 1.0, "metrics": {"heldout_pairs": 4}}) == "held-out accuracy 1.000 on 4 pairs"
    assert held_out({"accuracy": None, "metrics": {"heldout_pairs": 0}}) == "no held-out pairs to measure its accuracy on"
