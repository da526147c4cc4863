"""Typed configuration: one TOML file (`alignloop.toml`), one dataclass per section.

Every field has a default and a one-line help (`metadata["help"]`); `alignloop init` writes the
file from these dataclasses, so the file and the code cannot drift. Loading checks every key and
type and names the file, section and field in its error. Paths in the file are relative to the
file's own folder; with no file, to the current directory.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from loop.demo_model import DemoModelConfig

CONFIG_FILE = "alignloop.toml"
METHODS = ("dpo", "ppo", "kto")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and field."""


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
    pair_share: float = _f(0.25, "share of chat exchanges that get a second answer in the background, making a pair to label")
    log_flush_ms: int = _f(200, "live traffic is written to the store in batches this often; a crash loses at most this window")
    log_max_queue: int = _f(10000, "records waiting to be written at most; beyond it new records are dropped and counted")
    request_timeout_s: float = _f(120.0, "longest wait for the engine on one request before answering 504")
    retry_after_s: int = _f(5, "Retry-After seconds sent with a 503 while the engine is down or restarting")

    def __post_init__(self) -> None:
        _check_port(self.port)
        if not 0.0 <= self.pair_share <= 1.0:
            raise ValueError("pair_share must be in [0, 1]")
        for name in ("log_flush_ms", "log_max_queue", "retry_after_s"):
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
    startup_timeout_s: float = _f(300.0, "seconds to wait for the engine to become healthy")

    def __post_init__(self) -> None:
        _check_port(self.port)
        for name in ("max_model_len", "max_lora_rank", "max_loras", "kv_cache_gb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


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

    def __post_init__(self) -> None:
        _check_port(self.app_port)
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
    target_modules: str = _f("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "modules LoRA adapts, comma-separated")
    max_length: int = _f(256, "longest prompt + reply in tokens")
    from_serving: bool = _f(False, "continue from the serving adapter instead of starting from the base")
    seed: int = _f(0, "seed of the run")
    num_processes: int = _f(1, "processes `accelerate launch` starts (GPUs, or CPU processes)")
    accelerate_config: str = _f("", "accelerate config file (e.g. ops/accelerate/multi_gpu.yaml); empty: none")
    timeout_s: float = _f(3600.0, "a training run taking longer is killed and marked failed")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be dpo, ppo or kto, got {self.method!r}")
        if self.learning_rate <= 0 or self.epochs <= 0 or self.beta <= 0:
            raise ValueError("learning_rate, epochs and beta must be positive")
        if self.batch_size < 1 or self.lora_r < 1 or self.num_processes < 1:
            raise ValueError("batch_size, lora_r and num_processes must be at least 1")


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
    """PPO against the reward model: the project's own trainer (loop/ppo.py)."""

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

    def __post_init__(self) -> None:
        if min(self.steps, self.rollout_batch, self.ppo_epochs, self.minibatch, self.max_new_tokens) < 1:
            raise ValueError("steps, rollout_batch, ppo_epochs, minibatch and max_new_tokens must be at least 1")
        if self.minibatch > self.rollout_batch:
            raise ValueError("minibatch must not be larger than rollout_batch")
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
    """Evaluation and the promotion gate."""

    judge: str = _f("demo", "who judges win rate: 'demo' (the demo judge's rule), 'reward' (the newest reward model; "
                     "lenient to a PPO candidate trained against it) or an OpenAI-compatible URL")
    judge_model: str = _f("", "model name at the judge URL (LLM-as-judge, i.e. RLAIF)")
    margin: float = _f(0.05, "promote only if the candidate's win rate over what serves is above 0.5 + margin")
    kl_budget: float = _f(20.0, "reject a candidate whose KL to the base (nats per answer) is above this")
    eval_prompts: int = _f(64, "held-out prompts used to judge win rate")
    max_tokens: int = _f(64, "answer length when judging")
    temperature: float = _f(1.0, "sampling temperature when judging (1.0: what clients get by default)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin < 0.5:
            raise ValueError("margin must be in [0, 0.5)")
        if self.eval_prompts < 1 or self.max_tokens < 1:
            raise ValueError("eval_prompts and max_tokens must be at least 1")


@dataclass
class ScheduleConfig:
    """When the scheduler retrains."""

    enabled: bool = _f(True, "run the scheduler inside `alignloop up`")
    cron: str = _f("0 3 * * *", "cron rule (minute hour day month weekday), local time; empty: no nightly run")
    min_new_labels: int = _f(0, "also retrain once this many new labels arrived since the last run (0: off)")
    check_every_s: float = _f(60.0, "how often the label trigger looks")
    alternate: str = _f("", "methods the scheduler takes in turn, e.g. 'dpo,ppo'; empty: always train.method")

    def __post_init__(self) -> None:
        if self.min_new_labels < 0:
            raise ValueError("min_new_labels must be >= 0")
        unknown = [m for m in self.methods() if m not in METHODS]
        if unknown:
            raise ValueError(f"alternate: unknown method(s) {', '.join(unknown)}; expected {', '.join(METHODS)}")

    def methods(self) -> list[str]:
        return [m.strip() for m in self.alternate.split(",") if m.strip()]


@dataclass
class Config:
    """The whole configuration; `path` is the file it came from (None: defaults only)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    demo: DemoModelConfig = field(default_factory=DemoModelConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    labeling: LabelingConfig = field(default_factory=LabelingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    path: Path | None = field(default=None, metadata={"toml": False})

    @property
    def root(self) -> Path:
        """The folder relative paths in the config are resolved against."""
        return self.path.parent if self.path else Path.cwd()

    @property
    def data_dir(self) -> Path:
        return (self.root / self.data.dir).resolve()

    @property
    def db_path(self) -> Path:
        return self.data_dir / self.store.file

    @property
    def demo_model_dir(self) -> Path:
        return self.data_dir / "models" / "demo"

    @property
    def admin_token_path(self) -> Path:
        """The local admin's token, written by `serve` for the CLI on this machine (mode 600)."""
        return self.data_dir / "admin.token"

    @property
    def base_model_dir(self) -> Path:
        """The base model: the configured directory, else the demo model."""
        if self.model.base:
            return (self.root / self.model.base).resolve()
        return self.demo_model_dir


def _check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be from 1 to 65535, got {port}")


def _sections() -> dict[str, type]:
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if f.metadata.get("toml", True)}


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerce(value: Any, typ: type, where: str) -> Any:
    """Check a TOML value against a field's type (ints are accepted for floats)."""
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(f"{where}: expected {_TYPE_NAMES.get(typ, typ.__name__)}, got {value!r}")
    return value


def _build_section(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table [{where.split('[')[-1]}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(v, hints[k], f"{where} {k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def from_dict(raw: dict[str, Any], source: str = "<config>", path: Path | None = None) -> Config:
    sections = _sections()
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{source}: unknown section [{unknown[0]}] (known: {', '.join(sections)})")
    built = {name: _build_section(cls, raw.get(name, {}), f"{source}: [{name}]") for name, cls in sections.items()}
    return Config(**built, path=path)


def load(path: str | Path | None = None, overrides: list[str] | None = None, missing_ok: bool = False) -> Config:
    """Read a config file (default: ./alignloop.toml if it exists, else all defaults) plus overrides.

    An override is `section.key=value`, the value written as in TOML (strings may drop the quotes).
    With `missing_ok`, a named file that does not exist yet gives the defaults, placed there.
    """
    if path is None and Path(CONFIG_FILE).exists():
        path = CONFIG_FILE
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path).resolve()
        source = str(path)
        if missing_ok and not path.exists():
            return from_dict(_overrides({}, overrides), source, path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file (create one with `alignloop init`)") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_dict(_overrides(raw, overrides), source, path)


def _overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    for item in overrides or []:
        section, key, value = _parse_override(item)
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"override {item!r}: [{section}] is not a table")
        raw[section][key] = value
    return raw


def _parse_override(item: str) -> tuple[str, str, Any]:
    name, sep, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. gateway.port=8001")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return section, key, value


def render(config: Config | None = None) -> str:
    """The config as a commented TOML file (what `alignloop init` writes)."""
    config = config or Config()
    lines = ["# alignloop configuration. Every key is optional; shown here with its current value.", ""]
    for name, cls in _sections().items():
        section = getattr(config, name)
        lines.append(f"# {(cls.__doc__ or '').strip().splitlines()[0]}")
        lines.append(f"[{name}]")
        for f in dataclasses.fields(cls):
            lines.append(f"# {f.metadata.get('help', '')}")
            lines.append(f"{f.name} = {_toml_value(getattr(section, f.name))}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain data (saved beside every trained version)."""
    return {name: dataclasses.asdict(getattr(config, name)) for name in _sections()}
