"""The oplog feed: ``local.oplog.rs`` entries in, presence keys out.

The alternative to :mod:`presenced.feed.changestream` for deployments that give presenced
the replica set's ``local`` database (``MONGO_OPLOG_URL``). It produces the same keys
(:mod:`presenced.feed.keys`) and offers the same source interface (``open``, ``position``,
``poll``, ``close``, ``malformed``, :class:`~presenced.feed.source.HistoryLost`), so
the daemon uses either.

Owns:

- :func:`decode_oplog_entry`, the pure decoder of one oplog entry (MongoDB's documented
  formats: ``i``/``u``/``d``, ``c`` with ``applyOps`` (transactions, nested), ``drop``,
  ``dropDatabase`` and ``renameCollection``; ``n`` is skipped) into keys, and
  :func:`touched_fields`, the top-level field names an update's ``o`` touches (``$v: 2``
  diffs, ``$v: 1``/unversioned ``$set``/``$unset``, replacements). Sans-io: no pymongo call,
  no clock; tested on entries written out by hand;
- :func:`oplog_filter`, the query that keeps the server from sending entries the decoder
  would throw away;
- :class:`OplogSource`, the blocking tailer: a tailable, awaitData cursor on
  ``local.oplog.rs`` resumed with ``ts > position``, recreated after errors, after the
  server dropped it and after a quiet period; the position to checkpoint (the ``ts`` of the
  last entry read); the feed's lag.

Must never:

- decide a status, or read the documents an entry names (the loader re-reads them; a key
  only says *which* document changed);
- run on the event loop: ``open``, ``poll`` and ``close`` block on the network and are
  called from a worker thread (``trio.to_thread.run_sync``). Nothing here imports trio.
  ``position`` and ``lag_seconds`` only read attributes, so they may be called from
  anywhere;
- raise from the decoder: a malformed entry is counted (``Decoded.malformed``,
  ``OplogSource.malformed``) and skipped;
- spin: an idle ``poll`` is one awaitData ``getMore`` that waits ``max_await_ms`` on the
  server.

Malformed entries (no ``ns``, no ``o``, an update without ``o2._id``, a document
operation without ``_id``, an unknown ``op``) yield no key, with one conservative
exception: a ``users`` update whose ``o`` has an unreadable shape (a broken ``$v: 2``
diff) still yields :class:`UserChanged`, flagged malformed, because a re-read is always
safe and a missed change is not.

Known limit: a *prepared* transaction (``applyOps`` with ``prepare: true``; these occur
only on the shards of a sharded cluster) is decoded when it is prepared, not when its
``commitTransaction`` entry lands, so its re-reads may see the documents before the commit.
presenced runs against a replica set, where transactions are logged at commit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from bson import Timestamp
from bson.codec_options import CodecOptions, DatetimeConversion
from pymongo import CursorType, MongoClient
from pymongo.client_session import ClientSession
from pymongo.collection import Collection
from pymongo.cursor import Cursor
from pymongo.errors import OperationFailure, PyMongoError

from presenced.feed.keys import (
    Decoded,
    InstancesChanged,
    Key,
    ResyncAll,
    SessionsChanged,
    UserChanged,
    status_pair_written,
    touches_presence_fields,
)
from presenced.feed.source import HistoryLost
from presenced.presence import Collections

__all__ = [
    "Decoded",
    "HistoryLost",
    "OplogSource",
    "decode_oplog_entry",
    "oplog_filter",
    "touched_fields",
]

OPLOG_DATABASE = "local"
OPLOG_COLLECTION = "oplog.rs"

_CAPPED_POSITION_LOST = 136
_MAX_NESTING = 16  # applyOps inside applyOps: deeper than this is refused as malformed

_NOTHING = Decoded()
_MALFORMED = Decoded(malformed=True)


# --------------------------------------------------------------------------------------------
# decoder (pure)


def decode_oplog_entry(entry: Mapping[str, Any], watched: Collections) -> Decoded:
    """What one oplog entry means for presence: its keys, and whether it was malformed.

    Never raises, whatever ``entry`` is.
    """
    try:
        return _decode(entry, watched, 0)
    except Exception:  # a shape no check below foresaw: count it, don't crash the feed
        return _MALFORMED


def _decode(entry: object, watched: Collections, depth: int) -> Decoded:
    if not isinstance(entry, Mapping):
        return _MALFORMED
    op = entry.get("op")
    if op == "n" or op == "db":  # no-op (periodic, or a new term); legacy "database created"
        return _NOTHING
    ns = entry.get("ns")
    if not isinstance(op, str) or not isinstance(ns, str) or "." not in ns:
        return _MALFORMED
    o = entry.get("o")
    if not isinstance(o, Mapping):
        return _MALFORMED
    db, coll = ns.split(".", 1)  # database names have no dots; collection names may
    if op == "c":
        return _decode_command(db, o, watched, depth)
    if op not in ("i", "u", "d"):
        return _MALFORMED
    if db != watched.database or coll not in watched.names:
        return _NOTHING
    if op == "u":
        o2 = entry.get("o2")
        if not isinstance(o2, Mapping) or "_id" not in o2:
            return _MALFORMED
        doc_id = o2["_id"]
    elif "_id" in o:
        doc_id = o["_id"]
    else:
        o2 = entry.get("o2")
        if not isinstance(o2, Mapping) or "_id" not in o2:
            return _MALFORMED
        doc_id = o2["_id"]
    if coll == watched.sessions:
        return Decoded((SessionsChanged(doc_id),))
    if coll == watched.instances:
        return Decoded((InstancesChanged(doc_id),))
    # users
    if op != "u":
        return Decoded((UserChanged(doc_id),))
    fields, broken = _touched(o)
    if fields is not None and not touches_presence_fields(fields):
        return _NOTHING
    written = None if fields is None else status_pair_written(_set_values(o), fields)
    return Decoded((UserChanged(doc_id, written),), malformed=broken)


def _decode_command(
    db: str, o: Mapping[str, Any], watched: Collections, depth: int
) -> Decoded:
    if "applyOps" in o:
        ops = o["applyOps"]
        if not isinstance(ops, list) or depth >= _MAX_NESTING:
            return _MALFORMED
        keys: list[Key] = []
        malformed = False
        for inner in ops:
            decoded = _decode(inner, watched, depth + 1)
            keys.extend(decoded.keys)
            malformed = malformed or decoded.malformed
        return Decoded(tuple(keys), malformed)
    if "dropDatabase" in o:
        return Decoded((ResyncAll("dropDatabase"),)) if db == watched.database else _NOTHING
    if "drop" in o:
        name = o["drop"]
        if not isinstance(name, str):
            return _MALFORMED
        if db == watched.database and name in watched.names:
            return Decoded((ResyncAll("drop"),))
        return _NOTHING
    if "renameCollection" in o:
        source, target = o.get("renameCollection"), o.get("to")
        if not isinstance(source, str) or not isinstance(target, str):
            return _MALFORMED
        # Renamed away from, or onto (replacing), a watched name: either way, resync.
        watched_ns = {f"{watched.database}.{name}" for name in watched.names}
        if source in watched_ns or target in watched_ns:
            return Decoded((ResyncAll("rename"),))
        return _NOTHING
    # create, createIndexes, collMod, commitTransaction, ...: nothing presence reads changed.
    return _NOTHING


def touched_fields(o: Mapping[str, Any]) -> frozenset[str] | None:
    """The top-level field names an update entry's ``o`` touches; None means every field.

    ``{"$v": 2, "diff": ...}``: the keys of the ``u``, ``i`` and ``d`` sections and the
    names after the ``s`` prefix of sub-diffs. ``$v: 1`` or unversioned: the first
    component of every ``$set`` / ``$unset`` path. A replacement (no ``$v``, no
    ``$``-operator), an operator this format doesn't have, or a shape that can't be read:
    None.
    """
    try:
        return _touched(o)[0]
    except Exception:
        return None


def _touched(o: Mapping[str, Any]) -> tuple[frozenset[str] | None, bool]:
    """:func:`touched_fields`, and whether ``o`` was broken (an unreadable update)."""
    version = o.get("$v")
    if version == 2:
        fields = _diff_fields(o.get("diff"))
        return fields, fields is None
    operators = [k for k in o if isinstance(k, str) and k.startswith("$")]
    if not operators:
        return None, False  # a whole-document replacement
    names: set[str] = set()
    for name in operators:
        if name == "$v":
            if version not in (1, 1.0):
                return None, True  # an update format this decoder doesn't know
            continue
        if name not in ("$set", "$unset"):
            return None, True
        paths = o[name]
        if not isinstance(paths, Mapping):
            return None, True
        for path in paths:
            if not isinstance(path, str):
                return None, True
            names.add(path.split(".", 1)[0])
    return frozenset(names), False


def _set_values(o: Mapping[str, Any]) -> Mapping[str, Any]:
    """The top-level fields an update entry sets whole, with their values (``$v: 2``: the
    ``u`` and ``i`` sections; ``$v: 1``: ``$set``); empty when it has none or no shape."""
    if o.get("$v") == 2:
        diff = o.get("diff")
        if not isinstance(diff, Mapping):
            return {}
        found: dict[str, Any] = {}
        for section in ("i", "u"):
            part = diff.get(section)
            if isinstance(part, Mapping):
                found.update(part)
        return found
    values = o.get("$set")
    return values if isinstance(values, Mapping) else {}


def _diff_fields(diff: object) -> frozenset[str] | None:
    """Top-level field names of a ``$v: 2`` diff; None if it has the wrong shape."""
    if not isinstance(diff, Mapping):
        return None
    names: set[str] = set()
    for section, value in diff.items():
        if not isinstance(section, str) or not isinstance(value, Mapping):
            return None
        if section in ("u", "i", "d"):
            if not all(isinstance(name, str) for name in value):
                return None
            names.update(value)
        elif section.startswith("s") and len(section) > 1:
            names.add(section[1:])
        else:
            return None
    return frozenset(names)


# --------------------------------------------------------------------------------------------
# server-side filter


def watched_namespaces(watched: Collections) -> list[str]:
    """The ``ns`` values an entry presence may care about has: the three collections, the
    watched database's commands (drops, renames) and ``admin.$cmd`` (transactions)."""
    db = watched.database
    return [f"{db}.{name}" for name in watched.names] + [f"{db}.$cmd", "admin.$cmd"]


def oplog_filter(watched: Collections, after: Timestamp | None) -> dict[str, Any]:
    """The ``find`` filter on ``local.oplog.rs``: entries after ``after`` (all if None)
    in :func:`watched_namespaces`, and no-ops.

    No-ops (``op: "n"``; a primary writes one about every 10 s when nothing else is
    written) carry no key but move :meth:`OplogSource.position` on, so the checkpoint of
    an idle deployment stays inside the oplog window. ``ts`` stays a top-level condition,
    which lets the server start the scan at ``after`` instead of at the oldest entry.
    """
    flt: dict[str, Any] = {}
    if after is not None:
        flt["ts"] = {"$gt": after}
    flt["$or"] = [{"ns": {"$in": watched_namespaces(watched)}}, {"op": "n"}]
    return flt


# --------------------------------------------------------------------------------------------
# the source (blocking; worker threads only)


def _history_lost(position: Timestamp, oldest: Timestamp | None) -> HistoryLost:
    return HistoryLost(
        f"the saved oplog position {position} is no longer in the oplog (its oldest entry"
        f" is {oldest}); presenced was stopped, or fell behind, for longer than the oplog"
        " window. Reconcile every user and open the feed from now; a larger oplog"
        " (replSetResizeOplog) widens the window."
    )


def _entry_seconds(entry: Mapping[str, Any], ts: Timestamp) -> float:
    """When an entry was written: its ``wall`` clock if it has one, else its ``ts``."""
    wall = entry.get("wall")
    if isinstance(wall, datetime):
        if wall.tzinfo is None:
            wall = wall.replace(tzinfo=UTC)
        return wall.timestamp()
    return float(ts.time)


class OplogSource:
    """A tail of ``local.oplog.rs`` over the watched collections, read in polls.

    Blocking: call ``open``, ``poll`` and ``close`` from a worker thread, one call at a
    time. ``client`` is connected with MONGO_OPLOG_URL; ``watched`` names the Rocket.Chat
    database (MONGO_URL's).

    ``position()`` is the ``ts`` (a :class:`bson.Timestamp`) of the last entry ``poll``
    read; the caller checkpoints it once the writes caused by every key returned so far
    have landed, and ``open(position)`` continues with exactly the entries after it.

    The cursor is recreated from ``position()`` on the next ``poll`` after an error (which
    that ``poll`` raised), after the server dropped it (pymongo reports a cursor killed,
    not found, or whose position was overwritten by marking it dead), and after
    ``quiet_reopen_s`` without an entry, the way mature tailers guard against a cursor
    silently stuck on a dead connection. Every recreation first checks that the oldest
    entry is not newer than the position; if it is, entries were lost and ``poll`` raises
    :class:`HistoryLost`.
    """

    def __init__(
        self,
        client: MongoClient[Any],
        watched: Collections,
        *,
        max_await_ms: int = 1000,
        batch_size: int = 1000,
        quiet_reopen_s: float = 60.0,
    ) -> None:
        self._watched = watched
        self._max_await_ms = max_await_ms
        self._batch_size = batch_size
        self._quiet_reopen_s = quiet_reopen_s
        codecs: CodecOptions[Any] = CodecOptions(
            tz_aware=True,
            # A document with a date BSON allows and Python doesn't must not stop the feed.
            datetime_conversion=DatetimeConversion.DATETIME_AUTO,
            uuid_representation=client.codec_options.uuid_representation,
        )
        self._oplog: Collection[Any] = client[OPLOG_DATABASE].get_collection(
            OPLOG_COLLECTION, codec_options=codecs
        )
        self._opened = False
        self._cursor: Cursor[Any] | None = None
        self._consumed = 0  # entries taken from the current cursor
        self._fresh = False  # the current cursor has not sent its find yet
        self._last_entry_at = 0.0  # time.monotonic() of the last entry (or cursor creation)
        self._position: Timestamp | None = None
        # (wall time in epoch seconds of the last entry read, entries pending after it)
        self._lag_state: tuple[float | None, bool] = (None, False)
        self.malformed = 0
        """Entries the decoder refused since this source was made."""

    # -- lifecycle --------------------------------------------------------------------------
    def open(self, position: Timestamp | None) -> None:
        """Starts the tail after ``position`` (None: after the newest entry there is now).

        Raises :class:`HistoryLost` if the oldest entry in the oplog is newer than
        ``position`` (entries after it may have been overwritten), or if ``position`` is
        not a :class:`bson.Timestamp`.
        """
        self.close()
        if position is None:
            position = self._newest_ts()
        elif not isinstance(position, Timestamp):
            # Not an oplog position (a change-stream token saved under this feed's name?):
            # it can't be resumed from, so the caller reconciles and starts from now.
            raise HistoryLost(
                f"the saved position {position!r} is not an oplog position (a bson.Timestamp);"
                " reconcile every user and open the feed from now"
            )
        else:
            self._check_history(position)
        self._position = position
        self._lag_state = (None, False)
        self._opened = True
        self._start_cursor()

    def close(self) -> None:
        """Closes the cursor; ``position()`` still answers. Safe to call twice."""
        self._opened = False
        self._discard_cursor()

    def position(self) -> Timestamp | None:
        """The ``ts`` of the last entry read (of the newest entry at ``open(None)``)."""
        return self._position

    # -- reading ----------------------------------------------------------------------------
    def poll(self, max_events: int = 1000) -> list[Key]:
        """The keys of the next entries, at most ``max_events`` entries' worth, in order.

        Returns ``[]`` after about ``max_await_ms`` without entries; once entries flow it
        returns as soon as the batch in hand is used up, without waiting for more.
        Raises :class:`HistoryLost` if entries after ``position()`` were overwritten.
        Other errors propagate after the cursor is dropped (the next ``poll`` recreates it
        from ``position()``); if entries were already read when an error strikes, their
        keys are returned and the next ``poll`` carries on.
        """
        if not self._opened:
            raise RuntimeError("OplogSource.poll() called before open() or after close()")
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        cursor = self._cursor
        if cursor is not None and (
            not cursor.alive or time.monotonic() - self._last_entry_at >= self._quiet_reopen_s
        ):
            self._discard_cursor()
            cursor = None
        if cursor is None:
            if self._position is not None:
                self._check_history(self._position)
            cursor = self._start_cursor()
        keys: list[Key] = []
        read = 0
        try:
            while read < max_events:
                if read and cursor.retrieved <= self._consumed:
                    break  # the batch in hand is used up: return now rather than wait
                try:
                    entry = cursor.next()
                except StopIteration:
                    if self._fresh and cursor.alive:
                        # That was the find, which never waits; the getMore does.
                        self._fresh = False
                        continue
                    break
                self._fresh = False
                self._consumed += 1
                read += 1
                keys.extend(self._apply(entry))
        except OperationFailure as exc:
            self._discard_cursor()
            if keys:
                return self._done(keys, pending=True)
            if exc.code == _CAPPED_POSITION_LOST and self._position is not None:
                self._check_history(self._position)
            raise
        except PyMongoError:
            self._discard_cursor()
            if keys:
                return self._done(keys, pending=True)
            raise
        pending = read >= max_events or cursor.retrieved > self._consumed
        if not cursor.alive:
            # Killed, not found, or overwritten under it (pymongo swallows
            # CappedPositionLost on tailable cursors and only marks them dead).
            self._discard_cursor()
            if not keys and self._position is not None:
                self._check_history(self._position)
        return self._done(keys, pending=pending)

    def lag_seconds(self, now: datetime | float | None = None) -> float:
        """How far the feed is behind: ``now`` (epoch seconds, a datetime, default the
        wall clock) minus the wall time of the last entry read, while entries are pending
        (the last poll filled its batch or left entries in hand); else 0."""
        written, pending = self._lag_state
        if not pending or written is None:
            return 0.0
        if now is None:
            now_s = time.time()
        elif isinstance(now, datetime):
            now_s = (now if now.tzinfo is not None else now.replace(tzinfo=UTC)).timestamp()
        else:
            now_s = float(now)
        return max(0.0, now_s - written)

    # -- internals --------------------------------------------------------------------------
    def _apply(self, entry: Mapping[str, Any]) -> list[Key]:
        self._last_entry_at = time.monotonic()
        ts = entry.get("ts")
        if isinstance(ts, Timestamp):
            self._position = ts
            self._lag_state = (_entry_seconds(entry, ts), self._lag_state[1])
        else:
            self.malformed += 1  # can't happen on a real oplog; keep the old position
            return []
        decoded = decode_oplog_entry(entry, self._watched)
        if decoded.malformed:
            self.malformed += 1
        return list(decoded.keys)

    def _done(self, keys: list[Key], *, pending: bool) -> list[Key]:
        self._lag_state = (self._lag_state[0], pending)
        return keys

    def _start_cursor(self) -> Cursor[Any]:
        cursor = self._oplog.find(
            oplog_filter(self._watched, self._position),
            cursor_type=CursorType.TAILABLE_AWAIT,
            batch_size=self._batch_size,
        ).max_await_time_ms(self._max_await_ms)
        self._cursor = cursor
        self._consumed = 0
        self._fresh = True
        self._last_entry_at = time.monotonic()
        return cursor

    def _discard_cursor(self) -> None:
        cursor, self._cursor = self._cursor, None
        if cursor is not None:
            # The server or the connection may be gone: then there is nothing left to close.
            with contextlib.suppress(PyMongoError):
                cursor.close()

    def _edge_ts(self, direction: int, session: ClientSession | None = None) -> Timestamp | None:
        cursor = self._oplog.find({}, {"ts": 1}, session=session)
        docs = list(cursor.sort("$natural", direction).limit(1))
        ts = docs[0].get("ts") if docs else None
        return ts if isinstance(ts, Timestamp) else None

    def _newest_ts(self) -> Timestamp | None:
        """The newest entry's ``ts``; for an empty oplog (a replica set just initiated), the
        server's operation time, which every later entry's ``ts`` exceeds."""
        with self._oplog.database.client.start_session(causal_consistency=False) as session:
            newest = self._edge_ts(-1, session)
            if newest is not None:
                return newest
            operation_time = session.operation_time
        return operation_time if isinstance(operation_time, Timestamp) else None

    def _check_history(self, position: Timestamp) -> None:
        """Raises :class:`HistoryLost` if the oldest entry is newer than ``position``."""
        oldest = self._edge_ts(1)
        if oldest is not None and oldest > position:
            raise _history_lost(position, oldest)
