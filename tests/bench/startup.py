"""Start-up reconciliation on a large database, beside a bare driver scan in the same run.

Runs the emulator (``python -m presenced.testing.mongo``) as its own process and seeds N
users (default 100,000), each with one fresh connection. Then, in each round:

- the reference: a bare driver scan of what reconciliation must read, in the same run on
  the same emulator: ``list(usersSessions.find({"connections.0": {$exists: true}},
  {connections: 1}))`` plus ``list(users.find({}, <USER_FIELDS>))``, both whole, one after
  the other, in this (benchmark) process. This is the emulator's floor: presenced cannot
  read the same documents faster than one client reading them back to back (presenced
  reads both collections whole, by ``_id``; here every user has a connection, so these
  are the same documents);
- cold: every user stored offline but connected (as Rocket.Chat leaves them after a crash
  of the previous presence service), so every user is written: ``presenced run`` is timed
  from its start until ``/ready`` answers 200 (the start-up reconciliation is done);
- warm: the same database, every user now stored right: presenced is restarted and timed
  again to ``/ready``; nothing is written;
- the write floor: the writes a cold start-up must make, made bare: the same conditional
  ``$set`` of every user's status (``Store.write_statuses``, 500 per ``bulk_write``, one
  after another), here back to offline for the next round. Printed beside the cold figure:
  when the bare scan plus these writes already take more than the target, the cold miss is
  the emulator's floor (verdict FLOOR), not presenced's.

Each figure is the median of ``--rounds`` rounds; the ratios are start-up / reference.
Prints the figures and one ``SCORE`` line each for ``startup.warm_ratio`` and
``startup.cold_ratio`` (target: at most 2x the reference). The start-up time includes
presenced's own process start (imports, settings, connecting), printed apart as the time
to ``/health`` where it helps reading the figure.

Usage: flock /tmp/presenced-bench.lock .venv/bin/python tests/bench/startup.py
           [--users 100000] [--rounds 3]
       .venv/bin/python tests/bench/startup.py --smoke   (200 users, one round, judges nothing)
Exits 0 once measured, 2 if it could not measure (presenced not ready within --budget). It
stops every process it started, on failure, SIGTERM and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from pymongo.database import Database

from presenced.presence import USER_FIELDS, Collections
from presenced.store import StatusWrite, Store
from presenced.testing.processes import (
    Failed,
    budget,
    emulator,
    free_port,
    ready,
    stop,
    with_database,
)
from presenced.testing.scoreboard import Score, emit, verdict

TARGET_RATIO = 2.0
Doc = dict[str, Any]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=900.0,
                        help="seconds for the whole run before it gives up")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run: 200 users, one round; judges nothing")
    args = parser.parse_args()
    if args.smoke:
        args.users, args.rounds = 200, 1
    procs: list[subprocess.Popen[Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="presenced-startup-"))
    try:
        with budget(args.budget), emulator(
            "--oplog-size", str(4 * args.users + 1000), started=procs
        ) as url:
            return measure(url, args.users, args.rounds, args.smoke, workdir, procs)
    except Failed as exc:
        print(f"start-up benchmark could not measure: {exc}", file=sys.stderr)
        return 2
    finally:
        for proc in reversed(procs):
            stop(proc)


def seed(db: Database[Doc], users: int) -> None:
    now = dt.datetime.now(dt.UTC)
    for first in range(0, users, 10_000):
        ids = [f"user{n:07d}" for n in range(first, min(users, first + 10_000))]
        db.users.insert_many([
            {"_id": u, "username": u, "active": True, "roles": ["user"], "type": "user",
             "status": "offline", "statusConnection": "offline"} for u in ids
        ])
        db.usersSessions.insert_many([
            {"_id": u, "connections": [{"id": f"c-{u}", "instanceId": "i1",
                                        "status": "online", "_createdAt": now,
                                        "_updatedAt": now}]} for u in ids
        ])


def bare_scan(db: Database[Doc]) -> tuple[float, int]:
    """The reference: every document reconciliation must read, read back to back."""
    started = time.monotonic()
    sessions = list(db.usersSessions.find({"connections.0": {"$exists": True}},
                                          {"connections": 1}))
    users = list(db.users.find({}, dict.fromkeys(USER_FIELDS, 1)))
    return time.monotonic() - started, len(sessions) + len(users)


def write_floor(client: MongoClient[Doc], users: int) -> float:
    """The bare writes of a cold start-up, made back to offline; their seconds."""
    store = Store(client, Collections("rocketchat"))
    ids = [f"user{n:07d}" for n in range(users)]
    started = time.monotonic()
    for first in range(0, users, 500):
        outcome = store.write_statuses([
            StatusWrite(u, "offline", "offline", "online", "online")
            for u in ids[first : first + 500]
        ])
        if outcome.conflicts:
            raise Failed(f"{len(outcome.conflicts)} users were not stored online")
    return time.monotonic() - started


def start_up(url: str, workdir: Path, procs: list[subprocess.Popen[Any]], name: str) -> float:
    """Seconds from starting ``presenced run`` until /ready; the process is stopped after."""
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(workdir),
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "MONGO_URL": with_database(url, "rocketchat"), "HEALTH_CHECK_PORT": str(port),
        "PORT": str(free_port()), "CACHE_TTL": "3600", "LOG_LEVEL": "info",
    }
    log = workdir / f"presenced-{name}.log"
    started = time.monotonic()
    with log.open("wb") as out:
        daemon = subprocess.Popen([sys.executable, "-m", "presenced", "run"], env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    procs.append(daemon)
    try:
        while not ready(port):
            if daemon.poll() is not None:
                raise Failed(f"presenced exited ({daemon.returncode}); its log: {log}")
            time.sleep(0.05)
        return time.monotonic() - started
    finally:
        stop(daemon)
        procs.remove(daemon)


def measure(
    url: str, users: int, rounds: int, smoke: bool, workdir: Path,
    procs: list[subprocess.Popen[Any]],
) -> int:
    client: MongoClient[Doc] = MongoClient(url)
    db = client.rocketchat
    started = time.monotonic()
    seed(db, users)
    print(f"seeded {users} users in {time.monotonic() - started:.1f} s", flush=True)
    scans: list[float] = []
    colds: list[float] = []
    warms: list[float] = []
    writes: list[float] = []
    read = 0
    for n in range(rounds):  # every user stored offline (seeded so, or by the write floor)
        scan_s, read = bare_scan(db)
        scans.append(scan_s)
        colds.append(start_up(url, workdir, procs, f"cold-{n}"))
        online = db.users.count_documents({"status": "online"})
        if online != users:
            raise Failed(f"cold start-up left {users - online} of {users} users not online")
        warms.append(start_up(url, workdir, procs, f"warm-{n}"))
        writes.append(write_floor(client, users))
        print(f"round {n + 1}: reference {scan_s:.2f} s, cold {colds[-1]:.2f} s,"
              f" warm {warms[-1]:.2f} s, write floor {writes[-1]:.2f} s", flush=True)
    client.close()
    scan, cold, warm, write = (statistics.median(v) for v in (scans, colds, warms, writes))
    reference = (f"bare scan {scan:.2f} s ({read} docs: usersSessions with connections"
                 " + users, projected)")
    print(f"reference, {reference}")
    print(f"write floor: {users} conditional status writes made bare, 500 per bulk_write:"
          f" {write:.2f} s; bare scan + writes = {(scan + write) / scan:.2f}x the bare scan")
    for key, case, figure, floor in (
        ("startup.warm_ratio", "warm (nothing to write)", warm, scan),
        ("startup.cold_ratio", "cold (every user written)", cold, scan + write),
    ):
        ratio = figure / scan
        print(f"start-up to /ready, {case}, {users} users: {figure:.2f} s"
              f" ({users / figure:.0f} users/s), {ratio:.2f}x the bare scan,"
              f" {figure / floor:.2f}x the emulator's floor for it ({floor:.2f} s)")
        emit(Score(
            key=key, measure=f"start-up reconciliation, {case}",
            target=f"<= {TARGET_RATIO:g}x the bare scan",
            measured=f"{figure:.2f} s", reference=f"{scan:.2f} s bare scan",
            ratio=f"{ratio:.2f}x",
            verdict=verdict(ratio <= TARGET_RATIO, smoke=smoke,
                            floor_explains=floor / scan > TARGET_RATIO),
            note=f"{users} users, median of {rounds}; {reference}; emulator floor for this"
                 f" case (bare scan + bare writes) {floor:.2f} s = {floor / scan:.2f}x;"
                 " time to /ready includes the process start",
        ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
