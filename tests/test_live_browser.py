"""The live page in a real headless browser (Debian's chromium + chromium-driver via Selenium).

serve.py runs as a subprocess with the tiny preset (a smaller frame size, so that each chunk
decodes in about a second on a CPU); the browser opens the printed URL, starts a video, sees
frames arrive (the frame counter grows, the canvas is not blank), switches the prompt, and
finds the switch on the timeline at a chunk boundary. Skipped, with the reason, where chromium,
chromedriver or selenium is missing (README "Setup" installs them).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
SIZE = (48, 64)  # height, width of the test video
FRAMES_PER_CHUNK = 3  # num_frame_per_block of configs/tiny_interactive.yaml
FRAMES_PER_CHUNK_PIXELS = 4 * FRAMES_PER_CHUNK  # video frames of a chunk after the first

MISSING = ("no headless browser: install chromium and chromium-driver (README, Setup)"
           if CHROMIUM is None or DRIVER is None else None)
try:
    from selenium import webdriver
except ImportError:
    MISSING = "selenium is not installed (pip install -r requirements.txt)"
if MISSING and os.environ.get("MEMFLOW_REQUIRE_BROWSER"):  # CI: a skip would hide the gap
    raise RuntimeError(f"MEMFLOW_REQUIRE_BROWSER is set but {MISSING}")
if MISSING:
    pytest.skip(MISSING, allow_module_level=True)

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from memflow.vae import video_frames  # noqa: E402

PATIENCE_S = 240  # a safety net for a stuck run; every wait below ends on its condition
ROPE_TABLE = 6  # latent frames: the page's video runs past it (positions: relative)


def read_url(proc: subprocess.Popen, lines: list[str]) -> str:
    """The URL serve.py prints once its models are loaded (its stdout, read line by line)."""
    for line in proc.stdout:
        lines.append(line)
        if "open http" in line:
            return line.split("open ", 1)[1].strip()
    raise AssertionError(f"serve.py ended before printing its URL: {''.join(lines)}")


def wait_http(url: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                if response.status == 200:
                    return
        except OSError:
            assert time.monotonic() < deadline, f"{url} does not answer"
            time.sleep(0.1)


@pytest.fixture
def server():
    # relative positions with a 6-latent-frame RoPE table: the video runs past it
    command = [sys.executable, "serve.py", "--config_path", "configs/tiny_interactive.yaml",
               "--port", "0", f"height={SIZE[0]}", f"width={SIZE[1]}", "cpu_threads=1",
               "positions=relative", f"tiny.rope_max_frames={ROPE_TABLE}"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    try:
        url = read_url(proc, lines)
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
        wait_http(url + "healthz")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=PATIENCE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=PATIENCE_S)
            raise AssertionError(f"serve.py ignored SIGTERM: {''.join(lines)[-2000:]}") from None


@pytest.fixture
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def until(driver, condition, what: str):
    """Wait for `condition(driver)` to be truthy. The page re-renders its lists as messages
    arrive, so an element found a moment ago may be gone: that is a retry, not a failure."""
    return WebDriverWait(driver, PATIENCE_S, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: condition(d), message=what)


# read in one script, so a re-render between finding the elements and reading them cannot
# interleave
SWITCH_ENTRY = """
const li = [...document.querySelectorAll('#switch-list li')]
  .find(li => li.textContent.includes(arguments[0]));
return li ? [Number(li.dataset.latent), Number(li.dataset.frame)] : null;
"""
TIMELINE_MARKERS = """
return [...document.querySelectorAll('#timeline .tl-switch')].map(m => Number(m.dataset.frame));
"""
DOWNLOAD_LINK = """
const a = document.querySelector('#downloads a');
return a ? a.href : null;
"""


CANVAS_STATS = """
const c = document.getElementById('video');
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let n = 0, sum = 0, sq = 0, nonblack = 0;
for (let i = 0; i < d.length; i += 4) {
  const v = (d[i] + d[i + 1] + d[i + 2]) / 3;
  n++; sum += v; sq += v * v; if (v > 8) nonblack++;
}
const mean = sum / n;
return {width: c.width, height: c.height, mean: mean, std: Math.sqrt(sq / n - mean * mean),
        nonblack: nonblack / n};
"""


def test_page_streams_and_switches_at_a_chunk_boundary(server, browser, tmp_path):
    browser.get(server)
    until(browser, lambda d: text(d, "state") == "idle", "the page never got the device")
    browser.find_element(By.ID, "prompt").send_keys("a red fox runs through snow")
    seed = browser.find_element(By.ID, "seed")
    seed.clear()
    seed.send_keys("3")
    browser.find_element(By.ID, "plan-add").click()  # a switch planned far ahead: never reached
    browser.find_element(By.CSS_SELECTOR, ".plan-at").send_keys("600")
    browser.find_element(By.CSS_SELECTOR, ".plan-prompt").send_keys("a planned prompt")
    browser.find_element(By.ID, "start").click()
    until(browser, lambda d: text(d, "plan-note") == "1 planned", "the plan was not sent with Start")
    until(browser, lambda d: text(d, "state") == "running", "the video did not start")
    assert not browser.find_element(By.ID, "start").is_enabled()  # no second Start mid-video

    until(browser, lambda d: int(text(d, "frames-received")) > 0 and text(d, "frame-shown") != "-",
          "no frame arrived")
    first = int(text(browser, "frames-received"))
    until(browser, lambda d: int(text(d, "frames-received")) > first, "the frame counter stopped")
    later = int(text(browser, "frames-received"))
    canvas = browser.execute_script(CANVAS_STATS)
    assert (canvas["height"], canvas["width"]) == SIZE
    assert canvas["std"] > 5 and canvas["nonblack"] > 0.5, canvas  # a picture, not a blank canvas

    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys("a blue whale under the sea")
    over = browser.find_element(By.ID, "transition")  # a 2-chunk slerp transition
    over.clear()
    over.send_keys("2")
    Select(browser.find_element(By.ID, "blend")).select_by_value("slerp")
    browser.find_element(By.ID, "switch").click()
    latent, frame = until(browser, lambda d: d.execute_script(SWITCH_ENTRY, "blue whale"),
                          "the switch never appeared on the timeline")
    assert latent > 0 and latent % FRAMES_PER_CHUNK == 0  # at a chunk boundary, after chunk 0
    assert frame == video_frames(latent)  # the first video frame of that latent frame
    markers = browser.execute_script(TIMELINE_MARKERS)
    assert markers == [0, frame]
    until(browser, lambda d: text(d, "switch-latency").endswith("ms"), "the new prompt was never shown")
    assert "blue whale under the sea (over 2 chunks, slerp)" in text(browser, "switch-list")

    # playback is paced to the generation rate: no stall across three more chunk boundaries
    shown = int(text(browser, "frame-shown"))
    until(browser, lambda d: int(text(d, "frame-shown")) >= shown + 3 * FRAMES_PER_CHUNK_PIXELS,
          "playback did not cross three more chunk boundaries")
    stalls = browser.find_element(By.ID, "stalls")
    assert stalls.text == "0", f"{stalls.text} stalls, longest gap {stalls.get_attribute('data-longest')} ms"
    # past the RoPE table, shown as endless
    assert text(browser, "positions") == "relative (endless)"
    until(browser, lambda d: int(text(d, "frame-shown")) > video_frames(2 * ROPE_TABLE),
          "the video did not run to twice its RoPE table")

    browser.find_element(By.ID, "stop").click()
    until(browser, lambda d: text(d, "state") == "stopped", "stop was not acknowledged")
    browser.find_element(By.ID, "save").click()
    href = until(browser, lambda d: d.execute_script(DOWNLOAD_LINK), "no download link")
    with urllib.request.urlopen(href, timeout=60) as response:
        assert response.read(12)[4:8] == b"ftyp"  # an MP4

    # a reload takes the stream back (the page reconnects with its resume token)
    generated = browser.execute_script("return live.framesGenerated")
    browser.refresh()
    until(browser, lambda d: text(d, "state") == "stopped", "the reloaded page did not get its video back")
    until(browser, lambda d: d.execute_script("return live.framesGenerated") == generated,
          "the reloaded page does not know the video's frames")

    # Reset leaves nothing of the old video on the page
    browser.find_element(By.ID, "reset").click()
    until(browser, lambda d: text(d, "state") == "idle", "reset was not acknowledged")
    cleared = browser.execute_script(CANVAS_STATS)
    assert cleared["nonblack"] == 0, cleared
    assert text(browser, "frame-shown") == "-" and text(browser, "recv-fps") == "-"
    assert browser.execute_script(TIMELINE_MARKERS) == [] and text(browser, "switch-list") == ""
    assert text(browser, "plan-note") != "1 planned"  # the server dropped the plan
    browser.save_screenshot(str(tmp_path / "live.png"))
    print(f"\nbrowser saw: frame counter {first} -> {later} -> {text(browser, 'frames-received')}, "
          f"canvas {canvas}, switch at latent {latent} = frame {frame}, "
          f"latency {text(browser, 'switch-latency')}, timeline markers {markers}")


def test_page_uploads_an_image_and_starts_from_it(server, browser, tmp_path):
    """Choose an image in the page's file field, press Start: the page uploads its bytes and
    the video opens with the image's frame, so frame counts are shifted by one: 1 + 4F per
    chunk of F latent frames, where a prompt-only start has 1 + 4(F - 1) for its first."""
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :30] = (220, 40, 40)
    path = tmp_path / "start.png"
    Image.fromarray(image).save(path)
    browser.get(server)
    until(browser, lambda d: text(d, "state") == "idle", "the page never got the device")
    browser.find_element(By.ID, "prompt").send_keys("a red barn:2 | a field:1")  # weighted
    browser.find_element(By.ID, "start-file").send_keys(str(path))
    browser.find_element(By.ID, "start").click()
    until(browser, lambda d: "starting from the image start.png" in text(d, "log"),
          "the image was not uploaded")
    until(browser, lambda d: text(d, "state") == "running", "the video did not start")
    until(browser, lambda d: d.execute_script("return live.chunkPrompt.get(0)")
          == "a red barn:2 | a field:1", "the weighted prompt was not the first chunk's")
    until(browser, lambda d: int(text(d, "frames-received") or 0) > 1 + FRAMES_PER_CHUNK_PIXELS,
          "no chunk after the image")
    browser.find_element(By.ID, "stop").click()
    until(browser, lambda d: text(d, "state") == "stopped", "stop was not acknowledged")
    generated = until(browser, lambda d: d.execute_script("return live.framesGenerated"),
                      "no frame count")
    assert generated % FRAMES_PER_CHUNK_PIXELS == 1, generated  # the image frame, then chunks

    # a saved timeline JSON loaded back: its switches become the plan
    saved = tmp_path / "clip.json"
    saved.write_text(json.dumps({"timeline": [{"pixel_frame": 0, "prompt": "a red barn"},
                                              {"pixel_frame": 45, "prompt": "night falls"},
                                              {"pixel_frame": 90, "prompt": "snow"}]}))
    browser.find_element(By.ID, "timeline-file").send_keys(str(saved))
    until(browser, lambda d: text(d, "plan-note") == "2 planned", "the timeline was not planned")
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#plan-rows tr')].map(tr => "
        "[tr.querySelector('.plan-at').value, tr.querySelector('.plan-prompt').value])")
    assert rows == [["45", "night falls"], ["90", "snow"]]
