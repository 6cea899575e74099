"""Command conformance (MongoDB 7.0 reply shapes and error codes).

Everything here goes through pymongo's public API, so it runs unchanged against a real
replica set. Error codes: 11000 DuplicateKey, 2 BadValue,
27 IndexNotFound, 43 CursorNotFound, 48 NamespaceExists, 59 CommandNotFound,
72 InvalidOptions.
"""

from __future__ import annotations

import datetime
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import bson
import pytest
from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, MongoClient, ReturnDocument, monitoring
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import (
    BulkWriteError,
    CursorNotFound,
    DuplicateKeyError,
    OperationFailure,
    WriteError,
)

# --------------------------------------------------------------------------- helpers


class Events(monitoring.CommandListener):
    """Records command monitoring events (pymongo public API)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started_events: list[monitoring.CommandStartedEvent] = []
        self.succeeded_events: list[monitoring.CommandSucceededEvent] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        with self.lock:
            self.started_events.append(event)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        with self.lock:
            self.succeeded_events.append(event)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def names(self) -> list[str]:
        with self.lock:
            return [e.command_name for e in self.started_events]


@pytest.fixture
def events(mongo_url: str) -> Iterator[tuple[Events, MongoClient[dict[str, Any]]]]:
    listener = Events()
    c: MongoClient[dict[str, Any]] = MongoClient(
        mongo_url, serverSelectionTimeoutMS=10_000, event_listeners=[listener]
    )
    yield listener, c
    c.close()


def server_status(client: MongoClient[Any]) -> dict[str, Any]:
    return client.admin.command("serverStatus")


def found(coll: Collection[Any], doc_id: Any) -> dict[str, Any]:
    """The document with this ``_id``; fails the test when there is none."""
    doc: dict[str, Any] | None = coll.find_one({"_id": doc_id})
    assert doc is not None, f"no document {doc_id!r} in {coll.full_name}"
    return doc


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def ms(dt: datetime.datetime) -> datetime.datetime:
    """BSON dates have millisecond precision."""
    return dt.replace(microsecond=dt.microsecond // 1000 * 1000)


# --------------------------------------------------------------------------- basics


def test_ping(client: MongoClient[Any]) -> None:
    assert client.admin.command("ping")["ok"] == 1.0


def test_build_info_version_is_7_0(client: MongoClient[Any]) -> None:
    info = client.admin.command("buildInfo")
    assert info["ok"] == 1.0
    assert info["version"].startswith("7.0")
    assert info["versionArray"][:2] == [7, 0]
    assert info["maxBsonObjectSize"] == 16 * 1024 * 1024


def test_unknown_command_is_command_not_found(db: Database[Any]) -> None:
    with pytest.raises(OperationFailure) as exc:
        db.command("definitelyNotACommand")
    assert exc.value.code == 59
    assert exc.value.details is not None
    assert exc.value.details["codeName"] == "CommandNotFound"
    assert exc.value.details["ok"] == 0


# --------------------------------------------------------------------------- serverStatus


def test_server_status_has_opcounters(client: MongoClient[Any]) -> None:
    counters = server_status(client)["opcounters"]
    for name in ("insert", "query", "update", "delete", "getmore", "command"):
        assert isinstance(counters[name], int), name


def _do_inserts(coll: Collection[Any]) -> None:
    for i in range(3):
        coll.insert_one({"i": i})


def _do_queries(coll: Collection[Any]) -> None:
    for _ in range(3):
        coll.find_one({})


def _do_updates(coll: Collection[Any]) -> None:
    for _ in range(3):
        coll.update_one({}, {"$inc": {"n": 1}}, upsert=True)


def _do_deletes(coll: Collection[Any]) -> None:
    for _ in range(3):
        coll.delete_one({"nope": 1})


def _do_getmores(coll: Collection[Any]) -> None:
    coll.insert_many([{"i": i} for i in range(8)])
    assert len(list(coll.find({}, batch_size=2))) == 8


def _do_commands(coll: Collection[Any]) -> None:
    for _ in range(3):
        coll.database.command("ping")


@pytest.mark.parametrize(
    ("counter", "action"),
    [
        ("insert", _do_inserts),
        ("query", _do_queries),
        ("update", _do_updates),
        ("delete", _do_deletes),
        ("getmore", _do_getmores),
        ("command", _do_commands),
    ],
)
def test_opcounter_increases_after_matching_operations(
    client: MongoClient[Any], db: Database[Any], counter: str, action: Callable[..., None]
) -> None:
    before = server_status(client)["opcounters"][counter]
    action(db.ops)
    after = server_status(client)["opcounters"][counter]
    assert after >= before + 3


def test_server_status_connections_current(client: MongoClient[Any]) -> None:
    conns = server_status(client)["connections"]
    assert conns["current"] >= 1
    assert conns["totalCreated"] >= conns["current"]


def test_server_status_connections_current_grows_with_a_new_client(
    client: MongoClient[Any], mongo_url: str
) -> None:
    before = server_status(client)["connections"]["current"]
    other: MongoClient[Any] = MongoClient(mongo_url, serverSelectionTimeoutMS=10_000)
    try:
        other.admin.command("ping")
        after = server_status(client)["connections"]["current"]
        assert after > before
    finally:
        other.close()


# --------------------------------------------------------------------------- catalog


def test_list_databases_includes_database_after_first_write(
    client: MongoClient[Any], db: Database[Any]
) -> None:
    assert db.name not in client.list_database_names()
    db.c.insert_one({"x": 1})
    reply = client.admin.command("listDatabases")
    assert reply["ok"] == 1.0
    entry = next(d for d in reply["databases"] if d["name"] == db.name)
    assert entry["empty"] is False
    assert "sizeOnDisk" in entry
    assert "totalSize" in reply


def test_list_databases_name_only(client: MongoClient[Any], db: Database[Any]) -> None:
    db.c.insert_one({"x": 1})
    reply = client.admin.command("listDatabases", nameOnly=True)
    names = [d["name"] for d in reply["databases"]]
    assert db.name in names
    assert all(set(d) == {"name"} for d in reply["databases"])


def test_list_databases_includes_admin_and_local(client: MongoClient[Any]) -> None:
    names = client.list_database_names()
    assert "admin" in names
    assert "local" in names


def test_list_collections_reports_name_and_type(db: Database[Any]) -> None:
    db.alpha.insert_one({})
    db.beta.insert_one({})
    infos = {c["name"]: c for c in db.list_collections()}
    assert {"alpha", "beta"} <= set(infos)
    alpha = infos["alpha"]
    assert alpha["type"] == "collection"
    assert alpha["options"] == {}
    assert alpha["info"]["readOnly"] is False
    assert "uuid" in alpha["info"]
    assert alpha["idIndex"]["key"] == {"_id": 1}
    assert alpha["idIndex"]["name"] == "_id_"


def test_list_collections_filter_by_name(db: Database[Any]) -> None:
    db.alpha.insert_one({})
    db.beta.insert_one({})
    assert [c["name"] for c in db.list_collections(filter={"name": "beta"})] == ["beta"]
    assert db.list_collection_names(filter={"name": "gamma"}) == []


def test_create_then_listed(db: Database[Any]) -> None:
    reply = db.command("create", "made")
    assert reply["ok"] == 1.0
    assert "made" in db.list_collection_names()


def test_create_capped_options_are_listed(db: Database[Any]) -> None:
    db.command("create", "cap", capped=True, size=1024 * 1024, max=100)
    info = next(db.list_collections(filter={"name": "cap"}))
    assert info["options"]["capped"] is True
    assert info["options"]["size"] == 1024 * 1024
    assert info["options"]["max"] == 100
    assert db.cap.options()["capped"] is True


def test_capped_collection_with_max_keeps_newest_documents(db: Database[Any]) -> None:
    db.command("create", "cap", capped=True, size=4096, max=3)
    for i in range(5):
        db.cap.insert_one({"_id": i})
    assert [d["_id"] for d in db.cap.find()] == [2, 3, 4]


def test_create_existing_collection_with_same_options_is_a_noop(db: Database[Any]) -> None:
    """MongoDB 7.0 made ``create`` idempotent when the options match (SERVER-74062 era)."""
    db.command("create", "dup")
    reply = db.command("create", "dup")
    assert reply["ok"] == 1.0


def test_create_existing_collection_with_other_options_is_namespace_exists(
    db: Database[Any],
) -> None:
    db.command("create", "dup")
    with pytest.raises(OperationFailure) as exc:
        db.command("create", "dup", capped=True, size=4096)
    assert exc.value.code == 48
    assert exc.value.details is not None
    assert exc.value.details["codeName"] == "NamespaceExists"


def test_drop_collection(db: Database[Any]) -> None:
    db.gone.insert_one({"x": 1})
    reply = db.command("drop", "gone")
    assert reply["ok"] == 1.0
    assert reply["ns"] == f"{db.name}.gone"
    assert "gone" not in db.list_collection_names()
    assert db.gone.find_one() is None


def test_drop_missing_collection_succeeds(db: Database[Any]) -> None:
    """MongoDB 7.0: dropping a nonexistent collection is a no-op (SERVER-43894)."""
    db.keep.insert_one({})
    reply = db.command("drop", "never_created")
    assert reply["ok"] == 1.0


def test_drop_database(client: MongoClient[Any], db: Database[Any]) -> None:
    db.c.insert_one({"x": 1})
    assert db.name in client.list_database_names()
    reply = db.command("dropDatabase")
    assert reply["ok"] == 1.0
    assert db.name not in client.list_database_names()
    assert db.list_collection_names() == []


# --------------------------------------------------------------------------- indexes


def test_create_indexes_reply_shape(db: Database[Any]) -> None:
    db.ix.insert_one({"a": 1})
    reply = db.command("createIndexes", "ix", indexes=[{"key": {"a": 1}, "name": "a_1"}])
    assert reply["ok"] == 1.0
    assert reply["numIndexesBefore"] == 1
    assert reply["numIndexesAfter"] == 2
    assert reply["createdCollectionAutomatically"] is False


def test_create_indexes_creates_collection_automatically(db: Database[Any]) -> None:
    reply = db.command("createIndexes", "fresh", indexes=[{"key": {"a": 1}, "name": "a_1"}])
    assert reply["createdCollectionAutomatically"] is True
    assert "fresh" in db.list_collection_names()


def test_create_index_returns_generated_name(db: Database[Any]) -> None:
    assert db.ix.create_index([("a", ASCENDING), ("b", DESCENDING)]) == "a_1_b_-1"


def test_list_indexes(db: Database[Any]) -> None:
    db.ix.create_index("a", unique=True)
    db.ix.create_index([("connections.id", ASCENDING)])
    indexes = {i["name"]: i for i in db.ix.list_indexes()}
    assert set(indexes) == {"_id_", "a_1", "connections.id_1"}
    assert indexes["_id_"]["key"] == {"_id": 1}
    assert indexes["a_1"]["key"] == {"a": 1}
    assert indexes["a_1"]["unique"] is True
    assert indexes["a_1"]["v"] == 2
    assert indexes["connections.id_1"]["key"] == {"connections.id": 1}


def test_drop_index_by_name(db: Database[Any]) -> None:
    db.ix.create_index("a")
    db.ix.create_index("b")
    reply = db.command("dropIndexes", "ix", index="a_1")
    assert reply["ok"] == 1.0
    assert reply["nIndexesWas"] == 3
    assert sorted(db.ix.index_information()) == ["_id_", "b_1"]


def test_drop_all_indexes_keeps_id_index(db: Database[Any]) -> None:
    db.ix.create_index("a")
    db.ix.create_index("b")
    db.ix.drop_indexes()
    assert list(db.ix.index_information()) == ["_id_"]


def test_drop_missing_index_is_index_not_found(db: Database[Any]) -> None:
    db.ix.insert_one({})
    with pytest.raises(OperationFailure) as exc:
        db.command("dropIndexes", "ix", index="nope_1")
    assert exc.value.code == 27


def test_drop_id_index_is_refused(db: Database[Any]) -> None:
    db.ix.insert_one({})
    with pytest.raises(OperationFailure) as exc:
        db.command("dropIndexes", "ix", index="_id_")
    assert exc.value.code == 72


# --------------------------------------------------------------------------- unique indexes


def test_duplicate_id_is_duplicate_key_error(db: Database[Any]) -> None:
    db.u.insert_one({"_id": 1})
    with pytest.raises(DuplicateKeyError) as exc:
        db.u.insert_one({"_id": 1})
    assert exc.value.code == 11000


def test_unique_index_rejects_duplicate_on_insert(db: Database[Any]) -> None:
    db.u.create_index("email", unique=True)
    db.u.insert_one({"email": "a@x"})
    with pytest.raises(DuplicateKeyError) as exc:
        db.u.insert_one({"email": "a@x"})
    assert exc.value.code == 11000
    details = exc.value.details
    assert details is not None
    assert details["keyPattern"] == {"email": 1}
    assert details["keyValue"] == {"email": "a@x"}
    assert "E11000" in details["errmsg"]
    assert db.u.count_documents({}) == 1


def test_unique_index_rejects_duplicate_on_update(db: Database[Any]) -> None:
    db.u.create_index("email", unique=True)
    db.u.insert_many([{"_id": 1, "email": "a@x"}, {"_id": 2, "email": "b@x"}])
    with pytest.raises(DuplicateKeyError) as exc:
        db.u.update_one({"_id": 2}, {"$set": {"email": "a@x"}})
    assert exc.value.code == 11000
    assert db.u.find_one({"_id": 2}) == {"_id": 2, "email": "b@x"}


def test_unique_index_rejects_duplicate_on_upsert(db: Database[Any]) -> None:
    db.u.create_index("email", unique=True)
    db.u.insert_one({"_id": 1, "email": "a@x"})
    with pytest.raises(DuplicateKeyError):
        db.u.update_one({"_id": 2}, {"$set": {"email": "a@x"}}, upsert=True)
    assert db.u.count_documents({}) == 1


def test_unique_index_allows_only_one_document_missing_the_field(db: Database[Any]) -> None:
    """A missing field is indexed as null, so only one document may lack it."""
    db.u.create_index("email", unique=True)
    db.u.insert_one({"_id": 1})
    with pytest.raises(DuplicateKeyError):
        db.u.insert_one({"_id": 2})


def test_unique_index_on_array_subfield_rejects_shared_element_on_insert(
    db: Database[Any],
) -> None:
    db.s.create_index("connections.id", unique=True)
    db.s.insert_one({"_id": "u1", "connections": [{"id": "c1"}, {"id": "c2"}]})
    with pytest.raises(DuplicateKeyError) as exc:
        db.s.insert_one({"_id": "u2", "connections": [{"id": "c3"}, {"id": "c2"}]})
    assert exc.value.code == 11000
    db.s.insert_one({"_id": "u3", "connections": [{"id": "c4"}]})
    assert db.s.count_documents({}) == 2


def test_unique_index_on_array_subfield_rejects_shared_element_on_update(
    db: Database[Any],
) -> None:
    db.s.create_index("connections.id", unique=True)
    db.s.insert_one({"_id": "u1", "connections": [{"id": "c1"}]})
    db.s.insert_one({"_id": "u2", "connections": [{"id": "c2"}]})
    with pytest.raises(DuplicateKeyError) as exc:
        db.s.update_one({"_id": "u2"}, {"$push": {"connections": {"id": "c1"}}})
    assert exc.value.code == 11000
    assert db.s.find_one({"_id": "u2"}) == {"_id": "u2", "connections": [{"id": "c2"}]}


def test_unique_index_on_array_subfield_allows_repeats_within_one_document(
    db: Database[Any],
) -> None:
    """The unique constraint applies across documents, not within one document's array."""
    db.s.create_index("connections.id", unique=True)
    db.s.insert_one({"_id": "u1", "connections": [{"id": "c1"}, {"id": "c1"}]})
    db.s.update_one({"_id": "u1"}, {"$push": {"connections": {"id": "c1"}}})
    assert len(found(db.s, "u1")["connections"]) == 3


def test_unique_index_creation_fails_on_existing_duplicates(db: Database[Any]) -> None:
    db.u.insert_many([{"email": "a@x"}, {"email": "a@x"}])
    with pytest.raises(OperationFailure) as exc:
        db.u.create_index("email", unique=True)
    assert exc.value.code == 11000
    assert "email_1" not in db.u.index_information()


# --------------------------------------------------------------------------- TTL


@pytest.mark.emulator_only
def test_ttl_index_expires_documents_in_background() -> None:
    from presenced.testing.mongo import MongoEmulator

    emu = MongoEmulator(ttl_monitor_interval=0.2)
    url = emu.start()
    c: MongoClient[Any] = MongoClient(url, serverSelectionTimeoutMS=10_000)
    try:
        coll = c.ttl_db.sessions
        coll.create_index("_updatedAt", expireAfterSeconds=60)
        now = datetime.datetime.now(datetime.UTC)
        coll.insert_many(
            [
                {"_id": "stale", "_updatedAt": now - datetime.timedelta(hours=2)},
                {"_id": "fresh", "_updatedAt": now},
                {"_id": "no-date"},
                {"_id": "not-a-date", "_updatedAt": "yesterday"},
            ]
        )
        gone = wait_for(lambda: coll.count_documents({"_id": "stale"}) == 0, timeout=10.0)
        assert gone, "TTL monitor did not remove the expired document within 10 s"
        assert sorted(d["_id"] for d in coll.find()) == ["fresh", "no-date", "not-a-date"]
    finally:
        c.close()
        emu.close()


def test_ttl_index_is_listed_with_expire_after_seconds(db: Database[Any]) -> None:
    db.t.create_index("expireAt", expireAfterSeconds=0)
    info = db.t.index_information()["expireAt_1"]
    assert info["expireAfterSeconds"] == 0


# --------------------------------------------------------------------------- insert


def test_insert_one_returns_id(db: Database[Any]) -> None:
    result = db.i.insert_one({"x": 1})
    assert isinstance(result.inserted_id, ObjectId)
    assert db.i.find_one({"_id": result.inserted_id}) == {"_id": result.inserted_id, "x": 1}


def test_server_adds_object_id_when_missing(db: Database[Any]) -> None:
    reply = db.command("insert", "i", documents=[{"x": 1}])
    assert reply["n"] == 1
    doc = db.i.find_one()
    assert doc is not None and isinstance(doc["_id"], ObjectId)


def test_server_moves_id_to_first_field(db: Database[Any]) -> None:
    db.command("insert", "i", documents=[{"x": 1, "_id": 5}])
    doc = db.i.find_one()
    assert doc is not None and list(doc) == ["_id", "x"]


def test_insert_many_returns_ids_in_order(db: Database[Any]) -> None:
    result = db.i.insert_many([{"_id": i} for i in range(5)])
    assert result.inserted_ids == [0, 1, 2, 3, 4]
    assert db.i.count_documents({}) == 5


def test_insert_many_ordered_stops_at_first_error(db: Database[Any]) -> None:
    with pytest.raises(BulkWriteError) as exc:
        db.i.insert_many([{"_id": 1}, {"_id": 2}, {"_id": 1}, {"_id": 3}])
    details = exc.value.details
    assert details["nInserted"] == 2
    assert details["writeErrors"][0]["index"] == 2
    assert details["writeErrors"][0]["code"] == 11000
    assert sorted(d["_id"] for d in db.i.find()) == [1, 2]


def test_insert_many_unordered_continues_after_error(db: Database[Any]) -> None:
    with pytest.raises(BulkWriteError) as exc:
        db.i.insert_many([{"_id": 1}, {"_id": 1}, {"_id": 2}], ordered=False)
    assert exc.value.details["nInserted"] == 2
    assert sorted(d["_id"] for d in db.i.find()) == [1, 2]


# --------------------------------------------------------------------------- update


def test_update_one_counts(db: Database[Any]) -> None:
    db.up.insert_many([{"_id": 1, "k": "a"}, {"_id": 2, "k": "a"}])
    result = db.up.update_one({"k": "a"}, {"$set": {"v": 1}})
    assert result.matched_count == 1
    assert result.modified_count == 1
    assert result.upserted_id is None
    assert db.up.count_documents({"v": 1}) == 1


def test_update_many_counts(db: Database[Any]) -> None:
    db.up.insert_many([{"_id": i, "k": "a"} for i in range(4)])
    result = db.up.update_many({"k": "a"}, {"$set": {"v": 1}})
    assert result.matched_count == 4
    assert result.modified_count == 4


def test_update_that_changes_nothing_is_matched_not_modified(db: Database[Any]) -> None:
    db.up.insert_many([{"_id": 1, "v": 1}, {"_id": 2, "v": 2}])
    result = db.up.update_many({}, {"$set": {"v": 1}})
    assert result.matched_count == 2
    assert result.modified_count == 1


def test_update_without_match_and_without_upsert_does_nothing(db: Database[Any]) -> None:
    result = db.up.update_one({"_id": "none"}, {"$set": {"v": 1}})
    assert (result.matched_count, result.modified_count, result.upserted_id) == (0, 0, None)
    assert db.up.count_documents({}) == 0


def test_update_one_upsert_inserts_with_equality_fields(db: Database[Any]) -> None:
    result = db.up.update_one(
        {"_id": "u1", "kind": "user"},
        {"$set": {"status": "online"}, "$setOnInsert": {"created": True}},
        upsert=True,
    )
    assert result.matched_count == 0
    assert result.upserted_id == "u1"
    assert db.up.find_one({"_id": "u1"}) == {
        "_id": "u1",
        "kind": "user",
        "status": "online",
        "created": True,
    }


def test_upsert_on_existing_document_skips_set_on_insert(db: Database[Any]) -> None:
    db.up.insert_one({"_id": "u1", "status": "away"})
    result = db.up.update_one(
        {"_id": "u1"},
        {"$set": {"status": "online"}, "$setOnInsert": {"created": True}},
        upsert=True,
    )
    assert result.matched_count == 1 and result.upserted_id is None
    assert db.up.find_one({"_id": "u1"}) == {"_id": "u1", "status": "online"}


def test_update_many_upsert_inserts_one_document(db: Database[Any]) -> None:
    result = db.up.update_many({"k": "missing"}, {"$set": {"v": 1}}, upsert=True)
    assert isinstance(result.upserted_id, ObjectId)
    assert list(db.up.find({}, {"_id": 0})) == [{"k": "missing", "v": 1}]


def test_update_operators_inc_unset_add_to_set(db: Database[Any]) -> None:
    db.up.insert_one({"_id": 1, "n": 1, "gone": True, "tags": ["a"]})
    db.up.update_one(
        {"_id": 1},
        {"$inc": {"n": 2}, "$unset": {"gone": ""}, "$addToSet": {"tags": {"$each": ["a", "b"]}}},
    )
    assert db.up.find_one({"_id": 1}) == {"_id": 1, "n": 3, "tags": ["a", "b"]}


def test_replace_one(db: Database[Any]) -> None:
    db.up.insert_one({"_id": 1, "a": 1, "b": 2})
    result = db.up.replace_one({"_id": 1}, {"c": 3})
    assert result.modified_count == 1
    assert db.up.find_one({"_id": 1}) == {"_id": 1, "c": 3}


def test_update_with_array_filters(db: Database[Any]) -> None:
    db.up.insert_one({"_id": 1, "grades": [{"g": 80}, {"g": 95}, {"g": 100}]})
    db.up.update_one(
        {"_id": 1}, {"$set": {"grades.$[x].top": True}}, array_filters=[{"x.g": {"$gte": 95}}]
    )
    assert found(db.up, 1)["grades"] == [
        {"g": 80},
        {"g": 95, "top": True},
        {"g": 100, "top": True},
    ]


def test_update_with_positional_operator_updates_first_match(db: Database[Any]) -> None:
    db.up.insert_one({"_id": 1, "items": [{"k": "a", "v": 0}, {"k": "b", "v": 0}]})
    db.up.update_one({"_id": 1, "items.k": "b"}, {"$set": {"items.$.v": 9}})
    assert found(db.up, 1)["items"] == [{"k": "a", "v": 0}, {"k": "b", "v": 9}]


def test_positional_operator_without_array_in_query_is_an_error(db: Database[Any]) -> None:
    db.up.insert_one({"_id": 1, "items": [{"k": "a"}]})
    with pytest.raises(WriteError) as exc:
        db.up.update_one({"_id": 1}, {"$set": {"items.$.v": 1}})
    assert exc.value.code == 2
    assert db.up.find_one({"_id": 1}) == {"_id": 1, "items": [{"k": "a"}]}


def test_update_with_pipeline_is_applied_or_refused_cleanly(db: Database[Any]) -> None:
    db.up.insert_one({"_id": 1, "a": 1})
    try:
        result = db.up.update_one({"_id": 1}, [{"$set": {"b": {"$add": ["$a", 1]}}}])
    except OperationFailure:
        assert db.up.find_one({"_id": 1}) == {"_id": 1, "a": 1}
    else:
        assert result.modified_count == 1
        assert db.up.find_one({"_id": 1}) == {"_id": 1, "a": 1, "b": 2}


# --------------------------------------------------------------------------- delete


def test_delete_one(db: Database[Any]) -> None:
    db.d.insert_many([{"k": 1}, {"k": 1}, {"k": 2}])
    assert db.d.delete_one({"k": 1}).deleted_count == 1
    assert db.d.count_documents({"k": 1}) == 1


def test_delete_many(db: Database[Any]) -> None:
    db.d.insert_many([{"k": 1}, {"k": 1}, {"k": 2}])
    assert db.d.delete_many({"k": 1}).deleted_count == 2
    assert db.d.count_documents({}) == 1
    assert db.d.delete_many({"k": "none"}).deleted_count == 0


# --------------------------------------------------------------------------- find


@pytest.fixture
def people(db: Database[Any]) -> Collection[Any]:
    db.p.insert_many(
        [
            {"_id": i, "name": n, "age": a, "tags": t}
            for i, (n, a, t) in enumerate(
                [
                    ("ann", 31, ["x"]),
                    ("bob", 25, ["y"]),
                    ("cat", 31, ["x", "y"]),
                    ("dan", 40, []),
                    ("eve", 22, ["z"]),
                    ("fay", 35, ["x"]),
                    ("gus", 28, ["y", "z"]),
                ]
            )
        ]
    )
    return db.p


def test_find_with_filter(people: Collection[Any]) -> None:
    names = sorted(d["name"] for d in people.find({"age": {"$gte": 30}, "tags": "x"}))
    assert names == ["ann", "cat", "fay"]


def test_find_by_id_in_returns_exactly_those_documents(people: Collection[Any]) -> None:
    docs = list(people.find({"_id": {"$in": [1, 4, 6, 99]}}))
    assert sorted(d["_id"] for d in docs) == [1, 4, 6]


def test_find_inclusion_projection(people: Collection[Any]) -> None:
    assert people.find_one({"_id": 0}, {"name": 1}) == {"_id": 0, "name": "ann"}
    assert people.find_one({"_id": 0}, {"name": 1, "_id": 0}) == {"name": "ann"}


def test_find_exclusion_projection(people: Collection[Any]) -> None:
    assert people.find_one({"_id": 0}, {"tags": 0, "age": 0}) == {"_id": 0, "name": "ann"}


def test_find_sort_skip_limit(people: Collection[Any]) -> None:
    cursor = people.find({}, sort=[("age", DESCENDING), ("name", ASCENDING)]).skip(1).limit(3)
    assert [d["name"] for d in cursor] == ["fay", "ann", "cat"]


def test_find_reply_shape(db: Database[Any], people: Collection[Any]) -> None:
    reply = db.command("find", "p", filter={}, batchSize=2)
    cursor = reply["cursor"]
    assert cursor["ns"] == f"{db.name}.p"
    assert cursor["id"] != 0
    assert len(cursor["firstBatch"]) == 2
    more = db.command("getMore", cursor["id"], collection="p", batchSize=100)
    assert more["cursor"]["id"] == 0
    assert len(more["cursor"]["nextBatch"]) == 5


def test_find_exhausted_in_first_batch_returns_cursor_id_zero(
    db: Database[Any], people: Collection[Any]
) -> None:
    reply = db.command("find", "p", filter={"_id": 1})
    assert reply["cursor"]["id"] == 0
    assert [d["_id"] for d in reply["cursor"]["firstBatch"]] == [1]


def test_find_with_small_batch_size_uses_several_get_mores(
    events: tuple[Events, MongoClient[Any]], db: Database[Any], people: Collection[Any]
) -> None:
    listener, c = events
    docs = list(c[db.name].p.find({}, sort=[("_id", 1)], batch_size=2))
    assert [d["_id"] for d in docs] == list(range(7))
    assert listener.names().count("getMore") >= 3


def test_find_with_hint_returns_same_documents(people: Collection[Any]) -> None:
    people.create_index("age")
    expected = sorted(d["_id"] for d in people.find({"age": {"$gt": 26}}))
    hinted = sorted(d["_id"] for d in people.find({"age": {"$gt": 26}}).hint("age_1"))
    natural = sorted(d["_id"] for d in people.find({"age": {"$gt": 26}}).hint([("$natural", 1)]))
    assert hinted == expected == natural


def test_cursor_close_sends_kill_cursors(
    events: tuple[Events, MongoClient[Any]], db: Database[Any], people: Collection[Any]
) -> None:
    listener, c = events
    cursor = c[db.name].p.find({}, batch_size=2)
    next(cursor)
    cursor_id = cursor.cursor_id
    assert cursor_id
    cursor.close()
    kills = [e for e in listener.succeeded_events if e.command_name == "killCursors"]
    assert kills, "cursor.close() did not send killCursors"
    assert kills[-1].reply["cursorsKilled"] == [cursor_id]


def test_get_more_on_killed_cursor_is_cursor_not_found(
    db: Database[Any], people: Collection[Any]
) -> None:
    cursor_id = db.command("find", "p", filter={}, batchSize=2)["cursor"]["id"]
    reply = db.command("killCursors", "p", cursors=[cursor_id])
    assert reply["cursorsKilled"] == [cursor_id]
    with pytest.raises(CursorNotFound) as exc:
        db.command("getMore", cursor_id, collection="p")
    assert exc.value.code == 43


def test_kill_unknown_cursor_reports_not_found(db: Database[Any], people: Collection[Any]) -> None:
    reply = db.command("killCursors", "p", cursors=[bson.Int64(123456789)])
    assert reply["cursorsNotFound"] == [123456789]
    assert reply["cursorsKilled"] == []


# --------------------------------------------------------------------------- findAndModify


def test_find_one_and_update_returns_before_by_default(db: Database[Any]) -> None:
    db.f.insert_one({"_id": 1, "n": 1})
    before = db.f.find_one_and_update({"_id": 1}, {"$inc": {"n": 1}})
    assert before == {"_id": 1, "n": 1}
    assert db.f.find_one({"_id": 1}) == {"_id": 1, "n": 2}


def test_find_one_and_update_returns_after(db: Database[Any]) -> None:
    db.f.insert_one({"_id": 1, "n": 1})
    after = db.f.find_one_and_update(
        {"_id": 1}, {"$inc": {"n": 1}}, return_document=ReturnDocument.AFTER
    )
    assert after == {"_id": 1, "n": 2}


def test_find_one_and_update_upsert(db: Database[Any]) -> None:
    before = db.f.find_one_and_update({"_id": "x"}, {"$set": {"v": 1}}, upsert=True)
    assert before is None
    after = db.f.find_one_and_update(
        {"_id": "y"}, {"$set": {"v": 2}}, upsert=True, return_document=ReturnDocument.AFTER
    )
    assert after == {"_id": "y", "v": 2}
    assert db.f.count_documents({}) == 2


def test_find_one_and_update_no_match_returns_none(db: Database[Any]) -> None:
    assert db.f.find_one_and_update({"_id": "none"}, {"$set": {"v": 1}}) is None
    assert db.f.count_documents({}) == 0


def test_find_one_and_update_sort_picks_document(db: Database[Any]) -> None:
    db.f.insert_many([{"_id": 1, "p": 5}, {"_id": 2, "p": 9}, {"_id": 3, "p": 1}])
    doc = db.f.find_one_and_update({}, {"$set": {"taken": True}}, sort=[("p", DESCENDING)])
    assert doc is not None and doc["_id"] == 2


def test_find_and_modify_reply_shape(db: Database[Any]) -> None:
    reply = db.command(
        "findAndModify", "f", query={"_id": 1}, update={"$set": {"v": 1}}, upsert=True, new=True
    )
    assert reply["ok"] == 1.0
    assert reply["value"] == {"_id": 1, "v": 1}
    assert reply["lastErrorObject"]["n"] == 1
    assert reply["lastErrorObject"]["updatedExisting"] is False
    assert reply["lastErrorObject"]["upserted"] == 1


def test_find_one_and_delete(db: Database[Any]) -> None:
    db.f.insert_many([{"_id": 1, "p": 5}, {"_id": 2, "p": 9}])
    doc = db.f.find_one_and_delete({}, sort=[("p", ASCENDING)])
    assert doc == {"_id": 1, "p": 5}
    assert [d["_id"] for d in db.f.find()] == [2]
    assert db.f.find_one_and_delete({"_id": "none"}) is None


# --------------------------------------------------------------------------- aggregate & counts


def test_aggregate_match_group_sort(people: Collection[Any]) -> None:
    out = list(
        people.aggregate(
            [
                {"$match": {"age": {"$gte": 25}}},
                {"$group": {"_id": "$age", "count": {"$sum": 1}, "names": {"$push": "$name"}}},
                {"$sort": {"count": -1, "_id": 1}},
            ]
        )
    )
    assert out[0] == {"_id": 31, "count": 2, "names": ["ann", "cat"]}
    assert [d["_id"] for d in out] == [31, 25, 28, 35, 40]


def test_aggregate_project(people: Collection[Any]) -> None:
    out = list(
        people.aggregate(
            [
                {"$match": {"_id": 0}},
                {"$project": {"_id": 0, "name": 1, "older": {"$add": ["$age", 1]}}},
            ]
        )
    )
    assert out == [{"name": "ann", "older": 32}]


def test_aggregate_unwind_and_group(people: Collection[Any]) -> None:
    out = list(
        people.aggregate(
            [
                {"$unwind": "$tags"},
                {"$group": {"_id": "$tags", "n": {"$sum": 1}}},
                {"$sort": {"_id": 1}},
            ]
        )
    )
    assert out == [{"_id": "x", "n": 3}, {"_id": "y", "n": 3}, {"_id": "z", "n": 2}]


def test_aggregate_count(people: Collection[Any]) -> None:
    out = list(people.aggregate([{"$match": {"age": {"$lt": 30}}}, {"$count": "young"}]))
    assert out == [{"young": 3}]


def test_aggregate_with_batch_size_uses_get_more(
    events: tuple[Events, MongoClient[Any]], db: Database[Any], people: Collection[Any]
) -> None:
    listener, c = events
    out = list(c[db.name].p.aggregate([{"$sort": {"_id": 1}}], batchSize=2))
    assert [d["_id"] for d in out] == list(range(7))
    assert listener.names().count("getMore") >= 3


def test_count_documents(people: Collection[Any]) -> None:
    assert people.count_documents({}) == 7
    assert people.count_documents({"tags": "y"}) == 3
    assert people.count_documents({}, skip=2, limit=3) == 3


def test_estimated_document_count(people: Collection[Any]) -> None:
    assert people.estimated_document_count() == 7


def test_estimated_document_count_of_missing_collection_is_zero(db: Database[Any]) -> None:
    assert db.nothing_here.estimated_document_count() == 0


def test_distinct(people: Collection[Any]) -> None:
    assert sorted(people.distinct("age")) == [22, 25, 28, 31, 35, 40]
    assert sorted(people.distinct("name", {"age": 31})) == ["ann", "cat"]


def test_distinct_flattens_arrays(people: Collection[Any]) -> None:
    assert sorted(people.distinct("tags")) == ["x", "y", "z"]


# --------------------------------------------------------------------------- sessions


def test_end_sessions_command(client: MongoClient[Any]) -> None:
    session = client.start_session()
    lsid = session.session_id
    session.end_session()
    reply = client.admin.command("endSessions", [lsid])
    assert reply["ok"] == 1.0


def test_closing_a_client_ends_its_sessions_cleanly(
    events: tuple[Events, MongoClient[Any]], db: Database[Any], client: MongoClient[Any]
) -> None:
    listener, c = events
    with c.start_session() as session:
        c[db.name].es.insert_one({"_id": 1}, session=session)
    c.close()
    ends = [e for e in listener.succeeded_events if e.command_name == "endSessions"]
    assert ends, "client.close() sent no endSessions"
    assert ends[-1].reply["ok"] == 1.0
    assert client.admin.command("ping")["ok"] == 1.0


# ------------------------------------------------------------- Rocket.Chat usersSessions


def _conn(cid: str, iid: str, at: datetime.datetime, status: str = "online") -> dict[str, Any]:
    return {"id": cid, "instanceId": iid, "status": status, "_createdAt": at, "_updatedAt": at}


T0 = datetime.datetime(2024, 3, 1, 12, 0, 0, 250000)


@pytest.fixture
def sessions(db: Database[Any]) -> Collection[Any]:
    coll = db.usersSessions
    coll.create_index("connections.id")
    coll.create_index("connections.instanceId")
    return coll


def test_rc_push_connection_with_upsert_creates_user_document(sessions: Collection[Any]) -> None:
    result = sessions.update_one(
        {"_id": "user1"}, {"$push": {"connections": _conn("c1", "i1", T0)}}, upsert=True
    )
    assert result.upserted_id == "user1"
    sessions.update_one(
        {"_id": "user1"}, {"$push": {"connections": _conn("c2", "i2", T0)}}, upsert=True
    )
    doc = sessions.find_one({"_id": "user1"})
    assert doc == {"_id": "user1", "connections": [_conn("c1", "i1", T0), _conn("c2", "i2", T0)]}


def test_rc_datetimes_round_trip_with_millisecond_precision(sessions: Collection[Any]) -> None:
    at = datetime.datetime(2024, 3, 1, 12, 0, 0, 123456)
    sessions.insert_one({"_id": "u", "connections": [_conn("c1", "i1", at)]})
    conn = found(sessions, "u")["connections"][0]
    assert conn["_createdAt"] == ms(at)
    assert conn["_updatedAt"] == datetime.datetime(2024, 3, 1, 12, 0, 0, 123000)


def test_rc_pull_connection_by_id_across_users(sessions: Collection[Any]) -> None:
    sessions.insert_many(
        [
            {"_id": "u1", "connections": [_conn("c1", "i1", T0), _conn("c2", "i1", T0)]},
            {"_id": "u2", "connections": [_conn("c3", "i2", T0)]},
        ]
    )
    result = sessions.update_many(
        {"connections.id": "c1"}, {"$pull": {"connections": {"id": "c1"}}}
    )
    assert (result.matched_count, result.modified_count) == (1, 1)
    assert [c["id"] for c in found(sessions, "u1")["connections"]] == ["c2"]
    assert [c["id"] for c in found(sessions, "u2")["connections"]] == ["c3"]


def test_rc_pull_last_connection_leaves_empty_array(sessions: Collection[Any]) -> None:
    sessions.insert_one({"_id": "u1", "connections": [_conn("c1", "i1", T0)]})
    sessions.update_many({"connections.id": "c1"}, {"$pull": {"connections": {"id": "c1"}}})
    assert sessions.find_one({"_id": "u1"}) == {"_id": "u1", "connections": []}


def test_rc_set_status_with_array_filters(sessions: Collection[Any]) -> None:
    sessions.insert_one(
        {"_id": "u1", "connections": [_conn("c1", "i1", T0), _conn("c2", "i1", T0)]}
    )
    later = T0 + datetime.timedelta(seconds=30)
    result = sessions.update_one(
        {"_id": "u1"},
        {"$set": {"connections.$[c].status": "away", "connections.$[c]._updatedAt": later}},
        array_filters=[{"c.id": "c2"}],
    )
    assert result.modified_count == 1
    conns = found(sessions, "u1")["connections"]
    assert conns[0] == _conn("c1", "i1", T0)
    assert conns[1]["status"] == "away"
    assert conns[1]["_updatedAt"] == ms(later)
    assert conns[1]["_createdAt"] == ms(T0)


def test_rc_array_filters_without_matching_element_modifies_nothing(
    sessions: Collection[Any],
) -> None:
    sessions.insert_one({"_id": "u1", "connections": [_conn("c1", "i1", T0)]})
    result = sessions.update_one(
        {"_id": "u1"},
        {"$set": {"connections.$[c].status": "away"}},
        array_filters=[{"c.id": "other"}],
    )
    assert (result.matched_count, result.modified_count) == (1, 0)
    assert found(sessions, "u1")["connections"] == [_conn("c1", "i1", T0)]


def test_rc_positional_heartbeat_updates_only_that_connection(sessions: Collection[Any]) -> None:
    sessions.insert_one(
        {"_id": "u1", "connections": [_conn("c1", "i1", T0), _conn("c2", "i1", T0)]}
    )
    now = T0 + datetime.timedelta(minutes=1)
    result = sessions.update_one(
        {"_id": "u1", "connections.id": "c2"}, {"$set": {"connections.$._updatedAt": now}}
    )
    assert result.modified_count == 1
    conns = found(sessions, "u1")["connections"]
    assert conns[0]["_updatedAt"] == ms(T0)
    assert conns[1]["_updatedAt"] == ms(now)


def test_rc_positional_heartbeat_for_unknown_connection_matches_nothing(
    sessions: Collection[Any],
) -> None:
    sessions.insert_one({"_id": "u1", "connections": [_conn("c1", "i1", T0)]})
    result = sessions.update_one(
        {"_id": "u1", "connections.id": "zzz"}, {"$set": {"connections.$._updatedAt": T0}}
    )
    assert (result.matched_count, result.modified_count) == (0, 0)


def test_rc_pull_all_connections_of_an_instance(sessions: Collection[Any]) -> None:
    sessions.insert_many(
        [
            {"_id": "u1", "connections": [_conn("c1", "dead", T0), _conn("c2", "live", T0)]},
            {"_id": "u2", "connections": [_conn("c3", "dead", T0), _conn("c4", "dead", T0)]},
            {"_id": "u3", "connections": [_conn("c5", "live", T0)]},
        ]
    )
    result = sessions.update_many({}, {"$pull": {"connections": {"instanceId": "dead"}}})
    assert result.matched_count == 3
    assert result.modified_count == 2
    remaining = {d["_id"]: [c["id"] for c in d["connections"]] for d in sessions.find()}
    assert remaining == {"u1": ["c2"], "u2": [], "u3": ["c5"]}


def test_rc_pull_connections_of_other_instances(sessions: Collection[Any]) -> None:
    sessions.insert_many(
        [
            {"_id": "u1", "connections": [_conn("c1", "a", T0), _conn("c2", "b", T0)]},
            {"_id": "u2", "connections": [_conn("c3", "c", T0)]},
        ]
    )
    sessions.update_many({}, {"$pull": {"connections": {"instanceId": {"$nin": ["a", "b"]}}}})
    remaining = {d["_id"]: [c["id"] for c in d["connections"]] for d in sessions.find()}
    assert remaining == {"u1": ["c1", "c2"], "u2": []}


def test_rc_guarded_pull_removes_stale_and_keeps_freshly_heartbeated(
    sessions: Collection[Any],
) -> None:
    cutoff = T0 + datetime.timedelta(seconds=60)
    sessions.insert_one(
        {
            "_id": "u1",
            "connections": [
                _conn("stale", "i1", T0),
                _conn("beating", "i1", T0),
                _conn("other", "i1", T0),
            ],
        }
    )
    # A heartbeat lands after the sweeper decided which ids looked stale.
    sessions.update_one(
        {"_id": "u1", "connections.id": "beating"},
        {"$set": {"connections.$._updatedAt": cutoff + datetime.timedelta(seconds=1)}},
    )
    result = sessions.update_many(
        {"connections.id": {"$in": ["stale", "beating"]}},
        {
            "$pull": {
                "connections": {"id": {"$in": ["stale", "beating"]}, "_updatedAt": {"$lte": cutoff}}
            }
        },
    )
    assert result.modified_count == 1
    ids = [c["id"] for c in found(sessions, "u1")["connections"]]
    assert ids == ["beating", "other"]


def test_rc_guarded_pull_boundary_is_inclusive(sessions: Collection[Any]) -> None:
    sessions.insert_one({"_id": "u1", "connections": [_conn("c1", "i1", T0)]})
    sessions.update_many(
        {}, {"$pull": {"connections": {"id": {"$in": ["c1"]}, "_updatedAt": {"$lte": ms(T0)}}}}
    )
    assert found(sessions, "u1")["connections"] == []


def test_rc_pull_by_id_removes_every_duplicate(sessions: Collection[Any]) -> None:
    sessions.insert_one(
        {
            "_id": "u1",
            "connections": [_conn("dup", "i1", T0), _conn("x", "i1", T0), _conn("dup", "i2", T0)],
        }
    )
    sessions.update_many({"connections.id": "dup"}, {"$pull": {"connections": {"id": "dup"}}})
    assert [c["id"] for c in found(sessions, "u1")["connections"]] == ["x"]


def test_rc_positional_update_with_duplicate_ids_changes_first_only(
    sessions: Collection[Any],
) -> None:
    sessions.insert_one(
        {"_id": "u1", "connections": [_conn("dup", "i1", T0), _conn("dup", "i2", T0)]}
    )
    sessions.update_one(
        {"_id": "u1", "connections.id": "dup"}, {"$set": {"connections.$.status": "away"}}
    )
    statuses = [c["status"] for c in found(sessions, "u1")["connections"]]
    assert statuses == ["away", "online"]


def test_rc_array_filters_with_duplicate_ids_change_all(sessions: Collection[Any]) -> None:
    sessions.insert_one(
        {
            "_id": "u1",
            "connections": [_conn("dup", "i1", T0), _conn("x", "i1", T0), _conn("dup", "i2", T0)],
        }
    )
    sessions.update_one(
        {"_id": "u1"},
        {"$set": {"connections.$[c].status": "busy"}},
        array_filters=[{"c.id": "dup"}],
    )
    statuses = [c["status"] for c in found(sessions, "u1")["connections"]]
    assert statuses == ["busy", "online", "busy"]


def test_rc_find_users_by_connection_fields(sessions: Collection[Any]) -> None:
    sessions.insert_many(
        [
            {"_id": "u1", "connections": [_conn("c1", "i1", T0, "away")]},
            {"_id": "u2", "connections": [_conn("c2", "i2", T0, "online")]},
            {"_id": "u3", "connections": []},
        ]
    )
    assert [d["_id"] for d in sessions.find({"connections.instanceId": "i2"})] == ["u2"]
    assert [d["_id"] for d in sessions.find({"connections": {"$size": 0}})] == ["u3"]
    match = {"connections": {"$elemMatch": {"instanceId": "i1", "status": "away"}}}
    assert [d["_id"] for d in sessions.find(match)] == ["u1"]


# --------------------------------------------------------------------------- concurrency


def test_concurrent_increments_through_one_client_are_not_lost(db: Database[Any]) -> None:
    db.ctr.insert_one({"_id": "ctr", "n": 0})

    def work() -> None:
        for _ in range(200):
            db.ctr.update_one({"_id": "ctr"}, {"$inc": {"n": 1}})

    with ThreadPoolExecutor(max_workers=8) as pool:
        for f in [pool.submit(work) for _ in range(8)]:
            f.result()
    assert db.ctr.find_one({"_id": "ctr"}) == {"_id": "ctr", "n": 1600}


@pytest.mark.emulator_only
def test_client_disconnecting_mid_message_does_not_disturb_others(
    emulator: Any, db: Database[Any]
) -> None:
    body = bson.encode({"insert": "half", "documents": [{"_id": 1}], "$db": db.name})
    payload = struct.pack("<I", 0) + b"\x00" + body
    message = struct.pack("<iiii", 16 + len(payload), 77, 0, 2013) + payload
    sock = socket.create_connection(("127.0.0.1", emulator.port), timeout=5.0)
    try:
        sock.sendall(message[: len(message) // 2])
        # While that request hangs half-sent, others are served.
        db.other.insert_one({"_id": "during"})
    finally:
        sock.close()
    db.other.insert_one({"_id": "after"})
    assert sorted(d["_id"] for d in db.other.find()) == ["after", "during"]
    assert db.half.count_documents({}) == 0


def test_a_multi_update_gives_each_document_its_own_copy_of_the_values(
    db: Database[Any],
) -> None:
    """A $push to many documents, then a write to one of them: the others keep theirs
    (mongomock-ng shared one pushed object between the documents)."""
    db.s.insert_many([{"_id": 1}, {"_id": 2}])
    db.s.create_index("connections.instanceId")
    db.s.update_many({}, {"$push": {"connections": {"id": "c"}}})
    db.s.update_one({"_id": 1, "connections.id": "c"},
                    {"$set": {"connections.$.instanceId": "i1"}})
    assert db.s.find_one({"_id": 2}) == {"_id": 2, "connections": [{"id": "c"}]}
    assert [d["_id"] for d in db.s.find({"connections.instanceId": "i1"})] == [1]
    assert [d["_id"] for d in db.s.find({"connections.instanceId": None})] == [2]
