"""The emulator as a standalone mongod (``MongoEmulator(replica_set=None)``, CLI
``--standalone``), checked against what MongoDB 7.0 documents for a standalone server:

- ``hello`` has no replica-set fields (``setName``, ``hosts``, ``primary``, ``me``,
  ``electionId``, ``setVersion``, ``lastWrite``) and says ``isWritablePrimary: true``;
  drivers therefore see a Standalone server (topology Single);
- replies carry no ``$clusterTime`` / ``operationTime`` (no logical clock gossip);
- ``$changeStream`` fails with 40573 ("only supported on replica sets");
- there is no ``local.oplog.rs``;
- a command with a ``txnNumber`` (a transaction) fails with 20 IllegalOperation
  ("Transaction numbers are only allowed on a replica set member or mongos");
- ``replSetGetStatus`` fails with 76 NoReplicationEnabled.
"""

from __future__ import annotations

import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure

pytestmark = pytest.mark.emulator_only

Doc = dict[str, Any]
READY_LINE = re.compile(r"^ready (mongodb://127\.0\.0\.1:(\d+)/)$")
REPLICA_SET_FIELDS = ("setName", "hosts", "primary", "me", "electionId", "setVersion",
                      "lastWrite", "secondary")


@pytest.fixture(scope="module")
def standalone() -> Iterator[Any]:
    from presenced.testing.mongo import MongoEmulator

    emu = MongoEmulator(replica_set=None)
    emu.start()
    yield emu
    emu.close()


@pytest.fixture(scope="module")
def sclient(standalone: Any) -> Iterator[MongoClient[Doc]]:
    c: MongoClient[Doc] = MongoClient(standalone.url, directConnection=True,
                                      serverSelectionTimeoutMS=10_000)
    yield c
    c.close()


def test_url_has_no_replica_set(standalone: Any) -> None:
    assert standalone.url == f"mongodb://127.0.0.1:{standalone.port}/"


def test_hello_has_no_replica_set_fields(sclient: MongoClient[Doc]) -> None:
    reply = sclient.admin.command("hello")
    assert reply["isWritablePrimary"] is True
    for name in REPLICA_SET_FIELDS:
        assert name not in reply, name
    assert reply["ok"] == 1.0
    assert isinstance(reply["maxWireVersion"], int)
    assert isinstance(reply["logicalSessionTimeoutMinutes"], int)
    legacy = sclient.admin.command("isMaster")
    assert legacy["ismaster"] is True
    assert "setName" not in legacy


def test_replies_carry_no_cluster_time(sclient: MongoClient[Doc]) -> None:
    sclient.st.c.insert_one({"x": 1})
    for reply in (sclient.admin.command("ping"), sclient.st.command("count", "c")):
        assert "$clusterTime" not in reply
        assert "operationTime" not in reply


def test_drivers_see_a_standalone(standalone: Any) -> None:
    options: list[dict[str, Any]] = [{"directConnection": True}, {}]
    for kwargs in options:
        c: MongoClient[Doc] = MongoClient(standalone.url, serverSelectionTimeoutMS=10_000,
                                          **kwargs)
        try:
            c.admin.command("ping")
            desc = c.topology_description
            assert desc.topology_type_name == "Single"
            assert [s.server_type_name for s in desc.server_descriptions().values()] == [
                "Standalone"]
            # Retryable writes are not sent to a standalone; plain writes work.
            c.st.w.insert_one({"_id": 1})
            c.st.w.update_one({"_id": 1}, {"$set": {"a": 1}})
            assert c.st.w.find_one({"_id": 1}) == {"_id": 1, "a": 1}
            c.st.w.drop()
        finally:
            c.close()


def test_change_streams_are_refused(sclient: MongoClient[Doc]) -> None:
    for open_stream in (sclient.st.c.watch, sclient.st.watch, sclient.watch):
        with pytest.raises(OperationFailure) as exc:
            open_stream()
        assert exc.value.code == 40573
        assert "only supported on replica sets" in str(exc.value)


def test_there_is_no_oplog(sclient: MongoClient[Doc]) -> None:
    sclient.st.o.insert_one({"_id": "x"})
    assert "oplog.rs" not in sclient.local.list_collection_names()
    assert sclient.local["oplog.rs"].find_one() is None
    assert list(sclient.local["oplog.rs"].find({"ns": "st.o"})) == []


def test_transactions_are_refused(sclient: MongoClient[Doc]) -> None:
    coll = sclient.st.t
    with (
        sclient.start_session() as s,
        pytest.raises(OperationFailure) as exc,
        s.start_transaction(),
    ):
        coll.insert_one({"_id": 1}, session=s)
    assert exc.value.code == 20
    assert "Transaction numbers are only allowed on a replica set member or mongos" in str(
        exc.value
    )
    assert coll.find_one({"_id": 1}) is None


def test_replication_commands_say_no_replication(sclient: MongoClient[Doc]) -> None:
    with pytest.raises(OperationFailure) as exc:
        sclient.admin.command("replSetGetStatus")
    assert exc.value.code == 76
    assert "repl" not in sclient.admin.command("serverStatus")


def test_cli_standalone_prints_a_url_without_replica_set(tmp_path: Path) -> None:
    stderr = (tmp_path / "stderr.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "presenced.testing.mongo", "--port", "0", "--standalone"],
        stdout=subprocess.PIPE, stderr=stderr, text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "no ready line within 30 s"
        line = proc.stdout.readline().rstrip("\n")
        match = READY_LINE.match(line)
        assert match, f"first stdout line was {line!r}"
        c: MongoClient[Doc] = MongoClient(match.group(1), directConnection=True,
                                          serverSelectionTimeoutMS=10_000)
        try:
            assert "setName" not in c.admin.command("hello")
            c.cli.c.insert_one({"_id": 1})
            assert c.cli.c.find_one({"_id": 1}) == {"_id": 1}
        finally:
            c.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        stderr.close()
