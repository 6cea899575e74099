"""Conformance suite: multi-document transactions on a replica set, as MongoDB 7.0 does them.

Only pymongo's public API is used, so the tests run unchanged against a real replica set
(``PRESENCED_TEST_MONGO_URL``); the one marked ``emulator_only`` relies on the emulator
ending a session's transaction as soon as ``endSessions`` arrives (a real server does it
when it reaps the session).

What MongoDB documents (manual: "Transactions", "Production Considerations", "Change
Events"; server: ``op_observer_impl.cpp``, ``transaction_participant.cpp``):

- a committed (unprepared) transaction is logged as one oplog entry
  ``{op: "c", ns: "admin.$cmd", o: {applyOps: [<CRUD entries>]}, lsid, txnNumber,
  prevOpTime: {ts: Timestamp(0, 0), t: -1}}`` (a large one is split into several entries
  chained by ``prevOpTime`` with ``partialTxn``; ours are small);
- its writes appear in change streams as one event per operation, in order, all with the
  commit's ``clusterTime`` and carrying ``lsid`` and ``txnNumber``; each has its own resume
  token;
- an aborted transaction leaves no oplog entry and no event, and its writes are undone;
- ``commitTransaction`` / ``abortTransaction`` for a transaction that does not exist fail
  with 251 NoSuchTransaction; committing again after a commit succeeds (commit is
  retryable); a write error inside a transaction aborts it; a newer txnNumber on the same
  session aborts the older transaction in progress (and the old number is then
  TransactionTooOld, 225).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

import pytest
from bson import Binary, Int64, Timestamp
from pymongo import MongoClient, monitoring
from pymongo.change_stream import ChangeStream
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, OperationFailure

from presenced.testing.mongo.diff import apply_v2_diff

Doc = dict[str, Any]
Stream = ChangeStream[Doc]

TIMEOUT = 10.0
AWAIT_MS = 200

T0 = datetime(2024, 5, 1, 12, 0, 0, 123000)
T1 = datetime(2024, 5, 1, 12, 5, 0, 456000)


# --------------------------------------------------------------------------------------------
# helpers


class CommitListener(monitoring.CommandListener):
    """Remembers the txnNumber of every commitTransaction the client sends."""

    def __init__(self) -> None:
        self.commit_txn_numbers: list[int] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "commitTransaction":
            self.commit_txn_numbers.append(int(event.command["txnNumber"]))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
def listener() -> CommitListener:
    return CommitListener()


@pytest.fixture
def tclient(mongo_url: str, listener: CommitListener) -> Iterator[MongoClient[Doc]]:
    c: MongoClient[Doc] = MongoClient(
        mongo_url, serverSelectionTimeoutMS=10_000, event_listeners=[listener]
    )
    yield c
    c.close()


@pytest.fixture
def tdb(tclient: MongoClient[Doc], db: Database[Doc]) -> Database[Doc]:
    """The test's fresh database, seen through the listening client."""
    return tclient[db.name]


def newest_ts(client: MongoClient[Doc]) -> Timestamp:
    entry = client.local["oplog.rs"].find_one({}, sort=[("$natural", -1)])
    assert entry is not None, "the oplog is empty"
    ts = entry["ts"]
    assert isinstance(ts, Timestamp)
    return ts


def session_entries(client: MongoClient[Doc], since: Timestamp, lsid: Mapping[str, Any]
                    ) -> list[Doc]:
    """Oplog entries written after ``since`` on behalf of session ``lsid``."""
    query = {"ts": {"$gt": since}, "lsid.id": lsid["id"]}
    return list(client.local["oplog.rs"].find(query).sort("$natural", 1))


def ns_entries(client: MongoClient[Doc], since: Timestamp, ns: str) -> list[Doc]:
    return list(client.local["oplog.rs"].find({"ts": {"$gt": since}, "ns": ns}))


def events_until(stream: Stream, last: Callable[[Doc], bool]) -> list[Doc]:
    events: list[Doc] = []
    deadline = time.monotonic() + TIMEOUT
    while True:
        if time.monotonic() > deadline:
            pytest.fail(f"terminating event not seen before the deadline; got {events!r}")
        event = stream.try_next()
        if event is None:
            continue
        events.append(event)
        if last(event):
            return events


def is_sentinel(ev: Doc) -> bool:
    return ev.get("operationType") == "insert" and ev["ns"]["coll"] == "sentinel"


def until_sentinel(stream: Stream, db: Database[Doc]) -> list[Doc]:
    """Writes a sentinel document, then returns the events before its insert: proves that
    nothing else was delivered in between, without waiting an arbitrary time."""
    db.sentinel.insert_one({"_id": "sentinel"})
    return events_until(stream, is_sentinel)[:-1]


def seed_presence(db: Database[Doc]) -> None:
    """Two users with one connection each, shaped as Rocket.Chat writes them."""
    for uid, conn in (("u1", "c1"), ("u2", "c2")):
        db.users.insert_one({"_id": uid, "username": uid, "status": "online",
                             "statusConnection": "online", "active": True})
        db.usersSessions.insert_one({"_id": uid, "connections": [
            {"id": conn, "instanceId": "i1", "status": "online", "_createdAt": T0,
             "_updatedAt": T0}]})


def presence_transaction(db: Database[Doc], s: ClientSession) -> None:
    """Two usersSessions ``$push`` and one users ``$set``, in this order."""
    db.usersSessions.update_one(
        {"_id": "u1"},
        {"$push": {"connections": {"id": "c3", "instanceId": "i2", "status": "away",
                                   "_createdAt": T1, "_updatedAt": T1}}},
        session=s,
    )
    db.usersSessions.update_one(
        {"_id": "u2"},
        {"$push": {"connections": {"id": "c4", "instanceId": "i2", "status": "busy",
                                   "_createdAt": T1, "_updatedAt": T1}}},
        session=s,
    )
    db.users.update_one({"_id": "u1"}, {"$set": {"status": "away", "statusText": "lunch"}},
                        session=s)


def snapshot(db: Database[Doc], *colls: str) -> dict[str, list[Doc]]:
    return {c: sorted(db[c].find(), key=lambda d: str(d["_id"])) for c in colls}


# --------------------------------------------------------------------------------------------
# commit


def test_commit_writes_one_applyops_entry_with_every_operation_in_order(
    tclient: MongoClient[Doc], tdb: Database[Doc], listener: CommitListener
) -> None:
    seed_presence(tdb)
    before = {("usersSessions", d["_id"]): d for d in tdb.usersSessions.find()}
    before.update({("users", d["_id"]): d for d in tdb.users.find()})
    since = newest_ts(tclient)
    with tclient.start_session() as s:
        with s.start_transaction():
            presence_transaction(tdb, s)
            # Reads inside the transaction see its own writes.
            seen = tdb.users.find_one({"_id": "u1"}, session=s)
            assert seen is not None and seen["status"] == "away"
        entries = session_entries(tclient, since, s.session_id)
        lsid = s.session_id

    assert len(entries) == 1, entries
    entry = entries[0]
    assert entry["op"] == "c"
    assert entry["ns"] == "admin.$cmd"
    assert entry["lsid"]["id"] == lsid["id"]
    assert isinstance(entry["txnNumber"], int)
    assert listener.commit_txn_numbers == [entry["txnNumber"]]
    assert entry["prevOpTime"] == {"ts": Timestamp(0, 0), "t": -1}
    assert isinstance(entry["ts"], Timestamp)
    ops = entry["o"]["applyOps"]
    assert [(op["op"], op["ns"], op["o2"]["_id"]) for op in ops] == [
        ("u", f"{tdb.name}.usersSessions", "u1"),
        ("u", f"{tdb.name}.usersSessions", "u2"),
        ("u", f"{tdb.name}.users", "u1"),
    ]
    for op in ops:
        assert op["o"]["$v"] == 2
        assert "ui" in op
        assert "ts" not in op

    # No separate CRUD entries for the transaction's writes.
    assert ns_entries(tclient, since, f"{tdb.name}.usersSessions") == []
    assert ns_entries(tclient, since, f"{tdb.name}.users") == []

    # Applying the deltas in order to the documents as they were gives the final documents.
    docs = dict(before)
    for op in ops:
        key = (op["ns"].split(".", 1)[1], op["o2"]["_id"])
        docs[key] = apply_v2_diff(docs[key], op["o"]["diff"])
    after = {("usersSessions", d["_id"]): d for d in tdb.usersSessions.find()}
    after.update({("users", d["_id"]): d for d in tdb.users.find()})
    assert docs == after
    assert [c["id"] for c in after[("usersSessions", "u1")]["connections"]] == ["c1", "c3"]
    assert after[("users", "u1")]["statusText"] == "lunch"


def test_transaction_events_share_cluster_time_and_carry_the_session(
    tclient: MongoClient[Doc], tdb: Database[Doc]
) -> None:
    seed_presence(tdb)
    since = newest_ts(tclient)
    with tdb.watch(max_await_time_ms=AWAIT_MS) as stream:
        with tclient.start_session() as s:
            with s.start_transaction():
                presence_transaction(tdb, s)
            lsid = s.session_id
        events = until_sentinel(stream, tdb)
    (entry,) = session_entries(tclient, since, lsid)

    assert [(e["operationType"], e["ns"]["coll"], e["documentKey"]["_id"]) for e in events] == [
        ("update", "usersSessions", "u1"),
        ("update", "usersSessions", "u2"),
        ("update", "users", "u1"),
    ]
    assert {e["clusterTime"] for e in events} == {entry["ts"]}
    for e in events:
        assert e["lsid"]["id"] == lsid["id"]
        assert e["txnNumber"] == entry["txnNumber"]
    assert len({str(e["_id"]) for e in events}) == 3
    appended = events[0]["updateDescription"]["updatedFields"]
    assert appended == {"connections.1": {"id": "c3", "instanceId": "i2", "status": "away",
                                          "_createdAt": T1, "_updatedAt": T1}}
    assert events[2]["updateDescription"]["updatedFields"] == {"status": "away",
                                                               "statusText": "lunch"}

    # Resuming after the second event of the transaction yields only the third.
    with tdb.watch(resume_after=events[1]["_id"], max_await_time_ms=AWAIT_MS) as resumed:
        rest = events_until(resumed, is_sentinel)[:-1]  # the sentinel written above
    assert [e["_id"] for e in rest] == [events[2]["_id"]]
    assert rest[0]["documentKey"] == {"_id": "u1"}
    assert rest[0]["ns"]["coll"] == "users"


def test_commit_can_be_retried_and_writes_nothing_more(
    tclient: MongoClient[Doc], tdb: Database[Doc]
) -> None:
    seed_presence(tdb)
    since = newest_ts(tclient)
    with tclient.start_session() as s:
        s.start_transaction()
        tdb.users.update_one({"_id": "u2"}, {"$set": {"status": "busy"}}, session=s)
        s.commit_transaction()
        s.commit_transaction()  # a retried commit succeeds
        entries = session_entries(tclient, since, s.session_id)
    assert len(entries) == 1
    assert [op["o2"]["_id"] for op in entries[0]["o"]["applyOps"]] == ["u2"]


def test_transaction_of_reads_only_writes_no_entry(
    tclient: MongoClient[Doc], tdb: Database[Doc]
) -> None:
    seed_presence(tdb)
    since = newest_ts(tclient)
    with tclient.start_session() as s:
        with s.start_transaction():
            assert tdb.users.find_one({"_id": "u1"}, session=s) is not None
        assert session_entries(tclient, since, s.session_id) == []


# --------------------------------------------------------------------------------------------
# abort


def test_abort_restores_updated_inserted_and_deleted_documents(
    tclient: MongoClient[Doc], tdb: Database[Doc]
) -> None:
    seed_presence(tdb)
    tdb.usersSessions.insert_one({"_id": "u3", "connections": []})
    original = snapshot(tdb, "users", "usersSessions")
    since = newest_ts(tclient)
    with tdb.watch(max_await_time_ms=AWAIT_MS) as stream:
        with tclient.start_session() as s:
            s.start_transaction()
            presence_transaction(tdb, s)  # updates
            tdb.users.update_one({"_id": "u1"}, {"$set": {"status": "busy"}}, session=s)
            tdb.usersSessions.insert_one({"_id": "u4", "connections": []}, session=s)
            tdb.usersSessions.delete_one({"_id": "u3"}, session=s)
            tdb.users.delete_one({"_id": "u2"}, session=s)
            assert tdb.usersSessions.find_one({"_id": "u4"}, session=s) is not None
            s.abort_transaction()
            assert session_entries(tclient, since, s.session_id) == []
        events = until_sentinel(stream, tdb)
    assert events == []
    assert snapshot(tdb, "users", "usersSessions") == original


def test_failed_write_aborts_the_transaction(
    tclient: MongoClient[Doc], tdb: Database[Doc]
) -> None:
    seed_presence(tdb)
    original = snapshot(tdb, "users")
    since = newest_ts(tclient)
    with tclient.start_session() as s:
        with pytest.raises(DuplicateKeyError), s.start_transaction():
            tdb.users.update_one({"_id": "u1"}, {"$set": {"status": "offline"}}, session=s)
            tdb.users.insert_one({"_id": "u2"}, session=s)
        assert session_entries(tclient, since, s.session_id) == []
    assert snapshot(tdb, "users") == original


def test_newer_txn_number_aborts_the_transaction_in_progress(
    tclient: MongoClient[Doc], tdb: Database[Doc]
) -> None:
    tdb.create_collection("c")
    with tclient.start_session() as s:
        first = Int64(1_000)
        tdb.command({"insert": "c", "documents": [{"_id": "old"}], "txnNumber": first,
                     "startTransaction": True, "autocommit": False}, session=s)
        tdb.command({"insert": "c", "documents": [{"_id": "new"}], "txnNumber": Int64(1_001),
                     "startTransaction": True, "autocommit": False}, session=s)
        tclient.admin.command({"commitTransaction": 1, "txnNumber": Int64(1_001),
                               "autocommit": False}, session=s)
        with pytest.raises(OperationFailure) as exc:
            tclient.admin.command({"commitTransaction": 1, "txnNumber": first,
                                   "autocommit": False}, session=s)
        assert exc.value.code == 225  # TransactionTooOld
    assert [d["_id"] for d in tdb.c.find()] == ["new"]


@pytest.mark.emulator_only
def test_ending_the_session_aborts_its_transaction(
    emulator: Any, tclient: MongoClient[Doc], tdb: Database[Doc]
) -> None:
    tdb.create_collection("c")
    with tclient.start_session() as s:
        tdb.command({"insert": "c", "documents": [{"_id": "x"}], "txnNumber": Int64(2_000),
                     "startTransaction": True, "autocommit": False}, session=s)
        tclient.admin.command("endSessions", [s.session_id])
        with pytest.raises(OperationFailure) as exc:
            tclient.admin.command({"commitTransaction": 1, "txnNumber": Int64(2_000),
                                   "autocommit": False}, session=s)
        assert exc.value.code == 251
    assert list(tdb.c.find()) == []


# --------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("command", ["commitTransaction", "abortTransaction"])
def test_finishing_a_transaction_that_does_not_exist_is_no_such_transaction(
    tclient: MongoClient[Doc], command: str
) -> None:
    with tclient.start_session() as s, pytest.raises(OperationFailure) as exc:
        tclient.admin.command(
            {command: 1, "txnNumber": Int64(1 << 40), "autocommit": False}, session=s
        )
    assert exc.value.code == 251
    details: Mapping[str, Any] = exc.value.details or {}
    assert details.get("codeName") == "NoSuchTransaction"


def test_commit_after_abort_is_no_such_transaction(
    tclient: MongoClient[Doc], tdb: Database[Doc]
) -> None:
    tdb.create_collection("c")
    with tclient.start_session() as s:
        number = Int64(3_000)
        tdb.command({"insert": "c", "documents": [{"_id": 1}], "txnNumber": number,
                     "startTransaction": True, "autocommit": False}, session=s)
        tclient.admin.command({"abortTransaction": 1, "txnNumber": number,
                               "autocommit": False}, session=s)
        with pytest.raises(OperationFailure) as exc:
            tclient.admin.command({"commitTransaction": 1, "txnNumber": number,
                                   "autocommit": False}, session=s)
        assert exc.value.code == 251
    assert list(tdb.c.find()) == []


# --------------------------------------------------------------------------------------------
# emulator-only: lifetime limit, restart, nested applyOps


@pytest.fixture
def own_emulator() -> Iterator[Any]:
    from presenced.testing.mongo import MongoEmulator

    emu = MongoEmulator(transaction_lifetime=0.4)
    emu.start()
    yield emu
    emu.close()


def _start_insert(c: MongoClient[Doc], s: ClientSession, number: int, doc_id: Any) -> None:
    c.t.c.database.command(
        {"insert": "c", "documents": [{"_id": doc_id}], "txnNumber": Int64(number),
         "startTransaction": True, "autocommit": False}, session=s,
    )


@pytest.mark.emulator_only
def test_transaction_past_its_lifetime_is_aborted(own_emulator: Any) -> None:
    c: MongoClient[Doc] = MongoClient(own_emulator.url, serverSelectionTimeoutMS=10_000)
    try:
        c.t.create_collection("c")
        with c.start_session() as s:
            _start_insert(c, s, 10, "x")
            assert c.t.c.find_one({"_id": "x"}) is None  # uncommitted: unseen outside
            deadline = time.monotonic() + TIMEOUT
            while True:
                try:
                    c.t.command({"find": "c", "filter": {"_id": "x"}, "txnNumber": Int64(10),
                                 "autocommit": False}, session=s)
                except OperationFailure as e:
                    assert e.code == 251
                    break
                assert time.monotonic() < deadline, "transaction never expired"
                time.sleep(0.05)
            assert c.t.c.find_one({"_id": "x"}) is None
            with pytest.raises(OperationFailure) as exc:
                c.admin.command({"commitTransaction": 1, "txnNumber": Int64(10),
                                 "autocommit": False}, session=s)
            assert exc.value.code == 251
    finally:
        c.close()


@pytest.mark.emulator_only
def test_restart_aborts_transactions_in_progress() -> None:
    from presenced.testing.mongo import MongoEmulator

    emu = MongoEmulator()
    emu.start()
    c: MongoClient[Doc] = MongoClient(emu.url, serverSelectionTimeoutMS=10_000)
    try:
        c.t.c.insert_one({"_id": "kept", "v": 1})
        with c.start_session() as s:
            s.start_transaction()
            c.t.c.update_one({"_id": "kept"}, {"$set": {"v": 2}}, session=s)
            c.t.c.insert_one({"_id": "lost"}, session=s)
            emu.restart()
            assert sorted(c.t.c.find(), key=lambda d: d["_id"]) == [{"_id": "kept", "v": 1}]
            with pytest.raises(OperationFailure) as exc:
                s.commit_transaction()
            assert exc.value.code == 251
    finally:
        c.close()
        emu.close()


@pytest.mark.emulator_only
def test_nested_apply_ops_expand_into_one_event_per_operation(
    emulator: Any, tdb: Database[Doc]
) -> None:
    tdb.c.insert_one({"_id": 2, "a": 1})
    tdb.c.insert_one({"_id": 3})
    ns = f"{tdb.name}.c"
    ui = tdb.command("listCollections", filter={"name": "c"})["cursor"]["firstBatch"][0][
        "info"]["uuid"]
    lsid = {"id": Binary(uuid.uuid4().bytes, 4)}
    with tdb.watch(max_await_time_ms=AWAIT_MS) as stream:
        storage = emulator.storage
        with storage.lock:
            storage.append_oplog_entry({
                "lsid": lsid, "txnNumber": Int64(7), "op": "c", "ns": "admin.$cmd",
                "o": {"applyOps": [
                    {"op": "i", "ns": ns, "ui": ui, "o": {"_id": 1}, "o2": {"_id": 1}},
                    {"op": "c", "ns": "admin.$cmd", "o": {"applyOps": [
                        {"op": "u", "ns": ns, "ui": ui, "o": {"$v": 2, "diff": {"u": {"a": 5}}},
                         "o2": {"_id": 2}},
                        {"op": "d", "ns": ns, "ui": ui, "o": {"_id": 3}},
                    ]}},
                ]},
            })
        events = until_sentinel(stream, tdb)
    assert [(e["operationType"], e["documentKey"]["_id"]) for e in events] == [
        ("insert", 1), ("update", 2), ("delete", 3)]
    assert len({e["clusterTime"] for e in events}) == 1
    assert all(e["lsid"] == lsid and e["txnNumber"] == 7 for e in events)
    assert events[1]["updateDescription"]["updatedFields"] == {"a": 5}
    with tdb.watch(resume_after=events[1]["_id"], max_await_time_ms=AWAIT_MS) as resumed:
        rest = events_until(resumed, is_sentinel)[:-1]
    assert [e["_id"] for e in rest] == [events[2]["_id"]]


# --------------------------------------------------------------------------------------------
# isolation (issue 9 item 4): no dirty reads, snapshot reads, write conflicts


def _write_conflict(exc: OperationFailure) -> None:
    assert exc.code == 112, exc.details
    assert exc.details is not None and exc.details.get("codeName") == "WriteConflict"
    assert exc.has_error_label("TransientTransactionError")


def test_uncommitted_writes_are_invisible_outside(
    tclient: MongoClient[Doc], tdb: Database[Doc]
) -> None:
    tdb.c.insert_many([{"_id": i, "n": 0} for i in range(6)])
    committed = list(tdb.c.find())
    with tclient.start_session() as s:
        s.start_transaction()
        tdb.c.insert_one({"_id": "new", "n": 0}, session=s)
        tdb.c.update_many({"_id": {"$in": [1, 3]}}, {"$set": {"n": 1}}, session=s)
        tdb.c.delete_one({"_id": 5}, session=s)
        inside = list(tdb.c.find({}, session=s))
        assert len(inside) == 6 and {"_id": "new", "n": 0} in inside
        # find (in small getMore batches), count, aggregate, find by _id: the committed data.
        assert list(tdb.c.find().batch_size(2)) == committed
        assert tdb.c.count_documents({}) == 6
        assert tdb.command("count", "c")["n"] == 6
        assert tdb.c.find_one({"_id": "new"}) is None
        assert tdb.c.find_one({"_id": 5}) == {"_id": 5, "n": 0}
        assert list(tdb.c.find({"n": 1})) == []
        assert list(tdb.c.aggregate([{"$match": {"n": 0}}, {"$count": "k"}])) == [{"k": 6}]
        assert sorted(tdb.c.distinct("_id"), key=str) == sorted(range(6), key=str)
        s.commit_transaction()
    assert tdb.c.count_documents({}) == 6
    assert tdb.c.find_one({"_id": "new"}) == {"_id": "new", "n": 0}
    assert tdb.c.count_documents({"n": 1}) == 2


def test_reads_inside_a_transaction_come_from_its_snapshot(
    tclient: MongoClient[Doc], tdb: Database[Doc]
) -> None:
    tdb.c.insert_many([{"_id": "before"}, {"_id": "gone"}])
    with tclient.start_session() as s:
        s.start_transaction()
        assert tdb.c.count_documents({}, session=s) == 2  # the snapshot is taken here
        tdb.c.insert_one({"_id": "after"})
        tdb.c.update_one({"_id": "before"}, {"$set": {"changed": True}})
        tdb.c.delete_one({"_id": "gone"})
        assert tdb.c.count_documents({}, session=s) == 2
        assert tdb.c.find_one({"_id": "before"}, session=s) == {"_id": "before"}
        assert list(tdb.c.find({}, session=s).sort("_id", 1)) == [
            {"_id": "before"}, {"_id": "gone"}]
        assert tdb.c.find_one({"_id": "after"}, session=s) is None
        tdb.other.insert_one({"_id": 1}, session=s)  # its own writes, beside the snapshot
        assert tdb.other.find_one({}, session=s) == {"_id": 1}
        s.commit_transaction()
    assert tdb.c.count_documents({}) == 2
    assert tdb.c.find_one({"_id": "before"}) == {"_id": "before", "changed": True}


def test_two_transactions_writing_one_document_conflict(
    tclient: MongoClient[Doc], tdb: Database[Doc]
) -> None:
    tdb.c.insert_one({"_id": "x", "n": 0})
    with tclient.start_session() as a, tclient.start_session() as b:
        a.start_transaction()
        b.start_transaction()
        tdb.c.update_one({"_id": "x"}, {"$inc": {"n": 1}}, session=a)
        with pytest.raises(OperationFailure) as exc:
            tdb.c.update_one({"_id": "x"}, {"$inc": {"n": 10}}, session=b)
        _write_conflict(exc.value)
        # The conflict aborted b: its next statement finds no transaction.
        with pytest.raises(OperationFailure) as later:
            tdb.c.find_one({"_id": "x"}, session=b)
        assert later.value.code == 251
        assert later.value.has_error_label("TransientTransactionError")
        b.abort_transaction()
        a.commit_transaction()
    assert tdb.c.find_one({"_id": "x"}) == {"_id": "x", "n": 1}


def test_inserting_an_id_another_transaction_inserted_conflicts(
    tclient: MongoClient[Doc], tdb: Database[Doc]
) -> None:
    tdb.create_collection("c")
    with tclient.start_session() as a, tclient.start_session() as b:
        a.start_transaction()
        b.start_transaction()
        tdb.c.insert_one({"_id": "z", "by": "a"}, session=a)
        with pytest.raises(OperationFailure) as exc:
            tdb.c.insert_one({"_id": "z", "by": "b"}, session=b)
        _write_conflict(exc.value)
        b.abort_transaction()
        a.commit_transaction()
    assert list(tdb.c.find()) == [{"_id": "z", "by": "a"}]


def test_writing_a_document_changed_after_the_snapshot_conflicts(
    tclient: MongoClient[Doc], tdb: Database[Doc]
) -> None:
    tdb.c.insert_one({"_id": "x", "n": 0})
    with tclient.start_session() as a:
        a.start_transaction()
        assert tdb.c.find_one({"_id": "x"}, session=a) == {"_id": "x", "n": 0}
        tdb.c.update_one({"_id": "x"}, {"$set": {"n": 5}})  # committed after a's snapshot
        with pytest.raises(OperationFailure) as exc:
            tdb.c.update_one({"_id": "x"}, {"$inc": {"n": 1}}, session=a)
        _write_conflict(exc.value)
        a.abort_transaction()
    assert tdb.c.find_one({"_id": "x"}) == {"_id": "x", "n": 5}


@pytest.mark.parametrize("end", ["commit", "abort"])
def test_a_write_outside_waits_for_the_transaction_holding_its_document(
    tclient: MongoClient[Doc], tdb: Database[Doc], end: str
) -> None:
    tdb.c.insert_one({"_id": "x", "n": 0})
    done = threading.Event()
    errors: list[BaseException] = []

    def outside() -> None:
        try:
            tdb.c.update_one({"_id": "x"}, {"$inc": {"n": 10}})
        except BaseException as e:  # reported by the assertion below
            errors.append(e)
        done.set()

    with tclient.start_session() as a:
        a.start_transaction()
        tdb.c.update_one({"_id": "x"}, {"$inc": {"n": 1}}, session=a)
        writer = threading.Thread(target=outside)
        writer.start()
        assert not done.wait(0.5), "the write went through a transaction's document"
        assert tdb.c.find_one({"_id": "x"}) == {"_id": "x", "n": 0}  # others still read
        if end == "commit":
            a.commit_transaction()
        else:
            a.abort_transaction()
        assert done.wait(TIMEOUT)
        writer.join()
    assert errors == []
    assert tdb.c.find_one({"_id": "x"}) == {"_id": "x", "n": 11 if end == "commit" else 10}


def test_with_transaction_retries_after_a_write_conflict(
    tclient: MongoClient[Doc], tdb: Database[Doc]
) -> None:
    tdb.c.insert_one({"_id": "y", "n": 0})
    attempts = 0
    with tclient.start_session() as a, tclient.start_session() as b:
        a.start_transaction()
        tdb.c.update_one({"_id": "y"}, {"$inc": {"n": 1}}, session=a)

        def callback(s: ClientSession) -> None:
            nonlocal attempts
            attempts += 1
            if attempts == 2:  # the first attempt met a's write: let a commit
                a.commit_transaction()
            tdb.c.update_one({"_id": "y"}, {"$inc": {"n": 10}}, session=s)

        b.with_transaction(callback)
    assert attempts == 2
    assert tdb.c.find_one({"_id": "y"}) == {"_id": "y", "n": 11}


def test_concurrent_with_transaction_increments_are_all_kept(
    tclient: MongoClient[Doc], tdb: Database[Doc]
) -> None:
    tdb.c.insert_many([{"_id": "p", "n": 0}, {"_id": "q", "n": 0}])
    rounds, workers = 10, 3
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with tclient.start_session() as s:
                for _ in range(rounds):
                    def move(s: ClientSession) -> None:
                        tdb.c.update_one({"_id": "p"}, {"$inc": {"n": 1}}, session=s)
                        time.sleep(0.005)  # let the others meet this transaction
                        tdb.c.update_one({"_id": "q"}, {"$inc": {"n": -1}}, session=s)
                    s.with_transaction(move)
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert {d["_id"]: d["n"] for d in tdb.c.find()} == {
        "p": rounds * workers, "q": -rounds * workers}


def test_a_transaction_deleting_a_document_deleted_after_its_snapshot_conflicts(
    tclient: MongoClient[Doc], tdb: Database[Doc]
) -> None:
    tdb.c.insert_many([{"_id": "x", "k": 1}, {"_id": "y", "k": 2}])
    with tclient.start_session() as a:
        a.start_transaction()
        assert tdb.c.count_documents({"k": 1}, session=a) == 1
        tdb.c.delete_one({"_id": "x"})  # committed after a's snapshot
        with pytest.raises(OperationFailure) as exc:
            tdb.c.delete_many({"k": 1}, session=a)
        _write_conflict(exc.value)
        a.abort_transaction()
    assert list(tdb.c.find()) == [{"_id": "y", "k": 2}]


def test_inserting_an_id_committed_after_the_snapshot_conflicts(
    tclient: MongoClient[Doc], tdb: Database[Doc]
) -> None:
    tdb.create_collection("c")
    with tclient.start_session() as a:
        a.start_transaction()
        assert tdb.c.find_one({}, session=a) is None
        tdb.c.insert_one({"_id": "z", "by": "outside"})
        with pytest.raises(OperationFailure) as exc:
            tdb.c.insert_one({"_id": "z", "by": "a"}, session=a)
        _write_conflict(exc.value)
        a.abort_transaction()
    assert list(tdb.c.find()) == [{"_id": "z", "by": "outside"}]


def test_reads_beside_a_transaction_keep_their_projection_sort_skip_and_limit(
    tclient: MongoClient[Doc], tdb: Database[Doc]
) -> None:
    tdb.c.insert_many([{"_id": i, "n": i % 3, "x": "v"} for i in range(8)])
    with tclient.start_session() as a:
        a.start_transaction()
        tdb.c.update_one({"_id": 4}, {"$set": {"n": 9}}, session=a)
        outside = list(tdb.c.find({"n": {"$lt": 2}}, {"_id": 0, "n": 1})
                       .sort([("n", -1), ("_id", 1)]).skip(1).limit(3))
        inside = list(tdb.c.find({"n": {"$gt": 1}}, {"x": 0}, session=a).sort("_id", -1))
        a.commit_transaction()
    assert outside == [{"n": 1}, {"n": 1}, {"n": 0}]
    assert inside == [{"_id": 5, "n": 2}, {"_id": 4, "n": 9}, {"_id": 2, "n": 2}]
