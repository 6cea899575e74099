"""Multi-document transactions: their state machine, and what each one holds.

The states and the events that move a transaction between them are a table
(:data:`TRANSITIONS`, in the manner of h11's ``_state.py``); :func:`Transaction.fire`
is the only way a state changes, and an event the table does not list for the current
state raises :class:`IllegalTransition`. Nothing else compares state strings: callers
ask :attr:`Transaction.in_progress` / ``committed`` / ``aborted``.

Isolation (what :class:`~presenced.testing.mongo.storage.Storage` does with these):

- a transaction's writes are applied to the store as they run; ``before`` keeps the
  committed image of every document it changed (its "lock" on that document), so that
  readers outside see the committed image, an abort can put it back, and another
  writer can be refused (a transaction: WriteConflict) or made to wait (a plain write);
- ``snapshot`` keeps, for the documents other writers committed changes to after this
  transaction started, their image as of its start: its reads substitute them, and its
  writes to them fail with WriteConflict.

Must never: touch the store itself, or know the wire protocol.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

Document = dict[str, Any]
#: (db, collection, collection uuid bytes, store key): one document of one collection life.
DocKey = tuple[str, str, bytes, Any]

# -- states and events ------------------------------------------------------------------
IN_PROGRESS = "inProgress"
COMMITTED = "committed"
ABORTED = "aborted"

COMMIT = "commit"
ABORT = "abort"

#: (state, event) -> new state. Committing a committed transaction again is allowed
#: (commitTransaction is retryable); aborting an ended one is a no-op for the store's
#: internal aborts (a session ending, a newer txnNumber, expiry) and is listed for them.
TRANSITIONS: dict[tuple[str, str], str] = {
    (IN_PROGRESS, COMMIT): COMMITTED,
    (IN_PROGRESS, ABORT): ABORTED,
    (COMMITTED, COMMIT): COMMITTED,
    (COMMITTED, ABORT): COMMITTED,
    (ABORTED, ABORT): ABORTED,
}


class IllegalTransition(RuntimeError):
    """An event the state machine does not allow in the current state."""

    def __init__(self, state: str, event: str) -> None:
        super().__init__(f"transaction: event {event!r} is not allowed in state {state!r}")
        self.state = state
        self.event = event


@dataclass
class Transaction:
    """One multi-document transaction: (session id, txnNumber).

    ``entries`` holds the oplog entries its writes will log at commit (without
    ts/t/v/wall) with their pre/post images; ``before`` the first before-image of every
    document it changed, in touch order (``MISSING`` for one it created); ``snapshot``
    the images as of its start of documents others changed since.
    """

    lsid: Document
    txn_number: int
    state: str = IN_PROGRESS
    entries: list[tuple[Document, Any, Any]] = field(default_factory=list)
    before: dict[DocKey, Any] = field(default_factory=dict)
    snapshot: dict[DocKey, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def fire(self, event: str) -> str:
        """Apply ``event``; returns the state it left (so callers know whether it moved)."""
        old = self.state
        new = TRANSITIONS.get((old, event))
        if new is None:
            raise IllegalTransition(old, event)
        self.state = new
        return old

    @property
    def in_progress(self) -> bool:
        return self.state == IN_PROGRESS

    @property
    def committed(self) -> bool:
        return self.state == COMMITTED

    @property
    def aborted(self) -> bool:
        return self.state == ABORTED


@dataclass
class SessionState:
    """The newest txnNumber a session used, and its transaction if it started one."""

    txn_number: int
    txn: Transaction | None = None


class WriteBlocked(Exception):
    """A write touched a document an in-progress transaction holds (internal: a
    transaction's statement turns it into WriteConflict, a plain write waits)."""

    def __init__(self, holder: Transaction | None) -> None:
        super().__init__("write blocked by a transaction in progress")
        self.holder = holder


__all__ = [
    "ABORT", "ABORTED", "COMMIT", "COMMITTED", "IN_PROGRESS", "TRANSITIONS", "DocKey",
    "IllegalTransition", "SessionState", "Transaction", "WriteBlocked",
]
