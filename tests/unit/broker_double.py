"""A NATS link double for broker tests: packets in and out, no server.

Not a test module. :class:`FakeLink` is what :class:`~presenced.broker.node.BrokerNode`
sees as its NATS connection; a test plays the other nodes by ``send``-ing packets to it
and reads what the node published from ``published``. Packets are encoded and decoded
with the real serializer, so what crosses is what would cross NATS.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from presenced.broker.serializer import EjsonSerializer


class FakeLink:
    def __init__(
        self, url: str, name: str, on_state: Callable[[str], None],
        on_error: Callable[[str], None], *, connect: bool = True,
    ) -> None:
        self.url, self.name = url, name
        self.on_state = on_state
        self.on_error = on_error
        self._send, self.incoming = trio.open_memory_channel[tuple[str, bytes]](1000)
        self.serializer = EjsonSerializer()
        self.subjects: list[str] = []
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.connected = False
        self.closed = False
        self.greeting: list[tuple[str, dict[str, Any]]] = []
        self.connect_delay = 0.0
        self._may_connect = trio.Event()
        if connect:
            self._may_connect.set()

    # -- the Link interface -------------------------------------------------------------
    async def connect(self) -> None:
        await trio.sleep(self.connect_delay)
        while not self._may_connect.is_set():  # as nats-py: an error per attempt, every 2 s
            self.on_error("ConnectionRefusedError: [Errno 111] Connect call failed")
            with trio.move_on_after(2):
                await self._may_connect.wait()
        self.connected = True
        self.on_state("connected")

    async def subscribe(self, *subjects: str) -> None:
        self.subjects.extend(subjects)
        for subject, packet in self.greeting:  # what the other nodes say as we join
            self.send(subject, packet)
        self.greeting = []

    def publish(self, subject: str, data: bytes) -> bool:
        if not self.connected:
            return False
        self.published.append((subject, self.serializer.decode(data)))
        return True

    async def close(self) -> None:
        self.closed = True

    # -- the test's side ----------------------------------------------------------------
    def allow_connect(self) -> None:
        self._may_connect.set()

    def drop(self) -> None:
        self.connected = False
        self.on_state("disconnected")

    def restore(self) -> None:
        self.connected = True
        self.on_state("reconnected")

    def send(self, subject: str, packet: dict[str, Any] | bytes) -> None:
        data = packet if isinstance(packet, bytes) else self.serializer.encode(packet)
        self._send.send_nowait((subject, data))

    def sent(self, subject_prefix: str) -> list[dict[str, Any]]:
        return [p for s, p in self.published if s == subject_prefix]

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        published, self.published = self.published, []
        return published


class LinkMaker:
    """A link factory for the node that keeps the link it made."""

    def __init__(self, *, connect: bool = True) -> None:
        self.link: FakeLink | None = None
        self._connect = connect
        self.greeting: list[tuple[str, dict[str, Any]]] = []
        """Packets the link delivers as soon as the node subscribes."""
        self.connect_delay = 0.0
        """Seconds a connection takes."""

    def __call__(
        self, url: str, name: str, on_state: Callable[[str], None],
        on_error: Callable[[str], None],
    ) -> FakeLink:
        self.link = FakeLink(url, name, on_state, on_error, connect=self._connect)
        self.link.greeting = list(self.greeting)
        self.link.connect_delay = self.connect_delay
        return self.link
