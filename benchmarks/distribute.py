"""Fine-tuning throughput under tf.distribute, and the input pipeline alone.

    python -m benchmarks.distribute [--data ../shared/data/kermany224] [--limit 400] [--batch 32]

1. Pipeline alone: images per second that the fine-tuning input delivers to a trivial model
   (decode + resize to 224 px), as the project's PyDataset (``train.ImageBatches``, two worker
   threads) against a tf.data pipeline over the same decode function (parallel map, AUTOTUNE
   prefetch). The faster one feeds training.
2. Fine-tuning MobileNetV2-0.35 at 224 px (ImageNet weights from ../shared) through the real CLI,
   ``--epochs 0 --fine-tune-epochs 2``: ``--distribute off`` with batch B against
   ``--distribute mirrored --cpu-replicas 2`` with B/2 per replica (the same global batch). Images per
   second come from the second epoch's time in history.csv (the first one traces the step), and per
   replica is that divided by the replicas.

Prints one JSON object and writes it to benchmarks/results/distribute-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))
SHARED = PROJECT_ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_0.35_224_no_top_imagenet.weights.h5"


def pipeline(data: Path, limit: int, batch: int) -> dict:
    """Images per second of each input pipeline feeding a trivial model (the decode is the cost)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from cxr_core.core.config import DataConfig, ModelConfig, RunConfig
    from cxr_core.data.scan import scan_dataset, stratified_subset
    from cxr_core.engine.batches import ImageBatches

    config = RunConfig(data=DataConfig(data_dir=str(data)),
                       model=ModelConfig(backbone="mobilenet_v2", alpha=0.35, image_size=224))
    rows = stratified_subset(scan_dataset(data).manifest, limit, seed=1).reset_index(drop=True)
    rows["y"] = (rows["label"] == "PNEUMONIA").astype(np.float32)

    def trivial():
        inputs = keras.Input((224, 224, 3))
        model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(inputs)))
        model.compile(optimizer="sgd", loss=keras.losses.BinaryCrossentropy(from_logits=True))
        return model

    def timed(dataset, **fit) -> float:
        model = trivial()
        model.fit(dataset, epochs=1, verbose=0, **fit)  # warm-up: tracing, thread start
        start = time.perf_counter()
        model.fit(dataset, epochs=2, verbose=0, **fit)
        return 2 * len(rows) / (time.perf_counter() - start)

    results = {"images": len(rows), "batch": batch}
    results["pydataset_images_s"] = timed(ImageBatches(rows, config, batch, shuffle=True), shuffle=False)
    source = ImageBatches(rows, config, batch)

    def decode(i):
        return source.image(int(i)), np.float32(source.labels[int(i)])

    def load(i):
        image, label = tf.numpy_function(decode, [i], (tf.float32, tf.float32))
        return tf.ensure_shape(image, (224, 224, 3)), tf.ensure_shape(label, ())

    data_set = (tf.data.Dataset.from_tensor_slices(np.arange(len(rows)))
                .shuffle(len(rows), seed=1)
                .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                .batch(batch).prefetch(tf.data.AUTOTUNE))
    results["tf_data_images_s"] = timed(data_set)
    return results


def fine_tune(data: Path, limit: int, batch: int, distribute: str, replicas: int) -> dict:
    """Fine-tuning images per second through the CLI (the real training code)."""
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="cxr-bench-distribute-") as tmp:
        args = [sys.executable, "-m", "cxr_core", "train", "--data", str(data), "--backbone", "mobilenet_v2",
                "--alpha", "0.35", "--weights", str(WEIGHTS), "--image-size", "224", "--limit", str(limit),
                "--epochs", "0", "--fine-tune-epochs", "2", "--fine-tune-layers", "30", "--no-export-litert",
                "--batch-size", str(batch // replicas), "--distribute", distribute, "--out", tmp,
                "--cache-dir", str(Path(tmp) / "cache")]
        if replicas > 1:
            args += ["--cpu-replicas", str(replicas)]
        started = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True, cwd=PROJECT_ROOT,
                              env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        run = Path(done.stdout.strip().splitlines()[-1])
        history = pd.read_csv(run / "history.csv")
        status = json.loads((run / "status.json").read_text())
        n_train = int((pd.read_csv(run / "split.csv")["split"] == "train").sum())
        seconds = float(history["seconds"].iloc[-1])
        return {"distribute": distribute, "strategy": status["strategy"], "replicas": status["replicas"],
                "global_batch": batch, "train_images": n_train, "epoch_s": seconds,
                "images_s": n_train / seconds, "images_s_per_replica": n_train / seconds / status["replicas"],
                "first_epoch_s": float(history["seconds"].iloc[0]), "run_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "kermany224")
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    args = parser.parse_args()
    if not args.data.is_dir() or not WEIGHTS.is_file():
        raise SystemExit(f"needs {args.data} and {WEIGHTS}")
    result = {"command": " ".join(["python -m benchmarks.distribute", *sys.argv[1:]]), "cpus": os.cpu_count(),
              "pipeline": pipeline(args.data, args.limit, args.batch),
              "fine_tune": [fine_tune(args.data, args.limit, args.batch, "off", 1),
                            fine_tune(args.data, args.limit, args.batch, "mirrored", 2)]}
    out = PROJECT_ROOT / "benchmarks" / "results" / f"distribute-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from cxr_core.io.atomic import write_json_atomic

    write_json_atomic(out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
