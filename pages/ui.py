"""Shared page helpers: session-state keys, the sidebar, cached loaders and small plotting helpers.

Pages import this module as ``from pages import ui``. It imports streamlit, plotly, pandas, numpy
and cxr_core only; TensorFlow stays inside cxr_core, which imports it lazily.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from cxr_core import runs
from cxr_core.config import AugmentConfig
from cxr_core.errors import CxrError

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# --- Session-state keys: defined once, used by every page -------------------------------------
KEY_DATASET = "dataset"            # str: name of the chosen folder under the data root
KEY_SPLIT = "split_mode"           # str: "random" | "patient" | "official"
KEY_AUGMENT = "augment_config"     # dict: AugmentConfig fields chosen on the Augmentation page
KEY_BALANCE = "balance"            # str: "augment" | "class_weight" | "none"
KEY_RUN = "run"                    # str: path of the selected run folder
KEY_LAUNCHED = "launched_run"      # str: path of the run this session launched last
KEY_PREVIEW_SEED = "preview_seed"  # int: seed of the augmentation preview
KEY_GRID_SEED = "grid_seed"        # int: seed of the Dataset page's sample grid

CLASSES = ("NORMAL", "PNEUMONIA")
CLASS_COLORS = {"NORMAL": "#2e9e6a", "PNEUMONIA": "#d1495b"}
SPLIT_ORDER = ("train", "val", "test")
SPLIT_LABELS = {
    "random": "Random split by image",
    "patient": "Split by patient",
    "official": "Official Kermany test set",
}
DISCLAIMER = (
    "Research and teaching tool, **not a medical device**: its outputs must not be used to "
    "diagnose or treat anyone."
)
SKIP_DIR_PREFIXES = (".", "_")


# --- Routing -----------------------------------------------------------------------------------
KEY_ROUTED = "routed"  # bool: Home.py's router has run in this session


def app_pages() -> list:
    """The app's pages, in menu order (paths are relative to Home.py)."""
    return [
        st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
        st.Page("pages/dataset.py", title="Dataset", icon=":material/folder_open:", url_path="dataset"),
        st.Page("pages/augmentation.py", title="Augmentation", icon=":material/tune:", url_path="augmentation"),
        st.Page("pages/training.py", title="Training", icon=":material/model_training:", url_path="training"),
        st.Page("pages/evaluation.py", title="Evaluation", icon=":material/analytics:", url_path="evaluation"),
        st.Page("pages/predict.py", title="Predict", icon=":material/radiology:", url_path="predict"),
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


# --- Errors -----------------------------------------------------------------------------------
@contextmanager
def errors_shown(where: Any = None) -> Iterator[None]:
    """Show a ``CxrError`` as one sentence with ``st.error`` instead of a traceback."""
    try:
        yield
    except CxrError as error:
        (where or st).error(str(error), icon=":material/error:")


# --- Data sets --------------------------------------------------------------------------------
def data_root() -> Path:
    """Where data sets live: ``$CXR_DATA_ROOT`` or ``./data`` next to Home.py."""
    env = os.environ.get("CXR_DATA_ROOT")
    return Path(env).expanduser() if env else PROJECT_ROOT / "data"


def list_datasets() -> list[str]:
    """Names of the folders directly under the data root (never a free path)."""
    root = data_root()
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(SKIP_DIR_PREFIXES)
    )


def dataset_path(name: str | None = None) -> Path | None:
    """The chosen data set folder, or None when none is chosen or it has gone."""
    name = name if name is not None else st.session_state.get(KEY_DATASET)
    if not name or name not in list_datasets():
        return None
    return data_root() / name


def is_synthetic(path: Path) -> bool:
    """True for the generated practice set (its folder name or marker file says so)."""
    from cxr_core import practice
    return "synthetic" in path.name.lower() or (path / practice.MARKER_FILE).is_file()


def _fingerprint(folder: Path) -> str:
    """Changes when files are added or removed (directory mtimes, three levels deep)."""
    parts = []
    for current, dirs, _files in os.walk(folder):
        depth = len(Path(current).relative_to(folder).parts)
        parts.append(f"{current}:{os.stat(current).st_mtime_ns}")
        if depth >= 3:
            dirs[:] = []
    return "|".join(sorted(parts))


@st.cache_data(show_spinner="Reading the data set (once; cached afterwards)...", max_entries=8)
def _scan_cached(path: str, fingerprint: str):
    from cxr_core import data
    return data.scan_dataset(path)


def scan(path: Path):
    """``cxr_core.data.scan_dataset`` cached by folder and contents; raises CxrError."""
    return _scan_cached(str(path), _fingerprint(path))


def current_scan(where: Any = None):
    """ScanResult of the chosen data set, or None (an error is shown when it cannot be read)."""
    path = dataset_path()
    if path is None:
        return None
    try:
        return scan(path)
    except CxrError as error:
        (where or st).error(str(error), icon=":material/error:")
        return None


@st.cache_data(show_spinner=False, max_entries=4)
def split_frame(path: str, fingerprint: str, mode: str, seed: int = 123) -> pd.DataFrame:
    from cxr_core import data
    result = _scan_cached(path, fingerprint)
    return data.make_split(result.manifest, mode=mode, seed=seed)


def current_split(mode: str | None = None) -> pd.DataFrame | None:
    """The chosen data set split with ``mode`` (default: the session's split mode)."""
    path = dataset_path()
    if path is None:
        return None
    mode = mode or st.session_state.get(KEY_SPLIT, "random")
    return split_frame(str(path), _fingerprint(path), mode)


@st.cache_data(show_spinner=False, max_entries=8)
def dataset_stats(path: str, fingerprint: str) -> dict:
    """The Dataset page's summaries (cxr_core.stats), computed once per data set contents."""
    from cxr_core import stats
    result = _scan_cached(path, fingerprint)
    return {
        "summary": stats.dataset_summary(result),
        "class_counts": stats.class_counts(result),
        "subtypes": stats.subtype_counts(result),
        "per_patient": stats.images_per_patient(result),
        "patients": stats.patient_summary(result),
        "sizes": stats.size_distribution(result),
        "size_summary": stats.size_summary(result),
    }


@st.cache_data(show_spinner="Measuring pixel intensities on a sample of images...", max_entries=8)
def intensity_histograms(path: str, fingerprint: str, n_per_class: int = 40) -> pd.DataFrame:
    from cxr_core import stats
    return stats.intensity_histograms(_scan_cached(path, fingerprint), n_per_class=n_per_class, bins=64)


def fingerprint(path: Path) -> str:
    return _fingerprint(path)


def downscale(gray: np.ndarray, size: int = 512) -> np.ndarray:
    """A copy whose longer side is at most ``size`` pixels (nearest neighbour; for display only)."""
    h, w = gray.shape[:2]
    scale = size / max(h, w)
    if scale >= 1:
        return gray
    ys = (np.arange(max(1, int(h * scale))) / scale).astype(int)
    xs = (np.arange(max(1, int(w * scale))) / scale).astype(int)
    return np.ascontiguousarray(gray[ys][:, xs])


@st.cache_data(show_spinner=False, max_entries=256)
def thumbnail(path: str, size: int = 256) -> np.ndarray:
    """A small grayscale copy of an image file for grids (aspect ratio kept); raises CxrError."""
    from cxr_core import images
    return downscale(images.load_gray(path), size)


# --- Augmentation ----------------------------------------------------------------------------
def augment_config() -> AugmentConfig:
    """The augmentation chosen on the Augmentation page (the reference defaults otherwise)."""
    values = st.session_state.get(KEY_AUGMENT)
    try:
        return AugmentConfig(**values) if values else AugmentConfig()
    except (TypeError, ValueError):
        return AugmentConfig()


def augment_is_default() -> bool:
    return augment_config() == AugmentConfig()


# --- Runs -------------------------------------------------------------------------------------
def all_runs() -> list:
    try:
        return runs.list_runs()
    except OSError:
        return []


def finished_runs() -> list:
    return [r for r in all_runs() if r.state == "done"]


def demo_available() -> bool:
    return (runs.demo_run_dir() / runs.MODEL_FILE).is_file()


def selected_run(candidates: list | None = None):
    """The run chosen in this session, else the demo run, else the newest finished run."""
    candidates = finished_runs() if candidates is None else candidates
    if not candidates:
        return None
    wanted = st.session_state.get(KEY_RUN)
    for summary in candidates:
        if str(summary.path) == wanted:
            return summary
    for summary in candidates:
        if summary.is_demo:
            return summary
    return candidates[0]


def run_label(summary) -> str:
    auc = f", test AUC {summary.test_auc:.3f}" if summary.test_auc is not None else ""
    data_name = Path(summary.data_dir).name if summary.data_dir else "?"
    demo = "demo run: " if summary.is_demo else ""
    return f"{demo}{summary.run_id} ({summary.backbone or '?'} on {data_name}{auc})"


def run_picker(label: str = "Run", key: str = "run_picker", help: str | None = None):
    """A selectbox over finished runs; the choice becomes the session's selected run."""
    candidates = finished_runs()
    if not candidates:
        return None
    current = selected_run(candidates)
    paths = [str(s.path) for s in candidates]
    by_path = {str(s.path): s for s in candidates}
    index = paths.index(str(current.path)) if current is not None else 0
    if st.session_state.get(key) not in paths:
        st.session_state[key] = paths[index]
    choice = st.selectbox(label, paths, format_func=lambda p: run_label(by_path[p]), key=key, help=help,
                          on_change=copy_state, args=(key, KEY_RUN))
    st.session_state[KEY_RUN] = choice
    return by_path[choice]


def copy_state(source: str, target: str) -> None:
    """Widget callback: copy a widget's value to a session key before the page reruns (so the
    sidebar, drawn first, already shows the new choice)."""
    st.session_state[target] = st.session_state.get(source)


def _model_stamp(run_dir: Path) -> float:
    # The LiteRT export may be added to a run later (python -m cxr_core export); either file changing
    # must load the predictor anew.
    stamps = []
    for name in (runs.MODEL_FILE, "model.tflite.json"):
        try:
            stamps.append((Path(run_dir) / name).stat().st_mtime)
        except OSError:
            pass
    return max(stamps, default=0.0)


@st.cache_resource(show_spinner="Loading the model...", max_entries=3)
def _predictor_cached(run_dir: str, stamp: float):
    from cxr_core.predict import Predictor
    return Predictor.from_run(run_dir)


def load_predictor(run_dir: str | Path):
    """A cached ``cxr_core.predict.Predictor``; raises CxrError."""
    return _predictor_cached(str(run_dir), _model_stamp(Path(run_dir)))


@st.cache_data(show_spinner=False, max_entries=64)
def explain_bytes(run_dir: str, stamp: float, data: bytes, name: str) -> tuple[np.ndarray, float, np.ndarray]:
    """Decode an upload and return (display-sized gray, probability, Grad-CAM at display size).

    Cached by run and file contents, so moving the opacity slider does not rerun the model.
    Raises CxrError for a file that is not a usable image.
    """
    from cxr_core import images
    gray = images.load_gray(data, name)
    predictor = _predictor_cached(run_dir, stamp)
    probability, heatmap = predictor.explain(gray)
    small = downscale(gray, 640)
    return small, float(probability), _resize_map(heatmap, small.shape)


@st.cache_data(show_spinner=False, max_entries=64)
def explain_path(run_dir: str, stamp: float, path: str) -> tuple[np.ndarray, float, np.ndarray]:
    """Like ``explain_bytes`` for an image file on the server (Evaluation's gallery)."""
    from cxr_core import images
    gray = images.load_gray(path)
    predictor = _predictor_cached(run_dir, stamp)
    probability, heatmap = predictor.explain(gray)
    small = downscale(gray, 512)
    return small, float(probability), _resize_map(heatmap, small.shape)


def _resize_map(heatmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    ys = np.minimum((np.arange(h) * heatmap.shape[0] / h).astype(int), heatmap.shape[0] - 1)
    xs = np.minimum((np.arange(w) * heatmap.shape[1] / w).astype(int), heatmap.shape[1] - 1)
    return np.ascontiguousarray(heatmap[ys][:, xs]).astype(np.float32)


def model_stamp(run_dir: str | Path) -> float:
    return _model_stamp(Path(run_dir))


# --- Page frame -------------------------------------------------------------------------------
def page_header(title: str, intro: str) -> None:
    """Title, the page's short teaching introduction, and the shared sidebar."""
    ensure_routed()
    st.title(title)
    st.markdown(intro)
    sidebar()


def sidebar() -> None:
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
                from cxr_core import jobs
                active = jobs.active_run()
            except (ImportError, OSError, CxrError):
                active = None
            if active is not None:
                st.caption(f":material/sync: Training now: `{Path(active).name}`")
        st.caption(DISCLAIMER)
        root = runs_root_info()
        if root is not None and root.fallback:
            st.info(root.reason, icon=":material/info:")


def runs_root_info():
    try:
        return runs.runs_root()
    except OSError:
        return None


# --- Formatting and plotting -------------------------------------------------------------------
def fmt_seconds(seconds: float | None) -> str:
    """'about 3 min' style durations."""
    if seconds is None or not np.isfinite(seconds):
        return "unknown"
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def fmt_num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{value:.{digits}f}" if np.isfinite(value) else "—"


def style(fig: go.Figure, height: int = 320, title: str | None = None, **layout: Any) -> go.Figure:
    """A compact common layout: the title at the top left, the legend on its own line above the plot."""
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=78 if title else 36, b=10),
                      legend=dict(orientation="h", yanchor="bottom", y=1.01, xanchor="left", x=0.0,
                                  font=dict(size=11)),
                      **layout)
    if title:
        fig.update_layout(title=dict(text=title, x=0.0, xanchor="left", xref="paper", yref="container",
                                     y=0.985, yanchor="top", font=dict(size=15)))
    return fig


def confusion_figure(cm: list[list[int]], title: str = "Confusion matrix") -> go.Figure:
    """A 2x2 heatmap with counts; rows are the truth, columns the prediction."""
    z = np.asarray(cm, dtype=float)
    total = z.sum() or 1.0
    text = [[f"{int(v)}<br>({v / total:.0%})" for v in row] for row in z]
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"predicted {c}" for c in CLASSES], y=[f"true {c}" for c in CLASSES],
        text=text, texttemplate="%{text}", colorscale="Blues", showscale=False,
    ))
    fig.update_yaxes(autorange="reversed")
    return style(fig, height=300, title=title)


def metrics_table(columns: dict[str, dict | None]) -> pd.DataFrame:
    """Rows are metrics, columns are the given metric dicts (e.g. at 0.5 / at threshold)."""
    names = [("accuracy", "Accuracy"), ("sensitivity", "Sensitivity (recall)"),
             ("specificity", "Specificity"), ("precision", "Precision (PPV)"), ("f1", "F1"),
             ("roc_auc", "ROC AUC"), ("pr_auc", "PR AUC"), ("brier", "Brier score"),
             ("threshold", "Threshold"), ("n", "Images")]
    rows = {}
    for key, label in names:
        digits = 0 if key == "n" else 3
        rows[label] = {col: fmt_num(None if m is None else m.get(key), digits) for col, m in columns.items()}
    return pd.DataFrame(rows).T


def config_dict(summary_or_dir) -> dict:
    run_dir = getattr(summary_or_dir, "path", summary_or_dir)
    return runs.read_config_dict(run_dir)


def as_dict(obj: Any) -> dict:
    return asdict(obj) if hasattr(obj, "__dataclass_fields__") else dict(obj)


def now() -> float:
    return time.time()
