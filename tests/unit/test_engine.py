"""The engine: cache, timers, planned writes and transitions, driven by an explicit clock.

Every test passes ``now_ms`` by hand (``NOW`` plus an offset); nothing sleeps. Documents are
written the way pymongo returns them (aware datetimes for ``_updatedAt``). The property test
at the end checks the engine against ``presence.derive`` on the same documents.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from presenced.engine import Engine, PlannedWrite, ReapCandidate, Reason, Refused, Transition
from presenced.presence import (
    ABSENT,
    OFFLINE_PRESENCE,
    InstanceLiveness,
    Presence,
    ReapPlan,
    Status,
    derive,
    from_ms,
    parse_connections,
    parse_instances,
    parse_user,
)

NOW = 1_700_000_000_000
SECOND = 1_000
TTL = 300 * SECOND
TIMEOUT = 60 * SECOND

ONLINE, AWAY, BUSY, OFFLINE = Status.ONLINE, Status.AWAY, Status.BUSY, Status.OFFLINE
CONNECTIONS, STALE = Reason.CONNECTIONS, Reason.STALE
INSTANCE, RECONCILE = Reason.INSTANCE, Reason.RECONCILE


def user_doc(
    uid: str = "u1",
    *,
    status: str | None = "offline",
    status_connection: str | None = "offline",
    **fields: Any,
) -> dict[str, Any]:
    doc: dict[str, Any] = {"_id": uid, "username": f"name-{uid}", **fields}
    if status is not None:
        doc["status"] = status
    if status_connection is not None:
        doc["statusConnection"] = status_connection
    return doc


def conn(
    cid: str = "c1", status: str = "online", updated_ms: int = NOW, instance: str | None = None
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": cid,
        "status": status,
        "_createdAt": from_ms(updated_ms),
        "_updatedAt": from_ms(updated_ms),
    }
    if instance is not None:
        entry["instanceId"] = instance
    return entry


def sessions(uid: str = "u1", *connections: dict[str, Any]) -> dict[str, Any]:
    return {"_id": uid, "connections": list(connections)}


def instance(iid: str, updated_ms: int = NOW) -> dict[str, Any]:
    return {"_id": iid, "_updatedAt": from_ms(updated_ms)}


def set_instances(e: Engine, docs: list[Any], now_ms: int) -> list[Any]:
    """``Engine.set_instances`` with the documents parsed as the caller parses them."""
    return e.set_instances(parse_instances(docs)[0], now_ms)


def engine(max_users: int = 1_000) -> Engine:
    return Engine(ttl_ms=TTL, instance_timeout_ms=TIMEOUT, max_users=max_users)


def connected(e: Engine, uid: str = "u1", **conn_fields: Any) -> PlannedWrite:
    """Load a user with one connection, confirm the write it plans, return that write."""
    write = e.load(uid, user_doc(uid), sessions(uid, conn(**conn_fields)), NOW, CONNECTIONS)
    assert write is not None
    e.confirm(write, NOW)
    return write


# --- planned writes -----------------------------------------------------------------------


def test_connect_plans_online_write_against_stored_offline() -> None:
    e = engine()
    write = e.load("u1", user_doc(), sessions("u1", conn()), NOW, CONNECTIONS)
    assert write == PlannedWrite(
        user_id="u1",
        presence=Presence(ONLINE, ONLINE),
        expected_status="offline",
        expected_status_connection="offline",
        reason=CONNECTIONS,
        username="name-u1",
    )


def test_documents_already_storing_the_answer_plan_no_write() -> None:
    e = engine()
    doc = user_doc(status="online", status_connection="online")
    assert e.load("u1", doc, sessions("u1", conn()), NOW, CONNECTIONS) is None


def test_confirm_then_reload_of_the_written_documents_plans_no_write() -> None:
    e = engine()
    write = e.load("u1", user_doc(), sessions("u1", conn()), NOW, CONNECTIONS)
    assert write is not None
    e.confirm(write, NOW)
    assert e.evaluate("u1", NOW + SECOND, RECONCILE) is None
    written = user_doc(status="online", status_connection="online")
    assert e.load("u1", written, sessions("u1", conn()), NOW + SECOND, CONNECTIONS) is None


def test_missing_stored_fields_are_expected_absent() -> None:
    e = engine()
    write = e.load("u1", user_doc(status=None, status_connection=None), None, NOW, RECONCILE)
    assert write is not None
    assert write.presence == OFFLINE_PRESENCE
    assert (write.expected_status, write.expected_status_connection) == (ABSENT, ABSENT)


@pytest.mark.parametrize("stored", [17, 2.5, True, None, ["online"], {"s": "online"}])
def test_a_stored_value_of_any_type_is_expected_exactly_as_read(stored: object) -> None:
    e = engine()
    doc = user_doc(status="online", status_connection="online")
    doc["status"] = stored
    doc["statusConnection"] = stored
    write = e.load("u1", doc, sessions("u1", conn()), NOW, CONNECTIONS)
    assert write is not None and write.presence == Presence(ONLINE, ONLINE)
    assert write.expected_status == stored and type(write.expected_status) is type(stored)
    assert write.expected_status_connection == stored


def test_unknown_stored_status_is_expected_verbatim_so_the_filter_matches() -> None:
    e = engine()
    write = e.load("u1", user_doc(status="idle"), None, NOW, RECONCILE)
    assert write is not None
    assert write.expected_status == "idle"
    assert [r.reasons for r in e.take_refused()] == [("user_bad_status",)]


def test_busy_status_default_shows_busy_while_connected() -> None:
    e = engine()
    write = e.load("u1", user_doc(statusDefault="busy"), sessions("u1", conn()), NOW, CONNECTIONS)
    assert write is not None
    assert write.presence == Presence(BUSY, ONLINE)


def test_inactive_user_with_a_fresh_connection_is_written_offline() -> None:
    e = engine()
    doc = user_doc(active=False, status="online", status_connection="online")
    write = e.load("u1", doc, sessions("u1", conn()), NOW, CONNECTIONS)
    assert write is not None
    assert write.presence == OFFLINE_PRESENCE


def test_deleted_user_is_forgotten_without_a_write() -> None:
    e = engine()
    connected(e)
    assert e.load("u1", None, sessions("u1", conn()), NOW, CONNECTIONS) is None
    assert "u1" not in e
    assert e.next_deadline() is None


def test_no_sessions_document_means_no_connections_and_no_timer() -> None:
    e = engine()
    assert e.load("u1", user_doc(), None, NOW, RECONCILE) is None
    assert e.presence("u1") == OFFLINE_PRESENCE
    assert e.next_deadline() is None
    assert e.stats().timers_pending == 0


# --- confirm and transitions ----------------------------------------------------------------


def test_confirm_returns_the_transition_from_stored_to_written() -> None:
    e = engine()
    doc = user_doc(statusText="lunch", roles=["user", "bot"])
    write = e.load("u1", doc, sessions("u1", conn(status="away")), NOW, CONNECTIONS)
    assert write is not None
    assert e.confirm(write, NOW) == Transition(
        user_id="u1",
        username="name-u1",
        previous=OFFLINE_PRESENCE,
        current=Presence(AWAY, AWAY),
        reason=CONNECTIONS,
        previous_status="offline",
        status_text="lunch",
        roles=["user", "bot"],
    )
    assert e.stats().transitions == {"connections": 1}


def test_a_transition_carries_missing_payload_fields_as_absent() -> None:
    e = engine()
    doc = {"_id": "u1", "username": "name-u1"}
    write = e.load("u1", doc, sessions("u1", conn()), NOW, CONNECTIONS)
    assert write is not None
    t = e.confirm(write, NOW)
    assert t is not None
    assert t.previous is None
    assert t.previous_status is ABSENT and t.status_text is ABSENT and t.roles is ABSENT


def test_connections_are_counted_with_their_peak_and_the_peak_resets() -> None:
    e = engine()
    e.load("u1", user_doc("u1"), sessions("u1", conn("c1"), conn("c2")), NOW, CONNECTIONS)
    e.load("u2", user_doc("u2"), sessions("u2", conn("c3")), NOW, CONNECTIONS)
    assert (e.stats().connections, e.stats().peak_connections) == (3, 3)
    e.load("u1", user_doc("u1"), sessions("u1"), NOW, CONNECTIONS)
    assert (e.stats().connections, e.stats().peak_connections) == (1, 3)
    e.forget("u2")
    assert (e.stats().connections, e.stats().peak_connections) == (0, 3)
    e.reset_peak()
    assert e.stats().peak_connections == 0


def test_with_unlisted_instances_alive_only_a_timed_out_listed_instance_is_dead() -> None:
    e = Engine(ttl_ms=TTL, instance_timeout_ms=60_000, unlisted_instances_dead=False)
    e.set_instances({"listed": NOW - 61_000}, NOW)
    e.load("u1", user_doc("u1"), sessions("u1", conn("c1", instance="ddp-node")), NOW, RECONCILE)
    e.load("u2", user_doc("u2"), sessions("u2", conn("c2", instance="listed")), NOW, RECONCILE)
    assert e.presence("u1") == Presence(ONLINE, ONLINE)
    assert e.presence("u2") == OFFLINE_PRESENCE


def test_confirming_the_same_write_twice_announces_one_transition() -> None:
    e = engine()
    write = e.load("u1", user_doc(), sessions("u1", conn()), NOW, CONNECTIONS)
    assert write is not None
    assert e.confirm(write, NOW) is not None
    assert e.confirm(write, NOW) is None


def test_two_writes_to_the_same_pair_announce_one_transition() -> None:
    e = engine()
    first = e.load("u1", user_doc(), sessions("u1", conn()), NOW, CONNECTIONS)
    assert first is not None
    e.write_done(first)  # e.g. its answer was lost: landed or not, we could not tell
    second = e.load("u1", user_doc(), sessions("u1", conn()), NOW, CONNECTIONS)
    assert second is not None
    assert e.confirm(first, NOW) is not None
    assert e.confirm(second, NOW) is None


def test_a_load_while_the_same_write_is_under_way_plans_nothing() -> None:
    e = engine()
    first = e.load("u1", user_doc(), sessions("u1", conn()), NOW, CONNECTIONS)
    assert first is not None
    assert e.load("u1", user_doc(), sessions("u1", conn()), NOW, CONNECTIONS) is None
    # Another answer is planned at once (the first write will then conflict).
    away = e.load("u1", user_doc(), sessions("u1", conn(status="away")), NOW, CONNECTIONS)
    assert away is not None and away.presence == Presence(AWAY, AWAY)
    e.write_done(first)  # not the write under way any more: nothing changes
    e.write_done(away)
    again = e.load("u1", user_doc(), sessions("u1", conn()), NOW, CONNECTIONS)
    assert again is not None and again.presence == Presence(ONLINE, ONLINE)


def test_confirm_after_a_reread_saw_the_written_pair_still_announces() -> None:
    e = engine()
    write = e.load("u1", user_doc(), sessions("u1", conn()), NOW, CONNECTIONS)
    assert write is not None
    written = user_doc(status="online", status_connection="online")
    assert e.load("u1", written, sessions("u1", conn()), NOW, CONNECTIONS) is None
    transition = e.confirm(write, NOW)
    assert transition is not None
    assert transition.current == Presence(ONLINE, ONLINE)


def test_a_write_that_landed_after_the_answer_moved_on_is_due_again_at_once() -> None:
    e = engine()
    write = e.load("u1", user_doc(), sessions("u1", conn()), NOW, CONNECTIONS)
    assert write is not None
    # The connection goes stale before the write lands; stored is still offline: no write.
    assert e.due(NOW + TTL + 1) == ["u1"]
    assert e.evaluate("u1", NOW + TTL + 1, STALE) is None
    e.confirm(write, NOW + TTL + 2)  # online landed: now wrong, and nothing else would fix it
    assert e.due(NOW + TTL + 2) == ["u1"]
    follow_up = e.evaluate("u1", NOW + TTL + 2, STALE)
    assert follow_up is not None
    assert follow_up.presence == OFFLINE_PRESENCE
    assert (follow_up.expected_status, follow_up.expected_status_connection) == (
        "online",
        "online",
    )


def test_confirm_of_an_evicted_user_still_announces_with_the_write_username() -> None:
    e = engine(max_users=1)
    write = e.load("u1", user_doc(), sessions("u1", conn()), NOW, CONNECTIONS)
    assert write is not None
    e.load("u2", user_doc("u2"), None, NOW, RECONCILE)
    transition = e.confirm(write, NOW)
    assert transition is not None
    assert transition.username == "name-u1"
    assert transition.previous == OFFLINE_PRESENCE


def test_transition_previous_is_none_when_the_stored_pair_was_not_valid() -> None:
    e = engine()
    write = e.load("u1", user_doc(status=None), sessions("u1", conn()), NOW, CONNECTIONS)
    assert write is not None
    transition = e.confirm(write, NOW)
    assert transition is not None
    assert transition.previous is None


def test_conflict_drops_the_user_so_the_caller_rereads_it() -> None:
    e = engine()
    write = e.load("u1", user_doc(), sessions("u1", conn()), NOW, CONNECTIONS)
    assert write is not None
    e.conflict("u1")
    assert "u1" not in e
    assert e.evaluate("u1", NOW, STALE) is None
    assert e.next_deadline() is None
    assert e.stats().users_tracked == 0
    # The re-read sees what a concurrent writer stored, and plans against that.
    reread = user_doc(status="away", status_connection="away")
    write = e.load("u1", reread, sessions("u1", conn()), NOW, CONNECTIONS)
    assert write is not None
    assert (write.expected_status, write.expected_status_connection) == ("away", "away")


# --- timers ---------------------------------------------------------------------------------


def test_last_heartbeat_stopping_makes_the_user_due_one_ms_after_the_ttl() -> None:
    e = engine()
    connected(e, updated_ms=NOW)
    assert e.next_deadline() == NOW + TTL + 1
    assert e.due(NOW + TTL) == []  # exactly TTL old still counts
    assert e.due(NOW + TTL + 1) == ["u1"]
    write = e.evaluate("u1", NOW + TTL + 1, STALE)
    assert write is not None
    assert write.presence == OFFLINE_PRESENCE
    assert (write.expected_status, write.expected_status_connection) == ("online", "online")
    assert write.reason == "stale"


def test_offline_user_has_no_timer_after_the_stale_evaluation() -> None:
    e = engine()
    connected(e)
    assert e.due(NOW + TTL + 1) == ["u1"]
    e.evaluate("u1", NOW + TTL + 1, STALE)
    assert e.next_deadline() is None
    assert e.due(NOW + 10 * TTL) == []


def test_a_newer_heartbeat_supersedes_the_earlier_timer() -> None:
    e = engine()
    connected(e, updated_ms=NOW)
    later = NOW + 30 * SECOND
    written = user_doc(status="online", status_connection="online")
    assert (
        e.load("u1", written, sessions("u1", conn(updated_ms=later)), later, CONNECTIONS) is None
    )
    assert e.next_deadline() == later + TTL + 1
    assert e.due(NOW + TTL + 1) == []
    assert e.evaluate("u1", NOW + TTL + 1, STALE) is None
    assert e.due(later + TTL + 1) == ["u1"]
    assert e.stats().timers_pending == 0


def test_the_earliest_of_several_connections_sets_the_timer_and_the_next_one_follows() -> None:
    e = engine()
    doc = user_doc(status="online", status_connection="online")
    two = sessions("u1", conn("a", "online", NOW - 10 * SECOND), conn("b", "away", NOW))
    assert e.load("u1", doc, two, NOW, CONNECTIONS) is None
    assert e.next_deadline() == NOW - 10 * SECOND + TTL + 1
    first = NOW - 10 * SECOND + TTL + 1
    assert e.due(first) == ["u1"]
    write = e.evaluate("u1", first, STALE)
    assert write is not None
    assert write.presence == Presence(AWAY, AWAY)
    assert e.next_deadline() == NOW + TTL + 1


def test_due_pops_each_user_once() -> None:
    e = engine()
    connected(e, "u1")
    connected(e, "u2")
    assert sorted(e.due(NOW + TTL + 1)) == ["u1", "u2"]
    assert e.due(NOW + TTL + 1) == []


# --- instances ------------------------------------------------------------------------------


def test_instance_disappearing_returns_its_users_and_evaluate_makes_them_offline() -> None:
    e = engine()
    assert set_instances(e, [instance("i1"), instance("i2")], NOW) == []
    connected(e, "u1", instance="i1")
    connected(e, "u2", instance="i2")
    connected(e, "u3")  # no instance id: only the TTL applies
    assert set_instances(e, [instance("i2")], NOW + SECOND) == ["u1"]
    write = e.evaluate("u1", NOW + SECOND, INSTANCE)
    assert write is not None
    assert write.presence == OFFLINE_PRESENCE
    assert write.reason == "instance"
    assert e.evaluate("u2", NOW + SECOND, INSTANCE) is None


def test_instance_timing_out_makes_its_users_due_one_ms_after_the_timeout() -> None:
    e = engine()
    set_instances(e, [instance("i1", NOW)], NOW)
    connected(e, instance="i1")
    assert e.next_deadline() == NOW + TIMEOUT + 1
    assert e.due(NOW + TIMEOUT) == []
    assert e.due(NOW + TIMEOUT + 1) == ["u1"]
    write = e.evaluate("u1", NOW + TIMEOUT + 1, STALE)
    assert write is not None
    assert write.presence == OFFLINE_PRESENCE


def test_instance_heartbeat_moves_the_timer_later_without_reevaluating_anyone() -> None:
    e = engine()
    set_instances(e, [instance("i1", NOW)], NOW)
    connected(e, instance="i1")
    later = NOW + 10 * SECOND
    assert set_instances(e, [instance("i1", later)], later) == []
    # The old timer fires early; the answer holds and the later instant is scheduled.
    assert e.due(NOW + TIMEOUT + 1) == ["u1"]
    assert e.evaluate("u1", NOW + TIMEOUT + 1, STALE) is None
    assert e.next_deadline() == later + TIMEOUT + 1


def test_empty_instances_collection_means_the_ttl_only() -> None:
    e = engine()
    set_instances(e, [instance("i1")], NOW)
    write = e.load("u1", user_doc(), sessions("u1", conn(instance="ghost")), NOW, CONNECTIONS)
    assert write is None  # an unknown instance is dead while the collection is used
    assert set_instances(e, [], NOW) == ["u1"]
    write = e.evaluate("u1", NOW, INSTANCE)
    assert write is not None
    assert write.presence == Presence(ONLINE, ONLINE)
    assert e.next_deadline() == NOW + TTL + 1


def test_instance_reappearing_brings_its_users_back() -> None:
    e = engine()
    set_instances(e, [instance("i2")], NOW)
    e.load("u1", user_doc(), sessions("u1", conn(instance="i1")), NOW, CONNECTIONS)
    assert set_instances(e, [instance("i1"), instance("i2")], NOW) == ["u1"]
    write = e.evaluate("u1", NOW, INSTANCE)
    assert write is not None
    assert write.presence == Presence(ONLINE, ONLINE)


# --- the bounded cache ----------------------------------------------------------------------


def test_evicted_user_is_not_resurrected_by_its_timer() -> None:
    e = engine(max_users=2)
    set_instances(e, [instance("i1")], NOW)
    for uid in ("u1", "u2", "u3"):
        connected(e, uid, instance="i1")
    assert "u1" not in e
    stats = e.stats()
    assert (stats.users_tracked, stats.timers_pending, stats.evictions) == (2, 2, 1)
    assert sorted(e.due(NOW + TIMEOUT + 1)) == ["u2", "u3"]
    assert e.evaluate("u1", NOW + TIMEOUT + 1, STALE) is None
    assert "u1" not in e
    assert sorted(set_instances(e, [instance("i2")], NOW)) == ["u2", "u3"]


def test_recently_used_user_survives_eviction() -> None:
    e = engine(max_users=2)
    connected(e, "u1")
    connected(e, "u2")
    e.evaluate("u1", NOW, RECONCILE)
    connected(e, "u3")
    assert "u1" in e
    assert "u2" not in e


# --- reaper ---------------------------------------------------------------------------------


def test_reapable_groups_per_user_with_the_newest_dead_connection_as_cutoff() -> None:
    e = engine()
    set_instances(e, [instance("live")], NOW)
    stale = NOW - TTL - 1
    u1 = sessions(
        "u1",
        conn("a", updated_ms=stale - 5 * SECOND),
        conn("b", updated_ms=stale),
        conn("b", updated_ms=stale - SECOND),  # a duplicate entry: one id in the $in
        conn("fresh", updated_ms=NOW),
    )
    u2 = sessions("u2", conn("x", updated_ms=NOW - SECOND, instance="gone"))
    u3 = sessions("u3", conn("y", updated_ms=NOW, instance="live"))
    for uid, doc in (("u1", u1), ("u2", u2), ("u3", u3)):
        e.load(uid, user_doc(uid), doc, NOW, RECONCILE)
    candidates = sorted(e.reapable(NOW), key=lambda c: c.user_id)
    assert candidates == [
        ReapCandidate("u1", ReapPlan(("a", "b"), stale)),
        ReapCandidate("u2", ReapPlan(("x",), NOW - SECOND)),
    ]
    assert candidates[0].cutoff == from_ms(stale)


def test_reapable_leaves_out_an_id_that_a_counted_connection_shares() -> None:
    e = engine()
    set_instances(e, [instance("live")], NOW)
    both = sessions(
        "u1",
        conn("same", updated_ms=NOW - SECOND, instance="live"),
        conn("same", updated_ms=NOW, instance="gone"),
        conn("other", updated_ms=NOW - TTL - 1),
    )
    e.load("u1", user_doc(), both, NOW, RECONCILE)
    assert e.reapable(NOW) == [ReapCandidate("u1", ReapPlan(("other",), NOW - TTL - 1))]


def test_reapable_is_empty_when_everything_counts() -> None:
    e = engine()
    connected(e)
    assert e.reapable(NOW + TTL) == []


# --- malformed input ------------------------------------------------------------------------


def test_malformed_documents_are_reported_with_their_id_never_raised() -> None:
    e = engine()
    doc = user_doc(active="yes", statusDefault="dancing")
    raw = {"connections": [{"status": "online"}, conn("c1", status="weird"), 7, conn("ok")]}
    write = e.load("u1", doc, raw, NOW, RECONCILE)
    assert write is not None
    assert write.presence == Presence(ONLINE, ONLINE)
    e.load("u2", user_doc("u2"), {"connections": "nope"}, NOW, RECONCILE)
    e.load("u3", "not a document", None, NOW, RECONCILE)  # type: ignore[arg-type]
    refused = e.take_refused()
    assert [(r.kind, r.doc_id, r.reasons) for r in refused] == [
        ("users", "u1", ("user_bad_active", "user_bad_status_default")),
        ("sessions", "u1", (
            "connection_missing_id", "connection_bad_status", "connection_not_a_document"
        )),
        ("sessions", "u2", ("connections_not_an_array",)),
        ("users", "u3", ("user_not_a_document",)),
    ]
    assert e.take_refused() == []


def test_refused_content_names_the_bad_values_only() -> None:
    e = engine()
    raw = {"connections": [conn("ok"), conn("c1", status="weird")]}
    e.load("u1", user_doc(statusDefault="dancing"), raw, NOW, RECONCILE)
    # A heartbeat of the good connection changes the document, not the bad content.
    raw_later = {"connections": [conn("ok", updated_ms=NOW + 5), conn("c1", status="weird")]}
    e.load("u1", user_doc(statusDefault="dancing"), raw_later, NOW + 5, CONNECTIONS)
    first, second, third, fourth = e.take_refused()
    assert isinstance(first, Refused) and "dancing" in first.content
    assert first.content == third.content and second.content == fourth.content
    assert "weird" in second.content and "'ok'" not in second.content


def test_stats_count_planned_writes_by_reason() -> None:
    e = engine()
    connected(e)
    e.due(NOW + TTL + 1)
    e.evaluate("u1", NOW + TTL + 1, STALE)
    assert e.stats().writes_planned == {"connections": 1, "stale": 1}


def test_constructor_rejects_a_cache_without_room() -> None:
    with pytest.raises(ValueError, match="max_users"):
        Engine(ttl_ms=TTL, instance_timeout_ms=TIMEOUT, max_users=0)


# --- the engine agrees with the pure derivation ---------------------------------------------

P_TTL = 100
P_TIMEOUT = 50
UIDS = ("u1", "u2", "u3")
INSTANCES = ("i1", "i2")
statuses = st.sampled_from(["online", "away", "busy"])
defaults = st.sampled_from(["online", "away", "busy", "offline", None])

events = st.one_of(
    st.tuples(
        st.just("connect"),
        st.sampled_from(UIDS),
        st.sampled_from(["c1", "c2", "c3"]),
        st.sampled_from([*INSTANCES, "i3", None]),
        statuses,
    ),
    st.tuples(st.just("heartbeat"), st.sampled_from(UIDS), st.integers(0, 3)),
    st.tuples(st.just("set_status"), st.sampled_from(UIDS), st.integers(0, 3), statuses),
    st.tuples(st.just("disconnect"), st.sampled_from(UIDS), st.integers(0, 3)),
    st.tuples(st.just("user"), st.sampled_from(UIDS), defaults, st.booleans()),
    st.tuples(
        st.just("instances"),
        st.dictionaries(st.sampled_from(INSTANCES), st.integers(0, 80), max_size=2),
    ),
    st.tuples(st.just("advance"), st.integers(0, 120)),
    st.tuples(st.just("write"), st.integers(0, 3)),
)


class World:
    """The database as the engine's caller sees it, and a caller that follows the rules."""

    def __init__(self, max_users: int) -> None:
        self.now = NOW
        self.engine = Engine(ttl_ms=P_TTL, instance_timeout_ms=P_TIMEOUT, max_users=max_users)
        self.users: dict[str, dict[str, Any]] = {uid: {"_id": uid} for uid in UIDS}
        self.connections: dict[str, list[dict[str, Any]]] = {uid: [] for uid in UIDS}
        self.instances: list[dict[str, Any]] = []
        self.pending: list[PlannedWrite] = []

    def expected(self, uid: str) -> Presence:
        user, _ = parse_user(self.users[uid])
        conns, _ = parse_connections(self.connections[uid])
        updated, _ = parse_instances(self.instances)
        liveness = InstanceLiveness(updated, P_TIMEOUT)
        return derive(user, conns, self.now, P_TTL, liveness)

    def take(self, write: PlannedWrite | None, uid: str) -> None:
        if write is None:
            return
        assert write.user_id == uid
        assert write.presence == self.expected(uid)
        self.pending.append(write)

    def load(self, uid: str, reason: Reason) -> None:
        doc = {"_id": uid, "connections": self.connections[uid]}
        self.take(self.engine.load(uid, self.users[uid], doc, self.now, reason), uid)

    def land(self, count: int) -> None:
        """Apply the oldest pending writes as the store does: filtered on the expected pair."""
        batch, self.pending = self.pending[:count], self.pending[count:]
        for write in batch:
            doc = self.users[write.user_id]
            stored = (doc.get("status", ABSENT), doc.get("statusConnection", ABSENT))
            new = (write.presence.status.value, write.presence.status_connection.value)
            if stored in ((write.expected_status, write.expected_status_connection), new):
                doc["status"], doc["statusConnection"] = new
                self.engine.confirm(write, self.now)
            else:
                self.engine.conflict(write.user_id)
                self.load(write.user_id, CONNECTIONS)

    def advance(self, dt: int) -> None:
        self.now += dt
        for uid in self.engine.due(self.now):
            self.take(self.engine.evaluate(uid, self.now, STALE), uid)
        for uid in UIDS:
            if uid in self.engine:
                assert self.engine.presence(uid) == self.expected(uid)

    def apply(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "advance":
            self.advance(event[1])
            return
        if kind == "write":
            self.land(event[1])
            return
        if kind == "instances":
            self.instances = [
                {"_id": iid, "_updatedAt": from_ms(self.now - age)} for iid, age in event[1].items()
            ]
            for uid in set_instances(self.engine, self.instances, self.now):
                self.take(self.engine.evaluate(uid, self.now, INSTANCE), uid)
            return
        uid = event[1]
        conns = self.connections[uid]
        if kind == "connect":
            conns.append(conn(event[2], event[4], self.now, event[3]))
        elif kind == "user":
            self.users[uid]["statusDefault"] = event[2]
            self.users[uid]["active"] = event[3]
        elif event[2] < len(conns):
            if kind == "disconnect":
                del conns[event[2]]
            else:
                conns[event[2]] = {**conns[event[2]], "_updatedAt": from_ms(self.now)}
                if kind == "set_status":
                    conns[event[2]]["status"] = event[3]
        self.load(uid, CONNECTIONS)


@settings(max_examples=300, deadline=None)
@given(st.lists(events, max_size=40), st.integers(0, 400), st.sampled_from([1_000, 2]))
def test_engine_answers_match_derive_at_every_instant(
    script: list[tuple[Any, ...]], final_advance: int, max_users: int
) -> None:
    """Every planned write is ``derive`` on the same documents at that instant; after the
    due timers at T are processed, every cached answer is ``derive(..., T)``; once the
    writes have landed nothing more is planned. With ``max_users=2`` users are evicted
    and re-read, and the same holds for those in the cache."""
    world = World(max_users)
    for uid in UIDS:
        world.load(uid, RECONCILE)
    for event in script:
        world.apply(event)
    world.advance(final_advance)
    # Every instance timeout and connection staleness has been seen: the answers hold.
    for uid in UIDS:
        if uid in world.engine:
            assert world.engine.presence(uid) == world.expected(uid)
    # Once every write has landed, nothing more is planned at this instant.
    while world.pending:
        world.land(len(world.pending))
        world.advance(0)  # a write that landed after the answer moved on is due again
    for uid in UIDS:
        assert world.engine.evaluate(uid, world.now, RECONCILE) is None


def test_superseded_timers_do_not_accumulate_without_bound() -> None:
    e = engine()
    doc = user_doc(status="online", status_connection="online")
    for beat in range(5_000):
        at = NOW + beat * SECOND
        e.load("u1", doc, sessions("u1", conn(updated_ms=at)), at, CONNECTIONS)
    assert len(e._heap) <= 2 * e.stats().timers_pending + 1025
    assert e.next_deadline() == NOW + 4_999 * SECOND + TTL + 1


def test_a_read_older_than_the_one_held_is_ignored() -> None:
    e = engine()
    newer = sessions("u1", conn(status="away"))
    assert e.load("u1", user_doc(), newer, NOW, CONNECTIONS, read_seq=5) is not None
    older = sessions("u1", conn(status="online"))
    assert e.load("u1", user_doc(), older, NOW, CONNECTIONS, read_seq=4) is None
    assert e.presence("u1") == Presence(AWAY, AWAY)
    assert e.load("u1", user_doc(), older, NOW, CONNECTIONS, read_seq=6) is not None
    assert e.presence("u1") == Presence(ONLINE, ONLINE)


def test_load_sessions_derives_with_the_users_fields_held() -> None:
    e = engine()
    doc = user_doc(status="online", status_connection="online", statusDefault="busy",
                   statusText="in a meeting", roles=["admin"])
    write = e.load("u1", doc, sessions("u1", conn()), NOW, CONNECTIONS, read_seq=1)
    assert write is not None and write.presence == Presence(BUSY, ONLINE)
    assert e.confirm(write, NOW) is not None
    e.write_done(write)
    # Disconnected: offline, against the pair the confirmed write stored, with the
    # fields held for the announcement.
    write = e.load_sessions("u1", sessions("u1"), NOW + SECOND, CONNECTIONS, read_seq=2)
    assert write == PlannedWrite(
        "u1", OFFLINE_PRESENCE, "busy", "online", CONNECTIONS, "name-u1",
        status_text="in a meeting", roles=["admin"],
    )
    assert e.stats().connections == 0
    assert e.confirm(write, NOW + SECOND) is not None
    e.write_done(write)
    # Back on an instance: busy again (statusDefault held), the instance indexed.
    write = e.load_sessions(
        "u1", sessions("u1", conn("c2", instance="i1")), NOW + 2 * SECOND, CONNECTIONS,
        read_seq=3,
    )
    assert write is not None and write.presence == Presence(BUSY, ONLINE)
    assert (write.expected_status, write.expected_status_connection) == ("offline", "offline")
    assert e.stats().connections == 1
    # An instances view without i1 makes i1 dead: u1, indexed on it, is affected.
    assert set_instances(e, [instance("i2")], NOW + 2 * SECOND) == ["u1"]


def test_load_sessions_needs_a_cached_user_and_orders_reads_by_read_seq() -> None:
    e = engine()
    with pytest.raises(KeyError):
        e.load_sessions("u1", sessions("u1", conn()), NOW, CONNECTIONS, read_seq=1)
    assert "u1" not in e
    online = user_doc(status="online", status_connection="online")
    assert e.load("u1", online, sessions("u1", conn()), NOW, CONNECTIONS, read_seq=5) is None
    # A sessions read older than the documents held is ignored.
    assert e.load_sessions("u1", sessions("u1"), NOW, CONNECTIONS, read_seq=4) is None
    assert e.presence("u1") == Presence(ONLINE, ONLINE)
    # A newer one is taken, and a whole read older than it is ignored after it.
    write = e.load_sessions("u1", sessions("u1"), NOW, CONNECTIONS, read_seq=7)
    assert write is not None and write.presence == OFFLINE_PRESENCE
    e.write_done(write)
    assert e.load("u1", online, sessions("u1", conn()), NOW, CONNECTIONS, read_seq=6) is None
    assert e.presence("u1") == OFFLINE_PRESENCE
    # A forgotten user (after a conflict) is not held: it must be read whole.
    e.conflict("u1")
    with pytest.raises(KeyError):
        e.load_sessions("u1", sessions("u1"), NOW, CONNECTIONS, read_seq=8)


def test_load_sessions_refuses_a_bad_sessions_document() -> None:
    e = engine()
    e.load("u1", user_doc(), None, NOW, CONNECTIONS)
    assert e.load_sessions("u1", "garbage", NOW, CONNECTIONS) is None  # type: ignore[arg-type]
    assert [r.reasons for r in e.take_refused()] == [("sessions_not_a_document",)]
    assert e.presence("u1") == OFFLINE_PRESENCE


def test_counts_connection_says_whether_a_heartbeat_could_change_the_answer() -> None:
    e = engine()
    e.load("u1", user_doc(), sessions("u1", conn("c1"), conn("c2", updated_ms=NOW - TTL)),
           NOW, CONNECTIONS)
    assert e.counts_connection("u1", "c1", NOW)
    assert e.counts_connection("u1", "c2", NOW)  # exactly CACHE_TTL old still counts
    assert not e.counts_connection("u1", "c2", NOW + 1)
    assert not e.counts_connection("u1", "c9", NOW)
    assert not e.counts_connection("u2", "c1", NOW)
