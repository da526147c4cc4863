"""Retrain runs: one at a time, dead runs detected by heartbeat, the gate's rule, the scheduler's skip."""

import threading
import time

import pytest

from loop import config as configuration
from loop.evaluate import gate, win_rate
from store.runs import RunBusy, Runs


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


def test_gate_promotes_only_a_clear_win_within_the_kl_budget():
    cfg = configuration.GateConfig(margin=0.05, kl_budget=10.0)
    assert gate({"win_rate": 0.8, "kl_to_base": 3.0}, cfg)[0]
    ok, why = gate({"win_rate": 0.55, "kl_to_base": 3.0}, cfg)
    assert not ok and "not above 0.550" in why
    ok, why = gate({"win_rate": 0.9, "kl_to_base": 12.0}, cfg)
    assert not ok and "over the budget" in why


def test_win_rate_counts_ties_half():
    def judge(prompt, a, b):
        return "a" if a > b else "b" if b > a else "tie"

    result = win_rate(["p"] * 4, ["b", "a", "c", "a"], ["a", "b", "c", "a"], judge)
    assert result == {"win_rate": (1 + 0.5 * 2) / 4, "wins": 1, "losses": 1, "ties": 2}
