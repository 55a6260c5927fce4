"""The figures of one evaluation split by subtype and by every group the data set records.

A headline AUC can hide a group where the model fails: the viral pneumonias it misses, or the
copies of the data made at one resolution where a shortcut stops working. ``subgroup_figures``
reports, at the run's threshold:

- per pneumonia subtype (``bacteria``, ``virus``, from the file names): how many of them the model
  finds (sensitivity) and how well it tells them from every normal film (ROC AUC);
- per value of each group column of the manifest (``source_resolution`` in the Kermany copies
  here; a scanner or a site elsewhere): n, ROC AUC, accuracy, sensitivity and specificity within it.

A group column is a categorical manifest column that is neither an identifier nor the label, with 2
to ``MAX_GROUP_VALUES`` values. Figures with no meaning in a group (an AUC where it holds one class,
a specificity without normal films) are None.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cxr_core.core.calibration import Calibration, expected_calibration_error
from cxr_core.core.metrics import binary_metrics, calibration_bins
from cxr_core.data.shortcuts import NOT_PROPERTIES

MAX_GROUP_VALUES = 12
#: Manifest columns that describe the image file, not where it came from.
_NOT_GROUPS = NOT_PROPERTIES | {"width", "height", "source_width", "source_height", "probability", "predicted",
                                "marker"}
_FIGURES = ("roc_auc", "accuracy", "sensitivity", "specificity")


def group_columns(frame: pd.DataFrame) -> list[str]:
    """The manifest's group columns (see the module's docstring), in their order."""
    found = []
    for name in frame.columns:
        if str(name).lower() in _NOT_GROUPS or str(name).startswith("p_"):
            continue
        values = frame[name]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            continue
        if 2 <= values.dropna().astype(str).nunique() <= MAX_GROUP_VALUES:
            found.append(str(name))
    return found


def _figures(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    m = binary_metrics(y, p, threshold)
    out = {"n": m["n"], "n_positive": m["n_positive"], "n_negative": m["n_negative"]}
    for name in _FIGURES:
        out[name] = m[name]
    if not m["n_positive"]:
        out["sensitivity"] = None
    if not m["n_negative"]:
        out["specificity"] = None
    return out


def subgroup_figures(used: pd.DataFrame, threshold: float) -> dict:
    """``{"subtype": {name: figures}, "<group column>": {value: figures}}`` of a pneumonia run's
    evaluation (``used``: y, probability and the manifest's columns); empty when there are no groups."""
    y = (used["y"].to_numpy().astype(int) > 0).astype(int)
    p = used["probability"].to_numpy().astype(float)
    out: dict[str, dict] = {}
    if "subtype" in used.columns:
        subtype = used["subtype"].fillna("").astype(str).str.lower().to_numpy()
        normal = y == 0
        kinds = sorted({s for s in subtype[~normal] if s and s not in ("normal", "pneumonia")})
        if kinds:
            out["subtype"] = {kind: _figures(y[normal | (subtype == kind)], p[normal | (subtype == kind)], threshold)
                              for kind in kinds}
            for figures in out["subtype"].values():  # the normal films are shared by every subtype
                figures.pop("specificity")
                figures.pop("accuracy")
    for column in group_columns(used):
        values = used[column].astype(str).to_numpy()
        present = used[column].notna().to_numpy()
        out[column] = {value: _figures(y[present & (values == value)], p[present & (values == value)], threshold)
                       for value in sorted(set(values[present]))}
    return out


def calibration_figures(y: np.ndarray, prob: np.ndarray, method: str, before: np.ndarray | None = None) -> dict:
    """The expected calibration error and reliability-diagram bins of P(disease) (``prob``), after the
    run's calibration (``method``) and, given ``before`` (what the network itself said), before it."""
    y = (np.asarray(y).astype(int) > 0).astype(int)
    prob = np.asarray(prob, dtype=np.float64)
    out = {"method": method, "ece": expected_calibration_error(y, prob), "bins": calibration_bins(y, prob)}
    if before is not None:
        before = np.asarray(before, dtype=np.float64)
        out.update(ece_before=expected_calibration_error(y, before), bins_before=calibration_bins(y, before))
    return out


def uncalibrated(calibration: Calibration, prob: np.ndarray, probs: np.ndarray | None = None) -> np.ndarray | None:
    """P(disease) as the network said it before ``calibration`` (``probs``: a softmax run's class
    probabilities); None when the run has no calibration."""
    if not calibration.active:
        return None
    if probs is None:
        return calibration.uncalibrated(prob)
    undone = Calibration(calibration.method, 1.0 / calibration.slope).probabilities(probs)
    return 1.0 - undone[:, 0]
