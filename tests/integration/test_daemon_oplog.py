"""The daemon on the oplog feed (FEED=oplog, MONGO_OPLOG_URL = the replica set's `local`).

The shared behaviour runs against both feeds in test_daemon.py; these are the oplog-only
points: resuming by `ts`, a position that fell out of the oplog, a transaction's single
applyOps entry, and the start-up checks on MONGO_OPLOG_URL.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from bson.timestamp import Timestamp
from pymongo import MongoClient

from presenced.testing.processes import with_database

from .daemon_harness import DaemonProcess, Db, RocketChat, wait_for

ONLINE = ("online", "online")


def now() -> datetime:
    """Wall time at BSON's millisecond precision, as Rocket.Chat writes it."""
    t = datetime.now(UTC)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)



def oplog_settings(mongo_url: str) -> dict[str, str]:
    return {"FEED": "oplog", "MONGO_OPLOG_URL": with_database(mongo_url, "local")}


@pytest.fixture
def oplog_daemon(tmp_path: Path, mongo_url: str, db: Db) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path, with_database(mongo_url, db.name), **oplog_settings(mongo_url))
    yield d
    d.close()


def test_a_restart_resumes_from_the_checkpointed_oplog_timestamp(
    oplog_daemon: DaemonProcess, db: Db
) -> None:
    rc = RocketChat(db)
    seen, missed = rc.add_user(), rc.add_user()
    oplog_daemon.start()
    rc.connect(seen)
    rc.wait_presence(seen, ONLINE, daemon=oplog_daemon)
    assert oplog_daemon.stop() == 0
    checkpoint = db.presenced_checkpoints.find_one({"_id": f"oplog:{db.name}"})
    assert checkpoint is not None and isinstance(checkpoint["position"], Timestamp)
    rc.connect(missed)  # while presenced is down
    oplog_daemon.start()
    rc.wait_presence(missed, ONLINE, daemon=oplog_daemon)
    assert "resumed from the checkpoint" in oplog_daemon.output()


def test_a_transaction_touching_several_users_converges_all_of_them(
    oplog_daemon: DaemonProcess, db: Db, client: MongoClient[dict[str, Any]]
) -> None:
    rc = RocketChat(db)
    users = [rc.add_user() for _ in range(3)]
    oplog_daemon.start()
    with client.start_session() as session, session.start_transaction():
        for i, uid in enumerate(users):
            db.usersSessions.update_one(
                {"_id": uid},
                {"$push": {"connections": {
                    "id": f"tx-{i}", "instanceId": rc.instance_ids[0], "status": "online",
                    "_createdAt": now(), "_updatedAt": now(),
                }}},
                upsert=True, session=session,
            )
    for uid in users:
        rc.wait_presence(uid, ONLINE, daemon=oplog_daemon)


@pytest.mark.slow
@pytest.mark.emulator_only
def test_a_position_that_fell_out_of_the_oplog_leads_to_a_full_reconciliation(
    tmp_path: Path,
) -> None:
    from presenced.testing.mongo import MongoEmulator

    with MongoEmulator(oplog_size=50) as url:
        client: MongoClient[dict[str, Any]] = MongoClient(url)
        try:
            rc = RocketChat(client["rocketchat"])
            uid, filler = rc.add_user(), rc.add_user()
            with DaemonProcess(tmp_path, with_database(url, "rocketchat"),
                               **oplog_settings(url)) as d:
                d.start()
                rc.connect(filler)
                rc.wait_presence(filler, ONLINE, daemon=d)
                assert d.stop() == 0
                for _ in range(60):  # 120 entries: the 50-entry oplog forgets the checkpoint
                    rc.disconnect(rc.connect(filler))
                rc.connect(uid)
                d.start()
                rc.wait_presence(uid, ONLINE, daemon=d)
                log = d.output()
                assert re.search(r"no longer in MongoDB's history", log)
                assert re.search(r"reconciliation \(startup\) done", log)
        finally:
            client.close()


@pytest.mark.emulator_only
def test_an_oplog_url_on_a_standalone_server_exits_78_naming_it(
    tmp_path: Path, mongo_url: str
) -> None:
    from presenced.testing.mongo import MongoEmulator

    with MongoEmulator(replica_set=None) as standalone:
        d = DaemonProcess(tmp_path, with_database(mongo_url, "rocketchat"), FEED="oplog",
                          MONGO_OPLOG_URL=with_database(standalone, "local"))
        with d:
            d.start(wait_ready=False)
            assert d.proc is not None
            assert d.proc.wait(timeout=30) == 78
            err = d.output()
            assert "MONGO_OPLOG_URL" in err
            assert "replica-set member" in err


def test_an_oplog_url_that_is_not_the_local_database_exits_78_naming_it(
    tmp_path: Path, mongo_url: str
) -> None:
    d = DaemonProcess(tmp_path, with_database(mongo_url, "rocketchat"), FEED="oplog",
                      MONGO_OPLOG_URL=with_database(mongo_url, "rocketchat"))
    with d:
        d.start(wait_ready=False)
        assert d.proc is not None
        assert d.proc.wait(timeout=30) == 78
        err = d.output()
        assert "MONGO_OPLOG_URL" in err
        assert "local" in err


@pytest.mark.emulator_only
def test_a_standalone_server_behind_mongo_url_exits_78(tmp_path: Path) -> None:
    from presenced.testing.mongo import MongoEmulator

    with MongoEmulator(replica_set=None) as standalone:
        d = DaemonProcess(tmp_path, with_database(standalone, "rocketchat"))
        with d:
            d.start(wait_ready=False)
            assert d.proc is not None
            assert d.proc.wait(timeout=30) == 78
            assert "MONGO_URL" in d.output()


@pytest.mark.slow
@pytest.mark.emulator_only
@pytest.mark.parametrize("feed", ["changestream", "oplog"])
def test_mongodb_restarting_under_the_daemon_loses_nothing_and_logs_no_retry_storm(
    tmp_path: Path, feed: str
) -> None:
    from presenced.testing.mongo import MongoEmulator

    emulator = MongoEmulator()
    with emulator as url:
        client: MongoClient[dict[str, Any]] = MongoClient(url)
        try:
            rc = RocketChat(client["rocketchat"])
            before, during = rc.add_user(), rc.add_user()
            settings = oplog_settings(url) if feed == "oplog" else {"FEED": feed}
            with DaemonProcess(tmp_path, with_database(url, "rocketchat"), **settings) as d:
                d.start()
                rc.connect(before)
                rc.wait_presence(before, ONLINE, daemon=d)
                emulator.stop()
                wait_for(lambda: (d.ready() or (0, None))[0] == 503, 20,
                         "/ready answers 503 while MongoDB is down", daemon=d)
                emulator.start()
                rc.connect(during)
                rc.wait_presence(during, ONLINE, timeout=30, daemon=d)
                wait_for(lambda: (d.ready() or (0, None))[0] == 200, 20, "/ready back to 200",
                         daemon=d)
                # Logged once per outage, never per retry; pymongo may also ride out a short
                # outage inside its own server selection, and then nothing failed to log.
                log = d.output()
                outages = len(re.findall(r"MongoDB unavailable \(", log))
                assert outages <= 1, log
                assert ("MongoDB available again" in log) == (outages == 1), log
                assert d.stop() == 0
        finally:
            client.close()
