"""The compact forms and shortcuts of the hot path, checked against the plain rules.

``to_ms`` without ``replace``, ``derive_next`` (one pass) against ``derive`` +
``next_change_ms`` + ``reapable``, the engine's reapable set against a walk over every cached
user, and the lazy timers. Every expected value is computed by the slow, obvious route.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from presenced.engine import Engine, ReapCandidate, Reason
from presenced.presence import (
    Connection,
    InstanceLiveness,
    Status,
    UserState,
    derive,
    derive_next,
    from_ms,
    next_change_ms,
    parse_connections,
    parse_instances,
    reap_plan,
    reapable,
    to_ms,
)
from tests.unit.test_engine import P_TIMEOUT, P_TTL, UIDS, World, events

NOW = 1_700_000_000_000
SECOND = 1_000
TTL = 300 * SECOND
TIMEOUT = 60 * SECOND
EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


def us_by_calendar(dt: datetime) -> int:
    """Microseconds since the epoch of a naive UTC datetime, from its fields."""
    days = dt.toordinal() - EPOCH_ORDINAL
    seconds = days * 86_400 + dt.hour * 3_600 + dt.minute * 60 + dt.second
    return seconds * 1_000_000 + dt.microsecond


def ms_by_calendar(dt: datetime) -> int:
    return us_by_calendar(dt) // 1_000


offsets = st.timedeltas(min_value=timedelta(hours=-23, minutes=-59),
                        max_value=timedelta(hours=23, minutes=59))


# --- to_ms ------------------------------------------------------------------------------------


@given(st.datetimes())
def test_to_ms_of_a_naive_datetime_is_its_utc_calendar_value(dt: datetime) -> None:
    assert to_ms(dt) == ms_by_calendar(dt)
    assert to_ms(dt) == to_ms(dt.replace(tzinfo=UTC))


@given(st.datetimes(), offsets)
def test_to_ms_of_an_aware_datetime_counts_its_offset(dt: datetime, offset: timedelta) -> None:
    aware = dt.replace(tzinfo=timezone(offset))
    assert to_ms(aware) == (us_by_calendar(dt) - offset // timedelta(microseconds=1)) // 1_000


def test_to_ms_at_the_edges_of_datetime() -> None:
    assert to_ms(datetime(1970, 1, 1)) == 0
    assert to_ms(datetime(1969, 12, 31, 23, 59, 59, 999_999)) == -1  # floored, as BSON
    assert to_ms(datetime(1970, 1, 1, 0, 0, 0, 999)) == 0
    assert to_ms(datetime.min) == ms_by_calendar(datetime.min) == -62_135_596_800_000
    assert to_ms(datetime.max) == ms_by_calendar(datetime.max) == 253_402_300_799_999
    assert to_ms(datetime.max.replace(tzinfo=UTC)) == 253_402_300_799_999


@given(st.datetimes(), st.booleans())
def test_parse_connections_reads_updated_at_as_to_ms(dt: datetime, aware: bool) -> None:
    updated = dt.replace(tzinfo=UTC) if aware else dt
    raw = [{"id": "c1", "status": "online", "_updatedAt": updated}]
    assert parse_connections(raw) == ([Connection("c1", None, Status.ONLINE, to_ms(dt))], [])


def test_parsed_instance_ids_are_shared_and_statuses_are_the_enum() -> None:
    raw = [{"id": f"c{i}", "instanceId": "".join(["inst", "ance-1"]), "status": "away",
            "_updatedAt": datetime(2025, 1, 1)} for i in range(2)]
    (a, b), _ = parse_connections(raw)
    assert a.instance_id == "instance-1" and a.instance_id is b.instance_id
    assert type(a.status) is Status and a.status is Status.AWAY


# --- derive_next --------------------------------------------------------------------------------

statuses = st.sampled_from(list(Status))
connections = st.lists(
    st.builds(
        Connection,
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from([None, "i1", "i2", "i3"]),
        statuses,
        st.integers(NOW - 2 * TTL, NOW + TTL),
    ),
    max_size=5,
)
liveness = st.builds(
    InstanceLiveness,
    st.dictionaries(st.sampled_from(["i1", "i2"]),
                    st.none() | st.integers(NOW - 2 * TIMEOUT, NOW + TIMEOUT), max_size=2),
    st.just(TIMEOUT),
    st.booleans(),
)


@settings(max_examples=500)
@given(st.builds(UserState, st.booleans(), statuses), connections, liveness,
       st.integers(NOW - TTL, NOW + 2 * TTL))
def test_derive_next_is_derive_next_change_and_reapable_in_one_pass(
    user: UserState, conns: list[Connection], live: InstanceLiveness, now: int
) -> None:
    derived = derive_next(user, conns, now, TTL, live)
    assert derived.presence == derive(user, conns, now, TTL, live)
    assert derived.next_change_ms == next_change_ms(conns, now, TTL, live)
    assert derived.uncounted == bool(reapable(conns, now, TTL, live))


# --- the engine's reapable set ------------------------------------------------------------------


def user_doc(uid: str) -> dict[str, Any]:
    return {"_id": uid, "username": uid, "status": "online", "statusConnection": "online"}


def conn(cid: str, updated_ms: int, instance: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": cid, "status": "online", "_updatedAt": from_ms(updated_ms)}
    if instance is not None:
        entry["instanceId"] = instance
    return entry


def load(e: Engine, uid: str, *conns: dict[str, Any], now: int = NOW) -> None:
    e.load(uid, user_doc(uid), {"_id": uid, "connections": list(conns)}, now, Reason.CONNECTIONS)


def ids(candidates: list[ReapCandidate]) -> list[Any]:
    return sorted(c.user_id for c in candidates)


def test_a_connection_gone_stale_by_its_timer_is_reapable_before_and_after_it_fires() -> None:
    e = Engine(ttl_ms=TTL, instance_timeout_ms=TIMEOUT)
    load(e, "u1", conn("c1", NOW))
    load(e, "u2", conn("c2", NOW + SECOND))
    assert e.reapable(NOW + TTL) == []
    assert ids(e.reapable(NOW + TTL + 1)) == ["u1"]  # the timer is due, not yet popped
    assert e.due(NOW + TTL + 1) == ["u1"]
    assert ids(e.reapable(NOW + TTL + 1)) == ["u1"]  # popped, not yet evaluated
    e.evaluate("u1", NOW + TTL + 1, Reason.STALE)
    assert ids(e.reapable(NOW + TTL + 1)) == ["u1"]
    load(e, "u1", now=NOW + TTL + 2)  # the reaper pulled it: the reload shows none
    assert e.reapable(NOW + TTL + 2) == []
    assert ids(e.reapable(NOW + TTL + SECOND + 1)) == ["u2"]


def test_users_of_an_instance_that_dies_are_reapable_without_being_evaluated() -> None:
    e = Engine(ttl_ms=TTL, instance_timeout_ms=TIMEOUT)
    e.set_instances({"i1": NOW, "i2": NOW}, NOW)
    load(e, "u1", conn("c1", NOW, "i1"))
    load(e, "u2", conn("c2", NOW, "i2"))
    load(e, "u3", conn("c3", NOW))
    assert e.reapable(NOW) == []
    e.set_instances({"i2": NOW}, NOW)  # i1 gone: its users are not evaluated here
    assert ids(e.reapable(NOW)) == ["u1"]
    e.set_instances({"i1": NOW, "i2": NOW}, NOW)  # back: nothing to reap any more
    assert e.reapable(NOW) == []
    assert ids(e.reapable(NOW + TIMEOUT + 1)) == ["u1", "u2"]  # both timed out


def test_forgotten_and_evicted_users_leave_the_reapable_set() -> None:
    e = Engine(ttl_ms=TTL, instance_timeout_ms=TIMEOUT, max_users=2)
    load(e, "u1", conn("c1", NOW - TTL - 1))
    load(e, "u2", conn("c2", NOW - TTL - 1))
    assert ids(e.reapable(NOW)) == ["u1", "u2"]
    e.forget("u1")
    assert ids(e.reapable(NOW)) == ["u2"]
    load(e, "u3", conn("c3", NOW))
    load(e, "u4", conn("c4", NOW))  # evicts u2
    assert "u2" not in e
    assert e.reapable(NOW) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(events, max_size=40), st.integers(0, 400), st.sampled_from([1_000, 2]))
def test_reapable_is_the_reap_plan_of_every_cached_user(
    script: list[tuple[Any, ...]], later: int, max_users: int
) -> None:
    """After each event, and later with no event (timers due but not popped), the engine's
    candidates are exactly ``reap_plan`` over every cached user's documents."""
    world = World(max_users)
    for uid in UIDS:
        world.load(uid, Reason.RECONCILE)

    def check(now: int) -> None:
        live = InstanceLiveness(parse_instances(world.instances)[0], P_TIMEOUT)
        expected = []
        for uid in UIDS:
            if uid in world.engine:
                conns, _ = parse_connections(world.connections[uid])
                plan = reap_plan(conns, now, P_TTL, live)
                if plan is not None:
                    expected.append(ReapCandidate(uid, plan))
        found = sorted(world.engine.reapable(now), key=lambda c: str(c.user_id))
        assert found == expected

    for event in script:
        world.apply(event)
        check(world.now)
    check(world.now + later)


# --- timers ---------------------------------------------------------------------------------------


def test_heartbeats_move_the_deadline_without_growing_the_heap() -> None:
    e = Engine(ttl_ms=TTL, instance_timeout_ms=TIMEOUT)
    for beat in range(100):
        load(e, "u1", conn("c1", NOW + beat * SECOND), now=NOW + beat * SECOND)
        assert e.next_deadline() == NOW + beat * SECOND + TTL + 1
    assert len(e._heap) == 1
    assert e.due(NOW + 98 * SECOND + TTL + 1) == []
    assert e.due(NOW + 99 * SECOND + TTL + 1) == ["u1"]
    assert e.stats().timers_pending == 0
    assert e.next_deadline() is None


def test_a_timer_moved_earlier_fires_at_the_earlier_instant() -> None:
    e = Engine(ttl_ms=TTL, instance_timeout_ms=TIMEOUT)
    load(e, "u1", conn("c1", NOW))
    load(e, "u1", conn("c1", NOW - 10 * SECOND))
    assert e.next_deadline() == NOW - 10 * SECOND + TTL + 1
    assert e.due(NOW - 10 * SECOND + TTL + 1) == ["u1"]
    assert e.due(NOW + TTL + 1) == []


def test_user_ids_of_different_types_share_an_instant() -> None:
    e = Engine(ttl_ms=TTL, instance_timeout_ms=TIMEOUT)
    uids: list[Any] = ["u1", 7, ("tuple", 1), "u0", 3]
    for uid in uids:
        e.load(uid, user_doc("x"), {"connections": [conn("c", NOW)]}, NOW, Reason.CONNECTIONS)
    assert e.next_deadline() == NOW + TTL + 1
    assert sorted(map(str, e.due(NOW + TTL + 1))) == sorted(map(str, uids))
