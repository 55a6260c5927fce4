"""A hosted class in a real browser: the operator stays the operator after a reload, and a cookie written by
hand gets a fresh workspace. Serves the app with an ``operator_passphrase`` (a secrets file outside the
project) and drives two headless-Chromium contexts, a teacher's and a student's. Skips without Chromium.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_browser import CHROMIUM, CHROMIUM_ARGS, PROJECT_ROOT, _free_port, _settle, _wait_healthy

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PASSPHRASE = "correct horse battery staple 7"
SIGNED_ID = re.compile(r"^b-[0-9a-f]{24}\.[A-Za-z0-9_-]{43}$")


@pytest.fixture
def hosted_app(tmp_path):
    """`streamlit run Home.py` with an operator passphrase, on a free port."""
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(f'operator_passphrase = "{PASSPHRASE}"\n', encoding="utf-8")
    port = _free_port()
    log = open(tmp_path / "streamlit.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "Home.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none", "--secrets.files", str(secrets)],
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


def _cookie(context, name: str, timeout_s: float = 20.0, unlike: str | None = None) -> dict:
    """The browser's cookie ``name`` once it is there (and differs from ``unlike``)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        found = {c["name"]: c for c in context.cookies()}
        if name in found and found[name]["value"] != unlike:
            return found[name]
        time.sleep(0.25)
    raise AssertionError(f"the browser never kept a new {name} cookie: {context.cookies()}")


def _sidebar(page) -> str:
    return page.locator("[data-testid='stSidebar']").inner_text()


def test_the_operator_survives_a_reload_and_a_forged_cookie_gets_a_fresh_workspace(hosted_app):
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            teacher = browser.new_context(viewport={"width": 1400, "height": 900})
            page = teacher.new_page()
            page.goto(hosted_app, wait_until="domcontentloaded")
            _settle(page)
            assert "Role: visitor" in _sidebar(page)
            field = page.get_by_label("Operator passphrase", exact=True)
            field.fill(PASSPHRASE)
            field.press("Enter")
            page.get_by_role("button", name="Sign out").wait_for(timeout=30_000)
            operator = _cookie(teacher, "cxr_operator")
            workspace = _cookie(teacher, "cxr_workspace")
            assert SIGNED_ID.match(workspace["value"]) and operator["value"].split(".")[1] == \
                workspace["value"].split(".")[0]
            assert operator["sameSite"] == "Strict" and PASSPHRASE not in operator["value"]

            page.reload(wait_until="domcontentloaded")  # a new session of the same browser
            _settle(page)
            assert "Role: operator" in _sidebar(page)
            page.get_by_role("button", name="Sign out").wait_for(timeout=10_000)

            student = browser.new_context(viewport={"width": 1400, "height": 900})
            student.add_cookies([{"name": "cxr_workspace", "value": "b-0000000000000000", "url": hosted_app}])
            other = student.new_page()
            other.goto(hosted_app, wait_until="domcontentloaded")
            _settle(other)
            assert "Role: visitor" in _sidebar(other)
            fresh = _cookie(student, "cxr_workspace", unlike="b-0000000000000000")
            assert SIGNED_ID.match(fresh["value"]) and fresh["value"] != workspace["value"]
            assert "cxr_operator" not in {c["name"] for c in student.cookies()}

            # Signing out drops the role for the browser: a reload stays a visitor.
            page.get_by_role("button", name="Sign out").click()
            page.get_by_label("Operator passphrase", exact=True).wait_for(timeout=10_000)
            deadline = time.time() + 10
            while "cxr_operator" in {c["name"] for c in teacher.cookies()} and time.time() < deadline:
                time.sleep(0.25)
            page.reload(wait_until="domcontentloaded")
            _settle(page)
            assert "Role: visitor" in _sidebar(page)
        finally:
            browser.close()
