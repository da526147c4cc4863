"""A pair on screen, shared by the Label and Arena pages: the conversation as chat, replies A and B
side by side, a one-line rationale and one button per choice, each with its keyboard shortcut."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import streamlit as st

from labeling_ui import api

# (choice sent to the gateway, button text, key). "first" is shown as A, "second" as B.
CHOICES = (
    ("first", "A is better", "1"),
    ("second", "B is better", "2"),
    ("tie", "Tie", "3"),
    ("both_bad", "Both bad", "4"),
    ("skip", "Skip", "5"),
)
NAMES = {choice: text for choice, text, _ in CHOICES}
CUT_OFF = "Cut off: this reply reached its length limit before it ended."
KEYS_HELP = "Keys: **1** A better · **2** B better · **3** tie · **4** both bad · **5** skip"


@st.cache_data(ttl=60, show_spinner=False)
def guidelines(token: str) -> str:
    return api.guidelines(token)


def show(pair: dict[str, Any]) -> None:
    for message in pair["messages"]:
        with st.chat_message(message["role"]):
            st.markdown(message["content"])
    for column, name, side in zip(st.columns(2, gap="medium"), "AB", ("first", "second")):
        with column.container(border=True):
            st.markdown(f"**{name}**")
            st.markdown(pair[side] or "_(empty reply)_")
            if pair.get(f"{side}_cut_off"):
                st.caption(CUT_OFF)


def buttons(key: str, pair_id: int, on_choice: Callable[[str, str | None], None],
            on_undo: Callable[[], None] | None = None) -> None:
    """The rationale field and the choice buttons; `on_choice(choice, rationale)` runs on a click or key.

    Every key carries the pair id: a fresh, empty field for each pair, and a key pressed twice fast
    cannot label a pair nobody has seen yet (a click on a button of the previous pair is dropped)."""
    why_key = f"{key}-why-{pair_id}"

    def choose(choice: str) -> None:
        on_choice(choice, (st.session_state.get(why_key) or "").strip() or None)

    st.text_input("Rationale", key=why_key, max_chars=500, label_visibility="collapsed",
                  placeholder="Rationale (optional, one line). Press Tab to leave the field, then a key.")
    columns = st.columns(len(CHOICES) + (on_undo is not None))
    for column, (choice, text, shortcut) in zip(columns, CHOICES):
        column.button(text, key=f"{key}-{choice}-{pair_id}", shortcut=shortcut, on_click=choose, args=(choice,),
                      type="primary" if choice in ("first", "second") else "secondary", width="stretch")
    if on_undo is not None:
        columns[-1].button("Undo", key=f"{key}-undo", shortcut="U", on_click=on_undo, icon=":material/undo:",
                           width="stretch")
    st.caption(KEYS_HELP + (" · **U** undo" if on_undo else ""))


def notice(key: str) -> None:
    """Show, once, the message a callback left in st.session_state[key] as (kind, text)."""
    if key in st.session_state:
        kind, text = st.session_state.pop(key)
        getattr(st, kind)(text)
