"""The training queue: jobs wait their turn for a free slot instead of being refused, and survive a restart.

``submit`` makes the job's run folder at once (``config.json`` and the status "queued"), in the runs
root or in the folder the caller names (a visitor's workspace), and appends an entry to
``<runs root>/.queue/queue.json``. Every change to that file is made under the file lock
``.queue/.lock`` and written atomically, so sessions, threads and processes may submit, withdraw and
dispatch at the same time, and the queue is still there after the server restarts. ``dispatch``
starts the oldest waiting jobs while fewer than ``max_concurrent`` run; ``jobs`` owns the slots, their
locks and the launch.

Who calls ``dispatch``: the app, when a job is submitted, and one daemon thread per server process
(``start_dispatcher``, started by any page while jobs wait) that calls it every two seconds. The training
process does not call it when it ends: a job killed outright (out of memory, SIGKILL, the server's
container replaced) never gets the chance, so a poller is needed anyway, and with one a job's end is
noticed within ``every_s``. A training process that launched the next job would also make that job the
child of a process on its way out, outside the server that watches its jobs. After a restart the queue
file is read again by the first dispatch, from the page or the thread the app starts again.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from cxr_core.core.config import RunConfig
from cxr_core.core.errors import BadDatasetError, BadRunError, CxrError, JobQueueError, TrainingBusyError
from cxr_core.hosting import jobs
from cxr_core.io.atomic import read_json, write_json_atomic
from cxr_core.runs import registry as runs
from cxr_core.runs.run_folder import RunFolder, RunState

log = logging.getLogger(__name__)

QUEUE_DIR = ".queue"
QUEUE_FILE = "queue.json"
LOCK_FILE = ".lock"
#: The status message of a waiting run (its place changes, so the page shows that from ``place``).
QUEUED_MESSAGE = "waiting in the training queue"
#: How long ``submit`` and ``withdraw`` wait for the queue lock: ``dispatch`` holds it while one job
#: starts (about a second; at worst ``jobs.START_TIMEOUT_S``).
LOCK_TIMEOUT_S = jobs.START_TIMEOUT_S + 30.0


@dataclass(frozen=True)
class QueuedJob:
    """A job waiting in the queue; ``place`` counts from 1 (the next to start)."""

    job_id: str
    run_dir: Path
    owner: str
    submitted: float
    place: int


def _queue_dir(root: Path) -> Path:
    folder = root / QUEUE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def _locked(root: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    lock = FileLock(str(_queue_dir(root) / LOCK_FILE))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise JobQueueError("The training queue is busy starting a job; try again in a minute.") from None
    try:
        yield
    finally:
        lock.release()


def _read(root: Path) -> list[dict]:
    """The entries, oldest first (a damaged file or entry is logged and skipped)."""
    data = read_json(root / QUEUE_DIR / QUEUE_FILE, default=None)
    if data is None:
        return []
    raw = data.get("jobs") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        log.error("%s is damaged; the training queue starts empty", root / QUEUE_DIR / QUEUE_FILE)
        return []
    keys = ("job_id", "run_dir", "owner", "submitted")
    return [entry for entry in raw if isinstance(entry, dict) and all(key in entry for key in keys)]


def _write(root: Path, entries: list[dict]) -> None:
    write_json_atomic(_queue_dir(root) / QUEUE_FILE, {"jobs": entries})


def _state(run_dir: str | os.PathLike) -> RunState | None:
    """The state its status file records (not reconciled: a queued run has no process to check)."""
    status = RunFolder(run_dir).status()
    return status.state if status is not None else None


def _same(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _waiting(entries: list[dict]) -> list[dict]:
    """The entries whose run still waits (a folder deleted meanwhile, or already started, drops out)."""
    return [entry for entry in entries if _state(entry["run_dir"]) is RunState.QUEUED]


def _as_jobs(entries: list[dict]) -> list[QueuedJob]:
    return [QueuedJob(job_id=str(e["job_id"]), run_dir=Path(e["run_dir"]), owner=str(e["owner"]),
                      submitted=float(e["submitted"]), place=place)
            for place, e in enumerate(_waiting(entries), start=1)]


def _limit_sentence(limit: int) -> str:
    if limit == 1:
        return ("You already have a training job waiting in the queue (the limit is 1 per visitor); "
                "withdraw it or wait for it to start.")
    return (f"You already have {limit} training jobs waiting in the queue (the limit is {limit} per visitor); "
            "withdraw one or wait for one to start.")


def submit(config: RunConfig, owner: str, parent: str | os.PathLike | None = None,
           root: str | os.PathLike | None = None, per_owner_limit: int | None = 1) -> QueuedJob:
    """Queue a training job: make its run folder now (in ``parent``, default the runs root) with its
    config and the status "queued", and append it to the queue.

    Args:
        owner: who submitted it (an e-mail address or a session's id), for the per-owner limit.
        per_owner_limit: how many jobs ``owner`` may have waiting at once; None: no limit (the operator).
    Raises:
        JobQueueError: ``owner`` already has ``per_owner_limit`` jobs waiting (one sentence with the limit).
    """
    if per_owner_limit is not None and per_owner_limit < 1:
        raise ValueError(f"per_owner_limit must be None or at least 1, not {per_owner_limit!r}")
    root = runs.resolve_root(root)
    with _locked(root):
        entries = _read(root)
        if per_owner_limit is not None:
            own = [e for e in _waiting(entries) if e["owner"] == owner]
            if len(own) >= per_owner_limit:
                raise JobQueueError(_limit_sentence(per_owner_limit))
        run_dir = runs.new_run_dir(Path(parent) if parent is not None else root,
                                   hint=f"{config.model.backbone}-{config.data.split}")
        submitted = time.time()
        entry = {"job_id": uuid.uuid4().hex, "run_dir": str(run_dir.resolve()), "owner": owner,
                 "submitted": submitted}
        try:
            folder = RunFolder(run_dir)
            folder.write_config(config)
            folder.write_status(RunState.QUEUED, pid=None, started=None, submitted=submitted, message=QUEUED_MESSAGE)
            entries.append(entry)
            _write(root, entries)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)  # no run folder without its place in the queue
            raise
    return next(job for job in _as_jobs(entries) if job.job_id == entry["job_id"])


def waiting(root: str | os.PathLike | None = None) -> list[QueuedJob]:
    """The jobs waiting to start, next first."""
    return _as_jobs(_read(runs.resolve_root(root)))


def place(run_dir: str | os.PathLike, root: str | os.PathLike | None = None) -> int | None:
    """The run's place in the queue (1: the next to start), or None when it is not waiting."""
    return next((job.place for job in waiting(root) if _same(job.run_dir, run_dir)), None)


def withdraw(run_dir: str | os.PathLike, root: str | os.PathLike | None = None) -> bool:
    """Take a job that has not started out of the queue and delete its run folder (nothing was trained).

    Returns:
        True when it was waiting and is gone; False when it had already started or was not queued.
    Raises:
        BadRunError: its folder could not be deleted (a file in it is in use); it stays queued.
    """
    root, target = runs.resolve_root(root), Path(run_dir)
    with _locked(root):
        entries = _read(root)
        entry = next((e for e in entries if _same(e["run_dir"], target)), None)
        if entry is None:
            return False
        rest = [e for e in entries if e is not entry]
        if _state(target) is RunState.QUEUED:
            try:
                runs.delete_run(target, queued_ok=True)
            except BadRunError:
                if target.exists():
                    raise
        elif target.exists():  # started already: only its stale entry goes
            _write(root, rest)
            return False
        _write(root, rest)
        return True


def dispatch(root: str | os.PathLike | None = None) -> list[Path]:
    """Start waiting jobs, oldest first, while fewer than ``max_concurrent`` run.

    Safe to call from several threads and processes at once: one of them holds the queue lock and
    starts jobs, the others return at once. A job that cannot start (its data set or weights file
    is gone, its process died before it began) ends "failed" with one sentence, and the next is tried.

    Returns:
        The run folders started by this call.
    """
    root = runs.resolve_root(root)
    started: list[Path] = []
    while True:
        lock = FileLock(str(_queue_dir(root) / LOCK_FILE))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return started  # another thread or process is dispatching now
        try:
            outcome = _start_next(root)
        finally:
            lock.release()
        if outcome is None:
            return started
        if isinstance(outcome, Path):
            started.append(outcome)


def _start_next(root: Path) -> Path | bool | None:
    """Under the queue lock: start the oldest job. Returns its run folder when it started, False when
    its entry was struck off without starting (try the next), None when there is nothing to do now."""
    entries = _read(root)
    if not entries:
        return None
    entry, rest = entries[0], entries[1:]
    folder = RunFolder(entry["run_dir"])
    if _state(folder.path) is not RunState.QUEUED:
        # Its folder was deleted, or a dispatcher started it and stopped before striking it off.
        _write(root, rest)
        return False
    if jobs.is_busy(root):
        return None
    try:
        config = folder.read_config()
        _check_startable(config)
        jobs.start_training(config, root, run_dir=folder.path)
    except TrainingBusyError:
        # Another launcher took the free slot at this moment: the job keeps its place.
        if _state(folder.path) is not RunState.QUEUED:
            folder.write_status(RunState.QUEUED, pid=None, started=None, submitted=entry["submitted"],
                                message=QUEUED_MESSAGE)
        return None
    except CxrError as error:
        _fail(folder, str(error))
    except Exception as error:  # a bug must not block the queue: this job fails, the others go on
        log.exception("the queued run %s could not start", folder.path)
        _fail(folder, f"The queued training job could not start ({type(error).__name__}: {error}); train again.")
    else:
        _write(root, rest)
        return folder.path
    _write(root, rest)
    return False


def _check_startable(config: RunConfig) -> None:
    """What may have changed while the job waited (a restart can lose a temporary folder): its data
    set and starting weights are still there. Raises a CxrError with one sentence."""
    from cxr_core.data.plan import preflight  # noqa: PLC0415 - imports the data modules; only a start needs them

    data_dir = Path(config.data.data_dir).expanduser()
    if not data_dir.is_absolute():
        data_dir = runs.PROJECT_ROOT / data_dir  # where the training process runs
    if not data_dir.is_dir():
        raise BadDatasetError(f"The data set folder {config.data.data_dir} no longer exists, so this queued "
                              "training job could not start; choose a data set that is here and train again.")
    # The ImageNet host is not probed here (the training process finds out, with its own sentence).
    preflight(config, probe=lambda: True, audience="app")


def _fail(folder: RunFolder, text: str) -> None:
    try:
        folder.append_progress({"time": time.time(), "event": RunState.FAILED, "message": text})
        folder.write_status(RunState.FAILED, pid=None, message=text, error=text)
    except OSError:  # its folder was deleted meanwhile: nothing to mark
        log.warning("could not mark %s failed: %s", folder.path, text)


def max_concurrent(root: str | os.PathLike | None = None) -> int:
    """How many training jobs run at once (see ``jobs.max_concurrent``)."""
    return jobs.max_concurrent(root)


def set_max_concurrent(n: int | None, root: str | os.PathLike | None = None) -> None:
    """The operator's number of training jobs that run at once; the dispatcher starts more at its
    next round. Raises BadSettingError (one sentence) unless ``n`` is a whole number of at least 1."""
    jobs.set_max_concurrent(n, root)


# -- the dispatcher thread: one per runs root in a server process -----------------------------------
_DISPATCHERS: dict[str, tuple[threading.Thread, threading.Event]] = {}
_DISPATCHERS_LOCK = threading.Lock()


def start_dispatcher(root: str | os.PathLike | None = None, every_s: float = 2.0) -> threading.Thread:
    """Start (once per runs root and process; later calls return the same thread) a daemon thread
    that calls ``dispatch`` every ``every_s`` seconds."""
    root = runs.resolve_root(root).resolve()
    with _DISPATCHERS_LOCK:
        current = _DISPATCHERS.get(str(root))
        if current is not None and current[0].is_alive():
            return current[0]
        stop = threading.Event()
        thread = threading.Thread(target=_poll, args=(root, every_s, stop), daemon=True,
                                  name=f"training-queue {root}")
        _DISPATCHERS[str(root)] = (thread, stop)
        thread.start()
        return thread


def stop_dispatcher(root: str | os.PathLike | None = None, timeout: float = 30.0) -> None:
    """Stop the dispatcher thread of ``root`` (after the round it is in), if there is one."""
    root = runs.resolve_root(root).resolve()
    with _DISPATCHERS_LOCK:
        current = _DISPATCHERS.pop(str(root), None)
    if current is not None:
        current[1].set()
        current[0].join(timeout)


def _poll(root: Path, every_s: float, stop: threading.Event) -> None:
    last_problem = ""
    while not stop.is_set():
        try:
            dispatch(root)
            last_problem = ""
        except Exception as error:  # the thread must outlive a bad round (a full disk, a damaged file)
            if str(error) != last_problem:  # logged once, not every round
                log.exception("the training queue could not start a job")
                last_problem = str(error)
        stop.wait(every_s)
