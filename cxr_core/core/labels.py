"""The task's classes and the rules that turn a model output into a label, defined once.

``NORMAL`` is 0 and ``PNEUMONIA`` is 1, the positive class. The model outputs a logit; the
probability of PNEUMONIA is its sigmoid, and an image is called PNEUMONIA when that probability
reaches the run's threshold (chosen on validation by one of ``THRESHOLD_RULES``).
"""
from __future__ import annotations

from typing import Iterable

from cxr_core.core.errors import BadDatasetError
from cxr_core.core.tasks import TASKS as _TASKS, sigmoid, softmax  # noqa: F401 - re-exported: they live with the tasks

CLASSES = ("NORMAL", "PNEUMONIA")
NEGATIVE, POSITIVE = CLASSES
LABEL_TO_Y = {label: index for index, label in enumerate(CLASSES)}
#: What a run learns to tell apart: ``pneumonia`` (NORMAL / PNEUMONIA) or ``subtype`` (NORMAL /
#: BACTERIA / VIRUS, the order of the softmax head's outputs).
TASKS = tuple(_TASKS)
TASK_CLASSES = {name: task.classes for name, task in _TASKS.items()}


def classes_for(task: str) -> tuple[str, ...]:
    """The classes of ``task``, in the order of the model's outputs."""
    if task not in TASK_CLASSES:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}.")
    return TASK_CLASSES[task]


#: The parts of a split, in the order they are shown.
SPLITS = ("train", "val", "test")
#: How a run chooses its decision threshold on validation (see ``evaluate.choose_threshold``):
#: ``youden`` maximises sensitivity + specificity; ``sensitivity`` keeps a target sensitivity;
#: ``midpoint`` lies halfway between the classes' median logits.
THRESHOLD_RULES = ("youden", "sensitivity", "midpoint")
DEFAULT_THRESHOLD = 0.5


def label_for(probability: float, threshold: float) -> str:
    """``PNEUMONIA`` when ``probability >= threshold``, else ``NORMAL``."""
    return POSITIVE if float(probability) >= float(threshold) else NEGATIVE


def require_both_classes(labels: Iterable, where: str, advice: str, classes: tuple[str, ...] = CLASSES) -> None:
    """Raise one sentence when ``labels`` (names or class indices) lack a class.

    Args:
        labels: the labels of one part of the data.
        where: what holds them, for the sentence ("the val part of the patient split").
        advice: what to do, for the sentence.
        classes: the task's classes (``classes_for(task)``); every one must be present.

    Raises:
        BadDatasetError: "<where> has no NORMAL images (n images in it); <advice>."
    """
    values = list(labels)
    names = {classes[int(v)] if not isinstance(v, str) else v for v in values}
    missing = [name for name in classes if name not in names]
    if missing:
        raise BadDatasetError(
            f"{where[:1].upper()}{where[1:]} has no {' and '.join(missing)} images ({len(values)} images in it); "
            f"{advice}.")
