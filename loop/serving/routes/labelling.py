"""The labelling API (`/api`) for signed-in people: the queue, the arena, guidelines, stats."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from loop.serving import sampling
from loop.serving import stats as dashboard
from loop.serving.auth import signed_in
from loop.serving.protocol import ArenaRequest, HTTPProblem, LabelRequest, errors
from store.database import StoreError
from store.labelling import Answer, LabelConflict, NotLeased

router = APIRouter(prefix="/api", responses=errors(400, 401, 403, 404, 409, 413, 415, 429, 503, 504))

DEFAULT_GUIDELINES = """\
Pick the reply you would rather receive.

- **Better**: answers the question that was asked, correctly, and politely.
- **Tie**: both are about equally good.
- **Both bad**: neither answers the question, or both are rude or wrong.
- **Skip**: you cannot judge this one (say why in the rationale if you can).
"""


async def _next(gw, user_id: int, response: Response) -> dict[str, Any] | None:
    """The labeller's next pair, its server-side time in a Server-Timing header."""
    started = time.perf_counter()
    pair = await asyncio.to_thread(gw.queue.next_pair, user_id)
    response.headers["Server-Timing"] = f"next;dur={(time.perf_counter() - started) * 1000:.2f}"
    return pair


async def _progress(gw, user_id: int) -> dict[str, Any]:
    return await asyncio.to_thread(gw.queue.progress, user_id)


@router.get("/me")
async def me(who=Depends(signed_in)) -> dict[str, Any]:
    return who


@router.get("/label/next")
async def next_pair(request: Request, response: Response, who=Depends(signed_in)) -> dict[str, Any]:
    gw = request.app.state.gateway
    return {"pair": await _next(gw, who["id"], response), "progress": await _progress(gw, who["id"])}


@router.post("/label")
async def label(body: LabelRequest, request: Request, response: Response, who=Depends(signed_in)) -> dict[str, Any]:
    gw = request.app.state.gateway
    started = time.perf_counter()
    try:  # the label and the next pair in one transaction, shared with the labels sent meanwhile
        done = await gw.labels.submit(Answer(who["id"], body.pair_id, body.choice, body.rationale, body.seconds))
    except LabelConflict as e:
        raise HTTPProblem(409, str(e), code="conflict") from None
    except NotLeased as e:
        raise HTTPProblem(403, str(e), "permission_error", code="not_leased") from None
    except StoreError as e:
        raise HTTPProblem(404, str(e), code="not_found") from None
    gw.metrics.labels.inc()
    response.headers["Server-Timing"] = f"next;dur={(time.perf_counter() - started) * 1000:.2f}"  # label included
    return {"label_id": done.label_id, "pair": done.pair, "progress": done.progress}


@router.post("/label/undo")
async def undo(request: Request, who=Depends(signed_in)) -> dict[str, Any]:
    gw = request.app.state.gateway
    pair = await asyncio.to_thread(gw.queue.undo, who["id"])
    if pair is None:
        raise HTTPProblem(404, "nothing to undo", code="not_found")
    return {"pair": pair, "progress": await _progress(gw, who["id"])}


@router.post("/arena")
async def arena(body: ArenaRequest, request: Request, who=Depends(signed_in)) -> dict[str, Any]:
    gw = request.app.state.gateway
    pair = await sampling.arena(gw, [{"role": "user", "content": body.prompt}], body.max_tokens, who["id"])
    return {"pair": pair, "progress": await _progress(gw, who["id"])}


@router.get("/stats")
async def stats(request: Request, who=Depends(signed_in)) -> dict[str, Any]:
    gw = request.app.state.gateway
    return await asyncio.to_thread(lambda: dashboard.stats(gw.store, gw.queue, gw.runs.recent(), who["role"] == "admin",
                                                           gw.cfg.labeling.min_accuracy))


@router.get("/guidelines")
async def guidelines(request: Request, who=Depends(signed_in)) -> dict[str, Any]:
    return {"text": await asyncio.to_thread(request.app.state.gateway.store.setting, "guidelines", DEFAULT_GUIDELINES)}
