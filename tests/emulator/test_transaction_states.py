"""The emulator's transaction state machine (``presenced.testing.mongo.transactions``):
every transition comes from its table, and an event the table does not list fails."""

from __future__ import annotations

import pytest

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
