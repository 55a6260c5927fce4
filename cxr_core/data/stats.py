"""Data set summaries for the Dataset page: plain pandas and numpy, cheap to cache.

Every function takes a ``ScanResult`` or a manifest ``DataFrame`` (a split, with its ``split``
column, works too) and returns a DataFrame, a dict or a sentence; nothing here draws.
"""
from __future__ import annotations

import logging
from typing import Any, Union

import numpy as np
import pandas as pd

from cxr_core.core.errors import BadDatasetError, BadImageError
from cxr_core.data.scan import CLASSES, SPLITS, SUBTYPE_COLUMN, ScanResult
from cxr_core.io.images import load_gray

log = logging.getLogger(__name__)

ManifestLike = Union[ScanResult, pd.DataFrame]


def as_manifest(data: ManifestLike) -> pd.DataFrame:
    """The manifest of a scan result, or the table itself; one sentence for anything else."""
    if isinstance(data, ScanResult):
        return data.manifest
    if isinstance(data, pd.DataFrame):
        return data
    raise BadDatasetError(f"Expected a scan result or a manifest table but received a {type(data).__name__}.")


def class_counts(data: ManifestLike) -> pd.DataFrame:
    """Images per class.

    Args:
        data: a ``ScanResult`` or manifest.

    Returns:
        DataFrame indexed by label (NORMAL, PNEUMONIA) with columns ``count`` and ``share``.
    """
    manifest = as_manifest(data)
    counts = manifest["label"].value_counts().reindex(list(CLASSES), fill_value=0).astype(int)
    total = int(counts.sum())
    shares = counts / total if total else counts.astype(float)
    return pd.DataFrame({"count": counts, "share": shares.astype(float)}).rename_axis("label")


def imbalance_sentence(data: ManifestLike) -> str:
    """The class imbalance in words, e.g. ``2.9 PNEUMONIA images for every NORMAL image``.

    Args:
        data: a ``ScanResult`` or manifest.

    Returns:
        One sentence fragment (no full stop).
    """
    counts = class_counts(data)["count"]
    if counts["NORMAL"] == counts["PNEUMONIA"]:
        return f"as many NORMAL as PNEUMONIA images ({int(counts['NORMAL'])} each)"
    large, small = ("PNEUMONIA", "NORMAL") if counts["PNEUMONIA"] > counts["NORMAL"] else ("NORMAL", "PNEUMONIA")
    if counts[small] == 0:
        return f"{int(counts[large])} {large} images and no {small} image"
    return f"{counts[large] / counts[small]:.1f} {large} images for every {small} image"


def split_proportions(split: pd.DataFrame) -> pd.DataFrame:
    """Class counts and shares in each part of a split.

    Args:
        split: ``make_split`` output (a manifest with a ``split`` column).

    Returns:
        DataFrame indexed by part (train, val, test) with columns ``n``, ``NORMAL``, ``PNEUMONIA``,
        ``share_NORMAL``, ``share_PNEUMONIA``, ``share_of_images``.
    """
    if "split" not in split.columns:
        raise BadDatasetError("The table has no split column; make the split with make_split first.")
    table = pd.crosstab(split["split"], split["label"]).reindex(index=list(SPLITS), columns=list(CLASSES), fill_value=0)
    table = table.astype(int)
    table.columns.name = None
    table.insert(0, "n", table.sum(axis=1))
    for label in CLASSES:
        table[f"share_{label}"] = (table[label] / table["n"].where(table["n"] > 0)).fillna(0.0)
    table["share_of_images"] = table["n"] / max(int(table["n"].sum()), 1)
    return table.rename_axis("split")


def subtype_counts(data: ManifestLike) -> pd.DataFrame:
    """Images per label and subtype (normal / bacteria / virus / unknown).

    Returns:
        DataFrame with columns ``label``, ``subtype``, ``count``, ``share`` (of all images).
    """
    manifest = as_manifest(data)
    counts = manifest.groupby(["label", SUBTYPE_COLUMN]).size().rename("count").reset_index()
    counts["share"] = counts["count"] / max(len(manifest), 1)
    return counts.sort_values(["label", "count"], ascending=[True, False], ignore_index=True)


def images_per_patient(data: ManifestLike) -> pd.DataFrame:
    """How many patients have 1, 2, 3... images.

    Returns:
        DataFrame with columns ``images``, ``patients``, ``label`` (one row per label and count).
    """
    manifest = as_manifest(data)
    per_patient = manifest.groupby(["label", "patient_id"]).size().rename("images").reset_index()
    table = per_patient.groupby(["label", "images"]).size().rename("patients").reset_index()
    return table[["label", "images", "patients"]].sort_values(["label", "images"], ignore_index=True)


def patient_summary(data: ManifestLike) -> dict[str, Any]:
    """Patients and images per patient in numbers.

    Returns:
        dict: ``patients``, ``images``, ``mean_images_per_patient``, ``max_images_per_patient``,
        ``patients_with_several_images``, ``patients_in_both_classes``.
    """
    manifest = as_manifest(data)
    per_patient = manifest.groupby("patient_id").size()
    labels_per_patient = manifest.groupby("patient_id")["label"].nunique()
    return {
        "patients": int(per_patient.size),
        "images": int(len(manifest)),
        "mean_images_per_patient": float(per_patient.mean()) if per_patient.size else 0.0,
        "max_images_per_patient": int(per_patient.max()) if per_patient.size else 0,
        "patients_with_several_images": int((per_patient > 1).sum()),
        "patients_in_both_classes": int((labels_per_patient > 1).sum()),
    }


def size_distribution(data: ManifestLike) -> pd.DataFrame:
    """Width and height of every image (for a scatter plot or histograms).

    Returns:
        DataFrame with columns ``label``, ``width``, ``height``, ``aspect`` (width / height), ``megapixels``.
    """
    manifest = as_manifest(data)
    table = manifest[["label", "width", "height"]].copy()
    table["aspect"] = table["width"] / table["height"].where(table["height"] > 0)
    table["megapixels"] = table["width"] * table["height"] / 1e6
    return table.reset_index(drop=True)


def size_summary(data: ManifestLike) -> pd.DataFrame:
    """Minimum, median and maximum width and height per class.

    Returns:
        DataFrame indexed by label with columns like ``width_min``, ``width_median``, ``height_max``.
    """
    table = size_distribution(data)
    summary = table.groupby("label")[["width", "height"]].agg(["min", "median", "max"])
    summary.columns = [f"{column}_{stat}" for column, stat in summary.columns]
    return summary


def intensity_histograms(
    data: ManifestLike, n_per_class: int = 50, bins: int = 64, seed: int = 0
) -> pd.DataFrame:
    """Pixel intensity histograms per class, from a seeded sample of images.

    Each image contributes equally (its own histogram is normalised before averaging), so large
    images do not dominate.

    Args:
        data: a ``ScanResult`` or manifest.
        n_per_class: images decoded per class (all when a class has fewer).
        bins: histogram bins over 0..255.
        seed: seed of the sample.

    Returns:
        DataFrame with columns ``bin_start``, ``bin_end``, ``NORMAL``, ``PNEUMONIA`` (fractions of
        pixels; each class sums to 1, or is all zero when none of its images could be read), and
        ``attrs["n_images"]`` / ``attrs["errors"]`` for what was used and what failed.
    """
    manifest = as_manifest(data)
    edges = np.linspace(0, 256, bins + 1)
    table = pd.DataFrame({"bin_start": edges[:-1], "bin_end": edges[1:]})
    n_images: dict[str, int] = {}
    errors: list[dict[str, str]] = []
    for label in CLASSES:
        paths = manifest.loc[manifest["label"] == label, "path"].astype(str).tolist()
        rng = np.random.default_rng(seed)
        if len(paths) > n_per_class:
            paths = [paths[i] for i in sorted(rng.choice(len(paths), size=n_per_class, replace=False))]
        total = np.zeros(bins, dtype=np.float64)
        used = 0
        for path in paths:
            try:
                gray = load_gray(path)
            except BadImageError as error:
                errors.append({"path": path, "reason": str(error)})
                continue
            counts, _ = np.histogram(gray, bins=edges)
            total += counts / max(gray.size, 1)
            used += 1
        table[label] = total / used if used else total
        n_images[label] = used
    table.attrs["n_images"] = n_images
    table.attrs["errors"] = errors
    return table


def sample_images(
    data: ManifestLike,
    n: int = 12,
    label: str | None = None,
    subtype: str | None = None,
    split: str | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """A seeded selection of rows for an image grid, optionally filtered.

    Args:
        data: a ``ScanResult`` or manifest (a split for the ``split`` filter).
        n: the most rows returned.
        label: ``NORMAL`` / ``PNEUMONIA`` or None for both (then classes alternate in the grid).
        subtype: ``normal`` / ``bacteria`` / ``virus`` / ``unknown`` or None.
        split: ``train`` / ``val`` / ``test`` or None.
        seed: seed of the choice.

    Returns:
        Up to ``n`` manifest rows (fewer when fewer match), index reset.
    """
    manifest = as_manifest(data)
    mask = pd.Series(True, index=manifest.index)
    if label:
        mask &= manifest["label"].astype(str).str.upper() == str(label).upper()
    if subtype:
        mask &= manifest[SUBTYPE_COLUMN].astype(str).str.lower() == str(subtype).lower()
    if split:
        if "split" not in manifest.columns:
            raise BadDatasetError("Filtering by split needs a split table; make the split with make_split first.")
        mask &= manifest["split"] == split
    chosen = manifest[mask]
    if len(chosen) <= n:
        return chosen.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    if label is None:
        # Alternate the classes so a small grid shows both.
        groups = [np.flatnonzero(chosen["label"].to_numpy() == c) for c in CLASSES]
        groups = [rng.permutation(g) for g in groups if len(g)]
        order = [g[i] for i in range(max(len(g) for g in groups)) for g in groups if i < len(g)]
        return chosen.iloc[np.asarray(order[:n])].reset_index(drop=True)
    return chosen.iloc[np.sort(rng.choice(len(chosen), size=n, replace=False))].reset_index(drop=True)


def dataset_summary(scan: ScanResult) -> dict[str, Any]:
    """Headline numbers of a scan.

    Returns:
        dict: ``root``, ``layout``, ``images``, ``NORMAL``, ``PNEUMONIA``, ``patients``, ``skipped``,
        ``duplicates``, ``imbalance`` (sentence), ``has_official_split``.
    """
    counts = class_counts(scan)["count"]
    manifest = scan.manifest
    return {
        "root": str(scan.root),
        "layout": scan.layout,
        "images": int(len(manifest)),
        "NORMAL": int(counts["NORMAL"]),
        "PNEUMONIA": int(counts["PNEUMONIA"]),
        "patients": int(manifest["patient_id"].nunique()),
        "skipped": int(len(scan.skipped)),
        "duplicates": int(len(scan.duplicates)),
        "imbalance": imbalance_sentence(scan),
        "has_official_split": bool((manifest["official_split"] == "test").any()),
    }
