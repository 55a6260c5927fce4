"""Find the images of a data set, build its manifest, and split it.

Two layouts are understood, with folder names matched case-insensitively:

* Kermany: ``[chest_xray/]{train,val,test}/{NORMAL,PNEUMONIA}/*`` (the release's own split is kept
  in the ``official_split`` column);
* class folders: ``{NORMAL|HEALTHY, PNEUMONIA}/*`` (HEALTHY is read as NORMAL).

The folder may also be one level above the data set (a zip that extracted to ``x/chest_xray``),
and class folders may hold subfolders. Each image is hashed: the same bytes under two names are
kept once, so one image can never land in both train and test.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_core.core.config import SPLIT_MODES
from cxr_core.core.errors import BadDatasetError, BadImageError
from cxr_core.core.labels import CLASSES, LABEL_TO_Y, SPLITS, classes_for, require_both_classes
from cxr_core.core.tasks import get_task
from cxr_core.io.hashing import bytes_sha256
from cxr_core.io.images import IMAGE_SUFFIXES, image_header

log = logging.getLogger(__name__)


# Folder names (lower case) that mean a class, and those that mean a part of the official split.
CLASS_FOLDERS = {"normal": "NORMAL", "healthy": "NORMAL", "pneumonia": "PNEUMONIA"}
SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
# Archive wrappers around a data set (the Kermany zip extracts to chest_xray/).
WRAPPER_FOLDERS = {"chest_xray", "chest-xray", "chestxray", "chestxray2017"}
# Files and folders that operating systems and archivers leave behind; never images.
JUNK_NAMES = {"thumbs.db", "desktop.ini", "__macosx", ".ds_store"}

#: The manifest's column of a PNEUMONIA image's kind (``parse_subtype``), which the subtype task learns.
SUBTYPE_COLUMN = "subtype"
MANIFEST_COLUMNS = [
    "path", "relpath", "label", "y", "patient_id", SUBTYPE_COLUMN, "official_split", "sha256", "width", "height",
]

# A data set's own manifest (optional): its extra columns join the scan's manifest by relpath.
SIDECAR_NAME = "manifest.csv"
SIDECAR_RESERVED = set(MANIFEST_COLUMNS)

_PERSON_RE = re.compile(r"^(person\d+)_", re.IGNORECASE)
_IM_RE = re.compile(r"^((?:[A-Za-z]+\d*-)?IM-\d+)-\d+", re.IGNORECASE)


@dataclass
class ScanResult:
    """What ``scan_dataset`` found.

    Attributes:
        root: the data set folder actually used (may be below the folder given).
        layout: ``kermany`` or ``class_folders``.
        manifest: one row per usable image (see ``MANIFEST_COLUMNS``).
        skipped: files that could not be used: path, reason.
        duplicates: files whose bytes repeat an earlier one: path, duplicate_of, label_conflict.
    """

    root: Path
    layout: str
    manifest: pd.DataFrame
    skipped: pd.DataFrame
    duplicates: pd.DataFrame


# ---------------------------------------------------------------------------------------------
# File names
# ---------------------------------------------------------------------------------------------


def parse_patient_id(filename: str) -> str:
    """Patient id from a Kermany-style file name.

    ``person123_bacteria_456.jpeg`` -> ``person123``; ``IM-0115-0001.jpeg`` -> ``IM-0115``;
    ``NORMAL2-IM-0927-0001.jpeg`` -> ``NORMAL2-IM-0927``; anything else -> the file stem.

    Args:
        filename: a file name or path.

    Returns:
        The patient id (case kept as in the name).
    """
    stem = Path(str(filename)).stem
    for pattern in (_PERSON_RE, _IM_RE):
        match = pattern.match(stem)
        if match:
            return match.group(1)
    return stem


def parse_subtype(filename: str, label: str) -> str:
    """Pneumonia subtype from the file name.

    Args:
        filename: a file name or path.
        label: ``NORMAL`` or ``PNEUMONIA``.

    Returns:
        ``normal``, ``bacteria``, ``virus`` or ``unknown``.
    """
    if str(label).upper() == "NORMAL":
        return "normal"
    stem = Path(str(filename)).stem.lower()
    if "bacteria" in stem:
        return "bacteria"
    if "virus" in stem:
        return "virus"
    return "unknown"


def task_labels(manifest: pd.DataFrame, task: str = "pneumonia") -> pd.DataFrame:
    """The manifest with ``y`` and ``label`` of ``task``'s classes (``labels.classes_for``).

    The pneumonia task is the manifest as scanned. For ``subtype``, ``y`` is the index of NORMAL,
    BACTERIA or VIRUS and ``label`` its name, read from the ``subtype`` column (parsed from the
    file names when absent).

    Raises:
        BadDatasetError: for ``subtype``, when some PNEUMONIA images carry no subtype in their name.
    """
    found = get_task(task)
    column = found.needs  # the manifest column that holds the class ("": the scanned label is the class)
    if not column or manifest.empty:
        return manifest
    classes = found.classes
    if column in manifest.columns:
        subtypes = manifest[column].fillna("unknown").astype(str).str.lower()
    else:
        subtypes = pd.Series([parse_subtype(path, label) for path, label in zip(manifest["path"], manifest["label"])],
                             index=manifest.index)
    names = subtypes.str.upper()
    unknown = ~names.isin(classes)
    if unknown.any():
        n_pneumonia = int((manifest["label"].astype(str) != "NORMAL").sum())
        raise BadDatasetError(
            f"{int(unknown.sum())} of the {n_pneumonia} PNEUMONIA images have no subtype (bacteria or virus) in their "
            "file name, so this data set cannot train the subtype task; choose the pneumonia task or use a data set "
            "whose files are named like person1_bacteria_1.jpeg.")
    result = manifest.copy()
    result["label"] = names.to_numpy()
    result["y"] = names.map({name: index for index, name in enumerate(classes)}).astype(int).to_numpy()
    return result


# ---------------------------------------------------------------------------------------------
# Layout detection
# ---------------------------------------------------------------------------------------------


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_NAMES


def _subdirs(folder: Path) -> dict[str, list[Path]]:
    """Visible subfolders by lower-case name (several may differ only by case)."""
    found: dict[str, list[Path]] = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return found
    for entry in entries:
        if _is_junk(entry.name):
            continue
        try:
            if entry.is_dir():
                found.setdefault(entry.name.lower(), []).append(entry)
        except OSError:
            continue
    return found


def _class_dirs(folder: Path) -> list[tuple[str, Path]]:
    return [
        (CLASS_FOLDERS[name], path)
        for name, paths in sorted(_subdirs(folder).items())
        if name in CLASS_FOLDERS
        for path in paths
    ]


def _detect(folder: Path) -> tuple[str, Path, list[tuple[str, str, Path]]] | None:
    """Recognise a layout in ``folder``: (layout, root, [(label, official_split, class_dir)])."""
    subdirs = _subdirs(folder)
    parts: list[tuple[str, str, Path]] = []
    for name, paths in sorted(subdirs.items()):
        if name in SPLIT_FOLDERS:
            for path in paths:
                parts += [(label, SPLIT_FOLDERS[name], cls) for label, cls in _class_dirs(path)]
    if parts:
        return "kermany", folder, parts
    classes = _class_dirs(folder)
    if classes:
        return "class_folders", folder, [(label, "", path) for label, path in classes]
    for name in sorted(subdirs):
        if name in WRAPPER_FOLDERS:
            for path in subdirs[name]:
                found = _detect(path)
                if found:
                    return found
    return None


def find_dataset_root(root: str | os.PathLike) -> tuple[str, Path, list[tuple[str, str, Path]]]:
    """Find the data set inside ``root`` (or one level below it).

    Args:
        root: the folder the user gave.

    Returns:
        (layout, dataset_root, [(label, official_split, class_folder), ...]).

    Raises:
        BadDatasetError: the folder is missing, a file, or holds no recognised layout.
    """
    root = Path(os.path.expanduser(os.fspath(root)))
    if not root.exists():
        raise BadDatasetError(f"The folder {root} does not exist; check the path or download the data set first.")
    if not root.is_dir():
        hint = " (a zip archive must be extracted first)" if root.suffix.lower() == ".zip" else ""
        raise BadDatasetError(f"{root} is a file, not a folder{hint}; choose the folder that holds the images.")
    found = _detect(root)
    if found:
        return found
    # One level above the data set: e.g. a zip extracted to root/<anything>/{NORMAL,PNEUMONIA}.
    candidates = [path for paths in _subdirs(root).values() for path in paths]
    for child in sorted(candidates):
        found = _detect(child)
        if found:
            log.info("Using the data set found in %s", found[1])
            return found
    names = sorted(path.name for path in candidates)
    if names:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise BadDatasetError(
            f"The folder {root} holds the folders {shown}, but a data set needs NORMAL (or HEALTHY) and "
            "PNEUMONIA folders, optionally inside train/val/test folders; rename or move them."
        )
    has_images = any(
        entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES for entry in root.iterdir()
    )
    if has_images:
        raise BadDatasetError(
            f"The folder {root} holds images but no class folders; put them into NORMAL and PNEUMONIA folders."
        )
    raise BadDatasetError(
        f"The folder {root} is empty of data; it needs NORMAL (or HEALTHY) and PNEUMONIA folders of images."
    )


# ---------------------------------------------------------------------------------------------
# Walking and reading files
# ---------------------------------------------------------------------------------------------


def _dir_key(path: str | Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _walk_files(
    class_dir: Path, visited: set[tuple[int, int]], class_keys: set[tuple[int, int]]
) -> list[Path]:
    """Every visible file under ``class_dir``, following symlinks but never a folder twice.

    ``class_keys`` identify every class folder: a link leading into another class folder is not
    followed, so its images keep their own label.
    """
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        key = _dir_key(dirpath)
        if key is None:
            dirnames[:] = []
            continue
        if key in visited or (key in class_keys and Path(dirpath) != class_dir):
            # A symlink loop, a folder already scanned through another link, or another class.
            dirnames[:] = []
            continue
        visited.add(key)
        dirnames[:] = sorted(name for name in dirnames if not _is_junk(name))
        folder = Path(dirpath)
        files.extend(folder / filename for filename in sorted(filenames) if not _is_junk(filename))
    return files


#: What this process has already read of each file, by (path, size, modification time in ns): a long-lived
#: process (the app's server, a resident training worker) scans the same data set again in a stat per file.
_INSPECTED: dict[tuple[str, int, int], tuple[str, int, int]] = {}
_INSPECTED_MAX = 500_000


def _inspect(path: Path) -> tuple[str, int, int] | str:
    """(sha256, width, height) of one file, or the reason it cannot be used."""
    try:
        stat = os.stat(path)
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        known = _INSPECTED.get(key)
        if known is not None:
            return known
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        return f"The file {path.name} could not be read ({error.strerror or error})."
    try:
        width, height = image_header(data, name=path.name)
    except BadImageError as error:
        return str(error)
    found = (bytes_sha256(data), width, height)
    if len(_INSPECTED) >= _INSPECTED_MAX:  # bounded: a server that scans ever new folders forgets the oldest
        with contextlib.suppress(RuntimeError, StopIteration, KeyError):  # another thread changed it meanwhile
            _INSPECTED.pop(next(iter(_INSPECTED)))
    _INSPECTED[key] = found
    return found


def _known(path: Path) -> tuple[str, int, int] | None:
    """What this process read of ``path`` before, if the file has not changed since (else None)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return _INSPECTED.get((str(path), stat.st_size, stat.st_mtime_ns))


def _inspect_all(paths: list[Path]) -> list[tuple[str, int, int] | str]:
    found: list[tuple[str, int, int] | str | None] = [_known(path) for path in paths]
    unread = [i for i, known in enumerate(found) if known is None]
    if len(unread) < 64:
        results = [_inspect(paths[i]) for i in unread]
    else:
        # Reading and hashing release the GIL; a few threads hide disk latency (network drives).
        workers = min(8, (os.cpu_count() or 2) * 2)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_inspect, [paths[i] for i in unread], chunksize=32))
    for i, result in zip(unread, results):
        found[i] = result
    return found


# ---------------------------------------------------------------------------------------------
# Scanning
# ---------------------------------------------------------------------------------------------


def scan_dataset(root: str | os.PathLike) -> ScanResult:
    """Find every image of a data set and describe it.

    Args:
        root: the data set folder (Kermany layout or class folders), or the folder above it.

    Returns:
        A ``ScanResult``; images that cannot be used are listed in ``skipped``, repeated bytes in
        ``duplicates``; neither is in ``manifest``.

    Raises:
        BadDatasetError: the folder is missing, a file, has no images, or only one class.
    """
    layout, dataset_root, parts = find_dataset_root(root)
    visited: set[tuple[int, int]] = set()
    class_keys = {key for key in (_dir_key(class_dir) for _, _, class_dir in parts) if key is not None}
    candidates: list[tuple[Path, str, str]] = []
    skipped: list[dict[str, str]] = []
    for label, official, class_dir in parts:
        for path in _walk_files(class_dir, visited, class_keys):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append({"path": str(path.absolute()),
                                "reason": f"The file {path.name} is not an image file type."})
                continue
            candidates.append((path, label, official))

    results = _inspect_all([path for path, _, _ in candidates])
    rows: list[dict] = []
    for (path, label, official), result in zip(candidates, results):
        absolute = os.path.abspath(path)
        if isinstance(result, str):
            skipped.append({"path": absolute, "reason": result})
            continue
        sha, width, height = result
        rows.append(
            {
                "path": absolute,
                "relpath": path.relative_to(dataset_root).as_posix(),
                "label": label,
                "y": LABEL_TO_Y[label],
                "patient_id": parse_patient_id(path.name),
                SUBTYPE_COLUMN: parse_subtype(path.name, label),
                "official_split": official,
                "sha256": sha,
                "width": int(width),
                "height": int(height),
            }
        )

    manifest, duplicates = _drop_duplicates(rows)
    extra = read_sidecar_columns(dataset_root, manifest["relpath"])
    if len(extra.columns):
        manifest = pd.concat([manifest, extra.set_index(manifest.index)], axis=1)
    skipped_df = pd.DataFrame(skipped, columns=["path", "reason"]).sort_values("path", ignore_index=True)
    _check_classes(manifest, dataset_root, len(skipped_df))
    log.info(
        "Scanned %s (%s): %d images, %d skipped, %d duplicates",
        dataset_root, layout, len(manifest), len(skipped_df), len(duplicates),
    )
    return ScanResult(dataset_root, layout, manifest, skipped_df, duplicates)


def _normalise_relpath(relpath: object) -> str:
    """A relative path compared case-insensitively with forward slashes and no leading ``./``."""
    text = str(relpath).strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return "/".join(part for part in text.split("/") if part not in ("", ".")).lower()


def read_sidecar_columns(root: str | os.PathLike, relpaths) -> pd.DataFrame:
    """Extra columns of a data set's own ``manifest.csv``, matched to the scanned images.

    A data set may carry ``root/manifest.csv`` with a ``path`` column (relative to ``root``) and
    further facts per image (a scanner, a hospital, which copy the image was made from). Columns
    that a scan computes itself (``SIDECAR_RESERVED``) are left out. A file that cannot be parsed,
    or that has no ``path`` column, is ignored with a logged warning.

    Args:
        root: the data set folder (``ScanResult.root``).
        relpaths: the scanned images' relative paths (forward slashes), in manifest order.

    Returns:
        One row per entry of ``relpaths`` (index 0..n-1) with the side-car's extra columns; NaN
        where an image has no row in the side-car. No columns when there is nothing to add.
    """
    relpaths = [str(p) for p in relpaths]
    empty = pd.DataFrame(index=pd.RangeIndex(len(relpaths)))
    path = Path(root) / SIDECAR_NAME
    if not path.is_file():
        return empty
    try:
        table = pd.read_csv(path, low_memory=False)
        columns = {str(c).strip().lower(): c for c in table.columns}
        if "path" not in columns:
            log.warning("%s has no path column; its columns are not used.", path)
            return empty
        keep = [c for c in table.columns if str(c).strip().lower() not in SIDECAR_RESERVED]
        if not keep:
            return empty
        keys = table[columns["path"]].map(_normalise_relpath)
        table = table.loc[~keys.duplicated(), keep].set_index(keys[~keys.duplicated()])
        table.columns = [str(c).strip() for c in table.columns]
        table = table.loc[:, ~table.columns.duplicated()]
        wanted = [_normalise_relpath(p) for p in relpaths]
        merged = table.reindex(wanted).reset_index(drop=True)
    except Exception as error:  # noqa: BLE001 (a broken side-car must never fail the scan)
        log.warning("%s could not be read (%s); its columns are not used.", path, error)
        return empty
    matched = int(merged.notna().any(axis=1).sum())
    log.info("%s: %d of %d images matched; columns %s", path, matched, len(relpaths), list(merged.columns))
    return merged


def _drop_duplicates(rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the first file (by path) of each distinct content; list the others."""
    rows = sorted(rows, key=lambda row: row["path"])
    first: dict[str, dict] = {}
    kept: list[dict] = []
    duplicates: list[dict] = []
    for row in rows:
        original = first.get(row["sha256"])
        if original is None:
            first[row["sha256"]] = row
            kept.append(row)
            continue
        conflict = original["label"] != row["label"]
        if conflict:
            log.warning("%s and %s hold the same image under different labels", original["path"], row["path"])
        duplicates.append({"path": row["path"], "duplicate_of": original["path"], "label_conflict": conflict})
    manifest = pd.DataFrame(kept, columns=MANIFEST_COLUMNS)
    manifest["y"] = manifest["y"].astype(int)
    manifest["width"] = manifest["width"].astype(int)
    manifest["height"] = manifest["height"].astype(int)
    return manifest, pd.DataFrame(duplicates, columns=["path", "duplicate_of", "label_conflict"])


def _check_classes(manifest: pd.DataFrame, root: Path, n_skipped: int) -> None:
    if manifest.empty:
        extra = f" ({n_skipped} files could not be read)" if n_skipped else ""
        raise BadDatasetError(
            f"The folder {root} has class folders but no usable images{extra}; add JPEG, PNG or DICOM images."
        )
    counts = manifest["label"].value_counts()
    missing = [label for label in CLASSES if counts.get(label, 0) == 0]
    if missing:
        present = [label for label in CLASSES if label not in missing][0]
        folder = "NORMAL (or HEALTHY)" if missing[0] == "NORMAL" else "PNEUMONIA"
        raise BadDatasetError(
            f"The folder {root} has {present} images only ({int(counts[present])}); "
            f"add a {folder} folder with images of the other class."
        )


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def _check_manifest(manifest: pd.DataFrame, needed: tuple[str, ...] = ("y",),
                    classes: tuple[str, ...] = CLASSES) -> None:
    if not isinstance(manifest, pd.DataFrame):
        raise BadDatasetError(
            f"Expected a manifest table but received a {type(manifest).__name__}; scan the folder first."
        )
    missing = [column for column in needed if column not in manifest.columns]
    if missing:
        raise BadDatasetError(f"The manifest lacks the column(s) {', '.join(missing)}; build it with scan_dataset.")
    counts = manifest["y"].value_counts()
    if len(classes) > 2 and (len(manifest) == 0 or any(counts.get(y, 0) == 0 for y in range(len(classes)))):
        found = [f"{int(counts.get(y, 0))} {name}" for y, name in enumerate(classes)]
        raise BadDatasetError(
            f"The data set has {', '.join(found[:-1])} and {found[-1]} images; every class is needed.")
    if len(manifest) == 0 or any(counts.get(y, 0) == 0 for y in (0, 1)):
        raise BadDatasetError(
            f"The data set has {int(counts.get(0, 0))} NORMAL and {int(counts.get(1, 0))} PNEUMONIA images; "
            "both classes are needed."
        )


def _random_split(y: np.ndarray, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    from sklearn.model_selection import train_test_split  # noqa: PLC0415 - scikit-learn only when splitting

    index = np.arange(len(y))
    # The reference: 80/20 stratified, then the 20% halved, both with random_state=seed.
    train_idx, rest_idx = train_test_split(
        index, test_size=val_fraction + test_fraction, stratify=y, random_state=seed
    )
    val_idx, test_idx = train_test_split(
        rest_idx, test_size=test_fraction / (val_fraction + test_fraction), stratify=y[rest_idx], random_state=seed
    )
    split = np.empty(len(y), dtype=object)
    split[train_idx], split[val_idx], split[test_idx] = "train", "val", "test"
    return split


def _grouped_parts(
    y: np.ndarray, groups: np.ndarray, fractions: dict[str, float], seed: int, classes: tuple[str, ...] = CLASSES
) -> np.ndarray:
    """Assign whole patients to parts, class by class, so each part gets its share of each class.

    Patients of one class (a patient with images of several classes counts for the class of most of
    their images, the later class on a tie) are shuffled with ``seed``; each part in ``fractions`` then takes the run of
    patients whose image count comes closest to its share, at least one patient each; the rest
    is ``train``. Unlike a k-fold splitter this works for any fraction and for tiny data sets.

    Returns:
        The part of every row (``train`` or a key of ``fractions``).
    """
    table = pd.DataFrame({"y": y, "group": groups})
    sizes = table.groupby("group", sort=True).size()
    if len(classes) == 2:
        majority = table.groupby("group", sort=True)["y"].mean().ge(0.5).astype(int)
    else:
        per_class = pd.crosstab(table["group"], table["y"]).reindex(columns=range(len(classes)), fill_value=0)
        # argmax over the reversed columns: on a tie the later class wins, as for two classes.
        last_max = len(classes) - 1 - per_class.to_numpy()[:, ::-1].argmax(axis=1)
        majority = pd.Series(last_max, index=per_class.index)
    rng = np.random.default_rng(seed)
    part_of: dict[object, str] = {}
    for label in range(len(classes)):
        members = majority.index[majority.to_numpy() == label].to_numpy()
        needed = len(fractions) + 1
        if len(members) < needed:
            raise BadDatasetError(
                f"Only {len(members)} {classes[label]} patient(s) were found and a patient split needs at least "
                f"{needed}; add images of more patients or use the random split."
            )
        members = members[rng.permutation(len(members))]
        counts = sizes.loc[members].to_numpy()
        n_class = int(counts.sum())
        start = 0
        for index, (part, fraction) in enumerate(fractions.items()):
            remaining_parts = len(fractions) - index  # this one, the later ones and train need a patient each
            cumulative = np.cumsum(counts[start:])
            last_allowed = len(members) - start - remaining_parts  # index into cumulative
            candidates = cumulative[: last_allowed + 1]
            take = int(np.argmin(np.abs(candidates - fraction * n_class))) + 1
            for group in members[start : start + take]:
                part_of[group] = part
            start += take
        for group in members[start:]:
            part_of[group] = "train"
    return np.asarray([part_of[group] for group in groups], dtype=object)


def _patient_groups(manifest: pd.DataFrame) -> np.ndarray:
    if "patient_id" in manifest.columns:
        return manifest["patient_id"].astype(str).to_numpy()
    return np.asarray([parse_patient_id(p) for p in manifest["path"].astype(str)])


def _patient_split(
    y: np.ndarray, groups: np.ndarray, seed: int, val_fraction: float, test_fraction: float,
    classes: tuple[str, ...] = CLASSES,
) -> np.ndarray:
    return _grouped_parts(y, groups, {"test": test_fraction, "val": val_fraction}, seed, classes)


def make_split(
    manifest: pd.DataFrame,
    mode: str = "random",
    seed: int = 123,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    task: str = "pneumonia",
) -> pd.DataFrame:
    """Assign each image to train, val or test, stratified on the task's classes.

    Args:
        manifest: ``ScanResult.manifest`` (or a subset of it).
        mode: ``random`` (stratified by image, as the reference: 8:1:1 with seed 123),
            ``patient`` (stratified, whole patients: no patient in two parts) or ``official`` (the release's test
            folder as test; validation carved by patient from its train and val folders, taking
            ``val_fraction`` of them; ``test_fraction`` is not used).
        seed: the split's seed.
        val_fraction: share of images for validation.
        test_fraction: share of images for test.
        task: whose classes ``y`` holds (``task_labels`` makes them); every part gets each class.

    Returns:
        A copy of ``manifest`` (same index and order) with a ``split`` column.

    Raises:
        BadDatasetError: unknown mode, a class missing, no official split, or a part without every class.
    """
    if mode not in SPLIT_MODES:
        raise BadDatasetError(f"The split mode {mode!r} is unknown; choose one of {', '.join(SPLIT_MODES)}.")
    if not (0 < val_fraction < 0.5 and 0 < test_fraction < 0.5):
        raise BadDatasetError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must each be between 0 and 0.5."
        )
    classes = classes_for(task)
    _check_manifest(manifest, classes=classes)
    y = manifest["y"].astype(int).to_numpy()
    try:
        if mode == "random":
            split = _random_split(y, seed, val_fraction, test_fraction)
        elif mode == "patient":
            split = _patient_split(y, _patient_groups(manifest), seed, val_fraction, test_fraction, classes)
        else:
            split = _official_split(manifest, y, seed, val_fraction, classes)
    except ValueError as error:
        # sklearn refuses a stratified split when a class has too few members for a part.
        raise BadDatasetError(
            f"The data set ({len(y)} images, {int((y == 0).sum())} NORMAL) is too small for a {mode} split "
            f"({error}); add more images."
        ) from error
    result = manifest.copy()
    result["split"] = split
    _check_parts(result, mode, classes)
    return result


def _official_split(manifest: pd.DataFrame, y: np.ndarray, seed: int, val_fraction: float,
                    classes: tuple[str, ...] = CLASSES) -> np.ndarray:
    official = (
        manifest["official_split"].fillna("").astype(str).to_numpy()
        if "official_split" in manifest.columns
        else np.full(len(manifest), "", dtype=object)
    )
    if not (official == "test").any():
        raise BadDatasetError(
            "The official split needs the Kermany layout with a test folder, and this data set has none; "
            "choose the random or patient split."
        )
    split = np.full(len(manifest), "train", dtype=object)
    split[official == "test"] = "test"
    # The release's val folder holds only 16 images: carve a real validation part from train+val.
    pool = np.flatnonzero(official != "test")
    groups = _patient_groups(manifest)
    split[pool] = _grouped_parts(y[pool], groups[pool], {"val": val_fraction}, seed, classes)
    return split


def _check_parts(result: pd.DataFrame, mode: str, classes: tuple[str, ...] = CLASSES) -> None:
    for part in SPLITS:
        require_both_classes(result.loc[result["split"] == part, "y"].astype(int),
                             f"the {part} part of the {mode} split", "add more images or use a larger limit", classes)


def stratified_subset(manifest: pd.DataFrame, n: int, seed: int = 123, task: str = "pneumonia") -> pd.DataFrame:
    """A seeded subset of ``n`` images with the classes in their original proportions.

    Args:
        manifest: the manifest (or a split) to draw from.
        n: the number of images wanted; the whole manifest when it has no more than ``n``.
        seed: the draw's seed.
        task: whose classes ``y`` holds (see ``task_labels``).

    Returns:
        The chosen rows, in the manifest's order, every class present.

    Raises:
        BadDatasetError: ``n`` is below the number of classes, or the manifest lacks one class.
    """
    classes = classes_for(task)
    _check_manifest(manifest, classes=classes)
    n = int(n)
    if n < len(classes):
        raise BadDatasetError(f"A subset needs at least {len(classes)} images (one of each class); got {n}.")
    if n >= len(manifest):
        return manifest.copy()
    y = manifest["y"].astype(int).to_numpy()
    if len(classes) > 2:
        return manifest.iloc[proportional_choice(y, n, seed)].copy()
    counts = np.bincount(y, minlength=2)
    # Proportional, but at least one image of each class.
    n_normal = int(np.clip(round(n * counts[0] / len(y)), 1, min(counts[0], n - 1)))
    n_pneumonia = min(int(counts[1]), n - n_normal)
    rng = np.random.default_rng(seed)
    chosen = np.concatenate(
        [
            rng.choice(np.flatnonzero(y == 0), size=n_normal, replace=False),
            rng.choice(np.flatnonzero(y == 1), size=n_pneumonia, replace=False),
        ]
    )
    return manifest.iloc[np.sort(chosen)].copy()


def proportional_choice(groups, n: int, seed: int) -> np.ndarray:
    """Sorted row indices of ``n`` rows drawn per group (the values of ``groups``, in sorted order) in
    proportion, at least one of each group (so more than ``n`` when there are more groups than that)."""
    values, y = np.unique(np.asarray(groups), return_inverse=True)
    counts = np.bincount(y, minlength=len(values))
    take = np.minimum(np.maximum(1, np.round(n * counts / len(y)).astype(int)), counts)
    # Rounding may miss n by a few: the largest group gives or takes the difference.
    largest = int(np.argmax(counts))
    take[largest] = int(np.clip(take[largest] + n - take.sum(), 1, counts[largest]))
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.choice(np.flatnonzero(y == c), size=int(take[c]), replace=False)
                             for c in range(len(values))])
    return np.sort(chosen)


def stratified_sample(frame: pd.DataFrame, column: str, n: int, seed: int = 123) -> pd.DataFrame:
    """A seeded sample of about ``n`` rows of ``frame`` with the values of ``column`` (any labels, such
    as a scanner or a source) in their proportions and each value present; the whole frame when it has
    no more than ``n`` rows. Unlike ``stratified_subset`` it needs no ``y`` and checks no classes."""
    if n >= len(frame):
        return frame
    return frame.iloc[proportional_choice(frame[column].astype(str).to_numpy(), int(n), seed)]
