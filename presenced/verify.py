"""``presenced verify``: is every user's stored status what the daemon's rules derive?

Owns: reading ``users``, ``usersSessions`` and ``instances`` in batches, deriving each user
at one instant with the daemon's own rules (``presence.py``: the same parsing, the same
``derive``, the same "differs" test the daemon writes on), telling which users differ and
why in words, leaving out users whose documents were still changing (the grace period),
and, with ``fix``, writing the derived values with the daemon's conditional writes
(``Store.write_statuses``). Blocking (pymongo): a command-line tool, never run inside the
daemon's event loop.

The grace period: a daemon a few milliseconds behind a change is not wrong. A user that
differs at the first instant is read again ``grace_s`` later; it counts only if its
documents did not change in between and it still differs at the second instant. A user
whose documents changed meanwhile is counted as ``recent``, not as a difference.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from pymongo.database import Database

from presenced.presence import (
    ABSENT,
    Collections,
    Connection,
    InstanceLiveness,
    Presence,
    Status,
    derive,
    from_ms,
    needs_write,
    parse_connections,
    parse_instances,
    parse_user,
)
from presenced.store import StatusWrite, Store

__all__ = ["Difference", "Report", "verify"]

BATCH: Final = 1000
"""Users read per batch (one ``getMore`` of users, one ``find`` of their sessions)."""

Document = dict[str, Any]
Progress = Callable[[int, int], None]
"""Called with (users read so far, users the collection holds by its metadata)."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Difference:
    """A user whose stored pair is not the derived one."""

    user_id: Any
    username: str | None
    stored: tuple[object, object]
    """``status`` and ``statusConnection`` as read (:data:`ABSENT` for a missing field)."""
    derived: Presence
    why: str
    """In words: what made the derivation (e.g. "connection c7 on dead instance i2")."""

    def as_json(self) -> dict[str, Any]:
        return {
            "id": _json_value(self.user_id),
            "username": self.username,
            "stored": {"status": _json_value(self.stored[0]),
                       "statusConnection": _json_value(self.stored[1])},
            "derived": {"status": str(self.derived.status),
                        "statusConnection": str(self.derived.status_connection)},
            "why": self.why,
        }


@dataclass(slots=True)
class Report:
    """What one ``verify`` found."""

    at: datetime
    """The instant every user was derived at (the first pass)."""
    checked: int = 0
    """Users derived."""
    recent: int = 0
    """Users that differed but whose documents changed within the grace period: not counted."""
    differences: list[Difference] = field(default_factory=list)
    unreadable: Counter[str] = field(default_factory=Counter)
    """What could not be read, by reason (``presence.py``'s names); it counts as no
    connection, as in the daemon."""
    fixed: int = 0
    """With ``fix``: differences written."""
    conflicts: int = 0
    """With ``fix``: writes that met a concurrent change (left to the daemon)."""

    @property
    def ok(self) -> bool:
        return not self.differences

    def as_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "checked": self.checked,
            "recent": self.recent,
            "differing": len(self.differences),
            "differences": [d.as_json() for d in self.differences],
            "unreadable": dict(sorted(self.unreadable.items())),
            "fixed": self.fixed,
            "conflicts": self.conflicts,
        }


@dataclass(frozen=True, slots=True)
class _Rules:
    ttl_ms: int
    instance_timeout_ms: int
    unlisted_dead: bool

    def liveness(self, instances: list[Document], unreadable: Counter[str] | None) -> (
        InstanceLiveness
    ):
        updated, reasons = parse_instances(instances)
        if unreadable is not None:
            unreadable.update(reasons)
        return InstanceLiveness(updated, self.instance_timeout_ms, self.unlisted_dead)


@dataclass(frozen=True, slots=True)
class _Read:
    """One user's documents as read, and what they derive at the pass's instant."""

    user: Document
    sessions: Document | None
    presence: Presence

    def same_documents(self, other: _Read) -> bool:
        return self.user == other.user and self.sessions == other.sessions


def verify(
    db: Database[Document],
    collections: Collections,
    *,
    ttl_ms: int,
    instance_timeout_ms: int,
    unlisted_dead: bool = True,
    grace_s: float = 2.0,
    fix: bool = False,
    batch: int = BATCH,
    progress: Progress | None = None,
    now_ms: Callable[[], int] = _now_ms,
    sleep: Callable[[float], None] = time.sleep,
) -> Report:
    """Derive every user of ``db`` and list those whose stored pair differs.

    ``ttl_ms``, ``instance_timeout_ms`` and ``unlisted_dead`` are the daemon's (CACHE_TTL,
    INSTANCE_TIMEOUT, and False when it runs with the service broker). Raises pymongo's
    errors when MongoDB cannot be read.
    """
    if grace_s < 0:
        raise ValueError(f"grace_s must be zero or more seconds, not {grace_s}")
    store = Store(db.client, collections)
    rules = _Rules(ttl_ms, instance_timeout_ms, unlisted_dead)
    first_ms = now_ms()
    report = Report(at=from_ms(first_ms))
    liveness = rules.liveness(store.load_instances(), report.unreadable)
    total = store.estimated_count("users")
    suspects: dict[Any, _Read] = {}
    for users in _user_batches(store, batch):
        sessions = store.load_sessions([doc["_id"] for doc in users])
        for user in users:
            read = _derive(user, sessions.get(user["_id"]), first_ms, rules, liveness,
                           report.unreadable)
            report.checked += 1
            if _differs(read):
                suspects[user["_id"]] = read
        if progress is not None:
            progress(report.checked, max(total, report.checked))
    if not suspects:
        return report
    if grace_s > 0:
        sleep(max(0.0, grace_s - (now_ms() - first_ms) / 1000))
        second_ms = now_ms()
        liveness = rules.liveness(store.load_instances(), None)
        suspects = _read_again(store, suspects, second_ms, rules, liveness, report)
    else:
        second_ms = first_ms
    for user_id, read in suspects.items():
        report.differences.append(Difference(
            user_id=user_id,
            username=_username(read.user),
            stored=_stored(read.user),
            derived=read.presence,
            why=explain(read, second_ms, rules, liveness),
        ))
    if fix:
        _fix(store, report)
    return report


def _user_batches(store: Store, batch: int) -> Iterator[list[Document]]:
    """Every ``users`` document (projected as the daemon's loads), ``batch`` at a time:
    the string ids in ``_id`` order, then any others."""
    cursor = store.reconcile_cursor("users", None, batch)
    try:
        while docs := cursor.next_batch():
            yield docs
    finally:
        cursor.close()
    strays = store.reconcile_strays("users")
    for start in range(0, len(strays), batch):
        yield strays[start:start + batch]


def _derive(
    user: Document,
    sessions: Document | None,
    at_ms: int,
    rules: _Rules,
    liveness: InstanceLiveness,
    unreadable: Counter[str] | None,
) -> _Read:
    state, user_reasons = parse_user(user)
    connections, connection_reasons = _connections(sessions)
    if unreadable is not None:
        unreadable.update(user_reasons)
        unreadable.update(connection_reasons)
    presence = derive(state, connections, at_ms, rules.ttl_ms, liveness)
    return _Read(user, sessions, presence)


def _connections(sessions: Document | None) -> tuple[list[Connection], list[str]]:
    return parse_connections(None if sessions is None else sessions.get("connections"))


def _differs(read: _Read) -> bool:
    status, status_connection = _stored(read.user)
    return needs_write(status, status_connection, read.presence)


def _stored(user: Mapping[str, Any]) -> tuple[object, object]:
    return user.get("status", ABSENT), user.get("statusConnection", ABSENT)


def _username(user: Mapping[str, Any]) -> str | None:
    username = user.get("username")
    return username if isinstance(username, str) else None


def _read_again(
    store: Store,
    suspects: dict[Any, _Read],
    at_ms: int,
    rules: _Rules,
    liveness: InstanceLiveness,
    report: Report,
) -> dict[Any, _Read]:
    """The suspects that still differ at ``at_ms`` with the same documents as at first;
    those whose documents changed are counted as ``recent``."""
    still: dict[Any, _Read] = {}
    ids = list(suspects)
    for start in range(0, len(ids), BATCH):
        chunk = ids[start:start + BATCH]
        users = store.load_users(chunk)
        sessions = store.load_sessions(chunk)
        for user_id in chunk:
            user = users.get(user_id)
            if user is None:  # deleted meanwhile: nobody's status to be wrong
                report.recent += 1
                continue
            read = _derive(user, sessions.get(user_id), at_ms, rules, liveness, None)
            if not read.same_documents(suspects[user_id]):
                report.recent += 1
            elif _differs(read):
                still[user_id] = read
    return still


def _fix(store: Store, report: Report) -> None:
    """Write each difference's derived pair where the stored pair is still the one read."""
    writes = [
        StatusWrite(
            user_id=d.user_id, status=str(d.derived.status),
            status_connection=str(d.derived.status_connection),
            expected_status=d.stored[0], expected_status_connection=d.stored[1],
        )
        for d in report.differences
    ]
    for start in range(0, len(writes), BATCH):
        outcome = store.write_statuses(writes[start:start + BATCH])
        report.fixed += len(outcome.written)
        report.conflicts += len(outcome.conflicts)


# ---------------------------------------------------------------------- why, in words

def explain(read: _Read, at_ms: int, rules: _Rules, liveness: InstanceLiveness) -> str:
    """What the derivation of ``read`` at ``at_ms`` rests on, in a few clauses."""
    state, _ = parse_user(read.user)
    connections, reasons = _connections(read.sessions)
    clauses: list[str] = []
    if not state.active:
        clauses.append("the user is deactivated (active: false)")
    if read.sessions is None:
        clauses.append("no usersSessions document")
    elif not connections and not reasons:
        clauses.append("no connections")
    if reasons:
        shown = ", ".join(f"{n} {r}" for r, n in sorted(Counter(reasons).items()))
        clauses.append(f"unreadable connection entries, counted as none ({shown})")
    clauses += [_why_connection(c, at_ms, rules, liveness) for c in connections[:_SHOWN]]
    if len(connections) > _SHOWN:
        clauses.append(f"and {len(connections) - _SHOWN} more connections")
    if state.active and read.presence.status != Status.OFFLINE and (
        state.status_default != Status.ONLINE
    ):
        clauses.append(f"statusDefault is {state.status_default}")
    return "; ".join(clauses)


_SHOWN: Final = 5


def _why_connection(
    conn: Connection, at_ms: int, rules: _Rules, liveness: InstanceLiveness
) -> str:
    name = f"connection {conn.id} ({conn.status})"
    age = _seconds(at_ms - conn.updated_ms)
    instance = conn.instance_id
    if at_ms - conn.updated_ms > rules.ttl_ms:
        return (f"{name} is stale: last updated {age} ago, more than CACHE_TTL"
                f" {_seconds(rules.ttl_ms)}")
    if liveness.is_dead(instance, at_ms):
        updated = liveness.updated_ms.get(instance) if instance is not None else None
        if updated is None:
            return f"{name} on dead instance {instance} (not in instances)"
        return (f"{name} on dead instance {instance} (last seen {_seconds(at_ms - updated)}"
                f" ago, more than INSTANCE_TIMEOUT {_seconds(rules.instance_timeout_ms)})")
    where = f" on live instance {instance}" if instance is not None else ""
    if conn.status == Status.OFFLINE:
        return f"{name}{where} counts but is offline"
    return f"{name}{where} counts (updated {age} ago)"


def _seconds(ms: int) -> str:
    if ms < 0:
        return f"{-ms / 1000:g} s in the future"
    return f"{ms / 1000:g} s"


def _json_value(value: object) -> Any:
    if value is ABSENT:
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, datetime):
        return value.replace(tzinfo=value.tzinfo or UTC).isoformat()
    return repr(value)


def render_text(report: Report, shown: Sequence[Difference] | None = None) -> str:
    """The report for a person: one line per difference, then the totals."""
    lines: list[str] = []
    for d in report.differences if shown is None else shown:
        who = f"{d.user_id}" + (f" ({d.username})" if d.username else "")
        stored = "/".join(_shown_value(v) for v in d.stored)
        lines.append(f"{who}: stored {stored}, derived {d.derived.status}/"
                     f"{d.derived.status_connection}: {d.why}")
    summary = (f"{report.checked} users checked at {_iso(report.at)}: "
               f"{len(report.differences)} differ")
    if report.recent:
        summary += f", {report.recent} left out (changed within the grace period)"
    lines.append(summary)
    if report.unreadable:
        lines.append("unreadable (counted as no connection): " + ", ".join(
            f"{n} {r}" for r, n in sorted(report.unreadable.items())))
    if report.fixed or report.conflicts:
        lines.append(f"fixed {report.fixed}; {report.conflicts} changed meanwhile, left to"
                     " the daemon")
    return "\n".join(lines)


def _shown_value(value: object) -> str:
    return "(missing)" if value is ABSENT else str(value) if isinstance(value, str) else repr(value)


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
