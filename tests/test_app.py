"""AppTest for every page: empty state, with a small data set, and with a finished run.

Each test drives Home.py (the router) and switches to a page, as a user does. Render times of
every page are printed and written to render_times.json in the test artifacts folder
(``$CXR_TEST_ARTIFACTS``, else pytest's temporary directory; see conftest.py).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from conftest import TINY_PRETRAINED, TINY_WEIGHTS, make_dataset
from cxr_core.core.settings import find

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HOME = str(PROJECT_ROOT / "Home.py")
TIMEOUT = 120  # the first Training/Predict render imports TensorFlow

# Keys of pages/ui/session.py, repeated here on purpose: a renamed key should fail a test.
KEY_DATASET, KEY_RUN, KEY_SPLIT, KEY_AUGMENT = "dataset", "run", "split_mode", "augment_config"

RENDER_TIMES: dict[str, float] = {}


def render(at: AppTest, page: str | None, label: str) -> AppTest:
    """Run (after switching to ``page``), record the wall time, and fail on any exception shown."""
    if page:
        at.switch_page(page)
    start = time.perf_counter()
    at.run(timeout=TIMEOUT)
    elapsed = time.perf_counter() - start
    RENDER_TIMES[label] = round(elapsed, 2)
    print(f"render time {label}: {elapsed:.2f} s")
    assert not at.exception, f"{label}: {[e.value for e in at.exception]}"
    return at


@pytest.fixture(scope="module", autouse=True)
def _write_render_times(test_artifacts):
    yield
    path = test_artifacts / "render_times.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**old, **RENDER_TIMES}, indent=2))
    print("\nAppTest render times (s):", json.dumps(RENDER_TIMES, indent=1))


def text_of(at: AppTest) -> str:
    """All visible text of the last run (markdown, captions, alerts, metrics, headings)."""
    parts = []
    for kind in ("markdown", "caption", "info", "warning", "error", "success", "title", "subheader", "header"):
        parts += [str(e.value) for e in getattr(at, kind)]
    parts += [f"{m.label} {m.value}" for m in at.metric]
    return "\n".join(parts)


def data_root() -> Path:
    return Path(os.environ["CXR_DATA_ROOT"])


@pytest.fixture
def small_kermany() -> str:
    """A 60-image data set in the Kermany layout, in the data root the app reads."""
    make_dataset(data_root() / "small", n_normal=20, n_pneumonia=40, size=48, layout="kermany")
    return "small"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A tiny finished run trained in-process with cxr_core.engine.train.train (MobileNetV2 0.35, 32 px)."""
    from cxr_core.core.config import DataConfig, RunConfig, TrainConfig
    from cxr_core.engine import train

    base = tmp_path_factory.mktemp("trained")
    data_dir = make_dataset(base / "tiny", n_normal=20, n_pneumonia=40, size=48)
    config = RunConfig(
        data=DataConfig(data_dir=str(data_dir), split="random"),
        model=TINY_PRETRAINED,
        train=TrainConfig(epochs=2, batch_size=16, balance="none", cache_dir=str(base / "cache")),
    )
    run_dir = train.train(config, run_dir=base / "runs" / "tiny-run")
    from cxr_core.runs import registry as runs

    assert runs.read_status(run_dir)["state"] == "done", runs.read_status(run_dir)
    return run_dir


@pytest.fixture
def finished_run(trained_run) -> Path:
    """The tiny run copied into this test's runs folder."""
    target = Path(os.environ["CXR_RUNS_DIR"]) / trained_run.name
    shutil.copytree(trained_run, target)
    return target


def png_bytes(pneumonia: bool) -> bytes:
    from conftest import _xray_like

    ok, buffer = cv2.imencode(".png", _xray_like(np.random.default_rng(1), 64, pneumonia))
    assert ok
    return buffer.tobytes()


# --- Empty state: no data set, no runs, no internet ----------------------------------------------
EMPTY_EXPECTATIONS = {
    "pages/home.py": ["The four steps", "not a medical device", "No data set chosen yet"],
    "pages/dataset.py": ["A model can only be as good", "Next step", "Synthetic images, not X-rays"],
    "pages/augmentation.py": ["must stay **realistic**", "drawn example", "2,152 augmented NORMAL"],
    "pages/training.py": ["transfer learning", "Choose a data set on the **Dataset** page first"],
    "pages/evaluation.py": ["never saw during training", "No finished run yet"],
    "pages/predict.py": ["Grad-CAM", "There is no trained model yet", "not a medical device"],
}


@pytest.mark.parametrize("page", list(EMPTY_EXPECTATIONS))
def test_page_renders_with_no_data_and_no_runs(page):
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    render(at, page, f"{Path(page).stem} (empty)")
    text = text_of(at)
    for expected in EMPTY_EXPECTATIONS[page]:
        assert expected in text, f"{page}: {expected!r} missing"
    # The sidebar says what is chosen on every page.
    sidebar = "\n".join(str(m.value) for m in at.sidebar.markdown)
    assert "Data set" in sidebar and "Run" in sidebar


# --- With a data set -----------------------------------------------------------------------------
def test_dataset_page_shows_counts_splits_and_samples(small_kermany):
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    at.session_state[KEY_DATASET] = small_kermany
    render(at, "pages/dataset.py", "dataset (60 images)")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Images"] == "60" and metrics["Normal"] == "20" and metrics["Pneumonia"] == "40"
    text = text_of(at)
    assert "2.0 PNEUMONIA images for every NORMAL image" in text
    assert "leaks information" in text  # the random split's lesson
    assert len(at.image) >= 1     # the sample grid
    control = at.segmented_control(key="dataset_split_mode")
    assert "Official Kermany test set" in control.options  # a Kermany layout offers the official split
    control.set_value("official")
    render(at, None, "dataset (official split)")
    assert at.session_state[KEY_SPLIT] == "official"
    assert "harder than any random split" in text_of(at)
    # The sidebar shows the chosen data set.
    assert any(small_kermany in str(m.value) for m in at.sidebar.markdown)


def test_dataset_page_makes_and_selects_the_practice_set():
    make_dataset(data_root() / "other", n_normal=4, n_pneumonia=4, size=32)  # so the new set is not the only one
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    render(at, "pages/dataset.py", "dataset (empty)")
    at.button(key="make_practice").click()
    render(at, None, "dataset (practice set made)")
    assert "synthetic" in at.session_state[KEY_DATASET].lower()
    # The sidebar, drawn before the page, names the new set after the same click.
    assert any(at.session_state[KEY_DATASET] in str(m.value) for m in at.sidebar.markdown)
    assert "synthetic" in text_of(at).lower()
    assert {m.label: m.value for m in at.metric}["Images"] == "220"


def test_dataset_page_unpacks_an_uploaded_zip(tmp_path):
    import zipfile

    source = make_dataset(tmp_path / "zipped", n_normal=10, n_pneumonia=12, size=40)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(source.rglob("*.jpeg")):
            archive.write(path, path.relative_to(source).as_posix())
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    render(at, "pages/dataset.py", "dataset (empty)")
    at.file_uploader(key="dataset_zip").set_value(("My X-rays.zip", buffer.getvalue(), "application/zip"))
    render(at, None, "dataset (zip uploaded)")
    next(b for b in at.button if b.label.startswith("Unpack into the data folder")).click()
    render(at, None, "dataset (zip unpacked)")
    assert at.session_state[KEY_DATASET] == "My-X-rays"
    assert {m.label: m.value for m in at.metric}["Images"] == "22"


def test_dataset_download_failure_is_one_sentence(monkeypatch):
    """Offline, the Kermany download fails: the page shows cxr_core's sentence, not a traceback."""
    from cxr_core.core.errors import DownloadError
    from cxr_core.data import download

    def offline(*_args, **_kwargs):
        raise DownloadError(
            "The download failed because the server could not be reached; check the connection and try again.")

    monkeypatch.setattr(download, "download_kermany", offline)
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    render(at, "pages/dataset.py", "dataset (empty)")
    at.button(key="download_kermany").click()
    render(at, None, "dataset (download failed)")
    assert [e.value for e in at.error] == [
        "The download failed because the server could not be reached; check the connection and try again."]


def test_augmentation_preview_follows_the_sliders(small_kermany):
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    at.session_state[KEY_DATASET] = small_kermany
    render(at, "pages/augmentation.py", "augmentation (60 images)")
    assert len(at.image) >= 1
    assert at.session_state[KEY_AUGMENT]["rotation_range"] == pytest.approx(0.3)
    at.slider(key="aug_rotation").set_value(20.0)
    render(at, None, "augmentation (slider moved)")
    assert at.session_state[KEY_AUGMENT]["rotation_range"] == pytest.approx(20.0)
    assert any("more tilt than a real chest film" in w.value for w in at.warning)
    assert {m.label for m in at.metric} >= {"NORMAL in training", "Augmented NORMAL added"}
    # The chosen parameters are carried to Training.
    render(at, "pages/training.py", "training (data set chosen)")
    assert "rotation ±20°" in text_of(at)


@pytest.mark.slow
def test_training_page_recipe_fills_the_form_and_the_augmentation_plan_follows_the_limit(small_kermany):
    from cxr_core.core.recipes import RECIPES

    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    at.session_state[KEY_DATASET] = small_kermany
    render(at, "pages/training.py", "training (data set chosen)")
    at.selectbox(key="train_backbone").set_value("mobilenet_v2")
    render(at, None, "training (backbone chosen)")
    at.selectbox(key="train_recipe").set_value("quick")
    render(at, None, "training (recipe chosen)")
    assert not at.warning or all("Session State" not in w.value for w in at.warning)
    quick = RECIPES["quick"].settings
    assert at.number_input(key="train_limit").value == find("data.limit").to_widget(quick["data"]["limit"])
    assert at.select_slider(key="train_size_mobilenet_v2").value == quick["model"]["image_size"]
    assert at.number_input(key="train_epochs").value == quick["train"]["epochs"]
    assert at.selectbox(key="train_split").value == quick["data"]["split"]
    assert RECIPES["quick"].purpose in text_of(at)
    # A person's change wins over the recipe.
    at.number_input(key="train_epochs").set_value(3)
    render(at, None, "training (recipe overridden)")
    assert at.number_input(key="train_epochs").value == 3
    # The Augmentation page plans the same images as training: the limit applies there too.
    at.number_input(key="train_limit").set_value(30)
    render(at, None, "training (limit)")
    render(at, "pages/augmentation.py", "augmentation (limit)")
    assert any("stratified subset of 30 images" in c.value for c in at.caption)
    normal, pneumonia = (int(m.value.replace(",", "")) for m in at.metric[:2])
    assert normal + pneumonia < 30  # the training part of 30 images, not of all 60


def test_training_page_checks_the_starting_weights_before_a_run_can_start(small_kermany):
    """Offline with no ImageNet file, the page says what to do and Start stays disabled; a frozen
    random backbone is refused; the weights choice survives a change of backbone."""
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    at.session_state[KEY_DATASET] = small_kermany
    render(at, "pages/training.py", "training (defaults)")
    start = next(b for b in at.button if b.label == "Start training")
    errors = [e.value for e in at.error]
    assert start.disabled and len(errors) == 1
    assert "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5" in errors[0]
    assert "choose or upload a weights file" in errors[0] and "--weights" not in errors[0]
    # Random weights with a frozen backbone cannot learn.
    at.selectbox(key="train_weights").set_value("none")
    render(at, None, "training (random, frozen)")
    assert any("cannot learn while it stays frozen" in e.value for e in at.error)
    assert next(b for b in at.button if b.label == "Start training").disabled
    # The choice is kept when the backbone changes; fine-tuning all layers makes it trainable.
    at.selectbox(key="train_backbone").set_value("mobilenet_v2")
    render(at, None, "training (backbone changed)")
    assert at.selectbox(key="train_weights").value == "none"
    at.selectbox(key="train_ft_layers").set_value(-1)
    render(at, None, "training (from scratch)")
    assert not at.error
    assert not next(b for b in at.button if b.label == "Start training").disabled
    # A cached ImageNet file is offered as such and needs no network.
    cache = Path(os.environ["KERAS_HOME"]) / "models"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    at.selectbox(key="train_weights").set_value("imagenet")
    render(at, None, "training (ImageNet cached)")
    assert "on this machine" in at.selectbox(key="train_weights").format_func("imagenet")
    assert not at.error


# --- Training: launch a tiny background run and watch it finish ----------------------------------
@pytest.mark.slow
def test_training_page_launches_a_tiny_run_and_shows_its_curves(small_kermany):
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    at.session_state[KEY_DATASET] = small_kermany
    render(at, "pages/training.py", "training (data set chosen)")
    # A weights file in the weights folder is offered for its backbone (and fixes MobileNetV2's width).
    weights_dir = Path(os.environ["CXR_WEIGHTS_DIR"])
    weights_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(TINY_WEIGHTS, weights_dir / "mobilenet_v2_0.35_tiny.weights.h5")
    at.selectbox(key="train_backbone").set_value("mobilenet_v2")
    render(at, None, "training (backbone chosen)")
    assert at.selectbox(key="train_weights").value == str(weights_dir / "mobilenet_v2_0.35_tiny.weights.h5")
    at.select_slider(key="train_size_mobilenet_v2").set_value(32)
    at.number_input(key="train_epochs").set_value(2)
    at.select_slider(key="train_batch").set_value(16)
    render(at, None, "training (form)")
    assert "Estimated time" in text_of(at)
    next(b for b in at.button if b.label == "Start training").click()
    render(at, None, "training (launched)")
    deadline = time.time() + 180
    while time.time() < deadline:
        if any("Finished" in s.value for s in at.success) or at.error:
            break
        time.sleep(2)
        render(at, None, "training (live view)")
    assert not at.error, [e.value for e in at.error]
    assert any("Finished" in s.value for s in at.success), "the run did not finish in time"
    assert len(at.get("plotly_chart")) >= 3  # loss, accuracy and AUC curves
    from cxr_core.runs.run_folder import RunFolder

    history = RunFolder(Path(at.session_state[KEY_RUN])).read_history()
    assert len(history) == 2
    assert at.dataframe  # the past-runs table


# --- With a finished run ---------------------------------------------------------------------------
@pytest.mark.slow
def test_evaluation_page_shows_the_metrics_of_a_finished_run(finished_run):
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    render(at, "pages/evaluation.py", "evaluation (finished run)")
    metrics = {m.label: m.value for m in at.metric}
    # No external evaluation yet: the run's own test part is the only test set, labelled as internal.
    assert {"Internal ROC AUC", "Sensitivity", "Specificity", "Threshold", "Brier score"} <= set(metrics)
    assert at.session_state[KEY_RUN] == str(finished_run)
    assert len(at.get("plotly_chart")) >= 4  # confusion matrix, ROC, PR, calibration
    slider = next(s for s in at.slider if s.label == "Threshold")
    # The slider starts at this run's own threshold (it follows the run, not an earlier choice).
    threshold = json.loads((finished_run / "metrics.json").read_text())["threshold"]
    assert slider.value == pytest.approx(round(threshold, 3))
    slider.set_value(0.0)
    render(at, None, "evaluation (threshold 0)")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Sensitivity"] == "1.000"  # everything is called pneumonia at threshold 0
    # Grad-CAM of the misclassified images (at threshold 0 every normal image is a false positive).
    at.toggle(key="eval_gradcam").set_value(True)
    render(at, None, "evaluation (Grad-CAM gallery)")
    # Each map shows the evidence for the wrong call (PNEUMONIA), said once; a map with nothing in it
    # (a 1 x 1 grid whose one cell lowered the score) is one line instead of a blank square.
    assert "Highlighted: regions that raised the pneumonia score." in [c.value for c in at.caption]
    notes = [i.value for i in at.info if "No region raised the pneumonia score" in i.value]
    assert len(at.image) + len(notes) >= 1


@pytest.mark.slow
def test_evaluation_page_evaluates_a_run_on_another_folder_and_shows_it_first(finished_run):
    make_dataset(data_root() / "other", n_normal=10, n_pneumonia=10, size=40, seed=7)
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    render(at, "pages/evaluation.py", "evaluation (finished run)")
    at.selectbox(key="eval_other_dataset").set_value("other")
    next(b for b in at.button if b.label == "Evaluate on this data set").click()
    render(at, None, "evaluation (another folder)")
    assert not at.error, [e.value for e in at.error]
    # Stored with the run, and now the first test set the page shows: the honest score.
    stored = json.loads((finished_run / "evaluations" / "other.json").read_text())
    assert stored["n"] == 20
    assert at.radio(key="eval_test_set").value == "external: other"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["External ROC AUC"] == f"{stored['roc_auc']:.3f}"
    assert any("20 images of the data set other" in c.value for c in at.caption)
    # Each headline figure with its bootstrap interval; the made-up names hold two or three films per child.
    low, high = stored["intervals"]["roc_auc"]
    assert any(f"ROC AUC {stored['roc_auc']:.3f} (95 % CI {low:.2f}–{high:.2f}, by patient)" in c.value
               for c in at.caption)
    # The run's own test part is still there, second.
    assert at.radio(key="eval_test_set").options[-1] == "internal: the run's own test part"


@pytest.mark.slow
def test_predict_page_classifies_uploads_and_reports_a_bad_file(finished_run, monkeypatch):
    import pandas as pd
    import streamlit

    from cxr_core.inference.predictor import Predictor
    from cxr_core.io.images import load_gray

    downloads = []
    real_download_button = streamlit.download_button

    def recording_download_button(label, data, *args, **kwargs):
        downloads.append((label, data, kwargs))
        return real_download_button(label, data, *args, **kwargs)

    monkeypatch.setattr(streamlit, "download_button", recording_download_button)
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    render(at, "pages/predict.py", "predict (run, no upload)")
    at.file_uploader(key="predict_upload").set_value([
        ("chest.png", png_bytes(True), "image/png"),
        ("broken.jpg", b"this is not an image", "image/jpeg"),
    ])
    render(at, None, "predict (2 uploads)")
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "broken.jpg" in errors[0]
    assert "Traceback" not in errors[0]
    table = at.dataframe[0].value
    assert list(table["file"]) == ["chest.png", "broken.jpg"]
    # The page shows what the run's own Predictor says about the same bytes.
    reference = Predictor.from_run(finished_run)
    expected = reference.predict([load_gray(png_bytes(True), "chest.png")])[0].probability
    expected_label = "PNEUMONIA" if expected >= reference.threshold else "NORMAL"
    assert float(table.loc[0, "probability"]) == pytest.approx(expected, abs=2e-4)
    assert table.loc[0, "label"] == expected_label
    assert len(at.image) >= 1  # original and Grad-CAM overlay
    # The CSV download holds the same rows, with the run and the threshold used.
    assert [b.label for b in at.download_button] == ["Download the results as CSV"]
    assert len(downloads) == 1
    label, data, kwargs = downloads[0]
    assert label == "Download the results as CSV"
    assert kwargs["file_name"] == "predictions.csv" and kwargs["mime"] == "text/csv"
    csv = pd.read_csv(io.StringIO(data if isinstance(data, str) else data.decode()))
    assert list(csv["file"]) == ["chest.png", "broken.jpg"]
    assert csv.loc[0, "probability"] == pytest.approx(expected, abs=2e-4)
    assert csv.loc[0, "label"] == expected_label
    assert pd.isna(csv.loc[1, "probability"]) and pd.isna(csv.loc[1, "label"]) and len(str(csv.loc[1, "error"])) > 10
    assert set(csv["run"]) == {finished_run.name}
    assert csv.loc[0, "threshold"] == pytest.approx(reference.threshold, abs=1e-6)


# --- The shipped demo run ------------------------------------------------------------------------
def test_predict_page_uses_the_shipped_demo_run_by_default(monkeypatch):
    from cxr_core.runs import registry as runs
    from cxr_core.runs.run_folder import RunFolder

    monkeypatch.delenv("CXR_DEMO_RUN")
    if not RunFolder(runs.DEMO_RUN_DIR).has_model():
        pytest.skip("no demo run in artifacts/")
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    render(at, "pages/predict.py", "predict (demo run)")
    assert "demo" in at.selectbox[0].value.lower() or "demo" in text_of(at).lower()
    at.file_uploader(key="predict_upload").set_value([("chest.png", png_bytes(True), "image/png")])
    render(at, None, "predict (demo, 1 upload)")
    table = at.dataframe[0].value
    from cxr_core.inference.predictor import Predictor
    from cxr_core.io.images import load_gray

    demo = Predictor.from_run(runs.DEMO_RUN_DIR)
    expected = demo.predict([load_gray(png_bytes(True), "chest.png")])[0].probability
    assert float(table.loc[0, "probability"]) == pytest.approx(expected, abs=2e-4)
    assert table.loc[0, "label"] == ("PNEUMONIA" if expected >= demo.threshold else "NORMAL")


def normal_png(lungs: int = 40, chest: int = 230) -> bytes:
    """Two dark, soft lung fields in a bright chest: an image the demo run calls NORMAL (p about 0.04)."""
    yy, xx = np.mgrid[0:128, 0:128] / 128
    img = np.full((128, 128), chest, np.float32)
    for cx in (0.32, 0.68):
        img[((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1] = lungs
    ok, buffer = cv2.imencode(".png", cv2.GaussianBlur(img, (0, 0), 4).astype(np.uint8))
    assert ok
    return buffer.tobytes()


def test_predict_page_says_what_the_map_of_each_result_shows(monkeypatch):
    """A NORMAL result shows the evidence for NORMAL (not a blank square), with a line saying so; a map
    with nothing in it is replaced by one line."""
    from cxr_core.inference.predictor import Predictor, map_caption
    from cxr_core.io.images import load_gray
    from cxr_core.runs import registry as runs
    from cxr_core.runs.run_folder import RunFolder

    monkeypatch.delenv("CXR_DEMO_RUN")
    if not RunFolder(runs.DEMO_RUN_DIR).has_model():
        pytest.skip("no demo run in artifacts/")
    demo = Predictor.from_run(runs.DEMO_RUN_DIR)
    assert demo.predict([load_gray(normal_png(), "normal.png")])[0].label == "NORMAL"
    assert demo.predict([load_gray(png_bytes(True), "chest.png")])[0].label == "PNEUMONIA"
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    render(at, "pages/predict.py", "predict (demo run)")
    at.file_uploader(key="predict_upload").set_value([("normal.png", normal_png(), "image/png"),
                                                      ("chest.png", png_bytes(True), "image/png")])
    render(at, None, "predict (demo, NORMAL and PNEUMONIA)")
    assert list(at.dataframe[0].value["label"]) == ["NORMAL", "PNEUMONIA"]
    captions = [c.value for c in at.caption]
    assert captions.count("Highlighted: regions that lowered the pneumonia score (evidence for NORMAL).") == 1
    assert captions.count(map_caption("PNEUMONIA")) == 1
    assert len(at.image) == 4  # each X-ray and its overlay
    assert not at.info

    # No region holds evidence for the label: one line instead of an empty overlay.
    real = Predictor.explain

    def without_evidence(self, grays, target=None):
        return [dataclasses.replace(e, heatmap=np.zeros_like(e.heatmap)) for e in real(self, grays, target)]

    monkeypatch.setattr(Predictor, "explain", without_evidence)
    at.file_uploader(key="predict_upload").set_value([("flat.png", normal_png(30, 255), "image/png")])
    render(at, None, "predict (demo, a map without evidence)")
    assert [i.value for i in at.info] == [map_caption("NORMAL", empty=True)]
    assert len(at.image) == 1  # the X-ray only


# --- Small runs written by hand (no training): evaluation and training details -------------------
def fake_run(name: str, p_test, y_test, p_val=None, y_val=None, config: bool = True, state: str = "done",
             history: list[dict] | None = None, **status) -> Path:
    """A run folder with metrics.json and predictions.csv computed from the given probabilities, a
    placeholder model file (the pages only check it exists) and the given state."""
    import pandas as pd

    from conftest import TINY_MODEL
    from cxr_core.core import metrics as evaluate
    from cxr_core.core.config import DataConfig, RunConfig
    from cxr_core.runs.run_folder import RunFolder

    folder = RunFolder(Path(os.environ["CXR_RUNS_DIR"]) / name)
    folder.path.mkdir(parents=True)
    if config:
        folder.write_config(RunConfig(data=DataConfig(data_dir=str(data_root() / "somewhere")), model=TINY_MODEL))
    p_val, y_val = (p_test, y_test) if p_val is None else (p_val, y_val)
    if state == "done":
        folder.write_metrics(evaluate.metrics_report(y_val, p_val, y_test, p_test))
        rows = [{"path": f"/nowhere/{split}{i}.png", "y": int(y), "probability": float(p), "split": split}
                for split, ys, ps in (("val", y_val, p_val), ("test", y_test, p_test))
                for i, (y, p) in enumerate(zip(ys, ps))]
        folder.write_predictions(pd.DataFrame(rows))
        folder.model_path.write_bytes(b"placeholder")
    if history:
        folder.write_history(history)
    folder.write_status(state, **status)
    return folder.path


def _figure(at: AppTest, key_part: str) -> dict:
    """The plotly figure (as JSON) whose element id contains ``key_part``."""
    chart = next(c for c in at.get("plotly_chart") if key_part in c.proto.id)
    return json.loads(chart.proto.spec)


@pytest.mark.slow
def test_evaluation_slider_follows_the_run_and_small_details():
    y = np.array([0] * 10 + [1] * 10)
    rng = np.random.default_rng(0)
    p_a = np.where(y == 1, rng.uniform(0.1, 0.3, 20), rng.uniform(0.0, 0.2, 20))
    run_a = fake_run("run-a", p_a, y)
    run_b = fake_run("run-b", np.full(20, 0.183), y, config=False)  # flat: threshold 1.0, no config.json
    threshold_a = round(json.loads((run_a / "metrics.json").read_text())["threshold"], 3)
    assert json.loads((run_b / "metrics.json").read_text())["threshold"] == 1.0
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    at.session_state[KEY_RUN] = str(run_a)
    render(at, "pages/evaluation.py", "evaluation (hand-made run a)")
    slider = next(s for s in at.slider if s.label == "Threshold")
    assert slider.value == pytest.approx(threshold_a)
    slider.set_value(0.6)
    render(at, None, "evaluation (threshold moved)")
    # Another run: its own threshold, not the value left by the first one; and back again.
    at.selectbox(key="eval_run").set_value(str(run_b))
    render(at, None, "evaluation (run b)")
    assert next(s for s in at.slider if s.label == "Threshold").value == pytest.approx(1.0)
    assert {m.label: m.value for m in at.metric}["Threshold"] == "1.000"
    at.selectbox(key="eval_run").set_value(str(run_a))
    render(at, None, "evaluation (run a again)")
    assert next(s for s in at.slider if s.label == "Threshold").value == pytest.approx(threshold_a)
    # 20 test images, 10 of each class: the intervals are wide, and the page says how wide.
    assert any("95 % intervals: sensitivity" in c.value for c in at.caption)
    assert any(w.value.startswith("Few test images: sensitivity or specificity is known only to within ±")
               for w in at.warning)
    # Every table shows a missing value as a dash; the compare table has short headers.
    at.selectbox(key="eval_compare").set_value(str(run_b))
    render(at, None, "evaluation (compare)")
    assert at.dataframe and all(d.proto.placeholder == "—" for d in at.dataframe)
    configs = next(d for d in at.dataframe if "backbone" in d.value.index)
    assert list(configs.value.columns) == ["this run", "compared"]
    assert configs.value["compared"].isna().all()  # run b has no config.json: dashes, not "None"
    assert configs.value.loc["fine-tune", "this run"] == "none"
    # The ROC axes stay 0..1 even for run b's flat (diagonal) curve.
    layout = _figure(at, "compare_roc")["layout"]
    assert layout["xaxis"]["range"] == [0.0, 1.0] and layout["yaxis"]["range"] == [0.0, 1.02]


def _epochs(val_loss: list[float], loss: list[float]) -> list[dict]:
    return [{"phase": "head", "epoch": i + 1, "loss": lo, "accuracy": 0.8, "auc": 0.5, "val_loss": vl,
             "val_accuracy": 0.5, "val_auc": 0.5 + 0.1 * i} for i, (lo, vl) in enumerate(zip(loss, val_loss))]


def test_training_page_progress_cancel_and_the_run_that_ends(monkeypatch):
    from cxr_core.hosting import jobs
    from cxr_core.runs.run_folder import RunFolder

    run = fake_run("run-live", None, None, state="running", pid=os.getpid(),
                   history=_epochs(val_loss=[0.5, 0.55, 0.6], loss=[0.6, 0.5, 0.4]))
    folder = RunFolder(run)
    for event in ({"event": "stage", "stage": "train", "total": 5}, {"event": "epoch", "epoch": 1, "epochs": 5},
                  {"event": "batch", "batch": 9, "batches": 23}):
        folder.append_progress(event)
    # The job was started by another session (or before a reload): this one only sees it running.
    monkeypatch.setattr(jobs, "active_runs", lambda _root=None: [run])
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    render(at, "pages/training.py", "training (a run in progress)")
    texts = [p.proto.text for p in at.get("progress")]
    assert texts == ["Training the head: epoch 2 of 5"]
    # The overfitting hint comes from the curves: validation loss rose for 2 epochs as training loss fell.
    assert any("risen for the last 2 epochs" in w.value for w in at.warning)
    auc_axis = _figure(at, "curve_run-live_auc")["layout"]["yaxis"]
    assert auc_axis["range"] == [0.0, 1.02]  # a flat AUC does not zoom to -0.5..1.5
    # Cancelling needs a confirmation: there is no one-click Cancel button, only the one in the popover.
    assert not [b for b in at.button if b.label == "Cancel"] and not folder.cancel_requested()
    at.button(key="cancel_confirm_run-live").click()
    render(at, None, "training (cancel confirmed)")
    assert folder.cancel_requested()
    assert "Cancelling: the job stops after the current batch." in [i.value for i in at.info]
    # The job stops: the panel stays, with the run's final state.
    folder.write_status("cancelled", message="cancelled")
    monkeypatch.setattr(jobs, "active_runs", lambda _root=None: [])
    render(at, None, "training (cancelled)")
    assert "This run was cancelled." in [i.value for i in at.info]
    assert any("run-live" in m.value for m in at.markdown)


def test_training_page_says_why_a_run_failed_and_the_runs_table_has_short_headers():
    from cxr_core.runs.run_folder import RunFolder

    run = fake_run("run-failed", None, None, state="failed",
                   error="The data folder /nowhere does not exist; choose a data set on the Dataset page.")
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    at.session_state["launched_run"] = str(run)
    render(at, "pages/training.py", "training (a failed run)")
    assert [e.value for e in at.error][:1] == [
        "This run failed: the data folder /nowhere does not exist; choose a data set on the Dataset page."]
    text = text_of(at)
    assert "No curves: the run failed before its first epoch ended." in text
    assert "Curves appear after the first epoch" not in text
    assert RunFolder(run).read_history().empty
    table = at.dataframe[-1]
    assert table.proto.placeholder == "—"  # the failed run has no AUC: a dash, not "None"
    headers = {name: spec.get("label") for name, spec in json.loads(table.proto.columns).items()}
    assert headers["external accuracy"] == "ext. acc." and headers["best val AUC"] == "val AUC"


# --- Reloads and links: the URL keeps the choices --------------------------------------------------
def test_the_only_data_set_is_chosen(small_kermany):
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "home (one data set)")
    assert at.session_state[KEY_DATASET] == small_kermany  # nobody chose it: it is the only one
    assert any(small_kermany in str(m.value) for m in at.sidebar.markdown)
    assert at.query_params["dataset"] == small_kermany


def test_a_link_with_settings_fills_the_widgets_and_ignores_what_cannot_be_used(small_kermany):
    from cxr_core.core.backbones import BACKBONES

    make_dataset(data_root() / "other", n_normal=4, n_pneumonia=4, size=32)
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    at.query_params.update({
        "dataset": small_kermany, "split": "patient", "rotation_range": "60", "horizontal_flip": "false",
        "brightness_range": ["0.8", "1.2"], "train_epochs": "7", "train_lr": "0.0003",
        "train_backbone": BACKBONES["mobilenet_v2"].label,
        # Values that cannot be used, and a parameter the app does not know: ignored.
        "zoom": "a lot", "balance": "sometimes", "run": "no-such-run", "train_batch": "33", "train_rule": "coin",
        "utm_source": "mail",
    })
    at.switch_page("pages/training.py")
    render(at, None, "training (opened from a link)")
    assert at.session_state[KEY_DATASET] == small_kermany and at.session_state[KEY_SPLIT] == "patient"
    assert at.selectbox(key="train_backbone").value == "mobilenet_v2"
    assert at.number_input(key="train_epochs").value == 7
    assert at.select_slider(key="train_lr").value == pytest.approx(3e-4)
    assert at.selectbox(key="train_split").value == "patient"
    assert at.select_slider(key="train_batch").value == 32 and at.selectbox(key="train_rule").value == "youden"
    assert at.selectbox(key="train_balance").value == "augment"
    assert "rotation ±60°, flip off, brightness 0.8–1.2, shifts 0.05/0.05, zoom 0" in text_of(at)
    assert KEY_RUN not in at.session_state
    # The URL now holds what is used, and no longer what was ignored.
    params = at.query_params
    assert params["dataset"] == small_kermany and params["split"] == "patient" and params["train_epochs"] == "7"
    assert not {"zoom", "balance", "run", "train_batch", "train_rule"} & set(params)
    # The Augmentation page brings a value beyond its slider (60° > 45°) inside it, without an error.
    render(at, "pages/augmentation.py", "augmentation (from a link)")
    assert at.slider(key="aug_rotation").value == 45.0 and at.toggle(key="aug_flip").value is False


@pytest.mark.slow
def test_a_reload_keeps_the_choices_and_a_reload_during_training_shows_the_runs_own_settings(
        small_kermany, monkeypatch):
    from cxr_core.core.config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
    from cxr_core.hosting import jobs
    from cxr_core.runs.run_folder import RunFolder

    make_dataset(data_root() / "other", n_normal=4, n_pneumonia=4, size=32)
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    at.session_state[KEY_DATASET] = small_kermany
    at.session_state[KEY_SPLIT] = "patient"
    render(at, "pages/augmentation.py", "augmentation")
    at.slider(key="aug_zoom").set_value(0.1)
    render(at, None, "augmentation (zoom)")
    # AppTest runs a page without Home.py after the first run, so what a page's body chose reaches
    # the URL at the next page's header (in a browser, Home.py writes it at the end of the same run).
    render(at, "pages/home.py", "home")
    assert at.query_params["zoom"] == "0.1"
    reloaded = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    reloaded.query_params.update(at.query_params)  # a reload: a new session with the same URL
    render(reloaded, None, "home (reloaded)")
    assert reloaded.session_state[KEY_DATASET] == small_kermany and reloaded.session_state[KEY_SPLIT] == "patient"
    assert reloaded.session_state[KEY_AUGMENT]["zoom"] == pytest.approx(0.1)

    # A run is training (launched from another tab or before the reload): the form shows its settings.
    folder = RunFolder(Path(os.environ["CXR_RUNS_DIR"]) / "run-training")
    folder.write_config(RunConfig(
        data=DataConfig(data_dir=str(data_root() / small_kermany), split="random", limit=30),
        augment=AugmentConfig(rotation_range=4.0),
        model=ModelConfig(backbone="mobilenet_v2", weights="none", image_size=64, alpha=0.5),
        train=TrainConfig(epochs=4, batch_size=16, learning_rate=3e-3, balance="class_weight", recipe="quick")))
    folder.write_status("running", pid=os.getpid())
    monkeypatch.setattr(jobs, "active_run", lambda *_args, **_kwargs: folder.path)
    during = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    during.query_params.update({"dataset": "other"})
    during.switch_page("pages/training.py")
    render(during, None, "training (reloaded while a run trains)")
    assert during.selectbox(key="train_backbone").value == "mobilenet_v2"
    assert during.select_slider(key="train_size_mobilenet_v2").value == 64
    assert during.select_slider(key="train_alpha_free").value == 0.5
    assert during.number_input(key="train_epochs").value == 4
    assert during.select_slider(key="train_batch").value == 16
    assert during.selectbox(key="train_balance").value == "class_weight"
    assert during.number_input(key="train_limit").value == 30
    assert during.selectbox(key="train_recipe").value == "quick"
    assert "rotation ±4°" in text_of(during)
    assert during.session_state[KEY_DATASET] == "other"  # the link named a data set: it wins


# --- Faults a class found on the Training page -----------------------------------------------------
def _blocks(node):
    """Every block and element under ``node`` (AppTest's tree), depth first."""
    yield node
    for child in getattr(node, "children", {}).values():
        yield from _blocks(child)


def _popover_open(at: AppTest, label: str) -> bool:
    """Whether the popover with ``label`` is drawn open."""
    protos = [getattr(b, "proto", None) for b in _blocks(at.main)]
    found = [p.popover for p in protos
             if type(p).__name__ == "Block" and p.HasField("popover") and p.popover.label == label]
    assert len(found) == 1, f"no popover {label}"
    return found[0].open


@pytest.mark.slow
def test_deleting_a_run_deletes_the_run_it_named_closes_the_confirmation_and_says_so():
    """Delete... -> Yes: that run goes, the confirmation closes and says which; a second click on the same
    (now stale) confirmation, as a double click sends it, deletes nothing else."""
    from cxr_core.hosting import audit

    for name in ("run-a", "run-b", "run-c"):
        fake_run(name, None, None, state="failed", error="x")
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    render(at, "pages/training.py", "training (three runs)")
    named = Path(at.selectbox(key="train_delete_choice").value).name
    at.session_state["train_delete_popover_0"] = True  # the person opened the confirmation
    render(at, None, "training (confirmation open)")
    assert _popover_open(at, "Delete...")
    assert f"Delete `{named}` and its model for good?" in [m.value for m in at.markdown]
    confirm = at.button(key=f"train_delete_confirm_{named}")
    confirm.click().run(timeout=TIMEOUT)
    assert not at.exception
    left = sorted(p.name for p in Path(os.environ["CXR_RUNS_DIR"]).iterdir() if p.name.startswith("run-"))
    assert left == sorted({"run-a", "run-b", "run-c"} - {named})
    assert f"Deleted run {named} and its model." in [s.value for s in at.success]
    assert not _popover_open(at, "Delete...")
    # What is offered now names another run, and its button is that run's.
    other = Path(at.selectbox(key="train_delete_choice").value).name
    assert [b.key for b in at.button if str(b.key).startswith("train_delete_confirm")] == [
        f"train_delete_confirm_{other}"]
    # The same confirmation clicked again (the old page's state, as a double click sends it): nothing else goes.
    confirm.click().run(timeout=TIMEOUT)
    assert not at.exception
    assert sorted(p.name for p in Path(os.environ["CXR_RUNS_DIR"]).iterdir() if p.name.startswith("run-")) == left
    assert f"Deleted run {named} and its model." in [s.value for s in at.success]
    assert [e["target"] for e in audit.read(Path(os.environ["CXR_RUNS_DIR"])) if e["action"] == "delete"] == [named]
    # A confirmation whose run another session deleted meanwhile deletes nothing and says so.
    stale = at.button(key=f"train_delete_confirm_{other}")
    shutil.rmtree(Path(os.environ["CXR_RUNS_DIR"]) / other)
    stale.click().run(timeout=TIMEOUT)
    assert not at.exception
    assert f"Run {other} is deleted already; nothing else was deleted." in [i.value for i in at.info]
    assert len([p for p in Path(os.environ["CXR_RUNS_DIR"]).iterdir() if p.name.startswith("run-")]) == 1


@pytest.mark.slow
def test_a_recipes_image_size_holds_when_the_backbone_is_chosen_after_it(small_kermany):
    from cxr_core.core.recipes import RECIPES

    quick = RECIPES["quick"].settings["model"]["image_size"]
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    at.session_state[KEY_DATASET] = small_kermany
    render(at, "pages/training.py", "training (fresh)")
    at.selectbox(key="train_recipe").set_value("quick")
    render(at, None, "training (recipe, then...)")
    at.selectbox(key="train_backbone").set_value("mobilenet_v2")
    render(at, None, "training (...backbone)")
    assert at.select_slider(key="train_size_mobilenet_v2").value == quick
    estimate = next(m.value for m in at.markdown if "Estimated time" in m.value)
    # The same choices in the other order give the same form and the same estimate.
    again = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(again, None, "router")
    again.session_state[KEY_DATASET] = small_kermany
    render(again, "pages/training.py", "training (fresh)")
    again.selectbox(key="train_backbone").set_value("mobilenet_v2")
    render(again, None, "training (backbone, then...)")
    again.selectbox(key="train_recipe").set_value("quick")
    render(again, None, "training (...recipe)")
    assert again.select_slider(key="train_size_mobilenet_v2").value == quick
    assert next(m.value for m in again.markdown if "Estimated time" in m.value) == estimate
    # A size the person sets wins over the recipe's, and stays with its backbone; another backbone keeps the recipe's.
    at.select_slider(key="train_size_mobilenet_v2").set_value(160)
    render(at, None, "training (size changed)")
    at.selectbox(key="train_backbone").set_value("inception_v3")
    render(at, None, "training (InceptionV3)")
    assert at.select_slider(key="train_size_inception_v3").value == quick
    at.selectbox(key="train_backbone").set_value("mobilenet_v2")
    render(at, None, "training (MobileNetV2 again)")
    assert at.select_slider(key="train_size_mobilenet_v2").value == 160
    # A recipe with no size of its own gives every backbone its default size.
    at.selectbox(key="train_recipe").set_value("reference")
    render(at, None, "training (reference recipe)")
    assert at.select_slider(key="train_size_mobilenet_v2").value == 224
    at.selectbox(key="train_backbone").set_value("inception_v3")
    render(at, None, "training (reference, InceptionV3)")
    assert at.select_slider(key="train_size_inception_v3").value == 299


def test_a_reload_during_training_still_shows_the_runs_finish():
    """A visitor reloads while their run trains: the new session follows that run and shows its finish
    (the test AUC and the link to its evaluation), as the session that started it does."""
    from cxr_core.hosting import workspaces
    from cxr_core.runs.run_folder import RunFolder
    from test_access import AUTH

    email = "student@school.org"
    run = workspaces.folder(workspaces.id_for_email(email)) / "run-reloaded"
    os.replace(fake_run("run-reloaded", [0.2, 0.9, 0.3, 0.8], [0, 1, 0, 1]), run)
    folder = RunFolder(run)
    folder.write_status("running", pid=os.getpid())
    folder.append_progress({"time": time.time(), "event": "stage", "stage": "train", "total": 8})

    def reload(address: str, label: str) -> AppTest:
        at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
        at.secrets["auth"] = AUTH
        at.secrets["operators"] = ["teacher@school.org"]
        at.user = {"is_logged_in": True, "email": address}
        render(at, None, "router")
        return render(at, "pages/training.py", label)

    def shows_the_finish(at: AppTest) -> bool:
        return ("Finished: done in 27 s, test AUC 0.996." in [s.value for s in at.success]
                and any(link.proto.label == "See its evaluation" for link in at.get("page_link")))

    reloaded = reload(email, "training (reloaded while the run trains)")
    assert "Current run" in [h.value for h in reloaded.subheader]
    assert [p.proto.text for p in reloaded.get("progress")] == ["Training the head: epoch 1 of 8"]
    folder.write_status("done", message="done in 27 s, test AUC 0.996")
    render(reloaded, None, "training (the run ended)")  # the panel's poll sees the end and redraws the page
    assert shows_the_finish(reloaded)
    # A session opened just after the end (a reload then) sees the finish too; another visitor does not.
    assert shows_the_finish(reload(email, "training (reloaded after the end)"))
    other = reload("other@school.org", "training (another visitor)")
    assert "Current run" not in [h.value for h in other.subheader]


def test_the_progress_panel_never_shows_a_spent_estimate_and_follows_the_newest_event(monkeypatch):
    """The job wrote '8 of 600 images, about 4 s left' and then nothing for 20 s (it was building the
    network): the panel says how long it has been quiet instead of '4 s left'; a newer event shows at once."""
    from cxr_core.hosting import jobs
    from cxr_core.runs.run_folder import RunFolder

    run = fake_run("run-quiet", None, None, state="running", pid=os.getpid())
    folder = RunFolder(run)
    then = time.time() - 20
    folder.append_progress({"time": then, "event": "stage", "stage": "extract", "total": 600})
    folder.append_progress({"time": then, "event": "extract", "done": 8, "total": 600, "eta_s": 4.0})
    monkeypatch.setattr(jobs, "active_runs", lambda _root=None: [run])
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    render(at, "pages/training.py", "training (a quiet run)")
    [text] = [p.proto.text for p in at.get("progress")]
    assert text.startswith("Extracting features: 8 of 600 images · last update ") and text.endswith(" s ago")
    assert "left" not in text
    folder.append_progress({"time": time.time(), "event": "extract", "done": 600, "total": 600, "eta_s": 0.0})
    folder.append_progress({"time": time.time(), "event": "stage", "stage": "train", "total": 8})
    folder.append_progress({"time": time.time(), "event": "epoch", "epoch": 3, "epochs": 8, "eta_s": 50.0})
    render(at, None, "training (the run moved on)")
    [text] = [p.proto.text for p in at.get("progress")]
    assert text.startswith("Training the head: epoch 4 of 8 · about ") and text.endswith(" s left"), text
