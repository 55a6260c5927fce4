"""Compressed DICOM: 12-bit JPEG Lossless (process 14, SV1) and JPEG-LS decode pixel for pixel; a file
whose compression cannot be decoded here is refused with one sentence naming its transfer syntax."""
from __future__ import annotations

import io

import numpy as np
import pytest

from badfiles import dicom_bytes
from cxr_core.core.errors import BadImageError
from cxr_core.io.images import image_header, load_gray

imagecodecs = pytest.importorskip("imagecodecs")  # test-only: encodes the files the tests decode

JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"


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
    raise AssertionError(syntax)


def compressed_dicom(arr: np.ndarray, syntax: str, frame: bytes | None = None, **tags) -> bytes:
    """A Part 10 file whose pixel data is ``arr`` compressed with ``syntax`` (or ``frame`` as given)."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(arr, bits=12, **tags)))
    ds.PixelData = encapsulate([frame if frame is not None else _encode(arr, syntax)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    buffer = io.BytesIO()
    # A private transfer syntax is written as explicit VR little endian, as its vendor would.
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [JPEG_LOSSLESS_SV1, JPEG_LS_LOSSLESS], ids=["jpeg-lossless-sv1", "jpeg-ls"])
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
