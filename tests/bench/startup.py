"""Start-up on a large database: ``presenced run`` until /ready, beside a bare driver scan.

Runs the emulator (``python -m presenced.testing.mongo``) as its own process, seeds N users
as Rocket.Chat leaves them after a crash of the previous presence service (each with one
fresh connection, stored offline), times a bare scan of ``usersSessions`` ids with the
driver (the floor the emulator sets), then starts ``presenced run`` and times it until
``/ready`` answers 200, that is until the start-up reconciliation has checked and written
every user. Prints both figures, their ratio and how many users ended online.

The issue it guards: on main before the reconciliation was paged, a 100,000-user start-up
never finished (the first scan outlasted the client's timeouts and started over forever).

Usage: .venv/bin/python tests/bench/startup.py [--users 20000]   (--users 100000: minutes)
Exits 0 once measured, 2 if presenced was not ready within --budget seconds. It stops
every process it started, on failure and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from presenced.testing.processes import Failed, emulator, free_port, ready, stop, with_database


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--budget", type=float, default=1500.0, help="seconds to wait for /ready")
    args = parser.parse_args()
    procs: list[subprocess.Popen[Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="presenced-startup-"))
    try:
        with emulator("--oplog-size", str(3 * args.users + 1000), started=procs) as url:
            return measure(url, args.users, args.budget, workdir, procs)
    except Failed as exc:
        print(f"start-up benchmark could not measure: {exc}", file=sys.stderr)
        return 2
    finally:
        for proc in reversed(procs):
            stop(proc)


def measure(
    url: str, users: int, budget: float, workdir: Path, procs: list[subprocess.Popen[Any]]
) -> int:
    client: MongoClient[dict[str, Any]] = MongoClient(url)
    db = client.rocketchat
    now = dt.datetime.now(dt.UTC)
    started = time.monotonic()
    for first in range(0, users, 10_000):
        ids = [f"user{n:07d}" for n in range(first, min(users, first + 10_000))]
        db.users.insert_many([
            {"_id": u, "username": u, "active": True, "status": "offline",
             "statusConnection": "offline"} for u in ids
        ])
        db.usersSessions.insert_many([
            {"_id": u, "connections": [{"id": f"c-{u}", "instanceId": "i1",
                                        "status": "online", "_createdAt": now,
                                        "_updatedAt": now}]} for u in ids
        ])
    print(f"seeded {users} users in {time.monotonic() - started:.1f} s", flush=True)
    started = time.monotonic()
    scanned = sum(1 for _ in db.usersSessions.find({}, {"_id": 1}))
    scan_s = time.monotonic() - started
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(workdir),
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "MONGO_URL": with_database(url, "rocketchat"), "HEALTH_CHECK_PORT": str(port),
        "PORT": str(free_port()), "CACHE_TTL": "3600", "LOG_LEVEL": "info",
    }
    log = workdir / "presenced.log"
    started = time.monotonic()
    with log.open("wb") as out:
        daemon = subprocess.Popen([sys.executable, "-m", "presenced", "run"], env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    procs.append(daemon)
    while not ready(port):
        if daemon.poll() is not None or time.monotonic() - started > budget:
            raise Failed(f"presenced not ready after {time.monotonic() - started:.0f} s;"
                         f" its log: {log}")
        time.sleep(0.5)
    ready_s = time.monotonic() - started
    online = db.users.count_documents({"status": "online"})
    print(f"bare driver scan of {scanned} usersSessions ids: {scan_s:.1f} s")
    print(f"presenced start-up to /ready with {users} users: {ready_s:.1f} s"
          f" ({users / ready_s:.0f} users/s), {online} users online")
    print(f"ratio start-up / bare scan: {ready_s / scan_s:.1f}")
    client.close()
    return 0

if __name__ == "__main__":
    sys.exit(main())
