"""A small SYNTHETIC practice data set for teaching offline.

The images are drawn by this module: a body outline, two dark lung fields, spine, ribs and a heart
shadow; pneumonia images add bright opacities in the lungs (a dense lobar patch for "bacteria",
patchy bilateral haze for "virus"). They are not X-rays of anyone and say nothing about medicine;
they only let the whole workflow (scan, split, train, evaluate, predict) run without real data.
The folder name and a README.txt inside it say so.

Layout: ``NORMAL/`` and ``PNEUMONIA/`` with Kermany-style names (``IM-0001-0001.jpeg``,
``person1_bacteria_1.jpeg``) and several images per patient, so the patient split matters.
Everything is drawn from one seeded generator: the same arguments give the same bytes.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from cxr_core.core.errors import BadDatasetError, BadSettingError
from cxr_core.io.atomic import read_json, write_bytes_atomic, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

PRACTICE_FOLDER_NAME = "SYNTHETIC-practice-chest-xrays"
MARKER_FILE = "synthetic_dataset.json"
GENERATOR_VERSION = 1
JPEG_QUALITY = 92

README_TEXT = """\
SYNTHETIC PRACTICE DATA - NOT REAL X-RAYS

Every image in this folder was drawn by a computer program (cxr_core.data.practice).
None of them is an X-ray of a person. They imitate only the rough look of a chest
X-ray: pneumonia images have bright blobs drawn into the lung fields.

Use them to learn the workbench offline (scanning, splitting, training, evaluation,
Grad-CAM). A model trained on them knows nothing about real chest X-rays and must
never be used on patients or shown as a medical result.

Layout: NORMAL/ ({n_normal} images) and PNEUMONIA/ ({n_pneumonia} images), file names in
the style of the Kermany et al. (2018) release, several images per made-up patient.
Settings: size {size} px, seed {seed}.
"""


def make_practice_dataset(
    dest: str | os.PathLike,
    n_normal: int = 60,
    n_pneumonia: int = 160,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write the synthetic practice data set and return its folder.

    Args:
        dest: where to put it. When the folder name does not already say "synthetic", the data
            set goes into ``dest / PRACTICE_FOLDER_NAME`` so its name always says what it is.
        n_normal: NORMAL images (at least 10).
        n_pneumonia: PNEUMONIA images (at least 10).
        size: image side in pixels (32 to 1024).
        seed: seed of every random choice; same arguments give identical files.

    Returns:
        The data set folder (holding NORMAL/, PNEUMONIA/ and README.txt), ready for ``scan_dataset``.
    """
    if n_normal < 10 or n_pneumonia < 10:
        raise BadSettingError(f"The practice set needs at least 10 images per class; got {n_normal} and {n_pneumonia}.")
    if not 32 <= size <= 1024:
        raise BadSettingError(f"The practice images' size must be between 32 and 1024 pixels; got {size}.")
    dest = Path(os.path.expanduser(os.fspath(dest)))
    folder = dest if "synthetic" in dest.name.lower() else dest / PRACTICE_FOLDER_NAME
    settings = {
        "synthetic": True, "version": GENERATOR_VERSION, "n_normal": int(n_normal),
        "n_pneumonia": int(n_pneumonia), "size": int(size), "seed": int(seed),
    }
    if read_json(folder / MARKER_FILE) == settings:
        log.info("The practice data set in %s is already made", folder)
        return folder
    if folder.exists() and any(folder.iterdir()) and read_json(folder / MARKER_FILE) is None:
        raise BadDatasetError(f"{folder} already holds other files; choose an empty folder for the practice data set.")

    # Build beside the final folder, then swap it in: a killed run leaves no half-made data set.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        _write_images(tmp, n_normal, n_pneumonia, size, seed)
        write_text_atomic(tmp / "README.txt", README_TEXT.format(**settings))
        write_json_atomic(tmp / MARKER_FILE, settings)
        if folder.exists():
            shutil.rmtree(folder)  # an older practice set (marker checked above)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Wrote the synthetic practice data set (%d NORMAL, %d PNEUMONIA) to %s", n_normal, n_pneumonia, folder)
    return folder


def _write_images(root: Path, n_normal: int, n_pneumonia: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    encode = [int(cv2.IMWRITE_JPEG_QUALITY), JPEG_QUALITY]
    # NORMAL: patients with 1-3 images, named IM-<patient>-<image>.jpeg as in the release.
    written, patient = 0, 1
    while written < n_normal:
        anatomy = _anatomy(rng)
        for image in range(1, min(int(rng.integers(1, 4)), n_normal - written) + 1):
            gray = _draw(rng, anatomy, size, subtype=None)
            _save(root / "NORMAL" / f"IM-{patient:04d}-{image:04d}.jpeg", gray, encode)
            written += 1
        patient += 1
    # PNEUMONIA: patients with 1-4 images, person<patient>_<subtype>_<running number>.jpeg.
    written, patient = 0, 1
    while written < n_pneumonia:
        anatomy = _anatomy(rng)
        subtype = "bacteria" if rng.random() < 0.65 else "virus"
        for _ in range(min(int(rng.integers(1, 5)), n_pneumonia - written)):
            written += 1
            gray = _draw(rng, anatomy, size, subtype=subtype)
            _save(root / "PNEUMONIA" / f"person{patient}_{subtype}_{written}.jpeg", gray, encode)
        patient += 1


def _save(path: Path, gray: np.ndarray, encode: list[int]) -> None:
    ok, buffer = cv2.imencode(".jpeg", gray, encode)
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 image
        raise RuntimeError(f"OpenCV could not encode {path.name}")
    write_bytes_atomic(path, buffer.tobytes())


def _anatomy(rng: np.random.Generator) -> dict[str, float]:
    """One made-up patient's proportions, shared by all their images (with small jitter later)."""
    return {
        "body_w": rng.uniform(0.40, 0.47), "body_h": rng.uniform(0.44, 0.50),
        "lung_w": rng.uniform(0.12, 0.15), "lung_h": rng.uniform(0.26, 0.32),
        "lung_dx": rng.uniform(0.16, 0.19), "lung_y": rng.uniform(0.45, 0.52),
        "heart": rng.uniform(0.09, 0.12), "tissue": rng.uniform(150, 185), "air": rng.uniform(35, 60),
    }


def _draw(rng: np.random.Generator, a: dict[str, float], size: int, subtype: str | None) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # Each exposure differs a little in position and brightness, as repeat films do.
    cx = 0.5 + rng.uniform(-0.03, 0.03)
    cy = 0.5 + rng.uniform(-0.03, 0.03)
    img = np.full((size, size), 15.0, np.float32)
    body = ((xx - cx) / a["body_w"]) ** 2 + ((yy - cy) / a["body_h"]) ** 2 < 1
    img[body] = a["tissue"]
    lungs = np.zeros((size, size), bool)
    for side in (-1, 1):
        lx = cx + side * a["lung_dx"]
        ly = a["lung_y"] + (cy - 0.5)
        lungs |= ((xx - lx) / a["lung_w"]) ** 2 + ((yy - ly) / a["lung_h"]) ** 2 < 1
    img[lungs] = a["air"]
    # Ribs: faint bright arcs across the lung fields.
    ribs = (np.sin((yy - 0.2 * (xx - cx) ** 2) * np.pi * 18.0) > 0.85) & lungs
    img[ribs] += 25
    # Spine and heart shadow sit on the midline, over the lungs.
    img[(np.abs(xx - cx) < 0.035) & body] = a["tissue"] + 15
    heart = ((xx - (cx + 0.04)) / (a["heart"] * 1.2)) ** 2 + ((yy - (cy + 0.1)) / a["heart"]) ** 2 < 1
    img[heart] = a["tissue"] - 10

    if subtype is not None:
        img += _opacities(rng, xx, yy, lungs, cx, a, subtype)

    img *= rng.uniform(0.92, 1.08)
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=max(size / 128.0, 0.6))
    img += rng.normal(0.0, 6.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _opacities(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, lungs: np.ndarray, cx: float, a: dict, subtype: str
) -> np.ndarray:
    """Bright blobs inside the lungs: one dense patch (bacteria) or several faint ones (virus)."""
    extra = np.zeros(xx.shape, np.float32)
    if subtype == "bacteria":
        blobs = [(rng.choice([-1, 1]), rng.uniform(0.07, 0.11), rng.uniform(85, 115))]
    else:
        blobs = [(side, rng.uniform(0.05, 0.08), rng.uniform(50, 75)) for side in (-1, 1) for _ in range(2)]
    for side, radius, strength in blobs:
        bx = cx + side * a["lung_dx"] + rng.uniform(-0.5, 0.5) * a["lung_w"]
        by = a["lung_y"] + rng.uniform(-0.5, 0.6) * a["lung_h"]
        extra += strength * np.exp(-(((xx - bx) ** 2 + (yy - by) ** 2) / (2 * radius**2)))
    return extra * lungs
