"""A run folder and every file in it: the one place that knows their names and formats.

``RunFolder(path)`` is the typed door to a run: training writes through it; prediction, the LiteRT
export, the job launcher, the command line and the pages read through it. Every write is atomic
(``cxr_core.io.atomic``), so a reader never sees half a file.

    config.json       RunConfig.to_dict() (train.recipe names the recipe it started from)
    split.csv         every image with its split (+ augmented rows: source path and augment_seed)
    skipped.csv       images that could not be read, with the reason
    history.csv       per epoch: phase, epoch, loss, accuracy, auc, precision, recall, val_* of each
    progress.jsonl    one JSON line per event: {"time", "event": "stage"|"extract"|"epoch"|"batch"|"done"|...}
    status.json       {"state": queued|running|done|failed|cancelled, "pid", "pid_create_time", "started", "finished",
                      "error", "message"}; read as ``records.Status`` (its state a ``records.RunState``)
    metrics.json      {"task", "classes", "threshold", "threshold_rule", "val", "test": {"at_0.5", "at_threshold"},
                      "split_counts", "calibration", "tta": {"mode", "used", "views", "val_auc_one",
                      "val_auc_views"}, ...}; a subtype run: threshold null, rule "argmax", test {"at_threshold"};
                      read as ``records.Metrics``
    predictions.csv   validation and test images: path, y, probability, split, label, patient_id (+ p_NORMAL,
                      p_BACTERIA, p_VIRUS for a subtype run, whose probability is P(pneumonia) = 1 - p_NORMAL)
    model.keras       the classifier, written after metrics.json
    model.tflite      its LiteRT export (written last)
    model.tflite.json the sha256 of the model.keras it was exported from
    members.json      an ensemble's member run folders (only in an ensemble run, whose train.recipe is "ensemble")
    evaluations/      <data set>.json (the evaluate JSON) and <data set>.csv (per-image probabilities) for
                      every external test set; the newest one none of whose images the run trained on is
                      the run's headline figure on the Home and Evaluation pages and in the runs table; each
                      read as ``records.Evaluation``
    cancel.request    present when a person asked the job to stop
    train.log         the background job's output
    heartbeat.json    a training process's sign of life (pid, host, time), read from another machine
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import psutil

from cxr_core.core.calibration import Calibration
from cxr_core.core.config import RunConfig
from cxr_core.core.errors import BadRunError, CxrError, lower_first
from cxr_core.core.labels import DEFAULT_THRESHOLD
from cxr_core.io.atomic import (
    append_jsonl,
    atomic_path,
    read_json,
    read_jsonl,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from cxr_core.runs.records import Evaluation, Metrics, RunState, Status, TestSet

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SPLIT_FILE = "split.csv"
SKIPPED_FILE = "skipped.csv"
HISTORY_FILE = "history.csv"
PROGRESS_FILE = "progress.jsonl"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
MODEL_FILE = "model.keras"
LITE_FILE = "model.tflite"
LITE_INFO_FILE = "model.tflite.json"
MEMBERS_FILE = "members.json"
EVALUATIONS_DIR = "evaluations"
CANCEL_FILE = "cancel.request"
LOG_FILE = "train.log"

HISTORY_COLUMNS = [
    "phase", "epoch", "loss", "accuracy", "auc", "precision", "recall",
    "val_loss", "val_accuracy", "val_auc", "val_precision", "val_recall", "seconds",
]
# p_<class>: each class's probability, in a subtype run only (whose label is the most probable class).
PREDICTION_COLUMNS = ["path", "y", "probability", "p_NORMAL", "p_BACTERIA", "p_VIRUS", "split", "label", "patient_id"]


def evaluation_name(data_dir: str | os.PathLike) -> str:
    """The name an external evaluation is stored under: the data set folder's name, made safe."""
    name = Path(os.fspath(data_dir)).expanduser().resolve().name or "data"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:80] or "data"


def _create_time(pid: Any) -> float | None:
    """When process ``pid`` started (seconds since the epoch, as psutil counts), or None."""

    try:
        return psutil.Process(int(pid)).create_time()
    except (psutil.Error, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class RunFolder:
    """One run folder. Cheap to make; reads nothing until asked."""

    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    # -- paths of the files others open themselves (Keras, LiteRT, a log) ------------------------
    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def lite_path(self) -> Path:
        return self.path / LITE_FILE

    @property
    def lite_info_path(self) -> Path:
        return self.path / LITE_INFO_FILE

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    def has_model(self) -> bool:
        return self.model_path.is_file()

    def model_stamp(self) -> float:
        """Changes whenever the model or its LiteRT export changes (for caches of loaded models)."""
        stamps = []
        for path in (self.model_path, self.lite_info_path):
            with contextlib.suppress(OSError):
                stamps.append(path.stat().st_mtime)
        return max(stamps, default=0.0)

    # -- config --------------------------------------------------------------------------------
    def write_config(self, config: RunConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.config_path, config.to_dict())

    def read_config(self) -> RunConfig:
        """The run's settings.

        Raises:
            BadRunError: one sentence when the folder or its config.json is missing or damaged.
        """
        if not self.path.is_dir():
            raise BadRunError(f"The run folder {self.path} does not exist.")
        if not self.config_path.is_file():
            raise BadRunError(f"The run folder {self.path} has no {CONFIG_FILE}, so it cannot be loaded.")
        try:
            raw = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BadRunError(
                f"The run folder {self.path} has a {CONFIG_FILE} that is not valid JSON, "
                "so its settings cannot be read."
            ) from error
        try:
            return RunConfig.from_dict(raw)
        except BadRunError as error:
            raise BadRunError(f"The run folder {self.path} cannot be loaded: {lower_first(str(error))}") from error

    def config_or_none(self) -> RunConfig | None:
        """The settings, or None when they cannot be read (for listings that must not fail)."""
        try:
            return self.read_config()
        except BadRunError:
            return None

    # -- tables --------------------------------------------------------------------------------
    def _write_csv(self, name: str, frame: pd.DataFrame) -> None:
        write_text_atomic(self.path / name, frame.to_csv(index=False))

    def _read_csv(self, name: str, columns: list[str]) -> pd.DataFrame:
        try:
            return pd.read_csv(self.path / name)
        except (FileNotFoundError, pd.errors.EmptyDataError, pd.errors.ParserError):
            return pd.DataFrame(columns=columns)

    def write_split(self, rows: pd.DataFrame) -> None:
        self._write_csv(SPLIT_FILE, rows.drop(columns=["y"], errors="ignore"))

    def read_split(self) -> pd.DataFrame:
        return self._read_csv(SPLIT_FILE, ["path", "label", "split"])

    def write_skipped(self, frame: pd.DataFrame) -> None:
        self._write_csv(SKIPPED_FILE, frame)

    def write_history(self, rows: list[dict]) -> None:
        self._write_csv(HISTORY_FILE, pd.DataFrame(rows, columns=HISTORY_COLUMNS))

    def read_history(self) -> pd.DataFrame:
        """Per-epoch history (an empty frame with the usual columns when there is none yet)."""
        return self._read_csv(HISTORY_FILE, HISTORY_COLUMNS)

    def write_predictions(self, frame: pd.DataFrame) -> None:
        self._write_csv(PREDICTIONS_FILE, frame[[c for c in PREDICTION_COLUMNS if c in frame.columns]])

    def read_predictions(self) -> pd.DataFrame:
        """Validation and test predictions: path, y, probability, split (empty frame when absent)."""
        return self._read_csv(PREDICTIONS_FILE, ["path", "y", "probability", "split"])

    # -- progress and status -------------------------------------------------------------------
    def append_progress(self, record: dict) -> None:
        append_jsonl(self.path / PROGRESS_FILE, record)

    def read_progress_events(self) -> list[dict]:
        return read_jsonl(self.path / PROGRESS_FILE)

    def status(self) -> Status | None:
        """status.json as written (not reconciled with the process; see ``registry.run_status``), or None
        when it is missing, damaged or names no known state."""
        return Status.from_dict(read_json(self.path / STATUS_FILE, default=None))

    def read_status_file(self) -> dict | None:
        """``status()`` as the file's dict (for ``registry.running_process`` and older readers)."""
        status = self.status()
        return dict(status.raw) if status is not None else None

    def write_status(self, state: RunState | str, **fields: Any) -> dict:
        """Replace status.json with ``state`` plus ``fields`` (keeps the started time and pid).

        The pid goes with its process's creation time (``pid_create_time``), so that a pid reused
        by another program later is not taken for the run's process (``runs.running_process``).
        """
        known = RunState.parse(state)
        if known is None:
            raise ValueError(f"unknown state {state!r}")
        previous = read_json(self.path / STATUS_FILE, default={}) or {}
        pid = fields.pop("pid", previous.get("pid", os.getpid()))
        same = pid == previous.get("pid") and "pid_create_time" in previous
        status = {
            "state": known.value,
            "pid": pid,
            "pid_create_time": previous["pid_create_time"] if same else _create_time(pid),
            # A queued run has no start time (the caller passes started=None); it is set when it runs.
            "started": previous.get("started") or time.time(),
            "updated": time.time(),
        }
        if known.is_finished:
            status["finished"] = time.time()
        status.update(fields)
        write_json_atomic(self.path / STATUS_FILE, status)
        return status

    def request_cancel(self) -> None:
        write_bytes_atomic(self.path / CANCEL_FILE, b"cancel\n")

    def cancel_requested(self) -> bool:
        return (self.path / CANCEL_FILE).exists()

    # -- results -------------------------------------------------------------------------------
    def write_metrics(self, metrics: dict) -> None:
        write_json_atomic(self.path / METRICS_FILE, metrics)

    def metrics(self) -> Metrics | None:
        """metrics.json; None when the run has none yet (still training, failed) or it is not a JSON object."""
        return Metrics.from_dict(read_json(self.path / METRICS_FILE, default=None))

    def read_metrics(self) -> dict | None:
        """metrics.json as a dict (for tests and tools that read its raw layout; code reads ``metrics()``)."""
        metrics = read_json(self.path / METRICS_FILE, default=None)
        return metrics if isinstance(metrics, dict) else None

    def read_threshold(self) -> float:
        """The decision threshold chosen on validation (metrics.json); 0.5 when there is none.

        Raises:
            BadRunError: metrics.json exists but is unreadable or holds an invalid threshold.
        """
        path = self.path / METRICS_FILE
        if not path.is_file():
            log.warning("Run folder %s has no %s; using threshold %.1f.", self.path, METRICS_FILE, DEFAULT_THRESHOLD)
            return DEFAULT_THRESHOLD
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BadRunError(
                f"The run folder {self.path} has a {METRICS_FILE} that is not valid JSON, "
                "so its threshold cannot be read."
            ) from error
        if not isinstance(metrics, dict) or metrics.get("threshold") is None:
            log.warning("Run folder %s: %s holds no threshold; using %.1f.", self.path, METRICS_FILE, DEFAULT_THRESHOLD)
            return DEFAULT_THRESHOLD
        return check_threshold(metrics["threshold"], f"in {path}")

    def read_calibration(self) -> Calibration:
        """The calibration fitted after training (metrics.json, ``calibration``); the identity for a run
        that has none (trained before calibration existed, or with ``--no-calibrate``).

        Raises:
            BadRunError: the stored calibration is damaged.
        """
        stored = (self.read_metrics() or {}).get("calibration")
        try:
            return Calibration.from_dict(stored if isinstance(stored, dict) else None)
        except CxrError as error:
            raise BadRunError(f"The run folder {self.path}: {error}") from error

    def read_tta(self) -> bool:
        """Whether the run predicts with test-time views (metrics.json, ``tta.used``; False for a run without)."""
        stored = (self.read_metrics() or {}).get("tta")
        return bool(stored.get("used")) if isinstance(stored, dict) else False

    def save_model(self, classifier: Any) -> None:
        """Save a Keras classifier as model.keras, atomically."""
        with atomic_path(self.model_path) as tmp:
            classifier.save(tmp)

    def write_export(self, flatbuffer: bytes, info: dict) -> None:
        """Write model.tflite, then model.tflite.json (the pair is current only when the json matches)."""
        with atomic_path(self.lite_path) as tmp:
            Path(tmp).write_bytes(flatbuffer)
        write_json_atomic(self.lite_info_path, info)

    def read_export_info(self) -> Any:
        """model.tflite.json as parsed JSON; None when absent.

        Raises:
            ValueError: when the file exists but is not JSON.
        """
        if not self.lite_info_path.is_file():
            return None
        return json.loads(self.lite_info_path.read_text(encoding="utf-8"))

    # -- ensembles -----------------------------------------------------------------------------
    def write_members(self, members: list[str | os.PathLike]) -> None:
        """Record an ensemble's member run folders (as absolute paths) in members.json."""
        self.path.mkdir(parents=True, exist_ok=True)
        paths = [str(Path(os.fspath(m)).expanduser().resolve()) for m in members]
        write_json_atomic(self.path / MEMBERS_FILE, {"members": paths})

    def is_ensemble(self) -> bool:
        return (self.path / MEMBERS_FILE).is_file()

    # -- external evaluations ------------------------------------------------------------------
    def write_evaluation(self, name: str, result: dict, predictions: pd.DataFrame | None = None) -> Path:
        """Store the evaluation of this run on an external data set: ``evaluations/<name>.json``
        and, when given, its per-image predictions in ``evaluations/<name>.csv`` (written first)."""
        target = self.path / EVALUATIONS_DIR / f"{name}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        if predictions is not None:
            write_text_atomic(target.with_suffix(".csv"), predictions.to_csv(index=False))
        write_json_atomic(target, {**result, "name": name, "stored": time.time()})
        return target

    def evaluations(self, external_only: bool = False) -> list[Evaluation]:
        """Every stored external evaluation, newest first; with ``external_only`` only those none of whose
        images the run trained on (the honest figures; the first is the run's headline figure)."""
        found = [Evaluation.from_dict(name, raw) for name, raw in self.read_evaluations().items()]
        return [e for e in found if e is not None and (e.is_external or not external_only)]

    def headline_evaluation(self) -> Evaluation | None:
        """The run's headline figure: the newest external evaluation none of whose images it trained on,
        and not on a shortcut lab copy (whose planted markers flatter or hurt a model on purpose)."""
        return next((e for e in self.evaluations(external_only=True) if not e.is_planted), None)

    def external_evaluations(self) -> dict[str, dict]:
        """``evaluations(external_only=True)`` as dicts by data set name (for tests and tools)."""
        return {e.name: dict(e.raw) for e in self.evaluations(external_only=True)}

    def read_evaluation_predictions(self, name: str) -> pd.DataFrame:
        """Per-image predictions of a stored external evaluation (path, y, probability)."""
        return self._read_csv(f"{EVALUATIONS_DIR}/{name}.csv", ["path", "y", "probability"])

    def read_evaluations(self) -> dict[str, dict]:
        """Every stored external evaluation as parsed JSON, newest first, by data set name."""
        folder = self.path / EVALUATIONS_DIR
        if not folder.is_dir():
            return {}
        found = []
        for path in folder.glob("*.json"):
            result = read_json(path, default=None)
            if isinstance(result, dict):
                found.append((path.stem, result))
        found.sort(key=lambda item: item[1].get("stored") or 0, reverse=True)
        return dict(found)

    def test_sets(self) -> list[TestSet]:
        """The run's test sets, the honest one first: each external evaluation whose per-image predictions
        are stored (newest first; those on a shortcut lab copy after the clean ones), then the test part of
        the run's own split (with metrics.json)."""
        found = []
        for result in sorted(self.evaluations(external_only=True), key=lambda e: e.is_planted):
            preds = self.read_evaluation_predictions(result.name).dropna(subset=["y", "probability"])
            if not preds.empty:
                found.append(TestSet(name=result.name, external=True, predictions=preds,
                                     threshold=_or_half(result.threshold), figures=result.figures,
                                     at_05=result.at_05, prevalence=result.prevalence,
                                     sampled_from=result.sampled_from))
        metrics = self.metrics()
        preds = self.read_predictions()
        if "split" in preds.columns:
            preds = preds[preds["split"] == "test"]
        preds = preds.dropna(subset=["y", "probability"])
        if metrics is not None and not preds.empty:
            found.append(TestSet(name="internal", external=False, predictions=preds,
                                 threshold=_or_half(metrics.threshold), figures=metrics.test_at_threshold,
                                 at_05=metrics.test_at_05, rule=metrics.threshold_rule,
                                 n_patients=metrics.n_patients_test))
        return found


def _or_half(threshold: float | None) -> float:
    """A stored threshold, or 0.5 for a subtype run (which has none: it calls the most probable class)."""
    return DEFAULT_THRESHOLD if threshold is None else float(threshold)


def check_threshold(value: Any, context: str) -> float:
    """``value`` as a threshold in [0, 1]; otherwise BadRunError, whose sentence says "The threshold
    <context>" (``context``: where it came from, such as "in <path>" or "asked for")."""
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = float("nan")
    if not (0.0 <= threshold <= 1.0):
        raise BadRunError(f"The threshold {context} must be a number between 0 and 1; got {value!r}.")
    return threshold
