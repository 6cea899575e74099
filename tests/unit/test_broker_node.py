"""The broker node, packet by packet, under MockClock: Moleculer's transit protocol "4"
as presenced speaks it, with a double of the NATS link and of the service."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from loguru import logger

from presenced.broker.node import ActionError, BrokerConfig, BrokerNode
from presenced.clock import Clock
from presenced.metrics import Metrics
from tests.unit.broker_double import FakeLink, LinkMaker

ME = "presenced-1"
PEER = "rc-ddp-1"


class FakeService:
    name = "presence"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.events_seen: list[tuple[str, Any, str]] = []
        self.lost: list[str] = []

    @property
    def actions(self) -> Mapping[str, Callable[[Any], Awaitable[Any]]]:
        return {"echo": self.echo, "nothing": self.nothing, "fail": self.fail,
                "boom": self.boom}

    @property
    def events(self) -> Sequence[str]:
        return ("watch.instanceStatus",)

    async def echo(self, params: Any) -> Any:
        self.calls.append(("echo", params))
        return {"params": params}

    async def nothing(self, params: Any) -> Any:
        return None

    async def fail(self, params: Any) -> Any:
        raise ActionError("bad input", name="ValidationError", code=422,
                          type="VALIDATION_ERROR")

    async def boom(self, params: Any) -> Any:
        raise RuntimeError("kaput")

    async def on_event(self, event: str, data: Any, sender: str) -> None:
        self.events_seen.append((event, data, sender))

    async def on_node_lost(self, node_id: str) -> None:
        self.lost.append(node_id)


class Env:
    def __init__(self, namespace: str = "", connect: bool = True) -> None:
        self.clock = Clock(epoch_ms=1_750_000_000_000)
        self.metrics = Metrics()
        self.service = FakeService()
        self.maker = LinkMaker(connect=connect)
        self.node = BrokerNode(
            BrokerConfig("nats://x:4222", ME, namespace=namespace, heartbeat_interval_s=1,
                         heartbeat_timeout_s=3, shown_url="nats://x:4222"),
            self.service, self.clock, self.metrics, link_factory=self.maker,
        )
        self.logs: list[tuple[str, str]] = []

    @property
    def link(self) -> FakeLink:
        assert self.maker.link is not None
        return self.maker.link

    async def settle(self) -> None:
        await trio.testing.wait_all_tasks_blocked()

    def lines(self, containing: str) -> list[str]:
        return [m for _, m in self.logs if containing in m]

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Env]:
        sink = logger.add(
            lambda m: self.logs.append((m.record["level"].name, m.record["message"])),
            level="DEBUG", format="{message}",
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.node.run)
                await self.settle()
                yield self
                nursery.cancel_scope.cancel()
        finally:
            logger.remove(sink)

    def info(self, node_id: str = PEER, events: Sequence[str] = (), instance: str = "i1",
             seq: int = 1) -> dict[str, Any]:
        return {
            "ver": "4", "sender": node_id, "instanceID": instance, "seq": seq,
            "hostname": "h", "ipList": [], "client": {"type": "nodejs"}, "config": {},
            "metadata": {},
            "services": [{"name": "listener", "actions": {},
                          "events": {e: {"name": e} for e in events}}],
        }


def run(scenario: Callable[[Env], Awaitable[None]], **kwargs: Any) -> Env:
    env = Env(**kwargs)
    trio.run(scenario, env, clock=trio.testing.MockClock(autojump_threshold=0))
    return env


def test_on_connect_it_subscribes_and_announces_its_service() -> None:
    async def scenario(env: Env) -> None:
        async with env.running():
            assert set(env.link.subjects) == {
                f"MOL.{t}.{ME}" for t in ("EVENT", "REQ", "RES", "DISCOVER", "INFO", "PING",
                                          "PONG")
            } | {f"MOL.{t}" for t in ("DISCOVER", "INFO", "DISCONNECT", "HEARTBEAT", "PING")}
            (discover,) = env.link.sent("MOL.DISCOVER")
            assert discover == {"ver": "4", "sender": ME}
            (info,) = env.link.sent("MOL.INFO")
            assert info["ver"] == "4" and info["sender"] == ME and info["seq"] == 1
            (service,) = info["services"]
            assert service["name"] == "presence"
            assert service["actions"]["presence.echo"]["name"] == "presence.echo"
            assert set(service["actions"]) == {
                "presence.echo", "presence.nothing", "presence.fail", "presence.boom"
            }
            assert service["events"] == {
                "watch.instanceStatus": {"name": "watch.instanceStatus"}
            }
            assert env.node.connected
            assert env.lines("joined the service broker at nats://x:4222 as node " + ME)

    run(scenario)


def test_a_namespace_prefixes_every_subject() -> None:
    async def scenario(env: Env) -> None:
        async with env.running():
            assert f"MOL-rc7.REQ.{ME}" in env.link.subjects
            assert env.link.sent("MOL-rc7.INFO")
            env.link.send("MOL-rc7.DISCOVER", {"ver": "4", "sender": PEER})
            await env.settle()
            assert env.link.sent(f"MOL-rc7.INFO.{PEER}")

    run(scenario, namespace="rc7")


def test_discover_is_answered_with_info_to_the_asker() -> None:
    async def scenario(env: Env) -> None:
        async with env.running():
            env.link.take()
            env.link.send(f"MOL.DISCOVER.{ME}", {"ver": "4", "sender": PEER})
            await env.settle()
            (info,) = env.link.sent(f"MOL.INFO.{PEER}")
            assert info["services"][0]["name"] == "presence"

    run(scenario)


def test_a_heartbeat_from_an_unknown_node_gets_a_targeted_discover() -> None:
    async def scenario(env: Env) -> None:
        async with env.running():
            env.link.take()
            env.link.send("MOL.HEARTBEAT", {"ver": "4", "sender": PEER, "cpu": 3})
            await env.settle()
            assert env.link.sent(f"MOL.DISCOVER.{PEER}") == [{"ver": "4", "sender": ME}]
            env.link.take()
            env.link.send("MOL.INFO", env.info())
            env.link.send("MOL.HEARTBEAT", {"ver": "4", "sender": PEER, "cpu": 3})
            await env.settle()
            assert not env.link.sent(f"MOL.DISCOVER.{PEER}")

    run(scenario)


def test_a_silent_node_is_lost_after_the_heartbeat_timeout_and_not_before() -> None:
    async def scenario(env: Env) -> None:
        async with env.running():
            env.link.send("MOL.INFO", env.info())
            await env.settle()
            start = env.clock.monotonic()
            for _ in range(4):  # heartbeats for 4 s keep it
                await trio.sleep(1)
                env.link.send("MOL.HEARTBEAT", {"ver": "4", "sender": PEER, "cpu": 1})
            await env.settle()
            assert env.service.lost == []
            while not env.service.lost:
                await trio.sleep(0.001)
            silent = env.clock.monotonic() - start - 4
            assert 3 < silent <= 4 + 0.01  # timeout 3 s, checked every 1 s interval
            assert env.service.lost == [PEER]
            assert env.node.registry.available_ids() == []
            assert env.metric("presenced_broker_lost_nodes_total") == 1
            assert env.lines(f"broker node {PEER} lost")
            # It comes back with INFO: known again, then lost again only once more.
            env.link.send("MOL.INFO", env.info(instance="i2"))
            await env.settle()
            assert env.node.registry.available_ids() == [PEER]

    run(scenario)


def test_a_clean_disconnect_loses_the_node_at_once() -> None:
    async def scenario(env: Env) -> None:
        async with env.running():
            env.link.send("MOL.INFO", env.info())
            await env.settle()
            env.link.send("MOL.DISCONNECT", {"ver": "4", "sender": PEER})
            await env.settle()
            assert env.service.lost == [PEER]
            env.link.send("MOL.DISCONNECT", {"ver": "4", "sender": PEER})
            await env.settle()
            assert env.service.lost == [PEER]

    run(scenario)


def test_requests_are_answered_with_moleculer_results_and_errors() -> None:
    async def scenario(env: Env) -> None:
        async with env.running():
            env.link.take()
            def req(rid: str, action: str, params: Any) -> None:
                env.link.send(f"MOL.REQ.{ME}", {
                    "ver": "4", "sender": PEER, "id": rid, "action": action,
                    "params": params, "meta": {"optl": {}}, "timeout": 5000, "level": 1,
                    "requestID": rid, "stream": False,
                })
            when = dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.UTC)  # {"$date": 17e11}
            req("r1", "presence.echo", ["u1", when])
            req("r2", "presence.nothing", [])
            req("r3", "presence.fail", [])
            req("r4", "presence.boom", [])
            req("r5", "presence.nope", [])
            req("r6", "other.echo", [])
            await env.settle()
            answers = {p["id"]: p for p in env.link.sent(f"MOL.RES.{PEER}")}
            assert set(answers) == {"r1", "r2", "r3", "r4", "r5", "r6"}
            assert env.service.calls == [("echo", ["u1", when])]
            assert answers["r1"]["success"] is True
            assert answers["r1"]["meta"] == {"optl": {}}
            assert answers["r1"]["data"]["params"][1] == when
            assert answers["r2"]["success"] is True and "data" not in answers["r2"]
            assert answers["r3"]["success"] is False
            assert answers["r3"]["error"] == {
                "name": "ValidationError", "message": "bad input", "nodeID": ME, "code": 422,
                "type": "VALIDATION_ERROR", "retryable": False, "data": None,
            }
            assert answers["r4"]["error"]["name"] == "Error"
            assert answers["r4"]["error"]["message"] == "kaput"
            assert answers["r4"]["error"]["code"] == 500
            for rid, action in (("r5", "presence.nope"), ("r6", "other.echo")):
                error = answers[rid]["error"]
                assert error["name"] == "ServiceNotFoundError" and error["code"] == 404
                assert error["message"] == f"Service '{action}' is not found on '{ME}' node."
            assert env.metric("presenced_broker_requests_total", action="presence.echo",
                              outcome="ok") == 1
            assert env.metric("presenced_broker_requests_total", action="presence.boom",
                              outcome="error") == 1

    run(scenario)


def test_broadcast_goes_to_each_listening_node_and_is_dropped_while_disconnected() -> None:
    async def scenario(env: Env) -> None:
        async with env.running():
            env.link.send("MOL.INFO", env.info("listener-a", events=["presence.status"]))
            env.link.send("MOL.INFO", env.info("listener-b", events=["presence.status"]))
            env.link.send("MOL.INFO", env.info("deaf", events=["other"]))
            await env.settle()
            env.link.take()
            data = [{"user": {"_id": "u1", "status": "online"}, "previousStatus": "offline"}]
            assert env.node.broadcast("presence.status", data) == 2
            sent = env.link.take()
            assert sorted(s for s, _ in sent) == ["MOL.EVENT.listener-a", "MOL.EVENT.listener-b"]
            for _, packet in sent:
                assert packet["event"] == "presence.status" and packet["data"] == data
                assert packet["broadcast"] is True and packet["sender"] == ME
            assert env.metric("presenced_broker_events_total", event="presence.status",
                              outcome="sent") == 2
            env.link.drop()
            assert env.node.broadcast("presence.status", data) == 0
            assert env.link.take() == []
            assert env.metric("presenced_broker_events_total", event="presence.status",
                              outcome="dropped") == 2
            assert env.lines("service broker connection lost")

    run(scenario)


def test_our_own_outage_does_not_lose_the_other_nodes() -> None:
    async def scenario(env: Env) -> None:
        async with env.running():
            env.link.send("MOL.INFO", env.info())
            await env.settle()
            env.link.drop()
            await trio.sleep(30)
            assert env.service.lost == []
            env.link.restore()
            await env.settle()
            assert env.lines("service broker connected again")
            # Announced again after reconnecting.
            assert env.link.sent("MOL.DISCOVER") and env.link.sent("MOL.INFO")
            await trio.sleep(2)
            assert env.service.lost == []

    run(scenario)


def test_events_it_listens_to_reach_the_service_others_are_counted_only() -> None:
    async def scenario(env: Env) -> None:
        async with env.running():
            data = [{"clientAction": "removed", "id": "inst-1"}]
            env.link.send(f"MOL.EVENT.{ME}", {"ver": "4", "sender": PEER, "id": "e1",
                                              "event": "watch.instanceStatus", "data": data,
                                              "broadcast": True, "meta": {}, "level": 1})
            env.link.send(f"MOL.EVENT.{ME}", {"ver": "4", "sender": PEER, "id": "e2",
                                              "event": "other", "data": [], "broadcast": True})
            await env.settle()
            assert env.service.events_seen == [("watch.instanceStatus", data, PEER)]
            assert env.metric("presenced_broker_events_total", event="other",
                              outcome="received") == 1

    run(scenario)


def test_ping_is_answered_with_pong() -> None:
    async def scenario(env: Env) -> None:
        async with env.running():
            env.link.send(f"MOL.PING.{ME}", {"ver": "4", "sender": PEER, "time": 5, "id": "p"})
            await env.settle()
            (pong,) = env.link.sent(f"MOL.PONG.{PEER}")
            assert (pong["time"], pong["id"]) == (5, "p")
            assert pong["arrived"] == env.clock.now_ms()

    run(scenario)


def test_malformed_packets_are_counted_and_logged_once_per_kind() -> None:
    async def scenario(env: Env) -> None:
        async with env.running():
            for _ in range(3):
                env.link.send(f"MOL.REQ.{ME}", b"\x00not json")
            env.link.send("MOL.INFO", b"[1, 2]")
            env.link.send("MOL.HEARTBEAT", {"ver": "3", "sender": PEER})
            env.link.send("MOL.HEARTBEAT", {"ver": "4"})
            env.link.send("MOL.INFO", {"ver": "4", "sender": PEER, "services": "nope"})
            await env.settle()
            assert env.metric("presenced_broker_malformed_packets_total",
                              kind="undecodable") == 4
            assert env.metric("presenced_broker_malformed_packets_total",
                              kind="protocol_version") == 1
            assert env.metric("presenced_broker_malformed_packets_total", kind="no_sender") == 1
            assert env.metric("presenced_broker_malformed_packets_total", kind="info") == 1
            assert len(env.lines("broker packet ignored (undecodable)")) == 1
            assert env.node.registry.available_ids() == []
            # The node still serves.
            env.link.send(f"MOL.REQ.{ME}", {"ver": "4", "sender": PEER, "id": "r",
                                            "action": "presence.echo", "params": []})
            await env.settle()
            assert env.link.sent(f"MOL.RES.{PEER}")[0]["success"] is True

    run(scenario)


def test_its_own_echoed_packets_are_ignored_and_a_twin_node_id_is_reported() -> None:
    async def scenario(env: Env) -> None:
        async with env.running():
            env.link.take()
            env.link.send("MOL.DISCOVER", {"ver": "4", "sender": ME})
            await env.settle()
            assert env.link.take() == []
            env.link.send("MOL.INFO", env.info(ME, instance="someone-else"))
            await env.settle()
            assert env.lines("another node uses this node id")

    run(scenario)


def test_a_clean_stop_withdraws_the_service_then_disconnects() -> None:
    async def scenario(env: Env) -> None:
        async with env.running():
            env.link.take()
        sent = env.link.take()
        assert [s for s, _ in sent] == ["MOL.INFO", "MOL.DISCONNECT"]
        assert sent[0][1]["services"] == [] and sent[0][1]["seq"] == 2
        assert env.link.closed

    run(scenario)


def test_a_broker_unreachable_at_start_is_logged_once_and_presence_goes_on() -> None:
    async def scenario(env: Env) -> None:
        async with env.running():
            await trio.sleep(60)
            assert len(env.lines("service broker unreachable at nats://x:4222")) == 1
            assert not env.node.connected
            assert env.node.broadcast("presence.status", []) == 0
            env.link.allow_connect()
            await env.settle()
            assert env.node.connected
            assert env.lines("service broker connected again")

    run(scenario, connect=False)


@pytest.mark.parametrize("bad", [b"", b"{", b"\xff\xfe", b"null", b'"text"'])
def test_any_bytes_on_a_subject_never_stop_the_node(bad: bytes) -> None:
    async def scenario(env: Env) -> None:
        async with env.running():
            env.link.send(f"MOL.REQ.{ME}", bad)
            env.link.send("MOL.UNKNOWN", {"ver": "4", "sender": PEER})
            await env.settle()
            assert env.metric("presenced_broker_malformed_packets_total",
                              kind="undecodable") == 1

    run(scenario)


json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=10,
)
packet_fields = st.fixed_dictionaries(
    {"ver": st.sampled_from(["4", "4", "4", "3", 4]),
     "sender": st.sampled_from([PEER, PEER, PEER, "", 7, None])},
    optional={
        "id": json_junk, "action": st.sampled_from(["presence.echo", "presence.boom", "x"])
        | json_junk, "params": json_junk, "meta": json_junk, "event": json_junk,
        "data": json_junk, "services": json_junk, "instanceID": json_junk, "seq": json_junk,
        "time": json_junk,
    },
)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(
    [f"MOL.REQ.{ME}", f"MOL.EVENT.{ME}", "MOL.INFO", f"MOL.INFO.{ME}", "MOL.HEARTBEAT",
     "MOL.DISCOVER", "MOL.DISCONNECT", f"MOL.PING.{ME}", f"MOL.PONG.{ME}", f"MOL.RES.{ME}"]
), packet_fields), min_size=1, max_size=8))
def test_no_packet_stops_the_node(packets: list[tuple[str, dict[str, Any]]]) -> None:
    """Whatever the other nodes send, the node keeps answering requests."""

    async def scenario(env: Env) -> None:
        async with env.running():
            for subj, packet in packets:
                env.link.send(subj, packet)
            await env.settle()
            env.link.take()
            env.link.send(f"MOL.REQ.{ME}", {"ver": "4", "sender": "probe", "id": "last",
                                            "action": "presence.echo", "params": [1]})
            await env.settle()
            (res,) = env.link.sent("MOL.RES.probe")
            assert res["success"] is True and res["data"] == {"params": [1]}

    run(scenario)


def test_requests_with_a_repeated_missing_or_odd_id_are_each_answered() -> None:
    async def scenario(env: Env) -> None:
        async with env.running():
            env.link.take()
            for rid in ("same", "same", None, None, ["a", "list"], {"an": "object"}):
                packet: dict[str, Any] = {"ver": "4", "sender": PEER, "action": "presence.echo",
                                          "params": []}
                if rid is not None:
                    packet["id"] = rid
                env.link.send(f"MOL.REQ.{ME}", packet)
            await env.settle()
            answers = env.link.sent(f"MOL.RES.{PEER}")
            assert len(answers) == 6 and all(a["success"] for a in answers)

    run(scenario)
