"""Metrics against values computed by hand on small arrays."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from sklearn.calibration import calibration_curve

from cxr_core.core.errors import CxrError
from cxr_core.core.metrics import (
    binary_metrics,
    calibration_bins,
    choose_threshold,
    metrics_report,
    pr_points,
    roc_points,
    threshold_sweep,
)

# 4 NORMAL, 6 PNEUMONIA. At 0.5: tn=3 (0.1, 0.4, 0.2), fp=1 (0.6), tp=4 (0.9, 0.8, 0.7, 0.55), fn=2 (0.3, 0.45).
Y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
P = np.array([0.1, 0.4, 0.6, 0.2, 0.9, 0.8, 0.3, 0.7, 0.55, 0.45])


def test_binary_metrics_hand_computed() -> None:
    m = binary_metrics(Y, P, 0.5)
    assert m["confusion_matrix"] == [[3, 1], [2, 4]]
    assert all(type(v) is int for row in m["confusion_matrix"] for v in row)
    assert (m["n"], m["n_positive"], m["n_negative"]) == (10, 6, 4)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["sensitivity"] == pytest.approx(4 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(8 / 11)
    # Positive-over-negative pairs: 4 + 4 + 2 + 4 + 3 + 3 = 20 of 24.
    assert m["roc_auc"] == pytest.approx(20 / 24)
    # Precision at each positive in rank order: 1, 1, 1, 4/5, 5/6, 6/8.
    assert m["pr_auc"] == pytest.approx((3 + 0.8 + 5 / 6 + 0.75) / 6)
    assert m["brier"] == pytest.approx(1.705 / 10)
    assert m["threshold"] == 0.5
    json.dumps(m)  # plain Python values only


def test_binary_metrics_threshold_is_inclusive() -> None:
    m = binary_metrics(Y, P, 0.55)
    # 0.55 itself is called positive.
    assert m["confusion_matrix"] == [[3, 1], [2, 4]]
    m = binary_metrics(Y, P, 0.56)
    assert m["confusion_matrix"] == [[3, 1], [3, 3]]


def test_binary_metrics_single_class_and_zero_division() -> None:
    m = binary_metrics([1, 1, 1], [0.2, 0.3, 0.4], 0.5)
    assert m["roc_auc"] is None and m["pr_auc"] is None
    assert m["confusion_matrix"] == [[0, 0], [3, 0]]
    # No positive calls: precision and f1 are 0, specificity has no negatives: 0.
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["specificity"] == 0.0
    assert m["sensitivity"] == 0.0
    m = binary_metrics([0, 0], [0.9, 0.1])
    assert m["roc_auc"] is None and m["sensitivity"] == 0.0 and m["specificity"] == 0.5
    json.dumps(m)


@pytest.mark.parametrize(
    "y, p",
    [
        ([], []),
        ([0, 1], [0.5]),
        ([0, 2], [0.1, 0.2]),
        ([0, 1], [0.1, 1.5]),
        ([0, 1], [0.1, float("nan")]),
        (["a", "b"], [0.1, 0.2]),
    ],
)
def test_bad_input_is_a_cxr_error(y, p) -> None:
    with pytest.raises(CxrError):
        binary_metrics(y, p)


def test_roc_points() -> None:
    r = roc_points(Y, P)
    assert len(r["fpr"]) == len(r["tpr"]) == len(r["thresholds"])
    assert r["fpr"][0] == 0.0 and r["tpr"][0] == 0.0 and r["thresholds"][0] is None
    assert r["fpr"][-1] == 1.0 and r["tpr"][-1] == 1.0
    # The point at threshold 0.45 is (fpr 1/4, tpr 5/6).
    i = r["thresholds"].index(0.45)
    assert (r["fpr"][i], r["tpr"][i]) == pytest.approx((0.25, 5 / 6))
    json.dumps(r)
    assert roc_points([0, 0], [0.1, 0.2]) == {"fpr": [], "tpr": [], "thresholds": []}


def test_pr_points() -> None:
    r = pr_points(Y, P)
    assert len(r["recall"]) == len(r["precision"]) == len(r["thresholds"])
    assert r["thresholds"][-1] is None and r["recall"][-1] == 0.0 and r["precision"][-1] == 1.0
    i = r["thresholds"].index(0.55)
    assert (r["recall"][i], r["precision"][i]) == pytest.approx((4 / 6, 4 / 5))
    json.dumps(r)
    assert pr_points([1, 1], [0.1, 0.2])["recall"] == []


def test_calibration_bins_hand_computed_and_matches_sklearn() -> None:
    c = calibration_bins(Y, P, n_bins=2)
    assert c["count"] == [5, 5]
    assert c["mean_predicted"] == pytest.approx([1.45 / 5, 3.55 / 5])
    assert c["fraction_positive"] == pytest.approx([0.4, 0.8])
    assert c["bin_lower"] == [0.0, 0.5] and c["bin_upper"] == [0.5, 1.0]

    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 300)
    p[:5] = [0.0, 1.0, 0.1, 0.2, 0.5]  # edges
    y = (rng.uniform(0, 1, 300) < p).astype(int)
    c = calibration_bins(y, p, n_bins=10)
    frac, mean = calibration_curve(y, p, n_bins=10, strategy="uniform")
    assert c["fraction_positive"] == pytest.approx(frac.tolist())
    assert c["mean_predicted"] == pytest.approx(mean.tolist())
    assert sum(c["count"]) == 300


def test_calibration_bins_leaves_out_empty_bins() -> None:
    c = calibration_bins([0, 1, 1], [0.05, 0.95, 0.97], n_bins=10)
    assert c["count"] == [1, 2]
    assert c["fraction_positive"] == [0.0, 1.0]
    with pytest.raises(CxrError):
        calibration_bins([0, 1], [0.1, 0.9], n_bins=0)


def test_choose_threshold_youden() -> None:
    # J = tpr - fpr is largest (5/6 - 1/4) at 0.45.
    assert choose_threshold(Y, P, "youden") == pytest.approx(0.45)


@pytest.mark.parametrize("target, expected", [(0.5, 0.7), (0.8, 0.45), (5 / 6, 0.45), (0.95, 0.3), (1.0, 0.3)])
def test_choose_threshold_sensitivity(target: float, expected: float) -> None:
    t = choose_threshold(Y, P, "sensitivity", target_sensitivity=target)
    assert t == pytest.approx(expected)
    assert binary_metrics(Y, P, t)["sensitivity"] >= target - 1e-9


def test_choose_threshold_one_class_falls_back(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="cxr_core.core.metrics"):
        assert choose_threshold([1, 1, 1], [0.2, 0.7, 0.9]) == 0.5
    assert "one class" in caplog.text


def test_choose_threshold_bad_rule() -> None:
    with pytest.raises(CxrError):
        choose_threshold(Y, P, "magic")
    with pytest.raises(CxrError):
        choose_threshold(Y, P, "sensitivity", target_sensitivity=1.5)


def test_threshold_sweep_matches_binary_metrics() -> None:
    thresholds = [0.0, 0.3, 0.45, 0.5, 0.55, 0.9, 1.0]
    df = threshold_sweep(Y, P, thresholds)
    assert list(df["threshold"]) == thresholds
    for col in ("sensitivity", "specificity", "precision", "f1"):
        assert col in df.columns
    for _, row in df.iterrows():
        m = binary_metrics(Y, P, row["threshold"])
        assert [[row["tn"], row["fp"]], [row["fn"], row["tp"]]] == m["confusion_matrix"]
        for col in ("sensitivity", "specificity", "precision", "f1", "accuracy"):
            assert row[col] == pytest.approx(m[col])
    first, last = df.iloc[0], df.iloc[-1]
    assert (first["sensitivity"], first["specificity"]) == (1.0, 0.0)
    # Nothing reaches 1.0: no positive calls, precision 0 by the zero-division rule.
    assert (last["sensitivity"], last["specificity"], last["precision"]) == (0.0, 1.0, 0.0)


def test_metrics_report_layout() -> None:
    y_test = np.array([0, 1, 1, 0])
    p_test = np.array([0.2, 0.47, 0.9, 0.6])
    rep = metrics_report(Y, P, y_test, p_test, rule="youden", target_sensitivity=0.95)
    assert rep["threshold"] == pytest.approx(0.45) and rep["threshold_rule"] == "youden"
    assert rep["val"]["threshold"] == pytest.approx(0.45)
    assert rep["val"]["confusion_matrix"] == [[3, 1], [1, 5]]
    assert rep["test"]["at_0.5"]["confusion_matrix"] == [[1, 1], [1, 1]]
    assert rep["test"]["at_threshold"]["confusion_matrix"] == [[1, 1], [0, 2]]
    json.dumps(rep)

    rep = metrics_report(Y, P, None, None, rule="sensitivity", target_sensitivity=0.95)
    assert rep["threshold"] == pytest.approx(0.3) and rep["test"] is None
    rep = metrics_report(None, None, y_test, p_test)
    assert rep["threshold"] == 0.5 and rep["val"] is None


def test_prevalence_is_recovered_by_em_on_calibrated_synthetic_scores():
    from cxr_core.core.metrics import estimate_prior_em, shift_probabilities, threshold_for_prior

    rng = np.random.default_rng(0)

    def calibrated_sample(n: int, prior: float) -> tuple[np.ndarray, np.ndarray]:
        # Scores from two Gaussians; the exact posterior under ``prior`` is the calibrated probability.
        y = (rng.random(n) < prior).astype(int)
        x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
        logit = 2.0 * x + np.log(prior / (1 - prior))
        return y, 1.0 / (1.0 + np.exp(-logit))

    # Probabilities calibrated to a training prevalence of 0.75, applied at a site with 0.40.
    y_new, _ = calibrated_sample(20000, 0.40)
    x = rng.normal(np.where(y_new == 1, 1.0, -1.0), 1.0)
    p_trained = 1.0 / (1.0 + np.exp(-(2.0 * x + np.log(0.75 / 0.25))))
    estimated = estimate_prior_em(p_trained, train_prior=0.75)
    assert abs(estimated - 0.40) < 0.02
    # Shifting to the true prior gives the calibrated posteriors of the new site.
    shifted = shift_probabilities(p_trained, 0.75, 0.40)
    exact = 1.0 / (1.0 + np.exp(-(2.0 * x + np.log(0.40 / 0.60))))
    assert np.allclose(shifted, exact, atol=1e-9)
    # The moved threshold on the raw probabilities makes exactly the shifted decisions.
    t = threshold_for_prior(0.5, 0.75, 0.40)
    assert t > 0.5
    assert np.mean((p_trained >= t) != (shifted >= 0.5)) < 1e-4
    # No shift, no change.
    assert threshold_for_prior(0.3, 0.6, 0.6) == pytest.approx(0.3)


def test_midpoint_rule_lies_halfway_between_the_class_medians_in_logit_space():
    from cxr_core.core.metrics import choose_threshold

    logits = np.array([-4.0, -3.0, -2.0, -1.0, 2.0, 3.0, 6.0, 7.0, 8.0])
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    p = 1.0 / (1.0 + np.exp(-logits))
    # medians: NORMAL -2.5, PNEUMONIA 6.0 -> 1.75
    assert choose_threshold(y, p, rule="midpoint") == pytest.approx(1.0 / (1.0 + np.exp(-1.75)))
    # It does not depend on how many images of each class validation holds.
    more_normal = np.concatenate([y, [0, 0, 0, 0]]), np.concatenate([p, p[:4]])
    assert choose_threshold(*more_normal, rule="midpoint") == pytest.approx(1.0 / (1.0 + np.exp(-1.75)))
    # Youden takes the edge of the gap instead.
    assert choose_threshold(y, p, rule="youden") == pytest.approx(p[4])


# --- Intervals and the "few test images" rule ----------------------------------------------------
def test_wilson_interval_hand_computed() -> None:
    from cxr_core.core.metrics import proportion_interval

    # Wilson, z = 1.959964: 8 of 10 -> centre (8 + z²/2) / (10 + z²), half-width z·sqrt(pq/n + z²/4n²) / (1 + z²/n).
    low, high = proportion_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert proportion_interval(0, 0) is None
    low, high = proportion_interval(10, 10)  # a perfect score still has an interval below 1
    assert high == pytest.approx(1.0) and low < 0.75


def test_few_test_images_rule_depends_on_the_smaller_class_not_the_total() -> None:
    from cxr_core.core.metrics import intervals_are_wide, rate_intervals

    def metrics(tn, fp, fn, tp):
        return {"confusion_matrix": [[tn, fp], [fn, tp]]}

    # The internal split of kermany224: 521 images, 135 normal, 386 pneumonia; intervals about ±0.06 and ±0.02.
    big = rate_intervals(metrics(tn=115, fp=20, fn=19, tp=367))
    assert set(big) == {"sensitivity", "specificity"} and not intervals_are_wide(big)
    # 60 images, 20 normal: specificity 0.75 ± 0.18 is too wide to compare models.
    small = rate_intervals(metrics(tn=15, fp=5, fn=4, tp=36))
    assert intervals_are_wide(small)
    # 1,000 images but only 30 normal: the total does not make it trustworthy.
    assert intervals_are_wide(rate_intervals(metrics(tn=20, fp=10, fn=50, tp=920)))
    assert rate_intervals({}) == {}
    assert set(rate_intervals(metrics(tn=0, fp=0, fn=2, tp=8))) == {"sensitivity"}


# --- Reading the training curves -----------------------------------------------------------------
def _history(loss, val_loss, auc=None, val_auc=None, phase=None):
    import pandas as pd

    n = len(loss)
    return pd.DataFrame({"phase": phase or ["head"] * n, "epoch": range(1, n + 1), "loss": loss,
                         "val_loss": val_loss, "auc": auc or [0.9] * n, "val_auc": val_auc or [0.88] * n})


def test_fit_diagnosis_sees_overfitting_only_when_validation_loss_rises_as_training_loss_falls() -> None:
    from cxr_core.core.metrics import fit_diagnosis

    rising = fit_diagnosis(_history([0.6, 0.4, 0.3, 0.2], [0.5, 0.45, 0.5, 0.6]))
    assert rising.kind == "overfitting" and rising.is_warning
    assert "risen for the last 2 epochs" in rising.message
    # Validation better than training throughout (dropout, augmentation): no overfitting hint.
    better = fit_diagnosis(_history([0.6, 0.5, 0.45, 0.4], [0.4, 0.35, 0.3, 0.28]))
    assert better.kind == "fine" and not better.is_warning and "or better" in better.message
    # One noisy epoch is not a trend.
    assert fit_diagnosis(_history([0.6, 0.5, 0.4, 0.3], [0.5, 0.4, 0.35, 0.37])).kind == "fine"
    # Both losses rising together is not overfitting (a learning rate too high, say).
    assert fit_diagnosis(_history([0.3, 0.4, 0.5, 0.6], [0.3, 0.4, 0.5, 0.6])).kind != "overfitting"


def test_fit_diagnosis_gap_chance_short_and_phases() -> None:
    from cxr_core.core.metrics import fit_diagnosis

    gap = fit_diagnosis(_history([0.3, 0.2, 0.1], [0.4, 0.4, 0.39], auc=[0.9, 0.97, 0.99], val_auc=[0.8, 0.82, 0.8]))
    assert gap.kind == "gap" and "0.99" in gap.message and "0.80" in gap.message
    chance = fit_diagnosis(_history([0.7, 0.69, 0.69], [0.7, 0.7, 0.7], val_auc=[0.5, 0.52, 0.49]))
    assert chance.kind == "chance" and chance.is_warning
    assert fit_diagnosis(_history([0.6, 0.5], [0.5, 0.55])).kind == "too_short"
    assert fit_diagnosis(_history([0.6, 0.5], [float("nan")] * 2)).kind == "no_validation"
    # Fine-tuning restarts the loss: the jump at the boundary is not a rising trend.
    phases = _history([0.5, 0.4, 0.3, 0.35, 0.3, 0.25], [0.3, 0.28, 0.27, 0.4, 0.35, 0.3],
                      phase=["head"] * 3 + ["fine_tune"] * 3)
    assert fit_diagnosis(phases).kind == "fine"
