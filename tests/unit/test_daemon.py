"""The daemon's timers, retries and signals, in one trio run under MockClock.

Each test runs the whole daemon (run loop, writer, reconciler, housekeeping, health) on the
in-memory store and feed of ``presenced.testing.memory``, so every timer is driven by the
mock clock to the millisecond: stale expiry, instance timeout, housekeeping, backoff,
outage logging. The end-to-end suite (tests/integration/test_daemon*.py) runs the real
process against MongoDB in real time.
"""

from __future__ import annotations

import math

from pymongo.errors import AutoReconnect, OperationFailure, ServerSelectionTimeoutError

from presenced.daemon import SHUTDOWN_GRACE_S
from presenced.engine import Reason
from presenced.feed.keys import UserChanged
from presenced.presence import ABSENT, from_ms
from presenced.reconcile import SCAN_BATCH
from presenced.testing.memory import MemoryCursor

from .daemon_double import MONGO_URL, Env, run

ON = ("online", "online")
OFF = ("offline", "offline")


# --- timers, to the millisecond --------------------------------------------------------------


def test_a_connection_without_heartbeat_counts_until_cache_ttl_and_not_one_ms_more() -> None:
    async def scenario(env: Env) -> None:
        t0 = env.now()
        env.store.add_user("u1")
        env.store.connect("u1", "c1", None, t0)
        async with env.running():
            assert env.store.presence("u1") == ON
            await env.at(t0 + env.ttl_ms)
            assert env.store.presence("u1") == ON
            await env.at(t0 + env.ttl_ms + 1)
            assert env.store.presence("u1") == OFF
            assert [(t.reason, t.current.status.value) for t in env.transitions][-1] == (
                Reason.STALE, "offline",
            )

    run(scenario)


def test_a_heartbeat_moves_the_expiry_to_cache_ttl_after_it() -> None:
    async def scenario(env: Env) -> None:
        t0 = env.now()
        env.store.add_user("u1")
        env.store.connect("u1", "c1", None, t0)
        async with env.running():
            beat = t0 + 40_000
            await env.at(beat)
            env.store.heartbeat("u1", "c1", beat)
            await env.at(t0 + env.ttl_ms + 1)
            assert env.store.presence("u1") == ON
            await env.at(beat + env.ttl_ms)
            assert env.store.presence("u1") == ON
            await env.at(beat + env.ttl_ms + 1)
            assert env.store.presence("u1") == OFF

    run(scenario)


def test_users_of_an_instance_go_offline_one_ms_after_its_heartbeat_is_too_old() -> None:
    async def scenario(env: Env) -> None:
        t0 = env.now()
        env.store.instance_heartbeat("i1", t0)
        env.store.add_user("u1")
        env.store.connect("u1", "c1", "i1", t0)
        async with env.running():
            # The user's own connection keeps heartbeating; only the instance fell silent.
            env.store.heartbeat("u1", "c1", t0 + 20_000)
            await env.at(t0 + env.timeout_ms)
            assert env.store.presence("u1") == ON
            await env.at(t0 + env.timeout_ms + 1)
            assert env.store.presence("u1") == OFF

    run(scenario)


def test_an_instance_whose_document_goes_takes_its_users_offline_and_its_connections_reaped(
) -> None:
    async def scenario(env: Env) -> None:
        t0 = env.now()
        env.store.instance_heartbeat("gone", t0)
        env.store.instance_heartbeat("alive", t0)
        env.store.add_user("u1")
        env.store.add_user("u2")
        env.store.connect("u1", "c1", "gone", t0)
        env.store.connect("u2", "c2", "gone", t0)
        env.store.connect("u2", "c3", "alive", t0)
        async with env.running():
            env.store.remove_instance("gone")  # what the TTL index does to a crashed one
            await env.settle()  # the feed's key: no housekeeping pass needed
            assert env.store.presence("u1") == OFF
            assert env.store.presence("u2") == ON
            await env.after(env.settings.sync_interval_seconds)
            assert env.store.connection_ids("u1") == []
            assert env.store.connection_ids("u2") == ["c3"]

    run(scenario)


def test_housekeeping_reaps_a_stale_connection_on_its_first_pass_after_expiry() -> None:
    async def scenario(env: Env) -> None:
        t0 = env.now()
        env.store.add_user("u1")
        env.store.connect("u1", "stale", None, t0)
        async with env.running():
            await env.at(t0 + env.ttl_ms + 1)
            assert env.store.connection_ids("u1") == ["stale"]  # no pass since it expired
            await env.after(env.settings.sync_interval_seconds)
            assert env.store.connection_ids("u1") == []
            assert env.metric("presenced_reaped_connections_total") == 1

    run(scenario)


# --- defect: the reaper's sweep could pull a live connection ---------------------------------


def test_the_reaper_sweep_never_pulls_a_live_connection_sharing_an_id_with_a_dead_one() -> None:
    async def scenario(env: Env) -> None:
        t0 = env.now()
        env.store.instance_heartbeat("live", t0)
        env.store.add_user("u1")
        async with env.running():
            now = env.now()
            # c1 live (10 s old), a second c1 on a dead instance (5 s old), c2 stale.
            env.store.connect("u1", "c1", "live", now - 10_000)
            env.store.connect("u1", "c1", "dead", now - 5_000)
            env.store.connect("u1", "c2", "live", now - env.ttl_ms - 1)
            await env.settle()
            # The sweep path: the user is not held in memory.
            env.daemon.engine.forget("u1")
            assert env.daemon.housekeeping is not None
            await env.daemon.housekeeping.reap()
            assert env.store.connection_ids("u1") == ["c1", "c1"]

    run(scenario)


# --- defect: a stored status that is not a string was never corrected ------------------------


def test_a_stored_status_of_any_type_is_corrected_by_one_write() -> None:
    for stored in (17, 2.5, True, None, ABSENT, ["online"]):
        async def scenario(env: Env, stored: object = stored) -> None:
            env.store.add_user("u1", status=stored, status_connection=stored)
            env.store.add_user("u2", status="offline", status_connection=stored)
            env.store.connect("u1", "c1", None, env.now())
            env.store.connect("u2", "c2", None, env.now())
            async with env.running():
                assert env.store.presence("u1") == ON, stored
                assert env.store.presence("u2") == ON, stored
                assert env.daemon.counts["conflicts"] == 0, stored

        run(scenario)


# --- defect: instances were parsed twice and counted per re-read ----------------------------


def test_a_bad_instance_document_counts_once_and_is_logged_every_10_minutes() -> None:
    async def scenario(env: Env) -> None:
        env.store.put_instance({"_id": "i-bad", "_updatedAt": "yesterday"})
        env.store.instance_heartbeat("i-good", env.now())
        async with env.running():
            for _ in range(5):  # five housekeeping passes re-read the same bad document
                await env.after(env.settings.sync_interval_seconds)
            malformed = env.metric(
                "presenced_malformed_documents_total", reason="instance_bad_updated_at"
            )
            assert malformed == 1
            warnings = env.lines("WARNING", "i-bad")
            assert len(warnings) == 1
            assert "instances" in warnings[0] and "instance_bad_updated_at" in warnings[0]
            assert "yesterday" not in warnings[0]  # the id, never the content
            await env.after(600)
            assert len(env.lines("WARNING", "i-bad")) == 2
            assert env.metric(
                "presenced_malformed_documents_total", reason="instance_bad_updated_at"
            ) == 1
            # New bad content in the same document counts again.
            env.store.put_instance({"_id": "i-bad", "_updatedAt": 12})
            await env.after(env.settings.sync_interval_seconds)
            assert env.metric(
                "presenced_malformed_documents_total", reason="instance_bad_updated_at"
            ) == 2

    run(scenario)


def test_a_bad_connection_entry_counts_once_however_often_its_user_is_reread() -> None:
    async def scenario(env: Env) -> None:
        env.store.add_user("u1")
        async with env.running():
            for beat in range(4):
                at = from_ms(env.now())  # both entries heartbeat; the bad one stays bad
                env.store.set_connections("u1", [
                    {"id": "ok", "status": "online", "_updatedAt": at},
                    {"id": "c9", "status": "dancing", "_updatedAt": at},
                ])
                await env.after(1 + beat)
            assert env.store.presence("u1") == ON
            assert env.metric(
                "presenced_malformed_documents_total", reason="connection_bad_status"
            ) == 1

    run(scenario)


# --- defect: operator signals that misled ----------------------------------------------------


def test_feed_lag_is_nan_while_mongodb_was_never_reached_and_ready_is_computed_on_scrape() -> None:
    async def scenario(env: Env) -> None:
        env.store.fail("ping", *[AutoReconnect("connection refused")] * 50)
        async with env.running(wait_ready=False):
            await env.after(3)
            lag = env.metric("presenced_feed_lag_seconds")
            assert lag is not None and math.isnan(lag)
            assert env.metric("presenced_ready") == 0
            assert env.daemon.health.readiness()[1]["lag_seconds"] is None
            await env.until(lambda: env.daemon.health.readiness()[0], within_s=600)
            # Scraped without /ready ever being polled in between.
            assert env.metric("presenced_ready") == 1
            lag = env.metric("presenced_feed_lag_seconds")
            assert lag is not None and 0 <= lag < 5

    run(scenario)


def test_an_authentication_failure_is_an_error_on_every_attempt_and_ready_says_so() -> None:
    async def scenario(env: Env) -> None:
        failure = OperationFailure("Authentication failed.", code=18,
                                   details={"ok": 0, "errmsg": "Authentication failed.",
                                            "code": 18, "codeName": "AuthenticationFailed"})
        env.store.fail("ping", *[failure] * 6)
        async with env.running(wait_ready=False):
            await env.until(lambda: env.store.calls["ping"] >= 6)
            ok, body = env.daemon.health.readiness()
            assert not ok and body["reason"].startswith("authentication failed")
            errors = env.lines("ERROR", "credentials")
            assert len(errors) == 6
            assert "MONGO_URL" in errors[0] and "s3cret-pass" not in errors[0]
            await env.until(lambda: env.daemon.health.readiness()[0])

    run(scenario)


def test_an_outage_is_logged_when_it_starts_at_most_once_a_minute_with_its_length_and_when_it_ends() -> None:  # noqa: E501
    async def scenario(env: Env) -> None:
        topology = ServerSelectionTimeoutError(
            "127.0.0.1:1: [Errno 111] Connection refused (configured timeouts: socketTimeoutMS:"
            " 30000.0ms), Timeout: 5.0s, Topology Description: <TopologyDescription id: 1,"
            " topology_type: ReplicaSetNoPrimary, servers: [<ServerDescription ...>]>"
        )
        env.store.fail("ping", *[topology] * 200)  # about 200 tries 5 s apart: ~16 minutes
        async with env.running(wait_ready=False):
            await env.after(150)
            warnings = env.lines("WARNING", "MongoDB")
            assert warnings[0].startswith("MongoDB unavailable (connect)")
            still = [w for w in warnings if "still unavailable" in w]
            assert 1 <= len(still) <= 2
            assert "after 6" in still[0] or "after 5" in still[0]
            reason = env.daemon.health.readiness()[1]["reason"]
            for text in (*warnings, reason):
                assert "Topology Description" not in text and "\n" not in text
            assert "Connection refused" in reason
            await env.until(lambda: env.daemon.health.readiness()[0], within_s=3600)
            assert len(env.lines("INFO", "MongoDB available again after")) == 1

    run(scenario)


# --- defect: start-up on a large database -----------------------------------------------------


def test_a_failed_reconcile_cursor_resumes_after_its_last_id_and_progress_is_logged() -> None:
    async def scenario(env: Env) -> None:
        now = env.now()
        for n in range(2 * SCAN_BATCH + 1):
            uid = f"u{n:05d}"
            env.store.add_user(uid)
            env.store.connect(uid, f"c{n}", None, now)
        first_batch_last = f"u{SCAN_BATCH - 1:05d}"
        # The sessions cursor's second batch times out, then the first batch of each
        # cursor opened after it: six in a row (6.3 s of backoff in all).
        served = [0]

        def flaky(cursor: MemoryCursor) -> None:
            if cursor.source == "sessions":
                served[0] += 1
                if 2 <= served[0] <= 7:
                    raise AutoReconnect("timed out")

        env.store.before_batch = flaky
        async with env.running():
            assert env.store.presence(f"u{2 * SCAN_BATCH:05d}") == ON
            afters = [c.after for c in env.store.cursors if c.source == "sessions"]
            # Never started over: the first batch was read once, then each new cursor
            # after its last id.
            assert afters == [None] + [first_batch_last] * 6
            assert env.metric("presenced_mongodb_errors_total", component="reconcile") == 6
            progress = env.lines("INFO", "reconciliation (startup): ")
            assert progress and "users checked" in progress[0]
            assert "documents read" in progress[0]

    run(scenario)


# --- the feed ----------------------------------------------------------------------------------


def test_a_lost_position_found_while_recovering_the_feed_triggers_a_reconciliation() -> None:
    async def scenario(env: Env) -> None:
        env.store.add_user("u1")
        async with env.running():
            position = env.feed.position()
            env.feed.fail_polls(AutoReconnect("connection reset"))
            env.feed.lose_history(break_stream=False)
            env.store.users["u1"]["status"] = "away"  # a change the lost history held
            await env.after(2)
            assert env.feed.opened[-2:] == [position, None]
            assert env.metric("presenced_reconciliations_total", cause="history_lost") == 1
            assert env.store.presence("u1") == ("offline", "offline")

    run(scenario)


def test_a_stop_saves_the_position_of_the_last_applied_batch() -> None:
    async def scenario(env: Env) -> None:
        env.store.add_user("u1")
        async with env.running():
            env.store.connect("u1", "c1", None, env.now())
            await env.settle()
            assert env.store.presence("u1") == ON
        name = env.daemon.feed_name
        assert env.store.checkpoints[name]["position"] == env.feed.position()

    run(scenario)


def test_shutdown_waits_for_the_checkpoint_at_most_the_grace_period() -> None:
    async def scenario(env: Env) -> None:
        env.store.add_user("u1")
        async with env.running():
            env.store.connect("u1", "c1", None, env.now())
            await env.settle()
            env.delays["save_checkpoint"] = 3600.0  # MongoDB stopped answering
            stopped_at = env.clock.monotonic()
        # Left the block: run() returned after stop().
        assert env.clock.monotonic() - stopped_at <= SHUTDOWN_GRACE_S + 0.01
        assert env.daemon.feed_name not in env.store.checkpoints

    run(scenario)


def test_settings_secrets_never_reach_the_logs() -> None:
    async def scenario(env: Env) -> None:
        env.store.fail("ping", AutoReconnect(f"cannot reach {MONGO_URL}"))
        async with env.running():
            pass

    env = run(scenario)
    assert all("s3cret-pass" not in message for _, message in env.logs)
    assert env.lines("WARNING", "****")


def test_the_feeds_echo_of_our_own_status_write_is_not_read_again() -> None:
    async def scenario(env: Env) -> None:
        env.store.add_user("u1")
        async with env.running():
            before = env.store.calls["load_users"]
            env.store.connect("u1", "c1", None, env.now())
            await env.until(lambda: env.store.presence("u1") == ON)
            await env.after(2)
            # One read for the connection; none for the status write coming back.
            assert env.store.calls["load_users"] - before == 1
            assert env.metric("presenced_feed_keys_total", kind="user_own_write") == 1
            # Someone else's write of another pair is read (and corrected).
            env.store.users["u1"].update(status="away", statusConnection="away")
            env.store.feed.emit(UserChanged("u1", written=("away", "away")))
            await env.until(lambda: env.store.presence("u1") == ON)
            assert env.store.calls["load_users"] - before == 2

    run(scenario)
