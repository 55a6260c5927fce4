"""A workspace per visitor on a hosted app: where their runs go, how much disk they may use, when they expire.

Layout: the operator's shared runs sit directly in the runs root (as on a laptop); a visitor's runs sit in
``<runs root>/workspaces/<workspace id>/``. A workspace id is derived from the signed-in e-mail address
(hashed: no address appears in a path) or is a random id kept in the visitor's browser. Visitors use the
shared runs but change only their own; the rules of who may do what are in ``cxr_core.hosting.access``.

Workspaces untouched for ``CXR_WORKSPACE_DAYS`` (default 7) are removed by ``expire``, except one with a
run still training or waiting in the queue. Each has a size limit (``limit_mb``), read from the disk the
runs root is on unless the operator sets ``CXR_WORKSPACE_MB``.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from cxr_core.core.errors import BadSettingError, CxrError
from cxr_core.hosting.resources import positive_int_setting
from cxr_core.io.atomic import write_bytes_atomic
from cxr_core.runs.registry import WORKSPACES_DIR, resolve_root, run_status

LAST_USED_FILE = ".last-used"
ENV_DAYS = "CXR_WORKSPACE_DAYS"
ENV_MB = "CXR_WORKSPACE_MB"
DEFAULT_DAYS = 7.0
MB = 1024 * 1024
#: Without an operator's setting, one workspace may take this share of the free disk, within these bounds:
#: a class of about thirty leaves a third of the disk free even if everyone fills theirs.
DISK_SHARE = 1 / 50
MIN_MB, MAX_MB = 100, 2048
_ID = re.compile(r"^[a-z]-[0-9a-f]{16,32}$")


class WorkspaceFullError(CxrError):
    """A visitor's workspace has reached its size limit."""


def id_for_email(email: str) -> str:
    """The workspace of a signed-in user: a hash of the address, so that no path or log shows it."""
    return "u-" + hashlib.sha256(email.strip().casefold().encode("utf-8")).hexdigest()[:24]


def new_browser_id() -> str:
    """A fresh random id for a visitor who is not signed in (kept in their browser)."""
    return "b-" + secrets.token_hex(12)


def valid_id(value: str | None) -> bool:
    """Whether ``value`` is a workspace id this module made (a cookie could hold anything)."""
    return bool(value) and bool(_ID.match(str(value)))


def workspaces_dir(root: str | os.PathLike | None = None) -> Path:
    return resolve_root(root) / WORKSPACES_DIR


def folder(workspace: str, root: str | os.PathLike | None = None, touch: bool = True) -> Path:
    """The workspace's folder (created), marked as used now unless ``touch`` is False."""
    if not valid_id(workspace):
        raise ValueError(f"not a workspace id: {workspace!r}")
    path = workspaces_dir(root) / workspace
    path.mkdir(parents=True, exist_ok=True)
    if touch:
        write_bytes_atomic(path / LAST_USED_FILE, str(time.time()).encode())
    return path


def owner_of(run_dir: str | os.PathLike, root: str | os.PathLike | None = None) -> str | None:
    """The workspace a run folder belongs to, or None for a shared run (or one outside the runs root)."""
    try:
        relative = Path(run_dir).resolve().relative_to(workspaces_dir(root).resolve())
    except ValueError:
        return None
    return relative.parts[0] if len(relative.parts) >= 2 and valid_id(relative.parts[0]) else None


def run_folders(workspace: str, root: str | os.PathLike | None = None) -> list[Path]:
    path = workspaces_dir(root) / workspace
    return [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")] if path.is_dir() else []


def all_workspaces(root: str | os.PathLike | None = None) -> list[str]:
    path = workspaces_dir(root)
    return sorted(p.name for p in path.iterdir() if p.is_dir() and valid_id(p.name)) if path.is_dir() else []


def size_bytes(workspace: str, root: str | os.PathLike | None = None) -> int:
    total = 0
    for directory, _, files in os.walk(workspaces_dir(root) / workspace):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed while we counted
                total += os.stat(os.path.join(directory, name)).st_size
    return total


def limit_mb(root: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
             free_bytes: int | None = None) -> int:
    """The size limit of one workspace in MB: ``$CXR_WORKSPACE_MB`` when set, else a share of the free disk.

    Raises:
        BadSettingError: ``$CXR_WORKSPACE_MB`` is not a whole number above 0.
    """
    wanted = positive_int_setting(ENV_MB, env, unit=" of megabytes")
    if wanted is not None:
        return wanted
    if free_bytes is None:
        free_bytes = shutil.disk_usage(resolve_root(root)).free
    return int(max(MIN_MB, min(MAX_MB, free_bytes * DISK_SHARE // MB)))


def max_age_days(env: Mapping[str, str] | None = None) -> float:
    """How long an unused workspace is kept: ``$CXR_WORKSPACE_DAYS`` (default 7).

    Raises:
        BadSettingError: the setting is not a number above 0.
    """
    env = os.environ if env is None else env
    wanted = env.get(ENV_DAYS, "").strip()
    if not wanted:
        return DEFAULT_DAYS
    try:
        days = float(wanted)
    except ValueError:
        days = -1.0
    if not days > 0:
        raise BadSettingError(f"{ENV_DAYS} must be a number of days above 0, not {wanted!r}; fix or unset it.")
    return days


def check_room(workspace: str, root: str | os.PathLike | None = None, limit: int | None = None) -> None:
    """Refuse a new run when the workspace is full.

    Raises:
        WorkspaceFullError: one sentence with the limit.
    """
    limit = limit_mb(root) if limit is None else limit
    used = size_bytes(workspace, root) / MB
    if used >= limit:
        raise WorkspaceFullError(f"Your workspace holds {used:,.0f} MB of runs and its limit is {limit:,} MB; "
                                 "delete one of your runs before starting another.")


def _busy(workspace: str, root: str | os.PathLike | None) -> bool:
    return any(run_status(run).state.is_active for run in run_folders(workspace, root))


def last_used(workspace: str, root: str | os.PathLike | None = None) -> float:
    path = workspaces_dir(root) / workspace
    try:
        return float((path / LAST_USED_FILE).read_text().strip())
    except (OSError, ValueError):
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0


def expire(root: str | os.PathLike | None = None, days: float | None = None, now: float | None = None) -> list[str]:
    """Remove workspaces unused for ``days`` (default ``max_age_days()``) with nothing training or
    queued; returns the ids removed. Renamed first, so a half-removed workspace never shows."""
    days = max_age_days() if days is None else days
    cutoff = (time.time() if now is None else now) - days * 86400
    removed = []
    for workspace in all_workspaces(root):
        if last_used(workspace, root) >= cutoff or _busy(workspace, root):
            continue
        path = workspaces_dir(root) / workspace
        trash = path.with_name(f".expired-{workspace}-{os.getpid()}")
        try:
            os.replace(path, trash)
        except OSError:
            continue  # in use (Windows) or already gone: try again next time
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(workspace)
    return removed
