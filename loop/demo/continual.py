"""`alignloop simulate --nights N`: the loop night after night, as its simulated people live it.

Each night, on a running gateway:

1. the simulated users send live traffic to what serves now, so the night's new pairs are on-policy
   (`simulate.traffic`);
2. with `labeling.order = "active"`, the scheduler re-ranks the queue (as its `rank_every_s` job
   would between the traffic and the labellers); the simulated labellers label the queue through
   the HTTP API (`simulate.label`), empty or up to `labels` a night (a budget: what the queue's order
   decides is which pairs get them);
3. the scheduler's nightly trigger runs one retrain (`Scheduler.trigger`: snapshot, train, the gate
   with its own judge, promotion or not);
4. the simulated people grade what serves then: the demo rule, on the demo corpus's held-out
   prompts, with sampling seeds no gate uses, and the night's candidate too, whatever the gate
   decided (so a rejection the truth disagrees with shows). It grades only; the gate never sees it.

A night's record: the labels people gave (that night and in all), the gate's decision and KL, and
the grades: the share of good answers, the win rate over the base and over the version it replaced
(each with a two-sided 95% interval; ties count half), and the candidate's good share and win over
what served before the night. Night 0 is the base before any training.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from loop.client import GatewayClient, version_name
from loop.config import Config
from loop.demo import corpus as demo_corpus
from loop.demo import judge
from loop.demo.simulate import label, traffic
from loop.evaluation.gate import POINTS, confidence_bounds

GRADE_SEEDS = (7001, 7002)  # the gate samples with train.seed + 1000 * sample: these it never uses

Answers = dict[tuple[str, int], list[str]]


def heldout_prompts() -> list[str]:
    return demo_corpus.prompts("heldout")


def answers(client: GatewayClient, model: str, seed: int, cache: Answers) -> list[str]:
    """`model`'s answers to the held-out prompts at temperature 1 (what a client gets by default)."""
    if (model, seed) not in cache:
        body = {"model": model, "prompts": [[{"role": "user", "content": p}] for p in heldout_prompts()],
                "max_tokens": 64, "temperature": 1.0, "seed": seed}
        cache[(model, seed)] = [a["text"] for a in client.call("POST", "/api/generate", json=body)["answers"]]
    return cache[(model, seed)]


def good_share(client: GatewayClient, model: str, cache: Answers, seeds=GRADE_SEEDS) -> float:
    verdicts = [judge.is_good(p, text) for seed in seeds
                for p, text in zip(heldout_prompts(), answers(client, model, seed, cache))]
    return sum(verdicts) / len(verdicts)


def win_rate(client: GatewayClient, model: str, against: str, cache: Answers,
             seeds=GRADE_SEEDS) -> tuple[float, float, float]:
    """(mean, lower, upper): the demo rule's win rate of `model` over `against`, 95% two-sided."""
    scores = [POINTS[judge.prefer(p, x, y)] for seed in seeds
              for p, x, y in zip(heldout_prompts(), answers(client, model, seed, cache),
                                 answers(client, against, seed, cache))]
    return confidence_bounds(scores, 0.025)


def standing(client: GatewayClient) -> tuple[str, int, int]:
    """(the version that serves, by name; human labels given; pairs made), from one status call."""
    status = client.call("GET", "/api/status")
    name = version_name(status["serving"] or 0)
    return name, status["counts"]["labels"], status["counts"]["pairs"]


def night(cfg: Config, client: GatewayClient, number: int, pairs: int, labellers: int, seed: int,
          cache: Answers, log: Callable[[str], None] = print, labels: int | None = None) -> dict[str, Any]:
    """One night: traffic until `pairs` new pairs (or none), labels (at most `labels`), the nightly
    retrain, the grades."""
    from loop.scheduler import Scheduler

    scheduler = Scheduler(cfg, log=log)
    before, labels_before, have = standing(client)
    sent = traffic(client, cfg.model.served_name, have + pairs, seed=seed * 1000 + number, log=log) if pairs else 0
    if cfg.labeling.order == "active":
        scheduler.rank()
    label(client, labellers, limit=10**9 if labels is None else labels, log=log)
    run = scheduler.trigger("simulated night") or {"status": "not started", "reason": "see the log"}
    metrics = run.get("metrics") or {}
    metrics = json.loads(metrics) if isinstance(metrics, str) else metrics
    after, labels_after, _ = standing(client)
    replaced = before if after != before else None
    record = {"night": number, "requests": sent, "labels": labels_after - labels_before,
              "labels_total": labels_after, "run": run.get("id"), "method": run.get("method"),
              "decision": run["status"], "reason": run.get("reason"), "kl_to_base": metrics.get("kl_to_base"),
              "gate_win_rate": metrics.get("win_rate"), "serving": after, "replaced": replaced}
    record.update(grades(client, after, replaced, cache))
    record.update(candidate_grades(client, run.get("candidate_version_id"), before, cache))
    log(f"night {number}: {record['labels']} labels ({record['labels_total']} in all), {record['decision']}, "
        f"{after} serves: good {record['good']:.3f}, over base {record['win_over_base'][0]:.3f}")
    return record


def candidate_grades(client: GatewayClient, candidate_id: int | None, before: str, cache: Answers) -> dict[str, Any]:
    """The simulated people's grades of the night's candidate, whatever the gate decided: its good
    share and its win over what served before the night (what the gate compared it with). A rejected
    candidate that wins here is one the gate held back; a promoted one that loses, one it let through."""
    if not candidate_id:
        return {"candidate": None, "candidate_good": None, "candidate_over_before": None}
    name = version_name(candidate_id)
    return {"candidate": name, "candidate_good": good_share(client, name, cache),
            "candidate_over_before": win_rate(client, name, before, cache)}


def grades(client: GatewayClient, serving: str, replaced: str | None, cache: Answers) -> dict[str, Any]:
    """The simulated people's grades of what serves: good share, win over the base, over what it replaced."""
    over_base = win_rate(client, serving, "base", cache) if serving != "base" else (0.5, 0.5, 0.5)
    over_previous = win_rate(client, serving, replaced, cache) if replaced else None
    return {"good": good_share(client, serving, cache), "win_over_base": over_base,
            "win_over_previous": over_previous,
            "worse_than_previous": bool(over_previous and over_previous[2] < 0.5)}


def nights(cfg: Config, client: GatewayClient, count: int, pairs: int, labellers: int = 4, seed: int = 0,
           log: Callable[[str], None] = print, labels: int | None = None) -> list[dict[str, Any]]:
    """Night 0 (what serves before the first night, graded) and `count` nights (`labels`: a nightly
    label budget; None: the queue is labelled empty)."""
    cache: Answers = {}
    serving, given, _ = standing(client)
    start = {"night": 0, "requests": 0, "labels": 0, "labels_total": given, "run": None,
             "method": None, "decision": None, "reason": None, "kl_to_base": None, "gate_win_rate": None,
             "serving": serving, "replaced": None, **grades(client, serving, None, cache)}
    records = [start]
    for number in range(1, count + 1):
        records.append(night(cfg, client, number, pairs, labellers, seed, cache, log, labels))
        keep = ("base", records[-1]["serving"])  # what no longer serves is not graded again
        cache = {key: texts for key, texts in cache.items() if key[0] in keep}
    return records


def table(records: list[dict[str, Any]]) -> str:
    """A Markdown table of the nights."""
    def interval(v) -> str:
        return "-" if v is None else f"{v[0]:.3f} ({v[1]:.3f}-{v[2]:.3f})"

    def number(v, fmt=".2f") -> str:
        return "-" if v is None else format(v, fmt)

    rows = ["| night | labels (in all) | decision | KL | serves | good share | win over base | "
            "win over the one it replaced | candidate's good share | candidate's win over what served |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        rows.append(f"| {r['night']} | {r['labels']} ({r['labels_total']}) | {r['decision'] or '-'} | "
                    f"{number(r['kl_to_base'])} | {r['serving']} | {r['good']:.3f} | {interval(r['win_over_base'])} | "
                    f"{interval(r['win_over_previous'])} | {number(r.get('candidate_good'), '.3f')} | "
                    f"{interval(r.get('candidate_over_before'))} |")
    return "\n".join(rows)
