"""Download the Kermany release (resumable, checksummed) and extract zip archives safely.

Only the standard library's ``urllib`` is used. A download goes to ``<dest>.part`` and resumes
from there with an HTTP Range request; a server that ignores Range gets a clean restart. The
finished file is checked against its SHA-256 and only then moved into place in one rename.

``safe_extract_zip`` refuses archives that would write outside their folder (``..``, absolute
paths, drive letters, symlinks) or that are bombs (too many files, too many bytes, a compression
ratio no real image reaches), and extracts into a hidden folder beside the destination that is
renamed at the end, so a refused or interrupted extraction leaves nothing half-done.
"""
from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO, Callable

from cxr_core.core.errors import BadDatasetError, DownloadError
from cxr_core.io.atomic import atomic_path
from cxr_core.io.hashing import file_sha256

log = logging.getLogger(__name__)

KERMANY_URL = (
    "https://data.mendeley.com/public-files/datasets/rscbjbr9sj/files/"
    "f12eaf6d-6023-432f-acc9-80c9d7393433/file_downloaded"
)
KERMANY_SHA256 = "13efc055629733dbab07877f8b3c9f81097840dbcdaa326a8542322c2281ce36"
KERMANY_FILENAME = "ChestXRay2017.zip"
KERMANY_FOLDER = "kermany"

CHUNK_BYTES = 1 << 20
USER_AGENT = "cxr-workbench/1.0 (+urllib)"
# Generous for the 1.2 GB / ~12,000-entry Kermany zip, small enough to stop a bomb.
MAX_TOTAL_BYTES = 8 * 1024**3
MAX_FILES = 100_000
# JPEGs barely compress; a member over 1 MiB that shrank more than 200 times is a bomb.
MAX_RATIO = 200
_RATIO_MIN_BYTES = 1 << 20

ProgressFn = Callable[[int, "int | None"], None]
StopFn = Callable[[], bool]


class DownloadCancelled(DownloadError):
    """The download was stopped by ``should_stop``; the ``.part`` file is kept for resuming."""


# ---------------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------------


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:,.1f} MB"


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _resume_offset(response, offset: int) -> int:
    """Where the response's body starts: ``offset`` when the server honoured Range, else 0."""
    status = getattr(response, "status", None) or response.getcode()
    if offset and status == 206:
        match = re.match(r"bytes\s+(\d+)-", response.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == offset:
            return offset
        log.warning("The server answered the range request with %r; starting again",
                    response.headers.get("Content-Range"))
        raise _RestartNeeded
    return 0


class _RestartNeeded(Exception):
    """A 206 for a range we did not ask for: throw the partial file away and start again."""


def _stream(
    url: str, part: Path, chunk: int, timeout: float, on_progress: ProgressFn | None, should_stop: StopFn | None
) -> int | None:
    """One attempt: append the rest of ``url`` to ``part``; returns the expected total size."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            # The range starts at or past the end: the .part may be complete or stale; verify later.
            length = _content_range_total(error.headers.get("Content-Range", ""))
            if length is not None and length == offset:
                return offset
            raise _RestartNeeded from error
        raise
    with response:
        start = _resume_offset(response, offset)
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        if start == 0 and offset:
            log.info("The server ignored the Range request; downloading %s from the start", url)
        done = start
        with open(part, "ab" if start else "wb") as handle:
            if on_progress:
                on_progress(done, total)
            while True:
                if should_stop is not None and should_stop():
                    handle.flush()
                    raise DownloadCancelled(
                        f"The download was stopped at {_mb(done)} of {_mb(total)}; start it again to resume."
                    )
                block = response.read(chunk)
                if not block:
                    break
                handle.write(block)
                done += len(block)
                if on_progress:
                    on_progress(done, total)
            handle.flush()
            os.fsync(handle.fileno())
    if total is not None and done < total:
        raise _Incomplete(done, total)
    return total


def _content_range_total(value: str) -> int | None:
    match = re.search(r"/(\d+)\s*$", value or "")
    return int(match.group(1)) if match else None


class _Incomplete(Exception):
    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"{done} of {total} bytes")
        self.done, self.total = done, total


def _stream_with_retries(url: str, part: Path, chunk: int, timeout: float, retries: int,
                         on_progress: ProgressFn | None, should_stop: StopFn | None) -> None:
    """Stream ``url`` into ``part``, resuming after a dropped connection up to ``retries`` times."""
    attempt = 0
    while True:
        try:
            _stream(url, part, chunk, timeout, on_progress, should_stop)
            return
        except DownloadCancelled:
            raise
        except _RestartNeeded:
            part.unlink(missing_ok=True)
            attempt += 1
            if attempt > retries:
                raise DownloadError(
                    f"The server at {url} kept sending the wrong part of the file; try again later."
                ) from None
        except (_Incomplete, urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as error:
            attempt += 1
            if isinstance(error, urllib.error.HTTPError) and error.code < 500 and error.code != 408:
                raise DownloadError(
                    f"The server refused the download of {url} (HTTP {error.code} {error.reason}); "
                    "check the address or download the file by hand."
                ) from error
            if attempt > retries:
                reason = getattr(error, "reason", None) or error
                raise DownloadError(
                    f"The download of {url} failed ({reason}); check the internet connection and try again "
                    "(the part already received is kept and will be resumed)."
                ) from error
            log.warning("Download attempt %d failed (%s); resuming", attempt, error)
            time.sleep(min(2.0**attempt, 10.0) * 0.1)


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    chunk: int = CHUNK_BYTES,
    *,
    timeout: float = 60.0,
    retries: int = 3,
) -> Path:
    """Download ``url`` to ``dest``, resuming a previous partial download.

    Args:
        url: http(s) address.
        dest: the final file; ``<dest>.part`` holds the bytes received so far.
        sha256: expected hex digest; the file is only moved into place when it matches.
        on_progress: called as ``on_progress(bytes_done, bytes_total_or_None)``.
        should_stop: polled between chunks; when it returns True the download stops
            (``DownloadCancelled``) and the ``.part`` file is kept for resuming.
        chunk: bytes per read.
        timeout: seconds of network silence before an attempt fails.
        retries: further attempts (each resuming) after a dropped connection.

    Returns:
        ``dest`` as a Path.

    Raises:
        DownloadError: network failure after the retries, or a checksum mismatch (the bad file is removed).
    """
    dest = Path(dest)
    expected = sha256.lower() if sha256 else None
    if dest.is_file():
        if expected is None or file_sha256(dest) == expected:
            log.info("%s is already downloaded", dest)
            return dest
        log.warning("%s does not match its checksum; downloading it again", dest)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)

    _stream_with_retries(url, part, chunk, timeout, retries, on_progress, should_stop)
    if expected is not None:
        actual = file_sha256(part)  # keyed by size and time too, so a partial file read earlier is not reused
        if actual != expected:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"The downloaded file's SHA-256 is {actual[:12]}..., not the expected {expected[:12]}...; "
                "the damaged file was removed, so download it again."
            )
    # The rename through atomic_path fsyncs the file and its folder: a crash leaves old or new.
    with atomic_path(dest) as tmp:
        os.replace(part, tmp)
    log.info("Downloaded %s (%s)", dest, _mb(dest.stat().st_size))
    return dest


# ---------------------------------------------------------------------------------------------
# Safe zip extraction
# ---------------------------------------------------------------------------------------------


def _member_target(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """The member's relative path, None for a member to skip; raises for an unsafe one."""
    raw = info.filename
    name = raw.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise BadDatasetError(
            f"The archive holds {raw!r}, an absolute path that would be written outside the folder; "
            "it is unsafe and was not extracted."
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadDatasetError(
            f"The archive holds {raw!r}, whose '..' would write outside the folder; it is unsafe and was not extracted."
        )
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise BadDatasetError(
            f"The archive holds the symbolic link {raw!r}, which could point outside the folder; "
            "it is unsafe and was not extracted."
        )
    if not parts or parts[0] == "__MACOSX" or parts[-1].startswith("._") or parts[-1] == ".DS_Store":
        # macOS archivers add resource forks; they are not images.
        return None
    return PurePosixPath(*parts)


def _check_members(members: list[zipfile.ZipInfo], max_total_bytes: int, max_files: int) -> int:
    files = [info for info in members if not info.is_dir()]
    if len(files) > max_files:
        raise BadDatasetError(
            f"The archive holds {len(files):,} files, more than the {max_files:,} allowed; it was not extracted."
        )
    total = sum(info.file_size for info in files)
    if total > max_total_bytes:
        raise BadDatasetError(
            f"The archive would expand to {total / 1e9:,.2f} GB, more than the {max_total_bytes / 1e9:,.2f} GB "
            "allowed; it was not extracted."
        )
    for info in files:
        if info.file_size > _RATIO_MIN_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise BadDatasetError(
                f"The archive member {info.filename!r} expands {info.file_size // max(info.compress_size, 1):,} "
                "times (a zip bomb); it was not extracted."
            )
    return total


def safe_extract_zip(
    zip_path_or_fileobj: str | os.PathLike | IO[bytes],
    dest: str | os.PathLike,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_files: int = MAX_FILES,
    on_progress: ProgressFn | None = None,
) -> Path:
    """Extract a zip archive into ``dest`` after checking every member.

    Args:
        zip_path_or_fileobj: the archive's path, or a binary file object (an upload).
        dest: the folder to create; it must not exist yet, or be empty.
        max_total_bytes: refuse archives that expand to more bytes than this.
        max_files: refuse archives with more files than this.
        on_progress: called as ``on_progress(files_done, files_total)``.

    Returns:
        ``dest`` as a Path.

    Raises:
        BadDatasetError: not a zip, an unsafe member, too big, or ``dest`` already holds files.
    """
    dest = Path(dest)
    label = getattr(zip_path_or_fileobj, "name", None) or "the uploaded archive"
    if isinstance(zip_path_or_fileobj, (str, os.PathLike)):
        label = Path(zip_path_or_fileobj).name
        if not Path(zip_path_or_fileobj).is_file():
            raise BadDatasetError(f"The archive {zip_path_or_fileobj} was not found; check the path.")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BadDatasetError(f"The folder {dest} already exists and is not empty; remove it or choose another folder.")
    try:
        archive = zipfile.ZipFile(zip_path_or_fileobj)
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise BadDatasetError(f"{label} is not a zip archive or is damaged ({error}); download it again.") from error

    with archive:
        members = archive.infolist()
        targets = [(info, _member_target(info)) for info in members]  # every member checked first
        total_bytes = _check_members(members, max_total_bytes, max_files)
        dest.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dest.parent).free
        if total_bytes > free:
            raise BadDatasetError(
                f"Extracting {label} needs {total_bytes / 1e9:,.2f} GB but only {free / 1e9:,.2f} GB is free; "
                "free some disk space."
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
        try:
            files = [(info, target) for info, target in targets if target is not None and not info.is_dir()]
            for index, (info, target) in enumerate(files, start=1):
                out = tmp.joinpath(*target.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                # zipfile stops at the declared size and checks the CRC, so a lying header fails here.
                with archive.open(info) as source, open(out, "wb") as sink:
                    shutil.copyfileobj(source, sink, CHUNK_BYTES)
                if on_progress:
                    on_progress(index, len(files))
            for info, target in targets:
                if target is not None and info.is_dir():
                    tmp.joinpath(*target.parts).mkdir(parents=True, exist_ok=True)
            if dest.is_dir():
                dest.rmdir()  # empty (checked above): the rename needs the name free
            os.replace(tmp, dest)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, EOFError, ValueError) as error:
            # RuntimeError: an encrypted member; BadZipFile: a bad CRC or a header that lies.
            shutil.rmtree(tmp, ignore_errors=True)
            raise BadDatasetError(f"{label} is damaged or encrypted and could not be extracted ({error}).") from error
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BadDatasetError(
                f"Extracting {label} failed ({error.strerror or error}); check the disk space."
            ) from error
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("Extracted %s into %s", label, dest)
    return dest


# ---------------------------------------------------------------------------------------------
# Kermany
# ---------------------------------------------------------------------------------------------


def download_kermany(
    data_root: str | os.PathLike,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    url: str = KERMANY_URL,
    sha256: str | None = KERMANY_SHA256,
    *,
    on_extract_progress: ProgressFn | None = None,
    keep_zip: bool = False,
) -> Path:
    """Download, verify and extract the Kermany chest X-ray release into ``data_root/kermany``.

    Args:
        data_root: the folder for data sets (the zip is downloaded there too).
        on_progress: download progress, ``on_progress(bytes_done, bytes_total_or_None)``.
        should_stop: polled during the download; True stops it (resumable later).
        url: where to download from.
        sha256: expected checksum of the zip (None to skip the check).
        on_extract_progress: extraction progress, ``(files_done, files_total)``.
        keep_zip: keep the 1.2 GB zip after a successful extraction.

    Returns:
        The data set folder (the one holding train/ and test/), ready for ``scan_dataset``.

    Raises:
        DownloadError: the download failed, was stopped or did not match its checksum.
        BadDatasetError: the archive is unsafe or does not hold the expected layout.
    """
    from cxr_core.data.scan import find_dataset_root  # noqa: PLC0415 - data imports images (PIL); keep this import cheap

    data_root = Path(os.path.expanduser(os.fspath(data_root)))
    target = data_root / KERMANY_FOLDER
    if target.is_dir() and any(target.iterdir()):
        with contextlib.suppress(BadDatasetError):
            _, found, _ = find_dataset_root(target)
            log.info("The Kermany data set is already in %s", found)
            return found
        raise BadDatasetError(
            f"The folder {target} exists but holds no Kermany data set; remove it and download again."
        )
    data_root.mkdir(parents=True, exist_ok=True)
    archive = download_file(url, data_root / KERMANY_FILENAME, sha256, on_progress, should_stop)
    safe_extract_zip(archive, target, on_progress=on_extract_progress)
    try:
        _, found, _ = find_dataset_root(target)
    except BadDatasetError as error:
        raise BadDatasetError(
            f"The downloaded archive did not hold the Kermany train/test folders; check the address ({url})."
        ) from error
    if not keep_zip:
        archive.unlink(missing_ok=True)
    return found
