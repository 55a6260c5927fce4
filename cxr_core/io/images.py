"""Decode any chest X-ray file into a 2-D ``uint8`` grayscale array.

Accepted: JPEG, PNG, BMP and TIFF (8- or 16-bit; grayscale, RGB, RGBA, CMYK, palette) through
Pillow, and DICOM through pydicom (rescale slope/intercept, the file's VOI LUT or window, and
MONOCHROME1 inversion applied, as a radiology viewer would; RGB, YBR and PALETTE COLOR of 8 to 32
bits per sample reduced to luminance like any colour image). Compressed DICOM decodes through
pydicom's plugins: GDCM (python-gdcm) first where it is installed, for JPEG Lossless (process 14,
the usual CR/DX export, often 12-bit), JPEG-LS, JPEG Baseline/Extended and JPEG 2000; Pillow for
JPEG Baseline and JPEG 2000 and pydicom itself for RLE. Every refusal is a ``BadImageError`` whose
message is one sentence naming the file and what was found (for pixel data that cannot be decoded,
its transfer syntax by name and UID). A decoder plugin's own failure report (pydicom logs each at
ERROR with its traceback, even when another plugin then succeeds) goes to this module's debug log.

Size is checked from the header before any pixel is decoded, so a 20000 x 20000 image or a
decompression bomb is refused in milliseconds instead of exhausting memory.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import threading
import warnings
from pathlib import Path

import cv2
import numpy as np
import pydicom
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from pydicom import pixels
from pydicom.datadict import DicomDictionary
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from cxr_core.core.errors import BadImageError

log = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 60_000_000
MIN_IMAGE_SIDE = 16
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
# Pillow tries only these (JPEG includes a phone's multi-picture MPO). Other formats are refused,
# among them EPS, which Pillow rasterises through Ghostscript and temporary files: an upload never
# touches disk.
PIL_FORMATS = ("JPEG", "PNG", "BMP", "TIFF")

# EXIF orientations that swap width and height (5..8 are the transposed/rotated-by-90 cases).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112
# warnings.catch_warnings swaps a process-wide filter list; scans open headers from several
# threads, so the swap is serialised (header parsing only: decoding runs outside the lock).
_PIL_OPEN_LOCK = threading.Lock()
# pydicom's logger for its decoder plugins: it logs every failing plugin with its traceback.
_PYDICOM_DECODER_LOGGER = "pydicom.pixels.decoders.base"


def _decoder_tracebacks_to_debug(record: logging.LogRecord) -> bool:
    """A logging filter: a record that carries a traceback is passed on at DEBUG through this module's
    logger and dropped at its own level, so a person reads our one sentence and not a library's
    traceback (the refusal already says what failed); any other record goes through unchanged."""
    if record.exc_info and record.levelno > logging.DEBUG:
        log.debug("%s (reported by %s)", record.getMessage(), record.name, exc_info=record.exc_info)
        return False
    return True


def _install_decoder_filter() -> None:
    decoder_log = logging.getLogger(_PYDICOM_DECODER_LOGGER)
    # By name, so importing this module again (a reload) does not add a second filter.
    if not any(getattr(f, "__name__", None) == _decoder_tracebacks_to_debug.__name__ for f in decoder_log.filters):
        decoder_log.addFilter(_decoder_tracebacks_to_debug)


# At import and not at the first decode: pydicom need not be imported for its logger to exist.
_install_decoder_filter()

# ---------------------------------------------------------------------------------------------
# Reading the source
# ---------------------------------------------------------------------------------------------


def _display_name(source: object, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "the uploaded file"
    if isinstance(source, (str, os.PathLike)):
        return Path(os.fspath(source)).name or str(source)
    return "the image"


def _read_source(source: object, label: str) -> bytes:
    """Return the file's bytes; refuse a missing, unreadable or empty file with one sentence."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(os.fspath(source))
        if not path.exists():
            raise BadImageError(f"The image {label} was not found at {path}; check the path.")
        if path.is_dir():
            raise BadImageError(f"{label} is a folder, not an image file; choose an image file.")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise BadImageError(
                f"The image {label} could not be read ({error.strerror or error}); check its permissions."
            ) from error
    else:
        raise BadImageError(
            f"Expected an image file path or bytes but received a {type(source).__name__}; pass a path or bytes."
        )
    if not data:
        raise BadImageError(f"The image {label} is an empty file (0 bytes); use a complete image file.")
    return data


def _is_dicom(data: bytes, source: object, name: str | None) -> bool:
    # DICOM Part 10 files carry 'DICM' after a 128-byte preamble; bare datasets only have a suffix.
    if data[128:132] == b"DICM":
        return True
    for candidate in (name, None if isinstance(source, (bytes, bytearray, memoryview)) else source):
        if candidate and Path(os.fspath(candidate)).suffix.lower() in DICOM_SUFFIXES:
            return True
    return False


def _check_size(width: int, height: int, label: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise BadImageError(
            f"The image {label} is {width} x {height} pixels, more than the {MAX_IMAGE_PIXELS:,} pixel limit; "
            "resize it (chest X-rays need no more than about 3000 x 3000)."
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise BadImageError(
            f"The image {label} is only {width} x {height} pixels; use an image at least "
            f"{MIN_IMAGE_SIDE} pixels on each side."
        )


# ---------------------------------------------------------------------------------------------
# Pillow formats
# ---------------------------------------------------------------------------------------------


def _open_pil(data: bytes, label: str) -> Image.Image:
    """Open with Pillow (header only) and refuse bombs and wrong sizes before decoding pixels."""
    try:
        # Pillow warns between MAX_IMAGE_PIXELS and twice that and raises above; we refuse at our own
        # lower limit anyway, so turn only that one warning into an error for this call.
        with _PIL_OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImageError(
            f"The image {label} declares more than {MAX_IMAGE_PIXELS:,} pixels (a possible decompression bomb); "
            "use a normally sized image."
        ) from error
    except UnidentifiedImageError as error:
        raise BadImageError(
            f"The file {label} is not an image this program can read; use a JPEG, PNG, BMP, TIFF or DICOM file."
        ) from error
    except (OSError, ValueError, SyntaxError) as error:
        raise BadImageError(
            f"The image {label} is damaged and cannot be opened ({error}); use another copy."
        ) from error
    # Check the declared size before anything that may decode: Pillow's PNG getexif() loads every
    # pixel to look for an eXIf chunk after the image data. The checks do not depend on orientation.
    _check_size(img.width, img.height, label)
    return img


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    width, height = img.size
    if img.format == "PNG" and "exif" not in img.info:
        # Pillow's PNG getexif() decodes every pixel to look for a trailing eXIf chunk; PNG X-rays
        # almost never have one, and a header read must stay a header read.
        return width, height
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION_TAG)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make the image unreadable
        orientation = None
    if orientation in _SWAPPING_ORIENTATIONS:
        return height, width
    return width, height


def _pil_to_gray(img: Image.Image, label: str) -> np.ndarray:
    """Decode every pixel (so truncation is detected) and convert to 2-D uint8."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Another library may have switched this global on; a truncated X-ray must still be refused.
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on; truncated images may pass unnoticed.")
    try:
        img.load()
        # Phone photos of films carry an EXIF orientation; OpenCV's imread applies it too.
        img = ImageOps.exif_transpose(img)
        return _gray_from_pil(img)
    except BadImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise BadImageError(
            f"The image {label} is truncated or damaged and cannot be decoded ({error}); use a complete copy."
        ) from error


def _gray_from_pil(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit (or float) grayscale: stretch the values actually used to 0..255.
        return _stretch(np.asarray(img))
    if mode in ("LA", "La", "1"):
        return np.asarray(img.convert("L"), dtype=np.uint8).copy()
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
    # RGB, RGBA, CMYK, YCbCr, LAB, HSV...: luminance (ITU-R 601), alpha dropped: X-rays are opaque.
    return np.asarray(img.convert("RGB").convert("L"), dtype=np.uint8).copy()


def _stretch(arr: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Map [low, high] (default: the array's own range) linearly to 0..255 uint8."""
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 3:
        arr = arr[..., 0] if arr.shape[-1] == 1 else arr.mean(axis=-1)
    finite = np.isfinite(arr)
    if not finite.all():
        arr = np.where(finite, arr, np.nan)
    lo = float(np.nanmin(arr)) if low is None else float(low)
    hi = float(np.nanmax(arr)) if high is None else float(high)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        # A flat image has no contrast to stretch; keep it black rather than divide by zero.
        return np.zeros(arr.shape, np.uint8)
    out = (np.nan_to_num(arr, nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------


@functools.cache
def _dicom_tags() -> tuple[int, ...]:
    """The only elements read from a DICOM file: the image's own (group 0028: size, bits,
    photometric interpretation, rescale, modality and VOI LUTs, window, palette), its pixel data and
    SOP class and modality. Patient, study and staff elements (name, id, birth date...) are never
    parsed, so no message, log or result can show them."""

    image = [tag for tag in DicomDictionary if tag >> 16 == 0x0028]
    # SOP Class UID, Modality; Extended Offset Table (and lengths), Float, Double Float and Pixel Data.
    other = [0x00080016, 0x00080060, 0x7FE00001, 0x7FE00002, 0x7FE00008, 0x7FE00009, 0x7FE00010]
    return tuple(sorted(image + other))


def _read_dicom(data: bytes, label: str, stop_before_pixels: bool):

    try:
        # force=True: many exported files lack the 128-byte preamble but are valid datasets.
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=stop_before_pixels,
                             specific_tags=list(_dicom_tags()))
    except (InvalidDicomError, OSError, ValueError, KeyError, EOFError, TypeError, AttributeError) as error:
        raise BadImageError(f"The file {label} is not a readable DICOM file ({error}); export it again.") from error
    if len(ds) == 0:
        # force=True parses any bytes; a dataset without a single element is not DICOM at all.
        raise BadImageError(f"The file {label} is not a readable DICOM file (no DICOM elements); export it again.")
    return ds


def _dicom_size(ds, label: str) -> tuple[int, int]:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError, KeyError) as error:
        raise BadImageError(
            f"The DICOM file {label} has no image size (Rows/Columns) and so no usable pixel data; "
            "export the image itself."
        ) from error
    return cols, rows


def _dicom_gray(data: bytes, label: str) -> np.ndarray:

    ds = _read_dicom(data, label, stop_before_pixels=False)
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise BadImageError(
            f"The DICOM file {label} holds no pixel data (it may be a report or a structured document); "
            "use a DICOM image."
        )
    width, height = _dicom_size(ds, label)
    _check_size(width, height, label)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        # Decode the first frame only: a multi-frame study could be gigabytes.
        arr = pixels.pixel_array(ds, index=0) if frames > 1 else ds.pixel_array
    except Exception as error:  # decoder plugins raise whatever their C library reports
        raise _undecodable(ds, label, error) from error
    try:
        return _decoded_to_gray(ds, arr, photometric, label)
    except BadImageError:
        raise
    except Exception as error:
        # Whatever else this pixel data holds, the person learns what was found and what to do.
        log.debug("Could not convert the pixel data of %s to gray", label, exc_info=True)
        raise BadImageError(
            f"The DICOM file {label} holds {_pixel_description(ds, arr)}, which could not be converted to a "
            f"grayscale image ({type(error).__name__}); export it as a grayscale DICOM or PNG image."
        ) from error


def _pixel_description(ds, arr: np.ndarray | None = None) -> str:
    """What the header says the pixels are, e.g. 'RGB pixel data (3 samples of 16 bits per pixel)'."""
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip() or "unlabelled"
    samples = ds.get("SamplesPerPixel", None)
    bits = ds.get("BitsAllocated", None)
    parts = []
    if samples is not None:
        parts.append(f"{samples} sample{'s' if samples != 1 else ''}")
    if bits is not None:
        parts.append(f"of {bits} bits" if parts else f"{bits} bits")
    layout = f" ({' '.join(parts)} per pixel)" if parts else ""
    shape = f", decoded to shape {tuple(arr.shape)}" if arr is not None else ""
    return f"{photometric} pixel data{layout}{shape}"


def _decoded_to_gray(ds, arr: np.ndarray, photometric: str, label: str) -> np.ndarray:

    if photometric == "PALETTE COLOR":
        try:
            arr = pixels.apply_color_lut(arr, ds)
            # The palette's entries have the bit depth its descriptor gives (8 or 16), not the indices'.
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        except Exception as error:
            log.debug("Could not apply the colour palette of %s", label, exc_info=True)
            raise BadImageError(
                f"The DICOM file {label} holds PALETTE COLOR pixels but its colour palette (the red, green "
                "and blue lookup tables) is missing or damaged, so the colours are unknown; export it as an "
                "RGB or grayscale DICOM, or as PNG."
            ) from error
        return _color_to_gray(arr, bits)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and not photometric.startswith("MONOCHROME"):
        # pydicom converts YBR to RGB by default; reduce colour to luminance as for other formats.
        # Colour pixels have no modality or VOI LUT (PS3.3 C.11: those are for grayscale), so their
        # full sample range maps to 0..255, as an 8-bit photo's does.
        return _color_to_gray(arr, int(ds.get("BitsStored", 0) or 0) or arr.dtype.itemsize * 8)
    if arr.ndim != 2:
        raise BadImageError(
            f"The DICOM file {label} has pixel data of shape {arr.shape}, not a single 2-D image; "
            "export one image."
        )

    # Rescale slope/intercept (or the modality LUT) first, then the file's own display window.
    arr = pixels.apply_modality_lut(arr, ds)
    low = high = None
    try:
        if ds.get("VOILUTSequence"):
            arr = pixels.apply_voi_lut(arr, ds, index=0, prefer_lut=True)
            low, high = _voi_lut_range(ds.VOILUTSequence[0])
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            arr = pixels.apply_windowing(arr, ds, index=0)
            low, high = _window_output_range(ds)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as error:
        # A broken window is no reason to refuse the image: fall back to its full value range.
        log.warning("Ignoring the display window of %s: %s", label, error)
        low = high = None
    gray = _stretch(arr, low, high)
    if photometric == "MONOCHROME1":
        # MONOCHROME1: low values are white; invert so bone is bright as in every other image.
        gray = 255 - gray
    return gray


def _undecodable(ds, label: str, error: BaseException) -> BadImageError:
    """One sentence naming the transfer syntax (name and UID), never pydicom's multi-line list of plugins."""

    # pydicom's report lists every plugin on its own line: the refusal below names what matters.
    log.debug("Could not decode the pixel data of %s: %s", label, error)
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not uid:
        return BadImageError(
            f"The DICOM file {label} has no transfer syntax in its header, so its pixel data cannot be decoded; "
            "export it again as uncompressed DICOM or PNG."
        )
    uid = UID(str(uid))
    named = f"{uid.name} ({uid})" if uid.name != str(uid) else f"an unknown transfer syntax ({uid})"
    try:
        decodable = get_decoder(uid).is_available
    except NotImplementedError:  # no decoder exists for this transfer syntax at all
        decodable = False
    if not decodable:
        return BadImageError(
            f"The DICOM file {label} is compressed with {named}, which cannot be decoded here; "
            "export it as uncompressed DICOM or PNG."
        )
    if _every_plugin_unsupported(error):
        # E.g. 12-bit JPEG Extended: GDCM's and Pillow's plugins decline it (only GPL libjpeg decodes it).
        bits = ds.get("BitsStored", None)
        depth = f" at {bits} bits per sample" if bits else ""
        return BadImageError(
            f"The DICOM file {label} is compressed with {named}{depth}, a form that no decoder installed here "
            "supports; export it as uncompressed DICOM or PNG."
        )
    return BadImageError(
        f"The DICOM file {label} could not be decoded: its pixel data in {named} is damaged or does not match "
        "its header; export it again as uncompressed DICOM or PNG."
    )


def _every_plugin_unsupported(error: BaseException) -> bool:
    """Whether every plugin declined the data as a form it does not support (rather than failing on it).

    pydicom reports one line per plugin under its first line ("  gdcm: GDCM does not support ...")."""
    plugin_lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    return bool(plugin_lines) and all("does not support" in line.lower() for line in plugin_lines)


def _color_to_gray(arr: np.ndarray, bits: int) -> np.ndarray:
    """ITU-R 601 luminance of colour pixels with ``bits`` per sample, as ``uint8`` 0..255."""
    rgb = np.ascontiguousarray(arr[..., :3])
    if rgb.dtype == np.uint8:
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    # 16- or 32-bit samples: each sample's nominal range (signed ones shifted to start at 0) to 0..255
    # first, so white stays white and an image looks the same at any depth, then luminance as above.
    # float32 is exact to far better than one of 256 levels, at half float64's memory.
    bits = max(1, min(int(bits), rgb.dtype.itemsize * 8))
    low = -(2.0 ** (bits - 1)) if np.issubdtype(rgb.dtype, np.signedinteger) else 0.0
    scaled = np.rint((rgb.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (2.0**bits - 1)))
    return cv2.cvtColor(np.clip(scaled, 0, 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)


def _voi_lut_range(item) -> tuple[float, float]:
    """The output range of a VOI LUT: its table's own min and max (descriptor bits are often wrong)."""
    raw = item.LUTData
    if isinstance(raw, (bytes, bytearray)):
        entries = int(item.LUTDescriptor[0]) or 65536
        lut = np.frombuffer(raw, dtype="<u2" if len(raw) >= 2 * entries else np.uint8)
    else:
        lut = np.asarray(list(raw) if hasattr(raw, "__len__") else [raw], dtype=np.float64)
    return float(lut.min()), float(lut.max())


def _window_output_range(ds) -> tuple[float, float]:
    """The output range of pydicom's windowing (PS3.3 C.11.2.1.2), so the window maps to 0..255."""
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        y_min, y_max = 0.0, float(2**bits - 1)
    else:
        y_min, y_max = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        y_min = y_min * float(slope) + float(intercept)
        y_max = y_max * float(slope) + float(intercept)
    return min(y_min, y_max), max(y_min, y_max)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def load_gray(source: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
    """Decode an image file (path or uploaded bytes) to a 2-D ``uint8`` grayscale array.

    Args:
        source: a file path, or the file's bytes (an upload).
        name: the name to use in messages (and for the ``.dcm`` suffix check with bytes).

    Returns:
        A C-contiguous 2-D ``uint8`` array (height, width).

    Raises:
        BadImageError: the file is missing, empty, not an image, truncated, too large or too small.
    """
    label = _display_name(source, name)
    data = _read_source(source, label)
    gray = _dicom_gray(data, label) if _is_dicom(data, source, name) else _pil_to_gray(_open_pil(data, label), label)
    return np.ascontiguousarray(gray)


def image_header(path: str | os.PathLike | bytes, name: str | None = None) -> tuple[int, int]:
    """Read ``(width, height)`` from the header without decoding pixels.

    The same size limits as ``load_gray`` apply, so a scan can list a too-large or tiny image
    without decoding it. A truncated file is only found by ``load_gray``.

    Args:
        path: a file path or the file's bytes.
        name: the name to use in messages.

    Returns:
        (width, height) in pixels, after any EXIF rotation.

    Raises:
        BadImageError: the file is missing, empty, not an image, or of a refused size.
    """
    label = _display_name(path, name)
    data = _read_source(path, label)
    if _is_dicom(data, path, name):
        ds = _read_dicom(data, label, stop_before_pixels=True)
        width, height = _dicom_size(ds, label)
        _check_size(width, height, label)
        return width, height
    img = _open_pil(data, label)
    try:
        return _oriented_size(img)
    finally:
        img.close()


def to_model_input(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize a grayscale image to the model's square input.

    Args:
        gray: 2-D array (``uint8`` 0..255; other dtypes are clipped to that range).
        size: output side in pixels.

    Returns:
        ``float32`` array (size, size, 3) in 0..255: the gray channel repeated three times.
    """
    arr = np.asarray(gray)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise BadImageError(
            f"Expected a 2-D grayscale image but received an array of shape {arr.shape}; decode it with load_gray."
        )
    if int(size) < 1:
        raise ValueError(f"size must be a positive number of pixels; got {size}.")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    # INTER_AREA to a square, as the reference's cv2.resize (aspect ratio not kept).
    resized = cv2.resize(arr, (int(size), int(size)), interpolation=cv2.INTER_AREA)
    return np.repeat(resized.astype(np.float32)[..., None], 3, axis=-1)
