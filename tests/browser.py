"""Headless Chromium (Debian's chromium + chromium-driver) driven by selenium, for the playground tests
and the README screenshot."""

from __future__ import annotations

import shutil
import tempfile

CHROMIUM_HOW = "apt-get install chromium chromium-driver"


def chromium_available() -> bool:
    return bool(shutil.which("chromium") and shutil.which("chromedriver"))


def start_chromium(width: int = 1280, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    # This machine's network is closed: no background traffic, no first-run or component downloads.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={width},{height}",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))


def body_data(driver, name: str) -> str | None:
    """One of the page's `<body data-*>` attributes, where it mirrors its state (ready, state, done, ...)."""
    return driver.execute_script("return document.body.dataset[arguments[0]] ?? null", name)


def wait_for(driver, predicate, timeout: float = 60, what: str = "the page"):
    """Polls `predicate()` until it is truthy (a page event, never a fixed sleep); returns its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda _: predicate(), f"waiting for {what}")


def fill(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value)


def open_playground(driver, url: str, api_key: str | None = None, timeout: float = 60) -> None:
    """Loads the page; types the API key when the page asks for one; returns once the form is ready."""
    from selenium.webdriver.common.by import By

    driver.get(url + "/")
    wait_for(driver, lambda: body_data(driver, "state") in ("idle", "needs-key"), timeout, "the page to load")
    if body_data(driver, "state") == "needs-key":
        assert api_key is not None, "the page asks for an API key"
        fill(driver, "api-key", api_key)
        driver.find_element(By.ID, "use-key").click()
    wait_for(driver, lambda: body_data(driver, "ready") == "true", timeout, "the page to be ready")
