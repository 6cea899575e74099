"""The keys every feed produces: "this thing changed, go and re-read it".

Owns: the key types (:class:`SessionsChanged`, :class:`UserChanged`,
:class:`InstancesChanged`, :class:`ResyncAll`) and :class:`Decoded`, a decoder's answer.
The collections a feed watches and the ``users`` fields presence reads come from
:mod:`presenced.presence` (``Collections``, ``USER_FIELDS``).

A key says *which* document changed, never *how*: the loader re-reads the current
documents, so a key is correct whatever the event carried. Both feeds (change streams and
the oplog) produce exactly these keys, so everything downstream is shared.

Must never: decide a status, do I/O, import pymongo, trio or loguru. Everything here is pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from presenced.presence import USER_FIELDS


@dataclass(frozen=True, slots=True)
class SessionsChanged:
    """A ``usersSessions`` document was inserted, updated, replaced or deleted."""

    user_id: Any


@dataclass(frozen=True, slots=True)
class UserChanged:
    """A ``users`` document changed in a field presence reads, or was inserted/replaced/deleted.

    ``written``: when the change set ``status`` and ``statusConnection`` (to strings) and
    touched no other field presence reads, the pair it stored. A reader that already holds
    exactly that pair (its own write, coming back through the feed) learns nothing new.
    """

    user_id: Any
    written: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class InstancesChanged:
    """An ``instances`` document appeared, changed or was deleted."""

    instance_id: Any


@dataclass(frozen=True, slots=True)
class ResyncAll:
    """Something happened that no per-document key can describe: reconcile everything.

    ``reason`` is the event that caused it: ``drop``, ``dropDatabase``, ``rename`` or
    ``invalidate`` (a feed may add its own reasons).
    """

    reason: str


Key = SessionsChanged | UserChanged | InstancesChanged | ResyncAll


@dataclass(frozen=True, slots=True)
class Decoded:
    """What one change event or oplog entry means: its keys, and whether it was malformed."""

    keys: tuple[Key, ...] = ()
    malformed: bool = False

PRESENCE_USER_FIELDS: frozenset[str] = frozenset(USER_FIELDS)
"""Top-level ``users`` fields presence reads; a change to any other field needs no re-read."""

def status_pair_written(
    set_fields: Mapping[str, Any], touched: Iterable[str]
) -> tuple[str, str] | None:
    """The (status, statusConnection) an update set, when among the fields presence reads
    it touched exactly those two, each set whole to a string; else None."""
    presence_touched = {f.split(".", 1)[0] for f in touched} & PRESENCE_USER_FIELDS
    if presence_touched != {"status", "statusConnection"}:
        return None
    status, status_connection = set_fields.get("status"), set_fields.get("statusConnection")
    if type(status) is str and type(status_connection) is str:
        return status, status_connection
    return None


def touches_presence_fields(top_level_fields: Iterable[str]) -> bool:
    """True if any of ``top_level_fields`` is (or is inside) a field presence reads.

    Dotted paths count by their first component: ``"roles.0"`` touches ``roles``,
    ``"services.resume.loginTokens"`` touches nothing presence reads.
    """
    return any(field.split(".", 1)[0] in PRESENCE_USER_FIELDS for field in top_level_fields)
