"""The presence core against the contract (design notes: "Derivation", "Dead instances").

Expected values are written out by hand from the contract and Rocket.Chat's own
``processConnectionStatus`` / ``processStatus``; none is computed by the code under test.
Times are integer milliseconds; ``NOW`` is an arbitrary fixed instant.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from presenced.presence import (
    ABSENT,
    NO_INSTANCES,
    OFFLINE_PRESENCE,
    Connection,
    InstanceLiveness,
    Presence,
    ReapPlan,
    Status,
    UserState,
    counts,
    derive,
    from_ms,
    needs_write,
    next_change_ms,
    parse_connections,
    parse_instances,
    parse_user,
    reap_plan,
    reapable,
    to_ms,
)

NOW = 1_700_000_000_000
SECOND = 1_000
MINUTE = 60 * SECOND
TTL = 300 * SECOND  # Rocket.Chat's CACHE_TTL default, 5 minutes
TIMEOUT = 60 * SECOND  # instance timeout

ONLINE, AWAY, BUSY, OFFLINE = Status.ONLINE, Status.AWAY, Status.BUSY, Status.OFFLINE
USER = UserState()  # active, statusDefault online


def conn(
    status: Status, age_ms: int = 0, cid: str = "c1", instance: str | None = None
) -> Connection:
    return Connection(id=cid, instance_id=instance, status=status, updated_ms=NOW - age_ms)


def user(status_default: Status = ONLINE, active: bool = True) -> UserState:
    return UserState(active=active, status_default=status_default)


def pair(status: Status, status_connection: Status) -> Presence:
    return Presence(status=status, status_connection=status_connection)


# --- the contract's examples ------------------------------------------------------------


@pytest.mark.parametrize(
    ("connections", "status_default", "expected"),
    [
        pytest.param([conn(ONLINE)], ONLINE, pair(ONLINE, ONLINE), id="online-online"),
        pytest.param([conn(AWAY)], ONLINE, pair(AWAY, AWAY), id="away-online"),
        pytest.param([conn(ONLINE)], BUSY, pair(BUSY, ONLINE), id="online-busy"),
        pytest.param([conn(AWAY)], OFFLINE, pair(OFFLINE, AWAY), id="away-invisible"),
        pytest.param(
            [conn(AWAY, cid="a"), conn(ONLINE, cid="b")],
            ONLINE,
            pair(ONLINE, ONLINE),
            id="away,online-online",
        ),
        # The contract's example says busy/busy; Rocket.Chat's fold (and the contract's own
        # rule 2, read literally) gives away/away. The release wins: see the test below.
        pytest.param(
            [conn(BUSY, cid="a"), conn(AWAY, cid="b")],
            ONLINE,
            pair(AWAY, AWAY),
            id="busy,away-online",
        ),
        pytest.param([], BUSY, pair(OFFLINE, OFFLINE), id="none-busy"),
        pytest.param(
            [conn(ONLINE, 6 * MINUTE, cid="a"), conn(AWAY, 4 * MINUTE, cid="b")],
            ONLINE,
            pair(AWAY, AWAY),
            id="online-6min,away-4min-online-ttl300",
        ),
    ],
)
def test_contract_examples(
    connections: list[Connection], status_default: Status, expected: Presence
) -> None:
    assert derive(user(status_default), connections, NOW, TTL, NO_INSTANCES) == expected


def test_busy_then_away_gives_the_last_non_offline_as_rocketchat_does() -> None:
    # Rocket.Chat's processConnectionStatus(current, status): online stays online, otherwise
    # any non-offline status replaces the accumulator. reduce over [busy, away] -> away.
    # The contract's example line says busy/busy (its "first non-offline" summary); where
    # the contract and a release disagree, the release wins.
    connections = [conn(BUSY, cid="a"), conn(AWAY, cid="b")]
    assert derive(USER, connections, NOW, TTL, NO_INSTANCES) == pair(AWAY, AWAY)


# --- rule 1: the CACHE_TTL boundary -------------------------------------------------------


def test_connection_exactly_ttl_old_counts() -> None:
    assert counts(conn(ONLINE, TTL), NOW, TTL, NO_INSTANCES) is True
    assert derive(USER, [conn(ONLINE, TTL)], NOW, TTL, NO_INSTANCES) == pair(ONLINE, ONLINE)


def test_connection_one_ms_older_than_ttl_does_not_count() -> None:
    assert counts(conn(ONLINE, TTL + 1), NOW, TTL, NO_INSTANCES) is False
    assert derive(USER, [conn(ONLINE, TTL + 1)], NOW, TTL, NO_INSTANCES) == OFFLINE_PRESENCE


def test_connection_dated_in_the_future_counts() -> None:
    assert counts(conn(AWAY, -5 * SECOND), NOW, TTL, NO_INSTANCES) is True


# --- rule 2: the fold ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        pytest.param([AWAY, ONLINE], ONLINE, id="away,online"),
        pytest.param([ONLINE, AWAY], ONLINE, id="online,away"),
        pytest.param([BUSY, AWAY], AWAY, id="busy,away"),
        pytest.param([AWAY, BUSY], BUSY, id="away,busy"),
        pytest.param([OFFLINE, AWAY], AWAY, id="offline,away"),
        pytest.param([AWAY, OFFLINE], AWAY, id="away,offline"),
        pytest.param([BUSY, OFFLINE, AWAY, OFFLINE], AWAY, id="busy,offline,away,offline"),
        pytest.param([BUSY, ONLINE, AWAY], ONLINE, id="busy,online,away"),
        pytest.param([OFFLINE], OFFLINE, id="offline"),
        pytest.param([OFFLINE, OFFLINE], OFFLINE, id="offline,offline"),
    ],
)
def test_fold_of_counted_connections_in_array_order(
    statuses: list[Status], expected: Status
) -> None:
    connections = [conn(s, cid=f"c{i}") for i, s in enumerate(statuses)]
    presence = derive(USER, connections, NOW, TTL, NO_INSTANCES)
    assert presence.status_connection == expected


def test_duplicate_connection_entries_each_count() -> None:
    connections = [conn(AWAY, cid="dup"), conn(AWAY, cid="dup")]
    assert derive(USER, connections, NOW, TTL, NO_INSTANCES) == pair(AWAY, AWAY)


def test_stale_duplicate_is_ignored_and_fresh_duplicate_counts() -> None:
    connections = [conn(ONLINE, TTL + 1, cid="dup"), conn(AWAY, 0, cid="dup")]
    assert derive(USER, connections, NOW, TTL, NO_INSTANCES) == pair(AWAY, AWAY)


def test_stale_online_does_not_beat_fresh_busy() -> None:
    connections = [conn(ONLINE, TTL + 1, cid="a"), conn(BUSY, 0, cid="b")]
    assert derive(USER, connections, NOW, TTL, NO_INSTANCES) == pair(BUSY, BUSY)


def test_only_offline_connections_give_offline() -> None:
    assert derive(USER, [conn(OFFLINE)], NOW, TTL, NO_INSTANCES) == OFFLINE_PRESENCE


# --- rules 3-5: statusDefault and active ---------------------------------------------------


@pytest.mark.parametrize(
    ("status_default", "expected"),
    [
        pytest.param(ONLINE, pair(AWAY, AWAY), id="online"),
        pytest.param(BUSY, pair(BUSY, AWAY), id="busy"),
        pytest.param(AWAY, pair(AWAY, AWAY), id="away"),
        pytest.param(OFFLINE, pair(OFFLINE, AWAY), id="offline-invisible"),
    ],
)
def test_status_default_applies_while_connected(status_default: Status, expected: Presence) -> None:
    assert derive(user(status_default), [conn(AWAY)], NOW, TTL, NO_INSTANCES) == expected


@pytest.mark.parametrize(
    ("raw_user", "expected"),
    [
        pytest.param({}, pair(ONLINE, ONLINE), id="missing"),
        pytest.param({"statusDefault": None}, pair(ONLINE, ONLINE), id="null"),
        pytest.param({"statusDefault": "dnd"}, pair(ONLINE, ONLINE), id="invalid-string"),
        pytest.param({"statusDefault": 3}, pair(ONLINE, ONLINE), id="invalid-type"),
        pytest.param({"statusDefault": "busy"}, pair(BUSY, ONLINE), id="busy"),
        pytest.param({"statusDefault": "away"}, pair(AWAY, ONLINE), id="away"),
        pytest.param({"statusDefault": "offline"}, pair(OFFLINE, ONLINE), id="offline"),
    ],
)
def test_status_default_as_read_from_the_user_document(
    raw_user: dict[str, object], expected: Presence
) -> None:
    state, _ = parse_user(raw_user)
    assert derive(state, [conn(ONLINE)], NOW, TTL, NO_INSTANCES) == expected


@pytest.mark.parametrize("status_default", [ONLINE, BUSY, AWAY, OFFLINE])
def test_no_connection_is_offline_whatever_status_default(status_default: Status) -> None:
    assert derive(user(status_default), [], NOW, TTL, NO_INSTANCES) == OFFLINE_PRESENCE


@pytest.mark.parametrize("status_default", [ONLINE, BUSY, AWAY, OFFLINE])
def test_inactive_user_is_offline_whatever_the_connections(status_default: Status) -> None:
    connections = [conn(ONLINE, cid="a"), conn(BUSY, cid="b")]
    state = user(status_default, active=False)
    assert derive(state, connections, NOW, TTL, NO_INSTANCES) == OFFLINE_PRESENCE


# --- dead instances -----------------------------------------------------------------------


def live(**updated_ago: int | None) -> InstanceLiveness:
    """Instances by id, each with how long ago (ms) it last bumped ``_updatedAt``."""
    return InstanceLiveness(
        {iid: None if ago is None else NOW - ago for iid, ago in updated_ago.items()}, TIMEOUT
    )


def test_connection_on_instance_absent_from_nonempty_instances_does_not_count() -> None:
    liveness = live(i_live=0)
    assert counts(conn(ONLINE, instance="i_gone"), NOW, TTL, liveness) is False
    assert derive(USER, [conn(ONLINE, instance="i_gone")], NOW, TTL, liveness) == OFFLINE_PRESENCE


def test_empty_instances_means_only_the_ttl_applies() -> None:
    liveness = InstanceLiveness({}, TIMEOUT)
    assert derive(USER, [conn(ONLINE, instance="i_gone")], NOW, TTL, liveness) == pair(
        ONLINE, ONLINE
    )
    assert counts(conn(ONLINE, TTL + 1, instance="i_gone"), NOW, TTL, liveness) is False


def test_instance_exactly_timeout_old_is_alive() -> None:
    liveness = live(i1=TIMEOUT)
    assert liveness.is_dead("i1", NOW) is False
    assert counts(conn(ONLINE, instance="i1"), NOW, TTL, liveness) is True


def test_instance_one_ms_older_than_timeout_is_dead() -> None:
    liveness = live(i1=TIMEOUT + 1)
    assert liveness.is_dead("i1", NOW) is True
    assert counts(conn(ONLINE, instance="i1"), NOW, TTL, liveness) is False


def test_connection_without_instance_id_is_never_dead_by_instance() -> None:
    liveness = live(i1=TIMEOUT + 1)
    assert liveness.is_dead(None, NOW) is False
    assert derive(USER, [conn(BUSY, instance=None)], NOW, TTL, liveness) == pair(BUSY, BUSY)


def test_instance_with_unknown_updated_at_is_not_dead() -> None:
    liveness = live(i1=None)
    assert liveness.is_dead("i1", NOW + 10 * TIMEOUT) is False


def test_dead_instance_online_connection_does_not_beat_live_away() -> None:
    liveness = live(i_live=0)
    connections = [conn(ONLINE, cid="a", instance="i_gone"), conn(AWAY, cid="b", instance="i_live")]
    assert derive(USER, connections, NOW, TTL, liveness) == pair(AWAY, AWAY)


def test_instances_next_change_is_the_first_instance_timeout() -> None:
    # i1 dies at NOW - 50s + 60s + 1 = NOW + 10_001; i2 at NOW + 50_001; i3 is already dead.
    liveness = live(i1=50 * SECOND, i2=10 * SECOND, i3=TIMEOUT + 1, i4=None)
    assert liveness.next_change_ms(NOW) == NOW + 10_001


def test_instances_next_change_is_none_when_none_can_time_out() -> None:
    assert live(i3=TIMEOUT + 1, i4=None).next_change_ms(NOW) is None
    assert NO_INSTANCES.next_change_ms(NOW) is None


# --- next_change_ms -----------------------------------------------------------------------


def test_next_change_is_the_first_ms_the_connection_goes_stale() -> None:
    # updated NOW - 10s; still counts at NOW - 10s + 300s, stale one ms later.
    connections = [conn(ONLINE, 10 * SECOND)]
    assert next_change_ms(connections, NOW, TTL, NO_INSTANCES) == NOW + 290_001


def test_next_change_of_a_connection_exactly_ttl_old_is_the_next_ms() -> None:
    assert next_change_ms([conn(ONLINE, TTL)], NOW, TTL, NO_INSTANCES) == NOW + 1


def test_next_change_is_the_minimum_over_counted_connections() -> None:
    connections = [
        conn(ONLINE, 10 * SECOND, cid="a"),
        conn(AWAY, 100 * SECOND, cid="b"),
        conn(BUSY, 50 * SECOND, cid="c"),
        conn(BUSY, TTL + 1, cid="stale"),
    ]
    assert next_change_ms(connections, NOW, TTL, NO_INSTANCES) == NOW + 200_001


def test_next_change_includes_the_instance_timing_out() -> None:
    # The connection is fresh (stale at NOW + 300_001) but its instance dies at NOW + 10_001.
    liveness = live(i1=50 * SECOND)
    connections = [conn(ONLINE, 0, instance="i1")]
    assert next_change_ms(connections, NOW, TTL, liveness) == NOW + 10_001


def test_next_change_ignores_instances_of_connections_that_do_not_count() -> None:
    liveness = live(i1=50 * SECOND, i2=0)
    connections = [conn(ONLINE, TTL + 1, cid="a", instance="i1"), conn(AWAY, 0, "b", "i2")]
    assert next_change_ms(connections, NOW, TTL, liveness) == NOW + 60_001


@pytest.mark.parametrize(
    "connections",
    [
        pytest.param([], id="no-connections"),
        pytest.param([conn(ONLINE, TTL + 1)], id="all-stale"),
        pytest.param([conn(ONLINE, 0, instance="i_gone")], id="dead-instance"),
    ],
)
def test_next_change_is_none_when_nothing_counts(connections: list[Connection]) -> None:
    assert next_change_ms(connections, NOW, TTL, live(i_live=0)) is None


def test_answer_holds_until_next_change_and_changes_at_it() -> None:
    connections = [conn(AWAY, 10 * SECOND)]
    at = NOW + 290_001
    assert derive(USER, connections, at - 1, TTL, NO_INSTANCES) == pair(AWAY, AWAY)
    assert derive(USER, connections, at, TTL, NO_INSTANCES) == OFFLINE_PRESENCE


# --- reapable -----------------------------------------------------------------------------


def test_reapable_lists_stale_and_dead_instance_connections_in_order() -> None:
    liveness = live(i_live=0, i_old=TIMEOUT + 1)
    fresh = conn(ONLINE, 0, "fresh", "i_live")
    stale = conn(AWAY, TTL + 1, "stale", "i_live")
    gone = conn(ONLINE, 0, "gone", "i_gone")
    old = conn(BUSY, 0, "old", "i_old")
    boundary = conn(AWAY, TTL, "boundary", None)
    connections = [stale, fresh, gone, boundary, old, stale]
    assert reapable(connections, NOW, TTL, liveness) == [stale, gone, old, stale]


def test_reapable_is_empty_when_everything_counts() -> None:
    assert reapable([conn(ONLINE), conn(AWAY, TTL, cid="c2")], NOW, TTL, NO_INSTANCES) == []


# --- reap_plan ----------------------------------------------------------------------------


def guarded_pull(connections: list[Connection], plan: ReapPlan | None) -> list[Connection]:
    """What MongoDB leaves after the reaper's ``$pull`` with ``plan``."""
    if plan is None:
        return connections
    return [
        c for c in connections
        if not (c.id in plan.connection_ids and c.updated_ms <= plan.cutoff_ms)
    ]


def test_reap_plan_never_pulls_a_live_connection_sharing_an_id_with_a_dead_one() -> None:
    # The case that took a live connection: c1 live (10 s old), a second c1 on a dead
    # instance (5 s old), c2 stale. Pulling [c1, c2] up to the dead c1's _updatedAt would
    # remove the live c1 too.
    liveness = live(i_live=0)
    live_c1 = conn(ONLINE, 10 * SECOND, "c1", "i_live")
    dead_c1 = conn(ONLINE, 5 * SECOND, "c1", "i_dead")
    stale_c2 = conn(AWAY, TTL + 1, "c2", "i_live")
    plan = reap_plan([live_c1, dead_c1, stale_c2], NOW, TTL, liveness)
    assert plan == ReapPlan(("c2",), stale_c2.updated_ms)
    assert guarded_pull([live_c1, dead_c1, stale_c2], plan) == [live_c1, dead_c1]


def test_reap_plan_takes_a_dead_copy_once_it_is_older_than_every_live_one() -> None:
    liveness = live(i_live=0)
    live_c1 = conn(ONLINE, 5 * SECOND, "c1", "i_live")
    dead_c1 = conn(ONLINE, 10 * SECOND, "c1", "i_dead")
    plan = reap_plan([live_c1, dead_c1], NOW, TTL, liveness)
    assert plan == ReapPlan(("c1",), dead_c1.updated_ms)
    assert guarded_pull([live_c1, dead_c1], plan) == [live_c1]


def test_reap_plan_deduplicates_ids_and_takes_the_newest_cutoff() -> None:
    old = conn(AWAY, TTL + 5, "c1", None)
    older = conn(AWAY, TTL + 9, "c1", None)
    other = conn(ONLINE, TTL + 1, "c2", None)
    assert reap_plan([old, older, other], NOW, TTL, NO_INSTANCES) == ReapPlan(
        ("c1", "c2"), other.updated_ms
    )


def test_reap_plan_is_none_when_everything_counts() -> None:
    assert reap_plan([conn(ONLINE), conn(AWAY, TTL, "c2")], NOW, TTL, NO_INSTANCES) is None


# --- needs_write --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored_status", "stored_status_connection", "presence", "expected"),
    [
        pytest.param(ONLINE, ONLINE, pair(ONLINE, ONLINE), False, id="same"),
        pytest.param("busy", "online", pair(BUSY, ONLINE), False, id="same-raw-strings"),
        pytest.param(ONLINE, ONLINE, pair(AWAY, ONLINE), True, id="status-differs"),
        pytest.param(BUSY, ONLINE, pair(BUSY, AWAY), True, id="status-connection-differs"),
        pytest.param(None, None, OFFLINE_PRESENCE, True, id="never-written"),
        pytest.param(OFFLINE, None, OFFLINE_PRESENCE, True, id="status-connection-null"),
        pytest.param(ABSENT, ABSENT, OFFLINE_PRESENCE, True, id="both-missing"),
        pytest.param(17, "online", pair(ONLINE, ONLINE), True, id="status-a-number"),
        pytest.param("online", ["online"], pair(ONLINE, ONLINE), True, id="an-array"),
    ],
)
def test_needs_write_only_when_a_field_differs(
    stored_status: object,
    stored_status_connection: object,
    presence: Presence,
    expected: bool,
) -> None:
    assert needs_write(stored_status, stored_status_connection, presence) is expected


# --- decoding -----------------------------------------------------------------------------

T = datetime(2023, 11, 14, 22, 13, 20)  # naive UTC, = 1_700_000_000_000 ms
T_MS = 1_700_000_000_000
MISSING = object()  # a field left out of the document


def raw_conn(**fields: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "id": "c1",
        "instanceId": "i1",
        "status": "online",
        "_createdAt": T,
        "_updatedAt": T,
    }
    doc.update(fields)
    return {k: v for k, v in doc.items() if v is not MISSING}


def test_to_ms_reads_naive_datetimes_as_utc() -> None:
    assert to_ms(T) == T_MS
    assert to_ms(datetime(1970, 1, 1)) == 0


def test_to_ms_honours_the_offset_of_aware_datetimes() -> None:
    assert to_ms(datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)) == T_MS
    plus_two = timezone(timedelta(hours=2))
    assert to_ms(datetime(2023, 11, 15, 0, 13, 20, tzinfo=plus_two)) == T_MS


def test_to_ms_floors_microseconds_like_bson() -> None:
    assert to_ms(datetime(1970, 1, 1, 0, 0, 1, 999)) == 1_000
    assert to_ms(datetime(1970, 1, 1, 0, 0, 1, 1_999)) == 1_001


def test_from_ms_is_an_aware_utc_datetime() -> None:
    assert from_ms(T_MS) == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)


def test_parse_connections_decodes_a_rocketchat_entry() -> None:
    assert parse_connections([raw_conn()]) == ([Connection("c1", "i1", ONLINE, T_MS)], [])


def test_parse_connections_keeps_order_and_duplicates() -> None:
    raw = [
        raw_conn(id="b", status="away"),
        raw_conn(id="a", status="busy", instanceId=MISSING),
        raw_conn(id="b", status="offline"),
    ]
    assert parse_connections(raw) == (
        [
            Connection("b", "i1", AWAY, T_MS),
            Connection("a", None, BUSY, T_MS),
            Connection("b", "i1", OFFLINE, T_MS),
        ],
        [],
    )


@pytest.mark.parametrize(
    ("raw", "reasons"),
    [
        pytest.param(None, [], id="missing-or-null"),
        pytest.param([], [], id="empty"),
        pytest.param("online", ["connections_not_an_array"], id="string"),
        pytest.param({"id": "c1"}, ["connections_not_an_array"], id="document"),
        pytest.param([42], ["connection_not_a_document"], id="entry-int"),
        pytest.param([None], ["connection_not_a_document"], id="entry-null"),
        pytest.param([["c1"]], ["connection_not_a_document"], id="entry-array"),
        pytest.param([raw_conn(id=MISSING)], ["connection_missing_id"], id="no-id"),
        pytest.param([raw_conn(id=7)], ["connection_missing_id"], id="id-int"),
        pytest.param([raw_conn(id=None)], ["connection_missing_id"], id="id-null"),
        pytest.param([raw_conn(status="dnd")], ["connection_bad_status"], id="status-unknown"),
        pytest.param([raw_conn(status="ONLINE")], ["connection_bad_status"], id="status-case"),
        pytest.param([raw_conn(status=1)], ["connection_bad_status"], id="status-wire-number"),
        pytest.param([raw_conn(status=MISSING)], ["connection_bad_status"], id="status-missing"),
        pytest.param(
            [raw_conn(_updatedAt=MISSING)], ["connection_bad_updated_at"], id="updated-missing"
        ),
        pytest.param(
            [raw_conn(_updatedAt="2023-11-14T22:13:20Z")],
            ["connection_bad_updated_at"],
            id="updated-string",
        ),
        pytest.param(
            [raw_conn(_updatedAt=T_MS)], ["connection_bad_updated_at"], id="updated-number"
        ),
    ],
)
def test_parse_connections_skips_malformed_entries_with_a_reason(
    raw: object, reasons: list[str]
) -> None:
    assert parse_connections(raw) == ([], reasons)


def test_parse_connections_keeps_good_entries_around_bad_ones() -> None:
    raw = [raw_conn(id="a"), "junk", raw_conn(id="b", status="dnd"), raw_conn(id="c")]
    connections, reasons = parse_connections(raw)
    assert [c.id for c in connections] == ["a", "c"]
    assert reasons == ["connection_not_a_document", "connection_bad_status"]


def test_parse_connections_reads_a_non_string_instance_id_as_absent() -> None:
    assert parse_connections([raw_conn(instanceId=5)]) == (
        [Connection("c1", None, ONLINE, T_MS)],
        ["connection_bad_instance_id"],
    )


def test_parse_connections_reads_a_null_instance_id_as_absent_silently() -> None:
    assert parse_connections([raw_conn(instanceId=None)]) == (
        [Connection("c1", None, ONLINE, T_MS)],
        [],
    )


@pytest.mark.parametrize(
    ("raw", "expected", "reasons"),
    [
        pytest.param({}, UserState(True, ONLINE), [], id="empty"),
        pytest.param(
            {"active": False, "statusDefault": "busy", "status": "offline"},
            UserState(False, BUSY),
            [],
            id="inactive-busy",
        ),
        pytest.param(
            {"active": True, "status": "away", "statusConnection": "online"},
            UserState(True, ONLINE),
            [],
            id="stored-pair",
        ),
        pytest.param(
            {"active": "no"}, UserState(True, ONLINE), ["user_bad_active"], id="active"
        ),
        pytest.param(
            {"statusDefault": "dnd"},
            UserState(True, ONLINE),
            ["user_bad_status_default"],
            id="status-default",
        ),
        pytest.param(
            {"status": 1, "statusConnection": "here"},
            UserState(True, ONLINE),
            ["user_bad_status", "user_bad_status_connection"],
            id="stored-garbage",
        ),
    ],
)
def test_parse_user(raw: dict[str, object], expected: UserState, reasons: list[str]) -> None:
    assert parse_user(raw) == (expected, reasons)


def test_parse_instances() -> None:
    docs: list[object] = [
        {"_id": "i1", "name": "rc-1", "_updatedAt": T},
        {"_id": "i2", "_updatedAt": "yesterday"},
        {"_id": 3, "_updatedAt": T},
        "junk",
    ]
    assert parse_instances(docs) == (
        {"i1": T_MS, "i2": None},
        ["instance_bad_updated_at", "instance_missing_id", "instance_not_a_document"],
    )


# --- properties ---------------------------------------------------------------------------

INSTANCE_IDS = ["i1", "i2", "i3"]


def reference_presence(
    active: bool,
    status_default: str,
    connections: list[tuple[str | None, str, int]],
    now: int,
    ttl: int,
    instances: dict[str, int | None],
    timeout: int,
) -> tuple[str, str]:
    """The contract restated without a fold: (instance, status, updated) tuples in, strings out.

    Online if any counted connection is online, else the last counted non-offline one
    (Rocket.Chat's reduce), else offline; then statusDefault, then active.
    """
    if not active:
        return ("offline", "offline")

    def instance_alive(instance: str | None) -> bool:
        if instance is None or len(instances) == 0:
            return True
        if instance not in instances:
            return False
        updated = instances[instance]
        return updated is None or updated >= now - timeout

    counted = [s for (i, s, updated) in connections if updated >= now - ttl and instance_alive(i)]
    if "online" in counted:
        status_connection = "online"
    else:
        others = [s for s in counted if s != "offline"]
        status_connection = others[-1] if others else "offline"
    if status_connection == "offline":
        return ("offline", "offline")
    if status_default == "online":
        return (status_connection, status_connection)
    return (status_default, status_connection)


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[UserState, list[Connection], int, int, InstanceLiveness]:
    now = draw(st.integers(1_500_000_000_000, 1_900_000_000_000))
    ttl = draw(st.integers(0, 10 * MINUTE))
    timeout = draw(st.integers(0, 3 * MINUTE))
    # Ages cluster around the boundaries, where the off-by-one mistakes live.
    conn_age = st.one_of(
        st.integers(-SECOND, 2 * ttl + 2),
        st.sampled_from([ttl - 1, ttl, ttl + 1]),
    )
    instance_age = st.one_of(
        st.none(),
        st.integers(-SECOND, 2 * timeout + 2),
        st.sampled_from([timeout - 1, timeout, timeout + 1]),
    )
    # An empty map is its own rule (no instances collection: only the TTL applies).
    ages = draw(st.just({}) | st.dictionaries(st.sampled_from(INSTANCE_IDS), instance_age))
    liveness = InstanceLiveness(
        {iid: None if age is None else now - age for iid, age in ages.items()}, timeout
    )
    connections = draw(
        st.lists(
            st.builds(
                Connection,
                id=st.sampled_from(["a", "b", "c"]),
                instance_id=st.one_of(st.none(), st.sampled_from([*INSTANCE_IDS, "gone"])),
                status=st.sampled_from(Status),
                updated_ms=conn_age.map(lambda age: now - age),
            ),
            max_size=6,
        )
    )
    state = UserState(active=draw(st.booleans()), status_default=draw(st.sampled_from(Status)))
    return state, connections, now, ttl, liveness


@settings(max_examples=500)
@given(scenarios())
def test_derive_agrees_with_the_reference_formulation(
    scenario: tuple[UserState, list[Connection], int, int, InstanceLiveness],
) -> None:
    state, connections, now, ttl, liveness = scenario
    expected = reference_presence(
        state.active,
        state.status_default.value,
        [(c.instance_id, c.status.value, c.updated_ms) for c in connections],
        now,
        ttl,
        dict(liveness.updated_ms),
        liveness.timeout_ms,
    )
    presence = derive(state, connections, now, ttl, liveness)
    assert (presence.status.value, presence.status_connection.value) == expected


@settings(max_examples=500)
@given(scenarios(), st.data())
def test_answer_is_constant_until_next_change(
    scenario: tuple[UserState, list[Connection], int, int, InstanceLiveness],
    data: st.DataObject,
) -> None:
    state, connections, now, ttl, liveness = scenario
    at_now = derive(state, connections, now, ttl, liveness)
    change = next_change_ms(connections, now, ttl, liveness)
    if change is None:
        assert derive(state, connections, now + 10**9, ttl, liveness) == at_now
        return
    assert change > now
    later = data.draw(st.integers(now, change - 1))
    assert derive(state, connections, change - 1, ttl, liveness) == at_now
    assert derive(state, connections, later, ttl, liveness) == at_now
    # Stronger than the answer: the very same connections still count one ms before.
    counted = [counts(c, now, ttl, liveness) for c in connections]
    assert [counts(c, change - 1, ttl, liveness) for c in connections] == counted
    # And it is not early: at `change` some connection that counted stops counting.
    assert any(
        counts(c, now, ttl, liveness) and not counts(c, change, ttl, liveness) for c in connections
    )


@given(scenarios())
def test_reapable_is_exactly_what_does_not_count(
    scenario: tuple[UserState, list[Connection], int, int, InstanceLiveness],
) -> None:
    _, connections, now, ttl, liveness = scenario
    reaped = reapable(connections, now, ttl, liveness)
    kept = [c for c in connections if c not in reaped]
    assert all(not counts(c, now, ttl, liveness) for c in reaped)
    assert all(counts(c, now, ttl, liveness) for c in kept)


@given(scenarios())
def test_the_reap_plan_pulls_only_what_does_not_count_and_something_when_it_can(
    scenario: tuple[UserState, list[Connection], int, int, InstanceLiveness],
) -> None:
    _, connections, now, ttl, liveness = scenario
    plan = reap_plan(connections, now, ttl, liveness)
    left = guarded_pull(connections, plan)
    counted = [c for c in connections if counts(c, now, ttl, liveness)]
    assert [c for c in left if counts(c, now, ttl, liveness)] == counted
    if plan is not None:
        assert len(left) < len(connections)
    else:
        dead = [c for c in connections if not counts(c, now, ttl, liveness)]
        # Nothing pullable: every dead entry shares its id with a live one not newer.
        assert all(
            any(c.id == d.id and c.updated_ms <= max(x.updated_ms for x in dead)
                for c in counted)
            for d in dead
        )


JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["online", "away", "busy", "offline", "c1", "i1"])
    | st.datetimes(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["id", "instanceId", "status", "_updatedAt", "_id", "x"]),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@given(JUNK)
def test_decoders_never_raise_on_malformed_input(raw: object) -> None:
    connections, _ = parse_connections(raw)
    assert all(isinstance(c, Connection) for c in connections)
    if isinstance(raw, dict):
        parse_user(raw)
    if isinstance(raw, list):
        parse_instances(raw)
