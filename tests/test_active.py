"""Active learning: the score of a waiting pair (the reward model unsure, votes split, a prompt not
labelled yet), the queue handing pairs out by it, and the admin API that ranks and shows it."""

import math
import random
import subprocess
import sys
from collections import Counter

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loop.config import load
from loop.evaluation.active import Candidate, disagreement, rank, uncertainty
from loop.serving.pair_maker import PairJob, PairMaker, chance
from loop.serving.router import Router
from store.database import NewPair, StoreError
from store.labelling import UNSCORED, LabelQueue


def test_the_most_uncertain_pair_comes_first_and_a_split_vote_counts():
    ranked = rank([Candidate(1, "p", margin=4.0), Candidate(2, "q", margin=0.1), Candidate(3, "r", margin=6.0, votes_a=2,
                                                                                         votes_b=2)])
    assert [s.pair_id for s in ranked][:2] in ([2, 3], [3, 2]) and ranked[-1].pair_id == 1
    assert ranked[-1].uncertainty == pytest.approx(1 - math.tanh(2.0))
    assert disagreement(1, 0) == 0 and disagreement(2, 2) == 1 and disagreement(3, 1) == 0.5
    assert uncertainty(0.0) == 1 and uncertainty(-3.0) == uncertainty(3.0) < 0.2


def test_an_ensembles_uncertainty_is_what_its_members_disagree_on_not_a_shared_tie():
    """BALD: members that all call a pair a coin flip (margins 0) agree, and a label would not move
    them; members split either way disagree, and it would."""
    assert uncertainty(0.0, (0.0, 0.0)) == pytest.approx(0, abs=1e-12)
    assert uncertainty(5.0, (5.0, 5.0)) == pytest.approx(0, abs=1e-12)
    assert uncertainty(6.0, (-6.0, 6.0)) > 0.5 > uncertainty(1.0, (-1.0, 1.0)) > 0
    tie = Candidate(1, "p", margin=0.0, others=(0.0, 0.0))
    split = Candidate(2, "q", margin=4.0, others=(-4.0, 0.0))
    assert [s.pair_id for s in rank([tie, split])] == [2, 1]


def test_novelty_spreads_the_head_of_the_queue_over_prompts():
    """Three equally uncertain pairs of one prompt and one of another: the other prompt's pair comes
    second, and a prompt already labelled counts against its pairs."""
    same = [Candidate(i, "garden", margin=0.0) for i in range(3)]
    ranked = rank([*same, Candidate(9, "kitchen", margin=0.0)])
    assert ranked[1].pair_id == 9 and [round(s.novelty, 3) for s in ranked] == [1, 1, 0.5, 0.333]
    labelled = rank([*same, Candidate(9, "kitchen", margin=0.0)], Counter({"kitchen": 3}))
    assert labelled[-1].pair_id == 9 and labelled[-1].novelty == 0.25  # after the garden pairs (1, 1/2, 1/3)


candidates = st.lists(st.tuples(st.integers(0, 4), st.floats(-20, 20), st.integers(0, 3), st.integers(0, 3)),
                      max_size=40)


@given(candidates)
def test_a_ranking_is_every_pair_once_with_falling_scores_in_zero_to_one(rows):
    ranked = rank([Candidate(i, prompt, margin, a, b) for i, (prompt, margin, a, b) in enumerate(rows)])
    assert sorted(s.pair_id for s in ranked) == list(range(len(rows)))
    assert all(a.score >= b.score for a, b in zip(ranked, ranked[1:]))
    for s in ranked:
        assert 0 <= s.score <= 1 and s.score == pytest.approx(max(s.uncertainty, s.disagreement) * s.novelty)


def _pairs(store, n):
    store.add_labelled_pairs([NewPair([{"role": "user", "content": f"question {i}"}], f"good {i}", f"bad {i}")
                              for i in range(n)], "import:t", "dataset:t")
    return [row[0] for row in store._all("SELECT id FROM pairs ORDER BY id")]


def _labeller(store, name="ann"):
    return store.user_by_token(store.add_user(name, "labeller"))["id"]


def _handed(queue, user):
    """Every pair this labeller is handed, in order, skipping each (a skip takes no label)."""
    order = []
    while (pair := queue.next_pair(user)) is not None:
        order.append(pair["pair_id"])
        queue.submit(user, pair["pair_id"], "skip")
    return order


def test_an_active_queue_hands_out_the_highest_score_first_and_unscored_pairs_in_the_middle(store):
    ids = _pairs(store, 5)
    queue = LabelQueue(store, overlap=1, lease_s=60, order="active")
    scores = {ids[0]: 0.9, ids[1]: 0.1, ids[2]: 0.7}  # ids[3] and ids[4] unscored: UNSCORED, newest first
    assert queue.set_scores([{"pair_id": p, "score": s, "uncertainty": s, "disagreement": 0, "novelty": 1}
                             for p, s in scores.items()] + [{"pair_id": 10**9, "score": 1, "uncertainty": 1,
                                                             "disagreement": 0, "novelty": 1}], reward_model_id=7) == 3
    assert UNSCORED == 0.5
    expected = [ids[0], ids[2], ids[4], ids[3], ids[1]]
    assert [p["pair_id"] for p in queue.waiting(10)] == expected
    assert _handed(queue, _labeller(store)) == expected
    again = LabelQueue(store, overlap=1, lease_s=60, order="active")  # the scores are the store's, not the process's
    assert _handed(again, _labeller(store, "bo")) == expected
    row = store._all("SELECT score, reward_model_id FROM pair_scores WHERE pair_id = ?", [ids[0]])
    assert row == [(0.9, 7)]


def test_random_order_is_a_fixed_shuffle_and_arrival_is_newest_first(store):
    ids = _pairs(store, 30)
    assert _handed(LabelQueue(store, overlap=1, lease_s=60), _labeller(store, "a")) == ids[::-1]
    shuffled = _handed(LabelQueue(store, overlap=1, lease_s=60, order="random"), _labeller(store, "b"))
    assert sorted(shuffled) == ids and shuffled not in (ids, ids[::-1])
    assert _handed(LabelQueue(store, overlap=1, lease_s=60, order="random"), _labeller(store, "c")) == shuffled
    with pytest.raises(StoreError, match="order must be one of"):
        LabelQueue(store, overlap=1, lease_s=60, order="smart")
    with pytest.raises(Exception, match="order must be 'arrival', 'random' or 'active'"):
        load(None, ["labeling.order=smart"])


def test_the_admin_ranks_the_queue_by_margins_and_sees_why_each_pair_comes_next(tmp_path):
    """Through the real gateway: POST /api/queue/margins ranks, GET /api/queue shows the order and
    the parts of each score, labellers are handed pairs in that order; bad bodies are refused clearly."""
    from tests.ui_gateway import running

    with running(tmp_path, pairs=6, settings=["labeling.order=active", "labeling.overlap=1"]) as gateway:
        admin = httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.admin_token}"})
        waiting = admin.get("/api/queue", params={"limit": 50}).json()
        assert waiting["order"] == "active" and len(waiting["pairs"]) == 6
        assert all(p["score"] is None and p["a"].startswith("It is") for p in waiting["pairs"])
        ids = [p["pair_id"] for p in waiting["pairs"]]
        margins = [{"pair_id": p, "margin": 0.0 if p == ids[3] else 5.0} for p in ids]
        done = admin.post("/api/queue/margins", json={"reward_model_id": None, "margins": margins}).json()
        assert done == {"ranked": 6, "left_out": 0, "order": "active"}
        shown = admin.get("/api/queue", params={"limit": 2}).json()["pairs"]
        assert shown[0]["pair_id"] == ids[3] and shown[0]["uncertainty"] == 1.0 and shown[0]["novelty"] == 1.0
        assert shown[1]["uncertainty"] == pytest.approx(1 - math.tanh(2.5))
        labeller = httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.add_user('ann')}"})
        assert labeller.get("/api/label/next").json()["pair"]["pair_id"] == ids[3]
        assert labeller.get("/api/queue").status_code == 403  # the queue's reasons are for admins

        unknown = admin.post("/api/queue/margins", json={"margins": [{"pair_id": 10**6, "margin": 1.0}]}).json()
        assert unknown["ranked"] == 0 and unknown["left_out"] == 1
        for bad in ({"margins": [{"pair_id": ids[0], "margin": "NaN"}]}, {"margins": [{"pair_id": ids[0], "margin": 1e300}]},
                    {"margins": [{"pair_id": -1, "margin": 0}]}, {"margins": "all"}, {}):
            r = admin.post("/api/queue/margins", json=bad)
            assert r.status_code in (400, 422), (bad, r.status_code, r.text)
            assert r.json()["error"]["message"]
        assert admin.get("/api/queue", params={"limit": -5}).status_code == 200


def test_the_scheduler_ranks_only_with_a_reward_model_and_never_beside_a_run(tmp_path):
    """Before any retrain there is no reward model to score with: the queue keeps its order and says
    why. While a run goes, the scheduler leaves ranking to it. A bad nightly budget is refused."""
    from loop.scheduler import Scheduler
    from tests.ui_gateway import running

    with running(tmp_path, pairs=3, settings=["labeling.order=active"]) as gateway:
        scheduler = Scheduler(gateway.gw.cfg, log=lambda line: None)
        done = scheduler.rank()
        assert done["ranked"] == 0 and done["reason"].startswith("no reward model to score with yet")
        with scheduler._busy:
            assert scheduler.rank() is None
    off = Scheduler(load(None, ["labeling.order=arrival"]), log=lambda line: None).rank()
    assert off == {"ranked": 0, "reason": "labeling.order is 'arrival', not 'active'"}
    cli = [sys.executable, "-m", "loop.cli", "--set", f"data.dir={tmp_path}", "simulate"]
    for bad in (["--labels", "5"], ["--nights", "1", "--labels", "-1"]):
        done = subprocess.run(cli + bad, capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode != 0 and "--labels (a nightly label budget" in done.stderr and "Traceback" not in done.stderr


def test_the_waiting_pairs_carry_peoples_votes_not_the_datasets(store):
    """An imported pair carries its dataset's label (a system user's): that is no person's vote, so
    it neither counts towards disagreement nor makes the prompt labelled."""
    ids = _pairs(store, 2)
    queue = LabelQueue(store, overlap=3, lease_s=60)
    assert [(p["votes_a"], p["votes_b"]) for p in queue.waiting(5)] == [(0, 0), (0, 0)]
    assert store.labelled_per_prompt() == {}
    for name, choice in (("ann", "first"), ("bo", "second")):
        user = _labeller(store, name)
        while (pair := queue.next_pair(user))["pair_id"] != ids[0]:
            queue.submit(user, pair["pair_id"], "skip")
        queue.submit(user, ids[0], choice)
    assert {p["pair_id"]: (p["votes_a"], p["votes_b"]) for p in queue.waiting(5)}[ids[0]] == (1, 1)
    assert list(store.labelled_per_prompt().values()) == [1]


class _Draw(random.Random):
    """Every draw lands on the same number, so which prompts pass is fixed."""

    def random(self) -> float:
        return 0.6


def test_with_active_order_the_pair_maker_favours_prompts_not_paired_yet(store):
    _pairs(store, 2)
    store.add_labelled_pairs([NewPair([{"role": "user", "content": "question 0"}], "fine", "worse")], "import:t",
                             "dataset:t")
    assert sorted(n for _, n in store.pairs_per_prompt()) == [1, 2]

    def job(text):
        return PairJob("chatcmpl-1", [{"role": "user", "content": text}], 0, 8)

    maker = PairMaker(Router("alignloop", "base"), None, print, lambda: 0, share=1.0, rng=_Draw(),
                      novelty=store.pairs_per_prompt())
    for text in ("question 0", "question 1", "new", "new"):  # chances 1/3, 1/2, 1, then 1/2
        maker.offer(job(text))
    assert [maker.queue.get_nowait().messages[0]["content"] for _ in range(maker.queue.qsize())] == ["new"]
    plain = PairMaker(Router("alignloop", "base"), None, print, lambda: 0, share=1.0, rng=_Draw())
    for text in ("question 0", "new", "new"):
        plain.offer(job(text))
    assert plain.queue.qsize() == 3 and chance(0.25, 3) == 0.0625
