"""The subtype task's prediction: a softmax head over NORMAL, BACTERIA, VIRUS on both engines, the CLI, ensembles."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import TINY_MODEL
from cxr_core import cli
from cxr_core.core.config import DataConfig, RunConfig, TrainConfig
from cxr_core.core.errors import BadRunError, BadSettingError
from cxr_core.core.labels import TASK_CLASSES
from cxr_core.engine import litert
from cxr_core.inference.predictor import Predictor
from cxr_core.runs.run_folder import RunFolder

pytestmark = pytest.mark.slow  # every test builds and exports a model (seconds each)

# TINY_MODEL at 64 px: MobileNetV2 downsamples 32x, so 2 x 2 conv maps, the smallest that can vary.
MODEL_CFG = dataclasses.replace(TINY_MODEL, image_size=64)
SIZE = 64
CLASSES = TASK_CLASSES["subtype"]
SUBTYPE_CFG = RunConfig(data=DataConfig(task="subtype"), model=MODEL_CFG, train=TrainConfig(epochs=1))
BINARY_CFG = RunConfig(model=MODEL_CFG, train=TrainConfig(epochs=1))
#: What a subtype run's map of each class says, and says when it is empty.
_NAMES = {"NORMAL": "normal", "BACTERIA": "bacterial pneumonia", "VIRUS": "viral pneumonia"}
SUBTYPE_MAP_CAPTIONS = {cls: f"Highlighted: regions that raised the {name} score." for cls, name in _NAMES.items()}
SUBTYPE_EMPTY_MAP_CAPTIONS = {
    cls: f"No region raised the {name} score, so there is no map to show: the {cls} call comes from "
         "the model's baseline, not from a place in the image."
    for cls, name in _NAMES.items()
}
needs_litert = pytest.mark.skipif(not litert.runtime_available(), reason="ai-edge-litert is not installed")


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 40 + 7 * (i % 5), 52 - 3 * (i % 5)
        img = rng.normal(110 + 12 * i, 45, (h, w))
        img[:, : w // (2 + i % 3)] += 70  # a bright band whose width varies: maps and logits differ
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _conv_maps(model, grays: list[np.ndarray]) -> np.ndarray:
    """The last conv maps A (n, h', w', k) of the classifier for these images."""
    from cxr_core.engine.model import gradcam_parts
    from cxr_core.io.images import to_model_input

    parts = gradcam_parts(model)
    batch = np.stack([to_model_input(g, SIZE) for g in grays]).astype(np.float32)
    return np.asarray(parts.conv_model(parts.preprocess(batch), training=False)[0])


@pytest.fixture(scope="module")
def classifier():
    from cxr_core.engine.model import build_classifier, n_outputs_for

    model = build_classifier(MODEL_CFG, seed=5, n_outputs=n_outputs_for("subtype"))
    assert model.get_layer("logit").units == 3 and model.output_shape == (None, 3)
    # A random deep network's activations are tiny and all positive: take each class's kernel
    # orthogonal to their mean (so every class map has both signs) and scale the logits to about one.
    conv = _conv_maps(model, _images(6))
    features = conv.mean(axis=(1, 2))
    mean = features.mean(axis=0)
    kernel, bias = model.get_layer("logit").get_weights()
    kernel = kernel - np.outer(mean, mean @ kernel) / float(mean @ mean)
    kernel = kernel / np.maximum((features @ kernel).std(axis=0), 1e-30)
    model.get_layer("logit").set_weights([kernel, bias + np.array([0.2, 0.0, -0.2], np.float32)])
    return model


@pytest.fixture(scope="module")
def subtype_run(tmp_path_factory, classifier) -> Path:
    folder = RunFolder(tmp_path_factory.mktemp("subtype") / "run")
    folder.write_config(SUBTYPE_CFG)
    folder.save_model(classifier)
    folder.write_metrics({"task": "subtype", "classes": list(CLASSES), "threshold": None,
                          "threshold_rule": "argmax"})
    folder.write_status("done")
    if litert.runtime_available():
        from cxr_core.engine.export import export_classifier

        export_classifier(classifier, folder.path, MODEL_CFG.backbone)
    return folder.path


@pytest.fixture(scope="module")
def keras_predictor(subtype_run) -> Predictor:
    return Predictor.from_run(subtype_run, engine="keras")


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory) -> Path:
    from cxr_core.engine.model import build_classifier

    folder = RunFolder(tmp_path_factory.mktemp("binary") / "run")
    folder.write_config(BINARY_CFG)
    folder.save_model(build_classifier(MODEL_CFG, seed=6))
    folder.write_metrics({"threshold": 0.5, "threshold_rule": "youden"})
    folder.write_status("done")
    return folder.path


def test_head_width_follows_the_task() -> None:
    from cxr_core.engine.model import build_head, n_outputs_for

    assert (n_outputs_for("pneumonia"), n_outputs_for("subtype")) == (1, 3)
    assert build_head(16, 0.5).output_shape == (None, 1)
    assert build_head(16, 0.5, n_outputs=3).get_layer("logit").units == 3


def test_probabilities_are_the_softmax_of_the_keras_model(keras_predictor, classifier) -> None:
    from cxr_core.io.images import to_model_input

    predictor = keras_predictor
    assert (predictor.task.name, predictor.classes) == ("subtype", CLASSES)
    grays = _images(5)
    probs = np.array([list(found.probabilities.values()) for found in predictor.predict(grays)])
    batch = np.stack([to_model_input(g, SIZE) for g in grays]).astype(np.float32)
    expected = _softmax(np.asarray(classifier(batch, training=False), np.float64))
    assert probs.shape == (5, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert np.ptp(probs, axis=0).max() > 0.05  # the images differ, so the comparison means something
    # The binary entry points give P(PNEUMONIA) = 1 - P(NORMAL); the label is the most probable class.
    np.testing.assert_allclose([e.probability for e in predictor.predict(grays)], 1.0 - probs[:, 0], atol=1e-9)
    found = predictor.explain(grays)
    for e, row in zip(found, probs):
        assert e.label == e.target == CLASSES[int(np.argmax(row))]
        assert list(e.probabilities) == list(CLASSES)
        np.testing.assert_allclose(list(e.probabilities.values()), row, atol=1e-5)
        assert e.probability == pytest.approx(1.0 - row[0], abs=1e-5)
        expected = SUBTYPE_EMPTY_MAP_CAPTIONS if e.empty else SUBTYPE_MAP_CAPTIONS
        assert e.caption == expected[e.target]


@pytest.mark.parametrize("target", CLASSES)
def test_class_map_is_relu_of_the_class_kernel(keras_predictor, classifier, target) -> None:
    predictor = keras_predictor
    c = CLASSES.index(target)
    kernel = classifier.get_layer("logit").get_weights()[0][:, c]
    grays = _images(4, seed=1)
    shown = 0
    for gray, conv, found in zip(grays, _conv_maps(classifier, grays), predictor.explain(grays, target)):
        cam = np.maximum(conv @ kernel, 0.0)
        if cam.max() <= 0:
            assert found.empty
            continue
        expected = cv2.resize((cam / cam.max()).astype(np.float32), gray.shape[::-1], interpolation=cv2.INTER_LINEAR)
        assert found.target == target and found.heatmap.shape == gray.shape
        np.testing.assert_allclose(found.heatmap, np.clip(expected, 0, 1), atol=1e-4)
        shown += np.ptp(found.heatmap) > 0.1
    assert shown  # at least one map that varies across the image
    with pytest.raises(ValueError, match="BACTERIA"):
        predictor.explain(grays[:1], target="PNEUMONIA")


@needs_litert
def test_litert_export_has_three_logits_and_three_maps_that_agree_with_keras(subtype_run, keras_predictor) -> None:
    lite, keras_ = Predictor.from_run(subtype_run), keras_predictor
    assert (lite.engine.name, keras_.engine.name) == ("LiteRT", "Keras")
    grays = _images(5, seed=2)
    np.testing.assert_allclose([list(e.probabilities.values()) for e in lite.predict(grays)],
                               [list(e.probabilities.values()) for e in keras_.predict(grays)], atol=1e-5)
    for target in CLASSES:
        for a, b in zip(lite.explain(grays, target), keras_.explain(grays, target)):
            assert a.label == b.label and a.target == b.target == target
            np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-4)
    logits, cams = lite.engine.explain(np.zeros((2, SIZE, SIZE, 3), np.float32))
    assert logits.shape == (2, 3) and cams.shape[0] == 2 and cams.shape[-1] == 3


def test_config_and_model_that_disagree_are_one_sentence(subtype_run, tmp_path) -> None:
    folder = RunFolder(tmp_path / "run")
    folder.write_config(BINARY_CFG)
    (tmp_path / "run" / "model.keras").write_bytes((Path(subtype_run) / "model.keras").read_bytes())
    with pytest.raises(BadRunError) as info:
        Predictor.from_run(folder.path, engine="keras")
    assert "has 3 outputs but its pneumonia task needs 1" in str(info.value) and "\n" not in str(info.value)


def _write_png(path: Path, gray: np.ndarray) -> str:
    assert cv2.imwrite(str(path), gray)
    return str(path)


def test_cli_predict_prints_each_class_for_subtype_and_the_old_format_for_binary(
    subtype_run, binary_run, tmp_path, capsys
) -> None:
    files = [_write_png(tmp_path / f"x{i}.png", g) for i, g in enumerate(_images(2, seed=4))]
    assert cli.main(["predict", "--run", str(subtype_run), *files]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert set(line) == {"file", "probabilities", "label"}
        assert list(line["probabilities"]) == list(CLASSES)
        assert sum(line["probabilities"].values()) == pytest.approx(1.0)
        assert line["label"] == max(line["probabilities"], key=line["probabilities"].get)
    assert cli.main(["predict", "--run", str(binary_run), files[0]]) == 0
    binary = json.loads(capsys.readouterr().out)
    assert set(binary) == {"file", "probability", "label"} and binary["label"] in ("NORMAL", "PNEUMONIA")
    # A threshold means nothing to a run that calls the most probable class: one sentence, exit 2.
    assert cli.main(["predict", "--run", str(subtype_run), "--threshold", "0.3", files[0]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--threshold does not apply" in err and "\n" not in err


def test_ensemble_refuses_mixed_tasks_and_subtype_runs(subtype_run, binary_run, tmp_path) -> None:
    from cxr_core.evaluation.ensemble import make_ensemble

    with pytest.raises(BadSettingError) as info:
        make_ensemble([binary_run, subtype_run], out_dir=tmp_path / "mixed")
    message = str(info.value)
    assert "different tasks" in message and "(pneumonia)" in message and "(subtype)" in message
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")
    twin = RunFolder(tmp_path / "twin")
    twin.write_config(SUBTYPE_CFG)
    (twin.path / "model.keras").write_bytes((Path(subtype_run) / "model.keras").read_bytes())
    twin.write_status("done")
    with pytest.raises(BadSettingError, match="pneumonia runs only"):
        make_ensemble([subtype_run, twin.path], out_dir=tmp_path / "both")
    assert not (tmp_path / "mixed").exists() and not (tmp_path / "both").exists()
