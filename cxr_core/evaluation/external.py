"""Evaluate a run on a data set outside its split, and remember the result in the run folder.

This is the honest figure. A split of one collection shares its hospital, its scanners and the
way its copies were made between training and test; another collection (the official Kermany
test set, another site) does not, and models score lower there. ``evaluate_folder`` runs the
run's model on every image of a folder, reports the metrics at the run's own threshold and at
0.5, warns when some of those images were in the run's training part (matched by content hash),
and stores the result under ``evaluations/<data set name>`` so the pages show it first.

On a data set whose manifest records a planted marker (a shortcut-lab copy, ``data.shortcut_lab``)
it also reports ``marker_attention``: the share of marked images whose Grad-CAM map peaks on the
marker. The map is the one of the evidence for PNEUMONIA (for a subtype run, of the predicted
class), whatever the image's label or prediction: the marker was planted as a sign of pneumonia,
so the question is whether the strongest evidence the model found for pneumonia is the marker. A
NORMAL call does not hide a marker the model used, and an image without any pneumonia evidence
(an empty map) counts as not looking at it. The peak counts as on the marker when it lies in the
marker's box grown by one cell of the map on every side: the map is coarse (7 x 7 cells for
MobileNetV2 at 224 pixels), so its peak can only say which cell the evidence is in.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pandas as pd

from cxr_core.core.errors import BadSettingError, CxrError
from cxr_core.core.labels import POSITIVE
from cxr_core.core.metrics import (
    binary_metrics,
    bootstrap_intervals,
    estimate_prior_em,
    multiclass_metrics,
    threshold_for_prior,
)
from cxr_core.data.scan import scan_dataset, stratified_subset, task_labels
from cxr_core.data.shortcut_lab import read_markers
from cxr_core.evaluation.subgroups import calibration_figures, subgroup_figures, uncalibrated
from cxr_core.inference.predictor import Predictor
from cxr_core.io.images import load_gray
from cxr_core.runs.run_folder import RunFolder, evaluation_name

log = logging.getLogger(__name__)


def training_overlap(folder: RunFolder, sha256: pd.Series) -> dict[str, int]:
    """How many of the given images (by content hash) were in each part of the run's split."""
    split = folder.read_split()
    if "sha256" not in split.columns or "split" not in split.columns:
        return {}
    if "is_augmented" in split.columns:
        split = split[~split["is_augmented"].astype(bool)]
    wanted = set(sha256.dropna().astype(str))
    return {part: int(split.loc[split["split"] == part, "sha256"].astype(str).isin(wanted).sum())
            for part in ("train", "val", "test")}


def overlap_warning(overlap: dict[str, int], n: int) -> str | None:
    """One sentence when evaluated images were in the run's training part, else None."""
    in_train = int(overlap.get("train", 0))
    if not in_train:
        return None
    return (f"{in_train} of these {n} images were in this run's training part, so this is not an "
            "external test: its figures are optimistic.")


def prevalence_adjustment(folder: RunFolder, prob: np.ndarray, y: np.ndarray, threshold: float) -> dict | None:
    """The threshold moved to the new images' prevalence, estimated from their probabilities alone
    (EM, Saerens et al. 2002; the labels are used only to report how that threshold does).

    Returns None when the run does not record its validation prevalence.
    """
    val = (folder.read_metrics() or {}).get("val") or {}
    n, n_pos = val.get("n"), val.get("n_positive")
    if not n or n_pos is None or not 0 < n_pos < n:
        return None
    train_prior = float(n_pos) / float(n)
    estimated = estimate_prior_em(prob, train_prior)
    adjusted = threshold_for_prior(threshold, train_prior, estimated)
    return {"validation_prevalence": train_prior, "estimated_prevalence": estimated,
            "true_prevalence": float(np.mean(y)), "threshold": adjusted,
            "at_threshold": binary_metrics(y, prob, threshold=adjusted)}


def peak_on_marker(heatmap: np.ndarray, box: tuple[float, float, float, float], grid: tuple[int, int]) -> bool:
    """Whether the peak of ``heatmap`` (h, w) lies in ``box`` (x, y, w, h) grown by one map cell.

    An empty map (no evidence for its class anywhere) has no peak, so it is not on the marker.
    """
    if not np.any(heatmap > 0):
        return False
    height, width = heatmap.shape
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    cell_w, cell_h = width / grid[1], height / grid[0]
    x, y, w, h = (float(v) for v in box)
    return (x - cell_w <= col + 0.5 <= x + w + cell_w) and (y - cell_h <= row + 0.5 <= y + h + cell_h)


def marker_attention(predictor: Predictor, manifest: pd.DataFrame, on_progress: Any = None) -> dict | None:
    """The share of marked images whose Grad-CAM peak lies on the marker (see the module's notes).

    Args:
        predictor: the run's ``Predictor``.
        manifest: the evaluated rows with ``path`` and the marker columns of a shortcut-lab copy.
        on_progress: called with (done, total) over the marked images.

    Returns:
        {"marker_attention": share or None (no marked image could be read), "n_marked": images
        checked, "marker_map": the class whose map was used}, or None when the manifest records no marker.
    """
    markers = read_markers(manifest)
    if markers is None:
        return None
    marked = manifest.loc[markers["marker"] == 1, "path"].astype(str)
    boxes = markers.loc[marked.index, ["marker_x", "marker_y", "marker_w", "marker_h"]].to_numpy(np.float64)
    # The marker was planted as a sign of pneumonia: ask for the map of PNEUMONIA where the task has
    # that class, else (the subtype task) for the map of each image's predicted class.
    target = POSITIVE if POSITIVE in predictor.classes else None
    hits = checked = 0
    grid = predictor.map_grid if len(marked) else (1, 1)
    step = 16
    paths = marked.tolist()
    for start in range(0, len(paths), step):
        grays, chosen = [], []
        for offset, path in enumerate(paths[start:start + step]):
            try:
                grays.append(load_gray(path))
                chosen.append(start + offset)
            except CxrError:
                continue  # already listed in ``skipped`` by the prediction pass
        if grays:
            for explanation, index in zip(predictor.explain(grays, target), chosen):
                checked += 1
                hits += peak_on_marker(explanation.heatmap, tuple(boxes[index]), grid)
        if on_progress is not None:
            on_progress(min(start + step, len(paths)), len(paths))
    return {"marker_attention": float(hits / checked) if checked else None, "n_marked": checked,
            "marker_map": target or "predicted class"}


def interval_figures(used: pd.DataFrame, threshold: float) -> dict:
    """``intervals`` (95 % bootstrap intervals of ROC AUC, accuracy, sensitivity and specificity at the
    threshold) and ``intervals_by``: "patient" when some patient has several images (they are resampled
    together, as one child's films are not independent evidence), else "image"."""
    patients = used["patient_id"] if "patient_id" in used.columns else None
    by_patient = patients is not None and patients.notna().all() and patients.nunique() < len(used)
    return {"intervals": bootstrap_intervals(used["y"].to_numpy(), used["probability"].to_numpy(), threshold,
                                             groups=patients.to_numpy() if by_patient else None),
            "intervals_by": "patient" if by_patient else "image"}


def evaluate_folder(run_dir: str | os.PathLike, data_dir: str | os.PathLike, *, threshold: float | None = None,
                    engine: str = "auto", store: bool = True, predictor: Predictor | None = None,
                    on_progress: Any = None, limit: int | None = None, tta: bool | None = None) -> dict:
    """Metrics of a run over every image of a folder.

    Args:
        run_dir: the run folder.
        data_dir: a data set folder (Kermany layout or class folders).
        threshold: overrides the run's chosen threshold for the headline metrics.
        engine: ``auto``, ``litert`` or ``keras`` (see ``predict.Predictor.from_run``).
        store: remember the result in the run folder (``evaluations/<name>.json`` and ``.csv``).
        predictor: an already loaded ``Predictor`` of this run (the app keeps one cached).
        on_progress: called with (done, total) while images are classified.
        limit: evaluate a stratified, seeded sample of at most this many images (quicker; the
            result says ``sampled_from``).
        tta: average a few fixed views of each image (``data.views``); ``None``: as the run chose. The
            result says ``tta``.

    Returns:
        The ``evaluate`` JSON: task ("pneumonia"), n, accuracy, roc_auc, pr_auc, sensitivity,
        specificity, precision, f1, brier, threshold, confusion_matrix at the threshold; ``at_0.5``;
        ``skipped``; ``duplicates``; ``run``; ``data``; ``name``; ``engine``; ``overlap`` (images per
        part of the run's split) and ``warning`` (one sentence, or None); on a data set whose manifest
        records markers (a shortcut-lab copy) also ``marker_attention``, ``n_marked`` and ``marker_map``
        (see ``marker_attention``); ``intervals`` and ``intervals_by`` (see ``interval_figures``);
        ``calibration`` (``subgroups.calibration_figures``: ECE and reliability bins after the run's
        calibration and before it) and ``subgroups`` (``subgroups.subgroup_figures``: per subtype and
        per group column of the manifest). For a
        subtype run (no intervals: its figures are per class),
        ``evaluate.multiclass_metrics`` (task "subtype", classes, per_class, pneumonia_vs_normal,
        bacterial_vs_viral, ...) with the same bookkeeping keys and no ``prevalence``.

    Raises:
        CxrError: the run or the folder cannot be used, or no image could be read (for a subtype
            run also: images without a subtype in their name, or a threshold given).
    """
    folder = RunFolder(run_dir)
    if predictor is None:
        predictor = Predictor.from_run(folder.path, engine=engine, tta=tta)
    task = predictor.task
    if threshold is not None and not task.uses_threshold:
        raise BadSettingError(f"The run {folder.name} is a {task.name} run, which labels each image with its most "
                              "probable class, so a threshold does not apply to it.")
    chosen = (predictor.threshold if threshold is None else float(threshold)) if task.uses_threshold else None
    scan = scan_dataset(data_dir)
    manifest = task_labels(scan.manifest, task.name)
    sampled_from = None
    if limit and len(manifest) > int(limit):
        sampled_from = int(len(manifest))
        manifest = stratified_subset(manifest, int(limit), seed=123, task=task.name)
    results = _classify(predictor, manifest["path"].tolist(), on_progress)
    ok = np.array(["error" not in r for r in results], dtype=bool)
    skipped = [{"path": str(p), "reason": str(r)} for p, r in zip(scan.skipped["path"], scan.skipped["reason"])]
    skipped += [{"path": r["file"], "reason": r["error"]} for r in results if "error" in r]
    if not ok.any():
        raise CxrError(f"None of the images in {data_dir} could be read.")
    used = manifest[ok].copy()
    y = used["y"].to_numpy()
    result = _metrics(used, [r for r in results if "error" not in r], predictor, chosen)
    result["skipped"] = skipped
    result["duplicates"] = int(len(scan.duplicates))
    result["run"] = str(run_dir)
    result["data"] = str(data_dir)
    name = evaluation_name(data_dir)
    result["name"] = name
    result["engine"] = predictor.engine.name
    result["tta"] = predictor.tta
    result["sampled_from"] = sampled_from
    overlap = training_overlap(folder, used["sha256"]) if "sha256" in used else {}
    result["overlap"] = overlap
    result["warning"] = overlap_warning(overlap, len(used))
    if task.uses_threshold:  # a threshold can follow the new images' prevalence
        result["prevalence"] = prevalence_adjustment(folder, used["probability"].to_numpy(), y, chosen)
        result.update(interval_figures(used, chosen))
    attention = marker_attention(predictor, used, on_progress)
    if attention is not None:
        result.update(attention)
    if store:
        _store(folder, name, result, used, () if task.is_binary else task.classes)
    return result


def _classify(predictor: Predictor, paths: list[str], on_progress: Any) -> list[dict]:
    """``predict_files`` over ``paths`` in steps, reporting (done, total) after each."""
    results: list[dict] = []
    step = 64
    for start in range(0, len(paths), step):
        results.extend(predictor.predict_files(paths[start:start + step]))
        if on_progress is not None:
            on_progress(min(start + step, len(paths)), len(paths))
    return results


def _metrics(used: pd.DataFrame, results: list[dict], predictor: Predictor, chosen: float | None) -> dict:
    """The metrics of the readable images (``results`` in ``used``'s order); adds their probabilities
    (and, for a subtype run, each class's and the predicted class) to ``used``."""
    y = used["y"].to_numpy()
    task = predictor.task
    if not task.is_binary:
        classes = task.classes
        probs = np.array([[r["probabilities"][c] for c in classes] for r in results],
                         dtype=np.float64).reshape(-1, len(classes))
        for c, name in enumerate(classes):
            used[f"p_{name}"] = probs[:, c]
        used["probability"] = 1.0 - probs[:, 0]
        used["predicted"] = np.asarray(classes, dtype=object)[probs.argmax(axis=1)]
        result = multiclass_metrics(y, probs, classes)
        prob = used["probability"].to_numpy()
        result["calibration_disease"] = calibration_figures(
            y, prob, predictor.calibration.method, uncalibrated(predictor.calibration, prob, probs))
        return result
    used["probability"] = [r["probability"] for r in results]
    prob = used["probability"].to_numpy()
    result = {"task": task.name, **binary_metrics(y, prob, threshold=chosen)}
    result["at_0.5"] = binary_metrics(y, prob, threshold=0.5)
    result["calibration"] = calibration_figures(y, prob, predictor.calibration.method,
                                                uncalibrated(predictor.calibration, prob))
    result["subgroups"] = subgroup_figures(used, chosen)
    return result


def _store(folder: RunFolder, name: str, result: dict, used: pd.DataFrame, classes: tuple[str, ...]) -> None:
    """Keep the result and the per-image table with the run (``classes``: a subtype run's, else empty)."""
    # label is the true class, as for the pneumonia task; a subtype run adds p_<class> and predicted.
    extra = [f"p_{c}" for c in classes] + ["predicted"] if classes else []
    columns = [c for c in ("path", "y", "probability", *extra, "label", "patient_id") if c in used.columns]
    try:
        folder.write_evaluation(name, result, used[columns])
    except OSError as error:  # a read-only run (the shipped demo on a hosted app) still answers
        log.warning("Could not store the evaluation in %s: %s", folder.path, error)
