"""The GPU memory table's script (`ops/bench/gpu_memory.py`, issue 11) runs on CPU with a tiny model, as
it will on a GPU machine with a real size: every method, full and LoRA, and the models each holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "ops" / "bench" / "gpu_memory.py"


@pytest.mark.slow
def test_the_memory_script_measures_every_method_on_cpu(tmp_path):
    out = tmp_path / "table.md"
    # as on the GPU machine: a plain python, from any folder, nothing of the project installed but its files
    done = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--device", "cpu", "--steps", "1",
                           "--batch", "2", "--seq", "32", "--new-tokens", "8", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
            for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {(m, mode) for m in ("sft", "dpo", "reward", "ppo") for mode in ("full", "LoRA")} | {("method", "mode")}
    # weights held, as multiples of one model: the write-up's two (DPO) and four (RLHF) models
    times_one = {k: float(v[1].split("(")[1].rstrip(")")) for k, v in rows.items() if k != ("method", "mode")}
    assert times_one[("dpo", "full")] == 2.0 and times_one[("ppo", "full")] == 4.0
    assert times_one[("dpo", "LoRA")] == times_one[("sft", "LoRA")]  # the reference is the adapter off: no copy
    assert 2.0 < times_one[("ppo", "LoRA")] < 3.0  # policy + adapter, a reward model, a value head
    assert all(v[2] == "-" for v in rows.values() if v[2] != "peak MB (x SFT full)")  # no CUDA: no peak
