"""The demo corpus and the embedded demo base model (tiny configuration; the default one is `slow`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from loop.demo import corpus as demo_corpus

from loop.demo.model import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    INFO_FILE,
    PAD_TOKEN,
    ROLE_TOKENS,
    DemoModelConfig,
    build_demo_model,
    demo_info,
    ensure_demo_model,
    sample,
)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# corpus


def test_prompt_split_is_stable_and_partitions_all_prompts():
    train, held, every = demo_corpus.prompts("train"), demo_corpus.prompts("heldout"), demo_corpus.prompts("all")
    assert len(every) == len(set(every)) == 360
    assert (len(train), len(held)) == (292, 68)
    assert set(train) | set(held) == set(every) and not set(train) & set(held)
    # The split is a fixed function of the prompt text: pinned so that any change is deliberate.
    digest = hashlib.sha256("\n".join(held).encode()).hexdigest()[:16]
    assert digest == HELDOUT_DIGEST, "held-out prompts changed; update HELDOUT_DIGEST only on purpose"
    assert all(demo_corpus.split_of(p) == "heldout" for p in held)
    assert demo_corpus.prompts("train") == train  # same order every call
    with pytest.raises(ValueError):
        demo_corpus.prompts("test")


HELDOUT_DIGEST = "18ca4e543eb36e4c"


def test_split_of_does_not_depend_on_process():
    code = "from loop.demo import corpus as c; print(len(c.prompts('heldout')), c.prompts('heldout')[0])"
    run = [sys.executable, "-c", code]
    outs = {subprocess.run(run, capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert len(outs) == 1


def test_dialogues_are_deterministic_and_use_the_split():
    a = demo_corpus.dialogues(seed=7, n=500)
    assert a == demo_corpus.dialogues(seed=7, n=500)
    assert a != demo_corpus.dialogues(seed=8, n=500)
    train = set(demo_corpus.prompts("train"))
    assert all(p in train for p, _ in a)
    held = set(demo_corpus.prompts("heldout"))
    assert all(p in held for p, _ in demo_corpus.dialogues(seed=7, n=100, split="heldout"))
    assert len(demo_corpus.dialogues(seed=0)) == len(train)  # default: one per prompt


def test_dialogue_styles_follow_the_weights_and_read_as_sentences():
    recs = demo_corpus.dialogue_records(seed=1, n=4000)
    counts = Counter(d.style for d in recs)
    for style, w in demo_corpus.STYLE_WEIGHTS.items():
        assert abs(counts[style] / len(recs) - w) < 0.03, (style, counts)
    assert abs(sum(demo_corpus.STYLE_WEIGHTS.values()) - 1) < 1e-9
    for d in recs[:200]:
        assert d.reply[0].isupper() and d.reply.rstrip()[-1] in ".!?"
        assert (d.reply_topic == d.topic) == d.style.endswith("_on")


def test_topics_and_facts():
    names = demo_corpus.topic_names()
    assert 30 <= len(names) <= 60 and len(set(names)) == len(names)
    for t in demo_corpus.topics():
        assert len(t["facts"]) >= 3
        for fact in t["facts"]:
            assert demo_corpus.topics_in(fact) == [t["name"]], fact  # each fact names its own topic only
    assert demo_corpus.topic_of("How do I grow basil?") == "basil"
    assert demo_corpus.topic_of("My tomato plant is sad") == "tomatoes"
    assert demo_corpus.topic_of("What is the weather?") is None
    assert demo_corpus.topics_in("mint then basil") == ["mint", "basil"]
    assert len(demo_corpus.corpus_hash()) == 64


def test_small_vocabulary():
    words = set()
    for text in demo_corpus.tokenizer_texts():
        words.update(w.strip(".,!?").lower() for w in text.split())
    assert len(words) < 700


# ------------------------------------------------------------------------------------------------
# config


def test_config_fields_have_defaults_and_help():
    for f in dataclasses.fields(DemoModelConfig):
        assert f.default is not dataclasses.MISSING, f.name
        assert f.metadata.get("help"), f.name
    assert set(DemoModelConfig.help()) == {f.name for f in dataclasses.fields(DemoModelConfig)}
    assert DemoModelConfig().head_dim in (32, 64)
    assert DemoModelConfig.tiny().head_dim in (32, 64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_size": 64, "num_heads": 4}, "head_dim"),  # 16: vLLM CPU rejects it
        ({"hidden_size": 100, "num_heads": 3}, "divisible"),
        ({"hidden_size": 256, "num_heads": 2}, "head_dim"),  # 128
        ({"steps": 10, "warmup_steps": 10}, "warmup_steps"),
        ({"max_seq_len": 600}, "max_position_embeddings"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"system_prompt_share": 1.5}, "system_prompt_share"),
        ({"steps": 0}, "steps"),
        ({"num_layers": 2.5}, "integer"),
    ],
)
def test_config_cross_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DemoModelConfig(**kwargs)


def test_config_from_dict():
    cfg = DemoModelConfig.from_dict({"seed": 3, "steps": 100})
    assert cfg.seed == 3 and cfg.steps == 100
    assert DemoModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        DemoModelConfig.from_dict({"sede": 3})


def test_importing_demo_model_is_light():
    heavy = "{'torch', 'transformers', 'tokenizers'}"
    code = f"import sys, loop.demo.model; sys.exit(1 if {heavy} & set(sys.modules) else 0)"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------
# tiny model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("tiny") / "model", DemoModelConfig.tiny(), progress=False)


def test_tiny_build_writes_a_hf_model_directory(tiny_dir):
    names = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    for name in (*names, INFO_FILE):
        assert (tiny_dir / name).is_file(), name
    info = demo_info(tiny_dir)
    assert info["config"] == DemoModelConfig.tiny().to_dict()
    assert info["param_count"] > 0 and info["build_seconds"] > 0
    assert info["corpus_sha256"] == demo_corpus.corpus_hash()
    assert not list(tiny_dir.parent.glob(".*building*"))  # no temporary left behind
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"]


def test_tiny_model_loads_with_auto_classes(tiny_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    conf = AutoConfig.from_pretrained(tiny_dir)
    assert conf.model_type == "llama"
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
    assert head_dim in (32, 64)
    assert conf.hidden_size // conf.num_attention_heads == head_dim
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert conf.max_position_embeddings == DemoModelConfig.tiny().max_position_embeddings
    # any text survives a round trip (byte-level BPE), special tokens are single tokens
    text = "Héllo 🌱 basil!"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    for special in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert tok("basil", add_special_tokens=True)["input_ids"] == tok("basil", add_special_tokens=False)["input_ids"]


def test_chat_template(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert tok.chat_template == CHAT_TEMPLATE
    msgs = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "How do I grow basil?"},
        {"role": "assistant", "content": "Thank you! Basil loves sun."},
    ]
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert full == (
        "<|begin|><|system|>Be kind.<|end|><|user|>How do I grow basil?<|end|>"
        "<|assistant|>Thank you! Basil loves sun.<|end|>"
    )
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>") and full.startswith(prompt)
    ids_full = tok(full, add_special_tokens=False)["input_ids"]
    ids_prompt = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids_full[: len(ids_prompt)] == ids_prompt  # TRL splits prompt/completion on this prefix
    assert ids_full[-1] == tok.eos_token_id and ids_full[0] == tok.bos_token_id
    # the tokenize=True path that TRL uses gives the same ids
    enc = tok.apply_chat_template(msgs, tokenize=True)
    assert list(enc["input_ids"] if hasattr(enc, "keys") else enc) == ids_full
    assert tok.decode(ids_full, skip_special_tokens=True) == "Be kind.How do I grow basil?Thank you! Basil loves sun."
    with pytest.raises(Exception):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_sample_returns_text_deterministically(tiny_dir):
    prompts = demo_corpus.prompts("heldout")[:3]
    import torch

    rng = torch.get_rng_state()
    out = sample(tiny_dir, prompts, n=2, max_new_tokens=12, temperature=1.0, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left as it was
    assert len(out) == 6 and all(isinstance(s, str) for s in out)
    assert any(s for s in out)
    assert out == sample(tiny_dir, prompts, n=2, max_new_tokens=12, temperature=1.0, seed=5)
    assert out != sample(tiny_dir, prompts, n=2, max_new_tokens=12, temperature=1.0, seed=6)  # the seed is used
    # greedy: one answer, and the seed does not matter
    greedy = sample(tiny_dir, prompts[:1], n=1, max_new_tokens=12, temperature=0, seed=1)
    assert len(greedy) == 1 and greedy == sample(tiny_dir, prompts[:1], n=1, max_new_tokens=12, temperature=0, seed=2)


def test_tiny_build_is_deterministic(tiny_dir, tmp_path):
    again = build_demo_model(tmp_path / "again", DemoModelConfig.tiny(), progress=False)
    assert sha256_file(again / "model.safetensors") == sha256_file(tiny_dir / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_seed_changes_the_weights(tiny_dir, tmp_path):
    other = build_demo_model(tmp_path / "other", DemoModelConfig.tiny(seed=1, steps=10, warmup_steps=2), progress=False)
    assert sha256_file(other / "model.safetensors") != sha256_file(tiny_dir / "model.safetensors")


def test_ensure_reuses_a_matching_build_and_rebuilds_otherwise(tmp_path):
    cfg = DemoModelConfig.tiny(steps=8, warmup_steps=1)
    out = ensure_demo_model(tmp_path / "m", cfg, progress=False)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model(out, cfg, progress=False) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    cfg2 = DemoModelConfig.tiny(steps=9, warmup_steps=1)
    ensure_demo_model(out, cfg2, progress=False)
    assert demo_info(out)["config"] == cfg2.to_dict()


def test_build_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_demo_model(tmp_path, DemoModelConfig.tiny(steps=2, warmup_steps=0), progress=False)
    assert (tmp_path / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------
# default model (minutes)


@pytest.mark.slow
def test_default_model_learns_the_styles(demo_model):
    from loop.demo.model import report

    rep = report(demo_model, n_samples=100, split="heldout", temperature=1.0, seed=0)
    assert 0.10 <= rep["good_share"] <= 0.60, rep["good_share"]
    assert rep["on_topic_share"] >= 0.35 and 0.25 <= rep["polite_share"] <= 0.85
    readable = sum(s["reply"].rstrip().endswith((".", "!", "?")) for s in rep["samples"])
    assert readable >= 80
