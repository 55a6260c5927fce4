"""A long session on one server: does its memory stay bounded?

Serves the app with `streamlit run Home.py` (a data root holding the Kermany folder, the demo run),
opens every page in headless Chromium with the Kermany folder chosen, then uploads X-rays on the
Predict page a batch at a time (the uploader keeps the earlier files, as it does for a person who
drops more). The server's memory (RSS of the process and its children) is recorded at start, after
the pages, and after every batch; the results go to benchmarks/results/soak-<time>.json and a table
is printed.

    .venv/bin/python -m benchmarks.soak                      # 200 images, 20 at a time
    .venv/bin/python -m benchmarks.soak --images 60 --batch 20

Targets: at most 300 MB at the end, at most 50 MB of growth from the first batch to the last.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks.appserver import CHROMIUM, CHROMIUM_FLAGS, MENU, ROOT, SHARED, log, open_page, rss_mb, serve, settle

KERMANY = SHARED / "data" / "kermany224"
END_TARGET_MB = 300.0
GROWTH_TARGET_MB = 50.0


def choose_dataset(page, name: str) -> None:
    """Choose ``name`` in the Dataset page's folder box unless it is already the session's data set."""
    box = page.locator("[data-testid='stSelectbox']", has_text="Data set folder").first
    box.wait_for(timeout=60_000)
    if name in box.inner_text():
        return
    box.click()
    page.get_by_role("option", name=name).first.click()
    settle(page, timeout_s=600)


def images_to_upload(n: int) -> list[str]:
    """``n`` Kermany images, the two classes alternating, in a fixed order."""
    manifest = pd.read_csv(KERMANY / "manifest.csv")
    normal = manifest[manifest["label"] == "NORMAL"].sample(n - n // 2, random_state=0)["path"].tolist()
    pneumonia = manifest[manifest["label"] == "PNEUMONIA"].sample(n // 2, random_state=0)["path"].tolist()
    mixed = [p for pair in zip(normal, pneumonia + [None]) for p in pair if p is not None]
    return [str(KERMANY / p) for p in mixed]


def soak(n_images: int, batch: int, workdir: Path, extra_env: dict | None = None) -> dict:
    from playwright.sync_api import sync_playwright

    data_root = workdir / "data"
    data_root.mkdir(parents=True, exist_ok=True)
    link = data_root / KERMANY.name
    if not link.exists():
        link.symlink_to(KERMANY.resolve(), target_is_directory=True)
    env = {"CXR_DATA_ROOT": str(data_root), "CXR_RUNS_DIR": str(workdir / "runs"),
           "CXR_CACHE_DIR": str(workdir / "cache"), "CXR_DEMO_RUN": str(ROOT / "artifacts" / "demo-mobilenet"),
           "PYTHONPATH": str(ROOT), **(extra_env or {})}
    files = images_to_upload(n_images)
    steps: list[dict] = []
    started = time.time()
    with serve(env, workdir / "streamlit.log") as (base, server):
        def record(step: str) -> None:
            steps.append({"step": step, "rss_mb": round(rss_mb(server.pid), 1),
                          "seconds": round(time.time() - started, 1)})
            log(f"{step:<32} {steps[-1]['rss_mb']:7.1f} MB")

        time.sleep(1)
        record("server started")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(base + "/", wait_until="domcontentloaded")
            settle(page)
            record("first page (Home)")
            open_page(page, "Dataset")
            choose_dataset(page, KERMANY.name)
            record("Dataset (Kermany chosen)")
            for title in MENU:
                if title not in ("Home", "Dataset"):
                    open_page(page, title)
                    record(title)
            open_page(page, "Home")
            record("after every page")
            open_page(page, "Predict")
            uploader = page.locator("input[type='file']").first
            uploader.wait_for(state="attached", timeout=180_000)
            for start in range(0, len(files), batch):
                chunk = files[start:start + batch]
                uploader.set_input_files(chunk)
                page.get_by_text("All results").first.wait_for(timeout=300_000)
                settle(page, timeout_s=600, quiet_s=2.0)
                record(f"{start + len(chunk)} images uploaded")
            browser.close()
        time.sleep(2)
        record("browser closed")
    batches = [s for s in steps if s["step"].endswith("images uploaded")]
    first, last = batches[0]["rss_mb"], batches[-1]["rss_mb"]
    return {"steps": steps, "env": extra_env or {}, "images": n_images, "batch": batch,
            "first_batch_mb": first, "last_batch_mb": last,
            "growth_mb": round(last - first, 1), "end_mb": last,
            "end_ok": last <= END_TARGET_MB, "growth_ok": last - first <= GROWTH_TARGET_MB,
            "seconds": round(time.time() - started, 1)}


def table(result: dict) -> str:
    lines = [f"{'step':<32} {'RSS MB':>8} {'s':>7}"]
    lines += [f"{s['step']:<32} {s['rss_mb']:8.1f} {s['seconds']:7.1f}" for s in result["steps"]]
    lines.append(f"end {result['end_mb']:.0f} MB (target <= {END_TARGET_MB:.0f}: "
                 f"{'PASS' if result['end_ok'] else 'FAIL'}); growth first->last batch {result['growth_mb']:+.0f} MB "
                 f"(target <= {GROWTH_TARGET_MB:.0f}: {'PASS' if result['growth_ok'] else 'FAIL'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="X-rays uploaded on the Predict page")
    parser.add_argument("--batch", type=int, default=20, help="X-rays per upload")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the server (repeatable), e.g. MALLOC_ARENA_MAX=2")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (server log)")
    args = parser.parse_args(argv)
    extra_env = dict(item.split("=", 1) for item in args.env)
    if not KERMANY.is_dir() or not Path(CHROMIUM).exists():
        print(f"The soak needs {KERMANY} and Chromium at {CHROMIUM}.", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="cxr-soak-"))
    try:
        result = soak(args.images, args.batch, workdir, extra_env)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result["machine"] = {"python": platform.python_version(), "platform": platform.platform()}
    out = ROOT / "benchmarks" / "results" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"written: {out.relative_to(ROOT)}")
    return 0 if result["end_ok"] and result["growth_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
