"""cxr_core.data.download: resumable checksummed downloads from a local server, safe zip extraction."""
from __future__ import annotations

import hashlib
import io
import re
import stat
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxr_core.core.errors import BadDatasetError, DownloadError
from cxr_core.data.download import (
    KERMANY_SHA256,
    KERMANY_URL,
    DownloadCancelled,
    download_file,
    download_kermany,
    safe_extract_zip,
)
from cxr_core.data.scan import scan_dataset
from cxr_core.io.hashing import file_sha256

PAYLOAD = bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8))
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class FileServer:
    """A local HTTP server for one payload, optionally with Range support and a dropped connection."""

    def __init__(self, payload: bytes, support_range: bool = True, drop_after: int | None = None, status: int = 200):
        self.payload = payload
        self.support_range = support_range
        self.drop_after = drop_after  # the first response is cut after this many bytes
        self.status = status
        self.ranges: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                requested = self.headers.get("Range")
                server.ranges.append(requested)
                if server.status != 200:
                    self.send_error(server.status)
                    return
                body, start = server.payload, 0
                match = re.match(r"bytes=(\d+)-$", requested or "")
                if match and server.support_range:
                    start = int(match.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                rest = body[start:]
                self.send_header("Content-Length", str(len(rest)))
                self.end_headers()
                if server.drop_after is not None:
                    cut, server.drop_after = server.drop_after, None
                    self.wfile.write(rest[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(rest)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/file.bin"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "FileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------------
# download_file
# ---------------------------------------------------------------------------------------------


def test_download_with_checksum_and_progress(tmp_path: Path):
    progress: list[tuple[int, int | None]] = []
    dest = tmp_path / "sub" / "file.bin"
    with FileServer(PAYLOAD) as server:
        result = download_file(server.url, dest, PAYLOAD_SHA, on_progress=lambda d, t: progress.append((d, t)),
                               chunk=8192)
    assert result == dest and dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "file.bin.part").exists()
    assert progress[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)


def test_resume_from_a_partial_file(tmp_path: Path):
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD[:12_345])
    progress: list[int] = []
    with FileServer(PAYLOAD) as server:
        download_file(server.url, dest, PAYLOAD_SHA, on_progress=lambda d, _total: progress.append(d))
    assert server.ranges == ["bytes=12345-"]
    assert progress[0] == 12_345
    assert dest.read_bytes() == PAYLOAD


def test_dropped_connection_is_resumed(tmp_path: Path):
    dest = tmp_path / "file.bin"
    with FileServer(PAYLOAD, drop_after=20_000) as server:
        download_file(server.url, dest, PAYLOAD_SHA, chunk=4096)
    assert server.ranges == [None, "bytes=20000-"]
    assert dest.read_bytes() == PAYLOAD


def test_server_without_range_support_restarts_cleanly(tmp_path: Path):
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(b"garbage that must not stay in front")
    with FileServer(PAYLOAD, support_range=False) as server:
        download_file(server.url, dest, PAYLOAD_SHA)
    assert server.ranges == ["bytes=35-"]
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_file_gets_416_and_is_kept(tmp_path: Path):
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD)
    with FileServer(PAYLOAD) as server:
        download_file(server.url, dest, PAYLOAD_SHA)
    assert server.ranges == [f"bytes={len(PAYLOAD)}-"]
    assert dest.read_bytes() == PAYLOAD


def test_checksum_mismatch_removes_the_file(tmp_path: Path):
    dest = tmp_path / "file.bin"
    with FileServer(PAYLOAD) as server, pytest.raises(
            DownloadError, match=r"SHA-256 is .* not the expected 000000000000.*removed"):
        download_file(server.url, dest, "0" * 64)
    assert not dest.exists() and not (tmp_path / "file.bin.part").exists()


def test_stop_keeps_the_part_file_for_resuming(tmp_path: Path):
    dest = tmp_path / "file.bin"
    calls = {"n": 0}

    def stop_after_two_chunks() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with FileServer(PAYLOAD) as server:
        with pytest.raises(DownloadCancelled, match="stopped at .* start it again to resume"):
            download_file(server.url, dest, PAYLOAD_SHA, should_stop=stop_after_two_chunks, chunk=1000)
        assert (tmp_path / "file.bin.part").stat().st_size == 2000
        download_file(server.url, dest, PAYLOAD_SHA)
        assert server.ranges[-1] == "bytes=2000-"
    assert dest.read_bytes() == PAYLOAD


def test_existing_verified_file_is_not_downloaded_again(tmp_path: Path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(PAYLOAD)
    with FileServer(PAYLOAD) as server:
        download_file(server.url, dest, PAYLOAD_SHA)
    assert server.ranges == []


def test_http_error_and_unreachable_server(tmp_path: Path):
    with FileServer(PAYLOAD, status=404) as server:
        with pytest.raises(DownloadError, match=r"refused the download .*HTTP 404"):
            download_file(server.url, tmp_path / "x.bin")
        url = server.url
    # The server is gone now: the port refuses connections.
    with pytest.raises(DownloadError, match="failed .* check the internet connection"):
        download_file(url, tmp_path / "y.bin", retries=0, timeout=5)


def test_kermany_constants():
    assert KERMANY_URL.startswith("https://data.mendeley.com/") and len(KERMANY_SHA256) == 64


# ---------------------------------------------------------------------------------------------
# safe_extract_zip
# ---------------------------------------------------------------------------------------------


def _zip(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return path


def _left_over(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_extract_a_good_zip_skipping_macos_junk(tmp_path: Path):
    archive = _zip(
        tmp_path / "a.zip",
        {
            "chest_xray/train/NORMAL/a.jpeg": b"1",
            "chest_xray/empty_dir/": b"",
            "__MACOSX/chest_xray/._a.jpeg": b"junk",
            "chest_xray/.DS_Store": b"junk",
        },
    )
    done: list[tuple[int, int]] = []
    dest = safe_extract_zip(archive, tmp_path / "out", on_progress=lambda d, t: done.append((d, t)))
    assert (dest / "chest_xray" / "train" / "NORMAL" / "a.jpeg").read_bytes() == b"1"
    assert (dest / "chest_xray" / "empty_dir").is_dir()
    assert not (dest / "__MACOSX").exists() and not (dest / "chest_xray" / ".DS_Store").exists()
    assert done == [(1, 1)]
    assert _left_over(tmp_path) == {"a.zip", "out"}


def test_extract_from_a_file_object(tmp_path: Path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("NORMAL/x.png", b"x")
    buffer.seek(0)
    dest = safe_extract_zip(buffer, tmp_path / "out")
    assert (dest / "NORMAL" / "x.png").read_bytes() == b"x"


@pytest.mark.parametrize(
    "name,message",
    [
        ("../evil.txt", "whose '..' would write outside the folder"),
        ("ok/../../evil.txt", "whose '..' would write outside the folder"),
        ("..\\evil.txt", "whose '..' would write outside the folder"),
        ("/etc/evil.txt", "an absolute path"),
        ("C:/evil.txt", "an absolute path"),
        ("C:\\evil.txt", "an absolute path"),
    ],
)
def test_unsafe_paths_are_refused_and_nothing_is_left(tmp_path: Path, name: str, message: str):
    archive = _zip(tmp_path / "bad.zip", {"fine/first.txt": b"ok", name: b"evil"})
    with pytest.raises(BadDatasetError, match=re.escape(message)):
        safe_extract_zip(archive, tmp_path / "out")
    assert _left_over(tmp_path) == {"bad.zip"}


def test_symlink_member_is_refused(tmp_path: Path):
    archive = _zip(tmp_path / "link.zip", {"a.txt": b"a"}, symlink="NORMAL/link.jpeg")
    with pytest.raises(BadDatasetError, match=r"symbolic link 'NORMAL/link.jpeg'"):
        safe_extract_zip(archive, tmp_path / "out")
    assert _left_over(tmp_path) == {"link.zip"}


def test_size_count_and_ratio_limits(tmp_path: Path):
    archive = _zip(tmp_path / "many.zip", {f"f{i}.txt": bytes([i]) * 100 for i in range(20)})
    with pytest.raises(BadDatasetError, match=r"holds 20 files, more than the 10 allowed"):
        safe_extract_zip(archive, tmp_path / "out", max_files=10)
    with pytest.raises(BadDatasetError, match=r"would expand to .* GB, more than"):
        safe_extract_zip(archive, tmp_path / "out", max_total_bytes=1000)
    bomb = _zip(tmp_path / "bomb.zip", {"zeros.bin": b"\0" * (8 << 20)})
    with pytest.raises(BadDatasetError, match=r"expands .* times \(a zip bomb\)"):
        safe_extract_zip(bomb, tmp_path / "out")
    assert _left_over(tmp_path) == {"many.zip", "bomb.zip"}


def test_not_a_zip_and_busy_destination(tmp_path: Path):
    fake = tmp_path / "fake.zip"
    fake.write_text("this is text")
    with pytest.raises(BadDatasetError, match=r"fake.zip is not a zip archive or is damaged"):
        safe_extract_zip(fake, tmp_path / "out")
    with pytest.raises(BadDatasetError, match="was not found"):
        safe_extract_zip(tmp_path / "missing.zip", tmp_path / "out")
    archive = _zip(tmp_path / "a.zip", {"a.txt": b"a"})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(BadDatasetError, match="already exists and is not empty"):
        safe_extract_zip(archive, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert (safe_extract_zip(archive, tmp_path / "empty") / "a.txt").read_bytes() == b"a"


def test_corrupt_member_leaves_nothing(tmp_path: Path):
    archive = _zip(tmp_path / "crc.zip", {"a.txt": b"hello world " * 100})
    data = bytearray(archive.read_bytes())
    offset = data.index(b"a.txt") + len("a.txt")  # first byte of the compressed data
    data[offset + 5] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(BadDatasetError, match="damaged or encrypted"):
        safe_extract_zip(archive, tmp_path / "out")
    assert _left_over(tmp_path) == {"crc.zip"}


# ---------------------------------------------------------------------------------------------
# download_kermany (against a local server)
# ---------------------------------------------------------------------------------------------


def _kermany_zip() -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(buffer, "w") as archive:
        for part in ("train", "test"):
            for label in ("NORMAL", "PNEUMONIA"):
                for i in range(3):
                    ok, jpeg = cv2.imencode(".jpeg", rng.integers(0, 255, (24, 24), dtype=np.uint8))
                    name = f"IM-{i:04d}-0001.jpeg" if label == "NORMAL" else f"person{i}_virus_{i}.jpeg"
                    archive.writestr(f"chest_xray/{part}/{label}/{part}-{name}", jpeg.tobytes())
        archive.writestr("__MACOSX/chest_xray/._train", b"junk")
    return buffer.getvalue()


def test_download_kermany_end_to_end(tmp_path: Path):
    payload = _kermany_zip()
    extracted: list[tuple[int, int]] = []
    with FileServer(payload) as server:
        folder = download_kermany(
            tmp_path / "data", url=server.url, sha256=hashlib.sha256(payload).hexdigest(),
            on_extract_progress=lambda d, t: extracted.append((d, t)),
        )
        assert folder == tmp_path / "data" / "kermany" / "chest_xray"
        assert not (tmp_path / "data" / "ChestXRay2017.zip").exists()
        assert extracted[-1] == (12, 12)
        result = scan_dataset(folder)
        assert result.layout == "kermany" and len(result.manifest) == 12
        # A second call finds the data set and makes no request.
        assert download_kermany(tmp_path / "data", url=server.url) == folder
        assert len(server.ranges) == 1


def test_download_kermany_with_a_wrong_checksum(tmp_path: Path):
    with FileServer(_kermany_zip()) as server, pytest.raises(DownloadError, match="SHA-256"):
        download_kermany(tmp_path / "data", url=server.url, sha256="f" * 64)
    assert not (tmp_path / "data" / "kermany").exists()


def test_file_sha256_of_a_file_that_grows_is_read_again(tmp_path: Path):
    # The download checks its partial file with hashing.file_sha256, which memoises by path, size and time.
    path = tmp_path / "p.bin"
    path.write_bytes(PAYLOAD[:1000])
    assert file_sha256(path) == hashlib.sha256(PAYLOAD[:1000]).hexdigest()
    with open(path, "ab") as handle:
        handle.write(PAYLOAD[1000:])
    assert file_sha256(path) == PAYLOAD_SHA
