"""Runs that train on another machine into a shared runs folder: liveness by heartbeat, and what the
Training and Evaluation pages say about where a run trains."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest

from cxr_core.io.atomic import write_json_atomic
from cxr_core.runs import heartbeat, registry as runs
from cxr_core.runs.run_folder import RunFolder

HOME = str(Path(__file__).resolve().parents[1] / "Home.py")
# Where a run trains, as the training process records it (status.json and the "runtime" progress event).
RUNTIME = {"host": "gpu-01", "devices": ["GPU:0", "GPU:1"], "device_kind": "GPU", "strategy": "MirroredStrategy",
           "replicas": 2, "workers": 1, "precision": "mixed_float16"}
WHERE = "2 × GPU (MirroredStrategy) · mixed_float16"


def runs_dir() -> Path:
    return Path(os.environ["CXR_RUNS_DIR"])


def running_run(name: str, host: str | None, pid: int | None = None, **fields) -> RunFolder:
    folder = RunFolder(runs_dir() / name)
    folder.path.mkdir(parents=True)
    status = {"pid": os.getpid() if pid is None else pid, **fields}
    if host is not None:
        status["host"] = host
    folder.write_status("running", **status)
    return folder


def beat(folder: RunFolder, host: str, age_s: float = 0.0, mtime_age_s: float | None = None) -> None:
    """A heartbeat written by ``host``, its recorded time ``age_s`` old and its file ``mtime_age_s`` old."""
    path = folder.path / heartbeat.HEARTBEAT_FILE
    write_json_atomic(path, {"host": host, "pid": 4242, "time": time.time() - age_s})
    old = time.time() - (age_s if mtime_age_s is None else mtime_age_s)
    os.utime(path, (old, old))


def dead_pid() -> int:
    """The pid of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_run_on_another_host_is_alive_while_its_heartbeat_is_fresh():
    # Its pid is ours, alive here: it must not be taken for the remote process (no pid check at all).
    folder = running_run("remote", "other-host")
    beat(folder, "other-host", age_s=5)
    assert runs.read_status(folder.path)["state"] == "running"
    assert runs.running_process(folder.read_status_file()) is None  # the pid names no process of this host
    # Clocks differ: a heartbeat is fresh when either its file's time or the time written in it is recent.
    beat(folder, "other-host", age_s=3600, mtime_age_s=5)
    assert runs.read_status(folder.path)["state"] == "running"
    beat(folder, "other-host", age_s=5, mtime_age_s=3600)
    assert runs.read_status(folder.path)["state"] == "running"


def test_a_run_on_another_host_with_a_stale_heartbeat_reads_as_failed_naming_the_host():
    folder = running_run("remote", "other-host")
    beat(folder, "other-host", age_s=600)
    status = runs.read_status(folder.path)
    sentence = ("The training process on host other-host has not been heard from for 10 minutes; it stopped or "
                "lost the shared folder.")
    assert status["state"] == "failed"
    assert status["error"] == status["message"] == sentence
    assert folder.read_status_file()["state"] == "running"  # reading never rewrites the run's files
    beat(folder, "other-host", age_s=3 * 3600)
    assert "for 3 hours;" in runs.read_status(folder.path)["error"]


def test_a_remote_run_that_never_beat_is_judged_by_its_status_and_the_heartbeat_names_the_host():
    # The status does not name the host yet, but the heartbeat (written first) does.
    folder = running_run("early", None)
    beat(folder, "other-host", age_s=1)
    assert runs.read_status(folder.path)["state"] == "running"
    assert runs.other_host(folder.path) == "other-host"
    # A status from another host and no heartbeat at all: its own age decides.
    silent = running_run("silent", "other-host", updated=time.time() - 900)
    old = time.time() - 900
    os.utime(silent.path / "status.json", (old, old))
    assert "on host other-host has not been heard from for 15 minutes" in runs.read_status(silent.path)["error"]


def test_a_run_on_this_host_keeps_the_pid_check():
    alive = running_run("alive", heartbeat.this_host())
    beat(alive, heartbeat.this_host(), age_s=3600)  # a stale heartbeat does not matter: the process is here
    assert runs.read_status(alive.path)["state"] == "running"
    assert runs.running_process(alive.read_status_file()) is not None
    assert runs.other_host(alive.path) is None
    for name, host in (("gone", heartbeat.this_host()), ("old-run", None)):  # an old run has no host at all
        gone = running_run(name, host, pid=dead_pid())
        if host:
            beat(gone, host, age_s=0)  # a fresh heartbeat does not matter either
        status = runs.read_status(gone.path)
        assert status["state"] == "failed", name
        assert status["error"] == "the training process stopped without finishing (killed or crashed)"


def test_running_elsewhere_lists_only_live_runs_of_other_hosts():
    remote = running_run("20260101-000002-remote", "other-host", started=2.0)
    beat(remote, "other-host")
    newer = running_run("20260101-000003-newer", "gpu-02", started=3.0)
    beat(newer, "gpu-02")
    stale = running_run("20260101-000001-stale", "other-host", started=1.0)
    beat(stale, "other-host", age_s=3600)
    running_run("local", heartbeat.this_host())
    done = RunFolder(runs_dir() / "done-elsewhere")
    done.path.mkdir()
    done.write_status("done", host="other-host")
    assert runs.running_elsewhere(runs_dir()) == [newer.path, remote.path]


def test_runtime_comes_from_the_status_else_from_the_runtime_event():
    folder = running_run("r", "gpu-01", **{k: v for k, v in RUNTIME.items() if k != "host"})
    assert runs.runtime(folder.path) == RUNTIME
    # A finished run's status may no longer carry the fields; its first "runtime" event still does.
    folder.append_progress({"event": "runtime", **RUNTIME, "host": "from-event"})
    folder.write_status("done", message="ok")
    assert runs.runtime(folder.path) == {**RUNTIME, "host": "from-event"}
    assert runs.read_progress(folder.path)["stage"] is None  # the progress bar ignores the runtime event
    old = RunFolder(runs_dir() / "old")
    old.path.mkdir()
    old.write_status("done")
    assert runs.runtime(old.path) == {}


def test_where_a_run_trained_in_words():
    from pages.ui import models

    folder = running_run("r", None)
    assert models.where_trained(folder.path) == ""  # a run from before says nothing
    folder.write_status("running", **RUNTIME)
    assert models.where_trained(folder.path, running=True) == f"Training on host gpu-01 · {WHERE}"
    folder.write_status("running", host="cpu-box", devices=["CPU:0"], device_kind="CPU", strategy="default",
                        replicas=1, workers=1, precision="float32")
    assert models.where_trained(folder.path) == "Trained on host cpu-box · 1 × CPU · float32"
    folder.write_status("running", host="node-0", device_kind="GPU", strategy="MultiWorkerMirroredStrategy",
                        replicas=4, workers=2)
    assert models.where_trained(folder.path) == ("Trained on host node-0 (the chief of 2 workers) · "
                                                 "4 × GPU (MultiWorkerMirroredStrategy)")


def _finished_run_with_runtime(name: str) -> Path:
    """A finished run (metrics, predictions, a placeholder model) whose runtime event says where it trained."""
    import pandas as pd

    from conftest import TINY_MODEL
    from cxr_core.core import metrics as evaluate
    from cxr_core.core.config import RunConfig

    folder = RunFolder(runs_dir() / name)
    folder.path.mkdir(parents=True)
    folder.write_config(RunConfig(model=TINY_MODEL))
    y = np.array([0] * 10 + [1] * 10)
    p = np.linspace(0.05, 0.95, 20)
    folder.write_metrics(evaluate.metrics_report(y, p, y, p))
    folder.write_predictions(pd.DataFrame([{"path": f"/nowhere/{split}{i}.png", "y": int(t), "probability": float(q),
                                            "split": split} for split in ("val", "test")
                                           for i, (t, q) in enumerate(zip(y, p))]))
    folder.model_path.write_bytes(b"placeholder")
    folder.append_progress({"event": "runtime", **RUNTIME})
    folder.write_status("done", message="finished", host="gpu-01")
    return folder.path


def test_the_pages_follow_a_run_training_elsewhere_and_say_where_runs_trained():
    remote = running_run("20260101-000000-remote", "other-host", **{k: v for k, v in RUNTIME.items() if k != "host"})
    beat(remote, "other-host")
    remote.write_history([{"phase": "head", "epoch": 1, "loss": 0.6, "accuracy": 0.7, "auc": 0.7,
                           "val_loss": 0.6, "val_accuracy": 0.7, "val_auc": 0.75}])
    remote.append_progress({"event": "stage", "stage": "train", "total": 5})
    finished = _finished_run_with_runtime("20251231-000000-finished")

    at = AppTest.from_file(HOME, default_timeout=120)
    at.run()
    at.switch_page("pages/training.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Training on other machines" in [s.value for s in at.subheader]
    captions = [c.value for c in at.caption]
    assert f"Training on host other-host · {WHERE}" in captions
    assert "Started from the command line on other-host; this page follows its files." in captions
    assert any(f"curve_{remote.path.name}_loss" in c.proto.id for c in at.get("plotly_chart"))  # its live curves
    assert [p.proto.text for p in at.get("progress")] == ["Training the head: epoch 1 of 5"]

    at.switch_page("pages/evaluation.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="eval_run").value == str(finished)
    assert f"Trained on host gpu-01 · {WHERE}" in [c.value for c in at.caption]
