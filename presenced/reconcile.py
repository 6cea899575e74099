"""Reconciliation: check every user whose presence may be wrong, from scratch.

Owns: the walk over every user, each user's two documents read once, side by side: one
cursor per collection (``usersSessions`` and ``users``, whole, string ids in ``_id``
order), read a batch at a time, and the two sorted streams merged by ``_id`` here, so
every user has both documents (or knows it has none) without a read by ``_id``: the walk
costs what reading both collections back to back costs MongoDB. Which users need the
engine is decided from the documents (``needs_check``): those with connections, and those
stored other than offline; a user stored offline with no connections is left alone.
Then the documents whose ids are not strings (none in Rocket.Chat), read apart.

Each cursor runs in its own task, one batch ahead of the merge (so reading overlaps
merging, loading and writing), and the merged users go in batches of ``writer.BATCH`` to
``MAX_CONCURRENT_SYNC`` workers; every step waits for the next, so memory stays bounded
(a batch of each cursor, one ahead, and the workers' batches). A cursor that fails or
times out is closed and reopened after the last ``_id`` it gave, with backoff, so a
large database is never read again from the start. Each cursor is numbered by the writer
(``open_read``) before it is opened, and a user's documents go to the engine under the
older number of the two cursors that gave them, so a reconcile read never overrides a
newer read the engine holds: a cursor may answer a late batch with documents read when it
started (the emulator reads every document at the ``find``), so its number covers its
whole life. The pairs our writes confirm meanwhile replace the pairs read (the writer
collects them until the walk ends). Progress (users done, documents read, rates) is
logged every few seconds.

Must never: decide a status (the engine does), or call the store but through
:class:`~presenced.blocking.StoreCalls`.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from operator import itemgetter
from typing import Any, Final, TypeVar

import trio
from loguru import logger
from pymongo.errors import PyMongoError

from presenced.blocking import StoreCalls
from presenced.clock import Clock
from presenced.engine import Reason
from presenced.metrics import Metrics
from presenced.store import ReconcileCursor, ReconcileSource
from presenced.writer import BATCH, Writer

__all__ = [
    "CLOSE_TIMEOUT_S", "PROGRESS_EVERY_S", "SCAN_BATCH", "Reconciler", "UnorderedIds",
    "needs_check",
]

SCAN_BATCH: Final = 10 * BATCH
"""Documents per batch of a reconcile cursor (per ``getMore``): few round trips, small
enough to hold two of each source in memory and to retry."""
PROGRESS_EVERY_S: Final = 5.0
"""A reconciliation logs its progress at most this often."""
CLOSE_TIMEOUT_S: Final = 2.0
"""Longest wait for a cursor's close when the walk ends or is cancelled (the close goes on
in its worker thread)."""

T = TypeVar("T")
Doc = dict[str, Any]
_OFFLINE: Final = ("offline", None)
_id_of = itemgetter("_id")


def needs_check(user: Mapping[str, Any] | None, session: Mapping[str, Any] | None) -> bool:
    """Whether a user's documents (None: no such document) can make the engine write or
    refuse something: a ``usersSessions`` document whose ``connections`` is set and not
    empty (malformed included), or a ``users`` document whose ``status`` or
    ``statusConnection`` is set and not ``"offline"``. A user stored offline without
    connections is right already; a sessions document without connections and without a
    user is nobody's."""
    if session is not None:
        connections = session.get("connections")
        if connections is not None and connections != []:
            return True
    if user is None:
        return False
    return user.get("status") not in _OFFLINE or user.get("statusConnection") not in _OFFLINE


class UnorderedIds(RuntimeError):
    """A cursor gave ids out of the order the merge compares them in (code point order,
    MongoDB's for strings without a collation): merging would pair users wrongly."""


def _check_order(scan: _Scan, docs: list[Doc]) -> None:
    ids = [doc["_id"] for doc in docs]
    if (scan.after is None or scan.after < ids[0]) and all(map(operator.lt, ids, ids[1:])):
        return
    raise UnorderedIds(
        f"MongoDB returned {scan.source} ids out of code point order (after"
        f" {scan.after!r}: {ids[:3]!r}...); a collation on the collection? Reconciliation"
        " merges the two collections by _id and cannot go on"
    )


@dataclass(eq=False)
class _Batch:
    """At most ``BATCH`` users, with their documents (None: none), read under ``seq``."""

    seq: int
    ids: list[Any] = field(default_factory=list)
    users: dict[Any, Any] = field(default_factory=dict)
    sessions: dict[Any, Any] = field(default_factory=dict)


@dataclass(eq=False)
class _Chunk:
    """One batch of a cursor, and the read number of that cursor."""

    seq: int
    docs: list[Doc]


class _Scan:
    """A source's cursor as the walk resumes it: the cursor open (None: to open, after
    ``after``), its read number."""

    def __init__(self, source: ReconcileSource, *, simple_order: bool) -> None:
        self.source: ReconcileSource = source
        self.cursor: ReconcileCursor | None = None
        self.seq = -1
        self.after: str | None = None
        self.simple_order = simple_order


class _Merge:
    """One source as the merge consumes it: the documents received and not handed over
    (in ``_id`` order, from ``pos``), the read number of the cursor that gave them."""

    def __init__(self, receive: trio.MemoryReceiveChannel[_Chunk]) -> None:
        self.receive = receive
        self.docs: list[Doc] = []
        self.pos = 0
        self.seq = -1
        self.done = False

    async def fill(self) -> int:
        """Receive the next batch when every document received was handed over; how
        many documents came."""
        received = 0
        while not self.done and self.pos == len(self.docs):
            try:
                chunk = await self.receive.receive()
            except trio.EndOfChannel:
                self.done = True
                self.docs, self.pos = [], 0
                return received
            # An empty chunk (a cursor's last) still tells which cursor found nothing more.
            self.docs, self.pos, self.seq = chunk.docs, 0, chunk.seq
            received += len(chunk.docs)
        return received

    def take(self, bound: Any) -> list[Doc]:
        """The documents up to ``bound`` included (None: all)."""
        end = len(self.docs) if bound is None else bisect.bisect_right(
            self.docs, bound, self.pos, key=_id_of
        )
        taken = self.docs[self.pos : end]
        self.pos = end
        return taken


class Reconciler:
    """Walks every user and hands each batch to the writer."""

    def __init__(
        self, db: StoreCalls, writer: Writer, clock: Clock, metrics: Metrics
    ) -> None:
        self._db = db
        self._writer = writer
        self._clock = clock
        self._metrics = metrics
        self._simple_order = False
        """Cursors sort under the simple collation: ids came out of code point order."""

    async def reconcile(self, cause: str) -> int:
        """One full pass; returns the number of users checked.

        Ids out of code point order (a default collation on a collection) end the pass
        before anything is paired wrongly; it is walked again, once, with cursors sorted
        under the simple collation. Should that fail too, the pass is given up with an
        error (the feed goes on; the next reconciliation tries again), never a crash.
        """
        unordered: UnorderedIds | None = None
        try:
            return await self._pass(cause)
        except* UnorderedIds as group:
            unordered = _first(group)
        if self._simple_order:
            logger.error("reconciliation ({}) given up: {}", cause, unordered)
            self._metrics.feed_errors.labels("reconcile_order").inc()
            return 0
        logger.warning(
            "{}; walking again with the simple (binary) collation, which MongoDB sorts"
            " in memory or on disk", unordered,
        )
        self._simple_order = True
        return await self.reconcile(cause)

    async def _pass(self, cause: str) -> int:
        self._metrics.reconciliations.labels(cause).inc()
        started = self._clock.monotonic()
        written_before = self._writer.counts["written"]
        progress = _Progress(self._clock, cause)
        reads: set[int] = set()
        workers = max(1, self._db.max_concurrent)
        send, receive = trio.open_memory_channel[_Batch](0)
        try:
            progress.total = await self._read(self._db.store.estimated_count, "users")
            async with trio.open_nursery() as nursery:
                for _ in range(workers):
                    nursery.start_soon(self._worker, receive.clone(), progress)
                receive.close()
                async with send:
                    await self._walk(nursery, send, reads, progress)
        finally:
            for seq in reads:  # every batch is loaded, or the walk was cancelled
                self._writer.close_read(seq)
        logger.info(
            "reconciliation ({}) done: {} users checked, {} statuses written in {:.2f} s",
            cause, progress.users, self._writer.counts["written"] - written_before,
            self._clock.monotonic() - started,
        )
        return progress.users

    async def _walk(
        self, nursery: trio.Nursery, send: trio.MemorySendChannel[_Batch], reads: set[int],
        progress: _Progress,
    ) -> None:
        """Merge both cursors by ``_id``, then read the documents whose ids are not
        strings, and hand every user that needs it to the workers, a batch at a time."""
        users_send, users_receive = trio.open_memory_channel[_Chunk](1)
        sessions_send, sessions_receive = trio.open_memory_channel[_Chunk](1)
        simple = self._simple_order
        nursery.start_soon(self._scan, _Scan("users", simple_order=simple), users_send, reads)
        nursery.start_soon(
            self._scan, _Scan("sessions", simple_order=simple), sessions_send, reads
        )
        users, sessions = _Merge(users_receive), _Merge(sessions_receive)
        with users_receive, sessions_receive:
            while True:
                progress.read(await users.fill() + await sessions.fill())
                if users.done and sessions.done:
                    break
                # Every user up to the lower of the two last ids received is known in both
                # sources (a source done knows them all).
                lasts = [m.docs[-1]["_id"] for m in (users, sessions) if not m.done]
                bound = min(lasts) if lasts else None
                await self._hand_over(
                    send, min(users.seq, sessions.seq), users.take(bound), sessions.take(bound)
                )
        seq = self._open(reads)
        stray_users = await self._read(self._db.store.reconcile_strays, "users")
        stray_sessions = await self._read(self._db.store.reconcile_strays, "sessions")
        progress.read(len(stray_users) + len(stray_sessions))
        await self._hand_over(send, seq, stray_users, stray_sessions)

    def _open(self, reads: set[int]) -> int:
        """A read about to start: numbered by the writer BEFORE it starts."""
        seq = self._writer.open_read()
        reads.add(seq)
        return seq

    async def _scan(
        self, scan: _Scan, send: trio.MemorySendChannel[_Chunk], reads: set[int]
    ) -> None:
        """Read one source's cursor to its end, a batch at a time, one batch ahead of the
        merge; a failed batch closes the cursor, and the next try opens one after the last
        id received."""
        try:
            async with send:
                while True:
                    docs = await self._db.until_answered(
                        "reconcile", partial(self._next_batch, scan, reads)
                    )
                    if docs:
                        _check_order(scan, docs)
                        scan.after = docs[-1]["_id"]
                    await send.send(_Chunk(scan.seq, docs))
                    if not docs:
                        return
        finally:
            await self._close_cursor(scan)

    async def _next_batch(self, scan: _Scan, reads: set[int]) -> list[Doc]:
        if scan.cursor is None:
            scan.seq = self._open(reads)
            scan.cursor = await self._db.read(partial(
                self._db.store.reconcile_cursor, scan.source, scan.after, SCAN_BATCH,
                simple_order=scan.simple_order,
            ))
        try:
            return await self._db.read(scan.cursor.next_batch)
        except PyMongoError:
            await self._close_cursor(scan)
            raise

    async def _close_cursor(self, scan: _Scan) -> None:
        """Close the cursor (in a worker thread, never waiting more than
        ``CLOSE_TIMEOUT_S``, also when cancelled); a failure to close is only logged."""
        cursor, scan.cursor = scan.cursor, None
        if cursor is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await self._db.read(cursor.close)
            except PyMongoError as exc:
                logger.debug("closing a reconcile cursor failed: {}", exc)

    async def _hand_over(
        self, send: trio.MemorySendChannel[_Batch], seq: int, users: list[Doc],
        sessions: list[Doc],
    ) -> None:
        found: dict[Any, list[Any]] = {doc["_id"]: [None, doc] for doc in sessions}
        for doc in users:
            pair = found.get(doc["_id"])
            if pair is None:
                found[doc["_id"]] = [doc, None]
            else:
                pair[0] = doc
        batch = _Batch(seq)
        for uid, (user, session) in found.items():
            if not needs_check(user, session):
                continue
            batch.ids.append(uid)
            if user is not None:
                batch.users[uid] = user
            if session is not None:
                batch.sessions[uid] = session
            if len(batch.ids) >= BATCH:
                await send.send(batch)
                batch = _Batch(seq)
        if batch.ids:
            await send.send(batch)

    async def _worker(
        self, receive: trio.MemoryReceiveChannel[_Batch], progress: _Progress
    ) -> None:
        async with receive:
            async for batch in receive:
                # No MongoDB read here; a failed write goes to the writer's retry set.
                await self._writer.load_documents(
                    batch.seq, batch.ids, batch.users, batch.sessions, Reason.RECONCILE
                )
                progress.checked(len(batch.ids))

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """One read of the walk, repeated alone until MongoDB answers."""
        return await self._db.read_until_answered("reconcile", fn, *args)


def _first(group: BaseExceptionGroup[UnorderedIds]) -> UnorderedIds:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, UnorderedIds)
    return leaf


class _Progress:
    """Logs how far a reconciliation got, at most every ``PROGRESS_EVERY_S``."""

    def __init__(self, clock: Clock, cause: str) -> None:
        self._clock = clock
        self._cause = cause
        self.total = 0
        self.users = 0
        self._read = 0
        self._started = self._logged = clock.monotonic()

    def read(self, documents: int) -> None:
        self._read += documents
        self._log()

    def checked(self, users: int) -> None:
        self.users += users
        self._log()

    def _log(self) -> None:
        now = self._clock.monotonic()
        if now - self._logged < PROGRESS_EVERY_S:
            return
        self._logged = now
        elapsed = max(now - self._started, 1e-9)
        logger.info(
            "reconciliation ({}): {} users checked ({:.0f}/s); {} documents read of"
            " about {} users and their sessions ({:.0f}/s)",
            self._cause, self.users, self.users / elapsed, self._read, self.total,
            self._read / elapsed,
        )
