"""The contract both feeds keep: the change stream and the oplog tail, run through the
same tests.

Every test here runs once per feed (``feed`` is parametrized over
:class:`~presenced.feed.changestream.ChangeStreamSource` and
:class:`~presenced.feed.oplog.OplogSource`).

Runs on the embedded emulator by default and unchanged on a real replica set with
``PRESENCED_TEST_MONGO_URL`` (the oplog source reads the session's ``client`` through its
``local`` database). Every wait is a poll loop bounded by a deadline; nothing sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from pymongo import MongoClient
from pymongo.database import Database

from presenced.feed.changestream import ChangeStreamSource
from presenced.feed.keys import SessionsChanged, WatchedCollections
from presenced.feed.oplog import OplogSource
from presenced.feed.source import FeedSource

from .feed_support import (
    AWAIT_MS,
    SENTINEL,
    Doc,
    connect,
    keys_until,
    write_sentinel,
)

LONG_AWAIT_MS = 20_000  # a getMore this long is unmistakable in a test's elapsed time


@dataclass(frozen=True)
class Feed:
    """One kind of source."""

    name: str
    make: Callable[..., FeedSource]
    """``make(client, watched, max_await_ms=...)``: a new, unopened source."""


def _change_stream(
    client: MongoClient[Doc], watched: WatchedCollections, *, max_await_ms: int = AWAIT_MS
) -> FeedSource:
    return ChangeStreamSource(client, watched, max_await_ms=max_await_ms)


def _oplog(
    client: MongoClient[Doc], watched: WatchedCollections, *, max_await_ms: int = AWAIT_MS
) -> FeedSource:
    return OplogSource(client, watched, max_await_ms=max_await_ms)


FEEDS = (
    Feed("changestream", _change_stream),
    Feed("oplog", _oplog),
)


@pytest.fixture(params=FEEDS, ids=[f.name for f in FEEDS])
def feed(request: pytest.FixtureRequest) -> Feed:
    kind: Feed = request.param
    return kind


# ------------------------------------------------------------------------------------- timing


def test_events_already_received_are_handed_on_without_waiting_for_another_getmore(
    feed: Feed, client: MongoClient[Doc], db: Database[Doc], watched: WatchedCollections
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
