"""The whole daemon in one trio run under ``MockClock``, on the in-memory store and feed.

Not a test module. :func:`run` runs a scenario with ``MockClock(autojump_threshold=0)``:
whenever every task waits, the clock jumps to the next deadline, so hours of timers take
milliseconds and every instant is exact. :class:`Env` holds the daemon, its doubles, a log
capture and the helpers a scenario uses to move time and to let the daemon settle.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import trio
import trio.testing
from loguru import logger

from presenced.blocking import inline
from presenced.clock import Clock
from presenced.config import load_settings
from presenced.daemon import Backend, Daemon
from presenced.engine import Transition
from presenced.testing.memory import MemoryFeed, MemoryStore
from tests.unit.broker_double import LinkMaker

T = TypeVar("T")

EPOCH_MS = 1_750_000_000_000
"""The wall-clock instant at trio time 0 in these tests."""
MONGO_URL = "mongodb://presenced:s3cret-pass@127.0.0.1:1/rocketchat?replicaSet=rs0"


class Env:
    def __init__(self, **settings: str) -> None:
        self.settings = load_settings(
            {"MONGO_URL": MONGO_URL, "CACHE_TTL": "60", "INSTANCE_TIMEOUT": "30",
             "SYNC_INTERVAL": "1000", **settings},
            env_file=None,
        ).for_command("run")
        self.feed = MemoryFeed(max_await_s=1.0)
        self.store = MemoryStore(self.feed)
        self.clock = Clock(epoch_ms=EPOCH_MS)
        self.transitions: list[Transition] = []
        self.logs: list[tuple[str, str]] = []
        self.delays: dict[str, float] = {}
        """Store methods by name that take this many seconds (a slow or hung MongoDB)."""
        self.late: dict[str, float] = {}
        """Store methods by name whose answer arrives this many seconds after MongoDB
        answered (what they read is as old as the call, not as the answer)."""
        self.broker = LinkMaker()
        """The broker's NATS link double (used when TRANSPORTER is set)."""
        self.daemon = Daemon(
            self.settings, backend=lambda s, c: Backend(self.store, self.feed),
            clock=self.clock, run_sync=self._run_sync, on_transition=self.transitions.append,
            serve=False, broker_link=self.broker,
        )
        self.ttl_ms = self.settings.cache_ttl * 1000
        self.timeout_ms = self.settings.instance_timeout * 1000

    async def _run_sync(
        self, fn: Callable[[], T], *, limiter: trio.CapacityLimiter, abandon: bool
    ) -> T:
        """``blocking.inline``, with the delays of ``self.delays``: a call that may be
        abandoned can be cancelled during its delay, one that may not runs it out."""
        name = getattr(getattr(fn, "func", fn), "__name__", "")
        delay = self.delays.get(name, 0.0)
        if delay:
            with trio.CancelScope(shield=not abandon):
                await trio.sleep(delay)
        result = await inline(fn, limiter=limiter, abandon=abandon)
        late = self.late.get(name, 0.0)
        if late:
            with trio.CancelScope(shield=not abandon):
                await trio.sleep(late)
        return result

    # -- time ---------------------------------------------------------------------------
    def now(self) -> int:
        return self.clock.now_ms()

    async def settle(self) -> None:
        """Let every task of the daemon run until it waits (no time passes)."""
        await trio.testing.wait_all_tasks_blocked()

    async def at(self, at_ms: int) -> None:
        """Move the clock to ``at_ms`` (the daemon's timers due by then fire), and settle."""
        await self.clock.sleep_until_ms(at_ms)
        await self.settle()

    async def after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        await self.settle()

    async def until(self, predicate: Callable[[], Any], within_s: float = 60.0) -> None:
        """Let the daemon run (the clock advancing) until ``predicate()`` holds."""
        with trio.fail_after(within_s):
            while not predicate():
                await trio.sleep(0.01)
        await self.settle()

    # -- the daemon ---------------------------------------------------------------------
    @asynccontextmanager
    async def running(self, *, wait_ready: bool = True) -> AsyncIterator[Env]:
        sink = logger.add(
            lambda m: self.logs.append((m.record["level"].name, m.record["message"])),
            level="DEBUG", format="{message}",
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(self.daemon.run, handle_signals=False))
                if wait_ready:
                    await self.until(lambda: self.daemon.health.readiness()[0])
                yield self
                self.daemon.stop()
        finally:
            logger.remove(sink)

    def lines(self, level: str | None = None, containing: str = "") -> list[str]:
        return [m for lv, m in self.logs if (level is None or lv == level) and containing in m]

    def metric(self, name: str, **labels: str) -> float | None:
        """The value of one sample of ``/metrics`` as a scrape renders it (None: absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self.daemon.health.metrics_text().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labelled = all(sample.labels.get(k) == v for k, v in labels.items())
                if sample.name == name and labelled:
                    return float(sample.value)
        return None


def run(scenario: Callable[[Env], Awaitable[None]], **settings: str) -> Env:
    """Run ``scenario(env)`` under a MockClock that jumps whenever everything waits."""
    env = Env(**settings)
    trio.run(scenario, env, clock=trio.testing.MockClock(autojump_threshold=0))
    return env
