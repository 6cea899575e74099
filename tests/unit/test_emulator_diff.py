"""$v: 2 oplog diffs and change-stream updateDescription (presenced.testing.mongo.diff).

Expected values are written out by hand from MongoDB's format (document_diff_serialization,
document_diff_applier, change_stream_document_diff_parser in mongodb/mongo), never computed
by the code under test.
"""

from __future__ import annotations

import copy
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from presenced.testing.mongo.diff import (
    _bson_equal,
    apply_v2_diff,
    compute_v2_diff,
    update_description,
)

T0 = datetime(2024, 5, 1, 12, 0, 0)
T1 = T0 + timedelta(seconds=30)


def conn(cid: str, status: str = "online", updated: datetime = T0) -> dict[str, Any]:
    return {
        "id": cid,
        "instanceId": "inst-1",
        "status": status,
        "_createdAt": T0,
        "_updatedAt": updated,
    }


def session(*connections: dict[str, Any]) -> dict[str, Any]:
    return {"_id": "user-1", "connections": list(connections)}


# --------------------------------------------------------------------------------------------
# compute_v2_diff: shapes
# --------------------------------------------------------------------------------------------


def test_push_onto_connections_logs_appended_element_in_array_subdiff() -> None:
    old = session(conn("c0"), conn("c1"))
    new = session(conn("c0"), conn("c1"), conn("c2"))
    assert compute_v2_diff(old, new) == {"sconnections": {"a": True, "u2": conn("c2")}}


def test_push_of_two_elements_logs_each_index() -> None:
    old = session(conn("c0"))
    new = session(conn("c0"), conn("c1"), conn("c2"))
    diff = compute_v2_diff(old, new)
    assert diff == {"sconnections": {"a": True, "u1": conn("c1"), "u2": conn("c2")}}
    assert diff is not None
    assert list(diff["sconnections"]) == ["a", "u1", "u2"]


def test_push_onto_empty_array_logs_whole_array_like_mongodb() -> None:
    # PushNode returns kNormalUpdate when the array was empty: the whole array is logged.
    old = session()
    new = session(conn("c0"))
    assert compute_v2_diff(old, new) == {"u": {"connections": [conn("c0")]}}


def test_positional_status_change_logs_nested_element_subdiff() -> None:
    old = session(conn("c0"), conn("c1"), conn("c2"))
    new = session(conn("c0"), conn("c1", status="away", updated=T1), conn("c2"))
    assert compute_v2_diff(old, new) == {
        "sconnections": {"a": True, "s1": {"u": {"status": "away", "_updatedAt": T1}}}
    }


def test_pull_shrinking_array_logs_whole_new_array_under_u() -> None:
    old = session(conn("c0"), conn("c1"), conn("c2"))
    new = session(conn("c0"), conn("c2"))
    assert compute_v2_diff(old, new) == {"u": {"connections": [conn("c0"), conn("c2")]}}


def test_pull_of_last_connection_logs_empty_array_under_u() -> None:
    old = session(conn("c0"))
    new = session()
    assert compute_v2_diff(old, new) == {"u": {"connections": []}}


def test_new_field_logged_under_i() -> None:
    old = {"_id": "u1", "status": "online"}
    new = {"_id": "u1", "status": "online", "statusConnection": "away"}
    assert compute_v2_diff(old, new) == {"i": {"statusConnection": "away"}}


def test_removed_field_logged_under_d_with_false() -> None:
    old = {"_id": "u1", "status": "online", "statusText": "lunch"}
    new = {"_id": "u1", "status": "online"}
    assert compute_v2_diff(old, new) == {"d": {"statusText": False}}


def test_scalar_change_logged_under_u() -> None:
    old = {"_id": "u1", "status": "online"}
    new = {"_id": "u1", "status": "offline"}
    assert compute_v2_diff(old, new) == {"u": {"status": "offline"}}


def test_type_change_logged_under_u() -> None:
    old = {"_id": "u1", "n": 1, "services": {"a": 1}, "tags": ["x"]}
    new = {"_id": "u1", "n": "1", "services": ["a"], "tags": {"0": "x"}}
    assert compute_v2_diff(old, new) == {"u": {"n": "1", "services": ["a"], "tags": {"0": "x"}}}


def test_int_to_float_is_a_bson_type_change() -> None:
    assert compute_v2_diff({"n": 1}, {"n": 1.0}) == {"u": {"n": 1.0}}


def test_nested_document_change_logs_document_subdiff() -> None:
    old = {"_id": "u1", "services": {"presence": {"status": "online", "since": T0}}}
    new = {"_id": "u1", "services": {"presence": {"status": "away", "since": T0, "idle": True}}}
    assert compute_v2_diff(old, new) == {
        "sservices": {"spresence": {"u": {"status": "away"}, "i": {"idle": True}}}
    }


def test_nested_field_removed_logs_d_inside_subdiff() -> None:
    old = {"_id": "u1", "services": {"presence": {"status": "online", "since": T0}}}
    new = {"_id": "u1", "services": {"presence": {"status": "online"}}}
    assert compute_v2_diff(old, new) == {"sservices": {"spresence": {"d": {"since": False}}}}


def test_sections_are_ordered_d_u_i_then_subdiffs() -> None:
    old = {"_id": "u1", "gone": 1, "status": "online", "connections": [conn("c0")]}
    new = {
        "_id": "u1",
        "status": "away",
        "connections": [conn("c0"), conn("c1")],
        "added": True,
    }
    diff = compute_v2_diff(old, new)
    assert diff == {
        "d": {"gone": False},
        "u": {"status": "away"},
        "i": {"added": True},
        "sconnections": {"a": True, "u1": conn("c1")},
    }
    assert diff is not None
    assert list(diff) == ["d", "u", "i", "sconnections"]


def test_no_change_returns_none() -> None:
    old = session(conn("c0"), conn("c1"))
    assert compute_v2_diff(old, copy.deepcopy(old)) is None


def test_reordered_subdocument_logged_whole_under_u() -> None:
    old = {"_id": "u1", "services": {"a": 1, "b": 2}}
    new = {"_id": "u1", "services": {"b": 2, "a": 1}}
    assert old == new  # Python's == would call this "no change"; BSON documents are ordered
    assert compute_v2_diff(old, new) == {"u": {"services": {"b": 2, "a": 1}}}


def test_new_field_in_middle_of_subdocument_logged_whole_under_u() -> None:
    old = {"_id": "u1", "services": {"a": 1, "c": 3}}
    new = {"_id": "u1", "services": {"a": 1, "b": 2, "c": 3}}
    assert compute_v2_diff(old, new) == {"u": {"services": {"a": 1, "b": 2, "c": 3}}}


def test_reordered_array_element_document_logged_under_u_index() -> None:
    old = {"_id": "u1", "arr": [{"a": 1, "b": 2}]}
    new = {"_id": "u1", "arr": [{"b": 2, "a": 1}]}
    assert compute_v2_diff(old, new) == {"sarr": {"a": True, "u0": {"b": 2, "a": 1}}}


def test_top_level_moved_field_reinserted_under_i() -> None:
    # No whole-document "u" exists at the top level; MongoDB's document_diff_calculator
    # re-inserts the field, which appends it at the end.
    old = {"_id": "u1", "a": 1, "b": 2}
    new = {"_id": "u1", "b": 2, "a": 1}
    assert compute_v2_diff(old, new) == {"i": {"a": 1}}


def test_array_element_scalar_change_logged_under_u_index() -> None:
    old = {"_id": "u1", "tags": ["x", "y", "z"]}
    new = {"_id": "u1", "tags": ["x", "Y", "z"]}
    assert compute_v2_diff(old, new) == {"stags": {"a": True, "u1": "Y"}}


def test_nested_array_in_array_logged_as_array_subdiff() -> None:
    old = {"_id": "u1", "m": [[1, 2], [3]]}
    new = {"_id": "u1", "m": [[1, 2], [3, 4]]}
    assert compute_v2_diff(old, new) == {"sm": {"a": True, "s1": {"a": True, "u1": 4}}}


def test_diff_values_are_deep_copies() -> None:
    old = session(conn("c0"))
    new = session(conn("c0"), conn("c1"))
    diff = compute_v2_diff(old, new)
    new["connections"][1]["status"] = "mutated-by-caller"
    assert diff == {"sconnections": {"a": True, "u1": conn("c1")}}


# --------------------------------------------------------------------------------------------
# apply_v2_diff
# --------------------------------------------------------------------------------------------


def test_apply_positional_subdiff() -> None:
    old = session(conn("c0"), conn("c1"))
    diff = {"sconnections": {"a": True, "s1": {"u": {"status": "away"}}}}
    assert apply_v2_diff(old, diff) == session(conn("c0"), conn("c1", status="away"))


def test_apply_does_not_mutate_input() -> None:
    old = session(conn("c0"))
    before = copy.deepcopy(old)
    apply_v2_diff(old, {"sconnections": {"a": True, "s0": {"u": {"status": "away"}}}})
    assert old == before


def test_apply_resize_truncates_array() -> None:
    old = {"_id": "u1", "arr": [1, 2, 3, 4]}
    assert apply_v2_diff(old, {"sarr": {"a": True, "l": 2}}) == {"_id": "u1", "arr": [1, 2]}


def test_apply_resize_with_update_then_truncate() -> None:
    old = {"_id": "u1", "arr": [1, 2, 3, 4]}
    diff = {"sarr": {"a": True, "l": 2, "u1": 20}}
    assert apply_v2_diff(old, diff) == {"_id": "u1", "arr": [1, 20]}


def test_apply_resize_larger_pads_with_null() -> None:
    old = {"_id": "u1", "arr": [1]}
    assert apply_v2_diff(old, {"sarr": {"a": True, "l": 3}}) == {
        "_id": "u1",
        "arr": [1, None, None],
    }


def test_apply_update_past_end_pads_with_null() -> None:
    old = {"_id": "u1", "arr": [1]}
    assert apply_v2_diff(old, {"sarr": {"a": True, "u3": 4}}) == {
        "_id": "u1",
        "arr": [1, None, None, 4],
    }


def test_apply_insert_and_delete_inside_nested_subdiff() -> None:
    old = {"_id": "u1", "s": {"p": {"x": 1, "y": 2}}}
    diff = {"ss": {"sp": {"d": {"x": False}, "i": {"z": 3}}}}
    result = apply_v2_diff(old, diff)
    assert result == {"_id": "u1", "s": {"p": {"y": 2, "z": 3}}}
    assert list(result["s"]["p"]) == ["y", "z"]


def test_apply_insert_of_existing_field_moves_it_to_the_end() -> None:
    result = apply_v2_diff({"_id": 1, "a": 1, "b": 2}, {"i": {"a": 5}})
    assert list(result.items()) == [("_id", 1), ("b", 2), ("a", 5)]


def test_apply_update_keeps_field_position_and_appends_absent_field() -> None:
    result = apply_v2_diff({"_id": 1, "a": 1, "b": 2}, {"u": {"a": 5, "c": 3}})
    assert list(result.items()) == [("_id", 1), ("a", 5), ("b", 2), ("c", 3)]


def test_apply_subdiff_on_mismatched_type_yields_null() -> None:
    result = apply_v2_diff({"_id": 1, "a": 5}, {"sa": {"u": {"b": 1}}})
    assert result == {"_id": 1, "a": None}


def test_apply_subdiff_for_missing_field_is_ignored() -> None:
    assert apply_v2_diff({"_id": 1}, {"sa": {"u": {"b": 1}}}) == {"_id": 1}


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"u": {"a": 1}, "d": {"b": False}},  # sections out of order
        {"x": {"a": 1}},  # unknown section
        {"u": {"a": 1}, "i": {"a": 2}},  # same field twice
        {"sarr": {"u0": 1}},  # array diff without its header... read as a document diff
        {"sarr": {"a": True, "u2": 1, "u1": 2}},  # indexes out of order
        {"sarr": {"a": True, "x1": 1}},
        {"sarr": {"a": True, "l": 1, "u3": 1}},  # modification past the new size
    ],
)
def test_apply_rejects_malformed_diff(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        apply_v2_diff({"_id": 1, "arr": [1, 2, 3]}, bad)


# --------------------------------------------------------------------------------------------
# update_description
# --------------------------------------------------------------------------------------------


def test_update_description_for_push_uses_element_index_path() -> None:
    desc = update_description({"sconnections": {"a": True, "u2": conn("c2")}})
    assert desc == {
        "updatedFields": {"connections.2": conn("c2")},
        "removedFields": [],
        "truncatedArrays": [],
    }


def test_update_description_for_positional_status_change() -> None:
    diff = {"sconnections": {"a": True, "s1": {"u": {"status": "away", "_updatedAt": T1}}}}
    assert update_description(diff) == {
        "updatedFields": {"connections.1.status": "away", "connections.1._updatedAt": T1},
        "removedFields": [],
        "truncatedArrays": [],
    }


def test_update_description_for_pull_reports_whole_array() -> None:
    desc = update_description({"u": {"connections": [conn("c0")]}})
    assert desc == {
        "updatedFields": {"connections": [conn("c0")]},
        "removedFields": [],
        "truncatedArrays": [],
    }


def test_update_description_reports_inserted_and_removed_fields() -> None:
    desc = update_description({"d": {"statusText": False}, "i": {"statusConnection": "away"}})
    assert desc == {
        "updatedFields": {"statusConnection": "away"},
        "removedFields": ["statusText"],
        "truncatedArrays": [],
    }


def test_update_description_nested_document_paths() -> None:
    diff = {"sservices": {"spresence": {"d": {"since": False}, "u": {"status": "away"}}}}
    assert update_description(diff) == {
        "updatedFields": {"services.presence.status": "away"},
        "removedFields": ["services.presence.since"],
        "truncatedArrays": [],
    }


def test_update_description_truncated_arrays_from_l() -> None:
    diff = {"sconnections": {"a": True, "l": 1}, "sm": {"a": True, "s0": {"a": True, "l": 0}}}
    assert update_description(diff) == {
        "updatedFields": {},
        "removedFields": [],
        "truncatedArrays": [
            {"field": "connections", "newSize": 1},
            {"field": "m.0", "newSize": 0},
        ],
    }


def test_update_description_truncation_with_element_update() -> None:
    # The shape from the vapor driver docs: ["foo", {"a": "bar"}, 1, 2, 3] ->
    # ["foo", {"a": "bar", "b": 3}].
    diff = {"sarrayField": {"a": True, "l": 2, "s1": {"i": {"b": 3}}}}
    assert update_description(diff) == {
        "updatedFields": {"arrayField.1.b": 3},
        "removedFields": [],
        "truncatedArrays": [{"field": "arrayField", "newSize": 2}],
    }


def test_update_description_of_computed_diffs() -> None:
    old = {"_id": "u1", "status": "online", "connections": [conn("c0"), conn("c1")]}
    new = {
        "_id": "u1",
        "status": "away",
        "connections": [conn("c0", status="away", updated=T1), conn("c1"), conn("c2")],
    }
    diff = compute_v2_diff(old, new)
    assert diff is not None
    assert update_description(diff) == {
        "updatedFields": {
            "status": "away",
            "connections.0.status": "away",
            "connections.0._updatedAt": T1,
            "connections.2": conn("c2"),
        },
        "removedFields": [],
        "truncatedArrays": [],
    }


# --------------------------------------------------------------------------------------------
# _bson_equal
# --------------------------------------------------------------------------------------------


def test_bson_equal_is_order_and_type_sensitive() -> None:
    assert _bson_equal({"a": 1, "b": [1, {"c": 2}]}, {"a": 1, "b": [1, {"c": 2}]})
    assert not _bson_equal({"a": 1, "b": 2}, {"b": 2, "a": 1})
    assert not _bson_equal({"x": {"a": 1, "b": 2}}, {"x": {"b": 2, "a": 1}})
    assert not _bson_equal(1, 1.0)
    assert not _bson_equal(1, True)
    assert not _bson_equal([1], {"0": 1})
    assert _bson_equal(float("nan"), float("nan"))


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "d", "status", "connections", "_updatedAt"])

ms_datetimes = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1)).map(
    lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000)
)
scalars = st.one_of(
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.text(alphabet="xyz", max_size=3),
    st.none(),
    ms_datetimes,
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(KEYS, children, max_size=4),
    ),
    max_leaves=12,
)
documents = st.dictionaries(KEYS, values, max_size=6)


def mutate(data: st.DataObject, value: Any, depth: int = 0) -> Any:
    """A randomly edited copy of ``value``: small edits, so old and new share structure."""
    choice = data.draw(st.integers(0, 9), label="edit")
    if choice == 0:
        return data.draw(values, label="replacement")
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            action = data.draw(st.integers(0, 5), label=f"action {key}")
            if action == 0:
                continue  # removed
            out[key] = mutate(data, item, depth + 1) if action == 1 else copy.deepcopy(item)
        for key in data.draw(st.lists(KEYS, max_size=2), label="added keys"):
            if key not in out:
                out[key] = data.draw(values, label="added value")
        if choice == 1 and len(out) > 1:
            fields = list(out.items())
            data.draw(st.randoms(use_true_random=False), label="shuffle").shuffle(fields)
            out = dict(fields)
        return out
    if isinstance(value, list):
        items = [
            mutate(data, item, depth + 1) if data.draw(st.booleans(), label="mutate item") else item
            for item in value
        ]
        if choice == 2 and items:
            del items[data.draw(st.integers(0, len(items) - 1), label="pulled")]
        elif choice in (3, 4):
            items.extend(data.draw(st.lists(values, max_size=2), label="pushed"))
        return items
    return value


@st.composite
def document_pairs(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    old = draw(documents)
    if draw(st.integers(0, 4)) == 0:
        return old, draw(documents)
    data = draw(st.data())
    new = mutate(data, old)
    if not isinstance(new, dict):  # the top level stays a document
        new = draw(documents)
    return old, new


def apply_update_description(doc: dict[str, Any], desc: dict[str, Any]) -> dict[str, Any]:
    """What a change-stream consumer does with updateDescription: $set, $unset, truncate."""
    out = copy.deepcopy(doc)

    def walk(parts: list[str]) -> Any:
        node: Any = out
        for part in parts:
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    for entry in desc["truncatedArrays"]:
        del walk(entry["field"].split("."))[entry["newSize"] :]
    for path, value in desc["updatedFields"].items():
        *parents, last = path.split(".")
        node = walk(parents)
        if isinstance(node, list):
            idx = int(last)
            while len(node) < idx:
                node.append(None)
            if idx == len(node):
                node.append(value)
            else:
                node[idx] = value
        else:
            node[last] = value
    for path in desc["removedFields"]:
        *parents, last = path.split(".")
        del walk(parents)[last]
    return out


@settings(max_examples=400, deadline=None)
@given(document_pairs())
def test_property_applying_the_diff_reproduces_new(pair: tuple[dict[str, Any], ...]) -> None:
    old, new = pair
    old_before = copy.deepcopy(old)
    diff = compute_v2_diff(old, new)
    assert _bson_equal(old, old_before)  # old not mutated
    if diff is None:
        assert _bson_equal(old, new)
    else:
        assert not _bson_equal(old, new)
        assert _bson_equal(apply_v2_diff(old, diff), new)


@settings(max_examples=400, deadline=None)
@given(document_pairs())
def test_property_applying_update_description_reproduces_new(
    pair: tuple[dict[str, Any], ...],
) -> None:
    old, new = pair
    diff = compute_v2_diff(old, new)
    if diff is None:
        return
    assert apply_update_description(old, update_description(diff)) == new


@settings(max_examples=200, deadline=None)
@given(documents)
def test_property_identical_documents_give_no_diff(doc: dict[str, Any]) -> None:
    assert compute_v2_diff(doc, copy.deepcopy(doc)) is None


@settings(max_examples=200, deadline=None)
@given(document_pairs())
def test_property_diff_sections_follow_mongodb_order(pair: tuple[dict[str, Any], ...]) -> None:
    old, new = pair
    diff = compute_v2_diff(old, new)
    if diff is None:
        return

    def check(sub: dict[str, Any]) -> None:
        if next(iter(sub)) == "a":
            indexes = [int(k[1:]) for k in sub if k not in ("a", "l")]
            assert indexes == sorted(indexes)
            children = [v for k, v in sub.items() if k.startswith("s")]
        else:
            ranks = [{"d": 0, "u": 1, "i": 2}.get(k, 3) for k in sub]
            assert ranks == sorted(ranks)
            assert all(v is False for v in sub.get("d", {}).values())
            children = [v for k, v in sub.items() if k.startswith("s")]
        assert sub  # no empty (sub-)diffs
        for child in children:
            check(child)

    check(diff)
