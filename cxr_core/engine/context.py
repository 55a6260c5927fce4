"""What every training stage reads and what the stages hand on to each other: ``TrainingContext``,
with its progress ``Reporter`` and the ``Cancelled`` signal a person's stop raises."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cxr_core.core.config import RunConfig
from cxr_core.core.tasks import Task, get_task
from cxr_core.data.plan import RunPlan
from cxr_core.data.shortcuts import balancing_weights
from cxr_core.engine import distribute
from cxr_core.runs.run_folder import RunFolder


class Cancelled(Exception):
    """A person asked the run to stop; raised out of the training stages."""


EpochCallback = Callable[[int, dict], None]
StopCheck = Callable[[], bool]
ProgressCallback = Callable[[dict], None]


class Reporter:
    """Writes progress events to the run folder and forwards them to a callback."""

    def __init__(self, folder: RunFolder, on_progress: ProgressCallback | None) -> None:
        self.folder = folder
        self.on_progress = on_progress

    def __call__(self, event: str, **fields: Any) -> None:
        record = {"time": time.time(), "event": event, **fields}
        self.folder.append_progress(record)
        if self.on_progress is not None:
            self.on_progress(record)


@dataclass
class TrainingContext:
    """What every stage reads, and what the stages hand on to each other."""

    config: RunConfig
    folder: RunFolder
    report: Reporter
    should_stop: StopCheck | None = None
    on_epoch_end: EpochCallback | None = None
    # Filled in by the stages, in order.
    scan: Any = None
    plan: RunPlan | None = None
    rows: pd.DataFrame | None = None            # readable rows (augmented ones included)
    problems: list[pd.DataFrame] = field(default_factory=list)
    features: np.ndarray | None = None          # one row per entry of ``rows`` (head phase only)
    backbone: Any = None
    head: Any = None
    classifier: Any = None
    history: list[dict] = field(default_factory=list)
    evaluated: pd.DataFrame | None = None       # validation and test rows with their probability
    metrics: dict | None = None
    started: float = field(default_factory=time.time)
    runtime: distribute.Runtime | None = None    # the strategy this process trains under

    @property
    def status_fields(self) -> dict:
        """Where the run trains, kept in every status.json written (``Runtime.fields``)."""
        return self.runtime.fields() if self.runtime is not None else {}

    def stop_requested(self) -> bool:
        return self.folder.cancel_requested() or bool(self.should_stop and self.should_stop())

    def check_stop(self) -> None:
        if self.stop_requested():
            raise Cancelled

    @property
    def class_weight(self) -> dict[int, float] | None:
        weights = self.plan.balance.class_weight if self.plan is not None else None
        return dict(weights) if weights else None

    def sample_weights(self, rows: pd.DataFrame) -> np.ndarray | None:
        """Per-image training weights when a property must tell the model nothing (``balance_by``):
        within each of its values the classes weigh as in the whole part, times the class weights.
        None when the plain class weights (or none) apply."""
        column = self.plan.balance_by if self.plan is not None else self.config.train.balance_by
        if not column:
            return None
        weights = balancing_weights(rows["y"].to_numpy(), rows[column].to_numpy())
        if self.class_weight:
            weights = weights * rows["y"].map(self.class_weight).to_numpy(dtype=np.float64)
        return (weights / weights.mean()).astype(np.float32)

    @property
    def task(self) -> Task:
        return get_task(self.config.data.task)

    @property
    def classes(self) -> tuple[str, ...]:
        """The task's classes, in the order of the head's outputs."""
        return self.task.classes

    @property
    def n_outputs(self) -> int:
        return self.task.n_outputs

    @property
    def fine_tunes(self) -> bool:
        return self.config.train.fine_tune_epochs > 0 and self.config.train.fine_tune_layers != 0

    @property
    def from_scratch(self) -> bool:
        """A randomly initialised backbone trained whole: its BatchNorm layers must learn too."""
        return self.config.model.weights == "none" and self.config.train.fine_tune_layers == -1

    @property
    def trains_batchnorm(self) -> bool:
        """Whether the unfrozen BatchNorm layers learn their statistics while fine-tuning (from
        scratch they must; on pretrained weights only when asked, to follow the X-rays' statistics)."""
        return self.fine_tunes and (self.from_scratch or self.config.train.fine_tune_batchnorm)


