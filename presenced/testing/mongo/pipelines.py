"""Aggregation pipelines run on documents the storage hands over: a change stream's
events, the oplog's entries.

Owns: running a pipeline on a list of documents with mongomock-ng, except its leading
``$match`` stages, which run here: the filter prepared once per pipeline object (a
change stream applies the same one to every event), and its verdict remembered by the
values of the fields it reads (every event of one collection and operation gets the
same verdict from a filter on ``ns`` and ``operationType``), so an event is neither
copied nor matched again when its verdict is known.

Must never: answer differently from mongomock-ng's ``$match`` (which compares a copy of
each document with its datetimes made naive and cut to the millisecond: so does this,
when a document has such datetimes). A verdict is remembered only when the filter reads
nothing but named fields (no ``$expr``, ``$where``...), and is keyed by those fields'
values compared with their exact types (``1``, ``1.0`` and ``true`` are three keys). Nor
know about the storage, the oplog format or the wire.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Hashable, Mapping
from typing import Any

from bson import ObjectId, Timestamp
from mongomock_ng import helpers as mm_helpers
from mongomock_ng.filtering import filter_applies

Document = dict[str, Any]


def _needs_patch(value: Any) -> bool:
    """Whether mongomock-ng's patch_datetime_awareness_in_document would change
    ``value`` (aware or sub-millisecond datetimes, Timestamp(0, 0), tuples)."""
    # Loops, not any(): no generator per node (this runs on every change event).
    t = type(value)
    if t is dict:
        for v in value.values():  # noqa: SIM110
            if _needs_patch(v):
                return True
        return False
    if t is list:
        for v in value:  # noqa: SIM110
            if _needs_patch(v):
                return True
        return False
    if t is str or t is int or t is bool or t is float or value is None:
        return False
    if isinstance(value, dt.datetime):
        return value.tzinfo is not None or value.microsecond % 1000 != 0
    if isinstance(value, Timestamp):
        return not value.time and not value.inc
    if isinstance(value, Mapping):
        return True  # another mapping type: let mongomock-ng rebuild it
    return isinstance(value, list | tuple)


def as_matched(doc: Any) -> Any:
    """``doc`` as mongomock-ng's ``$match`` stage compares it (its datetimes patched), the
    same object when that changes nothing."""
    return mm_helpers.patch_datetime_awareness_in_document(doc) if _needs_patch(doc) else doc


_WHOLE = object()  # a filter operator that may read any field


def _fields_read(spec: Any) -> frozenset[str] | None:
    """The top-level fields a filter reads (the first part of each path), or None when it
    may read more (``$expr``, ``$where``, anything but named fields and logic)."""
    if not isinstance(spec, Mapping):
        return None
    fields: set[str] = set()
    for key, value in spec.items():
        if key in ("$and", "$or", "$nor"):
            if not isinstance(value, list):
                return None
            for sub in value:
                inner = _fields_read(sub)
                if inner is None:
                    return None
                fields |= inner
        elif key == "$comment":
            continue
        elif key.startswith("$"):
            return None
        else:
            fields.add(key.split(".", 1)[0])  # its operators read that field's value only
    return frozenset(fields)


_ABSENT = ("absent",)


def _exact(value: Any) -> Hashable | None:
    """A key equal for two values only if mongomock-ng cannot tell them apart: the value
    with its type, recursively; None when there is none (unhashable, or a value whose
    patch is not a function of it: Timestamp(0, 0) becomes the current time)."""
    t = type(value)
    if t is str or t is int or t is bool or t is float or value is None or t is ObjectId:
        return (t, value)
    if t is dict:
        items = []
        for k, v in value.items():
            key = _exact(v)
            if key is None:
                return None
            items.append((k, key))
        return (dict, tuple(items))
    if t is list:
        elements = []
        for v in value:
            key = _exact(v)
            if key is None:
                return None
            elements.append(key)
        return (list, tuple(elements))
    if t is dt.datetime:
        return (t, value, value.tzinfo)
    if t is Timestamp:
        return None if not value.time and not value.inc else (t, value)
    return None


class _PreparedFilter:
    def __init__(self, spec: Any, memo_size: int) -> None:
        self.spec = spec  # held: keeps id(spec) from being reused while cached
        self.prepared = as_matched(spec)
        fields = _fields_read(spec)
        self.fields = sorted(fields) if fields is not None else None
        self._memo: dict[Hashable, bool] = {}
        self._memo_size = memo_size

    def matches(self, doc: Any) -> bool:
        key: Hashable | None = None
        if self.fields is not None and isinstance(doc, dict):
            parts = []
            for name in self.fields:
                part = _exact(doc[name]) if name in doc else _ABSENT
                if part is None:
                    break
                parts.append(part)
            else:
                key = tuple(parts)
                known = self._memo.get(key)
                if known is not None:
                    return known
        verdict = bool(filter_applies(self.prepared, as_matched(doc)))
        if key is not None:
            if len(self._memo) >= self._memo_size:
                self._memo.clear()
            self._memo[key] = verdict
        return verdict


class PreparedFilters:
    """The ``$match`` filters of the pipelines run on one storage's documents, by the
    identity of the stage's filter object; bounded."""

    def __init__(self, size: int = 256, memo_size: int = 4096) -> None:
        self._size = size
        self._memo_size = memo_size
        self._by_id: dict[int, _PreparedFilter] = {}
        self._lock = threading.Lock()

    def get(self, spec: Any) -> _PreparedFilter:
        with self._lock:
            hit = self._by_id.get(id(spec))
            if hit is not None and hit.spec is spec:
                return hit
            prepared = _PreparedFilter(spec, self._memo_size)
            if len(self._by_id) >= self._size:
                self._by_id.clear()
            self._by_id[id(spec)] = prepared
            return prepared


def run_pipeline(docs: list[Document], database: Any, pipeline: list[Document],
                 filters: PreparedFilters) -> list[Any]:
    """mongomock-ng's aggregation of ``docs``, leading ``$match`` stages applied here."""
    from mongomock_ng import aggregate

    stages = list(pipeline)
    while stages and isinstance(stages[0], Mapping) and len(stages[0]) == 1 and (
            "$match" in stages[0]):
        match = filters.get(stages.pop(0)["$match"])
        docs = [doc for doc in docs if match.matches(doc)]
    if not stages:
        return docs
    return list(aggregate.process_pipeline(docs, database, stages, None))


__all__ = ["PreparedFilters", "as_matched", "run_pipeline"]
