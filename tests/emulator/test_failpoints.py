"""The ``failCommand`` fail point (mongod >= 4.4 with enableTestCommands=1).

``configureFailPoint: "failCommand"`` with ``mode`` (``"alwaysOn"``, ``{times: n}``,
``{skip: n}``, ``"off"``) and ``data``: ``failCommands`` (the command names it applies to),
``errorCode``, ``errorLabels``, ``closeConnection``, ``blockConnection`` + ``blockTimeMS``,
``writeConcernError``, ``appName``. Only listed commands are affected and only they count
towards ``times``/``skip``; ``configureFailPoint`` itself can never be failed. See the
MongoDB specifications' testing docs and jstests/core/failcommand_failpoint.js.

Every fail point here is scoped with ``appName`` to a dedicated client (retries off, so each
failure surfaces), and the ``failpoints`` fixture turns it off afterwards.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import (
    AutoReconnect,
    ConnectionFailure,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)

pytestmark = [pytest.mark.failpoints, pytest.mark.usefixtures("failpoints")]


@pytest.fixture
def app_name() -> str:
    return f"fp-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def fp_client(mongo_url: str, app_name: str) -> Iterator[MongoClient[dict[str, Any]]]:
    c: MongoClient[dict[str, Any]] = MongoClient(
        mongo_url,
        appname=app_name,
        retryReads=False,
        retryWrites=False,
        serverSelectionTimeoutMS=10_000,
        # After a "node is shutting down" error the client marks the server Unknown and
        # waits for its monitor's next hello, which the server (like mongod) holds for up
        # to heartbeatFrequencyMS while nothing changes: 500 ms, pymongo's minimum, keeps
        # that wait short instead of the default 10 s.
        heartbeatFrequencyMS=500,
    )
    c.admin.command("ping")
    yield c
    c.close()


@pytest.fixture
def coll(fp_client: MongoClient[Any], db: Database[Any]) -> Any:
    db.fp.insert_one({"_id": "seed"})
    return fp_client[db.name].fp


def fail_command(client: MongoClient[Any], app_name: str, mode: Any, **data: Any) -> dict[str, Any]:
    data.setdefault("appName", app_name)
    return client.admin.command("configureFailPoint", "failCommand", mode=mode, data=data)


def error_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if code is not None:
        return int(code)
    details = getattr(exc, "details", None)
    if isinstance(details, dict):
        return details.get("code")
    return None


# --------------------------------------------------------------------------- configure


def test_configure_fail_point_replies_ok_with_count(
    client: MongoClient[Any], app_name: str
) -> None:
    reply = fail_command(client, app_name, "alwaysOn", failCommands=["find"], errorCode=2)
    assert reply["ok"] == 1.0
    assert isinstance(reply["count"], int)


def test_configure_fail_point_cannot_fail_itself(client: MongoClient[Any], app_name: str) -> None:
    fail_command(client, app_name, "alwaysOn", failCommands=["configureFailPoint"], errorCode=2)
    reply = client.admin.command("configureFailPoint", "failCommand", mode="off")
    assert reply["ok"] == 1.0


# --------------------------------------------------------------------------- errorCode


def test_error_code_fails_the_named_command(
    client: MongoClient[Any], app_name: str, coll: Any
) -> None:
    fail_command(client, app_name, "alwaysOn", failCommands=["find"], errorCode=2)
    with pytest.raises(OperationFailure) as exc:
        coll.find_one({})
    assert exc.value.code == 2


def test_error_code_leaves_other_commands_alone(
    client: MongoClient[Any], app_name: str, coll: Any
) -> None:
    fail_command(client, app_name, "alwaysOn", failCommands=["find"], errorCode=2)
    coll.insert_one({"_id": "other"})
    coll.update_one({"_id": "other"}, {"$set": {"v": 1}})
    assert coll.count_documents({}) == 2  # aggregate, not find
    assert coll.database.command("ping")["ok"] == 1.0


def test_error_code_does_not_execute_the_write(
    client: MongoClient[Any], app_name: str, coll: Any, db: Database[Any]
) -> None:
    fail_command(client, app_name, "alwaysOn", failCommands=["insert"], errorCode=2)
    with pytest.raises(OperationFailure) as exc:
        coll.insert_one({"_id": "blocked"})
    assert exc.value.code == 2
    assert db.fp.find_one({"_id": "blocked"}) is None


@pytest.mark.parametrize("code", [91, 11600])
def test_shutdown_error_codes_reach_the_client(
    client: MongoClient[Any], app_name: str, coll: Any, db: Database[Any], code: int
) -> None:
    """91 ShutdownInProgress / 11600 InterruptedAtShutdown: pymongo raises NotPrimaryError
    (an AutoReconnect) for these "node is shutting down" codes, carrying the code."""
    fail_command(client, app_name, "alwaysOn", failCommands=["insert"], errorCode=code)
    with pytest.raises(PyMongoError) as exc:
        coll.insert_one({"_id": "x"})
    assert isinstance(exc.value, (OperationFailure, AutoReconnect))
    assert error_code(exc.value) == code
    assert db.fp.find_one({"_id": "x"}) is None


def test_client_recovers_after_a_shutdown_error(
    client: MongoClient[Any], app_name: str, coll: Any
) -> None:
    fail_command(client, app_name, {"times": 1}, failCommands=["insert"], errorCode=91)
    with pytest.raises(PyMongoError):
        coll.insert_one({"_id": "x"})
    coll.insert_one({"_id": "y"})
    assert coll.find_one({"_id": "y"}) == {"_id": "y"}


def test_error_labels_are_returned(client: MongoClient[Any], app_name: str, coll: Any) -> None:
    fail_command(
        client,
        app_name,
        "alwaysOn",
        failCommands=["insert"],
        errorCode=112,
        errorLabels=["TransientTransactionError"],
    )
    with pytest.raises(OperationFailure) as exc:
        coll.insert_one({"_id": "x"})
    assert exc.value.code == 112
    assert exc.value.has_error_label("TransientTransactionError")


def test_app_name_limits_the_fail_point_to_that_client(
    client: MongoClient[Any], app_name: str, coll: Any, db: Database[Any]
) -> None:
    fail_command(client, app_name, "alwaysOn", failCommands=["find"], errorCode=2)
    assert db.fp.find_one({"_id": "seed"}) == {"_id": "seed"}  # session client, other appName
    with pytest.raises(OperationFailure):
        coll.find_one({"_id": "seed"})


def test_write_concern_error_is_reported_and_write_applied(
    client: MongoClient[Any], app_name: str, coll: Any, db: Database[Any]
) -> None:
    fail_command(
        client,
        app_name,
        {"times": 1},
        failCommands=["insert"],
        writeConcernError={"code": 64, "errmsg": "waiting for replication timed out"},
    )
    with pytest.raises(WriteConcernError) as exc:
        coll.insert_one({"_id": "wce"})
    assert exc.value.code == 64
    assert db.fp.find_one({"_id": "wce"}) == {"_id": "wce"}


# --------------------------------------------------------------------------- closeConnection


def test_close_connection_raises_connection_failure(
    client: MongoClient[Any], app_name: str, coll: Any
) -> None:
    fail_command(client, app_name, {"times": 1}, failCommands=["find"], closeConnection=True)
    with pytest.raises(ConnectionFailure) as exc:
        coll.find_one({})
    assert isinstance(exc.value, AutoReconnect)


def test_next_command_works_after_close_connection(
    client: MongoClient[Any], app_name: str, coll: Any
) -> None:
    fail_command(client, app_name, {"times": 1}, failCommands=["find"], closeConnection=True)
    with pytest.raises(ConnectionFailure):
        coll.find_one({})
    assert coll.find_one({"_id": "seed"}) == {"_id": "seed"}


# --------------------------------------------------------------------------- blockConnection


def test_block_connection_delays_the_reply(
    client: MongoClient[Any], app_name: str, coll: Any
) -> None:
    fail_command(
        client,
        app_name,
        {"times": 1},
        failCommands=["find"],
        blockConnection=True,
        blockTimeMS=400,
    )
    start = time.monotonic()
    doc = coll.find_one({"_id": "seed"})
    elapsed = time.monotonic() - start
    assert doc == {"_id": "seed"}
    assert elapsed >= 0.4


def test_block_connection_with_error_code_delays_then_fails(
    client: MongoClient[Any], app_name: str, coll: Any
) -> None:
    fail_command(
        client,
        app_name,
        {"times": 1},
        failCommands=["find"],
        blockConnection=True,
        blockTimeMS=300,
        errorCode=2,
    )
    start = time.monotonic()
    with pytest.raises(OperationFailure) as exc:
        coll.find_one({})
    assert time.monotonic() - start >= 0.3
    assert exc.value.code == 2


# --------------------------------------------------------------------------- modes


def test_mode_always_on_fails_every_time(
    client: MongoClient[Any], app_name: str, coll: Any
) -> None:
    fail_command(client, app_name, "alwaysOn", failCommands=["find"], errorCode=2)
    for _ in range(3):
        with pytest.raises(OperationFailure):
            coll.find_one({})


def test_mode_times_fails_exactly_that_many_times(
    client: MongoClient[Any], app_name: str, coll: Any
) -> None:
    fail_command(client, app_name, {"times": 2}, failCommands=["find"], errorCode=2)
    for _ in range(2):
        with pytest.raises(OperationFailure):
            coll.find_one({})
    assert coll.find_one({"_id": "seed"}) == {"_id": "seed"}
    assert coll.find_one({"_id": "seed"}) == {"_id": "seed"}


def test_mode_times_counts_only_listed_commands(
    client: MongoClient[Any], app_name: str, coll: Any
) -> None:
    fail_command(client, app_name, {"times": 1}, failCommands=["find"], errorCode=2)
    coll.insert_one({"_id": "a"})
    coll.database.command("ping")
    with pytest.raises(OperationFailure):
        coll.find_one({})
    assert coll.find_one({"_id": "a"}) == {"_id": "a"}


def test_mode_skip_lets_the_first_calls_through(
    client: MongoClient[Any], app_name: str, coll: Any
) -> None:
    fail_command(client, app_name, {"skip": 2}, failCommands=["find"], errorCode=2)
    assert coll.find_one({"_id": "seed"}) == {"_id": "seed"}
    assert coll.find_one({"_id": "seed"}) == {"_id": "seed"}
    with pytest.raises(OperationFailure):
        coll.find_one({})


def test_mode_off_disables_the_fail_point(
    client: MongoClient[Any], app_name: str, coll: Any
) -> None:
    fail_command(client, app_name, "alwaysOn", failCommands=["find"], errorCode=2)
    with pytest.raises(OperationFailure):
        coll.find_one({})
    client.admin.command("configureFailPoint", "failCommand", mode="off")
    assert coll.find_one({"_id": "seed"}) == {"_id": "seed"}


def test_reconfiguring_replaces_the_command_list(
    client: MongoClient[Any], app_name: str, coll: Any
) -> None:
    fail_command(client, app_name, "alwaysOn", failCommands=["find"], errorCode=2)
    fail_command(client, app_name, "alwaysOn", failCommands=["insert"], errorCode=2)
    assert coll.find_one({"_id": "seed"}) == {"_id": "seed"}
    with pytest.raises(OperationFailure):
        coll.insert_one({})
