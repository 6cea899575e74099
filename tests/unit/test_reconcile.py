"""Reconciliation's merge walk (one cursor per collection, merged by ``_id``) and its
pipelined batches, in the whole daemon under MockClock (``tests.unit.daemon_double``):
which documents are read, how often, that a failed cursor resumes after its last id, and
that a reconcile read never overrides a newer one."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

import trio
from bson import ObjectId
from pymongo.errors import AutoReconnect

from presenced.engine import Reason, Transition
from presenced.reconcile import SCAN_BATCH, needs_check
from presenced.store import ReconcileSource
from presenced.testing.memory import MemoryCursor
from presenced.writer import BATCH

from .daemon_double import Env, run

ON = ("online", "online")
OFF = ("offline", "offline")


def record(env: Env, name: str, into: list[list[Any]]) -> None:
    """Wrap the store's bulk load ``name`` to record the ids of each call."""
    original = getattr(env.store, name)

    def recorded(user_ids: Collection[Any]) -> dict[Any, Any]:
        into.append(list(user_ids))
        return dict(original(user_ids))

    setattr(env.store, name, recorded)


def count_loads(env: Env, into: Counter[Any]) -> None:
    """Count the users the reconciler hands to the writer."""
    writer = env.daemon.writer
    assert writer is not None
    original = writer.load_documents

    async def counting(
        seq: int, chunk: Sequence[Any], users: dict[Any, Any], sessions: dict[Any, Any],
        reason: Reason,
    ) -> list[Transition]:
        into.update(chunk)
        return await original(seq, chunk, users, sessions, reason)

    writer.load_documents = counting  # type: ignore[method-assign]


def cursors(env: Env, source: ReconcileSource) -> list[MemoryCursor]:
    return [c for c in env.store.cursors if c.source == source]


def test_which_users_need_a_check() -> None:
    online = {"_id": "u", "status": "online", "statusConnection": "online"}
    offline = {"_id": "u", "status": "offline", "statusConnection": "offline"}
    connected = {"_id": "u", "connections": [{"id": "c"}]}
    assert needs_check(online, None) and needs_check(offline, connected)
    assert needs_check(None, connected)  # a deleted user's connections: forgotten
    assert needs_check({"_id": "u", "status": "busy", "statusConnection": "offline"}, None)
    assert needs_check({"_id": "u", "status": "offline", "statusConnection": 7}, None)
    assert needs_check(offline, {"_id": "u", "connections": "junk"})  # refused, counted
    assert not needs_check(offline, None)
    assert not needs_check(offline, {"_id": "u", "connections": []})
    assert not needs_check(offline, {"_id": "u"})
    assert not needs_check({"_id": "u"}, None)  # never seen: no status fields
    assert not needs_check({"_id": "u", "status": None, "statusConnection": None}, None)
    assert not needs_check(None, {"_id": "u", "connections": []})


def test_each_collection_is_read_once_by_one_cursor_and_nothing_by_id() -> None:
    async def scenario(env: Env) -> None:
        now = env.now()
        for uid in ("c1", "c2", "both"):  # connected, stored offline (and "both" online)
            env.store.add_user(uid, status="online" if uid == "both" else "offline")
            env.store.connect(uid, f"conn-{uid}", None, now)
        env.store.add_user("stuck", status="online")  # stored online, no sessions document
        env.store.add_user("stuck-away", status="away")
        env.store.sessions["stuck-away"] = {"_id": "stuck-away", "connections": []}
        env.store.add_user("offline")  # nothing to look at
        env.store.connect("gone", "conn-gone", None, now)  # connections, no users document
        users_reads: list[list[Any]] = []
        sessions_reads: list[list[Any]] = []
        record(env, "load_users", users_reads)
        record(env, "load_sessions", sessions_reads)
        async with env.running():
            assert [env.store.presence(u) for u in ("c1", "c2", "both")] == [ON] * 3
            assert env.store.presence("stuck") == OFF
            assert env.store.presence("stuck-away") == OFF
            assert env.store.presence("offline") == OFF
            assert "offline" not in env.daemon.engine and "gone" not in env.daemon.engine
            assert "gone" not in env.store.users
            assert users_reads == [] and sessions_reads == []
            assert sorted((c.source, c.after) for c in env.store.cursors) == [
                ("sessions", None), ("users", None)
            ]
            assert all(c.closed for c in env.store.cursors)

    run(scenario)


def test_users_in_one_collection_only_across_batch_boundaries_are_each_checked_once() -> None:
    count = 2 * SCAN_BATCH + 3

    async def scenario(env: Env) -> None:
        now = env.now()
        for n in range(count):
            uid = f"u{n:05d}"
            if n % 4 != 3:  # one in four has no users document (a deleted user)
                env.store.add_user(uid, status="online" if n % 2 else "offline")
            if n % 3 == 0:  # one in three connected: the sessions cursor is shorter
                env.store.connect(uid, f"c{n}", None, now, "away" if n == 6 else "online")
        loaded: Counter[Any] = Counter()
        async with env.running():
            count_loads(env, loaded)

            def expected(n: int) -> tuple[Any, Any]:
                if n == 6:
                    return ("away", "away")
                return ON if n % 3 == 0 else OFF

            def converged() -> None:
                for n in range(count):
                    if n % 4 != 3:
                        assert env.store.presence(f"u{n:05d}") == expected(n), n

            converged()
            for doc in env.store.users.values():  # stored online again
                doc["status"] = doc["statusConnection"] = "online"
            env.store.cursors.clear()
            checked = await env.daemon.reconciler.reconcile("test")  # type: ignore[union-attr]
            converged()
            # Every user with a document anywhere needs a look now (stored online, or
            # connected): each handed over exactly once, in one pass of each cursor.
            everyone = {f"u{n:05d}" for n in range(count) if n % 4 != 3 or n % 3 == 0}
            assert checked == len(loaded) == len(everyone)
            assert set(loaded) == everyone and set(loaded.values()) == {1}
            assert [c.after for c in cursors(env, "users")] == [None]
            assert [c.after for c in cursors(env, "sessions")] == [None]
            # 7,502 users: a full batch, the rest, then the empty one that ends it.
            assert cursors(env, "users")[0].batches == 3

    run(scenario)


def test_users_with_ids_that_are_not_strings_are_read_apart_and_checked() -> None:
    oid = ObjectId()

    async def scenario(env: Env) -> None:
        now = env.now()
        for uid in (7, oid, "s"):
            env.store.add_user(uid)
            env.store.connect(uid, f"c-{uid}", None, now)
        env.store.add_user(8, status="online")  # stored online, no connections
        env.store.add_user(9)  # stored offline, nothing to do
        async with env.running():
            assert [env.store.presence(u) for u in (7, oid, "s")] == [ON] * 3
            assert env.store.presence(8) == OFF and env.store.presence(9) == OFF
            assert 9 not in env.daemon.engine
            assert env.store.calls["reconcile_strays"] == 2  # users, sessions

    run(scenario)


def test_a_sessions_change_during_the_walk_is_not_overwritten_by_the_older_read() -> None:
    async def scenario(env: Env) -> None:
        env.store.add_user("u1")
        env.store.connect("u1", "c1", None, env.now())
        async with env.running():
            assert env.store.presence("u1") == ON
            # The cursors read u1 connected, and their answer comes 5 s later: in the
            # meantime u1 disconnects, and the feed's newer read writes u1 offline.
            env.late["next_batch"] = 5.0
            written: list[Transition] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(env.daemon.reconciler.reconcile, "test")  # type: ignore[union-attr]
                await env.after(1.0)
                env.store.disconnect("c1")
                await env.after(1.0)
                assert env.store.presence("u1") == OFF
                writes_before = len(env.store.writes)
                written = list(env.transitions)
            # The cursor read u1 connected, but began before the feed's read: never taken.
            assert env.store.presence("u1") == OFF
            assert len(env.store.writes) == writes_before
            assert env.transitions == written

    run(scenario)


def test_a_late_batch_of_a_long_cursor_is_as_old_as_the_cursor() -> None:
    async def scenario(env: Env) -> None:
        now = env.now()
        last = f"u{SCAN_BATCH:05d}"  # in the users cursor's second batch
        for n in range(SCAN_BATCH + 1):
            env.store.add_user(f"u{n:05d}")
            env.store.connect(f"u{n:05d}", f"c{n}", None, now)
        async with env.running():
            assert env.store.presence(last) == ON
            # Each batch answers 2 s after it is asked for; the cursor (as the emulator's)
            # read every document when its first batch was asked for. u-last disconnects
            # while the first batch is under way and the feed writes it offline: the
            # second batch, asked for later, holds u-last connected still.
            env.late["next_batch"] = 2.0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(env.daemon.reconciler.reconcile, "test")  # type: ignore[union-attr]
                await env.after(0.5)
                env.store.disconnect(f"c{SCAN_BATCH}")
                await env.after(1.0)
                assert env.store.presence(last) == OFF
                writes_before = len(env.store.writes)
            assert env.store.presence(last) == OFF
            assert len(env.store.writes) == writes_before
            assert cursors(env, "users")[-1].batches == 3  # two, then the end

    run(scenario)


def test_a_write_confirmed_during_the_cursor_read_is_not_planned_again() -> None:
    async def scenario(env: Env) -> None:
        env.store.add_user("u1")
        env.store.connect("u1", "c1", None, env.now())
        async with env.running():
            assert env.store.presence("u1") == ON
            # Every cursor batch answers 3 s after it read, every sessions load 1 s after.
            env.late.update(next_batch=3.0, load_sessions=1.0)
            t0 = env.clock.monotonic()
            env.store.disconnect("c1")  # the feed's read of u1 starts now, answers at 1 s
            await env.after(0.1)
            # The users cursor (numbered after the feed's read) reads u1 stored online at
            # 0.1 s, answering at 3.1 s; the feed's write of offline lands at 1 s, while
            # that read is under way. The cursor's "online" is older than that write: the
            # writer replaces it with the pair its write confirmed, and nothing is planned
            # again.
            await env.daemon.reconciler.reconcile("test")  # type: ignore[union-attr]
            assert env.clock.monotonic() - t0 > 3.0
            assert env.store.presence("u1") == OFF
            assert [w.status for w in env.store.writes if w.user_id == "u1"] == [
                "online", "offline"
            ]
            offline = [t for t in env.transitions if t.current.status.value == "offline"]
            assert len(offline) == 1

    run(scenario)


def test_a_cursor_failing_midway_resumes_after_its_last_id_and_batches_are_pipelined() -> None:
    users = 3 * SCAN_BATCH + 7

    async def scenario(env: Env) -> None:
        now = env.now()
        for n in range(users):
            uid = f"u{n:05d}"
            env.store.add_user(uid)
            env.store.connect(uid, f"c{n}", None, now)
        async with env.running():
            assert all(env.store.presence(f"u{n:05d}") == ON for n in range(users))
            for doc in env.store.users.values():  # stored offline again: all to write
                doc["status"] = doc["statusConnection"] = "offline"
            loaded: Counter[Any] = Counter()
            count_loads(env, loaded)
            env.store.cursors.clear()
            # The sessions cursor's second batch fails, then the first batch of the two
            # cursors opened after it.
            served = Counter[str]()

            def flaky(cursor: MemoryCursor) -> None:
                served[cursor.source] += 1
                if cursor.source == "sessions" and served["sessions"] in (2, 3, 4):
                    raise AutoReconnect("timed out")

            env.store.before_batch = flaky
            # Each write batch takes 1 s: one after another, the 31 batches would take
            # 31 s; MAX_CONCURRENT_SYNC (10) workers take 4.
            env.delays.update(write_statuses=1.0)
            started = env.clock.monotonic()
            checked = await env.daemon.reconciler.reconcile("test")  # type: ignore[union-attr]
            elapsed = env.clock.monotonic() - started
            assert checked == users
            assert set(loaded) == set(env.store.users) and set(loaded.values()) == {1}
            assert all(env.store.presence(f"u{n:05d}") == ON for n in range(users))
            # Never started over: resumed after the last id received, each time.
            first_last = f"u{SCAN_BATCH - 1:05d}"
            assert [c.after for c in cursors(env, "sessions")] == [None] + [first_last] * 3
            assert [c.after for c in cursors(env, "users")] == [None]
            assert all(c.closed for c in env.store.cursors)
            # The failing cursor's backoff (0.7 s) overlaps the batches of the first users.
            assert elapsed <= 6.0, elapsed
            assert env.metric("presenced_mongodb_errors_total", component="reconcile") == 3
            writer = env.daemon.writer
            assert writer is not None and not writer._open_reads  # every read closed

    run(scenario)


def test_a_cursor_failing_on_its_first_batch_is_reopened_from_the_start_alone() -> None:
    async def scenario(env: Env) -> None:
        now = env.now()
        for n in range(2 * BATCH):
            uid = f"u{n:05d}"
            env.store.add_user(uid)
            env.store.connect(uid, f"c{n}", None, now)
        env.store.fail("next_batch:users", *[AutoReconnect("timed out")] * 4)
        async with env.running():
            assert all(env.store.presence(f"u{n:05d}") == ON for n in range(2 * BATCH))
            assert [c.after for c in cursors(env, "users")] == [None] * 5
            assert [c.after for c in cursors(env, "sessions")] == [None]
            assert env.metric("presenced_mongodb_errors_total", component="reconcile") == 4

    run(scenario)


def test_a_failed_write_batch_goes_to_the_retry_set_alone() -> None:
    async def scenario(env: Env) -> None:
        now = env.now()
        for n in range(3 * BATCH):
            uid = f"u{n:05d}"
            env.store.add_user(uid)
            env.store.connect(uid, f"c{n}", None, now)
        env.store.fail("write_statuses", AutoReconnect("timed out"))
        async with env.running():
            writer = env.daemon.writer
            assert writer is not None
            assert writer.retry_pending == BATCH
            online = sum(env.store.presence(f"u{n:05d}") == ON for n in range(3 * BATCH))
            assert online == 2 * BATCH
            await writer.retry()
            assert all(env.store.presence(f"u{n:05d}") == ON for n in range(3 * BATCH))

    run(scenario)


def test_malformed_documents_on_a_page_are_refused_and_counted_not_fatal() -> None:
    async def scenario(env: Env) -> None:
        now = env.now()
        env.store.add_user("good")
        env.store.connect("good", "c1", None, now)
        env.store.add_user("bad-connections")
        env.store.set_connections("bad-connections", ["not a connection", 7])
        env.store.add_user("bad-user", status="online")
        env.store.users["bad-user"]["active"] = "yes"
        env.store.users["bad-user"]["statusDefault"] = 42
        async with env.running():
            assert env.store.presence("good") == ON
            assert env.store.presence("bad-user") == OFF  # no connections: offline
            assert env.lines("WARNING", "usersSessions document malformed _id='bad-connections'")
            assert env.lines("WARNING", "users document malformed _id='bad-user'")
            counted = sum(
                env.metric("presenced_malformed_documents_total", reason=reason) or 0
                for reason in _reasons(env)
            )
            assert counted >= 2

    run(scenario)


def test_a_collation_makes_the_walk_start_again_in_binary_order() -> None:
    """A default collation (here case-insensitive) orders "a" before "B"; code point
    order puts "B" first. The merge would pair users wrongly: the pass stops, and walks
    again with cursors sorted under the simple collation, checking every user right."""

    async def scenario(env: Env) -> None:
        now = env.now()
        ids = ("B", "a", "c")
        for uid in ids:
            env.store.add_user(uid)
            env.store.connect(uid, f"c-{uid}", None, now)
        async with env.running():
            env.store.collation = str.casefold
            env.store.cursors.clear()
            for uid in ids:
                env.store.users[uid]["status"] = "offline"  # wrong: each must be rewritten
            checked = await env.daemon.reconciler.reconcile("test")  # type: ignore[union-attr]
            assert checked == 3
            assert [env.store.presence(u) for u in ids] == [ON] * 3
            assert [c.simple_order for c in env.store.cursors[-2:]] == [True, True]
            assert not env.store.cursors[0].simple_order
            assert env.lines("WARNING", "out of code point order")
            assert not env.lines("ERROR", "given up")
            assert all(w.status == "online" for w in env.store.writes)

    run(scenario)


def test_ids_out_of_order_even_in_binary_order_give_the_pass_up_without_a_crash() -> None:
    async def scenario(env: Env) -> None:
        now = env.now()
        for uid in ("a", "b", "c"):
            env.store.add_user(uid)
            env.store.connect(uid, f"c-{uid}", None, now)
        async with env.running():
            original = env.store._reconcile_docs

            def reversed_docs(source: ReconcileSource, ids: list[Any]) -> list[Any]:
                return original(source, ids[::-1])  # whatever the collation asked for

            env.store._reconcile_docs = reversed_docs  # type: ignore[method-assign]
            writes_before = len(env.store.writes)
            checked = await env.daemon.reconciler.reconcile("test")  # type: ignore[union-attr]
            assert checked == 0
            assert all(w.status == "online" for w in env.store.writes[writes_before:])
            assert env.lines("ERROR", "reconciliation (test) given up")
            assert env.metric("presenced_mongodb_errors_total", component="reconcile_order") == 1
            env.store._reconcile_docs = original  # type: ignore[method-assign]
            assert [env.store.presence(u) for u in ("a", "b", "c")] == [ON] * 3

    run(scenario)


def test_a_reconciliation_cancelled_midway_leaves_no_read_or_cursor_open() -> None:
    async def scenario(env: Env) -> None:
        now = env.now()
        for n in range(2 * SCAN_BATCH):
            uid = f"u{n:05d}"
            env.store.add_user(uid)
            env.store.connect(uid, f"c{n}", None, now)
        async with env.running():
            writer = env.daemon.writer
            assert writer is not None
            env.store.cursors.clear()
            env.delays["next_batch"] = 1.0
            with trio.move_on_after(1.5):
                await env.daemon.reconciler.reconcile("test")  # type: ignore[union-attr]
            assert not writer._open_reads
            assert env.store.cursors and all(c.closed for c in env.store.cursors)
            # The second batch of each was cancelled while under way (before it read).
            assert [c.batches for c in env.store.cursors] == [1, 1]
            del env.delays["next_batch"]

    run(scenario)


def _reasons(env: Env) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    text = env.daemon.health.metrics_text().decode()
    return {
        sample.labels["reason"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "presenced_malformed_documents_total"
    }
