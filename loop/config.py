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

from loop.sections import (  # noqa: F401
    METHODS,
    DataConfig,
    DemoModelConfig,
    EngineConfig,
    GateConfig,
    GatewayConfig,
    KTOConfig,
    LabelingConfig,
    ModelConfig,
    MonitorConfig,
    PPOConfig,
    RewardConfig,
    ScheduleConfig,
    StoreConfig,
    TrainConfig,
    extra_rewards,
)

CONFIG_FILE = "alignloop.toml"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and field."""


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
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
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
            return from_dict(_overrides({}, overrides), _with_overrides(source, overrides), path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file (create one with `alignloop init`)") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_dict(_overrides(raw, overrides), _with_overrides(source, overrides), path)


def _with_overrides(source: str, overrides: list[str] | None) -> str:
    """Where a config's values came from, for its errors: a bad `--set` value is not the file's."""
    return f"{source} with --set {' '.join(overrides)}" if overrides else source


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
