"""The presence core: derives a user's ``status`` / ``statusConnection`` from their connections.

This module owns the rules of the Rocket.Chat presence contract ("Derivation" and "Dead
instances" in the design notes): which connections count, how their statuses fold into one, how
``statusDefault`` and ``active`` apply, when the answer changes by itself, which connections
the reaper may remove, and the tolerant decoding of the raw documents these rules read.

It must never do I/O or read the clock: no trio, pymongo, bson or loguru here. Time is
passed in as integer milliseconds since the Unix epoch (``now_ms``, ``ttl_ms``; BSON dates
have millisecond precision), so every function is pure and tested without a database.
Malformed input is never an exception: it is skipped and named by a short reason string
that the caller counts in a metric.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Final, NamedTuple


class Status(StrEnum):
    """A presence status as Rocket.Chat stores it."""

    ONLINE = "online"
    AWAY = "away"
    BUSY = "busy"
    OFFLINE = "offline"


USER_FIELDS: Final = (
    "username",
    "active",
    "statusDefault",
    "status",
    "statusConnection",
    "statusText",
    "roles",
    "type",
)
"""The top-level ``users`` fields presence reads (the derivation, and the event payload).
The loader projects ``users`` to these; a feed ignores a change that touches none of them."""


@dataclass(frozen=True, slots=True)
class Collections:
    """Where the contract's documents live: the database and the collection names.

    The names default to Rocket.Chat's; a deployment may rename them. ``checkpoints`` is
    presenced's own bookkeeping collection.
    """

    database: str
    users: str = "users"
    sessions: str = "usersSessions"
    instances: str = "instances"
    checkpoints: str = "presenced_checkpoints"

    @property
    def names(self) -> tuple[str, str, str]:
        """The three Rocket.Chat collection names presence watches, users first."""
        return (self.users, self.sessions, self.instances)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_ONE_MS = timedelta(milliseconds=1)
_STATUS_OF: Final[Mapping[str, Status]] = {status.value: status for status in Status}


def to_ms(dt: datetime) -> int:
    """Milliseconds since the epoch, floored (as BSON stores it); a naive datetime is UTC.

    pymongo returns naive UTC datetimes: those are subtracted from a naive epoch, with no
    ``replace`` (one object less per date on the hot path; the same result).
    """
    if dt.tzinfo is None:
        return (dt - _EPOCH_NAIVE) // _ONE_MS
    return (dt - _EPOCH) // _ONE_MS


def from_ms(ms: int) -> datetime:
    """The aware UTC datetime for ``ms`` milliseconds since the epoch (inverse of ``to_ms``)."""
    return _EPOCH + ms * _ONE_MS


class Connection(NamedTuple):
    """One entry of ``usersSessions.connections`` (one DDP connection of the user).

    A named tuple rather than a frozen dataclass: as immutable, and built without a Python
    ``__init__`` (the engine parses one per connection per event).
    """

    id: str
    instance_id: str | None
    status: Status
    updated_ms: int


_new_connection: Final = tuple.__new__
"""``_new_connection(Connection, (id, instance_id, status, updated_ms))``: a
:class:`Connection` without the Python-level ``__new__`` of a named tuple."""


@dataclass(frozen=True, slots=True)
class UserState:
    """What derivation reads from a ``users`` document."""

    active: bool = True
    status_default: Status = Status.ONLINE


@dataclass(frozen=True, slots=True)
class Presence:
    """The derived pair presenced writes to ``users``."""

    status: Status
    status_connection: Status


OFFLINE_PRESENCE = Presence(Status.OFFLINE, Status.OFFLINE)

_PRESENCES: Final[Mapping[tuple[Status, Status], Presence]] = {
    (status, status_connection): Presence(status, status_connection)
    for status in Status
    for status_connection in Status
}
"""Every pair, built once: the derivation hands out these shared (frozen) values."""

_USER_STATES: Final[Mapping[tuple[bool, Status], UserState]] = {
    (active, status_default): UserState(active, status_default)
    for active in (True, False)
    for status_default in Status
}


@dataclass(frozen=True, slots=True)
class InstanceLiveness:
    """Which Rocket.Chat instances are known to be dead, from the ``instances`` collection.

    ``updated_ms`` maps each instance id to its document's ``_updatedAt`` in ms, or to None
    when the document exists but its ``_updatedAt`` is unreadable (then it never times out:
    the connection TTL still applies). An instance is dead when ``now - updated > timeout``,
    the same "strictly more than" as the connection TTL.

    ``unlisted_dead``: an id the collection does not list is dead (the contract's rule).
    With Rocket.Chat's service broker, connections carry the broker node id of the
    ddp-streamer that holds them, and ddp-streamers are not in ``instances``: there the
    rule is off (False), and a lost node's connections are removed when the broker says it
    left (``presence.removeLostConnections``), as Rocket.Chat's presence service does.
    """

    updated_ms: Mapping[str, int | None]
    timeout_ms: int
    unlisted_dead: bool = True
    dies_at: Mapping[str, int | None] = field(init=False, repr=False, compare=False)
    """Each listed instance's ``dies_at_ms`` (None: never by timeout), computed once."""

    def __post_init__(self) -> None:
        # A read-only copy: the caller's dict cannot change a frozen snapshot behind its back.
        object.__setattr__(self, "updated_ms", MappingProxyType(dict(self.updated_ms)))
        object.__setattr__(self, "dies_at", {
            instance_id: None if updated is None else updated + self.timeout_ms + 1
            for instance_id, updated in self.updated_ms.items()
        })

    def is_dead(self, instance_id: str | None, now_ms: int) -> bool:
        """True if the instance is known to be dead at ``now_ms``.

        A connection without an instance id is never dead by this rule, and an empty
        ``instances`` collection means the deployment does not use it: nothing is dead.
        """
        if instance_id is None or not self.updated_ms:
            return False
        if instance_id not in self.updated_ms:
            return self.unlisted_dead
        updated = self.updated_ms[instance_id]
        return updated is not None and now_ms - updated > self.timeout_ms

    def next_change_ms(self, now_ms: int) -> int | None:
        """The earliest instant after ``now_ms`` at which some instance times out, if any."""
        instants = [
            t for t in map(self.dies_at_ms, self.updated_ms) if t is not None and t > now_ms
        ]
        return min(instants, default=None)

    def dies_at_ms(self, instance_id: str) -> int | None:
        """The first millisecond a listed instance is dead by timeout (``updated + timeout + 1``).

        None when the instance is not listed or its ``_updatedAt`` is unknown.
        """
        updated = self.updated_ms.get(instance_id)
        return None if updated is None else updated + self.timeout_ms + 1


NO_INSTANCES = InstanceLiveness({}, 0)
"""No ``instances`` information (collection empty or unused): only the TTL applies."""


def _parse_status(value: object) -> Status | None:
    return _STATUS_OF.get(value) if isinstance(value, str) else None


def parse_connections(raw: object) -> tuple[list[Connection], list[str]]:
    """Decode a ``usersSessions.connections`` value as pymongo returns it.

    Missing (None) means no connections. Entries keep their array order, duplicates
    included. An entry that cannot be used is skipped, with one reason for it:
    ``connection_not_a_document``, ``connection_missing_id``, ``connection_bad_status``,
    ``connection_bad_updated_at``; a value that is not an array gives
    ``connections_not_an_array``. An ``instanceId`` that is present but not a string is
    read as absent (the connection is kept; it only answers to the TTL) and reported as
    ``connection_bad_instance_id``.
    """
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        return [], ["connections_not_an_array"]
    connections: list[Connection] = []
    reasons: list[str] = []
    for entry in raw:
        if type(entry) is not dict and not isinstance(entry, Mapping):
            reasons.append("connection_not_a_document")
            continue
        conn_id = entry.get("id")
        raw_status = entry.get("status")
        status = _STATUS_OF.get(raw_status) if isinstance(raw_status, str) else None
        updated = entry.get("_updatedAt")
        if not isinstance(conn_id, str):
            reasons.append("connection_missing_id")
        elif status is None:
            reasons.append("connection_bad_status")
        elif not isinstance(updated, datetime):
            reasons.append("connection_bad_updated_at")
        else:
            instance_id = entry.get("instanceId")
            if type(instance_id) is str:
                # A handful of instances, shared by every user: one copy of each id.
                instance_id = sys.intern(instance_id)
            elif instance_id is not None and not isinstance(instance_id, str):
                reasons.append("connection_bad_instance_id")
                instance_id = None
            if updated.tzinfo is None:  # pymongo's naive UTC: to_ms, inlined
                updated_ms = (updated - _EPOCH_NAIVE) // _ONE_MS
            else:
                updated_ms = to_ms(updated)
            connections.append(
                _new_connection(Connection, (conn_id, instance_id, status, updated_ms))
            )
    return connections, reasons


def parse_user(raw: Mapping[str, object]) -> tuple[UserState, list[str]]:
    """Decode the presence fields of a ``users`` document.

    ``active`` missing means active; only ``False`` deactivates (anything else is
    ``user_bad_active``). ``statusDefault`` missing or null means online; an unknown value
    is read as online and reported as ``user_bad_status_default``. A stored ``status`` /
    ``statusConnection`` that is set but not a known status is reported as
    ``user_bad_status`` / ``user_bad_status_connection`` (the write replaces it).
    """
    reasons: list[str] = []
    active = raw.get("active", True)
    if not isinstance(active, bool):
        reasons.append("user_bad_active")
        active = True
    status_default = Status.ONLINE
    for name, reason in _USER_STATUS_FIELDS:
        value = raw.get(name)
        if value is None:
            continue
        status = _parse_status(value)
        if status is None:
            reasons.append(reason)
        elif name == "statusDefault":
            status_default = status
    return _USER_STATES[active, status_default], reasons


_USER_STATUS_FIELDS: Final = (
    ("statusDefault", "user_bad_status_default"),
    ("status", "user_bad_status"),
    ("statusConnection", "user_bad_status_connection"),
)


def parse_instances(docs: Iterable[object]) -> tuple[dict[str, int | None], list[str]]:
    """Decode ``instances`` documents into the id -> ``_updatedAt`` map of ``InstanceLiveness``.

    A document that is not a mapping, or has no string ``_id``, is skipped
    (``instance_not_a_document``, ``instance_missing_id``). One whose ``_updatedAt`` is not
    a date is kept with None, reported as ``instance_bad_updated_at``: the instance exists,
    so its connections are not dead by absence, and the connection TTL still applies.
    """
    updated_ms: dict[str, int | None] = {}
    reasons: list[str] = []
    for doc in docs:
        if not isinstance(doc, Mapping):
            reasons.append("instance_not_a_document")
            continue
        instance_id = doc.get("_id")
        updated = doc.get("_updatedAt")
        if not isinstance(instance_id, str):
            reasons.append("instance_missing_id")
        elif isinstance(updated, datetime):
            updated_ms[instance_id] = to_ms(updated)
        else:
            reasons.append("instance_bad_updated_at")
            updated_ms[instance_id] = None
    return updated_ms, reasons


def counts(conn: Connection, now_ms: int, ttl_ms: int, liveness: InstanceLiveness) -> bool:
    """Rule 1: fresh (at most ``ttl_ms`` old, inclusive) and not on a dead instance."""
    return now_ms - conn.updated_ms <= ttl_ms and not liveness.is_dead(conn.instance_id, now_ms)


def derive(
    user: UserState,
    connections: Iterable[Connection],
    now_ms: int,
    ttl_ms: int,
    liveness: InstanceLiveness,
) -> Presence:
    """Rules 1-5: the user's ``status`` and ``statusConnection`` at ``now_ms``.

    The fold is Rocket.Chat's ``processConnectionStatus`` over the counted connections in
    array order, from offline: an online accumulator stays online, otherwise any non-offline
    status replaces it. So online wins, and without online the *last* non-offline counted
    connection wins (``[busy, away]`` gives away, as in every Rocket.Chat release).
    """
    if not user.active:
        return OFFLINE_PRESENCE
    status_connection = Status.OFFLINE
    for conn in connections:
        if status_connection == Status.ONLINE:
            break
        if conn.status != Status.OFFLINE and counts(conn, now_ms, ttl_ms, liveness):
            status_connection = conn.status
    return _presence_of(user, status_connection)


def _presence_of(user: UserState, status_connection: Status) -> Presence:
    """Rules 3-5 once the fold gave ``status_connection``."""
    if not user.active or status_connection == Status.OFFLINE:
        return OFFLINE_PRESENCE
    if user.status_default == Status.ONLINE:
        return _PRESENCES[status_connection, status_connection]
    return _PRESENCES[user.status_default, status_connection]


class Derived(NamedTuple):
    """What one pass over a user's connections gives (:func:`derive_next`)."""

    presence: Presence
    """``derive``'s answer."""
    next_change_ms: int | None
    """``next_change_ms``'s instant."""
    uncounted: bool
    """Some connection no longer counts (``reapable`` is not empty)."""


def derive_next(
    user: UserState,
    connections: Iterable[Connection],
    now_ms: int,
    ttl_ms: int,
    liveness: InstanceLiveness,
) -> Derived:
    """``derive``, ``next_change_ms`` and "is anything reapable" in one pass.

    The same rules as those functions, walked once: a connection counts until the first
    millisecond it is stale (``updated_ms + ttl_ms + 1``) or its instance is dead
    (``dies_at``); the earliest of those instants among the counted connections is the next
    change.
    """
    status_connection = Status.OFFLINE
    next_at: int | None = None
    uncounted = False
    dies_at = liveness.dies_at
    unlisted_dead = liveness.unlisted_dead
    for conn in connections:
        ends_at = conn.updated_ms + ttl_ms + 1
        if ends_at <= now_ms:
            uncounted = True
            continue
        instance_id = conn.instance_id
        if instance_id is not None and dies_at:
            if instance_id in dies_at:
                instance_ends_at = dies_at[instance_id]
                if instance_ends_at is not None:
                    if instance_ends_at <= now_ms:
                        uncounted = True
                        continue
                    ends_at = min(ends_at, instance_ends_at)
            elif unlisted_dead:
                uncounted = True
                continue
        if next_at is None or ends_at < next_at:
            next_at = ends_at
        if status_connection != Status.ONLINE and conn.status != Status.OFFLINE:
            status_connection = conn.status
    return Derived(_presence_of(user, status_connection), next_at, uncounted)


def next_change_ms(
    connections: Iterable[Connection],
    now_ms: int,
    ttl_ms: int,
    liveness: InstanceLiveness,
) -> int | None:
    """The earliest instant after ``now_ms`` at which ``derive`` can change with no new data.

    That is the first millisecond a counted connection stops counting: it goes stale at
    ``updated_ms + ttl_ms + 1`` or its instance times out. None when nothing counts. A
    connection that does not count never counts again by itself, so nothing else matters.
    """
    instants: list[int] = []
    for conn in connections:
        if not counts(conn, now_ms, ttl_ms, liveness):
            continue
        instants.append(conn.updated_ms + ttl_ms + 1)
        if conn.instance_id is not None:
            dies_at = liveness.dies_at_ms(conn.instance_id)
            if dies_at is not None:
                instants.append(dies_at)
    return min(instants, default=None)


def reapable(
    connections: Iterable[Connection],
    now_ms: int,
    ttl_ms: int,
    liveness: InstanceLiveness,
) -> list[Connection]:
    """The connections that no longer count (stale or on a dead instance), in array order."""
    return [conn for conn in connections if not counts(conn, now_ms, ttl_ms, liveness)]


@dataclass(frozen=True, slots=True)
class ReapPlan:
    """What the reaper's guarded pull removes from one user's connections.

    The pull is ``{$pull: {connections: {id: {$in: connection_ids}, _updatedAt: {$lte:
    cutoff}}}}``: every entry with a listed id and an ``_updatedAt`` at or before
    ``cutoff_ms`` goes, so a heartbeat that lands between the read and the pull keeps its
    connection.
    """

    connection_ids: tuple[str, ...]
    cutoff_ms: int


def reap_plan(
    connections: Iterable[Connection],
    now_ms: int,
    ttl_ms: int,
    liveness: InstanceLiveness,
) -> ReapPlan | None:
    """The guarded pull that removes what no longer counts and nothing that does; None when
    there is nothing to pull.

    Ids are deduplicated and the cutoff is the newest ``_updatedAt`` among the entries to
    remove. Because the pull matches by id and cutoff, an id that also names a connection
    that still counts and is not newer than that cutoff (the same id on a dead and on a
    live instance, or a login repeated on one connection) would take the live entry with
    it: such an id is left out this round. Leaving ids out only lowers the cutoff, so no
    counted entry of a kept id can fall under it. The dead copy goes once its own cutoff is
    older than every live entry of that id.
    """
    listed = list(connections)
    dead = [conn for conn in listed if not counts(conn, now_ms, ttl_ms, liveness)]
    if not dead:
        return None
    cutoff = max(conn.updated_ms for conn in dead)
    blocked = {
        conn.id
        for conn in listed
        if conn.updated_ms <= cutoff and counts(conn, now_ms, ttl_ms, liveness)
    }
    kept = [conn for conn in dead if conn.id not in blocked]
    if not kept:
        return None
    return ReapPlan(
        connection_ids=tuple(dict.fromkeys(conn.id for conn in kept)),
        cutoff_ms=max(conn.updated_ms for conn in kept),
    )


class Absent:
    """The value of a field a document does not have (distinct from a stored null)."""

    _instance: Absent | None = None

    def __new__(cls) -> Absent:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ABSENT"

    def __reduce__(self) -> str:
        return "ABSENT"


ABSENT: Final = Absent()
"""The one :class:`Absent` value."""


def needs_write(
    stored_status: object, stored_status_connection: object, presence: Presence
) -> bool:
    """True only if the stored ``status`` or ``statusConnection`` differs from ``presence``.

    The stored values are compared as read: any value that is not exactly the derived
    status string (a number, null, :data:`ABSENT`, ...) differs.
    """
    return not (
        isinstance(stored_status, str)
        and stored_status == presence.status
        and isinstance(stored_status_connection, str)
        and stored_status_connection == presence.status_connection
    )
