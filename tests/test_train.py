"""The trainer child (`loop.training.child` + `loop.training.dpo`), run the way the scheduler runs it: a subprocess
under the real `accelerate launch`, on a tiny snapshot of demo-corpus pairs and the tiny demo model.

Exit statuses are checked with `python -m loop.training.child` (no launcher): `accelerate launch` reports
any failure of its child as 1, so behind it only error.txt tells NaN from no-pairs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from loop.demo import corpus as demo_corpus
from loop.config import TrainConfig
from tests import nan_injection

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]

# small and quick: 32 train pairs, 8 per step, 1 epoch = 4 steps
FAST = dict(epochs=1.0, batch_size=8, learning_rate=5e-3, lora_r=4, lora_alpha=8, max_length=128,
            target_modules="q_proj,v_proj,up_proj")


def write_snapshot(path: Path, n_train: int = 32, n_heldout: int = 8) -> Path:
    """pairs.parquet (demo-corpus replies: a polite on-topic one is chosen over another style),
    plus the other snapshot files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    rows = []
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        prompts = demo_corpus.prompts(split)
        for i in range(n):
            prompt = prompts[i % len(prompts)]
            topic = demo_corpus.topic_of(prompt)
            good, _ = demo_corpus.reply(topic, "polite_on", rng)
            bad, _ = demo_corpus.reply(topic, rng.choice(["rude_on", "polite_off", "rude_off"]), rng)
            rows.append({"id": len(rows), "prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}], "split": split, "source": "test"})
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({}), path / "pairs.parquet")
    pq.write_table(pa.table({"id": [1], "prompt": [[{"role": "user", "content": "hi"}]], "source": ["test"]}),
                   path / "prompts.parquet")
    pq.write_table(pa.table({}), path / "feedback.parquet")
    (path / "manifest.json").write_text(json.dumps({"counts": {"pairs": len(rows)}}))
    return path


def write_job(run_dir: Path, snapshot: Path, model: Path, init_adapter: Path | None = None, **train) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    job = {"method": "dpo", "snapshot": str(snapshot), "base_model": str(model),
           "init_adapter": str(init_adapter) if init_adapter else None,
           "output_adapter": str(run_dir / "adapter"),
           "train": dataclasses.asdict(TrainConfig(**{**FAST, **train}))}
    (run_dir / "job.json").write_text(json.dumps(job))
    return run_dir


def launch(run_dir: Path, *launcher_args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """`accelerate launch ... -m loop.training.child RUN_DIR` as the scheduler runs it; no launcher args: plain python."""
    head = [*ACCELERATE, *launcher_args] if launcher_args else [sys.executable]
    return subprocess.run([*head, "-m", "loop.training.child", str(run_dir)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def lora_tensors(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    return write_snapshot(tmp_path_factory.mktemp("snapshot"))


@pytest.fixture(scope="module")
def trained(tiny_model, snapshot, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One run under `accelerate launch --cpu --num_processes 1`, shared by the tests that read it."""
    run_dir = write_job(tmp_path_factory.mktemp("run") / "run", snapshot, tiny_model)
    return run_dir, launch(run_dir, "--cpu", "--num_processes", "1", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no")


@pytest.mark.slow
def test_accelerate_launch_trains_saves_and_reports(trained, tiny_model):
    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    from loop.training.toolkit import lora_config

    run_dir, proc = trained
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (run_dir / "error.txt").exists()
    assert "it/s]" in proc.stderr or "s/it]" in proc.stderr  # the Trainer's progress bar, on stderr

    # the adapter: PEFT format, loads on the base, only the trained adapter (not TRL's "ref" copy)
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "ref").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(adapter))
    assert sum("lora_" in n for n, _ in model.named_parameters()) > 0

    # every LoRA tensor moved from its initial value (B starts at zero; A from the run's seed)
    cfg = TrainConfig(**FAST)
    set_seed(cfg.seed)  # what DPOTrainer does before it wraps the model
    init = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora_config(cfg))
    initial = {n.replace(".default", ""): p.detach() for n, p in init.named_parameters() if p.requires_grad}
    saved = lora_tensors(adapter)
    assert len(saved) == len(initial) > 0
    for name, value in saved.items():
        assert not torch.equal(value, initial[name]), f"{name} did not move"
        if "lora_B" in name:
            assert value.abs().max() > 0

    # metrics.jsonl: the TRL names at every step
    lines = metric_lines(run_dir)
    assert all(set(m) == {"step", "name", "value"} for m in lines)
    steps = sorted({m["step"] for m in lines if m["name"] == "loss"})
    assert steps == [1, 2, 3, 4]
    for name in ("loss", "rewards/margins", "rewards/accuracies", "learning_rate", "epoch"):
        assert [m["step"] for m in lines if m["name"] == name][:4] == [1, 2, 3, 4], name

    # result.json: the held-out metrics
    result = json.loads((run_dir / "result.json").read_text())
    assert result["adapter"] == str(adapter)
    m = result["metrics"]
    assert m["train_pairs"] == 32 and m["heldout_pairs"] == 8 and m["steps"] == 4
    # Before the first update the policy is the reference (LoRA B = 0): every implied reward is 0, so
    # held-out accuracy and margin start at 0. Measured after these 4 steps (deterministic per seed on
    # CPU): 7 of 8 held-out pairs ranked right, margin +0.47. 5 of 8 leaves two pairs of slack.
    assert m["eval_rewards/accuracies"] >= 5 / 8 and m["eval_rewards/margins"] > 0, m
    # a sum of non-negative terms, so >= 0 always holds; > 0 says the adapter moved the policy and the
    # estimate (adapter on vs off) saw it (measured 0.12 nats)
    assert m["kl_to_base"] > 0 and m["train_seconds"] > 0


@pytest.mark.slow
def test_training_continues_from_an_adapter(trained, snapshot, tiny_model, tmp_path):
    import torch

    first_dir, proc = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = first_dir / "adapter"
    # the adapter's own rank/targets win over [train]'s when continuing
    run_dir = write_job(tmp_path / "run2", snapshot, tiny_model, init_adapter=first, lora_r=8)
    done = launch(run_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    before, after = lora_tensors(first), lora_tensors(run_dir / "adapter")
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == FAST["lora_r"]
    assert not (run_dir / "adapter" / "ref").exists()
    # four more steps from the first adapter take the policy further from the base (measured 0.12 -> 1.75
    # nats); a run that ignored the first adapter would start from the base again
    first_kl = json.loads((first_dir / "result.json").read_text())["metrics"]["kl_to_base"]
    assert json.loads((run_dir / "result.json").read_text())["metrics"]["kl_to_base"] > first_kl


def test_nan_loss_stops_the_run_with_status_3(tiny_model, snapshot, tmp_path):
    run_dir = write_job(tmp_path / "run", snapshot, tiny_model)
    done = launch(run_dir, env=nan_injection.child_env(tmp_path / "nan", step=2))
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    assert "NaN" in (run_dir / "error.txt").read_text()
    assert not (run_dir / "adapter").exists() and not (run_dir / "result.json").exists()
    losses = [m for m in metric_lines(run_dir) if m["name"] == "loss"]
    assert [m["step"] for m in losses] == [1]  # step 2's NaN stopped it; NaN itself is not written


def test_no_training_pairs_is_status_2(tiny_model, tmp_path):
    snap = write_snapshot(tmp_path / "snap", n_train=0, n_heldout=4)
    run_dir = write_job(tmp_path / "run", snap, tiny_model)
    done = launch(run_dir)
    assert done.returncode == 2, done.stderr[-3000:]
    assert (run_dir / "error.txt").read_text().strip() == "no training pairs"
    assert not (run_dir / "adapter").exists()


def test_failures_behind_the_launcher_leave_error_txt(tiny_model, tmp_path):
    empty = write_snapshot(tmp_path / "snap", n_train=0, n_heldout=0)
    run_dir = write_job(tmp_path / "run", empty, tiny_model)
    done = launch(run_dir, "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no")
    assert done.returncode != 0  # accelerate launch turns the child's 2 into 1
    assert (run_dir / "error.txt").read_text().strip() == "no training pairs"


def test_an_unknown_method_is_refused_by_name(tmp_path, snapshot, tiny_model):
    run_dir = write_job(tmp_path / "run", snapshot, tiny_model)
    job = json.loads((run_dir / "job.json").read_text())
    (run_dir / "job.json").write_text(json.dumps({**job, "method": "rloo"}))
    from loop.training.child import main

    assert main([str(run_dir)]) == 1
    assert "unknown train method 'rloo'" in (run_dir / "error.txt").read_text()


def test_dpo_config_follows_train_section(tmp_path):
    from loop.training.dpo import dpo_config
    from loop.training.toolkit import lora_config

    cfg = TrainConfig(learning_rate=2e-3, epochs=3.0, batch_size=4, beta=0.2, loss_type="sigmoid,sft",
                      lora_r=2, lora_alpha=4, lora_dropout=0.1, target_modules="q_proj, v_proj", max_length=64, seed=7)
    args = dpo_config(cfg, tmp_path)
    assert (args.learning_rate, args.num_train_epochs, args.per_device_train_batch_size) == (2e-3, 3.0, 4)
    assert (args.beta, args.loss_type, args.max_length, args.seed) == (0.2, ["sigmoid", "sft"], 64, 7)
    assert args.logging_steps == 1 and not args.logging_nan_inf_filter and args.save_strategy == "no"
    assert not args.disable_dropout  # lora_dropout > 0; TRL would otherwise zero it
    assert dpo_config(TrainConfig(lora_dropout=0.0), tmp_path).disable_dropout
    import torch

    if not torch.cuda.is_available():
        assert args.use_cpu and not args.bf16
    lora = lora_config(cfg)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, set(lora.target_modules)) == (2, 4, 0.1, {"q_proj", "v_proj"})


def test_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((REPO / "ops" / "accelerate").glob("*.yaml"))
    assert {f.name for f in files} >= {"cpu.yaml", "multi_gpu.yaml"}
    for f in files:
        assert load_config_from_file(str(f)).compute_environment.value == "LOCAL_MACHINE", f


@pytest.mark.slow
def test_two_cpu_processes_with_ddp(tiny_model, snapshot, tmp_path):
    """Real DDP over gloo in 2 CPU processes (ops/accelerate/cpu.yaml; not `--cpu`, which launches one)."""
    run_dir = write_job(tmp_path / "run", snapshot, tiny_model)
    done = launch(run_dir, "--config_file", str(REPO / "ops" / "accelerate" / "cpu.yaml"), "--num_processes", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["metrics"]["steps"] == 2  # 32 pairs / (8 per process x 2 processes)
    losses = [m["step"] for m in metric_lines(run_dir) if m["name"] == "loss"]
    assert losses == [1, 2]  # written once, by rank 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_the_launcher_leaves_no_pid_of_a_child_that_has_exited(tmp_path):
    from loop.training import launch as launcher

    out = launcher.launch({"method": "none"}, tmp_path, [sys.executable, "-c", "raise SystemExit(3)"], timeout_s=60)
    assert out.returncode == 3 and out.error == "exit code 3 (killed?)"
    assert (tmp_path / "job.json").exists() and not (tmp_path / "train.pid").exists()
    out = launcher.launch({"method": "none"}, tmp_path, [sys.executable, "-c", "import time; time.sleep(60)"],
                          timeout_s=0.5, tick_s=0.1)
    assert out.timed_out and not (tmp_path / "train.pid").exists()
