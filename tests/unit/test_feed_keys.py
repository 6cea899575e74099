"""The change-event decoder on recorded change events (sans-io: no server involved).

The events are written out by hand in the shapes MongoDB 7.0 documents on its "Change
Events" pages (insert, update, replace, delete, drop, dropDatabase, rename, invalidate), with
the values Rocket.Chat's writes produce (see docs on ``usersSessions``/``users``/``instances``
in the design notes). A few tests drive :class:`ChangeStreamSource` with a fake stream to
check the bookkeeping around the decoder (malformed count, position, errors mid-poll).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from bson import ObjectId, Timestamp
from pymongo.errors import AutoReconnect, OperationFailure

from presenced.feed.changestream import (
    ChangeStreamSource,
    decode,
    decode_change_event,
    is_history_lost,
    pipeline,
)
from presenced.feed.keys import (
    PRESENCE_USER_FIELDS,
    Decoded,
    InstancesChanged,
    ResyncAll,
    SessionsChanged,
    UserChanged,
    touches_presence_fields,
)
from presenced.feed.source import HistoryLost
from presenced.presence import Collections

W = Collections("rocketchat")
WALL = datetime(2024, 5, 1, 12, 0, 0, 123000)
NOW = datetime(2024, 5, 1, 12, 0, 0, 456000)


def event(op: str, **fields: Any) -> dict[str, Any]:
    """A change event as a MongoDB 7.0 database stream delivers it (token, times, ...)."""
    return {
        "_id": {"_data": "8266321A3C000000012B022C0100296E5A1004" + "AB" * 16 + "04"},
        "operationType": op,
        "clusterTime": Timestamp(1714564860, 1),
        "wallTime": WALL,
        **fields,
    }


def ns(coll: str, db: str = "rocketchat") -> dict[str, str]:
    return {"db": db, "coll": coll}


def connection(cid: str, status: str = "online") -> dict[str, Any]:
    return {
        "id": cid,
        "instanceId": "inst-1",
        "status": status,
        "_createdAt": NOW,
        "_updatedAt": NOW,
    }


def users_update(
    updated: dict[str, Any],
    removed: list[str] | None = None,
    truncated: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return event(
        "update",
        ns=ns("users"),
        documentKey={"_id": "u1"},
        updateDescription={
            "updatedFields": updated,
            "removedFields": removed or [],
            "truncatedArrays": truncated or [],
        },
    )


# -------------------------------------------------------------------------------- usersSessions


def test_upsert_push_that_creates_the_sessions_document_is_an_insert_of_its_user() -> None:
    ev = event(
        "insert",
        ns=ns("usersSessions"),
        documentKey={"_id": "u1"},
        fullDocument={"_id": "u1", "connections": [connection("c1")]},
    )
    assert decode_change_event(ev, W) == [SessionsChanged("u1")]


def test_push_of_a_third_connection_is_a_sessions_change() -> None:
    ev = event(
        "update",
        ns=ns("usersSessions"),
        documentKey={"_id": "u1"},
        updateDescription={
            "updatedFields": {"connections.2": connection("c3")},
            "removedFields": [],
            "truncatedArrays": [],
        },
    )
    assert decode_change_event(ev, W) == [SessionsChanged("u1")]


def test_heartbeat_of_one_connection_is_a_sessions_change() -> None:
    ev = event(
        "update",
        ns=ns("usersSessions"),
        documentKey={"_id": "u1"},
        updateDescription={
            "updatedFields": {"connections.0._updatedAt": NOW},
            "removedFields": [],
            "truncatedArrays": [],
        },
    )
    assert decode_change_event(ev, W) == [SessionsChanged("u1")]


def test_pull_reporting_the_remaining_array_is_a_sessions_change() -> None:
    ev = event(
        "update",
        ns=ns("usersSessions"),
        documentKey={"_id": "u1"},
        updateDescription={
            "updatedFields": {"connections": []},
            "removedFields": [],
            "truncatedArrays": [],
        },
    )
    assert decode_change_event(ev, W) == [SessionsChanged("u1")]


def test_sessions_update_without_update_description_is_a_sessions_change() -> None:
    ev = event("update", ns=ns("usersSessions"), documentKey={"_id": "u1"})
    assert decode_change_event(ev, W) == [SessionsChanged("u1")]


def test_sessions_delete_is_a_sessions_change() -> None:
    ev = event("delete", ns=ns("usersSessions"), documentKey={"_id": "u1"})
    assert decode_change_event(ev, W) == [SessionsChanged("u1")]


def test_sessions_replace_is_a_sessions_change() -> None:
    ev = event(
        "replace",
        ns=ns("usersSessions"),
        documentKey={"_id": "u1"},
        fullDocument={"_id": "u1", "connections": []},
    )
    assert decode_change_event(ev, W) == [SessionsChanged("u1")]


# ---------------------------------------------------------------------------------------- users


def test_users_update_of_only_login_tokens_needs_no_read() -> None:
    ev = users_update({"services.resume.loginTokens": [{"when": NOW, "hashedToken": "x"}]})
    assert decode(ev, W) == Decoded()


def test_users_update_of_only_updated_at_and_last_login_needs_no_read() -> None:
    assert decode_change_event(users_update({"_updatedAt": NOW, "lastLogin": NOW}), W) == []


def test_users_update_of_status_default_is_a_user_change() -> None:
    assert decode_change_event(users_update({"statusDefault": "busy"}), W) == [UserChanged("u1")]


def test_users_update_mixing_ignored_and_presence_fields_is_a_user_change() -> None:
    ev = users_update({"services.resume.loginTokens": [], "statusText": "lunch"})
    assert decode_change_event(ev, W) == [UserChanged("u1")]


def test_users_update_removing_active_is_a_user_change() -> None:
    assert decode_change_event(users_update({}, removed=["active"]), W) == [UserChanged("u1")]


def test_users_update_of_one_role_by_dotted_path_is_a_user_change() -> None:
    assert decode_change_event(users_update({"roles.1": "admin"}), W) == [UserChanged("u1")]


def test_users_update_truncating_roles_is_a_user_change() -> None:
    ev = users_update({}, truncated=[{"field": "roles", "newSize": 1}])
    assert decode_change_event(ev, W) == [UserChanged("u1")]


def test_users_update_truncating_an_ignored_array_needs_no_read() -> None:
    ev = users_update({}, truncated=[{"field": "emails", "newSize": 0}])
    assert decode_change_event(ev, W) == []


def test_users_update_without_update_description_touches_everything() -> None:
    ev = event("update", ns=ns("users"), documentKey={"_id": "u1"})
    assert decode(ev, W) == Decoded((UserChanged("u1"),))


def test_users_update_with_null_update_description_touches_everything() -> None:
    ev = event("update", ns=ns("users"), documentKey={"_id": "u1"}, updateDescription=None)
    assert decode_change_event(ev, W) == [UserChanged("u1")]


def test_users_update_without_truncated_arrays_reads_the_other_parts() -> None:
    """Servers before 5.0 send no ``truncatedArrays``."""
    ev = event(
        "update",
        ns=ns("users"),
        documentKey={"_id": "u1"},
        updateDescription={"updatedFields": {"status": "away"}, "removedFields": []},
    )
    assert decode(ev, W) == Decoded((UserChanged("u1"),))


@pytest.mark.parametrize(
    "description",
    [
        "not a document",
        {"updatedFields": ["status"], "removedFields": []},
        {"updatedFields": {}, "removedFields": "active"},
        {"updatedFields": {}, "removedFields": [1]},
        {"updatedFields": {}, "removedFields": [], "truncatedArrays": [{"newSize": 1}]},
        {"updatedFields": {}, "removedFields": [], "truncatedArrays": "roles"},
    ],
)
def test_users_update_with_a_malformed_description_is_a_counted_user_change(
    description: Any,
) -> None:
    ev = event("update", ns=ns("users"), documentKey={"_id": "u1"}, updateDescription=description)
    assert decode(ev, W) == Decoded((UserChanged("u1"),), malformed=True)


def test_users_insert_is_a_user_change() -> None:
    ev = event(
        "insert",
        ns=ns("users"),
        documentKey={"_id": "u1"},
        fullDocument={"_id": "u1", "username": "alice", "active": True},
    )
    assert decode_change_event(ev, W) == [UserChanged("u1")]


def test_users_replace_is_a_user_change() -> None:
    ev = event(
        "replace",
        ns=ns("users"),
        documentKey={"_id": "u1"},
        fullDocument={"_id": "u1", "username": "alice"},
    )
    assert decode_change_event(ev, W) == [UserChanged("u1")]


def test_users_delete_is_a_user_change() -> None:
    ev = event("delete", ns=ns("users"), documentKey={"_id": "u1"})
    assert decode_change_event(ev, W) == [UserChanged("u1")]


def test_document_key_id_keeps_its_bson_type() -> None:
    oid = ObjectId("65f000000000000000000001")
    ev = event("delete", ns=ns("users"), documentKey={"_id": oid})
    (key,) = decode_change_event(ev, W)
    assert isinstance(key, UserChanged)
    assert key.user_id == oid
    assert isinstance(key.user_id, ObjectId)


def test_sharded_document_key_uses_only_the_id() -> None:
    ev = event("delete", ns=ns("usersSessions"), documentKey={"_id": "u1", "shard": 3})
    assert decode_change_event(ev, W) == [SessionsChanged("u1")]


# ------------------------------------------------------------------------------------ instances


def test_instances_insert_is_an_instances_change() -> None:
    ev = event(
        "insert",
        ns=ns("instances"),
        documentKey={"_id": "inst-1"},
        fullDocument={
            "_id": "inst-1",
            "name": "rocket.chat",
            "pid": 1,
            "_createdAt": NOW,
            "_updatedAt": NOW,
            "extraInformation": {"host": "10.0.0.1", "port": 3000},
        },
    )
    assert decode_change_event(ev, W) == [InstancesChanged("inst-1")]


def test_instances_heartbeat_is_an_instances_change() -> None:
    ev = event(
        "update",
        ns=ns("instances"),
        documentKey={"_id": "inst-1"},
        updateDescription={
            "updatedFields": {"_updatedAt": NOW},
            "removedFields": [],
            "truncatedArrays": [],
        },
    )
    assert decode_change_event(ev, W) == [InstancesChanged("inst-1")]


def test_instances_delete_is_an_instances_change() -> None:
    ev = event("delete", ns=ns("instances"), documentKey={"_id": "inst-1"})
    assert decode_change_event(ev, W) == [InstancesChanged("inst-1")]


# ------------------------------------------------------------------------ whole-collection events


@pytest.mark.parametrize("coll", ["users", "usersSessions", "instances"])
def test_drop_of_a_watched_collection_resyncs_everything(coll: str) -> None:
    assert decode_change_event(event("drop", ns=ns(coll)), W) == [ResyncAll("drop")]


def test_drop_of_another_collection_is_ignored() -> None:
    assert decode(event("drop", ns=ns("rocketchat_message")), W) == Decoded()


def test_drop_database_of_the_watched_database_resyncs_everything() -> None:
    ev = event("dropDatabase", ns={"db": "rocketchat"})
    assert decode_change_event(ev, W) == [ResyncAll("dropDatabase")]


def test_drop_database_of_another_database_is_ignored() -> None:
    assert decode(event("dropDatabase", ns={"db": "other"}), W) == Decoded()


def test_invalidate_resyncs_everything() -> None:
    assert decode_change_event(event("invalidate"), W) == [ResyncAll("invalidate")]


def test_rename_of_a_watched_collection_resyncs_everything() -> None:
    ev = event("rename", ns=ns("users"), to=ns("users_old"))
    assert decode_change_event(ev, W) == [ResyncAll("rename")]


def test_rename_onto_a_watched_collection_resyncs_everything() -> None:
    ev = event("rename", ns=ns("users_import"), to=ns("users"))
    assert decode_change_event(ev, W) == [ResyncAll("rename")]


def test_rename_between_other_collections_is_ignored() -> None:
    ev = event("rename", ns=ns("a"), to=ns("b"))
    assert decode(ev, W) == Decoded()


def test_rename_of_another_collection_without_a_target_is_malformed() -> None:
    assert decode(event("rename", ns=ns("a")), W) == Decoded(malformed=True)


@pytest.mark.parametrize(
    "op", ["create", "createIndexes", "dropIndexes", "modify", "shardCollection", "newOp"]
)
def test_other_operation_types_are_ignored_without_being_malformed(op: str) -> None:
    assert decode(event(op, ns=ns("users")), W) == Decoded()


# ------------------------------------------------------------------------ other namespaces


def test_watched_name_in_another_database_is_ignored() -> None:
    ev = event("insert", ns=ns("usersSessions", db="other"), documentKey={"_id": "u1"})
    assert decode(ev, W) == Decoded()


def test_other_collection_of_the_watched_database_is_ignored() -> None:
    ev = event("insert", ns=ns("rocketchat_message"), documentKey={"_id": "m1"})
    assert decode(ev, W) == Decoded()


def test_renamed_collections_are_decoded_by_their_configured_names() -> None:
    watched = Collections("chat", users="u", sessions="s", instances="i")
    assert decode_change_event(
        event("delete", ns=ns("s", db="chat"), documentKey={"_id": "x"}), watched
    ) == [SessionsChanged("x")]
    assert (
        decode_change_event(
            event("delete", ns=ns("usersSessions", db="chat"), documentKey={"_id": "x"}), watched
        )
        == []
    )


# ------------------------------------------------------------------------------------ malformed


@pytest.mark.parametrize(
    "ev",
    [
        pytest.param(None, id="none"),
        pytest.param(["insert"], id="a-list"),
        pytest.param("insert", id="a-string"),
        pytest.param({}, id="empty"),
        pytest.param({"operationType": 1, "ns": ns("users")}, id="operation-type-not-a-string"),
        pytest.param(event("insert", documentKey={"_id": "u1"}), id="no-ns"),
        pytest.param(
            event("insert", ns="rocketchat.users", documentKey={"_id": "u1"}), id="ns-a-string"
        ),
        pytest.param(
            event("insert", ns={"db": "rocketchat"}, documentKey={"_id": "u1"}),
            id="ns-without-coll",
        ),
        pytest.param(
            event("insert", ns={"coll": "users"}, documentKey={"_id": "u1"}), id="ns-without-db"
        ),
        pytest.param(event("insert", ns=ns("users")), id="no-document-key"),
        pytest.param(
            event("delete", ns=ns("usersSessions"), documentKey={}), id="document-key-without-id"
        ),
        pytest.param(
            event("delete", ns=ns("instances"), documentKey="inst-1"), id="document-key-a-string"
        ),
        pytest.param(event("drop"), id="drop-without-ns"),
        pytest.param(event("dropDatabase"), id="drop-database-without-ns"),
    ],
)
def test_malformed_event_yields_no_key_and_is_flagged(ev: Any) -> None:
    assert decode(ev, W) == Decoded(malformed=True)
    assert decode_change_event(ev, W) == []


def test_decoder_never_raises_on_a_mapping_that_fails_when_read() -> None:
    class Hostile(dict[str, Any]):
        def get(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("boom")

    assert decode(Hostile(operationType="insert"), W) == Decoded(malformed=True)


# ----------------------------------------------------------------------- touches_presence_fields


def test_every_presence_field_is_touched_by_name() -> None:
    assert all(touches_presence_fields([f]) for f in PRESENCE_USER_FIELDS)


def test_dotted_path_counts_by_its_top_level_field() -> None:
    assert touches_presence_fields(["roles.0"])
    assert touches_presence_fields(["services.resume", "statusText.x"])


def test_fields_outside_presence_are_not_touched() -> None:
    assert not touches_presence_fields(["services.resume.loginTokens", "_updatedAt", "emails.0"])


def test_no_fields_touch_nothing() -> None:
    assert not touches_presence_fields([])


def test_a_field_merely_starting_with_a_presence_name_is_not_touched() -> None:
    assert not touches_presence_fields(["statusTextHistory", "rolesCache.0", "activeSince"])


# ------------------------------------------------------------------------------------ pipeline


def test_pipeline_projection_keeps_the_resume_token_and_drops_the_full_document() -> None:
    project = pipeline(W)[-1]["$project"]
    assert project["_id"] == 1
    assert "fullDocument" not in project
    assert {"operationType", "ns", "documentKey", "updateDescription"} <= set(project)


def test_pipeline_match_names_the_watched_database_and_collections() -> None:
    text = repr(pipeline(Collections("chat", users="u", sessions="s", instances="i")))
    assert "'chat'" in text
    assert "['u', 's', 'i']" in text
    assert "'invalidate'" in text


# ----------------------------------------------------------------------- history lost detection


@pytest.mark.parametrize(
    ("code", "message", "lost"),
    [
        (286, "Resume of change stream was not possible", True),
        (260, "Invalid resume token", True),
        (
            280,
            "resume of change stream was not possible, as the resume point may no longer"
            " be in the oplog.",
            True,
        ),
        (280, "Encountered an event whose _id field was modified", False),
        (11000, "duplicate key", False),
    ],
)
def test_history_lost_is_recognised_by_code_and_message(
    code: int, message: str, lost: bool
) -> None:
    exc = OperationFailure(message, code, {"ok": 0, "errmsg": message, "code": code})
    assert is_history_lost(exc) is lost


# ------------------------------------------------------------ source bookkeeping (fake stream)


class FakeStream:
    """Duck-types the part of pymongo's ChangeStream the source uses."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items  # events, None (an empty getMore) or exceptions
        self.resume_token: dict[str, Any] | None = {"_data": "start"}
        self.alive = True

    def try_next(self) -> Any:
        if not self.items:
            return None
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        if item is None:
            self.resume_token = {"_data": "pbrt"}
            return None
        self.resume_token = item["_id"]
        if item["operationType"] == "invalidate":
            self.alive = False  # pymongo closes the stream once the server ends the cursor
        return item

    def close(self) -> None:
        self.alive = False


class FakeClient:
    def __init__(self, streams: list[FakeStream]) -> None:
        self.streams = streams
        self.watched: list[dict[str, Any]] = []

    def __getitem__(self, name: str) -> FakeClient:
        return self

    def watch(self, pipeline: Any, **kwargs: Any) -> FakeStream:
        self.watched.append(kwargs)
        return self.streams.pop(0)


def tokened(ev: dict[str, Any], n: int) -> dict[str, Any]:
    return {**ev, "_id": {"_data": f"t{n}"}}


@pytest.fixture
def sessions_events() -> Iterator[list[dict[str, Any]]]:
    yield [
        tokened(event("insert", ns=ns("usersSessions"), documentKey={"_id": f"u{i}"}), i)
        for i in range(3)
    ]


def test_source_counts_malformed_events_and_skips_them(
    sessions_events: list[dict[str, Any]],
) -> None:
    bad = tokened(event("insert", ns=ns("usersSessions")), 99)
    client = FakeClient([FakeStream([sessions_events[0], bad, sessions_events[1], None])])
    source = ChangeStreamSource(client, W)  # type: ignore[arg-type]
    source.open(None)
    assert source.poll() == [SessionsChanged("u0"), SessionsChanged("u1")]
    assert source.malformed == 1


def test_source_position_follows_the_last_event_returned(
    sessions_events: list[dict[str, Any]],
) -> None:
    client = FakeClient([FakeStream([*sessions_events, None])])
    source = ChangeStreamSource(client, W)  # type: ignore[arg-type]
    source.open(None)
    assert source.poll(max_events=2) == [SessionsChanged("u0"), SessionsChanged("u1")]
    assert source.position() == {"_data": "t1"}
    assert source.poll() == [SessionsChanged("u2")]
    assert source.position() == {"_data": "pbrt"}


def test_source_returns_keys_read_before_an_error_and_raises_it_next(
    sessions_events: list[dict[str, Any]],
) -> None:
    client = FakeClient(
        [FakeStream([sessions_events[0], AutoReconnect("down"), AutoReconnect("still down")])]
    )
    source = ChangeStreamSource(client, W)  # type: ignore[arg-type]
    source.open(None)
    assert source.poll() == [SessionsChanged("u0")]
    assert source.position() == {"_data": "t0"}
    with pytest.raises(AutoReconnect):
        source.poll()
    assert source.position() == {"_data": "t0"}


def test_source_turns_history_lost_while_polling_into_history_lost() -> None:
    lost = OperationFailure("resume point lost", 286, {"code": 286})
    client = FakeClient([FakeStream([lost])])
    source = ChangeStreamSource(client, W)  # type: ignore[arg-type]
    source.open(None)
    with pytest.raises(HistoryLost):
        source.poll()


def test_source_opens_after_an_invalidate_on_the_next_poll() -> None:
    invalidate = tokened(event("invalidate"), 7)
    first = FakeStream([invalidate])
    second = FakeStream(
        [tokened(event("insert", ns=ns("instances"), documentKey={"_id": "i1"}), 8), None]
    )
    client = FakeClient([first, second])
    source = ChangeStreamSource(client, W)  # type: ignore[arg-type]
    source.open(None)
    assert source.poll() == [ResyncAll("invalidate")]
    assert source.poll() == [InstancesChanged("i1")]
    assert client.watched[1]["start_after"] == {"_data": "t7"}


def test_source_poll_before_open_is_an_error() -> None:
    source = ChangeStreamSource(FakeClient([]), W)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        source.poll()


@pytest.mark.parametrize(
    ("updated", "removed", "written"),
    [
        ({"status": "away", "statusConnection": "away"}, [], ("away", "away")),
        ({"status": "away", "statusConnection": "away", "_updatedAt": 1}, [], ("away", "away")),
        ({"status": "away", "statusConnection": "away", "statusText": "x"}, [], None),
        ({"status": "away"}, [], None),
        ({"status": "away"}, ["statusConnection"], None),
        ({"status": None, "statusConnection": "away"}, [], None),
        ({"status.x": "away", "statusConnection": "away"}, [], None),
    ],
)
def test_an_update_of_only_the_status_pair_carries_the_pair(
    updated: dict[str, Any], removed: list[str], written: tuple[str, str] | None
) -> None:
    assert decode_change_event(users_update(updated, removed=removed), W) == [
        UserChanged("u1", written=written)
    ]
