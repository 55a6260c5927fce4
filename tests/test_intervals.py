"""Bootstrap intervals of the headline figures (``metrics.bootstrap_intervals``) and how a stored
evaluation reads them back (``records.Evaluation.intervals``)."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr_core.core.errors import CxrError
from cxr_core.core.metrics import BOOTSTRAP_METRICS, _weighted_figures, binary_metrics, bootstrap_intervals
from cxr_core.runs.records import Evaluation


def scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and overlapping probabilities of a middling classifier (AUC about 0.8)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(0.35 * y + 0.65 * rng.random(n), 0.0, 1.0)


def width(interval: list[float]) -> float:
    return interval[1] - interval[0]


def test_every_interval_holds_its_point_estimate():
    y, p = scores(400, seed=1)
    point = binary_metrics(y, p, threshold=0.5)
    found = bootstrap_intervals(y, p, 0.5)
    assert list(found) == list(BOOTSTRAP_METRICS)
    for name in BOOTSTRAP_METRICS:
        low, high = found[name]
        assert 0.0 <= low < point[name] < high <= 1.0, name


def test_more_images_give_narrower_intervals():
    small = bootstrap_intervals(*scores(100, seed=2), 0.5)
    large = bootstrap_intervals(*scores(2000, seed=2), 0.5)
    for name in BOOTSTRAP_METRICS:
        # Width shrinks like 1 / sqrt(n): twenty times the images, about a quarter of the width.
        assert width(large[name]) < 0.5 * width(small[name]), name


def test_resampling_patients_widens_the_interval_when_one_childs_images_agree():
    # 40 children with 10 films each; a child's films share the label and almost the same score, so
    # there are 40 pieces of evidence, not 400.
    rng = np.random.default_rng(3)
    child_y = rng.integers(0, 2, 40)
    child_p = np.clip(0.3 * child_y + 0.7 * rng.random(40), 0.0, 1.0)
    patients = np.repeat([f"person{i}" for i in range(40)], 10)
    y = np.repeat(child_y, 10)
    p = np.clip(np.repeat(child_p, 10) + rng.normal(0.0, 0.01, 400), 0.0, 1.0)
    by_image = bootstrap_intervals(y, p, 0.5)
    by_patient = bootstrap_intervals(y, p, 0.5, groups=patients)
    for name in BOOTSTRAP_METRICS:
        assert width(by_patient[name]) > 2.0 * width(by_image[name]), name


def test_the_same_seed_gives_the_same_intervals():
    y, p = scores(300, seed=4)
    groups = np.arange(300) // 3
    first = bootstrap_intervals(y, p, 0.4, groups=groups, seed=7)
    assert bootstrap_intervals(y, p, 0.4, groups=groups, seed=7) == first
    assert bootstrap_intervals(y, p, 0.4, groups=groups, seed=8) != first


def test_resamples_without_both_classes_are_skipped_not_counted():
    # One pneumonia among 20 images, scored highest and called positive: about a third of resamples miss
    # it. Every resample that holds it has AUC 1 and sensitivity 1; a skipped resample counted as 0 (or
    # left as a gap) would pull the interval below 1.
    y = np.array([1] + [0] * 19)
    p = np.concatenate([[0.9], np.linspace(0.4, 0.0, 19)])
    found = bootstrap_intervals(y, p, 0.5, n_boot=200)
    assert found["roc_auc"] == [1.0, 1.0] and found["sensitivity"] == [1.0, 1.0]
    assert found["specificity"] == [1.0, 1.0]
    # One class only: no AUC and no sensitivity at all, the rest still computed.
    none_sick = bootstrap_intervals(np.zeros(10), np.linspace(0.1, 0.6, 10), 0.5)
    assert none_sick["roc_auc"] is None and none_sick["sensitivity"] is None
    assert none_sick["specificity"] is not None and none_sick["accuracy"] is not None


def test_one_patient_has_no_spread():
    y, p = scores(30, seed=5)
    point = binary_metrics(y, p, 0.5)
    found = bootstrap_intervals(y, p, 0.5, groups=["person1"] * 30)
    for name in BOOTSTRAP_METRICS:
        assert found[name] == pytest.approx([point[name], point[name]]), name


def test_weighted_auc_is_the_auc_of_the_resample_with_its_repeats_and_ties():
    y, p = scores(200, seed=6)
    p = np.round(p, 1)  # many ties
    rng = np.random.default_rng(0)
    weights = rng.multinomial(200, np.full(200, 1 / 200), size=5).astype(float)
    auc = _weighted_figures(weights, y, p, 0.5)["roc_auc"]
    for row, found in zip(weights, auc):
        drawn = np.repeat(np.arange(200), row.astype(int))
        assert found == pytest.approx(roc_auc_score(y[drawn], p[drawn]))


def test_bad_input_is_one_sentence():
    y, p = scores(10, seed=7)
    with pytest.raises(CxrError, match="group keys"):
        bootstrap_intervals(y, p, 0.5, groups=[1, 2])
    with pytest.raises(CxrError, match="resamples"):
        bootstrap_intervals(y, p, 0.5, n_boot=0)


def test_a_stored_evaluation_reads_all_four_intervals_and_the_old_layout():
    stored = {"task": "pneumonia", "n": 10, "confusion_matrix": [[4, 1], [1, 4]], "intervals_by": "patient",
              "intervals": {"roc_auc": [0.7, 0.9], "accuracy": [0.6, 0.9], "sensitivity": [0.5, 0.95],
                            "specificity": None}}
    found = Evaluation.from_dict("site", stored)
    assert found.intervals == {"roc_auc": (0.7, 0.9), "accuracy": (0.6, 0.9), "sensitivity": (0.5, 0.95)}
    assert found.intervals_by == "patient"
    old = Evaluation.from_dict("site", {**stored, "intervals": {"sensitivity": [0.5, 0.9]}, "intervals_by": None})
    assert old.intervals == {"sensitivity": (0.5, 0.9)} and old.intervals_by is None
    # None stored: Wilson intervals of sensitivity and specificity from the confusion matrix.
    bare = Evaluation.from_dict("site", {k: v for k, v in stored.items() if not k.startswith("intervals")})
    assert set(bare.intervals) == {"sensitivity", "specificity"} and bare.intervals_by is None
