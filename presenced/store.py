"""The store: every MongoDB call the daemon makes, and nothing else.

This module owns each read and write presenced issues against Rocket.Chat's database
(``users``, ``usersSessions``, ``instances``) and its own bookkeeping collection
(``presenced_checkpoints``): the bulk loads by ``_id``, the reconcile scan, the
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

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from pymongo import ASCENDING, MongoClient, UpdateOne
from pymongo.collection import Collection as MongoCollection
from pymongo.cursor import Cursor
from pymongo.database import Database

__all__ = [
    "SESSIONS_UPDATED_AT_INDEX",
    "USER_FIELDS",
    "CollectionNames",
    "ReapRequest",
    "StatusWrite",
    "Store",
    "WriteOutcome",
]

Document = dict[str, Any]

SESSIONS_UPDATED_AT_INDEX: Final = "presenced_connections_updatedAt"
"""The one index presenced creates: ``usersSessions {"connections._updatedAt": 1}``."""

USER_FIELDS: Final = (
    "username",
    "active",
    "statusDefault",
    "status",
    "statusConnection",
    "statusText",
    "roles",
    "type",
)
"""The ``users`` fields presence reads (the derivation, and the event payload)."""

_OFFLINE: Final = "offline"


@dataclass(frozen=True)
class CollectionNames:
    """The collection names, Rocket.Chat's defaults unless the settings say otherwise."""

    users: str = "users"
    sessions: str = "usersSessions"
    instances: str = "instances"
    checkpoints: str = "presenced_checkpoints"


@dataclass(frozen=True)
class StatusWrite:
    """Set ``users.status``/``statusConnection`` of one user, if they still hold the
    expected values. An expected value of ``None`` means "absent or null"."""

    user_id: Any
    status: str
    status_connection: str
    expected_status: str | None
    expected_status_connection: str | None


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


class Store:
    """Every MongoDB call of the daemon, over one pymongo client.

    Blocking: call each method (and each ``next()`` of the iterators) from a worker
    thread. The store holds no state of its own between calls, so one instance may be
    used from several worker threads at once (pymongo's client is thread-safe); an
    iterator, like the cursor under it, must be advanced by one thread at a time.
    """

    def __init__(
        self,
        client: MongoClient[Document],
        database: str,
        names: CollectionNames = CollectionNames(),
    ) -> None:
        self._client = client
        self._db: Database[Document] = client[database]
        self.names = names
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
        return self._load_by_id(self._sessions, user_ids, {"connections": 1})

    def load_users(self, user_ids: Collection[Any]) -> dict[Any, Document]:
        """The ``users`` documents of ``user_ids``, projected to ``_id`` and the fields
        presence reads (``USER_FIELDS``), keyed by ``_id``; a missing id is absent.

        Cost: as ``load_sessions``: one ``find({_id: {$in: ids}})`` answered in its first
        batch; no call for no ids.
        """
        return self._load_by_id(self._users, user_ids, dict.fromkeys(USER_FIELDS, 1))

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

    def iter_reconcile_ids(self, batch_size: int = 1000) -> Iterator[list[Any]]:
        """The ids of every user presence must look at, in lists of at most
        ``batch_size``: users whose ``usersSessions.connections`` is non-empty, then users
        whose ``users.status`` or ``statusConnection`` is set and not ``"offline"``
        (missing or null counts as offline). Each id appears once per pass.

        Streamed, not sorted: two cursors in turn (``usersSessions`` first, then
        ``users``), each read ``batch_size`` documents of ``{_id}`` at a time. Memory: the
        ids yielded from ``usersSessions`` are remembered to skip them in the ``users``
        pass, so one id per user with connections (plus one batch) is held until the pass
        ends; nothing else grows with the collections.

        Cost: one ``find`` per collection (each a collection scan: no index serves
        "non-empty array" or "not offline") and a ``getMore`` per ``batch_size`` documents
        read. A ``next()`` usually costs at most one round trip; the ``users`` pass may
        read several batches before yielding when most of its ids were already yielded.
        Closing the iterator early closes the open cursor.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        yielded: set[Any] = set()
        batch: list[Any] = []
        with self._sessions.find(
            {"connections.0": {"$exists": True}}, {"_id": 1}, batch_size=batch_size
        ) as sessions:
            for doc in sessions:
                if doc["_id"] in yielded:
                    continue
                yielded.add(doc["_id"])
                batch.append(doc["_id"])
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        not_offline = {"$nin": [_OFFLINE, None]}
        with self._users.find(
            {"$or": [{"status": not_offline}, {"statusConnection": not_offline}]},
            {"_id": 1},
            batch_size=batch_size,
        ) as users:
            for doc in users:
                if doc["_id"] in yielded:
                    continue
                batch.append(doc["_id"])
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    # ------------------------------------------------------------------ users writes

    def write_statuses(self, writes: Sequence[StatusWrite]) -> WriteOutcome:
        """Set ``status``/``statusConnection`` of each user whose stored values are still
        the expected ones; report which writes hold and which met a concurrent change.

        Each write is ``UpdateOne({_id, status: expected, statusConnection: expected},
        {$set: {status, statusConnection}})``, an expected ``None`` matching a missing or
        null field. No other field is touched, ``_updatedAt`` included (as Rocket.Chat
        writes them). The ids of ``writes`` should be distinct.

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

    def iter_stale_sessions(
        self, cutoff: datetime, batch_size: int = 500
    ) -> Iterator[list[Document]]:
        """The ``usersSessions`` documents (``_id``, ``connections``) with at least one
        connection whose ``_updatedAt`` is before ``cutoff``, in lists of at most
        ``batch_size``, for the reaper's sweep. Whole documents: the caller decides which
        of their connections go (and reaps them with their own cutoff).

        Cost: one ``find({"connections._updatedAt": {$lt: cutoff}})`` on the index of
        ``ensure_indexes`` (a collection scan without it), and one ``getMore`` per
        ``batch_size`` documents; each ``next()`` is at most one round trip. Closing the
        iterator early closes the cursor.
        """
        return self._iter_sessions({"connections._updatedAt": {"$lt": cutoff}}, batch_size)

    def iter_sessions_with_instances(
        self, instance_ids: Collection[str], batch_size: int = 500
    ) -> Iterator[list[Document]]:
        """The ``usersSessions`` documents (``_id``, ``connections``) with at least one
        connection on one of ``instance_ids`` (the dead instances), in lists of at most
        ``batch_size``.

        Cost: one ``find({"connections.instanceId": {$in: ids}})`` on Rocket.Chat's
        ``connections.instanceId`` index, and one ``getMore`` per ``batch_size`` documents;
        each ``next()`` is at most one round trip. No call for no ids.
        """
        ids = list(instance_ids)
        if not ids:
            return iter(())
        return self._iter_sessions({"connections.instanceId": {"$in": ids}}, batch_size)

    def _iter_sessions(self, query: Mapping[str, Any], batch_size: int) -> Iterator[list[Document]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        cursor = self._sessions.find(query, {"connections": 1}, batch_size=batch_size)
        return _batches(cursor, batch_size)

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


def _expected(value: str | None) -> Any:
    """The filter for a stored field expected to hold ``value``; None: missing or null."""
    return {"$in": [None]} if value is None else str(value)


def _distinct(ids: Iterable[Any]) -> list[Any]:
    seen: set[Any] = set()
    out: list[Any] = []
    for user_id in ids:
        if user_id not in seen:
            seen.add(user_id)
            out.append(user_id)
    return out


def _batches(cursor: Cursor[Document], batch_size: int) -> Iterator[list[Document]]:
    """``cursor``'s documents in lists of at most ``batch_size``; closes it when done
    or when the iterator is closed early."""
    with cursor:
        batch: list[Document] = []
        for doc in cursor:
            batch.append(doc)
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
