"""Serve the app with `streamlit run Home.py`, measure its memory, and drive it in headless Chromium.

Shared by the memory benchmarks (``soak.py``, ``upload_memory.py``). Memory is the resident set size
of the server process plus all its children (psutil), in MB (2**20 bytes).
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import psutil

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MENU = ["Home", "Dataset", "Augmentation", "Training", "Evaluation", "Predict", "Leaderboard"]
HEADINGS = {"Home": "pneumonia workbench"}  # a page's title where it differs from its menu entry


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants, in MB."""
    try:
        process = psutil.Process(pid)
        members = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for member in members:
        with contextlib.suppress(psutil.Error):
            total += member.memory_info().rss
    return total / 2**20


class PeakSampler:
    """Samples ``rss_mb(pid)`` every ``interval`` seconds in a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))


@contextlib.contextmanager
def serve(env: dict, log_path: Path, python: str = sys.executable,
          extra_args: list[str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`streamlit run Home.py` headless on a free port (``extra_args``: more of its options); yields (base URL,
    process)."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as server_log:
        server = subprocess.Popen(
            [python, "-m", "streamlit", "run", "Home.py", "--server.headless", "true", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none", *(extra_args or [])],
            cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env},
            stdout=server_log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 90
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"streamlit exited with code {server.returncode}; see {log_path}")
                try:
                    with urllib.request.urlopen(base + "/_stcore/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    if time.time() > deadline:
                        raise
                time.sleep(0.3)
            yield base, server
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def settle(page, timeout_s: float = 180.0, quiet_s: float = 1.5) -> None:
    """Wait until the page has a title and the script has stopped running for ``quiet_s`` seconds."""
    page.wait_for_selector("[data-testid='stApp']", timeout=timeout_s * 1000)
    page.wait_for_selector("h1", timeout=timeout_s * 1000)
    deadline = time.time() + timeout_s
    quiet_since = None
    while time.time() < deadline:
        if page.locator("[data-testid='stStatusWidget']").count() > 0:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.time()
        elif time.time() - quiet_since > quiet_s:
            return
        time.sleep(0.25)
    raise TimeoutError(f"the page was still running after {timeout_s:.0f} s")


def open_page(page, title: str) -> None:
    """Click a page in the sidebar menu (one browser session, as a person navigates) and wait for it."""
    page.locator("[data-testid='stSidebarNav'] a", has_text=title).first.click()
    heading = HEADINGS.get(title, title)
    page.wait_for_function(f"() => [...document.querySelectorAll('h1')].some(h => h.innerText.includes('{heading}'))",
                           timeout=120_000)
    settle(page)
