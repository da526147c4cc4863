"""The second, real-shaped base model (`loop.demo.qwen`: a tiny Qwen2 in the layout of Qwen2.5-Instruct)
and LoRA targets found from the model. Tiny builds only: seconds. The loop runs on the default build
in `tests/test_loop_e2e.py`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loop.config import TrainConfig
from loop.demo.qwen import CHAT_TEMPLATE, DEFAULT_SYSTEM, ENDOFTEXT, IM_END, IM_START, SHAPE, ensure_qwen_model

LLAMA_QWEN_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def read(model_dir: Path, name: str) -> dict:
    return json.loads((model_dir / name).read_text())


def test_layout_is_that_of_a_hugging_face_chat_model(tiny_qwen_model):
    names = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja")
    for name in names:
        assert (tiny_qwen_model / name).is_file(), name
    conf, gen, tcfg = (read(tiny_qwen_model, n) for n in ("config.json", "generation_config.json",
                                                            "tokenizer_config.json"))
    assert conf["architectures"] == ["Qwen2ForCausalLM"] and conf["model_type"] == "qwen2"
    assert conf["tie_word_embeddings"] is True
    assert conf["num_key_value_heads"] < conf["num_attention_heads"]  # grouped-query attention
    assert conf["hidden_size"] // conf["num_attention_heads"] in (32, 64)  # vLLM CPU's head sizes
    tok = json.loads((tiny_qwen_model / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    n_tokens = max(ids.values()) + 1
    assert conf["vocab_size"] > n_tokens  # padded embedding: some ids have no token, as in Qwen2.5
    assert conf["eos_token_id"] == ids[IM_END]
    # several EOS ids, pad != the tokenizer's EOS, sampling defaults vLLM applies
    assert gen["eos_token_id"] == [ids[IM_END], ids[ENDOFTEXT]]
    assert gen["pad_token_id"] == ids[ENDOFTEXT] != ids[IM_END]
    assert gen["top_k"] == 20 and gen["repetition_penalty"] > 1
    assert tcfg["tokenizer_class"] == "Qwen2Tokenizer" and tcfg["bos_token"] is None
    assert (tcfg["eos_token"], tcfg["pad_token"]) == (IM_END, ENDOFTEXT)
    assert tcfg["chat_template"] == CHAT_TEMPLATE == (tiny_qwen_model / "chat_template.jinja").read_text()
    # the special tokens come after the learned vocabulary
    assert sorted(ids.values()) == [n_tokens - 3, n_tokens - 2, n_tokens - 1]
    assert read(tiny_qwen_model, "alignloop_demo.json")["shape"] == SHAPE


def test_tokenizer_and_chat_template(tiny_qwen_model):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen_model)
    assert type(tok).__name__.startswith("Qwen2Tokenizer")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (None, IM_END, ENDOFTEXT)
    assert tok("basil")["input_ids"] == tok("basil", add_special_tokens=False)["input_ids"]  # no BOS added
    text = "Héllo 🌱 basil!\n\nwater"
    assert tok.decode(tok(text)["input_ids"]) == text
    for special in (ENDOFTEXT, IM_START, IM_END):
        assert len(tok(special)["input_ids"]) == 1

    msgs = [{"role": "user", "content": "How do I grow basil?"},
            {"role": "assistant", "content": "Basil loves sun."}]
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert full == (f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n{IM_START}user\nHow do I grow basil?{IM_END}\n"
                    f"{IM_START}assistant\nBasil loves sun.{IM_END}\n")
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(f"{IM_START}assistant\n") and full.startswith(prompt)
    ids_full, ids_prompt = tok(full)["input_ids"], tok(prompt)["input_ids"]
    assert ids_full[: len(ids_prompt)] == ids_prompt  # TRL splits prompt and completion on this prefix
    own = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, msgs[0]], tokenize=False)
    assert own.startswith(f"{IM_START}system\nBe brief.{IM_END}\n") and DEFAULT_SYSTEM not in own
    # tool calls and tool results, as OpenAI clients send them
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]}
    tools = tok.apply_chat_template([msgs[0], call, {"role": "tool", "content": "sunny"}], tokenize=False,
                                    add_generation_prompt=True)
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in tools
    assert f"{IM_START}user\n<tool_response>\nsunny\n</tool_response>{IM_END}" in tools

    conf = AutoConfig.from_pretrained(tiny_qwen_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_model)
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert list(model.generation_config.eos_token_id) == tok.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    assert conf.vocab_size > len(tok)


def test_ensure_reuses_the_build_and_the_demo_does_not_take_it(tiny_qwen_model, monkeypatch):
    from loop.demo import model as demo_model

    cfg = demo_model.DemoModelConfig.from_dict(demo_model.demo_info(tiny_qwen_model)["config"])
    stamp = (tiny_qwen_model / "model.safetensors").stat().st_mtime_ns
    assert ensure_qwen_model(tiny_qwen_model, cfg, progress=False) == tiny_qwen_model
    assert (tiny_qwen_model / "model.safetensors").stat().st_mtime_ns == stamp
    # same config and corpus, other shape: the Llama demo's ensure rebuilds instead of taking it
    rebuilt = []
    monkeypatch.setattr(demo_model, "build_demo_model", lambda out, cfg, progress: rebuilt.append(out) or out)
    demo_model.ensure_demo_model(tiny_qwen_model, cfg, progress=False)
    assert rebuilt == [tiny_qwen_model]


# ------------------------------------------------------------------------------------------------
# LoRA targets from the model


def test_lora_targets_are_the_block_linears_of_either_model(tiny_model, tiny_qwen_model):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from loop.training.toolkit import lora_config, lora_targets

    for path in (tiny_model, tiny_qwen_model):
        causal = AutoModelForCausalLM.from_pretrained(path)
        assert lora_targets(causal) == LLAMA_QWEN_TARGETS
        lora = lora_config(TrainConfig(), causal)  # the default: auto
        assert sorted(lora.target_modules) == LLAMA_QWEN_TARGETS and "lm_head" not in lora.target_modules
        # the reward model's classifier: same blocks, never the score head
        classifier = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        assert lora_targets(classifier) == LLAMA_QWEN_TARGETS


def test_explicit_targets_are_checked_against_the_model(tiny_qwen_model):
    from transformers import AutoModelForCausalLM

    from loop.training.toolkit import lora_config, target_modules

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_model)
    assert target_modules(TrainConfig(target_modules="q_proj, v_proj"), model) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="c_attn not in Qwen2ForCausalLM.*q_proj"):
        lora_config(TrainConfig(target_modules="q_proj,c_attn"), model)
    with pytest.raises(ValueError, match="needs the model"):
        lora_config(TrainConfig())
    with pytest.raises(ValueError, match="cannot be combined"):
        target_modules(TrainConfig(target_modules="auto,q_proj"), model)


def test_policy_sampling_ignores_the_models_sampling_defaults(tiny_qwen_model):
    """generation_config.json's top_k 20 / top_p 0.8 / repetition penalty must not leak into PPO
    rollouts or the KL estimate (they would sample another distribution than the one they score):
    with `policy_sampling` the model samples as if it had no defaults at all."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from loop.training.toolkit import policy_sampling

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_model)
    tok = AutoTokenizer.from_pretrained(tiny_qwen_model)
    assert model.generation_config.top_k == 20 and model.generation_config.repetition_penalty > 1
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in ("How do I grow basil?", "Why is my mint sad?", "When do I pick tomatoes?")]
    enc = tok(texts, return_tensors="pt", padding=True)

    def sample(**kwargs):
        torch.manual_seed(0)
        return model.generate(**enc, max_new_tokens=32, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                              **kwargs)

    with_defaults = sample(**policy_sampling(1.0))
    old_style = sample(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)  # leaves the repetition penalty on
    model.generation_config = GenerationConfig()  # a model without sampling defaults
    plain = sample(**policy_sampling(1.0))
    assert torch.equal(with_defaults, plain)
    assert not torch.equal(old_style, plain)


def test_check_model_passes_both_models_and_names_what_a_directory_lacks(tiny_model, tiny_qwen_model, tmp_path,
                                                                         capsys):
    import shutil

    from ops.check_model import main as check

    tiny = str(write_config(tmp_path, "engine.max_model_len = 256"))  # the tiny models have 256 positions
    assert check([str(tiny_qwen_model), "--no-vllm", "--config", tiny]) == 0
    assert check([str(tiny_model), "--no-vllm", "--config", tiny]) == 0
    capsys.readouterr()
    broken = shutil.copytree(tiny_qwen_model, tmp_path / "broken")
    (broken / "chat_template.jinja").unlink()
    conf = read(broken, "tokenizer_config.json")
    conf.pop("chat_template")
    conf["pad_token"] = None
    (broken / "tokenizer_config.json").write_text(json.dumps(conf))
    assert check([str(broken), "--no-vllm", "--config", str(write_config(tmp_path, "train.lora_r = 16"))]) == 1
    out = capsys.readouterr().out
    assert "FAIL  no chat template" in out and "FAIL  no pad token" in out
    assert "FAIL  train.lora_r 16 > engine.max_lora_rank 8" in out


def write_config(tmp_path: Path, line: str) -> Path:
    section, setting = line.split(".", 1)
    path = tmp_path / "alignloop.toml"
    path.write_text(f"[{section}]\n{setting}\n")
    return path
