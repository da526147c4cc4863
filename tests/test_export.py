"""Export: majority labels, a stable held-out split, files that load into `datasets`, manifests."""

import json
from datetime import datetime, timedelta

import pyarrow.parquet as pq
import pytest

from store import export
from store.database import StoreError
from store.export import majority, split_of
from store.importer import import_file


@pytest.mark.parametrize("votes, winner", [
    ((1, 0, 0, 0), "a"), ((0, 1, 0, 0), "b"), ((2, 1, 0, 0), "a"), ((1, 1, 0, 0), None),
    ((1, 0, 1, 0), None), ((0, 0, 2, 0), None), ((0, 1, 0, 2), None), ((0, 3, 1, 1), "b"), ((0, 0, 0, 0), None),
])
def test_majority(votes, winner):
    assert majority(*votes) == winner


def test_split_is_stable_and_near_the_share():
    uids = [f"uid-{i}" for i in range(4000)]
    splits = [split_of(u, 0.1) for u in uids]
    assert splits == [split_of(u, 0.1) for u in uids]
    assert 0.08 < splits.count("heldout") / len(uids) < 0.12
    assert all(split_of(u, 0.0) == "train" for u in uids[:100])


def _labelled_store(store, hh_sample):
    import_file(store, hh_sample, "hh")
    u1 = store.add_user("ana", "labeller")
    u2 = store.add_user("bo", "labeller")
    ana, bo = store.user_by_token(u1)["id"], store.user_by_token(u2)["id"]
    first, second, third = store.pair_ids()[:3]
    store.add_label(first, ana, "b")  # dataset says a; ana and bo say b: b wins 2-1
    store.add_label(first, bo, "b")
    store.add_label(second, ana, "tie")  # 1 a, 1 tie: no majority, left out
    store.add_label(third, ana, "skip")  # skips do not count: a wins 1-0
    return first, second


def test_pairs_export_applies_the_majority(store, hh_sample, tmp_path):
    first, second = _labelled_store(store, hh_sample)
    out = tmp_path / "pairs.jsonl"
    manifest = export.export(store, "pairs", out, "jsonl", heldout_share=0.25)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 23 and manifest.counts["pairs"] == 23 and manifest.skipped["no_majority"] == 1
    assert second not in [r["id"] for r in rows]
    flipped = next(r for r in rows if r["id"] == first)
    a, b = store.pair_response_ids(first)
    texts = dict(store._all("SELECT id, text FROM responses WHERE id IN (?, ?)", [a, b]))
    assert flipped["chosen"] == [{"role": "assistant", "content": texts[b]}]
    assert flipped["rejected"] == [{"role": "assistant", "content": texts[a]}]
    assert all(r["prompt"][-1]["role"] == "user" for r in rows)
    assert manifest.counts["heldout"] == sum(r["split"] == "heldout" for r in rows)
    saved = json.loads((tmp_path / "pairs.jsonl.manifest.json").read_text())
    assert saved["content_hash"]["pairs"] == manifest.content_hash["pairs"]


def test_jsonl_and_parquet_hold_the_same_rows_and_load_into_datasets(store, hh_sample, tmp_path):
    import datasets

    import_file(store, hh_sample, "hh")
    cutoff = datetime.now()
    m1 = export.export(store, "pairs", tmp_path / "p.jsonl", "jsonl", 0.1, cutoff)
    m2 = export.export(store, "pairs", tmp_path / "p.parquet", "parquet", 0.1, cutoff)
    assert m1.content_hash == m2.content_hash
    from_json = datasets.load_dataset("json", data_files=str(tmp_path / "p.jsonl"), split="train")
    from_parquet = datasets.load_dataset("parquet", data_files=str(tmp_path / "p.parquet"), split="train")
    assert from_json.num_rows == from_parquet.num_rows == 24
    assert from_parquet[0]["chosen"][0]["role"] == "assistant"
    assert from_json[0]["prompt"] == from_parquet[0]["prompt"]


def test_cutoff_leaves_out_what_came_later(store, hh_sample, tmp_path):
    import_file(store, hh_sample, "hh")
    manifest = export.export(store, "pairs", tmp_path / "p.jsonl", "jsonl", 0.1,
                             cutoff=datetime.now() - timedelta(hours=1))
    assert manifest.counts["pairs"] == 0


def test_snapshot_writes_every_kind_with_one_manifest(store, hh_sample, tmp_path):
    import_file(store, hh_sample, "hh")
    a, _ = store.pair_response_ids(store.pair_ids()[0])
    store.add_feedback(a, "thumbs", 1.0, "nice")
    store.add_feedback(a, "score", 0.2, user_id=store.user_by_token(store.add_user("app1", "app"))["id"])
    manifest = export.snapshot(store, tmp_path / "snap", 0.1)
    assert manifest.counts["pairs"] == 24 and manifest.counts["prompts"] == 24 and manifest.counts["feedback"] == 2
    assert json.loads((tmp_path / "snap" / "manifest.json").read_text())["files"]["pairs"] == "pairs.parquet"
    import pyarrow.parquet as pq

    feedback = pq.read_table(tmp_path / "snap" / "feedback.parquet").to_pylist()
    assert [f["label"] for f in feedback] == [True, False]
    assert feedback[0]["completion"][0]["role"] == "assistant"


def test_same_data_same_hash_different_data_different_hash(store, hh_sample, tmp_path):
    import_file(store, hh_sample, "hh")
    cutoff = datetime.now()
    h1 = export.snapshot(store, tmp_path / "s1", 0.1, cutoff).content_hash
    h2 = export.snapshot(store, tmp_path / "s2", 0.1, cutoff).content_hash
    assert h1 == h2
    user = store.user_by_token(store.add_user("ana", "labeller"))["id"]
    store.add_label(store.pair_ids()[0], user, "b")
    store.add_label(store.pair_ids()[0], store.user_by_token(store.add_user("bo", "labeller"))["id"], "b")
    assert export.snapshot(store, tmp_path / "s3", 0.1).content_hash["pairs"] != h1["pairs"]


def test_every_row_names_who_gave_it_and_an_excluded_users_contributions_leave_every_snapshot(store, tmp_path):
    from store.database import Exchange, SecondResponse
    from store.labelling import LabelQueue

    ids = {n: store.user_by_token(store.add_user(n, role))["id"]
           for n, role in (("app1", "app"), ("app2", "app"), ("ann", "labeller"), ("bob", "labeller"))}
    for n, app in enumerate(("app1", "app2")):
        store.log_batch([Exchange(f"req-{app}", "chat.completions", "alignloop", 0, [{"role": "user", "content": f"q{n}"}],
                                  [(f"first {n}", "stop")], {}, user_id=ids[app])],
                        [SecondResponse(f"req-{app}", f"second {n}", 0, {})])
    queue = LabelQueue(store, overlap=2, lease_s=60)
    for who in ("ann", "bob"):
        for _ in range(2):
            pair = queue.next_pair(ids[who])
            queue.submit(ids[who], pair["pair_id"], "first")
    for app in ("app1", "app2"):
        store.add_feedback(store.response_id(f"req-{app}", 0), "thumbs", 1.0, user_id=ids["ann"])

    def snap(name: str) -> dict[str, list[dict]]:
        export.snapshot(store, tmp_path / name, 0.0)
        return {k: pq.read_table(tmp_path / name / f"{k}.parquet").to_pylist() for k in ("pairs", "prompts", "feedback")}

    everything = snap("all")
    assert sorted((r["contributor"], r["labellers"]) for r in everything["pairs"]) == [
        ("app1", ["ann", "bob"]), ("app2", ["ann", "bob"])]
    assert sorted(r["contributor"] for r in everything["prompts"]) == ["app1", "app2"]
    assert [r["contributor"] for r in everything["feedback"]] == ["ann", "ann"]

    store.exclude_user("bob", by="admin")   # a labeller: their votes go, the pairs stay on ann's
    store.exclude_user("app2", by="admin")  # an app: its prompts, their pairs and the feedback on them go
    after = snap("after")
    assert [(r["contributor"], r["labellers"]) for r in after["pairs"]] == [("app1", ["ann"])]
    assert [r["contributor"] for r in after["prompts"]] == ["app1"]
    assert len(after["feedback"]) == 1
    store.exclude_user("ann", by="admin")
    assert snap("none")["feedback"] == [] and snap("none2")["pairs"] == []
    store.exclude_user("ann", by="admin", excluded=False)
    assert len(snap("back")["pairs"]) == 1
    with pytest.raises(StoreError, match="no user"):
        store.exclude_user("nobody", by="admin")
