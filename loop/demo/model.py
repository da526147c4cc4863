"""The embedded demo base model: a tiny Llama trained on CPU from :mod:`loop.demo.corpus`.

``build_demo_model(out_dir, DemoModelConfig())`` trains a byte-level BPE tokenizer on the corpus,
trains a small ``LlamaForCausalLM`` on chat-formatted dialogues (loss on the assistant turn, its
closing ``<|end|>`` included) and writes a normal Hugging Face model directory that transformers,
TRL, PEFT and vLLM load:

    config.json  generation_config.json  model.safetensors
    tokenizer.json  tokenizer_config.json  (chat_template.jinja)  alignloop_demo.json

Chat format (no spaces or newlines are added; ``<|end|>`` is the EOS token)::

    <|begin|><|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{reply}<|end|>

With ``add_generation_prompt`` the rendering ends in ``<|assistant|>``. Special tokens:
``<|begin|>`` (BOS, written by the template; the tokenizer never adds it by itself), ``<|end|>``
(EOS), ``<|pad|>`` (PAD), and ``<|system|>``, ``<|user|>``, ``<|assistant|>``.

Same seed and config, same machine and thread count: byte-identical ``model.safetensors``.

Heavy imports (torch, transformers, tokenizers) happen inside the functions, so importing this
module is instant. ``python -m loop.demo.model --out DIR`` builds and prints a report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

from loop.demo import corpus as demo_corpus
from loop.demo.pretrain import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    ROLE_TOKENS,
    chat_messages,
    encode_training_set,
    make_model,
    torch_threads,
    train,
    train_tokenizer,
)
from loop.sections import DemoModelConfig

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "ROLE_TOKENS",
    "CHAT_TEMPLATE",
    "INFO_FILE",
    "DemoModelConfig",
    "build_demo_model",
    "ensure_demo_model",
    "demo_info",
    "load",
    "sample",
    "report",
    "main",
]

INFO_FILE = "alignloop_demo.json"
INFO_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# building


def _prepare_target(out_dir: Path) -> None:
    """Refuse to overwrite a non-empty directory that is not an earlier demo build."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / INFO_FILE).is_file():
            raise FileExistsError(f"{out_dir} is not empty and is not a demo model directory; refusing to overwrite it")


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A fresh directory beside `out` to build in: put in `out`'s place (every file 0644) when the
    block ends, removed when it raises. So `out` is absent, the previous build, or a complete new one."""
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_demo_model(
    out_dir: str | os.PathLike[str], cfg: DemoModelConfig | None = None, progress: bool = True
) -> Path:
    """Train the demo tokenizer and model and save them as a Hugging Face model directory.

    The directory is written next to ``out_dir`` under a temporary name and renamed into place at the
    end, so ``out_dir`` is either absent, the previous build, or a complete new build. An existing
    ``out_dir`` is replaced only if it is empty or an earlier demo build (it holds ``alignloop_demo.json``).
    Returns the resolved ``out_dir``.
    """
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

        with staging(out) as tmp:
            model.generation_config = GenerationConfig(
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
            )
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            _portable_tokenizer_config(tmp / "tokenizer_config.json")
            info = {
                "format": INFO_FORMAT,
                "config": cfg.to_dict(),
                "corpus_sha256": demo_corpus.corpus_hash(),
                "param_count": n_params,
                "vocab_size": len(tok),
                "head_dim": cfg.head_dim,
                "final_train_loss": round(final_loss, 4),
                "train_examples": len(data),
                "torch_threads": threads,
                "build_seconds": round(time.perf_counter() - t0, 2),
                "special_tokens": {
                    "bos": BOS_TOKEN,
                    "eos": EOS_TOKEN,
                    "pad": PAD_TOKEN,
                    "roles": list(ROLE_TOKENS),
                },
                "versions": _versions(),
            }
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def _portable_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class and role tokens the way both transformers 4.x and 5.x read them."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = data.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        data["additional_special_tokens"] = extra
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def demo_info(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``alignloop_demo.json`` of a built demo model, or None."""
    p = Path(model_dir) / INFO_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def ensure_demo_model(
    out_dir: str | os.PathLike[str], cfg: DemoModelConfig | None = None, progress: bool = True
) -> Path:
    """Return ``out_dir`` if it already holds a complete demo build of ``cfg`` and of the current
    corpus; otherwise build it (see :func:`build_demo_model`)."""
    cfg = cfg or DemoModelConfig()
    out = Path(out_dir).expanduser().resolve()
    return out if is_complete_build(out, cfg, shape=None) else build_demo_model(out, cfg, progress=progress)


def is_complete_build(out: Path, cfg: DemoModelConfig, shape: str | None) -> bool:
    """Whether `out` holds a complete build of `cfg`, of this `shape` (None: the demo Llama;
    loop.demo.qwen has its own), on the current corpus."""
    info = demo_info(out)
    return (info is not None
            and info.get("format") == INFO_FORMAT
            and info.get("shape") == shape
            and info.get("config") == cfg.to_dict()
            and info.get("corpus_sha256") == demo_corpus.corpus_hash()
            and all((out / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")))


# ----------------------------------------------------------------------------------------------
# using


_LOADED: dict[tuple[str, int], tuple[Any, Any]] = {}


def load(model_dir: str | os.PathLike[str]):
    """(model, tokenizer) loaded with transformers on CPU, in eval mode; cached per directory build."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir).expanduser().resolve()
    weights = path / "model.safetensors"
    key = (str(path), weights.stat().st_mtime_ns if weights.exists() else 0)
    if key not in _LOADED:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        model.eval()
        _LOADED.clear()
        _LOADED[key] = (model, tok)
    return _LOADED[key]


def sample(
    model_dir: str | os.PathLike[str],
    prompts: Sequence[str],
    n: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    top_p: float = 1.0,
    system: str | None = None,
    batch_size: int = 32,
) -> list[str]:
    """Sample ``n`` replies per prompt with transformers ``generate`` on the chat-formatted prompt.

    Returns ``len(prompts) * n`` strings, prompt-major (all samples of prompt 0, then prompt 1...),
    without special tokens. ``temperature=0`` is greedy. Deterministic for a given seed; the global
    torch RNG is left untouched.
    """
    import torch

    if n < 1:
        raise ValueError(f"n must be >= 1, not {n}")
    model, tok = load(model_dir)
    old_side = tok.padding_side
    tok.padding_side = "left"
    out: list[str] = []
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)
            for i in range(0, len(prompts), batch_size):
                chunk = list(prompts[i : i + batch_size])
                texts = [
                    tok.apply_chat_template(chat_messages(p, None, system), tokenize=False, add_generation_prompt=True)
                    for p in chunk
                ]
                enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                gen_kwargs: dict[str, Any] = dict(
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=n,
                    eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id,
                )
                if temperature > 0:
                    gen_kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
                else:
                    gen_kwargs.update(do_sample=False)
                gen = model.generate(**enc, **gen_kwargs)
                new = gen[:, enc["input_ids"].shape[1] :]
                out.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
    finally:
        tok.padding_side = old_side
    return out


def report(
    model_dir: str | os.PathLike[str],
    n_samples: int = 100,
    split: str = "heldout",
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 64,
) -> dict[str, Any]:
    """Sample one reply for each of ``n_samples`` prompts of ``split`` (cycled) and judge them.

    Returns shares of good / on-topic / polite replies, the mean score and the samples."""
    from loop.demo import judge

    pool = demo_corpus.prompts(split)
    chosen = [pool[i % len(pool)] for i in range(n_samples)]
    replies = sample(model_dir, chosen, n=1, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    verdicts = [judge.verdict(p, r) for p, r in zip(chosen, replies)]
    k = max(1, len(verdicts))
    return {
        "model_dir": str(model_dir),
        "split": split,
        "temperature": temperature,
        "n": len(verdicts),
        "good_share": sum(v["good"] for v in verdicts) / k,
        "on_topic_share": sum(v["on_topic"] for v in verdicts) / k,
        "polite_share": sum(v["polite"] for v in verdicts) / k,
        "mean_score": sum(v["score"] for v in verdicts) / k,
        "samples": [{"prompt": p, "reply": r, **v} for p, r, v in zip(chosen, replies, verdicts)],
    }


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: Sequence[str] | None = None, build=None, prog: str = "python -m loop.demo.model") -> int:
    """Build and/or report on a demo-corpus model (`build`: build_demo_model, or loop.demo.qwen's)."""
    build = build or build_demo_model
    ap = argparse.ArgumentParser(prog=prog, description="Build and/or report on the demo model.")
    ap.add_argument("--out", required=True, help="model directory to build (or to report on with --report-only)")
    ap.add_argument("--tiny", action="store_true", help="use the tiny test configuration")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (0 = automatic)")
    ap.add_argument("--report-only", action="store_true", help="do not build; report on --out")
    ap.add_argument("--samples", type=int, default=100, help="held-out samples to judge")
    ap.add_argument("--show", type=int, default=5, help="sampled answers to print")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    out = Path(args.out)
    if not args.report_only:
        given = (("seed", args.seed), ("steps", args.steps), ("num_threads", args.threads))
        over = {k: v for k, v in given if v is not None}
        cfg = DemoModelConfig.tiny(**over) if args.tiny else DemoModelConfig(**over)
        t0 = time.perf_counter()
        out = build(out, cfg, progress=not args.no_progress)
        print(f"built {out} in {time.perf_counter() - t0:.1f} s")
    info = demo_info(out) or {}
    rows = f" (embedding rows {info['embedding_rows']})" if info.get("embedding_rows") else ""
    print(f"params: {info.get('param_count')}  vocab: {info.get('vocab_size')}{rows}  head_dim: {info.get('head_dim')}")
    print(f"build seconds: {info.get('build_seconds')}  final train loss: {info.get('final_train_loss')}")
    print(f"directory size: {_dir_size(out) / 1e6:.2f} MB")
    if args.samples > 0:
        t0 = time.perf_counter()
        rep = report(out, n_samples=args.samples, temperature=args.temperature)
        for s in rep["samples"][: args.show]:
            mark = "GOOD" if s["good"] else f"score {s['score']:.0f}"
            print(f"- [{mark}] {s['prompt']!r} -> {s['reply']!r}")
        print(
            f"held-out, T={args.temperature}, n={rep['n']}: good {rep['good_share']:.0%}, on-topic "
            f"{rep['on_topic_share']:.0%}, polite {rep['polite_share']:.0%}, mean score {rep['mean_score']:.2f} "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
