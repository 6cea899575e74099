"""Replica-set identity (MongoDB 7.0 primary of a one-node replica set).

What a driver needs to see to treat the server as the primary of a replica set: the
``hello`` reply (SDAM spec fields), the legacy ``isMaster`` alias, ``operationTime`` and
``$clusterTime`` on replies (causal consistency spec), and working logical sessions.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest
from bson import Int64, ObjectId, Timestamp
from pymongo import MongoClient
from pymongo.database import Database


@pytest.fixture
def fresh_client(mongo_url: str) -> Any:
    c: MongoClient[dict[str, Any]] = MongoClient(mongo_url, serverSelectionTimeoutMS=10_000)
    yield c
    c.close()


@pytest.fixture
def hello(client: MongoClient[Any]) -> dict[str, Any]:
    return client.admin.command("hello")


def _set_name(client: MongoClient[Any]) -> str:
    name = client.options.replica_set_name
    assert name, "the test URL must carry ?replicaSet="
    return name


# --------------------------------------------------------------------------- discovery


def test_client_with_replica_set_option_finds_primary(fresh_client: MongoClient[Any]) -> None:
    fresh_client.admin.command("ping")
    primary = fresh_client.primary
    assert primary is not None
    host, port = primary
    assert isinstance(host, str) and isinstance(port, int)


def test_topology_is_replica_set_with_primary(fresh_client: MongoClient[Any]) -> None:
    fresh_client.admin.command("ping")
    td = fresh_client.topology_description
    assert td.topology_type_name == "ReplicaSetWithPrimary"
    assert td.replica_set_name == _set_name(fresh_client)
    assert td.has_writable_server()
    types = {sd.server_type_name for sd in td.server_descriptions().values()}
    assert "RSPrimary" in types


def test_client_can_write_through_replica_set_url(
    fresh_client: MongoClient[Any], db: Database[Any]
) -> None:
    coll = fresh_client[db.name]["w"]
    coll.insert_one({"_id": 1})
    assert coll.find_one({"_id": 1}) == {"_id": 1}


# --------------------------------------------------------------------------- hello


def test_hello_reports_writable_primary(hello: dict[str, Any]) -> None:
    assert hello["ok"] == 1.0
    assert hello["isWritablePrimary"] is True
    assert hello["secondary"] is False


def test_hello_reports_set_name(client: MongoClient[Any], hello: dict[str, Any]) -> None:
    assert hello["setName"] == _set_name(client)


def test_hello_me_is_primary_and_listed_in_hosts(hello: dict[str, Any]) -> None:
    assert isinstance(hello["me"], str) and ":" in hello["me"]
    assert hello["primary"] == hello["me"]
    assert hello["me"] in hello["hosts"]


def test_hello_set_version_and_election_id(hello: dict[str, Any]) -> None:
    assert isinstance(hello["setVersion"], int) and hello["setVersion"] >= 1
    assert isinstance(hello["electionId"], ObjectId)


def test_hello_last_write_shape(hello: dict[str, Any]) -> None:
    last = hello["lastWrite"]
    assert isinstance(last["opTime"]["ts"], Timestamp)
    assert isinstance(last["opTime"]["t"], int)
    assert isinstance(last["lastWriteDate"], datetime.datetime)
    assert isinstance(last["majorityOpTime"]["ts"], Timestamp)
    assert isinstance(last["majorityWriteDate"], datetime.datetime)


def test_hello_last_write_advances_after_a_write(
    client: MongoClient[Any], db: Database[Any]
) -> None:
    before = client.admin.command("hello")["lastWrite"]["opTime"]["ts"]
    reply = db.command("insert", "lw", documents=[{"x": 1}])
    after = client.admin.command("hello")["lastWrite"]["opTime"]["ts"]
    assert after > before
    assert after >= reply["operationTime"]


def test_hello_logical_session_timeout(hello: dict[str, Any]) -> None:
    assert hello["logicalSessionTimeoutMinutes"] == 30


def test_hello_wire_versions_are_mongodb_7_0(hello: dict[str, Any]) -> None:
    assert hello["maxWireVersion"] == 21
    assert hello["minWireVersion"] == 0


def test_hello_size_limits(hello: dict[str, Any]) -> None:
    assert hello["maxBsonObjectSize"] == 16 * 1024 * 1024
    assert hello["maxMessageSizeBytes"] == 48_000_000
    assert hello["maxWriteBatchSize"] == 100_000


def test_hello_local_time_connection_id_and_read_only(hello: dict[str, Any]) -> None:
    assert isinstance(hello["localTime"], datetime.datetime)
    assert isinstance(hello["connectionId"], int)
    assert hello["readOnly"] is False


def test_hello_topology_version(hello: dict[str, Any]) -> None:
    tv = hello["topologyVersion"]
    assert isinstance(tv["processId"], ObjectId)
    assert isinstance(tv["counter"], (int, Int64))


def test_awaitable_hello_waits_max_await_time_when_nothing_changes(
    client: MongoClient[Any], hello: dict[str, Any]
) -> None:
    """SDAM streaming protocol: with a current topologyVersion the server holds the reply."""
    start = time.monotonic()
    reply = client.admin.command(
        "hello", topologyVersion=hello["topologyVersion"], maxAwaitTimeMS=300
    )
    elapsed = time.monotonic() - start
    assert reply["ok"] == 1.0
    assert reply["isWritablePrimary"] is True
    assert elapsed >= 0.25
    assert elapsed < 5.0


def test_legacy_is_master_alias(client: MongoClient[Any]) -> None:
    reply = client.admin.command("isMaster")
    assert reply["ok"] == 1.0
    assert reply["ismaster"] is True
    assert "isWritablePrimary" not in reply
    assert reply["setName"] == _set_name(client)
    assert reply["maxWireVersion"] == 21


def test_legacy_lowercase_ismaster_alias(client: MongoClient[Any]) -> None:
    reply = client.admin.command("ismaster")
    assert reply["ok"] == 1.0
    assert reply["ismaster"] is True


# --------------------------------------------------------------------------- cluster time


def test_reply_carries_operation_time_and_cluster_time(db: Database[Any]) -> None:
    reply = db.command("insert", "ct", documents=[{"x": 1}])
    assert isinstance(reply["operationTime"], Timestamp)
    cluster_time = reply["$clusterTime"]
    assert isinstance(cluster_time["clusterTime"], Timestamp)
    assert cluster_time["clusterTime"] >= reply["operationTime"]


def test_read_reply_carries_operation_time(db: Database[Any]) -> None:
    reply = db.command("find", "ct", filter={})
    assert isinstance(reply["operationTime"], Timestamp)
    assert isinstance(reply["$clusterTime"]["clusterTime"], Timestamp)


def test_operation_time_advances_with_writes(db: Database[Any]) -> None:
    first = db.command("insert", "ct", documents=[{"x": 1}])["operationTime"]
    second = db.command("insert", "ct", documents=[{"x": 2}])["operationTime"]
    third = db.command("update", "ct", updates=[{"q": {"x": 1}, "u": {"$set": {"y": 1}}}])[
        "operationTime"
    ]
    assert first < second < third


# --------------------------------------------------------------------------- sessions


def test_session_write_and_read(client: MongoClient[Any], db: Database[Any]) -> None:
    with client.start_session() as session:
        db.sess.insert_one({"_id": "a"}, session=session)
        assert db.sess.find_one({"_id": "a"}, session=session) == {"_id": "a"}


def test_session_tracks_operation_and_cluster_time(
    client: MongoClient[Any], db: Database[Any]
) -> None:
    with client.start_session() as session:
        assert session.operation_time is None
        db.sess.insert_one({"_id": "t"}, session=session)
        assert isinstance(session.operation_time, Timestamp)
        assert session.cluster_time is not None
        assert isinstance(session.cluster_time["clusterTime"], Timestamp)


def test_causally_consistent_session_reads_its_writes(
    client: MongoClient[Any], db: Database[Any]
) -> None:
    with client.start_session(causal_consistency=True) as session:
        db.sess.insert_one({"_id": "c", "v": 1}, session=session)
        db.sess.update_one({"_id": "c"}, {"$inc": {"v": 1}}, session=session)
        # pymongo now sends readConcern {afterClusterTime: <operationTime>}.
        assert db.sess.find_one({"_id": "c"}, session=session) == {"_id": "c", "v": 2}


def test_session_id_is_a_uuid_document(client: MongoClient[Any]) -> None:
    with client.start_session() as session:
        lsid = session.session_id
        assert set(lsid) == {"id"}
        assert lsid["id"].subtype == 4


def test_retryable_write_with_explicit_txn_number_is_applied_once(
    db: Database[Any], mongo_url: str
) -> None:
    """Retryable writes spec: a repeated (lsid, txnNumber) is answered without re-executing."""
    # A client of its own: its session id is new, so txnNumber 7 cannot collide with the
    # retryable writes earlier tests made on a pooled session of the shared client.
    own: MongoClient[Any] = MongoClient(mongo_url)
    try:
        with own.start_session() as session:
            cmd = {"insert": "retry", "documents": [{"_id": 1}], "txnNumber": Int64(7)}
            first = own[db.name].command(dict(cmd), session=session)
            again = own[db.name].command(dict(cmd), session=session)
    finally:
        own.close()
    assert first["n"] == 1
    assert again["n"] == 1
    assert "writeErrors" not in again
    assert db.retry.count_documents({}) == 1
