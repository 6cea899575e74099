"""The emulator's transaction state machine (``presenced.testing.mongo.transactions``):
every transition comes from its table, and an event the table does not list fails; and
what the storage does with the documents a transaction holds, beyond the wire suite
(``test_transactions.py``): the TTL monitor and snapshots leave them alone."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import pytest

from presenced.testing.mongo.storage import Storage
from presenced.testing.mongo.transactions import (
    ABORT,
    ABORTED,
    COMMIT,
    COMMITTED,
    IN_PROGRESS,
    TRANSITIONS,
    IllegalTransition,
    Transaction,
)


def test_a_transaction_starts_in_progress() -> None:
    txn = Transaction({"id": b"s"}, 1)
    assert txn.in_progress and not txn.committed and not txn.aborted


@pytest.mark.parametrize(("event", "state"), [(COMMIT, COMMITTED), (ABORT, ABORTED)])
def test_an_in_progress_transaction_ends(event: str, state: str) -> None:
    txn = Transaction({"id": b"s"}, 1)
    assert txn.fire(event) == IN_PROGRESS
    assert txn.state == state


def test_commit_again_is_allowed_and_abort_after_commit_changes_nothing() -> None:
    txn = Transaction({"id": b"s"}, 1)
    txn.fire(COMMIT)
    assert txn.fire(COMMIT) == COMMITTED and txn.committed
    assert txn.fire(ABORT) == COMMITTED and txn.committed


def test_committing_an_aborted_transaction_is_illegal() -> None:
    txn = Transaction({"id": b"s"}, 1)
    txn.fire(ABORT)
    with pytest.raises(IllegalTransition) as exc:
        txn.fire(COMMIT)
    assert (exc.value.state, exc.value.event) == (ABORTED, COMMIT)
    assert txn.aborted


def test_unknown_events_are_illegal_in_every_state() -> None:
    for state in (IN_PROGRESS, COMMITTED, ABORTED):
        txn = Transaction({"id": b"s"}, 1, state=state)
        with pytest.raises(IllegalTransition):
            txn.fire("prepare")
        assert txn.state == state


def test_every_transition_leads_to_a_known_state() -> None:
    states = {IN_PROGRESS, COMMITTED, ABORTED}
    for (state, event), new in TRANSITIONS.items():
        assert state in states and new in states and event in (COMMIT, ABORT)


# -- what the storage does with transactions it holds documents for ----------------------


def _storage_with_txn(*docs: dict[str, Any], ttl: bool = False) -> tuple[Storage, Transaction]:
    """A storage holding ``docs`` committed, then a transaction started (its snapshot)."""
    storage = Storage()
    storage.lock.acquire()  # as the command layer holds it
    if ttl:
        storage.create_index("d", "c", {"key": {"at": 1}, "name": "at_1",
                                        "expireAfterSeconds": 1})
    for doc in docs:
        storage.insert("d", "c", doc)
    state = storage.use_txn_number(b"s", {"id": b"s"}, 1, start=True)
    assert state.txn is not None
    return storage, state.txn


def test_ttl_pass_leaves_a_document_a_transaction_holds() -> None:
    storage, txn = _storage_with_txn({"_id": 1, "at": datetime(2000, 1, 1)}, ttl=True)
    storage.active_txn = txn
    storage.update("d", "c", {"_id": 1}, {"$set": {"x": 1}}, multi=False, upsert=False)
    storage.active_txn = None
    started = time.monotonic()
    assert storage.expire_ttl() == 0  # without waiting for the transaction
    assert time.monotonic() - started < 1.0
    storage.abort_transaction(txn)
    assert storage.expire_ttl() == 1


def test_a_snapshot_keeps_only_committed_documents() -> None:
    storage, txn = _storage_with_txn({"_id": 1, "n": 0})
    storage.active_txn = txn
    storage.update("d", "c", {"_id": 1}, {"$set": {"n": 1}}, multi=False, upsert=False)
    storage.insert("d", "c", {"_id": 2})
    storage.active_txn = None
    assert storage.dump()["catalog"][("d", "c")]["documents"] == [{"_id": 1, "n": 0}]
    storage.commit_transaction(txn)
    assert storage.dump()["catalog"][("d", "c")]["documents"] == [
        {"_id": 1, "n": 1}, {"_id": 2}]


def test_an_ended_transaction_holds_nothing() -> None:
    storage, txn = _storage_with_txn({"_id": 1, "n": 0})
    storage.active_txn = txn
    storage.update("d", "c", {"_id": 1}, {"$set": {"n": 1}}, multi=False, upsert=False)
    storage.active_txn = None
    assert storage.find("d", "c", {}) == [{"_id": 1, "n": 0}]
    storage.commit_transaction(txn)
    assert txn.before == {} and txn.snapshot == {}
    storage.update("d", "c", {"_id": 1}, {"$inc": {"n": 1}}, multi=False, upsert=False)
    assert storage.find("d", "c", {}) == [{"_id": 1, "n": 2}]
