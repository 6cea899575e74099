"""The emulator's indexes: a query answered through them returns what a scan returns, and
they stay in step with the documents on every write path.

An index only proposes candidates; the full filter then decides. So the property is
simple to state: for random documents, random indexes and random queries over the
operators presenced and Rocket.Chat use ($eq, $in, $gt/$gte/$lt/$lte, $exists,
$elemMatch, dotted paths into arrays of documents), ``Storage.find`` returns exactly the
documents that mongomock-ng's ``filter_applies`` accepts in a scan, in natural order (an
``_id`` lookup in the order of its values). And after any sequence of writes (inserts,
updates with arrayFilters and the positional operator, replacements, deletes,
findAndModify, writes that fail half-way, a transaction's abort, dropped and recreated
indexes, a snapshot saved and loaded, the TTL monitor), every index holds exactly the
entries recomputed from the documents.

These drive the storage layer in-process (no server), so they run the same whatever
``PRESENCED_TEST_MONGO_URL`` says.
"""

from __future__ import annotations

import datetime as dt
import math
import pickle
from contextlib import suppress
from typing import Any

import pytest
from bson import ObjectId
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mongomock_ng.filtering import filter_applies

from presenced.testing.mongo.indexes import DocumentTable, lookup_entries
from presenced.testing.mongo.storage import Storage, Transaction, sort_documents

Doc = dict[str, Any]
DB, COLL = "db", "c"

OID_1 = ObjectId("64b000000000000000000001")
OID_2 = ObjectId("64b000000000000000000002")
DAY_1 = dt.datetime(2024, 1, 1, 12, 0, 0)
DAY_2 = dt.datetime(2024, 6, 1, 8, 30, 0)

# Every type the index orders, the values Python's equality merges (0, False, 0.0; 1,
# True, 1.0), NaN, and an ObjectId's hex string (mongomock-ng matches it inside arrays).
# Each example draws a few of them, so that its documents and queries meet.
SCALARS = [None, True, False, 0, 1, 2, -1, 0.0, 1.0, 1.5, "a", "b", "c", "", OID_1, OID_2,
           str(OID_1), DAY_1, DAY_2, math.nan]
pools = st.lists(st.sampled_from(SCALARS), min_size=1, max_size=6, unique_by=repr)

# What the planner may serve: _id, single fields, dotted paths into arrays of documents
# (Rocket.Chat's usersSessions indexes), a compound index (first field served).
INDEXES: dict[str, Doc] = {
    "a_1": {"key": {"a": 1}},
    "a.b_1": {"key": {"a.b": 1}},
    "a.id_-1": {"key": {"a.id": -1}},
    "connections.id_1": {"key": {"connections.id": 1}, "sparse": True},
    "connections.instanceId_1": {"key": {"connections.instanceId": 1}, "sparse": True},
    "x_1_y_1": {"key": {"x": 1, "y": 1}},
    "y_1_partial": {"key": {"y": 1}, "partialFilterExpression": {"y": {"$exists": True}}},
}
ALL_INDEXES = frozenset(INDEXES)
index_sets = st.one_of(st.just(ALL_INDEXES), st.sets(st.sampled_from(sorted(INDEXES))))
PATHS = ["_id", "a", "a.b", "a.id", "x", "y", "connections.id", "connections.instanceId",
         "connections", "z"]
RANGE_OPS = ["$gt", "$gte", "$lt", "$lte"]
SET_PATHS = ["a", "a.b", "x", "y", "connections", "z", "a.id"]


class Vocabulary:
    """Documents, queries and writes built from one pool of scalars."""

    def __init__(self, pool: list[Any]) -> None:
        scalars = st.sampled_from(pool)
        self.subdocs = st.fixed_dictionaries({}, optional={
            "id": scalars, "instanceId": scalars, "b": scalars})
        self.values = st.one_of(
            scalars, st.lists(scalars, max_size=3), st.lists(self.subdocs, max_size=3),
            self.subdocs, st.lists(st.lists(scalars, max_size=2), max_size=2))
        self.documents = st.fixed_dictionaries({}, optional={
            "a": self.values, "x": self.values, "y": scalars, "connections": st.one_of(
                st.lists(self.subdocs, max_size=3), self.subdocs, scalars)})
        fields = st.sampled_from(["id", "instanceId", "b"])
        ranges = st.sampled_from(RANGE_OPS)
        conditions = st.one_of(
            scalars,
            st.builds(lambda v: {"$eq": v}, scalars),
            st.builds(lambda vs: {"$in": vs}, st.lists(scalars, max_size=4)),
            st.builds(lambda op, v: {op: v}, ranges, scalars),
            st.builds(lambda low, high: {"$gte": low, "$lt": high}, scalars, scalars),
            st.builds(lambda b: {"$exists": b}, st.booleans()),
            st.builds(lambda v: {"$in": [v], "$exists": True}, scalars),
            st.builds(lambda f, v: {"$elemMatch": {f: v}}, fields, scalars),
            st.builds(lambda f, op, v: {"$elemMatch": {f: {op: v}}}, fields, ranges, scalars),
        )
        clauses = st.dictionaries(st.sampled_from(PATHS), conditions, max_size=3)
        self.queries = st.one_of(clauses, st.builds(
            lambda cs: {"$and": cs}, st.lists(clauses, min_size=1, max_size=3)))
        paths = st.sampled_from(SET_PATHS)
        self.updates = st.one_of(
            st.builds(lambda p, v: {"$set": {p: v}}, paths, self.values),
            st.builds(lambda p: {"$unset": {p: ""}}, paths),
            st.builds(lambda d: {"$push": {"connections": d}}, self.subdocs),
            st.builds(lambda v: {"$pull": {"connections": {"id": v}}}, scalars),
            st.builds(lambda v: {"$addToSet": {"a": v}}, scalars),
            st.just({"$inc": {"y": 1}}),  # fails on a non-number: a write stopped half-way
            st.builds(lambda v: {"$set": {"y": v}, "$inc": {"x": 1}}, scalars),
        )
        self.writes = st.one_of(
            st.tuples(st.just("insert"), self.documents),
            st.tuples(st.just("update"), self.queries, self.updates, st.booleans(),
                      st.booleans()),
            st.tuples(st.just("array_filters"), scalars, scalars, st.booleans()),
            st.tuples(st.just("positional"), scalars, scalars),
            st.tuples(st.just("replace"), self.queries, self.documents),
            st.tuples(st.just("delete"), self.queries, st.booleans()),
            st.tuples(st.just("find_and_modify"), self.queries, self.updates, st.booleans(),
                      st.booleans()),
            st.tuples(st.just("find_and_remove"), self.queries),
            st.tuples(st.just("abort"), st.lists(st.tuples(self.queries, self.updates),
                                                 min_size=1, max_size=3), self.documents),
            st.tuples(st.just("reindex"), st.sampled_from(sorted(INDEXES))),
        )


def held(storage: Storage) -> Storage:
    """The storage with its lock held by this thread for good, as the command layer holds
    it around every call."""
    storage.lock.acquire()
    return storage


def new_storage(indexes: list[str], *, always_plan: bool = True) -> Storage:
    """A storage with one collection and ``indexes``. ``always_plan``: candidates are used
    however many there are (a real table scans past half the collection, which would
    hide a wrong candidate set from these small random collections)."""
    storage = held(Storage())
    storage.create_collection(DB, COLL, implicit=True)
    for name in indexes:
        storage.create_index(DB, COLL, {"name": name, **INDEXES[name]})
    if always_plan:
        table(storage).scan_share = math.inf
    return storage


def table(storage: Storage) -> DocumentTable:
    documents: DocumentTable = storage.mm(DB, COLL)._store._documents
    return documents


def ids(docs: list[Doc]) -> list[Any]:
    return [d["_id"] for d in docs]


def scan(storage: Storage, query: Doc) -> list[Any]:
    """The documents a scan matches, in natural order (no index involved)."""
    return [d["_id"] for d in list(table(storage).values()) if filter_applies(query, d)]


def run_query(storage: Storage, query: Doc) -> tuple[list[Any] | None, type | None]:
    try:
        return ids(storage.find(DB, COLL, query)), None
    except Exception as exc:
        return None, type(exc)


def assert_find_equals_scan(storage: Storage, query: Doc) -> None:
    try:
        expected = scan(storage, query)
    except Exception as exc:
        _, raised = run_query(storage, query)
        assert raised is type(exc), f"{query}: a scan raises {exc!r}, find raised {raised}"
        return
    got, raised = run_query(storage, query)
    assert raised is None, f"{query}: find raised {raised}, a scan matches {expected}"
    assert got is not None
    if isinstance(query.get("_id"), dict) and "$in" in query["_id"]:
        position = {k: i for i, k in enumerate(expected)}
        assert sorted(got, key=lambda k: position.get(k, -1)) == expected, query
    else:
        assert got == expected, query


def _as_set(entries: Any) -> frozenset[Any]:
    return entries if type(entries) is frozenset else frozenset((entries,))


def _holders(posting: Any) -> set[Any]:
    return set(posting) if isinstance(posting, set) else {posting}


def assert_indexes_consistent(storage: Storage) -> None:
    """Every index holds exactly what its documents give when recomputed from scratch."""
    documents = table(storage)
    for path, index in documents.paths.items():
        expected = {k: lookup_entries(path, d) for k, d in documents.items()}
        assert {k: _as_set(e) for k, e in index.entries.items()} == {
            k: e for k, e in expected.items() if e}, path
        postings: dict[Any, set[Any]] = {}
        for k, entries in expected.items():
            for entry in entries:
                postings.setdefault(entry, set()).add(k)
        assert {e: _holders(p) for e, p in index.postings.items()} == postings, path
        for rank, ordered in index.ordered.items():
            assert ordered == sorted(ordered), path
            assert {(rank, v) for v in ordered} == {
                e for e in postings if type(e) is tuple and e[0] == rank}, path
    for unique in documents.uniques.values():
        keys: dict[Any, set[Any]] = {}
        for k, d in documents.items():
            for key in unique.keys(d):
                keys.setdefault(key, set()).add(k)
        assert {key: _holders(h) for key, h in unique.holders.items()} == keys, unique.name
    assert list(documents._seq) == list(documents), "natural order and sequence disagree"


def seed(storage: Storage, docs: list[Doc]) -> None:
    for i, doc in enumerate(docs):
        # Mixed _id types: the _id index orders strings and numbers apart.
        storage.insert(DB, COLL, {"_id": i if i % 3 else f"k{i:03d}", **doc})


# -------------------------------------------------------------------------- reads


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), pool=pools, indexes=index_sets, always_plan=st.booleans())
def test_find_through_indexes_returns_what_a_scan_returns(
    data: st.DataObject, pool: list[Any], indexes: frozenset[str], always_plan: bool
) -> None:
    words = Vocabulary(pool)
    storage = new_storage(sorted(indexes), always_plan=always_plan)
    seed(storage, data.draw(st.lists(words.documents, min_size=4, max_size=30)))
    for query in data.draw(st.lists(words.queries, min_size=4, max_size=12)):
        assert_find_equals_scan(storage, query)


# _id values of every type the _id index orders (False is free: 0 is stored as "k000").
ODD_IDS = [None, False, 2.5, OID_1, DAY_1, "", "zz", -7]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), pool=pools, indexes=index_sets,
       odd_ids=st.lists(st.sampled_from(ODD_IDS), unique_by=repr, max_size=4),
       direction=st.sampled_from([1, -1]), skip=st.integers(0, 3), limit=st.integers(0, 6))
def test_a_sort_on_id_returns_the_order_and_page_a_full_sort_gives(
    data: st.DataObject, pool: list[Any], indexes: frozenset[str], odd_ids: list[Any],
    direction: int, skip: int, limit: int,
) -> None:
    words = Vocabulary(pool)
    storage = new_storage(sorted(indexes))
    seed(storage, data.draw(st.lists(words.documents, min_size=2, max_size=30)))
    for _id in odd_ids:
        storage.insert(DB, COLL, {"_id": _id, **data.draw(words.documents)})
    queries = data.draw(st.lists(words.queries, min_size=2, max_size=8))
    queries += [{"_id": {"$gt": "k003"}}, {"$and": [{"_id": {"$type": "string", "$gt": "k"}},
                                                    {"a": {"$exists": True}}]},
                {"_id": {"$gte": 2, "$lt": 10}}, {"_id": {"$lte": DAY_1}}]
    sort = [("_id", direction)]
    for query in queries:
        try:
            matched = [d for d in list(table(storage).values()) if filter_applies(query, d)]
        except Exception as exc:
            _, raised = run_query(storage, query)
            assert raised is type(exc), query
            continue
        expected = ids(sort_documents(matched, sort))[skip:skip + limit if limit else None]
        got = ids(storage.find(DB, COLL, query, sort=sort, skip=skip, limit=limit))
        assert got == expected, (query, sort, skip, limit)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), pool=pools,
       wanted=st.lists(st.integers(min_value=0, max_value=30), max_size=12))
def test_id_in_returns_the_documents_in_the_order_of_the_values(
    data: st.DataObject, pool: list[Any], wanted: list[int]
) -> None:
    storage = new_storage([])
    seed(storage, data.draw(st.lists(Vocabulary(pool).documents, min_size=1, max_size=20)))
    values = [i if i % 3 else f"k{i:03d}" for i in wanted]
    got = ids(storage.find(DB, COLL, {"_id": {"$in": values}}))
    present = set(scan(storage, {}))
    assert got == list(dict.fromkeys(v for v in values if v in present))


# Corners of mongomock-ng's matching the candidates must cover, each once for sure
# (the random tests meet them only now and then).
CORNERS: list[tuple[str, list[Doc], Doc]] = [
    ("true equals 1", [{"a": True}, {"a": 1}, {"a": 1.0}, {"a": 2}], {"a": 1}),
    ("1 equals true", [{"a": True}, {"a": 1}, {"a": [0, True]}], {"a": {"$eq": True}}),
    ("0 is false in $in", [{"a": False}, {"a": 0.0}, {"a": "0"}], {"a": {"$in": [0]}}),
    ("null matches a missing field", [{"a": None}, {}, {"b": 1}, {"a": [None]}],
     {"a": None}),
    ("null in $in matches a missing field", [{}, {"a": 1}], {"a": {"$in": [None, 1]}}),
    ("null matches an element without the field",
     [{"connections": [{"id": "c1"}, {}]}, {"connections": []}, {"connections": [{"id": 2}]}],
     {"connections.id": None}),
    ("$exists false matches an empty array's subfield",
     [{"connections": []}, {"connections": 5}, {"connections": [{"id": 1}]}, {}],
     {"connections.id": {"$exists": False}}),
    ("$gte null matches null", [{"a": None}, {"a": [None, 1]}, {}, {"a": 0}],
     {"a": {"$gte": None}}),
    ("$lte null matches null", [{"a": None}, {"a": 0}], {"a": {"$lte": None}}),
    ("NaN equals NaN", [{"a": math.nan}, {"a": [1, math.nan]}, {"a": 1}], {"a": math.nan}),
    ("an ObjectId equals its hex string in an array",
     [{"a": [str(OID_1)]}, {"a": str(OID_1)}, {"a": OID_1}], {"a": OID_1}),
    ("ranges stay within one type", [{"a": 5}, {"a": "5"}, {"a": True}, {"a": DAY_1}],
     {"a": {"$gt": 1}}),
    ("two bounds may hold on two elements", [{"a": [1, 10]}, {"a": [5]}],
     {"a": {"$gt": 8, "$lt": 3}}),
    ("$elemMatch through a dotted index", [{"connections": [{"id": "c1", "b": 1}]},
                                           {"connections": [{"id": "c1"}, {"b": 1}]}],
     {"connections": {"$elemMatch": {"id": "c1", "b": 1}}}),
    ("$elemMatch on a subdocument, not an array",
     [{"connections": {"id": "c1"}}, {"connections": [{"id": "c1"}]}],
     {"connections": {"$elemMatch": {"id": "c1"}}}),
    ("an array of arrays", [{"a": [[1, 2]]}, {"a": [1]}], {"a": 1}),
    ("dates compare as dates", [{"a": DAY_1}, {"a": DAY_2}, {"a": "2024"}],
     {"a": {"$lt": DAY_2}}),
    ("$and of clauses", [{"a": 1, "x": 2}, {"a": 1}], {"$and": [{"a": 1}, {"x": {"$gte": 2}}]}),
]


@pytest.mark.parametrize(("docs", "query"), [(d, q) for _, d, q in CORNERS],
                         ids=[name for name, _, _ in CORNERS])
def test_candidates_cover_a_corner_of_the_matching(docs: list[Doc], query: Doc) -> None:
    storage = new_storage(sorted(ALL_INDEXES))
    seed(storage, docs)
    assert scan(storage, query), "the corner matches something"
    assert_find_equals_scan(storage, query)


def test_a_query_on_an_indexed_field_reads_only_its_candidates() -> None:
    storage = new_storage(["connections.id_1"])
    for i in range(200):
        storage.insert(DB, COLL, {"_id": f"u{i}", "connections": [{"id": f"c{i}"}]})
    docs, rest = table(storage).plan({"connections.id": "c7"})
    assert ids(docs) == ["u7"]
    assert rest == {"connections.id": "c7"}  # the full filter still runs on them


def test_an_id_lookup_alone_needs_no_filter_on_its_documents() -> None:
    storage = new_storage([])
    for i in range(10):
        storage.insert(DB, COLL, {"_id": i})
    docs, rest = table(storage).plan({"_id": {"$in": [3, 1, 3, 42]}})
    assert ids(docs) == [3, 1]
    assert rest is None


def test_a_range_on_id_is_served_by_the_id_index() -> None:
    storage = new_storage([])
    for i in range(100):
        storage.insert(DB, COLL, {"_id": f"u{i:03d}"})
    storage.insert(DB, COLL, {"_id": 5})
    docs, _ = table(storage).plan({"_id": {"$type": "string", "$gt": "u094"}})
    assert ids(docs) == ["u095", "u096", "u097", "u098", "u099"]


# -------------------------------------------------------------------------- writes

Write = tuple[Any, ...]


def apply(storage: Storage, write: Write, counter: list[int]) -> None:
    kind = write[0]
    counter[0] += 1
    if kind == "insert":
        storage.insert(DB, COLL, {"_id": f"n{counter[0]}", **write[1]})
    elif kind == "update":
        _, query, update, multi, upsert = write
        storage.update(DB, COLL, query, update, multi=multi, upsert=upsert)
    elif kind == "array_filters":
        _, old, new, multi = write
        storage.update(DB, COLL, {"connections.id": old},
                       {"$set": {"connections.$[c].id": new}}, multi=multi, upsert=False,
                       array_filters=[{"c.id": old}])
    elif kind == "positional":
        _, old, new = write
        storage.update(DB, COLL, {"connections.id": old},
                       {"$set": {"connections.$.instanceId": new}}, multi=False, upsert=False)
    elif kind == "replace":
        _, query, doc = write
        storage.update(DB, COLL, query, doc, multi=False, upsert=False)
    elif kind == "delete":
        _, query, multi = write
        storage.delete(DB, COLL, query, multi=multi)
    elif kind == "find_and_modify":
        _, query, update, upsert, new = write
        storage.find_and_modify(DB, COLL, query=query, sort=None, remove=False, update=update,
                                new=new, fields=None, upsert=upsert, array_filters=None)
    elif kind == "find_and_remove":
        storage.find_and_modify(DB, COLL, query=write[1], sort=[("y", -1)], remove=True,
                                update=None, new=False, fields=None, upsert=False,
                                array_filters=None)
    elif kind == "abort":
        _, statements, doc = write
        txn = Transaction({"id": b"s"}, counter[0])
        storage.active_txn = txn
        try:
            storage.insert(DB, COLL, {"_id": f"t{counter[0]}", **doc})
            for query, update in statements:
                with suppress(Exception):
                    storage.update(DB, COLL, query, update, multi=True, upsert=False)
            storage.delete(DB, COLL, {}, multi=False)
        finally:
            storage.active_txn = None
            storage.abort_transaction(txn)
    elif kind == "reindex":
        name = write[1]
        if any(ix["name"] == name for ix in storage.list_indexes(DB, COLL)):
            storage.drop_indexes(DB, COLL, name)
        else:
            storage.create_index(DB, COLL, {"name": name, **INDEXES[name]})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), pool=pools, indexes=index_sets)
def test_every_write_path_keeps_the_indexes_in_step_with_the_documents(
    data: st.DataObject, pool: list[Any], indexes: frozenset[str]
) -> None:
    words = Vocabulary(pool)
    storage = new_storage(sorted(indexes))
    seed(storage, data.draw(st.lists(words.documents, min_size=2, max_size=15)))
    counter = [0]
    steps = data.draw(st.lists(st.tuples(words.writes, words.queries), min_size=2,
                               max_size=12))
    for write, query in steps:
        with suppress(Exception):  # a refused write must leave the indexes right too
            apply(storage, write, counter)
        assert_indexes_consistent(storage)
        assert_find_equals_scan(storage, query)


@settings(max_examples=50, deadline=None)
@given(data=st.data(), pool=pools, indexes=index_sets)
def test_a_snapshot_loads_with_its_indexes_rebuilt(
    data: st.DataObject, pool: list[Any], indexes: frozenset[str]
) -> None:
    words = Vocabulary(pool)
    storage = new_storage(sorted(indexes))
    seed(storage, data.draw(st.lists(words.documents, max_size=15)))
    query_list = data.draw(st.lists(words.queries, min_size=1, max_size=5))
    loaded = held(Storage())
    loaded.load(pickle.loads(pickle.dumps(storage.dump())))
    assert_indexes_consistent(loaded)
    assert sorted(table(loaded).paths) == sorted(table(storage).paths)
    for query in query_list:
        assert run_query(loaded, query) == run_query(storage, query)


def test_dropping_a_collection_empties_its_indexes() -> None:
    storage = new_storage(["connections.id_1"])
    storage.insert(DB, COLL, {"_id": 1, "connections": [{"id": "c1"}]})
    storage.drop_collection(DB, COLL)
    storage.create_collection(DB, COLL, implicit=True)
    storage.create_index(DB, COLL, {"name": "connections.id_1",
                                    **INDEXES["connections.id_1"]})
    assert storage.find(DB, COLL, {"connections.id": "c1"}) == []
    assert_indexes_consistent(storage)


def test_the_ttl_monitor_deletions_leave_the_indexes_in_step() -> None:
    now = [1_700_000_000.0]
    storage = held(Storage(wall=lambda: now[0]))
    storage.create_index(DB, COLL, {"name": "_updatedAt_1", "key": {"_updatedAt": 1},
                                    "expireAfterSeconds": 60})
    storage.create_index(DB, COLL, {"name": "connections.id_1",
                                    **INDEXES["connections.id_1"]})
    start = storage.now()
    for i in range(6):
        storage.insert(DB, COLL, {"_id": i, "_updatedAt": start + dt.timedelta(seconds=10 * i),
                                  "connections": [{"id": f"c{i}"}]})
    now[0] += 105  # documents 0..4 (written at +0 s .. +40 s) are older than 60 s
    assert storage.expire_ttl() == 5
    assert_indexes_consistent(storage)
    assert ids(storage.find(DB, COLL, {"_updatedAt": {"$gte": start}})) == [5]
    assert ids(storage.find(DB, COLL, {"connections.id": {"$in": ["c1", "c5"]}})) == [5]


def test_a_unique_index_is_checked_by_its_keys_not_a_scan() -> None:
    storage = new_storage([])
    storage.create_index(DB, COLL, {"name": "u_1", "key": {"u": 1}, "unique": True})
    for i in range(50):
        storage.insert(DB, COLL, {"_id": i, "u": f"name{i}"})
    unique = table(storage).uniques["u_1"]
    assert len(unique.holders) == 50
    assert table(storage).unique_clash(99, {"_id": 99, "u": "name7"}) is not None
    assert table(storage).unique_clash(7, {"_id": 7, "u": "name7"}) is None


def test_a_failed_update_leaves_the_indexes_as_the_documents_are() -> None:
    """mongomock-ng changes a document in place before storing it; a statement that
    fails half-way ($set applied, then $inc refused) still leaves the index right."""
    storage = new_storage(["a_1"])
    storage.insert(DB, COLL, {"_id": 1, "a": "old", "x": "not a number"})
    with pytest.raises(Exception):  # noqa: B017 - whichever error mongomock-ng raises
        storage.update(DB, COLL, {"_id": 1}, {"$set": {"a": "new"}, "$inc": {"x": 1}},
                       multi=False, upsert=False)
    assert_indexes_consistent(storage)
    assert_find_equals_scan(storage, {"a": "new"})
    assert_find_equals_scan(storage, {"a": "old"})


def test_rocket_chat_disconnect_write_reads_only_its_index_candidates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rocket.Chat's verbatim disconnect, ``updateMany({"connections.id": c}, {$pull:
    {connections: {id: c}}})``, on a collection with its UsersSessions indexes: the write
    tests the one candidate the index proposes, not every document (issue 10's storm
    benchmark gave up when it scanned)."""
    storage = new_storage(["connections.id_1", "connections.instanceId_1"], always_plan=False)
    for i in range(2000):
        storage.insert(DB, COLL, {"_id": f"u{i}", "connections": [
            {"id": f"c{i}", "instanceId": "i1", "status": "online"}]})
    tested: list[int] = []
    real_plan = DocumentTable.plan

    def spy(self: DocumentTable, filter: Any) -> Any:
        docs, rest = real_plan(self, filter)
        tested.append(len(docs))
        return docs, rest

    monkeypatch.setattr(DocumentTable, "plan", spy)
    outcome = storage.update(DB, COLL, {"connections.id": "c1234"},
                             {"$pull": {"connections": {"id": "c1234"}}},
                             multi=True, upsert=False)
    assert outcome.modified == 1
    assert tested and max(tested) == 1
