"""Gold pairs: known-answer pairs an admin adds, handed to labellers unmarked among the others,
measuring each labeller against a truth and never trained on; a contradicting file is refused
line by line, loudly."""

import json
import subprocess
import sys

import httpx
import pytest

from loop.evaluation.reliability import estimate
from store import Store
from store.database import NewPair
from store.export import snapshot
from store.importer import import_gold
from store.labelling import LabelQueue, swapped


def _pair(i: int, good: bool = True) -> NewPair:
    a, b = f"right {i}", f"wrong {i}"
    return NewPair([{"role": "user", "content": f"gold question {i}"}], a if good else b, b if good else a)


def _jsonl(path, pairs):
    path.write_text("".join(json.dumps({"prompt": p.messages, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in pairs))
    return path


def _users(store, n):
    return [store.user_by_token(store.add_user(f"u{i}", "labeller"))["id"] for i in range(n)]


def test_a_gold_file_is_taken_and_every_contradiction_is_refused_with_its_line(store, tmp_path):
    store.add_labelled_pairs([_pair(9)], "import:t", "dataset:t")  # already in the store, not yet gold
    lines = [_pair(0), _pair(1), _pair(2, good=False), _pair(2), _pair(0), _pair(9, good=False)]
    report = import_gold(store, _jsonl(tmp_path / "gold.jsonl", lines), "jsonl")
    assert (report.lines, report.added, report.already_present) == (6, 3, 1)  # 0, 1 and 9; line 5 repeats 0
    assert [line for line, _ in report.skipped] == [3, 4]
    assert all("other reply is the better one" in why for _, why in report.skipped)
    assert "3 gold pairs added" in report.summary()
    gold = store.gold_answers()
    uids = dict(store._all("SELECT id, uid FROM pairs"))
    by_uid = {uids[p]: answer for p, answer in gold.items()}
    assert by_uid == {_pair(0).uid: "a", _pair(1).uid: "a", _pair(9).uid: "b"}  # pair 9's a is "right 9"
    assert store._all("""SELECT count(*) FROM labels WHERE pair_id IN (SELECT pair_id FROM gold_answers)
                         AND pair_id <> ?""", [next(p for p, u in uids.items() if u == _pair(9).uid)]) == [(0,)]

    again = import_gold(store, _jsonl(tmp_path / "again.jsonl", [_pair(1), _pair(0, good=False)]), "jsonl")
    assert (again.added, again.already_present) == (0, 1)
    assert again.skipped == [(2, "refused: the store's gold answer for this pair is the other reply")]
    assert store.gold_answers() == gold  # the refused line changed nothing


def test_gold_pairs_are_handed_out_beyond_the_overlap_and_look_like_any_other(store):
    store.add_labelled_pairs([NewPair([{"role": "user", "content": f"q{i}"}], f"good {i}", f"bad {i}")
                              for i in range(4)], "import:t", "dataset:t")
    store.add_gold_pairs([_pair(i) for i in range(3)], "gold:t")
    gold = set(store.gold_answers())
    a, b = _users(store, 2)
    q = LabelQueue(store, overlap=1, lease_s=60, gold_share=1.0)
    assert q.progress(a)["queue"] == 4  # gold pairs are not work to be done
    handed = {a: [], b: []}
    views = []
    for _ in range(6):
        for u in (a, b):
            pair = q.next_pair(u)
            if pair is not None:
                views.append(pair)
                handed[u].append(pair["pair_id"])
                q.submit(u, pair["pair_id"], "first")
    for u in (a, b):
        assert set(handed[u][:3]) == gold  # gold first at a share of 1, to both: beyond overlap 1
    regular = [p for u in (a, b) for p in handed[u] if p not in gold]
    assert len(regular) == len(set(regular)) == 4  # then the four regular pairs, once each
    assert {frozenset(v) for v in views} == {frozenset({"pair_id", "messages", "first", "second", "first_cut_off",
                                                        "second_cut_off"})}
    assert q.next_pair(a) is None and q.progress(a)["queue"] == 0


def test_gold_is_never_handed_alone_nor_at_a_share_of_zero(store):
    store.add_gold_pairs([_pair(i) for i in range(3)], "gold:t")
    (u,) = _users(store, 1)
    assert LabelQueue(store, overlap=1, lease_s=60, gold_share=1.0).next_pair(u) is None  # no real work: no gold
    store.add_labelled_pairs([NewPair([{"role": "user", "content": f"q{i}"}], f"good {i}", f"bad {i}")
                              for i in range(3)], "import:t", "dataset:t")
    q = LabelQueue(store, overlap=1, lease_s=60, gold_share=0.0)
    gold = set(store.gold_answers())
    for _ in range(3):
        pair = q.next_pair(u)
        assert pair["pair_id"] not in gold
        q.submit(u, pair["pair_id"], "first")
    assert q.next_pair(u) is None


def test_a_queued_pair_made_gold_leaves_the_queue(store):
    pairs = [NewPair([{"role": "user", "content": f"q{i}"}], f"good {i}", f"bad {i}") for i in range(3)]
    store.add_labelled_pairs(pairs, "import:t", "dataset:t")
    q = LabelQueue(store, overlap=1, lease_s=60)
    assert q.progress(-1)["queue"] == 3
    assert store.add_gold_pairs([pairs[0]], "gold:t") == ["made gold"]
    assert q.progress(-1)["queue"] == 2


def test_no_snapshot_trains_on_gold_pairs(store, tmp_path):
    store.add_labelled_pairs([NewPair([{"role": "user", "content": f"q{i}"}], f"good {i}", f"bad {i}")
                              for i in range(5)], "import:t", "dataset:t")
    store.add_gold_pairs([_pair(i) for i in range(3)], "gold:t")
    (u,) = _users(store, 1)
    q = LabelQueue(store, overlap=1, lease_s=60, gold_share=1.0)
    while (pair := q.next_pair(u)) is not None:
        q.submit(u, pair["pair_id"], "first" if pair["first"].startswith(("good", "right")) else "second")
    assert len(store.human_labels()) == 8  # the labeller labelled all eight
    manifest = snapshot(store, tmp_path / "snap", 0.0)
    assert manifest.counts["pairs"] == 5  # the five regular pairs; the three gold ones, as well labelled, not


def test_gold_measures_a_labeller_that_agreement_alone_cannot():
    """Two labellers who agree on the wrong reply every time look perfect by agreement; gold shows
    them, and one who labels alone is measured by gold too."""
    shared = [(p, u, "b") for p in range(20) for u in (1, 2)]  # reply a is right on every pair
    people, _ = estimate(shared)
    assert min(people[1].accuracy, people[2].accuracy) > 0.8  # without a truth, agreeing looks right
    gold = {100 + i: "a" for i in range(10)}
    on_gold = [(p, u, "b") for p in gold for u in (1, 2)] + [(p, 3, "a") for p in gold]
    people, posterior = estimate(shared + on_gold, gold)
    assert people[1].accuracy < 0.3 and people[2].accuracy < 0.3
    assert (people[1].gold, people[1].gold_right) == (10, 0)
    assert people[3].votes == 10 and people[3].accuracy > 0.8 and (people[3].gold, people[3].gold_right) == (10, 10)
    assert all(posterior[p] == 1.0 for p in gold)
    people, _ = estimate([(100, 4, "tie"), (101, 4, "both_bad")], gold)  # no a/b vote on gold: nothing known
    assert people == {}


def test_gold_from_the_cli_then_labellers_through_the_gateway_are_graded(tmp_path):
    """The whole path: `alignloop gold FILE` before serving, labellers through the real gateway, the
    admin's numbers (GET /api/stats) count each one's gold right; a bad line fails loudly, not silently."""
    from tests.ui_gateway import running

    gold = _jsonl(tmp_path / "gold.jsonl", [_pair(i) for i in range(4)] + [_pair(0, good=False)])
    cli = [sys.executable, "-m", "loop.cli", "--set", f"data.dir={tmp_path}"]
    done = subprocess.run(cli + ["gold", str(gold), "--format", "jsonl"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "3 gold pairs added" in done.stdout and "line 1:" in done.stdout and "line 5:" in done.stdout

    with running(tmp_path, pairs=12, settings=["labeling.gold_share=0.5"]) as gateway:
        people = {name: httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.add_user(name)}"})
                  for name in ("ann", "dee")}
        for _ in range(12):
            for name, c in people.items():
                pair = c.get("/api/label/next").json()["pair"]
                if pair is None:
                    continue
                good = "first" if pair["first"].startswith(("It is", "right")) else "second"
                bad = "second" if good == "first" else "first"
                c.post("/api/label", json={"pair_id": pair["pair_id"], "choice": bad if name == "dee" else good}
                       ).raise_for_status()
        admin = httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.admin_token}"})
        rows = {r["name"]: r for r in admin.get("/api/stats").json()["labellers"]}
    assert rows["ann"]["gold"] == rows["ann"]["gold_right"] >= 1
    assert rows["dee"]["gold"] >= 1 and rows["dee"]["gold_right"] == 0
    assert rows["dee"]["accuracy"] < 0.5 < rows["ann"]["accuracy"]

    with running(tmp_path / "up", pairs=1) as gateway:  # while the gateway holds the store: a clear refusal
        port = gateway.url.rsplit(":", 1)[1]
        late = subprocess.run(cli + ["--set", f"data.dir={tmp_path / 'up'}", "--set", f"gateway.port={port}", "gold",
                                     str(gold), "--format", "jsonl"], capture_output=True, text=True, cwd=tmp_path)
        counts = httpx.get(f"{gateway.url}/api/status", headers={"Authorization": f"Bearer {gateway.admin_token}"}
                           ).json()["counts"]
    assert late.returncode == 1 and "Ctrl-C on `alignloop up`" in late.stderr and "Traceback" not in late.stderr
    assert counts["pairs"] == 1  # nothing was written


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_a_gold_share_outside_zero_to_one_is_refused(share):
    from loop.config import load

    with pytest.raises(Exception, match="gold_share must be between 0 and 1"):
        load(None, [f"labeling.gold_share={share}"])


def test_the_shown_order_of_a_gold_pair_is_as_random_as_any():
    assert {swapped(_pair(i).uid) for i in range(40)} == {True, False}
