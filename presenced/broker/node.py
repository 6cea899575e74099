"""presenced as a node of Rocket.Chat's service broker (Moleculer over NATS).

Owns the node's life on the broker: connecting (and staying connected) to NATS, saying
who it is (DISCOVER, INFO, HEARTBEAT, DISCONNECT), keeping the registry of the other
nodes (lost after ``HEARTBEAT_TIMEOUT`` without a heartbeat, or at their DISCONNECT),
answering PING, serving REQ packets with the service's actions (RES), receiving the
events the service listens to, and broadcasting events to every node that listens.

What the service does with a request or an event is :mod:`presenced.broker.service`'s
business; this module only moves packets. It never blocks presence: a broker that is down
at start is retried for ever in the background (logged once, and once when it comes back),
and events published while it is down are dropped and counted.
"""

from __future__ import annotations

import platform
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import trio
from loguru import logger

from presenced import __version__
from presenced.broker.protocol import (
    PROTOCOL_VERSION,
    NodeChange,
    PacketType,
    Registry,
    info_packet,
    local_ips,
    prefix,
    service_descriptor,
    subject,
)
from presenced.broker.serializer import SERIALIZERS, BadPacket, Serializer
from presenced.broker.transport import NatsLink
from presenced.clock import Clock
from presenced.metrics import Metrics

__all__ = [
    "MAX_CONCURRENT_REQUESTS",
    "ActionError",
    "BrokerConfig",
    "BrokerNode",
    "Link",
    "LinkFactory",
    "Service",
    "nats_link",
]

MAX_CONCURRENT_REQUESTS: Final = 256
"""Requests served at once; more wait (and NATS buffers them) rather than pile up tasks."""
MALFORMED_LOG_EVERY_S: Final = 600.0


@dataclass(frozen=True)
class BrokerConfig:
    """The broker settings (``TRANSPORTER``, ``MS_NAMESPACE``, ``SERIALIZER``,
    ``HEARTBEAT_INTERVAL``, ``HEARTBEAT_TIMEOUT``) and this node's id (``INSTANCE_ID``)."""

    url: str
    node_id: str
    namespace: str = ""
    serializer: str = "EJSON"
    heartbeat_interval_s: float = 10.0
    heartbeat_timeout_s: float = 30.0
    shown_url: str = ""
    """The URL as it may be logged (credentials masked)."""


class ActionError(Exception):
    """An action's failure, as a Moleculer error (``name``, ``code``, ``type``, ``data``)."""

    def __init__(
        self, message: str, *, name: str = "Error", code: int = 500, type: str | None = None,
        data: Any = None, retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.name = name
        self.code = code
        self.type = type
        self.data = data
        self.retryable = retryable


class Service(Protocol):
    """What the node serves: a name, actions by method, the events it listens to."""

    name: str

    @property
    def actions(self) -> Mapping[str, Callable[[Any], Awaitable[Any]]]: ...

    @property
    def events(self) -> Sequence[str]: ...

    async def on_event(self, event: str, data: Any, sender: str) -> None: ...

    async def on_node_lost(self, node_id: str) -> None: ...


class Link(Protocol):
    """What the node needs of its NATS connection (:class:`NatsLink`, or a test double)."""

    incoming: trio.MemoryReceiveChannel[tuple[str, bytes]]

    async def connect(self) -> None: ...

    async def subscribe(self, *subjects: str) -> None: ...

    def publish(self, subject: str, data: bytes) -> bool: ...

    async def close(self) -> None: ...


LinkFactory = Callable[[str, str, Callable[[str], None], Callable[[str], None]], Link]
"""``(url, name, on_state, on_error)`` → a link, made inside the trio run."""


def nats_link(
    url: str, name: str, on_state: Callable[[str], None], on_error: Callable[[str], None]
) -> Link:
    return NatsLink(url, name=name, on_state=on_state, on_error=on_error)


class BrokerNode:
    """One node on the broker, serving ``service``; ``run()`` until cancelled."""

    def __init__(
        self,
        config: BrokerConfig,
        service: Service,
        clock: Clock,
        metrics: Metrics,
        *,
        link_factory: LinkFactory = nats_link,
    ) -> None:
        self.config = config
        self._link_factory = link_factory
        self.service = service
        self._clock = clock
        self._metrics = metrics
        self._serializer: Serializer = SERIALIZERS[config.serializer]()
        self._prefix = prefix(config.namespace)
        self.registry = Registry(config.node_id)
        self._instance_id = str(uuid.uuid4())
        self._seq = 1
        self._hostname = socket.gethostname()
        self._ips = local_ips()
        self._link: Link | None = None
        self._requests = trio.CapacityLimiter(MAX_CONCURRENT_REQUESTS)
        self._malformed_logged: dict[str, float] = {}
        self.connected = False
        self.joined = trio.Event()
        """Set the first time the broker connects."""
        self._outage_logged = False
        metrics.broker_connected.set_function(lambda: 1.0 if self.connected else 0.0)
        metrics.broker_nodes.set_function(lambda: float(len(self.registry.available_ids())))

    # -- what others see ----------------------------------------------------------------
    def details(self) -> dict[str, Any]:
        """The ``/ready`` section: connection state and the nodes seen."""
        return {
            "transporter": self.config.shown_url,
            "node_id": self.config.node_id,
            "connected": self.connected,
            "nodes": sorted(self.registry.available_ids()),
            "serializer": self.config.serializer,
            "namespace": self.config.namespace,
        }

    def broadcast(self, event: str, data: Any) -> int:
        """Send ``event`` with ``data`` (the args array) to every available node that
        listens to it; returns how many were sent. Never waits: while the broker is
        unreachable the event is dropped and counted."""
        targets = self.registry.listeners(event)
        link = self._link
        if not targets:
            return 0
        if link is None or not self.connected:
            self._metrics.broker_events.labels(event, "dropped").inc(len(targets))
            return 0
        sent = 0
        for node_id in targets:
            packet = {
                "id": str(uuid.uuid4()), "event": event, "data": data, "groups": None,
                "broadcast": True, "meta": {}, "level": 1, "tracing": None,
                "parentID": None, "requestID": None, "caller": None, "needAck": False,
            }
            if self._send(PacketType.EVENT, packet, node_id):
                sent += 1
        self._metrics.broker_events.labels(event, "sent").inc(sent)
        if sent < len(targets):
            self._metrics.broker_events.labels(event, "dropped").inc(len(targets) - sent)
        return sent

    # -- lifecycle ----------------------------------------------------------------------
    async def run(self) -> None:
        """Connect (retrying for ever), announce, serve; on cancellation, leave cleanly."""
        link = self._link_factory(
            self.config.url, f"presenced-{self.config.node_id}", self._on_link_state,
            self._on_link_error,
        )
        self._link = link
        try:
            async with trio.open_nursery() as nursery:
                await link.connect()
                await link.subscribe(*self._subjects())
                self._announce()
                nursery.start_soon(self._heartbeats)
                nursery.start_soon(self._dispatch, link, nursery)
        finally:
            with trio.CancelScope(shield=True):
                await self._leave(link)

    def _subjects(self) -> list[str]:
        me, p = self.config.node_id, self._prefix
        return [
            subject(p, PacketType.EVENT, me), subject(p, PacketType.REQ, me),
            subject(p, PacketType.RES, me), subject(p, PacketType.DISCOVER),
            subject(p, PacketType.DISCOVER, me), subject(p, PacketType.INFO),
            subject(p, PacketType.INFO, me), subject(p, PacketType.DISCONNECT),
            subject(p, PacketType.HEARTBEAT), subject(p, PacketType.PING),
            subject(p, PacketType.PING, me), subject(p, PacketType.PONG, me),
        ]

    def _announce(self) -> None:
        self._send(PacketType.DISCOVER, {}, None)
        self._send(PacketType.INFO, self._info(), None)

    def _info(self, services: bool = True) -> dict[str, Any]:
        described = (
            [service_descriptor(self.service.name, self.service.actions, self.service.events)]
            if services else []
        )
        return info_packet(
            instance_id=self._instance_id, seq=self._seq, services=described,
            version=__version__, lang_version=platform.python_version(),
            hostname=self._hostname, ip_list=self._ips,
        )

    async def _leave(self, link: Link) -> None:
        if self.connected:
            self._seq += 1
            self._send(PacketType.INFO, self._info(services=False), None)
            self._send(PacketType.DISCONNECT, {}, None)
        self.connected = False
        await link.close()

    def _on_link_state(self, state: str) -> None:
        if state in ("connected", "reconnected"):
            self.connected = True
            if state == "reconnected" or self._outage_logged:
                logger.info("service broker connected again at {}", self.config.shown_url)
            else:
                logger.info("joined the service broker at {} as node {}",
                            self.config.shown_url, self.config.node_id)
            self.joined.set()
            self._outage_logged = False
            if state == "reconnected":
                # Heartbeats missed during our own outage do not count against the nodes.
                self.registry.touch_all(self._clock.now_ms())
                self._announce()
        elif state in ("disconnected", "closed"):
            was = self.connected
            self.connected = False
            if was and not self._outage_logged:
                self._outage_logged = True
                logger.warning(
                    "service broker connection lost ({}); reconnecting; presence.status"
                    " events are dropped until it is back", self.config.shown_url,
                )

    def _on_link_error(self, text: str) -> None:
        if not self.joined.is_set() and not self._outage_logged:
            self._outage_logged = True
            logger.warning(
                "service broker unreachable at {} ({}): presence runs without it (no"
                " presence.status events, no presence actions); retrying every few seconds",
                self.config.shown_url, text,
            )
        else:
            logger.debug("NATS: {}", text)

    async def _heartbeats(self) -> None:
        """HEARTBEAT every interval; nodes silent past the timeout are lost."""
        interval = self.config.heartbeat_interval_s
        timeout_ms = int(self.config.heartbeat_timeout_s * 1000)
        while True:
            if not self.connected:
                # Our own outage silences every node: none is judged while it lasts.
                await self._clock.sleep(interval)
                continue
            self._send(PacketType.HEARTBEAT, {"cpu": 0}, None)
            for node in self.registry.expire(self._clock.now_ms(), timeout_ms):
                logger.warning(
                    "broker node {} lost (no heartbeat for {:.0f} s): removing its"
                    " connections", node.id, self.config.heartbeat_timeout_s,
                )
                await self._node_lost(node.id)
            await self._clock.sleep(interval)

    async def _node_lost(self, node_id: str) -> None:
        self._metrics.broker_lost_nodes.inc()
        try:
            await self.service.on_node_lost(node_id)
        except Exception as exc:
            logger.error("removing the connections of lost node {} failed: {}", node_id, exc)

    # -- packets in ---------------------------------------------------------------------
    async def _dispatch(self, link: Link, nursery: trio.Nursery) -> None:
        async for subj, data in link.incoming:
            kind = self._kind(subj)
            if kind is None:
                self._malformed("subject", f"unexpected subject {subj!r}")
                continue
            try:
                packet = self._serializer.decode(data)
            except BadPacket as exc:
                self._malformed("undecodable", f"{kind.value} packet: {exc}")
                continue
            sender = packet.get("sender")
            if not isinstance(sender, str) or not sender:
                self._malformed("no_sender", f"{kind.value} packet without a sender")
                continue
            if sender == self.config.node_id:
                if kind is PacketType.INFO and packet.get("instanceID") not in (
                    None, self._instance_id
                ):
                    self._malformed(
                        "node_id_conflict",
                        f"another node uses this node id {sender!r}: give each presenced"
                        " its own INSTANCE_ID",
                    )
                continue  # our own broadcast, echoed by NATS
            if packet.get("ver") != PROTOCOL_VERSION:
                self._malformed(
                    "protocol_version",
                    f"{kind.value} from {sender} speaks protocol {packet.get('ver')!r},"
                    f" not {PROTOCOL_VERSION!r} (Moleculer 0.14)",
                )
                continue
            await self._handle(kind, sender, packet, nursery)

    def _kind(self, subj: str) -> PacketType | None:
        rest = subj.removeprefix(self._prefix + ".")
        if rest == subj:
            return None
        try:
            return PacketType(rest.split(".", 1)[0])
        except ValueError:
            return None

    async def _handle(
        self, kind: PacketType, sender: str, packet: dict[str, Any], nursery: trio.Nursery
    ) -> None:
        now = self._clock.now_ms()
        if kind is PacketType.REQ:
            token = object()  # a request's own id may be missing, repeated or unhashable
            await self._requests.acquire_on_behalf_of(token)
            nursery.start_soon(self._serve, sender, packet, token)
        elif kind is PacketType.EVENT:
            event = packet.get("event")
            if not isinstance(event, str):
                self._malformed("event", f"EVENT from {sender} without an event name")
                return
            self._metrics.broker_events.labels(event, "received").inc()
            if event in self.service.events:
                nursery.start_soon(self._event, event, packet.get("data"), sender)
        elif kind is PacketType.INFO:
            try:
                change = self.registry.on_info(packet, now)
            except (ValueError, KeyError) as exc:
                self._malformed("info", f"INFO from {sender}: {exc}")
                return
            if change is NodeChange.CONNECTED:
                logger.debug("broker node {} joined", sender)
        elif kind is PacketType.HEARTBEAT:
            if not self.registry.on_heartbeat(sender, now):
                self._send(PacketType.DISCOVER, {}, sender)
        elif kind is PacketType.DISCOVER:
            self._send(PacketType.INFO, self._info(), sender)
        elif kind is PacketType.DISCONNECT:
            node = self.registry.on_disconnect(sender)
            if node is not None:
                logger.info("broker node {} left: removing its connections", sender)
                nursery.start_soon(self._node_lost, sender)
        elif kind is PacketType.PING:
            self._send(
                PacketType.PONG,
                {"time": packet.get("time"), "id": packet.get("id"), "arrived": now}, sender,
            )

    async def _event(self, event: str, data: Any, sender: str) -> None:
        try:
            await self.service.on_event(event, data, sender)
        except Exception as exc:
            logger.error("handling broker event {} from {} failed: {}", event, sender, exc)

    async def _serve(self, sender: str, packet: dict[str, Any], token: object) -> None:
        request_id = packet.get("id")
        try:
            action = packet.get("action")
            method = (
                action.removeprefix(self.service.name + ".") if isinstance(action, str) else None
            )
            handler = self.service.actions.get(method or "") if method != action else None
            if handler is None:
                self._metrics.broker_requests.labels("?", "unknown_action").inc()
                error = ActionError(
                    f"Service '{action}' is not found on '{self.config.node_id}' node.",
                    name="ServiceNotFoundError", code=404, type="SERVICE_NOT_FOUND",
                    data={"action": action, "nodeID": self.config.node_id}, retryable=True,
                )
                self._respond(sender, request_id, packet, error=error)
                return
            label = str(action)
            try:
                result = await handler(packet.get("params"))
            except ActionError as exc:
                self._metrics.broker_requests.labels(label, "error").inc()
                self._respond(sender, request_id, packet, error=exc)
            except Exception as exc:
                self._metrics.broker_requests.labels(label, "error").inc()
                logger.error("action {} failed: {}", action, exc)
                self._respond(sender, request_id, packet, error=ActionError(str(exc)))
            else:
                self._metrics.broker_requests.labels(label, "ok").inc()
                self._respond(sender, request_id, packet, result=result)
        finally:
            self._requests.release_on_behalf_of(token)

    def _respond(
        self, sender: str, request_id: Any, request: Mapping[str, Any], *,
        result: Any = None, error: ActionError | None = None,
    ) -> None:
        meta = request.get("meta")
        packet: dict[str, Any] = {
            "id": request_id, "meta": meta if isinstance(meta, dict) else {},
            "success": error is None,
        }
        if error is not None:
            packet["error"] = {
                "name": error.name, "message": str(error), "nodeID": self.config.node_id,
                "code": error.code, "type": error.type, "retryable": error.retryable,
                "data": error.data,
            }
        elif result is not None:
            packet["data"] = result
        self._send(PacketType.RES, packet, sender)

    # -- packets out --------------------------------------------------------------------
    def _send(self, kind: PacketType, payload: dict[str, Any], node_id: str | None) -> bool:
        link = self._link
        if link is None:
            return False
        packet = {"ver": PROTOCOL_VERSION, "sender": self.config.node_id, **payload}
        try:
            data = self._serializer.encode(packet)
        except (TypeError, ValueError) as exc:
            self._malformed("unencodable", f"cannot encode a {kind.value} packet: {exc}")
            return False
        return link.publish(subject(self._prefix, kind, node_id), data)

    def _malformed(self, kind: str, text: str) -> None:
        """Count a packet that could not be used; log each kind at most every 10 min."""
        self._metrics.broker_malformed.labels(kind).inc()
        now = self._clock.monotonic()
        last = self._malformed_logged.get(kind)
        if last is None or now - last >= MALFORMED_LOG_EVERY_S:
            self._malformed_logged[kind] = now
            logger.warning("broker packet ignored ({}): {}", kind, text[:300])
