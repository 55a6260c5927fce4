"""The class's locked test set: one data set of the data root that visitors may be scored on but never look at.

The operator names one folder of the data root (``$CXR_DATA_ROOT``) as the locked test set. A visitor never
sees its images, labels or per-image results: it is not offered as a data set to browse, train on or evaluate
on, and a run's stored evaluations on it are not shown to them; the leaderboard (``hosting.leaderboard``)
scores their runs on it on the server. Every place where a data set enters from a person asks this module
(``visible_datasets``, ``is_locked``, ``check_visible``), so there is one rule.

The choice lives in ``<runs root>/.classroom.json`` ({"locked_test_set", "daily_submissions", "revealed"}),
written atomically under a file lock; a missing or unreadable file means no locked set and the defaults.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from filelock import FileLock, Timeout

from cxr_core.core.errors import CxrError
from cxr_core.hosting.access import OPERATOR
from cxr_core.io.atomic import read_json, write_json_atomic
from cxr_core.runs.registry import resolve_root
from cxr_core.runs.run_folder import evaluation_name

log = logging.getLogger(__name__)

SETTINGS_FILE = ".classroom.json"
LOCK_FILE = ".classroom.lock"
DEFAULT_DAILY = 3
MAX_DAILY = 50
LOCK_TIMEOUT_S = 10.0
#: What a visitor reads wherever the locked set was asked for (a link, a session value, a lesson).
LOCKED_SENTENCE = ("That data set is the class's locked test set: only the leaderboard scores runs on it, so its "
                   "images and labels stay hidden.")


class LockedTestSetError(CxrError):
    """A visitor asked for the locked test set, or a classroom setting was not one that can be used."""


@dataclasses.dataclass(frozen=True)
class Classroom:
    """The operator's classroom settings."""

    locked_test_set: str = ""            # a folder name under the data root; "" for none
    daily_submissions: int = DEFAULT_DAILY  # per visitor per calendar day (UTC)
    revealed: bool = False               # visitors may see their own submissions' per-image results


def settings_path(root: str | os.PathLike | None = None) -> Path:
    return resolve_root(root) / SETTINGS_FILE


def read(root: str | os.PathLike | None = None) -> Classroom:
    """The settings; the defaults (no locked set) when the file is missing or cannot be read."""
    raw = read_json(settings_path(root), default=None)
    if not isinstance(raw, dict):
        return Classroom()
    name = str(raw.get("locked_test_set") or "")
    try:
        daily = _daily(raw.get("daily_submissions", DEFAULT_DAILY))
    except LockedTestSetError:
        log.warning("%s holds an unusable daily limit; using %d.", settings_path(root), DEFAULT_DAILY)
        daily = DEFAULT_DAILY
    return Classroom(locked_test_set=name if _plain_name(name) else "", daily_submissions=daily,
                     revealed=raw.get("revealed") is True)


def _plain_name(name: str) -> bool:
    """A folder directly under the data root: no separator, not '.' or '..', not hidden."""
    return bool(name) and Path(name).name == name and name not in (".", "..") and not name.startswith((".", "_"))


def _daily(value: object) -> int:
    try:
        number = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise LockedTestSetError(f"The daily number of submissions must be a whole number; got {value!r}.") from None
    if not 1 <= number <= MAX_DAILY:
        raise LockedTestSetError(f"The daily number of submissions must be between 1 and {MAX_DAILY}; got {number}.")
    return number


def update(root: str | os.PathLike | None = None, *, locked_test_set: str | None = None,
           daily_submissions: int | None = None, revealed: bool | None = None) -> Classroom:
    """Change some settings (the others are kept) and write the file; returns the new settings.

    Raises:
        LockedTestSetError: a name that is not a plain folder name, a limit out of range, or the file stayed
            locked by another writer.
    """
    if locked_test_set is not None and locked_test_set and not _plain_name(locked_test_set):
        raise LockedTestSetError(f"The locked test set must be a folder directly under the data folder; got "
                                 f"{locked_test_set!r}.")
    path = settings_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(path.parent / LOCK_FILE), timeout=LOCK_TIMEOUT_S):
            current = read(root)
            changed = dataclasses.replace(
                current,
                **({} if locked_test_set is None else {"locked_test_set": locked_test_set}),
                **({} if daily_submissions is None else {"daily_submissions": _daily(daily_submissions)}),
                **({} if revealed is None else {"revealed": bool(revealed)}))
            write_json_atomic(path, dataclasses.asdict(changed))
    except Timeout:
        raise LockedTestSetError("The classroom settings are being changed elsewhere; try again in a moment.") from None
    return changed


def locked_name(root: str | os.PathLike | None = None) -> str:
    """The locked test set's folder name, or "" when none is chosen."""
    return read(root).locked_test_set


def hides(role: str) -> bool:
    """Whether the locked set is hidden from ``role`` (from everyone but the operator)."""
    return role != OPERATOR


def is_locked(path: str | os.PathLike | None, data_root: str | os.PathLike, root: str | os.PathLike | None = None,
              locked: str | None = None) -> bool:
    """Whether ``path`` is the locked test set or lies inside it. ``path`` is a folder name under
    ``data_root`` or a path (links and relative spellings are resolved, so ``data/./x`` or a symbolic link
    to the folder is the folder). ``locked``: the locked name when already read."""
    name = locked_name(root) if locked is None else locked
    if not name or path is None or not str(path):
        return False
    given = Path(os.fspath(path)).expanduser()
    if not given.is_absolute():
        given = Path(data_root) / given
    target = (Path(data_root) / name).resolve()
    found = given.resolve()
    return found == target or target in found.parents


def visible_datasets(names: Iterable[str], role: str, data_root: str | os.PathLike,
                     root: str | os.PathLike | None = None) -> list[str]:
    """``names`` (folders of the data root) that ``role`` may choose: all for the operator, all but the
    locked set for a visitor."""
    names = list(names)
    if not hides(role):
        return names
    locked = locked_name(root)
    return [n for n in names if not is_locked(n, data_root, root, locked=locked)]


def check_visible(path: str | os.PathLike | None, role: str, data_root: str | os.PathLike,
                  root: str | os.PathLike | None = None) -> None:
    """Raise ``LockedTestSetError`` (one sentence) when ``role`` may not use ``path``."""
    if hides(role) and is_locked(path, data_root, root):
        raise LockedTestSetError(LOCKED_SENTENCE)


def hidden_evaluation(name: str, role: str, data_root: str | os.PathLike,
                      root: str | os.PathLike | None = None) -> bool:
    """Whether a run's stored evaluation called ``name`` (``run_folder.evaluation_name``) is on the locked
    set and so not shown to ``role``."""
    if not hides(role):
        return False
    locked = locked_name(root)
    return bool(locked) and name == evaluation_name(Path(data_root) / locked)
