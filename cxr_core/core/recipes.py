"""Named training recipes: every training choice except the data, the backbone, its width and
its weights, which stay the user's.

``apply_recipe(config, name)`` returns ``config`` with the recipe's settings; the command line
and the Training page then apply the choices a person made explicitly, so explicit flags
override the recipe. Every run records its recipe in ``config.json`` (``train.recipe``).
Measured figures of each recipe are in benchmarks/ACCURACY.md.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cxr_core.core.config import RunConfig
from cxr_core.core.errors import BadSettingError


@dataclass(frozen=True)
class Recipe:
    """A named set of settings.

    Attributes:
        name: the key (``train --recipe NAME``).
        label: one line for people.
        purpose: when to use it, in a sentence.
        settings: section -> field -> value, applied over a ``RunConfig``.
        expected: measured figures to show beside the choice (from benchmarks/ACCURACY.md), as
            plain text; empty when none were measured.
    """

    name: str
    label: str
    purpose: str
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    expected: str = ""


# Augmentation that imitates another scanner or copy of the data: how tightly the chest is framed
# (zoom and aspect, the strongest lead measured), contrast and gamma, blur, lower resolution and
# JPEG re-compression. No flip: a flipped chest imitates dextrocardia.
ROBUST_AUGMENT = {"rotation_range": 7.0, "horizontal_flip": False, "brightness_range": (0.9, 1.1),
                  "width_shift": 0.08, "height_shift": 0.08, "zoom": 0.25, "blur": 1.2, "downscale": 0.7,
                  "jpeg_quality": 30, "contrast": 0.3, "gamma": 0.35}

# Training that keeps a shortcut from standing in for the disease: every image augmented anew each
# epoch, group-balanced weights on the copy an image came from (when the data set records it), label
# smoothing, warm-up then cosine decay, AdamW, a threshold halfway between the classes, and test-time views
# kept when they raise the validation AUC (a few minutes' more for runs that already take many).
ROBUST_TRAIN = {"epochs": 0, "batch_size": 32, "balance": "class_weight", "balance_by": "source_resolution",
                "warmup_epochs": 1, "schedule": "cosine", "label_smoothing": 0.1, "weight_decay": 1e-4,
                "online_augment": True, "threshold_rule": "midpoint", "tta": "auto"}

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "reference", "The reference notebook",
            "The notebook's recipe exactly: frozen backbone, the head for 10 epochs, a random 8:1:1 split by "
            "image, the training part balanced with augmented NORMAL images.",
            {
                "data": {"split": "random", "seed": 123, "val_fraction": 0.1, "test_fraction": 0.1},
                "augment": {"rotation_range": 0.3, "horizontal_flip": True, "brightness_range": (0.9, 1.1),
                            "width_shift": 0.05, "height_shift": 0.05, "zoom": 0.0},
                "model": {"image_size": None, "dropout": 0.5},
                "train": {"epochs": 10, "batch_size": 32, "learning_rate": 1e-3, "balance": "augment",
                          "fine_tune_layers": 0, "fine_tune_epochs": 0, "online_augment": False,
                          "threshold_rule": "youden"},
            },
        ),
        Recipe(
            "quick", "Quick classroom demo",
            "A demonstration on a frozen backbone: every training image at 224 pixels, split by patient, the head "
            "only, the threshold midway between the classes. About a minute the first time on a 2-core laptop "
            "(the backbone reads every image once), 15 seconds once its features are cached.",
            {
                "data": {"split": "patient", "limit": None},
                "augment": {"rotation_range": 5.0, "horizontal_flip": False},
                "model": {"image_size": 224},
                "train": {"epochs": 8, "batch_size": 32, "learning_rate": 1e-3, "balance": "class_weight",
                          "fine_tune_layers": 0, "fine_tune_epochs": 0, "online_augment": False,
                          "threshold_rule": "midpoint"},
            },
            expected=("MobileNetV2-0.35 (ImageNet) on kermany224: 56 s cold, 16 s with cached features on 2 cores; "
                      "on 311 images of the official Kermany test set AUC 0.940 (95 % interval 0.910-0.963), "
                      "accuracy 0.846, sensitivity 0.933, specificity 0.698 at its threshold."),
        ),
        Recipe(
            "best", "Robust fine-tuning (best measured)",
            "Fine-tunes the top 100 backbone layers for 8 epochs at 224 pixels with augmentation that imitates "
            "other scanners and copies of the data (framing, contrast, gamma, blur, lower resolution, JPEG), weights "
            "the images so that which copy an image came from (source_resolution, when the manifest has it) "
            "tells nothing about the label, smooths the labels, warms up then decays the learning rate, and puts "
            "the threshold midway between the classes. "
            "Made for MobileNetV2-0.35 with ImageNet weights; epochs of 3-5 minutes on a 2-core laptop.",
            {
                "data": {"split": "patient", "limit": None},
                "augment": ROBUST_AUGMENT,
                "model": {"image_size": 224, "dropout": 0.2},
                "train": {**ROBUST_TRAIN, "fine_tune_layers": 100, "fine_tune_epochs": 8,
                          "fine_tune_learning_rate": 5e-4, "fine_tune_batchnorm": True},
            },
            expected=("MobileNetV2-0.35 (ImageNet) on kermany224, scored on 311 images of the official Kermany "
                      "test set: AUC 0.986, accuracy 0.936, sensitivity 0.990, specificity 0.845 at its own "
                      "threshold; 8 epochs of 210-300 s on 2 cores."),
        ),
        Recipe(
            "demo", "From scratch (the shipped demo)",
            "Trains the whole network from random weights at 128 pixels with the same robustness augmentation "
            "and weighting as the best recipe; needs no pretrained weights, so the result can be shipped.",
            {
                "data": {"split": "patient", "limit": None},
                "augment": ROBUST_AUGMENT,
                "model": {"image_size": 128, "dropout": 0.2},
                "train": {**ROBUST_TRAIN, "fine_tune_layers": -1, "fine_tune_epochs": 14,
                          "fine_tune_learning_rate": 2e-3},
            },
            expected=("The shipped demo (MobileNetV2-0.35, no pretrained weights) on 311 images of the official "
                      "Kermany test set: AUC 0.960 (95 % interval 0.938-0.979), accuracy 0.904, sensitivity 0.938, "
                      "specificity 0.845 at its threshold, with test-time views (chosen on validation); 14 epochs of "
                      "95-260 s on 2 cores."),
        ),
    )
}
RECIPE_NAMES = tuple(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; BadSettingError naming the known ones otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise BadSettingError(f"There is no recipe {name!r}; choose one of {', '.join(RECIPES)}.") from None


def apply_recipe(config: RunConfig, name: str) -> RunConfig:
    """``config`` with the recipe's settings and ``train.recipe`` set to ``name``.

    The data folder, backbone, alpha and weights are never changed by a recipe.
    """
    recipe = get_recipe(name)
    sections = {}
    for section_name in ("data", "augment", "model", "train"):
        section = getattr(config, section_name)
        values = dict(recipe.settings.get(section_name, {}))
        if section_name == "train":
            values["recipe"] = name
        for kept in ("data_dir", "backbone", "alpha", "weights", "cache_dir"):
            values.pop(kept, None)
        sections[section_name] = dataclasses.replace(section, **values)
    return dataclasses.replace(config, **sections)
