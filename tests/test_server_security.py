"""API keys, CORS, request ids and structured logs, body limits and hostile bodies, on the real server."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from server_harness import run_server, wait_until

GOOD = {"class_id": 1, "steps": 3}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keys")
    (tmp / "keys.txt").write_text("# operators\nkey-from-file\n")
    with run_server(tmp, "--api-keys-file", str(tmp / "keys.txt"), "--body-timeout", "1",
                    env={"DIT_API_KEYS": '["key-from-env"]'}) as s:
        yield s


def test_api_keys(keyed):
    no_key = httpx.post(keyed.url + "/generate", json=GOOD)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "unauthorized"
    assert no_key.headers["www-authenticate"].startswith("Bearer")
    assert httpx.post(keyed.url + "/generate", json=GOOD, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(keyed.url + "/generate", json=GOOD,
                      headers={"Authorization": "Bearer key-from-env"}, timeout=60).status_code == 200
    assert httpx.post(keyed.url + "/generate", json=GOOD, headers={"X-API-Key": "key-from-file"},
                      timeout=60).status_code == 200
    assert httpx.get(keyed.url + "/classes").status_code == 401
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(keyed.url + open_path).status_code == 200, open_path
    assert 'dit_requests_total{code="401"} 2.0' in httpx.get(keyed.url + "/metrics").text  # /generate only


def test_request_ids_and_json_logs(keyed):
    generated = httpx.get(keyed.url + "/healthz").headers["x-request-id"]
    assert len(generated) == 32
    assert httpx.get(keyed.url + "/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    odd = httpx.get(keyed.url + "/healthz", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
    assert odd != "bad id\twith spaces" and len(odd) == 32

    def access_lines():
        lines = [json.loads(line) for line in keyed.logs().splitlines() if line.startswith("{")]
        access = [r for r in lines if r["logger"] == "server.access" and r["request_id"] == "abc-123"]
        return (lines, access) if access else None

    lines, access = wait_until(access_lines, 10, "the access log line")  # the log is written after the answer
    assert access[0]["path"] == "/healthz" and access[0]["status"] == 200
    assert all(set(r) >= {"time", "level", "logger", "message", "request_id"} for r in lines)


def test_huge_body_is_413(keyed):
    r = httpx.post(keyed.url + "/generate", content=b"{" + b" " * 100_000 + b"}",
                   headers={"content-type": "application/json", "X-API-Key": "key-from-file"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_slow_body_is_cut_off(keyed):
    host, port = keyed.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"X-API-Key: key-from-file\r\nContent-Length: 100\r\n\r\n{\"class_id\"")
        t0 = time.monotonic()
        answer = sock.recv(4096).decode()  # the server must not wait for the rest forever
    assert answer.startswith("HTTP/1.1 408") and time.monotonic() - t0 < 5
    assert httpx.get(keyed.url + "/readyz").status_code == 200


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("plain"), "--cors-origins", '["http://ui.example"]') as s:
        yield s


@pytest.mark.parametrize("content,ctype", [
    (b"[" * 20_000 + b"]" * 20_000, "application/json"),  # deep JSON
    (json.dumps({"class_id": "\uff13"}).encode(), "application/json"),  # a full-width digit
    (json.dumps({"class_id": 1, "sampler": "ddim\u0000"}).encode(), "application/json"),
    (json.dumps({"class_id": 1, "\u00e9t\u00e9": 1}).encode(), "application/json"),
    (json.dumps(GOOD).encode(), "text/plain"),
    (json.dumps(GOOD).encode(), "multipart/form-data; boundary=x"),
    (b"", "application/json"),
    (b"null", "application/json"),
    (json.dumps({"class_id": 1, "steps": 1e309}).encode().replace(b"Infinity", b"1e999"), "application/json"),
])
def test_hostile_bodies_are_4xx_and_the_server_stays_ready(plain, content, ctype):
    r = httpx.post(plain.url + "/generate", content=content, headers={"content-type": ctype})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
    assert "error" in r.json()
    assert httpx.get(plain.url + "/readyz").status_code == 200


def test_cors(plain, keyed):
    allowed = httpx.options(plain.url + "/generate", headers={
        "Origin": "http://ui.example", "Access-Control-Request-Method": "POST"})
    assert allowed.headers.get("access-control-allow-origin") == "http://ui.example"
    other = httpx.get(plain.url + "/healthz", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    off = httpx.get(keyed.url + "/healthz", headers={"Origin": "http://ui.example"})  # CORS is off by default
    assert "access-control-allow-origin" not in off.headers
