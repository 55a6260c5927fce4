"""The figures a learner sees in each lesson, measured on the real data, with each training step's time.

    python -m benchmarks.lessons --data ../shared/data/kermany224 \
        --test ../shared/data/kermany224-test-dev \
        --weights ../shared/weights/mobilenet_v2_0.35_224_no_top_imagenet.weights.h5 [--out DIR]

Every training step of the lessons that train runs here through the command line, as the Training page
starts it (the quick recipe, MobileNetV2-0.35), then ``evaluate`` on the external test set. It prints one
JSON line per step (the run's settings, its training time, its own test part's AUC, sensitivity and
specificity, the external set's) and, for the threshold lesson, what a screening threshold (95 %
sensitivity on validation) costs in specificity on the external set. The external set only scores
runs here; nothing is chosen on it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--recipe", "quick", "--backbone", "mobilenet_v2", "--alpha", "0.35"]
#: lesson -> step -> the flags that step's action sets beyond the quick recipe.
STEPS = {
    "leakage": {"patient split": ["--split", "patient"], "random split": ["--split", "random"]},
    "imbalance-threshold": {"no balancing": ["--balance", "none"], "class weights": ["--balance", "class_weight"],
                            "augmented NORMAL": ["--balance", "augment"]},
    # The quick recipe has no flips and the command line cannot turn them back on over a recipe, so the
    # lesson's first run (with flips) is the Training page's; here the quick recipe's mild augmentation.
    "augmentation": {"quick recipe's augmentation": ["--balance", "augment"],
                     "realistic, no flips": ["--balance", "augment", "--no-flip", "--rotation-range", "7",
                                             "--shift", "0.08", "--zoom", "0.25", "--contrast", "0.3",
                                             "--gamma", "0.35"]},
}


def _cli(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "cxr_core", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"python -m cxr_core {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    return done


def _screening(run: Path, external: pd.DataFrame) -> dict:
    """The highest threshold keeping 95 % sensitivity on the run's validation part, and what it gives
    on the external set (sensitivity, specificity)."""
    predictions = pd.read_csv(run / "predictions.csv")
    val = predictions[predictions["split"] == "val"]
    positives = np.sort(val.loc[val["y"] == 1, "probability"].to_numpy())
    threshold = float(positives[int(np.floor(0.05 * len(positives)))])
    y, p = external["y"].to_numpy(), external["probability"].to_numpy()
    return {"threshold": round(threshold, 4), "sensitivity": round(float((p[y == 1] >= threshold).mean()), 3),
            "specificity": round(float((p[y == 0] < threshold).mean()), 3)}


def step(data: Path, test: Path, weights: Path, out: Path, flags: list[str]) -> dict:
    started = time.time()
    run = Path(_cli("train", "--data", str(data), "--weights", str(weights), "--out", str(out), *QUICK,
                    *flags).stdout.strip().splitlines()[-1])
    seconds = time.time() - started
    ext = json.loads(_cli("evaluate", "--run", str(run), "--data", str(test)).stdout.strip().splitlines()[-1])
    own = json.loads((run / "metrics.json").read_text())["test"]["at_threshold"]
    external = pd.read_csv(next((run / "evaluations").glob("*.csv")))
    return {"flags": flags, "train_s": round(seconds, 1),
            "own": {k: round(own[k], 3) for k in ("roc_auc", "sensitivity", "specificity")},
            "external": {k: round(ext[k], 3) for k in ("roc_auc", "accuracy", "sensitivity", "specificity")},
            "screening_on_external": _screening(run, external)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--lesson", choices=list(STEPS), action="append")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="cxr-lessons-"))
    for lesson in args.lesson or list(STEPS):
        for name, flags in STEPS[lesson].items():
            print(json.dumps({"lesson": lesson, "step": name, **step(args.data, args.test, args.weights, out, flags)}),
                  flush=True)


if __name__ == "__main__":
    main()
