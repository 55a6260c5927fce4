"""Two runs scored on the same external test set: is the difference beyond chance?

Runs evaluated on one data set (``evaluations/<name>``) scored the same images, so their figures
can be compared image by image (``metrics.paired_comparison``: DeLong's test for the AUCs,
McNemar's for the accuracies), which is far more sensitive than comparing two intervals. A class
should learn from it that a lead of 0.004 on 300 images is no lead at all.
"""
from __future__ import annotations

import os
from pathlib import Path

from cxr_core.core.metrics import paired_comparison
from cxr_core.runs.run_folder import RunFolder


def shared_evaluations(run_a: str | os.PathLike, run_b: str | os.PathLike) -> list[dict]:
    """One ``paired_comparison`` per data set both runs were evaluated on (newest of ``run_a``'s first),
    on the images both scored, each with ``name`` and the two thresholds."""
    a, b = RunFolder(run_a), RunFolder(run_b)
    stored_b = b.read_evaluations()
    found = []
    for name, result_a in a.read_evaluations().items():
        result_b = stored_b.get(name)
        if result_b is None or "task" in result_a and result_a["task"] != "pneumonia" \
                or "task" in result_b and result_b["task"] != "pneumonia":
            continue
        preds_a, preds_b = a.read_evaluation_predictions(name), b.read_evaluation_predictions(name)
        if preds_a.empty or preds_b.empty:
            continue
        # The same image under either run's path spelling: matched by the path inside the data set.
        key_a, key_b = _image_keys(preds_a["path"], name), _image_keys(preds_b["path"], name)
        merged = preds_a.assign(key=key_a).merge(preds_b.assign(key=key_b), on="key", suffixes=("_a", "_b"))
        merged = merged[merged["y_a"] == merged["y_b"]]
        if len(merged) < 10:
            continue
        threshold_a = float(result_a.get("threshold") or 0.5)
        threshold_b = float(result_b.get("threshold") or 0.5)
        compared = paired_comparison(merged["y_a"].to_numpy(), merged["probability_a"].to_numpy(),
                                     merged["probability_b"].to_numpy(), threshold_a, threshold_b)
        found.append({"name": name, "threshold_a": threshold_a, "threshold_b": threshold_b, **compared})
    return found


def _image_keys(paths, name: str):
    return paths.map(lambda p: Path(str(p)).as_posix().split(f"/{name}/")[-1])


def verdict(found: dict) -> str:
    """One sentence a student can read: the two AUCs, the difference with its interval, and whether it
    is beyond chance on these images."""
    if found.get("auc_p_value") is None:
        return f"On {found['n']} images of {found['name']} both runs scored, the AUCs cannot be compared (one class)."
    low, high = found["auc_interval"]
    beyond = ("beyond chance" if found["auc_p_value"] < 0.05 else "within what chance alone gives, so the two runs "
              "cannot be told apart on this test set")
    accuracy = (f" Accuracy {found['accuracy_a']:.3f} against {found['accuracy_b']:.3f} at each run's threshold: "
                f"{found['only_a_right']} images only this run gets right, {found['only_b_right']} only the other "
                f"(McNemar p = {found['accuracy_p_value']:.2g}).")
    return (f"On the {found['n']} images of {found['name']} both runs scored: AUC {found['auc_a']:.3f} against "
            f"{found['auc_b']:.3f}, a difference of {found['auc_difference']:+.3f} (95 % interval {low:+.3f} to "
            f"{high:+.3f}, DeLong p = {found['auc_p_value']:.2g}), {beyond}." + accuracy)
