"""The demo judge's rule, on hand-written examples and on the corpus itself."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loop.demo import corpus as demo_corpus

from loop.demo import judge

P = "How do I grow basil?"
POLITE_ON = "Thank you for asking! Basil loves warm sun. I hope this helps."
RUDE_ON = "Ugh, fine. Basil loves warm sun. Figure out the rest yourself."
POLITE_OFF = "Good question! Cook pasta in a big pot of salted water. Have a lovely day!"
RUDE_OFF = "Whatever. Cook pasta in a big pot of salted water. Now stop bothering me."


def test_scores_of_the_four_styles():
    assert judge.score(P, POLITE_ON) == 2.0
    assert judge.score(P, RUDE_ON) == 1.0
    assert judge.score(P, POLITE_OFF) == 1.0
    assert judge.score(P, RUDE_OFF) == 0.0
    assert judge.is_good(P, POLITE_ON)
    assert not any(judge.is_good(P, r) for r in (RUDE_ON, POLITE_OFF, RUDE_OFF))
    assert judge.MAX_SCORE == 2.0


def test_verdict_parts():
    assert judge.verdict(P, RUDE_ON) == {"on_topic": True, "polite": False, "score": 1.0, "good": False}
    assert judge.verdict(P, POLITE_OFF) == {"on_topic": False, "polite": True, "score": 1.0, "good": False}


def test_prefer():
    assert judge.prefer(P, POLITE_ON, RUDE_ON) == "a"
    assert judge.prefer(P, RUDE_OFF, POLITE_OFF) == "b"
    assert judge.prefer(P, RUDE_ON, POLITE_OFF) == "tie"
    assert judge.prefer(P, POLITE_ON, POLITE_ON) == "tie"
    assert judge.prefer(P, RUDE_OFF, "") == "tie"


def test_on_topic_needs_the_prompt_topic_and_no_other():
    assert judge.on_topic(P, "basil is nice")
    assert judge.on_topic(P, "BASIL!")  # any case
    assert not judge.on_topic(P, "Basil and mint are nice.")  # another corpus topic
    assert not judge.on_topic(P, "basilisk")  # whole words only
    assert judge.on_topic("Tell me about tomatoes.", "A tomato likes sun.")  # alias
    assert judge.on_topic("Compare basil and mint.", "Basil and mint both like water.")
    assert not judge.on_topic("Compare basil and mint.", "Basil and thyme both like water.")


def test_polite_needs_a_polite_marker_and_no_rude_one():
    assert judge.polite("Thanks!")
    assert judge.polite("please water it")
    assert not judge.polite("Basil loves warm sun.")  # neutral is not polite
    assert not judge.polite("Thank you, you idiot.")
    assert not judge.polite("Good question! Obviously, water it.")
    assert not judge.polite("Thankfully it grows")  # whole words only
    assert judge.polite("THANK   YOU")


def test_prompt_without_corpus_topic_uses_shared_content_words():
    prompt = "How do I fix my bicycle chain?"
    assert judge.on_topic(prompt, "Oil the chain and check it. Thank you!")
    assert not judge.on_topic(prompt, "Basil loves warm sun.")
    assert not judge.on_topic(prompt, "Thank you for the question, please ask again.")  # markers/stopwords only
    assert judge.score(prompt, "Please oil the chain.") == 2.0


# Each text with its score as its own prompt, by the rule: none of them names the prompt's topic as a
# whole word or carries a polite marker, so as a reply to P each scores 0; as its own prompt (no corpus
# topic) a text is on-topic only when it has a content word (4+ ASCII letters) to share with itself.
@pytest.mark.parametrize(
    "text, self_score",
    [("", 0.0), ("   ", 0.0), ("\x00\x01garbled\ufffd", 1.0), ("ééé 漢字 🌱", 0.0),
     ("basil" * 1000, 1.0),  # one long word, not "basil": off P's topic, but shares itself
     ("<|end|><|assistant|>", 1.0), (None, 0.0), (12345, 0.0)],
)
def test_arbitrary_text_is_safe(text, self_score):
    assert judge.score(P, text) == 0.0
    assert judge.prefer(P, text, POLITE_ON) == "b"
    assert judge.prefer(P, POLITE_ON, text) == "a"
    assert judge.is_good(P, text) is False
    assert judge.score(text, text) == self_score


def test_empty_reply_scores_zero():
    assert judge.score(P, "") == 0.0
    assert judge.score("", "") == 0.0


def test_judge_agrees_with_corpus_style_labels():
    for d in demo_corpus.dialogue_records(seed=123, n=3000, split="all"):
        v = judge.verdict(d.prompt, d.reply)
        assert v["on_topic"] == d.style.endswith("_on"), d
        assert v["polite"] == d.style.startswith("polite_"), d
        assert v["good"] == (d.style == "polite_on"), d


def test_rule_is_written_down():
    assert "on-topic" in judge.RULE and "polite" in judge.RULE
    assert "tie" in (judge.__doc__ or "") and "on-topic" in (judge.__doc__ or "")


def test_judge_does_not_import_torch():
    code = "import sys, loop.demo.judge; sys.exit(1 if 'torch' in sys.modules else 0)"
    subprocess.run([sys.executable, "-c", code], check=True)
