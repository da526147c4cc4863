"""The promotion gate: a decision on paired per-prompt verdicts that knows its own noise.

Both versions answer the same held-out prompts, `gate.eval_samples` times each with the same seeds
(through the gateway's `/api/generate`, i.e. the real engine), and a judge (`loop.evaluation.judges`)
compares the two answers of each (prompt, seed). A prompt's score is the mean of its verdicts (win 1,
tie 1/2, loss 0), so prompts, not samples, are the independent unit. The gate promotes only when the
one-sided lower confidence bound (Student's t, level 1 - `gate.alpha`) of the mean score is above
0.5 + `gate.margin`: a candidate no better than what serves passes at most `alpha` of the time,
whatever the judge's tie rate or spread. People's votes between the two versions (arena pairs, a canary's
live pairs) count as more judged prompts once there are `gate.people_min_votes` of them. It holds
the candidate (kept as a candidate, nothing promoted) when the verdicts cannot decide anything: too few prompts, or a judge whose answers were
mostly not verdicts at all.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loop.sections import GateConfig

POINTS = {"a": 1.0, "tie": 0.5, "b": 0.0}
POWER = 0.9  # what `detectable` reports: the win rate promoted 9 times in 10


@dataclass
class Decision:
    """What the gate decided: "promote", "reject" or "hold" (no decision: the candidate waits for a person)."""

    outcome: str
    reason: str
    stats: dict[str, Any] = field(default_factory=dict)


def heldout_prompts(snapshot_dir: Path, limit: int) -> list[list[dict[str, str]]]:
    """Prompts never trained on: those of held-out pairs first, then logged prompts in no training pair."""
    import pyarrow.parquet as pq

    pairs = pq.read_table(snapshot_dir / "pairs.parquet").to_pylist()
    trained = {json.dumps(p["prompt"], sort_keys=True) for p in pairs if p["split"] == "train"}
    out, seen = [], set(trained)
    rows = [p["prompt"] for p in pairs if p["split"] == "heldout"]
    rows += [p["prompt"] for p in pq.read_table(snapshot_dir / "prompts.parquet").to_pylist()]
    for prompt in rows:
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(prompt)
        if len(out) == limit:
            break
    return out


def shadow_prompts(snapshot_dir: Path, limit: int, since_id: int,
                   exclude: list[list[dict[str, str]]]) -> list[list[dict[str, str]]]:
    """Live prompts logged after prompt `since_id` (the last cycle's newest), newest first, in no
    training pair, with no thumb (KTO's data) and not in `exclude` (the held-out set): what users
    asked lately, for the candidate to answer in the background before it may serve them. The
    cycle picks them before training and keeps PPO's rollouts off them."""
    import pyarrow.parquet as pq

    pairs = pq.read_table(snapshot_dir / "pairs.parquet").to_pylist()
    seen = {json.dumps(p["prompt"], sort_keys=True) for p in pairs if p["split"] == "train"}
    seen |= {json.dumps(p, sort_keys=True) for p in exclude}
    feedback = snapshot_dir / "feedback.parquet"
    if feedback.exists():
        seen |= {json.dumps(r["prompt"], sort_keys=True) for r in pq.read_table(feedback, columns=["prompt"]).to_pylist()}
    rows = pq.read_table(snapshot_dir / "prompts.parquet").to_pylist()
    out = []
    for row in sorted((r for r in rows if r["source"] == "live" and r["id"] > since_id), key=lambda r: -r["id"]):
        key = json.dumps(row["prompt"], sort_keys=True)
        if key not in seen and len(out) < limit:
            seen.add(key)
            out.append(row["prompt"])
    return out


def newest_prompt_id(snapshot_dir: Path) -> int:
    import pyarrow.parquet as pq

    ids = pq.read_table(snapshot_dir / "prompts.parquet", columns=["id"]).column("id").to_pylist()
    return max(ids, default=0)


def prompt_scores(verdicts: list[list[str]]) -> tuple[list[float], int]:
    """Per-prompt scores from `verdicts[sample][prompt]` (the candidate as "a"), and how many verdicts
    were invalid. Invalid verdicts are left out of a prompt's mean; a prompt with none valid is left out."""
    scores, invalid = [], 0
    for per_prompt in zip(*verdicts, strict=True):
        valid = [POINTS[v] for v in per_prompt if v in POINTS]
        invalid += len(per_prompt) - len(valid)
        if valid:
            scores.append(sum(valid) / len(valid))
    return scores, invalid


def confidence_bounds(scores: list[float], alpha: float) -> tuple[float, float, float]:
    """(mean, lower, upper): the one-sided bounds at level 1 - alpha each (Student's t), so [lower,
    upper] is a two-sided 1 - 2 alpha interval. With no spread at all the bounds are the mean."""
    from scipy import stats

    n = len(scores)
    mean = sum(scores) / n
    if n < 2:
        return mean, -math.inf, math.inf
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1))
    half = float(stats.t.ppf(1 - alpha, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def detectable(scores: list[float], alpha: float, need: float, power: float = POWER) -> float:
    """The smallest true win rate this many prompts, with this spread, would promote `power` of the
    time: need + (t(1 - alpha) + t(power)) x the standard error. Above 1: these prompts cannot
    tell a better candidate from luck at all."""
    from scipy import stats

    n = len(scores)
    if n < 2:
        return math.inf
    mean = sum(scores) / n
    se = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1)) / math.sqrt(n)
    return need + (float(stats.t.ppf(1 - alpha, n - 1)) + float(stats.t.ppf(power, n - 1))) * se


def counts(verdicts: list[list[str]]) -> dict[str, int]:
    flat = [v for sample in verdicts for v in sample]
    return {"wins": flat.count("a"), "losses": flat.count("b"), "ties": flat.count("tie"),
            "invalid": flat.count("invalid")}


def decide(verdicts: list[list[str]], kl_to_base: float | None, cfg: GateConfig,
           sets: dict[str, int] | None = None, people: list[float] | None = None) -> Decision:
    """Promote, reject or hold on `verdicts[sample][prompt]` (the candidate as "a") and the KL budget.
    `sets` names consecutive runs of prompts (e.g. {"heldout": 64, "shadow": 32}); each one's own win
    rate is recorded beside the decision, which is on all of them. `people`: the candidate's score
    per pair people voted on between the two versions (`Store.head_to_head`); once there are
    `gate.people_min_votes`, each counts as one more judged prompt."""
    scores, invalid = prompt_scores(verdicts) if verdicts else ([], 0)
    total = sum(len(v) for v in verdicts)
    stats: dict[str, Any] = {**counts(verdicts), "judged_prompts": len(scores), "samples": len(verdicts),
                             "alpha": cfg.alpha}
    start = 0
    for name, n in (sets or {}).items():
        part, _ = prompt_scores([v[start: start + n] for v in verdicts])
        stats[f"{name}_prompts"] = n
        stats[f"win_rate_{name}"] = sum(part) / len(part) if part else None
        start += n
    people = list(people or [])
    stats["people_votes"] = len(people)
    if people:
        stats["win_rate_people"] = sum(people) / len(people)
    if len(people) >= cfg.people_min_votes:
        scores = scores + people
        stats["judged_prompts"] = len(scores)
    if total and invalid > total / 2:
        return Decision("hold", f"the judge gave no usable verdict in {invalid} of {total} comparisons", stats)
    if len(scores) < cfg.min_prompts:
        return Decision("hold", f"{len(scores)} judged prompts, fewer than gate.min_prompts = {cfg.min_prompts}: "
                                "too few to tell a better candidate from luck", stats)
    mean, lower, upper = confidence_bounds(scores, cfg.alpha)
    need = 0.5 + cfg.margin
    stats.update(win_rate=mean, win_rate_lower=lower, win_rate_upper=upper,
                 detectable_win_rate=detectable(scores, cfg.alpha, need))
    level = f"{1 - 2 * cfg.alpha:.0%}"
    rate = f"win rate {mean:.3f} ({level} interval {lower:.3f}-{upper:.3f}, {len(scores)} prompts)"
    if lower <= need:
        return Decision("reject", f"{rate}: its lower bound is not above {need:.3f}", stats)
    if kl_to_base is not None and kl_to_base > cfg.kl_budget:
        return Decision("reject", f"{rate}, but KL to the base {kl_to_base:.2f} nats is over the budget "
                                  f"{cfg.kl_budget:.2f}", stats)
    kl = f", KL {kl_to_base:.2f} <= {cfg.kl_budget:.2f}" if kl_to_base is not None else ""
    return Decision("promote", f"{rate}: lower bound above {need:.3f}{kl}", stats)
