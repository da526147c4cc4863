"""Arena: ask anything; two versions answer (which is which stays hidden) and you vote as on Label."""

import time

import streamlit as st

from labeling_ui import api, pair

ss = st.session_state


def vote(choice: str, rationale: str | None) -> None:
    pair_id = ss.arena_pair["pair_id"]
    try:
        api.label(ss.token, pair_id, choice, rationale, round(time.monotonic() - ss.arena_shown_at, 1))
    except api.ApiError as e:
        ss.arena_notice = ("warning", e.message)
        return
    ss.arena_pair = None
    ss.arena_notice = ("success", f"Vote recorded: {pair.NAMES[choice]}. Ask another.")


st.caption("Two model versions answer your prompt: what serves now, and the candidate (or the previous "
           "version). Vote for the better answer; your vote counts like a label.")
max_tokens = st.select_slider("Longest answer (tokens)", [32, 64, 128, 256, 512, 1024], value=256)
prompt = st.chat_input("Ask both versions something")
if prompt:
    with st.spinner("Both versions are answering..."):
        try:
            ss.arena_pair = api.arena(ss.token, prompt, max_tokens)["pair"]
            ss.arena_shown_at = time.monotonic()
            ss.pop("pair", None)  # the arena pair took over this labeller's lease; Label fetches afresh
        except api.ApiError as e:
            ss.arena_notice = ("error", e.message)
pair.notice("arena_notice")

if ss.get("arena_pair"):
    pair.show(ss.arena_pair)
    pair.buttons("arena", ss.arena_pair["pair_id"], vote)
    if prompt:  # the question box keeps the focus after sending, and keys typed there are text, not votes
        st.html(f"<script>/* pair {ss.arena_pair['pair_id']} */ document.activeElement?.blur();</script>",
                unsafe_allow_javascript=True, width="content")
