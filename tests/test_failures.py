"""Failures: nothing lost, nothing half-written.

Training is killed (SIGKILL) while it writes the feature cache and while it saves the model, a
background job is cancelled, the disk fills up, and the runs folder is read-only. Each time the
run folder tells the truth (failed / cancelled, never done without a model), earlier work is intact
and the next run works. (SIGKILL during an epoch is in test_train_cli.py.)

The kills are injected by running the real training process (launched by ``jobs.start_training``,
so it holds the real one-job lock) through a ``python -c`` wrapper that patches one writer to leave
a partial temporary file and then SIGKILL its own process.
"""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_PRETRAINED, make_dataset
from cxr_core.core.config import DataConfig, RunConfig, TrainConfig
from cxr_core.core.errors import BadRunError, CxrError, DiskFullError
from cxr_core.hosting import jobs
from cxr_core.io.atomic import read_jsonl
from cxr_core.runs import registry as runs, run_folder
from cxr_core.runs.run_folder import RunFolder

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HOME = str(PROJECT_ROOT / "Home.py")
GENEROUS_S = 120  # bounds for a busy 2-core machine; not performance assertions
# Every test here trains (in-process or a training process) to break it: the slow lane.
pytestmark = pytest.mark.slow


def tiny_config(data_dir: Path, cache_dir: Path, **train) -> RunConfig:
    return RunConfig(
        data=DataConfig(data_dir=str(data_dir), split="random"),
        model=TINY_PRETRAINED,
        train=TrainConfig(**{"epochs": 1, "batch_size": 8, "balance": "none", "cache_dir": str(cache_dir), **train}),
    )


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256 of its bytes)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def temp_leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp-*")]


def wait_until(predicate, timeout: float, what: str, step: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- A real background job whose process runs a patch first -------------------------------------

CHILD = r"""
import io, os, signal, sys
{patch}
from cxr_core.cli import main
sys.exit(main(sys.argv[1:]))
"""

KILL_IN_CACHE_WRITE = r"""
import numpy as np
from cxr_core.engine import features
from cxr_core.io import atomic
_real_write_entry = features._write_entry
_count = [0]

def _write_entry(path, vec):
    _count[0] += 1
    if _count[0] == {kill_at}:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(vec, np.float32), allow_pickle=False)
        data = buffer.getvalue()
        with atomic.atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(data[: len(data) // 2])  # half an entry...
                handle.flush()
                os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)     # ...and the power goes
    _real_write_entry(path, vec)

features._write_entry = _write_entry
"""

KILL_IN_MODEL_SAVE = r"""
import keras
_real_save = keras.Model.save

def _save(self, filepath, *args, **kwargs):
    _real_save(self, filepath, *args, **kwargs)
    size = os.path.getsize(filepath)
    with open(filepath, "r+b") as handle:  # leave a partial model where the writer was writing
        handle.truncate(size // 2)
        handle.flush()
        os.fsync(handle.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

keras.Model.save = _save
"""


def launch_patched(monkeypatch, config: RunConfig, root: Path, patch: str) -> tuple[Path, subprocess.Popen]:
    """``jobs.start_training`` as the Training page calls it, with ``patch`` run in the child first."""
    real_popen = subprocess.Popen
    launched: list[subprocess.Popen] = []

    def popen(cmd, **kwargs):
        assert cmd[1:3] == ["-m", "cxr_core"], cmd
        process = real_popen([cmd[0], "-c", CHILD.replace("{patch}", patch), *cmd[3:]], **kwargs)
        launched.append(process)
        return process

    monkeypatch.setattr(jobs.subprocess, "Popen", popen)
    run_dir = jobs.start_training(config, root)
    monkeypatch.setattr(jobs.subprocess, "Popen", real_popen)
    return run_dir, launched[0]


def assert_killed_and_clean(run_dir: Path, process: subprocess.Popen, root: Path) -> dict:
    try:
        process.wait(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(
            "the training process was never killed: " + (run_dir / "train.log").read_text()[-2000:]) from None
    assert process.returncode == -signal.SIGKILL, (run_dir / "train.log").read_text()[-2000:]
    status = runs.read_status(run_dir)
    assert status["state"] == "failed", status
    assert "killed or crashed" in status["error"]
    assert not (run_dir / run_folder.MODEL_FILE).exists()
    assert all(s.state != "done" for s in runs.list_runs(root, include_demo=False))
    wait_until(lambda: not jobs.is_busy(root), 30, "the jobs lock to be released")
    assert jobs.active_run(root) is None
    return status


# =============================================================================================
# SIGKILL while writing the feature cache
# =============================================================================================


def test_sigkill_while_writing_the_feature_cache(tmp_path, monkeypatch):
    from cxr_core.engine import features
    from cxr_core.engine.train import train

    data = make_dataset(tmp_path / "data", n_normal=16, n_pneumonia=24, size=32)
    cache = tmp_path / "cache"
    root = tmp_path / "runs"
    kill_at = 20  # the batch is 16: the first batch's entries are on disk, the second is cut
    run_dir, process = launch_patched(monkeypatch, tiny_config(data, cache, batch_size=16), root,
                                      KILL_IN_CACHE_WRITE.replace("{kill_at}", str(kill_at)))
    assert_killed_and_clean(run_dir, process, root)
    assert runs.read_progress(run_dir)["stage"] == "extract"

    # The cache holds the entries finished before the kill, each complete, and the half-written
    # one only as a hidden temporary file that is never read as an entry.
    entries = sorted(cache.rglob("*.npy"))
    entries = [p for p in entries if not p.name.startswith(".")]
    leftovers = temp_leftovers(cache)
    assert len(leftovers) == 1, leftovers
    assert len(entries) == kill_at - 1
    for entry in entries:
        vec = np.load(entry, allow_pickle=False)
        assert vec.dtype == np.float32 and vec.ndim == 1 and np.isfinite(vec).all()

    # A new run over the same cache completes, reusing the good entries and computing the rest.
    again = train(tiny_config(data, cache, batch_size=16), run_dir=root / "again")
    assert runs.read_status(again)["state"] == "done"
    done = [e for e in read_jsonl(again / "progress.jsonl") if e.get("event") == "extract" and "cached" in e][-1]
    assert done["cached"] == kill_at - 1 and done["cached"] + done["computed"] == 40

    # Its features equal a fresh extraction into an empty cache.
    rows = pd.read_csv(again / "split.csv")
    config = tiny_config(data, cache, batch_size=16)
    from_cache = features.extract_features(rows, config.model, config.augment, cache_dir=cache, batch_size=16)
    fresh = features.extract_features(rows, config.model, config.augment, cache_dir=tmp_path / "fresh", batch_size=16)
    assert from_cache.n_cached == len(rows) and fresh.n_computed == len(rows)
    np.testing.assert_array_equal(from_cache.index, fresh.index)
    np.testing.assert_allclose(from_cache.features, fresh.features, rtol=1e-4, atol=1e-5)


# =============================================================================================
# SIGKILL while saving the model
# =============================================================================================


def test_sigkill_while_saving_the_model(tmp_path, monkeypatch):
    from cxr_core.inference.predictor import Predictor

    data = make_dataset(tmp_path / "data", n_normal=12, n_pneumonia=16, size=32)
    root = tmp_path / "runs"
    run_dir, process = launch_patched(monkeypatch, tiny_config(data, tmp_path / "cache"), root, KILL_IN_MODEL_SAVE)
    assert_killed_and_clean(run_dir, process, root)
    assert runs.read_progress(run_dir)["stage"] == "save"
    # The partial model exists only as the hidden temporary file; model.keras never appeared.
    leftovers = temp_leftovers(run_dir)
    assert [p.name.startswith(".model.keras.tmp-") for p in leftovers] == [True]
    assert (run_dir / "metrics.json").is_file()  # written before the model, yet the run is not done
    assert [s.state for s in runs.list_runs(root, include_demo=False)] == ["failed"]
    with pytest.raises(BadRunError, match="has no model.keras"):
        Predictor.from_run(run_dir)


# =============================================================================================
# Cancelling a background job
# =============================================================================================


def test_cancel_a_background_job(tmp_path):
    data = make_dataset(tmp_path / "data", n_normal=12, n_pneumonia=16, size=32)
    root = tmp_path / "runs"
    run_dir = jobs.start_training(tiny_config(data, tmp_path / "cache", epochs=500, batch_size=4), root)
    assert jobs.is_busy(root) and jobs.active_run(root) == run_dir
    wait_until(lambda: (run_dir / "history.csv").exists() or runs.read_status(run_dir)["state"] != "running",
               GENEROUS_S, "the first epoch")
    assert runs.read_status(run_dir)["state"] == "running", (run_dir / "train.log").read_text()[-2000:]
    jobs.request_cancel(run_dir)
    wait_until(lambda: runs.read_status(run_dir)["state"] != "running", 60, "the job to stop after the cancel")
    status = runs.read_status(run_dir)
    assert status["state"] == "cancelled", status
    assert not (run_dir / run_folder.MODEL_FILE).exists()
    assert len(RunFolder(run_dir).read_history()) < 500
    wait_until(lambda: not jobs.is_busy(root), 30, "the jobs lock to be released")
    assert jobs.active_run(root) is None


# =============================================================================================
# Disk full
# =============================================================================================


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data, runs root, a finished run in that root); each disk-full case adds its run beside it."""
    from cxr_core.engine.train import train

    base = tmp_path_factory.mktemp("disk-full")
    data = make_dataset(base / "data", n_normal=12, n_pneumonia=16, size=32)
    root = base / "runs"
    previous = train(tiny_config(data, base / "cache"), run_dir=root / "previous")
    assert runs.read_status(previous)["state"] == "done"
    return data, root, previous


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("target", ["model.keras", "metrics.json"])
def test_disk_full_while_writing_a_run(previous_run, monkeypatch, target):
    import keras

    from cxr_core.engine import train as train_lib
    from cxr_core.inference.predictor import Predictor
    from cxr_core.io import atomic

    data, root, previous = previous_run
    before = snapshot(previous)
    probe = np.full((40, 40), 90, np.uint8)
    answer_before = Predictor.from_run(previous).predict([probe])[0].probability
    if target == "model.keras":
        def full_save(_self, filepath, *_args, **_kwargs):
            with open(filepath, "wb") as handle:
                handle.write(b"PK\x03\x04 half a model")  # some bytes made it, then the disk was full
            raise _enospc(filepath)

        monkeypatch.setattr(keras.Model, "save", full_save)
    else:
        # Every file of a run is written by RunFolder (cxr_core.runs.run_folder).
        real = run_folder.write_json_atomic

        def full_json(path, obj):
            if Path(path).name != "metrics.json":
                return real(path, obj)
            with atomic.atomic_path(path) as tmp:
                Path(tmp).write_text('{"threshold": 0.')
                raise _enospc(path)

        monkeypatch.setattr(run_folder, "write_json_atomic", full_json)

    run_dir = root / f"new-{target}"
    with pytest.raises(CxrError) as info:
        train_lib.train(tiny_config(data, root.parent / "cache"), run_dir=run_dir)
    message = str(info.value)
    assert isinstance(info.value, DiskFullError)
    assert "The disk is full" in message and "\n" not in message
    status = runs.read_status(run_dir)
    assert status["state"] == "failed"
    assert "The disk is full" in status["message"]
    assert not (run_dir / run_folder.MODEL_FILE).exists()
    assert not temp_leftovers(run_dir)  # the half-written temporary file was removed
    if target == "metrics.json":
        assert not (run_dir / "metrics.json").exists()
    # The earlier run is untouched, byte for byte, and still loads.
    assert snapshot(previous) == before
    assert runs.read_status(previous)["state"] == "done"
    monkeypatch.undo()
    assert Predictor.from_run(previous).predict([probe])[0].probability == pytest.approx(answer_before, abs=1e-6)


def test_disk_full_in_the_feature_cache_only_loses_the_cache(tmp_path, monkeypatch):
    from cxr_core.engine import features
    from cxr_core.engine.train import train

    data = make_dataset(tmp_path / "data", n_normal=12, n_pneumonia=16, size=32)

    def full(path, _vec):
        raise _enospc(path)

    monkeypatch.setattr(features, "_write_entry", full)
    run = train(tiny_config(data, tmp_path / "cache"), run_dir=tmp_path / "runs" / "r")
    assert runs.read_status(run)["state"] == "done"
    assert (run / run_folder.MODEL_FILE).is_file()
    assert not [p for p in (tmp_path / "cache").rglob("*.npy")]


# =============================================================================================
# Read-only artifacts folder
# =============================================================================================


def test_read_only_runs_folder_falls_back_and_training_still_works(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from cxr_core.engine.train import train

    blocker = tmp_path / "artifacts"
    blocker.write_text("a file where the folder should be (chmod does not stop root; this does)")
    monkeypatch.setenv("CXR_RUNS_DIR", str(blocker / "runs"))
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))

    root = runs.runs_root()
    assert root.fallback and root.path.is_dir()
    assert root.path.is_relative_to(system_tmp)
    assert str(blocker / "runs") in root.reason and "runs are kept in" in root.reason

    # The Training page says where runs go and that they will not survive a restart.
    data = make_dataset(Path(os.environ["CXR_DATA_ROOT"]) / "small", n_normal=12, n_pneumonia=16, size=32)
    at = AppTest.from_file(HOME, default_timeout=120)
    at.run()
    at.session_state["dataset"] = "small"
    at.switch_page("pages/training.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    notes = [str(e.value) for e in [*at.info, *at.warning]]
    fallback_notes = [n for n in notes if "runs are kept in" in n and str(root.path) in n]
    assert fallback_notes, notes
    assert "lost when the server restarts" in fallback_notes[0]
    # Offline, the only error is the starting-weights check (ImageNet cannot be had here).
    assert [e.value for e in at.error if "ImageNet weights" not in e.value] == []

    # A run trains into the fallback folder, and the lock works there too.
    assert not jobs.is_busy()
    run = train(tiny_config(data, tmp_path / "cache"))
    assert run.parent == root.path
    assert runs.read_status(run)["state"] == "done"
    assert [s.path for s in runs.list_runs(include_demo=False)] == [run]
    assert blocker.is_file()  # nothing was written where it could not be
