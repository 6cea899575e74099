"""NATS for a trio program: nats-py on its own asyncio loop, in one thread.

Owns the connection to NATS (``TRANSPORTER``) and nothing of Moleculer: subjects in, bytes
in and out. nats-py is asyncio-only, so it runs on an asyncio event loop in a dedicated
thread; the trio side talks to it through three seams:

- ``await link.call(coroutine function, *args)``: run one nats-py coroutine on the loop
  and wait for it in trio (cancelling the trio wait cancels it);
- ``link.incoming``: every message of every subscription, in order, on a bounded trio
  channel (a message that finds it full is dropped and counted, never queued without
  bound);
- ``link.publish(subject, data)``: hand a message to nats-py without waiting (order kept);
  while disconnected it is dropped and counted (a stale presence event is worse than none:
  the next change repairs a client's view).

nats-py keeps reconnecting by itself (``max_reconnect_attempts=-1``), also before the
first connection; ``state`` and ``on_state`` tell the trio side what happened, once per
change. nats-py's own error reports go to ``on_error`` instead of its default traceback
print.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import nats
import trio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

__all__ = ["INCOMING_BUFFER", "NatsLink"]

T = TypeVar("T")

INCOMING_BUFFER: Final = 10_000
"""Messages received and not yet handled by the trio side, at most."""
RECONNECT_WAIT_S: Final = 2
CONNECT_TIMEOUT_S: Final = 2


class NatsLink:
    """One NATS connection, bridged to the trio run that created it.

    ``on_state(state, detail)`` is called in the trio thread with ``"connected"``,
    ``"disconnected"``, ``"reconnected"`` or ``"closed"``; ``on_error(text)`` with each
    error nats-py reports (the caller decides what to log, and how often).
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        on_state: Callable[[str], None] = lambda state: None,
        on_error: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.url = url
        self.name = name
        self._on_state = on_state
        self._on_error = on_error
        self._token = trio.lowlevel.current_trio_token()
        self._send, self.incoming = trio.open_memory_channel[tuple[str, bytes]](INCOMING_BUFFER)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="presenced-nats", daemon=True
        )
        self._thread.start()
        self._nc: NatsClient | None = None
        self._publish_queue: asyncio.Queue[tuple[str, bytes]] | None = None
        self.state = "connecting"
        self.dropped_in = 0
        self.dropped_out = 0

    # -- trio side --------------------------------------------------------------------
    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the asyncio loop; wait for it here."""
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(fn, *args), self._loop)
        done = trio.Event()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        return future.result()

    async def connect(self) -> None:
        """Connect (waits until NATS answers: nats-py retries every
        ``RECONNECT_WAIT_S``), then start the publisher."""
        await self.call(self._connect)
        self._set_state("connected")

    async def subscribe(self, *subjects: str) -> None:
        for subject in subjects:
            await self.call(self._subscribe, subject)

    def publish(self, subject: str, data: bytes) -> bool:
        """Queue a message for NATS, in order; False (and counted) while disconnected."""
        queue = self._publish_queue
        if queue is None or self.state not in ("connected", "reconnected"):
            self.dropped_out += 1
            return False
        self._loop.call_soon_threadsafe(queue.put_nowait, (subject, data))
        return True

    async def flush(self, timeout_s: int = 2) -> None:
        nc = self._nc
        if nc is not None and nc.is_connected:
            await self.call(self._flush, timeout_s)

    async def close(self) -> None:
        """Drain what was published, close the connection, stop the loop and its thread."""
        try:
            with trio.move_on_after(3):
                await self.call(self._close)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            await trio.to_thread.run_sync(self._thread.join, 5.0)
            if not self._thread.is_alive():
                self._loop.close()

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self._on_state(state)

    def _deliver(self, subject: str, data: bytes) -> None:
        try:
            self._send.send_nowait((subject, data))
        except trio.WouldBlock:
            self.dropped_in += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def _from_loop(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(fn, *args)

    # -- asyncio side -----------------------------------------------------------------
    async def _connect(self) -> None:
        async def error_cb(exc: Exception) -> None:
            self._from_loop(self._on_error, _describe(exc))

        async def disconnected_cb() -> None:
            self._from_loop(self._set_state, "disconnected")

        async def reconnected_cb() -> None:
            self._from_loop(self._set_state, "reconnected")

        async def closed_cb() -> None:
            self._from_loop(self._set_state, "closed")

        self._nc = await nats.connect(
            self.url, name=self.name, allow_reconnect=True, max_reconnect_attempts=-1,
            reconnect_time_wait=RECONNECT_WAIT_S, connect_timeout=CONNECT_TIMEOUT_S,
            error_cb=error_cb, disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb, closed_cb=closed_cb,
        )
        self._publish_queue = asyncio.Queue()
        asyncio.get_running_loop().create_task(self._publisher(self._publish_queue))

    async def _publisher(self, queue: asyncio.Queue[tuple[str, bytes]]) -> None:
        while True:
            subject, data = await queue.get()
            nc = self._nc
            if nc is None or nc.is_closed:
                return
            try:
                await nc.publish(subject, data)
            except Exception as exc:  # nats-py's own errors: count, report, go on
                self.dropped_out += 1
                self._from_loop(self._on_error, _describe(exc))

    async def _subscribe(self, subject: str) -> None:
        assert self._nc is not None

        async def handler(msg: Msg) -> None:
            self._from_loop(self._deliver, msg.subject, msg.data)

        await self._nc.subscribe(subject, cb=handler)

    async def _flush(self, timeout_s: int) -> None:
        if self._nc is not None:
            await self._nc.flush(timeout=timeout_s)

    async def _close(self) -> None:
        nc = self._nc
        if nc is not None and not nc.is_closed:
            queue = self._publish_queue
            while queue is not None and not queue.empty() and nc.is_connected:
                subject, data = queue.get_nowait()
                with contextlib.suppress(Exception):
                    await nc.publish(subject, data)
            if nc.is_connected:
                with contextlib.suppress(Exception):  # closing anyway
                    await nc.flush(timeout=1)
            await nc.close()
        # Nothing may be left pending when the loop stops (no "Task was destroyed").
        current = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not current]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)


async def _as_coroutine(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return await fn(*args)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
