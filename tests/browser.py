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
