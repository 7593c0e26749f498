"""The web playground in a real browser: Debian's chromium, driven by Selenium through
chromedriver (nothing is downloaded). Upload an image, ask, see the answer stream in.

Skipped only when the browser (or Selenium) is missing and ``CI`` is not set; under CI it runs,
and fails if the browser is missing (install it with ``scripts/install_browser.sh``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from helpers.serving import FAMILIES, data_url, png, reference, start_server, tiny_model

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1100,800"]
MAX_TOKENS = 12


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is missing (run scripts/install_browser.sh)"
    return None


@pytest.fixture
def browser():
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run under CI, but {missing}")
        pytest.skip(f"browser test skipped: {missing}; set CI=1 to make this a failure")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.mark.parametrize("family", FAMILIES)
def test_playground_uploads_an_image_and_streams_the_answer(browser, tmp_path, family):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model, processor = tiny_model(family)
    image = png((30, 160, 90), (28, 24))
    image.save(tmp_path / "leaf.png")
    server = start_server(model, processor)
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.ID, "model-name").text == "model: tiny")
        browser.find_element(By.ID, "image-input").send_keys(str(tmp_path / "leaf.png"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img.thumbnail"))
        tokens = browser.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys(str(MAX_TOKENS))
        browser.find_element(By.ID, "prompt").send_keys("What is in this picture?")
        browser.find_element(By.ID, "send").click()
        answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".message.assistant[data-state=done]"))
        text = browser.execute_script("return arguments[0].querySelector('.text').textContent", answer)
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(image)}},
            {"type": "text", "text": "What is in this picture?"},
        ]}]
        assert text == reference(model, processor, messages, MAX_TOKENS)
        assert int(answer.get_attribute("data-chunks")) > 1  # it arrived piece by piece
        assert browser.find_elements(By.CSS_SELECTOR, ".message.user img")  # the image shows in the history
        assert "prompt +" in browser.find_element(By.ID, "status").text  # usage from the stream
        assert not browser.find_elements(By.CSS_SELECTOR, "#attachments img")  # attachments were sent
    finally:
        server.stop()
