"""Reconciliation's one-read walk and its pipelined batches, in the whole daemon under
MockClock (``tests.unit.daemon_double``): which documents are read, how often, and that a
reconcile read never overrides a newer one."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

import trio
from pymongo.errors import AutoReconnect

from presenced.engine import Reason, Transition
from presenced.reconcile import PAGE
from presenced.store import ReconcileSource
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


def test_each_user_is_read_once_the_scanned_document_is_not_read_again() -> None:
    async def scenario(env: Env) -> None:
        now = env.now()
        for uid in ("c1", "c2", "both"):  # connected, stored offline (and "both" online)
            env.store.add_user(uid, status="online" if uid == "both" else "offline")
            env.store.connect(uid, f"conn-{uid}", None, now)
        env.store.add_user("stuck", status="online")  # stored online, no sessions document
        env.store.add_user("stuck-away", status="away")
        env.store.sessions["stuck-away"] = {"_id": "stuck-away", "connections": []}
        env.store.add_user("offline")  # nothing to look at
        users_reads: list[list[Any]] = []
        sessions_reads: list[list[Any]] = []
        record(env, "load_users", users_reads)
        record(env, "load_sessions", sessions_reads)
        async with env.running():
            assert [env.store.presence(u) for u in ("c1", "c2", "both")] == [ON] * 3
            assert env.store.presence("stuck") == OFF
            assert env.store.presence("stuck-away") == OFF
            assert env.store.presence("offline") == OFF
            # The scans held the sessions of the connected and the users stored online: by
            # _id, only the users stored offline but connected, and the sessions of the
            # users stored online without connections ("both" was in both scans).
            assert sorted(u for ids in users_reads for u in ids) == ["c1", "c2"]
            assert sorted(u for ids in sessions_reads for u in ids) == ["stuck", "stuck-away"]

    run(scenario)


def test_a_sessions_change_after_the_page_scan_is_not_overwritten_by_the_older_read() -> None:
    async def scenario(env: Env) -> None:
        env.store.add_user("u1")
        env.store.connect("u1", "c1", None, env.now())
        async with env.running():
            assert env.store.presence("u1") == ON
            # The next page scan reads u1 connected, and its answer comes 5 s later: in the
            # meantime u1 disconnects, and the feed's newer read writes u1 offline.
            env.late["reconcile_page"] = 5.0
            written: list[Transition] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(env.daemon.reconciler.reconcile, "test")  # type: ignore[union-attr]
                await env.after(1.0)
                env.store.disconnect("c1")
                await env.after(1.0)
                assert env.store.presence("u1") == OFF
                writes_before = len(env.store.writes)
                written = list(env.transitions)
            # The page read u1 connected, but began before the feed's read: never taken.
            assert env.store.presence("u1") == OFF
            assert len(env.store.writes) == writes_before
            assert env.transitions == written

    run(scenario)


def test_a_write_confirmed_during_the_page_read_is_not_planned_again() -> None:
    async def scenario(env: Env) -> None:
        env.store.add_user("u1")
        env.store.connect("u1", "c1", None, env.now())
        async with env.running():
            assert env.store.presence("u1") == ON
            # Every page scan answers 3 s after it read, every sessions read 4 s after.
            env.late.update(reconcile_page=3.0, load_sessions=4.0)
            t0 = env.clock.monotonic()
            env.store.disconnect("c1")  # the feed's read of u1 starts now, answers at 4 s
            await env.after(0.1)
            # The users page scan reads u1 stored online at 3 s (answering at 6 s); the
            # feed's write of offline lands at 4 s, while that page is under way. The
            # page's "online" is older than that write: the writer replaces it with the
            # pair its write confirmed, and nothing is planned again.
            await env.daemon.reconciler.reconcile("test")  # type: ignore[union-attr]
            assert env.clock.monotonic() - t0 > 6.0
            assert env.store.presence("u1") == OFF
            assert [w.status for w in env.store.writes if w.user_id == "u1"] == [
                "online", "offline"
            ]
            offline = [t for t in env.transitions if t.current.status.value == "offline"]
            assert len(offline) == 1

    run(scenario)


def test_pages_and_batches_are_pipelined_and_a_failing_page_still_checks_everyone_once() -> None:
    users = 3 * PAGE + 7

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
            writer = env.daemon.writer
            assert writer is not None
            original_load = writer.load_documents

            async def counting(
                seq: int, chunk: Sequence[Any], users: dict[Any, Any],
                sessions: dict[Any, Any], reason: Reason,
            ) -> list[Transition]:
                loaded.update(chunk)
                return await original_load(seq, chunk, users, sessions, reason)

            writer.load_documents = counting  # type: ignore[method-assign]
            second_page_after = f"u{PAGE - 1:05d}"
            failures = [AutoReconnect("timed out")] * 3
            original_page = env.store.reconcile_page

            def flaky(
                source: ReconcileSource, after: str | None, limit: int,
                until: str | None = None,
            ) -> list[Any]:
                if source == "sessions" and after == second_page_after and failures:
                    failures.pop()
                    raise AutoReconnect("timed out")
                return original_page(source, after, limit, until)

            env.store.reconcile_page = flaky  # type: ignore[method-assign]
            # Each batch's read by _id takes 1 s: one after another, the 31 batches would
            # take 31 s; MAX_CONCURRENT_SYNC (10) workers take 4.
            env.delays.update(load_users=1.0)
            started = env.clock.monotonic()
            checked = await env.daemon.reconciler.reconcile("test")  # type: ignore[union-attr]
            elapsed = env.clock.monotonic() - started
            assert checked == users
            assert set(loaded) == set(env.store.users) and set(loaded.values()) == {1}
            assert all(env.store.presence(f"u{n:05d}") == ON for n in range(users))
            # The failing scan's backoff (0.7 s) overlaps the batches of the first range.
            assert elapsed <= 5.0, elapsed
            assert env.metric("presenced_mongodb_errors_total", component="reconcile") == 3
            assert not writer._open_reads  # every page's read was closed

    run(scenario)


def test_a_range_with_more_users_than_a_page_is_cut_and_every_user_checked_once() -> None:
    count = 2 * PAGE + 3

    async def scenario(env: Env) -> None:
        now = env.now()
        for n in range(count):  # stored online; one in three connected (and one away)
            uid = f"u{n:05d}"
            env.store.add_user(uid, status="online")
            if n % 3 == 0:
                env.store.connect(uid, f"c{n}", None, now, "away" if n == 3 else "online")
        loaded: Counter[Any] = Counter()
        record_all: list[list[Any]] = []
        record(env, "load_sessions", record_all)
        async with env.running():
            writer = env.daemon.writer
            assert writer is not None
            original_load = writer.load_documents

            async def counting(
                seq: int, chunk: Sequence[Any], users: dict[Any, Any],
                sessions: dict[Any, Any], reason: Reason,
            ) -> list[Transition]:
                loaded.update(chunk)
                return await original_load(seq, chunk, users, sessions, reason)

            writer.load_documents = counting  # type: ignore[method-assign]

            def converged() -> None:
                for n in range(count):
                    expected = ON if n % 3 == 0 and n != 3 else OFF
                    if n == 3:
                        expected = ("away", "away")
                    assert env.store.presence(f"u{n:05d}") == expected, n

            converged()
            for doc in env.store.users.values():  # stored online again, connected or not
                doc["status"] = doc["statusConnection"] = "online"
            record_all.clear()
            checked = await env.daemon.reconciler.reconcile("test")  # type: ignore[union-attr]
            assert checked == len(loaded) == count and set(loaded.values()) == {1}
            converged()
            # The sessions scan is never a full page here: each range is cut by the users
            # page; a connected user is never read by _id, a user without connections is.
            read_by_id = [u for ids in record_all for u in ids]
            assert all(int(u[1:]) % 3 for u in read_by_id)
            users_pages = [after for source, after in env.store.pages if source == "users"]
            assert len(users_pages) >= 2 * 3  # two passes (start-up, test), 3 ranges each

    run(scenario)


def test_a_failing_batch_is_retried_alone_while_the_others_go_on() -> None:
    async def scenario(env: Env) -> None:
        now = env.now()
        for n in range(4 * BATCH):
            uid = f"u{n:05d}"
            env.store.add_user(uid)
            env.store.connect(uid, f"c{n}", None, now)
        reads: list[list[Any]] = []
        failures = [AutoReconnect("timed out")] * 4
        original = env.store.load_users

        def flaky(user_ids: Collection[Any]) -> dict[Any, Any]:
            ids = list(user_ids)
            reads.append(ids)
            if ids[0] == f"u{2 * BATCH:05d}" and failures:
                failures.pop()
                raise AutoReconnect("timed out")
            return dict(original(ids))

        env.store.load_users = flaky  # type: ignore[method-assign]
        async with env.running():
            assert all(env.store.presence(f"u{n:05d}") == ON for n in range(4 * BATCH))
            firsts = Counter(ids[0] for ids in reads)
            assert firsts == {"u00000": 1, f"u{BATCH:05d}": 1, f"u{2 * BATCH:05d}": 5,
                              f"u{3 * BATCH:05d}": 1}
            assert env.metric("presenced_mongodb_errors_total", component="reconcile") == 4

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


def test_a_reconciliation_cancelled_midway_leaves_no_read_open() -> None:
    async def scenario(env: Env) -> None:
        now = env.now()
        for n in range(2 * PAGE):
            uid = f"u{n:05d}"
            env.store.add_user(uid)
            env.store.connect(uid, f"c{n}", None, now)
        async with env.running():
            writer = env.daemon.writer
            assert writer is not None
            env.delays["load_users"] = 1.0
            with trio.move_on_after(1.5):
                await env.daemon.reconciler.reconcile("test")  # type: ignore[union-attr]
            assert not writer._open_reads
            del env.delays["load_users"]

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
