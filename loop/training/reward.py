"""The reward model: refreshed on every labelled pair with TRL's `RewardTrainer`, and used to score.

Training (`train(...)`, what a `ppo` run does first):

1. the snapshot's labelled pairs (`pairs.parquet`: split "train" to fit, "heldout" to measure);
2. the base model with a one-output sequence-classification head ("score", new and random), LoRA on
   the [train] target modules plus the whole head (`modules_to_save`), or every weight with
   `[reward] lora = false`;
3. Bradley-Terry loss, -log sigmoid(r(chosen) - r(rejected)), plus `center_rewards_coefficient`
   times the mean squared reward, which keeps rewards near 0 (Eisenstein et al. 2023);
4. held-out accuracy (share of held-out pairs where r(chosen) > r(rejected)) and the reward
   scale on held-out answers; saved to `output_dir` (PEFT adapter + head, or the whole model).

Scoring (`RewardModel`, `CombinedReward`): a reward model scores an answer to a prompt as the
trainer saw it, i.e. the chat template applied to prompt + answer. Several reward models combine
into one reward as a weighted sum (multi-objective, e.g. helpful + harmless); PPO whitens or
penalises on top of that.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loop.config import RewardConfig, TrainConfig, extra_rewards

META = "alignloop_reward.json"  # written beside the weights: base model, held-out metrics


def lora_config(cfg: TrainConfig, model=None):
    """[train]'s LoRA on the classifier's blocks (targets as for the policy), plus the score head."""
    from loop.training import toolkit

    return toolkit.lora_config(cfg, model, modules_to_save=["score"], task_type="SEQ_CLS")


def trainer_config(cfg: RewardConfig, train: TrainConfig, output_dir: str | os.PathLike[str], save_steps: int = 0):
    """TRL's `RewardConfig` from [reward] (+ seed, max_length and LoRA dropout from [train]), with
    the shared `loop.training.toolkit.trainer_settings`."""
    from trl import RewardConfig as TRLRewardConfig

    from loop.training.toolkit import trainer_settings

    return TRLRewardConfig(
        output_dir=str(output_dir), learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        center_rewards_coefficient=cfg.center_rewards_coefficient or None, max_length=train.max_length,
        seed=train.seed, **trainer_settings(train.lora_dropout, save_steps),
    )


def load_classifier(base_model: str | os.PathLike[str], new_head: bool = True):
    """(model, tokenizer): the base with a one-output "score" head, pad token known to the model.
    `new_head`: `base_model` is a language model, so the head is missing from it by design, and
    transformers' report that says so (a table in the middle of a retrain's log) and its progress
    bar are not printed; loading a saved classifier (`new_head=False`) keeps both."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tok = AutoTokenizer.from_pretrained(base_model)
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    if new_head:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=1, dtype="float32")
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def train(train_pairs: list[dict[str, Any]], heldout_pairs: list[dict[str, Any]], base_model: str | os.PathLike[str],
          output_dir: str | os.PathLike[str], cfg: RewardConfig, train_cfg: TrainConfig,
          work_dir: str | os.PathLike[str], metrics_path: str | os.PathLike[str] | None = None,
          prefix: str = "reward/", checkpoint_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Fit a reward model on the pairs, measure it on the held-out ones, save it; returns its metrics
    (its curve goes to `metrics_path` under `prefix`). Checkpoints and resume as in
    `loop.training.dpo.run`, in a stage named after `prefix`."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import RewardTrainer

    from loop.training.toolkit import NonFiniteLoss, NoTrainingPairs, metrics_callback_class, stage

    if not train_pairs:
        raise NoTrainingPairs("no labelled pairs to fit the reward model on")
    set_seed(train_cfg.seed)  # before the new head is drawn
    model, tok = load_classifier(base_model)
    callback = metrics_callback_class()(metrics_path, prefix=prefix)
    st = stage(work_dir, checkpoint_dir, f"{prefix.strip('/')}-trainer", train_cfg.checkpoint_steps)
    trainer = RewardTrainer(model=model, args=trainer_config(cfg, train_cfg, st.output_dir, st.save_steps),
                            train_dataset=Dataset.from_list(train_pairs), processing_class=tok,
                            peft_config=lora_config(train_cfg, model) if cfg.lora else None, callbacks=[callback])
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=st.resume_arg)
    if callback.failure:
        raise NonFiniteLoss(f"reward model: {callback.failure}")
    metrics: dict[str, Any] = {"train_pairs": len(train_pairs), "heldout_pairs": len(heldout_pairs),
                               "train_seconds": round(time.perf_counter() - t0, 2), "train_loss": out.training_loss,
                               "steps": trainer.state.global_step, "resumed_from_step": st.resumed_step,
                               "accuracy": None}
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.accelerator.is_main_process:
        scorer = RewardModel(model, tok)
        if heldout_pairs:
            metrics.update(heldout_accuracy(scorer, heldout_pairs))
        save(model, tok, output_dir, {"base_model": str(base_model), "lora": cfg.lora, "metrics": metrics})
    trainer.accelerator.wait_for_everyone()
    return metrics


def heldout_accuracy(scorer: RewardModel, pairs: list[dict[str, Any]]) -> dict[str, float]:
    """Share of pairs where the chosen answer scores higher, and the scores' mean and spread."""
    import torch

    prompts = [p["prompt"] for p in pairs]
    chosen = scorer.score(prompts, [p["chosen"][-1]["content"] for p in pairs])
    rejected = scorer.score(prompts, [p["rejected"][-1]["content"] for p in pairs])
    both = torch.cat([chosen, rejected])
    return {"accuracy": float((chosen > rejected).float().mean()), "margin": float((chosen - rejected).mean()),
            "reward_mean": float(both.mean()), "reward_std": float(both.std())}


def save(model, tok, output_dir: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    """Weights (PEFT adapter with the head, or the whole model), tokenizer and META, renamed into place."""
    import shutil

    out = Path(output_dir)
    tmp = out.with_name(f".{out.name}.saving-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


class RewardModel:
    """A loaded reward model; `score` gives one number per (prompt, answer)."""

    def __init__(self, model, tok, batch_size: int = 32) -> None:
        self.model, self.tok, self.batch_size = model, tok, batch_size

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RewardModel:
        path = Path(path)
        meta_path = path / META
        if not meta_path.exists():
            raise FileNotFoundError(f"{path} is not a reward model made by alignloop ({META} is missing)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("lora"):
            from peft import PeftModel

            model, tok = load_classifier(meta["base_model"])
            model = PeftModel.from_pretrained(model, str(path))
        else:
            model, tok = load_classifier(path, new_head=False)
        model.eval()
        return cls(model, tok)

    def score(self, prompts: list[list[dict[str, str]]], answers: list[str]):
        """Rewards (a float tensor) of each answer to its prompt (chat messages)."""
        import torch

        texts = [self.tok.apply_chat_template([*p, {"role": "assistant", "content": a}], tokenize=False)
                 for p, a in zip(prompts, answers, strict=True)]
        side, self.tok.padding_side = self.tok.padding_side, "right"
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            with torch.inference_mode():
                for i in range(0, len(texts), self.batch_size):
                    enc = self.tok(texts[i: i + self.batch_size], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(next(self.model.parameters()).device)
                    out.append(self.model(**enc).logits[:, 0].float().cpu())
        finally:
            self.tok.padding_side = side
            self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)


@dataclass
class CombinedReward:
    """Weighted sum of several reward models' scores (multi-objective)."""

    parts: list[tuple[RewardModel, float]]

    @classmethod
    def load(cls, main: str | os.PathLike[str] | None, weight: float = 1.0, extra: str = "") -> CombinedReward:
        """The refreshed reward model at `main` with `weight`, plus [reward] extra's 'DIR=weight,...'."""
        parts = [(RewardModel.load(main), weight)] if main else []
        parts += [(RewardModel.load(path), w) for path, w in extra_rewards(extra)]
        if not parts:
            raise ValueError("no reward model to score with")
        return cls(parts)

    def score(self, prompts: list[list[dict[str, str]]], answers: list[str]):
        total = None
        for model, weight in self.parts:
            s = weight * model.score(prompts, answers)
            total = s if total is None else total + s
        return total
