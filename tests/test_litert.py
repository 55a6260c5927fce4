"""LiteRT export: same probabilities and heatmaps as Keras, no TensorFlow when predicting, safe fallbacks."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_WEIGHTS
from cxr_core.core.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from cxr_core.core.errors import BadRunError, CxrError
from cxr_core.engine import litert
from cxr_core.inference.predictor import Predictor
from cxr_core.io import hashing
from cxr_core.io.atomic import write_json_atomic
from cxr_core.runs import registry as runs, run_folder

pytestmark = pytest.mark.skipif(not litert.runtime_available(), reason="ai-edge-litert is not installed")

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64  # 2 x 2 conv maps: the smallest MobileNetV2 map that can vary across the image
MODEL_CFG = ModelConfig(backbone="mobilenet_v2", weights="none", image_size=SIZE, alpha=0.35, dropout=0.5)
# Training refuses a frozen random backbone; the same network from a weights file trains (conftest).
TRAINABLE_CFG = dataclasses.replace(MODEL_CFG, weights=str(TINY_WEIGHTS))
RUN_CFG = RunConfig(model=MODEL_CFG, train=TrainConfig(epochs=1))


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 40 + 7 * (i % 6), 52 - 3 * (i % 6)
        img = rng.normal(120 + 10 * i, 45, (h, w))
        img[:, : w // 3] += 60  # a bright band whose side and width vary: the maps must differ
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory) -> Path:
    """A run folder with a classifier (a head strong enough to vary) and its LiteRT export."""
    from cxr_core.engine.export import export_classifier
    from cxr_core.engine.model import build_classifier, gradcam_parts
    from cxr_core.io.images import to_model_input

    model = build_classifier(MODEL_CFG, seed=11)
    # An untrained deep network's activations shrink to about 1e-11; scale the head so that the
    # logits of different images differ by about one (else every probability is the same).
    parts = gradcam_parts(model)
    batch = np.stack([to_model_input(g, SIZE) for g in _images(5)])
    features = np.asarray(parts.pool(parts.conv_model(parts.preprocess(batch))[1]))
    logit = model.get_layer("logit")
    kernel, bias = logit.get_weights()
    # The activations are all positive; a kernel orthogonal to their mean makes the signed map
    # sum_k w_k A_k take both signs in every image, so both classes' maps have something to show.
    mean = features.mean(axis=0)
    kernel = kernel - np.outer(mean, mean @ kernel) / float(mean @ mean)
    spread = float(np.std(features @ kernel))
    logit.set_weights([kernel / max(spread, 1e-30), bias + 0.3])
    run = tmp_path_factory.mktemp("lite") / "run"
    run.mkdir()
    model.save(run / "model.keras")
    write_json_atomic(run / "config.json", RUN_CFG.to_dict())
    write_json_atomic(run / "metrics.json", {"threshold": 0.4})
    export_classifier(model, run)
    return run


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


@pytest.mark.slow
def test_export_writes_model_and_record_of_its_source(exported_run):
    info = json.loads((exported_run / run_folder.LITE_INFO_FILE).read_text())
    assert info["source_sha256"] == hashing.file_sha256(exported_run / "model.keras")
    assert info["image_size"] == SIZE and info["last_conv_layer"] == "out_relu"
    assert (exported_run / run_folder.LITE_FILE).stat().st_size > 100_000
    assert litert.lite_status(exported_run) is None


@pytest.mark.slow
def test_litert_equals_keras_probabilities_and_gradcam(exported_run):
    lite = Predictor.from_run(exported_run)
    keras_ = Predictor.from_run(exported_run, engine="keras")
    assert (lite.engine.name, keras_.engine.name) == ("LiteRT", "Keras")
    assert getattr(lite.engine, "classifier", None) is None and keras_.engine.classifier is not None
    grays = _images(5)
    found_lite, found_keras = lite.explain(grays), keras_.explain(grays)
    p_lite, maps_lite = np.array([e.probability for e in found_lite]), [e.heatmap for e in found_lite]
    p_keras, maps_keras = np.array([e.probability for e in found_keras]), [e.heatmap for e in found_keras]
    # Probabilities vary across images (so the comparison means something) and agree to float precision.
    assert np.ptp(p_keras) > 1e-3
    np.testing.assert_allclose(p_lite, p_keras, atol=1e-5)
    np.testing.assert_allclose([found.probability for found in lite.predict(grays)], p_keras, atol=1e-5)
    # The exported CAM is Grad-CAM (GAP -> Dense): the normalised heatmaps agree.
    assert any(np.ptp(m) > 0.1 for m in maps_keras)
    for a, b, gray in zip(maps_lite, maps_keras, grays):
        assert a.shape == b.shape == gray.shape
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert found_lite[0].label == found_keras[0].label


@pytest.mark.slow
def test_test_time_augmentation_agrees_on_both_engines(exported_run):
    lite = Predictor.from_run(exported_run, tta=True)
    keras_ = Predictor.from_run(exported_run, engine="keras", tta=True)
    grays = _images(3)
    found_lite, found_keras = lite.explain(grays), keras_.explain(grays)
    np.testing.assert_allclose([e.probability for e in found_lite], [e.probability for e in found_keras], atol=1e-5)
    np.testing.assert_allclose([p.probability for p in lite.predict(grays)], [e.probability for e in found_lite],
                               atol=1e-6)
    for a, b, gray in zip(found_lite, found_keras, grays):
        assert a.heatmap.shape == gray.shape
        np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-4)
    # The views change the answer: the averaged probability is not the single pass's.
    single = [p.probability for p in Predictor.from_run(exported_run).predict(grays)]
    assert not np.allclose(single, [e.probability for e in found_lite], atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["PNEUMONIA", "NORMAL"])
def test_litert_equals_keras_on_both_classes_maps(exported_run, target):
    """The export's second output holds ReLU(S) and ReLU(-S); Keras computes Grad-CAM of the logit and
    of its negation: the same maps, for both classes."""
    lite = Predictor.from_run(exported_run)
    keras_ = Predictor.from_run(exported_run, engine="keras")
    grays = _images(5)
    found_lite, found_keras = lite.explain(grays, target), keras_.explain(grays, target)
    assert any(np.ptp(e.heatmap) > 0.1 for e in found_keras)
    for a, b in zip(found_lite, found_keras):
        assert a.target == b.target == target and a.label == b.label
        np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-4)


def test_batches_of_any_size_and_single_images(exported_run):
    lite = Predictor.from_run(exported_run)
    grays = _images(20, seed=3)  # more than one BATCH_SIZE chunk, then sizes 1 and 3: re-planned each time
    together = np.array([found.probability for found in lite.predict(grays)])
    one_by_one = np.array([lite.predict([g])[0].probability for g in grays])
    np.testing.assert_allclose(together, one_by_one, atol=1e-6)
    np.testing.assert_allclose([found.probability for found in lite.predict(grays[:3])], together[:3], atol=1e-6)


def test_threads_share_one_predictor(exported_run):
    lite = Predictor.from_run(exported_run)
    grays = _images(6, seed=5)
    expected = np.array([found.probability for found in lite.predict(grays)])
    results: dict[int, np.ndarray] = {}

    def work(k: int) -> None:
        results[k] = np.array([lite.explain([g])[0].probability for g in grays])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        np.testing.assert_allclose(results[k], expected, atol=1e-6)


def test_predicting_with_litert_never_imports_tensorflow(exported_run):
    script = (
        "import sys, numpy as np\n"
        "from cxr_core.inference.predictor import Predictor\n"
        f"p = Predictor.from_run({str(exported_run)!r})\n"
        "(found,) = p.explain([np.full((50, 60), 100, np.uint8)])\n"
        "print(p.engine.name, round(found.probability, 6), found.heatmap.shape)\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("LiteRT ") and lines[0].endswith("(50, 60)")
    assert lines[-1] == "False False"


@pytest.mark.slow
def test_stale_export_is_not_used(exported_run, tmp_path):
    from cxr_core.engine.model import build_classifier

    run = _copy(exported_run, tmp_path / "run")
    build_classifier(MODEL_CFG, seed=99).save(run / "model.keras")  # the model changed after the export
    assert "different model.keras" in litert.lite_status(run)
    assert Predictor.from_run(run).engine.name == "Keras"
    with pytest.raises(BadRunError) as info:
        Predictor.from_run(run, engine="litert")
    assert "different model.keras" in str(info.value) and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def keras_answer(exported_run) -> float:
    """What the run's Keras model says about ``_images(1)[0]`` (loaded once for the module)."""
    return Predictor.from_run(exported_run, engine="keras").predict(_images(1)[:1])[0].probability


@pytest.mark.slow  # builds or loads models: seconds
@pytest.mark.parametrize("damage", ["text", "truncated", "no_info", "bad_info"])
def test_damaged_export_falls_back_to_keras(exported_run, keras_answer, tmp_path, damage):
    run = _copy(exported_run, tmp_path / "run")
    lite = run / run_folder.LITE_FILE
    if damage == "text":
        lite.write_text("not a flatbuffer")
    elif damage == "truncated":
        lite.write_bytes(lite.read_bytes()[:5000])
    elif damage == "no_info":
        (run / run_folder.LITE_INFO_FILE).unlink()
    else:
        (run / run_folder.LITE_INFO_FILE).write_text("{broken")
    predictor = Predictor.from_run(run)
    assert predictor.engine.name == "Keras"
    assert predictor.predict(_images(1)[:1])[0].probability == pytest.approx(keras_answer, abs=1e-6)
    with pytest.raises(BadRunError) as info:
        Predictor.from_run(run, engine="litert")
    assert "\n" not in str(info.value)


def test_export_without_the_normal_map_is_not_used(exported_run, tmp_path):
    """An export of format 1 (one map, PNEUMONIA only) says in one sentence how to rewrite it."""
    run = _copy(exported_run, tmp_path / "run")
    info = json.loads((run / run_folder.LITE_INFO_FILE).read_text())
    write_json_atomic(run / run_folder.LITE_INFO_FILE, {**info, "format": 1})
    reason = litert.lite_status(run)
    assert "without the map for NORMAL results" in reason and f"python -m cxr_core export --run {run}" in reason
    with pytest.raises(BadRunError) as error:
        Predictor.from_run(run, engine="litert")
    assert "\n" not in str(error.value) and "python -m cxr_core export" in str(error.value)
    assert Predictor.from_run(run).engine.name == "Keras"


def test_no_runtime_means_keras(exported_run, monkeypatch):
    monkeypatch.setattr(litert, "runtime_available", lambda: False)
    assert "not installed" in litert.lite_status(exported_run)
    assert Predictor.from_run(exported_run).engine.name == "Keras"


def test_a_runtime_that_cannot_load_means_keras(exported_run, monkeypatch):
    """As where a platform's wheel installs but its native library fails to load: Keras, not a crash."""
    import sys

    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # import now raises ImportError
    assert Predictor.from_run(exported_run).engine.name == "Keras"
    with pytest.raises(BadRunError, match="cannot be loaded here"):
        Predictor.from_run(exported_run, engine="litert")


def test_unknown_engine_is_refused(exported_run):
    with pytest.raises(CxrError, match="auto, litert or keras"):
        Predictor.from_run(exported_run, engine="onnx")


@pytest.mark.slow
def test_training_exports_litert(tiny_dataset, tmp_path):
    from cxr_core.engine.train import train

    config = RunConfig(data=DataConfig(data_dir=str(tiny_dataset), split="random"),
                       model=TRAINABLE_CFG, train=TrainConfig(epochs=1, batch_size=8))
    run = train(config, run_dir=tmp_path / "run")
    assert runs.read_status(run)["state"] == "done"
    assert litert.lite_status(run) is None
    assert Predictor.from_run(run).engine.name == "LiteRT"
    stages = [json.loads(line).get("stage") for line in (run / "progress.jsonl").read_text().splitlines()]
    assert stages.index("export") > stages.index("save")


@pytest.mark.slow
def test_failed_export_leaves_a_good_run(tiny_dataset, tmp_path, monkeypatch):
    from cxr_core.engine import export
    from cxr_core.engine.train import train

    def refuse(*_args, **_kwargs):
        raise CxrError("The model could not be converted to LiteRT (ConverterError).")

    monkeypatch.setattr(export, "export_classifier", refuse)
    config = RunConfig(data=DataConfig(data_dir=str(tiny_dataset), split="random"),
                       model=TRAINABLE_CFG, train=TrainConfig(epochs=1, batch_size=8))
    run = train(config, run_dir=tmp_path / "run")
    assert runs.read_status(run)["state"] == "done"
    assert not (run / run_folder.LITE_FILE).exists()
    events = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()]
    assert any(e["event"] == "warning" and "predicts with Keras" in e["message"] for e in events)
    assert Predictor.from_run(run).engine.name == "Keras"


@pytest.mark.slow
def test_training_without_export(tiny_dataset, tmp_path):
    from cxr_core.engine.train import train

    config = RunConfig(data=DataConfig(data_dir=str(tiny_dataset), split="random"),
                       model=TRAINABLE_CFG, train=TrainConfig(epochs=1, batch_size=8, export_litert=False))
    run = train(config, run_dir=tmp_path / "run")
    assert runs.read_status(run)["state"] == "done" and not (run / run_folder.LITE_FILE).exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr_core", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow  # four CLI processes that load TensorFlow
def test_cli_export_and_engine_choice(exported_run, tmp_path):
    run = _copy(exported_run, tmp_path / "run")
    (run / run_folder.LITE_FILE).unlink()
    (run / run_folder.LITE_INFO_FILE).unlink()
    image = tmp_path / "x.png"
    import cv2

    cv2.imwrite(str(image), _images(1)[0])
    result = _cli("predict", "--run", str(run), "--engine", "litert", str(image))
    assert result.returncode == 2 and result.stderr.strip().startswith("error:")
    assert "no model.tflite" in result.stderr

    result = _cli("export", "--run", str(run))
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip().splitlines()[-1]) == run / run_folder.LITE_FILE
    assert litert.lite_status(run) is None
    lite = json.loads(_cli("predict", "--run", str(run), "--engine", "litert", str(image)).stdout)
    keras_ = json.loads(_cli("predict", "--run", str(run), "--engine", "keras", str(image)).stdout)
    assert abs(lite["probability"] - keras_["probability"]) < 1e-5


@pytest.mark.slow  # a CLI process
def test_cli_export_of_an_unfinished_run_is_one_sentence(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_json_atomic(run / "config.json", RUN_CFG.to_dict())
    result = _cli("export", "--run", str(run))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "model.keras" in lines[0]
