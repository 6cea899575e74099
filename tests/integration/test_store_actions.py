"""The store's broker-action writes against MongoDB (the emulator, or a real replica set
with PRESENCED_TEST_MONGO_URL), and MemoryStore held to the same answers.

Each ``Store`` method of :class:`~presenced.store.ActionStore` mirrors one write of
Rocket.Chat's presence service (see ``rocketchat-presence.md``, "usersSessions: how
Rocket.Chat writes it"). The first part checks exactly which documents each call leaves
and what it returns. The second part runs the same scenarios against ``Store`` and
against ``MemoryStore`` and compares, step by step, the return values and the documents
left (``connections`` as ids, instance ids, statuses and dates in milliseconds), so the
double cannot drift from the real store.

Only MongoDB's documented behaviour is relied on: BSON dates hold milliseconds (pymongo
truncates the microseconds and converts an aware datetime to UTC when encoding, and reads
dates back naive UTC), ``$set`` of the value already stored modifies nothing, positional
``$`` updates the first matching element, ``$pull`` removes every matching element and
``$nin`` matches a missing or null field.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Protocol

import pytest
from pymongo import MongoClient
from pymongo.collection import Collection as MongoCollection
from pymongo.database import Database

from presenced.presence import Collections, to_ms
from presenced.store import ActionStore, Store
from presenced.testing.memory import MemoryStore

Doc = dict[str, Any]

# Seeded documents hold naive UTC datetimes, as pymongo reads them back.
SEEDED = datetime(2024, 5, 1, 12, 0, 0)
# What the broker passes as ``now``: aware UTC at millisecond precision (from_ms).
T1 = datetime(2024, 5, 1, 12, 5, 0, 250_000, tzinfo=UTC)
T2 = datetime(2024, 5, 1, 12, 6, 0, 500_000, tzinfo=UTC)
INSTANCE_A = "6c1f0f7e-0b4e-4d3b-9d6e-0a9a3d2b1c01"
INSTANCE_B = "0f6a2e3c-5d7b-4c8e-9a1f-2b3c4d5e6f02"
INSTANCE_GONE = "9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b03"

_MISSING = object()


def naive(dt: datetime) -> datetime:
    """``dt`` as MongoDB stores it and pymongo reads it back: naive UTC, milliseconds."""
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    return dt.replace(microsecond=dt.microsecond // 1000 * 1000)


def connection(
    cid: str,
    status: str = "online",
    *,
    instance: object = INSTANCE_A,
    updated: datetime = SEEDED,
) -> Doc:
    """One ``connections`` entry as Rocket.Chat pushes it (``instance=_MISSING``: without
    ``instanceId``; None: ``instanceId: null``, as the Node.js driver writes undefined)."""
    entry: Doc = {"id": cid, "status": status,
                  "_createdAt": updated - timedelta(minutes=10), "_updatedAt": updated}
    if instance is not _MISSING:
        entry["instanceId"] = instance
    return entry


def session(uid: str, *connections: Doc) -> Doc:
    return {"_id": uid, "connections": list(connections)}


def user(uid: str, **fields: Any) -> Doc:
    """A ``users`` document with the fields presence reads and some it never writes."""
    doc: Doc = {
        "_id": uid,
        "createdAt": SEEDED - timedelta(days=100),
        "username": f"name-{uid}",
        "type": "user",
        "roles": ["user"],
        "active": True,
        "status": "online",
        "statusConnection": "online",
        "statusDefault": "online",
        "statusText": "in a meeting",
        "_updatedAt": SEEDED - timedelta(days=1),
    }
    doc.update(fields)
    return doc


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def names(db: Database[Doc]) -> Collections:
    return Collections(db.name)


@pytest.fixture
def store(client: MongoClient[Doc], names: Collections) -> Store:
    return Store(client, names)


@pytest.fixture
def sessions(db: Database[Doc], names: Collections) -> MongoCollection[Doc]:
    return db[names.sessions]


@pytest.fixture
def users(db: Database[Doc], names: Collections) -> MongoCollection[Doc]:
    return db[names.users]


def all_docs(collection: MongoCollection[Doc]) -> dict[Any, Doc]:
    return {doc["_id"]: doc for doc in collection.find({})}


# ------------------------------------------------ add_connection


def test_add_connection_upserts_the_document(
    store: Store, sessions: MongoCollection[Doc]
) -> None:
    now = datetime(2024, 5, 1, 12, 5, 0, 123_456, tzinfo=UTC)

    assert store.add_connection("u1", "c1", INSTANCE_A, now) is None  # type: ignore[func-returns-value]

    stored = naive(now)
    assert stored.microsecond == 123_000
    assert all_docs(sessions) == {"u1": session("u1", {
        "id": "c1", "instanceId": INSTANCE_A, "status": "online",
        "_createdAt": stored, "_updatedAt": stored,
    })}
    # Real BSON dates (not strings or numbers), so that range queries on them work.
    assert sessions.count_documents({
        "connections._createdAt": {"$type": "date"},
        "connections._updatedAt": {"$type": "date"},
    }) == 1


def test_add_connection_appends_and_the_same_id_twice_appends_twice(
    store: Store, sessions: MongoCollection[Doc]
) -> None:
    existing = connection("c0", "away", instance=INSTANCE_B)
    other = session("u2", connection("c9"))
    sessions.insert_many([session("u1", existing), copy.deepcopy(other), {"_id": "u3"}])

    store.add_connection("u1", "c1", INSTANCE_A, T1)
    # A login repeated on one connection: Rocket.Chat pushes a second entry with that id.
    store.add_connection("u1", "c1", INSTANCE_B, T2)
    # A document without ``connections`` gets the array.
    store.add_connection("u3", "c3", INSTANCE_A, T1)

    def pushed(cid: str, instance: str, now: datetime) -> Doc:
        return {"id": cid, "instanceId": instance, "status": "online",
                "_createdAt": naive(now), "_updatedAt": naive(now)}

    assert all_docs(sessions) == {
        "u1": session("u1", existing, pushed("c1", INSTANCE_A, T1),
                      pushed("c1", INSTANCE_B, T2)),
        "u2": other,
        "u3": session("u3", pushed("c3", INSTANCE_A, T1)),
    }


def test_add_connection_stores_an_aware_now_in_utc(
    store: Store, sessions: MongoCollection[Doc]
) -> None:
    plus_two = datetime(2024, 5, 1, 14, 5, 0, 250_000, tzinfo=timezone(timedelta(hours=2)))

    store.add_connection("u1", "c1", INSTANCE_A, plus_two)

    entry = all_docs(sessions)["u1"]["connections"][0]
    assert entry["_createdAt"] == entry["_updatedAt"] == naive(T1)


# ------------------------------------------------ touch_connection


def test_touch_connection_moves_the_first_entry_with_that_id_only(
    store: Store, sessions: MongoCollection[Doc]
) -> None:
    first = connection("c1", instance=INSTANCE_A)
    middle = connection("c2", "away")
    duplicate = connection("c1", instance=INSTANCE_B)
    other = session("u2", connection("c1"))
    sessions.insert_many([session("u1", first, middle, duplicate), copy.deepcopy(other)])

    assert store.touch_connection("u1", "c1", T1) is True

    # Positional ``$``: the first entry matching ``connections.id`` only.
    assert all_docs(sessions) == {
        "u1": session("u1", {**first, "_updatedAt": naive(T1)}, middle, duplicate),
        "u2": other,
    }


def test_touch_connection_is_false_when_nothing_changes(
    store: Store, sessions: MongoCollection[Doc]
) -> None:
    sessions.insert_many([
        session("u1", connection("c1", updated=naive(T1))),
        {"_id": "u2"},
        session("u3"),
    ])
    before = all_docs(sessions)

    assert store.touch_connection("nobody", "c1", T2) is False
    assert store.touch_connection("u1", "c-unknown", T2) is False
    assert store.touch_connection("u2", "c1", T2) is False  # no ``connections``
    assert store.touch_connection("u3", "c1", T2) is False  # empty ``connections``
    # The same time already stored (modified 0), to the millisecond: BSON keeps no more.
    assert store.touch_connection("u1", "c1", T1) is False
    assert store.touch_connection("u1", "c1", T1 + timedelta(microseconds=400)) is False

    assert all_docs(sessions) == before


def test_touch_connection_right_after_add_connection_at_the_same_ms_is_false(
    store: Store, sessions: MongoCollection[Doc]
) -> None:
    store.add_connection("u1", "c1", INSTANCE_A, T1)

    assert store.touch_connection("u1", "c1", T1) is False
    assert store.touch_connection("u1", "c1", T2) is True
    assert all_docs(sessions)["u1"]["connections"][0]["_updatedAt"] == naive(T2)


# ------------------------------------------------ remove_connection


def test_remove_connection_pulls_every_entry_with_that_id_from_any_document(
    store: Store, sessions: MongoCollection[Doc]
) -> None:
    keep_u1 = connection("c2", "away")
    keep_u2 = connection("c3", instance=INSTANCE_B)
    untouched = session("u3", connection("c3"))
    sessions.insert_many([
        session("u1", connection("c1"), keep_u1, connection("c1", instance=INSTANCE_B)),
        # The same connection id in another user's document goes too (Rocket.Chat's
        # disconnect filters on ``connections.id`` alone).
        session("u2", keep_u2, connection("c1")),
        copy.deepcopy(untouched),
        {"_id": "u4"},
    ])

    assert store.remove_connection("c1") is None  # type: ignore[func-returns-value]

    assert all_docs(sessions) == {
        "u1": session("u1", keep_u1),
        "u2": session("u2", keep_u2),
        "u3": untouched,
        "u4": {"_id": "u4"},
    }


def test_remove_connection_of_an_unknown_id_changes_nothing(
    store: Store, sessions: MongoCollection[Doc]
) -> None:
    sessions.insert_many([session("u1", connection("c1")), session("u2"), {"_id": "u3"}])
    before = all_docs(sessions)

    store.remove_connection("c-unknown")

    assert all_docs(sessions) == before


# ------------------------------------------------ set_connection_status


def test_set_connection_status_sets_every_entry_with_that_id(
    store: Store, sessions: MongoCollection[Doc]
) -> None:
    first = connection("c1", instance=INSTANCE_A)
    middle = connection("c2")
    duplicate = connection("c1", "busy", instance=INSTANCE_B)
    other = session("u2", connection("c1"))
    sessions.insert_many([session("u1", first, middle, duplicate), copy.deepcopy(other)])

    assert store.set_connection_status("u1", "c1", "away", T1) is True

    # arrayFilters: every entry with the id, status and _updatedAt only (_createdAt kept).
    away = {"status": "away", "_updatedAt": naive(T1)}
    assert all_docs(sessions) == {
        "u1": session("u1", {**first, **away}, middle, {**duplicate, **away}),
        "u2": other,
    }


def test_set_connection_status_is_true_only_when_the_document_changes(
    store: Store, sessions: MongoCollection[Doc]
) -> None:
    sessions.insert_many([session("u1", connection("c1"), connection("c2")), session("u3")])

    assert store.set_connection_status("u1", "c1", "away", T1) is True
    # The same status and the same time (to the millisecond): modified 0.
    assert store.set_connection_status("u1", "c1", "away", T1) is False
    assert store.set_connection_status(
        "u1", "c1", "away", T1 + timedelta(microseconds=900)
    ) is False
    # The same status at a later time still moves _updatedAt.
    assert store.set_connection_status("u1", "c1", "away", T2) is True
    # Another status at the same time.
    assert store.set_connection_status("u1", "c1", "online", T2) is True
    before = all_docs(sessions)

    assert store.set_connection_status("u1", "c-unknown", "away", T2) is False
    assert store.set_connection_status("nobody", "c1", "away", T2) is False
    assert store.set_connection_status("u3", "c1", "away", T2) is False  # empty array

    assert all_docs(sessions) == before  # and no document created for "nobody"
    assert all_docs(sessions)["u1"]["connections"][0] == {
        **connection("c1"), "status": "online", "_updatedAt": naive(T2),
    }


def test_set_connection_status_on_a_document_without_connections_is_false(
    store: Store, sessions: MongoCollection[Doc]
) -> None:
    sessions.insert_one({"_id": "u1"})

    assert store.set_connection_status("u1", "c1", "away", T1) is False
    assert all_docs(sessions) == {"u1": {"_id": "u1"}}


# ------------------------------------------------ remove_instance_connections


def test_remove_instance_connections_pulls_that_instance_everywhere(
    store: Store, sessions: MongoCollection[Doc]
) -> None:
    kept = connection("c2", instance=INSTANCE_B)
    untouched = [
        session("u3", connection("c5", instance=INSTANCE_B)),
        session("u4"),
        {"_id": "u5"},
        session("u6", connection("c6", instance=_MISSING), connection("c7", instance=None)),
    ]
    sessions.insert_many([
        session("u1", connection("c1"), kept, connection("c3", "away")),
        session("u2", connection("c4")),
        *copy.deepcopy(untouched),
    ])

    assert sorted(store.remove_instance_connections(INSTANCE_A)) == ["u1", "u2"]

    assert all_docs(sessions) == {
        "u1": session("u1", kept),
        "u2": session("u2"),  # emptied, never deleted
        **{doc["_id"]: doc for doc in untouched},
    }
    after = all_docs(sessions)
    assert store.remove_instance_connections(INSTANCE_A) == []
    assert store.remove_instance_connections(INSTANCE_GONE) == []
    assert all_docs(sessions) == after


def test_remove_instance_connections_with_no_sessions_at_all(store: Store) -> None:
    assert store.remove_instance_connections(INSTANCE_A) == []


# ------------------------------------------------ remove_other_instances_connections


def test_remove_other_instances_connections_pulls_every_connection_not_live(
    store: Store, sessions: MongoCollection[Doc]
) -> None:
    live_a = connection("c1")
    live_b = connection("c5", instance=INSTANCE_B)
    all_live = session("u3", connection("c4"), connection("c6", "away", instance=INSTANCE_B))
    untouched = [all_live, session("u5"), {"_id": "u6"}]
    sessions.insert_many([
        session("u1", live_a, connection("c2", instance=INSTANCE_GONE)),
        session("u2", connection("c3", instance=INSTANCE_GONE)),
        # Connections without an instanceId, or with a null one, go too: this mirrors
        # Rocket.Chat's `$pull: {connections: {instanceId: {$nin: live}}}`, and `$nin`
        # matches a missing or null field.
        session("u4", connection("c7", instance=_MISSING), live_b),
        session("u7", connection("c8", instance=None)),
        *copy.deepcopy(untouched),
    ])

    affected = store.remove_other_instances_connections([INSTANCE_A, INSTANCE_B])

    assert sorted(affected) == ["u1", "u2", "u4", "u7"]
    # The documents whose connections are all live are not rewritten at all: each is
    # compared whole, so not even a field of theirs moved.
    assert all_docs(sessions) == {
        "u1": session("u1", live_a),
        "u2": session("u2"),
        "u4": session("u4", live_b),
        "u7": session("u7"),
        **{doc["_id"]: doc for doc in untouched},
    }
    after = all_docs(sessions)
    assert store.remove_other_instances_connections([INSTANCE_A, INSTANCE_B]) == []
    assert all_docs(sessions) == after


def test_remove_other_instances_connections_when_all_are_live(
    store: Store, sessions: MongoCollection[Doc]
) -> None:
    sessions.insert_many([
        session("u1", connection("c1"), connection("c2", instance=INSTANCE_B)),
        session("u2"),
    ])
    before = all_docs(sessions)

    assert store.remove_other_instances_connections((INSTANCE_A, INSTANCE_B)) == []
    assert all_docs(sessions) == before


# ------------------------------------------------ set_status_default


def test_set_status_default_sets_the_chosen_status_and_text_only(
    store: Store, users: MongoCollection[Doc]
) -> None:
    other = user("u2")
    users.insert_many([user("u1"), copy.deepcopy(other)])

    assert store.set_status_default("u1", "busy", "writing code") is True

    # Never status, statusConnection or _updatedAt (presence's own write follows).
    assert all_docs(users) == {
        "u1": user("u1", statusDefault="busy", statusText="writing code"),
        "u2": other,
    }


def test_set_status_default_without_text_keeps_the_text(
    store: Store, users: MongoCollection[Doc]
) -> None:
    users.insert_many([user("u1"), user("u3", statusDefault=None)])
    del_default = user("u4")
    del del_default["statusDefault"], del_default["statusText"]
    users.insert_one(copy.deepcopy(del_default))

    assert store.set_status_default("u1", "away", None) is True
    assert store.set_status_default("u3", "online", None) is True  # null → "online"
    assert store.set_status_default("u4", "online", None) is True  # missing → "online"

    assert all_docs(users) == {
        "u1": user("u1", statusDefault="away"),
        "u3": user("u3", statusDefault="online"),
        "u4": {**del_default, "statusDefault": "online"},
    }


def test_set_status_default_is_false_when_nothing_changes(
    store: Store, users: MongoCollection[Doc]
) -> None:
    users.insert_one(user("u1", statusDefault="busy", statusText="writing code"))
    before = all_docs(users)

    assert store.set_status_default("u1", "busy", "writing code") is False
    assert store.set_status_default("u1", "busy", None) is False
    assert store.set_status_default("nobody", "away", "gone") is False

    assert all_docs(users) == before  # and no user created


# =========================================================================== MemoryStore


class World(Protocol):
    """A store and its documents: seeded, then read back normalized."""

    store: ActionStore

    def seed(self, sessions: Sequence[Doc] = (), users: Sequence[Doc] = ()) -> None: ...

    def sessions(self) -> dict[Any, Doc]: ...

    def users(self) -> dict[Any, Doc]: ...


class MongoWorld:
    def __init__(self, client: MongoClient[Doc], db: Database[Doc]) -> None:
        names = Collections(db.name)
        self.store: ActionStore = Store(client, names)
        self._sessions = db[names.sessions]
        self._users = db[names.users]

    def seed(self, sessions: Sequence[Doc] = (), users: Sequence[Doc] = ()) -> None:
        if sessions:
            self._sessions.insert_many(copy.deepcopy(list(sessions)))
        if users:
            self._users.insert_many(copy.deepcopy(list(users)))

    def sessions(self) -> dict[Any, Doc]:
        return all_docs(self._sessions)

    def users(self) -> dict[Any, Doc]:
        return all_docs(self._users)


class MemoryWorld:
    def __init__(self) -> None:
        self._memory = MemoryStore()
        self.store: ActionStore = self._memory

    def seed(self, sessions: Sequence[Doc] = (), users: Sequence[Doc] = ()) -> None:
        for doc in copy.deepcopy(list(sessions)):
            self._memory.sessions[doc["_id"]] = doc
        for doc in copy.deepcopy(list(users)):
            self._memory.users[doc["_id"]] = doc

    def sessions(self) -> dict[Any, Doc]:
        return copy.deepcopy(self._memory.sessions)

    def users(self) -> dict[Any, Doc]:
        return copy.deepcopy(self._memory.users)


def _when(value: Any) -> Any:
    """A date as milliseconds since the epoch (MemoryStore keeps datetimes, naive or
    aware, as given; MongoDB keeps milliseconds); anything else as it is."""
    return to_ms(value) if isinstance(value, datetime) else value


def _entry(entry: Any) -> Any:
    if not isinstance(entry, dict):
        return entry
    return (
        entry.get("id", "<absent>"), entry.get("instanceId", "<absent>"),
        entry.get("status", "<absent>"),
        _when(entry.get("_createdAt", "<absent>")), _when(entry.get("_updatedAt", "<absent>")),
    )


def _snapshot(world: World) -> dict[str, Any]:
    connections = {
        uid: ([_entry(e) for e in doc["connections"]]
              if isinstance(doc.get("connections"), list)
              else doc.get("connections", "<absent>"))
        for uid, doc in world.sessions().items()
    }
    users = {uid: {k: _when(v) for k, v in doc.items()} for uid, doc in world.users().items()}
    return {"connections": connections, "users": users}


@dataclass
class Transcript:
    """What a scenario saw: each call's answer (or the error it raised) and the documents
    it left."""

    world: World
    steps: list[tuple[str, Any, dict[str, Any]]] = field(default_factory=list)

    def call(self, label: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            answer = fn(*args)
        except Exception as exc:  # the error is part of the answer
            answer = ("raised", type(exc).__name__)
        if isinstance(answer, list):  # affected ids: order-insensitive
            answer = sorted(answer, key=repr)
        self.steps.append((label, answer, _snapshot(self.world)))


Scenario = Callable[[World], Transcript]


def scenario_add(world: World) -> Transcript:
    world.seed(sessions=[session("u1", connection("c0", "away")), session("u2", connection("c9")),
                         {"_id": "u3"}])
    t, s = Transcript(world), world.store
    t.call("new document", s.add_connection, "u4", "c4", INSTANCE_A,
           datetime(2024, 5, 1, 12, 5, 0, 123_456, tzinfo=UTC))
    t.call("append", s.add_connection, "u1", "c1", INSTANCE_A, T1)
    t.call("same id again", s.add_connection, "u1", "c1", INSTANCE_B, T2)
    t.call("document without connections", s.add_connection, "u3", "c3", INSTANCE_B, T1)
    t.call("aware, not UTC", s.add_connection, "u2", "c8", INSTANCE_A,
           T2.astimezone(timezone(timedelta(hours=-5))))
    return t


def scenario_touch(world: World) -> Transcript:
    world.seed(sessions=[
        session("u1", connection("c1"), connection("c2"), connection("c1", instance=INSTANCE_B)),
        session("u2", connection("c1")), {"_id": "u3"}, session("u4"),
    ])
    t, s = Transcript(world), world.store
    t.call("first entry only", s.touch_connection, "u1", "c1", T1)
    t.call("same time again", s.touch_connection, "u1", "c1", T1)
    t.call("later", s.touch_connection, "u1", "c1", T2)
    t.call("unknown user", s.touch_connection, "nobody", "c1", T2)
    t.call("unknown connection", s.touch_connection, "u1", "c-unknown", T2)
    t.call("no connections", s.touch_connection, "u3", "c1", T2)
    t.call("empty connections", s.touch_connection, "u4", "c1", T2)
    return t


def scenario_touch_at_the_time_of_add(world: World) -> Transcript:
    t, s = Transcript(world), world.store
    t.call("add", s.add_connection, "u1", "c1", INSTANCE_A, T1)
    t.call("touch at the same time", s.touch_connection, "u1", "c1", T1)
    return t


def scenario_touch_within_the_same_ms(world: World) -> Transcript:
    world.seed(sessions=[session("u1", connection("c1", updated=naive(T1)))])
    t, s = Transcript(world), world.store
    t.call("same ms", s.touch_connection, "u1", "c1", T1 + timedelta(microseconds=400))
    t.call("same ms again", s.touch_connection, "u1", "c1", T1 + timedelta(microseconds=700))
    return t


def scenario_touch_aware_not_utc(world: World) -> Transcript:
    world.seed(sessions=[session("u1", connection("c1"))])
    t, s = Transcript(world), world.store
    t.call("aware, not UTC", s.touch_connection, "u1", "c1",
           T1.astimezone(timezone(timedelta(hours=2))))
    return t


def scenario_remove_connection(world: World) -> Transcript:
    world.seed(sessions=[
        session("u1", connection("c1"), connection("c2"), connection("c1", instance=INSTANCE_B)),
        session("u2", connection("c3"), connection("c1")),
        session("u3", connection("c3")), {"_id": "u4"}, session("u5"),
    ])
    t, s = Transcript(world), world.store
    t.call("every entry, any document", s.remove_connection, "c1")
    t.call("again", s.remove_connection, "c1")
    t.call("unknown", s.remove_connection, "c-unknown")
    t.call("the last one", s.remove_connection, "c3")
    return t


def scenario_set_connection_status(world: World) -> Transcript:
    world.seed(sessions=[
        session("u1", connection("c1"), connection("c2"),
                connection("c1", "busy", instance=INSTANCE_B)),
        session("u2", connection("c1")), session("u4"),
    ])
    t, s = Transcript(world), world.store
    t.call("every entry with the id", s.set_connection_status, "u1", "c1", "away", T1)
    t.call("same status, later", s.set_connection_status, "u1", "c1", "away", T2)
    t.call("other status, same time", s.set_connection_status, "u1", "c1", "online", T2)
    t.call("unknown connection", s.set_connection_status, "u1", "c-unknown", "away", T2)
    t.call("unknown user", s.set_connection_status, "nobody", "c1", "away", T2)
    t.call("empty connections", s.set_connection_status, "u4", "c1", "away", T2)
    return t


def scenario_set_connection_status_unchanged(world: World) -> Transcript:
    world.seed(sessions=[session("u1", connection("c1", "away", updated=naive(T1)))])
    t, s = Transcript(world), world.store
    t.call("same status, same time", s.set_connection_status, "u1", "c1", "away", T1)
    return t


def scenario_set_connection_status_without_connections(world: World) -> Transcript:
    world.seed(sessions=[{"_id": "u1"}])
    t, s = Transcript(world), world.store
    t.call("no connections field", s.set_connection_status, "u1", "c1", "away", T1)
    return t


def scenario_set_connection_status_aware_not_utc(world: World) -> Transcript:
    world.seed(sessions=[session("u1", connection("c1"))])
    t, s = Transcript(world), world.store
    t.call("aware, not UTC", s.set_connection_status, "u1", "c1", "away",
           T1.astimezone(timezone(timedelta(hours=2))))
    return t


def scenario_remove_instance_connections(world: World) -> Transcript:
    world.seed(sessions=[
        session("u1", connection("c1"), connection("c2", instance=INSTANCE_B),
                connection("c3", "away")),
        session("u2", connection("c4")),
        session("u3", connection("c5", instance=INSTANCE_B)), session("u4"), {"_id": "u5"},
        session("u6", connection("c6", instance=_MISSING), connection("c7", instance=None)),
    ])
    t, s = Transcript(world), world.store
    t.call("instance A", s.remove_instance_connections, INSTANCE_A)
    t.call("instance A again", s.remove_instance_connections, INSTANCE_A)
    t.call("unknown instance", s.remove_instance_connections, INSTANCE_GONE)
    t.call("instance B", s.remove_instance_connections, INSTANCE_B)
    return t


def scenario_remove_other_instances_connections(world: World) -> Transcript:
    world.seed(sessions=[
        session("u1", connection("c1"), connection("c2", instance=INSTANCE_GONE)),
        session("u2", connection("c3", instance=INSTANCE_GONE)),
        session("u3", connection("c4"), connection("c6", "away", instance=INSTANCE_B)),
        session("u4", connection("c7", instance=_MISSING), connection("c5", instance=INSTANCE_B)),
        session("u5"), {"_id": "u6"},
        session("u7", connection("c8", instance=None)),
    ])
    t, s = Transcript(world), world.store
    t.call("A and B live", s.remove_other_instances_connections, [INSTANCE_A, INSTANCE_B])
    t.call("again", s.remove_other_instances_connections, [INSTANCE_A, INSTANCE_B])
    t.call("only B live", s.remove_other_instances_connections, (INSTANCE_B,))
    return t


def scenario_set_status_default(world: World) -> Transcript:
    no_default = user("u4")
    del no_default["statusDefault"], no_default["statusText"]
    world.seed(users=[user("u1"), user("u2"), user("u3", statusDefault=None), no_default])
    t, s = Transcript(world), world.store
    t.call("status and text", s.set_status_default, "u1", "busy", "writing code")
    t.call("same again", s.set_status_default, "u1", "busy", "writing code")
    t.call("same status, no text", s.set_status_default, "u1", "busy", None)
    t.call("other status, no text", s.set_status_default, "u1", "away", None)
    t.call("text only changes", s.set_status_default, "u1", "away", "lunch")
    t.call("empty text", s.set_status_default, "u2", "online", "")
    t.call("null default", s.set_status_default, "u3", "online", None)
    t.call("missing default", s.set_status_default, "u4", "online", None)
    t.call("unknown user", s.set_status_default, "nobody", "away", "gone")
    return t


SCENARIOS = [
    pytest.param(scenario_add, id="add_connection"),
    pytest.param(scenario_touch, id="touch_connection"),
    pytest.param(scenario_touch_at_the_time_of_add, id="touch_connection-at-add-time"),
    pytest.param(scenario_touch_within_the_same_ms, id="touch_connection-same-ms"),
    pytest.param(scenario_touch_aware_not_utc, id="touch_connection-aware"),
    pytest.param(scenario_remove_connection, id="remove_connection"),
    pytest.param(scenario_set_connection_status, id="set_connection_status"),
    pytest.param(
        scenario_set_connection_status_unchanged, id="set_connection_status-unchanged",
    ),
    pytest.param(
        scenario_set_connection_status_without_connections,
        id="set_connection_status-no-connections-field",
    ),
    pytest.param(
        scenario_set_connection_status_aware_not_utc, id="set_connection_status-aware",
    ),
    pytest.param(scenario_remove_instance_connections, id="remove_instance_connections"),
    pytest.param(
        scenario_remove_other_instances_connections, id="remove_other_instances_connections"
    ),
    pytest.param(scenario_set_status_default, id="set_status_default"),
]


@pytest.fixture
def mongo_world(client: MongoClient[Doc], db: Database[Doc]) -> Iterator[World]:
    yield MongoWorld(client, db)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_memory_store_answers_as_the_store(scenario: Scenario, mongo_world: World) -> None:
    real = scenario(mongo_world)
    double = scenario(MemoryWorld())

    assert [label for label, _, _ in double.steps] == [label for label, _, _ in real.steps]
    for (label, answer, docs), (_, want_answer, want_docs) in zip(
        double.steps, real.steps, strict=True
    ):
        assert (answer, docs) == (want_answer, want_docs), f"after {label!r}"
