"""PPO's own rollout engine (`ppo.rollouts = "dedicated"`): a real vLLM server of the base model,
started by the run, its weights reloaded with the policy at every step, stopped at the end."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from loop.config import EngineConfig
from loop.vllm_server import group_members
from loop.training import rollout_engine
from tests.serving import make_adapter


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def engine_processes(port: int) -> list[int]:
    """Processes whose command line serves on `port` (a leftover engine's API server)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"--port\0{port}\0".encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def test_ppo_in_two_processes_on_its_own_engine_samples_every_step_with_that_steps_weights(tiny_model, tmp_path):
    """`accelerate launch` with 2 processes, as a PPO job with `ppo.rollouts = "dedicated"` runs:
    rank 0 starts the engine and reloads the policy's weights into it at every step, both ranks
    sample their halves there. The engine's log-probs of the sampled tokens match the trainer's
    while the policy moves away from the base (stale weights would show in the gap), every answer
    trained on came from the engine, the ranks stay in step, and at the end the engine is gone.
    (The prefix cache is emptied at each reload too, but these prompts are shorter than one cache
    block, so nothing here would be cached.)"""
    import torch

    from tests.test_ppo import ranks_run

    port, steps = rollout_engine.free_port(), 6
    result = ranks_run(tiny_model, tmp_path / "two", 2, "--steps", str(steps), "--dedicated", str(port))
    assert result["world"] == 2 and result["rollouts_on"] == "dedicated engine", result
    assert result["rollout_engine_steps"] == steps and result["rollout_fallback"] is None, result
    a, b = torch.load(tmp_path / "two" / "weights-0.pt"), torch.load(tmp_path / "two" / "weights-1.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    trained_on = sum(r["value"] for r in rows if r["name"] == "length") * 32  # 32 answers a step
    assert result["rollout_engine_tokens"] == pytest.approx(trained_on), (result, trained_on)
    gaps = [r["value"] for r in rows if r["name"] == "engine_logprob_gap"]
    kl = [r["value"] for r in rows if r["name"] == "kl"]
    print("engine/trainer log-prob gap per step", gaps, "KL to the base per step", kl)
    assert len(gaps) == steps and max(gaps) < 0.05, gaps
    assert kl[-1] > 20 * max(gaps) * 16, kl
    assert port_is_free(port) and not engine_processes(port)
    assert not (tmp_path / "two" / "rollout-weights").exists()


def test_an_engine_that_cannot_start_leaves_the_run_on_hf_generate_and_nothing_behind(tiny_model, tmp_path, monkeypatch):
    """A base model vLLM cannot load: the run says why, samples with HF generate, and no process of
    the failed engine is left."""
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    (broken / "config.json").write_text("{broken", encoding="utf-8")
    settings = rollout_engine.job_settings(EngineConfig(max_model_len=256, startup_timeout_s=120), rollout_engine.free_port())
    lines: list[str] = []
    pids: list[int] = []
    real_popen = rollout_engine.subprocess.Popen

    def popen(*args, **kwargs):  # the real one; only its pid is kept, to check its group is gone
        pids.append(real_popen(*args, **kwargs))
        return pids[-1]

    monkeypatch.setattr(rollout_engine.subprocess, "Popen", popen)
    engine = rollout_engine.RolloutEngine.start(settings, str(broken), tmp_path, 1, 1, log=lines.append)
    pgid = pids[0].pid
    assert engine.failed and "starting the rollout engine" in engine.failed and "exited" in engine.failed, engine.failed
    assert engine.proc is None and port_is_free(settings["port"]) and not group_members(pgid)
    assert any("fall back to HF generate" in line for line in lines), lines
    assert engine.sample(1, [[1, 2, 3]], 4, 1.0) is None
    engine.close()


def test_the_merged_weights_are_the_policy_with_its_adapter_folded_in(tiny_model, tmp_path):
    """What the engine loads: the base model's names and shapes, and the same outputs as the LoRA model."""
    import torch
    from transformers import AutoModelForCausalLM

    from loop.training.toolkit import load_policy

    model, _ = load_policy(tiny_model, make_adapter(tiny_model, tmp_path / "adapter", seed=0))
    weights = rollout_engine.merged_weights(model)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert set(weights) == set(plain.state_dict()), set(weights) ^ set(plain.state_dict())
    plain.load_state_dict(weights)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-4)
        model.disable_adapter_layers()
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits, plain(ids).logits,
                                  atol=1e-3)
        model.enable_adapter_layers()
