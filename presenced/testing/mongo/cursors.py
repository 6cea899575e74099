"""Server-side cursors: query results, oplog tails and change streams.

Owns: what a cursor remembers between ``getMore`` calls, how a batch is cut, how an
awaitData cursor waits (on the store's condition variable, never by polling), resume
tokens and the history they can resume from (``History``: a token names the branch of
history that issued it, so a server refuses one whose history it does not hold), and how
oplog records become change events (a transaction's ``applyOps`` record becomes one event
per inner operation, all at the record's clusterTime, each with ``lsid``/``txnNumber``
and a resume token of its own: the operation's index). Called with ``Storage.lock`` held;
``wait`` releases it while sleeping. Never touches sockets.
"""

from __future__ import annotations

import itertools
import os
import random
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import bson
from bson import Timestamp
from mongomock_ng.filtering import filter_applies

from presenced.testing.mongo.diff import update_description
from presenced.testing.mongo.errors import CommandError
from presenced.testing.mongo.storage import (
    SYSTEM_DATABASES,
    OplogRecord,
    Storage,
    sort_documents,
)

Document = dict[str, Any]
MAX_BATCH_BYTES = 16 * 1024 * 1024
DEFAULT_FIRST_BATCH = 101
DEFAULT_AWAIT_MS = 1000


# -- resume tokens -------------------------------------------------------------------
# Opaque to clients, as in MongoDB. Ours: hex of (ts.time, ts.inc, event index, kind,
# branch of history). A token of the layout before the branch was added (11 bytes) names
# no history, so no server holds it.
TOKEN_EVENT, TOKEN_HIGH_WATER_MARK, TOKEN_INVALIDATE = 0, 1, 2
_TOKEN = struct.Struct(">IIHB8s")
_UNBRANCHED_TOKEN = struct.Struct(">IIHB")
BRANCH_BYTES = 8


@dataclass(frozen=True, order=True)
class TokenPosition:
    ts: Timestamp
    index: int
    kind: int
    #: The branch of history that issued the token (b"" for an unbranched token).
    branch: bytes = b""


def encode_token(ts: Timestamp, index: int, kind: int, branch: bytes) -> Document:
    return {"_data": _TOKEN.pack(ts.time, ts.inc, index, kind, branch).hex().upper()}


def decode_token(token: Any) -> TokenPosition:
    try:
        raw = bytes.fromhex(token["_data"])
        if len(raw) == _UNBRANCHED_TOKEN.size:
            t, i, index, kind = _UNBRANCHED_TOKEN.unpack(raw)
            branch = b""
        else:
            t, i, index, kind, branch = _TOKEN.unpack(raw)
    except Exception as exc:
        raise CommandError(260, f"Invalid resume token: {token!r}") from exc
    return TokenPosition(Timestamp(t, i), index, kind, branch)


@dataclass
class History:
    """Which change history this store holds, so resume tokens from elsewhere fail.

    Each life of the data is a branch with an id of its own: a store made empty starts a
    new one, and so does one loaded from a snapshot, since the life that saved the snapshot
    may have carried on (and issued tokens) after saving. A loaded store also holds its
    ancestors' history up to the cluster time each was saved at. A token resumes only if
    its branch is this one, or an ancestor and the token is no newer than that ancestor's
    save.
    """

    branch: bytes = field(default_factory=lambda: os.urandom(BRANCH_BYTES))
    #: branch id -> the last cluster time of that branch this store holds.
    ancestors: dict[bytes, Timestamp] = field(default_factory=dict)

    #: At most this many ancestors are kept in a snapshot (the oldest are dropped).
    MAX_ANCESTORS: ClassVar[int] = 1000

    def holds(self, pos: TokenPosition) -> bool:
        if pos.branch == self.branch:
            return True
        saved = self.ancestors.get(pos.branch)
        return saved is not None and pos.ts <= saved

    def lineage(self, saved_at: Timestamp, lost: Timestamp | None) -> list[tuple[bytes, Timestamp]]:
        """What a snapshot taken now records: the ancestors and this branch up to
        ``saved_at``, leaving out those whose every token is older than ``lost`` (the newest
        cluster time the oplog no longer holds)."""
        entries = [*self.ancestors.items(), (self.branch, saved_at)]
        if lost is not None:
            entries = [(b, ts) for b, ts in entries if ts > lost]
        return entries[-self.MAX_ANCESTORS :]

    @classmethod
    def descended_from(cls, lineage: Any) -> History:
        """A new branch holding the history a snapshot's ``lineage`` recorded (none for a
        snapshot without one)."""
        ancestors: dict[bytes, Timestamp] = {}
        if isinstance(lineage, list):
            for entry in lineage:
                if (
                    isinstance(entry, tuple) and len(entry) == 2
                    and isinstance(entry[0], bytes) and isinstance(entry[1], Timestamp)
                ):
                    ancestors[entry[0]] = entry[1]
        return cls(ancestors=ancestors)


# -- base ----------------------------------------------------------------------------
_ids = itertools.count(random.randint(1 << 40, 1 << 50))


class Cursor:
    def __init__(self, ns: str) -> None:
        self.id = next(_ids)
        self.ns = ns
        self.last_used = time.monotonic()
        self.exhausted = False

    def first_batch(self, storage: Storage, batch_size: int | None) -> list[Any]:
        raise NotImplementedError

    def next_batch(
        self, storage: Storage, batch_size: int | None, max_time_ms: int | None,
        stopping: Callable[[], bool],
    ) -> list[Any]:
        raise NotImplementedError

    def extra_reply(self) -> Document:
        return {}


def _cut(docs: list[Any], start: int, batch_size: int | None) -> tuple[list[Any], int]:
    """Slice a batch from docs[start:], at most batch_size docs and about 16 MiB."""
    out: list[Any] = []
    size = 0
    i = start
    while i < len(docs) and (batch_size is None or batch_size <= 0 or len(out) < batch_size):
        n = len(bson.encode(docs[i])) if isinstance(docs[i], Mapping) else 16
        if out and size + n > MAX_BATCH_BYTES:
            break
        out.append(docs[i])
        size += n
        i += 1
    return out, i


class ListCursor(Cursor):
    """A materialised result (find, aggregate, listCollections...)."""

    def __init__(self, ns: str, docs: list[Any]) -> None:
        super().__init__(ns)
        self.docs = docs
        self.pos = 0

    def first_batch(self, storage: Storage, batch_size: int | None) -> list[Any]:
        size = DEFAULT_FIRST_BATCH if batch_size is None else batch_size
        if size == 0:
            return []
        batch, self.pos = _cut(self.docs, 0, size)
        self.exhausted = self.pos >= len(self.docs)
        return batch

    def next_batch(
        self, storage: Storage, batch_size: int | None, max_time_ms: int | None,
        stopping: Callable[[], bool],
    ) -> list[Any]:
        batch, self.pos = _cut(self.docs, self.pos, batch_size)
        self.exhausted = self.pos >= len(self.docs)
        return batch


def _wait(storage: Storage, deadline: float, stopping: Callable[[], bool]) -> bool:
    """Sleep on the store's condition until a write or the deadline; False if timed out."""
    remaining = deadline - time.monotonic()
    if remaining <= 0 or stopping():
        return False
    storage.changed.wait(remaining)
    return not stopping()


# -- oplog tail ----------------------------------------------------------------------
class OplogCursor(Cursor):
    """A find on local.oplog.rs; tailable (and awaitData) when asked."""

    def __init__(
        self, storage: Storage, filter: Document, *, tailable: bool, await_data: bool,
        sort: list[tuple[str, Any]] | None, projection: Document | None, skip: int,
        limit: int,
    ) -> None:
        super().__init__("local.oplog.rs")
        self.filter = filter
        self.tailable = tailable
        self.await_data = await_data
        self.projection = projection
        self.sort = sort
        self.skip = skip
        self.remaining = limit if limit > 0 else None
        self.next_seq = storage.oplog.first_seq
        ts_cond = filter.get("ts") if isinstance(filter, Mapping) else None
        if isinstance(ts_cond, Mapping):
            if isinstance(ts_cond.get("$gt"), Timestamp):
                self.next_seq = storage.oplog.seq_after(ts_cond["$gt"])
            elif isinstance(ts_cond.get("$gte"), Timestamp):
                self.next_seq = storage.oplog.seq_after(ts_cond["$gte"], inclusive=True)
        self._static: list[Document] | None = None

    def _project(self, storage: Storage, docs: list[Document]) -> list[Document]:
        docs = [dict(d) for d in docs]
        if self.projection:
            return storage.apply_pipeline("local", docs, [{"$project": self.projection}])
        return docs

    def _scan(self, storage: Storage, batch_size: int | None) -> list[Document]:
        out: list[Document] = []
        for rec in storage.oplog.records_from(self.next_seq):
            self.next_seq = rec.seq + 1
            if filter_applies(self.filter, rec.entry):
                if self.skip:
                    self.skip -= 1
                    continue
                out.append(rec.entry)
                if self.remaining is not None:
                    self.remaining -= 1
                    if self.remaining <= 0:
                        self.exhausted = True
                        break
                if batch_size and len(out) >= batch_size:
                    break
        return self._project(storage, out)

    def first_batch(self, storage: Storage, batch_size: int | None) -> list[Any]:
        if not self.tailable:
            entries = [r.entry for r in storage.oplog.records_from(self.next_seq)
                       if filter_applies(self.filter, r.entry)]
            if self.sort:
                entries = sort_documents(entries, self.sort)
            entries = entries[self.skip:]
            if self.remaining is not None:
                entries = entries[: self.remaining]
            self._static = self._project(storage, entries)
            size = DEFAULT_FIRST_BATCH if batch_size is None else batch_size
            batch, self._pos = _cut(self._static, 0, size)
            self.exhausted = self._pos >= len(self._static)
            return batch
        return self._scan(storage, DEFAULT_FIRST_BATCH if batch_size is None else batch_size)

    def next_batch(
        self, storage: Storage, batch_size: int | None, max_time_ms: int | None,
        stopping: Callable[[], bool],
    ) -> list[Any]:
        if self._static is not None:
            batch, self._pos = _cut(self._static, self._pos, batch_size)
            self.exhausted = self._pos >= len(self._static)
            return batch
        wait_ms = (max_time_ms or DEFAULT_AWAIT_MS) if self.await_data else 0
        deadline = time.monotonic() + wait_ms / 1000
        while True:
            if self.next_seq < storage.oplog.first_seq:
                self.exhausted = True
                raise CommandError(
                    136,
                    "CollectionScan died due to position in capped collection being deleted."
                    " Last seen record id: RecordId(" + str(self.next_seq - 1) + ")",
                )
            batch = self._scan(storage, batch_size)
            if batch or self.exhausted or not _wait(storage, deadline, stopping):
                return batch


# -- change streams ------------------------------------------------------------------
FULL_DOCUMENT_MODES = ("default", "updateLookup", "whenAvailable", "required")
BEFORE_CHANGE_MODES = ("off", "whenAvailable", "required")


@dataclass
class StreamScope:
    db: str | None  # None: whole cluster
    coll: str | None  # None: whole database (or cluster)

    def matches(self, db: str, coll: str | None) -> bool:
        if self.db is None:
            if db in SYSTEM_DATABASES:
                return False
        elif db != self.db:
            return False
        if coll is not None and coll.startswith("system."):
            return False
        return self.coll is None or coll == self.coll


@dataclass
class ChangeStreamOptions:
    full_document: str = "default"
    before_change: str = "off"
    resume_after: Any = None
    start_after: Any = None
    start_at: Timestamp | None = None
    show_expanded: bool = False
    extra: Document = field(default_factory=dict)


def parse_change_stream_stage(spec: Any, *, cluster: bool) -> ChangeStreamOptions:
    if not isinstance(spec, Mapping):
        raise CommandError(14, "$changeStream stage must be an object")
    opts = ChangeStreamOptions()
    for key, value in spec.items():
        if key == "fullDocument":
            if value not in FULL_DOCUMENT_MODES:
                raise CommandError(
                    2, f"unrecognized value for fullDocument: {value!r}", extra={}
                )
            opts.full_document = value
        elif key == "fullDocumentBeforeChange":
            if value not in BEFORE_CHANGE_MODES:
                raise CommandError(2, f"unrecognized value for fullDocumentBeforeChange: {value!r}")
            opts.before_change = value
        elif key == "resumeAfter":
            opts.resume_after = value
        elif key == "startAfter":
            opts.start_after = value
        elif key == "startAtOperationTime":
            if not isinstance(value, Timestamp):
                raise CommandError(14, "startAtOperationTime must be a Timestamp")
            opts.start_at = value
        elif key == "allChangesForCluster":
            if value and not cluster:
                raise CommandError(
                    40415, "allChangesForCluster may only be set on the admin database"
                )
        elif key == "showExpandedEvents":
            opts.show_expanded = bool(value)
        elif key in ("allowToRunOnConfigDB", "allowToRunOnSystemNS", "showSystemEvents"):
            opts.extra[key] = value
        else:
            raise CommandError(40415, f"BSON field '$changeStream.{key}' is an unknown field.")
    given = [o for o in (opts.resume_after, opts.start_after, opts.start_at) if o is not None]
    if len(given) > 1:
        raise CommandError(
            40674, "Only one type of resume option is allowed, but multiple were found."
        )
    return opts


class ChangeStreamCursor(Cursor):
    def __init__(
        self, storage: Storage, ns: str, scope: StreamScope, opts: ChangeStreamOptions,
        pipeline: list[Document], history: History,
    ) -> None:
        super().__init__(ns)
        self.scope = scope
        self.opts = opts
        self.pipeline = pipeline
        self.branch = history.branch
        oplog = storage.oplog
        self.skip_through: TokenPosition | None = None
        if opts.resume_after is not None or opts.start_after is not None:
            token = opts.resume_after if opts.resume_after is not None else opts.start_after
            pos = decode_token(token)
            if pos.kind == TOKEN_INVALIDATE and opts.resume_after is not None:
                raise CommandError(
                    260,
                    "Attempting to resume a change stream using 'resumeAfter' is not allowed"
                    " from an invalidate notification.",
                )
            # A token of another server life (or of a tail its snapshot never saw) names
            # history this store does not hold, however its cluster time compares.
            lost = oplog.last_evicted_ts
            if not history.holds(pos) or (lost is not None and lost >= pos.ts):
                raise _history_lost()
            if pos.kind == TOKEN_HIGH_WATER_MARK:
                self.next_seq = oplog.seq_after(pos.ts)
            else:
                self.next_seq = oplog.seq_after(pos.ts, inclusive=True)
                self.skip_through = pos
            self.hwm = pos.ts
        elif opts.start_at is not None:
            if _before_history(storage, opts.start_at):
                raise _history_lost()
            self.next_seq = oplog.seq_after(opts.start_at, inclusive=True)
            self.hwm = Timestamp(opts.start_at.time, max(opts.start_at.inc - 1, 0))
        else:
            self.next_seq = oplog.next_seq
            self.hwm = storage.clock.last
        self.token: Document = self._token(self.hwm, 0, TOKEN_HIGH_WATER_MARK)
        self._pending: list[Document] = []

    def _token(self, ts: Timestamp, index: int, kind: int) -> Document:
        return encode_token(ts, index, kind, self.branch)

    def extra_reply(self) -> Document:
        return {"postBatchResumeToken": self.token}

    # event generation
    def _events(self, storage: Storage, rec: OplogRecord) -> list[tuple[TokenPosition, Document]]:
        e = rec.entry
        op = e["op"]
        out: list[tuple[int, int, Document]] = []
        if op == "n":
            return []
        db = e["ns"].partition(".")[0]
        base = {"clusterTime": rec.ts, "wallTime": e["wall"]}
        if op == "c" and isinstance(e["o"].get("applyOps"), list):
            return self._transaction_events(storage, rec, base)
        if op == "c":
            o = e["o"]
            if "drop" in o and self.scope.matches(db, o["drop"]):
                out.append((TOKEN_EVENT, 0, {"operationType": "drop", **base,
                                              "ns": {"db": db, "coll": o["drop"]}}))
                if self.scope.coll is not None:
                    out.append((TOKEN_INVALIDATE, 1, {"operationType": "invalidate", **base}))
            elif "renameCollection" in o and isinstance(o.get("to"), str):
                # Reported to streams on the source's collection, database or deployment
                # (and, as MongoDB does, on the target's database); a stream on the source
                # collection is invalidated.
                _, _, source = str(o["renameCollection"]).partition(".")
                to_db, _, target = o["to"].partition(".")
                if self.scope.matches(db, source) or (
                    self.scope.coll is None and self.scope.matches(to_db, target)
                ):
                    out.append((TOKEN_EVENT, 0, {
                        "operationType": "rename", **base, "ns": {"db": db, "coll": source},
                        "to": {"db": to_db, "coll": target},
                    }))
                    if self.scope.coll is not None:
                        out.append((TOKEN_INVALIDATE, 1, {"operationType": "invalidate",
                                                           **base}))
            elif "dropDatabase" in o and self.scope.coll is None and self.scope.matches(db, None):
                out.append((TOKEN_EVENT, 0, {"operationType": "dropDatabase", **base,
                                              "ns": {"db": db}}))
                if self.scope.db is not None:
                    out.append((TOKEN_INVALIDATE, 1, {"operationType": "invalidate", **base}))
            return [(TokenPosition(rec.ts, i, k), ev) for k, i, ev in out]
        ev = self._crud_event(storage, rec, e, base, rec.pre, rec.post)
        return [] if ev is None else [(TokenPosition(rec.ts, 0, TOKEN_EVENT), ev)]

    def _transaction_events(
        self, storage: Storage, rec: OplogRecord, base: Document
    ) -> list[tuple[TokenPosition, Document]]:
        """One event per CRUD operation of an applyOps record (nested ones included),
        token index = the operation's position in the flattened list."""
        e = rec.entry
        ops = _flatten_apply_ops(e["o"]["applyOps"])
        pres = rec.pre if isinstance(rec.pre, list) and len(rec.pre) == len(ops) else None
        posts = rec.post if isinstance(rec.post, list) and len(rec.post) == len(ops) else None
        session: Document = {}
        if "lsid" in e:
            session["lsid"] = e["lsid"]
        if "txnNumber" in e:
            session["txnNumber"] = e["txnNumber"]
        out: list[tuple[TokenPosition, Document]] = []
        for index, inner in enumerate(ops):
            ev = self._crud_event(
                storage, rec, inner, base,
                pres[index] if pres is not None else None,
                posts[index] if posts is not None else None,
            )
            if ev is not None:
                ev.update(session)
                out.append((TokenPosition(rec.ts, index, TOKEN_EVENT), ev))
        return out

    def _crud_event(
        self, storage: Storage, rec: OplogRecord, e: Mapping[str, Any], base: Document,
        pre: Any, post: Any,
    ) -> Document | None:
        """The insert/update/replace/delete event of one CRUD oplog entry, or None when
        the entry is out of this stream's scope (or not a CRUD entry)."""
        op = e.get("op")
        ns_str = e.get("ns")
        if op not in ("i", "u", "d") or not isinstance(ns_str, str):
            return None
        db, _, coll = ns_str.partition(".")
        if not self.scope.matches(db, coll):
            return None
        ns = {"db": db, "coll": coll}
        if op == "i":
            doc = e["o"]
            ev: Document = {"operationType": "insert", **base, "fullDocument": doc, "ns": ns,
                            "documentKey": {"_id": doc["_id"]}}
        elif op == "d":
            ev = {"operationType": "delete", **base, "ns": ns, "documentKey": dict(e["o"])}
        elif e["o"].get("$v") == 2 and "diff" in e["o"]:
            ev = {"operationType": "update", **base, "ns": ns, "documentKey": dict(e["o2"]),
                  "updateDescription": update_description(e["o"]["diff"])}
            mode = self.opts.full_document
            if mode == "updateLookup":
                ev["fullDocument"] = storage.get_document(db, coll, e["o2"]["_id"])
            elif mode in ("whenAvailable", "required"):
                if post is None and mode == "required":
                    raise _no_image("post", rec)
                ev["fullDocument"] = post
        else:
            ev = {"operationType": "replace", **base, "fullDocument": e["o"], "ns": ns,
                  "documentKey": dict(e["o2"])}
        if op in ("u", "d") and self.opts.before_change != "off":
            if pre is None and self.opts.before_change == "required":
                raise _no_image("pre", rec)
            ev["fullDocumentBeforeChange"] = pre
        return ev

    def _produce(self, storage: Storage, limit: int | None) -> list[Document]:
        batch: list[Document] = []
        for rec in storage.oplog.records_from(self.next_seq):
            events = self._events(storage, rec)
            for pos, ev in events:
                if self.skip_through is not None and (pos.ts, pos.index) <= (
                    self.skip_through.ts, self.skip_through.index
                ):
                    continue
                token = self._token(pos.ts, pos.index, pos.kind)
                ev = {"_id": token, **ev}
                for out in self._apply_pipeline(storage, ev):
                    batch.append(out)
                self.token = token
                self.hwm = pos.ts
                if pos.kind == TOKEN_INVALIDATE:
                    self.exhausted = True
            self.next_seq = rec.seq + 1
            self.skip_through = None
            if self.exhausted or (limit and len(batch) >= limit):
                return batch
        if storage.clock.last > self.hwm:
            self.hwm = storage.clock.last
        self.token = self._token(self.hwm, 0, TOKEN_HIGH_WATER_MARK)
        return batch

    def _apply_pipeline(self, storage: Storage, ev: Document) -> list[Document]:
        if not self.pipeline:
            return [ev]
        out = storage.apply_pipeline(self.scope.db or "admin", [ev], self.pipeline)
        for doc in out:
            if doc.get("_id") != ev["_id"]:
                raise CommandError(
                    280,
                    "Encountered an event whose _id field, which contains the resume token,"
                    " was modified by the pipeline. Modifying the _id field of an event makes"
                    " it impossible to resume the stream from that point.",
                )
        return out

    def _check_lost(self, storage: Storage) -> None:
        if self.next_seq < storage.oplog.first_seq:
            self.exhausted = True
            raise _history_lost()

    def first_batch(self, storage: Storage, batch_size: int | None) -> list[Any]:
        if batch_size == 0:
            return []
        self._check_lost(storage)
        return self._produce(storage, batch_size)

    def next_batch(
        self, storage: Storage, batch_size: int | None, max_time_ms: int | None,
        stopping: Callable[[], bool],
    ) -> list[Any]:
        deadline = time.monotonic() + (max_time_ms or DEFAULT_AWAIT_MS) / 1000
        while True:
            self._check_lost(storage)
            batch = self._produce(storage, batch_size)
            if batch or self.exhausted or not _wait(storage, deadline, stopping):
                return batch


def _flatten_apply_ops(ops: list[Any]) -> list[Mapping[str, Any]]:
    """The operations of an applyOps array, an inner ``{op: "c", o: {applyOps: [...]}}``
    replaced by its own operations, recursively."""
    out: list[Mapping[str, Any]] = []
    for inner in ops:
        if not isinstance(inner, Mapping):
            continue
        o = inner.get("o")
        if inner.get("op") == "c" and isinstance(o, Mapping) and isinstance(
            o.get("applyOps"), list
        ):
            out.extend(_flatten_apply_ops(o["applyOps"]))
        else:
            out.append(inner)
    return out


def _before_history(storage: Storage, ts: Timestamp) -> bool:
    """Whether a stream starting at ``ts`` (startAtOperationTime) needs entries the oplog
    no longer, or never, held: some at or after ``ts`` were evicted, or its oldest entry is
    newer than ``ts`` (MongoDB's test; a new replica set's oldest entry is its "initiating
    set" no-op). A resume token needs no such test: its branch says whose history it is."""
    oplog = storage.oplog
    lost = oplog.last_evicted_ts
    if lost is not None and lost >= ts:
        return True
    oldest = next(iter(oplog.records_from(oplog.first_seq)), None)
    return oldest is not None and oldest.ts > ts


def _history_lost() -> CommandError:
    return CommandError(
        286,
        "Resume of change stream was not possible, as the resume point may no longer be in"
        " the oplog.",
    )


def _no_image(which: str, rec: OplogRecord) -> CommandError:
    what = "post-image" if which == "post" else "pre-image"
    return CommandError(
        47,
        f"Change stream was configured to require a {what} for all update, delete and"
        f" replace events, but the {what} was not found for event at {rec.ts}.",
    )


class CursorRegistry:
    def __init__(self, timeout_s: float = 600.0) -> None:
        self.timeout_s = timeout_s
        self._cursors: dict[int, Cursor] = {}

    def add(self, cursor: Cursor) -> None:
        self._cursors[cursor.id] = cursor

    def get(self, cursor_id: int) -> Cursor:
        c = self._cursors.get(cursor_id)
        if c is None:
            raise CommandError(43, f"cursor id {cursor_id} not found")
        c.last_used = time.monotonic()
        return c

    def remove(self, cursor_id: int) -> bool:
        return self._cursors.pop(cursor_id, None) is not None

    def clear(self) -> None:
        self._cursors.clear()

    def expire_idle(self) -> int:
        limit = time.monotonic() - self.timeout_s
        dead = [cid for cid, c in self._cursors.items() if c.last_used < limit]
        for cid in dead:
            del self._cursors[cid]
        return len(dead)

    def __len__(self) -> int:
        return len(self._cursors)
