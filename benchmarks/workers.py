"""Work units the harness runs, each in its own process (``python -m benchmarks.workers NAME JSON_ARGS``).

Every unit writes one JSON object to ``args["out"]`` and ends with its own peak memory
(``ru_maxrss``). Heavy imports happen inside the units, so each process pays only for what it uses.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(pid: int | str = "self") -> dict:
    """VmRSS and VmHWM of a process in MB (from /proc/<pid>/status)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


# ---------------------------------------------------------------------------------------------
# 1 + 2. Our training (cxr_core.engine.train.train), cold or warm cache
# ---------------------------------------------------------------------------------------------
def train_ours(args: dict) -> dict:
    t0 = time.time()
    from cxr_core.core.config import RunConfig
    from cxr_core.engine.train import train

    config = RunConfig.from_dict(args["config"])
    stages: dict[str, float] = {}
    last = {"stage": "import", "t": t0}

    def on_progress(event: dict) -> None:
        if event.get("event") == "stage":
            now = time.time()
            stages[last["stage"]] = stages.get(last["stage"], 0.0) + now - last["t"]
            last.update(stage=event.get("stage"), t=now)
        if event.get("event") == "extract" and "cached" in event:
            stages["_cached"] = event["cached"]
            stages["_computed"] = event["computed"]

    run_dir = train(config, on_progress=on_progress, run_dir=args["run_dir"])
    now = time.time()
    stages[last["stage"]] = stages.get(last["stage"], 0.0) + now - last["t"]
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    status = json.loads((Path(run_dir) / "status.json").read_text())
    import hashlib

    import pandas as pd

    split = pd.read_csv(Path(run_dir) / "split.csv")
    originals = split[~split["is_augmented"].astype(bool)] if "is_augmented" in split else split

    def sha(part: str) -> str:
        paths = sorted(originals.loc[originals["split"] == part, "path"].astype(str))
        return hashlib.sha1("\n".join(paths).encode()).hexdigest()

    return {
        "way": "ours",
        "state": status.get("state"),
        "run_dir": str(run_dir),
        "test_accuracy": metrics["test"]["at_0.5"]["accuracy"],
        "test_accuracy_at_threshold": metrics["test"]["at_threshold"]["accuracy"],
        "test_auc": metrics["test"]["at_threshold"].get("roc_auc"),
        "n_images": metrics.get("n_images"),
        "n_augmented": metrics.get("n_augmented"),
        "test_paths_sha1": sha("test"),
        "train_paths_sha1": sha("train"),
        "stages": stages,
        "in_process_s": time.time() - t0,
    }


# ---------------------------------------------------------------------------------------------
# 3. Feature extraction throughput
# ---------------------------------------------------------------------------------------------
def extract_ours(args: dict) -> dict:
    """cxr_core.engine.features.extract_features on a cold cache (decode + resize + model + cache writes)."""
    import pandas as pd

    from cxr_core.core.config import AugmentConfig, ModelConfig
    from cxr_core.engine import features

    rows = pd.read_csv(args["rows"])
    rows["augment_seed"] = -1
    cfg = ModelConfig(**args["model"])
    import tensorflow  # noqa: F401  (imported before timing, as the bare side does)

    timing: dict[str, float] = {}
    original = features._make_extractor

    def timed_make(*a, **k):
        t = time.time()
        result = original(*a, **k)
        timing["model_build_s"] = time.time() - t
        return result

    features._make_extractor = timed_make
    marks: list[tuple[float, int]] = []
    t0 = time.time()
    result = features.extract_features(rows, cfg, AugmentConfig(), cache_dir=args["cache_dir"],
                                       batch_size=args.get("batch_size", 32),
                                       on_progress=lambda done, _total: marks.append((time.time(), done)))
    total_s = time.time() - t0
    n = int(result.n_computed)
    pipeline_s = total_s - timing.get("model_build_s", 0.0)
    return {
        "n": n,
        "n_cached": int(result.n_cached),
        "total_s": total_s,
        "model_build_s": timing.get("model_build_s"),
        "images_per_s": n / total_s,
        "images_per_s_excl_build": n / pipeline_s,
    }


def extract_bare(args: dict) -> dict:
    """The bare Keras backbone + pooling, model.predict on float arrays already in memory."""
    import numpy as np
    import pandas as pd

    from benchmarks.reference import load_image

    rows = pd.read_csv(args["rows"])
    size = int(args["size"])
    t = time.time()
    images = np.stack([load_image(p, size) for p in rows["path"].astype(str)])
    decode_s = time.time() - t

    import keras

    t = time.time()
    model_args = args["model"]
    if model_args["backbone"] == "mobilenet_v2":
        base = keras.applications.MobileNetV2(include_top=False, weights=None, alpha=model_args.get("alpha", 1.0),
                                              input_shape=(size, size, 3), pooling="avg")
        if model_args.get("weights", "none") != "none":
            base.load_weights(model_args["weights"], skip_mismatch=False)
    else:
        base = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(size, size, 3),
                                              pooling="avg")
    build_s = time.time() - t
    batch_size = args.get("batch_size", 32)
    scaled = images / 127.5 - 1.0
    t = time.time()
    out = base.predict(scaled, batch_size=batch_size, verbose=0)
    predict_s = time.time() - t

    # The ceiling: the same compiled call cxr_core makes, on the arrays already in memory (so the
    # difference to ours is exactly what decoding and loading cost).
    import tensorflow as tf

    run = tf.function(lambda x: base(x, training=False),
                      input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    run(tf.convert_to_tensor(scaled[:batch_size]))  # trace once, outside the timing
    t = time.time()
    for start in range(0, len(scaled), batch_size):
        run(tf.convert_to_tensor(scaled[start : start + batch_size])).numpy()
    compiled_s = time.time() - t
    return {
        "n": int(len(images)),
        "decode_s": decode_s,
        "model_build_s": build_s,
        "predict_s": predict_s,
        "images_per_s": len(images) / predict_s,
        "compiled_s": compiled_s,
        "compiled_images_per_s": len(images) / compiled_s,
        "feature_dim": int(out.shape[-1]),
    }


# ---------------------------------------------------------------------------------------------
# 4. Prediction latency
# ---------------------------------------------------------------------------------------------
def make_run_folder(args: dict) -> dict:
    """A finished run folder holding an untrained classifier (enough for latency: same graph)."""
    from cxr_core.core.config import ModelConfig, RunConfig
    from cxr_core.engine import model as model_lib
    from cxr_core.io.atomic import write_json_atomic

    run_dir = Path(args["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    config = RunConfig(model=ModelConfig(**args["model"]))
    classifier = model_lib.build_classifier(config.model)
    classifier.save(run_dir / "model.keras")
    write_json_atomic(run_dir / "config.json", config.to_dict())
    write_json_atomic(run_dir / "metrics.json", {"threshold": 0.5})
    from cxr_core.runs.run_folder import RunFolder

    RunFolder(run_dir).write_status("done", message="benchmark fixture (untrained head)")
    from cxr_core.engine.export import export_classifier

    t = time.time()
    export_classifier(classifier, run_dir, config.model.backbone)
    return {"run_dir": str(run_dir), "export_s": time.time() - t}


def latency(args: dict) -> dict:
    import pandas as pd

    from cxr_core.io.images import load_gray

    t = time.time()
    from cxr_core.inference.predictor import Predictor

    import_s = time.time() - t
    paths = pd.read_csv(args["rows"])["path"].astype(str).tolist()
    grays = [load_gray(p) for p in paths]
    t = time.time()
    predictor = Predictor.from_run(args["run_dir"], engine=args.get("engine", "auto"))
    load_s = time.time() - t
    calls = int(args["calls"])

    # First calls trace the compiled functions; then a few untimed warm-up calls each; then the
    # two kinds of call alternate, so that load from other processes hits both alike.
    t = time.perf_counter()
    predictor.predict(grays[:1])
    first_p = time.perf_counter() - t
    t = time.perf_counter()
    predictor.explain(grays[:1])
    first_e = time.perf_counter() - t
    for i in range(3):
        predictor.predict([grays[i % len(grays)]])
        predictor.explain([grays[i % len(grays)]])
    prob_times, explain_times = [], []
    for i in range(calls):
        gray = grays[(i + 1) % len(grays)]
        t = time.perf_counter()
        predictor.predict([gray])
        prob_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        predictor.explain([gray])
        explain_times.append(time.perf_counter() - t)
    return {
        "run_dir": args["run_dir"],
        "backbone": predictor.config.model.backbone,
        "engine": predictor.engine.name,
        "tensorflow_imported": "tensorflow" in sys.modules,
        "image_size": predictor.image_size,
        "calls": calls,
        "import_s": import_s,
        "load_s": load_s,
        "prob_first_s": first_p,
        "prob_p50_s": _percentile(prob_times, 50),
        "prob_p95_s": _percentile(prob_times, 95),
        "gradcam_first_s": first_e,
        "gradcam_p50_s": _percentile(explain_times, 50),
        "gradcam_p95_s": _percentile(explain_times, 95),
    }


# ---------------------------------------------------------------------------------------------
# 5. App memory, in one process (what the Predict page imports + one classification)
# ---------------------------------------------------------------------------------------------
def app_inprocess(args: dict) -> dict:
    """RSS after each step of what the server does for the Predict page, in a bare process."""
    steps = {"start": _status_mb()}
    mode = args.get("mode", "predict")
    if mode == "tensorflow":
        import tensorflow  # noqa: F401

        steps["import tensorflow"] = _status_mb()
        return {"steps": steps, "maxrss_mb": _maxrss_mb()}
    import pandas  # noqa: F401
    import plotly.graph_objects  # noqa: F401
    import streamlit  # noqa: F401

    steps["import streamlit+plotly+pandas"] = _status_mb()
    from cxr_core.inference import predictor as predict

    steps["import cxr_core.inference.predictor"] = _status_mb()
    if mode == "no_tf":
        return {"steps": steps, "maxrss_mb": _maxrss_mb()}
    from cxr_core.io.images import load_gray

    predictor = predict.Predictor.from_run(args["run_dir"])
    steps["Predictor.from_run"] = _status_mb()
    gray = load_gray(args["image"])
    (found,) = predictor.explain([gray])
    steps["explain one image"] = _status_mb()
    predict.overlay_heatmap(gray, found.heatmap)
    for _ in range(5):
        predictor.explain([gray])
    steps["explain x6"] = _status_mb()
    return {"steps": steps, "maxrss_mb": _maxrss_mb(), "probability": found.probability,
            "engine": predictor.engine.name, "tensorflow_imported": "tensorflow" in sys.modules}


# ---------------------------------------------------------------------------------------------
# 6. Page render times (streamlit.testing.v1.AppTest)
# ---------------------------------------------------------------------------------------------
def pages(args: dict) -> dict:
    from streamlit.testing.v1 import AppTest

    os.chdir(PROJECT_ROOT)
    results = {}
    for page in args["pages"]:
        entry: dict = {"page": page}
        for attempt in ("cold", "warm"):
            # Through the router (Home.py + st.navigation), as a visitor opens the page: pages link
            # to each other with st.page_link, which only works inside the navigation.
            at = AppTest.from_file(str(PROJECT_ROOT / "Home.py"), default_timeout=args.get("timeout", 300))
            at.session_state["dataset"] = args["dataset"]
            at.session_state["split_mode"] = "random"
            at.switch_page(page)
            t = time.perf_counter()
            try:
                at.run()
                entry[f"{attempt}_s"] = time.perf_counter() - t
                exceptions = [str(e.value)[:300] for e in at.exception]
                if exceptions:
                    entry[f"{attempt}_exceptions"] = exceptions
                entry[f"{attempt}_errors"] = [str(e.value)[:200] for e in at.error]
            except Exception as error:  # noqa: BLE001 (a page that times out or crashes is reported, not fatal)
                entry[f"{attempt}_s"] = time.perf_counter() - t
                entry[f"{attempt}_failed"] = f"{type(error).__name__}: {error}"[:300]
        results[page] = entry
    return {"pages": results, "maxrss_mb": _maxrss_mb()}


UNITS = {f.__name__: f for f in (train_ours, extract_ours, extract_bare, make_run_folder, latency,
                                 app_inprocess, pages)}


def main() -> int:
    name, raw = sys.argv[1], sys.argv[2]
    args = json.loads(Path(raw).read_text()) if raw.endswith(".json") else json.loads(raw)
    result = UNITS[name](args)
    result.setdefault("maxrss_mb", _maxrss_mb())
    Path(args["out"]).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
