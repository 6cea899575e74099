"""A stepdown: the topology change a one-member replica set can have.

``replSetStepDown: secs, force: true`` (MongoDB 4.2+: connections stay open) makes the
primary a secondary for ``secs``; being the only electable member, it then steps up again.
Meanwhile hello says ``isWritablePrimary: false, secondary: true`` and names no primary;
writes fail with 10107 NotWritablePrimary and reads with a primary read preference with
13435 NotPrimaryNoSecondaryOk, both carrying the new topologyVersion (so drivers act on
them); transactions in progress are aborted. Each change bumps ``topologyVersion.counter``
and answers awaiting hellos at once (SDAM streaming protocol). Without ``force`` and with
no electable secondary the command fails with 262 ExceededTimeLimit.

Each test has an emulator of its own (``MongoEmulator.step_down`` / ``step_up`` are its
controls), so a stepdown disturbs nothing else.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from bson import Int64
from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from presenced.testing.mongo import MongoEmulator
from tests.emulator import raw_wire
from tests.emulator.raw_wire import EXHAUST_ALLOWED

pytestmark = pytest.mark.emulator_only


@pytest.fixture
def emu() -> Iterator[MongoEmulator]:
    e = MongoEmulator()
    e.start()
    yield e
    e.close()


@pytest.fixture
def sock(emu: MongoEmulator) -> Iterator[socket.socket]:
    s = socket.create_connection(("127.0.0.1", emu.port), timeout=10.0)
    yield s
    s.close()


@pytest.fixture
def client(emu: MongoEmulator) -> Iterator[MongoClient[dict[str, Any]]]:
    c: MongoClient[dict[str, Any]] = MongoClient(
        emu.url, serverSelectionTimeoutMS=10_000, heartbeatFrequencyMS=500
    )
    c.admin.command("ping")
    yield c
    c.close()


def _hello(sock: socket.socket) -> dict[str, Any]:
    return raw_wire.command(sock, {"hello": 1, "$db": "admin"})


def _stream_hellos(sock: socket.socket, tv: Any) -> None:
    raw_wire.send(
        sock, {"hello": 1, "topologyVersion": tv, "maxAwaitTimeMS": 60_000, "$db": "admin"},
        flags=EXHAUST_ALLOWED,
    )


def _counter(reply: dict[str, Any]) -> int:
    return int(reply["topologyVersion"]["counter"])


# --------------------------------------------------------------------------- hello


def test_stepdown_answers_a_streaming_hello_at_once(
    emu: MongoEmulator, sock: socket.socket
) -> None:
    tv = _hello(sock)["topologyVersion"]
    _stream_hellos(sock, tv)
    start = time.monotonic()
    emu.step_down(60)
    reply = raw_wire.receive(sock)
    assert time.monotonic() - start < 5.0  # not maxAwaitTimeMS (a minute)
    assert reply.more_to_come
    assert reply.body["topologyVersion"]["processId"] == tv["processId"]
    assert _counter(reply.body) == tv["counter"] + 1
    assert reply.body["isWritablePrimary"] is False
    assert reply.body["secondary"] is True
    assert "primary" not in reply.body
    assert "electionId" not in reply.body


def test_member_steps_up_again_after_the_stepdown_period(
    emu: MongoEmulator, sock: socket.socket
) -> None:
    tv = _hello(sock)["topologyVersion"]
    _stream_hellos(sock, tv)
    emu.step_down(0.3)
    down = raw_wire.receive(sock).body
    up = raw_wire.receive(sock).body  # the next change: the election after 0.3 s
    assert down["secondary"] is True
    assert up["isWritablePrimary"] is True
    assert up["primary"] == up["me"]
    assert _counter(up) == tv["counter"] + 2


def test_step_up_ends_a_stepdown_early(emu: MongoEmulator, sock: socket.socket) -> None:
    emu.step_down(60)
    assert _hello(sock)["secondary"] is True
    emu.step_up()
    assert _hello(sock)["isWritablePrimary"] is True


def test_server_status_and_repl_set_get_status_show_a_secondary(
    emu: MongoEmulator, sock: socket.socket
) -> None:
    emu.step_down(60)
    repl = raw_wire.command(sock, {"serverStatus": 1, "$db": "admin"})["repl"]
    assert repl["isWritablePrimary"] is False
    assert repl["secondary"] is True
    status = raw_wire.command(sock, {"replSetGetStatus": 1, "$db": "admin"})
    assert status["myState"] == 2
    assert status["members"][0]["stateStr"] == "SECONDARY"


# --------------------------------------------------------------------------- commands


def test_write_on_a_secondary_fails_with_not_writable_primary(
    emu: MongoEmulator, sock: socket.socket
) -> None:
    before = _counter(_hello(sock))
    emu.step_down(60)
    reply = raw_wire.command(sock, {"insert": "c", "documents": [{"_id": 1}], "$db": "t"})
    assert reply["ok"] == 0.0
    assert reply["code"] == 10107
    assert reply["codeName"] == "NotWritablePrimary"
    assert reply["topologyVersion"]["counter"] == Int64(before + 1)


def test_primary_read_on_a_secondary_fails_but_a_secondary_read_is_answered(
    emu: MongoEmulator, sock: socket.socket
) -> None:
    emu.step_down(60)
    refused = raw_wire.command(sock, {"find": "c", "$db": "t"})
    assert refused["code"] == 13435
    answered = raw_wire.command(
        sock, {"find": "c", "$db": "t", "$readPreference": {"mode": "secondaryPreferred"}}
    )
    assert answered["ok"] == 1.0


def test_repl_set_step_down_without_force_finds_no_electable_secondary(
    sock: socket.socket,
) -> None:
    reply = raw_wire.command(sock, {"replSetStepDown": 60, "$db": "admin"})
    assert reply["code"] == 262
    assert _hello(sock)["isWritablePrimary"] is True


def test_repl_set_step_down_with_force_steps_down(sock: socket.socket) -> None:
    reply = raw_wire.command(sock, {"replSetStepDown": 60, "force": True, "$db": "admin"})
    assert reply["ok"] == 1.0
    assert _hello(sock)["secondary"] is True
    again = raw_wire.command(sock, {"replSetStepDown": 60, "force": True, "$db": "admin"})
    assert again["code"] == 10107


def test_stepdown_aborts_transactions_in_progress(
    emu: MongoEmulator, client: MongoClient[Any]
) -> None:
    with client.start_session() as session:
        session.start_transaction()
        client.t.c.insert_one({"_id": "in-txn"}, session=session)
        emu.step_down(60)
        emu.step_up()
        with pytest.raises(OperationFailure) as exc:
            session.commit_transaction()
    assert exc.value.code == 251
    assert client.t.c.find_one({"_id": "in-txn"}) is None


def test_pymongo_retryable_write_rides_out_a_stepdown(
    emu: MongoEmulator, client: MongoClient[Any]
) -> None:
    """The write waits for a primary (server selection) and lands once it is back."""
    client.t.c.insert_one({"_id": "doc", "n": 0})
    emu.step_down(0.5)
    try:
        client.t.c.update_one({"_id": "doc"}, {"$inc": {"n": 1}})
    except PyMongoError as exc:  # pragma: no cover - reported with the cause
        pytest.fail(f"the write did not survive the stepdown: {exc!r}")
    assert client.t.c.find_one({"_id": "doc"}) == {"_id": "doc", "n": 1}


def test_stand_alone_emulator_cannot_step_down() -> None:
    emu = MongoEmulator(replica_set=None)
    emu.start()
    try:
        with pytest.raises(RuntimeError, match="standalone"):
            emu.step_down(1)
    finally:
        emu.close()
