"""The demo run shipped in artifacts/: complete, small, free of pretrained weights, and working."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_core.core.config import RunConfig
from cxr_core.runs import registry as runs, run_folder
from cxr_core.runs.run_folder import RunFolder

DEMO = runs.DEMO_RUN_DIR


@pytest.fixture
def demo():
    if not (DEMO / run_folder.MODEL_FILE).is_file():
        pytest.skip("no demo run in artifacts/")
    return DEMO


def test_demo_run_is_complete_small_and_trained_from_scratch(demo):
    assert runs.read_status(demo)["state"] == "done"
    for name in ("config.json", "metrics.json", "history.csv", "split.csv", "predictions.csv", "MODEL_CARD.md"):
        assert (demo / name).is_file(), name
    assert (demo / run_folder.MODEL_FILE).stat().st_size < 10 * 1024 * 1024
    config = RunConfig.from_dict(json.loads((demo / "config.json").read_text()))
    # No pretrained file may be embedded in a committed model.
    assert config.model.weights == "none"
    assert config.data.split == "patient"
    metrics = RunFolder(demo).read_metrics()
    card = (demo / "MODEL_CARD.md").read_text()
    auc = metrics["test"]["at_threshold"]["roc_auc"]
    assert f"{auc:.3f}" in card, "the model card quotes the test AUC in metrics.json"
    assert "not a medical device" in card.lower()


def test_demo_run_predicts_and_explains(demo):
    from cxr_core.inference.predictor import Predictor

    predictor = Predictor.from_run(demo)
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (300, 260), dtype=np.uint8)
    (found,) = predictor.explain([gray])
    probability, heatmap = found.probability, found.heatmap
    assert probability == pytest.approx(predictor.predict([gray])[0].probability, abs=1e-6)
    assert heatmap.shape == gray.shape and 0.0 <= heatmap.min() <= heatmap.max() <= 1.0
    np.testing.assert_allclose(heatmap, predictor.explain([gray])[0].heatmap, atol=1e-5)


def test_demo_run_separates_real_images(demo, shared_dir):
    from cxr_core.inference.predictor import Predictor

    predictor = Predictor.from_run(demo)
    folder = shared_dir / "data" / "kermany-originals-sample"
    files = sorted(folder.glob("*/*.jpeg"))
    if not files:
        pytest.skip("no originals sample")
    results = predictor.predict_files([str(f) for f in files])
    correct = sum(r["label"] == f.parent.name for r, f in zip(results, files))
    assert correct >= 0.8 * len(files)


@pytest.mark.slow
def test_demo_run_ships_a_current_litert_export(demo):
    from cxr_core.engine import litert
    from cxr_core.inference.predictor import Predictor

    if not litert.runtime_available():
        pytest.skip("ai-edge-litert is not installed")
    # The app predicts with this file, without TensorFlow; it must be the export of this model.keras.
    assert litert.lite_status(demo) is None
    lite = Predictor.from_run(demo)
    keras_ = Predictor.from_run(demo, engine="keras")
    assert lite.engine.name == "LiteRT"
    rng = np.random.default_rng(1)
    grays = [rng.integers(0, 255, (200 + 10 * i, 180), dtype=np.uint8) for i in range(4)]
    found_lite, found_keras = lite.explain(grays), keras_.explain(grays)
    p_lite, maps_lite = np.array([e.probability for e in found_lite]), [e.heatmap for e in found_lite]
    p_keras, maps_keras = np.array([e.probability for e in found_keras]), [e.heatmap for e in found_keras]
    np.testing.assert_allclose(p_lite, p_keras, atol=1e-5)
    for a, b in zip(maps_lite, maps_keras):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_demo_run_leads_with_its_score_on_an_external_test_set(demo):
    folder = RunFolder(demo)
    external = folder.external_evaluations()
    assert external, "the demo ships its evaluation on a test set from outside its training data"
    name, result = next(iter(external.items()))
    assert result["overlap"]["train"] == 0 and result["n"] > 0
    card = (demo / "MODEL_CARD.md").read_text()
    internal = folder.read_metrics()["test"]["at_threshold"]["roc_auc"]
    external_auc = f"{result['roc_auc']:.3f}"
    # The honest figure is quoted, and before the optimistic one of the run's own split.
    assert external_auc in card and name in card
    assert card.index(external_auc) < card.index(f"{internal:.3f}")
