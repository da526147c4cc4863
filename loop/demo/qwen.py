"""A second embedded base model, shaped like the Hugging Face chat models users bring: a tiny
Qwen2 (``Qwen2ForCausalLM``) saved in the layout Qwen2.5-Instruct repositories ship, trained on
the demo corpus with the demo model's training loop (:mod:`loop.demo.pretrain`).

What makes it "real-shaped" (each is something the loop has to get right for a model it did not
build itself):

- ChatML: ``<|im_start|>role\\n...<|im_end|>\\n``, with a default system message the template
  inserts when the conversation has none, tool-call and tool-message support (Qwen2.5's template,
  default system text shortened), saved both as ``chat_template.jinja`` and in
  ``tokenizer_config.json``.
- Special tokens after the BPE vocabulary (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``), no
  BOS token added by the tokenizer, ``tokenizer_class: Qwen2Tokenizer`` with Qwen's pre-tokenizer
  (NFC, its split regex, byte level).
- EOS ``<|im_end|>`` in the tokenizer and ``config.json``; pad ``<|endoftext|>`` (pad != EOS);
  ``generation_config.json`` lists two EOS ids ``[<|im_end|>, <|endoftext|>]`` and carries Qwen's
  sampling defaults (temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05), which vLLM
  applies to every request that does not set them.
- Grouped-query attention (half as many key/value heads as query heads), biases on q/k/v, tied
  input/output embeddings, and an embedding matrix padded past the tokenizer's length (Qwen2.5's
  151936 rows for 151665 tokens), so some ids have no token.

``build_qwen_model(out_dir, DemoModelConfig.tiny())`` builds in seconds; the default config takes
about as long as the demo model (same corpus, steps and width). ``python -m loop.demo.qwen --out
DIR`` builds and prints the same report as ``python -m loop.demo.model``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from loop.demo import corpus as demo_corpus
from loop.demo.model import (
    INFO_FILE,
    INFO_FORMAT,
    _prepare_target,
    staging,
    _versions,
    is_complete_build,
)
from loop.demo.model import main as model_cli
from loop.demo.pretrain import encode_training_set, torch_threads, train
from loop.sections import DemoModelConfig

__all__ = [
    "SHAPE",
    "ENDOFTEXT",
    "IM_START",
    "IM_END",
    "DEFAULT_SYSTEM",
    "CHAT_TEMPLATE",
    "GENERATION_DEFAULTS",
    "build_qwen_model",
    "ensure_qwen_model",
    "main",
]

SHAPE = "qwen2-chatml"  # alignloop_demo.json "shape"; the Llama demo model has none (or "llama-demo")
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # appended after the BPE vocabulary, in this order
DEFAULT_SYSTEM = "You are a helpful assistant."
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
VOCAB_PAD_TO = 128  # the embedding has rows up to the next multiple of this past the tokenizer (unused ids)
# the sampling defaults of Qwen2.5-Instruct's generation_config.json (its repetition penalty is 1.05-1.1 by size)
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}

# Qwen2.5-Instruct's template, with Qwen2-Instruct's default system text.
CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


# ----------------------------------------------------------------------------------------------
# tokenizer and model


def train_tokenizer(cfg: DemoModelConfig):
    """Byte-level BPE on the corpus with Qwen2's normaliser and pre-tokenizer; the three special
    tokens come after the learned vocabulary, as in Qwen's (ids ``len(bpe)``, ``+1``, ``+2``)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # the ChatML scaffolding is in every training sequence: let BPE learn it like corpus words
    scaffold = [f"system\n{DEFAULT_SYSTEM}\n", "user\n", "assistant\n"] * 200
    tok.train_from_iterator(demo_corpus.tokenizer_texts() * 4 + scaffold, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        model_max_length=cfg.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def padded_vocab(n_tokens: int) -> int:
    """Rows of the embedding: past the tokenizer's length, to the next multiple of VOCAB_PAD_TO."""
    return (n_tokens // VOCAB_PAD_TO + 1) * VOCAB_PAD_TO


def make_model(tok, cfg: DemoModelConfig):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kv_heads = cfg.num_heads // 2 if cfg.num_heads % 2 == 0 else cfg.num_heads
    endoftext, im_end = tok.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    mcfg = Qwen2Config(
        vocab_size=padded_vocab(len(tok)),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        max_window_layers=cfg.num_layers,
        use_sliding_window=False,
        sliding_window=None,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        bos_token_id=endoftext,  # as Qwen2.5-Instruct's config.json; the tokenizer adds no BOS
        eos_token_id=im_end,
        use_cache=True,
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(mcfg)
    model.to(torch.float32)
    return model


# ----------------------------------------------------------------------------------------------
# building


def build_qwen_model(out_dir: str | os.PathLike[str], cfg: DemoModelConfig | None = None,
                     progress: bool = True) -> Path:
    """Train the tokenizer and the Qwen2-shaped model on the demo corpus and save them as a Hugging
    Face model directory laid out like Qwen2.5-Instruct's:

        config.json  generation_config.json  model.safetensors  tokenizer.json  tokenizer_config.json
        chat_template.jinja  alignloop_demo.json

    Written beside ``out_dir`` and renamed into place (see ``loop.demo.model.build_demo_model``).
    Same seed, config, machine and thread count: byte-identical weights."""
    cfg = cfg or DemoModelConfig()
    out = Path(out_dir).expanduser().resolve()
    _prepare_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    import torch
    from transformers import GenerationConfig

    with torch_threads(cfg.num_threads) as threads, torch.random.fork_rng(devices=[]):
        tok = train_tokenizer(cfg)
        data = encode_training_set(tok, cfg)
        model = make_model(tok, cfg)
        n_params = sum(p.numel() for p in model.parameters())
        final_loss = train(model, data, tok.pad_token_id, cfg, progress)
        endoftext, im_end = tok.convert_tokens_to_ids([ENDOFTEXT, IM_END])

        with staging(out) as tmp:
            model.generation_config = GenerationConfig(
                bos_token_id=endoftext, pad_token_id=endoftext, eos_token_id=[im_end, endoftext],
                **GENERATION_DEFAULTS,
            )
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            _qwen_tokenizer_config(tmp)
            info = {
                "format": INFO_FORMAT,
                "shape": SHAPE,
                "config": cfg.to_dict(),
                "corpus_sha256": demo_corpus.corpus_hash(),
                "param_count": n_params,
                "vocab_size": len(tok),
                "embedding_rows": model.config.vocab_size,
                "head_dim": cfg.head_dim,
                "num_key_value_heads": model.config.num_key_value_heads,
                "final_train_loss": round(final_loss, 4),
                "train_examples": len(data),
                "torch_threads": threads,
                "build_seconds": round(time.perf_counter() - t0, 2),
                "special_tokens": {"eos": IM_END, "pad": ENDOFTEXT, "im_start": IM_START,
                                   "generation_eos_ids": [im_end, endoftext]},
                "versions": _versions(),
            }
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def _qwen_tokenizer_config(model_dir: Path) -> None:
    """tokenizer_config.json as Qwen2.5 repositories have it: the Qwen2Tokenizer class, no BOS, the
    added tokens listed, and the chat template inline as well as in chat_template.jinja."""
    path = model_dir / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data.update(
        tokenizer_class="Qwen2Tokenizer",
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        add_bos_token=False,
        add_prefix_space=False,
        errors="replace",
        split_special_tokens=False,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        added_tokens_decoder={
            str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in tok["added_tokens"]
        },
    )
    data.pop("backend", None)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


def ensure_qwen_model(out_dir: str | os.PathLike[str], cfg: DemoModelConfig | None = None,
                      progress: bool = True) -> Path:
    """``out_dir`` if it holds a complete build of ``cfg`` on the current corpus, else a new build."""
    cfg = cfg or DemoModelConfig()
    out = Path(out_dir).expanduser().resolve()
    return out if is_complete_build(out, cfg, shape=SHAPE) else build_qwen_model(out, cfg, progress=progress)


def main(argv: Sequence[str] | None = None) -> int:
    return model_cli(argv, build=build_qwen_model, prog="python -m loop.demo.qwen")


if __name__ == "__main__":
    sys.exit(main())
