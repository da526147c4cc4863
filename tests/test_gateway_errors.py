"""Failures the gateway survives without a client seeing them are counted, not swallowed: in
`/api/status` and `/metrics`. An existing user is a 409 its callers can tell from other errors."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from loop.client import GatewayClient, GatewayError
from loop.serving.pair_maker import PairJob, PairMaker
from loop.serving.router import Router
from tests.ui_gateway import running


def test_a_failed_second_answer_is_counted_and_live_traffic_goes_on():
    async def engine_down(path, body):
        raise ConnectionRefusedError("engine down")

    made = []
    maker = PairMaker(Router("alignloop", "base"), engine_down, made.append, in_flight=lambda: 0, share=1.0)

    async def one() -> None:
        worker = asyncio.create_task(maker.run())
        maker.offer(PairJob("chatcmpl-1", [{"role": "user", "content": "hi"}], 0, 8))
        await asyncio.wait_for(maker.queue.join(), 5)
        worker.cancel()

    asyncio.run(one())
    assert (maker.failed, made) == (1, [])


def test_a_second_answer_being_made_is_still_pending():
    """`pair_queue` in status (what `simulate` waits on before it reports the pairs made, and what a
    ranking that follows relies on) counts the job the worker is answering, not only the queued."""
    release, emitted = asyncio.Event(), []

    async def slow_engine(path, body):
        await release.wait()
        return {"choices": [{"message": {"content": "a second answer"}, "finish_reason": "stop"}]}

    maker = PairMaker(Router("alignloop", "base"), slow_engine, emitted.append, in_flight=lambda: 0, share=1.0)

    async def one() -> list[int]:
        worker = asyncio.create_task(maker.run())
        maker.offer(PairJob("chatcmpl-1", [{"role": "user", "content": "hi"}], 0, 8))
        seen = [maker.pending]
        await asyncio.sleep(0.05)  # the worker has taken the job off the queue and waits on the engine
        seen += [maker.queue.qsize(), maker.pending, len(emitted)]
        release.set()
        await asyncio.wait_for(maker.queue.join(), 5)
        worker.cancel()
        return seen + [maker.pending, len(emitted)]

    assert asyncio.run(one()) == [1, 0, 1, 0, 0, 1]


def test_status_and_metrics_show_the_counted_failures(tmp_path):
    with running(tmp_path, pairs=1) as gateway:
        gateway.gw.pairs.failed = 3  # as three failed second answers would leave it
        gateway.gw.monitor.failures = 2  # as two checks that could not read the store would
        admin = GatewayClient(gateway.url, gateway.admin_token)
        status = admin.call("GET", "/api/status")
        assert status["errors"] == {"pair_maker": 3, "pair_queue_full": 0, "log_dropped": 0, "adapter_unload": 0,
                                    "monitor": 2}
        assert status["methods"] == ["dpo", "ppo", "kto"]
        metrics = httpx.get(f"{gateway.url}/metrics").text
        assert 'alignloop_background_errors{where="pair_maker"} 3.0' in metrics
        assert 'alignloop_background_errors{where="monitor"} 2.0' in metrics
        assert "alignloop_automatic_rollbacks 0.0" in metrics and "alignloop_monitor_watching_version -1.0" in metrics


def test_an_existing_user_is_a_409_and_user_token_rotates_it(tmp_path):
    with running(tmp_path, pairs=1) as gateway:
        admin = GatewayClient(gateway.url, gateway.admin_token)
        first = admin.user_token("ana", "labeller")
        with pytest.raises(GatewayError, match="exists") as exists:
            admin.call("POST", "/api/users", json={"name": "ana", "role": "labeller"})
        assert exists.value.status == 409
        second = admin.user_token("ana", "labeller")
        assert second != first
        assert GatewayClient(gateway.url, second).call("GET", "/api/me")["name"] == "ana"
        with pytest.raises(GatewayError) as old:
            GatewayClient(gateway.url, first).call("GET", "/api/me")
        assert old.value.status == 401


def test_up_prints_the_same_demo_tokens_after_a_restart_while_they_work(tmp_path):
    """Every `up` used to issue the demo users new tokens, signing out everyone who used the old ones."""
    import stat

    from loop.up import demo_tokens

    kept = tmp_path / "demo-tokens.json"
    with running(tmp_path / "store", pairs=1) as gateway:
        admin = GatewayClient(gateway.url, gateway.admin_token)
        first = demo_tokens(admin, kept)
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        assert demo_tokens(admin, kept) == first  # a restart: the same tokens, still working
        assert GatewayClient(gateway.url, first[1]).call("GET", "/api/me")["name"] == "demo-labeller"
        admin.call("POST", "/api/users/demo-labeller/token")  # an admin replaced it: a new one, kept
        again = demo_tokens(admin, kept)
        assert again[0] == first[0] and again[1] != first[1]
        assert GatewayClient(gateway.url, again[1]).signs_in(again[1], "demo-labeller")
        kept.write_text("{not json")  # a broken file: new tokens, nothing raised
        fresh = demo_tokens(admin, kept)
        assert fresh[0] != first[0] and admin.signs_in(fresh[0], "demo-admin")
        assert not admin.signs_in("not-a-token", "demo-admin")


def test_an_engine_refusal_keeps_its_message_in_the_gateways_shape():
    from loop.serving.protocol import ErrorBody, engine_refusal

    vllm = b'{"error": {"message": "bad top_k", "type": "BadRequestError", "param": "top_k", "code": 400}}'
    for body in (vllm, b'{"message": "old shape", "type": "BadRequestError", "param": null, "code": 400}',
                 b"<html>not json</html>", b'{"error": "a string"}', b"[]"):
        p = engine_refusal(400, body)
        ErrorBody.model_validate_json(p.response().body)  # what the OpenAPI schema promises
        assert p.status == 400 and p.message and p.code is None
    assert (engine_refusal(400, vllm).message, engine_refusal(400, vllm).param) == ("bad top_k", "top_k")
    assert "not json" in engine_refusal(400, b"<html>not json</html>").message
    assert engine_refusal(400, vllm).type == "invalid_request_error"  # OpenAI's type, not vLLM's class name
    tools = (b'{"error": {"message": "\\"auto\\" tool choice requires --enable-auto-tool-choice and '
             b'--tool-call-parser to be set", "type": "BadRequestError", "param": null, "code": 400}}')
    p = engine_refusal(400, tools)  # advice for whoever starts vLLM, not for the caller
    assert "--tool-call-parser" not in p.message and "does not call tools" in p.message and p.param == "tools"
