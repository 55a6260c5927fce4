"""cxr_core.data.practice: the synthetic practice data set."""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxr_core.core.errors import BadDatasetError, BadSettingError
from cxr_core.data.practice import PRACTICE_FOLDER_NAME, make_practice_dataset
from cxr_core.data.scan import make_split, scan_dataset
from cxr_core.io.images import load_gray


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_practice_dataset_is_labelled_synthetic_and_scannable(tmp_path: Path):
    folder = make_practice_dataset(tmp_path, n_normal=20, n_pneumonia=40, size=64)
    assert folder == tmp_path / PRACTICE_FOLDER_NAME and "SYNTHETIC" in folder.name
    readme = (folder / "README.txt").read_text()
    assert "SYNTHETIC" in readme and "NOT REAL X-RAYS" in readme
    result = scan_dataset(folder)
    manifest = result.manifest
    assert result.layout == "class_folders" and result.skipped.empty and result.duplicates.empty
    assert manifest["label"].value_counts().to_dict() == {"PNEUMONIA": 40, "NORMAL": 20}
    assert (manifest[["width", "height"]] == 64).all().all()
    # Kermany-style names: several images per patient, subtypes from the names.
    assert manifest.groupby("patient_id").size().max() > 1
    assert manifest["patient_id"].nunique() < len(manifest)
    assert set(manifest["subtype"]) == {"normal", "bacteria", "virus"}
    kermany_name = r"^(NORMAL/IM-\d{4}-\d{4}|PNEUMONIA/person\d+_(bacteria|virus)_\d+)\.jpeg$"
    assert manifest["relpath"].str.match(kermany_name).all()
    split = make_split(manifest, "patient")
    assert (split.groupby("patient_id")["split"].nunique() == 1).all()


def test_practice_dataset_is_deterministic(tmp_path: Path):
    a = make_practice_dataset(tmp_path / "a", n_normal=10, n_pneumonia=12, size=48, seed=5)
    b = make_practice_dataset(tmp_path / "b", n_normal=10, n_pneumonia=12, size=48, seed=5)
    c = make_practice_dataset(tmp_path / "c", n_normal=10, n_pneumonia=12, size=48, seed=6)
    assert _digest(a) == _digest(b) != _digest(c)


def test_existing_set_is_reused_and_other_settings_rebuild(tmp_path: Path):
    first = make_practice_dataset(tmp_path / "my-synthetic-set", n_normal=10, n_pneumonia=10, size=32)
    assert first == tmp_path / "my-synthetic-set"  # the name already says synthetic
    marker = first / "NORMAL" / "IM-0001-0001.jpeg"
    mtime = marker.stat().st_mtime_ns
    assert make_practice_dataset(first, n_normal=10, n_pneumonia=10, size=32) == first
    assert marker.stat().st_mtime_ns == mtime
    make_practice_dataset(first, n_normal=12, n_pneumonia=10, size=32)
    assert len(list((first / "NORMAL").iterdir())) == 12
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_refuses_a_folder_with_other_files_and_bad_arguments(tmp_path: Path):
    target = tmp_path / "synthetic"
    target.mkdir()
    (target / "mine.txt").write_text("precious")
    with pytest.raises(BadDatasetError, match="already holds other files"):
        make_practice_dataset(target)
    assert (target / "mine.txt").read_text() == "precious"
    with pytest.raises(BadSettingError, match="at least 10 images per class"):
        make_practice_dataset(tmp_path, n_normal=3)
    with pytest.raises(BadSettingError, match="size must be between 32 and 1024"):
        make_practice_dataset(tmp_path, size=8)


def test_practice_images_are_learnable(tmp_path: Path):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import cross_val_score

    manifest = scan_dataset(make_practice_dataset(tmp_path, size=64)).manifest
    assert len(manifest) == 220
    # Pneumonia images have bright opacities in the dark lung fields: a pixel histogram shows it.
    features = np.stack(
        [np.histogram(load_gray(p), bins=32, range=(0, 256))[0] for p in manifest["path"]]
    )
    accuracy = cross_val_score(RandomForestClassifier(n_estimators=40, random_state=0), features, manifest["y"], cv=5)
    assert accuracy.mean() > 0.85
    small = np.stack([cv2.resize(load_gray(p), (16, 16), interpolation=cv2.INTER_AREA) for p in manifest["path"]])
    assert small[manifest["y"] == 1].mean() > small[manifest["y"] == 0].mean()
