"""Per-caller rate limits for `/v1`: a token bucket per API key (or per address when anonymous).

A caller may make `burst` requests at once and `rate` a second on average; beyond that the
gateway answers 429 with the seconds to wait. Buckets live in memory (one gateway process);
idle ones are forgotten when there are too many.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

MAX_BUCKETS = 100_000


@dataclass
class Bucket:
    tokens: float
    at: float


class RateLimiter:
    def __init__(self, rate: float, burst: int, clock=time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, Bucket] = {}

    def wait_s(self, key: str) -> float:
        """0 when `key` may make a request now (and it is counted), else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_full(now)
            b = self._buckets[key] = Bucket(float(self.burst), now)
        b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rate)
        b.at = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        return (1.0 - b.tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that have refilled (their callers are idle): they would start full anyway."""
        full_after = self.burst / self.rate
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.at < full_after}
        if len(self._buckets) >= MAX_BUCKETS:
            self._buckets.clear()


def retry_after(wait_s: float) -> str:
    """The Retry-After header's whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))
