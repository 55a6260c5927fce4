"""An ensemble run: several finished runs combined into one model whose probability is the mean of theirs.

``make_ensemble([run, run, ...])`` writes a new run folder that works everywhere a trained run does
(``Predictor`` on both engines, the command line, the pages, Grad-CAM):

    config.json       the first member's settings with ``train.recipe = "ensemble"``
    members.json      the member run folders (``RunFolder.write_members``)
    predictions.csv   the members' validation and test probabilities, averaged per image
    metrics.json      the threshold chosen on the averaged validation probabilities; test metrics
    split.csv         the members' split, with every image any member trained on in "train"
    model.keras       one Keras model: image -> each member -> logit of the mean probability
    model.tflite      its LiteRT export (logit and the combined Grad-CAM maps of both classes)

The threshold must come from images none of the members trained on, so the members must share one
split: the same validation and test images (their ``predictions.csv``), and none of those images
in any member's training part, and they must be pneumonia runs (runs of the subtype task are refused).
Members may have different backbones as long as they take the same
image size; their Grad-CAM maps are combined on the largest grid (see ``model.EnsembleGradcamParts``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_core.core.errors import BadRunError, BadSettingError, CxrError
from cxr_core.core.labels import THRESHOLD_RULES
from cxr_core.core.metrics import binary_metrics, metrics_report
from cxr_core.runs import registry as runs
from cxr_core.runs.run_folder import RunFolder, RunState

log = logging.getLogger(__name__)

RECIPE = "ensemble"
EVALUATED_SPLITS = ("val", "test")


def _names(folders: list[RunFolder]) -> str:
    names = [f.name for f in folders]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else (names[0] if names else "none")


def _check_members(folders: list[RunFolder]) -> list:
    """Each member's RunConfig, after checking that every member is a finished, single run."""
    if len(folders) < 2:
        raise BadSettingError(
            f"An ensemble needs at least two finished runs; got {len(folders)} ({_names(folders)})."
        )
    seen: dict[Path, RunFolder] = {}
    for folder in folders:
        key = folder.path.expanduser().resolve()
        if key in seen:
            raise BadSettingError(f"The run {folder.name} is listed twice; an ensemble needs different runs.")
        seen[key] = folder
    configs = []
    for folder in folders:
        config = folder.read_config()  # BadRunError with one sentence when missing or damaged
        state = runs.run_status(folder.path).state
        if state is not RunState.DONE or not folder.has_model():
            raise BadRunError(
                f"The run {folder.name} is not finished (its state is {state}); "
                "an ensemble combines finished runs only."
            )
        if folder.is_ensemble() or config.train.recipe == RECIPE:
            raise BadSettingError(
                f"The run {folder.name} is itself an ensemble; list its member runs instead."
            )
        configs.append(config)
    tasks = [config.data.task for config in configs]
    if len(set(tasks)) > 1:
        other = next(i for i, task in enumerate(tasks) if task != tasks[0])
        raise BadSettingError(
            f"The runs {folders[0].name} ({tasks[0]}) and {folders[other].name} ({tasks[other]}) were trained "
            "for different tasks; an ensemble combines runs of one task."
        )
    if tasks[0] != "pneumonia":
        raise BadSettingError(
            f"The runs {_names(folders)} were trained for the {tasks[0]} task; an ensemble combines "
            "pneumonia runs only (normal against pneumonia)."
        )
    return configs


def _evaluated_rows(folder: RunFolder) -> pd.DataFrame:
    """A member's validation and test predictions, one row per image."""
    frame = folder.read_predictions()
    if not {"path", "y", "probability", "split"} <= set(frame.columns) or not len(frame):
        raise BadRunError(
            f"The run {folder.name} has no validation predictions (predictions.csv), "
            "so the ensemble's threshold could not be chosen."
        )
    frame = frame[frame["split"].isin(EVALUATED_SPLITS)].drop_duplicates("path")
    return frame.assign(path=frame["path"].astype(str)).reset_index(drop=True)


def _average_predictions(folders: list[RunFolder]) -> pd.DataFrame:
    """The first member's validation and test rows with the members' mean probability.

    Raises:
        BadSettingError: when the members were validated or tested on different images, or when one
            of them trained on an image another was validated or tested on.
    """
    frames = [_evaluated_rows(f) for f in folders]
    first = frames[0]
    if not (first["split"] == "val").any():
        raise BadRunError(
            f"The run {folders[0].name} has no validation images in predictions.csv, "
            "so the ensemble's threshold could not be chosen."
        )
    parts = dict(zip(first["path"], first["split"]))
    for folder, frame in zip(folders[1:], frames[1:]):
        if dict(zip(frame["path"], frame["split"])) != parts:
            raise BadSettingError(
                f"The runs {folders[0].name} and {folder.name} were validated and tested on different images, "
                "so the ensemble's threshold would not come from images none of them trained on; "
                "combine runs trained on the same split."
            )
    for folder in folders:
        split = folder.read_split()
        if {"path", "split"} <= set(split.columns):
            trained = set(split.loc[split["split"] == "train", "path"].astype(str))
            leaked = trained & set(parts)
            if leaked:
                raise BadSettingError(
                    f"The run {folder.name} trained on {len(leaked)} of the images the ensemble is validated "
                    "and tested on, so its threshold and test figures would not be honest."
                )
    probabilities = np.mean(
        [frame.set_index("path")["probability"].reindex(first["path"]).to_numpy(np.float64) for frame in frames],
        axis=0,
    )
    return first.assign(probability=probabilities)


def _union_split(folders: list[RunFolder]) -> pd.DataFrame | None:
    """The members' split.csv rows, one per path; an image any member trained on is in "train"."""
    frames = [f.read_split() for f in folders]
    frames = [frame for frame in frames if {"path", "split"} <= set(frame.columns) and len(frame)]
    if not frames:
        return None
    rows = pd.concat(frames, ignore_index=True)
    trained = set(rows.loc[rows["split"] == "train", "path"].astype(str))
    rows = rows.drop_duplicates("path", keep="first").reset_index(drop=True)
    rows.loc[rows["path"].astype(str).isin(trained), "split"] = "train"
    return rows


def _metrics(folders: list[RunFolder], configs: list, evaluated: pd.DataFrame, rule: str) -> dict:
    val = evaluated[evaluated["split"] == "val"]
    test = evaluated[evaluated["split"] == "test"]
    metrics = metrics_report(
        val["y"].to_numpy(), val["probability"].to_numpy(),
        test["y"].to_numpy(), test["probability"].to_numpy(),
        rule=rule, target_sensitivity=configs[0].train.target_sensitivity,
    )
    first = folders[0].metrics()
    for key in ("n_images", "n_augmented", "split_counts", "n_patients_test", "layout"):
        if first is not None and key in first.raw:  # copied as the member wrote them
            metrics[key] = first.raw[key]
    members = []
    for folder, config in zip(folders, configs):
        rows = _evaluated_rows(folder).set_index("path").reindex(evaluated["path"])
        threshold = folder.read_threshold()
        entry = {"run": folder.name, "path": str(folder.path.resolve()), "backbone": config.model.backbone,
                 "threshold": threshold}
        for part in EVALUATED_SPLITS:
            mask = (evaluated["split"] == part).to_numpy()
            if mask.any():
                entry[part] = binary_metrics(evaluated["y"].to_numpy()[mask],
                                             rows["probability"].to_numpy(np.float64)[mask], threshold)
        members.append(entry)
    metrics["members"] = members
    return metrics


def make_ensemble(
    member_dirs: list,
    out_dir: str | os.PathLike | None = None,
    threshold_rule: str | None = None,
) -> Path:
    """Combine finished runs into one ensemble run whose probability is the mean of theirs.

    Args:
        member_dirs: two or more finished run folders (status done, with ``model.keras``) that take
            the same image size and share one split (the same validation and test images).
        out_dir: the new run folder (created; must not hold a run yet); by default a new folder under
            ``runs.runs_root()``.
        threshold_rule: ``youden`` or ``sensitivity``; by default the first member's rule.

    Returns:
        the new run folder (status done).

    Raises:
        BadSettingError: fewer than two runs, a run listed twice, an ensemble as a member, different
            image sizes, different splits, an unknown threshold rule (one sentence each).
        BadRunError: a member that is not finished or cannot be loaded.
    """
    started = time.time()
    folders = [RunFolder(Path(os.fspath(d)).expanduser()) for d in member_dirs]
    configs = _check_members(folders)
    rule = threshold_rule if threshold_rule is not None else configs[0].train.threshold_rule
    if rule not in THRESHOLD_RULES:
        raise BadSettingError(f"The threshold rule must be one of {', '.join(THRESHOLD_RULES)}; got {rule!r}.")
    evaluated = _average_predictions(folders)
    if out_dir is not None:
        target = RunFolder(Path(os.fspath(out_dir)).expanduser())
        if target.config_path.exists() or target.has_model():
            raise BadSettingError(
                f"The folder {target.path} already holds a run; choose a new folder for the ensemble."
            )

    # Imported here: the engine's model and export import TensorFlow; the checks above need none.
    from cxr_core.engine import export, model as model_lib  # noqa: PLC0415

    classifiers = [model_lib.load_classifier(folder.model_path) for folder in folders]
    sizes = [tuple(int(d) for d in c.input_shape[1:]) for c in classifiers]
    if len(set(sizes)) != 1:
        described = ", ".join(f"{f.name} takes {s[0]}x{s[1]}" for f, s in zip(folders, sizes))
        raise BadSettingError(
            f"The runs take different image sizes ({described}); an ensemble needs one input size."
        )
    metrics = _metrics(folders, configs, evaluated, rule)
    ensemble = model_lib.build_ensemble(classifiers)

    if out_dir is not None:
        folder = target
        folder.path.mkdir(parents=True, exist_ok=True)
    else:
        folder = RunFolder(runs.new_run_dir(runs.runs_root().path, hint=f"ensemble-{len(folders)}"))
    first = configs[0]
    config = dataclasses.replace(first, train=dataclasses.replace(first.train, recipe=RECIPE, threshold_rule=rule))
    folder.write_config(config)
    folder.write_status(RunState.RUNNING, pid=os.getpid(), started=started, message="combining runs")
    try:
        folder.write_members([f.path for f in folders])
        split = _union_split(folders)
        if split is not None:
            folder.write_split(split)
        folder.write_predictions(evaluated)
        metrics["duration_s"] = time.time() - started
        folder.write_metrics(metrics)
        folder.save_model(ensemble)
        if config.train.export_litert:
            try:
                export.export_classifier(ensemble, folder.path, config.model.backbone)
            except (CxrError, OSError) as error:
                log.warning("Ensemble %s: no LiteRT export (%s); it will predict with Keras.", folder.path, error)
    except BaseException as error:
        folder.write_status(RunState.FAILED, message=str(error), error=str(error))
        raise
    duration = time.time() - started
    folder.write_status(RunState.DONE, message=f"ensemble of {len(folders)} runs ({_names(folders)})",
                        duration_s=duration)
    log.info("Ensemble %s of %s written in %.1f s.", folder.path, _names(folders), duration)
    return folder.path
