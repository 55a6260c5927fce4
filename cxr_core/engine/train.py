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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np
import pandas as pd

from cxr_core.core.config import RunConfig
from cxr_core.core.errors import CxrError, DiskFullError
from cxr_core.core.labels import classes_for, require_both_classes, sigmoid
from cxr_core.data import scan as data
from cxr_core.data.augment import augment_image
from cxr_core.data.plan import RunPlan, plan_run, preflight
from cxr_core.engine import distribute, features, litert, model as model_lib
from cxr_core.io.images import load_gray, to_model_input
from cxr_core.runs import registry as runs
from cxr_core.runs.run_folder import RunFolder

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict], None]
StopCheck = Callable[[], bool]
ProgressCallback = Callable[[dict], None]


class _Cancelled(Exception):
    """Raised inside training when the user asked to stop."""


class Reporter:
    """Writes progress events to the run folder and forwards them to a callback."""

    def __init__(self, folder: RunFolder, on_progress: ProgressCallback | None) -> None:
        self.folder = folder
        self.on_progress = on_progress

    def __call__(self, event: str, **fields: Any) -> None:
        record = {"time": time.time(), "event": event, **fields}
        self.folder.append_progress(record)
        if self.on_progress is not None:
            self.on_progress(record)


@dataclass
class TrainingContext:
    """What every stage reads, and what the stages hand on to each other."""

    config: RunConfig
    folder: RunFolder
    report: Reporter
    should_stop: StopCheck | None = None
    on_epoch_end: EpochCallback | None = None
    # Filled in by the stages, in order.
    scan: Any = None
    plan: RunPlan | None = None
    rows: pd.DataFrame | None = None            # readable rows (augmented ones included)
    problems: list[pd.DataFrame] = field(default_factory=list)
    features: np.ndarray | None = None          # one row per entry of ``rows`` (head phase only)
    backbone: Any = None
    head: Any = None
    classifier: Any = None
    history: list[dict] = field(default_factory=list)
    evaluated: pd.DataFrame | None = None       # validation and test rows with their probability
    metrics: dict | None = None
    started: float = field(default_factory=time.time)
    runtime: distribute.Runtime | None = None    # the strategy this process trains under

    @property
    def status_fields(self) -> dict:
        """Where the run trains, kept in every status.json written (``Runtime.fields``)."""
        return self.runtime.fields() if self.runtime is not None else {}

    def stop_requested(self) -> bool:
        return self.folder.cancel_requested() or bool(self.should_stop and self.should_stop())

    def check_stop(self) -> None:
        if self.stop_requested():
            raise _Cancelled

    @property
    def class_weight(self) -> dict[int, float] | None:
        weights = self.plan.balance.class_weight if self.plan is not None else None
        return dict(weights) if weights else None

    def sample_weights(self, rows: pd.DataFrame) -> np.ndarray | None:
        """Per-image training weights when a property must tell the model nothing (``balance_by``):
        within each of its values the classes weigh as in the whole part, times the class weights.
        None when the plain class weights (or none) apply."""
        column = self.plan.balance_by if self.plan is not None else self.config.train.balance_by
        if not column:
            return None
        from cxr_core.data.shortcuts import balancing_weights  # noqa: PLC0415 (only runs that balance a property)

        weights = balancing_weights(rows["y"].to_numpy(), rows[column].to_numpy())
        if self.class_weight:
            weights = weights * rows["y"].map(self.class_weight).to_numpy(dtype=np.float64)
        return (weights / weights.mean()).astype(np.float32)

    @property
    def classes(self) -> tuple[str, ...]:
        """The task's classes, in the order of the head's outputs."""
        return classes_for(self.config.data.task)

    @property
    def n_outputs(self) -> int:
        """Logits of the head: 1 (a sigmoid) for the binary task, one per class for a softmax."""
        return model_lib.n_outputs_for(self.config.data.task)

    @property
    def fine_tunes(self) -> bool:
        return self.config.train.fine_tune_epochs > 0 and self.config.train.fine_tune_layers != 0

    @property
    def from_scratch(self) -> bool:
        """A randomly initialised backbone trained whole: its BatchNorm layers must learn too."""
        return self.config.model.weights == "none" and self.config.train.fine_tune_layers == -1

    @property
    def trains_batchnorm(self) -> bool:
        """Whether the unfrozen BatchNorm layers learn their statistics while fine-tuning (from
        scratch they must; on pretrained weights only when asked, to follow the X-rays' statistics)."""
        return self.fine_tunes and (self.from_scratch or self.config.train.fine_tune_batchnorm)


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
                RunFolder(run_dir).write_status("failed", message=str(error), error=str(error))
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
    where = ctx.status_fields

    folder.write_config(config)
    folder.write_status("running", pid=os.getpid(), started=started, message="starting", **where)
    report("runtime", **where)
    try:
        for stage in STAGES:
            if not runtime.is_chief and stage in CHIEF_ONLY:
                continue
            with distribute.collective_errors(runtime):
                stage(ctx)
    except _Cancelled:
        report("cancelled", message="cancelled by the user")
        folder.write_status("cancelled", message="cancelled by the user", **where)
        return folder.path
    except CxrError as error:
        report("failed", message=str(error))
        folder.write_status("failed", message=str(error), error=str(error), **where)
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
    auc = (((ctx.metrics or {}).get("test") or {}).get("at_threshold") or {}).get("roc_auc")
    message = f"done in {duration:.0f} s" + (f", test AUC {auc:.3f}" if auc is not None else "")
    report("done", message=message)
    folder.write_status("done", message=message, duration_s=duration, **where)
    return folder.path


def _record_failure(ctx: TrainingContext, error: BaseException, text: str | None = None) -> None:
    """Mark the run failed; when the disk is full even that may fail, and the status reader
    then reports the dead process as failed anyway."""
    text = text or f"{type(error).__name__}: {error}"
    try:
        ctx.report("failed", message=text)
        ctx.folder.write_status("failed", message=text, error=text, traceback=traceback.format_exc(),
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
    start = time.time()
    last = [0.0]

    def progress(done: int, total_: int) -> None:
        now = time.time()
        if now - last[0] < 0.5 and done < total_:
            return
        last[0] = now
        rate = done / max(now - start, 1e-6)
        eta = (total_ - done) / rate if rate > 0 else None
        report("extract", done=int(done), total=int(total_), eta_s=eta)

    options = dict(cache_dir=config.train.cache_dir, batch_size=max(config.train.batch_size, 16),
                   seed=config.train.seed, on_progress=progress, should_stop=ctx.stop_requested)
    computed = 0
    runtime = ctx.runtime
    if runtime is not None and runtime.multi_worker:
        # Each worker computes its share of the missing entries into the shared cache; once all are
        # done (the barrier), every worker reads the whole cache below.
        share = features.extract_features(rows, config.model, config.augment,
                                          shard=(runtime.worker_index, runtime.workers), **options)
        computed = share.n_computed
        if runtime.any(share.cancelled):
            raise _Cancelled
    result = features.extract_features(rows, config.model, config.augment, **options)
    if result.cancelled:
        raise _Cancelled
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
            _compile(head, config.train.learning_rate, config.train.label_smoothing,
                     steps_per_execution=1 if runtime.distributed else 32, n_outputs=ctx.n_outputs)
    ctx.report("stage", stage="train", total=config.train.epochs,
               message=f"training the head for {config.train.epochs} epochs on cached features")
    n_batches = math.ceil(train_mask.sum() / batch_size)
    recorder = EpochRecorder(ctx, "head", config.train.epochs, n_batches)
    weights = ctx.sample_weights(rows[train_mask])
    if runtime.multi_worker:
        train_x, train_y = ctx.features[train_mask], y[train_mask]
        val_x, val_y = ctx.features[val_mask], y[val_mask]
        with runtime.scope():
            optimizer = keras.optimizers.Adam(config.train.learning_rate)
        # Every worker validates the head (in-memory features: cheap), so all keep the same best epoch.
        _sync_fit(ctx, head, optimizer, recorder, config.train.epochs, len(train_x), lambda pos: train_x[pos],
                  train_y, _row_weights(ctx, train_y, weights), validate=lambda: (val_y, _predict(head, val_x)))
    else:
        head.fit(
            ctx.features[train_mask], y[train_mask],
            validation_data=(ctx.features[val_mask], y[val_mask]),
            epochs=config.train.epochs, batch_size=batch_size, shuffle=True,
            class_weight=ctx.class_weight if weights is None else None, sample_weight=weights,
            callbacks=[recorder], verbose=0,
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
    rate = _learning_rate(config, len(train_data))
    if not runtime.distributed:
        with runtime.scope():
            _compile(classifier, rate, config.train.label_smoothing, weight_decay=config.train.weight_decay,
                     n_outputs=ctx.n_outputs)
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
            optimizer = _optimizer(rate, config.train.weight_decay)
        train_y = train_rows["y"].to_numpy(dtype=np.float32)
        # Only the chief keeps the model, so only the chief spends time validating the fine-tuned one.
        validate = None
        if runtime.is_chief:
            def validate():
                return (val_rows["y"].to_numpy(dtype=np.float32),
                        _predict(classifier, ImageBatches(val_rows, config, 64, with_labels=False)))
        _sync_fit(ctx, classifier, optimizer, recorder, epochs, len(train_rows), train_data.load, train_y,
                  _row_weights(ctx, train_y, weights), validate=validate, dataset=train_data)
    else:
        val_data = ImageBatches(val_rows, config, batch_size)
        # ImageBatches draws each epoch's order from the run's seed (Keras' own shuffle of a PyDataset's
        # batch order used Python's global generator, whose state differs between a cold and a warm
        # feature cache, so the two runs did not agree); the tf.data pipeline decodes in parallel.
        classifier.fit(train_data.training_dataset(epochs), validation_data=val_data, epochs=epochs,
                       steps_per_epoch=len(train_data), shuffle=False,
                       class_weight=ctx.class_weight if weights is None else None, callbacks=[recorder], verbose=0)
    recorder.finish(classifier)


def _leave_strategy(ctx: TrainingContext) -> None:
    """Plain copies of the trained models (outside the strategy), to evaluate, save and export."""
    if ctx.runtime is None or not ctx.runtime.distributed:
        return
    ctx.head = _plain_copy(ctx.head) if ctx.head is not None else None
    ctx.classifier = _plain_copy(ctx.classifier) if ctx.classifier is not None else None


def _evaluate(ctx: TrainingContext) -> None:
    """Threshold on validation, metrics on test; metrics.json and predictions.csv."""
    from cxr_core.core.metrics import metrics_report, multiclass_metrics  # noqa: PLC0415

    multiclass = ctx.n_outputs > 1
    ctx.report("stage", stage="evaluate", message="testing the most probable class" if multiclass
               else "choosing the threshold on validation, testing")
    rows = ctx.rows
    mask = rows["split"].isin(["val", "test"]).to_numpy()
    if ctx.fine_tunes or ctx.features is None:
        data_ = ImageBatches(rows[mask], ctx.config, 64, with_labels=False)
        logits = ctx.classifier.predict(data_, verbose=0)
    else:
        logits = ctx.head.predict(ctx.features[mask], batch_size=256, verbose=0)
    if multiclass:
        probs = _softmax(logits)
        # probability stays P(PNEUMONIA), so readers of the binary columns still make sense of it.
        evaluated = rows[mask].assign(probability=1.0 - probs[:, 0],
                                      **{f"p_{name}": probs[:, c] for c, name in enumerate(ctx.classes)},
                                      label=np.asarray(ctx.classes, dtype=object)[probs.argmax(axis=1)])
    else:
        evaluated = rows[mask].assign(probability=sigmoid(logits.reshape(-1)))
    val = evaluated[evaluated["split"] == "val"]
    test = evaluated[evaluated["split"] == "test"]
    if multiclass:
        columns = [f"p_{name}" for name in ctx.classes]

        def report(part: pd.DataFrame) -> dict | None:
            if not len(part):
                return None
            return multiclass_metrics(part["y"].to_numpy(), part[columns].to_numpy(), ctx.classes)

        test_metrics = report(test)
        metrics = {"threshold": None, "threshold_rule": "argmax", "val": report(val),
                   "test": {"at_threshold": test_metrics} if test_metrics is not None else None}
    else:
        metrics = metrics_report(
            val["y"].to_numpy(), val["probability"].to_numpy(),
            test["y"].to_numpy(), test["probability"].to_numpy(),
            rule=ctx.config.train.threshold_rule, target_sensitivity=ctx.config.train.target_sensitivity,
        )
    metrics = {"task": ctx.config.data.task, "classes": list(ctx.classes), **metrics}
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


def _save(ctx: TrainingContext) -> None:
    ctx.report("stage", stage="save", message="saving model.keras")
    ctx.folder.save_model(ctx.classifier)


def _export(ctx: TrainingContext) -> None:
    """Write model.tflite for TensorFlow-free prediction; a failure leaves a good run that predicts with Keras."""
    if not ctx.config.train.export_litert:
        return
    ctx.report("stage", stage="export", message="exporting model.tflite (LiteRT) for light prediction")
    try:
        litert.export_classifier(ctx.classifier, ctx.folder.path, ctx.config.model.backbone)
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


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities from a softmax head's logits (float64, rows sum to 1)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


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


class EpochRecorder(keras.callbacks.Callback):
    """history.csv + progress events + the user's callback + cancellation + the best weights."""

    def __init__(self, ctx: TrainingContext, phase: str, epochs: int, n_batches: int) -> None:
        super().__init__()
        self.ctx, self.phase, self.epochs = ctx, phase, epochs
        self.offset = len(ctx.history)
        self.n_batches = max(int(n_batches), 1)
        self.cancelled = False
        self.best_auc = -math.inf
        self.best_weights = None
        self._epoch = 0
        self._t_epoch = time.time()
        self._t_batch_report = 0.0

    def on_epoch_begin(self, epoch, logs=None):  # noqa: ARG002 - Keras passes logs= by keyword
        self._t_epoch = time.time()
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):  # noqa: ARG002 - Keras passes logs= by keyword
        if self.ctx.stop_requested():
            self.cancelled = True
            self.model.stop_training = True
        now = time.time()
        if now - self._t_batch_report > 2.0:
            # Long epochs (fine-tuning on a CPU) still show life between epochs.
            self._t_batch_report = now
            rate = (batch + 1) / max(now - self._t_epoch, 1e-6)
            epochs_left = self.epochs - self._epoch - 1
            eta = (self.n_batches - batch - 1 + epochs_left * self.n_batches) / rate
            self.ctx.report("batch", phase=self.phase, batch=batch + 1, batches=self.n_batches, eta_s=eta)

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        row = {"phase": self.phase, "epoch": self.offset + epoch + 1}
        for key in ("loss", "accuracy", "auc", "precision", "recall"):
            row[key] = logs.get(key)
            row[f"val_{key}"] = logs.get(f"val_{key}")
        row["seconds"] = time.time() - self._t_epoch
        self.ctx.history.append(row)
        self.ctx.folder.write_history(self.ctx.history)
        remaining = (self.epochs - epoch - 1) * row["seconds"]
        self.ctx.report("epoch", phase=self.phase, epoch=epoch + 1, epochs=self.epochs, eta_s=remaining, logs=logs)
        val_auc = logs.get("val_auc")
        if val_auc is not None and val_auc > self.best_auc:
            self.best_auc = val_auc
            self.best_weights = self.model.get_weights()
        if self.ctx.on_epoch_end is not None:
            self.ctx.on_epoch_end(self.offset + epoch + 1, dict(row))
        if self.ctx.stop_requested():
            self.cancelled = True
            self.model.stop_training = True

    def finish(self, model) -> None:
        """After ``fit``: stop the run if it was cancelled, else keep the best epoch's weights."""
        if self.cancelled:
            raise _Cancelled
        if self.ctx.config.train.restore_best and self.best_weights is not None:
            model.set_weights(self.best_weights)


def _learning_rate(config: RunConfig, steps_per_epoch: int):
    """The fine-tuning learning rate: a number, or a schedule (linear warm-up, then constant or cosine)."""
    rate = config.train.fine_tune_learning_rate
    warmup = config.train.warmup_epochs * steps_per_epoch
    total = config.train.fine_tune_epochs * steps_per_epoch
    if not warmup and config.train.schedule == "constant":
        return rate
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=rate / 100 if warmup else rate, decay_steps=max(total - warmup, 1),
        alpha=1.0 if config.train.schedule == "constant" else 0.0,
        warmup_target=rate if warmup else None, warmup_steps=warmup)


@keras.saving.register_keras_serializable(package="cxr_core")
class SparseMacroAUC(keras.metrics.AUC):
    """Macro one-vs-rest ROC AUC of a softmax head, from class indices and logits (the ``auc`` of the
    subtype task's history, so the best epoch is chosen on validation as for the binary head)."""

    def __init__(self, num_classes: int = 3, name: str = "auc", **kwargs) -> None:
        kwargs.pop("multi_label", None), kwargs.pop("num_labels", None), kwargs.pop("from_logits", None)
        super().__init__(name=name, multi_label=True, num_labels=int(num_classes), from_logits=False, **kwargs)
        self.num_classes = int(num_classes)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), self.num_classes)
        return super().update_state(y_true, keras.ops.softmax(y_pred, axis=-1), sample_weight)

    def get_config(self) -> dict:
        return {**super().get_config(), "num_classes": self.num_classes}


@keras.saving.register_keras_serializable(package="cxr_core")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Sparse categorical cross-entropy on logits with label smoothing, which Keras' sparse loss lacks."""

    def __init__(self, num_classes: int = 3, label_smoothing: float = 0.0, name: str = "smoothed_sparse_crossentropy",
                 **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.num_classes, self.label_smoothing = int(num_classes), float(label_smoothing)

    def call(self, y_true, y_pred):
        y_true = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), self.num_classes)
        return keras.losses.categorical_crossentropy(y_true, y_pred, from_logits=True,
                                                     label_smoothing=self.label_smoothing)

    def get_config(self) -> dict:
        return {**super().get_config(), "num_classes": self.num_classes, "label_smoothing": self.label_smoothing}


def _optimizer(learning_rate, weight_decay: float = 0.0):
    optimizer = (keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay) if weight_decay
                 else keras.optimizers.Adam(learning_rate))
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        # float16 gradients underflow without loss scaling (compile adds it itself; the step below needs it).
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _metric_objects(n_outputs: int) -> list:
    # The model outputs logits; thresholds at 0 on a logit are 0.5 on a probability.
    if n_outputs > 1:
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy"), SparseMacroAUC(n_outputs, name="auc")]
    return [
        keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0),
        keras.metrics.AUC(name="auc", from_logits=True),
        # Precision and recall, because with 27:73 classes accuracy alone flatters the majority.
        keras.metrics.Precision(name="precision", thresholds=0.0),
        keras.metrics.Recall(name="recall", thresholds=0.0),
    ]


def _per_example_loss(n_outputs: int, label_smoothing: float) -> Callable:
    """The training loss of one example (the same as ``_compile``'s), unreduced."""
    def loss(y_true, logits):
        logits = keras.ops.cast(logits, "float32")
        if n_outputs > 1:
            target = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), n_outputs)
            return keras.losses.categorical_crossentropy(target, logits, from_logits=True,
                                                         label_smoothing=label_smoothing)
        return keras.losses.binary_crossentropy(keras.ops.reshape(y_true, (-1, 1)), logits, from_logits=True,
                                                label_smoothing=label_smoothing)
    return loss


def _epoch_logs(ctx: TrainingContext, y_true: np.ndarray, logits: np.ndarray, weights: np.ndarray | None = None,
                prefix: str = "") -> dict:
    """Loss and metrics of one pass, as Keras' fit reports them (loss: weighted sum over the examples)."""
    per = np.asarray(_per_example_loss(ctx.n_outputs, ctx.config.train.label_smoothing)(y_true, logits))
    weights = np.ones(len(per), np.float32) if weights is None else weights
    logs = {f"{prefix}loss": float((per * weights).sum() / max(len(per), 1))}
    target = y_true if ctx.n_outputs > 1 else y_true.reshape(-1, 1)
    for metric in _metric_objects(ctx.n_outputs):
        metric.update_state(target, logits)
        logs[f"{prefix}{metric.name}"] = float(metric.result())
    return logs


def _row_weights(ctx: TrainingContext, y: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Per-example training weights: the sample weights, else the class weights, else ones."""
    if weights is not None:
        return np.asarray(weights, np.float32)
    if ctx.class_weight:
        return np.array([ctx.class_weight.get(int(v), 1.0) for v in y], np.float32)
    return np.ones(len(y), np.float32)


def _predict(model, inputs) -> np.ndarray:
    """Logits of ``inputs`` (an array, or batches of images), called directly: Keras' predict cannot
    run under MultiWorkerMirroredStrategy, and this runs on this worker alone."""
    import tensorflow as tf  # noqa: PLC0415

    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    if isinstance(inputs, np.ndarray):
        batches = [inputs[i:i + 256] for i in range(0, len(inputs), 256)]
    else:
        batches = (inputs[i][0] for i in range(len(inputs)))
    parts = [np.asarray(forward(tf.convert_to_tensor(batch)), np.float32) for batch in batches]
    return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


def _plain_copy(model):
    """The same model and weights, built outside any strategy (to evaluate, save and export)."""
    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def _sync_fit(ctx: TrainingContext, model, optimizer, recorder: "EpochRecorder", epochs: int, n_rows: int,
              load: Callable[[np.ndarray], np.ndarray], y: np.ndarray, weights: np.ndarray,
              validate: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
              dataset: ImageBatches | None = None) -> None:
    """Synchronous data-parallel training for MultiWorkerMirroredStrategy, whose ``fit`` Keras 3 cannot run.

    Every worker draws the same shuffled order each epoch and cuts it into global batches of
    ``batch_size x replicas``; replica r trains on its slice, so the workers take the same number
    of steps (a worker one step short would leave the others waiting). A short last batch is padded
    with rows of weight 0, so every step has one shape and the loss is still divided by the real
    number of examples (``tf.nn.compute_average_loss``); the optimiser sums the replicas' gradients.
    The gathered logits give the epoch's training metrics; ``validate`` (on this worker only) the
    ``val_*`` ones. Cancellation is agreed by all workers between steps. ``recorder`` writes
    history.csv and the progress events as under ``fit``. With ``dataset`` (the training images), its
    epoch order and online augmentation are used, driven as ``fit`` drives a PyDataset (``on_epoch_end``
    when training starts and after every epoch), so a run trains on the same batches as on one device.
    """
    import tensorflow as tf  # noqa: PLC0415

    runtime = ctx.runtime
    strategy = runtime.strategy
    per_replica = ctx.config.train.batch_size
    global_batch = runtime.global_batch(per_replica)
    n_steps = max(math.ceil(n_rows / global_batch), 1)
    loss_of = _per_example_loss(ctx.n_outputs, ctx.config.train.label_smoothing)
    with runtime.scope():
        optimizer.build(model.trainable_variables)

    def replica_step(x, y_true, w, n_real):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.nn.compute_average_loss(loss_of(y_true, logits), sample_weight=w, global_batch_size=n_real)
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return keras.ops.cast(logits, "float32")

    @tf.function
    def step(x, y_true, w, n_real):
        return strategy.gather(strategy.run(replica_step, args=(x, y_true, w, n_real)), axis=0)

    recorder.set_model(model)
    seed = ctx.config.train.seed
    if dataset is not None:
        dataset.on_epoch_end()
    for epoch in range(epochs):
        recorder.on_epoch_begin(epoch)
        # The same on every worker: drawn from the run's seed.
        order = dataset.order if dataset is not None else np.random.default_rng(seed + epoch).permutation(n_rows)
        seen: list[np.ndarray] = []
        logits_seen: list[np.ndarray] = []
        for number in range(n_steps):
            chosen = order[number * global_batch:(number + 1) * global_batch]
            slots = np.full(global_batch, -1)
            slots[:len(chosen)] = chosen
            made: dict[int, tuple] = {}

            def part(replica_ctx, which, slots=slots, made=made):
                r = replica_ctx.replica_id_in_sync_group
                if r not in made:
                    mine = slots[r * per_replica:(r + 1) * per_replica]
                    real = mine[mine >= 0]
                    x = load(real)
                    if len(real) < per_replica:  # padding of weight 0
                        x = np.concatenate([x, np.zeros((per_replica - len(real), *x.shape[1:]), x.dtype)])
                    yy, ww = np.zeros(per_replica, np.float32), np.zeros(per_replica, np.float32)
                    yy[:len(real)], ww[:len(real)] = y[real], weights[real]
                    made[r] = (np.asarray(x, np.float32), yy, ww)
                return tf.constant(made[r][which])

            x, y_true, w = (strategy.experimental_distribute_values_from_function(
                lambda c, k=k: part(c, k)) for k in range(3))
            logits = np.asarray(step(x, y_true, w, tf.constant(len(chosen), tf.int64)))
            seen.append(chosen)
            logits_seen.append(logits[:len(chosen)])
            recorder.on_train_batch_end(number)
            if runtime.any(recorder.cancelled):
                recorder.cancelled = True
                break
        if recorder.cancelled:
            break
        rows_seen = np.concatenate(seen)
        logs = _epoch_logs(ctx, y[rows_seen], np.concatenate(logits_seen), weights[rows_seen])
        if validate is not None:
            val_y, val_logits = validate()
            logs.update(_epoch_logs(ctx, val_y, val_logits, prefix="val_"))
        recorder.on_epoch_end(epoch, logs)
        if dataset is not None:
            dataset.on_epoch_end()  # the next epoch's order and online augmentation
        if runtime.any(recorder.cancelled):
            recorder.cancelled = True
            break


def _compile(model, learning_rate, label_smoothing: float = 0.0, steps_per_execution: int = 1,
             weight_decay: float = 0.0, n_outputs: int = 1) -> None:
    # The model outputs logits; thresholds at 0 on a logit are 0.5 on a probability.
    optimizer = (keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay) if weight_decay
                 else keras.optimizers.Adam(learning_rate))
    if n_outputs > 1:
        # A softmax head over class indices; the history keeps the binary column names.
        loss = (SmoothedSparseCrossentropy(n_outputs, label_smoothing) if label_smoothing
                else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.compile(optimizer=optimizer, loss=loss,
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                               SparseMacroAUC(n_outputs, name="auc")],
                      steps_per_execution=steps_per_execution)
        return
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=label_smoothing),
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0),
            keras.metrics.AUC(name="auc", from_logits=True),
            # Precision and recall, because with 27:73 classes accuracy alone flatters the majority.
            keras.metrics.Precision(name="precision", thresholds=0.0),
            keras.metrics.Recall(name="recall", thresholds=0.0),
        ],
        steps_per_execution=steps_per_execution,
    )


class ImageBatches(keras.utils.PyDataset):
    """Batches decoded from disk in worker threads (never the whole set in memory)."""

    def __init__(self, rows: pd.DataFrame, config: RunConfig, batch_size: int, shuffle: bool = False,
                 online_augment: bool = False, with_labels: bool = True, weights: np.ndarray | None = None) -> None:
        super().__init__(workers=2, use_multiprocessing=False, max_queue_size=4)
        self.config, self.batch_size = config, batch_size
        self.shuffle, self.online_augment, self.with_labels = shuffle, online_augment, with_labels
        self.size = config.model.resolved_image_size
        self.paths = rows["path"].tolist()
        self.seeds = (rows["augment_seed"].fillna(-1).astype(int).tolist() if "augment_seed" in rows
                      else [-1] * len(rows))
        self.labels = rows["y"].to_numpy(dtype=np.float32)
        self.weights = weights
        self.order = np.arange(len(self.paths))
        self.epoch = 0
        self._shuffle()

    def _shuffle(self) -> None:
        self.order = self.epoch_order(self.epoch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The row order of epoch counter ``epoch`` (drawn from the run's seed when shuffling)."""
        if not self.shuffle:
            return np.arange(len(self.paths))
        return np.random.default_rng(self.config.train.seed + epoch).permutation(len(self.paths))

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def image(self, i: int, epoch: int | None = None) -> np.ndarray:
        """The model input of row ``i`` (its stored augmentation, and the epoch's online one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        gray = load_gray(self.paths[i])
        if self.seeds[i] >= 0:
            gray = augment_image(gray, self.config.augment, self.seeds[i])
        if self.online_augment:
            seed = self.config.train.seed * 1_000_003 + epoch * 100_003 + int(i)
            gray = augment_image(gray, self.config.augment, seed)
        return to_model_input(gray, self.size)

    def load(self, positions) -> np.ndarray:
        """The model inputs of the rows at ``positions`` (decoded in threads), float32 (n, size, size, 3)."""
        if not len(positions):
            return np.zeros((0, self.size, self.size, 3), np.float32)
        with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
            return np.stack(list(pool.map(self.image, [int(i) for i in positions]))).astype(np.float32)

    def __getitem__(self, index):
        chosen = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        batch = np.stack([self.image(i) for i in chosen]).astype(np.float32)
        if not self.with_labels:
            return (batch,)
        if self.weights is not None:
            return batch, self.labels[chosen], self.weights[chosen]
        return batch, self.labels[chosen]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._shuffle()

    def training_dataset(self, epochs: int):
        """``epochs`` epochs of training batches as one tf.data pipeline: images decoded in parallel
        (``map`` with AUTOTUNE, in order) and prefetched, also across epoch boundaries. Measured on
        2 CPU cores (benchmarks/distribute.py) it delivers about 1.6 times the images per second of
        this PyDataset under ``fit``, so a fast device waits less for JPEG decoding.

        Epoch k has the order and online augmentation of epoch counter k + 1, the batches ``fit``
        gives a PyDataset (it calls ``on_epoch_end`` once before training). Use it with
        ``steps_per_epoch=len(self)``, so that ``fit`` keeps one iterator for all epochs.
        """
        import tensorflow as tf  # noqa: PLC0415

        n, size = len(self.paths), self.size
        plan = np.stack([np.stack([self.epoch_order(k + 1), np.full(n, k + 1)], axis=1) for k in range(epochs)])
        labels = tf.constant(self.labels)
        weights = tf.constant(self.weights, tf.float32) if self.weights is not None else None

        def decode(pair: np.ndarray) -> np.ndarray:
            return self.image(int(pair[0]), int(pair[1])).astype(np.float32, copy=False)

        def load(pair):
            image = tf.ensure_shape(tf.numpy_function(decode, [pair], tf.float32), (size, size, 3))
            row = pair[0]
            if weights is not None:
                return image, tf.gather(labels, row), tf.gather(weights, row)
            return image, tf.gather(labels, row)

        def epoch_batches(pairs):
            return (tf.data.Dataset.from_tensor_slices(pairs)
                    .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(self.batch_size))

        return (tf.data.Dataset.from_tensor_slices(plan.astype(np.int64)).flat_map(epoch_batches)
                .prefetch(tf.data.AUTOTUNE))
