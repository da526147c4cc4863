"""The watch after a promotion, on a real store: the sequential test's error rates, a regression
rolled back with its reason, no verdict without data, and a person's override. (Against the real
engine and simulated users: tests/test_loop_e2e.py::test_a_worse_version_pushed_live_is_rolled_back.)"""

from __future__ import annotations

import random
import re
import uuid

import pytest

from loop.evaluation.sequential import FINE, REGRESSION, SPRT, baseline_rate
from loop.sections import MonitorConfig
from loop.serving.monitor import Monitor
from loop.serving.router import Router
from loop.serving.versions import StaleServing
from store.database import Exchange


class Promoter:
    """The part of `Versions` the monitor uses, without an engine: flip the routes, record the promotion,
    set the canary."""

    def __init__(self, store, router):
        self.store, self.router, self.calls = store, router, []

    def promote(self, ref, actor=None, reason=None, expect_serving=None):
        routes = self.router.routes
        if expect_serving is not None and routes.serving != expect_serving:
            raise StaleServing("what serves changed")
        self.calls.append((ref, actor, reason))
        self.router.update(serving=ref, previous=routes.serving)
        self.store.record_promotion(routes.alias, ref, routes.serving, actor, reason)
        return {"serving": ref}

    def set_canary(self, ref, share, expect_canary=None):
        if expect_canary is not None and self.router.routes.canary != expect_canary:
            raise StaleServing("the canary changed")
        self.router.update(canary=ref, canary_share=share if ref is not None else 0.0)
        return {"canary": ref, "share": share}


def traffic(store, version: int, n: int, down: float, rng: random.Random, status: int = 200,
            finish: str = "stop", thumbs: float = 0.5) -> None:
    """n live exchanges of `version`; a share `thumbs` of them get a thumb, down with probability `down`."""
    batch = [Exchange(f"chatcmpl-{uuid.uuid4()}", "chat.completions", "alignloop", version,
                      [{"role": "user", "content": f"q{rng.random()}"}], [("an answer", finish)], {}, status=status)
             for _ in range(n)]
    store.log_batch(batch, [])
    for e in batch:
        if status == 200 and rng.random() < thumbs:
            rid = store._all("SELECT r.id FROM responses r JOIN exchanges x ON x.id = r.exchange_id "
                             "WHERE x.request_id = ?", [e.request_id])[0][0]
            store.add_feedback(rid, "thumbs", 0.0 if rng.random() < down else 1.0)


@pytest.fixture
def system(store):
    store.add_version("/adapters/good", "dpo")  # v1
    store.add_version("/adapters/bad", "dpo")   # v2
    router = Router("alignloop", "base")
    promoter = Promoter(store, router)
    ready = {"engine": True}
    monitor = Monitor(MonitorConfig(), store, router, promoter, lambda: ready["engine"], log=lambda m: None)
    return store, router, promoter, monitor, ready


def test_the_sequential_test_keeps_its_error_rates():
    rng = random.Random(3)
    same = worse = 0
    for _ in range(1000):
        t = SPRT.for_baseline(0.6, 0.1, alpha=0.01, beta=0.1)
        while t.state not in (FINE, REGRESSION) and t.n < 5000:
            t.update(rng.random() < 0.6)  # as good as the baseline
        same += t.state == REGRESSION
        t = SPRT.for_baseline(0.6, 0.1, alpha=0.01, beta=0.1)
        while t.state not in (FINE, REGRESSION):
            t.update(rng.random() < 0.7)  # worse by exactly the regression it is built for
        worse += t.state == FINE
    assert same / 1000 <= 0.01 + 0.006  # alpha, with ~2 standard errors of 1,000 trials
    assert worse / 1000 <= 0.1 + 0.02  # beta
    assert baseline_rate(0, 500, 0.01) == 0.01 and baseline_rate(8, 8, 0.01) == pytest.approx(1.0)
    assert 0.6 < baseline_rate(150, 250, 0.01) < 0.6 + 2 * (0.6 * 0.4 / 250) ** 0.5  # above the estimate, by < 2 se


def test_a_version_worse_on_thumbs_is_rolled_back_with_its_reason(system):
    store, router, promoter, monitor, _ = system
    rng = random.Random(0)
    traffic(store, 0, 400, down=0.6, rng=rng)  # the base's history: 60% of thumbs down
    promoter.promote(2, actor="admin", reason="pushed past the gate")
    monitor.check()
    assert monitor.watch.version == 2 and monitor.watch.previous == 0
    assert set(monitor.watch.tests) == {"errors", "cut_off", "empty", "thumbs_down"}
    served = 0
    while router.routes.serving == 2 and served < 1000:
        traffic(store, 2, 20, down=0.95, rng=rng)
        served += 20
        monitor.check()
    assert router.routes.serving == 0 and served <= 300
    version, actor, reason = promoter.calls[-1]
    assert (version, actor) == (0, "monitor") and "thumbs_down" in reason
    assert re.search(r"against 5\d%|against 6\d% for base", reason)  # the base's rate, ~60%
    status = monitor.status()
    assert status["rollbacks"] == 1 and status["last_rollback"]["version"] == 2
    assert status["watch"]["outcome"] == "rolled back"
    assert store._all("SELECT actor FROM promotions ORDER BY id DESC LIMIT 1") == [("monitor",)]
    # a person promotes it again: an override, not watched (and not rolled back again)
    promoter.promote(2, actor="admin", reason="I know better")
    traffic(store, 2, 200, down=0.95, rng=rng)
    monitor.check()
    assert monitor.watch is None and router.routes.serving == 2


def test_a_version_as_good_as_the_last_is_kept(system):
    store, router, promoter, monitor, _ = system
    rng = random.Random(1)
    traffic(store, 0, 400, down=0.6, rng=rng)
    promoter.promote(1, actor="retrain")
    monitor.check()
    while monitor.watch.outcome == "watching":
        traffic(store, 1, 50, down=0.5, rng=rng)
        monitor.check()
    assert monitor.watch.outcome == "kept" and router.routes.serving == 1
    assert monitor.status()["rollbacks"] == 0


def test_errors_roll_back_but_an_absent_engine_is_no_verdict(system):
    store, router, promoter, monitor, ready = system
    rng = random.Random(2)
    traffic(store, 0, 400, down=0.6, rng=rng)
    promoter.promote(2)
    monitor.check()
    traffic(store, 2, 200, down=0.6, rng=rng, status=503)  # the engine restarting: not the version
    monitor.check()
    assert router.routes.serving == 2 and monitor.watch.requests == 0
    ready["engine"] = False
    traffic(store, 2, 50, down=0.6, rng=rng, status=500)
    monitor.check()  # engine down: nothing counted
    assert router.routes.serving == 2 and monitor.watch.requests == 0
    ready["engine"] = True
    monitor.check()
    assert router.routes.serving == 0 and "errors" in promoter.calls[-1][2]


def test_answers_cut_off_roll_back(system):
    store, router, promoter, monitor, _ = system
    rng = random.Random(4)
    traffic(store, 0, 400, down=0.6, rng=rng)
    promoter.promote(2)
    monitor.check()
    traffic(store, 2, 100, down=0.6, rng=rng, finish="length")  # never stops
    monitor.check()
    assert router.routes.serving == 0 and "cut_off" in promoter.calls[-1][2]


def test_an_unreadable_store_or_no_baseline_decides_nothing(system, monkeypatch):
    store, router, promoter, monitor, _ = system
    rng = random.Random(5)
    promoter.promote(1)  # the base has no history: nothing to compare with
    monitor.check()
    assert monitor.watch.outcome == "kept" and "no signal has a baseline" in monitor.watch.reason
    # each signal named once, with its count, and the version by its name
    assert "observations of base: errors 0, cut_off 0, empty 0, thumbs_down 0; each needs" in monitor.watch.reason
    traffic(store, 1, 400, down=0.6, rng=rng)
    promoter.promote(2)
    monitor.check()
    assert monitor.watch.version == 2
    traffic(store, 2, 200, down=1.0, rng=rng)

    def unreadable(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(store, "live_outcomes", unreadable)
    monitor.check()
    assert router.routes.serving == 2 and monitor.failures == 1
    monkeypatch.undo()
    monitor.check()
    assert router.routes.serving == 1  # once it can read, it decides


def test_the_monitor_can_be_switched_off(store):
    store.add_version("/a", "dpo")
    router = Router("alignloop", "base")
    promoter = Promoter(store, router)
    monitor = Monitor(MonitorConfig(enabled=False), store, router, promoter, lambda: True, log=lambda m: None)
    traffic(store, 0, 400, down=0.6, rng=random.Random(6))
    promoter.promote(1)
    traffic(store, 1, 200, down=1.0, rng=random.Random(7))
    monitor.check()
    assert monitor.watch is None and router.routes.serving == 1


def test_a_rollback_never_undoes_a_newer_promotion(system):
    store, router, promoter, monitor, _ = system
    rng = random.Random(8)
    traffic(store, 0, 400, down=0.6, rng=rng)
    promoter.promote(2)
    monitor.check()
    traffic(store, 2, 200, down=1.0, rng=rng)
    monitor._count(monitor.watch)  # a regression found ...
    assert monitor.watch.outcome == "regression"
    promoter.promote(1, actor="admin")  # ... while a person promotes another version
    monitor._roll_back(monitor.watch)
    assert router.routes.serving == 1 and monitor.watch.outcome == "superseded"
    monitor.check()  # the person's promotion is watched in its turn
    assert monitor.watch.version == 1 and monitor.watch.previous == 2



def test_a_worse_canary_is_stopped_and_a_person_may_set_it_again(system):
    store, router, promoter, monitor, ready = system
    rng = random.Random(9)
    traffic(store, 0, 400, down=0.6, rng=rng)  # what serves: 60% of thumbs down
    promoter.set_canary(2, 0.2)
    monitor.check()
    assert monitor.canary.version == 2 and monitor.canary.previous == 0
    ready["engine"] = False
    traffic(store, 2, 100, down=1.0, rng=rng, status=500)
    monitor.check()  # no data, no verdict
    assert router.routes.canary == 2 and monitor.canary.requests == 0
    ready["engine"] = True
    monitor.check()
    assert router.routes.canary is None and router.routes.serving == 0  # stopped; serving untouched
    status = monitor.status()
    assert status["canary"]["outcome"] == "canary stopped" and "errors" in status["canary"]["reason"]
    assert status["rollbacks"] == 1 and status["last_rollback"]["canary"] is True
    assert promoter.calls == []  # no promotion was made or undone
    promoter.set_canary(2, 0.2)  # a person's override
    traffic(store, 2, 100, down=1.0, rng=rng, status=500)
    monitor.check()
    assert router.routes.canary == 2 and monitor.status()["canary"]["outcome"] == "overridden"


def test_a_canary_as_good_as_what_serves_keeps_its_share(system):
    store, router, promoter, monitor, _ = system
    rng = random.Random(10)
    traffic(store, 0, 400, down=0.6, rng=rng)
    promoter.set_canary(1, 0.2)
    monitor.check()
    while monitor.canary.outcome == "watching":
        traffic(store, 1, 50, down=0.5, rng=rng)
        monitor.check()
    assert monitor.canary.outcome == "kept" and router.routes.canary == 1
    promoter.set_canary(None, 0.0)  # a person ends it; a new canary is watched afresh
    monitor.check()
    promoter.set_canary(2, 0.5)
    monitor.check()
    assert monitor.canary.version == 2 and monitor.canary.outcome == "watching"
