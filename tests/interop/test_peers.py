"""The real peers work with each other over a real nats-server, before any Python node joins:
a call round-trips EJSON dates, a broadcast reaches a listener exactly once, a node killed
with SIGKILL goes unavailable after the heartbeat timeout, and a NATS restart heals."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from .peers import NatsServer, NodePeer, PeerError, nats_server, node_peers_available

HEARTBEAT_INTERVAL = 1
HEARTBEAT_TIMEOUT = 3


@pytest.fixture(scope="module")
def nats() -> Iterator[NatsServer]:
    reason = node_peers_available()
    if reason is not None:
        pytest.skip(reason)
    with nats_server() as server:
        yield server


def peer(nats: NatsServer, node_id: str, **kwargs: Any) -> NodePeer:
    return NodePeer(nats.url, node_id, heartbeat_interval=HEARTBEAT_INTERVAL,
                    heartbeat_timeout=HEARTBEAT_TIMEOUT, **kwargs)


def available(p: NodePeer, node_id: str) -> bool | None:
    node = p.node(node_id)
    return None if node is None else bool(node["available"])


@pytest.mark.parametrize("serializer", ["EJSON", "JSON"])
def test_call_round_trips_params_with_a_date(nats: NatsServer, serializer: str) -> None:
    params = ["x", {"$date": 1700000000000}, {"nested": [1, None, True]}]
    ns = f"rt-{serializer.lower()}"
    with peer(nats, "a", offer=["echo"], serializer=serializer, namespace=ns), \
            peer(nats, "b", serializer=serializer, namespace=ns) as b:
        b.wait_for_services(["echo"], timeout=10)
        assert b.call("echo.ping", params) == params
        assert b.call("echo.ping", params, nodeID="a", timeout=5000) == params
        assert b.call("echo.ping", None) is None


def test_a_failed_call_raises_the_moleculer_error(nats: NatsServer) -> None:
    with peer(nats, "lonely", namespace="err") as b:
        with pytest.raises(PeerError) as caught:
            b.call("presence.newConnection", ["uid", "session", "instance"])
        assert caught.value.name == "ServiceNotFoundError"
        assert caught.value.error["type"] == "SERVICE_NOT_FOUND"
        assert caught.value.error["data"] == {"action": "presence.newConnection"}


def test_broadcast_reaches_a_listener_exactly_once(nats: NatsServer) -> None:
    data = ["user-1", {"$date": 1700000000123}, {"status": "online"}]
    with peer(nats, "b", namespace="bc") as b, \
            peer(nats, "c", listen=["demo.event"], namespace="bc") as c:
        b.wait_for_services(["listener-c"], timeout=10)
        b.broadcast("demo.event", data)
        event = c.wait_event(lambda e: e["event"] == "demo.event", timeout=10)
        assert event["data"] == data
        assert event["sender"] == "b"
        time.sleep(0.5)  # a duplicate would have arrived by now
        assert [e["data"] for e in c.events()] == [data]


@pytest.mark.slow
def test_a_node_killed_with_sigkill_goes_unavailable_after_the_heartbeat_timeout(
    nats: NatsServer,
) -> None:
    with peer(nats, "a", offer=["echo"], namespace="kill") as a, \
            peer(nats, "b", namespace="kill") as b:
        b.wait_for_services(["echo"], timeout=10)
        b.wait_until(lambda: available(b, "a") is True, timeout=10)
        a.kill()
        # Moleculer checks every heartbeatTimeout seconds for nodes silent for longer than
        # that (whole seconds of uptime): unavailable within about twice the timeout. No
        # DISCONNECT was sent, so it is not immediate: the last heartbeat came at most
        # 1.5 s (interval + jitter) before the kill, and silence must pass ~3 s.
        took = b.wait_until(lambda: available(b, "a") is False, timeout=4 * HEARTBEAT_TIMEOUT)
        assert took >= 1.0
        node = b.node("a")
        assert node is not None and node["available"] is False
        with pytest.raises(PeerError) as caught:
            b.call("echo.ping", ["after"])
        assert caught.value.name in {"ServiceNotAvailableError", "ServiceNotFoundError"}


@pytest.mark.slow
def test_calls_work_again_after_nats_restarts_on_the_same_port(nats: NatsServer) -> None:
    with peer(nats, "a", offer=["echo"], namespace="restart"), \
            peer(nats, "b", namespace="restart") as b:
        b.wait_for_services(["echo"], timeout=10)
        nats.stop()
        nats.start()

        def echoes() -> bool:
            try:
                return bool(b.call("echo.ping", ["again"], timeout=1000) == ["again"])
            except PeerError:
                return False

        b.wait_until(echoes, timeout=20, interval=0.5)
