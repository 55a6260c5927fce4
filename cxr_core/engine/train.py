"""Training: ``train(config) -> run folder``.

A run is a sequence of stages that share one ``TrainingContext`` (the settings, the run folder,
the progress reporter, the stop check and what earlier stages produced). Each stage is reported
to ``progress.jsonl``:

1. ``prepare``: scan the data set and follow ``plan.plan_run`` (limit, split, balance; augmented
   NORMAL images only ever in the training part); write ``split.csv``;
2. ``extract`` + ``train``: with the backbone frozen, its output for an image never changes, so the
   backbone runs once per image (``features.extract_features``, cached on disk) and the head trains
   on those features: an epoch costs well under a second instead of minutes;
3. ``fine_tune`` (optional): unfreeze the top layers and train the whole network on images streamed
   from disk (``keras.utils.PyDataset``), at a low learning rate;
4. ``evaluate``: choose the decision threshold on validation, test (``metrics.json``); the subtype
   task (NORMAL / BACTERIA / VIRUS, a softmax head) calls the most probable class, with no threshold;
5. ``save`` (``model.keras``, last but the export) and ``export`` (``model.tflite``); only then is
   the run marked done.

No Streamlit here: callers pass plain callables (``on_epoch_end``, ``should_stop``, ``on_progress``).
This module imports TensorFlow; the light parts of training (the plan, the time estimate) live in
``cxr_core.data.plan``.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from cxr_core.core.calibration import IDENTITY, Calibration, expected_calibration_error, fit_calibration
from cxr_core.core.config import RunConfig
from cxr_core.core.errors import CxrError, DiskFullError
from cxr_core.core.labels import classes_for, require_both_classes
from cxr_core.core.metrics import metrics_report, multiclass_metrics
from cxr_core.data import scan as data, views
from cxr_core.data.plan import plan_run, preflight
from cxr_core.engine import distribute, export, features, model as model_lib
from cxr_core.engine.batches import ImageBatches
from cxr_core.engine.callbacks import EpochRecorder
from cxr_core.engine.context import (
    Cancelled,
    EpochCallback,
    ProgressCallback,
    Reporter,
    StopCheck,
    TrainingContext,
)
from cxr_core.engine.losses import compile_model, learning_rate, optimizer as make_optimizer
from cxr_core.engine.sync_fit import plain_copy, predict_logits, row_weights, sync_fit
from cxr_core.io.images import load_gray
from cxr_core.runs import registry as runs
from cxr_core.runs.run_folder import Metrics, RunFolder, RunState

log = logging.getLogger(__name__)

def train(
    config: RunConfig,
    on_epoch_end: EpochCallback | None = None,
    should_stop: StopCheck | None = None,
    on_progress: ProgressCallback | None = None,
    run_dir: str | os.PathLike | None = None,
    runtime: distribute.Runtime | None = None,
) -> Path:
    """Train a classifier as ``config`` says and return its run folder.

    Args:
        config: the run's settings (saved as ``config.json``).
        on_epoch_end: called after every epoch with (epoch number from 1, logs dict).
        should_stop: polled between batches; returning True cancels the run.
        on_progress: called with every progress event (the same dicts as ``progress.jsonl``).
        run_dir: an existing empty folder to use (the background launcher makes one);
            by default a new folder under ``runs.runs_root()``.
        runtime: the strategy of this process (``distribute.setup``); by default set up from
            ``config.train`` (distribute, precision, cpu_replicas).
    Returns:
        The run folder. Its ``status.json`` says done, failed or cancelled. A worker of a multi-worker
        run that is not the chief writes nothing there: it trains in step in a scratch folder that is
        removed at the end, and returns the path of that removed folder.
    Raises:
        CxrError: bad input (the run folder is marked failed with the same sentence first).
    """
    started = time.time()
    if runtime is None:
        try:
            runtime = distribute.setup(config.train.distribute, config.train.precision, config.train.cpu_replicas)
        except CxrError as error:
            if run_dir is not None:  # the launcher's folder says why
                RunFolder(run_dir).write_status(RunState.FAILED, message=str(error), error=str(error))
            raise
    if not runtime.is_chief:
        scratch = Path(tempfile.mkdtemp(prefix="cxr-worker-"))
        try:
            return _train(config, scratch, runtime, started, on_epoch_end, should_stop, on_progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if run_dir is None:
        run_dir = runs.new_run_dir(hint=f"{config.model.backbone}-{config.data.split}")
    return _train(config, run_dir, runtime, started, on_epoch_end, should_stop, on_progress)


def _train(config: RunConfig, run_dir: str | os.PathLike, runtime: distribute.Runtime, started: float,
           on_epoch_end: EpochCallback | None, should_stop: StopCheck | None,
           on_progress: ProgressCallback | None) -> Path:
    folder = RunFolder(run_dir)
    folder.path.mkdir(parents=True, exist_ok=True)
    ctx = TrainingContext(config=config, folder=folder, report=Reporter(folder, on_progress),
                          should_stop=should_stop, on_epoch_end=on_epoch_end, started=started, runtime=runtime)
    report = ctx.report
    runtime_fields = ctx.status_fields  # where the run trains: host, devices, strategy, precision

    folder.write_config(config)
    folder.write_status(RunState.RUNNING, pid=os.getpid(), started=started, message="starting", **runtime_fields)
    report("runtime", **runtime_fields)
    try:
        for stage in STAGES:
            if not runtime.is_chief and stage in CHIEF_ONLY:
                continue
            with distribute.collective_errors(runtime):
                stage(ctx)
    except Cancelled:
        report(RunState.CANCELLED, message="cancelled by the user")
        folder.write_status(RunState.CANCELLED, message="cancelled by the user", **runtime_fields)
        return folder.path
    except CxrError as error:
        report(RunState.FAILED, message=str(error))
        folder.write_status(RunState.FAILED, message=str(error), error=str(error), **runtime_fields)
        raise
    except OSError as error:
        if error.errno != errno.ENOSPC:
            _record_failure(ctx, error)
            raise
        text = (f"The disk is full: run {folder.name} could not be written ({error.strerror}); "
                "free some space and train again.")
        _record_failure(ctx, error, text)
        raise DiskFullError(text) from error
    except Exception as error:  # recorded for the page, then re-raised for the caller
        _record_failure(ctx, error)
        raise
    duration = time.time() - started
    auc = (Metrics.from_dict(ctx.metrics) or Metrics()).test_auc
    message = f"done in {duration:.0f} s" + (f", test AUC {auc:.3f}" if auc is not None else "")
    report(RunState.DONE, message=message)
    folder.write_status(RunState.DONE, message=message, duration_s=duration, **runtime_fields)
    return folder.path


def _record_failure(ctx: TrainingContext, error: BaseException, text: str | None = None) -> None:
    """Mark the run failed; when the disk is full even that may fail, and the status reader
    then reports the dead process as failed anyway."""
    text = text or f"{type(error).__name__}: {error}"
    try:
        ctx.report(RunState.FAILED, message=text)
        ctx.folder.write_status(RunState.FAILED, message=text, error=text, traceback=traceback.format_exc(),
                                **ctx.status_fields)
    except OSError:
        log.error("could not record the failure of %s: %s", ctx.folder.path, text)


# -- stages --------------------------------------------------------------------------------------

def _prepare(ctx: TrainingContext) -> None:
    """Scan, subset, split and balance (``plan.plan_run``); write split.csv."""
    config = ctx.config
    preflight(config)  # a run launched without the CLI's or the page's checks fails here, in one sentence
    ctx.report("stage", stage="scan", message=f"scanning {config.data.data_dir}")
    ctx.scan = data.scan_dataset(config.data.data_dir)
    ctx.problems = [frame for frame in (ctx.scan.skipped, _duplicates_as_skipped(ctx.scan.duplicates)) if len(frame)]
    n_images = min(len(ctx.scan.manifest), config.data.limit or len(ctx.scan.manifest))
    ctx.report("stage", stage="split", message=f"{config.data.split} split of {n_images} images")
    ctx.plan = plan_run(config, ctx.scan.manifest)
    ctx.rows = ctx.plan.rows
    ctx.folder.write_split(ctx.rows)
    ctx.report("stage", stage="split", message=ctx.plan.describe())
    for note in ctx.plan.notes:
        ctx.report("warning", message=note)
    ctx.check_stop()
    _seed_everything(config.train.seed)


def _extract(ctx: TrainingContext) -> None:
    """Backbone features of every row (cached on disk), for the head phase."""
    if ctx.config.train.epochs <= 0:
        ctx.rows, unreadable = _readable_rows(ctx.rows, ctx.classes)
        if len(unreadable):
            ctx.problems.append(unreadable)
        return
    config, rows, report = ctx.config, ctx.rows, ctx.report
    total = len(rows)
    report("stage", stage="extract", total=total, message=f"computing backbone features of {total} images")
    # The time estimate counts only images the model computes: cache look-ups before are much faster.
    clock = {"start": time.time(), "base": 0, "done": 0, "last": 0.0}

    def progress(done: int, total_: int) -> None:
        now = time.time()
        clock["done"] = done
        if now - clock["last"] < 0.5 and done < total_:
            return
        clock["last"] = now
        rate = (done - clock["base"]) / max(now - clock["start"], 1e-6)
        eta = (total_ - done) / rate if rate > 0 else None
        report("extract", done=int(done), total=int(total_), eta_s=eta)

    def computing(n_missing: int) -> None:
        # Said before the backbone is built (several seconds with nothing else to report), with where
        # the look-ups got to, which the throttle may have held back.
        clock.update(start=time.time(), base=clock["done"], last=time.time())
        report("extract", done=int(clock["done"]), total=total, eta_s=None,
               message=f"building the backbone to compute {n_missing} images' features")

    options = dict(cache_dir=config.train.cache_dir, batch_size=max(config.train.batch_size, 16),
                   seed=config.train.seed, on_progress=progress, should_stop=ctx.stop_requested,
                   on_compute=computing)
    computed = 0
    runtime = ctx.runtime
    if runtime is not None and runtime.multi_worker:
        # Each worker computes its share of the missing entries into the shared cache; once all are
        # done (the barrier), every worker reads the whole cache below.
        share = features.extract_features(rows, config.model, config.augment,
                                          shard=(runtime.worker_index, runtime.workers), **options)
        computed = share.n_computed
        if runtime.any(share.cancelled):
            raise Cancelled
    result = features.extract_features(rows, config.model, config.augment, **options)
    if result.cancelled:
        raise Cancelled
    report("extract", done=total, total=total, eta_s=0.0, cached=int(result.n_cached - computed),
           computed=int(result.n_computed + computed))
    ctx.rows = rows.iloc[np.asarray(result.index, dtype=int)].reset_index(drop=True)
    _require_both_classes(ctx.rows, ctx.classes)
    if len(result.errors):
        ctx.problems.append(result.errors)
    ctx.features = np.asarray(result.features, dtype=np.float32)
    # A backbone built outside the strategy cannot train under it: the classifier builds its own then.
    ctx.backbone = result.backbone if not (runtime and runtime.distributed) else None


def _train_head(ctx: TrainingContext) -> None:
    """The head (Dropout + Dense) on cached features, many steps per call."""
    config, rows = ctx.config, ctx.rows
    if ctx.features is None:
        return
    train_mask = (rows["split"] == "train").to_numpy()
    val_mask = (rows["split"] == "val").to_numpy()
    y = rows["y"].to_numpy(dtype=np.float32)
    # Seeded here, not only at the start: a cold run builds the backbone (which draws random numbers)
    # and a warm run does not, and both must train the same head.
    _seed_everything(config.train.seed)
    runtime = ctx.runtime or distribute.Runtime(strategy=None)
    batch_size = runtime.global_batch(config.train.batch_size)
    with runtime.scope():
        head = model_lib.build_head(ctx.features.shape[1], config.model.dropout, seed=config.train.seed,
                                    n_outputs=ctx.n_outputs)
        if not runtime.multi_worker:
            # A head step on in-memory features costs microseconds; running many steps per call removes
            # the per-step Python overhead that would otherwise dominate an epoch. (Not under a strategy:
            # Keras' multi-step loop fails there with "You must feed a value for placeholder tensor".)
            compile_model(head, ctx.task, config.train.learning_rate, config.train.label_smoothing,
                          steps_per_execution=1 if runtime.distributed else 32,
                          weight_decay=config.train.weight_decay)
    ctx.report("stage", stage="train", total=config.train.epochs,
               message=f"training the head for {config.train.epochs} epochs on cached features")
    n_batches = math.ceil(train_mask.sum() / batch_size)
    recorder = EpochRecorder(ctx, "head", config.train.epochs, n_batches)
    weights = ctx.sample_weights(rows[train_mask])
    if runtime.multi_worker:
        train_x, train_y = ctx.features[train_mask], y[train_mask]
        val_x, val_y = ctx.features[val_mask], y[val_mask]
        with runtime.scope():
            optimizer = make_optimizer(config.train.learning_rate, config.train.weight_decay)
        # Every worker validates the head (in-memory features: cheap), so all keep the same best epoch.
        sync_fit(ctx, head, optimizer, recorder, config.train.epochs, len(train_x), lambda pos: train_x[pos],
                 train_y, row_weights(ctx, train_y, weights), validate=lambda: (val_y, predict_logits(head, val_x)))
    else:
        head.fit(
            ctx.features[train_mask], y[train_mask],
            validation_data=(ctx.features[val_mask], y[val_mask]),
            epochs=config.train.epochs, batch_size=batch_size, shuffle=True,
            class_weight=ctx.class_weight if weights is None else None, sample_weight=weights,
            callbacks=recorder.callbacks, verbose=0,
        )
    recorder.finish(head)
    ctx.head = head


def _write_skipped(ctx: TrainingContext) -> None:
    ctx.folder.write_skipped(pd.concat(ctx.problems, ignore_index=True) if ctx.problems
                             else pd.DataFrame(columns=["path", "reason"]))


def _build_classifier(ctx: TrainingContext) -> None:
    """The whole network: the (cached-run) backbone and the trained head in one model."""
    with (ctx.runtime or distribute.Runtime(strategy=None)).scope():
        ctx.classifier = model_lib.build_classifier(
            ctx.config.model, seed=ctx.config.train.seed, backbone=ctx.backbone, head=ctx.head,
            train_batchnorm=ctx.trains_batchnorm, n_outputs=ctx.n_outputs)


def _fine_tune(ctx: TrainingContext) -> None:
    """Unfreeze the top backbone layers and train on images streamed from disk."""
    if not ctx.fine_tunes:
        return
    config, classifier, rows = ctx.config, ctx.classifier, ctx.rows
    model_lib.unfreeze_top_layers(classifier, config.train.fine_tune_layers, include_batchnorm=ctx.trains_batchnorm)
    if ctx.trains_batchnorm:
        # Keras applications use BatchNorm momentum 0.99-0.999, made for ImageNet's million steps;
        # from scratch on a few thousand images the moving statistics would lag for many epochs and
        # validation (inference mode) would see a constant output. 0.9 follows the batches quickly.
        for layer in classifier.get_layer("backbone").layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.9
    epochs = config.train.fine_tune_epochs
    runtime = ctx.runtime or distribute.Runtime(strategy=None)
    batch_size = runtime.global_batch(config.train.batch_size)
    train_rows = rows[rows["split"] == "train"]
    weights = ctx.sample_weights(train_rows)
    train_data = ImageBatches(train_rows, config, batch_size, shuffle=True,
                              online_augment=config.train.online_augment, weights=weights)
    rate = learning_rate(config, len(train_data))
    if not runtime.distributed:
        with runtime.scope():
            compile_model(classifier, ctx.task, rate, config.train.label_smoothing,
                          weight_decay=config.train.weight_decay)
    ctx.report("stage", stage="fine_tune", total=epochs,
               message=f"fine-tuning {'all' if config.train.fine_tune_layers < 0 else config.train.fine_tune_layers} "
                       f"backbone layers for {epochs} epochs on streamed images")
    val_rows = rows[rows["split"] == "val"]
    recorder = EpochRecorder(ctx, "fine_tune", epochs, len(train_data))
    if runtime.distributed:
        # Our own synchronous step, also under MirroredStrategy: Keras' fit cannot run under
        # MultiWorkerMirroredStrategy, and on streamed batches (a PyDataset) under MirroredStrategy it
        # did not train as one device does with the same global batch (the histories parted after one
        # epoch), whereas this step does.
        with runtime.scope():
            optimizer = make_optimizer(rate, config.train.weight_decay)
        train_y = train_rows["y"].to_numpy(dtype=np.float32)
        # Only the chief keeps the model, so only the chief spends time validating the fine-tuned one.
        validate = None
        if runtime.is_chief:
            def validate():
                return (val_rows["y"].to_numpy(dtype=np.float32),
                        predict_logits(classifier, ImageBatches(val_rows, config, 64, with_labels=False)))
        sync_fit(ctx, classifier, optimizer, recorder, epochs, len(train_rows), train_data.load, train_y,
                 row_weights(ctx, train_y, weights), validate=validate, dataset=train_data)
    else:
        val_data = ImageBatches(val_rows, config, batch_size)
        # ImageBatches draws each epoch's order from the run's seed (Keras' own shuffle of a PyDataset's
        # batch order used Python's global generator, whose state differs between a cold and a warm
        # feature cache, so the two runs did not agree); the tf.data pipeline decodes in parallel.
        classifier.fit(train_data.training_dataset(epochs), validation_data=val_data, epochs=epochs,
                       steps_per_epoch=len(train_data), shuffle=False,
                       class_weight=ctx.class_weight if weights is None else None, callbacks=recorder.callbacks,
                       verbose=0)
    recorder.finish(classifier)


def _leave_strategy(ctx: TrainingContext) -> None:
    """Plain copies of the trained models (outside the strategy), to evaluate, save and export."""
    if ctx.runtime is None or not ctx.runtime.distributed:
        return
    ctx.head = plain_copy(ctx.head) if ctx.head is not None else None
    ctx.classifier = plain_copy(ctx.classifier) if ctx.classifier is not None else None


def _evaluate(ctx: TrainingContext) -> None:
    """Threshold on validation, metrics on test; metrics.json and predictions.csv."""
    task = ctx.task
    ctx.report("stage", stage="evaluate", message="choosing the threshold on validation, testing"
               if task.uses_threshold else "testing the most probable class")
    rows = ctx.rows
    mask = rows["split"].isin(["val", "test"]).to_numpy()
    if ctx.fine_tunes or ctx.features is None:
        data_ = ImageBatches(rows[mask], ctx.config, 64, with_labels=False)
        logits = ctx.classifier.predict(data_, verbose=0)
    else:
        logits = ctx.head.predict(ctx.features[mask], batch_size=256, verbose=0)
    # Test-time views, when asked for: chosen before the calibration and the threshold, which are then
    # fitted on what the run will predict with.
    logits, tta = _choose_views(ctx, rows[mask], logits)
    calibration = _fit_calibration(ctx, rows[mask]["split"].to_numpy() == "val", rows[mask]["y"].to_numpy(), logits)
    logits_raw, logits = logits, calibration.logits(logits)
    probs = task.probabilities(logits)
    # probability is P(disease) for every task, so readers of the binary columns still make sense of it.
    evaluated = rows[mask].assign(probability=task.disease_probability(probs))
    if not task.is_binary:
        evaluated = evaluated.assign(**{f"p_{name}": probs[:, c] for c, name in enumerate(task.classes)},
                                     label=task.labels(probs, None))
    val = evaluated[evaluated["split"] == "val"]
    test = evaluated[evaluated["split"] == "test"]
    if task.uses_threshold:
        metrics = metrics_report(
            val["y"].to_numpy(), val["probability"].to_numpy(),
            test["y"].to_numpy(), test["probability"].to_numpy(),
            rule=ctx.config.train.threshold_rule, target_sensitivity=ctx.config.train.target_sensitivity,
        )
    else:
        columns = [f"p_{name}" for name in task.classes]

        def report(part: pd.DataFrame) -> dict | None:
            if not len(part):
                return None
            return multiclass_metrics(part["y"].to_numpy(), part[columns].to_numpy(), task.classes)

        test_metrics = report(test)
        metrics = {"threshold": None, "threshold_rule": "argmax", "val": report(val),
                   "test": {"at_threshold": test_metrics} if test_metrics is not None else None}
    metrics = {"task": task.name, "classes": list(task.classes), **metrics,
               "calibration": _calibration_record(task, calibration, evaluated, task.probabilities(logits_raw)),
               "tta": tta}
    balance = ctx.plan.balance
    # Counted on the readable images, which are the ones the run really used.
    originals = rows[~rows["is_augmented"].astype(bool)]
    counts = {
        part: {label: int(n) for label, n in originals[originals["split"] == part]["label"].value_counts().items()}
        for part in ("train", "val", "test")
    }
    metrics.update(
        n_images=int(len(originals)),
        n_augmented=int(len(rows) - len(originals)),
        split_counts=counts,
        balance={"strategy": balance.strategy, "n_extra": int(balance.n_extra), "class_weight": ctx.class_weight,
                 "by": ctx.plan.balance_by or None},
        n_patients_test=int(test["patient_id"].nunique()) if "patient_id" in test else None,
        layout=getattr(ctx.scan, "layout", None),
        duration_s=time.time() - ctx.started,
    )
    ctx.evaluated, ctx.metrics = evaluated, metrics
    ctx.folder.write_predictions(evaluated)
    ctx.folder.write_metrics(metrics)
    ctx.check_stop()


def _choose_views(ctx: TrainingContext, part: pd.DataFrame, logits: np.ndarray) -> tuple[np.ndarray, dict]:
    """The validation and test logits the run will predict with, and the record of that choice: one look
    at each image, or the mean over ``views.VIEWS`` (``train.tta``: ``on``; ``auto`` when the views raise
    the validation AUC of pneumonia against normal; ``off``)."""
    mode = ctx.config.train.tta
    record = {"mode": mode, "used": False, "views": [view.name for view in views.VIEWS]}
    if mode == "off":
        return logits, record
    ctx.report("stage", stage="evaluate", message=f"looking at the validation and test images in {len(views.VIEWS)} "
               "views (test-time augmentation)")
    seen = ImageBatches(part, ctx.config, 16, with_labels=False)
    view_logits = []
    for index in range(len(seen)):
        ctx.check_stop()
        (batch,) = seen[index]
        view_logits.append(views.mean_logits(ctx.classifier.predict_on_batch(views.make_views(batch)),
                                             len(views.VIEWS)))
    view_logits = np.concatenate(view_logits).reshape(logits.shape)
    is_val = (part["split"] == "val").to_numpy()
    sick = part["y"].to_numpy()[is_val] > 0
    task = ctx.task
    if is_val.any() and 0 < sick.sum() < len(sick):
        for key, found in (("val_auc_one", logits), ("val_auc_views", view_logits)):
            disease = task.disease_probability(task.probabilities(found[is_val]))
            record[key] = float(roc_auc_score(sick, disease))
        better = record["val_auc_views"] > record["val_auc_one"]
    else:
        better = False
    record["used"] = mode == "on" or better
    return (view_logits if record["used"] else logits), record


def _fit_calibration(ctx: TrainingContext, is_val: np.ndarray, y: np.ndarray, logits: np.ndarray) -> Calibration:
    """The run's calibration, fitted on the validation part (the identity when it is turned off)."""
    if not is_val.any():
        return IDENTITY
    probs = ctx.task.probabilities(logits[is_val])
    fitted_on = probs[:, 1] if ctx.task.head == "sigmoid" else probs
    return fit_calibration(ctx.config.train.calibration, y[is_val].astype(int), fitted_on)


def _calibration_record(task, calibration: Calibration, evaluated: pd.DataFrame, raw_probs: np.ndarray) -> dict:
    """The calibration as stored in metrics.json, with the expected calibration error of each part
    before and after it (of P(disease) against any disease)."""
    record = calibration.to_dict()
    raw_disease = task.disease_probability(raw_probs)
    for part in ("val", "test"):
        in_part = (evaluated["split"] == part).to_numpy()
        if in_part.any():
            sick = (evaluated["y"].to_numpy()[in_part].astype(int) > 0).astype(int)
            record[f"{part}_ece_before"] = expected_calibration_error(sick, raw_disease[in_part])
            record[f"{part}_ece_after"] = expected_calibration_error(sick, evaluated["probability"].to_numpy()[in_part])
    return record


def _save(ctx: TrainingContext) -> None:
    ctx.report("stage", stage="save", message="saving model.keras")
    ctx.folder.save_model(ctx.classifier)


def _export(ctx: TrainingContext) -> None:
    """Write model.tflite for TensorFlow-free prediction; a failure leaves a good run that predicts with Keras."""
    if not ctx.config.train.export_litert:
        return
    ctx.report("stage", stage="export", message="exporting model.tflite (LiteRT) for light prediction")
    try:
        export.export_classifier(ctx.classifier, ctx.folder.path, ctx.config.model.backbone)
    except (CxrError, OSError) as error:
        log.warning("Run %s: no LiteRT export (%s); the app will predict with Keras.", ctx.folder.path, error)
        ctx.report("warning", message=f"No LiteRT export: {error} The run predicts with Keras instead.")


#: The stages of a run, in order.
STAGES: tuple[Callable[[TrainingContext], None], ...] = (
    _prepare, _extract, _train_head, _write_skipped, _build_classifier, _fine_tune, _leave_strategy, _evaluate,
    _save, _export,
)
#: What only the chief of a multi-worker run does: the others have trained in step and are done.
CHIEF_ONLY = (_leave_strategy, _evaluate, _save, _export)


# -- helpers -------------------------------------------------------------------------------------

def _seed_everything(seed: int) -> None:
    # Training runs in its own process (or a test); seeding Keras' global generators there makes a
    # rerun reproducible: initialisation, dropout masks and shuffling.
    keras.utils.set_random_seed(seed)


def _duplicates_as_skipped(duplicates: pd.DataFrame) -> pd.DataFrame:
    if duplicates is None or not len(duplicates):
        return pd.DataFrame(columns=["path", "reason"])
    return pd.DataFrame({
        "path": duplicates["path"],
        "reason": "same bytes as " + duplicates["duplicate_of"].astype(str) + " (left out so it cannot leak)",
    })


def _require_both_classes(rows: pd.DataFrame, classes: tuple[str, ...] = classes_for("pneumonia")) -> None:
    for part in ("train", "val", "test"):
        require_both_classes(rows.loc[rows["split"] == part, "label"],
                             f"after leaving out unreadable images, the {part} part",
                             "add more readable images of both classes" if len(classes) == 2
                             else "add more readable images of every class", classes)


def _readable_rows(rows: pd.DataFrame,
                   classes: tuple[str, ...] = classes_for("pneumonia")) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode every image once (in threads) and drop the unreadable ones before streaming."""
    def check(path: str) -> str | None:
        try:
            load_gray(path)
            return None
        except CxrError as error:
            return str(error)

    unique = rows["path"].unique().tolist()
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        reasons = dict(zip(unique, pool.map(check, unique)))
    bad = [p for p, r in reasons.items() if r]
    kept = rows[~rows["path"].isin(bad)].reset_index(drop=True)
    _require_both_classes(kept, classes)
    return kept, pd.DataFrame({"path": bad, "reason": [reasons[p] for p in bad]})


