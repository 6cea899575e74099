"""The whole daemon with the broker, under MockClock: the presence service's actions on
the in-memory store, the presence.status announcements, and what the broker changes in
the instance rule. The broker's NATS link is a double (``broker_double``); the peers are
played by the test. The real peers are in ``tests/interop``."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from pymongo.errors import AutoReconnect, ServerSelectionTimeoutError

from presenced.broker.service import NO_CAP

from .broker_double import FakeLink
from .daemon_double import Env, run

ME = "presenced-t"
CALLER = "rc-ddp"
LISTENER = "rc-listener"
# The peers played here send no heartbeats: a long timeout keeps them (node loss by
# timeout is tested in test_broker_node.py and with real peers in tests/interop).
BROKER = {"TRANSPORTER": "nats://nats:4222", "INSTANCE_ID": ME, "HEARTBEAT_INTERVAL": "1",
          "HEARTBEAT_TIMEOUT": "3600"}
_ids = itertools.count()


def link(env: Env) -> FakeLink:
    assert env.broker.link is not None
    return env.broker.link


async def join(env: Env) -> None:
    """A caller node and a presence.status listener join the broker."""
    for node, events in ((CALLER, []), (LISTENER, ["presence.status"])):
        link(env).send("MOL.INFO", {
            "ver": "4", "sender": node, "instanceID": f"i-{node}", "seq": 1,
            "services": [{"name": f"svc-{node}", "actions": {},
                          "events": {e: {"name": e} for e in events}}],
        })
    await env.settle()
    link(env).take()


async def call(env: Env, action: str, params: Any) -> dict[str, Any]:
    """Call ``presence.<action>`` as the caller node; the RES packet."""
    rid = f"r{next(_ids)}"
    link(env).send(f"MOL.REQ.{ME}", {"ver": "4", "sender": CALLER, "id": rid,
                                     "action": f"presence.{action}", "params": params,
                                     "meta": {}, "timeout": 5000, "level": 1})
    await env.until(lambda: any(p.get("id") == rid for p in link(env).sent(f"MOL.RES.{CALLER}")))
    (res,) = [p for p in link(env).sent(f"MOL.RES.{CALLER}") if p.get("id") == rid]
    return res


def announced(env: Env) -> list[Any]:
    """The presence.status data sent to the listener since the last call; cleared."""
    out = [p["data"] for s, p in link(env).published if s == f"MOL.EVENT.{LISTENER}"]
    link(env).published = [(s, p) for s, p in link(env).published
                           if s != f"MOL.EVENT.{LISTENER}"]
    return out


def test_new_connection_writes_rocketchats_entry_and_announces_at_once() -> None:
    async def scenario(env: Env) -> None:
        env.store.add_user("u1", username="alice")
        env.store.set_user_fields("u1", statusText="hi")
        async with env.running():
            await join(env)
            res = await call(env, "newConnection", ["u1", "c1", CALLER])
            assert res["success"] is True
            assert res["data"] == {"uid": "u1", "connectionId": "c1"}
            (entry,) = env.store.sessions["u1"]["connections"]
            assert entry["id"] == "c1" and entry["instanceId"] == CALLER
            assert entry["status"] == "online"
            assert entry["_updatedAt"] == entry["_createdAt"]
            assert env.store.presence("u1") == ("online", "online")
            assert announced(env) == [[{
                "user": {"_id": "u1", "username": "alice", "status": "online",
                         "statusText": "hi", "roles": ["user"]},
                "previousStatus": "offline",
            }]]
            # The feed's own key for the same write changes nothing more.
            await env.after(2)
            assert announced(env) == []
            assert env.store.writes[-1].status == "online" and len(env.store.writes) == 1

    run(scenario, **BROKER)


@pytest.mark.parametrize("attempt", range(20))
def test_each_change_is_announced_once_when_a_feed_read_races_the_action(attempt: int) -> None:
    """The feed's read of a user starts before the action's status write is confirmed and
    answers after it: that read is stale, and must not plan (and announce) the same change
    a second time; and the action whose own load found that write under way waits for it.
    trio shuffles the order of tasks ready at once: the attempts try several orders."""

    async def scenario(env: Env) -> None:
        env.store.add_user("u1", username="alice")
        env.store.connect("u1", "c1", CALLER, env.now(), status="away")
        async with env.running():
            await join(env)
            announced(env)
            env.late["load_users"] = 0.5  # every users read answers 0.5 s late
            res = await call(env, "setStatus", ["u1", "busy", "meeting"])
            assert res["data"] is True
            await env.after(5)
            assert env.store.presence("u1") == ("busy", "away")
            data = announced(env)
            assert [d[0]["user"]["status"] for d in data] == ["busy"], data

    run(scenario, **BROKER)


def test_status_text_alone_is_announced_and_toggle_broadcast_silences() -> None:
    async def scenario(env: Env) -> None:
        env.store.add_user("u1", username="alice")
        env.store.connect("u1", "c1", CALLER, env.now())
        async with env.running():
            await join(env)
            announced(env)
            assert (await call(env, "setStatus", ["u1", "online", "coffee"]))["data"] is True
            assert announced(env) == [[{
                "user": {"_id": "u1", "username": "alice", "status": "online",
                         "statusText": "coffee", "roles": ["user"]},
                "previousStatus": "online",
            }]]
            assert (await call(env, "setStatus", ["u1", "online", "coffee"]))["data"] is False
            assert announced(env) == []
            assert "data" not in await call(env, "toggleBroadcast", [False])
            assert (await call(env, "setStatus", ["u1", "away", None]))["data"] is True
            assert env.store.presence("u1") == ("away", "online")
            assert announced(env) == []
            await call(env, "toggleBroadcast", [True])
            assert (await call(env, "setStatus", ["u1", "busy", None]))["data"] is True
            assert [d[0]["user"]["status"] for d in announced(env)] == ["busy"]

    run(scenario, **BROKER)


def test_transitions_caused_by_time_are_announced_too() -> None:
    async def scenario(env: Env) -> None:
        env.store.add_user("u1", username="alice")
        async with env.running():
            await join(env)
            await call(env, "newConnection", ["u1", "c1", CALLER])
            t0 = env.now()
            announced(env)
            await env.at(t0 + env.ttl_ms + 1)
            (data,) = announced(env)
            assert data[0]["user"]["status"] == "offline"
            assert data[0]["previousStatus"] == "online"

    run(scenario, **BROKER)


def test_counts_come_from_the_engine_with_no_cap() -> None:
    async def scenario(env: Env) -> None:
        for uid in ("u1", "u2"):
            env.store.add_user(uid)
        async with env.running():
            await join(env)
            await call(env, "newConnection", ["u1", "c1", CALLER])
            await call(env, "newConnection", ["u2", "c2", CALLER])
            await call(env, "newConnection", ["u2", "c3", CALLER])
            count = await call(env, "getConnectionCount", [])
            assert count["data"] == {"current": 3, "max": NO_CAP}
            await call(env, "removeConnection", ["u2", "c3", CALLER])
            assert (await call(env, "getConnectionCount", []))["data"]["current"] == 2
            assert (await call(env, "getPeakConnections", [True]))["data"] == 3
            assert (await call(env, "getPeakConnections", []))["data"] == 2

    run(scenario, **BROKER)


def test_a_lost_node_takes_its_connections_and_only_its() -> None:
    async def scenario(env: Env) -> None:
        for uid in ("u1", "u2"):
            env.store.add_user(uid)
        async with env.running():
            await join(env)
            await call(env, "newConnection", ["u1", "c1", CALLER])
            await call(env, "newConnection", ["u2", "c2", "other-ddp"])
            announced(env)
            link(env).send("MOL.DISCONNECT", {"ver": "4", "sender": CALLER})
            await env.after(1)
            assert env.store.connection_ids("u1") == []
            assert env.store.connection_ids("u2") == ["c2"]
            assert env.store.presence("u1") == ("offline", "offline")
            assert env.store.presence("u2") == ("online", "online")
            assert [d[0]["user"]["_id"] for d in announced(env)] == ["u1"]

    run(scenario, **BROKER)


def test_remove_lost_connections_without_a_node_keeps_the_live_nodes() -> None:
    async def scenario(env: Env) -> None:
        for uid in ("u1", "u2", "u3"):
            env.store.add_user(uid)
        async with env.running():
            await join(env)
            await call(env, "newConnection", ["u1", "c1", CALLER])
            await call(env, "newConnection", ["u2", "c2", ME])
            await call(env, "newConnection", ["u3", "c3", "gone-ddp"])
            res = await call(env, "removeLostConnections", [])
            assert res["data"] == ["u3"]
            assert env.store.connection_ids("u1") == ["c1"]
            assert env.store.connection_ids("u2") == ["c2"]
            assert env.store.presence("u3") == ("offline", "offline")

    run(scenario, **BROKER)


def test_with_the_broker_a_node_missing_from_instances_is_not_dead() -> None:
    """ddp-streamers are broker nodes, not ``instances`` documents: their connections
    count while the collection lists only the Meteor instances."""

    async def scenario(env: Env) -> None:
        env.store.instance_heartbeat("meteor-1", env.now())
        env.store.add_user("u1")
        async with env.running():
            await join(env)
            await call(env, "newConnection", ["u1", "c1", CALLER])
            await env.after(5)
            assert env.store.presence("u1") == ("online", "online")
            assert env.store.connection_ids("u1") == ["c1"]

    run(scenario, **BROKER)


def test_without_the_broker_the_contracts_instance_rule_holds() -> None:
    async def scenario(env: Env) -> None:
        env.store.instance_heartbeat("meteor-1", env.now())
        env.store.add_user("u1")
        env.store.connect("u1", "c1", "unlisted", env.now())
        async with env.running():
            assert env.store.presence("u1") == ("offline", "offline")
            assert env.broker.link is None

    run(scenario)


def test_bad_arguments_and_a_failing_database_answer_moleculer_errors() -> None:
    async def scenario(env: Env) -> None:
        env.store.add_user("u1")
        async with env.running():
            await join(env)
            bad = await call(env, "setStatus", ["u1", "sleepy"])
            assert bad["success"] is False
            assert bad["error"]["name"] == "ValidationError"
            assert bad["error"]["code"] == 422
            assert "statusDefault must be one of" in bad["error"]["message"]
            assert (await call(env, "newConnection", "not-an-array"))["error"]["code"] == 422
            assert (await call(env, "newConnection", [None, "c1", CALLER]))["success"]
            env.store.fail("add_connection", ServerSelectionTimeoutError(
                "127.0.0.1:1: [Errno 111] Connection refused, Timeout: 5s, Topology Description:"
                " <TopologyDescription ...>"))
            down = await call(env, "newConnection", ["u1", "c1", CALLER])
            assert down["error"]["name"] == "MongoServerSelectionError"
            assert down["error"]["retryable"] is True
            assert "Topology" not in down["error"]["message"]
            env.store.fail("remove_connection", AutoReconnect("connection reset"))
            lost = await call(env, "removeConnection", ["u1", "c9", CALLER])
            assert lost["error"]["name"] == "MongoNetworkError"
            # The service goes on.
            ok = await call(env, "newConnection", ["u1", "c1", CALLER])
            assert ok["data"] == {"uid": "u1", "connectionId": "c1"}

    run(scenario, **BROKER)


def test_ready_shows_the_broker_and_stays_ready_without_it() -> None:
    async def scenario(env: Env) -> None:
        env.broker = type(env.broker)(connect=False)
        env.daemon._broker_link = env.broker
        async with env.running():
            ok, body = env.daemon.health.readiness()
            assert ok
            assert body["broker"]["connected"] is False
            assert body["broker"]["transporter"] == "nats://nats:4222"
            assert env.metric("presenced_broker_connected") == 0
            link(env).allow_connect()
            await env.settle()
            ok, body = env.daemon.health.readiness()
            assert ok and body["broker"]["connected"] is True
            assert env.metric("presenced_broker_connected") == 1

    run(scenario, **BROKER)


def test_a_failing_broker_node_is_restarted_and_presence_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from presenced.broker.node import BrokerNode
    from presenced.daemon import BROKER_RESTART_S

    real_announce = BrokerNode._announce
    failures = [RuntimeError("a bug in the node")]

    def announce(self: BrokerNode) -> None:
        if failures:
            raise failures.pop()
        real_announce(self)

    monkeypatch.setattr(BrokerNode, "_announce", announce)

    async def scenario(env: Env) -> None:
        env.store.add_user("u1")
        env.store.connect("u1", "c1", None, env.now())
        async with env.running():
            assert env.store.presence("u1") == ("online", "online")
            assert env.lines("ERROR", "the service broker node failed")
            await env.after(BROKER_RESTART_S)
            assert env.daemon.broker is not None and env.daemon.broker.connected
            await join(env)
            res = await call(env, "getConnectionCount", [])
            assert res["data"]["current"] == 1

    run(scenario, **BROKER)


def test_a_burst_of_actions_shares_bulk_loads_and_each_gets_its_answer() -> None:
    async def scenario(env: Env) -> None:
        users = [f"u{i}" for i in range(50)]
        for uid in users:
            env.store.add_user(uid)
        async with env.running():
            await join(env)
            announced(env)
            env.delays["load_users"] = 0.01  # a read takes 10 ms
            before = env.store.calls["load_users"]
            for i, uid in enumerate(users):
                link(env).send(f"MOL.REQ.{ME}", {
                    "ver": "4", "sender": CALLER, "id": f"burst{i}",
                    "action": "presence.newConnection", "params": [uid, f"c-{uid}", CALLER]})
            await env.until(lambda: len(link(env).sent(f"MOL.RES.{CALLER}")) >= 50)
            answers = {p["id"]: p for p in link(env).sent(f"MOL.RES.{CALLER}")}
            assert all(answers[f"burst{i}"]["data"] == {"uid": uid, "connectionId": f"c-{uid}"}
                       for i, uid in enumerate(users))
            assert all(env.store.presence(uid) == ("online", "online") for uid in users)
            # The actions' loads: a few batches, not one read each (the feed's keys for the
            # same writes add their own, also batched).
            assert env.store.calls["load_users"] - before <= 10
            assert sorted(d[0]["user"]["_id"] for d in announced(env)) == sorted(users)

    run(scenario, **BROKER)


def test_start_up_reconciliation_is_announced_to_the_nodes_already_listening() -> None:
    async def scenario(env: Env) -> None:
        env.store.add_user("u1", username="alice")
        env.store.connect("u1", "c1", CALLER, env.now())
        env.broker.connect_delay = 0.05  # NATS answers in 50 ms
        env.broker.greeting = [("MOL.INFO", {
            "ver": "4", "sender": LISTENER, "instanceID": "i-l", "seq": 1,
            "services": [{"name": "l", "actions": {},
                          "events": {"presence.status": {"name": "presence.status"}}}],
        })]
        async with env.running():
            assert env.store.presence("u1") == ("online", "online")
            assert announced(env) == [[{
                "user": {"_id": "u1", "username": "alice", "status": "online",
                         "roles": ["user"]},
                "previousStatus": "offline",
            }]]

    run(scenario, **BROKER)


def test_a_heartbeat_derives_at_once_only_when_it_can_change_the_answer() -> None:
    async def scenario(env: Env) -> None:
        env.store.add_user("u1")
        async with env.running():
            await join(env)
            await call(env, "newConnection", ["u1", "c1", CALLER])
            await env.after(1)
            before = env.store.calls["load_sessions"]
            res = await call(env, "updateConnection", ["u1", "c1"])
            assert res["data"] == {"uid": "u1", "connectionId": "c1"}
            await env.after(1)
            assert env.store.calls["load_sessions"] - before == 1  # the feed's key only
            # A user the engine does not hold (evicted, say): derived at once.
            env.daemon.engine.forget("u1")
            before = env.store.calls["load_sessions"]
            await call(env, "updateConnection", ["u1", "c1"])
            await env.after(1)
            assert env.store.calls["load_sessions"] - before == 2  # the action's and the feed's
            assert "u1" in env.daemon.engine

    run(scenario, **BROKER)
