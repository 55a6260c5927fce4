"""One real-browser test: serve the app with `streamlit run` and load every page in headless Chromium.

It catches what AppTest cannot: the front end rendering each page (charts, images, layout), and
errors raised while the served app runs. A full-page screenshot of every page is saved under
screenshots/ in the test artifacts folder (``$CXR_TEST_ARTIFACTS``, else pytest's temporary
directory; see conftest.py) for a human to look at. Skips when Chromium is not installed.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# A deep link comes first: the first request to a fresh server must still go through Home.py's router.
PAGES = {"predict": "predict", "home": "", "lessons": "lessons", "dataset": "dataset", "augmentation": "augmentation",
         "training": "training", "evaluation": "evaluation", "leaderboard": "leaderboard"}
MENU = ["Home", "Lessons", "Dataset", "Augmentation", "Training", "Evaluation", "Predict", "Leaderboard"]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"streamlit did not answer at {url} within {timeout:.0f} s")


@pytest.fixture
def served_app(tmp_path):
    """`streamlit run Home.py` on a free port, with a practice data set in the (temporary) data root."""
    from cxr_core.data import practice

    practice.make_practice_dataset(Path(os.environ["CXR_DATA_ROOT"]), n_normal=12, n_pneumonia=24, size=64)
    port = _free_port()
    log = open(tmp_path / "streamlit.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "Home.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _full_height(page) -> None:
    """Grow the viewport to the page's height: Streamlit scrolls inside its own container."""
    height = page.evaluate("() => (document.querySelector(\"[data-testid='stMain']\") || document.body).scrollHeight")
    page.set_viewport_size({"width": 1400, "height": min(int(height) + 40, 8000)})
    time.sleep(1.0)  # charts redraw at the new size


def _settle(page, timeout_s: float = 60.0) -> None:
    """Wait until the page has a title and the script has stopped running."""
    page.wait_for_selector("[data-testid='stApp']", timeout=timeout_s * 1000)
    page.wait_for_selector("h1", timeout=timeout_s * 1000)
    deadline = time.time() + timeout_s
    quiet_since = None
    while time.time() < deadline:
        running = page.locator("[data-testid='stStatusWidget']").count() > 0
        if running:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.time()
        elif time.time() - quiet_since > 1.5:
            return
        time.sleep(0.25)


def test_every_page_renders_in_a_real_browser(served_app, test_artifacts):
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    screenshots = test_artifacts / "screenshots"
    screenshots.mkdir(parents=True, exist_ok=True)
    user_data = Path(os.environ["CXR_CACHE_DIR"]).parent / "chromium-profile"
    with playwright.sync_playwright() as p:
        # Playwright passes --user-data-dir itself for a persistent context.
        browser = p.chromium.launch_persistent_context(
            str(user_data), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1400, "height": 900})
        try:
            page = browser.new_page()
            for name, path in PAGES.items():
                page.goto(f"{served_app}/{path}", wait_until="domcontentloaded")
                _settle(page)
                if name == "dataset":
                    # Choose the practice set so the data set views render too.
                    page.locator("[data-testid='stSelectbox']").first.click()
                    page.get_by_role("option").first.click()
                    _settle(page)
                    page.wait_for_selector("text=Class balance", timeout=60_000)
                    _settle(page)
                body = page.inner_text("body")
                _full_height(page)
                page.screenshot(path=str(screenshots / f"{name}.png"), full_page=True)
                assert page.locator("[data-testid='stException']").count() == 0, f"{name}: an exception is shown"
                assert "Traceback" not in body, f"{name}: a traceback is shown"
                assert page.locator("h1").count() >= 1, f"{name}: no title"
                page.set_viewport_size({"width": 1400, "height": 900})
                menu = page.locator("[data-testid='stSidebarNav'] a").all_inner_texts()
                assert [m.split("\n")[-1].strip() for m in menu] == MENU, f"{name}: menu is {menu}"
        finally:
            browser.close()


def test_a_link_with_settings_and_a_reload_keep_the_data_set_and_the_settings(served_app):
    """A teacher's link opens the Training page with its settings; a change and a reload keep them."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    from conftest import make_dataset
    from cxr_core.data.practice import PRACTICE_FOLDER_NAME

    make_dataset(Path(os.environ["CXR_DATA_ROOT"]) / "other", n_normal=4, n_pneumonia=4, size=32)  # two to choose
    link = f"{served_app}/training?dataset={PRACTICE_FOLDER_NAME}&split=patient&rotation_range=5&train_epochs=7"

    def check(page, epochs: str) -> None:
        _settle(page, 120)
        assert page.get_by_label("Epochs", exact=True).input_value() == epochs
        sidebar = page.inner_text("[data-testid='stSidebar']")
        assert PRACTICE_FOLDER_NAME in sidebar and "Split: patient" in sidebar, sidebar
        assert "rotation ±5°" in page.inner_text("[data-testid='stMain']")
        assert page.locator("[data-testid='stException']").count() == 0

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(link, wait_until="domcontentloaded")
            check(page, "7")
            field = page.get_by_label("Epochs", exact=True)
            field.fill("9")
            field.press("Enter")
            page.wait_for_url("**train_epochs=9**", timeout=30_000)
            _settle(page)
            assert f"dataset={PRACTICE_FOLDER_NAME}" in page.url and "split=patient" in page.url
            page.reload(wait_until="domcontentloaded")
            check(page, "9")
        finally:
            browser.close()
