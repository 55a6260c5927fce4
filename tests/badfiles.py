"""Awkward and hostile input files, made in code (nothing is downloaded, nothing large is allocated).

Every image maker returns ``(bytes, file_name)``: the name carries the suffix a user would have given
the file (a text file named ``.jpg``...). ``REFUSED`` and ``ACCEPTED`` list them for parametrised
tests; ``hostile_zip_*`` return a zip archive's bytes.
"""
from __future__ import annotations

import functools
import io
import stat
import struct
import zipfile
import zlib
from typing import Callable

import cv2
import numpy as np
from PIL import Image

BadFile = tuple[bytes, str]


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def gradient(h: int = 40, w: int = 60) -> np.ndarray:
    """A smooth 2-D uint8 ramp (easy to compare after lossy coding)."""
    return (np.add.outer(np.arange(h), np.arange(w)) * 255 // (h + w - 2)).astype(np.uint8)


def pil_bytes(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` with a tiny (invalid) body: a bomb's header.

    Nothing of that size is ever allocated, here or (if the reader is right) in the reader.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def png_bomb(side: int = 8000, rgba: bool = False) -> bytes:
    """A *valid* all-black PNG of ``side x side`` pixels (8-bit gray, or RGBA), compressed row by row.

    8000 x 8000 gray is 64 MB of pixels in a file of about 60 KB; 9000 x 9000 RGBA is 324 MB in about
    330 KB. Both are under Pillow's own bomb limit (89 M pixels), so only the reader's limit stops
    them. Rows are fed to zlib one at a time: making one needs a few kilobytes of memory.
    """
    channels = 4 if rgba else 1
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 6 if rgba else 0, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = b"\0" * (side * channels + 1)  # filter byte + pixels
    parts = [compressor.compress(row) for _ in range(side)]
    parts.append(compressor.flush())
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


def dicom_bytes(arr: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12, preamble: bool = True,
                **tags) -> bytes:
    """A DICOM Part 10 file (explicit VR little endian) holding ``arr``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.set_pixel_data(arr, photometric, bits)
    for key, value in tags.items():
        setattr(ds, key, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=preamble)
    return buffer.getvalue()


def ramp12(h: int = 32, w: int = 64) -> np.ndarray:
    """A 12-bit horizontal ramp 0..4095."""
    return np.tile(np.linspace(0, 4095, w).astype(np.uint16), (h, 1))


# ---------------------------------------------------------------------------------------------
# Images that work
# ---------------------------------------------------------------------------------------------


def good_png(size: int = 64, seed: int = 1) -> BadFile:
    """An ordinary X-ray-like 8-bit grayscale PNG."""
    rng = np.random.default_rng(seed)
    img = np.clip(gradient(size, size).astype(int) + rng.normal(0, 10, (size, size)), 0, 255).astype(np.uint8)
    ok, buffer = cv2.imencode(".png", img)
    assert ok
    return buffer.tobytes(), "chest.png"


def png_with_alpha() -> BadFile:
    """RGBA PNG, half-transparent: alpha is dropped (X-rays are opaque)."""
    rgba = np.dstack([gradient()] * 3 + [np.full((40, 60), 128, np.uint8)])
    return pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), "alpha.png"


def png_16bit() -> BadFile:
    """16-bit grayscale PNG using values 1000..3040: stretched to the full 0..255."""
    values = (1000 + gradient().astype(np.uint16) * 8).astype(np.uint16)
    return pil_bytes(Image.fromarray(values), "PNG"), "deep16.png"


def cmyk_jpeg() -> BadFile:
    """A CMYK JPEG (what some print workflows export)."""
    rgb = Image.fromarray(np.dstack([gradient()] * 3), "RGB")
    return pil_bytes(rgb.convert("CMYK"), "JPEG", quality=95), "cmyk.jpg"


def dicom_monochrome1() -> BadFile:
    """MONOCHROME1 DICOM (low values white): must come out inverted, bone bright."""
    return dicom_bytes(ramp12(), photometric="MONOCHROME1"), "mono1.dcm"


def dicom_monochrome2() -> BadFile:
    return dicom_bytes(ramp12()), "mono2.dcm"


# ---------------------------------------------------------------------------------------------
# Images that must be refused
# ---------------------------------------------------------------------------------------------


def empty_file() -> BadFile:
    return b"", "empty.jpg"


def truncated_jpeg() -> BadFile:
    """A noisy JPEG cut in half: the header is fine, the pixels end early."""
    noisy = np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8)
    ok, buffer = cv2.imencode(".jpeg", noisy)
    assert ok
    data = buffer.tobytes()
    return data[: len(data) // 2], "truncated.jpg"


def text_named_jpg() -> BadFile:
    return b"hello, this is not a picture\n" * 10, "notes.jpg"


def pdf_named_jpg() -> BadFile:
    return b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", "report.jpg"


def one_pixel_png() -> BadFile:
    return pil_bytes(Image.new("L", (1, 1)), "PNG"), "dot.png"


def huge_png_header() -> BadFile:
    """A 20000 x 20000 PNG header (400 million pixels) with no real pixel data."""
    return png_header_only(20_000, 20_000), "huge.png"


@functools.lru_cache(maxsize=None)
def decompression_bomb() -> BadFile:
    """A valid 8000 x 8000 PNG (64 M pixels) in about 60 KB."""
    return png_bomb(8000), "bomb.png"


@functools.lru_cache(maxsize=None)
def decompression_bomb_rgba() -> BadFile:
    """A valid 9000 x 9000 RGBA PNG: 324 MB once decoded, from about 330 KB."""
    return png_bomb(9000, rgba=True), "bomb-rgba.png"


def dicom_without_pixels() -> BadFile:
    """A DICOM structured report: a valid file with no image in it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.PatientName = "Nobody"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), "sr-report.dcm"


#: name -> (maker, a regular expression the refusal sentence must match)
REFUSED: dict[str, tuple[Callable[[], BadFile], str]] = {
    "empty": (empty_file, r"is an empty file"),
    "truncated_jpeg": (truncated_jpeg, r"truncated or damaged"),
    "text_as_jpg": (text_named_jpg, r"is not an image this program can read"),
    "pdf_as_jpg": (pdf_named_jpg, r"is not an image this program can read"),
    "1x1": (one_pixel_png, r"is only 1 x 1 pixels"),
    "20000x20000_header": (huge_png_header, r"(pixel limit|decompression bomb)"),
    "decompression_bomb": (decompression_bomb, r"(pixel limit|decompression bomb)"),
    "decompression_bomb_rgba": (decompression_bomb_rgba, r"(pixel limit|decompression bomb)"),
    "dicom_no_pixels": (dicom_without_pixels, r"holds no pixel data"),
}

#: name -> maker of a file that must decode
ACCEPTED: dict[str, Callable[[], BadFile]] = {
    "png_alpha": png_with_alpha,
    "png_16bit": png_16bit,
    "cmyk_jpeg": cmyk_jpeg,
    "dicom_monochrome1": dicom_monochrome1,
}


# ---------------------------------------------------------------------------------------------
# Hostile zip archives
# ---------------------------------------------------------------------------------------------


def _zip(members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for info, data in members:
            archive.writestr(info, data)
    return buffer.getvalue()


def _innocent_members() -> list[tuple[str, bytes]]:
    png, _ = good_png()
    return [("data/NORMAL/a.png", png), ("data/PNEUMONIA/b.png", good_png(seed=2)[0])]


def hostile_zip_dotdot() -> BadFile:
    """A member named ``../escaped.txt`` (zip slip)."""
    return _zip(_innocent_members() + [("../escaped.txt", b"pwned")]), "slip.zip"


def hostile_zip_absolute() -> BadFile:
    """A member with an absolute path."""
    return _zip(_innocent_members() + [("/tmp/cxr-absolute-escape.txt", b"pwned")]), "absolute.zip"


def hostile_zip_symlink() -> BadFile:
    """A symbolic-link member pointing at /etc/passwd."""
    info = zipfile.ZipInfo("data/NORMAL/link.png")
    info.create_system = 3  # Unix, so external_attr carries the file mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return _zip(_innocent_members() + [(info, b"/etc/passwd")]), "symlink.zip"


def hostile_zip_too_big(declared_bytes: int = 0xF000_0000, members: int = 3) -> BadFile:
    """A small zip whose central directory claims ``members`` x ``declared_bytes`` (about 12 GB) once
    extracted: more than the 8 GB limit. Only the headers lie; the file itself is tiny."""
    names = [f"data/NORMAL/big{i}.png" for i in range(members)]
    data = _zip([(name, b"x" * 100) for name in names])
    # Patch the uncompressed size (offset 24 of each central directory header, 'PK\1\2').
    out = bytearray(data)
    start = 0
    while True:
        at = out.find(b"PK\x01\x02", start)
        if at < 0:
            break
        struct.pack_into("<I", out, at + 24, declared_bytes)
        start = at + 4
    return bytes(out), "too-big.zip"


HOSTILE_ZIPS: dict[str, tuple[Callable[[], BadFile], str]] = {
    "dotdot": (hostile_zip_dotdot, r"'\.\.' would write outside the folder"),
    "absolute": (hostile_zip_absolute, r"absolute path"),
    "symlink": (hostile_zip_symlink, r"symbolic link"),
    "too_big": (hostile_zip_too_big, r"more than the .* allowed"),
}
