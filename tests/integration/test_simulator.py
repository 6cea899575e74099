"""The Rocket.Chat traffic simulator writes exactly what Rocket.Chat writes.

Each test reads MongoDB back through pymongo (the emulator by default, a real replica set
when PRESENCED_TEST_MONGO_URL is set) and checks the documents' exact shape. Time comes from
a fake clock that starts at the real current time, so a real server's TTL monitor never
sees the simulated instances as expired while a test runs.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson.codec_options import CodecOptions
from pymongo.database import Database

from presenced.testing.simulator import (
    RocketChatSimulator,
    TickStats,
    TrafficProfile,
    WriteCounts,
    utc_now_ms,
)

ID_ALPHABET = set("23456789ABCDEFGHJKLMNPQRSTWXYZabcdefghijkmnopqrstuvwxyz")
AWARE: CodecOptions[dict[str, Any]] = CodecOptions(tz_aware=True, tzinfo=UTC)

# Busy enough that a few hundred simulated seconds exercise every kind of write.
BUSY = TrafficProfile(
    offline_before_login=30.0,
    extra_device=60.0,
    online_before_away=60.0,
    away_before_back=30.0,
    connection_lifetime=200.0,
    repeat_login=600.0,
)


class FakeClock:
    def __init__(self, start: datetime | None = None) -> None:
        self.now = start if start is not None else utc_now_ms()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


Db = Database[dict[str, Any]]


def documents(db: Db, collection: str) -> dict[Any, dict[str, Any]]:
    return {d["_id"]: d for d in db.get_collection(collection, codec_options=AWARE).find()}


def session(db: Db, user_id: str) -> dict[str, Any] | None:
    return db.get_collection("usersSessions", codec_options=AWARE).find_one({"_id": user_id})


def everything(db: Db) -> dict[str, dict[Any, dict[str, Any]]]:
    return {name: documents(db, name) for name in ("users", "usersSessions", "instances")}


def run_ticks(sim: RocketChatSimulator, clock: FakeClock, n: int) -> list[TickStats]:
    out = []
    for _ in range(n):
        clock.advance(1.0)
        out.append(sim.tick(1.0))
    return out


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(db: Db, clock: FakeClock) -> RocketChatSimulator:
    s = RocketChatSimulator(db, users=5, instances=2, seed=7, clock=clock)
    s.setup()
    return s


def entry(cid: str, iid: str, status: str, created: datetime, updated: datetime) -> dict[str, Any]:
    return {
        "id": cid,
        "instanceId": iid,
        "status": status,
        "_createdAt": created,
        "_updatedAt": updated,
    }


# ---------------------------------------------------------------------------- setup


def test_setup_creates_users_with_rocketchat_fields(db: Db, clock: FakeClock) -> None:
    sim = RocketChatSimulator(db, users=50, seed=1, clock=clock)
    sim.setup()
    users = documents(db, "users")
    assert set(users) == set(sim.user_ids)
    for user in users.values():
        assert user["type"] == "user"
        assert user["roles"] == ["user"]
        assert user["active"] is True
        assert user["username"].startswith("user")
        assert user.get("statusDefault", "online") in {"online", "away", "busy", "offline"}
        assert len(user.get("statusText", "")) <= 120


def test_setup_creates_users_offline(db: Db, clock: FakeClock) -> None:
    RocketChatSimulator(db, users=20, clock=clock).setup()
    for user in documents(db, "users").values():
        assert (user["status"], user["statusConnection"]) == ("offline", "offline")


def test_setup_gives_some_users_a_chosen_status_and_a_status_text(db: Db, clock: FakeClock) -> None:
    RocketChatSimulator(db, users=50, seed=0, clock=clock).setup()
    users = documents(db, "users").values()
    assert {u["statusDefault"] for u in users if "statusDefault" in u} >= {"busy", "away"}
    assert any("statusText" in u for u in users)


def test_user_ids_look_like_rocketchat_ids(db: Db, clock: FakeClock) -> None:
    sim = RocketChatSimulator(db, users=20, clock=clock)
    assert len(set(sim.user_ids)) == 20
    for uid in sim.user_ids:
        assert len(uid) == 17
        assert set(uid) <= ID_ALPHABET


def test_setup_creates_instance_documents(db: Db, clock: FakeClock) -> None:
    sim = RocketChatSimulator(db, users=1, instances=3, clock=clock)
    sim.setup()
    instances = documents(db, "instances")
    assert len(instances) == 3
    for iid, doc in instances.items():
        assert str(uuid.UUID(iid)) == iid
        assert set(doc) == {"_id", "name", "pid", "_createdAt", "_updatedAt", "extraInformation"}
        assert isinstance(doc["pid"], int)
        assert doc["_createdAt"] == doc["_updatedAt"] == clock.now
        assert set(doc["extraInformation"]) == {"host", "port", "conns"}
    assert instances == sim.instance_documents()


def test_setup_creates_ttl_index_on_instances_updated_at(sim: RocketChatSimulator, db: Db) -> None:
    ttl = [i for i in db["instances"].index_information().values() if "expireAfterSeconds" in i]
    assert len(ttl) == 1
    assert ttl[0]["key"] == [("_updatedAt", 1)]
    assert ttl[0]["expireAfterSeconds"] == 60


def test_setup_creates_rocketchat_users_sessions_indexes(sim: RocketChatSimulator, db: Db) -> None:
    indexes = {tuple(i["key"]): i for i in db["usersSessions"].index_information().values()}
    assert indexes[(("connections.id", 1),)].get("sparse") is True
    assert indexes[(("connections.instanceId", 1),)].get("sparse") is True


def test_setup_twice_changes_nothing(sim: RocketChatSimulator, db: Db, clock: FakeClock) -> None:
    before = everything(db)
    indexes = {c: db[c].index_information() for c in ("instances", "usersSessions")}
    clock.advance(5)
    sim.setup()
    assert everything(db) == before
    assert {c: db[c].index_information() for c in indexes} == indexes


def test_setup_again_keeps_the_status_the_daemon_wrote(sim: RocketChatSimulator, db: Db) -> None:
    uid = sim.user_ids[0]
    db["users"].update_one({"_id": uid}, {"$set": {"status": "busy", "statusConnection": "online"}})
    sim.setup()
    user = db["users"].find_one({"_id": uid})
    assert user is not None
    assert (user["status"], user["statusConnection"]) == ("busy", "online")


# ---------------------------------------------------------------------------- connect


def test_connect_upserts_a_session_with_one_online_connection(
    sim: RocketChatSimulator, db: Db, clock: FakeClock
) -> None:
    uid = sim.user_ids[0]
    iid = sim.live_instance_ids()[0]
    cid = sim.connect(uid, iid)
    assert session(db, uid) == {
        "_id": uid,
        "connections": [entry(cid, iid, "online", clock.now, clock.now)],
    }


def test_connect_appends_to_existing_connections(
    sim: RocketChatSimulator, db: Db, clock: FakeClock
) -> None:
    uid = sim.user_ids[0]
    first_at = clock.now
    first = sim.connect(uid, sim.live_instance_ids()[0])
    clock.advance(3)
    second = sim.connect(uid, sim.live_instance_ids()[1], status="away")
    assert session(db, uid) == {
        "_id": uid,
        "connections": [
            entry(first, sim.live_instance_ids()[0], "online", first_at, first_at),
            entry(second, sim.live_instance_ids()[1], "away", clock.now, clock.now),
        ],
    }


def test_connection_ids_look_like_ddp_session_ids(sim: RocketChatSimulator) -> None:
    cid = sim.connect(sim.user_ids[0])
    assert len(cid) == 17
    assert set(cid) <= ID_ALPHABET


def test_connect_without_instance_picks_a_live_one(sim: RocketChatSimulator, db: Db) -> None:
    sim.crash_instance(sim.live_instance_ids()[0])
    uid = sim.user_ids[0]
    sim.connect(uid)
    doc = session(db, uid)
    assert doc is not None
    assert doc["connections"][0]["instanceId"] == sim.live_instance_ids()[0]


def test_connect_to_a_crashed_instance_is_refused(sim: RocketChatSimulator) -> None:
    iid = sim.live_instance_ids()[0]
    sim.crash_instance(iid)
    with pytest.raises(ValueError, match="crashed"):
        sim.connect(sim.user_ids[0], iid)


def test_connect_with_an_unknown_status_is_refused(sim: RocketChatSimulator) -> None:
    with pytest.raises(ValueError, match="online, away, busy"):
        sim.connect(sim.user_ids[0], status="offline")


# ---------------------------------------------------------------------------- disconnect


def test_disconnect_removes_that_connection_only(
    sim: RocketChatSimulator, db: Db, clock: FakeClock
) -> None:
    uid = sim.user_ids[0]
    iid = sim.live_instance_ids()[0]
    kept = sim.connect(uid, iid)
    gone = sim.connect(uid, iid)
    assert sim.disconnect(gone) == 1
    assert session(db, uid) == {
        "_id": uid,
        "connections": [entry(kept, iid, "online", clock.now, clock.now)],
    }


def test_disconnect_removes_every_duplicate_entry(sim: RocketChatSimulator, db: Db) -> None:
    uid = sim.user_ids[0]
    cid = sim.connect(uid)
    sim.repeat_login(uid, cid)
    sim.disconnect(cid)
    assert session(db, uid) == {"_id": uid, "connections": []}


def test_disconnect_keeps_the_emptied_session_document(sim: RocketChatSimulator, db: Db) -> None:
    uid = sim.user_ids[0]
    sim.disconnect(sim.connect(uid))
    assert session(db, uid) == {"_id": uid, "connections": []}


def test_disconnect_of_an_unknown_connection_modifies_nothing(
    sim: RocketChatSimulator, db: Db
) -> None:
    sim.connect(sim.user_ids[0])
    before = everything(db)
    assert sim.disconnect("NoSuchConnection1") == 0
    assert everything(db) == before


# ---------------------------------------------------------------------------- status, heartbeat


def test_set_status_changes_only_that_connections_status_and_updated_at(
    sim: RocketChatSimulator, db: Db, clock: FakeClock
) -> None:
    uid = sim.user_ids[0]
    iid = sim.live_instance_ids()[0]
    start = clock.now
    other = sim.connect(uid, iid)
    target = sim.connect(uid, iid)
    clock.advance(7)
    assert sim.set_status(uid, target, "away") is True
    assert session(db, uid) == {
        "_id": uid,
        "connections": [
            entry(other, iid, "online", start, start),
            entry(target, iid, "away", start, clock.now),
        ],
    }


def test_set_status_changes_every_duplicate_entry_of_that_connection(
    sim: RocketChatSimulator, db: Db, clock: FakeClock
) -> None:
    uid = sim.user_ids[0]
    cid = sim.connect(uid)
    sim.repeat_login(uid, cid)
    clock.advance(2)
    sim.set_status(uid, cid, "busy")
    doc = session(db, uid)
    assert doc is not None
    assert [(c["status"], c["_updatedAt"]) for c in doc["connections"]] == [
        ("busy", clock.now),
        ("busy", clock.now),
    ]


def test_set_status_with_an_unknown_status_is_refused(sim: RocketChatSimulator) -> None:
    uid = sim.user_ids[0]
    with pytest.raises(ValueError, match="connection status"):
        sim.set_status(uid, sim.connect(uid), "idle")


def test_heartbeat_changes_only_that_connections_updated_at(
    sim: RocketChatSimulator, db: Db, clock: FakeClock
) -> None:
    uid = sim.user_ids[0]
    iid = sim.live_instance_ids()[0]
    start = clock.now
    target = sim.connect(uid, iid)
    other = sim.connect(uid, iid)
    clock.advance(45)
    assert sim.heartbeat(uid, target) is True
    assert session(db, uid) == {
        "_id": uid,
        "connections": [
            entry(target, iid, "online", start, clock.now),
            entry(other, iid, "online", start, start),
        ],
    }


def test_heartbeat_refreshes_only_the_first_duplicate_entry(
    sim: RocketChatSimulator, db: Db, clock: FakeClock
) -> None:
    uid = sim.user_ids[0]
    cid = sim.connect(uid)
    clock.advance(1)
    sim.repeat_login(uid, cid)
    repeated_at = clock.now
    clock.advance(30)
    sim.heartbeat(uid, cid)
    doc = session(db, uid)
    assert doc is not None
    assert [c["_updatedAt"] for c in doc["connections"]] == [clock.now, repeated_at]


def test_repeat_login_pushes_a_duplicate_entry(
    sim: RocketChatSimulator, db: Db, clock: FakeClock
) -> None:
    uid = sim.user_ids[0]
    iid = sim.live_instance_ids()[1]
    start = clock.now
    cid = sim.connect(uid, iid)
    clock.advance(4)
    sim.repeat_login(uid, cid)
    assert session(db, uid) == {
        "_id": uid,
        "connections": [
            entry(cid, iid, "online", start, start),
            entry(cid, iid, "online", clock.now, clock.now),
        ],
    }


# ---------------------------------------------------------------------------- instances


def test_instance_heartbeat_bumps_only_its_updated_at(
    sim: RocketChatSimulator, db: Db, clock: FakeClock
) -> None:
    iid, other = sim.live_instance_ids()
    before = documents(db, "instances")
    clock.advance(10)
    assert sim.instance_heartbeat(iid) is True
    after = documents(db, "instances")
    assert after[iid] == {**before[iid], "_updatedAt": clock.now}
    assert after[other] == before[other]


def test_shutdown_instance_pulls_its_connections_from_every_user(
    sim: RocketChatSimulator, db: Db, clock: FakeClock
) -> None:
    gone, kept = sim.live_instance_ids()
    alice, bob = sim.user_ids[:2]
    sim.connect(alice, gone)
    alice_kept = sim.connect(alice, kept)
    sim.connect(bob, gone)
    sim.connect(bob, gone)
    assert sim.shutdown_instance(gone) == 2
    assert documents(db, "usersSessions") == {
        alice: {
            "_id": alice,
            "connections": [entry(alice_kept, kept, "online", clock.now, clock.now)],
        },
        bob: {"_id": bob, "connections": []},
    }


def test_shutdown_instance_deletes_its_document(sim: RocketChatSimulator, db: Db) -> None:
    gone, kept = sim.live_instance_ids()
    sim.shutdown_instance(gone)
    assert set(documents(db, "instances")) == {kept}


def test_crash_instance_writes_nothing(sim: RocketChatSimulator, db: Db) -> None:
    iid = sim.live_instance_ids()[0]
    for uid in sim.user_ids:
        sim.connect(uid, iid)
    before = everything(db)
    dangling = sim.crash_instance(iid)
    assert len(dangling) == len(sim.user_ids)
    assert everything(db) == before


def test_crashed_instance_and_its_connections_stop_heartbeating(
    sim: RocketChatSimulator, db: Db, clock: FakeClock
) -> None:
    crashed = sim.live_instance_ids()[0]
    uid = sim.user_ids[0]
    cid = sim.connect(uid, crashed)
    sim.crash_instance(crashed)
    crashed_doc = documents(db, "instances")[crashed]
    run_ticks(sim, clock, 120)
    assert documents(db, "instances")[crashed] == crashed_doc
    doc = session(db, uid)
    assert doc is not None
    dangling = [c for c in doc["connections"] if c["id"] == cid]
    assert dangling == [
        entry(cid, crashed, "online", crashed_doc["_createdAt"], crashed_doc["_createdAt"])
    ]


def test_clients_of_a_crashed_instance_reconnect_to_a_live_one(
    sim: RocketChatSimulator, clock: FakeClock
) -> None:
    crashed, live = sim.live_instance_ids()
    uid = sim.user_ids[0]
    sim.connect(uid, crashed)
    sim.crash_instance(crashed)
    run_ticks(sim, clock, 20)
    assert uid in sim.connected_user_ids()
    assert {c.instance_id for c in sim.sessions()[uid]} >= {live}


# ---------------------------------------------------------------------------- users untouched


def test_actions_and_ticks_never_write_user_documents(db: Db, clock: FakeClock) -> None:
    sim = RocketChatSimulator(db, users=10, instances=3, seed=3, clock=clock, traffic=BUSY)
    sim.setup()
    before = documents(db, "users")
    uid = sim.user_ids[0]
    cid = sim.connect(uid)
    sim.set_status(uid, cid, "away")
    sim.heartbeat(uid, cid)
    sim.repeat_login(uid, cid)
    sim.disconnect(cid)
    run_ticks(sim, clock, 100)
    sim.reconnect_storm(5)
    iids = sim.live_instance_ids()
    sim.crash_instance(iids[0])
    sim.shutdown_instance(iids[1])
    run_ticks(sim, clock, 30)
    assert documents(db, "users") == before


# ---------------------------------------------------------------------------- ticks


def test_tick_before_setup_is_refused(db: Db, clock: FakeClock) -> None:
    with pytest.raises(RuntimeError, match=r"setup\(\)"):
        RocketChatSimulator(db, clock=clock).tick()


def test_ticks_keep_the_model_equal_to_mongodb(db: Db, clock: FakeClock) -> None:
    sim = RocketChatSimulator(
        db, users=30, instances=3, seed=11, clock=clock, traffic=BUSY, crash_after=150
    )
    sim.setup()
    run_ticks(sim, clock, 300)
    assert documents(db, "usersSessions") == sim.session_documents()
    assert documents(db, "instances") == sim.instance_documents()


def test_a_busy_run_makes_every_kind_of_connection_write(db: Db, clock: FakeClock) -> None:
    sim = RocketChatSimulator(db, users=30, seed=11, clock=clock, traffic=BUSY)
    sim.setup()
    run_ticks(sim, clock, 300)
    stats = sim.stats
    assert min(stats.connect, stats.disconnect, stats.set_status, stats.heartbeat) > 0
    assert stats.repeat_login > 0
    assert stats.instance_heartbeat > 0


def test_tick_stats_add_up_to_total_writes(db: Db, clock: FakeClock) -> None:
    sim = RocketChatSimulator(db, users=20, seed=5, clock=clock, traffic=BUSY)
    sim.setup()
    total = WriteCounts()
    for stats in run_ticks(sim, clock, 100):
        total = total + stats.writes
    assert total == sim.stats
    assert total.total > 0


def test_ticks_heartbeat_every_live_connection_within_60_seconds(db: Db, clock: FakeClock) -> None:
    sim = RocketChatSimulator(db, users=20, seed=2, clock=clock)
    sim.setup()
    for _ in range(240):
        clock.advance(1.0)
        sim.tick(1.0)
        for uid, entries in sim.sessions().items():
            live = set(sim.live_connection_ids(uid))
            firsts = {c.id: c for c in reversed(entries)}
            for cid in live:
                assert clock.now - firsts[cid].updated_at <= timedelta(seconds=60)
    assert sim.live_connection_ids()


def test_ticks_heartbeat_every_live_instance_every_10_seconds(db: Db, clock: FakeClock) -> None:
    sim = RocketChatSimulator(db, users=3, instances=3, clock=clock)
    sim.setup()
    run_ticks(sim, clock, 35)
    for doc in documents(db, "instances").values():
        assert clock.now - doc["_updatedAt"] < timedelta(seconds=10)
    assert sim.stats.instance_heartbeat == 3 * 3


def test_crash_after_crashes_one_instance_once(db: Db, clock: FakeClock) -> None:
    sim = RocketChatSimulator(db, users=10, instances=3, clock=clock, crash_after=30)
    sim.setup()
    crashed = [s.crashed_instances for s in run_ticks(sim, clock, 120) if s.crashed_instances]
    assert len(crashed) == 1
    assert len(crashed[0]) == 1
    assert len(sim.live_instance_ids()) == 2
    assert crashed[0][0] in documents(db, "instances")


def test_same_seed_and_clock_produce_the_same_documents(db: Db) -> None:
    start = utc_now_ms()
    runs = []
    for prefix in ("a_", "b_"):
        clock = FakeClock(start)
        sim = RocketChatSimulator(
            db,
            users=25,
            instances=3,
            seed=42,
            clock=clock,
            traffic=BUSY,
            crash_after=60,
            users_collection=f"{prefix}users",
            sessions_collection=f"{prefix}usersSessions",
            instances_collection=f"{prefix}instances",
        )
        sim.setup()
        stats = run_ticks(sim, clock, 200)
        runs.append(
            (
                stats,
                [documents(db, f"{prefix}{c}") for c in ("users", "usersSessions", "instances")],
            )
        )
    assert runs[0] == runs[1]


def test_different_seeds_produce_different_users(db: Db, clock: FakeClock) -> None:
    one = RocketChatSimulator(db, users=5, seed=1, clock=clock)
    two = RocketChatSimulator(db, users=5, seed=2, clock=clock)
    assert one.user_ids != two.user_ids


# ---------------------------------------------------------------------------- storm, run


def test_reconnect_storm_replaces_every_connection_of_the_chosen_users(
    sim: RocketChatSimulator, db: Db
) -> None:
    old = {uid: sim.connect(uid) for uid in sim.user_ids}
    result = sim.reconnect_storm(3)
    assert result.users == 3
    assert result.writes == WriteCounts(connect=3, disconnect=3)
    stormed = [uid for uid, cid in old.items() if cid not in sim.live_connection_ids()]
    assert len(stormed) == 3
    for uid in stormed:
        doc = session(db, uid)
        assert doc is not None
        assert [c["id"] for c in doc["connections"]] == list(sim.live_connection_ids(uid))
        assert old[uid] not in sim.live_connection_ids(uid)


def test_reconnect_storm_logs_in_offline_users_too(sim: RocketChatSimulator) -> None:
    result = sim.reconnect_storm(100)
    assert result.users == len(sim.user_ids)
    assert set(sim.connected_user_ids()) == set(sim.user_ids)


def test_run_ticks_until_stop_is_set(sim: RocketChatSimulator) -> None:
    stop = threading.Event()
    seen: list[TickStats] = []

    def on_tick(stats: TickStats) -> None:
        seen.append(stats)
        if len(seen) == 3:
            stop.set()

    sim.run(stop, speed=1e6, on_tick=on_tick)
    assert [s.tick for s in seen] == [1, 2, 3]


def test_run_returns_at_once_when_stop_is_already_set(sim: RocketChatSimulator) -> None:
    stop = threading.Event()
    stop.set()
    sim.run(stop, on_tick=lambda _: pytest.fail("ticked after stop"))
    assert sim.elapsed == 0.0


def test_run_refuses_a_speed_that_is_not_positive(sim: RocketChatSimulator) -> None:
    with pytest.raises(ValueError, match="speed"):
        sim.run(threading.Event(), speed=0)
