"""Reconciliation: check every user whose presence may be wrong, from scratch.

Owns: the walk over the users presence must look at (``usersSessions`` with connections,
and ``users`` whose stored status is not offline), in ``_id`` order, each user's documents
read once. Both sources are walked together, range by range: a page of ``usersSessions``
documents, then the ``users`` documents of the same ``_id`` range (up to the page's last
id). A user in both needs nothing more; only the ``users`` documents of connected users
stored offline, and the sessions of users stored online without connections, are read by
``_id``. So a database where every user is stored right costs two scans, no more.
Ranges are read one after another (each starts after the last id of the one before), and
their batches of ``writer.BATCH`` users are loaded and written by ``MAX_CONCURRENT_SYNC``
workers meanwhile, so reading range k+1 overlaps loading and writing range k; at most one
range waits for a worker, so memory stays bounded. A read or batch that fails or times
out is retried alone, with backoff, so a large database is never started over. Each range
is numbered by the writer before it is read, so a reconcile read never overrides a newer
one the engine holds. Progress (users done, documents read, rates) is logged every few
seconds.

Must never: decide a status (the engine does), or call the store but through
:class:`~presenced.blocking.StoreCalls`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, TypeVar

import trio
from loguru import logger

from presenced.blocking import StoreCalls
from presenced.clock import Clock
from presenced.engine import Reason
from presenced.metrics import Metrics
from presenced.writer import BATCH, Writer

__all__ = ["PAGE", "PROGRESS_EVERY_S", "Reconciler"]

PAGE: Final = 10 * BATCH
"""Documents per reconcile scan query (a range reads at most this many of each source):
fewer, larger scan queries (each may read many documents that do not match before it
fills), small enough to retry and to hold in memory."""
PROGRESS_EVERY_S: Final = 5.0
"""A reconciliation logs its progress at most this often."""

T = TypeVar("T")

@dataclass(eq=False)
class _Page:
    """A range read under the writer's read number ``seq``; closed once its batches are
    loaded (the writer collects the pairs it confirms meanwhile until then)."""

    seq: int
    batches: int = 0


_UNREAD: Final = object()
"""A document of a batch's user not read by the scans: read it by ``_id``."""


@dataclass(eq=False)
class _Batch:
    """At most ``BATCH`` users of one range, with their documents the scans read."""

    page: _Page
    users: dict[Any, Any] = field(default_factory=dict)
    sessions: dict[Any, Any] = field(default_factory=dict)


Docs = list[dict[str, Any]]


class Reconciler:
    """Walks every user that may need it and hands each batch to the writer."""

    def __init__(
        self, db: StoreCalls, writer: Writer, clock: Clock, metrics: Metrics
    ) -> None:
        self._db = db
        self._writer = writer
        self._clock = clock
        self._metrics = metrics

    async def reconcile(self, cause: str) -> int:
        """One full pass; returns the number of users checked."""
        self._metrics.reconciliations.labels(cause).inc()
        started = self._clock.monotonic()
        written_before = self._writer.counts["written"]
        progress = _Progress(self._clock, cause)
        pages: set[_Page] = set()
        workers = max(1, self._db.max_concurrent)
        send, receive = trio.open_memory_channel[_Batch](0)
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(workers):
                    nursery.start_soon(self._worker, receive.clone(), pages, progress)
                receive.close()
                async with send:
                    await self._walk(send, pages, progress)
        finally:
            for page in pages:  # cancelled: no read stays open in the writer
                self._writer.close_read(page.seq)
        logger.info(
            "reconciliation ({}) done: {} users checked, {} statuses written in {:.2f} s",
            cause, progress.users, self._writer.counts["written"] - written_before,
            self._clock.monotonic() - started,
        )
        return progress.users

    async def _walk(
        self, send: trio.MemorySendChannel[_Batch], pages: set[_Page], progress: _Progress
    ) -> None:
        """Read both sources range by range, then the documents whose ids are not
        strings, and hand every user found to the workers, a batch at a time."""
        store = self._db.store
        progress.total = await self._read(store.estimated_count, "users")
        after: str | None = None
        while True:
            page = self._open(pages)
            sessions = await self._read(store.reconcile_page, "sessions", after, PAGE)
            # The users of the same range: up to the last session when the page is full
            # (the next range starts there), to the end otherwise.
            until = sessions[-1]["_id"] if len(sessions) == PAGE else None
            users = await self._read(store.reconcile_page, "users", after, PAGE, until)
            progress.read(len(sessions) + len(users))
            if len(users) == PAGE:
                # More users than a page in this range: stop it at the last user read;
                # the sessions past it come again with the next range.
                until = users[-1]["_id"]
                sessions = [doc for doc in sessions if doc["_id"] <= until]
            await self._hand_over(send, page, sessions, users, pages)
            if until is None:
                break
            after = until
        page = self._open(pages)
        sessions = await self._read(store.reconcile_strays, "sessions")
        users = await self._read(store.reconcile_strays, "users")
        progress.read(len(sessions) + len(users))
        await self._hand_over(send, page, sessions, users, pages)

    def _open(self, pages: set[_Page]) -> _Page:
        """A range about to be read: numbered by the writer BEFORE the reads start."""
        page = _Page(self._writer.open_read())
        pages.add(page)
        return page

    def _close(self, page: _Page, pages: set[_Page]) -> None:
        self._writer.close_read(page.seq)
        pages.discard(page)

    async def _hand_over(
        self, send: trio.MemorySendChannel[_Batch], page: _Page, sessions: Docs,
        users: Docs, pages: set[_Page],
    ) -> None:
        found: dict[Any, list[Any]] = {}
        for doc in sessions:
            found[doc["_id"]] = [_UNREAD, doc]
        for doc in users:
            found.setdefault(doc["_id"], [_UNREAD, _UNREAD])[0] = doc
        batches: list[_Batch] = []
        for uid, (user, session) in found.items():
            if not batches or len(batches[-1].users) >= BATCH:
                batches.append(_Batch(page))
            batches[-1].users[uid] = user
            batches[-1].sessions[uid] = session
        page.batches = len(batches)
        if not batches:
            self._close(page, pages)
        for batch in batches:
            await send.send(batch)

    async def _worker(
        self, receive: trio.MemoryReceiveChannel[_Batch], pages: set[_Page],
        progress: _Progress,
    ) -> None:
        async with receive:
            async for batch in receive:
                await self._db.until_answered("reconcile", partial(self._load, batch))
                progress.checked(len(batch.users))
                batch.page.batches -= 1
                if batch.page.batches == 0:
                    self._close(batch.page, pages)

    async def _load(self, batch: _Batch) -> None:
        """Read the documents the scans did not read by ``_id``, then load and write; a
        MongoDB failure raises (the worker retries this batch alone)."""
        store = self._db.store
        ids = list(batch.users)
        users = {uid: doc for uid, doc in batch.users.items() if doc is not _UNREAD}
        sessions = {uid: doc for uid, doc in batch.sessions.items() if doc is not _UNREAD}
        unread_users = [uid for uid in ids if uid not in users]
        unread_sessions = [uid for uid in ids if uid not in sessions]
        if unread_users:
            users.update(await self._db.read(store.load_users, unread_users))
        if unread_sessions:
            sessions.update(await self._db.read(store.load_sessions, unread_sessions))
        await self._writer.load_documents(
            batch.page.seq, ids, users, sessions, Reason.RECONCILE
        )

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """One read of the walk, repeated alone until MongoDB answers."""
        return await self._db.read_until_answered("reconcile", fn, *args)


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
