"""Typed records of what a run folder holds: its state, ``status.json``, ``metrics.json``, its external
evaluations and its test sets.

``RunFolder`` reads them (``status()``, ``metrics()``, ``evaluations()``, ``test_sets()``); the files
are written as before, so older run folders and other tools read the same JSON. Each record keeps the
parsed JSON as ``raw`` for what is rarely read (a figure a table shows, a field only one page knows).
A value of the wrong type in a file reads as None (or empty), never as an exception: a listing of runs
must not fail on one damaged file.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr_core.core.labels import TASKS, classes_for

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

#: The task of a run from before the subtype task (its metrics.json names none).
DEFAULT_TASK = "pneumonia"


class RunState(StrEnum):
    """What ``status.json`` says a run is doing; the values are the strings the file holds."""

    #: Waiting in the training queue (``hosting.job_queue``): no process yet and no start time.
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_active(self) -> bool:
        """Queued or running: the run may still change, holds its place, and is not to be deleted."""
        return self in (RunState.QUEUED, RunState.RUNNING)

    @property
    def is_finished(self) -> bool:
        """Done, failed or cancelled: the run has ended (the last event of its progress says which)."""
        return not self.is_active

    @classmethod
    def parse(cls, value: Any) -> RunState | None:
        """The state named by ``value`` (a string as the files hold it), or None for anything else."""
        try:
            return cls(value)
        except (TypeError, ValueError):
            return None


def _number(value: Any) -> float | None:
    """A finite number as float, else None (a bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _whole(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def stored_intervals(figures: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """The ``intervals`` stored with an evaluation ({figure: (low, high)}); a figure stored as None (it could
    not be computed) or damaged is left out."""
    stored = figures.get("intervals")
    if not isinstance(stored, Mapping):
        return {}
    found = {}
    for name, pair in stored.items():
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            low, high = _number(pair[0]), _number(pair[1])
            if low is not None and high is not None:
                found[str(name)] = (low, high)
    return found


def intervals_by(figures: Mapping[str, Any]) -> str | None:
    """What an evaluation's stored intervals resampled: "patient" or "image" (None: none stored)."""
    value = figures.get("intervals_by")
    return value if value in ("patient", "image") and stored_intervals(figures) else None


@dataclass(frozen=True)
class Status:
    """``status.json``: the run's state and its process (see ``RunFolder.write_status``)."""

    state: RunState
    message: str = ""
    error: str | None = None
    pid: int | None = None
    #: When the process ``pid`` started, so a pid reused by another program is not taken for it.
    pid_create_time: float | None = None
    started: float | None = None
    finished: float | None = None
    updated: float | None = None
    #: When a queued run was submitted (it has no start time yet).
    submitted: float | None = None
    duration_s: float | None = None
    #: The machine the run trains on (a run folder on shared storage); None for a run from before.
    host: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, raw: Any) -> Status | None:
        """The status a parsed ``status.json`` holds; None when it names no known state."""
        if not isinstance(raw, Mapping):
            return None
        state = RunState.parse(raw.get("state"))
        if state is None:
            return None
        return cls(state=state, message=str(raw.get("message") or ""), error=_text(raw.get("error")),
                   pid=_whole(raw.get("pid")), pid_create_time=_number(raw.get("pid_create_time")),
                   started=_number(raw.get("started")), finished=_number(raw.get("finished")),
                   updated=_number(raw.get("updated")), submitted=_number(raw.get("submitted")),
                   duration_s=_number(raw.get("duration_s")), host=_text(raw.get("host")) or None, raw=dict(raw))

    def as_dict(self) -> dict[str, Any]:
        """The file's fields with this record's state, message and error (for readers that want a dict)."""
        found = dict(self.raw)
        found["state"] = self.state
        found["message"] = self.message
        if self.error is not None:
            found["error"] = self.error
        return found


@dataclass(frozen=True)
class Metrics:
    """``metrics.json``: the run's threshold and its figures on validation and on its own test part.

    The figures are ``core.metrics.binary_metrics`` dicts (a subtype run: ``multiclass_metrics``), empty
    when the run had no such part."""

    task: str = DEFAULT_TASK
    classes: tuple[str, ...] = ()
    #: Chosen on validation; None for a subtype run (it calls the most probable class).
    threshold: float | None = None
    #: ``youden``, ``sensitivity``, ... or ``argmax`` (a subtype run).
    threshold_rule: str | None = None
    val: Mapping[str, Any] = field(default_factory=dict)
    test_at_threshold: Mapping[str, Any] = field(default_factory=dict)
    test_at_05: Mapping[str, Any] = field(default_factory=dict)
    #: Images per part and class: {"train": {"NORMAL": n, ...}, "val": ..., "test": ...}.
    split_counts: Mapping[str, Any] = field(default_factory=dict)
    n_images: int | None = None
    n_patients_test: int | None = None
    duration_s: float | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, raw: Any) -> Metrics | None:
        """The metrics a parsed ``metrics.json`` holds (missing parts empty); None when it is not an object."""
        if not isinstance(raw, Mapping):
            return None
        task = raw.get("task") if raw.get("task") in TASKS else DEFAULT_TASK
        classes = raw.get("classes")
        test = _mapping(raw.get("test"))
        return cls(task=task,
                   classes=tuple(str(c) for c in classes) if isinstance(classes, list) else classes_for(task),
                   threshold=_number(raw.get("threshold")), threshold_rule=_text(raw.get("threshold_rule")),
                   val=_mapping(raw.get("val")), test_at_threshold=_mapping(test.get("at_threshold")),
                   test_at_05=_mapping(test.get("at_0.5")), split_counts=_mapping(raw.get("split_counts")),
                   n_images=_whole(raw.get("n_images")), n_patients_test=_whole(raw.get("n_patients_test")),
                   duration_s=_number(raw.get("duration_s")), raw=dict(raw))

    @property
    def test_auc(self) -> float | None:
        """ROC AUC on the run's own test part (macro AUC for a subtype run)."""
        return _number(self.test_at_threshold.get("roc_auc"))

    @property
    def val_auc(self) -> float | None:
        """ROC AUC of the final model on validation (what the threshold was chosen on)."""
        return _number(self.val.get("roc_auc"))


@dataclass(frozen=True)
class PrevalenceShift:
    """An evaluation's threshold moved to the data set's prevalence, estimated from the probabilities alone
    (``evaluation.external.prevalence_adjustment``), and how the run does at that threshold."""

    validation_prevalence: float
    estimated_prevalence: float
    true_prevalence: float
    threshold: float
    figures: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Any) -> PrevalenceShift | None:
        if not isinstance(raw, Mapping):
            return None
        numbers = [_number(raw.get(key)) for key in
                   ("validation_prevalence", "estimated_prevalence", "true_prevalence", "threshold")]
        if any(value is None for value in numbers):
            return None
        return cls(*numbers, figures=_mapping(raw.get("at_threshold")))


@dataclass(frozen=True)
class Evaluation:
    """One stored external evaluation (``evaluations/<name>.json``, written by ``evaluation.external``).

    Its top-level figures are those at the run's threshold (``figures``); a subtype run's are the
    ``multiclass_metrics`` of the most probable class."""

    name: str
    task: str = DEFAULT_TASK
    #: The data set folder it was evaluated on.
    data: str = ""
    n: int | None = None
    roc_auc: float | None = None
    accuracy: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    threshold: float | None = None
    #: Its images per part of the run's split (by content): {"train": n, "val": n, "test": n}.
    overlap: Mapping[str, Any] = field(default_factory=dict)
    #: One sentence when some of its images were in the run's training part, else None.
    warning: str | None = None
    #: The threshold moved to this data set's estimated prevalence (None: a subtype run, or no record).
    prevalence: PrevalenceShift | None = None
    #: The size of the data set when a sample of it was evaluated, else None.
    sampled_from: int | None = None
    stored: float | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, name: str, raw: Any) -> Evaluation | None:
        if not isinstance(raw, Mapping):
            return None
        return cls(name=name, task=raw.get("task") if raw.get("task") in TASKS else DEFAULT_TASK,
                   data=str(raw.get("data") or ""), n=_whole(raw.get("n")), roc_auc=_number(raw.get("roc_auc")),
                   accuracy=_number(raw.get("accuracy")), sensitivity=_number(raw.get("sensitivity")),
                   specificity=_number(raw.get("specificity")), threshold=_number(raw.get("threshold")),
                   overlap=_mapping(raw.get("overlap")), warning=_text(raw.get("warning")),
                   prevalence=PrevalenceShift.from_dict(raw.get("prevalence")),
                   sampled_from=_whole(raw.get("sampled_from")), stored=_number(raw.get("stored")), raw=dict(raw))

    @property
    def trained_on(self) -> int:
        """How many of its images the run trained on (0: a true external test)."""
        return _whole(self.overlap.get("train")) or 0

    @property
    def is_external(self) -> bool:
        """None of its images were in the run's training part: the honest figure."""
        return not self.trained_on

    @property
    def data_name(self) -> str:
        """The data set folder's name."""
        return Path(self.data).name if self.data else ""

    @property
    def figures(self) -> Mapping[str, Any]:
        """The figures at the run's threshold, as ``binary_metrics`` (or ``multiclass_metrics``) returns them."""
        return self.raw

    @property
    def at_05(self) -> Mapping[str, Any]:
        return _mapping(self.raw.get("at_0.5"))

    @property
    def intervals(self) -> dict[str, tuple[float, float]]:
        """95 % intervals: the stored ones (bootstrap, of roc_auc, accuracy, sensitivity and specificity, those
        that could be computed), else those of sensitivity and specificity from its confusion matrix."""
        stored = stored_intervals(self.raw)
        if stored:
            return stored
        from cxr_core.core.metrics import rate_intervals  # noqa: PLC0415 (it imports scikit-learn: only when asked)

        return rate_intervals(dict(self.raw)) if self.task == DEFAULT_TASK else {}

    @property
    def intervals_by(self) -> str | None:
        """What the stored intervals resampled: "patient" or "image" (None: none stored)."""
        return intervals_by(self.raw)

    @property
    def marker_attention(self) -> float | None:
        """The share of marked images whose Grad-CAM peak lies on the shortcut lab's marker (None: no marker)."""
        value = self.raw.get("marker_attention")
        if isinstance(value, Mapping):  # an early layout nested the figure with its counts
            value = value.get("marker_attention")
        return _number(value)

    @property
    def n_marked(self) -> int | None:
        return _whole(self.raw.get("n_marked"))

    @property
    def is_planted(self) -> bool:
        """Evaluated on a shortcut lab copy (markers planted in its images): a lesson's experiment, never
        the run's honest figure."""
        return self.marker_attention is not None or bool(self.n_marked)


@dataclass(frozen=True, eq=False)
class TestSet:
    """One test set of a run as the Evaluation page shows it: an external evaluation with its stored
    predictions, or the test part of the run's own split."""

    __test__ = False  # not a pytest test class, despite its name

    #: The data set's name, or "internal" for the run's own test part.
    name: str
    external: bool
    #: Its images with a label and a probability: path, y, probability (+ p_<class> for a subtype run).
    predictions: pd.DataFrame
    #: The run's threshold (0.5 for a subtype run, which has none and calls the most probable class).
    threshold: float
    #: The figures at the threshold and at 0.5 (empty when not stored).
    figures: Mapping[str, Any]
    at_05: Mapping[str, Any]
    #: The rule the threshold was chosen by (None for an external test set).
    rule: str | None = None
    prevalence: PrevalenceShift | None = None
    sampled_from: int | None = None
    #: Patients in the run's own test part, when recorded.
    n_patients: int | None = None

    @property
    def intervals(self) -> dict[str, tuple[float, float]]:
        """The bootstrap intervals stored with an external evaluation (empty when none are stored)."""
        return stored_intervals(self.figures)

    @property
    def intervals_by(self) -> str | None:
        """"patient" or "image": what the stored intervals resampled (None: none stored)."""
        return intervals_by(self.figures)

    @property
    def n(self) -> int:
        """Its images: as stored with the figures, else the rows of its predictions."""
        return _whole(self.figures.get("n")) or len(self.predictions)
