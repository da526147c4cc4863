"""One GPU, two jobs (issue 11): the check that refuses, with the numbers, a trainer that cannot fit
beside the engine, and lets through one that can. No GPU here: the GPUs' sizes are given; the
weights are counted from real safetensors files (the tiny demo model, and one of a real model's size
written as a header only)."""

from __future__ import annotations

import json
import struct

import pytest

from loop.sections import EngineConfig, RewardConfig, TrainConfig
from loop.training import memory

GiB = memory.GiB


def header_only_model(path, params: int):
    """A safetensors file whose header declares `params` bf16 numbers (the bytes themselves are not
    written: only the header is read)."""
    path.mkdir(parents=True)
    head = json.dumps({"model.embed_tokens.weight": {"dtype": "BF16", "shape": [params // 1000, 1000],
                                                     "data_offsets": [0, 2 * params]}}).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head)
    return path


def test_weights_are_counted_from_the_safetensors_headers(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    stored = {id(p): p.numel() for p in model.parameters()}  # a tied embedding is one tensor
    assert memory.parameters(tiny_model) == sum(stored.values())
    assert memory.parameters(header_only_model(tmp_path / "qwen", 494_000_000)) == 494_000_000
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        memory.parameters(tmp_path)


def test_a_trainer_that_cannot_fit_beside_the_engine_is_refused_with_the_numbers():
    half_b = 494_000_000  # Qwen2.5-0.5B
    one_gpu = {"0": 24 * GiB}
    # PPO holds the policy and the reward model, in fp32: 2 x 1.84 GiB, more than the 2.4 GiB the engine leaves
    with pytest.raises(memory.DoesNotFit) as e:
        memory.check("ppo", half_b, TrainConfig(), RewardConfig(), EngineConfig(), one_gpu)
    message = str(e.value)
    for number in ("3.7 GiB on GPU 0", "24.0 GiB", "engine takes 90%", "leaving 2.4 GiB", "0.49B parameters",
                   "engine.gpu_memory_share", "train.devices"):
        assert number in message, message
    # DPO holds one model (the reference is the adapter off): it fits in what is left
    assert memory.check("dpo", half_b, TrainConfig(), RewardConfig(), EngineConfig(), one_gpu).bytes == half_b * 4
    # the engine at half the card, or the trainer on a GPU of its own: PPO fits
    memory.check("ppo", half_b, TrainConfig(), RewardConfig(), EngineConfig(gpu_memory_share=0.5), one_gpu)
    two_gpus = {"0": 24 * GiB, "1": 24 * GiB}
    memory.check("ppo", half_b, TrainConfig(devices="1"), RewardConfig(), EngineConfig(devices="0"), two_gpus)
    # a reward model trained in full holds its gradients and Adam moments too
    full = memory.need("dpo", half_b, RewardConfig(lora=False))
    assert full.stage == "reward model fit" and full.bytes == half_b * 4 * 4
    with pytest.raises(memory.DoesNotFit, match="names GPU 3, but this machine has 2"):
        memory.check("dpo", half_b, TrainConfig(devices="3"), RewardConfig(), EngineConfig(), two_gpus)


def test_a_ppo_run_with_its_own_rollout_engine_counts_that_engine_on_its_first_gpu():
    half_b, one_gpu = 494_000_000, {"0": 16 * GiB}
    # PPO needs 3.7 GiB: beside an engine at half the card it fits; with its own engine at 30% as well it does not
    serving_half = EngineConfig(gpu_memory_share=0.5)
    with pytest.raises(memory.DoesNotFit) as e:
        memory.check("ppo", half_b, TrainConfig(), RewardConfig(), serving_half, one_gpu, rollout_share=0.3)
    message = str(e.value)
    for part in ("the engine takes 50% (engine.gpu_memory_share)", "the run's own rollout engine takes 30% "
                 "(ppo.rollout_engine_share)", "leaving 3.2 GiB", "Lower engine.gpu_memory_share or "
                 "ppo.rollout_engine_share"):
        assert part in message, message
    memory.check("ppo", half_b, TrainConfig(), RewardConfig(), serving_half, one_gpu)
    memory.check("ppo", half_b, TrainConfig(), RewardConfig(), serving_half, one_gpu, rollout_share=0.1)
    # the trainer on a GPU of its own shares it with its rollout engine alone
    two_gpus = {"0": 16 * GiB, "1": 16 * GiB}
    memory.check("ppo", half_b, TrainConfig(devices="1"), RewardConfig(), EngineConfig(devices="0"), two_gpus,
                 rollout_share=0.7)
    with pytest.raises(memory.DoesNotFit, match="the run's own rollout engine takes 90%"):
        memory.check("ppo", half_b, TrainConfig(devices="1"), RewardConfig(), EngineConfig(devices="0"), two_gpus,
                     rollout_share=0.9)


def test_without_cuda_nothing_is_checked(tmp_path):
    from loop.config import Config, DataConfig

    assert memory.preflight(Config(data=DataConfig(dir=str(tmp_path))), ["ppo"]) == []
