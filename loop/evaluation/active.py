"""Active learning: which pairs people should label first, by how much a label would teach.

A pair's score has three parts, each in [0, 1]:

- **uncertainty**: how unsure the current reward model (the gate's, refreshed on all labels so far)
  is of which reply is better. With one model: 1 - |2 sigmoid(r_a - r_b) - 1|, 1 at a margin of 0,
  near 0 when it is sure. A margin near 0 also marks a pair whose replies are equally good, which
  people call a tie and which teaches nothing; with several models (an ensemble fitted on
  resamples of the labels) it is what a label would tell them, not what they agree is a coin flip:
  BALD's mutual information, H(mean p) - mean H(p) in bits (Houlsby et al. 2011), 0 when every
  member says the same, tie or not.
- **disagreement**: how split the pair's votes so far are: 2 min(n_a, n_b) / (n_a + n_b) over its
  decisive votes (0 with fewer than two): another label settles a split.
- **novelty**: 1 / (1 + pairs of the same prompt already labelled or ranked ahead), so the queue's
  head spreads over prompts instead of spending labels on one prompt's many pairs.

score = max(uncertainty, disagreement) x novelty. `rank` orders the pairs greedily: the best pair
first, then each next one with novelty counting the pairs of its prompt ranked before it, so its
scores fall along the order (what the queue sorts by; pairs made after the last ranking sit at
`store.labelling.UNSCORED`).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """A pair waiting for labels, as the ranking sees it."""
    pair_id: int
    prompt: Hashable       # pairs of one prompt share this (e.g. the prompt's id)
    margin: float          # reward of reply a minus reward of reply b, by the current reward model
    votes_a: int = 0
    votes_b: int = 0
    others: tuple[float, ...] = ()  # the same margin by the ensemble's other members, if any


@dataclass(frozen=True)
class Scored:
    pair_id: int
    score: float
    uncertainty: float
    disagreement: float
    novelty: float


def uncertainty(margin: float, others: tuple[float, ...] = ()) -> float:
    """One model: 1 - |2 sigmoid(margin) - 1| = 1 - |tanh(margin / 2)|, 1 when it cannot tell, 0 when
    sure. An ensemble (`others` too): the mutual information between the label and the member."""
    if not others:
        return 1.0 - abs(math.tanh(margin / 2.0))
    ps = [1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, m)))) for m in (margin, *others)]
    return max(0.0, min(1.0, _entropy(sum(ps) / len(ps)) - sum(map(_entropy, ps)) / len(ps)))


def _entropy(p: float) -> float:
    """In bits, of a coin that lands heads with probability p."""
    return -sum(q * math.log2(q) for q in (p, 1.0 - p) if q > 0)


def disagreement(votes_a: int, votes_b: int) -> float:
    decisive = votes_a + votes_b
    return 0.0 if decisive < 2 else 2.0 * min(votes_a, votes_b) / decisive


def rank(candidates: Sequence[Candidate], labelled_per_prompt: Counter | None = None) -> list[Scored]:
    """The candidates, best first, each with its score and the parts it is made of."""
    seen = Counter(labelled_per_prompt or {})
    base = {c.pair_id: (uncertainty(c.margin, c.others), disagreement(c.votes_a, c.votes_b)) for c in candidates}
    heap = [(-max(base[c.pair_id]) / (1 + seen[c.prompt]), seen[c.prompt], i) for i, c in enumerate(candidates)]
    heapq.heapify(heap)
    out = []
    while heap:  # lazy greedy: a pair's novelty only falls, so a stale entry is pushed back with its new score
        _, counted, i = heapq.heappop(heap)
        c = candidates[i]
        if counted != seen[c.prompt]:
            heapq.heappush(heap, (-max(base[c.pair_id]) / (1 + seen[c.prompt]), seen[c.prompt], i))
            continue
        novelty = 1.0 / (1 + seen[c.prompt])
        u, d = base[c.pair_id]
        out.append(Scored(c.pair_id, max(u, d) * novelty, u, d, novelty))
        seen[c.prompt] += 1
    return out
