"""The demo judge: a scripted labeller with a fixed, written-down rule.

Rule (see :data:`RULE`):

* A reply scores **1 point for being on-topic** and **1 point for being polite**; scores are 0, 1 or 2.
* **On-topic**: if the prompt mentions corpus topics (a topic's name or alias, whole words, any case,
  see :mod:`loop.demo.corpus`), the reply must mention at least one of them and no other corpus
  topic. If the prompt mentions none, the reply must share at least one content word (4+ letters,
  not a common function word, not part of a politeness marker) with the prompt.
* **Polite**: the reply contains at least one polite marker ("thank you", "thanks", "please",
  "good question", "happy to help", "glad", "hope this helps", "lovely", "good luck") and no rude
  marker ("ugh", "silly", "obviously", "whatever", "do i have to", "stop bothering", "figure out",
  "not that hard", "do not ask", "don't ask", "stupid", "idiot", "shut up", "annoying", "dumb").
  Markers are matched case-insensitively on word boundaries.
* Of two replies, the one with the higher score wins; equal scores tie.
* A reply is *good* when it has the best possible score (2: on-topic and polite).

Works on any text (model samples may be garbled or empty: an empty reply scores 0). Pure Python, no
torch; deterministic.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal, TypedDict

from loop.demo import corpus as demo_corpus

__all__ = ["RULE", "MAX_SCORE", "Verdict", "on_topic", "polite", "verdict", "score", "prefer", "is_good"]

RULE = (
    "1 point for being on-topic (mentions the prompt's topic and no other corpus topic; for prompts "
    "without a corpus topic, shares a content word with the prompt) + 1 point for being polite "
    "(a polite marker and no rude marker). The higher score wins; equal scores tie. "
    "Good = 2 points."
)
MAX_SCORE = 2.0

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_STOPWORDS = frozenset(
    """
    about above after again against also because been before being below between both could does
    doing down during each from further have having here hers herself himself into itself just more
    most much myself once only other ought ours ourselves over same should some such than that their
    theirs them themselves then there these they this those through under until very were what when
    where which while whom with would your yours yourself yourselves will shall might must need
    tell help know want like make best good tips give advice question please thank thanks anything
    something everything nothing really thing things there's what's it's i'm can't don't won't
    """.split()
)


def _norm(text: object) -> str:
    return " ".join(str(text if text is not None else "").lower().split())


@lru_cache(maxsize=1)
def _marker_patterns() -> tuple[re.Pattern[str], re.Pattern[str]]:
    def pat(words: tuple[str, ...]) -> re.Pattern[str]:
        alts = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in sorted(words, key=len, reverse=True))
        return re.compile(r"(?<![a-z])(?:" + alts + r")(?![a-z])")

    return pat(demo_corpus.polite_markers()), pat(demo_corpus.rude_markers())


@lru_cache(maxsize=1)
def _marker_words() -> frozenset[str]:
    words: set[str] = set()
    for m in demo_corpus.polite_markers() + demo_corpus.rude_markers():
        words.update(_WORD.findall(m))
    return frozenset(words)


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text) if len(w) >= 4 and w not in _STOPWORDS and w not in _marker_words()}


def on_topic(prompt: str, reply: str) -> bool:
    """True when the reply stays on the prompt's topic (see the module docstring)."""
    p, r = _norm(prompt), _norm(reply)
    if not r:
        return False
    wanted = demo_corpus.topics_in(p)
    if wanted:
        mentioned = demo_corpus.topics_in(r)
        return any(t in wanted for t in mentioned) and all(t in wanted for t in mentioned)
    return bool(_content_words(p) & _content_words(r))


def polite(reply: str) -> bool:
    """True when the reply has a polite marker and no rude marker."""
    r = _norm(reply)
    pol, rude = _marker_patterns()
    return bool(pol.search(r)) and not rude.search(r)


class Verdict(TypedDict):
    on_topic: bool
    polite: bool
    score: float
    good: bool


def verdict(prompt: str, reply: str) -> Verdict:
    """The parts of the score, for reports."""
    ot, po = on_topic(prompt, reply), polite(reply)
    s = float(ot) + float(po)
    return {"on_topic": ot, "polite": po, "score": s, "good": s >= MAX_SCORE}


def score(prompt: str, reply: str) -> float:
    """0.0, 1.0 or 2.0: one point for on-topic, one for polite."""
    return float(on_topic(prompt, reply)) + float(polite(reply))


def prefer(prompt: str, a: str, b: str) -> Literal["a", "b", "tie"]:
    """``"a"`` or ``"b"`` for the reply with the higher score, ``"tie"`` when equal."""
    sa, sb = score(prompt, a), score(prompt, b)
    if sa > sb:
        return "a"
    if sb > sa:
        return "b"
    return "tie"


def is_good(prompt: str, reply: str) -> bool:
    """True when the reply has the best possible score (on-topic and polite)."""
    return score(prompt, reply) >= MAX_SCORE


class Grader:
    """The rule as a grader of benchmarks and end-to-end tests (the simulated people's verdict on
    two answers), in the shape of the gate's judges (`loop.evaluation.judges.Judge`). Never the
    gate's judge: `tests/test_boundaries.py` keeps the gate from importing this module."""

    name = "the demo rule (simulated people)"

    def verdicts(self, prompts: list[list[dict[str, str]]], a: list[str], b: list[str]) -> list[str]:
        return [prefer(p[-1]["content"], x, y) for p, x, y in zip(prompts, a, b, strict=True)]
