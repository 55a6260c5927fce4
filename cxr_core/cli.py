"""Command line: ``python -m cxr_core train | evaluate | predict | export | ensemble``.

Exit codes: 0 ok; 2 bad input (one sentence on stderr, no traceback); 3 training cancelled;
1 unexpected failure.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

# Quiet TensorFlow's C++ start-up chatter before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from cxr_core.core.backbones import BACKBONE_NAMES
from cxr_core.core.config import BALANCE_STRATEGIES, DISTRIBUTE_MODES, PRECISIONS, SCHEDULES, SPLIT_MODES, RunConfig
from cxr_core.core.errors import CxrError
from cxr_core.core.labels import TASKS, THRESHOLD_RULES
from cxr_core.core.recipes import RECIPE_NAMES, apply_recipe
from cxr_core.data import plan
from cxr_core.engine.distribute import LEARNING_RATE_RULE

log = logging.getLogger("cxr_core")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 3
ENGINES = ("auto", "litert", "keras")


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
    t.add_argument("--task", choices=TASKS,
                   help="pneumonia: NORMAL / PNEUMONIA (default); subtype: NORMAL / BACTERIA / VIRUS, read from the "
                        "file names (person1_bacteria_1.jpeg)")
    t.add_argument("--config", help="a config.json to start from (flags given on the command line override it)")
    t.add_argument("--recipe", choices=RECIPE_NAMES,
                   help="a named recipe that sets every training choice except the data, backbone, alpha and "
                        "weights (see benchmarks/ACCURACY.md); flags given explicitly override it")
    t.add_argument("--out", help="folder that holds run folders (default: $CXR_RUNS_DIR or artifacts/runs)")
    t.add_argument("--run-dir", help=argparse.SUPPRESS)
    # The background launcher (jobs.start_training) passes its one-job lock file; the process takes it first.
    t.add_argument("--lock-file", help=argparse.SUPPRESS)
    t.add_argument("--backbone", help=f"{', '.join(BACKBONE_NAMES)} (default {BACKBONE_NAMES[0]})")
    t.add_argument("--alpha", type=float, help="MobileNetV2 width multiplier (e.g. 0.35)")
    t.add_argument("--weights", help="imagenet (default), none, or a path to a weights file")
    t.add_argument("--image-size", type=int, help="input side in pixels (default: the backbone's)")
    t.add_argument("--dropout", type=float, help="dropout before the last layer (reference: 0.5)")
    t.add_argument("--epochs", type=int, help="epochs of the head phase on cached features (default 10)")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--learning-rate", type=float)
    t.add_argument("--balance", choices=BALANCE_STRATEGIES)
    t.add_argument("--split", choices=SPLIT_MODES)
    t.add_argument("--val-fraction", type=float)
    t.add_argument("--test-fraction", type=float)
    t.add_argument("--fine-tune-layers", type=int, help="unfreeze this many top backbone layers (-1 = all)")
    t.add_argument("--fine-tune-epochs", type=int)
    t.add_argument("--fine-tune-learning-rate", type=float)
    t.add_argument("--online-augment", action=argparse.BooleanOptionalAction, default=None,
                   help="augment training images anew every fine-tuning epoch")
    t.add_argument("--threshold-rule", choices=THRESHOLD_RULES)
    t.add_argument("--target-sensitivity", type=float)
    t.add_argument("--label-smoothing", type=float, help="pull training targets towards 0.5 by this much (0-0.5)")
    t.add_argument("--warmup-epochs", type=int, help="fine-tuning epochs of linear learning-rate warm-up")
    t.add_argument("--schedule", choices=SCHEDULES, help="fine-tuning learning rate: constant or cosine decay")
    t.add_argument("--fine-tune-batchnorm", action=argparse.BooleanOptionalAction, default=None,
                   help="let the unfrozen BatchNorm layers learn the X-rays' statistics while fine-tuning")
    t.add_argument("--weight-decay", type=float, help="decoupled weight decay while fine-tuning (AdamW); 0 = Adam")
    t.add_argument("--balance-by", metavar="COLUMN",
                   help="a manifest column (e.g. source_resolution) the model must not learn: training images are "
                        "weighted so that it tells nothing about the label")
    t.add_argument("--rotation-range", type=float, help="degrees (reference: 0.3)")
    t.add_argument("--shift", type=float, help="maximum width and height shift, as a fraction (reference: 0.05)")
    t.add_argument("--zoom", type=float, help="maximum zoom in or out, as a fraction")
    t.add_argument("--blur", type=float, help="robustness: maximum Gaussian blur sigma, in pixels")
    t.add_argument("--downscale", type=float, help="robustness: maximum loss of resolution, as a fraction")
    t.add_argument("--jpeg-quality", type=int, help="robustness: lowest JPEG re-compression quality (0 = off)")
    t.add_argument("--contrast", type=float, help="robustness: maximum change of contrast, as a fraction")
    t.add_argument("--gamma", type=float, help="robustness: maximum change of gamma (log of the exponent)")
    t.add_argument("--no-flip", action="store_true", help="no horizontal flips")
    t.add_argument("--limit", type=int, help="stratified subset of N images, for quick demos")
    t.add_argument("--seed", type=int, help="seed of split, augmentation and training (default 123)")
    t.add_argument("--cache-dir", help="feature cache (default: $CXR_CACHE_DIR or ~/.cache/cxr-workbench/features)")
    t.add_argument("--export-litert", action=argparse.BooleanOptionalAction, default=None,
                   help="also write model.tflite for TensorFlow-free prediction (default: yes)")
    t.add_argument("--distribute", choices=DISTRIBUTE_MODES,
                   help="auto (default): mirrored when more than one GPU is visible, else off; mirrored: one "
                        "replica per local GPU (or per --cpu-replicas CPU device); multi-worker: the machines "
                        "named by TF_CONFIG, each running this same command with the same --out and --cache-dir "
                        f"on shared storage. With several replicas, {LEARNING_RATE_RULE}")
    t.add_argument("--precision", choices=PRECISIONS,
                   help="auto (default): mixed float16 on GPUs of compute capability 7.0 or newer, else float32; "
                        "mixed needs a GPU (the logits stay float32)")
    t.add_argument("--cpu-replicas", type=int, metavar="N",
                   help="split the CPU into N logical devices so that mirrored trains N replicas (for teaching "
                        "and tests; no faster than one device)")

    e = sub.add_parser("evaluate", parents=[common],
                       help="metrics of a run over every image in a folder (one JSON object)")
    e.add_argument("--run", required=True, help="run folder")
    e.add_argument("--data", required=True, help="data set folder")
    e.add_argument("--threshold", type=float, help="override the run's chosen threshold")
    e.add_argument("--engine", choices=ENGINES, default="auto", help="LiteRT when the run has model.tflite (auto)")
    e.add_argument("--no-store", action="store_true",
                   help="do not remember the result in the run folder (evaluations/<data set name>.json)")

    p = sub.add_parser("predict", parents=[common], help="classify files (one JSON object per line)")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("files", nargs="+", help="JPEG, PNG, BMP, TIFF or DICOM files")
    p.add_argument("--gradcam", metavar="OUT_DIR",
                   help="write a Grad-CAM overlay PNG per file here (the evidence for the predicted class)")
    p.add_argument("--threshold", type=float, help="override the run's chosen threshold (pneumonia runs)")
    p.add_argument("--engine", choices=ENGINES, default="auto", help="LiteRT when the run has model.tflite (auto)")

    x = sub.add_parser("export", parents=[common],
                       help="write model.tflite (LiteRT) for a run, so the app predicts without TensorFlow")
    x.add_argument("--run", required=True, help="run folder")

    n = sub.add_parser("ensemble", parents=[common],
                       help="combine finished runs into one run (mean of their probabilities); prints its folder")
    n.add_argument("--runs", nargs="+", required=True, metavar="RUN",
                   help="two or more finished run folders with the same image size and split")
    n.add_argument("--out", help="the new run folder (default: a new folder under $CXR_RUNS_DIR or artifacts/runs)")
    n.add_argument("--threshold-rule", choices=THRESHOLD_RULES, help="default: the first run's rule")
    return parser


def build_config(args: argparse.Namespace) -> RunConfig:
    """A RunConfig from ``--config`` (if any) overridden by the flags given."""
    base = RunConfig()
    if args.config:
        from cxr_core.io.atomic import read_json  # noqa: PLC0415

        loaded = read_json(args.config, default=None)
        if loaded is None:
            raise CxrError(f"{args.config} is not a readable config.json.")
        base = RunConfig.from_dict(loaded)
    if args.recipe:
        base = apply_recipe(base, args.recipe)

    def pick(section, **values):
        given = {k: v for k, v in values.items() if v is not None}
        return type(section)(**{**section.__dict__, **given})

    data_dir = args.data if args.data is not None else base.data.data_dir
    if not data_dir:
        raise CxrError("No data set given; pass --data with a folder of chest X-rays.")
    try:
        data = pick(base.data, data_dir=str(Path(data_dir).expanduser().resolve()), split=args.split, seed=args.seed,
                    val_fraction=args.val_fraction, test_fraction=args.test_fraction, limit=args.limit,
                    task=args.task)
        augment = pick(base.augment, rotation_range=args.rotation_range,
                       horizontal_flip=False if args.no_flip else None, width_shift=args.shift,
                       height_shift=args.shift, zoom=args.zoom, blur=args.blur, downscale=args.downscale,
                       jpeg_quality=args.jpeg_quality, contrast=args.contrast, gamma=args.gamma)
        weights = args.weights
        if weights and weights.lower() not in ("imagenet", "none"):
            # checked with the other starting conditions in plan.preflight
            weights = str(Path(weights).expanduser().resolve())
        elif weights:
            weights = weights.lower()
        model = pick(base.model, backbone=args.backbone, alpha=args.alpha, weights=weights,
                     image_size=args.image_size, dropout=args.dropout)
        train = pick(base.train, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                     balance=args.balance, fine_tune_layers=args.fine_tune_layers,
                     fine_tune_epochs=args.fine_tune_epochs, fine_tune_learning_rate=args.fine_tune_learning_rate,
                     online_augment=args.online_augment, threshold_rule=args.threshold_rule,
                     target_sensitivity=args.target_sensitivity, seed=args.seed, cache_dir=args.cache_dir,
                     export_litert=args.export_litert, label_smoothing=args.label_smoothing,
                     warmup_epochs=args.warmup_epochs, schedule=args.schedule, balance_by=args.balance_by,
                     fine_tune_batchnorm=args.fine_tune_batchnorm, weight_decay=args.weight_decay,
                     distribute=args.distribute, precision=args.precision, cpu_replicas=args.cpu_replicas)
    except CxrError:
        raise
    except (TypeError, ValueError) as error:  # a section rejected a combination the flags allowed
        raise CxrError(str(error)) from error
    return RunConfig(data=data, augment=augment, model=model, train=train)


def _cmd_train(args: argparse.Namespace) -> int:
    if args.lock_file:
        if not args.run_dir:
            raise CxrError("--lock-file is for the background launcher and needs --run-dir.")
        from cxr_core.hosting import jobs  # noqa: PLC0415 - light; taken before TensorFlow loads, so the launcher waits little

        jobs.hold_training_lock(args.lock_file, args.run_dir)  # held until this process exits
    from cxr_core.engine import distribute, train  # noqa: PLC0415
    from cxr_core.runs import heartbeat, registry as runs  # noqa: PLC0415

    config = build_config(args)
    # Before anything else touches TensorFlow: the logical CPU devices and the strategy come first.
    try:
        runtime = distribute.setup(config.train.distribute, config.train.precision, config.train.cpu_replicas)
    except CxrError as error:
        if args.run_dir:  # the launcher's folder says why
            from cxr_core.runs.run_folder import RunFolder  # noqa: PLC0415

            RunFolder(args.run_dir).write_status("failed", message=str(error), error=str(error))
        raise
    if args.run_dir is None:
        # Before a run folder exists: a run that cannot start is one sentence and exit 2, nothing written.
        # (With --run-dir, train() makes the same checks and marks that folder failed with the sentence.)
        plan.preflight(config)
    stop = {"now": False}

    def on_signal(signum, frame):  # noqa: ARG001
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    run_dir = args.run_dir
    if run_dir is None and runtime.is_chief:  # the other workers of a multi-worker run write no run folder
        root = Path(args.out) if args.out else runs.runs_root().path
        run_dir = runs.new_run_dir(root, hint=f"{config.model.backbone}-{config.data.split}")

    def on_progress(event: dict) -> None:
        if args.verbose and event["event"] in ("stage", "epoch", "done", "failed", "cancelled"):
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
    state = runs.read_status(run_dir)["state"]
    print(run_dir)
    if state == "cancelled":
        print(f"Training was cancelled; {run_dir} is marked cancelled.", file=sys.stderr)
        return EXIT_CANCELLED
    return EXIT_OK


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cxr_core.evaluation.external import evaluate_folder  # noqa: PLC0415

    result = evaluate_folder(args.run, args.data, threshold=args.threshold, engine=args.engine,
                             store=not args.no_store)
    if result.get("warning"):
        print(f"warning: {result['warning']}", file=sys.stderr)
    print(json.dumps(result, default=_json_default))
    return EXIT_OK


def _cmd_predict(args: argparse.Namespace) -> int:
    from cxr_core.inference.predictor import Predictor, overlay_heatmap  # noqa: PLC0415

    predictor = Predictor.from_run(args.run, engine=args.engine)
    if args.threshold is not None:
        if predictor.multiclass:
            raise CxrError(f"The run {args.run} is a {predictor.task} run, which labels each image with its most "
                           "probable class, so --threshold does not apply to it.")
        predictor.threshold = args.threshold
    out_dir = Path(args.gradcam) if args.gradcam else None
    any_error = False
    for result in predictor.predict_files(args.files):
        if "error" in result:
            any_error = True
        elif out_dir is not None:
            result.update(_write_gradcam(predictor, result["file"], out_dir, overlay_heatmap))
        print(json.dumps(result, default=_json_default), flush=True)
    return EXIT_BAD_INPUT if any_error else EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from cxr_core.engine.litert import export_run, lite_status  # noqa: PLC0415

    path = export_run(args.run)
    print(path)
    reason = lite_status(args.run)
    if reason is not None:  # written, but this machine cannot run it
        print(f"note: {path} was written, but it will not be used here because {reason}.", file=sys.stderr)
    return EXIT_OK


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from cxr_core.evaluation.ensemble import make_ensemble  # noqa: PLC0415

    print(make_ensemble(args.runs, out_dir=args.out, threshold_rule=args.threshold_rule))
    return EXIT_OK


def _write_gradcam(predictor, file: str, out_dir: Path, overlay_heatmap) -> dict:
    """Write the overlay of the evidence for the predicted class; the fields it adds to the result."""
    import cv2  # noqa: PLC0415

    from cxr_core.io.atomic import write_bytes_atomic  # noqa: PLC0415
    from cxr_core.io.images import load_gray  # noqa: PLC0415

    gray = load_gray(file)
    found = predictor.explanation(gray)
    overlay = overlay_heatmap(gray, found.heatmap)
    ok, png = cv2.imencode(".png", cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
    target = out_dir / (Path(file).stem + ".gradcam.png")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(target, png.tobytes())
    return {"gradcam": str(target), "gradcam_explains": found.target, "gradcam_empty": found.empty,
            "gradcam_caption": found.caption}


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    handlers = {"train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict,
                "export": _cmd_export, "ensemble": _cmd_ensemble}
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
