"""Session-state keys, defined once and used by every page, and the choices read from them.

A page's own settings are widgets made with ``**KEEP``: Streamlit keeps their values across page
switches (``persist_state``) and puts them in that page's URL (``bind``), seeding a widget from it and
ignoring a value the widget cannot take. The shared choices every page reads travel in the URL through
``pages.ui.links``.
"""
from __future__ import annotations

import streamlit as st

from cxr_core.core.config import AugmentConfig

KEY_DATASET = "dataset"            # str: name of the chosen folder under the data root
KEY_SPLIT = "split_mode"           # str: "random" | "patient" | "official"
KEY_AUGMENT = "augment_config"     # dict: AugmentConfig fields chosen on the Augmentation page
KEY_BALANCE = "balance"            # str: "augment" | "class_weight" | "none"
KEY_RUN = "run"                    # str: path of the selected run folder
KEY_LAUNCHED = "launched_run"      # str: path of the run this session launched last
KEY_PREVIEW_SEED = "preview_seed"  # int: seed of the augmentation preview
KEY_GRID_SEED = "grid_seed"        # int: seed of the Dataset page's sample grid
KEY_ROUTED = "routed"              # bool: Home.py's router has run in this session
KEY_LIMIT = "train_limit"          # int: the Training page's "use only this many images" (0 = all)
KEY_RECIPE = "train_recipe"        # str: the recipe the Training page's settings start from ("" = none)
KEY_URL_READ = "url_read"          # bool: this session has taken the URL's shared choices

#: Keyword arguments for a page's setting widget (it needs a ``key``, which names it in the URL):
#: its value outlives a page switch and goes into the page's URL, so a reload or a link keeps it.
KEEP: dict[str, str] = {"persist_state": "session", "bind": "query-params"}


def copy_state(source: str, target: str) -> None:
    """Widget callback: copy a widget's value to a session key before the page reruns (so the
    sidebar, drawn first, already shows the new choice)."""
    st.session_state[target] = st.session_state.get(source)


def augment_config() -> AugmentConfig:
    """The augmentation chosen on the Augmentation page (the reference defaults otherwise)."""
    values = st.session_state.get(KEY_AUGMENT)
    try:
        return AugmentConfig(**values) if values else AugmentConfig()
    except (TypeError, ValueError):
        return AugmentConfig()


def augment_is_default() -> bool:
    return augment_config() == AugmentConfig()
