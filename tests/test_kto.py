"""KTO on thumbs feedback (`loop.training.kto`), in-process on the tiny demo model: the feedback split, the
refusals, one short real run (adapter, metrics, KL), and the NaN stop.

Feedback rows are demo-corpus answers: a polite on-topic one is a thumb up, another style a thumb down.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from loop.demo import corpus as demo_corpus

from loop.training import kto
from loop.config import KTOConfig, TrainConfig
from loop.training.toolkit import NonFiniteLoss, NoTrainingPairs
from tests import nan_injection
from store.export import split_bucket, split_of

# small and quick: 16 train rows, 4 per step, 1 epoch = 4 steps
FAST_TRAIN = dict(lora_r=4, lora_alpha=8, max_length=64, target_modules="q_proj,v_proj")
FAST_KTO = dict(epochs=1.0, batch_size=4, learning_rate=5e-3, beta=0.5, heldout_share=0.2)


def feedback_rows(n: int, seed: int = 0, labels: str = "random") -> list[dict]:
    """`n` rows as store.export.feedback_rows writes them (ids 1..n); labels "random", "alternate"
    (up, down, up, ...: every batch of the sequential sampler has both), "up" or "down"."""
    rng = random.Random(seed)
    prompts = demo_corpus.prompts("train")
    rows = []
    for i in range(n):
        prompt = prompts[i % len(prompts)]
        topic = demo_corpus.topic_of(prompt)
        good = {"random": rng.random() < 0.5, "alternate": i % 2 == 0, "up": True, "down": False}[labels]
        style = "polite_on" if good else rng.choice(["rude_on", "polite_off", "rude_off"])
        text, _ = demo_corpus.reply(topic, style, rng)
        rows.append({"id": i + 1, "bucket": split_bucket(str(i + 1)), "prompt": [{"role": "user", "content": prompt}],
                     "completion": [{"role": "assistant", "content": text}],
                     "label": good, "kind": "thumbs", "value": 1.0 if good else 0.0})
    return rows


def write_feedback(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({}), path / "feedback.parquet")
    return path


def split_rows(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Exactly n_train / n_heldout rows in run()'s format, ups and downs alternating."""
    rows = [{k: r[k] for k in kto.FIELDS} for r in feedback_rows(n_train + n_heldout, seed, labels="alternate")]
    return rows[:n_train], rows[n_train:]


# ----------------------------------------------------------------------------------------------
# data and configuration (no model)


def key(row: dict) -> tuple:
    return row["prompt"][0]["content"], row["completion"][0]["content"], row["label"]


def test_load_feedback_split_is_stable_and_complete(tmp_path):
    rows = feedback_rows(60)
    snap = write_feedback(tmp_path / "a", rows)
    train, heldout = kto.load_feedback(snap, 0.25)
    assert all(set(r) == {"prompt", "completion", "label"} and isinstance(r["label"], bool) for r in train + heldout)
    # every row lands on exactly one side, chosen by store.export.split_of of its feedback id
    expect = {s: sorted(key(r) for r in rows if split_of(str(r["id"]), 0.25) == s) for s in ("train", "heldout")}
    assert sorted(map(key, train)) == expect["train"] and sorted(map(key, heldout)) == expect["heldout"]
    assert 0 < len(heldout) < 30 and len(train) + len(heldout) == 60
    assert {r["label"] for r in train} == {True, False}
    # the same rows in another order, in a later snapshot with more rows: the same ones held out
    more = write_feedback(tmp_path / "b", list(reversed(rows)) + feedback_rows(80)[60:])
    train2, heldout2 = kto.load_feedback(more, 0.25)
    assert set(map(key, heldout)) <= set(map(key, heldout2)) and set(map(key, train)) <= set(map(key, train2))
    assert kto.load_feedback(snap, 0.25) == (train, heldout)
    assert kto.load_feedback(snap, 0.0) == ([{k: r[k] for k in kto.FIELDS} for r in rows], [])


def test_no_feedback_refuses_before_loading_a_model(tmp_path):
    empty = write_feedback(tmp_path / "empty", [])
    assert kto.load_feedback(empty, 0.1) == ([], [])
    common = dict(base_model=tmp_path / "no-model", output_adapter=tmp_path / "adapter", cfg=KTOConfig(**FAST_KTO),
                  train_cfg=TrainConfig(**FAST_TRAIN), work_dir=tmp_path / "run")
    with pytest.raises(kto.NoFeedback, match="no training feedback"):
        kto.run([], [], **common)
    train, _ = kto.load_feedback(write_feedback(tmp_path / "ups", feedback_rows(20, labels="up")), 0.1)
    with pytest.raises(kto.NoFeedback, match=rf"both thumbs up and thumbs down.*{len(train)} up and 0 down"):
        kto.run(train, [], **common)
    downs = [{k: r[k] for k in kto.FIELDS} for r in feedback_rows(5, labels="down")]
    with pytest.raises(kto.NoFeedback, match="0 up and 5 down"):
        kto.run(downs, [], **common)
    # a ValueError, reported by loop.training.child like an empty DPO snapshot
    assert issubclass(kto.NoFeedback, ValueError) and issubclass(kto.NoFeedback, NoTrainingPairs)
    assert not (tmp_path / "adapter").exists()


def test_kto_config_follows_kto_and_train_sections(tmp_path):
    cfg = KTOConfig(learning_rate=2e-3, epochs=3.0, batch_size=4, beta=0.3, desirable_weight=1.5,
                    undesirable_weight=0.5)
    train = TrainConfig(max_length=64, seed=7, lora_dropout=0.1, learning_rate=9e-9, batch_size=99, beta=9.0)
    args = kto.kto_config(cfg, train, tmp_path)
    assert (args.learning_rate, args.num_train_epochs, args.per_device_train_batch_size) == (2e-3, 3.0, 4)
    assert args.per_device_eval_batch_size == 4
    assert (args.beta, args.desirable_weight, args.undesirable_weight) == (0.3, 1.5, 0.5)
    assert (args.max_length, args.seed, args.loss_type) == (64, 7, "kto")
    assert args.logging_steps == 1 and not args.logging_nan_inf_filter and args.save_strategy == "no"
    assert args.report_to == [] or args.report_to == "none" or args.report_to == ["none"]
    assert args.train_sampling_strategy == "sequential"
    assert not args.disable_dropout
    import torch

    if not torch.cuda.is_available():
        assert args.use_cpu and not args.bf16
    with pytest.raises(ValueError, match="at least 2"):
        kto.kto_config(KTOConfig(batch_size=1), train, tmp_path)


# ----------------------------------------------------------------------------------------------
# real runs on the tiny model


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """One short run: 16 train rows, 4 per step, 1 epoch = 4 steps; 4 held out."""
    run_dir = tmp_path_factory.mktemp("kto-run")
    train, heldout = split_rows(16, 4)
    metrics, policy = kto.run(train, heldout, base_model=tiny_model, output_adapter=run_dir / "adapter",
                              cfg=KTOConfig(**FAST_KTO), train_cfg=TrainConfig(**FAST_TRAIN), work_dir=run_dir,
                              metrics_path=run_dir / "metrics.jsonl", kl_prompts=4)
    return run_dir, metrics


def test_kto_run_trains_saves_and_reports(trained, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, m = trained
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "ref").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(adapter))
    assert sum("lora_" in n for n, _ in model.named_parameters()) > 0
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == FAST_TRAIN["lora_r"]
    from safetensors.torch import load_file

    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert all(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at zero: it trained

    counts = ("train_feedback", "heldout_feedback", "desirable", "undesirable", "steps")
    assert [m[k] for k in counts] == [16, 4, 8, 8, 4]
    assert math.isfinite(m["train_loss"]) and m["train_seconds"] > 0
    for name in ("eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins", "eval_kl"):
        assert math.isfinite(m[name]), name
    # Before any update the policy is the reference (LoRA B = 0): every implied reward and the KL term
    # are 0, so each row's loss is 1 - sigmoid(0) = 0.5 (step 1's loss below). Learning shows as a
    # held-out loss below 0.5 and thumbs-up answers rewarded above thumbs-down ones. Measured on the
    # tiny model (deterministic per seed on CPU): eval loss 0.487, margin +0.10.
    assert m["eval_loss"] < 0.5 and m["eval_rewards/margins"] > 0, m
    # the estimate is a sum of non-negative terms, so >= 0 always holds; > 0 says the adapter changed
    # the policy and the estimate saw it (measured 0.08 nats)
    assert m["kl_to_base"] > 0

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(set(x) == {"step", "name", "value"} for x in lines)
    for name in ("loss", "kl", "rewards/chosen", "rewards/rejected", "learning_rate", "grad_norm"):
        assert [x["step"] for x in lines if x["name"] == name][:4] == [1, 2, 3, 4], name
    assert all(math.isfinite(x["value"]) for x in lines if x["name"] == "loss")
    assert next(x["value"] for x in lines if x["name"] == "loss") == pytest.approx(0.5, abs=1e-6)


def test_nan_loss_stops_the_run_and_saves_nothing(trained, tiny_model, tmp_path, monkeypatch):
    """Continuing from the first run's adapter (TRL's frozen "ref" copy path); NaN weights at step 2."""
    first_dir, _ = trained
    from loop.training import toolkit

    monkeypatch.setattr(toolkit, "metrics_callback_class", toolkit.metrics_callback_class)  # undone after the test
    nan_injection.install(step=2)
    train, heldout = split_rows(16, 4, seed=1)
    with pytest.raises(NonFiniteLoss, match="NaN"):
        kto.run(train, heldout, base_model=tiny_model, output_adapter=tmp_path / "adapter",
                cfg=KTOConfig(**FAST_KTO), train_cfg=TrainConfig(**FAST_TRAIN), work_dir=tmp_path,
                init_adapter=first_dir / "adapter", metrics_path=tmp_path / "metrics.jsonl", kl_prompts=4)
    assert not (tmp_path / "adapter").exists()
    assert not list(tmp_path.glob(".adapter.saving-*"))
    losses = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in losses if x["name"] == "loss"] == [1]  # step 2's NaN stopped it
