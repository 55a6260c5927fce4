"""Training: ``train(config) -> run folder``.

The stages, in order, each reported to ``progress.jsonl``:

1. scan the data set and split it (``split.csv``), add augmented NORMAL images to the training
   part when balancing by augmentation (never to validation or test);
2. head phase: with the backbone frozen, its output for an image never changes, so the backbone
   runs once per image (``features.extract_features``, cached on disk) and the head trains on
   those features: an epoch costs well under a second instead of minutes;
3. optional fine-tuning: unfreeze the top layers and train the whole network on images streamed
   from disk (``keras.utils.PyDataset``), at a low learning rate;
4. choose the decision threshold on validation, evaluate on test (``metrics.json``), save the
   model last (``model.keras``) and only then mark the run done.

No Streamlit here: callers pass plain callables (``on_epoch_end``, ``should_stop``, ``on_progress``).
"""
from __future__ import annotations

import errno
import logging
import math
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from . import runs
from .atomic import append_jsonl, atomic_path, write_json_atomic, write_text_atomic
from .config import RunConfig
from .errors import CxrError, DiskFullError

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict], None]
StopCheck = Callable[[], bool]
ProgressCallback = Callable[[dict], None]

# Images per second of the frozen backbone at its default size on a 2-core laptop CPU, measured
# with benchmarks/run.py; used only to estimate durations before a run starts.
THROUGHPUT = {"inception_v3": 8.0, "mobilenet_v2": 25.0, "efficientnet_b0": 18.0, "densenet121": 6.0}


class _Cancelled(Exception):
    """Raised inside training when the user asked to stop."""


def estimate_seconds(config: RunConfig, n_images: int, cached_fraction: float = 0.0) -> float:
    """A rough duration of a run on a 2-core CPU, for the Training page.

    Args:
        config: the run's settings.
        n_images: images in the data set (after ``limit``), before balancing.
        cached_fraction: share of the features already in the cache (0..1).
    Returns:
        Estimated seconds.
    """
    from .config import BACKBONE_INFO  # noqa: PLC0415

    default = BACKBONE_INFO.get(config.model.backbone, {}).get("default_size", 224)
    size = config.model.image_size or default
    speed = THROUGHPUT.get(config.model.backbone, 10.0)
    if config.model.backbone == "mobilenet_v2":
        speed *= 1.0 / max(config.model.alpha, 0.35) ** 0.8
    speed *= (default / size) ** 2
    n_train = n_images * (1 - config.data.val_fraction - config.data.test_fraction)
    extra = 0.0
    if config.train.balance == "augment":
        # Kermany is about 27:73, so balancing adds about 46% of the training part.
        extra = 0.46 * n_train
    seconds = 5.0
    if config.train.export_litert:
        # The LiteRT conversion: about 1.4 s for MobileNetV2, 8 s for InceptionV3 (it grows with the graph).
        seconds += 1.5 if config.model.backbone == "mobilenet_v2" else 8.0
    if config.train.epochs:
        seconds += (n_images + extra) * (1 - cached_fraction) / speed + 0.3 * config.train.epochs
    if config.train.fine_tune_epochs and config.train.fine_tune_layers:
        # Training passes cost about three forward passes; validation and test are predicted each time.
        per_epoch = (n_train + extra) * 3 / speed + n_images * 0.1 / speed
        seconds += per_epoch * config.train.fine_tune_epochs + n_images * 0.2 / speed
    return float(seconds)


class _Reporter:
    """Writes progress events to the run folder and forwards them to a callback."""

    def __init__(self, run_dir: Path, on_progress: ProgressCallback | None) -> None:
        self.run_dir = run_dir
        self.on_progress = on_progress

    def __call__(self, event: str, **fields: Any) -> None:
        record = {"time": time.time(), "event": event, **fields}
        append_jsonl(self.run_dir / "progress.jsonl", record)
        if self.on_progress is not None:
            self.on_progress(record)


def train(
    config: RunConfig,
    on_epoch_end: EpochCallback | None = None,
    should_stop: StopCheck | None = None,
    on_progress: ProgressCallback | None = None,
    run_dir: str | os.PathLike | None = None,
) -> Path:
    """Train a classifier as ``config`` says and return its run folder.

    Args:
        config: the run's settings (saved as ``config.json``).
        on_epoch_end: called after every epoch with (epoch number from 1, logs dict).
        should_stop: polled between batches; returning True cancels the run.
        on_progress: called with every progress event (the same dicts as ``progress.jsonl``).
        run_dir: an existing empty folder to use (the background launcher makes one);
            by default a new folder under ``runs.runs_root()``.
    Returns:
        The run folder. Its ``status.json`` says done, failed or cancelled.
    Raises:
        CxrError: bad input (the run folder is marked failed with the same sentence first).
    """
    started = time.time()
    if run_dir is None:
        run_dir = runs.new_run_dir(hint=f"{config.model.backbone}-{config.data.split}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    report = _Reporter(run_dir, on_progress)
    stop_file = runs.request_cancel_file(run_dir)

    def stop_requested() -> bool:
        return stop_file.exists() or bool(should_stop and should_stop())

    write_json_atomic(run_dir / "config.json", config.to_dict())
    runs.write_status(run_dir, "running", pid=os.getpid(), started=started, message="starting")
    try:
        metrics = _train(config, run_dir, report, stop_requested, on_epoch_end)
    except _Cancelled:
        report("cancelled", message="cancelled by the user")
        runs.write_status(run_dir, "cancelled", message="cancelled by the user")
        return run_dir
    except CxrError as error:
        report("failed", message=str(error))
        runs.write_status(run_dir, "failed", message=str(error), error=str(error))
        raise
    except OSError as error:
        if error.errno != errno.ENOSPC:
            _record_failure(run_dir, report, error)
            raise
        text = (f"The disk is full: run {run_dir.name} could not be written ({error.strerror}); "
                "free some space and train again.")
        _record_failure(run_dir, report, error, text)
        raise DiskFullError(text) from error
    except Exception as error:  # recorded for the page, then re-raised for the caller
        _record_failure(run_dir, report, error)
        raise
    duration = time.time() - started
    auc = ((metrics.get("test") or {}).get("at_threshold") or {}).get("roc_auc")
    message = f"done in {duration:.0f} s" + (f", test AUC {auc:.3f}" if auc is not None else "")
    report("done", message=message)
    runs.write_status(run_dir, "done", message=message, duration_s=duration)
    return run_dir


def _record_failure(run_dir: Path, report: "_Reporter", error: BaseException, text: str | None = None) -> None:
    """Mark the run failed; when the disk is full even that may fail, and the status reader
    then reports the dead process as failed anyway."""
    text = text or f"{type(error).__name__}: {error}"
    try:
        report("failed", message=text)
        runs.write_status(run_dir, "failed", message=text, error=text, traceback=traceback.format_exc())
    except OSError:
        log.error("could not record the failure of %s: %s", run_dir, text)


def _train(config: RunConfig, run_dir: Path, report: _Reporter, stop_requested: StopCheck,
           on_epoch_end: EpochCallback | None) -> dict:
    from . import augment, data  # noqa: PLC0415

    t0 = time.time()
    report("stage", stage="scan", message=f"scanning {config.data.data_dir}")
    scan = data.scan_dataset(config.data.data_dir)
    manifest = scan.manifest
    if config.data.limit is not None and config.data.limit < len(manifest):
        manifest = data.stratified_subset(manifest, config.data.limit, seed=config.data.seed)
    problems = [frame for frame in (scan.skipped, _duplicates_as_skipped(scan.duplicates)) if len(frame)]

    report("stage", stage="split", message=f"{config.data.split} split of {len(manifest)} images")
    split = data.make_split(
        manifest, mode=config.data.split, seed=config.data.seed,
        val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction,
    )
    split = split.assign(augment_seed=-1, is_augmented=False)
    train_part = split[split["split"] == "train"]
    plan = augment.balance_plan(train_part["label"].tolist(), config.train.balance)
    rows = split.reset_index(drop=True)
    if plan.n_extra > 0:
        extra = augment.augmented_rows(train_part, plan.n_extra, seed=config.train.seed)
        rows = pd.concat([split, extra], ignore_index=True)
    _write_csv(run_dir / "split.csv", rows.drop(columns=["y"], errors="ignore"))
    report("stage", stage="split", message=(
        f"train {int((rows['split'] == 'train').sum())} (of which {plan.n_extra} augmented), "
        f"val {int((rows['split'] == 'val').sum())}, test {int((rows['split'] == 'test').sum())}"))
    if stop_requested():
        raise _Cancelled

    _seed_everything(config.train.seed)
    backbone = None
    head = None
    history: list[dict] = []
    features = None
    if config.train.epochs > 0:
        features, rows, extract_errors, backbone = _extract(config, rows, report, stop_requested)
        if len(extract_errors):
            problems.append(extract_errors)
        head = _train_head(config, rows, features, plan, report, stop_requested, on_epoch_end, history, run_dir)
    else:
        rows, unreadable = _readable_rows(rows)
        if len(unreadable):
            problems.append(unreadable)
    _write_csv(run_dir / "skipped.csv", pd.concat(problems, ignore_index=True) if problems
               else pd.DataFrame(columns=["path", "reason"]))

    from . import model as model_lib  # noqa: PLC0415

    fine_tuned = config.train.fine_tune_epochs > 0 and config.train.fine_tune_layers != 0
    classifier = model_lib.build_classifier(config.model, seed=config.train.seed, backbone=backbone, head=head,
                                            train_batchnorm=fine_tuned and _from_scratch(config))
    if fine_tuned:
        _fine_tune(config, classifier, rows, plan, report, stop_requested, on_epoch_end, history, run_dir)

    report("stage", stage="evaluate", message="choosing the threshold on validation, testing")
    if fine_tuned or features is None:
        probabilities = _predict_images(classifier, rows[rows["split"].isin(["val", "test"])], config, stop_requested)
        evaluated = rows[rows["split"].isin(["val", "test"])].assign(probability=probabilities)
    else:
        mask = rows["split"].isin(["val", "test"]).to_numpy()
        logits = head.predict(features[mask], batch_size=256, verbose=0).reshape(-1)
        evaluated = rows[mask].assign(probability=_sigmoid(logits))
    metrics = _evaluate(config, evaluated, rows, plan, scan, time.time() - t0)
    _write_csv(run_dir / "predictions.csv", evaluated[["path", "y", "probability", "split", "label", "patient_id"]])
    write_json_atomic(run_dir / "metrics.json", metrics)

    if stop_requested():
        raise _Cancelled
    report("stage", stage="save", message="saving model.keras")
    with atomic_path(run_dir / runs.MODEL_FILE) as tmp:
        classifier.save(tmp)
    if config.train.export_litert:
        _export_litert(classifier, config, run_dir, report)
    return metrics


def _export_litert(classifier, config: RunConfig, run_dir: Path, report: "_Reporter") -> None:
    """Write model.tflite for TensorFlow-free prediction; a failure leaves a good run that predicts with Keras."""
    from . import litert  # noqa: PLC0415

    report("stage", stage="export", message="exporting model.tflite (LiteRT) for light prediction")
    try:
        litert.export_classifier(classifier, run_dir, config.model.backbone)
    except (CxrError, OSError) as error:
        log.warning("Run %s: no LiteRT export (%s); the app will predict with Keras.", run_dir, error)
        report("warning", message=f"No LiteRT export: {error} The run predicts with Keras instead.")


def _from_scratch(config: RunConfig) -> bool:
    """A randomly initialised backbone trained whole: its BatchNorm layers must learn too."""
    return config.model.weights == "none" and config.train.fine_tune_layers == -1


def _seed_everything(seed: int) -> None:
    # Training runs in its own process (or a test); seeding Keras' global generators there makes a
    # rerun reproducible: initialisation, dropout masks and shuffling.
    import keras  # noqa: PLC0415

    keras.utils.set_random_seed(seed)


def _duplicates_as_skipped(duplicates: pd.DataFrame) -> pd.DataFrame:
    if duplicates is None or not len(duplicates):
        return pd.DataFrame(columns=["path", "reason"])
    return pd.DataFrame({
        "path": duplicates["path"],
        "reason": "same bytes as " + duplicates["duplicate_of"].astype(str) + " (left out so it cannot leak)",
    })


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    write_text_atomic(path, frame.to_csv(index=False))


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))


def _extract(config: RunConfig, rows: pd.DataFrame, report: _Reporter, stop_requested: StopCheck):
    from . import features as features_lib  # noqa: PLC0415

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

    result = features_lib.extract_features(
        rows, config.model, config.augment,
        cache_dir=config.train.cache_dir, batch_size=max(config.train.batch_size, 16), seed=config.train.seed,
        on_progress=progress, should_stop=stop_requested,
    )
    if result.cancelled:
        raise _Cancelled
    report("extract", done=total, total=total, eta_s=0.0, cached=int(result.n_cached), computed=int(result.n_computed))
    kept = rows.iloc[np.asarray(result.index, dtype=int)].reset_index(drop=True)
    _require_both_classes(kept)
    backbone = getattr(result, "backbone", None)
    return np.asarray(result.features, dtype=np.float32), kept, result.errors, backbone


def _require_both_classes(rows: pd.DataFrame) -> None:
    for part in ("train", "val", "test"):
        labels = set(rows.loc[rows["split"] == part, "label"])
        if len(labels) < 2:
            from .errors import BadDatasetError  # noqa: PLC0415

            raise BadDatasetError(
                f"After leaving out unreadable images the {part} part has only {', '.join(labels) or 'no'} "
                "images; add more readable images of both classes.")


def _readable_rows(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode every image once (in threads) and drop the unreadable ones before streaming."""
    from .images import load_gray  # noqa: PLC0415

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
    _require_both_classes(kept)
    return kept, pd.DataFrame({"path": bad, "reason": [reasons[p] for p in bad]})


def _class_weight(plan) -> dict[int, float] | None:
    return dict(plan.class_weight) if getattr(plan, "class_weight", None) else None


class _EpochRecorder:
    """A Keras callback: history.csv + progress events + user callback + cancellation."""

    def __new__(cls, *args, **kwargs):  # built lazily so that importing train does not import keras
        import keras  # noqa: PLC0415

        class Recorder(keras.callbacks.Callback):
            def __init__(self, phase, epochs, offset, report, stop_requested, on_epoch_end, history, run_dir,
                         n_batches):
                super().__init__()
                self.phase, self.epochs, self.offset = phase, epochs, offset
                self.report, self.stop_requested = report, stop_requested
                self.user_callback, self.history, self.run_dir = on_epoch_end, history, run_dir
                self.n_batches = max(int(n_batches), 1)
                self.cancelled = False
                self.best_auc = -math.inf
                self.best_weights = None
                self._t_epoch = time.time()
                self._t_batch_report = 0.0

            def on_epoch_begin(self, epoch, logs=None):
                self._t_epoch = time.time()
                self._epoch = epoch

            def on_train_batch_end(self, batch, logs=None):
                if self.stop_requested():
                    self.cancelled = True
                    self.model.stop_training = True
                now = time.time()
                if now - self._t_batch_report > 2.0:
                    # Long epochs (fine-tuning on a CPU) still show life between epochs.
                    self._t_batch_report = now
                    rate = (batch + 1) / max(now - self._t_epoch, 1e-6)
                    epochs_left = self.epochs - getattr(self, "_epoch", 0) - 1
                    eta = (self.n_batches - batch - 1 + epochs_left * self.n_batches) / rate
                    self.report("batch", phase=self.phase, batch=batch + 1, batches=self.n_batches, eta_s=eta)

            def on_epoch_end(self, epoch, logs=None):
                logs = {k: float(v) for k, v in (logs or {}).items()}
                row = {"phase": self.phase, "epoch": self.offset + epoch + 1}
                for key in ("loss", "accuracy", "auc", "precision", "recall"):
                    row[key] = logs.get(key)
                    row[f"val_{key}"] = logs.get(f"val_{key}")
                row["seconds"] = time.time() - self._t_epoch
                self.history.append(row)
                _write_csv(self.run_dir / "history.csv", pd.DataFrame(self.history, columns=runs.HISTORY_COLUMNS))
                remaining = (self.epochs - epoch - 1) * row["seconds"]
                self.report("epoch", phase=self.phase, epoch=epoch + 1, epochs=self.epochs, eta_s=remaining,
                            logs=logs)
                val_auc = logs.get("val_auc")
                if val_auc is not None and val_auc > self.best_auc:
                    self.best_auc = val_auc
                    self.best_weights = self.model.get_weights()
                if self.user_callback is not None:
                    self.user_callback(self.offset + epoch + 1, dict(row))
                if self.stop_requested():
                    self.cancelled = True
                    self.model.stop_training = True

        return Recorder(*args, **kwargs)


def _compile(model, learning_rate: float, steps_per_execution: int = 1) -> None:
    import keras  # noqa: PLC0415

    # The model outputs logits; thresholds at 0 on a logit are 0.5 on a probability.
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0),
            keras.metrics.AUC(name="auc", from_logits=True),
            # Precision and recall, because with 27:73 classes accuracy alone flatters the majority.
            keras.metrics.Precision(name="precision", thresholds=0.0),
            keras.metrics.Recall(name="recall", thresholds=0.0),
        ],
        steps_per_execution=steps_per_execution,
    )


def _train_head(config, rows, features, plan, report, stop_requested, on_epoch_end, history, run_dir):
    from . import model as model_lib  # noqa: PLC0415

    train_mask = (rows["split"] == "train").to_numpy()
    val_mask = (rows["split"] == "val").to_numpy()
    y = rows["y"].to_numpy(dtype=np.float32)
    # Seeded here, not only at the start: a cold run builds the backbone (which draws random numbers)
    # and a warm run does not, and both must train the same head.
    _seed_everything(config.train.seed)
    head = model_lib.build_head(features.shape[1], config.model.dropout, seed=config.train.seed)
    # A head step on in-memory features costs microseconds; running many steps per call removes the
    # per-step Python overhead that would otherwise dominate an epoch.
    _compile(head, config.train.learning_rate, steps_per_execution=32)
    report("stage", stage="train", total=config.train.epochs,
           message=f"training the head for {config.train.epochs} epochs on cached features")
    n_batches = math.ceil(train_mask.sum() / config.train.batch_size)
    recorder = _EpochRecorder("head", config.train.epochs, 0, report, stop_requested, on_epoch_end, history,
                              run_dir, n_batches)
    head.fit(
        features[train_mask], y[train_mask],
        validation_data=(features[val_mask], y[val_mask]),
        epochs=config.train.epochs, batch_size=config.train.batch_size, shuffle=True,
        class_weight=_class_weight(plan), callbacks=[recorder], verbose=0,
    )
    if recorder.cancelled:
        raise _Cancelled
    if config.train.restore_best and recorder.best_weights is not None:
        head.set_weights(recorder.best_weights)
    return head


def _image_dataset(rows: pd.DataFrame, config: RunConfig, batch_size: int, shuffle: bool, online_augment: bool,
                   with_labels: bool = True):
    """A Keras PyDataset that decodes batches from disk in worker threads (never the whole set in memory)."""
    import keras  # noqa: PLC0415

    from .augment import augment_image  # noqa: PLC0415
    from .images import load_gray, to_model_input  # noqa: PLC0415
    from .model import resolve_image_size  # noqa: PLC0415

    size = resolve_image_size(config.model)
    paths = rows["path"].tolist()
    seeds = rows["augment_seed"].fillna(-1).astype(int).tolist() if "augment_seed" in rows else [-1] * len(rows)
    labels = rows["y"].to_numpy(dtype=np.float32)

    class ImageBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=2, use_multiprocessing=False, max_queue_size=4)
            self.order = np.arange(len(paths))
            self.epoch = 0
            self._shuffle()

        def _shuffle(self):
            if shuffle:
                self.order = np.random.default_rng(config.train.seed + self.epoch).permutation(len(paths))

        def __len__(self):
            return math.ceil(len(paths) / batch_size)

        def __getitem__(self, index):
            chosen = self.order[index * batch_size:(index + 1) * batch_size]
            images = []
            for i in chosen:
                gray = load_gray(paths[i])
                if seeds[i] >= 0:
                    gray = augment_image(gray, config.augment, seeds[i])
                if online_augment:
                    gray = augment_image(gray, config.augment, config.train.seed * 1_000_003 + self.epoch * 100_003 + int(i))
                images.append(to_model_input(gray, size))
            batch = np.stack(images).astype(np.float32)
            return (batch, labels[chosen]) if with_labels else (batch,)

        def on_epoch_end(self):
            self.epoch += 1
            self._shuffle()

    return ImageBatches()


def _fine_tune(config, classifier, rows, plan, report, stop_requested, on_epoch_end, history, run_dir) -> None:
    from . import model as model_lib  # noqa: PLC0415

    model_lib.unfreeze_top_layers(classifier, config.train.fine_tune_layers, include_batchnorm=_from_scratch(config))
    if _from_scratch(config):
        import keras  # noqa: PLC0415

        # Keras applications use BatchNorm momentum 0.99-0.999, made for ImageNet's million steps;
        # from scratch on a few thousand images the moving statistics would lag for many epochs and
        # validation (inference mode) would see a constant output. 0.9 follows the batches quickly.
        for layer in classifier.get_layer("backbone").layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.9
    _compile(classifier, config.train.fine_tune_learning_rate)
    epochs = config.train.fine_tune_epochs
    report("stage", stage="fine_tune", total=epochs,
           message=f"fine-tuning {'all' if config.train.fine_tune_layers < 0 else config.train.fine_tune_layers} "
                   f"backbone layers for {epochs} epochs on streamed images")
    train_rows = rows[rows["split"] == "train"]
    val_rows = rows[rows["split"] == "val"]
    train_data = _image_dataset(train_rows, config, config.train.batch_size, shuffle=True,
                                online_augment=config.train.online_augment)
    val_data = _image_dataset(val_rows, config, config.train.batch_size, shuffle=False, online_augment=False)
    offset = len(history)
    recorder = _EpochRecorder("fine_tune", epochs, offset, report, stop_requested, on_epoch_end, history, run_dir,
                              len(train_data))
    classifier.fit(train_data, validation_data=val_data, epochs=epochs, class_weight=_class_weight(plan),
                   callbacks=[recorder], verbose=0)
    if recorder.cancelled:
        raise _Cancelled
    if config.train.restore_best and recorder.best_weights is not None:
        classifier.set_weights(recorder.best_weights)


def _predict_images(classifier, rows: pd.DataFrame, config: RunConfig, stop_requested: StopCheck) -> np.ndarray:
    data = _image_dataset(rows, config, 64, shuffle=False, online_augment=False, with_labels=False)
    logits = classifier.predict(data, verbose=0).reshape(-1)
    return _sigmoid(logits)


def _evaluate(config: RunConfig, evaluated: pd.DataFrame, rows: pd.DataFrame, plan, scan, seconds: float) -> dict:
    from .evaluate import metrics_report  # noqa: PLC0415

    val = evaluated[evaluated["split"] == "val"]
    test = evaluated[evaluated["split"] == "test"]
    report = metrics_report(
        val["y"].to_numpy(), val["probability"].to_numpy(),
        test["y"].to_numpy(), test["probability"].to_numpy(),
        rule=config.train.threshold_rule, target_sensitivity=config.train.target_sensitivity,
    )
    originals = rows[~rows["is_augmented"].astype(bool)] if "is_augmented" in rows else rows
    counts = {
        part: {label: int(n) for label, n in originals[originals["split"] == part]["label"].value_counts().items()}
        for part in ("train", "val", "test")
    }
    report.update(
        n_images=int(len(originals)),
        n_augmented=int(len(rows) - len(originals)),
        split_counts=counts,
        balance={"strategy": plan.strategy, "n_extra": int(plan.n_extra),
                 "class_weight": _class_weight(plan)},
        n_patients_test=int(test["patient_id"].nunique()) if "patient_id" in test else None,
        layout=getattr(scan, "layout", None),
        duration_s=seconds,
    )
    return report
