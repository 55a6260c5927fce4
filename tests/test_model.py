"""model: the backbone table, classifier assembly, saving/loading in safe mode, fine-tuning, Grad-CAM parts.

Models are built with weights="none" at small sizes so the file runs in seconds on two cores.
"""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from cxr_core.core.backbones import BACKBONES
from cxr_core.core.config import ModelConfig
from cxr_core.core.errors import BadRunError, BadSettingError
from cxr_core.engine.model import (
    Preprocess,
    build_backbone,
    build_classifier,
    build_feature_extractor,
    build_head,
    constructor,
    gradcam_parts,
    load_classifier,
    unfreeze_top_layers,
)
from cxr_core.io import atomic

SMALL = {"inception_v3": 75, "mobilenet_v2": 32, "efficientnet_b0": 32, "densenet121": 32}
FEATURE_DIM = {"inception_v3": 2048, "mobilenet_v2": 1280, "efficientnet_b0": 1280, "densenet121": 1024}


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def _assert_close(actual, expected, rel: float = 1e-4) -> None:
    # Relative to the size of the values: random-init features can be tiny (MobileNetV2: ~1e-11).
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    assert np.linalg.norm(expected) > 0
    assert np.linalg.norm(actual - expected) <= rel * np.linalg.norm(expected)


def _scaled_logit_weights(features: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    """Dense(1) weights that make logits of order one for these features (so comparisons mean something)."""
    dim = features.shape[-1]
    scale = float(np.abs(features).mean()) * np.sqrt(dim)
    kernel = np.random.default_rng(seed).normal(size=(dim, 1)) / scale
    return [kernel.astype(np.float32), np.zeros(1, np.float32)]


def _probe(classifier: keras.Model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features, logits) in one eager pass (tracing a big graph would cost seconds)."""
    probe = keras.Model(classifier.input, [classifier.get_layer("pool").output, classifier.output])
    pooled, logits = probe(x, training=False)
    return pooled.numpy(), logits.numpy()


def _small(name: str = "mobilenet_v2", **kw) -> ModelConfig:
    return ModelConfig(backbone=name, weights="none", image_size=SMALL[name], alpha=0.35, **kw)


def test_table_covers_the_four_backbones():
    assert set(BACKBONES) == set(SMALL)
    assert BACKBONES["inception_v3"].default_size == 299
    assert BACKBONES["mobilenet_v2"].supports_alpha and not BACKBONES["densenet121"].supports_alpha
    assert ModelConfig(backbone="inception_v3").resolved_image_size == 299
    assert ModelConfig(backbone="densenet121", image_size=96).resolved_image_size == 96
    # A bad choice is refused when the settings are made, as a one-sentence CxrError (also a ValueError).
    with pytest.raises(BadSettingError, match="at least 75"):
        ModelConfig(backbone="inception_v3", image_size=64)
    with pytest.raises(ValueError, match="unknown backbone"):
        ModelConfig(backbone="resnet50")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_backbone_builds_saves_and_loads_in_safe_mode(name: str, tmp_path: Path):
    cfg = _small(name)
    size = SMALL[name]
    classifier = build_classifier(cfg, seed=1)
    for layer in ("preprocess", "backbone", "pool", "dropout", "logit"):
        classifier.get_layer(layer)
    backbone = classifier.get_layer("backbone")
    # The table's last conv layer exists in the real model (Grad-CAM depends on it).
    assert backbone.get_layer(BACKBONES[name].last_conv_layer).output.shape[-1] == FEATURE_DIM[name]
    x = _images(2, size)
    pooled, _ = _probe(classifier, x)
    assert pooled.shape == (2, FEATURE_DIM[name])
    kernel, bias = _scaled_logit_weights(pooled)
    classifier.get_layer("logit").set_weights([kernel, bias])
    before = pooled @ kernel + bias  # what the model must now give (dropout is off at inference)
    assert np.isfinite(before).all() and np.abs(before).max() > 1e-3

    path = tmp_path / "run" / "model.keras"
    with atomic.atomic_path(path) as tmp:
        classifier.save(tmp)
    loaded = load_classifier(path.parent)  # a run folder is accepted too
    pooled_after, logits_after = _probe(loaded, x)
    assert logits_after.shape == (2, 1)
    _assert_close(pooled_after, pooled)
    _assert_close(logits_after, before)
    assert isinstance(loaded.get_layer("preprocess"), Preprocess)

    # Grad-CAM parts: the forward pass matches the model and gradients reach the conv maps.
    parts = gradcam_parts(loaded)
    assert parts.last_conv_layer == BACKBONES[name].last_conv_layer
    with tf.GradientTape() as tape:
        conv, logit = parts.forward(tf.constant(x))
    grads = tape.gradient(logit, conv)
    assert grads is not None and conv.shape[-1] == FEATURE_DIM[name]
    _assert_close(logit.numpy(), before)


def test_preprocess_modes():
    x = np.array([[[[0.0, 127.5, 255.0]]]], np.float32)
    np.testing.assert_allclose(Preprocess("tf")(x).numpy(), [[[[-1, 0, 1]]]], atol=1e-6)
    torch = Preprocess("torch")(x).numpy()[0, 0, 0]
    np.testing.assert_allclose(torch, [(0 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (1 - 0.406) / 0.225], atol=1e-5)
    np.testing.assert_allclose(Preprocess("none")(x).numpy(), x)
    with pytest.raises(ValueError):
        Preprocess("caffe")


@pytest.mark.slow  # builds or loads models: seconds
def test_random_init_is_repeatable_from_the_seed():
    a = build_backbone(_small(), seed=3).get_weights()
    b = build_backbone(_small(), seed=3).get_weights()
    c = build_backbone(_small(), seed=4).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_head_becomes_the_full_model():
    cfg = _small()
    backbone = build_backbone(cfg, seed=1)
    extractor = build_feature_extractor(cfg, backbone=backbone)
    assert extractor.output.shape[-1] == 1280
    head = build_head(1280, 0.5, seed=2)
    assert [layer.name for layer in head.layers[1:]] == ["dropout", "logit"]
    x = _images(3, 32)
    features = extractor(x, training=False).numpy()
    head.get_layer("logit").set_weights(_scaled_logit_weights(features))
    classifier = build_classifier(cfg, backbone=backbone, head=head)
    expected = head(features, training=False).numpy()
    assert np.abs(expected).max() > 1e-3
    _assert_close(classifier(x, training=False).numpy(), expected)
    with pytest.raises(ValueError, match="feature size"):
        build_classifier(cfg, backbone=backbone, head=build_head(64, 0.5))


def test_unfreeze_top_layers_keeps_batchnorm_frozen():
    classifier = build_classifier(_small(), seed=1)
    backbone = classifier.get_layer("backbone")
    head_weights = len(classifier.get_layer("logit").trainable_weights)
    assert len(classifier.trainable_weights) == head_weights  # frozen base after building

    unfreeze_top_layers(classifier, 10)
    top = backbone.layers[-10:]
    for layer in backbone.layers:
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        assert layer.trainable == (layer in top and not is_bn), layer.name
    assert len(classifier.trainable_weights) > head_weights

    unfreeze_top_layers(classifier, -1)
    for layer in backbone.layers:
        assert layer.trainable == (not isinstance(layer, keras.layers.BatchNormalization))
    assert not any("batch" in w.path and ("gamma" in w.path or "beta" in w.path)
                   for w in classifier.trainable_weights if "bn" in w.path)

    unfreeze_top_layers(classifier, 0)
    assert len(classifier.trainable_weights) == head_weights
    with pytest.raises(ValueError):
        unfreeze_top_layers(classifier, -2)


def test_load_classifier_refuses_missing_and_damaged_files(tmp_path: Path):
    with pytest.raises(BadRunError, match="no model.keras"):
        load_classifier(tmp_path)
    bad = tmp_path / "model.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(BadRunError, match="not a model this version can load"):
        load_classifier(bad)


def test_weights_file_errors(tmp_path: Path):
    with pytest.raises(BadRunError, match="does not exist"):
        build_backbone(ModelConfig(backbone="mobilenet_v2", weights=str(tmp_path / "nope.weights.h5"), image_size=32))
    junk = tmp_path / "junk.weights.h5"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(BadRunError, match="does not fit"):
        build_backbone(ModelConfig(backbone="mobilenet_v2", weights=str(junk), image_size=32))


@pytest.mark.slow
def test_shared_mobilenet_weights_load_at_96(shared_mobilenet_weights: Path):
    cfg = ModelConfig(backbone="mobilenet_v2", weights=str(shared_mobilenet_weights), image_size=96, alpha=0.35)
    ours = build_backbone(cfg)
    reference = keras.applications.MobileNetV2(alpha=0.35, include_top=False, weights=None, input_shape=(96, 96, 3))
    reference.load_weights(str(shared_mobilenet_weights))
    assert ours.name == "backbone"
    assert all(np.array_equal(a, b) for a, b in zip(ours.get_weights(), reference.get_weights()))
    # Really loaded: a fresh BatchNormalization has moving variance 1 everywhere.
    assert not np.allclose(ours.get_layer("bn_Conv1").moving_variance.numpy(), 1.0)


def test_every_row_names_a_keras_constructor_and_its_weights_file():
    for spec in BACKBONES.values():
        assert constructor(spec) is getattr(keras.applications, spec.keras_name)
        assert spec.imagenet_filename(alpha=0.35, size=224).endswith(".h5")
    # The file Keras caches for MobileNetV2 names its width and input size.
    assert BACKBONES["mobilenet_v2"].imagenet_filename(alpha=0.35, size=160) == (
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_160_no_top.h5")
    assert BACKBONES["mobilenet_v2"].imagenet_filename(alpha=1.0, size=299) == (
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")


def test_the_table_is_read_without_importing_tensorflow():
    import subprocess
    import sys

    code = ("import sys; import cxr_core.core.backbones, cxr_core.core.config; "
            "print('tensorflow' in sys.modules or 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
