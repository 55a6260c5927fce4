"""Test-time augmentation: the views are the shifts and zoom they claim, the answer is the mean of the views'
logits, and the map of the averaged answer lies where the evidence is in the original image (no TensorFlow:
an engine in numpy whose logit is the mean of a signed map it computes from the image)."""
from __future__ import annotations

import numpy as np
import pytest

from cxr_core.core.config import DataConfig, ModelConfig, RunConfig
from cxr_core.data import views as tta
from cxr_core.inference.predictor import Predictor

SIZE, GRID = 32, 8
CFG = RunConfig(data=DataConfig(data_dir="x"), model=ModelConfig(backbone="mobilenet_v2", image_size=SIZE))


class _SignedEngine:
    """logit = mean(S) - 0.1, with S the image's brightness above 128 pooled to an 8 x 8 grid: the map that
    explains the logit is S (channels ReLU(S) and ReLU(-S), as both real engines return them)."""

    name = "signed"
    image_size, n_outputs, map_grid = SIZE, 1, (GRID, GRID)

    def __init__(self) -> None:
        self.seen = 0

    def _signed(self, batch: np.ndarray) -> np.ndarray:
        gray = batch[..., 0] / 255.0 - 0.5
        return gray.reshape(len(batch), GRID, SIZE // GRID, GRID, SIZE // GRID).mean(axis=(2, 4))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        self.seen += len(batch)
        return (self._signed(batch).mean(axis=(1, 2)) - 0.1)[:, None].astype(np.float32)

    def explain(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        signed = self._signed(batch)
        return self.logits(batch), np.stack([np.maximum(signed, 0), np.maximum(-signed, 0)], axis=-1)


def _spot(row: int, col: int) -> np.ndarray:
    """A dark image with one bright square whose top-left corner is at (row, col)."""
    gray = np.full((SIZE, SIZE), 40, np.uint8)
    gray[row:row + 8, col:col + 8] = 250
    return gray


def test_the_views_are_the_original_shifts_and_a_zoom() -> None:
    image = np.zeros((1, SIZE, SIZE, 3), np.float32)
    image[0, :, 10, :] = 255.0  # one bright column
    made = tta.make_views(image)
    assert made.shape == (len(tta.VIEWS), SIZE, SIZE, 3)
    np.testing.assert_array_equal(made[0], image[0])  # the original comes first, untouched
    columns = {view.name: int(np.argmax(made[j, SIZE // 2, :, 0])) for j, view in enumerate(tta.VIEWS)}
    shift = round(0.04 * SIZE)
    # Shifting the frame left shows what lay left of it: the column moves right in the view, and back.
    assert columns["shifted left"] == 10 + shift and columns["shifted right"] == 10 - shift
    centre = (SIZE - 1) / 2
    assert columns["zoomed in"] == round(centre + (10 - centre) / 0.9)
    assert all(not view.name.startswith("flip") for view in tta.VIEWS)


def test_the_answer_is_the_mean_of_the_views_logits() -> None:
    engine = _SignedEngine()
    plain, averaged = Predictor(engine, CFG), Predictor(engine, CFG, tta=True)
    grays = [_spot(2, 2), _spot(20, 12), np.full((40, 50), 200, np.uint8)]
    inputs = averaged._inputs(grays)
    expected = engine.logits(tta.make_views(inputs)).reshape(len(grays), len(tta.VIEWS)).mean(axis=1)
    got = [p.probability for p in averaged.predict(grays)]
    np.testing.assert_allclose(got, 1.0 / (1.0 + np.exp(-expected)), rtol=1e-5)
    # Without it, one pass per image, and the answers differ where the views see different things.
    engine.seen = 0
    single = [p.probability for p in plain.predict(grays)]
    assert engine.seen == len(grays)
    assert not np.allclose(single[:2], got[:2])
    engine.seen = 0
    averaged.predict(grays)
    assert engine.seen == len(grays) * len(tta.VIEWS)


def test_the_averaged_map_lies_on_the_evidence_in_the_original_frame() -> None:
    engine = _SignedEngine()
    gray = _spot(16, 20)
    (found,) = Predictor(engine, CFG, tta=True).explain([gray], target="PNEUMONIA")
    heat = found.heatmap
    assert heat.shape == gray.shape
    inside, outside = heat[16:24, 20:28].mean(), np.delete(heat, np.s_[14:26], axis=0).mean()
    assert inside > 0.5 and outside < 0.1
    # Its peak is where the single-view map puts it: moving each view's map back undid the shifts and the zoom.
    (single,) = Predictor(engine, CFG).explain([gray], target="PNEUMONIA")
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert single.heatmap[peak] == pytest.approx(single.heatmap.max(), abs=0.15)
    # The NORMAL map is where the dark background lowered the score, not the bright square.
    (normal,) = Predictor(engine, CFG, tta=True).explain([gray], target="NORMAL")
    assert normal.heatmap[16:24, 20:28].mean() < 0.1 < normal.heatmap[:8, :8].mean()


def test_a_signed_map_is_averaged_before_its_relu() -> None:
    # Two views of one image: +1 in one, -1 in the other at the same place: the evidence cancels.
    cams = np.zeros((2, 2, 2, 2), np.float32)
    cams[0, ..., 0] = 1.0
    cams[1, ..., 1] = 1.0
    views = (tta.View("original"), tta.View("again"))
    mean = tta.aligned_maps(cams, 4, signed=True, views=views)
    assert mean.shape == (1, 4, 4, 2) and np.allclose(mean, 0.0)
    # A softmax head's ReLU'd class maps are averaged as they are.
    both = tta.aligned_maps(cams, 4, signed=False, views=views)
    np.testing.assert_allclose(both[0, ..., 0], 0.5) and np.testing.assert_allclose(both[0, ..., 1], 0.5)


def test_each_views_map_is_moved_back_before_the_average(monkeypatch) -> None:
    # Two of three views far to one side: a map left in its view's frame would put the peak beside the evidence.
    monkeypatch.setattr(tta, "VIEWS", (tta.View("original"), tta.View("far left", dx=-0.25),
                                       tta.View("left", dx=-0.2)))
    gray = _spot(12, 4)
    (found,) = Predictor(_SignedEngine(), CFG, tta=True).explain([gray], target="PNEUMONIA")
    row, col = np.unravel_index(np.argmax(found.heatmap), found.heatmap.shape)
    assert 12 <= row < 20 and 4 <= col < 12
    assert found.heatmap[12:20, 4:12].mean() > 2 * found.heatmap[12:20, 14:22].mean()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["on", "auto"])
def test_a_run_chooses_its_views_on_validation_and_predicts_with_them(tiny_dataset, tmp_path, mode) -> None:
    import json

    from conftest import TINY_PRETRAINED
    from cxr_core.core.config import TrainConfig
    from cxr_core.engine.train import train
    from cxr_core.runs.run_folder import RunFolder

    config = RunConfig(data=DataConfig(data_dir=str(tiny_dataset), split="random"), model=TINY_PRETRAINED,
                       train=TrainConfig(epochs=2, batch_size=8, tta=mode, export_litert=False))
    run = train(config, run_dir=tmp_path / f"run-{mode}")
    record = json.loads((run / "metrics.json").read_text())["tta"]
    assert record["mode"] == mode and record["views"] == [view.name for view in tta.VIEWS]
    assert set(record) >= {"val_auc_one", "val_auc_views"}
    assert record["used"] == (mode == "on" or record["val_auc_views"] > record["val_auc_one"])
    assert RunFolder(run).read_tta() is record["used"]
    # What the run stored for its validation and test images is what its predictor now says of them.
    predictor = Predictor.from_run(run)
    assert predictor.tta is record["used"]
    stored = RunFolder(run).read_predictions()
    from cxr_core.io.images import load_gray

    again = [p.probability for p in predictor.predict([load_gray(path) for path in stored["path"]])]
    np.testing.assert_allclose(again, stored["probability"].to_numpy(), atol=1e-4)


def test_a_run_without_views_predicts_with_one_look(tmp_path) -> None:
    from cxr_core.runs.run_folder import RunFolder

    assert RunFolder(tmp_path).read_tta() is False
    (tmp_path / "metrics.json").write_text('{"tta": {"mode": "auto", "used": true}}')
    assert RunFolder(tmp_path).read_tta() is True
    with pytest.raises(Exception, match="tta must be one of off, auto, on"):
        RunConfig(train=__import__("cxr_core.core.config", fromlist=["TrainConfig"]).TrainConfig(tta="always"))


@pytest.mark.slow
def test_views_chosen_after_training_on_validation_rewrite_the_run(shared_dir, tmp_path, monkeypatch) -> None:  # noqa: ARG001
    import shutil
    from pathlib import Path

    from cxr_core.evaluation.recalibrate import choose_views_after
    from cxr_core.io.images import load_gray
    from cxr_core.runs.run_folder import RunFolder

    demo = Path(__file__).resolve().parents[1] / "artifacts" / "demo-mobilenet"
    run = shutil.copytree(demo, tmp_path / "run")
    monkeypatch.chdir(demo.parents[1])  # the stored paths are relative to the project (../shared/...)
    folder = RunFolder(run)
    off = choose_views_after(run, "off")
    assert off["used"] is False and folder.read_tta() is False and off["val_auc_views"] > 0.9
    stored = folder.read_predictions()
    sample = stored.groupby("split").head(3)
    once = Predictor.from_run(run)
    assert once.tta is False and once.threshold == pytest.approx(folder.read_metrics()["threshold"])
    np.testing.assert_allclose([p.probability for p in once.predict([load_gray(x) for x in sample["path"]])],
                               sample["probability"], atol=1e-5)
    assert folder.read_evaluations()["kermany224-test-dev"]["tta"] is False

    auto = choose_views_after(run, "auto")
    assert auto["used"] is (auto["val_auc_views"] > auto["val_auc_one"]) and auto["val_auc_one"] == off["val_auc_one"]
    assert folder.read_tta() is auto["used"]
    stored = folder.read_predictions()
    sample = stored.groupby("split").head(3)
    again = Predictor.from_run(run)
    np.testing.assert_allclose([p.probability for p in again.predict([load_gray(x) for x in sample["path"]])],
                               sample["probability"], atol=1e-5)
    # The stored external evaluation was made again, as the run now predicts.
    assert folder.read_evaluations()["kermany224-test-dev"]["tta"] is auto["used"]


def test_the_command_line_follows_the_run_unless_told() -> None:
    from cxr_core import cli

    parse = cli._parser().parse_args
    assert parse(["evaluate", "--run", "r", "--data", "d"]).tta is None  # as the run chose
    assert parse(["evaluate", "--run", "r", "--data", "d", "--no-tta"]).tta is False
    assert parse(["predict", "--run", "r", "f.png", "--tta"]).tta is True
    assert parse(["calibrate", "--run", "r", "--tta", "auto"]).tta == "auto"
    assert parse(["train", "--data", "d", "--tta", "on"]).tta == "on"
