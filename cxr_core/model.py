"""Networks: the BACKBONES table, feature extractor, head, full classifier, fine-tuning, loading.

Every model takes float32 images in 0..255, shape ``(size, size, 3)``; the backbone's own
``preprocess_input`` runs inside the model as a registered ``Preprocess`` layer (not a ``Lambda``),
so saved models load with ``safe_mode=True``. The classifier is the reference head:

    Input -> Preprocess -> backbone(training=False) -> GlobalAveragePooling2D -> Dropout -> Dense(1) logit
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras

from .backbones import BACKBONES, PREPROCESS_MODES, BackboneSpec, get_backbone
from .config import ModelConfig
from .errors import BadRunError
from .run_folder import MODEL_FILE

log = logging.getLogger(__name__)

# ImageNet statistics used by the "torch" preprocessing mode (DenseNet).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def constructor(spec: BackboneSpec) -> Callable[..., keras.Model]:
    """The ``keras.applications`` function that builds the table row ``spec``."""
    return getattr(keras.applications, spec.keras_name)


@keras.saving.register_keras_serializable(package="cxr_core")
class Preprocess(keras.layers.Layer):
    """A backbone's ``preprocess_input`` as a serialisable layer (input float 0..255)."""

    def __init__(self, mode: str = "tf", **kwargs) -> None:
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"preprocess mode must be one of {', '.join(PREPROCESS_MODES)}; got {mode!r}.")
        self.mode = mode

    def call(self, inputs):
        x = keras.ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = keras.ops.convert_to_tensor(_IMAGENET_MEAN, dtype=x.dtype)
            std = keras.ops.convert_to_tensor(_IMAGENET_STD, dtype=x.dtype)
            return (x / 255.0 - mean) / std
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config["mode"] = self.mode
        return config


def build_backbone(cfg: ModelConfig, seed: int = 123) -> keras.Model:
    """The convolutional base without its top, named ``backbone``.

    ``cfg.weights``: ``imagenet`` (Keras downloads and caches the file; needs the internet once),
    ``none`` (random initialisation) or the path of a weights file for this architecture.

    Keras applications take no initializer seeds, so this calls ``keras.utils.set_random_seed(seed)``
    (global: Python, NumPy and TensorFlow) to make random initialisation repeatable.

    Raises:
        BadRunError: when a weights file is missing or does not fit the architecture.
    """
    backbone = get_backbone(cfg.backbone)
    size = cfg.resolved_image_size
    build = constructor(backbone)
    keras.utils.set_random_seed(seed)
    kwargs: dict = {"include_top": False, "input_shape": (size, size, 3), "name": "backbone"}
    if backbone.supports_alpha:
        kwargs["alpha"] = cfg.alpha
    weights = cfg.weights or "none"
    if weights.lower() == "imagenet":
        return build(weights="imagenet", **kwargs)
    base = build(weights=None, **kwargs)
    if weights.lower() == "none":
        return base
    path = Path(weights).expanduser()
    if not path.is_file():
        raise BadRunError(f"The weights file {path} does not exist; give an existing file, 'imagenet' or 'none'.")
    try:
        base.load_weights(str(path))
    except Exception as error:  # Keras raises many types (ValueError, OSError, KeyError) for a bad file.
        log.debug("loading weights %s failed", path, exc_info=True)
        raise BadRunError(
            f"The weights file {path.name} does not fit {backbone.label} with these settings ({type(error).__name__})."
        ) from error
    return base


def build_feature_extractor(cfg: ModelConfig, seed: int = 123, backbone: keras.Model | None = None) -> keras.Model:
    """Frozen image -> pooled features model: Input(0..255) -> Preprocess -> backbone -> pool."""
    spec = get_backbone(cfg.backbone)
    size = cfg.resolved_image_size
    base = backbone if backbone is not None else build_backbone(cfg, seed)
    base.trainable = False
    inputs = keras.Input((size, size, 3), dtype="float32", name="image")
    x = Preprocess(spec.preprocess_mode, name="preprocess")(inputs)
    x = base(x, training=False)
    outputs = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, outputs, name="feature_extractor")


def build_head(feature_dim: int, dropout: float, seed: int | None = None) -> keras.Model:
    """Pooled features -> logit: Dropout (layer ``dropout``) -> Dense(1) (layer ``logit``)."""
    inputs = keras.Input((int(feature_dim),), dtype="float32", name="features")
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(inputs)
    outputs = keras.layers.Dense(
        1, kernel_initializer=keras.initializers.GlorotUniform(seed=seed), name="logit"
    )(x)
    return keras.Model(inputs, outputs, name="head")


def build_classifier(
    cfg: ModelConfig,
    seed: int = 123,
    backbone: keras.Model | None = None,
    head: keras.Model | None = None,
    train_batchnorm: bool = False,
) -> keras.Model:
    """Image -> logit with layers ``preprocess``, ``backbone``, ``pool``, ``dropout``, ``logit``.

    ``train_batchnorm`` is for a backbone trained from scratch: its BatchNorm statistics are random
    and must be learnt, so the backbone is called in training mode during ``fit``.

    The backbone is frozen (use ``unfreeze_top_layers`` to fine-tune). When ``head`` is given, its
    dropout rate and Dense weights are copied, so a head trained on cached features becomes the
    full model.
    """
    spec = get_backbone(cfg.backbone)
    size = cfg.resolved_image_size
    base = backbone if backbone is not None else build_backbone(cfg, seed)
    base.trainable = False
    rate = float(head.get_layer("dropout").rate) if head is not None else cfg.dropout
    inputs = keras.Input((size, size, 3), dtype="float32", name="image")
    x = Preprocess(spec.preprocess_mode, name="preprocess")(inputs)
    # training=False keeps BatchNorm in inference mode even after unfreezing (Keras fine-tuning guide).
    x = base(x) if train_batchnorm else base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(rate, seed=seed, name="dropout")(x)
    logit_layer = keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed=seed), name="logit")
    outputs = logit_layer(x)
    model = keras.Model(inputs, outputs, name="classifier")
    if head is not None:
        source = head.get_layer("logit").get_weights()
        if [w.shape for w in source] != [w.shape for w in logit_layer.get_weights()]:
            raise ValueError(
                "the head's feature size does not match this backbone's; train the head on this backbone's features."
            )
        logit_layer.set_weights(source)
    return model


def unfreeze_top_layers(classifier: keras.Model, n: int, include_batchnorm: bool = False) -> None:
    """Make the top ``n`` layers of the classifier's backbone trainable (-1 = all, 0 = none).

    BatchNormalization layers stay frozen, as the Keras fine-tuning guide advises (their statistics
    would be spoilt by small batches), unless ``include_batchnorm`` (training from scratch). Recompile the
    classifier afterwards for the change to apply.
    """
    if n < -1:
        raise ValueError(f"n must be -1 (all), 0 or a positive number of layers; got {n}.")
    base = classifier.get_layer("backbone")
    if n == 0:
        base.trainable = False
        return
    base.trainable = True  # sets every sub-layer trainable; the loop below freezes the rest
    layers = base.layers
    first = 0 if n == -1 else max(0, len(layers) - n)
    for i, layer in enumerate(layers):
        frozen = i < first or (isinstance(layer, keras.layers.BatchNormalization) and not include_batchnorm)
        layer.trainable = not frozen
    log.info("unfroze %d of %d backbone layers", sum(layer.trainable for layer in layers), len(layers))


def load_classifier(path: str | Path) -> keras.Model:
    """Load a saved classifier (``model.keras`` or a folder holding one) with ``safe_mode=True``.

    Raises:
        BadRunError: when the file is missing or not a model this version can load.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise BadRunError(f"There is no {MODEL_FILE} in {path.parent}; the run did not finish or was damaged.")
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as error:  # zip, h5, JSON and deserialisation errors all mean the same to a person
        log.debug("loading %s failed", path, exc_info=True)
        raise BadRunError(f"{path.name} in {path.parent} is not a model this version can load.") from error


@dataclass
class GradcamParts:
    """What Grad-CAM needs from a classifier whose backbone is a nested model.

    Attributes:
        conv_model: backbone input -> [last conv output, backbone output], built inside the backbone
            (a model from the outer input to an inner layer fails with "Graph disconnected").
        preprocess: the classifier's ``Preprocess`` layer.
        pool: the ``GlobalAveragePooling2D`` layer.
        logit: the final ``Dense`` layer (dropout is skipped: it does nothing at inference).
        last_conv_layer: the name used.
    """

    conv_model: keras.Model
    preprocess: keras.layers.Layer
    pool: keras.layers.Layer
    logit: keras.layers.Layer
    last_conv_layer: str

    def forward(self, images):
        """Return ``(conv_output, logit)`` for a batch of 0..255 images; call under a GradientTape."""
        x = self.preprocess(images)
        conv, features = self.conv_model(x, training=False)
        return conv, self.logit(self.pool(features))


def gradcam_parts(classifier: keras.Model, last_conv_layer: str | None = None) -> GradcamParts:
    """Split ``classifier`` into the pieces a Grad-CAM forward pass under a GradientTape needs.

    ``last_conv_layer`` defaults to the table's layer for the backbone found inside the classifier
    (or the backbone's last layer when none matches).
    """
    base = classifier.get_layer("backbone")
    names = {layer.name for layer in base.layers}
    if last_conv_layer is None:
        matches = [b.last_conv_layer for b in BACKBONES.values() if b.last_conv_layer in names]
        last_conv_layer = matches[0] if matches else base.layers[-1].name
    conv_model = keras.Model(base.input, [base.get_layer(last_conv_layer).output, base.output], name="gradcam_conv")
    return GradcamParts(
        conv_model=conv_model,
        preprocess=classifier.get_layer("preprocess"),
        pool=classifier.get_layer("pool"),
        logit=classifier.get_layer("logit"),
        last_conv_layer=last_conv_layer,
    )
