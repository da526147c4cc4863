"""Two real vLLM CPU engines behind one gateway (`engine.replicas = 2`), under steady load from
eight `openai` clients: promotions and rollbacks fail no request, a replica killed as the OOM
killer would fails only what was in flight on it and rejoins with the promoted adapter, and
stopping the gateway leaves no engine behind. The tests run in file order; the last ones break it."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import openai
import pytest

from loop.vllm_server import group_members
from tests.serving import free_port, free_ports, make_adapter, pid_alive, start

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "How often should I water basil?"}]
CLIENTS = 8


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    s = start(root, tiny_model, free_port(), free_ports(2), ["engine.replicas=2", "gateway.rate_limit_per_s=0",
                                                              "gateway.pair_share=0", "gateway.log_flush_ms=100",
                                                              "monitor.enabled=false"],  # random adapters: it would roll them back
              timeout=600)
    deadline = time.monotonic() + 600
    with s.client() as admin:
        while admin.get("/api/status").json()["engine"]["replicas_ready"] < 2:
            assert time.monotonic() < deadline, admin.get("/api/status").json()["replicas"]
            time.sleep(1)
    yield s
    s.stop(signal.SIGKILL) if s.proc.poll() is None else None


@pytest.fixture(scope="module")
def versions(server, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    with server.client() as admin:
        return [admin.post("/api/versions", json={"adapter_path": str(make_adapter(tiny_model, root / f"a{i}", seed=i)),
                                                  "method": "test"}).json() for i in range(2)]


@contextmanager
def load(server) -> Iterator[tuple[list, list]]:
    """CLIENTS threads asking the served alias without pause; yields (answers, failures), each
    failure with the time it happened."""
    answers, failures, stop = [], [], threading.Event()

    def client():
        oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        while not stop.is_set():
            try:
                answers.append(oai.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=4).id)
            except Exception as e:  # every failure is counted
                failures.append((time.monotonic(), repr(e)))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        yield answers, failures
    finally:
        stop.set()
        for t in threads:
            t.join()


def replicas(admin) -> dict[str, dict]:
    return {r["name"]: r for r in admin.get("/api/status").json()["replicas"]}


def logged_versions(admin, ids: set[str]) -> dict[str, int]:
    deadline = time.monotonic() + 15
    while True:
        found = {e["request_id"]: e["version_id"] for e in admin.get("/api/exchanges", params={"limit": 20000}).json()}
        if ids <= set(found) or time.monotonic() > deadline:
            return {i: found.get(i) for i in ids}
        time.sleep(0.3)


def test_promote_and_rollback_ten_times_under_load_fail_no_request(server, versions):
    v1, v2 = versions
    with server.client() as admin:
        before = replicas(admin)
        with load(server) as (answers, failures):
            time.sleep(1)
            for i in range(10):
                r = admin.post("/api/promote", json={"version": (v1 if i % 2 else v2)["name"]})
                assert r.status_code == 200, r.text
                time.sleep(0.3)
                r = admin.post("/api/rollback")
                assert r.status_code == 200, r.text
                time.sleep(0.3)
            assert admin.post("/api/promote", json={"version": v1["name"]}).status_code == 200
            time.sleep(1)
            settled = len(answers)
            time.sleep(2)
        assert failures == [] and len(answers) > 40
        after = replicas(admin)
        for name in ("local-0", "local-1"):  # both took a share of the load
            assert after[name]["answered"] - before[name]["answered"] > 10, after
        assert after["local-0"]["adapters"] == after["local-1"]["adapters"]  # the same table on both
        # v1 serves, the base served before it; every other adapter was unloaded once nothing used it
        assert [a.split("-")[0] for a in after["local-0"]["adapters"]] == [v1["name"]]
        # what the alias answered once the last promotion had settled came from v1, on either replica
        assert set(logged_versions(admin, set(answers[settled:])).values()) == {v1["id"]}


def test_a_killed_replica_fails_only_its_requests_in_flight_and_rejoins_with_the_promoted_adapter(server, versions):
    v1, _ = versions
    with server.client() as admin:
        status = admin.get("/api/status").json()
        assert status["serving"] == v1["id"]
        victim = replicas(admin)["local-1"]
        old_group = group_members(victim["pid"])
        assert len(old_group) >= 2, old_group  # vLLM's API server and its engine core
        with load(server) as (answers, failures):
            time.sleep(2)
            killed_at = time.monotonic()
            os.kill(victim["pid"], signal.SIGKILL)  # the API server alone, as the OOM killer would
            time.sleep(10)  # the other replica carries the load
        # only requests that were on the dead replica failed: at most one per client, all at the kill
        assert len(failures) <= CLIENTS, failures
        assert all(t - killed_at < 2.0 for t, _ in failures), failures
        assert replicas(admin)["local-1"]["restarts"] == 1 and len(answers) > 20
        at_kill = len(failures)
        # the rejoin is waited for without load: on 2 cores a restart under full load starves for CPU
        # (185-336 s measured, against ~30 s; docs/design.md §8)
        deadline = time.monotonic() + 400
        while not (r := replicas(admin)["local-1"])["ready"] or r["restarts"] < 1:
            assert time.monotonic() < deadline, r
            time.sleep(1)
        rejoined_at, answered_at_rejoin = time.monotonic(), r["answered"]
        with load(server) as (after_rejoin, later_failures):
            time.sleep(4)
        assert later_failures == []
        r = replicas(admin)["local-1"]
        assert r["pid"] != victim["pid"] and r["answered"] > answered_at_rejoin  # it takes traffic again
        assert not [p for p in old_group if pid_alive(p)], group_members(victim["pid"])
        names = admin.get("/api/status").json()
        assert names["serving"] == v1["id"] and set(r["adapters"]) == set(replicas(admin)["local-0"]["adapters"])
        assert set(logged_versions(admin, set(after_rejoin)).values()) == {v1["id"]}
        print(f"rejoined after {rejoined_at - killed_at:.0f} s; {at_kill} failed at the kill")


def test_stopping_the_gateway_stops_every_replica(server):
    with server.client() as admin:
        pids = [r["pid"] for r in replicas(admin).values()]
    groups = [group_members(p) for p in pids]
    assert server.stop(signal.SIGTERM, timeout=120) == 0
    assert not [p for g in groups for p in g if pid_alive(p)]
