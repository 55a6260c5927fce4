"""Routing and the page frame: the page list, the header every page starts with and the sidebar."""
from __future__ import annotations

import logging
from pathlib import Path

import streamlit as st

from cxr_core.core.errors import CxrError
from cxr_core.hosting import jobs, server
from cxr_core.runs import registry as runs
from pages.ui import access, links
from pages.ui.datasets import data_root, dataset_path, is_synthetic, list_datasets
from pages.ui.models import all_runs, runs_root_info, selected_run
from pages.ui.session import KEY_DATASET, KEY_ROUTED, KEY_SPLIT

log = logging.getLogger(__name__)

DISCLAIMER = (
    "Research and teaching tool, **not a medical device**: its outputs must not be used to "
    "diagnose or treat anyone."
)


def app_pages() -> list:
    """The app's pages, in menu order (paths are relative to Home.py)."""
    return [
        st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
        st.Page("pages/lessons.py", title="Lessons", icon=":material/school:", url_path="lessons"),
        st.Page("pages/dataset.py", title="Dataset", icon=":material/folder_open:", url_path="dataset"),
        st.Page("pages/augmentation.py", title="Augmentation", icon=":material/tune:", url_path="augmentation"),
        st.Page("pages/training.py", title="Training", icon=":material/model_training:", url_path="training"),
        st.Page("pages/evaluation.py", title="Evaluation", icon=":material/analytics:", url_path="evaluation"),
        st.Page("pages/predict.py", title="Predict", icon=":material/radiology:", url_path="predict"),
        st.Page("pages/leaderboard.py", title="Leaderboard", icon=":material/leaderboard:", url_path="leaderboard"),
    ]


def ensure_routed() -> None:
    """Make sure Home.py's router is in charge.

    Streamlit treats a folder named ``pages/`` next to the entry point as an old-style page folder
    until the first ``st.navigation`` call in the server process. A deep link (``/dataset``) as the
    very first request after a (re)start would then run the page file alone, with an automatic
    menu that lists every file. Registering the real pages and rerunning puts the router in charge
    for good, keeping the URL.
    """
    if not st.session_state.get(KEY_ROUTED):
        st.session_state[KEY_ROUTED] = True
        st.navigation(app_pages())
        st.rerun()


def page_header(title: str, intro: str) -> None:
    """Title, the page's short teaching introduction, and the shared sidebar."""
    ensure_routed()
    links.restore_from_url()  # a reload or an opened link: the URL's choices, once per session
    st.title(title)
    st.markdown(intro)
    sidebar()
    links.keep_in_url()  # the choices so far (widget callbacks ran before the page) into the URL


def choose_only_dataset() -> None:
    """With exactly one data set under the data root and none chosen, choose it."""
    names = list_datasets()
    if len(names) == 1 and dataset_path() is None:
        st.session_state[KEY_DATASET] = names[0]


def sidebar() -> None:
    choose_only_dataset()
    with st.sidebar:
        with st.container(border=True):
            st.markdown("**Data set**")
            name = st.session_state.get(KEY_DATASET)
            if dataset_path(name) is not None:
                st.markdown(f":material/folder: `{name}`")
                if is_synthetic(data_root() / name):
                    st.caption(":orange[synthetic practice images, not X-rays]")
                st.caption(f"Split: {st.session_state.get(KEY_SPLIT, 'random')}")
            else:
                st.caption("None chosen yet. Choose one on the Dataset page.")
            st.markdown("**Run**")
            summary = selected_run()
            if summary is not None:
                st.markdown(f":material/model_training: `{summary.run_id}`")
                st.caption(f"{summary.backbone} · {'demo run' if summary.is_demo else summary.state}")
            else:
                st.caption("No finished run yet. Train one on the Training page.")
            try:
                active = jobs.active_runs()
            except (OSError, CxrError):
                active = []
            visible = {str(s.path) for s in all_runs()} if active else set()
            names = [Path(run).name for run in active if str(run) in visible]
            if names:
                st.caption(":material/sync: Training now: " + ", ".join(f"`{n}`" for n in names))
            elif active:
                st.caption(f":material/sync: {len(active)} training job(s) running on this server.")
        access.sidebar_panel()
        housekeeping()
        st.caption(DISCLAIMER)
        root = runs_root_info()
        if root is not None and root.fallback:
            st.info(root.reason, icon=":material/info:")


@st.cache_resource(show_spinner=False)
def _server_started(root: str, hosted: bool) -> bool:
    """Once per server process and runs folder: the maintenance thread (the queue's dispatcher after a
    restart, the expiry of visitors' workspaces on a hosted app)."""
    server.start(root, hosted=hosted)
    return True


def housekeeping() -> None:
    """Make sure the server's maintenance runs (started once; later renders find it cached)."""
    try:
        _server_started(str(runs.runs_root().path), access.hosted())
    except (OSError, CxrError) as error:  # a failure here never stops the page
        log.warning("The maintenance of the runs folder could not start: %s", error)
