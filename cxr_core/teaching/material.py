"""What a lesson step shows from the learner's own data and runs: the numbers behind its figures, the external
test set to use, and the model card the learner fills in. Pure Python; the Lessons page draws it."""
from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_core.core.metrics import calibration_bins, threshold_sweep
from cxr_core.runs.run_folder import RunFolder
from cxr_core.teaching.checks import RunInfo, describe, matches, metric, setting_label, show_value

#: Words in a data set's folder name that say it is a test set kept apart (preferred as the external set).
TEST_WORDS = ("test", "external", "holdout")


def datasets_under(data_root: str | os.PathLike | None) -> list[str]:
    """The data set folders directly under the data root (as the Dataset page lists them)."""
    if data_root is None or not Path(data_root).is_dir():
        return []
    return sorted(p.name for p in Path(data_root).iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def external_dataset(data_root: str | os.PathLike | None, exclude: Iterable[str] = ()) -> str | None:
    """The data set to use as the external test set: another folder than ``exclude`` (the one trained on), one
    whose name says it is a test set when there is one, else the first other one; None when there is none."""
    left_out = {Path(str(name)).name for name in exclude if name}
    others = [name for name in datasets_under(data_root) if name not in left_out]
    for word in TEST_WORDS:
        named = [name for name in others if word in name.lower()]
        if named:
            return named[0]
    return others[0] if others else None


def pick_run(runs: list[RunInfo], wanted: Mapping[str, Any] | None = None, *, external: bool = False) -> RunInfo | None:
    """The learner's newest finished run with ``wanted``'s settings (one evaluated externally, when asked and
    there is one)."""
    found = [r for r in runs if r.finished and matches(r, wanted)]
    if external:
        found = [r for r in found if r.external()] or found
    return found[0] if found else None


def runs_rows(runs: list[RunInfo], settings: Iterable[str] = ()) -> pd.DataFrame:
    """One row per finished run: its name, the named settings, and its figures inside and outside its data."""
    rows = []
    for run in (r for r in runs if r.finished):
        row = {"run": run.name}
        for name in settings:
            row[setting_label(name).removeprefix("the ")] = show_value(name, run.settings.get(name))
        row["test AUC (own split)"] = metric(run, "internal.roc_auc")
        row["sensitivity (own split)"] = metric(run, "internal.sensitivity")
        row["specificity (own split)"] = metric(run, "internal.specificity")
        external = run.external()
        row["external set"] = external[0].name if external else ""
        row["external AUC"] = metric(run, "external.roc_auc")
        rows.append(row)
    return pd.DataFrame(rows)


def _test_predictions(run: RunInfo) -> pd.DataFrame:
    preds = RunFolder(run.path).read_predictions()
    if "split" in preds.columns:
        preds = preds[preds["split"] == "test"]
    return preds.dropna(subset=["y", "probability"])


def threshold_curve(run: RunInfo, points: int = 101) -> pd.DataFrame | None:
    """Sensitivity and specificity on the run's own test part at thresholds from 0 to 1 (None without both
    classes there)."""
    preds = _test_predictions(run)
    y = (preds["y"].astype(int) > 0).astype(int).to_numpy()
    if len(np.unique(y)) < 2:
        return None
    return threshold_sweep(y, preds["probability"].astype(float).to_numpy(), np.linspace(0.0, 1.0, points))


def calibration_points(run: RunInfo) -> tuple[str, dict] | None:
    """Calibration bins of the run's newest external evaluation, else of its own test part: (where, bins)."""
    folder = RunFolder(run.path)
    for result in run.external():
        preds = folder.read_evaluation_predictions(result.name).dropna(subset=["y", "probability"])
        if len(preds):
            return result.name, calibration_bins(preds["y"].astype(int).to_numpy(), preds["probability"].astype(float))
    preds = _test_predictions(run)
    if preds.empty:
        return None
    return "its own test part", calibration_bins((preds["y"].astype(int) > 0).astype(int).to_numpy(),
                                                 preds["probability"].astype(float).to_numpy())


def _brier(run: RunInfo) -> float | None:
    return metric(run, "external.brier") if run.external() else metric(run, "internal.brier")


def external_summary(run: RunInfo) -> dict[str, Any] | None:
    """The run's honest figures: its newest external evaluation with 95 % intervals of sensitivity and
    specificity (None when it has none)."""
    found = run.external()
    if not found:
        return None
    result = found[0]
    return {"dataset": result.name, "n": result.n, "roc_auc": result.roc_auc, "accuracy": result.accuracy,
            "sensitivity": result.sensitivity, "specificity": result.specificity, "threshold": result.threshold,
            "brier": result.figures.get("brier"), "intervals": result.intervals}


#: The model card's fields: (key, label, help). The learner writes the ones without a value from the run.
CARD_FIELDS = (
    ("intended_use", "Intended use", "Who would use this model, on which images, for what decision?"),
    ("not_for", "Not for", "Where it must not be used (another age group, another hospital's images, diagnosis)."),
    ("data", "Training data", "Which images, how many, from where; how they were split."),
    ("external", "External result", "The score on a test set from outside its data, with its interval."),
    ("calibration", "Calibration", "Does a predicted 80 % mean pneumonia four times out of five?"),
    ("failures", "Failures seen", "What the misclassified images and their Grad-CAM maps showed."),
    ("limitations", "Limitations", "What could make the figures wrong on new images (shortcuts, prevalence, size)."),
)


def card_defaults(run: RunInfo | None) -> dict[str, str]:
    """Starting text of the model card from the learner's run: its data, its external score with intervals,
    its calibration; the rest is left for the learner to write."""
    if run is None:
        return {key: "" for key, _, _ in CARD_FIELDS}
    settings = run.settings
    split_counts = run.metrics.split_counts
    parts = ", ".join(f"{k} {v}" for k, v in split_counts.items() if isinstance(v, (int, float)))
    balance = describe({"train.balance": settings.get("train.balance")})
    n_images = "?" if run.metrics.n_images is None else run.metrics.n_images
    data = (f"{Path(str(settings.get('data.data_dir') or '?')).name}: {n_images} images, "
            f"{settings.get('data.split')} split" + (f" ({parts})" if parts else "") + f"; {balance}.")
    found = external_summary(run)
    if found:
        spread = "; ".join(f"{name} {low:.2f}–{high:.2f}" for name, (low, high) in found["intervals"].items())
        external = (f"{found['dataset']} ({found['n']} images, none from training): ROC AUC "
                    f"{_number(found['roc_auc'])}, sensitivity {_number(found['sensitivity'])}, specificity "
                    f"{_number(found['specificity'])} at threshold {_number(found['threshold'])}"
                    + (f" (95 % intervals: {spread})" if spread else "") + ".")
    else:
        external = "Not evaluated on an external test set yet."
    brier = _brier(run)
    calibration = f"Brier score {brier:.3f} (0 is perfect, 0.25 is always answering 50 %)." if brier is not None else ""
    return {"intended_use": "", "not_for": "", "data": data, "external": external, "calibration": calibration,
            "failures": "", "limitations": ""}


def _number(value: Any) -> str:
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return "–"


def model_card(values: Mapping[str, str], run: RunInfo | None, author: str = "") -> str:
    """The model card as Markdown: the run's facts and the learner's text, field by field."""
    title = f"Model card: {run.name}" if run is not None else "Model card"
    lines = [f"# {title}", ""]
    if run is not None:
        s = run.settings
        lines += [f"- Run: `{run.name}`",
                  f"- Backbone: {s.get('model.backbone')} (width {s.get('model.alpha')}), "
                  f"{s.get('model.image_size') or 'default'} px, weights {Path(str(s.get('model.weights'))).name}",
                  f"- Recipe: {s.get('train.recipe') or 'own settings'}; "
                  f"threshold rule {s.get('train.threshold_rule')} "
                  f"(threshold {_number(run.metrics.threshold)}, chosen on validation)",
                  f"- Own test part: ROC AUC {_number(metric(run, 'internal.roc_auc'))} (optimistic: same "
                  "hospital, scanners and preparation as training)", ""]
    for key, label, _ in CARD_FIELDS:
        text = str(values.get(key) or "").strip() or "_(not written)_"
        lines += [f"## {label}", "", text, ""]
    stamp = _dt.date.today().isoformat()
    lines += ["---", f"Written {stamp}" + (f" by {author}" if author else "") + " with the chest X-ray workbench. "
              "A teaching exercise, not a medical device: not for diagnosis."]
    return "\n".join(lines) + "\n"



#: The second practice set: made-up patients the first one does not have, to serve as an external test set.
PRACTICE_TEST_FOLDER = "SYNTHETIC-practice-external-test"


def make_practice_pair(data_root: str | os.PathLike) -> tuple[Path, Path]:
    """The synthetic practice set (as the Dataset page makes it) and a second, smaller one drawn with another
    seed, whose name says it is a test set, so that every lesson runs offline."""
    from cxr_core.data import practice  # noqa: PLC0415 (draws images: only when asked)

    first = practice.make_practice_dataset(data_root)
    second = practice.make_practice_dataset(Path(data_root) / PRACTICE_TEST_FOLDER, n_normal=40, n_pneumonia=80,
                                            seed=7)
    return first, second
