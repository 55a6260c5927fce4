"""The training queue: jobs wait their turn in order, a withdrawn job never starts, the queue
outlives the process that filled it, and the operator chooses how many jobs run at once.

Most tests launch a stand-in training process (the real first step of the training command, taking
its slot's lock, then a sleep instead of TensorFlow); the three-visitors test trains for real.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import TINY_PRETRAINED, make_dataset
from cxr_core.core.config import DataConfig, RunConfig, TrainConfig
from cxr_core.core.errors import BadSettingError, JobQueueError, TrainingBusyError
from cxr_core.hosting import job_queue, jobs
from cxr_core.runs import registry as runs
from cxr_core.runs.run_folder import RunFolder

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LIMIT_SENTENCE = ("You already have a training job waiting in the queue (the limit is 1 per visitor); "
                  "withdraw it or wait for it to start.")

# The training command's first step (take the slot's lock, write itself into the status), then a sleep.
STAND_IN = r"""
import sys, time
from cxr_core.hosting import jobs
seconds, args = float(sys.argv[1]), sys.argv[2:]
jobs.hold_training_lock(args[args.index("--lock-file") + 1], args[args.index("--run-dir") + 1])
time.sleep(seconds)
"""

# The same, then the run ends done with a (stand-in) model, as a training process ends its run.
FINISHING_STAND_IN = STAND_IN + r"""
from pathlib import Path
from cxr_core.runs.run_folder import RunFolder
run = Path(args[args.index("--run-dir") + 1])
(run / "model.keras").write_bytes(b"stand-in")
RunFolder(run).write_status("done", message="done")
"""

# A fresh process (nothing of the test's memory) that launches stand-ins and dispatches the queue once.
DISPATCH_AFRESH = r"""
import json, subprocess, sys
from cxr_core.hosting import job_queue, jobs
STAND_IN, real = sys.argv[2], subprocess.Popen
jobs.subprocess.Popen = lambda cmd, **kw: real([cmd[0], "-c", STAND_IN, "1", *cmd[4:]], **kw)
print(json.dumps([str(p) for p in job_queue.dispatch(sys.argv[1])]))
"""


@pytest.fixture(autouse=True)
def _no_operator_setting(monkeypatch):
    monkeypatch.delenv(jobs.MAX_JOBS_ENV, raising=False)


def _config(data_dir: Path, cache: Path | None = None) -> RunConfig:
    train = {"epochs": 1, "batch_size": 8, "balance": "none"}
    if cache is not None:
        train["cache_dir"] = str(cache)
    return RunConfig(data=DataConfig(data_dir=str(data_dir), split="random"), model=TINY_PRETRAINED,
                     train=TrainConfig(**train))


def _stand_in(monkeypatch, seconds: float, script: str = STAND_IN) -> list[Path]:
    """Launch stand-ins instead of training; return the run folders launched, in order."""
    launched: list[Path] = []
    real = subprocess.Popen

    def popen(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "cxr_core", "train"] and "--lock-file" in cmd, cmd
        launched.append(Path(cmd[cmd.index("--run-dir") + 1]))
        return real([cmd[0], "-c", script, str(seconds), *cmd[4:]], **kwargs)

    monkeypatch.setattr(jobs.subprocess, "Popen", popen)
    return launched


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _end(run_dir: Path) -> None:
    """Stop a stand-in now (the tests need it gone, not its sleep)."""
    jobs.terminate(run_dir, grace_s=10)


def _runs_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_a_queued_run_reads_queued_with_its_config(tmp_path, tiny_dataset):
    root = tmp_path / "runs"
    job = job_queue.submit(_config(tiny_dataset), "alice", root=root)
    assert job.place == 1 and job.owner == "alice" and job.run_dir.parent.resolve() == root.resolve()
    assert RunFolder(job.run_dir).read_config() == _config(tiny_dataset)
    status = runs.read_status(job.run_dir)  # no process, and still not "failed"
    assert status["state"] == "queued" and status["message"] == job_queue.QUEUED_MESSAGE
    assert status["pid"] is None and status["started"] is None and "finished" not in status
    (summary,) = runs.list_runs(root, include_demo=False)
    assert summary.state == "queued" and summary.started == pytest.approx(job.submitted)
    assert summary.duration_s is None
    assert not jobs.is_busy(root) and jobs.active_runs(root) == [] and jobs.active_run(root) is None


def test_the_per_visitor_limit_is_one_sentence_and_the_operator_may_queue_several(tmp_path, tiny_dataset):
    root, config = tmp_path / "runs", _config(tiny_dataset)
    first = job_queue.submit(config, "alice", root=root)
    with pytest.raises(JobQueueError) as refused:
        job_queue.submit(config, "alice", root=root)
    assert str(refused.value) == LIMIT_SENTENCE
    assert [p.name for p in _runs_in(root)] == [first.run_dir.name]  # the refusal made no run folder
    job_queue.submit(config, "bob", root=root)
    operator = [job_queue.submit(config, "operator", root=root, per_owner_limit=None) for _ in range(3)]
    workspace = tmp_path / "workspaces" / "carol"
    carol = job_queue.submit(config, "carol", parent=workspace, root=root)
    assert carol.run_dir.parent == workspace.resolve() and carol.place == 6
    assert [job.owner for job in job_queue.waiting(root)] == ["alice", "bob", "operator", "operator", "operator",
                                                              "carol"]
    assert [job.place for job in job_queue.waiting(root)] == [1, 2, 3, 4, 5, 6]
    assert job_queue.place(operator[1].run_dir, root) == 4
    with pytest.raises(JobQueueError, match=r"^You already have 2 training jobs waiting in the queue \(the limit is 2"):
        job_queue.submit(config, "operator", root=root, per_owner_limit=2)
    assert job_queue.withdraw(first.run_dir, root) is True
    assert job_queue.submit(config, "alice", root=root).place == 6  # after withdrawing, alice may queue again


@pytest.mark.slow
def test_a_withdrawn_job_never_starts(tmp_path, monkeypatch, tiny_dataset):
    root, config = tmp_path / "runs", _config(tiny_dataset)
    launched = _stand_in(monkeypatch, seconds=60)
    a, b, c = (job_queue.submit(config, owner, root=root) for owner in ("alice", "bob", "carol"))
    assert job_queue.withdraw(b.run_dir, root) is True
    assert not b.run_dir.exists() and job_queue.place(b.run_dir, root) is None
    assert job_queue.place(c.run_dir, root) == 2
    assert job_queue.withdraw(b.run_dir, root) is False  # not queued any more
    assert job_queue.dispatch(root) == [a.run_dir.resolve()]
    assert job_queue.withdraw(a.run_dir, root) is False and a.run_dir.is_dir()  # it has started
    assert job_queue.dispatch(root) == []  # one at a time: c waits for a
    assert job_queue.place(c.run_dir, root) == 1
    _end(a.run_dir)
    assert job_queue.dispatch(root) == [c.run_dir.resolve()]  # the next one goes on once a has ended
    assert launched == [a.run_dir.resolve(), c.run_dir.resolve()]  # b's never ran
    assert job_queue.waiting(root) == [] and not b.run_dir.exists()
    _end(c.run_dir)


def test_dispatch_from_many_threads_at_once_starts_one_job_per_free_slot(tmp_path, monkeypatch, tiny_dataset):
    root, config = tmp_path / "runs", _config(tiny_dataset)
    launched = _stand_in(monkeypatch, seconds=60)
    queued = [job_queue.submit(config, f"visitor-{i}", root=root) for i in range(3)]
    barrier, started = threading.Barrier(4), []

    def dispatch():
        barrier.wait()
        started.extend(job_queue.dispatch(root))

    threads = [threading.Thread(target=dispatch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert started == [queued[0].run_dir.resolve()] and launched == started
    assert [job.run_dir for job in job_queue.waiting(root)] == [q.run_dir for q in queued[1:]]
    _end(queued[0].run_dir)


@pytest.mark.slow
def test_two_run_at_once_when_the_operator_allows_two(tmp_path, monkeypatch, tiny_dataset):
    # Stand-in children (a sleep, no TensorFlow), stopped by the test: two run at once, the third waits.
    root, config = tmp_path / "runs", _config(tiny_dataset)
    launched = _stand_in(monkeypatch, seconds=60)
    job_queue.set_max_concurrent(2, root)
    queued = [job_queue.submit(config, "operator", root=root, per_owner_limit=None) for _ in range(3)]
    first_two = [q.run_dir.resolve() for q in queued[:2]]
    assert job_queue.dispatch(root) == first_two
    assert jobs.running_count(root) == 2 and jobs.is_busy(root)
    assert sorted(jobs.active_runs(root)) == sorted(first_two) and jobs.active_run(root) in first_two
    assert (root / ".training.lock").exists() and (root / ".training-1.lock").exists()
    assert (root / ".active-1.json").exists()
    assert all(runs.read_status(run)["state"] == "running" for run in first_two)
    assert job_queue.place(queued[2].run_dir, root) == 1
    with pytest.raises(TrainingBusyError) as busy:
        jobs.start_training(config, root)
    assert str(busy.value) == ("As many training jobs as this server runs at once (2) are already running or "
                               "starting; wait for one to finish or cancel one first.")
    _end(first_two[1])
    assert job_queue.dispatch(root) == [queued[2].run_dir.resolve()]  # in the slot that came free
    assert launched == [*first_two, queued[2].run_dir.resolve()] and jobs.running_count(root) == 2
    for run in (first_two[0], queued[2].run_dir):
        _end(run)
    assert jobs.running_count(root) == 0


def test_how_many_run_at_once_comes_from_the_setting_then_the_environment(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    assert job_queue.max_concurrent(root) == 1
    monkeypatch.setenv(jobs.MAX_JOBS_ENV, "3")
    assert job_queue.max_concurrent(root) == 3
    job_queue.set_max_concurrent(2, root)
    assert job_queue.max_concurrent(root) == 2  # the operator's setting wins over the environment
    job_queue.set_max_concurrent(None, root)
    assert job_queue.max_concurrent(root) == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(jobs.MAX_JOBS_ENV, bad)
        assert job_queue.max_concurrent(root) == 1
    for bad in (0, -2, 1.5, "2", True):
        with pytest.raises(BadSettingError) as refused:
            job_queue.set_max_concurrent(bad, root)
        assert str(refused.value) == ("The number of training jobs that run at once must be a whole number of at "
                                      f"least 1, not {bad!r}.")
    assert not (root / jobs.SETTINGS_NAME).exists()


@pytest.mark.slow
def test_the_queue_outlives_its_process_and_a_vanished_data_set_is_one_sentence(tmp_path, tiny_dataset):
    root = tmp_path / "runs"
    gone = make_dataset(tmp_path / "gone", n_normal=4, n_pneumonia=4)
    lost = job_queue.submit(_config(gone), "alice", root=root)
    kept = job_queue.submit(_config(tiny_dataset), "bob", root=root)
    shutil.rmtree(gone)  # e.g. a temporary folder a restart did not keep
    # A new process, as after a server restart: it knows the queue only from the disk.
    done = subprocess.run([sys.executable, "-c", DISPATCH_AFRESH, str(root), STAND_IN], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [str(kept.run_dir.resolve())]
    status = runs.read_status(lost.run_dir)
    sentence = (f"The data set folder {gone} no longer exists, so this queued training job could not start; "
                "choose a data set that is here and train again.")
    assert status["state"] == "failed" and status["error"] == sentence and status["message"] == sentence
    assert runs.read_progress(lost.run_dir)["stage"] == "failed"
    assert job_queue.waiting(root) == []
    assert runs.read_status(kept.run_dir)["state"] == "running"  # the stand-in holds its slot
    _wait(lambda: not jobs.running_count(root), 30, "the job to end")


@pytest.mark.slow
def test_the_dispatcher_thread_is_one_per_root_and_starts_queued_jobs(tmp_path, monkeypatch, tiny_dataset):
    root, config = tmp_path / "runs", _config(tiny_dataset)
    launched = _stand_in(monkeypatch, seconds=0.2)
    thread = job_queue.start_dispatcher(root, every_s=0.1)
    try:
        assert job_queue.start_dispatcher(root) is thread and thread.daemon
        queued = [job_queue.submit(config, f"visitor-{i}", root=root) for i in range(2)]
        _wait(lambda: len(launched) == 2, 60, "both jobs to start")
        assert launched == [q.run_dir.resolve() for q in queued]
    finally:
        job_queue.stop_dispatcher(root)
    assert not thread.is_alive()
    _wait(lambda: not jobs.running_count(root), 30, "the jobs to end")


@pytest.mark.slow  # three training stand-ins, one after the other
def test_three_visitors_jobs_run_one_after_the_other(tmp_path, monkeypatch, tiny_dataset):
    """The queue's order, with stand-ins for training (a real run through the queue: test_app's Training page test)."""
    root, cache = tmp_path / "runs", tmp_path / "cache"
    barrier, submitted = threading.Barrier(3), []
    launched = _stand_in(monkeypatch, seconds=0.5, script=FINISHING_STAND_IN)

    def press_train(owner: str):
        barrier.wait()
        submitted.append(job_queue.submit(_config(tiny_dataset, cache), owner, parent=tmp_path / "ws" / owner,
                                          root=root))

    job_queue.start_dispatcher(root, every_s=0.2)
    try:
        threads = [threading.Thread(target=press_train, args=(f"visitor-{i}",)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(submitted) == 3
        _wait(lambda: all(runs.read_status(job.run_dir)["state"] not in ("queued", "running") for job in submitted),
              600, "the three jobs to end")
    finally:
        job_queue.stop_dispatcher(root)
    in_queue_order = sorted(submitted, key=lambda job: job.submitted)
    statuses = [runs.read_status(job.run_dir) for job in in_queue_order]
    assert [s["state"] for s in statuses] == ["done"] * 3, [s.get("error") for s in statuses]
    for before, after in zip(statuses, statuses[1:]):
        assert after["started"] >= before["finished"]  # one after the other, in the order they were queued
    assert job_queue.waiting(root) == []
    assert launched == [job.run_dir for job in in_queue_order]
    _wait(lambda: not jobs.is_busy(root), 60, "the last training process to exit")  # it writes "done" first
