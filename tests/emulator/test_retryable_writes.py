"""Error labels a 4.4+ mongod adds itself, and the driver retries they drive.

Retryable writes spec ("Determining Retryable Errors"): drivers retry a write only on the
``RetryableWriteError`` label, which the server (4.4+) attaches to the reply of a retryable
write (one carrying ``txnNumber`` outside a transaction) that fails with a retriable code,
at the top level or in its ``writeConcernError`` (the server's RetriableError category:
6, 7, 89, 91, 134, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436, ...). A statement of
a transaction gets ``TransientTransactionError`` instead. Errors injected by the
``failCommand`` fail point are labelled the same way, unless the fail point's
``errorLabels`` is given, which replaces the labels (jstests/core/failcommand_failpoint.js;
src/mongo/db/error_labels.cpp). A "not primary" error carries the server's
``topologyVersion`` (SDAM: drivers ignore one no newer than what they know).

Every fail point is scoped with ``appName`` to a dedicated client, and turned off after.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient, monitoring
from pymongo.database import Database
from pymongo.errors import OperationFailure, PyMongoError

pytestmark = [pytest.mark.failpoints, pytest.mark.usefixtures("failpoints")]


class _Failures(monitoring.CommandListener):
    """The reply of every failed command, by command name."""

    def __init__(self) -> None:
        self.replies: list[tuple[str, dict[str, Any]]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        reply = dict(event.reply)
        if "writeConcernError" in reply:
            self.replies.append((event.command_name, reply))

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.replies.append((event.command_name, dict(event.failure)))

    def of(self, name: str) -> list[dict[str, Any]]:
        return [reply for command, reply in self.replies if command == name]


@pytest.fixture
def app_name() -> str:
    return f"rw-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def failures() -> _Failures:
    return _Failures()


def _client(
    mongo_url: str, app_name: str, failures: _Failures, **kwargs: Any
) -> MongoClient[dict[str, Any]]:
    c: MongoClient[dict[str, Any]] = MongoClient(
        mongo_url, appname=app_name, serverSelectionTimeoutMS=10_000,
        # After a "shutting down" error the driver marks the server Unknown and waits for
        # its monitor, which the server holds for up to heartbeatFrequencyMS: keep it short.
        heartbeatFrequencyMS=500, event_listeners=[failures], **kwargs,
    )
    c.admin.command("ping")
    return c


@pytest.fixture
def rw_client(
    mongo_url: str, app_name: str, failures: _Failures
) -> Iterator[MongoClient[dict[str, Any]]]:
    c = _client(mongo_url, app_name, failures, retryWrites=True)
    yield c
    c.close()


@pytest.fixture
def coll(rw_client: MongoClient[Any], db: Database[Any]) -> Any:
    db.rw.insert_one({"_id": "doc", "n": 0})
    return rw_client[db.name].rw


def fail_command(client: MongoClient[Any], app_name: str, mode: Any, **data: Any) -> None:
    data.setdefault("appName", app_name)
    client.admin.command("configureFailPoint", "failCommand", mode=mode, data=data)


# --------------------------------------------------------------------------- retried


@pytest.mark.parametrize("code", [91, 189, 10107, 11600, 262])
def test_retryable_update_failing_once_is_retried_and_applied_once(
    client: MongoClient[Any], app_name: str, coll: Any, db: Database[Any],
    failures: _Failures, code: int,
) -> None:
    fail_command(client, app_name, {"times": 1}, failCommands=["update"], errorCode=code)
    result = coll.update_one({"_id": "doc"}, {"$inc": {"n": 1}})
    assert result.modified_count == 1
    assert db.rw.find_one({"_id": "doc"}) == {"_id": "doc", "n": 1}
    first = failures.of("update")[0]
    assert first["code"] == code
    assert "RetryableWriteError" in first["errorLabels"]


def test_retryable_insert_failing_once_is_inserted_once(
    client: MongoClient[Any], app_name: str, coll: Any, db: Database[Any]
) -> None:
    fail_command(client, app_name, {"times": 1}, failCommands=["insert"], errorCode=91)
    coll.insert_one({"_id": "new"})
    assert db.rw.count_documents({"_id": "new"}) == 1


def test_retryable_find_and_modify_failing_once_is_applied_once(
    client: MongoClient[Any], app_name: str, coll: Any, db: Database[Any]
) -> None:
    fail_command(client, app_name, {"times": 1}, failCommands=["findAndModify"],
                 errorCode=189)
    before = coll.find_one_and_update({"_id": "doc"}, {"$inc": {"n": 1}})
    assert before == {"_id": "doc", "n": 0}
    assert db.rw.find_one({"_id": "doc"}) == {"_id": "doc", "n": 1}


def test_retryable_write_concern_error_is_labelled_and_applied_once(
    client: MongoClient[Any], app_name: str, coll: Any, db: Database[Any],
    failures: _Failures,
) -> None:
    """The write happens, its reply carries a retriable writeConcernError: the label sends
    the driver back, and the retry must not apply the write again."""
    fail_command(client, app_name, {"times": 1}, failCommands=["update"],
                 writeConcernError={"code": 91, "errmsg": "Replication is being shut down"})
    coll.update_one({"_id": "doc"}, {"$inc": {"n": 1}})
    assert db.rw.find_one({"_id": "doc"}) == {"_id": "doc", "n": 1}
    first = failures.of("update")[0]
    assert first["ok"] == 1.0
    assert first["writeConcernError"]["code"] == 91
    assert "RetryableWriteError" in first["errorLabels"]


def test_retryable_write_that_wrote_before_fails_with_no_writes_performed(
    mongo_url: str, client: MongoClient[Any], app_name: str, db: Database[Any],
    failures: _Failures,
) -> None:
    """NoWritesPerformed: the connection's last write did not move (the failing command
    wrote nothing) on a connection that has written before."""
    c = _client(mongo_url, app_name, failures, retryWrites=True, maxPoolSize=1)
    try:
        coll = c[db.name].rw
        coll.insert_one({"_id": "first"})
        fail_command(client, app_name, {"times": 1}, failCommands=["update"], errorCode=262)
        coll.update_one({"_id": "first"}, {"$set": {"v": 1}})
        assert failures.of("update")[0]["errorLabels"] == [
            "RetryableWriteError", "NoWritesPerformed"
        ]
    finally:
        c.close()


# --------------------------------------------------------------------------- not retried


def test_non_retriable_code_gets_no_label_and_is_not_retried(
    client: MongoClient[Any], app_name: str, coll: Any, db: Database[Any],
    failures: _Failures,
) -> None:
    fail_command(client, app_name, {"times": 1}, failCommands=["update"], errorCode=2)
    with pytest.raises(OperationFailure) as exc:
        coll.update_one({"_id": "doc"}, {"$inc": {"n": 1}})
    assert exc.value.code == 2
    assert "errorLabels" not in failures.of("update")[0]
    assert db.rw.find_one({"_id": "doc"}) == {"_id": "doc", "n": 0}


def test_write_without_txn_number_gets_no_label(
    mongo_url: str, client: MongoClient[Any], app_name: str, db: Database[Any],
    failures: _Failures,
) -> None:
    c = _client(mongo_url, app_name, failures, retryWrites=False)
    try:
        db.rw.insert_one({"_id": "doc", "n": 0})
        fail_command(client, app_name, {"times": 1}, failCommands=["update"], errorCode=262)
        with pytest.raises(OperationFailure):
            c[db.name].rw.update_one({"_id": "doc"}, {"$inc": {"n": 1}})
        assert "errorLabels" not in failures.of("update")[0]
    finally:
        c.close()


def test_fail_point_error_labels_replace_the_servers(
    client: MongoClient[Any], app_name: str, coll: Any, db: Database[Any],
    failures: _Failures,
) -> None:
    """errorLabels: [] on the fail point: no label, so the driver does not retry."""
    fail_command(client, app_name, {"times": 1}, failCommands=["update"], errorCode=262,
                 errorLabels=[])
    with pytest.raises(OperationFailure) as exc:
        coll.update_one({"_id": "doc"}, {"$inc": {"n": 1}})
    assert exc.value.code == 262
    assert "errorLabels" not in failures.of("update")[0]
    assert db.rw.find_one({"_id": "doc"}) == {"_id": "doc", "n": 0}


def test_fail_point_error_labels_are_returned_as_given(
    client: MongoClient[Any], app_name: str, coll: Any, failures: _Failures
) -> None:
    fail_command(client, app_name, {"times": 1}, failCommands=["update"], errorCode=2,
                 errorLabels=["RetryableWriteError", "Custom"])
    coll.update_one({"_id": "doc"}, {"$inc": {"n": 1}})  # retried on the given label
    assert failures.of("update")[0]["errorLabels"] == ["RetryableWriteError", "Custom"]


def test_statement_of_a_transaction_gets_transient_transaction_error(
    client: MongoClient[Any], app_name: str, rw_client: MongoClient[Any],
    db: Database[Any], failures: _Failures,
) -> None:
    db.rw.insert_one({"_id": "doc", "n": 0})
    fail_command(client, app_name, {"times": 1}, failCommands=["insert"], errorCode=91)
    with (
        rw_client.start_session() as session,
        pytest.raises(PyMongoError) as exc,
        session.start_transaction(),
    ):
        rw_client[db.name].rw.insert_one({"_id": "in-txn"}, session=session)
    assert exc.value.has_error_label("TransientTransactionError")
    assert failures.of("insert")[0]["errorLabels"] == ["TransientTransactionError"]


# --------------------------------------------------------------------------- topologyVersion


def test_not_primary_error_carries_the_topology_version(
    client: MongoClient[Any], app_name: str, coll: Any, failures: _Failures
) -> None:
    """...equal to hello's, so a driver ignores this injected one as stale."""
    hello = client.admin.command("hello")
    fail_command(client, app_name, {"times": 1}, failCommands=["update"], errorCode=10107)
    coll.update_one({"_id": "doc"}, {"$inc": {"n": 1}})
    first = failures.of("update")[0]
    assert first["topologyVersion"] == hello["topologyVersion"]


def test_other_errors_carry_no_topology_version(
    client: MongoClient[Any], app_name: str, coll: Any, failures: _Failures
) -> None:
    fail_command(client, app_name, {"times": 1}, failCommands=["update"], errorCode=262)
    coll.update_one({"_id": "doc"}, {"$inc": {"n": 1}})
    assert "topologyVersion" not in failures.of("update")[0]
