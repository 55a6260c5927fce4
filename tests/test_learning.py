"""A short training on separable synthetic images actually learns (offline, no pretrained weights)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import TINY_MODEL
from cxr_core.core.config import DataConfig, RunConfig, TrainConfig


def _separable_dataset(root: Path, n_per_class: int = 100, size: int = 48, seed: int = 5) -> Path:
    """NORMAL: dark noise. PNEUMONIA: the same noise with one large bright disc somewhere in the middle."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True)
        for i in range(n_per_class):
            img = rng.normal(60, 3, (size, size))
            if label == "PNEUMONIA":
                cx, cy = rng.uniform(0.35, 0.65, 2) * size
                img[(xx - cx) ** 2 + (yy - cy) ** 2 < (0.3 * size) ** 2] = 220
            # One image per patient: the split is by image, like the reference's random split.
            name = f"IM-{i:04d}-0001.jpeg" if label == "NORMAL" else f"person{i}_bacteria_{i}.jpeg"
            cv2.imwrite(str(root / label / name), np.clip(img, 0, 255).astype(np.uint8))
    return root


def _calibrated_random_weights(path: Path, images: list[np.ndarray]) -> Path:
    """Random MobileNetV2 weights whose batch-norm statistics are measured on ``images``.

    At random initialisation the batch-norm layers hold mean 0 and variance 1, and the pooled
    features of a frozen backbone shrink to about 1e-12: nothing a head can learn from. One pass in
    training mode with momentum 0 sets every layer's statistics to those of these (unlabelled)
    images, the way batch-norm statistics are re-estimated after a change of data.
    """
    import keras

    from cxr_core.core.backbones import get_backbone
    from cxr_core.engine.model import Preprocess, build_backbone
    from cxr_core.io.images import to_model_input

    base = build_backbone(TINY_MODEL, seed=1)
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    preprocess = Preprocess(get_backbone(TINY_MODEL.backbone).preprocess_mode)
    batch = preprocess(np.stack([to_model_input(g, TINY_MODEL.image_size) for g in images]))
    base(batch, training=True)
    base.save_weights(str(path))
    return path


@pytest.mark.slow
def test_a_short_training_separates_separable_images(tmp_path):
    from cxr_core.engine.train import train

    data = _separable_dataset(tmp_path / "data")
    unlabelled = _separable_dataset(tmp_path / "calibration", n_per_class=32, seed=99)
    weights = _calibrated_random_weights(tmp_path / "calibrated.weights.h5",
                                         [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in unlabelled.rglob("*.jpeg")])
    config = RunConfig(
        data=DataConfig(data_dir=str(data), split="random"),
        model=dataclasses.replace(TINY_MODEL, weights=str(weights)),
        # Head only, on cached features of the frozen backbone: a few seconds.
        train=TrainConfig(epochs=40, batch_size=16, learning_rate=1e-2, balance="none", export_litert=False,
                          cache_dir=str(tmp_path / "cache")),
    )
    run = train(config, run_dir=tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["test"]["at_threshold"]
    # Chance is 0.5; these images are easy.
    assert test["n"] == 20  # 10 % of 200 images, stratified: 10 of each class
    assert test["roc_auc"] >= 0.9, metrics["test"]
    assert test["accuracy"] >= 0.75, metrics["test"]
