"""DPO with LoRA on a snapshot's labelled pairs (TRL `DPOTrainer`), and the held-out evaluation.

What a run does, top to bottom (`run(...)`):

1. read `pairs.parquet` of a snapshot; train on split == "train" only, evaluate on "heldout";
2. load the base model; start a fresh LoRA adapter (`peft_config` from [train] lora_r, lora_alpha,
   lora_dropout, target_modules), or continue from the serving adapter
   (`PeftModel.from_pretrained(base, init_adapter, is_trainable=True)`; its own rank and targets
   then win over [train]'s);
3. train with TRL's `DPOTrainer`, `ref_model=None`: the trainer gets the reference log-probs from the
   same weights with the adapter disabled (fresh adapter: the base), or, when continuing, from a
   frozen copy of the starting adapter that TRL adds under the name "ref" (a few MB, not a second
   copy of the base weights). Every logging step goes to `metrics.jsonl` (rank 0 only);
4. stop at once on a NaN/inf loss or gradient norm (`NonFiniteLoss`; nothing is saved);
5. evaluate on the held-out pairs (`eval_loss`, `eval_rewards/accuracies`, ...) and estimate
   `kl_to_base`, KL(policy || base) in nats per answer, by sampling answers from the policy;
6. save the adapter (PEFT format, the trained adapter only) to `output_adapter`.

This module is what `python -m loop.training.child RUN_DIR` (under `accelerate launch`) runs for
`method = "dpo"`; `ops/bench/dpo_demo.py` calls `run(...)` in-process. Heavy imports (torch,
transformers, trl, peft) happen inside the functions.
The pieces every trainer shares (LoRA, trainer settings, metrics callback, KL, saving) are in
`loop.training.toolkit`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loop.sections import TrainConfig
from loop.training import toolkit
from loop.training.toolkit import (
    KL_PROMPTS,
    NoTrainingPairs,
    load_policy,
    lora_config,
    train_and_report,
    trainer_settings,
)

# ----------------------------------------------------------------------------------------------
# data


def load_pairs(snapshot: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, heldout) pairs of a snapshot, each row {"prompt", "chosen", "rejected"} in TRL's
    conversational preference format (lists of {"role", "content"} messages)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(Path(snapshot) / "pairs.parquet").to_pylist()
    keep = ("prompt", "chosen", "rejected")
    train = [{k: r[k] for k in keep} for r in rows if r.get("split") == "train"]
    heldout = [{k: r[k] for k in keep} for r in rows if r.get("split") == "heldout"]
    return train, heldout


# ----------------------------------------------------------------------------------------------
# configuration


def dpo_config(cfg: TrainConfig, output_dir: str | os.PathLike[str], save_steps: int = 0):
    """TRL's `DPOConfig` from the [train] section, with the shared `trainer_settings` (a checkpoint
    in `output_dir` every `save_steps` steps; 0: none)."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(output_dir),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        beta=cfg.beta,
        # several losses are summed with weight 1: "sigmoid,sft" is DPO plus the chosen answers' NLL (RPO)
        loss_type=[t.strip() for t in cfg.loss_type.split(",") if t.strip()],
        max_length=cfg.max_length,
        seed=cfg.seed,
        **trainer_settings(cfg.lora_dropout, save_steps),
    )


# ----------------------------------------------------------------------------------------------
# the run


def run(
    train_pairs: list[dict[str, Any]],
    heldout_pairs: list[dict[str, Any]],
    base_model: str | os.PathLike[str],
    output_adapter: str | os.PathLike[str] | None,
    cfg: TrainConfig,
    work_dir: str | os.PathLike[str],
    init_adapter: str | os.PathLike[str] | None = None,
    metrics_path: str | os.PathLike[str] | None = None,
    kl_prompts: int = KL_PROMPTS,
    checkpoint_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Any], Any]:
    """Train, evaluate on the held-out pairs, save the adapter (when `output_adapter` is given).
    With a `checkpoint_dir` (one per job), checkpoint there every `cfg.checkpoint_steps` steps and
    resume from the newest checkpoint a killed run of the same job left (`toolkit.stage`).

    Returns (metrics, model); metrics holds `eval_*` (TRL's names, e.g. `eval_rewards/accuracies`,
    `eval_loss`), `kl_to_base`, `train_pairs`, `heldout_pairs`, `train_seconds`, `train_loss`, `steps`.
    Raises `NoTrainingPairs` or `NonFiniteLoss`. Every process of a distributed run calls this; only
    the main one writes metrics, estimates KL and saves.
    """
    from datasets import Dataset
    from trl import DPOTrainer

    if not train_pairs:
        raise NoTrainingPairs("no training pairs")
    model, tok = load_policy(base_model, init_adapter)
    callback = toolkit.metrics_callback_class()(metrics_path)
    stage = toolkit.stage(work_dir, checkpoint_dir, "trainer", cfg.checkpoint_steps)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=dpo_config(cfg, stage.output_dir, stage.save_steps),
        train_dataset=Dataset.from_list(train_pairs),
        eval_dataset=Dataset.from_list(heldout_pairs) if heldout_pairs else None,
        processing_class=tok,
        peft_config=None if init_adapter else lora_config(cfg, model),
        callbacks=[callback],
    )
    counts = {"train_pairs": len(train_pairs), "heldout_pairs": len(heldout_pairs)}
    return train_and_report(trainer, callback, tok, counts, [p["prompt"] for p in heldout_pairs[:kl_prompts]],
                            ("eval_loss", "eval_rewards/accuracies"), output_adapter, cfg.seed, stage)


