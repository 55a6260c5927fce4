"""Calibrated probabilities: a predicted 80 % should mean pneumonia four times out of five.

A network trained with class weights, label smoothing or heavy augmentation ranks images well but
its probabilities are off: class weights pull them towards 50 %, label smoothing keeps them away
from 0 and 1. A ``Calibration`` is a monotone map of the network's logit, fitted on the validation
part after training and stored with the run (``metrics.json``, ``calibration``); both engines apply
it through the Predictor, so every probability a person sees is the calibrated one.

- ``temperature`` (Guo et al. 2017), the default: every logit divided by one temperature
  (``slope = 1 / T``). It fixes how sure the network is and nothing else: the prior the run was
  trained for (balanced, with class weights) stays, and of a softmax the most probable class never
  changes.
- ``platt`` (Platt 1999), for a sigmoid head: ``logit' = slope * logit + intercept``, fitted by
  maximum likelihood with Platt's smoothed targets, so an almost separable validation part cannot
  push the slope to infinity. Its intercept learns the validation part's prevalence (73 %
  pneumonia in the Kermany training images) and puts it into every probability; on the official
  test set (63 %) that made the shipped demo's calibration worse, not better (benchmarks/ACCURACY.md).

Both keep the order of the images, so the ROC curve and its AUC do not move, and a threshold moved
through the same map makes exactly the same calls. ``expected_calibration_error`` is the figure
that says how far off the probabilities are (Naeini et al. 2015; 10 equal-width bins).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from cxr_core.core.config import CALIBRATIONS
from cxr_core.core.errors import CxrError
from cxr_core.core.metrics import calibration_bins

METHODS = CALIBRATIONS
_EPS = 1e-12


def logit(prob: ArrayLike) -> np.ndarray:
    p = np.clip(np.asarray(prob, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def sigmoid(z: ArrayLike) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


@dataclass(frozen=True)
class Calibration:
    """A fitted map of the logit (``none``: the identity).

    Attributes:
        method: ``platt``, ``temperature`` or ``none``.
        slope: multiplies the logit (``1 / T`` for temperature scaling).
        intercept: added to a sigmoid head's logit (0 for temperature scaling).
        n: validation images it was fitted on (0 for ``none``).
    """

    method: str = "none"
    slope: float = 1.0
    intercept: float = 0.0
    n: int = 0

    @property
    def active(self) -> bool:
        return self.method != "none"

    def logits(self, z: ArrayLike) -> np.ndarray:
        """Calibrated logits: a sigmoid head's single logit, or a softmax head's row of logits."""
        z = np.asarray(z, dtype=np.float64)
        if not self.active:
            return z
        return self.slope * z + (self.intercept if z.ndim < 2 or z.shape[-1] == 1 else 0.0)

    def probability(self, prob: ArrayLike) -> np.ndarray:
        """P(disease) of a sigmoid head, calibrated."""
        return sigmoid(self.logits(logit(prob))) if self.active else np.asarray(prob, dtype=np.float64)

    def uncalibrated(self, prob: ArrayLike) -> np.ndarray:
        """The inverse of ``probability``: what the network itself said."""
        if not self.active:
            return np.asarray(prob, dtype=np.float64)
        return sigmoid((logit(prob) - self.intercept) / self.slope)

    def probabilities(self, probs: ArrayLike) -> np.ndarray:
        """A softmax head's class probabilities (rows), calibrated (temperature on their logarithms)."""
        probs = np.asarray(probs, dtype=np.float64)
        if not self.active:
            return probs
        scaled = self.slope * np.log(np.clip(probs, _EPS, 1.0))
        scaled -= scaled.max(axis=1, keepdims=True)
        out = np.exp(scaled)
        return out / out.sum(axis=1, keepdims=True)

    def threshold(self, threshold: float) -> float:
        """A threshold on uncalibrated probabilities moved so that it makes the same calls."""
        return float(self.probability([threshold])[0])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "Calibration":
        """The stored calibration; the identity when there is none (a run trained before it existed)."""
        if not data or data.get("method", "none") == "none":
            return IDENTITY
        method = str(data["method"])
        slope = float(data.get("slope", 1.0))
        if method not in METHODS or not np.isfinite(slope) or slope <= 0:
            raise CxrError(f"The run's calibration is damaged ({data!r}); delete it from metrics.json.")
        return cls(method, slope, float(data.get("intercept", 0.0)), int(data.get("n", 0)))


IDENTITY = Calibration()


def _minimise(loss, start: np.ndarray) -> np.ndarray:
    from scipy.optimize import minimize  # noqa: PLC0415 (scipy comes with scikit-learn; only fitting needs it)

    found = minimize(loss, start, method="L-BFGS-B")
    return np.asarray(found.x, dtype=np.float64)


def fit_platt(y_true: ArrayLike, prob: ArrayLike) -> Calibration:
    """Platt scaling of a sigmoid head on validation labels and probabilities.

    Targets are Platt's ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)`` rather than 1 and 0, so a
    validation part the model separates perfectly gives a finite slope. The identity when the
    validation part holds one class, or when the fit would reverse the order (a slope <= 0).
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    z = logit(prob).ravel()
    n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
    if len(y) != len(z) or n_pos == 0 or n_neg == 0:
        return IDENTITY
    target = np.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def loss(params: np.ndarray) -> float:
        f = params[0] * z + params[1]
        # log(1 + e^f) - t f, written to stay finite for large |f|
        return float(np.mean(np.logaddexp(0.0, f) - target * f))

    slope, intercept = _minimise(loss, np.array([1.0, 0.0]))
    if not np.isfinite(slope) or slope <= 1e-3:
        return IDENTITY
    return Calibration("platt", float(slope), float(intercept), int(len(y)))


def fit_temperature(y_true: ArrayLike, probs: ArrayLike) -> Calibration:
    """Temperature scaling on validation labels and probabilities: a sigmoid head's P(disease) (1-D,
    labels 0/1) or a softmax head's class probabilities (rows, labels the class indices). The
    identity when the validation part holds one class."""
    y = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:  # one logit: the sigmoid's own log-likelihood
        z = logit(p)
        if len(y) != len(z) or np.unique(y).size < 2:
            return IDENTITY

        def loss(params: np.ndarray) -> float:
            f = np.exp(params[0]) * z
            return float(np.mean(np.logaddexp(0.0, f) - y * f))
    else:
        logp = np.log(np.clip(p, _EPS, 1.0))
        if len(y) == 0 or logp.ndim != 2 or len(logp) != len(y) or np.unique(y).size < 2:
            return IDENTITY

        def loss(params: np.ndarray) -> float:
            scaled = np.exp(params[0]) * logp
            return float(np.mean(np.logaddexp.reduce(scaled, axis=1) - scaled[np.arange(len(y)), y]))

    slope = float(np.exp(_minimise(loss, np.array([0.0]))[0]))
    if not np.isfinite(slope):
        return IDENTITY
    return Calibration("temperature", slope, 0.0, int(len(y)))


def fit_calibration(method: str, y_true: ArrayLike, prob: ArrayLike) -> Calibration:
    """Fit ``method`` (``METHODS``) on validation labels and probabilities (1-D: a sigmoid head's
    P(disease); rows: a softmax head's, which Platt does not apply to, so it gets temperature)."""
    if method not in METHODS:
        raise CxrError(f"The calibration must be one of {', '.join(METHODS)}; got {method!r}.")
    if method == "none":
        return IDENTITY
    if method == "platt" and np.asarray(prob).ndim == 1:
        return fit_platt(y_true, prob)
    return fit_temperature(y_true, prob)


def expected_calibration_error(y_true: ArrayLike, prob: ArrayLike, n_bins: int = 10) -> float | None:
    """Mean gap between predicted probability and observed frequency over equal-width bins, weighted
    by the bin's share of images (binary: the probability of class 1). None without images."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    if len(y) == 0:
        return None
    bins = calibration_bins(y, prob, n_bins)  # the reliability diagram's own bins
    gaps = np.abs(np.subtract(bins["mean_predicted"], bins["fraction_positive"]))
    return float(np.dot(gaps, bins["count"]) / len(y))
