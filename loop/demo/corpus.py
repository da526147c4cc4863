"""The demo corpus: a small, deterministic garden-and-kitchen help desk.

The data lives in ``loop/demo/corpus.json`` (shipped as package data): 40 topics, each with a kind
(``plant``, ``garden`` or ``food``), a few aliases and four facts, plus prompt templates and the
polite / rude openers and closers that give replies their style.

Everything here is a pure function of its arguments (and of the data file):

* :func:`prompts` - user questions, with a fixed train / held-out split (a stable hash of the text);
* :func:`dialogues` / :func:`dialogue_records` - (prompt, reply) pairs with replies in a mix of four
  styles: ``polite_on``, ``rude_on``, ``polite_off`` (talks about another topic), ``rude_off``;
* :func:`topic_of` / :func:`topics_in` - which corpus topics a text mentions (used by the judge).

No heavy imports: this module is safe to import anywhere.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from functools import lru_cache
from importlib import resources
from typing import Any, NamedTuple

__all__ = [
    "HELDOUT_PERCENT",
    "STYLES",
    "STYLE_WEIGHTS",
    "Dialogue",
    "corpus_data",
    "corpus_hash",
    "topics",
    "topic_names",
    "prompts",
    "split_of",
    "topic_of",
    "topics_in",
    "reply",
    "dialogue_records",
    "dialogues",
    "system_prompt",
    "polite_markers",
    "rude_markers",
    "tokenizer_texts",
]

DATA_FILE = "corpus.json"

#: Reply styles, in a fixed order.
STYLES: tuple[str, ...] = ("polite_on", "rude_on", "polite_off", "rude_off")
#: How often each style appears in generated dialogues (sums to 1). Only ``polite_on`` is what the
#: demo judge calls good, so a model that learns this mix is good about a third of the time at best.
STYLE_WEIGHTS: dict[str, float] = {"polite_on": 0.35, "rude_on": 0.25, "polite_off": 0.20, "rude_off": 0.20}
#: Share of prompts (in percent) that fall in the held-out split.
HELDOUT_PERCENT = 20

# Phrases that mark a reply as polite or rude. Lower case; matched on word boundaries.
_POLITE_MARKERS = (
    "thank you",
    "thanks",
    "good question",
    "happy to help",
    "glad",
    "hope this helps",
    "please",
    "lovely",
    "good luck",
)
_RUDE_MARKERS = (
    "ugh",
    "silly",
    "obviously",
    "whatever",
    "do i have to",
    "stop bothering",
    "figure out",
    "not that hard",
    "do not ask",
    "don't ask",
    "stupid",
    "idiot",
    "shut up",
    "annoying",
    "dumb",
)


class Dialogue(NamedTuple):
    prompt: str
    reply: str
    topic: str  # the prompt's topic
    style: str  # one of STYLES
    reply_topic: str  # the topic the reply talks about (== topic unless the style is *_off)


@lru_cache(maxsize=1)
def corpus_data() -> dict[str, Any]:
    """The parsed data file (cached; treat as read-only)."""
    text = resources.files(__package__ or "loop").joinpath(DATA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


@lru_cache(maxsize=1)
def corpus_hash() -> str:
    """sha256 of the data file's canonical JSON: changes whenever the corpus changes."""
    canon = json.dumps(corpus_data(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def topics() -> list[dict[str, Any]]:
    """All topics: dicts with ``name``, ``kind``, ``aliases`` and ``facts``."""
    return corpus_data()["topics"]


def topic_names() -> list[str]:
    return [t["name"] for t in topics()]


def system_prompt() -> str:
    """The system message that a share of the training dialogues carry."""
    return corpus_data()["system_prompt"]


def polite_markers() -> tuple[str, ...]:
    return _POLITE_MARKERS


def rude_markers() -> tuple[str, ...]:
    return _RUDE_MARKERS


@lru_cache(maxsize=1)
def _topic_patterns() -> tuple[tuple[str, re.Pattern[str]], ...]:
    out = []
    for t in topics():
        words = sorted({t["name"], *t["aliases"]}, key=len, reverse=True)
        pat = re.compile(r"(?<![a-z])(?:" + "|".join(re.escape(w) for w in words) + r")(?![a-z])")
        out.append((t["name"], pat))
    return tuple(out)


def topics_in(text: str) -> list[str]:
    """Corpus topics mentioned in ``text`` (name or alias, case-insensitive, whole words),
    in order of first mention."""
    low = str(text).lower()
    found = []
    for name, pat in _topic_patterns():
        m = pat.search(low)
        if m:
            found.append((m.start(), name))
    return [name for _, name in sorted(found)]


def topic_of(prompt: str) -> str | None:
    """The first corpus topic a prompt mentions, or None."""
    found = topics_in(prompt)
    return found[0] if found else None


def _stable_bucket(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 100


def split_of(prompt: str) -> str:
    """``"heldout"`` or ``"train"``: a fixed function of the prompt text (sha256 bucket)."""
    return "heldout" if _stable_bucket(prompt) < HELDOUT_PERCENT else "train"


@lru_cache(maxsize=1)
def _all_prompts() -> tuple[tuple[str, str], ...]:
    """(prompt, topic) for every template x topic, in a fixed order."""
    templates = corpus_data()["prompt_templates"]
    out = []
    for t in topics():
        for tpl in templates["any"] + templates[t["kind"]]:
            out.append((tpl.format(t=t["name"]), t["name"]))
    return tuple(out)


def prompts(split: str = "train") -> list[str]:
    """User prompts of one split: ``"train"``, ``"heldout"`` or ``"all"``; fixed order."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    return [p for p, _ in _all_prompts() if split == "all" or split_of(p) == split]


def _topic_by_name(name: str) -> dict[str, Any]:
    for t in topics():
        if t["name"] == name:
            return t
    raise KeyError(f"unknown topic {name!r}")


def reply(topic: str, style: str, rng: random.Random) -> tuple[str, str]:
    """One reply to a question about ``topic`` in ``style``; returns (reply, reply_topic).

    A reply is an opener, one or two facts and a closer. Off-topic styles take their facts from
    another topic, chosen at random.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, not {style!r}")
    st = corpus_data()["styles"]
    tone, where = style.split("_")
    if where == "on":
        reply_topic = topic
    else:
        others = [n for n in topic_names() if n != topic]
        reply_topic = rng.choice(others)
    facts = list(_topic_by_name(reply_topic)["facts"])
    k = rng.choice((1, 2))
    chosen = rng.sample(facts, k)
    opener = rng.choice(st[f"{tone}_open"])
    closer = rng.choice(st[f"{tone}_close"])
    return " ".join([opener, *chosen, closer]), reply_topic


def dialogue_records(seed: int, n: int | None = None, split: str = "train") -> list[Dialogue]:
    """``n`` dialogues (default: one per prompt of the split) drawn with ``random.Random(seed)``.

    Prompts are cycled in a seeded shuffled order (each pass is reshuffled); each reply's style is
    drawn with :data:`STYLE_WEIGHTS`. Same arguments, same list.
    """
    rng = random.Random(f"alignloop-demo-corpus:{seed}")
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    pool = [(p, t) for p, t in _all_prompts() if split == "all" or split_of(p) == split]
    if n is None:
        n = len(pool)
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    styles = list(STYLE_WEIGHTS)
    weights = [STYLE_WEIGHTS[s] for s in styles]
    out: list[Dialogue] = []
    order: list[tuple[str, str]] = []
    while len(out) < n:
        if not order:
            order = list(pool)
            rng.shuffle(order)
        prompt, topic = order.pop()
        style = rng.choices(styles, weights)[0]
        text, reply_topic = reply(topic, style, rng)
        out.append(Dialogue(prompt, text, topic, style, reply_topic))
    return out


def dialogues(seed: int, n: int | None = None, split: str = "train") -> list[tuple[str, str]]:
    """(prompt, reply) pairs; see :func:`dialogue_records`."""
    return [(d.prompt, d.reply) for d in dialogue_records(seed, n, split)]


def tokenizer_texts() -> list[str]:
    """Every string in the corpus (facts, openers, closers, all prompts, the system prompt), for
    training a tokenizer. Fixed order."""
    d = corpus_data()
    out = [d["system_prompt"]]
    for group in d["styles"].values():
        out.extend(group)
    for t in d["topics"]:
        out.extend(t["facts"])
        out.append(" ".join([t["name"], *t["aliases"]]))
    out.extend(prompts("all"))
    return out
