"""Run folders: where they live, what state they are in, listing and deletion.

A run folder is self-describing (see docs/ARCHITECTURE.md). Its ``status.json`` says queued /
running / done / failed / cancelled (``RunState``). A process killed without warning cannot update its
status, so a run that says running but whose process is gone (or whose pid now belongs to another
program: the status records the process's creation time too) reads as failed here (``run_status``):
no run is ever shown as done without a loadable model, and none is shown as running forever.

A run served by a resident worker (``cxr_core.hosting.workers``) names in its status the worker's state
file (``worker``) and the job (``job``): the worker lives on after the job, so its pid alone does not say
that this run is still trained; the run is alive while that file still gives the same pid this job.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import psutil

from cxr_core.core.errors import BadRunError
from cxr_core.io.atomic import read_json
from cxr_core.runs import heartbeat
from cxr_core.runs.records import stored_intervals
from cxr_core.runs.run_folder import MODEL_FILE, STATUS_FILE, Metrics, RunFolder, RunState, Status

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS_DIR = PROJECT_ROOT / "artifacts"
DEFAULT_RUNS_DIR = ARTIFACTS_DIR / "runs"
#: The shipped demo run (trained from scratch on the real Kermany images; see its MODEL_CARD.md).
DEMO_RUN_DIR = ARTIFACTS_DIR / "demo-mobilenet"
#: The folder of the runs root that holds visitors' workspaces (``cxr_core.hosting.workspaces``); not a run.
WORKSPACES_DIR = "workspaces"


def demo_run_dir() -> Path:
    """The demo run: ``$CXR_DEMO_RUN`` when set (a deployment may ship its own; tests hide it),
    else ``DEMO_RUN_DIR``."""
    return Path(os.environ.get("CXR_DEMO_RUN") or DEMO_RUN_DIR).expanduser()



@dataclass(frozen=True)
class RunsRoot:
    """Where user runs are kept; ``fallback`` is True when the usual place was read-only."""

    path: Path
    fallback: bool = False
    reason: str = ""


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-", delete=True):
            pass
        return True
    except OSError:
        return False


def runs_root() -> RunsRoot:
    """The folder for runs: ``$CXR_RUNS_DIR``, else ``artifacts/runs``.

    A hosted app may have a read-only project folder; then runs go to a temporary folder and
    ``fallback`` says so, so the app can tell the user that those runs will not survive a restart.
    """
    wanted = Path(os.environ.get("CXR_RUNS_DIR") or DEFAULT_RUNS_DIR).expanduser()
    if _writable(wanted):
        return RunsRoot(wanted)
    temp = Path(tempfile.gettempdir()) / "cxr-workbench-runs"
    temp.mkdir(parents=True, exist_ok=True)
    reason = f"{wanted} is not writable, so runs are kept in {temp} and will be lost when the server restarts."
    log.warning(reason)
    return RunsRoot(temp, fallback=True, reason=reason)


def resolve_root(root: str | os.PathLike | None) -> Path:
    """``root`` as a Path; the runs root (``runs_root``) when None."""
    return Path(root) if root is not None else runs_root().path


def new_run_dir(root: str | os.PathLike | None = None, hint: str = "run") -> Path:
    """Create and return a new, empty run folder named ``<UTC time>-<hint>``."""
    root = resolve_root(root)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", hint).strip("-")[:40] or "run"
    for attempt in range(1000):
        name = f"{stamp}-{slug}" + (f"-{attempt}" if attempt else "")
        path = root / name
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run folder under {root}")


def worker_stopped(detail: str = "") -> str:
    """The sentence of a run whose resident training worker died during its job."""
    return f"The training worker stopped unexpectedly{f' ({detail})' if detail else ''}; train again."


#: Seconds two readings of one process's creation time may differ by (the boot time they are
#: counted from can move by a second); a pid reused by another program starts later than that.
_CREATE_TIME_TOLERANCE_S = 1.0


def running_process(status: Status | Mapping | None) -> psutil.Process | None:
    """The live process a status names (``pid``, and ``pid_create_time`` when recorded), or None.

    Portable (psutil; ``os.kill(pid, 0)`` would terminate the process on Windows). None when the
    process is gone, is a zombie (killed, not yet reaped), or is another program that got the
    same pid later: its creation time differs from the recorded one. None too for a status written on
    another host (``host``): its pid names no process here, and a process here must not be taken for it.
    """
    if not isinstance(status, Status):
        status = Status.from_dict({**status, "state": RunState.RUNNING}) if isinstance(status, Mapping) else None
    if status is None:
        return None
    if status.host and status.host != heartbeat.this_host():
        return None
    pid = status.pid
    if pid is None or pid <= 0 or not psutil.pid_exists(pid):
        return None
    try:
        process = psutil.Process(pid)
        recorded = status.pid_create_time
        if recorded is not None and abs(process.create_time() - float(recorded)) > _CREATE_TIME_TOLERANCE_S:
            return None
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
    except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError, ValueError):
        # AccessDenied: another user's process, so not the job this user started.
        return None
    return process


def run_status(run_dir: str | os.PathLike) -> Status:
    """The run's status, reconciled with reality.

    A running run whose process is gone reads as failed (it was killed); a done run without its model
    reads as failed too. A queued run has no process yet and stays queued (``job_queue`` starts it or
    marks it failed). A run training on another host (``host``; the run folder on shared storage) has
    no process here: it is alive while its heartbeat is fresh (``heartbeat.STALE_AFTER_S``), else failed,
    naming the host. Reading never rewrites the run's files.
    """
    folder = RunFolder(run_dir)
    status = folder.status()
    if status is None:
        if folder.has_model() and folder.config_path.is_file():
            # A run folder made by hand or by an older version: a model and a config are enough.
            return Status(RunState.DONE, message="finished (no status file)")
        return Status(RunState.FAILED, message="the run folder has no readable status.json", error="missing status")
    if status.state is RunState.RUNNING:
        beat = heartbeat.read(folder.path)
        host = _host(status, beat)
        if host != heartbeat.this_host():
            # Training on another machine, the run folder on shared storage: its heartbeat says whether it lives.
            silent_s = _silent_s(folder, status, beat)
            if silent_s > heartbeat.STALE_AFTER_S:
                text = (f"The training process on host {host} has not been heard from for {_duration(silent_s)}; "
                        "it stopped or lost the shared folder.")
                status = dataclasses.replace(status, state=RunState.FAILED, error=text, message=text)
        elif running_process(status) is None:
            gone = worker_stopped() if status.raw.get("worker") else (
                "the training process stopped without finishing (killed or crashed)")
            status = dataclasses.replace(status, state=RunState.FAILED, error=status.error or gone)
        elif _left_by_its_worker(status):
            status = dataclasses.replace(status, state=RunState.FAILED, error=status.error or worker_stopped(
                "it went on without finishing this run"))
    if status.state is RunState.DONE and not folder.has_model():
        status = dataclasses.replace(status, state=RunState.FAILED, error=f"{MODEL_FILE} is missing")
    if "message" not in status.raw and status.message == "":
        status = dataclasses.replace(status, message=status.error or status.state.value)
    return status


def _left_by_its_worker(status: Status) -> bool:
    """Whether the resident worker a running status names (alive) serves another job or none now."""
    path, job = status.raw.get("worker"), status.raw.get("job")
    if not path or not job:
        return False
    state = read_json(path, default=None)
    if not isinstance(state, dict) or state.get("pid") != status.pid:
        return False  # unreadable, or a newer worker of that slot: the pid and creation time decide
    return state.get("job") != job


def read_status(run_dir: str | os.PathLike) -> dict:
    """``run_status`` as a dict with at least ``state`` (a ``RunState``) and ``message``, and the file's
    other fields (for the Training page and the tests, which read it as a dict)."""
    return run_status(run_dir).as_dict()


def _host(status: Status, beat: dict | None) -> str:
    """The host a run trains on: its status says, else its heartbeat (written before the status names
    the host), else this host (a run from before either: judged by its pid, as always)."""
    host = status.host or (beat.get("host") if isinstance(beat, dict) else None)
    return str(host) if host else heartbeat.this_host()


def _silent_s(folder: RunFolder, status: Status, beat: dict | None) -> float:
    """Seconds since the run's last sign of life: its heartbeat, else its status (a run that has not
    beaten yet). Generous, as the two machines' clocks differ: the youngest of the file's time on the
    shared storage and the time the writer put in it."""
    name, recorded = ((heartbeat.HEARTBEAT_FILE, beat.get("time")) if isinstance(beat, dict)
                      else (STATUS_FILE, status.updated))
    stamps = []
    with contextlib.suppress(OSError):
        stamps.append((folder.path / name).stat().st_mtime)
    with contextlib.suppress(TypeError, ValueError):
        stamps.append(float(recorded))
    if not stamps:
        return float("inf")
    return max(0.0, time.time() - max(stamps))


def _duration(seconds: float) -> str:
    """'5 minutes', '3 hours', '2 days' (whole units, rounded down)."""
    if not math.isfinite(seconds):
        return "a long time"  # no sign of life at all
    for unit, size, up_to in (("minute", 60, 120 * 60), ("hour", 3600, 48 * 3600), ("day", 86400, float("inf"))):
        if seconds < up_to:
            count = max(1, int(seconds // size))
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return "a long time"


def running_elsewhere(root: str | os.PathLike | None = None) -> list[Path]:
    """The runs directly under ``root`` that train on another host (started from the command line
    there, writing to shared storage) and were heard from lately, newest first."""
    root = resolve_root(root)
    try:
        folders = [RunFolder(p) for p, _ in _run_dirs(root)]
    except OSError:
        return []
    found = []
    for folder in folders:
        written = folder.status()
        if written is None or written.state is not RunState.RUNNING:
            continue
        status = run_status(folder.path)
        if status.state is RunState.RUNNING and _host(status, heartbeat.read(folder.path)) != heartbeat.this_host():
            found.append((status.started or 0, folder.path))
    return [path for _, path in sorted(found, key=lambda item: item[0], reverse=True)]


def other_host(run_dir: str | os.PathLike) -> str | None:
    """The host a run trains or trained on when that is not this machine (a run folder on shared storage), else None."""
    folder = RunFolder(run_dir)
    status = folder.status() or Status(RunState.FAILED)
    host = _host(status, heartbeat.read(folder.path))
    return None if host == heartbeat.this_host() else host


#: What status.json (and the first "runtime" progress event) say about where a run trains.
RUNTIME_FIELDS = ("host", "devices", "device_kind", "strategy", "replicas", "workers", "precision")


def runtime(run_dir: str | os.PathLike) -> dict:
    """Where a run trains or trained: the ``RUNTIME_FIELDS`` it recorded (status.json, else its
    "runtime" progress event, which outlives the status of a finished run); {} for a run from before."""
    folder = RunFolder(run_dir)
    status = folder.read_status_file() or {}  # the fields as written: the runtime's are not typed in Status
    found = {key: status[key] for key in RUNTIME_FIELDS if status.get(key) is not None}
    if len(found) < len(RUNTIME_FIELDS):
        event = next((e for e in folder.read_progress_events() if e.get("event") == "runtime"), {})
        found = {**{key: event[key] for key in RUNTIME_FIELDS if event.get(key) is not None}, **found}
    return found


def read_progress(run_dir: str | os.PathLike, now: float | None = None) -> dict:
    """The latest progress of a run, for a progress bar, as of ``now`` (default: the clock).

    An event's ``eta_s`` is the time left when it was written; here it counts down from then, and
    is None once spent while the stage goes on (a job that writes nothing for a while, e.g. while it
    builds the network, must not keep saying "about 4 s left").

    Returns:
        dict with ``stage`` (scan / split / extract / train / fine_tune / evaluate / save / export / done),
        ``done`` and ``total`` (units of the stage), ``fraction`` (0..1 of the stage), ``eta_s``
        (seconds left in the stage now, or None), ``epoch``/``epochs``, ``message`` and ``quiet_s``
        (seconds since the last event; None without events).
    """
    events = RunFolder(run_dir).read_progress_events()
    result: dict[str, Any] = {
        "stage": None, "done": 0, "total": 0, "fraction": 0.0, "eta_s": None,
        "epoch": 0, "epochs": 0, "batch": 0, "batches": 0, "message": "", "events": len(events),
        "quiet_s": None,
    }
    eta_time = None  # when the ETA in ``result`` was written
    for event in events:
        if event.get("eta_s") is not None:
            eta_time = event.get("time")
        kind = event.get("event")
        if kind == "stage":
            result.update(stage=event.get("stage"), message=event.get("message", ""), done=0,
                          total=event.get("total", 0) or 0, fraction=0.0, eta_s=None)
        elif kind == "extract":
            result.update(stage="extract", done=event.get("done", 0), total=event.get("total", 0),
                          eta_s=event.get("eta_s"))
        elif kind == "epoch":
            result.update(epoch=event.get("epoch", 0), epochs=event.get("epochs", 0),
                          done=event.get("epoch", 0), total=event.get("epochs", 0), eta_s=event.get("eta_s"))
        elif kind == "batch":
            # Within an epoch (long when fine-tuning on a CPU): the bar moves batch by batch.
            batches = event.get("batches") or 0
            within = (event.get("batch", 0) / batches) if batches else 0.0
            result.update(eta_s=event.get("eta_s"), batch=event.get("batch", 0), batches=batches,
                          done=result["epoch"] + within)
        elif (ended := RunState.parse(kind)) is not None and ended.is_finished:
            result.update(stage=ended.value, message=event.get("message", ""))
    if result["total"]:
        result["fraction"] = min(1.0, float(result["done"]) / float(result["total"]))
    now = time.time() if now is None else now
    times = [float(e["time"]) for e in events if isinstance(e.get("time"), (int, float))]
    if times:
        # max(0, ...): a run on another machine may write times a little ahead of this clock.
        result["quiet_s"] = max(0.0, now - max(times))
    if result["eta_s"] is not None and isinstance(eta_time, (int, float)):
        left = float(result["eta_s"]) - max(0.0, now - float(eta_time))
        result["eta_s"] = left if left > 0 else None
    return result


#: A validation AUC this close to 0.5 means the model ranks images no better than chance.
CHANCE_AUC_MARGIN = 0.1


def near_chance(auc: float | None) -> bool:
    """Whether an AUC is within ``CHANCE_AUC_MARGIN`` of 0.5 (None or NaN: unknown, not flagged)."""
    try:
        value = float(auc)
    except (TypeError, ValueError):
        return False
    return value == value and abs(value - 0.5) < CHANCE_AUC_MARGIN


@dataclass(frozen=True)
class RunSummary:
    """One row of the runs table."""

    run_id: str
    path: Path
    state: RunState
    message: str
    backbone: str
    data_dir: str
    split: str
    n_images: int | None
    best_val_auc: float | None
    test_auc: float | None
    duration_s: float | None
    started: float | None
    is_demo: bool
    #: The newest evaluation on a data set outside the run's split (the honest figure), if any.
    external_name: str | None = None
    external_auc: float | None = None
    external_accuracy: float | None = None
    #: The 95 % interval of ``external_auc`` stored with that evaluation, if any.
    external_auc_interval: tuple[float, float] | None = None
    recipe: str = ""
    #: The final model's AUC on the run's validation part (what the threshold was chosen on).
    val_auc: float | None = None
    #: The workspace the run belongs to ("" for a shared run; see ``cxr_core.hosting.workspaces``).
    owner: str = ""

    @property
    def learned_nothing(self) -> bool:
        """A finished run that ranks its validation images about as well as a coin (see ``near_chance``)."""
        return self.state is RunState.DONE and near_chance(self.val_auc)

    @property
    def warning(self) -> str:
        """One sentence for a run that learned nothing, else ""."""
        if not self.learned_nothing:
            return ""
        return (f"Run {self.run_id} learned nothing: its validation AUC is {self.val_auc:.2f}, about what a coin "
                "toss gives, so its predictions mean nothing.")

    def as_row(self) -> dict:
        return {
            "run": self.run_id, "status": "learned nothing" if self.learned_nothing else self.state,
            "backbone": self.backbone, "recipe": self.recipe,
            "data": Path(self.data_dir).name if self.data_dir else "", "split": self.split,
            "images": self.n_images,
            "external test set": self.external_name or "", "external AUC": self.external_auc,
            "external AUC 95 % CI": ("" if self.external_auc_interval is None
                                     else "{:.3f}–{:.3f}".format(*self.external_auc_interval)),
            "external accuracy": self.external_accuracy,
            "best val AUC": self.best_val_auc, "test AUC": self.test_auc,
            "duration (s)": None if self.duration_s is None else round(self.duration_s, 1),
            "started": (None if self.started is None
                        else _dt.datetime.fromtimestamp(self.started).strftime("%Y-%m-%d %H:%M")),
        }


def summarize_run(run_dir: str | os.PathLike, owner: str = "") -> RunSummary:
    folder = RunFolder(run_dir)
    run_dir = folder.path
    status = run_status(run_dir)
    config = folder.config_or_none()
    metrics = folder.metrics() or Metrics()
    history = folder.read_history()
    external = folder.headline_evaluation()
    best_val_auc = None
    if "val_auc" in history.columns and len(history):
        values = pd.to_numeric(history["val_auc"], errors="coerce").dropna()
        best_val_auc = float(values.max()) if len(values) else None
    val_auc = metrics.val_auc
    if val_auc is None:
        val_auc = best_val_auc
    started = status.started
    finished = status.finished or (time.time() if status.state is RunState.RUNNING else None)
    duration = (finished - started) if (started and finished) else metrics.duration_s
    return RunSummary(
        run_id=run_dir.name,
        path=run_dir,
        state=status.state,
        message=status.message,
        backbone=config.model.backbone if config else "",
        data_dir=config.data.data_dir if config else "",
        split=config.data.split if config else "",
        n_images=metrics.n_images,
        best_val_auc=best_val_auc,
        test_auc=metrics.test_auc,
        duration_s=duration,
        # A queued run has not started: listed by when it was submitted.
        started=started if started or status.state is not RunState.QUEUED else status.submitted,
        is_demo=run_dir.resolve() == demo_run_dir().resolve(),
        external_name=external.name if external else None,
        external_auc=external.roc_auc if external else None,
        external_accuracy=external.accuracy if external else None,
        external_auc_interval=(stored_intervals(external.raw).get("roc_auc") if external else None),
        recipe=config.train.recipe if config else "",
        val_auc=val_auc,
        owner=owner,
    )


def list_runs(root: str | os.PathLike | None = None, include_demo: bool = True, *,
              workspace: str | None = None, everyone: bool = False) -> list[RunSummary]:
    """Every shared run under ``root`` (newest first), plus the runs of ``workspace`` (a visitor's own;
    see ``cxr_core.hosting.workspaces``), or of every workspace when ``everyone`` (the operator), plus the
    shipped demo run when it exists."""
    root = resolve_root(root)
    dirs = _run_dirs(root)
    spaces = root / WORKSPACES_DIR
    if everyone and spaces.is_dir():
        for space in spaces.iterdir():
            if space.is_dir() and not space.name.startswith("."):
                dirs += [(p, space.name) for p, _ in _run_dirs(space)]
    elif workspace:
        dirs += [(p, workspace) for p, _ in _run_dirs(spaces / workspace)]
    summaries = [summarize_run(p, owner=owner) for p, owner in dirs]
    summaries.sort(key=lambda s: (s.started or 0, s.run_id), reverse=True)
    demo = demo_run_dir()
    if include_demo and RunFolder(demo).has_model():
        summaries.append(summarize_run(demo))
    return summaries


def _run_dirs(folder: Path) -> list[tuple[Path, str]]:
    """The run folders directly in ``folder`` (hidden folders and the workspaces folder are not runs)."""
    if not folder.is_dir():
        return []
    return [(p, "") for p in folder.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name != WORKSPACES_DIR]


def delete_run(run_dir: str | os.PathLike, *, queued_ok: bool = False) -> None:
    """Delete a run folder. Refuses the shipped demo run, a run that is still running, and one waiting
    in the training queue unless ``queued_ok`` (``job_queue.withdraw``, which also takes it out of the queue)."""
    run_dir = Path(run_dir)
    if run_dir.resolve() == demo_run_dir().resolve():
        raise BadRunError("The shipped demo run cannot be deleted from the app.")
    state = run_status(run_dir).state
    if state is RunState.RUNNING:
        raise BadRunError(f"Run {run_dir.name} is still running; cancel it before deleting it.")
    if state is RunState.QUEUED and not queued_ok:
        raise BadRunError(f"Run {run_dir.name} is waiting in the training queue; withdraw it instead.")
    # Rename first so a half-deleted folder never looks like a run.
    trash = run_dir.with_name(f".deleting-{run_dir.name}-{os.getpid()}")
    try:
        os.replace(run_dir, trash)
    except FileNotFoundError:
        raise BadRunError(f"Run {run_dir.name} no longer exists; it may have been deleted already.") from None
    except OSError as error:
        # Windows refuses to rename a folder while a file in it is open (a model another process loaded).
        raise BadRunError(f"Run {run_dir.name} could not be deleted because a file in it is in use "
                          f"({error.strerror or error}); close what uses it and try again.") from error
    shutil.rmtree(trash, ignore_errors=True)
