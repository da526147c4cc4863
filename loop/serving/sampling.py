"""Answers that are not live traffic: two answers for the arena, a version's answers to many
prompts for evaluation, and the PPO trainer's rollouts. None is logged as an exchange nor offered
to the pair maker."""

from __future__ import annotations

import asyncio
from typing import Any

from loop.serving.gateway import Gateway
from loop.serving.protocol import GenerateRequest, HTTPProblem, RolloutRequest
from loop.serving.versions import VersionError
from loop.vllm_server import NEUTRAL_SAMPLING

EVAL_PRIORITY = 5  # vLLM: lower runs first; live requests have 0, the pair maker 10
EVAL_CONCURRENCY = 16
ROLLOUT_PRIORITY = 20  # behind everything else: a trainer's rollouts wait for every user
ROLLOUT_BATCH = 64  # prompts per engine request (several requests at once reach several replicas)


async def arena(gw: Gateway, messages: list[dict[str, str]], max_tokens: int, user_id: int) -> dict[str, Any]:
    """Two live answers to one prompt, as a new pair handed to this labeller: serving vs the canary
    (or the previous version), else two samples of what serves."""
    if not gw.engine_ready():
        raise gw.unavailable("starting or restarting")
    r = gw.router.routes
    other = r.canary if r.canary is not None else (r.previous if r.previous in r.engine_names else r.serving)
    max_tokens = min(max_tokens, gw.cfg.engine.max_model_len // 2)  # the rest is the prompt's: no length error

    async def answer(version: int, seed: int) -> tuple[str, int, str | None]:
        body = {"model": r.engine_name(version), "messages": messages, "max_tokens": max_tokens,
                "temperature": 1.0, "seed": seed}
        choice = (await gw.engine_json("/v1/chat/completions", body))["choices"][0]
        return choice["message"]["content"] or "", version, choice.get("finish_reason")

    for attempt in range(3):  # two samples can come out the same; try again with other seeds
        a, b = await asyncio.gather(answer(r.serving, 2 * attempt), answer(other, 2 * attempt + 1))
        pair_id = await asyncio.to_thread(gw.store.add_generated_pair, messages, a, b, "arena", 2)
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


async def rollouts(gw: Gateway, req: RolloutRequest) -> dict[str, Any]:
    """The PPO trainer's rollouts: one answer per prompt from its rollout adapter, as token ids (the
    trainer scores exactly the tokens that were sampled) with the engine's log-probability of each
    (before temperature: vLLM's raw log-probs), on the replicas that hold the adapter, at the
    lowest priority. Up to ROLLOUT_BATCH prompts go in one engine request, 14x the tokens/s of a
    request per prompt on 2 cores (the API layers' per-request work was most of the time). With no
    seed: vLLM seeds every prompt of a request alike (the same prompt three times in one seeded
    request came back as three identical answers), so a seed would give the whole batch one random
    stream; unseeded, each answer has its own draws, and rollouts are not reproducible."""
    holders = [r for r in gw.replicas.ready() if req.adapter in r.adapters]
    if not holders:
        raise HTTPProblem(404, f"no ready replica holds the rollout adapter {req.adapter!r}; "
                               "load it with POST /api/rollouts/adapters", code="model_not_found")
    others = tuple(r for r in gw.replicas.members if r not in holders)

    async def batch(ids: list[list[int]]) -> list[dict[str, Any]]:
        body = {"model": req.adapter, "prompt": ids, "max_tokens": req.max_tokens, "min_tokens": req.min_tokens,
                "temperature": req.temperature, **NEUTRAL_SAMPLING, "priority": ROLLOUT_PRIORITY,
                "return_token_ids": True, "logprobs": 0}
        data = await gw.engine_json("/v1/completions", body, exclude=others)
        return [{"token_ids": c["token_ids"], "finish_reason": c["finish_reason"],
                 "logprobs": (c.get("logprobs") or {}).get("token_logprobs")}
                for c in sorted(data["choices"], key=lambda c: c["index"])]

    chunks = [req.prompts[i:i + ROLLOUT_BATCH] for i in range(0, len(req.prompts), ROLLOUT_BATCH)]
    completions = [c for part in await asyncio.gather(*(batch(ids) for ids in chunks)) for c in part]
    return {"adapter": req.adapter, "completions": completions,
            "completion_tokens": sum(len(c["token_ids"]) for c in completions)}
