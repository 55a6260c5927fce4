"""The Training page in a real browser: what AppTest cannot show, the front end's own behaviour.

A delete confirmation (a popover) closes after the delete and says what was deleted, and a second click
on it, as a quick double click sends, deletes no other run; a recipe chosen before the backbone keeps its
image size on the slider. Serves the app (test_browser.served_app) and drives headless Chromium; skips
without Chromium.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from test_app import fake_run
from test_browser import CHROMIUM, CHROMIUM_ARGS, _settle, served_app  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _runs() -> list[str]:
    return sorted(p.name for p in Path(os.environ["CXR_RUNS_DIR"]).iterdir() if p.name.startswith("run-"))


def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def test_a_double_click_on_yes_delete_deletes_one_run_and_the_confirmation_closes(served_app):  # noqa: F811
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    for name in ("run-a", "run-b", "run-c"):
        fake_run(name, None, None, state="failed", error="x")
    with playwright.sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{served_app}/training", wait_until="domcontentloaded")
            _settle(page, 120)
            page.get_by_role("button", name="Delete...").click()
            body = page.locator("[data-testid='stPopoverBody']")
            body.wait_for(timeout=30_000)
            named = body.inner_text().split("Delete ")[1].split(" and its model")[0].strip()
            assert named in _runs()
            box = page.get_by_role("button", name="Yes, delete it").bounding_box()
            x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.click(x, y)
            time.sleep(0.3)  # a person's slow double click: the second lands while the page redraws
            page.mouse.click(x, y)
            _settle(page, 60)
            assert _runs() == sorted({"run-a", "run-b", "run-c"} - {named})
            page.get_by_text(f"Deleted run {named} and its model.").wait_for(timeout=30_000)
            assert not page.locator("[data-testid='stPopoverBody']").is_visible()
            assert page.locator("[data-testid='stException']").count() == 0
        finally:
            browser.close()


def test_a_recipe_chosen_before_the_backbone_keeps_its_image_size(served_app):  # noqa: F811
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    from cxr_core.core.recipes import RECIPES

    with playwright.sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{served_app}/training", wait_until="domcontentloaded")
            _settle(page, 120)
            for label, option in (("Recipe", RECIPES["quick"].label), ("Backbone", "MobileNetV2")):
                page.locator("[data-testid='stSelectbox']").filter(has_text=label).first.click()
                page.get_by_role("option", name=option).first.click()
                _settle(page, 60)
            size = page.locator("[data-testid='stSlider']").filter(has_text="Image size").first
            assert size.get_by_role("slider").get_attribute("aria-valuetext") == str(
                RECIPES["quick"].settings["model"]["image_size"])
        finally:
            browser.close()
