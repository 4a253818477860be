"""End to end in a real browser: `alexnet serve` in its own process, Debian's Chromium driven
headless by Playwright, an image uploaded through the page, its top-5 read back from the DOM.

Skips when there is no chromium binary (apt-get install chromium), except under .ci/run
(ALEXNET_REQUIRE_BROWSER=1), which installs it; with chromium, playwright must be installed. Run as a script it makes the README's screenshot from any checkpoint:

    python tests/tools/test_serve_browser.py CHECKPOINT IMAGE docs/images/serve.png
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# No GPU, no sandbox (containers run as root), and nothing that phones home.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(checkpoint: Path, max_upload_mb: float = 1.0) -> Iterator[str]:
    """`alexnet serve` on a free localhost port, in a child process; yields its URL."""
    import alexnet

    port = free_port()
    env = dict(os.environ)
    src = str(Path(alexnet.__file__).resolve().parents[1])  # this checkout's sources, not another install
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "alexnet",
        "serve",
        str(checkpoint),
        "--port",
        str(port),
        "--max-upload-mb",
        str(max_upload_mb),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"alexnet serve exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                with urllib.request.urlopen(url + "health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("alexnet serve did not answer /health within 90 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def classify_in_browser(url: str, image: Path, screenshot: Path | None = None) -> dict:
    """Upload image through the page; return the names shown, the preview's size, and what a
    non-image upload then shows, followed by a second good upload."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 860, "height": 520})
            page.goto(url)
            page.wait_for_function("document.getElementById('info').textContent.includes('classes')")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#top5[data-done='1']", timeout=30_000)
            names = page.locator("#top5 .name").all_text_contents()
            preview = page.locator("#preview").evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot))
            page.set_input_files(
                "#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}]
            )
            page.wait_for_selector("#error:has-text('415')", timeout=30_000)
            error = page.locator("#error").text_content()
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#top5[data-done='1']", timeout=30_000)
            again = page.locator("#top5 .name").all_text_contents()
        finally:
            browser.close()
    return {"names": names, "preview": preview, "error": error, "again": again}


# .ci/run installs chromium and sets this: there the test must run, never skip.
REQUIRED = os.environ.get("ALEXNET_REQUIRE_BROWSER") == "1"


@pytest.mark.skipif(CHROMIUM is None and not REQUIRED, reason="no chromium binary (apt-get install chromium)")
def test_upload_page_shows_top5_in_chromium(tiny_checkpoint, tmp_path):
    assert CHROMIUM is not None, "ALEXNET_REQUIRE_BROWSER=1 but no chromium binary on PATH"
    # With chromium present, playwright (the test extra) is required: a missing one fails here.
    import numpy as np
    from PIL import Image

    from alexnet.tools.predict import predict

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(image)
    with running_server(tiny_checkpoint) as url:
        shown = classify_in_browser(url, image, tmp_path / "serve.png")
        with urllib.request.urlopen(url + "health", timeout=5) as r:  # still up after the bad upload
            assert r.status == 200
    [expected] = predict(tiny_checkpoint, [str(image)])
    assert shown["names"] == [name for name, _ in expected.top] == shown["again"]
    assert shown["preview"] == [True, 120, 90]
    assert shown["error"].startswith("415: not a decodable image (notes.txt)")
    assert Image.open(tmp_path / "serve.png").size == (860, 520)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    if CHROMIUM is None:
        sys.exit("no chromium binary found")
    checkpoint, picture, out = (Path(a) for a in sys.argv[1:])
    with running_server(checkpoint, max_upload_mb=10) as server_url:
        print(classify_in_browser(server_url, picture, out)["names"])
