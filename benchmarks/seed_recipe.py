"""The notebook this product starts from, scored honestly: its recipe exactly, on the official test set.

The reference notebook: InceptionV3 frozen at 299 px + GlobalAveragePooling + Dropout(0.5) + Dense(1),
10 epochs of Adam(1e-3) at batch 32, a random 8:1:1 split by image with seed 123, the training part
balanced with augmented NORMAL images, and the label PNEUMONIA at a probability of 0.5. It loads
``weights="imagenet"``, which needs the internet (or Keras' cache) the first time.

    .venv/bin/python -m benchmarks.seed_recipe --data ../shared/data/kermany224 \
        --test ../shared/data/kermany224-test-dev [--weights PATH|none] [--out DIR]

``--weights none`` is what the notebook gets on a machine without the ImageNet file and without the
internet once its download is taken out: the frozen backbone keeps random weights. The product refuses
that run in one sentence (``plan.check_can_learn``: a frozen random backbone cannot learn), so this script
lifts that one check for its own run, to measure what the notebook would have scored. A frozen backbone
computes the same features every epoch, so the product's cached features give the notebook's numbers
(benchmarks/ACCURACY.md compares the two ways on MobileNetV2).

Prints one JSON line: the test set's AUC, and accuracy, sensitivity and specificity at 0.5 (the
notebook's rule) and at the threshold the product chooses on validation, with 95 % intervals.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--weights", default="none", help="imagenet, none or a weights file (default: none)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from cxr_core import cli
    from cxr_core.data import plan
    from cxr_core.evaluation.external import evaluate_folder

    # The one check lifted: a frozen random backbone is what the notebook trains without ImageNet weights.
    plan.check_can_learn = lambda *_args, **_kwargs: None
    out = args.out or Path(tempfile.mkdtemp(prefix="cxr-seed-"))
    started = time.perf_counter()
    code = cli.main(["train", "--recipe", "reference", "--data", str(args.data), "--backbone", "inception_v3",
                     "--image-size", "299", "--weights", args.weights, "--out", str(out)])
    if code != 0:
        return code
    train_s = time.perf_counter() - started
    run = max((p for p in out.iterdir() if (p / "metrics.json").is_file()), key=lambda p: p.stat().st_mtime)
    result = {"run": str(run), "weights": args.weights, "train_s": round(train_s, 1)}
    for name, threshold in (("at_0.5", 0.5), ("at_own_threshold", None)):
        found = evaluate_folder(run, args.test, threshold=threshold, store=False)
        result[name] = {key: found.get(key) for key in ("threshold", "roc_auc", "accuracy", "sensitivity",
                                                         "specificity", "intervals", "n")}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
