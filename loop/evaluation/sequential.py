"""Wald's sequential probability ratio test on a rate of bad outcomes (pure functions, no I/O).

The monitor after a promotion watches, per signal (errors, answers cut off, empty answers, thumbs
down), whether the new version's rate of bad outcomes is its predecessor's `p0` (H0) or worse by
at least `delta` (H1: p1 = p0 + delta). Each observation adds its log-likelihood ratio; the test
ends at the first crossing: above log((1 - beta) / alpha) it has found a regression (false alarm
at most `alpha` when H0 holds), below log(beta / (1 - alpha)) it accepts the version (missing a
regression of `delta` at most `beta` of the time). Wald, "Sequential Tests of Statistical
Hypotheses" (1945).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

REGRESSION, FINE, WATCHING = "regression", "fine", "watching"


def baseline_rate(bad: int, n: int, floor: float, z: float = 1.645) -> float:
    """The predecessor's rate for H0 from `bad` of `n`: the upper end of its one-sided 95% Wilson
    interval, at least `floor`. Its upper bound, not its estimate: a baseline that came out low by
    chance would make a version exactly as good look worse over a long watch (measured:
    `ops/bench/results/rollback.md`)."""
    if n == 0:
        return max(floor, 1.0)
    p = bad / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max((centre + spread) / (1 + z * z / n), floor)


@dataclass
class SPRT:
    p0: float
    p1: float
    alpha: float
    beta: float
    llr: float = 0.0
    n: int = 0
    bad: int = 0
    state: str = WATCHING

    @classmethod
    def for_baseline(cls, p0: float, delta: float, alpha: float, beta: float) -> SPRT:
        p0 = min(max(p0, 1e-6), 1 - delta - 1e-6)
        return cls(p0, p0 + delta, alpha, beta)

    @property
    def upper(self) -> float:
        return math.log((1 - self.beta) / self.alpha)

    @property
    def lower(self) -> float:
        return math.log(self.beta / (1 - self.alpha))

    def update(self, is_bad: bool) -> str:
        """Add one observation (ignored once the test has ended); the state after it."""
        if self.state != WATCHING:
            return self.state
        self.n += 1
        self.bad += is_bad
        self.llr += math.log(self.p1 / self.p0) if is_bad else math.log((1 - self.p1) / (1 - self.p0))
        if self.llr >= self.upper:
            self.state = REGRESSION
        elif self.llr <= self.lower:
            self.state = FINE
        return self.state

    def summary(self) -> dict[str, float | int | str]:
        return {"state": self.state, "baseline_rate": round(self.p0, 4), "regression_rate": round(self.p1, 4),
                "observed": self.n, "bad": self.bad, "rate": round(self.bad / self.n, 4) if self.n else None,
                "llr": round(self.llr, 3), "upper": round(self.upper, 3), "lower": round(self.lower, 3)}
