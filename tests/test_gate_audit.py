"""A small version of the gate audit (`ops/bench/gate_audit.py`; the full one and its results:
ops/bench/results/gate_audit.md): on the default demo model (the tiny one's answers are
nearly all ties by the demo rule), one seed, the judge fitted on the demo
rule's labels as a retrain fits it, a candidate that is the base itself and one trained on flipped
labels, each through the real gate and graded against the truth the gate never saw."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "ops" / "bench"


def bench(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_small_audit_promotes_nothing_worse_and_not_the_base_itself(demo_model, tmp_path, capsys):
    audit = bench("gate_audit")
    assert audit.main(["--model", str(demo_model), "--seeds", "0", "--pairs", "240", "--candidates",
                       "good,neutral,flipped", "--truth-samples", "2", "--out", str(tmp_path),
                       "--set", "gate.reward_min_heldout=8"]) == 0
    table = capsys.readouterr().out
    rows = {r["candidate"]: r for r in map(json.loads, (tmp_path / "rows.jsonl").read_text().splitlines())}
    assert set(rows) == {"good", "neutral", "flipped"} and "| truth \\ gate | promote | reject | hold |" in table
    for r in rows.values():
        assert r["decision"] in ("promote", "reject", "hold") and r["reason"]
        assert not (r["truth"] == "worse" and r["decision"] == "promote"), r
    assert rows["neutral"]["truth"] == "neutral" and rows["neutral"]["decision"] != "promote"
    assert rows["flipped"]["true_win_rate"] < rows["good"]["true_win_rate"]  # the truth tells them apart
