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
from pymongo import MongoClient

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
