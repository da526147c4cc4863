"""`alignloop compare`: the summary math, and a real (tiny) run of both methods through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loop.evaluation.compare import knobs, markdown, summarise
from tests.test_train import write_snapshot


def test_summary_gives_mean_and_spread_per_method_and_keeps_failures_apart():
    rows = [{"method": "dpo", "seed": s, "win_rate": w, "wall_s": 10.0 + s, "peak_rss_mb": 900.0 + s,
             "kl_to_base": 1.0, "peak_gpu_mb": None, "weights_mb": 4.1} for s, w in enumerate([0.7, 0.8, 0.75])]
    rows += [{"method": "ppo", "seed": 0, "win_rate": 0.6, "wall_s": 30.0, "peak_rss_mb": 1500.0,
              "kl_to_base": 2.0, "peak_gpu_mb": None, "weights_mb": 8.0},
             {"method": "ppo", "seed": 1, "error": "NaN/inf loss", "wall_s": 3.0, "peak_rss_mb": 700.0}]
    dpo, ppo = summarise(rows)
    assert dpo["win_rate"] == pytest.approx(0.75) and dpo["win_rate_min"] == 0.7 and dpo["win_rate_max"] == 0.8
    assert dpo["win_rate_std"] == pytest.approx(0.0408, abs=1e-4)  # population std of .7, .8, .75
    assert dpo["peak_rss_mb"] == 902.0 and dpo["wall_s"] == pytest.approx(11.0)
    assert ppo["seeds"] == 1 and ppo["failed"] == 1 and ppo["peak_rss_mb"] == 1500.0
    assert dpo["base_copies"] == 1 and ppo["base_copies"] == 2
    table = markdown([dpo, ppo], base={"rss_mb": 500.0, "weights_mb": 4.0})
    assert "| dpo | 4.1 MB (1.02x base) | 902 MB (1.8x) |" in table
    assert "| ppo | 8.0 MB (2.00x base) | 1500 MB (3.0x) |" in table
    assert "**0.750** (3 seeds)" in table


def test_knobs_count_each_methods_own_fields():
    # The README's compare table states these counts (5, 21, 6): a field added to or dropped from a
    # method's section must change this test and that table together.
    assert (knobs("dpo"), knobs("ppo"), knobs("kto")) == (5, 21, 6)


@pytest.mark.slow
def test_compare_command_trains_both_methods_and_writes_table_and_plot(tiny_model, tmp_path):
    snapshot = write_snapshot(tmp_path / "snap")
    fast = ["train.epochs=1", "train.batch_size=8", "train.lora_r=4", "train.lora_alpha=8", "train.max_length=128",
            "reward.epochs=1", "reward.batch_size=8", "ppo.steps=2", "ppo.rollout_batch=8", "ppo.minibatch=4",
            "ppo.max_new_tokens=8", "gate.eval_prompts=4", "gate.max_tokens=8", f"model.base={tiny_model}",
            f"data.dir={tmp_path / 'data'}"]
    cmd = [sys.executable, "-m", "loop.cli", "compare", "--methods", "dpo,ppo", "--seeds", "0,1", "--samples", "1",
           "--snapshot", str(snapshot), "--out", str(tmp_path / "out"), *[a for s in fast for a in ("--set", s)]]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = [json.loads(line) for line in (tmp_path / "out" / "trials.jsonl").read_text().splitlines()]
    assert [(t["method"], t["seed"]) for t in trials] == [("dpo", 0), ("dpo", 1), ("ppo", 0), ("ppo", 1)]
    for t in trials:
        assert "error" not in t, t
        # 4 prompts x 1 sample, ties half: the rate must be the one its own counts give
        assert t["wins"] + t["losses"] + t["ties"] == 4
        assert t["win_rate"] == pytest.approx((t["wins"] + 0.5 * t["ties"]) / 4)
        assert t["peak_rss_mb"] > 100 and t["wall_s"] > 0 and t["weights_mb"] > 0
    assert trials[2]["reward_model_accuracy"] is not None
    assert trials[2]["weights_mb"] > 1.9 * trials[0]["weights_mb"]  # PPO holds the reward model too
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| dpo |" in report and "| ppo |" in report and "(2 seeds)" in report
    assert (tmp_path / "out" / "compare.png").stat().st_size > 10_000
