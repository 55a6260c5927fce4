"""The guided course: lesson files (every shipped one parses and names only what exists; a bad one is one
sentence naming the file and the field), the checks over a learner's runs, progress that lasts, and the Lessons
page driven through a lesson with AppTest.

Fast tests write run folders with RunFolder as training writes them (config.json, metrics.json,
predictions.csv, a "done" status, evaluations/), plus a placeholder model.keras file, since a run without a
model never reads as done; what a check reads is never the model. The slow test trains real tiny runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from conftest import TINY_PRETRAINED, make_dataset
from cxr_core.core.config import RunConfig
from cxr_core.core.recipes import apply_recipe
from cxr_core.data import plan
from cxr_core.runs.run_folder import RunFolder, RunState, Status
from cxr_core.teaching import checks, lessons, material, progress
from cxr_core.teaching.checks import CheckContext, read_runs, run_check
from pages.ui import lesson_actions

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HOME = str(PROJECT_ROOT / "Home.py")
LESSONS = "pages/lessons.py"
TIMEOUT = 120
SHIPPED = {"meet-the-data", "leakage", "imbalance-threshold", "shortcuts", "augmentation", "honest-report"}


# --- Run folders as training writes them ---------------------------------------------------------------------
def _rates(n_pos: int, n_neg: int, sensitivity: float, specificity: float, auc: float) -> dict:
    tp = round(sensitivity * n_pos)
    tn = round(specificity * n_neg)
    return {"n": n_pos + n_neg, "n_positive": n_pos, "n_negative": n_neg, "roc_auc": auc,
            "accuracy": (tp + tn) / (n_pos + n_neg), "sensitivity": tp / n_pos, "specificity": tn / n_neg,
            "precision": tp / max(tp + n_neg - tn, 1), "f1": 0.9, "pr_auc": auc, "brier": 0.1, "threshold": 0.5,
            "confusion_matrix": [[tn, n_neg - tn], [n_pos - tp, tp]]}


def write_run(root: Path, name: str, *, recipe: str = "quick", state: str = "done", started: float | None = None,
              auc: float = 0.95, val_sensitivity: float = 0.9, threshold: float = 0.5,
              data_dir: str = "/data/kermany224", **settings) -> Path:
    """A finished run folder: config.json from a recipe plus ``settings`` ("section__field": value), metrics.json
    with validation and test figures, test predictions, and the given status."""
    config = apply_recipe(RunConfig(), recipe) if recipe else RunConfig()
    sections: dict[str, dict] = {"data": {"data_dir": data_dir}}
    for key, value in settings.items():
        section, field = key.split("__")
        sections.setdefault(section, {})[field] = value
    config = dataclasses.replace(config, **{s: dataclasses.replace(getattr(config, s), **v)
                                            for s, v in sections.items()})
    folder = RunFolder(root / name)
    folder.write_config(config)
    test = _rates(40, 20, 0.9, 0.8, auc)
    folder.write_metrics({"task": "pneumonia", "classes": ["NORMAL", "PNEUMONIA"], "threshold": threshold,
                          "threshold_rule": config.train.threshold_rule,
                          "val": _rates(40, 20, val_sensitivity, 0.7, auc),
                          "test": {"at_0.5": test, "at_threshold": test}, "n_images": 600,
                          "split_counts": {"train": 480, "val": 60, "test": 60}})
    rng = np.random.default_rng(len(name))
    y = np.r_[np.ones(40), np.zeros(20)].astype(int)
    folder.write_predictions(pd.DataFrame({"path": [f"/x/{i}.jpeg" for i in range(60)], "y": y,
                                           "probability": np.clip(0.35 * y + rng.uniform(0.1, 0.6, 60), 0, 1),
                                           "split": "test"}))
    (folder.path / "model.keras").write_bytes(b"placeholder: the checks never read the model")
    folder.write_status(state)
    if started is not None:
        status = json.loads((folder.path / "status.json").read_text())
        status["started"] = started
        (folder.path / "status.json").write_text(json.dumps(status))
    return folder.path


def evaluate(run: Path, name: str, auc: float, *, data: str | None = None, train_overlap: int = 0, **extra) -> None:
    """Store an external evaluation as ``external.evaluate_folder`` does."""
    result = {"task": "pneumonia", **_rates(195, 116, 0.85, 0.75, auc), "data": data or f"/data/{name}",
              "overlap": {"train": train_overlap, "val": 0, "test": 0}, "warning": None, **extra}
    RunFolder(run).write_evaluation(name, result)


def context(root: Path, **kwargs) -> CheckContext:
    return CheckContext(runs=read_runs(p for p in root.iterdir() if p.is_dir()), **kwargs)


@pytest.fixture
def runs_root() -> Path:
    root = Path(os.environ["CXR_RUNS_DIR"])
    root.mkdir(parents=True, exist_ok=True)
    return root


# --- Lesson files -----------------------------------------------------------------------------------------------
def test_every_shipped_lesson_parses_and_names_only_settings_and_checks_that_exist():
    found = lessons.load_lessons(lessons.LESSONS_DIR)
    assert found.problems == ()
    assert {lesson.id for lesson in found.lessons} >= SHIPPED
    kinds_used = set()
    for lesson in found.lessons:
        assert lesson.goal and lesson.minutes > 0 and lesson.steps
        for step in lesson.steps:
            assert step.body.strip(), f"{lesson.id}: step {step.title!r} has no text"
            if step.check is not None:
                kinds_used.add(step.check.kind)
                assert step.check.kind in checks.KINDS
            if step.action is not None:
                assert step.action.page in lessons.PAGES
                assert step.action.page in lesson_actions.PAGE_FILES
                for name in step.action.settings:
                    assert name in lessons.ACTION_SETTINGS[step.action.page]
                if step.action.page == "training":
                    # Every training step: the quick recipe on MobileNetV2-0.35, under two minutes on two cores.
                    config = lessons.action_config(step.action.settings)
                    assert step.action.settings.get("train.recipe") == "quick", (lesson.id, step.title)
                    assert config.model.backbone == "mobilenet_v2" and config.model.alpha == 0.35
                    assert plan.estimate_seconds(config, config.data.limit or 600) < 120
            if step.figure is not None:
                assert step.figure.name in lessons.FIGURES
    assert kinds_used == set(checks.KINDS), "every kind of check is used by a shipped lesson"


def test_the_guide_lists_every_check_kind_figure_and_page():
    guide = (lessons.LESSONS_DIR / "README.md").read_text(encoding="utf-8")
    for name in [*checks.KINDS, *lessons.FIGURES, *lessons.PAGES, *lessons.FORMS]:
        assert f"`{name}`" in guide or name in guide, name
    for kind, (required, optional) in checks.PARAMS.items():
        for param in required | optional:
            assert f"`{param}`" in guide, (kind, param)


GOOD_LESSON = """---
id: demo
title: A demo lesson
goal: Show the format.
minutes: 5
steps:
  - title: Train
    action:
      page: training
      label: Open Training
      settings:
        train.recipe: quick
        data.split: patient
    check:
      kind: run_exists
      settings:
        data.split: patient
  - title: Think
    questions:
      - ask: Which?
        choices: [one, two]
        answer: 2
        explain: Because two.
---
Intro.

## Train

Do it.

## Think

Then think.
"""

BAD_LESSONS = [
    # (replace this, with this, the sentence expected)
    ("      kind: run_exists", "      kind: runs_exist",
     "lessons/demo.md: step 1's check 'kind' must be one of dataset_chosen, run_exists, runs_differ_only_in, "
     "evaluated_externally, metric_compare, threshold_chosen; got 'runs_exist'."),
    ("        data.split: patient\n    check", "        data.splitt: patient\n    check",
     "lessons/demo.md: step 1's action setting 'data.splitt' does not exist on the training page"),
    ("        data.split: patient\n    check", "        data.split: by_child\n    check",
     "lessons/demo.md: step 1's action setting data.split: 'by_child' cannot be used"),
    ("        train.recipe: quick", "        train.recipe: fastest", "lessons/demo.md: step 1's action setting "
     "train.recipe must be one of reference, quick, best, demo; got 'fastest'."),
    ("      page: training", "      page: trainings", "lessons/demo.md: step 1's action 'page' must be one of"),
    ("        answer: 2", "        answer: 3", "lessons/demo.md: step 2's question 1's 'answer' must be the number of "
     "the right choice (1 to 2) or its text; got 3."),
    ("## Think\n", "", "lessons/demo.md: the text has 1 '## ' section(s) but the front matter lists 2 step(s)"),
    ("goal: Show the format.\n", "", "lessons/demo.md: the front matter has no 'goal'."),
    ("minutes: 5", "minutes: [5", "lessons/demo.md: the front matter is not valid YAML"),
    ("  - title: Think", "  - title: Thinking", "lessons/demo.md: step 2's title 'Thinking' does not match its "
     "heading '## Think'"),
    ("      kind: run_exists\n      settings:\n        data.split: patient\n",
     "      kind: metric_compare\n      metric: internal.auc\n      value: 0.5\n",
     "lessons/demo.md: step 1's check 'metric' must be a source and a measure"),
]


@pytest.mark.parametrize("old,new,expected", BAD_LESSONS)
def test_a_bad_lesson_is_one_sentence_naming_the_file_and_the_field(tmp_path, old, new, expected):
    folder = tmp_path / "lessons"
    folder.mkdir()
    assert old in GOOD_LESSON
    (folder / "demo.md").write_text(GOOD_LESSON.replace(old, new, 1), encoding="utf-8")
    (folder / "fine.md").write_text(GOOD_LESSON.replace("id: demo", "id: fine"), encoding="utf-8")
    found = lessons.load_lessons(folder)
    assert [lesson.id for lesson in found.lessons] == ["fine"]  # the other lesson still loads
    (problem,) = found.problems
    assert problem.startswith(expected), problem
    assert "\n" not in problem and problem.endswith(".") and problem.count(". ") == 0, problem


def test_a_good_lesson_reads_into_steps_and_a_duplicate_id_is_refused(tmp_path):
    folder = tmp_path / "lessons"
    folder.mkdir()
    (folder / "a.md").write_text(GOOD_LESSON, encoding="utf-8")
    (folder / "b.md").write_text(GOOD_LESSON, encoding="utf-8")
    (folder / "README.md").write_text("# not a lesson", encoding="utf-8")
    found = lessons.load_lessons(folder)
    (lesson,) = found.lessons
    assert lesson.intro == "Intro." and [s.body for s in lesson.steps] == ["Do it.", "Then think."]
    assert lesson.steps[1].questions[0].answer == 1 and lesson.steps[0].check.params == {"settings": {
        "data.split": "patient"}}
    assert found.problems == ("lessons/b.md: 'id' 'demo' is already the id of lessons/a.md; give each lesson its "
                              "own id.",)


def test_an_actions_widget_keys_are_the_pages_own():
    from cxr_core.core import settings

    # The Training page draws its settings from the table of settings, under the rows' session keys.
    table_keys = {row.session_key(backbone="") for row in settings.SETTINGS if row.form}
    for page, keys in lesson_actions.WIDGET_KEYS.items():
        source = (PROJECT_ROOT / page).read_text(encoding="utf-8")
        for key in keys:
            in_table = page == "pages/training.py" and key in table_keys
            assert f'"{key}' in source or in_table, f"{page} has no widget key {key!r}"
    assert set(lesson_actions.PAGE_FILES.values()) <= {str(p.relative_to(PROJECT_ROOT)).replace(os.sep, "/")
                                                       for p in (PROJECT_ROOT / "pages").glob("*.py")}


def test_a_recipe_action_fills_in_every_setting_the_training_form_shows(tmp_path):
    settings = {"train.recipe": "quick", "data.split": "random", "model.backbone": "mobilenet_v2", "model.alpha": 0.35}
    action = lessons.Action(page="training", label="x", settings=settings)
    prepared = lesson_actions.prepare(action, [], tmp_path, {})
    state = prepared.state
    assert prepared.page == "pages/training.py" and prepared.problem is None
    assert state["train_recipe"] == "quick" and state["train_limit"] == 0 and state["train_epochs"] == 8
    assert state["split_mode"] == state["train_split"] == "random"  # the named setting wins over the recipe's
    assert state["balance"] == state["train_balance"] == "class_weight"
    assert state["train_size_mobilenet_v2"] == 224 and state["train_alpha_free"] == 0.35
    assert state["augment_config"]["horizontal_flip"] is False and state["augment_config"]["rotation_range"] == 5.0


def test_an_evaluation_action_picks_the_learners_run_and_the_external_set(tmp_path, runs_root):
    data = tmp_path / "data"
    for name in ("kermany224", "kermany224-test-dev", "other"):
        (data / name).mkdir(parents=True)
    action = lessons.Action(page="evaluation", label="x", settings={"run": {"data.split": "random"},
                                                                    "evaluate_on": "auto"})
    assert lesson_actions.prepare(action, [], data, {}).problem.startswith("No finished run with a random split yet")
    run = write_run(runs_root, "r1", data_dir=str(data / "kermany224"), data__split="random")
    prepared = lesson_actions.prepare(action, read_runs([run]), data, {"dataset": "kermany224"})
    assert prepared.problem is None
    assert prepared.state["eval_run"] == prepared.state["run"] == str(run)
    assert prepared.state["eval_other_dataset"] == "kermany224-test-dev"


# --- Checks ---------------------------------------------------------------------------------------------------
def test_run_exists_fails_before_the_run_and_passes_after_with_its_figures(runs_root):
    params = {"settings": {"train.recipe": "quick", "data.split": "patient"}}
    assert run_check("run_exists", params, context(runs_root)) == checks.CheckResult(
        False, "No finished run with the quick recipe and a patient split yet.")
    write_run(runs_root, "busy", state="running", data__split="patient")  # a dead pid: reads as failed
    write_run(runs_root, "random-one", data__split="random")
    assert not run_check("run_exists", params, context(runs_root)).passed
    write_run(runs_root, "patient-one", auc=0.957, data__split="patient")
    evaluate(runs_root / "patient-one", "kermany224-test-dev", 0.89)
    result = run_check("run_exists", params, context(runs_root))
    assert result.passed and result.runs == ("patient-one",)
    assert result.sentence == ("Found your finished run with the quick recipe and a patient split: patient-one: "
                               "ROC AUC 0.957 on its own test part (60 images), 0.890 on kermany224-test-dev (311 "
                               "images).")


def test_a_run_still_training_is_named_in_the_sentence(runs_root, monkeypatch):
    write_run(runs_root, "training-now", data__split="patient")
    monkeypatch.setattr(checks.registry, "run_status", lambda _path: Status(RunState.RUNNING))
    result = run_check("run_exists", {"settings": {"data.split": "patient"}}, context(runs_root))
    assert not result.passed
    assert result.sentence.endswith("Your run training-now is still training; check again when it is done.")


def test_runs_that_differ_only_in_the_split_quote_both_figures_inside_and_outside(runs_root):
    params = {"settings": "data.split", "where": {"train.recipe": "quick"}}
    write_run(runs_root, "a-random", started=2.0, auc=0.991, data__split="random", data__seed=7)
    assert "you have 1" in run_check("runs_differ_only_in", params, context(runs_root)).sentence
    # Differs in the split and in the epochs: not a fair comparison, and the sentence says what else differs.
    write_run(runs_root, "b-patient-more-epochs", started=1.0, auc=0.957, data__split="patient", train__epochs=20)
    result = run_check("runs_differ_only_in", params, context(runs_root))
    assert not result.passed
    assert "differ in the split but also in epochs" in result.sentence
    write_run(runs_root, "c-patient", started=3.0, auc=0.957, data__split="patient", train__seed=99)
    evaluate(runs_root / "a-random", "kermany224-test-dev", 0.88)
    evaluate(runs_root / "c-patient", "kermany224-test-dev", 0.89)
    result = run_check("runs_differ_only_in", params, context(runs_root))
    assert result.passed and set(result.runs) == {"a-random", "c-patient"}
    assert result.sentence == ("You trained 2 runs that differ only in the split: patient 0.957, random 0.991 (ROC AUC "
                               "on their own test parts), and 0.890 / 0.880 on kermany224-test-dev.")


def test_three_balance_strategies(runs_root):
    params = {"settings": ["train.balance"], "count": 3}
    for i, balance in enumerate(("class_weight", "none")):
        write_run(runs_root, f"r-{balance}", started=float(i), train__balance=balance)
    assert not run_check("runs_differ_only_in", params, context(runs_root)).passed
    write_run(runs_root, "r-augment", started=5.0, train__balance="augment")
    result = run_check("runs_differ_only_in", params, context(runs_root))
    assert result.passed and "augmented balancing" in result.sentence and "class weights" in result.sentence


def test_evaluated_externally_refuses_an_overlapping_set_and_knows_clean_from_marked(runs_root, tmp_path):
    marked = tmp_path / "data" / "kermany-marked"
    marked.mkdir(parents=True)
    pd.DataFrame({"path": ["PNEUMONIA/a.jpeg", "PNEUMONIA/b.jpeg", "NORMAL/c.jpeg"],
                  "label": ["PNEUMONIA", "PNEUMONIA", "NORMAL"], "marker": [1, 1, 0]}).to_csv(
        marked / "manifest.csv", index=False)
    clean = tmp_path / "data" / "kermany224-test-dev"
    clean.mkdir()
    params = {"settings": {"dataset.markers": True}, "clean": True}
    assert run_check("evaluated_externally", params, context(runs_root)).sentence == (
        "No finished run with a data set with planted markers yet.")
    run = write_run(runs_root, "on-marks", data_dir=str(marked))
    assert checks.read_run(run).settings["dataset.markers"] is True
    # Evaluated on its own marked images: not external, but where it looked (marker_attention) is read back.
    evaluate(run, "kermany-marked", 0.99, data=str(marked), train_overlap=3, marker_attention=0.87, n_marked=30)
    result = run_check("evaluated_externally", params, context(runs_root))
    assert not result.passed and "trained on some of those images, so that is not an external test" in result.sentence
    evaluate(run, "kermany224-test-dev", 0.71, data=str(clean))
    result = run_check("evaluated_externally", params, context(runs_root))
    assert result.passed
    assert result.sentence == ("Run on-marks scored ROC AUC 0.710 and accuracy 0.814 on kermany224-test-dev (311 "
                               "images, none from its training part). On kermany-marked, Grad-CAM's strongest evidence "
                               "for pneumonia lay on the marker in 87% of the 30 marked images (marker_attention).")
    # A marked set is no clean test: evaluated only there, the run does not pass a check that asks for clean.
    assert not run_check("evaluated_externally", {**params, "dataset": "kermany-marked"}, context(runs_root)).passed


def test_evaluated_externally_for_each_split(runs_root):
    params = {"for_each": {"data.split": ["random", "patient"]}}
    write_run(runs_root, "r", data__split="random")
    write_run(runs_root, "p", data__split="patient")
    evaluate(runs_root / "r", "kermany224-test-dev", 0.88)
    result = run_check("evaluated_externally", params, context(runs_root))
    assert not result.passed and "split patient has been evaluated on an external test set yet (1 of 2 done)" in \
        result.sentence
    evaluate(runs_root / "p", "kermany224-test-dev", 0.89)
    assert run_check("evaluated_externally", params, context(runs_root)).passed


def test_metric_compare_with_another_run_another_figure_and_a_number(runs_root):
    between = {"metric": "internal.roc_auc", "a": {"data.split": "random"}, "b": {"data.split": "patient"},
               "op": ">", "differ_only_in": ["data.split"]}
    write_run(runs_root, "rand", auc=0.95, data__split="random")
    assert run_check("metric_compare", between, context(runs_root)).sentence == (
        "No finished run with a patient split has its ROC AUC on its own test part yet.")
    write_run(runs_root, "pat", auc=0.97, data__split="patient")
    result = run_check("metric_compare", between, context(runs_root))
    assert not result.passed and "0.950 and your run with a patient split pat 0.970" in result.sentence
    write_run(runs_root, "rand2", started=time.time() + 5, auc=0.991, data__split="random")
    result = run_check("metric_compare", between, context(runs_root))
    assert result.passed and result.sentence == (
        "ROC AUC on its own test part: your run with a random split rand2 scored 0.991, above your run with a "
        "patient split pat at 0.970.")
    own = {"metric": "internal.roc_auc", "b_metric": "external.roc_auc", "a": {"data.split": "random"}, "op": ">="}
    result = run_check("metric_compare", own, context(runs_root))
    assert "has no ROC AUC on the external test set yet" in result.sentence
    evaluate(runs_root / "rand2", "kermany224-test-dev", 0.88)
    assert run_check("metric_compare", own, context(runs_root)).passed
    number = {"metric": "gap.roc_auc", "a": {"data.split": "random"}, "value": 0.2, "op": ">"}
    result = run_check("metric_compare", number, context(runs_root))
    assert not result.passed and "is 0.111, not above 0.2 yet" in result.sentence


def test_threshold_chosen_reads_the_sensitivity_and_its_cost(runs_root):
    params = {"sensitivity": 0.95, "rule": "sensitivity"}
    assert run_check("threshold_chosen", params, context(runs_root)).sentence == (
        "No finished run with the sensitivity threshold rule yet.")
    write_run(runs_root, "low", val_sensitivity=0.9, threshold=0.6, train__threshold_rule="sensitivity")
    result = run_check("threshold_chosen", params, context(runs_root))
    assert not result.passed and "finds 90% of pneumonias on its validation images at threshold 0.600" in \
        result.sentence
    write_run(runs_root, "screen", val_sensitivity=0.975, threshold=0.31, started=time.time() + 5,
              train__threshold_rule="sensitivity")
    result = run_check("threshold_chosen", params, context(runs_root))
    assert result.passed
    assert ("Run screen (sensitivity rule, target 0.95) chose threshold 0.310 on its validation images. On its "
            "validation images it finds 98% of pneumonias (at least 95% asked) and clears 70% of normal films") in \
        result.sentence


def test_dataset_chosen_says_the_balance_of_the_learners_data(tmp_path):
    root = tmp_path / "data"
    make_dataset(root / "tiny", n_normal=12, n_pneumonia=24, size=32)
    assert not run_check("dataset_chosen", {}, CheckContext(data_root=root)).passed
    result = run_check("dataset_chosen", {}, CheckContext(data_root=root, dataset="tiny"))
    assert result.passed and result.sentence == (
        "Your data set tiny has 36 images: 12 normal and 24 pneumonia (67%), from 14 patients. A model that answers "
        "PNEUMONIA for every image would be right 67% of the time.")


def test_the_learners_runs_are_their_workspace_or_the_shared_runs(runs_root):
    write_run(runs_root, "shared-run")
    space = runs_root / "workspaces" / ("b-" + "1" * 24)
    space.mkdir(parents=True)
    write_run(space, "visitor-run")
    assert [p.name for p in checks.run_folders(runs_root)] == ["shared-run"]
    assert [p.name for p in checks.run_folders(runs_root, "b-" + "1" * 24)] == ["visitor-run"]


def test_the_model_card_holds_the_external_score_with_its_interval(runs_root):
    run = write_run(runs_root, "card-run")
    evaluate(run, "kermany224-test-dev", 0.88)
    info = checks.read_run(run)
    fields = material.card_defaults(info)
    assert fields["external"].startswith("kermany224-test-dev (311 images, none from training): ROC AUC 0.880")
    assert "95 % intervals: sensitivity" in fields["external"]
    card = material.model_card({**fields, "intended_use": "Teaching only."}, info)
    assert card.startswith("# Model card: card-run") and "## Intended use\n\nTeaching only." in card
    assert "## Failures seen\n\n_(not written)_" in card


# --- Progress -------------------------------------------------------------------------------------------------
def test_progress_counts_time_answers_and_checks_and_can_be_reset(tmp_path):
    lesson = lessons.read_lesson(_write(tmp_path, GOOD_LESSON))
    path = progress.progress_file(None, tmp_path / "runs")
    progress.visit(path, "demo", "train", now=100.0)
    progress.visit(path, "demo", "train", now=160.0)
    progress.visit(path, "demo", "think", now=10_000.0)  # away for hours: counts as IDLE_CAP_S
    progress.record_check(path, "demo", "train", True, "Found it.", now=170.0)
    first = progress.record_answer(path, "demo", "think", 0, 0, False)
    again = progress.record_answer(path, "demo", "think", 0, 1, True)
    assert first["first_right"] is False and again == {**again, "first_right": False, "right": True, "tries": 2}
    state = progress.summary(progress.read(path), lesson)
    assert (state.steps_done, state.checks_passed, state.first_try_right, state.seconds) == (2, 1, 0, 60.0 + 300.0)
    assert state.done and state.step_key == "think"
    row = progress.learner_row("me", progress.read(path), [lesson])
    assert row["lessons done"] == "1 of 1" and row["right at first try"] == "0 of 1" and row["minutes"] == 6.0
    progress.reset(path, "demo")
    assert progress.summary(progress.read(path), lesson).steps_done == 0


def test_the_class_table_has_a_row_per_learner_and_a_csv(tmp_path):
    lesson = lessons.read_lesson(_write(tmp_path, GOOD_LESSON))
    root = tmp_path / "runs"
    for workspace in ("b-" + "a" * 24, "u-" + "b" * 24):
        path = progress.progress_file(workspace, root)
        progress.visit(path, "demo", "train")
        progress.record_answer(path, "demo", "think", 0, 1, True)
    progress.visit(progress.progress_file(None, root), "demo", "train")
    rows = progress.class_table([lesson], root)
    assert [r["learner"] for r in rows] == ["operator (this app's own runs)", "b-" + "a" * 24, "u-" + "b" * 24]
    assert rows[1]["right at first try"] == "1 of 1"
    csv = progress.class_csv(rows).splitlines()
    assert csv[0] == ",".join(progress.CLASS_COLUMNS) and len(csv) == 4


def _write(folder: Path, text: str, name: str = "demo.md") -> Path:
    target = folder / "lessons" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return target


# --- The page ---------------------------------------------------------------------------------------------------
def page_text(at: AppTest) -> str:
    parts = []
    for kind in ("markdown", "caption", "info", "warning", "error", "success", "subheader"):
        parts += [str(e.value) for e in getattr(at, kind)]
    return "\n".join(parts)


def open_lessons(monkeypatch, folder: Path | None = None) -> AppTest:
    if folder is not None:
        monkeypatch.setenv(lessons.ENV_LESSONS, str(folder))
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    at.run()
    at.switch_page(LESSONS)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_the_page_lists_the_lessons_and_a_bad_file_is_one_sentence_while_the_others_render(tmp_path, monkeypatch):
    folder = tmp_path / "lessons"
    for path in lessons.lesson_files(lessons.LESSONS_DIR):
        _write(tmp_path, path.read_text(encoding="utf-8"), path.name)
    _write(tmp_path, GOOD_LESSON.replace("kind: run_exists", "kind: runs_exist"), "broken.md")
    at = open_lessons(monkeypatch, folder)
    errors = [e.value for e in at.error]
    assert errors == ["lessons/broken.md: step 1's check 'kind' must be one of dataset_chosen, run_exists, "
                      "runs_differ_only_in, evaluated_externally, metric_compare, threshold_chosen; got 'runs_exist'."]
    text = page_text(at)
    for title in ("Meet the data", "Leakage", "Imbalance and the threshold", "Shortcuts",
                  "Augmentation that imitates reality", "An honest report"):
        assert f"**{title}" in text
    assert "About 15 minutes · 4 steps" in text
    assert "0 of 4 steps done" in [p.proto.text for p in at.get("progress")]


def test_a_wrong_answer_shows_the_explanation_and_progress_survives_a_new_session(tmp_path, monkeypatch):
    _write(tmp_path, GOOD_LESSON)
    at = open_lessons(monkeypatch, tmp_path / "lessons")
    at.button(key="open_demo").click().run()
    assert [p.proto.text for p in at.get("progress")] == ["Step 1 of 2: Train"]
    assert "No finished run with a patient split yet." in [w.value for w in at.warning]
    at.button(key="lesson_next").click().run()
    (radio,) = at.radio
    radio.set_value(0).run()
    assert [e.value for e in at.error] == ["Not quite: the answer is “two”. Because two."]
    at.radio[0].set_value(1).run()
    assert [s.value for s in at.success][0] == "Right (not at the first try). Because two."
    # A reload is a new session: the list says where the learner stands, and Continue opens the lesson where they
    # were, with their answer.
    again = open_lessons(monkeypatch)
    assert "1 of 2 steps done" in [p.proto.text for p in again.get("progress")]
    assert "1 of 1 checks passed" not in page_text(again) and "0 of 1 checks passed" in page_text(again)
    assert again.button(key="open_demo").label == "Continue"
    again.button(key="open_demo").click().run()
    assert again.radio[0].value == 1
    assert "Right (not at the first try). Because two." in [s.value for s in again.success]
    stored = progress.read(progress.progress_file(None))
    assert stored["lessons"]["demo"]["steps"]["think"]["answers"]["0"]["first_right"] is False


def test_the_operator_sees_the_class_table_and_downloads_it(tmp_path, monkeypatch, runs_root):
    _write(tmp_path, GOOD_LESSON)
    path = progress.progress_file("b-" + "c" * 24, runs_root)
    progress.visit(path, "demo", "train")
    progress.record_answer(path, "demo", "think", 0, 1, True)
    at = open_lessons(monkeypatch, tmp_path / "lessons")
    frames = [f.value for f in at.dataframe]
    table = next(f for f in frames if "learner" in f.columns)
    assert list(table["learner"]) == ["b-" + "c" * 24] and list(table["right at first try"]) == ["1 of 1"]
    assert any(b.label == "Download the class table (CSV)" for b in at.get("download_button"))


# --- A whole lesson with real tiny runs -------------------------------------------------------------------------
EVERY_KIND = """---
id: every-kind
title: Every kind of check
goal: Drive each kind of check with real runs.
minutes: 10
steps:
  - title: Choose
    check:
      kind: dataset_chosen
  - title: Patient
    action:
      page: training
      label: Open Training with a patient split
      settings:
        train.recipe: quick
        data.split: patient
        model.backbone: mobilenet_v2
        model.alpha: 0.35
    check:
      kind: run_exists
      settings:
        train.recipe: quick
        data.split: patient
  - title: Random
    action:
      page: training
      label: Open Training with a random split
      settings:
        train.recipe: quick
        data.split: random
        model.backbone: mobilenet_v2
        model.alpha: 0.35
    check:
      kind: runs_differ_only_in
      settings: data.split
  - title: Outside
    action:
      page: evaluation
      label: Evaluate the random-split run
      settings:
        run:
          data.split: random
        evaluate_on: auto
    check:
      kind: evaluated_externally
      settings:
        data.split: random
  - title: Compare
    check:
      kind: metric_compare
      metric: external.roc_auc
      a:
        data.split: random
      value: 0
      op: ">="
  - title: Screen
    action:
      page: training
      label: Open Training with the screening rule
      settings:
        train.recipe: quick
        train.threshold_rule: sensitivity
        data.split: random
        model.backbone: mobilenet_v2
        model.alpha: 0.35
    check:
      kind: threshold_chosen
      sensitivity: 0.95
      rule: sensitivity
---
## Choose

Choose.

## Patient

Train.

## Random

Train again.

## Outside

Evaluate.

## Compare

Compare.

## Screen

Screen.
"""


@pytest.mark.slow
def test_a_lesson_with_every_kind_of_check_driven_through_with_real_tiny_runs(tmp_path, monkeypatch):
    """Each check fails before its action and passes after it, quoting the learner's own figures; the action's
    button opens the Training page with its settings filled in; the runs are trained for real (tiny ones)."""
    from cxr_core.engine import train
    from cxr_core.evaluation.external import evaluate_folder

    data_root = Path(os.environ["CXR_DATA_ROOT"])
    make_dataset(data_root / "tiny", n_normal=20, n_pneumonia=40, size=48)
    make_dataset(data_root / "tiny-test", n_normal=10, n_pneumonia=20, size=48, seed=3)
    _write(tmp_path, EVERY_KIND)
    at = open_lessons(monkeypatch, tmp_path / "lessons")
    at.button(key="open_every-kind").click().run()
    lesson = lessons.read_lesson(tmp_path / "lessons" / "demo.md")

    def step(index: int) -> str:
        at.session_state["lesson_step"] = index
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return "\n".join([w.value for w in at.warning] + [s.value for s in at.success])

    def train_as(step_index: int) -> Path:
        """What the learner does after the action: the action's settings trained, on a tiny model."""
        config = lessons.action_config(lesson.steps[step_index].action.settings)
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, data_dir=str(data_root / "tiny")),
                                     model=TINY_PRETRAINED,
                                     train=dataclasses.replace(config.train, epochs=2, batch_size=16,
                                                               cache_dir=str(tmp_path / "cache")))
        return train.train(config, run_dir=Path(os.environ["CXR_RUNS_DIR"]) / f"run-{step_index}")

    assert "No data set chosen yet" in step(0)
    at.session_state["dataset"] = "tiny"
    assert "Your data set tiny has 60 images: 20 normal and 40 pneumonia (67%)" in step(0)

    assert "No finished run with the quick recipe and a patient split yet." in step(1)
    at.button(key="action_patient").click().run()  # the action: Training opens with its settings
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="train_recipe").value == "quick" and at.selectbox(key="train_split").value == "patient"
    assert at.selectbox(key="train_backbone").value == "mobilenet_v2"
    assert at.number_input(key="train_limit").value == 0 and at.number_input(key="train_epochs").value == 8
    at.switch_page(LESSONS)
    patient = train_as(1)
    assert re.search(r"Found your finished run with the quick recipe and a patient split: run-1: ROC AUC [0-9.]+ on "
                     r"its own test part", step(1))

    assert "You need 2 finished runs that differ only in the split; you have 1." in step(2)
    random_run = train_as(2)
    assert re.search(r"You trained 2 runs that differ only in the split: random [0-9.]+, patient [0-9.]+", step(2))

    assert "has not been evaluated on an external test set yet" in step(3)
    assert at.button(key="action_outside").disabled is False
    evaluate_folder(random_run, data_root / "tiny-test")
    assert re.search(r"Run run-2 scored ROC AUC [0-9.]+ and accuracy [0-9.]+ on tiny-test \(30 images", step(3))

    assert re.search(r"The ROC AUC on the external test set of your run with a random split run-2 is [0-9.]+, at "
                     r"least 0\.", step(4))

    assert "No finished run with the sensitivity threshold rule yet." in step(5)
    train_as(5)
    assert re.search(r"Run run-5 \(sensitivity rule, target 0\.95\) chose threshold [0-9.]+ on its validation images",
                     step(5))
    summary = progress.summary(progress.read(progress.progress_file(None)), lesson)
    assert summary.checks_passed == 6 and summary.done
    assert patient.is_dir()
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


@pytest.mark.slow
def test_a_lesson_as_a_notebook_runs_its_experiments_on_the_practice_set(tmp_path):
    """`python -m cxr_core lesson-notebook leakage` writes a notebook that trains, evaluates and checks with the
    library; run top to bottom with nbclient on the practice sets, its checks pass on the runs it made."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from conftest import TINY_WEIGHTS
    from cxr_core import cli

    practice, _ = material.make_practice_pair(Path(os.environ["CXR_DATA_ROOT"]))
    out = tmp_path / "leakage.ipynb"
    assert cli.main(["lesson-notebook", "leakage", "--out", str(out), "--data", str(practice),
                     "--runs", str(tmp_path / "runs"), "--weights", str(TINY_WEIGHTS)]) == 0
    notebook = nbformat.read(out, as_version=4)
    assert notebook.cells[0].source.startswith("# Leakage: when the test has seen the child")
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(PROJECT_ROOT)}}).execute()
    printed = "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                        for output in cell.get("outputs", []))
    assert "PASSED: Found your finished run with the quick recipe and a patient split" in printed
    assert "PASSED: You trained 2 runs that differ only in the split: random" in printed
    assert printed.count("none from its training part") >= 3  # the random run, then both runs, evaluated outside
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_an_unknown_lesson_for_a_notebook_is_one_sentence(capsys, tmp_path):
    from cxr_core import cli

    assert cli.main(["lesson-notebook", "leakag", "--out", str(tmp_path / "x.ipynb"), "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: There is no lesson 'leakag'; choose one of meet-the-data, ")
