"""The audit trail: who started, cancelled or deleted what, and when, in ``audit.jsonl`` in the runs root.

Append-only JSON lines (``atomic.append_jsonl``), so the log survives restarts and a torn last line
costs one entry. ``who`` is an e-mail address, else the browser id the browser keeps in its signed cookie
(the same for every session of that browser, operator or visitor), else an anonymous session id; never a
passphrase. Signing in as the operator, signing out, every wrong passphrase and every lockout are recorded
too (an attempt refused unchecked during a lockout is not: a script could fill the disk with them).
"""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cxr_core.io import atomic
from cxr_core.runs import registry as runs

AUDIT_FILE = "audit.jsonl"
ACTIONS = ("start", "withdraw", "cancel", "delete", "download", "unpack", "practice", "weights", "jobs at once",
           "sign in", "sign out", "wrong passphrase", "lockout", "shortcut lab",
           "locked test set", "daily submissions", "submit", "reveal")


def audit_path(root: str | os.PathLike | None = None) -> Path:
    return Path(root if root is not None else runs.runs_root().path) / AUDIT_FILE


def record(action: str, target: str, *, role: str, who: str, root: str | os.PathLike | None = None) -> None:
    """Append one entry; ``target`` names the run or the data set."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    path = audit_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.append_jsonl(path, {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                               "role": role, "who": who, "action": action, "target": str(target)})


def read(root: str | os.PathLike | None = None, limit: int = 200) -> list[dict]:
    """The newest ``limit`` entries, newest first."""
    path = audit_path(root)
    entries = atomic.read_jsonl(path) if path.is_file() else []
    return entries[::-1][:limit]
