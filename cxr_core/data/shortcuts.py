"""The shortcut check: what else, besides the disease, predicts the label?

A property that is not the disease (the scanner, the hospital, which public copy an image was made
from, its JPEG quality or sharpness) but goes with the label lets a model score well on its own data
and fail elsewhere: it learns the property instead of the lungs. This module measures such
properties and how well each one alone predicts the label.

* ``image_properties``: per image, width, height, aspect, file bytes per pixel, sharpness, JPEG
  quality estimate, mean and standard deviation of the intensity (a seeded sample when asked).
* ``property_report``: for each property column, its ROC AUC as a predictor of the label (folded to
  >= 0.5, with the direction), how it is distributed per class in each part of a split, and a
  one-sentence warning when the AUC reaches a threshold.
* ``shortcut_check``: the side-car manifest columns (see ``data.read_sidecar_columns``) plus the
  image properties of a sample, reported together.
  A shortcut-lab copy (``data.shortcut_lab``) lists its planted ``marker`` here like any other column.
* ``feature_probe``: how well frozen backbone features tell the groups of a property apart.
* ``balancing_weights``: sample weights that make a property independent of the label.

Everything here is plain numpy, pandas, scikit-learn, OpenCV and Pillow; no Streamlit, and
TensorFlow only inside ``probe_from_cache`` (through ``features.extract_features``).
"""
from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cxr_core.core.errors import BadImageError, CxrError
from cxr_core.core.labels import POSITIVE
from cxr_core.data.scan import stratified_sample
from cxr_core.data.stats import ManifestLike, as_manifest
from cxr_core.io.images import image_header, load_gray

log = logging.getLogger(__name__)

WARN_AUC = 0.6
PROBE_WARN_AUC = 0.8
MISSING = "(missing)"
# Columns that identify an image or are the label itself: never a property.
NOT_PROPERTIES = {
    "path", "relpath", "patient_id", "sha256", "subtype", "label", "y", "official_split", "split",
    "file", "filename", "name", "augment_seed", "is_augmented", "duplicate_of", "error",
    # Where a shortcut-lab marker sits (data.shortcut_lab): recorded for marked images only, so they
    # describe the marker, not the images; ``marker`` (0/1) itself is a property.
    "marker_x", "marker_y", "marker_w", "marker_h",
}
IMAGE_PROPERTY_COLUMNS = [
    "width", "height", "aspect", "bytes_per_pixel", "sharpness", "jpeg_quality", "mean_intensity", "std_intensity",
]
# The IJG (libjpeg) standard luminance quantization table, the base of "quality" 1..100.
_STD_LUMA = np.array(
    [
        16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
        14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
        18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
        49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
    ],
    dtype=np.float64,
)



# ---------------------------------------------------------------------------------------------
# Image properties
# ---------------------------------------------------------------------------------------------


def _ijg_table_sums() -> np.ndarray:
    """Sum of the IJG luminance table at each quality 1..100 (index 0 = quality 1)."""
    sums = []
    for quality in range(1, 101):
        scale = 5000 / quality if quality < 50 else 200 - 2 * quality
        table = np.clip(np.floor((_STD_LUMA * scale + 50) / 100), 1, 255)
        sums.append(table.sum())
    return np.asarray(sums)


_IJG_SUMS = _ijg_table_sums()


def jpeg_quality_from_tables(quantization: dict | None) -> float:
    """Estimate the IJG quality (1..100) a JPEG was saved with, from its quantization tables.

    The luminance table (table 0) is compared with the IJG standard table scaled to each quality;
    the comparison uses the table's sum, so it does not depend on zigzag or natural order. Files
    made with other tables get the nearest IJG quality.

    Args:
        quantization: PIL's ``Image.quantization`` ({table id: 64 values}), or None.

    Returns:
        The estimated quality, or NaN when there is no table.
    """
    if not quantization:
        return float("nan")
    key = 0 if 0 in quantization else sorted(quantization)[0]
    table = np.asarray(list(quantization[key]), dtype=np.float64)
    if table.size != 64:
        return float("nan")
    return float(np.argmin(np.abs(_IJG_SUMS - table.sum())) + 1)


def _one_image(path: str) -> dict[str, Any]:
    row: dict[str, Any] = {"path": path}
    try:
        data = Path(path).read_bytes()
        name = Path(path).name
        width, height = image_header(data, name=name)
        gray = load_gray(data, name=name)
    except (BadImageError, OSError) as error:
        row["error"] = str(error)
        return row
    quality = float("nan")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                quality = jpeg_quality_from_tables(getattr(img, "quantization", None))
    except Exception:  # noqa: BLE001 (the quality is optional; load_gray already read the image)
        pass
    pixels = max(int(width) * int(height), 1)
    row.update(
        width=int(width),
        height=int(height),
        aspect=float(width) / float(height),
        bytes_per_pixel=len(data) / pixels,
        sharpness=float(cv2.Laplacian(gray, cv2.CV_64F).var()),
        jpeg_quality=quality,
        mean_intensity=float(gray.mean()),
        std_intensity=float(gray.std()),
        error=None,
    )
    return row


def image_properties(
    paths: Sequence[str | os.PathLike], max_images: int | None = None, seed: int = 123
) -> pd.DataFrame:
    """Properties of each image that are not the disease.

    Sharpness is the variance of the Laplacian of the grayscale image at its own size; the JPEG
    quality is estimated from the file's quantization tables (NaN for other formats); bytes per
    pixel is the file size over width x height (how hard the file was compressed).

    Args:
        paths: image files.
        max_images: measure a seeded random sample of at most this many (None: all).
        seed: the sample's seed.

    Returns:
        One row per measured image, in the order of ``paths``: path, width, height, aspect,
        bytes_per_pixel, sharpness, jpeg_quality, mean_intensity, std_intensity, error (None, or
        why the image could not be read; its properties are NaN then).
    """
    paths = [os.fspath(p) for p in paths]
    if max_images is not None and 0 <= int(max_images) < len(paths):
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(len(paths), size=int(max_images), replace=False))
        paths = [paths[i] for i in chosen]
    if len(paths) < 16:
        rows = [_one_image(p) for p in paths]
    else:
        # Decoding and OpenCV release the GIL; a few threads keep the cores busy.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
            rows = list(pool.map(_one_image, paths, chunksize=8))
    frame = pd.DataFrame(rows, columns=["path", *IMAGE_PROPERTY_COLUMNS, "error"])
    for column in IMAGE_PROPERTY_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _binary_labels(values: pd.Series, positive: str) -> np.ndarray:
    """1 for the positive class, 0 otherwise (a 0/1 column is read as is)."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return (values.astype(float) == 1).astype(int).to_numpy()
    return (values.astype(str).str.strip().str.upper() == str(positive).upper()).astype(int).to_numpy()


def _negative_name(values: pd.Series, positive: str) -> str:
    if pd.api.types.is_numeric_dtype(values):
        return "NORMAL"
    others = values[values.astype(str).str.upper() != str(positive).upper()].astype(str)
    return str(others.mode().iloc[0]) if len(others) else "NORMAL"


def _is_categorical(values: pd.Series) -> bool:
    return not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)


def _auc(y: np.ndarray, score: np.ndarray) -> float:

    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, score))


def _category_scores(categories: np.ndarray, y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Out-of-fold PNEUMONIA rate of each row's category (smoothed toward the overall rate).

    Cross-fitting keeps a column with many small categories (one per row, say) from scoring
    itself perfectly: each row is scored by rates learned on the other folds.
    """

    def rates(train_cat: np.ndarray, train_y: np.ndarray) -> tuple[dict, float]:
        prior = float(train_y.mean())
        table = pd.DataFrame({"c": train_cat, "y": train_y}).groupby("c")["y"].agg(["sum", "count"])
        return {c: (s + prior) / (n + 1.0) for c, s, n in zip(table.index, table["sum"], table["count"])}, prior

    n_splits = min(folds, int(np.bincount(y, minlength=2).min()))
    if n_splits < 2:
        mapping, prior = rates(categories, y)
        return np.asarray([mapping.get(c, prior) for c in categories])
    scores = np.empty(len(y), dtype=np.float64)
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for train, test in splitter.split(categories, y):
        mapping, prior = rates(categories[train], y[train])
        scores[test] = [mapping.get(c, prior) for c in categories[test]]
    return scores


def _fmt(value: float) -> str:
    if not np.isfinite(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def _skip_reason(name: str, values: pd.Series) -> str | None:
    if str(name).strip().lower() in NOT_PROPERTIES:
        return "identifier or label"
    present = values.dropna()
    if present.nunique() < 1 or (present.nunique() == 1 and len(present) == len(values)):
        return "constant"
    if _is_categorical(values) and len(values) > 20 and present.astype(str).nunique() > 0.9 * len(values):
        return "identifier-like (a different value for almost every image)"
    return None


def property_report(
    frame: pd.DataFrame,
    label_col: str = "label",
    split_col: str | None = None,
    properties: Sequence[str] | None = None,
    positive: str = POSITIVE,
    threshold: float = WARN_AUC,
    folds: int = 5,
    seed: int = 123,
    max_categories: int = 12,
) -> list[dict]:
    """How well each property alone predicts the label.

    Numeric properties use their value as the score; categorical ones (text, booleans, and the
    missing value as its own category) use the PNEUMONIA rate of their category, cross-fitted over
    ``folds`` folds so that many small categories cannot fit the label by themselves. The AUC is
    folded to >= 0.5 for numeric properties (``direction`` says which values go with the positive
    class); for categorical ones an out-of-fold AUC below 0.5 (noise) is reported as 0.5.

    Args:
        frame: one row per image with the label and property columns.
        label_col: the label column (``NORMAL``/``PNEUMONIA`` text, or 0/1).
        split_col: a column naming the part of each row (train/val/test); None for one part, "all".
        properties: the columns to report; None for every column except identifiers, the label,
            the split, and constant columns.
        positive: the positive class.
        threshold: AUC at or above which an entry carries a warning.
        folds: cross-fitting folds for categorical properties.
        seed: the folds' seed.
        max_categories: categories shown per class in ``by_part`` (the rest are summed as "other").

    Returns:
        One dict per property, highest AUC first: ``property``, ``kind`` ("numeric" or
        "categorical"), ``n`` (rows with a value), ``auc`` (folded, >= 0.5), ``direction`` (one
        phrase), ``by_part`` ({part: {"n", "auc" (in the overall direction, so < 0.5 means the
        association is reversed in that part), <negative class>: summary, <positive class>:
        summary}}; a summary is the share of each category, or the median and count), and
        ``warning`` (one sentence, or None).
    """
    if label_col not in frame.columns:
        raise CxrError(f"The table has no {label_col!r} column, so no property can be compared with the label.")
    frame = frame[frame[label_col].notna()]
    if properties is None:
        excluded = {label_col, split_col}
        properties = [c for c in frame.columns if c not in excluded]
    y_all = _binary_labels(frame[label_col], positive)
    negative = _negative_name(frame[label_col], positive)
    parts = frame[split_col].fillna("").astype(str).to_numpy() if split_col else np.full(len(frame), "all")
    report: list[dict] = []
    for name in properties:
        if name not in frame.columns:
            continue
        values = frame[name]
        reason = _skip_reason(name, values)
        if reason:
            log.debug("Property %s skipped: %s", name, reason)
            continue
        entry = (
            _categorical_entry(name, values, y_all, parts, positive, negative, folds, seed, max_categories)
            if _is_categorical(values)
            else _numeric_entry(name, values, y_all, parts, positive, negative)
        )
        if entry is None:
            continue
        entry["warning"] = (
            f"{name} predicts {positive} with AUC {entry['auc']:.2f}: a model can learn it."
            if entry["auc"] >= threshold
            else None
        )
        report.append(entry)
    report.sort(key=lambda e: (-e["auc"], e["property"]))
    return report


def _numeric_entry(
    name: str, values: pd.Series, y_all: np.ndarray, parts: np.ndarray, positive: str, negative: str
) -> dict | None:
    x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    keep = np.isfinite(x)
    x, y, part_of = x[keep], y_all[keep], parts[keep]
    raw = _auc(y, x)
    if not np.isfinite(raw) or np.unique(x).size < 2:
        return None
    sign = 1.0 if raw >= 0.5 else -1.0
    if set(np.unique(x)) <= {0.0, 1.0}:
        # A yes/no column (a planted marker, a portable film): the shares say more than medians of 0 and 1.
        value = 1 if sign > 0 else 0
        direction = (f"{name} = {value} is commoner in {positive} ({np.mean(x[y == 1] == value):.0%} of {positive} "
                     f"vs {np.mean(x[y == 0] == value):.0%} of {negative})")
    else:
        med_pos, med_neg = float(np.median(x[y == 1])), float(np.median(x[y == 0]))
        word = "higher" if sign > 0 else "lower"
        direction = f"{word} {name} goes with {positive} (median {_fmt(med_pos)} vs {_fmt(med_neg)} in {negative})"
    by_part = {}
    for part in pd.unique(part_of):
        mask = part_of == part
        xp, yp = x[mask], y[mask]
        summary = {"n": int(mask.sum()), "auc": _auc(yp, sign * xp)}
        for cls, label in ((0, negative), (1, positive)):
            values_c = xp[yp == cls]
            summary[label] = {
                "n": int(values_c.size),
                "median": float(np.median(values_c)) if values_c.size else float("nan"),
            }
        by_part[str(part)] = summary
    return {
        "property": name, "kind": "numeric", "n": int(keep.sum()), "auc": max(raw, 1.0 - raw),
        "direction": direction, "by_part": by_part,
    }


def _categorical_entry(
    name: str,
    values: pd.Series,
    y: np.ndarray,
    parts: np.ndarray,
    positive: str,
    negative: str,
    folds: int,
    seed: int,
    max_categories: int,
) -> dict | None:
    categories = values.astype(object).where(values.notna(), MISSING).astype(str).to_numpy()
    if np.unique(categories).size < 2:
        return None
    scores = _category_scores(categories, y, folds, seed)
    raw = _auc(y, scores)
    if not np.isfinite(raw):
        return None
    # Which category is most over-represented among positives (share among positives - negatives)?
    share_pos = pd.Series(categories[y == 1]).value_counts(normalize=True)
    share_neg = pd.Series(categories[y == 0]).value_counts(normalize=True)
    gap = share_pos.subtract(share_neg, fill_value=0.0).sort_values(ascending=False)
    top = str(gap.index[0])
    direction = (
        f"{name} = {top} is commoner in {positive} ({share_pos.get(top, 0.0):.0%} of {positive} "
        f"vs {share_neg.get(top, 0.0):.0%} of {negative})"
    )
    by_part = {}
    for part in pd.unique(parts):
        mask = parts == part
        summary: dict[str, Any] = {"n": int(mask.sum()), "auc": _auc(y[mask], scores[mask])}
        for cls, label in ((0, negative), (1, positive)):
            shares = pd.Series(categories[mask & (y == cls)]).value_counts(normalize=True)
            if len(shares) > max_categories:
                rest = pd.Series({"other": shares.iloc[max_categories:].sum()})
                shares = pd.concat([shares.iloc[:max_categories], rest])
            summary[label] = {str(k): float(v) for k, v in shares.items()}
        by_part[str(part)] = summary
    return {
        "property": name, "kind": "categorical", "n": int(len(categories)), "auc": max(raw, 0.5),
        "direction": direction, "by_part": by_part,
    }


def report_table(report: list[dict]) -> pd.DataFrame:
    """The report as a table for display: property, kind, n, auc, direction, warning.

    Args:
        report: the output of ``property_report`` or ``shortcut_check``.

    Returns:
        One row per entry, in the report's order (``measured_on`` too when present).
    """
    columns = ["property", "kind", "n", "auc", "direction", "warning"]
    if any("measured_on" in e for e in report):
        columns.insert(3, "measured_on")
    return pd.DataFrame([{c: e.get(c) for c in columns} for e in report], columns=columns)


# ---------------------------------------------------------------------------------------------
# The whole check
# ---------------------------------------------------------------------------------------------


def shortcut_check(
    scan_or_manifest: ManifestLike,
    split: str | None = None,
    *,
    label_col: str = "label",
    max_images: int | None = 300,
    image_props: bool = True,
    threshold: float = WARN_AUC,
    positive: str = POSITIVE,
    seed: int = 123,
) -> list[dict]:
    """Report every property that is not the disease: the manifest's own columns and image properties.

    The manifest's columns (side-car columns such as a scanner or source, plus width, height and
    aspect) are measured on every image; the pixel and file properties (bytes per pixel,
    sharpness, JPEG quality, mean and std intensity) on a stratified sample of ``max_images``.

    Args:
        scan_or_manifest: a ``ScanResult`` or a manifest (needs ``path`` for image properties).
        split: a column of the manifest naming each row's part (e.g. ``split`` of
            ``data.make_split`` or ``official_split``); None for one part.
        label_col: the label column.
        max_images: images measured for the pixel properties (None: all).
        image_props: measure the pixel and file properties at all.
        threshold: AUC at or above which an entry carries a warning.
        positive: the positive class.
        seed: the sample's and folds' seed.

    Returns:
        ``property_report`` entries, highest AUC first, each with ``measured_on`` ("all images" or
        "a sample of N images").
    """
    manifest = as_manifest(scan_or_manifest).copy()
    if split is not None and split not in manifest.columns:
        raise CxrError(f"The manifest has no {split!r} column to compare the parts of a split.")
    if {"width", "height"} <= set(manifest.columns):
        height = pd.to_numeric(manifest["height"], errors="coerce").replace(0, np.nan)
        manifest["aspect"] = pd.to_numeric(manifest["width"], errors="coerce") / height
    report = property_report(manifest, label_col=label_col, split_col=split, threshold=threshold,
                             positive=positive, seed=seed)
    for entry in report:
        entry["measured_on"] = f"all {len(manifest):,} images"
    if image_props and "path" in manifest.columns and len(manifest) and max_images != 0:
        wanted = len(manifest) if max_images is None else int(max_images)
        sample = stratified_sample(manifest, label_col, wanted, seed)
        props = image_properties(sample["path"].tolist())
        measured = [c for c in IMAGE_PROPERTY_COLUMNS if c not in manifest.columns]
        joined = sample[[c for c in (label_col, split) if c]].reset_index(drop=True)
        joined = pd.concat([joined, props[measured].reset_index(drop=True)], axis=1)
        extra = property_report(joined, label_col=label_col, split_col=split, properties=measured,
                                threshold=threshold, positive=positive, seed=seed)
        label = "all" if len(sample) == len(manifest) else "a sample of"
        for entry in extra:
            entry["measured_on"] = f"{label} {len(sample):,} images"
        report = sorted(report + extra, key=lambda e: (-e["auc"], e["property"]))
    return report


# ---------------------------------------------------------------------------------------------
# What the backbone sees; and undoing a confound
# ---------------------------------------------------------------------------------------------


def feature_probe(
    features: np.ndarray,
    groups: Sequence,
    cv: int = 5,
    seed: int = 123,
    labels: Sequence | None = None,
    positive: str = POSITIVE,
    threshold: float = PROBE_WARN_AUC,
    name: str = "group",
) -> dict:
    """How well frozen backbone features tell the groups of a property apart.

    A cross-validated logistic regression (standardised features) predicts the group from the
    features. A high AUC means the property is visible to the model: if it also goes with the
    label, a classifier on these features can use it as a shortcut.

    Args:
        features: (n, D) array, e.g. ``features.extract_features(...).features``.
        groups: the property per row (e.g. ``source_resolution``); rows whose group is missing,
            and groups with fewer than 2 rows, are left out.
        cv: stratified folds (fewer when a group is smaller).
        seed: the folds' and the model's seed.
        labels: the label per row (optional): adds the groups' association with the label.
        positive: the positive class of ``labels``.
        threshold: probe AUC at or above which a warning is given.
        name: the property's name, used in ``label_association``.

    Returns:
        {"auc" (binary, or macro one-vs-rest for more groups), "per_group_auc" ({group: one-vs-rest
        AUC}), "groups" ({group: rows}), "n", "folds", "label_association" (the ``property_report``
        entry of the groups, or None), "warning" (one sentence or None)}.
    """

    x = np.asarray(features, dtype=np.float64)
    g = pd.Series(list(groups), dtype=object)
    if x.ndim != 2 or len(x) != len(g):
        raise CxrError(f"features must be an (n, D) array with one row per group value; got {x.shape} and {len(g)}.")
    present = g.notna().to_numpy()
    counts = g[present].astype(str).value_counts()
    keep = present & g.astype(str).isin(counts.index[counts >= 2]).to_numpy()
    names = g[keep].astype(str).to_numpy()
    x = x[keep]
    uniq = sorted(np.unique(names))
    if len(uniq) < 2:
        raise CxrError("The probe needs at least two groups with two or more images each.")
    folds = int(min(cv, counts[counts >= 2].min()))
    if folds < 2:
        raise CxrError("The probe needs at least two images in every group for cross-validation.")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1, random_state=seed))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(model, x, names, cv=splitter, method="predict_proba")
    onehot = (names[:, None] == np.asarray(uniq)[None, :]).astype(int)
    per_group = {u: float(roc_auc_score(onehot[:, i], proba[:, i])) for i, u in enumerate(uniq)}
    auc = per_group[uniq[1]] if len(uniq) == 2 else float(np.mean(list(per_group.values())))
    association = None
    if labels is not None:
        table = pd.DataFrame({name: names, "label": pd.Series(list(labels), dtype=object)[keep].to_numpy()})
        entries = property_report(table, properties=[name], positive=positive, seed=seed)
        association = entries[0] if entries else None
    warning = (
        f"The backbone's features tell the groups apart with AUC {auc:.2f}: "
        "a model built on them can see this property."
        if auc >= threshold
        else None
    )
    return {
        "auc": auc, "per_group_auc": per_group, "groups": {u: int((names == u).sum()) for u in uniq},
        "n": int(len(names)), "folds": folds, "label_association": association, "warning": warning,
    }


def probe_from_cache(
    rows: pd.DataFrame,
    model_cfg,
    group_col: str = "source_resolution",
    label_col: str = "label",
    *,
    max_images: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 123,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """``feature_probe`` on features from ``features.extract_features`` (cached; needs TensorFlow).

    Args:
        rows: manifest rows with ``path`` (``sha256`` used when present), ``group_col`` and ``label_col``.
        model_cfg: the ``config.ModelConfig`` of the backbone.
        group_col: the property to probe.
        label_col: the label column (for the groups' label association).
        max_images: probe a stratified sample of at most this many rows (None: all).
        cache_dir: the feature cache root (None: the default).
        seed: sample, folds and model seed.
        on_progress: passed to ``extract_features``.

    Returns:
        The ``feature_probe`` dict plus ``n_errors`` (rows that could not be read).
    """
    from cxr_core.engine.features import extract_features  # noqa: PLC0415 (TensorFlow only here)

    if group_col not in rows.columns:
        raise CxrError(f"The rows have no {group_col!r} column to probe.")
    rows = rows[rows[group_col].notna()]
    if max_images is not None:
        rows = stratified_sample(rows, group_col, int(max_images), seed)
    rows = rows.reset_index(drop=True)
    result = extract_features(rows, model_cfg, None, cache_dir=cache_dir, seed=seed, on_progress=on_progress)
    kept = rows.iloc[result.index]
    labels = kept[label_col].tolist() if label_col in kept.columns else None
    probe = feature_probe(result.features, kept[group_col].tolist(), seed=seed, labels=labels, name=group_col)
    probe["n_errors"] = int(len(result.errors))
    return probe


def balancing_weights(labels: Sequence, groups: Sequence) -> np.ndarray:
    """Sample weights that make a property independent of the label.

    Each (label, group) cell gets total weight ``n * P(label) * P(group)``: every group keeps its
    share of the data and gets the overall label mix, and the weights sum to ``n``. A group that
    lacks one of the labels cannot be balanced; its rows keep the cell weight of the labels it has
    (a warning is logged) and all weights are rescaled to sum to ``n``. A missing group value is a
    group of its own.

    Args:
        labels: the label per training row.
        groups: the property per training row (e.g. ``source_resolution``).

    Returns:
        float64 weights, one per row, summing to ``n``.
    """
    lab = pd.Series(list(labels), dtype=object).astype(str).to_numpy()
    grp = pd.Series(list(groups), dtype=object)
    grp = grp.where(grp.notna(), MISSING).astype(str).to_numpy()
    n = len(lab)
    if n != len(grp):
        raise CxrError(f"labels and groups must have the same length; got {n} and {len(grp)}.")
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    table = pd.DataFrame({"l": lab, "g": grp})
    p_label = table["l"].value_counts(normalize=True)
    p_group = table["g"].value_counts(normalize=True)
    cell = table.groupby(["l", "g"]).size()
    incomplete = [g for g in p_group.index if any((lb, g) not in cell.index for lb in p_label.index)]
    if incomplete:
        log.warning("Groups %s lack a label; they cannot be balanced.", incomplete[:5])
    target = np.asarray([n * p_label[lb] * p_group[g] for lb, g in zip(lab, grp)])
    counts = np.asarray([cell[(lb, g)] for lb, g in zip(lab, grp)], dtype=np.float64)
    weights = target / counts
    return weights * (n / weights.sum())
