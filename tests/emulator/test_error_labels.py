"""The emulator's error-label rules, case by case, without a server.

``error_labels`` follows mongod's ErrorLabelBuilder (src/mongo/db/error_labels.cpp); the
conformance tests in test_retryable_writes.py check the cases a driver can reach, these the
rest of the table (commit/abort, write concern errors, the exceptions).
"""

from __future__ import annotations

import pytest

from presenced.testing.mongo.errors import error_labels

RETRYABLE = {"txn_number": True, "autocommit": False}  # a retryable write
IN_TXN = {"txn_number": True, "autocommit": True}  # a statement of a transaction
PLAIN = {"txn_number": False, "autocommit": False}  # no session number at all


@pytest.mark.parametrize(
    ("command", "code", "wc_code", "session", "labels"),
    [
        ("update", 91, None, RETRYABLE, ["RetryableWriteError"]),
        ("update", 13436, None, RETRYABLE, ["RetryableWriteError"]),
        ("update", None, 11602, RETRYABLE, ["RetryableWriteError"]),
        ("update", 2, None, RETRYABLE, []),
        ("update", 11000, None, RETRYABLE, []),
        ("update", 64, None, RETRYABLE, []),  # WriteConcernTimeout: not retriable
        ("update", None, 64, RETRYABLE, []),
        ("update", 91, None, PLAIN, []),
        ("insert", 91, None, IN_TXN, ["TransientTransactionError"]),
        ("insert", 112, None, IN_TXN, ["TransientTransactionError"]),
        ("insert", 251, None, IN_TXN, ["TransientTransactionError"]),
        ("insert", 11000, None, IN_TXN, []),
        ("insert", 358, None, IN_TXN, []),  # InternalTransactionNotSupported: never transient
        ("commitTransaction", 251, None, IN_TXN, ["TransientTransactionError"]),
        ("commitTransaction", 251, 64, IN_TXN, []),  # the commit may have happened
        ("commitTransaction", 91, None, IN_TXN, ["RetryableWriteError"]),
        ("commitTransaction", None, 91, IN_TXN, ["RetryableWriteError"]),
        ("abortTransaction", 189, None, IN_TXN, ["RetryableWriteError"]),
        ("commitTransaction", 112, None, IN_TXN, ["TransientTransactionError"]),
        ("find", 91, None, PLAIN, []),
        ("update", None, None, RETRYABLE, []),
    ],
)
def test_error_labels_follow_the_servers_table(
    command: str, code: int | None, wc_code: int | None, session: dict[str, bool],
    labels: list[str],
) -> None:
    assert error_labels(command, code, wc_code, **session) == labels


def test_no_writes_performed_rides_only_with_retryable_write_error() -> None:
    assert error_labels("update", 91, None, no_writes_performed=True, **RETRYABLE) == [
        "RetryableWriteError", "NoWritesPerformed"
    ]
    assert error_labels("update", 2, None, no_writes_performed=True, **RETRYABLE) == []
    assert error_labels("insert", 91, None, no_writes_performed=True, **IN_TXN) == [
        "TransientTransactionError"
    ]
