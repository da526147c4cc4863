"""How often each labeller picks the better reply, estimated from agreement alone (no answer key).

The one-coin Dawid-Skene model: each pair has a hidden better reply (a or b), and each labeller
picks it with their own probability, their accuracy, whatever the pair. EM alternates between the
posterior of each pair's better reply given everyone's votes weighted by accuracy, and each
labeller's accuracy given those posteriors (Dawid & Skene, 1979). A labeller who always picks the
worse reply gets an accuracy near 0, one who flips a third of their answers about 0.67, where a
plain majority would count them all the same. Only a/b votes say which reply is better; ties,
"both bad" and skips are left out.

Gold pairs (an admin knows their better reply, store/labelling.py hands them out unmarked) anchor
the model to a truth: their posterior is that answer, not a vote count, and every a/b vote on one
counts towards its labeller's accuracy, even when nobody else voted on it. So a labeller who works
alone, or a clique that agrees on the wrong reply, is still measured; `gold_right` of `gold` says
how they did on the gold pairs alone.

Written here rather than taken from crowd-kit (whose `OneCoinDawidSkene` is the same model): it
needs scikit-learn, nltk and pandas, and the model is a dozen lines on plain dicts.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from statistics import NormalDist

from store.database import Store

PRIOR = (2.0, 1.0)  # Beta prior on each accuracy: one agreement and no disagreement in hand (mean 2/3)


@dataclass(frozen=True)
class Reliability:
    user_id: int
    votes: int           # a/b votes on gold pairs and on pairs someone else also voted on
    accuracy: float      # estimated P(picks the better reply)
    low: float           # a two-sided `level` interval (Wilson, on the soft counts)
    high: float
    gold: int = 0        # a/b votes on gold pairs (counted in `votes`)
    gold_right: int = 0  # of which picked the known better reply


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def estimate(votes: list[tuple[int, int, str]], gold: dict[int, str] | None = None, iterations: int = 50,
             level: float = 0.9) -> tuple[dict[int, Reliability], dict[int, float]]:
    """(pair id, user id, 'a' or 'b') votes, and the known better reply of gold pairs -> each
    labeller's reliability, and each pair's posterior P(a is better). A pair with one vote, not
    gold, teaches nothing about anyone and is left out of the accuracies (its posterior still uses
    the voter's accuracy)."""
    gold = gold or {}
    by_pair: dict[int, list[tuple[int, bool]]] = defaultdict(list)
    for pair_id, user_id, choice in votes:
        if choice in ("a", "b"):
            by_pair[pair_id].append((user_id, choice == "a"))
    shared = {p: v for p, v in by_pair.items() if len(v) >= 2 or p in gold}
    known = {p: 1.0 if gold[p] == "a" else 0.0 for p in by_pair if p in gold}
    users = {u for v in by_pair.values() for u, _ in v}
    accuracy = dict.fromkeys(users, PRIOR[0] / sum(PRIOR))
    posterior: dict[int, float] = {}
    agree: dict[int, float] = {}
    counted: dict[int, int] = {}
    for _ in range(iterations):
        weight = {u: _logit(p) for u, p in accuracy.items()}
        posterior = {p: known[p] if p in known else 1 / (1 + math.exp(-sum(weight[u] if a else -weight[u] for u, a in v)))
                     for p, v in by_pair.items()}
        agree, counted = defaultdict(float), defaultdict(int)
        for p, v in shared.items():
            for u, a in v:
                agree[u] += posterior[p] if a else 1 - posterior[p]
                counted[u] += 1
        before, accuracy = accuracy, {u: (agree[u] + PRIOR[0]) / (counted[u] + sum(PRIOR)) for u in users}
        if max((abs(accuracy[u] - before[u]) for u in users), default=0.0) < 1e-6:
            break  # converged (a few dozen passes at most in practice)
    on_gold, right = defaultdict(int), defaultdict(int)
    for p in known:
        for u, a in by_pair[p]:
            on_gold[u] += 1
            right[u] += a == (known[p] == 1.0)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return {u: Reliability(u, counted[u], accuracy[u], *_wilson(agree[u], counted[u], z), on_gold[u], right[u])
            for u in users}, posterior


def _wilson(successes: float, n: int, z: float) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def snapshot_accuracy(store: Store, aggregate: str) -> dict[str, float] | None:
    """Each labeller's estimated accuracy by name, for a snapshot's weighted labels
    (`store.export.snapshot`); None when `labeling.aggregate` is "majority"."""
    if aggregate == "majority":
        return None
    people, _ = estimate(store.human_labels(), store.gold_answers())
    names = {u["id"]: u["name"] for u in store.users()}
    return {names[u]: r.accuracy for u, r in people.items() if u in names}
