"""Every training setting, written once: one ``Setting`` row per command-line flag and form widget.

A row names the config field it sets (``"train.epochs"``: section and field of ``RunConfig``), its
flag, its type and choices, the command line's help, and where the Training page shows it. The
command line (``cxr_core.cli``) makes its ``train`` flags from ``SETTINGS`` and applies them with
``config_from_values``; the README's usage block is ``readme_usage()`` (a test keeps the two equal);
recipes (``cxr_core.core.recipes``) may set only what a row sets (``check_recipe``, run on import);
the Training page draws its widgets from ``form_rows`` and reads them back with
``apply_form_values``. Adding a setting is one row here (and the field in ``cxr_core.core.config``).

Defaults are never written here: they are the config dataclasses' own. Augmentation rows have no
place on the Training form: the Augmentation page chooses them (``form=None``).

``python -m cxr_core.core.settings --readme`` prints the README's usage block.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_core.core.backbones import BACKBONE_NAMES, BACKBONES
from cxr_core.core.config import (
    BALANCE_STRATEGIES,
    CALIBRATIONS,
    DISTRIBUTE_MODES,
    PRECISIONS,
    SCHEDULES,
    SPLIT_LABELS,
    SPLIT_MODES,
    TTA_MODES,
    RunConfig,
)
from cxr_core.core.errors import BadSettingError
from cxr_core.core.labels import TASKS, THRESHOLD_RULES
from cxr_core.core.recipes import RECIPE_NAMES, RECIPES, Recipe
from cxr_core.core.tasks import get_task

SECTIONS = ("data", "augment", "model", "train")
TYPES = ("int", "float", "bool", "choice", "str", "path", "pair")
FORM_LEVELS = ("basic", "advanced")

#: Stated in the CLI help of --distribute (and imported by ``cxr_core.engine.distribute``, which follows it).
#: The learning rate is kept as configured, not scaled with the replicas: the optimisers here are Adam/AdamW,
#: for which the linear scaling rule (made for SGD) overshoots, and keeping it makes a run on N replicas of
#: batch B the same computation as a run on one device with batch N x B, so results can be compared and
#: reproduced; pass --learning-rate to scale it.
LEARNING_RATE_RULE = ("the global batch is --batch-size per replica times the replicas, and the learning rate is "
                      "kept as configured (not scaled: Adam does not follow the SGD linear rule, and N replicas "
                      "then train exactly as one device with an N times larger batch); pass --learning-rate to "
                      "change it")

TASK_LABELS = {name: get_task(name).label for name in TASKS}
BALANCE_LABELS = {"augment": "Augment NORMAL (reference)", "class_weight": "Class weights", "none": "None"}
CALIBRATION_LABELS = {"temperature": "Temperature scaling", "platt": "Platt scaling", "none": "None"}
TTA_LABELS = {"off": "Off: one look at each image", "auto": "Auto: when it scores higher on validation",
              "on": "On: average a few views of each image"}
THRESHOLD_LABELS = {"youden": "Youden (balance both)", "sensitivity": "95 % sensitivity (screening)",
                    "midpoint": "Midpoint (robust to a new site)"}
BACKBONE_LABELS = {name: spec.label for name, spec in BACKBONES.items()}


def fine_tune_layers_label(layers: int) -> str:
    """How the form names a number of fine-tuned layers."""
    return {0: "none (frozen backbone)", -1: "all layers"}.get(layers, f"top {layers}")


def _backbone_default_size(backbone: str = BACKBONE_NAMES[0], **_context: Any) -> int:
    return BACKBONES[backbone].default_size


#: What a row's ``choices`` or ``option_labels`` may name instead of holding the values themselves.
CONSTANTS: dict[str, Any] = {
    "TASKS": TASKS, "SPLIT_MODES": SPLIT_MODES, "BALANCE_STRATEGIES": BALANCE_STRATEGIES,
    "THRESHOLD_RULES": THRESHOLD_RULES, "SCHEDULES": SCHEDULES, "DISTRIBUTE_MODES": DISTRIBUTE_MODES,
    "PRECISIONS": PRECISIONS, "BACKBONE_NAMES": BACKBONE_NAMES, "SPLIT_LABELS": SPLIT_LABELS,
    "TASK_LABELS": TASK_LABELS, "BALANCE_LABELS": BALANCE_LABELS, "THRESHOLD_LABELS": THRESHOLD_LABELS,
    "BACKBONE_LABELS": BACKBONE_LABELS, "CALIBRATIONS": CALIBRATIONS, "CALIBRATION_LABELS": CALIBRATION_LABELS,
    "TTA_MODES": TTA_MODES, "TTA_LABELS": TTA_LABELS,
}
#: What ``Setting.value_from_args`` answers for a flag that was not given (None is a value: ``--limit 0``).
NOT_GIVEN = object()
_METAVARS = {"int": "N", "float": "F", "str": "TEXT", "path": "PATH"}


def _resolve(value: Any) -> Any:
    return CONSTANTS[value] if isinstance(value, str) else value


def weights_value(text: str) -> str:
    """--weights: ``imagenet`` or ``none`` in any case, else a weights file's absolute path (checked with the
    other starting conditions in ``cxr_core.data.plan.preflight``)."""
    if text.lower() in ("imagenet", "none"):
        return text.lower()
    return str(Path(text).expanduser().resolve())


@dataclass(frozen=True)
class Setting:
    """One training setting.

    Attributes:
        name: ``section.field`` of ``RunConfig`` that it sets.
        flag: the ``train`` flag; None when it has none.
        type: one of ``TYPES``. ``bool`` is ``--x/--no-x`` unless ``flag_sets`` is given; ``pair`` takes two
            numbers; ``choice`` limits the flag to ``choices``. A ``str`` row with ``choices`` lists them for
            the form and the README only: the config checks the value and names the known ones.
        help: the command line's help (None: none); ``{default}`` becomes the config's default.
        choices: the allowed values, or the name of a constant in ``CONSTANTS``.
        range: (min, max) of the form's number widget or slider.
        options: the values a form slider (or select) of numbers offers.
        step: the form widget's step.
        label, form_help: the form widget's label and help.
        form: ``basic`` (a widget the Training page lays out itself), ``advanced`` (drawn in its advanced
            section from this row) or None (command line only).
        widget: the Streamlit call that draws it (``number_input``, ``selectbox``, ``slider``,
            ``select_slider``, ``toggle``, ``text_input``); by default it follows the type.
        also: further fields set to the same value (``--shift`` sets both shifts; ``--seed`` both seeds).
        flag_sets: for a flag that takes no value (``--no-flip``): the value it sets when given.
        metavar: the value's name in the help and the README (by default from the type).
        key: the session key of the form widget, ``{backbone}`` filled in; by default ``train_<field>``.
        form_default: the widget's starting value where the config's default does not suit a widget.
        none_as: the widget value that stands for None (``limit``: 0 = all), or a function of the form's
            context that gives it (``image_size``: the backbone's own size).
        needs: another setting that must be on (not 0) for this one to count; when it is off, this one takes
            the config's default (and its widget is disabled).
        option_labels: how the form names the options: a mapping, a function, or a name in ``CONSTANTS``.
        cli_value: turns the flag's value into the setting's (``--weights``: a resolved path).
    """

    name: str
    flag: str | None
    type: str
    help: str | None = None
    choices: tuple | str = ()
    range: tuple[float, float] | None = None
    options: tuple = ()
    step: float | None = None
    label: str = ""
    form_help: str = ""
    form: str | None = None
    widget: str | None = None
    also: tuple[str, ...] = ()
    flag_sets: Any = None
    metavar: str | None = None
    key: str | None = None
    form_default: Any = None
    none_as: Any = None
    needs: str | None = None
    option_labels: Any = None
    cli_value: Callable[[Any], Any] | None = None

    # --- what it sets ------------------------------------------------------------------------
    @property
    def fields(self) -> tuple[str, ...]:
        """Every ``section.field`` it sets."""
        return (self.name, *self.also)

    @property
    def default(self) -> Any:
        """The config's default for it."""
        section, field_name = self.name.split(".")
        return getattr(getattr(RunConfig(), section), field_name)

    @property
    def choice_values(self) -> tuple:
        return tuple(_resolve(self.choices))

    # --- the command line --------------------------------------------------------------------
    @property
    def dest(self) -> str:
        """The attribute argparse stores the flag's value in."""
        return self.flag.lstrip("-").replace("-", "_")

    def argparse_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``add_argument(self.flag, ...)``: None (the default) means "not given"."""
        kwargs: dict[str, Any] = {"help": self.help.format(default=self.default) if self.help else self.help}
        if self.type == "bool":
            if self.flag_sets is not None:
                return {**kwargs, "action": "store_true"}
            return {**kwargs, "action": argparse.BooleanOptionalAction, "default": None}
        if self.type == "choice":
            return {**kwargs, "choices": self.choice_values}
        if self.type in ("int", "float"):
            kwargs["type"] = int if self.type == "int" else float
        elif self.type == "pair":
            kwargs.update(type=float, nargs=2)
        return {**kwargs, "metavar": self.metavar_text}

    @property
    def metavar_text(self) -> str | tuple[str, str]:
        if self.metavar is not None:
            return tuple(self.metavar.split()) if self.type == "pair" else self.metavar
        return _METAVARS.get(self.type, self.name.split(".")[1].upper())

    def usage(self) -> str:
        """How the README's usage block shows the flag: the form of it that changes the default."""
        if self.type == "bool" and self.flag_sets is None:
            return f"[--no-{self.flag[2:]}]" if self.default else f"[{self.flag}]"
        if self.type == "bool":
            return f"[{self.flag}]"
        if self.type == "choice":
            return f"[{self.flag} {'|'.join(map(str, self.choice_values))}]"
        metavar = self.metavar_text
        return f"[{self.flag} {' '.join(metavar) if isinstance(metavar, tuple) else metavar}]"

    def value_from_args(self, args: argparse.Namespace) -> Any:
        """The flag's value in parsed arguments, or ``NOT_GIVEN``. A flag given as the value that stands
        for None (``--limit 0``: all images) gives None."""
        value = getattr(args, self.dest, None)
        if self.flag_sets is not None:
            return self.flag_sets if value else NOT_GIVEN
        if value is None:
            return NOT_GIVEN
        if self.type == "pair":
            value = tuple(value)
        if self.none_as is not None and not callable(self.none_as) and value == self.none_as:
            return None
        return self.cli_value(value) if self.cli_value else value

    # --- the form ----------------------------------------------------------------------------
    @property
    def widget_call(self) -> str:
        """The Streamlit function that draws its widget."""
        if self.widget:
            return self.widget
        if self.type == "bool":
            return "toggle"
        if self.type == "choice" or (self.choices and self.type == "str"):
            return "selectbox"
        if self.options:
            return "select_slider"
        return "number_input" if self.type in ("int", "float") else "text_input"

    def session_key(self, **context: Any) -> str:
        """The form widget's session key (``backbone`` fills a per-backbone key)."""
        return (self.key or f"train_{self.name.split('.')[1]}").format(**context)

    def to_widget(self, value: Any, **context: Any) -> Any:
        """A setting's value as its widget holds it: None as ``none_as``, numbers brought into ``range``."""
        if value is None and self.none_as is not None:
            value = self.none_as(**context) if callable(self.none_as) else self.none_as
        if self.range is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = min(max(value, self.range[0]), self.range[1])
        return value

    def from_widget(self, value: Any) -> Any:
        """A widget's value as the setting's."""
        if self.none_as is not None and not callable(self.none_as) and value == self.none_as:
            return None
        if self.type == "int":
            return int(value)
        if self.type == "float":
            return float(value)
        if self.type == "pair":
            return tuple(float(v) for v in value)
        return value

    def form_start(self, **context: Any) -> Any:
        """The widget's starting value."""
        return self.form_default if self.form_default is not None else self.to_widget(self.default, **context)

    def form_options(self, current: Any = None) -> list:
        """The values a select or select slider offers, with ``current`` (put there by a recipe) among them."""
        options = list(self.options or self.choice_values)
        if current is not None and current not in options:
            options.append(current)
            if all(isinstance(v, (int, float)) for v in options):  # "all" (-1) stays last
                options.sort(key=lambda v: (v < 0, v))
        return options

    def format_func(self) -> Callable[[Any], str] | None:
        """How the form names an option (None: as it is)."""
        labels = _resolve(self.option_labels) if self.option_labels is not None else None
        if callable(labels):
            return labels
        if labels is not None:
            return lambda value: labels.get(value, str(value))
        if self.type == "float":
            return lambda value: f"{value:g}"
        return None

    def widget_kwargs(self, state: Mapping[str, Any] | None = None, **context: Any) -> dict[str, Any]:
        """Keyword arguments of its widget: ``getattr(st, row.widget_call)(**row.widget_kwargs(st.session_state))``.

        ``state`` (the session) decides the rest: a value the session already holds gets no default beside
        it (Streamlit warns of the conflict), a recipe's value joins the options, and a row whose ``needs``
        is off is disabled. ``context`` fills the key (``backbone``).
        """
        state = {} if state is None else state
        key = self.session_key(**context)
        kwargs: dict[str, Any] = {"label": self.label, "key": key, "help": self.form_help or None}
        call = self.widget_call
        if call in ("selectbox", "select_slider"):
            kwargs["options"] = self.form_options(state.get(key))
            if self.format_func() is not None:
                kwargs["format_func"] = self.format_func()
        elif call in ("number_input", "slider") and self.range is not None:
            kwargs.update(min_value=self.range[0], max_value=self.range[1])
        if self.step is not None:
            kwargs["step"] = self.step
        if key not in state:
            start = self.form_start(**context)
            if call == "selectbox":
                kwargs["index"] = kwargs["options"].index(start) if start in kwargs["options"] else 0
            elif start is not None:
                kwargs["value"] = start
        if self.needs is not None:
            needed = find(self.needs)
            kwargs["disabled"] = not state.get(needed.session_key(**context), needed.form_start(**context))
        return kwargs


#: The table. Order: the README's and the help's.
SETTINGS: tuple[Setting, ...] = (
    # The data and how it is split
    Setting("data.task", "--task", "choice",
            "pneumonia: NORMAL / PNEUMONIA (default); subtype: NORMAL / BACTERIA / VIRUS, read from the file names "
            "(person1_bacteria_1.jpeg)", choices="TASKS", form="basic", option_labels="TASK_LABELS",
            label="Classes to tell apart",
            form_help="Two classes (is there pneumonia?), or three (normal, bacterial or viral: the subtype is read "
                      "from the file names, as in person1_bacteria_1.jpeg)."),
    Setting("data.split", "--split", "choice", choices="SPLIT_MODES", form="basic", option_labels="SPLIT_LABELS",
            label="Split",
            form_help="Chosen on the Dataset page by default. A random split by image lets one patient's images land "
                      "in training and test, which flatters the model."),
    Setting("data.val_fraction", "--val-fraction", "float", range=(0.05, 0.45), step=0.05, widget="slider",
            form="advanced",
            label="Validation share", form_help="Share of the images kept aside to choose the epoch and threshold."),
    Setting("data.test_fraction", "--test-fraction", "float", range=(0.05, 0.45), step=0.05, widget="slider",
            form="advanced",
            label="Test share", form_help="Share of the images kept aside to test the finished model (not used by "
                                          "the official split, which has its own test set)."),
    Setting("data.limit", "--limit", "int", "stratified subset of N images, for quick demos (0 = all)",
            range=(0, 1_000_000), step=50, none_as=0, form="basic", key="train_limit",
            label="Quick demo: use only this many images (0 = all)",
            form_help="A stratified subset (same class shares) for a fast first run; at least 10."),
    Setting("data.seed", "--seed", "int", "seed of split, augmentation and training (default {default})",
            also=("train.seed",), range=(0, 2**31 - 1), form="advanced", label="Seed",
            form_help="The starting number of every random choice (the split, the augmentation, the training): the "
                      "same seed gives the same run, another seed shows how much luck is in a result."),
    # The network
    Setting("model.backbone", "--backbone", "str", ", ".join(BACKBONE_NAMES) + " (default {default})",
            choices="BACKBONE_NAMES", metavar="NAME", form="basic", option_labels="BACKBONE_LABELS",
            key="train_backbone", label="Backbone",
            form_help="InceptionV3 at 299 px is the reference (about 8 images/s on a 2-core laptop: the estimate "
                      "below says how long); MobileNetV2 is several times faster."),
    Setting("model.alpha", "--alpha", "float", "MobileNetV2 width multiplier (e.g. 0.35)",
            options=(0.35, 0.5, 0.75, 1.0), form="basic", key="train_alpha_free", label="Width (alpha)",
            form_help="MobileNetV2's width multiplier: 0.35 is about 8× smaller and faster. A weights file fixes it."),
    Setting("model.weights", "--weights", "path", "imagenet (default), none, or a path to a weights file",
            metavar="imagenet|none|PATH", cli_value=weights_value, form="basic", widget="selectbox",
            label="Starting weights"),
    Setting("model.image_size", "--image-size", "int", "input side in pixels (default: the backbone's)",
            options=(32, 64, 96, 128, 160, 192, 224, 256, 299, 320, 384), none_as=_backbone_default_size,
            form="basic", key="train_size_{backbone}", label="Image size (pixels)",
            form_help="Images are resized to a square of this side. Smaller is much faster and loses fine detail."),
    Setting("model.dropout", "--dropout", "float", "dropout before the last layer (reference: 0.5)",
            range=(0.0, 0.9), step=0.05, widget="slider", form="basic", label="Dropout before the last layer",
            form_help="Randomly silences this share of features while training (0.5 in the reference), which "
                      "fights overfitting."),
    # Training
    Setting("train.epochs", "--epochs", "int", "epochs of the head phase on cached features (default {default})",
            range=(0, 200), form="basic", label="Epochs",
            form_help="Passes over the training images for the head (fast: on cached features)."),
    Setting("train.batch_size", "--batch-size", "int", options=(8, 16, 32, 64, 128), form="basic", key="train_batch",
            label="Batch size"),
    Setting("train.learning_rate", "--learning-rate", "float", options=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2), form="basic",
            key="train_lr", label="Learning rate"),
    Setting("train.balance", "--balance", "choice", choices="BALANCE_STRATEGIES", form="basic", key="train_balance",
            option_labels="BALANCE_LABELS", label="Balance strategy"),
    Setting("train.fine_tune_layers", "--fine-tune-layers", "int", "unfreeze this many top backbone layers (-1 = all)",
            options=(0, 10, 20, 40, 80, -1), widget="selectbox", option_labels=fine_tune_layers_label, form="basic",
            key="train_ft_layers", label="Fine-tune top layers",
            form_help="After the head, unfreeze this many top backbone layers and train on at a low learning rate "
                      "(1e-5). Slower: the images go through the backbone every epoch."),
    Setting("train.fine_tune_epochs", "--fine-tune-epochs", "int", range=(0, 100), form_default=3,
            needs="train.fine_tune_layers", form="basic", key="train_ft_epochs", label="Fine-tune epochs"),
    Setting("train.fine_tune_learning_rate", "--fine-tune-learning-rate", "float",
            options=(1e-6, 1e-5, 1e-4, 5e-4, 1e-3, 2e-3), form="advanced", label="Fine-tuning learning rate",
            form_help="How big a step fine-tuning takes each batch: small (1e-5) so that pretrained weights are "
                      "only nudged, larger when the whole network learns from random weights."),
    Setting("train.online_augment", "--online-augment", "bool", "augment training images anew every fine-tuning epoch",
            form="advanced", label="New augmentation every epoch",
            form_help="While fine-tuning, every training image gets a new random augmentation each epoch, so the "
                      "network never sees exactly the same picture twice (the reference did not)."),
    Setting("train.threshold_rule", "--threshold-rule", "choice", choices="THRESHOLD_RULES", form="basic",
            key="train_rule", option_labels="THRESHOLD_LABELS", label="Threshold rule",
            form_help="How the decision threshold is chosen on the validation images: Youden maximises sensitivity + "
                      "specificity; the screening rule takes the highest threshold that still finds 95 % of "
                      "pneumonias; the midpoint lies halfway between the two classes' typical scores, so it moves less "
                      "when images from elsewhere score differently."),
    Setting("train.target_sensitivity", "--target-sensitivity", "float", range=(0.5, 0.99), step=0.01, form="advanced",
            label="Target sensitivity",
            form_help="For the 95 % sensitivity threshold rule only: the share of pneumonias in the validation "
                      "images that the chosen threshold must still find."),
    Setting("train.calibration", "--calibration", "choice",
            "how the probabilities are calibrated on the validation part after training: temperature (default) "
            "fixes only how sure the model is; platt also moves them to the validation part's prevalence; none",
            choices="CALIBRATIONS", form="advanced", option_labels="CALIBRATION_LABELS", label="Calibration",
            form_help="After training, the probabilities are adjusted on the validation images so that a predicted "
                      "80 % means pneumonia about four times out of five. The order of the images, and so the AUC "
                      "and the calls at the run's threshold, do not change. Temperature scaling only tempers how "
                      "sure the model is; Platt scaling also builds in how common pneumonia was in the validation "
                      "images, which is wrong for a clinic where it is rarer."),
    Setting("train.tta", "--tta", "choice",
            "test-time augmentation: average the answers over a few shifted and zoomed views of each image; auto keeps "
            "it when it raises the validation AUC (off by default)",
            choices="TTA_MODES", form="advanced", option_labels="TTA_LABELS", label="Test-time augmentation",
            form_help="At prediction the model also looks at each image shifted a little left and right and zoomed in "
                      "a little, and averages what it says; the Grad-CAM map explains that average. It evens out how "
                      "an image happens to be framed, and costs about four times the prediction time. Auto measures "
                      "both ways on the validation images at the end of training (about four extra passes over "
                      "them) and keeps the better one."),
    Setting("train.label_smoothing", "--label-smoothing", "float",
            "pull training targets towards 0.5 by this much (0-0.5)", range=(0.0, 0.45), step=0.05, widget="slider",
            form="advanced", label="Label smoothing",
            form_help="Trains on slightly softened answers (a little less than 100 % sure), so the model is less "
                      "over-confident on X-rays that look different from its training images."),
    Setting("train.warmup_epochs", "--warmup-epochs", "int", "fine-tuning epochs of linear learning-rate warm-up",
            range=(0, 100), needs="train.fine_tune_layers", form="advanced", label="Warm-up epochs",
            form_help="For this many fine-tuning epochs the learning rate starts near 0 and rises step by step, so "
                      "the first updates do not wreck the pretrained weights (at most the fine-tune epochs)."),
    Setting("train.schedule", "--schedule", "choice", "fine-tuning learning rate: constant or cosine decay",
            choices="SCHEDULES", form="advanced", label="Learning-rate schedule",
            form_help="How the fine-tuning learning rate changes over the epochs: constant keeps it, cosine lowers it "
                      "smoothly to 0 by the last epoch."),
    Setting("train.fine_tune_batchnorm", "--fine-tune-batchnorm", "bool",
            "let the unfrozen BatchNorm layers learn the X-rays' statistics while fine-tuning", form="advanced",
            label="Fine-tune BatchNorm",
            form_help="While fine-tuning, let the network's normalisation (BatchNorm) layers learn how bright and "
                      "contrasted X-rays are, instead of keeping what they learned from everyday photos."),
    Setting("train.weight_decay", "--weight-decay", "float",
            "decoupled weight decay of the optimiser (AdamW), of the head and while fine-tuning; 0 = Adam",
            options=(0.0, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.5), form="advanced", label="Weight decay",
            form_help="Pulls the weights towards zero at every step so that the model cannot lean on a few "
                      "memorised details: gently while fine-tuning (1e-4), strongly for a head on frozen features "
                      "(0.1 or more); 0 turns it off."),
    Setting("train.balance_by", "--balance-by", "str",
            "a manifest column (e.g. source_resolution) the model must not learn: training images are weighted so "
            "that it tells nothing about the label", metavar="COLUMN", form="advanced",
            label="Balance by (manifest column)",
            form_help="A column of the data set's list of images (e.g. source_resolution: which scanner or copy an "
                      "image came from) that must not help the model guess the label: images are weighted so "
                      "that it cannot. Leave empty for none."),
    # Augmentation (the Augmentation page chooses it in the app)
    Setting("augment.rotation_range", "--rotation-range", "float", "degrees (reference: 0.3)", metavar="DEG"),
    Setting("augment.width_shift", "--shift", "float",
            "maximum width and height shift, as a fraction (reference: 0.05)", also=("augment.height_shift",)),
    Setting("augment.zoom", "--zoom", "float", "maximum zoom in or out, as a fraction"),
    Setting("augment.horizontal_flip", "--no-flip", "bool", "no horizontal flips", flag_sets=False),
    Setting("augment.brightness_range", "--brightness-range", "pair",
            "multiply intensities by a factor drawn between LOW and HIGH (reference: 0.9 1.1)", metavar="LOW HIGH"),
    Setting("augment.blur", "--blur", "float", "robustness: maximum Gaussian blur sigma, in pixels", metavar="SIGMA"),
    Setting("augment.downscale", "--downscale", "float", "robustness: maximum loss of resolution, as a fraction"),
    Setting("augment.jpeg_quality", "--jpeg-quality", "int",
            "robustness: lowest JPEG re-compression quality (0 = off)", metavar="Q"),
    Setting("augment.contrast", "--contrast", "float", "robustness: maximum change of contrast, as a fraction"),
    Setting("augment.gamma", "--gamma", "float", "robustness: maximum change of gamma (log of the exponent)"),
    Setting("augment.noise", "--noise", "float",
            "robustness: maximum standard deviation of added Gaussian noise, in grey levels", metavar="SD"),
    # Where and how it runs (command line only)
    Setting("train.cache_dir", "--cache-dir", "path",
            "feature cache (default: $CXR_CACHE_DIR or ~/.cache/cxr-workbench/features)", metavar="DIR"),
    Setting("train.export_litert", "--export-litert", "bool",
            "also write model.tflite for TensorFlow-free prediction (default: yes)"),
    Setting("train.distribute", "--distribute", "choice",
            "auto (default): mirrored when more than one GPU is visible, else off; mirrored: one replica per local "
            "GPU (or per --cpu-replicas CPU device); multi-worker: the machines named by TF_CONFIG, each running this "
            "same command with the same --out and --cache-dir on shared storage. With several replicas, "
            + LEARNING_RATE_RULE,
            choices="DISTRIBUTE_MODES"),
    Setting("train.precision", "--precision", "choice",
            "auto (default): mixed float16 on GPUs of compute capability 7.0 or newer, else float32; mixed needs a "
            "GPU (the logits stay float32)", choices="PRECISIONS"),
    Setting("train.cpu_replicas", "--cpu-replicas", "int",
            "split the CPU into N logical devices so that mirrored trains N replicas (for teaching and tests; no "
            "faster than one device)"),
)

#: Config fields that are not settings of a run, with the reason.
NOT_SETTINGS: dict[str, str] = {
    "data.data_dir": "the data set, not a choice of how to train: --data and the Dataset page give it",
    "train.recipe": "records the recipe the settings started from: --recipe and the Recipe choice set it",
    "train.restore_best": "always on for people; benchmarks turn it off to keep the last epoch as the reference did",
}


def find(name: str) -> Setting:
    """The row that sets ``name`` (``section.field``)."""
    for row in SETTINGS:
        if name in row.fields:
            return row
    raise BadSettingError(f"There is no training setting {name!r}; see cxr_core.core.settings.")


def setting_fields() -> set[str]:
    """Every ``section.field`` that a row sets."""
    return {name for row in SETTINGS for name in row.fields}


def config_fields() -> set[str]:
    """Every ``section.field`` of ``RunConfig``."""
    config = RunConfig()
    return {f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(config, s))}


def cli_rows() -> tuple[Setting, ...]:
    """The rows with a command-line flag, in the help's order."""
    return tuple(row for row in SETTINGS if row.flag)


def form_rows(level: str) -> tuple[Setting, ...]:
    """The rows the Training form shows at ``level`` (``basic`` or ``advanced``)."""
    if level not in FORM_LEVELS:
        raise BadSettingError(f"A form level is one of {', '.join(FORM_LEVELS)}; got {level!r}.")
    return tuple(row for row in SETTINGS if row.form == level)


def config_from_values(base: RunConfig, values: Mapping[str, Any]) -> RunConfig:
    """``base`` with ``values`` (setting name -> value; every one given, None included) applied, as a config of
    this version. Each section is made once, so a combination is checked as a whole.

    Raises:
        BadSettingError: an unknown setting, or values the config refuses (one sentence).
    """
    changes: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for name, value in values.items():
        for target in find(name).fields:
            section, field_name = target.split(".")
            changes[section][field_name] = value
    try:
        sections = {s: dataclasses.replace(getattr(base, s), **changes[s]) for s in SECTIONS}
    except BadSettingError:
        raise
    except (TypeError, ValueError) as error:  # a section rejected a combination the flags allowed
        raise BadSettingError(str(error)) from error
    return RunConfig(**sections)


def values_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on a command line (a flag not given is left out, so the base's value wins)."""
    given = {row.name: row.value_from_args(args) for row in cli_rows()}
    return {name: value for name, value in given.items() if value is not NOT_GIVEN}


# --- the Training form ------------------------------------------------------------------------
# The rows of each level as the table stands at import (``form_rows`` reads it when called).
FORM_BASIC = form_rows("basic")
FORM_ADVANCED = form_rows("advanced")


def form_values(config: RunConfig, level: str, **context: Any) -> dict[str, Any]:
    """Session key -> widget value for the rows at ``level``, from ``config`` (a recipe's, a running run's)."""
    values = {}
    for row in form_rows(level):
        section, field_name = row.name.split(".")
        values[row.session_key(**context)] = row.to_widget(getattr(getattr(config, section), field_name), **context)
    return values


def values_from_state(state: Mapping[str, Any], level: str, **context: Any) -> dict[str, Any]:
    """Setting name -> widget value for the rows at ``level`` whose widget is in ``state`` (the session)."""
    keys = {row.name: row.session_key(**context) for row in form_rows(level)}
    return {name: state[key] for name, key in keys.items() if key in state}


def apply_form_values(config: RunConfig, values: Mapping[str, Any]) -> RunConfig:
    """``config`` with the form's widget values (setting name -> value) applied: 0 for "all" images becomes None,
    numbers take their type, and a setting whose ``needs`` is off takes the config's default (fine-tune epochs
    without fine-tuned layers are 0)."""
    settings = {name: find(name).from_widget(value) for name, value in values.items()}
    for name in list(settings):
        row = find(name)
        if row.needs is not None:
            section, field_name = row.needs.split(".")
            if not settings.get(row.needs, getattr(getattr(config, section), field_name)):
                settings[name] = row.default
    return config_from_values(config, settings)


# --- recipes -----------------------------------------------------------------------------------
def check_recipe(recipe: Recipe) -> None:
    """A recipe sets only training settings: fields that a row of the table sets.

    Raises:
        BadSettingError: one sentence naming the recipe and the field that no setting sets.
    """
    known = setting_fields()
    for section, values in recipe.settings.items():
        for field_name in values:
            if f"{section}.{field_name}" not in known:
                raise BadSettingError(f"The recipe {recipe.name!r} sets {section}.{field_name}, which is not a "
                                      "training setting (see cxr_core.core.settings).")


# Checked on import: a recipe naming a field that no setting sets (a typo, a field renamed) would be silently wrong.
for _recipe in RECIPES.values():
    check_recipe(_recipe)


# --- the README -------------------------------------------------------------------------------
README_WIDTH = 116


def readme_usage() -> str:
    """The ``python -m cxr_core train ...`` lines of the README (indented as its code block)."""
    units = ["python -m cxr_core train --data DIR", "[--config FILE]", f"[--recipe {'|'.join(RECIPE_NAMES)}]",
             "[--out DIR]", *(row.usage() for row in cli_rows()), "[-v]"]
    lines = ["    " + units[0]]
    for unit in units[1:]:  # a bracket is never split over two lines
        if len(lines[-1]) + 1 + len(unit) > README_WIDTH:
            lines.append("        " + unit)
        else:
            lines[-1] += " " + unit
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m cxr_core.core.settings --readme``: print the README's usage block."""
    parser = argparse.ArgumentParser(prog="python -m cxr_core.core.settings", description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true", help="print the README's usage block of train")
    args = parser.parse_args(argv)
    if args.readme:
        sys.stdout.write(readme_usage())
    else:
        parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
