"""The store: every MongoDB call the daemon makes, and nothing else.

This module owns each read and write presenced issues against Rocket.Chat's database
(``users``, ``usersSessions``, ``instances``) and its own bookkeeping collection
(``presenced_checkpoints``): the bulk loads by ``_id``, the reconcile cursors, the
conditional ``users`` writes, the reaper's guarded ``$pull``, the one index presenced
creates, and the feed checkpoints. Each method is one round trip, or a bounded few, and
its docstring states what it costs.

It must never decide a status (that is ``presenced.presence``): it writes the values it
is given, under the conditions it is given. It must never block the event loop: pymongo
is blocking, and every method here is only ever called from a worker thread
(``trio.to_thread.run_sync`` under a limiter), so this module imports no trio or anyio,
starts no threads and never sleeps. It retries nothing and translates no errors: a
pymongo exception propagates to the caller, which decides the backoff.

Datetimes: read with pymongo's default codec options, stored dates come back as naive
UTC ``datetime``s. A cutoff passed in may be naive (taken as UTC) or aware (pymongo
converts it to UTC when encoding).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Final, Literal, Protocol

import pymongo
import pymongo.cursor
from bson import Binary, Decimal128, Int64, ObjectId, Regex, Timestamp
from pymongo import ASCENDING, DESCENDING, MongoClient, UpdateOne
from pymongo.collection import Collection as MongoCollection
from pymongo.database import Database

from presenced.presence import ABSENT, USER_FIELDS, Collections

__all__ = [
    "SESSIONS_UPDATED_AT_INDEX",
    "ActionStore",
    "PresenceStore",
    "ReapRequest",
    "ReconcileCursor",
    "ReconcileSource",
    "StatusWrite",
    "Store",
    "WriteOutcome",
]

Document = dict[str, Any]

SESSIONS_UPDATED_AT_INDEX: Final = "presenced_connections_updatedAt"
"""The one index presenced creates: ``usersSessions {"connections._updatedAt": 1}``."""

SCAN_TIMEOUT_S: Final = 120.0
"""Time allowed to one batch of a reconcile cursor (or to the read of the strays, which
scans a whole collection), instead of the client's socket timeout."""

_SESSIONS_PROJECTION: Final[Document] = {"connections": 1}
"""What presence reads of a ``usersSessions`` document (``_id`` comes too)."""
_USERS_PROJECTION: Final[Document] = dict.fromkeys(USER_FIELDS, 1)
"""What presence reads of a ``users`` document (``_id`` comes too)."""
STRAYS_PAGE: Final = 100
"""Documents per query of :meth:`Store.reconcile_strays` (one query from each end when
there are fewer strays)."""

ReconcileSource = Literal["sessions", "users"]
"""Which collection a reconcile cursor walks: ``usersSessions`` or ``users``."""


class ReconcileCursor(Protocol):
    """One reconcile cursor (:meth:`Store.reconcile_cursor`). Blocking: call each method
    from a worker thread, one at a time (``close`` may come while a batch is under way in
    an abandoned thread: it does not wait for it)."""

    def next_batch(self) -> list[Document]:
        """The next documents in ``_id`` order (at most the batch size); none: the end."""
        ...

    def close(self) -> None:
        """Stop the cursor (a ``killCursors`` when the server still holds it); again: a
        no-op."""
        ...


@dataclass(frozen=True)
class StatusWrite:
    """Set ``users.status``/``statusConnection`` of one user, if they still hold the
    expected values: exactly the values read (same BSON type and value), null for a
    stored null, :data:`~presenced.presence.ABSENT` for a missing field."""

    user_id: Any
    status: str
    status_connection: str
    expected_status: object
    expected_status_connection: object


@dataclass(frozen=True)
class WriteOutcome:
    """Which writes of a ``write_statuses`` call hold now.

    ``written``: ids whose stored values are the ones asked for. ``conflicts``: ids whose
    stored values no longer matched the expected ones (changed concurrently, or the user
    document is gone); the caller re-derives them from a fresh read.
    """

    written: list[Any]
    conflicts: list[Any]


@dataclass(frozen=True)
class ReapRequest:
    """Remove ``user_id``'s connections with these ids whose ``_updatedAt`` is at or
    before ``cutoff`` (a heartbeat that moved ``_updatedAt`` past it keeps the entry)."""

    user_id: Any
    connection_ids: list[str]
    cutoff: datetime


class ActionStore(Protocol):
    """The writes of the broker's ``presence`` actions, shaped as Rocket.Chat's own
    (``UsersSessions`` and ``Users`` models of ``ee/packages/presence``). Blocking."""

    def add_connection(
        self, user_id: str, connection_id: str, instance_id: str, now: datetime
    ) -> None: ...

    def touch_connection(self, user_id: str, connection_id: str, now: datetime) -> bool: ...

    def remove_connection(self, connection_id: str) -> None: ...

    def set_connection_status(
        self, user_id: str, connection_id: str, status: str, now: datetime
    ) -> bool: ...

    def remove_instance_connections(self, instance_id: str) -> list[Any]: ...

    def remove_other_instances_connections(self, live_ids: Sequence[str]) -> list[Any]: ...

    def set_status_default(
        self, user_id: str, status_default: str, status_text: str | None
    ) -> bool: ...


class PresenceStore(ActionStore, Protocol):
    """What the daemon asks of its store: :class:`Store`, or a double in tests.

    Blocking, like :class:`Store`: the daemon calls each method from a worker thread.
    """

    def ping(self) -> None: ...

    def hello(self) -> Document: ...

    def ensure_indexes(self) -> None: ...

    def load_users(self, user_ids: Collection[Any]) -> dict[Any, Document]: ...

    def load_sessions(self, user_ids: Collection[Any]) -> dict[Any, Document]: ...

    def load_instances(self) -> list[Document]: ...

    def reconcile_cursor(
        self, source: ReconcileSource, after: str | None, batch: int, *,
        simple_order: bool = False,
    ) -> ReconcileCursor: ...

    def reconcile_strays(self, source: ReconcileSource) -> list[Document]: ...

    def estimated_count(self, source: ReconcileSource) -> int: ...

    def write_statuses(self, writes: Sequence[StatusWrite]) -> WriteOutcome: ...

    def reap(self, requests: Sequence[ReapRequest]) -> int: ...

    def stale_sessions(self, cutoff: datetime, limit: int) -> list[Document]: ...

    def load_checkpoint(self, name: str) -> Document | None: ...

    def save_checkpoint(self, name: str, position: Any) -> None: ...


class Store:
    """Every MongoDB call of the daemon, over one pymongo client.

    Blocking: call each method (and each ``next()`` of the iterators) from a worker
    thread. The store holds no state of its own between calls, so one instance may be
    used from several worker threads at once (pymongo's client is thread-safe); an
    iterator, like the cursor under it, must be advanced by one thread at a time.
    """

    def __init__(self, client: MongoClient[Document], collections: Collections) -> None:
        self._client = client
        self._db: Database[Document] = client[collections.database]
        names = self.collections = collections
        self._users: MongoCollection[Document] = self._db[names.users]
        self._sessions: MongoCollection[Document] = self._db[names.sessions]
        self._instances: MongoCollection[Document] = self._db[names.instances]
        self._checkpoints: MongoCollection[Document] = self._db[names.checkpoints]

    # ------------------------------------------------------------------ health, indexes

    def ping(self) -> None:
        """Check the server answers; raises pymongo's exception when it does not.

        Cost: one ``ping`` command on the admin database.
        """
        self._client.admin.command("ping")

    def hello(self) -> Document:
        """The server's ``hello`` answer (``setName`` tells a replica-set member).

        Cost: one ``hello`` command.
        """
        return dict(self._client.admin.command("hello"))

    def ensure_indexes(self) -> None:
        """Create ``usersSessions {"connections._updatedAt": 1}`` (named
        ``presenced_connections_updatedAt``) unless it exists; safe to call repeatedly.

        Nothing in Rocket.Chat indexes ``connections._updatedAt``; the reaper's sweep
        (``iter_stale_sessions``) needs it. Cost: one ``createIndexes`` command, which is
        a no-op when the same index already exists. On a large collection the first call
        builds the index (MongoDB 4.2+ builds hold the exclusive lock only briefly).
        """
        self._sessions.create_index(
            [("connections._updatedAt", ASCENDING)], name=SESSIONS_UPDATED_AT_INDEX
        )

    # ------------------------------------------------------------------ bulk loads

    def load_sessions(self, user_ids: Collection[Any]) -> dict[Any, Document]:
        """The ``usersSessions`` documents of ``user_ids`` (``_id`` and ``connections``
        only), keyed by ``_id``; an id without a document is absent from the result.

        Cost: one ``find({_id: {$in: ids}})`` on the ``_id`` index, answered in its first
        batch (the batch size is one more than the number of ids, so the server closes the
        cursor itself) unless the reply would exceed 16 MiB. No call for no ids. The caller
        bounds the number of ids per call (the ``$in`` list travels in the command).
        """
        return self._load_by_id(self._sessions, user_ids, _SESSIONS_PROJECTION)

    def load_users(self, user_ids: Collection[Any]) -> dict[Any, Document]:
        """The ``users`` documents of ``user_ids``, projected to ``_id`` and the fields
        presence reads (``USER_FIELDS``), keyed by ``_id``; a missing id is absent.

        Cost: as ``load_sessions``: one ``find({_id: {$in: ids}})`` answered in its first
        batch; no call for no ids.
        """
        return self._load_by_id(self._users, user_ids, _USERS_PROJECTION)

    def load_instances(self) -> list[Document]:
        """Every ``instances`` document, ``_id`` and ``_updatedAt`` only (an empty list when
        the collection is empty or missing).

        Cost: one ``find`` (a collection scan of a collection holding one small document
        per Rocket.Chat server); a ``getMore`` only past the first 101 documents.
        """
        return list(self._instances.find({}, {"_id": 1, "_updatedAt": 1}))

    def _load_by_id(
        self,
        collection: MongoCollection[Document],
        ids: Iterable[Any],
        projection: Mapping[str, Any],
    ) -> dict[Any, Document]:
        wanted = list(ids)
        if not wanted:
            return {}
        cursor = collection.find({"_id": {"$in": wanted}}, projection, batch_size=len(wanted) + 1)
        with cursor:
            return {doc["_id"]: doc for doc in cursor}

    # ------------------------------------------------------------------ reconcile scan

    def _reconcile_source(
        self, source: ReconcileSource
    ) -> tuple[MongoCollection[Document], Document]:
        if source == "sessions":
            return self._sessions, _SESSIONS_PROJECTION
        return self._users, _USERS_PROJECTION

    def reconcile_cursor(
        self, source: ReconcileSource, after: str | None, batch: int, *,
        simple_order: bool = False,
    ) -> ReconcileCursor:
        """A cursor over every document of a source whose ``_id`` is a string, in ``_id``
        order, strictly after ``after`` (None: from the first): ``usersSessions`` (``_id``
        and ``connections``, as ``load_sessions``) or ``users`` (projected as
        ``load_users``). Whole collections, unfiltered: the reconciler reads each user's
        two documents side by side, so it never reads one by ``_id``, and decides itself
        which users need a look. Read it a batch at a time (``next_batch``, an empty
        batch at the end); a cursor that failed is closed and a new one opened after the
        last id received, so a large collection is never read again from the start.

        String ids only (Rocket.Chat's ids are strings; the reconciler compares them as
        MongoDB does, by code point): :meth:`reconcile_strays` gives the others. Strings
        are contiguous in ``_id`` order (numbers sort before them, ObjectIds and the other
        types after), so the cursor drops the ids before the first string and ends at the
        first id after the last one.

        Cost: one ``find`` with ``sort _id`` on the ``_id`` index (no blocking sort; no
        filter from the start, ``{_id: {$gt: after}}`` when resumed), then one ``getMore``
        per ``batch`` documents; each batch under a :data:`SCAN_TIMEOUT_S` operation
        timeout instead of the client's socket timeout. No I/O until the first batch.

        ``simple_order``: sort under the ``simple`` (binary) collation, for a collection
        whose default collation orders strings otherwise (the reconciler asks for it when
        it saw ids out of code point order). Its ``_id`` index then cannot serve the sort:
        MongoDB sorts the collection in memory, or on disk (``allowDiskUse``).
        """
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        collection, projection = self._reconcile_source(source)
        extra: dict[str, Any] = (
            {"collation": {"locale": "simple"}, "allow_disk_use": True} if simple_order else {}
        )
        cursor = collection.find(
            {} if after is None else {"_id": {"$gt": after}}, projection,
            sort=[("_id", ASCENDING)], batch_size=batch, **extra,
        )
        return _ScanCursor(cursor, batch)

    def estimated_count(self, source: ReconcileSource) -> int:
        """How many documents the collection of ``source`` holds, from its metadata (an
        upper bound of the pages to come, for progress reports).

        Cost: one ``count`` command answered from collection metadata (no scan).
        """
        collection, _ = self._reconcile_source(source)
        return int(collection.estimated_document_count())

    def reconcile_strays(self, source: ReconcileSource) -> list[Document]:
        """The documents :meth:`reconcile_cursor` does not walk: those whose ``_id`` is not
        a string (none in a Rocket.Chat database), projected as a cursor's.

        Cost: they sort before the strings (numbers, null) or after them (ObjectIds,
        dates, ...): two ``find`` walking the ``_id`` index from each end, ``limit``
        :data:`STRAYS_PAGE` (a further page with ``skip`` only while a page holds no
        string), each under the :data:`SCAN_TIMEOUT_S` operation timeout. No collection
        scan (an index cannot serve ``$type``).
        """
        collection, projection = self._reconcile_source(source)
        found: list[Document] = []
        for direction in (ASCENDING, DESCENDING):
            skip = 0
            while True:
                with pymongo.timeout(SCAN_TIMEOUT_S):
                    page = list(collection.find(
                        {}, projection, sort=[("_id", direction)], skip=skip,
                        limit=STRAYS_PAGE, batch_size=STRAYS_PAGE,
                    ))
                strays = list(itertools.takewhile(_not_a_string_id, page))
                found += strays
                if len(strays) < len(page) or len(page) < STRAYS_PAGE:
                    break
                skip += STRAYS_PAGE
        # A collection of strays only is read from both ends: each document once.
        return list({_stray_key(doc["_id"]): doc for doc in found}.values())

    # ------------------------------------------------------------------ users writes

    def write_statuses(self, writes: Sequence[StatusWrite]) -> WriteOutcome:
        """Set ``status``/``statusConnection`` of each user whose stored values are still
        the expected ones; report which writes hold and which met a concurrent change.

        Each write is ``UpdateOne({_id, status: <expected>, statusConnection: <expected>},
        {$set: {status, statusConnection}})``. The expected value matches exactly what was
        read, of any BSON type (``{$eq: v, $type: <v's type>}``; a stored null is
        ``{$exists: true, $eq: null}``, a missing field ``{$exists: false}``), so a value the daemon
        read can always be replaced, and a concurrent change is never clobbered (one
        exception, from MongoDB's equality on arrays: an array holding the value read also
        matches, and is replaced by a correct status). No other
        field is touched, ``_updatedAt`` included (as Rocket.Chat writes them). The ids of
        ``writes`` should be distinct.

        Which writes matched: a bulk result gives only totals, so when fewer than all
        matched, the stored values of every id are read back and an id counts as written
        when it now holds the values asked for (whoever wrote them), as a conflict
        otherwise. A conflict is always safe to re-derive; so is a write that landed and
        was changed again before the read-back.

        Cost: one unordered ``bulk_write`` (one ``update`` command per 100 000 writes or
        48 MB); when not every write matched, one more ``find({_id: {$in}})``. No call for
        no writes.
        """
        if not writes:
            return WriteOutcome(written=[], conflicts=[])
        operations = [
            UpdateOne(
                {
                    "_id": write.user_id,
                    "status": _expected(write.expected_status),
                    "statusConnection": _expected(write.expected_status_connection),
                },
                {
                    "$set": {
                        "status": str(write.status),
                        "statusConnection": str(write.status_connection),
                    }
                },
            )
            for write in writes
        ]
        result = self._users.bulk_write(operations, ordered=False)
        if result.matched_count >= len(writes):
            return WriteOutcome(written=[write.user_id for write in writes], conflicts=[])
        stored = self._load_by_id(
            self._users,
            _distinct(write.user_id for write in writes),
            {"status": 1, "statusConnection": 1},
        )
        written: list[Any] = []
        conflicts: list[Any] = []
        for write in writes:
            doc = stored.get(write.user_id)
            holds = (
                doc is not None
                and doc.get("status") == write.status
                and doc.get("statusConnection") == write.status_connection
            )
            (written if holds else conflicts).append(write.user_id)
        return WriteOutcome(written=written, conflicts=conflicts)

    # ------------------------------------------------------------------ reaper

    def reap(self, requests: Sequence[ReapRequest]) -> int:
        """Remove the connections named by ``requests``, each only while its
        ``_updatedAt`` is still at or before the request's cutoff, and return how many
        ``usersSessions`` documents changed.

        The guarded pull of the spec, ``{$pull: {connections: {id: {$in: ids},
        _updatedAt: {$lte: cutoff}}}}``: a heartbeat that lands between the reaper's read
        and this write moves ``_updatedAt`` past the cutoff, and the connection stays.
        Every entry with a named id and an old enough ``_updatedAt`` goes, duplicates of
        the id included.

        Cost: one unordered ``bulk_write`` (one ``update`` command per 100 000 requests);
        no call for no requests, or when no request names a connection.
        """
        operations = [
            UpdateOne(
                {"_id": request.user_id},
                {
                    "$pull": {
                        "connections": {
                            "id": {"$in": list(request.connection_ids)},
                            "_updatedAt": {"$lte": request.cutoff},
                        }
                    }
                },
            )
            for request in requests
            if request.connection_ids
        ]
        if not operations:
            return 0
        return self._sessions.bulk_write(operations, ordered=False).modified_count

    def stale_sessions(self, cutoff: datetime, limit: int) -> list[Document]:
        """At most ``limit`` ``usersSessions`` documents (``_id``, ``connections``) with at
        least one connection whose ``_updatedAt`` is before ``cutoff``, for the reaper's
        sweep. Whole documents: the caller decides which of their connections go (and
        reaps them with their own cutoff), so documents it does not reap may come back
        first in the next sweep; those it reaps do not.

        Cost: one ``find({"connections._updatedAt": {$lt: cutoff}})`` with ``limit`` on the
        index of ``ensure_indexes`` (a collection scan without it), answered in one batch.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        cursor = self._sessions.find(
            {"connections._updatedAt": {"$lt": cutoff}}, _SESSIONS_PROJECTION,
            limit=limit, batch_size=limit,
        )
        with cursor:
            return list(cursor)

    # ------------------------------------------------------------------ broker actions

    def add_connection(
        self, user_id: str, connection_id: str, instance_id: str, now: datetime
    ) -> None:
        """Rocket.Chat's connect: push an ``online`` connection to the user's
        ``usersSessions`` document, creating it if needed.

        Cost: one ``updateOne`` with ``upsert`` on the ``_id`` index.
        """
        entry = {
            "id": connection_id, "instanceId": instance_id, "status": "online",
            "_createdAt": now, "_updatedAt": now,
        }
        self._sessions.update_one(
            {"_id": user_id}, {"$push": {"connections": entry}}, upsert=True
        )

    def touch_connection(self, user_id: str, connection_id: str, now: datetime) -> bool:
        """Rocket.Chat's heartbeat: move the connection's ``_updatedAt`` to ``now``. True
        when a document changed (False: no such connection, or ``now`` already stored).

        Cost: one ``updateOne`` on the ``_id`` index.
        """
        result = self._sessions.update_one(
            {"_id": user_id, "connections.id": connection_id},
            {"$set": {"connections.$._updatedAt": now}},
        )
        return result.modified_count > 0

    def remove_connection(self, connection_id: str) -> None:
        """Rocket.Chat's disconnect: pull every entry with this connection id, from
        whichever document holds it.

        Cost: one ``updateMany`` on Rocket.Chat's ``connections.id`` index.
        """
        self._sessions.update_many(
            {"connections.id": connection_id}, {"$pull": {"connections": {"id": connection_id}}}
        )

    def set_connection_status(
        self, user_id: str, connection_id: str, status: str, now: datetime
    ) -> bool:
        """Rocket.Chat's away / back online: set the status (and ``_updatedAt``) of every
        entry with this id in the user's document. True when the document changed.

        Cost: one ``updateOne`` with ``arrayFilters`` on the ``_id`` index.
        """
        result = self._sessions.update_one(
            # As Rocket.Chat's updateConnectionStatusById: with "connections.id" in the
            # filter, a document without `connections` matches nothing (arrayFilters on a
            # missing array would be an error).
            {"_id": user_id, "connections.id": connection_id},
            {"$set": {"connections.$[c].status": status, "connections.$[c]._updatedAt": now}},
            array_filters=[{"c.id": connection_id}],
        )
        return result.modified_count > 0

    def remove_instance_connections(self, instance_id: str) -> list[Any]:
        """Rocket.Chat's ``removeLostConnections(nodeID)``: pull every connection of the
        instance; the ids of the users that had one (none when nothing changed).

        Cost: one ``find`` and one ``updateMany``, both on Rocket.Chat's
        ``connections.instanceId`` index.
        """
        query = {"connections.instanceId": instance_id}
        affected = [doc["_id"] for doc in self._sessions.find(query, {"_id": 1})]
        if not affected:
            return []
        result = self._sessions.update_many(
            query, {"$pull": {"connections": {"instanceId": instance_id}}}
        )
        return affected if result.modified_count else []

    def remove_other_instances_connections(self, live_ids: Sequence[str]) -> list[Any]:
        """Rocket.Chat's ``removeLostConnections()``: pull every connection whose instance
        is not one of ``live_ids``; the ids of the users that had one.

        Cost: one ``find`` and one ``updateMany`` over the documents holding such a
        connection (a collection scan: ``$nin`` cannot use the index).
        """
        ids = list(live_ids)
        query = {"connections": {"$elemMatch": {"instanceId": {"$nin": ids}}}}
        affected = [doc["_id"] for doc in self._sessions.find(query, {"_id": 1})]
        if not affected:
            return []
        result = self._sessions.update_many(
            {"_id": {"$in": affected}}, {"$pull": {"connections": {"instanceId": {"$nin": ids}}}}
        )
        return affected if result.modified_count else []

    def set_status_default(
        self, user_id: str, status_default: str, status_text: str | None
    ) -> bool:
        """The user's chosen status (and status text, when given): ``$set`` on ``users``,
        nothing else (presence's own ``status``/``statusConnection`` follow through the
        engine's conditional write). True when the document changed.

        Cost: one ``updateOne`` on the ``_id`` index.
        """
        fields: dict[str, Any] = {"statusDefault": status_default}
        if status_text is not None:
            fields["statusText"] = status_text
        return self._users.update_one({"_id": user_id}, {"$set": fields}).modified_count > 0

    # ------------------------------------------------------------------ checkpoints

    def load_checkpoint(self, name: str) -> Document | None:
        """The checkpoint ``name`` (``{_id: name, position, updatedAt}``), or None when
        none was saved. ``position`` comes back as saved (a resume token document, a
        ``bson.Timestamp``, ...).

        Cost: one ``find`` by ``_id`` (``limit 1``).
        """
        return self._checkpoints.find_one({"_id": name})

    def save_checkpoint(self, name: str, position: Any) -> None:
        """Save ``position`` (any BSON value) as checkpoint ``name``, creating it if
        needed; ``updatedAt`` is set to the server's clock.

        Cost: one upsert (``update`` command).
        """
        self._checkpoints.update_one(
            {"_id": name},
            {"$set": {"position": position}, "$currentDate": {"updatedAt": True}},
            upsert=True,
        )


class _ScanCursor:
    """A pymongo cursor read a batch at a time, each batch under its own operation timeout,
    string ids only. A lock keeps ``close`` from running beside a batch (pymongo cursors
    are not safe across threads at once); a ``close`` that comes while a batch is under way
    (in a thread its caller abandoned) does not wait for it: the batch closes the cursor
    when it ends."""

    def __init__(self, cursor: pymongo.cursor.Cursor[Document], batch: int) -> None:
        self._cursor = cursor
        self._batch = batch
        self._lock = threading.Lock()
        self._ended = False
        self._strings = False  # a string id was read: a stray now means the end
        self._closing = False

    def next_batch(self) -> list[Document]:
        with self._lock:
            try:
                return self._next_batch()
            finally:
                if self._closing:
                    self._cursor.close()

    def _next_batch(self) -> list[Document]:
        while not self._ended and not self._closing:
            with pymongo.timeout(SCAN_TIMEOUT_S):
                # With batch_size == batch: one server batch (find or getMore).
                docs = list(itertools.islice(self._cursor, self._batch))
            if not docs:
                self._ended = True
                break
            if isinstance(docs[0]["_id"], str) and isinstance(docs[-1]["_id"], str):
                self._strings = True
                return docs  # strings only (they are contiguous)
            strings = [doc for doc in docs if isinstance(doc["_id"], str)]
            if not isinstance(docs[-1]["_id"], str) and (strings or self._strings):
                self._ended = True  # past the last string: the rest are strays
                self._cursor.close()
            if strings:
                self._strings = True
                return strings
        return []

    def close(self) -> None:
        self._closing = True
        if self._lock.acquire(blocking=False):  # else: the batch under way closes it
            try:
                self._cursor.close()
            finally:
                self._lock.release()


def _not_a_string_id(doc: Document) -> bool:
    return not isinstance(doc["_id"], str)


def _stray_key(value: Any) -> tuple[str, Any]:
    """A key telling apart ids of different types that compare equal in Python (1, 1.0,
    True), so a stray read from both ends counts once."""
    try:
        hash(value)
    except TypeError:
        return type(value).__name__, repr(value)
    return type(value).__name__, value


def _expected(value: object) -> Any:
    """The filter for a stored field expected to hold exactly ``value`` as it was read:
    the same value and BSON type, a null, or (``ABSENT``) no field at all."""
    if value is ABSENT:
        return {"$exists": False}
    if value is None:
        return {"$exists": True, "$eq": None}  # $eq null alone also matches a missing field
    alias = _bson_type(value)
    return {"$eq": value} if alias is None else {"$eq": value, "$type": alias}


_BSON_TYPES: Final[tuple[tuple[type, str], ...]] = (
    (bool, "bool"),  # before int: a bool is an int in Python
    (Int64, "long"),  # before int: pymongo decodes a BSON long as Int64
    (int, "int"),
    (float, "double"),
    (str, "string"),
    (datetime, "date"),
    (ObjectId, "objectId"),
    (Decimal128, "decimal"),
    (Decimal, "decimal"),
    (Binary, "binData"),
    (bytes, "binData"),
    (Timestamp, "timestamp"),
    (Regex, "regex"),
)


def _bson_type(value: object) -> str | None:
    """The ``$type`` alias of a value pymongo decoded; None for arrays and documents
    (``$type`` would match their elements; ``$eq`` alone compares them whole)."""
    for kind, alias in _BSON_TYPES:
        if isinstance(value, kind):
            return alias
    return None


def _distinct(ids: Iterable[Any]) -> list[Any]:
    seen: set[Any] = set()
    out: list[Any] = []
    for user_id in ids:
        if user_id not in seen:
            seen.add(user_id)
            out.append(user_id)
    return out
