"""Helpers for the end-to-end suite of ``presenced run`` (``test_daemon.py``).

Not a test module (no ``test_`` prefix): it holds

- :class:`DaemonProcess`, the daemon as a subprocess with a clean environment, its output
  captured to files and printed when it is stopped (pytest shows captured output only for
  failing tests), its /health and /ready endpoints, and its signals;
- :class:`RocketChat`, Rocket.Chat's side of the database: users created as Rocket.Chat
  creates them, and every presence write made through
  :class:`presenced.testing.simulator.RocketChatSimulator`, which writes the spec's update
  shapes verbatim;
- :class:`Repeat`, a background thread that repeats a Rocket.Chat write (a client's
  connection heartbeat, an instance's ping) while a test waits;
- :func:`wait_for`, which polls a predicate every 50 ms until a deadline. Tests wait on
  what the database shows, never on blind sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from pymongo.database import Database

from presenced.testing.processes import free_port
from presenced.testing.simulator import RocketChatSimulator, SimulatedUser, utc_now_ms

T = TypeVar("T")
Db = Database[dict[str, Any]]

POLL_SECONDS = 0.05
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0

# What every test runs with unless it says otherwise. CACHE_TTL and INSTANCE_TIMEOUT are
# long so that only the tests about expiry and dead instances see either rule at work;
# SYNC_INTERVAL is short so housekeeping (instance liveness, the reaper) runs often.
DEFAULT_SETTINGS: Mapping[str, str] = {
    "CACHE_TTL": "60",
    "INSTANCE_TIMEOUT": "3600",
    "SYNC_INTERVAL": "200",
    "LOG_LEVEL": "debug",
}


class WaitTimeout(AssertionError):
    """A condition did not hold before its deadline."""


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    what: str = "condition",
    *,
    daemon: DaemonProcess | None = None,
) -> T:
    """Poll ``predicate`` every 50 ms until it returns something truthy; return that.

    Raises :class:`WaitTimeout` naming ``what`` and the last value seen when ``timeout``
    seconds pass, or at once when ``daemon`` is given and its process has exited.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = predicate()
        if last:
            return last
        if daemon is not None and daemon.exited():
            raise WaitTimeout(
                f"the daemon exited (code {daemon.returncode}) while waiting for {what};"
                f" last value {last!r}"
            )
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"{what}: not true after {timeout} s; last value {last!r}")
        time.sleep(POLL_SECONDS)


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, Any] | None:
    """GET http://127.0.0.1:port/path: (status, parsed JSON body), or None when nothing
    answers (refused, reset, timed out)."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, _json(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _json(exc.read())
    except (urllib.error.URLError, OSError):
        return None


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


class DaemonProcess:
    """``presenced run`` as a subprocess.

    :meth:`start` starts it and (unless told not to) waits until /ready says 200.
    ``with DaemonProcess(...) as d:`` (or :meth:`close`) makes sure it is stopped at the end
    (SIGTERM, then SIGKILL after 5 s) and prints every run's stdout and stderr.
    :meth:`start` may be called again after :meth:`stop` (a restart); each run writes its
    own ``run-N.stdout``/``run-N.stderr`` in ``tmp_path``.
    """

    def __init__(self, tmp_path: Path, mongo_url: str, **settings: str) -> None:
        self.tmp_path = tmp_path
        self.mongo_url = mongo_url
        self.settings = {**DEFAULT_SETTINGS, **settings}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.runs: list[tuple[Path, Path]] = []
        self._printed = 0

    # -- life cycle -----------------------------------------------------------------------
    def start(self, *, wait_ready: bool = True, **overrides: str) -> DaemonProcess:
        """Start a run with the settings plus ``overrides``; wait for /ready unless told."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.port = free_port()
        api_port = free_port()
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(self.tmp_path),
            "PYTHONUNBUFFERED": "1",
            "MONGO_URL": self.mongo_url,
            "HEALTH_CHECK_PORT": str(self.port),
            "PORT": str(api_port),
            **self.settings,
            **overrides,
        }
        n = len(self.runs) + 1
        out, err = self.tmp_path / f"run-{n}.stdout", self.tmp_path / f"run-{n}.stderr"
        self.runs.append((out, err))
        with out.open("wb") as stdout, err.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "presenced", "run"],
                env=env, cwd=self.tmp_path, stdout=stdout, stderr=stderr,
                stdin=subprocess.DEVNULL,
            )
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """Wait until /ready answers 200; return its body."""
        def ready() -> Any:
            answer = self.ready()
            return answer[1] if answer is not None and answer[0] == 200 else None

        body: dict[str, Any] = wait_for(ready, timeout, "GET /ready -> 200", daemon=self)
        return body

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` and return the exit code. Fails the test (after a SIGKILL) if the
        daemon is still running 5 s later."""
        proc = self.proc
        assert proc is not None, "never started"
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(
                    f"the daemon did not exit within {STOP_TIMEOUT} s of {signal.Signals(sig).name}"
                ) from None
        return proc.returncode

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the daemon if it runs (no assertion on how), then print its output."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.print_output()

    def print_output(self) -> None:
        """Print the runs not printed yet (pytest shows it when the test fails)."""
        for n, (out, err) in enumerate(self.runs[self._printed:], start=self._printed + 1):
            for path in (out, err):
                text = path.read_text("utf-8", "replace") if path.exists() else ""
                print(f"----- daemon run {n} {path.suffix[1:]} ({path}) -----")
                print(text, end="" if text.endswith("\n") or not text else "\n")
        self._printed = len(self.runs)

    # -- observation ----------------------------------------------------------------------
    def output(self, run: int = -1) -> str:
        """stdout + stderr of one run (the last by default)."""
        out, err = self.runs[run]
        return "".join(p.read_text("utf-8", "replace") for p in (out, err) if p.exists())

    def ready(self) -> tuple[int, Any] | None:
        return http_get(self.port, "/ready")

    def health(self) -> tuple[int, Any] | None:
        return http_get(self.port, "/health")


class RocketChat:
    """Rocket.Chat's writes to one database: users and presence traffic.

    The presence writes go through :class:`RocketChatSimulator` (the spec's update shapes,
    verbatim) on the real clock; the simulator creates its instances' documents and
    Rocket.Chat's indexes. Users are created here so each test picks ``statusDefault``.
    """

    def __init__(self, db: Db, *, instances: int = 2, seed: int = 0) -> None:
        self.db = db
        self.sim = RocketChatSimulator(db, users=0, instances=instances, seed=seed)
        self.sim.setup()
        self._users = 0

    @property
    def instance_ids(self) -> tuple[str, ...]:
        return tuple(i.id for i in self.sim.instances)

    def add_user(
        self, status_default: str | None = None, *, status: str = "offline",
        active: bool = True,
    ) -> str:
        """Insert a user document shaped as Rocket.Chat's; returns its id.

        ``status`` presets ``status``/``statusConnection`` (a value left by an earlier
        presence service, e.g. a user stuck online)."""
        self._users += 1
        user = SimulatedUser(
            id=uuid.uuid4().hex[:17], username=f"user{self._users}",
            status_default=status_default,  # type: ignore[arg-type]
            status_text=None,
        )
        doc = user.to_document(utc_now_ms())
        doc.update(status=status, statusConnection=status, active=active)
        self.db.users.insert_one(doc)
        return user.id

    # Rocket.Chat's presence writes (one database write each; see the simulator).
    def connect(self, user_id: str, instance_id: str | None = None) -> str:
        return self.sim.connect(user_id, instance_id)

    def disconnect(self, connection_id: str) -> int:
        return self.sim.disconnect(connection_id)

    def set_status(self, user_id: str, connection_id: str, status: str) -> bool:
        return self.sim.set_status(user_id, connection_id, status)

    def heartbeat(self, user_id: str, connection_id: str) -> bool:
        return self.sim.heartbeat(user_id, connection_id)

    def repeat_login(self, user_id: str, connection_id: str) -> None:
        self.sim.repeat_login(user_id, connection_id)

    def instance_heartbeat(self, instance_id: str) -> bool:
        return self.sim.instance_heartbeat(instance_id)

    def remove_instance_document(self, instance_id: str) -> None:
        """What the TTL index does to a crashed instance: its document disappears, its
        connections stay in ``usersSessions``."""
        self.db.instances.delete_one({"_id": instance_id})

    # What the database holds.
    def presence(self, user_id: str) -> tuple[Any, Any]:
        """(status, statusConnection) as stored."""
        doc = self.db.users.find_one({"_id": user_id}, {"status": 1, "statusConnection": 1})
        assert doc is not None, f"no user {user_id}"
        return doc.get("status"), doc.get("statusConnection")

    def connections(self, user_id: str) -> list[dict[str, Any]]:
        doc = self.db.usersSessions.find_one({"_id": user_id})
        return list((doc or {}).get("connections") or [])

    def connection_ids(self, user_id: str) -> list[str]:
        return [c["id"] for c in self.connections(user_id)]

    def updated_at(self, collection: str, query: Mapping[str, Any], path: str) -> datetime:
        """A stored date (naive UTC from pymongo) as an aware datetime."""
        doc = self.db[collection].find_one(dict(query))
        assert doc is not None, f"nothing in {collection} matches {query}"
        value: Any = doc
        for part in path.split("."):
            value = value[part]
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value

    def connection_updated_at(self, user_id: str, connection_id: str) -> datetime:
        for c in self.connections(user_id):
            if c["id"] == connection_id:
                value: datetime = c["_updatedAt"]
                return value.replace(tzinfo=UTC) if value.tzinfo is None else value
        raise AssertionError(f"user {user_id} has no connection {connection_id}")

    def wait_presence(
        self, user_id: str, expected: tuple[str, str], timeout: float = 10.0,
        daemon: DaemonProcess | None = None,
    ) -> None:
        wait_for(
            lambda: self.presence(user_id) == expected, timeout,
            f"user {user_id} (status, statusConnection) == {expected}", daemon=daemon,
        )


class Repeat:
    """Calls ``action`` every ``interval`` seconds on a thread until the block ends.

    ``last`` is the wall-clock time (``time.time()``) the latest call returned. An
    exception in ``action`` stops the thread and is raised again on leaving the block.
    """

    def __init__(self, action: Callable[[], object], interval: float) -> None:
        self.action = action
        self.interval = interval
        self.last: float | None = None
        self.calls = 0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.action()
                self.calls += 1
                self.last = time.time()
                self._stop.wait(self.interval)
        except BaseException as exc:  # reported on stop()
            self._error = exc

    def __enter__(self) -> Repeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._error is not None:
            raise self._error

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
