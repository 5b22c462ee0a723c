"""A real HTTP receiver for signed webhooks: it verifies the Standard Webhooks headers with the
`standardwebhooks` library (`Webhook(secret).verify(body, headers)`), answers 500 to the first `failures`
requests, then 200, and keeps every request it got. `answer` is the body it sends back (a test puts a
secret-looking string there and checks it is kept nowhere); `delay` makes it wait before answering."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    at: float
    headers: dict[str, str]
    body: bytes
    signature_ok: bool


@dataclass
class Receiver:
    failures: int  # answer 500 to this many requests first
    secret: str = ""
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    answer: bytes = b"ok"
    delay: float = 0.0  # seconds before answering

    def verifies(self, headers: dict[str, str], body: bytes) -> bool:
        if not self.secret:
            return False
        try:
            Webhook(self.secret).verify(body, headers)
        except (WebhookVerificationError, ValueError):
            return False
        return True

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        ok = self.verifies(headers, body)
        with self.lock:
            self.received.append(Received(time.monotonic(), headers, body, ok))
            count = len(self.received)
        if not ok:
            return 401
        return 500 if count <= self.failures else 200


@contextlib.contextmanager
def webhook_receiver(failures: int = 0, path: str = "/hooks") -> Iterator[Receiver]:
    state = Receiver(failures=failures)
    stopping = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            status = state.handle({k.lower(): v for k, v in self.headers.items()}, body)
            if state.delay:
                stopping.wait(state.delay)  # a slow receiver; ends early when the test is over
            try:
                self.send_response(status)
                self.send_header("content-length", str(len(state.answer)))
                self.end_headers()
                self.wfile.write(state.answer)
            except OSError:  # the sender gave up first (its deadline)
                return

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}{path}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
