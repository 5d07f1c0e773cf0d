"""docs/playground.png: the playground page after a generation, in the same headless Chromium the tests use.

    python bench/playground_screenshot.py [--out docs/playground.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from browser import start_chromium  # noqa: E402
from server_harness import run_server  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(ROOT / "docs" / "playground.png"))
    p.add_argument("--class-name", default="Ankle boot")
    args = p.parse_args()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with run_server(Path(tempfile.mkdtemp())) as server:
        browser = start_chromium(1280, 720)
        try:
            browser.get(server.url + "/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
            browser.find_element(By.ID, "class").send_keys(args.class_name)
            images = browser.find_element(By.ID, "num-images")
            images.clear()
            images.send_keys("4")
            browser.find_element(By.ID, "generate").click()
            wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-done") == "1")
            browser.execute_script("window.scrollTo(0, 0)")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(args.out)
        finally:
            browser.quit()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
