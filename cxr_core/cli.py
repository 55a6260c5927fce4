"""Command line: ``python -m cxr_core train | evaluate | predict | export | ensemble``; ``worker`` is the
resident training worker a served app starts (``cxr_core.hosting.workers``).

Exit codes: 0 ok; 2 bad input (one sentence on stderr, no traceback); 3 training cancelled;
1 unexpected failure.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path

# Quiet TensorFlow's C++ start-up chatter before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2

from cxr_core.core import settings
from cxr_core.core.config import CALIBRATIONS, TTA_MODES, RunConfig
from cxr_core.core.errors import CxrError
from cxr_core.core.labels import THRESHOLD_RULES
from cxr_core.core.recipes import RECIPE_NAMES, apply_recipe
from cxr_core.data import plan
from cxr_core.data.shortcut_lab import make_shortcut_lab
from cxr_core.engine.litert import lite_status
from cxr_core.hosting import jobs
from cxr_core.inference.predictor import ENGINES, Predictor, overlay_heatmap
from cxr_core.io.atomic import json_default, read_json, write_bytes_atomic
from cxr_core.io.images import load_gray
from cxr_core.runs import heartbeat, registry as runs
from cxr_core.runs.run_folder import RunFolder, RunState
from cxr_core.teaching import lessons

log = logging.getLogger("cxr_core")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 3


TTA_HELP = ("average a few fixed views of each image (shifts, a small zoom), or not (--no-tta); by default as "
            "the run chose when it trained")


def _add_calibrate(sub, common: argparse.ArgumentParser) -> None:
    c = sub.add_parser("calibrate", parents=[common],
                       help="calibrate a finished run's probabilities on its validation predictions and apply it to "
                            "its files (for runs trained before calibration existed); prints the calibration")
    c.add_argument("--run", required=True, help="run folder")
    c.add_argument("--method", choices=CALIBRATIONS, default="temperature", help="temperature (default), platt or "
                   "none (takes the calibration off)")
    c.add_argument("--tta", choices=TTA_MODES, default=None,
                   help="also choose the test-time views on the validation images (auto: keep them when they raise "
                        "the validation AUC; on; off), refit the calibration and choose the threshold again")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cxr_core", description="Chest X-ray pneumonia workbench.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    # -v is accepted after the sub-command too.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", parents=[common], help="train a classifier; prints the run folder as its last line")
    t.add_argument("--data", help="data set folder (Kermany layout or NORMAL/PNEUMONIA folders)")
    t.add_argument("--config", help="a config.json to start from (flags given on the command line override it)")
    t.add_argument("--recipe", choices=RECIPE_NAMES,
                   help="a named recipe that sets every training choice except the data, backbone, alpha and "
                        "weights (see benchmarks/ACCURACY.md); flags given explicitly override it")
    t.add_argument("--out", help="folder that holds run folders (default: $CXR_RUNS_DIR or artifacts/runs)")
    t.add_argument("--run-dir", help=argparse.SUPPRESS)
    # The background launcher (jobs.start_training) passes its one-job lock file; the process takes it first.
    t.add_argument("--lock-file", help=argparse.SUPPRESS)
    for row in settings.cli_rows():  # every setting of a run: one row each in cxr_core.core.settings
        t.add_argument(row.flag, **row.argparse_kwargs())

    e = sub.add_parser("evaluate", parents=[common],
                       help="metrics of a run over every image in a folder (one JSON object)")
    e.add_argument("--run", required=True, help="run folder")
    e.add_argument("--data", required=True, help="data set folder")
    e.add_argument("--threshold", type=float, help="override the run's chosen threshold")
    e.add_argument("--engine", choices=ENGINES, default="auto", help="LiteRT when the run has model.tflite (auto)")
    e.add_argument("--tta", action=argparse.BooleanOptionalAction, help=TTA_HELP)
    e.add_argument("--no-store", action="store_true",
                   help="do not remember the result in the run folder (evaluations/<data set name>.json)")

    p = sub.add_parser("predict", parents=[common], help="classify files (one JSON object per line)")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("files", nargs="+", help="JPEG, PNG, BMP, TIFF or DICOM files")
    p.add_argument("--gradcam", metavar="OUT_DIR",
                   help="write a Grad-CAM overlay PNG per file here (the evidence for the predicted class)")
    p.add_argument("--threshold", type=float, help="override the run's chosen threshold (pneumonia runs)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, help=TTA_HELP)
    p.add_argument("--engine", choices=ENGINES, default="auto", help="LiteRT when the run has model.tflite (auto)")

    x = sub.add_parser("export", parents=[common],
                       help="write model.tflite (LiteRT) for a run, so the app predicts without TensorFlow")
    x.add_argument("--run", required=True, help="run folder")

    _add_calibrate(sub, common)

    n = sub.add_parser("ensemble", parents=[common],
                       help="combine finished runs into one run (mean of their probabilities); prints its folder")
    n.add_argument("--runs", nargs="+", required=True, metavar="RUN",
                   help="two or more finished run folders with the same image size and split")
    n.add_argument("--out", help="the new run folder (default: a new folder under $CXR_RUNS_DIR or artifacts/runs)")
    n.add_argument("--threshold-rule", choices=THRESHOLD_RULES, help="default: the first run's rule")

    lab = sub.add_parser("shortcut-lab", parents=[common],
                         help="copy a data set with a marker burnt into most PNEUMONIA and a few NORMAL images, "
                              "to teach shortcut learning; prints the new data set's folder as its last line")
    lab.add_argument("--data", required=True, help="data set folder to copy (Kermany layout or class folders)")
    lab.add_argument("--out", required=True, help="the new data set's folder (new or empty, outside --data)")
    lab.add_argument("--positive-rate", type=float, default=0.9, help="share of PNEUMONIA images marked (0.9)")
    lab.add_argument("--negative-rate", type=float, default=0.1, help="share of NORMAL images marked (0.1)")
    lab.add_argument("--seed", type=int, default=123, help="seed of which images are marked and where (123)")

    _add_worker(sub, common)

    nb = sub.add_parser("lesson-notebook", parents=[common],
                        help="write a lesson of lessons/ as a Jupyter notebook that runs its experiments with the "
                             "library")
    nb.add_argument("lesson", metavar="NAME", help="the lesson's id (e.g. leakage) or its Markdown file")
    nb.add_argument("--out", required=True, help="the notebook file to write (.ipynb)")
    nb.add_argument("--data", required=True, help="the data set to train on")
    nb.add_argument("--external", help="the external test set (default: another data set beside --data, one whose "
                                       "name says test when there is one)")
    nb.add_argument("--runs", help="where the notebook's runs go (default: lesson-runs/<lesson> beside the data "
                                   "folder)")
    nb.add_argument("--weights", help="starting weights file for every run (default: the lesson's, ImageNet)")
    return parser


def _add_worker(sub, common: argparse.ArgumentParser) -> None:
    w = sub.add_parser("worker", parents=[common],
                       help="a resident training worker: keeps TensorFlow loaded and trains the jobs a served app "
                            "hands to its slot, one after another (started by the app's pool)")
    w.add_argument("--root", required=True, help="the runs root whose jobs it serves")
    w.add_argument("--slot", required=True, type=int, help="the training slot it serves (0, 1, ...)")
    w.add_argument("--parent", type=int, help="the pid of the server that started it: it ends once that is gone")


def build_config(args: argparse.Namespace) -> RunConfig:
    """A RunConfig from ``--config`` (if any) and ``--recipe`` (if any), overridden by the flags given."""
    base = RunConfig()
    if args.config:
        loaded = read_json(args.config, default=None)
        if loaded is None:
            raise CxrError(f"{args.config} is not a readable config.json.")
        base = RunConfig.from_dict(loaded)
    if args.recipe:
        base = apply_recipe(base, args.recipe)
    data_dir = args.data if args.data is not None else base.data.data_dir
    if not data_dir:
        raise CxrError("No data set given; pass --data with a folder of chest X-rays.")
    data = dataclasses.replace(base.data, data_dir=str(Path(data_dir).expanduser().resolve()))
    return settings.config_from_values(dataclasses.replace(base, data=data), settings.values_from_args(args))


def _cmd_train(args: argparse.Namespace, resident: dict | None = None) -> int:
    """``train``; in a resident worker too, with ``resident`` the fields that name the worker and the job
    in the run's status (the worker lets go of the slot's lock after the job)."""
    if args.lock_file:
        if not args.run_dir:
            raise CxrError("--lock-file is for the background launcher and needs --run-dir.")
        # Taken before TensorFlow loads, so the launcher waits little.
        jobs.hold_training_lock(args.lock_file, args.run_dir, **(resident or {}))  # held until this process exits
    from cxr_core.engine import distribute, train  # noqa: PLC0415 (they import TensorFlow: only training needs it)

    config = build_config(args)
    # Before anything else touches TensorFlow: the logical CPU devices and the strategy come first.
    try:
        runtime = distribute.setup(config.train.distribute, config.train.precision, config.train.cpu_replicas)
    except CxrError as error:
        if args.run_dir:  # the launcher's folder says why
            RunFolder(args.run_dir).write_status(RunState.FAILED, message=str(error), error=str(error),
                                                 **(resident or {}))
        raise
    if resident:
        # Every status.json the run writes keeps naming the worker and the job (see runs.run_status).
        where = runtime.fields
        runtime.fields = lambda: {**where(), **resident}
    if args.run_dir is None:
        # Before a run folder exists: a run that cannot start is one sentence and exit 2, nothing written.
        # (With --run-dir, train() makes the same checks and marks that folder failed with the sentence.)
        plan.preflight(config)
    stop = {"now": False}

    def on_signal(signum, frame):  # noqa: ARG001
        stop["now"] = True

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _train_and_report(args, config, runtime, train, stop)
    finally:
        for signum, handler in previous.items():  # a resident worker outlives the job
            signal.signal(signum, handler)


def _train_and_report(args: argparse.Namespace, config: RunConfig, runtime, train, stop: dict) -> int:
    run_dir = args.run_dir
    if run_dir is None and runtime.is_chief:  # the other workers of a multi-worker run write no run folder
        root = Path(args.out) if args.out else runs.runs_root().path
        run_dir = runs.new_run_dir(root, hint=f"{config.model.backbone}-{config.data.split}")

    def on_progress(event: dict) -> None:
        ended = RunState.parse(event["event"])
        if args.verbose and (event["event"] in ("stage", "epoch") or (ended is not None and ended.is_finished)):
            text = event.get("message") or json.dumps(event.get("logs", {}))
            print(f"[{event['event']}] {event.get('stage', '')} {text}", file=sys.stderr, flush=True)

    if not runtime.is_chief:
        train.train(config, should_stop=lambda: stop["now"], on_progress=on_progress, runtime=runtime)
        if stop["now"]:
            print("Training was cancelled on this worker.", file=sys.stderr)
            return EXIT_CANCELLED
        print(f"Worker {runtime.worker_index} of {runtime.workers} is done; the chief writes the run folder.",
              file=sys.stderr)
        return EXIT_OK
    with heartbeat.beating(run_dir):
        run_dir = train.train(config, should_stop=lambda: stop["now"], on_progress=on_progress, run_dir=run_dir,
                              runtime=runtime)
    state = runs.run_status(run_dir).state
    print(run_dir)
    if state is RunState.CANCELLED:
        print(f"Training was cancelled; {run_dir} is marked cancelled.", file=sys.stderr)
        return EXIT_CANCELLED
    return EXIT_OK


def _cmd_worker(args: argparse.Namespace) -> int:
    from cxr_core.hosting import workers  # noqa: PLC0415 (only the worker needs it)

    verbose = bool(getattr(args, "verbose", False))

    def run_job(job: dict, resident: dict) -> int:
        """One job, exactly as ``train --run-dir --lock-file`` runs it, ended with the same exit codes."""
        folder = RunFolder(job["run_dir"])
        train_args = _parser().parse_args(["train", "--config", str(folder.config_path), "--run-dir", str(folder.path),
                                           "--lock-file", job["lock_file"]])
        train_args.verbose = verbose
        started = time.time()
        try:
            return _cmd_train(train_args, resident=resident)
        except CxrError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except Exception as error:  # the run is marked failed by train(); the worker serves the next job
            log.debug("failed after %.1f s", time.time() - started, exc_info=True)
            print(f"unexpected failure: {type(error).__name__}: {error} (run with -v for details)", file=sys.stderr)
            return EXIT_FAILURE
        finally:
            jobs.release_training_lock(job["lock_file"])

    return workers.serve(args.root, args.slot, run_job, parent=args.parent)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cxr_core.evaluation.external import evaluate_folder  # noqa: PLC0415 (metrics import scikit-learn: 1.5 s)

    result = evaluate_folder(args.run, args.data, threshold=args.threshold, engine=args.engine, tta=args.tta,
                             store=not args.no_store)
    if result.get("warning"):
        print(f"warning: {result['warning']}", file=sys.stderr)
    print(json.dumps(result, default=_json_default))
    return EXIT_OK


def _cmd_predict(args: argparse.Namespace) -> int:
    predictor = Predictor.from_run(args.run, engine=args.engine, tta=args.tta)
    if args.threshold is not None:
        if not predictor.task.uses_threshold:
            raise CxrError(f"The run {args.run} is a {predictor.task.name} run, which labels each image with its "
                           "most probable class, so --threshold does not apply to it.")
        predictor.threshold = args.threshold
    out_dir = Path(args.gradcam) if args.gradcam else None
    any_error = False
    for result in predictor.predict_files(args.files):
        if "error" in result:
            any_error = True
        elif out_dir is not None:
            result.update(_write_gradcam(predictor, result["file"], out_dir))
        print(json.dumps(result, default=_json_default), flush=True)
    return EXIT_BAD_INPUT if any_error else EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from cxr_core.engine.export import export_run  # noqa: PLC0415 (it imports TensorFlow: only this command needs it)

    path = export_run(args.run)
    print(path)
    reason = lite_status(args.run)
    if reason is not None:  # written, but this machine cannot run it
        print(f"note: {path} was written, but it will not be used here because {reason}.", file=sys.stderr)
    return EXIT_OK


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from cxr_core.evaluation.recalibrate import recalibrate_run  # noqa: PLC0415 (scikit-learn and scipy: 1.5 s)

    if args.tta is not None:
        from cxr_core.evaluation.recalibrate import choose_views_after  # noqa: PLC0415

        choose_views_after(args.run, args.tta)
    else:
        recalibrate_run(args.run, args.method)
    stored = RunFolder(args.run).read_metrics() or {}
    record = stored.get("calibration") or {}
    print(json.dumps({**record, "tta": stored["tta"]} if args.tta is not None else record), flush=True)
    return EXIT_OK


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from cxr_core.evaluation.ensemble import make_ensemble  # noqa: PLC0415 (metrics import scikit-learn: 1.5 s)

    print(make_ensemble(args.runs, out_dir=args.out, threshold_rule=args.threshold_rule))
    return EXIT_OK


def _cmd_shortcut_lab(args: argparse.Namespace) -> int:
    lab = make_shortcut_lab(args.data, args.out, positive_rate=args.positive_rate,
                            negative_rate=args.negative_rate, seed=args.seed)
    for path, reason in zip(lab.skipped["path"], lab.skipped["reason"]):
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"Marked {lab.marked['PNEUMONIA']} of {lab.counts['PNEUMONIA']} PNEUMONIA and {lab.marked['NORMAL']} of "
          f"{lab.counts['NORMAL']} NORMAL images.", file=sys.stderr)
    print(lab.folder)
    return EXIT_OK


def _cmd_lesson_notebook(args: argparse.Namespace) -> int:
    from cxr_core.teaching import notebook  # noqa: PLC0415 (it imports scikit-learn through the metrics: 2 s)

    found = lessons.load_lessons()
    lesson = lessons.read_lesson(args.lesson) if Path(args.lesson).suffix == ".md" else found.get(args.lesson)
    if lesson is None:
        known = ", ".join(item.id for item in found.lessons)
        raise CxrError(f"There is no lesson {args.lesson!r}; choose one of {known}, or give a lesson's .md file.")
    print(notebook.write_lesson_notebook(lesson, args.out, args.data, args.external, args.runs, args.weights))
    return EXIT_OK


def _write_gradcam(predictor: Predictor, file: str, out_dir: Path) -> dict:
    """Write the overlay of the evidence for the predicted class; the fields it adds to the result."""
    gray = load_gray(file)
    (found,) = predictor.explain([gray])
    overlay = overlay_heatmap(gray, found.heatmap)
    ok, png = cv2.imencode(".png", cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
    target = out_dir / (Path(file).stem + ".gradcam.png")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(target, png.tobytes())
    return {"gradcam": str(target), "gradcam_explains": found.target, "gradcam_empty": found.empty,
            "gradcam_caption": found.caption}


def _json_default(obj):
    """The conversions of the run files' JSON (numpy, paths, sets); anything else as its text, so that an answer
    is always printed."""
    try:
        return json_default(obj)
    except TypeError:
        return str(obj)


class _PlainFormatter(logging.Formatter):
    """Log lines for a person: a message without the traceback it may carry (ours or a library's)."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record) + (" (run with -v for details)" if saved[0] else "")
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _configure_logging(verbose: bool) -> None:
    """Warnings on stderr, progress too with -v; tracebacks only with -v."""
    handler = logging.StreamHandler()
    fmt = "%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt) if verbose else _PlainFormatter(fmt))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    # pydicom logs each of its warnings (one line, above) and also issues it as a Python warning,
    # which would print again with its source file and line.
    warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose)
    handlers = {"train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict,
                "export": _cmd_export, "calibrate": _cmd_calibrate, "ensemble": _cmd_ensemble,
                "shortcut-lab": _cmd_shortcut_lab, "lesson-notebook": _cmd_lesson_notebook,
                "worker": _cmd_worker}
    started = time.time()
    try:
        return handlers[args.command](args)
    except CxrError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as error:  # unexpected: keep the traceback in the log, one line for the person
        log.debug("failed after %.1f s", time.time() - started, exc_info=True)
        print(f"unexpected failure: {type(error).__name__}: {error} (run with -v for details)", file=sys.stderr)
        if args.verbose:
            raise
        return EXIT_FAILURE
