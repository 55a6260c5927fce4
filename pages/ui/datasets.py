"""Data sets: the data root, cached scans, splits, statistics and thumbnails."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from cxr_core.core.config import RunConfig
from cxr_core.core.errors import CxrError
from cxr_core.data import plan, practice, scan as data, stats
from cxr_core.hosting import classroom, resources
from cxr_core.io import images
from cxr_core.runs import registry as runs
from pages.ui import PROJECT_ROOT, access
from pages.ui.session import KEY_DATASET, KEY_SPLIT

SKIP_DIR_PREFIXES = (".", "_")


def data_root() -> Path:
    """Where data sets live: ``$CXR_DATA_ROOT`` or ``./data`` next to Home.py."""
    env = os.environ.get("CXR_DATA_ROOT")
    return Path(env).expanduser() if env else PROJECT_ROOT / "data"


def all_datasets() -> list[str]:
    """Names of every folder directly under the data root, the locked test set included (the operator's)."""
    root = data_root()
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(SKIP_DIR_PREFIXES)
    )


def list_datasets() -> list[str]:
    """The data sets this session may choose (never a free path): every folder under the data root, except
    the class's locked test set for a visitor (``cxr_core.hosting.classroom``). Every choice of a data set
    (the folder box, a link, a session value, the external test set, a lesson) passes through here."""
    return classroom.visible_datasets(all_datasets(), access.role(), data_root(), runs_root())


def runs_root() -> Path | None:
    """The runs root, where the classroom settings live; None when it cannot be determined."""
    try:
        return runs.runs_root().path
    except OSError:
        return None


def hides(name_or_path: str | Path | None) -> bool:
    """Whether this session may not see ``name_or_path`` (the locked test set, for a visitor)."""
    return classroom.hides(access.role()) and classroom.is_locked(name_or_path, data_root(), runs_root())


def hidden_names() -> list[str]:
    """The data set folders this session may not see: the locked test set for a visitor, else none."""
    if not classroom.hides(access.role()):
        return []
    locked = classroom.locked_name(runs_root())
    return [locked] if locked else []


def hidden_evaluation(name: str) -> bool:
    """Whether a run's stored evaluation ``name`` is on the locked test set and hidden from this session."""
    return classroom.hidden_evaluation(name, access.role(), data_root(), runs_root())


def dataset_path(name: str | None = None) -> Path | None:
    """The chosen data set folder, or None when none is chosen, it has gone or this session may not see it."""
    name = name if name is not None else st.session_state.get(KEY_DATASET)
    if not name or name not in list_datasets():
        return None
    return data_root() / name


def is_synthetic(path: Path) -> bool:
    """True for the generated practice set (its folder name or marker file says so)."""
    return "synthetic" in path.name.lower() or (path / practice.MARKER_FILE).is_file()


def fingerprint(folder: Path) -> str:
    """Changes when files are added or removed (directory mtimes, three levels deep)."""
    parts = []
    for current, dirs, _files in os.walk(folder):
        depth = len(Path(current).relative_to(folder).parts)
        parts.append(f"{current}:{os.stat(current).st_mtime_ns}")
        if depth >= 3:
            dirs[:] = []
    return "|".join(sorted(parts))


@st.cache_data(show_spinner="Reading the data set (once; cached afterwards)...", max_entries=8)
def _scan_cached(path: str, fingerprint: str):  # noqa: ARG001 (fingerprint: part of the cache key)
    return data.scan_dataset(path)


def scan(path: Path):
    """``cxr_core.data.scan.scan_dataset`` cached by folder and contents; raises CxrError (the locked test set,
    for a visitor: its labels are what stays hidden)."""
    classroom.check_visible(path, access.role(), data_root(), runs_root())
    return _scan_cached(str(path), fingerprint(path))


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
def _split_cached(path: str, fingerprint: str, mode: str, seed: int = 123) -> pd.DataFrame:
    result = _scan_cached(path, fingerprint)
    return data.make_split(result.manifest, mode=mode, seed=seed)


def current_split(mode: str | None = None) -> pd.DataFrame | None:
    """The chosen data set split with ``mode`` (default: the session's split mode)."""
    path = dataset_path()
    if path is None:
        return None
    mode = mode or st.session_state.get(KEY_SPLIT, "random")
    return _split_cached(str(path), fingerprint(path), mode)


@st.cache_data(show_spinner=False, max_entries=8)
def dataset_stats(path: str, fingerprint: str) -> dict:
    """The Dataset page's summaries (cxr_core.data.stats), computed once per data set contents."""
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
    return stats.intensity_histograms(_scan_cached(path, fingerprint), n_per_class=n_per_class, bins=64)


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
    return downscale(images.load_gray(path), size)


@st.cache_data(show_spinner=False, max_entries=8)
def _plan_cached(path: str, fingerprint: str, config_dict: dict):

    return plan.plan_run(RunConfig.from_dict(config_dict), _scan_cached(path, fingerprint).manifest)


def run_plan(config) -> Any:
    """``cxr_core.data.plan.plan_run`` for the chosen data set (what training will use), cached;
    None when no data set is chosen. Raises CxrError."""
    path = dataset_path()
    if path is None:
        return None
    return _plan_cached(str(path), fingerprint(path), config.to_dict())


def upload_limit() -> tuple[int, int]:
    """(largest zip in MB, the server's memory in MB): sized from the memory the server really has
    (``cxr_core.hosting.resources``); ``$CXR_MAX_UPLOAD_MB`` overrides it."""
    server_max = int(st.get_option("server.maxUploadSize"))
    memory_mb = resources.memory_limit_bytes() // resources.MB
    try:
        return resources.upload_limit_mb(memory_mb * resources.MB, server_max), memory_mb
    except CxrError as error:
        st.error(str(error), icon=":material/error:")
        return resources.upload_limit_mb(memory_mb * resources.MB, server_max, env={}), memory_mb
