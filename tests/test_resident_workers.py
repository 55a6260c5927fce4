"""Resident training workers: the inbox and state files, a job in a worker trains what a new process trains,
a worker killed mid-job fails only that job and is replaced, and a cancelled job leaves the worker serving."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import TINY_PRETRAINED
from cxr_core.core.config import DataConfig, RunConfig, TrainConfig
from cxr_core.hosting import jobs, workers
from cxr_core.runs import registry as runs
from cxr_core.runs.run_folder import RunFolder, RunState

SENTENCE_START = "The training worker stopped unexpectedly"


@pytest.fixture(autouse=True)
def _one_slot(monkeypatch):
    monkeypatch.delenv(jobs.MAX_JOBS_ENV, raising=False)


def _pretend_worker(root: Path, slot: int, pid: int | None = None, **fields) -> dict:
    """A worker state file naming this test process (alive) or ``pid``."""
    created = psutil.Process().create_time() if pid is None else None
    state = {"slot": slot, "pid": pid or os.getpid(), "pid_create_time": created, "state": "idle",
             "job": None, "run_dir": None, "last_job": None, **fields}
    jobs.workers_dir(root).mkdir(parents=True, exist_ok=True)
    from cxr_core.io.atomic import write_json_atomic

    write_json_atomic(jobs.worker_state_path(root, slot), state)
    return state


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- the protocol, without TensorFlow --------------------------------------------------------------

def test_a_job_goes_to_an_idle_worker_only_and_is_taken_back_when_not_claimed(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    folder = RunFolder(runs.new_run_dir(root, "x"))
    assert jobs._hand_to_worker(root, 0, folder) is None  # no worker at all
    _pretend_worker(root, 0, pid=_dead_pid())
    assert jobs._hand_to_worker(root, 0, folder) is None  # a dead one
    _pretend_worker(root, 0, state="busy")
    assert jobs._hand_to_worker(root, 0, folder) is None  # a busy one
    # An idle worker that does not look into its inbox in time: the job is taken back, whole.
    _pretend_worker(root, 0)
    monkeypatch.setattr(jobs, "WORKER_CLAIM_S", 0.2)
    assert jobs._hand_to_worker(root, 0, folder) is None
    assert not jobs.worker_inbox_path(root, 0).exists() and jobs.claim_assignment(root, 0) is None
    assert list(jobs.workers_dir(root).glob("*-0.json")) == [jobs.worker_state_path(root, 0)]

    claimed: list[dict] = []

    def worker() -> None:
        while not claimed:
            job = jobs.claim_assignment(root, 0)
            if job is not None:
                claimed.append(job)
            time.sleep(0.01)

    thread = threading.Thread(target=worker)
    thread.start()
    handle = jobs._hand_to_worker(root, 0, folder)
    thread.join(5)
    assert isinstance(handle, jobs.WorkerJob) and claimed[0]["job"] == handle.job
    assert claimed[0]["run_dir"] == str(folder.path.resolve())
    assert claimed[0]["lock_file"] == str(jobs.lock_path(root, 0).resolve())
    assert handle.poll() is None  # alive, and it has not given the job up
    _pretend_worker(root, 0, last_job=handle.job)  # it ended the job before it started it
    assert handle.poll() == 2


def test_a_run_left_by_its_live_worker_or_whose_worker_died_reads_failed_with_one_sentence(tmp_path):
    root = tmp_path / "runs"
    run = runs.new_run_dir(root, "x")
    marks = {"worker": str(jobs.worker_state_path(root, 0)), "job": "job-a"}
    RunFolder(run).write_status(RunState.RUNNING, pid=os.getpid(), **marks)
    _pretend_worker(root, 0, state="busy", job="job-a", run_dir=str(run))
    assert runs.read_status(run)["state"] == "running"
    # The same worker, alive, now idle or on another job: the pid is not this run's any more.
    _pretend_worker(root, 0, job=None, last_job="job-a")
    status = runs.read_status(run)
    assert status["state"] == "failed" and status["error"].startswith(SENTENCE_START)
    _pretend_worker(root, 0, state="busy", job="job-b")
    assert runs.read_status(run)["state"] == "failed"
    # A worker that died during the job: the registry says so, and the pool writes it into the status.
    dead = _dead_pid()
    RunFolder(run).write_status(RunState.RUNNING, pid=dead, pid_create_time=None, **marks)
    assert runs.read_status(run)["error"] == runs.worker_stopped()
    state = _pretend_worker(root, 0, pid=dead, state="busy", job="job-a", run_dir=str(run))
    assert workers.fail_orphaned_job(state, "killed by signal 9")
    written = RunFolder(run).status()
    assert written.state is RunState.FAILED
    assert written.error == "The training worker stopped unexpectedly (killed by signal 9); train again."
    assert not workers.fail_orphaned_job(state)  # once


def test_a_worker_serves_jobs_one_after_another_and_lets_go_of_the_slot(tmp_path, monkeypatch):
    """``serve`` with a stand-in job (the handshake, then a final status): no TensorFlow."""
    root = tmp_path / "runs"
    root.mkdir()
    jobs.set_max_concurrent(2, root)
    monkeypatch.setattr(workers, "CHECK_EVERY_S", 0.05)
    # ``serve`` runs inside this test process, whose size depends on what else it ran (TensorFlow):
    # the memory limit belongs to a real worker, tested below.
    monkeypatch.setattr(workers, "MAX_RSS_MB", 10**6)
    served: list[str] = []

    def run_job(job: dict, marks: dict) -> int:
        jobs.hold_training_lock(job["lock_file"], job["run_dir"], **marks)
        assert jobs._held(Path(job["lock_file"])) and RunFolder(job["run_dir"]).status().raw["job"] == job["job"]
        served.append(job["run_dir"])
        if len(served) == 2:
            return 1  # a job that ends without saying how: the worker marks it failed
        RunFolder(job["run_dir"]).write_status(RunState.DONE, message="done", **marks)
        jobs.release_training_lock(job["lock_file"])
        return 0

    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(
        workers.serve(root, 1, run_job, poll_s=0.01, redirect=False, warm=lambda: None)))
    thread.start()
    assert workers.wait_idle(root, 1, 10)
    # A second worker for the same slot stops at once.
    assert workers.serve(root, 1, run_job, redirect=False, warm=lambda: None) == 0
    runs_ = [runs.new_run_dir(root, f"r{i}") for i in range(2)]
    from cxr_core.io.atomic import write_json_atomic

    for i, run in enumerate(runs_):
        write_json_atomic(jobs.worker_inbox_path(root, 1), {"job": f"j{i}", "run_dir": str(run),
                                                            "lock_file": str(jobs.lock_path(root, 1))})
        deadline = time.time() + 10
        while (jobs.read_worker_state(root, 1) or {}).get("last_job") != f"j{i}" and time.time() < deadline:
            time.sleep(0.02)
    assert served == [str(run) for run in runs_]
    assert RunFolder(runs_[0]).status().state is RunState.DONE
    assert RunFolder(runs_[1]).status().error == "The training worker ended this job without finishing it; train again."
    assert jobs.read_worker_state(root, 1)["jobs_done"] == 2
    jobs.release_training_lock(jobs.lock_path(root, 1))
    assert not jobs._held(jobs.lock_path(root, 1))
    jobs.set_max_concurrent(1, root)  # slot 1 is no longer used: its worker ends
    thread.join(10)
    assert codes == [0] and jobs.read_worker_state(root, 1)["state"] == "stopped"


def test_a_worker_that_grew_past_its_limit_stops_after_the_job(tmp_path, monkeypatch, capsys):
    """A job that leaves the worker too big ends that worker (the pool starts a fresh one)."""
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setattr(workers, "MAX_RSS_MB", 1)
    run = runs.new_run_dir(root, "big")

    def run_job(job: dict, marks: dict) -> int:
        jobs.hold_training_lock(job["lock_file"], job["run_dir"], **marks)
        RunFolder(job["run_dir"]).write_status(RunState.DONE, message="done", **marks)
        jobs.release_training_lock(job["lock_file"])
        return 0

    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(
        workers.serve(root, 0, run_job, poll_s=0.01, redirect=False, warm=lambda: None)))
    thread.start()
    assert workers.wait_idle(root, 0, 10)
    from cxr_core.io.atomic import write_json_atomic

    write_json_atomic(jobs.worker_inbox_path(root, 0), {"job": "j0", "run_dir": str(run),
                                                        "lock_file": str(jobs.lock_path(root, 0))})
    thread.join(10)
    assert codes == [0]
    state = jobs.read_worker_state(root, 0)
    assert state["state"] == "stopped" and state["last_job"] == "j0" and state["rss_mb"] > 1
    assert RunFolder(run).status().state is RunState.DONE
    assert "stops: it uses" in capsys.readouterr().err


# -- real workers (TensorFlow) ---------------------------------------------------------------------

@pytest.fixture
def practice(tmp_path) -> Path:
    from cxr_core.data.practice import make_practice_dataset

    return make_practice_dataset(tmp_path / "data", n_normal=16, n_pneumonia=24, size=64)


def _config(data: Path, cache: Path, **train) -> RunConfig:
    options = {"epochs": 2, "batch_size": 8, "cache_dir": str(cache), "export_litert": False, **train}
    return RunConfig(data=DataConfig(data_dir=str(data), split="random"), model=TINY_PRETRAINED,
                     train=TrainConfig(**options))


@pytest.fixture
def pool():
    made: list[workers.Pool] = []

    def make(root: Path) -> workers.Pool:
        made.append(workers.Pool(root))
        return made[-1]

    yield make
    for each in made:
        each.close(timeout=20)


def _wait_state(run: Path, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while runs.read_status(run)["state"] == "running" and time.time() < deadline:
        time.sleep(0.05)
    return runs.read_status(run)


def _wait_stage(run: Path, stage: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while runs.read_progress(run)["stage"] != stage and time.time() < deadline:
        time.sleep(0.05)
    assert runs.read_progress(run)["stage"] == stage


def _ready(pool_: workers.Pool) -> int:
    started = pool_.keep()
    assert started == [0]
    assert workers.wait_idle(pool_.root, 0, 180), (workers.worker_log_path(pool_.root, 0).read_text()[-2000:])
    return jobs.read_worker_state(pool_.root, 0)["pid"]


@pytest.mark.slow  # a worker and two training processes
def test_two_jobs_in_one_worker_train_what_separate_processes_train(tmp_path, practice, pool):
    cache = tmp_path / "cache"
    configs = [_config(practice, cache), _config(practice, cache, seed=7)]
    configs[1] = dataclasses.replace(configs[1], model=dataclasses.replace(TINY_PRETRAINED, dropout=0.3))
    alone = [jobs.start_training(config, tmp_path / "alone") for config in configs[:1]]
    assert _wait_state(alone[0])["state"] == "done"  # also fills the feature cache
    alone.append(jobs.start_training(configs[1], tmp_path / "alone"))
    assert _wait_state(alone[1])["state"] == "done"

    root = tmp_path / "resident"
    pid = _ready(pool(root))
    resident = []
    for config in configs:
        run = jobs.start_training(config, root)
        assert runs.read_status(run)["pid"] == pid  # handed over, not a new process
        assert _wait_state(run)["state"] == "done", RunFolder(run).log_path.read_text()[-2000:]
        assert workers.wait_idle(root, 0, 30)
        resident.append(run)
    assert jobs.read_worker_state(root, 0)["jobs_done"] == 2
    assert psutil.Process(pid).memory_info().rss < workers.MAX_RSS_MB * 2**20
    for one, other in zip(alone, resident):
        a, b = RunFolder(one).read_metrics(), RunFolder(other).read_metrics()
        assert a["threshold"] == pytest.approx(b["threshold"], abs=1e-6)
        assert a["val"]["roc_auc"] == pytest.approx(b["val"]["roc_auc"], abs=1e-6)
        pa, pb = RunFolder(one).read_predictions(), RunFolder(other).read_predictions()
        assert list(pa["path"]) == list(pb["path"])
        np.testing.assert_allclose(pa["probability"], pb["probability"], atol=1e-5)
        # The job's output went to the run's log, as a training process's does.
        assert str(other) in RunFolder(other).log_path.read_text()
    assert not np.allclose(RunFolder(resident[0]).read_predictions()["probability"],
                           RunFolder(resident[1]).read_predictions()["probability"])


@pytest.mark.slow  # two workers, one killed
def test_a_worker_killed_mid_job_fails_only_its_job_and_is_replaced(tmp_path, practice, pool):
    root = tmp_path / "runs"
    keeper = pool(root)
    pid = _ready(keeper)
    long = jobs.start_training(_config(practice, tmp_path / "cache", epochs=5000), root)
    _wait_stage(long, "train")
    victim = psutil.Process(pid)
    victim.kill()
    victim.wait(10)
    assert keeper.keep() == [0]  # the dead one's job failed, a new one started
    status = runs.read_status(long)
    assert status["state"] == "failed"
    assert status["error"].startswith(SENTENCE_START) and status["error"].endswith("; train again.")
    assert not jobs.is_busy(root)
    assert workers.wait_idle(root, 0, 180)
    new_pid = jobs.read_worker_state(root, 0)["pid"]
    assert new_pid != pid
    short = jobs.start_training(_config(practice, tmp_path / "cache"), root)
    assert runs.read_status(short)["pid"] == new_pid
    assert _wait_state(short)["state"] == "done"
    assert runs.read_status(long)["state"] == "failed"


@pytest.mark.slow  # a worker
def test_a_cancelled_job_ends_cancelled_and_the_worker_serves_the_next(tmp_path, practice, pool):
    root = tmp_path / "runs"
    pid = _ready(pool(root))
    config = _config(practice, tmp_path / "cache", epochs=5000)
    first = jobs.start_training(config, root)
    _wait_stage(first, "train")
    jobs.request_cancel(first)
    assert _wait_state(first, 60)["state"] == "cancelled"
    assert workers.wait_idle(root, 0, 30) and jobs.read_worker_state(root, 0)["pid"] == pid
    # terminate on a worker's run cancels it and leaves the worker serving.
    second = jobs.start_training(config, root)
    _wait_stage(second, "train")
    assert jobs.terminate(second, grace_s=60) is True
    assert runs.read_status(second)["state"] == "cancelled"
    assert workers.wait_idle(root, 0, 30) and psutil.Process(pid).is_running()
    assert jobs.terminate(second) is False
    third = jobs.start_training(_config(practice, tmp_path / "cache"), root)
    assert runs.read_status(third)["pid"] == pid
    assert _wait_state(third)["state"] == "done"
