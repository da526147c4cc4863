"""Evaluation of a candidate against what serves, and the promotion gate.

Win rate: both versions answer the same held-out prompts with the same sampling seeds (through the
gateway's `/api/generate`, i.e. the real engine), and the judge picks the better answer of each
pair; ties count half. The judge is the demo judge's rule (`loop.demo.judge`), the newest reward model
(`gate.judge = "reward"`), or an OpenAI-compatible LLM asked which answer is better (RLAIF).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from loop.config import GateConfig
from loop.demo import judge as demo_judge

Judge = Callable[[str, str, str], str]  # (prompt, a, b) -> "a" | "b" | "tie"

LLM_JUDGE_PROMPT = """You compare two assistant replies to the same user message.
User message:
{prompt}

Reply A:
{a}

Reply B:
{b}

Which reply is more helpful, correct and polite? Answer with one letter: A, B, or T for a tie."""


def llm_judge(url: str, model: str, timeout: float = 60.0) -> Judge:
    """An OpenAI-compatible chat model as judge; an answer it gives that is not A/B/T counts as a tie."""
    http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)

    def prefer(prompt: str, a: str, b: str) -> str:
        r = http.post("/chat/completions", json={
            "model": model, "temperature": 0.0, "max_tokens": 2,
            "messages": [{"role": "user", "content": LLM_JUDGE_PROMPT.format(prompt=prompt, a=a, b=b)}]})
        r.raise_for_status()
        letter = (r.json()["choices"][0]["message"]["content"] or "").strip()[:1].upper()
        return {"A": "a", "B": "b"}.get(letter, "tie")

    return prefer


def reward_judge(path: str) -> Judge:
    """A reward model as judge: the answer it scores higher wins (equal scores tie)."""
    from loop.training.reward import RewardModel

    model = RewardModel.load(path)

    def prefer(prompt: str, a: str, b: str) -> str:
        sa, sb = model.score([[{"role": "user", "content": prompt}]] * 2, [a, b]).tolist()
        return "a" if sa > sb else "b" if sb > sa else "tie"

    return prefer


def make_judge(cfg: GateConfig, reward_model: str | None = None) -> Judge:
    """The configured judge; `reward_model` is the newest reward model's directory (for judge = "reward")."""
    if cfg.judge == "demo":
        return demo_judge.prefer
    if cfg.judge == "reward":
        if not reward_model:
            raise ValueError("gate.judge = \"reward\" but no reward model exists yet: run a PPO cycle first")
        return reward_judge(reward_model)
    return llm_judge(cfg.judge, cfg.judge_model)


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


def win_rate(prompts: list[str], candidate: list[str], serving: list[str], judge: Judge) -> dict[str, float]:
    """The candidate's win rate over what serves (ties half), and the counts behind it."""
    wins = losses = ties = 0
    for prompt, c, s in zip(prompts, candidate, serving, strict=True):
        verdict = judge(prompt, c, s)
        wins += verdict == "a"
        losses += verdict == "b"
        ties += verdict == "tie"
    n = max(len(prompts), 1)
    return {"win_rate": (wins + 0.5 * ties) / n, "wins": wins, "losses": losses, "ties": ties}


def gate(metrics: dict[str, Any], cfg: GateConfig) -> tuple[bool, str]:
    """Promote only if the candidate beats what serves by the margin and stays within the KL budget."""
    need = 0.5 + cfg.margin
    rate = metrics["win_rate"]
    kl = metrics.get("kl_to_base")
    if rate <= need:
        return False, f"win rate {rate:.3f} over the serving version is not above {need:.3f} (0.5 + margin)"
    if kl is not None and kl > cfg.kl_budget:
        return False, f"KL to the base {kl:.2f} nats is over the budget {cfg.kl_budget:.2f}"
    return True, f"win rate {rate:.3f} > {need:.3f}" + (f", KL {kl:.2f} <= {cfg.kl_budget:.2f}" if kl is not None else "")
