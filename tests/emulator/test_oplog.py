"""Conformance suite: the replica-set oplog (``local.oplog.rs``), as MongoDB 7.0 writes it.

Only pymongo's public API is used. Against a real server (``PRESENCED_TEST_MONGO_URL``) the
user needs read access to the ``local`` database. Tests marked ``emulator_only`` start their
own emulator with a tiny oplog.

Entry format (MongoDB 5.0+): ``ts`` Timestamp, ``t`` term, ``v`` 2, ``op`` i/u/d/c/n, ``ns``,
``ui`` collection UUID, ``wall`` datetime, ``o`` / ``o2``. Updates are logged as ``$v: 2``
deltas (src/mongo/db/update/document_diff_serialization.h):

- object diff: ``d`` {field: false} deletes, ``u`` {field: value} updates an existing field,
  ``i`` {field: value} inserts a new one, ``s<field>`` holds the sub-diff of a field;
- array diff (``a: true``): ``l`` new length (truncation), ``u<idx>`` element value,
  ``s<idx>`` sub-diff of an element.

The applier below is written from that format, independently of the emulator.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import pytest
from bson import Binary, Timestamp
from pymongo import CursorType, MongoClient
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import OperationFailure

Doc = dict[str, Any]

TIMEOUT = 10.0

T0 = datetime(2024, 5, 1, 12, 0, 0, 123000)
T1 = datetime(2024, 5, 1, 12, 5, 0, 456000)


# --------------------------------------------------------------------------------------------
# helpers


def oplog(client: MongoClient[Doc]) -> Collection[Doc]:
    return client.local["oplog.rs"]


def newest_ts(client: MongoClient[Doc]) -> Timestamp:
    entry = oplog(client).find_one({}, sort=[("$natural", -1)])
    assert entry is not None, "the oplog is empty"
    ts = entry["ts"]
    assert isinstance(ts, Timestamp)
    return ts


def entries_since(client: MongoClient[Doc], since: Timestamp, ns: str) -> list[Doc]:
    # The oplog's natural (insertion) order is ts order.
    return list(oplog(client).find({"ts": {"$gt": since}, "ns": ns}).sort("$natural", 1))


def apply_v2_diff(doc: Mapping[str, Any], diff: Mapping[str, Any]) -> Doc:
    """Applies a ``$v: 2`` oplog delta to ``doc`` and returns the new document."""
    return _apply_object_diff(doc, diff)


def _apply_object_diff(obj: Mapping[str, Any], diff: Mapping[str, Any]) -> Doc:
    out = dict(obj)
    for key, value in diff.items():
        if key == "d":
            for field, flag in value.items():
                assert flag is False, f"delete marker for {field!r} is {flag!r}, not false"
                assert field in out, f"diff deletes missing field {field!r}"
                del out[field]
        elif key == "u":
            for field, new in value.items():
                assert field in out, f"'u' on missing field {field!r} (should be 'i')"
                out[field] = new
        elif key == "i":
            for field, new in value.items():
                assert field not in out, f"'i' on existing field {field!r} (should be 'u')"
                out[field] = new
        elif key.startswith("s") and len(key) > 1:
            field = key[1:]
            assert field in out, f"sub-diff for missing field {field!r}"
            out[field] = _apply_sub_diff(out[field], value)
        else:
            raise AssertionError(f"unknown object-diff key {key!r} in {diff!r}")
    return out


def _apply_sub_diff(value: Any, diff: Mapping[str, Any]) -> Any:
    if diff.get("a") is True:
        assert isinstance(value, list), f"array diff applied to {value!r}"
        return _apply_array_diff(value, diff)
    assert isinstance(value, Mapping), f"object diff applied to {value!r}"
    return _apply_object_diff(value, diff)


def _apply_array_diff(arr: list[Any], diff: Mapping[str, Any]) -> list[Any]:
    out = list(arr)
    if "l" in diff:
        size = int(diff["l"])
        out = out[:size] + [None] * (size - len(out))
    for key, value in diff.items():
        if key in ("a", "l"):
            continue
        kind, index = key[:1], key[1:]
        assert kind in ("u", "s") and index.isdigit(), f"unknown array-diff key {key!r}"
        i = int(index)
        if kind == "u":
            out.extend([None] * (i + 1 - len(out)))
            out[i] = value
        else:
            assert i < len(out), f"sub-diff for missing element {i}"
            out[i] = _apply_sub_diff(out[i], value)
    return out


def session_doc() -> Doc:
    """A Rocket.Chat ``usersSessions`` document with two connections."""
    return {
        "_id": "user-1",
        "connections": [
            {"id": "conn-a", "status": "online", "_createdAt": T0, "_updatedAt": T0},
            {"id": "conn-b", "status": "online", "_createdAt": T0, "_updatedAt": T0},
        ],
    }


NEW_CONN = {"id": "conn-c", "status": "away", "_createdAt": T1, "_updatedAt": T1}

# (before, update, update_one kwargs, expected MongoDB delta)
UPDATE_CASES = [
    pytest.param(
        {"_id": 1, "a": 1, "b": "x"}, {"$set": {"a": 2}}, {}, {"u": {"a": 2}}, id="set-existing"
    ),
    pytest.param(
        {"_id": 1, "a": 1}, {"$set": {"c": "new"}}, {}, {"i": {"c": "new"}}, id="set-new-field"
    ),
    pytest.param(
        {"_id": 1, "a": 1, "b": "x"}, {"$unset": {"b": ""}}, {}, {"d": {"b": False}}, id="unset"
    ),
    pytest.param({"_id": 1, "n": 5}, {"$inc": {"n": 1}}, {}, {"u": {"n": 6}}, id="inc"),
    pytest.param(
        {"_id": 1, "profile": {"name": "a", "age": 3}},
        {"$set": {"profile.name": "b"}},
        {},
        {"sprofile": {"u": {"name": "b"}}},
        id="set-nested-field",
    ),
    pytest.param(
        session_doc(),
        {"$push": {"connections": NEW_CONN}},
        {},
        {"sconnections": {"a": True, "u2": NEW_CONN}},
        id="push-connection",
    ),
    pytest.param(
        session_doc(),
        {"$set": {"connections.$[c].status": "away"}},
        {"array_filters": [{"c.id": "conn-b"}]},
        {"sconnections": {"a": True, "s1": {"u": {"status": "away"}}}},
        id="array-filter-set-status",
    ),
    pytest.param(
        session_doc(),
        {"$pull": {"connections": {"id": "conn-a"}}},
        {},
        {"u": {"connections": session_doc()["connections"][1:]}},
        id="pull-connection",
    ),
]


def logged_update(
    client: MongoClient[Doc],
    db: Database[Doc],
    before: Doc,
    update: Any,
    kwargs: dict[str, Any],
) -> tuple[Doc, Doc]:
    """Runs ``update`` on ``before`` in ``db.c``; returns (oplog entry, document after)."""
    db.c.insert_one(before)
    since = newest_ts(client)
    result = db.c.update_one({"_id": before["_id"]}, update, **kwargs)
    assert result.modified_count == 1
    after = db.c.find_one({"_id": before["_id"]})
    assert after is not None
    entries = entries_since(client, since, f"{db.name}.c")
    assert [e["op"] for e in entries] == ["u"], entries
    return entries[0], after


# --------------------------------------------------------------------------------------------
# the collection


def test_oplog_collection_exists_in_local(client: MongoClient[Doc]) -> None:
    assert "oplog.rs" in client.local.list_collection_names()


def test_find_one_returns_an_entry(client: MongoClient[Doc], db: Database[Doc]) -> None:
    db.c.insert_one({"_id": 1})
    entry = oplog(client).find_one()
    assert entry is not None
    assert {"ts", "op", "ns"} <= set(entry)


def test_newest_entry_in_reverse_natural_order_is_the_last_write(
    client: MongoClient[Doc], db: Database[Doc]
) -> None:
    db.c.insert_one({"_id": 1})
    db.c.insert_one({"_id": 2})
    entry = oplog(client).find_one({"ns": f"{db.name}.c"}, sort=[("$natural", -1)])
    assert entry is not None
    assert entry["op"] == "i"
    assert entry["o"] == {"_id": 2}


def test_oplog_can_be_sorted_by_ts(client: MongoClient[Doc], db: Database[Doc]) -> None:
    db.c.insert_one({"_id": 1})
    db.c.insert_one({"_id": 2})
    ns = f"{db.name}.c"
    by_ts = list(oplog(client).find({"ns": ns}).sort("ts", -1))
    by_natural = list(oplog(client).find({"ns": ns}).sort("$natural", -1))
    assert [e["o"] for e in by_ts] == [{"_id": 2}, {"_id": 1}]
    assert by_ts == by_natural


# --------------------------------------------------------------------------------------------
# CRUD entries


def crud_entries(client: MongoClient[Doc], db: Database[Doc]) -> list[Doc]:
    db.create_collection("c")
    since = newest_ts(client)
    db.c.insert_one({"_id": 1, "a": 1})
    db.c.update_one({"_id": 1}, {"$set": {"a": 2}})
    db.c.replace_one({"_id": 1}, {"b": 3})
    db.c.delete_one({"_id": 1})
    return entries_since(client, since, f"{db.name}.c")


def test_insert_update_replace_delete_log_i_u_u_d(
    client: MongoClient[Doc], db: Database[Doc]
) -> None:
    entries = crud_entries(client, db)
    assert [e["op"] for e in entries] == ["i", "u", "u", "d"]
    assert {e["ns"] for e in entries} == {f"{db.name}.c"}


def test_entry_timestamps_increase(client: MongoClient[Doc], db: Database[Doc]) -> None:
    entries = crud_entries(client, db)
    stamps = [e["ts"] for e in entries]
    assert all(isinstance(ts, Timestamp) for ts in stamps)
    assert all(a < b for a, b in itertools.pairwise(stamps))


def test_entries_carry_term_version_wall_time_and_collection_uuid(
    client: MongoClient[Doc], db: Database[Doc]
) -> None:
    entries = crud_entries(client, db)
    assert entries
    uis = set()
    for entry in entries:
        assert isinstance(entry["t"], int)
        assert entry["v"] == 2
        assert isinstance(entry["wall"], datetime)
        ui = entry["ui"]
        assert isinstance(ui, uuid.UUID) or (
            isinstance(ui, Binary) and ui.subtype in (3, 4) and len(ui) == 16
        ), repr(ui)
        uis.add(bytes(ui.bytes) if isinstance(ui, uuid.UUID) else bytes(ui))
    assert len(uis) == 1  # one collection, one UUID


def test_insert_entry_o_is_the_document(client: MongoClient[Doc], db: Database[Doc]) -> None:
    insert = crud_entries(client, db)[0]
    assert insert["o"] == {"_id": 1, "a": 1}


def test_update_entry_is_a_v2_delta_keyed_by_id(
    client: MongoClient[Doc], db: Database[Doc]
) -> None:
    update = crud_entries(client, db)[1]
    assert update["o"] == {"$v": 2, "diff": {"u": {"a": 2}}}
    assert update["o2"] == {"_id": 1}


def test_replace_entry_o_is_the_whole_new_document(
    client: MongoClient[Doc], db: Database[Doc]
) -> None:
    replace = crud_entries(client, db)[2]
    assert replace["o"] == {"_id": 1, "b": 3}
    assert replace["o2"] == {"_id": 1}


def test_delete_entry_o_is_the_id(client: MongoClient[Doc], db: Database[Doc]) -> None:
    delete = crud_entries(client, db)[3]
    assert delete["o"] == {"_id": 1}


def test_update_many_logs_one_entry_per_document(
    client: MongoClient[Doc], db: Database[Doc]
) -> None:
    db.c.insert_many([{"_id": i, "g": i % 2} for i in range(6)])
    since = newest_ts(client)
    db.c.update_many({"g": 0}, {"$set": {"seen": True}})
    entries = entries_since(client, since, f"{db.name}.c")
    assert [e["op"] for e in entries] == ["u", "u", "u"]
    assert sorted(e["o2"]["_id"] for e in entries) == [0, 2, 4]


# --------------------------------------------------------------------------------------------
# $v: 2 deltas


@pytest.mark.parametrize(("before", "update", "kwargs", "expected"), UPDATE_CASES)
def test_update_delta_applied_to_the_previous_document_gives_the_new_one(
    client: MongoClient[Doc],
    db: Database[Doc],
    before: Doc,
    update: Any,
    kwargs: dict[str, Any],
    expected: Doc,
) -> None:
    entry, after = logged_update(client, db, before, update, kwargs)
    assert entry["o"]["$v"] == 2
    assert entry["o2"] == {"_id": before["_id"]}
    assert apply_v2_diff(before, entry["o"]["diff"]) == after


@pytest.mark.parametrize(("before", "update", "kwargs", "expected"), UPDATE_CASES)
def test_update_delta_has_mongodb_shape(
    client: MongoClient[Doc],
    db: Database[Doc],
    before: Doc,
    update: Any,
    kwargs: dict[str, Any],
    expected: Doc,
) -> None:
    entry, _ = logged_update(client, db, before, update, kwargs)
    assert entry["o"] == {"$v": 2, "diff": expected}


def test_noop_update_writes_no_entry(client: MongoClient[Doc], db: Database[Doc]) -> None:
    db.c.insert_one({"_id": 1, "x": 1})
    since = newest_ts(client)
    result = db.c.update_one({"_id": 1}, {"$set": {"x": 1}})
    db.c.insert_one({"_id": "sentinel"})
    entries = entries_since(client, since, f"{db.name}.c")
    assert result.matched_count == 1
    assert result.modified_count == 0
    assert [(e["op"], e["o"]) for e in entries] == [("i", {"_id": "sentinel"})]


# --------------------------------------------------------------------------------------------
# command entries


def test_create_collection_logs_a_create_command(
    client: MongoClient[Doc], db: Database[Doc]
) -> None:
    since = newest_ts(client)
    db.create_collection("c")
    entries = entries_since(client, since, f"{db.name}.$cmd")
    creates = [e for e in entries if "create" in e["o"]]
    assert len(creates) == 1, entries
    assert creates[0]["op"] == "c"
    assert creates[0]["o"]["create"] == "c"


def test_drop_collection_logs_a_drop_command(client: MongoClient[Doc], db: Database[Doc]) -> None:
    db.c.insert_one({"_id": 1})
    since = newest_ts(client)
    db.drop_collection("c")
    entries = entries_since(client, since, f"{db.name}.$cmd")
    drops = [e for e in entries if "drop" in e["o"]]
    assert len(drops) == 1, entries
    assert drops[0]["op"] == "c"
    assert drops[0]["o"] == {"drop": "c"}


# --------------------------------------------------------------------------------------------
# tailing


def test_tailable_await_cursor_yields_an_entry_written_after_it_opened(
    client: MongoClient[Doc], db: Database[Doc]
) -> None:
    ns = f"{db.name}.c"
    db.c.insert_one({"_id": 0})
    last = newest_ts(client)
    cursor = (
        oplog(client)
        .find({"ts": {"$gt": last}}, cursor_type=CursorType.TAILABLE_AWAIT)
        .max_await_time_ms(200)
    )
    caught_up = threading.Event()
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            if caught_up.wait(TIMEOUT):
                db.c.insert_one({"_id": "tailed"})
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    found: Doc | None = None
    deadline = time.monotonic() + TIMEOUT
    try:
        while found is None:
            assert time.monotonic() < deadline, "tailed entry not seen before the deadline"
            try:
                entry = cursor.next()
            except StopIteration:
                assert cursor.alive, "the tailable cursor died on an empty batch"
                caught_up.set()
                continue
            assert entry["ts"] > last
            if entry.get("ns") == ns and entry.get("op") == "i":
                found = entry
    finally:
        caught_up.set()
        cursor.close()
        thread.join(TIMEOUT)
    assert not failures
    assert found is not None
    assert found["o"] == {"_id": "tailed"}


# --------------------------------------------------------------------------------------------
# bounded oplog (emulator controls)


@pytest.mark.emulator_only
def test_oplog_is_bounded_to_oplog_size() -> None:
    from presenced.testing.mongo import MongoEmulator

    emu = MongoEmulator(oplog_size=20)
    url = emu.start()
    client: MongoClient[Doc] = MongoClient(url, serverSelectionTimeoutMS=10_000)
    try:
        coll = client.bounded.c
        for i in range(100):
            coll.insert_one({"_id": i})
        entries = list(oplog(client).find().sort("$natural", 1))
        assert 0 < len(entries) <= 20
        inserted = [e["o"]["_id"] for e in entries if e["op"] == "i"]
        assert inserted[-1] == 99
        assert 0 not in inserted
        assert inserted == list(range(inserted[0], 100))
    finally:
        client.close()
        emu.close()


@pytest.mark.emulator_only
def test_tailing_past_the_oplog_start_fails_with_capped_position_lost() -> None:
    # pymongo swallows CappedPositionLost on a tailable cursor (it only marks the cursor
    # dead), so the error code is checked with raw find/getMore commands.
    from presenced.testing.mongo import MongoEmulator

    emu = MongoEmulator(oplog_size=20)
    url = emu.start()
    client: MongoClient[Doc] = MongoClient(url, serverSelectionTimeoutMS=10_000)
    try:
        coll = client.capped.c
        coll.insert_one({"_id": 0})
        last = newest_ts(client)
        reply = client.local.command(
            "find", "oplog.rs", filter={"ts": {"$gte": last}}, tailable=True, awaitData=True
        )
        assert [e["ts"] for e in reply["cursor"]["firstBatch"]] == [last]
        cursor_id = reply["cursor"]["id"]
        for i in range(1, 101):
            coll.insert_one({"_id": i})
        with pytest.raises(OperationFailure) as info:
            client.local.command("getMore", cursor_id, collection="oplog.rs", maxTimeMS=100)
        assert info.value.code == 136  # CappedPositionLost
    finally:
        client.close()
        emu.close()


@pytest.mark.emulator_only
def test_pymongo_tailable_cursor_dies_when_its_position_is_overwritten() -> None:
    from presenced.testing.mongo import MongoEmulator

    emu = MongoEmulator(oplog_size=20)
    url = emu.start()
    client: MongoClient[Doc] = MongoClient(url, serverSelectionTimeoutMS=10_000)
    try:
        coll = client.capped.c
        coll.insert_one({"_id": 0})
        cursor = (
            oplog(client)
            .find({"ts": {"$gte": newest_ts(client)}}, cursor_type=CursorType.TAILABLE_AWAIT)
            .max_await_time_ms(100)
        )
        cursor.next()
        for i in range(1, 101):
            coll.insert_one({"_id": i})
        with pytest.raises(StopIteration):
            cursor.next()
        assert not cursor.alive
    finally:
        client.close()
        emu.close()
