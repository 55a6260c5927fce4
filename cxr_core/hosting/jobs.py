"""Background training jobs, at most N at once per server, on Linux, macOS and Windows alike.

Training runs in a separate process (``python -m cxr_core train --run-dir ... --lock-file ...``):
the Streamlit server stays responsive, TensorFlow's memory stays out of it, and a browser reload
does not stop the job.

How many jobs run at once (``max_concurrent``, default 1) is the operator's choice: the settings
file ``<runs root>/.jobs.json`` written by ``set_max_concurrent``, else ``$CXR_MAX_JOBS``. Each
running job holds one slot: an operating-system file lock (``filelock.FileLock``: ``flock`` on
POSIX, ``msvcrt.locking`` on Windows) on ``<runs root>/.training.lock`` for slot 0 and
``.training-<k>.lock`` for slot k, with ``.active.json`` / ``.active-<k>.json`` naming its run.
The training process takes its slot's lock itself, first thing, and holds it until it exits: the
system releases it however the process ends, killed outright (SIGKILL, Task Manager) included. A
lock cannot be handed from a parent to its child on every system, so the launcher holds a second
lock, ``.launch.lock``, from its choice of a free slot until the child reports that it holds that
slot's lock (by writing its own pid into the run's status). Two sessions pressing Train at the
same moment meet at that second lock and only one of them starts a job at a time. Jobs that wait
for a slot are ``job_queue``'s.

Liveness and stopping go through ``psutil`` (``runs.running_process``), which knows a process by
its pid *and* its creation time, so a pid reused by another program is never taken for the job.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from cxr_core.core.config import RunConfig
from cxr_core.core.errors import BadRunError, BadSettingError, CxrError, TrainingBusyError
from cxr_core.hosting import access
from cxr_core.io.atomic import read_json, write_json_atomic
from cxr_core.runs import registry as runs
from cxr_core.runs.run_folder import RunFolder, RunState

log = logging.getLogger(__name__)

LOCK_NAME = ".training.lock"
LAUNCH_NAME = ".launch.lock"
ACTIVE_NAME = ".active.json"
#: The operator's number of jobs that run at once ({"max_concurrent": n}); wins over ``MAX_JOBS_ENV``.
SETTINGS_NAME = ".jobs.json"
MAX_JOBS_ENV = "CXR_MAX_JOBS"
DEFAULT_MAX_JOBS = 1
_SLOT_LOCK = re.compile(r"^\.training(?:-(\d+))?\.lock$")
#: How long the launcher waits for the training process to report that it holds the lock
#: (a cold Python start with a virus scanner on Windows can take several seconds).
START_TIMEOUT_S = 60.0
#: How long the training process waits for the lock: a page's ``is_busy`` probe holds it for an instant.
CLAIM_TIMEOUT_S = 5.0

# The training lock, held by this process for as long as it lives (a FileLock releases when collected).
_HELD: list[FileLock] = []
_WARNED: set[tuple[str, str]] = set()
_WINDOWS = sys.platform == "win32"


def _whole(value: object) -> int | None:
    """``value`` as a whole number of at least 1 (an int, or digits in a string), else None."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def max_concurrent(root: str | os.PathLike | None = None) -> int:
    """How many training jobs may run at once: the operator's setting in the runs root, else
    ``$CXR_MAX_JOBS``, else 1. A value that is not a whole number of at least 1 is ignored (logged)."""
    settings = read_json(runs.resolve_root(root) / SETTINGS_NAME, default=None)
    chosen = settings.get("max_concurrent") if isinstance(settings, dict) else None
    for source, value in ((SETTINGS_NAME, chosen), (MAX_JOBS_ENV, os.environ.get(MAX_JOBS_ENV))):
        if value is None or value == "":
            continue
        number = _whole(value)
        if number is not None:
            return number
        if (source, repr(value)) not in _WARNED:  # once, not at every poll of the queue
            _WARNED.add((source, repr(value)))
            log.warning("ignoring %s=%r: the number of training jobs at once must be a whole number of at least 1",
                        source, value)
    return DEFAULT_MAX_JOBS


def set_max_concurrent(n: int | None, root: str | os.PathLike | None = None) -> None:
    """Set how many training jobs run at once on this server (kept in the runs root, so it outlives a
    restart); None forgets the setting (``$CXR_MAX_JOBS`` or 1 applies again). Lowering it stops no job.

    Raises:
        BadSettingError: ``n`` is not a whole number of at least 1.
    """
    root = runs.resolve_root(root)
    if n is None:
        (root / SETTINGS_NAME).unlink(missing_ok=True)
        return
    number = _whole(n) if not isinstance(n, str) else None
    if number is None:
        raise BadSettingError(f"The number of training jobs that run at once must be a whole number of at least 1, "
                              f"not {n!r}.")
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / SETTINGS_NAME, {"max_concurrent": number})


def lock_path(root: str | os.PathLike, slot: int) -> Path:
    """Slot ``slot``'s lock file: ``.training.lock`` for slot 0 (the name the command line knows)."""
    return Path(root) / (LOCK_NAME if slot == 0 else f".training-{slot}.lock")


def active_path(root: str | os.PathLike, slot: int) -> Path:
    """Slot ``slot``'s pointer to its run: ``.active.json`` for slot 0, ``.active-<k>.json`` after."""
    return Path(root) / (ACTIVE_NAME if slot == 0 else f".active-{slot}.json")


def _active_for(lock_file: Path) -> Path:
    match = _SLOT_LOCK.match(lock_file.name)
    return active_path(lock_file.parent, int(match.group(1)) if match and match.group(1) else 0)


def _held(lock_file: Path) -> bool:
    """Whether a process holds ``lock_file`` (probed by taking it for an instant)."""
    probe = FileLock(str(lock_file))
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return True
    probe.release()
    return False


def _taken_slots(root: Path) -> list[int]:
    """The slots whose lock a training process holds: those under the limit, and any above it still
    held by a job started before the operator lowered the limit."""
    root.mkdir(parents=True, exist_ok=True)
    slots = set(range(max_concurrent(root)))
    for path in root.glob(".training*.lock"):
        match = _SLOT_LOCK.match(path.name)
        if match:
            slots.add(int(match.group(1) or 0))
    return [slot for slot in sorted(slots) if _held(lock_path(root, slot))]


def running_count(root: str | os.PathLike | None = None) -> int:
    """How many training jobs run on this server now."""
    return len(_taken_slots(runs.resolve_root(root)))


def _busy_error(root: Path) -> TrainingBusyError:
    limit = max_concurrent(root)
    if limit == 1:
        running = active_runs(root)
        name = f" ({running[0].name})" if running else ""
        return TrainingBusyError(
            f"A training job{name} is already running on this server; wait for it to finish or cancel it first.")
    return TrainingBusyError(
        f"As many training jobs as this server runs at once ({limit}) are already running or starting; "
        "wait for one to finish or cancel one first.")


def is_busy(root: str | os.PathLike | None = None) -> bool:
    """True while every slot is taken: as many jobs run as ``max_concurrent`` allows, so none can start."""
    root = runs.resolve_root(root)
    return len(_taken_slots(root)) >= max_concurrent(root)


def active_runs(root: str | os.PathLike | None = None) -> list[Path]:
    """The run folders of the jobs now running on this server, in slot order."""
    root = runs.resolve_root(root)
    found = []
    for slot in _taken_slots(root):
        info = read_json(active_path(root, slot), default={}) or {}
        path = info.get("run_dir") if isinstance(info, dict) else None
        if path and Path(path).is_dir():
            found.append(Path(path))
    return found


def active_run(root: str | os.PathLike | None = None) -> Path | None:
    """The run folder of the first job now running on this server, or None."""
    running = active_runs(root)
    return running[0] if running else None


def hold_training_lock(lock_file: str | os.PathLike, run_dir: str | os.PathLike) -> None:
    """In the training process: take its slot's lock for the rest of this process's life, point the
    slot's ``.active*.json`` at ``run_dir`` and write this process into the run's status (which tells
    the launcher the job has started).

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
    write_json_atomic(_active_for(lock_file), {"run_dir": str(Path(run_dir)), "pid": os.getpid()})
    RunFolder(run_dir).write_status(RunState.RUNNING, pid=os.getpid(), message="starting")


def start_training(config: RunConfig, root: str | os.PathLike | None = None,
                   run_dir: str | os.PathLike | None = None) -> Path:
    """Launch training in a background process in a free slot and return its run folder once that
    process holds the slot's lock (about a second).

    Args:
        run_dir: an existing run folder to train in (the queue made it when the job was submitted);
            by default a new folder in ``root``.
    Raises:
        TrainingBusyError: every slot is taken, or another job is starting at this moment.
        BadRunError: ``run_dir`` does not exist.
        CxrError: the training process stopped, or did not report, before it started.
    """
    root = runs.resolve_root(root)
    root.mkdir(parents=True, exist_ok=True)
    launch = FileLock(str(root / LAUNCH_NAME))
    try:
        launch.acquire(timeout=0)
    except Timeout:
        raise _busy_error(root) from None
    try:
        limit = max_concurrent(root)
        taken = _taken_slots(root)
        if len(taken) >= limit:
            raise _busy_error(root)
        slot = next(k for k in range(limit) if k not in taken)
        if run_dir is None:
            run_dir = runs.new_run_dir(root, hint=f"{config.model.backbone}-{config.data.split}")
        elif not Path(run_dir).is_dir():
            raise BadRunError(f"The run folder {run_dir} does not exist.")
        run_dir = Path(run_dir)
        folder = RunFolder(run_dir)
        folder.write_config(config)
        # The launcher's own pid until the child writes its own: the run is running while either lives.
        folder.write_status(RunState.RUNNING, pid=os.getpid(), message="starting")
        process = _launch(folder, lock_path(root, slot))
        _wait_until_started(process, folder, lock_path(root, slot))
        # Reap the child when it exits so it does not linger as a zombie in the server.
        threading.Thread(target=process.wait, daemon=True, name=f"reap-{process.pid}").start()
        return run_dir
    finally:
        launch.release()


def _launch(folder: RunFolder, lock_file: Path) -> subprocess.Popen:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), PYTHONUNBUFFERED="1")
    # Streamlit copies top-level secrets into the environment; the training job needs none of them.
    env.pop(access.PASSPHRASE_SECRET, None)
    project_root = str(Path(__file__).resolve().parents[2])
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


def _wait_until_started(process: subprocess.Popen, folder: RunFolder, lock_file: Path) -> None:
    """Return once the child has written its own pid into the status (it then holds the lock);
    otherwise stop it, mark the run failed and raise one sentence."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        status = folder.status()
        if status is not None and status.pid not in (None, os.getpid()):
            return
        if process.poll() is not None:
            break
        if time.monotonic() > deadline:
            process.kill()  # TerminateProcess on Windows, SIGKILL elsewhere
            process.wait()
            text = (f"The training process did not start within {START_TIMEOUT_S:.0f} seconds, so it was stopped; "
                    f"see {folder.log_path} for what it was doing.")
            folder.write_status(RunState.FAILED, message=text, error=text)
            raise CxrError(text)
        time.sleep(0.05)
    if _held(lock_file):  # a job started outside this launcher took the slot first
        error = _busy_error(lock_file.parent)
        folder.write_status(RunState.FAILED, message=str(error), error=str(error))
        raise error
    text = f"The training process stopped before it started (exit code {process.returncode}){_last_words(folder)}"
    folder.write_status(RunState.FAILED, message=text, error=text)
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

    folder = RunFolder(run_dir)
    process = runs.running_process(folder.status())
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
