"""Run folders and the one-job-per-server lock."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import TINY_PRETRAINED
from cxr_core.core.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from cxr_core.core.errors import BadRunError, TrainingBusyError
from cxr_core.hosting import jobs
from cxr_core.io.atomic import append_jsonl, read_jsonl, write_json_atomic
from cxr_core.runs import registry as runs, run_folder
from cxr_core.runs.run_folder import RunFolder


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


def test_a_killed_unreaped_process_reads_failed(tmp_path):
    run = runs.new_run_dir(tmp_path, "x")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        RunFolder(run).write_status("running", pid=child.pid)
        assert runs.read_status(run)["state"] == "running"
        child.kill()  # a zombie on POSIX until it is reaped: not running
        deadline = time.time() + 10
        while runs.read_status(run)["state"] == "running" and time.time() < deadline:
            time.sleep(0.05)
        assert runs.read_status(run)["state"] == "failed"
    finally:
        child.kill()
        child.wait()


def test_a_pid_reused_by_another_program_reads_failed(tmp_path):
    import psutil

    run = runs.new_run_dir(tmp_path, "x")
    folder = RunFolder(run)
    status = folder.write_status("running", pid=os.getpid())
    assert status["pid_create_time"] == pytest.approx(psutil.Process().create_time())
    assert runs.read_status(run)["state"] == "running"
    assert runs.running_process(status).pid == os.getpid()
    # The same pid, but a process created a minute after the run's: another program got the pid.
    folder.write_status("running", pid=os.getpid(), pid_create_time=status["pid_create_time"] + 60)
    stale = runs.read_status(run)
    assert stale["state"] == "failed" and "stopped without finishing" in stale["error"]
    # A status written before creation times were recorded still works from the pid alone.
    write_json_atomic(run / "status.json", {"state": "running", "pid": os.getpid(), "started": time.time()})
    assert runs.read_status(run)["state"] == "running"
    assert runs.running_process({"pid": "garbage"}) is None and runs.running_process({"pid": 0}) is None


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


def test_delete_of_a_folder_in_use_is_one_sentence_and_keeps_the_run(tmp_path, monkeypatch):
    run = runs.new_run_dir(tmp_path, "a")
    RunFolder(run).write_status("failed", error="boom")

    def in_use(*_args):  # what Windows raises while a file in the folder is open
        raise PermissionError(13, "The process cannot access the file because it is being used by another process")

    monkeypatch.setattr(runs.os, "replace", in_use)
    with pytest.raises(BadRunError) as caught:
        runs.delete_run(run)
    assert "could not be deleted because a file in it is in use" in str(caught.value)
    assert "\n" not in str(caught.value) and run.is_dir()


def _config(data_dir: Path) -> RunConfig:
    return RunConfig(
        data=DataConfig(data_dir=str(data_dir), split="random", limit=None),
        model=TINY_PRETRAINED,
        train=TrainConfig(epochs=2, batch_size=8),
    )


REAL_POPEN = subprocess.Popen

# A stand-in training process: the real first step of `python -m cxr_core train --lock-file`
# (take the lock, report), then a sleep instead of TensorFlow.
STAND_IN = r"""
import sys, time
from cxr_core.hosting import jobs
seconds, args = float(sys.argv[1]), sys.argv[2:]
jobs.hold_training_lock(args[args.index("--lock-file") + 1], args[args.index("--run-dir") + 1])
time.sleep(seconds)
"""


def _stand_in(monkeypatch, seconds: float = 3.0, script: str = STAND_IN) -> list:
    """Make ``jobs.start_training`` launch ``script`` instead of training; return the launched processes
    (each with ``.kwargs``, the launch options)."""
    launched: list = []

    def popen(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "cxr_core", "train"] and "--lock-file" in cmd, cmd
        options = dict(kwargs)
        if kwargs.get("creationflags"):  # the Windows launch, checked on this machine: flags are Windows-only
            kwargs.pop("creationflags")
        process = REAL_POPEN([cmd[0], "-c", script, str(seconds), *cmd[4:]], **kwargs)
        process.kwargs = options
        launched.append(process)
        return process

    monkeypatch.setattr(jobs.subprocess, "Popen", popen)
    return launched


def _wait_free(root: Path, seconds: float = 15) -> bool:
    deadline = time.time() + seconds
    while jobs.is_busy(root) and time.time() < deadline:
        time.sleep(0.1)
    return not jobs.is_busy(root)


@pytest.mark.slow
def test_only_one_job_at_a_time_even_when_launched_together(tmp_path, monkeypatch, tiny_dataset):
    import psutil

    root = tmp_path / "runs"
    launched = _stand_in(monkeypatch, seconds=2)
    results: list = []
    barrier = threading.Barrier(3)

    def press_train():
        barrier.wait()
        try:
            results.append(jobs.start_training(_config(tiny_dataset), root))
        except Exception as error:  # noqa: BLE001 - any other failure must show in the assertion below
            results.append(error)

    threads = [threading.Thread(target=press_train) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [r for r in results if isinstance(r, Path)]
    refused = [r for r in results if isinstance(r, TrainingBusyError)]
    logs = [p.read_text(errors="replace")[-800:] for p in root.rglob("*.log")]
    assert len(started) == 1 and len(refused) == 2 and len(launched) == 1, (results, len(launched), logs)
    assert all("already running" in str(error) for error in refused)
    # start_training returns once the child holds the lock and has written itself into the status.
    assert jobs.is_busy(root)
    assert jobs.active_run(root) == started[0]
    status = runs.read_status(started[0])
    assert status["state"] == "running" and status["pid"] == launched[0].pid
    assert status["pid_create_time"] == pytest.approx(psutil.Process(launched[0].pid).create_time())
    with pytest.raises(TrainingBusyError, match="already running"):
        jobs.start_training(_config(tiny_dataset), root)
    assert _wait_free(root), "the lock must be released when the training process ends"
    assert jobs.active_run(root) is None


@pytest.mark.slow
def test_launch_options_are_portable(tmp_path, monkeypatch, tiny_dataset):
    root = tmp_path / "runs"
    launched = _stand_in(monkeypatch, seconds=0)
    jobs.start_training(_config(tiny_dataset), root)
    assert "pass_fds" not in launched[0].kwargs and launched[0].kwargs["start_new_session"] is True
    assert _wait_free(root)
    # The Windows launch: a new process group, no session call, no inherited descriptors.
    monkeypatch.setattr(jobs, "_WINDOWS", True)
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200, raising=False)
    monkeypatch.setattr(subprocess, "CREATE_NO_WINDOW", 0x8000000, raising=False)
    jobs.start_training(_config(tiny_dataset), root)
    options = launched[1].kwargs
    assert options["creationflags"] & subprocess.CREATE_NEW_PROCESS_GROUP
    assert "start_new_session" not in options and "pass_fds" not in options
    assert _wait_free(root)


@pytest.mark.slow
def test_the_lock_is_released_when_the_job_is_killed_outright(tmp_path, monkeypatch, tiny_dataset):
    root = tmp_path / "runs"
    launched = _stand_in(monkeypatch, seconds=120)
    first = jobs.start_training(_config(tiny_dataset), root)
    assert jobs.is_busy(root)
    launched[0].kill()  # SIGKILL / TerminateProcess: no chance to clean up
    launched[0].wait()
    assert _wait_free(root, 10)
    status = runs.read_status(first)
    assert status["state"] == "failed" and "stopped without finishing" in status["error"]
    second = jobs.start_training(_config(tiny_dataset), root)  # the next job starts at once
    assert jobs.active_run(root) == second
    assert jobs.terminate(second, grace_s=10) is True
    assert _wait_free(root, 10)


def test_a_child_that_dies_before_taking_the_lock_is_one_sentence(tmp_path, monkeypatch, tiny_dataset):
    from cxr_core.core.errors import CxrError

    root = tmp_path / "runs"
    _stand_in(monkeypatch, script="import sys; print('ModuleNotFoundError: No module named filelock'); sys.exit(1)")
    with pytest.raises(CxrError) as error:
        jobs.start_training(_config(tiny_dataset), root)
    assert str(error.value) == ("The training process stopped before it started (exit code 1): "
                                "ModuleNotFoundError: No module named filelock.")
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    assert runs.read_status(run)["state"] == "failed"
    assert runs.read_status(run)["error"] == str(error.value)
    assert not jobs.is_busy(root)
    _stand_in(monkeypatch, seconds=0)  # the launch lock was let go: the next press starts a job
    assert jobs.start_training(_config(tiny_dataset), root).is_dir()
    assert _wait_free(root)


def test_the_training_process_refuses_to_start_while_another_holds_the_lock(tmp_path, monkeypatch, capsys):
    from filelock import FileLock

    from cxr_core import cli

    root = tmp_path / "runs"
    run = runs.new_run_dir(root, "x")
    lock = FileLock(str(root / jobs.LOCK_NAME))  # as another training process would hold it
    lock.acquire()
    try:
        monkeypatch.setattr(jobs, "CLAIM_TIMEOUT_S", 0.2)
        code = cli.main(["train", "--data", str(tmp_path), "--run-dir", str(run),
                         "--lock-file", str(root / jobs.LOCK_NAME)])
        assert code == cli.EXIT_BAD_INPUT
        assert "already running on this server" in capsys.readouterr().err
        assert RunFolder(run).read_status_file() is None  # it never wrote itself in as the run's process
    finally:
        lock.release()


def test_cancel_and_terminate(tmp_path, monkeypatch, tiny_dataset):
    import psutil

    run = runs.new_run_dir(tmp_path, "a")
    jobs.request_cancel(run)
    assert (run / run_folder.CANCEL_FILE).read_text() == "cancel\n"
    # terminate touches only the process the status names, with its creation time.
    RunFolder(run).write_status("running", pid=os.getpid(), pid_create_time=psutil.Process().create_time() - 60)
    assert jobs.terminate(run) is False  # this test process, under a stale pid: left alone
    root = tmp_path / "runs"
    launched = _stand_in(monkeypatch, seconds=120)
    job = jobs.start_training(_config(tiny_dataset), root)
    assert jobs.terminate(job, grace_s=10) is True
    assert launched[0].wait(timeout=10) is not None
    assert (job / run_folder.CANCEL_FILE).exists()  # asked politely first
    assert _wait_free(root, 10) and runs.read_status(job)["state"] != "running"
    assert jobs.terminate(job) is False


def test_atomic_writes_wait_for_a_reader_on_windows(tmp_path, monkeypatch):
    """Windows cannot replace a file another process has open: the write waits for the reader."""
    from cxr_core.io import atomic

    real_replace = os.replace
    refused: list = []

    def open_by_a_reader(source, target):
        if len(refused) < 2:
            refused.append(target)
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        real_replace(source, target)

    monkeypatch.setattr(atomic.os, "replace", open_by_a_reader)
    monkeypatch.setattr(atomic, "_WINDOWS", True)
    write_json_atomic(tmp_path / "status.json", {"state": "running"})
    assert len(refused) == 2 and atomic.read_json(tmp_path / "status.json") == {"state": "running"}
    refused.clear()
    monkeypatch.setattr(atomic, "_WINDOWS", False)  # elsewhere a refusal is a real error, at once
    with pytest.raises(PermissionError):
        write_json_atomic(tmp_path / "status.json", {"state": "done"})
    assert atomic.read_json(tmp_path / "status.json") == {"state": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary file left behind


def test_no_cxr_core_module_uses_posix_only_process_calls():
    """A fast guard; test_every_module_imports_without_fcntl is the real import check."""
    import ast

    posix_only = {"fcntl", "termios", "pwd", "grp", "resource", "pty", "tty"}
    calls = {"kill", "killpg", "setsid", "getpgid", "setpgrp", "fork", "getuid", "getgid"}
    core = Path(jobs.__file__).parent
    offenders = []
    for path in sorted(core.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os"
                  and node.attr in calls):
                names = {f"os.{node.attr}"}
            else:
                continue
            bad = (names & posix_only) | {n for n in names if n.startswith("os.")}
            offenders += [f"{path.name}:{node.lineno} {name}" for name in sorted(bad)]
    assert not offenders


@pytest.mark.slow  # imports TensorFlow (through cxr_core.engine.model) in a fresh process
def test_every_module_imports_without_fcntl():
    """As on Windows, where there is no fcntl: every module of cxr_core imports."""
    script = (
        "import importlib, pkgutil, sys\n"
        "sys.modules['fcntl'] = None  # import fcntl now raises ImportError\n"
        "import cxr_core\n"
        "names = [m.name for m in pkgutil.walk_packages(cxr_core.__path__, 'cxr_core.')\n"
        "         if not m.ispkg and not m.name.endswith('__main__')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    package = Path(jobs.__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], cwd=package.parent, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-3000:]
    modules = [p for p in package.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert int(done.stdout.split()[-1]) == len(modules) > 40


def test_progress_moves_within_an_epoch(tmp_path):
    run = runs.new_run_dir(tmp_path, "x")
    append_jsonl(run / "progress.jsonl", {"event": "stage", "stage": "fine_tune", "total": 4})
    append_jsonl(run / "progress.jsonl", {"event": "epoch", "epoch": 1, "epochs": 4, "eta_s": 30})
    append_jsonl(run / "progress.jsonl", {"event": "batch", "batch": 5, "batches": 10, "eta_s": 20})
    progress = runs.read_progress(run)
    assert progress["fraction"] == pytest.approx(1.5 / 4)
    assert progress["eta_s"] == 20


def test_sweep_stale_temps_keeps_fresh_ones(tmp_path):
    from cxr_core.io.atomic import sweep_stale_temps

    old = tmp_path / "ab" / ".x.npy.tmp-123.npy"
    fresh = tmp_path / "ab" / ".y.npy.tmp-456.npy"
    keep = tmp_path / "ab" / "x.npy"
    old.parent.mkdir()
    for p in (old, fresh, keep):
        p.write_bytes(b"1")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert sweep_stale_temps(tmp_path) == 1
    assert not old.exists() and fresh.exists() and keep.exists()


def test_progress_estimate_counts_down_from_its_event_and_is_dropped_once_spent(tmp_path):
    """An ETA is the time left when it was written: read later it is smaller, and gone once spent while
    the job is quiet (building the network writes no event); ``quiet_s`` says since when."""
    run = runs.new_run_dir(tmp_path, "x")
    t0 = 1_000_000.0
    append_jsonl(run / "progress.jsonl", {"time": t0, "event": "stage", "stage": "extract", "total": 600})
    append_jsonl(run / "progress.jsonl", {"time": t0 + 0.1, "event": "extract", "done": 8, "total": 600, "eta_s": 4.0})
    soon = runs.read_progress(run, now=t0 + 1.1)
    assert soon["eta_s"] == pytest.approx(3.0) and soon["quiet_s"] == pytest.approx(1.0)
    later = runs.read_progress(run, now=t0 + 12.1)
    assert later["eta_s"] is None and later["quiet_s"] == pytest.approx(12.0) and later["done"] == 8
    append_jsonl(run / "progress.jsonl", {"time": t0 + 12.5, "event": "extract", "done": 64, "total": 600,
                                          "eta_s": 20.0})
    moved = runs.read_progress(run, now=t0 + 13.0)
    assert moved["done"] == 64 and moved["eta_s"] == pytest.approx(19.5) and moved["quiet_s"] == pytest.approx(0.5)
    # A writer whose clock runs a little ahead (another machine): nothing negative, the estimate as written.
    ahead = runs.read_progress(run, now=t0 + 12.0)
    assert ahead["quiet_s"] == 0.0 and ahead["eta_s"] == pytest.approx(20.0)
    # A new stage starts without an estimate.
    append_jsonl(run / "progress.jsonl", {"time": t0 + 14, "event": "stage", "stage": "train", "total": 8})
    assert runs.read_progress(run, now=t0 + 15)["eta_s"] is None
