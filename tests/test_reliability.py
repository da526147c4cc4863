"""Labeller reliability from agreement alone: the bad labellers rank below the good ones, and the
reliability-weighted answer beats a plain majority against the truth the estimate never saw."""

import random

import pytest

from loop.evaluation.reliability import estimate

# 3 careful labellers, 2 who flip 30% of their answers, 1 who always picks the worse reply
ACCURACY = {1: 0.95, 2: 0.95, 3: 0.95, 4: 0.95 * 0.7 + 0.05 * 0.3, 5: 0.95 * 0.7 + 0.05 * 0.3, 6: 0.0}
GOOD, BAD = (1, 2, 3), (4, 5, 6)


def simulate(pairs: int, overlap: int, seed: int):
    rng = random.Random(seed)
    truth = {p: rng.random() < 0.5 for p in range(pairs)}  # True: a is better
    votes = []
    for p, a_better in truth.items():
        for u in rng.sample(sorted(ACCURACY), overlap):
            right = rng.random() < ACCURACY[u]
            votes.append((p, u, "a" if a_better == right else "b"))
    return truth, votes


def auc(scores: dict[int, float]) -> float:
    """Share of (good, bad) labeller pairs in which the good one scores higher."""
    return sum(scores[g] > scores[b] for g in GOOD for b in BAD) / (len(GOOD) * len(BAD))


@pytest.mark.parametrize("overlap", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_three_bad_labellers_rank_below_the_three_good_ones(overlap, seed):
    truth, votes = simulate(300, overlap, seed)
    people, posterior = estimate(votes)
    assert auc({u: r.accuracy for u, r in people.items()}) >= 0.95
    assert people[6].high < 0.2  # always wrong, and known to be
    assert all(r.low <= r.accuracy <= r.high for r in people.values())
    # the weighted answer against the truth, beside a plain majority (ties broken toward a)
    weighted = sum((posterior[p] > 0.5) == truth[p] for p in truth) / len(truth)
    by_pair = {}
    for p, _, c in votes:
        by_pair.setdefault(p, []).append(c == "a")
    majority = sum((sum(v) * 2 >= len(v)) == truth[p] for p, v in by_pair.items()) / len(truth)
    assert weighted > majority


def test_odd_input_gives_a_clear_result():
    assert estimate([]) == ({}, {})
    people, posterior = estimate([(1, 7, "a")])  # one labeller, one label: nothing to compare with
    assert people[7].votes == 0 and (people[7].low, people[7].high) == (0.0, 1.0)
    assert posterior[1] > 0.5
    people, posterior = estimate([(1, 7, "tie"), (1, 8, "both_bad"), (2, 7, "skip")])  # ties only
    assert people == {} and posterior == {}
    # contradicting each other on every pair: neither is known to be better
    people, _ = estimate([(p, u, "a" if u == 7 else "b") for p in range(20) for u in (7, 8)])
    assert people[7].accuracy == pytest.approx(people[8].accuracy)


def test_admins_see_each_labellers_accuracy_and_the_bad_one_is_flagged(tmp_path):
    """Through the real gateway: three labellers pick the better reply, one always the worse; the
    dashboard's numbers (GET /api/stats) flag that one, for admins only."""
    import httpx

    from tests.ui_gateway import running

    with running(tmp_path, pairs=30, settings=["labeling.overlap=3"]) as gateway:
        people = {name: httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.add_user(name)}"})
                  for name in ("ann", "bo", "cy", "dee")}
        for _ in range(30):
            for name, c in people.items():
                pair = c.get("/api/label/next").json()["pair"]
                if pair is None:
                    continue
                better = "first" if pair["first"].startswith("It is") else "second"
                worse = "second" if better == "first" else "first"
                c.post("/api/label", json={"pair_id": pair["pair_id"], "choice": worse if name == "dee" else better}
                       ).raise_for_status()
        admin = httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.admin_token}"})
        rows = admin.get("/api/stats").json()["labellers"]
        assert [r["name"] for r in rows][0] == "dee" and rows[0]["flagged"]
        assert not any(r["flagged"] for r in rows[1:]) and all(r["accuracy"] > 0.8 for r in rows[1:])
        assert "labellers" not in people["ann"].get("/api/stats").json()


def test_a_snapshot_labelled_by_reliability_undoes_an_always_wrong_labeller(tmp_path):
    """The same votes exported twice: by majority, the pairs the bad labeller split are dropped or
    lost to them; weighted by reliability, nine in ten or more come out with the truth."""
    import pyarrow.parquet as pq

    from loop.evaluation.reliability import snapshot_accuracy
    from store import Store, export
    from store.database import NewPair

    with Store(tmp_path / "s.duckdb") as s:
        s.add_labelled_pairs([NewPair([{"role": "user", "content": f"q{i}"}], f"good {i}", f"bad {i}")
                              for i in range(40)], "import:t", "dataset:t")
        s._db.execute("DELETE FROM labels")  # the dataset's own labels: only people's votes here
        users = {name: s.user_by_token(s.add_user(name, "labeller"))["id"] for name in ("ann", "bo", "cy", "dee")}
        rng = random.Random(0)
        for pair_id in s.pair_ids():  # reply a is the good one
            for name in rng.sample(sorted(users), 2):
                right = name != "dee" and rng.random() < 0.95  # dee always picks the worse
                s._db.execute("INSERT INTO labels (pair_id, user_id, choice) VALUES (?, ?, ?)",
                              [pair_id, users[name], "a" if right else "b"])
        assert snapshot_accuracy(s, "majority") is None
        accuracy = snapshot_accuracy(s, "reliability")
        assert accuracy["dee"] < 0.3 < 0.8 < min(accuracy[n] for n in ("ann", "bo", "cy"))
        for aggregate, acc in (("majority", None), ("reliability", accuracy)):
            m = export.snapshot(s, tmp_path / aggregate, 0.0, accuracy=acc)
            rows = pq.read_table(tmp_path / aggregate / "pairs.parquet").to_pylist()
            right = sum(r["chosen"][0]["content"].startswith("good") for r in rows)
            assert m.aggregate == aggregate
            if aggregate == "majority":
                majority_right = right
            else:
                assert right > majority_right and right >= 0.9 * 40
