"""Dashboard: labelling throughput and agreement, how each version fares, retrain runs — as plots."""

import json

import streamlit as st

from labeling_ui import api, charts

ss = st.session_state

try:
    s = api.stats(ss.token)
except api.ApiError as e:
    st.error(e.message)
    st.stop()


def kappa(k: float | None) -> str:
    return "n/a" if k is None else f"{k:.2f}"


def plot(column, rows, chart, empty: str) -> None:
    if rows:
        column.altair_chart(chart(rows), width="stretch")
    else:
        column.info(empty)


FIRST_NUMBERS = ("win_rate", "win_rate_lower", "win_rate_heldout", "win_rate_shadow", "kl_to_base", "train_pairs",
                 "eval_rewards/accuracies", "eval_loss", "train_seconds")


def metrics(run: dict) -> dict:
    m = run.get("metrics") or {}
    return json.loads(m) if isinstance(m, str) else m


agreement = s["agreement"]
m = st.columns(5)
m[0].metric("Pairs in the queue", s["queue"])
m[1].metric("Labels, all days", sum(d["labels"] for d in s["labels_per_day"]))
m[2].metric("Pairs with 2+ labels", agreement["pairs"])
m[3].metric("Fleiss' kappa", kappa(agreement["fleiss_kappa"]), help="agreement between labellers beyond chance")
m[4].metric("Cohen's kappa", kappa(agreement["cohen_kappa"]), help="the same, for pairs with exactly two labels")

columns = st.columns(3)
per_labeller = s["labels_per_labeller"]
plot(columns[0], s["labels_per_day"], charts.labels_per_day, "No labels yet.")
plot(columns[1], per_labeller, charts.labels_per_labeller, "No labels yet.")
plot(columns[2], [r for r in per_labeller if r["median_seconds"] is not None], charts.seconds_per_label,
     "No label has its time on screen yet.")

if "labellers" in s:  # admins only
    st.subheader("Labellers")
    st.caption("How often each labeller picks the better reply, estimated from how they agree with the others "
               "and from gold pairs, whose answer is known (Dawid-Skene; only first/second votes count), with a "
               "90% interval. Gold: right of first/second votes on gold pairs (`alignloop gold FILE` adds them). "
               "Flagged: the whole interval is below `labeling.min_accuracy`. Exclude a labeller on the admin page's Users tab.")
    if s["labellers"]:
        st.dataframe([{"labeller": r["name"], "votes compared": r["votes"], "accuracy": round(r["accuracy"], 2),
                       "interval": f"{r['low']:.2f}-{r['high']:.2f}",
                       "gold": f"{r['gold_right']}/{r['gold']}" if r["gold"] else "",
                       "flagged": "⚠" if r["flagged"] else "",
                       "excluded": "yes" if r["excluded"] else ""} for r in s["labellers"]], hide_index=True)
    else:
        st.info("No votes to compare yet: it needs pairs labelled by two or more people, or gold pairs.")

st.subheader("Model versions")
runs = s["runs"]
judged = [{"run": r["id"], "method": r["method"], "status": r["status"], "win_rate": m["win_rate"],
           "lower": m.get("win_rate_lower", m["win_rate"]), "upper": m.get("win_rate_upper", m["win_rate"]),
           "judge": m.get("judge", ""), "held_out": m.get("win_rate_heldout"), "shadow": m.get("win_rate_shadow"),
           "shadow_prompts": m.get("shadow_prompts", 0)} for r in reversed(runs) if "win_rate" in (m := metrics(r))]
columns = st.columns(3)
plot(columns[0], s["win_rate_over_parent"], charts.win_rate_over_parent,
     "No version has been compared with its parent by people yet (arena votes and live pairs do that).")
plot(columns[1], s["ranking"], charts.ranking, "No ranking yet: it needs labels on pairs from two versions.")
plot(columns[2], judged, charts.run_win_rates, "No run has judged a candidate yet." if not runs else
     f"None of the {len(runs)} runs so far judged a candidate: each one's reason is under Retrain runs.")
reward_models = [r for r in reversed(s.get("reward_models", [])) if r["accuracy"] is not None]
if reward_models:
    plot(st.columns(3)[0], reward_models, charts.reward_model_accuracy, "")

st.subheader("Retrain runs")
if not runs:
    st.info("No retrain runs yet.")
else:
    names = {f"run {r['id']} · {r['method']} · {r['status']}": r for r in runs}
    run = names[st.selectbox("Run", list(names), label_visibility="collapsed")]
    if run.get("reason"):
        st.caption(run["reason"])
    numbers = {k: v for k, v in metrics(run).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    first = [k for k in FIRST_NUMBERS if k in numbers] + [k for k in numbers if k not in FIRST_NUMBERS]
    for row in (first[:3], first[3:6]):  # three a row: names like eval_rewards/accuracies fit
        for column, name in zip(st.columns(3), row):
            value = numbers[name]
            column.metric(name, f"{value:.3g}" if isinstance(value, float) else value)
    if run["curve"]:
        st.altair_chart(charts.run_curves(run["curve"], f"Run {run['id']} ({run['method']})"))
    else:
        st.caption("This run recorded no training curve.")
