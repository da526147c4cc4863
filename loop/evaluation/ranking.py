"""Small pure functions for the dashboard: label agreement and version rankings.

- Fleiss' kappa (Fleiss 1971, "Measuring nominal scale agreement among many raters"): agreement of
  several raters on categorical labels, beyond chance. kappa = (P_bar - P_e) / (1 - P_e).
- Cohen's kappa (Cohen 1960) for exactly two raters: (p_o - p_e) / (1 - p_e).
- Bradley-Terry strengths (Bradley & Terry 1952) by the minorisation-maximisation update of
  Hunter (2004): p_i <- W_i / sum_j n_ij / (p_i + p_j); a tie counts half a win to each side.
- Elo ratings (K = 16, start 1000), replayed in label order.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

CATEGORIES = ("a", "b", "tie", "both_bad")


def fleiss_kappa(items: Sequence[Sequence[str]], categories: Sequence[str] = CATEGORIES) -> float | None:
    """Fleiss' kappa over items that each have the same number (>= 2) of ratings; None if undefined."""
    items = [r for r in items if len(r) >= 2]
    if not items:
        return None
    n = len(items[0])
    items = [r for r in items if len(r) == n]
    totals = Counter()
    p_bar = 0.0
    for ratings in items:
        counts = Counter(ratings)
        totals.update(counts)
        p_bar += (sum(c * c for c in counts.values()) - n) / (n * (n - 1))
    p_bar /= len(items)
    p_e = sum((totals[c] / (len(items) * n)) ** 2 for c in categories)
    if p_e == 1.0:
        return None
    return (p_bar - p_e) / (1 - p_e)


def cohen_kappa(pairs: Iterable[tuple[str, str]]) -> float | None:
    pairs = list(pairs)
    if not pairs:
        return None
    p_o = sum(a == b for a, b in pairs) / len(pairs)
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    p_e = sum(first[c] * second[c] for c in set(first) | set(second)) / len(pairs) ** 2
    if p_e == 1.0:
        return None
    return (p_o - p_e) / (1 - p_e)


def outcomes(comparisons: Iterable[tuple[int, int, str]]) -> list[tuple[int, int, float]]:
    """(version a, version b, choice) -> (winner-side score for a: 1, 0.5 or 0); both-bad and skips dropped."""
    score = {"a": 1.0, "b": 0.0, "tie": 0.5}
    return [(a, b, score[c]) for a, b, c in comparisons if c in score and a != b]


def bradley_terry(results: Sequence[tuple[int, int, float]], iterations: int = 200) -> dict[int, float]:
    """Strengths normalised to sum to 1 (higher is better)."""
    players = sorted({p for a, b, _ in results for p in (a, b)})
    if not players:
        return {}
    wins: dict[int, float] = defaultdict(float)
    games: dict[tuple[int, int], float] = defaultdict(float)
    for a, b, s in results:
        wins[a] += s
        wins[b] += 1 - s
        games[(a, b)] += 1
        games[(b, a)] += 1
    p = {x: 1.0 / len(players) for x in players}
    for _ in range(iterations):
        new = {}
        for i in players:
            denom = sum(n / (p[i] + p[j]) for (x, j), n in games.items() if x == i)
            new[i] = (wins[i] + 1e-3) / denom if denom else p[i]  # a tiny prior keeps winless players > 0
        total = sum(new.values())
        p = {x: v / total for x, v in new.items()}
    return p


def elo(results: Iterable[tuple[int, int, float]], k: float = 16.0, start: float = 1000.0) -> dict[int, float]:
    ratings: dict[int, float] = defaultdict(lambda: start)
    for a, b, s in results:
        expected = 1 / (1 + 10 ** ((ratings[b] - ratings[a]) / 400))
        ratings[a] += k * (s - expected)
        ratings[b] -= k * (s - expected)
    return dict(ratings)


def win_rates(results: Iterable[tuple[int, int, float]]) -> dict[tuple[int, int], tuple[float, int]]:
    """(x, y) with x > y -> (x's win rate over y, comparisons), ties counting half."""
    acc: dict[tuple[int, int], list[float]] = defaultdict(list)
    for a, b, s in results:
        key, score = ((a, b), s) if a > b else ((b, a), 1 - s)
        acc[key].append(score)
    return {k: (sum(v) / len(v), len(v)) for k, v in acc.items()}
