"""Predictor: loading run folders, probabilities, Grad-CAM and overlays, on a tiny model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxr_core.core.config import ModelConfig, RunConfig, TrainConfig
from cxr_core.core.errors import BadImageError, BadRunError, CxrError
from cxr_core.core.labels import label_for
from cxr_core.inference.predictor import Explanation, Predictor, _finish_cam, map_caption, overlay_heatmap
from cxr_core.io.atomic import write_json_atomic

SIZE = 64  # MobileNetV2 downsamples 32x: 2 x 2 conv maps, the smallest that can vary
MODEL_CFG = ModelConfig(backbone="mobilenet_v2", weights="none", image_size=SIZE, alpha=0.35, dropout=0.5)
RUN_CFG = RunConfig(model=MODEL_CFG, train=TrainConfig(epochs=1, threshold_rule="youden"))


def _xray(seed: int, h: int = 48, w: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 170, np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    img[(((xx - w * 0.3) / (w * 0.15)) ** 2 + ((yy - h / 2) / (h * 0.3)) ** 2) < 1] = 60
    img[(((xx - w * 0.7) / (w * 0.15)) ** 2 + ((yy - h / 2) / (h * 0.3)) ** 2) < 1] = 60
    img += rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


@pytest.fixture(scope="module")
def classifier():
    import keras

    from cxr_core.engine.model import build_classifier

    model = build_classifier(MODEL_CFG, seed=7)
    # A random head gives logits near zero; a larger kernel makes the differences between images visible.
    logit = model.get_layer("logit")
    kernel, bias = logit.get_weights()
    logit.set_weights([kernel * 5.0, bias])
    assert isinstance(model, keras.Model)
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, classifier) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run-ok"
    run.mkdir()
    classifier.save(run / "model.keras")
    write_json_atomic(run / "config.json", RUN_CFG.to_dict())
    write_json_atomic(run / "metrics.json", {"threshold": 0.37, "threshold_rule": "youden"})
    return run


@pytest.fixture(scope="module")
def predictor(run_dir) -> Predictor:
    return Predictor.from_run(run_dir)


def _copy_run(run_dir: Path, dest: Path, skip: tuple[str, ...] = ()) -> Path:
    dest.mkdir(parents=True)
    for name in ("model.keras", "config.json", "metrics.json"):
        if name not in skip:
            shutil.copy(run_dir / name, dest / name)
    return dest


# -- probabilities ---------------------------------------------------------------------------


@pytest.mark.slow
def test_from_run_reads_config_and_threshold(predictor: Predictor) -> None:
    assert predictor.threshold == pytest.approx(0.37)
    assert predictor.image_size == SIZE
    assert predictor.config == RUN_CFG


def test_probabilities_equal_model_sigmoid(predictor: Predictor, classifier) -> None:
    from cxr_core.io.images import to_model_input

    grays = [_xray(i, h=30 + 7 * i, w=60 - 5 * i) for i in range(5)]
    probs = np.array([found.probability for found in predictor.predict(grays)])
    assert probs.shape == (5,)
    assert ((probs >= 0) & (probs <= 1)).all()
    batch = np.stack([to_model_input(g, SIZE) for g in grays])
    expected = _sigmoid(np.asarray(classifier(batch, training=False)).reshape(-1))
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    assert predictor.predict([grays[2]])[0].probability == pytest.approx(float(expected[2]), rel=1e-5, abs=1e-6)
    assert probs.std() > 0  # the tiny model does tell the images apart
    assert len(predictor.predict([])) == 0


def test_threshold_override_and_labels(run_dir: Path, predictor: Predictor) -> None:
    p = Predictor.from_run(run_dir, threshold=0.9)
    assert p.threshold == 0.9
    assert label_for(0.9, p.threshold) == "PNEUMONIA" and label_for(0.89, p.threshold) == "NORMAL"
    p.threshold = 0.1
    assert p.threshold == 0.1
    with pytest.raises(CxrError):
        p.threshold = 1.5
    with pytest.raises(BadRunError):
        Predictor.from_run(run_dir, threshold=-0.2)
    assert predictor.threshold == pytest.approx(0.37)  # another Predictor's threshold is its own


def test_predict_rejects_non_images(predictor: Predictor) -> None:
    with pytest.raises(BadImageError):
        predictor.predict([np.zeros((4, 4, 3), np.uint8)])
    with pytest.raises(BadImageError):
        predictor.predict([np.zeros(10, np.uint8)])


def test_predict_files_mix_of_good_and_bad(predictor: Predictor, tmp_path: Path) -> None:
    files = []
    for i in range(3):
        path = tmp_path / f"good{i}.{'png' if i % 2 else 'jpeg'}"
        cv2.imwrite(str(path), _xray(i))
        files.append(path)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.png"
    order = [files[0], text, files[1], missing, empty, files[2]]
    results = predictor.predict_files(order)
    assert [r["file"] for r in results] == [str(p) for p in order]
    good = [r for r in results if "probability" in r]
    bad = [r for r in results if "error" in r]
    assert len(good) == 3 and len(bad) == 3
    for r in bad:
        assert isinstance(r["error"], str) and r["error"]
    from cxr_core.io.images import load_gray

    for r, path in zip(good, files):
        assert 0.0 <= r["probability"] <= 1.0
        (alone,) = predictor.predict([load_gray(path)])
        assert r["probability"] == pytest.approx(alone.probability, rel=1e-5, abs=1e-6)
        assert r["label"] == ("PNEUMONIA" if r["probability"] >= predictor.threshold else "NORMAL")


def test_predict_files_more_than_one_batch(predictor: Predictor, tmp_path: Path) -> None:
    paths = []
    for i in range(20):  # > BATCH_SIZE
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(str(path), _xray(i))
        paths.append(path)
    results = predictor.predict_files(paths)
    assert len(results) == 20 and all("probability" in r for r in results)


def test_predict_bytes(predictor: Predictor) -> None:
    from cxr_core.io.images import load_gray

    gray = _xray(3)
    ok, png = cv2.imencode(".png", gray)
    assert ok
    (result,) = predictor.predict([load_gray(png.tobytes(), "upload.png")])
    assert result.probability == pytest.approx(predictor.predict([gray])[0].probability, rel=1e-5, abs=1e-6)
    with pytest.raises(BadImageError):
        predictor.predict([load_gray(b"garbage bytes", "upload.png")])


# -- Grad-CAM --------------------------------------------------------------------------------


def test_gradcam_shape_range_and_variation(predictor: Predictor) -> None:
    gray = _xray(1, h=50, w=37)
    heat = predictor.explain([gray])[0].heatmap
    assert heat.shape == (50, 37) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert heat.max() == pytest.approx(1.0, abs=1e-3)
    assert heat.std() > 0.01
    (found,) = predictor.explain([gray])
    prob, heat2 = found.probability, found.heatmap
    assert prob == pytest.approx(predictor.predict([gray])[0].probability, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(heat, heat2, atol=1e-6)


def test_gradcam_matches_closed_form(predictor: Predictor, classifier) -> None:
    """With global average pooling after the last conv, Grad-CAM is ReLU(conv . kernel), normalised."""
    from cxr_core.engine.model import gradcam_parts
    from cxr_core.io.images import to_model_input

    gray = _xray(2, h=40, w=44)
    parts = gradcam_parts(classifier)
    assert parts.conv_model.outputs[0].shape == parts.conv_model.outputs[1].shape  # out_relu is the output
    x = parts.preprocess(to_model_input(gray, SIZE)[None])
    conv = np.asarray(parts.conv_model(x, training=False)[0])[0]
    kernel = classifier.get_layer("logit").get_weights()[0][:, 0]
    cam = np.maximum(conv @ kernel, 0)
    expected = cv2.resize((cam / cam.max()).astype(np.float32), (44, 40), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(predictor.explain([gray], "PNEUMONIA")[0].heatmap, np.clip(expected, 0, 1), atol=1e-4)


def _closed_form_map(classifier, gray: np.ndarray, sign: float) -> np.ndarray:
    """ReLU(sign * sum_k w_k A_k) from the model's own layers, normalised and resized as the predictor does."""
    from cxr_core.engine.model import gradcam_parts
    from cxr_core.io.images import to_model_input

    parts = gradcam_parts(classifier)
    conv = np.asarray(parts.conv_model(parts.preprocess(to_model_input(gray, SIZE)[None]), training=False)[0])[0]
    signed = conv @ classifier.get_layer("logit").get_weights()[0][:, 0]
    assert (signed > 0).any() and (signed < 0).any()  # evidence both ways: neither map is trivially zero
    cam = np.maximum(sign * signed, 0)
    resized = cv2.resize((cam / cam.max()).astype(np.float32), gray.shape[::-1], interpolation=cv2.INTER_LINEAR)
    return np.clip(resized, 0, 1)


LEANING = [_xray(10 + i, h=40 + 3 * i, w=44 - 2 * i) for i in range(4)]


@pytest.fixture(scope="module")
def centred(run_dir):
    """The run's model with its head weights set: the logits of ``LEANING`` spread by about one around 0."""
    from cxr_core.engine.model import gradcam_parts, load_classifier
    from cxr_core.io.images import to_model_input

    model = load_classifier(run_dir)
    parts = gradcam_parts(model)
    batch = np.stack([to_model_input(g, SIZE) for g in LEANING])
    features = np.asarray(parts.pool(parts.conv_model(parts.preprocess(batch))[1]))
    logit = model.get_layer("logit")
    kernel = logit.get_weights()[0]
    z = features @ kernel[:, 0]
    scale = 1.0 / max(float(np.std(z)), 1e-30)  # an untrained network's activations are about 1e-11
    logit.set_weights([kernel * scale, np.array([-float(np.mean(z)) * scale], np.float32)])
    return model


@pytest.mark.slow
def test_normal_result_shows_the_evidence_for_normal(centred) -> None:
    """The head is GAP -> Dense, so the logit is sum_k w_k mean(A_k) + b: ReLU(-sum_k w_k A_k) is where
    the image lowered it. A NORMAL result shows that map; a PNEUMONIA result the usual one."""
    from cxr_core.engine.keras_runner import KerasEngine

    split = Predictor(KerasEngine(centred), RUN_CFG, threshold=0.5)
    probs = np.array([found.probability for found in split.predict(LEANING)])
    low, high = int(np.argmin(probs)), int(np.argmax(probs))
    assert probs[low] < 0.45 and probs[high] > 0.55  # one leans NORMAL, one PNEUMONIA
    normal, pneumonia = split.explain([LEANING[low], LEANING[high]])

    assert (normal.label, normal.target) == ("NORMAL", "NORMAL")
    assert not normal.empty and normal.heatmap.max() == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(normal.heatmap, _closed_form_map(centred, LEANING[low], -1.0), atol=1e-4)
    assert normal.caption == "Highlighted: regions that lowered the pneumonia score (evidence for NORMAL)."

    assert (pneumonia.label, pneumonia.target) == ("PNEUMONIA", "PNEUMONIA")
    np.testing.assert_allclose(pneumonia.heatmap, _closed_form_map(centred, LEANING[high], 1.0), atol=1e-4)
    assert pneumonia.caption == "Highlighted: regions that raised the pneumonia score."
    # The two maps of one image are different maps (what raised the score is not what lowered it).
    assert np.abs(normal.heatmap - split.explain([LEANING[low]], "PNEUMONIA")[0].heatmap).max() > 0.1

    # One image alone follows the same rule, and a class can still be asked for explicitly.
    (alone,) = split.explain([LEANING[low]])
    assert alone.probability == pytest.approx(normal.probability) and np.array_equal(alone.heatmap, normal.heatmap)
    asked = split.explain([LEANING[high]], target="NORMAL")[0]
    assert (asked.label, asked.target) == ("PNEUMONIA", "NORMAL")
    np.testing.assert_allclose(asked.heatmap, _closed_form_map(centred, LEANING[high], -1.0), atol=1e-4)
    with pytest.raises(ValueError, match="NORMAL"):
        split.explain([LEANING[low]], target="pneumonia")


class _FixedEngine:
    """An engine that answers fixed logits and raw maps (n, h', w', 2): the predictor's own logic, no model."""

    name = "fixed"
    image_size, n_outputs, map_grid = 8, 1, (2, 2)

    def __init__(self, logits, cams) -> None:
        self._logits, self._cams = np.asarray(logits, np.float32), np.asarray(cams, np.float32)

    def logits(self, batch):
        return self._logits[: len(batch)]

    def explain(self, batch):
        return self._logits[: len(batch)], self._cams[: len(batch)]


def test_a_map_without_evidence_says_so() -> None:
    cams = np.zeros((2, 2, 2, 2), np.float32)
    cams[0, 0, 0, 0] = 3.0  # image 0: something raised the score, nothing lowered it
    fixed = Predictor(_FixedEngine([-2.0, 1.0], cams), RUN_CFG, threshold=0.5)
    normal, pneumonia = fixed.explain([np.zeros((5, 6), np.uint8)] * 2)
    # A NORMAL call from the baseline alone: no region lowered the score, and the result says so.
    assert normal.label == "NORMAL" and normal.empty and not normal.heatmap.any() and normal.heatmap.shape == (5, 6)
    assert normal.caption == map_caption("NORMAL", empty=True) and normal.caption.startswith("No region lowered")
    assert pneumonia.label == "PNEUMONIA" and pneumonia.empty
    assert pneumonia.caption.startswith("No region raised the pneumonia score")
    assert not fixed.explain([np.zeros((5, 6), np.uint8)], "PNEUMONIA")[0].empty
    for caption in (map_caption(c, empty) for c in ("NORMAL", "PNEUMONIA") for empty in (False, True)):
        assert "\n" not in caption and caption.endswith(".") and ". " not in caption
    assert map_caption("NORMAL") == "Highlighted: regions that lowered the pneumonia score (evidence for NORMAL)." \
        and map_caption("NORMAL", empty=True) == normal.caption
    with pytest.raises(ValueError):
        map_caption("COVID")
    assert isinstance(normal, Explanation)


def test_answers_repeat_and_a_blank_image_of_another_size(predictor: Predictor, classifier) -> None:
    from cxr_core.io.images import to_model_input

    gray = _xray(4)
    before = predictor.predict([gray])[0].probability, predictor.explain([gray])[0].heatmap
    # The same image gives the same answers again (the compiled functions keep no state).
    assert predictor.predict([gray])[0].probability == pytest.approx(before[0], rel=1e-6, abs=1e-7)
    np.testing.assert_allclose(predictor.explain([gray])[0].heatmap, before[1], atol=1e-6)
    blank = np.zeros((20, 20), np.uint8)
    expected = _sigmoid(np.asarray(classifier(to_model_input(blank, SIZE)[None], training=False)).reshape(-1))[0]
    assert predictor.predict([blank])[0].probability == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert predictor.explain([blank])[0].heatmap.shape == (20, 20)


def test_gradcam_batch_equals_single(predictor: Predictor) -> None:
    grays = [_xray(i, h=36 + i, w=30 + 2 * i) for i in range(3)]
    maps = [found.heatmap for found in predictor.explain(grays)]
    for gray, heat in zip(grays, maps):
        assert heat.shape == gray.shape
        np.testing.assert_allclose(heat, predictor.explain([gray])[0].heatmap, atol=1e-5)


def test_flat_cam_is_all_zeros() -> None:
    out = _finish_cam(np.full((3, 3), -1.0, np.float32), (20, 30))
    assert out.shape == (20, 30) and out.dtype == np.float32 and not out.any()


def test_overlay_heatmap() -> None:
    gray = _xray(0, h=30, w=20)
    heat = np.linspace(0, 1, 30 * 20, dtype=np.float32).reshape(30, 20)
    out = overlay_heatmap(gray, heat, opacity=0.4)
    assert out.shape == (30, 20, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(overlay_heatmap(gray, heat, opacity=0.0), np.repeat(gray[..., None], 3, -1))
    jet = overlay_heatmap(gray, heat, opacity=1.0)
    # JET: low values are blue, high values red (RGB order).
    assert jet[0, 0, 2] > jet[0, 0, 0] and jet[-1, -1, 0] > jet[-1, -1, 2]
    # A heatmap of another size is stretched to the image.
    assert overlay_heatmap(gray, np.ones((4, 4), np.float32)).shape == (30, 20, 3)
    with pytest.raises(CxrError):
        overlay_heatmap(gray, heat, opacity=2)


# -- damaged run folders ---------------------------------------------------------------------


def test_missing_run_folder(tmp_path: Path) -> None:
    with pytest.raises(BadRunError, match="does not exist"):
        Predictor.from_run(tmp_path / "nope")


def test_missing_model(run_dir: Path, tmp_path: Path) -> None:
    run = _copy_run(run_dir, tmp_path / "r", skip=("model.keras",))
    with pytest.raises(BadRunError, match="model.keras") as info:
        Predictor.from_run(run)
    assert str(run) in str(info.value)


def test_model_that_is_a_text_file(run_dir: Path, tmp_path: Path) -> None:
    run = _copy_run(run_dir, tmp_path / "r", skip=("model.keras",))
    (run / "model.keras").write_text("this is not a model")
    with pytest.raises(BadRunError, match="model.keras") as info:
        Predictor.from_run(run)
    assert str(run) in str(info.value)


def test_missing_config(run_dir: Path, tmp_path: Path) -> None:
    run = _copy_run(run_dir, tmp_path / "r", skip=("config.json",))
    with pytest.raises(BadRunError, match="config.json") as info:
        Predictor.from_run(run)
    assert str(run) in str(info.value)


@pytest.mark.parametrize("content", ["{not json", "[1, 2, 3]", '{"model": "mobilenet"}', '{"model": {"dropout": 7}}'])
def test_garbage_config(run_dir: Path, tmp_path: Path, content: str) -> None:
    run = _copy_run(run_dir, tmp_path / "r", skip=("config.json",))
    (run / "config.json").write_text(content)
    with pytest.raises(BadRunError) as info:
        Predictor.from_run(run)
    assert str(run) in str(info.value)


@pytest.mark.slow  # builds or loads models: seconds
def test_older_config_still_loads(run_dir: Path, predictor: Predictor, tmp_path: Path) -> None:
    run = _copy_run(run_dir, tmp_path / "r", skip=("config.json",))
    old = RUN_CFG.to_dict()
    del old["version"]
    del old["augment"]
    del old["model"]["dropout"]
    old["model"]["retired_setting"] = True
    old["from_the_future"] = {"x": 1}
    (run / "config.json").write_text(json.dumps(old))
    p = Predictor.from_run(run)
    assert p.config.model.backbone == "mobilenet_v2" and p.config.version == 0
    same = p.predict([_xray(0)])[0].probability
    assert same == pytest.approx(predictor.predict([_xray(0)])[0].probability, abs=1e-6)  # the same network


@pytest.mark.slow  # builds or loads models: seconds
def test_metrics_absent_or_damaged(run_dir: Path, tmp_path: Path) -> None:
    run = _copy_run(run_dir, tmp_path / "r", skip=("metrics.json",))
    assert Predictor.from_run(run).threshold == 0.5
    (run / "metrics.json").write_text("{broken")
    with pytest.raises(BadRunError, match="metrics.json"):
        Predictor.from_run(run)
    # An explicit threshold does not need metrics.json.
    assert Predictor.from_run(run, threshold=0.2).threshold == 0.2
    (run / "metrics.json").write_text('{"threshold": 3}')
    with pytest.raises(BadRunError, match="threshold"):
        Predictor.from_run(run)
