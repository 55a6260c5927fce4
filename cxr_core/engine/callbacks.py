"""What happens around each batch and epoch of training, one job per callback.

``EpochRecorder`` bundles them for a phase (``head`` or ``fine_tune``): ``Keras``' ``fit`` takes its
``callbacks``, and the synchronous multi-worker step (``cxr_core.engine.sync_fit``) drives the same
list, so a run reports the same history and events either way.
"""
from __future__ import annotations

import math
import time

import keras

from cxr_core.engine.context import Cancelled, TrainingContext

#: Seconds between two "batch" events: long epochs (fine-tuning on a CPU) still show life between epochs.
BATCH_REPORT_EVERY_S = 2.0
HISTORY_KEYS = ("loss", "accuracy", "auc", "precision", "recall")


class BatchProgress(keras.callbacks.Callback):
    """A "batch" progress event at most every few seconds, with the time left in the phase."""

    def __init__(self, ctx: TrainingContext, phase: str, epochs: int, n_batches: int) -> None:
        super().__init__()
        self.ctx, self.phase, self.epochs = ctx, phase, epochs
        self.n_batches = max(int(n_batches), 1)
        self._epoch = 0
        self._t_epoch = time.time()
        self._t_report = 0.0

    def on_epoch_begin(self, epoch, logs=None):  # noqa: ARG002 - Keras passes logs= by keyword
        self._t_epoch = time.time()
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):  # noqa: ARG002 - Keras passes logs= by keyword
        now = time.time()
        if now - self._t_report <= BATCH_REPORT_EVERY_S:
            return
        self._t_report = now
        rate = (batch + 1) / max(now - self._t_epoch, 1e-6)
        epochs_left = self.epochs - self._epoch - 1
        eta = (self.n_batches - batch - 1 + epochs_left * self.n_batches) / rate
        self.ctx.report("batch", phase=self.phase, batch=batch + 1, batches=self.n_batches, eta_s=eta)


class EpochHistory(keras.callbacks.Callback):
    """Each epoch: a row of history.csv, an "epoch" progress event and the caller's ``on_epoch_end``."""

    def __init__(self, ctx: TrainingContext, phase: str, epochs: int) -> None:
        super().__init__()
        self.ctx, self.phase, self.epochs = ctx, phase, epochs
        self.offset = len(ctx.history)  # the fine-tuning epochs follow the head's
        self._t_epoch = time.time()

    def on_epoch_begin(self, epoch, logs=None):  # noqa: ARG002 - Keras passes logs= by keyword
        self._t_epoch = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        row = {"phase": self.phase, "epoch": self.offset + epoch + 1}
        for key in HISTORY_KEYS:
            row[key] = logs.get(key)
            row[f"val_{key}"] = logs.get(f"val_{key}")
        row["seconds"] = time.time() - self._t_epoch
        self.ctx.history.append(row)
        self.ctx.folder.write_history(self.ctx.history)
        remaining = (self.epochs - epoch - 1) * row["seconds"]
        self.ctx.report("epoch", phase=self.phase, epoch=epoch + 1, epochs=self.epochs, eta_s=remaining, logs=logs)
        if self.ctx.on_epoch_end is not None:
            self.ctx.on_epoch_end(self.offset + epoch + 1, dict(row))


class StopOnRequest(keras.callbacks.Callback):
    """Stops training after the batch or epoch in which a person asked the run to stop."""

    def __init__(self, ctx: TrainingContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.cancelled = False

    def _check(self) -> None:
        if self.ctx.stop_requested():
            self.cancelled = True
            self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):  # noqa: ARG002 - Keras passes logs= by keyword
        self._check()

    def on_epoch_end(self, epoch, logs=None):  # noqa: ARG002 - Keras passes logs= by keyword
        self._check()


class BestWeights(keras.callbacks.Callback):
    """Keeps the weights of the epoch with the best validation AUC."""

    def __init__(self) -> None:
        super().__init__()
        self.best_auc = -math.inf
        self.weights = None

    def on_epoch_end(self, epoch, logs=None):  # noqa: ARG002 - Keras passes logs= by keyword
        val_auc = (logs or {}).get("val_auc")
        if val_auc is not None and float(val_auc) > self.best_auc:
            self.best_auc = float(val_auc)
            self.weights = self.model.get_weights()


class EpochRecorder:
    """The callbacks of one training phase, and what to do when it ends."""

    def __init__(self, ctx: TrainingContext, phase: str, epochs: int, n_batches: int) -> None:
        self.ctx = ctx
        self.stop = StopOnRequest(ctx)
        self.best = BestWeights()
        # The history is written before the stop check, so a cancelled epoch is still on record.
        self.callbacks = [BatchProgress(ctx, phase, epochs, n_batches), EpochHistory(ctx, phase, epochs),
                          self.best, self.stop]

    @property
    def cancelled(self) -> bool:
        return self.stop.cancelled

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        self.stop.cancelled = bool(value)

    def as_list(self, model) -> keras.callbacks.CallbackList:
        """The callbacks bound to ``model``, for a loop of our own (``sync_fit``)."""
        return keras.callbacks.CallbackList(self.callbacks, model=model)

    def finish(self, model) -> None:
        """After training: stop the run if it was cancelled, else keep the best epoch's weights."""
        if self.cancelled:
            raise Cancelled
        if self.ctx.config.train.restore_best and self.best.weights is not None:
            model.set_weights(self.best.weights)
