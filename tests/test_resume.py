"""A trainer killed mid-run resumes (issue 11): the real trainer child, SIGKILLed with its whole process
group at a random step, as the OOM killer or a power cut would, then started again on the same job, as
the next cycle on the same snapshot does. It goes on from its newest checkpoint (model, optimizer,
scheduler, data position, random state; for PPO also the KL controller) and ends where a run that was
never killed ends."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from loop.config import PPOConfig, TrainConfig
from loop.training import launch
from tests.test_ppo import ppo_job
from tests.test_train import FAST, lora_tensors, metric_lines, write_job, write_snapshot

STEP = random.Random().randint  # the step to kill at: a different one every run, printed on failure


class Killed(Exception):
    pass


def kill_at(step: int, name: str):
    """on_metrics for `launch.launch`: raising there makes it SIGKILL the child's process group."""
    def on_metrics(rows):
        if any(r["name"] == name and r["step"] >= step for r in rows):
            raise Killed
    return on_metrics


def run(job: dict, run_dir: Path, on_metrics=None) -> launch.TrainerExit:
    cmd = launch.command(TrainConfig(), Path("."), run_dir, accelerate=False)
    return launch.launch(job, run_dir, cmd, timeout_s=600, on_metrics=on_metrics, tick_s=0.05,
                         env={"TOKENIZERS_PARALLELISM": "false"})


def killed_then_resumed(job: dict, tmp_path: Path, step: int, name: str) -> tuple[launch.TrainerExit, Path]:
    """Kill the job at `step` (rows named `name`), check what it left, run it again; (exit, run dir)."""
    with pytest.raises(Killed):
        run(job, tmp_path / "killed", kill_at(step, name))
    assert not (tmp_path / "killed" / "result.json").exists()
    assert any(Path(job["checkpoint_dir"]).rglob("checkpoint-*")), "the killed run left no checkpoint"
    again = run(job, tmp_path / "again")
    assert again.returncode == 0, again.error
    assert not Path(job["checkpoint_dir"]).exists(), "a finished job keeps its checkpoints"
    return again, tmp_path / "again"


def dpo_job(tmp_path: Path, model: Path, checkpoints: Path) -> dict:
    # 64 pairs in batches of 4 over 2 epochs: 32 optimiser steps, a checkpoint every 4
    snapshot = write_snapshot(tmp_path / "snap", n_train=64)
    write_job(tmp_path / "job", snapshot, model, **{**FAST, "batch_size": 4, "epochs": 2.0, "checkpoint_steps": 4})
    return {**json.loads((tmp_path / "job" / "job.json").read_text()), "checkpoint_dir": str(checkpoints)}


def test_a_dpo_trainer_killed_at_a_random_step_resumes_and_ends_as_an_unkilled_run(tiny_model, tmp_path):
    step = STEP(6, 24)
    job = dpo_job(tmp_path, tiny_model, tmp_path / "checkpoints")
    again, again_dir = killed_then_resumed({**job, "output_adapter": str(tmp_path / "adapters" / "resumed")}, tmp_path, step, "loss")
    whole = run({**job, "output_adapter": str(tmp_path / "adapters" / "whole"), "checkpoint_dir": str(tmp_path / "whole-ckpt")},
                tmp_path / "whole")
    assert whole.returncode == 0, whole.error

    resumed_at = again.result["metrics"]["resumed_from_step"]
    assert resumed_at > 0 and resumed_at % 4 == 0, (step, resumed_at)
    steps = sorted({r["step"] for r in metric_lines(again_dir) if r["name"] == "loss"})
    assert steps[0] == resumed_at + 1 and steps[-1] == 32, (step, steps)  # on from the checkpoint, to the end
    assert whole.result["metrics"]["resumed_from_step"] == 0
    # the same end: the same weights and the same held-out numbers, up to float noise
    a, b = lora_tensors(tmp_path / "adapters" / "resumed"), lora_tensors(tmp_path / "adapters" / "whole")
    assert a.keys() == b.keys()
    drift = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert drift < 1e-4, (step, resumed_at, drift)
    for name in ("eval_loss", "eval_rewards/accuracies"):
        assert again.result["metrics"][name] == pytest.approx(whole.result["metrics"][name], abs=1e-4), name


def test_a_ppo_trainer_killed_at_a_random_step_resumes_with_its_kl_controller(tiny_model, tmp_path):
    step = STEP(3, 6)
    ppo_job(tmp_path / "job", write_snapshot(tmp_path / "snap"), tiny_model)
    job = json.loads((tmp_path / "job" / "job.json").read_text())
    # the adaptive controller moves kl_coef every step: a resume that lost it would not end the same
    job["ppo"] = dataclasses.asdict(PPOConfig(steps=8, rollout_batch=8, minibatch=4, max_new_tokens=8,
                                              kl_target=0.05, kl_horizon=40, checkpoint_steps=2))
    job["checkpoint_dir"] = str(tmp_path / "checkpoints")
    again, again_dir = killed_then_resumed({**job, "output_adapter": str(tmp_path / "adapters" / "resumed")}, tmp_path, step,
                                           "kl_coef")
    whole = run({**job, "output_adapter": str(tmp_path / "adapters" / "whole"), "checkpoint_dir": str(tmp_path / "whole-ckpt")},
                tmp_path / "whole")
    assert whole.returncode == 0, whole.error

    resumed_at = again.result["metrics"]["resumed_from_step"]
    assert resumed_at > 0 and resumed_at % 2 == 0, (step, resumed_at)
    rows = metric_lines(again_dir)
    ppo_steps = sorted({r["step"] for r in rows if r["name"] == "kl_coef"})
    assert ppo_steps[0] == resumed_at + 1 and ppo_steps[-1] == 8, (step, ppo_steps)
    # the reward model had finished before the kill: it resumes at its end, with no step trained again
    assert again.result["reward_model"]["metrics"]["resumed_from_step"] > 0
    assert not [r for r in rows if r["name"] == "reward/loss"]
    whole_coef = [r["value"] for r in metric_lines(tmp_path / "whole") if r["name"] == "kl_coef"]
    assert [r["value"] for r in rows if r["name"] == "kl_coef"] == pytest.approx(whole_coef[resumed_at:], rel=1e-6)
    for name in ("reward_last", "kl_last", "kl_to_base"):
        assert again.result["metrics"][name] == pytest.approx(whole.result["metrics"][name], abs=1e-3), name
    a, b = lora_tensors(tmp_path / "adapters" / "resumed"), lora_tensors(tmp_path / "adapters" / "whole")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_checkpoints_are_off_without_a_checkpoint_dir_or_steps(tmp_path):
    from loop.training import toolkit

    assert toolkit.stage(tmp_path, None, "trainer", 25) == toolkit.Stage(tmp_path / "trainer", 0, None)
    assert toolkit.stage(tmp_path, tmp_path / "c", "trainer", 0).save_steps == 0
    # a checkpoint cut off before its marker is passed over for the one before
    for n, complete in ((4, True), (8, True), (12, False)):
        (tmp_path / "c" / "trainer" / f"checkpoint-{n}").mkdir(parents=True)
        if complete:
            (tmp_path / "c" / "trainer" / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    (tmp_path / "c" / "trainer" / "checkpoint-x").mkdir()
    st = toolkit.stage(tmp_path, tmp_path / "c", "trainer", 4)
    assert st.resume_from == tmp_path / "c" / "trainer" / "checkpoint-8" and st.resumed_step == 8


def test_the_next_cycle_on_the_same_data_finds_the_killed_runs_checkpoints(tmp_path):
    from loop.config import Config, DataConfig
    from loop.retrain import checkpoint_dir

    cfg = Config(data=DataConfig(dir=str(tmp_path / "data")))
    job = {"method": "dpo", "snapshot": "/snapshots/20261203-1200", "output_adapter": "/runs/run-7/adapter",
           "train": dataclasses.asdict(TrainConfig()), "judge": True}
    first = checkpoint_dir(cfg, job, "pairs-a")
    (first / "trainer" / "checkpoint-25").mkdir(parents=True)
    # the next cycle: a new snapshot folder and run dir, the same data and settings
    again = checkpoint_dir(cfg, {**job, "snapshot": "/snapshots/20261203-1300", "output_adapter": "/runs/run-8/adapter"},
                           "pairs-a")
    assert again == first and (first / "trainer" / "checkpoint-25").exists()
    ppo = checkpoint_dir(cfg, {**job, "method": "ppo"}, "pairs-a")  # another method's are left alone
    ppo.mkdir()
    # new labels, or another setting: afresh, and the stale checkpoints of the method go
    newer = checkpoint_dir(cfg, job, "pairs-b")
    assert newer != first and not first.exists() and ppo.exists()
    assert checkpoint_dir(cfg, {**job, "train": {**job["train"], "seed": 1}}, "pairs-b") != newer
