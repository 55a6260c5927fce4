"""The REFERENCE way of training, as the reference notebook did it. Independent of ``cxr_core``.

Every image is decoded and resized and held in memory as a float32 array; the training NORMAL
images are augmented until the classes balance and the augmented copies are held in memory too;
the frozen ImageNet base runs inside the model, so ``model.fit`` on the arrays re-runs the whole
base over every image in every epoch (and over the validation images after every epoch):

    Input -> preprocess_input -> base(training=False) -> GlobalAveragePooling2D -> Dropout(0.5)
          -> Dense(1, sigmoid);  Adam(1e-3), binary crossentropy, batch 32.

Same data and split as ``cxr_core.engine.train``: the image list comes from the harness (path,label in
the manifest's order), the split is sklearn's stratified 80/20 then 50/50 with random_state=seed,
and the training part gets ``n_pneumonia - n_normal`` augmented NORMAL images (rotation +-0.3
degrees, horizontal flip, brightness 0.9..1.1, shifts 5 %: the reference's ImageDataGenerator
settings, done with cv2 because Keras 3 no longer ships ImageDataGenerator).

With ``--augmented`` (the harness passes it) the extra NORMAL images are made from the same source
images and seeds, by the same function, as cxr_core makes them, so both ways train on the same data;
with ``--train-order`` the training images are held in the same order as cxr_core holds them, so
the same shuffle seed makes the same batches.

Usage (the harness runs it in its own process to measure time and peak memory):

    python -m benchmarks.reference --images LIST.csv --backbone mobilenet_v2 --alpha 0.35 \
        --weights PATH|none --size 224 --epochs 10 --out result.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import numpy as np
import pandas as pd


def split_indices(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference's stratified 8:1:1 split (two train_test_split calls, random_state=seed)."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(y))
    train_idx, rest_idx = train_test_split(index, test_size=0.2, stratify=y, random_state=seed)
    val_idx, test_idx = train_test_split(rest_idx, test_size=0.5, stratify=y[rest_idx], random_state=seed)
    return train_idx, val_idx, test_idx


def load_image(path: str, size: int) -> np.ndarray:
    """Decode, resize to a square (aspect not kept), float32 (size, size, 3) in 0..255."""
    img = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError(f"cannot read {path}")
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return np.repeat(img.astype(np.float32)[..., None], 3, axis=-1)


def augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """ImageDataGenerator(rotation_range=0.3, width/height_shift_range=0.05, horizontal_flip=True,
    brightness_range=(0.9, 1.1)), on a float (h, w, 3) image."""
    h, w = img.shape[:2]
    angle = rng.uniform(-0.3, 0.3)
    tx, ty = rng.uniform(-0.05, 0.05) * w, rng.uniform(-0.05, 0.05) * h
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    matrix[:, 2] += (tx, ty)
    out = cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    out = np.clip(out * rng.uniform(0.9, 1.1), 0, 255)
    return np.ascontiguousarray(out, dtype=np.float32)


def build_model(backbone: str, size: int, alpha: float, weights: str, seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    if backbone == "inception_v3":
        base = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(size, size, 3))
        preprocess = keras.applications.inception_v3.preprocess_input
    elif backbone == "mobilenet_v2":
        base = keras.applications.MobileNetV2(include_top=False, weights=None, alpha=alpha,
                                              input_shape=(size, size, 3))
        preprocess = keras.applications.mobilenet_v2.preprocess_input
    else:
        raise SystemExit(f"unknown backbone {backbone}")
    if weights and weights.lower() != "none":
        base.load_weights(weights)
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Lambda(preprocess, name="preprocess")(inputs)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    # The head starts from the same seeded initial weights as cxr_core's head, so that the two ways
    # differ in how the features reach the head, not in the luck of the draw (two random heads
    # trained on the same features end over a point apart on 523 test images).
    keras.utils.set_random_seed(seed)
    x = keras.layers.Dropout(0.5, seed=seed)(x)
    outputs = keras.layers.Dense(1, activation="sigmoid",
                                 kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", metrics=["accuracy"])
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="CSV with path,label (manifest order)")
    parser.add_argument("--backbone", default="inception_v3", choices=["inception_v3", "mobilenet_v2"])
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--weights", default="none")
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save", default=None, help="save the trained model here (.keras)")
    parser.add_argument("--train-order", default=None,
                        help="CSV path: the training images in this order (the other side's), so that the same "
                             "shuffle seed gives both ways the same batches")
    parser.add_argument("--augmented", default=None,
                        help="CSV path,augment_seed: make the extra NORMAL images from these sources with "
                             "cxr_core.data.augment.augment_image, so both ways train on the same images")
    args = parser.parse_args(argv)

    t_start = time.time()
    stages: dict[str, float] = {}
    import keras  # noqa: F401  (the notebook imports TensorFlow first; counted in the total)

    stages["import_s"] = time.time() - t_start

    t = time.time()
    listing = pd.read_csv(args.images)
    paths = listing["path"].astype(str).to_numpy()
    y_all = (listing["label"].astype(str) == "PNEUMONIA").to_numpy(dtype=np.int64)
    train_idx, val_idx, test_idx = split_indices(y_all, args.seed)
    if args.train_order:
        # Same rows, another order: the order decides which images share a batch under a given
        # shuffle seed, and one order against another moved test accuracy by 1.5 points here.
        position = {p: i for i, p in enumerate(paths)}
        order = np.array([position.get(p, -1) for p in pd.read_csv(args.train_order)["path"].astype(str)])
        if sorted(order.tolist()) != sorted(train_idx.tolist()):
            raise SystemExit(f"{args.train_order} does not list the training images of this split.")
        train_idx = order
    y_train = y_all[train_idx]
    n_extra = max(0, int((y_train == 1).sum() - (y_train == 0).sum()))
    # Decode and resize every image into float32 arrays held in memory (the notebook's pickled
    # arrays); the training array has room for the augmented NORMAL copies.
    shape = (args.size, args.size, 3)
    x_train = np.empty((len(train_idx) + n_extra, *shape), np.float32)
    x_val = np.empty((len(val_idx), *shape), np.float32)
    x_test = np.empty((len(test_idx), *shape), np.float32)
    for array, index in ((x_train, train_idx), (x_val, val_idx), (x_test, test_idx)):
        for j, i in enumerate(index):
            array[j] = load_image(paths[i], args.size)
    stages["load_s"] = time.time() - t

    t = time.time()
    if args.augmented:
        # The same augmented images as the other side (same sources, seeds and transform): the
        # comparison is then about how features reach the head, not about different training data.
        from cxr_core.core.config import AugmentConfig
        from cxr_core.data.augment import augment_image

        extra = pd.read_csv(args.augmented)
        if len(extra) != n_extra:
            raise SystemExit(f"{args.augmented} lists {len(extra)} augmented images; this split needs {n_extra}.")
        for j, (path, seed) in enumerate(zip(extra["path"].astype(str), extra["augment_seed"].astype(int))):
            gray = augment_image(cv2.imread(path, cv2.IMREAD_GRAYSCALE), AugmentConfig(), seed)
            small = cv2.resize(gray, (args.size, args.size), interpolation=cv2.INTER_AREA)
            x_train[len(train_idx) + j] = np.repeat(small.astype(np.float32)[..., None], 3, axis=-1)
    else:
        normal_rows = np.flatnonzero(y_train == 0)
        rng = np.random.default_rng(args.seed)
        sources = normal_rows[rng.permutation(len(normal_rows))[np.arange(n_extra) % max(len(normal_rows), 1)]]
        for j, row in enumerate(sources):
            x_train[len(train_idx) + j] = augment(x_train[row], rng)
    y_train_bal = np.concatenate([y_train, np.zeros(n_extra, np.int64)]).astype(np.float32)
    y_val = y_all[val_idx].astype(np.float32)
    y_test = y_all[test_idx].astype(np.float32)
    stages["augment_s"] = time.time() - t

    t = time.time()
    model = build_model(args.backbone, args.size, args.alpha, args.weights, args.seed)
    stages["build_s"] = time.time() - t

    t = time.time()
    epoch_times: list[float] = []

    import keras as _k

    class Timer(_k.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):  # noqa: ARG002 (Keras' signature)
            self._t = time.time()

        def on_epoch_end(self, epoch, logs=None):
            epoch_times.append(time.time() - self._t)
            print(f"epoch {epoch + 1}: {epoch_times[-1]:.1f} s {logs}", file=sys.stderr, flush=True)

    history = model.fit(x_train, y_train_bal, validation_data=(x_val, y_val), epochs=args.epochs,
                        batch_size=args.batch_size, shuffle=True, callbacks=[Timer()], verbose=0)
    stages["fit_s"] = time.time() - t

    t = time.time()
    prob = model.predict(x_test, batch_size=args.batch_size, verbose=0).reshape(-1)
    test_accuracy = float(((prob >= 0.5).astype(np.float32) == y_test).mean())
    stages["test_s"] = time.time() - t
    if args.save:
        t = time.time()
        model.save(args.save)
        stages["save_s"] = time.time() - t

    result = {
        "way": "reference",
        "backbone": args.backbone,
        "image_size": args.size,
        "epochs": args.epochs,
        "n_images": int(len(listing)),
        "n_train": int(len(train_idx)),
        "n_augmented": n_extra,
        "n_val": int(len(val_idx)),
        "n_test": int(len(test_idx)),
        "test_paths_sha1": hashlib.sha1("\n".join(sorted(paths[test_idx])).encode()).hexdigest(),
        "train_paths_sha1": hashlib.sha1("\n".join(sorted(paths[train_idx])).encode()).hexdigest(),
        "test_accuracy": test_accuracy,
        "val_accuracy_last": float(history.history["val_accuracy"][-1]),
        "epoch_s": epoch_times,
        "stages": stages,
        "array_bytes": int(x_train.nbytes + x_val.nbytes + x_test.nbytes),
        "in_process_s": time.time() - t_start,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "epoch_s"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
