"""Run configuration: four frozen dataclasses, saved as ``config.json`` in every run folder.

The saved file is enough to rebuild the run: which images, which split, which augmentation, which
backbone, how it was trained. ``RunConfig.from_dict`` accepts files from older versions (missing
keys take today's defaults, unknown keys are ignored) so old runs stay loadable.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from cxr_core.core.backbones import get_backbone
from cxr_core.core.errors import BadRunError, BadSettingError
from cxr_core.core.labels import TASKS, THRESHOLD_RULES

#: Where training runs (see cxr_core.engine.distribute) and its numeric precision: plain settings, kept
#: here with the other settings so that the configuration needs nothing from the engine.
DISTRIBUTE_MODES = ("auto", "off", "mirrored", "multi-worker")
PRECISIONS = ("auto", "float32", "mixed")

CONFIG_VERSION = 1

#: How images are split, with the name people see for each.
SPLIT_LABELS = {
    "random": "Random split by image",
    "patient": "Split by patient",
    "official": "Official Kermany test set",
}
SPLIT_MODES = tuple(SPLIT_LABELS)
BALANCE_STRATEGIES = ("augment", "class_weight", "none")
SCHEDULES = ("constant", "cosine")
#: How a run calibrates its probabilities (``cxr_core.core.calibration``).
CALIBRATIONS = ("temperature", "platt", "none")
#: Whether a run averages a few fixed views of each image at test time (``cxr_core.data.views``): ``auto``
#: measures both ways on the validation part at the end of training and keeps views when they score higher.
TTA_MODES = ("off", "auto", "on")


@dataclass(frozen=True)
class DataConfig:
    """Which images and how they are split.

    Attributes:
        data_dir: the data set folder (Kermany layout or class folders).
        split: ``random`` (stratified by image, the reference), ``patient`` (grouped by patient)
            or ``official`` (the release's own test set).
        seed: seed of the split (123, as the reference).
        val_fraction: share of images for validation (0.1 as the reference's 8:1:1).
        test_fraction: share of images for test.
        limit: stratified subset of this many images for quick demos; ``None`` for all.
        task: ``pneumonia`` (NORMAL / PNEUMONIA) or ``subtype`` (NORMAL / BACTERIA / VIRUS).
    """

    data_dir: str = ""
    split: str = "random"
    seed: int = 123
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    limit: int | None = None
    task: str = "pneumonia"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise BadSettingError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}.")
        if self.split not in SPLIT_MODES:
            raise BadSettingError(f"split must be one of {', '.join(SPLIT_MODES)}; got {self.split!r}.")
        if not (0 < self.val_fraction < 0.5 and 0 < self.test_fraction < 0.5):
            raise BadSettingError("val_fraction and test_fraction must each be between 0 and 0.5.")
        if self.limit is not None and self.limit < 10:
            raise BadSettingError(f"limit must be at least 10 images; got {self.limit}.")


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation with the meaning of Keras' ImageDataGenerator, as the reference used it.

    Attributes:
        rotation_range: maximum rotation in degrees, either way (0.3 in the reference: tiny).
        horizontal_flip: flip left-right with probability 0.5 (imitates dextrocardia, which is rare).
        brightness_range: multiply intensities by a factor drawn from this range.
        width_shift: maximum horizontal shift as a fraction of the width.
        height_shift: maximum vertical shift as a fraction of the height.
        zoom: maximum zoom in or out as a fraction (0 = none).

    Robustness to another scanner or copy of the data (all off by default, as in the reference;
    each is applied to half of the images, with a strength drawn up to the given maximum):

        blur: maximum Gaussian blur, sigma in pixels.
        downscale: maximum loss of resolution: the image is shrunk by a factor drawn in
            [1 - downscale, 1] and enlarged back (a lower-resolution copy of the same film).
        jpeg_quality: lowest JPEG quality of a re-compression (0 = none; e.g. 40 draws 40..95).
        contrast: maximum change of contrast about the mean, as a fraction.
        gamma: maximum change of gamma: the exponent is exp(U(-gamma, gamma)).
        noise: maximum standard deviation of added Gaussian noise, in grey levels.
    """

    rotation_range: float = 0.3
    horizontal_flip: bool = True
    brightness_range: tuple[float, float] = (0.9, 1.1)
    width_shift: float = 0.05
    height_shift: float = 0.05
    zoom: float = 0.0
    blur: float = 0.0
    downscale: float = 0.0
    jpeg_quality: int = 0
    contrast: float = 0.0
    gamma: float = 0.0
    noise: float = 0.0

    def __post_init__(self) -> None:
        # JSON turns tuples into lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "brightness_range", tuple(float(v) for v in self.brightness_range))
        low, high = self.brightness_range
        if not (0 < low <= high):
            raise BadSettingError(
                f"brightness_range must be two positive numbers, low <= high; got {self.brightness_range}."
            )
        if not (0 <= self.rotation_range <= 180):
            raise BadSettingError(f"rotation_range is in degrees, 0 to 180; got {self.rotation_range}.")
        for name in ("width_shift", "height_shift", "zoom", "downscale", "contrast"):
            value = getattr(self, name)
            if not (0 <= value < 1):
                raise BadSettingError(f"{name} is a fraction between 0 and 1; got {value}.")
        if not (0 <= self.blur <= 10):
            raise BadSettingError(f"blur is a Gaussian sigma of 0 to 10 pixels; got {self.blur}.")
        if not (self.jpeg_quality == 0 or 5 <= self.jpeg_quality <= 95):
            raise BadSettingError(f"jpeg_quality is 0 (off) or a lowest quality of 5 to 95; got {self.jpeg_quality}.")
        if not (0 <= self.gamma <= 1):
            raise BadSettingError(f"gamma is between 0 and 1; got {self.gamma}.")
        if not (0 <= self.noise <= 50):
            raise BadSettingError(f"noise is a standard deviation of 0 to 50 grey levels; got {self.noise}.")


@dataclass(frozen=True)
class ModelConfig:
    """The network: a backbone from ``backbones.BACKBONES`` and the reference head.

    Attributes:
        backbone: a key of ``cxr_core.core.backbones.BACKBONES``.
        weights: ``imagenet``, ``none`` (random initialisation) or a path to a weights file.
        image_size: input side in pixels; ``None`` takes the backbone's default (299 for InceptionV3).
        alpha: width multiplier (MobileNetV2 only).
        dropout: dropout rate before the final Dense layer (0.5 in the reference).
    """

    backbone: str = "inception_v3"
    weights: str = "imagenet"
    image_size: int | None = None
    alpha: float = 1.0
    dropout: float = 0.5

    def __post_init__(self) -> None:
        # Checked when the settings are made, so a bad choice is one sentence before any work starts.
        spec = get_backbone(self.backbone)
        if self.image_size is not None and not (32 <= self.image_size <= 1024):
            raise BadSettingError(f"image_size must be between 32 and 1024 pixels; got {self.image_size}.")
        spec.image_size(self.image_size)
        if not (0 <= self.dropout < 1):
            raise BadSettingError(f"dropout must be in [0, 1); got {self.dropout}.")
        if spec.supports_alpha and not (0 < self.alpha <= 2):
            raise BadSettingError(f"alpha (the width multiplier) must be above 0 and at most 2; got {self.alpha}.")

    @property
    def resolved_image_size(self) -> int:
        """The input side: ``image_size`` or the backbone's default."""
        return get_backbone(self.backbone).image_size(self.image_size)


@dataclass(frozen=True)
class TrainConfig:
    """How the classifier is trained.

    Attributes:
        epochs: epochs of the head phase (on cached features when the base is frozen).
        batch_size: images per step.
        learning_rate: Adam learning rate of the head phase.
        balance: ``augment`` (add augmented NORMAL images to the training part, the reference),
            ``class_weight`` or ``none``.
        fine_tune_layers: after the head phase, unfreeze this many top layers of the backbone
            (0 = none; -1 = all, for training from scratch).
        fine_tune_epochs: epochs of the fine-tuning phase.
        fine_tune_learning_rate: learning rate of the fine-tuning phase (low: 1e-5).
        threshold_rule: ``youden`` (maximise sensitivity + specificity on validation) or
            ``sensitivity`` (the highest threshold that reaches ``target_sensitivity``, for screening).
        target_sensitivity: used by the ``sensitivity`` rule.
        calibration: how the probabilities are calibrated on the validation part after training
            (``cxr_core.core.calibration``): ``temperature``, ``platt`` (a sigmoid head; a softmax
            gets temperature) or ``none``. Applied wherever the run predicts; the threshold moves with it.
        tta: test-time augmentation (``TTA_MODES``): ``on`` averages the views of ``data.views`` wherever the
            run predicts; ``auto`` keeps them when they raise the validation AUC; ``off`` (default). The
            threshold and the calibration are chosen on what the run will predict with.
        seed: seed of augmentation, initialisation and shuffling.
        restore_best: keep the weights of the epoch with the best validation AUC (else the last).
        online_augment: during fine-tuning, also augment every training image anew each epoch
            (useful when training a backbone from scratch; the reference did not).
        cache_dir: where cached features live; ``None`` for the default (see ``features.default_cache_dir``).
        export_litert: also write ``model.tflite`` (LiteRT), with which the app predicts and explains
            without loading TensorFlow (a server of about 200 MB instead of 800 MB).
        recipe: the named recipe these settings started from (``cxr_core.core.recipes``), or "" for none.
        balance_by: a column of the data set's manifest (e.g. ``source_resolution``: which scanner,
            site or copy of the data an image came from) that must tell the model nothing: training
            images are weighted so that, within every value of it, the classes weigh as in the whole
            training part (on top of the class balance). "" for none.
        label_smoothing: pull the training targets this far towards 0.5 (0 = none); tempers
            over-confident probabilities, which matters when the test images look different.
        warmup_epochs: fine-tuning epochs over which the learning rate rises from near 0.
        schedule: ``constant`` or ``cosine`` (the fine-tuning learning rate decays to 0 by the last epoch).
        fine_tune_batchnorm: while fine-tuning pretrained weights, let the unfrozen BatchNorm layers
            learn the X-rays' statistics (momentum 0.9) instead of keeping ImageNet's.
        weight_decay: decoupled weight decay of the optimiser (AdamW), of the head and while fine-tuning; 0 = Adam.
        distribute: ``auto``, ``off``, ``mirrored`` or ``multi-worker`` (``cxr_core.engine.distribute``);
            ``batch_size`` is then per replica and the learning rates stay as configured.
        precision: ``auto`` (mixed float16 on GPUs that gain from it, else float32), ``float32`` or ``mixed``.
        cpu_replicas: split the CPU into this many logical devices for ``mirrored`` (0 = no split).
    """

    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    balance: str = "augment"
    fine_tune_layers: int = 0
    fine_tune_epochs: int = 0
    fine_tune_learning_rate: float = 1e-5
    threshold_rule: str = "youden"
    target_sensitivity: float = 0.95
    calibration: str = "temperature"
    tta: str = "off"
    seed: int = 123
    restore_best: bool = True
    online_augment: bool = False
    cache_dir: str | None = None
    export_litert: bool = True
    recipe: str = ""
    balance_by: str = ""
    label_smoothing: float = 0.0
    warmup_epochs: int = 0
    schedule: str = "constant"
    fine_tune_batchnorm: bool = False
    weight_decay: float = 0.0
    distribute: str = "auto"
    precision: str = "auto"
    cpu_replicas: int = 0

    def __post_init__(self) -> None:
        # Each setting that names one of a few choices, and the choices.
        for name, allowed in (("distribute", DISTRIBUTE_MODES), ("precision", PRECISIONS),
                              ("balance", BALANCE_STRATEGIES), ("threshold_rule", THRESHOLD_RULES),
                              ("calibration", CALIBRATIONS), ("tta", TTA_MODES), ("schedule", SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise BadSettingError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}.")
        if not (0 <= self.cpu_replicas <= 64):
            raise BadSettingError(f"cpu_replicas must be between 0 and 64; got {self.cpu_replicas}.")
        if self.epochs < 0 or self.fine_tune_epochs < 0:
            raise BadSettingError("epochs cannot be negative.")
        if self.epochs == 0 and self.fine_tune_epochs == 0:
            raise BadSettingError("at least one epoch of training is needed (epochs or fine_tune_epochs).")
        if not (0 <= self.label_smoothing < 0.5):
            raise BadSettingError(f"label_smoothing must be at least 0 and below 0.5; got {self.label_smoothing}.")
        if not (0 <= self.weight_decay < 1):
            raise BadSettingError(f"weight_decay must be at least 0 and below 1; got {self.weight_decay}.")
        if not (0 <= self.warmup_epochs <= max(self.fine_tune_epochs, 0)):
            raise BadSettingError(
                f"warmup_epochs must be between 0 and the fine-tuning epochs ({self.fine_tune_epochs}); "
                f"got {self.warmup_epochs}.")
        if self.batch_size < 1:
            raise BadSettingError(f"batch_size must be at least 1; got {self.batch_size}.")
        if not (0 < self.learning_rate < 1 and 0 < self.fine_tune_learning_rate < 1):
            raise BadSettingError("learning rates must be between 0 and 1.")


@dataclass(frozen=True)
class RunConfig:
    """Everything needed to rebuild a run."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    version: int = CONFIG_VERSION

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """Rebuild from ``to_dict`` output, tolerating older or newer files.

        Raises:
            BadRunError: when ``data`` is not a dict of sections or a value is invalid.
        """
        if not isinstance(data, dict):
            raise BadRunError("config.json does not hold a settings object; the run folder is damaged.")
        try:
            sections = {
                name: _section(section_cls, data.get(name) or {})
                for name, section_cls in (
                    ("data", DataConfig),
                    ("augment", AugmentConfig),
                    ("model", ModelConfig),
                    ("train", TrainConfig),
                )
            }
        except (TypeError, ValueError) as error:
            raise BadRunError(f"config.json holds a setting this version cannot use: {error}") from error
        return cls(**sections, version=int(data.get("version", 0) or 0))


def _section(section_cls: type, values: Any):
    if not isinstance(values, dict):
        raise TypeError(f"section {section_cls.__name__} is not an object")
    known = {f.name for f in fields(section_cls)}
    return section_cls(**{k: v for k, v in values.items() if k in known})
