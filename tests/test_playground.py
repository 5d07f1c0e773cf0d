"""The playground page in a real headless Chromium, progress streaming, and the async job API."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from browser import CHROMIUM_HOW, chromium_available, start_chromium
from conftest import require_installed
from server_harness import run_server, wait_until


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("play"), "--max-steps", "1000") as s:
        yield s


def sse_events(response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_browser_generates_the_same_image_as_the_api(server):
    require_installed(chromium_available(), "chromium and chromedriver", CHROMIUM_HOW)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = start_chromium()
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        browser.find_element(By.ID, "class").send_keys("sneak")  # part of "Sneaker": picked by name
        for field, value in (("seed", "4242"), ("steps", "12")):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-done") == "1")
        image = browser.find_element(By.CSS_SELECTOR, "#results img")
        assert image.get_attribute("data-seed") == "4242"
        shown = base64.b64decode(image.get_attribute("src").split(",", 1)[1])
        status = browser.find_element(By.ID, "status").text
        link = browser.find_element(By.CSS_SELECTOR, "#results a").get_attribute("download")
    finally:
        browser.quit()
    info = httpx.get(server.url + "/info").json()
    direct = httpx.post(server.url + "/generate", json={"class_id": 7, "seed": 4242, "steps": 12,
                                                         "cfg_scale": info["defaults"]["cfg_scale"]}, timeout=60)
    assert direct.status_code == 200 and shown == direct.content
    assert status.startswith("Sneaker: 12") and link == "Sneaker-4242.png"


def test_progress_events_increase_then_result(server):
    body = {"class_id": 3, "steps": 200, "seed": 1, "sampler": "ddim"}
    with httpx.stream("POST", server.url + "/generate", json=body, headers={"Accept": "text/event-stream"},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    steps = [data["step"] for name, data in events if name == "progress"]
    assert len(steps) >= 3 and steps == sorted(steps) and steps[-1] == 200
    name, result = events[-1]
    assert name == "result" and result["images"][0]["seed"] == 1 and result["steps"] == 200
    direct = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert base64.b64decode(result["images"][0]["data"]) == direct.content


def test_progress_stream_reports_errors_in_the_stream(server):
    with httpx.stream("POST", server.url + "/generate", json={"class_id": 99},
                      headers={"Accept": "text/event-stream"}) as r:
        assert r.status_code == 422  # validation fails before the stream starts


def test_async_job_submit_poll_fetch(server):
    body = {"class_id": 5, "steps": 30, "seed": 9, "num_images": 2}
    submitted = httpx.post(server.url + "/jobs", json=body)
    assert submitted.status_code == 202
    job = submitted.json()
    status = wait_until(lambda: (s := httpx.get(server.url + job["status_url"]).json())["status"] == "done" and s,
                        60, "the job to finish")
    assert status["step"] == 30 and status["seeds"] == [9, 10]
    result = httpx.get(server.url + job["result_url"])
    assert result.status_code == 200 and result.content == httpx.post(server.url + "/generate", json=body,
                                                                                     timeout=60).content


def test_async_job_cancel_frees_its_samples(server):
    job = httpx.post(server.url + "/jobs", json={"class_id": 1, "steps": 1000, "seed": 3, "sampler": "ddim"}).json()
    wait_until(lambda: httpx.get(server.url + job["status_url"]).json()["status"] == "running", 30, "the job to run")
    assert httpx.get(server.url + job["result_url"]).status_code == 409  # not finished yet
    assert httpx.delete(server.url + job["status_url"]).json()["status"] == "cancelled"
    wait_until(lambda: server.metric("dit_active_samples") == 0, 10, "the cancelled samples to be dropped")
    status = httpx.get(server.url + job["status_url"]).json()
    assert status["status"] == "cancelled" and status["step"] < 1000
    assert httpx.get(server.url + "/jobs/nope").status_code == 404


def test_page_and_static_files_are_served(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "dit-serve" in page.text and "/static/app.js" in page.text
    assert httpx.get(server.url + "/static/app.js").status_code == 200


def test_sampler_limits_are_a_422(server):
    r = httpx.post(server.url + "/generate", json={"class_id": 1, "sampler": "dpm-solver++", "steps": 1000})
    assert r.status_code == 422 and r.json()["error"]["field"] == "steps"
