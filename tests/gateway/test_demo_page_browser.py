"""The demo page in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
upload shapes_01.jpg with the keyboard, see the circle drawn and listed with the stage timings.

The browser comes from deploy/tools/install-chromium.sh; when it cannot be installed the test
fails, it is not skipped. The page's screenshot goes to out/gateway/demo.png, and to docs/demo.png
(the README's picture) with INFERLINE_WRITE_DOCS=1 (`make demo-screenshot`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.support.gateway import RunningGateway, ingress_at

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "deploy" / "tools" / "install-chromium.sh"
# Ultralytics' palette entry for class 32 ("sports ball"): PALETTE[32 % 20], as demo.js draws it.
SPORTS_BALL_RGB = (0x34, 0x45, 0x93)
# Read in one script, so the page replacing its options meanwhile cannot leave a stale element.
MODEL_OPTIONS = "return Array.from(document.querySelectorAll('#model option'), o => o.value);"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    done = subprocess.run(["bash", str(INSTALLER)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{INSTALLER} failed:\n{done.stderr[-3000:]}"
    driver_path = done.stdout.strip().splitlines()[-1]
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1480"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_shows_the_detection_drawn_listed_and_timed(browser, gateway, data_dir):
    wait = WebDriverWait(browser, 120)
    browser.get(gateway.url + "/")
    wait.until(lambda d: "yolov8n" in d.execute_script(MODEL_OPTIONS))
    Select(browser.find_element(By.ID, "model")).select_by_value("yolov8n")

    browser.find_element(By.ID, "images").send_keys(str(data_dir / "shapes_01.jpg"))
    conf = browser.find_element(By.ID, "conf")
    conf.clear()
    conf.send_keys("0.5")
    browser.find_element(By.ID, "run").send_keys(Keys.ENTER)  # the keyboard submits the form

    rows = wait.until(ec.presence_of_all_elements_located((By.CSS_SELECTOR, "table.detections tbody tr")))
    assert len(rows) == 1
    cells = [c.text for c in rows[0].find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "sports ball" and float(cells[1]) > 0.9
    x1, y1, x2, y2 = (float(v) for v in cells[2].split(","))

    canvas = browser.find_element(By.CSS_SELECTOR, "#results canvas")
    assert canvas.get_attribute("data-boxes") == "1"
    # The box's left edge, halfway down, is painted in the class colour over the image.
    edge = browser.execute_script(
        "const c = document.querySelector('#results canvas');"
        "return Array.from(c.getContext('2d').getImageData(arguments[0], arguments[1], 1, 1).data);",
        int(x1), int((y1 + y2) / 2),
    )
    assert all(abs(a - b) <= 24 for a, b in zip(edge[:3], SPORTS_BALL_RGB, strict=True)), edge

    stages = [
        r.find_element(By.TAG_NAME, "td").text for r in browser.find_elements(By.CSS_SELECTOR, "table.timings tbody tr")
    ]
    assert {"preprocess", "inference", "postprocess"} <= set(stages)
    wait.until(lambda d: d.find_element(By.ID, "live-p95").text.endswith("ms"))
    assert "Done in" in browser.find_element(By.ID, "status").text

    origins = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert origins and all(o.startswith(gateway.url) or o.startswith("blob:") for o in origins), origins

    out = REPO / "out" / "gateway"
    out.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(out / "demo.png"))
    if os.environ.get("INFERLINE_WRITE_DOCS") == "1":
        shutil.copyfile(out / "demo.png", REPO / "docs" / "demo.png")


def test_clip_model_shows_zero_shot_labels_for_the_user_s_prompts(browser, gateway, data_dir):
    wait = WebDriverWait(browser, 120)
    browser.get(gateway.url + "/")
    wait.until(lambda d: "clip-vit-b-32" in d.execute_script(MODEL_OPTIONS))
    Select(browser.find_element(By.ID, "model")).select_by_value("clip-vit-b-32")
    browser.find_element(By.ID, "images").send_keys(str(data_dir / "shapes_06.jpg"))
    prompts = browser.find_element(By.ID, "labels")
    prompts.clear()
    prompts.send_keys("a red circle, a blue star, a green square")
    browser.find_element(By.ID, "run").click()

    rows = wait.until(ec.presence_of_all_elements_located((By.CSS_SELECTOR, "table.labels tbody tr")))
    labels = [r.find_element(By.TAG_NAME, "td").text for r in rows]
    assert sorted(labels) == ["a blue star", "a green square", "a red circle"]
    scores = [float(r.find_elements(By.TAG_NAME, "td")[1].text) for r in rows]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 0.01
    stages = [
        r.find_element(By.TAG_NAME, "td").text for r in browser.find_elements(By.CSS_SELECTOR, "table.timings tbody tr")
    ]
    assert {"preprocess", "inference", "text_inference"} <= set(stages)


def test_swagger_ui_renders_every_operation_from_the_gateway_alone(browser, gateway):
    browser.get(gateway.url + "/docs")
    WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")) == 9)
    paths = {e.get_attribute("data-path") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/v1/detect", "/v1/classify", "/v1/embed", "/v1/models/{name}"} <= paths
    origins = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert origins and all(o.startswith(gateway.url) for o in origins), origins


def test_every_control_has_a_label_and_is_reachable_by_tab(browser, gateway):
    browser.get(gateway.url + "/")
    controls = browser.find_elements(By.CSS_SELECTOR, "#run-form input, #run-form select")
    assert len(controls) == 7
    for control in controls:
        control_id = control.get_attribute("id")
        assert browser.find_elements(By.CSS_SELECTOR, f"label[for='{control_id}']"), f"#{control_id} has no label"

    reached = set()
    for _ in range(20):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        reached.add(browser.switch_to.active_element.get_attribute("id"))
    assert {"images", "model", "conf", "iou", "labels", "relabel", "api-key", "run"} <= reached


SUB_PATH = "/tools/inferline"


@pytest.fixture(scope="module")
def gateway_under_sub_path(stack) -> Iterator[RunningGateway]:
    """The gateway behind an Ingress that serves it at SUB_PATH (strips it, sends X-Forwarded-Prefix)."""
    running = RunningGateway(stack.settings, stack.controller, wrap=ingress_at(SUB_PATH))
    yield running
    running.stop()


def test_demo_page_and_docs_work_under_an_ingress_sub_path(browser, gateway_under_sub_path, data_dir):
    base = gateway_under_sub_path.url + SUB_PATH
    wait = WebDriverWait(browser, 120)
    browser.get(base + "/")
    wait.until(lambda d: "yolov8n" in d.execute_script(MODEL_OPTIONS))
    Select(browser.find_element(By.ID, "model")).select_by_value("yolov8n")
    browser.find_element(By.ID, "images").send_keys(str(data_dir / "shapes_01.jpg"))
    browser.find_element(By.ID, "run").send_keys(Keys.ENTER)
    rows = wait.until(ec.presence_of_all_elements_located((By.CSS_SELECTOR, "table.detections tbody tr")))
    assert rows[0].find_elements(By.TAG_NAME, "td")[0].text == "sports ball"
    wait.until(lambda d: d.find_element(By.ID, "live-p95").text.endswith("ms"))  # v1/stats too
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    fetched = [u for u in loaded if not u.startswith("blob:")]
    assert fetched and all(u.startswith(base + "/") for u in fetched), fetched
    links = browser.execute_script("return Array.from(document.querySelectorAll('nav a'), a => a.href);")
    assert links == [base + "/docs", base + "/openapi.json", base + "/metrics"]

    browser.get(base + "/docs")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")) == 9)
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert loaded and all(u.startswith(base + "/") for u in loaded), loaded
    # "Try it out" sends to the spec's server: the sub-path, not the host's root.
    servers = browser.execute_script("return Array.from(document.querySelectorAll('.servers option'), o => o.value);")
    assert servers == [SUB_PATH], servers
