"""A real HTTP receiver for the alert tests, run as its own process.

`python -m tests.support.alert_receiver RECORD_FILE` binds a free loopback port, prints it,
and appends one JSON line per request to RECORD_FILE (method, path, headers, body, and the
answer it gave). `POST /_control` with {"answers": [...]} queues answers for the next
requests, each one of {"status": 500}, {"status": 429, "retry_after": "2"} or {"hang": 5.0}
(sleep, then 200); once the queue is empty every request gets 200 (202 on paths ending in
/enqueue, as PagerDuty). A request is recorded when it arrives; one whose notification id was
already answered 2xx on the same path (processed) is recorded as a duplicate.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_lock = threading.Lock()
_answers: list[dict[str, Any]] = []
_processed: set[tuple[str, str]] = set()  # (path, notification id): one receiver per path


def notification_id(body: bytes) -> str | None:
    """The notification id of a CloudEvents, ServiceNow or PagerDuty body."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if isinstance(doc, dict) and "specversion" in doc:
        return str(doc["id"])
    if isinstance(doc, dict) and "records" in doc:
        return str(json.loads(doc["records"][0]["additional_info"])["notification_id"])
    if isinstance(doc, dict) and "routing_key" in doc:
        return f"{doc['dedup_key']}:{doc['event_action']}:{doc.get('payload', {}).get('timestamp')}"
    return None


class Handler(BaseHTTPRequestHandler):
    record_file = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        if self.path == "/_control":
            with _lock:
                _answers.extend(json.loads(body)["answers"])
            self._answer(200, b"{}")
            return
        with _lock:
            answer = _answers.pop(0) if _answers else {}
        status = int(answer.get("status", 202 if self.path.endswith("/enqueue") else 200))
        nid = notification_id(body)
        with _lock:  # recorded on arrival, so a test sees a request that is still hanging
            duplicate = (self.path, nid) in _processed
            if 200 <= status < 300 and nid is not None:
                _processed.add((self.path, nid))
            entry = {
                "method": "POST",
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body.decode(),
                "id": nid,
                "status": status,
                "hung": "hang" in answer,
                "duplicate": duplicate,
                "received": time.time(),
            }
            with open(self.record_file, "a", encoding="utf-8") as out:
                out.write(json.dumps(entry) + "\n")
        if "hang" in answer:
            time.sleep(float(answer["hang"]))
        extra = {"Retry-After": str(answer["retry_after"])} if "retry_after" in answer else {}
        self._answer(status, b'{"result": "ok"}', extra)

    def _answer(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timed out): the request is recorded all the same


def main() -> None:
    Handler.record_file = sys.argv[1]
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
