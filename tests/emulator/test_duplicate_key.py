"""Duplicate-key errors say what MongoDB says (issue 9, item 3).

MongoDB builds the message from the index's key pattern and the duplicate key, printed
as its BSON ``toString`` does: ``E11000 duplicate key error collection: <db>.<coll>
index: <name> dup key: { <field>: <value>, ... }``, strings in double quotes, integers
bare, doubles with a decimal point, ``ObjectId('...')``, ``null``, ``true``,
``new Date(<ms>)``, subdocuments as ``{ a: 1 }``. Drivers show it to users and some
parse it; ``keyPattern`` and ``keyValue`` carry the same facts as fields.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from bson import Int64, ObjectId
from pymongo import InsertOne, ReturnDocument
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure

Db = Database[dict[str, Any]]


def message(db: Db, coll: str, index: str, key: str) -> str:
    return f"E11000 duplicate key error collection: {db.name}.{coll} index: {index} dup key: {key}"


def refused(db: Db, doc: dict[str, Any], coll: str = "u") -> DuplicateKeyError:
    with pytest.raises(DuplicateKeyError) as exc:
        db[coll].insert_one(doc)
    return exc.value


def errmsg(exc: DuplicateKeyError) -> str:
    details = exc.details
    assert details is not None
    return str(details["errmsg"])


def test_a_string_key_is_quoted(db: Db) -> None:
    db.users.create_index("username", unique=True)
    db.users.insert_one({"username": "dupname"})
    exc = refused(db, {"username": "dupname"}, coll="users")
    assert errmsg(exc) == message(db, "users", "username_1", '{ username: "dupname" }')
    assert exc.details is not None
    assert exc.details["keyPattern"] == {"username": 1}
    assert exc.details["keyValue"] == {"username": "dupname"}


def test_an_integer_key_is_bare(db: Db) -> None:
    db.u.create_index("n", unique=True)
    db.u.insert_one({"n": 7})
    assert errmsg(refused(db, {"n": 7})) == message(db, "u", "n_1", "{ n: 7 }")


def test_a_long_key_is_bare(db: Db) -> None:
    db.u.create_index("n", unique=True)
    db.u.insert_one({"n": Int64(1 << 40)})
    assert errmsg(refused(db, {"n": Int64(1 << 40)})) == message(
        db, "u", "n_1", "{ n: 1099511627776 }")


def test_a_double_key_keeps_its_decimal_point(db: Db) -> None:
    db.u.create_index("n", unique=True)
    db.u.insert_many([{"n": 2.0}, {"n": 1.5}])
    assert errmsg(refused(db, {"n": 2.0})) == message(db, "u", "n_1", "{ n: 2.0 }")
    assert errmsg(refused(db, {"n": 1.5})) == message(db, "u", "n_1", "{ n: 1.5 }")


def test_an_object_id_key_is_shown_as_object_id(db: Db) -> None:
    oid = ObjectId("64b0c0ffee0000000000abcd")
    db.u.insert_one({"_id": oid})
    assert errmsg(refused(db, {"_id": oid})) == message(
        db, "u", "_id_", "{ _id: ObjectId('64b0c0ffee0000000000abcd') }")


def test_a_duplicate_id_names_the_id_index(db: Db) -> None:
    db.u.insert_one({"_id": "a"})
    exc = refused(db, {"_id": "a"})
    assert errmsg(exc) == message(db, "u", "_id_", '{ _id: "a" }')
    assert exc.details is not None
    assert exc.details["keyPattern"] == {"_id": 1}
    assert exc.details["keyValue"] == {"_id": "a"}


def test_a_missing_field_is_a_null_key(db: Db) -> None:
    db.u.create_index("email", unique=True)
    db.u.insert_one({"_id": 1})
    assert errmsg(refused(db, {"_id": 2})) == message(db, "u", "email_1", "{ email: null }")


def test_a_compound_key_lists_its_fields_in_index_order(db: Db) -> None:
    db.u.create_index([("a", 1), ("b", -1)], unique=True)
    db.u.insert_one({"b": "x", "a": 1})
    exc = refused(db, {"a": 1, "b": "x"})
    assert errmsg(exc) == message(db, "u", "a_1_b_-1", '{ a: 1, b: "x" }')
    assert exc.details is not None
    assert exc.details["keyPattern"] == {"a": 1, "b": -1}
    assert exc.details["keyValue"] == {"a": 1, "b": "x"}


def test_a_multikey_duplicate_shows_the_shared_element(db: Db) -> None:
    db.s.create_index("connections.id", unique=True)
    db.s.insert_one({"_id": "u1", "connections": [{"id": "c1"}, {"id": "c2"}]})
    exc = refused(db, {"_id": "u2", "connections": [{"id": "c3"}, {"id": "c2"}]}, coll="s")
    assert errmsg(exc) == message(db, "s", "connections.id_1", '{ connections.id: "c2" }')


def test_a_subdocument_key_is_shown_as_a_document(db: Db) -> None:
    db.u.create_index("profile", unique=True)
    db.u.insert_one({"profile": {"lang": "en", "tz": 1}})
    assert errmsg(refused(db, {"profile": {"lang": "en", "tz": 1}})) == message(
        db, "u", "profile_1", '{ profile: { lang: "en", tz: 1 } }')


def test_booleans_and_dates_are_shown_as_mongodb_shows_them(db: Db) -> None:
    at = dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.UTC)
    db.u.create_index([("flag", 1), ("at", 1)], unique=True)
    db.u.insert_one({"flag": True, "at": at})
    assert errmsg(refused(db, {"flag": True, "at": at})) == message(
        db, "u", "flag_1_at_1", "{ flag: true, at: new Date(1700000000000) }")


def test_an_update_into_a_duplicate_gets_the_same_message(db: Db) -> None:
    db.users.create_index("username", unique=True)
    db.users.insert_many([{"_id": 1, "username": "a"}, {"_id": 2, "username": "b"}])
    with pytest.raises(DuplicateKeyError) as exc:
        db.users.update_one({"_id": 2}, {"$set": {"username": "a"}})
    assert errmsg(exc.value) == message(db, "users", "username_1", '{ username: "a" }')


def test_an_upsert_into_a_duplicate_gets_the_same_message(db: Db) -> None:
    db.users.create_index("username", unique=True)
    db.users.insert_one({"_id": 1, "username": "a"})
    with pytest.raises(DuplicateKeyError) as exc:
        db.users.update_one({"_id": 2}, {"$set": {"username": "a"}}, upsert=True)
    assert errmsg(exc.value) == message(db, "users", "username_1", '{ username: "a" }')


def test_find_one_and_update_into_a_duplicate_gets_the_same_message(db: Db) -> None:
    db.users.create_index("username", unique=True)
    db.users.insert_many([{"_id": 1, "username": "a"}, {"_id": 2, "username": "b"}])
    with pytest.raises(DuplicateKeyError) as exc:
        db.users.find_one_and_update({"_id": 2}, {"$set": {"username": "a"}},
                                     return_document=ReturnDocument.AFTER)
    assert errmsg(exc.value) == message(db, "users", "username_1", '{ username: "a" }')


def test_a_bulk_write_reports_the_message_per_statement(db: Db) -> None:
    db.u.insert_one({"_id": 1})
    with pytest.raises(BulkWriteError) as exc:
        db.u.bulk_write([InsertOne({"_id": 2}), InsertOne({"_id": 1})], ordered=False)
    (error,) = exc.value.details["writeErrors"]
    assert error["index"] == 1
    assert error["code"] == 11000
    assert error["errmsg"] == message(db, "u", "_id_", "{ _id: 1 }")


def test_a_unique_index_over_duplicates_fails_with_the_duplicate_key(db: Db) -> None:
    db.u.insert_many([{"email": "a@x"}, {"email": "a@x"}])
    with pytest.raises(OperationFailure) as exc:
        db.u.create_index("email", unique=True)
    assert exc.value.code == 11000
    # MongoDB prefixes the index build's context; the key part is the same.
    assert message(db, "u", "email_1", '{ email: "a@x" }') in str(exc.value.details)
