"""What a lesson's action does in the app: the settings it names go into the target page's widgets and the
shared choices, then that page opens.

A page's widgets take a value from the URL only when a session first draws them; after that the session's own
value wins (Streamlit's rule for ``bind="query-params"``), so a link alone could not change a setting the
learner already touched. The action therefore writes the session values the page reads (its widget keys and
the shared choices of ``pages.ui.session``) and switches page; the page's bound widgets then put the settings
into its URL themselves, so a reload or a copied link keeps them. The widget keys are spelt here as the pages
spell them (tests/test_lessons.py checks each against the page's source).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cxr_core.core.backbones import BACKBONES
from cxr_core.core.settings import form_values
from cxr_core.hosting.classroom import LOCKED_SENTENCE
from cxr_core.teaching import material
from cxr_core.teaching.checks import RunInfo, describe
from cxr_core.teaching.lessons import Action, action_config
from pages.ui import datasets
from pages.ui.session import KEY_AUGMENT, KEY_BALANCE, KEY_DATASET, KEY_LIMIT, KEY_RECIPE, KEY_RUN, KEY_SPLIT

PAGE_FILES = {"home": "pages/home.py", "lessons": "pages/lessons.py", "dataset": "pages/dataset.py",
              "augmentation": "pages/augmentation.py", "training": "pages/training.py",
              "evaluation": "pages/evaluation.py", "predict": "pages/predict.py"}
#: Each page's widget keys, as the page spells them.
WIDGET_KEYS = {
    "pages/dataset.py": ("dataset_choice", "dataset_split_mode"),
    "pages/augmentation.py": ("aug_balance",),
    "pages/training.py": ("train_split", "train_balance", "train_backbone", "train_dropout", "train_epochs",
                          "train_batch", "train_lr", "train_ft_layers", "train_ft_epochs", "train_rule", "train_task",
                          "train_alpha_free", "train_size_"),
    "pages/evaluation.py": ("eval_run", "eval_other_dataset", "eval_other_limit"),
    "pages/predict.py": ("predict_run",),
}
#: A RunConfig setting -> the Training page's widget that shows it.
TRAINING_WIDGETS = {"model.backbone": "train_backbone", "model.dropout": "train_dropout",
                    "train.epochs": "train_epochs", "train.batch_size": "train_batch",
                    "train.learning_rate": "train_lr",
                    "train.fine_tune_layers": "train_ft_layers", "train.fine_tune_epochs": "train_ft_epochs",
                    "train.threshold_rule": "train_rule", "data.task": "train_task"}
#: What a recipe fills in on the Training page (every setting the form shows).
FORM_SETTINGS = (*TRAINING_WIDGETS, "data.split", "data.limit", "train.balance", "model.image_size", "augment")
AUGMENTATION_WIDGET_PREFIX = "aug_"  # the Augmentation page's sliders: dropped so they take the new values


@dataclasses.dataclass(frozen=True)
class Prepared:
    """An action made concrete for this learner: the page file, the session values to set, the widget keys
    to drop (they take the new values when drawn), and a sentence when it cannot be done yet."""

    page: str
    state: dict[str, Any]
    drop_prefixes: tuple[str, ...] = ()
    problem: str | None = None


def prepare(action: Action, runs: list[RunInfo], data_root: Path | None, current: Mapping[str, Any]) -> Prepared:
    """The session values ``action`` stands for. ``current`` is the session state (the learner's backbone
    and data set when the action leaves them alone)."""
    settings = dict(action.settings)
    state: dict[str, Any] = {}
    if "dataset" in settings:
        if datasets.hides(settings["dataset"]):
            return Prepared(page=PAGE_FILES[action.page], state={}, problem=LOCKED_SENTENCE)
        state[KEY_DATASET] = state["dataset_choice"] = settings["dataset"]
    drop: tuple[str, ...] = ()
    if any(n.partition(".")[0] in ("data", "augment", "model", "train") for n in settings):
        drop = _run_settings(settings, current, state)
    problem = _run_and_data_set(settings, runs, data_root, current, state)
    if "evaluate_limit" in settings:
        state["eval_other_limit"] = int(settings["evaluate_limit"])
    return Prepared(page=PAGE_FILES[action.page], state=state, drop_prefixes=drop, problem=problem)


def _run_settings(settings: dict[str, Any], current: Mapping[str, Any], state: dict[str, Any]) -> tuple[str, ...]:
    """The run settings into the Training page's widgets and the shared choices; returns the widget key prefixes
    to drop (the Augmentation page's sliders, which then take the new augmentation)."""
    config = action_config(settings)
    named = {n for n in settings if n.partition(".")[0] in ("data", "augment", "model", "train")}
    if settings.get("train.recipe"):  # a recipe fills in every setting the form shows, its advanced ones too
        named |= set(FORM_SETTINGS)
        state[KEY_RECIPE] = settings["train.recipe"]
        state.update(form_values(config, "advanced"))
    backbone = config.model.backbone if "model.backbone" in settings else current.get("train_backbone")
    backbone = backbone if backbone in BACKBONES else config.model.backbone
    for name, key in TRAINING_WIDGETS.items():
        if name in named:
            section, field = name.split(".")
            state[key] = getattr(getattr(config, section), field)
    if "data.split" in named:
        state[KEY_SPLIT] = state["train_split"] = state["dataset_split_mode"] = config.data.split
    if "train.balance" in named:
        state[KEY_BALANCE] = state["train_balance"] = state["aug_balance"] = config.train.balance
    if "data.limit" in named:
        state[KEY_LIMIT] = config.data.limit or 0
    if "model.image_size" in named or "model.backbone" in named:
        state[f"train_size_{backbone}"] = config.model.image_size or BACKBONES[backbone].default_size
    if "model.alpha" in named:
        state["train_alpha_free"] = config.model.alpha
    if "augment" in named or any(n.startswith("augment.") for n in named):
        state[KEY_AUGMENT] = dataclasses.asdict(config.augment)
        return (AUGMENTATION_WIDGET_PREFIX,)
    return ()


def _run_and_data_set(settings: dict[str, Any], runs: list[RunInfo], data_root: Path | None,
                      current: Mapping[str, Any], state: dict[str, Any]) -> str | None:
    """The learner's run and the data set to evaluate it on; a sentence when either is not there yet."""
    if "run" in settings:
        run = material.pick_run(runs, settings["run"])
        if run is None:
            return f"No finished run with {describe(settings['run'])} yet: train it first (an earlier step)."
        state[KEY_RUN] = state["eval_run"] = state["predict_run"] = str(run.path)
    if "evaluate_on" not in settings:
        return None
    wanted = settings["evaluate_on"]
    chosen = next((r for r in runs if str(r.path) == state.get(KEY_RUN)), None)
    trained_on = Path(str(chosen.settings.get("data.data_dir") or "")).name if chosen is not None else None
    if wanted == "auto":
        wanted = material.external_dataset(data_root, exclude=[state.get(KEY_DATASET) or current.get(KEY_DATASET),
                                                               trained_on, *datasets.hidden_names()])
    elif wanted == "training":
        wanted = trained_on
    if wanted and datasets.hides(wanted):
        return LOCKED_SENTENCE
    if not wanted or wanted not in material.datasets_under(data_root):
        if settings["evaluate_on"] == "auto":
            return ("There is no other data set under the data folder to use as an external test set; ask the "
                    "operator to add one (the Lessons page offers a practice test set).")
        return f"The data set {wanted or 'of that run'} is not under the data folder."
    state["eval_other_dataset"] = wanted
    return None
