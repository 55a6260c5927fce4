"""Ensemble runs: one model whose probability is the mean of its members', on both engines, with Grad-CAM."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_MODEL
from cxr_core import cli
from cxr_core.core.config import ModelConfig, RunConfig, TrainConfig
from cxr_core.core.errors import BadRunError, BadSettingError
from cxr_core.core.labels import sigmoid
from cxr_core.core.metrics import choose_threshold
from cxr_core.engine import litert
from cxr_core.evaluation.ensemble import make_ensemble
from cxr_core.inference.predictor import Predictor
from cxr_core.io.images import to_model_input
from cxr_core.runs import registry as runs
from cxr_core.runs.run_folder import RunFolder

SIZE = 64  # MobileNetV2 downsamples 32x: 2 x 2 conv maps, the smallest that can vary
MODEL_CFG = ModelConfig(backbone="mobilenet_v2", weights="none", image_size=SIZE, alpha=0.35, dropout=0.5)
LITE = litert.runtime_available()


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 40 + 7 * (i % 6), 52 - 3 * (i % 6)
        img = rng.normal(120 + 10 * i, 45, (h, w))
        img[:, : w // 3] += 60  # a bright band whose side and width vary: the maps must differ
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def _predictions(seed: int, paths: list[str] | None = None) -> pd.DataFrame:
    """Validation and test predictions of a member (the probabilities differ per member)."""
    rng = np.random.default_rng(seed)
    paths = paths or [f"/data/img_{i:02d}.png" for i in range(24)]
    y = np.array([i % 2 for i in range(len(paths))])
    probability = np.clip(0.3 * y + rng.uniform(0.0, 0.7, len(paths)), 0, 1)
    split = ["val" if i < 12 else "test" for i in range(len(paths))]
    return pd.DataFrame({"path": paths, "y": y, "probability": probability, "split": split,
                         "label": np.where(y == 1, "PNEUMONIA", "NORMAL")})


def _member(root: Path, name: str, cfg: ModelConfig, seed: int, state: str = "done", export: bool = False,
            predictions: pd.DataFrame | None = None) -> Path:
    """A finished run folder made directly (no training): model.keras, config, status, predictions."""
    from cxr_core.engine.model import build_classifier, gradcam_parts

    model = build_classifier(cfg, seed=seed)
    # An untrained network's features are tiny; scale the head so logits differ by about one across images.
    parts = gradcam_parts(model)
    size = cfg.resolved_image_size
    batch = np.stack([to_model_input(g, size) for g in _images(5)])
    features = np.asarray(parts.pool(parts.conv_model(parts.preprocess(batch))[1]))
    logit = model.get_layer("logit")
    kernel, bias = logit.get_weights()
    # Orthogonal to the mean (positive) activation: the signed map takes both signs, so the maps of
    # both classes (what raised the logit, what lowered it) have something to show.
    mean = features.mean(axis=0)
    kernel = kernel - np.outer(mean, mean @ kernel) / float(mean @ mean)
    spread = float(np.std(features @ kernel))
    logit.set_weights([kernel / max(spread, 1e-30), bias + 0.4 * (seed % 3) - 0.3])
    folder = RunFolder(root / name)
    config = RunConfig(model=cfg, train=TrainConfig(epochs=1, threshold_rule="youden", export_litert=export))
    folder.write_config(config)
    folder.write_status("running")
    folder.write_predictions(predictions if predictions is not None else _predictions(seed))
    folder.write_metrics({"threshold": 0.45, "threshold_rule": "youden"})
    folder.save_model(model)
    if export:
        from cxr_core.engine.export import export_classifier

        export_classifier(model, folder.path)
    folder.write_status(state, message=state)
    return folder.path


@pytest.fixture(scope="module")
def tiny_members(tmp_path_factory) -> list[Path]:
    """Two finished 32-px runs without a LiteRT export (fast)."""
    root = tmp_path_factory.mktemp("tiny-members")
    return [_member(root, f"tiny-{i}", TINY_MODEL, seed=i) for i in range(2)]


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    """Two finished 64-px runs with LiteRT exports."""
    root = tmp_path_factory.mktemp("members")
    return [_member(root, f"member-{i}", MODEL_CFG, seed=i + 1, export=LITE) for i in range(2)]


@pytest.fixture(scope="module")
def ensemble_run(members, tmp_path_factory) -> Path:
    return make_ensemble(members, out_dir=tmp_path_factory.mktemp("ens") / "ensemble")


# -- the model -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["keras", "litert"])
def test_probability_is_the_mean_of_the_members(members, ensemble_run, engine):
    if engine == "litert" and not LITE:
        pytest.skip("ai-edge-litert is not installed")
    grays = _images(6, seed=2)
    ensemble = Predictor.from_run(ensemble_run, engine=engine)
    member_probs = np.array([[e.probability for e in Predictor.from_run(m, engine=engine).predict(grays)]
                             for m in members])
    assert np.ptp(member_probs[0]) > 1e-3 and np.abs(member_probs[0] - member_probs[1]).max() > 1e-3
    np.testing.assert_allclose([e.probability for e in ensemble.predict(grays)], member_probs.mean(axis=0), atol=1e-5)
    found = ensemble.explain(grays)
    probs, maps = np.array([e.probability for e in found]), [e.heatmap for e in found]
    np.testing.assert_allclose(probs, member_probs.mean(axis=0), atol=1e-5)
    assert all(m.shape == g.shape for m, g in zip(maps, grays))


@pytest.mark.slow
@pytest.mark.skipif(not LITE, reason="ai-edge-litert is not installed")
def test_litert_and_keras_agree_on_probabilities_and_heatmaps(ensemble_run):
    lite = Predictor.from_run(ensemble_run)
    keras_ = Predictor.from_run(ensemble_run, engine="keras")
    assert (lite.engine.name, keras_.engine.name) == ("LiteRT", "Keras")
    grays = _images(5)
    found_lite, found_keras = lite.explain(grays), keras_.explain(grays)
    p_lite, maps_lite = np.array([e.probability for e in found_lite]), [e.heatmap for e in found_lite]
    p_keras, maps_keras = np.array([e.probability for e in found_keras]), [e.heatmap for e in found_keras]
    assert np.ptp(p_keras) > 1e-3
    np.testing.assert_allclose(p_lite, p_keras, atol=1e-5)
    assert any(np.ptp(m) > 0.1 for m in maps_keras)
    for a, b in zip(maps_lite, maps_keras):
        np.testing.assert_allclose(a, b, atol=1e-4)
    for target in ("PNEUMONIA", "NORMAL"):  # both classes' maps, whatever each image's label
        maps_lite = [e.heatmap for e in lite.explain(grays, target)]
        maps_keras = [e.heatmap for e in keras_.explain(grays, target)]
        assert any(np.ptp(m) > 0.1 for m in maps_keras)
        for a, b in zip(maps_lite, maps_keras):
            np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.slow
def test_heatmap_is_the_gradient_weighted_sum_of_the_members_maps(members, ensemble_run):
    batch = np.stack([to_model_input(g, SIZE) for g in _images(4, seed=9)]).astype(np.float32)
    logits, raw = Predictor.from_run(ensemble_run, engine="keras").engine.explain(batch)
    logits = logits[:, 0]  # the engine's logits are (n, 1): the one logit of each image
    member_logits, member_maps = zip(*(Predictor.from_run(m, engine="keras").engine.explain(batch) for m in members))
    member_logits = [z[:, 0] for z in member_logits]
    s = sigmoid(np.array(member_logits))  # (members, n)
    p = s.mean(axis=0)
    weights = s * (1 - s) / (len(members) * p * (1 - p))
    cells = (SIZE // 32) ** 2  # the single-model map is Grad-CAM: the Dense kernel over the cell count
    # Both channels (what raised the logit, what lowered it) are the members' weighted sum.
    expected = sum(w[:, None, None, None] * cells * m for w, m in zip(weights, member_maps))
    assert raw.shape == expected.shape and raw.shape[-1] == 2 and (expected[..., 1] > 0).any()
    np.testing.assert_allclose(logits, np.log(p / (1 - p)), atol=1e-4)
    np.testing.assert_allclose(raw, expected, rtol=1e-3, atol=1e-6 * float(np.abs(expected).max()))


def test_combine_maps_resizes_to_the_largest_grid():
    import keras

    from cxr_core.engine.model import EnsembleGradcamParts, MeanProbabilityLogit

    parts = EnsembleGradcamParts(members=[], combine=MeanProbabilityLogit(), last_conv_layer="")
    fine = np.ones((1, 3, 3), np.float32)
    coarse = np.full((1, 1, 1), 2.0, np.float32)
    out = np.asarray(parts.combine_maps([keras.ops.convert_to_tensor(fine), keras.ops.convert_to_tensor(coarse)]))
    assert out.shape == (1, 3, 3)
    np.testing.assert_allclose(out, 3.0, atol=1e-6)
    # The logit of the mean probability is finite even for members that are certain.
    logits = [np.array([[1e4], [-30.0]], np.float32), np.array([[1e4], [-1e4]], np.float32)]
    value = np.asarray(MeanProbabilityLogit()(logits)).reshape(-1)
    assert np.isfinite(value).all()
    assert value[1] == pytest.approx(-30.0 - np.log(2.0), abs=1e-4)


# -- the run folder ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_folder_records_members_recipe_and_threshold(tiny_members, tmp_path):
    run = make_ensemble(tiny_members, out_dir=tmp_path / "ens")
    folder = RunFolder(run)
    assert folder.is_ensemble()  # what reads members.json: an ensemble is refused as a member of another
    assert json.loads((run / "members.json").read_text())["members"] == [str(Path(m).resolve()) for m in tiny_members]
    config = folder.read_config()
    assert config.train.recipe == "ensemble" and config.model == TINY_MODEL
    assert runs.read_status(run)["state"] == "done"
    assert folder.has_model() and not folder.lite_path.exists()  # the members asked for no LiteRT export

    frames = [RunFolder(m).read_predictions() for m in tiny_members]
    mean = np.mean([f["probability"].to_numpy() for f in frames], axis=0)
    written = folder.read_predictions()
    np.testing.assert_allclose(written["probability"].to_numpy(), mean, atol=1e-12)
    val = (frames[0]["split"] == "val").to_numpy()
    metrics = folder.read_metrics()
    assert metrics["threshold"] == pytest.approx(choose_threshold(frames[0]["y"][val], mean[val], "youden"))
    assert metrics["threshold_rule"] == "youden"
    assert metrics["val"]["n"] == 12 and metrics["test"]["at_threshold"]["n"] == 12
    assert set(metrics["test"]) == {"at_0.5", "at_threshold"}
    assert [m["run"] for m in metrics["members"]] == [Path(m).name for m in tiny_members]
    assert Predictor.from_run(run).threshold == pytest.approx(metrics["threshold"])


@pytest.mark.slow
def test_threshold_rule_can_be_chosen(tiny_members, tmp_path):
    run = make_ensemble(tiny_members, out_dir=tmp_path / "ens", threshold_rule="sensitivity")
    frames = [RunFolder(m).read_predictions() for m in tiny_members]
    mean = np.mean([f["probability"].to_numpy() for f in frames], axis=0)
    val = (frames[0]["split"] == "val").to_numpy()
    assert RunFolder(run).read_metrics()["threshold"] == pytest.approx(
        choose_threshold(frames[0]["y"][val], mean[val], "sensitivity", target_sensitivity=0.95))
    assert RunFolder(run).read_config().train.threshold_rule == "sensitivity"
    with pytest.raises(BadSettingError, match="threshold rule"):
        make_ensemble(tiny_members, out_dir=tmp_path / "ens2", threshold_rule="best")


@pytest.mark.slow  # builds or loads models: seconds
def test_new_ensembles_go_under_the_runs_root(tiny_members, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_RUNS_DIR", str(tmp_path / "runs"))
    run = make_ensemble(tiny_members)
    assert run.parent == tmp_path / "runs" and "ensemble" in run.name


# -- refusals ---------------------------------------------------------------------------------------


def _one_sentence(error: pytest.ExceptionInfo) -> None:
    text = str(error.value)
    assert "\n" not in text and text.endswith(".") and text.count(". ") == 0


@pytest.mark.slow
def test_one_member_is_refused(tiny_members, tmp_path):
    with pytest.raises(BadSettingError, match="at least two finished runs") as info:
        make_ensemble(tiny_members[:1], out_dir=tmp_path / "ens")
    _one_sentence(info)
    with pytest.raises(BadSettingError, match="listed twice"):
        make_ensemble([tiny_members[0], tiny_members[0]], out_dir=tmp_path / "ens")
    assert not (tmp_path / "ens").exists()


@pytest.mark.slow  # builds or loads models: seconds
def test_different_image_sizes_are_refused(tiny_members, tmp_path):
    bigger = _member(tmp_path, "bigger", dataclasses.replace(TINY_MODEL, image_size=64), seed=5)
    with pytest.raises(BadSettingError, match="different image sizes") as info:
        make_ensemble([tiny_members[0], bigger], out_dir=tmp_path / "ens")
    _one_sentence(info)
    assert "tiny-0 takes 32x32" in str(info.value) and "bigger takes 64x64" in str(info.value)


def test_different_splits_are_refused(tiny_members, tmp_path):
    paths = [f"/data/img_{i:02d}.png" for i in range(24)]
    paths[3] = "/data/another.png"
    other = _member(tmp_path, "other-split", TINY_MODEL, seed=6, predictions=_predictions(6, paths))
    with pytest.raises(BadSettingError, match="different images") as info:
        make_ensemble([tiny_members[0], other], out_dir=tmp_path / "ens")
    _one_sentence(info)
    assert "tiny-0" in str(info.value) and "other-split" in str(info.value)


def test_a_member_that_trained_on_the_validation_images_is_refused(tiny_members, tmp_path):
    leaky = _member(tmp_path, "leaky", TINY_MODEL, seed=7)
    RunFolder(leaky).write_split(pd.DataFrame({"path": ["/data/img_00.png", "/data/img_99.png"],
                                               "label": ["NORMAL", "NORMAL"], "split": ["train", "train"]}))
    with pytest.raises(BadSettingError, match="trained on 1 of the images") as info:
        make_ensemble([tiny_members[0], leaky], out_dir=tmp_path / "ens")
    _one_sentence(info)


def test_unfinished_member_is_refused(tiny_members, tmp_path):
    failed = _member(tmp_path, "failed-run", TINY_MODEL, seed=8, state="failed")
    with pytest.raises(BadRunError, match="failed-run is not finished") as info:
        make_ensemble([tiny_members[0], failed], out_dir=tmp_path / "ens")
    _one_sentence(info)
    with pytest.raises(BadRunError, match="does not exist"):
        make_ensemble([tiny_members[0], tmp_path / "nowhere"], out_dir=tmp_path / "ens")


@pytest.mark.slow  # builds or loads models: seconds
def test_an_ensemble_is_not_a_member(tiny_members, tmp_path):
    run = make_ensemble(tiny_members, out_dir=tmp_path / "ens")
    with pytest.raises(BadSettingError, match="itself an ensemble"):
        make_ensemble([run, tiny_members[0]], out_dir=tmp_path / "ens2")
    with pytest.raises(BadSettingError, match="already holds a run"):
        make_ensemble(tiny_members, out_dir=run)


# -- the command line ---------------------------------------------------------------------------------


@pytest.mark.slow  # builds or loads models: seconds
def test_cli_ensemble(tiny_members, tmp_path, capsys):
    out = tmp_path / "cli-ens"
    assert cli.main(["ensemble", "--runs", *map(str, tiny_members), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert runs.read_status(out)["state"] == "done"
    assert cli.main(["ensemble", "--runs", str(tiny_members[0]), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: An ensemble needs at least two") and err.count("\n") == 1


# -- members with different backbones ------------------------------------------------------------------


@pytest.mark.slow
def test_different_backbones_combine_their_maps_on_the_largest_grid(tmp_path):
    size = 75  # InceptionV3's smallest input: a 1 x 1 map; MobileNetV2 gives 3 x 3
    inception = ModelConfig(backbone="inception_v3", weights="none", image_size=size, dropout=0.5)
    mobile = dataclasses.replace(MODEL_CFG, image_size=size)
    parts = [_member(tmp_path, "inception", inception, seed=1), _member(tmp_path, "mobile", mobile, seed=2)]
    run = make_ensemble(parts, out_dir=tmp_path / "ens")
    grays = _images(4, seed=4)
    keras_ = Predictor.from_run(run, engine="keras")
    batch = np.stack([to_model_input(g, size) for g in grays]).astype(np.float32)
    logits, raw = keras_.engine.explain(batch)
    logits = logits[:, 0]  # the engine's logits are (n, 1): the one logit of each image
    assert raw.shape == (4, 3, 3, 2)
    member_probs = np.array([[e.probability for e in Predictor.from_run(m, engine="keras").predict(grays)]
                             for m in parts])
    np.testing.assert_allclose(sigmoid(logits), member_probs.mean(axis=0), atol=1e-5)
    if LITE:
        from cxr_core.engine.export import export_run

        export_run(run)
        lite = Predictor.from_run(run, engine="litert")
        found_lite, found_keras = lite.explain(grays), keras_.explain(grays)
        p_lite, maps_lite = np.array([e.probability for e in found_lite]), [e.heatmap for e in found_lite]
        p_keras, maps_keras = np.array([e.probability for e in found_keras]), [e.heatmap for e in found_keras]
        np.testing.assert_allclose(p_lite, p_keras, atol=1e-5)
        for a, b in zip(maps_lite, maps_keras):
            np.testing.assert_allclose(a, b, atol=1e-4)
