"""cxr_core.io.images: decoding every accepted format, refusing bad files with one sentence."""
from __future__ import annotations

import io
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import badfiles
from badfiles import (
    dicom_bytes as _dicom,
    gradient as _gradient,
    pil_bytes as _save,
    png_header_only as _png_header_only,
    ramp12 as _ramp12,
)
from cxr_core.core.errors import BadImageError
from cxr_core.io.images import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, image_header, load_gray, to_model_input

# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


def test_grayscale_jpeg_from_path_and_bytes_agree(tmp_path: Path):
    path = tmp_path / "a.jpeg"
    cv2.imwrite(str(path), _gradient())
    from_path = load_gray(path)
    from_bytes = load_gray(path.read_bytes(), name="a.jpeg")
    assert from_path.dtype == np.uint8 and from_path.shape == (40, 60)
    np.testing.assert_array_equal(from_path, from_bytes)
    assert image_header(path) == (60, 40)
    # Same pixels as OpenCV's decoder, give or take a rounding step.
    assert np.abs(from_path.astype(int) - cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)).max() <= 2


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("BMP", ".bmp"), ("TIFF", ".tif"), ("JPEG", ".jpg")])
def test_rgb_formats_become_luminance(tmp_path: Path, fmt: str, suffix: str):
    rgb = np.stack([_gradient(), np.full((40, 60), 100, np.uint8), 255 - _gradient()], axis=-1)
    path = tmp_path / f"rgb{suffix}"
    path.write_bytes(_save(Image.fromarray(rgb, "RGB"), fmt))
    gray = load_gray(path)
    expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(int)
    assert gray.shape == (40, 60) and gray.dtype == np.uint8
    assert np.abs(gray.astype(int) - expected).mean() < (3 if fmt == "JPEG" else 1)


def test_rgba_palette_la_and_bilevel_png():
    rgba = Image.fromarray(np.dstack([_gradient()] * 3 + [np.full((40, 60), 128, np.uint8)]), "RGBA")
    assert load_gray(_save(rgba, "PNG")).shape == (40, 60)
    palette = Image.fromarray(_gradient(), "L").convert("P")
    gray = load_gray(_save(palette, "PNG"))
    assert np.abs(gray.astype(int) - _gradient()).max() <= 8
    la = Image.fromarray(_gradient(), "L").convert("LA")
    np.testing.assert_array_equal(load_gray(_save(la, "PNG")), _gradient())
    bilevel = Image.fromarray(_gradient() > 128)
    assert set(np.unique(load_gray(_save(bilevel, "PNG")))) <= {0, 255}


def test_cmyk_jpeg():
    rgb = Image.fromarray(np.dstack([_gradient()] * 3), "RGB")
    data = _save(rgb.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    gray = load_gray(data, name="cmyk.jpg")
    assert np.abs(gray.astype(int) - _gradient()).mean() < 6


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_uses_the_actual_value_range(fmt: str):
    values = (1000 + _gradient().astype(np.uint16) * 8).astype(np.uint16)  # 1000..3040
    img = Image.fromarray(values)
    gray = load_gray(_save(img, fmt), name=f"deep.{fmt.lower()}")
    assert gray.dtype == np.uint8
    assert gray.min() == 0 and gray.max() == 255
    np.testing.assert_array_equal(np.argsort(gray.ravel(), kind="stable"), np.argsort(values.ravel(), kind="stable"))


def test_flat_16_bit_image_is_black_not_an_error():
    img = Image.fromarray(np.full((32, 32), 700, np.uint16))
    assert load_gray(_save(img, "PNG")).max() == 0


def test_exif_orientation_is_applied():
    img = Image.fromarray(_gradient(), "L")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the viewer turns it upright
    data = _save(img, "JPEG", exif=exif.tobytes())
    assert load_gray(data).shape == (60, 40)
    assert image_header(data) == (40, 60)


# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------


def test_dicom_without_window_uses_full_range(tmp_path: Path):
    data = _dicom(_ramp12())
    assert data[128:132] == b"DICM"
    path = tmp_path / "plain.bin"  # detected by the magic, not the suffix
    path.write_bytes(data)
    gray = load_gray(path)
    assert gray.shape == (32, 64) and gray[0, 0] == 0 and gray[0, -1] == 255
    assert image_header(path) == (64, 32)


def test_dicom_window_center_width_is_applied():
    gray = load_gray(_dicom(_ramp12(), WindowCenter=2048, WindowWidth=1024), name="w.dcm")
    ramp = _ramp12()[0]
    row = gray[0]
    assert (row[ramp < 1500] == 0).all() and (row[ramp > 2600] == 255).all()
    middle = row[np.argmin(np.abs(ramp.astype(int) - 2048))]
    assert 110 <= middle <= 145


def test_dicom_rescale_is_applied_before_the_window():
    # Hounsfield-like: stored 0..4095 -> -1024..3071; a window centred on 0 shows stored value 1024 as grey.
    data = _dicom(_ramp12(), RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=400)
    row = load_gray(data, name="ct.dcm")[0]
    ramp = _ramp12()[0].astype(int)
    assert row[np.argmin(np.abs(ramp - 1024))] in range(110, 146)
    assert (row[ramp < 800] == 0).all() and (row[ramp > 1250] == 255).all()


def test_dicom_voi_lut_sequence_is_applied():
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    lut = Dataset()
    lut.add_new(0x00283002, "US", [4096, 0, 12])  # LUT Descriptor: entries, first value, bits
    lut.add_new(0x00283006, "US", [4095 - v for v in range(4096)])  # LUT Data: an inverting table
    data = _dicom(_ramp12(), VOILUTSequence=Sequence([lut]))
    row = load_gray(data, name="lut.dcm")[0]
    assert row[0] == 255 and row[-1] == 0


def test_monochrome1_is_inverted():
    mono2 = load_gray(_dicom(_ramp12()), name="m2.dcm")
    mono1 = load_gray(_dicom(_ramp12(), photometric="MONOCHROME1"), name="m1.dcm")
    np.testing.assert_array_equal(mono1, 255 - mono2)


def test_dicom_without_preamble_is_read_by_suffix(tmp_path: Path):
    data = _dicom(_ramp12(), preamble=False)
    assert data[128:132] != b"DICM"
    path = tmp_path / "bare.DCM"
    path.write_bytes(data)
    assert load_gray(path).shape == (32, 64)


def test_dicom_rgb_becomes_gray():
    rgb = np.dstack([_gradient()] * 3)
    gray = load_gray(_dicom(rgb, photometric="RGB", bits=8), name="rgb.dcm")
    assert np.abs(gray.astype(int) - _gradient()).max() <= 1


def test_dicom_without_pixel_data_is_refused():
    data, name = badfiles.dicom_without_pixels()
    with pytest.raises(BadImageError, match=rf"{name} holds no pixel data"):
        load_gray(data, name=name)


def test_corrupt_dicom_is_refused():
    with pytest.raises(BadImageError, match=r"broken\.dcm is not a readable DICOM file"):
        load_gray(b"\0" * 128 + b"DICM" + b"\xff" * 7, name="broken.dcm")


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def test_missing_file_and_folder(tmp_path: Path):
    with pytest.raises(BadImageError, match=r"nope\.png was not found"):
        load_gray(tmp_path / "nope.png")
    with pytest.raises(BadImageError, match="is a folder, not an image file"):
        load_gray(tmp_path)


def test_empty_file(tmp_path: Path):
    path = tmp_path / "empty.jpeg"
    path.write_bytes(b"")
    with pytest.raises(BadImageError, match=r"empty\.jpeg is an empty file"):
        load_gray(path)
    with pytest.raises(BadImageError, match="empty file"):
        image_header(path)


def test_truncated_jpeg(tmp_path: Path):
    data, _ = badfiles.truncated_jpeg()
    path = tmp_path / "cut.jpeg"
    path.write_bytes(data)
    assert image_header(path) == (200, 200)  # the header alone looks fine
    with pytest.raises(BadImageError, match=r"cut\.jpeg is truncated or damaged"):
        load_gray(path)


@pytest.mark.parametrize("maker", [badfiles.text_named_jpg, badfiles.pdf_named_jpg], ids=["text", "pdf"])
def test_non_images_named_jpg(tmp_path: Path, maker):
    content, _ = maker()
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    with pytest.raises(BadImageError, match=r"fake\.jpg is not an image this program can read"):
        load_gray(path)
    with pytest.raises(BadImageError, match="not an image"):
        image_header(path)


def test_tiny_image_is_refused():
    data, name = badfiles.one_pixel_png()
    with pytest.raises(BadImageError, match=rf"{name} is only 1 x 1 pixels"):
        load_gray(data, name=name)


@pytest.mark.parametrize("side", [8000, 10_000, 20_000], ids=["64M", "100M-warning", "400M-bomb"])
def test_huge_images_are_refused_from_the_header_quickly(side: int):
    data = _png_header_only(side, side)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak as a warning either
        with pytest.raises(BadImageError, match=r"(more than the 60,000,000 pixel limit|decompression bomb)"):
            load_gray(data, name="huge.png")
        with pytest.raises(BadImageError, match="huge.png"):
            image_header(data, name="huge.png")
    assert time.perf_counter() - start < 1.0
    assert side * side > MAX_IMAGE_PIXELS


def test_wrong_source_type():
    with pytest.raises(BadImageError, match="received a int"):
        load_gray(42)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Model input
# ---------------------------------------------------------------------------------------------


def test_to_model_input_matches_cv2_resize():
    gray = _gradient(50, 80)
    out = to_model_input(gray, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    expected = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], expected)
    assert out.min() >= 0 and out.max() <= 255


def test_to_model_input_refuses_colour_arrays():
    with pytest.raises(BadImageError, match=r"shape \(10, 10, 3\)"):
        to_model_input(np.zeros((10, 10, 3), np.uint8), 32)


def test_suffixes_constant():
    assert {".jpeg", ".png", ".dcm"} <= IMAGE_SUFFIXES


# ---------------------------------------------------------------------------------------------
# Real files (skipped when ../shared is absent)
# ---------------------------------------------------------------------------------------------


def test_real_full_size_originals(shared_dir: Path):
    import pandas as pd

    folder = shared_dir / "data" / "kermany-originals-sample"
    if not (folder / "manifest.csv").is_file():
        pytest.skip("../shared/data/kermany-originals-sample is not present")
    table = pd.read_csv(folder / "manifest.csv")
    for row in table.itertuples():
        path = folder / row.path
        assert image_header(path) == (row.width, row.height)
        gray = load_gray(path)
        assert gray.shape == (row.height, row.width) and gray.dtype == np.uint8
        reference = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        assert np.abs(gray.astype(int) - reference).mean() < 2, row.path
