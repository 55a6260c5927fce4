"""The shortcut check: side-car manifests, image properties, the property report, probes, weights."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cxr_core.data.scan import MANIFEST_COLUMNS, read_sidecar_columns, scan_dataset
from cxr_core.data.shortcuts import (
    balancing_weights,
    feature_probe,
    image_properties,
    jpeg_quality_from_tables,
    property_report,
    report_table,
    shortcut_check,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _texture(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Fine detail (noise on a gradient): blurring or coarse JPEG visibly lowers its sharpness."""
    base = np.linspace(60, 190, size, dtype=np.float32)[None, :].repeat(size, axis=0)
    return np.clip(base + rng.normal(0, 30, (size, size)), 0, 255).astype(np.uint8)


@pytest.fixture
def confounded(tmp_path: Path) -> Path:
    """20 NORMAL (sharp, quality 95) and 20 PNEUMONIA (blurred, quality 60) images, class folders."""
    rng = np.random.default_rng(0)
    root = tmp_path / "confounded"
    for label, quality, blur in (("NORMAL", 95, False), ("PNEUMONIA", 60, True)):
        (root / label).mkdir(parents=True)
        for i in range(20):
            img = _texture(rng)
            if blur:
                img = cv2.GaussianBlur(img, (5, 5), 1.5)
            cv2.imwrite(str(root / label / f"{label.lower()}_{i:02d}.jpeg"), img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return root


def _frame(n: int = 2000, seed: int = 1) -> pd.DataFrame:
    """Labels with a confounded scanner column, a confounded number, and pure noise columns."""
    rng = np.random.default_rng(seed)
    label = np.where(rng.random(n) < 0.5, "PNEUMONIA", "NORMAL")
    pneumonia = label == "PNEUMONIA"
    return pd.DataFrame(
        {
            "path": [f"img{i}.jpeg" for i in range(n)],
            "label": label,
            "scanner": np.where(pneumonia, "portable", "fixed"),
            "dose": np.where(pneumonia, 1.0, 3.0) + rng.normal(0, 0.01, n),
            "noise": rng.normal(size=n),
            "site": rng.choice(["a", "b", "c"], size=n),
            "constant": 7,
            "case_id": [f"c{i}" for i in range(n)],  # a different value per row
        }
    )


# --- Side-car manifest -----------------------------------------------------------------------
def test_sidecar_columns_join_the_scan(confounded: Path):
    rows = [
        {"path": "NORMAL/normal_00.jpeg", "label": "NORMAL", "scanner": "fixed", "width": 1},
        {"path": "./pneumonia\\PNEUMONIA_03.JPEG", "label": "PNEUMONIA", "scanner": "portable", "width": 2},
        {"path": "NORMAL/not_there.jpeg", "label": "NORMAL", "scanner": "x", "width": 3},
    ]
    pd.DataFrame(rows).to_csv(confounded / "manifest.csv", index=False)
    result = scan_dataset(confounded)
    manifest = result.manifest
    # Only the extra column is added; the scan's own columns (label, width) are the scan's.
    assert list(manifest.columns) == MANIFEST_COLUMNS + ["scanner"]
    by_rel = manifest.set_index("relpath")
    assert by_rel.loc["NORMAL/normal_00.jpeg", "scanner"] == "fixed"
    assert by_rel.loc["PNEUMONIA/pneumonia_03.jpeg", "scanner"] == "portable"  # case, ./ and \ normalised
    assert by_rel.loc["NORMAL/normal_00.jpeg", "width"] == 64
    assert manifest["scanner"].isna().sum() == len(manifest) - 2


@pytest.mark.parametrize(
    "content",
    [b"\x00\xff\xfe garbage \x00\n\x01,\x02\n\"unclosed", b"file,scanner\nNORMAL/normal_00.jpeg,x\n", b""],
    ids=["binary", "no-path-column", "empty"],
)
def test_a_malformed_sidecar_is_ignored_with_a_warning(confounded: Path, content: bytes, caplog):
    (confounded / "manifest.csv").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="cxr_core.data.scan"):
        result = scan_dataset(confounded)
    assert list(result.manifest.columns) == MANIFEST_COLUMNS and len(result.manifest) == 40
    assert "manifest.csv" in caplog.text


def test_read_sidecar_columns_without_a_file(tmp_path: Path):
    extra = read_sidecar_columns(tmp_path, ["NORMAL/a.jpeg", "PNEUMONIA/b.jpeg"])
    assert extra.shape == (2, 0)


# --- Image properties ------------------------------------------------------------------------
def test_jpeg_quality_is_read_from_the_quantization_tables(confounded: Path):
    props = image_properties(sorted(str(p) for p in confounded.rglob("*.jpeg")))
    assert len(props) == 40 and props["error"].isna().all()
    quality = props.set_index(props["path"].str.contains("PNEUMONIA"))["jpeg_quality"]
    assert set(quality.loc[True]) == {60.0} and set(quality.loc[False]) == {95.0}
    assert (props["width"] == 64).all() and (props["aspect"] == 1.0).all()
    assert jpeg_quality_from_tables(None) != jpeg_quality_from_tables(None)  # NaN without tables


def test_image_properties_of_a_png_and_a_bad_file_and_a_sample(tmp_path: Path):
    png = tmp_path / "a.png"
    cv2.imwrite(str(png), np.full((20, 40), 100, np.uint8))
    bad = tmp_path / "b.jpeg"
    bad.write_bytes(b"not an image")
    props = image_properties([png, bad])
    assert np.isnan(props.loc[0, "jpeg_quality"]) and props.loc[0, "aspect"] == 2.0
    assert props.loc[0, "mean_intensity"] == 100.0 and props.loc[0, "sharpness"] == 0.0
    assert props.loc[1, "error"] and np.isnan(props.loc[1, "sharpness"])
    sample = image_properties([png] * 10, max_images=3)
    assert len(sample) == 3


# --- The report ------------------------------------------------------------------------------
def test_report_finds_the_confounded_columns_and_not_the_noise():
    report = {e["property"]: e for e in property_report(_frame())}
    assert set(report) == {"scanner", "dose", "noise", "site"}  # constant and identifier columns skipped
    assert report["scanner"]["kind"] == "categorical" and report["scanner"]["auc"] > 0.99
    assert "portable" in report["scanner"]["direction"]
    assert report["dose"]["auc"] > 0.99 and report["dose"]["direction"].startswith("lower dose goes with PNEUMONIA")
    assert abs(report["noise"]["auc"] - 0.5) < 0.05 and report["noise"]["warning"] is None
    assert abs(report["site"]["auc"] - 0.5) < 0.05 and report["site"]["warning"] is None
    assert report["scanner"]["warning"] == "scanner predicts PNEUMONIA with AUC 1.00: a model can learn it."
    by_part = report["scanner"]["by_part"]["all"]
    assert by_part["PNEUMONIA"] == {"portable": 1.0} and by_part["NORMAL"] == {"fixed": 1.0}
    assert list(report_table(list(report.values())).columns) == ["property", "kind", "n", "auc", "direction", "warning"]


def test_a_yes_no_column_is_described_by_its_shares_and_a_marker_box_is_not_a_property():
    frame = _frame(1000)
    pneumonia = (frame["label"] == "PNEUMONIA").to_numpy()
    rng = np.random.default_rng(2)
    frame["marker"] = np.where(pneumonia, rng.random(len(frame)) < 0.9, rng.random(len(frame)) < 0.1).astype(int)
    frame["marker_x"] = np.where(frame["marker"] == 1, np.where(pneumonia, 5.0, 90.0), np.nan)  # where, if marked
    frame["portable"] = 1 - frame["marker"]  # the same fact the other way round
    report = {e["property"]: e for e in property_report(frame)}
    shares = {label: frame.loc[frame["label"] == label, "marker"].mean() for label in ("PNEUMONIA", "NORMAL")}
    assert report["marker"]["direction"] == (f"marker = 1 is commoner in PNEUMONIA ({shares['PNEUMONIA']:.0%} of "
                                             f"PNEUMONIA vs {shares['NORMAL']:.0%} of NORMAL)")
    assert report["portable"]["direction"].startswith("portable = 0 is commoner in PNEUMONIA")
    assert report["marker"]["auc"] == pytest.approx(report["portable"]["auc"]) and report["marker"]["auc"] > 0.85
    assert "marker_x" not in report  # it would "predict" the label perfectly, but only says where a marker is
    assert report["dose"]["direction"].startswith("lower dose goes with PNEUMONIA (median")  # other numbers as before


def test_many_small_categories_do_not_fit_the_label_by_themselves():
    frame = _frame(400)
    frame["tiny_groups"] = [f"g{i // 2}" for i in range(len(frame))]  # 2 rows per category, unrelated to y
    entry = next(e for e in property_report(frame) if e["property"] == "tiny_groups")
    assert entry["auc"] < 0.6  # in-sample rates would give about 0.83


def test_report_by_part_shows_a_reversed_association():
    frame = _frame(1000)
    frame["part"] = np.where(np.arange(1000) < 800, "train", "test")
    test = frame["part"] == "test"
    frame.loc[test, "scanner"] = np.where(frame.loc[test, "label"] == "PNEUMONIA", "fixed", "portable")
    entry = next(e for e in property_report(frame, split_col="part") if e["property"] == "scanner")
    assert set(entry["by_part"]) == {"train", "test"}
    assert entry["by_part"]["train"]["auc"] > 0.95 and entry["by_part"]["test"]["auc"] < 0.05


def test_warning_threshold_and_numeric_labels():
    frame = _frame(600).assign(y=lambda f: (f["label"] == "PNEUMONIA").astype(int)).drop(columns="label")
    report = property_report(frame, label_col="y", threshold=1.01)
    assert all(e["warning"] is None for e in report)
    assert {e["property"] for e in report if e["auc"] > 0.99} == {"scanner", "dose"}


def test_shortcut_check_on_images_and_sidecar(confounded: Path):
    result = scan_dataset(confounded)
    result.manifest["scanner"] = np.where(result.manifest["label"] == "PNEUMONIA", "portable", "fixed")
    report = {e["property"]: e for e in shortcut_check(result, max_images=30)}
    for name in ("scanner", "sharpness", "jpeg_quality", "bytes_per_pixel"):
        assert report[name]["auc"] > 0.95, name
        assert report[name]["warning"] == f"{name} predicts PNEUMONIA with AUC 1.00: a model can learn it."
    assert report["sharpness"]["direction"].startswith("lower sharpness")
    assert report["scanner"]["measured_on"] == "all 40 images"
    assert report["sharpness"]["measured_on"] == "a sample of 30 images"
    assert "width" not in report  # every image has one size


# --- Probe and weights -----------------------------------------------------------------------
def test_feature_probe_sees_a_group_written_into_the_features():
    rng = np.random.default_rng(0)
    n = 300
    groups = rng.choice(["224px", "512px", "original"], size=n)
    labels = np.where(groups == "224px", "PNEUMONIA", rng.choice(["NORMAL", "PNEUMONIA"], size=n))
    features = rng.normal(size=(n, 16))
    features[:, 0] += 3 * (groups == "224px")
    probe = feature_probe(features, groups, labels=labels)
    assert probe["per_group_auc"]["224px"] > 0.95 and probe["per_group_auc"]["512px"] < 0.8
    assert probe["n"] == n and sum(probe["groups"].values()) == n
    assert probe["label_association"]["auc"] > 0.6
    blind = feature_probe(rng.normal(size=(n, 16)), groups)
    assert abs(blind["auc"] - 0.5) < 0.1 and blind["warning"] is None
    binary = feature_probe(features, groups == "224px")
    assert binary["auc"] > 0.95 and binary["warning"].startswith("The backbone's features tell the groups apart")


def test_balancing_weights_make_the_group_independent_of_the_label():
    frame = _frame(1000)
    frame["scanner"] = np.where(np.random.default_rng(3).random(1000) < 0.8,
                                frame["scanner"], np.where(frame["scanner"] == "fixed", "portable", "fixed"))
    weights = balancing_weights(frame["label"], frame["scanner"])
    assert weights.shape == (1000,) and weights.sum() == pytest.approx(1000)
    overall = (frame["label"] == "PNEUMONIA").mean()
    for _, part in frame.assign(w=weights).groupby("scanner"):
        rate = part.loc[part["label"] == "PNEUMONIA", "w"].sum() / part["w"].sum()
        assert rate == pytest.approx(overall)
    # Each group keeps its share of the data.
    assert frame.assign(w=weights).groupby("scanner")["w"].sum().to_dict() == pytest.approx(
        frame["scanner"].value_counts().to_dict())


# --- The real data ---------------------------------------------------------------------------
@pytest.mark.slow
def test_real_kermany224_source_resolution_is_a_shortcut():
    folder = SHARED / "data" / "kermany224"
    if not (folder / "manifest.csv").is_file():
        pytest.skip("../shared/data/kermany224 is not present on this machine")
    report = {e["property"]: e for e in shortcut_check(scan_dataset(folder), max_images=60)}
    entry = report["source_resolution"]
    assert entry["n"] == 5222 and entry["auc"] > 0.55
    assert entry["warning"].startswith("source_resolution predicts PNEUMONIA with AUC 0.6")
    assert "224px is commoner in PNEUMONIA" in entry["direction"]
    shares = entry["by_part"]["all"]
    assert shares["PNEUMONIA"]["224px"] == pytest.approx(0.60, abs=0.01)
    assert shares["NORMAL"]["224px"] == pytest.approx(0.37, abs=0.01)


# --- The Dataset page ------------------------------------------------------------------------
@pytest.mark.slow
def test_dataset_page_shows_the_shortcut_report(confounded: Path):
    from streamlit.testing.v1 import AppTest

    data_root = Path(os.environ["CXR_DATA_ROOT"])
    data_root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(confounded, data_root / "confounded")
    pd.DataFrame(
        {"path": [f"{c}/{c.lower()}_{i:02d}.jpeg" for c in ("NORMAL", "PNEUMONIA") for i in range(20)],
         "source": ["fixed"] * 20 + ["portable"] * 20}
    ).to_csv(data_root / "confounded" / "manifest.csv", index=False)
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "Home.py"), default_timeout=120)
    at.run()
    at.session_state["dataset"] = "confounded"
    at.switch_page("pages/dataset.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Shortcuts: what else predicts the label?" in [str(s.value) for s in at.subheader]
    warnings = [str(w.value) for w in at.warning]
    assert any(w.startswith("source predicts PNEUMONIA with AUC 1.00: a model can learn it.") for w in warnings)
    assert any(w.startswith("sharpness predicts PNEUMONIA") for w in warnings)
    table = next(d.value for d in at.dataframe if "property" in d.value.columns)
    assert {"source", "sharpness", "jpeg_quality"} <= set(table["property"])
