"""The emulator against issue 9's performance targets, each with PASS or MISS.

Runs the emulator as its own process (``python -m presenced.testing.mongo``, as the
daemon's tests and ``make demo`` see it) and measures, over the wire with pymongo:

- a bare scan: ``list(find({}))`` of 100 000 documents (target: at most 5 s);
- ``find({_id: {$in: ids}})`` with 500 and with 5 000 ids: time per id, and the ratio of
  the two times (target: linear, so the ratio stays near 10; quadratic would be ~100);
- Rocket.Chat's disconnect, ``updateMany({"connections.id": c}, {$pull: ...})``, one
  round trip each, on ``usersSessions`` with Rocket.Chat's indexes, at 1 000 and at
  10 000 users (target: at least 1 500/s at both sizes, i.e. on the index, not a scan);
- Rocket.Chat connection events per second with presenced attached: ``presenced run``
  (change-stream feed) reads the emulator while threads, each driving its own
  :class:`~presenced.testing.simulator.RocketChatSimulator`, connect and disconnect
  their users one write at a time for a fixed time; then the time until presenced has
  written every user's final status (target: at least 1 500 events/s, and presenced
  caught up).

and, for context, single ``update_one`` heartbeats and write-to-change-event latency.

Exits 0 once it has measured (MISS included, unless --fail-on-miss), 2 when it could not
measure (a process did not start, presenced did not catch up within a minute).
Usage: .venv/bin/python tests/bench/emulator.py [--scan-docs 100000] [--users 1000,10000]
       [--event-seconds 10] [--threads 4] [--no-daemon]
Set PYTHONPATH to measure another checkout of presenced (the child processes inherit it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymongo import ASCENDING, InsertOne, MongoClient
from pymongo.collection import Collection
from pymongo.database import Database

from presenced.testing import processes
from presenced.testing.processes import (
    Failed,
    budget,
    emulator,
    stop,
)
from presenced.testing.scoreboard import Score, emit
from presenced.testing.scoreboard import verdict as scoreboard_verdict
from presenced.testing.simulator import RocketChatSimulator, SimulatedUser, utc_now_ms

Doc = dict[str, Any]

SCAN_TARGET_S = 5.0
IN_RATIO_TARGET = 15.0  # 10x the ids; linear with some slack, quadratic would be ~100
DISCONNECT_TARGET_PER_S = 1500.0
EVENTS_TARGET_PER_S = 1500.0
CATCH_UP_LIMIT_S = 60.0


@dataclass
class Line:
    what: str
    figure: str
    target: str
    passed: bool | None  # None: context only, no target
    key: str = ""  # the SCORE key of a line with a target


def emit_scores(lines: list[Line], smoke: bool) -> None:
    """A SCORE line for each line with a target (context lines are printed only)."""
    for line in lines:
        if line.passed is None or not line.key:
            continue
        emit(Score(key=line.key, measure=f"emulator: {line.what.strip()}",
                   target=line.target, measured=line.figure, reference="-", ratio="-",
                   verdict=scoreboard_verdict(line.passed, smoke=smoke)))


def verdict(passed: bool | None) -> str:
    return "" if passed is None else ("PASS" if passed else "MISS")


# ---------------------------------------------------------------------------- measures


def seed_scan(coll: Collection[Doc], n: int) -> None:
    now = utc_now_ms().replace(tzinfo=None)
    batch: list[InsertOne[Doc]] = []
    for i in range(n):
        batch.append(InsertOne({"_id": f"u{i:07d}", "username": f"user{i}", "active": True,
                                "status": "offline", "roles": ["user"], "_updatedAt": now}))
        if len(batch) == 10_000:
            coll.bulk_write(batch, ordered=False)
            batch = []
    if batch:
        coll.bulk_write(batch, ordered=False)


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    """The median wall time of ``repeat`` calls, in seconds."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def scan_and_in(db: Database[Doc], n: int, in_sizes: tuple[int, int]) -> list[Line]:
    coll = db.scan
    seed_scan(coll, n)
    seconds = timed(lambda: list(coll.find({}, batch_size=10_000)))
    lines = [Line(f"bare scan: find({{}}), {n} documents", f"{seconds:.2f} s",
                  f"<= {SCAN_TARGET_S:g} s", seconds <= SCAN_TARGET_S, "emulator.scan_s")]
    small, large = in_sizes
    step = max(1, n // large)
    ids = [f"u{i:07d}" for i in range(0, n, step)][:large]

    def in_query(k: int) -> float:
        wanted = ids[:k]
        got: list[Doc] = []

        def run() -> None:
            got[:] = list(coll.find({"_id": {"$in": wanted}}, batch_size=k + 1))

        t = timed(run, repeat=3)
        if len(got) != k:
            raise Failed(f"find(_id $in {k} ids) returned {len(got)} documents")
        return t

    t_small, t_large = in_query(small), in_query(large)
    ratio = t_large / t_small
    lines.append(Line(f"_id $in, {small} ids", f"{t_small * 1000:.1f} ms "
                      f"({t_small / small * 1e6:.0f} us/id)", "", None))
    lines.append(Line(f"_id $in, {large} ids", f"{t_large * 1000:.1f} ms "
                      f"({t_large / large * 1e6:.0f} us/id)", "", None))
    lines.append(Line(f"_id $in, time {large} / time {small}", f"{ratio:.1f}",
                      f"<= {IN_RATIO_TARGET:g} (linear: {large / small:g})",
                      ratio <= IN_RATIO_TARGET, "emulator.id_in_ratio"))
    db.drop_collection("scan")
    return lines


def sessions_doc(i: int, now: dt.datetime) -> Doc:
    return {"_id": f"u{i}", "connections": [
        {"id": f"c{i}", "instanceId": "i1", "status": "online", "_createdAt": now,
         "_updatedAt": now}]}


def disconnect_rate(db: Database[Doc], users: int, seconds: float) -> Line:
    """updateMany by connections.id, Rocket.Chat's disconnect, one round trip each (and
    the connect that puts the entry back, not timed) for up to ``seconds``."""
    coll = db[f"sessions_{users}"]
    now = utc_now_ms().replace(tzinfo=None)
    for start in range(0, users, 10_000):
        coll.insert_many([sessions_doc(i, now) for i in range(start, min(users, start + 10_000))])
    # Rocket.Chat's UsersSessions model indexes.
    coll.create_index([("connections.id", ASCENDING)], sparse=True)
    coll.create_index([("connections.instanceId", ASCENDING)], sparse=True)
    done = 0
    spent = 0.0
    step = 7919  # a prime: users visited in a scattered order
    while spent < seconds and done < users:
        i = (done * step) % users
        t = time.perf_counter()
        result = coll.update_many({"connections.id": f"c{i}"},
                                  {"$pull": {"connections": {"id": f"c{i}"}}})
        spent += time.perf_counter() - t
        if result.modified_count != 1:
            raise Failed(f"the disconnect of c{i} modified {result.modified_count} documents")
        done += 1
    rate = done / spent
    db.drop_collection(coll.name)
    return Line(f"disconnect, updateMany by connections.id, {users} users", f"{rate:.0f}/s",
                f">= {DISCONNECT_TARGET_PER_S:g}/s", rate >= DISCONNECT_TARGET_PER_S,
                f"emulator.disconnect_per_s.{users}")


def heartbeat_rate(db: Database[Doc], users: int, n: int) -> Line:
    coll = db.heartbeats
    now = utc_now_ms().replace(tzinfo=None)
    coll.insert_many([sessions_doc(i, now) for i in range(users)])
    t = time.perf_counter()
    for k in range(n):
        i = k % users
        coll.update_one({"_id": f"u{i}", "connections.id": f"c{i}"},
                        {"$set": {"connections.$._updatedAt": utc_now_ms()}})
    rate = n / (time.perf_counter() - t)
    db.drop_collection("heartbeats")
    return Line(f"heartbeat, update_one by _id + connections.$, {users} users",
                f"{rate:.0f}/s", "", None)


def event_latency(db: Database[Doc], samples: int) -> Line:
    coll = db.latency
    coll.insert_one({"_id": "x", "n": 0})
    lat: list[float] = []
    with coll.watch(max_await_time_ms=1000) as stream:
        for k in range(samples):
            t = time.perf_counter()
            coll.update_one({"_id": "x"}, {"$set": {"n": k + 1}})
            stream.next()
            lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    p99 = lat[max(0, int(len(lat) * 0.99) - 1)]
    return Line("write -> change event", f"p50 {statistics.median(lat):.2f} ms, "
                f"p99 {p99:.2f} ms", "", None)


# ------------------------------------------------------------ events with the daemon


@contextmanager
def daemon(url: str, database: str, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``presenced run`` (change-stream feed) on ``database``, nothing expiring; waits for
    /ready."""
    with processes.daemon(
        url, database, workdir, env={"CACHE_TTL": "3600", "INSTANCE_TIMEOUT": "3600"}
    ) as (proc, _port):
        yield proc


def drive_events(url: str, database: str, users: list[str], seconds: float,
                 seed: int, counts: list[int], final: dict[str, str],
                 errors: list[BaseException]) -> None:
    """One Rocket.Chat instance's worth of traffic: connect, then disconnect, each user in
    turn, one write per event, until ``seconds`` have passed."""
    client: MongoClient[Doc] = MongoClient(url)
    try:
        sim = RocketChatSimulator(client[database], users=0, instances=1, seed=seed)
        sim.setup()
        connection: dict[str, str] = {}
        n = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            uid = users[n % len(users)]
            if uid in connection:
                sim.disconnect(connection.pop(uid))
                final[uid] = "offline"
            else:
                connection[uid] = sim.connect(uid)
                final[uid] = "online"
            n += 1
        counts.append(n)
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)
    finally:
        client.close()


def events_with_daemon(url: str, n_users: int, threads: int, seconds: float) -> list[Line]:
    database = "bench_events"
    client: MongoClient[Doc] = MongoClient(url)
    db = client[database]
    users = [f"user{n:05d}" for n in range(n_users)]
    now = utc_now_ms()
    db.users.insert_many([
        SimulatedUser(id=uid, username=uid, status_default=None, status_text=None)
        .to_document(now) for uid in users])
    RocketChatSimulator(db, users=0, instances=1, seed=0).setup()  # the indexes
    try:
        with tempfile.TemporaryDirectory(prefix="presenced-bench-") as tmp, \
                daemon(url, database, Path(tmp)):
            counts: list[int] = []
            errors: list[BaseException] = []
            final: dict[str, str] = {}
            share = [users[k::threads] for k in range(threads)]
            workers = [threading.Thread(target=drive_events, args=(
                url, database, share[k], seconds, k + 1, counts, final, errors))
                for k in range(threads)]
            t = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            elapsed = time.perf_counter() - t
            if errors:
                raise Failed(f"a writer failed: {errors[0]!r}")
            rate = sum(counts) / elapsed
            by_status: dict[str, list[str]] = {}
            for uid, status in final.items():
                by_status.setdefault(status, []).append(uid)
            t_end = time.monotonic()
            while sum(db.users.count_documents({"_id": {"$in": ids}, "status": status})
                      for status, ids in by_status.items()) < len(final):
                if time.monotonic() - t_end > CATCH_UP_LIMIT_S:
                    raise Failed(f"presenced did not catch up within {CATCH_UP_LIMIT_S:g} s")
                time.sleep(0.05)
            lag = time.monotonic() - t_end
    finally:
        with suppress(Exception):
            client.drop_database(database)
        client.close()
    return [
        Line(f"connection events, presenced attached ({threads} writers, {n_users} users)",
             f"{rate:.0f}/s", f">= {EVENTS_TARGET_PER_S:g}/s", rate >= EVENTS_TARGET_PER_S,
             "emulator.events_per_s"),
        Line("  presenced caught up (every final status written)", f"{lag:.1f} s after",
             f"< {CATCH_UP_LIMIT_S:g} s", True, "emulator.catch_up_s"),
    ]


# ------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--scan-docs", type=int, default=100_000)
    ap.add_argument("--in-sizes", default="500,5000")
    ap.add_argument("--users", default="1000,10000",
                    help="usersSessions sizes for the disconnect rate")
    ap.add_argument("--disconnect-seconds", type=float, default=3.0)
    ap.add_argument("--event-seconds", type=float, default=10.0)
    ap.add_argument("--event-users", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--no-daemon", action="store_true", help="skip the events with presenced")
    ap.add_argument("--fail-on-miss", action="store_true", help="exit 1 on a MISS")
    ap.add_argument("--smoke", action="store_true", help="a tiny run of every measure")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the whole run")
    args = ap.parse_args()
    if args.smoke:
        args.scan_docs, args.in_sizes, args.users = 2000, "50,500", "500"
        args.disconnect_seconds, args.event_seconds, args.event_users = 0.5, 1.0, 100
        args.threads = 2
    small, large = (int(x) for x in args.in_sizes.split(","))
    sizes = [int(x) for x in args.users.split(",")]
    if large > args.scan_docs:
        ap.error("--in-sizes must not exceed --scan-docs")

    lines: list[Line] = []
    started: list[subprocess.Popen[Any]] = []
    t0 = time.monotonic()
    try:
        with budget(args.budget), emulator(started=started) as url:
            client: MongoClient[Doc] = MongoClient(url)
            try:
                db = client.bench
                lines += scan_and_in(db, args.scan_docs, (small, large))
                lines += [disconnect_rate(db, n, args.disconnect_seconds) for n in sizes]
                lines.append(heartbeat_rate(db, 200 if args.smoke else 2000,
                                            300 if args.smoke else 3000))
                lines.append(event_latency(db, 30 if args.smoke else 300))
                if not args.no_daemon:
                    lines += events_with_daemon(url, args.event_users, args.threads,
                                                args.event_seconds)
            finally:
                client.close()
    except Failed as exc:
        print(f"emulator benchmark could not measure: {exc}", file=sys.stderr)
        return 2
    finally:
        for proc in started:
            stop(proc)
    width = max(len(line.what) for line in lines)
    fwidth = max(len(line.figure) for line in lines)
    twidth = max(len(line.target) for line in lines)
    print(f"{'measure':<{width}}  {'figure':>{fwidth}}  {'target':<{twidth}}  verdict")
    for line in lines:
        print(f"{line.what:<{width}}  {line.figure:>{fwidth}}  {line.target:<{twidth}}  "
              f"{verdict(line.passed)}".rstrip())
    emit_scores(lines, args.smoke)
    print(f"(measured in {time.monotonic() - t0:.0f} s)")
    missed = any(line.passed is False for line in lines)
    return 1 if args.fail_on_miss and missed else 0


if __name__ == "__main__":
    sys.exit(main())
