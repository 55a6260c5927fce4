"""The URL that keeps the shared choices: a browser reload or an opened link starts a new session, so
the choices every page reads (data set, split, balance, augmentation, run) travel in the URL of every
page. ``restore_from_url`` takes them when a session starts and ``keep_in_url`` writes them back after
every run (both called by the router).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from cxr_core.core.config import BALANCE_STRATEGIES, SPLIT_MODES, AugmentConfig
from pages.ui import datasets, models
from pages.ui.session import (
    KEY_AUGMENT,
    KEY_BALANCE,
    KEY_DATASET,
    KEY_RUN,
    KEY_SPLIT,
    KEY_URL_READ,
    augment_config,
)


# --- The shared choices in the URL ---------------------------------------------------------------
def _one_of(options: Callable[[], Any]) -> Callable[[str], str]:
    def read(text: str) -> str:
        if text not in options():
            raise ValueError(text)
        return text
    return read


def _datasets() -> list[str]:
    return datasets.list_datasets()


def _run_path(name: str) -> str:
    """A finished run's folder from its name (the URL never holds a path of the server)."""
    return next(str(s.path) for s in models.finished_runs() if Path(s.path).name == name)


@dataclass(frozen=True)
class Shared:
    """A session choice kept in every page's URL: its session key, its query parameter, how the
    parameter's text is read (raising ValueError or StopIteration for a value that cannot be used),
    how the value is written, the value that is left out of the URL, and what the value is called
    when a link names one that is not here (said in one sentence; "" for a choice silently ignored)."""

    key: str
    param: str
    read: Callable[[str], Any]
    write: Callable[[Any], str] = str
    default: Any = None
    noun: str = ""


SHARED = (
    Shared(KEY_DATASET, "dataset", _one_of(_datasets), noun="data set"),
    Shared(KEY_SPLIT, "split", _one_of(lambda: SPLIT_MODES), default="random"),
    Shared(KEY_BALANCE, "balance", _one_of(lambda: BALANCE_STRATEGIES), default="augment"),
    Shared(KEY_RUN, "run", _run_path, write=lambda path: Path(path).name, noun="run"),
)
KEY_LINK_NOTES = "link_notes"  # [(noun, name)]: what the opened link named that is not here, said once
# The augmentation: one parameter per AugmentConfig field that differs from the reference.
_AUGMENT_DEFAULTS = asdict(AugmentConfig())


def _read_field(default: Any, texts: list[str]) -> Any:
    if isinstance(default, bool):
        return {"true": True, "false": False}[texts[-1].lower()]
    if isinstance(default, tuple):
        return tuple(float(t) for t in texts)
    return type(default)(texts[-1])


def _write_field(value: Any) -> str | list[str]:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return [f"{v:g}" for v in value]
    return f"{value:g}"


def restore_from_url() -> None:
    """Once per session (a reload or an opened link), take the shared choices the URL holds.
    A run or data set that is not here (deleted, or another visitor's) is noted, to be said in one
    sentence; any other value that cannot be used, or a parameter this app does not know, is ignored."""
    if st.session_state.get(KEY_URL_READ):
        return
    st.session_state[KEY_URL_READ] = True
    params = st.query_params
    notes = []
    for item in SHARED:
        if item.param in params and item.key not in st.session_state:
            try:
                st.session_state[item.key] = item.read(params[item.param])
            except (ValueError, StopIteration, OSError):
                if item.noun:
                    notes.append((item.noun, params[item.param]))
    chosen: dict[str, Any] = {}
    for name, default in _AUGMENT_DEFAULTS.items():
        if name not in params:
            continue
        try:  # field by field, so one impossible value leaves the others in place
            trial = {**chosen, name: _read_field(default, params.get_all(name))}
            AugmentConfig(**trial)
        except (ValueError, KeyError, TypeError):
            continue
        chosen = trial
    if chosen and KEY_AUGMENT not in st.session_state:
        st.session_state[KEY_AUGMENT] = asdict(AugmentConfig(**chosen))
    if notes:
        st.session_state[KEY_LINK_NOTES] = notes


def _shown_instead(noun: str) -> str:
    """What the page shows in place of a run or data set the link named."""
    if noun == "run":
        summary = models.selected_run()
        return f"showing `{summary.run_id}` instead." if summary is not None else "choose another run."
    name = st.session_state.get(KEY_DATASET)
    return (f"using `{name}` instead." if name and datasets.dataset_path(name) is not None
            else "choose a data set on the Dataset page.")


def link_sentence(noun: str, name: str) -> str:
    """One sentence: the link's run or data set is not here, and what is shown instead. The name comes from
    the URL, so it is shown as plain text (no markdown of a link's making) and cut short."""
    shown = str(name).replace("`", "").replace("\n", " ").strip()[:80]
    return f"The {noun} in this link, `{shown}`, is not available here; {_shown_instead(noun)}"


def say_link_notes() -> None:
    """Say once, in one sentence each, what the opened link named that is not here (called after the page's
    title and introduction, when the defaults shown instead are known)."""
    for noun, name in st.session_state.pop(KEY_LINK_NOTES, None) or []:
        st.info(link_sentence(noun, name), icon=":material/link_off:")


def keep_in_url() -> None:
    """Write the session's shared choices into the URL (leaving defaults out), so that a reload or
    a copied link keeps them; only what changed is sent to the browser. The page header calls this
    after the title, introduction and sidebar: first the opened link's choices that are not here are said."""
    say_link_notes()
    wanted: dict[str, str | list[str]] = {}
    for item in SHARED:
        value = st.session_state.get(item.key)
        if value not in (None, "", item.default):
            wanted[item.param] = item.write(value)
    for name, value in asdict(augment_config()).items():
        if value != _AUGMENT_DEFAULTS[name]:
            wanted[name] = _write_field(value)
    params = st.query_params
    for param in [item.param for item in SHARED] + list(_AUGMENT_DEFAULTS):
        value = wanted.get(param)
        if value is None:
            if param in params:
                del params[param]
        elif params.get_all(param) != ([value] if isinstance(value, str) else value):
            params[param] = value

