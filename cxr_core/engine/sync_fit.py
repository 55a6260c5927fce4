"""Training loops of our own for what Keras' ``fit`` cannot run: the synchronous multi-worker step,
the epoch logs it reports, and the plain copies of a model trained under a strategy."""
from __future__ import annotations

import math
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from cxr_core.engine.batches import ImageBatches
from cxr_core.engine.callbacks import EpochRecorder
from cxr_core.engine.context import TrainingContext
from cxr_core.engine.losses import head_of, metric_objects, per_example_loss


def epoch_logs(ctx: TrainingContext, y_true: np.ndarray, logits: np.ndarray, weights: np.ndarray | None = None,
                prefix: str = "") -> dict:
    """Loss and metrics of one pass, as Keras' fit reports them (loss: weighted sum over the examples)."""
    per = np.asarray(per_example_loss(ctx.task, ctx.config.train.label_smoothing)(y_true, logits))
    weights = np.ones(len(per), np.float32) if weights is None else weights
    logs = {f"{prefix}loss": float((per * weights).sum() / max(len(per), 1))}
    target = head_of(ctx.task).target(y_true)
    for metric in metric_objects(ctx.task):
        metric.update_state(target, logits)
        logs[f"{prefix}{metric.name}"] = float(metric.result())
    return logs


def row_weights(ctx: TrainingContext, y: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Per-example training weights: the sample weights, else the class weights, else ones."""
    if weights is not None:
        return np.asarray(weights, np.float32)
    if ctx.class_weight:
        return np.array([ctx.class_weight.get(int(v), 1.0) for v in y], np.float32)
    return np.ones(len(y), np.float32)


def predict_logits(model, inputs) -> np.ndarray:
    """Logits of ``inputs`` (an array, or batches of images), called directly: Keras' predict cannot
    run under MultiWorkerMirroredStrategy, and this runs on this worker alone."""
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    if isinstance(inputs, np.ndarray):
        batches = [inputs[i:i + 256] for i in range(0, len(inputs), 256)]
    else:
        batches = (inputs[i][0] for i in range(len(inputs)))
    parts = [np.asarray(forward(tf.convert_to_tensor(batch)), np.float32) for batch in batches]
    return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


def plain_copy(model):
    """The same model and weights, built outside any strategy (to evaluate, save and export)."""
    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def _replica_inputs(strategy, chosen: np.ndarray, global_batch: int, per_replica: int,
                    load: Callable[[np.ndarray], np.ndarray], y: np.ndarray, weights: np.ndarray) -> tuple:
    """One global batch as per-replica values (x, y, w): replica r gets its slice of ``chosen``, a
    short slice padded with rows of weight 0 so that every step has one shape."""
    slots = np.full(global_batch, -1)
    slots[:len(chosen)] = chosen
    made: dict[int, tuple] = {}

    def part(replica_ctx, which):
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

    return tuple(strategy.experimental_distribute_values_from_function(lambda c, k=k: part(c, k)) for k in range(3))


def sync_fit(ctx: TrainingContext, model, optimizer, recorder: EpochRecorder, epochs: int, n_rows: int,
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
    runtime = ctx.runtime
    strategy = runtime.strategy
    per_replica = ctx.config.train.batch_size
    global_batch = runtime.global_batch(per_replica)
    n_steps = max(math.ceil(n_rows / global_batch), 1)
    loss_of = per_example_loss(ctx.task, ctx.config.train.label_smoothing)
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

    callbacks = recorder.as_list(model)
    seed = ctx.config.train.seed
    if dataset is not None:
        dataset.on_epoch_end()
    for epoch in range(epochs):
        callbacks.on_epoch_begin(epoch)
        # The same on every worker: drawn from the run's seed.
        order = dataset.order if dataset is not None else np.random.default_rng(seed + epoch).permutation(n_rows)
        seen: list[np.ndarray] = []
        logits_seen: list[np.ndarray] = []
        for number in range(n_steps):
            chosen = order[number * global_batch:(number + 1) * global_batch]
            x, y_true, w = _replica_inputs(strategy, chosen, global_batch, per_replica, load, y, weights)
            logits = np.asarray(step(x, y_true, w, tf.constant(len(chosen), tf.int64)))
            seen.append(chosen)
            logits_seen.append(logits[:len(chosen)])
            callbacks.on_train_batch_end(number)
            if runtime.any(recorder.cancelled):
                recorder.cancelled = True
                break
        if recorder.cancelled:
            break
        rows_seen = np.concatenate(seen)
        logs = epoch_logs(ctx, y[rows_seen], np.concatenate(logits_seen), weights[rows_seen])
        if validate is not None:
            val_y, val_logits = validate()
            logs.update(epoch_logs(ctx, val_y, val_logits, prefix="val_"))
        callbacks.on_epoch_end(epoch, logs)
        if dataset is not None:
            dataset.on_epoch_end()  # the next epoch's order and online augmentation
        if runtime.any(recorder.cancelled):
            recorder.cancelled = True
            break
