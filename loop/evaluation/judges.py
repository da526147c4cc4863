"""The gate's judges: who says which of two answers to the same prompt is better.

- `RewardJudge`: a reward model refreshed on every label so far (the child trains one each cycle,
  whatever the method, with its own seed, so a PPO candidate is not judged by the very model it was
  optimised against). The answer it scores higher wins; it never answers garbage.
- `LLMJudge`: an OpenAI-compatible chat model asked which reply is better (RLAIF). It is asked in
  both orders (candidate as A, then as B): a judge that changes its mind with the order has shown
  position bias, and that comparison counts as a tie. An answer that is not A, B or T is `invalid`.

The demo's rule (`loop.demo.judge`) is not here on purpose: it stands for the simulated people.

A verdict is "a" (the first answer is better), "b", "tie" or "invalid". A judge that cannot answer
at all (unreachable, timing out, an HTTP error) raises `JudgeUnavailable`; the gate then holds the
candidate and leaves what serves alone.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import httpx

from loop.sections import GateConfig

Messages = list[dict[str, str]]
API_KEY_ENV = "ALIGNLOOP_JUDGE_API_KEY"  # the LLM judge's API key, if it needs one (never in the config file)

LLM_JUDGE_PROMPT = """You compare two assistant replies to the same conversation.

Conversation:
{conversation}

Reply A:
{a}

Reply B:
{b}

Which reply is more helpful, correct and polite? Answer with one letter: A, B, or T for a tie."""


class JudgeUnavailable(RuntimeError):
    """The judge could not give verdicts (unreachable, timed out, refused); nothing may be promoted."""


class Judge(Protocol):
    name: str

    def verdicts(self, prompts: list[Messages], a: list[str], b: list[str]) -> list[str]:
        """One verdict per (prompt, a, b): "a", "b", "tie" or "invalid"."""
        ...


class RewardJudge:
    """A reward model as judge: the answer it scores higher wins (equal scores tie)."""

    def __init__(self, path: str, accuracy: float | None = None) -> None:
        from loop.training.reward import RewardModel

        self.name = f"reward model {path}" + (f" (held-out accuracy {accuracy:.3f})" if accuracy is not None else "")
        self.model = RewardModel.load(path)

    def verdicts(self, prompts: list[Messages], a: list[str], b: list[str]) -> list[str]:
        sa = self.model.score(prompts, a).tolist()
        sb = self.model.score(prompts, b).tolist()
        return ["a" if x > y else "b" if y > x else "tie" for x, y in zip(sa, sb, strict=True)]


def conversation_text(messages: Messages) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def parse_letter(text: str | None) -> str:
    """'A' -> "a", 'B' -> "b", 'T' -> "tie"; anything else (an essay, an empty reply) -> "invalid"."""
    word = (text or "").strip().strip(".*:()[]\"'").upper()
    return {"A": "a", "B": "b", "T": "tie", "TIE": "tie"}.get(word, "invalid")


def both_orders(first: str, second: str) -> str:
    """The verdict on (x, y) from asking (x as A, y as B) -> `first` and (y as A, x as B) -> `second`:
    kept when the two agree, a tie when the order changed the answer, invalid if either was."""
    if "invalid" in (first, second):
        return "invalid"
    swapped = {"a": "b", "b": "a", "tie": "tie"}[second]
    return first if first == swapped else "tie"


class LLMJudge:
    """An OpenAI-compatible chat model as judge, asked in both orders."""

    def __init__(self, url: str, model: str, timeout_s: float = 60.0, api_key: str = "", workers: int = 8) -> None:
        self.name, self.model, self.workers = f"LLM judge {model} at {url}", model, workers
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s, headers=headers)

    def ask(self, prompt: Messages, a: str, b: str) -> str:
        body = {"model": self.model, "temperature": 0.0, "max_tokens": 4, "messages": [
            {"role": "user", "content": LLM_JUDGE_PROMPT.format(conversation=conversation_text(prompt), a=a, b=b)}]}
        try:
            r = self.http.post("/chat/completions", json=body)
        except httpx.HTTPError as e:
            raise JudgeUnavailable(f"{self.name}: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise JudgeUnavailable(f"{self.name}: HTTP {r.status_code}: {r.text[:200]}")
        try:
            return parse_letter(r.json()["choices"][0]["message"]["content"])
        except (ValueError, KeyError, IndexError, TypeError):
            return "invalid"  # a 200 that is not a chat completion: garbage, counted as such

    def verdict(self, prompt: Messages, a: str, b: str) -> str:
        return both_orders(self.ask(prompt, a, b), self.ask(prompt, b, a))

    def verdicts(self, prompts: list[Messages], a: list[str], b: list[str]) -> list[str]:
        pool = ThreadPoolExecutor(self.workers)
        try:
            return list(pool.map(self.verdict, prompts, a, b))
        finally:  # a judge that fails fails fast: what is still queued is dropped, not waited for
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self.http.close()


def llm_judge(cfg: GateConfig) -> LLMJudge:
    """The configured LLM judge; its API key, if it needs one, from the environment (API_KEY_ENV)."""
    return LLMJudge(cfg.judge_url, cfg.judge_model, cfg.judge_timeout_s, os.environ.get(API_KEY_ENV, ""))


def choose(cfg: GateConfig, judge_model: dict[str, Any] | None) -> tuple[Judge | None, str]:
    """The judge the gate may trust now, or None and why not.

    `judge_model` is the reward model refreshed for judging (a row of /api/reward_models: path,
    accuracy, metrics with heldout_pairs), or None when none could be fitted."""
    if cfg.uses_llm():
        return llm_judge(cfg), "the configured LLM judge"
    if judge_model is None:
        return None, "no reward model to judge with (no labelled pairs yet?)"
    accuracy = judge_model.get("accuracy")
    heldout = (judge_model.get("metrics") or {}).get("heldout_pairs", 0)
    if accuracy is None or heldout < cfg.reward_min_heldout:
        return None, (f"the judging reward model was measured on {heldout} held-out pairs, fewer than "
                      f"gate.reward_min_heldout = {cfg.reward_min_heldout}: it cannot be trusted yet")
    if accuracy < cfg.reward_floor:
        return None, (f"the judging reward model's held-out accuracy {accuracy:.3f} is under gate.reward_floor = "
                      f"{cfg.reward_floor:.2f}: it cannot be trusted to judge")
    return RewardJudge(judge_model["path"], accuracy), f"the reward model refreshed on the labels (accuracy {accuracy:.3f})"
