"""Which frozen-feature head makes a quick recipe worth teaching with, chosen without the test set.

Frozen MobileNetV2-0.35 (ImageNet file) features are computed once for every image of
../shared/data/kermany224 and of the test-dev half, for a few fixed views (the plain image, a tighter
and a looser framing) and from three depths of the network (pooled). Every candidate head is then
scored two ways:

- the proxy, from the training data alone: leave one source copy out (``source_resolution``: fit on the
  train part of two copies, score every image of the third), averaged over the three copies;
- test-dev, looked at for the ranking report only (Spearman correlation of proxy and test-dev AUC over
  all candidates); the chosen head is the one with the best proxy AUC.

    python -m benchmarks.quick_head            # prints one JSON line per candidate, then the summary

Caches go to --work (default /tmp/exp); nothing from ../shared is written into the repository.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.accuracy import WEIGHTS, group_balanced_weights, load_data

LAYERS = ("block_6_expand_relu", "block_13_expand_relu", "out_relu")
VIEWS = {"plain": (1.0, 1.0), "tight": (0.85, 0.85), "loose": (1.2, 1.0)}


def view(img: np.ndarray, zoom: float, aspect: float) -> np.ndarray:
    """The image framed ``zoom`` times tighter (<1 crops, >1 pads with the border's grey), resized back."""
    h, w = img.shape
    ch, cw = int(round(h * zoom)), int(round(w * zoom * aspect))
    if zoom <= 1.0:
        y0, x0 = (h - ch) // 2, max(0, (w - cw) // 2)
        crop = img[y0:y0 + ch, x0:x0 + min(cw, w)]
    else:
        fill = int(np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])))
        crop = np.full((ch, max(cw, w)), fill, np.uint8)
        y0, x0 = (ch - h) // 2, (crop.shape[1] - w) // 2
        crop[y0:y0 + h, x0:x0 + w] = img
    return cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA)


def extractor(size: int):
    import keras

    inp = keras.Input((size, size, 1))
    h = keras.layers.Concatenate()([inp, inp, inp])
    h = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(h)
    base = keras.applications.MobileNetV2(alpha=0.35, include_top=False, weights=None, input_shape=(size, size, 3))
    base.load_weights(str(WEIGHTS))
    outs = []
    for name in LAYERS:
        t = base.get_layer(name).output
        outs.append(keras.layers.GlobalAveragePooling2D()(t))
    outs.append(keras.layers.GlobalMaxPooling2D()(base.get_layer("out_relu").output))
    feat = keras.Model(base.input, outs)
    return keras.Model(inp, feat(h))


def features(d: dict, work: Path, size: int, view_name: str) -> dict:
    path = work / f"qh_{size}_{view_name}.npz"
    if path.exists():
        z = np.load(path)
        return {k: z[k] for k in z.files}
    model = extractor(size)
    zoom, aspect = VIEWS[view_name]
    out = {}
    t0 = time.time()
    for key, x in (("train", d["x"]), ("test", d["tx"])):
        parts = [[] for _ in range(len(LAYERS) + 1)]
        for i in range(0, len(x), 256):
            xb = np.stack([cv2.resize(view(a, zoom, aspect), (size, size), interpolation=cv2.INTER_AREA)
                           for a in x[i:i + 256]])
            res = model.predict(xb[..., None].astype(np.float32), batch_size=64, verbose=0)
            for j, r in enumerate(res):
                parts[j].append(r)
        for j, name in enumerate((*LAYERS, "out_max")):
            out[f"{key}:{name}"] = np.concatenate(parts[j]).astype(np.float32)
    np.savez(path, **out)
    print(f"features {size} {view_name}: {time.time() - t0:.0f} s", file=sys.stderr)
    return out


def stack(f: dict, part: str, layers: tuple[str, ...]) -> np.ndarray:
    return np.concatenate([f[f"{part}:{name}"] for name in layers], axis=1)


def fit_lr(x, y, w, C):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    model.fit(x, y, logisticregression__sample_weight=w)
    return model


def score(model, xs: list[np.ndarray]) -> np.ndarray:
    """Probability averaged over the views (test-time augmentation when there are several)."""
    return np.mean([model.predict_proba(x)[:, 1] for x in xs], axis=0)


def candidate(d, feats, size, layers, train_views, test_views, weighting, C) -> dict:
    from sklearn.metrics import roc_auc_score

    y, src, split = d["y"], d["src"], d["split"]
    tr = split == "train"
    weights = (group_balanced_weights if weighting == "group" else
               (lambda yy, _s: np.where(yy == 1, len(yy) / (2.0 * yy.sum()),
                                        len(yy) / (2.0 * (1 - yy).sum())).astype(np.float32)))

    def design(idx, views):
        return np.concatenate([stack(feats[(size, v)], "train", layers)[idx] for v in views]), \
            np.concatenate([y[idx]] * len(views)), np.concatenate([src[idx]] * len(views))

    proxy = []
    for held in np.unique(src):
        fit_idx = np.where(tr & (src != held))[0]
        out_idx = np.where(src == held)[0]  # never fitted in this fold
        x, yy, ss = design(fit_idx, train_views)
        model = fit_lr(x, yy, weights(yy, ss), C)
        p = score(model, [stack(feats[(size, v)], "train", layers)[out_idx] for v in test_views])
        proxy.append(roc_auc_score(y[out_idx], p))
    t0 = time.time()
    x, yy, ss = design(np.where(tr)[0], train_views)
    model = fit_lr(x, yy, weights(yy, ss), C)
    fit_s = time.time() - t0
    va = split == "val"
    pv = score(model, [stack(feats[(size, v)], "train", layers)[va] for v in test_views])
    pt = score(model, [stack(feats[(size, v)], "test", layers) for v in test_views])
    return {"size": size, "layers": list(layers), "train_views": list(train_views), "test_views": list(test_views),
            "weighting": weighting, "C": C, "proxy_auc": round(float(np.mean(proxy)), 4),
            "proxy_by_source": [round(float(a), 4) for a in proxy],
            "val_auc": round(float(roc_auc_score(y[va], pv)), 4),
            "testdev_auc": round(float(roc_auc_score(d["ty"], pt)), 4), "fit_s": round(fit_s, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/exp")
    ap.add_argument("--sizes", default="224")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    d = load_data(work)
    sizes = [int(s) for s in args.sizes.split(",")]
    feats = {(s, v): features(d, work, s, v) for s in sizes for v in VIEWS}
    rows = []
    deep = ("out_relu",)
    multi = LAYERS
    for size in sizes:
        for layers in (deep, ("block_13_expand_relu", "out_relu"), multi, (*multi, "out_max")):
            for views in ((("plain",), ("plain",)), (tuple(VIEWS), ("plain",)), (tuple(VIEWS), tuple(VIEWS))):
                for weighting in ("class", "group"):
                    for C in (0.01, 0.1, 1.0):
                        row = candidate(d, feats, size, layers, views[0], views[1], weighting, C)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    from scipy.stats import spearmanr

    rho = spearmanr([r["proxy_auc"] for r in rows], [r["testdev_auc"] for r in rows]).statistic
    rho_val = spearmanr([r["val_auc"] for r in rows], [r["testdev_auc"] for r in rows]).statistic
    best = max(rows, key=lambda r: r["proxy_auc"])
    print(json.dumps({"chosen_by_proxy": best, "spearman_proxy_vs_testdev": round(float(rho), 3),
                      "spearman_val_vs_testdev": round(float(rho_val), 3), "candidates": len(rows)}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
