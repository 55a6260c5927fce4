"""A trained classifier exported to LiteRT (``model.tflite``), and run without TensorFlow.

Why: importing TensorFlow costs about 650 MB of memory, more than the smallest Streamlit Community
Cloud container allows for the whole app. The LiteRT runtime (``ai-edge-litert``) runs the same
network in about 50 MB, so the app's Predict and Evaluation pages never import TensorFlow when a
run folder holds ``model.tflite``.

The exported graph has two outputs computed in one forward pass:

* ``logit``: the classifier's logit, as ``model.keras`` computes it;
* ``cams``: (n, h', w', 2), ReLU(S) and ReLU(-S) with S = sum_k w_k A_k, where A_k are the last
  convolutional maps and w_k the final Dense kernel: where the image raised the pneumonia logit and
  where it lowered it (the evidence for NORMAL), in ``predict.MAP_CHANNELS`` order. Every classifier
  here is backbone -> GlobalAveragePooling -> Dropout -> Dense(1), so the Grad-CAM weights (the
  spatial mean of d logit / d A_k) are exactly w_k / (h' w'): Grad-CAM of the logit (and of its
  negation) equals these maps up to a positive factor, which the [0, 1] normalisation removes.
  No gradient is needed at prediction time. For an ensemble (``model.build_ensemble``) each channel
  is the members' maps, each weighted by d logit / d member logit and summed on the largest member grid.

A softmax head (the ``subtype`` task: Dense(3) over NORMAL, BACTERIA, VIRUS) exports ``logit`` as
(n, 3), the three logits, and ``cams`` as (n, h', w', 3), ReLU(S_c) with S_c = sum_k w_kc A_k for
each class c in the same order: where the image raised that class's logit.

Format 1 exports had one ReLU(S) output and no map for NORMAL results; they are not used (the
predictor falls back to Keras) and ``python -m cxr_core export --run RUN`` rewrites them.

``model.tflite.json`` beside it records the SHA-256 of the ``model.keras`` it was made from; a
predictor uses the LiteRT file only when that still matches, so a replaced ``model.keras`` is never
explained by a stale export.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxr_core.core.errors import BadRunError, CxrError
from cxr_core.io.hashing import file_sha256
from cxr_core.runs.run_folder import LITE_FILE, LITE_INFO_FILE, MODEL_FILE, RunFolder

if TYPE_CHECKING:  # pragma: no cover
    import keras


log = logging.getLogger(__name__)

#: 2: the ``cams`` output holds both classes' maps (format 1 had the PNEUMONIA map only).
FORMAT_VERSION = 2


def runtime_available() -> bool:
    """True when the LiteRT runtime (the ``ai-edge-litert`` package) can be imported."""
    try:
        return importlib.util.find_spec("ai_edge_litert") is not None
    except (ImportError, ValueError):
        return False


# -- export (needs TensorFlow; runs in the training process or the CLI) -----------------------------

def export_classifier(classifier: "keras.Model", run_dir: str | Path, backbone: str | None = None) -> Path:
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
    import tensorflow as tf  # noqa: PLC0415

    from cxr_core.core.backbones import BACKBONES  # noqa: PLC0415
    from cxr_core.engine.model import EnsembleGradcamParts, gradcam_parts  # noqa: PLC0415

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
    n_outputs = 1
    if isinstance(parts, EnsembleGradcamParts):
        serve = _ensemble_serve(parts, signature)
    elif np.asarray(parts.logit.get_weights()[0]).shape[-1] > 1:
        kernel = tf.constant(np.asarray(parts.logit.get_weights()[0]), tf.float32)
        n_outputs = int(kernel.shape[-1])

        @tf.function(input_signature=signature)
        def serve(images):
            conv, logits = parts.forward(images)
            # One map per class, in the order of the logits: ReLU(S_c), S_c = sum_k w_kc A_k.
            return {"logit": logits, "cams": tf.nn.relu(tf.tensordot(conv, kernel, axes=[[3], [0]]))}
    else:
        kernel = tf.constant(np.asarray(parts.logit.get_weights()[0])[:, 0], tf.float32)

        @tf.function(input_signature=signature)
        def serve(images):
            conv, logits = parts.forward(images)
            signed = tf.tensordot(conv, kernel, axes=[[3], [0]])
            cams = tf.stack([tf.nn.relu(signed), tf.nn.relu(-signed)], axis=-1)
            return {"logit": tf.reshape(logits, [-1]), "cams": cams}

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
        "outputs": {"logit": "the classifier's logit",
                    "cams": "[ReLU(S), ReLU(-S)] (PNEUMONIA, NORMAL) with S = sum_k w_k A_k at the last conv layer"
                    if not isinstance(parts, EnsembleGradcamParts) else
                    "[sum_i g_i ReLU(S_i), sum_i g_i ReLU(-S_i)] (PNEUMONIA, NORMAL) with S_i = sum_k w_ik A_ik, "
                    "g_i = d logit / d member logit, on the largest member grid"},
        "tensorflow": tf.__version__,
        "seconds": round(time.time() - t0, 2),
    }
    if n_outputs > 1:
        info["outputs"] = {"logit": f"the classifier's {n_outputs} logits (softmax), in the run's class order",
                           "cams": "ReLU(S_c) for each class c, in the same order, with S_c = sum_k w_kc A_k "
                                   "at the last conv layer"}
    target = folder.lite_path
    folder.write_export(flatbuffer, info)
    log.info("Exported %s (%.1f MB) in %.1f s.", target, len(flatbuffer) / 1e6, info["seconds"])
    return target


def _ensemble_serve(parts, signature):
    """The exported function of an ensemble: its logit and the members' CAMs of both classes, each
    weighted by ``d logit / d member logit`` and summed on the largest grid (``model.EnsembleGradcamParts``)."""
    import tensorflow as tf  # noqa: PLC0415

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
    from cxr_core.engine.model import load_classifier  # noqa: PLC0415

    folder = RunFolder(run_dir)
    config = folder.read_config()
    return export_classifier(load_classifier(folder.model_path), folder.path, config.model.backbone)


def lite_status(run_dir: str | Path) -> str | None:
    """Why ``run_dir``'s LiteRT file cannot be used, or None when it can."""
    folder = RunFolder(run_dir)
    if not folder.lite_path.is_file():
        return f"there is no {LITE_FILE}"
    if not runtime_available():
        return "the LiteRT runtime (ai-edge-litert) is not installed"
    try:
        info = folder.read_export_info()
    except (OSError, ValueError):
        info = None
    if info is None:
        return f"{LITE_INFO_FILE} is missing or unreadable"
    if isinstance(info, dict) and info.get("format") == 1:
        return (f"{LITE_FILE} was exported by an earlier version without the map for NORMAL results; "
                f"`python -m cxr_core export --run {folder.path}` rewrites it")
    if not isinstance(info, dict) or info.get("format") != FORMAT_VERSION:
        return f"{LITE_INFO_FILE} is of an unknown format"
    try:
        if info.get("source_sha256") != file_sha256(folder.model_path):
            return f"{LITE_FILE} was made from a different {MODEL_FILE}"
    except OSError:
        return f"there is no {MODEL_FILE}"
    return None


# -- running (no TensorFlow) -------------------------------------------------------------------

class LiteEngine:
    """Runs ``model.tflite``: logits, or logits and both classes' CAMs, for batches of model-ready images.

    The interpreter is not thread-safe and a Streamlit server shares one predictor between
    sessions, so calls are serialised by a lock (one image takes milliseconds).
    """

    name = "LiteRT"

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415
        except ImportError as error:  # installed, but its native library does not load on this machine
            log.warning("The LiteRT runtime cannot be loaded: %s", error)
            raise BadRunError("The LiteRT runtime (ai-edge-litert) is installed but cannot be loaded here.") from error

        self.path = Path(path)
        threads = num_threads or max(1, min(4, os.cpu_count() or 1))
        try:
            self._interpreter = Interpreter(model_path=str(self.path), num_threads=threads)
            inputs = self._interpreter.get_input_details()
            outputs = self._interpreter.get_output_details()
        except Exception as error:  # a damaged flatbuffer raises ValueError or RuntimeError
            raise BadRunError(
                f"{self.path.name} in {self.path.parent} is not a LiteRT model this version can run."
            ) from error
        # The graph is converted without a signature, so the outputs are told apart by rank: the
        # logit is (n,) and the CAMs (n, h', w', 2); a softmax head's logits are (n, c), its CAMs (n, h', w', c).
        by_rank = {len(detail["shape_signature"]): detail for detail in outputs}
        shape = list(inputs[0]["shape_signature"]) if len(inputs) == 1 else []
        n_outputs = int(by_rank[2]["shape_signature"][-1]) if set(by_rank) == {2, 4} else 1
        channels = int(by_rank[4]["shape_signature"][-1]) if 4 in by_rank else 0
        if (len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3 or shape[1] < 1
                or set(by_rank) not in ({1, 4}, {2, 4}) or channels != (2 if n_outputs == 1 else n_outputs)
                or n_outputs < 1):
            raise BadRunError(
                f"{self.path.name} in {self.path.parent} is not an exported classifier (input {shape}, "
                f"{len(outputs)} outputs)."
            )
        self.image_size = int(shape[1])
        #: 1 for a sigmoid head, else the number of classes of the softmax head.
        self.n_outputs = n_outputs
        self._input_index = inputs[0]["index"]
        logit_rank = 1 if n_outputs == 1 else 2
        self._logit_index, self._cam_index = by_rank[logit_rank]["index"], by_rank[4]["index"]
        self._batch = 0
        self._lock = threading.Lock()

    def _run(self, batch: np.ndarray, with_cam: bool) -> tuple[np.ndarray, np.ndarray | None]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        with self._lock:
            if batch.shape[0] != self._batch:  # the batch dimension is dynamic; re-plan for a new size
                self._interpreter.resize_tensor_input(self._input_index, list(batch.shape), strict=True)
                self._interpreter.allocate_tensors()
                self._batch = batch.shape[0]
            self._interpreter.set_tensor(self._input_index, batch)
            self._interpreter.invoke()
            logits = np.array(self._interpreter.get_tensor(self._logit_index))
            logits = logits.reshape(-1) if self.n_outputs == 1 else logits.reshape(-1, self.n_outputs)
            cams = np.array(self._interpreter.get_tensor(self._cam_index)) if with_cam else None
        return logits, cams

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 (n, size, size, 3) in 0..255 -> logits (n,) (a softmax head: (n, c))."""
        return self._run(batch, with_cam=False)[0]

    def explain(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (n, size, size, 3) -> (logits (n,), raw CAMs (n, h', w', 2) in ``predict.MAP_CHANNELS`` order).

        A softmax head gives (logits (n, c), CAMs (n, h', w', c)), one map per class in the logits' order.
        """
        return self._run(batch, with_cam=True)
