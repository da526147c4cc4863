"""One retrain run, as a child process: read RUN_DIR/job.json, train, write the adapter and results.

Run it the way the scheduler does (CPU: add `--cpu`; several GPUs: `--config_file ops/accelerate/…`):

    accelerate launch --num_processes N [--config_file F] [--cpu] -m loop.training.child RUN_DIR

or, one process, without the launcher: `python -m loop.training.child RUN_DIR`.

RUN_DIR/job.json:

    {"method": "dpo" | "ppo" | "kto", "snapshot": "/abs/snapshot_dir", "base_model": "/abs/model_dir",
     "init_adapter": null | "/abs/adapter_dir", "output_adapter": "/abs/RUN_DIR/adapter",
     "train": {...[train]...}, "reward": {...}, "ppo": {...}, "kto": {...} (the config's sections),
     "eval_prompts": [prompt messages the gate will judge on: PPO does not roll out on them],
     "judge": true | false (also refresh the gate's reward model on every labelled pair),
     "checkpoint_dir": null | "/abs/dir" (this job's own: checkpoint there, resume from what is there),
     "rollouts": {"gateway": URL} (PPO: sample the rollouts on the serving engine through this
       gateway, signed in with $ALIGNLOOP_GATEWAY_TOKEN) or {"dedicated": {"port": P, ...}} (on an
       engine of the run's own: loop.training.rollout_engine; API key $ALIGNLOOP_ROLLOUT_ENGINE_KEY);
       absent: HF generate}

What it writes (only the main process writes):

- RUN_DIR/metrics.jsonl: one {"step", "name", "value"} line per logged number, flushed at every step
  (loss, rewards/margins, rewards/accuracies, learning_rate, epoch, grad_norm, ...; TRL's names);
- on success: the LoRA adapter (PEFT format) at output_adapter, and RUN_DIR/result.json
  {"adapter": path, "metrics": {"kl_to_base", "train_seconds", ... the method's own}}; a PPO run also
  leaves its refreshed reward model in RUN_DIR/reward-model and adds "reward_model": {"path",
  "accuracy", "metrics"}; with "judge", whatever the method, the gate's own reward model is fitted
  on the same pairs with another seed (RUN_DIR/judge-model) and "judge_model" added in the same
  shape, or null when there are no labelled pairs to fit it on;
- on failure: RUN_DIR/error.txt with the reason, no adapter, and exit status
  2 = no training data (pairs, or both kinds of feedback for KTO), 3 = NaN/inf loss, 1 = anything else.

Resume: with a "checkpoint_dir", each stage (the method's trainer, a reward model, the gate's reward
model) checkpoints in its own folder there every `train.checkpoint_steps` optimiser steps (PPO:
`ppo.checkpoint_steps` rollout steps) and starts from the newest checkpoint it finds, so a child
killed mid-run (power loss, OOM, preemption) and started again on the same job goes on from there;
"resumed_from_step" in the metrics says where. A stage that had finished resumes at its end. Once
result.json is written the checkpoint dir is removed.

Note: `accelerate launch` reports any nonzero status of its child as 1 (it raises
CalledProcessError, or torchrun's ChildFailedError), so behind the launcher error.txt tells the
cases apart; `python -m loop.training.child` returns the status itself.

Each method's code lives in its own module (`loop.training.dpo`, `loop.training.reward` + `loop.training.ppo`, `loop.training.kto`);
this file only dispatches and reports.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from loop.sections import METHODS
from loop.training.toolkit import NonFiniteLoss, NoTrainingPairs

EXIT_ERROR = 1
EXIT_NO_PAIRS = 2
EXIT_NAN = 3


def _is_main_process() -> bool:
    """Rank 0 (or no launcher at all). Read from the launcher's environment, so it works before and
    after torch.distributed is set up."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def _peak_gpu_mb() -> float | None:
    """Peak GPU memory this process allocated (torch's count), or None without CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def read_job(run_dir: Path) -> dict[str, Any]:
    job = json.loads((run_dir / "job.json").read_text(encoding="utf-8"))
    missing = [k for k in ("method", "snapshot", "base_model", "output_adapter", "train") if k not in job]
    if missing:
        raise ValueError(f"{run_dir / 'job.json'}: missing {', '.join(missing)}")
    return job


def train_dpo(job: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    from loop.config import TrainConfig
    from loop.training import dpo

    cfg = TrainConfig(**job["train"])
    train_pairs, heldout_pairs = dpo.load_pairs(job["snapshot"])
    metrics, _ = dpo.run(train_pairs, heldout_pairs, base_model=job["base_model"],
                         output_adapter=job["output_adapter"], cfg=cfg, work_dir=run_dir,
                         init_adapter=job.get("init_adapter"), metrics_path=run_dir / "metrics.jsonl",
                         checkpoint_dir=job.get("checkpoint_dir"))
    return {"adapter": str(job["output_adapter"]), "metrics": metrics}


def train_kto(job: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    from loop.config import KTOConfig, TrainConfig
    from loop.training import kto

    cfg = KTOConfig(**job["kto"])
    train_rows, heldout_rows = kto.load_feedback(job["snapshot"], cfg.heldout_share)
    metrics, _ = kto.run(train_rows, heldout_rows, base_model=job["base_model"], output_adapter=job["output_adapter"],
                         cfg=cfg, train_cfg=TrainConfig(**job["train"]), work_dir=run_dir,
                         init_adapter=job.get("init_adapter"), metrics_path=run_dir / "metrics.jsonl",
                         checkpoint_dir=job.get("checkpoint_dir"))
    return {"adapter": str(job["output_adapter"]), "metrics": metrics}


def rollout_prompts(snapshot: str | os.PathLike[str], exclude: list[Any]) -> list[list[dict[str, str]]]:
    """Every prompt from traffic (and imports) in the snapshot, less those the gate will judge on."""
    import pyarrow.parquet as pq

    skip = {json.dumps(p, sort_keys=True) for p in exclude}
    rows = pq.read_table(Path(snapshot) / "prompts.parquet").to_pylist()
    return [r["prompt"] for r in rows if json.dumps(r["prompt"], sort_keys=True) not in skip]


def train_ppo(job: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Refresh the reward model on every labelled pair, then PPO against it (and [reward] extra)."""
    from loop.config import PPOConfig, RewardConfig, TrainConfig
    from loop.training import dpo, ppo, reward, rollout_engine

    train_cfg, reward_cfg = TrainConfig(**job["train"]), RewardConfig(**job["reward"])
    train_pairs, heldout_pairs = dpo.load_pairs(job["snapshot"])
    reward_dir = run_dir / "reward-model"
    rm = reward.train(train_pairs, heldout_pairs, job["base_model"], reward_dir, reward_cfg, train_cfg,
                      work_dir=run_dir, metrics_path=run_dir / "metrics.jsonl", checkpoint_dir=job.get("checkpoint_dir"))
    scorer = reward.CombinedReward.load(reward_dir if reward_cfg.weight else None, reward_cfg.weight,
                                        reward_cfg.extra)
    exclude = job.get("eval_prompts") or []
    prompts = rollout_prompts(job["snapshot"], exclude)
    ppo_cfg = PPOConfig(**job["ppo"])
    log = partial(print, file=sys.stderr, flush=True)
    metrics, _ = ppo.run(prompts, scorer, job["base_model"], job["output_adapter"], ppo_cfg,
                         train_cfg, init_adapter=job.get("init_adapter"), metrics_path=run_dir / "metrics.jsonl",
                         heldout_prompts=exclude or [p["prompt"] for p in heldout_pairs],
                         log=log, checkpoint_dir=job.get("checkpoint_dir"),
                         sampler=partial(rollout_engine.for_job, job, run_dir, ppo_cfg.sync_steps, log=log))
    metrics.update({f"reward_model_{k}": v for k, v in rm.items()})
    return {"adapter": str(job["output_adapter"]), "metrics": metrics,
            "reward_model": {"path": str(reward_dir), "accuracy": rm.get("accuracy"), "metrics": rm}}


TRAINERS = {"dpo": train_dpo, "ppo": train_ppo, "kto": train_kto}
assert set(TRAINERS) == set(METHODS), "loop.sections.METHODS and the trainers must name the same methods"


def train_judge(job: dict[str, Any], run_dir: Path) -> dict[str, Any] | None:
    """The gate's reward model, refreshed on every labelled pair whatever the method. Its seed is not
    the trainer's, so a PPO candidate is not judged by the very fit it was optimised against (both
    still learn from the same labels: the gate's independent checks are an LLM judge and people)."""
    import dataclasses

    from loop.config import RewardConfig, TrainConfig
    from loop.training import dpo, reward

    train_cfg = TrainConfig(**job["train"])
    train_pairs, heldout_pairs = dpo.load_pairs(job["snapshot"])
    if not train_pairs:
        return None
    judge_dir = run_dir / "judge-model"
    rm = reward.train(train_pairs, heldout_pairs, job["base_model"], judge_dir, RewardConfig(**job["reward"]),
                      dataclasses.replace(train_cfg, seed=train_cfg.seed + 1), work_dir=run_dir,
                      metrics_path=run_dir / "metrics.jsonl", prefix="judge/", checkpoint_dir=job.get("checkpoint_dir"))
    return {"path": str(judge_dir), "accuracy": rm.get("accuracy"), "metrics": rm}


def run(run_dir: Path, job: dict[str, Any]) -> dict[str, Any]:
    """Run `job` (read from `run_dir`); returns what goes into result.json."""
    method = job["method"]
    if method not in TRAINERS:
        raise ValueError(f"unknown train method {method!r}; expected {', '.join(METHODS)}")
    result = TRAINERS[method](job, run_dir)
    if job.get("judge"):
        try:
            result["judge_model"] = train_judge(job, run_dir)
        except Exception as e:  # the candidate is trained; without a judge the gate holds it for a person
            print(f"the gate's reward model could not be fitted: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            result["judge_model"], result["judge_error"] = None, f"{type(e).__name__}: {e}"
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return EXIT_ERROR
    run_dir = Path(args[0]).resolve()
    main_process = _is_main_process()
    try:
        job = read_job(run_dir)
        result = run(run_dir, job)
    except Exception as e:
        if isinstance(e, NoTrainingPairs):
            code, reason = EXIT_NO_PAIRS, str(e)
        elif isinstance(e, NonFiniteLoss):
            code, reason = EXIT_NAN, str(e)
        else:
            code, reason = EXIT_ERROR, f"{type(e).__name__}: {e}"
        if main_process:
            (run_dir / "error.txt").write_text(reason + "\n", encoding="utf-8")
            if code == EXIT_ERROR:
                traceback.print_exc()
            print(f"loop.training.child: {reason}", file=sys.stderr)
        return code
    if main_process:
        result["metrics"]["peak_gpu_mb"] = _peak_gpu_mb()
        _write_json(run_dir / "result.json", result)
        print(f"loop.training.child: adapter saved to {result['adapter']}", file=sys.stderr)
        if job.get("checkpoint_dir"):  # done: nothing left to resume
            shutil.rmtree(job["checkpoint_dir"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
