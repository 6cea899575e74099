"""renameCollection: documents, indexes and options move; its errors; its oplog entry and
change events, as MongoDB 7.0 gives them."""

from __future__ import annotations

from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import OperationFailure


def rename(client: MongoClient[Any], db: Database[Any], source: str, target: str,
           **options: Any) -> None:
    client.admin.command("renameCollection", f"{db.name}.{source}",
                         to=f"{db.name}.{target}", **options)


def test_documents_and_indexes_move_to_the_new_name(
    client: MongoClient[Any], db: Database[Any]
) -> None:
    db.a.insert_many([{"_id": 1, "x": "k"}, {"_id": 2, "x": "m"}])
    db.a.create_index("x", unique=True)
    rename(client, db, "a", "b")
    assert "a" not in db.list_collection_names()
    assert list(db.b.find({"x": "m"})) == [{"_id": 2, "x": "m"}]
    assert sorted(ix["name"] for ix in db.b.list_indexes()) == ["_id_", "x_1"]
    with pytest.raises(OperationFailure) as dup:
        db.b.insert_one({"_id": 3, "x": "k"})
    assert dup.value.code == 11000
    db.a.insert_one({"_id": 9})  # the old name is a new, empty collection
    assert list(db.a.find()) == [{"_id": 9}]


def test_onto_an_existing_collection_is_48_unless_drop_target(
    client: MongoClient[Any], db: Database[Any]
) -> None:
    db.a.insert_one({"_id": 1})
    db.b.insert_one({"_id": 2})
    with pytest.raises(OperationFailure) as exists:
        rename(client, db, "a", "b")
    assert exists.value.code == 48
    rename(client, db, "a", "b", dropTarget=True)
    assert list(db.b.find()) == [{"_id": 1}]


def test_a_missing_source_is_26_and_it_runs_on_admin_only(
    client: MongoClient[Any], db: Database[Any]
) -> None:
    with pytest.raises(OperationFailure) as missing:
        rename(client, db, "nope", "b")
    assert missing.value.code == 26
    db.a.insert_one({"_id": 1})
    with pytest.raises(OperationFailure) as not_admin:
        db.command("renameCollection", f"{db.name}.a", to=f"{db.name}.b")
    assert not_admin.value.code == 13


def test_a_change_stream_on_the_database_sees_rename_and_one_on_the_source_is_invalidated(
    client: MongoClient[Any], db: Database[Any]
) -> None:
    db.a.insert_one({"_id": 1})
    with db.watch() as on_db, db.a.watch() as on_source:
        rename(client, db, "a", "b")
        event = on_db.try_next() or on_db.try_next()
        assert event is not None
        assert event["operationType"] == "rename"
        assert event["ns"] == {"db": db.name, "coll": "a"}
        assert event["to"] == {"db": db.name, "coll": "b"}
        kinds = []
        while (ev := on_source.try_next()) is not None:
            kinds.append(ev["operationType"])
            if ev["operationType"] == "invalidate":
                break
        assert kinds == ["rename", "invalidate"]


@pytest.mark.emulator_only
def test_the_oplog_entry_is_mongodbs(client: MongoClient[Any], db: Database[Any]) -> None:
    db.a.insert_one({"_id": 1})
    db.b.insert_one({"_id": 2})
    uuid_b = next(c for c in db.list_collections() if c["name"] == "b")["info"]["uuid"]
    rename(client, db, "a", "b", dropTarget=True)
    entry = client.local["oplog.rs"].find_one({"op": "c", "o.renameCollection": {"$exists": 1}},
                                              sort=[("$natural", -1)])
    assert entry is not None
    assert entry["ns"] == f"{db.name}.$cmd"
    assert entry["o"]["renameCollection"] == f"{db.name}.a"
    assert entry["o"]["to"] == f"{db.name}.b"
    assert entry["o"]["dropTarget"] == uuid_b
