"""Entry point: `streamlit run Home.py`. It only routes; every page lives in pages/."""
import streamlit as st

st.set_page_config(page_title="Chest X-ray pneumonia workbench", page_icon="🫁", layout="wide")

PAGES = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/dataset.py", title="Dataset", icon=":material/folder_open:", url_path="dataset"),
    st.Page("pages/augmentation.py", title="Augmentation", icon=":material/tune:", url_path="augmentation"),
    st.Page("pages/training.py", title="Training", icon=":material/model_training:", url_path="training"),
    st.Page("pages/evaluation.py", title="Evaluation", icon=":material/analytics:", url_path="evaluation"),
    st.Page("pages/predict.py", title="Predict", icon=":material/radiology:", url_path="predict"),
]

st.navigation(PAGES).run()
