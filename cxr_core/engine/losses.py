"""What a head learns from: its loss, its metrics, the optimiser and the learning-rate schedule.

A task's head is ``sigmoid`` (one logit) or ``softmax`` (one logit per class; see
``cxr_core.core.tasks``); each head kind has one ``Head`` here, so a new task with a softmax head
needs nothing new. The model outputs logits: thresholds at 0 on a logit are 0.5 on a probability.
"""
from __future__ import annotations

from collections.abc import Callable

import keras

from cxr_core.core.config import RunConfig
from cxr_core.core.tasks import Task


def _one_hot(y_true, n_classes: int):
    """Class indices (any shape) as one-hot rows."""
    return keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), n_classes)


@keras.saving.register_keras_serializable(package="cxr_core")
class SparseMacroAUC(keras.metrics.AUC):
    """Macro one-vs-rest ROC AUC of a softmax head, from class indices and logits (the ``auc`` of the
    subtype task's history, so the best epoch is chosen on validation as for the binary head)."""

    def __init__(self, num_classes: int = 3, name: str = "auc", **kwargs) -> None:
        kwargs.pop("multi_label", None), kwargs.pop("num_labels", None), kwargs.pop("from_logits", None)
        super().__init__(name=name, multi_label=True, num_labels=int(num_classes), from_logits=False, **kwargs)
        self.num_classes = int(num_classes)

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(_one_hot(y_true, self.num_classes), keras.ops.softmax(y_pred, axis=-1),
                                    sample_weight)

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
        return keras.losses.categorical_crossentropy(_one_hot(y_true, self.num_classes), y_pred, from_logits=True,
                                                     label_smoothing=self.label_smoothing)

    def get_config(self) -> dict:
        return {**super().get_config(), "num_classes": self.num_classes, "label_smoothing": self.label_smoothing}



class _SigmoidHead:
    """One logit: binary cross-entropy; accuracy, AUC, precision and recall."""

    @staticmethod
    def loss(task: Task, label_smoothing: float):  # noqa: ARG004 - the same signature for every head
        return keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=label_smoothing)

    @staticmethod
    def per_example_loss(task: Task, label_smoothing: float) -> Callable:  # noqa: ARG004
        def loss(y_true, logits):
            logits = keras.ops.cast(logits, "float32")
            return keras.losses.binary_crossentropy(keras.ops.reshape(y_true, (-1, 1)), logits, from_logits=True,
                                                    label_smoothing=label_smoothing)
        return loss

    @staticmethod
    def metrics(task: Task) -> list:  # noqa: ARG004
        return [
            keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0),
            keras.metrics.AUC(name="auc", from_logits=True),
            # Precision and recall, because with 27:73 classes accuracy alone flatters the majority.
            keras.metrics.Precision(name="precision", thresholds=0.0),
            keras.metrics.Recall(name="recall", thresholds=0.0),
        ]

    @staticmethod
    def target(y):
        return y.reshape(-1, 1)


class _SoftmaxHead:
    """One logit per class over class indices: cross-entropy (with label smoothing, which Keras' sparse
    loss lacks); accuracy and macro one-vs-rest AUC. The history keeps the binary column names."""

    @staticmethod
    def loss(task: Task, label_smoothing: float):
        return (SmoothedSparseCrossentropy(task.n_outputs, label_smoothing) if label_smoothing
                else keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    @staticmethod
    def per_example_loss(task: Task, label_smoothing: float) -> Callable:
        def loss(y_true, logits):
            logits = keras.ops.cast(logits, "float32")
            return keras.losses.categorical_crossentropy(_one_hot(y_true, task.n_outputs), logits, from_logits=True,
                                                         label_smoothing=label_smoothing)
        return loss

    @staticmethod
    def metrics(task: Task) -> list:
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy"), SparseMacroAUC(task.n_outputs, name="auc")]

    @staticmethod
    def target(y):
        return y


HEADS = {"sigmoid": _SigmoidHead, "softmax": _SoftmaxHead}


def head_of(task: Task):
    return HEADS[task.head]


def per_example_loss(task: Task, label_smoothing: float) -> Callable:
    """The training loss of one example (the same as ``compile_model``'s), unreduced."""
    return head_of(task).per_example_loss(task, label_smoothing)


def metric_objects(task: Task) -> list:
    return head_of(task).metrics(task)


def optimizer(learning_rate, weight_decay: float = 0.0):
    """Adam, or AdamW with weight decay; loss-scaled under a float16 policy."""
    made = (keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay) if weight_decay
            else keras.optimizers.Adam(learning_rate))
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        # float16 gradients underflow without loss scaling (compile adds it itself; a custom step needs it).
        made = keras.optimizers.LossScaleOptimizer(made)
    return made


def compile_model(model, task: Task, learning_rate, label_smoothing: float = 0.0, steps_per_execution: int = 1,
                  weight_decay: float = 0.0) -> None:
    """Compile ``model`` for ``fit`` with its head's loss and metrics."""
    head = head_of(task)
    # compile adds loss scaling itself under a float16 policy: the plain optimiser here.
    plain = (keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay) if weight_decay
             else keras.optimizers.Adam(learning_rate))
    model.compile(optimizer=plain, loss=head.loss(task, label_smoothing), metrics=head.metrics(task),
                  steps_per_execution=steps_per_execution)


def learning_rate(config: RunConfig, steps_per_epoch: int):
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
