"""Answers that are not live traffic: two answers for the arena, a version's answers to many
prompts for evaluation, and the PPO trainer's rollouts. None is logged as an exchange nor offered
to the pair maker."""

from __future__ import annotations

import asyncio
from typing import Any

from loop.serving.gateway import Gateway
from loop.serving.protocol import GenerateRequest, HTTPProblem, RolloutRequest
from loop.serving.versions import VersionError

EVAL_PRIORITY = 5  # vLLM: lower runs first; live requests have 0, the pair maker 10
EVAL_CONCURRENCY = 16
ROLLOUT_PRIORITY = 20  # behind everything else: a trainer's rollouts wait for every user
ROLLOUT_CONCURRENCY = 64
# sampling from the policy itself: a model's generation_config.json may carry defaults (Qwen2.5:
# top_k 20, top_p 0.8, a repetition penalty) that vLLM applies to every parameter left unset
NEUTRAL_SAMPLING = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                    "presence_penalty": 0.0, "frequency_penalty": 0.0}


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


def rollout_seed(seed: int, i: int) -> int:
    """The engine's seed for prompt i of a rollout batch. Not seed + i: PPO's steps ask with seeds
    1 apart, and seed + i gave step s+1 31 of step s's 32 random streams (the same draws for the
    first token, step after step: little exploration, and the policy moved 1 nat further from the
    base in every benchmark seed). Batches of distinct seeds get disjoint streams."""
    return (seed * 1_000_003 + i) % 2**63


async def rollouts(gw: Gateway, req: RolloutRequest) -> dict[str, Any]:
    """The PPO trainer's rollouts: one answer per prompt from its rollout adapter, as token ids (the
    trainer scores exactly the tokens that were sampled) with the engine's log-probability of each
    (before temperature: vLLM's raw log-probs), on the replicas that hold the adapter, at the
    lowest priority."""
    holders = [r for r in gw.replicas.ready() if req.adapter in r.adapters]
    if not holders:
        raise HTTPProblem(404, f"no ready replica holds the rollout adapter {req.adapter!r}; "
                               "load it with POST /api/rollouts/adapters", code="model_not_found")
    others = tuple(r for r in gw.replicas.members if r not in holders)
    limit = asyncio.Semaphore(ROLLOUT_CONCURRENCY)

    async def one(i: int, ids: list[int]) -> dict[str, Any]:
        body = {"model": req.adapter, "prompt": ids, "max_tokens": req.max_tokens, "min_tokens": req.min_tokens,
                "temperature": req.temperature, **NEUTRAL_SAMPLING, "seed": rollout_seed(req.seed, i),
                "priority": ROLLOUT_PRIORITY, "return_token_ids": True, "logprobs": 0}
        async with limit:
            data = await gw.engine_json("/v1/completions", body, exclude=others)
        choice = data["choices"][0]
        return {"token_ids": choice["token_ids"], "finish_reason": choice["finish_reason"],
                "logprobs": (choice.get("logprobs") or {}).get("token_logprobs")}

    completions = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(req.prompts)))
    return {"adapter": req.adapter, "completions": completions,
            "completion_tokens": sum(len(c["token_ids"]) for c in completions)}
