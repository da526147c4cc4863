"""The scheduler: retrains by a cron rule (nightly by default) and/or once enough new labels came.

APScheduler runs the triggers; each calls `run_cycle` in its own thread, with `train.method` or,
when `schedule.alternate` lists several ("dpo,ppo"), the next one in turn after the last run's. One run at a time: a
trigger that fires while a run is going is skipped and logged (here, and by the gateway, which
refuses a second running run, so two scheduler processes cannot overlap either).
With `labeling.order = "active"` it also re-ranks the labelling queue every
`schedule.rank_every_s` (loop/queue_ranker.py), except while a run goes (a run ranks at its end).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime

from loop.client import GatewayClient, GatewayError
from loop.config import Config
from loop.retrain import run_cycle


def next_in_turn(methods: list[str], last: str | None) -> str:
    """The method after `last` in `methods`, wrapping round; the first when `last` is not in it."""
    if last not in methods:
        return methods[0]
    return methods[(methods.index(last) + 1) % len(methods)]


class Scheduler:
    def __init__(self, cfg: Config, log=print) -> None:
        self.cfg, self.log = cfg, log
        self._busy = threading.Lock()
        self._sched = None

    def trigger(self, reason: str) -> dict | None:
        """Run one cycle now unless one is going; returns the run, or None when skipped."""
        if not self._busy.acquire(blocking=False):
            self.log(f"{datetime.now():%H:%M:%S} scheduler: {reason} trigger skipped: a run is going")
            return None
        try:
            return run_cycle(self.cfg, method=self.next_method(), trigger=reason, log=self.log)
        except Exception as e:  # a broken cycle must not stop the scheduler
            self.log(f"{datetime.now():%H:%M:%S} scheduler: {reason} run failed to start: {e}")
            return None
        finally:
            self._busy.release()

    def rank(self) -> dict | None:
        """Re-rank the labelling queue now, unless a run is going; returns what was done."""
        from loop.queue_ranker import rank

        if not self._busy.acquire(blocking=False):
            return None
        client = GatewayClient.for_config(self.cfg, timeout=600)
        try:
            return rank(self.cfg, client, log=lambda line: self.log(f"{datetime.now():%H:%M:%S} scheduler: {line}"))
        except Exception as e:  # the queue keeps its last order; the scheduler goes on
            self.log(f"{datetime.now():%H:%M:%S} scheduler: the labelling queue was not ranked: {type(e).__name__}: {e}")
            return None
        finally:
            client.close()
            self._busy.release()

    def next_method(self) -> str:
        """train.method, or with [schedule] alternate the method after the last run's in that list."""
        methods = self.cfg.schedule.methods()
        if not methods:
            return self.cfg.train.method
        client = GatewayClient.for_config(self.cfg)
        try:
            runs = client.call("GET", "/api/runs")
        finally:
            client.close()
        return next_in_turn(methods, runs[0]["method"] if runs else None)

    def enough_new_labels(self) -> bool:
        need = self.cfg.schedule.min_new_labels
        if need <= 0:
            return False
        client = GatewayClient.for_config(self.cfg)
        try:
            labels = sum(r["labels"] for r in client.call("GET", "/api/stats")["labels_per_labeller"])
            runs = client.call("GET", "/api/runs")
        except GatewayError:
            return False
        finally:
            client.close()
        since = runs[0]["labels_at_start"] if runs else 0
        return labels - (since or 0) >= need

    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.cron import CronTrigger

        s = self.cfg.schedule
        self._sched = BackgroundScheduler()
        if s.cron:
            self._sched.add_job(self.trigger, CronTrigger.from_crontab(s.cron), args=["cron"], id="cron",
                                max_instances=1, coalesce=True, misfire_grace_time=3600)
        if s.min_new_labels > 0:
            self._sched.add_job(self._check_labels, "interval", seconds=s.check_every_s, id="labels",
                                max_instances=1, coalesce=True)
        if self.cfg.labeling.order == "active" and s.rank_every_s > 0:
            self._sched.add_job(self.rank, "interval", seconds=s.rank_every_s, id="rank", max_instances=1, coalesce=True)
        self._sched.start()
        rules = [f"cron '{s.cron}'"] if s.cron else []
        rules += [f"every {s.min_new_labels} new labels"] if s.min_new_labels else []
        ranks = self.cfg.labeling.order == "active" and s.rank_every_s > 0
        self.log(f"scheduler: retrains on {' and '.join(rules) or 'nothing (no rule set)'}"
                 + (f"; re-ranks the labelling queue every {s.rank_every_s:g} s" if ranks else ""))

    def _check_labels(self) -> None:
        if self.enough_new_labels():
            self.trigger("labels")

    def stop(self) -> None:
        if self._sched:
            self._sched.shutdown(wait=False)

    def run_forever(self) -> None:
        self.start()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
