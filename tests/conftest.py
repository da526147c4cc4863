"""Shared fixtures: a fresh store per test, the shipped sample data, one tiny model and one default
demo model per session."""

from pathlib import Path

import pytest

from store import Store

DATA = Path(__file__).parent / "data"


@pytest.fixture
def store():
    with Store(":memory:") as s:
        yield s


@pytest.fixture
def hh_sample() -> Path:
    """24 real HH-RLHF harmless-base test pairs (MIT licence), 8 of them multi-turn."""
    return DATA / "hh_sample.jsonl"


@pytest.fixture
def bad_rows() -> Path:
    """Nine JSONL lines, two of them good; each other line is broken in its own way."""
    return DATA / "bad_rows.jsonl"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The demo model's tiny variant (same code path as the real one), built once per session."""
    from loop.demo.model import DemoModelConfig, build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("tiny-model"), DemoModelConfig.tiny(), progress=False)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    """The default demo model, as `alignloop up` builds it (minutes on 2 cores), built once per session
    for every test that needs a model the demo rule can tell apart from its candidates."""
    from loop.demo.model import DemoModelConfig, build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo-model") / "demo", DemoModelConfig(), progress=False)


@pytest.fixture(scope="session")
def tiny_qwen_model(tmp_path_factory) -> Path:
    """The Qwen2-shaped chat model (`loop.demo.qwen`), tiny: ChatML, two EOS ids, pad != EOS, tied
    embeddings, grouped-query attention. Built once per session, in seconds."""
    from loop.demo.qwen import build_qwen_model
    from loop.sections import DemoModelConfig

    # ChatML adds a default system turn: longer sequences than the demo's, so a longer cut-off
    cfg = DemoModelConfig.tiny(max_seq_len=128)
    return build_qwen_model(tmp_path_factory.mktemp("tiny-qwen") / "model", cfg, progress=False)
