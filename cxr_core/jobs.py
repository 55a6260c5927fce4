"""One background training job per server.

Training runs in a separate process (``python -m cxr_core train --run-dir ...``): the Streamlit
server stays responsive, TensorFlow's memory stays out of it, and a browser reload does not stop
the job. One job at a time is enforced with an exclusive ``flock`` on ``<runs root>/.training.lock``:
the launcher takes the lock and hands the locked file descriptor to the child, so the lock lives
exactly as long as the training process, even if it is killed with SIGKILL. Two sessions pressing
Train at the same moment race for the same lock and exactly one wins.
"""
from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
from pathlib import Path

from . import runs
from .atomic import read_json, write_json_atomic
from .config import RunConfig
from .errors import TrainingBusyError
from .run_folder import RunFolder

log = logging.getLogger(__name__)

LOCK_NAME = ".training.lock"
ACTIVE_NAME = ".active.json"


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root) if root is not None else runs.runs_root().path


def _try_lock(root: Path) -> int | None:
    """Open and lock the lock file; return the descriptor, or None when another job holds it."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def is_busy(root: str | os.PathLike | None = None) -> bool:
    """True while a training process holds the lock."""
    fd = _try_lock(_root(root))
    if fd is None:
        return True
    os.close(fd)  # closing releases the probe lock
    return False


def active_run(root: str | os.PathLike | None = None) -> Path | None:
    """The run folder of the job now running on this server, or None."""
    root = _root(root)
    if not is_busy(root):
        return None
    info = read_json(root / ACTIVE_NAME, default={}) or {}
    path = info.get("run_dir")
    return Path(path) if path and Path(path).is_dir() else None


def start_training(config: RunConfig, root: str | os.PathLike | None = None) -> Path:
    """Launch training in a background process and return its run folder at once.

    Raises:
        TrainingBusyError: another training job is running on this server.
    """
    root = _root(root)
    fd = _try_lock(root)
    if fd is None:
        running = active_run(root)
        name = f" ({running.name})" if running else ""
        raise TrainingBusyError(
            f"A training job{name} is already running on this server; wait for it to finish or cancel it first.")
    try:
        run_dir = runs.new_run_dir(root, hint=f"{config.model.backbone}-{config.data.split}")
        folder = RunFolder(run_dir)
        folder.write_config(config)
        log_file = open(folder.log_path, "ab")  # noqa: SIM115 (handed to the child)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
                   PYTHONUNBUFFERED="1")
        project_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = project_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        process = subprocess.Popen(
            [sys.executable, "-m", "cxr_core", "train", "--config", str(folder.config_path),
             "--run-dir", str(run_dir), "--lock-fd", str(fd)],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            pass_fds=(fd,), start_new_session=True, cwd=project_root, env=env,
        )
        log_file.close()
        folder.write_status("running", pid=process.pid, message="starting")
        write_json_atomic(root / ACTIVE_NAME, {"run_dir": str(run_dir), "pid": process.pid})
        # Reap the child when it exits so it does not linger as a zombie in the server.
        _watch(process)
        return run_dir
    finally:
        os.close(fd)  # the child keeps its own copy of the locked descriptor


def _watch(process: subprocess.Popen) -> None:
    import threading  # noqa: PLC0415

    threading.Thread(target=process.wait, daemon=True, name=f"reap-{process.pid}").start()


def request_cancel(run_dir: str | os.PathLike) -> None:
    """Ask a running job to stop; it stops between two batches and marks the run cancelled."""
    RunFolder(run_dir).request_cancel()
