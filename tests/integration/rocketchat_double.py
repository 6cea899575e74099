"""A Rocket.Chat double for REST tests: a real local HTTP server answering as Rocket.Chat.

Not a test module. ``RocketChatDouble`` answers ``/api/info``, ``/api/v1/login`` and
``/api/v1/me`` with the shapes Rocket.Chat documents (``/api/info`` without credentials
gives only major.minor, as Rocket.Chat's ``getServerInfo`` does), with switches per test;
:func:`serve_rocketchat` runs it on 127.0.0.1 (the ``rocketchat`` fixture of conftest.py).
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

USERNAME = "presence-bot"
PASSWORD = "Pa55-word-that-must-never-show"
USER_ID = "aobEdbYhXfu5hkeqG"

# (status, content type, body, extra headers)
Raw = tuple[int, str, bytes, dict[str, str]]


@dataclass
class RocketChatDouble:
    """What the fake Rocket.Chat answers, and what it was asked."""

    version: str = "7.5.1"
    password: str = PASSWORD
    roles: list[str] = field(default_factory=lambda: ["user", "admin"])
    expire_first_token: bool = False
    """The first token issued is refused by /api/v1/me (401), as an expired one is."""
    raw: dict[str, Raw] = field(default_factory=dict)
    """Answers by path that replace the documented ones (garbage, errors, redirects)."""
    hang: set[str] = field(default_factory=set)
    """Paths that never answer (until the server is closed)."""
    logins: int = 0
    me_calls: int = 0
    paths: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    valid: set[str] = field(default_factory=set)
    release: threading.Event = field(default_factory=threading.Event)
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> Raw:
        with self.lock:
            self.paths.append(f"{method} {path}")
        if path in self.hang:
            self.release.wait(30)
        if path in self.raw:
            return self.raw[path]
        path = path.removeprefix("/chat")  # Rocket.Chat may be served under a path
        if method == "GET" and path == "/api/info":
            # Without view-statistics Rocket.Chat removes the patch: "7.5.1" -> "7.5".
            short = ".".join(self.version.split(".")[:2])
            return _json(200, {"version": short, "minimumClientVersions": {}, "success": True})
        if method == "POST" and path == "/api/v1/login":
            return self._login(body)
        if method == "GET" and path == "/api/v1/me":
            return self._me(headers)
        return _json(404, {"success": False, "error": "Not found"})

    def _login(self, body: bytes) -> Raw:
        with self.lock:
            self.logins += 1
            sent = json.loads(body)
            if sent.get("user") != USERNAME or sent.get("password") != self.password:
                return _json(401, {"status": "error", "error": "Unauthorized",
                                   "message": "Unauthorized"})
            token = secrets.token_urlsafe(32)
            self.tokens.append(token)
            if not (self.expire_first_token and len(self.tokens) == 1):
                self.valid.add(token)
            me = {"_id": USER_ID, "username": USERNAME, "roles": self.roles}
            return _json(200, {"status": "success",
                               "data": {"authToken": token, "userId": USER_ID, "me": me}})

    def _me(self, headers: Any) -> Raw:
        with self.lock:
            self.me_calls += 1
            if headers.get("X-Auth-Token") not in self.valid or headers.get("X-User-Id") != USER_ID:
                return _json(401, {"status": "error",
                                   "message": "You must be logged in to do this."})
            return _json(200, {"_id": USER_ID, "username": USERNAME, "status": "online",
                               "statusConnection": "online", "active": True,
                               "roles": self.roles, "success": True})


def _json(status: int, body: Any) -> Raw:
    return status, "application/json", json.dumps(body).encode(), {}


def _handler(double: RocketChatDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, content_type, payload, extra = double.answer(
                method, self.path, self.headers, body
            )
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def serve_rocketchat() -> Iterator[RocketChatDouble]:
    double = RocketChatDouble()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(double))
    server.daemon_threads = True
    double.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield double
    double.release.set()
    server.shutdown()
    server.server_close()
    thread.join(10)
