"""The Keras engine: a classifier run with TensorFlow, logits and Grad-CAM maps for batches of images.

It implements ``cxr_core.inference.engines.Engine`` (the LiteRT engine, ``inference.lite_runner``, gives
the same numbers from ``model.tflite``). Two compiled functions with a fixed input signature, so one
trace serves every batch size: the logits, and the logits with the raw maps in a single forward pass.

Every head here is GlobalAveragePooling -> Dropout -> Dense, so a class's logit is
``sum_k w_k mean(A_k) + b`` over the last conv maps ``A_k``. A sigmoid head (one logit) gets Grad-CAM of
its logit and of the negated logit (what raised the pneumonia score, what lowered it), in
``Task.map_classes`` order; a softmax head gets ReLU(sum_k w_kc A_k) for each class c, which is
Grad-CAM of that class's logit up to a positive factor (no gradient needed). An ensemble's maps are
the members' Grad-CAM maps of the ensemble's logit, summed on the largest grid.
"""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cxr_core.core.backbones import BACKBONES
from cxr_core.core.errors import BadRunError
from cxr_core.core.tasks import task_of_outputs
from cxr_core.engine.model import EnsembleGradcamParts, GradcamParts, gradcam_parts, load_classifier
from cxr_core.runs.run_folder import MODEL_FILE


class KerasEngine:
    """Runs a Keras classifier (image 0..255 -> logits) with TensorFlow.

    Attributes:
        classifier: the Keras model.
        image_size: side of the square input, in pixels.
        n_outputs: the head's number of logits.
    """

    name = "Keras"

    def __init__(self, classifier: keras.Model, backbone: str | None = None, where: str = "this model") -> None:
        """Check that ``classifier`` takes square three-channel images; ``backbone`` (a ``BACKBONES`` key)
        names the Grad-CAM layer, else it is found inside the model; ``where`` names it in messages."""
        self.classifier = classifier
        self._backbone = backbone
        self._where = where
        shape = classifier.input_shape
        if isinstance(shape, list):  # a model with several inputs is not one of ours
            raise BadRunError(f"The model in {where} takes several inputs; it is not an image classifier.")
        if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 3:
            raise BadRunError(
                f"The model in {where} expects input of shape {shape}, not a square three-channel image."
            )
        self.image_size = int(shape[1])
        out = classifier.output_shape
        # (n, c) logits; anything else is read as the one-logit head it always was.
        self.n_outputs = int(out[-1]) if isinstance(out, tuple) and len(out) == 2 and out[-1] else 1
        signature = [tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.float32)]
        # training=False keeps Dropout and BatchNorm in inference mode.
        self._predict_fn = tf.function(lambda x: classifier(x, training=False), input_signature=signature)
        self._parts: GradcamParts | EnsembleGradcamParts | None = None
        self._explain_fn = None

    @classmethod
    def load(cls, path: str | Path, backbone: str | None, where: str) -> "KerasEngine":
        """The engine of a saved ``model.keras`` (safe mode); one sentence when it cannot be loaded."""
        try:
            classifier = load_classifier(path)
        except BadRunError as error:
            raise BadRunError(
                f"The {MODEL_FILE} in {where} cannot be loaded as a Keras model; the file is damaged or not a model."
            ) from error
        return cls(classifier, backbone, where)

    @property
    def map_grid(self) -> tuple[int, int]:
        """(rows, columns) of the raw maps ``explain`` returns."""
        return self._gradcam_parts().map_grid

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 (n, size, size, 3) in 0..255 -> logits (n, n_outputs)."""
        batch = np.asarray(batch, np.float32)
        return self._predict_fn(batch).numpy().reshape(len(batch), -1)

    def explain(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (n, size, size, 3) -> (logits (n, n_outputs), raw maps (n, h', w', channels))."""
        if self._explain_fn is None:
            self._explain_fn = _explain_fn(self._gradcam_parts(), self.image_size)
        batch = np.asarray(batch, np.float32)
        logits, cams = self._explain_fn(batch)
        return logits.numpy().reshape(len(batch), -1), cams.numpy()

    def _gradcam_parts(self) -> GradcamParts | EnsembleGradcamParts:
        if self._parts is None:
            spec = BACKBONES.get(self._backbone) if self._backbone else None
            try:
                self._parts = gradcam_parts(self.classifier, spec.last_conv_layer if spec is not None else None)
            except (ValueError, KeyError, AttributeError) as error:
                raise BadRunError(f"The model in {self._where} lacks the layers Grad-CAM needs ({error}).") from error
        return self._parts


def _explain_fn(parts: GradcamParts | EnsembleGradcamParts, size: int):
    """The compiled function: images (n, size, size, 3) -> (logits, raw maps), for this head's kind."""
    signature = [tf.TensorSpec([None, size, size, 3], tf.float32)]
    if isinstance(parts, EnsembleGradcamParts):
        return _ensemble_gradcam(parts, signature)
    kernel = np.asarray(parts.logit.get_weights()[0], np.float32)
    head = task_of_outputs(kernel.shape[-1]).head
    return {"sigmoid": _gradcam, "softmax": _class_maps}[head](parts, kernel, signature)


def _gradcam(parts: GradcamParts, _kernel: np.ndarray, signature: list):
    """Grad-CAM of the one logit and of its negation (the evidence for NORMAL), by the gradient."""

    @tf.function(input_signature=signature)
    def explain(images):
        with tf.GradientTape() as tape:
            conv, logits = parts.forward(images)
            logits = tf.reshape(logits, [-1])
            # Each image's logit depends only on its own maps, so the gradient of the sum is the
            # per-image gradient. The sum must be taken under the tape, or the gradient is None.
            total = tf.reduce_sum(logits)
        grads = tape.gradient(total, conv)
        weights = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)
        signed = tf.reduce_sum(conv * weights, axis=-1)
        return logits, tf.stack([tf.nn.relu(signed), tf.nn.relu(-signed)], axis=-1)

    return explain


def _class_maps(parts: GradcamParts, kernel: np.ndarray, signature: list):
    """ReLU(sum_k w_kc A_k) for each class c: each logit is sum_k w_kc mean(A_k) + b_c, so its Grad-CAM
    weights are w_kc / (h' w'), the same map up to a positive factor (as the LiteRT export computes it)."""
    kernel = tf.constant(kernel)

    @tf.function(input_signature=signature)
    def explain(images):
        conv, logits = parts.forward(images)
        return logits, tf.nn.relu(tf.tensordot(conv, kernel, axes=[[3], [0]]))

    return explain


def _ensemble_gradcam(parts: EnsembleGradcamParts, signature: list):
    """Grad-CAM of the ensemble's logit at every member's last conv layer.

    Each member's weights are the spatial mean of the gradient times its grid's cell count (per unit of
    image area, so grids of different sizes weigh alike), its map is ReLU'd, and the maps are summed on
    the largest grid. The NORMAL channel does the same with each member's negated map.
    """

    @tf.function(input_signature=signature)
    def explain(images):
        with tf.GradientTape() as tape:
            convs, _, logits = parts.forward(images)
            logits = tf.reshape(logits, [-1])
            total = tf.reduce_sum(logits)  # per-image gradients, as in the single-model function
        grads = tape.gradient(total, convs)
        raised, lowered = [], []
        for conv, grad in zip(convs, grads):
            cells = float(conv.shape[1] * conv.shape[2])
            weights = tf.reduce_mean(grad, axis=[1, 2], keepdims=True) * cells
            signed = tf.reduce_sum(conv * weights, axis=-1)
            raised.append(tf.nn.relu(signed))
            lowered.append(tf.nn.relu(-signed))
        return logits, tf.stack([parts.combine_maps(raised), parts.combine_maps(lowered)], axis=-1)

    return explain
