"""OplogSource against a server: Rocket.Chat-shaped writes in, keys out, nothing lost.

Runs on the embedded emulator by default and unchanged on a real replica set with
``PRESENCED_TEST_MONGO_URL`` (the oplog client is the session's ``client``, read through
its ``local`` database). Tests marked ``emulator_only`` make their own ``MongoEmulator``
(a tiny oplog, a restart) so the session's shared one is left alone. Every wait is a poll
loop bounded by a deadline; nothing sleeps.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from bson import Timestamp
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import ConnectionFailure, OperationFailure

from presenced.feed.keys import (
    InstancesChanged,
    Key,
    ResyncAll,
    SessionsChanged,
    UserChanged,
    WatchedCollections,
)
from presenced.feed.oplog import OplogSource
from presenced.feed.source import HistoryLost

from .feed_support import (
    AWAIT_MS,
    SENTINEL,
    TIMEOUT,
    Doc,
    connect,
    keys_until,
    now,
    retrying,
    write_sentinel,
)


def n_keys(source: OplogSource, n: int, timeout: float = TIMEOUT) -> list[Key]:
    """The next ``n`` keys, polling one entry at a time (each write here is one key)."""
    keys: list[Key] = []
    deadline = time.monotonic() + timeout
    while len(keys) < n:
        if time.monotonic() > deadline:
            pytest.fail(f"only {len(keys)} of {n} keys before the deadline: {keys!r}")
        keys.extend(source.poll(max_events=1))
    return keys


@pytest.fixture
def source(client: MongoClient[Doc], watched: WatchedCollections) -> Iterator[OplogSource]:
    s = OplogSource(client, watched, max_await_ms=AWAIT_MS)
    yield s
    s.close()


# -------------------------------------------------------------------------------- keys in order


def test_rocketchat_writes_become_exactly_their_keys_in_order(
    db: Database[Doc], source: OplogSource
) -> None:
    db.users.insert_one({"_id": "u1", "username": "alice", "active": True, "type": "user"})
    source.open(None)
    connect(db, "u1", "c1")  # upsert: an insert entry
    db.users.update_one({"_id": "u1"}, {"$set": {"statusDefault": "busy"}})
    db.users.update_one(
        {"_id": "u1"},
        {"$set": {"services.resume.loginTokens": [{"when": now(), "hashedToken": "h"}]}},
    )  # not a presence field: no key
    db.instances.insert_one(
        {"_id": "inst-1", "name": "rocket.chat", "pid": 1, "_createdAt": now(), "_updatedAt": now()}
    )
    connect(db, "u1", "c2")  # $push onto the existing array: a $v: 2 array diff
    db.rocketchat_message.insert_one({"_id": "m1", "msg": "hi"})  # not watched: no key
    db.users.replace_one({"_id": "u1"}, {"username": "alice", "active": False})
    db.usersSessions.delete_one({"_id": "u1"})
    write_sentinel(db)
    assert keys_until(source) == [
        SessionsChanged("u1"),
        UserChanged("u1"),
        InstancesChanged("inst-1"),
        SessionsChanged("u1"),
        UserChanged("u1"),
        SessionsChanged("u1"),
        SENTINEL,
    ]
    assert source.malformed == 0
    position = source.position()
    assert isinstance(position, Timestamp)


def test_dropping_a_watched_collection_and_the_database_resync(
    client: MongoClient[Doc], db: Database[Doc], source: OplogSource
) -> None:
    connect(db, "u1", "c1")
    db.users.insert_one({"_id": "u1"})
    source.open(None)
    db.drop_collection("usersSessions")
    connect(db, "u2", "c2")
    client.drop_database(db.name)
    keys = keys_until(source, lambda k: k == ResyncAll("dropDatabase"))
    assert keys[:2] == [ResyncAll("drop"), SessionsChanged("u2")]
    # MongoDB 4.2+ logs a drop per collection before the dropDatabase entry.
    assert set(keys[2:-1]) <= {ResyncAll("drop")}
    assert keys[-1] == ResyncAll("dropDatabase")
    connect(db, "u3", "c3")  # the database is recreated; the feed goes on
    write_sentinel(db)
    assert keys_until(source) == [SessionsChanged("u3"), SENTINEL]


# ------------------------------------------------------------------------------------ position


def test_position_is_a_timestamp_from_open_and_advances_with_entries(
    db: Database[Doc], source: OplogSource
) -> None:
    source.open(None)
    opened = source.position()
    assert isinstance(opened, Timestamp)
    connect(db, "u1", "c1")
    assert keys_until(source, lambda k: k == SessionsChanged("u1")) == [SessionsChanged("u1")]
    after = source.position()
    assert isinstance(after, Timestamp)
    assert after > opened


def test_source_opened_from_a_saved_position_sees_exactly_the_later_events(
    client: MongoClient[Doc],
    db: Database[Doc],
    watched: WatchedCollections,
    source: OplogSource,
) -> None:
    source.open(None)
    for i in range(5):
        connect(db, f"u{i}", f"c{i}")
    assert n_keys(source, 2) == [SessionsChanged("u0"), SessionsChanged("u1")]
    saved = source.position()
    assert n_keys(source, 3) == [SessionsChanged(f"u{i}") for i in (2, 3, 4)]
    source.close()
    connect(db, "u5", "c5")  # written while no source is open

    resumed = OplogSource(client, watched, max_await_ms=AWAIT_MS)
    try:
        resumed.open(saved)
        write_sentinel(db)
        assert keys_until(resumed) == [
            SessionsChanged("u2"),
            SessionsChanged("u3"),
            SessionsChanged("u4"),
            SessionsChanged("u5"),
            SENTINEL,
        ]
    finally:
        resumed.close()


def test_poll_returns_nothing_within_about_max_await_when_idle(source: OplogSource) -> None:
    source.open(None)
    deadline = time.monotonic() + TIMEOUT
    while source.poll():  # other tests' no-ops are not keys, but drain anyway
        assert time.monotonic() < deadline
    started = time.monotonic()
    assert source.poll() == []
    elapsed = time.monotonic() - started
    assert elapsed < AWAIT_MS / 1000 + 2.0


def test_lag_is_zero_once_caught_up_and_positive_while_behind(
    db: Database[Doc], source: OplogSource
) -> None:
    source.open(None)
    for i in range(5):
        connect(db, f"u{i}", f"c{i}")
    assert n_keys(source, 1) == [SessionsChanged("u0")]  # filled its batch of one: behind
    assert source.lag_seconds(time.time() + 100) > 90
    assert source.lag_seconds(datetime.now(UTC)) >= 0
    keys_until(source, lambda k: k == SessionsChanged("u4"))
    deadline = time.monotonic() + TIMEOUT
    while source.poll():
        assert time.monotonic() < deadline
    assert source.lag_seconds(time.time() + 100) == 0.0


def test_quiet_period_recreates_the_cursor_without_losing_entries(
    client: MongoClient[Doc], db: Database[Doc], watched: WatchedCollections
) -> None:
    s = OplogSource(client, watched, max_await_ms=AWAIT_MS, quiet_reopen_s=0.0)
    try:
        s.open(None)
        assert s.poll() == []  # every poll now starts on a new cursor
        connect(db, "u1", "c1")
        connect(db, "u2", "c2")
        assert n_keys(s, 2) == [SessionsChanged("u1"), SessionsChanged("u2")]
        write_sentinel(db)
        assert keys_until(s) == [SENTINEL]
    finally:
        s.close()


def test_a_position_that_is_not_an_oplog_timestamp_is_history_lost(
    db: Database[Doc], source: OplogSource
) -> None:
    with pytest.raises(HistoryLost):
        source.open({"_data": "8266321A3C000000012B"})  # type: ignore[arg-type]
    source.open(None)
    write_sentinel(db)
    assert keys_until(source) == [SENTINEL]


# -------------------------------------------------------------------------------- transactions


def test_transaction_touching_several_users_yields_a_key_for_each(
    client: MongoClient[Doc], db: Database[Doc], source: OplogSource
) -> None:
    db.users.insert_many([{"_id": f"u{i}", "username": f"user{i}"} for i in range(3)])
    connect(db, "u0", "c0")  # creates usersSessions outside the transaction
    source.open(None)
    try:
        with client.start_session() as s, s.start_transaction():
            for i in range(3):
                db.users.update_one(
                    {"_id": f"u{i}"}, {"$set": {"statusDefault": "away"}}, session=s
                )
            db.usersSessions.update_one(
                {"_id": "u0"}, {"$set": {"connections.0.status": "away"}}, session=s
            )
            db.rocketchat_message.insert_one({"_id": "m1"}, session=s)  # not watched
    except OperationFailure as exc:
        if exc.code == 115:  # CommandNotSupported: no transactions on this server
            pytest.skip("the server (the emulator) does not support transactions yet")
        raise
    write_sentinel(db)
    assert keys_until(source) == [
        UserChanged("u0"),
        UserChanged("u1"),
        UserChanged("u2"),
        SessionsChanged("u0"),
        SENTINEL,
    ]


# ------------------------------------------------------------------------------ emulator-only


def fresh_db(client: MongoClient[Doc]) -> Database[Doc]:
    return client[f"t_{uuid.uuid4().hex[:12]}"]


@pytest.mark.emulator_only
def test_open_from_a_position_older_than_the_oldest_entry_raises_history_lost(
    own_emulator: Callable[..., tuple[Any, MongoClient[Doc]]],
) -> None:
    _, client = own_emulator(oplog_size=20)
    db = fresh_db(client)
    watched = WatchedCollections(db.name)
    source = OplogSource(client, watched, max_await_ms=AWAIT_MS)
    source.open(None)
    connect(db, "u0", "c0")
    assert keys_until(source, lambda k: k == SessionsChanged("u0")) == [SessionsChanged("u0")]
    stale = source.position()
    source.close()
    for i in range(1, 101):
        connect(db, f"u{i}", f"c{i}")

    again = OplogSource(client, watched, max_await_ms=AWAIT_MS)
    with pytest.raises(HistoryLost):
        again.open(stale)
    again.open(None)  # what the caller does next: reconcile everything, follow from now
    write_sentinel(db)
    assert keys_until(again) == [SENTINEL]
    again.close()


@pytest.mark.emulator_only
def test_position_overwritten_while_tailing_raises_history_lost_on_the_next_poll(
    own_emulator: Callable[..., tuple[Any, MongoClient[Doc]]],
) -> None:
    _, client = own_emulator(oplog_size=20)
    db = fresh_db(client)
    source = OplogSource(client, WatchedCollections(db.name), max_await_ms=AWAIT_MS)
    source.open(None)
    assert source.poll() == []
    for i in range(100):
        connect(db, f"u{i}", f"c{i}")
    with pytest.raises(HistoryLost):
        source.poll()
    source.open(None)
    write_sentinel(db)
    assert keys_until(source) == [SENTINEL]
    source.close()


@pytest.mark.emulator_only
def test_polling_goes_on_across_a_server_restart_without_losing_entries(
    own_emulator: Callable[..., tuple[Any, MongoClient[Doc]]],
) -> None:
    emu, client = own_emulator()
    db = fresh_db(client)
    source = OplogSource(client, WatchedCollections(db.name), max_await_ms=AWAIT_MS)
    source.open(None)
    connect(db, "u1", "c1")
    assert keys_until(source, lambda k: k == SessionsChanged("u1")) == [SessionsChanged("u1")]
    connect(db, "u2", "c2")  # written before the restart, not read yet
    emu.stop()
    emu.start()
    retrying(lambda: connect(db, "u3", "c3"))
    retrying(lambda: write_sentinel(db))
    keys = keys_until(source, tolerate=(ConnectionFailure,), timeout=30)
    assert keys == [SessionsChanged("u2"), SessionsChanged("u3"), SENTINEL]
    connect(db, "u4", "c4")
    assert keys_until(source, lambda k: k == SessionsChanged("u4")) == [SessionsChanged("u4")]
    source.close()


@pytest.mark.emulator_only
def test_poll_raises_while_the_server_is_down_and_recovers_without_loss_once_it_is_back(
    own_emulator: Callable[..., tuple[Any, MongoClient[Doc]]],
) -> None:
    emu, _ = own_emulator()
    client: MongoClient[Doc] = MongoClient(emu.url, serverSelectionTimeoutMS=300)
    try:
        db = fresh_db(client)
        source = OplogSource(client, WatchedCollections(db.name), max_await_ms=AWAIT_MS)
        source.open(None)
        connect(db, "u1", "c1")
        assert keys_until(source, lambda k: k == SessionsChanged("u1")) == [SessionsChanged("u1")]
        connect(db, "u2", "c2")  # written before the outage, not read yet
        saved = source.position()
        emu.stop()
        with pytest.raises(ConnectionFailure):
            source.poll()
        assert source.position() == saved
        with pytest.raises(ConnectionFailure):
            source.poll()  # recreating the cursor needs the server too
        emu.start()
        retrying(lambda: connect(db, "u3", "c3"))
        retrying(lambda: write_sentinel(db))
        keys = keys_until(source, tolerate=(ConnectionFailure,))
        assert keys == [SessionsChanged("u2"), SessionsChanged("u3"), SENTINEL]
        source.close()
    finally:
        client.close()
