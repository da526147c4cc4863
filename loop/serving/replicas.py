"""The engines the gateway fronts: local vLLM servers it supervises and external ones at a URL.

Each request goes to the least loaded replica that is ready (ties in turn). A replica is ready
only once it holds every adapter of the route table (`Versions.sync`, its `on_ready`), so any
ready replica can answer any routed name.
"""

from __future__ import annotations

import os
from typing import Any

from loop.config import Config
from loop.serving.engine import Engine, ExternalEngine, Replica
from loop.vllm_server import cpu_build


def cpu_shares(cpus: list[int], replicas: int) -> list[str]:
    """Each replica its own cores, as vLLM's CPU build takes them (VLLM_CPU_OMP_THREADS_BIND);
    with more replicas than cores, they take turns."""
    if replicas <= len(cpus):
        k = len(cpus) // replicas
        groups = [cpus[i * k:(i + 1) * k] for i in range(replicas)]
    else:
        groups = [[cpus[i % len(cpus)]] for i in range(replicas)]
    return [",".join(map(str, g)) for g in groups]


class Replicas:
    def __init__(self, members: list[Replica]) -> None:
        self.members = members
        self._turn = 0

    @classmethod
    def from_config(cls, cfg: Config, base_name: str) -> Replicas:
        """`engine.replicas` local servers on consecutive ports (each its own log and devices; on
        the CPU build, several replicas share out the cores unless `engine.devices` says how),
        then one replica per `engine.external` URL."""
        e = cfg.engine
        devices = e.device_groups()
        if not devices and e.replicas > 1 and cpu_build():
            devices = cpu_shares(sorted(os.sched_getaffinity(0)), e.replicas)
        logs = cfg.data_dir / "logs"
        members: list[Replica] = [
            Engine(cfg.base_model_dir, e, base_name, logs / ("engine.log" if i == 0 else f"engine-{i}.log"),
                   name=f"local-{i}", port=e.port + i, devices=devices[i] if devices else None)
            for i in range(e.replicas)]
        key = os.environ.get(e.external_key_env) if e.external_key_env else None
        members += [ExternalEngine(f"external-{i}", url, key or None, base_name)
                    for i, url in enumerate(e.external_urls())]
        return cls(members)

    def ready(self) -> list[Replica]:
        return [m for m in self.members if m.ready.is_set()]

    def any_ready(self) -> bool:
        return any(m.ready.is_set() for m in self.members)

    def pick(self, exclude: tuple[Replica, ...] = ()) -> Replica | None:
        """The ready replica with the fewest requests in flight (ties in turn), or None."""
        ready = [m for m in self.members if m.ready.is_set() and m not in exclude]
        if not ready:
            return None
        self._turn += 1
        n = len(ready)
        return min((ready[(self._turn + i) % n] for i in range(n)), key=lambda m: m.in_flight)

    def start(self) -> None:
        for m in self.members:
            m.start(wait=False)

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    @property
    def restarts(self) -> int:
        return sum(m.restarts for m in self.members)

    def status(self) -> list[dict[str, Any]]:
        return [m.status() for m in self.members]
