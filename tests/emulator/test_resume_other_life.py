"""Resuming from a position whose history this server does not hold.

A change stream resumed from a token the server has no history for fails with 286
``ChangeStreamHistoryLost`` (change streams spec; a new replica set's oplog starts at its
"initiating set" entry, newer than any token another set issued). So does
``startAtOperationTime`` older than the oldest oplog entry. The oplog's own equivalent: a
new replica set's oldest entry is newer than any position a previous one gave out, which
is how an oplog reader (Meteor's, presenced's) tells its position is gone.

The emulator's history lives with its data: a token from an earlier emulator process (or
instance) is refused, one from the life a loaded snapshot saved keeps working, up to the
moment of that save. These need several emulator lives, so they run only on the emulator.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bson import Timestamp
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from presenced.testing import processes
from presenced.testing.mongo import MongoEmulator

pytestmark = pytest.mark.emulator_only

HISTORY_LOST = 286
AWAIT_MS = 200


def _client(url: str) -> MongoClient[dict[str, Any]]:
    return MongoClient(url, serverSelectionTimeoutMS=10_000)


def _token_after_insert(url: str, doc: dict[str, Any]) -> Any:
    """Inserts ``doc`` with a change stream open; returns the event's resume token."""
    with _client(url) as c, c.life.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        c.life.c.insert_one(doc)
        event = stream.try_next() or stream.next()
        assert event["documentKey"] == {"_id": doc["_id"]}
        return event["_id"]


def _resume_code(url: str, **kwargs: Any) -> int | None:
    """The error code of opening a change stream with ``kwargs`` (None if it opens)."""
    with _client(url) as c:
        try:
            with c.life.c.watch(max_await_time_ms=AWAIT_MS, **kwargs):
                return None
        except OperationFailure as exc:
            return exc.code


def _next_id(url: str, token: Any) -> Any:
    """The documentKey _id of the first event after ``token``."""
    with _client(url) as c, c.life.c.watch(resume_after=token, max_await_time_ms=AWAIT_MS) as s:
        event = s.try_next() or s.next()
        return event["documentKey"]["_id"]


@pytest.fixture
def emulators() -> Iterator[list[MongoEmulator]]:
    made: list[MongoEmulator] = []
    yield made
    for emu in made:
        emu.close()


def _emulator(made: list[MongoEmulator], **kwargs: Any) -> str:
    emu = MongoEmulator(**kwargs)
    made.append(emu)
    return emu.start()


# --------------------------------------------------------------------------- processes


def test_token_from_another_emulator_process_fails_with_history_lost() -> None:
    with processes.emulator() as first:
        token = _token_after_insert(first, {"_id": 1})
    with processes.emulator() as second:
        assert _resume_code(second, resume_after=token) == HISTORY_LOST
        assert _resume_code(second, start_after=token) == HISTORY_LOST


def test_token_survives_a_restart_with_a_snapshot(tmp_path: Path) -> None:
    snapshot = str(tmp_path / "data.snapshot")
    with processes.emulator("--snapshot", snapshot) as first:
        token = _token_after_insert(first, {"_id": 1})
        with _client(first) as c:
            c.life.c.insert_one({"_id": 2})
    with processes.emulator("--snapshot", snapshot) as second:
        assert _next_id(second, token) == 2


# --------------------------------------------------------------------------- in process


def test_token_resumes_on_the_same_emulator_after_a_restart(
    emulators: list[MongoEmulator],
) -> None:
    url = _emulator(emulators)
    token = _token_after_insert(url, {"_id": 1})
    with _client(url) as c:
        c.life.c.insert_one({"_id": 2})
    emulators[0].restart()
    assert _next_id(url, token) == 2


def test_token_from_another_emulator_instance_fails(emulators: list[MongoEmulator]) -> None:
    token = _token_after_insert(_emulator(emulators), {"_id": 1})
    assert _resume_code(_emulator(emulators), resume_after=token) == HISTORY_LOST


def test_token_issued_after_the_snapshot_was_saved_fails(
    emulators: list[MongoEmulator], tmp_path: Path,
) -> None:
    """The life that saved a snapshot went on; what it did after the save is not in the
    snapshot, so neither is the history its later tokens point into."""
    snapshot = tmp_path / "data.snapshot"
    url = _emulator(emulators)
    before = _token_after_insert(url, {"_id": 1})
    emulators[0].save_snapshot(snapshot)
    after = _token_after_insert(url, {"_id": 2})
    loaded = _emulator(emulators, snapshot_path=snapshot)
    assert _resume_code(loaded, resume_after=before) is None
    assert _resume_code(loaded, resume_after=after) == HISTORY_LOST


def test_snapshot_of_a_snapshot_keeps_the_first_lifes_tokens(
    emulators: list[MongoEmulator], tmp_path: Path,
) -> None:
    first, second = tmp_path / "first.snapshot", tmp_path / "second.snapshot"
    url = _emulator(emulators)
    token = _token_after_insert(url, {"_id": 1})
    emulators[0].save_snapshot(first)
    loaded = _emulator(emulators, snapshot_path=first)
    with _client(loaded) as c:
        c.life.c.insert_one({"_id": 2})
    emulators[1].save_snapshot(second)
    assert _next_id(_emulator(emulators, snapshot_path=second), token) == 2


def test_token_of_the_earlier_unbranched_layout_fails_with_history_lost(
    emulators: list[MongoEmulator],
) -> None:
    """(ts.time, ts.inc, index, kind): what emulators before the branch id issued."""
    url = _emulator(emulators)
    old = {"_data": f"{int(time.time()):08X}00000001000000"}
    assert _resume_code(url, resume_after=old) == HISTORY_LOST


def test_start_at_operation_time_before_the_replica_set_fails(
    emulators: list[MongoEmulator],
) -> None:
    url = _emulator(emulators)
    assert _resume_code(url, start_at_operation_time=Timestamp(1, 1)) == HISTORY_LOST


# --------------------------------------------------------------------------- oplog


def _oldest_entry(url: str) -> dict[str, Any]:
    with _client(url) as c:
        entry = c.local["oplog.rs"].find_one({}, sort=[("$natural", 1)])
    assert entry is not None
    return entry


def _newest_ts(url: str) -> Timestamp:
    with _client(url) as c:
        entry = c.local["oplog.rs"].find_one({}, sort=[("$natural", -1)])
    assert entry is not None
    ts: Timestamp = entry["ts"]
    return ts


def test_new_replica_set_oplog_begins_with_initiating_set(
    emulators: list[MongoEmulator],
) -> None:
    oldest = _oldest_entry(_emulator(emulators))
    assert oldest["op"] == "n"
    assert oldest["o"] == {"msg": "initiating set"}


def test_oplog_position_of_another_life_is_older_than_the_new_oldest_entry(
    emulators: list[MongoEmulator],
) -> None:
    url = _emulator(emulators)
    with _client(url) as c:
        c.life.c.insert_one({"_id": 1})
    position = _newest_ts(url)
    emulators[0].close()
    # Cluster time is (wall seconds, counter): lives within one second could interleave.
    while time.time() < position.time + 1:
        time.sleep(0.05)
    assert _oldest_entry(_emulator(emulators))["ts"] > position


def test_snapshot_keeps_the_oplog_positions_of_its_life(
    emulators: list[MongoEmulator], tmp_path: Path,
) -> None:
    snapshot = tmp_path / "data.snapshot"
    url = _emulator(emulators, snapshot_path=snapshot)
    with _client(url) as c:
        c.life.c.insert_one({"_id": 1})
    position = _newest_ts(url)
    emulators[0].close()
    assert _oldest_entry(_emulator(emulators, snapshot_path=snapshot))["ts"] <= position
