"""KTO with LoRA on a snapshot's thumbs-up/down feedback (TRL `KTOTrainer`), and the held-out evaluation.

What a run does, top to bottom (`load_feedback(...)`, then `run(...)`):

1. read `feedback.parquet` of a snapshot: one answer per row, `label` True for thumbs up (or a score
   above 0.5), False for thumbs down (TRL's conversational unpaired-preference format). A stable hash
   of the feedback id (`store.export.split_of`) holds out a share `[kto] heldout_share`, never trained on;
2. refuse to train (`NoFeedback`) without training rows, or when they are all up or all down: KTO
   pushes desirable answers above, and undesirable ones below, a reference point estimated from the
   batch, and with one side only it has nothing to contrast;
3. load the base model; start a fresh LoRA adapter (`peft_config` from [train] lora_r, lora_alpha,
   lora_dropout, target_modules), or continue from the serving adapter (its own rank and targets win),
   exactly as `loop.training.dpo` does;
4. train with TRL's `KTOTrainer`, `ref_model=None`: the reference log-probs come from the same weights
   with the adapter disabled (fresh adapter: the base) or from TRL's frozen "ref" copy of the starting
   adapter. KTO's reference point (its KL term) is estimated in each batch from mismatched (prompt,
   answer) pairs, the answers rotated by one within the batch, so a batch needs at least 2 answers and
   the data is read in order (TRL's "sequential" sampler; the rows are shuffled once, with the run's
   seed, beforehand). Every logging step goes to `metrics.jsonl` (rank 0 only);
5. stop at once on a NaN/inf loss or gradient norm (`NonFiniteLoss`; nothing is saved);
6. evaluate on the held-out feedback (`eval_loss`, `eval_rewards/chosen`, `eval_rewards/rejected`,
   `eval_rewards/margins`, `eval_kl`, ...: TRL's names; "chosen" means thumbs up) and estimate
   `kl_to_base`, KL(policy || base) in nats per answer, by sampling answers from the policy on the
   held-out prompts (`loop.training.toolkit.kl_to_base`);
7. save the adapter (PEFT format, the trained adapter only) to `output_adapter`.

This module is what `python -m loop.training.child RUN_DIR` (under `accelerate launch`) runs for
`method = "kto"`. The model, adapter, metrics and KL helpers are `loop.training.dpo`'s, as is the test hook
`ALIGNLOOP_TEST_NAN_AT_STEP`. Heavy imports (torch, transformers, trl, peft) happen inside the functions.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from loop.config import KTOConfig, TrainConfig
from loop.training import toolkit

FIELDS = ("prompt", "completion", "label")


class NoFeedback(toolkit.NoTrainingPairs):
    """No training feedback, or only one kind (all thumbs up or all thumbs down): KTO needs both.
    A `ValueError`; a subclass of `loop.training.toolkit.NoTrainingPairs`, so `loop.training.child` reports it as "no
    training data" (exit status 2) like an empty DPO snapshot."""


# ----------------------------------------------------------------------------------------------
# data


def load_feedback(snapshot: str | os.PathLike[str],
                  heldout_share: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, heldout) feedback of a snapshot, each row {"prompt", "completion", "label"} in TRL's
    conversational unpaired-preference format. A row is held out when its `bucket` (a stable hash of
    its feedback id, written by the snapshot) is below `heldout_share`, so the held-out set of an id
    never changes between snapshots."""
    import pyarrow.parquet as pq

    rows = pq.read_table(Path(snapshot) / "feedback.parquet").to_pylist()
    train, heldout = [], []
    for r in rows:
        row = {k: r[k] for k in FIELDS}
        row["label"] = bool(row["label"])
        (heldout if r["bucket"] < heldout_share else train).append(row)
    return train, heldout


def check_feedback(train_rows: list[dict[str, Any]]) -> tuple[int, int]:
    """(desirable, undesirable) counts of the training rows; `NoFeedback` unless both are positive."""
    desirable = sum(bool(r["label"]) for r in train_rows)
    undesirable = len(train_rows) - desirable
    if not train_rows:
        raise NoFeedback("no training feedback")
    if not desirable or not undesirable:
        raise NoFeedback(f"KTO needs both thumbs up and thumbs down to train on; the training feedback has "
                         f"{desirable} up and {undesirable} down")
    return desirable, undesirable


# ----------------------------------------------------------------------------------------------
# configuration


def kto_config(cfg: KTOConfig, train: TrainConfig, output_dir: str | os.PathLike[str], save_steps: int = 0):
    """TRL's `KTOConfig` from the [kto] section (learning rate, epochs, batch size, beta, the
    desirable/undesirable weights) and [train]'s max_length, seed and LoRA dropout, with the shared
    `loop.training.toolkit.trainer_settings`."""
    from trl import KTOConfig as TRLKTOConfig

    if cfg.batch_size < 2:
        raise ValueError(f"kto.batch_size must be at least 2, got {cfg.batch_size}: KTO estimates its KL "
                         "reference point from the other answers in the same batch")
    return TRLKTOConfig(
        output_dir=str(output_dir),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        # the held-out set's KL answers are rotated in blocks of the train batch size: evaluate in the same blocks
        per_device_eval_batch_size=cfg.batch_size,
        beta=cfg.beta,
        desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight,
        loss_type="kto",
        max_length=train.max_length,
        seed=train.seed,
        # the KL term pairs each answer with its neighbour in a fixed-order batch (TRL's default, required)
        train_sampling_strategy="sequential",
        **toolkit.trainer_settings(train.lora_dropout, save_steps),
    )


# ----------------------------------------------------------------------------------------------
# the run


def run(
    train_rows: list[dict[str, Any]],
    heldout_rows: list[dict[str, Any]],
    base_model: str | os.PathLike[str],
    output_adapter: str | os.PathLike[str] | None,
    cfg: KTOConfig,
    train_cfg: TrainConfig,
    work_dir: str | os.PathLike[str],
    init_adapter: str | os.PathLike[str] | None = None,
    metrics_path: str | os.PathLike[str] | None = None,
    kl_prompts: int = toolkit.KL_PROMPTS,
    checkpoint_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Any], Any]:
    """Train, evaluate on the held-out feedback, save the adapter (when `output_adapter` is given);
    checkpoints and resume as in `loop.training.dpo.run`.

    Returns (metrics, model); metrics holds `eval_*` (TRL's names, e.g. `eval_loss`,
    `eval_rewards/chosen`, `eval_rewards/rejected`, `eval_rewards/margins`, `eval_kl`), `kl_to_base`,
    `train_feedback`, `heldout_feedback`, `desirable`, `undesirable` (training rows up / down),
    `train_seconds`, `train_loss`, `steps`. Raises `NoFeedback` or `NonFiniteLoss`. Every process of
    a distributed run calls this; only the main one writes metrics, estimates KL and saves.
    """
    from datasets import Dataset
    from trl import KTOTrainer

    desirable, undesirable = check_feedback(train_rows)
    stage = toolkit.stage(work_dir, checkpoint_dir, "trainer", train_cfg.checkpoint_steps)
    args = kto_config(cfg, train_cfg, stage.output_dir, stage.save_steps)
    # read in a fixed order (see the module docstring): shuffle once so that batches mix old and new
    # feedback, ups and downs, the same way in every process
    rows = [{k: r[k] for k in FIELDS} for r in train_rows]
    random.Random(train_cfg.seed).shuffle(rows)
    heldout = [{k: r[k] for k in FIELDS} for r in heldout_rows]

    model, tok = toolkit.load_policy(base_model, init_adapter)
    callback = toolkit.metrics_callback_class()(metrics_path)
    trainer = KTOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(heldout) if heldout else None,
        processing_class=tok,
        peft_config=None if init_adapter else toolkit.lora_config(train_cfg, model),
        callbacks=[callback],
    )
    if len(trainer.train_dataset) == 0:  # TRL drops the rows whose prompt alone fills max_length
        raise NoFeedback(f"no training feedback fits in train.max_length = {train_cfg.max_length} tokens")
    counts = {"train_feedback": len(train_rows), "heldout_feedback": len(heldout_rows),
              "desirable": desirable, "undesirable": undesirable}
    return toolkit.train_and_report(trainer, callback, tok, counts, [r["prompt"] for r in heldout[:kl_prompts]],
                                ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins"),
                                output_adapter, train_cfg.seed, stage)
