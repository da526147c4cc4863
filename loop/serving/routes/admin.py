"""The admin API (`/api`): users, guidelines, versions and promotion, runs and their data, exports.

The CLI, the scheduler and the admin pages of the labelling app all come through here: the gateway
is the only process that writes the store.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi import Path as PathParam

from loop.evaluation import reliability
from loop.serving import sampling
from loop.serving.auth import admin
from loop.serving.protocol import (
    ROLLOUT_NAME_PATTERN,
    CanaryRequest,
    ExcludeRequest,
    GenerateRequest,
    GuidelinesRequest,
    HTTPProblem,
    MarginsRequest,
    PromoteRequest,
    RetrainRequest,
    RewardModelIn,
    RolloutAdapterRequest,
    RolloutRequest,
    RunFinish,
    RunMetrics,
    RunStart,
    StatusRequest,
    UserRequest,
    VersionRequest,
    errors,
)
from loop.serving.versions import VersionError, adapter_problem
from store import export
from store.database import StoreError
from store.runs import RunBusy

router = APIRouter(prefix="/api", dependencies=[Depends(admin)], responses=errors(400, 401, 403, 404, 409, 413, 415, 503, 504))
VERSION_ERRORS = (VersionError, StoreError)


def _gw(request: Request):
    return request.app.state.gateway


async def _call(fn: Callable[[], Any], errors: tuple[type[Exception], ...] = (StoreError,), status: int = 400,
                code: str | None = None) -> Any:
    """`fn()` in a worker thread; the named errors become an HTTP error with their message."""
    try:
        return await asyncio.to_thread(fn)
    except errors as e:
        raise HTTPProblem(status, str(e), code=code) from None


@router.get("/openapi.json")
async def schema(request: Request) -> dict[str, Any]:
    """The gateway's OpenAPI schema, for admins (public only with `gateway.public_docs`)."""
    return request.app.openapi()


# --- people and guidelines ---------------------------------------------------------------------

@router.get("/users")
async def users(request: Request) -> list[dict[str, Any]]:
    """Every user (labellers, admins, apps' keys, the system's own) with what each has given."""
    return await asyncio.to_thread(_gw(request).store.user_activity)


@router.post("/users")
async def add_user(body: UserRequest, request: Request) -> dict[str, Any]:
    token = await _call(partial(_gw(request).store.add_user, body.name, body.role), status=409, code="user_exists")
    return {"name": body.name, "role": body.role, "token": token}


@router.post("/users/{name}/token")
async def new_token(name: str, request: Request) -> dict[str, Any]:
    token = await _call(partial(_gw(request).store.new_token, name), status=404, code="not_found")
    request.app.state.tokens.clear()  # the old token stops now ("their old one no longer works")
    return {"name": name, "token": token}


@router.post("/users/{name}/exclude")
async def exclude_user(name: str, body: ExcludeRequest, request: Request, who=Depends(admin)) -> dict[str, Any]:
    """Leave (or take back) everything `name` gave out of every future snapshot."""
    exclude = partial(_gw(request).store.exclude_user, name, who["name"], body.excluded)
    return await _call(exclude, status=404, code="not_found")


@router.put("/guidelines")
async def set_guidelines(body: GuidelinesRequest, request: Request, who=Depends(admin)) -> dict[str, Any]:
    await asyncio.to_thread(_gw(request).store.set_setting, "guidelines", body.text, who["name"])
    return {"text": body.text}


# --- what serves ------------------------------------------------------------------------------

@router.get("/status")
async def status(request: Request) -> dict[str, Any]:
    return await asyncio.to_thread(_gw(request).status)


@router.get("/exchanges")
async def exchanges(request: Request, limit: int = 100) -> list[dict[str, Any]]:
    gw = _gw(request)
    await asyncio.to_thread(gw.writer.flush)
    return await asyncio.to_thread(gw.store.exchanges, min(max(limit, 1), 10_000))


@router.get("/queue")
async def queue(request: Request, limit: int = 20) -> dict[str, Any]:
    """The pairs labellers get next, in that order, and why (each one's active-learning score and
    its parts, when ranked): the admin page's queue, and what `alignloop rank` scores."""
    gw = _gw(request)
    pairs = await asyncio.to_thread(gw.queue.waiting, min(max(limit, 1), 100_000))
    return {"order": gw.cfg.labeling.order, "pairs": pairs}


@router.post("/queue/margins")
async def rank_queue(body: MarginsRequest, request: Request) -> dict[str, Any]:
    """Rank the waiting pairs by the reward model's margins on them (`alignloop rank`)."""
    margins = {m.pair_id: m.margin for m in body.margins}
    return await _call(partial(_gw(request).rank_queue, margins, body.reward_model_id))


@router.get("/versions")
async def versions(request: Request) -> list[dict[str, Any]]:
    return await asyncio.to_thread(_gw(request).store.versions)


@router.post("/versions")
async def add_version(body: VersionRequest, request: Request) -> dict[str, Any]:
    if problem := await asyncio.to_thread(adapter_problem, body.adapter_path):
        raise HTTPProblem(400, problem, param="adapter_path", code="invalid_adapter")
    return await asyncio.to_thread(_gw(request).store.add_version, **body.model_dump())


@router.get("/versions/{ref}/votes")
async def votes(ref: str, request: Request, against: str = "base") -> dict[str, Any]:
    """People's votes between this version and another (`against`, default the base), as this
    version's score per pair (1 won, 0 lost, 1/2 tie; a pair's labellers averaged): what the gate
    counts beside its judge when there are enough."""
    gw = _gw(request)
    version = await _call(partial(gw.store.version, ref), status=404)
    other = await _call(partial(gw.store.version, against), status=404)
    return {"version": version["name"], "against": other["name"],
            "scores": await asyncio.to_thread(gw.store.head_to_head, version["id"], other["id"])}


@router.post("/versions/{ref}/status")
async def set_status(ref: str, body: StatusRequest, request: Request) -> dict[str, Any]:
    gw = _gw(request)
    version = await _call(partial(gw.store.version, ref), status=404)
    if version["id"] == gw.router.routes.serving:
        raise HTTPProblem(400, f"{version['name']} is serving; promote another version first")
    await asyncio.to_thread(gw.store.set_version_status, version["id"], body.status)
    return await asyncio.to_thread(gw.store.version, version["id"])


@router.post("/promote")
async def promote(body: PromoteRequest, request: Request, who=Depends(admin)) -> dict[str, Any]:
    promote = partial(_gw(request).versions.promote, body.version, actor=who["name"], reason=body.reason)
    return await _call(promote, errors=VERSION_ERRORS)


@router.post("/rollback")
async def rollback(request: Request, who=Depends(admin)) -> dict[str, Any]:
    return await _call(partial(_gw(request).versions.rollback, actor=who["name"]), errors=VERSION_ERRORS)


@router.post("/canary")
async def canary(body: CanaryRequest, request: Request) -> dict[str, Any]:
    set_canary = partial(_gw(request).versions.set_canary, body.version, body.share)
    return await _call(set_canary, errors=VERSION_ERRORS)


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request) -> dict[str, Any]:
    return await sampling.generate(_gw(request), body)


# --- the PPO trainer's rollouts on the serving engine (loop/training/engine_sampler.py) ---------

@router.post("/rollouts/adapters")
async def load_rollout_adapter(body: RolloutAdapterRequest, request: Request) -> dict[str, Any]:
    held = await _call(partial(_gw(request).versions.load_rollout, body.name, body.path), errors=VERSION_ERRORS)
    return {"name": body.name, "replicas": held}


@router.delete("/rollouts/adapters/{name}")
async def unload_rollout_adapter(request: Request, name: str = PathParam(pattern=ROLLOUT_NAME_PATTERN)) -> dict[str, Any]:
    return {"name": name, "replicas": await asyncio.to_thread(_gw(request).versions.unload_rollout, name)}


@router.post("/rollouts")
async def rollouts(body: RolloutRequest, request: Request) -> dict[str, Any]:
    return await sampling.rollouts(_gw(request), body)


# --- data out ---------------------------------------------------------------------------------

@router.get("/export/{kind}", responses={200: {"content": {"application/x-ndjson": {}, "application/vnd.apache.parquet": {}}}})
async def export_kind(kind: Literal["pairs", "prompts", "feedback"], request: Request,
                      format: Literal["jsonl", "parquet"] = "jsonl") -> Response:
    """The same export as `alignloop export KIND`, as a download; its manifest in a header."""
    gw = _gw(request)

    def run() -> tuple[bytes, str]:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{kind}.{format}"
            manifest = export.export(gw.store, kind, path, format, gw.cfg.store.heldout_share)
            return path.read_bytes(), json.dumps(asdict(manifest))

    data, manifest = await asyncio.to_thread(run)
    media = "application/x-ndjson" if format == "jsonl" else "application/vnd.apache.parquet"
    return Response(data, media_type=media, headers={
        "Content-Disposition": f'attachment; filename="{kind}.{format}"', "X-Alignloop-Manifest": manifest})


@router.post("/snapshot")
async def snapshot(request: Request) -> dict[str, Any]:
    """Export everything labelled so far to a new snapshot folder for a retrain run."""
    gw = _gw(request)

    def run() -> dict[str, Any]:
        out = gw.cfg.data_dir / "snapshots" / time.strftime("%Y%m%d-%H%M%S")
        while out.exists():
            out = out.with_name(out.name + "-1")
        manifest = export.snapshot(gw.store, out, gw.cfg.store.heldout_share,
                                   accuracy=reliability.snapshot_accuracy(gw.store, gw.cfg.labeling.aggregate))
        return {"dir": str(out), "manifest": asdict(manifest)}

    return await asyncio.to_thread(run)


# --- retrain runs -----------------------------------------------------------------------------

@router.post("/runs")
async def start_run(body: RunStart, request: Request) -> dict[str, Any]:
    start = partial(_gw(request).runs.start, body.method, body.trigger, body.config)
    return await _call(start, errors=(RunBusy,), status=409, code="run_in_progress")


@router.get("/runs")
async def list_runs(request: Request) -> list[dict[str, Any]]:
    return await asyncio.to_thread(_gw(request).runs.recent)


@router.post("/runs/{run_id}/heartbeat")
async def heartbeat(run_id: int, body: RunMetrics, request: Request) -> dict[str, Any]:
    await _call(partial(_gw(request).runs.heartbeat, run_id, [m.model_dump() for m in body.metrics]), status=409)
    return {"ok": True}


@router.post("/runs/{run_id}/finish")
async def finish_run(run_id: int, body: RunFinish, request: Request) -> dict[str, Any]:
    return await _call(partial(_gw(request).runs.finish, run_id, **body.model_dump()), status=409)


@router.post("/reward_models")
async def add_reward_model(body: RewardModelIn, request: Request) -> dict[str, Any]:
    return await asyncio.to_thread(_gw(request).reward_models.add, **body.model_dump())


@router.get("/reward_models")
async def list_reward_models(request: Request, purpose: Literal["reward", "judge"] | None = None) -> list[dict[str, Any]]:
    """Newest first; `purpose=judge`: only the gate's reward models, `reward`: only PPO's."""
    return await asyncio.to_thread(_gw(request).reward_models.list, 100, purpose)


@router.post("/retrain")
async def retrain(body: RetrainRequest, request: Request, who=Depends(admin)) -> dict[str, Any]:
    """Start `alignloop retrain` in the background (it refuses to run beside another run)."""
    cfg = _gw(request).cfg
    cmd = [sys.executable, "-m", "loop.cli"]
    if cfg.path:
        cmd += ["--config", str(cfg.path)]
    cmd += ["retrain", "--trigger", f"button:{who['name']}"]
    if body.method:
        cmd += ["--method", body.method]
    if body.force:
        cmd.append("--force")
    log = cfg.data_dir / "logs" / f"retrain-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=cfg.root)
    return {"started": True, "pid": proc.pid, "log": str(log)}
