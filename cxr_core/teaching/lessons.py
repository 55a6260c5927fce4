"""Lessons as files: each one a Markdown file in ``lessons/`` with YAML front matter, read and checked here.

The front matter names the lesson (id, title, goal, minutes, order) and its steps: for each step an optional
action (a page of the app and the settings to fill in), check (a kind of ``cxr_core.teaching.checks`` and
its parameters), figure, form and questions. The Markdown body is split at its ``## `` headings, one section
per step in order; text before the first heading introduces the lesson. lessons/README.md is the teachers'
guide to all of it.

A lesson file that cannot be used is one sentence naming the file and the field ("lessons/leakage.md:
step 2's check 'kind' must be one of ...; got 'runs_exist'."); the other lessons still load.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import frontmatter
import yaml

from cxr_core.core.config import AugmentConfig, RunConfig
from cxr_core.core.errors import CxrError
from cxr_core.core.labels import THRESHOLD_RULES
from cxr_core.core.recipes import apply_recipe
from cxr_core.teaching import checks

PROJECT_ROOT = Path(__file__).resolve().parents[2]
LESSONS_DIR = PROJECT_ROOT / "lessons"
GUIDE_NAME = "README.md"
ENV_LESSONS = "CXR_LESSONS_DIR"


def lessons_dir() -> Path:
    """Where the lessons are: ``$CXR_LESSONS_DIR`` when set (a class may keep its own), else ``lessons/``."""
    chosen = os.environ.get(ENV_LESSONS)
    return Path(chosen).expanduser() if chosen else LESSONS_DIR


class BadLessonError(CxrError):
    """A lesson file that cannot be used; the message names the file and the field."""


# --- What a lesson may name -------------------------------------------------------------------------------
#: The app's pages an action may open (the names used in lesson files).
PAGES = ("home", "lessons", "dataset", "augmentation", "training", "evaluation", "predict")
_AUGMENT = tuple(f"augment.{f.name}" for f in dataclasses.fields(AugmentConfig))
_TRAINING = ("data.split", "data.limit", "data.task", "train.balance", "train.recipe", "model.backbone", "model.alpha",
             "model.image_size", "model.dropout", "train.epochs", "train.batch_size", "train.learning_rate",
             "train.fine_tune_layers", "train.fine_tune_epochs", "train.threshold_rule", *_AUGMENT)
#: The settings an action may fill in on each page. ``dataset`` is a folder under the data root; ``run``
#: picks the learner's newest finished run with the given settings; ``evaluate_on`` is the data set to
#: evaluate it on: "auto" (another data set than the run's, one whose name says test when there is one),
#: "training" (the data set the run trained on: not an external test) or a folder name; ``evaluate_limit``
#: evaluates a sample of at most that many images (quicker).
ACTION_SETTINGS: dict[str, tuple[str, ...]] = {
    "home": ("dataset",),
    "lessons": ("dataset",),
    "dataset": ("dataset", "data.split"),
    "augmentation": ("dataset", "train.balance", *_AUGMENT),
    "training": ("dataset", *_TRAINING),
    "evaluation": ("dataset", "run", "evaluate_on", "evaluate_limit"),
    "predict": ("dataset", "run"),
}
#: Figures a step may show, each drawn from the learner's data or runs, with the parameters each takes.
FIGURES: dict[str, tuple[str, ...]] = {
    "class_balance": (),          # the chosen data set and the external test set: class shares, always-PNEUMONIA
    "images_per_patient": (),     # how many children have 1, 2, 3... images
    "flip_preview": (),           # an image of the chosen data set and its mirror image
    "shortcut_table": (),         # the Dataset page's shortcut check on the chosen data set
    "runs_table": ("settings",),  # the learner's runs: the named settings and their figures
    "internal_vs_external": (),   # each run's own-test-part AUC beside its external AUC
    "threshold_tradeoff": ("run",),  # sensitivity and specificity as the threshold moves
    "calibration": ("run",),      # predicted probability against the real share of pneumonia
}
#: Forms a step may hold.
FORMS = ("model_card",)
STEP_FIELDS = ("title", "action", "check", "figure", "form", "questions")
LESSON_FIELDS = ("id", "title", "goal", "minutes", "order", "steps")
_ID = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


# --- The lesson ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    ask: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    explain: str


@dataclass(frozen=True)
class Action:
    page: str
    label: str
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Check:
    kind: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Figure:
    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    key: str    # stable within the lesson: progress is kept under it
    title: str
    body: str
    action: Action | None = None
    check: Check | None = None
    figure: Figure | None = None
    form: str | None = None
    questions: tuple[Question, ...] = ()


@dataclass(frozen=True)
class Lesson:
    id: str
    title: str
    goal: str
    minutes: int
    order: float
    intro: str
    steps: tuple[Step, ...]
    path: Path

    def step(self, key: str) -> Step | None:
        return next((s for s in self.steps if s.key == key), None)


@dataclass(frozen=True)
class LessonSet:
    """The lessons that load, in order, and one sentence per file that does not."""

    lessons: tuple[Lesson, ...]
    problems: tuple[str, ...]

    def get(self, lesson_id: str | None) -> Lesson | None:
        return next((lesson for lesson in self.lessons if lesson.id == lesson_id), None)


# --- Reading ------------------------------------------------------------------------------------------------
def shown_path(path: Path) -> str:
    """'lessons/leakage.md': the folder and the file, as a teacher sees them."""
    return f"{path.parent.name}/{path.name}"


def lesson_files(folder: str | os.PathLike | None = None) -> list[Path]:
    """The lesson files of a folder (every ``*.md`` but the teachers' guide; default ``lessons_dir()``)."""
    folder = Path(folder) if folder is not None else lessons_dir()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.md")
                  if p.is_file() and p.name.lower() != GUIDE_NAME.lower() and not p.name.startswith((".", "_")))


def load_lessons(folder: str | os.PathLike | None = None) -> LessonSet:
    """Every lesson of ``folder`` that can be used, ordered by ``order`` then id; a file that cannot is one
    sentence in ``problems`` (as is a second lesson with an id already taken)."""
    lessons: list[Lesson] = []
    problems: list[str] = []
    for path in lesson_files(folder):
        try:
            lesson = read_lesson(path)
        except BadLessonError as error:
            problems.append(str(error))
            continue
        taken = next((other for other in lessons if other.id == lesson.id), None)
        if taken is not None:
            problems.append(f"{shown_path(path)}: 'id' {lesson.id!r} is already the id of {shown_path(taken.path)}; "
                            "give each lesson its own id.")
            continue
        lessons.append(lesson)
    lessons.sort(key=lambda lesson: (lesson.order, lesson.id))
    return LessonSet(tuple(lessons), tuple(problems))


def read_lesson(path: str | os.PathLike) -> Lesson:
    """One lesson file, checked.

    Raises:
        BadLessonError: one sentence naming the file and the field that is wrong.
    """
    path = Path(path)
    where = shown_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BadLessonError(f"{where}: the file cannot be read as UTF-8 text ({error}).") from error
    try:
        post = frontmatter.loads(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" near line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "it cannot be parsed"
        raise BadLessonError(f"{where}: the front matter is not valid YAML{line} ({problem}).") from error
    except (ValueError, TypeError, AttributeError) as error:  # front matter that is not a set of fields
        raise BadLessonError(f"{where}: the front matter must be a set of fields (id, title, goal, minutes, "
                             "steps).") from error
    return _lesson(where, dict(post.metadata), post.content, path)


def _fail(where: str, message: str) -> BadLessonError:
    return BadLessonError(f"{where}: {message.rstrip('.')}.")


def _text(where: str, value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"'{name}' must be some text; got {value!r}")
    return value.strip()


def _sections(body: str) -> tuple[str, list[tuple[str, str]]]:
    """The text before the first ``## `` heading, and each (heading, text) after it."""
    parts = re.split(r"(?m)^##[ \t]+(.+?)[ \t]*#*[ \t]*$", body)
    intro = parts[0].strip()
    return intro, [(parts[i].strip(), parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "step"


def _lesson(where: str, meta: dict, body: str, path: Path) -> Lesson:
    if not meta:
        raise _fail(where, "the file has no front matter (a block between two '---' lines with id, title, goal, "
                           "minutes and steps)")
    for name in ("id", "title", "goal", "minutes", "steps"):
        if name not in meta:
            raise _fail(where, f"the front matter has no '{name}'")
    unknown = [name for name in meta if name not in LESSON_FIELDS]
    if unknown:
        raise _fail(where, f"the front matter has an unknown field '{unknown[0]}'; a lesson has "
                           f"{', '.join(LESSON_FIELDS)}")
    lesson_id = meta["id"]
    if not isinstance(lesson_id, str) or not _ID.match(lesson_id):
        raise _fail(where, f"'id' must be lower-case letters, digits, '-' or '_'; got {lesson_id!r}")
    minutes = meta["minutes"]
    if isinstance(minutes, bool) or not isinstance(minutes, int) or minutes < 1:
        raise _fail(where, f"'minutes' must be a whole number above 0; got {minutes!r}")
    order = meta.get("order", 100)
    if isinstance(order, bool) or not isinstance(order, (int, float)) or not math.isfinite(order):
        raise _fail(where, f"'order' must be a number; got {order!r}")
    steps = meta["steps"]
    if not isinstance(steps, list) or not steps:
        raise _fail(where, "'steps' must be a list with at least one step")
    intro, sections = _sections(body)
    if len(sections) != len(steps):
        raise _fail(where, f"the text has {len(sections)} '## ' section(s) but the front matter lists {len(steps)} "
                           "step(s); give each step one section, in order")
    built = []
    for number, (raw, (heading, text)) in enumerate(zip(steps, sections), start=1):
        built.append(_step(where, number, raw, heading, text))
    keys = [s.key for s in built]
    for number, key in enumerate(keys, start=1):
        if keys.index(key) != number - 1:
            raise _fail(where, f"step {number}'s title {built[number - 1].title!r} is the title of step "
                               f"{keys.index(key) + 1} too; give each step its own title")
    return Lesson(id=lesson_id, title=_text(where, meta["title"], "title"), goal=_text(where, meta["goal"], "goal"),
                  minutes=int(minutes), order=float(order), intro=intro, steps=tuple(built), path=path)


def _step(where: str, number: int, raw: Any, heading: str, text: str) -> Step:
    at = f"step {number}"
    if not isinstance(raw, dict):
        raise _fail(where, f"{at} must be a set of fields (title, action, check, figure, form, questions); "
                           f"got {raw!r}")
    unknown = [name for name in raw if name not in STEP_FIELDS]
    if unknown:
        raise _fail(where, f"{at} has an unknown field '{unknown[0]}'; a step may have {', '.join(STEP_FIELDS)}")
    title = raw.get("title", heading)
    title = _text(where, title, f"{at}'s title")
    if title.casefold() != heading.casefold():
        raise _fail(where, f"{at}'s title {title!r} does not match its heading '## {heading}'; make them the same "
                           "(or leave the title out)")
    form = raw.get("form")
    if form is not None and form not in FORMS:
        raise _fail(where, f"{at}'s 'form' must be one of {', '.join(FORMS)}; got {form!r}")
    return Step(key=_slug(title), title=title, body=text,
                action=_action(where, at, raw["action"]) if raw.get("action") is not None else None,
                check=_check(where, at, raw["check"]) if raw.get("check") is not None else None,
                figure=_figure(where, at, raw["figure"]) if raw.get("figure") is not None else None,
                form=form, questions=_questions(where, at, raw.get("questions")))


# --- Actions -------------------------------------------------------------------------------------------------
def _action(where: str, at: str, raw: Any) -> Action:
    if not isinstance(raw, dict):
        raise _fail(where, f"{at}'s 'action' must hold page, label and settings; got {raw!r}")
    unknown = [name for name in raw if name not in ("page", "label", "settings")]
    if unknown:
        raise _fail(where, f"{at}'s action has an unknown field '{unknown[0]}'; an action has page, label and "
                           "settings")
    page = raw.get("page")
    if page not in PAGES:
        raise _fail(where, f"{at}'s action 'page' must be one of {', '.join(PAGES)}; got {page!r}")
    label = raw.get("label") or f"Open the {page.capitalize()} page"
    label = _text(where, label, f"{at}'s action label")
    settings = raw.get("settings") or {}
    if not isinstance(settings, dict):
        raise _fail(where, f"{at}'s action 'settings' must be a set of name: value pairs; got {settings!r}")
    allowed = ACTION_SETTINGS[page]
    for name, value in settings.items():
        if name not in allowed:
            raise _fail(where, f"{at}'s action setting '{name}' does not exist on the {page} page; it takes "
                               f"{_short_list(allowed)}")
        if name == "run":
            _selector(where, f"{at}'s action setting 'run'", value)
        elif name in ("dataset", "evaluate_on"):
            _text(where, value, f"{at}'s action setting '{name}'")
        elif name == "evaluate_limit":
            _whole(where, f"{at}'s action setting 'evaluate_limit'", value, least=10)
        elif isinstance(value, list):
            raise _fail(where, f"{at}'s action setting '{name}' must be one value, not a list")
        else:
            problem = checks.setting_problem(name, value)
            if problem:
                raise _fail(where, f"{at}'s action setting {problem}")
    try:
        action_config(settings)
    except CxrError as error:
        raise _fail(where, f"{at}'s action settings do not go together ({str(error).rstrip('.')})") from error
    return Action(page=page, label=label, settings=dict(settings))


def _short_list(names: tuple[str, ...]) -> str:
    augment = [n for n in names if n.startswith("augment.")]
    others = [n for n in names if not n.startswith("augment.")]
    return ", ".join(others + (["augment.<any augmentation field>"] if augment else []))


def action_config(settings: Mapping[str, Any]) -> RunConfig:
    """The run settings an action's settings stand for: the recipe's (when one is named), then each named
    setting over them. Raises a CxrError when they do not go together."""
    config = RunConfig()
    if settings.get("train.recipe"):
        config = apply_recipe(config, settings["train.recipe"])
    sections: dict[str, dict[str, Any]] = {}
    for name, value in settings.items():
        section, _, key = name.partition(".")
        if section in checks.SECTIONS and key and name != "train.recipe":
            sections.setdefault(section, {})[key] = value
    try:
        return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)
                                              for section, values in sections.items()})
    except (TypeError, ValueError) as error:
        if isinstance(error, CxrError):
            raise
        raise BadLessonError(str(error)) from error


# --- Checks, figures and questions --------------------------------------------------------------------------
def _selector(where: str, what: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise _fail(where, f"{what} must be a set of setting: value pairs (like data.split: patient); got {value!r}")
    for name, wanted in value.items():
        problem = checks.setting_problem(str(name), wanted)
        if problem:
            raise _fail(where, f"{what}: {problem}")
    return value


def _setting_list(where: str, what: str, value: Any) -> list[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        raise _fail(where, f"{what} must name one setting or a list of settings; got {value!r}")
    for name in names:
        if name not in checks.setting_names():
            raise _fail(where, f"{what}: '{name}' is not a setting (settings are named like data.split, "
                               "train.balance, model.image_size)")
    return names


def _whole(where: str, what: str, value: Any, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise _fail(where, f"{what} must be a whole number of at least {least}; got {value!r}")
    return value


def _number(where: str, what: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (low is not None and value < low) or (high is not None and value > high):
        span = f" between {low:g} and {high:g}" if low is not None and high is not None else ""
        raise _fail(where, f"{what} must be a number{span}; got {value!r}")
    return float(value)


def _one_of(options: tuple[str, ...]) -> Any:
    def check(where: str, label: str, value: Any) -> None:
        if value not in options:
            raise _fail(where, f"{label} must be one of {', '.join(options)}; got {value!r}")
    return check


def _metric(where: str, label: str, value: Any) -> None:
    if value not in checks.metric_names():
        raise _fail(where, f"{label} must be a source and a measure, like internal.roc_auc or external.sensitivity "
                           f"(sources {', '.join(checks.SOURCES)}; measures {', '.join(checks.MEASURES)}); "
                           f"got {value!r}")


def _flag(where: str, label: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _fail(where, f"{label} must be true or false; got {value!r}")


#: How each check parameter is checked (``settings`` depends on the kind: see ``_check``).
_PARAM_CHECKS = {
    "where": _selector, "a": _selector, "b": _selector, "differ_only_in": _setting_list,
    "count": _whole, "min_images": _whole, "metric": _metric, "b_metric": _metric,
    "op": _one_of(checks.OPERATORS), "on": _one_of(checks.THRESHOLD_PLACES), "rule": _one_of(THRESHOLD_RULES),
    "value": _number, "sensitivity": lambda where, label, value: _number(where, label, value, 0.0, 1.0),
    "clean": _flag, "dataset": _text, "for_each": lambda where, label, value: _for_each(where, label, value),
}


def _check(where: str, at: str, raw: Any) -> Check:
    if not isinstance(raw, dict):
        raise _fail(where, f"{at}'s 'check' must hold a kind and its parameters; got {raw!r}")
    kind = raw.get("kind")
    if kind not in checks.KINDS:
        raise _fail(where, f"{at}'s check 'kind' must be one of {', '.join(checks.KINDS)}; got {kind!r}")
    params = {k: v for k, v in raw.items() if k != "kind"}
    required, optional = checks.PARAMS[kind]
    for name in sorted(required):
        if name not in params:
            raise _fail(where, f"{at}'s {kind} check needs '{name}'")
    for name in params:
        if name not in required | optional:
            raise _fail(where, f"{at}'s {kind} check has an unknown parameter '{name}'; it takes "
                               f"{', '.join(sorted(required | optional))}")
    what = f"{at}'s check"
    for name, value in params.items():
        if name == "settings":  # the settings to differ in, or the settings a run must have
            (_setting_list if kind == "runs_differ_only_in" else _selector)(where, f"{what} '{name}'", value)
        else:
            _PARAM_CHECKS[name](where, f"{what} '{name}'", value)
    if kind == "metric_compare":
        if "b" not in params and "value" not in params and "b_metric" not in params:
            raise _fail(where, f"{what} compares with nothing; give 'b' (another run), 'b_metric' (another figure) "
                               "or 'value' (a number)")
        if "value" in params and ("b" in params or "b_metric" in params):
            raise _fail(where, f"{what} gives 'value' and another run or figure; compare with one of them")
    return Check(kind=kind, params=params)


def _for_each(where: str, label: str, value: Any) -> None:
    if not isinstance(value, dict) or len(value) != 1:
        raise _fail(where, f"{label} must name one setting and its values (like data.split: [random, patient]); "
                           f"got {value!r}")
    (name, values), = value.items()
    problem = checks.setting_problem(str(name), values if isinstance(values, list) else [values])
    if problem:
        raise _fail(where, f"{label}: {problem}")


def _figure(where: str, at: str, raw: Any) -> Figure:
    name, params = (raw, {}) if isinstance(raw, str) else (
        (raw.get("name"), {k: v for k, v in raw.items() if k != "name"}) if isinstance(raw, dict) else (None, {}))
    if name not in FIGURES:
        raise _fail(where, f"{at}'s 'figure' must be one of {', '.join(FIGURES)}; got {name!r}")
    for key, value in params.items():
        if key not in FIGURES[name]:
            raise _fail(where, f"{at}'s figure {name} has an unknown parameter '{key}'"
                               + (f"; it takes {', '.join(FIGURES[name])}" if FIGURES[name] else "; it takes none"))
        if key == "run":
            _selector(where, f"{at}'s figure parameter 'run'", value)
        elif key == "settings":
            _setting_list(where, f"{at}'s figure parameter 'settings'", value)
    return Figure(name=name, params=params)


def _questions(where: str, at: str, raw: Any) -> tuple[Question, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _fail(where, f"{at}'s 'questions' must be a list; got {raw!r}")
    found = []
    for number, item in enumerate(raw, start=1):
        what = f"{at}'s question {number}"
        if not isinstance(item, dict):
            raise _fail(where, f"{what} must hold ask, choices, answer and explain; got {item!r}")
        unknown = [name for name in item if name not in ("ask", "choices", "answer", "explain")]
        if unknown:
            raise _fail(where, f"{what} has an unknown field '{unknown[0]}'; a question has ask, choices, answer "
                               "and explain")
        ask = _text(where, item.get("ask"), f"{what}'s ask")
        choices = item.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, (str, int, float))
                                                                        for c in choices):
            raise _fail(where, f"{what}'s 'choices' must be a list of at least two answers; got {choices!r}")
        choices = [str(c).strip() for c in choices]
        answer = item.get("answer")
        if isinstance(answer, int) and not isinstance(answer, bool) and 1 <= answer <= len(choices):
            index = answer - 1
        elif isinstance(answer, str) and answer.strip() in choices:
            index = choices.index(answer.strip())
        else:
            raise _fail(where, f"{what}'s 'answer' must be the number of the right choice (1 to {len(choices)}) or "
                               f"its text; got {answer!r}")
        explain = _text(where, item.get("explain"), f"{what}'s explain")
        found.append(Question(ask=ask, choices=tuple(choices), answer=index, explain=explain))
    return tuple(found)


def fingerprint(folder: str | os.PathLike | None = None) -> str:
    """Changes when a lesson file is added, removed or edited (for caches of ``load_lessons``)."""
    parts = []
    for path in lesson_files(folder):
        try:
            stat = path.stat()
        except OSError:
            continue
        parts.append(f"{path.name}:{stat.st_mtime_ns}:{stat.st_size}")
    return "|".join(parts)
