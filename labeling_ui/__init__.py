"""The labelling app: a Streamlit multipage app that talks to the gateway over HTTP only.

Run: `streamlit run labeling_ui/app.py` (gateway address in ALIGNLOOP_GATEWAY_URL).
"""
