"""Resident training workers: processes that keep TensorFlow loaded and train one job after another.

A training job in a new process spends 4-5 s and 650 MB importing TensorFlow before it does anything;
a head-only run on cached features takes a few seconds more. So a served app keeps ``max_concurrent``
workers (``python -m cxr_core worker --root ROOT --slot K``), one per training slot, and
``jobs.start_training`` hands a job to the free slot's idle worker instead of starting a process (the
files and the hand-over are ``jobs``'; a job goes to a new process as before when no worker is idle).

Worker K (``serve``): takes ``.workers/worker-<K>.lock`` for life (one worker per slot, whoever starts
it), writes its state file (starting, then idle), imports TensorFlow, then polls its inbox. A job runs
in-process exactly as ``python -m cxr_core train --run-dir --lock-file`` runs it: the slot's lock and
the run's status (the same handshake, plus the worker's state file and the job's token, so a reader
knows the run from the worker's next job), the cancel file, the heartbeat, and the process's output
(file descriptors 1 and 2) in the run's log for the job's length. Then it lets go of the slot's lock,
makes sure the run's status is final (it exits when it cannot write it, so no run is left "running"
under a live worker), clears Keras' session and collects garbage, and is idle again. It exits when its
server is gone (``--parent``), when the operator lowered the number of jobs below its slot, or after
a job that left it above ``MAX_RSS_MB``; the pool starts another.

The pool (``Pool.keep``, each round of the server's maintenance) starts a missing worker for every
slot, marks the run of a worker that died during its job failed with one sentence
(``runs.worker_stopped``), and waits longer between restarts of a worker that keeps dying at start.
It runs where the operator turns it on with ``$CXR_RESIDENT_WORKERS=1`` (a hosted class: each idle
worker keeps about 0.7 GB, so N jobs at once cost N of those all day); otherwise, a local app or a
hosted one, every job starts its own process as before. Not on by default even on a hosted app: a
server (or a test) that never trains must not hold a TensorFlow process per slot.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from cxr_core.hosting import jobs
from cxr_core.io.atomic import write_json_atomic
from cxr_core.runs import registry as runs
from cxr_core.runs.run_folder import RunFolder, RunState

log = logging.getLogger(__name__)

ENV = "CXR_RESIDENT_WORKERS"
#: How often an idle worker looks into its inbox, and how often it checks its server and its slot.
POLL_S = 0.1
CHECK_EVERY_S = 2.0
#: A worker that has grown beyond this after a job ends, and the pool starts a fresh one.
MAX_RSS_MB = 1536
#: The pool waits this long before starting again a worker that died within ``QUICK_DEATH_S`` of its
#: start, doubled at every such death up to ``MAX_BACKOFF_S``.
QUICK_DEATH_S = 60.0
FIRST_BACKOFF_S = 10.0
MAX_BACKOFF_S = 600.0

#: What a worker runs for a job: (the job {job, run_dir, lock_file}, the status fields that name the worker
#: and the job) -> an exit code like the training command's.
RunJob = Callable[[dict, dict], int]


def enabled() -> bool:
    """Whether this server keeps resident workers: ``$CXR_RESIDENT_WORKERS`` is 1 (or true, yes, on)."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def worker_lock_path(root: str | os.PathLike, slot: int) -> Path:
    """Held by worker ``slot`` for its life: a second worker for that slot stops at once."""
    return jobs.workers_dir(root) / f"worker-{slot}.lock"


def worker_log_path(root: str | os.PathLike, slot: int) -> Path:
    """The worker's own output between jobs (a job's goes to its run's log)."""
    return jobs.workers_dir(root) / f"worker-{slot}.log"


# -- the worker ----------------------------------------------------------------------------------

def serve(root: str | os.PathLike, slot: int, run_job: RunJob, *, parent: int | None = None,
          poll_s: float = POLL_S, redirect: bool = True, warm: Callable[[], None] | None = None) -> int:
    """Serve slot ``slot`` of ``root`` until the server ``parent`` is gone or the slot is no longer
    used; returns the exit code (0; 1 when a run's status could not be made final)."""
    root = Path(root).resolve()
    jobs.workers_dir(root).mkdir(parents=True, exist_ok=True)
    own = FileLock(str(worker_lock_path(root, slot)))
    try:
        own.acquire(timeout=0)
    except Timeout:
        print(f"Slot {slot} of {root} already has a training worker; this one stops.", file=sys.stderr, flush=True)
        return 0
    me = psutil.Process()
    server = _process(parent)
    record = {"slot": slot, "pid": me.pid, "pid_create_time": me.create_time(), "parent": parent,
              "started": time.time(), "jobs_done": 0, "job": None, "run_dir": None, "last_job": None}

    def publish(state: str, **fields) -> None:
        record.update(fields, state=state, since=time.time())
        write_json_atomic(jobs.worker_state_path(root, slot), record)

    try:
        publish("starting")
        (warm or _warm)()
        publish("idle", rss_mb=_rss_mb(me))
        print(f"Training worker {slot} is ready (pid {me.pid}).", file=sys.stderr, flush=True)
        checked = time.monotonic()
        while True:
            if time.monotonic() - checked >= CHECK_EVERY_S:
                checked = time.monotonic()
                reason = _reason_to_stop(root, slot, parent, server)
                if reason:
                    print(f"Training worker {slot} stops: {reason}.", file=sys.stderr, flush=True)
                    return 0
            job = jobs.claim_assignment(root, slot)
            if job is None:
                time.sleep(poll_s)
                continue
            publish("busy", job=job["job"], run_dir=job["run_dir"])
            marks = {"worker": str(jobs.worker_state_path(root, slot)), "job": job["job"]}
            try:
                with _output_to(RunFolder(job["run_dir"]).log_path if redirect else None):
                    run_job(job, marks)
            finally:
                final = _make_final(job, me.pid)
            if not final:
                return 1
            _clear_session()
            rss = _rss_mb(me)
            publish("idle", job=None, run_dir=None, last_job=job["job"], jobs_done=record["jobs_done"] + 1, rss_mb=rss)
            if rss > MAX_RSS_MB:
                print(f"Training worker {slot} stops: it uses {rss:.0f} MB after its job.", file=sys.stderr, flush=True)
                return 0
    finally:
        with contextlib.suppress(OSError):
            publish("stopped", job=None, run_dir=None)
        own.release()


def _warm() -> None:
    """Import what every job needs (TensorFlow, Keras, the stages) once, before the first job."""
    from cxr_core.engine import distribute, train  # noqa: F401, PLC0415 (the point: TensorFlow loaded once)


def _clear_session() -> None:
    """Drop the job's models and graphs: the next job starts from a clean Keras state."""
    keras = sys.modules.get("keras")  # loaded by _warm; a job that never needed it leaves nothing to clear
    if keras is not None:
        keras.backend.clear_session()
    gc.collect()


def _rss_mb(process: psutil.Process) -> float:
    try:
        return process.memory_info().rss / 2**20
    except psutil.Error:
        return 0.0


def _process(pid: int | None) -> psutil.Process | None:
    if pid is None:
        return None
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _reason_to_stop(root: Path, slot: int, parent: int | None, server: psutil.Process | None) -> str:
    """Why an idle worker should end now, or ""."""
    if parent is not None and (server is None or not server.is_running()
                               or server.status() == psutil.STATUS_ZOMBIE):
        return f"its server (pid {parent}) is gone"
    if not root.is_dir():
        return f"{root} is gone"
    if slot >= jobs.max_concurrent(root):
        return f"the server now runs {jobs.max_concurrent(root)} job(s) at once"
    return ""


@contextlib.contextmanager
def _output_to(path: Path | None) -> Iterator[None]:
    """Send this process's output (file descriptors 1 and 2: Python's and TensorFlow's) to ``path``."""
    if path is None:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = (os.dup(1), os.dup(2))
    try:
        with open(path, "ab") as log_file:
            os.dup2(log_file.fileno(), 1)
            os.dup2(log_file.fileno(), 2)
            try:
                yield
            finally:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(OSError, ValueError):
                        stream.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def _make_final(job: dict, pid: int) -> bool:
    """After a job: a run whose status still says running under this worker is marked failed (the job
    ended without saying how). False when that cannot be written: the worker must then exit, so the
    run's pid is gone and it reads as failed."""
    folder = RunFolder(job["run_dir"])
    status = folder.status()
    if status is None or status.state is not RunState.RUNNING or status.pid != pid:
        return True
    text = "The training worker ended this job without finishing it; train again."
    try:
        folder.write_status(RunState.FAILED, message=text, error=text)
        return True
    except OSError as error:
        print(f"could not mark {folder.path} failed ({error}); this worker stops", file=sys.stderr, flush=True)
        return False


# -- the pool ------------------------------------------------------------------------------------

class Pool:
    """The server's resident workers for one runs root: one per slot, replaced when one dies."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self.started: dict[int, subprocess.Popen] = {}
        self.retry_at: dict[int, float] = {}
        self.backoff: dict[int, float] = {}

    def keep(self) -> list[int]:
        """One look: reap the workers that ended, fail the job of one that died, start the missing ones.
        Returns the slots a worker was started for."""
        started = []
        for slot in range(jobs.max_concurrent(self.root)):
            state = jobs.read_worker_state(self.root, slot)
            child = self.started.get(slot)
            if child is not None and child.poll() is not None:
                self._ended(slot, child, state)
                state = jobs.read_worker_state(self.root, slot)
            elif child is not None:
                continue  # ours and alive (perhaps still importing TensorFlow)
            if jobs.worker_process(state) is not None:
                continue  # alive: a worker of this server, or of one before it finishing its job
            fail_orphaned_job(state)
            if time.monotonic() >= self.retry_at.get(slot, 0.0):
                self.started[slot] = start_worker(self.root, slot)
                started.append(slot)
        return started

    def _ended(self, slot: int, child: subprocess.Popen, state: dict | None) -> None:
        del self.started[slot]
        fail_orphaned_job(state, _exit_detail(child.returncode))
        lived = time.time() - getattr(child, "started", 0.0)
        if child.returncode != 0 and lived < QUICK_DEATH_S:
            wait = min(MAX_BACKOFF_S, self.backoff.get(slot, FIRST_BACKOFF_S / 2) * 2)
            self.backoff[slot] = wait
            self.retry_at[slot] = time.monotonic() + wait
            log.warning("the training worker of slot %d stopped %.0f s after its start (%s); next try in %.0f s; "
                        "see %s", slot, lived, _exit_detail(child.returncode), wait, worker_log_path(self.root, slot))
        else:
            self.backoff.pop(slot, None)
            self.retry_at.pop(slot, None)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers this pool started (a job they train is cancelled first)."""
        for slot, child in list(self.started.items()):
            state = jobs.read_worker_state(self.root, slot) or {}
            if state.get("run_dir"):
                RunFolder(state["run_dir"]).request_cancel()
            with contextlib.suppress(OSError):
                child.terminate()
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout)
            fail_orphaned_job(jobs.read_worker_state(self.root, slot), "its server stopped it")
        self.started.clear()


def start_worker(root: str | os.PathLike, slot: int, parent: int | None = None) -> subprocess.Popen:
    """Start worker ``slot`` of ``root`` (its output in ``worker_log_path``); it ends with ``parent``
    (by default this process)."""
    root = Path(root).resolve()
    jobs.workers_dir(root).mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "cxr_core", "worker", "--root", str(root), "--slot", str(slot),
               "--parent", str(os.getpid() if parent is None else parent)]
    with open(worker_log_path(root, slot), "ab") as log_file:
        child = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, **jobs.child_options())
    child.started = time.time()
    return child


def fail_orphaned_job(state: dict | None, detail: str = "") -> bool:
    """When a worker's state file says it was training a run and that worker is gone: mark the run failed
    with one sentence, unless its status already moved on. Returns True when it marked one."""
    if not isinstance(state, dict) or state.get("state") != "busy" or not state.get("run_dir"):
        return False
    if jobs.worker_process(state) is not None:
        return False
    folder = RunFolder(state["run_dir"])
    status = folder.status()
    if status is None or status.state is not RunState.RUNNING or status.pid != state.get("pid"):
        return False
    text = runs.worker_stopped(detail or "its process is gone")
    try:
        folder.append_progress({"time": time.time(), "event": RunState.FAILED, "message": text})
        folder.write_status(RunState.FAILED, message=text, error=text)
    except OSError as error:  # its folder was deleted meanwhile
        log.warning("could not mark %s failed: %s", folder.path, error)
        return False
    return True


def _exit_detail(code: int | None) -> str:
    if code is None:
        return ""
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"


def wait_idle(root: str | os.PathLike, slot: int, timeout: float = 120.0) -> bool:
    """Wait until worker ``slot`` of ``root`` is alive and idle (tests, benchmarks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = jobs.read_worker_state(root, slot)
        if state and state.get("state") == "idle" and jobs.worker_process(state) is not None:
            return True
        time.sleep(0.05)
    return False
