"""Reconciliation: check every user whose presence may be wrong, from scratch.

Owns: the walk over the users presence must look at (``usersSessions`` with connections,
then ``users`` whose stored status is not offline), page by page in ``_id`` order, each
user's documents read once: a ``usersSessions`` page holds the sessions documents
themselves, so only the ``users`` documents of its users are read by ``_id``; a ``users``
page holds the users' documents, so only the sessions of users not seen yet are read.
Pages are read one after another (each starts after the last id of the one before), and
their batches of ``writer.BATCH`` users are loaded and written by ``MAX_CONCURRENT_SYNC``
workers meanwhile, so reading page k+1 overlaps loading and writing page k; at most one
page waits for a worker, so memory stays bounded. A page or batch that fails or times out
is retried alone, with backoff, so a large database is never started over. Each page is
numbered by the writer before it is read, so a reconcile read never overrides a newer one
the engine holds. Progress (users done, pages, rate) is logged every few seconds.

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
from presenced.store import ReconcileSource
from presenced.writer import BATCH, Writer

__all__ = ["PAGE", "PROGRESS_EVERY_S", "Reconciler"]

PAGE: Final = 10 * BATCH
"""Documents per reconcile page: fewer, larger scan queries (each may read many documents
that do not match before it fills), small enough to retry and to hold in memory."""
PROGRESS_EVERY_S: Final = 5.0
"""A reconciliation logs its progress at most this often."""

T = TypeVar("T")

_SOURCES: Final[tuple[ReconcileSource, ...]] = ("sessions", "users")


@dataclass(eq=False)
class _Page:
    """A page read under the writer's read number ``seq``; closed once its batches are
    loaded (the writer collects the pairs it confirms meanwhile until then)."""

    seq: int
    batches: int = 0


@dataclass(eq=False)
class _Batch:
    """At most ``BATCH`` users of one page: the documents read by the scan, by ``_id``."""

    page: _Page
    source: ReconcileSource
    docs: dict[Any, Any] = field(default_factory=dict)


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
        claimed: set[Any] = set()
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
                    await self._walk(send, claimed, pages, progress)
        finally:
            for page in pages:  # cancelled: no read stays open in the writer
                self._writer.close_read(page.seq)
        logger.info(
            "reconciliation ({}) done: {} users checked, {} statuses written in {:.2f} s",
            cause, len(claimed), self._writer.counts["written"] - written_before,
            self._clock.monotonic() - started,
        )
        return len(claimed)

    async def _walk(
        self, send: trio.MemorySendChannel[_Batch], claimed: set[Any], pages: set[_Page],
        progress: _Progress,
    ) -> None:
        """Read every page of both sources in turn and hand their users not handed yet
        to the workers, a batch at a time."""
        store = self._db.store
        for source in _SOURCES:
            progress.start(source, await self._read(store.estimated_count, source))
            after: str | None = None
            while True:
                page = self._open(pages)
                docs = await self._read(store.reconcile_page, source, after, PAGE)
                progress.read(len(docs))
                await self._hand_over(send, page, source, docs, claimed, pages)
                if len(docs) < PAGE:
                    break
                after = docs[-1]["_id"]
            page = self._open(pages)
            docs = await self._read(store.reconcile_strays, source)
            progress.read(len(docs))
            await self._hand_over(send, page, source, docs, claimed, pages)

    def _open(self, pages: set[_Page]) -> _Page:
        """A page about to be read: numbered by the writer BEFORE the read starts."""
        page = _Page(self._writer.open_read())
        pages.add(page)
        return page

    def _close(self, page: _Page, pages: set[_Page]) -> None:
        self._writer.close_read(page.seq)
        pages.discard(page)

    async def _hand_over(
        self, send: trio.MemorySendChannel[_Batch], page: _Page, source: ReconcileSource,
        docs: list[dict[str, Any]], claimed: set[Any], pages: set[_Page],
    ) -> None:
        batches: list[_Batch] = []
        for doc in docs:
            uid = doc["_id"]
            if uid in claimed:
                continue  # checked in this pass already (a user in both sources)
            claimed.add(uid)
            if not batches or len(batches[-1].docs) >= BATCH:
                batches.append(_Batch(page, source))
            batches[-1].docs[uid] = doc
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
                progress.checked(len(batch.docs))
                batch.page.batches -= 1
                if batch.page.batches == 0:
                    self._close(batch.page, pages)

    async def _load(self, batch: _Batch) -> None:
        """Read the other document of each user of ``batch`` by ``_id``, then load and
        write; a MongoDB failure raises (the worker retries this batch alone)."""
        ids = list(batch.docs)
        store = self._db.store
        if batch.source == "sessions":
            sessions = batch.docs
            users = await self._db.read(store.load_users, ids)
        else:
            users = dict(batch.docs)  # the writer may replace entries
            sessions = await self._db.read(store.load_sessions, ids)
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
        self._source = ""
        self._total = 0
        self._users = 0
        self._read = 0
        self._started = self._logged = self._source_started = clock.monotonic()

    def start(self, source: str, total: int) -> None:
        self._source, self._total, self._read = source, total, 0
        self._source_started = self._clock.monotonic()

    def read(self, documents: int) -> None:
        self._read += documents
        self._log()

    def checked(self, users: int) -> None:
        self._users += users
        self._log()

    def _log(self) -> None:
        now = self._clock.monotonic()
        if now - self._logged < PROGRESS_EVERY_S:
            return
        self._logged = now
        elapsed = max(now - self._started, 1e-9)
        source_elapsed = max(now - self._source_started, 1e-9)
        logger.info(
            "reconciliation ({}): {} users checked ({:.0f}/s); {} pass: {} of about {}"
            " documents read ({:.0f}/s)",
            self._cause, self._users, self._users / elapsed, self._source,
            self._read, self._total, self._read / source_elapsed,
        )
