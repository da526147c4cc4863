"""PPO (loop.training.ppo) on real tiny models, and the PPO job of the trainer child: the reward model is
refreshed on the snapshot's pairs, then PPO trains against it. The PPO math itself is unit-tested
in test_ppo_math.py."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from loop.demo import corpus as demo_corpus
from loop.config import PPOConfig, RewardConfig, TrainConfig
from tests.test_train import FAST, write_job, write_snapshot

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[{"role": "user", "content": p}] for p in demo_corpus.prompts("train")]


class ShareOfE:
    """A known toy reward: ten times the share of the letter e in the answer. Learnable by a model
    that samples almost at random, with no reward model in the way."""

    def score(self, prompts, answers):
        return torch.tensor([10 * a.count("e") / max(len(a), 1) for a in answers])


def toy_run(model, kl_coef: float, tmp_path, sampler=None):
    """48 PPO steps on the toy reward; `sampler(first_step)`: rollouts on an engine (else HF generate)."""
    from loop.training import ppo

    # 48 steps: in 24 the tiny model built on some machines (AMD EPYC, 2026-12) did not move yet
    # (reward 0.85 -> 0.92, bit-identical across peft and tokenizers releases)
    cfg = PPOConfig(steps=48, rollout_batch=32, minibatch=8, max_new_tokens=16, learning_rate=1e-2,
                    kl_coef=kl_coef, missing_eos_penalty=0.0)
    metrics_path = tmp_path / f"metrics-{kl_coef}.jsonl"
    metrics, _ = ppo.run(PROMPTS, ShareOfE(), model, None, cfg, TrainConfig(), metrics_path=metrics_path,
                         log=lambda m: None, sampler=sampler)
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return metrics, rows


def test_ppo_raises_a_toy_reward_while_the_kl_penalty_bounds_the_drift(tiny_model, tmp_path):
    weak, rows = toy_run(tiny_model, 0.02, tmp_path)
    assert weak["reward_last"] > weak["reward_first"] + 0.15, weak
    assert weak["kl_last"] < 15, weak  # nats per 16-token answer
    names = {r["name"] for r in rows}
    assert {"reward", "kl", "entropy", "clipfrac", "value_loss", "policy_loss", "approx_kl", "kl_coef"} <= names
    assert max(r["step"] for r in rows) == 48
    strong, _ = toy_run(tiny_model, 5.0, tmp_path)
    assert strong["kl_last"] < weak["kl_last"] / 2, (strong, weak)  # the penalty is what holds it back


def test_ppo_with_no_engine_to_reach_falls_back_to_hf_generate_and_says_so(tiny_model, tmp_path):
    from loop.client import GatewayClient
    from loop.training import ppo
    from loop.training.engine_sampler import EngineSampler

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    cfg = PPOConfig(steps=2, rollout_batch=8, minibatch=4, max_new_tokens=8)
    metrics, _ = ppo.run(PROMPTS, ShareOfE(), tiny_model, tmp_path / "adapter", cfg, TrainConfig(), log=lambda m: None,
                         sampler=lambda first: EngineSampler(GatewayClient(url, "t"), tmp_path / "ra", "x", 1, first))
    assert metrics["rollouts_on"] == "engine, then hf-generate", metrics
    assert metrics["rollout_engine_steps"] == 0 and "cannot reach the gateway" in metrics["rollout_fallback"]
    assert (tmp_path / "adapter" / "adapter_config.json").exists() and not (tmp_path / "ra").exists()


def test_the_runs_rollout_numbers_count_every_process_and_a_fallback_on_any():
    from loop.training.engine_sampler import summary

    one_fell_back = summary([(6, 100, 2.0, None), (3, 50, 4.0, "sampling on the engine: timed out")])
    assert one_fell_back == {"rollouts_on": "engine, then hf-generate", "rollout_engine_steps": 3,
                             "rollout_engine_tokens": 150, "rollout_engine_tokens_per_s": 37.5,
                             "rollout_fallback": "sampling on the engine: timed out"}
    assert summary([(0, 0, 0.0, None)])["rollout_engine_tokens_per_s"] is None


class Broken:
    """A reward model gone wrong: NaN for every answer."""

    def score(self, prompts, answers):
        return torch.full((len(answers),), float("nan"))


def test_a_nan_reward_stops_ppo_and_saves_nothing(tiny_model, tmp_path):
    from loop.training import ppo
    from loop.training.toolkit import NonFiniteLoss

    cfg = PPOConfig(steps=3, rollout_batch=8, minibatch=4, max_new_tokens=8)
    with pytest.raises(NonFiniteLoss, match="at PPO step 1"):
        ppo.run(PROMPTS, Broken(), tiny_model, tmp_path / "adapter", cfg, TrainConfig(), log=lambda m: None)
    assert not (tmp_path / "adapter").exists()


def ppo_job(run_dir, snapshot, model):
    write_job(run_dir, snapshot, model)
    job = json.loads((run_dir / "job.json").read_text())
    job.update(method="ppo",
               reward=dataclasses.asdict(RewardConfig(epochs=2, batch_size=8)),
               ppo=dataclasses.asdict(PPOConfig(steps=2, rollout_batch=8, minibatch=4, max_new_tokens=8)),
               eval_prompts=[[{"role": "user", "content": "a held-out prompt"}]])
    (run_dir / "job.json").write_text(json.dumps(job))
    return run_dir


def test_ppo_job_refreshes_the_reward_model_then_trains_the_policy(tiny_model, tmp_path):
    from peft import PeftConfig

    from loop.training.reward import CombinedReward, RewardModel
    from loop.training.child import main

    snapshot = write_snapshot(tmp_path / "snap")
    run_dir = ppo_job(tmp_path / "run", snapshot, tiny_model)
    assert main([str(run_dir)]) == 0, (run_dir / "error.txt").read_text()
    result = json.loads((run_dir / "result.json").read_text())
    rm = result["reward_model"]
    assert rm["metrics"]["train_pairs"] == 32 and rm["metrics"]["heldout_pairs"] == 8
    # the recorded accuracy is the saved reward model's, on the held-out pairs, recomputed here by hand
    # (2 epochs on 32 pairs barely learn: measured 5 of 8, so no bound on the value itself)
    import pyarrow.parquet as pq

    scorer = RewardModel.load(rm["path"])
    held = [r for r in pq.read_table(snapshot / "pairs.parquet").to_pylist() if r["split"] == "heldout"]
    chosen = scorer.score([r["prompt"] for r in held], [r["chosen"][-1]["content"] for r in held])
    rejected = scorer.score([r["prompt"] for r in held], [r["rejected"][-1]["content"] for r in held])
    assert len(held) == 8 and rm["accuracy"] == sum(bool(c > r) for c, r in zip(chosen, rejected)) / 8
    assert PeftConfig.from_pretrained(result["adapter"]).r == FAST["lora_r"]
    names = {json.loads(line)["name"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert {"reward/loss", "reward/accuracy", "reward", "kl", "clipfrac"} <= names
    assert result["metrics"]["reward_model_accuracy"] == rm["accuracy"]
    # a sum of non-negative terms, so >= 0 always holds; > 0 says PPO moved the policy (measured 0.08)
    assert result["metrics"]["kl_to_base"] > 0

    # the saved reward model scores, and several combine with weights (multi-objective)
    prompts, answers = PROMPTS[:3], ["Thanks for asking! Water basil often.", "ugh", ""]
    one = scorer.score(prompts, answers)
    assert one.shape == (3,) and torch.isfinite(one).all()
    combined = CombinedReward.load(rm["path"], 1.0, f"{rm['path']}=-0.25").score(prompts, answers)
    assert torch.allclose(combined, 0.75 * one, atol=1e-5)


def test_ppo_job_with_no_prompts_or_pairs_fails_clearly(tiny_model, tmp_path):
    from loop.training.child import EXIT_NO_PAIRS, main

    run_dir = ppo_job(tmp_path / "run", write_snapshot(tmp_path / "snap", n_train=0, n_heldout=0), tiny_model)
    assert main([str(run_dir)]) == EXIT_NO_PAIRS
    assert "no labelled pairs" in (run_dir / "error.txt").read_text()


def test_reward_config_rejects_a_bad_extra_spec():
    with pytest.raises(ValueError, match="DIR=weight"):
        RewardConfig(extra="some/dir")
    with pytest.raises(ValueError, match="DIR=weight"):
        RewardConfig(extra="a=b=heavy")
    assert RewardConfig(extra="x=0.5, y=-1").extra


def ranks_run(model, out, processes: int, *args: str, env: dict[str, str] | None = None) -> dict:
    """tests/ppo_ranks.py (PPO on the toy reward, 48 steps unless `args` say otherwise) under
    `accelerate launch` in `processes` processes; rank 0's result."""
    import subprocess

    from loop.training import launch

    cmd = launch.command(TrainConfig(num_processes=processes), REPO, out, accelerate=True)
    head = cmd[:-3]  # the launcher and its flags, as the scheduler runs them, less `-m loop.training.child DIR`
    assert cmd[-3:] == ["-m", "loop.training.child", str(out)]
    out.mkdir(parents=True)
    done = subprocess.run([*head, str(REPO / "tests" / "ppo_ranks.py"), str(model), str(out), *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_ppo_in_two_cpu_processes_learns_as_one_process_does(tiny_model, tmp_path):
    """Each process rolls out half of every batch and optimises on half of every minibatch; the
    gradients are averaged over both before each step."""
    one, two = ranks_run(tiny_model, tmp_path / "one", 1), ranks_run(tiny_model, tmp_path / "two", 2)
    assert (one["world"], two["world"]) == (1, 2)
    # the two processes end with the very same weights: they stayed in step
    a, b = torch.load(tmp_path / "two" / "weights-0.pt"), torch.load(tmp_path / "two" / "weights-1.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # written once, by rank 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["name"] == "reward"]
    assert steps == list(range(1, 49))
    # the same result within noise: both learn the toy reward, and end near each other (measured over
    # seeds 0-2: 1 process 1.36-1.49 from 0.91-1.20, 2 processes 1.12-1.51 from 0.91-0.98)
    for r in (one, two):
        assert r["reward_last"] > r["reward_first"] + 0.15, r
    assert abs(one["reward_last"] - two["reward_last"]) < 0.35, (one, two)
    assert abs(one["kl_last"] - two["kl_last"]) < 5, (one, two)


@pytest.mark.slow
def test_a_ppo_job_runs_in_two_processes_by_train_num_processes(tiny_model, tmp_path):
    """`train.num_processes = 2` on a machine without CUDA: the scheduler's launch command starts two
    processes (not one, as `--cpu` would), the reward model and PPO both train in both."""
    from loop.training import launch

    run_dir = ppo_job(tmp_path / "run", write_snapshot(tmp_path / "snap"), tiny_model)
    job = json.loads((run_dir / "job.json").read_text())
    train = TrainConfig(**{**job["train"], "num_processes": 2})
    done = launch.launch(job, run_dir, launch.command(train, REPO, run_dir), timeout_s=600,
                         env={"TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.error
    log = (run_dir / "train.log").read_text()
    assert "--cpu" not in launch.command(train, REPO, run_dir)
    ppo_steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["name"] == "kl_coef"]
    assert ppo_steps == [1, 2], log[-2000:]
    # two ranks took part: the reward model's 32 pairs in batches of 8 per process, 2 epochs: 4 steps, not 8
    assert done.result["reward_model"]["metrics"]["steps"] == 4, done.result["reward_model"]
