"""augment: the seeded ImageDataGenerator-style transform, the balance plan, augmented rows."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cxr_core.core.config import AugmentConfig
from cxr_core.core.errors import BadDatasetError
from cxr_core.data.augment import (
    augment_image,
    augment_variants,
    augmented_rows,
    balance_plan,
    with_augmented_rows,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]

NOTHING = AugmentConfig(rotation_range=0, horizontal_flip=False, brightness_range=(1, 1),
                        width_shift=0, height_shift=0, zoom=0)


def _image(h: int = 60, w: int = 80) -> np.ndarray:
    rng = np.random.default_rng(1)
    img = rng.integers(40, 200, (h, w)).astype(np.uint8)
    img[10:30, 5:25] = 250  # an asymmetric bright patch, so flips and shifts are visible
    return img


def _replace(cfg: AugmentConfig, **changes) -> AugmentConfig:
    values = {**cfg.__dict__, **changes}
    return AugmentConfig(**values)


def test_same_seed_same_image_and_shape_kept():
    img = _image()
    cfg = AugmentConfig(rotation_range=10, zoom=0.2)
    a = augment_image(img, cfg, 7)
    b = augment_image(img, cfg, 7)
    assert a.dtype == np.uint8 and a.shape == img.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, augment_image(img, cfg, 8))


def test_no_augmentation_is_identity():
    img = _image()
    np.testing.assert_array_equal(augment_image(img, NOTHING, 3), img)


def test_flip_only_gives_original_or_mirror_both_seen():
    img = _image()
    cfg = _replace(NOTHING, horizontal_flip=True)
    flipped = [not np.array_equal(augment_image(img, cfg, s), img) for s in range(20)]
    for s in range(20):
        out = augment_image(img, cfg, s)
        assert np.array_equal(out, img) or np.array_equal(out, img[:, ::-1])
    assert 3 < sum(flipped) < 17


def test_rotation_range_is_in_degrees_not_turns():
    # 0.3 must mean +-0.3 degrees (ImageDataGenerator), not +-0.3 turns (RandomRotation): nearly no change.
    img = np.zeros((64, 64), np.uint8)
    img[:, 30:34] = 255
    cfg = _replace(NOTHING, rotation_range=0.3)
    for s in range(5):
        out = augment_image(img, cfg, s)
        assert np.abs(out.astype(int) - img).mean() < 2.0
    big = _replace(NOTHING, rotation_range=90)
    assert max(np.abs(augment_image(img, big, s).astype(int) - img).mean() for s in range(5)) > 20


def test_shift_is_a_fraction_of_the_size():
    img = np.zeros((50, 100), np.uint8)
    img[:, 50] = 255
    cfg = _replace(NOTHING, width_shift=0.2)
    moves = []
    for s in range(10):
        out = augment_image(img, cfg, s)
        col = np.average(np.arange(100), weights=out.sum(axis=0).astype(float))
        moves.append(col - 50)
    assert max(abs(m) for m in moves) <= 20.5
    assert max(abs(m) for m in moves) > 3


def test_brightness_multiplies_and_clips():
    img = np.array([[0, 50, 100, 200]], np.uint8).repeat(4, axis=0)
    out = augment_image(img, _replace(NOTHING, brightness_range=(2.0, 2.0)), 0)
    np.testing.assert_array_equal(out[0], [0, 100, 200, 255])


def test_variants_are_consecutive_seeds():
    img = _image()
    cfg = AugmentConfig()
    variants = augment_variants(img, cfg, 10, 4)
    assert len(variants) == 4
    for i, v in enumerate(variants):
        np.testing.assert_array_equal(v, augment_image(img, cfg, 10 + i))


def test_augment_does_not_import_tensorflow():
    code = "import sys, cxr_core.data.augment; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PROJECT_ROOT)


def test_balance_plan_strategies():
    labels = ["NORMAL"] * 3 + ["PNEUMONIA"] * 7
    plan = balance_plan(labels, "augment")
    assert (plan.n_normal, plan.n_pneumonia, plan.n_extra, plan.class_weight) == (3, 7, 4, None)
    weighted = balance_plan(labels, "class_weight")
    assert weighted.n_extra == 0
    assert weighted.class_weight == pytest.approx({0: 10 / 6, 1: 10 / 14})
    none = balance_plan(labels, "none")
    assert none.n_extra == 0 and none.class_weight is None
    assert balance_plan([0, 0, 1], "augment").n_extra == 0  # y values are accepted; more normal: nothing added
    # The extra count is simply the difference (2,152 on the reference split of the full Kermany set).
    assert balance_plan(["NORMAL"] * 1072 + ["PNEUMONIA"] * 3224, "augment").n_extra == 2152
    with pytest.raises(ValueError):
        balance_plan(labels, "oversample")
    with pytest.raises(BadDatasetError):
        balance_plan(["PNEUMONIA"] * 3, "class_weight")


def _split() -> pd.DataFrame:
    rows = []
    for i in range(5):
        rows.append({"path": f"/d/NORMAL/n{i}.jpeg", "label": "NORMAL", "y": 0, "split": "train",
                     "sha256": f"{i:064d}"})
    for i in range(12):
        rows.append({"path": f"/d/PNEUMONIA/p{i}.jpeg", "label": "PNEUMONIA", "y": 1, "split": "train", "sha256": ""})
    rows.append({"path": "/d/NORMAL/val.jpeg", "label": "NORMAL", "y": 0, "split": "val", "sha256": ""})
    rows.append({"path": "/d/NORMAL/test.jpeg", "label": "NORMAL", "y": 0, "split": "test", "sha256": ""})
    return pd.DataFrame(rows)


def test_augmented_rows_cycle_training_normals():
    split = _split()
    extra = augmented_rows(split, 12, seed=5)
    assert len(extra) == 12
    assert set(split.columns) <= set(extra.columns)
    assert (extra["split"] == "train").all() and (extra["label"] == "NORMAL").all()
    assert extra["is_augmented"].all()
    assert extra["augment_seed"].min() >= 0 and extra["augment_seed"].is_unique
    # Only training images are sources, each used 2 or 3 times (12 over 5).
    counts = extra["path"].value_counts()
    assert set(counts.index) == {f"/d/NORMAL/n{i}.jpeg" for i in range(5)}
    assert set(counts) <= {2, 3}
    pd.testing.assert_frame_equal(extra, augmented_rows(split, 12, seed=5))
    assert not augmented_rows(split, 12, seed=6)["augment_seed"].equals(extra["augment_seed"])


def test_augmented_rows_empty_and_combined():
    split = _split()
    empty = augmented_rows(split, 0, seed=1)
    assert len(empty) == 0 and {"augment_seed", "is_augmented", "path"} <= set(empty.columns)
    both = with_augmented_rows(split, 7, seed=1)
    assert len(both) == len(split) + 7
    assert (both["augment_seed"][: len(split)] == -1).all() and not both["is_augmented"][: len(split)].any()
    assert (both["augment_seed"][len(split):] >= 0).all()
    with pytest.raises(BadDatasetError):
        augmented_rows(split[split["label"] == "PNEUMONIA"], 3, seed=1)


def _texture(h: int = 95, w: int = 80) -> np.ndarray:
    # 5-pixel blocks, which do not line up with JPEG's 8-pixel blocks.
    rng = np.random.default_rng(3)
    img = np.kron(rng.integers(30, 220, (h // 5, w // 5)), np.ones((5, 5))).astype(np.uint8)
    return np.ascontiguousarray(img)


def test_robustness_options_are_off_by_default_and_keep_the_reference_draws():
    from cxr_core.data.augment import params_key

    gray = _texture()
    reference = AugmentConfig(rotation_range=5, zoom=0.1)
    # An option's strength changes only its own effect: with every robustness option at zero the
    # images are those of the reference settings, seed for seed, and so are the cache keys.
    for seed in range(5):
        assert np.array_equal(augment_image(gray, reference, seed),
                              augment_image(gray, AugmentConfig(rotation_range=5, zoom=0.1, blur=0.0), seed))
    assert params_key(reference) == params_key(AugmentConfig(rotation_range=5, zoom=0.1, noise=0.0))
    assert "blur" not in params_key(reference)
    assert params_key(AugmentConfig(blur=1.0)) != params_key(AugmentConfig())


def test_blur_downscale_and_jpeg_remove_fine_detail_on_the_images_they_touch():
    gray = _texture()
    still = AugmentConfig(rotation_range=0, horizontal_flip=False, brightness_range=(1, 1), width_shift=0,
                          height_shift=0)

    def sharpness(img):
        return float(cv2.Laplacian(img, cv2.CV_64F).var())

    untouched = augment_image(gray, still, 0)
    base = sharpness(untouched)
    for option in ({"blur": 2.0}, {"downscale": 0.6}, {"jpeg_quality": 5}):
        params = AugmentConfig(**{**still.__dict__, **option})
        images = [augment_image(gray, params, seed) for seed in range(12)]
        touched = [img for img in images if not np.array_equal(img, untouched)]
        # About half of the images are degraded; the rest stay exactly as they were.
        assert 2 <= len(touched) <= 10, option
        if "jpeg_quality" not in option:  # (JPEG's ringing may add high frequencies)
            # A blurred or lower-resolution film loses detail, it never gains it.
            assert all(sharpness(img) < base for img in touched), option


def test_gamma_contrast_and_noise_keep_shape_and_type_and_are_repeatable():
    gray = _texture()
    params = AugmentConfig(gamma=0.4, contrast=0.3, noise=8.0)
    for seed in range(6):
        out = augment_image(gray, params, seed)
        assert out.shape == gray.shape and out.dtype == np.uint8
        assert np.array_equal(out, augment_image(gray, params, seed))
    assert any(not np.array_equal(augment_image(gray, params, s), augment_image(gray, AugmentConfig(), s))
               for s in range(6))


def test_robustness_options_are_checked():
    with pytest.raises(ValueError, match="jpeg_quality"):
        AugmentConfig(jpeg_quality=3)
    with pytest.raises(ValueError, match="blur"):
        AugmentConfig(blur=-1)
    with pytest.raises(ValueError, match="downscale is a fraction"):
        AugmentConfig(downscale=1.0)
