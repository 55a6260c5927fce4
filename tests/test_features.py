"""features: the on-disk feature cache and the extraction pipeline (tiny random MobileNetV2 at 32 px)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_MODEL as CFG
from cxr_core.core.config import AugmentConfig, ModelConfig
from cxr_core.data.augment import augment_image
from cxr_core.engine.features import default_cache_dir, entry_key, extract_features, model_key
from cxr_core.engine.model import build_feature_extractor
from cxr_core.io.images import load_gray, to_model_input

AUG = AugmentConfig(rotation_range=10, width_shift=0.1, height_shift=0.1)


def _rows(root: Path, with_sha: bool = True) -> pd.DataFrame:
    paths = sorted(root.rglob("*.jpeg"))
    rows = pd.DataFrame({"path": [str(p) for p in paths], "label": [p.parent.name for p in paths]})
    if with_sha:
        rows["sha256"] = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    rows["augment_seed"] = -1
    return rows


def _assert_close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-4) -> None:
    # Relative to the vectors' size: a random MobileNetV2's features are tiny (~1e-11), so atol is useless.
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    assert np.linalg.norm(actual - expected) <= rel * np.linalg.norm(expected) and np.linalg.norm(expected) > 0


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.npy"))


def test_default_cache_dir(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CXR_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "cxr-workbench" / "features"


def test_keys_cover_weights_size_and_augmentation(tmp_path: Path):
    assert model_key(CFG, 1) != model_key(CFG, 2)  # random init: the seed is the weights' identity
    assert model_key(CFG, 1) != model_key(ModelConfig(backbone="mobilenet_v2", weights="none", image_size=48), 1)
    wider = ModelConfig(backbone="mobilenet_v2", weights="none", image_size=32, alpha=0.5)
    assert model_key(CFG, 1) != model_key(wider, 1)
    w1, w2 = tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"
    w1.write_bytes(b"one")
    w2.write_bytes(b"two")
    file_cfg = lambda p: ModelConfig(backbone="mobilenet_v2", weights=str(p), image_size=32)  # noqa: E731
    assert model_key(file_cfg(w1), 1) != model_key(file_cfg(w2), 1)
    assert model_key(file_cfg(w1), 1) == model_key(file_cfg(w1), 2)  # a file's weights do not depend on the seed
    sha = "ab" * 32
    assert entry_key(sha, -1, None) == sha
    assert entry_key(sha, 3, AUG) != entry_key(sha, 4, AUG)
    assert entry_key(sha, 3, AUG) != entry_key(sha, 3, AugmentConfig())
    assert entry_key(sha, 3, AUG) == entry_key(sha, 3, AugmentConfig(**AUG.__dict__))


@pytest.mark.slow
def test_second_call_is_all_cache_and_identical(tiny_dataset: Path, tmp_path: Path):
    rows = _rows(tiny_dataset)
    calls: list[tuple[int, int]] = []
    computing: list[tuple[int, int]] = []  # (rows to compute, progress calls before): said before any model work
    first = extract_features(rows, CFG, None, cache_dir=tmp_path, batch_size=8,
                             on_progress=lambda d, t: calls.append((d, t)),
                             on_compute=lambda n: computing.append((n, len(calls))))
    assert (first.n_computed, first.n_cached, first.cancelled) == (36, 0, False)
    assert computing == [(36, 0)]
    assert first.features.shape == (36, 1280) and first.features.dtype == np.float32
    np.testing.assert_array_equal(first.index, np.arange(36))
    assert first.errors.empty and list(first.errors.columns) == ["path", "reason"]
    assert len(_entries(tmp_path)) == 36
    # Progress after every batch (36 / 8 -> 5 batches), increasing, ending at the total.
    assert calls == [(8, 36), (16, 36), (24, 36), (32, 36), (36, 36)]

    # The features are the extractor's output on the images made by images.to_model_input.
    extractor = build_feature_extractor(CFG, backbone=first.backbone)
    x = np.stack([to_model_input(load_gray(p), 32) for p in rows["path"][:4]])
    _assert_close(first.features[:4], extractor(x, training=False).numpy())

    calls.clear()
    second = extract_features(rows, CFG, None, cache_dir=tmp_path, batch_size=8,
                              on_progress=lambda d, t: calls.append((d, t)),
                              on_compute=lambda n: computing.append((n, len(calls))))
    assert (second.n_computed, second.n_cached) == (0, 36)
    assert computing == [(36, 0)]  # nothing to compute: not told again
    assert second.backbone is None  # nothing to compute: the model was not even built
    np.testing.assert_array_equal(second.features, first.features)
    assert calls == [(36, 36)]  # one read of the pack the first call wrote
    assert len(list((tmp_path / first.model_key / "packs").glob("*.npz"))) == 1

    # Without the sha256 column the files are hashed: same keys, still all cached.
    third = extract_features(_rows(tiny_dataset, with_sha=False), CFG, None, cache_dir=tmp_path)
    assert third.n_computed == 0
    np.testing.assert_array_equal(third.features, first.features)


@pytest.mark.slow  # builds or loads models: seconds
def test_damaged_entries_are_recomputed(tiny_dataset: Path, tmp_path: Path):
    rows = _rows(tiny_dataset).iloc[:6]
    first = extract_features(rows, CFG, None, cache_dir=tmp_path)
    entries = _entries(tmp_path)
    entries[0].write_bytes(entries[0].read_bytes()[:40])            # torn write
    entries[1].write_bytes(b"garbage")                             # not an .npy at all
    np.save(entries[2], np.zeros(7, np.float32))                   # wrong shape
    for pack in tmp_path.rglob("*.npz"):  # without the pack, the entries are read one by one
        pack.unlink()
    again = extract_features(rows, CFG, None, cache_dir=tmp_path)
    assert (again.n_computed, again.n_cached) == (3, 3)
    _assert_close(again.features, first.features)
    assert extract_features(rows, CFG, None, cache_dir=tmp_path).n_computed == 0


@pytest.mark.slow  # builds or loads models: seconds
def test_augmented_rows_are_cached_separately(tiny_dataset: Path, tmp_path: Path):
    original = _rows(tiny_dataset).iloc[:2]
    augmented = original.assign(augment_seed=[11, 12])
    rows = pd.concat([original, augmented], ignore_index=True)
    result = extract_features(rows, CFG, AUG, cache_dir=tmp_path)
    assert result.n_computed == 4 and len(_entries(tmp_path)) == 4
    diff = np.linalg.norm(result.features[0] - result.features[2])
    assert diff > 0.01 * np.linalg.norm(result.features[0])
    # The augmented features are those of augment_image(gray, AUG, seed).
    extractor = build_feature_extractor(CFG, backbone=result.backbone)
    gray = augment_image(load_gray(rows["path"][2]), AUG, 11)
    expected = extractor(to_model_input(gray, 32)[None], training=False).numpy()[0]
    _assert_close(result.features[2], expected)
    # Other augmentation settings -> other entries; the same ones -> cache hits.
    other = extract_features(augmented, CFG, AugmentConfig(), cache_dir=tmp_path)
    assert other.n_computed == 2
    assert extract_features(rows, CFG, AUG, cache_dir=tmp_path).n_computed == 0
    with pytest.raises(ValueError, match="augment_cfg"):
        extract_features(augmented, CFG, None, cache_dir=tmp_path)


def test_unreadable_images_are_reported_and_skipped(tiny_dataset: Path, tmp_path: Path):
    rows = _rows(tiny_dataset).iloc[:5]
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    missing = tmp_path / "missing.jpeg"
    extra = pd.DataFrame({"path": [str(broken), str(missing)], "label": ["NORMAL", "NORMAL"],
                          "sha256": ["", None], "augment_seed": [-1, -1]})
    rows = pd.concat([rows.iloc[:2], extra, rows.iloc[2:]], ignore_index=True)
    result = extract_features(rows, CFG, None, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(result.index, [0, 1, 4, 5, 6])
    assert result.features.shape == (5, 1280)
    assert list(result.errors["path"]) == [str(broken), str(missing)]
    assert all(isinstance(r, str) and r for r in result.errors["reason"])
    assert list(result.rows["path"]) == list(rows["path"].iloc[[0, 1, 4, 5, 6]])


def test_cancellation_between_batches(tiny_dataset: Path, tmp_path: Path):
    rows = _rows(tiny_dataset)
    seen: list[int] = []
    result = extract_features(rows, CFG, None, cache_dir=tmp_path, batch_size=4,
                              on_progress=lambda d, _total: seen.append(d), should_stop=lambda: len(seen) >= 2)
    assert result.cancelled
    assert result.n_computed == 8 and len(result.index) == 8 and len(seen) == 2
    assert len(_entries(tmp_path)) == 8  # what was computed before the stop is cached

    stopped = extract_features(rows, CFG, None, cache_dir=tmp_path / "other", should_stop=lambda: True)
    assert stopped.cancelled and stopped.n_computed == 0 and stopped.features.shape[0] == 0


@pytest.mark.slow
def test_packs_are_exact_checked_and_pruned(tiny_dataset: Path, tmp_path: Path):
    rows = _rows(tiny_dataset)
    first = extract_features(rows.iloc[:10], CFG, None, cache_dir=tmp_path)
    packs = tmp_path / first.model_key / "packs"
    (pack,) = packs.glob("*.npz")

    # Another row order is another row list: its own pack, with the same vectors reordered.
    reordered = extract_features(rows.iloc[:10].iloc[::-1], CFG, None, cache_dir=tmp_path)
    assert reordered.n_computed == 0
    np.testing.assert_array_equal(reordered.features, first.features[::-1])
    assert len(list(packs.glob("*.npz"))) == 2

    # A damaged pack is passed over: the entries answer and a good pack is written again.
    pack.write_bytes(pack.read_bytes()[:100])
    again = extract_features(rows.iloc[:10], CFG, None, cache_dir=tmp_path)
    assert again.n_computed == 0
    np.testing.assert_array_equal(again.features, first.features)
    assert pack.stat().st_size > 10 * 1280 * 4

    # Only the most recently used row lists keep a pack. (The entries of rows 10-14 are computed in one
    # call first, so the loop builds no model: each build of the backbone costs about a second.)
    assert extract_features(rows.iloc[:15], CFG, None, cache_dir=tmp_path).n_computed == 5
    for n in range(11, 16):
        assert extract_features(rows.iloc[:n], CFG, None, cache_dir=tmp_path).n_computed == 0
    assert len(list(packs.glob("*.npz"))) == 4


def test_no_pack_when_rows_are_unreadable_or_cancelled(tiny_dataset: Path, tmp_path: Path):
    rows = _rows(tiny_dataset).iloc[:12].copy()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    rows.loc[rows.index[0], "path"] = str(broken)
    result = extract_features(rows, CFG, None, cache_dir=tmp_path / "cache")
    assert len(result.errors) == 1
    assert not list((tmp_path / "cache").rglob("*.npz"))
    stopped = extract_features(_rows(tiny_dataset).iloc[12:30], CFG, None, cache_dir=tmp_path / "cache",
                               batch_size=4, should_stop=lambda: True)
    assert stopped.cancelled and not list((tmp_path / "cache").rglob("*.npz"))
