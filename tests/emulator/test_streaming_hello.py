"""Exhaust streams: streaming hello and exhaust getMore (MongoDB 4.4+).

OP_MSG spec ("exhaustAllowed", "moreToCome On Responses") and SDAM's server-monitoring
spec ("Streaming protocol"): an awaitable hello (``topologyVersion`` + ``maxAwaitTimeMS``)
sent with the exhaustAllowed flag is answered by replies with moreToCome, one every
``maxAwaitTimeMS`` (at once on a topology change), each with the server's
``topologyVersion``, until the client closes the connection; the ``responseTo`` of each
follow-up reply is the ``requestID`` of the one before. A getMore sent with exhaustAllowed
streams its cursor's batches the same way, the last (cursor id 0) without moreToCome.
Without exhaustAllowed a request gets exactly one reply, never with moreToCome.

Drivers' streaming monitors depend on this: the Node.js driver fails a heartbeat with
"Server ended moreToCome unexpectedly" (and clears its pool) when the stream stops.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from bson import Int64, ObjectId
from pymongo import CursorType, MongoClient, monitoring
from pymongo.database import Database

from tests.emulator import raw_wire
from tests.emulator.raw_wire import EXHAUST_ALLOWED

AWAIT_MS = 100


@pytest.fixture
def connect(client: MongoClient[Any]) -> Iterator[Callable[[], socket.socket]]:
    """Opens raw connections to the server (the primary); closes them afterwards."""
    client.admin.command("ping")
    host, port = client.address or ("127.0.0.1", 27017)
    socks: list[socket.socket] = []

    def make() -> socket.socket:
        s = socket.create_connection((host, port), timeout=10.0)
        socks.append(s)
        return s

    yield make
    for s in socks:
        s.close()


def _handshake(sock: socket.socket) -> dict[str, Any]:
    reply = raw_wire.command(sock, {"hello": 1, "$db": "admin"})
    assert reply["ok"] == 1.0
    return reply


def _awaitable(tv: Any, wait_ms: int = AWAIT_MS) -> dict[str, Any]:
    return {"hello": 1, "topologyVersion": tv, "maxAwaitTimeMS": wait_ms, "$db": "admin"}


def _status(client: MongoClient[Any]) -> dict[str, Any]:
    connections: dict[str, Any] = client.admin.command("serverStatus")["connections"]
    return connections


def _until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Polls ``check`` until true or the timeout (a server-side state change with no
    event a client could wait on)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


# --------------------------------------------------------------------------- hello


def test_exhaust_hello_gets_replies_with_more_to_come(connect: Any) -> None:
    sock = connect()
    tv = _handshake(sock)["topologyVersion"]
    raw_wire.send(sock, _awaitable(tv), flags=EXHAUST_ALLOWED)
    replies = [raw_wire.receive(sock) for _ in range(3)]
    assert all(r.more_to_come for r in replies)
    assert all(r.body["ok"] == 1.0 for r in replies)
    assert all(r.body["topologyVersion"] == tv for r in replies)


def test_exhaust_hello_replies_each_answer_the_one_before(connect: Any) -> None:
    """responseTo of a follow-up reply = requestID of the previous reply."""
    sock = connect()
    tv = _handshake(sock)["topologyVersion"]
    sent = raw_wire.send(sock, _awaitable(tv), flags=EXHAUST_ALLOWED)
    replies = [raw_wire.receive(sock) for _ in range(3)]
    assert replies[0].response_to == sent
    assert replies[1].response_to == replies[0].request_id
    assert replies[2].response_to == replies[1].request_id
    assert len({r.request_id for r in replies}) == 3


def test_exhaust_hello_replies_come_every_max_await_time(connect: Any) -> None:
    sock = connect()
    tv = _handshake(sock)["topologyVersion"]
    raw_wire.send(sock, _awaitable(tv, 300), flags=EXHAUST_ALLOWED)
    raw_wire.receive(sock)
    start = time.monotonic()
    raw_wire.receive(sock)
    raw_wire.receive(sock)
    assert time.monotonic() - start >= 0.5


def test_awaitable_hello_without_exhaust_allowed_gets_one_reply(connect: Any) -> None:
    sock = connect()
    tv = _handshake(sock)["topologyVersion"]
    reply = raw_wire.command(sock, _awaitable(tv))  # checks: no moreToCome
    assert reply["ok"] == 1.0
    assert raw_wire.command(sock, {"ping": 1, "$db": "admin"})["ok"] == 1.0


def test_exhaust_hello_that_is_not_awaitable_fails(connect: Any) -> None:
    """A hello sent with exhaustAllowed must be awaitable (mongod: 51756)."""
    sock = connect()
    _handshake(sock)
    sent = raw_wire.send(sock, {"hello": 1, "$db": "admin"}, flags=EXHAUST_ALLOWED)
    reply = raw_wire.receive(sock)
    assert reply.response_to == sent
    assert not reply.more_to_come
    assert reply.body["code"] == 51756
    assert raw_wire.command(sock, {"ping": 1, "$db": "admin"})["ok"] == 1.0


def test_exhaust_hello_from_another_process_is_answered_at_once(connect: Any) -> None:
    """A topologyVersion of another processId (the server restarted) is stale: reply now,
    with the server's own, which the stream then waits on."""
    sock = connect()
    tv = _handshake(sock)["topologyVersion"]
    start = time.monotonic()
    stale = {"processId": ObjectId(), "counter": Int64(0)}
    raw_wire.send(sock, _awaitable(stale, 10_000), flags=EXHAUST_ALLOWED)
    first = raw_wire.receive(sock)
    assert time.monotonic() - start < 5.0
    assert first.more_to_come
    assert first.body["topologyVersion"] == tv


def test_awaitable_hello_with_a_counter_ahead_of_the_server_fails(connect: Any) -> None:
    sock = connect()
    tv = _handshake(sock)["topologyVersion"]
    ahead = {"processId": tv["processId"], "counter": Int64(tv["counter"] + 1)}
    raw_wire.send(sock, _awaitable(ahead), flags=EXHAUST_ALLOWED)
    reply = raw_wire.receive(sock)
    assert reply.body["ok"] == 0.0
    assert reply.body["code"] in (31382, 51761, 51764)
    assert not reply.more_to_come  # an ok: 0 reply ends the stream


@pytest.mark.parametrize("field", ["topologyVersion", "maxAwaitTimeMS"])
def test_awaitable_hello_needs_both_fields(connect: Any, field: str) -> None:
    sock = connect()
    cmd = _awaitable(_handshake(sock)["topologyVersion"])
    del cmd[field]
    reply = raw_wire.command(sock, cmd)
    assert reply["ok"] == 0.0
    assert reply["code"] in (31368, 51760)


def test_awaitable_hello_refuses_a_negative_max_await_time(connect: Any) -> None:
    sock = connect()
    reply = raw_wire.command(sock, _awaitable(_handshake(sock)["topologyVersion"], -1))
    assert reply["ok"] == 0.0
    assert reply["code"] in (31373, 51759)


@pytest.fixture
def lone() -> Iterator[tuple[Any, MongoClient[dict[str, Any]]]]:
    """An emulator of its own, watched by a polling client (which streams nothing), so
    the exhaust connections it counts are only the test's."""
    from presenced.testing.mongo import MongoEmulator

    emu = MongoEmulator()
    emu.start()
    watcher: MongoClient[dict[str, Any]] = MongoClient(
        emu.url, serverMonitoringMode="poll", serverSelectionTimeoutMS=10_000
    )
    yield emu, watcher
    watcher.close()
    emu.close()


@pytest.mark.emulator_only
def test_server_counts_exhaust_hello_connections_and_waiters(lone: Any) -> None:
    """serverStatus connections.exhaustHello / awaitingTopologyChanges (MongoDB 4.4+)."""
    emu, watcher = lone
    assert _status(watcher)["exhaustHello"] == 0
    with socket.create_connection(("127.0.0.1", emu.port), timeout=10.0) as sock:
        tv = _handshake(sock)["topologyVersion"]
        raw_wire.send(sock, _awaitable(tv, 60_000), flags=EXHAUST_ALLOWED)
        assert _until(lambda: _status(watcher)["exhaustHello"] == 1)
        assert _status(watcher)["awaitingTopologyChanges"] == 1


@pytest.mark.emulator_only
def test_server_lets_go_of_an_exhaust_stream_its_client_left(lone: Any) -> None:
    """Closing the connection ends the stream: the waiting hello is abandoned at once,
    not after maxAwaitTimeMS (a minute here)."""
    emu, watcher = lone
    with socket.create_connection(("127.0.0.1", emu.port), timeout=10.0) as sock:
        tv = _handshake(sock)["topologyVersion"]
        raw_wire.send(sock, _awaitable(tv, 60_000), flags=EXHAUST_ALLOWED)
        assert _until(lambda: _status(watcher)["awaitingTopologyChanges"] == 1)
    assert _until(lambda: _status(watcher)["exhaustHello"] == 0, timeout=5.0)
    assert _status(watcher)["awaitingTopologyChanges"] == 0


# --------------------------------------------------------------------------- getMore


def test_exhaust_get_more_streams_batches_until_the_cursor_ends(
    db: Database[Any], connect: Any
) -> None:
    db.items.insert_many([{"_id": i} for i in range(10)])
    sock = connect()
    _handshake(sock)
    found = raw_wire.command(sock, {"find": "items", "batchSize": 2, "$db": db.name})
    cursor_id = found["cursor"]["id"]
    assert cursor_id
    get_more = {"getMore": cursor_id, "collection": "items", "batchSize": 3, "$db": db.name}
    replies = list(raw_wire.stream(sock, get_more))
    assert [len(r.body["cursor"]["nextBatch"]) for r in replies] == [3, 3, 2]
    assert [r.more_to_come for r in replies] == [True, True, False]
    assert [r.body["cursor"]["id"] for r in replies][-1] == 0
    for before, after in itertools.pairwise(replies):
        assert after.response_to == before.request_id
    ids = [d["_id"] for r in replies for d in r.body["cursor"]["nextBatch"]]
    assert ids == list(range(2, 10))


def test_get_more_without_exhaust_allowed_gets_one_batch(
    db: Database[Any], connect: Any
) -> None:
    db.items.insert_many([{"_id": i} for i in range(10)])
    sock = connect()
    found = raw_wire.command(sock, {"find": "items", "batchSize": 2, "$db": db.name})
    get_more = {"getMore": found["cursor"]["id"], "collection": "items", "batchSize": 3,
                "$db": db.name}
    reply = raw_wire.command(sock, get_more)
    assert len(reply["cursor"]["nextBatch"]) == 3


def test_pymongo_exhaust_cursor_reads_everything(db: Database[Any]) -> None:
    db.items.insert_many([{"_id": i} for i in range(25)])
    docs = list(db.items.find(cursor_type=CursorType.EXHAUST, batch_size=4).sort("_id", 1))
    assert [d["_id"] for d in docs] == list(range(25))


# --------------------------------------------------------------------------- drivers


class _Heartbeats(monitoring.ServerHeartbeatListener):
    def __init__(self, wanted: int) -> None:
        self.awaited_ok = 0
        self.failures: list[str] = []
        self.enough = threading.Event()
        self._wanted = wanted

    def started(self, event: monitoring.ServerHeartbeatStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.ServerHeartbeatSucceededEvent) -> None:
        if event.awaited:
            self.awaited_ok += 1
            if self.awaited_ok >= self._wanted:
                self.enough.set()

    def failed(self, event: monitoring.ServerHeartbeatFailedEvent) -> None:
        self.failures.append(repr(event.reply))


class _PoolClears(monitoring.ConnectionPoolListener):
    def __init__(self) -> None:
        self.cleared = 0

    def pool_cleared(self, event: monitoring.PoolClearedEvent) -> None:
        self.cleared += 1

    def __getattr__(self, name: str) -> Any:  # every other pool event: ignored
        return lambda event: None


def test_pymongo_streaming_monitor_keeps_the_server_known(mongo_url: str) -> None:
    """pymongo's monitor in stream mode: every awaited heartbeat succeeds, none fails,
    the pool is never cleared, while writes go on."""
    heartbeats = _Heartbeats(wanted=6)
    pools = _PoolClears()
    c: MongoClient[dict[str, Any]] = MongoClient(
        mongo_url, serverMonitoringMode="stream", heartbeatFrequencyMS=500,
        event_listeners=[heartbeats, pools],
    )
    try:
        coll = c.get_database("streaming_monitor").w
        while not heartbeats.enough.wait(0.05):
            coll.insert_one({})
            assert not heartbeats.failures
        assert heartbeats.failures == []
        assert pools.cleared == 0
        assert _status(c)["exhaustHello"] >= 1
    finally:
        c.drop_database("streaming_monitor")
        c.close()
