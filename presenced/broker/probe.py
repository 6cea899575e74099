"""``presenced check``'s look at the service broker: can NATS be reached, which Moleculer
nodes answer, and who offers the ``presence`` service already.

It connects as a throw-away node id, subscribes to its own INFO subject, sends one
DISCOVER and collects the INFO answers for a moment. It never sends INFO itself, so no
node registers it and nothing is served or broadcast.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import trio

from presenced.broker.node import BrokerConfig, LinkFactory, nats_link
from presenced.broker.protocol import PROTOCOL_VERSION, PacketType, prefix, subject
from presenced.broker.serializer import SERIALIZERS, BadPacket

__all__ = ["ProbeReport", "probe"]


@dataclass
class ProbeReport:
    reachable: bool = False
    error: str | None = None
    nodes: dict[str, list[str]] = field(default_factory=dict)
    """Node id → the services its INFO lists."""

    def presence_nodes(self, except_node: str) -> list[str]:
        """Other nodes offering a ``presence`` service (Rocket.Chat's presence-service,
        or another presenced with the same INSTANCE_ID)."""
        return sorted(n for n, services in self.nodes.items()
                      if "presence" in services and n != except_node)


async def probe(
    config: BrokerConfig, *, timeout_s: float = 5.0, listen_s: float = 1.5,
    link_factory: LinkFactory = nats_link,
) -> ProbeReport:
    report = ProbeReport()
    me = f"presenced-check-{uuid.uuid4().hex[:12]}"
    errors: list[str] = []
    link = link_factory(config.url, me, lambda state: None, errors.append)
    serializer = SERIALIZERS[config.serializer]()
    pfx = prefix(config.namespace)
    try:
        with trio.move_on_after(timeout_s):
            await link.connect()
            report.reachable = True
        if not report.reachable:
            report.error = errors[-1] if errors else f"no answer within {timeout_s:g} s"
            return report
        await link.subscribe(subject(pfx, PacketType.INFO, me))
        link.publish(
            subject(pfx, PacketType.DISCOVER),
            serializer.encode({"ver": PROTOCOL_VERSION, "sender": me}),
        )
        with trio.move_on_after(listen_s):
            async for _, data in link.incoming:
                try:
                    packet = serializer.decode(data)
                except BadPacket:
                    continue
                _note(report, packet)
        return report
    finally:
        with trio.CancelScope(shield=True):
            await link.close()


def _note(report: ProbeReport, packet: dict[str, Any]) -> None:
    sender = packet.get("sender")
    services = packet.get("services")
    if not isinstance(sender, str) or not isinstance(services, list):
        return
    report.nodes[sender] = sorted(
        str(s.get("name")) for s in services if isinstance(s, dict) and s.get("name")
    )
