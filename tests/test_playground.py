"""The playground page in a real headless Chromium, progress streaming, and the async job API.

One server (API keys on, so the page has to ask for one) and one browser serve the whole module."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from browser import CHROMIUM_HOW, body_data, chromium_available, fill, open_playground, start_chromium, wait_for
from conftest import require_installed
from PIL import Image
from server_harness import run_server, sse_events, wait_until

KEY = "playground-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # 8 rows: four guided samples fill the batch, so a queue is cheap to make. No deadline admission:
    # on a busy machine it would refuse the long requests these tests cancel (and the one queued behind
    # them) up front, which is not what they test.
    with run_server(tmp_path_factory.mktemp("play"), "--max-steps", "1000", "--max-batch-rows", "8",
                    env={"DIT_API_KEYS": json.dumps([KEY]), "DIT_DEADLINE_ADMISSION": "false"}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=180) as c:
        yield c


@pytest.fixture(scope="module")
def browser():
    require_installed(chromium_available(), "chromium and chromedriver", CHROMIUM_HOW)
    driver = start_chromium()
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, server):
    """The page, ready, with the key typed in and an empty history."""
    open_playground(browser, server.url, KEY)
    browser.execute_script("localStorage.removeItem('dit-history')")
    browser.refresh()
    wait_for(browser, lambda: body_data(browser, "ready") == "true", what="the page to be ready")
    return browser


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def css(driver, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def click_generate(driver) -> None:
    """Clicks Generate and waits for the result (the page counts finished generations in data-done)."""
    done = int(body_data(driver, "done") or 0)
    by_id(driver, "generate").click()
    wait_for(driver, lambda: int(body_data(driver, "done") or 0) == done + 1, what="the result")


def shown_seeds(driver) -> list[int]:
    return [int(img.get_attribute("data-seed")) for img in css(driver, "#results img")]


def shown_bytes(driver) -> bytes:
    return base64.b64decode(css(driver, "#results img")[0].get_attribute("src").split(",", 1)[1])


def test_page_loads_without_a_key_asks_for_one_and_generates_the_api_image(server, client, browser):
    assert httpx.get(server.url + "/info").status_code == 401  # keys are on
    browser.get(server.url + "/")
    browser.execute_script("localStorage.clear()")  # no key stored from an earlier visit
    browser.refresh()
    wait_for(browser, lambda: body_data(browser, "state") == "needs-key", what="the page to ask for a key")
    assert by_id(browser, "key-form").is_displayed() and "needs an API key" in by_id(browser, "key-message").text
    fill(browser, "api-key", "wrong-key")
    by_id(browser, "use-key").click()
    wait_for(browser, lambda: "refused" in by_id(browser, "key-message").text, what="the wrong key to be refused")
    open_playground(browser, server.url, KEY)  # the right key, typed into the page
    assert not by_id(browser, "key-form").is_displayed()

    by_id(browser, "class").send_keys("sneak")  # part of "Sneaker": picked by name
    fill(browser, "seed", "4242")
    fill(browser, "steps", "12")
    click_generate(browser)
    assert shown_seeds(browser) == [4242]
    status = by_id(browser, "status").text
    link = css(browser, "#results a")[0].get_attribute("download")
    cfg = client.get("/info").json()["defaults"]["cfg_scale"]
    direct = client.post("/generate", json={"class_id": 7, "seed": 4242, "steps": 12, "cfg_scale": cfg})
    assert direct.status_code == 200 and shown_bytes(browser) == direct.content
    assert status.startswith("Sneaker: 12") and link == "Sneaker-4242.png"
    browser.refresh()  # the key is kept in the page's storage: no second prompt
    wait_for(browser, lambda: body_data(browser, "ready") == "true", what="the page to load with the stored key")


def test_each_click_gets_a_new_seed_which_can_be_reused(page):
    by_id(page, "class").send_keys("Bag")
    fill(page, "steps", "5")
    assert by_id(page, "seed").get_attribute("value") == ""  # random by default
    click_generate(page)
    first = shown_seeds(page)
    click_generate(page)
    second, second_image = shown_seeds(page), shown_bytes(page)
    assert first != second and all(0 <= s < 2**53 for s in first + second)
    assert by_id(page, "last-seed-value").text == str(second[0])

    css(page, "#results button.reuse")[0].click()  # one click puts the shown seed back in the form
    assert by_id(page, "seed").get_attribute("value") == str(second[0])
    click_generate(page)
    assert shown_seeds(page) == second and shown_bytes(page) == second_image

    fill(page, "seed", str(2**53))  # beyond what the page can send exactly
    by_id(page, "generate").click()
    assert "whole number from 0 to" in by_id(page, "status").text and body_data(page, "state") == "idle"


def test_a_form_error_goes_away_once_its_field_is_fixed(page):
    by_id(page, "class").send_keys("zzz")  # no class has it in its name
    by_id(page, "generate").click()
    assert by_id(page, "status").text.startswith("Pick a class from the list") and body_data(page, "state") == "idle"
    fill(page, "seed", "3")  # another field: the class is still wrong, so the message stays
    assert by_id(page, "status").text.startswith("Pick a class from the list")
    fill(page, "class", "Bag")
    assert by_id(page, "status").text == ""  # fixed: no stale message before the next Generate

    fill(page, "seed", str(2**53))
    by_id(page, "generate").click()
    assert "whole number from 0 to" in by_id(page, "status").text
    fill(page, "seed", "12")
    assert by_id(page, "status").text == ""


def test_the_guidance_interval_control(page, client):
    defaults = client.get("/info").json()["defaults"]
    shown = [float(by_id(page, f"interval-{end}").get_attribute("value")) for end in ("lo", "hi")]
    assert shown == defaults["guidance_interval"]
    by_id(page, "class").send_keys("Bag")
    for field, value in (("steps", "6"), ("seed", "9"), ("interval-lo", "0.2"), ("interval-hi", "0.6")):
        fill(page, field, value)
    click_generate(page)
    direct = client.post("/generate", json={"class_id": 8, "seed": 9, "steps": 6, "cfg_scale": defaults["cfg_scale"],
                                            "guidance_interval": [0.2, 0.6]})
    assert shown_bytes(page) == direct.content and "guided in [0.2, 0.6]" in by_id(page, "status").text
    fill(page, "interval-lo", "0.7")  # above its upper end
    by_id(page, "generate").click()
    assert "guidance interval needs" in by_id(page, "status").text and body_data(page, "state") == "idle"


def test_history_survives_a_reload_and_can_be_cleared(page, server):
    by_id(page, "class").send_keys("Trouser")
    fill(page, "steps", "5")
    fill(page, "seed", "31337")
    fill(page, "num-images", "2")
    click_generate(page)
    wait_for(page, lambda: len(css(page, "#history li")) == 1, what="the history entry")
    page.refresh()
    wait_for(page, lambda: body_data(page, "ready") == "true", what="the page to reload")
    entries = css(page, "#history li")
    assert len(entries) == 1 and entries[0].get_attribute("data-seed") == "31337"
    assert "Trouser" in entries[0].text and "×2" in entries[0].text
    thumb = css(page, "#history li img")[0]
    assert page.execute_script("return arguments[0].naturalWidth", thumb) > 0  # a real image
    fill(page, "seed", "")
    css(page, "#history li button.thumb")[0].click()  # back to that entry's settings
    assert by_id(page, "seed").get_attribute("value") == "31337"
    assert by_id(page, "num-images").get_attribute("value") == "2"

    by_id(page, "clear-history").click()
    assert css(page, "#history li") == [] and not by_id(page, "history-section").is_displayed()
    page.refresh()
    wait_for(page, lambda: body_data(page, "ready") == "true", what="the page to reload")
    assert css(page, "#history li") == []


def test_cancel_stops_the_job_and_frees_its_samples(page, server):
    images_before = server.metric("dit_images_generated_total")
    steps_before = server.metric("dit_denoise_steps_total")
    by_id(page, "class").send_keys("Coat")
    fill(page, "steps", "1000")
    page.execute_script("document.getElementById('sampler').value = 'ddim'")
    by_id(page, "generate").click()
    wait_for(page, lambda: by_id(page, "status").text.startswith("step "), what="the generation to run")
    wait_until(lambda: server.metric("dit_active_samples") == 1, 30, "the sample to be in flight")
    assert by_id(page, "cancel").is_displayed()
    by_id(page, "cancel").click()
    wait_for(page, lambda: body_data(page, "cancelled") == "1", what="the page to show the cancel")
    assert by_id(page, "status").text.startswith("Cancelled at step ")
    assert by_id(page, "generate").is_enabled() and not by_id(page, "cancel").is_displayed()
    wait_until(lambda: server.metric("dit_active_samples") == 0, 10, "the cancelled sample to be dropped")
    assert server.metric("dit_images_generated_total") == images_before  # no image was made
    assert server.metric("dit_denoise_steps_total") - steps_before < 1000  # it stopped part-way


def test_queue_position_is_shown_while_waiting_and_a_waiting_request_can_be_cancelled(page, server, client):
    rows = client.get("/info").json()["max_batch_rows"]
    filler = {"class_id": 2, "steps": 1000, "sampler": "ddim", "num_images": rows // 2, "cfg_scale": 4.0,
              "guidance_interval": [0, 1], "cache": "off"}  # 2 rows each at every step: the batch full throughout
    job = client.post("/jobs", json=filler).json()
    try:
        wait_until(lambda: server.metric("dit_active_samples") == rows // 2, 30, "the batch to be full")
        by_id(page, "class").send_keys("Pullover")
        fill(page, "steps", "5")
        by_id(page, "generate").click()
        wait_for(page, lambda: by_id(page, "status").text == "waiting in the queue: next", what="the queue position")
        by_id(page, "cancel").click()
        wait_for(page, lambda: body_data(page, "cancelled") is not None, what="the page to show the cancel")
        assert by_id(page, "status").text.startswith("Cancelled before it started")
        wait_until(lambda: server.metric("dit_queue_depth") == 0, 10, "the waiting request to leave the queue")
    finally:
        client.delete(job["status_url"])
    wait_until(lambda: server.metric("dit_active_samples") == 0, 10, "the filler to be dropped")


def test_a_preview_appears_before_the_final_image(page):
    by_id(page, "class").send_keys("Shirt")
    fill(page, "steps", "200")
    fill(page, "num-images", "4")
    page.execute_script("document.getElementById('sampler').value = 'ddim'")
    click_generate(page)
    assert int(body_data(page, "previewsBeforeResult")) >= 1  # shown in place of the images, before them
    assert len(shown_seeds(page)) == 4 and css(page, "#results figure.preview") == []
    decoded = wait_for(page, lambda: body_data(page, "previewDecoded"), what="a preview decoded by the browser")
    width, height = map(int, decoded.split("x"))
    assert decoded == body_data(page, "previewSize") and width > 0 and width == height  # a 2 x 2 grid


def test_progress_events_increase_then_result(client):
    body = {"class_id": 3, "steps": 60, "seed": 1, "sampler": "ddim"}
    with client.stream("POST", "/generate", json=body, headers={"Accept": "text/event-stream"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    steps = [data["step"] for name, data in events if name == "progress"]
    assert len(steps) >= 3 and steps == sorted(steps) and steps[-1] == 60
    name, result = events[-1]
    assert name == "result" and result["images"][0]["seed"] == 1 and result["steps"] == 60
    direct = client.post("/generate", json=body)
    assert base64.b64decode(result["images"][0]["data"]) == direct.content


def test_preview_events_come_before_the_result(client):
    body = {"class_id": 3, "steps": 100, "seed": 1, "sampler": "ddim", "num_images": 2, "previews": True}
    with client.stream("POST", "/generate", json=body, headers={"Accept": "text/event-stream"}) as r:
        events = sse_events(r)
    previews = [data for name, data in events if name == "preview"]
    assert previews and events[-1][0] == "result"
    assert all(0 < p["step"] < 100 and p["step"] % 10 == 0 for p in previews)
    image = Image.open(io.BytesIO(base64.b64decode(previews[0]["data"])))
    assert image.size == (previews[0]["width"], previews[0]["height"]) and image.width > image.height  # 2 in a row


def test_progress_stream_reports_errors_in_the_stream(client):
    with client.stream("POST", "/generate", json={"class_id": 99}, headers={"Accept": "text/event-stream"}) as r:
        assert r.status_code == 422  # validation fails before the stream starts


def test_async_job_submit_poll_fetch(client):
    body = {"class_id": 5, "steps": 30, "seed": 9, "num_images": 2}
    submitted = client.post("/jobs", json=body)
    assert submitted.status_code == 202
    job = submitted.json()
    status = wait_until(lambda: (s := client.get(job["status_url"]).json())["status"] == "done" and s,
                        60, "the job to finish")
    assert status["step"] == 30 and status["seeds"] == [9, 10]
    result = client.get(job["result_url"])
    assert result.status_code == 200 and result.content == client.post("/generate", json=body).content


def test_async_job_cancel_frees_its_samples(server, client):
    job = client.post("/jobs", json={"class_id": 1, "steps": 1000, "seed": 3, "sampler": "ddim"}).json()
    wait_until(lambda: client.get(job["status_url"]).json()["status"] == "running", 30, "the job to run")
    assert client.get(job["result_url"]).status_code == 409  # not finished yet
    assert client.delete(job["status_url"]).json()["status"] == "cancelled"
    wait_until(lambda: server.metric("dit_active_samples") == 0, 10, "the cancelled samples to be dropped")
    status = client.get(job["status_url"]).json()
    assert status["status"] == "cancelled" and status["step"] < 1000
    assert client.get("/jobs/nope").status_code == 404


def test_page_and_its_assets_load_without_a_key_and_nothing_else_does(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "dit-serve" in page.text and "/static/app.js" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert httpx.get(server.url + asset).status_code == 200, asset
    for closed in ("/info", "/classes", "/static/missing.js"):
        assert httpx.get(server.url + closed).status_code == 401, closed


def test_sampler_limits_are_a_422(client):
    r = client.post("/generate", json={"class_id": 1, "sampler": "dpm-solver++", "steps": 1000})
    assert r.status_code == 422 and r.json()["error"]["field"] == "steps"
