"""The oplog decoder on oplog entries written out by hand (sans-io: no server involved).

The entries follow the formats MongoDB documents and writes (``local.oplog.rs``, 4.2 to
7.0): ``i``/``u``/``d`` with ``o``/``o2``; updates as ``$v: 2`` diffs (sections ``u``,
``i``, ``d`` and ``s<field>`` sub-diffs; array sub-diffs carry ``a: true`` and
``u<index>``/``s<index>``), as ``$v: 1`` ``$set``/``$unset``, or as whole replacements;
``c`` entries for ``applyOps`` (transactions, logged on ``admin.$cmd``), ``drop`` and
``dropDatabase`` (on ``<db>.$cmd``); ``n`` no-ops. Values are what Rocket.Chat writes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from bson import Int64, ObjectId, Timestamp
from bson.binary import Binary

from presenced.feed.keys import (
    Decoded,
    InstancesChanged,
    ResyncAll,
    SessionsChanged,
    UserChanged,
)
from presenced.feed.oplog import decode_oplog_entry, oplog_filter, touched_fields
from presenced.presence import Collections

W = Collections("rocketchat")
WALL = datetime(2024, 5, 1, 12, 0, 0, 123000)
UI = Binary(b"\x12" * 16, 4)


def entry(op: str, ns: str, o: Any = None, **fields: Any) -> dict[str, Any]:
    """An oplog entry as a MongoDB 7.0 primary writes it."""
    e: dict[str, Any] = {
        "op": op,
        "ns": ns,
        "ui": UI,
        "o": o,
        "ts": Timestamp(1714564800, 7),
        "t": Int64(3),
        "v": Int64(2),
        "wall": WALL,
    }
    e.update(fields)
    if o is None:
        del e["o"]
    return e


def connection(cid: str, status: str = "online") -> dict[str, Any]:
    return {
        "id": cid,
        "instanceId": "inst-1",
        "status": status,
        "_createdAt": WALL,
        "_updatedAt": WALL,
    }


def keys(e: Any) -> list[Any]:
    decoded = decode_oplog_entry(e, W)
    assert not decoded.malformed, decoded
    return list(decoded.keys)


# ------------------------------------------------------------------------------------- inserts


def test_insert_of_a_sessions_document_is_its_key() -> None:
    e = entry(
        "i",
        "rocketchat.usersSessions",
        {"_id": "u1", "connections": [connection("c1")]},
        o2={"_id": "u1"},
    )
    assert keys(e) == [SessionsChanged("u1")]


def test_insert_of_a_user_and_of_an_instance() -> None:
    user = {"_id": "u1", "username": "alice", "active": True, "roles": ["user"]}
    assert keys(entry("i", "rocketchat.users", user)) == [UserChanged("u1")]
    oid = ObjectId()
    instance = {"_id": oid, "name": "rocket.chat", "pid": 1, "_updatedAt": WALL}
    assert keys(entry("i", "rocketchat.instances", instance)) == [InstancesChanged(oid)]


# --------------------------------------------------------------------------- $v: 2 diff updates


def test_v2_push_onto_connections_is_an_array_diff_and_a_sessions_key() -> None:
    o = {"$v": 2, "diff": {"sconnections": {"a": True, "u2": connection("c3")}}}
    e = entry("u", "rocketchat.usersSessions", o, o2={"_id": "u1"})
    assert keys(e) == [SessionsChanged("u1")]
    assert touched_fields(o) == frozenset({"connections"})


def test_v2_nested_sub_diff_inside_an_array_element() -> None:
    o = {"$v": 2, "diff": {"sconnections": {"a": True, "s1": {"u": {"status": "away"}}}}}
    e = entry("u", "rocketchat.usersSessions", o, o2={"_id": "u1"})
    assert keys(e) == [SessionsChanged("u1")]
    assert touched_fields(o) == frozenset({"connections"})


def test_v2_pull_that_shortens_the_array() -> None:
    o = {"$v": 2, "diff": {"sconnections": {"a": True, "l": 1, "u0": connection("c2")}}}
    e = entry("u", "rocketchat.usersSessions", o, o2={"_id": "u1"})
    assert keys(e) == [SessionsChanged("u1")]


def test_v2_users_update_touching_only_services_is_no_key() -> None:
    o = {
        "$v": 2,
        "diff": {
            "sservices": {"sresume": {"u": {"loginTokens": [{"when": WALL, "hashedToken": "h"}]}}},
            "u": {"lastLogin": WALL},
        },
    }
    e = entry("u", "rocketchat.users", o, o2={"_id": "u1"})
    assert decode_oplog_entry(e, W) == Decoded()
    assert touched_fields(o) == frozenset({"services", "lastLogin"})


def test_v2_users_update_touching_status_default_is_user_changed() -> None:
    o = {"$v": 2, "diff": {"u": {"statusDefault": "busy"}}}
    assert keys(entry("u", "rocketchat.users", o, o2={"_id": "u1"})) == [UserChanged("u1")]


@pytest.mark.parametrize(
    "diff",
    [
        {"i": {"statusText": "lunch"}},
        {"d": {"statusText": False}},
        {"sroles": {"a": True, "u1": "admin"}},
        {"u": {"_updatedAt": WALL}, "i": {"status": "online"}},
    ],
)
def test_v2_users_update_touching_a_presence_field_in_any_section(diff: dict[str, Any]) -> None:
    e = entry("u", "rocketchat.users", {"$v": 2, "diff": diff}, o2={"_id": "u1"})
    assert keys(e) == [UserChanged("u1")]


def test_v2_touched_fields_names_every_section() -> None:
    o = {
        "$v": 2,
        "diff": {"u": {"a": 1}, "i": {"b": 2}, "d": {"c": False}, "sd": {"u": {"x": 1}}},
    }
    assert touched_fields(o) == frozenset({"a", "b", "c", "d"})


def test_v2_users_update_with_a_broken_diff_still_rereads_and_is_flagged() -> None:
    e = entry("u", "rocketchat.users", {"$v": 2, "diff": {"x": {"a": 1}}}, o2={"_id": "u1"})
    assert decode_oplog_entry(e, W) == Decoded((UserChanged("u1"),), malformed=True)
    assert touched_fields({"$v": 2, "diff": "nope"}) is None


# ------------------------------------------------------------------- $v: 1 and unversioned


def test_v1_set_of_a_presence_field_is_user_changed() -> None:
    o = {"$v": 1, "$set": {"status": "online", "statusConnection": "online"}}
    assert keys(entry("u", "rocketchat.users", o, o2={"_id": "u1"})) == [
        UserChanged("u1", written=("online", "online"))
    ]
    assert touched_fields(o) == frozenset({"status", "statusConnection"})


@pytest.mark.parametrize(
    ("o", "written"),
    [
        ({"$v": 2, "diff": {"u": {"status": "away", "statusConnection": "away"}}},
         ("away", "away")),
        ({"$v": 2, "diff": {"i": {"status": "busy"}, "u": {"statusConnection": "online"}}},
         ("busy", "online")),
        ({"$v": 2, "diff": {"u": {"status": "away", "statusConnection": "away",
                                  "statusText": "x"}}}, None),
        ({"$v": 2, "diff": {"u": {"status": "away"}}}, None),
        ({"$v": 2, "diff": {"u": {"status": 1, "statusConnection": "away"}}}, None),
        ({"$v": 2, "diff": {"u": {"statusConnection": "away"}, "d": {"status": False}}}, None),
        ({"$v": 1, "$set": {"status": "away", "statusConnection": "away", "_updatedAt": 1}},
         ("away", "away")),
        ({"$v": 1, "$set": {"status": "away"}, "$unset": {"statusConnection": True}}, None),
    ],
)
def test_an_update_of_only_the_status_pair_carries_the_pair(
    o: dict[str, Any], written: tuple[str, str] | None
) -> None:
    assert keys(entry("u", "rocketchat.users", o, o2={"_id": "u1"})) == [
        UserChanged("u1", written=written)
    ]


def test_v1_unset_of_a_presence_field_is_user_changed() -> None:
    o = {"$v": 1, "$unset": {"statusText": True}}
    assert keys(entry("u", "rocketchat.users", o, o2={"_id": "u1"})) == [UserChanged("u1")]


def test_v1_dotted_paths_count_by_their_first_component() -> None:
    o = {"$v": 1, "$set": {"services.resume.loginTokens": []}, "$unset": {"profile.x": True}}
    assert touched_fields(o) == frozenset({"services", "profile"})
    assert decode_oplog_entry(entry("u", "rocketchat.users", o, o2={"_id": "u1"}), W) == Decoded()
    o = {"$set": {"roles.0": "admin"}}  # unversioned (before 3.6)
    assert touched_fields(o) == frozenset({"roles"})
    assert keys(entry("u", "rocketchat.users", o, o2={"_id": "u1"})) == [UserChanged("u1")]


def test_v1_sessions_set_is_a_sessions_key() -> None:
    o = {"$v": 1, "$set": {"connections.0._updatedAt": WALL}}
    e = entry("u", "rocketchat.usersSessions", o, o2={"_id": "u1"})
    assert keys(e) == [SessionsChanged("u1")]


def test_an_operator_the_oplog_format_does_not_have_means_everything() -> None:
    assert touched_fields({"$inc": {"n": 1}}) is None
    e = entry("u", "rocketchat.users", {"$inc": {"n": 1}}, o2={"_id": "u1"})
    assert decode_oplog_entry(e, W) == Decoded((UserChanged("u1"),), malformed=True)


# --------------------------------------------------------------------------------- replacement


def test_replacement_touches_everything() -> None:
    o = {"_id": "u1", "username": "alice", "services": {}}
    assert touched_fields(o) is None
    assert keys(entry("u", "rocketchat.users", o, o2={"_id": "u1"})) == [UserChanged("u1")]
    o = {"_id": "inst-1", "name": "rocket.chat"}
    e = entry("u", "rocketchat.instances", o, o2={"_id": "inst-1"})
    assert keys(e) == [InstancesChanged("inst-1")]


# -------------------------------------------------------------------------------------- delete


def test_deletes_are_keys_by_o_id() -> None:
    assert keys(entry("d", "rocketchat.usersSessions", {"_id": "u1"})) == [SessionsChanged("u1")]
    assert keys(entry("d", "rocketchat.users", {"_id": "u1"})) == [UserChanged("u1")]
    assert keys(entry("d", "rocketchat.instances", {"_id": "i1"})) == [InstancesChanged("i1")]


# -------------------------------------------------------------------------------------- applyOps


def txn(ops: list[dict[str, Any]]) -> dict[str, Any]:
    """A committed transaction as a replica set logs it: one applyOps on admin.$cmd."""
    inner = []
    for op in ops:
        op = dict(op)
        for k in ("ts", "t", "v", "wall"):
            op.pop(k, None)
        inner.append(op)
    return entry(
        "c",
        "admin.$cmd",
        {"applyOps": inner},
        lsid={"id": Binary(b"\x01" * 16, 4), "uid": Binary(b"\x02" * 32, 0)},
        txnNumber=Int64(1),
        prevOpTime={"ts": Timestamp(0, 0), "t": Int64(-1)},
    )


def test_apply_ops_with_mixed_namespaces_yields_the_watched_ones_in_order() -> None:
    e = txn(
        [
            entry("i", "rocketchat.rocketchat_message", {"_id": "m1", "msg": "hi"}),
            entry(
                "u",
                "rocketchat.users",
                {"$v": 2, "diff": {"u": {"statusDefault": "away"}}},
                o2={"_id": "u1"},
            ),
            entry("u", "rocketchat.users", {"$v": 2, "diff": {"u": {"x": 1}}}, o2={"_id": "u9"}),
            entry("i", "other.usersSessions", {"_id": "u7"}),
            entry("d", "rocketchat.usersSessions", {"_id": "u2"}),
            entry("i", "rocketchat.instances", {"_id": "i1"}),
        ]
    )
    assert keys(e) == [UserChanged("u1"), SessionsChanged("u2"), InstancesChanged("i1")]


def test_nested_apply_ops_are_decoded_too() -> None:
    inner = txn([entry("i", "rocketchat.users", {"_id": "u3"})])
    e = txn(
        [
            entry("i", "rocketchat.usersSessions", {"_id": "u2"}),
            inner,
            entry("c", "rocketchat.$cmd", {"drop": "users"}),
        ]
    )
    assert keys(e) == [SessionsChanged("u2"), UserChanged("u3"), ResyncAll("drop")]


def test_apply_ops_with_a_malformed_inner_op_keeps_the_others_and_is_flagged() -> None:
    e = txn(
        [
            {"op": "u", "ns": "rocketchat.users", "o": {"$v": 2, "diff": {}}},  # no o2
            entry("i", "rocketchat.usersSessions", {"_id": "u2"}),
        ]
    )
    assert decode_oplog_entry(e, W) == Decoded((SessionsChanged("u2"),), malformed=True)


def test_apply_ops_that_is_not_a_list_is_malformed() -> None:
    assert decode_oplog_entry(entry("c", "admin.$cmd", {"applyOps": "x"}), W).malformed


# -------------------------------------------------------------------------------------- commands


def test_drop_of_a_watched_collection_resyncs_and_others_do_not() -> None:
    assert keys(entry("c", "rocketchat.$cmd", {"drop": "users"}, o2={"numRecords": 3})) == [
        ResyncAll("drop")
    ]
    assert keys(entry("c", "rocketchat.$cmd", {"drop": "usersSessions"})) == [ResyncAll("drop")]
    assert keys(entry("c", "rocketchat.$cmd", {"drop": "rocketchat_message"})) == []
    assert keys(entry("c", "other.$cmd", {"drop": "users"})) == []


def test_drop_database_resyncs_only_for_the_watched_database() -> None:
    assert keys(entry("c", "rocketchat.$cmd", {"dropDatabase": 1})) == [ResyncAll("dropDatabase")]
    assert keys(entry("c", "other.$cmd", {"dropDatabase": 1})) == []


def test_rename_from_or_onto_a_watched_collection_resyncs() -> None:
    o = {"renameCollection": "rocketchat.users", "to": "rocketchat.users_old", "stayTemp": False}
    assert keys(entry("c", "rocketchat.$cmd", o)) == [ResyncAll("rename")]
    o = {"renameCollection": "rocketchat.tmp1", "to": "rocketchat.instances", "dropTarget": True}
    assert keys(entry("c", "rocketchat.$cmd", o)) == [ResyncAll("rename")]
    o = {"renameCollection": "rocketchat.a", "to": "rocketchat.b"}
    assert keys(entry("c", "rocketchat.$cmd", o)) == []


def test_other_commands_are_nothing() -> None:
    create = {"create": "users", "idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"}}
    assert keys(entry("c", "rocketchat.$cmd", create)) == []
    index = {"createIndexes": "users", "v": 2, "key": {"username": 1}, "name": "username_1"}
    assert keys(entry("c", "rocketchat.$cmd", index)) == []


# ----------------------------------------------------------------------------- ignored entries


def test_noop_is_nothing() -> None:
    assert decode_oplog_entry(entry("n", "", {"msg": "periodic noop"}), W) == Decoded()
    assert decode_oplog_entry({"op": "n", "ns": "", "o": {"msg": "new primary"}}, W) == Decoded()


def test_writes_to_another_database_or_collection_are_nothing() -> None:
    assert keys(entry("i", "other.users", {"_id": "u1"})) == []
    assert keys(entry("i", "rocketchat.rocketchat_message", {"_id": "m1"})) == []
    assert keys(entry("u", "rocketchat.users_old", {"$set": {"status": "x"}}, o2={"_id": 1})) == []
    assert keys(entry("i", "config.system.sessions", {"_id": {"id": UI}})) == []


def test_renamed_watched_names_are_honoured() -> None:
    w = Collections("rc", users="u", sessions="s", instances="i")
    assert decode_oplog_entry(entry("d", "rc.s", {"_id": 1}), w).keys == (SessionsChanged(1),)
    assert decode_oplog_entry(entry("d", "rc.usersSessions", {"_id": 1}), w).keys == ()


# ------------------------------------------------------------------------------------ malformed


@pytest.mark.parametrize(
    "bad",
    [
        {k: v for k, v in entry("i", "rocketchat.users", {"_id": "u1"}).items() if k != "ns"},
        entry("i", "rocketchat.users"),  # no o
        entry("d", "rocketchat.usersSessions"),  # no o
        entry("u", "rocketchat.users", {"$v": 2, "diff": {"u": {"status": "away"}}}),  # no o2
        entry("u", "rocketchat.usersSessions", {"$v": 2, "diff": {}}, o2={}),  # o2 without _id
        entry("u", "rocketchat.users", {"$set": {"status": "x"}}, o2="u1"),
        entry("d", "rocketchat.users", {}),  # delete without _id
        entry("i", "rocketchat", {"_id": "u1"}),  # ns without a collection
        entry("x", "rocketchat.users", {"_id": "u1"}),  # unknown op
        {"ns": "rocketchat.users", "o": {"_id": "u1"}},  # no op
        entry("c", "rocketchat.$cmd", {"drop": 1}),
        entry("c", "rocketchat.$cmd", {"renameCollection": "rocketchat.users"}),
        "not an entry",
        None,
        {"op": "i", "ns": 7, "o": {"_id": 1}},
    ],
)
def test_malformed_entries_are_no_keys_and_flagged(bad: Any) -> None:
    assert decode_oplog_entry(bad, W) == Decoded(malformed=True)


def test_apply_ops_nested_too_deep_is_malformed_not_a_crash() -> None:
    e: dict[str, Any] = entry("i", "rocketchat.users", {"_id": "u1"})
    for _ in range(100):
        e = {"op": "c", "ns": "admin.$cmd", "o": {"applyOps": [e]}}
    assert decode_oplog_entry(e, W).malformed


# --------------------------------------------------------------------------------------- filter


def test_filter_names_the_watched_namespaces_commands_and_noops() -> None:
    after = Timestamp(1714564800, 7)
    flt = oplog_filter(W, after)
    assert flt["ts"] == {"$gt": after}
    assert flt["$or"] == [
        {
            "ns": {
                "$in": [
                    "rocketchat.users",
                    "rocketchat.usersSessions",
                    "rocketchat.instances",
                    "rocketchat.$cmd",
                    "admin.$cmd",
                ]
            }
        },
        {"op": "n"},
    ]
    assert "ts" not in oplog_filter(W, None)
