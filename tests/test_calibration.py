"""Calibrated probabilities: fitted on validation, stored with the run, applied by the Predictor,
reported with the expected calibration error before and after on an evaluation."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxr_core.core.calibration import (
    IDENTITY,
    Calibration,
    expected_calibration_error,
    fit_calibration,
    fit_platt,
    fit_temperature,
    sigmoid,
)
from cxr_core.core.config import RunConfig
from cxr_core.core.errors import BadRunError, CxrError
from cxr_core.evaluation.subgroups import calibration_figures, group_columns, subgroup_figures, uncalibrated
from cxr_core.inference.predictor import Predictor
from cxr_core.runs.run_folder import RunFolder


def _miscalibrated(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(2 z - 1) while the model says sigmoid(z): under-confident and biased."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, n)
    y = (rng.random(n) < sigmoid(2 * z - 1)).astype(int)
    return y, sigmoid(z)


def test_platt_recovers_the_true_map_and_lowers_the_calibration_error() -> None:
    y, p = _miscalibrated()
    cal = fit_platt(y, p)
    assert cal.method == "platt" and cal.n == len(y)
    assert cal.slope == pytest.approx(2.0, abs=0.25) and cal.intercept == pytest.approx(-1.0, abs=0.2)
    before, after = expected_calibration_error(y, p), expected_calibration_error(y, cal.probability(p))
    assert before > 0.08 and after < 0.03
    # Monotone: the order of the images, so the AUC, does not move; a moved threshold makes the same calls.
    assert roc_auc_score(y, cal.probability(p)) == pytest.approx(roc_auc_score(y, p))
    for threshold in (0.2, 0.5, 0.8):
        np.testing.assert_array_equal(p >= threshold, cal.probability(p) >= cal.threshold(threshold) - 1e-12)
    np.testing.assert_allclose(cal.uncalibrated(cal.probability(p)), p, atol=1e-6)


def test_a_separable_validation_part_gives_a_finite_slope_and_one_class_gives_the_identity() -> None:
    y = np.array([0] * 50 + [1] * 50)
    p = np.concatenate([np.linspace(0.01, 0.3, 50), np.linspace(0.7, 0.99, 50)])
    cal = fit_platt(y, p)
    assert cal.active and np.isfinite(cal.slope) and 0 < cal.slope < 20
    assert fit_platt(np.ones(10), np.linspace(0.1, 0.9, 10)) is IDENTITY
    assert fit_calibration("none", y, p) is IDENTITY
    with pytest.raises(CxrError, match="calibration must be one of"):
        fit_calibration("isotonic", y, p)


def test_temperature_softens_an_over_confident_softmax_and_keeps_the_argmax() -> None:
    rng = np.random.default_rng(1)
    n = 3000
    truth = rng.normal(0, 1, (n, 3))
    y = np.array([rng.choice(3, p=row) for row in np.exp(truth) / np.exp(truth).sum(1, keepdims=True)])
    said = np.exp(3 * truth)
    said /= said.sum(1, keepdims=True)  # three times too sure
    cal = fit_temperature(y, said)
    assert cal.method == "temperature" and cal.slope == pytest.approx(1 / 3, abs=0.08)
    fixed = cal.probabilities(said)
    np.testing.assert_allclose(fixed.sum(1), 1.0)
    np.testing.assert_array_equal(fixed.argmax(1), said.argmax(1))
    # A softmax head's logits get no intercept: every class is divided by the same temperature.
    np.testing.assert_allclose(cal.logits(np.array([[1.0, 2.0, 3.0]])), [[cal.slope, 2 * cal.slope, 3 * cal.slope]])


def test_stored_calibration_round_trips_and_damage_is_one_sentence(tmp_path) -> None:
    cal = Calibration("platt", 1.7, -0.4, 500)
    assert Calibration.from_dict(cal.to_dict()) == cal
    assert Calibration.from_dict(None) is IDENTITY and Calibration.from_dict({"method": "none"}) is IDENTITY
    with pytest.raises(CxrError, match="damaged"):
        Calibration.from_dict({"method": "platt", "slope": -1})
    folder = RunFolder(tmp_path)
    folder.write_metrics({"threshold": 0.5})
    assert folder.read_calibration() is IDENTITY  # a run trained before calibration existed
    folder.write_metrics({"threshold": 0.5, "calibration": {"method": "platt", "slope": "x"}})
    with pytest.raises((BadRunError, ValueError)):
        folder.read_calibration()


class _Engine:
    name = "fixed"
    image_size, n_outputs, map_grid = 8, 1, (2, 2)

    def __init__(self, logits) -> None:
        self._logits = np.asarray(logits, np.float32).reshape(-1, 1)

    def logits(self, batch):
        return self._logits[: len(batch)]

    def explain(self, batch):
        return self._logits[: len(batch)], np.ones((len(batch), 2, 2, 2), np.float32)


def test_the_predictor_applies_the_calibration_to_predictions_and_explanations() -> None:
    cal = Calibration("platt", 0.5, 1.0, 100)
    images = [np.zeros((6, 6), np.uint8)] * 3
    logits = [-3.0, 0.0, 2.0]
    plain = Predictor(_Engine(logits), RunConfig(), threshold=0.5)
    calibrated = Predictor(_Engine(logits), RunConfig(), threshold=0.5, calibration=cal)
    expected = sigmoid(0.5 * np.array(logits) + 1.0)
    np.testing.assert_allclose([f.probability for f in plain.predict(images)], sigmoid(logits), rtol=1e-6)
    np.testing.assert_allclose([f.probability for f in calibrated.predict(images)], expected, rtol=1e-6)
    np.testing.assert_allclose([f.probability for f in calibrated.explain(images)], expected, rtol=1e-6)
    # The first image: raw 0.047 is NORMAL, calibrated 0.38 still NORMAL at 0.5; the second: 0.5 -> 0.73.
    assert [f.label for f in calibrated.predict(images)] == ["NORMAL", "PNEUMONIA", "PNEUMONIA"]


def test_evaluation_figures_before_and_after_and_per_group() -> None:
    y, raw = _miscalibrated(2000, seed=3)
    cal = fit_platt(y, raw)
    after = cal.probability(raw)
    figures = calibration_figures(y, after, cal.method, uncalibrated(cal, after))
    assert figures["ece"] < figures["ece_before"] and figures["method"] == "platt"
    assert sum(figures["bins"]["count"]) == len(y) == sum(figures["bins_before"]["count"])
    assert "ece_before" not in calibration_figures(y, raw, "none", uncalibrated(IDENTITY, raw))

    # A shortcut that works on one copy of the data and fails on another shows in the groups.
    rng = np.random.default_rng(0)
    n = 400
    labels = rng.integers(0, 2, n)
    source = np.where(np.arange(n) < 200, "224px", "original")
    prob = np.where(source == "224px", 0.2 + 0.6 * labels, rng.random(n))
    subtype = np.where(labels == 0, "normal", np.where(np.arange(n) % 2, "bacteria", "virus"))
    used = pd.DataFrame({"y": labels, "probability": prob, "source_resolution": source, "subtype": subtype,
                         "patient_id": [f"p{i}" for i in range(n)], "width": 224, "sha256": [str(i) for i in range(n)]})
    assert group_columns(used) == ["source_resolution"]
    groups = subgroup_figures(used, 0.5)
    assert groups["source_resolution"]["224px"]["roc_auc"] == pytest.approx(1.0)
    assert groups["source_resolution"]["original"]["roc_auc"] < 0.7
    assert set(groups["subtype"]) == {"bacteria", "virus"}
    bacteria = groups["subtype"]["bacteria"]
    assert bacteria["n_positive"] == int(((labels == 1) & (subtype == "bacteria")).sum())
    assert bacteria["n_negative"] == int((labels == 0).sum()) and "specificity" not in bacteria
    # A group of one class has no AUC and no specificity rather than a made-up number.
    one_class = subgroup_figures(used.assign(source_resolution=np.where(labels == 1, "a", "b")), 0.5)
    assert one_class["source_resolution"]["a"]["roc_auc"] is None
    assert one_class["source_resolution"]["a"]["specificity"] is None


def _demo_copy(tmp_path):
    import shutil
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "artifacts" / "demo-mobilenet"
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "metrics.json", "predictions.csv", "status.json"):
        shutil.copy(demo / name, run / name)
    shutil.copytree(demo / "evaluations", run / "evaluations")
    return run


def test_calibrating_a_finished_run_keeps_every_call_and_can_be_undone(tmp_path) -> None:
    from cxr_core.evaluation.recalibrate import recalibrate_run

    run = _demo_copy(tmp_path)
    folder = RunFolder(run)
    # Start from what the network itself said (the shipped demo is calibrated already).
    recalibrate_run(run, "none")
    raw_preds, raw_metrics = folder.read_predictions(), folder.read_metrics()
    raw_eval = folder.read_evaluations()["kermany224-test-dev"]
    assert folder.read_calibration() is IDENTITY

    platt = recalibrate_run(run, "platt")
    preds, metrics = folder.read_predictions(), folder.read_metrics()
    assert folder.read_calibration() == platt and metrics["calibration"]["method"] == "platt"
    np.testing.assert_allclose(preds["probability"], platt.probability(raw_preds["probability"]), atol=1e-9)
    # Every call at the run's threshold is the same, so the figures there are too.
    assert metrics["threshold"] == pytest.approx(platt.threshold(raw_metrics["threshold"]))
    np.testing.assert_array_equal(preds["probability"] >= metrics["threshold"],
                                  raw_preds["probability"] >= raw_metrics["threshold"])
    for name in ("accuracy", "sensitivity", "specificity", "roc_auc"):
        assert metrics["test"]["at_threshold"][name] == pytest.approx(raw_metrics["test"]["at_threshold"][name])
    assert metrics["calibration"]["val_ece_after"] < metrics["calibration"]["val_ece_before"]
    stored = folder.read_evaluations()["kermany224-test-dev"]
    assert stored["accuracy"] == raw_eval["accuracy"] and stored["threshold"] == pytest.approx(metrics["threshold"])
    assert stored["calibration"]["ece_before"] == pytest.approx(raw_eval["calibration"]["ece"])

    # Calibrating again starts from the network's own probabilities: it never compounds.
    again = recalibrate_run(run, "platt")
    assert again.slope == pytest.approx(platt.slope, rel=1e-4) and again.intercept == pytest.approx(platt.intercept,
                                                                                                   abs=1e-4)
    recalibrate_run(run, "none")
    np.testing.assert_allclose(folder.read_predictions()["probability"], raw_preds["probability"], atol=1e-9)


def test_a_three_class_run_is_not_calibrated_after_the_fact(tmp_path) -> None:
    from cxr_core.evaluation.recalibrate import recalibrate_run

    run = _demo_copy(tmp_path)
    import json

    config = json.loads((run / "config.json").read_text())
    config["data"]["task"] = "subtype"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadRunError, match="two-class runs only"):
        recalibrate_run(run)
