"""A loopback webhook receiver for tests (jobs' and datasets' webhooks), and what a receiver does to
trust a delivery (the Standard Webhooks library's check)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook


class Receiver:
    """A loopback webhook receiver: records every delivery; /flaky answers 500 to a job's first try, /down
    always, any path while `refusing` is set 503."""

    def __init__(self):
        self.deliveries: list[dict] = []
        self.refusing = False
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.cond:
                    job_id = json.loads(body)["id"]
                    first = not any(d["job"] == job_id for d in receiver.deliveries)
                    code = 500 if self.path == "/down" or (self.path == "/flaky" and first) else 200
                    code = 503 if receiver.refusing else code
                    receiver.deliveries.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                                "job": job_id, "at": time.monotonic(), "code": code})
                    receiver.cond.notify_all()
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def wait_for(self, job_id: str, count: int, timeout: float = 60) -> list[dict]:
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.of(job_id)) >= count, timeout)
            assert ok, f"{len(self.of(job_id))} deliveries for job {job_id}, expected {count}"
            return self.of(job_id)

    def of(self, job_id: str) -> list[dict]:
        return [d for d in self.deliveries if d["job"] == job_id]


def verify(delivery: dict, secret: str) -> dict:
    """What a receiver does: the Standard Webhooks library checks the timestamp is fresh and the signature
    matches the key's secret; then the body is trusted."""
    assert delivery["headers"]["Content-Type"] == "application/json"
    assert not any(h.lower().startswith("x-dit-") for h in delivery["headers"])  # the old headers are gone
    return Webhook(secret).verify(delivery["body"], delivery["headers"])
