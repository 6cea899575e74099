"""The store against MongoDB (the emulator, or a real replica set with
PRESENCED_TEST_MONGO_URL): what each call reads and writes, and what it costs.

Documents are seeded in Rocket.Chat's exact shapes (see the presence spec). Round trips
are counted with pymongo's command monitoring on a client of our own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from bson import ObjectId, Timestamp
from pymongo import MongoClient, monitoring
from pymongo.database import Database

from presenced.presence import ABSENT, USER_FIELDS, Collections
from presenced.reconcile import needs_check
from presenced.store import (
    SESSIONS_UPDATED_AT_INDEX,
    ReapRequest,
    ReconcileSource,
    StatusWrite,
    Store,
)

Doc = dict[str, Any]

# BSON dates have millisecond precision; pymongo reads them back naive UTC.
NOW = datetime(2024, 5, 1, 12, 0, 0)
INSTANCE_A = "6c1f0f7e-0b4e-4d3b-9d6e-0a9a3d2b1c01"
INSTANCE_B = "0f6a2e3c-5d7b-4c8e-9a1f-2b3c4d5e6f02"


# --------------------------------------------------------------------------- helpers


class Commands(monitoring.CommandListener):
    """The names of the commands a client sent (pymongo's public monitoring API)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        with self._lock:
            self._names.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def clear(self) -> None:
        with self._lock:
            self._names.clear()

    @property
    def names(self) -> list[str]:
        with self._lock:
            return [name for name in self._names if name not in ("hello", "isMaster")]


@pytest.fixture
def store(client: MongoClient[Doc], db: Database[Doc]) -> Store:
    return Store(client, Collections(db.name))


@pytest.fixture
def commands() -> Commands:
    return Commands()


@pytest.fixture
def monitored_store(mongo_url: str, db: Database[Doc], commands: Commands) -> Iterator[Store]:
    """A store over a client of its own whose commands are recorded in ``commands``."""
    own: MongoClient[Doc] = MongoClient(
        mongo_url, serverSelectionTimeoutMS=10_000, event_listeners=[commands]
    )
    own.admin.command("ping")
    commands.clear()
    yield Store(own, Collections(db.name))
    own.close()


def connection(
    cid: str,
    status: str = "online",
    *,
    instance: str = INSTANCE_A,
    updated: datetime = NOW,
) -> Doc:
    """One ``usersSessions.connections`` entry, as Rocket.Chat pushes it."""
    return {
        "id": cid,
        "instanceId": instance,
        "status": status,
        "_createdAt": updated - timedelta(minutes=10),
        "_updatedAt": updated,
    }


def session(uid: str, *connections: Doc) -> Doc:
    return {"_id": uid, "connections": list(connections)}


def user(
    uid: str,
    *,
    status: str | None = "offline",
    status_connection: str | None = "offline",
    status_default: str | None = "online",
    active: bool = True,
) -> Doc:
    """A ``users`` document with the fields presence reads and some it does not."""
    doc: Doc = {
        "_id": uid,
        "createdAt": NOW - timedelta(days=100),
        "username": f"name-{uid}",
        "name": f"Name {uid}",
        "type": "user",
        "roles": ["user"],
        "active": active,
        "emails": [{"address": f"{uid}@example.com", "verified": True}],
        "services": {"password": {"bcrypt": "$2b$10$notarealhash"}},
        "utcOffset": 2,
        "statusText": "in a meeting",
        "_updatedAt": NOW - timedelta(days=1),
    }
    if status is not None:
        doc["status"] = status
    if status_connection is not None:
        doc["statusConnection"] = status_connection
    if status_default is not None:
        doc["statusDefault"] = status_default
    return doc


def update_count(client: MongoClient[Doc]) -> int:
    return int(client.admin.command("serverStatus")["opcounters"]["update"])


# --------------------------------------------------------------------------- health, indexes


def test_ping_returns_when_the_server_answers(store: Store) -> None:
    store.ping()


def test_ensure_indexes_twice_lists_the_updated_at_index_once(
    store: Store, db: Database[Doc]
) -> None:
    db.usersSessions.insert_one(session("u1", connection("c1")))

    store.ensure_indexes()
    store.ensure_indexes()

    indexes = list(db.usersSessions.list_indexes())
    ours = [index for index in indexes if index["name"] == SESSIONS_UPDATED_AT_INDEX]
    assert len(ours) == 1
    assert dict(ours[0]["key"]) == {"connections._updatedAt": 1}


# --------------------------------------------------------------------------- loads


def test_load_sessions_returns_exactly_the_requested_documents(
    store: Store, db: Database[Doc]
) -> None:
    db.usersSessions.insert_many(
        [
            session("u1", connection("c1"), connection("c2", "away")),
            session("u2", connection("c3")),
            session("u3"),
        ]
    )

    loaded = store.load_sessions(["u1", "u3", "absent"])

    assert set(loaded) == {"u1", "u3"}
    assert loaded["u1"] == session("u1", connection("c1"), connection("c2", "away"))
    assert loaded["u3"] == {"_id": "u3", "connections": []}


def test_load_sessions_returns_only_id_and_connections(store: Store, db: Database[Doc]) -> None:
    db.usersSessions.insert_one({**session("u1", connection("c1")), "extra": "not read"})

    assert set(store.load_sessions(["u1"])["u1"]) == {"_id", "connections"}


def test_load_users_returns_exactly_the_requested_ids_with_presence_fields_only(
    store: Store, db: Database[Doc]
) -> None:
    db.users.insert_many([user("u1", status="online"), user("u2"), user("u3")])

    loaded = store.load_users({"u1", "u2", "absent"})

    assert set(loaded) == {"u1", "u2"}
    assert set(loaded["u1"]) == {"_id", *USER_FIELDS}
    assert loaded["u1"]["status"] == "online"
    assert loaded["u1"]["roles"] == ["user"]


def test_load_users_reads_many_ids_in_one_find_without_get_more(
    monitored_store: Store, db: Database[Doc], commands: Commands
) -> None:
    ids = [f"u{n:04}" for n in range(250)]  # more than a default first batch (101)
    db.users.insert_many([user(uid) for uid in ids])
    commands.clear()

    loaded = monitored_store.load_users(ids)

    assert len(loaded) == 250
    assert commands.names == ["find"]


def test_loads_with_no_ids_send_no_command(monitored_store: Store, commands: Commands) -> None:
    assert monitored_store.load_users([]) == {}
    assert monitored_store.load_sessions(set()) == {}
    assert commands.names == []


def test_load_instances_returns_every_instance_with_id_and_updated_at_only(
    store: Store, db: Database[Doc]
) -> None:
    for iid, port in ((INSTANCE_A, 3000), (INSTANCE_B, 3001)):
        db.instances.insert_one(
            {
                "_id": iid,
                "name": "rocket.chat",
                "pid": port,
                "_createdAt": NOW - timedelta(hours=1),
                "_updatedAt": NOW,
                "extraInformation": {"host": "10.0.0.1", "port": port, "conns": 12},
            }
        )

    loaded = store.load_instances()

    assert sorted(loaded, key=lambda doc: doc["_id"]) == [
        {"_id": INSTANCE_B, "_updatedAt": NOW},
        {"_id": INSTANCE_A, "_updatedAt": NOW},
    ]


def test_load_instances_of_a_missing_collection_is_empty(store: Store) -> None:
    assert store.load_instances() == []


def test_store_reads_the_configured_collection_names(
    client: MongoClient[Doc], db: Database[Doc]
) -> None:
    names = Collections(
        db.name, users="rc_users", sessions="rc_sessions", instances="rc_instances"
    )
    db.rc_users.insert_one(user("u1"))
    db.rc_sessions.insert_one(session("u1", connection("c1")))
    db.users.insert_one(user("u2"))

    configured = Store(client, names)

    assert set(configured.load_users(["u1", "u2"])) == {"u1"}
    assert set(configured.load_sessions(["u1"])) == {"u1"}


# --------------------------------------------------------------------------- write_statuses


def test_write_statuses_sets_both_fields_where_expected_values_match(
    store: Store, db: Database[Doc]
) -> None:
    db.users.insert_one(user("u1", status="offline", status_connection="offline"))

    outcome = store.write_statuses([StatusWrite("u1", "away", "away", "offline", "offline")])

    assert outcome.written == ["u1"]
    assert outcome.conflicts == []
    stored = db.users.find_one({"_id": "u1"})
    assert stored is not None
    assert (stored["status"], stored["statusConnection"]) == ("away", "away")


def test_write_statuses_touches_neither_updated_at_nor_other_fields(
    store: Store, db: Database[Doc]
) -> None:
    before = user("u1", status="online", status_connection="online")
    db.users.insert_one(before)

    store.write_statuses([StatusWrite("u1", "busy", "online", "online", "online")])

    after = db.users.find_one({"_id": "u1"})
    assert after == {**before, "status": "busy", "statusConnection": "online"}


def test_write_statuses_reports_a_concurrent_change_as_a_conflict_and_keeps_it(
    store: Store, db: Database[Doc]
) -> None:
    db.users.insert_many(
        [
            user("u1", status="online", status_connection="online"),
            user("u2", status="online", status_connection="online"),
        ]
    )
    writes = [
        StatusWrite("u1", "away", "away", "online", "online"),
        StatusWrite("u2", "away", "away", "online", "online"),
    ]
    # Between the read the writes were derived from and the write: Rocket.Chat sets busy.
    db.users.update_one({"_id": "u2"}, {"$set": {"status": "busy", "statusConnection": "busy"}})

    outcome = store.write_statuses(writes)

    assert outcome.written == ["u1"]
    assert outcome.conflicts == ["u2"]
    stored = db.users.find_one({"_id": "u2"})
    assert stored is not None
    assert (stored["status"], stored["statusConnection"]) == ("busy", "busy")


@pytest.mark.parametrize(
    ("expected", "written", "conflict"),
    [(ABSENT, "missing", "null"), (None, "null", "missing")],
    ids=["absent-matches-only-a-missing-field", "none-matches-only-a-stored-null"],
)
def test_write_statuses_tells_a_missing_field_from_a_stored_null(
    store: Store, db: Database[Doc], expected: object, written: str, conflict: str
) -> None:
    db.users.insert_many(
        [
            user("missing", status=None, status_connection=None),
            {**user("null"), "status": None, "statusConnection": None},
        ]
    )

    outcome = store.write_statuses(
        [
            StatusWrite("missing", "online", "online", expected, expected),
            StatusWrite("null", "online", "online", expected, expected),
        ]
    )

    assert outcome.written == [written]
    assert outcome.conflicts == [conflict]


@pytest.mark.parametrize(
    "stored",
    [17, 2.5, True, False, 0, "", ["online"], {"s": "online"}, NOW],
    ids=["int", "double", "true", "false", "zero", "empty-string", "array", "document", "date"],
)
def test_write_statuses_replaces_a_stored_value_of_any_type_it_read(
    store: Store, db: Database[Doc], stored: Any
) -> None:
    db.users.insert_one({**user("u1"), "status": stored, "statusConnection": stored})
    read = store.load_users(["u1"])["u1"]

    outcome = store.write_statuses(
        [StatusWrite("u1", "online", "online", read["status"], read["statusConnection"])]
    )

    assert outcome.written == ["u1"]
    assert db.users.count_documents({"status": "online", "statusConnection": "online"}) == 1


@pytest.mark.parametrize(
    ("read", "now_stored"),
    [(17, 17.5), (1, True), (0, False), (17, "17"), ("online", "away"), (None, 0)],
    ids=["int-vs-double", "one-vs-true", "zero-vs-false", "int-vs-string", "other-string",
         "null-vs-zero"],
)
def test_write_statuses_does_not_overwrite_a_value_other_than_the_one_read(
    store: Store, db: Database[Doc], read: Any, now_stored: Any
) -> None:
    db.users.insert_one({**user("u1"), "status": now_stored, "statusConnection": "offline"})

    outcome = store.write_statuses([StatusWrite("u1", "online", "online", read, "offline")])

    assert outcome.conflicts == ["u1"]
    stored = db.users.find_one({"_id": "u1"})
    assert stored is not None and stored["status"] == now_stored


def test_write_statuses_expecting_a_value_does_not_overwrite_another_one(
    store: Store, db: Database[Doc]
) -> None:
    db.users.insert_one(user("u1", status="away", status_connection="away"))

    outcome = store.write_statuses([StatusWrite("u1", "online", "online", ABSENT, ABSENT)])

    assert outcome.conflicts == ["u1"]
    assert db.users.count_documents({"_id": "u1", "status": "away"}) == 1


def test_write_statuses_reports_a_missing_user_as_a_conflict_and_creates_nothing(
    store: Store, db: Database[Doc]
) -> None:
    outcome = store.write_statuses([StatusWrite("gone", "online", "online", ABSENT, ABSENT)])

    assert outcome.conflicts == ["gone"]
    assert db.users.count_documents({}) == 0


def test_write_statuses_reads_back_only_when_some_write_did_not_match(
    monitored_store: Store, db: Database[Doc], commands: Commands
) -> None:
    db.users.insert_many([user("u1"), user("u2")])
    commands.clear()

    monitored_store.write_statuses([StatusWrite("u1", "online", "online", "offline", "offline")])
    all_matched = commands.names
    commands.clear()
    monitored_store.write_statuses([StatusWrite("u2", "online", "online", "away", "away")])

    assert all_matched == ["update"]
    assert commands.names == ["update", "find"]


def test_write_statuses_of_an_empty_list_issues_no_update(
    store: Store, client: MongoClient[Doc]
) -> None:
    before = update_count(client)

    outcome = store.write_statuses([])

    assert update_count(client) == before
    assert (outcome.written, outcome.conflicts) == ([], [])


# --------------------------------------------------------------------------- reap


def test_reap_removes_the_stale_connection_and_its_duplicates_only(
    store: Store, db: Database[Doc]
) -> None:
    stale = NOW - timedelta(minutes=10)
    db.usersSessions.insert_one(
        session(
            "u1",
            connection("c1", updated=stale),
            connection("c2", updated=NOW),
            connection("c1", "away", updated=stale),  # a login repeated on one connection
        )
    )

    changed = store.reap([ReapRequest("u1", ["c1"], cutoff=NOW - timedelta(minutes=5))])

    assert changed == 1
    assert store.load_sessions(["u1"])["u1"]["connections"] == [connection("c2", updated=NOW)]


def test_reap_keeps_a_connection_heartbeated_after_the_cutoff(
    store: Store, db: Database[Doc]
) -> None:
    stale = NOW - timedelta(minutes=10)
    db.usersSessions.insert_one(session("u1", connection("c1", updated=stale)))
    request = ReapRequest("u1", ["c1"], cutoff=stale)
    # The heartbeat lands between the reaper's read and its write.
    db.usersSessions.update_one(
        {"_id": "u1", "connections.id": "c1"}, {"$set": {"connections.$._updatedAt": NOW}}
    )

    changed = store.reap([request])

    assert changed == 0
    assert store.load_sessions(["u1"])["u1"]["connections"] == [
        {**connection("c1", updated=stale), "_updatedAt": NOW}
    ]


def test_reap_removes_the_stale_duplicate_that_a_heartbeat_did_not_reach(
    store: Store, db: Database[Doc]
) -> None:
    stale = NOW - timedelta(minutes=10)
    db.usersSessions.insert_one(
        session("u1", connection("c1", updated=stale), connection("c1", updated=stale))
    )
    request = ReapRequest("u1", ["c1"], cutoff=stale)
    # Rocket.Chat's heartbeat sets "connections.$": only the first duplicate moves.
    db.usersSessions.update_one(
        {"_id": "u1", "connections.id": "c1"}, {"$set": {"connections.$._updatedAt": NOW}}
    )

    store.reap([request])

    assert store.load_sessions(["u1"])["u1"]["connections"] == [
        {**connection("c1", updated=stale), "_updatedAt": NOW}
    ]


def test_reap_counts_changed_documents_across_requests(store: Store, db: Database[Doc]) -> None:
    stale = NOW - timedelta(minutes=10)
    db.usersSessions.insert_many(
        [
            session("u1", connection("c1", updated=stale)),
            session("u2", connection("c2", updated=stale)),
            session("u3", connection("c3", updated=NOW)),
        ]
    )
    cutoff = NOW - timedelta(minutes=5)

    changed = store.reap(
        [
            ReapRequest("u1", ["c1"], cutoff),
            ReapRequest("u2", ["c2"], cutoff),
            ReapRequest("u3", ["c3"], cutoff),
            ReapRequest("absent", ["c4"], cutoff),
        ]
    )

    assert changed == 2


def test_reap_takes_an_aware_cutoff_as_the_same_instant(store: Store, db: Database[Doc]) -> None:
    db.usersSessions.insert_one(session("u1", connection("c1", updated=NOW)))
    one_ms_before = (NOW - timedelta(milliseconds=1)).replace(tzinfo=UTC)
    same_instant = NOW.replace(tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))

    kept = store.reap([ReapRequest("u1", ["c1"], one_ms_before)])
    removed = store.reap([ReapRequest("u1", ["c1"], same_instant)])

    assert (kept, removed) == (0, 1)


def test_reap_of_no_requests_issues_no_update(store: Store, client: MongoClient[Doc]) -> None:
    before = update_count(client)

    assert store.reap([]) == 0
    assert store.reap([ReapRequest("u1", [], NOW)]) == 0
    assert update_count(client) == before


# --------------------------------------------------------------------------- reconcile scan


def seed_reconcile_population(db: Database[Doc]) -> set[str]:
    """Users in every situation the reconcile scan must tell apart; returns its answer."""
    db.usersSessions.insert_many(
        [
            session("connected-offline", connection("c1")),  # stored offline, connected
            session("connected-online", connection("c2")),  # in both sources
            session("empty-connections"),
            {"_id": "no-connections-field"},
            session("session-only", connection("c3")),  # no users document at all
        ]
    )
    db.users.insert_many(
        [
            user("connected-offline"),
            user("connected-online", status="online", status_connection="online"),
            user("empty-connections"),
            user("no-connections-field"),
            user("stuck-away", status="away", status_connection="away"),
            user("status-only-busy", status="busy", status_connection="offline"),
            user("connection-only-online", status="offline", status_connection="online"),
            user("never-seen", status=None, status_connection=None),
            {**user("null-status"), "status": None, "statusConnection": None},
            user("offline-no-session"),
        ]
    )
    return {
        "connected-offline",
        "connected-online",
        "session-only",
        "stuck-away",
        "status-only-busy",
        "connection-only-online",
    }


def read_cursor(store: Store, source: ReconcileSource, after: str | None, batch: int
                ) -> list[list[Doc]]:
    """Every batch of a reconcile cursor, to its end (an empty batch, not returned)."""
    cursor = store.reconcile_cursor(source, after, batch)
    batches: list[list[Doc]] = []
    try:
        while docs := cursor.next_batch():
            assert len(docs) <= batch
            batches.append(docs)
        return batches
    finally:
        cursor.close()


def test_a_reconcile_cursor_walks_every_string_id_in_id_order_in_batches(
    store: Store, db: Database[Doc]
) -> None:
    seed_reconcile_population(db)

    for source, collection in (("sessions", db.usersSessions), ("users", db.users)):
        batches = read_cursor(store, source, None, 2)  # type: ignore[arg-type]
        ids = [doc["_id"] for batch in batches for doc in batch]
        assert ids == sorted(doc["_id"] for doc in collection.find())
        assert all(len(batch) == 2 for batch in batches[:-1])


def test_a_reconcile_cursor_resumes_strictly_after_the_last_id_received(
    store: Store, db: Database[Doc]
) -> None:
    db.usersSessions.insert_many(
        [session(f"u{n}", connection(f"c{n}")) for n in (5, 1, 3, 2, 4)]
    )

    def ids(after: str | None) -> list[Any]:
        return [doc["_id"] for batch in read_cursor(store, "sessions", after, 2) for doc in batch]

    assert ids(None) == ["u1", "u2", "u3", "u4", "u5"]
    assert ids("u2") == ["u3", "u4", "u5"]
    assert ids("u5") == []


def test_a_reconcile_cursor_closed_while_a_batch_is_under_way_is_closed_by_that_batch(
    monitored_store: Store, db: Database[Doc], commands: Commands
) -> None:
    db.users.insert_many([user(f"u{n}") for n in range(10)])
    cursor = monitored_store.reconcile_cursor("users", None, 3)
    assert len(cursor.next_batch()) == 3
    lock: threading.Lock = cursor._lock  # type: ignore[attr-defined]
    commands.clear()

    with lock:  # a batch under way in another (abandoned) thread
        cursor.close()  # returns at once
        assert commands.names == []
    assert cursor.next_batch() == []  # that batch ends: it closes the cursor

    assert commands.names == ["killCursors"]


def test_a_reconcile_cursor_drops_the_ids_before_the_strings_and_ends_after_them(
    store: Store, db: Database[Doc]
) -> None:
    strays: list[Any] = [None, -3, 2.5, 7, ObjectId(), True, datetime(2024, 1, 1), {"a": 1}]
    db.users.insert_many([user(uid) for uid in strays])
    db.users.insert_many([user(f"u{n}") for n in range(5)])

    for batch in (1, 2, 3, 100):
        ids = [doc["_id"] for docs in read_cursor(store, "users", None, batch) for doc in docs]
        assert ids == [f"u{n}" for n in range(5)], batch
    assert sorted(map(repr, (d["_id"] for d in store.reconcile_strays("users")))) == sorted(
        map(repr, strays)
    )


def test_reconcile_strays_of_a_collection_of_strays_only_are_each_read_once(
    store: Store, db: Database[Doc]
) -> None:
    db.users.insert_many([user(n) for n in range(250)])  # type: ignore[arg-type]

    assert sorted(doc["_id"] for doc in store.reconcile_strays("users")) == list(range(250))
    assert read_cursor(store, "users", None, 10) == []


def test_a_reconcile_cursor_reads_a_batch_per_command_and_is_killed_when_closed_early(
    monitored_store: Store, db: Database[Doc], commands: Commands
) -> None:
    db.users.insert_many([user(f"u{n}") for n in range(10)])
    commands.clear()
    cursor = monitored_store.reconcile_cursor("users", None, 3)
    assert commands.names == []  # no I/O before the first batch

    assert [doc["_id"] for doc in cursor.next_batch()] == ["u0", "u1", "u2"]
    assert [doc["_id"] for doc in cursor.next_batch()] == ["u3", "u4", "u5"]
    cursor.close()
    cursor.close()  # again: a no-op

    assert commands.names == ["find", "getMore", "killCursors"]


def test_reconcile_strays_finds_the_ids_that_are_not_strings(
    store: Store, db: Database[Doc]
) -> None:
    db.usersSessions.insert_many(
        [session(7, connection("c1")), session("s", connection("c2")), session(8)]  # type: ignore[arg-type]
    )

    assert [doc["_id"] for doc in read_cursor(store, "sessions", None, 10)[0]] == ["s"]
    assert sorted(doc["_id"] for doc in store.reconcile_strays("sessions")) == [7, 8]
    assert store.reconcile_strays("users") == []


def test_reconcile_cursors_hold_the_documents_projected_as_the_bulk_loads(
    store: Store, db: Database[Doc]
) -> None:
    seed_reconcile_population(db)
    db.users.update_one({"_id": "stuck-away"}, {"$set": {"services": {"password": "x"}}})
    db.usersSessions.update_one({"_id": "session-only"}, {"$set": {"extra": 1}})

    sessions = read_cursor(store, "sessions", None, 100)[0]
    users = read_cursor(store, "users", None, 100)[0]

    by_id = {doc["_id"]: doc for doc in sessions}
    assert by_id == store.load_sessions(list(by_id))
    assert "extra" not in by_id["session-only"] and by_id["session-only"]["connections"]
    by_id = {doc["_id"]: doc for doc in users}
    assert by_id == store.load_users(list(by_id))
    assert by_id["stuck-away"]["status"] == "away" and "services" not in by_id["stuck-away"]


def test_the_users_reconcile_needs_are_those_with_connections_or_stored_online(
    store: Store, db: Database[Doc]
) -> None:
    expected = seed_reconcile_population(db)
    db.usersSessions.insert_many([session("offline-empty"), {"_id": "offline-no-field"}])
    db.users.insert_many([user("offline-empty"), user("offline-no-field")])
    users = {doc["_id"]: doc for doc in read_cursor(store, "users", None, 100)[0]}
    sessions = {doc["_id"]: doc for doc in read_cursor(store, "sessions", None, 100)[0]}

    needed = {
        uid for uid in users.keys() | sessions.keys()
        if needs_check(users.get(uid), sessions.get(uid))
    }

    assert needed == expected


def test_estimated_count_is_the_collection_size(store: Store, db: Database[Doc]) -> None:
    db.usersSessions.insert_many([session("a"), session("b", connection("c1"))])
    assert store.estimated_count("sessions") == 2
    assert store.estimated_count("users") == 0


# --------------------------------------------------------------------------- reaper sweep


def test_stale_sessions_finds_exactly_sessions_with_a_connection_before_the_cutoff(
    store: Store, db: Database[Doc]
) -> None:
    cutoff = NOW - timedelta(minutes=5)
    db.usersSessions.insert_many(
        [
            session(
                "mixed",
                connection("c1", updated=NOW),
                connection("c2", updated=cutoff - timedelta(milliseconds=1)),
            ),
            session("at-cutoff", connection("c3", updated=cutoff)),
            session("fresh", connection("c4", updated=NOW)),
            session("old", connection("c5", updated=NOW - timedelta(days=2))),
            session("empty"),
        ]
    )
    store.ensure_indexes()

    docs = store.stale_sessions(cutoff, limit=10)

    assert sorted(doc["_id"] for doc in docs) == ["mixed", "old"]
    assert next(doc for doc in docs if doc["_id"] == "old") == session(
        "old", connection("c5", updated=NOW - timedelta(days=2))
    )
    assert len(store.stale_sessions(cutoff, limit=1)) == 1


# --------------------------------------------------------------------------- checkpoints


def test_load_checkpoint_never_saved_is_none(store: Store) -> None:
    assert store.load_checkpoint("changestream") is None


def test_checkpoint_round_trips_a_resume_token_document(store: Store) -> None:
    token = {"_data": "8266321A4F000000012B022C0100296E5A1004A1B2C3D4E5F6"}

    store.save_checkpoint("changestream", token)

    saved = store.load_checkpoint("changestream")
    assert saved is not None
    assert saved["_id"] == "changestream"
    assert saved["position"] == token
    assert isinstance(saved["updatedAt"], datetime)


def test_checkpoint_round_trips_a_bson_timestamp(store: Store) -> None:
    store.save_checkpoint("oplog", Timestamp(1714564800, 7))

    saved = store.load_checkpoint("oplog")
    assert saved is not None
    assert saved["position"] == Timestamp(1714564800, 7)


def test_save_checkpoint_replaces_the_previous_position(store: Store, db: Database[Doc]) -> None:
    store.save_checkpoint("oplog", Timestamp(1714564800, 7))
    store.save_checkpoint("oplog", Timestamp(1714564801, 1))

    saved = store.load_checkpoint("oplog")
    assert saved is not None
    assert saved["position"] == Timestamp(1714564801, 1)
    assert db.presenced_checkpoints.count_documents({}) == 1
