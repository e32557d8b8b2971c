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
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def test_web_page_streams_an_answer_containing_paris():
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
    finally:
        driver.quit()
