"""cxr_core.data.stats: summaries for the Dataset page."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_core.core.errors import BadDatasetError
from cxr_core.data import stats
from cxr_core.data.scan import make_split, scan_dataset


@pytest.fixture
def scan(tiny_dataset: Path):
    return scan_dataset(tiny_dataset)


def test_class_counts_and_imbalance(scan):
    counts = stats.class_counts(scan)
    assert counts["count"].to_dict() == {"NORMAL": 12, "PNEUMONIA": 24}
    assert counts["share"].sum() == pytest.approx(1.0)
    assert stats.imbalance_sentence(scan) == "2.0 PNEUMONIA images for every NORMAL image"
    # Works on a manifest as well as a ScanResult, and the other way round.
    more_normal = pd.concat([scan.manifest[scan.manifest["y"] == 0]] * 3)
    more_normal = pd.concat([more_normal, scan.manifest[scan.manifest["y"] == 1].head(6)])
    assert stats.imbalance_sentence(more_normal) == "6.0 NORMAL images for every PNEUMONIA image"
    balanced = pd.concat([scan.manifest[scan.manifest["y"] == 0], scan.manifest[scan.manifest["y"] == 1].head(12)])
    assert stats.imbalance_sentence(balanced) == "as many NORMAL as PNEUMONIA images (12 each)"


def test_wrong_input_type():
    with pytest.raises(BadDatasetError, match="received a list"):
        stats.class_counts([1, 2])  # type: ignore[arg-type]


def test_split_proportions(scan):
    split = make_split(scan.manifest, "random")
    table = stats.split_proportions(split)
    assert list(table.index) == ["train", "val", "test"]
    assert table["n"].sum() == 36
    assert (table["NORMAL"] + table["PNEUMONIA"] == table["n"]).all()
    assert np.allclose(table["share_NORMAL"] + table["share_PNEUMONIA"], 1.0)
    assert table["share_of_images"].sum() == pytest.approx(1.0)
    with pytest.raises(BadDatasetError, match="no split column"):
        stats.split_proportions(scan.manifest)


def test_subtypes_and_patients(scan):
    subtypes = stats.subtype_counts(scan)
    assert subtypes.set_index("subtype")["count"].to_dict() == {"normal": 12, "bacteria": 12, "virus": 12}
    per_patient = stats.images_per_patient(scan)
    # make_dataset: NORMAL patients have 2 images, PNEUMONIA patients 3.
    assert per_patient.to_dict("records") == [
        {"label": "NORMAL", "images": 2, "patients": 6},
        {"label": "PNEUMONIA", "images": 3, "patients": 8},
    ]
    summary = stats.patient_summary(scan)
    assert summary["patients"] == 14 and summary["max_images_per_patient"] == 3
    assert summary["patients_in_both_classes"] == 0


def test_sizes(scan):
    sizes = stats.size_distribution(scan)
    assert len(sizes) == 36 and (sizes["aspect"] == 1.0).all()
    summary = stats.size_summary(scan)
    assert summary.loc["NORMAL", "width_median"] == 48


def test_intensity_histograms_are_seeded_and_normalised(scan):
    first = stats.intensity_histograms(scan, n_per_class=5, bins=16, seed=3)
    again = stats.intensity_histograms(scan, n_per_class=5, bins=16, seed=3)
    pd.testing.assert_frame_equal(first, again)
    assert len(first) == 16 and first["bin_start"].iloc[0] == 0 and first["bin_end"].iloc[-1] == 256
    assert first["NORMAL"].sum() == pytest.approx(1.0) and first["PNEUMONIA"].sum() == pytest.approx(1.0)
    assert first.attrs["n_images"] == {"NORMAL": 5, "PNEUMONIA": 5}


def test_intensity_histograms_list_unreadable_images(scan):
    manifest = scan.manifest.copy()
    broken = Path(manifest.loc[manifest["y"] == 0, "path"].iloc[0])
    broken.write_bytes(b"gone bad")
    table = stats.intensity_histograms(manifest, n_per_class=100, bins=8)
    assert table.attrs["n_images"]["NORMAL"] == 11
    assert len(table.attrs["errors"]) == 1 and broken.name in table.attrs["errors"][0]["reason"]


def test_sample_images(scan):
    grid = stats.sample_images(scan, n=6, seed=1)
    assert len(grid) == 6 and set(grid["label"]) == {"NORMAL", "PNEUMONIA"}
    assert grid.equals(stats.sample_images(scan, n=6, seed=1))
    virus = stats.sample_images(scan, n=4, label="pneumonia", subtype="virus")
    assert len(virus) == 4 and (virus["subtype"] == "virus").all()
    assert len(stats.sample_images(scan, n=100, label="NORMAL")) == 12
    split = make_split(scan.manifest, "random")
    test_rows = stats.sample_images(split, n=50, split="test")
    assert (test_rows["split"] == "test").all()
    with pytest.raises(BadDatasetError, match="needs a split table"):
        stats.sample_images(scan, split="test")


def test_dataset_summary(scan):
    summary = stats.dataset_summary(scan)
    assert summary["images"] == 36 and summary["NORMAL"] == 12 and summary["patients"] == 14
    assert summary["layout"] == "class_folders" and summary["has_official_split"] is False
    assert summary["imbalance"].startswith("2.0 PNEUMONIA")
