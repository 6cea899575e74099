"""The writer: re-read users, let the engine decide, write what changed, confirm it.

Owns the path from "these users may have changed" to a landed ``users`` write: the bulk
re-read (``users`` and ``usersSessions`` by ``_id``, in batches), handing the documents to
the engine, the conditional bulk writes (at most ``MAX_CONCURRENT_SYNC`` in flight), the
confirmation that turns a landed write into a transition, and the retry set: users whose
read or write failed, or whose write met a concurrent change, are re-read by the next
``retry()`` (housekeeping calls it every SYNC_INTERVAL).

Must never: decide a status (the engine does), or call the store but through
:class:`~presenced.blocking.StoreCalls` (worker threads, limiters).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Final

import trio
from loguru import logger
from pymongo.errors import PyMongoError

from presenced.blocking import StoreCalls
from presenced.clock import Clock
from presenced.engine import Engine, PlannedWrite, Reason, Transition
from presenced.health import Health, RefusalLog
from presenced.metrics import Metrics
from presenced.presence import Collections
from presenced.store import StatusWrite

__all__ = ["BATCH", "Coalescer", "Writer"]

BATCH: Final = 500
"""Users per bulk read and per bulk write."""


class Writer:
    """Loads, writes and confirms; remembers who must be retried."""

    def __init__(
        self,
        db: StoreCalls,
        engine: Engine,
        clock: Clock,
        health: Health,
        metrics: Metrics,
        refusals: RefusalLog,
        *,
        collections: Collections,
        on_transition: Callable[[Transition], None] | None = None,
        on_timers_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self._db = db
        self._engine = engine
        self._clock = clock
        self._health = health
        self._metrics = metrics
        self._refusals = refusals
        self._collections = collections
        self._on_transition = on_transition
        self._on_timers_changed = on_timers_changed
        # Reads run side by side; each is numbered when it starts, and the engine never
        # takes a read older than the one it holds for a user.
        self._read_seq = itertools.count()
        self._retry: set[Any] = set()
        # For each read under way, the pairs our writes confirmed meanwhile, by user.
        self._open_reads: dict[int, dict[Any, tuple[str, str]]] = {}
        # The status write under way for each user, for a load that joins it.
        self._under_way: dict[Any, _UnderWay] = {}
        self.pending_writes = 0
        self.counts = {"written": 0, "conflicts": 0, "transitions": 0}

    # -- loads --------------------------------------------------------------------------
    async def load(
        self,
        user_ids: Iterable[Any],
        reason: Reason,
        *,
        sessions_only: Collection[Any] = (),
    ) -> list[Transition]:
        """Re-read ``user_ids``, derive, write what changed; return the transitions those
        writes announced. Batches of ``BATCH`` users are loaded concurrently. A batch whose
        read fails is kept for ``retry()`` (the failure is
        logged as an outage).

        ``sessions_only``: users of ``user_ids`` for which only the ``usersSessions``
        document is known to have changed. For those the engine holds, the ``users``
        document is not read again (the engine's fields are used with the new sessions:
        ``Engine.load_sessions``); the others are read whole."""
        announced: list[Transition] = []

        async def load_chunk(chunk: list[Any]) -> None:
            try:
                announced.extend(await self._load_chunk(chunk, reason, sessions_only))
            except PyMongoError as exc:
                self._health.failed("load", exc)
                self._retry.update(chunk)

        chunks = list(_chunks(list(dict.fromkeys(user_ids))))
        if len(chunks) == 1:
            await load_chunk(chunks[0])
        elif chunks:
            # Side by side (each its own read, numbered): the store's limiters bound how
            # many reads and writes are in flight.
            async with trio.open_nursery() as nursery:
                for chunk in chunks:
                    nursery.start_soon(load_chunk, chunk)
        return announced

    async def load_strict(self, user_ids: Sequence[Any], reason: Reason) -> None:
        """As ``load``, but a failed read raises (the caller retries the same batch)."""
        for chunk in _chunks(list(dict.fromkeys(user_ids))):
            await self._load_chunk(chunk, reason)

    async def _load_chunk(
        self, chunk: list[Any], reason: Reason, sessions_only: Collection[Any] = ()
    ) -> list[Transition]:
        seq = next(self._read_seq)
        lean = {uid for uid in chunk if uid in sessions_only and uid in self._engine}
        users, sessions, confirmed = await self._read(chunk, seq, lean)
        for uid, (status, status_connection) in confirmed.items():
            # A write of ours was confirmed while the read was under way: the pair read may
            # predate it, and a stale pair would plan the same change again (and announce
            # it twice). The write landed, so the pair it wrote is the stored one; a later
            # change by anyone else comes as a feed key of its own.
            doc = users.get(uid)
            if isinstance(doc, dict):
                users[uid] = {**doc, "status": status, "statusConnection": status_connection}
        self._health.succeeded()
        now = self._clock.now_ms()
        writes: list[PlannedWrite] = []
        # Users read for their sessions only that left the engine during the read (evicted,
        # or dropped after a conflict or a failed write): read whole below.
        unheld: list[Any] = []
        for uid in chunk:
            if uid not in lean:
                w = self._engine.load(
                    uid, users.get(uid), sessions.get(uid), now, reason, read_seq=seq
                )
            elif uid in self._engine:
                w = self._engine.load_sessions(uid, sessions.get(uid), now, reason, read_seq=seq)
            else:
                unheld.append(uid)
                continue
            if w is not None:
                writes.append(w)
        announced = await self._write_loaded(
            [uid for uid in chunk if uid not in unheld], writes
        )
        if unheld:
            announced += await self._load_chunk(unheld, reason)
        return announced

    async def _read(
        self, ids: list[Any], seq: int, sessions_only: Collection[Any] = ()
    ) -> tuple[dict[Any, Any], dict[Any, Any], dict[Any, tuple[str, str]]]:
        """The users' and sessions' documents (read at once, side by side), and the pairs
        our writes confirmed for them while the reads were under way. The ``users``
        documents of ``sessions_only`` are not read (no ``users`` read at all when that is
        every id)."""
        store = self._db.store
        confirmed: dict[Any, tuple[str, str]] = {}
        self._open_reads[seq] = confirmed
        found: dict[str, dict[Any, Any]] = {}

        async def read(name: str, fn: Callable[[list[Any]], dict[Any, Any]]) -> None:
            found[name] = await self._db.read(fn, ids)

        user_ids = [uid for uid in ids if uid not in sessions_only]
        found["users"] = {}

        async def read_users(fn: Callable[[list[Any]], dict[Any, Any]]) -> None:
            found["users"] = await self._db.read(fn, user_ids)

        try:
            async with trio.open_nursery() as nursery:
                if user_ids:
                    nursery.start_soon(read_users, store.load_users)
                nursery.start_soon(read, "sessions", store.load_sessions)
        except BaseExceptionGroup as group:
            # One MongoDB failure (or two) is the caller's to handle, as from one read.
            _, rest = group.split(PyMongoError)
            if rest is None:
                raise _first_leaf(group) from None
            raise
        finally:
            del self._open_reads[seq]
        wanted = set(ids)
        return found["users"], found["sessions"], {
            uid: pair for uid, pair in confirmed.items() if uid in wanted
        }

    # -- loads of documents read by the caller (reconciliation) ----------------------------
    def open_read(self) -> int:
        """Number a read the caller is about to start (call it BEFORE the read), and begin
        collecting the pairs our writes confirm while it is under way. The number goes to
        ``load_documents``; ``close_read`` ends the collection (every ``open_read`` needs
        one, also when the read failed)."""
        seq = next(self._read_seq)
        self._open_reads[seq] = {}
        return seq

    def close_read(self, seq: int) -> None:
        """End the read ``seq`` opened by ``open_read`` (again: a no-op)."""
        self._open_reads.pop(seq, None)

    async def load_documents(
        self,
        seq: int,
        chunk: Sequence[Any],
        users: dict[Any, Any],
        sessions: dict[Any, Any],
        reason: Reason,
    ) -> list[Transition]:
        """As ``load`` for at most ``BATCH`` distinct ids, with documents the caller read
        itself after ``open_read`` gave it ``seq`` (still open): the engine takes them
        unless it holds a newer read, and a pair our writes confirmed since ``seq`` opened
        replaces the one read, as in ``_load_chunk``. Raises nothing MongoDB raises (a
        failed write goes to the retry set)."""
        confirmed = self._open_reads.get(seq, {})
        for uid in chunk:
            pair = confirmed.get(uid)
            doc = users.get(uid)
            if pair is not None and isinstance(doc, dict):
                users[uid] = {**doc, "status": pair[0], "statusConnection": pair[1]}
        now = self._clock.now_ms()
        writes = [
            w for uid in chunk
            if (w := self._engine.load(
                uid, users.get(uid), sessions.get(uid), now, reason, read_seq=seq
            ))
        ]
        return await self._write_loaded(chunk, writes)

    async def _write_loaded(
        self, loaded: Sequence[Any], writes: list[PlannedWrite]
    ) -> list[Transition]:
        """Write what the engine planned for the users just ``loaded``; the transitions.

        A user the engine planned nothing for because a write of that answer is already
        under way (planned by another load): this load's caller waits for that write, and
        gets its transition, as if it had planned it."""
        planned = {w.user_id for w in writes}
        joined = [
            self._under_way[uid] for uid in loaded
            if uid not in planned and uid in self._under_way
        ]
        self._report_refused()
        self._on_timers_changed()
        announced = await self.write(writes)
        for under_way in joined:
            await under_way.done.wait()
            announced += under_way.transitions
        return announced

    async def evaluate(self, user_ids: Iterable[Any], reason: Reason) -> None:
        """Re-derive cached users at the clock's now; re-read those not cached."""
        now = self._clock.now_ms()
        writes: list[PlannedWrite] = []
        reread: list[Any] = []
        for uid in user_ids:
            if uid not in self._engine:
                reread.append(uid)
                continue
            write = self._engine.evaluate(uid, now, reason)
            if write is not None:
                writes.append(write)
        await self.write(writes)
        if reread:
            await self.load(reread, reason)

    async def retry(self) -> None:
        """Re-read the users a failure or a conflict left behind."""
        if self._retry:
            users, self._retry = list(self._retry), set()
            await self.load(users, Reason.RETRY)

    @property
    def retry_pending(self) -> int:
        return len(self._retry)

    def _report_refused(self) -> None:
        for refused in self._engine.take_refused():
            collections = self._collections
            collection = collections.users if refused.kind == "users" else collections.sessions
            self._refusals.document(collection, refused.doc_id, refused.reasons, refused.content)

    # -- writes -------------------------------------------------------------------------
    async def write(self, writes: Sequence[PlannedWrite]) -> list[Transition]:
        """Write in batches, concurrently (the store's write limiter bounds how many);
        return the transitions announced."""
        announced: list[Transition] = []
        if not writes:
            return announced
        for w in writes:
            self._under_way[w.user_id] = _UnderWay(w)
        async with trio.open_nursery() as nursery:
            for start in range(0, len(writes), BATCH):
                nursery.start_soon(self._write_batch, writes[start : start + BATCH], announced)
        return announced

    async def _write_batch(
        self, writes: Sequence[PlannedWrite], announced: list[Transition]
    ) -> None:
        request = [
            StatusWrite(
                w.user_id, w.presence.status.value, w.presence.status_connection.value,
                w.expected_status, w.expected_status_connection,
            )
            for w in writes
        ]
        self.pending_writes += len(writes)
        try:
            await self._write_and_confirm(writes, request, announced)
        finally:
            self.pending_writes -= len(writes)
            for w in writes:
                self._engine.write_done(w)
                under_way = self._under_way.get(w.user_id)
                if under_way is not None and under_way.write is w:
                    del self._under_way[w.user_id]
                    under_way.done.set()

    async def _write_and_confirm(
        self, writes: Sequence[PlannedWrite], request: list[StatusWrite],
        announced: list[Transition],
    ) -> None:
        try:
            outcome = await self._db.write(self._db.store.write_statuses, request)
        except PyMongoError as exc:
            # Landed or not, we cannot tell: re-read these users once MongoDB answers.
            self._metrics.writes.labels("failed").inc(len(writes))
            self._health.failed("write", exc)
            for w in writes:
                self._engine.forget(w.user_id)
                self._retry.add(w.user_id)
            return
        self._health.succeeded()
        by_id = {w.user_id: w for w in writes}
        now = self._clock.now_ms()
        for uid in outcome.written:
            self.counts["written"] += 1
            self._metrics.writes.labels("written").inc()
            write = by_id[uid]
            for confirmed in self._open_reads.values():
                confirmed[uid] = (
                    write.presence.status.value, write.presence.status_connection.value
                )
            transition = self._engine.confirm(by_id[uid], now)
            if transition is not None:
                announced.append(transition)
                under_way = self._under_way.get(uid)
                if under_way is not None and under_way.write is by_id[uid]:
                    under_way.transitions.append(transition)
                self._transition(transition)
        if outcome.conflicts:
            self.counts["conflicts"] += len(outcome.conflicts)
            self._metrics.writes.labels("conflict").inc(len(outcome.conflicts))
            for uid in outcome.conflicts:
                self._engine.conflict(uid)
            logger.debug("{} writes met a concurrent change; re-reading", len(outcome.conflicts))
            self._retry.update(outcome.conflicts)
        self._on_timers_changed()

    def _transition(self, t: Transition) -> None:
        self.counts["transitions"] += 1
        self._metrics.transitions.labels(t.reason.value, t.current.status.value).inc()
        before = "?" if t.previous is None else t.previous.status.value
        logger.debug(
            "{} ({}): {} → {} ({})", t.username or "?", t.user_id, before,
            t.current.status.value, t.reason.value,
        )
        if self._on_transition is not None:
            self._on_transition(t)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _chunks(ids: list[Any]) -> Iterable[list[Any]]:
    for start in range(0, len(ids), BATCH):
        yield ids[start : start + BATCH]


class _UnderWay:
    """A status write under way: when it is done, and the transition it announced."""

    def __init__(self, write: PlannedWrite) -> None:
        self.write = write
        self.done = trio.Event()
        self.transitions: list[Transition] = []


class _Waiter:
    def __init__(self, count: int) -> None:
        self.remaining = count
        self.transitions: list[Transition] = []
        self.done = trio.Event()


class Coalescer:
    """Loads asked for one by one (a broker action each), done together: while one batch
    is being read and written, the users asked for meanwhile wait and go in the next, so
    a burst of actions costs a few bulk reads instead of one read each. ``run()`` must be
    running for ``load()`` to return."""

    def __init__(self, writer: Writer, reason: Reason) -> None:
        self._writer = writer
        self._reason = reason
        self._pending: dict[Any, list[_Waiter]] = {}
        self._wake = trio.Event()

    async def load(self, user_ids: Sequence[Any]) -> list[Transition]:
        """Re-read, derive and write ``user_ids`` with the next batch; the transitions
        written for them."""
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return []
        waiter = _Waiter(len(ids))
        for uid in ids:
            self._pending.setdefault(uid, []).append(waiter)
        self._wake.set()
        await waiter.done.wait()
        return waiter.transitions

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            batch, self._pending = self._pending, {}
            transitions = await self._writer.load(list(batch), self._reason)
            by_user: dict[Any, list[Transition]] = {}
            for t in transitions:
                by_user.setdefault(t.user_id, []).append(t)
            for uid, waiters in batch.items():
                for waiter in waiters:
                    waiter.transitions += by_user.get(uid, [])
                    waiter.remaining -= 1
                    if waiter.remaining == 0:
                        waiter.done.set()
