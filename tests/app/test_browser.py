"""A real browser (Debian's headless Chromium, driven by Playwright) uses the page: upload the demo
photos, start training, watch the progress bar move and a sample appear, compare base and LoRA.
Screenshots go to the test's folder (and to $ADAPRELORA_SCREENSHOT_DIR when set)."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import demo_images

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install -y chromium); "
                                "CI installs it, a developer machine may not have it")
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the [test] extra)")


def _save(page, folder: Path, name: str) -> Path:
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    image = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert image.shape[0] > 400 and image.shape[1] > 600 and image.std() > 10, f"{name} looks blank"
    if os.environ.get("ADAPRELORA_SCREENSHOT_DIR"):
        target = Path(os.environ["ADAPRELORA_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path


def _status(page) -> str:
    return page.locator("#arl-status").inner_text(timeout=5000)


def test_a_person_trains_and_samples_in_the_browser(shared_app, shared_hold, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    big = tmp_path / "big.png"  # 3.2 MB of noise: over the app's --max-file-mb 2, under its 5 MB set limit
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(big)
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(shared_app.url)
        page.locator("#photos input[type=file]").set_input_files([str(p) for p in demo_images()] + [str(big)])
        page.get_by_text("5 of 6 file(s) usable").wait_for()  # the oversized photo is named, the others kept
        assert "big.png: 3.2 MB is over the 2 MB limit per file" in page.locator("#check-report").inner_text()
        page.get_by_label("Class word").fill("robot toy")
        page.get_by_text("Advanced (the trainer's flags)").click()
        page.get_by_label("Steps", exact=True).fill("24")
        page.get_by_label("Other flags as JSON").fill('{"validation_steps": 8, "num_validation_images": 2}')
        _save(page, shots, "1-new-job.png")

        shared_hold.at(1)  # the job waits after step 1 until the page has shown it
        page.locator("#train-button").click()
        page.locator("#arl-status").wait_for()
        try:
            page.get_by_text("step 1/24").wait_for()
            _save(page, shots, "2-training.png")
        finally:
            shared_hold.release()
        seen = {1}
        deadline = time.time() + 240
        while time.time() < deadline and not ("done" in _status(page) and len(seen) >= 2):
            match = re.search(r"step (\d+)/24", _status(page))
            if match and int(match.group(1)) > 0:
                seen.add(int(match.group(1)))
            time.sleep(0.3)
        assert len(seen) >= 2, f"the progress bar did not move (steps seen: {sorted(seen)})"
        page.locator("#samples img").first.wait_for()
        assert "done" in _status(page)
        page.reload()  # a reloaded (or reopened) page finds the job again by itself
        page.get_by_text("done · step 24/24").wait_for()
        page.locator("#samples img").first.wait_for()
        assert "python train_dreambooth.py" in page.locator("#command").inner_text()  # the job as a command line
        _save(page, shots, "3-done-after-reload.png")

        page.get_by_role("tab", name="3 · Sample").click()
        page.locator("#sample-button").click()
        page.locator("#pair img").nth(1).wait_for()
        _save(page, shots, "4-sample.png")
        browser.close()
    assert sorted(p.name for p in shots.iterdir()) == ["1-new-job.png", "2-training.png", "3-done-after-reload.png",
                                                       "4-sample.png"]
