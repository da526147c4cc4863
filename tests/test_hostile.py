"""Hostile and unauthorized input gets a clear 4xx and harms nothing: body limits, finite numbers,
roles, rate limits, who may label what, and files only their owner can read.

These run against the real gateway app served by uvicorn over a real DuckDB file, with no engine
(none of these requests may reach one); tests/test_probe.py sends the same kind of input to a
whole `alignloop serve` with its vLLM engine.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import httpx
import pytest

from loop.serving.limits import too_deep
from loop.serving.rate_limit import RateLimiter, retry_after
from tests.serving import free_port
from tests.ui_gateway import running


def _client(url: str, token: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=30)


def test_too_deep_counts_nesting_outside_strings():
    assert not too_deep(b'{"a": [1, 2, {"b": []}]}', 4)
    assert too_deep(b'{"a": [1, 2, {"b": []}]}', 3)
    assert not too_deep(b'{"text": "[[[[[[[[{{{{{{{{ \\" [[[["}', 2)  # brackets in strings do not count
    assert too_deep(b"[" * 100_000 + b"]" * 100_000, 32)
    assert not too_deep(b"[1]" * 1000, 1)  # many brackets, shallow


def test_a_wrong_number_is_named_once_by_its_field():
    """A number field typed float-or-int answered 'temperature.float: ...; temperature.int: ...' with
    param 'temperature.float'."""
    from loop.serving.protocol import ChatRequest, HTTPProblem, parse

    chat = {"model": "alignloop", "messages": [{"role": "user", "content": "hi"}]}
    for field, bad in (("temperature", "hot"), ("top_p", True), ("temperature", [1])):
        with pytest.raises(HTTPProblem) as refused:
            parse(ChatRequest, {**chat, field: bad})
        assert (refused.value.message, refused.value.param) == (f"{field}: Input should be a valid number", field)
    assert parse(ChatRequest, {**chat, "temperature": 1, "top_p": 0.5}).temperature == 1  # an int is a number


def test_rate_limiter_allows_a_burst_then_the_average_rate():
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.wait_s("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait_s("k") == pytest.approx(0.5)
    assert limiter.wait_s("other") == 0.0  # every caller has its own bucket
    now[0] = 0.5
    assert limiter.wait_s("k") == 0.0 and limiter.wait_s("k") > 0
    assert RateLimiter(rate=0, burst=1).wait_s("k") == 0.0  # 0: no limit
    assert retry_after(0.01) == "1" and retry_after(2.2) == "3"


def test_bodies_that_are_too_big_not_json_or_too_deep_get_a_clear_4xx(tmp_path):
    with running(tmp_path, pairs=2, settings=["gateway.max_body_kb=64"]) as gateway:
        admin = _client(gateway.url, gateway.admin_token)
        big = {"text": "x" * 70_000}
        r = admin.put("/api/guidelines", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"text": "'
            for _ in range(80):
                yield b"x" * 1000
            yield b'"}'
        r = admin.put("/api/guidelines", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413

        # a "simple" cross-site request: text/plain is not JSON, whatever it holds
        r = httpx.post(f"{gateway.url}/v1/feedback", content=json.dumps({"id": "x", "thumbs": "up"}),
                       headers={"content-type": "text/plain"})
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
        assert admin.post("/api/users", content=b"name=x", headers={"content-type": "application/x-www-form-urlencoded"}
                          ).status_code == 415
        deep = b'{"model": "alignloop", "messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
        r = httpx.post(f"{gateway.url}/v1/chat/completions", content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "deeper" in r.json()["error"]["message"]
        # a body-less POST needs no content type
        assert admin.post("/api/users/admin/token").status_code == 200


@pytest.mark.parametrize("body", [
    {"pair_id": 10**40, "choice": "first"},
    {"pair_id": -1, "choice": "first"},
    {"pair_id": "1", "choice": "first", "seconds": float("inf")},
    {"pair_id": 1, "choice": "first", "seconds": float("nan")},
    {"pair_id": 1, "choice": "first", "seconds": 1e999},
    {"pair_id": [1], "choice": "first"},
    {"pair_id": 1, "choice": "\u202efirst"},
])
def test_numbers_out_of_range_and_wrong_types_are_400(tmp_path, body):
    with running(tmp_path, pairs=2) as gateway:
        labeller = _client(gateway.url, gateway.add_user("ann"))
        raw = json.dumps(body)  # Python writes inf and nan as JSON's Infinity and NaN
        r = labeller.post("/api/label", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert gateway.labels("ann") == []


def test_references_that_are_no_version_are_404_not_500(tmp_path):
    with running(tmp_path, pairs=1) as gateway:
        admin = _client(gateway.url, gateway.admin_token)
        for ref in ("²", "9" * 40, "v999", "%00"):
            r = admin.post(f"/api/versions/{ref}/status", json={"status": "retired"})
            assert r.status_code == 404, (ref, r.text)
        for version in ("²", 10**40, -5):
            assert admin.post("/api/promote", json={"version": version}).status_code in (400, 404)
        assert admin.post("/api/runs/99999999999999999999999/heartbeat", json={"metrics": []}).status_code in (400, 404, 409)


def test_a_version_whose_adapter_is_not_there_is_refused_and_registers_nothing(tmp_path):
    """`versions --add` of a folder that does not exist, or holds no adapter, made a candidate that
    could only fail later, in the engine's log."""
    empty, config_only, adapter = (tmp_path / name for name in ("empty", "config-only", "adapter"))
    for folder in (empty, config_only, adapter):
        folder.mkdir()
    (config_only / "adapter_config.json").write_text("{}")
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with running(tmp_path / "store", pairs=1) as gateway:
        admin = _client(gateway.url, gateway.admin_token)
        for path, why in ((tmp_path / "nowhere", "not a directory"), (empty, "no adapter_config.json"),
                          (config_only, "no adapter_model.safetensors"), ("\x00", "not a directory")):
            r = admin.post("/api/versions", json={"adapter_path": str(path), "method": "dpo"})
            assert r.status_code == 400 and why in r.json()["error"]["message"], (path, r.text)
            assert r.json()["error"]["param"] == "adapter_path"
        assert [v["name"] for v in admin.get("/api/versions").json()] == ["base"]
        r = admin.post("/api/versions", json={"adapter_path": str(adapter), "method": "dpo"})
        assert r.status_code == 200 and r.json()["name"] == "v1"


def test_an_internal_error_tells_the_caller_nothing_of_the_code(tmp_path, capsys):
    with running(tmp_path, pairs=1) as gateway:
        def boom():
            raise RuntimeError("secret path /root/x")
        gateway.gw.status = boom
        r = _client(gateway.url, gateway.admin_token).get("/api/status")
        assert r.status_code == 500 and "secret" not in r.text and "internal error" in r.json()["error"]["message"]


def test_requests_the_gateway_refuses_are_counted_in_metrics_by_status(tmp_path):
    """Only the requests the engine answered were counted, so a client sending nothing but bad
    requests looked like no traffic at all."""
    from prometheus_client.parser import text_string_to_metric_families

    hello = {"model": "alignloop", "messages": [{"role": "user", "content": "hi"}]}
    with running(tmp_path, pairs=1, settings=["gateway.max_body_kb=64"]) as gateway:
        c = _client(gateway.url)
        sent = [c.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}),
                c.post("/v1/chat/completions", json={**hello, "max_tokens": "many"}),
                c.post("/v1/chat/completions", json={**hello, "model": "nope"}),
                c.post("/v1/completions", content=b"x", headers={"Content-Type": "text/plain"}),
                c.post("/v1/completions", json={"model": "alignloop", "prompt": "x" * 70_000}),
                c.post("/v1/chat/completions", json=hello)]  # no engine here: 503
        assert [r.status_code for r in sent] == [400, 400, 404, 415, 413, 503]
        counted = {(s.labels["endpoint"], s.labels["status"]): s.value
                   for family in text_string_to_metric_families(c.get("/metrics").text)
                   for s in family.samples if s.name == "alignloop_requests_total"}
        assert counted == {("chat.completions", "400"): 2, ("chat.completions", "404"): 1,
                           ("completions", "415"): 1, ("completions", "413"): 1, ("chat.completions", "503"): 1}


def test_roles_apps_call_v1_only_and_labellers_no_admin_data(tmp_path):
    with running(tmp_path, pairs=2) as gateway:
        app = _client(gateway.url, gateway.add_user("shop", "app"))
        assert app.get("/api/me").status_code == 403
        assert app.get("/api/label/next").status_code == 403
        assert app.get("/v1/models").status_code == 200
        labeller = _client(gateway.url, gateway.add_user("ann"))
        for method, path in (("GET", "/api/status"), ("GET", "/api/runs"), ("POST", "/api/rollback"),
                             ("GET", "/api/openapi.json"), ("POST", "/api/users/ann/exclude")):
            assert labeller.request(method, path).status_code == 403, path
        gateway.gw.runs.start("dpo", "manual", {"secret": "/data/snap"})
        stats = labeller.get("/api/stats").json()
        assert stats["runs"] and "config" not in stats["runs"][0]
        assert "config" in _client(gateway.url, gateway.admin_token).get("/api/stats").json()["runs"][0]
        # the schema and the docs are not public by default
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert httpx.get(f"{gateway.url}{path}").status_code == 404
        schema = _client(gateway.url, gateway.admin_token).get("/api/openapi.json")
        assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]


def test_feedback_needs_a_key_unless_anonymous_feedback_is_on(tmp_path):
    with running(tmp_path, pairs=1) as gateway:
        r = httpx.post(f"{gateway.url}/v1/feedback", json={"id": "chatcmpl-x", "thumbs": "up"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        made_up = _client(gateway.url, "sk-made-up").post("/v1/feedback", json={"id": "chatcmpl-x", "thumbs": "up"})
        assert made_up.status_code == 401
        keyed = _client(gateway.url, gateway.add_user("shop", "app"))
        assert keyed.post("/v1/feedback", json={"id": "chatcmpl-x", "thumbs": "up"}).status_code == 404  # no such answer
    with running(tmp_path / "open", pairs=1, settings=["gateway.anonymous_feedback=true"]) as gateway:
        assert httpx.post(f"{gateway.url}/v1/feedback", json={"id": "chatcmpl-x", "thumbs": "up"}).status_code == 404


def test_a_caller_over_its_rate_gets_429_with_retry_after_and_others_go_on(tmp_path):
    with running(tmp_path, pairs=1, settings=["gateway.rate_limit_per_s=0.5", "gateway.rate_burst=3"]) as gateway:
        one, two = (_client(gateway.url, gateway.add_user(n, "app")) for n in ("one", "two"))
        codes = [one.post("/v1/feedback", json={"id": "x", "thumbs": "up"}).status_code for _ in range(4)]
        assert codes == [404, 404, 404, 429]
        r = one.post("/v1/feedback", json={"id": "x", "thumbs": "up"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert two.post("/v1/feedback", json={"id": "x", "thumbs": "up"}).status_code == 404
        # made-up keys share their address's bucket: a fresh key buys no fresh allowance
        anon = [_client(gateway.url, f"sk-{i}").post("/v1/chat/completions", json={}).status_code for i in range(5)]
        assert anon[-1] == 429


def test_a_labeller_labels_only_pairs_handed_to_them(tmp_path):
    with running(tmp_path, pairs=3) as gateway:
        ann = _client(gateway.url, gateway.add_user("ann"))
        given = ann.get("/api/label/next").json()["pair"]["pair_id"]
        other = next(i for i in gateway.gw.store.pair_ids() if i != given)
        r = ann.post("/api/label", json={"pair_id": other, "choice": "first"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_leased"
        assert ann.post("/api/label", json={"pair_id": given, "choice": "first"}).status_code == 200
        assert [pair for pair, *_ in gateway.labels("ann")] == [given]


def test_exclude_a_user_through_the_api(tmp_path):
    with running(tmp_path, pairs=1) as gateway:
        gateway.add_user("spammer", "app")
        admin = _client(gateway.url, gateway.admin_token)
        r = admin.post("/api/users/spammer/exclude", json={"excluded": True})
        assert r.status_code == 200 and r.json()["excluded_at"]
        assert admin.post("/api/users/nobody/exclude", json={}).status_code == 404
        ann = _client(gateway.url, gateway.add_user("ann"))
        pair = ann.get("/api/label/next").json()["pair"]["pair_id"]
        assert ann.post("/api/label", json={"pair_id": pair, "choice": "skip"}).status_code == 200
        assert ann.get("/api/users").status_code == 403  # admins only
        users = {u["name"]: u for u in admin.get("/api/users").json()}
        assert users["spammer"]["excluded_at"] and users["spammer"]["role"] == "app"
        assert (users["ann"]["labels"], users["ann"]["skips"], users["ann"]["excluded_at"]) == (0, 1, None)
        assert users["ann"]["last_label_at"]


def test_the_data_folder_and_the_store_are_the_owners_alone(tmp_path):
    config = tmp_path / "alignloop.toml"
    # a port of its own: the CLI goes through whatever gateway answers on the configured one (a
    # developer's `make up` on 8000 made this test's `user add` fail)
    subprocess.run([sys.executable, "-m", "loop.cli", "--config", str(config), "--set", "data.dir=data",
                    "--set", f"gateway.port={free_port()}", "init"], check=True, capture_output=True, cwd=tmp_path)
    data = tmp_path / "data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert [stat.S_IMODE(p.stat().st_mode) for p in data.glob("*.duckdb")] == [0o600]
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    out = subprocess.run([sys.executable, "-m", "loop.cli", "--config", str(config), "user", "add", "shop", "--role", "app"],
                         check=True, capture_output=True, text=True, cwd=tmp_path)
    assert "API key" in out.stdout
    os.chmod(data, 0o755)  # as an older version left it: the next start closes it again
    subprocess.run([sys.executable, "-m", "loop.cli", "--config", str(config), "exclude", "--user", "shop"],
                   check=True, capture_output=True, cwd=tmp_path)
    out = subprocess.run([sys.executable, "-m", "loop.cli", "--config", str(config), "user", "list"],
                         check=True, capture_output=True, text=True, cwd=tmp_path)
    shop = next(line.split() for line in out.stdout.splitlines() if line.startswith("shop "))
    assert shop[:5] == ["shop", "app", "0", "0", "0"] and shop[-1] != "-"  # no labels, skips or feedback; excluded
    subprocess.run([sys.executable, "-m", "loop.cli", "--config", str(config), "init"], check=True,
                   capture_output=True, cwd=tmp_path)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
