"""MongoDB ``$v: 2`` update diffs ("delta" oplog format) and change-stream ``updateDescription``.

This module owns three pure functions used by the MongoDB emulator:

- :func:`compute_v2_diff` turns a document's old and new versions into the ``diff`` object of
  an oplog update entry ``{"$v": 2, "diff": <diff>}``;
- :func:`apply_v2_diff` applies such a diff to a document, the way a secondary does;
- :func:`update_description` derives the change-stream ``updateDescription`` from a diff, the
  way MongoDB 7.0 does.

It must never do I/O, never touch the emulator's storage or locks, never mutate its
arguments, and never hand out references into its arguments (every value placed in a diff,
a document or an update description is a deep copy, because callers keep mutating theirs).

Format, as read in mongodb/mongo ``src/mongo/db/update/``:

- ``document_diff_serialization.h``: section names ``d`` (delete), ``u`` (update), ``i``
  (insert), ``s<field>`` (sub-diff), array header ``a``, array resize ``l``.
- ``document_diff_serialization.cpp`` / ``v2_log_builder.cpp`` (``DocumentSubDiffFrame``):
  a document diff is written as ``d``, then ``u``, then ``i``, then every ``s<field>``; deletes
  are written as ``{field: false}``. ``DocumentDiffReader`` rejects sections out of that order.
  (The newest server source also has a ``b`` (binary) section between ``i`` and the sub-diffs;
  we never produce it and :func:`apply_v2_diff` rejects it.)
- ``ArrayFrame``: an array diff is ``a: true``, then ``l: <int>`` if the array was resized,
  then ``u<idx>`` / ``s<idx>`` entries in ascending numeric index order.
- ``document_diff_applier.cpp``: ``u`` replaces a field in place (or appends it if it is
  absent), ``i`` always (re)appends the field at the end, a sub-diff whose type does not match
  the pre-image value yields ``null``, array indexes past the pre-image (or up to ``l``) that
  the diff does not mention are padded with ``null``.
- ``src/mongo/db/pipeline/change_stream_document_diff_parser.cpp``: ``u`` and ``i`` entries
  become ``updatedFields`` (dotted paths, array elements by numeric index), ``d`` entries
  ``removedFields``, an array ``l`` a ``truncatedArrays`` entry ``{field, newSize}``.

Which operator produces which shape (``push_node.cpp``, ``array_culling_node.cpp``,
``v2_log_builder.cpp``): ``$push`` appending to a non-empty array logs each new element as
``u<idx>`` in an array sub-diff; ``$push`` onto an empty array, ``$pull``, ``$pullAll`` and
``$pop`` log the whole array with ``u``; ``$set`` of an existing field logs ``u``, of a new
field ``i``; ``$unset`` logs ``d``; a positional ``$set`` of ``a.1.b`` logs
``{sa: {a: true, s1: {u: {b: ...}}}}``.

Known differences from MongoDB
------------------------------
MongoDB logs what the update *operators* did; we only see the old and the new document, so we
log the smallest diff that reproduces the new document, shaped like operator logging. A secondary
(or :func:`apply_v2_diff`) gets the same document either way; the oplog entry and the change
event's ``updateDescription`` can differ in shape:

1. ``$set`` of a whole embedded document (``{$set: {services: {...}}}``) that changes only some
   of its fields: MongoDB logs ``u: {services: {...}}``; we log ``sservices`` with a sub-diff of
   the changed fields (``updatedFields`` then lists ``services.x`` paths instead of
   ``services``). Same for ``$set`` of a whole array element (``connections.1``): MongoDB logs
   ``u1``, we log ``s1``.
2. ``$set`` of a whole array that keeps or grows its length: MongoDB logs ``u`` of the whole
   array; we log an array sub-diff with ``u<idx>``/``s<idx>`` for the changed elements.
3. ``$push`` with ``$position``, ``$sort`` or ``$slice`` (MongoDB logs the whole array): we log
   the whole array only if the array got shorter, otherwise element entries.
4. ``$addToSet`` that adds elements: older server source logs the whole array (``u``); the
   newest source logs the appended elements as ``u<idx>``, as we do. Which one 7.0 does was not
   confirmed from the source we could read.
5. A positional ``$set`` into an empty array (``{$set: {"a.0": x}}`` on ``a: []``): MongoDB
   logs ``{sa: {a: true, u0: x}}``; we log ``u: {a: [x]}``, because we cannot tell it from the
   far more common ``$push`` onto an empty array, which MongoDB logs that way.
6. ``$set`` past the end of an array (``a.5`` on a 2-element array pads with nulls): MongoDB
   logs only ``u5``; we also log the padding, ``u2``..``u4`` = ``null``.
7. An embedded document whose fields end up in a different order (only a whole-document
   ``$set`` does that): we log it whole with ``u`` (as that ``$set`` does). At the top level,
   where a whole-document ``u`` does not exist, a field that moved is logged under ``i`` with its
   full value, which is what MongoDB's own document_diff_calculator does.
8. Pipeline-style updates (``update_one(f, [{"$set": ...}])``): MongoDB computes the diff with
   document_diff_calculator, which logs a shrunk array as ``l`` plus element entries (we log
   the whole array with ``u``) and falls back to ``u`` of a whole sub-document when the
   sub-diff would be larger than the value (we never fall back on size).
9. Replacement updates (``replace_one``) are not diffs at all in MongoDB 7.0: the oplog entry
   carries the whole new document and the change event is a ``replace``. Callers must not
   use :func:`compute_v2_diff` for them.
10. ``updateDescription.disambiguatedPaths`` (7.0 adds it, with ``showExpandedEvents``, for
    paths through numeric-looking or dotted field names) is never produced.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

__all__ = ["apply_v2_diff", "compute_v2_diff", "update_description"]

ARRAY_HEADER: Final = "a"
DELETE_SECTION: Final = "d"
UPDATE_SECTION: Final = "u"
INSERT_SECTION: Final = "i"
SUBDIFF_PREFIX: Final = "s"
RESIZE_FIELD: Final = "l"

# Section order inside a document diff, as DocumentDiffReader enforces it.
_SECTION_RANK: Final = {DELETE_SECTION: 1, UPDATE_SECTION: 2, INSERT_SECTION: 3, SUBDIFF_PREFIX: 4}


class _Replace:
    """Marker: a sub-document cannot be expressed as a sub-diff; log it whole with ``u``."""


_REPLACE: Final = _Replace()


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def _is_document(value: object) -> bool:
    return isinstance(value, Mapping)


def _is_array(value: object) -> bool:
    return isinstance(value, list | tuple)


def _bson_equal(a: Any, b: Any) -> bool:
    """True when ``a`` and ``b`` would be the same BSON value.

    Unlike ``==``: documents compare field order too (BSON documents are ordered), values of
    different Python types are different (``1``, ``1.0`` and ``True`` are three BSON types),
    ``NaN`` equals ``NaN`` and ``-0.0`` differs from ``0.0`` (BSON compares bytes).
    """
    if _is_document(a) or _is_document(b):
        if not (_is_document(a) and _is_document(b)) or len(a) != len(b):
            return False
        return all(
            ka == kb and _bson_equal(va, vb)
            for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
        )
    if _is_array(a) or _is_array(b):
        if not (_is_array(a) and _is_array(b)) or len(a) != len(b):
            return False
        return all(_bson_equal(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return bool(a == b)


# --------------------------------------------------------------------------------------------
# compute_v2_diff
# --------------------------------------------------------------------------------------------


def compute_v2_diff(
    old: Mapping[str, Any], new: Mapping[str, Any], *, pipeline: bool = False
) -> dict[str, Any] | None:
    """The ``diff`` of an oplog entry ``{"$v": 2, "diff": ...}`` taking ``old`` to ``new``.

    Returns None when the two documents are the same BSON document (MongoDB writes no oplog
    entry for a no-op update). See the module docstring for the shapes produced.
    ``pipeline=True`` diffs as MongoDB's document_diff_calculator does for pipeline-style
    updates: a shorter array is logged as a resize (``l``) plus changed elements.
    """
    result = _diff_document(old, new, allow_moves=True, pipeline=pipeline)
    assert not isinstance(result, _Replace)  # allow_moves=True never asks for a replacement
    return result


def _diff_document(
    old: Mapping[str, Any], new: Mapping[str, Any], *, allow_moves: bool, pipeline: bool = False
) -> dict[str, Any] | _Replace | None:
    """Document sub-diff, or None if equal, or _REPLACE if field order cannot be reproduced.

    Applying a diff keeps the surviving pre-image fields in their old order and appends ``i``
    fields at the end. So the fields that stay in place must be a prefix of ``new`` whose
    fields all exist in ``old`` in the same relative order; every later field of ``new`` must
    be (re)inserted with ``i``. With ``allow_moves`` False (embedded documents), re-inserting a
    field that already existed is not allowed: the caller logs the whole document instead.
    """
    old_pos = {name: pos for pos, name in enumerate(old)}
    new_names = list(new)
    in_place = 0
    last_pos = -1
    for name in new_names:
        pos = old_pos.get(name)
        if pos is None or pos < last_pos:
            break
        last_pos = pos
        in_place += 1
    tail = new_names[in_place:]
    if not allow_moves and any(name in old_pos for name in tail):
        return _REPLACE

    deletes = {name: False for name in old if name not in new}
    updates: dict[str, Any] = {}
    subdiffs: dict[str, Any] = {}
    for name in new_names[:in_place]:
        change = _diff_value(old[name], new[name], pipeline)
        if change is None:
            continue
        kind, payload = change
        if kind == UPDATE_SECTION:
            updates[name] = payload
        else:
            subdiffs[SUBDIFF_PREFIX + name] = payload
    inserts = {name: copy.deepcopy(new[name]) for name in tail}

    diff: dict[str, Any] = {}
    if deletes:
        diff[DELETE_SECTION] = deletes
    if updates:
        diff[UPDATE_SECTION] = updates
    if inserts:
        diff[INSERT_SECTION] = inserts
    diff.update(subdiffs)
    return diff or None


def _diff_value(old: Any, new: Any, pipeline: bool = False) -> tuple[str, Any] | None:
    """How one changed value is logged: ("u", new value) or ("s", sub-diff); None if equal."""
    if _bson_equal(old, new):
        return None
    if _is_document(old) and _is_document(new):
        sub = _diff_document(old, new, allow_moves=False, pipeline=pipeline)
        if isinstance(sub, _Replace):
            return UPDATE_SECTION, copy.deepcopy(new)
        assert sub is not None  # not equal, and order is reproducible: something is logged
        return SUBDIFF_PREFIX, sub
    if _is_array(old) and _is_array(new):
        # $pull/$pullAll/$pop (shorter) and $push onto [] log the whole array; a pipeline
        # update logs a shorter array as a resize.
        if pipeline and len(new) < len(old):
            return SUBDIFF_PREFIX, _diff_array(old, new, pipeline)
        if len(new) < len(old) or not old:
            return UPDATE_SECTION, copy.deepcopy(new)
        return SUBDIFF_PREFIX, _diff_array(old, new, pipeline)
    return UPDATE_SECTION, copy.deepcopy(new)


def _diff_array(old: Sequence[Any], new: Sequence[Any], pipeline: bool = False) -> dict[str, Any]:
    """Array sub-diff: a resize when shorter, changed elements, then appended ones."""
    diff: dict[str, Any] = {ARRAY_HEADER: True}
    if len(new) < len(old):
        diff[RESIZE_FIELD] = len(new)
    for idx, (old_item, new_item) in enumerate(zip(old, new, strict=False)):
        change = _diff_value(old_item, new_item, pipeline)
        if change is not None:
            kind, payload = change
            diff[f"{kind}{idx}"] = payload
    for idx in range(len(old), len(new)):
        diff[f"{UPDATE_SECTION}{idx}"] = copy.deepcopy(new[idx])
    return diff


# --------------------------------------------------------------------------------------------
# Parsing (shared by apply_v2_diff and update_description)
# --------------------------------------------------------------------------------------------


class _DocumentDiff:
    """A validated document diff, split into its sections."""

    def __init__(self, diff: Mapping[str, Any]) -> None:
        if not isinstance(diff, Mapping):
            raise ValueError(f"a document diff must be a document, got {diff!r}")
        if not diff:
            raise ValueError("expected diff to be non-empty")
        self.deletes: list[str] = []
        self.updates: dict[str, Any] = {}
        self.inserts: dict[str, Any] = {}
        self.subdiffs: dict[str, Mapping[str, Any]] = {}
        seen: set[str] = set()
        prev_rank = 0
        for key, value in diff.items():
            section = key[:1] if key.startswith(SUBDIFF_PREFIX) else key
            rank = _SECTION_RANK.get(section)
            if rank is None or rank < prev_rank or (rank == prev_rank and rank != 4):
                raise ValueError(f"unexpected section {key!r} in document diff")
            prev_rank = rank
            if not isinstance(value, Mapping):
                raise ValueError(f"section {key!r} must be a document, got {value!r}")
            if section == SUBDIFF_PREFIX:
                names = [key[1:]]
                self.subdiffs[key[1:]] = value
            else:
                names = list(value)
                if section == DELETE_SECTION:
                    self.deletes.extend(names)
                elif section == UPDATE_SECTION:
                    self.updates.update(value)
                else:
                    self.inserts.update(value)
            for name in names:
                if name in seen:
                    raise ValueError(f"duplicate field name in diff: {name!r}")
                seen.add(name)


class _ArrayDiff:
    """A validated array diff: optional new size, then (index, kind, payload) ascending."""

    def __init__(self, diff: Mapping[str, Any]) -> None:
        items = list(diff.items())
        if not items or items[0][0] != ARRAY_HEADER or items[0][1] is not True:
            raise ValueError(f"an array diff must start with a: true, got {diff!r}")
        rest = items[1:]
        self.new_size: int | None = None
        if rest and rest[0][0] == RESIZE_FIELD:
            size = rest[0][1]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError(f"array resize must be a non-negative int, got {size!r}")
            self.new_size = size
            rest = rest[1:]
        self.mods: list[tuple[int, str, Any]] = []
        prev = -1
        for key, value in rest:
            kind, digits = key[:1], key[1:]
            if kind not in (UPDATE_SECTION, SUBDIFF_PREFIX) or not (
                digits.isascii() and digits.isdigit()
            ):
                raise ValueError(f"expected u<index> or s<index> in array diff, got {key!r}")
            idx = int(digits)
            if idx <= prev:
                raise ValueError(f"array diff indexes must ascend, got {key!r} after {prev}")
            if kind == SUBDIFF_PREFIX and not isinstance(value, Mapping):
                raise ValueError(f"sub-diff at index {idx} must be a document, got {value!r}")
            prev = idx
            self.mods.append((idx, kind, value))


def _is_array_diff(diff: Mapping[str, Any]) -> bool:
    return bool(diff) and next(iter(diff)) == ARRAY_HEADER


# --------------------------------------------------------------------------------------------
# apply_v2_diff
# --------------------------------------------------------------------------------------------


def apply_v2_diff(doc: Mapping[str, Any], diff: Mapping[str, Any]) -> dict[str, Any]:
    """A new document: ``doc`` with ``diff`` applied, as a secondary applies a ``$v: 2`` entry.

    Follows MongoDB's document_diff_applier: ``u`` replaces in place (appends if absent), ``i``
    appends at the end (moving an existing field), ``d`` removes, a sub-diff whose target is
    missing is ignored and one whose target has the wrong type yields None, array ``l``
    truncates or pads with None, array indexes past the end are padded with None.
    Raises ValueError for a malformed diff (what MongoDB rejects). ``doc`` is not modified.
    """
    return _apply_document(doc, _DocumentDiff(diff))


def _apply_subdiff(pre: Any, subdiff: Mapping[str, Any]) -> Any:
    if _is_array_diff(subdiff):
        parsed_array = _ArrayDiff(subdiff)
        return _apply_array(pre, parsed_array) if _is_array(pre) else None
    parsed_doc = _DocumentDiff(subdiff)
    return _apply_document(pre, parsed_doc) if _is_document(pre) else None


def _apply_document(pre: Mapping[str, Any], diff: _DocumentDiff) -> dict[str, Any]:
    deletes = set(diff.deletes)
    out: dict[str, Any] = {}
    for name, value in pre.items():
        if name in deletes or name in diff.inserts:
            continue  # inserts are (re)appended at the end below
        if name in diff.updates:
            out[name] = copy.deepcopy(diff.updates[name])
        elif name in diff.subdiffs:
            out[name] = _apply_subdiff(value, diff.subdiffs[name])
        else:
            out[name] = copy.deepcopy(value)
    for name, value in diff.updates.items():
        if name not in out:
            out[name] = copy.deepcopy(value)
    for name, value in diff.inserts.items():
        out[name] = copy.deepcopy(value)
    return out


def _apply_array(pre: Sequence[Any], diff: _ArrayDiff) -> list[Any]:
    out: list[Any] = []
    mods = iter(diff.mods)
    mod = next(mods, None)
    limit = len(pre) if diff.new_size is None else diff.new_size
    idx = 0
    while idx < limit or mod is not None:
        if mod is not None and mod[0] == idx:
            _, kind, payload = mod
            if kind == UPDATE_SECTION:
                out.append(copy.deepcopy(payload))
            elif idx < len(pre):
                out.append(_apply_subdiff(pre[idx], payload))
            else:
                out.append(None)  # sub-diff past the pre-image: MongoDB appends null
            mod = next(mods, None)
        elif idx < len(pre):
            out.append(copy.deepcopy(pre[idx]))
        else:
            out.append(None)  # padding up to the next modified index or the new size
        idx += 1
    if diff.new_size is not None and idx != diff.new_size:
        raise ValueError(f"array diff modifies index {idx - 1} past its new size {diff.new_size}")
    return out


# --------------------------------------------------------------------------------------------
# update_description
# --------------------------------------------------------------------------------------------


def update_description(diff: Mapping[str, Any]) -> dict[str, Any]:
    """The change-stream ``updateDescription`` MongoDB 7.0 derives from a ``$v: 2`` diff.

    ``{"updatedFields": {path: value}, "removedFields": [path], "truncatedArrays":
    [{"field": path, "newSize": n}]}`` with dotted paths (array elements by numeric index).
    All three keys are always present. Entries come in the order MongoDB's
    change_stream_document_diff_parser visits them: at each level ``u`` then ``i`` entries,
    then ``d``, then sub-diffs depth-first; in an array, the truncation, then elements.
    """
    updated: dict[str, Any] = {}
    removed: list[str] = []
    truncated: list[dict[str, Any]] = []

    def visit_document(sub: _DocumentDiff, path: list[str]) -> None:
        for name, value in (*sub.updates.items(), *sub.inserts.items()):
            updated[".".join([*path, name])] = copy.deepcopy(value)
        for name in sub.deletes:
            removed.append(".".join([*path, name]))
        for name, subdiff in sub.subdiffs.items():
            visit(subdiff, [*path, name])

    def visit_array(sub: _ArrayDiff, path: list[str]) -> None:
        if sub.new_size is not None:
            truncated.append({"field": ".".join(path), "newSize": sub.new_size})
        for idx, kind, payload in sub.mods:
            if kind == UPDATE_SECTION:
                updated[".".join([*path, str(idx)])] = copy.deepcopy(payload)
            else:
                visit(payload, [*path, str(idx)])

    def visit(subdiff: Mapping[str, Any], path: list[str]) -> None:
        if _is_array_diff(subdiff):
            visit_array(_ArrayDiff(subdiff), path)
        else:
            visit_document(_DocumentDiff(subdiff), path)

    visit_document(_DocumentDiff(diff), [])
    return {"updatedFields": updated, "removedFields": removed, "truncatedArrays": truncated}
