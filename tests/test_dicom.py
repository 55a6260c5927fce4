"""Compressed DICOM: 12-bit JPEG Lossless (process 14, SV1), JPEG-LS, JPEG 2000 and RLE decode pixel for
pixel, JPEG Baseline within its loss; a file whose compression cannot be decoded here is refused with one
sentence naming its transfer syntax. Colour DICOM (RGB of 8, 16 or 32 bits, multi-frame, PALETTE COLOR)
becomes the same gray image at any depth; a decoder plugin's traceback never reaches a person."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from badfiles import dicom_bytes
from cxr_core.core.errors import BadImageError
from cxr_core.io.images import image_header, load_gray

imagecodecs = pytest.importorskip("imagecodecs")  # test-only: encodes the files the tests decode

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO_RUN = PROJECT_ROOT / "artifacts" / "demo-mobilenet"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"


def _xray12(h: int = 48, w: int = 40) -> np.ndarray:
    """A 12-bit image using the whole range with texture, so a lossy or shifted decode shows."""
    rng = np.random.default_rng(7)
    ramp = np.linspace(0, 4095, w)[None, :] * np.linspace(0.2, 1.0, h)[:, None]
    return np.clip(ramp + rng.integers(-40, 40, (h, w)), 0, 4095).astype(np.uint16)


def _encode(arr: np.ndarray, syntax: str) -> bytes:
    if syntax == JPEG_LOSSLESS_SV1:
        # libjpeg-turbo's lossless mode: SOF3, predictor 1 (selection value 1), 12 bits.
        frame = imagecodecs.jpeg8_encode(arr, lossless=True, predictor=1, bitspersample=12)
        assert b"\xff\xc3" in frame[:64], "not a lossless (SOF3) JPEG stream"
        return frame
    if syntax == JPEG_LS_LOSSLESS:
        return imagecodecs.jpegls_encode(arr, level=0)
    if syntax == JPEG_2000_LOSSLESS:
        return imagecodecs.jpeg2k_encode(arr, level=0, codecformat="J2K", bitspersample=12)  # reversible
    if syntax == JPEG_EXTENDED:
        return imagecodecs.jpeg8_encode(arr, level=95, bitspersample=12)  # lossy, 12-bit (process 4)
    raise AssertionError(syntax)


def compressed_dicom(arr: np.ndarray, syntax: str, frame: bytes | None = None, bits: int = 12, **tags) -> bytes:
    """A Part 10 file whose pixel data is ``arr`` compressed with ``syntax`` (or ``frame`` as given)."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(arr, bits=bits, **tags)))
    if syntax == RLE_LOSSLESS:
        return _saved(_rle(ds))
    ds.PixelData = encapsulate([frame if frame is not None else _encode(arr, syntax)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    buffer = io.BytesIO()
    # A private transfer syntax is written as explicit VR little endian, as its vendor would.
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


def _rle(ds):
    """``ds`` compressed with pydicom's own RLE encoder."""
    from pydicom.uid import RLELossless

    ds.compress(RLELossless, encoding_plugin="pydicom")
    return ds


def _saved(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [JPEG_LOSSLESS_SV1, JPEG_LS_LOSSLESS, JPEG_2000_LOSSLESS, RLE_LOSSLESS],
                         ids=["jpeg-lossless-sv1", "jpeg-ls", "jpeg-2000-lossless", "rle"])
def test_12_bit_lossless_dicom_decodes_exactly(syntax):
    import pydicom

    arr = _xray12()
    data = compressed_dicom(arr, syntax)
    # Lossless: the decoded values are the encoded ones, every one of them.
    assert np.array_equal(pydicom.dcmread(io.BytesIO(data)).pixel_array, arr)
    plain = dicom_bytes(arr, bits=12)
    gray = load_gray(data, name="cr.dcm")
    assert gray.dtype == np.uint8 and gray.shape == arr.shape
    # ...so after the module's own scaling the image is the uncompressed file's, and the stretch to 0..255.
    assert np.array_equal(gray, load_gray(plain, name="plain.dcm"))
    low, high = float(arr.min()), float(arr.max())
    expected = np.clip(np.rint((arr - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
    assert np.array_equal(gray, expected)
    assert image_header(data, name="cr.dcm") == (arr.shape[1], arr.shape[0])


def test_12_bit_jpeg_lossless_keeps_its_display_window():
    arr = _xray12()
    tags = {"WindowCenter": 2048, "WindowWidth": 1024, "PhotometricInterpretation": "MONOCHROME1"}
    compressed = load_gray(compressed_dicom(arr, JPEG_LOSSLESS_SV1, **tags), name="dx.dcm")
    assert np.array_equal(compressed, load_gray(dicom_bytes(arr, bits=12, **tags), name="dx.dcm"))
    assert compressed.min() == 0 and compressed.max() == 255  # the window clips both ends


def _assert_one_sentence_naming(error: pytest.ExceptionInfo, name: str, uid: str) -> str:
    text = str(error.value)
    assert "\n" not in text and "\t" not in text, text
    assert text.count(". ") == 0 and text.endswith("."), text
    assert f"{name} ({uid})" in text and "xr.dcm" in text, text
    assert "plugin" not in text and "requires" not in text, text
    return text


def test_a_missing_decoder_is_one_sentence_naming_the_transfer_syntax(monkeypatch):
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    data = compressed_dicom(_xray12(), JPEG_LS_LOSSLESS)
    # As on a machine without the plugins: pydicom itself then raises its multi-line list of them.
    monkeypatch.setattr(get_decoder(UID(JPEG_LS_LOSSLESS)), "_available", {})
    with pytest.raises(BadImageError) as error:
        load_gray(data, name="xr.dcm")
    text = _assert_one_sentence_naming(error, "JPEG-LS Lossless Image Compression", JPEG_LS_LOSSLESS)
    assert "cannot be decoded here" in text and "uncompressed DICOM or PNG" in text


@pytest.mark.parametrize("uid,name", [
    ("1.2.840.10008.1.2.4.100", "MPEG2 Main Profile / Main Level"),  # known to pydicom, no decoder exists
    ("1.2.826.0.1.3680043.9.9999.1", "an unknown transfer syntax"),  # a vendor's private compression
])
def test_a_transfer_syntax_without_any_decoder_is_named(uid, name):
    data = compressed_dicom(_xray12(), uid, frame=bytes(64))
    with pytest.raises(BadImageError) as error:
        load_gray(data, name="xr.dcm")
    assert "cannot be decoded here" in _assert_one_sentence_naming(error, name, uid)


def test_damaged_jpeg_lossless_data_is_one_sentence():
    arr = _xray12()
    frame = _encode(arr, JPEG_LOSSLESS_SV1)
    data = compressed_dicom(arr, JPEG_LOSSLESS_SV1, frame=frame[:20])  # cut off after its first marker
    with pytest.raises(BadImageError) as error:
        load_gray(data, name="xr.dcm")
    text = _assert_one_sentence_naming(
        error, "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
        JPEG_LOSSLESS_SV1)
    assert "damaged" in text


def test_8_bit_jpeg_baseline_dicom_decodes_within_its_loss():
    arr = np.clip(_xray12() // 16, 0, 255).astype(np.uint8)
    data = compressed_dicom(arr, JPEG_BASELINE, frame=imagecodecs.jpeg8_encode(arr, level=95), bits=8)
    gray = load_gray(data, name="photo.dcm")
    # The stretch to 0..255 of what the JPEG decodes to: within a few levels of the original's stretch.
    assert gray.shape == arr.shape
    assert np.abs(gray.astype(int) - load_gray(dicom_bytes(arr, bits=8), name="plain.dcm")).mean() < 3


def test_12_bit_jpeg_extended_is_decoded_or_refused_as_unsupported():
    """Only GPL libjpeg decodes 12-bit JPEG Extended through pydicom: without it the refusal says the
    form is unsupported here, not that a sound file is damaged."""
    arr = _xray12()
    data = compressed_dicom(arr, JPEG_EXTENDED)
    try:
        gray = load_gray(data, name="xr.dcm")
    except BadImageError:
        with pytest.raises(BadImageError) as error:
            load_gray(data, name="xr.dcm")
        text = _assert_one_sentence_naming(error, "JPEG Extended (Process 2 and 4)", JPEG_EXTENDED)
        assert "12 bits per sample" in text and "no decoder installed here supports" in text, text
        assert "damaged" not in text, text
    else:
        assert np.abs(gray.astype(int) - load_gray(dicom_bytes(arr, bits=12), name="plain.dcm")).mean() < 3


# ---------------------------------------------------------------------------------------------
# Colour DICOM
# ---------------------------------------------------------------------------------------------


def _rgb8(frames: int = 2, h: int = 24, w: int = 20) -> np.ndarray:
    """Random 8-bit RGB frames: every sample value matters to the luminance."""
    return np.random.default_rng(3).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def colour_dicom(arr: np.ndarray, photometric: str, bits: int, rle: bool = False, **tags) -> bytes:
    """A Part 10 file holding ``arr`` ((frames,) rows, columns(, 3)) with ``bits`` per sample, written
    element by element (pydicom's set_pixel_data stops at 16 bits), optionally RLE compressed."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    samples = 3 if photometric in ("RGB", "YBR_FULL") else 1
    frames = arr.shape[0] if arr.ndim == (4 if samples == 3 else 3) else 1
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = arr.shape[-3:-1] if samples == 3 else arr.shape[-2:]
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    arr = arr.astype(f"<u{bits // 8}")
    for key, value in tags.items():
        setattr(ds, key, value)
    if rle:
        from pydicom.encaps import encapsulate
        from pydicom.uid import RLELossless

        ds.file_meta.TransferSyntaxUID = RLELossless
        ds.PixelData = encapsulate([_rle_frame(frame) for frame in (arr if frames > 1 else [arr])])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        payload = arr.tobytes()
        ds.PixelData = payload + b"\0" * (len(payload) % 2)
        ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    return _saved(ds)


def _rle_frame(frame: np.ndarray) -> bytes:
    """DICOM RLE (PS3.5 Annex G) of one frame, at any depth (pydicom's encoder stops at 16 bits): one
    segment per byte of each sample, most significant first, each row PackBits-coded."""
    samples = frame.reshape(frame.shape[0], frame.shape[1], -1)
    planes = samples.astype(samples.dtype.newbyteorder(">")).view(np.uint8).reshape(
        *samples.shape, samples.dtype.itemsize)
    segments = []
    for sample in range(planes.shape[2]):
        for byte in range(planes.shape[3]):
            segment = b"".join(imagecodecs.packbits_encode(row.tobytes()) for row in planes[:, :, sample, byte])
            segments.append(segment + b"\x80" * (len(segment) % 2))  # -128: PackBits' no-op, to even length
    offsets, position = [], 64
    for segment in segments:
        offsets.append(position)
        position += len(segment)
    header = np.array([len(segments), *offsets] + [0] * (15 - len(offsets)), "<u4").tobytes()
    return header + b"".join(segments)


def _luminance(rgb8: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb8), cv2.COLOR_RGB2GRAY)


# Each depth holds the same picture: value v of 8 bits is v * (2**bits - 1) / 255 of ``bits``.
DEPTHS = {8: (np.uint8, 1), 16: (np.uint16, 257), 32: (np.uint32, 16843009)}


@pytest.mark.parametrize("bits", [8, 16, 32])
@pytest.mark.parametrize("rle", [False, True], ids=["plain", "rle"])
@pytest.mark.parametrize("frames", [1, 2])
def test_rgb_of_any_depth_is_the_same_gray_image(bits, rle, frames):
    rgb8 = _rgb8(frames=2)
    dtype, scale = DEPTHS[bits]
    arr = rgb8.astype(dtype) * dtype(scale)
    data = colour_dicom(arr if frames == 2 else arr[0], "RGB", bits, rle=rle)
    gray = load_gray(data, name="colour.dcm")
    # The first frame's luminance, as for an 8-bit RGB PNG: not stretched, not a 3-channel mean.
    assert gray.dtype == np.uint8 and gray.shape == rgb8.shape[1:3]
    assert np.array_equal(gray, _luminance(rgb8[0]))


def _palette_tags(lut_rgb8: np.ndarray) -> dict:
    """The three 16-bit palette lookup tables of 256 entries (as most PALETTE COLOR files carry)."""
    tags = {}
    for name, channel in zip(("Red", "Green", "Blue"), lut_rgb8.T):
        tags[f"{name}PaletteColorLookupTableDescriptor"] = [256, 0, 16]
        tags[f"{name}PaletteColorLookupTableData"] = (channel.astype("<u2") * 257).tobytes()
    return tags


def test_palette_color_is_the_gray_of_its_colours():
    rng = np.random.default_rng(5)
    lut = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, (30, 26), dtype=np.uint8)
    data = colour_dicom(indices, "PALETTE COLOR", 8, **_palette_tags(lut))
    assert np.array_equal(load_gray(data, name="palette.dcm"), _luminance(lut[indices]))


def _assert_refusal_for_a_person(text: str, name: str) -> None:
    """One line naming the file, what was found, then what to do."""
    assert "\n" not in text and "Traceback" not in text and text.endswith("."), text
    assert name in text and "; " in text, text
    assert "could not be read as an image (" not in text, text


def test_palette_color_without_its_palette_is_refused_with_the_reason():
    data = colour_dicom(np.zeros((30, 26), np.uint8), "PALETTE COLOR", 8)
    with pytest.raises(BadImageError) as error:
        load_gray(data, name="palette.dcm")
    text = str(error.value)
    _assert_refusal_for_a_person(text, "palette.dcm")
    assert "PALETTE COLOR" in text and "palette" in text and "export it as" in text, text


def test_pixels_that_fail_to_convert_are_refused_naming_what_was_found(monkeypatch):
    """Whatever a library raises after decoding, the person reads what the file holds and what to do."""
    from pydicom import pixels

    def broken(*_args, **_kwargs):
        raise RuntimeError("a library's bug\n  with a second line")

    monkeypatch.setattr(pixels, "apply_modality_lut", broken)
    with pytest.raises(BadImageError) as error:
        load_gray(dicom_bytes(_xray12(), bits=12), name="xr.dcm")
    text = str(error.value)
    _assert_refusal_for_a_person(text, "xr.dcm")
    assert "MONOCHROME2 pixel data (1 sample of 16 bits per pixel" in text and "RuntimeError" in text, text


# ---------------------------------------------------------------------------------------------
# Decoder failures stay out of what a person reads
# ---------------------------------------------------------------------------------------------


def _damaged_jpeg_lossless() -> bytes:
    arr = _xray12()
    return compressed_dicom(arr, JPEG_LOSSLESS_SV1, frame=_encode(arr, JPEG_LOSSLESS_SV1)[:20])


def test_decoder_tracebacks_go_to_the_debug_log(caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BadImageError):
        load_gray(_damaged_jpeg_lossless(), name="xr.dcm")
    # pydicom logs each failing plugin at ERROR with its traceback: none above DEBUG may carry one...
    loud = [r for r in caplog.records if r.levelno > logging.DEBUG and (r.exc_info or "\n" in r.getMessage())]
    assert not loud, [(r.name, r.levelname, r.getMessage()) for r in loud]
    # ...and the plugin's failure, traceback included, is still there for whoever debugs.
    assert any(r.name == "cxr_core.io.images" and r.exc_info for r in caplog.records)


def test_command_line_log_lines_carry_no_traceback_unless_verbose():
    """Whatever logs a traceback (a library, or our own last-resort handler), the person running the
    command reads one line; -v shows the traceback."""
    from cxr_core import cli

    try:
        raise RuntimeError("decoder failed")
    except RuntimeError:
        record = logging.LogRecord("pydicom", logging.ERROR, __file__, 1, "decoder failed", None, sys.exc_info())
    plain = cli._PlainFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert plain == "ERROR pydicom: decoder failed (run with -v for details)"
    assert record.exc_info is not None  # left for any other handler, such as a debug file
    assert "Traceback" in logging.Formatter("%(message)s").format(record)


def _predict_cli(*paths: Path) -> tuple[list[dict], str]:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    result = subprocess.run([sys.executable, "-m", "cxr_core", "predict", "--run", str(DEMO_RUN), *map(str, paths)],
                            capture_output=True, text=True, timeout=240, cwd=PROJECT_ROOT, env=env)
    assert result.returncode in (0, 2), result.stderr  # 2: some file refused
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(paths), result.stdout
    return rows, result.stderr


@pytest.mark.skipif(not (DEMO_RUN / "config.json").is_file(), reason="the shipped demo run is absent")
def test_predict_classifies_colour_dicom_and_shows_no_traceback(tmp_path):
    rgb8 = _rgb8(frames=2, h=48, w=40)
    lut = np.random.default_rng(5).integers(0, 256, (256, 3), dtype=np.uint8)
    files = {
        "rgb16_rle.dcm": colour_dicom(rgb8[0].astype(np.uint16) * 257, "RGB", 16, rle=True),
        "rgb32_2frame.dcm": colour_dicom(rgb8.astype(np.uint32) * np.uint32(16843009), "RGB", 32, rle=True),
        "palette.dcm": colour_dicom(rgb8[0, ..., 0], "PALETTE COLOR", 8, **_palette_tags(lut)),
        "no_palette.dcm": colour_dicom(rgb8[0, ..., 0], "PALETTE COLOR", 8),
        "damaged.dcm": _damaged_jpeg_lossless(),
    }
    for name, payload in files.items():
        (tmp_path / name).write_bytes(payload)
    rows, stderr = _predict_cli(*(tmp_path / name for name in files))
    assert "Traceback" not in stderr and 'File "' not in stderr, stderr
    by_name = {Path(row["file"]).name: row for row in rows}
    for name in ("rgb16_rle.dcm", "rgb32_2frame.dcm", "palette.dcm"):
        assert 0.0 <= by_name[name]["probability"] <= 1.0, by_name[name]
    for name in ("no_palette.dcm", "damaged.dcm"):
        _assert_refusal_for_a_person(by_name[name]["error"], name)


# ---------------------------------------------------------------------------------------------
# pydicom's own test files, where installed
# ---------------------------------------------------------------------------------------------


def _pydicom_test_files() -> list[Path]:
    """The DICOM files pydicom installs with itself (its data/test_files folder). Not
    get_testdata_files(): that also tries to download pydicom's larger set."""
    import pydicom.data

    return sorted((Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm"))


def test_every_pydicom_test_file_is_decoded_or_refused_with_a_reason():
    files = _pydicom_test_files()
    if not files:
        pytest.skip("pydicom's test files are not installed")
    for path in files:
        try:
            gray = load_gray(path)
        except BadImageError as error:
            _assert_refusal_for_a_person(str(error), path.name)
        else:
            assert gray.dtype == np.uint8 and gray.ndim == 2, path.name


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_RUN / "config.json").is_file(), reason="the shipped demo run is absent")
def test_predict_over_pydicom_test_files_shows_no_traceback():
    files = _pydicom_test_files()
    if not files:
        pytest.skip("pydicom's test files are not installed")
    rows, stderr = _predict_cli(*files)
    assert "Traceback" not in stderr and 'File "' not in stderr, stderr
    for row in rows:
        if "error" in row:
            _assert_refusal_for_a_person(row["error"], Path(row["file"]).name)
    by_name = {Path(row["file"]).name: row for row in rows}
    colour = [name for name in ("SC_rgb_rle_16bit.dcm", "SC_rgb_rle_32bit.dcm", "SC_rgb_rle_16bit_2frame.dcm",
                                "SC_rgb_rle_32bit_2frame.dcm", "examples_palette.dcm") if name in by_name]
    assert all("probability" in by_name[name] for name in colour), [by_name[name] for name in colour]
