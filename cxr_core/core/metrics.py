"""Metrics, curves, threshold choice and calibration for a binary classifier (and, in
``multiclass_metrics``, for the subtype task's NORMAL / BACTERIA / VIRUS head).

Pure functions over numpy arrays: ``y_true`` holds 0 (NORMAL) / 1 (PNEUMONIA), ``prob`` the predicted
probability of PNEUMONIA in [0, 1]. A case is called positive when ``prob >= threshold`` (the same
convention as ``sklearn.metrics.roc_curve``). Every value returned is a plain Python number, list or
``None`` so results go straight into ``metrics.json``; undefined values (AUC with one class present,
precision with no positive calls) never raise.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from cxr_core.core.errors import CxrError
from cxr_core.core.labels import TASK_CLASSES, THRESHOLD_RULES

logger = logging.getLogger(__name__)

ArrayLike = Sequence[float] | np.ndarray


def _check(y_true: ArrayLike, prob: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert labels and probabilities to 1-D arrays (int64, float64).

    Raises:
        CxrError: on empty, mismatched, non-binary or out-of-range input.
    """
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    if y.size == 0:
        raise CxrError("There are no predictions to evaluate; the labels and probabilities are empty.")
    if y.size != p.size:
        raise CxrError(f"There are {y.size} labels but {p.size} probabilities; they must match one to one.")
    try:
        y_num = y.astype(np.float64)
    except (TypeError, ValueError) as error:
        raise CxrError("The labels must be 0 (NORMAL) or 1 (PNEUMONIA).") from error
    if not np.isin(y_num, (0.0, 1.0)).all():
        raise CxrError("The labels must be 0 (NORMAL) or 1 (PNEUMONIA).")
    if not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0:
        raise CxrError("The probabilities must be finite numbers between 0 and 1.")
    return y_num.astype(np.int64), p


def _ratio(num: float, den: float) -> float:
    # zero_division=0, as sklearn's: an undefined rate is reported as 0 rather than NaN.
    return float(num) / float(den) if den else 0.0


def _float_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _counts(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    pred = p >= threshold
    pos = y == 1
    tp = int(np.count_nonzero(pred & pos))
    fp = int(np.count_nonzero(pred & ~pos))
    fn = int(np.count_nonzero(~pred & pos))
    tn = int(np.count_nonzero(~pred & ~pos))
    return tn, fp, fn, tp


def binary_metrics(y_true: ArrayLike, prob: ArrayLike, threshold: float = 0.5) -> dict[str, Any]:
    """Threshold-dependent and threshold-free metrics of one set of predictions.

    Args:
        y_true: labels, 0 or 1.
        prob: probability of class 1, in [0, 1].
        threshold: a case is positive when ``prob >= threshold``.

    Returns:
        dict with n, n_positive, n_negative, accuracy, roc_auc, pr_auc (average precision),
        sensitivity, specificity, precision, f1, brier, threshold and confusion_matrix
        ``[[tn, fp], [fn, tp]]`` (plain ints). roc_auc and pr_auc are ``None`` when only one class
        is present; rates with a zero denominator are 0.0.

    Raises:
        CxrError: on invalid input.
    """
    y, p = _check(y_true, prob)
    threshold = float(threshold)
    tn, fp, fn, tp = _counts(y, p, threshold)
    n_pos = tp + fn
    n_neg = tn + fp
    two_classes = n_pos > 0 and n_neg > 0
    sensitivity = _ratio(tp, n_pos)
    precision = _ratio(tp, tp + fp)
    return {
        "n": int(y.size),
        "n_positive": int(n_pos),
        "n_negative": int(n_neg),
        "accuracy": _ratio(tp + tn, y.size),
        "roc_auc": _float_or_none(skm.roc_auc_score(y, p)) if two_classes else None,
        "pr_auc": _float_or_none(skm.average_precision_score(y, p)) if two_classes else None,
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, n_neg),
        "precision": precision,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "brier": float(np.mean((p - y) ** 2)),
        "threshold": threshold,
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def _thresholds_list(thresholds: np.ndarray) -> list[float | None]:
    # sklearn marks the "call nothing positive" point with +inf, which JSON cannot hold: use None.
    return [float(t) if math.isfinite(t) else None for t in thresholds]


def roc_points(y_true: ArrayLike, prob: ArrayLike) -> dict[str, list]:
    """The ROC curve.

    Args:
        y_true: labels, 0 or 1.
        prob: probability of class 1.

    Returns:
        dict(fpr, tpr, thresholds) of equal-length lists; the first point (0, 0) has threshold
        ``None`` (sklearn's +inf). All lists are empty when only one class is present.
    """
    y, p = _check(y_true, prob)
    if np.unique(y).size < 2:
        return {"fpr": [], "tpr": [], "thresholds": []}
    fpr, tpr, thr = skm.roc_curve(y, p)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": _thresholds_list(thr)}


def pr_points(y_true: ArrayLike, prob: ArrayLike) -> dict[str, list]:
    """The precision-recall curve.

    Args:
        y_true: labels, 0 or 1.
        prob: probability of class 1.

    Returns:
        dict(recall, precision, thresholds) of equal-length lists; the last point
        (recall 0, precision 1) has threshold ``None`` (sklearn gives it none). All lists are empty
        when only one class is present.
    """
    y, p = _check(y_true, prob)
    if np.unique(y).size < 2:
        return {"recall": [], "precision": [], "thresholds": []}
    precision, recall, thr = skm.precision_recall_curve(y, p)
    return {
        "recall": recall.tolist(),
        "precision": precision.tolist(),
        "thresholds": _thresholds_list(thr) + [None],
    }


def calibration_bins(y_true: ArrayLike, prob: ArrayLike, n_bins: int = 10) -> dict[str, list]:
    """Reliability diagram data: uniform bins over [0, 1], empty bins left out.

    Matches ``sklearn.calibration.calibration_curve(strategy="uniform")`` and adds the count of
    cases per bin (a bin of three images should not be read like a bin of three hundred).

    Args:
        y_true: labels, 0 or 1.
        prob: probability of class 1.
        n_bins: number of equal-width bins.

    Returns:
        dict(mean_predicted, fraction_positive, count, bin_lower, bin_upper) of equal-length lists.
    """
    y, p = _check(y_true, prob)
    n_bins = int(n_bins)
    if n_bins < 1:
        raise CxrError(f"The number of calibration bins must be at least 1; got {n_bins}.")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Same binning as sklearn: a probability equal to an inner edge goes to the lower bin.
    ids = np.searchsorted(edges[1:-1], p, side="left")
    count = np.bincount(ids, minlength=n_bins)
    sum_p = np.bincount(ids, weights=p, minlength=n_bins)
    sum_y = np.bincount(ids, weights=y, minlength=n_bins)
    keep = count > 0
    return {
        "mean_predicted": (sum_p[keep] / count[keep]).tolist(),
        "fraction_positive": (sum_y[keep] / count[keep]).tolist(),
        "count": [int(c) for c in count[keep]],
        "bin_lower": edges[:-1][keep].tolist(),
        "bin_upper": edges[1:][keep].tolist(),
    }


def choose_threshold(
    y_true: ArrayLike, prob: ArrayLike, rule: str = "youden", target_sensitivity: float = 0.95
) -> float:
    """Choose the decision threshold on validation predictions.

    Args:
        y_true: validation labels, 0 or 1.
        prob: validation probabilities of class 1.
        rule: ``youden`` (maximise sensitivity + specificity - 1, the highest such threshold on ties),
            ``sensitivity`` (the highest threshold whose sensitivity reaches ``target_sensitivity``) or
            ``midpoint`` (halfway, in logit space, between the median validation logits of the two
            classes: it uses every validation image rather than the few at the boundary, and does not
            depend on the validation prevalence, so it moves less when a new site's images shift).
        target_sensitivity: used by the ``sensitivity`` rule, in (0, 1].

    Returns:
        the threshold in [0, 1]; 0.5, with a logged warning, when only one class is present.

    Raises:
        CxrError: on an unknown rule, an invalid target or invalid input.
    """
    if rule not in THRESHOLD_RULES:
        raise CxrError(f"The threshold rule must be one of {', '.join(THRESHOLD_RULES)}; got {rule!r}.")
    if rule == "sensitivity" and not (0.0 < float(target_sensitivity) <= 1.0):
        raise CxrError(f"The target sensitivity must be above 0 and at most 1; got {target_sensitivity}.")
    y, p = _check(y_true, prob)
    if np.unique(y).size < 2:
        logger.warning(
            "Validation labels hold one class only; the threshold cannot be tuned and stays at 0.5."
        )
        return 0.5
    if rule == "midpoint":
        logits = np.log(np.clip(p, 1e-7, 1 - 1e-7) / np.clip(1 - p, 1e-7, 1 - 1e-7))
        middle = 0.5 * (float(np.median(logits[y == 0])) + float(np.median(logits[y == 1])))
        return float(1.0 / (1.0 + np.exp(-middle)))
    # Keep every point: the chosen threshold must be an exact operating point of the curve.
    fpr, tpr, thr = skm.roc_curve(y, p, drop_intermediate=False)
    # youden: thresholds decrease along the curve; argmax takes the first maximum = the highest threshold.
    # sensitivity: tpr is non-decreasing; the first index reaching the target is the highest such threshold.
    # A small tolerance so that e.g. 19/20 = 0.95 counts as reaching 0.95.
    index = (int(np.argmax(tpr - fpr)) if rule == "youden"
             else int(np.argmax(tpr >= float(target_sensitivity) - 1e-12)))
    # Index 0 is sklearn's +inf point (call nothing positive); 1.0 is the nearest usable threshold.
    return float(min(thr[index], 1.0))


def threshold_sweep(y_true: ArrayLike, prob: ArrayLike, thresholds: ArrayLike) -> pd.DataFrame:
    """Operating characteristics at each of several thresholds (for a threshold slider).

    Args:
        y_true: labels, 0 or 1.
        prob: probability of class 1.
        thresholds: thresholds to evaluate.

    Returns:
        DataFrame with columns threshold, sensitivity, specificity, precision, f1, accuracy,
        tn, fp, fn, tp; one row per threshold, in the order given.
    """
    y, p = _check(y_true, prob)
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    pos = y == 1
    n_pos = int(pos.sum())
    n_neg = int(y.size - n_pos)
    # Count, for every threshold at once, the positives and negatives with prob >= threshold.
    p_pos = np.sort(p[pos])
    p_neg = np.sort(p[~pos])
    tp = n_pos - np.searchsorted(p_pos, t, side="left")
    fp = n_neg - np.searchsorted(p_neg, t, side="left")
    fn = n_pos - tp
    tn = n_neg - fp
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = np.where(n_pos > 0, tp / max(n_pos, 1), 0.0)
        spec = np.where(n_neg > 0, tn / max(n_neg, 1), 0.0)
        prec = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    return pd.DataFrame(
        {
            "threshold": t,
            "sensitivity": sens.astype(np.float64),
            "specificity": spec.astype(np.float64),
            "precision": prec.astype(np.float64),
            "f1": f1.astype(np.float64),
            "accuracy": (tp + tn) / y.size,
            "tn": tn.astype(np.int64),
            "fp": fp.astype(np.int64),
            "fn": fn.astype(np.int64),
            "tp": tp.astype(np.int64),
        }
    )


def metrics_report(
    y_val: ArrayLike | None,
    p_val: ArrayLike | None,
    y_test: ArrayLike | None,
    p_test: ArrayLike | None,
    rule: str = "youden",
    target_sensitivity: float = 0.95,
) -> dict[str, Any]:
    """Choose the threshold on validation and report validation and test metrics.

    Args:
        y_val: validation labels (``None`` or empty: threshold 0.5, "val" is ``None``).
        p_val: validation probabilities.
        y_test: test labels (``None`` or empty: "test" is ``None``).
        p_test: test probabilities.
        rule: threshold rule, see ``choose_threshold``.
        target_sensitivity: used by the ``sensitivity`` rule.

    Returns:
        {"threshold", "threshold_rule", "val": metrics at the chosen threshold,
         "test": {"at_0.5": ..., "at_threshold": ...}} — the layout of ``metrics.json``.
    """
    has_val = y_val is not None and p_val is not None and np.asarray(y_val).size > 0
    has_test = y_test is not None and p_test is not None and np.asarray(y_test).size > 0
    if has_val:
        threshold = choose_threshold(y_val, p_val, rule=rule, target_sensitivity=target_sensitivity)
        val = binary_metrics(y_val, p_val, threshold)
    else:
        if rule not in THRESHOLD_RULES:
            raise CxrError(f"The threshold rule must be one of {', '.join(THRESHOLD_RULES)}; got {rule!r}.")
        logger.warning("No validation predictions; the threshold stays at 0.5.")
        threshold, val = 0.5, None
    test = None
    if has_test:
        test = {
            "at_0.5": binary_metrics(y_test, p_test, 0.5),
            "at_threshold": binary_metrics(y_test, p_test, threshold),
        }
    return {"threshold": threshold, "threshold_rule": rule, "val": val, "test": test}


# -- more than two classes (the subtype task: NORMAL, BACTERIA, VIRUS) ------------------------------

def _check_multiclass(y_true: ArrayLike, probs: ArrayLike, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate class indices and a probability matrix (one row per image, one column per class)."""
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if y.size == 0:
        raise CxrError("There are no predictions to evaluate; the labels and probabilities are empty.")
    if p.ndim != 2 or p.shape != (y.size, n_classes):
        raise CxrError(f"There are {y.size} labels but probabilities of shape {p.shape}; "
                       f"one row of {n_classes} probabilities per label is needed.")
    try:
        y_num = y.astype(np.float64)
    except (TypeError, ValueError) as error:
        raise CxrError(f"The labels must be class numbers 0 to {n_classes - 1}.") from error
    if not np.isin(y_num, np.arange(n_classes)).all():
        raise CxrError(f"The labels must be class numbers 0 to {n_classes - 1}.")
    if not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0:
        raise CxrError("The probabilities must be finite numbers between 0 and 1.")
    return y_num.astype(np.int64), p


def multiclass_metrics(y_true: ArrayLike, probs: ArrayLike,
                       classes: Sequence[str] = TASK_CLASSES["subtype"]) -> dict[str, Any]:
    """Metrics of a classifier over NORMAL and several pneumonia classes; the prediction is the
    most probable class.

    Args:
        y_true: class indices (0 = ``classes[0]``, which must be NORMAL).
        probs: probabilities, one row per image and one column per class (rows sum to 1).
        classes: the class names, in the order of the columns (NORMAL, BACTERIA, VIRUS).

    Returns:
        dict with task, classes, n, accuracy, roc_auc (macro one-vs-rest, ``None`` unless every
        class is present), per_class ({name: roc_auc, sensitivity, specificity, precision, n}),
        confusion_matrix (rows true, columns predicted, in the order of ``classes``),
        pneumonia_vs_normal (``binary_metrics`` of any pneumonia against NORMAL, with
        P(pneumonia) = 1 - P(NORMAL), at 0.5), bacterial_vs_viral (n, accuracy, sensitivity with
        the last class, VIRUS, as positive, specificity; among the images that truly are one of
        the two, called by the larger of their two probabilities) and calibration ({name:
        ``calibration_bins`` of that class against the rest}).

    Raises:
        CxrError: on invalid input.
    """
    classes = tuple(classes)
    y, p = _check_multiclass(y_true, probs, len(classes))
    indices = np.arange(len(classes))
    predicted = p.argmax(axis=1)
    matrix = skm.confusion_matrix(y, predicted, labels=indices)
    all_present = np.unique(y).size == len(classes)
    per_class = {}
    for c, name in enumerate(classes):
        truth = y == c
        tp = int(matrix[c, c])
        fn = int(matrix[c].sum()) - tp
        fp = int(matrix[:, c].sum()) - tp
        tn = int(y.size) - tp - fn - fp
        per_class[name] = {
            "roc_auc": _float_or_none(skm.roc_auc_score(truth, p[:, c])) if 0 < truth.sum() < y.size else None,
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "precision": _ratio(tp, tp + fp),
            "n": int(truth.sum()),
        }
    # sklearn's one-vs-rest needs rows that sum to 1; renormalise away float32 rounding.
    rows = p / np.clip(p.sum(axis=1, keepdims=True), 1e-12, None)
    macro_auc = (_float_or_none(skm.roc_auc_score(y, rows, multi_class="ovr", average="macro", labels=indices))
                 if all_present else None)
    # The last two classes (BACTERIA, VIRUS) among the images that truly are one of them.
    first, second = len(classes) - 2, len(classes) - 1
    pair = (y == first) | (y == second)
    called_second = p[pair, second] > p[pair, first]
    is_second = y[pair] == second
    n_second, n_first = int(is_second.sum()), int((~is_second).sum())
    bacterial_vs_viral = {
        "n": int(pair.sum()),
        "accuracy": _ratio(int((called_second == is_second).sum()), int(pair.sum())),
        "sensitivity": _ratio(int((called_second & is_second).sum()), n_second),
        "specificity": _ratio(int((~called_second & ~is_second).sum()), n_first),
    }
    return {
        "task": "subtype",
        "classes": list(classes),
        "n": int(y.size),
        "accuracy": float(skm.accuracy_score(y, predicted)),
        "roc_auc": macro_auc,
        "per_class": per_class,
        "confusion_matrix": matrix.astype(int).tolist(),
        "pneumonia_vs_normal": binary_metrics((y != 0).astype(int), np.clip(1.0 - p[:, 0], 0.0, 1.0), 0.5),
        "bacterial_vs_viral": bacterial_vs_viral,
        "calibration": {name: calibration_bins((y == c).astype(int), p[:, c]) for c, name in enumerate(classes)},
    }


# -- a change of prevalence (Saerens, Latinne and Decaestecker 2002) -------------------------------

def _odds(p: float) -> float:
    p = min(max(float(p), 1e-12), 1 - 1e-12)
    return p / (1.0 - p)


def shift_probabilities(prob: ArrayLike, train_prior: float, new_prior: float) -> np.ndarray:
    """Posteriors re-weighted from the prevalence the model learnt (``train_prior``) to ``new_prior``:
    p' = r1 p / (r1 p + r0 (1 - p)) with r1 = new/old positive rate and r0 the same for negatives."""
    p = np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0)
    r1 = float(new_prior) / float(train_prior)
    r0 = (1.0 - float(new_prior)) / (1.0 - float(train_prior))
    num = r1 * p
    den = num + r0 * (1.0 - p)
    return np.divide(num, den, out=np.full_like(p, float(new_prior)), where=den > 0)


def estimate_prior_em(prob: ArrayLike, train_prior: float, max_iter: int = 500, tol: float = 1e-8) -> float:
    """The positive rate of a new, unlabeled set of images, by EM on the model's posteriors.

    Args:
        prob: the model's probabilities of PNEUMONIA on the new images.
        train_prior: the positive rate the probabilities are calibrated to (the validation part's).
        max_iter: EM steps at most.
        tol: stop when the estimate moves less than this.

    Returns:
        The estimated positive rate in (0, 1). It is only as good as the model's calibration on the
        new images: over-confident probabilities move it too far.
    """
    p = np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0)
    if p.size == 0:
        raise CxrError("There are no probabilities to estimate a prevalence from.")
    if not 0.0 < float(train_prior) < 1.0:
        raise CxrError(f"The training prevalence must be between 0 and 1; got {train_prior}.")
    prior = float(train_prior)
    for _ in range(max_iter):
        updated = float(np.clip(shift_probabilities(p, train_prior, prior).mean(), 1e-6, 1 - 1e-6))
        if abs(updated - prior) < tol:
            prior = updated
            break
        prior = updated
    return prior


def threshold_for_prior(threshold: float, train_prior: float, new_prior: float) -> float:
    """The threshold on the model's own probabilities that makes the same decisions as
    ``threshold`` applied to probabilities shifted to ``new_prior``."""
    if threshold <= 0.0 or threshold >= 1.0:
        return float(threshold)
    factor = (_odds(train_prior) / _odds(new_prior))
    odds = _odds(threshold) * factor
    return float(odds / (1.0 + odds))


# --- How much to trust a figure: intervals of the rates ------------------------------------------
#: The "few test images" rule: a 95 % interval of sensitivity or specificity wider than ± this.
#: With a rate near 0.9 that is fewer than about 35 images of the smaller class; near 0.5, about 95.
WIDE_INTERVAL = 0.10


def proportion_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion ``successes / n`` (``None`` when ``n`` is 0).

    Wilson rather than the normal approximation: it stays inside [0, 1] and is honest at rates of
    0 or 1 and for small ``n``.
    """
    from scipy.stats import binomtest  # noqa: PLC0415 (only the Evaluation page needs it)

    if int(n) <= 0:
        return None
    found = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(found.low), float(found.high)


def rate_intervals(metrics: dict, confidence: float = 0.95) -> dict[str, tuple[float, float]]:
    """Intervals of sensitivity and specificity from the confusion matrix of ``binary_metrics``
    (a rate whose class is absent has none)."""
    matrix = metrics.get("confusion_matrix") if metrics else None
    if not matrix:
        return {}
    (tn, fp), (fn, tp) = matrix
    found = {}
    for name, hits, n in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp)):
        interval = proportion_interval(hits, n, confidence)
        if interval is not None:
            found[name] = interval
    return found


#: The figures ``bootstrap_intervals`` gives an interval of, in the order they are shown.
BOOTSTRAP_METRICS = ("roc_auc", "accuracy", "sensitivity", "specificity")


def _resample_weights(rng: np.random.Generator, codes: np.ndarray, n_groups: int, n_draws: int) -> np.ndarray:
    """How many times each image is drawn in each of ``n_draws`` resamples (rows): ``n_groups`` groups drawn
    with replacement, every image of a drawn group coming with it."""
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_draws)
    return counts[:, codes].astype(np.float64)


def _weighted_figures(w: np.ndarray, y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """The four figures of each resample (a row of image weights ``w``); NaN where undefined (one class)."""
    pos = (y == 1).astype(np.float64)
    called = (p >= threshold).astype(np.float64)
    w_pos = w @ pos
    w_neg = w.sum(axis=1) - w_pos
    right = called * pos + (1.0 - called) * (1.0 - pos)
    # AUC with weights: each positive counts the negative weight scored below it, ties as halves.
    order = np.argsort(p, kind="stable")
    p_sorted, neg_sorted, pos_sorted = p[order], 1.0 - pos[order], pos[order]
    w_sorted = w[:, order]
    below_neg = np.zeros((w.shape[0], p.size + 1))
    np.cumsum(w_sorted * neg_sorted, axis=1, out=below_neg[:, 1:])
    start = np.searchsorted(p_sorted, p_sorted, side="left")
    end = np.searchsorted(p_sorted, p_sorted, side="right")
    beaten = below_neg[:, start] + 0.5 * (below_neg[:, end] - below_neg[:, start])
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = ((w_sorted * pos_sorted) * beaten).sum(axis=1) / (w_pos * w_neg)
        return {
            "roc_auc": np.where((w_pos > 0) & (w_neg > 0), auc, np.nan),
            "accuracy": (w @ right) / w.sum(axis=1),
            "sensitivity": np.where(w_pos > 0, (w @ (called * pos)) / w_pos, np.nan),
            "specificity": np.where(w_neg > 0, (w @ ((1.0 - called) * (1.0 - pos))) / w_neg, np.nan),
        }


def bootstrap_intervals(y_true: ArrayLike, prob: ArrayLike, threshold: float, groups: ArrayLike | None = None,
                        n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[str, list | None]:
    """Percentile bootstrap intervals of ROC AUC, accuracy, sensitivity and specificity at ``threshold``.

    Args:
        y_true: labels, 0 or 1.
        prob: probability of class 1.
        threshold: a case is positive when ``prob >= threshold``.
        groups: one key per image (a patient); whole groups are resampled, so the images of one child
            move together and do not count as independent evidence. ``None``: images are resampled.
            A missing key (None / NaN) makes the image a group of its own.
        n_boot: resamples per figure.
        seed: the random seed; the same seed gives the same intervals.
        confidence: the interval's coverage, in (0, 1).

    Returns:
        {"roc_auc": [low, high], "accuracy": ..., "sensitivity": ..., "specificity": ...}. A resample
        with one class only says nothing about AUC (nor one without positives about sensitivity, nor one
        without negatives about specificity): it is skipped for that figure and more are drawn, up to
        ten times ``n_boot`` in all, so that skipping does not leave fewer resamples than asked for
        where it can be helped. A figure that cannot be computed (its class absent) is ``None``.

    Raises:
        CxrError: on invalid input, groups of another length, ``n_boot`` below 1 or a bad confidence.
    """
    y, p = _check(y_true, prob)
    n_boot = int(n_boot)
    if n_boot < 1:
        raise CxrError(f"The number of bootstrap resamples must be at least 1; got {n_boot}.")
    if not 0.0 < float(confidence) < 1.0:
        raise CxrError(f"The confidence must be between 0 and 1; got {confidence}.")
    if groups is None:
        codes = np.arange(y.size)
    else:
        keys = pd.Series(np.asarray(groups, dtype=object).reshape(-1))
        if keys.size != y.size:
            raise CxrError(f"There are {y.size} labels but {keys.size} group keys; they must match one to one.")
        codes, uniques = pd.factorize(keys)
        missing = codes < 0
        codes[missing] = len(uniques) + np.arange(int(missing.sum()))
    n_groups = int(codes.max()) + 1
    possible = {"roc_auc": 0 < y.sum() < y.size, "accuracy": True,
                "sensitivity": bool(y.sum() > 0), "specificity": bool(y.sum() < y.size)}
    found: dict[str, list[np.ndarray]] = {name: [] for name in BOOTSTRAP_METRICS}
    have = dict.fromkeys(BOOTSTRAP_METRICS, 0)
    rng = np.random.default_rng(seed)
    # Memory: a batch holds one weight per image per resample.
    batch = max(1, min(n_boot, 2_000_000 // max(y.size, 1)))
    drawn = 0
    while drawn < 10 * n_boot and any(have[m] < n_boot for m in BOOTSTRAP_METRICS if possible[m]):
        size = min(batch, 10 * n_boot - drawn)
        figures = _weighted_figures(_resample_weights(rng, codes, n_groups, size), y, p, float(threshold))
        drawn += size
        for name, values in figures.items():
            values = values[np.isfinite(values)]
            found[name].append(values)
            have[name] += values.size
    tail = (1.0 - float(confidence)) / 2.0
    intervals: dict[str, list | None] = {}
    for name in BOOTSTRAP_METRICS:
        values = np.concatenate(found[name])[:n_boot] if found[name] else np.empty(0)
        if not possible[name] or values.size == 0:
            intervals[name] = None
            continue
        low, high = np.quantile(values, [tail, 1.0 - tail])
        intervals[name] = [float(low), float(high)]
    return intervals


def _delong_components(pos: np.ndarray, neg: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's structural components of one classifier (midranks, Sun & Xu 2014)."""
    from scipy.stats import rankdata  # noqa: PLC0415 (scipy comes with scikit-learn; only comparisons need it)

    m, n = len(pos), len(neg)
    combined = rankdata(np.concatenate([pos, neg]))
    pos_ranks = combined[:m]
    auc = (pos_ranks.sum() - m * (m + 1) / 2.0) / (m * n)
    v10 = (pos_ranks - rankdata(pos)) / n        # per positive: share of negatives it beats
    v01 = 1.0 - (combined[m:] - rankdata(neg)) / m  # per negative: share of positives that beat it
    return float(auc), v10, v01


def paired_comparison(y_true: ArrayLike, prob_a: ArrayLike, prob_b: ArrayLike, threshold_a: float = 0.5,
                      threshold_b: float = 0.5, confidence: float = 0.95) -> dict[str, Any]:
    """Are two models' figures on the same images different beyond chance?

    The ROC AUCs are compared with DeLong's test for two correlated ROC curves (DeLong et al. 1988),
    which uses that both models scored the same images; the accuracies at each model's threshold with
    McNemar's exact test on the images exactly one of them gets right.

    Returns:
        n; auc_a, auc_b, auc_difference (a - b), auc_interval (its ``confidence`` interval) and
        auc_p_value; accuracy_a, accuracy_b, only_a_right, only_b_right and accuracy_p_value;
        ``different``: True when either p-value is below 1 - ``confidence``. AUC entries are None
        when the images hold one class.
    """
    from scipy.stats import binomtest, norm  # noqa: PLC0415

    y, p_a = _check(y_true, prob_a)
    _, p_b = _check(y_true, prob_b)
    if p_a.shape != p_b.shape:
        raise CxrError("Two models are compared on the same images: give both probabilities for every image.")
    out: dict[str, Any] = {"n": int(y.size)}
    alpha = 1.0 - float(confidence)
    pos, neg = y == 1, y == 0
    if pos.sum() >= 2 and neg.sum() >= 2:
        auc_a, v10_a, v01_a = _delong_components(p_a[pos], p_a[neg])
        auc_b, v10_b, v01_b = _delong_components(p_b[pos], p_b[neg])
        s10, s01 = np.cov(np.vstack([v10_a, v10_b])), np.cov(np.vstack([v01_a, v01_b]))
        cov = s10 / pos.sum() + s01 / neg.sum()
        variance = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
        difference = auc_a - auc_b
        if variance <= 1e-15:  # the same ranking: no difference, and no doubt about it
            p_value, half = (1.0 if abs(difference) < 1e-12 else 0.0), 0.0
        else:
            se = variance ** 0.5
            p_value = float(2.0 * norm.sf(abs(difference) / se))
            half = float(norm.ppf(1.0 - alpha / 2.0) * se)
        out.update(auc_a=auc_a, auc_b=auc_b, auc_difference=difference,
                   auc_interval=[difference - half, difference + half], auc_p_value=p_value)
    else:
        out.update(auc_a=None, auc_b=None, auc_difference=None, auc_interval=None, auc_p_value=None)
    right_a = (p_a >= float(threshold_a)) == (y == 1)
    right_b = (p_b >= float(threshold_b)) == (y == 1)
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    accuracy_p = float(binomtest(only_a, only_a + only_b).pvalue) if only_a + only_b else 1.0
    out.update(accuracy_a=float(right_a.mean()), accuracy_b=float(right_b.mean()), only_a_right=only_a,
               only_b_right=only_b, accuracy_p_value=accuracy_p)
    out["different"] = bool((out["auc_p_value"] is not None and out["auc_p_value"] < alpha) or accuracy_p < alpha)
    return out


def intervals_are_wide(intervals: dict[str, tuple[float, float]], limit: float = WIDE_INTERVAL) -> bool:
    """True when any interval is wider than ± ``limit``: the test set is too small to tell apart
    models whose rates differ by that much."""
    return any((high - low) / 2 > limit for low, high in intervals.values())


# --- Reading the training curves -----------------------------------------------------------------
#: Overfitting: validation loss rose at each of at least this many consecutive last epochs while
#: training loss fell over the same epochs.
OVERFIT_EPOCHS = 2
#: Overfitting too: the last epoch's training AUC above its validation AUC by more than this.
AUC_GAP = 0.10
#: Learned nothing: validation AUC within this distance of 0.5 at every epoch.
CHANCE_BAND = 0.05


@dataclass(frozen=True)
class FitDiagnosis:
    """What the training curves say: ``kind`` is overfitting, gap, chance (warnings), or fine,
    too_short, no_validation; ``message`` is one sentence for a person."""

    kind: str
    message: str

    @property
    def is_warning(self) -> bool:
        return self.kind in ("overfitting", "gap", "chance")


def _column(frame: pd.DataFrame, name: str) -> np.ndarray:
    if name not in frame.columns:
        return np.full(len(frame), np.nan)
    return pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)


def fit_diagnosis(history: pd.DataFrame) -> FitDiagnosis:
    """Over- or underfitting, computed from the per-epoch history (``history.csv``).

    The rules, in order: validation AUC within ``CHANCE_BAND`` of 0.5 at every epoch (chance);
    validation loss rising at each of the last ``OVERFIT_EPOCHS`` or more epochs of the last phase
    while training loss fell over them (overfitting); the last training AUC above validation by
    more than ``AUC_GAP`` (gap). Otherwise fine, or too_short with fewer than
    ``OVERFIT_EPOCHS + 1`` epochs in the last phase. The trend rule looks at the last phase only:
    fine-tuning starts a new optimiser, so the losses jump at the boundary.
    """
    frame = history.reset_index(drop=True) if history is not None else pd.DataFrame()
    val_loss_all = _column(frame, "val_loss")
    if not len(frame) or not np.isfinite(val_loss_all).any():
        return FitDiagnosis("no_validation", "There are no validation figures yet, so over- and underfitting "
                                             "cannot be judged.")
    val_auc = _column(frame, "val_auc")
    known = val_auc[np.isfinite(val_auc)]
    if len(known) >= 2 and np.all(np.abs(known - 0.5) <= CHANCE_BAND):
        return FitDiagnosis("chance", f"Validation AUC has stayed within {CHANCE_BAND:.2f} of 0.5 at every epoch: "
                                      "the model separates the classes no better than chance (pretrained weights, "
                                      "a higher learning rate or more epochs help).")
    if "phase" in frame.columns:
        frame = frame[frame["phase"] == frame["phase"].iloc[-1]].reset_index(drop=True)
    loss, val_loss = _column(frame, "loss"), _column(frame, "val_loss")
    rising = 0
    for i in range(len(val_loss) - 1, 0, -1):
        if not (np.isfinite(val_loss[i]) and np.isfinite(val_loss[i - 1]) and val_loss[i] > val_loss[i - 1]):
            break
        rising += 1
    if rising >= OVERFIT_EPOCHS and np.isfinite(loss[-1]) and loss[-1] < loss[-1 - rising]:
        return FitDiagnosis("overfitting", f"Validation loss has risen for the last {rising} epochs while training "
                                           "loss kept falling: the model is starting to overfit (more dropout or "
                                           "augmentation, or fewer epochs, help).")
    auc, last_val_auc = _column(frame, "auc"), _column(frame, "val_auc")
    if np.isfinite(auc[-1]) and np.isfinite(last_val_auc[-1]) and auc[-1] - last_val_auc[-1] > AUC_GAP:
        return FitDiagnosis("gap", f"Training AUC {auc[-1]:.2f} against validation {last_val_auc[-1]:.2f}: the model "
                                   "fits its training images much better than new ones (overfitting).")
    if len(frame) < OVERFIT_EPOCHS + 1:
        return FitDiagnosis("too_short", "Too few epochs to judge yet: overfitting shows as validation loss rising "
                                         "while training loss falls.")
    if np.isfinite(loss[-1]) and np.isfinite(val_loss[-1]) and val_loss[-1] <= loss[-1]:
        return FitDiagnosis("fine", "Validation does as well as training or better (dropout and augmentation act "
                                    "only while training): no sign of overfitting.")
    return FitDiagnosis("fine", "Validation follows training: no sign of overfitting (validation loss is not "
                                "rising while training loss falls).")
