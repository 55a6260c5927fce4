"""Training under tf.distribute: several replicas on one machine, several workers, precision.

The multi-process tests are real: `python -m cxr_core train` processes on this machine's CPU, with
``--cpu-replicas 2`` (MirroredStrategy over two logical CPU devices) or two workers that
``TF_CONFIG`` names on 127.0.0.1 (MultiWorkerMirroredStrategy).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_MODEL, make_dataset
from cxr_core.core.config import RunConfig
from cxr_core.core.errors import BadSettingError
from cxr_core.engine import distribute

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONTRACT = {"host", "devices", "device_kind", "strategy", "replicas", "workers", "precision"}


# -- choices (fast, in this process) --------------------------------------------------------------

def test_auto_precision_is_float32_on_the_cpu_and_mixed_is_one_sentence():
    runtime = distribute.setup("off", "auto")
    assert (runtime.name, runtime.precision, runtime.device_kind, runtime.replicas) == ("default", "float32", "CPU", 1)
    assert runtime.fields()["devices"] == ["CPU:0"] and set(runtime.fields()) == CONTRACT
    with pytest.raises(BadSettingError) as caught:
        distribute.setup("off", "mixed")
    assert "needs an NVIDIA GPU" in str(caught.value) and str(caught.value).count(". ") == 0


def test_multi_worker_needs_tf_config_and_cpu_replicas_need_mirrored(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(BadSettingError, match="TF_CONFIG"):
        distribute.setup("multi-worker", "auto")
    with pytest.raises(BadSettingError, match="--cpu-replicas"):
        distribute.setup("off", "auto", cpu_replicas=2)
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(BadSettingError, match="not valid JSON"):
        distribute.setup("multi-worker", "auto")


def test_the_chief_is_the_chief_task_or_else_worker_0():
    two = {"worker": ["a:1", "b:2"]}
    assert distribute.worker_role(two, {"type": "worker", "index": 0}) == (0, 2, True)
    assert distribute.worker_role(two, {"type": "worker", "index": 1}) == (1, 2, False)
    with_chief = {"chief": ["c:0"], "worker": ["a:1"]}
    assert distribute.worker_role(with_chief, {"type": "chief", "index": 0}) == (0, 2, True)
    assert distribute.worker_role(with_chief, {"type": "worker", "index": 0}) == (1, 2, False)


def test_config_records_the_choices_and_older_files_load_with_defaults():
    old = RunConfig().to_dict()
    for key in ("distribute", "precision", "cpu_replicas"):
        del old["train"][key]
    loaded = RunConfig.from_dict(old)
    assert (loaded.train.distribute, loaded.train.precision, loaded.train.cpu_replicas) == ("auto", "auto", 0)
    from cxr_core.cli import _parser, build_config

    args = _parser().parse_args(["train", "--data", ".", "--distribute", "mirrored", "--cpu-replicas", "2",
                                 "--precision", "float32"])
    train = build_config(args).train
    assert (train.distribute, train.cpu_replicas, train.precision) == ("mirrored", 2, "float32")
    train_parser = _parser()._subparsers._group_actions[0].choices["train"]
    helps = {action.dest: action.help for action in train_parser._actions}
    assert distribute.LEARNING_RATE_RULE in helps["distribute"]


# -- real runs (subprocesses) ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def setting(tmp_path_factory) -> dict:
    """A small data set and backbone weights whose features carry information.

    At random initialisation MobileNetV2's batch-norm statistics make the pooled features about
    1e-12 (a head learns nothing, and any two strategies would agree trivially), so one pass in
    training mode with momentum 0 sets them from unlabelled images first.
    """
    import cv2
    import keras

    from cxr_core.core.backbones import get_backbone
    from cxr_core.engine.model import Preprocess, build_backbone
    from cxr_core.io.images import to_model_input

    base_dir = tmp_path_factory.mktemp("distribute")
    data = make_dataset(base_dir / "data", n_normal=16, n_pneumonia=24, size=48)
    calibration = make_dataset(base_dir / "calibration", n_normal=16, n_pneumonia=16, size=48, seed=7)
    base = build_backbone(TINY_MODEL, seed=1)
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    images = [to_model_input(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), TINY_MODEL.image_size)
              for p in sorted(calibration.rglob("*.jpeg"))]
    base(Preprocess(get_backbone(TINY_MODEL.backbone).preprocess_mode)(np.stack(images)), training=True)
    weights = base_dir / "calibrated.weights.h5"
    base.save_weights(str(weights))
    return {"data": data, "weights": weights, "base": base_dir}


def _train_args(setting: dict, out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cxr_core", "train", "--data", str(setting["data"]), "--backbone", "mobilenet_v2",
            "--alpha", "0.35", "--weights", str(setting["weights"]), "--image-size", "32", "--split", "random",
            "--dropout", "0", "--learning-rate", "0.01", "--fine-tune-layers", "5", "--fine-tune-learning-rate",
            "0.001", "--no-export-litert", "--out", str(out), "--cache-dir", str(cache), *extra]


def _env(**extra: str) -> dict:
    return dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), **extra)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def _only_run(out: Path) -> Path:
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


@pytest.mark.slow
def test_mirrored_on_two_cpu_replicas_trains_as_one_device_with_the_global_batch(setting, tmp_path):
    phases = ("--epochs", "2", "--fine-tune-epochs", "1")
    off = subprocess.run(_train_args(setting, tmp_path / "off", tmp_path / "cache", *phases, "--batch-size", "16",
                                     "--distribute", "off"),
                         capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT, env=_env())
    assert off.returncode == 0, off.stderr[-2000:]
    mirrored = subprocess.run(_train_args(setting, tmp_path / "mirrored", tmp_path / "cache", *phases,
                                          "--batch-size", "8", "--distribute", "mirrored", "--cpu-replicas", "2"),
                              capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT, env=_env())
    assert mirrored.returncode == 0, mirrored.stderr[-2000:]
    runs = {name: _only_run(tmp_path / name) for name in ("off", "mirrored")}
    for name, run in runs.items():
        status = json.loads((run / "status.json").read_text())
        runtime = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()
                   if '"runtime"' in line]
        assert status["state"] == "done" and len(runtime) == 1
        assert set(status) >= CONTRACT and set(runtime[0]) >= CONTRACT
        expected = ({"strategy": "MirroredStrategy", "replicas": 2, "devices": ["CPU:0", "CPU:1"]} if name == "mirrored"
                    else {"strategy": "default", "replicas": 1, "devices": ["CPU:0"]})
        for key, value in {**expected, "workers": 1, "precision": "float32", "device_kind": "CPU"}.items():
            assert status[key] == value and runtime[0][key] == value, (name, key)
    history = {name: pd.read_csv(run / "history.csv") for name, run in runs.items()}
    assert list(history["mirrored"]["phase"]) == ["head"] * 2 + ["fine_tune"]
    # 8 per replica x 2 replicas is the same global batch as 16 on one device, with the same learning
    # rate (not scaled), the same shuffling, no dropout and frozen batch-norm statistics: the same
    # computation but for the order of float32 additions in the gradient all-reduce (~1e-7 relative per
    # step), so a few steps stay far within 1e-4; a wrong batch split or a learning rate scaled by the
    # replicas would move the losses by 1e-2 or more.
    for column in ("loss", "val_loss", "val_auc"):
        np.testing.assert_allclose(history["mirrored"][column], history["off"][column], rtol=1e-4, atol=1e-5)
    predictions = {name: pd.read_csv(run / "predictions.csv").sort_values("path") for name, run in runs.items()}
    np.testing.assert_allclose(predictions["mirrored"]["probability"], predictions["off"]["probability"], atol=1e-4)
    assert history["off"]["loss"].iloc[-1] < history["off"]["loss"].iloc[0]  # it learnt something to compare


def _start_workers(setting: dict, out: Path, cache: Path, *extra: str, timeout_s: int = 30) -> list[subprocess.Popen]:
    ports = _free_ports(2)
    return [subprocess.Popen(_train_args(setting, out, cache, "--distribute", "multi-worker", "--batch-size", "8",
                                         *extra),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PROJECT_ROOT,
                             env=_env(TF_CONFIG=_tf_config(ports, index), CXR_COLLECTIVE_TIMEOUT_S=str(timeout_s)))
            for index in range(2)]


@pytest.mark.slow
def test_two_workers_train_one_run_folder_and_share_the_cache(setting, tmp_path):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    workers = _start_workers(setting, out, cache, "--epochs", "3", "--fine-tune-epochs", "1")
    try:
        results = [worker.communicate(timeout=300) for worker in workers]
    finally:
        _stop(workers)
    for worker, (_stdout, stderr) in zip(workers, results):
        assert worker.returncode == 0, stderr[-3000:]
    run = _only_run(out)
    assert results[0][0].strip().splitlines()[-1] == str(run)  # the chief prints the run folder
    assert results[1][0].strip() == ""
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "done", status.get("message")
    assert (status["strategy"], status["replicas"], status["workers"]) == ("MultiWorkerMirroredStrategy", 2, 2)
    for name in ("config.json", "split.csv", "history.csv", "metrics.json", "predictions.csv", "model.keras"):
        assert (run / name).is_file(), name
    history = pd.read_csv(run / "history.csv")
    assert list(history["phase"]) == ["head"] * 3 + ["fine_tune"] and history["val_auc"].notna().all()
    # The cache holds each row's features once (an augmented row is an entry of its own), and the chief
    # computed only its share of them.
    split = pd.read_csv(run / "split.csv")
    entries = [p for p in cache.rglob("*.npy")]
    assert len(entries) == len(split) == len({p.name for p in entries})
    extract = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()
               if '"extract"' in line and '"computed"' in line][-1]
    assert 0 < extract["computed"] < len(split)


@pytest.mark.slow
def test_a_worker_killed_mid_run_fails_the_run_in_one_sentence_without_a_model(setting, tmp_path):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    workers = _start_workers(setting, out, cache, "--epochs", "2", "--fine-tune-epochs", "30", timeout_s=20)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # kill worker 1 once fine-tuning has begun
            progress = list(out.glob("*/progress.jsonl"))
            if progress and '"fine_tune"' in progress[0].read_text():
                break
            assert workers[0].poll() is None and workers[1].poll() is None, "a worker ended early"
            time.sleep(0.5)
        else:
            pytest.fail("fine-tuning did not start in time")
        workers[1].kill()
        _stdout, stderr = workers[0].communicate(timeout=180)
    finally:
        _stop(workers)
    assert workers[0].returncode not in (0, None)
    run = _only_run(out)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed"
    message = status["message"]
    assert "stopped answering" in message and message.count(". ") == 0 and message.endswith("."), message
    assert message in stderr
    assert not (run / "model.keras").exists()


def test_mixed_precision_features_have_a_cache_key_of_their_own():
    import keras

    from cxr_core.engine.features import model_key

    plain = model_key(TINY_MODEL, 1)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = model_key(TINY_MODEL, 1)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert mixed != plain and model_key(TINY_MODEL, 1) == plain
