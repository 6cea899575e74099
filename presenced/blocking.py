"""Calling the blocking store and feed from the event loop.

Owns: how every store call leaves the event loop (a worker thread, under a limiter), which
calls are abandoned when cancelled (reads: at shutdown their answer no longer matters, and
waiting out a 5 s server selection would break the shutdown promise) and which are not
(writes: a write in flight finishes and is accounted for); retrying a call until MongoDB
answers, with backoff; the seam that lets a test run an in-memory store inline, so
``trio.testing.MockClock`` alone decides when time passes; and :class:`Feed`, the feed as
the daemon awaits it, with :class:`ThreadedFeed` running a blocking
:class:`~presenced.feed.source.FeedSource` in one worker thread.

Must never: call pymongo itself, or decide anything about presence.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final, Protocol, TypeVar

import trio
from pymongo.errors import PyMongoError

from presenced.clock import Clock
from presenced.feed.keys import Key
from presenced.feed.source import FeedSource
from presenced.health import Health
from presenced.store import PresenceStore

__all__ = [
    "MAX_BACKOFF_S",
    "Feed",
    "RunSync",
    "StoreCalls",
    "ThreadedFeed",
    "in_worker_thread",
    "inline",
]

MAX_BACKOFF_S: Final = 5.0
"""Longest pause between two tries while MongoDB does not answer."""

T = TypeVar("T")


class RunSync(Protocol):
    """Runs a blocking function and returns its result (``trio.to_thread.run_sync``'s
    shape, reduced to what the daemon uses)."""

    async def __call__(
        self, fn: Callable[[], T], *, limiter: trio.CapacityLimiter, abandon: bool
    ) -> T: ...


async def in_worker_thread(
    fn: Callable[[], T], *, limiter: trio.CapacityLimiter, abandon: bool
) -> T:
    """Production: a trio worker thread, under ``limiter``."""
    return await trio.to_thread.run_sync(fn, limiter=limiter, abandon_on_cancel=abandon)


async def inline(fn: Callable[[], T], *, limiter: trio.CapacityLimiter, abandon: bool) -> T:
    """Tests with an in-memory store: call ``fn`` on the event loop (it must not block),
    after a checkpoint so that cancellation and scheduling behave as around a thread."""
    await trio.lowlevel.checkpoint()
    async with limiter:
        return fn()


class StoreCalls:
    """The store, and the two ways the daemon calls it.

    ``read`` runs under a limiter of ``max_concurrent + 2`` (room for the housekeeping next
    to the loads) and is abandoned when cancelled; ``write`` runs under ``max_concurrent``
    (``MAX_CONCURRENT_SYNC``) and is not abandoned unless the caller says the write is
    idempotent (``abandon=True``: a checkpoint, which the next one replaces).
    """

    def __init__(
        self,
        store: PresenceStore,
        run_sync: RunSync,
        max_concurrent: int,
        *,
        health: Health,
        clock: Clock,
    ) -> None:
        self.store = store
        self.max_concurrent = max_concurrent
        """``MAX_CONCURRENT_SYNC``: write batches in flight (and reconcile batches)."""
        self._run_sync = run_sync
        self._reads = trio.CapacityLimiter(max_concurrent + 2)
        self._writes = trio.CapacityLimiter(max_concurrent)
        self._health = health
        self._clock = clock

    async def until_answered(self, component: str, op: Callable[[], Awaitable[T]]) -> T:
        """Await ``op()`` until it does not raise a MongoDB error, backing off from 0.1 s to
        ``MAX_BACKOFF_S``; each failure goes to the health log under ``component``."""
        backoff = 0.1
        while True:
            try:
                result = await op()
            except PyMongoError as exc:
                self._health.failed(component, exc)
                await self._clock.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            self._health.succeeded()
            return result

    async def read_until_answered(self, component: str, fn: Callable[..., T], *args: Any) -> T:
        """``read(fn, *args)`` under ``until_answered``."""
        return await self.until_answered(component, partial(self.read, fn, *args))

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._run_sync(partial(fn, *args), limiter=self._reads, abandon=True)

    async def write(self, fn: Callable[..., T], *args: Any, abandon: bool = False) -> T:
        return await self._run_sync(partial(fn, *args), limiter=self._writes, abandon=abandon)


class Feed(Protocol):
    """The feed as the daemon awaits it: :class:`ThreadedFeed`, or a double in tests."""

    @property
    def malformed(self) -> int:
        """Events the decoder refused so far."""

    async def open(self, position: Any) -> None:
        """As :meth:`FeedSource.open`: raises ``HistoryLost`` for a position MongoDB lost."""

    async def poll(self) -> list[Key]:
        """The next keys; waits (a bounded time) only when none are at hand."""

    def position(self) -> Any:
        """The position covering every key returned so far."""

    def lag_seconds(self, now: float) -> float:
        """The source's own measure of its lag at wall time ``now`` (epoch seconds)."""

    async def close(self) -> None:
        """Stop reading."""


class ThreadedFeed:
    """A blocking :class:`~presenced.feed.source.FeedSource`, one call at a time in a worker
    thread. Abandoned when cancelled: the shutdown does not wait for a getMore to end."""

    def __init__(self, source: FeedSource, max_events: int = 1000) -> None:
        self.source = source
        self._max_events = max_events
        self._limiter = trio.CapacityLimiter(1)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(
            partial(fn, *args), limiter=self._limiter, abandon_on_cancel=True
        )

    @property
    def malformed(self) -> int:
        return int(self.source.malformed)

    async def open(self, position: Any) -> None:
        await self._call(self.source.open, position)

    async def poll(self) -> list[Key]:
        return await self._call(self.source.poll, self._max_events)

    def position(self) -> Any:
        return self.source.position()

    def lag_seconds(self, now: float) -> float:
        return self.source.lag_seconds(now)

    async def close(self) -> None:
        await self._call(self.source.close)
