"""In-memory doubles of the daemon's store and feed, for tests driven by ``trio.testing.MockClock``.

Owns: :class:`MemoryStore`, a :class:`~presenced.store.PresenceStore` over plain dicts that
answers as :class:`~presenced.store.Store` answers MongoDB (the same projections, the same
conditional-write and guarded-pull semantics, the same paging), with Rocket.Chat's presence
writes as methods and failures that a test can inject; and :class:`MemoryFeed`, a
:class:`~presenced.blocking.Feed` that hands on a key for every change the store makes,
waits on trio's clock when idle, and can lose its history.

Together with ``presenced.blocking.inline`` they let a test run the whole daemon in one
trio run under a ``MockClock``: every timer (stale expiry, instance timeout, housekeeping,
backoff, shutdown) is driven by the mock clock, to the millisecond, with no thread and no
sleep. They are doubles of presenced's own seams, not of MongoDB: integration tests run
against the emulator or a real server.

Must never: be imported by the daemon.
"""

from __future__ import annotations

import copy
from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import Any

import trio

from presenced.feed.keys import InstancesChanged, Key, ResyncAll, SessionsChanged, UserChanged
from presenced.feed.source import HistoryLost
from presenced.presence import ABSENT, USER_FIELDS, from_ms, to_ms
from presenced.store import ReapRequest, ReconcileSource, StatusWrite, WriteOutcome

__all__ = ["MemoryCursor", "MemoryFeed", "MemoryStore"]

Document = dict[str, Any]


class MemoryFeed:
    """Keys in the order the store made its changes; positions are change counts."""

    def __init__(self, *, max_await_s: float = 1.0) -> None:
        self._max_await_s = max_await_s
        self._history: deque[tuple[int, Key]] = deque()
        self._lost_through = -1  # positions up to this one can no longer be resumed from
        self._stream_lost = False  # the open stream's position was lost under it
        self._next = 0  # how many changes were made (the position after the last one)
        self._position: int | None = None
        self._changed = trio.Event()
        self._poll_failures: list[BaseException] = []
        self.malformed = 0
        self.polls = 0
        self.opened: list[Any] = []

    # what the store calls
    def emit(self, key: Key) -> None:
        self._next += 1
        self._history.append((self._next, key))
        self._changed.set()

    # test controls
    def lose_history(self, *, break_stream: bool = True) -> None:
        """Forget every change made so far, as a too-small oplog would: no position up to
        now can be resumed from, and (unless ``break_stream`` is false: the stream is
        already down) the open stream fails on its next poll."""
        self._history.clear()
        self._lost_through = self._next
        self._stream_lost = break_stream

    def fail_polls(self, *errors: BaseException) -> None:
        """The next polls raise these, one each."""
        self._poll_failures.extend(errors)

    # the Feed interface
    async def open(self, position: Any) -> None:
        await trio.lowlevel.checkpoint()
        self.opened.append(position)
        if position is None:
            # From now: this position is resumable, whatever was lost before it.
            self._position = self._next
            self._lost_through = min(self._lost_through, self._next - 1)
            self._stream_lost = False
            return
        if not isinstance(position, int) or position <= self._lost_through:
            raise HistoryLost(f"position {position!r} is no longer in the history")
        self._position = position
        self._stream_lost = False

    async def poll(self) -> list[Key]:
        if self._position is None:
            raise RuntimeError("poll() before open()")
        self.polls += 1
        if self._poll_failures:
            await trio.lowlevel.checkpoint()
            raise self._poll_failures.pop(0)
        if self._next == self._position:
            self._changed = trio.Event()
            with trio.move_on_after(self._max_await_s):
                await self._changed.wait()
        else:
            await trio.lowlevel.checkpoint()
        if self._stream_lost:
            raise HistoryLost("the history after the position was lost")
        keys = [key for pos, key in self._history if pos > self._position]
        self._position = self._next
        return keys

    def position(self) -> Any:
        return self._position

    def lag_seconds(self, now: float) -> float:
        return 0.0

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()


class MemoryStore:
    """``users``, ``usersSessions``, ``instances`` and checkpoints in dicts.

    ``calls`` counts every store method called; ``fail(method, *errors)`` makes the next
    calls of ``method`` raise the given errors, one each (``"next_batch:users"`` or
    ``"next_batch:sessions"``: a reconcile cursor's batches of that source only).
    """

    def __init__(self, feed: MemoryFeed | None = None, *, replica_set: str | None = "rs0") -> None:
        self.feed = feed if feed is not None else MemoryFeed()
        self.replica_set = replica_set
        self.users: dict[Any, Document] = {}
        self.sessions: dict[Any, Document] = {}
        self.instances: dict[str, Document] = {}
        self.checkpoints: dict[str, Document] = {}
        self.calls: Counter[str] = Counter()
        self.cursors: list[MemoryCursor] = []
        """Every reconcile cursor opened, in order."""
        self.before_batch: Callable[[MemoryCursor], None] | None = None
        """Called with the cursor before each reconcile batch is read (it may raise)."""
        self.collation: Callable[[str], Any] | None = None
        """A sort key standing for a collection default collation (e.g. ``str.casefold``):
        reconcile cursors order string ids by it, unless opened with ``simple_order``."""
        self.writes: list[StatusWrite] = []
        self._failures: dict[str, list[BaseException]] = {}

    def fail(self, method: str, *errors: BaseException) -> None:
        self._failures.setdefault(method, []).extend(errors)

    def _call(self, method: str, *more: str) -> None:
        """Count ``method``; raise the next failure injected for it (or for one of the
        more specific names ``more``)."""
        self.calls[method] += 1
        for name in (*more, method):
            failures = self._failures.get(name)
            if failures:
                raise failures.pop(0)

    # -- Rocket.Chat's writes ---------------------------------------------------------------
    def add_user(
        self, user_id: Any, *, username: str | None = None, status_default: Any = ABSENT,
        status: Any = "offline", status_connection: Any = None, active: Any = True,
    ) -> None:
        doc: Document = {"_id": user_id, "username": username or f"name-{user_id}",
                         "active": active, "roles": ["user"], "type": "user"}
        for name, value in (("statusDefault", status_default), ("status", status),
                            ("statusConnection",
                             status if status_connection is None else status_connection)):
            if value is not ABSENT:
                doc[name] = value
        self.users[user_id] = doc
        self.feed.emit(UserChanged(user_id))

    def set_user_fields(self, user_id: Any, **fields: Any) -> None:
        self.users[user_id].update(fields)
        self.feed.emit(UserChanged(user_id))

    def connect(
        self, user_id: Any, connection_id: str, instance_id: str | None, at_ms: int,
        status: str = "online",
    ) -> None:
        entry: Document = {"id": connection_id, "status": status,
                           "_createdAt": from_ms(at_ms), "_updatedAt": from_ms(at_ms)}
        if instance_id is not None:
            entry["instanceId"] = instance_id
        doc = self.sessions.setdefault(user_id, {"_id": user_id, "connections": []})
        doc.setdefault("connections", []).append(entry)
        self.feed.emit(SessionsChanged(user_id))

    def set_connections(self, user_id: Any, connections: Any) -> None:
        """Replace the raw ``connections`` value (for malformed input)."""
        self.sessions[user_id] = {"_id": user_id, "connections": connections}
        self.feed.emit(SessionsChanged(user_id))

    def disconnect(self, connection_id: str) -> None:
        for uid, doc in self.sessions.items():
            before = doc.get("connections") or []
            after = [c for c in before if c.get("id") != connection_id]
            if len(after) != len(before):
                doc["connections"] = after
                self.feed.emit(SessionsChanged(uid))

    def heartbeat(
        self, user_id: Any, connection_id: str, at_ms: int, status: str | None = None
    ) -> None:
        for entry in self.sessions[user_id]["connections"]:
            if entry.get("id") == connection_id:
                entry["_updatedAt"] = from_ms(at_ms)
                if status is not None:
                    entry["status"] = status
                break
        self.feed.emit(SessionsChanged(user_id))

    def instance_heartbeat(self, instance_id: str, at_ms: int) -> None:
        self.instances[instance_id] = {"_id": instance_id, "_updatedAt": from_ms(at_ms)}
        self.feed.emit(InstancesChanged(instance_id))

    def put_instance(self, doc: Document) -> None:
        self.instances[doc["_id"]] = doc
        self.feed.emit(InstancesChanged(doc["_id"]))

    def remove_instance(self, instance_id: str) -> None:
        self.instances.pop(instance_id, None)
        self.feed.emit(InstancesChanged(instance_id))

    def drop_sessions(self) -> None:
        self.sessions.clear()
        self.feed.emit(ResyncAll("drop"))

    # -- the ActionStore interface (the broker's presence actions) ------------------------
    def add_connection(
        self, user_id: str, connection_id: str, instance_id: str, now: datetime
    ) -> None:
        self._call("add_connection")
        self.connect(user_id, connection_id, instance_id, to_ms(now))

    def touch_connection(self, user_id: str, connection_id: str, now: datetime) -> bool:
        self._call("touch_connection")
        stored = from_ms(to_ms(now))  # as BSON stores it: UTC, whole milliseconds
        for entry in self.sessions.get(user_id, {}).get("connections") or []:
            if entry.get("id") == connection_id:
                changed = not _same_instant(entry.get("_updatedAt"), stored)
                entry["_updatedAt"] = stored
                if changed:
                    self.feed.emit(SessionsChanged(user_id))
                return changed
        return False

    def remove_connection(self, connection_id: str) -> None:
        self._call("remove_connection")
        self.disconnect(connection_id)

    def set_connection_status(
        self, user_id: str, connection_id: str, status: str, now: datetime
    ) -> bool:
        self._call("set_connection_status")
        stored = from_ms(to_ms(now))
        changed = False
        for entry in self.sessions.get(user_id, {}).get("connections") or []:
            if entry.get("id") == connection_id:
                changed = changed or entry.get("status") != status or not _same_instant(
                    entry.get("_updatedAt"), stored
                )
                entry["status"] = status
                entry["_updatedAt"] = stored
        if changed:
            self.feed.emit(SessionsChanged(user_id))
        return changed

    def _pull_instances(self, lost: Callable[[object], bool]) -> list[Any]:
        affected = []
        for uid, doc in self.sessions.items():
            before = doc.get("connections") or []
            after = [c for c in before if not lost(c.get("instanceId"))]
            if len(after) != len(before):
                doc["connections"] = after
                affected.append(uid)
                self.feed.emit(SessionsChanged(uid))
        return affected

    def remove_instance_connections(self, instance_id: str) -> list[Any]:
        self._call("remove_instance_connections")
        return self._pull_instances(lambda iid: iid == instance_id)

    def remove_other_instances_connections(self, live_ids: Sequence[str]) -> list[Any]:
        self._call("remove_other_instances_connections")
        live = set(live_ids)
        return self._pull_instances(lambda iid: iid not in live)

    def set_status_default(
        self, user_id: str, status_default: str, status_text: str | None
    ) -> bool:
        self._call("set_status_default")
        doc = self.users.get(user_id)
        if doc is None:
            return False
        fields: Document = {"statusDefault": status_default}
        if status_text is not None:
            fields["statusText"] = status_text
        changed = any(doc.get(k, ABSENT) != v for k, v in fields.items())
        if changed:
            self.set_user_fields(user_id, **fields)
        return changed

    # -- what presenced reads back -------------------------------------------------------
    def presence(self, user_id: Any) -> tuple[Any, Any]:
        doc = self.users[user_id]
        return doc.get("status", ABSENT), doc.get("statusConnection", ABSENT)

    def connection_ids(self, user_id: Any) -> list[str]:
        return [c.get("id") for c in self.sessions.get(user_id, {}).get("connections") or []]

    # -- the PresenceStore interface ------------------------------------------------------
    def ping(self) -> None:
        self._call("ping")

    def hello(self) -> Document:
        self._call("hello")
        return {"isWritablePrimary": True, **({"setName": self.replica_set}
                                              if self.replica_set else {})}

    def ensure_indexes(self) -> None:
        self._call("ensure_indexes")

    def load_users(self, user_ids: Collection[Any]) -> dict[Any, Document]:
        self._call("load_users")
        return {
            uid: self._user_projected(uid, doc)
            for uid in user_ids if (doc := self.users.get(uid)) is not None
        }

    def load_sessions(self, user_ids: Collection[Any]) -> dict[Any, Document]:
        self._call("load_sessions")
        return {uid: copy.deepcopy(self.sessions[uid]) for uid in user_ids if uid in self.sessions}

    def load_instances(self) -> list[Document]:
        self._call("load_instances")
        return [
            {k: v for k, v in copy.deepcopy(doc).items() if k in ("_id", "_updatedAt")}
            for doc in self.instances.values()
        ]

    def _reconcile_docs(self, source: ReconcileSource, ids: list[Any]) -> list[Document]:
        if source == "sessions":
            return [self._session_projected(uid, self.sessions[uid]) for uid in ids]
        return [self._user_projected(uid, self.users[uid]) for uid in ids]

    @staticmethod
    def _user_projected(user_id: Any, doc: Document) -> Document:
        return {"_id": user_id, **{f: copy.deepcopy(doc[f]) for f in USER_FIELDS if f in doc}}

    @staticmethod
    def _session_projected(user_id: Any, doc: Document) -> Document:
        return {"_id": user_id, **({"connections": copy.deepcopy(doc["connections"])}
                                   if "connections" in doc else {})}

    def reconcile_cursor(
        self, source: ReconcileSource, after: str | None, batch: int, *,
        simple_order: bool = False,
    ) -> MemoryCursor:
        self._call("reconcile_cursor")
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        cursor = MemoryCursor(self, source, after, batch, simple_order=simple_order)
        self.cursors.append(cursor)
        return cursor

    def reconcile_strays(self, source: ReconcileSource) -> list[Document]:
        self._call("reconcile_strays")
        table = self.sessions if source == "sessions" else self.users
        return self._reconcile_docs(source, [uid for uid in table if not isinstance(uid, str)])

    def estimated_count(self, source: ReconcileSource) -> int:
        self._call("estimated_count")
        return len(self.sessions if source == "sessions" else self.users)

    def write_statuses(self, writes: Sequence[StatusWrite]) -> WriteOutcome:
        self._call("write_statuses")
        written: list[Any] = []
        conflicts: list[Any] = []
        for w in writes:
            self.writes.append(w)
            doc = self.users.get(w.user_id)
            if (
                doc is not None
                and _matches(doc, "status", w.expected_status)
                and _matches(doc, "statusConnection", w.expected_status_connection)
            ):
                doc["status"], doc["statusConnection"] = w.status, w.status_connection
                # As both feeds report a $set of the two fields: with the pair written.
                self.feed.emit(UserChanged(w.user_id, written=(w.status, w.status_connection)))
                written.append(w.user_id)
            elif doc is not None and (doc.get("status"), doc.get("statusConnection")) == (
                w.status, w.status_connection
            ):
                written.append(w.user_id)
            else:
                conflicts.append(w.user_id)
        return WriteOutcome(written=written, conflicts=conflicts)

    def reap(self, requests: Sequence[ReapRequest]) -> int:
        self._call("reap")
        modified = 0
        for r in requests:
            doc = self.sessions.get(r.user_id)
            if doc is None or not r.connection_ids:
                continue
            cutoff = to_ms(r.cutoff)
            before = doc.get("connections") or []
            after = [c for c in before
                     if not (c.get("id") in r.connection_ids
                             and isinstance(c.get("_updatedAt"), datetime)
                             and to_ms(c["_updatedAt"]) <= cutoff)]
            if len(after) != len(before):
                doc["connections"] = after
                modified += 1
                self.feed.emit(SessionsChanged(r.user_id))
        return modified

    def stale_sessions(self, cutoff: datetime, limit: int) -> list[Document]:
        self._call("stale_sessions")
        cutoff_ms = to_ms(cutoff)
        found = [
            copy.deepcopy(doc) for doc in self.sessions.values()
            if isinstance(doc.get("connections"), list) and any(
                isinstance(c, dict) and isinstance(c.get("_updatedAt"), datetime)
                and to_ms(c["_updatedAt"]) < cutoff_ms for c in doc["connections"]
            )
        ]
        return found[:limit]

    def load_checkpoint(self, name: str) -> Document | None:
        self._call("load_checkpoint")
        return copy.deepcopy(self.checkpoints.get(name))

    def save_checkpoint(self, name: str, position: Any) -> None:
        self._call("save_checkpoint")
        self.checkpoints[name] = {"_id": name, "position": position}


class MemoryCursor:
    """A reconcile cursor over the store's dicts. As the emulator's (and as a MongoDB cursor
    may, within a batch), it reads every document it will return when its first batch is
    asked for: a batch can be as old as the cursor's first one, never older."""

    def __init__(
        self, store: MemoryStore, source: ReconcileSource, after: str | None, batch: int,
        *, simple_order: bool = False,
    ) -> None:
        self.store = store
        self.source: ReconcileSource = source
        self.after = after
        self.batch = batch
        self.simple_order = simple_order
        self.batches = 0
        """Batches asked for (failed ones included)."""
        self.closed = False
        self._docs: deque[Document] | None = None

    def next_batch(self) -> list[Document]:
        store = self.store
        store._call("next_batch", f"next_batch:{self.source}")
        self.batches += 1
        if store.before_batch is not None:
            store.before_batch(self)
        if self.closed:
            return []  # as pymongo's cursor once exhausted (or closed)
        if self._docs is None:
            table = store.sessions if self.source == "sessions" else store.users
            collation = None if self.simple_order else store.collation
            ids = sorted((uid for uid in table if isinstance(uid, str)
                          and (self.after is None or uid > self.after)), key=collation)
            self._docs = deque(store._reconcile_docs(self.source, ids))
        out = [self._docs.popleft() for _ in range(min(self.batch, len(self._docs)))]
        if not self._docs:
            self.closed = True  # exhausted: MongoDB closes the cursor itself
        return out

    def close(self) -> None:
        self.store._call("close_cursor")
        self.closed = True


def _same_instant(stored: object, when: datetime) -> bool:
    """A stored date (naive is UTC, as pymongo reads BSON) is ``when`` to the millisecond."""
    return isinstance(stored, datetime) and to_ms(stored) == to_ms(when)


def _matches(doc: Document, field: str, expected: object) -> bool:
    """The real store's filter: the same value of the same type; ABSENT for no field."""
    if expected is ABSENT:
        return field not in doc
    if field not in doc:
        return False
    value = doc[field]
    return type(value) is type(expected) and value == expected

