"""A trained classifier exported to LiteRT (``model.tflite``): the export's format, and whether a run's
export can be used. This module needs no TensorFlow: ``engine.export`` writes the export and
``inference.lite_runner`` runs it.

Why: importing TensorFlow costs about 650 MB of memory, more than the smallest Streamlit Community
Cloud container allows for the whole app. The LiteRT runtime (``ai-edge-litert``) runs the same
network in about 50 MB, so the app's Predict and Evaluation pages never import TensorFlow when a
run folder holds ``model.tflite``.

The exported graph has two outputs computed in one forward pass:

* ``logit``: the classifier's logit, as ``model.keras`` computes it;
* ``cams``: (n, h', w', 2), ReLU(S) and ReLU(-S) with S = sum_k w_k A_k, where A_k are the last
  convolutional maps and w_k the final Dense kernel: where the image raised the pneumonia logit and
  where it lowered it (the evidence for NORMAL), in ``Task.map_classes`` order. Every classifier
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
from pathlib import Path

from cxr_core.io.hashing import file_sha256
from cxr_core.runs.run_folder import LITE_FILE, LITE_INFO_FILE, MODEL_FILE, RunFolder

#: 2: the ``cams`` output holds both classes' maps (format 1 had the PNEUMONIA map only).
FORMAT_VERSION = 2


def runtime_available() -> bool:
    """True when the LiteRT runtime (the ``ai-edge-litert`` package) can be imported."""
    try:
        return importlib.util.find_spec("ai_edge_litert") is not None
    except (ImportError, ValueError):
        return False


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
