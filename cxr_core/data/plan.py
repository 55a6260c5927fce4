"""What a run will train on, and how long it will take, before any network is built.

``plan_run(config, manifest)`` is the single answer to "which images go where": the ``limit``
subset, the split, the balance plan and the augmented NORMAL rows. Training follows it, and the
Augmentation and Training pages show its numbers, so the page and the run can never disagree.
No TensorFlow here: the pages call it on every rerun.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from cxr_core.core.backbones import get_backbone
from cxr_core.core.config import RunConfig
from cxr_core.core.errors import BadDatasetError, BadSettingError
from cxr_core.core.labels import SPLITS, classes_for
from cxr_core.core.recipes import RECIPES
from cxr_core.data import augment, scan as data
from cxr_core.io import weights


def check_can_learn(config: RunConfig, audience: str = "cli") -> None:
    """Refuse a run that cannot learn: a randomly initialised backbone that stays frozen turns every
    X-ray into random features, and such runs used to end at a test AUC of 0.500. ``audience`` (who
    asks: "cli", "app" or "visitor") picks how the advice names the settings.

    Raises:
        BadSettingError: one sentence with the two ways out.
    """
    model, train = config.model, config.train
    frozen = train.fine_tune_layers == 0 or train.fine_tune_epochs <= 0
    if (model.weights or "none").strip().lower() == "none" and frozen:
        how = "--fine-tune-layers -1 with --fine-tune-epochs 1 or more" if audience == "cli" else (
            "Fine-tune top layers: all layers, with at least one fine-tune epoch")
        raise BadSettingError(
            "A backbone with random weights cannot learn while it stays frozen; start from ImageNet weights or a "
            f"weights file, or train the whole network ({how}).")


def preflight(config: RunConfig, probe=None, audience: str = "cli") -> str:
    """Every check a run must pass before it starts (the CLI, the Training page and ``train`` call it).

    Returns how the starting weights will be had (see ``weights.check_weights``); ``audience`` (who asks:
    "cli", "app" or a hosted app's "visitor") picks how the advice names the choices.

    Raises:
        BadSettingError: one sentence saying what to change.
    """
    check_can_learn(config, audience)
    model = config.model
    kwargs = {"probe": probe} if probe is not None else {}
    return weights.check_weights(model.backbone, model.weights, model.alpha, model.resolved_image_size,
                                 audience=audience, **kwargs)


# Columns every scan makes; a data set's own manifest.csv adds the others (see data.scan_dataset).
_SCAN_COLUMNS = set(data.MANIFEST_COLUMNS)


@dataclass(frozen=True)
class RunPlan:
    """The images of a run before training.

    Attributes:
        rows: every image with ``split`` (train/val/test), ``augment_seed`` (-1 for an original)
            and ``is_augmented``; the augmented rows come last, in the training part only. ``y`` and
            ``label`` are the task's classes (``data.task_labels``).
        balance: the balance plan of the training part.
        n_images: original images used (after ``limit``).
        counts: originals per part and class: ``{"train": {"NORMAL": n, "PNEUMONIA": n}, ...}``
            (NORMAL, BACTERIA and VIRUS for the subtype task).
        balance_by: the manifest column whose values are weighted out of the label (see
            ``TrainConfig.balance_by``), or "" when none applies.
        notes: sentences for the person about choices that could not apply to this data set.
    """

    rows: pd.DataFrame
    balance: augment.BalancePlan
    n_images: int
    counts: dict[str, dict[str, int]]
    balance_by: str = ""
    notes: tuple[str, ...] = ()

    @property
    def n_train(self) -> int:
        """Training rows, augmented ones included."""
        return int((self.rows["split"] == "train").sum())

    def describe(self) -> str:
        """One line: train (augmented), val and test sizes."""
        parts = self.rows["split"]
        return (f"train {self.n_train} (of which {self.balance.n_extra} augmented), "
                f"val {int((parts == 'val').sum())}, test {int((parts == 'test').sum())}")


def plan_run(config: RunConfig, manifest: pd.DataFrame) -> RunPlan:
    """Subset, split and balance ``manifest`` exactly as training will.

    Args:
        config: the run's settings (data: task, limit, split, seed, fractions; train: balance, seed).
        manifest: ``data.scan_dataset(...).manifest``.

    Returns:
        The plan.

    Raises:
        BadDatasetError: one sentence when the data cannot be split or balanced, or (for the subtype
            task) when some images carry no subtype.
    """
    task = config.data.task
    classes = classes_for(task)
    manifest = data.task_labels(manifest, task)
    column = config.train.balance_by
    notes: list[str] = []
    if column and (column not in manifest.columns or manifest[column].isna().all()):
        recipe = RECIPES.get(config.train.recipe)
        if recipe is not None and recipe.settings.get("train", {}).get("balance_by") == column:
            # A recipe balances by a column when the data set has it; a person who asked for it is told.
            notes.append(f"The data set has no {column} column, so the {recipe.name} recipe trains without "
                         "balancing by it.")
            column = ""
        else:
            extra = [c for c in manifest.columns if c not in _SCAN_COLUMNS]
            raise BadDatasetError(
                f"The data set has no column {column!r} to balance by; "
                + (f"its manifest.csv has {', '.join(extra)}." if extra else "add a manifest.csv that has it."))
    if config.data.limit is not None and config.data.limit < len(manifest):
        manifest = data.stratified_subset(manifest, config.data.limit, seed=config.data.seed, task=task)
    split = data.make_split(
        manifest, mode=config.data.split, seed=config.data.seed,
        val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction, task=task,
    )
    train_part = split[split["split"] == "train"]
    balance = augment.balance_plan(train_part["label"].tolist(), config.train.balance, classes)
    rows = augment.with_augmented_rows(split, balance.n_extra, seed=config.train.seed, per_class=balance.extra)
    counts = {
        part: {label: int(((split["split"] == part) & (split["label"] == label)).sum()) for label in classes}
        for part in SPLITS
    }
    return RunPlan(rows=rows, balance=balance, n_images=int(len(split)), counts=counts, balance_by=column,
                   notes=tuple(notes))


def estimate_seconds(config: RunConfig, n_images: int, cached_fraction: float = 0.0) -> float:
    """A rough duration of a run on a 2-core CPU, for the Training page.

    Args:
        config: the run's settings.
        n_images: images in the data set (after ``limit``), before balancing.
        cached_fraction: share of the features already in the cache (0..1).

    Returns:
        Estimated seconds.
    """
    spec = get_backbone(config.model.backbone)
    speed = spec.throughput_at(config.model.resolved_image_size, config.model.alpha)
    n_train = n_images * (1 - config.data.val_fraction - config.data.test_fraction)
    extra = 0.0
    if config.train.balance == "augment":
        # Kermany is about 27:73, so balancing adds about 46% of the training part.
        extra = 0.46 * n_train
    seconds = 5.0
    if config.train.export_litert:
        seconds += spec.export_seconds
    if config.train.epochs:
        seconds += (n_images + extra) * (1 - cached_fraction) / speed + 0.3 * config.train.epochs
    if config.train.fine_tune_epochs and config.train.fine_tune_layers:
        # Training passes cost about three forward passes; validation and test are predicted each time.
        per_epoch = (n_train + extra) * 3 / speed + n_images * 0.1 / speed
        seconds += per_epoch * config.train.fine_tune_epochs + n_images * 0.2 / speed
    return float(seconds)
