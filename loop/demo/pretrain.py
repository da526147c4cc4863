"""How the demo model learns: its tokenizer (byte-level BPE on the corpus, with the chat special
tokens) and a small Llama trained on chat-formatted dialogues, loss on the assistant turn.
`loop.demo.model.build_demo_model` calls these and writes the model directory.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from typing import Iterator

from loop.demo import corpus as demo_corpus
from loop.sections import DemoModelConfig

BOS_TOKEN = "<|begin|>"
EOS_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS)  # ids 0..5, in this order

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Only system, user and assistant roles are supported, not ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)



@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[int]:
    import torch

    old = torch.get_num_threads()
    want = n or min(os.cpu_count() or 1, 8)
    torch.set_num_threads(want)
    try:
        yield want
    finally:
        torch.set_num_threads(old)


def train_tokenizer(cfg: DemoModelConfig):
    """Byte-level BPE on the corpus strings, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = demo_corpus.tokenizer_texts()
    # a few copies of the prompts and replies so their words are frequent enough to merge
    tok.train_from_iterator(texts * 4, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),  # transformers 5 stores these as extra_special_tokens
        model_max_length=cfg.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def chat_messages(prompt: str, reply: str | None, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": prompt})
    if reply is not None:
        msgs.append({"role": "assistant", "content": reply})
    return msgs


def encode_training_set(tok, cfg: DemoModelConfig) -> list[tuple[list[int], int]]:
    """(token ids, index of the first assistant-content token) per training dialogue."""
    n = cfg.steps * cfg.batch_size
    records = demo_corpus.dialogue_records(cfg.seed, n, split="train")
    rng = random.Random(f"alignloop-demo-system:{cfg.seed}")
    system = demo_corpus.system_prompt()
    prompt_len: dict[tuple[str, bool], int] = {}
    texts, starts = [], []
    for d in records:
        with_sys = rng.random() < cfg.system_prompt_share
        key = (d.prompt, with_sys)
        if key not in prompt_len:
            ptxt = tok.apply_chat_template(
                chat_messages(d.prompt, None, system if with_sys else None), tokenize=False, add_generation_prompt=True
            )
            prompt_len[key] = len(tok(ptxt, add_special_tokens=False)["input_ids"])
        msgs = chat_messages(d.prompt, d.reply, system if with_sys else None)
        texts.append(tok.apply_chat_template(msgs, tokenize=False))
        starts.append(prompt_len[key])
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return [(x[: cfg.max_seq_len], s) for x, s in zip(ids, starts)]


def _lr_at(step: int, cfg: DemoModelConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps - 1)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def make_model(tok, cfg: DemoModelConfig):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    mcfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attention_bias=False,
        mlp_bias=False,
        use_cache=True,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(mcfg)
    model.to(torch.float32)
    return model


def train(model, data: list[tuple[list[int], int]], pad_id: int, cfg: DemoModelConfig, progress: bool) -> float:
    import torch
    from tqdm.auto import tqdm

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    model.train()
    ema = None
    bar = tqdm(range(cfg.steps), desc="demo model", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = data[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        width = max(len(x) for x, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (x, start) in enumerate(batch):
            t = torch.tensor(x, dtype=torch.long)
            ids[i, : len(x)] = t
            mask[i, : len(x)] = 1
            labels[i, start : len(x)] = t[start:]
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss = float(out.loss.detach())
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        if progress and (step % 10 == 0 or step == cfg.steps - 1):
            bar.set_postfix(loss=f"{ema:.3f}")
    bar.close()
    model.eval()
    return float(ema if ema is not None else float("nan"))
