"""One retrain run, as a child process: read RUN_DIR/job.json, train, write the adapter and results.

Run it the way the scheduler does (CPU: add `--cpu`; several GPUs: `--config_file ops/accelerate/…`):

    accelerate launch --num_processes N [--config_file F] [--cpu] -m loop.train RUN_DIR

or, one process, without the launcher: `python -m loop.train RUN_DIR`.

RUN_DIR/job.json:

    {"method": "dpo", "snapshot": "/abs/snapshot_dir", "base_model": "/abs/model_dir",
     "init_adapter": null | "/abs/adapter_dir", "output_adapter": "/abs/RUN_DIR/adapter",
     "train": {...every [train] field of loop.config.TrainConfig...}}

What it writes (only the main process writes):

- RUN_DIR/metrics.jsonl: one {"step", "name", "value"} line per logged number, flushed at every step
  (loss, rewards/margins, rewards/accuracies, learning_rate, epoch, grad_norm, ...; TRL's names);
- on success: the LoRA adapter (PEFT format) at output_adapter, and RUN_DIR/result.json
  {"adapter": path, "metrics": {"eval_rewards/accuracies", "eval_loss", "kl_to_base", "train_pairs",
  "heldout_pairs", "train_seconds", ...}};
- on failure: RUN_DIR/error.txt with the reason, no adapter, and exit status
  2 = no training pairs, 3 = NaN/inf loss, 1 = anything else.

Note: `accelerate launch` reports any nonzero status of its child as 1 (it raises
CalledProcessError, or torchrun's ChildFailedError), so behind the launcher error.txt tells the
cases apart; `python -m loop.train` returns the status itself.

The method's code lives in its own module (`loop.dpo`); this file only dispatches and reports.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from loop.dpo import NonFiniteLoss, NoTrainingPairs

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


def read_job(run_dir: Path) -> dict[str, Any]:
    job = json.loads((run_dir / "job.json").read_text(encoding="utf-8"))
    missing = [k for k in ("method", "snapshot", "base_model", "output_adapter", "train") if k not in job]
    if missing:
        raise ValueError(f"{run_dir / 'job.json'}: missing {', '.join(missing)}")
    return job


def train_dpo(job: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    from loop import dpo
    from loop.config import TrainConfig

    cfg = TrainConfig(**job["train"])
    train_pairs, heldout_pairs = dpo.load_pairs(job["snapshot"])
    metrics, _ = dpo.run(
        train_pairs,
        heldout_pairs,
        base_model=job["base_model"],
        output_adapter=job["output_adapter"],
        cfg=cfg,
        work_dir=run_dir,
        init_adapter=job.get("init_adapter"),
        metrics_path=run_dir / "metrics.jsonl",
    )
    return {"adapter": str(job["output_adapter"]), "metrics": metrics}


def run(run_dir: Path) -> dict[str, Any]:
    """Run the job in `run_dir`; returns what goes into result.json."""
    job = read_job(run_dir)
    method = job["method"]
    if method == "dpo":
        return train_dpo(job, run_dir)
    if method in ("ppo", "kto"):
        raise NotImplementedError(f"train method {method!r} is not implemented yet; use method = \"dpo\"")
    raise ValueError(f"unknown train method {method!r}; expected dpo, ppo or kto")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return EXIT_ERROR
    run_dir = Path(args[0]).resolve()
    main_process = _is_main_process()
    try:
        result = run(run_dir)
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
            print(f"loop.train: {reason}", file=sys.stderr)
        return code
    if main_process:
        _write_json(run_dir / "result.json", result)
        print(f"loop.train: adapter saved to {result['adapter']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
