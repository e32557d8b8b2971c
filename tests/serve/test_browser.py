"""A real browser: headless Chromium opens the web chat page, asks a question and sees the streamed answer (slow)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.serve.conftest import running_server

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip("SKIPPED: no Chromium here (apt-get install -y chromium chromium-driver); the browser test did not run")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.add_argument("--headless=new")
    options.add_argument("--no-sandbox")
    options.add_argument("--disable-dev-shm-usage")
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def _failed_requests(driver) -> list[str]:
    """Every request of the page that failed or got an HTTP error, and every error in its console."""
    import json

    out = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.responseReceived" and message["params"]["response"]["status"] >= 400:
            out.append(f"{message['params']['response']['status']} {message['params']['response']['url']}")
        elif message["method"] == "Network.loadingFailed" and not message["params"].get("canceled"):
            out.append(f"failed: {message['params'].get('errorText')}")
    out += [f"console: {e['message'][:200]}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return out


def test_web_page_streams_an_answer_containing_paris(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser()
    try:
        # greedy by default so the 135M model's answer is reproducible ("... Paris, France ...")
        with running_server("--temperature", "0", "--quiet") as (url, _):
            driver.get(url + "/")
            box = WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.TAG_NAME, "textarea"))[0]
            WebDriverWait(driver, 60).until(lambda d: "smollm2" in d.find_element(By.TAG_NAME, "body").text)
            box.send_keys("What is the capital of France?")
            box.send_keys(Keys.ENTER)
            seen: list[str] = []

            def answered(d):
                text = d.find_element(By.TAG_NAME, "body").text
                after = text.split("What is the capital of France?")[-1]
                if not seen or seen[-1] != after:
                    seen.append(after)
                return "Paris" in after

            WebDriverWait(driver, 120, poll_frequency=0.05).until(answered)
            assert len(seen) >= 3  # the page showed the answer growing before "Paris" appeared: it streamed
            driver.save_screenshot(str(tmp_path / "page.png"))
            assert (tmp_path / "page.png").stat().st_size > 1000
            failed = _failed_requests(driver)
            assert not failed, failed
    finally:
        driver.quit()


def test_plain_http_clients_get_the_page_and_a_cut_off_answer_is_marked(tmp_path):
    import urllib.request

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from cutegpt.serve.front import CUT_OFF_NOTE

    driver = _browser()
    try:
        with running_server("--temperature", "0", "--max-new-tokens", "8", "--quiet") as (url, _):
            with urllib.request.urlopen(url + "/") as page:  # no Accept-Encoding, as curl
                assert page.status == 200 and b"<html" in page.read().lower()
            driver.get(url + "/")
            box = WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.TAG_NAME, "textarea"))[0]
            WebDriverWait(driver, 60).until(lambda d: "smollm2" in d.find_element(By.TAG_NAME, "body").text)
            box.send_keys("Write a long story about a dragon.")
            box.send_keys(Keys.ENTER)
            note = CUT_OFF_NOTE.strip().strip("*")
            WebDriverWait(driver, 120, poll_frequency=0.2).until(lambda d: note in d.find_element(By.TAG_NAME, "body").text)
            driver.save_screenshot(str(tmp_path / "cut-off.png"))
            failed = _failed_requests(driver)
            assert not failed, failed
    finally:
        driver.quit()
