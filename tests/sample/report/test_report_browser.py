"""The report in a real browser: headless Chromium (Debian's, driven by Playwright) opens
report/index.html from disk, every image must decode, and a full-page screenshot is kept.

`.ci/run` installs Chromium; elsewhere this test is skipped, with the reason, when
/usr/bin/chromium (or $CHROMIUM) is missing. Under CI (CI=true) a missing Chromium fails it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sample_support import sample_config
from test_report import fill_other_stages

from pipeline.core import layout
from sample.report import stage as report
from sample.validate import stage as validate

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("PIPELINE_TEST_ARTIFACTS", Path(__file__).resolve().parents[3] / "test-artifacts"))
# This machine has no network: without these, Chromium keeps trying to reach Google's hosts.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

IMAGES_STATE = """() => Array.from(document.images).map(image => ({
    src: image.currentSrc.slice(0, 40), loaded: image.complete && image.naturalWidth > 0,
    width: image.naturalWidth, height: image.naturalHeight}))"""


@pytest.fixture(autouse=True)
def chromium_present():
    """Skip without Chromium, with the reason; under CI (CI=true) fail instead: this test must run there."""
    if not Path(CHROMIUM).exists():
        missing = f"no Chromium at {CHROMIUM} (.ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}, and under CI this test must run")
        pytest.skip(missing)


def open_in_chromium(page_path: Path, screenshot: Path | None = None) -> tuple[list[dict], list[str]]:
    """(state of every <img>, console errors) once the page has loaded; optionally a screenshot."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.goto(page_path.as_uri(), wait_until="load")
            images = page.evaluate(IMAGES_STATE)
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=True)
            return images, errors
        finally:
            browser.close()


def test_every_image_of_the_report_loads_in_chromium(synthetic_run, model_dirs, tmp_path):
    config = sample_config(model_dirs)
    validate.run_stage(config, synthetic_run)
    fill_other_stages(synthetic_run, config)
    report.run_stage(config, synthetic_run)
    page_path = Path(synthetic_run.path(layout.REPORT_INDEX))
    screenshot = ARTIFACTS / "report-screenshot.png"

    images, errors = open_in_chromium(page_path, screenshot)

    validation = synthetic_run.read_json(layout.SAMPLE_VALIDATION)
    grids = sum(len(entry["images"]) for entry in validation["checkpoints"])
    assert len(images) > grids  # the grids and the plots
    assert [image for image in images if not image["loaded"]] == []
    assert all(image["width"] >= 16 and image["height"] >= 16 for image in images)
    assert errors == []
    assert screenshot.stat().st_size > 10_000

    # The same check catches a broken image: the page with one image's data cut short.
    broken = tmp_path / "broken.html"
    html = page_path.read_text()
    start = html.index('src="data:image/png;base64,') + len('src="data:image/png;base64,')
    broken.write_text(html[: start + 40] + html[html.index('"', start) :])
    images, _ = open_in_chromium(broken)
    assert sum(not image["loaded"] for image in images) == 1
