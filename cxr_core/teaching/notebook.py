"""A lesson as a Jupyter notebook: the same experiments run with the library instead of the app.

Each step becomes its text, then code cells for what the app would do: train with the action's settings
(``lessons.action_config``), evaluate on the external test set, and run the step's check on the notebook's own
runs, printing the same sentence the Lessons page shows. Questions come with their answers folded away.
"""
from __future__ import annotations

import os
import pprint
from pathlib import Path
from typing import Any

from cxr_core.core.errors import BadSettingError
from cxr_core.io.atomic import write_text_atomic
from cxr_core.teaching import material
from cxr_core.teaching.lessons import Lesson, Step, read_lesson

SETUP = '''\
import dataclasses
from pathlib import Path

from cxr_core.evaluation.external import evaluate_folder
from cxr_core.runs import registry
from cxr_core.teaching import checks, lessons, material

# The data set to train on, the external test set (images none of the runs train on), where this
# notebook's runs go, and the starting weights (a file, or None for the lesson's own: ImageNet).
DATA = Path(r"{data}")
EXTERNAL = {external}
RUNS = Path(r"{runs}")
WEIGHTS = {weights}
RUNS.mkdir(parents=True, exist_ok=True)


def my_runs():
    """This notebook's runs, as the lesson's checks read them (newest first)."""
    return checks.read_runs(p for p in RUNS.iterdir() if p.is_dir())


def check(kind, params):
    """The step's check on your runs: the sentence the Lessons page would show."""
    context = checks.CheckContext(runs=my_runs(), data_root=DATA.parent, dataset=DATA.name)
    result = checks.run_check(kind, params, context)
    print(("PASSED: " if result.passed else "NOT YET: ") + result.sentence)
    return result


def train_with(settings, name):
    """Train a run with a lesson action's settings on DATA (the engine is imported here: TensorFlow is slow to load)."""
    from cxr_core.engine.train import train

    config = lessons.action_config(settings)
    model = {{"weights": WEIGHTS}} if WEIGHTS else {{}}
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, data_dir=str(DATA)),
                                 model=dataclasses.replace(config.model, **model))
    run = train(config, run_dir=registry.new_run_dir(RUNS, name))
    print(run.name, checks.run_figures(checks.read_run(run)))
    return run


def evaluate_run(wanted, on="auto", limit=None):
    """Evaluate your newest finished run with these settings on the external test set (or on its own data)."""
    run = material.pick_run(my_runs(), wanted)
    if on == "training":
        target = Path(run.settings["data.data_dir"])
    else:
        target = EXTERNAL if on == "auto" else DATA.parent / on
    result = evaluate_folder(run.path, target, limit=limit)
    print(f"{{run.name}} on {{target.name}}: ROC AUC {{result['roc_auc']:.3f}}, accuracy {{result['accuracy']:.3f}} "
          f"({{result['n']}} images)")
    return result
'''


def _literal(value: Any) -> str:
    return pprint.pformat(value, width=100, sort_dicts=False)


def _path_literal(path: str | os.PathLike | None) -> str:
    return f'Path(r"{Path(path)}")' if path else "None"


def _step_cells(number: int, step: Step, nbf: Any) -> list:
    cells = [nbf.v4.new_markdown_cell(f"## Step {number}: {step.title}\n\n{step.body}")]
    action = step.action
    if action is not None and action.page in ("training", "evaluation"):
        cells[0].source += "\n\n*In this notebook, the next cell does it.*"
    if action is not None and action.page == "training":
        cells.append(nbf.v4.new_code_cell(f"settings = {_literal(action.settings)}\n"
                                          f"run = train_with(settings, {step.key!r})"))
    elif action is not None and action.page == "evaluation" and "run" in action.settings:
        on = action.settings.get("evaluate_on", "auto")
        limit = action.settings.get("evaluate_limit")
        cells.append(nbf.v4.new_code_cell(f"result = evaluate_run({_literal(action.settings['run'])}, on={on!r}, "
                                          f"limit={limit!r})"))
    elif action is not None:
        cells.append(nbf.v4.new_markdown_cell(f"*In the app: {action.label} ({action.page.capitalize()} page).*"))
    if step.figure is not None and step.figure.name == "runs_table":
        shown = _literal(step.figure.params.get("settings") or [])
        cells.append(nbf.v4.new_code_cell(f"material.runs_rows(my_runs(), {shown})"))
    if step.check is not None:
        cells.append(nbf.v4.new_code_cell(f"check({step.check.kind!r}, {_literal(step.check.params)})"))
    for question in step.questions:
        choices = "\n".join(f"{i}. {choice}" for i, choice in enumerate(question.choices, start=1))
        cells.append(nbf.v4.new_markdown_cell(
            f"**Question.** {question.ask}\n\n{choices}\n\n<details><summary>Answer</summary>\n\n"
            f"{question.answer + 1}. {question.choices[question.answer]} {question.explain}\n\n</details>"))
    if step.form == "model_card":
        cells.append(nbf.v4.new_code_cell(
            "run = material.pick_run(my_runs(), external=True)\n"
            "print(material.model_card(material.card_defaults(run), run))"))
    return cells


def lesson_notebook(lesson: Lesson, data: str | os.PathLike, external: str | os.PathLike | None = None,
                    runs: str | os.PathLike | None = None, weights: str | None = None) -> Any:
    """The lesson as an ``nbformat`` notebook that trains on ``data`` and tests on ``external``.

    Raises:
        BadSettingError: nbformat is not installed.
    """
    try:
        import nbformat as nbf  # noqa: PLC0415 (only this command needs it)
    except ImportError as error:
        raise BadSettingError("Writing a lesson as a notebook needs nbformat; install it with "
                              "`pip install nbformat`.") from error
    data = Path(data).expanduser().resolve()
    if external is None:
        name = material.external_dataset(data.parent, exclude=[data.name])
        external = data.parent / name if name else None
    runs = Path(runs).expanduser().resolve() if runs else data.parent.parent / "lesson-runs" / lesson.id
    notebook = nbf.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    intro = f"# {lesson.title}\n\n**Goal:** {lesson.goal} (about {lesson.minutes} minutes)\n\n{lesson.intro}".strip()
    notebook.cells.append(nbf.v4.new_markdown_cell(
        intro + f"\n\n*Made from `{lesson.path.parent.name}/{lesson.path.name}`. Run the cells in order; each check "
        "reads the runs this notebook trains, as the app's Lessons page does.*"))
    notebook.cells.append(nbf.v4.new_code_cell(SETUP.format(
        data=data, external=_path_literal(Path(external).resolve() if external else None), runs=runs,
        weights=f'r"{weights}"' if weights else "None")))
    for number, step in enumerate(lesson.steps, start=1):
        notebook.cells.extend(_step_cells(number, step, nbf))
    return notebook


def notebook_text(lesson: Lesson, data: str | os.PathLike, external: str | os.PathLike | None = None,
                  runs: str | os.PathLike | None = None, weights: str | None = None) -> str:
    """The lesson's notebook as .ipynb text (for a download)."""
    import nbformat  # noqa: PLC0415 (lesson_notebook said so when it is missing)

    return nbformat.writes(lesson_notebook(lesson, data, external, runs, weights))


def write_lesson_notebook(lesson: Lesson | str | os.PathLike, out: str | os.PathLike, data: str | os.PathLike,
                          external: str | os.PathLike | None = None, runs: str | os.PathLike | None = None,
                          weights: str | None = None) -> Path:
    """Write the lesson's notebook to ``out`` (atomically); returns its path."""
    if not isinstance(lesson, Lesson):
        lesson = read_lesson(lesson)
    out = Path(out)
    write_text_atomic(out, notebook_text(lesson, data, external, runs, weights))
    return out
