"""The shortcut lab: a copy of a data set with a planted shortcut, for teaching.

Shortcut learning is usually taught from papers: a hospital's identity alone predicted the label
with AUC 0.86 (Zech et al. 2018), and COVID-19 models read the text and markers on the films, not
the lungs (DeGrave et al. 2021). The lab lets a class see it happen. ``make_shortcut_lab`` copies
a data set and burns a small bright marker, like a radiographer's lead letter "L" or "R" (a white
letter and frame on black, 8 % of the image's shorter side), into a
corner of most PNEUMONIA images and a few NORMAL ones (90 % and 10 % by default). A model
trained on the copy scores well on its own split, because the marker gives the answer away, and
worse on a clean set; Grad-CAM shows where it looked (``evaluation.external`` reports the share of
marked images whose map peaks on the marker).

The copy keeps every image's folder (class folders or the Kermany layout) and file name, writes
every image as a lossless 8-bit grayscale PNG of the pixels the workbench reads (``load_gray``),
so that outside the marker box every pixel equals the original's, and the file format cannot
become a second shortcut. Its ``manifest.csv`` keeps the original manifest's columns (patient_id,
subtype, source_resolution, ...) and adds ``marker`` (0/1) and ``marker_x``, ``marker_y``,
``marker_w``, ``marker_h``: the box in pixels of the written image (empty when unmarked).
The copy is built in a hidden folder beside its destination and renamed into place at the end, so
an interrupted run leaves no half-made data set.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pandas as pd

from cxr_core.core.errors import BadDatasetError, BadImageError, BadSettingError, CxrError
from cxr_core.core.labels import CLASSES, NEGATIVE, POSITIVE
from cxr_core.data.scan import SIDECAR_NAME, scan_dataset
from cxr_core.io.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from cxr_core.io.hashing import bytes_sha256
from cxr_core.io.images import load_gray

log = logging.getLogger(__name__)

DEFAULT_POSITIVE_RATE = 0.9
DEFAULT_NEGATIVE_RATE = 0.1
DEFAULT_SEED = 123
#: The marker's side as a share of the image's shorter side (lead markers are about this size on a film).
MARKER_FRACTION = 0.08
MARKER_MIN_SIDE = 8
#: The marker lies inside a corner region this share of the width and height, at least EDGE_FRACTION from the edge.
CORNER_FRACTION = 0.2
EDGE_FRACTION = 0.02
LETTERS = ("L", "R")
MARKER_COLUMNS = ["marker", "marker_x", "marker_y", "marker_w", "marker_h"]
SETTINGS_FILE = "shortcut_lab.json"
FOLDER_SUFFIX = "-shortcut-lab"

README_TEXT = """\
SHORTCUT LAB: A COPY WITH A PLANTED SHORTCUT

This folder is a copy of {source} in which a small bright marker (a white letter L or R
in a white frame, like a radiographer's lead marker) was burnt into a corner of {positive_rate:.0%} of the
PNEUMONIA images and {negative_rate:.0%} of the NORMAL images (seed {seed}). The marker says nothing
about the lungs, yet it predicts the label: a model trained here can score well by finding the
marker, and then fail on clean images. manifest.csv records which images carry it and where
(marker, marker_x, marker_y, marker_w, marker_h, in pixels).

Use it to teach shortcut learning; never to train a model meant for anything else.
"""


@dataclass
class LabResult:
    """What ``make_shortcut_lab`` wrote.

    Attributes:
        folder: the new data set.
        counts: images copied per class.
        marked: images that carry the marker, per class.
        skipped: images that could not be copied: path, reason (unreadable files and broken images).
        duplicates: files left out because their bytes repeat another image of the data set.
    """

    folder: Path
    counts: dict[str, int]
    marked: dict[str, int]
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["path", "reason"]))
    duplicates: int = 0

    @property
    def n_images(self) -> int:
        return int(sum(self.counts.values()))


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(os.fspath(path))).resolve()


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_rates(positive_rate: float, negative_rate: float) -> None:
    """Refuse shares outside 0..1, in one sentence."""
    for name, rate in (("PNEUMONIA", positive_rate), ("NORMAL", negative_rate)):
        if not (isinstance(rate, (int, float)) and np.isfinite(rate) and 0.0 <= float(rate) <= 1.0):
            raise BadSettingError(f"The share of {name} images that get the marker must be between 0 and 1; "
                                  f"got {rate}.")


def check_destination(data: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The destination folder, or one sentence on why it cannot be used.

    Raises:
        BadSettingError: ``out`` is (or lies inside) the data set, is a file, or already holds files.
    """
    source, target = _resolved(data), _resolved(out)
    if _is_within(target, source):
        raise BadSettingError(f"The lab copy {target} would lie inside the data set it copies ({source}); "
                              "choose a folder outside it.")
    if target.exists() and not target.is_dir():
        raise BadSettingError(f"{target} is a file; choose a new or empty folder for the lab copy.")
    if target.is_dir() and any(target.iterdir()):
        raise BadSettingError(f"The folder {target} already holds files; choose a new or empty folder for the "
                              "lab copy.")
    return target


def free_folder(root: str | os.PathLike, source_name: str) -> Path:
    """A folder under ``root`` for the lab copy of ``source_name`` that does not exist yet."""
    root = Path(root)
    base = f"{source_name}{FOLDER_SUFFIX}"
    candidate, i = root / base, 1
    while candidate.exists():
        i += 1
        candidate = root / f"{base}-{i}"
    return candidate


# ---------------------------------------------------------------------------------------------
# The marker
# ---------------------------------------------------------------------------------------------


def marker_side(width: int, height: int) -> int:
    """The marker's side in pixels for an image of this size (``MARKER_FRACTION`` of the shorter side)."""
    return max(MARKER_MIN_SIDE, int(round(MARKER_FRACTION * min(width, height))))


def place_marker(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """A seeded box (x, y, w, h) inside one of the four corner regions of a ``width`` x ``height`` image."""
    side = marker_side(width, height)
    spans = []
    for extent in (width, height):
        edge = int(round(EDGE_FRACTION * extent))
        region = max(int(round(CORNER_FRACTION * extent)), edge + side)
        high = max(edge, min(region, extent) - side)
        offset = int(rng.integers(edge, high + 1))
        spans.append((offset, extent))
    right, bottom = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
    (ox, w_ext), (oy, h_ext) = spans
    x = w_ext - side - ox if right else ox
    y = h_ext - side - oy if bottom else oy
    return int(max(0, x)), int(max(0, y)), int(min(side, w_ext)), int(min(side, h_ext))


def draw_marker(gray: np.ndarray, box: tuple[int, int, int, int], letter: str) -> np.ndarray:
    """A copy of ``gray`` with a lead marker at ``box`` (x, y, w, h): a bright ``letter`` and frame on black.

    Lead stops X-rays, so a real marker shows as a white letter; the frame keeps it high-contrast on
    any background. Only pixels inside the box change.
    """
    x, y, w, h = box
    out = np.array(gray, dtype=np.uint8, copy=True)
    tile = np.zeros((h, w), np.uint8)
    frame = max(1, int(round(min(w, h) / 8)))
    tile[:frame, :] = tile[-frame:, :] = 255
    tile[:, :frame] = tile[:, -frame:] = 255
    # The letter fills about 60 % of the box, in OpenCV's plain font.
    font = cv2.FONT_HERSHEY_SIMPLEX
    thickness = max(1, int(round(min(w, h) / 7)))
    (tw, th), _ = cv2.getTextSize(letter, font, 1.0, thickness)
    scale = 0.6 * min(w / max(tw, 1), h / max(th, 1))
    (tw, th), _ = cv2.getTextSize(letter, font, scale, thickness)
    origin = ((w - tw) // 2, (h + th) // 2)
    cv2.putText(tile, letter, origin, font, scale, 255, thickness, lineType=cv2.LINE_AA)
    out[y:y + h, x:x + w] = tile
    return out


# ---------------------------------------------------------------------------------------------
# The copy
# ---------------------------------------------------------------------------------------------


def _original_sidecar(root: Path) -> pd.DataFrame | None:
    """The data set's own manifest.csv keyed by lower-case relative path, or None."""
    path = root / SIDECAR_NAME
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path, low_memory=False)
    except Exception as error:  # noqa: BLE001 (a broken side-car never stops the copy; the scan ignores it too)
        log.warning("%s could not be read (%s); its columns are not copied.", path, error)
        return None
    columns = {str(c).strip().lower(): c for c in table.columns}
    if "path" not in columns:
        return None
    keys = table[columns["path"]].astype(str).str.strip().str.replace("\\", "/", regex=False)
    keys = keys.str.replace(r"^(\./)+", "", regex=True).str.lower()
    table = table.loc[~keys.duplicated()].copy()
    table.index = keys[~keys.duplicated()]
    table.columns = [str(c).strip() for c in table.columns]
    return table.loc[:, ~table.columns.duplicated()]


def _target_relpaths(relpaths: list[str]) -> list[str]:
    """Each image's path in the copy: the same folder and name, with ``.png``; a clash keeps the old suffix."""
    taken: set[str] = set()
    out = []
    for relpath in relpaths:
        path = Path(relpath)
        target = path.with_suffix(".png").as_posix()
        if target.lower() in taken:
            target = path.with_name(path.name + ".png").as_posix()
        taken.add(target.lower())
        out.append(target)
    return out


def make_shortcut_lab(
    data: str | os.PathLike,
    out: str | os.PathLike,
    positive_rate: float = DEFAULT_POSITIVE_RATE,
    negative_rate: float = DEFAULT_NEGATIVE_RATE,
    seed: int = DEFAULT_SEED,
    on_progress: Callable[[int, int], None] | None = None,
) -> LabResult:
    """Copy a data set and burn a marker into a share of its PNEUMONIA and NORMAL images.

    Exactly ``round(rate x count)`` images of each class are marked, chosen with ``seed``; each
    marked image gets a box of ``MARKER_FRACTION`` of its shorter side at a seeded position inside
    one of its four corner regions, with the letter L or R.

    Args:
        data: the data set (any layout ``scan_dataset`` accepts).
        out: the new data set's folder: must not exist, or be empty, and lie outside ``data``.
        positive_rate: share of PNEUMONIA images that get the marker (0..1).
        negative_rate: share of NORMAL images that get the marker (0..1).
        seed: the seed of every choice: the same arguments give the same copy.
        on_progress: called with (done, total) as images are written.

    Returns:
        A ``LabResult``; images that could not be read are listed in ``skipped``, not copied.

    Raises:
        BadSettingError: a share outside 0..1, or an unusable destination.
        BadDatasetError: ``data`` is not a data set, is already a lab copy, or no image could be copied.
    """
    check_rates(positive_rate, negative_rate)
    target = check_destination(data, out)
    scan = scan_dataset(data)
    source = Path(scan.root).resolve()
    if _is_within(target, source):  # ``data`` was the folder above the data set
        check_destination(source, target)
    sidecar = _original_sidecar(source)
    if (source / SETTINGS_FILE).is_file() or (sidecar is not None and "marker" in sidecar.columns):
        raise BadDatasetError(f"{source} is already a shortcut-lab copy; make the lab from the original data set.")
    manifest = scan.manifest.sort_values("relpath", ignore_index=True)
    plan = _plan_markers(manifest, positive_rate, negative_rate, seed)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        rows, skipped = _write_images(tmp, manifest, plan, sidecar, on_progress)
        skipped = pd.DataFrame([*scan.skipped.to_dict("records"), *skipped], columns=["path", "reason"])
        if not rows:
            raise BadDatasetError(f"None of the images in {source} could be read, so there is nothing to copy.")
        table = _manifest_table(rows)
        write_bytes_atomic(tmp / SIDECAR_NAME, table.to_csv(index=False).encode("utf-8"))
        lab = LabResult(target, {c: int((table["label"] == c).sum()) for c in CLASSES},
                        {c: int(((table["label"] == c) & (table["marker"] == 1)).sum()) for c in CLASSES},
                        skipped, int(len(scan.duplicates)))
        rates = {"positive_rate": float(positive_rate), "negative_rate": float(negative_rate), "seed": int(seed)}
        write_json_atomic(tmp / SETTINGS_FILE, {
            "shortcut_lab": True, "source": str(source), **rates, "marker_fraction": MARKER_FRACTION,
            "counts": lab.counts, "marked": lab.marked, "duplicates_left_out": lab.duplicates,
            "skipped": skipped.to_dict("records")})
        write_text_atomic(tmp / "README.txt", README_TEXT.format(source=source.name, **rates))
        if target.is_dir():
            target.rmdir()  # empty (checked above); os.replace cannot replace a folder on every system
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Wrote the shortcut lab %s: %s images, %s marked", target, lab.counts, lab.marked)
    return lab


@dataclass
class _MarkerPlan:
    """Every random choice of a copy, drawn before any file is read (a skipped image moves no other marker)."""

    marked: np.ndarray        # bool per manifest row
    letters: np.ndarray       # index into LETTERS per row
    place_seeds: np.ndarray   # the seed of each row's position
    relpaths: list[str]       # each row's path in the copy


def _plan_markers(manifest: pd.DataFrame, positive_rate: float, negative_rate: float, seed: int) -> _MarkerPlan:
    """Exactly ``round(rate x count)`` images of each class marked, chosen with ``seed``."""
    rng = np.random.default_rng(int(seed))
    marked = np.zeros(len(manifest), dtype=bool)
    for label, rate in ((POSITIVE, positive_rate), (NEGATIVE, negative_rate)):
        members = np.flatnonzero(manifest["label"].to_numpy() == label)
        marked[rng.permutation(members)[: int(round(float(rate) * len(members)))]] = True
    return _MarkerPlan(marked, rng.integers(0, len(LETTERS), size=len(manifest)),
                       rng.integers(0, 2**32, size=len(manifest), dtype=np.uint64),
                       _target_relpaths(manifest["relpath"].tolist()))


def _write_images(tmp: Path, manifest: pd.DataFrame, plan: _MarkerPlan, sidecar: pd.DataFrame | None,
                  on_progress: Callable[[int, int], None] | None) -> tuple[list[dict], list[dict]]:
    """Write every readable image as a PNG (with its marker when planned): (manifest rows, skipped)."""
    rows: list[dict] = []
    skipped: list[dict] = []
    for i, row in enumerate(manifest.itertuples(index=False)):
        if on_progress is not None:
            on_progress(i, len(manifest))
        try:
            gray = load_gray(row.path)
        except (BadImageError, OSError) as error:
            reason = str(error) if isinstance(error, CxrError) else f"{Path(row.path).name} could not be read."
            skipped.append({"path": row.path, "reason": reason})
            continue
        box = None
        if plan.marked[i]:
            box = place_marker(np.random.default_rng(int(plan.place_seeds[i])), gray.shape[1], gray.shape[0])
            gray = draw_marker(gray, box, LETTERS[int(plan.letters[i])])
        ok, png = cv2.imencode(".png", gray)
        if not ok:  # pragma: no cover - OpenCV always encodes a 2-D uint8 image
            raise RuntimeError(f"OpenCV could not encode {row.relpath}")
        write_bytes_atomic(tmp / plan.relpaths[i], png.tobytes())
        rows.append(_manifest_row(row, plan.relpaths[i], png.tobytes(), box, sidecar))
    if on_progress is not None:
        on_progress(len(manifest), len(manifest))
    return rows, skipped


def _manifest_row(row, relpath: str, data: bytes, box, sidecar: pd.DataFrame | None) -> dict:
    """One row of the copy's manifest: the original manifest's columns, then the marker's."""
    record: dict = {}
    if sidecar is not None:
        key = str(row.relpath).lower()
        if key in sidecar.index:
            record.update(sidecar.loc[key].to_dict())
    record = {k: v for k, v in record.items() if str(k).lower() not in ("path", "label", "sha256")}
    record.update({"path": relpath, "label": row.label})
    record.setdefault("patient_id", row.patient_id)
    record.setdefault("subtype", row.subtype)
    record["sha256"] = bytes_sha256(data)  # the written file's, not the original's
    if box is None:
        record.update(marker=0, marker_x=None, marker_y=None, marker_w=None, marker_h=None)
    else:
        record.update(marker=1, marker_x=box[0], marker_y=box[1], marker_w=box[2], marker_h=box[3])
    return record


def _manifest_table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    first = ["path", "label"]
    ordered = first + [c for c in table.columns if c not in first and c not in MARKER_COLUMNS] + MARKER_COLUMNS
    table = table[ordered]
    table["marker"] = table["marker"].astype(int)
    for column in MARKER_COLUMNS[1:]:
        table[column] = pd.array(table[column], dtype="Int64")  # whole pixels; empty when unmarked
    return table


def read_markers(manifest: pd.DataFrame) -> pd.DataFrame | None:
    """The marker columns of a scanned manifest (``marker`` 0/1 and the box), or None when it has none.

    Rows whose ``marker`` is missing count as unmarked.
    """
    if "marker" not in manifest.columns:
        return None
    out = pd.DataFrame(index=manifest.index)
    out["marker"] = pd.to_numeric(manifest["marker"], errors="coerce").fillna(0).astype(int)
    for column in MARKER_COLUMNS[1:]:
        values = manifest[column] if column in manifest.columns else pd.Series(np.nan, index=manifest.index)
        out[column] = pd.to_numeric(values, errors="coerce")
    complete = out[MARKER_COLUMNS[1:]].notna().all(axis=1)
    out.loc[~complete, "marker"] = 0  # a marker without its box cannot be checked
    return out
