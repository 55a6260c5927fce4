"""Runs and trained models: run lists and the run picker, the cached predictor and Grad-CAM caches."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import streamlit as st

from cxr_core.core.errors import CxrError
from cxr_core.core.tasks import Task, get_task
from cxr_core.inference.predictor import Predictor, overlay_heatmap
from cxr_core.io import images
from cxr_core.runs import registry as runs
from cxr_core.runs.records import stored_intervals
from cxr_core.runs.run_folder import RunFolder, RunState, TestSet
from pages.ui import access
from pages.ui.datasets import downscale, hidden_evaluation
from pages.ui.session import KEY_RUN, copy_state

if TYPE_CHECKING:  # pragma: no cover
    from cxr_core.inference.predictor import Explanation


def all_runs() -> list:
    """The runs this session sees: the shared ones, a visitor's own workspace, or every workspace for the
    operator of a hosted app."""
    try:
        found = runs.list_runs(workspace=access.workspace(), everyone=access.hosted() and access.is_operator())
    except OSError:
        return []
    return [_without_locked(s) for s in found]


def headline_evaluation(path) -> object | None:
    """A run's headline external evaluation as this session may see it: never one on the class's locked test set
    for a visitor (``RunFolder.headline_evaluation`` otherwise)."""
    return next((e for e in RunFolder(path).evaluations(external_only=True)
                 if not e.is_planted and not hidden_evaluation(e.name)), None)


def _without_locked(summary):
    """A run's summary with its headline figure taken from another external test set when the newest one is the
    class's locked test set and this session may not see it (a visitor)."""
    if not summary.external_name or not hidden_evaluation(summary.external_name):
        return summary
    other = headline_evaluation(summary.path)
    return dataclasses.replace(
        summary, external_name=other.name if other else None, external_auc=other.roc_auc if other else None,
        external_accuracy=other.accuracy if other else None,
        external_auc_interval=stored_intervals(other.raw).get("roc_auc") if other else None)


def finished_runs() -> list:
    return [r for r in all_runs() if r.state is RunState.DONE]


def demo_available() -> bool:
    return RunFolder(runs.demo_run_dir()).has_model()


def runs_root_info():
    """Where runs are kept (``runs.runs_root()``), or None when it cannot be determined."""
    try:
        return runs.runs_root()
    except OSError:
        return None


def selected_run(candidates: list | None = None):
    """The run chosen in this session, else the demo run, else the newest finished run that learned
    something (a run that learned nothing is used only when the person chose it)."""
    candidates = finished_runs() if candidates is None else candidates
    if not candidates:
        return None
    wanted = st.session_state.get(KEY_RUN)
    for summary in candidates:
        if str(summary.path) == wanted:
            return summary
    for summary in candidates:
        if summary.is_demo and not summary.learned_nothing:
            return summary
    useful = [summary for summary in candidates if not summary.learned_nothing]
    return useful[0] if useful else candidates[0]


def warn_if_useless(summary) -> None:
    """Say so above a page's results when the chosen run learned nothing."""
    if summary is not None and summary.learned_nothing:
        st.warning(summary.warning + " Choose another run or train again with pretrained weights.",
                   icon=":material/warning:")


def run_task(run_dir: str | Path) -> str:
    """The name of what a run learned to tell apart (``labels.TASKS``): its config.json says, else its
    metrics.json; a run from before the subtype task is ``pneumonia``."""
    folder = RunFolder(run_dir)
    config = folder.config_or_none()
    if config is not None:
        return config.data.task
    metrics = folder.metrics()
    return metrics.task if metrics is not None else "pneumonia"


def task_of(run_dir: str | Path) -> Task:
    """The ``Task`` a run learned (ask it, rather than its name, what to show)."""
    return get_task(run_task(run_dir))


def _internal_accuracy(run_dir: str | Path) -> float | None:
    metrics = RunFolder(run_dir).metrics()
    return metrics.test_at_threshold.get("accuracy") if metrics is not None else None


def test_set_caption(test_set: TestSet, summary) -> str:
    """'311 images of the data set kermany-test, none of them in this run's training part.' or '60 images
    of the run's own patient split from 41 patients.'"""
    if test_set.external:
        sampled = f", a sample of {test_set.n} of {test_set.sampled_from}" if test_set.sampled_from else ""
        return (f"{test_set.n} images of the data set {test_set.name}{sampled}, none of them in this run's "
                "training part.")
    patients = f" from {test_set.n_patients} patients" if test_set.n_patients else ""
    return f"{test_set.n} images of the run's own {summary.split or ''} split{patients}."


def run_label(summary) -> str:
    """The run's name, backbone and data set, with its honest figure first: the AUC on an external
    test set when it has one, else the AUC on its own split's test part (said to be internal). A
    subtype run says so and gives its macro AUC and accuracy (over the three classes)."""
    subtype = not task_of(summary.path).is_binary  # its AUC is a macro AUC over the classes
    name = "macro AUC" if subtype else "AUC"
    if summary.external_auc is not None:
        auc = f", {name} {summary.external_auc:.3f} on {summary.external_name}"
        accuracy = summary.external_accuracy
    elif summary.test_auc is not None:
        auc = f", internal test {name} {summary.test_auc:.3f}"
        accuracy = _internal_accuracy(summary.path) if subtype else None
    else:
        auc, accuracy = "", None
    if subtype and auc and accuracy is not None:
        auc += f", accuracy {accuracy:.3f}"
    data_name = Path(summary.data_dir).name if summary.data_dir else "?"
    demo = "demo run: " if summary.is_demo else ""
    if summary.learned_nothing:
        demo = f"⚠ learned nothing (validation {name} {summary.val_auc:.2f}): {demo}"
    task = ", normal/bacterial/viral" if subtype else ""
    return f"{demo}{summary.run_id} ({summary.backbone or '?'} on {data_name}{task}{auc})"


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


def model_stamp(run_dir: str | Path) -> float:
    """Changes when the run's model or its LiteRT export changes (part of every model cache key)."""
    return RunFolder(run_dir).model_stamp()


@st.cache_resource(show_spinner="Loading the model...", max_entries=3)
def _predictor_cached(run_dir: str, stamp: float):  # noqa: ARG001 (stamp: part of the cache key)
    return Predictor.from_run(run_dir)


def load_predictor(run_dir: str | Path):
    """A cached ``cxr_core.inference.predictor.Predictor``; raises CxrError."""
    return _predictor_cached(str(run_dir), model_stamp(run_dir))


# An upload's decoded image lives in this visitor's memory only: never on disk (persist=False), and
# gone when the session ends (scope="session"), as the Predict page says.
@st.cache_data(show_spinner=False, max_entries=64, persist=False, scope="session")
def explain_bytes(run_dir: str, stamp: float, data: bytes, name: str) -> tuple[np.ndarray, Explanation]:
    """Decode an upload and return (display-sized gray, its ``Explanation`` with the map at display size).

    The map shows the evidence for the predicted class (``Explanation.target``, ``.caption``).
    Cached by run and file contents, so moving the opacity slider does not rerun the model.
    Raises CxrError for a file that is not a usable image.
    """
    gray = images.load_gray(data, name)
    (found,) = _predictor_cached(run_dir, stamp).explain([gray])
    small = downscale(gray, 640)
    return small, dataclasses.replace(found, heatmap=_small_map(found.heatmap))


@st.cache_data(show_spinner=False, max_entries=64)
def explain_path(run_dir: str, stamp: float, path: str, target: str | None = None) -> tuple[np.ndarray, Explanation]:
    """Like ``explain_bytes`` for an image file on the server (Evaluation's gallery); ``target`` picks
    the class whose evidence the map shows (by default the predicted one)."""
    gray = images.load_gray(path)
    (found,) = _predictor_cached(run_dir, stamp).explain([gray], target)
    small = downscale(gray, 512)
    return small, dataclasses.replace(found, heatmap=_small_map(found.heatmap))


#: Longest side of a cached map. A CAM has 4 to 10 cells a side, so 64 loses nothing visible, and
#: a cache entry holds 16 KB instead of a display-sized 1.6 MB (``overlay_heatmap`` resizes it smoothly).
MAP_SIDE = 64


def _small_map(heatmap: np.ndarray) -> np.ndarray:
    h, w = heatmap.shape
    scale = min(1.0, MAP_SIDE / max(h, w))
    return _resize_map(heatmap, (max(1, round(h * scale)), max(1, round(w * scale))))


def _resize_map(heatmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    ys = np.minimum((np.arange(h) * heatmap.shape[0] / h).astype(int), heatmap.shape[0] - 1)
    xs = np.minimum((np.arange(w) * heatmap.shape[1] / w).astype(int), heatmap.shape[1] - 1)
    return np.ascontiguousarray(heatmap[ys][:, xs]).astype(np.float32)


def map_gallery(summary, rows, target: str, limit: int, caption, heading: str) -> None:
    """Three columns of Grad-CAM overlays of ``rows`` under ``heading``, each map showing the evidence
    for ``target``; ``caption(row, explanation)`` labels each image. Images not on this server are said
    to be elsewhere; a file that cannot be read gets one line, and a map without evidence says so
    instead of drawing a blank square."""
    rows = rows[rows["path"].map(lambda p: Path(str(p)).is_file())]
    if rows.empty:
        st.info("The images of this test set are not on this machine (it was evaluated elsewhere), so their "
                "Grad-CAM cannot be drawn here.", icon=":material/info:")
        return
    st.caption(heading)
    stamp = model_stamp(summary.path)
    columns = st.columns(3)
    for i, (_, row) in enumerate(rows.head(limit).iterrows()):
        with columns[i % 3]:
            name = Path(str(row["path"])).name
            try:
                gray, found = explain_path(str(summary.path), stamp, str(row["path"]), target)
            except CxrError as error:
                st.error(f"{name}: {error}")
                continue
            if found.empty:
                st.info(f"{name}: {found.caption}", icon=":material/info:")
                continue
            st.image(overlay_heatmap(gray, found.heatmap, 0.4), width="stretch",
                     caption=f"{name}: {caption(row, found)}")


def where_trained(run_dir: str | Path, running: bool = False) -> str:
    """'Training on host gpu-01 · 2 × GPU (MirroredStrategy) · mixed_float16' from what the run
    recorded (``runs.runtime``); what it did not record is left out, and a run from before says nothing."""
    info = runs.runtime(run_dir)
    parts = []
    if info.get("host"):
        workers = _count(info.get("workers"))
        parts.append(f"host {info['host']}" + (f" (the chief of {workers} workers)" if workers > 1 else ""))
    devices = info.get("devices") if isinstance(info.get("devices"), list) else []
    count = _count(info.get("replicas")) or len(devices)
    kind = info.get("device_kind") or (str(devices[0]).split(":")[0] if devices else "")
    device = f"{count} × {kind}" if count and kind else kind or (f"{count} devices" if count else "")
    strategy = info.get("strategy")
    if strategy and strategy != "default":
        device = f"{device} ({strategy})" if device else str(strategy)
    parts += [p for p in (device, str(info.get("precision") or "")) if p]
    if not parts:
        return ""
    return ("Training on " if running else "Trained on ") + " · ".join(parts)


def _count(value) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def elsewhere_note(run_dir: str | Path) -> str:
    """For a run that trains on another machine: who started it there, and that this page only reads its files."""
    host = runs.other_host(run_dir)
    if host is None:
        return ""
    how = "the app" if RunFolder(run_dir).log_path.is_file() else "the command line"  # the app's jobs write train.log
    return f"Started from {how} on {host}; this page follows its files."
