"""A sign-in that survives a reload of the page.

Streamlit forgets everything of a browser tab when it reloads. So a sign-in is kept here, in the app
process, under a random id that the page's address carries (`?session=...`); a reload finds the
user again from it. The token itself never goes into the address. The id works only in the browser
that signed in: it is bound to Streamlit's own XSRF cookie, so an address pasted into another browser
signs nobody in (with `server.enableXsrfProtection` off there is no such cookie, and no such bond).
An id dies at sign-out, after `IDLE_S` unused, when the gateway no longer knows its token, and with
the app process.
"""

from __future__ import annotations

import secrets
import threading
import time

import streamlit as st

from labeling_ui import api

IDLE_S = 12 * 3600
PARAM = "session"
BROWSER_COOKIE = "_streamlit_xsrf"  # set by Streamlit's server on the page's first load, per browser
ss = st.session_state


def _browser() -> str:
    """This browser's XSRF token. Tornado sends it masked afresh with each page load ("2|mask|token
    xor mask|time", hex), so the mask is taken off to compare."""
    cookie = st.context.cookies.get(BROWSER_COOKIE, "")
    if not isinstance(cookie, str):  # no browser at all (Streamlit's AppTest hands out stand-ins)
        return ""
    try:
        _, mask, masked, _ = cookie.split("|")
        mask_bytes, token = bytes.fromhex(mask), bytes.fromhex(masked)
    except ValueError:
        return cookie
    if not mask_bytes:
        return cookie
    return bytes(b ^ mask_bytes[i % len(mask_bytes)] for i, b in enumerate(token)).hex()


@st.cache_resource
def _signed_in() -> tuple[dict[str, list], threading.Lock]:
    """id -> [token, last used, browser], for every browser tab of this app process."""
    return {}, threading.Lock()


def remember(token: str) -> None:
    """After a sign-in: an id for it, in the page's address."""
    ids, lock = _signed_in()
    sid = secrets.token_urlsafe(24)
    with lock:
        ids[sid] = [token, time.time(), _browser()]
    ss.session = sid
    st.query_params[PARAM] = sid


def resume() -> None:
    """Before anything is drawn: the user of the address's id, if it still stands."""
    sid = st.query_params.get(PARAM)
    if "user" in ss or not sid:
        return
    ids, lock = _signed_in()
    with lock:
        entry = ids.get(sid)
        if entry is not None and time.time() - entry[1] > IDLE_S:
            del ids[sid]
            entry = None
    if entry is None or entry[2] != _browser():  # unknown, expired, or another browser's
        del st.query_params[PARAM]
        return
    try:
        ss.user = api.me(entry[0])
    except api.ApiError as e:
        if e.status in (401, 403):  # the token was revoked or replaced: this id is done
            forget(sid)
        return  # else (the gateway is down) the sign-in page says so, and a later reload tries again
    ss.token, ss.session = entry[0], sid


def keep() -> None:
    """On every run while signed in: the id stays in the address (a page switch may drop it) and fresh."""
    sid = ss.get("session")
    if not sid:
        return
    ids, lock = _signed_in()
    with lock:
        if sid in ids:
            ids[sid][1] = time.time()
    if st.query_params.get(PARAM) != sid:
        st.query_params[PARAM] = sid


def forget(sid: str | None = None) -> None:
    """At sign-out: the id no longer signs anyone in."""
    sid = sid or ss.get("session")
    ids, lock = _signed_in()
    with lock:
        ids.pop(sid, None)
    if PARAM in st.query_params:
        del st.query_params[PARAM]
