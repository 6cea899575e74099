"""The daemon's one clock: wall-clock milliseconds and sleeping until an instant, on trio's clock.

Owns: the mapping between trio's clock (``trio.current_time()``, which a test replaces with
``trio.testing.MockClock``) and the wall-clock milliseconds Rocket.Chat writes into
``_updatedAt``. Every timer of the daemon (stale expiry, instance timeout, housekeeping,
backoff, the shutdown grace) reads this clock, so a test that drives a ``MockClock`` drives
all of them, and a production daemon compares its instants with Rocket.Chat's.

``now_ms()`` is trio's time plus an epoch offset, fixed when the clock is anchored. When the
clock follows the wall (production), ``reanchor()`` moves the offset if the wall clock was
stepped (NTP, a VM resumed): instants compared with ``_updatedAt`` follow the wall, while
the sleeps already under way follow trio's clock (the caller wakes its timers after a step).

Must never: be read outside a trio run (``trio.current_time()`` needs one), or do I/O.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final

import trio

__all__ = ["STEP_TOLERANCE_MS", "Clock"]

STEP_TOLERANCE_MS: Final = 1000
"""A wall-clock step at least this large moves the offset on ``reanchor()``."""


class Clock:
    """Wall-clock instants in integer milliseconds since the Unix epoch, on trio's clock.

    ``Clock()`` follows the wall clock (``time.time``): the offset is taken at the first
    reading and re-taken by ``reanchor()`` after a step. ``Clock(epoch_ms=E)`` is fixed:
    trio time 0 is epoch instant ``E`` (for tests driving a ``MockClock``, which starts at
    0), and ``reanchor()`` does nothing.
    """

    def __init__(
        self, *, epoch_ms: float | None = None, wall: Callable[[], float] = time.time
    ) -> None:
        self._follows_wall = epoch_ms is None
        self._wall = wall
        self._offset_ms: float | None = epoch_ms

    def _offset(self) -> float:
        if self._offset_ms is None:
            self._offset_ms = self._wall() * 1000 - trio.current_time() * 1000
        return self._offset_ms

    def now_ms(self) -> int:
        """The current instant, floored to the millisecond (as BSON dates are)."""
        return math.floor(trio.current_time() * 1000 + self._offset())

    def monotonic(self) -> float:
        """Seconds on trio's clock: for durations (outages, lag, rates), never for instants."""
        return trio.current_time()

    def trio_time(self, at_ms: int) -> float:
        """The trio-clock deadline of the instant ``at_ms`` (for ``trio.move_on_at``).

        Half a millisecond into ``at_ms``, so that ``now_ms()`` read on waking is ``at_ms``
        whatever the rounding of the float arithmetic (never the millisecond before it).
        """
        return (at_ms + 0.5 - self._offset()) / 1000

    async def sleep_until_ms(self, at_ms: int) -> None:
        """Sleep until the instant ``at_ms`` (at once if it has passed)."""
        await trio.sleep_until(self.trio_time(at_ms))

    async def sleep(self, seconds: float) -> None:
        """Sleep for ``seconds`` on trio's clock."""
        await trio.sleep(seconds)

    def reanchor(self) -> int:
        """Re-take the offset from the wall clock if it stepped by ``STEP_TOLERANCE_MS`` or
        more; return the step in ms (0 when none, or for a fixed clock)."""
        if not self._follows_wall or self._offset_ms is None:
            return 0
        wall_offset = self._wall() * 1000 - trio.current_time() * 1000
        step = round(wall_offset - self._offset_ms)
        if abs(step) < STEP_TOLERANCE_MS:
            return 0
        self._offset_ms = wall_offset
        return step
