"""Train the product's named recipes and score them on an external test set.

    python -m benchmarks.recipes --recipe best --data ../shared/data/kermany224 \
        --test ../shared/data/kermany224-test-dev --backbone mobilenet_v2 --alpha 0.35 \
        --weights ../shared/weights/mobilenet_v2_0.35_224_no_top_imagenet.weights.h5
    python -m benchmarks.recipes --score RUN_DIR --test ../shared/data/kermany224-test-dev

Each recipe runs through the command line exactly as a user would (``python -m cxr_core train
--recipe NAME``), then ``evaluate`` on the test set, which the run never sees while training or
choosing its threshold. One JSON line per run is appended to benchmarks/results/recipes.jsonl:
training time, validation AUC, and the test set's AUC, accuracy, sensitivity and specificity at the
run's threshold and at 0.5.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "recipes.jsonl"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr_core", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False)


def score(run_dir: Path, test: Path, seconds: float | None = None, command: str = "") -> dict:
    """The figures of one finished run on ``test`` (the evaluation is stored with the run)."""
    from cxr_core.runs.run_folder import RunFolder

    result = _cli("evaluate", "--run", str(run_dir), "--data", str(test))
    if result.returncode != 0:
        raise SystemExit(f"evaluate failed: {result.stderr.strip()}")
    ext = json.loads(result.stdout.strip().splitlines()[-1])
    folder = RunFolder(run_dir)
    metrics = folder.read_metrics() or {}
    config = folder.read_config()
    status = json.loads((run_dir / "status.json").read_text())

    def pick(m: dict) -> dict:
        return {k: round(float(m[k]), 4) for k in ("roc_auc", "accuracy", "sensitivity", "specificity")}

    return {
        "run": str(run_dir), "recipe": config.train.recipe, "command": command,
        "backbone": config.model.backbone, "alpha": config.model.alpha, "image_size": config.model.image_size,
        "weights": Path(config.model.weights).name, "train_seconds": seconds or status.get("duration_s"),
        "val_auc": round(float((metrics.get("val") or {}).get("roc_auc") or float("nan")), 4),
        "internal_test_auc": round(float(((metrics.get("test") or {}).get("at_threshold") or {}).get("roc_auc")
                                         or float("nan")), 4),
        "threshold": round(float(ext["threshold"]), 4),
        "external": {"data": Path(test).name, "n": ext["n"], "at_threshold": pick(ext), "at_0.5": pick(ext["at_0.5"])},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", help="a recipe name (python -m cxr_core train --recipe NAME)")
    parser.add_argument("--score", type=Path, help="score an already trained run folder instead")
    parser.add_argument("--data", type=Path, help="training data set")
    parser.add_argument("--test", type=Path, required=True, help="external test set (never trained on)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/recipe-runs"))
    # Any other flag (--backbone, --alpha, --weights, ...) goes to ``train`` as it is.
    args, extra = parser.parse_known_args(argv)
    if args.score:
        row = score(args.score, args.test)
    else:
        if not args.recipe or not args.data:
            parser.error("--recipe and --data are needed to train")
        flags = ["train", "--data", str(args.data), "--recipe", args.recipe, "--out", str(args.out), *extra]
        started = time.time()
        result = _cli(*flags)
        if result.returncode != 0:
            raise SystemExit(f"train failed: {result.stderr.strip()[-2000:]}")
        run_dir = Path(result.stdout.strip().splitlines()[-1])
        row = score(run_dir, args.test, time.time() - started, "python -m cxr_core " + " ".join(flags))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
