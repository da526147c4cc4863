"""The scheduler as `up` runs it, against a real gateway: new labels start a real retrain cycle
through the gateway's API (its run is recorded with the trigger), and a second trigger while one
runs is skipped."""

from __future__ import annotations

import dataclasses
import time

import httpx

from loop.scheduler import Scheduler
from loop.sections import ScheduleConfig
from tests.ui_gateway import running


def label_some(gateway, n: int) -> None:
    auth = {"Authorization": f"Bearer {gateway.add_user('sam')}"}
    for _ in range(n):
        pair = httpx.get(f"{gateway.url}/api/label/next", headers=auth).json()["pair"]
        httpx.post(f"{gateway.url}/api/label", headers=auth,
                   json={"pair_id": pair["pair_id"], "choice": "first"}).raise_for_status()


def runs(gateway) -> list[dict]:
    return httpx.get(f"{gateway.url}/api/runs", headers={"Authorization": f"Bearer {gateway.admin_token}"}).json()


def test_new_labels_start_a_cycle_through_the_gateway(tmp_path):
    with running(tmp_path, pairs=6) as gateway:
        cfg = dataclasses.replace(gateway.gw.cfg, schedule=ScheduleConfig(cron="", min_new_labels=3, check_every_s=0.2))
        log: list[str] = []
        scheduler = Scheduler(cfg, log=log.append)
        assert not scheduler.enough_new_labels()
        scheduler.start()
        try:
            time.sleep(1.0)
            assert runs(gateway) == []  # no labels yet: nothing starts
            label_some(gateway, 3)
            deadline = time.monotonic() + 60
            while not runs(gateway) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            scheduler.stop()
        started = runs(gateway)
        assert [r["trigger"] for r in started][-1:] == ["labels"], log
        assert "every 3 new labels" in log[0]


def test_a_trigger_while_a_run_is_going_is_skipped(tmp_path):
    with running(tmp_path, pairs=1) as gateway:
        log: list[str] = []
        scheduler = Scheduler(gateway.gw.cfg, log=log.append)
        with scheduler._busy:  # as if a cycle were running in another thread
            assert scheduler.trigger("cron") is None
        assert "skipped: a run is going" in log[-1] and runs(gateway) == []
