"""The class leaderboard: runs scored on the locked test set by the server, ranked, and grouped by what the test
set can tell apart.

A visitor submits one of their own finished pneumonia runs. The server scores it on the locked test set
(``hosting.classroom``) with ``evaluation.external.evaluate_folder`` at the run's **own** threshold (chosen on its
validation images, never on the test set) and ``store=False``, so nothing lands in the run folder, and keeps the
per-image probabilities here only: ``<runs root>/.leaderboard/<id>.csv`` beside ``entries.json`` (written
atomically under a file lock). A visitor may submit ``daily_submissions`` runs per calendar day (UTC).

The board ranks the submissions by ROC AUC and, because every one scored the same images, compares each with
the leader and with the one ranked just above it image by image (``metrics.paired_comparison``, DeLong's test).
Groups are letters: the leader heads group A, and every submission the test set cannot tell apart from it
(p >= 0.05) shares the letter; the best submission that differs from every earlier head starts the next letter.
A class learns from it that a lead of 0.004 on 300 images is no lead.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import hashlib
import io
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock, Timeout

from cxr_core.core.errors import CxrError
from cxr_core.core.metrics import paired_comparison
from cxr_core.core.tasks import get_task
from cxr_core.data.scan import scan_dataset
from cxr_core.evaluation.external import evaluate_folder
from cxr_core.hosting import classroom, workspaces
from cxr_core.hosting.access import OPERATOR
from cxr_core.inference.predictor import Predictor
from cxr_core.io.atomic import atomic_path, read_json, write_json_atomic
from cxr_core.runs.records import RunState
from cxr_core.runs.registry import resolve_root
from cxr_core.runs.run_folder import RunFolder

BOARD_DIR = ".leaderboard"
ENTRIES_FILE = "entries.json"
LOCK_FILE = ".lock"
LOCK_TIMEOUT_S = 10.0
ALPHA = 0.05
#: A reservation older than this (the server stopped while scoring) no longer counts against the day's limit.
STALE_S = 3600.0
FIGURES = ("roc_auc", "accuracy", "sensitivity", "specificity")
SCORING, POSTED = "scoring", "posted"

_ADJECTIVES = ("amber", "brave", "calm", "deft", "eager", "fleet", "gentle", "happy", "ivory", "jolly", "keen",
               "lucid", "mellow", "noble", "olive", "plucky", "quiet", "rapid", "sunny", "tidy", "urban", "vivid",
               "witty", "young", "zesty", "bold", "crisp", "dusky", "early", "frank", "grand", "hardy")
_ANIMALS = ("otter", "heron", "lynx", "panda", "koala", "gecko", "bison", "crane", "dingo", "egret", "ferret",
            "gibbon", "ibis", "jackal", "lemur", "marten", "newt", "ocelot", "puffin", "quokka", "raven", "stoat",
            "tapir", "urchin", "vole", "walrus", "yak", "zebra", "badger", "cobra", "finch", "moose")


class SubmissionError(CxrError):
    """A submission the board does not take (one sentence saying why)."""


def board_dir(root: str | os.PathLike | None = None) -> Path:
    return resolve_root(root) / BOARD_DIR


def owner_key(who: str) -> str:
    """What the board keeps of a submitter: a hash of their id (never the e-mail address or browser id)."""
    return hashlib.sha256(f"cxr-leaderboard:{who}".encode()).hexdigest()[:16]


def pseudonym(owner: str) -> str:
    """A short name for a submitter's board rows, the same every day: 'plucky-otter-3f'."""
    number = int(owner, 16)
    return (f"{_ADJECTIVES[number % len(_ADJECTIVES)]}-{_ANIMALS[(number // len(_ADJECTIVES)) % len(_ANIMALS)]}"
            f"-{owner[-2:]}")


def limit_sentence(limit: int) -> str:
    noun = "submission" if limit == 1 else "submissions"
    return f"You have used your {limit} {noun} for today; the board takes more tomorrow (UTC)."


@contextlib.contextmanager
def _locked(root: str | os.PathLike | None) -> Iterator[Path]:
    folder = board_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(folder / LOCK_FILE), timeout=LOCK_TIMEOUT_S):
            yield folder
    except Timeout:
        raise SubmissionError("The leaderboard is busy with other submissions; try again in a moment.") from None


def read_entries(root: str | os.PathLike | None = None) -> list[dict]:
    """Every entry, oldest first (reservations being scored included)."""
    found = read_json(board_dir(root) / ENTRIES_FILE, default=[])
    return [e for e in found if isinstance(e, dict) and e.get("id")] if isinstance(found, list) else []


def _write_entries(folder: Path, entries: list[dict]) -> None:
    write_json_atomic(folder / ENTRIES_FILE, entries)


def _day(stamp: str) -> str:
    return stamp[:10]


def _now(now: dt.datetime | None) -> dt.datetime:
    return (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)


def used_today(entries: list[dict], owner: str, now: dt.datetime | None = None) -> int:
    """Submissions ``owner`` made on ``now``'s calendar day (UTC), a reservation still being scored included."""
    moment = _now(now)
    today = moment.date().isoformat()
    count = 0
    for entry in entries:
        if entry.get("owner") != owner or _day(str(entry.get("submitted", ""))) != today:
            continue
        if entry.get("state") == SCORING:
            started = dt.datetime.fromisoformat(str(entry["submitted"]))
            if (moment - started).total_seconds() > STALE_S:
                continue
        count += 1
    return count


def left_today(who: str, role: str, root: str | os.PathLike | None = None,
               now: dt.datetime | None = None) -> int | None:
    """How many more runs ``who`` may submit today; None for the operator (no limit)."""
    if role == OPERATOR:
        return None
    limit = classroom.read(root).daily_submissions
    return max(0, limit - used_today(read_entries(root), owner_key(who), now))


def check_run(run_dir: str | os.PathLike, role: str, workspace: str | None,
              root: str | os.PathLike | None = None) -> None:
    """Raise ``SubmissionError`` unless ``run_dir`` is a finished pneumonia run that ``role`` may submit: a visitor
    only a run of their own workspace, the operator any run."""
    folder = RunFolder(run_dir)
    name = folder.name
    if role != OPERATOR:
        owner = workspaces.owner_of(folder.path, root)
        if not workspace or owner != workspace:
            raise SubmissionError(f"You can submit only a finished run of your own workspace; {name} is not one.")
    status = folder.status()
    if status is None or status.state is not RunState.DONE or not folder.has_model():
        raise SubmissionError(f"Only a finished run can be submitted; {name} has not finished training.")
    config = folder.config_or_none()
    task = get_task(config.data.task if config is not None else "pneumonia")
    if not (task.is_binary and task.uses_threshold):
        raise SubmissionError(f"The board ranks pneumonia-vs-normal runs; {name} is a {task.label} run.")


class _Recording:
    """A predictor that keeps each image's probability as ``evaluate_folder`` asks for it: with ``store=False``
    the evaluation keeps no per-image table, and the board needs its own."""

    def __init__(self, predictor: Any) -> None:
        self._predictor = predictor
        self.probabilities: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)

    def predict_files(self, paths):
        found = self._predictor.predict_files(paths)
        self.probabilities.update({r["file"]: float(r["probability"]) for r in found if "probability" in r})
        return found


def _per_image(data_dir: Path, probabilities: dict[str, float]) -> pd.DataFrame:
    """One row per scored image: its path inside the test set, label, probability and patient."""
    manifest = scan_dataset(data_dir).manifest
    rows = manifest[manifest["path"].astype(str).isin(probabilities)]
    root = data_dir.resolve()
    image = [Path(str(p)).resolve().relative_to(root).as_posix() for p in rows["path"]]
    return pd.DataFrame({"image": image, "y": rows["y"].astype(int).to_numpy(),
                         "probability": [probabilities[str(p)] for p in rows["path"]],
                         "patient_id": rows["patient_id"].to_numpy() if "patient_id" in rows else None})


def submit(run_dir: str | os.PathLike, *, who: str, role: str, workspace: str | None, data_root: str | os.PathLike,
           root: str | os.PathLike | None = None, predictor: Any = None, now: dt.datetime | None = None,
           on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Score a run on the locked test set and post it; returns the entry.

    Args:
        run_dir: the run folder.
        who: the submitter (an e-mail address, a workspace or browser id); the board keeps only its hash.
        role: ``operator`` or ``visitor``; a visitor submits only runs of ``workspace``, at most the day's limit.
        data_root: where the locked test set lies.
        predictor: the run's loaded ``Predictor`` (the app keeps one cached); loaded from the run otherwise.
            Whatever its threshold, the run's own validation threshold is used.

    Raises:
        SubmissionError: no locked set, not the submitter's run, not finished, not a pneumonia run, the day's
            limit reached, or the run saw images of the locked set; CxrError: the run or the images cannot be read.
    """
    settings = classroom.read(root)
    if not settings.locked_test_set:
        raise SubmissionError("No locked test set has been chosen yet, so the board takes no submissions.")
    data_dir = Path(data_root) / settings.locked_test_set
    if not data_dir.is_dir():
        raise SubmissionError("The locked test set is not on this server any more; the operator chooses another.")
    check_run(run_dir, role, workspace, root)
    folder = RunFolder(run_dir)
    owner = owner_key(who)
    moment = _now(now)
    entry = {"id": f"{moment:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}", "owner": owner, "pseudonym": pseudonym(owner),
             "role": role, "run": folder.name, "test_set": settings.locked_test_set,
             "submitted": moment.isoformat(timespec="seconds"), "state": SCORING}
    with _locked(root) as board:
        entries = read_entries(root)
        if role != OPERATOR and used_today(entries, owner, moment) >= settings.daily_submissions:
            raise SubmissionError(limit_sentence(settings.daily_submissions))
        _write_entries(board, [*entries, entry])  # the reservation counts while the run is scored
    try:
        posted = _score(folder, data_dir, entry, predictor, on_progress, root)
    except BaseException:
        _drop(entry["id"], root)
        raise
    return posted


def _score(folder: RunFolder, data_dir: Path, entry: dict, predictor: Any, on_progress: Any,
           root: str | os.PathLike | None) -> dict:
    threshold = folder.read_threshold()  # chosen on the run's validation images, never on the test set
    if predictor is None:
        predictor = Predictor.from_run(folder.path)
    recording = _Recording(predictor)
    result = evaluate_folder(folder.path, data_dir, threshold=threshold, store=False, predictor=recording,
                             on_progress=on_progress)
    overlap = result.get("overlap") or {}
    if overlap.get("train") or overlap.get("val"):
        raise SubmissionError(f"{folder.name} saw {overlap.get('train', 0) + overlap.get('val', 0)} images of the "
                              "locked test set while training or choosing its threshold, so its score would not be "
                              "honest; it was not posted.")
    per_image = _per_image(data_dir, recording.probabilities)
    intervals = result.get("intervals") or {}
    posted = {**entry, "state": POSTED, "threshold": float(threshold), "n": int(result["n"]),
              "n_positive": result.get("n_positive"), "n_negative": result.get("n_negative"),
              **{name: result.get(name) for name in FIGURES},
              "intervals": {name: intervals.get(name) for name in FIGURES},
              "intervals_by": result.get("intervals_by")}
    with _locked(root) as board:
        with atomic_path(board / f"{entry['id']}.csv") as tmp:
            per_image.to_csv(tmp, index=False)
        entries = [posted if e.get("id") == entry["id"] else e for e in read_entries(root)]
        if not any(e.get("id") == entry["id"] for e in entries):
            entries.append(posted)
        _write_entries(board, entries)
    return posted


def _drop(entry_id: str, root: str | os.PathLike | None) -> None:
    with _locked(root) as board:
        _write_entries(board, [e for e in read_entries(root) if e.get("id") != entry_id])


def predictions(entry_id: str, root: str | os.PathLike | None = None) -> pd.DataFrame:
    """The per-image table of one posted submission (image, y, probability, patient_id); empty when missing."""
    path = board_dir(root) / f"{Path(entry_id).name}.csv"
    if not path.is_file():
        return pd.DataFrame(columns=["image", "y", "probability", "patient_id"])
    return pd.read_csv(path)


def own_predictions(entry_id: str, who: str, role: str, root: str | os.PathLike | None = None) -> pd.DataFrame:
    """The per-image results of a submission for ``who``: the operator's always, a visitor's own once the
    operator has revealed them.

    Raises:
        SubmissionError: before the reveal, or for another person's submission.
    """
    if role != OPERATOR:
        if not classroom.read(root).revealed:
            raise SubmissionError("The per-image results stay hidden until the operator reveals them at the end.")
        entry = next((e for e in read_entries(root) if e.get("id") == entry_id), None)
        if entry is None or entry.get("owner") != owner_key(who):
            raise SubmissionError("You can see the per-image results of your own submissions only.")
    return predictions(entry_id, root)


# --- The board ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Standing:
    """One row of the board: the entry, its rank, its group letters and the paired tests behind them."""

    rank: int
    entry: dict
    group: str                    # letters: submissions sharing a letter cannot be told apart
    p_vs_leader: float | None     # DeLong p against #1 (None for #1, or when they cannot be compared)
    p_vs_above: float | None      # DeLong p against the one ranked just above
    tied_with_leader: bool


def posted(root: str | os.PathLike | None = None, test_set: str | None = None) -> list[dict]:
    """The posted submissions on ``test_set`` (default: the locked set now)."""
    wanted = classroom.locked_name(root) if test_set is None else test_set
    return [e for e in read_entries(root) if e.get("state") == POSTED and e.get("test_set") == wanted]


def _auc_key(entry: dict) -> tuple:
    auc = entry.get("roc_auc")
    return (auc is None, -(auc or 0.0), str(entry.get("submitted", "")))


def compare(a: pd.DataFrame, b: pd.DataFrame, threshold_a: float = 0.5, threshold_b: float = 0.5) -> dict | None:
    """``paired_comparison`` of two submissions on the images both scored; None when they cannot be compared."""
    merged = a.merge(b, on="image", suffixes=("_a", "_b"))
    merged = merged[merged["y_a"] == merged["y_b"]]
    if len(merged) < 10 or merged["y_a"].nunique() < 2:
        return None
    found = paired_comparison(merged["y_a"].to_numpy(), merged["probability_a"].to_numpy(),
                              merged["probability_b"].to_numpy(), threshold_a, threshold_b)
    return found if found.get("auc_p_value") is not None else None


def standings(entries: list[dict], tables: dict[str, pd.DataFrame], alpha: float = ALPHA) -> list[Standing]:
    """Rank ``entries`` by AUC and group them (see the module's notes). ``tables``: each entry's per-image table
    by id. Two submissions that cannot be compared (too few shared images) count as not told apart."""
    ordered = sorted(entries, key=_auc_key)
    cache: dict[tuple[str, str], float | None] = {}

    def p_value(a: dict, b: dict) -> float | None:
        key = (a["id"], b["id"])
        if key not in cache:
            empty = pd.DataFrame(columns=["image", "y", "probability"])
            found = compare(tables.get(a["id"], empty), tables.get(b["id"], empty),
                            float(a.get("threshold") or 0.5), float(b.get("threshold") or 0.5))
            cache[key] = cache[(b["id"], a["id"])] = None if found is None else float(found["auc_p_value"])
        return cache[key]

    def tied(a: dict, b: dict) -> bool:
        found = p_value(a, b)
        return found is None or found >= alpha

    heads: list[dict] = []
    for entry in ordered:
        if not any(tied(head, entry) for head in heads):
            heads.append(entry)
    letters = {head["id"]: _letter(i) for i, head in enumerate(heads)}
    rows = []
    for rank, entry in enumerate(ordered, start=1):
        group = "".join(letters[h["id"]] for h in heads if h is entry or tied(h, entry))
        leader = ordered[0]
        rows.append(Standing(
            rank=rank, entry=entry, group=group,
            p_vs_leader=None if entry is leader else p_value(leader, entry),
            p_vs_above=None if rank == 1 else p_value(ordered[rank - 2], entry),
            tied_with_leader=entry is leader or tied(leader, entry)))
    return rows


def _letter(index: int) -> str:
    return chr(ord("A") + index) if index < 26 else f"Z{index - 25}"


def board(root: str | os.PathLike | None = None) -> list[Standing]:
    """The standings of the locked test set now."""
    entries = posted(root)
    return standings(entries, {e["id"]: predictions(e["id"], root) for e in entries})


def _interval(entry: dict, name: str) -> tuple[float | None, float | None]:
    found = (entry.get("intervals") or {}).get(name)
    return (found[0], found[1]) if found else (None, None)


def board_rows(rows: list[Standing], me: str | None = None) -> list[dict]:
    """The board as plain rows (the page's table and the CSV): ``me`` is the viewer's id, whose rows say 'you'."""
    mine = owner_key(me) if me else None
    out = []
    for row in rows:
        e = row.entry
        who = "operator" if e.get("role") == OPERATOR else e.get("pseudonym", "")
        item: dict[str, Any] = {"rank": row.rank, "who": who,
                                "you": bool(mine) and e.get("owner") == mine, "run": e.get("run", "")}
        for name in FIGURES:
            low, high = _interval(e, name)
            item[name] = e.get(name)
            item[f"{name}_low"], item[f"{name}_high"] = low, high
        item.update(group=row.group, tied_with_leader=row.tied_with_leader, p_vs_leader=row.p_vs_leader,
                    p_vs_above=row.p_vs_above, threshold=e.get("threshold"), n=e.get("n"),
                    intervals_by=e.get("intervals_by"), submitted=e.get("submitted"), id=e.get("id"))
        out.append(item)
    return out


CSV_COLUMNS = ("rank", "who", "run", *(f"{n}{s}" for n in FIGURES for s in ("", "_low", "_high")), "group",
               "tied_with_leader", "p_vs_leader", "p_vs_above", "threshold", "n", "intervals_by", "submitted")


def board_csv(rows: list[Standing]) -> str:
    """The board as CSV (pseudonyms, never an address or a browser id), for the operator's records."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for item in board_rows(rows):
        writer.writerow({k: ("" if v is None else v) for k, v in item.items()})
    return buffer.getvalue()
