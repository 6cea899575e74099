"""serverStatus fields that applications read (MongoDB 7.0's documented output).

Rocket.Chat's ``getMongoInfo`` (apps/meteor/app/utils/server/functions/getMongoInfo.ts)
reads ``version`` and ``storageEngine.name`` from ``serverStatus`` at start and in its
statistics, falling back to "unknown" when the latter is missing. MongoDB documents
``storageEngine`` as ``{name, supportsCommittedReads, oldestRequiredTimestampForCrashRecovery,
supportsPendingDrops, dropPendingIdents, supportsSnapshotReadConcern, readOnly, persistent,
backupCursorOpen}``; a 7.0 mongod's engine is WiredTiger.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient, UpdateOne

from presenced.testing.mongo import MongoEmulator


def _status(client: MongoClient[Any]) -> dict[str, Any]:
    status: dict[str, Any] = client.admin.command("serverStatus")
    return status


def test_server_status_answers_what_rocket_chat_reads(client: MongoClient[Any]) -> None:
    status = _status(client)
    assert status["version"] == client.admin.command("buildInfo")["version"]
    assert status["storageEngine"]["name"] == "wiredTiger"


def test_storage_engine_has_the_documented_fields(client: MongoClient[Any]) -> None:
    engine = _status(client)["storageEngine"]
    for flag in ("supportsCommittedReads", "supportsPendingDrops",
                 "supportsSnapshotReadConcern", "readOnly", "persistent", "backupCursorOpen"):
        assert isinstance(engine[flag], bool), flag
    assert engine["supportsCommittedReads"] is True
    assert engine["readOnly"] is False
    assert isinstance(engine["dropPendingIdents"], int)


def test_build_info_lists_the_engine_in_use(client: MongoClient[Any]) -> None:
    assert "wiredTiger" in client.admin.command("buildInfo")["storageEngines"]


@pytest.fixture
def started() -> Iterator[list[MongoEmulator]]:
    made: list[MongoEmulator] = []
    yield made
    for emu in made:
        emu.close()


@pytest.mark.emulator_only
@pytest.mark.parametrize("with_snapshot", [False, True])
def test_storage_engine_is_persistent_only_with_a_snapshot(
    started: list[MongoEmulator], tmp_path: Path, with_snapshot: bool
) -> None:
    emu = MongoEmulator(snapshot_path=tmp_path / "data.snapshot" if with_snapshot else None)
    started.append(emu)
    c: MongoClient[dict[str, Any]]
    with MongoClient(emu.start(), serverSelectionTimeoutMS=10_000) as c:
        assert _status(c)["storageEngine"]["persistent"] is with_snapshot


@pytest.mark.emulator_only
def test_opcounters_are_kept_per_client_app_name(mongo_url: str) -> None:
    """Not MongoDB's: ``opcountersByAppName`` counts each client's operations the way
    ``opcounters`` counts them (a find one query, a write one per statement), so a
    benchmark can tell the process it measures from its own load generator."""
    app = f"counted-{id(object())}"
    counted: MongoClient[Any] = MongoClient(mongo_url, appname=app)
    other: MongoClient[Any] = MongoClient(mongo_url, appname=app + "-other")
    try:
        coll = counted.t_by_app.c
        coll.insert_many([{"_id": i} for i in range(5)])
        coll.update_many({}, {"$set": {"x": 1}})
        coll.bulk_write([UpdateOne({"_id": i}, {"$set": {"y": 1}}) for i in range(3)])
        coll.delete_one({"_id": 0})
        assert coll.find_one({"_id": 1}) is not None
        list(coll.find({}, batch_size=2))  # one find and getMores
        other.t_by_app.c.find_one({"_id": 2})
        mine = _status(counted)["opcountersByAppName"][app]
        assert mine["insert"] == 5
        assert mine["update"] == 1 + 3
        assert mine["delete"] == 1
        assert mine["query"] == 2
        assert mine["getmore"] == 1  # 4 documents in batches of 2: find, one getMore
        assert _status(counted)["opcountersByAppName"][app + "-other"]["query"] == 1
        commands = _status(counted)["commandsByAppName"][app]
        assert commands["insert"] == 1 and commands["update"] == 2  # round trips
        assert commands["find"] == 2 and commands["getMore"] == 1
        returned = _status(counted)["documentsReturnedByAppName"][app]
        assert returned["find"] == 1 + 2 and returned["getMore"] == 2  # documents
        assert _status(counted)["documentsReturnedByAppName"][app + "-other"]["find"] == 1
    finally:
        counted.t_by_app.c.drop()
        counted.close()
        other.close()
