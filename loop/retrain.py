"""One retrain cycle, driven entirely through the gateway's API:

    register run -> snapshot -> train (child: `accelerate launch -m loop.training.child RUN_DIR`)
      -> register candidate -> evaluate against what serves -> gate -> promote, or reject

Nothing touches what serves until the gate passes: a failed or killed training, a NaN loss or a
crash here leaves the serving version as it was, and the run is recorded as failed with the reason.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loop.client import GatewayClient, GatewayError
from loop.config import Config, to_dict
from loop.evaluation.gate import gate, heldout_prompts, make_judge, win_rate
from loop.training import launch


class RunFailed(RuntimeError):
    pass


def train(cfg: Config, client: GatewayClient, run_id: int, run_dir: Path, job: dict[str, Any]) -> dict[str, Any]:
    """Run the trainer child; forward its metrics as heartbeats; return its result.json."""
    def heartbeat(rows: list[dict[str, Any]]) -> None:  # a NaN loss is the trainer's to report, not a curve point
        finite = [r for r in rows if isinstance(r.get("value"), int | float) and math.isfinite(r["value"])]
        client.call("POST", f"/api/runs/{run_id}/heartbeat", json={"metrics": finite})

    done = launch.launch(job, run_dir, launch.command(cfg.train, cfg.root, run_dir), cfg.train.timeout_s,
                         on_metrics=heartbeat, env={"ALIGNLOOP_RUN_ID": str(run_id)})
    if done.timed_out:
        raise RunFailed(done.error)
    if done.error:
        raise RunFailed(f"training failed: {done.error} (log: {run_dir / 'train.log'})")
    return done.result


def latest_reward_model(client: GatewayClient) -> str | None:
    rows = client.call("GET", "/api/reward_models")
    return rows[0]["path"] if rows else None


def evaluate(cfg: Config, client: GatewayClient, candidate: str, serving: str,
             prompts: list[list[dict[str, str]]]) -> dict[str, Any]:
    g = cfg.gate
    body = {"prompts": prompts, "max_tokens": g.max_tokens, "temperature": g.temperature, "seed": cfg.train.seed}
    cand = client.call("POST", "/api/generate", json={"model": candidate, **body})["answers"]
    serv = client.call("POST", "/api/generate", json={"model": serving, **body})["answers"]
    texts = [p[-1]["content"] for p in prompts]
    judge = make_judge(g, latest_reward_model(client) if g.judge == "reward" else None)
    result = win_rate(texts, [a["text"] for a in cand], [a["text"] for a in serv], judge)
    result["eval_prompts"] = len(prompts)
    result["mean_tokens_candidate"] = sum(a["completion_tokens"] for a in cand) / len(cand)
    result["mean_tokens_serving"] = sum(a["completion_tokens"] for a in serv) / len(serv)
    return result


def run_cycle(cfg: Config, method: str | None = None, trigger: str = "manual", force: bool = False,
              log=print) -> dict[str, Any]:
    """One whole cycle; returns the finished run (or {"status": "busy"} when a run is going)."""
    method = method or cfg.train.method
    client = GatewayClient.for_config(cfg, timeout=600)
    if not client.running():
        raise GatewayError(None, f"no gateway is running at {client.url}: start it with `alignloop serve` "
                           "(or `alignloop up`); retraining goes through it")
    try:
        run = client.call("POST", "/api/runs", json={"method": method, "trigger": trigger, "config": to_dict(cfg)})
    except GatewayError as e:
        if e.status == 409:
            log(f"skipped: {e}")
            return {"status": "busy", "reason": str(e)}
        raise
    run_id = run["id"]
    log(f"run {run_id}: {method}, trigger {trigger}")
    finish: dict[str, Any] = {}
    try:
        finish = _cycle(cfg, client, run, method, force, log)
    except Exception as e:  # the run fails; what serves is untouched
        finish = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    result = client.call("POST", f"/api/runs/{run_id}/finish", json=finish)
    log(f"run {run_id}: {result['status']}" + (f" ({result['reason']})" if result.get("reason") else ""))
    return result


def training_data(manifest: dict[str, Any], method: str) -> tuple[str, int, str]:
    """(hash, count, noun) of what `method` learns from: labelled pairs (DPO; PPO's reward model, plus
    the prompts PPO rolls out on) or thumbs (KTO)."""
    counts, hashes = manifest["counts"], manifest["content_hash"]
    if method == "kto":
        return hashes["feedback"], counts["feedback"], "feedback (thumbs up/down)"
    train_pairs = counts["pairs"] - counts["heldout"]
    if method == "ppo":
        return f"{hashes['pairs']}+{hashes['prompts']}", train_pairs, "labelled pairs"
    return hashes["pairs"], train_pairs, "labelled pairs"


def trained_on(runs: list[dict[str, Any]], method: str, snapshot_hash: str) -> int | None:
    """The run that was promoted last with `method` if it trained on the same data (else None)."""
    promoted = [r for r in runs if r["status"] == "promoted" and r["method"] == method]  # newest first
    if promoted and promoted[0]["snapshot_hash"] == snapshot_hash:
        return promoted[0]["id"]
    return None


def _cycle(cfg: Config, client: GatewayClient, run: dict[str, Any], method: str, force: bool, log) -> dict[str, Any]:
    run_id = run["id"]
    snap = client.call("POST", "/api/snapshot")
    manifest = snap["manifest"]
    snapshot_hash, count, noun = training_data(manifest, method)
    log(f"run {run_id}: snapshot {snap['dir']}: {manifest['counts']}")
    same = trained_on(client.call("GET", "/api/runs"), method, snapshot_hash)
    if not force and same is not None:
        return {"status": "skipped", "reason": f"no new {noun} since {method} run {same}",
                "snapshot_hash": snapshot_hash}
    if count == 0:
        return {"status": "skipped", "reason": f"no {noun} to train on", "snapshot_hash": snapshot_hash}
    prompts = heldout_prompts(Path(snap["dir"]), cfg.gate.eval_prompts)
    if not prompts:
        return {"status": "skipped", "reason": "no held-out prompts to evaluate on", "snapshot_hash": snapshot_hash}
    status = client.call("GET", "/api/status")
    serving_id = status["serving"]
    versions = {v["id"]: v for v in client.call("GET", "/api/versions")}
    init_adapter = versions[serving_id]["adapter_path"] if cfg.train.from_serving and serving_id else None
    run_dir = cfg.data_dir / "runs" / f"run-{run_id}"
    job = {"method": method, "snapshot": snap["dir"], "base_model": str(cfg.base_model_dir),
           "init_adapter": init_adapter, "output_adapter": str(run_dir / "adapter"), "train": asdict(cfg.train),
           "reward": asdict(cfg.reward), "ppo": asdict(cfg.ppo), "kto": asdict(cfg.kto), "eval_prompts": prompts}
    started = time.monotonic()
    trained = train(cfg, client, run_id, run_dir, job)
    train_seconds = time.monotonic() - started
    log(f"run {run_id}: trained in {train_seconds:.0f} s: {trained['metrics']}")
    reward_model = None
    if trained.get("reward_model"):
        rm = trained["reward_model"]
        reward_model = client.call("POST", "/api/reward_models", json={
            "path": rm["path"], "run_id": run_id, "base_model": str(cfg.base_model_dir),
            "snapshot_hash": manifest["content_hash"]["pairs"], "accuracy": rm["accuracy"], "metrics": rm["metrics"]})
        log(f"run {run_id}: reward model {reward_model['id']}: held-out accuracy {rm['accuracy']}")
    candidate = client.call("POST", "/api/versions", json={
        "adapter_path": trained["adapter"], "method": method, "parent_id": serving_id,
        "snapshot_hash": snapshot_hash, "config": to_dict(cfg), "metrics": trained["metrics"]})
    evaluation = evaluate(cfg, client, candidate["name"], versions[serving_id]["name"], prompts)
    metrics = {**trained["metrics"], **evaluation, "train_seconds": train_seconds, "serving_version": serving_id,
               "train_examples": count, "reward_model_id": reward_model["id"] if reward_model else None}
    ok, reason = gate(metrics, cfg.gate)
    log(f"run {run_id}: {candidate['name']} vs {versions[serving_id]['name']}: {reason}")
    common = {"metrics": metrics, "candidate_version_id": candidate["id"], "snapshot_hash": snapshot_hash}
    if not ok:
        client.call("POST", f"/api/versions/{candidate['id']}/status", json={"status": "rejected"})
        return {"status": "rejected", "reason": reason, **common}
    client.call("POST", "/api/promote", json={"version": candidate["name"], "reason": f"run {run_id}: {reason}"})
    return {"status": "promoted", "reason": reason, **common}
