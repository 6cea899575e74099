"""Two emulators in one process, written to at once, each log every insert.

A storage captures the documents each write statement touches to turn them into oplog
entries. The capture used to be one global for the whole process, so a write on one
emulator could run while the other's capture was installed (or after the other had
cleared it), and its oplog entry was lost: 33 and 27 of 3,000 inserts in the report
(issue 9, item 9). The capture is now per storage and per thread.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient

pytestmark = pytest.mark.emulator_only

WRITERS_PER_EMULATOR = 4
INSERTS_PER_WRITER = 400


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Threads switch far more often than the default 5 ms: races show up sooner."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def test_two_emulators_written_at_once_log_every_insert(busy_switching: None) -> None:
    from presenced.testing.mongo import MongoEmulator

    emulators = [MongoEmulator(noop_interval=None), MongoEmulator(noop_interval=None)]
    clients: list[MongoClient[dict[str, Any]]] = []
    errors: list[BaseException] = []
    try:
        for emu in emulators:
            clients.append(MongoClient(emu.start(), maxPoolSize=WRITERS_PER_EMULATOR))

        def write(client: MongoClient[dict[str, Any]], writer: int) -> None:
            try:
                coll = client.race.docs
                for n in range(INSERTS_PER_WRITER):
                    coll.insert_one({"_id": f"w{writer}-{n}"})
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(client, w))
                   for client in clients for w in range(WRITERS_PER_EMULATOR)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors

        expected = {f"w{w}-{n}" for w in range(WRITERS_PER_EMULATOR)
                    for n in range(INSERTS_PER_WRITER)}
        for client in clients:
            assert client.race.docs.count_documents({}) == len(expected)
            logged = [e["o"]["_id"] for e in client.local["oplog.rs"].find(
                {"op": "i", "ns": "race.docs"})]
            assert sorted(logged) == sorted(expected), (
                f"{len(expected - set(logged))} inserts have no oplog entry")
    finally:
        for client in clients:
            client.close()
        for emu in emulators:
            emu.stop()


def test_a_capture_is_seen_only_by_the_thread_that_installed_it() -> None:
    from presenced.testing.mongo._mongomock import Capture, CaptureSlot
    from presenced.testing.mongo.indexes import DocumentTable

    slot = CaptureSlot()
    mine = Capture(DocumentTable())
    slot.active = mine
    seen: list[Any] = []
    other = threading.Thread(target=lambda: seen.append(slot.active))
    other.start()
    other.join()
    assert seen == [None]
    assert slot.active is mine
