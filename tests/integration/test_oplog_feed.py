"""What only the oplog feed does, against a server.

The behaviours both feeds promise (keys in order, drops, transactions, positions,
reopening, history lost, restarts, outages, handing on buffered events at once) are in
``test_feed_contract.py``, which runs them on :class:`OplogSource` too. Here: positions
are oplog timestamps, the feed's lag, the cursor recreated after a quiet period.

Runs on the embedded emulator by default and unchanged on a real replica set with
``PRESENCED_TEST_MONGO_URL`` (the oplog client is the session's ``client``, read through
its ``local`` database). Every wait is a poll loop bounded by a deadline; nothing sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from bson import Timestamp
from pymongo import MongoClient
from pymongo.database import Database

from presenced.feed.keys import SessionsChanged
from presenced.feed.oplog import OplogSource
from presenced.feed.source import HistoryLost
from presenced.presence import Collections

from .feed_support import (
    AWAIT_MS,
    SENTINEL,
    TIMEOUT,
    Doc,
    connect,
    keys_until,
    n_keys,
    write_sentinel,
)


@pytest.fixture
def source(client: MongoClient[Doc], watched: Collections) -> Iterator[OplogSource]:
    s = OplogSource(client, watched, max_await_ms=AWAIT_MS)
    yield s
    s.close()


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


def test_a_position_that_is_not_an_oplog_timestamp_is_history_lost(
    db: Database[Doc], source: OplogSource
) -> None:
    with pytest.raises(HistoryLost):
        source.open({"_data": "8266321A3C000000012B"})  # type: ignore[arg-type]
    source.open(None)
    write_sentinel(db)
    assert keys_until(source) == [SENTINEL]


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
    client: MongoClient[Doc], db: Database[Doc], watched: Collections
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
