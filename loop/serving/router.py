"""Model routing: which model version, and which engine model name, answers a request.

The served alias (e.g. `alignloop`) points to the promoted version; a share of the alias's
traffic can go to a canary. A request may also name a version (`v3`) or `base` directly. The
whole table is one immutable value swapped in a single assignment, so a promotion is atomic:
every request sees either the old table or the new one, never half of each.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Routes:
    alias: str
    base_name: str                                   # the engine's name for the base model
    serving: int = 0                                 # version id the alias points to
    previous: int | None = None                      # what served before (instant rollback)
    canary: int | None = None
    canary_share: float = 0.0
    engine_names: dict[int, str] = field(default_factory=lambda: {0: ""})  # version id -> engine model
    version_names: dict[str, int] = field(default_factory=lambda: {"base": 0})  # "v3" -> 3

    def engine_name(self, version_id: int) -> str:
        return self.base_name if version_id == 0 else self.engine_names[version_id]


class UnknownModel(KeyError):
    pass


class Router:
    def __init__(self, alias: str, base_name: str, rng: random.Random | None = None) -> None:
        self.routes = Routes(alias=alias, base_name=base_name)
        self._rng = rng or random.Random()
        self._using: Counter[str] = Counter()  # engine model name -> requests in flight on it

    def hold(self, engine_name: str) -> None:
        """A request is about to use this engine name: its adapter must stay loaded until `release`
        (vLLM leaves a request whose adapter is unloaded under it running forever)."""
        self._using[engine_name] += 1

    def release(self, engine_name: str) -> None:
        self._using[engine_name] -= 1
        if self._using[engine_name] <= 0:
            del self._using[engine_name]

    def in_use(self, engine_name: str) -> int:
        return self._using.get(engine_name, 0)

    def resolve(self, model: str) -> tuple[int, str]:
        """(version id, engine model name) for a requested model name."""
        r = self.routes  # one read: the table cannot change under this request
        if model == r.alias:
            version = r.serving
            if r.canary is not None and r.canary_share > 0 and self._rng.random() < r.canary_share:
                version = r.canary
        elif model in r.version_names and (r.version_names[model] == 0 or r.version_names[model] in r.engine_names):
            version = r.version_names[model]
        else:
            raise UnknownModel(model)
        return version, r.engine_name(version)

    def names(self) -> list[str]:
        r = self.routes
        loaded = [name for name, vid in r.version_names.items() if vid == 0 or vid in r.engine_names]
        return [r.alias] + sorted(loaded)

    def update(self, **changes) -> Routes:
        self.routes = replace(self.routes, **changes)
        return self.routes
