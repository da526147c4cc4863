"""The exported snapshot trains TRL's DPOTrainer as it is: one step on the tiny model, from the CLI's
export of real HH pairs. A trained LoRA parameter must move."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_cli_export_trains_a_dpo_step(tiny_model, hh_sample, tmp_path):
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    cli = [sys.executable, "-m", "loop.cli", "--config", str(tmp_path / "alignloop.toml")]
    subprocess.run(cli + ["init"], check=True, capture_output=True)
    subprocess.run(cli + ["import", str(hh_sample), "--format", "hh"], check=True, capture_output=True)
    out = tmp_path / "pairs.jsonl"
    done = subprocess.run(cli + ["export", "pairs", "--format", "jsonl", "--output", str(out)],
                          check=True, capture_output=True, text=True)
    assert "24 pairs" in done.stdout
    assert json.loads((tmp_path / "pairs.jsonl.manifest.json").read_text())["counts"]["pairs"] == 24

    dataset = load_dataset("json", data_files=str(out), split="train")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=4,
                     learning_rate=1e-2, bf16=False, use_cpu=True, report_to=[], logging_steps=1,
                     max_length=128, save_strategy="no")
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    moved = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
    assert moved and all("lora" in n for n in moved)
    # step 1's loss is taken before the update, with the policy equal to the reference (LoRA B = 0):
    # every log-ratio is 0, so the sigmoid DPO loss is -log sigmoid(0) = ln 2
    assert trainer.state.log_history[0]["loss"] == pytest.approx(0.693147, abs=1e-4)  # ln 2
