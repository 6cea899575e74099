"""MongoDB's error codes and the exception the emulator's commands raise.

Owns: the code → codeName table, the shape of an error reply, and which error labels
the server itself attaches to a reply (``error_labels``, MongoDB's ErrorLabelBuilder:
``RetryableWriteError``, ``TransientTransactionError``, ``NoWritesPerformed``). Never does
I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CODE_NAMES: dict[int, str] = {
    1: "InternalError",
    2: "BadValue",
    6: "HostUnreachable",
    7: "HostNotFound",
    9: "FailedToParse",
    11: "UserNotFound",
    13: "Unauthorized",
    14: "TypeMismatch",
    20: "IllegalOperation",
    24: "LockTimeout",
    26: "NamespaceNotFound",
    27: "IndexNotFound",
    40: "ConflictingUpdateOperators",
    43: "CursorNotFound",
    47: "NoMatchingDocument",
    48: "NamespaceExists",
    50: "MaxTimeMSExpired",
    59: "CommandNotFound",
    66: "ImmutableField",
    72: "InvalidOptions",
    73: "InvalidNamespace",
    76: "NoReplicationEnabled",
    85: "IndexOptionsConflict",
    86: "IndexKeySpecsConflict",
    89: "NetworkTimeout",
    91: "ShutdownInProgress",
    96: "OperationFailed",
    112: "WriteConflict",
    115: "CommandNotSupported",
    134: "ReadConcernMajorityNotAvailableYet",
    136: "CappedPositionLost",
    189: "PrimarySteppedDown",
    225: "TransactionTooOld",
    239: "SnapshotTooOld",
    246: "SnapshotUnavailable",
    251: "NoSuchTransaction",
    256: "TransactionCommitted",
    260: "InvalidResumeToken",
    262: "ExceededTimeLimit",
    263: "OperationNotSupportedInTransaction",
    267: "PreparedTransactionInProgress",
    280: "ChangeStreamFatalError",
    286: "ChangeStreamHistoryLost",
    358: "InternalTransactionNotSupported",
    9001: "SocketException",
    10107: "NotWritablePrimary",
    11000: "DuplicateKey",
    11600: "InterruptedAtShutdown",
    11601: "Interrupted",
    11602: "InterruptedDueToReplStateChange",
    13435: "NotPrimaryNoSecondaryOk",
    13436: "NotPrimaryOrSecondary",
    50915: "BackupCursorOpenConflictWithCheckpoint",
}

#: MongoDB 7.0's RetriableError category (error_codes.yml), those a mongod can return to
#: a client: a retryable write failing with one of these (as its code or its
#: writeConcernError's) is labelled RetryableWriteError.
RETRIABLE_CODES = frozenset(
    {6, 7, 89, 91, 134, 189, 262, 358, 9001, 10107, 11600, 11602, 13435, 13436, 50915}
)
#: The NotPrimaryError category: replies with one of these carry the server's
#: topologyVersion (so drivers can tell a stale one).
NOT_PRIMARY_CODES = frozenset({189, 10107, 11602, 13435, 13436})
#: Codes that make a statement of a transaction a TransientTransactionError besides the
#: retriable ones and NoSuchTransaction (WriteConflict, LockTimeout,
#: PreparedTransactionInProgress, the SnapshotError and NeedRetargettingError categories).
_TRANSIENT_CODES = frozenset({112, 24, 267, 239, 246, 250, 272, 150, 13388, 249})
_NO_SUCH_TRANSACTION = 251
_COMMIT_OR_ABORT = frozenset({"commitTransaction", "abortTransaction"})


def error_labels(
    command: str,
    code: int | None,
    wc_code: int | None,
    *,
    txn_number: bool,
    autocommit: bool,
    no_writes_performed: bool = False,
) -> list[str]:
    """The labels mongod adds to a reply that failed with ``code`` (or carries a
    writeConcernError with ``wc_code``), given whether the command carried a
    ``txnNumber`` and an ``autocommit`` field (i.e. ran in a transaction).

    A retryable write (txnNumber, no autocommit) or a commit/abort gets RetryableWriteError
    for a retriable code, plus NoWritesPerformed when nothing was written; a statement of a
    transaction gets TransientTransactionError instead (never both).
    """
    if code is None and wc_code is None:
        return []
    commit_or_abort = command in _COMMIT_OR_ABORT
    if code is not None and txn_number and autocommit and code != 358:
        if code in _TRANSIENT_CODES:
            transient = True
        elif commit_or_abort:
            transient = code == _NO_SUCH_TRANSACTION and wc_code is None
        else:
            transient = code in RETRIABLE_CODES or code == _NO_SUCH_TRANSACTION
        if transient:
            return ["TransientTransactionError"]
    retryable = txn_number and (not autocommit or commit_or_abort)
    if retryable and (code in RETRIABLE_CODES or wc_code in RETRIABLE_CODES):
        labels = ["RetryableWriteError"]
        if no_writes_performed:
            labels.append("NoWritesPerformed")
        return labels
    return []


def merge_labels(*groups: Sequence[str]) -> list[str]:
    """The labels of every group, each once, in order of appearance."""
    out: list[str] = []
    for group in groups:
        for label in group:
            if label not in out:
                out.append(label)
    return out


class CommandError(Exception):
    """A command failed the way MongoDB reports it: ``{ok: 0, code, codeName, errmsg}``."""

    def __init__(
        self,
        code: int,
        errmsg: str,
        *,
        labels: list[str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(errmsg)
        self.code = code
        self.errmsg = errmsg
        self.labels = labels or []
        self.extra = extra or {}

    def reply(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"ok": 0.0, "errmsg": self.errmsg, "code": self.code}
        doc["codeName"] = CODE_NAMES.get(self.code, f"Location{self.code}")
        if self.labels:
            doc["errorLabels"] = list(self.labels)
        doc.update(self.extra)
        return doc
