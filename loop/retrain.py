"""One retrain cycle, driven entirely through the gateway's API:

    register run -> snapshot -> train (child: `accelerate launch -m loop.training.child RUN_DIR`; it
      also refreshes the gate's reward model on every label) -> register candidate -> both versions
      answer the held-out prompts -> the judge's verdicts -> gate -> promote, reject, or hold

Nothing touches what serves until the gate passes: a failed or killed training, a NaN loss or a
crash here leaves the serving version as it was, and the run is recorded as failed with the reason.
When no judge can be trusted (none configured, a reward model under its accuracy floor, a judge
that is unreachable, slow or answers garbage) the run is `held`: the candidate stays a candidate,
the run says why, and only a person promotes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loop import queue_ranker
from loop.client import GatewayClient, GatewayError
from loop.config import Config, to_dict
from loop.evaluation import judges
from loop.evaluation.gate import Decision, decide, heldout_prompts, newest_prompt_id, shadow_prompts
from loop.evaluation.judges import Judge, JudgeUnavailable
from loop.training import engine_sampler, launch, memory, rollout_engine


class RunFailed(RuntimeError):
    pass


def train(cfg: Config, client: GatewayClient, run_id: int, run_dir: Path, job: dict[str, Any]) -> dict[str, Any]:
    """Run the trainer child; forward its metrics as heartbeats; return its result.json."""
    def heartbeat(rows: list[dict[str, Any]]) -> None:  # a NaN loss is the trainer's to report, not a curve point
        finite = [r for r in rows if isinstance(r.get("value"), int | float) and math.isfinite(r["value"])]
        client.call("POST", f"/api/runs/{run_id}/heartbeat", json={"metrics": finite})

    try:
        memory.preflight(cfg, [job["method"]])
    except memory.DoesNotFit as e:
        raise RunFailed(f"not started: {e}") from None
    env = {"ALIGNLOOP_RUN_ID": str(run_id), **({"CUDA_VISIBLE_DEVICES": cfg.train.devices} if cfg.train.devices else {}),
           **({engine_sampler.TOKEN_ENV: client.token} if job.get("rollouts") and client.token else {}),
           **({rollout_engine.KEY_ENV: secrets.token_urlsafe(24)} if (job.get("rollouts") or {}).get("dedicated") else {})}
    done = launch.launch(job, run_dir, launch.command(cfg.train, cfg.root, run_dir), cfg.train.timeout_s,
                         on_metrics=heartbeat, env=env)
    if done.timed_out:
        raise RunFailed(done.error)
    if done.error:
        raise RunFailed(f"training failed: {done.error} (log: {run_dir / 'train.log'})")
    return done.result


def register_reward_model(cfg: Config, client: GatewayClient, run_id: int, trained: dict[str, Any],
                          snapshot_hash: str, purpose: str) -> dict[str, Any]:
    return client.call("POST", "/api/reward_models", json={
        "path": trained["path"], "run_id": run_id, "base_model": str(cfg.base_model_dir), "snapshot_hash": snapshot_hash,
        "accuracy": trained["accuracy"], "metrics": trained["metrics"], "purpose": purpose})


def latest_judge_model(client: GatewayClient) -> dict[str, Any] | None:
    """The gate's newest reward model (refreshed by the last cycle), or None."""
    rows = client.call("GET", "/api/reward_models", params={"purpose": "judge"})
    if not rows:
        return None
    row = rows[0]
    return {**row, "metrics": json.loads(row["metrics"]) if isinstance(row["metrics"], str) else row["metrics"]}


def judge_fingerprint(cfg: Config, pairs_hash: str) -> str:
    """What the gate's reward model is a function of: the labelled pairs, the base model, and the
    settings it is fitted with."""
    blob = json.dumps({"pairs": pairs_hash, "base": str(cfg.base_model_dir), "reward": asdict(cfg.reward),
                       "train": asdict(cfg.train)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fitted_judge(client: GatewayClient, fingerprint: str) -> dict[str, Any] | None:
    """The gate's newest reward model when it was fitted on the same pairs with the same settings and
    is still on disk: refitting would make the same model again, at the cost of a training run."""
    judge = latest_judge_model(client)
    if judge and judge["metrics"].get("fingerprint") == fingerprint and Path(judge["path"]).exists():
        return judge
    return None


def checkpoint_dir(cfg: Config, job: dict[str, Any], data_hash: str) -> Path:
    """The job's own checkpoint folder, named after what its training is a function of: the method,
    its data by content (`data_hash`; a snapshot's folder is new every cycle), the base, the starting
    adapter, every setting and the prompts kept out of it. The next cycle on the same snapshot finds
    there what a killed run of the job left and resumes; new data or settings name another folder.
    The other folders of the same method are removed: the cycle trains on the newest data only."""
    what = {k: v for k, v in job.items() if k not in ("snapshot", "output_adapter", "checkpoint_dir")}
    blob = json.dumps({**what, "data": data_hash}, sort_keys=True, default=str)
    folder = cfg.data_dir / "checkpoints" / f"{job['method']}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    for old in folder.parent.glob(f"{job['method']}-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def answers(cfg: Config, client: GatewayClient, model: str, prompts: list[list[dict[str, str]]],
            seed: int) -> list[dict[str, Any]]:
    g = cfg.gate
    body = {"model": model, "prompts": prompts, "max_tokens": g.max_tokens, "temperature": g.temperature, "seed": seed}
    return client.call("POST", "/api/generate", json=body)["answers"]


def evaluate(cfg: Config, client: GatewayClient, candidate: str, serving: str, prompts: list[list[dict[str, str]]],
             judge: Judge) -> tuple[list[list[str]], dict[str, Any]]:
    """Both versions answer every prompt `gate.eval_samples` times with the same seeds through the
    engine; the judge's verdicts[sample][prompt] (the candidate as "a"), and the answers' lengths."""
    verdicts, tokens = [], {"candidate": 0, "serving": 0}
    for sample in range(cfg.gate.eval_samples):
        seed = cfg.train.seed + 1000 * sample
        cand, serv = answers(cfg, client, candidate, prompts, seed), answers(cfg, client, serving, prompts, seed)
        verdicts.append(judge.verdicts(prompts, [a["text"] for a in cand], [a["text"] for a in serv]))
        tokens["candidate"] += sum(a["completion_tokens"] for a in cand)
        tokens["serving"] += sum(a["completion_tokens"] for a in serv)
    n = len(prompts) * cfg.gate.eval_samples
    return verdicts, {"eval_prompts": len(prompts), "mean_tokens_candidate": tokens["candidate"] / n,
                      "mean_tokens_serving": tokens["serving"] / n}


def judge_candidate(cfg: Config, client: GatewayClient, candidate: str, serving: str,
                    prompts: list[list[dict[str, str]]], judge_model: dict[str, Any] | None,
                    kl_to_base: float | None, shadow: list[list[dict[str, str]]] | None = None) -> Decision:
    """The gate on `candidate` against `serving`, on the held-out `prompts` and the `shadow` live
    prompts together: a decision, never an exception for a judge's fault (a judge that is missing,
    untrustworthy, unreachable, slow or answering garbage holds the candidate)."""
    shadow = shadow or []
    manual = f"what serves is untouched; a person may still `alignloop promote {candidate}`"
    people = client.call("GET", f"/api/versions/{candidate}/votes", params={"against": serving})["scores"]
    enough_people = len(people) >= cfg.gate.people_min_votes
    try:
        judge, why = judges.choose(cfg.gate, judge_model)
    except (OSError, ValueError) as e:
        judge, why = None, f"the judge could not be loaded ({e})"
    if judge is None and not enough_people:
        return Decision("hold", f"no trustworthy judge: {why}; {len(people)} people's votes, fewer than "
                                f"gate.people_min_votes = {cfg.gate.people_min_votes}; {manual}", {"judge": f"none ({why})"})
    if not prompts and not enough_people:
        return Decision("hold", f"no held-out prompts to judge on; {manual}", {"judge": "none (no held-out prompts)"})
    verdicts: list[list[str]] = []
    extra: dict[str, Any] = {}
    if judge is not None and prompts:
        try:
            verdicts, extra = evaluate(cfg, client, candidate, serving, prompts + shadow, judge)
        except JudgeUnavailable as e:
            if not enough_people:
                return Decision("hold", f"the judge failed: {e}; {manual}", {"judge": f"{judge.name} (failed)"})
            why = f"the judge failed ({e})"
        finally:
            getattr(judge, "close", lambda: None)()
    elif judge is not None:
        why = "no held-out prompts to judge on"
    decision = decide(verdicts, kl_to_base, cfg.gate, {"heldout": len(prompts), "shadow": len(shadow)} if verdicts
                      else None, people)
    decision.stats.update(extra, judge=judge.name if verdicts else f"people's votes only ({why})")
    if decision.outcome == "hold":
        decision.reason += f"; {manual}"
    return decision


def settle(client: GatewayClient, candidate: dict[str, Any], decision: Decision, why: str) -> None:
    """Carry out the gate's decision on a registered candidate: promote it, reject it, or leave it a candidate."""
    if decision.outcome == "promote":
        client.call("POST", "/api/promote", json={"version": candidate["name"], "reason": f"{why}: {decision.reason}"})
    elif decision.outcome == "reject":
        client.call("POST", f"/api/versions/{candidate['id']}/status", json={"status": "rejected"})


class Pulse:
    """Heartbeats for the whole cycle, from a thread of its own, every `every_s` seconds: the
    snapshot and the gate send none of their own (only the trainer's metrics do), and a run silent
    for 300 s (`Runs.stale_s`) is taken for dead by the next start or listing of the runs."""

    def __init__(self, cfg: Config, run_id: int, every_s: float = 60.0) -> None:
        self.cfg, self.run_id, self.every_s = cfg, run_id, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"run-{run_id}-pulse", daemon=True)

    def __enter__(self) -> Pulse:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        client = GatewayClient.for_config(self.cfg, timeout=10)
        try:
            while not self._stop.wait(self.every_s):
                try:
                    client.call("POST", f"/api/runs/{self.run_id}/heartbeat", json={"metrics": []})
                except GatewayError:  # the gateway restarting: the cycle's own calls say so
                    pass
        finally:
            client.close()


INTERRUPTED = ("interrupted: the retrain process was stopped (Ctrl-C or SIGTERM); what serves is untouched, and "
               "a next cycle on the same data resumes from the trainer's last checkpoint, if it wrote one")


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
    interrupted = False
    try:
        with Pulse(cfg, run_id):
            finish = _cycle(cfg, client, run, method, force, log)
    except Exception as e:  # the run fails; what serves is untouched
        finish = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM to `alignloop retrain`: the trainer is ended by now
        finish, interrupted = {"status": "failed", "reason": INTERRUPTED}, True
    result = client.call("POST", f"/api/runs/{run_id}/finish", json=finish)
    gated = result["status"] in ("promoted", "rejected", "held")  # the gate's line above gave the reason
    log(f"run {run_id}: {result['status']}" + (f" ({result['reason']})" if result.get("reason") and not gated else ""))
    if interrupted:
        raise KeyboardInterrupt
    return result


SUMMARY = ("steps", "train_pairs", "eval_loss", "eval_rewards/accuracies", "reward_last", "kl_to_base",
           "resumed_from_step", "rollouts_on", "rollout_fallback")
UNLESS_ZERO = ("resumed_from_step",)  # a fresh run: nothing to tell


def trained_summary(metrics: dict[str, Any]) -> str:
    """The trainer's few telling numbers for the log; the rest go to the run's metrics. Its own
    `train_seconds` (the steps alone) beside the cycle's wall time, which adds starting the child
    process and loading the model."""
    parts = [f"{k} {metrics[k]:.3g}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
             for k in SUMMARY if metrics.get(k) is not None and (metrics[k] or k not in UNLESS_ZERO)]
    if metrics.get("rollout_engine_tokens_per_s") and metrics.get("rollouts_on"):
        where = f"rollouts_on {metrics['rollouts_on']}"
        parts = [f"{p} at {metrics['rollout_engine_tokens_per_s']:.0f} tok/s" if p == where else p for p in parts]
    if metrics.get("train_seconds") is not None:
        parts.insert(0, f"{metrics['train_seconds']:.0f} s of training steps")
    return ", ".join(parts)


def held_out(fitted: dict[str, Any]) -> str:
    """A fitted reward model's held-out accuracy (the child's result) for the log, with how many pairs
    it was measured on (1.0 on 4 pairs says little)."""
    accuracy, n = fitted.get("accuracy"), fitted.get("metrics", {}).get("heldout_pairs")
    if accuracy is None:
        return "no held-out pairs to measure its accuracy on"
    return f"held-out accuracy {accuracy:.3f}" + (f" on {n} pairs" if n is not None else "")


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
    """The run that was promoted (or held for a person) last with `method`, if it trained on the same
    data (else None). A held run's candidate waits for a person; another on the same data would too."""
    promoted = [r for r in runs if r["status"] in ("promoted", "held") and r["method"] == method]  # newest first
    if promoted and promoted[0]["snapshot_hash"] == snapshot_hash:
        return promoted[0]["id"]
    return None


def last_cycle_prompt(runs: list[dict[str, Any]]) -> int:
    """The newest prompt id the last judged run saw (0 when none did): live prompts after it are new."""
    for run in runs:  # newest first
        metrics = json.loads(run["metrics"]) if isinstance(run.get("metrics"), str) else run.get("metrics") or {}
        if "prompts_up_to" in metrics:
            return int(metrics["prompts_up_to"])
    return 0


def _cycle(cfg: Config, client: GatewayClient, run: dict[str, Any], method: str, force: bool, log) -> dict[str, Any]:
    run_id = run["id"]
    snap = client.call("POST", "/api/snapshot")
    manifest = snap["manifest"]
    snapshot_hash, count, noun = training_data(manifest, method)
    log(f"run {run_id}: snapshot {snap['dir']}: {manifest['counts']}")
    runs = client.call("GET", "/api/runs")
    same = trained_on(runs, method, snapshot_hash)
    since = last_cycle_prompt(runs)
    if not force and same is not None:
        return {"status": "skipped", "reason": f"no new {noun} since {method} run {same}",
                "snapshot_hash": snapshot_hash}
    if count == 0:
        return {"status": "skipped", "reason": f"no {noun} to train on", "snapshot_hash": snapshot_hash}
    prompts = heldout_prompts(Path(snap["dir"]), cfg.gate.eval_prompts)
    shadow = shadow_prompts(Path(snap["dir"]), cfg.gate.shadow_prompts, since, prompts)  # chosen now: never trained on
    if not prompts:
        return {"status": "skipped", "reason": "no held-out prompts to evaluate on", "snapshot_hash": snapshot_hash}
    status = client.call("GET", "/api/status")
    serving_id = status["serving"]
    versions = {v["id"]: v for v in client.call("GET", "/api/versions")}
    init_adapter = versions[serving_id]["adapter_path"] if cfg.train.from_serving and serving_id else None
    run_dir = cfg.data_dir / "runs" / f"run-{run_id}"
    pairs_hash = manifest["content_hash"]["pairs"]
    fingerprint = judge_fingerprint(cfg, pairs_hash)
    judge_model = None if cfg.gate.uses_llm() else fitted_judge(client, fingerprint)
    if judge_model:
        log(f"run {run_id}: the gate's reward model {judge_model['id']} (run {judge_model['run_id']}) was fitted on "
            "these pairs with these settings: it judges again")
    job = {"method": method, "snapshot": snap["dir"], "base_model": str(cfg.base_model_dir),
           "init_adapter": init_adapter, "output_adapter": str(run_dir / "adapter"), "train": asdict(cfg.train),
           "reward": asdict(cfg.reward), "ppo": asdict(cfg.ppo), "kto": asdict(cfg.kto), "eval_prompts": prompts + shadow,
           "judge": not cfg.gate.uses_llm() and judge_model is None}
    job["checkpoint_dir"] = str(checkpoint_dir(cfg, job, f"{snapshot_hash}+{pairs_hash}"))
    if method == "ppo" and cfg.ppo.rollouts == "engine":  # where to sample, not what is learned: not in the hash
        job["rollouts"] = {"gateway": client.url}
    elif method == "ppo" and cfg.ppo.rollouts == "dedicated":
        job["rollouts"] = {"dedicated": rollout_engine.job_settings(cfg.engine, rollout_engine.free_port(),
                                                                          cfg.ppo.rollout_engine_share)}
    if any(Path(job["checkpoint_dir"]).rglob("checkpoint-*")):
        log(f"run {run_id}: a killed run of this job left checkpoints in {job['checkpoint_dir']}: it resumes from them")
    started = time.monotonic()
    trained = train(cfg, client, run_id, run_dir, job)
    train_seconds = time.monotonic() - started
    log(f"run {run_id}: trained in {train_seconds:.0f} s ({trained_summary(trained['metrics'])})")
    reward_model = None
    if trained.get("reward_model"):
        reward_model = register_reward_model(cfg, client, run_id, trained["reward_model"], pairs_hash, "reward")
        log(f"run {run_id}: reward model {reward_model['id']}: {held_out(trained['reward_model'])}")
    if trained.get("judge_error"):
        log(f"run {run_id}: the gate's reward model could not be fitted: {trained['judge_error']}")
    if trained.get("judge_model"):
        trained["judge_model"]["metrics"]["fingerprint"] = fingerprint
        judge_model = register_reward_model(cfg, client, run_id, trained["judge_model"], pairs_hash, "judge")
        judge_model["metrics"] = trained["judge_model"]["metrics"]
        log(f"run {run_id}: the gate's reward model {judge_model['id']}: {held_out(trained['judge_model'])}")
    candidate = client.call("POST", "/api/versions", json={
        "adapter_path": trained["adapter"], "method": method, "parent_id": serving_id,
        "snapshot_hash": snapshot_hash, "config": to_dict(cfg), "metrics": trained["metrics"]})
    decision = judge_candidate(cfg, client, candidate["name"], versions[serving_id]["name"], prompts, judge_model,
                               trained["metrics"].get("kl_to_base"), shadow)
    metrics = {**trained["metrics"], **decision.stats, "train_seconds": train_seconds, "serving_version": serving_id,
               "prompts_up_to": newest_prompt_id(Path(snap["dir"])),
               "train_examples": count, "reward_model_id": reward_model["id"] if reward_model else None,
               "judge_model_id": judge_model["id"] if judge_model else None, "judge_error": trained.get("judge_error")}
    log(f"run {run_id}: {candidate['name']} vs {versions[serving_id]['name']}: {decision.outcome}: {decision.reason}")
    settle(client, candidate, decision, f"run {run_id}")
    if cfg.labeling.order == "active":  # the newest reward model orders what people label next
        try:
            queue_ranker.rank(cfg, client, log=lambda line: log(f"run {run_id}: {line}"))
        except Exception as e:  # the run stands; the queue keeps its last order
            log(f"run {run_id}: the labelling queue was not ranked: {type(e).__name__}: {e}")
    status = {"promote": "promoted", "reject": "rejected", "hold": "held"}[decision.outcome]
    return {"status": status, "reason": decision.reason, "metrics": metrics, "candidate_version_id": candidate["id"],
            "snapshot_hash": snapshot_hash}


def gate_version(cfg: Config, name: str, log=print) -> Decision:
    """`alignloop gate vN`: the gate on a registered candidate (e.g. an adapter made elsewhere and
    added with `alignloop versions --add`) against what serves, with the newest judge, on the
    held-out prompts of a fresh snapshot; promoted, rejected or left a candidate, as a run would."""
    client = GatewayClient.for_config(cfg, timeout=600)
    versions = {v["name"]: v for v in client.call("GET", "/api/versions")}
    if name not in versions:
        raise GatewayError(404, f"no version {name!r} (known: {', '.join(versions)})")
    candidate = versions[name]
    if candidate["status"] != "candidate":
        raise GatewayError(409, f"{name} is {candidate['status']}, not a candidate: only a candidate is gated")
    serving = next(v for v in versions.values() if v["id"] == client.call("GET", "/api/status")["serving"])
    snap = client.call("POST", "/api/snapshot")
    prompts = heldout_prompts(Path(snap["dir"]), cfg.gate.eval_prompts)
    shadow = shadow_prompts(Path(snap["dir"]), cfg.gate.shadow_prompts, last_cycle_prompt(client.call("GET", "/api/runs")),
                            prompts)
    metrics = json.loads(candidate["metrics"]) if isinstance(candidate.get("metrics"), str) else candidate.get("metrics")
    decision = judge_candidate(cfg, client, name, serving["name"], prompts,
                               None if cfg.gate.uses_llm() else latest_judge_model(client),
                               (metrics or {}).get("kl_to_base"), shadow)
    log(f"{name} vs {serving['name']}: {decision.outcome}: {decision.reason}")
    settle(client, candidate, decision, f"alignloop gate {name}")
    return decision
