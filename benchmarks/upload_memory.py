"""The server's memory while a large zip is uploaded on the Dataset page and unpacked.

Builds a zip of synthetic X-ray-sized images (incompressible noise PNGs, stored) under /tmp, serves
the app with `streamlit run Home.py`, chooses the Kermany folder on the Dataset page (so the server has
done its usual work first), then uploads the zip through headless Chromium and unpacks it. The
server's RSS (process and children) is sampled every 50 ms; results go to
benchmarks/results/upload-<time>.json and a table is printed.

    .venv/bin/python -m benchmarks.upload_memory            # a 300 MB zip
    .venv/bin/python -m benchmarks.upload_memory --mb 100

Targets: peak at most 150 MB above the level before the upload, and back within 50 MB afterwards.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np

from benchmarks.appserver import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    ROOT,
    SHARED,
    PeakSampler,
    log,
    open_page,
    rss_mb,
    serve,
    settle,
)
from benchmarks.soak import choose_dataset

KERMANY = SHARED / "data" / "kermany224"
PEAK_TARGET_MB = 150.0
AFTER_TARGET_MB = 50.0
SIDE = 1500  # pixels: a 2.25 MB noise PNG, about the size of an original Kermany film


def build_zip(path: Path, megabytes: int) -> int:
    """A zip of NORMAL/ and PNEUMONIA/ noise PNGs adding up to ``megabytes``; returns its size."""
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        i = 0
        while archive.fp.tell() < megabytes * 1e6:
            gray = rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
            ok, png = cv2.imencode(".png", gray, [cv2.IMWRITE_PNG_COMPRESSION, 1])
            assert ok
            label = "PNEUMONIA" if i % 2 else "NORMAL"
            archive.writestr(f"{label}/person{i}_{'bacteria' if i % 2 else 'IM'}_{i}.png", png.tobytes())
            i += 1
    return path.stat().st_size


def measure(zip_path: Path, workdir: Path) -> dict:
    from playwright.sync_api import sync_playwright

    data_root = workdir / "data"
    data_root.mkdir(parents=True, exist_ok=True)
    (data_root / KERMANY.name).symlink_to(KERMANY.resolve(), target_is_directory=True)
    env = {"CXR_DATA_ROOT": str(data_root), "CXR_RUNS_DIR": str(workdir / "runs"),
           "CXR_CACHE_DIR": str(workdir / "cache"), "CXR_DEMO_RUN": str(ROOT / "artifacts" / "demo-mobilenet"),
           "PYTHONPATH": str(ROOT)}
    target = data_root / re.sub(r"[^A-Za-z0-9_.-]+", "-", zip_path.stem)
    out: dict = {"zip_mb": round(zip_path.stat().st_size / 2**20, 1)}
    with serve(env, workdir / "streamlit.log") as (base, server), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(base + "/", wait_until="domcontentloaded")
        settle(page)
        open_page(page, "Dataset")
        choose_dataset(page, KERMANY.name)
        page.get_by_role("tab", name=re.compile("Upload a zip")).click()
        settle(page)
        time.sleep(3)
        out["before_mb"] = round(rss_mb(server.pid), 1)
        log(f"before the upload: {out['before_mb']:.1f} MB")
        started = time.time()
        with PeakSampler(server.pid) as upload_peak:
            page.locator("input[type='file']").first.set_input_files(str(zip_path))
            page.get_by_text("is on the server's disk").first.wait_for(timeout=600_000)
            settle(page)
        out["upload_s"] = round(time.time() - started, 1)
        out["upload_peak_mb"] = round(upload_peak.peak, 1)
        out["held_on_disk_mb"] = round(rss_mb(server.pid), 1)
        log(f"uploaded and moved to disk in {out['upload_s']} s: peak {upload_peak.peak:.1f} MB, "
            f"now {out['held_on_disk_mb']:.1f} MB")
        started = time.time()
        with PeakSampler(server.pid) as unpack_peak:
            page.get_by_role("button", name=re.compile("Unpack into the data folder")).click()
            while not target.is_dir() and time.time() - started < 600:
                time.sleep(0.1)
            settle(page, timeout_s=600)
        out["unpack_s"] = round(time.time() - started, 1)
        out["unpack_peak_mb"] = round(unpack_peak.peak, 1)
        out["unpacked"] = target.is_dir()
        time.sleep(3)
        out["after_mb"] = round(rss_mb(server.pid), 1)
        log(f"unpacked in {out['unpack_s']} s: peak {unpack_peak.peak:.1f} MB; after {out['after_mb']:.1f} MB")
        browser.close()
    peak = max(out["upload_peak_mb"], out["unpack_peak_mb"])
    out.update(peak_mb=peak, peak_rise_mb=round(peak - out["before_mb"], 1),
               after_rise_mb=round(out["after_mb"] - out["before_mb"], 1))
    out["peak_ok"] = out["peak_rise_mb"] <= PEAK_TARGET_MB
    out["after_ok"] = out["after_rise_mb"] <= AFTER_TARGET_MB
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=300, help="size of the zip in MB")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (server log)")
    args = parser.parse_args(argv)
    if not KERMANY.is_dir() or not Path(CHROMIUM).exists():
        print(f"The benchmark needs {KERMANY} and Chromium at {CHROMIUM}.", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="cxr-upload-"))
    try:
        zip_path = workdir / "Big ward.zip"
        log(f"building a {args.mb} MB zip...")
        build_zip(zip_path, args.mb)
        result = measure(zip_path, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    out = ROOT / "benchmarks" / "results" / f"upload-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    verdict = {True: "PASS", False: "FAIL"}
    print(f"zip {result['zip_mb']:.0f} MB; server before {result['before_mb']:.0f} MB, peak {result['peak_mb']:.0f} MB "
          f"({result['peak_rise_mb']:+.0f}; target <= +{PEAK_TARGET_MB:.0f}: {verdict[result['peak_ok']]}), "
          f"held on disk {result['held_on_disk_mb']:.0f} MB, after unpacking {result['after_mb']:.0f} MB "
          f"({result['after_rise_mb']:+.0f}; target <= +{AFTER_TARGET_MB:.0f}: {verdict[result['after_ok']]})")
    print(f"written: {out.relative_to(ROOT)}")
    return 0 if result["peak_ok"] and result["after_ok"] and result["unpacked"] else 1


if __name__ == "__main__":
    sys.exit(main())
