"""The memory this server really has, the upload size it can take, and where large uploads wait.

A container sees its host's memory in ``/proc/meminfo`` but is killed at its cgroup's limit (a small
hosted app has 690 MB for everything), so the limit is read from the cgroup first. Streamlit holds
an upload in the server's memory while it arrives; the upload limit is sized so that two visitors
uploading at once still fit beside the app itself. An accepted archive is moved to disk at once
(``save_upload``) and only one archive is unpacked at a time (``unpack_slot``).
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Iterator

import psutil
from filelock import FileLock, Timeout

from cxr_core.core.errors import BadSettingError, ServerBusyError
from cxr_core.io.atomic import write_stream_atomic

MB = 2**20
ENV_MAX_UPLOAD = "CXR_MAX_UPLOAD_MB"
# The server with a model loaded and a data set open stays under 300 MB (benchmarks/soak.py); the
# rest is headroom for a page's work (a scan, a Grad-CAM).
APP_RESERVE_MB = 400
CONCURRENT_UPLOADS = 2   # two visitors uploading at once must still fit
# Streamlit's upload route reads the whole file into memory, briefly twice (a 288 MB zip raised the
# server by 581 MB at its peak: benchmarks/upload_memory.py).
COPIES_WHILE_RECEIVED = 2
MIN_UPLOAD_MB = 16       # a class-folder zip of a few hundred X-rays
SPOOL_FOLDER = ".uploads"  # under the data root: hidden from the data set list, on the same disk
UNPACK_LOCK = "unpack.lock"
SPOOL_MAX_AGE_S = 24 * 3600
CHUNK_BYTES = 1 << 20
_NO_LIMIT = 1 << 60  # cgroup v1 writes a huge number for "no limit"


def positive_int_setting(name: str, env: Mapping[str, str] | None = None, unit: str = "") -> int | None:
    """An operator's whole-number setting from the environment (or a top-level secret, which Streamlit
    copies there); None when unset.

    Raises:
        BadSettingError: it is set but not a whole number above 0 (one sentence naming it).
    """
    wanted = (os.environ if env is None else env).get(name, "").strip()
    if not wanted:
        return None
    if not wanted.isdigit() or int(wanted) <= 0:
        raise BadSettingError(f"{name} must be a whole number{unit} above 0, not {wanted!r}; fix or unset it.")
    return int(wanted)


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.isdigit():  # "max" (cgroup v2: no limit) or anything unexpected
        return None
    value = int(text)
    return value if 0 < value < _NO_LIMIT else None


def _cgroup_limit_files(cgroup_root: Path, proc_cgroup: Path) -> list[Path]:
    """The limit files of this process's cgroup and of its ancestors (each one's limit applies)."""
    files = [cgroup_root / "memory.max", cgroup_root / "memory" / "memory.limit_in_bytes"]
    try:
        lines = proc_cgroup.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hierarchy, controllers, group = parts
        if controllers == "":
            base, name = cgroup_root, "memory.max"                                  # cgroup v2
        elif "memory" in controllers.split(","):
            base, name = cgroup_root / "memory", "memory.limit_in_bytes"            # cgroup v1
        else:
            continue
        relative = Path(group.strip().lstrip("/"))
        for ancestor in [relative, *relative.parents]:
            files.append(base / ancestor / name)
    return files


def memory_limit_bytes(cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
                       proc_cgroup: str | os.PathLike = "/proc/self/cgroup") -> int:
    """The memory this server may use: its container's limit (cgroup v2 ``memory.max``, v1
    ``memory.limit_in_bytes``, the smallest one found) when below the machine's memory, else the
    machine's physical memory (psutil; also on Windows and macOS, which have no cgroups)."""

    physical = int(psutil.virtual_memory().total)
    limits = [value for path in _cgroup_limit_files(Path(cgroup_root), Path(proc_cgroup))
              if (value := _read_limit(path)) is not None]
    return min([physical, *limits])


def upload_limit_mb(memory_bytes: int | None = None, server_max_mb: int = 1024,
                    env: Mapping[str, str] | None = None) -> int:
    """The largest upload, in MB, this server can hold: ``$CXR_MAX_UPLOAD_MB`` when set, else what is
    left of its memory after the app itself, shared by two concurrent uploads that each briefly take
    twice their size; never above
    ``server_max_mb`` (Streamlit's ``server.maxUploadSize``, which its server enforces).

    Raises:
        BadSettingError: ``$CXR_MAX_UPLOAD_MB`` is not a whole number above 0.
    """
    wanted = positive_int_setting(ENV_MAX_UPLOAD, env, unit=" of megabytes")
    if wanted is not None:
        return min(wanted, server_max_mb)
    memory_mb = (memory_limit_bytes() if memory_bytes is None else memory_bytes) // MB
    share = (memory_mb - APP_RESERVE_MB) // (CONCURRENT_UPLOADS * COPIES_WHILE_RECEIVED)
    return int(max(MIN_UPLOAD_MB, min(server_max_mb, share)))


def spool_folder(data_root: str | os.PathLike) -> Path:
    return Path(data_root) / SPOOL_FOLDER


def save_upload(source: IO[bytes], data_root: str | os.PathLike, suffix: str = ".zip") -> Path:
    """Copy an upload (a binary file object) to a new file in the data root's spool folder, in
    chunks, atomically; returns its path. Spooled files older than a day are removed first.

    Raises:
        OSError: the disk is full or the folder cannot be written (nothing is left behind).
    """
    folder = spool_folder(data_root)
    folder.mkdir(parents=True, exist_ok=True)
    sweep_spool(data_root)
    target = folder / f"{uuid.uuid4().hex}{suffix}"
    with contextlib.suppress(AttributeError, OSError):
        source.seek(0)
    write_stream_atomic(target, source, chunk=CHUNK_BYTES)
    return target


def sweep_spool(data_root: str | os.PathLike, older_than_s: float = SPOOL_MAX_AGE_S) -> int:
    """Remove spooled uploads that nobody unpacked within ``older_than_s``; returns how many."""
    removed, cutoff = 0, time.time() - older_than_s
    folder = spool_folder(data_root)
    for path in folder.glob("*") if folder.is_dir() else []:
        with contextlib.suppress(OSError):
            if path.is_file() and path.name != UNPACK_LOCK and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
    return removed


@contextlib.contextmanager
def unpack_slot(data_root: str | os.PathLike) -> Iterator[None]:
    """Hold the server's one slot for unpacking an archive (a lock file in the data root, so it
    holds across processes and sessions).

    Raises:
        ServerBusyError: another archive is being unpacked.
    """

    folder = spool_folder(data_root)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / UNPACK_LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout as error:
        raise ServerBusyError(
            "Another archive is being unpacked on this server; try again when it has finished.") from error
    try:
        yield
    finally:
        lock.release()


# --- Uploads per minute ---------------------------------------------------------------------------
ENV_UPLOADS_PER_MINUTE = "CXR_UPLOADS_PER_MINUTE"
#: Each uploaded image costs a decode, a prediction and a Grad-CAM (a fraction of a second of one core):
#: this many per core and minute keeps one visitor from taking the server from the others.
UPLOADS_PER_CORE_MINUTE = 20


def uploads_per_minute(env: Mapping[str, str] | None = None, cores: int | None = None) -> int:
    """How many images one visitor may upload per minute: ``$CXR_UPLOADS_PER_MINUTE`` when set, else
    ``UPLOADS_PER_CORE_MINUTE`` per CPU core of this server.

    Raises:
        BadSettingError: the setting is not a whole number above 0.
    """
    wanted = positive_int_setting(ENV_UPLOADS_PER_MINUTE, env)
    if wanted is not None:
        return wanted
    return UPLOADS_PER_CORE_MINUTE * max(1, cores if cores is not None else (os.cpu_count() or 1))


class RateLimiter:
    """At most ``per_minute`` events per key in any sliding minute (thread-safe: one per server)."""

    WINDOW_S = 60.0

    def __init__(self, per_minute: int) -> None:

        self.per_minute = int(per_minute)
        self._events: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str, now: float | None = None) -> bool:
        """Count one event for ``key`` and return True, or return False (and count nothing) at the limit."""
        now = time.monotonic() if now is None else now
        with self._lock:
            recent = [t for t in self._events.get(key, []) if now - t < self.WINDOW_S]
            allowed = len(recent) < self.per_minute
            if allowed:
                recent.append(now)
            self._events[key] = recent
            return allowed

    def refusal(self) -> str:
        images = "image" if self.per_minute == 1 else "images"
        return (f"You have uploaded {self.per_minute} {images} in the last minute, the limit on this server; "
                "wait a minute and upload the rest again.")


# --- Training jobs at once --------------------------------------------------------------------------
#: What one training process takes beside the app (TensorFlow, a backbone, a batch of images in flight).
TRAINING_JOB_MB = 1536


def max_training_jobs(memory_bytes: int | None = None, cores: int | None = None) -> int:
    """The most training jobs this server can run at once: one per core, as many as its memory holds
    beside the app (at least one)."""
    memory_mb = (memory_limit_bytes() if memory_bytes is None else memory_bytes) // MB
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return int(max(1, min(cores, (memory_mb - APP_RESERVE_MB) // TRAINING_JOB_MB)))
