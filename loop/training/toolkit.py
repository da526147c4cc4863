"""What every trainer of the project shares (DPO, KTO, the reward model, PPO), apart from any
one method: the LoRA adapter, the TRL trainer settings, where a run keeps its checkpoints and
which one it resumes from, the metrics callback that writes `metrics.jsonl` and stops on a NaN,
loading the policy, the KL estimate to the base, counting the weights held, saving the adapter,
and the train-evaluate-KL-save tail of a TRL run.

Heavy imports (torch, transformers, trl, peft) happen inside the functions.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loop.sections import TrainConfig

KL_PROMPTS = 64  # held-out prompts sampled for the KL estimate
KL_MAX_NEW_TOKENS = 128  # longest sampled answer for the KL estimate


class NonFiniteLoss(RuntimeError):
    """The training loss (or gradient norm) became NaN or infinite; the run is stopped, nothing saved."""


class NoTrainingPairs(ValueError):
    """The snapshot has no pairs with split == "train"."""


# ----------------------------------------------------------------------------------------------
# configuration


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


AUTO_TARGETS = "auto"  # train.target_modules: find the targets in the model (lora_targets)
HEAD_NAMES = frozenset({"lm_head", "score", "classifier", "v_head", "embed_out", "output"})  # never adapted


def lora_targets(model) -> list[str]:
    """The LoRA target modules `auto` finds in a model: the names (last path component) of every
    linear layer inside its repeated blocks (a path with a numeric index: `model.layers.3.mlp.up_proj`),
    sorted. The output head (`lm_head`, a classifier's `score`), embeddings and anything outside the
    block stack are left out.

    These are the layers vLLM serves adapters on: every linear layer of a block is a LoRA-capable
    layer in vLLM (fused ones such as Qwen2's `qkv_proj` and `gate_up_proj` take the adapters of
    their parts: q/k/v_proj, gate/up_proj), while a LoRA on the (tied) output head is refused.
    Llama and Qwen2 give down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj."""
    import torch

    linear: tuple[type, ...] = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2 style blocks

        linear += (Conv1D,)
    except ImportError:  # pragma: no cover
        pass
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for path, module in model.named_modules():
        parts = path.split(".")
        if (isinstance(module, linear) and module is not out and parts[-1] not in HEAD_NAMES
                and any(p.isdigit() for p in parts[:-1])):
            names.add(parts[-1])
    if not names:
        raise ValueError(f"found no linear layer inside the blocks of {type(model).__name__}; "
                         "set train.target_modules to the names of the modules LoRA should adapt")
    return sorted(names)


def target_modules(cfg: TrainConfig, model=None) -> list[str]:
    """train.target_modules as a list: `auto` (the default) asks the model (`lora_targets`); an
    explicit list is checked against the model when one is given (a name that matches no linear
    layer is an error that lists the ones there are)."""
    names = [m.strip() for m in cfg.target_modules.split(",") if m.strip()]
    if not names:
        raise ValueError("train.target_modules names no module")
    if names == [AUTO_TARGETS]:
        if model is None:
            raise ValueError("train.target_modules = 'auto' needs the model to find the targets in")
        return lora_targets(model)
    if AUTO_TARGETS in names:
        raise ValueError("train.target_modules: 'auto' cannot be combined with module names")
    if model is not None:
        have = {path.rsplit(".", 1)[-1] for path, _ in model.named_modules()}
        missing = [n for n in names if n not in have]
        if missing:
            raise ValueError(f"train.target_modules: {', '.join(missing)} not in {type(model).__name__}; "
                             f"its block layers are {','.join(lora_targets(model))} (or set 'auto')")
    return names


def lora_config(cfg: TrainConfig, model=None, **extra: Any):
    """The LoRA adapter a fresh run trains: rank, alpha, dropout from [train], target modules from
    `target_modules(cfg, model)`. `extra` goes to peft's LoraConfig (e.g. the reward model's
    task_type and modules_to_save)."""
    from peft import LoraConfig

    settings: dict[str, Any] = dict(bias="none", task_type="CAUSAL_LM")
    settings.update(extra)
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules(cfg, model),
        **settings,
    )


def policy_sampling(temperature: float = 1.0) -> dict[str, Any]:
    """`generate` arguments that sample from the policy itself: temperature only. A model's own
    generation_config.json may carry sampling defaults (Qwen2.5: top_k 20, top_p 0.8, a
    repetition penalty), which transformers applies to every argument left unset; each is set
    here to its neutral value, so rollouts and KL samples come from the distribution the losses
    score."""
    return dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                repetition_penalty=1.0, no_repeat_ngram_size=0)


def trainer_settings(lora_dropout: float, save_steps: int = 0) -> dict[str, Any]:
    """What every TRL trainer of the project shares (DPO, KTO, the reward model): a linear schedule
    with 10% warm-up, every step logged, a checkpoint every `save_steps` optimiser steps (the last
    two kept; 0: none, the adapter is saved once, at the end), no reporting. On a machine without
    CUDA: CPU, fp32."""
    import torch

    gpu = on_gpu()
    return dict(
        lr_scheduler_type="linear",
        warmup_steps=0.1,  # a float below 1 is a share of the steps
        logging_steps=1,
        logging_nan_inf_filter=False,  # the Trainer would otherwise hide a NaN loss behind the running mean
        # two kept: a run killed while it writes the newest still has the one before (`last_checkpoint`)
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=2,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=False,
        # fp32 on CPU (TRL defaults to bf16); bf16 on GPUs that have it
        use_cpu=not gpu,
        bf16=gpu and torch.cuda.is_bf16_supported(),
        # checkpointing saves GPU memory on big models; on CPU it only costs time
        gradient_checkpointing=gpu,
        # TRL zeroes every dropout by default, LoRA's included; lora_dropout > 0 keeps dropout on
        # (the adapter's and the model's own, if it has any)
        disable_dropout=lora_dropout == 0,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )


# ----------------------------------------------------------------------------------------------
# checkpoints

CHECKPOINT = "checkpoint-"  # + the step: the folder names of HF's Trainer, used by PPO's too


def checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """The `checkpoint-N` folders in `folder`, oldest (smallest N) first."""
    found = [p for p in Path(folder).glob(CHECKPOINT + "*") if p.name[len(CHECKPOINT):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT):]))


def last_checkpoint(folder: str | os.PathLike[str], marker: str = "trainer_state.json") -> Path | None:
    """The newest complete `checkpoint-N` in `folder`, or None. Complete: its `marker` is there (the
    Trainer writes trainer_state.json after the weights, optimizer, scheduler and RNG states; PPO
    renames a finished checkpoint into place), so one cut off by a kill is passed over."""
    done = [p for p in checkpoints(folder) if (p / marker).is_file()]
    return done[-1] if done else None


@dataclass(frozen=True)
class Stage:
    """Where one training stage (DPO, KTO, a reward model, PPO) of a run writes its trainer state,
    how often it checkpoints, and the checkpoint it resumes from."""

    output_dir: Path
    save_steps: int  # 0: no checkpoints
    resume_from: Path | None

    @property
    def resume_arg(self) -> str | None:
        """What HF's `Trainer.train(resume_from_checkpoint=...)` takes: the checkpoint, or None."""
        return str(self.resume_from) if self.resume_from else None

    @property
    def resumed_step(self) -> int:
        """The step the stage starts at: that of its checkpoint, else 0."""
        return int(self.resume_from.name[len(CHECKPOINT):]) if self.resume_from else 0


def stage(work_dir: str | os.PathLike[str], checkpoint_dir: str | os.PathLike[str] | None, name: str,
          every: int, marker: str = "trainer_state.json") -> Stage:
    """A stage named `name`: without a `checkpoint_dir` (or with `every` = 0) it keeps nothing and
    starts afresh in `work_dir`; with one, it checkpoints there every `every` steps and resumes from
    its newest complete checkpoint. A checkpoint dir belongs to one job (the retrain cycle names it
    after the job's data and settings), so what is found there is a killed run of the same job."""
    if checkpoint_dir is None or every <= 0:
        return Stage(Path(work_dir) / name, 0, None)
    out = Path(checkpoint_dir) / name
    return Stage(out, every, last_checkpoint(out, marker))


# ----------------------------------------------------------------------------------------------
# the metrics callback


def metrics_callback_class():
    from transformers import TrainerCallback

    class MetricsWriter(TrainerCallback):
        """Appends every logged number to `metrics.jsonl` as {"step", "name", "value"}, flushed at
        each logging step (rank 0 only), and stops training on a NaN/inf loss or gradient norm.
        `prefix` goes before every name (e.g. "reward/" for the reward model a PPO run fits first)."""

        def __init__(self, path: str | os.PathLike[str] | None, prefix: str = ""):
            self.path = Path(path) if path else None
            self.prefix = prefix
            self.failure: str | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            for name in ("loss", "grad_norm"):
                value = logs.get(name)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    self.failure = f"NaN/inf {name} ({value}) at step {state.global_step}; training stopped"
                    control.should_training_stop = True
                    break
            if self.path is None or not state.is_world_process_zero:
                return
            lines = [
                json.dumps({"step": int(state.global_step), "name": self.prefix + k, "value": float(v)})
                for k, v in logs.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ]
            with self.path.open("a", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in lines)
                f.flush()

    return MetricsWriter


# ----------------------------------------------------------------------------------------------
# model


def load_policy(base_model: str | os.PathLike[str], init_adapter: str | os.PathLike[str] | None):
    """(model, tokenizer): the base in fp32, wrapped in the starting adapter when continuing."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype="float32")
    if init_adapter:
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    return model, tok


def kl_to_base(model, tok, prompts: list[list[dict[str, str]]], max_new_tokens: int = KL_MAX_NEW_TOKENS,
               seed: int = 0, batch_size: int = 16) -> float:
    """Monte Carlo KL(policy || base) in nats per answer, on prompts given as chat messages.

    For each prompt, sample one answer from the policy (temperature 1: the policy itself) with
    `generate`; then, at every answer position t (its end-of-sequence token included), take the exact
    next-token KL between the policy and the base (the same model with the adapter disabled) given
    the prefix, and sum over t. By the chain rule the mean over prompts estimates
    E_policy[log p_policy(y|x) - log p_base(y|x)], the same quantity as summing the sampled tokens'
    log-ratios, but each term is >= 0 and the variance is much lower (Rao-Blackwellised).
    """
    import torch

    if not prompts:
        raise ValueError("kl_to_base needs at least one prompt")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    old_side = tok.padding_side
    tok.padding_side = "left"
    total, count = 0.0, 0
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)
            for i in range(0, len(prompts), batch_size):
                texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                         for m in prompts[i: i + batch_size]]
                enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                width = enc["input_ids"].shape[1]
                seq = model.generate(**enc, **policy_sampling(1.0),
                                     max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
                answer = seq[:, width:]
                # answer positions up to and including the first EOS
                is_eos = (answer == tok.eos_token_id).long()
                answer_mask = (is_eos.cumsum(dim=1) - is_eos) == 0
                mask = torch.cat([enc["attention_mask"], answer_mask.long()], dim=1)
                positions = (mask.cumsum(dim=1) - 1).clamp(min=0)

                def next_token_logps(m):
                    logits = m(input_ids=seq, attention_mask=mask, position_ids=positions).logits
                    return torch.log_softmax(logits[:, width - 1: -1].float(), dim=-1)

                lp_policy = next_token_logps(model)
                with model.disable_adapter():
                    lp_base = next_token_logps(model)
                per_position = (lp_policy.exp() * (lp_policy - lp_base)).sum(dim=-1)
                per_answer = (per_position * answer_mask).sum(dim=1)
                total += float(per_answer.sum())
                count += per_answer.numel()
    finally:
        tok.padding_side = old_side
        model.train(was_training)
    return total / count


def weights_bytes(*models) -> int:
    """Bytes of parameters and buffers the given models hold (a tensor shared by two counts once)."""
    seen, total = set(), 0
    for m in models:
        for t in [*m.parameters(), *m.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def weights_mb(*models) -> float:
    """`weights_bytes` in MB, to two decimals."""
    return round(weights_bytes(*models) / 2**20, 2)


def save_adapter(model, output_adapter: str | os.PathLike[str]) -> Path:
    """Save the trained adapter ("default"; not TRL's frozen "ref" copy) in PEFT format, atomically:
    written beside the target and renamed into place."""
    out = Path(output_adapter)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.saving-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, selected_adapters=["default"])
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


# ----------------------------------------------------------------------------------------------
# the tail of a TRL run


def train_and_report(trainer, callback, tok, counts: dict[str, Any], kl_prompts: list, empty_eval: tuple[str, ...],
                     output_adapter: str | os.PathLike[str] | None, seed: int,
                     stage: Stage | None = None) -> tuple[dict[str, Any], Any]:
    """The part every TRL-trainer run shares (DPO, KTO): train (from the `stage`'s checkpoint, when
    it has one), stop on a NaN (`NonFiniteLoss`), evaluate on the trainer's eval set
    (or report `empty_eval` as None without one), count the weights held, estimate KL to the base on
    `kl_prompts` and save the adapter (main process only). Returns (metrics, policy); metrics start
    with `counts`."""
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=stage.resume_arg if stage else None)
    train_seconds = time.perf_counter() - t0
    if callback.failure:
        raise NonFiniteLoss(callback.failure)
    metrics: dict[str, Any] = {**counts, "train_seconds": round(train_seconds, 2), "train_loss": out.training_loss,
                               "steps": trainer.state.global_step,
                               "resumed_from_step": stage.resumed_step if stage else 0}
    if trainer.eval_dataset is not None:
        ev = trainer.evaluate()
        metrics.update({k: v for k, v in ev.items() if k.startswith("eval_") and "runtime" not in k
                        and "per_second" not in k})
    else:
        metrics.update(dict.fromkeys(empty_eval))
    policy = trainer.accelerator.unwrap_model(trainer.model)
    metrics["weights_mb"] = weights_mb(policy)  # the reference is the same weights, adapter off
    metrics["kl_to_base"] = None
    if trainer.accelerator.is_main_process:
        if kl_prompts:
            metrics["kl_to_base"] = round(kl_to_base(policy, tok, kl_prompts, seed=seed), 4)
        if output_adapter is not None:
            save_adapter(policy, output_adapter)
    trainer.accelerator.wait_for_everyone()
    return metrics, policy
