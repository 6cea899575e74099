"""The feed's natural batching, in the whole daemon under MockClock (see daemon_double).

The reader gathers keys while the applier works; the applier, whenever free, takes all of
them in one load. ``env.delays["load_sessions"]`` makes a load take that long (every load
reads sessions; a slow MongoDB), so keys can arrive while it is in flight.
"""

from __future__ import annotations

import pytest

from presenced.daemon import Pending
from presenced.feed.keys import InstancesChanged, ResyncAll, SessionsChanged, UserChanged
from presenced.writer import BATCH

from .daemon_double import Env, run

ON = ("online", "online")
OFF = ("offline", "offline")


def _users(env: Env, n: int) -> list[str]:
    ids = [f"u{i}" for i in range(n)]
    for uid in ids:
        env.store.add_user(uid)
    return ids


async def _saved_position(env: Env) -> object:
    assert env.daemon.housekeeping is not None
    await env.daemon.housekeeping.checkpoint()
    return env.store.checkpoints[env.daemon.feed_name]["position"]


def test_a_single_event_with_an_idle_applier_is_loaded_at_once() -> None:
    async def scenario(env: Env) -> None:
        _users(env, 1)
        async with env.running():
            await env.after(5)  # idle: the reader waits in its poll, the applier for keys
            t = env.now()
            before = env.store.calls["load_sessions"]
            env.store.connect("u0", "c1", None, t)
            await env.settle()  # no time passes: no window, no timer
            assert env.store.presence("u0") == ON
            assert env.now() == t
            assert env.store.calls["load_sessions"] - before == 1

    run(scenario)


def test_keys_arriving_while_a_load_is_in_flight_go_into_one_next_load() -> None:
    async def scenario(env: Env) -> None:
        ids = _users(env, 6)
        async with env.running():
            before = env.store.calls["load_sessions"]
            env.delays["load_sessions"] = 1.0
            env.store.connect("u0", "c0", None, env.now())
            # While u0's load is in flight, the others connect at different moments.
            for uid, gap in [("u1", 0.1), ("u2", 0.3), ("u3", 0.2), ("u4", 0.0), ("u5", 0.2)]:
                await env.after(gap)
                env.store.connect(uid, f"c{uid}", None, env.now())
            await env.until(lambda: all(env.store.presence(u) == ON for u in ids))
            await env.after(3)  # the echoes of our writes come back: no load for them
            # u0's load, then one for the five that came while it was in flight.
            assert env.store.calls["load_sessions"] - before == 2

    run(scenario)


def test_the_position_saved_covers_only_keys_applied() -> None:
    async def scenario(env: Env) -> None:
        _users(env, 2)
        async with env.running():
            env.daemon.read_on_keys = 1  # the reader reads on while the applier works
            env.delays["load_sessions"] = 1.0
            p0 = env.feed.position()
            env.store.connect("u0", "c0", None, env.now())
            await env.settle()  # u0's load is in flight
            p1 = env.feed.position()
            env.store.connect("u1", "c1", None, env.now())
            await env.settle()  # the reader has read u1's key: it waits, gathered
            p2 = env.feed.position()
            assert p0 < p1 < p2
            assert await _saved_position(env) == p0
            await env.after(1.0)  # u0 applied; u1's load is in flight
            assert env.store.presence("u0") == ON and env.store.presence("u1") != ON
            assert await _saved_position(env) == p1
            await env.until(lambda: env.store.presence("u1") == ON)
            await env.after(3)
            assert await _saved_position(env) == env.feed.position()

    run(scenario)


def test_the_reader_stops_polling_at_the_bound_until_the_applier_takes_the_keys() -> None:
    async def scenario(env: Env) -> None:
        ids = _users(env, 7)
        env.daemon.pending_users = 3  # read when the feed starts
        async with env.running():
            env.daemon.read_on_keys = 1
            env.delays["load_sessions"] = 5.0
            env.store.connect("u0", "c0", None, env.now())
            await env.settle()  # u0's load is in flight for 5 s
            for uid in ids[1:4]:
                env.store.connect(uid, f"c{uid}", None, env.now())
                await env.after(0.1)  # one poll each: 3 users gathered, the bound
            polls = env.feed.polls
            position = env.feed.position()
            for uid in ids[4:]:
                env.store.connect(uid, f"c{uid}", None, env.now())
            await env.after(3)
            assert env.feed.polls == polls  # no poll (not even an empty one) at the bound
            assert env.feed.position() == position
            del env.delays["load_sessions"]
            await env.until(lambda: all(env.store.presence(u) == ON for u in ids))

    run(scenario)


def test_a_load_of_several_batches_runs_them_side_by_side() -> None:
    async def scenario(env: Env) -> None:
        ids = _users(env, 2 * BATCH + 10)  # three chunks
        async with env.running():
            env.delays["load_sessions"] = 1.0
            t0 = env.clock.monotonic()
            for uid in ids:
                env.store.connect(uid, f"c{uid}", None, env.now())
            await env.until(lambda: all(env.store.presence(u) == ON for u in ids))
            # One read's time, not three.
            assert env.clock.monotonic() - t0 < 1.5

    run(scenario)


def test_pending_keeps_one_key_per_user_and_the_last_position() -> None:
    pending = Pending(limit=10)
    own = UserChanged("u1", written=("online", "online"))
    pending.add([own, SessionsChanged("u2"), InstancesChanged("i1")], 1)
    pending.add([SessionsChanged("u1"), UserChanged("u2", written=("away", "away"))], 2)
    pending.add([ResyncAll("drop"), InstancesChanged("i1"), ResyncAll("rename")], 3)
    keys, position = pending.take()
    # A sessions change stays, and keeps its user's latest echo beside it (the users
    # document is read too if the echo is not ours); the first resync.
    assert keys == [ResyncAll("drop"), InstancesChanged("i1"), own, SessionsChanged("u1"),
                    UserChanged("u2", written=("away", "away")), SessionsChanged("u2")]
    assert position == 3
    assert pending.keys == 0
    # An echo gives way to a later echo.
    pending.add([own], 4)
    pending.add([UserChanged("u1", written=("away", "away"))], 5)
    assert pending.take() == ([UserChanged("u1", written=("away", "away"))], 5)
    # A users change covers every key of its user, before or after it.
    pending.add([SessionsChanged("u1"), own, UserChanged("u1")], 6)
    pending.add([SessionsChanged("u1"), UserChanged("u1", written=("away", "away"))], 7)
    pending.add([UserChanged("u2"), SessionsChanged("u2"), own], 8)
    assert pending.take() == ([UserChanged("u1"), UserChanged("u2")], 8)
    # Sessions changes of a user are one key; the echo kept is the latest.
    pending.add([SessionsChanged("u1"), own, SessionsChanged("u1")], 9)
    pending.add([UserChanged("u1", written=("away", "away")), SessionsChanged("u1")], 10)
    assert pending.take() == (
        [UserChanged("u1", written=("away", "away")), SessionsChanged("u1")], 10
    )


def test_history_lost_while_keys_are_gathered_loses_nothing() -> None:
    async def scenario(env: Env) -> None:
        ids = _users(env, 3)
        async with env.running():
            env.daemon.read_on_keys = 1
            env.delays["load_sessions"] = 1.0
            p0 = env.feed.position()
            env.store.connect("u0", "c0", None, env.now())
            await env.settle()  # u0's load is in flight
            env.store.connect("u1", "c1", None, env.now())
            await env.settle()  # u1's key gathered
            env.store.connect("u2", "c2", None, env.now())
            env.feed.lose_history()  # u2's key is lost with the history
            await env.settle()  # the reader reopened the feed from now: a resync gathered
            assert env.feed.opened[-1] is None
            # The reopened feed's position covers keys not applied yet: not saved.
            assert await _saved_position(env) == p0
            await env.until(lambda: all(env.store.presence(u) == ON for u in ids))
            assert env.metric("presenced_reconciliations_total", cause="history_lost") == 1
            await env.after(3)
            assert await _saved_position(env) == env.feed.position()

    run(scenario)


# -- sessions-only loads: a cached user whose only key is a sessions change --------------
async def _held_online(env: Env, *ids: str) -> None:
    """Connect ``ids`` (one connection each) and wait until they are online and held."""
    for uid in ids:
        env.store.connect(uid, f"c-{uid}", None, env.now())
    await env.until(lambda: all(env.store.presence(u) == ON for u in ids))
    await env.after(3)  # the echoes come back
    assert all(uid in env.daemon.engine for uid in ids)


def test_a_held_users_sessions_change_reads_its_sessions_only() -> None:
    async def scenario(env: Env) -> None:
        _users(env, 2)
        async with env.running():
            await _held_online(env, "u0", "u1")
            users, sessions = env.store.calls["load_users"], env.store.calls["load_sessions"]
            transitions = len(env.transitions)
            env.store.disconnect("c-u0")
            await env.until(lambda: env.store.presence("u0") == OFF)
            env.store.connect("u0", "c2", None, env.now())
            await env.until(lambda: env.store.presence("u0") == ON)
            await env.after(3)
            assert env.store.calls["load_users"] == users  # the engine's fields were used
            assert env.store.calls["load_sessions"] - sessions == 2
            assert [(t.user_id, t.current.status.value) for t in env.transitions[transitions:]
                    ] == [("u0", "offline"), ("u0", "online")]
            assert env.daemon.counts["conflicts"] == 0
            # A user the engine does not hold (evicted, say) is read whole.
            env.daemon.engine.forget("u1")
            env.store.disconnect("c-u1")
            await env.until(lambda: env.store.presence("u1") == OFF)
            assert env.store.calls["load_users"] == users + 1

    run(scenario)


def test_a_users_change_gathered_with_a_sessions_change_is_read() -> None:
    async def scenario(env: Env) -> None:
        _users(env, 3)
        async with env.running():
            await _held_online(env, "u0", "u1", "u2")
            env.delays["load_sessions"] = 1.0
            env.store.connect("u0", "c2", None, env.now())
            await env.settle()  # u0's load is in flight: the next keys are gathered
            env.store.connect("u1", "c2", None, env.now())  # sessions, then users
            env.store.set_user_fields("u1", statusDefault="busy")
            env.store.set_user_fields("u2", statusDefault="away")  # users, then sessions
            env.store.connect("u2", "c2", None, env.now())
            users = env.store.calls["load_users"]
            del env.delays["load_sessions"]
            await env.until(lambda: env.store.presence("u1") == ("busy", "online")
                            and env.store.presence("u2") == ("away", "online"))
            assert env.store.calls["load_users"] == users + 1  # one load, both read whole

    run(scenario)


def test_a_foreign_status_write_gathered_with_a_sessions_change_is_read() -> None:
    async def scenario(env: Env) -> None:
        _users(env, 2)
        async with env.running():
            await _held_online(env, "u0", "u1")
            env.delays["load_sessions"] = 1.0
            env.store.connect("u0", "c2", None, env.now())
            await env.settle()  # u0's load is in flight: the next keys are gathered
            # Someone else writes u1's pair (the feed says only which pair), then u1
            # opens a second connection: its answer stays online, the stored pair is wrong.
            env.store.users["u1"].update(status="away", statusConnection="away")
            env.store.feed.emit(UserChanged("u1", written=("away", "away")))
            env.store.connect("u1", "c2", None, env.now())
            users = env.store.calls["load_users"]
            del env.delays["load_sessions"]
            await env.until(lambda: env.store.presence("u1") == ON)
            assert env.store.calls["load_users"] == users + 1
            assert env.daemon.counts["conflicts"] == 0

    run(scenario)


def test_a_user_that_leaves_the_engine_during_its_sessions_read_is_read_whole() -> None:
    async def scenario(env: Env) -> None:
        _users(env, 1)
        async with env.running():
            await _held_online(env, "u0")
            users = env.store.calls["load_users"]
            env.delays["load_sessions"] = 1.0
            env.store.disconnect("c-u0")
            await env.settle()  # its sessions read is in flight
            env.daemon.engine.forget("u0")  # evicted meanwhile
            await env.until(lambda: env.store.presence("u0") == OFF)
            assert env.store.calls["load_users"] == users + 1

    run(scenario)


def test_after_a_big_load_the_next_poll_waits_for_the_window_and_then_for_nothing() -> None:
    async def scenario(env: Env) -> None:
        ids = _users(env, 6)
        async with env.running():
            env.daemon.gather_users = 3
            env.daemon.gather_s = 5.0
            t0 = env.clock.monotonic()
            for uid in ids[:4]:  # one poll, one load of four users: under load
                env.store.connect(uid, f"c{uid}", None, env.now())
            await env.settle()
            assert all(env.store.presence(u) == ON for u in ids[:4])
            await env.after(1)
            env.store.connect("u4", "cu4", None, env.now())
            await env.after(3.9)  # the reader polls again 5 s after its last poll began
            assert env.store.presence("u4") != ON
            await env.until(lambda: env.store.presence("u4") == ON)
            assert env.clock.monotonic() - t0 == pytest.approx(5.0, abs=0.02)
            # That load held u4 and the four echoes (a big load again): 5 s more, then the
            # reader polls at once (a load of one echo).
            await env.after(5.1)
            t = env.now()
            env.store.connect("u5", "cu5", None, t)
            await env.settle()  # no time passes: no window
            assert env.store.presence("u5") == ON and env.now() == t

    run(scenario)
