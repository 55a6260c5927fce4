"""Entry point: `streamlit run Home.py`. It only routes; every page lives in pages/ (shared helpers in pages/ui/)."""
import streamlit as st

from pages.ui import frame, links, session

st.set_page_config(page_title="Chest X-ray pneumonia workbench", page_icon="🫁", layout="wide")
st.session_state[session.KEY_ROUTED] = True
st.navigation(frame.app_pages()).run()
# The choices the page made in its body go into the URL too (page_header wrote those made before).
links.keep_in_url()
