"""Session-state keys, defined once and used by every page, the choices read from them, and the URL
that keeps them.

A browser reload or an opened link starts a new session, so what must outlive a session travels in
the URL:

- the shared choices every page reads (data set, split, balance, augmentation, run) are in the URL
  of every page: ``restore_from_url`` takes them when a session starts and ``keep_in_url`` writes
  them back after every run (both called by Home.py, the router);
- a page's own settings are widgets made with ``**KEEP``: Streamlit keeps their values across page
  switches (``persist_state``) and puts them in that page's URL (``bind``), seeding a widget from it
  and ignoring a value the widget cannot take.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from cxr_core.config import BALANCE_STRATEGIES, SPLIT_MODES, AugmentConfig

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


# --- The shared choices in the URL ---------------------------------------------------------------
def _one_of(options: Callable[[], Any]) -> Callable[[str], str]:
    def read(text: str) -> str:
        if text not in options():
            raise ValueError(text)
        return text
    return read


def _datasets() -> list[str]:
    from pages.ui.datasets import list_datasets  # noqa: PLC0415 (that module imports this one)
    return list_datasets()


def _run_path(name: str) -> str:
    """A finished run's folder from its name (the URL never holds a path of the server)."""
    from pages.ui.models import finished_runs  # noqa: PLC0415 (that module imports this one)
    return next(str(s.path) for s in finished_runs() if Path(s.path).name == name)


@dataclass(frozen=True)
class Shared:
    """A session choice kept in every page's URL: its session key, its query parameter, how the
    parameter's text is read (raising ValueError or StopIteration for a value that cannot be used),
    how the value is written, and the value that is left out of the URL."""

    key: str
    param: str
    read: Callable[[str], Any]
    write: Callable[[Any], str] = str
    default: Any = None


SHARED = (
    Shared(KEY_DATASET, "dataset", _one_of(_datasets)),
    Shared(KEY_SPLIT, "split", _one_of(lambda: SPLIT_MODES), default="random"),
    Shared(KEY_BALANCE, "balance", _one_of(lambda: BALANCE_STRATEGIES), default="augment"),
    Shared(KEY_RUN, "run", _run_path, write=lambda path: Path(path).name),
)
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
    A value that cannot be used, or a parameter this app does not know, is ignored."""
    if st.session_state.get(KEY_URL_READ):
        return
    st.session_state[KEY_URL_READ] = True
    params = st.query_params
    for item in SHARED:
        if item.param in params and item.key not in st.session_state:
            with contextlib.suppress(ValueError, StopIteration, OSError):  # not usable: ignored
                st.session_state[item.key] = item.read(params[item.param])
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


def keep_in_url() -> None:
    """Write the session's shared choices into the URL (leaving defaults out), so that a reload or
    a copied link keeps them; only what changed is sent to the browser."""
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

