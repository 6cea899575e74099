"""Moleculer's transit protocol, version "4", as Moleculer 0.14 speaks it over NATS.

Owns the packet shapes, the subjects, and the registry of the other nodes (what their
INFO packets declare, whether their heartbeats still come). Pure: no I/O, no clock of its
own (every method takes ``now_ms``), so the broker node's behaviour is testable packet by
packet.

Subjects: ``<prefix>.<TYPE>`` for a broadcast, ``<prefix>.<TYPE>.<nodeID>`` for one node,
where the prefix is ``MOL`` or ``MOL-<namespace>``. Every packet carries ``ver: "4"`` and
``sender``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

__all__ = [
    "PROTOCOL_VERSION",
    "NodeChange",
    "PacketType",
    "Registry",
    "RemoteNode",
    "info_packet",
    "local_ips",
    "prefix",
    "service_descriptor",
    "subject",
]

PROTOCOL_VERSION: Final = "4"


class PacketType(StrEnum):
    DISCOVER = "DISCOVER"
    INFO = "INFO"
    HEARTBEAT = "HEARTBEAT"
    DISCONNECT = "DISCONNECT"
    PING = "PING"
    PONG = "PONG"
    REQ = "REQ"
    RES = "RES"
    EVENT = "EVENT"


def prefix(namespace: str) -> str:
    """``MOL``, or ``MOL-<namespace>`` (Moleculer's transit prefix)."""
    return f"MOL-{namespace}" if namespace else "MOL"


def subject(pfx: str, kind: PacketType, node_id: str | None = None) -> str:
    return f"{pfx}.{kind.value}" if node_id is None else f"{pfx}.{kind.value}.{node_id}"


def local_ips() -> list[str]:
    """This host's IPv4 addresses as INFO lists them (best effort, never raises)."""
    try:
        found = {
            str(info[4][0])
            for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
        }
    except OSError:
        found = set()
    return sorted(found) or ["127.0.0.1"]


def info_packet(
    *,
    instance_id: str,
    seq: int,
    services: Sequence[Mapping[str, Any]],
    version: str,
    lang_version: str,
    hostname: str,
    ip_list: Sequence[str],
) -> dict[str, Any]:
    """This node's INFO payload (the sender adds ``ver`` and ``sender``): its services with
    their actions and events, as a Moleculer 0.14 registry reads them
    (``services[].name``, ``actions{<full name>: {name}}``, ``events{<name>: {name}}``), and
    the node's identity (``instanceID`` changes when the process restarts; ``seq`` grows
    when the services change)."""
    return {
        "services": [dict(s) for s in services],
        "ipList": list(ip_list),
        "hostname": hostname,
        "client": {"type": "python", "version": version, "langVersion": lang_version},
        "config": {},
        "instanceID": instance_id,
        "metadata": {},
        "seq": seq,
    }


def service_descriptor(
    name: str, actions: Iterable[str], events: Iterable[str]
) -> dict[str, Any]:
    """One service as INFO lists it: ``actions`` by method, ``events`` by name."""
    return {
        "name": name,
        "version": None,
        "fullName": name,
        "settings": {},
        "metadata": {},
        "dependencies": [],
        "actions": {
            f"{name}.{method}": {"rawName": method, "name": f"{name}.{method}"}
            for method in actions
        },
        "events": {event: {"name": event} for event in events},
    }


class NodeChange(StrEnum):
    CONNECTED = "connected"
    """A node seen for the first time (or again after it was lost)."""
    RECONNECTED = "reconnected"
    """A known node that restarted (its ``instanceID`` changed)."""
    UPDATED = "updated"
    """A known node that sent new INFO (its services changed)."""


@dataclass
class RemoteNode:
    """What the registry knows of another node."""

    id: str
    instance_id: str | None = None
    seq: int = 0
    hostname: str | None = None
    client: Mapping[str, Any] = field(default_factory=dict)
    available: bool = False
    last_heartbeat_ms: int = 0
    actions: frozenset[str] = frozenset()
    events: frozenset[str] = frozenset()


class Registry:
    """The other nodes, from their INFO, HEARTBEAT and DISCONNECT packets."""

    def __init__(self, local_id: str) -> None:
        self.local_id = local_id
        self.nodes: dict[str, RemoteNode] = {}

    def on_info(self, packet: Mapping[str, Any], now_ms: int) -> NodeChange | None:
        """Register or update the sender. Raises ``ValueError`` on an INFO whose services
        cannot be read. Returns what changed (None: nothing a listener cares about)."""
        sender = packet["sender"]
        services = packet.get("services") or []
        if not isinstance(services, list):
            raise ValueError("INFO services is not a list")
        actions: set[str] = set()
        events: set[str] = set()
        for service in services:
            if not isinstance(service, Mapping):
                raise ValueError("an INFO service is not an object")
            for kind, into in (("actions", actions), ("events", events)):
                declared = service.get(kind) or {}
                if not isinstance(declared, Mapping):
                    raise ValueError(f"INFO service {kind} is not an object")
                for key, value in declared.items():
                    name = value.get("name") if isinstance(value, Mapping) else None
                    into.add(name if isinstance(name, str) else str(key))
        instance_id = packet.get("instanceID")
        seq = packet.get("seq")
        node = self.nodes.get(sender)
        change: NodeChange | None
        if node is None or not node.available:
            change = NodeChange.CONNECTED
        elif instance_id is not None and instance_id != node.instance_id:
            change = NodeChange.RECONNECTED
        else:
            change = NodeChange.UPDATED
        if node is None:
            node = self.nodes[sender] = RemoteNode(sender)
        node.instance_id = instance_id if isinstance(instance_id, str) else None
        node.seq = seq if isinstance(seq, int) else 0
        hostname = packet.get("hostname")
        node.hostname = hostname if isinstance(hostname, str) else None
        client = packet.get("client")
        node.client = client if isinstance(client, Mapping) else {}
        node.available = True
        node.last_heartbeat_ms = now_ms
        node.actions, node.events = frozenset(actions), frozenset(events)
        return change

    def on_heartbeat(self, sender: str, now_ms: int) -> bool:
        """Note a heartbeat; False when the sender is unknown or was lost (the caller asks
        it for its INFO with a targeted DISCOVER)."""
        node = self.nodes.get(sender)
        if node is None or not node.available:
            return False
        node.last_heartbeat_ms = now_ms
        return True

    def on_disconnect(self, sender: str) -> RemoteNode | None:
        """The sender left cleanly: the node, if it was available."""
        node = self.nodes.get(sender)
        if node is None or not node.available:
            return None
        node.available = False
        return node

    def expire(self, now_ms: int, timeout_ms: int) -> list[RemoteNode]:
        """Available nodes silent for more than ``timeout_ms``: now lost (unavailable)."""
        lost = [
            node for node in self.nodes.values()
            if node.available and now_ms - node.last_heartbeat_ms > timeout_ms
        ]
        for node in lost:
            node.available = False
        return lost

    def touch_all(self, now_ms: int) -> None:
        """Count every available node as heard from at ``now_ms`` (after our own outage)."""
        for node in self.nodes.values():
            if node.available:
                node.last_heartbeat_ms = now_ms

    def listeners(self, event: str) -> list[str]:
        """Available nodes whose INFO declares a service listening to ``event``."""
        return [n.id for n in self.nodes.values() if n.available and event in n.events]

    def available_ids(self) -> list[str]:
        return [n.id for n in self.nodes.values() if n.available]
