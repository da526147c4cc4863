"""Gold pairs against agreement alone: when the bad labellers agree with one another, only a known
answer can tell them from the good ones.

Per seed and gold share: a store with `--pairs` regular pairs and `--gold` gold pairs (reply a
the better one of each), six simulated labellers who take turns through the real `LabelQueue`
(overlap 2) until the queue is empty: three careful ones (right 95% of the time) and three who
agree on the worse reply (right 5% of the time). Then `loop.evaluation.reliability.estimate`
on their votes and the gold answers, and against the simulation's truth, which the estimate never
sees on the regular pairs:

- AUC: the share of (careful, bad) labeller pairs in which the careful one has the higher accuracy;
- labels right: the share of regular pairs whose weighted answer (posterior > 1/2) is the better reply;
- labels on gold: the share of all labels spent on gold pairs (what gold costs).

    .venv/bin/python ops/bench/gold.py [--seeds 0,1,2,3,4] [--pairs 300] [--gold 20] [--shares 0,0.05,0.1,0.2]

Results and the command that made them: ops/bench/results/gold.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from loop.evaluation.reliability import estimate  # noqa: E402
from store import Store  # noqa: E402
from store.database import NewPair  # noqa: E402
from store.labelling import LabelQueue  # noqa: E402

LABELLERS = {"careful-1": 0.95, "careful-2": 0.95, "careful-3": 0.95, "bad-1": 0.05, "bad-2": 0.05, "bad-3": 0.05}
CAREFUL = ("careful-1", "careful-2", "careful-3")


def run(seed: int, pairs: int, gold: int, share: float) -> dict[str, float]:
    rng = random.Random(f"gold:{seed}")
    with Store(":memory:") as store:
        store.add_labelled_pairs([NewPair([{"role": "user", "content": f"q{seed}-{i}"}], f"better {i}", f"worse {i}")
                                  for i in range(pairs)], "import:bench", "dataset:bench")
        store.add_gold_pairs([NewPair([{"role": "user", "content": f"gold q{seed}-{i}"}], f"better g{i}", f"worse g{i}")
                              for i in range(gold)], "gold:bench")
        users = {store.user_by_token(store.add_user(name, "labeller"))["id"]: name for name in LABELLERS}
        queue = LabelQueue(store, overlap=2, lease_s=600, gold_share=share)
        active = list(users)
        while active:
            for user_id in list(active):
                pair = queue.next_pair(user_id)
                if pair is None:
                    active.remove(user_id)
                    continue
                first_better = pair["first"].startswith("better")
                right = rng.random() < LABELLERS[users[user_id]]
                queue.submit(user_id, pair["pair_id"], "first" if first_better == right else "second")
        votes, answers = store.human_labels(), store.gold_answers()
    people, posterior = estimate(votes, answers)
    accuracy = {users[u]: r.accuracy for u, r in people.items()}
    bad = [n for n in LABELLERS if n not in CAREFUL]
    regular = [p for p in posterior if p not in answers]
    return {"auc": sum(accuracy[c] > accuracy[b] for c in CAREFUL for b in bad) / (len(CAREFUL) * len(bad)),
            "right": sum(posterior[p] > 0.5 for p in regular) / len(regular),  # reply a is the better one
            "on_gold": sum(p in answers for p, _, _ in votes) / len(votes)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--gold", type=int, default=20)
    parser.add_argument("--shares", default="0,0.05,0.1,0.2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print("| gold share | AUC (careful above bad), mean [min] | regular pairs labelled right, mean [min] | labels on gold |")
    print("| --- | --- | --- | --- |")
    for share in (float(s) for s in args.shares.split(",")):
        rows = [run(seed, args.pairs, args.gold, share) for seed in seeds]
        auc, right, cost = ([r[k] for r in rows] for k in ("auc", "right", "on_gold"))
        print(f"| {share:g} | {statistics.mean(auc):.2f} [{min(auc):.2f}] | {statistics.mean(right):.3f} "
              f"[{min(right):.3f}] | {statistics.mean(cost):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
