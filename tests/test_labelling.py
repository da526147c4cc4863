"""The labelling queue: overlap, leases, undo, priority, and 20 labellers at once through the API."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from store import Store
from store.database import NewPair
from store.labelling import Answer, LabelConflict, LabelQueue, Labelled, NotLeased, swapped, to_stored_choice


def _pairs(store, n, source="import:test"):
    pairs = [NewPair([{"role": "user", "content": f"q{i}"}], f"good {i}", f"bad {i}") for i in range(n)]
    store.add_labelled_pairs(pairs, source, "dataset:test")
    return store.pair_ids()


def _users(store, n, role="labeller"):
    return [store.user_by_token(store.add_user(f"u{i}", role))["id"] for i in range(n)]


def test_first_and_second_map_back_to_a_and_b():
    for uid in ("x", "y", "z", "w"):
        a_first = not swapped(uid)
        assert to_stored_choice("first", uid) == ("a" if a_first else "b")
        assert to_stored_choice("second", uid) == ("b" if a_first else "a")
        assert to_stored_choice("tie", uid) == "tie"
    assert {swapped(str(i)) for i in range(50)} == {True, False}


def test_each_pair_gets_overlap_labels_from_different_people(store):
    ids = _pairs(store, 3)
    users = _users(store, 3)
    q = LabelQueue(store, overlap=2, lease_s=60)
    seen = {u: [] for u in users}
    for _ in range(3):
        for u in users:
            pair = q.next_pair(u)
            if pair:
                seen[u].append(pair["pair_id"])
                q.submit(u, pair["pair_id"], "first")
    labels = store._all("""SELECT pair_id, count(*), count(DISTINCT user_id) FROM labels l JOIN users u ON u.id = l.user_id
                           WHERE u.role = 'labeller' GROUP BY pair_id""")
    assert sorted(labels) == [(i, 2, 2) for i in ids]
    assert all(len(v) == len(set(v)) for v in seen.values())
    assert all(q.next_pair(u) is None for u in users)


def test_an_open_lease_is_handed_back_and_an_expired_one_returns_to_the_queue(store):
    (pid,) = _pairs(store, 1)
    a, b = _users(store, 2)
    q = LabelQueue(store, overlap=1, lease_s=0.3)
    assert q.next_pair(a)["pair_id"] == pid
    assert q.next_pair(a)["pair_id"] == pid  # same pair again: a reload does not lose it
    assert q.next_pair(b) is None  # leased to a, overlap 1
    time.sleep(0.4)
    assert q.next_pair(b)["pair_id"] == pid
    q.submit(b, pid, "second")
    with pytest.raises(LabelConflict, match="has all its 1 labels"):
        q.submit(a, pid, "first")  # a's lease expired and the pair is full


def test_labelling_twice_is_refused_and_undo_hands_the_pair_back(store):
    _pairs(store, 2)
    (u,) = _users(store, 1)
    q = LabelQueue(store, overlap=2, lease_s=60)
    first = q.next_pair(u)
    q.submit(u, first["pair_id"], "tie", rationale="same", seconds_spent=3.5)
    with pytest.raises(LabelConflict, match="labelled pair"):
        q.submit(u, first["pair_id"], "first")
    again = q.undo(u)
    assert again["pair_id"] == first["pair_id"] and q.next_pair(u)["pair_id"] == first["pair_id"]
    q.submit(u, first["pair_id"], "both_bad")
    assert store._all("SELECT choice FROM labels WHERE user_id = ?", [u]) == [("both_bad",)]
    assert q.undo(u)["pair_id"] == first["pair_id"] and q.undo(u) is None
    # the second undo took the label back too, and the pair is this labeller's again
    assert store._all("SELECT choice FROM labels WHERE user_id = ?", [u]) == []
    assert q.next_pair(u)["pair_id"] == first["pair_id"]


def test_skips_do_not_count_toward_overlap_but_are_not_shown_again(store):
    (pid,) = _pairs(store, 1)
    a, b = _users(store, 2)
    q = LabelQueue(store, overlap=1, lease_s=60)
    q.submit(a, q.next_pair(a)["pair_id"], "skip")
    assert q.next_pair(a) is None
    assert q.next_pair(b)["pair_id"] == pid
    assert q.progress(b) == {"done_today": 0, "queue": 1}


def test_live_pairs_come_before_imported_ones(store):
    _pairs(store, 2)
    live = store.add_generated_pair([{"role": "user", "content": "live"}], ("x", 0), ("y", 0), "arena", priority=2)
    (u,) = _users(store, 1)
    assert LabelQueue(store, 2, 60).next_pair(u)["pair_id"] == live


def test_unknown_choice_and_pair_are_clear(store):
    (pid,) = _pairs(store, 1)
    (u,) = _users(store, 1)
    q = LabelQueue(store, 2, 60)
    with pytest.raises(Exception, match="choice must be one of"):
        q.submit(u, pid, "left")
    with pytest.raises(Exception, match="no pair 999"):
        q.submit(u, 999, "first")


@pytest.fixture
def labelling_api(tmp_path):
    """The real gateway app over a real DuckDB file, served by uvicorn. Labelling needs no engine."""
    import uvicorn

    from loop import config as configuration
    from loop.serving.server import build
    from tests.serving import free_port

    port = free_port()
    cfg = configuration.load(None, [f"data.dir={tmp_path}", f"gateway.port={port}", "labeling.overlap=2"])
    with Store(cfg.db_path) as s:
        _pairs(s, 60)
    app, gw = build(cfg, engines=False)  # nothing listens there: no engine at all
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", cfg.admin_token_path.read_text().strip(), gw
    server.should_exit = True
    thread.join()


def test_twenty_labellers_at_once_through_the_api(labelling_api):
    url, admin_token, gw = labelling_api
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_token}"})
    tokens = [admin.post("/api/users", json={"name": f"lab{i}", "role": "labeller"}).json()["token"]
              for i in range(20)]
    choices = ["first", "second", "tie", "both_bad", "first", "second"]

    def work(i: int) -> list[int]:
        done = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens[i]}"}, timeout=30) as c:
            pair = c.get("/api/label/next").json()["pair"]
            while pair is not None:
                r = c.post("/api/label", json={"pair_id": pair["pair_id"], "choice": choices[len(done) % 6]})
                assert r.status_code == 200, r.text
                done.append(pair["pair_id"])
                pair = r.json()["pair"]
        return done

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(work, range(20)))
    assert sum(map(len, results)) == 120  # 60 pairs x overlap 2, every label answered 200
    assert all(len(r) == len(set(r)) for r in results)
    rows = gw.store._all("""SELECT pair_id, count(*), count(DISTINCT user_id) FROM labels l
                            JOIN users u ON u.id = l.user_id WHERE u.role = 'labeller' GROUP BY pair_id""")
    assert len(rows) == 60 and all(n == 2 and distinct == 2 for _, n, distinct in rows)


def test_label_api_roles_and_errors(labelling_api):
    url, admin_token, _ = labelling_api
    with httpx.Client(base_url=url) as anon:
        assert anon.get("/api/label/next").status_code == 401
        assert anon.post("/api/label", json={"pair_id": 1, "choice": "first"}).status_code == 401
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_token}"})
    token = admin.post("/api/users", json={"name": "ana", "role": "labeller"}).json()["token"]
    lab = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"})
    pair = lab.get("/api/label/next").json()["pair"]
    assert lab.post("/api/label", json={"pair_id": pair["pair_id"], "choice": "left"}).status_code == 400
    assert lab.post("/api/label", json={"pair_id": 10**6, "choice": "first"}).status_code == 404
    assert lab.post("/api/label", json={"pair_id": pair["pair_id"], "choice": "first"}).status_code == 200
    assert lab.post("/api/label", json={"pair_id": pair["pair_id"], "choice": "first"}).status_code == 409
    assert lab.post("/api/label/undo").json()["pair"]["pair_id"] == pair["pair_id"]
    assert lab.post("/api/label", json={"pair_id": pair["pair_id"], "choice": "second"}).status_code == 200
    assert "Pick the reply" in lab.get("/api/guidelines").json()["text"]
    assert lab.put("/api/guidelines", json={"text": "new"}).status_code == 403
    assert admin.put("/api/guidelines", json={"text": "Be kind."}).status_code == 200
    assert lab.get("/api/guidelines").json()["text"] == "Be kind."
    assert lab.get("/api/export/pairs").status_code == 403
    download = admin.get("/api/export/pairs", params={"format": "jsonl"})
    assert download.status_code == 200 and len(download.text.splitlines()) == 60
    assert json.loads(download.headers["X-Alignloop-Manifest"])["counts"]["pairs"] == 60
    stats = lab.get("/api/stats").json()
    assert stats["queue"] == 60 and stats["labels_per_labeller"][0]["name"] == "ana"


def test_pairs_added_after_the_index_is_built_are_handed_out_from_every_path(store):
    from store.database import Exchange, SecondResponse

    _pairs(store, 1)
    a, b = _users(store, 2)
    q = LabelQueue(store, overlap=1, lease_s=60)
    q.submit(a, q.next_pair(a)["pair_id"], "first")  # the index is built; the one pair is done
    assert q.next_pair(b) is None
    arena = store.add_generated_pair([{"role": "user", "content": "arena"}], ("x", 0), ("y", 0), "arena", priority=2)
    store.log_batch([Exchange("chatcmpl-1", "chat.completions", "alignloop", 0, [{"role": "user", "content": "live"}],
                              [("first answer", "stop")], {})],
                    [SecondResponse("chatcmpl-1", "second answer", 0, {})])
    handed = {q.next_pair(b)["pair_id"]}
    q.submit(b, next(iter(handed)), "first")
    handed.add(q.next_pair(b)["pair_id"])
    live = store._all("SELECT id FROM pairs WHERE source = 'live'")[0][0]
    assert handed == {arena, live}


def test_a_label_and_the_next_pair_in_one_call_and_progress_counted_in_memory(store):
    _pairs(store, 3)
    (u,) = _users(store, 1)
    q = LabelQueue(store, overlap=1, lease_s=60)
    first = q.next_pair(u)
    assert q.progress(u) == {"done_today": 0, "queue": 3}
    label_id, second = q.submit_and_next(u, first["pair_id"], "first")
    assert second["pair_id"] != first["pair_id"]
    assert store._all("SELECT id, pair_id FROM labels WHERE user_id = ?", [u]) == [(label_id, first["pair_id"])]
    assert store._all("SELECT pair_id FROM assignments WHERE user_id = ?", [u]) == [(second["pair_id"],)]
    assert q.progress(u) == {"done_today": 1, "queue": 2}
    assert q.undo(u)["pair_id"] == first["pair_id"]  # handed back
    assert q.progress(u) == {"done_today": 0, "queue": 3}
    _, third = q.submit_and_next(u, first["pair_id"], "first")
    with pytest.raises(LabelConflict):  # a refusal changes nothing
        q.submit_and_next(u, first["pair_id"], "first")
    assert q.progress(u)["done_today"] == 1
    q.submit_and_next(u, third["pair_id"], "skip")  # a skip is no label, and undoing one takes none away
    assert q.progress(u) == {"done_today": 1, "queue": 2}
    q.undo(u)
    assert q.progress(u)["done_today"] == 1
    q._today.clear()  # tomorrow's first look counts in the store: the skips are left out there too
    q.submit_and_next(u, third["pair_id"], "skip")
    q._today.clear()
    assert q.progress(u)["done_today"] == 1


def test_a_store_failure_mid_label_rolls_back_and_the_index_is_rebuilt(store, monkeypatch):
    _pairs(store, 2)
    (u,) = _users(store, 1)
    q = LabelQueue(store, overlap=1, lease_s=60)
    pair = q.next_pair(u)

    def broken(db, users):
        raise RuntimeError("disk full")

    monkeypatch.setattr(q, "_write_leases", broken)  # the label is written, then writing the next lease fails
    with pytest.raises(RuntimeError):
        q.submit_and_next(u, pair["pair_id"], "first")
    monkeypatch.undo()
    assert store._all("SELECT count(*) FROM labels WHERE user_id = ?", [u]) == [(0,)]  # rolled back
    # the index forgot the label it had counted, so the same pair can be labelled again
    assert q.next_pair(u)["pair_id"] == pair["pair_id"]
    label_id, _ = q.submit_and_next(u, pair["pair_id"], "first")
    assert store._all("SELECT id FROM labels WHERE user_id = ?", [u]) == [(label_id,)]


def test_labels_from_many_labellers_in_one_transaction_are_what_one_by_one_would_give():
    """label_many against submit_and_next called in the same order, on two stores built alike: the
    same labels, refusals, next pairs and leases, and each refusal alone."""
    results = {}
    for name in ("batched", "one by one"):
        with Store(":memory:") as s:
            _pairs(s, 6)
            users = _users(s, 3)
            q = LabelQueue(s, overlap=2, lease_s=60)
            held = {u: q.next_pair(u)["pair_id"] for u in users}
            a, b, c = users
            answers = [Answer(a, held[a], "first", "clear", 2.5), Answer(b, held[b], "skip"),
                       Answer(a, held[a], "second"),       # a again, on the pair just labelled: a conflict
                       Answer(c, held[a], "first"),        # c on a's pair, not handed to c: refused
                       Answer(c, held[c], "tie"), Answer(c, 10_000, "first")]  # no such pair
            if name == "batched":
                got = q.label_many(answers)
            else:
                got = []
                for x in answers:
                    try:
                        label_id, pair = q.submit_and_next(x.user_id, x.pair_id, x.choice, x.rationale, x.seconds_spent)
                        got.append(Labelled(label_id, pair, q.progress(x.user_id)))
                    except Exception as e:
                        got.append(e)
            results[name] = ([type(r).__name__ if isinstance(r, Exception) else (r.label_id, r.pair, r.progress)
                              for r in got],
                             s._all("SELECT id, pair_id, user_id, choice, rationale, seconds_spent FROM labels ORDER BY id"),
                             s._all("SELECT pair_id, user_id FROM assignments ORDER BY user_id"))
    assert results["batched"] == results["one by one"]
    outcomes, labels, leases = results["batched"]
    assert [o if isinstance(o, str) else "ok" for o in outcomes] == \
        ["ok", "ok", "LabelConflict", "NotLeased", "ok", "StoreError"]
    people = [row for row in labels if row[2] in users]  # not the dataset's own labels
    assert len(people) == 3 and people[0][4:] == ("clear", 2.5)
    assert {u for _, u in leases} == set(users)  # each labeller holds their next pair


def test_a_batch_of_refusals_only_writes_nothing(store):
    (pid,) = _pairs(store, 1)
    (u,) = _users(store, 1)
    q = LabelQueue(store, overlap=1, lease_s=60)
    got = q.label_many([Answer(u, pid, "first"), Answer(u, pid, "sideways")])
    assert isinstance(got[0], NotLeased) and type(got[1]).__name__ == "StoreError"
    assert store._all("SELECT count(*) FROM labels WHERE user_id = ?", [u]) == [(0,)]


def test_labels_sent_at_once_share_one_commit_and_each_sender_gets_its_own_answer(store):
    import asyncio

    from loop.serving.label_batcher import LabelBatcher

    _pairs(store, 10)
    users = _users(store, 5)
    q = LabelQueue(store, overlap=1, lease_s=60)
    held = {u: q.next_pair(u)["pair_id"] for u in users}
    batcher = LabelBatcher(q)

    async def send_all():
        answers = [Answer(u, held[u], "first") for u in users] + [Answer(users[0], held[users[1]], "first")]
        return await asyncio.gather(*(batcher.submit(a) for a in answers), return_exceptions=True)

    got = asyncio.run(send_all())
    assert (batcher.batches, batcher.labels) == (1, 6)
    assert all(isinstance(r, Labelled) and r.pair["pair_id"] not in held.values() for r in got[:5])
    assert isinstance(got[5], LabelConflict)  # users[1] labelled that pair just before, in the same batch
    assert len({r.label_id for r in got[:5]}) == 5
    assert store._all("SELECT count(*) FROM labels WHERE user_id IN (SELECT unnest(?))", [users]) == [(5,)]


def test_a_labeller_is_told_which_reply_was_cut_off_at_its_length_limit(store):
    """A reply that ran out of tokens reads as a worse one: the pair says so, on the side it is shown."""
    from store.database import Exchange, SecondResponse

    (imported,) = _pairs(store, 1)
    store.log_batch([Exchange("chatcmpl-9", "chat.completions", "alignloop", 0, [{"role": "user", "content": "live"}],
                              [("a whole answer.", "stop")], {})],
                    [SecondResponse("chatcmpl-9", "an answer that runs on and", 0, {}, finish_reason="length")])
    q = LabelQueue(store, overlap=1, lease_s=60)
    live = store._all("SELECT id FROM pairs WHERE source = 'live'")[0][0]
    view = q.pair_view(live)
    cut = {view["first"]: view["first_cut_off"], view["second"]: view["second_cut_off"]}
    assert cut == {"a whole answer.": False, "an answer that runs on and": True}
    plain = q.pair_view(imported)  # imported pairs have no finish reason: nothing is said
    assert plain["first_cut_off"] is False and plain["second_cut_off"] is False
