"""Networks: the BACKBONES table, feature extractor, head, full classifier, fine-tuning, loading.

Every model takes float32 images in 0..255, shape ``(size, size, 3)``; the backbone's own
``preprocess_input`` runs inside the model as a registered ``Preprocess`` layer (not a ``Lambda``),
so saved models load with ``safe_mode=True``. The classifier is the reference head:

    Input -> Preprocess -> backbone(training=False) -> GlobalAveragePooling2D -> Dropout -> Dense(1) logit

An ensemble (``build_ensemble``) is a classifier too: the image goes to each member classifier
(nested models ``member_0``, ``member_1``, ...) and a registered ``MeanProbabilityLogit`` layer
(``ensemble``) turns their logits into the logit of the mean of their probabilities.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras

from cxr_core.core.backbones import BACKBONES, PREPROCESS_MODES, BackboneSpec, get_backbone
from cxr_core.core.config import ModelConfig
from cxr_core.core.errors import BadRunError, BadSettingError
from cxr_core.core.tasks import get_task
from cxr_core.io import weights as weights_lib
from cxr_core.runs.run_folder import MODEL_FILE

log = logging.getLogger(__name__)

#: The name of an ensemble's i-th member model is MEMBER_PREFIX + str(i).
MEMBER_PREFIX = "member_"
#: An ensemble's logit is kept within +-ENSEMBLE_LOGIT_LIMIT so that it is always finite
#: (sigmoid(60) is 1 - 9e-27: no probability a float32 holds is lost).
ENSEMBLE_LOGIT_LIMIT = 60.0

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


@keras.saving.register_keras_serializable(package="cxr_core")
class MeanProbabilityLogit(keras.layers.Layer):
    """Several logits ``(n, 1)`` -> the logit ``(n, 1)`` of the mean of their sigmoids (an ensemble).

    With ``s_i = sigmoid(l_i)`` and ``p = mean_i s_i`` the output is ``log(p / (1 - p))``, computed in
    log space (``log p = logsumexp_i(-softplus(-l_i)) - log N``) so that it stays exact for confident
    members, and clipped to ``+-ENSEMBLE_LOGIT_LIMIT`` so that it is always finite.
    """

    def call(self, inputs):
        raw = self._parts(inputs)[2]
        return keras.ops.clip(raw, -ENSEMBLE_LOGIT_LIMIT, ENSEMBLE_LOGIT_LIMIT)

    def _parts(self, inputs):
        logits = keras.ops.concatenate([keras.ops.cast(x, self.compute_dtype) for x in inputs], axis=-1)
        log_n = keras.ops.log(keras.ops.cast(len(inputs), logits.dtype))
        log_p = keras.ops.logsumexp(-keras.ops.softplus(-logits), axis=-1, keepdims=True) - log_n
        log_q = keras.ops.logsumexp(-keras.ops.softplus(logits), axis=-1, keepdims=True) - log_n
        return log_p, log_q, log_p - log_q

    def gradient_weights(self, inputs):
        """``d ensemble logit / d l_i`` for the members' logits ``inputs`` (a list of ``(n, 1)``): ``(n, N)``.

        It is ``sigmoid'(l_i) / (N p (1 - p))``, positive, computed in log space; zero where the
        output is clipped (as the clipped output's gradient is).
        """
        logits = keras.ops.concatenate([keras.ops.cast(x, self.compute_dtype) for x in inputs], axis=-1)
        log_p, log_q, raw = self._parts(inputs)
        log_n = keras.ops.log(keras.ops.cast(len(inputs), logits.dtype))
        log_slope = -keras.ops.softplus(-logits) - keras.ops.softplus(logits)  # log s (1 - s)
        inside = keras.ops.cast(keras.ops.abs(raw) <= ENSEMBLE_LOGIT_LIMIT, logits.dtype)
        return keras.ops.exp(log_slope - log_n - log_p - log_q) * inside

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], 1)


#: Weights files this process has read, as arrays, by (backbone, width, size, file, its size and mtime): the same
#: file is read once per process (a resident worker trains many runs from one ImageNet file). A few at most.
_LOADED_WEIGHTS: dict[tuple, list] = {}
_LOADED_WEIGHTS_MAX = 3


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
        try:
            return build(weights="imagenet", **kwargs)
        except Exception as error:  # Keras raises a bare Exception("URL fetch failure on ...") offline
            if "fetch failure" not in str(error) and not isinstance(error, OSError):
                raise
            log.debug("downloading ImageNet weights failed", exc_info=True)
            raise BadSettingError(f"The ImageNet weights for {backbone.label} could not be downloaded; "
                                  f"{weights_lib.imagenet_help(cfg.backbone, cfg.alpha, size)}.") from error
    base = build(weights=None, **kwargs)
    if weights.lower() == "none":
        return base
    path = Path(weights).expanduser()
    if not path.is_file():
        raise BadRunError(f"The weights file {path} does not exist; give an existing file, 'imagenet' or 'none'.")
    stat = path.stat()
    key = (cfg.backbone, cfg.alpha, size, str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _LOADED_WEIGHTS:  # a long-lived process (a resident training worker) read this file already
        base.set_weights(_LOADED_WEIGHTS[key])
        return base
    try:
        base.load_weights(str(path))
    except Exception as error:  # Keras raises many types (ValueError, OSError, KeyError) for a bad file.
        log.debug("loading weights %s failed", path, exc_info=True)
        raise BadRunError(
            f"The weights file {path.name} does not fit {backbone.label} with these settings ({type(error).__name__})."
        ) from error
    while len(_LOADED_WEIGHTS) >= _LOADED_WEIGHTS_MAX:
        _LOADED_WEIGHTS.pop(next(iter(_LOADED_WEIGHTS)))
    _LOADED_WEIGHTS[key] = base.get_weights()
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


def n_outputs_for(task: str) -> int:
    """The number of logits of a task's head (``Task.n_outputs``)."""
    return get_task(task).n_outputs


def build_head(feature_dim: int, dropout: float, seed: int | None = None, n_outputs: int = 1) -> keras.Model:
    """Pooled features -> logits: Dropout (layer ``dropout``) -> Dense(n_outputs) (layer ``logit``).

    ``n_outputs`` is 1 for the binary task (sigmoid of the logit = P(PNEUMONIA)) and the number of
    classes for a softmax head (``n_outputs_for``).
    """
    inputs = keras.Input((int(feature_dim),), dtype="float32", name="features")
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(inputs)
    # float32 logits even under a mixed precision policy: float16 would round the loss and the threshold.
    outputs = keras.layers.Dense(
        int(n_outputs), kernel_initializer=keras.initializers.GlorotUniform(seed=seed), name="logit",
        dtype="float32",
    )(x)
    return keras.Model(inputs, outputs, name="head")


def build_classifier(
    cfg: ModelConfig,
    seed: int = 123,
    backbone: keras.Model | None = None,
    head: keras.Model | None = None,
    train_batchnorm: bool = False,
    n_outputs: int = 1,
) -> keras.Model:
    """Image -> logits with layers ``preprocess``, ``backbone``, ``pool``, ``dropout``, ``logit``.

    ``n_outputs`` is the width of the ``logit`` layer (1: binary sigmoid; 3: softmax over the subtypes).

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
    logit_layer = keras.layers.Dense(
        int(n_outputs), kernel_initializer=keras.initializers.GlorotUniform(seed=seed), name="logit",
        dtype="float32",
    )
    outputs = logit_layer(x)
    model = keras.Model(inputs, outputs, name="classifier")
    if head is not None:
        source = head.get_layer("logit").get_weights()
        if [w.shape for w in source] != [w.shape for w in logit_layer.get_weights()]:
            raise ValueError(
                "the head's feature size or number of outputs does not match this classifier's; "
                "train the head on this backbone's features for the same task."
            )
        logit_layer.set_weights(source)
    return model


def build_ensemble(members: list[keras.Model]) -> keras.Model:
    """One classifier whose logit is the logit of the mean of the members' probabilities.

    Image (0..255) -> each member (renamed ``member_0``, ``member_1``, ..., frozen, called with
    ``training=False``) -> ``MeanProbabilityLogit`` (layer ``ensemble``) -> logit. Saves and loads
    with ``safe_mode=True`` like any classifier here.

    Raises:
        ValueError: with fewer than two members or when their input shapes differ (checked by the caller
            with a sentence for a person; this is the programming-error guard).
    """
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least two members; got {len(members)}.")
    shapes = {tuple(m.input_shape[1:]) for m in members}
    if len(shapes) != 1:
        raise ValueError(f"the members take different input shapes: {sorted(shapes)}.")
    inputs = keras.Input(shapes.pop(), dtype="float32", name="image")
    logits = []
    for i, member in enumerate(members):
        member.name = f"{MEMBER_PREFIX}{i}"
        member.trainable = False
        logits.append(member(inputs, training=False))
    outputs = MeanProbabilityLogit(name="ensemble")(logits)
    return keras.Model(inputs, outputs, name="ensemble")


def ensemble_members(classifier: keras.Model) -> list[keras.Model]:
    """The member classifiers of an ensemble built by ``build_ensemble``, in order; [] for a single classifier."""
    if not any(isinstance(layer, MeanProbabilityLogit) for layer in classifier.layers):
        return []
    found = {}
    for layer in classifier.layers:
        suffix = layer.name[len(MEMBER_PREFIX):]
        if isinstance(layer, keras.Model) and layer.name.startswith(MEMBER_PREFIX) and suffix.isdigit():
            found[int(suffix)] = layer
    return [found[i] for i in sorted(found)]


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

    @property
    def map_grid(self) -> tuple[int, int]:
        """(rows, columns) of the last conv layer's maps: the cells of a class-activation map."""
        shape = self.conv_model.outputs[0].shape
        return int(shape[1]), int(shape[2])

    def forward(self, images):
        """Return ``(conv_output, logit)`` for a batch of 0..255 images; call under a GradientTape."""
        x = self.preprocess(images)
        conv, features = self.conv_model(x, training=False)
        return conv, self.logit(self.pool(features))


@dataclass
class EnsembleGradcamParts:
    """What Grad-CAM needs from an ensemble (``build_ensemble``): each member's parts and the combiner.

    The ensemble's map is the sum over members of ``g_i * ReLU(sum_k w_ik A_ik)`` (for NORMAL, of
    ``g_i * ReLU(-sum_k w_ik A_ik)``: where each member's logit was lowered), each resized
    (bilinear) to the largest member grid, where ``w_i`` is member i's final Dense kernel, ``A_i``
    its last conv maps and ``g_i = d ensemble logit / d l_i = sigmoid'(l_i) / (N p (1 - p))``
    (``MeanProbabilityLogit.gradient_weights``). That is Grad-CAM of the ensemble logit, each member's
    spatial-mean gradient taken per unit of image area (times its grid's cell count) so that members
    with coarser grids are not favoured.

    Attributes:
        members: each member's ``GradcamParts``.
        combine: the ensemble's ``MeanProbabilityLogit`` layer.
        last_conv_layer: the members' layer names, comma-separated (one name when they agree).
    """

    members: list[GradcamParts]
    combine: MeanProbabilityLogit
    last_conv_layer: str

    def forward(self, images):
        """Return ``(convs, member_logits, logit)`` for a batch; call under a GradientTape for gradients.

        ``convs``: each member's last conv output; ``member_logits``: each member's ``(n, 1)`` logit;
        ``logit``: the ensemble's ``(n, 1)`` logit.
        """
        convs, logits = [], []
        for part in self.members:
            conv, logit = part.forward(images)
            convs.append(conv)
            logits.append(logit)
        return convs, logits, self.combine(logits)

    @property
    def map_grid(self) -> tuple[int, int]:
        """The largest member grid, where ``combine_maps`` sums the members' maps."""
        grids = [part.map_grid for part in self.members]
        return max(rows for rows, _ in grids), max(cols for _, cols in grids)

    def combine_maps(self, maps: list):
        """Sum member maps ``(n, h_i, w_i)`` (already weighted) after resizing each to the largest grid."""
        height = max(int(m.shape[1]) for m in maps)
        width = max(int(m.shape[2]) for m in maps)
        total = None
        for cam in maps:
            if (int(cam.shape[1]), int(cam.shape[2])) != (height, width):
                cam = keras.ops.image.resize(cam[..., None], (height, width), interpolation="bilinear")[..., 0]
            total = cam if total is None else total + cam
        return total


def gradcam_parts(
    classifier: keras.Model, last_conv_layer: str | None = None
) -> GradcamParts | EnsembleGradcamParts:
    """Split ``classifier`` into the pieces a Grad-CAM forward pass under a GradientTape needs.

    ``last_conv_layer`` defaults to the table's layer for the backbone found inside the classifier
    (or the backbone's last layer when none matches). For an ensemble the result is an
    ``EnsembleGradcamParts``; ``last_conv_layer`` is then used for the members whose backbone has a
    layer of that name, the table's layer for the others.
    """
    members = ensemble_members(classifier)
    if members:
        parts = []
        for member in members:
            names = {layer.name for layer in member.get_layer("backbone").layers}
            parts.append(gradcam_parts(member, last_conv_layer if last_conv_layer in names else None))
        used = list(dict.fromkeys(part.last_conv_layer for part in parts))
        return EnsembleGradcamParts(members=parts, combine=classifier.get_layer("ensemble"),
                                    last_conv_layer=", ".join(used))
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
