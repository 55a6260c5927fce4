"""The Training page's settings form is drawn from the table of settings (cxr_core.core.settings): every
advanced row has its widget, what those widgets hold reaches the run the page starts, a recipe (or a run
training when the page is reloaded) fills them in, and a row added to the table appears with no page edit."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from conftest import make_dataset
from cxr_core.core import settings
from cxr_core.core.config import RunConfig, TrainConfig
from cxr_core.core.errors import JobQueueError
from cxr_core.core.recipes import apply_recipe
from cxr_core.core.settings import Setting
from cxr_core.data import plan
from cxr_core.hosting import job_queue, jobs
from cxr_core.runs.run_folder import RunFolder
from cxr_core.teaching import lessons
from pages.ui import lesson_actions

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HOME = str(PROJECT_ROOT / "Home.py")
TIMEOUT = 120  # the first Training render imports TensorFlow


def render(at: AppTest) -> AppTest:
    at.run(timeout=TIMEOUT)
    assert not at.exception, [e.value for e in at.exception]
    return at


def widget(at: AppTest, row: Setting):
    """The widget the page drew for ``row`` (looked up by the kind of widget the row asks for)."""
    return getattr(at, row.widget_call)(key=row.session_key())


@pytest.fixture
def training_page() -> AppTest:
    """The Training page with a small data set chosen."""
    make_dataset(Path(os.environ["CXR_DATA_ROOT"]) / "small", n_normal=20, n_pneumonia=40, size=48, layout="kermany")
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    render(at)
    at.session_state["dataset"] = "small"
    at.switch_page("pages/training.py")
    return render(at)


@pytest.fixture
def estimated(monkeypatch) -> list[RunConfig]:
    """Every config the page estimates the time of: the run its Start button would start, on each render."""
    seen: list[RunConfig] = []
    original = plan.estimate_seconds

    def estimate(config, n):
        seen.append(config)
        return original(config, n)

    monkeypatch.setattr(plan, "estimate_seconds", estimate)
    return seen


def test_the_advanced_section_shows_every_advanced_row(training_page):
    at = training_page
    (expander,) = [e for e in at.expander if e.label == "Advanced settings"]
    rows = settings.form_rows("advanced")
    assert len(rows) >= 12  # label smoothing, warm-up, schedule, weight decay, ... (the table decides)
    for row in rows:
        drawn = getattr(expander, row.widget_call)(key=row.session_key())
        assert drawn.label == row.label and drawn.help == row.form_help, row.name
        assert drawn.value == row.form_start(), f"{row.name} does not start at the config's default"
    # Each one explains itself in a sentence.
    assert all(row.form_help.endswith(".") and len(row.form_help.split()) >= 8 for row in rows)
    # Without fine-tuned layers there is no warm-up to set.
    assert expander.number_input(key="train_warmup_epochs").disabled


@pytest.fixture
def submitted(monkeypatch) -> list[RunConfig]:
    """The runs the Start button hands the queue (captured; nothing is started)."""
    seen: list[RunConfig] = []

    def submit(config, **_kwargs):  # the queue's door: the page hands it the run it would start
        seen.append(config)
        raise JobQueueError("Captured by the test; nothing was started.")

    monkeypatch.setattr(job_queue, "submit", submit)
    return seen


@pytest.mark.slow
def test_an_advanced_widget_changes_the_run_the_start_button_starts(training_page, submitted):
    at = training_page
    # A run that can start offline: MobileNetV2 from random weights, every layer trained.
    at.selectbox(key="train_backbone").set_value("mobilenet_v2")
    render(at)
    at.selectbox(key="train_weights").set_value("none")
    at.selectbox(key="train_ft_layers").set_value(-1)
    render(at)

    def start() -> RunConfig:
        next(b for b in at.button if b.label == "Start training").click()
        render(at)
        assert "Captured by the test; nothing was started." in [w.value for w in at.warning]
        return submitted[-1]

    plain = start()
    defaults = TrainConfig()
    assert (plain.train.label_smoothing, plain.train.schedule, plain.train.weight_decay, plain.train.warmup_epochs,
            plain.data.val_fraction, plain.data.seed) == (defaults.label_smoothing, defaults.schedule,
                                                          defaults.weight_decay, 0, RunConfig().data.val_fraction,
                                                          RunConfig().data.seed)
    at.slider(key="train_label_smoothing").set_value(0.2)
    at.selectbox(key="train_schedule").set_value("cosine")
    at.select_slider(key="train_weight_decay").set_value(1e-3)
    at.number_input(key="train_warmup_epochs").set_value(2)
    at.slider(key="train_val_fraction").set_value(0.2)
    at.number_input(key="train_seed").set_value(7)
    at.toggle(key="train_fine_tune_batchnorm").set_value(True)
    render(at)
    changed = start()
    assert (changed.train.label_smoothing, changed.train.schedule, changed.train.weight_decay,
            changed.train.warmup_epochs, changed.data.val_fraction, changed.data.seed, changed.train.seed,
            changed.train.fine_tune_batchnorm) == (0.2, "cosine", 1e-3, 2, 0.2, 7, 7, True)
    # Everything else is the run it was before.
    assert changed.model == plain.model and changed.augment == plain.augment
    # A combination the config refuses is one sentence and no run: more warm-up than fine-tuning epochs.
    at.number_input(key="train_warmup_epochs").set_value(50)
    render(at)
    assert any(e.value.startswith("These settings cannot be used: warmup_epochs must be") for e in at.error)
    assert not [b for b in at.button if b.label == "Start training"]


def test_a_recipe_fills_the_advanced_settings(training_page, estimated):
    at = training_page
    best = apply_recipe(RunConfig(), "best")
    assert best.train.label_smoothing != RunConfig().train.label_smoothing  # the recipe does change them
    at.selectbox(key="train_recipe").set_value("best")
    render(at)
    filled = settings.form_values(best, "advanced")
    for row in settings.form_rows("advanced"):
        assert widget(at, row).value == filled[row.session_key()], row.name
    made = estimated[-1]
    assert (made.train.label_smoothing, made.train.schedule, made.train.weight_decay, made.train.warmup_epochs,
            made.train.fine_tune_learning_rate, made.train.online_augment, made.train.balance_by) == (
        best.train.label_smoothing, best.train.schedule, best.train.weight_decay, best.train.warmup_epochs,
        best.train.fine_tune_learning_rate, best.train.online_augment, best.train.balance_by)
    # A person's change wins over the recipe's value.
    at.slider(key="train_label_smoothing").set_value(0.3)
    render(at)
    assert estimated[-1].train.label_smoothing == 0.3 and estimated[-1].train.recipe == "best"


def test_a_reload_while_a_run_trains_shows_its_advanced_settings(monkeypatch):
    make_dataset(Path(os.environ["CXR_DATA_ROOT"]) / "small", n_normal=20, n_pneumonia=40, size=48)
    folder = RunFolder(Path(os.environ["CXR_RUNS_DIR"]) / "run-training")
    best = apply_recipe(RunConfig(), "best")
    config = dataclasses.replace(
        best, data=dataclasses.replace(best.data, data_dir=str(Path(os.environ["CXR_DATA_ROOT"]) / "small"), seed=42),
        model=dataclasses.replace(best.model, backbone="mobilenet_v2"),
        train=dataclasses.replace(best.train, label_smoothing=0.15, seed=42))
    folder.write_config(config)
    folder.write_status("running", pid=os.getpid())
    monkeypatch.setattr(jobs, "active_run", lambda *_args, **_kwargs: folder.path)
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    at.switch_page("pages/training.py")
    render(at)
    assert at.slider(key="train_label_smoothing").value == 0.15
    assert at.number_input(key="train_seed").value == 42
    assert at.text_input(key="train_balance_by").value == config.train.balance_by


def test_a_row_added_to_the_table_appears_on_the_form_with_no_page_edit(training_page, estimated, monkeypatch):
    """``train.restore_best`` has no row today; one row with form="advanced" puts its widget on the page, and
    its value reaches the run."""
    at = training_page
    assert not [t for t in at.toggle if t.key == "train_restore_best"]
    row = Setting("train.restore_best", "--restore-best", "bool", "keep the weights of the best validation epoch",
                  form="advanced", label="Keep the best epoch",
                  form_help="Keep the network of the epoch that scored best on the validation images.")
    monkeypatch.setattr(settings, "SETTINGS", (*settings.SETTINGS, row))
    monkeypatch.setattr(settings, "NOT_SETTINGS",
                        {k: v for k, v in settings.NOT_SETTINGS.items() if k != "train.restore_best"})
    render(at)
    (expander,) = [e for e in at.expander if e.label == "Advanced settings"]
    added = expander.toggle(key="train_restore_best")
    assert added.label == "Keep the best epoch" and added.value is True
    assert estimated[-1].train.restore_best is True
    added.set_value(False)
    render(at)
    assert estimated[-1].train.restore_best is False


def test_a_lessons_recipe_fills_the_advanced_settings_too(tmp_path):
    action = lessons.Action(page="training", label="x", settings={"train.recipe": "best"})
    state = lesson_actions.prepare(action, [], tmp_path, {}).state
    best = apply_recipe(RunConfig(), "best")
    assert state["train_label_smoothing"] == best.train.label_smoothing
    assert state["train_balance_by"] == best.train.balance_by and state["train_schedule"] == best.train.schedule
    assert set(settings.form_values(best, "advanced")) <= set(state)


def test_a_start_click_counts_when_another_job_took_the_last_place_meanwhile(training_page, submitted, monkeypatch):
    """In a class, the button's label and help change when another visitor's job takes the last place: the click
    of someone who still saw "Start training" must start (or queue) their run, not be lost."""
    at = training_page
    at.selectbox(key="train_backbone").set_value("mobilenet_v2")
    render(at)
    at.selectbox(key="train_weights").set_value("none")
    at.selectbox(key="train_ft_layers").set_value(-1)
    render(at)
    (shown,) = [b for b in at.button if b.label == "Start training"]
    # Between this render and the click, another job takes the only place.
    monkeypatch.setattr(jobs, "running_count", lambda *_args, **_kwargs: job_queue.max_concurrent())
    shown.click()
    render(at)
    assert len(submitted) == 1, "the click was lost"
    assert [b.label for b in at.button if b.label in ("Start training", "Add to the queue")] == ["Add to the queue"]


def test_the_split_and_balance_always_show_the_shared_choice(training_page):
    """The split and balance widgets show the sidebar's choice on every run, even when a widget value was left
    from an earlier run (a run cut short under load keeps it): a lesson that set a patient split must not show
    (and start) a random one."""
    at = training_page
    at.session_state["split_mode"], at.session_state["balance"] = "patient", "class_weight"
    at.session_state["train_split"], at.session_state["train_balance"] = "random", "augment"
    render(at)
    assert at.selectbox(key="train_split").value == "patient"
    assert at.selectbox(key="train_balance").value == "class_weight"
    # Changing the widget still changes the shared choice (the sidebar's).
    at.selectbox(key="train_split").set_value("random")
    render(at)
    assert at.session_state["split_mode"] == "random" and at.selectbox(key="train_split").value == "random"
