"""Run folders and the one-job-per-server lock."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import TINY_MODEL
from cxr_core import jobs, run_folder, runs
from cxr_core.atomic import append_jsonl, read_jsonl, write_json_atomic
from cxr_core.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from cxr_core.errors import BadRunError, TrainingBusyError
from cxr_core.run_folder import RunFolder


def test_runs_root_uses_env_and_falls_back_when_read_only(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_RUNS_DIR", str(tmp_path / "runs"))
    assert runs.runs_root().path == tmp_path / "runs"
    assert not runs.runs_root().fallback
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits
            pytest.skip("running as root: a read-only folder is still writable")
        monkeypatch.setenv("CXR_RUNS_DIR", str(locked / "runs"))
        root = runs.runs_root()
        assert root.fallback and "not writable" in root.reason
        assert root.path != locked / "runs"
    finally:
        locked.chmod(0o700)


def test_runs_root_falls_back_when_path_is_a_file(tmp_path, monkeypatch):
    # Works as root too: a file where the folder should be cannot be written into.
    blocker = tmp_path / "artifacts"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CXR_RUNS_DIR", str(blocker / "runs"))
    root = runs.runs_root()
    assert root.fallback
    assert "not writable" in root.reason
    assert root.path.is_dir()


def test_new_run_dirs_are_unique(tmp_path):
    a = runs.new_run_dir(tmp_path, "mobilenet_v2/patient")
    b = runs.new_run_dir(tmp_path, "mobilenet_v2/patient")
    assert a != b and a.is_dir() and b.is_dir()
    assert "/" not in a.name


def test_running_status_of_a_dead_process_reads_failed(tmp_path):
    run = runs.new_run_dir(tmp_path, "x")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    RunFolder(run).write_status("running", pid=dead.pid)
    status = runs.read_status(run)
    assert status["state"] == "failed"
    assert "stopped without finishing" in status["error"]
    RunFolder(run).write_status("running", pid=os.getpid())
    assert runs.read_status(run)["state"] == "running"


def test_done_without_model_reads_failed(tmp_path):
    run = runs.new_run_dir(tmp_path, "x")
    RunFolder(run).write_status("done")
    assert runs.read_status(run)["state"] == "failed"
    (run / "model.keras").write_bytes(b"stand-in")
    assert runs.read_status(run)["state"] == "done"


def test_missing_or_garbage_status(tmp_path):
    run = runs.new_run_dir(tmp_path, "x")
    assert runs.read_status(run)["state"] == "failed"
    (run / "status.json").write_text("{not json")
    assert runs.read_status(run)["state"] == "failed"


def test_progress_tolerates_a_torn_last_line(tmp_path):
    run = runs.new_run_dir(tmp_path, "x")
    append_jsonl(run / "progress.jsonl", {"event": "stage", "stage": "extract", "total": 10})
    append_jsonl(run / "progress.jsonl", {"event": "extract", "done": 4, "total": 10, "eta_s": 3.0})
    with open(run / "progress.jsonl", "a") as handle:
        handle.write('{"event": "extract", "do')  # killed mid-write
    assert len(read_jsonl(run / "progress.jsonl")) == 2
    progress = runs.read_progress(run)
    assert progress["stage"] == "extract"
    assert progress["fraction"] == pytest.approx(0.4)
    assert progress["eta_s"] == 3.0


def test_list_and_delete_runs(tmp_path):
    first = runs.new_run_dir(tmp_path, "a")
    write_json_atomic(first / "config.json", RunConfig(model=ModelConfig(backbone="mobilenet_v2")).to_dict())
    RunFolder(first).write_status("failed", error="boom")
    listed = runs.list_runs(tmp_path, include_demo=False)
    assert [s.run_id for s in listed] == [first.name]
    assert listed[0].backbone == "mobilenet_v2" and listed[0].state == "failed"
    assert listed[0].as_row()["status"] == "failed"
    runs.delete_run(first)
    assert not first.exists()
    assert runs.list_runs(tmp_path, include_demo=False) == []


def test_delete_refuses_a_running_run(tmp_path):
    run = runs.new_run_dir(tmp_path, "a")
    RunFolder(run).write_status("running", pid=os.getpid())
    with pytest.raises(BadRunError, match="still running"):
        runs.delete_run(run)


def _config(data_dir: Path) -> RunConfig:
    return RunConfig(
        data=DataConfig(data_dir=str(data_dir), split="random", limit=None),
        model=TINY_MODEL,
        train=TrainConfig(epochs=2, batch_size=8),
    )


def test_only_one_job_at_a_time_even_when_launched_together(tmp_path, monkeypatch, tiny_dataset):
    root = tmp_path / "runs"
    # A stand-in "training" that just sleeps: the lock must live as long as the child process.
    real_popen = subprocess.Popen

    def sleeping_child(_cmd, **kwargs):
        return real_popen([sys.executable, "-c", "import time; time.sleep(3)"], **kwargs)

    monkeypatch.setattr(jobs.subprocess, "Popen", sleeping_child)
    results: list = []
    barrier = threading.Barrier(2)

    def press_train():
        barrier.wait()
        try:
            results.append(jobs.start_training(_config(tiny_dataset), root))
        except TrainingBusyError as error:
            results.append(error)

    threads = [threading.Thread(target=press_train) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [r for r in results if isinstance(r, Path)]
    refused = [r for r in results if isinstance(r, TrainingBusyError)]
    assert len(started) == 1 and len(refused) == 1
    assert "already running" in str(refused[0])
    assert jobs.is_busy(root)
    assert jobs.active_run(root) == started[0]
    deadline = time.time() + 15
    while jobs.is_busy(root) and time.time() < deadline:
        time.sleep(0.2)
    assert not jobs.is_busy(root), "the lock must be released when the training process ends"
    assert jobs.active_run(root) is None


def test_request_cancel_writes_the_cancel_file(tmp_path):
    run = runs.new_run_dir(tmp_path, "a")
    jobs.request_cancel(run)
    assert (run / run_folder.CANCEL_FILE).read_text() == "cancel\n"


def test_progress_moves_within_an_epoch(tmp_path):
    run = runs.new_run_dir(tmp_path, "x")
    append_jsonl(run / "progress.jsonl", {"event": "stage", "stage": "fine_tune", "total": 4})
    append_jsonl(run / "progress.jsonl", {"event": "epoch", "epoch": 1, "epochs": 4, "eta_s": 30})
    append_jsonl(run / "progress.jsonl", {"event": "batch", "batch": 5, "batches": 10, "eta_s": 20})
    progress = runs.read_progress(run)
    assert progress["fraction"] == pytest.approx(1.5 / 4)
    assert progress["eta_s"] == 20


def test_sweep_stale_temps_keeps_fresh_ones(tmp_path):
    from cxr_core.atomic import sweep_stale_temps

    old = tmp_path / "ab" / ".x.npy.tmp-123.npy"
    fresh = tmp_path / "ab" / ".y.npy.tmp-456.npy"
    keep = tmp_path / "ab" / "x.npy"
    old.parent.mkdir()
    for p in (old, fresh, keep):
        p.write_bytes(b"1")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert sweep_stale_temps(tmp_path) == 1
    assert not old.exists() and fresh.exists() and keep.exists()
