"""Answers that are not live traffic: two answers for the arena, and a version's answers to many
prompts for evaluation. Neither is logged as an exchange nor offered to the pair maker."""

from __future__ import annotations

import asyncio
from typing import Any

from loop.serving.gateway import Gateway
from loop.serving.protocol import GenerateRequest, HTTPProblem
from loop.serving.versions import VersionError

EVAL_PRIORITY = 5  # vLLM: lower runs first; live requests have 0, the pair maker 10
EVAL_CONCURRENCY = 16


async def arena(gw: Gateway, messages: list[dict[str, str]], max_tokens: int, user_id: int) -> dict[str, Any]:
    """Two live answers to one prompt, as a new pair handed to this labeller: serving vs the canary
    (or the previous version), else two samples of what serves."""
    if not gw.engine_ready():
        raise gw.unavailable("starting or restarting")
    r = gw.router.routes
    other = r.canary if r.canary is not None else (r.previous if r.previous in r.engine_names else r.serving)

    async def answer(version: int, seed: int) -> str:
        body = {"model": r.engine_name(version), "messages": messages, "max_tokens": max_tokens,
                "temperature": 1.0, "seed": seed}
        data = await gw.engine_json("/v1/chat/completions", body)
        return data["choices"][0]["message"]["content"] or ""

    for attempt in range(3):  # two samples can come out the same; try again with other seeds
        a, b = await asyncio.gather(answer(r.serving, 2 * attempt), answer(other, 2 * attempt + 1))
        pair_id = await asyncio.to_thread(gw.store.add_generated_pair, messages, (a, r.serving), (b, other), "arena", 2)
        if pair_id is not None:
            return await asyncio.to_thread(gw.queue.lease, user_id, pair_id)
    raise HTTPProblem(409, "both answers came out the same three times; try another prompt")


async def generate(gw: Gateway, req: GenerateRequest) -> dict[str, Any]:
    """Answers from one version to many prompts, for evaluation: behind live traffic in the
    engine's queue."""
    try:
        engine_model = await asyncio.to_thread(gw.versions.load, req.model)
    except VersionError as e:
        raise HTTPProblem(404, str(e), code="model_not_found") from None
    if not gw.engine_ready():
        raise gw.unavailable("starting or restarting")
    limit = asyncio.Semaphore(EVAL_CONCURRENCY)

    async def one(i: int, messages: list[dict[str, str]]) -> dict[str, Any]:
        body = {"model": engine_model, "messages": messages, "max_tokens": req.max_tokens,
                "temperature": req.temperature, "seed": req.seed + i, "priority": EVAL_PRIORITY}
        async with limit:
            data = await gw.engine_json("/v1/chat/completions", body)
        return {"text": data["choices"][0]["message"]["content"] or "",
                "completion_tokens": data["usage"]["completion_tokens"]}

    answers = await asyncio.gather(*(one(i, m) for i, m in enumerate(req.prompts)))
    return {"model": req.model, "answers": answers}
