"""One retrain cycle, driven entirely through the gateway's API:

    register run -> snapshot -> train (child: `accelerate launch -m loop.train RUN_DIR`)
      -> register candidate -> evaluate against what serves -> gate -> promote, or reject

Nothing touches what serves until the gate passes: a failed or killed training, a NaN loss or a
crash here leaves the serving version as it was, and the run is recorded as failed with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loop.client import GatewayClient, GatewayError
from loop.config import Config, to_dict
from loop.evaluate import gate, make_judge, win_rate


class RunFailed(RuntimeError):
    pass


def train_command(cfg: Config, run_dir: Path) -> list[str]:
    """The trainer as a child under `accelerate launch`, so the same command scales out with an
    accelerate/DeepSpeed config (`train.accelerate_config`)."""
    from loop.engine import has_cuda

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(cfg.train.num_processes)]
    if cfg.train.accelerate_config:
        cmd += ["--config_file", str((cfg.root / cfg.train.accelerate_config).resolve())]
    if not has_cuda():
        cmd.append("--cpu")
    if cfg.train.num_processes == 1:
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return cmd + ["-m", "loop.train", str(run_dir)]


def train(cfg: Config, client: GatewayClient, run_id: int, run_dir: Path, job: dict[str, Any]) -> dict[str, Any]:
    """Run the trainer child; forward its metrics as heartbeats; return its result.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.json").write_text(json.dumps(job, indent=2))
    metrics_path = run_dir / "metrics.jsonl"
    with (run_dir / "train.log").open("wb") as log:
        proc = subprocess.Popen(train_command(cfg, run_dir), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "ALIGNLOOP_RUN_ID": str(run_id)})
    (run_dir / "train.pid").write_text(str(proc.pid))
    sent, deadline = 0, time.monotonic() + cfg.train.timeout_s
    try:
        while True:
            done = proc.poll() is not None
            lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
            complete = lines if done else lines[:-1]  # the last line may be half-written
            new = [json.loads(line) for line in complete[sent:] if line.strip()]
            client.call("POST", f"/api/runs/{run_id}/heartbeat", json={"metrics": new})
            sent += len(new)
            if done:
                break
            if time.monotonic() > deadline:
                raise RunFailed(f"training took longer than {cfg.train.timeout_s:.0f} s (train.timeout_s)")
            time.sleep(2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        error = run_dir / "error.txt"
        why = error.read_text().strip() if error.exists() else f"exit code {proc.returncode} (killed?)"
        raise RunFailed(f"training failed: {why} (log: {run_dir / 'train.log'})")
    return json.loads((run_dir / "result.json").read_text())


def heldout_prompts(snapshot_dir: Path, limit: int) -> list[list[dict[str, str]]]:
    """Prompts never trained on: those of held-out pairs first, then logged prompts in no training pair."""
    import pyarrow.parquet as pq

    pairs = pq.read_table(snapshot_dir / "pairs.parquet").to_pylist()
    trained = {json.dumps(p["prompt"], sort_keys=True) for p in pairs if p["split"] == "train"}
    out, seen = [], set(trained)
    rows = [p["prompt"] for p in pairs if p["split"] == "heldout"]
    rows += [p["prompt"] for p in pq.read_table(snapshot_dir / "prompts.parquet").to_pylist()]
    for prompt in rows:
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(prompt)
        if len(out) == limit:
            break
    return out


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
    client = GatewayClient(cfg, timeout=600)
    if not client.running():
        raise GatewayError(f"no gateway is running at {client.url}: start it with `alignloop serve` "
                           "(or `alignloop up`); retraining goes through it")
    try:
        run = client.call("POST", "/api/runs", json={"method": method, "trigger": trigger, "config": to_dict(cfg)})
    except GatewayError as e:
        if "409" in str(e):
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
