"""One background training job per server, on Linux, macOS and Windows alike.

Training runs in a separate process (``python -m cxr_core train --run-dir ... --lock-file ...``):
the Streamlit server stays responsive, TensorFlow's memory stays out of it, and a browser reload
does not stop the job.

One job at a time is enforced by an operating-system file lock (``filelock.FileLock``: ``flock``
on POSIX, ``msvcrt.locking`` on Windows) on ``<runs root>/.training.lock``, which the training
process takes itself, first thing, and holds until it exits: the system releases it however the
process ends, killed outright (SIGKILL, Task Manager) included. A lock cannot be handed from a
parent to its child on every system, so the launcher holds a second lock, ``.launch.lock``, from
its check that no job runs until the child reports that it holds the training lock (by writing
its own pid into the run's status). Two sessions pressing Train at the same moment meet at that
second lock and exactly one of them starts a job.

Liveness and stopping go through ``psutil`` (``runs.running_process``), which knows a process by
its pid *and* its creation time, so a pid reused by another program is never taken for the job.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from filelock import FileLock, Timeout

from . import access, runs
from .atomic import read_json, write_json_atomic
from .config import RunConfig
from .errors import CxrError, TrainingBusyError
from .run_folder import RunFolder

log = logging.getLogger(__name__)

LOCK_NAME = ".training.lock"
LAUNCH_NAME = ".launch.lock"
ACTIVE_NAME = ".active.json"
#: How long the launcher waits for the training process to report that it holds the lock
#: (a cold Python start with a virus scanner on Windows can take several seconds).
START_TIMEOUT_S = 60.0
#: How long the training process waits for the lock: a page's ``is_busy`` probe holds it for an instant.
CLAIM_TIMEOUT_S = 5.0

# The training lock, held by this process for as long as it lives (a FileLock releases when collected).
_HELD: list[FileLock] = []
_WINDOWS = sys.platform == "win32"


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root) if root is not None else runs.runs_root().path


def _busy_error(root: Path) -> TrainingBusyError:
    running = active_run(root)
    name = f" ({running.name})" if running else ""
    return TrainingBusyError(
        f"A training job{name} is already running on this server; wait for it to finish or cancel it first.")


def is_busy(root: str | os.PathLike | None = None) -> bool:
    """True while a training process holds the lock."""
    root = _root(root)
    root.mkdir(parents=True, exist_ok=True)
    probe = FileLock(str(root / LOCK_NAME))
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return True
    probe.release()
    return False


def active_run(root: str | os.PathLike | None = None) -> Path | None:
    """The run folder of the job now running on this server, or None."""
    root = _root(root)
    if not is_busy(root):
        return None
    info = read_json(root / ACTIVE_NAME, default={}) or {}
    path = info.get("run_dir")
    return Path(path) if path and Path(path).is_dir() else None


def hold_training_lock(lock_file: str | os.PathLike, run_dir: str | os.PathLike) -> None:
    """In the training process: take the one-job lock for the rest of this process's life, point
    ``.active.json`` at ``run_dir`` and write this process into the run's status (which tells the
    launcher the job has started).

    Raises:
        TrainingBusyError: another training process holds the lock.
    """
    lock_file = Path(lock_file)
    lock = FileLock(str(lock_file))
    try:
        lock.acquire(timeout=CLAIM_TIMEOUT_S, poll_interval=0.05)
    except Timeout:
        raise _busy_error(lock_file.parent) from None
    _HELD.append(lock)
    write_json_atomic(lock_file.parent / ACTIVE_NAME, {"run_dir": str(Path(run_dir)), "pid": os.getpid()})
    RunFolder(run_dir).write_status("running", pid=os.getpid(), message="starting")


def start_training(config: RunConfig, root: str | os.PathLike | None = None) -> Path:
    """Launch training in a background process and return its run folder once that process holds
    the one-job lock (about a second).

    Raises:
        TrainingBusyError: another training job is running or starting on this server.
        CxrError: the training process stopped, or did not report, before it started.
    """
    root = _root(root)
    root.mkdir(parents=True, exist_ok=True)
    launch = FileLock(str(root / LAUNCH_NAME))
    try:
        launch.acquire(timeout=0)
    except Timeout:
        raise _busy_error(root) from None
    try:
        if is_busy(root):
            raise _busy_error(root)
        run_dir = runs.new_run_dir(root, hint=f"{config.model.backbone}-{config.data.split}")
        folder = RunFolder(run_dir)
        folder.write_config(config)
        # The launcher's own pid until the child writes its own: the run is "running" while either lives.
        folder.write_status("running", pid=os.getpid(), message="starting")
        process = _launch(folder, root / LOCK_NAME)
        _wait_until_started(process, folder, root)
        # Reap the child when it exits so it does not linger as a zombie in the server.
        threading.Thread(target=process.wait, daemon=True, name=f"reap-{process.pid}").start()
        return run_dir
    finally:
        launch.release()


def _launch(folder: RunFolder, lock_file: Path) -> subprocess.Popen:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), PYTHONUNBUFFERED="1")
    # Streamlit copies top-level secrets into the environment; the training job needs none of them.
    env.pop(access.PASSPHRASE_SECRET, None)
    project_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = project_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if _WINDOWS:
        # Its own process group, so a Ctrl+C in the server's console does not reach the job; no console window.
        detach = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    else:
        detach = {"start_new_session": True}  # likewise: no SIGINT or SIGHUP from the server's terminal
    with open(folder.log_path, "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "cxr_core", "train", "--config", str(folder.config_path),
             "--run-dir", str(folder.path), "--lock-file", str(lock_file)],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=project_root, env=env,
            **detach,
        )


def _wait_until_started(process: subprocess.Popen, folder: RunFolder, root: Path) -> None:
    """Return once the child has written its own pid into the status (it then holds the lock);
    otherwise stop it, mark the run failed and raise one sentence."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        status = folder.read_status_file() or {}
        if status.get("pid") not in (None, os.getpid()):
            return
        if process.poll() is not None:
            break
        if time.monotonic() > deadline:
            process.kill()  # TerminateProcess on Windows, SIGKILL elsewhere
            process.wait()
            text = (f"The training process did not start within {START_TIMEOUT_S:.0f} seconds, so it was stopped; "
                    f"see {folder.log_path} for what it was doing.")
            folder.write_status("failed", message=text, error=text)
            raise CxrError(text)
        time.sleep(0.05)
    if is_busy(root):  # a job started outside this launcher took the lock first
        error = _busy_error(root)
        folder.write_status("failed", message=str(error), error=str(error))
        raise error
    text = f"The training process stopped before it started (exit code {process.returncode}){_last_words(folder)}"
    folder.write_status("failed", message=text, error=text)
    raise CxrError(text)


def _last_words(folder: RunFolder) -> str:
    """': <the log's last line>.' when it is one short line, else '; see <log> for why.'"""
    try:
        lines = [line.strip() for line in folder.log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    last = lines[-1].removeprefix("error: ").rstrip(".") if lines else ""
    if last and len(last) <= 200:
        return f": {last}."
    return f"; see {folder.log_path} for why."


def request_cancel(run_dir: str | os.PathLike) -> None:
    """Ask a running job to stop; it stops between two batches and marks the run cancelled."""
    RunFolder(run_dir).request_cancel()


def terminate(run_dir: str | os.PathLike, grace_s: float = 10.0) -> bool:
    """Stop a run's process now: ask it to cancel, terminate it (SIGTERM on POSIX, which the job
    treats as a cancel; TerminateProcess on Windows) and kill it if it is still there after
    ``grace_s``. Only the process the status names, with its creation time, is touched.

    Returns:
        True when a live process was stopped, False when the run had none.
    """
    import psutil  # noqa: PLC0415 - runs imports it anyway; named here for the exceptions

    folder = RunFolder(run_dir)
    process = runs.running_process(folder.read_status_file() or {})
    if process is None:
        return False
    folder.request_cancel()
    try:
        process.terminate()
        process.wait(timeout=grace_s)
    except psutil.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace_s)
    except psutil.NoSuchProcess:
        pass
    return True
