"""What the dashboard shows, computed from the store: one dict, served as `GET /api/stats`."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from loop.evaluation import ranking, reliability
from store.database import Store
from store.labelling import LabelQueue
from store.reward_models import RewardModels


RUN_FIELDS_ADMIN_ONLY = ("config", "snapshot_hash")  # what a run was configured with (paths, settings)


def stats(store: Store, queue: LabelQueue, runs: list[dict[str, Any]], admin: bool = True,
          min_accuracy: float = 0.7) -> dict[str, Any]:
    """Everything the dashboard shows, with the newest `runs` (`Runs.recent`); a labeller's copy
    leaves out what runs were configured with and how reliable each labeller is (admin-only data)."""
    by_pair: dict[int, list[str]] = defaultdict(list)
    labels = store.human_labels()
    for pair_id, _, choice in labels:
        by_pair[pair_id].append(choice)
    overlapping = [v for v in by_pair.values() if len(v) >= 2]
    results = ranking.outcomes(store.version_comparisons())
    names = {v["id"]: v["name"] for v in store.versions()}
    parents = {v["id"]: v["parent_id"] for v in store.versions()}
    rates = ranking.win_rates(results)
    over_parent = []
    for vid, parent in parents.items():
        if parent is None:
            continue
        key = (vid, parent) if vid > parent else (parent, vid)
        if key in rates:
            rate, n = rates[key]
            over_parent.append({"version": names[vid], "parent": names.get(parent, str(parent)),
                                "win_rate": rate if vid > parent else 1 - rate, "comparisons": n})
    strengths = ranking.bradley_terry(results)
    elo = ranking.elo(results)
    for run in runs:
        run["curve"] = store.run_metrics(run["id"])
    if not admin:
        runs = [{k: v for k, v in run.items() if k not in RUN_FIELDS_ADMIN_ONLY} for run in runs]
    out = {
        "labels_per_day": store.labels_per_day(),
        "labels_per_labeller": store.labels_per_labeller(),
        "queue": queue.progress(user_id=-1)["queue"],
        "agreement": {"pairs": len(overlapping), "fleiss_kappa": ranking.fleiss_kappa(overlapping),
                      "cohen_kappa": ranking.cohen_kappa((v[0], v[1]) for v in overlapping if len(v) == 2)},
        "win_rate_over_parent": over_parent,
        "ranking": sorted(({"version": names.get(v, str(v)), "bradley_terry": s, "elo": elo[v]}
                           for v, s in strengths.items()), key=lambda r: -r["bradley_terry"]),
        "runs": runs,
        "reward_models": [{k: r[k] for k in ("id", "run_id", "purpose", "accuracy", "created_at")}
                          for r in RewardModels(store).list()],
    }
    if admin:
        out["labellers"] = labellers(store, labels, min_accuracy)
    return out


def labellers(store: Store, labels: list[tuple[int, int, str]], min_accuracy: float) -> list[dict[str, Any]]:
    """Each labeller's accuracy estimated from agreement and gold pairs (loop.evaluation.reliability),
    with its interval and their gold record; flagged when the whole interval is below `min_accuracy`.
    Least reliable first."""
    people, _ = reliability.estimate(labels, store.gold_answers())
    users = {u["id"]: u for u in store.users()}
    rows = [{"name": users[r.user_id]["name"], "votes": r.votes, "accuracy": r.accuracy, "low": r.low,
             "high": r.high, "gold": r.gold, "gold_right": r.gold_right, "flagged": r.high < min_accuracy,
             "excluded": users[r.user_id]["excluded_at"] is not None}
            for r in people.values() if r.user_id in users]
    return sorted(rows, key=lambda r: r["accuracy"])
