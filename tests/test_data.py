"""cxr_core.data.scan: layouts, manifest, patient ids, duplicates, splits and subsets."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

from conftest import make_dataset
from cxr_core.core.errors import BadDatasetError
from cxr_core.data.scan import (
    CLASSES,
    MANIFEST_COLUMNS,
    ScanResult,
    find_dataset_root,
    make_split,
    parse_patient_id,
    parse_subtype,
    scan_dataset,
    stratified_subset,
)


def _image(path: Path, value: int = 100, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((size, size), value, np.uint8)
    img[value % size, :] = 255  # make each value's bytes distinct
    cv2.imwrite(str(path), img)
    return path


def _two_class_folder(root: Path, normal: str = "NORMAL", pneumonia: str = "PNEUMONIA", n: int = 3) -> Path:
    for i in range(n):
        _image(root / normal / f"IM-{i:04d}-0001.jpeg", 10 + i)
        _image(root / pneumonia / f"person{i}_bacteria_{i}.jpeg", 100 + i)
    return root


# ---------------------------------------------------------------------------------------------
# File names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,patient",
    [
        ("person123_bacteria_456.jpeg", "person123"),
        ("person1_virus_11_2.jpeg", "person1"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0429-0001-0002.jpeg", "IM-0429"),
        ("NORMAL2-IM-0927-0001.jpeg", "NORMAL2-IM-0927"),
        ("/some/dir/NORMAL2-IM-0927-0001.jpeg", "NORMAL2-IM-0927"),
        ("scan_42.png", "scan_42"),
        ("IM-0115.jpeg", "IM-0115"),
    ],
)
def test_parse_patient_id(name: str, patient: str):
    assert parse_patient_id(name) == patient


@pytest.mark.parametrize(
    "name,label,subtype",
    [
        ("person1_bacteria_1.jpeg", "PNEUMONIA", "bacteria"),
        ("person1_virus_1.jpeg", "PNEUMONIA", "virus"),
        ("scan.png", "PNEUMONIA", "unknown"),
        ("IM-0001-0001.jpeg", "NORMAL", "normal"),
    ],
)
def test_parse_subtype(name: str, label: str, subtype: str):
    assert parse_subtype(name, label) == subtype


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


def test_scan_class_folders(tiny_dataset: Path):
    result = scan_dataset(tiny_dataset)
    assert isinstance(result, ScanResult)
    assert result.layout == "class_folders" and result.root == tiny_dataset
    manifest = result.manifest
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 36
    assert manifest["label"].value_counts().to_dict() == {"PNEUMONIA": 24, "NORMAL": 12}
    assert (manifest["y"] == manifest["label"].map({"NORMAL": 0, "PNEUMONIA": 1})).all()
    assert manifest["path"].map(lambda p: Path(p).is_absolute() and Path(p).is_file()).all()
    assert manifest["relpath"].str.match(r"^(NORMAL|PNEUMONIA)/").all()
    assert (manifest["official_split"] == "").all()
    assert (manifest[["width", "height"]] == 48).all().all()
    assert manifest["sha256"].str.len().eq(64).all()
    assert set(manifest["subtype"]) == {"normal", "bacteria", "virus"}
    assert manifest["patient_id"].nunique() == 6 + 8
    assert result.skipped.empty and result.duplicates.empty


def test_a_second_scan_in_one_process_sees_a_changed_file(tiny_dataset: Path):
    # A long-lived process (the server, a resident worker) remembers what it read by path, size and mtime.
    first = scan_dataset(tiny_dataset).manifest.set_index("relpath")
    changed = tiny_dataset / first.index[0]
    before = os.stat(changed).st_mtime_ns
    cv2.imwrite(str(changed), np.full((50, 40), 200, np.uint8))
    os.utime(changed, ns=(before + 10**9, before + 10**9))
    again = scan_dataset(tiny_dataset).manifest.set_index("relpath")
    assert again.loc[first.index[0], "sha256"] != first.loc[first.index[0], "sha256"]
    assert (again.loc[first.index[0], ["width", "height"]] == [40, 50]).all()
    assert (again.drop(index=first.index[0])["sha256"] == first.drop(index=first.index[0])["sha256"]).all()


def test_scan_kermany_layout_keeps_the_official_split(tiny_kermany: Path):
    result = scan_dataset(tiny_kermany)
    assert result.layout == "kermany"
    assert set(result.manifest["official_split"]) == {"train", "val", "test"}
    row = result.manifest.iloc[0]
    assert row["relpath"].split("/")[0] == row["official_split"]
    assert len(result.manifest) == 60


def test_folder_names_are_case_insensitive_and_healthy_is_normal(tmp_path: Path):
    root = _two_class_folder(tmp_path / "ds", normal="Healthy", pneumonia="pneumonia")
    manifest = scan_dataset(root).manifest
    assert set(manifest["label"]) == set(CLASSES)
    assert (manifest.loc[manifest["relpath"].str.startswith("Healthy/"), "label"] == "NORMAL").all()


def test_normal_and_healthy_folders_are_merged(tmp_path: Path):
    root = _two_class_folder(tmp_path / "ds")
    _image(root / "HEALTHY" / "IM-0100-0001.jpeg", 77)
    assert (scan_dataset(root).manifest["label"] == "NORMAL").sum() == 4


def test_kermany_inside_chest_xray_and_one_level_above(tmp_path: Path):
    # The release's zip extracts to chest_xray/; some zips add one more folder around it.
    make_dataset(tmp_path / "download" / "chest_xray", n_normal=10, n_pneumonia=10, layout="kermany")
    (tmp_path / "download" / "__MACOSX").mkdir()
    for root in (tmp_path / "download", tmp_path / "download" / "chest_xray", tmp_path):
        result = scan_dataset(root)
        assert result.layout == "kermany"
        assert result.root == tmp_path / "download" / "chest_xray"
        assert len(result.manifest) == 20


def test_nested_subfolders_inside_class_folders(tmp_path: Path):
    root = _two_class_folder(tmp_path / "ds")
    _image(root / "PNEUMONIA" / "batch2" / "deeper" / "person50_virus_1.jpeg", 200)
    manifest = scan_dataset(root).manifest
    assert "PNEUMONIA/batch2/deeper/person50_virus_1.jpeg" in set(manifest["relpath"])


def test_junk_is_ignored_and_bad_files_are_listed(tmp_path: Path):
    root = _two_class_folder(tmp_path / "ds")
    (root / "NORMAL" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "NORMAL" / "Thumbs.db").write_bytes(b"junk")
    (root / "NORMAL" / ".hidden.jpeg").write_bytes(b"junk")
    (root / "NORMAL" / "__MACOSX").mkdir()
    (root / "NORMAL" / "__MACOSX" / "._IM-0000-0001.jpeg").write_bytes(b"junk")
    (root / "NORMAL" / "notes.txt").write_text("a note")
    (root / "NORMAL" / "broken.jpeg").write_text("not an image at all")
    (root / "PNEUMONIA" / "empty.png").write_bytes(b"")
    result = scan_dataset(root)
    assert len(result.manifest) == 6
    skipped = result.skipped.set_index(result.skipped["path"].map(lambda p: Path(p).name))["reason"]
    assert set(skipped.index) == {"notes.txt", "broken.jpeg", "empty.png"}
    assert "broken.jpeg is not an image" in skipped["broken.jpeg"]
    assert "empty.png is an empty file" in skipped["empty.png"]


def test_too_large_and_tiny_images_are_listed(tmp_path: Path):
    import struct
    import zlib

    root = _two_class_folder(tmp_path / "ds")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
    huge = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b"")
    (root / "NORMAL" / "huge.png").write_bytes(huge)
    cv2.imwrite(str(root / "NORMAL" / "dot.png"), np.zeros((1, 1), np.uint8))
    result = scan_dataset(root)
    reasons = " ".join(result.skipped["reason"])
    assert "huge.png" in reasons and "dot.png is only 1 x 1 pixels" in reasons
    assert len(result.manifest) == 6


def test_duplicates_are_kept_once(tmp_path: Path):
    root = _two_class_folder(tmp_path / "ds")
    original = root / "NORMAL" / "IM-0000-0001.jpeg"
    shutil.copy(original, root / "NORMAL" / "IM-0000-0001 copy.jpeg")
    shutil.copy(original, root / "PNEUMONIA" / "person9_virus_9.jpeg")  # same bytes, other class
    result = scan_dataset(root)
    assert len(result.manifest) == 6
    assert result.manifest["sha256"].is_unique
    dups = result.duplicates
    assert len(dups) == 2
    # The first by path is kept: "IM-0000-0001 copy.jpeg" sorts before "IM-0000-0001.jpeg".
    kept = str(root / "NORMAL" / "IM-0000-0001 copy.jpeg")
    assert set(dups["duplicate_of"]) == {kept}
    assert kept in set(result.manifest["path"])
    assert dups.set_index(dups["path"].map(lambda p: Path(p).name))["label_conflict"].to_dict() == {
        "IM-0000-0001.jpeg": False,
        "person9_virus_9.jpeg": True,
    }


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_symlinks_followed_without_loops(tmp_path: Path):
    root = _two_class_folder(tmp_path / "ds")
    outside = _image(tmp_path / "elsewhere" / "person77_bacteria_7.jpeg", 222)
    (root / "PNEUMONIA" / "linked.jpeg").symlink_to(outside)
    (root / "NORMAL" / "loop").symlink_to(root / "NORMAL", target_is_directory=True)
    (root / "NORMAL" / "up").symlink_to(root, target_is_directory=True)
    (root / "PNEUMONIA" / "dangling.jpeg").symlink_to(tmp_path / "missing.jpeg")
    start = time.perf_counter()
    result = scan_dataset(root)
    assert time.perf_counter() - start < 10
    names = set(result.manifest["relpath"].map(lambda p: Path(p).name))
    assert "linked.jpeg" in names
    assert result.manifest["sha256"].is_unique
    assert "dangling.jpeg" in " ".join(result.skipped["path"])
    # The loop may be entered once at most; its images are the same files, listed once.
    assert (result.manifest["label"] == "NORMAL").sum() == 3


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path):
    with pytest.raises(BadDatasetError, match=r"nowhere does not exist"):
        scan_dataset(tmp_path / "nowhere")


def test_file_instead_of_folder(tmp_path: Path):
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    with pytest.raises(BadDatasetError, match=r"is a file, not a folder \(a zip archive must be extracted first\)"):
        scan_dataset(archive)


def test_empty_folder(tmp_path: Path):
    with pytest.raises(BadDatasetError, match=r"needs NORMAL \(or HEALTHY\) and PNEUMONIA folders"):
        scan_dataset(tmp_path)


def test_class_folders_without_images(tmp_path: Path):
    (tmp_path / "NORMAL").mkdir()
    (tmp_path / "PNEUMONIA").mkdir()
    (tmp_path / "PNEUMONIA" / "bad.jpeg").write_text("nope")
    with pytest.raises(BadDatasetError, match=r"no usable images \(1 files could not be read\)"):
        scan_dataset(tmp_path)


def test_one_class_only(tmp_path: Path):
    for i in range(3):
        _image(tmp_path / "PNEUMONIA" / f"person{i}_virus_{i}.jpeg", i)
    with pytest.raises(BadDatasetError, match=r"PNEUMONIA images only \(3\); add a NORMAL \(or HEALTHY\) folder"):
        scan_dataset(tmp_path)


def test_unknown_folder_names_are_named(tmp_path: Path):
    _image(tmp_path / "cats" / "a.png", 1)
    _image(tmp_path / "dogs" / "b.png", 2)
    with pytest.raises(BadDatasetError, match=r"holds the folders cats, dogs, but a data set needs NORMAL"):
        scan_dataset(tmp_path)


def test_images_without_class_folders(tmp_path: Path):
    _image(tmp_path / "a.png", 1)
    with pytest.raises(BadDatasetError, match="holds images but no class folders"):
        scan_dataset(tmp_path)


def test_find_dataset_root_reports_parts(tiny_kermany: Path):
    layout, root, parts = find_dataset_root(tiny_kermany)
    assert layout == "kermany" and root == tiny_kermany
    assert {(label, split) for label, split, _ in parts} == {(c, s) for c in CLASSES for s in ("train", "val", "test")}


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def medium_manifest(tmp_path: Path) -> pd.DataFrame:
    return scan_dataset(make_dataset(tmp_path / "medium", n_normal=60, n_pneumonia=150, size=24)).manifest


def test_random_split_is_the_reference_procedure(medium_manifest: pd.DataFrame):
    split = make_split(medium_manifest, "random", seed=123)
    assert list(split.index) == list(medium_manifest.index)
    index = np.arange(len(medium_manifest))
    y = medium_manifest["y"].to_numpy()
    train, rest = train_test_split(index, test_size=0.2, stratify=y, random_state=123)
    val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=123)
    assert set(np.flatnonzero(split["split"] == "train")) == set(train)
    assert set(np.flatnonzero(split["split"] == "val")) == set(val)
    assert set(np.flatnonzero(split["split"] == "test")) == set(test)
    counts = split["split"].value_counts()
    assert counts["train"] == 168 and counts["val"] == 21 and counts["test"] == 21


def test_random_split_is_deterministic_and_stratified(medium_manifest: pd.DataFrame):
    a = make_split(medium_manifest, "random", seed=7)
    b = make_split(medium_manifest, "random", seed=7)
    c = make_split(medium_manifest, "random", seed=8)
    assert (a["split"] == b["split"]).all()
    assert not (a["split"] == c["split"]).all()
    share = a.groupby("split")["y"].mean()
    assert (share - medium_manifest["y"].mean()).abs().max() < 0.05


def test_patient_split_keeps_patients_together(medium_manifest: pd.DataFrame):
    split = make_split(medium_manifest, "patient", seed=123)
    assert (split.groupby("patient_id")["split"].nunique() == 1).all()
    for part in ("train", "val", "test"):
        assert set(split.loc[split["split"] == part, "y"]) == {0, 1}
    shares = split["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.8) < 0.06 and abs(shares["test"] - 0.1) < 0.04
    again = make_split(medium_manifest, "patient", seed=123)
    assert (again["split"] == split["split"]).all()


def test_patient_split_works_on_the_tiny_fixture(tiny_dataset: Path):
    split = make_split(scan_dataset(tiny_dataset).manifest, "patient")
    assert (split.groupby("patient_id")["split"].nunique() == 1).all()


def test_patient_split_refuses_too_few_patients(tmp_path: Path):
    root = _two_class_folder(tmp_path / "ds", n=2)
    with pytest.raises(BadDatasetError, match=r"Only 2 NORMAL patient\(s\) were found"):
        make_split(scan_dataset(root).manifest, "patient")


def test_official_split(tmp_path: Path):
    root = make_dataset(tmp_path / "chest_xray", n_normal=40, n_pneumonia=80, layout="kermany")
    manifest = scan_dataset(root).manifest
    split = make_split(manifest, "official", seed=123)
    assert (split.loc[manifest["official_split"] == "test", "split"] == "test").all()
    assert (split.loc[manifest["official_split"] != "test", "split"] != "test").all()
    carved = split[split["official_split"] != "test"]
    assert (carved.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(split.loc[split["split"] == "val", "y"]) == {0, 1}


def test_official_split_needs_the_kermany_layout(tiny_dataset: Path):
    with pytest.raises(BadDatasetError, match="official split needs the Kermany layout with a test folder"):
        make_split(scan_dataset(tiny_dataset).manifest, "official")


def test_a_part_without_both_classes_is_refused(tmp_path: Path):
    root = _two_class_folder(tmp_path / "ds", n=4)
    with pytest.raises(BadDatasetError, match="add more images"):
        make_split(scan_dataset(root).manifest, "random")


def test_unknown_mode_and_bad_fractions(tiny_dataset: Path):
    manifest = scan_dataset(tiny_dataset).manifest
    with pytest.raises(BadDatasetError, match="'weird' is unknown"):
        make_split(manifest, "weird")
    with pytest.raises(BadDatasetError, match="between 0 and 0.5"):
        make_split(manifest, "random", val_fraction=0.6)


def test_split_refuses_a_one_class_manifest(tiny_dataset: Path):
    manifest = scan_dataset(tiny_dataset).manifest
    with pytest.raises(BadDatasetError, match="0 NORMAL and 24 PNEUMONIA images; both classes are needed"):
        make_split(manifest[manifest["y"] == 1], "random")


# ---------------------------------------------------------------------------------------------
# Subsets
# ---------------------------------------------------------------------------------------------


def test_stratified_subset(medium_manifest: pd.DataFrame):
    subset = stratified_subset(medium_manifest, 50, seed=1)
    assert len(subset) == 50
    assert subset["label"].value_counts().to_dict() == {"PNEUMONIA": 36, "NORMAL": 14}
    assert subset.index.is_monotonic_increasing
    assert subset.equals(stratified_subset(medium_manifest, 50, seed=1))
    assert not subset.index.equals(stratified_subset(medium_manifest, 50, seed=2).index)
    assert len(stratified_subset(medium_manifest, 10_000)) == len(medium_manifest)


def test_stratified_subset_keeps_a_rare_class(medium_manifest: pd.DataFrame):
    rare = pd.concat([medium_manifest[medium_manifest["y"] == 0].head(1), medium_manifest[medium_manifest["y"] == 1]])
    subset = stratified_subset(rare, 10)
    assert set(subset["y"]) == {0, 1}
    with pytest.raises(BadDatasetError, match="at least 2 images"):
        stratified_subset(rare, 1)


# ---------------------------------------------------------------------------------------------
# Real data (skipped when ../shared is absent)
# ---------------------------------------------------------------------------------------------


def test_real_kermany224(shared_dir: Path):
    folder = shared_dir / "data" / "kermany224"
    start = time.perf_counter()
    result = scan_dataset(folder)
    elapsed = time.perf_counter() - start
    manifest = result.manifest
    assert len(manifest) == 5222 and (manifest["label"] == "NORMAL").sum() == 1348
    assert result.skipped.empty and result.duplicates.empty
    assert elapsed < 15, f"scanning took {elapsed:.1f} s"

    reference = pd.read_csv(folder / "manifest.csv").set_index("path")
    mine = manifest.set_index("relpath")
    assert (mine["patient_id"] == reference.loc[mine.index, "patient_id"]).all()
    assert (mine["subtype"] == reference.loc[mine.index, "subtype"]).all()
    assert (mine["sha256"] == reference.loc[mine.index, "sha256"]).all()

    overall = (manifest["y"] == 0).mean()
    random_split = make_split(manifest, "random", seed=123)
    for part, rows in random_split.groupby("split"):
        assert abs((rows["y"] == 0).mean() - overall) < 0.01, part
    assert random_split["split"].value_counts().to_dict() == {"train": 4177, "test": 523, "val": 522}

    patient_split = make_split(manifest, "patient", seed=123)
    assert (patient_split.groupby("patient_id")["split"].nunique() == 1).all()
    shares = patient_split["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.8) < 0.02 and abs(shares["val"] - 0.1) < 0.02
    for part, rows in patient_split.groupby("split"):
        assert abs((rows["y"] == 0).mean() - overall) < 0.02, part
