"""Several engines behind one gateway, the logic: least-loaded choice, a promotion on every replica
or none, a replica's sync when it (re)joins, and external servers that are down, slow or not vLLM.

The servers here are small HTTP servers speaking the few routes of vLLM's API that this logic
uses (a stand-in for a unit test, on real sockets); the real engines are in
tests/test_replicas_e2e.py."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loop import config as configuration
from loop.serving.engine import ExternalEngine, Replica
from loop.serving.replicas import Replicas
from loop.serving.router import Router
from loop.serving.versions import Versions, VersionError
from tests.serving import free_port


class FakeVLLM:
    """/health, /v1/models and runtime adapter loads, as vLLM answers them; `refuse` makes loads
    fail with 400, `slow_s` delays every answer, `models` False answers /v1/models with 404 HTML;
    `port` 0 takes a free port."""

    def __init__(self, refuse: bool = False, slow_s: float = 0.0, base: str = "base", models: bool = True,
                 port: int = 0) -> None:
        self.adapters: dict[str, str] = {}
        self.refuse, self.slow_s, self.base, self.models = refuse, slow_s, base, models
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: object, content_type: str = "application/json") -> None:
                time.sleep(fake.slow_s)
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    self._send(200, "")
                elif self.path == "/v1/models" and fake.models:
                    ids = [fake.base, *fake.adapters]
                    self._send(200, {"object": "list", "data": [{"id": i, "object": "model"} for i in ids]})
                else:
                    self._send(404, "<html>not found</html>", "text/html")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/v1/load_lora_adapter":
                    if fake.refuse or body["lora_name"] in fake.adapters:
                        self._send(400, {"error": {"message": "cannot load", "code": 400}})
                    else:
                        fake.adapters[body["lora_name"]] = body["lora_path"]
                        self._send(200, "Success")
                elif self.path == "/v1/unload_lora_adapter":
                    fake.adapters.pop(body["lora_name"], None)
                    self._send(200, "Success")
                else:
                    self._send(404, {"error": {"message": "no route"}})

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fakes():
    made: list[FakeVLLM] = []

    def make(**kwargs) -> FakeVLLM:
        made.append(FakeVLLM(**kwargs))
        return made[-1]

    yield make
    for f in made:
        f.close()


def replica(name: str, fake: FakeVLLM | None, ready: bool = True) -> Replica:
    r = ExternalEngine(name, fake.url if fake else f"http://127.0.0.1:{free_port()}", None, "base")
    if ready:
        r.ready.set()
    return r


def system(store, *members: Replica) -> tuple[Versions, Router]:
    router = Router("alignloop", "base")
    versions = Versions(store, router, Replicas(list(members)))
    versions._restored = True  # the table starts as the base alone
    return versions, router


def test_the_least_loaded_ready_replica_is_picked_and_ties_take_turns():
    a, b, c = (replica(n, None) for n in "abc")
    c.ready.clear()
    pool = Replicas([a, b, c])
    assert {pool.pick().name for _ in range(4)} == {"a", "b"}  # ties in turn, never the one out
    a.in_flight = 3
    assert all(pool.pick() is b for _ in range(5))
    assert pool.pick(exclude=(b,)) is a
    b.ready.clear()
    a.ready.clear()
    assert pool.pick() is None and not pool.any_ready()


def test_a_promotion_loads_on_every_replica_and_one_refusal_changes_nothing(store, fakes):
    good, refusing = fakes(), fakes(refuse=True)
    v1 = store.add_version("/adapters/v1", "dpo")["id"]
    versions, router = system(store, replica("a", good), replica("b", fakes()))
    versions.promote(v1)
    assert router.routes.serving == v1
    name = router.routes.engine_names[v1]
    assert name in good.adapters

    v2 = store.add_version("/adapters/v2", "dpo")["id"]
    versions, router = system(store, replica("a", good), replica("b", refusing))
    before = router.routes
    with pytest.raises(VersionError, match="replica b could not load.*nothing changed"):
        versions.promote(v2)
    assert router.routes == before and store.serving("alignloop")[0] == v1
    assert not [n for n in good.adapters if n.startswith("v2-")]  # unloaded again where it had loaded


def test_an_adapter_is_unloaded_only_once_no_request_holds_it(store, fakes, monkeypatch):
    import loop.serving.versions as versions_module

    monkeypatch.setattr(versions_module, "RETIRE_GRACE_S", 0.0)
    fake = fakes()
    v1, v2, v3 = (store.add_version(f"/adapters/v{i}", "dpo")["id"] for i in (1, 2, 3))
    versions, router = system(store, replica("a", fake))
    versions.promote(v1)
    old = router.routes.engine_names[v1]
    router.hold(old)  # a request that resolved v1 is still being answered
    versions.promote(v2)
    versions.promote(v3)  # v1 is neither serving nor previous now
    assert v1 not in router.routes.engine_names  # no new request can resolve it
    time.sleep(0.6)
    assert old in fake.adapters  # but the one in flight keeps it loaded
    router.release(old)
    deadline = time.monotonic() + 5
    while old in fake.adapters and time.monotonic() < deadline:
        time.sleep(0.1)
    assert old not in fake.adapters and set(fake.adapters) == {router.routes.engine_names[v] for v in (v2, v3)}


def test_a_replica_that_does_not_answer_leaves_rotation_and_the_promotion_goes_on(store, fakes):
    up = fakes()
    v1 = store.add_version("/adapters/v1", "dpo")["id"]
    gone = replica("gone", None)  # nothing listens at its port
    versions, router = system(store, replica("a", up), gone)
    versions.promote(v1)
    assert router.routes.serving == v1 and not gone.ready.is_set() and "not answering" in gone.problem
    down = replica("down", None)
    versions, router = system(store, down)
    with pytest.raises(VersionError, match="no engine replica answered"):
        versions.promote(store.add_version("/adapters/v2", "dpo")["id"])


def test_a_rejoining_replica_gets_the_route_table_before_it_takes_traffic(store, fakes):
    first, second = fakes(), fakes()
    v1, v2 = store.add_version("/adapters/v1", "dpo")["id"], store.add_version("/adapters/v2", "dpo")["id"]
    a, b = replica("a", first), replica("b", second, ready=False)
    versions, router = system(store, a, b)
    versions.promote(v1)
    versions.promote(v2)
    second.adapters["v9-abcdef"] = "/old"  # left from before it went away; unloaded elsewhere since
    second.adapters["someone-elses"] = "/x"
    assert versions.sync(b)
    assert set(router.routes.engine_names.values()) - {""} <= set(second.adapters)
    assert "v9-abcdef" not in second.adapters and "someone-elses" in second.adapters


def test_a_replica_that_cannot_load_a_routed_adapter_stays_out_unless_it_is_the_only_one(store, fakes):
    v1 = store.add_version("/adapters/v1", "dpo")["id"]
    a, b = replica("a", fakes()), replica("b", fakes(refuse=True), ready=False)
    versions, router = system(store, a, b)
    versions.promote(v1)
    assert not versions.sync(b) and "cannot load versions [1]" in b.problem
    a.ready.clear()  # now b is all there is: it serves the base rather than nothing
    assert versions.sync(b)
    assert router.routes.serving == 0 and v1 not in router.routes.engine_names


def test_the_first_replica_ready_restores_serving_from_the_store(store, fakes):
    fake = fakes()
    v1, v2 = store.add_version("/adapters/v1", "dpo")["id"], store.add_version("/adapters/v2", "dpo")["id"]
    store.record_promotion("alignloop", v1, 0, "test", None)
    store.record_promotion("alignloop", v2, v1, "test", None)
    router = Router("alignloop", "base")
    a = replica("a", fake, ready=False)
    versions = Versions(store, router, Replicas([a]))
    assert versions.sync(a)
    assert (router.routes.serving, router.routes.previous) == (v2, v1) and len(fake.adapters) == 2


@pytest.mark.parametrize("kind", ["down", "slow", "not vllm", "other model"])
def test_an_external_server_that_is_down_slow_or_not_vllm_never_takes_traffic(fakes, kind):
    fake = {"down": None, "slow": lambda: fakes(slow_s=2.5), "not vllm": lambda: fakes(models=False),
            "other model": lambda: fakes(base="Qwen2-0.5B")}[kind]
    r = replica("x", fake() if fake else None, ready=False)
    r.on_ready = lambda _: True
    r.start()
    try:
        time.sleep(1.5 if kind != "slow" else 3.5)
        assert not r.ready.is_set()
        assert {"down": "not answering", "slow": "longer than", "not vllm": "not a vLLM server",
                "other model": "not the base model"}[kind] in r.problem
    finally:
        r.stop()


def test_an_external_server_that_goes_away_leaves_rotation_and_rejoins_synced(store, fakes):
    fake = fakes()
    port = int(fake.url.rsplit(":", 1)[1])
    v1 = store.add_version("/adapters/v1", "dpo")["id"]
    router = Router("alignloop", "base")
    ext = ExternalEngine("ext", fake.url, None, "base")
    versions = Versions(store, router, Replicas([ext]))
    ext.on_ready = versions.sync
    ext.start()
    try:
        ext.wait_ready(10)
        versions.promote(v1)
        fake.close()
        deadline = time.monotonic() + 10
        while ext.ready.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not ext.ready.is_set() and ext.restarts == 1
        # the same address, a server that lost its adapters (closing a served socket without
        # shutdown() left its accept loop spinning a core for the rest of the suite)
        back = fakes(port=port)
        ext.wait_ready(10)
        assert router.routes.engine_names[v1] in back.adapters and router.routes.serving == v1
    finally:
        ext.stop()


def test_no_replica_ready_is_503_with_retry_after(tmp_path):
    from fastapi.testclient import TestClient

    from loop.serving.server import build

    cfg = configuration.load(None, [f"data.dir={tmp_path}", "engine.replicas=0",
                                    f"engine.external=http://127.0.0.1:{free_port()}"])
    app, gw = build(cfg)
    gw.replicas.start()
    try:
        with TestClient(app) as client:
            time.sleep(1.0)
            r = client.post("/v1/chat/completions", json={"model": "alignloop", "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 503 and r.headers["Retry-After"]
            assert r.json()["error"]["code"] == "engine_unavailable"
            token = cfg.admin_token_path.read_text().strip()
            status = client.get("/api/status", headers={"Authorization": f"Bearer {token}"}).json()
            assert status["engine"] == {**status["engine"], "ready": False, "replicas_ready": 0, "replicas": 1}
            assert "not answering" in status["replicas"][0]["problem"]
            assert 'alignloop_replica_up{replica="external-0"} 0.0' in client.get("/metrics").text
    finally:
        gw.replicas.stop()
        gw.store.close()


def test_cpu_replicas_share_out_the_cores():
    from loop.serving.replicas import cpu_shares

    assert cpu_shares([0, 1], 2) == ["0", "1"]
    assert cpu_shares([0, 1, 2, 3, 4], 2) == ["0,1", "2,3"]
    assert cpu_shares([0, 1], 3) == ["0", "1", "0"]
    assert cpu_shares([4, 5, 6, 7], 1) == ["4,5,6,7"]


def test_engine_settings_are_checked():
    for bad, match in [("engine.replicas=-1", "at least 0"), ("engine.replicas=0", "no engine"),
                       ("engine.external=ftp://x", "not an http"), ("engine.devices=\"0\"", "1 groups for 2")]:
        extra = ["engine.replicas=2"] if "devices" in bad else []
        with pytest.raises(configuration.ConfigError, match=match):
            configuration.load(None, [*extra, bad])
    cfg = configuration.load(None, ["engine.replicas=2", 'engine.devices="0,1;2,3"',
                                    'engine.external="http://a:8000/ http://b:8000"'])
    assert cfg.engine.device_groups() == ["0,1", "2,3"]
    assert cfg.engine.external_urls() == ["http://a:8000", "http://b:8000"]
    pool = Replicas.from_config(cfg, "base")
    assert [(m.name, m.url) for m in pool.members] == [
        ("local-0", f"http://127.0.0.1:{cfg.engine.port}"), ("local-1", f"http://127.0.0.1:{cfg.engine.port + 1}"),
        ("external-0", "http://a:8000"), ("external-1", "http://b:8000")]
    assert pool.members[1].devices == "2,3"
