"""Presence latency: a Rocket.Chat session write until presenced's ``users`` write, per feed.

Runs the emulator (``python -m presenced.testing.mongo``) and, one feed after the other,
``presenced run`` as their own processes: FEED=changestream, then FEED=oplog with
MONGO_OPLOG_URL naming the same server's ``local`` database. For each it creates users
(no ``statusDefault``, so every connection change changes their status), then drives
Rocket.Chat's session writes (:class:`~presenced.testing.simulator.RocketChatSimulator`:
connect, away, disconnect, in turn per user, users taken round-robin) at a steady rate,
and times each write until presenced's ``users`` update carrying the status that write
implies, as seen by a change stream this benchmark watches. The same watcher times the
session write's own change event: the floor (the emulator's write-to-event latency),
measured in the same run under the same load.

Prints, per feed, p50 and p99 of write -> ``users`` update and of the floor, their ratio,
and PASS or MISS against the target (change-stream feed p99 <= 50 ms). Exits 0 once it
has measured (MISS included, unless --fail-on-miss), 2 when it could not measure (a
process did not start, presenced did not keep up before the deadline, --budget seconds
passed). It stops every process it started, on failure, SIGTERM and Ctrl-C too.

Usage: .venv/bin/python tests/bench/latency.py [--changes 2000] [--rate 250] [--users 500]
       .venv/bin/python tests/bench/latency.py --smoke      (a few seconds: 90 changes)

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
from presenced.testing.simulator import RocketChatSimulator, SimulatedUser, utc_now_ms

Doc = dict[str, Any]
TARGET_P99_MS = 50.0  # on the change-stream feed
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
    marker: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


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
                seen.marker.set()
    except BaseException as exc:  # reported by the main thread
        seen.error = exc


@dataclass
class Result:
    feed: str
    latency_ms: list[float]  # session write -> users update, matched writes only
    floor_ms: list[float]  # session write -> its own change event
    writes: int
    seconds: float  # how long the writes took

    @property
    def unmatched(self) -> int:
        return self.writes - len(self.latency_ms)


def run_feed(url: str, feed: str, args: argparse.Namespace, workdir: Path,
             deadline: float) -> Result:
    name = f"bench_latency_{feed}_{uuid.uuid4().hex[:6]}"
    client: MongoClient[Doc] = MongoClient(with_database(url, name),
                                           serverSelectionTimeoutMS=10_000)
    watcher: MongoClient[Doc] = MongoClient(url, serverSelectionTimeoutMS=10_000)
    try:
        db = client[name]
        users = [f"user{n:05d}" for n in range(min(args.users, args.changes))]
        now = utc_now_ms()
        db.users.insert_many([
            SimulatedUser(id=uid, username=uid, status_default=None, status_text=None)
            .to_document(now) for uid in users
        ])
        sim = RocketChatSimulator(db, users=0, instances=1, seed=1)
        sim.setup()  # the instance's document and Rocket.Chat's indexes
        db[MARKER].insert_one({"_id": "created"})

        with daemon(url, name, feed, workdir):
            pipeline = [{"$match": {"ns.coll": {"$in": ["users", "usersSessions", MARKER]},
                                    "operationType": {"$in": ["insert", "update"]}}}]
            seen, stop_watching = Seen(), threading.Event()
            stream = watcher[name].watch(pipeline, max_await_time_ms=100)
            thread = threading.Thread(target=watch, args=(stream, seen, stop_watching),
                                      daemon=True)
            thread.start()
            try:
                writes = drive(sim, users, args.changes, args.rate, deadline)
                seconds = writes[-1].sent - writes[0].sent if len(writes) > 1 else 0.0
                wait_settled(db, users, writes, seen, deadline)
            finally:
                stop_watching.set()
                thread.join(5)
                stream.close()
        if seen.error is not None:
            raise Failed(f"the watcher failed: {seen.error!r}")
        latency, floor = match(writes, seen)
        return Result(feed, latency, floor, len(writes), seconds)
    finally:
        with suppress(Exception):
            client.drop_database(name)
        client.close()
        watcher.close()


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


def wait_settled(db: Any, users: list[str], writes: list[Write], seen: Seen,
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
    db[MARKER].insert_one({"_id": "done"})
    if not seen.marker.wait(max(0.0, give_up - time.monotonic())):
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


def report(results: list[Result], args: argparse.Namespace) -> bool:
    print(f"session write -> users update, {args.changes} changes at {args.rate:g}/s over "
          f"{min(args.users, args.changes)} users (connect / away / disconnect in turn)")
    passed = True
    for r in results:
        if not r.latency_ms or not r.floor_ms:
            print(f"{r.feed}: nothing matched")
            passed = False
            continue
        p50, p99 = figures(r.latency_ms)
        f50, f99 = figures(r.floor_ms)
        rate = (r.writes - 1) / r.seconds if r.seconds > 0 else float("nan")
        print(f"{r.feed:>12}: p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  max "
              f"{max(r.latency_ms):7.1f} ms | floor (emulator write -> change event, same run)"
              f" p50 {f50:5.1f} ms  p99 {f99:5.1f} ms | ratio p50 {p50 / f50:5.1f}  p99 "
              f"{p99 / f99:5.1f} | {len(r.latency_ms)} of {r.writes} writes matched"
              f" ({r.unmatched} not seen: folded into a later one), sent at {rate:.0f}/s")
        if r.feed == "changestream":
            verdict = "PASS" if p99 <= args.target else "MISS"
            passed = passed and verdict == "PASS"
            print(f"target: change-stream feed p99 <= {args.target:g} ms: {verdict} "
                  f"(p99 {p99:.1f} ms)")
    return passed


# -------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--changes", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=250.0, help="session writes per second")
    ap.add_argument("--users", type=int, default=500,
                    help="users written round-robin (each every users/rate seconds)")
    ap.add_argument("--feeds", default="changestream,oplog")
    ap.add_argument("--target", type=float, default=TARGET_P99_MS,
                    help="change-stream p99 target in ms")
    ap.add_argument("--smoke", action="store_true", help="a tiny run: 90 changes, 30 users")
    ap.add_argument("--budget", type=float, default=300.0,
                    help="seconds after which the benchmark gives up (and cleans up)")
    ap.add_argument("--fail-on-miss", action="store_true", help="exit 1 on a MISS")
    args = ap.parse_args()
    if args.smoke:
        args.changes, args.users = 90, 30
    if args.changes < 1 or args.users < 1 or args.rate <= 0:
        ap.error("--changes and --users must be at least 1, --rate above 0")
    feeds = [f.strip() for f in args.feeds.split(",") if f.strip()]
    if not feeds or any(f not in ("changestream", "oplog") for f in feeds):
        ap.error("--feeds takes changestream, oplog or both")

    deadline = time.monotonic() + args.budget
    results: list[Result] = []
    try:
        with budget(args.budget), tempfile.TemporaryDirectory(prefix="presenced-latency-") as tmp, \
                emulator(started=STARTED) as url:
            for feed in feeds:
                results.append(run_feed(url, feed, args, Path(tmp), deadline))
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
