"""What only the change-stream feed does, against a server.

The behaviours both feeds promise (keys in order, drops, positions, reopening, history
lost, restarts, outages, handing on buffered events at once) are in
``test_feed_contract.py``, which runs them on :class:`ChangeStreamSource` too. Here: the
position moving on with the server's postBatchResumeToken, and the one piece of pymongo's
private state the source reads (what a change stream has buffered).

Runs on the embedded emulator by default and unchanged on a real replica set with
``PRESENCED_TEST_MONGO_URL``. Every wait is a poll loop bounded by a deadline; nothing
sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from pymongo import MongoClient, monitoring
from pymongo.database import Database
from pymongo.write_concern import WriteConcern

from presenced.feed.changestream import ChangeStreamSource, _has_buffered_events
from presenced.presence import Collections

from .feed_support import AWAIT_MS, TIMEOUT, Doc, empty_poll, now


@pytest.fixture
def source(client: MongoClient[Doc], watched: Collections) -> Iterator[ChangeStreamSource]:
    s = ChangeStreamSource(client, watched, max_await_ms=AWAIT_MS)
    yield s
    s.close()


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
