"""The queue ranker (`labeling.order = "active"`): the gate's newest reward model, refreshed on all
labels so far, scores both replies of each pair waiting for labels, and the gateway ranks the queue
by the margins (loop/evaluation/active.py: the model unsure, votes split, a prompt not labelled yet).

It runs at the end of every retrain cycle (after the gate: the reward model is then the newest) and
on `alignloop rank`. It goes through the gateway's API like the rest of a cycle, and loads the
reward model in this process, as the gate does.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from loop.client import GatewayClient
from loop.config import Config


def rank(cfg: Config, client: GatewayClient, log=print) -> dict[str, Any]:
    """Score the head of the queue (`labeling.rank_limit` pairs) and rank it; returns what was done
    ({"ranked": n, ...}, or {"ranked": 0, "reason": why not})."""
    from loop.retrain import latest_judge_model
    from loop.training.reward import RewardModel

    if cfg.labeling.order != "active":
        return {"ranked": 0, "reason": f"labeling.order is {cfg.labeling.order!r}, not 'active'"}
    judge = latest_judge_model(client)
    if judge is None or not Path(judge["path"]).exists():
        return {"ranked": 0, "reason": "no reward model to score with yet (a retrain fits the gate's first one); "
                                       "until then the queue hands out the newest pairs first"}
    waiting = client.call("GET", "/api/queue", params={"limit": cfg.labeling.rank_limit})["pairs"]
    if not waiting:
        return {"ranked": 0, "reason": "no pairs are waiting for labels"}
    model = RewardModel.load(judge["path"])
    prompts = [p["messages"] for p in waiting]
    a, b = model.score(prompts, [p["a"] for p in waiting]), model.score(prompts, [p["b"] for p in waiting])
    margins = [{"pair_id": p["pair_id"], "margin": max(-1e6, min(1e6, x - y))}
               for p, x, y in zip(waiting, a.tolist(), b.tolist()) if math.isfinite(x - y)]
    done = client.call("POST", "/api/queue/margins", json={"reward_model_id": judge["id"], "margins": margins})
    log(f"ranked {done['ranked']} waiting pairs by the reward model {judge['id']} (run {judge['run_id']})")
    return done
