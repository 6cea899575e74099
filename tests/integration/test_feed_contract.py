"""The contract both feeds keep: the change stream and the oplog tail, run through the
same tests.

Every test here runs once per feed (``feed`` is parametrized over
:class:`~presenced.feed.changestream.ChangeStreamSource` and
:class:`~presenced.feed.oplog.OplogSource`; ``source`` is an opened source of that kind on
the session's server). What only one feed does (the oplog's lag and cursor recreation, the
change stream's postBatchResumeToken and pymongo's buffer) is tested in
``test_changestream_feed.py`` and ``test_oplog_feed.py``.

Runs on the embedded emulator by default and unchanged on a real replica set with
``PRESENCED_TEST_MONGO_URL`` (the oplog source reads the session's ``client`` through its
``local`` database). Tests marked ``emulator_only`` make their own ``MongoEmulator`` (a
tiny oplog, a restart) so the session's shared one is left alone. Every wait is a poll
loop bounded by a deadline; nothing sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from bson import Timestamp
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import ConnectionFailure, OperationFailure

from presenced.feed.changestream import ChangeStreamSource
from presenced.feed.keys import (
    InstancesChanged,
    Key,
    ResyncAll,
    SessionsChanged,
    UserChanged,
)
from presenced.feed.oplog import OplogSource
from presenced.feed.source import FeedSource, HistoryLost
from presenced.presence import Collections

from .feed_support import (
    AWAIT_MS,
    SENTINEL,
    Doc,
    connect,
    empty_poll,
    fresh_db,
    keys_until,
    n_keys,
    now,
    retrying,
    write_sentinel,
)

LATER = datetime(2099, 1, 1, tzinfo=UTC)  # a heartbeat time that differs from any now()
LONG_AWAIT_MS = 20_000  # a getMore this long is unmistakable in a test's elapsed time


@dataclass(frozen=True)
class Feed:
    """One kind of source, and what its contract leaves to the kind."""

    name: str
    make: Callable[..., FeedSource]
    """``make(client, watched, max_await_ms=...)``: a new, unopened source."""
    position_type: type
    """What ``position()`` is: a resume token (a mapping) or an oplog ``ts``."""
    after_drop_database: tuple[Key, ...]
    """The keys that follow ``ResyncAll("dropDatabase")`` before the next write's: a change
    stream is then invalidated (and the source starts after the invalidate)."""


def _change_stream(
    client: MongoClient[Doc], watched: Collections, *, max_await_ms: int = AWAIT_MS
) -> FeedSource:
    return ChangeStreamSource(client, watched, max_await_ms=max_await_ms)


def _oplog(
    client: MongoClient[Doc], watched: Collections, *, max_await_ms: int = AWAIT_MS
) -> FeedSource:
    return OplogSource(client, watched, max_await_ms=max_await_ms)


FEEDS = (
    Feed("changestream", _change_stream, Mapping, (ResyncAll("invalidate"),)),
    Feed("oplog", _oplog, Timestamp, ()),
)


@pytest.fixture(params=FEEDS, ids=[f.name for f in FEEDS])
def feed(request: pytest.FixtureRequest) -> Feed:
    kind: Feed = request.param
    return kind


@pytest.fixture
def source(
    feed: Feed, client: MongoClient[Doc], watched: Collections
) -> Iterator[FeedSource]:
    """A source of the ``feed`` kind, opened from now; closed after the test."""
    s = feed.make(client, watched)
    s.open(None)
    yield s
    s.close()


# -------------------------------------------------------------------------------- keys in order


def test_rocketchat_writes_become_exactly_their_keys_in_order(
    feed: Feed, db: Database[Doc], source: FeedSource
) -> None:
    db.users.insert_one({"_id": "u1", "username": "alice", "active": True, "type": "user"})
    source.open(None)  # from now: the user above is not an event
    connect(db, "u1", "c1")  # upsert: creates the sessions document
    db.users.update_one({"_id": "u1"}, {"$set": {"statusDefault": "busy"}})
    db.users.update_one(
        {"_id": "u1"},
        {"$set": {"services.resume.loginTokens": [{"when": now(), "hashedToken": "h"}]}},
    )  # not a presence field: no key
    db.instances.insert_one(
        {"_id": "inst-1", "name": "rocket.chat", "pid": 1, "_createdAt": now(), "_updatedAt": now()}
    )
    connect(db, "u1", "c2")  # $push onto the existing array (the oplog: a $v: 2 array diff)
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
    assert isinstance(source.position(), feed.position_type)


def test_disconnect_heartbeat_and_instance_cleanup_are_sessions_keys(
    db: Database[Doc], source: FeedSource
) -> None:
    connect(db, "u1", "c1")
    connect(db, "u2", "c2", instance="inst-2")
    source.open(None)  # from now: the connections above are not events
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
    db: Database[Doc], source: FeedSource
) -> None:
    db.instances.insert_one({"_id": "inst-1", "_updatedAt": now()})
    source.open(None)  # from now: the instance above is not an event
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


def test_a_status_write_carries_the_pair_it_wrote_and_other_writes_do_not(
    db: Database[Doc], source: FeedSource
) -> None:
    """presenced's own status write (the store's $set of both fields) comes back with the
    pair, in both feeds' update formats, so the daemon can tell its own echo."""
    db.users.insert_one({"_id": "u1", "username": "a", "status": "offline"})
    source.open(None)
    pair = {"status": "online", "statusConnection": "online"}
    db.users.update_one({"_id": "u1"}, {"$set": pair})  # statusConnection is new: inserted
    db.users.update_one({"_id": "u1"}, {"$set": {"status": "away", "statusConnection": "away"}})
    db.users.update_one({"_id": "u1"}, {"$set": {"status": "busy", "statusText": "x"}})
    write_sentinel(db)
    assert keys_until(source) == [
        UserChanged("u1", written=("online", "online")),
        UserChanged("u1", written=("away", "away")),
        UserChanged("u1"),
        SENTINEL,
    ]


def test_transaction_touching_several_users_yields_a_key_for_each(
    client: MongoClient[Doc], db: Database[Doc], source: FeedSource
) -> None:
    db.users.insert_many([{"_id": f"u{i}", "username": f"user{i}"} for i in range(3)])
    connect(db, "u0", "c0")  # creates usersSessions outside the transaction
    source.open(None)  # from now: the writes above are not events
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


# ---------------------------------------------------------------------------- drops and renames


def test_dropping_a_watched_collection_resyncs_and_the_feed_goes_on(
    db: Database[Doc], source: FeedSource
) -> None:
    connect(db, "u1", "c1")
    source.open(None)  # from now: the connection above is not an event
    db.drop_collection("usersSessions")
    connect(db, "u2", "c2")
    write_sentinel(db)
    assert keys_until(source) == [ResyncAll("drop"), SessionsChanged("u2"), SENTINEL]


def test_dropping_the_database_resyncs_and_the_feed_goes_on_once_it_is_recreated(
    feed: Feed, client: MongoClient[Doc], db: Database[Doc], source: FeedSource
) -> None:
    connect(db, "u1", "c1")
    db.users.insert_one({"_id": "u1"})
    db.rocketchat_message.insert_one({"_id": "m1"})
    source.open(None)  # from now: the writes above are not events
    client.drop_database(db.name)
    polled = keys_until(source, lambda k: k == ResyncAll("dropDatabase"))
    end = polled.index(ResyncAll("dropDatabase")) + 1
    keys, later = polled[:end], polled[end:]  # the poll may hand on what followed too
    # MongoDB 4.2+ reports a drop per collection before the database's.
    assert keys == [ResyncAll("drop")] * (len(keys) - 1) + [ResyncAll("dropDatabase")]
    assert len(keys) - 1 <= 2  # users and usersSessions at most; rocketchat_message filtered
    connect(db, "u2", "c2")  # the database is recreated
    write_sentinel(db)
    later += keys_until(source)
    assert later == [*feed.after_drop_database, SessionsChanged("u2"), SENTINEL]


def test_renaming_a_watched_collection_resyncs(
    client: MongoClient[Doc], db: Database[Doc], source: FeedSource
) -> None:
    db.users.insert_one({"_id": "u1"})
    source.open(None)  # from now: the user above is not an event
    try:
        client.admin.command("renameCollection", f"{db.name}.users", to=f"{db.name}.users_old")
    except OperationFailure as exc:
        if exc.code == 59:  # CommandNotFound
            pytest.skip("the server (the emulator) has no renameCollection command")
        raise
    write_sentinel(db)
    assert keys_until(source) == [ResyncAll("rename"), SENTINEL]


# ------------------------------------------------------------------------------------ position


def test_position_after_an_empty_poll_is_not_none(source: FeedSource) -> None:
    empty_poll(source)
    assert source.position() is not None


def test_source_opened_from_a_saved_position_sees_exactly_the_later_events(
    feed: Feed,
    client: MongoClient[Doc],
    db: Database[Doc],
    watched: Collections,
    source: FeedSource,
) -> None:
    for i in range(5):
        connect(db, f"u{i}", f"c{i}")
    assert n_keys(source, 2) == [SessionsChanged("u0"), SessionsChanged("u1")]
    saved = source.position()
    assert n_keys(source, 3) == [SessionsChanged(f"u{i}") for i in (2, 3, 4)]
    source.close()
    connect(db, "u5", "c5")  # written while no source is open

    resumed = feed.make(client, watched)
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


def test_source_opened_from_a_position_saved_after_an_empty_poll_misses_nothing(
    feed: Feed,
    client: MongoClient[Doc],
    db: Database[Doc],
    watched: Collections,
    source: FeedSource,
) -> None:
    connect(db, "u0", "c0")
    assert keys_until(source, lambda k: k == SessionsChanged("u0")) == [SessionsChanged("u0")]
    empty_poll(source)
    saved = source.position()
    source.close()
    connect(db, "u1", "c1")  # written while no source is open

    resumed = feed.make(client, watched)
    try:
        resumed.open(saved)
        write_sentinel(db)
        assert keys_until(resumed) == [SessionsChanged("u1"), SENTINEL]
    finally:
        resumed.close()


# ------------------------------------------------------------------------------------- timing


def test_poll_returns_nothing_within_about_max_await_when_idle(source: FeedSource) -> None:
    empty_poll(source)  # other tests' no-ops are not keys, but drain anyway
    started = time.monotonic()
    assert source.poll() == []
    assert time.monotonic() - started < AWAIT_MS / 1000 + 2.0


def test_events_already_received_are_handed_on_without_waiting_for_another_getmore(
    feed: Feed, client: MongoClient[Doc], db: Database[Doc], watched: Collections
) -> None:
    slow = feed.make(client, watched, max_await_ms=LONG_AWAIT_MS)
    try:
        slow.open(None)
        for i in range(3):
            connect(db, f"u{i}", f"c{i}")
        write_sentinel(db)
        # The writes are all in the server's history before the first poll, so its first
        # batch holds them (a real server may split them over batches; then each poll
        # still returns what it has). Waiting for a further event would take the whole
        # LONG_AWAIT_MS, as no further write comes.
        started = time.monotonic()
        keys = keys_until(slow)
        elapsed = time.monotonic() - started
        assert keys == [SessionsChanged(f"u{i}") for i in range(3)] + [SENTINEL]
        assert elapsed < LONG_AWAIT_MS / 1000 / 4, (
            f"the keys took {elapsed:.1f} s: the poll waited on the server with events in hand"
        )
    finally:
        slow.close()


# ------------------------------------------------------------------------------ emulator-only


@pytest.mark.emulator_only
def test_open_from_a_position_no_longer_in_the_history_raises_history_lost(
    feed: Feed, own_emulator: Callable[..., tuple[Any, MongoClient[Doc]]]
) -> None:
    _, client = own_emulator(oplog_size=20)
    db = fresh_db(client)
    watched = Collections(db.name)
    source = feed.make(client, watched)
    source.open(None)
    connect(db, "u0", "c0")
    assert keys_until(source, lambda k: k == SessionsChanged("u0")) == [SessionsChanged("u0")]
    stale = source.position()
    source.close()
    for i in range(1, 101):
        connect(db, f"u{i}", f"c{i}")

    again = feed.make(client, watched)
    with pytest.raises(HistoryLost):
        again.open(stale)
    again.open(None)  # what the caller does next: reconcile everything, follow from now
    write_sentinel(db)
    assert keys_until(again) == [SENTINEL]
    again.close()


@pytest.mark.emulator_only
def test_position_overwritten_while_following_raises_history_lost_on_the_next_poll(
    feed: Feed, own_emulator: Callable[..., tuple[Any, MongoClient[Doc]]]
) -> None:
    _, client = own_emulator(oplog_size=20)
    db = fresh_db(client)
    source = feed.make(client, Collections(db.name))
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
def test_polling_goes_on_across_a_server_restart_without_losing_events(
    feed: Feed, own_emulator: Callable[..., tuple[Any, MongoClient[Doc]]]
) -> None:
    emu, client = own_emulator()
    db = fresh_db(client)
    source = feed.make(client, Collections(db.name))
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
    feed: Feed, own_emulator: Callable[..., tuple[Any, MongoClient[Doc]]]
) -> None:
    emu, _ = own_emulator()
    client: MongoClient[Doc] = MongoClient(emu.url, serverSelectionTimeoutMS=300)
    try:
        db = fresh_db(client)
        source = feed.make(client, Collections(db.name))
        source.open(None)
        connect(db, "u1", "c1")
        assert keys_until(source, lambda k: k == SessionsChanged("u1")) == [SessionsChanged("u1")]
        connect(db, "u2", "c2")  # written before the outage, not read yet
        saved = source.position()
        emu.stop()
        with pytest.raises(ConnectionFailure):
            source.poll()  # the change stream: pymongo's one resume attempt finds no server
        assert source.position() == saved
        with pytest.raises(ConnectionFailure):
            source.poll()  # reopening the stream or recreating the cursor needs it too
        assert source.position() == saved
        emu.start()
        retrying(lambda: connect(db, "u3", "c3"))
        retrying(lambda: write_sentinel(db))
        keys = keys_until(source, tolerate=(ConnectionFailure,))
        assert keys == [SessionsChanged("u2"), SessionsChanged("u3"), SENTINEL]
        source.close()
    finally:
        client.close()
