"""The API features clients of image servers expect, through the real server: class names, queue
position, webhooks (to a loopback receiver in this test), jobs that belong to their API key, seeds a
JavaScript client can repeat, errors that teach, /docs without internet; and, on a second server,
the finish reasons of a deadline and of shutdown.

One server with API keys and webhooks on serves the module (its row budget of 16 lets a 16-image
request hold the batch until the test cancels it, so that the queue test decides who waits, not the
clock)."""

from __future__ import annotations

import json
import queue
import re
import signal
import threading
import time
from datetime import UTC, datetime
from urllib.parse import unquote

import httpx
import pytest
from server_harness import ROOT, run_server, wait_until
from standardwebhooks import Webhook, WebhookVerificationError
from webhook_receiver import Receiver, verify

from server.http.webhooks import host_allowed
from server.service.class_names import ClassIndex, ClassNameError

ALICE, BOB = "alice-key", "bob-key"
SECRET = "whsec_" + "dGVzdC1zZWNyZXQtb2YtdGhpcy1zZXJ2ZXItMzItYnl0ZXM="  # base64 of 32 bytes
HOLD = {"class_id": 1, "steps": 1000, "sampler": "ddim", "cfg_scale": 1.0, "num_images": 16,
        "cache": "off"}  # all 16 rows at every step (a step cache would leave some free)


@pytest.fixture(scope="module")
def alice_secret(alice) -> str:
    answer = alice.get("/webhooks/secret")
    assert answer.status_code == 200, answer.text
    return answer.json()["secret"]


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.http.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Requests queued behind HOLD (~1 min on a CPU) must queue, whatever the step-time estimate says
    # (deadline-aware admission has its own tests): these tests are about queues, jobs and webhooks.
    with run_server(tmp_path_factory.mktemp("features"), "--max-steps", "1000", "--max-batch-rows", "16",
                    "--no-deadline-admission", "--webhook-allow-hosts", '["127.0.0.1", ".hooks.example"]',
                    "--open-paths", "/healthz,/readyz,/metrics,/docs,/redoc,/openapi.json",
                    env={"DIT_API_KEYS": json.dumps([ALICE, BOB]), "DIT_WEBHOOK_SECRET": SECRET}) as s:
        yield s


@pytest.fixture(scope="module")
def alice(server):
    with server.client(headers={"X-API-Key": ALICE}) as c:
        yield c


@pytest.fixture(scope="module")
def bob(server):
    with server.client(headers={"Authorization": f"Bearer {BOB}"}) as c:
        yield c


# ---- 1. class names -------------------------------------------------------------------------------

def test_class_by_name_prefix_or_id(alice):
    for name, class_id in (("ANKLE", 9), ("ankle boot", 9), ("shirt", 6), ("t-sh", 0), ("  Bag ", 8)):
        r = alice.post("/generate", json={"class_name": name, "steps": 2, "seed": 1})
        assert r.status_code == 200, r.text
        assert r.headers["x-class-id"] == str(class_id), name
    r = alice.post("/generate", json={"class_name": "sneak", "steps": 2}, headers={"Accept": "application/json"})
    assert r.json()["class_id"] == 7 and r.json()["class_name"] == "Sneaker"
    assert unquote(r.headers["x-class-name"]) == "Sneaker"


@pytest.mark.parametrize("body,field,words", [
    ({"class_name": "s"}, "class_name", ["Sandal", "Shirt", "Sneaker"]),  # ambiguous: the candidates
    ({"class_name": "sandals"}, "class_name", ["closest", "Sandal"]),  # unknown: the closest names
    ({"class_id": 1, "class_name": "Bag"}, "class_id", ["class_id", "class_name"]),  # both: names both
    ({"steps": 2}, "class_id", ["class_id", "class_name"]),  # neither
    ({"class_id": 10}, "class_id", ["below 10"]),
])
def test_class_errors_name_the_candidates(alice, body, field, words):
    r = alice.post("/generate", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == field and all(w in err["message"] for w in words), err


def test_classes_search_and_schema_maximum(server, alice):
    found = alice.get("/classes", params={"q": "SHIRT"}).json()["classes"]
    assert found == [{"id": 0, "name": "T-shirt/top"}, {"id": 6, "name": "Shirt"}]
    assert alice.get("/classes", params={"q": "zzz"}).json() == {"classes": []}
    schema = httpx.get(server.url + "/openapi.json").json()  # opened by --open-paths, like the docs
    for model in ("GenerateRequest", "JobRequest"):
        class_id = schema["components"]["schemas"][model]["properties"]["class_id"]
        assert {"type": "integer", "minimum": 0, "maximum": 9} in class_id["anyOf"], class_id


def test_class_names_with_synonyms_as_imagenet_has_them():
    names = json.loads((ROOT / "model" / "imagenet_classes.json").read_text())  # what DiT-XL/2 serves
    index = ClassIndex(tuple(names))
    assert index.resolve("tench") == index.resolve("Tinca tinca") == index.resolve("TENCH, tinca TINCA") == 0
    assert index.resolve("golden retr") == 207 and index.resolve("man-eater") == 2
    with pytest.raises(ClassNameError, match="134.*517|517.*134"):
        index.resolve("crane")  # a bird and a machine
    assert 207 in index.search("retriever")


# ---- 2. queue position ----------------------------------------------------------------------------

def stream_events(client: httpx.Client, body: dict, out: queue.Queue) -> None:
    """POST /generate as server-sent events; each (event, data) goes to `out`, then None."""
    with client.stream("POST", "/generate", json=body, headers={"Accept": "text/event-stream"}) as r:
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                out.put((name, json.loads(line.removeprefix("data: "))))
    out.put(None)


def next_event(events: queue.Queue, until, timeout: float = 60):
    """Events until one satisfies `until`; returns them all."""
    seen, end = [], time.monotonic() + timeout
    while True:
        event = events.get(timeout=max(0.1, end - time.monotonic()))
        assert event is not None, f"the stream ended; events: {seen}"
        seen.append(event)
        if until(event):
            return seen


def test_queue_position_in_the_stream_and_the_job_status(alice, receiver):
    first = alice.post("/jobs", json=HOLD).json()  # holds all 16 rows
    wait_until(lambda: alice.get(first["status_url"]).json()["status"] == "running", 60, "the first job to run")
    second = alice.post("/jobs", json=dict(HOLD, webhook_url=receiver.url + "/ok", tag="second")).json()
    events: queue.Queue = queue.Queue()
    reader = threading.Thread(target=stream_events, args=(alice, {"class_id": 3, "steps": 5, "seed": 4}, events))
    reader.start()
    try:
        seen = next_event(events, lambda e: e[1].get("queue_position") == 2)
        assert seen[-1] == ("progress", {"step": 0, "steps": 5, "status": "queued", "queue_position": 2})
        status = alice.get(second["status_url"]).json()
        assert status["status"] == "queued" and status["queue_position"] == 1
        alice.delete(second["status_url"])  # a queued job leaves the queue: the stream moves up
        seen += next_event(events, lambda e: e[1].get("queue_position") == 1)
        status = alice.get(second["status_url"]).json()
        assert status["status"] == "cancelled" and status["queue_position"] is None
        alice.delete(first["status_url"])  # the rows are free: the stream's request runs
        seen += next_event(events, lambda e: e[0] == "result")
    finally:
        alice.delete(first["status_url"])
        alice.delete(second["status_url"])
        reader.join(60)
    positions = [data["queue_position"] for name, data in seen if "queue_position" in data]
    assert positions == [2, 1], seen
    statuses = [data["status"] for name, data in seen if name == "progress"]
    # in order, never back (a 5-step request may run between two of the stream's looks: "running" may be
    # skipped, and asserting it would depend on timing)
    order = ["queued", "running", "encoding", "done"]
    assert statuses[0] == "queued" and statuses[-1] == "done", statuses
    assert [order.index(s) for s in statuses] == sorted(order.index(s) for s in statuses), statuses
    # The cancelled job's webhook says so, with its tag.
    cancelled = verify(receiver.wait_for(second["id"], 1)[0], alice.get("/webhooks/secret").json()["secret"])
    assert cancelled["status"] == "cancelled" and cancelled["tag"] == "second"
    assert cancelled["error"]["code"] == "cancelled"


# ---- 3. webhooks ----------------------------------------------------------------------------------

def test_webhook_signed_retried_after_a_500_with_the_tag(alice, alice_secret, receiver):
    r = alice.post("/jobs", json={"class_name": "bag", "steps": 3, "seed": 5, "tag": "order-17",
                                  "webhook_url": receiver.url + "/flaky"}, headers={"Accept": "application/json"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["tag"] == "order-17"
    first, second = receiver.wait_for(job["id"], 2)[:2]
    assert second["at"] - first["at"] >= 0.9  # the retry waited (1 s after a 500)
    body = verify(second, alice_secret)
    assert verify(first, alice_secret) == body
    assert body["id"] == job["id"] and body["status"] == "done" and body["tag"] == "order-17"
    assert body["class_id"] == 8 and body["step"] == body["steps"] == 3 and body["error"] is None
    # A retry is the same message (its id), signed afresh (its timestamp may differ; its signature covers it).
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == job["id"]
    assert first["headers"]["webhook-signature"] != second["headers"]["webhook-signature"] or \
        first["headers"]["webhook-timestamp"] == second["headers"]["webhook-timestamp"]
    result = alice.get(job["result_url"]).json()
    assert result["tag"] == "order-17" and result["class_name"] == "Bag"
    assert alice.get(job["status_url"]).json()["tag"] == "order-17"


def test_each_key_signs_with_its_own_secret_and_cannot_forge_another_s(alice, bob, alice_secret, receiver):
    bob_secret = bob.get("/webhooks/secret").json()["secret"]
    assert bob_secret != alice_secret and bob_secret != SECRET and alice_secret != SECRET
    assert bob.get("/webhooks/secret").json()["secret"] == bob_secret  # stable: derived, not drawn
    job = bob.post("/jobs", json={"class_id": 2, "steps": 2, "webhook_url": receiver.url + "/ok"}).json()
    delivery = receiver.wait_for(job["id"], 1)[0]
    assert verify(delivery, bob_secret)["id"] == job["id"]
    with pytest.raises(WebhookVerificationError):  # another key's secret does not verify it
        verify(delivery, alice_secret)
    # Bob forges a "done" for one of Alice's jobs: signed with the only secret he has, Alice refuses it.
    forged = json.dumps({"id": "alice-job", "status": "done"}).encode()
    now = datetime.now(UTC)
    headers = {"Content-Type": "application/json", "webhook-id": "alice-job",
               "webhook-timestamp": str(int(now.timestamp())),
               "webhook-signature": Webhook(bob_secret).sign("alice-job", now, forged)}
    with pytest.raises(WebhookVerificationError):
        verify({"headers": headers, "body": forged}, alice_secret)


@pytest.mark.parametrize("url,words", [
    ("http://evil.example/hook", ["'evil.example'", "--webhook-allow-hosts"]),
    ("http://hooks.example.evil.test/x", ["not in"]),
    ("ftp://127.0.0.1/x", ["http://"]),
    ("not a url", ["http://"]),
])
def test_webhook_to_a_host_not_allowed_is_refused(alice, receiver, url, words):
    r = alice.post("/jobs", json={"class_id": 1, "steps": 2, "webhook_url": url})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "webhook_url" and all(w in err["message"] for w in words), err


def test_allowed_hosts_are_exact_names_or_dot_suffixes():
    allowed = ["127.0.0.1", ".hooks.example", "Exact.Test"]
    assert host_allowed("a.hooks.example", allowed) and host_allowed("a.b.hooks.example.", allowed)
    assert host_allowed("exact.test", allowed) and host_allowed("127.0.0.1", allowed)
    assert not host_allowed("hooks.example", allowed) and not host_allowed("evilhooks.example", allowed)
    assert not host_allowed("sub.exact.test", allowed) and not host_allowed("127.0.0.2", allowed)


# ---- 4. jobs belong to their caller ---------------------------------------------------------------

def test_jobs_belong_to_the_key_that_created_them(alice, bob):
    older = alice.post("/jobs", json={"class_id": 2, "steps": 2, "tag": "a1"})
    newer = alice.post("/jobs", json={"class_id": 2, "steps": 2, "tag": "a2"})
    assert newer.status_code == 202 and newer.headers["location"] == f"/jobs/{newer.json()['id']}"
    job = newer.json()
    wait_until(lambda: alice.get(job["status_url"]).json()["status"] == "done", 60, "the job to finish")
    for response in (bob.get(job["status_url"]), bob.get(job["result_url"]), bob.delete(job["status_url"])):
        assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_job"
    assert job["id"] not in [j["id"] for j in bob.get("/jobs").json()["jobs"]]
    mine = alice.get("/jobs").json()["jobs"]
    ids = [j["id"] for j in mine]
    assert ids.index(job["id"]) < ids.index(older.json()["id"])  # newest first
    assert mine[ids.index(job["id"])]["tag"] == "a2" and mine[ids.index(job["id"])]["status"] == "done"
    assert len(alice.get("/jobs", params={"limit": 1}).json()["jobs"]) == 1
    assert alice.get(job["result_url"]).status_code == 200


# ---- 5. seeds -------------------------------------------------------------------------------------

def test_server_chosen_seeds_are_exact_in_javascript(alice):
    for _ in range(4):  # a seed below 2^63 is below 2^53 once in 1024 times: four in a row, once in 10^12
        seeds = alice.post("/generate", json={"class_id": 0, "steps": 1, "num_images": 2}).headers["x-seeds"]
        assert all(0 <= int(s) < 2**53 for s in seeds.split(",")), seeds


# ---- 6. errors that teach -------------------------------------------------------------------------

def test_errors_that_teach(alice):
    untyped = alice.post("/generate", content=b'{"class_id": 1}', headers={"Content-Type": "text/plain"})
    assert untyped.status_code == 415 and "Content-Type: application/json" in untyped.json()["error"]["message"]
    broken = alice.post("/generate", content=b'{"class_id": 1,\n "steps": 3,,}',
                        headers={"Content-Type": "application/json"}).json()["error"]
    assert "line 2, column 13" in broken["message"] and broken["field"] is None
    several = alice.post("/generate", json={"class_id": 1, "steps": 0, "guidance_scale": 3,
                                            "num_inference_steps": 20, "class_labels": [1]}).json()["error"]
    assert len(several["errors"]) == 5 and several["field"] == several["errors"][0]["field"]
    assert several["errors"][-1]["message"].startswith("the fields are: class_id, class_name")  # once
    hints = {e["field"]: e["message"] for e in several["errors"]}
    assert "did you mean `cfg_scale`?" in hints["guidance_scale"]
    assert "did you mean `steps`?" in hints["num_inference_steps"]
    assert "did you mean `class_id`?" in hints["class_labels"]
    assert "webhook_url is for async jobs" in alice.post("/generate", json={"class_id": 1, "webhook_url": "x"}
                                                         ).json()["error"]["message"]


def test_accept_picks_the_image_format_when_format_is_absent(alice):
    jpeg = alice.post("/generate", json={"class_id": 1, "steps": 2}, headers={"Accept": "image/jpeg"})
    assert jpeg.headers["content-type"] == "image/jpeg" and jpeg.content[:2] == b"\xff\xd8"
    webp = alice.post("/generate", json={"class_id": 1, "steps": 2},
                      headers={"Accept": "image/png;q=0.5, image/webp"})
    assert webp.headers["content-type"] == "image/webp"
    explicit = alice.post("/generate", json={"class_id": 1, "steps": 2, "format": "png"},
                          headers={"Accept": "image/webp"})
    assert explicit.headers["content-type"] == "image/png"


def test_thousands_of_unknown_fields_get_a_short_answer(alice):
    names = [a + b + c for a in "xyz" for b in "abcdefghijklmnopqrstuvwxyz0123456789" for c in
             "abcdefghijklmnopqrstuvwxyz0123456789"][:3800]  # 3,800 unknown keys in 31 KB of JSON
    body = json.dumps({"class_id": 1, **dict.fromkeys(names, 0)}, separators=(",", ":"))
    answer = alice.post("/generate", content=body, headers={"Content-Type": "application/json"})
    error = answer.json()["error"]
    assert answer.status_code == 422 and len(answer.content) <= 16 * 1024, len(answer.content)
    assert len(error["errors"]) == 21 and error["errors"][-1]["message"].startswith("and 3780 more unknown fields")
    assert error["errors"][-1]["message"].count("class_id") == 1  # the valid fields, once
    # Just past the 20 shown (the body's model refuses them at once), and just within (pydantic's errors,
    # with the other fields' problems): the same answer's shape.
    for count, more in ((21, "and 1 more unknown fields"), (20, "the fields are")):
        answer = alice.post("/jobs", json={"class_id": 1, "steps": 0, **dict.fromkeys(names[:count], 0)})
        errors = answer.json()["error"]["errors"]
        assert answer.status_code == 422
        assert [e["field"] for e in errors if e["message"].startswith("unknown field")] == names[:20]
        summary = next(e["message"] for e in errors if e["field"] is None)
        assert summary.startswith(more) and "webhook_url" in summary, summary
        assert any(e["field"] == "steps" for e in errors) == (count == 20), errors


def test_a_webhook_url_the_client_would_refuse_is_refused_at_submission(alice):
    answer = alice.post("/jobs", json={"class_id": 1, "webhook_url": "http://127.0.0.1\t:8301/tab"})
    assert answer.status_code == 422 and answer.json()["error"]["field"] == "webhook_url"


def test_every_error_has_the_one_shape(alice):
    """Broken JSON, a wrong method, bytes that are not JSON text at all: the error shape, with `errors`
    on every 422 and a code of its own for each status."""
    broken = alice.post("/generate", content=b'{"class_id": 1,,}', headers={"Content-Type": "application/json"})
    assert broken.status_code == 422 and broken.json()["error"]["errors"][0]["message"].startswith("the body is not")
    wrong = alice.get("/generate")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in wrong.json()["error"]["message"] and wrong.headers["allow"] == "POST"
    missing = alice.get("/no-such-path")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    for body, words in [(b'{"class_id": "\xff\xfe"}', "not UTF-8"), (b"[" * 20_000 + b"]" * 20_000, "too deep"),
                        (b'{"class_id": ' + b"9" * 5000 + b"}", "digits")]:
        answer = alice.post("/generate", content=body, headers={"Content-Type": "application/json"})
        error = answer.json()["error"]
        assert answer.status_code == 422 and error["code"] == "invalid_request" and error["errors"], error
        assert words in error["message"], error


def test_numbers_are_strict_everywhere_and_the_messages_are_ours(alice):
    for field, value in [("cfg_scale", "4"), ("guidance_interval", ["0", "1"]), ("steps", "10"), ("seed", "5"),
                         ("steps", 2.0), ("num_images", True)]:
        answer = alice.post("/generate", json={"class_id": 1, field: value})
        assert answer.status_code == 422 and answer.json()["error"]["field"].startswith(field), (field, value)
    assert alice.post("/generate", json={"class_id": 1, "steps": 2, "cfg_scale": 4}).status_code == 200  # 4 is 4.0
    named = alice.post("/generate", json={"class_id": "Sneaker"}).json()["error"]
    assert named["field"] == "class_id" and "class_name: 'Sneaker'" in named["message"]
    interval = alice.post("/generate", json={"class_id": 1, "guidance_interval": [0.7, 0.2]}).json()["error"]
    assert interval["message"].startswith("guidance_interval: guidance_interval must satisfy"), interval


def test_accept_q_zero_is_honoured_and_nothing_acceptable_is_406(alice):
    body = {"class_id": 1, "steps": 2}
    image = alice.post("/generate", json=body, headers={"Accept": "application/json;q=0, image/*"})
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    plain = alice.post("/generate", json=body, headers={"Accept": "text/event-stream;q=0, application/json"})
    assert plain.headers["content-type"] == "application/json" and plain.json()["images"]
    refused = alice.post("/generate", json=body, headers={"Accept": "application/json;q=0"})
    assert refused.status_code == 406 and refused.json()["error"]["code"] == "not_acceptable"
    assert alice.post("/generate", json=body, headers={"Accept": "text/html"}).status_code == 406


def test_the_schema_documents_the_one_error_shape(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(schema)
    answer = schema["paths"]["/jobs/{job_id}"]["get"]["responses"]["422"]["content"]["application/json"]
    assert answer["schema"] == {"$ref": "#/components/schemas/ErrorBody"}


# ---- 7. offline docs ------------------------------------------------------------------------------

def test_docs_work_offline(server):
    for page in ("/docs", "/redoc"):
        html = httpx.get(server.url + page).text  # opened by --open-paths; the assets need no key
        assert not re.search(r"(https?:)?//[a-z0-9]", html, re.I), html  # nothing from a CDN
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets and all(a.startswith("/static/docs/") for a in assets), assets
        for asset in assets:
            assert httpx.get(server.url + asset).status_code == 200, asset
    assert "url: '/openapi.json'" in httpx.get(server.url + "/docs").text


# ---- finish reasons (issue 12), on the same server ------------------------------------------------

def test_cancelled_job_is_409_cancelled_and_a_disconnect_logs_no_unretrieved_future(server, alice):
    job = alice.post("/jobs", json=HOLD).json()
    assert alice.delete(job["status_url"]).json()["status"] == "cancelled"
    result = alice.get(job["result_url"])
    assert result.status_code == 409 and result.json()["error"]["code"] == "cancelled"
    with pytest.raises(httpx.ReadTimeout), server.client(headers={"X-API-Key": ALICE}, timeout=1.0) as c:
        c.post("/generate", json=HOLD)  # the client gives up and goes away
    wait_until(lambda: server.metric("dit_active_samples") == 0, 60, "the abandoned samples to be dropped")
    assert alice.get(job["status_url"]).json()["status"] == "cancelled"
    assert alice.post("/generate", json={"class_id": 1, "steps": 2}).status_code == 200
    assert "never retrieved" not in server.logs()


@pytest.fixture(scope="module")
def short_deadline(tmp_path_factory, receiver):
    """--request-timeout 2 is also the shutdown grace period (for requests and webhooks alike)."""
    with run_server(tmp_path_factory.mktemp("deadline"), "--max-steps", "1000", "--request-timeout", "2",
                    "--no-warmup", "--webhook-allow-hosts", '["127.0.0.1"]',
                    env={"DIT_WEBHOOK_SECRET": SECRET}) as s:
        yield s


def test_deadline_is_504_and_sigterm_logs_undelivered_webhooks(short_deadline, receiver):
    s = short_deadline
    r = httpx.post(s.url + "/generate", json=HOLD, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    job = httpx.post(s.url + "/jobs", json={"class_id": 1, "steps": 2, "webhook_url": receiver.url + "/down"}).json()
    receiver.wait_for(job["id"], 1)  # tried once, answered 500: a retry is pending
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    logs = s.logs()
    assert re.search(rf"webhook undelivered: job {re.escape(job['id'])} .*grace period", logs), logs[-3000:]
    assert "never retrieved" not in logs
