"""PPO against a reward model: the project's own trainer (TRL 1.16 has none), small on purpose.

Models in memory: the policy (the base + a LoRA adapter), the reference (the same weights with the
adapter disabled: no second copy), a value head (one linear layer on the policy's last hidden
state), and the reward model(s) (`loop.training.reward`). The math is in `loop.training.ppo_math`.

One step (`cfg.steps` of them), after Ziegler et al. 2019 and Huang et al., "The N Implementation
Details of RLHF with PPO" (2024); the numbers refer to the details in that write-up we follow:

1. rollouts: `rollout_batch` prompts drawn from live traffic (no labels needed), one answer each,
   sampled from the policy at `temperature`, top-k/top-p off: on the serving vLLM engine, which
   gets the policy's adapter every `sync_steps` steps (`ppo.rollouts = "engine"`, through the
   gateway: `loop.training.engine_sampler`), or with HF `generate` (`"generate"`, or when no
   engine can be reached);
2. scores: the reward model scores prompt + answer; an answer cut off before its end token scores
   `missing_eos_penalty` instead (the EOS trick against length hacking; 0 turns it off); optionally whitened
   (`whiten_rewards`);
3. per-token reward: -kl_coef * (log pi - log pi_ref) at every answer token, plus the score at the
   last one; logits are divided by the sampling temperature before taking log-probs (so the
   old log-probs are those of the distribution that sampled);
4. GAE (gamma, lam) on the value head's estimates, advantages whitened over the batch;
5. `ppo_epochs` passes over shuffled minibatches: clipped policy loss + vf_coef * clipped value loss,
   Adam (eps 1e-5), gradient norm clipped at 1, learning rate annealed linearly to 0;
6. the KL coefficient follows the adaptive controller when `kl_target` > 0, else stays fixed.

Per step, `metrics.jsonl` gets reward (mean raw score), kl (per answer, nats), entropy, clipfrac,
value_loss, policy_loss, approx_kl, kl_coef, length and eos_share (and with engine rollouts at
temperature 1, engine_logprob_gap: the mean |log-prob| difference per token between the engine that
sampled and the trainer: near 0 when both hold the same policy). A NaN/inf loss stops the run
(`NonFiniteLoss`); nothing is saved.

With a checkpoint dir (one per job), every `cfg.checkpoint_steps` steps the whole state is saved
(`save_state`: the adapter's and the value head's weights, Adam's moments, the learning-rate
schedule, the KL controller's coefficient, the step, both random generators and the per-step
history), and a killed run of the same job resumes from the newest one (`load_state`).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

from loop.config import PPOConfig, TrainConfig
from loop.training import ppo_math as pm
from loop.training import engine_sampler, toolkit
from loop.training.engine_sampler import EngineSampler
from loop.training.toolkit import (
    NonFiniteLoss,
    NoTrainingPairs,
    kl_to_base,
    load_policy,
    lora_config,
    policy_sampling,
    save_adapter,
    weights_mb,
)

Messages = list[dict[str, str]]
STATE = "state.pt"  # a PPO checkpoint's one file; its folder is renamed into place once written


class NoPrompts(NoTrainingPairs):
    """No prompt to roll out on (exit status 2, like no pairs)."""


def value_head(hidden_size: int):
    """One linear layer from the last hidden state to a value; starts at 0 (no opinion)."""
    import torch

    head = torch.nn.Linear(hidden_size, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


def forward(model, head, seq, attention_mask, width: int, temperature: float):
    """(logits / temperature, values) at the positions that predict each answer token."""
    positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=seq, attention_mask=attention_mask, position_ids=positions, output_hidden_states=True)
    logits = out.logits[:, width - 1: -1].float() / temperature
    values = head(out.hidden_states[-1][:, width - 1: -1].float().detach()).squeeze(-1)
    return logits, values


def engine_answers(completions: list[dict[str, Any]], pad_id: int):
    """The engine's answers as PPO's tensors: token ids right-padded, the mask over each answer's own
    tokens (its stop token included), whether it stopped by itself (not cut off at max tokens), and
    the engine's log-prob of each token (0 where it gave none)."""
    import torch

    width = max(1, max(len(c["token_ids"]) for c in completions))
    answer = torch.full((len(completions), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), width))
    engine_logprobs = torch.zeros((len(completions), width))
    for i, c in enumerate(completions):
        n = len(c["token_ids"])
        answer[i, :n] = torch.tensor(c["token_ids"], dtype=torch.long)
        mask[i, :n] = 1.0
        engine_logprobs[i, :n] = torch.tensor([x or 0.0 for x in (c.get("logprobs") or [0.0] * n)][:n])
    has_eos = torch.tensor([c["finish_reason"] == "stop" for c in completions])
    return answer, mask, has_eos, engine_logprobs


def rollout(model, head, tok, prompts: list[Messages], cfg: PPOConfig, generator_seed: int,
            sampler: EngineSampler | None = None, step: int = 0, min_new_tokens: int = 0) -> dict[str, Any]:
    """Sample one answer per prompt (on the engine when `sampler` is given and works, else with HF
    `generate`, seeded by `generator_seed`; the engine samples unseeded); the tensors PPO needs (no
    gradients)."""
    import torch

    tok.padding_side = "left"
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    width = enc["input_ids"].shape[1]
    model.eval()
    completions = None
    if sampler is not None:
        ids = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
        completions = sampler.sample(step, ids, cfg.max_new_tokens, cfg.temperature, min_new_tokens)
    with torch.no_grad():  # not inference_mode: these tensors take part in the loss later
        if completions is not None:
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            answer, mask, has_eos, engine_logprobs = engine_answers(completions, pad)
            seq = torch.cat([enc["input_ids"], answer], dim=1)
        else:
            torch.manual_seed(generator_seed)
            seq = model.generate(**enc, **policy_sampling(cfg.temperature), max_new_tokens=cfg.max_new_tokens,
                                 min_new_tokens=min_new_tokens or None, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
            answer = seq[:, width:]
            is_eos = (answer == tok.eos_token_id).long()
            mask = ((is_eos.cumsum(dim=1) - is_eos) == 0).float()  # up to and including the first EOS
            has_eos = is_eos.sum(dim=1) > 0
        attention = torch.cat([enc["attention_mask"], mask.long()], dim=1)
        logits, values = forward(model, head, seq, attention, width, cfg.temperature)
        logprobs = pm.logprobs_from_logits(logits, answer)
        with model.disable_adapter():
            ref_logits, _ = forward(model, head, seq, attention, width, cfg.temperature)
        ref_logprobs = pm.logprobs_from_logits(ref_logits, answer)
    gap = None  # how far the engine's distribution is from the trainer's (vLLM gives log-probs before temperature)
    if completions is not None and cfg.temperature == 1.0:
        gap = float(((logprobs - engine_logprobs).abs() * mask).sum() / mask.sum().clamp(min=1))
    answers = [tok.decode(a[m.bool()], skip_special_tokens=True).strip() for a, m in zip(answer, mask)]
    return {"seq": seq, "attention": attention, "width": width, "answer": answer, "mask": mask,
            "has_eos": has_eos, "logprobs": logprobs, "ref_logprobs": ref_logprobs,
            "values": values, "answers": answers, "engine_logprob_gap": gap}


def run(prompts: list[Messages], reward, base_model: str | os.PathLike[str],
        output_adapter: str | os.PathLike[str] | None, cfg: PPOConfig, train_cfg: TrainConfig,
        init_adapter: str | os.PathLike[str] | None = None, metrics_path: str | os.PathLike[str] | None = None,
        heldout_prompts: list[Messages] | None = None, log=print,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        sampler: Callable[[int], EngineSampler | None] | None = None) -> tuple[dict[str, Any], Any]:
    """Train the policy with PPO on `prompts` against `reward` (anything with `.score(prompts,
    answers)`, e.g. `loop.training.reward.CombinedReward`); save the adapter; returns (metrics, policy).
    With a `checkpoint_dir`, checkpoint every `cfg.checkpoint_steps` steps and resume from the newest
    checkpoint a killed run of the same job left there. `sampler(first_step)`: the engine that samples
    the rollouts (`loop.training.engine_sampler`), or None for HF `generate`."""
    import torch
    from peft import get_peft_model

    if not prompts:
        raise NoPrompts("no prompts from live traffic to roll out on")
    world, rank = processes()
    if cfg.rollout_batch % world or cfg.minibatch % world:
        raise ValueError(f"ppo.rollout_batch ({cfg.rollout_batch}) and ppo.minibatch ({cfg.minibatch}) must be "
                         f"multiples of the {world} processes: each process rolls out and optimises its share")
    torch.manual_seed(train_cfg.seed)
    rng = random.Random(train_cfg.seed)
    model, tok = load_policy(base_model, init_adapter)
    if not init_adapter:
        model = get_peft_model(model, lora_config(train_cfg, model))
    head = value_head(model.config.hidden_size)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, eps=1e-5)
    updates = cfg.steps * cfg.ppo_epochs * math.ceil(cfg.rollout_batch / cfg.minibatch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: max(0.0, 1.0 - k / updates))
    kl_ctl = pm.kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    history: list[dict[str, float]] = []
    stage = toolkit.stage(".", checkpoint_dir, "ppo", cfg.checkpoint_steps, marker=STATE)  # none: writes nothing
    if stage.resume_from:
        history = load_state(stage.resume_from, model, head, optimizer, schedule, kl_ctl, rng)
        log(f"ppo: resumed from {stage.resume_from} (step {stage.resumed_step})")
    engine = sampler(stage.resumed_step + 1) if sampler else None
    metrics_file = Path(metrics_path).open("a", encoding="utf-8") if metrics_path and rank == 0 else None
    t0 = time.perf_counter()
    try:
        for step in range(stage.resumed_step + 1, cfg.steps + 1):
            # every process draws the same batch and takes its share: together, the one process's batch
            batch = [rng.choice(prompts) for _ in range(cfg.rollout_batch)][rank::world]
            if engine is not None:
                if rank == 0:
                    engine.sync(model, step)
                barrier(world)
            r = rollout(model, head, tok, batch, cfg, generator_seed=train_cfg.seed * 100_003 + step + 7_919 * rank,
                        sampler=engine, step=step)
            raw = reward.score(batch, r["answers"]).float()
            scores = raw
            if cfg.missing_eos_penalty:
                scores = pm.apply_eos_penalty(raw, r["has_eos"], cfg.missing_eos_penalty)
            if cfg.whiten_rewards:
                scores = pm.masked_whiten(scores, torch.ones_like(scores), shift_mean=False)
            mask = r["mask"]
            rewards, kl = pm.per_token_rewards(scores, r["logprobs"], r["ref_logprobs"], mask, kl_ctl.value)
            advantages, returns = pm.gae(rewards, r["values"], mask, cfg.gamma, cfg.lam)
            advantages = pm.masked_whiten(advantages, mask)
            stats = optimise(model, head, optimizer, schedule, params, r, advantages, returns, cfg, world)
            row = {"reward": float(raw.mean()), "score": float(scores.mean()), "kl": float(kl.sum(dim=1).mean()),
                   "length": float(mask.sum(dim=1).mean()), "eos_share": float(r["has_eos"].float().mean()), **stats}
            if engine is not None:  # on every process (the same keys to average); NaN, not logged, after a fallback
                gap = r["engine_logprob_gap"]
                row["engine_logprob_gap"] = gap if gap is not None else math.nan
            row = mean_over_processes(row, world)
            kl_ctl.update(row["kl"], cfg.rollout_batch)  # the same on every process
            row = {**row, "kl_coef": kl_ctl.value}
            history.append(row)
            bad = [k for k in ("policy_loss", "value_loss") if not math.isfinite(row[k])]
            if bad:
                raise NonFiniteLoss(f"NaN/inf {bad[0]} at PPO step {step}; training stopped")
            if metrics_file:
                metrics_file.writelines(json.dumps({"step": step, "name": k, "value": v}) + "\n"
                                        for k, v in row.items() if math.isfinite(v))
                metrics_file.flush()
            if rank == 0:
                log(f"ppo step {step}/{cfg.steps}: reward {row['reward']:.3f} kl {row['kl']:.3f} "
                    f"entropy {row['entropy']:.3f} clipfrac {row['clipfrac']:.3f}")
            if rank == 0 and stage.save_steps and (step % stage.save_steps == 0 or step == cfg.steps):
                save_state(stage.output_dir, step, model, head, optimizer, schedule, kl_ctl, rng, history)
    finally:
        if metrics_file:
            metrics_file.close()
        if engine is not None and rank == 0:
            engine.close()
    train_seconds = time.perf_counter() - t0
    first, last = history[: max(1, len(history) // 4)], history[-max(1, len(history) // 4):]
    metrics: dict[str, Any] = {
        "train_prompts": len(prompts), "steps": cfg.steps, "rollouts": cfg.steps * cfg.rollout_batch,
        "train_seconds": round(train_seconds, 2), "resumed_from_step": stage.resumed_step,
        "reward_first": sum(h["reward"] for h in first) / len(first),
        "reward_last": sum(h["reward"] for h in last) / len(last),
        "kl_last": sum(h["kl"] for h in last) / len(last),
        "kl_to_base": None,
        # policy (the reference is the same weights, adapter off) + value head + reward model(s)
        "weights_mb": weights_mb(model, head, *[m.model for m, _ in getattr(reward, "parts", [])]),
        **({"rollouts_on": "hf-generate"} if engine is None else engine_sampler.summary(gather(engine.state(), world), engine.WHERE)),
    }
    if heldout_prompts and rank == 0:
        metrics["kl_to_base"] = round(kl_to_base(model, tok, heldout_prompts[:64], seed=train_cfg.seed), 4)
    if output_adapter is not None and rank == 0:
        save_adapter(model, output_adapter)
    barrier(world)
    return metrics, model


def processes() -> tuple[int, int]:
    """(how many processes train, this one's rank): (1, 0) without a launcher. Under `accelerate launch`
    with several processes the group is set up here (gloo on CPU) if a trainer has not done it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1, 0
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.num_processes, state.process_index


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def gather(obj: Any, world: int) -> list[Any]:
    """Every process's `obj`, in rank order, on every process."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def mean_over_processes(row: dict[str, float], world: int) -> dict[str, float]:
    """Each number averaged over the processes (every process gets the same row)."""
    if world == 1:
        return row
    import torch
    import torch.distributed as dist

    values = torch.tensor([row[k] for k in row], dtype=torch.float64)
    dist.all_reduce(values)
    return {k: float(v) / world for k, v in zip(row, values)}


def average_gradients(params, world: int) -> None:
    """Data parallelism by hand: every process's gradients replaced by their mean over the processes,
    so the same optimiser step keeps the weights identical everywhere (they start identical: the same
    seed draws the same LoRA init, and the value head starts at 0)."""
    if world == 1:
        return
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def _trainable(model) -> dict[str, Any]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_state(folder: Path, step: int, model, head, optimizer, schedule, kl_ctl, rng: random.Random,
               history: list[dict[str, float]]) -> Path:
    """Checkpoint `folder/checkpoint-STEP/state.pt`: written beside it and renamed into place (a kill
    mid-write leaves no checkpoint, not a broken one); only the newest two are kept."""
    import shutil

    import torch

    out = folder / f"{toolkit.CHECKPOINT}{step}"
    tmp = folder / f".{out.name}.saving-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"step": step, "trainable": {k: p.detach().clone() for k, p in _trainable(model).items()},
                "head": head.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "kl_coef": kl_ctl.value, "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                "history": history}, tmp / STATE)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    for old in toolkit.checkpoints(folder)[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def load_state(checkpoint: Path, model, head, optimizer, schedule, kl_ctl, rng: random.Random) -> list[dict[str, float]]:
    """Put a `save_state` checkpoint back into the objects a fresh `run` made; returns the history."""
    import torch

    # our own file, in the data dir (0700): it holds a Python RNG state and the history, not only tensors
    state = torch.load(checkpoint / STATE, weights_only=False)
    trainable = _trainable(model)
    if set(state["trainable"]) != set(trainable):
        raise ValueError(f"{checkpoint}: its adapter does not match the model's ({len(state['trainable'])} "
                         f"tensors saved, {len(trainable)} trainable)")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state["trainable"][name])
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    kl_ctl.value = state["kl_coef"]
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    return state["history"]


def optimise(model, head, optimizer, schedule, params, r: dict[str, Any], advantages, returns,
             cfg: PPOConfig, world: int = 1) -> dict[str, float]:
    """`ppo_epochs` passes of clipped policy + value updates over shuffled minibatches; with several
    processes each holds 1/world of the rollouts and of every minibatch, and the gradients are
    averaged over them before each step."""
    import torch

    model.train()
    n = r["seq"].shape[0]
    sums: dict[str, float] = {}
    count = 0
    for _ in range(cfg.ppo_epochs):
        for idx in torch.randperm(n).split(cfg.minibatch // world):
            logits, values = forward(model, head, r["seq"][idx], r["attention"][idx], r["width"], cfg.temperature)
            mask = r["mask"][idx]
            logprobs = pm.logprobs_from_logits(logits, r["answer"][idx])
            pg_loss, pg_stats = pm.policy_loss(logprobs, r["logprobs"][idx], advantages[idx], mask, cfg.clip_range)
            vf_loss, vf_stats = pm.value_loss(values, r["values"][idx], returns[idx], mask, cfg.clip_range_value)
            loss = pg_loss + cfg.vf_coef * vf_loss
            optimizer.zero_grad()
            loss.backward()
            average_gradients(params, world)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                entropy = pm.masked_mean(pm.entropy_from_logits(logits), mask)
            for k, v in {"policy_loss": pg_loss, "value_loss": vf_loss, "entropy": entropy,
                         **pg_stats, **vf_stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            count += 1
    return {k: v / count for k, v in sums.items()}
