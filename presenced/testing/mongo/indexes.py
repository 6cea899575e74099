"""A collection's documents with their indexes kept in step, the choice of candidate
documents for a filter, unique keys, and MongoDB's duplicate-key error.

Owns: :class:`DocumentTable`, a collection's documents by store key in natural order
(a ``dict`` whose every write, whoever makes it, updates the indexes: mongomock-ng's
write paths, a transaction's abort restoring images, a snapshot load); the lookup
entries of each indexed path (``_id`` and the first field of every index: equality,
ranges, arrays of documents); the keys of unique indexes with MongoDB's multikey rules;
and the ``E11000`` message as MongoDB prints it.

Must never: decide that a document matches a filter. An index only proposes candidates;
the full filter (mongomock-ng's ``filter_applies``) then runs on every one of them, so a
candidate set may be too large but never too small; anything the planner cannot prove is
left to a scan. Nor mutate a document, or know about the oplog, the catalog or the wire.

The lookup entries follow mongomock-ng's own matching (``iter_key_candidates``: what a
filter on that path compares with), not MongoDB's index format, so that "the results
with an index equal the results of a scan" holds by construction for the engine the
emulator runs; unique keys follow MongoDB's rules, which decide what is a duplicate.
"""

from __future__ import annotations

import bisect
import datetime as dt
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

from bson import Binary, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from mongomock_ng import helpers as mm_helpers
from mongomock_ng.filtering import filter_applies, iter_key_candidates
from pymongo.errors import DuplicateKeyError

Document = dict[str, Any]
IndexSpec = list[tuple[str, Any]]


class _Marker:
    """A lookup entry that is not a value: missing field, no candidates, NaN, ..."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


#: The path resolves to nothing in the document ({"a": None} and {"a": {$exists: false}}
#: match it).
MISSING: Final = _Marker("missing")
#: The path has no candidates at all (``a.b`` on ``a: []`` or ``a: 5``): only
#: ``{$exists: false}`` matches it.
EMPTY: Final = _Marker("empty")
#: A float NaN (equal to itself for mongomock-ng, unlike for Python's dict).
NAN: Final = _Marker("nan")
#: A value the index neither orders nor hashes reliably (subdocuments, nested arrays,
#: Decimal128, Timestamp, binary, aware datetimes...): always a candidate.
UNORDERED: Final = _Marker("unordered")

# mongomock-ng's comparison ranks (filtering._get_compare_type) of the types the index
# orders: a range operator only matches values of its operand's rank.
_NULL, _NUMBER, _STRING, _OBJECT_ID, _BOOL, _DATE = 5, 10, 15, 35, 40, 45


def _rank(value: Any) -> int | None:
    """The comparison rank of a value the index orders, None for the others."""
    if value is None:
        return _NULL
    t = type(value)
    if t is str:
        return _STRING
    if t is bool:
        return _BOOL
    if t is int or t is float or t is Int64:
        return _NUMBER
    if t is ObjectId:
        return _OBJECT_ID
    if t is dt.datetime:
        return _DATE if value.tzinfo is None else None
    return None


def entry_key(value: Any) -> Any:
    """The lookup entry of one value (an element of an array, or a scalar)."""
    rank = _rank(value)
    if rank is None:
        return UNORDERED
    if rank == _NUMBER and type(value) is float and math.isnan(value):
        return NAN
    return (rank, value)


def lookup_entries(path: str, doc: Mapping[str, Any]) -> frozenset[Any]:
    """What a filter on ``path`` can compare with in ``doc``: for each value mongomock-ng
    resolves the path to, the value itself, or each element of an array (a filter
    compares a scalar operand with the elements; an empty array matches none)."""
    values = iter_key_candidates(path, doc)
    if not values:
        return frozenset((EMPTY,))
    out: set[Any] = set()
    for value in values:
        if value is mm_helpers.NOTHING:
            out.add(MISSING)
        elif isinstance(value, list | tuple):
            for element in value:
                out.add(entry_key(element))
        else:
            out.add(entry_key(value))
    return frozenset(out)


class _Many(set[Any]):
    """Several store keys under one lookup entry (one key is stored bare)."""


def _add(postings: dict[Any, Any], entry: Any, key: Any) -> bool:
    """Add ``key`` under ``entry``; True when the entry is new."""
    have = postings.get(entry, _ABSENT)
    if have is _ABSENT:
        postings[entry] = key
        return True
    if type(have) is _Many:
        have.add(key)
    elif have != key:
        postings[entry] = _Many((have, key))
    return False


def _remove(postings: dict[Any, Any], entry: Any, key: Any) -> bool:
    """Remove ``key`` from ``entry``; True when the entry is gone."""
    have = postings.get(entry, _ABSENT)
    if have is _ABSENT:
        return False
    if type(have) is _Many:
        have.discard(key)
        if len(have) == 1:
            postings[entry] = next(iter(have))
        return False
    if have == key:
        del postings[entry]
        return True
    return False


def _keys(posting: Any) -> Iterable[Any]:
    if posting is _ABSENT:
        return ()
    return posting if type(posting) is _Many else (posting,)


_ABSENT: Final = _Marker("absent")


class PathIndex:
    """The lookup entries of one dotted path, for every document of a collection (sparse
    or partial indexes included: this structure only proposes candidates)."""

    def __init__(self, path: str) -> None:
        self.path = path
        #: lookup entry -> store key (or _Many of them)
        self.postings: dict[Any, Any] = {}
        #: rank -> the distinct values of that rank present, sorted
        self.ordered: dict[int, list[Any]] = {}
        #: store key -> its lookup entries (one entry bare, several as a frozenset)
        self.entries: dict[Any, Any] = {}

    def reindex(self, key: Any, doc: Mapping[str, Any] | None) -> None:
        old = self.entries.get(key, _ABSENT)
        new: frozenset[Any] = lookup_entries(self.path, doc) if doc is not None else frozenset()
        if old is _ABSENT:
            old_set: frozenset[Any] = frozenset()
        elif type(old) is frozenset:
            old_set = old
        else:
            old_set = frozenset((old,))
        if old_set == new:
            return
        for entry in old_set - new:
            if _remove(self.postings, entry, key) and type(entry) is tuple and entry[0] != _NULL:
                values = self.ordered[entry[0]]
                i = bisect.bisect_left(values, entry[1])
                del values[i]
        for entry in new - old_set:
            if _add(self.postings, entry, key) and type(entry) is tuple and entry[0] != _NULL:
                bisect.insort(self.ordered.setdefault(entry[0], []), entry[1])
        if not new:
            self.entries.pop(key, None)
        else:
            self.entries[key] = next(iter(new)) if len(new) == 1 else new

    # -- lookups (each a superset of the documents the operator matches) -------------
    def keys_for(self, entries: Iterable[Any]) -> set[Any]:
        out: set[Any] = set()
        postings = self.postings
        for entry in entries:
            out.update(_keys(postings.get(entry, _ABSENT)))
        out.update(_keys(postings.get(UNORDERED, _ABSENT)))
        return out

    def range_entries(self, op: str, operand: Any) -> list[Any] | None:
        rank = _rank(operand)
        if rank is None or (type(operand) is float and math.isnan(operand)):
            return None
        if rank == _NULL:  # null compares equal to null only: $gte/$lte match it
            return [(_NULL, None)] if op in ("$gte", "$lte") else []
        values = self.ordered.get(rank, [])
        if op == "$gt":
            chosen = values[bisect.bisect_right(values, operand):]
        elif op == "$gte":
            chosen = values[bisect.bisect_left(values, operand):]
        elif op == "$lt":
            chosen = values[:bisect.bisect_left(values, operand)]
        else:
            chosen = values[:bisect.bisect_right(values, operand)]
        return [(rank, v) for v in chosen]


def equality_entries(operand: Any, *, plain: bool) -> list[Any] | None:
    """The lookup entries a document must have for ``{path: operand}`` (``plain``) or
    ``{path: {$eq: operand}}`` / ``$in`` to match it, as mongomock-ng compares (Python
    equality: 1 == 1.0 == True); None when the operand is not one the index serves."""
    rank = _rank(operand)
    if rank is None:
        return None
    if rank == _NULL:
        return [(_NULL, None), MISSING]
    if rank == _NUMBER and type(operand) is float and math.isnan(operand):
        return [NAN]
    out: list[Any] = [(rank, operand)]
    if rank == _BOOL:
        out.append((_NUMBER, int(operand)))
    elif rank == _NUMBER and operand in (0, 1):
        out.append((_BOOL, bool(operand)))
    elif rank == _OBJECT_ID and plain:
        out.append((_STRING, str(operand)))  # mongomock-ng: an array holding its hex
    return out


# -------------------------------------------------------------------------- planning

def _conjuncts(filter: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """The (path, condition) clauses every match must satisfy, ``$and`` flattened."""
    for key, value in filter.items():
        if key == "$and" and isinstance(value, list):
            for sub in value:
                if isinstance(sub, Mapping):
                    yield from _conjuncts(sub)
        elif not key.startswith("$"):
            yield key, value


def _is_plain_scalar(value: Any) -> bool:
    return not isinstance(value, Mapping | list | tuple | re.Pattern | Regex)


class _Planner:
    """Candidate store keys of one filter on one table."""

    def __init__(self, table: DocumentTable) -> None:
        self.table = table

    def clause(self, path: str, cond: Any) -> set[Any] | None:
        """A superset of the store keys whose document satisfies ``{path: cond}``, or
        None when no index serves it."""
        if isinstance(cond, Mapping) and cond and all(str(k).startswith("$") for k in cond):
            return self.operators(path, cond)
        index = self.table.paths.get(path)
        if index is None or not _is_plain_scalar(cond):
            return None
        entries = equality_entries(cond, plain=True)
        return None if entries is None else index.keys_for(entries)

    def operators(self, path: str, ops: Mapping[str, Any]) -> set[Any] | None:
        # Every operator must hold (of one value, or of some elements of one array), so
        # each served operator alone gives a superset: keep the smallest.
        best: set[Any] | None = None
        if "$options" in ops:
            return None
        index = self.table.paths.get(path)
        for op, operand in ops.items():
            found: set[Any] | None = None
            if op == "$elemMatch":
                found = self.elem_match(path, operand)
            elif index is None:
                continue
            elif op == "$eq" and _is_plain_scalar(operand):
                entries = equality_entries(operand, plain=False)
                found = None if entries is None else index.keys_for(entries)
            elif op == "$in" and isinstance(operand, list | tuple):
                found = self.in_values(index, operand)
            elif op in ("$gt", "$gte", "$lt", "$lte") and _is_plain_scalar(operand):
                entries = index.range_entries(op, operand)
                found = None if entries is None else index.keys_for(entries)
            elif op == "$exists" and not operand:
                found = index.keys_for((MISSING, EMPTY))
            if found is not None and (best is None or len(found) < len(best)):
                best = found
        return best

    def in_values(self, index: PathIndex, values: Iterable[Any]) -> set[Any] | None:
        entries: list[Any] = []
        for value in values:
            if not _is_plain_scalar(value):
                return None
            found = equality_entries(value, plain=False)
            if found is None:
                return None
            entries.extend(found)
        return index.keys_for(entries)

    def elem_match(self, path: str, query: Any) -> set[Any] | None:
        """``{path: {$elemMatch: {field: cond, ...}}}``: an element matching means the
        document has that element's value at ``path.field`` (paths with array indexes or
        operator-only queries are not planned)."""
        if not isinstance(query, Mapping) or not query:
            return None
        if any(part.isdigit() for part in path.split(".")):
            return None
        best: set[Any] | None = None
        for field_path, cond in _conjuncts(query):
            if any(part.isdigit() for part in field_path.split(".")):
                continue
            found = self.clause(f"{path}.{field_path}", cond)
            if found is not None and (best is None or len(found) < len(best)):
                best = found
        return best

    def filter(self, filter: Mapping[str, Any], skip: str | None = None) -> set[Any] | None:
        best: set[Any] | None = None
        for path, cond in _conjuncts(filter):
            if path == skip or any(part.isdigit() for part in path.split(".")):
                continue
            found = self.clause(path, cond)
            if found is not None and (best is None or len(found) < len(best)):
                best = found
                if not best:
                    break
        return best


def id_lookup(filter: Mapping[str, Any]) -> list[Any] | None:
    """The ``_id`` values a filter's ``_id`` clause names exactly (``v``, ``{$eq: v}``,
    ``{$in: [...]}`` of plain values), or None."""
    if "_id" not in filter:
        return None
    value = filter["_id"]
    if isinstance(value, Mapping):
        if len(value) != 1:
            return None
        if "$in" in value:
            values = value["$in"]
            if not isinstance(values, list) or not all(_id_value(v) for v in values):
                return None
            return values
        if "$eq" not in value:
            return None
        value = value["$eq"]
    return [value] if _id_value(value) else None


Bound = tuple[str, Any]


def _id_bounds(filter: Mapping[str, Any]) -> tuple[int | None, Bound | None, Bound | None]:
    """The type, lower and upper bound that the first ``_id`` clause with a range sets.
    ``_id`` is never an array, so every operator of the clause holds of one value: a
    range keeps to its operand's type, and two bounds of that type intersect (an
    operator of another type can only leave nothing, which the filter decides)."""
    for path, cond in _conjuncts(filter):
        if path != "_id" or not isinstance(cond, Mapping):
            continue
        rank: int | None = None
        low: Bound | None = None
        high: Bound | None = None
        for op, operand in cond.items():
            if op not in ("$gt", "$gte", "$lt", "$lte"):
                continue
            op_rank = _rank(operand)
            if op_rank is None or op_rank == _NULL or (
                    type(operand) is float and math.isnan(operand)):
                continue
            if rank is None:
                rank = op_rank
            if op_rank != rank:
                continue
            if op in ("$gt", "$gte"):
                low = low or (op, operand)
            else:
                high = high or (op, operand)
        if rank is not None:
            return rank, low, high
    return None, None, None


def _id_value(value: Any) -> bool:
    """A value whose dict lookup finds exactly the documents with that ``_id`` that
    mongomock-ng's equality finds."""
    if not _is_plain_scalar(value) or (type(value) is float and math.isnan(value)):
        return False
    try:
        hash(value)
    except TypeError:
        return False
    return True


# -------------------------------------------------------------------------- unique keys

_NULL_KEY = ("null",)
_EMPTY_ARRAY: Any = ("emptyarray",)


def _path_values(value: Any, parts: list[str]) -> list[Any]:
    """Index values at a dotted path, expanding arrays as a MongoDB multikey index does."""
    if not parts:
        if isinstance(value, list):
            return list(value) if value else [_EMPTY_ARRAY]
        return [value]
    head, rest = parts[0], parts[1:]
    if isinstance(value, Mapping):
        if head not in value:
            return [None]
        return _path_values(value[head], rest)
    if isinstance(value, list):
        if head.isdigit() and int(head) < len(value):
            return _path_values(value[int(head)], rest)
        out: list[Any] = []
        for element in value:
            if isinstance(element, Mapping | list):
                out.extend(_path_values(element, parts))
        return out or [None]
    return [None]


def _unique_form(value: Any) -> Any:
    """A hashable form of an index value under which MongoDB's equal keys are equal
    (1 and 1.0 are one key; true is not 1; documents compare in field order)."""
    if value is None:
        return _NULL_KEY
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, Mapping):
        return ("doc", tuple((k, _unique_form(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("arr", tuple(_unique_form(v) for v in value))
    try:
        hash(value)
    except TypeError:
        return ("repr", repr(value))
    return value


def unique_keys(
    doc: Mapping[str, Any], spec: IndexSpec, sparse: bool
) -> dict[Any, tuple[Any, ...]]:
    """Every key a document contributes to a unique index, each with the values it was
    made of ({} when a sparse index skips the document)."""
    per_field: list[dict[Any, Any]] = []
    all_missing = True
    for path, _direction in spec:
        values = _path_values(doc, path.split("."))
        if any(v is not None for v in values) or mm_helpers.get_value_by_dot(
            doc, path
        ) is not mm_helpers.NOTHING:
            all_missing = False
        forms: dict[Any, Any] = {}
        for v in values:
            forms.setdefault(_unique_form(v), [] if v is _EMPTY_ARRAY else v)
        per_field.append(forms)
    if sparse and all_missing:
        return {}
    keys: dict[Any, tuple[Any, ...]] = {(): ()}
    for forms in per_field:
        keys = {(*k, form): (*vals, value) for k, vals in keys.items()
                for form, value in forms.items()}
    return keys


class UniqueIndex:
    """The keys of one unique index (partial filter and sparseness honoured)."""

    def __init__(self, name: str, spec: IndexSpec, *, sparse: bool,
                 partial: Mapping[str, Any] | None) -> None:
        self.name = name
        self.spec = spec
        self.sparse = sparse
        self.partial = partial
        self.holders: dict[Any, Any] = {}
        self.keys_of: dict[Any, frozenset[Any]] = {}

    def keys(self, doc: Mapping[str, Any]) -> dict[Any, tuple[Any, ...]]:
        if self.partial is not None and not filter_applies(self.partial, doc):
            return {}
        return unique_keys(doc, self.spec, self.sparse)

    def reindex(self, key: Any, doc: Mapping[str, Any] | None) -> None:
        old = self.keys_of.get(key, frozenset())
        new = frozenset(self.keys(doc)) if doc is not None else frozenset()
        if old == new:
            return
        for k in old - new:
            _remove(self.holders, k, key)
        for k in new - old:
            _add(self.holders, k, key)
        if new:
            self.keys_of[key] = new
        else:
            self.keys_of.pop(key, None)

    def clash(self, key: Any, doc: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """The values of a key ``doc`` shares with another document, or None."""
        for k, values in self.keys(doc).items():
            if any(other != key for other in _keys(self.holders.get(k, _ABSENT))):
                return values
        return None


# -------------------------------------------------------------------------- the table

class DocumentTable(dict[Any, Document]):
    """A collection's documents by store key, in natural (insertion) order, with the
    lookup entries of its indexed paths and the keys of its unique indexes updated by
    every ``__setitem__`` and ``__delitem__`` (the other mutators go through them).

    mongomock-ng updates a document in place and then stores it again: the entries are
    recomputed from the document at that moment and compared with the ones recorded
    for its key, so an in-place change is indexed once it is stored. :meth:`refresh`
    brings a key up to date when a write failed between the two.
    """

    #: Past this share of the collection, candidates are not worth their lookup: scan.
    scan_share = 0.5

    def __init__(self) -> None:
        super().__init__()
        self.paths: dict[str, PathIndex] = {"_id": PathIndex("_id")}
        self._path_users: dict[str, int] = {"_id": 1}
        self.uniques: dict[str, UniqueIndex] = {}
        self._seq: dict[Any, int] = {}
        self._next_seq = 0

    # -- writes ------------------------------------------------------------------------
    def __setitem__(self, key: Any, doc: Document) -> None:
        if key not in self:
            self._seq[key] = self._next_seq
            self._next_seq += 1
        super().__setitem__(key, doc)
        self._reindex(key, doc)

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        del self._seq[key]
        self._reindex(key, None)

    def pop(self, key: Any, *default: Any) -> Any:
        if key in self:
            doc = self[key]
            del self[key]
            return doc
        if default:
            return default[0]
        raise KeyError(key)

    def popitem(self) -> tuple[Any, Document]:
        key = next(reversed(self))
        return key, self.pop(key)

    def clear(self) -> None:
        for key in list(self):
            del self[key]

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, doc in dict(*args, **kwargs).items():
            self[key] = doc

    def __ior__(self, other: Any) -> DocumentTable:  # type: ignore[override,misc]
        self.update(other)
        return self

    def refresh(self, key: Any) -> None:
        """Re-derive ``key``'s entries from its document as it is now."""
        self._reindex(key, self.get(key))

    def _reindex(self, key: Any, doc: Document | None) -> None:
        for index in self.paths.values():
            index.reindex(key, doc)
        for unique in self.uniques.values():
            unique.reindex(key, doc)

    # -- index definitions ---------------------------------------------------------------
    def add_index(self, name: str, config: Mapping[str, Any]) -> None:
        spec: IndexSpec = [(str(k[0]), k[1]) for k in config["key"]]
        first, direction = spec[0]
        if direction in (1, -1):
            self._path_users[first] = self._path_users.get(first, 0) + 1
            if first not in self.paths:
                index = PathIndex(first)
                for key, doc in self.items():
                    index.reindex(key, doc)
                self.paths[first] = index
        if config.get("unique"):
            unique = UniqueIndex(name, spec, sparse=bool(config.get("sparse")),
                                 partial=config.get("partialFilterExpression"))
            for key, doc in self.items():
                unique.reindex(key, doc)
            self.uniques[name] = unique

    def drop_index(self, name: str, config: Mapping[str, Any]) -> None:
        self.uniques.pop(name, None)
        first, direction = tuple(config["key"][0])
        if direction in (1, -1) and first in self._path_users:
            self._path_users[first] -= 1
            if not self._path_users[first]:
                del self._path_users[first]
                del self.paths[first]

    # -- reads ---------------------------------------------------------------------------
    def plan(
        self, filter: Mapping[str, Any]
    ) -> tuple[list[Document], Mapping[str, Any] | None]:
        """(documents to test, the filter to test them with): the documents are a
        superset of the matches, in ``$in`` order for an ``_id`` lookup, else natural
        order; the filter is None when the lookup alone decides (an ``_id`` lookup and
        nothing else), else the filter without the clauses the lookup decided."""
        ids = id_lookup(filter)
        if ids is not None:
            docs: list[Document] = []
            seen: set[Any] = set()
            for value in ids:
                doc = self.get(value)
                if doc is not None and value not in seen:
                    seen.add(value)
                    docs.append(doc)
            rest = {k: v for k, v in filter.items() if k != "_id"}
            return docs, rest or None
        keys = _Planner(self).filter(filter)
        if keys is None or len(keys) > self.scan_share * len(self):
            return list(self.values()), filter
        if len(keys) * 16 < len(self):
            seq = self._seq
            ordered = sorted((k for k in keys if k in seq), key=seq.__getitem__)
            return [self[k] for k in ordered], filter
        return [doc for k, doc in self.items() if k in keys], filter

    def by_id(self, filter: Mapping[str, Any], descending: bool) -> Iterator[Document] | None:
        """The documents in ``_id`` order, the order mongomock-ng's sort on ``_id`` gives
        (BSON type order, then value; ``_id`` values are unique, so no ties), lazily, a
        superset of the filter's matches: a range on ``_id`` starts and ends the walk
        within its type. None when sorting the candidates is cheaper (an ``_id`` lookup,
        or another clause an index narrows to a few documents), or when some ``_id`` is
        of a type the index does not order."""
        index = self.paths["_id"]
        postings = index.postings
        if any(marker in postings for marker in (UNORDERED, NAN, MISSING, EMPTY)):
            return None
        if id_lookup(filter) is not None:
            return None
        narrowed = _Planner(self).filter(filter, skip="_id")
        if narrowed is not None and len(narrowed) * 8 < len(self):
            return None
        ranks = ([_NULL] if (_NULL, None) in postings else []) + sorted(index.ordered)
        rank, low, high = _id_bounds(filter)
        if rank is not None:
            ranks = [rank] if rank in ranks else []
        return self._walk_ids(ranks, low, high, descending)

    def _walk_ids(self, ranks: list[int], low: Bound | None, high: Bound | None,
                  descending: bool) -> Iterator[Document]:
        index = self.paths["_id"]
        for rank in reversed(ranks) if descending else ranks:
            if rank == _NULL:
                values: list[Any] = [None]
            else:
                values = index.ordered.get(rank, [])
                start, end = 0, len(values)
                if low is not None and _rank(low[1]) == rank:
                    find = bisect.bisect_right if low[0] == "$gt" else bisect.bisect_left
                    start = find(values, low[1])
                if high is not None and _rank(high[1]) == rank:
                    find = bisect.bisect_left if high[0] == "$lt" else bisect.bisect_right
                    end = find(values, high[1])
                values = values[start:end]
            for value in reversed(values) if descending else values:
                for key in _keys(index.postings.get((rank, value), _ABSENT)):
                    doc = self.get(key)
                    if doc is not None:
                        yield doc

    def unique_clash(
        self, key: Any, doc: Mapping[str, Any]
    ) -> tuple[UniqueIndex, tuple[Any, ...]] | None:
        """The first unique index on which ``doc`` (stored, or to be stored, under
        ``key``) shares a key with another document, and that key's values."""
        for unique in self.uniques.values():
            values = unique.clash(key, doc)
            if values is not None:
                return unique, values
        return None


# -------------------------------------------------------------------------- E11000

def _double(x: float) -> str:
    # MongoDB's StringBuilder::appendDoubleNice: "%.16g", then ".0" unless the text
    # already has a '.', an 'E' or an 'N'.
    text = f"{x:.16g}"
    return text if any(c in text for c in ".EN") else text + ".0"


_REGEX_FLAGS = (("i", re.IGNORECASE), ("l", re.LOCALE), ("m", re.MULTILINE), ("s", re.DOTALL),
                ("u", re.UNICODE), ("x", re.VERBOSE))


def show_value(value: Any) -> str:
    """A value as MongoDB's BSONElement::toString prints it in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return _double(value)
    if isinstance(value, str):
        raw = value.encode("utf-8", "surrogatepass")
        if len(raw) + 1 > 160:  # MongoDB cuts long strings in messages
            return '"' + raw[:150].decode("utf-8", "ignore") + '..."'
        return f'"{value}"'
    if isinstance(value, ObjectId):
        return f"ObjectId('{value}')"
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
        ms = (aware - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(milliseconds=1)
        return f"new Date({ms})"
    if isinstance(value, Mapping):
        return show_document(value)
    if isinstance(value, list | tuple):
        if not value:
            return "[]"
        return "[ " + ", ".join(show_value(v) for v in value) + " ]"
    if isinstance(value, Decimal128):
        return str(value)
    if isinstance(value, Timestamp):
        return f"Timestamp({value.time}, {value.inc})"
    if isinstance(value, Binary | bytes):
        subtype = value.subtype if isinstance(value, Binary) else 0
        if subtype == 4 and len(value) == 16:
            h = bytes(value).hex()
            return f'UUID("{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")'
        return f"BinData({subtype}, {bytes(value).hex().upper()})"
    if isinstance(value, Regex | re.Pattern):
        flags = value.flags if isinstance(value.flags, str) else "".join(
            letter for letter, bit in _REGEX_FLAGS if int(value.flags) & bit)
        return f"/{value.pattern}/{flags}"
    if isinstance(value, MinKey):
        return "MinKey"
    if isinstance(value, MaxKey):
        return "MaxKey"
    return str(value)


def show_document(doc: Mapping[str, Any]) -> str:
    """A document as MongoDB's BSONObj::toString prints it: ``{ a: 1, b: "x" }``."""
    if not doc:
        return "{}"
    return "{ " + ", ".join(f"{k}: {show_value(v)}" for k, v in doc.items()) + " }"


def duplicate_key_message(ns: str, index_name: str, key_value: Mapping[str, Any]) -> str:
    return (f"E11000 duplicate key error collection: {ns} index: {index_name} dup key: "
            f"{show_document(key_value)}")


class DuplicateKey(DuplicateKeyError):
    """A unique index refused a write: MongoDB's message, ``keyPattern`` and ``keyValue``.

    A pymongo DuplicateKeyError, so that mongomock-ng's write paths roll back on it."""

    def __init__(self, ns: str, index_name: str, spec: IndexSpec,
                 values: Iterable[Any]) -> None:
        key_value = {path: value for (path, _d), value in zip(spec, values, strict=True)}
        self.errmsg = duplicate_key_message(ns, index_name, key_value)
        self.key_pattern = {path: d for path, d in spec}
        self.key_value = key_value
        super().__init__(self.errmsg, 11000,
                         {"keyPattern": self.key_pattern, "keyValue": key_value})


__all__ = [
    "DocumentTable", "DuplicateKey", "PathIndex", "UniqueIndex", "duplicate_key_message",
    "lookup_entries", "show_document", "show_value", "unique_keys",
]
