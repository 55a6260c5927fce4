"""Export a trained classifier to LiteRT: ``model.tflite`` and ``model.tflite.json`` in its run folder.

The format of the export (its two outputs, the record beside it, ``FORMAT_VERSION``) is described in
``cxr_core.engine.litert``, which a predictor reads without TensorFlow; this module needs TensorFlow
and runs in the training process, after an ensemble is made, or from ``python -m cxr_core export``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cxr_core.core.backbones import BACKBONES
from cxr_core.core.errors import BadRunError, CxrError
from cxr_core.core.tasks import task_of_outputs
from cxr_core.engine.litert import FORMAT_VERSION
from cxr_core.engine.model import EnsembleGradcamParts, GradcamParts, gradcam_parts, load_classifier
from cxr_core.io.hashing import file_sha256
from cxr_core.runs.run_folder import MODEL_FILE, RunFolder

log = logging.getLogger(__name__)

#: What the export's two outputs hold, by the head's kind (written to model.tflite.json).
OUTPUTS = {
    "sigmoid": {"logit": "the classifier's logit",
                "cams": "[ReLU(S), ReLU(-S)] (PNEUMONIA, NORMAL) with S = sum_k w_k A_k at the last conv layer"},
    "softmax": {"logit": "the classifier's logits (softmax), one per class in the run's class order",
                "cams": "ReLU(S_c) for each class c, in the same order, with S_c = sum_k w_kc A_k at the last "
                        "conv layer"},
    "ensemble": {"logit": "the classifier's logit",
                 "cams": "[sum_i g_i ReLU(S_i), sum_i g_i ReLU(-S_i)] (PNEUMONIA, NORMAL) with S_i = sum_k w_ik "
                         "A_ik, g_i = d logit / d member logit, on the largest member grid"},
}


def export_classifier(classifier: keras.Model, run_dir: str | Path, backbone: str | None = None) -> Path:
    """Write ``model.tflite`` and ``model.tflite.json`` for a classifier already saved as ``model.keras``.

    Args:
        classifier: the classifier (image 0..255 -> logit) that ``run_dir/model.keras`` holds.
        run_dir: the run folder; ``model.keras`` must be there (its hash is recorded).
        backbone: the backbone's name in ``model.BACKBONES`` (its table row names the CAM layer);
            by default the layer is found by name inside the classifier.

    Returns:
        the path of ``model.tflite``.

    Raises:
        CxrError: when the conversion fails (one sentence); nothing half-written is left behind.
    """
    folder = RunFolder(run_dir)
    run_dir = folder.path
    source = folder.model_path
    if not source.is_file():
        raise BadRunError(f"The run folder {run_dir} has no {MODEL_FILE} to export.")
    t0 = time.time()
    spec = BACKBONES.get(backbone) if backbone else None
    parts = gradcam_parts(classifier, spec.last_conv_layer if spec is not None else None)
    size = int(classifier.input_shape[1])
    signature = [tf.TensorSpec([None, size, size, 3], tf.float32, name="images")]
    if isinstance(parts, EnsembleGradcamParts):
        kind, serve = "ensemble", _ensemble_serve(parts, signature)
    else:
        kernel = np.asarray(parts.logit.get_weights()[0], np.float32)
        kind = task_of_outputs(kernel.shape[-1]).head
        serve = {"sigmoid": _sigmoid_serve, "softmax": _softmax_serve}[kind](parts, kernel, signature)
    try:
        converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], classifier)
        # Convert the traced graph directly: lowering to a SavedModel first takes about 9 s more.
        converter.experimental_lower_to_saved_model = False
        flatbuffer = converter.convert()
    except Exception as error:  # the converter raises many kinds; all mean "this model did not convert"
        log.debug("LiteRT conversion failed", exc_info=True)
        raise CxrError(f"The model in {run_dir} could not be converted to LiteRT ({type(error).__name__}).") from error

    info = {
        "format": FORMAT_VERSION,
        "source": MODEL_FILE,
        "source_sha256": file_sha256(source),
        "image_size": size,
        "last_conv_layer": parts.last_conv_layer,
        "outputs": OUTPUTS[kind],
        "tensorflow": tf.__version__,
        "seconds": round(time.time() - t0, 2),
    }
    target = folder.lite_path
    folder.write_export(flatbuffer, info)
    log.info("Exported %s (%.1f MB) in %.1f s.", target, len(flatbuffer) / 1e6, info["seconds"])
    return target


def _sigmoid_serve(parts: GradcamParts, kernel: np.ndarray, signature: list):
    """One logit, and where the image raised it and lowered it: ReLU(S), ReLU(-S), S = sum_k w_k A_k."""
    weights = tf.constant(kernel[:, 0], tf.float32)

    @tf.function(input_signature=signature)
    def serve(images):
        conv, logits = parts.forward(images)
        signed = tf.tensordot(conv, weights, axes=[[3], [0]])
        cams = tf.stack([tf.nn.relu(signed), tf.nn.relu(-signed)], axis=-1)
        return {"logit": tf.reshape(logits, [-1]), "cams": cams}

    return serve


def _softmax_serve(parts: GradcamParts, kernel: np.ndarray, signature: list):
    """One logit per class and one map per class, in the order of the logits: ReLU(S_c), S_c = sum_k w_kc A_k."""
    weights = tf.constant(kernel, tf.float32)

    @tf.function(input_signature=signature)
    def serve(images):
        conv, logits = parts.forward(images)
        return {"logit": logits, "cams": tf.nn.relu(tf.tensordot(conv, weights, axes=[[3], [0]]))}

    return serve


def _ensemble_serve(parts: EnsembleGradcamParts, signature: list):
    """The exported function of an ensemble: its logit and the members' CAMs of both classes, each
    weighted by ``d logit / d member logit`` and summed on the largest grid (``model.EnsembleGradcamParts``)."""
    kernels = [tf.constant(np.asarray(part.logit.get_weights()[0])[:, 0], tf.float32) for part in parts.members]

    @tf.function(input_signature=signature)
    def serve(images):
        convs, member_logits, logits = parts.forward(images)
        weights = parts.combine.gradient_weights(member_logits)  # (n, members)
        raised, lowered = [], []
        for i, (conv, kernel) in enumerate(zip(convs, kernels)):
            signed = tf.tensordot(conv, kernel, axes=[[3], [0]])
            raised.append(tf.nn.relu(signed) * weights[:, i, None, None])
            lowered.append(tf.nn.relu(-signed) * weights[:, i, None, None])
        cams = tf.stack([parts.combine_maps(raised), parts.combine_maps(lowered)], axis=-1)
        return {"logit": tf.reshape(logits, [-1]), "cams": cams}

    return serve


def export_run(run_dir: str | Path) -> Path:
    """Load ``run_dir/model.keras`` and export it (for runs trained before exports existed)."""
    folder = RunFolder(run_dir)
    config = folder.read_config()
    return export_classifier(load_classifier(folder.model_path), folder.path, config.model.backbone)
