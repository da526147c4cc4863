"""Label: one pair at a time, one key press per label; the gateway's answer carries the next pair."""

import time

import streamlit as st

from labeling_ui import api, pair

ss = st.session_state


def show_next(result: dict) -> None:
    ss.pair, ss.progress, ss.shown_at = result["pair"], result["progress"], time.monotonic()


def fetch() -> None:
    try:
        show_next(api.next_pair(ss.token))
    except api.ApiError as e:
        ss.label_notice = ("error", e.message)


def submit(choice: str, rationale: str | None) -> None:
    pair_id = ss.pair["pair_id"]
    seconds = round(time.monotonic() - ss.shown_at, 1)
    try:
        result = api.label(ss.token, pair_id, choice, rationale, seconds)
    except api.ApiError as e:
        ss.label_notice = ("warning", e.message)
        if e.status in (404, 409):  # labelled already, pair full or gone: move on
            fetch()
        return
    ss.last = f"pair {pair_id}: {pair.NAMES[choice]}"
    show_next(result)


def undo() -> None:
    try:
        result = api.undo(ss.token)
    except api.ApiError as e:
        ss.label_notice = ("info" if e.status == 404 else "error", e.message)
        return
    ss.last = f"took back your last answer, on pair {result['pair']['pair_id']}"  # a label or a skip
    show_next(result)


if "pair" not in ss:
    fetch()

top = st.columns([5, 1], vertical_alignment="center")
if "progress" in ss:
    last = f" · last: {ss.last}" if ss.get("last") else ""
    top[0].markdown(f"**{ss.progress['done_today']}** labelled today · **{ss.progress['queue']}** pairs still "
                    f"need labels (from you or others){last}")
with top[1].popover("Guidelines", icon=":material/menu_book:", width="stretch"):
    try:
        st.markdown(pair.guidelines(ss.token))
    except api.ApiError as e:
        st.error(e.message)
pair.notice("label_notice")

if ss.get("pair"):
    pair.show(ss.pair)
    pair.buttons("label", ss.pair["pair_id"], submit, undo)
elif "pair" in ss:
    st.success("Nothing to label for you right now: every pair still open has your label, or is with other "
               "labellers.")
    c1, c2 = st.columns(2)
    c1.button("Check again", key="label-again", on_click=fetch, icon=":material/refresh:")
    c2.button("Undo", key="label-undo", shortcut="U", on_click=undo, icon=":material/undo:")
