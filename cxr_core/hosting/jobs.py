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

Resident workers (``cxr_core.hosting.workers``) spare a job the start of a process and TensorFlow's
import. Worker K serves slot K: it writes ``<runs root>/.workers/worker-<K>.json`` (pid, creation
time, starting / idle / busy, the job and run it serves) and polls ``inbox-<K>.json``. When the free
slot chosen here has a live idle worker and the run can train in a process that already started
TensorFlow (no ``--cpu-replicas``, no multi-worker run), ``start_training`` writes the job into that
inbox (atomically) instead of launching a process; the worker claims it by renaming the file, takes
the slot's lock and writes itself into the run's status, the same handshake as a new process. A
worker that has not claimed the job within ``WORKER_CLAIM_S`` loses it (the launcher renames the
inbox away first) and the job starts in a new process as before.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
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
#: The resident workers' files (``cxr_core.hosting.workers``), in the runs root.
WORKERS_DIR = ".workers"
#: How long an idle worker has to claim a job written into its inbox (it looks ten times a second)
#: before the job goes to a new process instead.
WORKER_CLAIM_S = 3.0

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


def hold_training_lock(lock_file: str | os.PathLike, run_dir: str | os.PathLike, **status_fields) -> None:
    """In the training process: take its slot's lock for the rest of this process's life (a resident
    worker lets it go after the job: ``release_training_lock``), point the slot's ``.active*.json`` at
    ``run_dir`` and write this process into the run's status (which tells the launcher the job has
    started), with ``status_fields`` (a resident worker names itself and the job there).

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
    RunFolder(run_dir).write_status(RunState.RUNNING, pid=os.getpid(), message="starting", **status_fields)


def release_training_lock(lock_file: str | os.PathLike) -> None:
    """In a resident worker, after its job: let go of the slot's lock (the slot is free again)."""
    wanted = os.path.abspath(lock_file)
    for lock in [held for held in _HELD if os.path.abspath(held.lock_file) == wanted]:
        _HELD.remove(lock)
        lock.release(force=True)


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
        handed = _hand_to_worker(root, slot, folder) if resident_ok(config) else None
        process = handed or _launch(folder, lock_path(root, slot))
        _wait_until_started(process, folder, lock_path(root, slot))
        if handed is None:
            # Reap the child when it exits so it does not linger as a zombie in the server.
            threading.Thread(target=process.wait, daemon=True, name=f"reap-{process.pid}").start()
        return run_dir
    finally:
        launch.release()


def child_options() -> dict:
    """How a training process or a resident worker is started: the environment (no secrets), the
    project as working folder, and detached from the server's console on every system."""
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
    return {"stdin": subprocess.DEVNULL, "cwd": project_root, "env": env, **detach}


def _launch(folder: RunFolder, lock_file: Path) -> subprocess.Popen:
    with open(folder.log_path, "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "cxr_core", "train", "--config", str(folder.config_path),
             "--run-dir", str(folder.path), "--lock-file", str(lock_file)],
            stdout=log_file, stderr=subprocess.STDOUT, **child_options(),
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
    if isinstance(process, WorkerJob):
        text = f"The training worker stopped before it started this job{_last_words(folder)}"
    else:
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

    A run served by a resident worker is cancelled instead, and the worker goes on to the next job;
    a worker that has not ended the run within ``grace_s`` is killed (the pool starts another) and
    the run is marked cancelled here.

    Returns:
        True when a live process was stopped, False when the run had none.
    """

    folder = RunFolder(run_dir)
    status = folder.status()
    process = runs.running_process(status)
    served = status is not None and bool(status.raw.get("worker"))
    if process is None or (served and runs.run_status(folder.path).state is not RunState.RUNNING):
        return False  # a worker lives on after its job: only a run still running under it is stopped
    folder.request_cancel()
    if served:
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if runs.run_status(folder.path).state is not RunState.RUNNING:
                return True
            time.sleep(0.1)
        _kill(process, grace_s)
        text = "cancelled: the training worker did not stop in time, so it was stopped"
        folder.write_status(RunState.CANCELLED, message=text)
        return True
    try:
        process.terminate()
        process.wait(timeout=grace_s)
    except psutil.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace_s)
    except psutil.NoSuchProcess:
        pass
    return True


def _kill(process: psutil.Process, timeout: float) -> None:
    try:
        process.kill()  # SIGKILL, or TerminateProcess on Windows
        process.wait(timeout=timeout)
    except (psutil.NoSuchProcess, psutil.TimeoutExpired):
        pass


# -- resident workers: their files, and the launcher's side of the hand-over ------------------------

def workers_dir(root: str | os.PathLike) -> Path:
    return Path(root) / WORKERS_DIR


def worker_state_path(root: str | os.PathLike, slot: int) -> Path:
    """Worker ``slot``'s own account of itself: pid, creation time, state, the job and run it serves."""
    return workers_dir(root) / f"worker-{slot}.json"


def worker_inbox_path(root: str | os.PathLike, slot: int) -> Path:
    """Where the launcher writes the job for worker ``slot`` (the worker claims it by renaming it)."""
    return workers_dir(root) / f"inbox-{slot}.json"


def read_worker_state(root: str | os.PathLike, slot: int) -> dict | None:
    state = read_json(worker_state_path(root, slot), default=None)
    return state if isinstance(state, dict) else None


def worker_process(state: dict | None) -> psutil.Process | None:
    """The live process a worker's state file names (pid and creation time), or None."""
    if not isinstance(state, dict):
        return None
    return runs.running_process({"pid": state.get("pid"), "pid_create_time": state.get("pid_create_time")})


def resident_ok(config: RunConfig) -> bool:
    """Whether a run can train in a process that has already started TensorFlow: not one that splits
    the CPU into devices (chosen before TensorFlow starts) and not one that joins a cluster."""
    return config.train.distribute != "multi-worker" and int(config.train.cpu_replicas or 0) <= 1


def _move(source: Path, target: Path, tries: int = 50) -> bool:
    """Rename ``source`` to ``target``: True when this call moved it, False when it was gone (another
    process moved it first). Windows refuses while a reader has it open: tried again for a while."""
    for _ in range(tries):
        try:
            os.replace(source, target)
            return True
        except FileNotFoundError:
            return False
        except PermissionError:
            time.sleep(0.02)
    return False


def claim_assignment(root: str | os.PathLike, slot: int) -> dict | None:
    """In worker ``slot``: take the job written into its inbox, if any ({job, run_dir, lock_file})."""
    inbox = worker_inbox_path(root, slot)
    if not inbox.exists():
        return None
    taken = inbox.with_name(f"taken-{slot}.json")
    if not _move(inbox, taken):
        return None
    job = read_json(taken, default=None)
    taken.unlink(missing_ok=True)
    keys = ("job", "run_dir", "lock_file")
    if not isinstance(job, dict) or not all(isinstance(job.get(key), str) for key in keys):
        log.warning("ignoring a damaged job in %s", inbox)
        return None
    return job


class WorkerJob:
    """A job handed to a resident worker, seen as ``subprocess.Popen`` is by ``_wait_until_started``:
    ``poll`` is None while the worker lives and still has this job, else a number."""

    def __init__(self, root: Path, slot: int, process: psutil.Process, job: str) -> None:
        self.root, self.slot, self.process, self.job = root, slot, process, job
        self.pid = process.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            if runs.running_process({"pid": self.pid, "pid_create_time": self.process.create_time()}) is None:
                self.returncode = 1  # the worker died
            else:
                state = read_worker_state(self.root, self.slot) or {}
                if state.get("last_job") == self.job:
                    self.returncode = 2  # it ended the job before it started (the slot's lock was taken, say)
        return self.returncode

    def kill(self) -> None:
        _kill(self.process, 10.0)

    def wait(self, timeout: float | None = None) -> int | None:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
            self.process.wait(timeout=timeout)
        return self.poll()


def _hand_to_worker(root: Path, slot: int, folder: RunFolder) -> WorkerJob | None:
    """Under the launch lock: give the job to slot ``slot``'s worker when it is alive and idle and
    claims the job within ``WORKER_CLAIM_S``; None when the job must go to a new process."""
    state = read_worker_state(root, slot)
    process = worker_process(state)
    inbox = worker_inbox_path(root, slot)
    if process is None or state.get("state") != "idle" or inbox.exists():
        return None
    job = uuid.uuid4().hex
    write_json_atomic(inbox, {"job": job, "run_dir": str(folder.path.resolve()),
                              "lock_file": str(lock_path(root, slot).resolve()), "offered": time.time()})
    deadline = time.monotonic() + WORKER_CLAIM_S
    while inbox.exists() and time.monotonic() < deadline and process.is_running():
        time.sleep(0.02)
    if inbox.exists() and _move(inbox, inbox.with_name(f"withdrawn-{slot}.json")):
        inbox.with_name(f"withdrawn-{slot}.json").unlink(missing_ok=True)
        log.warning("the training worker of slot %d did not take the job in %.0f s; starting a process instead",
                    slot, WORKER_CLAIM_S)
        return None
    return WorkerJob(root, slot, process, job)
