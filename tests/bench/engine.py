"""The engine alone: events/s, memory per tracked user, one housekeeping pass (no database).

Everything runs in this process, on documents shaped as pymongo returns them (ids as str,
naive UTC datetimes), with no database, no trio and no writer:

- **events/s**: ``--users`` users are loaded (1-2 connections each on one of three
  instances, ``_updatedAt`` spread over the last 290 s, so some go stale during the run),
  then a stream of ``--events`` connection events (70% heartbeat, 10% each away / back
  online, connect, disconnect), ``--rate`` of them per simulated second (4,000: 100k users'
  connections heartbeating every 30-60 s), is fed to ``Engine.load`` as the writer feeds it
  (freshly built documents, the read sequence, ``confirm`` + ``write_done`` of each planned
  write). The instances heartbeat (``set_instances``) every 10,000 events, and the timers
  fire (``due`` + ``evaluate``, with the writes they plan) every 100 events: both are in
  the timed region, only connection events are counted. Documents are built ahead, in
  batches, outside the timed region; the time is ``time.process_time`` (one core). The
  **reference** is a minimal plain-Python version of the same decision (read the
  connections, fold, compare with the stored pair, next stale instant; a dict of tuples;
  no instances, no timers, no malformed input), fed the same events in its own phase.
- **bytes per tracked user**: ``tracemalloc`` over an engine loaded with typical users
  (1-2 connections on one instance, username, roles, statusText), at 100k and at 1M users.
- **housekeeping pass**: the engine's share of one housekeeping pass (``set_instances``
  with the unchanged instances, ``reapable``, ``stats``) at ``--users`` users of which 1%
  hold a stale connection: CPU ms, median of 5 passes.

Each measure ends with one scoreboard line (``SCORE {json}``, presenced.testing.scoreboard).
Exits 0 once measured, MISS included.

Usage: PYTHONPATH=. .venv/bin/python tests/bench/engine.py           (about 2 minutes)
       PYTHONPATH=. .venv/bin/python tests/bench/engine.py --smoke   (a few seconds, judges nothing)
Run timing benchmarks one at a time on a shared machine (e.g. under ``flock``).
"""

from __future__ import annotations

import argparse
import gc
import heapq
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from presenced.engine import Engine, Reason
from presenced.testing.scoreboard import Score, emit, verdict

TTL_MS = 300_000
INSTANCE_TIMEOUT_MS = 60_000
START_MS = 1_760_000_000_000
EPOCH_NAIVE = datetime(1970, 1, 1)
INSTANCES = ("6f1c2a9e-0b7d-4c55-9a43-1f0e8d2b7c11", "a3d9e5f0-7c2b-4e1a-8d6f-5b4c3a291e07",
             "0d8e7f6a-5b4c-4a3d-9e2f-1a0b9c8d7e6f")
STATUSES = ("online", "away", "busy", "offline")
BATCH = 10_000
TIMERS_EVERY = 100


def dt_of(ms: int) -> datetime:
    return EPOCH_NAIVE + timedelta(milliseconds=ms)


def random_id(rng: random.Random) -> str:
    """17 characters, as Meteor's ``Random.id()`` (hex digits here: the size is what counts)."""
    return f"{rng.getrandbits(68):017x}"


# ------------------------------------------------------------------------ the world

Event = tuple[str, dict[str, Any], dict[str, Any], int]
"""One connection event: user id, ``users`` document, ``usersSessions`` document, now."""


class World:
    """Rocket.Chat's side: each user's connections and stored pair, as documents."""

    def __init__(self, users: int, seed: int = 10) -> None:
        self.rng = random.Random(seed)
        self.ids = [random_id(self.rng) for _ in range(users)]
        # uid -> list of [connection id, instance id, status, created ms, updated ms]
        self.conns: dict[str, list[list[Any]]] = {}
        self.stored: dict[str, tuple[str, str]] = {}
        self.default: dict[str, str] = {}
        for uid in self.ids:
            n = 1 if self.rng.random() < 0.7 else 2
            iid = self.rng.choice(INSTANCES)
            updated = START_MS - self.rng.randrange(290_000)
            self.conns[uid] = [
                [random_id(self.rng), iid, "online", updated - 5_000, updated] for _ in range(n)
            ]
            self.default[uid] = "online" if self.rng.random() < 0.9 else "busy"
            self.stored[uid] = reference_pair(self.default[uid], self.conns[uid], START_MS)

    def user_doc(self, uid: str) -> dict[str, Any]:
        status, status_connection = self.stored[uid]
        return {
            "_id": uid, "username": "user." + uid[:8].lower(), "type": "user",
            "roles": ["user"], "active": True, "statusDefault": self.default[uid],
            "statusText": "", "status": status, "statusConnection": status_connection,
        }

    def sessions_doc(self, uid: str) -> dict[str, Any]:
        return {"_id": uid, "connections": [
            {"id": cid, "instanceId": iid, "status": status,
             "_createdAt": dt_of(created), "_updatedAt": dt_of(updated)}
            for cid, iid, status, created, updated in self.conns[uid]
        ]}

    def event(self, uid: str, now: int) -> None:
        """One connection event of ``uid`` at ``now`` (what Rocket.Chat writes)."""
        conns, r = self.conns[uid], self.rng.random()
        if not conns or r < 0.10:
            iid = conns[0][1] if conns else self.rng.choice(INSTANCES)
            conns.append([random_id(self.rng), iid, "online", now, now])
        elif r < 0.20:
            conns.pop(self.rng.randrange(len(conns)))
        elif r < 0.30:
            c = self.rng.choice(conns)
            c[2], c[4] = ("away" if c[2] == "online" else "online"), now
        else:
            self.rng.choice(conns)[4] = now

    def batches(self, events: int, rate: int) -> Iterator[list[Event]]:
        for start in range(0, events, BATCH):
            batch = []
            for n in range(start, min(start + BATCH, events)):
                now = START_MS + 1 + n * 1000 // rate
                uid = self.rng.choice(self.ids)
                # What the writer left stored before this event (its timers included): the
                # ``users`` document read after the event still holds it.
                self.stored[uid] = reference_pair(self.default[uid], self.conns[uid], now)
                self.event(uid, now)
                batch.append((uid, self.user_doc(uid), self.sessions_doc(uid), now))
            yield batch


def reference_pair(default: str, conns: list[list[Any]], now: int) -> tuple[str, str]:
    sc = "offline"
    for _, _, status, _, updated in conns:
        if sc == "online":
            break
        if status != "offline" and now - updated <= TTL_MS:
            sc = status
    if sc == "offline":
        return ("offline", "offline")
    return (sc, sc) if default == "online" else (default, sc)


# ------------------------------------------------------------------------ the reference

class Reference:
    """A minimal plain-Python version of the engine's decision: the same inputs, a dict of
    tuples, no malformed-input handling, no instances, no LRU, no planned-write objects."""

    _ONE_MS = timedelta(milliseconds=1)

    def __init__(self) -> None:
        self.users: dict[str, tuple[object, object, list[tuple[str, int]], int | None]] = {}
        self.heap: list[tuple[int, str]] = []

    def load(self, uid: str, user: dict[str, Any], sessions: dict[str, Any], now: int
             ) -> tuple[str, str] | None:
        conns = [(c["status"], (c["_updatedAt"] - EPOCH_NAIVE) // self._ONE_MS)
                 for c in sessions.get("connections") or ()]
        default = user.get("statusDefault") or "online"
        pair, at = self.decide(default, conns, now)
        self.users[uid] = (user.get("status"), user.get("statusConnection"), conns, at)
        if at is not None:
            heapq.heappush(self.heap, (at, uid))
        return None if (user.get("status"), user.get("statusConnection")) == pair else pair

    @staticmethod
    def decide(default: str, conns: list[tuple[str, int]], now: int
               ) -> tuple[tuple[str, str], int | None]:
        sc, at = "offline", None
        for status, updated in conns:
            if now - updated > TTL_MS:
                continue
            expires = updated + TTL_MS + 1
            at = expires if at is None or expires < at else at
            if sc != "online" and status != "offline":
                sc = status
        if sc == "offline":
            return ("offline", "offline"), at
        return ((sc, sc) if default == "online" else (default, sc)), at


# ------------------------------------------------------------------------ measures

def new_engine() -> Engine:
    return Engine(ttl_ms=TTL_MS, instance_timeout_ms=INSTANCE_TIMEOUT_MS, max_users=2_000_000)


def instances_now(now: int) -> dict[str, int | None]:
    return dict.fromkeys(INSTANCES, now)


def events_per_s(users: int, events: int, rate: int) -> tuple[float, float]:
    """(engine events/s, reference events/s) on the same stream.

    Each is measured in its own phase over the same seeded world (so the heap the cyclic
    garbage collector walks holds one loaded decision-maker, not both).
    """
    return engine_rate(users, events, rate), reference_rate(users, events, rate)


def engine_rate(users: int, events: int, rate: int) -> float:
    world = World(users)
    engine = new_engine()
    engine.set_instances(instances_now(START_MS), START_MS)
    for uid in world.ids:
        engine.load(uid, world.user_doc(uid), world.sessions_doc(uid), START_MS, Reason.RECONCILE)
    seconds = 0.0
    seq = 0
    for batch in world.batches(events, rate):
        engine.set_instances(instances_now(batch[0][3]), batch[0][3])
        t0 = time.process_time()
        for i, (uid, user, sessions, now) in enumerate(batch):
            seq += 1
            write = engine.load(uid, user, sessions, now, Reason.CONNECTIONS, read_seq=seq)
            if write is not None:
                engine.confirm(write, now)
                engine.write_done(write)
            if i % TIMERS_EVERY == 0:
                for due in engine.due(now):
                    write = engine.evaluate(due, now, Reason.STALE)
                    if write is not None:
                        engine.confirm(write, now)
                        engine.write_done(write)
        seconds += time.process_time() - t0
    del world, engine
    gc.collect()
    return events / seconds


def reference_rate(users: int, events: int, rate: int) -> float:
    world = World(users)
    reference = Reference()
    for uid in world.ids:
        reference.load(uid, world.user_doc(uid), world.sessions_doc(uid), START_MS)
    seconds = 0.0
    for batch in world.batches(events, rate):
        t0 = time.process_time()
        for uid, user, sessions, now in batch:
            reference.load(uid, user, sessions, now)
        seconds += time.process_time() - t0
    del world, reference
    gc.collect()
    return events / seconds


def typical_docs(i: int, rng: random.Random) -> tuple[str, dict[str, Any], dict[str, Any]]:
    uid = random_id(rng)
    iid = INSTANCES[i % len(INSTANCES)]
    updated = START_MS - rng.randrange(60_000)
    user = {
        "_id": uid, "username": "user." + uid[:8].lower(), "type": "user", "roles": ["user"],
        "active": True, "statusText": "", "status": "online", "statusConnection": "online",
    }
    sessions = {"_id": uid, "connections": [
        {"id": random_id(rng), "instanceId": iid, "status": "online",
         "_createdAt": dt_of(updated - 1_000), "_updatedAt": dt_of(updated)}
        for _ in range(1 if i % 2 else 2)
    ]}
    return uid, user, sessions


def bytes_per_user(users: int) -> float:
    """tracemalloc's growth per user of an engine loaded with ``users`` typical users."""
    rng = random.Random(users)
    gc.collect()
    tracemalloc.start()
    try:
        engine = new_engine()
        engine.set_instances(instances_now(START_MS), START_MS)
        before = tracemalloc.get_traced_memory()[0]
        for i in range(users):
            uid, user, sessions = typical_docs(i, rng)
            engine.load(uid, user, sessions, START_MS, Reason.RECONCILE)
        del uid, user, sessions
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert engine.stats().users_tracked == users
    return (after - before) / users


def housekeeping_ms(users: int, stale_share: float = 0.01) -> tuple[float, int]:
    """(median CPU ms of the engine's part of a housekeeping pass, candidates per pass)."""
    rng = random.Random(users)
    engine = new_engine()
    now = START_MS
    engine.set_instances(instances_now(now), now)
    stale = set(rng.sample(range(users), int(users * stale_share)))
    for i in range(users):
        uid, user, sessions = typical_docs(i, rng)
        if i in stale:
            sessions["connections"][0]["_updatedAt"] = dt_of(now - TTL_MS - 1 - rng.randrange(9))
        engine.load(uid, user, sessions, now, Reason.RECONCILE)
    passes: list[float] = []
    found = 0
    for _ in range(5):
        t0 = time.process_time()
        engine.set_instances(instances_now(now), now)
        found = len(engine.reapable(now))
        engine.stats()
        passes.append((time.process_time() - t0) * 1000)
    return statistics.median(passes), found


def timed(label: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    result = fn()
    print(f"  ({label}: {time.perf_counter() - t0:.1f} s wall)", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--rate", type=int, default=4_000, help="events per simulated second")
    parser.add_argument("--big", type=int, default=1_000_000, help="users, second memory size")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, judges nothing")
    args = parser.parse_args()
    if args.smoke:
        args.users, args.events, args.big = 2_000, 4_000, 5_000
    smoke = args.smoke

    rate, ref_rate = timed("events", lambda: events_per_s(args.users, args.events, args.rate))
    print(f"engine alone: {rate:,.0f} events/s; reference {ref_rate:,.0f} events/s; "
          f"ratio {rate / ref_rate:.2f}x ({args.users:,} users, {args.events:,} events)")
    emit(Score(
        key="engine.events_per_s", measure="engine alone, events/s on one core",
        target=">= 50,000 events/s", measured=f"{rate:,.0f} events/s",
        reference=f"{ref_rate:,.0f} events/s (plain-Python decision)",
        ratio=f"{rate / ref_rate:.2f}x", verdict=verdict(rate >= 50_000, smoke=smoke),
        note=f"{args.users:,} users, {args.events:,} events, process_time",
    ))

    sizes = (("engine.bytes_per_user_100k", args.users), ("engine.bytes_per_user_1m", args.big))
    for key, n in sizes:
        per_user = timed(f"memory {n:,}", lambda n=n: bytes_per_user(n))  # type: ignore[misc]
        print(f"memory: {per_user:,.0f} B per tracked user at {n:,} users")
        emit(Score(
            key=key, measure=f"memory per tracked user at {n:,}", target="<= 1024 B",
            measured=f"{per_user:,.0f} B", reference="-", ratio="-",
            verdict=verdict(per_user <= 1024, smoke=smoke),
            note="tracemalloc, engine only, 1-2 connections on one instance",
        ))

    ms, found = timed("housekeeping", lambda: housekeeping_ms(args.users))
    print(f"housekeeping: {ms:.2f} ms CPU per pass at {args.users:,} users ({found} reapable)")
    emit(Score(
        key="engine.housekeeping_ms", measure=f"one housekeeping pass at {args.users:,} users",
        target="<= 10 ms CPU", measured=f"{ms:.2f} ms", reference="-", ratio="-",
        verdict=verdict(ms <= 10, smoke=smoke),
        note="set_instances + reapable + stats, 1% reapable, median of 5",
    ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
