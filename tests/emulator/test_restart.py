"""Emulator lifecycle: stop/start on the same port keeping data, snapshots, and the CLI.

These use controls only the emulator has (``MongoEmulator`` API, documented in
``presenced.testing.mongo``), so they are skipped against a real server. What they check is
what a driver sees across a real mongod restart: commands fail while it is down, the same
client recovers once it is back on the same address, and the data (with its indexes) is
still there.
"""

from __future__ import annotations

import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import AutoReconnect, DuplicateKeyError, ServerSelectionTimeoutError

pytestmark = pytest.mark.emulator_only

READY_LINE = re.compile(r"^ready (mongodb://127\.0\.0\.1:(\d+)/\?replicaSet=rs0)$")


def _emulator(**kwargs: Any) -> Any:
    from presenced.testing.mongo import MongoEmulator

    return MongoEmulator(**kwargs)


@pytest.fixture
def emu() -> Iterator[Any]:
    e = _emulator()
    e.start()
    yield e
    e.close()


def _client(url: str, **kwargs: Any) -> MongoClient[dict[str, Any]]:
    kwargs.setdefault("serverSelectionTimeoutMS", 500)
    kwargs.setdefault("connectTimeoutMS", 500)
    return MongoClient(url, **kwargs)


@pytest.fixture
def client_factory() -> Iterator[Callable[..., MongoClient[dict[str, Any]]]]:
    made: list[MongoClient[Any]] = []

    def make(url: str, **kwargs: Any) -> MongoClient[dict[str, Any]]:
        c = _client(url, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def eventually(fn: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Calls fn until it stops raising a connection error; re-raises after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (AutoReconnect, ServerSelectionTimeoutError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


# --------------------------------------------------------------------------- stop / start


def test_commands_fail_while_stopped(emu: Any, client_factory: Any) -> None:
    c = client_factory(emu.url)
    c.r.c.insert_one({"_id": 1})
    emu.stop()
    with pytest.raises((ServerSelectionTimeoutError, AutoReconnect)):
        c.r.c.find_one({"_id": 1})


def test_stop_closes_open_client_connections(emu: Any) -> None:
    sock = socket.create_connection(("127.0.0.1", emu.port), timeout=5.0)
    try:
        emu.stop()
        sock.settimeout(5.0)
        try:
            data = sock.recv(1)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        assert data == b""
    finally:
        sock.close()


def test_start_again_uses_the_same_port_and_url(emu: Any) -> None:
    port, url = emu.port, emu.url
    emu.stop()
    assert emu.start() == url
    assert emu.port == port
    assert emu.url == url


def test_data_survives_stop_and_start(emu: Any, client_factory: Any) -> None:
    # The writer is closed while the server is up: a client closed after its server went
    # away waits out serverSelectionTimeoutMS trying to end its sessions.
    with _client(emu.url) as writer:
        writer.r.c.insert_many([{"_id": i} for i in range(3)])
    emu.stop()
    emu.start()
    fresh = client_factory(emu.url, serverSelectionTimeoutMS=10_000)
    assert sorted(d["_id"] for d in fresh.r.c.find()) == [0, 1, 2]


def test_same_client_recovers_after_restart(emu: Any, client_factory: Any) -> None:
    c = client_factory(emu.url)
    c.r.c.insert_one({"_id": "before"})
    emu.stop()
    with pytest.raises((ServerSelectionTimeoutError, AutoReconnect)):
        c.r.c.find_one({"_id": "before"})
    emu.start()
    assert eventually(lambda: c.r.c.find_one({"_id": "before"})) == {"_id": "before"}
    c.r.c.insert_one({"_id": "after"})
    assert c.r.c.count_documents({}) == 2


def test_restart_keeps_data_and_client_recovers(emu: Any, client_factory: Any) -> None:
    c = client_factory(emu.url)
    c.r.c.insert_one({"_id": 1})
    emu.restart(down_seconds=0.2)
    assert eventually(lambda: c.r.c.find_one({"_id": 1})) == {"_id": 1}


def test_unique_index_survives_restart(emu: Any, client_factory: Any) -> None:
    c = client_factory(emu.url)
    c.r.u.create_index("connections.id", unique=True)
    c.r.u.insert_one({"_id": "u1", "connections": [{"id": "c1"}]})
    emu.stop()
    emu.start()
    assert "connections.id_1" in eventually(lambda: c.r.u.index_information())
    with pytest.raises(DuplicateKeyError):
        c.r.u.insert_one({"_id": "u2", "connections": [{"id": "c1"}]})


def test_operation_time_keeps_advancing_across_restart(emu: Any, client_factory: Any) -> None:
    c = client_factory(emu.url)
    before = c.r.command("insert", "t", documents=[{"x": 1}])["operationTime"]
    emu.stop()
    emu.start()
    after = eventually(lambda: c.r.command("insert", "t", documents=[{"x": 2}]))["operationTime"]
    assert after > before


# --------------------------------------------------------------------------- snapshot


def test_snapshot_is_loaded_by_a_new_emulator(tmp_path: Path) -> None:
    # Each client is closed before its emulator: closing a client ends its sessions, which
    # waits out serverSelectionTimeoutMS when the server is already gone.
    path = tmp_path / "db.snapshot"
    first = _emulator(snapshot_path=path)
    try:
        first.start()
        with _client(first.url, serverSelectionTimeoutMS=10_000) as c:
            c.snap.users.insert_many([{"_id": "a", "n": 1}, {"_id": "b", "n": 2}])
            c.snap.users.create_index("n", unique=True)
    finally:
        first.close()

    second = _emulator(snapshot_path=path)
    try:
        second.start()
        with _client(second.url, serverSelectionTimeoutMS=10_000) as c2:
            assert list(c2.snap.users.find({}, sort=[("_id", 1)])) == [
                {"_id": "a", "n": 1},
                {"_id": "b", "n": 2},
            ]
            assert "n_1" in c2.snap.users.index_information()
    finally:
        second.close()


# --------------------------------------------------------------------------- CLI


def _read_first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if ready:
            return proc.stdout.readline()
        if proc.poll() is not None:
            break
    return ""


def test_cli_prints_ready_line_first_and_serves(tmp_path: Path) -> None:
    stderr = (tmp_path / "stderr.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "presenced.testing.mongo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        line = _read_first_line(proc, timeout=30.0).rstrip("\n")
        match = READY_LINE.match(line)
        assert match, f"first stdout line was {line!r}; stderr: {_tail(tmp_path)}"
        url, port = match.group(1), int(match.group(2))
        assert port > 0
        c: MongoClient[Any] = MongoClient(url, serverSelectionTimeoutMS=10_000)
        try:
            c.cli.c.insert_one({"_id": 1})
            assert c.cli.c.find_one({"_id": 1}) == {"_id": 1}
            assert c.admin.command("hello")["setName"] == "rs0"
        finally:
            c.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        stderr.close()
    assert proc.returncode is not None


def _tail(tmp_path: Path) -> str:
    try:
        return (tmp_path / "stderr.log").read_text()[-2000:]
    except OSError:
        return ""
