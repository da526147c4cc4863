"""The one way to start a trainer child (`python -m loop.training.child RUN_DIR`): the retrain
cycle and `alignloop compare` both come here.

The child runs in its own process group under `accelerate launch` (so the same command scales out
with an accelerate/DeepSpeed config, `train.accelerate_config`), or as plain Python when measuring
one process's memory. While it runs, `on_metrics` gets each batch of new lines of its
`metrics.jsonl` (the retrain cycle forwards them to the store as heartbeats). A child that runs past
its time is killed with its whole group, and so is one whose parent is interrupted; one whose parent
dies unannounced (SIGKILL, OOM) gets SIGTERM from the kernel, so no trainer outlives its cycle.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loop.sections import TrainConfig
from loop.vllm_server import die_with_parent


@dataclass
class TrainerExit:
    """How a trainer child ended: its result.json when it succeeded, else the reason."""

    returncode: int
    wall_s: float
    peak_rss_mb: float
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    timed_out: bool = False


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def command(train: TrainConfig, root: Path, run_dir: Path, accelerate: bool = True) -> list[str]:
    """The child's command line; `root` resolves a relative `train.accelerate_config`."""
    child = ["-m", "loop.training.child", str(run_dir)]
    if not accelerate:
        return [sys.executable, *child]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(train.num_processes)]
    if train.accelerate_config:  # the file says how (ops/accelerate/cpu.yaml: several CPU processes)
        return cmd + ["--config_file", str((root / train.accelerate_config).resolve()), *child]
    if train.num_processes > 1:
        # torchrun's launcher; without CUDA the trainers run with use_cpu and join a gloo group
        # (`--cpu` would pick the single-process launcher and start one process: ops/accelerate/README.md)
        cmd.append("--multi_gpu")
    elif not has_cuda():
        cmd.append("--cpu")
    return cmd + ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *child]


def launch(job: dict[str, Any], run_dir: Path, cmd: list[str], timeout_s: float,
           on_metrics: Callable[[list[dict[str, Any]]], None] | None = None, tick_s: float = 2.0,
           env: dict[str, str] | None = None) -> TrainerExit:
    """Write `job.json`, run `cmd` (from `command`) until it exits or `timeout_s` passes, and
    return how it ended. Its output goes to `train.log`, its pid to `train.pid` while it runs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.json").write_text(json.dumps(job, indent=2))
    started = time.perf_counter()
    with (run_dir / "train.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=die_with_parent, env={**os.environ, **(env or {})})
    (run_dir / "train.pid").write_text(str(proc.pid))
    metrics, timed_out, pid, status, usage = _MetricsTail(run_dir / "metrics.jsonl"), False, 0, 0, None
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if on_metrics is not None:
                on_metrics(metrics.new(complete=bool(pid)))
            if pid:
                break
            if time.perf_counter() - started > timeout_s:
                timed_out = True
                break
            time.sleep(tick_s if on_metrics is not None else min(tick_s, 0.2))
    finally:
        if not pid:  # still running: a timeout, or an error in on_metrics
            os.killpg(proc.pid, signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
        (run_dir / "train.pid").unlink(missing_ok=True)  # while the child runs only: no stale pid to signal later
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = TrainerExit(proc.returncode, round(time.perf_counter() - started, 1), round(usage.ru_maxrss / 1024, 1),
                      timed_out=timed_out)
    if timed_out:
        out.error = f"training took longer than {timeout_s:.0f} s (train.timeout_s)"
    elif proc.returncode != 0:
        error = run_dir / "error.txt"
        out.error = error.read_text().strip() if error.exists() else f"exit code {proc.returncode} (killed?)"
    else:
        out.result = json.loads((run_dir / "result.json").read_text())
    return out


class _MetricsTail:
    """The lines of a growing metrics.jsonl not read yet; the last one only once the writer is done
    (it may be half-written)."""

    def __init__(self, path: Path) -> None:
        self.path, self.sent = path, 0

    def new(self, complete: bool) -> list[dict[str, Any]]:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        ready = lines if complete else lines[:-1]
        rows = [json.loads(line) for line in ready[self.sent:] if line.strip()]
        self.sent = max(self.sent, len(ready))
        return rows
