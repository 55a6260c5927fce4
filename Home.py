"""Entry point: `streamlit run Home.py`. It only routes; every page lives in pages/ (see pages/ui.py)."""
import streamlit as st

from pages import ui

st.set_page_config(page_title="Chest X-ray pneumonia workbench", page_icon="🫁", layout="wide")
st.session_state[ui.KEY_ROUTED] = True
st.navigation(ui.app_pages()).run()
