"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file in a run folder and in the feature cache goes through these helpers, so a process killed
at any moment (SIGKILL, power loss, disk full) leaves no half-written file behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator

_WINDOWS = os.name == "nt"


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace(source: Path, target: Path) -> None:
    """``os.replace``; on Windows a file another process has open (the app reading status.json at that
    instant) cannot be replaced, so wait for the reader a moment: readers hold files for microseconds."""
    for wait in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if not _WINDOWS:
                raise
            time.sleep(wait)
    os.replace(source, target)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    Use it for writers that want a file name (``model.save``, ``np.save``). On any exception the
    temporary file is removed and ``path`` is left as it was.

    Args:
        path: the final file.
        suffix: suffix for the temporary name (some writers check the extension); defaults to
            the final file's suffix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the final suffix: Keras picks the format from it.
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.tmp-", suffix=path.suffix if suffix is None else suffix, dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes 0600 files; run folders are meant to be read by others (a web server, a team).
    os.chmod(tmp, 0o644)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        _replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def write_stream_atomic(path: str | os.PathLike, stream: IO[bytes], head: bytes = b"", chunk: int = 1 << 20) -> None:
    """Write ``head`` then the rest of the binary file object ``stream`` to ``path`` atomically, ``chunk``
    bytes at a time (an upload of hundreds of megabytes is never held in memory twice)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(head)
        shutil.copyfileobj(stream, handle, chunk)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line to ``path`` and flush it to disk.

    An append cannot be made atomic by rename; instead readers (``read_jsonl``) ignore a last
    line that was cut off, so a kill mid-write loses at most that one event.
    """
    line = json.dumps(obj, default=json_default) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file written by ``append_jsonl``; skips a torn or corrupt line."""
    events: list[dict] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if not line:
                    continue
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return events


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """Read a JSON file; return ``default`` when it is missing or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError):
        return default


def json_default(obj: Any) -> Any:
    """``json.dumps``' ``default`` for the run files: numpy scalars and arrays, paths and sets (they appear in
    metrics and configs); TypeError for anything else, so that nothing unknown is written silently."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable")


def sweep_stale_temps(directory: str | os.PathLike, older_than_s: float = 3600.0) -> int:
    """Remove temporary files that a killed writer left behind (``.<name>.tmp-*``).

    Only files older than ``older_than_s`` go, so a writer still at work in another process keeps
    its file. Returns how many were removed.
    """

    removed = 0
    cutoff = time.time() - older_than_s
    for path in Path(directory).rglob(".*.tmp-*"):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except OSError:
            continue
    return removed
