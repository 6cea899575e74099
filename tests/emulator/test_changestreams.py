"""Conformance suite: change streams, as MongoDB 7.0 documents them.

Only pymongo's public API is used, so the same tests run against the embedded emulator and,
with ``PRESENCED_TEST_MONGO_URL`` set, against a real replica set. Tests marked
``emulator_only`` use controls (restart, a tiny oplog) that only the emulator offers.

References: the manual's "Change Events" / "Change Streams" pages, the drivers' change-streams
specification (mongodb/specifications), and the server sources (src/mongo/db/update/*_node.cpp
decide how a modifier is logged, which is what ``updateDescription`` reports):

- ``$push`` appending to a non-empty array is logged per appended element
  (``ModifyResult::kArrayAppendUpdate``) -> ``updatedFields {"arr.N": value}``;
- ``$pull`` (``ArrayCullingNode``) is a ``kNormalUpdate`` -> the whole array in updatedFields;
- a positional ``$set`` of an element's field -> ``updatedFields {"arr.I.field": value}``;
- ``fullDocument: "required"`` with no post-image fails with NoMatchingDocument (47);
- resuming from a point no longer in the oplog fails with ChangeStreamHistoryLost (286);
- a pipeline that modifies ``_id`` fails with ChangeStreamFatalError (280).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

import pytest
from bson import Timestamp
from pymongo import MongoClient, monitoring
from pymongo.change_stream import ChangeStream
from pymongo.database import Database
from pymongo.errors import OperationFailure

Doc = dict[str, Any]
Stream = ChangeStream[Doc]

TIMEOUT = 10.0  # seconds: upper bound for any expected event to show up
AWAIT_MS = 200  # maxAwaitTimeMS used by streams in this suite

# Fixed instants with millisecond precision (BSON dates are milliseconds).
T0 = datetime(2024, 5, 1, 12, 0, 0, 123000)
T1 = datetime(2024, 5, 1, 12, 5, 0, 456000)


# --------------------------------------------------------------------------------------------
# helpers


def next_events(stream: Stream, n: int, timeout: float = TIMEOUT) -> list[Doc]:
    """The next ``n`` events of ``stream``; fails if they do not arrive before ``timeout``."""
    events: list[Doc] = []
    deadline = time.monotonic() + timeout
    while len(events) < n:
        if time.monotonic() > deadline:
            pytest.fail(f"only {len(events)} of {n} events before the deadline: {events!r}")
        if not stream.alive:
            pytest.fail(f"stream closed after {len(events)} of {n} events: {events!r}")
        event = stream.try_next()
        if event is not None:
            events.append(event)
    return events


def events_until(
    stream: Stream, last: Callable[[Doc], bool], timeout: float = TIMEOUT
) -> list[Doc]:
    """Events of ``stream`` up to and including the first one for which ``last`` is true."""
    events: list[Doc] = []
    deadline = time.monotonic() + timeout
    while True:
        if time.monotonic() > deadline:
            pytest.fail(f"terminating event not seen before the deadline; got {events!r}")
        if not stream.alive:
            pytest.fail(f"stream closed before the terminating event; got {events!r}")
        event = stream.try_next()
        if event is None:
            continue
        events.append(event)
        if last(event):
            return events


def is_insert_of(doc_id: Any) -> Callable[[Doc], bool]:
    def check(event: Doc) -> bool:
        return event.get("operationType") == "insert" and event["documentKey"]["_id"] == doc_id

    return check


def until_sentinel(stream: Stream, sentinel_id: Any = "sentinel") -> list[Doc]:
    """Events before the insert of ``sentinel_id`` (which the caller writes last).

    Writing a sentinel and reading up to it proves that nothing else was delivered in between,
    without waiting for an arbitrary time.
    """
    return events_until(stream, is_insert_of(sentinel_id))[:-1]


def summary(events: list[Doc]) -> list[tuple[str, Any]]:
    return [(e["operationType"], e.get("documentKey", {}).get("_id")) for e in events]


def session_doc() -> Doc:
    """A Rocket.Chat ``usersSessions`` document with two connections."""
    return {
        "_id": "user-1",
        "connections": [
            {
                "id": "conn-a",
                "instanceId": "inst-1",
                "status": "online",
                "_createdAt": T0,
                "_updatedAt": T0,
            },
            {
                "id": "conn-b",
                "instanceId": "inst-1",
                "status": "online",
                "_createdAt": T0,
                "_updatedAt": T0,
            },
        ],
    }


def update_event_after(db: Database[Doc], write: Callable[[], Any]) -> Doc:
    """Seeds ``db.sessions`` with ``session_doc()``, runs ``write`` under a stream, returns
    the single update event it produced."""
    db.sessions.insert_one(session_doc())
    with db.sessions.watch(max_await_time_ms=AWAIT_MS) as stream:
        write()
        db.sessions.insert_one({"_id": "sentinel"})
        events = until_sentinel(stream)
    assert [e["operationType"] for e in events] == ["update"], summary(events)
    return events[0]


# --------------------------------------------------------------------------------------------
# insert / update / replace / delete events


def test_insert_event_carries_document_key_namespace_and_full_document(
    db: Database[Doc],
) -> None:
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        db.c.insert_one({"_id": 1, "name": "alice", "n": 5})
        (event,) = next_events(stream, 1)
    assert event["operationType"] == "insert"
    assert event["ns"] == {"db": db.name, "coll": "c"}
    assert event["documentKey"] == {"_id": 1}
    assert event["fullDocument"] == {"_id": 1, "name": "alice", "n": 5}


def test_event_times_are_a_bson_timestamp_and_a_datetime(db: Database[Doc]) -> None:
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        db.c.insert_one({"_id": 1})
        (event,) = next_events(stream, 1)
    assert isinstance(event["clusterTime"], Timestamp)
    assert isinstance(event["wallTime"], datetime)


def test_event_id_is_a_resume_token_document(db: Database[Doc]) -> None:
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        db.c.insert_one({"_id": 1})
        (event,) = next_events(stream, 1)
    assert isinstance(event["_id"], Mapping)
    assert isinstance(event["_id"]["_data"], str)


def test_update_reports_set_fields_and_removed_fields(db: Database[Doc]) -> None:
    db.c.insert_one({"_id": 1, "a": 1, "gone": True, "keep": "x"})
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        db.c.update_one({"_id": 1}, {"$set": {"a": 2, "b": "new"}, "$unset": {"gone": ""}})
        (event,) = next_events(stream, 1)
    assert event["operationType"] == "update"
    assert event["documentKey"] == {"_id": 1}
    desc = event["updateDescription"]
    assert desc["updatedFields"] == {"a": 2, "b": "new"}
    assert desc["removedFields"] == ["gone"]
    assert desc["truncatedArrays"] == []


def test_update_with_inc_reports_the_new_value(db: Database[Doc]) -> None:
    db.c.insert_one({"_id": 1, "n": 5})
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        db.c.update_one({"_id": 1}, {"$inc": {"n": 2}})
        (event,) = next_events(stream, 1)
    assert event["updateDescription"]["updatedFields"] == {"n": 7}


def test_push_onto_existing_array_reports_the_appended_index(db: Database[Doc]) -> None:
    conn = {"id": "conn-c", "instanceId": "inst-2", "status": "away", "_createdAt": T1}
    event = update_event_after(
        db, lambda: db.sessions.update_one({"_id": "user-1"}, {"$push": {"connections": conn}})
    )
    desc = event["updateDescription"]
    assert desc["updatedFields"] == {"connections.2": conn}
    assert desc["removedFields"] == []
    assert desc["truncatedArrays"] == []


def test_positional_set_reports_the_element_fields(db: Database[Doc]) -> None:
    event = update_event_after(
        db,
        lambda: db.sessions.update_one(
            {"_id": "user-1", "connections.id": "conn-b"},
            {"$set": {"connections.$.status": "away", "connections.$._updatedAt": T1}},
        ),
    )
    assert event["updateDescription"]["updatedFields"] == {
        "connections.1.status": "away",
        "connections.1._updatedAt": T1,
    }


def test_array_filter_set_reports_the_element_fields(db: Database[Doc]) -> None:
    event = update_event_after(
        db,
        lambda: db.sessions.update_one(
            {"_id": "user-1"},
            {"$set": {"connections.$[c].status": "busy", "connections.$[c]._updatedAt": T1}},
            array_filters=[{"c.id": "conn-b"}],
        ),
    )
    assert event["updateDescription"]["updatedFields"] == {
        "connections.1.status": "busy",
        "connections.1._updatedAt": T1,
    }


def test_pull_reports_the_whole_remaining_array(db: Database[Doc]) -> None:
    event = update_event_after(
        db,
        lambda: db.sessions.update_one(
            {"_id": "user-1"}, {"$pull": {"connections": {"id": "conn-a"}}}
        ),
    )
    remaining = session_doc()["connections"][1:]
    desc = event["updateDescription"]
    assert desc["updatedFields"] == {"connections": remaining}
    assert desc["removedFields"] == []


def test_pipeline_update_that_shortens_an_array_reports_truncated_arrays(
    db: Database[Doc],
) -> None:
    # A large unchanged field keeps the computed delta smaller than the document, so the
    # server logs a $v:2 diff (array resize) rather than a full replacement.
    db.c.insert_one({"_id": 1, "arr": [1, 2, 3, 4, 5], "padding": "p" * 512})
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        db.c.update_one({"_id": 1}, [{"$set": {"arr": {"$slice": ["$arr", 2]}}}])
        (event,) = next_events(stream, 1)
    assert event["operationType"] == "update"
    desc = event["updateDescription"]
    assert desc["truncatedArrays"] == [{"field": "arr", "newSize": 2}]
    assert desc["updatedFields"] == {}
    assert desc["removedFields"] == []


def test_replace_event_carries_the_new_document(db: Database[Doc]) -> None:
    db.c.insert_one({"_id": 1, "a": 1})
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        db.c.replace_one({"_id": 1}, {"b": 2})
        (event,) = next_events(stream, 1)
    assert event["operationType"] == "replace"
    assert event["documentKey"] == {"_id": 1}
    assert event["fullDocument"] == {"_id": 1, "b": 2}
    assert "updateDescription" not in event


def test_delete_event_has_document_key_and_no_full_document(db: Database[Doc]) -> None:
    db.c.insert_one({"_id": 1, "a": 1})
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        db.c.delete_one({"_id": 1})
        (event,) = next_events(stream, 1)
    assert event["operationType"] == "delete"
    assert event["ns"] == {"db": db.name, "coll": "c"}
    assert event["documentKey"] == {"_id": 1}
    assert "fullDocument" not in event


# --------------------------------------------------------------------------------------------
# fullDocument / fullDocumentBeforeChange


def test_default_full_document_omits_it_on_update(db: Database[Doc]) -> None:
    db.c.insert_one({"_id": 1, "x": 0})
    with db.c.watch(full_document="default", max_await_time_ms=AWAIT_MS) as stream:
        db.c.update_one({"_id": 1}, {"$set": {"x": 1}})
        (event,) = next_events(stream, 1)
    assert event["operationType"] == "update"
    assert "fullDocument" not in event


def test_update_lookup_returns_the_current_document(db: Database[Doc]) -> None:
    # The lookup happens when the event is read, so both events see the latest version.
    db.c.insert_one({"_id": 1, "x": 0})
    with db.c.watch(full_document="updateLookup", max_await_time_ms=AWAIT_MS) as stream:
        db.c.update_one({"_id": 1}, {"$set": {"x": 1}})
        db.c.update_one({"_id": 1}, {"$set": {"x": 2}})
        first, second = next_events(stream, 2)
    assert first["fullDocument"] == {"_id": 1, "x": 2}
    assert second["fullDocument"] == {"_id": 1, "x": 2}


def test_update_lookup_of_a_since_deleted_document_is_null(db: Database[Doc]) -> None:
    db.c.insert_one({"_id": 1, "x": 0})
    with db.c.watch(full_document="updateLookup", max_await_time_ms=AWAIT_MS) as stream:
        db.c.update_one({"_id": 1}, {"$set": {"x": 1}})
        db.c.delete_one({"_id": 1})
        update, delete = next_events(stream, 2)
    assert update["operationType"] == "update"
    assert "fullDocument" in update
    assert update["fullDocument"] is None
    assert delete["operationType"] == "delete"


def test_when_available_gives_the_post_image_of_each_update(db: Database[Doc]) -> None:
    db.create_collection("c", changeStreamPreAndPostImages={"enabled": True})
    db.c.insert_one({"_id": 1, "x": 0})
    with db.c.watch(full_document="whenAvailable", max_await_time_ms=AWAIT_MS) as stream:
        db.c.update_one({"_id": 1}, {"$set": {"x": 1}})
        db.c.update_one({"_id": 1}, {"$set": {"x": 2}})
        first, second = next_events(stream, 2)
    # Unlike updateLookup, each event carries the document as of that update.
    assert first["fullDocument"] == {"_id": 1, "x": 1}
    assert second["fullDocument"] == {"_id": 1, "x": 2}


def test_required_gives_the_post_image_when_enabled(db: Database[Doc]) -> None:
    db.create_collection("c", changeStreamPreAndPostImages={"enabled": True})
    db.c.insert_one({"_id": 1, "x": 0})
    with db.c.watch(full_document="required", max_await_time_ms=AWAIT_MS) as stream:
        db.c.update_one({"_id": 1}, {"$set": {"x": 1}})
        db.c.update_one({"_id": 1}, {"$set": {"x": 2}})
        first, second = next_events(stream, 2)
    assert first["fullDocument"] == {"_id": 1, "x": 1}
    assert second["fullDocument"] == {"_id": 1, "x": 2}


def test_when_available_without_post_images_gives_null(db: Database[Doc]) -> None:
    db.c.insert_one({"_id": 1, "x": 0})
    with db.c.watch(full_document="whenAvailable", max_await_time_ms=AWAIT_MS) as stream:
        db.c.update_one({"_id": 1}, {"$set": {"x": 1}})
        (event,) = next_events(stream, 1)
    assert event["operationType"] == "update"
    assert event.get("fullDocument") is None


def test_required_without_post_images_fails_with_no_matching_document(
    db: Database[Doc],
) -> None:
    db.c.insert_one({"_id": 1, "x": 0})
    with db.c.watch(full_document="required", max_await_time_ms=AWAIT_MS) as stream:
        db.c.update_one({"_id": 1}, {"$set": {"x": 1}})
        deadline = time.monotonic() + TIMEOUT
        with pytest.raises(OperationFailure) as info:
            while time.monotonic() < deadline:
                stream.try_next()
    assert info.value.code == 47  # NoMatchingDocument


def test_before_change_required_gives_the_pre_image(db: Database[Doc]) -> None:
    db.create_collection("c", changeStreamPreAndPostImages={"enabled": True})
    db.c.insert_one({"_id": 1, "x": 0})
    with db.c.watch(full_document_before_change="required", max_await_time_ms=AWAIT_MS) as stream:
        db.c.update_one({"_id": 1}, {"$set": {"x": 1}})
        db.c.delete_one({"_id": 1})
        update, delete = next_events(stream, 2)
    assert update["fullDocumentBeforeChange"] == {"_id": 1, "x": 0}
    assert delete["fullDocumentBeforeChange"] == {"_id": 1, "x": 1}


# --------------------------------------------------------------------------------------------
# drop, dropDatabase, invalidate


def test_dropping_the_watched_collection_emits_drop_then_invalidate(db: Database[Doc]) -> None:
    db.c.insert_one({"_id": 1})
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        db.drop_collection("c")
        drop, invalidate = next_events(stream, 2)
    assert drop["operationType"] == "drop"
    assert drop["ns"] == {"db": db.name, "coll": "c"}
    assert invalidate["operationType"] == "invalidate"
    assert isinstance(invalidate["clusterTime"], Timestamp)


def test_stream_is_closed_after_invalidate(db: Database[Doc]) -> None:
    db.c.insert_one({"_id": 1})
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        db.drop_collection("c")
        events = events_until(stream, lambda e: e["operationType"] == "invalidate")
        assert events[-1]["operationType"] == "invalidate"
        assert stream.alive is False
        assert stream.try_next() is None
        with pytest.raises(StopIteration):
            stream.next()


def test_drop_database_on_a_database_stream_emits_drop_drop_database_invalidate(
    db: Database[Doc],
) -> None:
    db.a.insert_one({"_id": 1})
    with db.watch(max_await_time_ms=AWAIT_MS) as stream:
        db.client.drop_database(db.name)
        events = events_until(stream, lambda e: e["operationType"] == "invalidate")
        alive = stream.alive
    assert [e["operationType"] for e in events] == ["drop", "dropDatabase", "invalidate"]
    assert events[0]["ns"] == {"db": db.name, "coll": "a"}
    assert events[1]["ns"] == {"db": db.name}
    assert alive is False


def test_collection_drop_does_not_invalidate_a_database_stream(db: Database[Doc]) -> None:
    db.a.insert_one({"_id": 1})
    with db.watch(max_await_time_ms=AWAIT_MS) as stream:
        db.drop_collection("a")
        db.b.insert_one({"_id": "sentinel"})
        events = until_sentinel(stream)
        alive = stream.alive
    assert [e["operationType"] for e in events] == ["drop"]
    assert alive is True


# --------------------------------------------------------------------------------------------
# scope: collection, database, cluster


def test_collection_stream_ignores_other_collections_and_databases(
    client: MongoClient[Doc], db: Database[Doc]
) -> None:
    other_db = client[db.name + "_x"]
    try:
        with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
            db.other.insert_one({"_id": "other-coll"})
            other_db.c.insert_one({"_id": "other-db"})  # same collection name, other database
            db.c.insert_one({"_id": "mine"})
            (event,) = next_events(stream, 1)
            db.c.insert_one({"_id": "sentinel"})
            rest = until_sentinel(stream)
    finally:
        client.drop_database(other_db.name)
    assert summary([event]) == [("insert", "mine")]
    assert rest == []


def test_database_stream_match_on_ns_coll_selects_collections(db: Database[Doc]) -> None:
    pipeline = [{"$match": {"ns.coll": {"$in": ["a", "b", "z"]}}}]
    with db.watch(pipeline, max_await_time_ms=AWAIT_MS) as stream:
        db.a.insert_one({"_id": 1})
        db.c.insert_one({"_id": 2})
        db.b.insert_one({"_id": 3})
        db.c.insert_one({"_id": 4})
        db.z.insert_one({"_id": "sentinel"})
        events = until_sentinel(stream)
    assert [(e["ns"]["coll"], e["documentKey"]["_id"]) for e in events] == [("a", 1), ("b", 3)]


def test_cluster_stream_sees_every_database(client: MongoClient[Doc], db: Database[Doc]) -> None:
    other_db = client[db.name + "_y"]
    pipeline = [{"$match": {"ns.db": {"$in": [db.name, other_db.name]}}}]
    try:
        with client.watch(pipeline, max_await_time_ms=AWAIT_MS) as stream:
            db.a.insert_one({"_id": 1})
            other_db.b.insert_one({"_id": 2})
            db.a.insert_one({"_id": "sentinel"})
            events = until_sentinel(stream)
    finally:
        client.drop_database(other_db.name)
    assert [(e["ns"], e["documentKey"]["_id"]) for e in events] == [
        ({"db": db.name, "coll": "a"}, 1),
        ({"db": other_db.name, "coll": "b"}, 2),
    ]


# --------------------------------------------------------------------------------------------
# ordering


def test_events_follow_write_order(db: Database[Doc]) -> None:
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        db.c.insert_one({"_id": 1})
        db.c.insert_one({"_id": 2})
        db.c.update_one({"_id": 1}, {"$set": {"x": 1}})
        db.c.delete_one({"_id": 2})
        db.c.replace_one({"_id": 1}, {"y": 1})
        db.c.insert_one({"_id": 3})
        events = next_events(stream, 6)
    assert summary(events) == [
        ("insert", 1),
        ("insert", 2),
        ("update", 1),
        ("delete", 2),
        ("replace", 1),
        ("insert", 3),
    ]
    times = [e["clusterTime"] for e in events]
    assert times == sorted(times)


def test_update_many_emits_one_event_per_document(db: Database[Doc]) -> None:
    db.c.insert_many([{"_id": i, "g": i % 2} for i in range(6)])
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        result = db.c.update_many({"g": 0}, {"$set": {"seen": True}})
        db.c.insert_one({"_id": "sentinel"})
        events = until_sentinel(stream)
    assert result.modified_count == 3
    assert [e["operationType"] for e in events] == ["update"] * 3
    assert sorted(e["documentKey"]["_id"] for e in events) == [0, 2, 4]
    assert all(e["updateDescription"]["updatedFields"] == {"seen": True} for e in events)


# --------------------------------------------------------------------------------------------
# user pipeline stages


def test_match_on_operation_type_filters_events(db: Database[Doc]) -> None:
    pipeline = [{"$match": {"operationType": {"$in": ["update", "delete"]}}}]
    with db.c.watch(pipeline, max_await_time_ms=AWAIT_MS) as stream:
        db.c.insert_one({"_id": 1})
        db.c.update_one({"_id": 1}, {"$set": {"x": 1}})
        db.c.insert_one({"_id": 2})
        db.c.delete_one({"_id": 1})
        events = next_events(stream, 2)
        db.c.update_one({"_id": 2}, {"$set": {"last": True}})
        (last,) = next_events(stream, 1)
    assert summary(events) == [("update", 1), ("delete", 1)]
    assert summary([last]) == [("update", 2)]


def test_project_removes_fields_and_keeps_the_resume_token(db: Database[Doc]) -> None:
    pipeline = [{"$project": {"fullDocument": 0, "ns": 0}}]
    with db.c.watch(pipeline, max_await_time_ms=AWAIT_MS) as stream:
        db.c.insert_one({"_id": 1, "secret": "s"})
        (event,) = next_events(stream, 1)
    assert "fullDocument" not in event
    assert "ns" not in event
    assert event["operationType"] == "insert"
    assert event["documentKey"] == {"_id": 1}
    assert isinstance(event["_id"], Mapping)
    assert "_data" in event["_id"]


def test_projecting_out_the_resume_token_fails(db: Database[Doc]) -> None:
    with db.c.watch([{"$project": {"_id": 0}}], max_await_time_ms=AWAIT_MS) as stream:
        db.c.insert_one({"_id": 1})
        deadline = time.monotonic() + TIMEOUT
        with pytest.raises(OperationFailure) as info:
            while time.monotonic() < deadline:
                stream.try_next()
    assert info.value.code == 280  # ChangeStreamFatalError


# --------------------------------------------------------------------------------------------
# resuming


def test_resume_after_returns_exactly_the_following_events(db: Database[Doc]) -> None:
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        for i in range(5):
            db.c.insert_one({"_id": i})
        events = next_events(stream, 5)
    token = events[1]["_id"]
    with db.c.watch(resume_after=token, max_await_time_ms=AWAIT_MS) as resumed:
        db.c.insert_one({"_id": "sentinel"})
        after = until_sentinel(resumed)
    assert summary(after) == [("insert", 2), ("insert", 3), ("insert", 4)]
    assert [e["_id"] for e in after] == [e["_id"] for e in events[2:]]


def test_start_after_an_invalidate_token_continues_past_the_drop(db: Database[Doc]) -> None:
    db.c.insert_one({"_id": 1})
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        db.drop_collection("c")
        invalidate = events_until(stream, lambda e: e["operationType"] == "invalidate")[-1]
    db.c.insert_one({"_id": "recreated"})
    with db.c.watch(start_after=invalidate["_id"], max_await_time_ms=AWAIT_MS) as stream:
        db.c.insert_one({"_id": "sentinel"})
        events = until_sentinel(stream)
    assert summary(events) == [("insert", "recreated")]


def test_resume_after_an_invalidate_token_is_rejected(db: Database[Doc]) -> None:
    db.c.insert_one({"_id": 1})
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        db.drop_collection("c")
        invalidate = events_until(stream, lambda e: e["operationType"] == "invalidate")[-1]
    with (
        pytest.raises(OperationFailure),
        db.c.watch(resume_after=invalidate["_id"], max_await_time_ms=AWAIT_MS) as stream,
    ):
        stream.try_next()


def test_start_at_operation_time_includes_the_event_at_that_time(db: Database[Doc]) -> None:
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        for i in range(4):
            db.c.insert_one({"_id": i})
        events = next_events(stream, 4)
    at = events[2]["clusterTime"]
    with db.c.watch(start_at_operation_time=at, max_await_time_ms=AWAIT_MS) as stream:
        db.c.insert_one({"_id": "sentinel"})
        after = until_sentinel(stream)
    assert summary(after) == [("insert", 2), ("insert", 3)]


def test_resume_token_advances_without_events(db: Database[Doc]) -> None:
    """postBatchResumeToken: an empty getMore still moves the cached resume token."""
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        initial = stream.resume_token
        db.unwatched.insert_one({"_id": 1})  # advances the oplog, not this stream
        deadline = time.monotonic() + TIMEOUT
        while stream.resume_token == initial and time.monotonic() < deadline:
            assert stream.try_next() is None
        advanced = stream.resume_token
    assert initial is not None
    assert advanced is not None
    assert advanced != initial


def test_resuming_from_an_advanced_token_skips_earlier_events(db: Database[Doc]) -> None:
    db.c.insert_one({"_id": "before"})
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        db.c.insert_one({"_id": "seen"})
        next_events(stream, 1)
        db.unwatched.insert_one({"_id": 1})
        token = stream.resume_token
        deadline = time.monotonic() + TIMEOUT
        while stream.resume_token == token and time.monotonic() < deadline:
            assert stream.try_next() is None
        token = stream.resume_token
    with db.c.watch(resume_after=token, max_await_time_ms=AWAIT_MS) as stream:
        db.c.insert_one({"_id": "sentinel"})
        assert until_sentinel(stream) == []


@pytest.mark.emulator_only
def test_stream_resumes_across_an_emulator_restart(emulator: Any, db: Database[Doc]) -> None:
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        db.c.insert_one({"_id": 1})
        assert summary(next_events(stream, 1)) == [("insert", 1)]
        db.c.insert_one({"_id": 2})  # written before the restart, not read yet
        emulator.stop()
        emulator.start()
        db.c.insert_one({"_id": 3})
        db.c.insert_one({"_id": "sentinel"})
        events = events_until(stream, is_insert_of("sentinel"), timeout=30)
    assert summary(events) == [("insert", 2), ("insert", 3), ("insert", "sentinel")]


@pytest.mark.emulator_only
def test_resuming_from_a_token_older_than_the_oplog_fails_with_history_lost() -> None:
    from presenced.testing.mongo import MongoEmulator

    emu = MongoEmulator(oplog_size=20)
    url = emu.start()
    client: MongoClient[Doc] = MongoClient(url, serverSelectionTimeoutMS=10_000)
    try:
        coll = client.hist.c
        with coll.watch(max_await_time_ms=AWAIT_MS) as stream:
            coll.insert_one({"_id": 0})
            (event,) = next_events(stream, 1)
        for i in range(1, 101):
            coll.insert_one({"_id": i})
        with (
            pytest.raises(OperationFailure) as info,
            coll.watch(resume_after=event["_id"], max_await_time_ms=AWAIT_MS) as stale,
        ):
            stale.try_next()
        assert info.value.code == 286  # ChangeStreamHistoryLost
    finally:
        client.close()
        emu.close()


# --------------------------------------------------------------------------------------------
# awaitData (maxAwaitTimeMS)


class GetMoreStarted(monitoring.CommandListener):
    """Sets ``event`` when a getMore command is sent."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "getMore":
            self.event.set()

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
def listened(mongo_url: str) -> Iterator[tuple[MongoClient[Doc], GetMoreStarted]]:
    listener = GetMoreStarted()
    c: MongoClient[Doc] = MongoClient(
        mongo_url, serverSelectionTimeoutMS=10_000, event_listeners=[listener]
    )
    yield c, listener
    c.close()


def test_get_more_returns_an_event_written_while_it_waits(
    listened: tuple[MongoClient[Doc], GetMoreStarted], db: Database[Doc]
) -> None:
    client, getmore_sent = listened
    coll = client[db.name].c
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            if getmore_sent.event.wait(TIMEOUT):
                db.c.insert_one({"_id": "late"})
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    with coll.watch(max_await_time_ms=5_000) as stream:
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        started = time.monotonic()
        event = stream.next()  # blocks in getMore until the writer's insert arrives
        elapsed = time.monotonic() - started
        thread.join(TIMEOUT)
    assert not failures
    assert summary([event]) == [("insert", "late")]
    # Woken by the write, not by the 5 s await timeout.
    assert elapsed < 4.0


def test_idle_get_more_waits_for_max_await_time(db: Database[Doc]) -> None:
    with db.c.watch(max_await_time_ms=500) as stream:
        started = time.monotonic()
        change = stream.try_next()
        elapsed = time.monotonic() - started
    assert change is None
    assert elapsed >= 0.4
    assert elapsed < 5.0
