"""The task as an object: code asks the task, so a third task is one new ``Task`` and nothing else."""
from __future__ import annotations

import numpy as np
import pytest

from cxr_core.core import tasks
from cxr_core.core.errors import BadSettingError
from cxr_core.core.tasks import Task, get_task

FOURWAY = Task("fourway", "Normal / three kinds", ("NORMAL", "BACTERIA", "VIRUS", "FUNGUS"), "softmax",
               needs="subtype", help="Four classes, the most probable one.")


@pytest.fixture
def with_a_third_task(monkeypatch):
    monkeypatch.setitem(tasks.TASKS, FOURWAY.name, FOURWAY)
    return FOURWAY


def test_the_two_tasks_answer_what_the_code_asks():
    pneumonia, subtype = get_task("pneumonia"), get_task("subtype")
    assert (pneumonia.n_outputs, pneumonia.uses_threshold, pneumonia.is_binary) == (1, True, True)
    assert (subtype.n_outputs, subtype.uses_threshold, subtype.is_binary) == (3, False, False)
    logits = np.array([-2.0, 0.0, 3.0])
    probs = pneumonia.probabilities(logits)
    # P(PNEUMONIA) is exactly the sigmoid, not 1 - (1 - p): thresholds compare it exactly.
    np.testing.assert_array_equal(pneumonia.disease_probability(probs), tasks.sigmoid(logits))
    assert pneumonia.labels(probs, 0.5) == ["NORMAL", "PNEUMONIA", "PNEUMONIA"]
    with pytest.raises(BadSettingError, match="task must be one of pneumonia, subtype; got 'nope'"):
        get_task("nope")


def test_a_third_task_is_one_object(with_a_third_task):
    task = get_task("fourway")
    assert task is with_a_third_task and "fourway" in tasks.TASKS
    assert task.n_outputs == 4 and not task.uses_threshold and not task.is_binary
    logits = np.array([[0.0, 2.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    probs = task.probabilities(logits)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert task.labels(probs, None) == ["BACTERIA", "NORMAL", "FUNGUS"]
    np.testing.assert_allclose(task.disease_probability(probs), 1.0 - probs[:, 0])
    assert tasks.task_of_outputs(4) is task


@pytest.mark.slow  # imports Keras
def test_the_engine_trains_a_third_task_with_nothing_new(with_a_third_task):
    import keras

    from cxr_core.engine import losses, model

    head = model.build_head(8, 0.0, seed=1, n_outputs=with_a_third_task.n_outputs)
    losses.compile_model(head, with_a_third_task, 1e-2, label_smoothing=0.1)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 16)
    x = rng.normal(size=(64, 8)).astype("float32") + np.eye(4, 8)[y] * 3.0
    history = head.fit(x, y, epochs=30, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert {"accuracy", "auc"} <= set(history.history)  # the softmax head's metrics, as for three classes
    probs = with_a_third_task.probabilities(np.asarray(head(x, training=False)))
    assert (np.asarray(with_a_third_task.labels(probs, None)) == np.asarray(with_a_third_task.classes)[y]).mean() > 0.9
    per = losses.per_example_loss(with_a_third_task, 0.0)(y, head(x, training=False))
    assert keras.ops.shape(per) == (64,)
