"""The checks a lesson asks of a learner's own runs: pure Python over run folders.

A check reads the learner's finished runs (``read_runs``: config, metrics and stored evaluations of each
run folder) and answers with a ``CheckResult``: whether it passed, and one or two sentences that quote the
learner's own figures, or say what is still missing ("No finished run with a patient split yet.").

The kinds (``KINDS``; their parameters in ``PARAMS``; lessons/README.md explains them to teachers):

    dataset_chosen        a data set is chosen: its class balance and what always answering PNEUMONIA scores
    run_exists            a finished run with the given settings (``settings``; ``count`` of them)
    runs_differ_only_in   finished runs whose settings differ only in the named ones (seeds, paths, the recipe's
                          name and where a run trained are ignored)
    evaluated_externally  a run evaluated on a data set none of whose images it trained on (optionally a named
                          one, a clean one, or one run for each value of a setting)
    metric_compare        a figure of run A against run B, against another figure of run A, or against a number
    threshold_chosen      a run whose threshold finds at least a share of the pneumonias

Settings are named by their place in config.json (``data.split``, ``train.balance``, ``model.image_size``)
plus ``dataset.markers``: whether the data set a run trained on records planted markers in its manifest.csv.
"""
from __future__ import annotations

import math
import operator
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_core.core.config import RunConfig
from cxr_core.core.errors import CxrError
from cxr_core.core.recipes import RECIPE_NAMES
from cxr_core.data.scan import SIDECAR_NAME
from cxr_core.runs import registry
from cxr_core.runs.run_folder import Evaluation, Metrics, RunFolder, RunState

# --- Settings -------------------------------------------------------------------------------------------
SECTIONS = ("data", "augment", "model", "train")
#: Settings that are not properties of the data set a run trained on (see ``dataset_markers``).
MARKERS_SETTING = "dataset.markers"
#: What two runs may differ in and still count as "the same recipe": seeds, paths, the recipe's name (a
#: label; the settings themselves are compared) and where or how fast the run trained.
IGNORED_SETTINGS = frozenset({"version", "data.seed", "train.seed", "train.cache_dir", "train.recipe",
                              "train.distribute", "train.precision", "train.cpu_replicas", "train.export_litert",
                              MARKERS_SETTING})


def setting_names() -> tuple[str, ...]:
    """Every setting a lesson may name: ``section.field`` of config.json, and ``dataset.markers``."""
    names = [f"{section}.{f.name}" for section in SECTIONS for f in fields(getattr(RunConfig(), section))]
    return (*names, MARKERS_SETTING)


def setting_problem(name: str, value: Any) -> str | None:
    """Why ``name: value`` cannot be a setting (a phrase), or None when it can. A list means any of its values."""
    if name not in setting_names():
        return f"'{name}' is not a setting (settings are named like data.split, train.balance, model.image_size)"
    for one in value if isinstance(value, list) else [value]:
        if name == MARKERS_SETTING:
            if not isinstance(one, bool):
                return f"{name} must be true or false; got {one!r}"
            continue
        if name == "train.recipe":
            if one not in RECIPE_NAMES:
                return f"train.recipe must be one of {', '.join(RECIPE_NAMES)}; got {one!r}"
            continue
        section, key = name.split(".", 1)
        try:
            replace(getattr(RunConfig(), section), **{key: one})
        except (CxrError, ValueError, TypeError) as error:
            return f"{name}: {one!r} cannot be used ({str(error).rstrip('.')})"
    return None


def _flatten(config: dict) -> dict[str, Any]:
    flat = {}
    for section in SECTIONS:
        for key, value in (config.get(section) or {}).items():
            flat[f"{section}.{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def _normal(name: str, value: Any) -> Any:
    """A value as compared: a folder or weights file by its name, numbers rounded, lists as tuples."""
    if name in ("data.data_dir", "model.weights") and value:
        return Path(str(value)).name
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return round(float(value), 6)
    if isinstance(value, (list, tuple)):
        return tuple(_normal(name, v) for v in value)
    return value


def _same(name: str, have: Any, want: Any) -> bool:
    if isinstance(want, list):
        return any(_same(name, have, w) for w in want)
    return _normal(name, have) == _normal(name, want)


# --- Words ------------------------------------------------------------------------------------------------
_BALANCE_WORDS = {"augment": "augmented balancing", "class_weight": "class weights", "none": "no balancing"}
_LABELS = {"data.split": "the split", "train.balance": "the balance strategy", "train.threshold_rule":
           "the threshold rule", "augment.horizontal_flip": "the horizontal flip", "model.backbone": "the backbone",
           "data.data_dir": "the data set", "train.recipe": "the recipe", "model.image_size": "the image size"}


def setting_label(name: str) -> str:
    """'the split' for data.split; 'zoom' for augment.zoom."""
    return _LABELS.get(name, name.split(".", 1)[-1].replace("_", " "))


def show_value(name: str, value: Any) -> str:
    """How a setting's value reads in a sentence."""
    if name == "train.balance":
        return _BALANCE_WORDS.get(value, str(value))
    if name == "data.data_dir":
        return Path(str(value)).name
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "–".join(show_value(name, v) for v in value)
    return str(value)


def describe(wanted: Mapping[str, Any]) -> str:
    """'the quick recipe and a patient split' for {train.recipe: quick, data.split: patient}."""
    parts = []
    for name, value in wanted.items():
        shown = " or ".join(show_value(name, v) for v in value) if isinstance(value, list) else show_value(name, value)
        if name == "data.split":
            parts.append(f"a {shown} split")
        elif name == "train.recipe":
            parts.append(f"the {shown} recipe")
        elif name == "train.balance":
            parts.append(shown)
        elif name == "train.threshold_rule":
            parts.append(f"the {shown} threshold rule")
        elif name == MARKERS_SETTING:
            parts.append("a data set with planted markers" if value else "a data set without markers")
        elif name == "data.data_dir":
            parts.append(f"the data set {shown}")
        elif name == "augment.horizontal_flip":
            parts.append("horizontal flips" if value else "no horizontal flip")
        else:
            parts.append(f"{setting_label(name)} {shown}")
    if not parts:
        return "any settings"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _fmt(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _share(value: float) -> str:
    return f"{value:.0%}"


# --- Runs -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunInfo:
    """What the checks read of one run folder."""

    path: Path
    state: RunState
    started: float
    settings: dict[str, Any]
    metrics: Metrics
    evaluations: tuple[Evaluation, ...]  # every stored evaluation, newest first

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def finished(self) -> bool:
        return self.state is RunState.DONE

    def external(self, dataset: str | None = None) -> list[Evaluation]:
        """Evaluations on data sets none of whose images the run trained on (optionally one named data set),
        newest first."""
        return [e for e in self.evaluations if e.is_external and e.task == "pneumonia"
                and (dataset is None or dataset in (e.name, e.data_name))]


def dataset_markers(data_dir: str | os.PathLike | None) -> dict | None:
    """The planted markers a data set records: its manifest.csv's marker column (a column whose name holds
    "marker"), with how many images carry one, by class; None when the data set records none (or is gone)."""
    if not data_dir:
        return None
    path = Path(data_dir) / SIDECAR_NAME
    try:
        columns = pd.read_csv(path, nrows=0).columns
    except (OSError, ValueError, pd.errors.ParserError):
        return None
    names = [str(c).strip().lower() for c in columns]
    column = columns[names.index("marker")] if "marker" in names else next(
        (c for c in columns if "marker" in str(c).lower()), None)
    if column is None:
        return None
    try:
        table = pd.read_csv(path, usecols=[c for c in (column, "label") if c in columns], low_memory=False)
    except (OSError, ValueError, pd.errors.ParserError):
        return None
    marked = _truthy(table[column])
    result = {"column": str(column), "images": int(len(table)), "marked": int(marked.sum())}
    if "label" in table.columns:
        labels = table["label"].astype(str).str.upper()
        for label in ("NORMAL", "PNEUMONIA"):
            part = labels == label
            result[label] = {"images": int(part.sum()), "marked": int((marked & part).sum())}
    return result if result["marked"] else None


def _truthy(values: pd.Series) -> pd.Series:
    """A marker column as booleans: a number above 0, true/yes, or any other non-empty text but none/no/false."""
    numbers = pd.to_numeric(values, errors="coerce")
    text = values.astype(str).str.strip().str.lower()
    words = ~text.isin(["", "nan", "none", "no", "false", "0", "0.0", "clean"])
    return numbers.gt(0).where(numbers.notna(), words).astype(bool)


def read_run(path: str | os.PathLike) -> RunInfo | None:
    """One run folder as the checks see it; None when its settings cannot be read."""
    folder = RunFolder(path)
    config = folder.config_or_none()
    if config is None:
        return None
    status = registry.run_status(folder.path)
    settings = _flatten(config.to_dict())
    settings[MARKERS_SETTING] = dataset_markers(config.data.data_dir) is not None
    return RunInfo(path=folder.path, state=status.state, started=status.started or 0.0, settings=settings,
                   metrics=folder.metrics() or Metrics(), evaluations=tuple(folder.evaluations()))


def run_folders(root: str | os.PathLike | None = None, workspace: str | None = None) -> list[Path]:
    """The learner's run folders: a visitor's workspace on a hosted app, else the runs root's own runs
    (never the shipped demo run)."""
    summaries = registry.list_runs(root, include_demo=False, workspace=workspace)
    return [Path(s.path) for s in summaries if (s.owner == workspace if workspace else not s.owner)]


def read_runs(paths: Iterable[str | os.PathLike]) -> list[RunInfo]:
    """``read_run`` of each folder (those that can be read), newest first."""
    found = [info for info in (read_run(p) for p in paths) if info is not None]
    return sorted(found, key=lambda r: (r.started, r.name), reverse=True)


def matches(run: RunInfo, wanted: Mapping[str, Any] | None) -> bool:
    """Whether the run has every setting of ``wanted`` (a list value: any of them)."""
    return all(_same(name, run.settings.get(name), value) for name, value in (wanted or {}).items())


def _comparable(run: RunInfo, leave_out: Iterable[str] = ()) -> dict[str, Any]:
    skip = IGNORED_SETTINGS | set(leave_out)
    return {name: _normal(name, value) for name, value in run.settings.items() if name not in skip}


def differences(a: RunInfo, b: RunInfo) -> list[str]:
    """The settings two runs differ in (ignoring ``IGNORED_SETTINGS``)."""
    left, right = _comparable(a), _comparable(b)
    return sorted(name for name in set(left) | set(right) if left.get(name) != right.get(name))


# --- Metrics ----------------------------------------------------------------------------------------------
MEASURES = ("roc_auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "pr_auc", "brier")
SOURCES = ("internal", "validation", "external", "gap")
_MEASURE_WORDS = {"roc_auc": "ROC AUC", "pr_auc": "PR AUC", "f1": "F1", "brier": "Brier score"}
_SOURCE_WORDS = {"internal": "on its own test part", "validation": "on its validation images",
                 "external": "on the external test set", "gap": "lost from its own test part to the external test set"}


def metric_names() -> tuple[str, ...]:
    return tuple(f"{source}.{measure}" for source in SOURCES for measure in MEASURES)


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def metric_words(name: str) -> str:
    """'ROC AUC on its own test part' for internal.roc_auc."""
    source, measure = name.split(".", 1)
    return f"{_MEASURE_WORDS.get(measure, measure)} {_SOURCE_WORDS[source]}"


def metric(run: RunInfo, name: str, dataset: str | None = None) -> float | None:
    """A run's figure: ``internal.*`` (its own test part, at its threshold), ``validation.*``, ``external.*``
    (its newest external evaluation, or the one on ``dataset``) and ``gap.*`` (internal minus external)."""
    source, measure = name.split(".", 1)
    if source == "internal":
        value = run.metrics.test_at_threshold.get(measure)
    elif source == "validation":
        value = run.metrics.val.get(measure)
    elif source == "external":
        found = run.external(dataset)
        value = found[0].figures.get(measure) if found else None
    else:
        inside, outside = metric(run, f"internal.{measure}"), metric(run, f"external.{measure}", dataset)
        value = None if inside is None or outside is None else inside - outside
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def run_figures(run: RunInfo) -> str:
    """'ROC AUC 0.957 on its own test part (60 images), 0.880 on an external test set (311 images)'."""
    test = run.metrics.test_at_threshold
    parts = []
    if test.get("roc_auc") is not None:
        parts.append(f"ROC AUC {_fmt(test['roc_auc'])} on its own test part ({test.get('n', '?')} images)")
    for result in run.external()[:1]:
        parts.append(f"{_fmt(result.roc_auc)} on {result.name} ({_or_unknown(result.n)} images)")
    return ", ".join(parts) if parts else "no test figures"


# --- Results ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckResult:
    """The answer of a check: passed or not, the sentence for the learner, and the runs it is about."""

    passed: bool
    sentence: str
    runs: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckContext:
    """What a check may read: the learner's runs, and the data set they chose (for ``dataset_chosen``)."""

    runs: list[RunInfo] = field(default_factory=list)
    data_root: Path | None = None
    dataset: str | None = None
    #: How a data set folder's manifest is read (the app passes its cached scan).
    manifest: Callable[[Path], pd.DataFrame] | None = None

    @property
    def finished(self) -> list[RunInfo]:
        return [r for r in self.runs if r.finished]

    def training(self, wanted: Mapping[str, Any] | None) -> list[RunInfo]:
        return [r for r in self.runs if r.state.is_active and matches(r, wanted)]


def _waiting_note(ctx: CheckContext, wanted: Mapping[str, Any] | None) -> str:
    busy = ctx.training(wanted)
    if not busy:
        return ""
    return f" Your run {busy[0].name} is still training; check again when it is done."


# --- The kinds --------------------------------------------------------------------------------------------
def dataset_facts(manifest: pd.DataFrame) -> dict[str, Any]:
    """Images, classes, patients and what a model answering PNEUMONIA for every image scores."""
    n = int(len(manifest))
    pneumonia = int((manifest["label"].astype(str) == "PNEUMONIA").sum()) if n else 0
    per_patient = manifest.groupby("patient_id").size() if n and "patient_id" in manifest else pd.Series(dtype=int)
    return {"images": n, "NORMAL": n - pneumonia, "PNEUMONIA": pneumonia,
            "always_pneumonia_accuracy": pneumonia / n if n else float("nan"),
            "patients": int(per_patient.size), "patients_with_several": int((per_patient > 1).sum()),
            "max_per_patient": int(per_patient.max()) if per_patient.size else 0}


def _read_manifest(ctx: CheckContext, folder: Path) -> pd.DataFrame:
    if ctx.manifest is not None:
        return ctx.manifest(folder)
    from cxr_core.data.scan import scan_dataset  # noqa: PLC0415 (hashes every image: only when asked)

    return scan_dataset(folder).manifest


def check_dataset_chosen(ctx: CheckContext, params: Mapping[str, Any]) -> CheckResult:
    if not ctx.dataset or ctx.data_root is None or not (ctx.data_root / ctx.dataset).is_dir():
        return CheckResult(False, "No data set chosen yet: choose one on the Dataset page.")
    try:
        manifest = _read_manifest(ctx, ctx.data_root / ctx.dataset)
    except CxrError as error:
        return CheckResult(False, f"The data set {ctx.dataset} cannot be read: {error}")
    facts = dataset_facts(manifest)
    least = int(params.get("min_images", 10))
    if facts["images"] < least:
        return CheckResult(False, f"The data set {ctx.dataset} holds {facts['images']} images; this lesson needs "
                                  f"at least {least}.")
    share = facts["always_pneumonia_accuracy"]
    return CheckResult(True, f"Your data set {ctx.dataset} has {facts['images']:,} images: {facts['NORMAL']:,} normal "
                             f"and {facts['PNEUMONIA']:,} pneumonia ({_share(share)}), from {facts['patients']:,} "
                             f"patients. A model that answers PNEUMONIA for every image would be right "
                             f"{_share(share)} of the time.")


def check_run_exists(ctx: CheckContext, params: Mapping[str, Any]) -> CheckResult:
    wanted = params.get("settings") or {}
    count = int(params.get("count", 1))
    found = [r for r in ctx.finished if matches(r, wanted)]
    if len(found) >= count:
        shown = "; ".join(f"{r.name}: {run_figures(r)}" for r in found[:count])
        looked = "".join(marker_sentence(r) for r in found[:count])
        return CheckResult(True, f"Found your finished run{'s' if count > 1 else ''} with {describe(wanted)}: {shown}."
                           + looked, tuple(r.name for r in found[:count]))
    if not found:
        return CheckResult(False, f"No finished run with {describe(wanted)} yet." + _waiting_note(ctx, wanted))
    return CheckResult(False, f"You have {len(found)} finished run(s) with {describe(wanted)}; this step asks for "
                              f"{count}." + _waiting_note(ctx, wanted), tuple(r.name for r in found))


def _names(params: Mapping[str, Any], key: str = "settings") -> list[str]:
    value = params.get(key) or []
    return [value] if isinstance(value, str) else list(value)


def check_runs_differ_only_in(ctx: CheckContext, params: Mapping[str, Any]) -> CheckResult:
    names = _names(params)
    where = params.get("where") or {}
    count = int(params.get("count", 2))
    label = " and ".join(setting_label(n) for n in names)
    candidates = [r for r in ctx.finished if matches(r, where)]
    groups: dict[tuple, dict[tuple, RunInfo]] = {}
    for run in candidates:  # newest first: each group keeps the newest run of each value
        key = tuple(sorted(_comparable(run, names).items(), key=lambda item: item[0]))
        value = tuple(_normal(n, run.settings.get(n)) for n in names)
        groups.setdefault(key, {}).setdefault(value, run)
    found = next((list(g.values())[:count] for g in groups.values() if len(g) >= count), None)
    if found:
        return CheckResult(True, _differ_sentence(found, names, label), tuple(r.name for r in found))
    suffix = f" with {describe(where)}" if where else ""
    if len(candidates) < 2:
        return CheckResult(False, f"You need {count} finished runs{suffix} that differ only in {label}; you have "
                                  f"{len(candidates)}." + _waiting_note(ctx, where))
    closest = _closest_pair(candidates, names)
    if closest is None:
        return CheckResult(False, f"Your finished runs{suffix} all have the same {label}; train one with another "
                                  f"value." + _waiting_note(ctx, where))
    a, b, extra = closest
    shown = ", ".join(setting_label(n) for n in extra[:3]) + (" and more" if len(extra) > 3 else "")
    return CheckResult(False, f"Your runs {a.name} and {b.name} differ in {label} but also in {shown}; train another "
                              f"run that changes only {label}." + _waiting_note(ctx, where))


def _closest_pair(runs: list[RunInfo], names: list[str]) -> tuple[RunInfo, RunInfo, list[str]] | None:
    best = None
    recent = runs[:30]
    for i, a in enumerate(recent):
        for b in recent[i + 1:]:
            diff = differences(a, b)
            if not set(diff) & set(names):
                continue
            extra = [n for n in diff if n not in names]
            if best is None or len(extra) < len(best[2]):
                best = (a, b, extra)
    return best


def _differ_sentence(found: list[RunInfo], names: list[str], label: str) -> str:
    def values(run: RunInfo) -> str:
        return "/".join(show_value(n, run.settings.get(n)) for n in names)

    internal = [metric(r, "internal.roc_auc") for r in found]
    text = (f"You trained {len(found)} runs that differ only in {label}: "
            + ", ".join(f"{values(r)} {_fmt(v)}" for r, v in zip(found, internal))
            + " (ROC AUC on their own test parts)")
    shared = set.intersection(*({e.name for e in r.external()} for r in found))
    if shared:
        name = next(e.name for e in found[0].external() if e.name in shared)
        outside = [metric(r, "external.roc_auc", name) for r in found]
        text += f", and {' / '.join(_fmt(v) for v in outside)} on {name}"
    return text + "."


def marker_sentence(run: RunInfo) -> str:
    """Where the run looked on marked images, from a stored evaluation that reports ``marker_attention`` (the
    share of marked images whose Grad-CAM map peaks on the marker): one sentence, or "" when none does."""
    for result in run.evaluations:
        value = result.marker_attention
        if value is not None:
            counted = f" of the {result.n_marked}" if result.n_marked is not None else " of the"
            return (f" On {result.name}, Grad-CAM's strongest evidence for pneumonia lay on the marker in {value:.0%}"
                    f"{counted} marked images (marker_attention).")
    return ""


def _or_unknown(value: int | None) -> str:
    return "?" if value is None else str(value)


def _evaluation_sentence(run: RunInfo, result: Evaluation) -> str:
    sampled = f", a sample of {result.sampled_from:,}" if result.sampled_from else ""
    return (f"Run {run.name} scored ROC AUC {_fmt(result.roc_auc)} and accuracy {_fmt(result.accuracy)} "
            f"on {result.name} ({_or_unknown(result.n)} images{sampled}, none from its training part).")


def check_evaluated_externally(ctx: CheckContext, params: Mapping[str, Any]) -> CheckResult:
    wanted = params.get("settings") or {}
    dataset = params.get("dataset")
    clean = params.get("clean")
    count = int(params.get("count", 1))
    for_each = params.get("for_each") or {}

    def usable(run: RunInfo) -> list[Evaluation]:
        found = run.external(dataset)
        if clean is not None:
            found = [e for e in found if (dataset_markers(e.data) is None) == bool(clean)]
        return found

    evaluated = [(r, usable(r)) for r in ctx.finished if matches(r, wanted)]
    evaluated = [(r, found) for r, found in evaluated if found]
    where = f"on {dataset}" if dataset else ("on a clean external test set" if clean else "on an external test set")
    if for_each:
        (name, values), = for_each.items()
        chosen, missing = [], []
        for value in values if isinstance(values, list) else [values]:
            run = next(((r, f) for r, f in evaluated if _same(name, r.settings.get(name), value)), None)
            (chosen.append(run) if run else missing.append(show_value(name, value)))
        if missing:
            done = f" ({len(chosen)} of {len(chosen) + len(missing)} done)" if chosen else ""
            return CheckResult(False, f"No finished run with {describe(wanted) + ' and ' if wanted else ''}"
                                      f"{setting_label(name)} {' or '.join(missing)} has been evaluated {where} "
                                      f"yet{done}: open it on the Evaluation page and evaluate it on another "
                                      "data set.", tuple(r.name for r, _ in chosen))
    else:
        chosen = evaluated[:count]
        if len(chosen) < count:
            return CheckResult(False, _not_evaluated(ctx, wanted, where, dataset), tuple(r.name for r, _ in chosen))
    text = " ".join(_evaluation_sentence(r, found[0]) + marker_sentence(r) for r, found in chosen)
    return CheckResult(True, text, tuple(r.name for r, _ in chosen))


def _not_evaluated(ctx: CheckContext, wanted: Mapping[str, Any], where: str, dataset: str | None) -> str:
    runs = [r for r in ctx.finished if matches(r, wanted)]
    if not runs:
        return f"No finished run with {describe(wanted)} yet." + _waiting_note(ctx, wanted)
    inside = [(r, e.name) for r in runs for e in r.evaluations
              if not e.is_external and (dataset is None or e.name == dataset)]
    if inside:
        run, name = inside[0]
        return (f"Run {run.name} was evaluated on {name}, but it trained on some of those images, so that is not an "
                "external test: evaluate it on another data set.")
    return (f"Your run {runs[0].name} ({describe(wanted)}) has not been evaluated {where} yet: open it on the "
            "Evaluation page and evaluate it on another data set.")


_OPS: dict[str, tuple[Callable[[float, float], bool], str]] = {
    ">": (operator.gt, "above"), ">=": (operator.ge, "at least"), "<": (operator.lt, "below"),
    "<=": (operator.le, "at most"),
}


def check_metric_compare(ctx: CheckContext, params: Mapping[str, Any]) -> CheckResult:
    name = str(params["metric"])
    other = str(params.get("b_metric") or name)
    op, op_words = _OPS[str(params.get("op", ">"))]
    dataset = params.get("dataset")
    a_wanted, b_wanted = params.get("a") or {}, params.get("b")
    a_runs = [r for r in ctx.finished if matches(r, a_wanted) and metric(r, name, dataset) is not None]
    a_words = f"your run with {describe(a_wanted)}" if a_wanted else "your run"
    if not a_runs:
        missing = "has been evaluated on an external test set" if name.split(".")[0] in ("external", "gap") else \
            f"has its {metric_words(name)}"
        if not [r for r in ctx.finished if matches(r, a_wanted)]:
            return CheckResult(False, f"No finished run with {describe(a_wanted)} yet." + _waiting_note(ctx, a_wanted))
        return CheckResult(False, f"No finished run with {describe(a_wanted)} {missing} yet.")
    if b_wanted is None and "value" in params and "b_metric" not in params:
        target = float(params["value"])
        for run in a_runs:
            value = metric(run, name, dataset)
            if op(value, target):
                return CheckResult(True, f"The {metric_words(name)} of {a_words} {run.name} is {_fmt(value)}, "
                                         f"{op_words} {target:g}.", (run.name,))
        run = a_runs[0]
        return CheckResult(False, f"The {metric_words(name)} of {a_words} {run.name} is "
                                  f"{_fmt(metric(run, name, dataset))}, not {op_words} {target:g} yet.", (run.name,))
    if b_wanted is None:  # two figures of the same run
        for run in a_runs:
            first, second = metric(run, name, dataset), metric(run, other, dataset)
            if second is not None and op(first, second):
                return CheckResult(True, f"Your run {run.name}: {metric_words(name)} {_fmt(first)}, {op_words} its "
                                         f"{metric_words(other)} {_fmt(second)}.", (run.name,))
        run = a_runs[0]
        second = metric(run, other, dataset)
        if second is None:
            return CheckResult(False, f"Your run {run.name} has no {metric_words(other)} yet.", (run.name,))
        first = metric(run, name, dataset)
        return CheckResult(False, f"Your run {run.name}: {metric_words(name)} {_fmt(first)} is not {op_words} its "
                                  f"{metric_words(other)} {_fmt(second)}.", (run.name,))
    b_runs = [r for r in ctx.finished if matches(r, b_wanted) and metric(r, other, dataset) is not None]
    if not b_runs:
        return CheckResult(False, f"No finished run with {describe(b_wanted)} has its {metric_words(other)} yet."
                           + _waiting_note(ctx, b_wanted))
    only = _names(params, "differ_only_in")
    pairs = [(a, b) for a in a_runs for b in b_runs if a.path != b.path
             and (not only or set(differences(a, b)) <= set(only))]
    if not pairs:
        return CheckResult(False, f"Your runs with {describe(a_wanted)} and with {describe(b_wanted)} differ in more "
                                  f"than {' and '.join(setting_label(n) for n in only)}; train a pair that differs "
                                  "only there.")
    b_words = f"your run with {describe(b_wanted)}"
    for a, b in pairs:
        first, second = metric(a, name, dataset), metric(b, other, dataset)
        if op(first, second):
            return CheckResult(True, f"{_upper_first(metric_words(name))}: {a_words} {a.name} scored {_fmt(first)}, "
                                     f"{op_words} {b_words} {b.name} at {_fmt(second)}.", (a.name, b.name))
    a, b = pairs[0]
    return CheckResult(False, f"{_upper_first(metric_words(name))}: {a_words} {a.name} scored "
                              f"{_fmt(metric(a, name, dataset))} and {b_words} {b.name} "
                              f"{_fmt(metric(b, other, dataset))}, so the first is not {op_words} the second yet.",
                       (a.name, b.name))


THRESHOLD_PLACES = ("validation", "internal", "external")


def check_threshold_chosen(ctx: CheckContext, params: Mapping[str, Any]) -> CheckResult:
    least = float(params["sensitivity"])
    where = str(params.get("on", "validation"))
    wanted = dict(params.get("settings") or {})
    if params.get("rule"):
        wanted["train.threshold_rule"] = params["rule"]
    runs = [r for r in ctx.finished if matches(r, wanted)]
    if not runs:
        return CheckResult(False, f"No finished run with {describe(wanted)} yet." + _waiting_note(ctx, wanted))
    scored = [(r, metric(r, f"{where}.sensitivity")) for r in runs]
    scored = [(r, s) for r, s in scored if s is not None]
    if not scored:
        return CheckResult(False, f"Your run {runs[0].name} has no sensitivity {_SOURCE_WORDS[where]} yet"
                           + (": evaluate it on an external test set." if where == "external" else "."))
    for run, sensitivity in scored:
        if sensitivity >= least:
            return CheckResult(True, _threshold_sentence(run, where, least), (run.name,))
    run, sensitivity = scored[0]
    return CheckResult(False, f"Your run {run.name} finds {sensitivity:.0%} of pneumonias {_SOURCE_WORDS[where]} at "
                              f"threshold {_fmt(run.metrics.threshold)}; this step asks for at least "
                              f"{least:.0%}: train with the sensitivity threshold rule.", (run.name,))


def _threshold_sentence(run: RunInfo, where: str, least: float) -> str:
    rule = run.settings.get("train.threshold_rule") or "youden"
    target = f", target {run.settings.get('train.target_sensitivity'):g}" if rule == "sensitivity" else ""
    text = (f"Run {run.name} ({rule} rule{target}) chose threshold {_fmt(run.metrics.threshold)} on its "
            f"validation images. {_upper_first(_SOURCE_WORDS[where])} it finds "
            f"{metric(run, f'{where}.sensitivity'):.0%} of pneumonias (at least {least:.0%} asked) and clears "
            f"{metric(run, f'{where}.specificity') or 0:.0%} of normal films (specificity).")
    if where != "internal" and metric(run, "internal.sensitivity") is not None:
        text += (f" On its own test part: {metric(run, 'internal.sensitivity'):.0%} of pneumonias found, "
                 f"{metric(run, 'internal.specificity') or 0:.0%} of normal films cleared.")
    return text


#: Each kind's function, and its parameters: required ones, then optional ones.
KINDS: dict[str, Callable[[CheckContext, Mapping[str, Any]], CheckResult]] = {
    "dataset_chosen": check_dataset_chosen,
    "run_exists": check_run_exists,
    "runs_differ_only_in": check_runs_differ_only_in,
    "evaluated_externally": check_evaluated_externally,
    "metric_compare": check_metric_compare,
    "threshold_chosen": check_threshold_chosen,
}
PARAMS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "dataset_chosen": (frozenset(), frozenset({"min_images"})),
    "run_exists": (frozenset(), frozenset({"settings", "count"})),
    "runs_differ_only_in": (frozenset({"settings"}), frozenset({"where", "count"})),
    "evaluated_externally": (frozenset(), frozenset({"settings", "dataset", "clean", "count", "for_each"})),
    "metric_compare": (frozenset({"metric"}), frozenset({"a", "b", "value", "b_metric", "op", "differ_only_in",
                                                         "dataset"})),
    "threshold_chosen": (frozenset({"sensitivity"}), frozenset({"on", "settings", "rule"})),
}
OPERATORS = tuple(_OPS)


def run_check(kind: str, params: Mapping[str, Any], ctx: CheckContext) -> CheckResult:
    """Run one check. A run folder that cannot be read is one sentence, never an exception."""
    try:
        return KINDS[kind](ctx, params)
    except CxrError as error:
        return CheckResult(False, str(error))
