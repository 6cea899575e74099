"""Presence latency: a Rocket.Chat session write until presenced's ``users`` write, per feed
and per rate, beside the emulator's own floor.

Runs the emulator (``python -m presenced.testing.mongo``) and, one feed after the other,
``presenced run`` as their own processes: FEED=changestream, then FEED=oplog with
MONGO_OPLOG_URL naming the same server's ``local`` database. For each feed, and each rate
in turn (250 then 500 session writes/s by default) on the same daemon, it drives
Rocket.Chat's session writes (:class:`~presenced.testing.simulator.RocketChatSimulator`:
connect, away, disconnect, in turn per user, users taken round-robin; a set of users of
its own per rate, created offline with no ``statusDefault`` before the daemon starts, so
every connection change changes their status) at a steady rate for ``--seconds``, and
times each write until presenced's ``users`` update carrying the status that write
implies, as seen by a change stream this benchmark watches. The same watcher times the
session write's own change event: the floor (the emulator's write-to-event latency, which
presenced's feed cannot beat), measured in the same run under the same load.

Prints, per feed and rate, p50 and p99 of write -> ``users`` update and of the floor, their
ratio, and one ``SCORE`` line each (``latency.<feed>_<rate>``, see
:mod:`presenced.testing.scoreboard`), judged against the target p99 <= 50 ms:
PASS when met; FLOOR when missed but the floor explains it: the floor's own p99 is at or
past the target, or what presenced adds at p99 (p99 minus the floor's p99) is within the
target; else MISS. Exits 0 once it has measured (MISS included, unless --fail-on-miss),
2 when it could not measure (a process did not start, presenced did not keep up before
the deadline, --budget seconds passed). It stops every process it started, on failure,
SIGTERM and Ctrl-C too.

Usage: .venv/bin/python tests/bench/latency.py [--rates 250,500] [--seconds 8] [--users 500]
       .venv/bin/python tests/bench/latency.py --smoke      (a few seconds; judges nothing)

Set PYTHONPATH to measure another checkout of presenced (the child processes inherit it).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from pymongo.change_stream import ChangeStream

from presenced.testing.processes import (
    READY_TIMEOUT,
    Failed,
    OutOfTime,
    budget,
    emulator,
    free_port,
    ready,
    stop,
    with_database,
)
from presenced.testing.scoreboard import Score, emit, verdict
from presenced.testing.simulator import RocketChatSimulator, SimulatedUser, utc_now_ms

Doc = dict[str, Any]
TARGET_P99_MS = 50.0  # issue 10: both feeds, at 250 and at 500 events/s
MARKER = "bench_marker"  # a collection presenced ignores; its insert closes a run
STEPS = ("online", "away", "offline")  # each user in turn: connect, set away, disconnect


STARTED: list[subprocess.Popen[Any]] = []
"""Every process started, so that main can stop any a signal left running."""


# -------------------------------------------------------------------------------- processes


@contextmanager
def daemon(url: str, database: str, feed: str, workdir: Path) -> Iterator[None]:
    """``presenced run`` on ``database`` with ``feed``; waits for /ready, stops on leaving."""
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(workdir),
        "PYTHONUNBUFFERED": "1",
        "MONGO_URL": with_database(url, database),
        "FEED": feed,
        "HEALTH_CHECK_PORT": str(port),
        "PORT": str(free_port()),
        "LOG_LEVEL": "warning",
        # Only the connections' own changes should move a status during the run.
        "CACHE_TTL": "3600",
        "INSTANCE_TIMEOUT": "3600",
    }
    if feed == "oplog":
        env["MONGO_OPLOG_URL"] = with_database(url, "local")
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    log = workdir / f"presenced-{feed}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "presenced", "run"], env=env, cwd=workdir,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    STARTED.append(proc)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready(port):
            if proc.poll() is not None:
                raise Failed(f"presenced ({feed}) exited with {proc.returncode}:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise Failed(f"presenced ({feed}) not ready after {READY_TIMEOUT:.0f} s:\n"
                             f"{tail(log)}")
            time.sleep(0.05)
        yield
        if proc.poll() is not None:
            raise Failed(f"presenced ({feed}) exited during the run:\n{tail(log)}")
    finally:
        stop(proc)


def tail(path: Path, lines: int = 30) -> str:
    text = path.read_text("utf-8", "replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


# -------------------------------------------------------------------------------- one run


@dataclass
class Write:
    user: str
    status: str  # what presenced should write on ``users`` after it
    sent: float  # time.perf_counter() just before the write was sent


@dataclass
class Seen:
    """What the watcher received, in order, each at time.perf_counter()."""

    sessions: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    users: dict[str, list[tuple[float, str]]] = field(default_factory=lambda: defaultdict(list))
    markers: set[str] = field(default_factory=set)
    marked: threading.Condition = field(default_factory=threading.Condition)
    error: BaseException | None = None

    def wait_marker(self, marker: str, timeout: float) -> bool:
        with self.marked:
            return self.marked.wait_for(lambda: marker in self.markers, timeout)


def watch(stream: ChangeStream[Doc], seen: Seen, stop_: threading.Event) -> None:
    try:
        while not stop_.is_set() and stream.alive:
            event = stream.try_next()
            if event is None:
                continue
            at = time.perf_counter()
            coll, key = event["ns"]["coll"], event["documentKey"]["_id"]
            if coll == "usersSessions":
                seen.sessions[key].append(at)
            elif coll == "users":
                fields = (event.get("updateDescription") or {}).get("updatedFields") or {}
                if "status" in fields:
                    seen.users[key].append((at, fields["status"]))
            elif coll == MARKER:
                with seen.marked:
                    seen.markers.add(str(key))
                    seen.marked.notify_all()
    except BaseException as exc:  # reported by the main thread
        seen.error = exc


@dataclass
class Result:
    feed: str
    rate: float  # session writes per second asked for
    latency_ms: list[float]  # session write -> users update, matched writes only
    floor_ms: list[float]  # session write -> its own change event
    writes: int
    seconds: float  # how long the writes took

    @property
    def unmatched(self) -> int:
        return self.writes - len(self.latency_ms)


def run_feed(url: str, feed: str, args: argparse.Namespace, workdir: Path,
             deadline: float) -> list[Result]:
    """One daemon on ``feed``; each rate of ``args.rates`` measured in turn on it."""
    name = f"bench_latency_{feed}_{uuid.uuid4().hex[:6]}"
    client: MongoClient[Doc] = MongoClient(with_database(url, name),
                                           serverSelectionTimeoutMS=10_000)
    watcher: MongoClient[Doc] = MongoClient(url, serverSelectionTimeoutMS=10_000)
    try:
        db = client[name]
        users = {rate: [f"r{rate:g}-user{n:05d}"
                        for n in range(min(args.users, changes(rate, args)))]
                 for rate in args.rates}
        now = utc_now_ms()
        db.users.insert_many([
            SimulatedUser(id=uid, username=uid, status_default=None, status_text=None)
            .to_document(now) for ids in users.values() for uid in ids
        ])
        sim = RocketChatSimulator(db, users=0, instances=1, seed=1)
        sim.setup()  # the instance's document and Rocket.Chat's indexes
        db[MARKER].insert_one({"_id": "created"})

        results: list[Result] = []
        with daemon(url, name, feed, workdir):
            pipeline = [{"$match": {"ns.coll": {"$in": ["users", "usersSessions", MARKER]},
                                    "operationType": {"$in": ["insert", "update"]}}}]
            seen, stop_watching = Seen(), threading.Event()
            stream = watcher[name].watch(pipeline, max_await_time_ms=100)
            thread = threading.Thread(target=watch, args=(stream, seen, stop_watching),
                                      daemon=True)
            thread.start()
            try:
                for rate in args.rates:
                    writes = drive(sim, users[rate], changes(rate, args), rate, deadline)
                    seconds = writes[-1].sent - writes[0].sent if len(writes) > 1 else 0.0
                    wait_settled(db, writes, seen, f"done-{rate:g}", deadline)
                    if seen.error is not None:
                        raise Failed(f"the watcher failed: {seen.error!r}")
                    latency, floor = match(writes, seen)
                    results.append(Result(feed, rate, latency, floor, len(writes), seconds))
            finally:
                stop_watching.set()
                thread.join(5)
                stream.close()
        return results
    finally:
        with suppress(Exception):
            client.drop_database(name)
        client.close()
        watcher.close()


def changes(rate: float, args: argparse.Namespace) -> int:
    """Session writes at ``rate`` for ``args.seconds``."""
    return max(1, round(rate * float(args.seconds)))


def drive(sim: RocketChatSimulator, users: list[str], changes: int, rate: float,
          deadline: float) -> list[Write]:
    """Rocket.Chat's session writes at ``rate`` per second: write i is due at i / rate."""
    writes: list[Write] = []
    connection: dict[str, str] = {}
    start = time.perf_counter() + 0.05
    for i in range(changes):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)  # a steady rate; a late write goes at once
        if time.monotonic() > deadline:
            raise OutOfTime(f"--budget passed after {i} of {changes} writes")
        uid = users[i % len(users)]
        status = STEPS[(i // len(users)) % len(STEPS)]
        sent = time.perf_counter()
        if status == "online":
            connection[uid] = sim.connect(uid, status="online")
        elif status == "away":
            sim.set_status(uid, connection[uid], "away")
        else:
            sim.disconnect(connection.pop(uid))
        writes.append(Write(uid, status, sent))
    return writes


def wait_settled(db: Any, writes: list[Write], seen: Seen, marker: str,
                 deadline: float) -> None:
    """Until every user's stored status is its last write's, then until the watcher has
    seen everything before a marker written after that."""
    final = {w.user: w.status for w in writes}
    by_status: dict[str, list[str]] = defaultdict(list)
    for uid, status in final.items():
        by_status[status].append(uid)
    give_up = min(deadline, time.monotonic() + 60)
    while sum(db.users.count_documents({"_id": {"$in": ids}, "status": status})
              for status, ids in by_status.items()) < len(final):
        if time.monotonic() > give_up:
            raise Failed("presenced did not write every user's last status within 60 s")
        time.sleep(0.05)
    db[MARKER].insert_one({"_id": marker})
    if not seen.wait_marker(marker, max(0.0, give_up - time.monotonic())):
        raise Failed("the watcher did not see the end marker")


def match(writes: list[Write], seen: Seen) -> tuple[list[float], list[float]]:
    """(write -> users update, write -> its own event) in milliseconds.

    The k-th session event of a user is its k-th write. A write's users update is the
    next one of that user, if it carries the status the write implies; one that carries
    another status means presenced folded this write into a later one (not counted)."""
    latency: list[float] = []
    floor: list[float] = []
    session_index: dict[str, int] = defaultdict(int)
    users_index: dict[str, int] = defaultdict(int)
    for w in writes:
        events = seen.sessions[w.user]
        k = session_index[w.user]
        if k < len(events):
            floor.append((events[k] - w.sent) * 1000)
            session_index[w.user] = k + 1
        updates = seen.users[w.user]
        j = users_index[w.user]
        while j < len(updates) and updates[j][0] < w.sent:
            j += 1  # an update from before this write (the previous one's, late)
        if j < len(updates) and updates[j][1] == w.status:
            latency.append((updates[j][0] - w.sent) * 1000)
            j += 1
        users_index[w.user] = j
    return latency, floor


# -------------------------------------------------------------------------------- report


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def figures(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), percentile(values, 99)


RULE = ("PASS: p99 <= {t:g} ms; FLOOR: missed, but the floor's p99 is >= {t:g} ms or"
        " p99 minus the floor's p99 (what presenced adds) is <= {t:g} ms; else MISS")


def report(results: list[Result], args: argparse.Namespace) -> bool:
    """Print each feed and rate, emit its SCORE line; True when none is a MISS."""
    print(f"session write -> users update, for {args.seconds:g} s at each of"
          f" {', '.join(f'{r:g}' for r in args.rates)} writes/s over up to {args.users} users"
          " (connect / away / disconnect in turn); floor = the session write's own change"
          " event, same run, same load")
    print("rule: " + RULE.format(t=args.target))
    passed = True
    for r in results:
        key = f"latency.{r.feed}_{r.rate:g}"
        measure = f"session write -> users write, {r.feed} feed, {r.rate:g} events/s"
        target = f"p99 <= {args.target:g} ms"
        if not r.latency_ms or not r.floor_ms:
            print(f"{r.feed} at {r.rate:g}/s: nothing matched")
            emit(Score(key, measure, target, "nothing matched", "-", "-",
                       verdict(False, smoke=args.smoke), note=f"{r.writes} writes"))
            passed = False
            continue
        p50, p99 = figures(r.latency_ms)
        f50, f99 = figures(r.floor_ms)
        sent = (r.writes - 1) / r.seconds if r.seconds > 0 else float("nan")
        met = p99 <= args.target
        explained = f99 >= args.target or p99 - f99 <= args.target
        v = verdict(met, smoke=args.smoke, floor_explains=explained)
        passed = passed and v != "MISS"
        print(f"{r.feed:>12} {r.rate:4g}/s: p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  max"
              f" {max(r.latency_ms):7.1f} ms | floor p50 {f50:5.1f} ms  p99 {f99:5.1f} ms  max"
              f" {max(r.floor_ms):5.1f} ms |"
              f" ratio p50 {p50 / f50:5.1f}  p99 {p99 / f99:5.1f} | {len(r.latency_ms)} of"
              f" {r.writes} writes matched ({r.unmatched} folded into a later one), sent at"
              f" {sent:.0f}/s | {v}")
        emit(Score(
            key, measure, target, f"p99 {p99:.1f} ms (p50 {p50:.1f})",
            f"floor p99 {f99:.1f} ms (p50 {f50:.1f})", f"{p99 / f99:.1f}x", v,
            note=(f"{len(r.latency_ms)}/{r.writes} writes matched, sent at {sent:.0f}/s"
                  f" over {min(args.users, r.writes)} users; floor = the emulator's"
                  f" write -> change event; FLOOR when floor p99 >= {args.target:g} ms or"
                  f" p99 - floor p99 <= {args.target:g} ms"),
        ))
    return passed


# -------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rates", default="250,500",
                    help="session writes per second, each measured in turn on each feed")
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds of writes per rate")
    ap.add_argument("--users", type=int, default=500,
                    help="users written round-robin (each every users/rate seconds)")
    ap.add_argument("--feeds", default="changestream,oplog")
    ap.add_argument("--target", type=float, default=TARGET_P99_MS,
                    help="p99 target in ms (every feed, every rate)")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny run: 0.3 s per rate over 30 users, judges nothing")
    ap.add_argument("--budget", type=float, default=300.0,
                    help="seconds after which the benchmark gives up (and cleans up)")
    ap.add_argument("--fail-on-miss", action="store_true", help="exit 1 on a MISS")
    args = ap.parse_args()
    try:
        args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        ap.error("--rates takes numbers separated by commas, e.g. 250,500")
    if args.smoke:
        args.seconds, args.users = 0.3, 30
    if args.users < 1 or args.seconds <= 0 or not args.rates or min(args.rates) <= 0:
        ap.error("--users must be at least 1, --seconds and every rate above 0")
    feeds = [f.strip() for f in args.feeds.split(",") if f.strip()]
    if not feeds or any(f not in ("changestream", "oplog") for f in feeds):
        ap.error("--feeds takes changestream, oplog or both")

    deadline = time.monotonic() + args.budget
    results: list[Result] = []
    try:
        with budget(args.budget), tempfile.TemporaryDirectory(prefix="presenced-latency-") as tmp, \
                emulator(started=STARTED) as url:
            for feed in feeds:
                results += run_feed(url, feed, args, Path(tmp), deadline)
    except Failed as exc:
        print(f"latency benchmark could not measure: {exc}", file=sys.stderr)
        return 2
    finally:
        for proc in STARTED:  # normally stopped already; not if a signal cut a cleanup short
            stop(proc)
    passed = report(results, args)
    return 1 if args.fail_on_miss and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
