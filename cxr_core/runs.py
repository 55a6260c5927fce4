"""Run folders: where they live, what state they are in, listing and deletion.

A run folder is self-describing (see docs/ARCHITECTURE.md). Its ``status.json`` says
running / done / failed / cancelled. A process killed without warning cannot update its status,
so a run that says "running" but whose process is gone reads as "failed" here: no run is ever
shown as done without a loadable model, and none is shown as running forever.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .atomic import read_json, read_jsonl, write_json_atomic
from .errors import BadRunError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS_DIR = PROJECT_ROOT / "artifacts"
DEFAULT_RUNS_DIR = ARTIFACTS_DIR / "runs"
#: The shipped demo run (trained from scratch on the real Kermany images; see its MODEL_CARD.md).
DEMO_RUN_DIR = ARTIFACTS_DIR / "demo-mobilenet"


def demo_run_dir() -> Path:
    """The demo run: ``$CXR_DEMO_RUN`` when set (a deployment may ship its own; tests hide it),
    else ``DEMO_RUN_DIR``."""
    return Path(os.environ.get("CXR_DEMO_RUN") or DEMO_RUN_DIR).expanduser()

STATES = ("running", "done", "failed", "cancelled")
CANCEL_FILE = "cancel.request"
MODEL_FILE = "model.keras"


@dataclass(frozen=True)
class RunsRoot:
    """Where user runs are kept; ``fallback`` is True when the usual place was read-only."""

    path: Path
    fallback: bool = False
    reason: str = ""


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-", delete=True)
        probe.close()
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


def new_run_dir(root: Path | None = None, hint: str = "run") -> Path:
    """Create and return a new, empty run folder named ``<UTC time>-<hint>``."""
    root = Path(root) if root is not None else runs_root().path
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


def write_status(run_dir: Path, state: str, **fields: Any) -> dict:
    """Replace ``status.json`` with ``state`` plus ``fields`` (keeps started time and pid)."""
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}")
    previous = read_json(Path(run_dir) / "status.json", default={}) or {}
    status = {
        "state": state,
        "pid": fields.pop("pid", previous.get("pid", os.getpid())),
        "started": previous.get("started", time.time()),
        "updated": time.time(),
    }
    if state != "running":
        status["finished"] = time.time()
    status.update(fields)
    write_json_atomic(Path(run_dir) / "status.json", status)
    return status


def _pid_alive(pid: Any) -> bool:
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped) still answers kill(0); it is not running.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def read_status(run_dir: str | os.PathLike) -> dict:
    """The run's status, reconciled with reality.

    Returns a dict with at least ``state`` and ``message``. A "running" run whose process is gone
    reads as "failed" (it was killed); a "done" run without its model reads as "failed" too.
    """
    run_dir = Path(run_dir)
    status = read_json(run_dir / "status.json", default=None)
    if not isinstance(status, dict) or status.get("state") not in STATES:
        if (run_dir / MODEL_FILE).is_file() and (run_dir / "config.json").is_file():
            # A run folder made by hand or by an older version: a model and a config are enough.
            return {"state": "done", "message": "finished (no status file)"}
        return {"state": "failed", "message": "the run folder has no readable status.json", "error": "missing status"}
    status = dict(status)
    if status["state"] == "running" and not _pid_alive(status.get("pid")):
        status["state"] = "failed"
        status["error"] = status.get("error") or "the training process stopped without finishing (killed or crashed)"
    if status["state"] == "done" and not (run_dir / MODEL_FILE).is_file():
        status["state"] = "failed"
        status["error"] = "model.keras is missing"
    status.setdefault("message", status.get("error") or status["state"])
    return status


def request_cancel_file(run_dir: Path) -> Path:
    return Path(run_dir) / CANCEL_FILE


def read_progress(run_dir: str | os.PathLike) -> dict:
    """The latest progress of a run, for a progress bar.

    Returns:
        dict with ``stage`` (scan / split / extract / train / fine_tune / evaluate / save / export / done),
        ``done`` and ``total`` (units of the stage), ``fraction`` (0..1 of the stage), ``eta_s``
        (seconds left in the stage, or None), ``epoch``/``epochs`` and ``message``.
    """
    events = read_jsonl(Path(run_dir) / "progress.jsonl")
    result: dict[str, Any] = {
        "stage": None, "done": 0, "total": 0, "fraction": 0.0, "eta_s": None,
        "epoch": 0, "epochs": 0, "batch": 0, "batches": 0, "message": "", "events": len(events),
    }
    for event in events:
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
        elif kind in ("done", "failed", "cancelled"):
            result.update(stage=kind, message=event.get("message", ""))
    if result["total"]:
        result["fraction"] = min(1.0, float(result["done"]) / float(result["total"]))
    return result


HISTORY_COLUMNS = [
    "phase", "epoch", "loss", "accuracy", "auc", "precision", "recall",
    "val_loss", "val_accuracy", "val_auc", "val_precision", "val_recall", "seconds",
]


def read_history(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Per-epoch history (empty frame with the usual columns when there is none yet)."""
    path = Path(run_dir) / "history.csv"
    try:
        frame = pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError, pd.errors.ParserError):
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    return frame


def read_metrics(run_dir: str | os.PathLike) -> dict | None:
    metrics = read_json(Path(run_dir) / "metrics.json", default=None)
    return metrics if isinstance(metrics, dict) else None


def read_predictions(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Validation and test predictions of a run: path, y, probability, split."""
    try:
        return pd.read_csv(Path(run_dir) / "predictions.csv")
    except (FileNotFoundError, pd.errors.EmptyDataError, pd.errors.ParserError):
        return pd.DataFrame(columns=["path", "y", "probability", "split"])


def read_config_dict(run_dir: str | os.PathLike) -> dict:
    config = read_json(Path(run_dir) / "config.json", default=None)
    return config if isinstance(config, dict) else {}


@dataclass(frozen=True)
class RunSummary:
    """One row of the runs table."""

    run_id: str
    path: Path
    state: str
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

    def as_row(self) -> dict:
        return {
            "run": self.run_id, "status": self.state, "backbone": self.backbone,
            "data": Path(self.data_dir).name if self.data_dir else "", "split": self.split,
            "images": self.n_images, "best val AUC": self.best_val_auc, "test AUC": self.test_auc,
            "duration (s)": None if self.duration_s is None else round(self.duration_s, 1),
            "started": None if self.started is None else _dt.datetime.fromtimestamp(self.started).strftime("%Y-%m-%d %H:%M"),
        }


def summarize_run(run_dir: str | os.PathLike) -> RunSummary:
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    config = read_config_dict(run_dir)
    metrics = read_metrics(run_dir) or {}
    history = read_history(run_dir)
    best_val_auc = None
    if "val_auc" in history.columns and len(history):
        values = pd.to_numeric(history["val_auc"], errors="coerce").dropna()
        best_val_auc = float(values.max()) if len(values) else None
    test_auc = (((metrics.get("test") or {}).get("at_threshold") or {}).get("roc_auc"))
    started = status.get("started")
    finished = status.get("finished") or (time.time() if status.get("state") == "running" else None)
    duration = (finished - started) if (started and finished) else metrics.get("duration_s")
    return RunSummary(
        run_id=run_dir.name,
        path=run_dir,
        state=status["state"],
        message=str(status.get("message", "")),
        backbone=str((config.get("model") or {}).get("backbone", "")),
        data_dir=str((config.get("data") or {}).get("data_dir", "")),
        split=str((config.get("data") or {}).get("split", "")),
        n_images=metrics.get("n_images"),
        best_val_auc=best_val_auc,
        test_auc=test_auc,
        duration_s=duration,
        started=started,
        is_demo=run_dir.resolve() == demo_run_dir().resolve(),
    )


def list_runs(root: str | os.PathLike | None = None, include_demo: bool = True) -> list[RunSummary]:
    """Every run under ``root`` (newest first), plus the shipped demo run when it exists."""
    root = Path(root) if root is not None else runs_root().path
    dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    summaries = [summarize_run(p) for p in dirs]
    summaries.sort(key=lambda s: (s.started or 0, s.run_id), reverse=True)
    demo = demo_run_dir()
    if include_demo and (demo / MODEL_FILE).is_file():
        summaries.append(summarize_run(demo))
    return summaries


def finished_runs(root: str | os.PathLike | None = None) -> list[RunSummary]:
    """Runs that are done and have a model."""
    return [s for s in list_runs(root) if s.state == "done"]


def delete_run(run_dir: str | os.PathLike) -> None:
    """Delete a run folder. Refuses the shipped demo run and a run that is still running."""
    run_dir = Path(run_dir)
    if run_dir.resolve() == demo_run_dir().resolve():
        raise BadRunError("The shipped demo run cannot be deleted from the app.")
    if read_status(run_dir)["state"] == "running":
        raise BadRunError(f"Run {run_dir.name} is still running; cancel it before deleting it.")
    # Rename first so a half-deleted folder never looks like a run.
    trash = run_dir.with_name(f".deleting-{run_dir.name}-{os.getpid()}")
    os.replace(run_dir, trash)
    shutil.rmtree(trash, ignore_errors=True)
