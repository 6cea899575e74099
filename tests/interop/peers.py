"""Real peers for the interop tests: a nats-server, and Node.js Moleculer 0.14 nodes configured
like Rocket.Chat 7.x's broker (``tests/interop/node/peer.js``), each driven over its JSON-lines
control protocol from synchronous helpers (subprocesses and reader threads).

Owns: finding and starting ``nats-server`` on a free loopback port (restartable on the same
port), spawning ``node peer.js`` and talking to it, and skipping with a clear reason when a
peer cannot run here (``make install`` brings nats-server with apt-get and the Node modules
with ``npm ci``).

Payloads stay raw: with the EJSON serializer the peer prints EJSON (a Date is
``{"$date": ms}``) and reads EJSON, so tests write and compare exactly what crosses the wire.

Must never: be imported by the daemon; wait without a bound.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

import pytest

from presenced.testing.processes import STOP_TIMEOUT, free_port, speaks_nats, stop

__all__ = ["NODE_DIR", "PEER_JS", "NatsServer", "NodePeer", "PeerError", "PeerFailed",
           "nats_server", "node_peers_available"]

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
NODE_DIR: Final = REPO_ROOT / "tests" / "interop" / "node"
PEER_JS: Final = NODE_DIR / "peer.js"

NATS_START_TIMEOUT: Final = 10.0
"""Seconds for nats-server to accept connections."""
READY_TIMEOUT: Final = 30.0
"""Seconds for a Node peer to connect and report ready (Moleculer waits 500 ms after DISCOVER)."""
REPLY_MARGIN: Final = 10.0
"""Seconds a command's reply may take beyond the Moleculer timeout it carries."""

_NATS_CANDIDATES: Final = ("/usr/sbin/nats-server", "/usr/bin/nats-server",
                           "/usr/local/bin/nats-server")


class PeerFailed(Exception):
    """A peer process did not start, died, or did not answer in time."""


class PeerError(Exception):
    """A command the Node peer ran failed in Moleculer; ``error`` is Moleculer's error as the
    peer printed it (name, message, code, type, data, retryable, nodeID, and a Meteor.Error's
    errorType, error, reason, details, isClientSafe when it was one)."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('name')}: {error.get('message')}")
        self.error = error

    @property
    def name(self) -> str | None:
        value = self.error.get("name")
        return value if isinstance(value, str) else None

    @property
    def type(self) -> str | None:
        value = self.error.get("type")
        return value if isinstance(value, str) else None


def _find_nats_server() -> str | None:
    found = shutil.which("nats-server")
    if found:
        return found
    for candidate in _NATS_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class NatsServer:
    """A nats-server on 127.0.0.1; ``stop()`` and ``start()`` restart it on the same port."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port if port is not None else free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="nats-server-", suffix=".log")  # noqa: SIM115

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        with open(self._log.name, encoding="utf-8", errors="replace") as f:
            return "".join(collections.deque(f, maxlen=lines))

    def start(self) -> None:
        """Starts the server (no-op when running) and waits until it accepts connections."""
        if self.running:
            return
        self._proc = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + NATS_START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if speaks_nats(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise PeerFailed(f"nats-server did not accept connections on port {self.port} within "
                         f"{NATS_START_TIMEOUT:.0f}s; its log:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL after a bound); clients see it go away."""
        if self._proc is not None:
            stop(self._proc)
            self._proc = None

    def kill(self) -> None:
        """Kills the server with SIGKILL."""
        if self._proc is not None:
            stop(self._proc, signal.SIGKILL)
            self._proc = None

    def close(self) -> None:
        self.stop()
        self._log.close()


@contextmanager
def nats_server() -> Iterator[NatsServer]:
    """A running nats-server on a free loopback port; skips the test when none is installed."""
    binary = _find_nats_server()
    if binary is None:
        pytest.skip("nats-server not installed: `make test` installs it with apt-get "
                    "(apt-get install -y nats-server) when apt-get is available")
    server = NatsServer(binary)
    try:
        server.start()
        yield server
    finally:
        server.close()


def node_peers_available() -> str | None:
    """Why the Node peers cannot run here, or None when they can."""
    if shutil.which("node") is None:
        return "node not installed: the interop tests need Node.js 20 and npm"
    if not (NODE_DIR / "node_modules" / "moleculer").is_dir():
        return (f"{NODE_DIR.relative_to(REPO_ROOT)}/node_modules is missing: `make install` "
                "runs `npm ci` there (needs npm and the npm registry)")
    return None


def _num(seconds: float) -> str:
    return f"{seconds:g}"


class NodePeer:
    """A Node.js Moleculer node (``peer.js``) on ``url``, driven over its control protocol.

    Start it with ``with NodePeer(...) as peer:`` or ``start()``. Every wait is bounded."""

    def __init__(
        self,
        url: str,
        node_id: str,
        *,
        namespace: str = "",
        serializer: str = "EJSON",
        heartbeat_interval: float = 1,
        heartbeat_timeout: float = 3,
        request_timeout: float = 10,
        log_level: str = "warn",
        listen: Sequence[str] = (),
        offer: Sequence[str] = (),
        ready_timeout: float = READY_TIMEOUT,
        env: dict[str, str] | None = None,
    ) -> None:
        self.url = url
        self.node_id = node_id
        self.serializer = serializer
        self.request_timeout = request_timeout
        self.ready_timeout = ready_timeout
        self.args = [
            "--url", url, "--node-id", node_id, "--namespace", namespace,
            "--serializer", serializer,
            "--heartbeat-interval", _num(heartbeat_interval),
            "--heartbeat-timeout", _num(heartbeat_timeout),
            "--request-timeout", _num(request_timeout),
            "--log-level", log_level,
        ]
        for event in listen:
            self.args += ["--listen", event]
        for service in offer:
            self.args += ["--offer", service]
        self.env = env
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Condition()
        self._results: dict[int, dict[str, Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._other: list[dict[str, Any]] = []
        self._ready: dict[str, Any] | None = None
        self._eof = False
        self._stderr: collections.deque[str] = collections.deque(maxlen=200)
        self._ids = itertools.count(1)
        self._write_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> NodePeer:
        """Spawns the peer and waits for its ``ready`` line; skips when Node peers can't run."""
        reason = node_peers_available()
        if reason is not None:
            pytest.skip(reason)
        env = {**os.environ, **(self.env or {})}
        self._proc = subprocess.Popen(
            ["node", str(PEER_JS), *self.args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", bufsize=1, cwd=NODE_DIR, env=env,
        )
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read_stdout, args=(self._proc.stdout,), daemon=True,
                             name=f"peer-{self.node_id}-stdout"),
            threading.Thread(target=self._read_stderr, args=(self._proc.stderr,), daemon=True,
                             name=f"peer-{self.node_id}-stderr"),
        ]
        for t in self._threads:
            t.start()
        with self._lock:
            ok = self._lock.wait_for(lambda: self._ready is not None or self._eof,
                                     self.ready_timeout)
        if not ok or self._ready is None:
            why = "exited" if self._eof else f"did not report ready in {self.ready_timeout:g}s"
            self.kill()
            raise PeerFailed(f"Node peer {self.node_id} {why}; stderr:\n{self.stderr_text()}")
        return self

    def __enter__(self) -> NodePeer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Asks the broker to stop (it sends DISCONNECT), then waits for exit 0; kills it past
        ``timeout``. Returns the exit status."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with suppress(OSError, ValueError):
                self._send({"cmd": "stop", "id": next(self._ids)})
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._join()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL: the node vanishes without DISCONNECT (others notice by heartbeat timeout)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            proc.wait()
        self._join()

    def close(self) -> None:
        """Stops the peer if it is still running (gracefully, then by force)."""
        if self.alive:
            self.stop()
        else:
            self.kill()

    def _join(self) -> None:
        for t in self._threads:
            t.join(5)
        proc = self._proc
        if proc is not None:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with suppress(OSError, ValueError):
                        stream.close()

    # -- I/O --------------------------------------------------------------------------------

    def _read_stdout(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                line = line.strip()
                if not line:
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    msg = {"type": "unparsable", "line": line}
                if not isinstance(msg, dict):
                    msg = {"type": "unparsable", "line": line}
                with self._lock:
                    kind = msg.get("type")
                    if kind == "result" and isinstance(msg.get("id"), int):
                        self._results[msg["id"]] = msg
                    elif kind == "event":
                        self._events.append(msg)
                    elif kind == "ready":
                        self._ready = msg
                    else:
                        self._other.append(msg)
                    self._lock.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._lock:
                self._eof = True
                self._lock.notify_all()

    def _read_stderr(self, stream: IO[str]) -> None:
        with suppress(OSError, ValueError):
            for line in stream:
                self._stderr.append(line)

    def stderr_text(self) -> str:
        """The last lines the peer wrote to stderr (Moleculer's log)."""
        return "".join(self._stderr)

    def _send(self, command: dict[str, Any]) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise PeerFailed(f"Node peer {self.node_id} is not started")
        line = json.dumps(command, separators=(",", ":")) + "\n"
        with self._write_lock:
            proc.stdin.write(line)
            proc.stdin.flush()

    def command(self, cmd: str, *, reply_timeout: float | None = None, **fields: Any) -> Any:
        """Sends ``{"cmd": cmd, "id": ..., **fields}`` and returns the result's ``data``;
        raises PeerError when the peer answers ok:false, PeerFailed when it dies or stays
        silent past ``reply_timeout`` (default: the request timeout plus a margin)."""
        if not self.alive:
            raise PeerFailed(f"Node peer {self.node_id} is not running; stderr:\n"
                             f"{self.stderr_text()}")
        wait = reply_timeout if reply_timeout is not None else self.request_timeout + REPLY_MARGIN
        request_id = next(self._ids)
        try:
            self._send({"cmd": cmd, "id": request_id, **fields})
        except (OSError, ValueError) as e:
            raise PeerFailed(f"Node peer {self.node_id} stopped reading commands: {e}") from e
        with self._lock:
            done = self._lock.wait_for(lambda: request_id in self._results or self._eof, wait)
            reply = self._results.pop(request_id, None)
        if reply is None:
            why = "exited" if done else f"gave no reply in {wait:g}s"
            raise PeerFailed(f"Node peer {self.node_id} {why} to {cmd}; stderr:\n"
                             f"{self.stderr_text()}")
        if not reply.get("ok"):
            error = reply.get("error")
            raise PeerError(error if isinstance(error, dict) else {"message": repr(error)})
        return reply.get("data")

    # -- commands ---------------------------------------------------------------------------

    def call(self, action: str, params: Any = None, *, reply_timeout: float | None = None,
             **opts: Any) -> Any:
        """``broker.call(action, params, opts)`` (opts are Moleculer's call options, e.g.
        ``nodeID``, ``timeout`` in ms, ``meta``). Returns the result (None for undefined)."""
        if reply_timeout is None and isinstance(opts.get("timeout"), int | float):
            reply_timeout = float(opts["timeout"]) / 1000 + REPLY_MARGIN
        return self.command("call", action=action, params=params, opts=opts,
                            reply_timeout=reply_timeout)

    def wait_for_services(self, services: Sequence[str], timeout: float = 10.0) -> None:
        """``broker.waitForServices(services, timeout)``; PeerError when they don't appear."""
        self.command("waitForServices", services=list(services), timeout=int(timeout * 1000),
                     reply_timeout=timeout + REPLY_MARGIN)

    def nodes(self) -> list[dict[str, Any]]:
        """The peer's registry: ``[{"id", "available", "local", "services": [{"name",
        "actions": [...], "events": [...]}]}]``, unavailable nodes included."""
        result = self.command("nodes")
        assert isinstance(result, list)
        return result

    def node(self, node_id: str) -> dict[str, Any] | None:
        """One node of ``nodes()``, or None when the peer does not know it."""
        return next((n for n in self.nodes() if n.get("id") == node_id), None)

    def broadcast(self, event: str, data: Any) -> None:
        """``broker.broadcast(event, data)``; in Rocket.Chat ``data`` is the args array."""
        self.command("broadcast", event=event, data=data)

    def events(self) -> list[dict[str, Any]]:
        """Events received so far: ``{"type": "event", "event", "data", "sender", "at_ms"}``."""
        with self._lock:
            return list(self._events)

    def clear_events(self) -> None:
        with self._lock:
            self._events.clear()

    def wait_event(self, predicate: Callable[[dict[str, Any]], bool] | None = None,
                   timeout: float = 10.0) -> dict[str, Any]:
        """The first received event (already received ones included) that ``predicate``
        accepts; PeerFailed after ``timeout`` seconds."""
        accept = predicate if predicate is not None else (lambda _e: True)

        def found() -> dict[str, Any] | None:
            return next((e for e in self._events if accept(e)), None)

        with self._lock:
            self._lock.wait_for(lambda: found() is not None or self._eof, timeout)
            event = found()
        if event is None:
            raise PeerFailed(f"Node peer {self.node_id} received no matching event in "
                             f"{timeout:g}s; got {self._events!r}; stderr:\n{self.stderr_text()}")
        return event

    def wait_until(self, check: Callable[[], bool], timeout: float,
                   interval: float = 0.2) -> float:
        """Polls ``check`` (e.g. on ``nodes()``) until true; returns the seconds it took."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            if check():
                return time.monotonic() - start
            if time.monotonic() >= deadline:
                raise PeerFailed(f"condition not met within {timeout:g}s on {self.node_id}")
            time.sleep(interval)
