"""A learner's progress through the lessons, kept beside their runs so that it outlives reloads and restarts.

On a hosted app each visitor's progress is a file in their workspace folder (``cxr_core.hosting.workspaces``);
on a local app (and for the operator) it is a file in the runs root. The file holds, per lesson, the step the
learner is on, when they started and finished, the time spent, and per step whether its check passed (with
the sentence that said so) and each answer given (right at the first try or not). Every change is a
read-modify-write under a file lock, written atomically.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from cxr_core.hosting import workspaces
from cxr_core.io.atomic import read_json, write_json_atomic
from cxr_core.runs import registry
from cxr_core.teaching.lessons import Lesson

PROGRESS_FILE = "lessons-progress.json"
VERSION = 1
#: A pause longer than this between two actions on a lesson counts as this long (the learner went away).
IDLE_CAP_S = 300.0
LOCK_TIMEOUT_S = 10.0


def progress_file(workspace: str | None = None, root: str | os.PathLike | None = None) -> Path:
    """Where a learner's progress is kept: their workspace folder, or the runs root for a local app."""
    root = Path(root) if root is not None else registry.runs_root().path
    if workspace:
        return workspaces.folder(workspace, root, touch=False) / PROGRESS_FILE
    root.mkdir(parents=True, exist_ok=True)
    return root / PROGRESS_FILE


def read(path: str | os.PathLike) -> dict:
    """The progress in a file ({} of lessons when there is none, or it cannot be read)."""
    data = read_json(path, default=None)
    if not isinstance(data, dict) or not isinstance(data.get("lessons"), dict):
        return {"version": VERSION, "lessons": {}}
    return data


def _update(path: str | os.PathLike, change: Callable[[dict], Any]) -> Any:
    """Apply ``change`` to the stored progress and write it back atomically; returns what ``change`` returns.
    Two tabs of one learner take turns (a file lock); a lock not had in time still writes (last one wins)."""
    path = Path(path)
    lock = FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT_S)
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(Timeout):
            stack.enter_context(lock)
        data = read(path)
        result = change(data)
        write_json_atomic(path, data)
    return result


def _lesson(data: dict, lesson_id: str) -> dict:
    return data["lessons"].setdefault(lesson_id, {"steps": {}, "seconds": 0.0})


def _step(data: dict, lesson_id: str, step_key: str) -> dict:
    return _lesson(data, lesson_id).setdefault("steps", {}).setdefault(step_key, {})


def visit(path: str | os.PathLike, lesson_id: str, step_key: str, now: float | None = None) -> None:
    """The learner is on this step now: remember the step, and add the time since their last action (at most
    ``IDLE_CAP_S``) to the lesson's time."""
    now = time.time() if now is None else now

    def change(data: dict) -> None:
        lesson = _lesson(data, lesson_id)
        last = lesson.get("last_seen")
        if isinstance(last, (int, float)) and now >= last:
            lesson["seconds"] = float(lesson.get("seconds") or 0.0) + min(now - last, IDLE_CAP_S)
        lesson.setdefault("started", now)
        lesson["last_seen"] = now
        lesson["step"] = step_key
        _step(data, lesson_id, step_key).setdefault("seen", now)

    _update(path, change)


def record_check(path: str | os.PathLike, lesson_id: str, step_key: str, passed: bool, sentence: str,
                 now: float | None = None) -> None:
    """Remember a check that passed (the first time, and the newest sentence); a check once passed stays passed,
    as a run deleted later does not undo what the learner found."""
    if not passed:
        return
    now = time.time() if now is None else now

    def change(data: dict) -> None:
        check = _step(data, lesson_id, step_key).setdefault("check", {})
        check.setdefault("passed", now)
        check["sentence"] = sentence

    _update(path, change)


def record_answer(path: str | os.PathLike, lesson_id: str, step_key: str, question: int, choice: int,
                  right: bool, now: float | None = None) -> dict:
    """Remember an answer; returns the question's record: first (the first choice), first_right, right (the
    newest answer), tries."""
    now = time.time() if now is None else now

    def change(data: dict) -> dict:
        answers = _step(data, lesson_id, step_key).setdefault("answers", {})
        entry = answers.setdefault(str(question), {"first": choice, "first_right": bool(right), "tries": 0})
        entry["tries"] = int(entry.get("tries") or 0) + 1
        entry["right"] = bool(right)
        entry["choice"] = choice
        entry["time"] = now
        return dict(entry)

    return _update(path, change)


def record_form(path: str | os.PathLike, lesson_id: str, step_key: str, values: dict[str, str]) -> None:
    """Keep what the learner wrote in a step's form (the model card), so that a reload keeps it."""
    def change(data: dict) -> None:
        _step(data, lesson_id, step_key)["form"] = {str(k): str(v) for k, v in values.items()}

    _update(path, change)


def step_record(data: dict, lesson_id: str, step_key: str) -> dict:
    """What is stored for one step ({} when nothing is)."""
    return (((data.get("lessons") or {}).get(lesson_id) or {}).get("steps") or {}).get(step_key) or {}


def mark_finished(path: str | os.PathLike, lesson_id: str, now: float | None = None) -> None:
    now = time.time() if now is None else now
    _update(path, lambda data: _lesson(data, lesson_id).setdefault("finished", now))


def reset(path: str | os.PathLike, lesson_id: str | None = None) -> None:
    """Forget one lesson's progress, or every lesson's."""
    def change(data: dict) -> None:
        if lesson_id is None:
            data["lessons"] = {}
        else:
            data["lessons"].pop(lesson_id, None)

    _update(path, change)


# --- Reading it -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LessonProgress:
    """Where a learner stands in one lesson."""

    steps_done: int
    steps: int
    checks_passed: int
    checks: int
    questions: int
    answered_right: int
    first_try_right: int
    seconds: float
    step_key: str | None
    started: bool
    finished: bool

    @property
    def fraction(self) -> float:
        return self.steps_done / self.steps if self.steps else 0.0

    @property
    def done(self) -> bool:
        return self.steps > 0 and self.steps_done == self.steps


def step_done(entry: dict, step) -> bool:
    """A step is done when it was seen, its check passed (if it has one) and each question was answered right."""
    if not entry.get("seen"):
        return False
    if step.check is not None and not (entry.get("check") or {}).get("passed"):
        return False
    answers = entry.get("answers") or {}
    return all((answers.get(str(i)) or {}).get("right") for i in range(len(step.questions)))


def summary(data: dict, lesson: Lesson) -> LessonProgress:
    record = (data.get("lessons") or {}).get(lesson.id) or {}
    steps = record.get("steps") or {}
    done = checks = right = first = 0
    for step in lesson.steps:
        entry = steps.get(step.key) or {}
        done += step_done(entry, step)
        checks += bool(step.check is not None and (entry.get("check") or {}).get("passed"))
        for i in range(len(step.questions)):
            answer = (entry.get("answers") or {}).get(str(i)) or {}
            right += bool(answer.get("right"))
            first += bool(answer.get("first_right"))
    return LessonProgress(
        steps_done=done, steps=len(lesson.steps), checks_passed=checks,
        checks=sum(step.check is not None for step in lesson.steps),
        questions=sum(len(step.questions) for step in lesson.steps), answered_right=right, first_try_right=first,
        seconds=float(record.get("seconds") or 0.0), step_key=record.get("step"), started=bool(record.get("started")),
        finished=bool(record.get("finished")))


CLASS_COLUMNS = ("learner", "lessons done", "steps done", "checks passed", "right at first try", "minutes",
                 "last active")


def learner_row(name: str, data: dict, lessons: Iterable[Lesson]) -> dict:
    """One row of the class table: a learner's totals over the lessons."""
    found = [summary(data, lesson) for lesson in lessons]
    stamps = [r.get("last_seen") for r in (data.get("lessons") or {}).values() if isinstance(r, dict)]
    last = max((s for s in stamps if isinstance(s, (int, float))), default=None)
    return {
        "learner": name,
        "lessons done": f"{sum(p.done for p in found)} of {len(found)}",
        "steps done": f"{sum(p.steps_done for p in found)} of {sum(p.steps for p in found)}",
        "checks passed": f"{sum(p.checks_passed for p in found)} of {sum(p.checks for p in found)}",
        "right at first try": f"{sum(p.first_try_right for p in found)} of {sum(p.questions for p in found)}",
        "minutes": round(sum(p.seconds for p in found) / 60.0, 1),
        "last active": (time.strftime("%Y-%m-%d %H:%M", time.localtime(last)) if last else ""),
    }


def class_table(lessons: Iterable[Lesson], root: str | os.PathLike | None = None,
                operator_name: str = "operator (this app's own runs)") -> list[dict]:
    """Every learner's row: the runs root's own progress (the operator, or the single user of a local app),
    then each workspace that has started a lesson."""
    lessons = list(lessons)
    root = Path(root) if root is not None else registry.runs_root().path
    rows = []
    own = root / PROGRESS_FILE
    if own.is_file():
        rows.append(learner_row(operator_name, read(own), lessons))
    for workspace in workspaces.all_workspaces(root):
        path = workspaces.workspaces_dir(root) / workspace / PROGRESS_FILE
        if path.is_file():
            rows.append(learner_row(workspace, read(path), lessons))
    return rows


def class_csv(rows: list[dict]) -> str:
    """The class table as CSV text (one header line, one line per learner)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CLASS_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
