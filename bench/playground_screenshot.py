"""docs/playground.png: the playground page after a few generations (results, seeds, history), in the same
headless Chromium the tests use.

    python bench/playground_screenshot.py [--out docs/playground.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from browser import body_data, fill, open_playground, start_chromium, wait_for  # noqa: E402
from server_harness import run_server  # noqa: E402

# (class, images, seed): earlier generations fill the history; the last one is on screen.
GENERATIONS = [("Sneaker", 1, "7"), ("Bag", 4, "21"), ("Dress", 1, "3"), ("Ankle boot", 4, "1234")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(ROOT / "docs" / "playground.png"))
    args = p.parse_args()
    from selenium.webdriver.common.by import By

    with run_server(Path(tempfile.mkdtemp())) as server:
        browser = start_chromium(1280, 900)
        try:
            open_playground(browser, server.url)
            for done, (name, count, seed) in enumerate(GENERATIONS, start=1):
                fill(browser, "class", name)
                fill(browser, "num-images", str(count))
                fill(browser, "seed", seed)
                browser.find_element(By.ID, "generate").click()
                wait_for(browser, lambda n=done: body_data(browser, "done") == str(n), what="the result")
                wait_for(browser, lambda n=done: len(browser.find_elements(By.CSS_SELECTOR, "#history li")) == n,
                         what="the history entry")
            fill(browser, "seed", "")  # as a user leaves it: random
            browser.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(args.out)
        finally:
            browser.quit()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
