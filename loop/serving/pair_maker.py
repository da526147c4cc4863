"""Pairs from live traffic: a second answer to a share of prompts, made when the engine is idle.

After a chat exchange is answered, with probability `share` its prompt waits in a bounded queue
for a second answer: from the canary version when one is set, else from the same version with
other sampling (temperature 1, another seed). The worker asks only while no live request is in
flight, and with a lower vLLM priority than live requests, so live traffic is never slowed by it.
A full queue drops the newest prompt. The answer goes to the log writer, which stores the pair.

With `labeling.order = "active"` the draw also weighs novelty, as the labelling queue does
(loop/evaluation/active.py): a prompt that already has n pairs (stored, or made since start) gets a
second answer with probability share / (1 + n), so the engine's idle time and the people's labels
go to prompts not paired yet rather than to the hundredth "hi". The reward model's uncertainty
cannot weigh here: it needs both answers, and the second is what is being decided.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
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


def prompt_key(messages_json: str) -> bytes:
    """A short fixed-size key of a prompt (its messages as the store keeps them, JSON text), so
    counting pairs per prompt costs 8 bytes a prompt, not the prompt."""
    return hashlib.blake2b(messages_json.encode(), digest_size=8).digest()


def chance(share: float, pairs_of_prompt: int) -> float:
    """A prompt's chance of a second answer when novelty weighs: share / (1 + its pairs so far)."""
    return share / (1 + pairs_of_prompt)


class PairMaker:
    def __init__(self, router: Router, post: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]],
                 emit: Callable[[SecondResponse], object],
                 in_flight: Callable[[], int], share: float, max_queue: int = 256,
                 rng: random.Random | None = None, novelty: Iterable[tuple[str, int]] | None = None) -> None:
        """`novelty`: (prompt's messages as JSON text, pairs it has) for every paired prompt, to weigh
        novelty in the draw; None draws every prompt with probability `share`."""
        self.router, self.post, self.emit, self.in_flight = router, post, emit, in_flight
        self.share = share
        self.queue: asyncio.Queue[PairJob] = asyncio.Queue(maxsize=max_queue)
        self.rng = rng or random.Random()
        self.per_prompt = None if novelty is None else Counter({prompt_key(m): n for m, n in novelty})
        self.made = self.dropped = self.failed = 0
        self._answering = 0  # 1 while the worker is answering a job it took off the queue

    @property
    def pending(self) -> int:
        """Prompts waiting for their second answer or being answered now: 0 once all that was
        offered has been made (or has failed) and handed to the log writer."""
        return self.queue.qsize() + self._answering

    def offer(self, job: PairJob) -> None:
        if self.share <= 0:
            return
        key = None if self.per_prompt is None else prompt_key(json.dumps(job.messages, ensure_ascii=False))
        before = 0 if key is None else self.per_prompt[key]
        if self.rng.random() >= chance(self.share, before):
            return
        if key is not None:
            self.per_prompt[key] += 1
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.dropped += 1

    async def run(self) -> None:
        while True:
            job = await self.queue.get()
            self._answering = 1
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
                self._answering = 0
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
