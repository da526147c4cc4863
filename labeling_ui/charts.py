"""The dashboard's plots: each takes one part of `GET /api/stats` and returns an Altair chart."""

from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd

HEIGHT = 260  # px, title and axes included
COUNT = alt.Axis(tickMinStep=1, format="d")


def thick(n: int, across: str = "width", slots: int = 6) -> dict[str, alt.RelativeBandSize]:
    """Bars as thick as if there were at least `slots` of them: one day or one labeller is a bar, not a wall."""
    return {across: alt.RelativeBandSize(0.8 * min(1.0, n / slots))}


def labels_per_day(rows: list[dict[str, Any]]) -> alt.Chart:
    return alt.Chart(pd.DataFrame(rows), height=HEIGHT, title="Labels per day").mark_bar(**thick(len(rows))).encode(
        x=alt.X("day:O", title=None, axis=alt.Axis(
            labelAngle=0, labelOverlap=True, labelExpr="utcFormat(toDate(datum.value), '%b %d')")),
        y=alt.Y("labels:Q", title="labels", axis=COUNT),
        tooltip=["day:N", "labels:Q"])


def labels_per_labeller(rows: list[dict[str, Any]]) -> alt.Chart:
    return alt.Chart(pd.DataFrame(rows), height=HEIGHT, title="Labels per labeller").mark_bar(
        **thick(len(rows), "height")).encode(
        y=alt.Y("name:N", title=None, sort="-x"), x=alt.X("labels:Q", title="labels", axis=COUNT),
        tooltip=["name:N", "labels:Q"])


def seconds_per_label(rows: list[dict[str, Any]]) -> alt.Chart:
    data = pd.DataFrame(rows).dropna(subset=["median_seconds"])
    return alt.Chart(data, height=HEIGHT, title="Median seconds per label").mark_bar(
        color="#f58518", **thick(len(data), "height")).encode(
        y=alt.Y("name:N", title=None, sort="x"),
        # at least 0-1 s: with every median 0 (scripted labellers) the axis was a column of "0.000000"
        x=alt.X("median_seconds:Q", title="seconds", axis=alt.Axis(format=".1~f"),
                scale=alt.Scale(domain=[0, max(1.0, float(data["median_seconds"].max()) if len(data) else 1.0)], nice=True)),
        tooltip=["name:N", alt.Tooltip("median_seconds:Q", format=".1f")])


def win_rate_over_parent(rows: list[dict[str, Any]]) -> alt.LayerChart:
    data = pd.DataFrame(rows)
    data["matchup"] = data["version"] + " vs " + data["parent"]
    data["votes"] = "n=" + data["comparisons"].astype(str)  # one vote reads as 1.0: the count says how sure
    bars = alt.Chart(data).mark_bar(**thick(len(data))).encode(
        x=alt.X("matchup:N", title=None, sort=None, axis=alt.Axis(labelAngle=0)),
        y=alt.Y("win_rate:Q", title="win rate over parent", scale=alt.Scale(domain=[0, 1])),
        color=alt.condition("datum.win_rate >= 0.5", alt.value("#54a24b"), alt.value("#e45756")),
        tooltip=["version:N", "parent:N", alt.Tooltip("win_rate:Q", format=".2f"), "comparisons:Q"])
    counts = bars.mark_text(dy=-8).encode(text="votes:N", color=alt.value("black"))
    even = alt.Chart(pd.DataFrame({"y": [0.5]})).mark_rule(strokeDash=[4, 4], color="gray").encode(y="y:Q")
    return alt.layer(bars, counts, even).properties(height=HEIGHT, title=alt.Title(
        "Versions vs their parents", subtitle=["people's votes", "n: how many"]))


def ranking(rows: list[dict[str, Any]]) -> alt.Chart:
    return alt.Chart(pd.DataFrame(rows), height=HEIGHT, title="Elo rating of each version").mark_point(
        filled=True, size=160).encode(
        x=alt.X("version:N", title=None, sort="-y", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("elo:Q", title="Elo", scale=alt.Scale(zero=False, padding=20)),
        tooltip=["version:N", alt.Tooltip("elo:Q", format=".0f"), alt.Tooltip("bradley_terry:Q", format=".3f")])


# the curves a person looks at first; the others follow by name
FIRST_CURVES = ("loss", "rewards/margins", "rewards/accuracies", "reward", "kl", "reward/loss", "reward/accuracy")


def curve_order(names: list[str]) -> list[str]:
    first = [n for n in FIRST_CURVES if n in names]
    return first + sorted(set(names) - set(first))


def run_curves(curve: list[dict[str, Any]], title: str) -> alt.Chart:
    """One small line plot per metric of a training run that logged it more than once (losses and
    rewards have different scales; a PPO run's reward-model steps and PPO steps have different
    lengths), the usual ones first."""
    data = pd.DataFrame(curve)
    data = data[data.groupby("name")["step"].transform("count") > 1]
    order = curve_order(list(data["name"].unique()))
    return alt.Chart(data, title=title).mark_line(point=len(data) < 40).encode(
        x=alt.X("step:Q"), y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
        color=alt.Color("name:N", legend=None, sort=order), tooltip=["name:N", "step:Q", "value:Q"],
    ).properties(width=220, height=150).facet(facet=alt.Facet("name:N", title=None, sort=order),
                                              columns=3).resolve_scale(x="independent", y="independent")


def run_win_rates(rows: list[dict[str, Any]]) -> alt.LayerChart:
    """Each run's judged win rate of its candidate over what served then, with the gate's confidence
    interval (rows may lack one: runs from before it), coloured by the gate's verdict."""
    data = pd.DataFrame(rows)
    for bound in ("lower", "upper"):
        if bound not in data:
            data[bound] = data["win_rate"]
    for part in ("held_out", "shadow", "judge"):
        if part not in data:
            data[part] = None
    x = alt.X("run:O", title="run", axis=alt.Axis(labelAngle=0))
    bars = alt.Chart(data).mark_bar(**thick(len(data))).encode(
        x=x, y=alt.Y("win_rate:Q", title="judged win rate", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("status:N", title=None, scale=alt.Scale(
            domain=["promoted", "rejected", "held"], range=["#54a24b", "#e45756", "#f2a93b"]), legend=None),
        tooltip=["run:O", "method:N", "status:N", alt.Tooltip("win_rate:Q", format=".2f"),
                 alt.Tooltip("lower:Q", format=".2f"), alt.Tooltip("upper:Q", format=".2f"),
                 alt.Tooltip("held_out:Q", title="on held-out prompts", format=".2f"),
                 alt.Tooltip("shadow:Q", title="on live prompts (shadow)", format=".2f"), "judge:N"])
    interval = alt.Chart(data).mark_rule(color="black").encode(x=x, y="lower:Q", y2="upper:Q")
    even = alt.Chart(pd.DataFrame({"y": [0.5]})).mark_rule(strokeDash=[4, 4], color="gray").encode(y="y:Q")
    return alt.layer(bars, interval, even).properties(height=HEIGHT, title=alt.Title(
        "Candidates vs what served", subtitle=["green promoted, red rejected", "amber held; black: the interval"]))


def reward_model_accuracy(rows: list[dict[str, Any]]) -> alt.LayerChart:
    """Each refreshed reward model's held-out preference accuracy (0.5: a coin)."""
    data = pd.DataFrame(rows)
    bars = alt.Chart(data).mark_bar(**thick(len(data))).encode(
        x=alt.X("id:O", title="reward model", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("accuracy:Q", title="held-out accuracy", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("purpose:N", title=None, scale=alt.Scale(
            domain=["judge", "reward"], range=["#4c78a8", "#b279a2"])),
        tooltip=["id:O", "run_id:O", "purpose:N", alt.Tooltip("accuracy:Q", format=".2f")])
    coin = alt.Chart(pd.DataFrame({"y": [0.5]})).mark_rule(strokeDash=[4, 4], color="gray").encode(y="y:Q")
    return alt.layer(bars, coin).properties(height=HEIGHT, title=alt.Title(
        "Reward models", subtitle=["judge: the gate's, each cycle", "reward: what PPO optimised"]))
