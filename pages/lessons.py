"""Lessons: a guided course through the workbench, one experiment at a time, checked from the learner's own runs."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from cxr_core.core.errors import CxrError
from cxr_core.data import shortcut_lab, shortcuts
from cxr_core.teaching import checks, material, progress
from cxr_core.teaching.lessons import Lesson, LessonSet, Step, fingerprint, lessons_dir, load_lessons
from pages.ui import access, charts, datasets, frame, lesson_actions, models, session

frame.page_header(
    "Lessons",
    "Each lesson is a short experiment: you run it in the workbench, the app checks what you found from "
    "**your own runs**, and a few questions test the idea behind it. Work through a lesson step by step; your "
    "progress is kept, so you can stop and come back.",
)

KEY_LESSON = "lesson_open"     # the id of the open lesson ("" or absent: the list of lessons)
KEY_STEP = "lesson_step"       # the index of the open step
KEY_CARD = "lesson_card_"      # prefix of the model card's fields
VISIT_EVERY_S = 15.0           # how often an open step adds its time to the progress file at most


@st.cache_data(show_spinner=False, max_entries=4)
def _lessons(folder: str, stamp: str) -> LessonSet:  # noqa: ARG001 (stamp: part of the cache key)
    return load_lessons(folder)


def lesson_set() -> LessonSet:
    folder = lessons_dir()
    return _lessons(str(folder), fingerprint(folder))


def progress_path() -> Path | None:
    """This learner's progress file (their workspace on a hosted app, else the runs root); None when the runs
    folder cannot be written."""
    try:
        return progress.progress_file(access.workspace())
    except OSError:
        return None


def learner_context() -> checks.CheckContext:
    """This learner's runs and chosen data set, as the checks read them."""
    root = models.runs_root_info()
    try:
        paths = checks.run_folders(root.path if root else None, access.workspace())
    except OSError:
        paths = []
    return checks.CheckContext(runs=checks.read_runs(paths), data_root=datasets.data_root(),
                               dataset=st.session_state.get(session.KEY_DATASET),
                               manifest=lambda folder: datasets.scan(Path(folder)).manifest)


def open_lesson(lesson_id: str, index: int = 0) -> None:
    st.session_state[KEY_LESSON] = lesson_id
    st.session_state[KEY_STEP] = index


def close_lesson() -> None:
    st.session_state[KEY_LESSON] = ""


def restore_from_url(found: LessonSet, data: dict) -> None:
    """A reload or a link (``?lesson=leakage&step=2``) opens that lesson at that step (without a step: where
    the learner was), once per session."""
    if KEY_LESSON in st.session_state:
        return
    lesson = found.get(st.query_params.get("lesson"))
    if lesson is None:
        st.session_state[KEY_LESSON] = ""
        return
    keys = [s.key for s in lesson.steps]
    saved = progress.summary(data, lesson).step_key
    try:
        index = int(st.query_params["step"]) - 1 if "step" in st.query_params else keys.index(saved)
    except (ValueError, KeyError):
        index = 0
    open_lesson(lesson.id, min(max(index, 0), len(lesson.steps) - 1))


def keep_in_url(lesson: Lesson | None, index: int) -> None:
    wanted = {"lesson": lesson.id, "step": str(index + 1)} if lesson is not None else {}
    for name in ("lesson", "step"):
        if name not in wanted and name in st.query_params:
            del st.query_params[name]
        elif name in wanted and st.query_params.get(name) != wanted[name]:
            st.query_params[name] = wanted[name]


# --- The list of lessons ----------------------------------------------------------------------------------
def lesson_list(found: LessonSet, data: dict) -> None:
    if not found.lessons:
        st.info(f"No lesson could be read from `{lessons_dir().name}/`.", icon=":material/info:")
    for lesson in found.lessons:
        state = progress.summary(data, lesson)
        with st.container(border=True):
            left, middle, right = st.columns([3, 2, 1], vertical_alignment="center")
            left.markdown(f"**{lesson.title}**  \n{lesson.goal}")
            left.caption(f"About {lesson.minutes} minutes · {len(lesson.steps)} steps")
            middle.progress(state.fraction, text=f"{state.steps_done} of {state.steps} steps done"
                            + (" · finished" if state.done else ""))
            details = [f"{state.checks_passed} of {state.checks} checks passed"] if state.checks else []
            if state.questions:
                details.append(f"{state.first_try_right} of {state.questions} answers right at the first try")
            if details:
                middle.caption(" · ".join(details))
            label = "Review" if state.done else ("Continue" if state.started else "Start")
            keys = [s.key for s in lesson.steps]
            index = keys.index(state.step_key) if state.step_key in keys else 0
            right.button(label, key=f"open_{lesson.id}", type="primary" if not state.done else "secondary",
                         on_click=open_lesson, args=(lesson.id, index), width="stretch")


def data_for_lessons() -> None:
    """Which data the lessons will use, and the practice sets for an offline class."""
    st.subheader("Data for the lessons")
    root = datasets.data_root()
    names = material.datasets_under(root)
    chosen = st.session_state.get(session.KEY_DATASET)
    external = material.external_dataset(root, exclude=[chosen, *datasets.hidden_names()])
    if chosen in names:
        st.markdown(f"Your data set: **{chosen}**; external test set: **{external or 'none yet'}**. Change the data "
                    "set on the Dataset page.")
    else:
        st.markdown("No data set chosen yet: the first lesson starts there.")
    st.caption("With the real Kermany images (a data folder holding a training set and the official test set) "
               "the figures mean something about X-rays. Offline, the synthetic practice set and a second practice set "
               "used as the external test set let every lesson run, with figures that say nothing about medicine.")
    if chosen in names:
        marked_copy(root, chosen)
    if external is not None or not access.allowed("practice"):
        return
    if st.button("Make the practice set and a practice external test set (a few seconds)", key="lessons_practice",
                 icon=":material/draw:"):
        try:
            with st.spinner("Drawing synthetic images..."):
                first, _ = material.make_practice_pair(root)
        except (CxrError, OSError) as error:
            st.error(f"The practice sets could not be made: {error}")
            return
        access.record("practice", Path(first).name)
        st.session_state[session.KEY_DATASET] = Path(first).name
        st.rerun()


def marked_copy(root: Path, chosen: str | None) -> None:
    """For the Shortcuts lesson: the operator makes the chosen data set's shortcut-lab copy (a marker planted)."""
    if not chosen or chosen.endswith(shortcut_lab.FOLDER_SUFFIX) or checks.dataset_markers(root / chosen):
        return
    target = root / f"{chosen}{shortcut_lab.FOLDER_SUFFIX}"
    if target.exists():
        st.caption(f"The marked copy for the Shortcuts lesson is there: **{target.name}**.")
        return
    if not access.allowed("practice"):
        return
    if st.button(f"Make a marked copy of {chosen} for the Shortcuts lesson", key="lessons_marked",
                 icon=":material/approval:"):
        bar = st.progress(0.0, text="Copying and marking images...")
        try:
            shortcut_lab.make_shortcut_lab(root / chosen, target, on_progress=lambda done, total: bar.progress(
                min(1.0, done / max(total, 1)), text=f"Copied {done:,} of {total:,} images"))
        except (CxrError, OSError) as error:
            bar.empty()
            st.error(f"The marked copy could not be made: {error}")
            return
        access.record("practice", target.name)
        st.rerun()


def reset_all(path: Path) -> None:
    with st.popover("Reset my progress", icon=":material/restart_alt:"):
        st.markdown("Forget every step, check and answer of every lesson? Your runs stay.")
        if st.button("Yes, start again", type="primary", key="lessons_reset_all"):
            progress.reset(path)
            st.rerun()


def class_table(found: LessonSet) -> None:
    """The operator's view of the class: each learner's lessons, checks, answers and time."""
    if not access.is_operator():
        return
    root = models.runs_root_info()
    rows = progress.class_table(found.lessons, root.path if root else None)
    with st.expander(f"Class progress ({len(rows)} learner(s))", icon=":material/groups:", expanded=access.hosted()):
        st.caption("One row per learner: their workspace (anonymous) or, for this app's own runs, you. A check counts "
                   "once it passed on the learner's own runs; an answer counts when it was right the first time.")
        if not rows:
            st.caption("Nobody has started a lesson yet.")
            return
        charts.table(pd.DataFrame(rows, columns=list(progress.CLASS_COLUMNS)), hide_index=True, width="stretch")
        st.download_button("Download the class table (CSV)", progress.class_csv(rows), file_name="class-progress.csv",
                           mime="text/csv", icon=":material/download:", key="lessons_class_csv")


# --- One lesson ----------------------------------------------------------------------------------------------
def lesson_view(lesson: Lesson, path: Path | None, data: dict) -> None:
    index = min(max(int(st.session_state.get(KEY_STEP, 0)), 0), len(lesson.steps) - 1)
    step = lesson.steps[index]
    if path is not None:
        record = (data.get("lessons") or {}).get(lesson.id) or {}
        last = record.get("last_seen") or 0
        if record.get("step") != step.key or time.time() - float(last) > VISIT_EVERY_S:
            progress.visit(path, lesson.id, step.key)
            data = progress.read(path)
    ctx = learner_context()
    result = None
    if step.check is not None:  # first, so that the step picker already ticks a step whose check just passed
        result = checks.run_check(step.check.kind, step.check.params, ctx)
        stored = progress.step_record(data, lesson.id, step.key).get("check") or {}
        if result.passed and path is not None and stored.get("sentence") != result.sentence:
            progress.record_check(path, lesson.id, step.key, True, result.sentence)
            data = progress.read(path)
    where_am_i(lesson, index, data)
    if index == 0 and lesson.intro:
        st.markdown(lesson.intro)
    st.subheader(step.title)
    st.markdown(step.body)
    if step.figure is not None:
        figure(step, ctx)
    if step.action is not None:
        action(step, ctx)
    if result is not None:
        check_box(step, result, progress.step_record(data, lesson.id, step.key).get("check") or {})
    for number, question in enumerate(step.questions):
        ask(lesson, step, number, question, path, data)
    if step.form == "model_card":
        model_card_form(lesson, step, ctx, path, data)
    st.divider()
    footer(lesson, index, path)
    notebook_button(lesson, ctx)


def where_am_i(lesson: Lesson, index: int, data: dict) -> None:
    """The lesson's title, the way back, the progress bar (step n of m) and a step picker (done steps ticked)."""
    top, close = st.columns([5, 1], vertical_alignment="center")
    top.markdown(f"### {lesson.title}")
    close.button("All lessons", icon=":material/arrow_back:", on_click=close_lesson, key="lesson_close",
                 width="stretch")
    step = lesson.steps[index]
    st.progress((index + 1) / len(lesson.steps), text=f"Step {index + 1} of {len(lesson.steps)}: {step.title}")
    marks = {i: ("✓ " if progress.step_done(progress.step_record(data, lesson.id, s.key), s) else "") + str(i + 1)
             for i, s in enumerate(lesson.steps)}
    st.session_state["lesson_jump"] = index
    st.segmented_control("Go to step", list(marks), format_func=marks.get, key="lesson_jump", required=True,
                         on_change=lambda: st.session_state.__setitem__(KEY_STEP, st.session_state["lesson_jump"]),
                         label_visibility="collapsed")


def footer(lesson: Lesson, index: int, path: Path | None) -> None:
    """Back and Next, where the lesson stands, and resetting it."""
    back, status, forward = st.columns([1, 3, 1], vertical_alignment="center")
    back.button("Back", icon=":material/arrow_back:", disabled=index == 0, key="lesson_back", width="stretch",
                on_click=lambda: st.session_state.__setitem__(KEY_STEP, index - 1))
    if path is not None:
        state = progress.summary(progress.read(path), lesson)
        if state.done:
            status.success(f"Lesson done: all {state.steps} steps. Well done.", icon=":material/task_alt:")
            if not state.finished:
                progress.mark_finished(path, lesson.id)
        else:
            status.caption(f"{state.steps_done} of {state.steps} steps done. A step is done when its check has "
                           "passed and its questions are answered right.")
    if index + 1 < len(lesson.steps):
        forward.button("Next", icon=":material/arrow_forward:", type="primary", key="lesson_next", width="stretch",
                       on_click=lambda: st.session_state.__setitem__(KEY_STEP, index + 1))
    else:
        forward.button("All lessons", icon=":material/list:", key="lesson_finish", width="stretch",
                       on_click=close_lesson)
    if path is not None:
        with st.popover("Reset this lesson", icon=":material/restart_alt:"):
            st.markdown("Forget this lesson's checks and answers? Your runs stay, so the checks pass again as soon "
                        "as you look at them.")
            if st.button("Yes, reset it", key="lesson_reset", type="primary"):
                progress.reset(path, lesson.id)
                open_lesson(lesson.id, 0)
                st.rerun()


def notebook_button(lesson: Lesson, ctx: checks.CheckContext) -> None:
    """The lesson as a Jupyter notebook that runs its experiments with the library, on the chosen data set."""
    if not ctx.dataset or ctx.data_root is None or not (ctx.data_root / ctx.dataset).is_dir():
        return
    from cxr_core.teaching import notebook  # noqa: PLC0415 (imported on first use)

    try:
        # The external test set named here, as the page chose it: never the class's locked test set for a visitor.
        external = material.external_dataset(ctx.data_root, exclude=[ctx.dataset, *datasets.hidden_names()])
        text = notebook.notebook_text(lesson, ctx.data_root / ctx.dataset,
                                      external=ctx.data_root / external if external else None)
    except CxrError:  # nbformat is not installed here: the command line says so; the page just offers no notebook
        return
    st.download_button("Download this lesson as a Jupyter notebook", text, file_name=f"{lesson.id}.ipynb",
                       mime="application/x-ipynb+json", icon=":material/code:", key=f"notebook_{lesson.id}",
                       help=f"The same experiments with the cxr_core library, training on {ctx.dataset}; run it with "
                            "Jupyter from the project folder.")


def action_words(settings: dict) -> str:
    """What an action fills in, in words: 'the quick recipe, a patient split and backbone mobilenet_v2'."""
    run_settings = {k: v for k, v in settings.items() if k not in ("dataset", "run", "evaluate_on", "evaluate_limit")}
    parts = [checks.describe(run_settings)] if run_settings else []
    if "dataset" in settings:
        parts.append(f"the data set {settings['dataset']}")
    if "run" in settings:
        parts.append(f"your newest run with {checks.describe(settings['run'])}")
    where = {"auto": "the external test set", "training": "the data set it trained on"}
    if "evaluate_on" in settings:
        parts.append(f"to evaluate on {where.get(settings['evaluate_on'], settings['evaluate_on'])}")
    if "evaluate_limit" in settings:
        parts.append(f"at most {settings['evaluate_limit']} images")
    return ", ".join(parts)


def action(step: Step, ctx: checks.CheckContext) -> None:
    chosen = lesson_actions.prepare(step.action, ctx.runs, ctx.data_root, st.session_state)
    with st.container(border=True):
        st.markdown("**Do it**")
        if chosen.problem:
            st.info(chosen.problem, icon=":material/info:")
        shown = action_words(step.action.settings)
        if st.button(step.action.label, icon=":material/open_in_new:", type="primary", key=f"action_{step.key}",
                     disabled=chosen.problem is not None):
            for key in [k for k in st.session_state if any(str(k).startswith(p) for p in chosen.drop_prefixes)]:
                del st.session_state[key]
            st.session_state.update(chosen.state)
            st.switch_page(chosen.page)
        if shown:
            st.caption(f"Opens the {step.action.page.capitalize()} page with: {shown}. Come back here afterwards "
                       "(Lessons in the menu).")


def check_box(step: Step, result: checks.CheckResult, stored: dict) -> None:
    """The step's check on the learner's own runs: passed (with their figures) or what is still missing."""
    with st.container(border=True):
        left, right = st.columns([5, 1], vertical_alignment="center")
        left.markdown("**Check**")
        right.button("Check again", icon=":material/refresh:", key=f"recheck_{step.key}", width="stretch")
        if result.passed:
            st.success(result.sentence, icon=":material/check_circle:")
        elif stored.get("passed"):
            st.info(f"{result.sentence} (This check passed earlier: {stored.get('sentence', '')})",
                    icon=":material/history:")
        else:
            st.warning(result.sentence, icon=":material/pending:")


def ask(lesson: Lesson, step: Step, number: int, question, path: Path | None, data: dict) -> None:
    key = f"question_{lesson.id}_{step.key}_{number}"
    stored = (progress.step_record(data, lesson.id, step.key).get("answers") or {}).get(str(number)) or {}
    if key not in st.session_state and isinstance(stored.get("choice"), int) \
            and 0 <= stored["choice"] < len(question.choices):
        st.session_state[key] = stored["choice"]

    def answered() -> None:
        choice = st.session_state.get(key)
        if choice is not None and path is not None:
            progress.record_answer(path, lesson.id, step.key, number, int(choice), choice == question.answer)

    with st.container(border=True):
        choice = st.radio(question.ask, range(len(question.choices)), format_func=lambda i: question.choices[i],
                          index=None, key=key, on_change=answered)
        if choice is None:
            return
        right = question.choices[question.answer]
        if choice == question.answer:
            first = "" if stored.get("first_right", True) else " (not at the first try)"
            st.success(f"Right{first}. {question.explain}", icon=":material/check_circle:")
        else:
            st.error(f"Not quite: the answer is “{right.rstrip('.')}”. {question.explain}", icon=":material/lightbulb:")


def model_card_form(lesson: Lesson, step: Step, ctx: checks.CheckContext, path: Path | None, data: dict) -> None:
    run = material.pick_run(ctx.runs, external=True)
    saved = progress.step_record(data, lesson.id, step.key).get("form") or {}
    defaults = material.card_defaults(run)
    with st.container(border=True):
        st.markdown("**Your model card**" + (f" for run `{run.name}`" if run else ""))
        if run is None:
            st.info("No finished run yet: the card is filled in from your newest run, evaluated externally if "
                    "possible.", icon=":material/info:")
        values = {}
        for field, label, hint in material.CARD_FIELDS:
            widget = f"{KEY_CARD}{field}"
            if widget not in st.session_state:
                st.session_state[widget] = saved.get(field) or defaults.get(field, "")
            values[field] = st.text_area(label, key=widget, help=hint, height=80, placeholder=hint)
        if path is not None and values != {k: saved.get(k, "") for k in values}:
            progress.record_form(path, lesson.id, step.key, values)
        name = f"model-card-{run.name if run else 'draft'}.md"
        st.download_button("Download the model card (Markdown)", material.model_card(values, run), file_name=name,
                           mime="text/markdown", icon=":material/download:", key=f"card_{step.key}")


# --- Figures from the learner's data and runs ------------------------------------------------------------------
def figure(step: Step, ctx: checks.CheckContext) -> None:
    draw = FIGURES.get(step.figure.name)
    try:
        draw(step.figure.params, ctx)
    except CxrError as error:
        st.warning(str(error), icon=":material/warning:")


def _chosen_manifest(ctx: checks.CheckContext) -> pd.DataFrame | None:
    if not ctx.dataset or ctx.data_root is None or not (ctx.data_root / ctx.dataset).is_dir():
        st.info("Choose a data set on the Dataset page to see this figure with your data.", icon=":material/info:")
        return None
    return datasets.scan(ctx.data_root / ctx.dataset).manifest


def class_balance(_params: dict, ctx: checks.CheckContext) -> None:
    manifest = _chosen_manifest(ctx)
    if manifest is None:
        return
    sets = {}
    official = manifest.get("official_split")
    if official is not None and (official == "test").any():
        sets[f"{ctx.dataset} (training folders)"] = manifest[official != "test"]
        sets[f"{ctx.dataset} (official test folder)"] = manifest[official == "test"]
    else:
        sets[ctx.dataset] = manifest
    external = material.external_dataset(ctx.data_root, exclude=[ctx.dataset, *datasets.hidden_names()])
    if external is not None:
        sets[f"{external} (external test set)"] = datasets.scan(ctx.data_root / external).manifest
    facts = {name: checks.dataset_facts(part) for name, part in sets.items()}
    fig = go.Figure()
    for label in ("NORMAL", "PNEUMONIA"):
        shares = [f[label] / f["images"] if f["images"] else 0 for f in facts.values()]
        fig.add_bar(x=list(facts), y=shares, name=label, marker_color=charts.CLASS_COLORS[label],
                    text=[f"{s:.0%}" for s in shares], textposition="inside")
    fig.update_layout(barmode="stack", yaxis_tickformat=".0%")
    left, right = st.columns([1, 1])
    left.plotly_chart(charts.style(fig, 300, title="Class shares in your data"), key="lesson_class_balance")
    table = pd.DataFrame([{"set": name, "always PNEUMONIA scores": f"{f['always_pneumonia_accuracy']:.1%}",
                           "images": f["images"], "normal": f["NORMAL"], "pneumonia": f["PNEUMONIA"],
                           "children": f["patients"]} for name, f in facts.items()])
    charts.table(table, where=right, hide_index=True, width="stretch")
    right.caption("“Always PNEUMONIA scores” is the accuracy of a model that calls every image pneumonia: the number "
                  "any real model must beat, and it changes with the balance of the test set.")


def images_per_patient(_params: dict, ctx: checks.CheckContext) -> None:
    manifest = _chosen_manifest(ctx)
    if manifest is None:
        return
    per = manifest.groupby(["label", "patient_id"]).size().rename("images").reset_index()
    table = per.groupby(["label", "images"]).size().rename("patients").reset_index()
    fig = go.Figure()
    for label in ("NORMAL", "PNEUMONIA"):
        part = table[table["label"] == label]
        fig.add_bar(x=part["images"], y=part["patients"], name=label, marker_color=charts.CLASS_COLORS[label])
    fig.update_layout(barmode="group", xaxis_title="images of one child", yaxis_title="children")
    st.plotly_chart(charts.style(fig, 280, title=f"Children by number of images in {ctx.dataset}"),
                    key="lesson_per_patient")
    facts = checks.dataset_facts(manifest)
    st.caption(f"{facts['patients']:,} children; {facts['patients_with_several']:,} of them have several images "
               f"(up to {facts['max_per_patient']}).")


def flip_preview(_params: dict, ctx: checks.CheckContext) -> None:
    manifest = _chosen_manifest(ctx)
    if manifest is None:
        return
    normal = manifest[manifest["label"] == "NORMAL"]
    row = (normal if len(normal) else manifest).iloc[0]
    gray = datasets.thumbnail(str(row["path"]), 320)
    left, right, _ = st.columns([1, 1, 1])
    left.image(gray, caption="As taken: the heart bulges to the patient's left (the right of the image).",
               width="stretch")
    right.image(np.ascontiguousarray(np.fliplr(gray)), caption="Flipped: the heart on the other side, as in "
                "dextrocardia (about 1 child in 10,000).", width="stretch")


@st.cache_data(show_spinner="Looking for shortcuts on a sample of images...", max_entries=4)
def _shortcut_report(path: str, stamp: str) -> pd.DataFrame:  # noqa: ARG001 (stamp: part of the cache key)

    return shortcuts.report_table(shortcuts.shortcut_check(datasets.scan(Path(path)), max_images=300))


def shortcut_table(_params: dict, ctx: checks.CheckContext) -> None:
    if _chosen_manifest(ctx) is None:
        return
    folder = ctx.data_root / ctx.dataset
    table = _shortcut_report(str(folder), datasets.fingerprint(folder))
    if table.empty:
        st.caption("No property besides the images could be compared with the label in this data set.")
        return
    shown = table[["property", "auc", "direction", "warning"]].rename(columns={"auc": "AUC alone"})
    charts.table(shown, hide_index=True, width="stretch", key="lesson_shortcuts")
    st.caption("How well each property alone tells pneumonia from normal in your data set: 0.5 is chance. A "
               "recorded source, scanner or marker that scores well is a shortcut a model can learn.")


def runs_table(params: dict, ctx: checks.CheckContext) -> None:
    table = material.runs_rows(ctx.runs, params.get("settings") or [])
    if table.empty:
        st.caption("Your finished runs will be listed here.")
        return
    charts.table(table, hide_index=True, width="stretch", key="lesson_runs_table",
                 column_config={c: st.column_config.NumberColumn(format="%.3f") for c in table.columns
                                if table[c].dtype.kind == "f"})


def internal_vs_external(_params: dict, ctx: checks.CheckContext) -> None:
    both = [r for r in ctx.finished if checks.metric(r, "internal.roc_auc") is not None and r.external()]
    if not both:
        st.caption("The figure compares each run's score on its own test part with its score on the external test "
                   "set; it appears once a run has both.")
        return
    fig = go.Figure()
    names = [r.name[-24:] for r in both]
    fig.add_bar(x=names, y=[checks.metric(r, "internal.roc_auc") for r in both], name="own test part",
                marker_color="#1f6feb")
    fig.add_bar(x=names, y=[checks.metric(r, "external.roc_auc") for r in both], name="external test set",
                marker_color="#d1495b")
    fig.update_layout(barmode="group", yaxis_title="ROC AUC")
    st.plotly_chart(charts.unit_axes(charts.style(fig, 300, title="Your runs: own test part against the external "
                                                                  "test set")), key="lesson_inside_outside")


def threshold_tradeoff(params: dict, ctx: checks.CheckContext) -> None:
    run = material.pick_run(ctx.runs, params.get("run"))
    if run is None:
        st.caption("The figure shows your run's sensitivity and specificity as the threshold moves; it appears once "
                   f"you have a finished run with {checks.describe(params.get('run') or {})}.")
        return
    curve = material.threshold_curve(run)
    if curve is None:
        st.caption(f"Run {run.name}'s own test part does not hold both classes, so no curve can be drawn.")
        return
    fig = go.Figure()
    fig.add_scatter(x=curve["threshold"], y=curve["sensitivity"], mode="lines", name="sensitivity (pneumonias found)",
                    line=dict(color=charts.CLASS_COLORS["PNEUMONIA"]))
    fig.add_scatter(x=curve["threshold"], y=curve["specificity"], mode="lines",
                    name="specificity (normal films cleared)", line=dict(color=charts.CLASS_COLORS["NORMAL"]))
    threshold = run.metrics.threshold
    if threshold is not None:
        fig.add_vline(x=float(threshold), line_dash="dot", annotation_text=f"its threshold {float(threshold):.2f}")
    fig.update_xaxes(title="threshold", range=[0, 1])
    st.plotly_chart(charts.unit_axes(charts.style(fig, 300, title=f"Run {run.name}: moving the threshold")),
                    key="lesson_threshold")


def calibration(params: dict, ctx: checks.CheckContext) -> None:
    run = material.pick_run(ctx.runs, params.get("run"), external=True)
    found = material.calibration_points(run) if run is not None else None
    if found is None:
        st.caption("The calibration figure appears once you have a finished run with test predictions.")
        return
    where, bins = found
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="gray"), name="perfect")
    fig.add_scatter(x=bins["mean_predicted"], y=bins["fraction_positive"], mode="lines+markers", name="your model",
                    text=[f"{c} images" for c in bins["count"]])
    fig.update_xaxes(title="predicted probability of pneumonia", range=[0, 1])
    fig.update_yaxes(title="share that really is pneumonia")
    st.plotly_chart(charts.unit_axes(charts.style(fig, 300, title=f"Run {run.name} on {where}")),
                    key="lesson_calibration")


FIGURES = {"class_balance": class_balance, "images_per_patient": images_per_patient, "flip_preview": flip_preview,
           "shortcut_table": shortcut_table, "runs_table": runs_table, "internal_vs_external": internal_vs_external,
           "threshold_tradeoff": threshold_tradeoff, "calibration": calibration}


# --- The page ------------------------------------------------------------------------------------------------
found = lesson_set()
for problem in found.problems:
    st.error(problem, icon=":material/description:")
path = progress_path()
data = progress.read(path) if path is not None else {"lessons": {}}
restore_from_url(found, data)
if path is None:
    st.warning("Your progress cannot be kept: the runs folder cannot be written.", icon=":material/warning:")
current = found.get(st.session_state.get(KEY_LESSON))
if current is None:
    keep_in_url(None, 0)
    lesson_list(found, data)
    data_for_lessons()
    if path is not None and data.get("lessons"):
        reset_all(path)
    class_table(found)
else:
    st.session_state[KEY_STEP] = min(max(int(st.session_state.get(KEY_STEP, 0)), 0), len(current.steps) - 1)
    keep_in_url(current, st.session_state[KEY_STEP])
    lesson_view(current, path, data)
