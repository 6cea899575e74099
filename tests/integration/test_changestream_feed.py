"""ChangeStreamSource against a server: Rocket.Chat-shaped writes in, keys out, nothing lost.

Runs on the embedded emulator by default and unchanged on a real replica set with
``PRESENCED_TEST_MONGO_URL``. Tests marked ``emulator_only`` make their own
``MongoEmulator`` (a tiny oplog, a restart) so the session's shared one is left alone.
Every wait is a poll loop bounded by a deadline; nothing sleeps.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from pymongo import MongoClient, monitoring
from pymongo.database import Database
from pymongo.errors import ConnectionFailure, OperationFailure
from pymongo.write_concern import WriteConcern

from presenced.feed.changestream import ChangeStreamSource, _has_buffered_events
from presenced.feed.keys import (
    InstancesChanged,
    Key,
    ResyncAll,
    SessionsChanged,
    UserChanged,
    WatchedCollections,
)
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

LATER = datetime(2099, 1, 1, tzinfo=UTC)  # a heartbeat time that differs from any now()


def n_keys(source: ChangeStreamSource, n: int, timeout: float = TIMEOUT) -> list[Key]:
    """Exactly the next ``n`` keys (polling at most ``n`` events' worth at a time)."""
    keys: list[Key] = []
    deadline = time.monotonic() + timeout
    while len(keys) < n:
        if time.monotonic() > deadline:
            pytest.fail(f"only {len(keys)} of {n} keys before the deadline: {keys!r}")
        keys.extend(source.poll(max_events=n - len(keys)))
    return keys


def empty_poll(source: ChangeStreamSource, timeout: float = TIMEOUT) -> None:
    """Polls until a poll comes back empty (the stream has caught up)."""
    deadline = time.monotonic() + timeout
    while source.poll():
        if time.monotonic() > deadline:
            pytest.fail("the feed never went quiet")


@pytest.fixture
def source(client: MongoClient[Doc], watched: WatchedCollections) -> Iterator[ChangeStreamSource]:
    s = ChangeStreamSource(client, watched, max_await_ms=AWAIT_MS)
    yield s
    s.close()


# -------------------------------------------------------------------------------- keys in order


def test_rocketchat_writes_become_exactly_their_keys_in_order(
    db: Database[Doc], source: ChangeStreamSource
) -> None:
    db.users.insert_one({"_id": "u1", "username": "alice", "active": True, "type": "user"})
    source.open(None)
    connect(db, "u1", "c1")  # upsert: creates the sessions document
    db.users.update_one({"_id": "u1"}, {"$set": {"statusDefault": "busy"}})
    db.users.update_one(
        {"_id": "u1"},
        {"$set": {"services.resume.loginTokens": [{"when": now(), "hashedToken": "h"}]}},
    )  # not a presence field: no key
    db.instances.insert_one(
        {"_id": "inst-1", "name": "rocket.chat", "pid": 1, "_createdAt": now(), "_updatedAt": now()}
    )
    connect(db, "u1", "c2")  # $push onto the existing array
    db.rocketchat_message.insert_one({"_id": "m1", "msg": "hi"})  # not watched: no key
    write_sentinel(db)
    assert keys_until(source) == [
        SessionsChanged("u1"),
        UserChanged("u1"),
        InstancesChanged("inst-1"),
        SessionsChanged("u1"),
        SENTINEL,
    ]
    assert source.malformed == 0


def test_disconnect_heartbeat_and_instance_cleanup_are_sessions_keys(
    db: Database[Doc], source: ChangeStreamSource
) -> None:
    connect(db, "u1", "c1")
    connect(db, "u2", "c2", instance="inst-2")
    source.open(None)
    db.usersSessions.update_one(
        {"_id": "u1", "connections.id": "c1"}, {"$set": {"connections.$._updatedAt": LATER}}
    )  # (a $set to the value already stored is a no-op: no event)
    db.usersSessions.update_many({}, {"$pull": {"connections": {"instanceId": "inst-2"}}})
    db.usersSessions.update_many({"connections.id": "c1"}, {"$pull": {"connections": {"id": "c1"}}})
    write_sentinel(db)
    assert keys_until(source) == [
        SessionsChanged("u1"),
        SessionsChanged("u2"),
        SessionsChanged("u1"),
        SENTINEL,
    ]


def test_users_insert_and_delete_and_instance_delete_are_keys(
    db: Database[Doc], source: ChangeStreamSource
) -> None:
    db.instances.insert_one({"_id": "inst-1", "_updatedAt": now()})
    source.open(None)
    db.users.insert_one({"_id": "u9", "username": "bob"})
    db.users.delete_one({"_id": "u9"})
    db.instances.delete_one({"_id": "inst-1"})
    write_sentinel(db)
    assert keys_until(source) == [
        UserChanged("u9"),
        UserChanged("u9"),
        InstancesChanged("inst-1"),
        SENTINEL,
    ]


def test_dropping_a_watched_collection_resyncs_and_the_feed_goes_on(
    db: Database[Doc], source: ChangeStreamSource
) -> None:
    connect(db, "u1", "c1")
    source.open(None)
    db.drop_collection("usersSessions")
    connect(db, "u2", "c2")
    write_sentinel(db)
    assert keys_until(source) == [ResyncAll("drop"), SessionsChanged("u2"), SENTINEL]


def test_dropping_the_database_resyncs_and_the_feed_continues_after_the_invalidate(
    client: MongoClient[Doc], db: Database[Doc], source: ChangeStreamSource
) -> None:
    connect(db, "u1", "c1")
    db.users.insert_one({"_id": "u1"})
    db.rocketchat_message.insert_one({"_id": "m1"})
    source.open(None)
    client.drop_database(db.name)
    keys = keys_until(source, lambda k: k == ResyncAll("invalidate"))
    assert keys == [ResyncAll("drop")] * (len(keys) - 2) + [
        ResyncAll("dropDatabase"),
        ResyncAll("invalidate"),
    ]
    assert len(keys) - 2 <= 2  # users and usersSessions at most; rocketchat_message filtered
    connect(db, "u2", "c2")  # the database is recreated
    write_sentinel(db)
    assert keys_until(source) == [SessionsChanged("u2"), SENTINEL]


def test_renaming_a_watched_collection_resyncs(
    client: MongoClient[Doc], db: Database[Doc], source: ChangeStreamSource
) -> None:
    db.users.insert_one({"_id": "u1"})
    source.open(None)
    try:
        client.admin.command("renameCollection", f"{db.name}.users", to=f"{db.name}.users_old")
    except OperationFailure as exc:
        if exc.code == 59:  # CommandNotFound
            pytest.skip("the server (the emulator) has no renameCollection command")
        raise
    write_sentinel(db)
    assert keys_until(source) == [ResyncAll("rename"), SENTINEL]


# ------------------------------------------------------------------------------------ position


def test_position_after_an_empty_poll_is_not_none(source: ChangeStreamSource) -> None:
    source.open(None)
    empty_poll(source)
    assert source.position() is not None


def test_position_advances_on_a_feed_that_sees_only_unwatched_writes(
    db: Database[Doc], source: ChangeStreamSource
) -> None:
    source.open(None)
    empty_poll(source)
    before = source.position()
    db.rocketchat_message.insert_one({"_id": "m1"})
    deadline = time.monotonic() + TIMEOUT
    while source.position() == before and time.monotonic() < deadline:
        assert source.poll() == []
    assert source.position() != before


def test_source_opened_from_a_saved_position_sees_exactly_the_later_events(
    client: MongoClient[Doc],
    db: Database[Doc],
    watched: WatchedCollections,
    source: ChangeStreamSource,
) -> None:
    source.open(None)
    for i in range(5):
        connect(db, f"u{i}", f"c{i}")
    assert n_keys(source, 2) == [SessionsChanged("u0"), SessionsChanged("u1")]
    saved = source.position()
    assert n_keys(source, 3) == [SessionsChanged(f"u{i}") for i in (2, 3, 4)]
    source.close()

    resumed = ChangeStreamSource(client, watched, max_await_ms=AWAIT_MS)
    try:
        resumed.open(saved)
        write_sentinel(db)
        assert keys_until(resumed) == [
            SessionsChanged("u2"),
            SessionsChanged("u3"),
            SessionsChanged("u4"),
            SENTINEL,
        ]
    finally:
        resumed.close()


def test_source_opened_from_a_position_saved_after_an_empty_poll_misses_nothing(
    client: MongoClient[Doc],
    db: Database[Doc],
    watched: WatchedCollections,
    source: ChangeStreamSource,
) -> None:
    source.open(None)
    connect(db, "u0", "c0")
    assert keys_until(source, lambda k: k == SessionsChanged("u0")) == [SessionsChanged("u0")]
    empty_poll(source)
    saved = source.position()
    source.close()
    connect(db, "u1", "c1")  # written while no source is open

    resumed = ChangeStreamSource(client, watched, max_await_ms=AWAIT_MS)
    try:
        resumed.open(saved)
        write_sentinel(db)
        assert keys_until(resumed) == [SessionsChanged("u1"), SENTINEL]
    finally:
        resumed.close()


def test_poll_returns_nothing_within_about_max_await_when_idle(
    source: ChangeStreamSource,
) -> None:
    source.open(None)
    empty_poll(source)
    started = time.monotonic()
    assert source.poll() == []
    assert time.monotonic() - started < AWAIT_MS / 1000 + 2.0


class GetMores(monitoring.CommandListener):
    """Counts the getMore commands a client sends."""

    def __init__(self) -> None:
        self.sent = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "getMore":
            self.sent += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def test_pymongo_still_reports_the_events_it_has_buffered(
    mongo_url: str, db: Database[Doc]
) -> None:
    """``_has_buffered_events`` reads pymongo's private state; if a pymongo release
    changes it, this fails (and ``poll``, told nothing, waits with keys in hand again)."""
    getmores = GetMores()
    c: MongoClient[Doc] = MongoClient(
        mongo_url, event_listeners=[getmores], serverSelectionTimeoutMS=10_000
    )
    try:
        with c[db.name].watch(max_await_time_ms=AWAIT_MS) as stream:
            # One command, majority-acknowledged: all three events are visible to the
            # first getMore, so it brings them in one batch.
            sessions = db.usersSessions.with_options(write_concern=WriteConcern("majority"))
            sessions.insert_many([{"_id": f"u{i}", "at": now()} for i in range(3)])
            events, reported = 0, list[bool]()
            deadline = time.monotonic() + TIMEOUT
            while events < 3:
                assert time.monotonic() < deadline, f"only {events} of 3 events"
                buffered = _has_buffered_events(stream)
                assert buffered is not None, "pymongo has no ChangeStream._cursor._has_next()"
                sent = getmores.sent
                if stream.try_next() is not None:
                    events += 1
                # What it reported is what try_next did: ask the server only when empty.
                assert buffered == (getmores.sent == sent)
                reported.append(buffered)
            assert _has_buffered_events(stream) is False  # the batch is used up
        assert True in reported, (
            "_has_buffered_events never saw an event pymongo had buffered: did pymongo change"
            " ChangeStream._cursor._has_next()?"
        )
    finally:
        c.close()


# ------------------------------------------------------------------------------ emulator-only


@pytest.mark.emulator_only
def test_open_from_a_position_no_longer_in_the_oplog_raises_history_lost(
    own_emulator: Callable[..., tuple[Any, MongoClient[Doc]]],
) -> None:
    _, client = own_emulator(oplog_size=20)
    db = client[f"t_{uuid.uuid4().hex[:12]}"]
    watched = WatchedCollections(db.name)
    source = ChangeStreamSource(client, watched, max_await_ms=AWAIT_MS)
    source.open(None)
    connect(db, "u0", "c0")
    assert keys_until(source, lambda k: k == SessionsChanged("u0")) == [SessionsChanged("u0")]
    stale = source.position()
    source.close()
    for i in range(1, 101):
        connect(db, f"u{i}", f"c{i}")

    again = ChangeStreamSource(client, watched, max_await_ms=AWAIT_MS)
    with pytest.raises(HistoryLost):
        again.open(stale)
    again.open(None)  # what the caller does next: reconcile everything, follow from now
    write_sentinel(db)
    assert keys_until(again) == [SENTINEL]
    again.close()


@pytest.mark.emulator_only
def test_polling_goes_on_across_a_server_restart_without_losing_events(
    own_emulator: Callable[..., tuple[Any, MongoClient[Doc]]],
) -> None:
    emu, client = own_emulator()
    db = client[f"t_{uuid.uuid4().hex[:12]}"]
    source = ChangeStreamSource(client, WatchedCollections(db.name), max_await_ms=AWAIT_MS)
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
    source.close()


@pytest.mark.emulator_only
def test_poll_raises_while_the_server_is_down_and_recovers_without_loss_once_it_is_back(
    own_emulator: Callable[..., tuple[Any, MongoClient[Doc]]],
) -> None:
    emu, _ = own_emulator()
    client: MongoClient[Doc] = MongoClient(emu.url, serverSelectionTimeoutMS=300)
    try:
        db = client[f"t_{uuid.uuid4().hex[:12]}"]
        source = ChangeStreamSource(client, WatchedCollections(db.name), max_await_ms=AWAIT_MS)
        source.open(None)
        connect(db, "u1", "c1")
        assert keys_until(source, lambda k: k == SessionsChanged("u1")) == [SessionsChanged("u1")]
        connect(db, "u2", "c2")  # written before the outage, not read yet
        saved = source.position()
        emu.stop()
        with pytest.raises(ConnectionFailure):
            source.poll()  # pymongo's one resume attempt finds no server
        assert source.position() == saved
        emu.start()
        retrying(lambda: connect(db, "u3", "c3"))
        retrying(lambda: write_sentinel(db))
        keys = keys_until(source, tolerate=(ConnectionFailure,))
        assert keys == [SessionsChanged("u2"), SessionsChanged("u3"), SENTINEL]
        source.close()
    finally:
        client.close()
