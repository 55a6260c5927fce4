"""AppTest for every page: empty state, with a small data set, and with a finished run.

Each test drives Home.py (the router) and switches to a page, as a user does. Render times of
every page are printed and written to render_times.json in the test artifacts folder
(``$CXR_TEST_ARTIFACTS``, else pytest's temporary directory; see conftest.py).
"""
from __future__ import annotations

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

from conftest import TINY_MODEL, make_dataset

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
    """A tiny finished run trained in-process with cxr_core.train.train (MobileNetV2 0.35, 32 px)."""
    from cxr_core import train
    from cxr_core.config import DataConfig, RunConfig, TrainConfig

    base = tmp_path_factory.mktemp("trained")
    data_dir = make_dataset(base / "tiny", n_normal=20, n_pneumonia=40, size=48)
    config = RunConfig(
        data=DataConfig(data_dir=str(data_dir), split="random"),
        model=TINY_MODEL,
        train=TrainConfig(epochs=2, batch_size=16, balance="none", cache_dir=str(base / "cache")),
    )
    run_dir = train.train(config, run_dir=base / "runs" / "tiny-run")
    from cxr_core import runs

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
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    render(at, "pages/dataset.py", "dataset (empty)")
    at.button(key="make_practice").click()
    render(at, None, "dataset (practice set made)")
    assert "synthetic" in at.session_state[KEY_DATASET].lower()
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
    from cxr_core import download
    from cxr_core.errors import DownloadError

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


def test_training_page_recipe_fills_the_form_and_the_augmentation_plan_follows_the_limit(small_kermany):
    from cxr_core.recipes import RECIPES

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
    assert at.number_input(key="train_limit").value == quick["data"]["limit"]
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


# --- Training: launch a tiny background run and watch it finish ----------------------------------
@pytest.mark.slow
def test_training_page_launches_a_tiny_run_and_shows_its_curves(small_kermany):
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    at.session_state[KEY_DATASET] = small_kermany
    render(at, "pages/training.py", "training (data set chosen)")
    at.selectbox(key="train_backbone").set_value("mobilenet_v2")
    render(at, None, "training (backbone chosen)")
    at.selectbox(key="train_weights_mobilenet_v2").set_value("none")
    render(at, None, "training (form)")
    at.select_slider(key="train_size_mobilenet_v2").set_value(32)
    at.select_slider(key="train_alpha_free").set_value(0.35)
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
    from cxr_core.run_folder import RunFolder

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
    assert len(at.image) >= 1


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
    # The run's own test part is still there, second.
    assert at.radio(key="eval_test_set").options[-1] == "internal: the run's own test part"


@pytest.mark.slow
def test_predict_page_classifies_uploads_and_reports_a_bad_file(finished_run, monkeypatch):
    import pandas as pd
    import streamlit

    from cxr_core.predict import Predictor

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
    expected = reference.predict_bytes(png_bytes(True), "chest.png")["probability"]
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
    from cxr_core import runs
    from cxr_core.run_folder import RunFolder

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
    from cxr_core.predict import Predictor

    demo = Predictor.from_run(runs.DEMO_RUN_DIR)
    expected = demo.predict_bytes(png_bytes(True), "chest.png")["probability"]
    assert float(table.loc[0, "probability"]) == pytest.approx(expected, abs=2e-4)
    assert table.loc[0, "label"] == ("PNEUMONIA" if expected >= demo.threshold else "NORMAL")
