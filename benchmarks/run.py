"""Benchmark suite: our pipeline against the reference way, on the real Kermany images.

    python -m benchmarks.run                 # full suite (about 21 minutes on 2 CPU cores, measured)
    python -m benchmarks.run --quick         # small subsets, few epochs and calls (~5 min; smoke test)
    python -m benchmarks.run --only train-mobilenet latency
    python -m benchmarks.run --only train-mobilenet --resident   # also warm runs through a resident worker

Sections (names for --only): extract, latency, app, pages, train-mobilenet, train-inception.
Every heavy measurement runs in its own process (``benchmarks/workers.py`` or
``benchmarks/reference.py``) so that its wall time and peak memory (``ru_maxrss`` from ``wait4``,
and the summed RSS of its process tree sampled every 0.2 s) are its own.

Prints a table and writes ``benchmarks/results/<timestamp>.json`` and ``latest.json``
(git-ignored); a full run of every section also rewrites ``benchmarks/RESULTS.md``.
Not part of the pytest suite. Needs ``../shared`` (data and weights); exits 2 without it.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
TMP = RESULTS / "tmp"
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "kermany224"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_0.35_224_no_top_imagenet.weights.h5"
PYTHON = sys.executable
KEPT_MARKER = "<!-- Sections below are written by hand from other benchmark scripts; a rewrite keeps them. -->"
SECTIONS = ("extract", "latency", "app", "pages", "train-mobilenet", "train-inception")
PAGE_ORDER = ("home", "dataset", "augmentation", "training", "evaluation", "predict")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

FULL = dict(mobilenet_n=None, inception_n=500, epochs=10, extract_mobilenet_n=1000, extract_inception_n=160,
            calls=40, demo_n=600, app_variants=True)
QUICK = dict(mobilenet_n=300, inception_n=60, epochs=2, extract_mobilenet_n=128, extract_inception_n=32,
             calls=10, demo_n=200, app_variants=False)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Measuring a process
# ---------------------------------------------------------------------------------------------
def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mb(pid: int) -> float:
    """Summed RSS of a process and all its descendants."""
    children = _proc_children()
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += _rss_kb(current)
        stack.extend(children.get(current, []))
    return total / 1024


def proc_mb(pid: int) -> dict:
    return {"rss_mb": _rss_kb(pid) / 1024, "hwm_mb": _rss_kb(pid, "VmHWM") / 1024,
            "tree_rss_mb": tree_rss_mb(pid)}


def run_measured(cmd: list[str], label: str, env: dict | None = None, timeout: float = 3600) -> dict:
    """Run ``cmd`` in its own process; wall time, exit code, ru_maxrss (wait4) and sampled tree RSS."""
    logs = TMP / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{label}.log"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    with open(log_path, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)
        peak_tree = 0.0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_tree = max(peak_tree, tree_rss_mb(proc.pid))
            if time.perf_counter() - t0 > timeout:
                proc.kill()
            time.sleep(0.2)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {"wall_s": wall, "rc": proc.returncode, "maxrss_mb": usage.ru_maxrss / 1024,
              "peak_tree_rss_mb": peak_tree, "peak_mb": max(usage.ru_maxrss / 1024, peak_tree),
              "log": str(log_path.relative_to(ROOT))}
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{label} exited with {proc.returncode}; log {log_path}:\n{tail}")
    return result


def worker(name: str, args: dict, label: str, env: dict | None = None, timeout: float = 3600) -> dict:
    """Run a unit of benchmarks/workers.py in its own process; its JSON plus the process figures."""
    out = TMP / f"{label}.json"
    args = {**args, "out": str(out)}
    arg_file = TMP / f"{label}.args.json"
    arg_file.write_text(json.dumps(args))
    proc = run_measured([PYTHON, "-m", "benchmarks.workers", name, str(arg_file)], label, env, timeout)
    result = json.loads(out.read_text())
    result["process"] = proc
    return result


# ---------------------------------------------------------------------------------------------
# Machine and data
# ---------------------------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gb = round(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024, 1)
    versions = {}
    code = ("import json,sys,numpy,pandas,cv2,sklearn,streamlit,tensorflow as tf,keras;"
            "print(json.dumps({'python':sys.version.split()[0],'tensorflow':tf.__version__,'keras':keras.__version__,"
            "'numpy':numpy.__version__,'pandas':pandas.__version__,'opencv':cv2.__version__,"
            "'scikit-learn':sklearn.__version__,'streamlit':streamlit.__version__}))")
    try:
        out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        versions = json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as error:  # noqa: BLE001 (versions are nice to have)
        versions = {"error": str(error)}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb, "platform": platform.platform(),
            "loadavg_start": os.getloadavg(), "git_commit": commit, **versions}


class Context:
    """Shared state of one suite run: settings, the manifest, fixtures made once."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.p = dict(QUICK if opts.quick else FULL)
        if opts.epochs:
            self.p["epochs"] = opts.epochs
        if opts.inception_n:
            self.p["inception_n"] = opts.inception_n
        self._manifest = None
        self._demo_run = None

    def manifest(self):
        if self._manifest is None:
            from cxr_core.data import scan as data

            t = time.time()
            self._manifest = data.scan_dataset(DATA).manifest
            log(f"scanned {DATA}: {len(self._manifest)} images in {time.time() - t:.1f} s")
        return self._manifest

    def subset_csv(self, n: int | None, name: str) -> Path:
        """path,label,sha256 of a stratified subset (seed 123; the same rows train(limit=n) uses)."""
        from cxr_core.data import scan as data

        manifest = self.manifest()
        rows = manifest if n is None or n >= len(manifest) else data.stratified_subset(manifest, n, seed=123)
        path = TMP / f"{name}.csv"
        rows[["path", "label", "sha256"]].to_csv(path, index=False)
        return path

    def data_root(self) -> Path:
        root = TMP / "data_root"
        root.mkdir(parents=True, exist_ok=True)
        link = root / "kermany224"
        if not link.exists():
            link.symlink_to(DATA, target_is_directory=True)
        return root

    def demo_run(self) -> Path:
        """A real finished demo-size run (MobileNetV2 0.35, ImageNet weights) on a Kermany subset."""
        if self._demo_run is None:
            runs_dir = TMP / "app_runs"
            if runs_dir.exists():
                shutil.rmtree(runs_dir)
            run_dir = runs_dir / "demo-mobilenet-bench"
            config = run_config("mobilenet_v2", self.p["demo_n"], 10, TMP / "cache-fixture")
            log(f"training the demo-size fixture run (mobilenet_v2 0.35 on {self.p['demo_n']} images)")
            result = worker("train_ours", {"config": config, "run_dir": str(run_dir)}, "fixture-demo-run")
            log(f"  done in {result['process']['wall_s']:.0f} s, test accuracy {result['test_accuracy']:.3f}")
            self._demo_run = run_dir
        return self._demo_run


def model_args(backbone: str) -> dict:
    if backbone == "mobilenet_v2":
        return {"backbone": "mobilenet_v2", "alpha": 0.35, "weights": str(WEIGHTS), "image_size": 224}
    return {"backbone": "inception_v3", "weights": str(inception_weights()), "image_size": 299}


def inception_weights() -> Path:
    """A seeded random InceptionV3 initialisation saved as a weights file (made once).

    ../shared has no ImageNet InceptionV3 file and this machine is offline; a frozen backbone with
    random weights is refused by training (it cannot learn), and speed and memory do not depend on
    the values of the weights, so the timing runs start from this file.
    """
    path = TMP / "inception_v3_random_299.weights.h5"
    if not path.is_file():
        TMP.mkdir(parents=True, exist_ok=True)
        code = ("import sys; from cxr_core.core.config import ModelConfig; "
                "from cxr_core.engine.model import build_backbone; "
                "build_backbone(ModelConfig(backbone='inception_v3', weights='none', image_size=299), seed=123)"
                ".save_weights(sys.argv[1])")
        subprocess.run([PYTHON, "-c", code, str(path)], check=True, cwd=ROOT)
    return path


def run_config(backbone: str, limit: int | None, epochs: int, cache_dir: Path) -> dict:
    from cxr_core.core.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    return RunConfig(
        data=DataConfig(data_dir=str(DATA), split="random", seed=123, limit=limit),
        model=ModelConfig(**model_args(backbone)),
        # restore_best=False: the reference keeps the last epoch's weights; compare like with like.
        train=TrainConfig(epochs=epochs, batch_size=32, learning_rate=1e-3, balance="augment", seed=123,
                          restore_best=False, cache_dir=str(cache_dir)),
    ).to_dict()


# ---------------------------------------------------------------------------------------------
# 1 + 2. Training time and peak memory: reference way vs ours (cold cache, warm cache)
# ---------------------------------------------------------------------------------------------
def augmented_csv(ctx: Context, n: int | None, name: str) -> Path:
    """path,augment_seed of the extra NORMAL images cxr_core.engine.train makes for this subset (same calls)."""
    from cxr_core.data import augment, scan as data

    manifest = ctx.manifest()
    if n is not None and n < len(manifest):
        manifest = data.stratified_subset(manifest, n, seed=123)
    split = data.make_split(manifest, mode="random", seed=123, val_fraction=0.1, test_fraction=0.1)
    train_part = split[split["split"] == "train"].assign(augment_seed=-1, is_augmented=False)
    plan = augment.balance_plan(train_part["label"].tolist(), "augment")
    extra = augment.augmented_rows(train_part, plan.n_extra, seed=123)
    path = TMP / f"{name}.csv"
    extra[["path", "augment_seed"]].to_csv(path, index=False)
    train_part[["path"]].to_csv(TMP / f"{name}-train-order.csv", index=False)
    return path


def bench_train(ctx: Context, backbone: str) -> dict:
    n = ctx.p["mobilenet_n"] if backbone == "mobilenet_v2" else ctx.p["inception_n"]
    epochs = ctx.p["epochs"]
    listing = ctx.subset_csv(n, f"train-{backbone}-images")
    margs = model_args(backbone)
    size = margs["image_size"]
    with open(listing) as handle:
        n_images = sum(1 for _ in handle) - 1
    out = {"backbone": backbone, "n_images": n_images, "epochs": epochs, "image_size": size}

    log(f"train {backbone}: REFERENCE way on {n_images} images, {epochs} epochs "
        "(arrays in memory, base re-run every epoch)")
    ref_out = TMP / f"train-{backbone}-reference.json"
    augmented = augmented_csv(ctx, n, f"train-{backbone}-augmented")
    proc = run_measured([PYTHON, "-m", "benchmarks.reference", "--images", str(listing), "--backbone", backbone,
                         "--alpha", str(margs.get("alpha", 1.0)), "--weights", margs["weights"], "--size", str(size),
                         "--epochs", str(epochs), "--seed", "123", "--augmented", str(augmented),
                         "--train-order", str(augmented.with_name(augmented.stem + "-train-order.csv")),
                         "--out", str(ref_out)],
                        f"train-{backbone}-reference")
    out["reference"] = {**json.loads(ref_out.read_text()), "process": proc}
    log(f"  reference: {proc['wall_s']:.0f} s, peak {proc['peak_mb']:.0f} MB, "
        f"test accuracy {out['reference']['test_accuracy']:.4f}")

    cache = TMP / f"cache-{backbone}"
    if cache.exists():
        shutil.rmtree(cache)
    config = run_config(backbone, n, epochs, cache)
    for phase in ("cold", "warm"):
        run_dir = TMP / "runs" / f"{backbone}-{phase}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        log(f"train {backbone}: OURS, {phase} feature cache")
        result = worker("train_ours", {"config": config, "run_dir": str(run_dir)}, f"train-{backbone}-ours-{phase}")
        out[f"ours_{phase}"] = result
        p = result["process"]
        log(f"  ours {phase}: {p['wall_s']:.1f} s, peak {p['peak_mb']:.0f} MB, test accuracy "
            f"{result['test_accuracy']:.4f} (cached {result['stages'].get('_cached')}, "
            f"computed {result['stages'].get('_computed')})")
    ref = out["reference"]
    if ctx.opts.resident:
        out["ours_resident"] = train_resident(config, backbone)
    out["same_split"] = (ref["test_paths_sha1"] == out["ours_cold"]["test_paths_sha1"]
                         and ref["train_paths_sha1"] == out["ours_cold"]["train_paths_sha1"])
    out["same_n_augmented"] = ref["n_augmented"] == out["ours_cold"]["n_augmented"]
    import pandas as pd

    theirs = pd.read_csv(augmented)
    split = pd.read_csv(Path(out["ours_cold"]["run_dir"]) / "split.csv")
    ours_aug = split[split["is_augmented"].astype(bool)]
    out["same_augmented_images"] = (list(ours_aug["path"].astype(str)) == list(theirs["path"].astype(str))
                                    and list(ours_aug["augment_seed"].astype(int)) == list(theirs["augment_seed"]))
    ours_order = split.loc[(split["split"] == "train") & ~split["is_augmented"].astype(bool), "path"].astype(str)
    theirs_order = pd.read_csv(augmented.with_name(augmented.stem + "-train-order.csv"))["path"].astype(str)
    out["same_train_order"] = list(ours_order) == list(theirs_order)
    return out


def train_resident(config: dict, backbone: str, runs_n: int = 3) -> dict:
    """Warm runs through a resident worker (``cxr_core.hosting.workers``), as a served app with
    ``CXR_RESIDENT_WORKERS=1`` trains them: the worker has started and imported TensorFlow before the
    clock starts; each run is timed from ``jobs.start_training`` to its final status, as a page sees it.
    The first run is the worker's first job; the later ones follow a job, as in a class."""
    from cxr_core.core.config import RunConfig
    from cxr_core.hosting import jobs, workers
    from cxr_core.runs import registry as runs

    root = TMP / f"resident-{backbone}"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    child = workers.start_worker(root, 0)
    try:
        t = time.perf_counter()
        if not workers.wait_idle(root, 0, 300):
            raise RuntimeError(f"the resident worker did not start; see {workers.worker_log_path(root, 0)}")
        log(f"train {backbone}: resident worker ready in {time.perf_counter() - t:.1f} s (not counted)")
        found = []
        for i in range(runs_n):
            t = time.perf_counter()
            run = jobs.start_training(RunConfig.from_dict(config), root)
            while runs.read_status(run)["state"] == "running":
                time.sleep(0.02)
            wall = time.perf_counter() - t
            status = runs.read_status(run)
            if status["state"] != "done":
                raise RuntimeError(f"resident run {run} ended {status['state']}: {status.get('error')}")
            metrics = json.loads((run / "metrics.json").read_text())
            found.append({"wall_s": wall, "run_dir": str(run), "pid": status["pid"],
                          "test_accuracy": metrics["test"]["at_0.5"]["accuracy"],
                          "rss_mb": proc_mb(child.pid)["rss_mb"], "hwm_mb": proc_mb(child.pid)["hwm_mb"]})
            workers.wait_idle(root, 0, 60)
            log(f"  resident run {i + 1}: {wall:.1f} s, test accuracy {found[-1]['test_accuracy']:.4f}, "
                f"worker RSS {found[-1]['rss_mb']:.0f} MB (peak {found[-1]['hwm_mb']:.0f} MB)")
    finally:
        child.terminate()
        child.wait(30)
    later = [r["wall_s"] for r in found[1:]] or [found[0]["wall_s"]]
    return {"runs": found, "first_s": found[0]["wall_s"], "later_s": min(later),
            "later_mean_s": sum(later) / len(later), "peak_mb": max(r["hwm_mb"] for r in found),
            "same_worker": len({r["pid"] for r in found}) == 1}


# ---------------------------------------------------------------------------------------------
# 3. Feature extraction throughput
# ---------------------------------------------------------------------------------------------
def bench_extract(ctx: Context) -> dict:
    out = {}
    for backbone, n in (("mobilenet_v2", ctx.p["extract_mobilenet_n"]), ("inception_v3", ctx.p["extract_inception_n"])):
        rows = ctx.subset_csv(n, f"extract-{backbone}-images")
        margs = model_args(backbone)
        cache = TMP / f"cache-extract-{backbone}"
        if cache.exists():
            shutil.rmtree(cache)
        log(f"extract {backbone}: bare backbone model.predict on {n} in-memory arrays")
        bare = worker("extract_bare", {"rows": str(rows), "model": margs, "size": margs["image_size"]},
                      f"extract-{backbone}-bare")
        log(f"  bare: {bare['images_per_s']:.1f} img/s")
        log(f"extract {backbone}: cxr_core.engine.features.extract_features, cold cache, {n} images")
        ours = worker("extract_ours", {"rows": str(rows), "model": margs, "cache_dir": str(cache)},
                      f"extract-{backbone}-ours")
        log(f"  ours: {ours['images_per_s']:.1f} img/s end to end, {ours['images_per_s_excl_build']:.1f} "
            f"excluding the model build ({ours['model_build_s']:.1f} s)")
        out[backbone] = {"n": n, "bare": bare, "ours": ours}
    return out


# ---------------------------------------------------------------------------------------------
# 4. Prediction latency
# ---------------------------------------------------------------------------------------------
def bench_latency(ctx: Context) -> dict:
    rows = ctx.subset_csv(40, "latency-images")
    out = {}
    for backbone in ("mobilenet_v2", "inception_v3"):
        run_dir = TMP / "latency_runs" / backbone
        if run_dir.exists():
            shutil.rmtree(run_dir)
        worker("make_run_folder", {"run_dir": str(run_dir), "model": model_args(backbone)}, f"latency-{backbone}-make")
        out[backbone] = {}
        for engine in ("litert", "keras"):
            log(f"latency {backbone} on {engine}: {ctx.p['calls']} calls each, model loaded")
            result = worker("latency", {"run_dir": str(run_dir), "rows": str(rows), "calls": ctx.p["calls"],
                                        "engine": engine}, f"latency-{backbone}-{engine}")
            log(f"  probability p50 {result['prob_p50_s'] * 1000:.0f} ms p95 {result['prob_p95_s'] * 1000:.0f} ms; "
                f"+Grad-CAM p50 {result['gradcam_p50_s'] * 1000:.0f} ms p95 {result['gradcam_p95_s'] * 1000:.0f} ms")
            out[backbone][engine] = result
    return out


# ---------------------------------------------------------------------------------------------
# 5. App server memory
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def serve_and_classify(ctx: Context, label: str, extra_env: dict | None = None, run_dir: Path | None = None) -> dict:
    """Start the Streamlit server, open Home then Predict in headless Chromium, classify one image."""
    from playwright.sync_api import sync_playwright

    run_dir = run_dir or ctx.demo_run()
    image = ctx.manifest().query("label == 'PNEUMONIA'")["path"].iloc[0]
    port = _free_port()
    # The run under test is the demo run: the Predict page opens it by default, as for a visitor.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CXR_RUNS_DIR": str(TMP / "app_no_runs"),
           "CXR_DEMO_RUN": str(run_dir), "CXR_DATA_ROOT": str(ctx.data_root()), "TF_CPP_MIN_LOG_LEVEL": "2",
           **(extra_env or {})}
    log_path = TMP / "logs" / f"{label}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    steps: dict[str, dict] = {}
    with open(log_path, "w") as server_log:
        server = subprocess.Popen(
            [PYTHON, "-m", "streamlit", "run", "Home.py", "--server.headless", "true", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"],
            cwd=ROOT, env=env, stdout=server_log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_http(base + "/_stcore/health", 60)
            time.sleep(1)
            steps["server started"] = proc_mb(server.pid)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_FLAGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(base + "/", wait_until="domcontentloaded")
                page.locator('[data-testid="stSidebar"]').first.wait_for(timeout=120_000)
                page.wait_for_timeout(3000)
                steps["Home page open"] = proc_mb(server.pid)
                t = time.perf_counter()
                page.goto(base + "/predict", wait_until="domcontentloaded")
                page.locator('input[type="file"]').first.wait_for(state="attached", timeout=180_000)
                page.wait_for_timeout(1000)
                predict_open_s = time.perf_counter() - t
                steps["Predict page open (model loaded)"] = proc_mb(server.pid)
                caption = page.get_by_text("It runs on", exact=False).first.inner_text(timeout=30_000)
                engine_shown = "LiteRT" if "LiteRT" in caption else "Keras" if "Keras" in caption else caption[:80]
                t = time.perf_counter()
                page.locator('input[type="file"]').first.set_input_files(image)
                page.get_by_text("Probability of pneumonia", exact=True).first.wait_for(timeout=180_000)
                classify_s = time.perf_counter() - t
                page.wait_for_timeout(2000)
                steps["one image classified (+Grad-CAM)"] = proc_mb(server.pid)
                shot = TMP / f"{label}.png"
                page.screenshot(path=str(shot), full_page=True)
                browser.close()
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    final = steps["one image classified (+Grad-CAM)"]
    return {"env": extra_env or {}, "steps": steps, "rss_mb": final["rss_mb"], "hwm_mb": final["hwm_mb"],
            "predict_open_s": predict_open_s, "classify_s": classify_s, "engine_shown": engine_shown,
            "screenshot": str(shot.relative_to(ROOT)),
            "log": str(log_path.relative_to(ROOT))}


def bench_app(ctx: Context) -> dict:
    out: dict = {}
    # The shipped demo run (what a visitor's Predict page opens), and the same run without its LiteRT
    # export, with which the app predicts through Keras/TensorFlow.
    run_dir = ROOT / "artifacts" / "demo-mobilenet"
    keras_run = TMP / "app_runs_keras" / run_dir.name
    if keras_run.parent.exists():
        shutil.rmtree(keras_run.parent)
    shutil.copytree(run_dir, keras_run, ignore=shutil.ignore_patterns("model.tflite*"))
    for key, run, engine in (("server", run_dir, "LiteRT"), ("server_keras", keras_run, "Keras")):
        log(f"app: Streamlit server, Home -> Predict -> classify one image (headless Chromium), {engine}")
        try:
            out[key] = serve_and_classify(ctx, f"app-{key}", run_dir=run)
            out[key]["engine"] = out[key]["engine_shown"]  # as the page says, not as intended
            log(f"  server RSS {out[key]['rss_mb']:.0f} MB (peak {out[key]['hwm_mb']:.0f} MB) after Predict")
        except Exception as error:  # noqa: BLE001 (reported in the results, the other sections go on)
            out[f"{key}_error"] = f"{type(error).__name__}: {error}"
            log(f"  the browser measurement failed ({out[f'{key}_error'][:200]})")
    # What the figure is made of: the same work in a bare process.
    image = ctx.manifest().query("label == 'PNEUMONIA'")["path"].iloc[0]
    variants = [("import tensorflow only", "tensorflow", run_dir, {}),
                ("pages' imports, no model", "no_tf", run_dir, {}),
                ("pages' imports + Predictor + Grad-CAM, LiteRT", "predict", run_dir, {}),
                ("pages' imports + Predictor + Grad-CAM, Keras", "predict", keras_run, {})]
    if ctx.p["app_variants"]:
        variants += [("same, Keras, MALLOC_ARENA_MAX=2", "predict", keras_run, {"MALLOC_ARENA_MAX": "2"})]
    out["inprocess"] = []
    for i, (name, mode, run, env) in enumerate(variants):
        result = worker("app_inprocess", {"mode": mode, "run_dir": str(run), "image": image},
                        f"app-inprocess-{i}", env=env)
        last = list(result["steps"].values())[-1]
        out["inprocess"].append({"name": name, "env": env, "steps": result["steps"], "engine": result.get("engine"),
                                 "rss_mb": last.get("VmRSS"), "hwm_mb": last.get("VmHWM")})
        log(f"  in-process [{name}]: RSS {last.get('VmRSS', 0):.0f} MB, peak {last.get('VmHWM', 0):.0f} MB")
    return out


# ---------------------------------------------------------------------------------------------
# 6. Page render times
# ---------------------------------------------------------------------------------------------
def bench_pages(ctx: Context) -> dict:
    run_dir = ctx.demo_run()
    files = [f"pages/{name}.py" for name in PAGE_ORDER if (ROOT / "pages" / f"{name}.py").is_file()]
    missing = [name for name in PAGE_ORDER if not (ROOT / "pages" / f"{name}.py").is_file()]
    log(f"pages: AppTest render of {', '.join(files)} with kermany224 selected (cold, then warm)")
    env = {"CXR_RUNS_DIR": str(run_dir.parent), "CXR_DATA_ROOT": str(ctx.data_root())}
    result = worker("pages", {"pages": files, "dataset": "kermany224"}, "pages", env=env)
    for page, entry in result["pages"].items():
        log(f"  {page}: cold {entry.get('cold_s', 0):.2f} s, warm {entry.get('warm_s', 0):.2f} s"
            + (f"  EXCEPTION {entry.get('warm_exceptions') or entry.get('warm_failed')}"
               if entry.get("warm_exceptions") or entry.get("warm_failed") else ""))
    result["missing_pages"] = missing
    return result


# ---------------------------------------------------------------------------------------------
# Table, targets, output
# ---------------------------------------------------------------------------------------------
def _fmt(value, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}{unit}"


def verdict(ok: bool | None, quick: bool) -> str:
    if ok is None:
        return "n/a"
    text = "PASS" if ok else "FAIL"
    return f"({text})" if quick else text


def build_rows(results: dict) -> list[dict]:
    """One row per figure: measure, ours, other side, ratio, target, verdict."""
    quick = results["quick"]
    s = results["sections"]
    rows: list[dict] = []

    def add(section, measure, ours, other="", ratio="", target="", ok=None):
        rows.append({"section": section, "measure": measure, "ours": ours, "other": other, "ratio": ratio,
                     "target": target, "verdict": verdict(ok, quick) if target else ""})

    for key, backbone in (("train-mobilenet", "mobilenet_v2"), ("train-inception", "inception_v3")):
        t = s.get(key)
        if not t or "error" in t:
            if t:
                add(key, "ERROR", t["error"][:80])
            continue
        full = backbone == "mobilenet_v2" and t["n_images"] >= 5000
        ref, cold, warm = t["reference"], t["ours_cold"], t["ours_warm"]
        rw, cw, ww = ref["process"]["wall_s"], cold["process"]["wall_s"], warm["process"]["wall_s"]
        name = f"{backbone} {t['image_size']}px, {t['n_images']} images, {t['epochs']} epochs"
        add(key, f"train wall time, cold cache [{name}]", _fmt(cw, " s"), _fmt(rw, " s") + " (reference)",
            _fmt(rw / cw, "x"), ">= 5x" if full else "", (rw / cw >= 5) if full else None)
        add(key, "train wall time, warm cache", _fmt(ww, " s"), _fmt(rw, " s") + " (reference)",
            _fmt(rw / ww, "x"), ">= 50x" if full else "", (rw / ww >= 50) if full else None)
        if "ours_resident" in t:
            res = t["ours_resident"]
            add(key, "train wall time, warm cache, resident worker (its first job; after a job, mean)",
                f"{_fmt(res['first_s'], ' s')}; {_fmt(res['later_mean_s'], ' s')}", _fmt(rw, " s") + " (reference)",
                f"{_fmt(rw / res['first_s'], 'x')}; {_fmt(rw / res['later_mean_s'], 'x')}", ">= 50x" if full else "",
                (rw / res["later_mean_s"] >= 50) if full else None)
        add(key, "reference: per epoch (fit on arrays)", "", _fmt(sum(ref["epoch_s"]) / len(ref["epoch_s"]), " s"))
        diff = abs(cold["test_accuracy"] - ref["test_accuracy"]) * 100
        pretrained = backbone == "mobilenet_v2"  # InceptionV3 runs with random weights (timing only)
        label = "test accuracy at 0.5 (cold run; warm run)"
        add(key, label + ("" if pretrained else " [random weights: not meaningful]"),
            f"{cold['test_accuracy']:.4f}; {warm['test_accuracy']:.4f}", f"{ref['test_accuracy']:.4f}",
            f"{diff:.2f} pt", "within 1 pt" if pretrained else "", diff <= 1.0 + 1e-9 if pretrained else None)
        add(key, "same split and same number of augmented images", str(t["same_split"] and t["same_n_augmented"]))
        if "same_augmented_images" in t:
            add(key, "same augmented images (sources and seeds); same training row order",
                f"{t['same_augmented_images']}; {t.get('same_train_order')}")
        rp, cp, wp = ref["process"]["peak_mb"], cold["process"]["peak_mb"], warm["process"]["peak_mb"]
        add(key, "peak memory (cold; warm)", f"{cp:.0f} MB; {wp:.0f} MB", f"{rp:.0f} MB",
            _fmt(rp / cp, "x less"), "<= 1536 MB" if full else "", (max(cp, wp) <= 1536) if full else None)
    e = s.get("extract")
    if e and "error" not in e:
        for backbone, x in e.items():
            ours, bare = x["ours"], x["bare"]
            ratio = ours["images_per_s_excl_build"] / bare["images_per_s"]
            add("extract",
                f"feature extraction {backbone}, {x['n']} images, cold cache (img/s, excl. one-off model build)",
                _fmt(ours["images_per_s_excl_build"]), _fmt(bare["images_per_s"]) + " (bare predict)",
                f"{ratio:.0%}", ">= 90%", ratio >= 0.9)
            add("extract", f"  same, end to end incl. model build ({ours['model_build_s']:.1f} s)",
                _fmt(ours["images_per_s"]), "", f"{ours['images_per_s'] / bare['images_per_s']:.0%}")
            if "compiled_images_per_s" in bare:
                add("extract",
                    "  against the same compiled call on arrays in memory (the cost of decoding and loading)",
                    _fmt(ours["images_per_s_excl_build"]), _fmt(bare["compiled_images_per_s"]) + " (compiled)",
                    f"{ours['images_per_s_excl_build'] / bare['compiled_images_per_s']:.0%}")
    elif e:
        add("extract", "ERROR", e["error"][:80])
    lat = s.get("latency")
    if lat and "error" not in lat:
        for backbone, engines in lat.items():
            limit = 0.3 if backbone == "mobilenet_v2" else 1.0
            for engine, x in engines.items():
                name = f"{backbone} [{x.get('engine', engine)}]"
                add("latency", f"{name} probability p50 / p95 ({x['calls']} calls)",
                    f"{x['prob_p50_s'] * 1000:.0f} / {x['prob_p95_s'] * 1000:.0f} ms")
                add("latency", f"{name} probability + Grad-CAM p50 / p95",
                    f"{x['gradcam_p50_s'] * 1000:.0f} / {x['gradcam_p95_s'] * 1000:.0f} ms", "", "",
                    f"p50 <= {limit * 1000:.0f} ms", x["gradcam_p50_s"] <= limit)
                add("latency", f"{name} load run / first call prob / first call Grad-CAM",
                    f"{x['load_s']:.1f} / {x['prob_first_s']:.2f} / {x['gradcam_first_s']:.2f} s")
    elif lat:
        add("latency", "ERROR", lat["error"][:80])
    app = s.get("app")
    if app and "error" not in app:
        for key in ("server", "server_keras"):
            if key in app:
                sv = app[key]
                shipped = key == "server"  # a finished run has model.tflite: that is what users get
                add("app", f"Streamlit server RSS after Predict + 1 image (peak) [{sv.get('engine')}"
                    + ("]" if shipped else ": a run without model.tflite]"),
                    f"{sv['rss_mb']:.0f} MB ({sv['hwm_mb']:.0f})", "", "", "<= 700 MB" if shipped else "",
                    sv["rss_mb"] <= 700 if shipped else None)
                for step, m in sv["steps"].items():
                    add("app", f"  server: {step}", f"{m['rss_mb']:.0f} MB")
                add("app", "  Predict page open / classify one image (browser)",
                    f"{sv['predict_open_s']:.1f} / {sv['classify_s']:.1f} s")
            elif f"{key}_error" in app:
                add("app", f"Streamlit server (browser) failed [{key}]", app[f"{key}_error"][:80])
        for v in app.get("inprocess", []):
            add("app", f"  in-process: {v['name']}", f"{(v['rss_mb'] or 0):.0f} MB ({(v['hwm_mb'] or 0):.0f})")
    elif app:
        add("app", "ERROR", app["error"][:80])
    pg = s.get("pages")
    if pg and "error" not in pg:
        for page, entry in pg["pages"].items():
            failed = entry.get("warm_failed") or entry.get("warm_exceptions")
            warm = entry.get("warm_s")
            add("pages", f"render {page} (cold; warm = stats cached)",
                f"{_fmt(entry.get('cold_s'), ' s', 2)}; {_fmt(warm, ' s', 2)}" + (" EXCEPTION" if failed else ""),
                "", "", "< 2 s warm", (warm is not None and warm < 2.0 and not failed))
        for name in pg.get("missing_pages", []):
            add("pages", f"render pages/{name}.py", "page not written yet")
    elif pg:
        add("pages", "ERROR", pg["error"][:80])
    return rows


def render_table(rows: list[dict], markdown: bool = False) -> str:
    headers = ["section", "measure", "ours", "other", "ratio", "target", "verdict"]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for r in rows:
            lines.append("| " + " | ".join(str(r[h]).replace("|", "/") for h in headers) + " |")
        return "\n".join(lines)
    widths = {h: min(max(len(h), *(len(str(r[h])) for r in rows)) if rows else len(h), 70) for h in headers}
    line = "  ".join(h.ljust(widths[h]) for h in headers)
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(str(r[h])[: widths[h]].ljust(widths[h]) for h in headers))
    return "\n".join(out)


def combine(files: list[str]) -> dict:
    """One results dict from several runs: each section from the last file that has it."""
    combined: dict = {"quick": False, "sections": {}, "sources": {}}
    for name in files:
        part = json.loads(Path(name).read_text())
        if part.get("quick"):
            raise SystemExit(f"{name} is a --quick run; combine full-size sections only.")
        for section, value in part["sections"].items():
            if "error" not in value:
                combined["sections"][section] = value
                combined["sources"][section] = {"file": Path(name).name, "started": part["started"],
                                                "commit": part["machine"].get("git_commit"),
                                                "loadavg_start": part["machine"].get("loadavg_start")}
        combined.update(machine=part["machine"], started=part["started"], duration_s=part.get("duration_s", 0),
                        loadavg_end=part.get("loadavg_end", []))
    return combined


def _warm_stages(results: dict) -> list[str]:
    """Where a warm run's time goes (the 50x target is bound by these fixed costs)."""
    lines = []
    for key in ("train-mobilenet", "train-inception"):
        t = results["sections"].get(key)
        if not t or "ours_warm" not in t:
            continue
        warm = t["ours_warm"]
        stages = ", ".join(f"{name} {sec:.2f} s" for name, sec in warm["stages"].items() if not name.startswith("_"))
        outside = warm["process"]["wall_s"] - warm["in_process_s"]
        lines += [f"Warm run of {key}, {warm['process']['wall_s']:.1f} s in all: interpreter start and imports before "
                  f"the worker's clock {outside:.2f} s; then {stages}. The split stage includes importing Keras "
                  "(TensorFlow), about 3 s here.", ""]
    return lines


def write_markdown(results: dict, rows: list[dict]) -> None:
    m = results["machine"]
    if results.get("sources"):
        origin = ["Combined by `python -m benchmarks.run --combine FILE...` from these runs (each section from "
                  "the last run that measured it):", ""]
        for section, src in results["sources"].items():
            load = ", ".join(f"{v:.1f}" for v in (src.get("loadavg_start") or []))
            origin.append(f"- {section}: `results/{src['file']}`, {src['started']}, commit {src['commit']}, "
                          f"load at start {load}")
        origin.append("")
    else:
        origin = [f"Written by `python -m benchmarks.run` on {results['started']} (full suite, "
                  f"{results['duration_s'] / 60:.1f} min).", ""]
    text = [
        "# Benchmark results",
        "",
        *origin,
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gb')} GB RAM, {m.get('platform')}; "
        f"Python {m.get('python')}, TensorFlow {m.get('tensorflow')}, Keras {m.get('keras')}, "
        f"Streamlit {m.get('streamlit')}"
        + (" (a shared machine: timings are noisy)." if results.get("sources") else
           f"; commit {m.get('git_commit')}. Load average at start "
           f"{', '.join(f'{v:.1f}' for v in m.get('loadavg_start', []))}, at end "
           f"{', '.join(f'{v:.1f}' for v in results.get('loadavg_end', []))} (a shared machine: timings are noisy)."),
        "",
        "Data: the 5,222 real Kermany chest X-rays in `../shared/data/kermany224` (224x224 JPEG); random "
        "stratified 8:1:1 split with seed 123, training NORMAL images augmented to balance, on both sides.",
        "",
        render_table(rows, markdown=True),
        "",
        *_warm_stages(results),
        "Full figures (per-stage times, per-epoch times, process logs): the JSON files in `benchmarks/results/` "
        "(not committed; rerun to get them).",
        "",
    ]
    # Sections measured by other scripts (soak.py, upload_memory.py) follow a marker and are kept.
    old = (BENCH / "RESULTS.md").read_text() if (BENCH / "RESULTS.md").is_file() else ""
    kept = old[old.index(KEPT_MARKER):] if KEPT_MARKER in old else ""
    (BENCH / "RESULTS.md").write_text("\n".join(text) + ("\n" + kept if kept else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark suite (not part of pytest).")
    parser.add_argument("--quick", action="store_true", help="small subsets, few epochs and calls (~5 min)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, metavar="NAME",
                        help=f"run only these sections: {', '.join(SECTIONS)}")
    parser.add_argument("--epochs", type=int, help="override the epochs of the training comparison")
    parser.add_argument("--inception-n", type=int, help="images of the InceptionV3 training comparison (default 500)")
    parser.add_argument("--no-markdown", action="store_true", help="do not rewrite benchmarks/RESULTS.md")
    parser.add_argument("--resident", action="store_true",
                        help="also time warm training runs through a resident worker (python -m cxr_core worker)")
    parser.add_argument("--combine", nargs="+", metavar="FILE",
                        help="write RESULTS.md from these results/*.json (later files win per section); runs nothing")
    opts = parser.parse_args(argv)
    if opts.combine:
        results = combine(opts.combine)
        rows = build_rows(results)
        print(render_table(rows))
        write_markdown(results, rows)
        print(f"wrote {BENCH / 'RESULTS.md'}")
        return 0
    if not DATA.is_dir() or not WEIGHTS.is_file():
        print(f"The benchmarks need {DATA} and {WEIGHTS} (../shared); they are absent.", file=sys.stderr)
        return 2
    TMP.mkdir(parents=True, exist_ok=True)
    ctx = Context(opts)
    started = dt.datetime.now()
    t0 = time.time()
    log("collecting machine information")
    results = {"started": started.isoformat(timespec="seconds"), "quick": opts.quick, "params": ctx.p,
               "machine": machine_info(), "sections": {}}
    selected = opts.only or list(SECTIONS)
    runners = {"extract": bench_extract, "latency": bench_latency, "app": bench_app, "pages": bench_pages,
               "train-mobilenet": lambda c: bench_train(c, "mobilenet_v2"),
               "train-inception": lambda c: bench_train(c, "inception_v3")}
    stamp = started.strftime("%Y%m%d-%H%M%S")
    for name in SECTIONS:
        if name not in selected:
            continue
        t = time.time()
        try:
            results["sections"][name] = runners[name](ctx)
        except Exception as error:  # noqa: BLE001 (one broken section must not lose the others)
            traceback.print_exc()
            results["sections"][name] = {"error": f"{type(error).__name__}: {error}",
                                         "traceback": traceback.format_exc()}
        results.setdefault("section_s", {})[name] = time.time() - t
        log(f"section {name} took {time.time() - t:.0f} s")
        _save(results, stamp)
    results["duration_s"] = time.time() - t0
    results["loadavg_end"] = os.getloadavg()
    rows = build_rows(results)
    results["table"] = rows
    _save(results, stamp)
    print()
    print(render_table(rows))
    print(f"\nwrote {RESULTS / (stamp + '.json')} and latest.json ({results['duration_s'] / 60:.1f} min)")
    if not opts.quick and not opts.only and not opts.no_markdown:
        write_markdown(results, rows)
        print(f"wrote {BENCH / 'RESULTS.md'}")
    return 0


def _save(results: dict, stamp: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, default=str)
    (RESULTS / f"{stamp}.json").write_text(text)
    (RESULTS / "latest.json").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
