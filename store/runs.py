"""Retrain runs: one at a time, with heartbeats, per-step metrics and a final status.

A run is `running` from `start` to `finish`. Its process sends heartbeats (with its metrics); a
run whose heartbeat is older than `stale_s` is taken for dead (a crash, a reboot, a killed
process): the next `start`, or listing the runs, marks it failed, with that reason. While a live run is
`running`, `start` refuses a second one, so two triggers at once make one run.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from store.database import Store, StoreError

FINAL = ("promoted", "rejected", "held", "failed", "skipped")


class RunBusy(StoreError):
    """A run is going already."""


class Runs:
    def __init__(self, store: Store, stale_s: float = 300.0) -> None:
        self.store, self.stale_s = store, stale_s

    def _expire(self, db, now: datetime) -> None:
        db.execute("""UPDATE runs SET status = 'failed', finished_at = ?,
                          reason = 'no heartbeat since ' || strftime(heartbeat_at, '%Y-%m-%d %H:%M:%S')
                                   || ': its process died (crash, kill or reboot)'
                      WHERE status = 'running' AND heartbeat_at < ?""", [now, now - timedelta(seconds=self.stale_s)])

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest runs, newest first; a dead run is shown failed, not `running` until the next start."""
        with self.store.transaction() as db:
            self._expire(db, datetime.now())
        return self.store.runs(limit)

    def start(self, method: str, trigger: str, config: dict | None = None) -> dict[str, Any]:
        now = datetime.now()
        with self.store.transaction() as db:
            self._expire(db, now)
            running = db.execute("SELECT id, heartbeat_at FROM runs WHERE status = 'running'").fetchone()
            if running:
                raise RunBusy(f"run {running[0]} is going (its last heartbeat {(now - running[1]).total_seconds():.0f} s "
                              f"ago); one run at a time. A run whose process died is taken for dead after "
                              f"{self.stale_s:.0f} s without a heartbeat")
            labels = db.execute("""SELECT count(*) FROM labels l JOIN users u ON u.id = l.user_id
                                   WHERE u.role <> 'system'""").fetchone()[0]
            run_id = db.execute("""INSERT INTO runs (method, trigger, status, config, labels_at_start)
                                   VALUES (?, ?, 'running', ?, ?) RETURNING id""",
                                [method, trigger, json.dumps(config) if config else None, labels]).fetchone()[0]
        return self.get(run_id)

    def get(self, run_id: int) -> dict[str, Any]:
        rows = self.store._dicts("SELECT * FROM runs WHERE id = ?", [run_id])
        if not rows:
            raise StoreError(f"no run {run_id}")
        return rows[0]

    def heartbeat(self, run_id: int, metrics: list[dict[str, Any]] | None = None) -> None:
        """Record step metrics ({step, name, value}) and that the run is alive."""
        with self.store.transaction() as db:
            if not db.execute("UPDATE runs SET heartbeat_at = ? WHERE id = ? AND status = 'running' RETURNING id",
                              [datetime.now(), run_id]).fetchone():
                raise StoreError(f"run {run_id} is not running")
            for m in metrics or []:
                db.execute("INSERT INTO run_metrics (run_id, step, name, value) VALUES (?, ?, ?, ?)",
                           [run_id, int(m["step"]), str(m["name"]), float(m["value"])])

    def finish(self, run_id: int, status: str, reason: str | None = None, metrics: dict | None = None,
               candidate_version_id: int | None = None, snapshot_hash: str | None = None) -> dict[str, Any]:
        if status not in FINAL:
            raise StoreError(f"a run finishes as one of {', '.join(FINAL)}, not {status!r}")
        with self.store.transaction() as db:
            if not db.execute("""UPDATE runs SET status = ?, reason = ?, metrics = ?, candidate_version_id = ?,
                                     snapshot_hash = coalesce(?, snapshot_hash), finished_at = ?
                                 WHERE id = ? AND status = 'running' RETURNING id""",
                              [status, reason, json.dumps(metrics) if metrics is not None else None,
                               candidate_version_id, snapshot_hash, datetime.now(), run_id]).fetchone():
                raise StoreError(f"run {run_id} is not running (it may have been marked failed)")
        return self.get(run_id)
