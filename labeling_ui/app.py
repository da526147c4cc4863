"""alignloop's labelling app. Sign in with a token; then label pairs, vote in the arena and watch the
dashboard; admins also manage versions, users and guidelines. A pure HTTP client of the gateway.

Run:   streamlit run labeling_ui/app.py --server.port 8501 --server.headless true
The gateway's address comes from ALIGNLOOP_GATEWAY_URL (default http://127.0.0.1:8000); tokens come
from `alignloop user add NAME --role labeller|admin`.
"""

import streamlit as st

from labeling_ui import api, session

st.set_page_config(page_title="alignloop labelling", page_icon=":material/thumbs_up_down:", layout="wide")
st.set_option("client.toolbarMode", "viewer")  # no "Deploy" or "Rerun" in the labellers' toolbar
ss = st.session_state


def sign_in() -> None:
    st.title("alignloop labelling")
    with st.form("sign-in"):
        token = st.text_input("Token", type="password", key="token_input",
                              help="Ask an admin, or run `alignloop user add NAME --role labeller`.").strip()
        if st.form_submit_button("Sign in", type="primary"):
            if not token:
                st.error("Paste your token first.")
                return
            try:
                ss.user = api.me(token)
            except api.ApiError as e:
                st.error(f"Sign-in failed: {e.message}")
                return
            ss.token = token
            session.remember(token)
            st.rerun()
    st.caption(f"Gateway: {api.gateway_url()}")


def sign_out() -> None:
    session.forget()
    ss.clear()


session.resume()  # a reload keeps its sign-in
if "user" not in ss:
    pages = [st.Page(sign_in, title="Sign in", icon=":material/login:")]
else:
    pages = [st.Page("views/label.py", title="Label", icon=":material/thumbs_up_down:", default=True),
             st.Page("views/arena.py", title="Arena", icon=":material/swords:"),
             st.Page("views/dashboard.py", title="Dashboard", icon=":material/monitoring:")]
    session.keep()
    if ss.user["role"] == "admin":
        pages.append(st.Page("views/admin.py", title="Admin", icon=":material/admin_panel_settings:"))
    with st.sidebar:
        st.caption(f"Signed in as **{ss.user['name']}** ({ss.user['role']})")
        st.button("Sign out", on_click=sign_out, icon=":material/logout:")
st.navigation(pages).run()
