"""Calibrate a finished pneumonia run after the fact (``python -m cxr_core calibrate --run RUN``).

Runs trained before calibration existed (the shipped demo among them) keep their network: a
calibration (temperature scaling unless another method is asked for) is fitted on the validation
predictions the run stored (``predictions.csv``), and the run's
files are brought in line with it, each written atomically:

- ``predictions.csv``: the calibrated probabilities;
- ``metrics.json``: ``calibration`` (with the expected calibration error of the validation and test
  parts before and after), the threshold moved through the same map (so every call stays the same),
  the validation and test figures recomputed (only those at 0.5 and the Brier score change);
- each stored evaluation (``evaluations/<name>``): its probabilities, threshold, figures at 0.5, Brier
  score and ``calibration`` figures. Everything at the run's threshold (AUC, accuracy, sensitivity,
  specificity, their intervals and the subgroups) is unchanged by a monotone map, so it is kept.

Calibrating again starts from what the network itself said, so it never compounds.
"""
from __future__ import annotations

import os

import numpy as np
from sklearn.metrics import roc_auc_score

from cxr_core.core.calibration import IDENTITY, Calibration, expected_calibration_error, fit_calibration
from cxr_core.core.config import TTA_MODES
from cxr_core.core.errors import BadRunError
from cxr_core.core.metrics import binary_metrics, metrics_report
from cxr_core.core.tasks import get_task
from cxr_core.data import views
from cxr_core.evaluation.external import evaluate_folder, prevalence_adjustment
from cxr_core.evaluation.subgroups import calibration_figures
from cxr_core.inference.predictor import BATCH_SIZE, Predictor
from cxr_core.io.images import load_gray
from cxr_core.runs.run_folder import RunFolder


def recalibrate_run(run_dir: str | os.PathLike, method: str = "temperature") -> Calibration:
    """Fit ``method`` on the run's stored validation predictions and rewrite its files (see above);
    ``none`` takes the calibration off.

    Returns:
        the new calibration.

    Raises:
        BadRunError: one sentence when the run is not a finished pneumonia run with validation
            predictions of both classes.
    """
    folder = RunFolder(run_dir)
    config = folder.read_config()
    if not get_task(config.data.task).uses_threshold:
        raise BadRunError(f"The run {folder.name} is a {config.data.task} run; calibrating it after training is "
                          "done for two-class runs only (a new three-class run is calibrated while it trains).")
    metrics = folder.read_metrics()
    preds = folder.read_predictions()
    if not metrics or preds.empty or "split" not in preds.columns:
        raise BadRunError(f"The run {folder.name} has no metrics.json or validation predictions to calibrate on.")
    old = folder.read_calibration()
    raw = old.uncalibrated(preds["probability"].to_numpy(dtype=float))
    is_val = (preds["split"] == "val").to_numpy()
    y = preds["y"].to_numpy().astype(int)
    new = fit_calibration(method, y[is_val], raw[is_val])
    if new is IDENTITY and method != "none":
        raise BadRunError(f"The run {folder.name}'s validation predictions hold one class only, so no calibration "
                          "can be fitted on them.")
    preds = preds.assign(probability=new.probability(raw))
    is_test = (preds["split"] == "test").to_numpy()
    old_threshold = old.uncalibrated([float(metrics.get("threshold") or 0.5)])[0]
    report = metrics_report(y[is_val], preds["probability"].to_numpy()[is_val],
                            y[is_test] if is_test.any() else None,
                            preds["probability"].to_numpy()[is_test] if is_test.any() else None,
                            rule=metrics.get("threshold_rule") or "youden")
    record = new.to_dict()
    for part, mask in (("val", is_val), ("test", is_test)):
        if mask.any():
            record[f"{part}_ece_before"] = expected_calibration_error(y[mask], raw[mask])
            record[f"{part}_ece_after"] = expected_calibration_error(y[mask], preds["probability"].to_numpy()[mask])
    # The rule's own choice on the calibrated part, which is the old threshold moved (a monotone map).
    threshold = new.threshold(old_threshold)
    report["threshold"] = threshold
    if report.get("val") is not None:
        report["val"] = binary_metrics(y[is_val], preds["probability"].to_numpy()[is_val], threshold)
    if report.get("test") is not None:
        report["test"]["at_threshold"] = binary_metrics(y[is_test], preds["probability"].to_numpy()[is_test],
                                                        threshold)
    folder.write_predictions(preds)
    folder.write_metrics({**metrics, **report, "calibration": record})
    for name, result in folder.read_evaluations().items():
        _rescore_evaluation(folder, name, result, old, new, threshold)
    return new


def _rescore_evaluation(folder: RunFolder, name: str, result: dict, old: Calibration, new: Calibration,
                        threshold: float) -> None:
    used = folder.read_evaluation_predictions(name)
    if used.empty or result.get("task", "pneumonia") != "pneumonia":
        return
    raw = old.uncalibrated(used["probability"].to_numpy(dtype=float))
    used = used.assign(probability=new.probability(raw))
    y = used["y"].to_numpy().astype(int)
    prob = used["probability"].to_numpy()
    # A threshold given for this evaluation by hand is moved like the run's own.
    given = result.get("threshold")
    moved = new.threshold(old.uncalibrated([float(given)])[0]) if given is not None else threshold
    updated = {**result, "threshold": moved, "brier": float(np.mean((prob - y) ** 2)),
               "at_0.5": binary_metrics(y, prob, 0.5),
               "calibration": calibration_figures(y, prob, new.method, raw)}
    if result.get("prevalence") is not None:
        updated["prevalence"] = prevalence_adjustment(folder, prob, y, moved)
    updated.pop("stored", None)
    folder.write_evaluation(name, updated, used)


def choose_views_after(run_dir: str | os.PathLike, mode: str = "auto") -> dict:
    """For a pneumonia run trained before test-time views existed: look at its validation and test images
    in one view and in ``data.views.VIEWS``, keep the views when ``mode`` is ``on`` or (``auto``) when they
    raise the validation AUC, then refit its calibration (its own method) on validation, choose its
    threshold again by its own rule on the calibrated validation part, and rewrite ``predictions.csv``,
    ``metrics.json`` (``tta``, ``threshold``, ``val``, ``test``, ``calibration``) and every stored
    evaluation whose data set is still there (evaluated again, as the run now predicts). The test set of
    a stored evaluation plays no part in the choice.

    Returns:
        the ``tta`` record written to metrics.json.

    Raises:
        BadRunError: one sentence when the run is not a finished pneumonia run with validation predictions.
    """
    if mode not in TTA_MODES:
        raise BadRunError(f"The test-time views must be one of {', '.join(TTA_MODES)}; got {mode!r}.")
    folder = RunFolder(run_dir)
    config = folder.read_config()
    metrics, preds = folder.read_metrics(), folder.read_predictions()
    if not get_task(config.data.task).uses_threshold or not metrics or preds.empty:
        raise BadRunError(f"The run {folder.name} is not a finished two-class run with validation predictions, so "
                          "its test-time views cannot be chosen after training.")
    predictor = Predictor.from_run(folder.path, tta=False)
    one, many = [], []
    paths = preds["path"].tolist()
    for start in range(0, len(paths), BATCH_SIZE):
        inputs = predictor._inputs([load_gray(p) for p in paths[start:start + BATCH_SIZE]])
        one.append(predictor.engine.logits(inputs))
        many.append(views.mean_logits(predictor.engine.logits(views.make_views(inputs)), len(views.VIEWS)))
    logits = {"one": np.concatenate(one)[:, 0], "views": np.concatenate(many)[:, 0]}
    y = preds["y"].to_numpy().astype(int)
    is_val, is_test = (preds["split"] == "val").to_numpy(), (preds["split"] == "test").to_numpy()
    record = {"mode": mode, "used": False, "views": [view.name for view in views.VIEWS]}
    if is_val.any() and 0 < y[is_val].sum() < is_val.sum():
        record["val_auc_one"] = float(roc_auc_score(y[is_val], logits["one"][is_val]))
        record["val_auc_views"] = float(roc_auc_score(y[is_val], logits["views"][is_val]))
    record["used"] = mode == "on" or (mode == "auto" and record.get("val_auc_views", 0) > record.get("val_auc_one", 1))
    raw = 1.0 / (1.0 + np.exp(-logits["views" if record["used"] else "one"]))
    method = (metrics.get("calibration") or {}).get("method") or config.train.calibration
    calibration = fit_calibration(method, y[is_val], raw[is_val])
    prob = calibration.probability(raw)
    report = metrics_report(y[is_val], prob[is_val], y[is_test] if is_test.any() else None,
                            prob[is_test] if is_test.any() else None,
                            rule=metrics.get("threshold_rule") or config.train.threshold_rule,
                            target_sensitivity=config.train.target_sensitivity)
    cal = calibration.to_dict()
    for part, mask in (("val", is_val), ("test", is_test)):
        if mask.any():
            cal[f"{part}_ece_before"] = expected_calibration_error(y[mask], raw[mask])
            cal[f"{part}_ece_after"] = expected_calibration_error(y[mask], prob[mask])
    folder.write_predictions(preds.assign(probability=prob))
    folder.write_metrics({**metrics, **report, "calibration": cal, "tta": record})
    for result in folder.read_evaluations().values():
        data = result.get("data")
        if data and os.path.isdir(data):
            evaluate_folder(folder.path, data, store=True)
    return record
