"""What a run learns to tell apart, as one object per task.

A ``Task`` owns its classes, the kind of head that learns them, how that head's logits become
probabilities, how a label is chosen (a threshold on P(disease) or the most probable class), and
what its reports and pages show. Code asks the task instead of branching on its name, so a third
task is one more ``Task`` in ``TASKS`` (a softmax head over its classes needs nothing new in the
engine; see ``cxr_core.engine.losses``).

Two head kinds exist: ``sigmoid`` (one logit, the probability of the positive class: a threshold
chooses the label) and ``softmax`` (one logit per class: the most probable class is the label).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from cxr_core.core.errors import BadRunError, BadSettingError

HEADS = ("sigmoid", "softmax")
#: Each class in a sentence ("regions that raised the viral pneumonia score").
CLASS_WORDS = {"NORMAL": "normal", "PNEUMONIA": "pneumonia", "BACTERIA": "bacterial pneumonia",
               "VIRUS": "viral pneumonia"}


def sigmoid(logits: Iterable[float] | np.ndarray) -> np.ndarray:
    """Probabilities from logits: float64, the two-sided form, exact for large |logit| without
    overflow warnings."""
    z = np.asarray(logits, dtype=np.float64)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def softmax(logits: Iterable | np.ndarray) -> np.ndarray:
    """Probabilities from a softmax head's logits, shape (n, classes): float64, rows sum to 1."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Task:
    """One task.

    Attributes:
        name: the key (``--task NAME``; ``DataConfig.task``; ``metrics.json``'s ``task``).
        label: the task for people, in the form's choice (and so in a link to the Training page: keep it).
        classes: the classes, in the order of the model's outputs; ``classes[0]`` is the healthy class.
        head: ``sigmoid`` (two classes, one logit) or ``softmax`` (one logit per class).
        needs: the manifest column a data set must have for this task ("" when the label is enough).
        help: one sentence on what the task learns, for the form.
    """

    name: str
    label: str
    classes: tuple[str, ...]
    head: str
    needs: str = ""
    help: str = ""

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}; got {self.head!r}.")
        if self.head == "sigmoid" and len(self.classes) != 2:
            raise ValueError("a sigmoid head tells exactly two classes apart.")

    @property
    def n_outputs(self) -> int:
        """The head's number of logits."""
        return 1 if self.head == "sigmoid" else len(self.classes)

    @property
    def uses_threshold(self) -> bool:
        """Whether a threshold on P(disease), chosen on validation, decides the label."""
        return self.head == "sigmoid"

    @property
    def is_binary(self) -> bool:
        return len(self.classes) == 2

    @property
    def map_classes(self) -> tuple[str, ...]:
        """The class each channel of a class-activation map explains, in the engines' channel order.

        A sigmoid head has one score, the positive class's: its maps are where the image raised that
        score and where it lowered it (the evidence for the healthy class). A softmax head has one map per class.
        """
        return (self.classes[1], self.classes[0]) if self.head == "sigmoid" else self.classes

    def require_outputs(self, n_outputs: int, where: str) -> None:
        """One sentence when a model of ``n_outputs`` logits cannot be this task's head (``where`` names the model)."""
        if int(n_outputs) != self.n_outputs:
            raise BadRunError(
                f"{where[:1].upper()}{where[1:]} has {n_outputs} output{'s' if n_outputs != 1 else ''} but its "
                f"{self.name} task needs {self.n_outputs} ({', '.join(self.classes)}); config.json and the model "
                "do not belong together.")

    def probabilities(self, logits: Iterable | np.ndarray) -> np.ndarray:
        """Class probabilities from the head's logits, shape (n, len(classes)), float64."""
        z = np.asarray(logits, dtype=np.float64)
        if self.head == "sigmoid":
            p = sigmoid(z.reshape(-1))
            return np.stack([1.0 - p, p], axis=1)
        return softmax(z.reshape(-1, self.n_outputs))

    def disease_probability(self, probabilities: np.ndarray) -> np.ndarray:
        """P(not healthy) per row: the probability that thresholds, curves and AUCs use (of two classes,
        exactly the second class's probability)."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        return probabilities[:, 1] if self.is_binary else 1.0 - probabilities[:, 0]

    def labels(self, probabilities: np.ndarray, threshold: float | None) -> list[str]:
        """The label of each row: a threshold on P(disease) for a sigmoid head, else the most probable class."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if self.uses_threshold:
            if threshold is None:
                raise ValueError("a thresholded task needs a threshold.")
            return [self.classes[int(p >= threshold)] for p in self.disease_probability(probabilities)]
        return [self.classes[int(i)] for i in probabilities.argmax(axis=1)]


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("pneumonia", "Normal / pneumonia", ("NORMAL", "PNEUMONIA"), "sigmoid",
             help="Two classes: NORMAL or PNEUMONIA, decided by a threshold chosen on validation."),
        Task("subtype", "Normal / bacterial / viral", ("NORMAL", "BACTERIA", "VIRUS"), "softmax", needs="subtype",
             help="Three classes: NORMAL, BACTERIA or VIRUS, the most probable one; the subtype comes from "
                  "Kermany-style file names (person1_bacteria_1.jpeg)."),
    )
}


def get_task(name: str) -> Task:
    """The task named ``name``; one sentence naming the tasks when there is none."""
    if name not in TASKS:
        raise BadSettingError(f"task must be one of {', '.join(TASKS)}; got {name!r}.")
    return TASKS[name]


def task_of_outputs(n_outputs: int) -> Task:
    """The task whose head has ``n_outputs`` logits (for a model read without its config)."""
    for task in TASKS.values():
        if task.n_outputs == n_outputs:
            return task
    raise BadSettingError(f"no task has a head of {n_outputs} outputs.")
