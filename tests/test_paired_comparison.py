"""Two runs on the same images: DeLong's test for their AUCs and McNemar's for their accuracies."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr_core.core.errors import CxrError
from cxr_core.core.metrics import paired_comparison


def _scores(n: int = 300, seed: int = 0, separation_a: float = 1.5, separation_b: float = 1.2):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(int)
    shared = rng.normal(0, 1, n)  # both models see the same hard images: their errors are correlated
    a = 1 / (1 + np.exp(-(separation_a * (2 * y - 1) + shared + rng.normal(0, 0.7, n))))
    b = 1 / (1 + np.exp(-(separation_b * (2 * y - 1) + shared + rng.normal(0, 0.7, n))))
    return y, a, b


def test_aucs_are_sklearns_and_a_monotone_copy_cannot_be_told_apart() -> None:
    y, a, b = _scores()
    found = paired_comparison(y, a, b)
    assert found["auc_a"] == pytest.approx(roc_auc_score(y, a)) and found["auc_b"] == pytest.approx(roc_auc_score(y, b))
    same = paired_comparison(y, a, a ** 3)  # the same ranking, other probabilities
    assert same["auc_difference"] == pytest.approx(0.0) and same["auc_p_value"] == 1.0
    assert paired_comparison(y, a, a)["different"] is False


@pytest.mark.slow
def test_delong_standard_error_matches_a_paired_bootstrap() -> None:
    y, a, b = _scores(400, seed=2)
    found = paired_comparison(y, a, b)
    half = (found["auc_interval"][1] - found["auc_interval"][0]) / 2
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(600):
        i = rng.integers(0, len(y), len(y))
        if y[i].min() == y[i].max():
            continue
        diffs.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    assert half / 1.96 == pytest.approx(np.std(diffs), rel=0.2)
    assert found["auc_interval"][0] < found["auc_difference"] < found["auc_interval"][1]


def test_a_clear_difference_is_found_and_a_small_one_on_few_images_is_not() -> None:
    y, a, b = _scores(500, seed=3, separation_a=2.0, separation_b=0.3)
    clear = paired_comparison(y, a, b)
    assert clear["auc_p_value"] < 1e-4 and clear["different"]
    y, a, b = _scores(60, seed=4, separation_a=1.5, separation_b=1.45)
    close = paired_comparison(y, a, b)
    assert close["auc_p_value"] > 0.05


def test_mcnemar_counts_the_images_only_one_model_gets_right() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    a = np.array([0.9, 0.8, 0.2, 0.1, 0.6, 0.3, 0.7, 0.4])
    b = np.array([0.9, 0.3, 0.8, 0.1, 0.2, 0.3, 0.2, 0.9])
    found = paired_comparison(y, a, b, 0.5, 0.5)
    right_a = (a >= 0.5) == (y == 1)
    right_b = (b >= 0.5) == (y == 1)
    assert found["only_a_right"] == int((right_a & ~right_b).sum())
    assert found["only_b_right"] == int((right_b & ~right_a).sum())
    assert found["accuracy_a"] == pytest.approx(right_a.mean())
    # Each model's own threshold decides its calls.
    assert paired_comparison(y, a, b, 0.5, 0.95)["accuracy_b"] == pytest.approx(np.mean(y == 0))
    with pytest.raises(CxrError):
        paired_comparison(y, a, b[:-1])
    one_class = paired_comparison(np.ones(5), np.linspace(0.1, 0.9, 5), np.linspace(0.2, 0.8, 5))
    assert one_class["auc_p_value"] is None and one_class["n"] == 5


def test_two_runs_evaluated_on_one_data_set_are_compared_image_by_image(tmp_path) -> None:
    import pandas as pd

    from cxr_core.evaluation.paired import shared_evaluations, verdict
    from cxr_core.runs.run_folder import RunFolder

    y, a, b = _scores(120, seed=5)
    names = [f"{'PNEUMONIA' if label else 'NORMAL'}/im{i}.jpeg" for i, label in enumerate(y)]
    for run, prob, root in (("a", a, "/data/test-set"), ("b", b, "../other/place/test-set")):
        folder = RunFolder(tmp_path / run)
        folder.path.mkdir()
        frame = pd.DataFrame({"path": [f"{root}/{n}" for n in names], "y": y, "probability": prob})
        # The second run scored the images in another order: they are matched by their place in the data set.
        folder.write_evaluation("test-set", {"task": "pneumonia", "threshold": 0.5, "n": len(y)},
                                frame if run == "a" else frame.iloc[::-1])
        folder.write_evaluation("only-" + run, {"task": "pneumonia", "threshold": 0.5}, frame)
    (found,) = shared_evaluations(tmp_path / "a", tmp_path / "b")
    expected = paired_comparison(y, a, b, 0.5, 0.5)
    assert found["name"] == "test-set" and found["n"] == len(y)
    assert found["auc_p_value"] == pytest.approx(expected["auc_p_value"])
    sentence = verdict(found)
    assert sentence.startswith(f"On the {len(y)} images of test-set both runs scored") and "DeLong p" in sentence
    assert ("beyond chance" in sentence) == (found["auc_p_value"] < 0.05)
