"""End to end: train -> run folder -> evaluate -> predict, through the library and the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_PRETRAINED, TINY_WEIGHTS
from cxr_core.core.config import DataConfig, RunConfig, TrainConfig
from cxr_core.core.errors import BadDatasetError
from cxr_core.runs import registry as runs
from cxr_core.runs.run_folder import RunFolder

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Every test here trains (in-process or a `python -m cxr_core train` process): the slow lane.
pytestmark = pytest.mark.slow


def tiny_config(data_dir: Path, **train) -> RunConfig:
    return RunConfig(
        data=DataConfig(data_dir=str(data_dir), split="patient"),
        model=TINY_PRETRAINED,
        train=TrainConfig(**{"epochs": 3, "batch_size": 8, **train}),
    )


def run_cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.run([sys.executable, "-m", "cxr_core", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=PROJECT_ROOT, env=env)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    from conftest import make_dataset
    from cxr_core.engine.train import train

    base = tmp_path_factory.mktemp("trained")
    data = make_dataset(base / "data", n_normal=24, n_pneumonia=40, size=48)
    epochs_seen = []
    # Module-scoped: runs before the autouse per-test isolation, so it names its own cache.
    run = train(
        tiny_config(data, cache_dir=str(base / "cache")),
        on_epoch_end=lambda epoch, _logs: epochs_seen.append(epoch),
        run_dir=base / "runs" / "r1",
    )
    assert epochs_seen == [1, 2, 3]
    return run


def test_train_writes_a_complete_run_folder(trained_run: Path):
    for name in ("config.json", "split.csv", "history.csv", "progress.jsonl", "status.json", "metrics.json",
                 "predictions.csv", "model.keras", "skipped.csv"):
        assert (trained_run / name).is_file(), name
    assert runs.read_status(trained_run)["state"] == "done"
    history = RunFolder(trained_run).read_history()
    assert list(history["epoch"]) == [1, 2, 3]
    for column in ("loss", "accuracy", "auc", "precision", "recall", "val_loss", "val_auc"):
        assert history[column].notna().all(), column
    split = pd.read_csv(trained_run / "split.csv")
    # Balance by augmentation: extra NORMAL rows only in the training part.
    augmented = split[split["augment_seed"] >= 0]
    original_train = split[(split["split"] == "train") & (split["augment_seed"] < 0)]
    counts = original_train["label"].value_counts()
    assert len(augmented) == counts["PNEUMONIA"] - counts["NORMAL"]
    assert set(augmented["split"]) == {"train"} and set(augmented["label"]) == {"NORMAL"}
    # Patient split: no patient on two sides.
    originals = split[split["augment_seed"] < 0]
    sides = originals.groupby("patient_id")["split"].nunique()
    assert (sides == 1).all()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    from cxr_core.core.metrics import choose_threshold

    val = pd.read_csv(trained_run / "predictions.csv").query("split == 'val'")
    assert metrics["threshold"] == pytest.approx(choose_threshold(val["y"], val["probability"], "youden"))
    assert metrics["test"]["at_0.5"]["threshold"] == 0.5
    assert metrics["n_images"] == len(originals)
    # The probabilities are calibrated on validation (temperature by default), and the Predictor applies the
    # same calibration: it gives the stored validation probabilities back.
    from cxr_core.core.calibration import Calibration
    from cxr_core.inference.predictor import Predictor

    calibration = Calibration.from_dict(metrics["calibration"])
    assert calibration.method == "temperature" and calibration.n == len(val)
    assert metrics["calibration"]["val_ece_after"] <= metrics["calibration"]["val_ece_before"] + 1e-9
    predictor = Predictor.from_run(trained_run, engine="keras")
    assert predictor.calibration == calibration
    sample = val.head(4)
    found = predictor.predict_files(sample["path"].tolist())
    np.testing.assert_allclose([r["probability"] for r in found], sample["probability"], atol=2e-4)
    events = [json.loads(line)["event"] for line in (trained_run / "progress.jsonl").read_text().splitlines()]
    assert "extract" in events and "epoch" in events and events[-1] == "done"
    config = RunConfig.from_dict(json.loads((trained_run / "config.json").read_text()))
    assert config.model == TINY_PRETRAINED


def test_second_run_extracts_nothing(trained_run: Path, tmp_path):
    from cxr_core.engine.train import train

    config = RunConfig.from_dict(json.loads((trained_run / "config.json").read_text()))
    run = train(config, run_dir=tmp_path / "again")
    extracts = [e for e in map(json.loads, (run / "progress.jsonl").read_text().splitlines())
                if e["event"] == "extract" and "computed" in e]
    assert extracts and extracts[-1]["computed"] == 0
    # Same seeds, same data: the rerun reproduces the test probabilities.
    first = pd.read_csv(trained_run / "predictions.csv")
    second = pd.read_csv(run / "predictions.csv")
    np.testing.assert_allclose(first["probability"], second["probability"], atol=1e-5)


def test_cancel_marks_the_run_cancelled_without_a_model(tiny_dataset, tmp_path):
    from cxr_core.engine.train import train

    calls = {"n": 0}

    def stop_after_first_epoch():
        calls["n"] += 1
        return bool(history_len())

    run_dir = tmp_path / "cancelled"

    def history_len():
        return (run_dir / "history.csv").exists()

    run = train(tiny_config(tiny_dataset, epochs=50), should_stop=stop_after_first_epoch, run_dir=run_dir)
    assert runs.read_status(run)["state"] == "cancelled"
    assert not (run / "model.keras").exists()
    assert len(RunFolder(run).read_history()) < 50


def test_single_class_folder_fails_with_one_sentence(tmp_path):
    from conftest import make_dataset
    from cxr_core.engine.train import train

    data = make_dataset(tmp_path / "one", n_normal=10, n_pneumonia=10)
    import shutil

    shutil.rmtree(data / "NORMAL")
    with pytest.raises(BadDatasetError) as info:
        train(tiny_config(data), run_dir=tmp_path / "run")
    assert runs.read_status(tmp_path / "run")["state"] == "failed"
    assert "\n" not in str(info.value)


def test_cli_train_evaluate_predict(tiny_dataset, tmp_path):
    out = tmp_path / "runs"
    result = run_cli("train", "--data", str(tiny_dataset), "--out", str(out), "--backbone", "mobilenet_v2",
                     "--alpha", "0.35", "--weights", str(TINY_WEIGHTS), "--image-size", "32", "--epochs", "2",
                     "--batch-size", "8", "--split", "random", "--seed", "7")
    assert result.returncode == 0, result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert run_dir.parent == out and (run_dir / "model.keras").is_file()

    result = run_cli("evaluate", "--run", str(run_dir), "--data", str(tiny_dataset))
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    for key in ("n", "accuracy", "roc_auc", "pr_auc", "sensitivity", "specificity", "precision", "f1",
                "threshold", "confusion_matrix", "skipped"):
        assert key in metrics
    assert metrics["n"] == 36
    assert sum(map(sum, metrics["confusion_matrix"])) == 36

    good = sorted((tiny_dataset / "PNEUMONIA").iterdir())[0]
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not an image")
    result = run_cli("predict", "--run", str(run_dir), str(good), str(bad), "--gradcam", str(tmp_path / "cams"))
    assert result.returncode == 2
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    from cxr_core.inference.predictor import Predictor

    (expected,) = Predictor.from_run(run_dir).predict_files([good])
    assert lines[0]["file"] == str(good)
    assert lines[0]["probability"] == pytest.approx(expected["probability"], abs=1e-5)
    assert lines[0]["label"] == expected["label"]
    assert lines[1]["file"] == str(bad) and "error" in lines[1]
    assert Path(lines[0]["gradcam"]).is_file()
    # The overlay shows the evidence for the predicted class, and says so.
    assert lines[0]["gradcam_explains"] == expected["label"] and isinstance(lines[0]["gradcam_empty"], bool)
    assert lines[0]["gradcam_caption"].startswith("No region" if lines[0]["gradcam_empty"] else "Highlighted")
    assert "Traceback" not in result.stderr


def test_cli_bad_input_exit_code_2(tmp_path):
    result = run_cli("train", "--data", str(tmp_path / "missing"), "--epochs", "1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error:")
    result = run_cli("predict", "--run", str(tmp_path), "x.jpg")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_sigkill_during_training_leaves_a_failed_run_and_the_next_run_works(tiny_dataset, tmp_path):
    out = tmp_path / "runs"
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "cxr_core", "train", "--data", str(tiny_dataset), "--out", str(out),
         "--backbone", "mobilenet_v2", "--alpha", "0.35", "--weights", str(TINY_WEIGHTS), "--image-size", "32",
         "--epochs", "400", "--batch-size", "4"],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    run_dir = None
    while time.time() < deadline:
        found = [p for p in out.glob("*") if (p / "history.csv").exists()] if out.exists() else []
        if found:
            run_dir = found[0]
            break
        time.sleep(0.3)
    assert run_dir is not None, "training never reached an epoch"
    process.send_signal(signal.SIGKILL)
    process.wait()
    status = runs.read_status(run_dir)
    assert status["state"] == "failed"
    assert not (run_dir / "model.keras").exists()
    assert not list(run_dir.glob(".*tmp*"))
    # The feature cache is intact: the next run starts at once and finishes.
    result = run_cli("train", "--data", str(tiny_dataset), "--out", str(out), "--backbone", "mobilenet_v2",
                     "--alpha", "0.35", "--weights", str(TINY_WEIGHTS), "--image-size", "32", "--epochs", "1",
                     "--batch-size", "8")
    assert result.returncode == 0, result.stderr
    assert runs.read_status(Path(result.stdout.strip().splitlines()[-1]))["state"] == "done"
