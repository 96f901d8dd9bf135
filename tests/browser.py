"""Opening a report in Debian's headless Chromium, for the report tests.

Outside CI a machine without chromium skips these tests, saying so; with CI=true
(`.ci/run` sets it and installs chromium) a missing browser fails them instead."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

BROWSERS = ("chromium", "chromium-browser")

# Added to a copy of the page only: the report itself carries no script. After the load
# event every <img> has either decoded or failed.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const decoded = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-probe",
    decoded + "/" + images.length + "/" + document.documentElement.scrollHeight);
});
</script></body>"""


def chromium() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but no chromium on PATH: .ci/run installs it with apt-get")
    pytest.skip("no chromium on PATH (apt-get install chromium); CI=true makes this a failure")


def _run(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run(
        [chromium(), *flags, *args], capture_output=True, text=True, timeout=120, check=False
    )


def probe(report: Path, work: Path) -> tuple[int, int, int]:
    """(images decoded, images on the page, page height in CSS pixels)."""
    page = work / "probed.html"
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE), "utf-8")
    done = _run(["--virtual-time-budget=10000", "--dump-dom", page.as_uri()], work / "profile-dom")
    found = re.search(r'data-probe="(\d+)/(\d+)/(\d+)"', done.stdout)
    assert found, f"no probe result in chromium's DOM dump; stderr: {done.stderr[-2000:]}"
    decoded, images, height = map(int, found.groups())
    return decoded, images, height


def screenshot(report: Path, work: Path, width: int, height: int) -> np.ndarray:
    """The page rendered at width × height, as an (H, W, channels) float array in [0, 1]."""
    from matplotlib.image import imread

    shot = work / "shot.png"
    done = _run(
        [f"--screenshot={shot}", f"--window-size={width},{height}", report.as_uri()],
        work / "profile-shot",
    )
    assert shot.exists(), f"chromium wrote no screenshot; stderr: {done.stderr[-2000:]}"
    return imread(shot)


def assert_renders_with_images(report: Path, work: Path) -> None:
    """Every image decodes, and a screenshot of the whole page is not blank: enough
    pixels differ from the white background, and in grey levels, not one flat colour."""
    decoded, images, height = probe(report, work)
    assert images >= 4 and decoded == images, f"{decoded} of {images} images decoded"
    assert height > 2000, f"page only {height} px tall"

    pixels = screenshot(report, work, 1280, min(height, 12000))
    grey = pixels[..., :3].mean(axis=2)
    inked = float((grey < 0.95).mean())
    assert grey.std() > 0.05, f"screenshot nearly uniform (std {grey.std():.4f})"
    assert inked > 0.03, f"only {inked:.1%} of the screenshot is not background"
