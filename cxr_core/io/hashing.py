"""Content hashes: the identity of an image (duplicates, cache keys, training overlap) and of a
model file (a LiteRT export is used only while its source is unchanged)."""
from __future__ import annotations

import hashlib
import os
import threading

_file_hashes: dict[tuple[str, int, int], str] = {}
_file_hashes_lock = threading.Lock()


def bytes_sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, memoised by path, size and modification time.

    Raises:
        OSError: when the file cannot be read.
    """
    stat = os.stat(path)
    key = (os.fspath(path), stat.st_size, stat.st_mtime_ns)
    with _file_hashes_lock:
        if key in _file_hashes:
            return _file_hashes[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _file_hashes_lock:
        _file_hashes[key] = value
    return value
