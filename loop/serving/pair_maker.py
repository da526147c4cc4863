"""Pairs from live traffic: a second answer to a share of prompts, made when the engine is idle.

After a chat exchange is answered, with probability `share` its prompt waits in a bounded queue
for a second answer: from the canary version when one is set, else from the same version with
other sampling (temperature 1, another seed). The worker asks only while no live request is in
flight, and with a lower vLLM priority than live requests, so live traffic is never slowed by it.
A full queue drops the newest prompt. The answer goes to the log writer, which stores the pair.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from loop.serving.router import Router
from store.database import SecondResponse

BACKGROUND_PRIORITY = 10  # vLLM: lower runs first; live requests have 0


@dataclass
class PairJob:
    request_id: str
    messages: list[dict]
    version_id: int
    max_tokens: int | None


class PairMaker:
    def __init__(self, router: Router, post: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]],
                 emit: Callable[[SecondResponse], object],
                 in_flight: Callable[[], int], share: float, max_queue: int = 256,
                 rng: random.Random | None = None) -> None:
        self.router, self.post, self.emit, self.in_flight = router, post, emit, in_flight
        self.share = share
        self.queue: asyncio.Queue[PairJob] = asyncio.Queue(maxsize=max_queue)
        self.rng = rng or random.Random()
        self.made = self.dropped = self.failed = 0

    def offer(self, job: PairJob) -> None:
        if self.share <= 0 or self.rng.random() >= self.share:
            return
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.dropped += 1

    async def run(self) -> None:
        while True:
            job = await self.queue.get()
            try:
                while self.in_flight() > 0:  # yield to live traffic
                    await asyncio.sleep(0.05)
                await self._second(job)
            except Exception as e:  # counted in status and /metrics; live traffic is unaffected
                self.failed += 1
                if self.failed == 1 or self.failed % 100 == 0:
                    print(f"alignloop pair maker: a second answer failed ({self.failed} so far): {e!r}",
                          file=sys.stderr, flush=True)
            finally:
                self.queue.task_done()

    async def _second(self, job: PairJob) -> None:
        routes = self.router.routes
        version = routes.canary if routes.canary is not None and routes.canary != job.version_id else job.version_id
        sampling = {"temperature": 1.0, "seed": self.rng.randrange(2**31)}
        if job.max_tokens:
            sampling["max_tokens"] = job.max_tokens
        body = {"model": routes.engine_name(version), "messages": job.messages, **sampling,
                "priority": BACKGROUND_PRIORITY}
        started = time.perf_counter()
        data = await self.post("/v1/chat/completions", body)
        choice = data["choices"][0]
        self.emit(SecondResponse(
            request_id=job.request_id, text=choice["message"]["content"] or "", version_id=version,
            sampling=sampling, finish_reason=choice.get("finish_reason"),
            latency_ms=(time.perf_counter() - started) * 1000,
            completion_tokens=(data.get("usage") or {}).get("completion_tokens")))
        self.made += 1
