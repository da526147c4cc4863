"""The watch after a promotion: is the new version worse, live, than the one it replaced?

When a promotion is recorded (a retrain's, or an admin's; not one from before the gateway started,
nor the monitor's own rollback), the monitor takes the previous
version's rates of bad outcomes from its newest live traffic (`monitor.baseline` requests and as
many thumbs) and then follows the new version's live requests as the log writer stores them:

    errors       the gateway answered 5xx (a 503 is the engine being away, not the version: skipped)
    cut_off      an answer stopped at max_tokens (finish_reason "length")
    empty        an answer with no text
    thumbs_down  a user's thumb down on one of its answers

Each signal with enough baseline (`monitor.min_baseline`) gets a sequential test
(`loop.evaluation.sequential.SPRT`, error rate `monitor.alpha` shared among the signals). The first
signal that finds a regression rolls the version back (to the one it replaced, actor "monitor",
the reason in the promotion record); when every test accepts, or after `monitor.watch_requests`
requests, the version is kept. No data is no verdict: while the engine is down or the store cannot
be read, nothing is counted and nothing rolled back. A person who promotes a version the monitor
rolled back overrides it: that version then serves unwatched.

A canary is watched the same way, side by side: its live requests against the serving version's
newest traffic. A regression stops the canary (its share goes back to what serves; the canary is
kept only in memory, like the canary itself); a person who sets the same canary again overrides it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loop.client import version_name as name
from loop.evaluation.sequential import FINE, REGRESSION, SPRT, baseline_rate
from loop.sections import MonitorConfig
from loop.serving.router import Router
from loop.serving.versions import StaleServing, Versions, VersionError
from store.database import Store

SIGNALS = ("errors", "cut_off", "empty", "thumbs_down")
ENGINE_AWAY = 503
ROLLBACK_TRIES = 10  # then the watch ends as "rollback failed" (e.g. the previous version can no longer serve)


@dataclass
class Watch:
    version: int
    previous: int
    exchange_after: int
    feedback_after: int
    tests: dict[str, SPRT] = field(default_factory=dict)
    unwatched: dict[str, str] = field(default_factory=dict)  # signal -> why it is not watched
    requests: int = 0
    rollback_failures: int = 0
    outcome: str = "watching"  # watching | regression (rolling back) | rolled back | rollback failed | kept | superseded
    #                             a canary's: watching | regression | canary stopped | kept | ended | overridden
    reason: str = ""
    started: float = field(default_factory=time.time)

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "against": self.previous, "outcome": self.outcome, "reason": self.reason,
                "requests": self.requests, "since": self.started,
                "signals": {name: t.summary() for name, t in self.tests.items()}, "unwatched": self.unwatched}


def bad(signal: str, outcome: dict[str, Any]) -> bool | None:
    """Whether a live exchange was bad by `signal` (None: it says nothing about that signal)."""
    status = outcome["status"]
    if status == ENGINE_AWAY or 400 <= status < 500:
        return None  # the engine was away, or the client erred: not the version's doing
    if signal == "errors":
        return status >= 500
    return bool(outcome[signal]) if status == 200 else None


class Monitor:
    def __init__(self, cfg: MonitorConfig, store: Store, router: Router, versions: Versions,
                 engine_ready: Callable[[], bool], log: Callable[[str], None] | None = None) -> None:
        self.cfg, self.store, self.router, self.versions, self.engine_ready = cfg, store, router, versions, engine_ready
        self.log = log or (lambda m: print(f"alignloop monitor: {m}", file=sys.stderr, flush=True))
        self.watch: Watch | None = None
        self.canary: Watch | None = None  # the watch of the canary, against what serves
        newest = store.newest_promotion(router.routes.alias)
        self.seen = newest["id"] if newest else 0  # promotions before the gateway started are not watched
        self.rollbacks = 0
        self.failures = 0  # checks that could not read the store or could not roll back
        self.last_rollback: dict[str, Any] | None = None

    # --- one pass ---------------------------------------------------------------------------------

    def check(self) -> None:
        """Notice a promotion, count the new live outcomes, decide; never raises."""
        if not self.cfg.enabled:
            return
        try:
            self._check_promotion()
            self._check_canary()
        except Exception as e:  # the store unreadable, a bug: count it, decide nothing
            self.failures += 1
            self.log(f"check failed, nothing decided: {type(e).__name__}: {e}")

    def _check_promotion(self) -> None:
        # the promotion record first, then the routes: a promotion flips the routes before it is
        # recorded, so a record that does not match what serves has a newer one on its way
        newest = self.store.newest_promotion(self.router.routes.alias)
        routes = self.router.routes
        if newest and newest["id"] > self.seen and newest["version_id"] == routes.serving:
            self.seen = newest["id"]
            self.watch = None if newest["actor"] == "monitor" else \
                self._start(newest["version_id"], newest["previous_version_id"])
        w = self.watch
        if w is not None and w.version == routes.serving:
            self._follow(w, self._roll_back)

    def _follow(self, w: Watch, act: Callable[[Watch], None]) -> None:
        """Count what is new for a live watch; act on a regression."""
        if w.outcome == "watching":
            if not self.engine_ready():
                return  # no data, no verdict
            self._count(w)
        if w.outcome == REGRESSION:
            act(w)

    def _check_canary(self) -> None:
        routes = self.router.routes
        live = routes.canary if routes.canary is not None and routes.canary_share > 0 else None
        c = self.canary
        if c is not None and c.outcome in ("canary stopped", "overridden"):
            if live == c.version:  # set again by a person: theirs, unwatched
                if c.outcome == "canary stopped":
                    c.outcome = "overridden"
                    self.log(f"canary {name(c.version)} set again after the monitor stopped it: an override")
                return
        elif c is not None and (live, routes.serving) != (c.version, c.previous) and c.outcome in ("watching", REGRESSION):
            c.outcome = "ended"  # stopped, promoted, or what serves changed under it
        if live is None:
            return
        if c is None or (live, routes.serving) != (c.version, c.previous):
            c = self.canary = self._start(live, routes.serving, kind="canary")
        if c is not None:
            self._follow(c, self._stop_canary)

    def _stop_canary(self, c: Watch) -> None:
        try:
            self.versions.set_canary(None, 0.0, expect_canary=c.version)
        except StaleServing as e:
            c.outcome = "ended"
            self.log(f"not stopping canary {c.version}: {e}")
            return
        c.outcome = "canary stopped"
        self.rollbacks += 1
        self.last_rollback = {"version": c.version, "to": c.previous, "reason": c.reason, "at": time.time(),
                              "canary": True}
        self.log(f"stopped canary {name(c.version)}; all traffic to {name(c.previous)}: {c.reason}")

    def _start(self, version: int, previous: int | None, kind: str = "promotion") -> Watch | None:
        if previous is None or previous == version:
            return None
        if kind == "promotion" and self.store.rolled_back_automatically(version):
            self.log(f"{name(version)} serves again after an automatic rollback: a person's override, not watched")
            return None
        exchange_after, feedback_after = self.store.newest_ids()
        w = Watch(version, previous, exchange_after, feedback_after)
        c = self.cfg
        baseline = {s: [] for s in SIGNALS}
        for outcome in self.store.live_outcomes(previous, before_id=exchange_after, limit=c.baseline):
            for s in SIGNALS[:3]:
                if (b := bad(s, outcome)) is not None:
                    baseline[s].append(b)
        baseline["thumbs_down"] = [bool(t["down"]) for t in
                                   self.store.live_thumbs(previous, before_id=feedback_after, limit=c.baseline)]
        watched = [s for s in SIGNALS if len(baseline[s]) >= c.min_baseline]
        for s in SIGNALS:
            if s not in watched:
                w.unwatched[s] = (f"{len(baseline[s])} baseline observations of {name(previous)}, "
                                  f"fewer than {c.min_baseline}")
                continue
            p0 = baseline_rate(sum(baseline[s]), len(baseline[s]), c.rate_floor)
            w.tests[s] = SPRT.for_baseline(p0, c.min_regression, c.alpha / len(watched), c.beta)
        if not w.tests:
            counts = ", ".join(f"{s} {len(baseline[s])}" for s in SIGNALS)
            w.outcome, w.reason = "kept", (f"not watched: no signal has a baseline (observations of {name(previous)}: "
                                           f"{counts}; each needs {c.min_baseline})")
        self.log(f"watching {'canary ' if kind == 'canary' else ''}{name(version)} against {name(previous)}: "
                 f"{', '.join(sorted(w.tests)) or 'nothing'}" + (f" ({w.reason})" if w.reason else ""))
        return w

    def _count(self, w: Watch) -> None:
        for outcome in self.store.live_outcomes(w.version, after_id=w.exchange_after, limit=10_000):
            w.exchange_after = outcome["id"]
            if bad("errors", outcome) is not None:
                w.requests += 1
            for s in SIGNALS[:3]:
                if s in w.tests and (b := bad(s, outcome)) is not None:
                    w.tests[s].update(b)
        for thumb in self.store.live_thumbs(w.version, after_id=w.feedback_after, limit=10_000):
            w.feedback_after = thumb["id"]
            if "thumbs_down" in w.tests:
                w.tests["thumbs_down"].update(bool(thumb["down"]))
        found = [s for s, t in w.tests.items() if t.state == REGRESSION]
        if found:
            s, t = found[0], w.tests[found[0]]
            w.outcome = REGRESSION
            w.reason = (f"{s}: {t.bad} of {t.n} ({t.bad / t.n:.0%}) against {t.p0:.0%} for {name(w.previous)}; "
                        f"sequential test at alpha {t.alpha:.4f}, after {w.requests} live requests")
        elif all(t.state == FINE for t in w.tests.values()):
            w.outcome, w.reason = "kept", f"every signal as good as {name(w.previous)}'s after {w.requests} requests"
        elif w.requests >= self.cfg.watch_requests:
            w.outcome, w.reason = "kept", f"no regression found in {w.requests} requests (monitor.watch_requests)"

    def _roll_back(self, w: Watch) -> None:
        try:
            self.versions.promote(w.previous, actor="monitor", expect_serving=w.version,
                                  reason=f"automatic rollback of {name(w.version)}: {w.reason}")
        except StaleServing as e:  # a person promoted something else meanwhile: theirs to watch
            w.outcome = "superseded"
            self.log(f"not rolling back {name(w.version)}: {e}")
            return
        except VersionError as e:
            self.failures += 1
            w.rollback_failures += 1
            if w.rollback_failures >= ROLLBACK_TRIES:
                w.outcome = "rollback failed"
                w.reason += f"; rolling back failed {ROLLBACK_TRIES} times: {e}"
            self.log(f"rollback of {name(w.version)} failed ({w.rollback_failures}/{ROLLBACK_TRIES}): {e}")
            return
        w.outcome = "rolled back"
        self.rollbacks += 1
        self.last_rollback = {"version": w.version, "to": w.previous, "reason": w.reason, "at": time.time()}
        self.log(f"rolled back {name(w.version)} to {name(w.previous)}: {w.reason}")

    # --- for the gateway ----------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.check)
            await asyncio.sleep(self.cfg.check_every_s)

    def status(self) -> dict[str, Any]:
        return {"enabled": self.cfg.enabled, "watch": self.watch.summary() if self.watch else None,
                "canary": self.canary.summary() if self.canary else None,
                "rollbacks": self.rollbacks, "last_rollback": self.last_rollback, "failures": self.failures}
