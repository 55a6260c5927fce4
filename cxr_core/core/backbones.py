"""The backbone table: plain facts about every convolutional base the workbench can train.

No TensorFlow here, so pages, the command line and config validation can check names and sizes
without seconds of start-up. ``cxr_core.engine.model`` maps a row to its ``keras.applications``
constructor. Adding a backbone is one row.
"""
from __future__ import annotations

from dataclasses import dataclass

from cxr_core.core.errors import BadSettingError

#: Preprocessing modes of ``model.Preprocess``: ``tf`` (x/127.5 - 1), ``torch`` (x/255, then the
#: ImageNet mean and std) or ``none`` (the Keras model normalises by itself).
PREPROCESS_MODES = ("tf", "torch", "none")


@dataclass(frozen=True)
class BackboneSpec:
    """One row of the backbone table.

    Attributes:
        name: key in ``BACKBONES`` (saved in config.json).
        label: name for people.
        keras_name: the constructor's name in ``keras.applications``.
        default_size: input side used when ``ModelConfig.image_size`` is ``None``.
        min_size: smallest input side the architecture accepts.
        preprocess_mode: one of ``PREPROCESS_MODES``.
        last_conv_layer: name of the last convolutional activation inside the backbone (Grad-CAM).
        supports_alpha: whether ``ModelConfig.alpha`` (width multiplier) applies.
        throughput: images per second of the frozen backbone at its default size on a 2-core laptop
            CPU (measured with benchmarks/run.py; used only for time estimates).
        imagenet_file: the file Keras caches its ImageNet weights (no top) under, in
            ``~/.keras/models``; ``{alpha}`` and ``{size}`` are filled in for MobileNetV2.
        export_seconds: time of the LiteRT export on the same CPU (it grows with the graph).
    """

    name: str
    label: str
    keras_name: str
    default_size: int
    min_size: int
    preprocess_mode: str
    last_conv_layer: str
    supports_alpha: bool
    throughput: float
    imagenet_file: str
    export_seconds: float

    def image_size(self, requested: int | None) -> int:
        """The input side for ``requested`` (None: the default); BadSettingError below the minimum."""
        size = int(requested or self.default_size)
        if size < self.min_size:
            raise BadSettingError(f"{self.label} needs images of at least {self.min_size} pixels; got {size}.")
        return size

    def throughput_at(self, size: int, alpha: float = 1.0) -> float:
        """Estimated images per second at ``size`` (cost grows with the pixel count and the width)."""
        speed = self.throughput * (self.default_size / size) ** 2
        if self.supports_alpha:
            speed *= 1.0 / max(alpha, 0.35) ** 0.8
        return speed

    def imagenet_filename(self, alpha: float = 1.0, size: int | None = None) -> str:
        """The weights file name Keras looks for (MobileNetV2 has one per width and size)."""
        rows = size if size in (96, 128, 160, 192, 224) else 224
        return self.imagenet_file.format(alpha=f"{float(alpha):g}" if alpha != 1.0 else "1.0", size=rows)


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("inception_v3", "InceptionV3 (reference)", "InceptionV3", 299, 75, "tf", "mixed10",
                     False, 8.0, "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", 8.0),
        BackboneSpec("mobilenet_v2", "MobileNetV2 (small, fast)", "MobileNetV2", 224, 32, "tf", "out_relu",
                     True, 25.0, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{size}_no_top.h5", 1.5),
        # EfficientNet's Keras model holds its own Rescaling/Normalization layers.
        BackboneSpec("efficientnet_b0", "EfficientNetB0", "EfficientNetB0", 224, 32, "none", "top_activation",
                     False, 18.0, "efficientnetb0_notop.h5", 8.0),
        BackboneSpec("densenet121", "DenseNet121", "DenseNet121", 224, 32, "torch", "relu",
                     False, 6.0, "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5", 8.0),
    )
}
BACKBONE_NAMES = tuple(BACKBONES)


def get_backbone(name: str) -> BackboneSpec:
    """The table row for ``name``.

    Raises:
        BadSettingError: one sentence naming the known backbones.
    """
    try:
        return BACKBONES[name]
    except KeyError:
        raise BadSettingError(
            f"There is no backbone {name!r} (unknown backbone); choose one of {', '.join(BACKBONES)}.") from None
