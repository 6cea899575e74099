"""Reconciliation: check every user whose presence may be wrong, from scratch.

Owns: the walk over the users presence must look at (``usersSessions`` with connections,
then ``users`` whose stored status is not offline), page by page in ``_id`` order. Each
page is read, loaded and written on its own; a page that fails or times out is retried
alone, after the last id done, with backoff, so a large database is never started over.
Progress (users done, pages, rate) is logged every few seconds so an operator sees it move.

Must never: decide a status (the engine does), or call the store but through
:class:`~presenced.blocking.StoreCalls`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Final, TypeVar

from loguru import logger

from presenced.blocking import StoreCalls
from presenced.clock import Clock
from presenced.engine import Reason
from presenced.metrics import Metrics
from presenced.store import ReconcileSource
from presenced.writer import BATCH, Writer

__all__ = ["PAGE", "PROGRESS_EVERY_S", "Reconciler"]

PAGE: Final = 10 * BATCH
"""Ids per reconcile page. A page is read, then loaded and written in batches of
``writer.BATCH``, before the next page: fewer, larger scan queries (each may read many
documents that do not match before it fills), small enough to retry."""
PROGRESS_EVERY_S: Final = 5.0
"""A reconciliation logs its progress at most this often."""

T = TypeVar("T")

_SOURCES: Final[tuple[ReconcileSource, ...]] = ("sessions", "users")


class Reconciler:
    """Walks every user that may need it and hands each page to the writer."""

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
        seen: set[Any] = set()
        for source in _SOURCES:
            total = await self._read(self._db.store.estimated_count, source)
            progress = _Progress(self._clock, cause, source, total, len(seen))
            after: str | None = None
            while True:
                page = await self._read(self._db.store.reconcile_page, source, after, PAGE)
                await self._load(page, seen)
                progress.done(len(seen), len(page))
                if len(page) < PAGE:
                    break
                after = page[-1]
            await self._load(await self._read(self._db.store.reconcile_strays, source), seen)
        logger.info(
            "reconciliation ({}) done: {} users checked, {} statuses written in {:.2f} s",
            cause, len(seen), self._writer.counts["written"] - written_before,
            self._clock.monotonic() - started,
        )
        return len(seen)

    async def _load(self, ids: list[Any], seen: set[Any]) -> None:
        """Load the ids not loaded yet in this pass, a batch at a time; a batch that fails
        is retried alone until it lands."""
        fresh = [uid for uid in ids if uid not in seen]
        for start in range(0, len(fresh), BATCH):
            batch = fresh[start : start + BATCH]
            await self._db.until_answered(
                "reconcile", partial(self._writer.load_strict, batch, Reason.RECONCILE)
            )
            seen.update(batch)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """One read of the walk, repeated alone until MongoDB answers."""
        return await self._db.read_until_answered("reconcile", fn, *args)


class _Progress:
    """Logs how far one pass over a source got, at most every ``PROGRESS_EVERY_S``."""

    def __init__(
        self, clock: Clock, cause: str, source: str, total: int, users_before: int
    ) -> None:
        self._clock = clock
        self._cause = cause
        self._source = source
        self._total = total
        self._users_before = users_before
        self._started = self._logged = clock.monotonic()
        self._read = 0

    def done(self, users: int, read: int) -> None:
        self._read += read
        now = self._clock.monotonic()
        if now - self._logged < PROGRESS_EVERY_S:
            return
        self._logged = now
        elapsed = now - self._started
        logger.info(
            "reconciliation ({}): {} users checked ({:.0f}/s); {} pass: {} of about {}"
            " documents read ({:.0f}/s)",
            self._cause, users, (users - self._users_before) / elapsed, self._source,
            self._read, self._total, self._read / elapsed,
        )
