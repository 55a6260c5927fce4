"""The class's locked test set and the leaderboard: one rule hides the locked set from visitors on every page
(the folder box, a crafted link or session value, the external test set, the threshold, a lesson action); the
board scores a run at its own threshold, limits submissions per day, groups what the test set cannot tell apart,
reveals per-image results at the end, exports CSV and records it all in the audit trail.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from conftest import TINY_MODEL, make_dataset
from cxr_core.core.config import DataConfig, RunConfig
from cxr_core.hosting import access, audit, classroom, leaderboard
from cxr_core.inference.predictor import Predictor
from cxr_core.runs.run_folder import RunFolder
from test_app import HOME, KEY_DATASET, TIMEOUT, data_root, fake_run, render, text_of
from test_visitor_view import become_operator, hosted

LOCKED = "class-test"
WORKSPACE = "b-0123456789abcdef0123"
OTHER = "b-fedcba9876543210fedc"
NOON = dt.datetime(2025, 3, 4, 12, 0, tzinfo=dt.timezone.utc)


def runs_dir() -> Path:
    return Path(os.environ["CXR_RUNS_DIR"])


class BrightnessEngine:
    """A stand-in network: the logit follows the mean brightness of the image (the practice images'
    opacities are bright), so the scores are real numbers without TensorFlow."""

    name = "fake"
    image_size = 32
    n_outputs = 1
    map_grid = (4, 4)

    def __init__(self, scale: float = 0.2, centre: float = 100.0) -> None:
        self.scale, self.centre = scale, centre

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return ((batch.mean(axis=(1, 2, 3)) - self.centre) * self.scale).reshape(-1, 1)

    def explain(self, batch: np.ndarray):
        return self.logits(batch), np.zeros((len(batch), 4, 4, 2), np.float32)


def fake_predictor(threshold: float = 0.5, **kwargs) -> Predictor:
    return Predictor(BrightnessEngine(**kwargs), RunConfig(data=DataConfig(data_dir="x"), model=TINY_MODEL),
                     threshold=threshold)


def locked_set(name: str = LOCKED, **kwargs) -> Path:
    return make_dataset(data_root() / name, **{"n_normal": 12, "n_pneumonia": 18, "size": 32, **kwargs})


def visitor_run(name: str = "run-mine", workspace: str = WORKSPACE, **kwargs) -> Path:
    """A finished run in a visitor's workspace whose threshold, chosen on its validation part, is not 0.5."""
    y = np.array([0] * 10 + [1] * 10)
    p_val = np.where(y == 1, np.linspace(0.3, 0.9, 20), np.linspace(0.05, 0.35, 20))
    return fake_run(f"workspaces/{workspace}/{name}", np.where(y == 1, 0.8, 0.2), y, p_val=p_val, y_val=y, **kwargs)


def submit(run: Path, who: str = WORKSPACE, role: str = access.VISITOR, now: dt.datetime = NOON,
           predictor: Predictor | None = None) -> dict:
    return leaderboard.submit(run, who=who, role=role, workspace=WORKSPACE if role == access.VISITOR else None,
                              data_root=data_root(), predictor=predictor or fake_predictor(), now=now)


# --- The one rule --------------------------------------------------------------------------------------------
def test_the_locked_set_is_hidden_from_a_visitor_by_name_path_or_link_and_the_setting_is_checked():
    locked_set()
    make_dataset(data_root() / "practice", n_normal=4, n_pneumonia=4, size=32)
    names = ["class-test", "practice"]
    assert classroom.visible_datasets(names, access.VISITOR, data_root()) == names  # nothing locked yet
    classroom.update(locked_test_set=LOCKED)
    assert classroom.visible_datasets(names, access.VISITOR, data_root()) == ["practice"]
    assert classroom.visible_datasets(names, access.OPERATOR, data_root()) == names
    for spelling in (LOCKED, data_root() / LOCKED, data_root() / "practice" / ".." / LOCKED,
                     data_root() / LOCKED / "NORMAL"):
        assert classroom.is_locked(spelling, data_root()), spelling
        with pytest.raises(classroom.LockedTestSetError, match="locked test set"):
            classroom.check_visible(spelling, access.VISITOR, data_root())
        classroom.check_visible(spelling, access.OPERATOR, data_root())
    (data_root() / "alias").symlink_to(data_root() / LOCKED)
    assert classroom.is_locked("alias", data_root())
    assert not classroom.is_locked("practice", data_root())
    assert classroom.hidden_evaluation(LOCKED, access.VISITOR, data_root())
    assert not classroom.hidden_evaluation(LOCKED, access.OPERATOR, data_root())
    # A setting that is not a plain folder or a limit out of range is one sentence; the file keeps its values.
    for bad in ({"locked_test_set": "../etc"}, {"daily_submissions": 0}, {"daily_submissions": "many"}):
        with pytest.raises(classroom.LockedTestSetError):
            classroom.update(**bad)
    assert classroom.read() == classroom.Classroom(locked_test_set=LOCKED)
    # A damaged file means no locked set rather than a crash.
    classroom.settings_path().write_text("{not json")
    assert classroom.read() == classroom.Classroom()


# --- Submitting ----------------------------------------------------------------------------------------------
def test_a_submission_is_scored_at_the_runs_own_threshold_and_nothing_lands_in_the_run():
    locked_set()
    classroom.update(locked_test_set=LOCKED)
    run = visitor_run()
    own = RunFolder(run).read_threshold()
    assert own != pytest.approx(0.5)
    before = sorted(p.name for p in run.rglob("*"))
    entry = submit(run, predictor=fake_predictor(threshold=0.5))
    assert entry["threshold"] == pytest.approx(own)
    assert entry["state"] == leaderboard.POSTED and entry["n"] == 30 and entry["run"] == "run-mine"
    table = leaderboard.predictions(entry["id"])
    assert len(table) == 30 and set(table["y"]) == {0, 1}
    # The figures are those of the stored probabilities at the run's own threshold, with bootstrap intervals.
    from cxr_core.core.metrics import binary_metrics

    again = binary_metrics(table["y"], table["probability"], own)
    for name in leaderboard.FIGURES:
        assert entry[name] == pytest.approx(again[name])
        low, high = entry["intervals"][name]
        assert low <= entry[name] <= high
    assert sorted(p.name for p in run.rglob("*")) == before  # store=False: not one file more in the run
    assert not (run / "evaluations").exists()
    assert entry["owner"] != WORKSPACE and WORKSPACE not in json.dumps(leaderboard.read_entries())


def test_the_daily_limit_is_per_visitor_per_utc_day_and_the_sentence_names_it():
    locked_set()
    classroom.update(locked_test_set=LOCKED, daily_submissions=2)
    run = visitor_run()
    submit(run)
    submit(run, now=NOON + dt.timedelta(hours=11))  # 23:00 UTC the same day
    assert leaderboard.left_today(WORKSPACE, access.VISITOR, now=NOON) == 0
    with pytest.raises(leaderboard.SubmissionError) as refused:
        submit(run, now=NOON + dt.timedelta(hours=11, minutes=30))
    assert str(refused.value) == "You have used your 2 submissions for today; the board takes more tomorrow (UTC)."
    assert len(leaderboard.read_entries()) == 2
    # The next UTC day takes more; another visitor has their own count; the operator has none.
    submit(run, now=NOON + dt.timedelta(hours=12, minutes=1))
    assert leaderboard.left_today(OTHER, access.VISITOR, now=NOON) == 2
    assert leaderboard.left_today("operator", access.OPERATOR, now=NOON) is None
    classroom.update(daily_submissions=3)
    assert leaderboard.limit_sentence(3) == ("You have used your 3 submissions for today; the board takes more "
                                             "tomorrow (UTC).")


def test_a_visitor_submits_only_their_own_finished_pneumonia_runs():
    locked_set()
    with pytest.raises(leaderboard.SubmissionError, match="No locked test set"):
        submit(visitor_run())
    classroom.update(locked_test_set=LOCKED)
    theirs = visitor_run("run-theirs", workspace=OTHER)
    shared = fake_run("run-shared", np.array([0.2, 0.8] * 5), np.array([0, 1] * 5))
    for run in (theirs, shared):
        with pytest.raises(leaderboard.SubmissionError, match="only a finished run of your own workspace"):
            submit(run)
    failed = fake_run(f"workspaces/{WORKSPACE}/run-failed", None, None, state="failed", error="x")
    with pytest.raises(leaderboard.SubmissionError, match="has not finished"):
        submit(failed)
    subtype = visitor_run("run-subtype")
    config = RunFolder(subtype).read_config()
    RunFolder(subtype).write_config(RunConfig(data=DataConfig(data_dir="x", task="subtype"), model=config.model))
    with pytest.raises(leaderboard.SubmissionError, match="pneumonia-vs-normal"):
        submit(subtype)
    # The operator may post any run (a baseline for the class), with no daily limit.
    assert submit(shared, who="teacher", role=access.OPERATOR)["role"] == access.OPERATOR
    # A refused or failed scoring leaves no reservation behind.
    assert [e["run"] for e in leaderboard.read_entries()] == ["run-shared"]


def test_a_run_that_saw_the_locked_images_is_not_posted():
    folder = locked_set()
    classroom.update(locked_test_set=LOCKED)
    run = visitor_run()
    from cxr_core.data.scan import scan_dataset

    manifest = scan_dataset(folder).manifest
    RunFolder(run).write_split(manifest.assign(split="train"))
    with pytest.raises(leaderboard.SubmissionError, match="not be honest"):
        submit(run)
    assert leaderboard.read_entries() == []


# --- The board -----------------------------------------------------------------------------------------------
def constructed(n: int = 300, seed: int = 0) -> tuple[list[dict], dict[str, pd.DataFrame]]:
    """Three submissions on the same 300 images: two that rank them almost alike, one clearly worse."""
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * (n // 2))
    signal = rng.normal(size=n) + 1.6 * y
    strong = 1 / (1 + np.exp(-signal))
    twin = 1 / (1 + np.exp(-(signal + rng.normal(scale=0.15, size=n))))
    weak = 1 / (1 + np.exp(-(0.35 * signal + rng.normal(scale=1.2, size=n))))
    images = [f"NORMAL/{i}.png" if t == 0 else f"PNEUMONIA/{i}.png" for i, t in enumerate(y)]
    from cxr_core.core.metrics import binary_metrics

    entries, tables = [], {}
    for i, (name, prob) in enumerate((("weak", weak), ("twin", twin), ("strong", strong))):
        entries.append({"id": name, "run": name, "roc_auc": binary_metrics(y, prob)["roc_auc"], "threshold": 0.5,
                        "submitted": f"2025-03-04T1{i}:00:00+00:00", "pseudonym": name, "owner": name})
        tables[name] = pd.DataFrame({"image": images, "y": y, "probability": prob})
    return entries, tables


def test_the_board_groups_what_the_test_set_cannot_tell_apart():
    entries, tables = constructed()
    rows = leaderboard.standings(entries, tables)
    by_run = {row.entry["run"]: row for row in rows}
    assert [row.rank for row in rows] == [1, 2, 3]
    top, second = rows[0].entry["run"], rows[1].entry["run"]
    assert {top, second} == {"strong", "twin"} and rows[2].entry["run"] == "weak"
    assert abs(by_run["strong"].entry["roc_auc"] - by_run["twin"].entry["roc_auc"]) < 0.02
    assert rows[0].group == rows[1].group == "A" and rows[0].tied_with_leader and rows[1].tied_with_leader
    assert rows[1].p_vs_leader >= 0.05
    assert rows[2].group == "B" and not rows[2].tied_with_leader and rows[2].p_vs_leader < 0.05
    assert rows[2].p_vs_above < 0.05
    # Submissions that cannot be compared (no shared images) are not told apart.
    lone = {"id": "lone", "run": "lone", "roc_auc": 0.1, "threshold": 0.5, "submitted": "x"}
    alone = leaderboard.standings([*entries, lone], {**tables, "lone": tables["weak"].iloc[:0]})
    assert alone[-1].entry["id"] == "lone" and "A" in alone[-1].group


def test_reveal_per_image_results_and_csv_export():
    locked_set()
    classroom.update(locked_test_set=LOCKED)
    mine = submit(visitor_run())
    theirs = leaderboard.submit(visitor_run("run-theirs", workspace=OTHER), who=OTHER, role=access.VISITOR,
                                workspace=OTHER, data_root=data_root(), predictor=fake_predictor(centre=90), now=NOON)
    with pytest.raises(leaderboard.SubmissionError, match="until the operator reveals"):
        leaderboard.own_predictions(mine["id"], WORKSPACE, access.VISITOR)
    assert len(leaderboard.own_predictions(mine["id"], "teacher", access.OPERATOR)) == 30
    classroom.update(revealed=True)
    assert len(leaderboard.own_predictions(mine["id"], WORKSPACE, access.VISITOR)) == 30
    with pytest.raises(leaderboard.SubmissionError, match="your own submissions"):
        leaderboard.own_predictions(theirs["id"], WORKSPACE, access.VISITOR)
    rows = leaderboard.board()
    text = leaderboard.board_csv(rows)
    table = pd.read_csv(io.StringIO(text))
    assert list(table.columns) == list(leaderboard.CSV_COLUMNS)
    assert list(table["rank"]) == [1, 2] and set(table["run"]) == {"run-mine", "run-theirs"}
    assert WORKSPACE not in text and OTHER not in text
    assert [r["you"] for r in leaderboard.board_rows(rows, me=WORKSPACE) if r["run"] == "run-mine"] == [True]


# --- Pages ---------------------------------------------------------------------------------------------------
def options(at: AppTest, key: str) -> list:
    return list(at.selectbox(key=key).options)


def two_more_sets() -> None:
    for name in ("practice", "other"):
        make_dataset(data_root() / name, n_normal=4, n_pneumonia=4, size=32)


def shared_run_evaluated_on_the_locked_set() -> Path:
    """The operator's shared run, evaluated (and stored) on the locked set, as a teacher's baseline would be."""
    from cxr_core.evaluation import external

    y = np.array([0] * 10 + [1] * 10)
    run = fake_run("run-shared", np.where(y == 1, 0.8, 0.2), y)
    external.evaluate_folder(run, data_root() / LOCKED, predictor=fake_predictor(), store=True)
    assert LOCKED in RunFolder(run).external_evaluations()
    return run


def test_a_visitor_cannot_list_browse_evaluate_or_threshold_the_locked_set_and_the_operator_can():
    locked_set()
    two_more_sets()
    classroom.update(locked_test_set=LOCKED)
    run = shared_run_evaluated_on_the_locked_set()
    # A crafted link: said like any data set that is not here; the folder box does not offer it.
    at = hosted("pages/dataset.py", dataset=LOCKED)
    assert [i.value for i in at.info if "this link" in i.value] == [
        f"The data set in this link, `{LOCKED}`, is not available here; choose a data set on the Dataset page."]
    assert LOCKED not in options(at, "dataset_choice")
    assert at.session_state[KEY_DATASET] != LOCKED
    # A crafted session value: nothing of the set is shown (no counts, no split, no images).
    at.session_state[KEY_DATASET] = LOCKED
    render(at, None, "dataset (a crafted session value)")
    assert at.session_state[KEY_DATASET] is None and at.selectbox(key="dataset_choice").value is None
    assert "Class balance" not in [s.value for s in at.subheader] and not at.get("imgs")
    # Evaluation: not an external test set to choose, even by a session value; the stored result on it is not
    # offered as a test set (no figures, no threshold to move) and the run's label does not quote it.
    at.session_state["eval_other_dataset"] = LOCKED
    render(at, "pages/evaluation.py", "evaluation (visitor)")
    assert LOCKED not in options(at, "eval_other_dataset")
    assert at.selectbox(key="eval_other_dataset").value != LOCKED
    assert not [o for o in at.radio(key="eval_test_set").options if LOCKED in o]
    assert not [s for s in at.slider if LOCKED in str(s.key)]
    assert LOCKED not in text_of(at) and LOCKED not in " ".join(options(at, "eval_run"))
    # The operator sees and uses everything.
    become_operator(at)
    assert LOCKED in options(at, "eval_other_dataset")
    assert f"external: {LOCKED}" in at.radio(key="eval_test_set").options
    render(at, "pages/dataset.py", "dataset (operator)")
    assert LOCKED in options(at, "dataset_choice")
    assert run.is_dir()


def test_home_and_the_lessons_never_quote_the_locked_set_to_a_visitor():
    locked_set()
    two_more_sets()
    classroom.update(locked_test_set=LOCKED)
    run = shared_run_evaluated_on_the_locked_set()
    # Home's "how good is the model, honestly" for the shared run: not its figures on the locked set.
    at = hosted(None, run=str(run))
    at.session_state["run"] = str(run)
    render(at, None, "home (visitor, the shared run chosen)")
    assert LOCKED not in text_of(at)
    # The Lessons page names the external test set the lessons use: another set, never the locked one.
    at.session_state[KEY_DATASET] = "practice"
    render(at, "pages/lessons.py", "lessons (visitor)")
    assert LOCKED not in text_of(at) and "external test set: **other**" in text_of(at)
    become_operator(at)
    render(at, "pages/home.py", "home (operator)")
    assert f"AUC on {LOCKED}" in text_of(at)


def test_a_lesson_action_never_points_a_visitor_at_the_locked_set(monkeypatch):
    from cxr_core.teaching.lessons import Action
    from pages.ui import access as page_access, lesson_actions

    locked_set()
    two_more_sets()
    classroom.update(locked_test_set=LOCKED)
    monkeypatch.setattr(page_access, "role", lambda: access.VISITOR)
    named = lesson_actions.prepare(Action("dataset", "Open", {"dataset": LOCKED}), [], data_root(), {})
    assert named.problem == classroom.LOCKED_SENTENCE and KEY_DATASET not in named.state
    on = lesson_actions.prepare(Action("evaluation", "Evaluate", {"evaluate_on": LOCKED}), [], data_root(), {})
    assert on.problem == classroom.LOCKED_SENTENCE and "eval_other_dataset" not in on.state
    # "auto" picks another external set, although the locked one's name says "test".
    auto = lesson_actions.prepare(Action("evaluation", "Evaluate", {"evaluate_on": "auto"}), [], data_root(),
                                  {KEY_DATASET: "practice"})
    assert auto.state["eval_other_dataset"] == "other"
    monkeypatch.setattr(page_access, "role", lambda: access.OPERATOR)
    auto = lesson_actions.prepare(Action("evaluation", "Evaluate", {"evaluate_on": "auto"}), [], data_root(),
                                  {KEY_DATASET: "practice"})
    assert auto.state["eval_other_dataset"] == LOCKED


@pytest.mark.slow
def test_the_leaderboard_page_for_a_visitor_and_the_operator(monkeypatch):
    locked_set()
    classroom.update(locked_test_set=LOCKED, daily_submissions=1)
    monkeypatch.setattr(Predictor, "from_run", classmethod(lambda _cls, _run_dir, **_: fake_predictor()))
    at = hosted("pages/leaderboard.py")
    assert "No submissions yet" in text_of(at) and "Operator: the class's test set" not in text_of(at)
    ws = at.session_state["access_browser_id"]
    visitor_run(workspace=ws)
    visitor_run("run-theirs", workspace=OTHER)  # another visitor's: not offered
    render(at, None, "leaderboard (a run of one's own)")
    assert [o.split(" ")[0] for o in options(at, "lb_run")] == ["run-mine"]
    assert "**1 of 1** submissions left today" in text_of(at)
    at.button(key="lb_submit").click()
    render(at, None, "leaderboard (submitted)")
    assert [s.value for s in at.success if "Posted run-mine" in s.value]
    entry = audit.read()[0]
    assert (entry["action"], entry["role"], entry["who"]) == ("submit", "visitor", ws)
    table = at.dataframe[0].value
    assert list(table["run"]) == ["run-mine"] and table["who"][0].endswith("(you)") and ws not in table["who"][0]
    assert table["group"][0] == "A" and "(" in table["AUC"][0]
    assert at.get("plotly_chart")
    # The day's one submission is used: one sentence with the limit, and no button.
    assert leaderboard.limit_sentence(1) in [i.value for i in at.info]
    assert not [b for b in at.button if b.key == "lb_submit"]
    assert "stay hidden until the operator reveals" in text_of(at)
    # The operator: the locked set, the limit, the reveal, the CSV; each change in the audit trail.
    become_operator(at)
    assert "Operator: the class's test set" in text_of(at)
    assert at.get("download_button")
    at.number_input(key="lb_daily").set_value(2)
    next(b for b in at.button if b.label == "Save").click()
    render(at, None, "leaderboard (limit 2)")
    assert classroom.read().daily_submissions == 2 and audit.read()[0]["action"] == "daily submissions"
    at.toggle(key="lb_reveal").set_value(True)
    render(at, None, "leaderboard (revealed)")
    assert classroom.read().revealed and audit.read()[0]["action"] == "reveal"
    # The visitor (signed out) sees their own per-image results now.
    at.button(key="access_sign_out").click()
    render(at, None, "leaderboard (visitor again)")
    assert at.selectbox(key="lb_per_image") and "called wrongly" in text_of(at)


def test_the_page_without_a_locked_set_says_what_the_operator_does():
    at = hosted("pages/leaderboard.py")
    assert ("No locked test set has been chosen yet, so there is no board: the operator of this app (your teacher) "
            "chooses one on this page.") in [i.value for i in at.info]
    locked_set()
    become_operator(at)
    assert any("choose one under **Operator** below" in i.value for i in at.info)
    at.selectbox(key="lb_locked").set_value(LOCKED)
    next(b for b in at.button if b.label == "Save").click()
    render(at, None, "leaderboard (locked set chosen)")
    assert classroom.read().locked_test_set == LOCKED
    assert (audit.read()[0]["action"], audit.read()[0]["target"]) == ("locked test set", LOCKED)


def test_a_local_app_with_no_data_and_no_runs_shows_the_operator_what_to_do():
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)  # no secrets: the single user is the operator
    render(at, None, "router (local)")
    render(at, "pages/leaderboard.py", "leaderboard (local, empty)")
    text = text_of(at)
    assert "locked test set" in text and "Operator: the class's test set" in text
    assert any("choose one under **Operator** below" in i.value for i in at.info)
    assert options(at, "lb_locked") == ["None: no leaderboard"] and not at.get("download_button")


@pytest.mark.slow  # the Training page imports TensorFlow on its first render
def test_the_training_page_does_not_take_the_locked_set_from_a_crafted_session_value():
    locked_set()
    two_more_sets()
    classroom.update(locked_test_set=LOCKED)
    at = hosted()
    at.session_state[KEY_DATASET] = LOCKED
    render(at, "pages/training.py", "training (visitor, a crafted session value)")
    assert "Choose a data set on the **Dataset** page first" in text_of(at)
    assert LOCKED not in text_of(at)
