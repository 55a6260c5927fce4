"""Augmentation: one seeded function with Keras ImageDataGenerator's meaning, and the balance plan.

The reference notebook augmented with ``ImageDataGenerator``; ``augment_image`` reproduces the
meaning of its parameters with a single ``cv2.warpAffine`` (rotation, shift, zoom and flip folded
into one matrix), so the Augmentation page's live preview and training see exactly the same images.
This module must not import TensorFlow: the page calls it on every slider move.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Sequence

import cv2
import numpy as np
import pandas as pd

from cxr_core.core.config import BALANCE_STRATEGIES, AugmentConfig
from cxr_core.core.errors import BadDatasetError
from cxr_core.core.labels import CLASSES

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class _Draws:
    """Every random value of one augmented image, drawn in a fixed order (see ``_draw``)."""

    angle: float
    tx: float
    ty: float
    zx: float
    zy: float
    flip: bool
    brightness: float
    apply: np.ndarray  # blur, downscale, jpeg, contrast, gamma, noise: each on half of the images
    sigma: float
    shrink: float
    quality: int
    contrast: float
    gamma: float
    noise_sd: float
    noise_seed: int


def _draw(params: AugmentConfig, seed: int, h: int, w: int) -> _Draws:
    rng = np.random.default_rng(seed)
    # Every value is drawn whatever the settings, in a fixed order, so switching one option off
    # does not change the draws of the others for the same seed.
    # rotation_range is in DEGREES, as in ImageDataGenerator (0.3 means +-0.3 degrees). Keras'
    # RandomRotation layer takes a fraction of a full turn instead; 0.3 there would be +-108 degrees.
    angle = np.deg2rad(rng.uniform(-params.rotation_range, params.rotation_range))
    tx = rng.uniform(-params.width_shift, params.width_shift) * w
    ty = rng.uniform(-params.height_shift, params.height_shift) * h
    zx, zy = rng.uniform(1 - params.zoom, 1 + params.zoom, size=2)
    flip = bool(rng.uniform() < 0.5) and params.horizontal_flip
    low, high = params.brightness_range
    brightness = rng.uniform(low, high)
    # The robustness draws come after the reference's, so the reference's images for a seed never change.
    apply = rng.uniform(size=6) < 0.5
    sigma = rng.uniform(0.0, params.blur)
    shrink = rng.uniform(1.0 - params.downscale, 1.0)
    quality = int(rng.integers(params.jpeg_quality, 96)) if params.jpeg_quality else 95
    contrast = rng.uniform(1.0 - params.contrast, 1.0 + params.contrast)
    gamma = float(np.exp(rng.uniform(-params.gamma, params.gamma)))
    noise_sd = rng.uniform(0.0, params.noise)
    noise_seed = int(rng.integers(2**31 - 1))
    return _Draws(angle, tx, ty, zx, zy, flip, brightness, apply, sigma, shrink, quality, contrast, gamma,
                  noise_sd, noise_seed)


def _degrade(gray: np.ndarray, params: AugmentConfig, d: _Draws) -> np.ndarray:
    """JPEG re-compression, lost resolution and blur, as a different scanner or copy would have made the film."""
    h, w = gray.shape
    if params.jpeg_quality and d.apply[2]:
        gray = cv2.imdecode(cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, d.quality])[1],
                            cv2.IMREAD_GRAYSCALE)
    if params.downscale and d.apply[1] and d.shrink < 1.0:
        small = (max(8, round(w * d.shrink)), max(8, round(h * d.shrink)))
        gray = cv2.resize(cv2.resize(gray, small, interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_LINEAR)
    if params.blur and d.apply[0] and d.sigma > 0.05:
        gray = cv2.GaussianBlur(gray, (0, 0), d.sigma)
    return gray


def _warp(gray: np.ndarray, d: _Draws) -> np.ndarray:
    """Rotate, zoom, shift and flip: the map from output pixel to input pixel, as ImageDataGenerator's
    transform matrix, about the image centre (zoom > 1 shows more of the image, i.e. zooms out)."""
    h, w = gray.shape
    centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    cos, sin = np.cos(d.angle), np.sin(d.angle)
    linear = np.array([[cos, -sin], [sin, cos]]) @ np.diag([d.zx, d.zy])
    if d.flip:
        linear = linear @ np.diag([-1.0, 1.0])
    offset = centre - linear @ centre - np.array([d.tx, d.ty])
    matrix = np.hstack([linear, offset[:, None]]).astype(np.float64)
    return cv2.warpAffine(gray, matrix, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)  # ImageDataGenerator's default fill_mode "nearest"


def _tone(out: np.ndarray, params: AugmentConfig, d: _Draws) -> np.ndarray:
    """Brightness, gamma, contrast and noise, through lookup tables (exact, and faster than float arithmetic)."""
    if d.brightness != 1.0:
        lut = np.clip(np.arange(256, dtype=np.float64) * d.brightness + 0.5, 0, 255).astype(np.uint8)
        out = cv2.LUT(out, lut)
    if (params.gamma and d.apply[4]) or (params.contrast and d.apply[3]):
        levels = np.arange(256, dtype=np.float64)
        if params.gamma and d.apply[4]:
            levels = 255.0 * (levels / 255.0) ** d.gamma
        if params.contrast and d.apply[3]:
            mean = float(out.mean())
            levels = (levels - mean) * d.contrast + mean
        out = cv2.LUT(out, np.clip(levels + 0.5, 0, 255).astype(np.uint8))
    if params.noise and d.apply[5] and d.noise_sd > 0:
        noisy = out + np.random.default_rng(d.noise_seed).normal(0.0, d.noise_sd, out.shape)
        out = np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
    return out


def augment_image(gray: np.ndarray, params: AugmentConfig, seed: int) -> np.ndarray:
    """Return a randomly transformed copy of ``gray``; the same ``seed`` gives the same image.

    Args:
        gray: 2-D uint8 image.
        params: augmentation ranges (ImageDataGenerator's meaning, see ``AugmentConfig``).
        seed: any non-negative int; all random draws come from ``np.random.default_rng(seed)``.

    Returns:
        A 2-D uint8 array of the same shape.
    """
    if gray.ndim != 2:
        raise ValueError(f"augment_image expects a 2-D grayscale image; got shape {gray.shape}.")
    if gray.dtype != np.uint8:
        gray = np.clip(gray, 0, 255).astype(np.uint8)
    draws = _draw(params, seed, *gray.shape)
    # Degradations first, as a different scanner or copy of the data would have made the film.
    return _tone(_warp(_degrade(gray, params, draws), draws), params, draws)


def augment_variants(gray: np.ndarray, params: AugmentConfig, seed: int, n: int) -> list[np.ndarray]:
    """Return ``n`` augmented copies; variant ``i`` is ``augment_image(gray, params, seed + i)``."""
    return [augment_image(gray, params, seed + i) for i in range(n)]


#: Options added after the first cache keys were made: left out of a key while off, so features
#: cached by earlier versions stay valid.
_LATER_OPTIONS = {"blur": 0.0, "downscale": 0.0, "jpeg_quality": 0, "contrast": 0.0, "gamma": 0.0, "noise": 0.0}


def params_key(params: AugmentConfig) -> str:
    """A stable text form of ``params`` (for cache keys)."""
    values = {k: v for k, v in asdict(params).items() if not (k in _LATER_OPTIONS and v == _LATER_OPTIONS[k])}
    return json.dumps(values, sort_keys=True)


@dataclass
class BalancePlan:
    """How the training part is balanced.

    Attributes:
        strategy: ``augment``, ``class_weight`` or ``none``.
        n_normal: NORMAL images in the training part.
        n_pneumonia: PNEUMONIA images in the training part (all the pneumonia classes together).
        n_extra: augmented images to add (``augment`` only, else 0).
        class_weight: ``{class index: weight}`` for Keras ``fit`` (``class_weight`` only, else ``None``).
        counts: training images per class name, in the task's order.
        extra: augmented images to add per class name (each smaller class up to the largest).
    """

    strategy: str
    n_normal: int
    n_pneumonia: int
    n_extra: int
    class_weight: dict[int, float] | None
    counts: dict[str, int] = field(default_factory=dict)
    extra: dict[str, int] = field(default_factory=dict)


def _label_name(label, classes: tuple[str, ...] = CLASSES) -> str:
    # Labels arrive as names ("NORMAL") or as y values (class indices).
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= int(label) < len(classes):
        return classes[int(label)]
    return str(label)


def balance_plan(train_labels: Sequence[str], strategy: str, classes: tuple[str, ...] = CLASSES) -> BalancePlan:
    """Count the training classes and plan the balancing.

    ``augment`` adds ``n_pneumonia - n_normal`` augmented NORMAL images (the reference: 2,152 on the
    full Kermany set with its split), or with more than two ``classes`` augmented images of every
    smaller class up to the largest; ``class_weight`` uses sklearn's ``balanced`` weights.
    """
    if strategy not in BALANCE_STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(BALANCE_STRATEGIES)}; got {strategy!r}.")
    if tuple(classes) != CLASSES:
        return _balance_classes([_label_name(label, classes) for label in train_labels], strategy, tuple(classes))
    names = [_label_name(label) for label in train_labels]
    unknown = sorted(set(names) - set(CLASSES))
    if unknown:
        raise ValueError(f"labels must be NORMAL or PNEUMONIA; got {unknown[:3]}.")
    n_normal = names.count("NORMAL")
    n_pneumonia = names.count("PNEUMONIA")
    n_extra = 0
    class_weight = None
    if strategy == "augment":
        if n_normal == 0 and n_pneumonia > 0:
            raise BadDatasetError(
                "The training part has no NORMAL images to augment; add NORMAL images or choose another balance."
            )
        n_extra = max(0, n_pneumonia - n_normal)
    elif strategy == "class_weight":
        if n_normal == 0 or n_pneumonia == 0:
            raise BadDatasetError("Class weights need both NORMAL and PNEUMONIA images in the training part.")
        from sklearn.utils.class_weight import compute_class_weight  # noqa: PLC0415 - scikit-learn only for this balance

        y = np.array([CLASSES.index(name) for name in names])
        weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=y)
        class_weight = {0: float(weights[0]), 1: float(weights[1])}
    log.debug("balance plan %s: normal=%d pneumonia=%d extra=%d", strategy, n_normal, n_pneumonia, n_extra)
    return BalancePlan(strategy, n_normal, n_pneumonia, n_extra, class_weight,
                       counts={"NORMAL": n_normal, "PNEUMONIA": n_pneumonia},
                       extra={"NORMAL": n_extra} if n_extra else {})


def _balance_classes(names: list[str], strategy: str, classes: tuple[str, ...]) -> BalancePlan:
    """``balance_plan`` for more than two classes (``classes[0]`` is NORMAL, the others pneumonia)."""
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"labels must be one of {', '.join(classes)}; got {unknown[:3]}.")
    counts = {name: names.count(name) for name in classes}
    missing = [name for name, n in counts.items() if n == 0]
    extra: dict[str, int] = {}
    class_weight = None
    if strategy != "none" and missing and names:
        what = "augment" if strategy == "augment" else "weigh"
        raise BadDatasetError(
            f"The training part has no {' or '.join(missing)} images to {what}; add such images or choose another "
            "balance.")
    if strategy == "augment":
        largest = max(counts.values(), default=0)
        extra = {name: largest - n for name, n in counts.items() if largest - n > 0}
    elif strategy == "class_weight":
        from sklearn.utils.class_weight import compute_class_weight  # noqa: PLC0415 - scikit-learn only for this balance

        y = np.array([classes.index(name) for name in names])
        weights = compute_class_weight("balanced", classes=np.arange(len(classes)), y=y)
        class_weight = {index: float(w) for index, w in enumerate(weights)}
    n_normal = counts[classes[0]]
    log.debug("balance plan %s: counts=%s extra=%s", strategy, counts, extra)
    return BalancePlan(strategy, n_normal, len(names) - n_normal, sum(extra.values()), class_weight,
                       counts=counts, extra=extra)


def augmented_rows(train_split: pd.DataFrame, n_extra: int, seed: int,
                   per_class: dict[str, int] | None = None) -> pd.DataFrame:
    """Return ``n_extra`` augmented NORMAL rows drawn from the training NORMAL images.

    Sources are taken in a seeded random order, cycling through all training NORMAL images so each
    is used about equally often. Each row copies its source's columns, has ``split`` "train",
    a unique ``augment_seed`` >= 0 and ``is_augmented`` True. Only the new rows are returned; use
    ``with_augmented_rows`` for the split plus these rows (originals with ``augment_seed`` -1).

    Args:
        train_split: the training rows, or a whole split (rows whose ``split`` is not "train" are
            ignored); needs a ``label`` column (or ``y``).
        n_extra: how many rows to make (0 gives an empty frame with the right columns).
        seed: seed of the choice of sources and of the augmentation seeds.
        per_class: rows to make per class name (``BalancePlan.extra``) instead of NORMAL only; their
            sum must be ``n_extra``. Needs a ``label`` column.
    """
    if n_extra < 0:
        raise ValueError(f"n_extra cannot be negative; got {n_extra}.")
    if per_class and set(per_class) != {"NORMAL"}:
        return _augmented_rows_per_class(train_split, n_extra, seed, per_class)
    train = train_split
    if "split" in train.columns:
        train = train[train["split"] == "train"]
    if "label" in train.columns:
        normal = train[train["label"].astype(str) == "NORMAL"]
    elif "y" in train.columns:
        normal = train[train["y"] == 0]
    else:
        raise ValueError("train_split needs a label or y column.")
    columns = [c for c in train_split.columns if c not in ("augment_seed", "is_augmented")]
    if n_extra == 0:
        empty = train_split.iloc[0:0][columns].copy()
        empty["augment_seed"] = pd.Series(dtype="int64")
        empty["is_augmented"] = pd.Series(dtype=bool)
        return empty.reset_index(drop=True)
    if normal.empty:
        raise BadDatasetError(
            "The training part has no NORMAL images to augment; add NORMAL images or choose another balance."
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(normal))
    sources = order[np.arange(n_extra) % len(normal)]
    # Unique seeds drawn from the run's seed: another run seed gives other augmentations, the same
    # seed gives the same ones (and so hits the feature cache).
    seeds = rng.choice(2**31 - 1, size=n_extra, replace=False).astype(np.int64)
    rows = normal.iloc[sources][columns].copy().reset_index(drop=True)
    rows["split"] = "train"
    rows["augment_seed"] = seeds
    rows["is_augmented"] = True
    return rows


def _augmented_rows_per_class(train_split: pd.DataFrame, n_extra: int, seed: int,
                              per_class: dict[str, int]) -> pd.DataFrame:
    """``augmented_rows`` for several classes: sources cycle through each class's training images."""
    if sum(per_class.values()) != n_extra:
        raise ValueError(f"per_class adds up to {sum(per_class.values())}, not n_extra={n_extra}.")
    train = train_split[train_split["split"] == "train"] if "split" in train_split.columns else train_split
    columns = [c for c in train_split.columns if c not in ("augment_seed", "is_augmented")]
    rng = np.random.default_rng(seed)
    parts = []
    for name, n in per_class.items():
        if n <= 0:
            continue
        members = train[train["label"].astype(str) == name]
        if members.empty:
            raise BadDatasetError(
                f"The training part has no {name} images to augment; add {name} images or choose another balance.")
        order = rng.permutation(len(members))
        parts.append(members.iloc[order[np.arange(n) % len(members)]][columns])
    # One draw of unique seeds for all the rows (as for NORMAL only): a seed is never used twice.
    seeds = rng.choice(2**31 - 1, size=n_extra, replace=False).astype(np.int64)
    rows = (pd.concat(parts, ignore_index=True) if parts else train_split.iloc[0:0][columns].copy())
    rows = rows.reset_index(drop=True)
    rows["split"] = "train"
    rows["augment_seed"] = seeds
    rows["is_augmented"] = True
    return rows


def with_augmented_rows(split: pd.DataFrame, n_extra: int, seed: int,
                        per_class: dict[str, int] | None = None) -> pd.DataFrame:
    """The split with ``augment_seed`` -1 / ``is_augmented`` False on its rows plus ``augmented_rows``."""
    base = split.copy()
    base["augment_seed"] = np.int64(-1)
    base["is_augmented"] = False
    extra = augmented_rows(split, n_extra, seed, per_class)
    if extra.empty:
        return base.reset_index(drop=True)
    return pd.concat([base, extra], ignore_index=True)
