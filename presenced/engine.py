"""The engine: the daemon's in-memory view of presence, its timers, and its transitions.

This module owns
- the bounded cache of what presenced last read for each user (the parsed ``users`` fields,
  the parsed ``usersSessions.connections``, the stored ``status``/``statusConnection``) and
  of the ``instances`` collection;
- the timer heap of "this user's answer changes by itself at t" (a connection goes stale,
  or its instance times out), from ``presence.next_change_ms``;
- the decisions taken on that view: which write to plan (only when the stored pair differs
  from the derived one), which transition to announce once a write landed, which users an
  instance change concerns, which connections the reaper may pull and with which cutoff.

It must never do I/O, read the clock, block or import trio, pymongo or loguru: every method
takes ``now_ms`` (integer milliseconds since the epoch) and returns what the caller should
do. The loader feeds it freshly read documents, the writer reports back with ``confirm`` or
``conflict``, and the run loop sleeps until ``next_deadline``. The rules themselves live in
``presence.py``; this module only decides when to apply them and remembers the results.
Malformed documents never raise: each refused document is kept as a :class:`Refused` (its
id, the reasons ``presence.parse_*`` gave, a text of the bad values) for the caller to take
with ``take_refused`` and report. The stored ``status``/``statusConnection`` are kept exactly
as read (any BSON value, or ``presence.ABSENT``), so a planned write expects what is really
there and can replace whatever it is.

The values handed out (a ``PlannedWrite``, a ``Transition``, a ``ReapCandidate``) are frozen,
so they never change behind their holder; the per-user records are private, small and
updated in place. Nothing here walks every cached user: timers come from the heap, the
reaper's candidates from a set kept up to date by each derivation, each timer and the
instance index.
"""

from __future__ import annotations

import heapq
import itertools
import sys
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final, TypeAlias

from presenced.presence import (
    ABSENT,
    NO_INSTANCES,
    Connection,
    Derived,
    InstanceLiveness,
    Presence,
    ReapPlan,
    Status,
    UserState,
    counts,
    derive_next,
    from_ms,
    needs_write,
    parse_connections,
    parse_user,
    reap_plan,
)
from presenced.presence import reapable as uncounted_connections

__all__ = [
    "Engine",
    "EngineStats",
    "PlannedWrite",
    "ReapCandidate",
    "Reason",
    "Refused",
    "Transition",
]

class Reason(StrEnum):
    """Why a user was (re)derived: the label of the decision metrics."""

    CONNECTIONS = "connections"
    """A feed key: the user's ``usersSessions`` or ``users`` document changed."""
    STALE = "stale"
    """A timer fired: a connection stopped counting with no new data."""
    INSTANCE = "instance"
    """The ``instances`` collection changed (an instance appeared, disappeared or died)."""
    RECONCILE = "reconcile"
    """Start-up, a lost feed position or a resync: the user is checked from scratch."""
    RETRY = "retry"
    """A read or write about the user failed earlier, or met a concurrent change."""
    ACTION = "action"
    """A broker action (``presence.newConnection``, ``setStatus``, …) wrote the user's
    documents and handed the user over at once, ahead of the feed."""


_STATUS_VALUES: Final = frozenset(status.value for status in Status)


@dataclass(frozen=True, slots=True)
class Transition:
    """A write that landed: what was stored before, what is stored now, and why.

    ``previous`` is None when the stored pair was missing or not a pair of known statuses;
    ``previous_status`` is the stored ``status`` exactly as read (``ABSENT`` if missing).
    ``status_text`` and ``roles`` are the user's fields as last read (``ABSENT`` if
    missing), for the announcement's payload.
    """

    user_id: Any
    username: str | None
    previous: Presence | None
    current: Presence
    reason: Reason
    previous_status: object = ABSENT
    status_text: object = ABSENT
    roles: object = ABSENT


@dataclass(frozen=True, slots=True)
class PlannedWrite:
    """Set the user's ``status``/``statusConnection`` to ``presence``, if they still hold the
    expected values: exactly what was read, whatever its BSON type, or
    :data:`~presenced.presence.ABSENT` for a missing field.

    ``reason`` and ``username`` travel with the write so that ``confirm`` can announce the
    transition even if the user left the cache in the meantime.
    """

    user_id: Any
    presence: Presence
    expected_status: object
    expected_status_connection: object
    reason: Reason = Reason.RECONCILE
    username: str | None = None
    status_text: object = ABSENT
    roles: object = ABSENT


@dataclass(frozen=True, slots=True)
class ReapCandidate:
    """One user's :class:`~presenced.presence.ReapPlan`, for the reaper's guarded ``$pull``."""

    user_id: Any
    plan: ReapPlan

    @property
    def connection_ids(self) -> tuple[str, ...]:
        return self.plan.connection_ids

    @property
    def cutoff_ms(self) -> int:
        return self.plan.cutoff_ms

    @property
    def cutoff(self) -> datetime:
        """The cutoff as the aware UTC datetime the ``$pull`` filter compares with."""
        return from_ms(self.plan.cutoff_ms)


@dataclass(frozen=True, slots=True)
class Refused:
    """A document (or part of one) that could not be used as read.

    ``kind`` is ``"users"`` or ``"sessions"``; ``reasons`` are the parse reasons;
    ``content`` is a short text of the offending values, so the same bad content read
    again can be told from new bad content.
    """

    kind: str
    doc_id: Any
    reasons: tuple[str, ...]
    content: str


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's gauges and counters, for the metrics endpoint."""

    users_tracked: int
    timers_pending: int
    connections: int
    """Connections in the cached users' documents (counted or not), now."""
    peak_connections: int
    """The most ``connections`` has been since start or the last ``reset_peak``."""
    writes_planned: Mapping[str, int]
    transitions: Mapping[str, int]
    evictions: int


class _CachedUser:
    """What the engine knows of one user: the last documents read, the last answer, and
    the user's timer.

    A plain ``__slots__`` record, private to the engine and updated in place (it is never
    handed out: planned writes and transitions copy what they need). One per cached user,
    so it is kept small: shared :class:`UserState` and :class:`Presence` values, interned
    status strings, and ``instance_ids`` as None, one id, or a frozenset of two or more.
    """

    __slots__ = (
        "answer",
        "confirmed",
        "connections",
        "instance_ids",
        "queued_at",
        "read_seq",
        "roles",
        "state",
        "status_text",
        "stored_status",
        "stored_status_connection",
        "timer_at",
        "username",
    )

    def __init__(
        self,
        username: str | None,
        state: UserState,
        connections: tuple[Connection, ...],
        stored_status: object,
        stored_status_connection: object,
        instance_ids: _InstanceIds,
        answer: Presence,
        status_text: object,
        roles: object,
        read_seq: int,
        confirmed: bool,
    ) -> None:
        self.username = username
        self.state = state
        self.connections = connections
        self.stored_status = stored_status
        self.stored_status_connection = stored_status_connection
        self.instance_ids = instance_ids
        self.answer = answer
        self.status_text = status_text
        self.roles = roles
        self.read_seq = read_seq
        """The sequence number of the read these documents came from (``load``'s)."""
        self.confirmed = confirmed
        """The stored pair is the one a confirmed write put there (so a second confirm of
        it is a duplicate), not merely one read from the document."""
        self.timer_at: int | None = None
        """When the user's answer changes by itself (None: never, with no new data)."""
        self.queued_at: int | None = None
        """The instant of the user's entry in the timer heap, at or before ``timer_at``
        (None: no entry). A later ``timer_at`` does not push a new entry: the early one
        is moved when it reaches the top of the heap."""


_InstanceIds: TypeAlias = str | frozenset[str] | None
"""The instances a user's connections are on: none, one (the common case), or more."""


def _instance_ids(connections: Iterable[Connection]) -> _InstanceIds:
    found: _InstanceIds = None
    for conn in connections:
        instance_id = conn.instance_id
        if instance_id is None or instance_id == found:
            continue
        if found is None:
            found = instance_id
        elif isinstance(found, str):
            found = frozenset((found, instance_id))
        elif instance_id not in found:
            found = found | {instance_id}
    return found


def _as_ids(instance_ids: _InstanceIds) -> frozenset[str] | tuple[str, ...]:
    if instance_ids is None:
        return ()
    if isinstance(instance_ids, str):
        return (instance_ids,)
    return instance_ids


_CANONICAL_STATUS: Final[Mapping[str, str]] = {status.value: status.value for status in Status}
"""A stored ``status`` read as one of the four known strings is kept as this one shared
copy (the same type and value: the comparisons as read are unchanged)."""


def _canonical(value: object) -> object:
    if type(value) is str:
        return _CANONICAL_STATUS.get(value, value)
    return value


def _canonical_roles(roles: object) -> object:
    """A list of role strings as an equal new list of interned strings (a few roles, shared
    by most users); anything else as read."""
    if type(roles) is list:
        try:
            return [sys.intern(role) for role in roles]
        except TypeError:  # not a plain str: kept as read
            pass
    return roles


def _tiebreak(user_id: Any, tokens: Iterator[int]) -> int:
    """The second item of a heap entry: timers at the same instant compare string user ids
    (0 for all), and any other id gets a unique number, so ids of different types are never
    compared with each other."""
    return 0 if type(user_id) is str else next(tokens)


def _as_presence(status: object, status_connection: object) -> Presence | None:
    if (
        type(status) is str
        and type(status_connection) is str
        and status in _STATUS_VALUES
        and status_connection in _STATUS_VALUES
    ):
        return Presence(Status(status), Status(status_connection))
    return None


_USER_FIELD_OF_REASON: Final = {
    "user_bad_active": "active",
    "user_bad_status_default": "statusDefault",
    "user_bad_status": "status",
    "user_bad_status_connection": "statusConnection",
}


def _bad_user_content(doc: Mapping[str, Any], reasons: Iterable[str]) -> str:
    fields = sorted({_USER_FIELD_OF_REASON.get(r, r) for r in reasons})
    return repr([(field, doc.get(field)) for field in fields])[:500]


def _bad_connections_content(raw: object) -> str:
    """The refused entries, with dates replaced by their type: a heartbeat that moves the
    ``_updatedAt`` of a bad entry does not make it new bad content."""
    if not isinstance(raw, list):
        return repr(raw)[:500]
    bad = [
        {k: "<date>" if isinstance(v, datetime) else v for k, v in entry.items()}
        if isinstance(entry, Mapping) else entry
        for entry in raw if parse_connections([entry])[1]
    ]
    return repr(bad)[:500]


class Engine:
    """The in-memory state machine between the loader and the writer.

    ``ttl_ms`` is Rocket.Chat's ``CACHE_TTL`` in ms; ``instance_timeout_ms`` is the age past
    which an instance document means a dead instance; ``max_users`` bounds the user cache
    (least recently used users are evicted; the caller re-reads them when they matter again).
    """

    def __init__(
        self,
        *,
        ttl_ms: int,
        instance_timeout_ms: int,
        max_users: int = 1_000_000,
        unlisted_instances_dead: bool = True,
    ) -> None:
        if ttl_ms < 0 or instance_timeout_ms < 0:
            raise ValueError("ttl_ms and instance_timeout_ms must be zero or more milliseconds")
        if max_users < 1:
            raise ValueError("max_users must be at least 1")
        self._ttl_ms = ttl_ms
        self._instance_timeout_ms = instance_timeout_ms
        self._unlisted_dead = unlisted_instances_dead
        self._liveness: InstanceLiveness = NO_INSTANCES
        self._connections = 0
        self._peak_connections = 0
        # The cache, least recently used first: ``_use`` moves a user to the end, an insert
        # beyond ``max_users`` evicts the first.
        self._users: OrderedDict[Any, _CachedUser] = OrderedDict()
        self._max_users = max_users
        # instance id -> users with at least one connection on it (cached users only).
        self._by_instance: dict[str, set[Any]] = {}
        # Users last seen holding a connection that no longer counts (or whose timer
        # fired): where the reaper looks, with the timers due and the dead instances' users.
        self._reapable: dict[Any, None] = {}
        # Timers: a heap of (at_ms, tiebreak, user_id); an entry is live while its user is
        # cached with ``queued_at == at_ms`` (lazy deletion). ``_timers`` counts the users
        # with a ``timer_at``.
        self._heap: list[tuple[int, int, Any]] = []
        self._timers = 0
        self._tokens = itertools.count(1)
        self._refused: list[Refused] = []
        # The write under way for each user (planned, not yet confirmed or given up): a
        # second load that derives the same answer meanwhile plans nothing.
        self._in_flight: dict[Any, PlannedWrite] = {}
        self._writes_planned: Counter[str] = Counter()
        self._transitions: Counter[str] = Counter()
        self._evictions = 0

    # ------------------------------------------------------------------ instances

    def set_instances(self, updated_ms: Mapping[str, int | None], now_ms: int) -> list[Any]:
        """Replace the view of the ``instances`` collection with ``updated_ms`` (instance id
        to ``_updatedAt`` in ms, as ``presence.parse_instances`` gives it).

        Returns the cached users whose answer may have changed, for the caller to
        ``evaluate`` with reason ``"instance"``: those with a connection on an instance
        that is dead now and was not, or alive now and was not (appeared, disappeared, timed
        out, or the whole collection went from empty to used and back), and those whose
        instance's timeout moved earlier than their timer. A timeout that moved later (the
        usual heartbeat of an instance) needs nothing: the user's timer fires early, the
        answer is unchanged, and ``evaluate`` schedules the later instant.
        """
        old, new = self._liveness, InstanceLiveness(
            updated_ms, self._instance_timeout_ms, unlisted_dead=self._unlisted_dead
        )
        self._liveness = new
        affected: dict[Any, None] = {}
        for instance_id, user_ids in self._by_instance.items():
            if self._instance_changed(instance_id, old, new, now_ms):
                affected.update(dict.fromkeys(user_ids))
        return list(affected)

    @staticmethod
    def _instance_changed(
        instance_id: str, old: InstanceLiveness, new: InstanceLiveness, now_ms: int
    ) -> bool:
        was_dead, is_dead = old.is_dead(instance_id, now_ms), new.is_dead(instance_id, now_ms)
        if was_dead != is_dead:
            return True
        if is_dead:
            return False  # dead before and after: its connections still do not count
        old_dies, new_dies = old.dies_at_ms(instance_id), new.dies_at_ms(instance_id)
        return new_dies is not None and (old_dies is None or new_dies < old_dies)

    # ------------------------------------------------------------------ users

    def load(
        self,
        user_id: Any,
        user_doc: Mapping[str, Any] | None,
        sessions_doc: Mapping[str, Any] | None,
        now_ms: int,
        reason: Reason,
        read_seq: int | None = None,
    ) -> PlannedWrite | None:
        """Take freshly read documents for a user, derive, reschedule, maybe plan a write.

        ``user_doc`` None means the user does not exist (deleted): it is forgotten and
        nothing is written. ``sessions_doc`` None means no connections. The write is planned
        only if the stored ``status``/``statusConnection`` differ from the derived pair.
        ``read_seq`` orders concurrent reads (a read started later has a higher number):
        documents older than those already taken for the user are ignored.
        """
        previous = self._use(user_id)
        if read_seq is not None and previous is not None and previous.read_seq > read_seq:
            return None
        if user_doc is None:
            self.forget(user_id)
            return None
        if type(user_doc) is not dict and not isinstance(user_doc, Mapping):
            self._refuse("users", user_id, ["user_not_a_document"], repr(user_doc)[:500])
            self.forget(user_id)
            return None
        state, user_reasons = parse_user(user_doc)
        if user_reasons:
            self._refuse("users", user_id, user_reasons, _bad_user_content(user_doc, user_reasons))
        connections = self._connections_of(user_id, sessions_doc)
        derived = derive_next(state, connections, now_ms, self._ttl_ms, self._liveness)
        username = user_doc.get("username")
        stored_status = _canonical(user_doc.get("status", ABSENT))
        stored_status_connection = _canonical(user_doc.get("statusConnection", ABSENT))
        instance_ids = _instance_ids(connections)
        if previous is None:
            cached = _CachedUser(
                username=username if isinstance(username, str) else None,
                state=state,
                connections=connections,
                stored_status=stored_status,
                stored_status_connection=stored_status_connection,
                instance_ids=instance_ids,
                answer=derived.presence,
                status_text=user_doc.get("statusText", ABSENT),
                roles=_canonical_roles(user_doc.get("roles", ABSENT)),
                read_seq=read_seq if read_seq is not None else -1,
                confirmed=False,
            )
            self._insert(user_id, cached)
            self._reindex(user_id, None, instance_ids)
            self._connections += len(connections)
        else:
            cached = previous
            cached.confirmed = (
                cached.confirmed
                and _same_value(cached.stored_status, stored_status)
                and _same_value(cached.stored_status_connection, stored_status_connection)
            )
            cached.username = username if isinstance(username, str) else None
            cached.state = state
            cached.stored_status = stored_status
            cached.stored_status_connection = stored_status_connection
            cached.status_text = user_doc.get("statusText", ABSENT)
            roles = user_doc.get("roles", ABSENT)
            if not _same_value(roles, cached.roles):  # the same roles: keep the list held
                cached.roles = _canonical_roles(roles)
            self._take_connections(user_id, cached, connections, instance_ids)
            cached.answer = derived.presence
            cached.read_seq = read_seq if read_seq is not None else -1
        if self._connections > self._peak_connections:
            self._peak_connections = self._connections
        return self._settle(user_id, cached, derived, now_ms, reason)

    def load_sessions(
        self,
        user_id: Any,
        sessions_doc: Mapping[str, Any] | None,
        now_ms: int,
        reason: Reason,
        read_seq: int | None = None,
    ) -> PlannedWrite | None:
        """As ``load`` for a cached user whose ``users`` document was not read again: its
        freshly read ``usersSessions`` document with the ``users`` fields held (the last
        read, and the pair the last confirmed write stored).

        For a key that says only the sessions changed: a change to the ``users`` document
        comes as a key of its own, and the caller reads it with ``load``. A write planned
        here expects the pair held, so a pair changed by someone else meets a conflict and
        the user is re-read. ``read_seq`` orders it with the other reads as in ``load``
        (documents older than those taken are ignored). Raises ``KeyError`` if the user is
        not cached (the caller must read it with ``load``).
        """
        cached = self._use(user_id)
        if cached is None:
            raise KeyError(user_id)
        if read_seq is not None and cached.read_seq > read_seq:
            return None
        connections = self._connections_of(user_id, sessions_doc)
        derived = derive_next(cached.state, connections, now_ms, self._ttl_ms, self._liveness)
        self._take_connections(user_id, cached, connections, _instance_ids(connections))
        cached.answer = derived.presence
        cached.read_seq = read_seq if read_seq is not None else -1
        if self._connections > self._peak_connections:
            self._peak_connections = self._connections
        return self._settle(user_id, cached, derived, now_ms, reason)

    def _connections_of(
        self, user_id: Any, sessions_doc: Mapping[str, Any] | None
    ) -> tuple[Connection, ...]:
        """The connections of a ``usersSessions`` document read (none for None); what
        cannot be used is refused."""
        raw_connections: object = None
        if type(sessions_doc) is dict or isinstance(sessions_doc, Mapping):
            raw_connections = sessions_doc.get("connections")
        elif sessions_doc is not None:
            self._refuse("sessions", user_id, ["sessions_not_a_document"], repr(sessions_doc)[:500])
        parsed, connection_reasons = parse_connections(raw_connections)
        if connection_reasons:
            self._refuse(
                "sessions", user_id, connection_reasons, _bad_connections_content(raw_connections)
            )
        return tuple(parsed)

    def _take_connections(
        self,
        user_id: Any,
        cached: _CachedUser,
        connections: tuple[Connection, ...],
        instance_ids: _InstanceIds,
    ) -> None:
        """Hold ``connections`` for a cached user: the count and the instance index."""
        self._connections += len(connections) - len(cached.connections)
        cached.connections = connections
        if instance_ids != cached.instance_ids:
            self._reindex(user_id, cached.instance_ids, instance_ids)
            cached.instance_ids = instance_ids

    def evaluate(self, user_id: Any, now_ms: int, reason: Reason) -> PlannedWrite | None:
        """Re-derive a cached user at ``now_ms`` from what was last read (no new read).

        For a timer that fired or an instance change. An unknown user (never loaded,
        forgotten, evicted) gives None: the caller re-reads it with ``load`` if it matters.
        """
        cached = self._use(user_id)
        if cached is None:
            return None
        derived = derive_next(
            cached.state, cached.connections, now_ms, self._ttl_ms, self._liveness
        )
        cached.answer = derived.presence
        return self._settle(user_id, cached, derived, now_ms, reason)

    def _settle(
        self, user_id: Any, cached: _CachedUser, derived: Derived, now_ms: int, reason: Reason
    ) -> PlannedWrite | None:
        """Schedule the user's next change, note whether it has something to reap, and plan
        the write the answer calls for, if any."""
        if derived.uncounted:
            self._reapable[user_id] = None
        elif user_id in self._reapable:
            del self._reapable[user_id]
        at = derived.next_change_ms
        if at is None:
            self._cancel_timer(cached)
        else:
            self._schedule(user_id, cached, at)
        if not needs_write(cached.stored_status, cached.stored_status_connection, cached.answer):
            return None
        pending = self._in_flight.get(user_id)
        if pending is not None and pending.presence == cached.answer:
            return None  # that write will put the answer there (or fail, and be re-read)
        self._writes_planned[reason] += 1
        write = PlannedWrite(
            user_id=user_id,
            presence=cached.answer,
            expected_status=cached.stored_status,
            expected_status_connection=cached.stored_status_connection,
            reason=reason,
            username=cached.username,
            status_text=cached.status_text,
            roles=cached.roles,
        )
        self._in_flight[user_id] = write
        return write

    def write_done(self, write: PlannedWrite) -> None:
        """The write left the writer's hands (confirmed, conflicting, failed or given up):
        loads may plan a write of the same answer again."""
        if self._in_flight.get(write.user_id) is write:
            del self._in_flight[write.user_id]

    def confirm(self, write: PlannedWrite, now_ms: int) -> Transition | None:
        """The write landed: remember the new stored pair and return the transition.

        None when a confirmed write already put that pair there (the same write confirmed
        twice, or two writes planned before the first landed), so each change is announced
        once. A pair that the cache holds only because a re-read saw this write's result
        before the confirmation is still announced.

        If the answer moved on while the write was in flight (a timer fired, or newer
        documents were loaded, against the old stored pair), the value just written is
        already wrong and nothing else would correct it: the user is made due at ``now_ms``
        so the run loop's next ``evaluate`` plans the follow-up write.
        """
        new_status = write.presence.status.value
        new_status_connection = write.presence.status_connection.value
        cached = self._use(write.user_id)
        username, status_text, roles = write.username, write.status_text, write.roles
        if cached is not None:
            if (
                cached.confirmed
                and _same_value(cached.stored_status, new_status)
                and _same_value(cached.stored_status_connection, new_status_connection)
            ):
                return None
            cached.stored_status = new_status
            cached.stored_status_connection = new_status_connection
            cached.confirmed = True
            username, status_text, roles = cached.username, cached.status_text, cached.roles
            if cached.answer != write.presence:
                self._schedule(write.user_id, cached, now_ms)
        previous = _as_presence(write.expected_status, write.expected_status_connection)
        if previous == write.presence:
            return None
        self._transitions[write.reason] += 1
        return Transition(
            write.user_id, username, previous, write.presence, write.reason,
            previous_status=write.expected_status, status_text=status_text, roles=roles,
        )

    def conflict(self, user_id: Any) -> None:
        """The write's filter did not match: the stored pair changed under us.

        The cached documents are stale, so the user is dropped; the caller re-reads it and
        ``load`` plans a write against the values that are really stored.
        """
        self.forget(user_id)

    def forget(self, user_id: Any) -> None:
        """Drop everything known about a user: cached documents, index entries, timer."""
        cached = self._users.pop(user_id, None)
        if cached is not None:
            self._drop(user_id, cached)
        self._in_flight.pop(user_id, None)

    def presence(self, user_id: Any) -> Presence | None:
        """The last derived answer for a cached user (None if not cached)."""
        cached = self._use(user_id)
        return None if cached is None else cached.answer

    def counts_connection(self, user_id: Any, connection_id: str, now_ms: int) -> bool:
        """True if the user is held and every entry with ``connection_id`` counts at
        ``now_ms``: a heartbeat of that connection cannot change the user's answer (only
        when it stops counting, which its timer will see with the heartbeat's new date)."""
        cached = self._use(user_id)
        if cached is None:
            return False
        entries = [c for c in cached.connections if c.id == connection_id]
        return bool(entries) and all(
            counts(c, now_ms, self._ttl_ms, self._liveness) for c in entries
        )

    def holds(self, user_id: Any, pair: tuple[str, str]) -> bool:
        """True if the stored (status, statusConnection) held for the user is ``pair``."""
        cached = self._use(user_id)
        return (
            cached is not None
            and _same_value(cached.stored_status, pair[0])
            and _same_value(cached.stored_status_connection, pair[1])
        )

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._users

    def _use(self, user_id: Any) -> _CachedUser | None:
        """The cached user, marked as the most recently used."""
        cached = self._users.get(user_id)
        if cached is not None:
            self._users.move_to_end(user_id)
        return cached

    def _insert(self, user_id: Any, cached: _CachedUser) -> None:
        """Cache a new user; evict the least recently used one beyond ``max_users`` (an
        evicted user is re-read when it matters again, never resurrected)."""
        self._users[user_id] = cached
        if len(self._users) > self._max_users:
            evicted_id, evicted = self._users.popitem(last=False)
            self._evictions += 1
            self._drop(evicted_id, evicted)

    def _drop(self, user_id: Any, cached: _CachedUser) -> None:
        """The index, timer and counters of a user that just left the cache."""
        self._reindex(user_id, cached.instance_ids, None)
        self._connections -= len(cached.connections)
        self._cancel_timer(cached)
        self._reapable.pop(user_id, None)

    def _reindex(self, user_id: Any, old: _InstanceIds, new: _InstanceIds) -> None:
        old_ids, new_ids = _as_ids(old), _as_ids(new)
        for instance_id in old_ids:
            if instance_id in new_ids:
                continue
            users = self._by_instance.get(instance_id)
            if users is not None:
                users.discard(user_id)
                if not users:
                    del self._by_instance[instance_id]
        for instance_id in new_ids:
            if instance_id not in old_ids:
                self._by_instance.setdefault(instance_id, set()).add(user_id)

    def reset_peak(self) -> None:
        """Start the peak of ``stats().peak_connections`` again from the current count."""
        self._peak_connections = self._connections

    # ------------------------------------------------------------------ timers

    def _schedule(self, user_id: Any, cached: _CachedUser, at_ms: int) -> None:
        if cached.timer_at is None:
            self._timers += 1
        cached.timer_at = at_ms
        # A later instant than the queued entry (a heartbeat) moves nothing now: the entry
        # is moved to ``timer_at`` when it reaches the top (``due``, ``next_deadline``).
        if cached.queued_at is not None and cached.queued_at <= at_ms:
            return
        cached.queued_at = at_ms
        heapq.heappush(self._heap, (at_ms, _tiebreak(user_id, self._tokens), user_id))
        # Superseded entries are dropped lazily; rebuild when they dominate the heap.
        if len(self._heap) > 2 * self._timers + 1024:
            self._compact()

    def _cancel_timer(self, cached: _CachedUser) -> None:
        if cached.timer_at is not None:
            cached.timer_at = None
            self._timers -= 1

    def _owner(self, entry: tuple[int, int, Any]) -> _CachedUser | None:
        """The cached user whose heap entry this is; None for a superseded entry."""
        cached = self._users.get(entry[2])
        return cached if cached is not None and cached.queued_at == entry[0] else None

    def _compact(self) -> None:
        live: list[tuple[int, int, Any]] = []
        for entry in self._heap:
            cached = self._owner(entry)
            if cached is None:
                continue
            if cached.timer_at is None:
                cached.queued_at = None
            else:
                live.append(entry)
        heapq.heapify(live)
        self._heap = live

    def _requeue_top(self, cached: _CachedUser) -> None:
        """The heap's top entry is ``cached``'s, earlier than its ``timer_at``: move it."""
        at = cached.timer_at
        if at is None:
            cached.queued_at = None
            heapq.heappop(self._heap)
        else:
            cached.queued_at = at
            _, tiebreak, user_id = self._heap[0]
            heapq.heapreplace(self._heap, (at, tiebreak, user_id))

    def due(self, now_ms: int) -> list[Any]:
        """Pop the users whose timer is at or before ``now_ms``, for ``evaluate``."""
        due: list[Any] = []
        heap = self._heap
        while heap and heap[0][0] <= now_ms:
            cached = self._owner(heap[0])
            if cached is None:
                heapq.heappop(heap)
            elif cached.timer_at is not None and cached.timer_at <= now_ms:
                user_id = heapq.heappop(heap)[2]
                cached.queued_at = cached.timer_at = None
                self._timers -= 1
                # Something stopped counting: the reaper looks at the user until a
                # derivation shows every connection counts again.
                self._reapable[user_id] = None
                due.append(user_id)
            else:
                self._requeue_top(cached)
        return due

    def next_deadline(self) -> int | None:
        """The earliest pending timer in ms, or None when nothing can change by itself."""
        heap = self._heap
        while heap:
            cached = self._owner(heap[0])
            if cached is None:
                heapq.heappop(heap)
            elif cached.timer_at == heap[0][0]:
                return cached.timer_at
            else:
                self._requeue_top(cached)
        return None

    # ------------------------------------------------------------------ reaper

    def reapable(self, now_ms: int) -> list[ReapCandidate]:
        """Per cached user, the reaper's plan (``presence.reap_plan``): the connections that
        no longer count, never an id that would also pull a counted one.

        Only the users that may have one are looked at, not every cached user: those a
        derivation or a timer left in the reapable set, those whose timer is due (not yet
        popped), and those with a connection on an instance that is dead now.
        """
        looked_at = dict(self._reapable)
        looked_at.update(dict.fromkeys(self._timers_due(now_ms)))
        for instance_id, user_ids in self._by_instance.items():
            if self._liveness.is_dead(instance_id, now_ms):
                looked_at.update(dict.fromkeys(user_ids))
        candidates: list[ReapCandidate] = []
        for user_id in looked_at:
            cached = self._users.get(user_id)
            if cached is None:
                self._reapable.pop(user_id, None)
                continue
            if not uncounted_connections(cached.connections, now_ms, self._ttl_ms, self._liveness):
                self._reapable.pop(user_id, None)
                continue
            self._reapable[user_id] = None
            plan = reap_plan(cached.connections, now_ms, self._ttl_ms, self._liveness)
            if plan is not None:
                candidates.append(ReapCandidate(user_id, plan))
        return candidates

    def _timers_due(self, now_ms: int) -> list[Any]:
        """The users of the heap entries at or before ``now_ms``, without popping them: a
        walk of the heap's top, down only the branches that start at or before ``now_ms``."""
        heap, found = self._heap, []
        stack = [0] if heap and heap[0][0] <= now_ms else []
        while stack:
            i = stack.pop()
            found.append(heap[i][2])
            for child in (2 * i + 1, 2 * i + 2):
                if child < len(heap) and heap[child][0] <= now_ms:
                    stack.append(child)
        return found

    @property
    def liveness(self) -> InstanceLiveness:
        """The instances view last given to ``set_instances``."""
        return self._liveness

    @property
    def ttl_ms(self) -> int:
        return self._ttl_ms

    # ------------------------------------------------------------------ refused input

    def _refuse(self, kind: str, doc_id: Any, reasons: Iterable[str], content: str) -> None:
        self._refused.append(Refused(kind, doc_id, tuple(reasons), content))

    def take_refused(self) -> list[Refused]:
        """The documents refused since the last call (each read counts: the caller decides
        what is new), oldest first."""
        refused, self._refused = self._refused, []
        return refused

    # ------------------------------------------------------------------ metrics

    def stats(self) -> EngineStats:
        """Users cached, live timers, and the decision counters since start (no walk)."""
        return EngineStats(
            users_tracked=len(self._users),
            timers_pending=self._timers,
            connections=self._connections,
            peak_connections=self._peak_connections,
            writes_planned=MappingProxyType(dict(self._writes_planned)),
            transitions=MappingProxyType(dict(self._transitions)),
            evictions=self._evictions,
        )


def _same_value(a: object, b: object) -> bool:
    """Equal and of the same type (``1 == True`` and ``1 == 1.0`` are not the same value)."""
    return type(a) is type(b) and a == b
