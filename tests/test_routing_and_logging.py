"""Logic around the engine, without it: routing, request checks, the batched log writer."""

import random
import threading

import pytest
from pydantic import ValidationError

from loop.serving.log_writer import LogWriter
from loop.serving.protocol import ChatRequest, FeedbackRequest, validation_message
from loop.serving.router import Router, UnknownModel
from store.database import Exchange, SecondResponse


def test_alias_routes_to_serving_and_names_route_directly():
    router = Router("alignloop", "base")
    assert router.resolve("alignloop") == (0, "base")
    router.update(serving=3, previous=0, engine_names={0: "", 3: "v3-abc"}, version_names={"base": 0, "v3": 3})
    assert router.resolve("alignloop") == (3, "v3-abc")
    assert router.resolve("v3") == (3, "v3-abc") and router.resolve("base") == (0, "base")
    assert router.names() == ["alignloop", "base", "v3"]
    with pytest.raises(UnknownModel):
        router.resolve("v4")


def test_canary_takes_its_share_of_the_alias_only():
    router = Router("alignloop", "base", rng=random.Random(0))
    router.update(engine_names={0: "", 2: "v2-x"}, version_names={"base": 0, "v2": 2}, canary=2, canary_share=0.25)
    picks = [router.resolve("alignloop")[0] for _ in range(4000)]
    assert 0.22 < picks.count(2) / len(picks) < 0.28
    assert {router.resolve("base")[0] for _ in range(100)} == {0}


def test_a_swap_is_all_or_nothing_for_concurrent_readers():
    router = Router("alignloop", "base")
    tables = [dict(serving=v, engine_names={0: "", v: f"v{v}-x"}, version_names={"base": 0, f"v{v}": v})
              for v in range(1, 50)]
    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            version, name = router.resolve("alignloop")
            seen.append((version, name))

    t = threading.Thread(target=read)
    t.start()
    for table in tables:
        router.update(**table)
    stop.set()
    t.join()
    assert all(name == ("base" if v == 0 else f"v{v}-x") for v, name in seen)


@pytest.mark.parametrize("body, field", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m", "messages": [{"role": "user", "content": ["x"]}]}, "messages.0.content"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}, "max_tokens"),
])
def test_chat_request_errors_name_the_field(body, field):
    with pytest.raises(ValidationError) as err:
        ChatRequest.model_validate(body)
    message, param = validation_message(err.value)
    assert param == field and field in message


def test_unknown_fields_pass_through_to_the_engine():
    req = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                      "top_k": 5, "temperature": 0.5, "seed": 1})
    assert req.sampling() == {"n": 1, "temperature": 0.5, "seed": 1}
    assert req.model_extra == {"top_k": 5}


def test_feedback_request_rejects_unknown_fields():
    with pytest.raises(ValidationError):
        FeedbackRequest.model_validate({"id": "x", "thumbs": "up", "stars": 5})


def _exchange(i: int) -> Exchange:
    return Exchange(request_id=f"req-{i}", endpoint="chat.completions", model_requested="alignloop", version_id=0,
                    messages=[{"role": "user", "content": f"q{i}"}], choices=[(f"answer {i}", "stop")],
                    sampling={"temperature": 0.7}, latency_ms=5.0, prompt_tokens=3, completion_tokens=2)


def test_writer_logs_batches_and_makes_pairs(store):
    writer = LogWriter(store, flush_ms=20)
    for i in range(50):
        writer.put(_exchange(i))
    writer.put(SecondResponse(request_id="req-3", text="another answer", version_id=0, sampling={}))
    writer.put(SecondResponse(request_id="req-4", text="answer 4", version_id=0, sampling={}))  # same text: no pair
    writer.put(SecondResponse(request_id="req-unknown", text="x", version_id=0, sampling={}))
    assert writer.flush()
    writer.stop()
    counts = store.counts()
    assert (counts["exchanges"], counts["pairs"], counts["responses"]) == (50, 1, 51)
    assert store.response_id("req-7", 0) is not None and store.response_id("req-7", 1) is None


def test_writer_stop_writes_everything_queued(store):
    writer = LogWriter(store, flush_ms=60_000)  # would never flush by itself in this test
    for i in range(10):
        writer.put(_exchange(i))
    writer.stop()
    assert store.counts()["exchanges"] == 10


def test_a_flush_writes_at_once_without_waiting_out_the_window(store):
    """Feedback on an answer still queued asks for it: it must not wait for the next batch."""
    writer = LogWriter(store, flush_ms=60_000)
    writer.put(_exchange(1))
    assert writer.flush(timeout=5)  # the window is a minute: only the wake-up can write it in time
    assert store.response_id("req-1", 0) is not None and writer.depth == 0
    writer.put(_exchange(2))  # and the writer goes on waiting out its window after
    assert store.response_id("req-2", 0) is None
    writer.stop()
    assert store.response_id("req-2", 0) is not None


def test_a_full_queue_drops_and_counts_instead_of_blocking(store):
    writer = LogWriter(store, flush_ms=60_000, max_queue=5)
    accepted = [writer.put(_exchange(i)) for i in range(8)]
    assert accepted.count(True) == 5 and writer.dropped == 3
    writer.stop()
    assert store.counts()["exchanges"] == 5


def test_a_bad_record_loses_only_itself_and_logging_goes_on(store, capsys):
    writer = LogWriter(store, flush_ms=60_000)
    writer.put(_exchange(1))
    writer.put(_exchange(1))  # same request id twice: the batch fails on the unique key
    writer.put(_exchange(2))
    writer.flush(timeout=0.01)
    writer.stop()
    assert writer.failures == 1 and writer.written == 2
    assert store.response_id("req-1", 0) is not None and store.response_id("req-2", 0) is not None
    assert "could not log Exchange req-1" in capsys.readouterr().err
