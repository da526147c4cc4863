"""The sections of `alignloop.toml`: one dataclass per [section], every field with a default and
a one-line help (`metadata["help"]`), each checked in `__post_init__` (a ValueError names the field).

Plain data only: nothing here imports the rest of alignloop, so any room (serving, training, the
demo) can read its own section without dragging another room along. `loop.config` loads and writes
the file.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

METHODS = ("dpo", "ppo", "kto")  # the training methods, in one place: config, CLI, API and trainer child
ALLOWED_HEAD_DIMS = (32, 64)  # vLLM's CPU attention rejects 16


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    """Where alignloop keeps its state."""

    dir: str = _f("alignloop-data", "data directory (DuckDB file, models, adapters, snapshots, runs), relative to this file")


@dataclass
class ModelConfig:
    """The base model and the name clients use for it."""

    base: str = _f("", "Hugging Face model directory of the base model; empty: the demo model, built on first use")
    served_name: str = _f("alignloop", "model name clients send; it routes to the promoted version")

    def __post_init__(self) -> None:
        if not self.served_name.strip():
            raise ValueError("must not be empty")


@dataclass
class GatewayConfig:
    """The OpenAI-compatible gateway in front of the engine (the only process that writes the store)."""

    host: str = _f("127.0.0.1", "address the gateway listens on")
    port: int = _f(8000, "port the gateway listens on")
    require_api_key: bool = _f(False, "answer /v1 requests only with a user's token as API key; else unknown keys are anonymous")
    pair_share: float = _f(0.25, "share of chat exchanges that get a second answer in the background, making a pair to label (with labeling.order = 'active': divided by 1 + the pairs its prompt already has)")
    log_flush_ms: int = _f(1000, "live traffic is written to the store in batches this often (at once when an answer still "
                                 "queued is asked for, as feedback on it); a crash loses at most this window")
    log_max_queue: int = _f(10000, "records waiting to be written at most; beyond it new records are dropped and counted")
    request_timeout_s: float = _f(120.0, "longest wait for the engine on one request before answering 504")
    retry_after_s: int = _f(5, "Retry-After seconds sent with a 503 while the engine is down or restarting")
    anonymous_feedback: bool = _f(False, "take thumbs and scores from /v1 callers without a known API key (every thumb is a KTO training example)")
    rate_limit_per_s: float = _f(20.0, "/v1 requests per second one caller (API key, or address when anonymous) may make on average; 0: no limit")
    rate_burst: int = _f(40, "/v1 requests one caller may make at once above the average rate before a 429")
    max_body_kb: int = _f(1024, "largest request body, in KiB (a larger one gets 413)")
    max_json_depth: int = _f(32, "deepest nesting of a JSON request body (a deeper one gets 400)")
    public_docs: bool = _f(False, "serve /docs and /openapi.json to anyone; otherwise the schema is at /api/openapi.json for admins")

    def __post_init__(self) -> None:
        _check_port(self.port)
        if not 0.0 <= self.pair_share <= 1.0:
            raise ValueError("pair_share must be in [0, 1]")
        if not (math.isfinite(self.rate_limit_per_s) and self.rate_limit_per_s >= 0):
            raise ValueError("rate_limit_per_s must be a number >= 0")
        for name in ("log_flush_ms", "log_max_queue", "retry_after_s", "rate_burst", "max_body_kb", "max_json_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be positive")


@dataclass
class EngineConfig:
    """The vLLM engine, started as a child process and bound to loopback."""

    port: int = _f(8100, "port of the vLLM OpenAI server (loopback only)")
    max_model_len: int = _f(512, "longest prompt + completion, in tokens")
    max_lora_rank: int = _f(8, "largest LoRA rank an adapter may have")
    max_loras: int = _f(4, "adapters held in the engine at once (serving, previous, candidate, ...)")
    kv_cache_gb: int = _f(1, "CPU build: GiB of memory for the KV cache (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_share: float = _f(0.9, "CUDA build: share of each of its GPUs' memory the engine takes (vLLM "
                                      "--gpu-memory-utilization); on a GPU the trainer shares, the trainer gets the rest")
    startup_timeout_s: float = _f(300.0, "seconds to wait for the engine to become healthy")
    replicas: int = _f(1, "local vLLM servers the gateway starts and supervises, on ports port, port+1, ...; "
                          "requests go to the least loaded healthy one")
    devices: str = _f("", "per local replica, its GPUs (CUDA_VISIBLE_DEVICES) or, on the CPU build, its cores "
                         "(VLLM_CPU_OMP_THREADS_BIND), separated by ';' (e.g. \"0;1\", or \"0,1;2,3\" with "
                         "tensor_parallel_size = 2); empty: all GPUs each, and CPU replicas share out the cores")
    tensor_parallel_size: int = _f(1, "GPUs each local replica spreads the model over (vLLM --tensor-parallel-size)")
    external: str = _f("", "vLLM servers run by someone else, each one more replica, separated by spaces "
                          "(\"http://10.0.0.5:8000 http://10.0.0.6:8000\"); each must serve the base model as 'base' "
                          "with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
    external_key_env: str = _f("ALIGNLOOP_EXTERNAL_ENGINE_KEY", "environment variable holding the API key of the "
                                                                 "external servers (unset: none)")

    def __post_init__(self) -> None:
        _check_port(self.port)
        for name in ("max_model_len", "max_lora_rank", "max_loras", "kv_cache_gb", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.replicas < 0:
            raise ValueError("replicas must be at least 0")
        if not 0.0 < self.gpu_memory_share <= 1.0:
            raise ValueError("gpu_memory_share must be in (0, 1]")
        _check_port(self.port + max(self.replicas - 1, 0))
        if self.replicas + len(self.external_urls()) < 1:
            raise ValueError("no engine: set replicas to at least 1 or name an external server")
        if self.devices and len(self.device_groups()) != self.replicas:
            raise ValueError(f"devices names {len(self.device_groups())} groups for {self.replicas} replicas")
        for url in self.external_urls():
            if not url.startswith(("http://", "https://")) or len(url.split("//", 1)[1].strip("/")) == 0:
                raise ValueError(f"external: {url!r} is not an http(s) URL")

    def external_urls(self) -> list[str]:
        return [u.rstrip("/") for u in self.external.split()]

    def device_groups(self) -> list[str]:
        return [g.strip() for g in self.devices.split(";")] if self.devices else []


@dataclass
class StoreConfig:
    """The DuckDB store."""

    file: str = _f("alignloop.duckdb", "DuckDB file name, inside the data directory")
    heldout_share: float = _f(0.1, "share of pairs held out of training for evaluation (stable hash of the pair id)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.heldout_share < 1.0:
            raise ValueError("heldout_share must be in [0, 1)")


@dataclass
class LabelingConfig:
    """Labelling: how many people label each pair, and the app."""

    overlap: int = _f(2, "independent human labels each pair gets (k)")
    lease_s: float = _f(600.0, "seconds a pair handed to a labeller stays theirs before it returns to the queue")
    app_port: int = _f(8501, "port of the Streamlit labelling app")
    aggregate: str = _f("reliability", "how a pair's votes become its training label: 'reliability' (each vote weighted by its labeller's accuracy estimated from agreement) or 'majority'")
    min_accuracy: float = _f(0.7, "a labeller whose estimated accuracy (from agreement) is clearly below this, the whole interval under it, is flagged to admins")
    max_batch: int = _f(64, "labels sent at the same time are written in one transaction, at most this many; 1 writes each alone")
    gold_share: float = _f(0.1, "share of hand-outs that are gold pairs (known-answer pairs an admin adds with `alignloop gold FILE`), while any are left for that labeller; labellers are never told which")
    order: str = _f("arrival", "which waiting pair is handed out first (live pairs before imported ones in every order): 'arrival' (newest first), 'random', or 'active' (what a label would teach: the gate's reward model unsure, votes split, a prompt not labelled yet; ranked after each retrain and by `alignloop rank`)")
    rank_limit: int = _f(5000, "active order: how many waiting pairs (from the head of the queue) are scored at each ranking")

    def __post_init__(self) -> None:
        _check_port(self.app_port)
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if self.aggregate not in ("majority", "reliability"):
            raise ValueError(f"aggregate must be 'majority' or 'reliability', got {self.aggregate!r}")
        if not 0 <= self.min_accuracy <= 1:
            raise ValueError("min_accuracy must be between 0 and 1")
        if not 0 <= self.gold_share <= 1:
            raise ValueError("gold_share must be between 0 and 1")
        if self.order not in ("arrival", "random", "active"):
            raise ValueError(f"order must be 'arrival', 'random' or 'active', got {self.order!r}")
        if self.rank_limit < 1:
            raise ValueError("rank_limit must be at least 1")
        if self.overlap < 1:
            raise ValueError("overlap must be at least 1")
        if self.lease_s <= 0:
            raise ValueError("lease_s must be positive")


@dataclass
class TrainConfig:
    """Retraining: the method and its hyperparameters (DPO with LoRA by default)."""

    method: str = _f("dpo", "dpo, ppo or kto")
    learning_rate: float = _f(3e-3, "peak learning rate of the LoRA weights")
    epochs: float = _f(4.0, "passes over the training pairs")
    batch_size: int = _f(16, "pairs per optimiser step (per process)")
    beta: float = _f(1.0, "DPO beta: how far the policy may move from the reference (higher: less far)")
    loss_type: str = _f("sigmoid,sft", "DPO loss(es), summed: sigmoid (the paper's), ipo, robust, hinge, sft (NLL of chosen: RPO)")
    lora_r: int = _f(8, "LoRA rank (at most engine.max_lora_rank)")
    lora_alpha: int = _f(16, "LoRA alpha")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    target_modules: str = _f("auto", "modules LoRA adapts, comma-separated; auto: every linear layer in the model's blocks (not the head)")
    max_length: int = _f(256, "longest prompt + reply in tokens")
    from_serving: bool = _f(False, "continue from the serving adapter instead of starting from the base")
    seed: int = _f(0, "seed of the run")
    num_processes: int = _f(1, "processes `accelerate launch` starts (GPUs, or CPU processes)")
    accelerate_config: str = _f("", "accelerate config file (e.g. ops/accelerate/multi_gpu.yaml); empty: none")
    devices: str = _f("", "GPUs the trainer uses (CUDA_VISIBLE_DEVICES, e.g. \"1\" beside an engine on \"0\"); "
                         "empty: the first num_processes GPUs")
    timeout_s: float = _f(3600.0, "a training run taking longer is killed and marked failed")
    checkpoint_steps: int = _f(25, "optimiser steps between the checkpoints a killed run resumes from on the next cycle (DPO, KTO, reward models); 0: none")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be dpo, ppo or kto, got {self.method!r}")
        if self.learning_rate <= 0 or self.epochs <= 0 or self.beta <= 0:
            raise ValueError("learning_rate, epochs and beta must be positive")
        if self.batch_size < 1 or self.lora_r < 1 or self.num_processes < 1:
            raise ValueError("batch_size, lora_r and num_processes must be at least 1")
        if self.checkpoint_steps < 0:
            raise ValueError("checkpoint_steps must be 0 (none) or more")


@dataclass
class RewardConfig:
    """The reward model PPO trains against, refreshed on every labelled pair (TRL `RewardTrainer`)."""

    learning_rate: float = _f(3e-3, "peak learning rate (LoRA weights and the score head)")
    epochs: float = _f(6.0, "passes over the labelled pairs")
    batch_size: int = _f(16, "pairs per optimiser step")
    center_rewards_coefficient: float = _f(0.01, "pulls the mean reward towards 0 (0: off)")
    lora: bool = _f(True, "train LoRA + the score head (false: every weight)")
    weight: float = _f(1.0, "weight of the refreshed reward model in the combined reward")
    extra: str = _f("", "more reward models, 'DIR=weight,DIR=weight' (multi-objective, e.g. helpful + harmless)")

    def __post_init__(self) -> None:
        if self.learning_rate <= 0 or self.epochs <= 0 or self.batch_size < 1:
            raise ValueError("learning_rate and epochs must be positive, batch_size at least 1")
        extra_rewards(self.extra)


def extra_rewards(spec: str) -> list[tuple[str, float]]:
    """'DIR=weight,DIR=weight' as [(dir, weight)]."""
    out = []
    for item in filter(None, (i.strip() for i in spec.split(","))):
        path, sep, weight = item.rpartition("=")
        try:
            out.append((path, float(weight)))
        except ValueError:
            sep = ""
        if not sep or not path:
            raise ValueError(f"extra: {item!r} is not DIR=weight")
    return out


@dataclass
class PPOConfig:
    """PPO against the reward model: the project's own trainer (loop/training/ppo.py)."""

    steps: int = _f(16, "rollout batches; each is generated, scored, then optimised on")
    rollout_batch: int = _f(32, "prompts per rollout batch (from live traffic; labels not needed)")
    ppo_epochs: int = _f(4, "optimisation passes over each rollout batch")
    minibatch: int = _f(8, "rollouts per gradient step")
    learning_rate: float = _f(1e-3, "learning rate of the LoRA weights and the value head (annealed to 0)")
    max_new_tokens: int = _f(48, "longest sampled answer in tokens")
    temperature: float = _f(1.0, "sampling temperature of the rollouts")
    kl_coef: float = _f(0.2, "initial coefficient of the per-token KL penalty to the reference")
    kl_target: float = _f(0.0, "adaptive KL: target KL per answer in nats (0: fixed kl_coef)")
    kl_horizon: float = _f(1000.0, "adaptive KL: how fast kl_coef follows the target (in rollouts)")
    clip_range: float = _f(0.2, "policy ratio clipping (epsilon)")
    clip_range_value: float = _f(0.2, "value clipping around the old values")
    vf_coef: float = _f(0.1, "weight of the value loss")
    gamma: float = _f(1.0, "discount")
    lam: float = _f(0.95, "GAE lambda")
    missing_eos_penalty: float = _f(-1.0, "score of an answer cut off before its end token (against length hacking; 0: off)")
    whiten_rewards: bool = _f(False, "whiten the scores of each rollout batch before adding the KL penalty")
    checkpoint_steps: int = _f(4, "rollout steps between the checkpoints a killed run resumes from on the next cycle; 0: none")
    rollouts: str = _f("engine", "who samples the rollouts: engine (the serving vLLM engine, through the gateway, "
                                 "at the lowest priority; HF generate when it cannot be reached), dedicated (a vLLM "
                                 "engine the run starts for itself, without LoRA layers: 3-5x the tokens/s on CPU, "
                                 "for ~30 s of start-up and a second engine's memory) or generate (HF generate)")
    sync_steps: int = _f(1, "engine rollouts: rollout steps between loading the policy's adapter on the engine "
                            "(1: every step, fully on-policy; K: samples from a policy up to K-1 steps old)")
    rollout_engine_share: float = _f(0.3, "dedicated rollouts on a GPU: share of the trainer's first GPU the run's own "
                                          "engine takes (vLLM --gpu-memory-utilization); the trainer gets what the "
                                          "engines leave, checked before the run starts")

    def __post_init__(self) -> None:
        if min(self.steps, self.rollout_batch, self.ppo_epochs, self.minibatch, self.max_new_tokens, self.sync_steps) < 1:
            raise ValueError("steps, rollout_batch, ppo_epochs, minibatch, max_new_tokens and sync_steps must be at least 1")
        if not 0 < self.rollout_engine_share < 1:
            raise ValueError(f"rollout_engine_share must be between 0 and 1, not {self.rollout_engine_share}")
        if self.rollouts not in ("engine", "dedicated", "generate"):
            raise ValueError(f"rollouts must be engine, dedicated or generate, not {self.rollouts!r}")
        if self.minibatch > self.rollout_batch:
            raise ValueError("minibatch must not be larger than rollout_batch")
        if self.checkpoint_steps < 0:
            raise ValueError("checkpoint_steps must be 0 (none) or more")
        if self.learning_rate <= 0 or self.temperature <= 0 or self.kl_coef < 0:
            raise ValueError("learning_rate and temperature must be positive, kl_coef >= 0")
        if not (0 < self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError("gamma must be in (0, 1], lam in [0, 1]")


@dataclass
class KTOConfig:
    """KTO on thumbs-up/down feedback from live users (TRL `KTOTrainer`); LoRA as [train]."""

    learning_rate: float = _f(1e-3, "peak learning rate of the LoRA weights")
    epochs: float = _f(4.0, "passes over the feedback")
    batch_size: int = _f(16, "answers per optimiser step")
    beta: float = _f(1.0, "KTO beta: how far the policy may move from the reference")
    desirable_weight: float = _f(1.0, "loss weight of thumbs-up answers")
    undesirable_weight: float = _f(1.0, "loss weight of thumbs-down answers")
    heldout_share: float = _f(0.1, "share of the feedback held out for evaluation")

    def __post_init__(self) -> None:
        if self.learning_rate <= 0 or self.epochs <= 0 or self.beta <= 0:
            raise ValueError("learning_rate, epochs and beta must be positive")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (KTO estimates its KL reference point within a batch)")
        if not 0.0 <= self.heldout_share < 1.0:
            raise ValueError("heldout_share must be in [0, 1)")


@dataclass
class GateConfig:
    """Evaluation and the promotion gate (never judged by the demo's rule, which stands for the people).

    The demo's rule labels in `simulate` and grades benchmarks; what it labels must not also grade
    the candidate."""

    judge: str = _f("auto", "who judges the candidate against what serves: 'auto' (the LLM judge when judge_url is set, "
                     "else the reward model refreshed on every label this cycle), 'reward' or 'llm'")
    judge_url: str = _f("", "OpenAI-compatible base URL of an LLM judge (RLAIF), e.g. http://127.0.0.1:9000/v1")
    judge_model: str = _f("", "model name at judge_url")
    judge_timeout_s: float = _f(60.0, "one LLM judge request may take this long; then the run is held, nothing promoted")
    reward_floor: float = _f(0.65, "the reward model judges only while its accuracy on held-out pairs is at least this")
    reward_min_heldout: int = _f(16, "the reward model's accuracy must be measured on at least this many held-out pairs; "
                              "else no automatic promotion")
    alpha: float = _f(0.05, "one-sided error rate: a candidate no better than what serves is promoted at most this often")
    margin: float = _f(0.0, "promote only if the lower confidence bound of the win rate is above 0.5 + margin")
    kl_budget: float = _f(20.0, "reject a candidate whose KL to the base (nats per answer) is above this")
    eval_prompts: int = _f(64, "held-out prompts judged at most (prompts are the unit of the gate's test)")
    shadow_prompts: int = _f(32, "live prompts logged since the last cycle (newest first, in no training pair) the "
                             "candidate answers in the background before it may serve, judged too (0: none)")
    min_prompts: int = _f(24, "fewer judged prompts than this (held-out, shadow and people's votes together): too "
                          "little to decide, the candidate is held")
    people_min_votes: int = _f(30, "people's votes between the candidate and what serves (arena, canary pairs) count "
                               "in the gate, each as one more judged prompt, once there are at least this many")
    eval_samples: int = _f(2, "answers per prompt and version (different seeds); a prompt's score is their mean")
    max_tokens: int = _f(64, "answer length when judging")
    temperature: float = _f(1.0, "sampling temperature when judging (1.0: what clients get by default)")

    def __post_init__(self) -> None:
        if self.judge == "demo":
            raise ValueError("judge = 'demo' is refused: the demo's rule is the simulated people (it labels in "
                             "`simulate` and grades benchmarks), so it may not also judge the gate; use 'auto', "
                             "'reward' or 'llm'")
        if self.judge.startswith(("http://", "https://")):
            raise ValueError(f"judge is 'auto', 'reward' or 'llm'; put the URL in judge_url = {self.judge!r} "
                             "and set judge = 'llm'")
        if self.judge not in ("auto", "reward", "llm"):
            raise ValueError(f"judge must be 'auto', 'reward' or 'llm', not {self.judge!r}")
        if self.judge == "llm" and not self.judge_url:
            raise ValueError("judge = 'llm' needs judge_url and judge_model")
        if self.uses_llm() and not self.judge_model:
            raise ValueError("an LLM judge (judge_url) needs judge_model, the model name to ask there")
        if not 0.0 < self.alpha < 0.5:
            raise ValueError("alpha must be in (0, 0.5)")
        if not 0.0 <= self.margin < 0.5:
            raise ValueError("margin must be in [0, 0.5)")
        if not 0.5 <= self.reward_floor <= 1.0:
            raise ValueError("reward_floor must be in [0.5, 1]")
        if self.shadow_prompts < 0:
            raise ValueError("shadow_prompts must be >= 0")
        if min(self.eval_prompts, self.eval_samples, self.max_tokens, self.reward_min_heldout,
               self.people_min_votes) < 1:
            raise ValueError("eval_prompts, eval_samples, max_tokens, reward_min_heldout and "
                             "people_min_votes must be at least 1")
        if self.min_prompts < 2:
            raise ValueError("min_prompts must be at least 2 (a confidence bound needs a spread)")
        if self.judge_timeout_s <= 0:
            raise ValueError("judge_timeout_s must be positive")

    def uses_llm(self) -> bool:
        """Whether the LLM judge decides (else the refreshed reward model)."""
        return self.judge == "llm" or (self.judge == "auto" and bool(self.judge_url))


@dataclass
class MonitorConfig:
    """The watch after every promotion: a significant live regression rolls the new version back.

    It compares the new version with the one it replaced on errors, answers cut off, empty answers
    and thumbs down."""

    enabled: bool = _f(True, "watch each promoted version and roll it back by itself on a significant regression")
    check_every_s: float = _f(2.0, "how often the monitor reads the new live outcomes from the store")
    alpha: float = _f(0.01, "a version as good as its predecessor is rolled back at most this often (all signals together)")
    beta: float = _f(0.1, "a regression of min_regression goes unnoticed at most this often, per signal")
    min_regression: float = _f(0.1, "the smallest rise in a bad-outcome rate (absolute, e.g. 0.1 = +10 points) "
                               "the test is built to catch")
    baseline: int = _f(500, "the predecessor's newest live requests (and as many thumbs) its rates come from")
    min_baseline: int = _f(30, "a signal with fewer baseline observations than this is not watched (no data, no verdict)")
    rate_floor: float = _f(0.01, "baseline rates below this count as this (a few errors are not a regression of 0)")
    watch_requests: int = _f(2000, "stop watching after this many of the new version's requests with no verdict")

    def __post_init__(self) -> None:
        if not (0 < self.alpha < 0.5 and 0 < self.beta < 0.5):
            raise ValueError("alpha and beta must be in (0, 0.5)")
        if not 0 < self.min_regression < 1 or not 0 < self.rate_floor < 1:
            raise ValueError("min_regression and rate_floor must be in (0, 1)")
        if self.check_every_s <= 0 or min(self.baseline, self.min_baseline, self.watch_requests) < 1:
            raise ValueError("check_every_s must be positive; baseline, min_baseline and watch_requests at least 1")


@dataclass
class ScheduleConfig:
    """When the scheduler retrains."""

    enabled: bool = _f(True, "run the scheduler inside `alignloop up`")
    cron: str = _f("0 3 * * *", "cron rule (minute hour day month weekday), local time; empty: no nightly run")
    min_new_labels: int = _f(0, "also retrain once this many new labels arrived since the last run (0: off)")
    check_every_s: float = _f(60.0, "how often the label trigger looks")
    alternate: str = _f("", "methods the scheduler takes in turn, e.g. 'dpo,ppo'; empty: always train.method")
    rank_every_s: float = _f(600.0, "with labeling.order = 'active': re-rank the labelling queue this often, so new pairs are scored too (0: only after each retrain)")

    def __post_init__(self) -> None:
        if self.min_new_labels < 0:
            raise ValueError("min_new_labels must be >= 0")
        if self.rank_every_s < 0:
            raise ValueError("rank_every_s must be >= 0")
        unknown = [m for m in self.methods() if m not in METHODS]
        if unknown:
            raise ValueError(f"alternate: unknown method(s) {', '.join(unknown)}; expected {', '.join(METHODS)}")

    def methods(self) -> list[str]:
        return [m.strip() for m in self.alternate.split(",") if m.strip()]


def _check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be from 1 to 65535, got {port}")



@dataclass
class DemoModelConfig:
    """How the demo model is built. The defaults build in about 2 minutes on 2 CPU cores (about 1M parameters)."""

    seed: int = _f(0, "Seed for the data order, the weight init and the tokenizer corpus.")
    vocab_size: int = _f(1024, "Largest tokenizer vocabulary (byte-level BPE; it may learn fewer).")
    hidden_size: int = _f(128, "Model width.")
    num_layers: int = _f(4, "Number of transformer blocks.")
    num_heads: int = _f(4, "Attention heads; hidden_size / num_heads must be 32 or 64 (vLLM CPU).")
    intermediate_size: int = _f(384, "Width of the MLP inside each block.")
    max_position_embeddings: int = _f(512, "Longest sequence the model accepts (vLLM's max_model_len).")
    max_seq_len: int = _f(128, "Longest training sequence in tokens (longer ones are cut).")
    steps: int = _f(800, "Training steps.")
    batch_size: int = _f(32, "Dialogues per training step.")
    learning_rate: float = _f(3e-3, "Peak AdamW learning rate.")
    min_lr_ratio: float = _f(0.1, "Final learning rate as a share of the peak (cosine decay).")
    warmup_steps: int = _f(30, "Linear warm-up steps.")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    grad_clip: float = _f(1.0, "Gradient norm clip (0 = off).")
    system_prompt_share: float = _f(0.2, "Share of training dialogues that carry the system prompt.")
    num_threads: int = _f(0, "torch CPU threads while building (0 = min(cpu count, 8)); weights depend on it.")

    def __post_init__(self) -> None:
        ints = (
            "seed vocab_size hidden_size num_layers num_heads intermediate_size max_position_embeddings "
            "max_seq_len steps batch_size warmup_steps num_threads"
        ).split()
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"demo model: {name} must be an integer, not {v!r}")
        for name in ("learning_rate", "min_lr_ratio", "weight_decay", "grad_clip", "system_prompt_share"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"demo model: {name} must be a number, not {v!r}")
            setattr(self, name, float(v))
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo model: {name} must be >= 1, not {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"demo model: seed must be >= 0, not {self.seed}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"demo model: hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        head_dim = self.hidden_size // self.num_heads
        if head_dim not in ALLOWED_HEAD_DIMS:
            raise ValueError(
                f"demo model: head_dim = hidden_size / num_heads = {self.hidden_size} / {self.num_heads} = "
                f"{head_dim}, but must be one of {ALLOWED_HEAD_DIMS} (vLLM's CPU attention rejects others, e.g. 16)"
            )
        if not 300 <= self.vocab_size <= 65536:
            raise ValueError(
                f"demo model: vocab_size must be between 300 and 65536 (256 bytes + special tokens + merges), "
                f"not {self.vocab_size}"
            )
        if self.max_seq_len < 16:
            raise ValueError(f"demo model: max_seq_len must be >= 16, not {self.max_seq_len}")
        if self.max_seq_len > self.max_position_embeddings:
            raise ValueError(
                f"demo model: max_seq_len ({self.max_seq_len}) must not exceed max_position_embeddings "
                f"({self.max_position_embeddings})"
            )
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"demo model: warmup_steps ({self.warmup_steps}) must be >= 0 and below steps ({self.steps})"
            )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"demo model: learning_rate must be > 0, not {self.learning_rate}")
        if not 0 < self.min_lr_ratio <= 1:
            raise ValueError(f"demo model: min_lr_ratio must be in (0, 1], not {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("demo model: weight_decay and grad_clip must be >= 0")
        if not 0 <= self.system_prompt_share <= 1:
            raise ValueError(f"demo model: system_prompt_share must be in [0, 1], not {self.system_prompt_share}")
        if self.num_threads < 0:
            raise ValueError(f"demo model: num_threads must be >= 0 (0 = automatic), not {self.num_threads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def tiny(cls, **overrides: Any) -> "DemoModelConfig":
        """A very small variant for tests: builds in a few seconds, learns little."""
        base = dict(
            vocab_size=512,
            hidden_size=64,
            num_layers=1,
            num_heads=2,
            intermediate_size=128,
            max_position_embeddings=256,
            max_seq_len=96,
            steps=60,
            batch_size=16,
            warmup_steps=5,
        )
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DemoModelConfig":
        """Build from a mapping (e.g. a TOML table); unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"demo model: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> one-line help."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
