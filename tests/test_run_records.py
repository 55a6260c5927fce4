"""The typed records of a run folder (cxr_core.runs.records): RunState is the string status.json holds, a
status written by an older version reads back typed, and Status, Metrics, Evaluation and TestSet read a real
finished run, a failed one and a run with partial or damaged files the way the dict readers did."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_PRETRAINED, make_dataset
from cxr_core.core import metrics as evaluate
from cxr_core.core.config import DataConfig, RunConfig, TrainConfig
from cxr_core.core.errors import BadRunError, CxrError
from cxr_core.data.scan import stratified_sample
from cxr_core.runs import registry as runs
from cxr_core.runs.records import Evaluation, Metrics, RunState, Status
from cxr_core.runs.run_folder import RunFolder

STATES = ("queued", "running", "done", "failed", "cancelled")


# --- RunState and status.json ------------------------------------------------------------------------------
def test_run_states_are_the_strings_status_json_holds(tmp_path):
    assert [state.value for state in RunState] == list(STATES)
    for text in STATES:
        state = RunState(text)
        assert state == text and f"{state}" == text and json.dumps(state) == json.dumps(text)
    assert [s for s in RunState if s.is_active] == [RunState.QUEUED, RunState.RUNNING]
    assert [s for s in RunState if s.is_finished] == [RunState.DONE, RunState.FAILED, RunState.CANCELLED]
    assert RunState.parse("paused") is None and RunState.parse(None) is None and RunState.parse(["done"]) is None

    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.write_status(RunState.CANCELLED, message="cancelled by the user")
    written = json.loads((folder.path / "status.json").read_text())
    assert written["state"] == "cancelled" and type(written["state"]) is str and "finished" in written
    folder.write_status("queued", pid=None, started=None, submitted=5.0)  # a plain string is still taken
    assert json.loads((folder.path / "status.json").read_text())["state"] == "queued"
    with pytest.raises(ValueError):
        folder.write_status("paused")


def test_a_status_written_by_an_older_version_reads_back_typed(tmp_path):
    folder = RunFolder(tmp_path / "old-run")
    folder.path.mkdir()
    # As a version without pid_create_time, host or updated wrote it: plain strings and numbers.
    (folder.path / "status.json").write_text(json.dumps(
        {"state": "done", "pid": 4242, "started": 100.0, "finished": 160.5, "message": "done in 60 s",
         "duration_s": 60.5}))
    status = folder.status()
    assert status.state is RunState.DONE and status.state == "done"
    assert (status.pid, status.started, status.finished, status.duration_s) == (4242, 100.0, 160.5, 60.5)
    assert status.pid_create_time is None and status.host is None and status.error is None
    assert folder.read_status_file() == json.loads((folder.path / "status.json").read_text())

    # Reconciled: done without its model reads as failed, in the typed reader and in the dict one alike.
    reconciled = runs.run_status(folder.path)
    assert reconciled.state is RunState.FAILED and reconciled.error == "model.keras is missing"
    assert runs.read_status(folder.path) == {**json.loads((folder.path / "status.json").read_text()),
                                             "state": "failed", "error": "model.keras is missing"}
    folder.model_path.write_bytes(b"placeholder")
    assert runs.run_status(folder.path).state is RunState.DONE
    assert runs.read_status(folder.path)["message"] == "done in 60 s"


def test_a_status_that_cannot_be_read_is_none_and_reconciles_as_before(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    assert folder.status() is None and folder.metrics() is None and folder.evaluations() == []
    assert runs.read_status(folder.path) == {"state": "failed", "message": "the run folder has no readable status.json",
                                             "error": "missing status"}
    for text in ("{not json", json.dumps({"state": "paused"}), json.dumps(["done"])):
        (folder.path / "status.json").write_text(text)
        assert folder.status() is None and folder.read_status_file() is None
    folder.write_config(RunConfig())
    folder.model_path.write_bytes(b"placeholder")  # a folder made by hand: a model and a config are enough
    assert runs.run_status(folder.path) == Status(RunState.DONE, message="finished (no status file)")
    assert runs.read_status(folder.path) == {"state": "done", "message": "finished (no status file)"}
    assert Status.from_dict({"state": "running", "pid": "garbage", "started": "yesterday"}) == Status(RunState.RUNNING)


# --- Metrics and evaluations from files written by hand -------------------------------------------------------
def _hand_run(tmp_path: Path, metrics: object) -> RunFolder:
    folder = RunFolder(tmp_path / "hand")
    folder.path.mkdir()
    folder.write_config(RunConfig())
    if metrics is not None:
        folder.write_metrics(metrics)
    folder.write_status(RunState.DONE)
    return folder


def test_partial_or_damaged_metrics_read_as_empty_parts_or_none(tmp_path):
    # A run trained without a test part (metrics_report's test is None), from before the subtype task.
    y, p = np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    report = evaluate.metrics_report(y, p, None, None)
    folder = _hand_run(tmp_path, report)
    metrics = folder.metrics()
    assert metrics.task == "pneumonia" and metrics.classes == ("NORMAL", "PNEUMONIA")
    assert metrics.threshold == pytest.approx(report["threshold"]) and metrics.threshold_rule == "youden"
    assert metrics.val_auc == pytest.approx(report["val"]["roc_auc"])
    assert metrics.test_at_threshold == {} and metrics.test_at_05 == {} and metrics.test_auc is None
    assert metrics.n_images is None and metrics.split_counts == {} and metrics.raw == folder.read_metrics()
    assert folder.test_sets() == []  # no test predictions, no internal test set
    summary = runs.summarize_run(folder.path)
    assert summary.test_auc is None and summary.val_auc == pytest.approx(report["val"]["roc_auc"])

    (folder.path / "metrics.json").write_text("{torn")
    assert folder.metrics() is None and folder.read_metrics() is None
    with pytest.raises(BadRunError, match="not valid JSON"):
        folder.read_threshold()
    (folder.path / "metrics.json").write_text(json.dumps(["not", "an", "object"]))
    assert folder.metrics() is None and folder.read_threshold() == 0.5
    assert Metrics.from_dict({"task": "subtype", "threshold": None, "test": None}).classes == (
        "NORMAL", "BACTERIA", "VIRUS")


def test_evaluations_are_typed_newest_first_and_the_ones_trained_on_are_left_out(tmp_path):
    folder = _hand_run(tmp_path, None)
    y = np.array([0] * 10 + [1] * 20)
    p = np.clip(np.linspace(0.05, 0.95, 30) + 0.1 * y, 0, 1)
    figures = {"task": "pneumonia", **evaluate.binary_metrics(y, p, 0.5), "data": "/data/site-b",
               "overlap": {"train": 0, "val": 0, "test": 0}, "warning": None, "sampled_from": 300,
               "prevalence": {"validation_prevalence": 0.7, "estimated_prevalence": 0.6, "true_prevalence": 2 / 3,
                              "threshold": 0.45, "at_threshold": evaluate.binary_metrics(y, p, 0.45)}}
    folder.write_evaluation("site-b", figures, pd.DataFrame({"path": [f"/x/{i}.png" for i in range(30)], "y": y,
                                                            "probability": p}))
    folder.write_evaluation("mixed", {**figures, "overlap": {"train": 4}, "warning": "4 of these were trained on."})
    every = folder.evaluations()
    assert [e.name for e in every] == ["mixed", "site-b"]  # newest first
    assert [e.name for e in folder.evaluations(external_only=True)] == ["site-b"]
    assert list(folder.external_evaluations()) == ["site-b"]
    site = every[1]
    assert isinstance(site, Evaluation) and site.is_external and site.data_name == "site-b"
    assert (site.n, site.sampled_from, site.threshold) == (30, 300, 0.5)
    assert site.roc_auc == pytest.approx(figures["roc_auc"]) and site.accuracy == pytest.approx(figures["accuracy"])
    assert site.intervals == evaluate.rate_intervals(figures)
    assert site.prevalence.threshold == 0.45 and site.prevalence.figures["n"] == 30
    assert every[0].trained_on == 4 and not every[0].is_external and every[0].warning

    (test_set,) = folder.test_sets()  # the evaluation with stored predictions; no internal part without metrics
    assert test_set.external and test_set.name == "site-b" and test_set.n == 30 and test_set.threshold == 0.5
    assert test_set.figures["sensitivity"] == figures["sensitivity"] and test_set.at_05 == {}
    summary = runs.summarize_run(folder.path)
    assert (summary.external_name, summary.external_auc) == ("site-b", site.roc_auc)

    # An evaluation on a shortcut lab copy (planted markers) is newer, but never the headline nor the first
    # test set shown: it is a lesson's experiment, not the run's honest figure.
    folder.write_evaluation("site-b-marked", {**figures, "roc_auc": 0.99, "marker_attention": 0.8, "n_marked": 12},
                            pd.DataFrame({"path": [f"/m/{i}.png" for i in range(30)], "y": y, "probability": p}))
    assert folder.evaluations(external_only=True)[0].is_planted and not site.is_planted
    assert folder.headline_evaluation().name == "site-b"
    assert [s.name for s in folder.test_sets()] == ["site-b", "site-b-marked"]
    assert runs.summarize_run(folder.path).external_name == "site-b"


def test_a_stratified_sample_keeps_every_group_in_proportion():
    frame = pd.DataFrame({"source": ["a"] * 60 + ["b"] * 30 + ["c"] * 10, "n": range(100)})
    sample = stratified_sample(frame, "source", 20, seed=1)
    assert len(sample) == 20 and sample["source"].value_counts().to_dict() == {"a": 12, "b": 6, "c": 2}
    assert sample.equals(stratified_sample(frame, "source", 20, seed=1)) and sample.index.is_monotonic_increasing
    assert stratified_sample(frame, "source", 500) is frame


# --- A real run: one that trained, one that failed -----------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny run trained in-process (MobileNetV2 0.35 at 32 px), and a second data set to evaluate it on."""
    from cxr_core.engine import train

    base = tmp_path_factory.mktemp("records")
    data_dir = make_dataset(base / "tiny", n_normal=20, n_pneumonia=40, size=48)
    config = RunConfig(data=DataConfig(data_dir=str(data_dir), split="random"), model=TINY_PRETRAINED,
                       train=TrainConfig(epochs=2, batch_size=16, balance="none", cache_dir=str(base / "cache")))
    run_dir = train.train(config, run_dir=base / "runs" / "tiny-run")
    return run_dir, make_dataset(base / "site-b", n_normal=6, n_pneumonia=10, size=48, seed=5)


@pytest.mark.slow
def test_typed_readers_of_a_trained_run_say_what_its_files_say(trained):
    from cxr_core.evaluation.external import evaluate_folder

    run_dir, other = trained
    folder = RunFolder(run_dir)
    raw_status, raw_metrics = folder.read_status_file(), folder.read_metrics()
    status = folder.status()
    assert status.state is RunState.DONE and status.pid == raw_status["pid"] and status.host == raw_status["host"]
    assert status.started == raw_status["started"] and status.finished == raw_status["finished"]
    assert runs.run_status(run_dir).state is RunState.DONE and runs.read_status(run_dir)["state"] == "done"

    metrics = folder.metrics()
    assert metrics.task == raw_metrics["task"] and list(metrics.classes) == raw_metrics["classes"]
    assert metrics.threshold == raw_metrics["threshold"] == folder.read_threshold()
    assert metrics.threshold_rule == raw_metrics["threshold_rule"]
    assert metrics.test_at_threshold == raw_metrics["test"]["at_threshold"]
    assert metrics.test_at_05 == raw_metrics["test"]["at_0.5"] and metrics.val == raw_metrics["val"]
    assert metrics.test_auc == raw_metrics["test"]["at_threshold"]["roc_auc"]
    assert metrics.split_counts == raw_metrics["split_counts"] and metrics.n_images == raw_metrics["n_images"] == 60
    assert runs.summarize_run(run_dir).test_auc == metrics.test_auc

    (internal,) = folder.test_sets()
    assert not internal.external and internal.rule == metrics.threshold_rule
    assert internal.threshold == metrics.threshold and internal.n == metrics.test_at_threshold["n"]
    assert set(internal.predictions["split"]) == {"test"}

    result = evaluate_folder(run_dir, other)
    (stored,) = folder.evaluations()
    assert stored.name == "site-b" and stored.is_external and stored.n == result["n"] == 16
    assert stored.roc_auc == result["roc_auc"] and stored.threshold == result["threshold"] == metrics.threshold
    assert stored.raw == folder.read_evaluations()["site-b"]
    assert [t.name for t in folder.test_sets()] == ["site-b", "internal"]  # the honest one first


@pytest.mark.slow
def test_a_failed_run_reads_as_failed_with_its_sentence_and_no_figures(tmp_path):
    from cxr_core.engine import train

    config = RunConfig(data=DataConfig(data_dir=str(tmp_path / "gone"), split="random"), model=TINY_PRETRAINED,
                       train=TrainConfig(epochs=1, cache_dir=str(tmp_path / "cache")))
    with pytest.raises(CxrError) as error:
        train.train(config, run_dir=tmp_path / "failed-run")
    folder = RunFolder(tmp_path / "failed-run")
    status = folder.status()
    assert status.state is RunState.FAILED and status.state.is_finished and status.error == str(error.value)
    assert status.message == str(error.value) and status.finished is not None
    assert runs.run_status(folder.path).state is RunState.FAILED
    assert folder.metrics() is None and folder.evaluations() == [] and folder.test_sets() == []
    assert folder.read_threshold() == 0.5
    summary = runs.summarize_run(folder.path)
    assert summary.state is RunState.FAILED and summary.test_auc is None and summary.n_images is None
    assert os.fspath(summary.path) == os.fspath(folder.path)
