"""Admin: what serves, model versions (promote, rollback, retrain), users, guidelines, runs, export."""

import json

import streamlit as st

from labeling_ui import api, pair
from loop.client import version_name

ss = st.session_state


def act(what: str, fn, *args, done=lambda r: "done") -> None:
    """Run an admin call from a button; its outcome shows at the top of the page on this rerun."""
    try:
        result = fn(ss.token, *args)
    except api.ApiError as e:
        ss.admin_notice = ("error", f"{what}: {e.message}")
        return
    ss.admin_notice = ("success", f"{what}: {done(result)}")


def swapped(r: dict) -> str:
    if not r.get("changed", True):
        return f"{version_name(r['serving'])} was serving already"
    return (f"now serving {version_name(r['serving'])} (was {version_name(r['previous'])}), "
            f"switched in {r.get('seconds', 0):.1f} s")


def add_user() -> None:
    try:
        u = api.add_user(ss.token, ss.new_name.strip(), ss.new_role)
    except api.ApiError as e:
        ss.admin_notice = ("error", f"add user: {e.message}")
        return
    ss.new_token = (f"Added {u['name']} ({u['role']}).", u["token"])


def new_token() -> None:
    try:
        u = api.new_token(ss.token, ss.token_for.strip())
    except api.ApiError as e:
        ss.admin_notice = ("error", f"new token: {e.message}")
        return
    ss.new_token = (f"New token for {u['name']}; their old one no longer works.", u["token"])


def exclude(excluded: bool) -> None:
    name = ss.exclude_who
    act("exclude" if excluded else "include", api.exclude, name, excluded,
        done=lambda u: f"{u['name']}'s labels, feedback and traffic are left out of every snapshot from now on "
                       "(nothing is deleted)" if excluded else f"{u['name']} is included again")


def metrics_text(m) -> str | None:
    """A run's metrics, which the API may send as a JSON string or as an object."""
    return m if m is None or isinstance(m, str) else json.dumps(m)


def save_guidelines() -> None:
    act("guidelines", api.set_guidelines, ss.guidelines_text, done=lambda r: "saved")
    pair.guidelines.clear()


pair.notice("admin_notice")
status, versions, users, guide, runs, queue, export = st.tabs(
    ["Status", "Versions", "Users", "Guidelines", "Runs", "Queue", "Export"])

s: dict = {}  # /api/status, fetched once per page for every tab
with status:
    try:
        s = api.status(ss.token)
        c = st.columns(4)
        name = lambda v: "none" if v is None else version_name(v)  # noqa: E731
        c[0].metric(f"Serving as '{s['alias']}'", name(s["serving"]))
        c[1].metric("Previous", name(s["previous"]))
        c[2].metric("Canary", name(s["canary"]))
        e = s["engine"]
        c[3].metric("Engine replicas ready", f"{e.get('replicas_ready', int(e['ready']))} of {e.get('replicas', 1)}")
        replicas = s.get("replicas") or []
        if replicas:
            st.dataframe([{"replica": r["name"], "url": r["url"], "state": "ready" if r["ready"] else r["problem"],
                           "in flight": r["in_flight"], "answered": r["answered"], "failed": r["failed"],
                           "restarts": r["restarts"], "adapters": ", ".join(r["adapters"])} for r in replicas],
                         hide_index=True)
        counts = list(s.get("counts", {}).items())
        for row in range(0, len(counts), 5):
            for column, (table, n) in zip(st.columns(5), counts[row:row + 5]):
                column.metric(table.replace("_", " "), n)
        monitor = s.get("monitor") or {}
        watch, last = monitor.get("watch"), monitor.get("last_rollback")
        if last and last.get("canary"):
            st.warning(f"Canary {version_name(last['version'])} was stopped automatically; all traffic goes to "
                       f"{version_name(last['to'])}: {last['reason']}. Setting the canary again overrides the monitor.")
        elif last:
            st.warning(f"{version_name(last['version'])} was rolled back automatically to {version_name(last['to'])}: "
                       f"{last['reason']}. "
                       f"Promoting it again overrides the monitor.")
        canary_watch = monitor.get("canary")
        if canary_watch:
            st.caption(f"Canary: {version_name(canary_watch['version'])} against "
                       f"{version_name(canary_watch['against'])}: "
                       f"{canary_watch['outcome']} after {canary_watch['requests']} live requests"
                       + (f" ({canary_watch['reason']})" if canary_watch["reason"] else ""))
        if watch:
            st.caption(f"After promotion: {version_name(watch['version'])} against {version_name(watch['against'])}: "
                       f"{watch['outcome']}"
                       f" after {watch['requests']} live requests" + (f" ({watch['reason']})" if watch["reason"] else ""))
            rows = [{"signal": name, **test} for name, test in watch["signals"].items()]
            if rows:
                st.dataframe(rows, hide_index=True)
        with st.expander("Everything /api/status says"):
            st.json(s)
    except api.ApiError as e:
        st.error(e.message)

with versions:
    try:
        rows = api.versions(ss.token)
        st.dataframe([{"version": v["name"], "status": v["status"], "method": v["method"],
                       "parent": "-" if v["parent_id"] is None else version_name(v["parent_id"]),
                       "created": (v["created_at"] or "")[:19].replace("T", " "), "adapter": v["adapter_path"] or "-"}
                      for v in rows], width="stretch", hide_index=True)
        status = {v["name"]: v["status"] for v in rows}
        chosen = st.selectbox("Version", list(status), index=None, placeholder="choose a version to promote",
                              key="promote_version")
        unconfirmed = status.get(chosen) in ("candidate", "rejected", "failed")  # never promoted by the gate
        if unconfirmed:
            st.warning(f"{chosen} is {status[chosen]}: the gate did not promote it. Promoting it by hand overrides "
                       "the gate (the monitor still watches it after promotion).")
            unconfirmed = not st.checkbox(f"Promote {chosen} anyway", key="promote_override")
        c = st.columns([2, 2, 2, 2, 1], vertical_alignment="bottom")
        c[0].button("Promote", key="promote", type="primary", disabled=chosen is None or unconfirmed, width="stretch",
                    on_click=act, args=(f"promote {chosen}", api.promote, chosen), kwargs={"done": swapped})
        c[1].button("Roll back", key="rollback", width="stretch", on_click=act, args=("roll back", api.rollback),
                    kwargs={"done": swapped})
        methods = s.get("methods", [])
        method = c[2].selectbox("Method", ["configured", *methods], key="retrain_method")
        force = c[4].checkbox("force", key="retrain_force", help="retrain even without enough new labels")
        c[3].button("Retrain now", key="retrain", width="stretch", on_click=act,
                    args=("retrain", api.retrain, None if method == "configured" else method, force),
                    kwargs={"done": lambda r: f"started (pid {r['pid']}); log: {r['log']}"})
    except api.ApiError as e:
        st.error(e.message)

with users:
    try:
        people = api.users(ss.token)
    except api.ApiError as e:
        st.error(e.message)
        people = []
    st.dataframe([{"name": u["name"], "role": u["role"], "labels": u["labels"], "skips": u["skips"],
                   "feedback": u["feedback"], "last label": (u["last_label_at"] or "")[:19],
                   "excluded": (u["excluded_at"] or "")[:19]} for u in people], hide_index=True, width="stretch")
    st.caption("Skips are not labels. An excluded user's labels, feedback and traffic are left out of every "
               "snapshot from then on; nothing is deleted, and including them again takes it all back in.")
    c = st.columns([3, 1, 1], vertical_alignment="bottom")
    c[0].selectbox("Exclude or include", [u["name"] for u in people], index=None,
                   key="exclude_who", placeholder="user name")
    c[1].button("Exclude", key="exclude", width="stretch", disabled=not ss.get("exclude_who"),
                on_click=exclude, args=(True,))
    c[2].button("Include", key="include", width="stretch", disabled=not ss.get("exclude_who"),
                on_click=exclude, args=(False,))
    with st.form("add-user", clear_on_submit=True, border=False):
        c = st.columns([3, 2, 1], vertical_alignment="bottom")
        c[0].text_input("Name", key="new_name")
        c[1].selectbox("Role", ["labeller", "admin"], key="new_role")
        c[2].form_submit_button("Add user", on_click=add_user, width="stretch")
    with st.form("new-token", clear_on_submit=True, border=False):
        c = st.columns([5, 1], vertical_alignment="bottom")
        c[0].text_input("Lost token? A new one for", key="token_for", placeholder="user name")
        c[1].form_submit_button("New token", on_click=new_token, width="stretch")
    if "new_token" in ss:
        said, token = ss.pop("new_token")  # shown once: the store keeps only its hash
        st.success(f"{said} Their sign-in token, shown only now:")
        st.code(token, language=None)

with guide:
    if "guidelines_text" not in ss:
        try:
            ss.guidelines_text = api.guidelines(ss.token)
        except api.ApiError as e:
            st.error(e.message)
    edit, preview = st.columns(2)
    edit.text_area("Guidelines (Markdown)", key="guidelines_text", height=400)
    edit.button("Save guidelines", key="save_guidelines", type="primary", on_click=save_guidelines)
    with preview.container(border=True, height=460):
        st.markdown(ss.get("guidelines_text", ""))

with runs:
    try:
        history = api.stats(ss.token)["runs"]
    except api.ApiError as e:
        st.error(e.message)
        history = None
    if history == []:
        st.info("No retrain runs yet.")
    elif history:
        keys = ("id", "method", "trigger", "status", "started_at", "finished_at", "reason")
        st.dataframe([{k: r.get(k) for k in keys} | {"metrics": metrics_text(r.get("metrics"))} for r in history],
                     width="stretch", hide_index=True)

with queue:
    try:
        q = api.queue(ss.token, 20)
    except api.ApiError as e:
        st.error(e.message)
        q = None
    if q is not None:
        order = {"active": "by what a label would teach (active learning; `alignloop rank` and every retrain re-rank)",
                 "random": "in a fixed random order", "arrival": "newest first"}[q["order"]]
        st.caption(f"The next pairs labellers get, {order} (`labeling.order`), live pairs before imported "
                   "ones. Score = max(uncertainty, disagreement) x novelty: uncertainty of the gate's reward model "
                   "(1: it cannot tell the replies apart), disagreement of the votes so far (1: split evenly), "
                   "novelty (1 / (1 + pairs of the same prompt labelled or ranked ahead)).")
        if not q["pairs"]:
            st.info("No pairs are waiting for labels.")
        else:
            scored = any(p["scored_at"] is not None for p in q["pairs"])
            if not scored:
                st.caption("None of these is scored yet: pairs are scored with `labeling.order = \"active\"`, "
                           "once a retrain has fitted the gate's reward model.")
            st.dataframe([{"pair": p["pair_id"], "prompt": p["messages"][-1]["content"][:80],
                           "votes a/b": f"{p['votes_a']}/{p['votes_b']}",
                           **({k: None if p[k] is None else round(p[k], 3)
                               for k in ("score", "uncertainty", "disagreement", "novelty")}
                              | {"scored": p["scored_at"]} if scored else {})}
                          for p in q["pairs"]], width="stretch", hide_index=True)

with export:
    st.caption("The same files as `alignloop export KIND`: labelled pairs (with the held-out split), "
               "prompts from live traffic, thumbs and scores.")
    fmt = st.radio("Format", ["jsonl", "parquet"], horizontal=True, key="export_format")
    token = ss.token
    for column, kind in zip(st.columns(3), ["pairs", "prompts", "feedback"]):
        column.download_button(f"Download {kind}", data=lambda kind=kind: api.export(token, kind, fmt),
                               file_name=f"alignloop-{kind}.{fmt}", on_click="ignore", key=f"export-{kind}",
                               icon=":material/download:", width="stretch")
