"""What a predictor asks of the engine that runs its network: the ``Engine`` protocol.

Two engines implement it with the same numbers: ``inference.lite_runner.LiteEngine`` (``model.tflite``
through the LiteRT runtime, no TensorFlow) and ``engine.keras_runner.KerasEngine`` (``model.keras``
through TensorFlow). An engine knows nothing of the task: it runs the head it was given and says how
many logits that head has; the ``Predictor`` turns logits into probabilities and labels by asking the
run's ``Task``.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class Engine(Protocol):
    """Runs a classifier on batches of model-ready images: float32 (n, size, size, 3) in 0..255.

    Attributes:
        name: ``"LiteRT"`` or ``"Keras"``, for people.
        image_size: side of the square input, in pixels.
        n_outputs: the head's number of logits (1: a sigmoid head; c: a softmax head over c classes).
        map_grid: (rows, columns) of the raw class-activation maps ``explain`` returns.
    """

    name: str
    image_size: int
    n_outputs: int

    @property
    def map_grid(self) -> tuple[int, int]: ...

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits, float (n, n_outputs)."""
        ...

    def explain(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (n, n_outputs) and raw maps (n, rows, columns, channels) from one forward pass, one
        channel per class of ``Task.map_classes`` (a sigmoid head: where the image raised its logit,
        then where it lowered it)."""
        ...
