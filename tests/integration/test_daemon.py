"""End to end: ``presenced run`` as a subprocess against MongoDB, Rocket.Chat's writes in.

Each test gets its own database (the ``db`` fixture), starts the daemon on it with a clean
environment (see ``daemon_harness.DaemonProcess``), makes Rocket.Chat's presence writes
exactly as Rocket.Chat makes them (``presenced.testing.simulator``) and waits, polling every
50 ms against a deadline, until ``users`` shows what the spec
(``../shared/design/rocketchat-presence.md``) derives. Unless a test says otherwise the
daemon runs with CACHE_TTL=60 s and INSTANCE_TIMEOUT=3600 s (so neither rule fires by
accident) and SYNC_INTERVAL=200 ms. The daemon's stdout and stderr are printed when a test
fails.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bson.timestamp import Timestamp
from pymongo import MongoClient

from presenced import __version__
from presenced.testing.processes import free_port, with_database

from .daemon_harness import (
    DaemonProcess,
    Db,
    Repeat,
    RocketChat,
    wait_for,
)

ONLINE = ("online", "online")
AWAY = ("away", "away")
OFFLINE = ("offline", "offline")

Factory = Callable[..., DaemonProcess]


@pytest.fixture(params=["changestream", "oplog"])
def feed(request: pytest.FixtureRequest) -> str:
    """Every daemon test runs against both feeds, with the same expectations."""
    return str(request.param)


@pytest.fixture
def daemon(tmp_path: Path, mongo_url: str, db: Db, feed: str) -> Iterator[Factory]:
    """``daemon(**settings)`` makes a (not yet started) DaemonProcess on the test's
    database, following the ``feed`` parameter (FEED=oplog reads the same server's
    ``local`` database); every one made is stopped, and its output printed, at teardown."""
    made: list[DaemonProcess] = []
    feed_settings = {"FEED": feed}
    if feed == "oplog":
        feed_settings["MONGO_OPLOG_URL"] = with_database(mongo_url, "local")

    def make(**settings: str) -> DaemonProcess:
        d = DaemonProcess(
            tmp_path, with_database(mongo_url, db.name), **{**feed_settings, **settings}
        )
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture
def rc(db: Db) -> RocketChat:
    return RocketChat(db)


# --------------------------------------------------------------------- convergence


def test_a_user_who_connects_becomes_online(daemon: Factory, rc: RocketChat) -> None:
    uid = rc.add_user()
    d = daemon().start()
    rc.connect(uid)
    rc.wait_presence(uid, ONLINE, daemon=d)


def test_a_user_who_sets_away_becomes_away(daemon: Factory, rc: RocketChat) -> None:
    uid = rc.add_user()
    d = daemon().start()
    cid = rc.connect(uid)
    rc.wait_presence(uid, ONLINE, daemon=d)
    rc.set_status(uid, cid, "away")
    rc.wait_presence(uid, AWAY, daemon=d)


def test_a_user_whose_default_is_busy_shows_busy_while_connected(
    daemon: Factory, rc: RocketChat
) -> None:
    uid = rc.add_user(status_default="busy")
    d = daemon().start()
    rc.connect(uid)
    rc.wait_presence(uid, ("busy", "online"), daemon=d)


def test_a_user_who_disconnects_goes_offline(daemon: Factory, rc: RocketChat) -> None:
    uid = rc.add_user()
    d = daemon().start()
    cid = rc.connect(uid)
    rc.wait_presence(uid, ONLINE, daemon=d)
    rc.disconnect(cid)
    # CACHE_TTL is 60 s: only the disconnect itself can take the user offline this soon.
    rc.wait_presence(uid, OFFLINE, daemon=d)


def test_disconnecting_a_duplicated_connection_id_takes_the_user_offline(
    daemon: Factory, rc: RocketChat
) -> None:
    uid = rc.add_user()
    d = daemon().start()
    cid = rc.connect(uid)
    rc.repeat_login(uid, cid)  # a login repeated on one connection: two entries, one id
    assert rc.connection_ids(uid) == [cid, cid]
    rc.wait_presence(uid, ONLINE, daemon=d)
    rc.disconnect(cid)  # Rocket.Chat pulls every entry with that id
    rc.wait_presence(uid, OFFLINE, daemon=d)


def test_a_user_away_on_one_device_and_online_on_another_is_online(
    daemon: Factory, rc: RocketChat
) -> None:
    uid = rc.add_user()
    d = daemon().start()
    first = rc.connect(uid)
    rc.set_status(uid, first, "away")
    rc.wait_presence(uid, AWAY, daemon=d)
    rc.connect(uid)  # a second device, online
    rc.wait_presence(uid, ONLINE, daemon=d)


def test_start_reconciles_users_changed_before_the_daemon_ran(
    daemon: Factory, rc: RocketChat
) -> None:
    stuck = rc.add_user(status="online")  # left online by a crash, no connection at all
    waiting = rc.add_user()  # connected, never derived
    rc.connect(waiting)
    d = daemon().start()
    rc.wait_presence(stuck, OFFLINE, daemon=d)
    rc.wait_presence(waiting, ONLINE, daemon=d)


# --------------------------------------------------------------------- expiry


# Timers do not depend on the feed: these real-time checks run on one. The millisecond
# boundaries (CACHE_TTL, INSTANCE_TIMEOUT) are tested under MockClock in
# tests/unit/test_daemon.py.
ONE_FEED = pytest.mark.parametrize("feed", ["changestream"])


@pytest.mark.slow
@ONE_FEED
def test_a_user_whose_heartbeats_stop_goes_offline_cache_ttl_after_the_last_one(
    daemon: Factory, rc: RocketChat
) -> None:
    ttl = 3
    uid = rc.add_user()
    d = daemon(CACHE_TTL=str(ttl)).start()
    cid = rc.connect(uid)
    rc.wait_presence(uid, ONLINE, timeout=ttl - 0.5, daemon=d)
    expires = rc.connection_updated_at(uid, cid).timestamp() + ttl
    # From here Rocket.Chat writes nothing: only the daemon's timer can take the user off.
    wait_for(lambda: rc.presence(uid)[0] == "offline", ttl + 5, "status offline", daemon=d)
    went_offline = time.time()
    print(f"offline {went_offline - expires:+.3f} s from _updatedAt + CACHE_TTL")
    assert rc.presence(uid) == OFFLINE
    # A connection exactly CACHE_TTL old still counts: never early (50 ms of clock slack),
    # at most a second late (the write and our 50 ms poll included).
    assert expires - 0.05 <= went_offline <= expires + 1.0, (
        f"offline {went_offline - expires:+.3f} s from _updatedAt + CACHE_TTL"
    )


# --------------------------------------------------------------------- dead instances


@pytest.mark.slow
def test_users_of_an_instance_whose_document_is_removed_go_offline(
    daemon: Factory, rc: RocketChat
) -> None:
    sync = 0.3
    gone, alive = rc.instance_ids
    lost, kept = rc.add_user(), rc.add_user()
    d = daemon(SYNC_INTERVAL=str(int(sync * 1000))).start()
    rc.connect(lost, gone)
    rc.connect(kept, alive)
    rc.wait_presence(lost, ONLINE, daemon=d)
    rc.wait_presence(kept, ONLINE, daemon=d)
    # The instance's document disappears (as the TTL index removes a crashed instance's);
    # its connections stay in usersSessions, fresh (CACHE_TTL is 60 s).
    removed = time.monotonic()
    rc.remove_instance_document(gone)
    rc.wait_presence(lost, OFFLINE, timeout=sync + 5, daemon=d)
    took = time.monotonic() - removed
    print(f"offline {took:.3f} s after the instance's document was removed")
    assert took <= sync + 1.0, f"offline {took:.2f} s after the instance's document went"
    assert rc.presence(kept) == ONLINE


# --------------------------------------------------------------------- the reaper


@pytest.mark.slow
@ONE_FEED
def test_the_reaper_removes_a_stale_connection_and_keeps_a_heartbeated_one(
    daemon: Factory, rc: RocketChat
) -> None:
    ttl = 2
    uid, other = rc.add_user(), rc.add_user()
    d = daemon(CACHE_TTL=str(ttl), SYNC_INTERVAL="200").start()
    fresh = rc.connect(uid)
    stale = rc.connect(uid)
    assert rc.connection_ids(uid) == [fresh, stale]
    seen: set[tuple[Any, Any]] = set()

    def ids_of(user_id: str) -> list[str]:
        seen.add(rc.presence(uid))
        return rc.connection_ids(user_id)

    # The client of `fresh` heartbeats every 250 ms (8 times per CACHE_TTL), each
    # heartbeat racing the reaper, which runs every 200 ms; `stale` never heartbeats.
    with Repeat(lambda: rc.heartbeat(uid, fresh), 0.25):
        rc.wait_presence(uid, ONLINE, daemon=d)
        wait_for(lambda: ids_of(uid) == [fresh], ttl + 5, f"only {fresh} left", daemon=d)
        # Many reaper runs later: a connection opened now has gone stale and been reaped.
        marker = rc.connect(other)
        wait_for(lambda: marker not in ids_of(other), ttl + 5, "marker reaped", daemon=d)
        assert rc.connection_ids(uid) == [fresh]
        assert rc.presence(uid) == ONLINE
    assert seen == {ONLINE}, f"the user flapped: {seen}"


@pytest.mark.slow
def test_the_reaper_removes_the_connections_of_a_dead_instance(
    daemon: Factory, rc: RocketChat
) -> None:
    gone, alive = rc.instance_ids
    uid = rc.add_user()
    d = daemon().start()
    kept = rc.connect(uid, alive)
    dead = rc.connect(uid, gone)
    assert rc.connection_ids(uid) == [kept, dead]
    rc.wait_presence(uid, ONLINE, daemon=d)
    rc.remove_instance_document(gone)
    # CACHE_TTL is 60 s: both connections are fresh; only the instance rule marks `dead`.
    wait_for(lambda: rc.connection_ids(uid) == [kept], 5, f"only {kept} left", daemon=d)
    assert rc.presence(uid) == ONLINE


# --------------------------------------------------------------------- restart


@pytest.mark.slow
def test_a_restarted_daemon_applies_what_changed_while_it_was_down(
    daemon: Factory, rc: RocketChat
) -> None:
    early, late = rc.add_user(), rc.add_user()
    d = daemon().start()
    cid = rc.connect(early)
    rc.wait_presence(early, ONLINE, daemon=d)
    assert d.stop() == 0
    rc.disconnect(cid)
    rc.connect(late)
    d.start()
    rc.wait_presence(early, OFFLINE, daemon=d)
    rc.wait_presence(late, ONLINE, daemon=d)


def test_a_stopped_daemon_leaves_a_checkpoint(daemon: Factory, rc: RocketChat, db: Db) -> None:
    uid = rc.add_user()
    d = daemon().start()
    rc.connect(uid)
    rc.wait_presence(uid, ONLINE, daemon=d)
    assert d.stop() == 0
    checkpoints = list(db.presenced_checkpoints.find())
    assert checkpoints, "no document in presenced_checkpoints"


@pytest.mark.slow
@pytest.mark.emulator_only
def test_a_restart_after_the_history_was_lost_reconciles_everything(tmp_path: Path) -> None:
    from presenced.testing.mongo import MongoEmulator

    emulator = MongoEmulator(oplog_size=50)
    with emulator as url:
        client: MongoClient[dict[str, Any]] = MongoClient(url)
        try:
            rc = RocketChat(client["rocketchat"])
            uid, filler = rc.add_user(), rc.add_user()
            d = DaemonProcess(tmp_path, with_database(url, "rocketchat"))
            with d:
                d.start()
                rc.connect(filler)
                rc.wait_presence(filler, ONLINE, daemon=d)
                assert d.stop() == 0
                for _ in range(60):  # 120 writes: the oplog (50 entries) forgets the checkpoint
                    rc.disconnect(rc.connect(filler))
                rc.connect(uid)
                d.start()
                rc.wait_presence(uid, ONLINE, daemon=d)
                log = d.output()
                assert re.search(r"histor|lost", log, re.IGNORECASE), (
                    "the restart's output does not mention the lost history"
                )
                assert re.search(r"reconcil", log, re.IGNORECASE)
        finally:
            client.close()


# --------------------------------------------------------------------- writes


def test_no_write_for_a_user_whose_status_did_not_change(
    daemon: Factory, rc: RocketChat, db: Db, client: MongoClient[dict[str, Any]]
) -> None:
    uid, marker = rc.add_user(), rc.add_user()
    d = daemon().start()
    cid = rc.connect(uid)
    rc.wait_presence(uid, ONLINE, daemon=d)

    # Accounting, in `update` statements (serverStatus.opcounters.update) between two reads:
    #   Rocket.Chat:  1 heartbeat of `uid`            (its status cannot change: no write)
    #               + 1 connect of `marker`           (an upsert: an update statement)
    #   daemon:       1 write of `marker`'s status    (offline/offline -> online/online)
    #               + its own bookkeeping updates     (checkpoint upserts in presenced_*,
    #                                                  counted from the change stream)
    # Events are applied in order, so once `marker` shows online the heartbeat was handled.
    before = client.admin.command("serverStatus")
    rc.heartbeat(uid, cid)
    rc.connect(marker)
    rc.wait_presence(marker, ONLINE, daemon=d)
    after = client.admin.command("serverStatus")

    updates = after["opcounters"]["update"] - before["opcounters"]["update"]
    bookkeeping = _bookkeeping_writes(db, before["operationTime"], after["operationTime"])
    rocketchat_writes, daemon_writes_for_marker = 2, 1
    assert updates == rocketchat_writes + daemon_writes_for_marker + bookkeeping, (
        f"{updates} update statements; expected {rocketchat_writes} from Rocket.Chat,"
        f" {daemon_writes_for_marker} for the marker user, {bookkeeping} checkpoint saves"
    )


def _bookkeeping_writes(db: Db, start: Timestamp, end: Timestamp) -> int:
    """Writes to the daemon's own ``presenced_*`` collections with start < time <= end."""
    sentinel = db.test_sentinel.insert_one({}).inserted_id  # marks the end of the stream
    count = 0
    with db.watch(start_at_operation_time=start, max_await_time_ms=200) as stream:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            event = stream.try_next()
            if event is None:
                continue
            if event.get("documentKey", {}).get("_id") == sentinel:
                return count
            ts: Timestamp = event["clusterTime"]
            coll = event.get("ns", {}).get("coll", "")
            if start < ts <= end and coll.startswith("presenced_"):
                count += event["operationType"] in ("insert", "update", "replace")
    raise AssertionError("the change stream never showed the sentinel insert")


# --------------------------------------------------------------------- HTTP, signals, settings


def test_ready_reports_its_state_as_json(daemon: Factory, feed: str) -> None:
    d = daemon(INSTANCE_ID="presenced-e2e-1").start()
    answer = d.ready()
    assert answer is not None
    status, body = answer
    assert status == 200
    assert body["instance"] == "presenced-e2e-1"
    assert body["version"] == __version__
    assert body["feed"] == feed
    lag = body["lag_seconds"]
    assert isinstance(lag, int | float) and lag >= 0
    for name in ("users_tracked", "pending_writes"):
        assert isinstance(body[name], int) and body[name] >= 0, name
    assert "reason" not in body


def test_health_answers_200_with_json(daemon: Factory) -> None:
    d = daemon(INSTANCE_ID="presenced-e2e-2").start()
    answer = d.health()
    assert answer is not None
    status, body = answer
    assert status == 200
    assert body["instance"] == "presenced-e2e-2"
    assert body["version"] == __version__


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_daemon_with_exit_code_0(daemon: Factory, sig: int) -> None:
    d = daemon().start()
    assert d.stop(sig) == 0  # stop() fails the test if it takes more than 5 s


def test_a_signal_stops_the_daemon_within_5_s_while_mongodb_is_unreachable(
    tmp_path: Path,
) -> None:
    with DaemonProcess(tmp_path, "mongodb://127.0.0.1:1/rocketchat") as d:
        d.start(wait_ready=False)
        wait_for(d.health, 20, "GET /health answers", daemon=d)
        # Still trying to reach MongoDB: SIGTERM must not wait for the attempt to time out.
        assert d.stop(signal.SIGTERM) == 0  # stop() fails the test after 5 s


def test_an_unreachable_mongodb_is_healthy_but_not_ready(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, "mongodb://127.0.0.1:1/rocketchat") as d:
        d.start(wait_ready=False)
        answered = wait_for(d.health, 20, "GET /health answers", daemon=d)
        assert answered is not None
        status, health = answered
        assert status == 200, health
        answer = d.ready()
        assert answer is not None
        status, body = answer
        assert status == 503
        assert isinstance(body.get("reason"), str) and body["reason"]


@pytest.mark.parametrize(
    ("variable", "settings"),
    [
        ("CACHE_TTL", {"CACHE_TTL": "abc"}),
        ("MONGO_URL", {"MONGO_URL": "mongodb://127.0.0.1:27017/?replicaSet=rs0"}),
    ],
    ids=["CACHE_TTL=abc", "MONGO_URL-without-database"],
)
def test_a_bad_setting_exits_78_naming_the_variable(
    tmp_path: Path, mongo_url: str, variable: str, settings: dict[str, str]
) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "MONGO_URL": with_database(mongo_url, "rocketchat"),
        "HEALTH_CHECK_PORT": str(free_port()),
        "PORT": str(free_port()),
        **settings,
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "presenced", "run"], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=30,
    )
    took = time.monotonic() - started
    print(done.stdout, done.stderr)
    assert done.returncode == 78
    assert variable in done.stderr
    assert took < 10, f"took {took:.1f} s to refuse the settings"
