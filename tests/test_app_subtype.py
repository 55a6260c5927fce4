"""AppTest of every page with a subtype run (NORMAL / BACTERIA / VIRUS), written by hand: no training.

The run folder holds what training writes for the subtype task (config.json with ``task``,
metrics.json from ``evaluate.multiclass_metrics``, predictions.csv with one probability column per
class) and, for the Predict page, an untrained three-output model.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from conftest import TINY_MODEL, make_dataset
from test_app import HOME, KEY_DATASET, KEY_RUN, TIMEOUT, png_bytes, render, text_of

CLASSES = ("NORMAL", "BACTERIA", "VIRUS")


def _probabilities(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows that sum to 1: mostly right, with viral films often called bacterial (as real models do)."""
    probs = rng.dirichlet([1.0, 1.0, 1.0], size=len(y)) * 0.4
    for i, truth in enumerate(y):
        called = 1 if truth == 2 and i % 3 == 0 else truth  # a third of the viral films: BACTERIA
        probs[i, called] += 0.6
    return probs / probs.sum(axis=1, keepdims=True)


def subtype_run(name: str = "run-subtype", model: bool = False,
                test_counts: tuple[int, int, int] = (10, 16, 9)) -> Path:
    """A finished subtype run with ``test_counts`` NORMAL, BACTERIA and VIRUS test images; ``model`` writes a
    real (untrained) three-output model.keras."""
    from cxr_core.core import metrics as evaluate
    from cxr_core.core.config import DataConfig, RunConfig
    from cxr_core.runs.run_folder import RunFolder

    folder = RunFolder(Path(os.environ["CXR_RUNS_DIR"]) / name)
    folder.path.mkdir(parents=True)
    folder.write_config(RunConfig(data=DataConfig(data_dir="/somewhere/kermany", task="subtype"), model=TINY_MODEL))
    rng = np.random.default_rng(0)
    y_val, y_test = np.repeat([0, 1, 2], [6, 10, 6]), np.repeat([0, 1, 2], list(test_counts))
    p_val, p_test = _probabilities(y_val, rng), _probabilities(y_test, rng)
    folder.write_metrics({
        "task": "subtype", "classes": list(CLASSES), "threshold": None, "threshold_rule": "argmax",
        "val": evaluate.multiclass_metrics(y_val, p_val), "test": {"at_threshold": evaluate.multiclass_metrics(
            y_test, p_test)}, "n_images": 200, "split_counts": {"train": 143, "val": 22, "test": 35}})
    rows = [{"path": f"/nowhere/{split}{i}.png", "y": int(y), "probability": 1.0 - float(p[0]),
             **{f"p_{c}": float(v) for c, v in zip(CLASSES, p)}, "split": split, "label": CLASSES[int(np.argmax(p))],
             "patient_id": f"{split}{i}"}
            for split, ys, ps in (("val", y_val, p_val), ("test", y_test, p_test))
            for i, (y, p) in enumerate(zip(ys, ps))]
    folder.write_predictions(pd.DataFrame(rows))
    if model:
        from cxr_core.engine.model import build_classifier

        build_classifier(TINY_MODEL, seed=1, n_outputs=3).save(folder.model_path)
    else:
        folder.model_path.write_bytes(b"placeholder")  # the Evaluation and Home pages only check it exists
    folder.write_status("done")
    return folder.path


@pytest.mark.slow
def test_training_page_offers_the_subtype_task_and_refuses_a_data_set_without_subtypes(monkeypatch):
    root = Path(os.environ["CXR_DATA_ROOT"])
    make_dataset(root / "named", n_normal=12, n_pneumonia=18)
    plain = make_dataset(root / "plain", n_normal=12, n_pneumonia=18)
    for i, path in enumerate(sorted((plain / "PNEUMONIA").iterdir())):  # file names without bacteria / virus
        path.rename(path.with_name(f"scan{i}.jpeg"))
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    at.session_state[KEY_DATASET] = "named"
    render(at, "pages/training.py", "training (subtype data set)")
    task = at.selectbox(key="train_task")
    assert task.value == "pneumonia" and task.options == ["Normal / pneumonia", "Normal / bacterial / viral"]
    assert "viral class is small" not in text_of(at)
    task.set_value("subtype")
    render(at, None, "training (subtype chosen)")
    text = text_of(at)
    assert "their patterns on a film overlap" in text and "the viral class is small" in text
    assert "Classes of this data set: 12 NORMAL, 9 BACTERIA, 9 VIRUS." in text
    assert at.selectbox(key="train_rule").disabled  # three classes: the most probable one, no threshold
    # The Augmentation page plans the balance of the chosen task: each smaller class up to the largest.
    render(at, "pages/augmentation.py", "augmentation (subtype task)")
    metrics = {m.label: m for m in at.metric}
    assert {"NORMAL in training", "BACTERIA in training", "VIRUS in training"} <= set(metrics)
    counts = {name: int(metrics[f"{name} in training"].value.replace(",", "")) for name in CLASSES}
    extra = {name: int(str(metrics[f"{name} in training"].delta).split()[0].lstrip("+")) for name in CLASSES}
    assert len({counts[name] + extra[name] for name in CLASSES}) == 1, (counts, extra)
    render(at, "pages/training.py", "training (back from augmentation)")
    # A link (or a reload) with the task and a data set whose file names carry no subtype: the task is
    # chosen, and the data set refused in one sentence, with no way to start.
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    at.query_params.update({"dataset": "plain", "train_task": "Normal / bacterial / viral"})
    at.switch_page("pages/training.py")
    render(at, None, "training (link: subtype, data set without subtypes)")
    assert at.selectbox(key="train_task").value == "subtype"
    errors = [e.value for e in at.error]
    assert any(e.startswith("18 of the 18 PNEUMONIA images have no subtype (bacteria or virus) in their file name")
               for e in errors), errors
    assert not [b for b in at.button if b.label == "Start training"]
    # The two-class task takes the same data set.
    at.selectbox(key="train_task").set_value("pneumonia")
    render(at, None, "training (pneumonia task, no subtypes)")
    assert not any("no subtype" in e.value for e in at.error)

    # After a reload while a subtype run trains, the form shows that run's task.
    from cxr_core.core.config import DataConfig, RunConfig
    from cxr_core.hosting import jobs
    from cxr_core.runs.run_folder import RunFolder

    folder = RunFolder(Path(os.environ["CXR_RUNS_DIR"]) / "run-training")
    folder.write_config(RunConfig(data=DataConfig(data_dir=str(root / "named"), task="subtype"), model=TINY_MODEL))
    folder.write_status("running", pid=os.getpid())
    monkeypatch.setattr(jobs, "active_run", lambda *_args, **_kwargs: folder.path)
    during = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    during.switch_page("pages/training.py")
    render(during, None, "training (reloaded while a subtype run trains)")
    assert during.selectbox(key="train_task").value == "subtype"


def test_evaluation_page_of_a_subtype_run():
    from cxr_core.runs.run_folder import RunFolder

    run = subtype_run()
    test = RunFolder(run).read_metrics()["test"]["at_threshold"]
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    at.session_state[KEY_RUN] = str(run)
    render(at, "pages/evaluation.py", "evaluation (subtype run)")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Internal macro AUC"] == f"{test['roc_auc']:.3f}"
    assert metrics["Accuracy"] == f"{test['accuracy']:.3f}"
    assert metrics["Bacterial vs viral accuracy"] == f"{test['bacterial_vs_viral']['accuracy']:.3f}"
    assert "Threshold" not in metrics
    assert not [s for s in at.slider if s.label == "Threshold"]  # no threshold explorer for three classes
    # The 3x3 confusion matrix, rows true and columns predicted.
    cm = json.loads(next(c for c in at.get("plotly_chart") if "_cm" in c.proto.id).proto.spec)["data"][0]
    assert [[int(cell.split("<br>")[0]) for cell in row] for row in cm["text"]] == test["confusion_matrix"]
    assert cm["x"] == [f"predicted {c}" for c in CLASSES]
    assert cm["y"] == [f"true {c}" for c in CLASSES]
    # The per-class table and the two clinical questions next to the paper.
    per_class = next(d.value for d in at.dataframe if "Precision" in d.value.columns)
    assert list(per_class.index) == list(CLASSES)
    assert per_class.loc["VIRUS", "Sensitivity"] == f"{test['per_class']['VIRUS']['sensitivity']:.3f}"
    assert per_class.loc["BACTERIA", "AUC"] == f"{test['per_class']['BACTERIA']['roc_auc']:.3f}"
    paper = next(d.value for d in at.dataframe if "bacterial vs viral" in d.value.columns)
    assert paper.loc["Accuracy", "paper (bacterial vs viral)"] == "0.907"
    assert paper.loc["Accuracy", "bacterial vs viral"] == f"{test['bacterial_vs_viral']['accuracy']:.3f}"
    assert paper.loc["ROC AUC", "pneumonia vs normal"] == f"{test['pneumonia_vs_normal']['roc_auc']:.3f}"
    # The most confused pair in words: a third of the viral films were called bacterial.
    n_virus, confused = test["per_class"]["VIRUS"]["n"], test["confusion_matrix"][2][1]
    assert f"{confused} of {n_virus} VIRUS images ({confused / n_virus:.0%}) were called BACTERIA." in text_of(at)
    # Calibration per class and the misclassified images, listed by confused pair.
    calibration = json.loads(next(c for c in at.get("plotly_chart") if "_cal" in c.proto.id).proto.spec)
    assert [t["name"] for t in calibration["data"]] == ["perfect", *CLASSES]
    assert at.radio(key="eval_gallery_pair").value == "VIRUS called BACTERIA"


def few_images_warnings(at: AppTest) -> list[str]:
    return [w.value for w in at.warning if w.value.startswith("Few test images")]


def test_a_three_class_run_warns_of_few_test_images_by_the_two_class_rule():
    """The two-class page warns when the share of either class found (sensitivity, specificity) is known only to
    within more than ±0.10; a three-class run is held to the same rule, class by class."""
    from cxr_core.core import metrics as evaluate
    from cxr_core.runs.run_folder import RunFolder

    few = subtype_run("run-few", test_counts=(12, 11, 8))  # 31 test images, 8 of them viral
    many = subtype_run("run-many", test_counts=(400, 400, 400))
    virus_found = RunFolder(few).read_metrics()["test"]["at_threshold"]["confusion_matrix"][2][2]
    low, high = evaluate.proportion_interval(virus_found, 8)
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    at.session_state[KEY_RUN] = str(few)
    render(at, "pages/evaluation.py", "evaluation (subtype run, 31 test images)")
    warned = few_images_warnings(at)
    assert len(warned) == 1 and "the share of VIRUS images called VIRUS (8 images)" in warned[0], warned
    assert f"±{(high - low) / 2:.2f}" in warned[0]
    # Many test images of every class: every share is known to within ±0.10, so nothing is said.
    at.selectbox(key="eval_run").set_value(str(many))
    render(at, None, "evaluation (subtype run, 1,200 test images)")
    assert Path(at.selectbox(key="eval_run").value).name == "run-many"
    assert few_images_warnings(at) == []


def test_home_and_the_run_picker_show_a_subtype_run():
    run = subtype_run()
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "home (subtype run)")
    from cxr_core.runs.run_folder import RunFolder

    test = RunFolder(run).read_metrics()["test"]["at_threshold"]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Macro AUC (internal test)"] == f"{test['roc_auc']:.3f}"
    assert metrics["Accuracy (3 classes)"] == f"{test['accuracy']:.3f}"
    assert "tells normal, bacterial and viral pneumonia apart" in text_of(at)
    label = f"normal/bacterial/viral, internal test macro AUC {test['roc_auc']:.3f}"
    assert f"{label}, accuracy {test['accuracy']:.3f})" in text_of(at)


@pytest.mark.slow  # builds or loads models: seconds
def test_predict_page_shows_three_probabilities_and_writes_one_column_per_class(monkeypatch):
    import streamlit

    from cxr_core.inference.predictor import Predictor, map_caption
    from pages.ui import models

    downloads = []
    real_download_button = streamlit.download_button

    def recording_download_button(label, data, *args, **kwargs):
        downloads.append(data)
        return real_download_button(label, data, *args, **kwargs)

    monkeypatch.setattr(streamlit, "download_button", recording_download_button)
    run = subtype_run(model=True)
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    render(at, "pages/predict.py", "predict (subtype run)")
    assert {m.label: m.value for m in at.metric}["Classes"] == "3"
    at.file_uploader(key="predict_upload").set_value([("chest.png", png_bytes(True), "image/png"),
                                                      ("broken.jpg", b"not an image", "image/jpeg")])
    render(at, None, "predict (subtype, 2 uploads)")
    # The predictor the page loaded (cached per process), so the model is loaded once.
    predictor = models.load_predictor(run)
    assert isinstance(predictor, Predictor) and predictor.classes == CLASSES
    from cxr_core.io.images import load_gray

    (expected,) = predictor.predict([load_gray(png_bytes(True), "chest.png")])
    bars = [p.proto.text for p in at.get("progress")]
    assert bars == [f"{c}: {expected.probabilities[c]:.1%}" for c in CLASSES]
    label = expected.label
    assert any(m.value.startswith("#### :") and m.value.endswith(f"[{label}]") for m in at.markdown)
    # The map explains the predicted class and says so (or says in one line that it holds nothing).
    said = [c.value for c in at.caption] + [i.value for i in at.info]
    assert map_caption(label, task="subtype") in said or map_caption(label, True, task="subtype") in said
    assert len([e for e in at.error if "broken.jpg" in e.value]) == 1
    csv = pd.read_csv(io.StringIO(downloads[-1]))
    assert list(csv.columns) == ["file", "p_NORMAL", "p_BACTERIA", "p_VIRUS", "label", "error", "run"]
    assert list(csv["file"]) == ["chest.png", "broken.jpg"]
    for c in CLASSES:
        assert csv.loc[0, f"p_{c}"] == pytest.approx(expected.probabilities[c], abs=2e-4)
    assert csv.loc[0, "label"] == expected.label and pd.isna(csv.loc[1, "p_VIRUS"])


@pytest.mark.slow  # builds or loads models: seconds
def test_evaluation_page_evaluates_a_subtype_run_on_another_data_set_and_compares_it():
    from test_app import fake_run

    run = subtype_run(model=True)
    make_dataset(Path(os.environ["CXR_DATA_ROOT"]) / "other", n_normal=8, n_pneumonia=12, size=40, seed=7)
    y = np.array([0] * 10 + [1] * 10)
    fake_run("run-binary", np.where(y == 1, 0.7, 0.3), y)
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at, None, "router")
    at.session_state[KEY_RUN] = str(run)
    render(at, "pages/evaluation.py", "evaluation (subtype run)")
    at.selectbox(key="eval_other_dataset").set_value("other")
    next(b for b in at.button if b.label == "Evaluate on this data set").click()
    render(at, None, "evaluation (subtype run, another data set)")
    assert not at.error, [e.value for e in at.error]
    stored = json.loads((run / "evaluations" / "other.json").read_text())
    assert stored["task"] == "subtype" and stored["n"] == 20
    assert at.radio(key="eval_test_set").value == "external: other"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["External macro AUC"] == charts_num(stored["roc_auc"])
    assert metrics["Accuracy"] == charts_num(stored["accuracy"])
    assert any(c.value.startswith("20 images of the data set other") and "8 NORMAL, 6 BACTERIA, 6 VIRUS." in c.value
               for c in at.caption)
    # Compared with a two-class run on the question both answer, pneumonia against normal.
    at.selectbox(key="eval_compare").set_value(str(Path(os.environ["CXR_RUNS_DIR"]) / "run-binary"))
    render(at, None, "evaluation (subtype run compared with a binary one)")
    figures = next(d.value for d in at.dataframe if "Bacterial vs viral accuracy" in d.value.index)
    internal = json.loads((run / "metrics.json").read_text())["test"]["at_threshold"]
    assert figures.loc["ROC AUC", "this run"] == f"{internal['pneumonia_vs_normal']['roc_auc']:.3f}"
    assert figures.loc["Bacterial vs viral accuracy", "compared"] == "—"  # a two-class run has no subtypes
    configs = next(d.value for d in at.dataframe if "backbone" in d.value.index)
    assert list(configs.loc["task"]) == ["3 classes", "2 classes"]


def charts_num(value) -> str:
    return "—" if value is None else f"{value:.3f}"
