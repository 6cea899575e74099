"""The daemon under load: start-up reconciliation and a reconnect storm.

Runs the emulator and `presenced run` as their own processes, seeds N users who are
connected but stored offline, and prints:
- start-up: seconds until every user is online (reconciliation of N users),
- reconnect storm: every user disconnects and reconnects (2N connection events, written
  as Rocket.Chat writes them); seconds until presenced has processed them, and the MongoDB
  operations presenced spent on them, beside Rocket.Chat's own presence service, which
  spends 3 per connection event (read the user, read the sessions, write the user).

Usage: .venv/bin/python tests/bench/daemon.py [--users 3000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from pymongo import MongoClient, UpdateMany, UpdateOne

from presenced.testing.processes import emulator, free_port, ready, stop, with_database

DB = "rocketchat"


def wait(predicate: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def ops(client: MongoClient[dict[str, Any]]) -> dict[str, int]:
    c = client.admin.command("serverStatus")["opcounters"]
    return {k: int(c[k]) for k in ("query", "update", "getmore", "insert", "delete")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=3000)
    args = ap.parse_args()
    n = args.users

    with emulator() as url:
        return run(url, n)


def run(url: str, n: int) -> int:
    client: MongoClient[dict[str, Any]] = MongoClient(url)
    db = client[DB]
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    db.instances.insert_one({"_id": "i1", "_updatedAt": now, "name": "rc"})
    db.users.insert_many([{"_id": f"u{i}", "username": f"user{i}", "active": True,
                           "status": "offline", "statusConnection": "offline"}
                          for i in range(n)])
    db.usersSessions.insert_many([
        {"_id": f"u{i}", "connections": [{"id": f"c{i}", "instanceId": "i1",
                                          "status": "online", "_createdAt": now,
                                          "_updatedAt": now}]}
        for i in range(n)])
    # Rocket.Chat's UsersSessions model indexes (the emulator uses them since issue 9).
    db.usersSessions.create_index("connections.id", sparse=True)
    db.usersSessions.create_index("connections.instanceId", sparse=True)

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {"PATH": os.environ.get("PATH", ""), "HOME": tmp,
               "MONGO_URL": with_database(url, DB), "HEALTH_CHECK_PORT": str(port),
               "PORT": str(port), "LOG_LEVEL": "warning", "SYNC_INTERVAL": "1000",
               "INSTANCE_TIMEOUT": "3600"}
        daemon = subprocess.Popen([sys.executable, "-m", "presenced", "run"], env=env, cwd=tmp)
        try:
            t_start = time.monotonic()
            wait(lambda: db.users.count_documents({"status": "online"}) == n, 600,
                 "start-up reconciliation")
            startup = time.monotonic() - t_start
            wait(lambda: ready(port), 60, "/ready")

            # Reconnect storm: each user drops its connection and opens a new one.
            before = ops(client)
            now = dt.datetime.now(dt.UTC).replace(microsecond=0)
            storm: list[UpdateMany | UpdateOne] = [
                UpdateMany({"connections.id": f"c{i}"}, {"$pull": {"connections": {"id": f"c{i}"}}})
                for i in range(n)]
            storm += [UpdateOne({"_id": f"u{i}"}, {"$push": {"connections": {
                "id": f"r{i}", "instanceId": "i1", "status": "online", "_createdAt": now,
                "_updatedAt": now}}}, upsert=True) for i in range(n)]
            t_storm = time.monotonic()
            for start in range(0, len(storm), 1000):
                db.usersSessions.bulk_write(storm[start:start + 1000], ordered=False)
            writes_s = time.monotonic() - t_storm
            # A marker user connecting last: once presenced wrote it, the storm is processed.
            db.users.insert_one({"_id": "marker", "username": "marker", "active": True})
            db.usersSessions.update_one({"_id": "marker"}, {"$push": {"connections": {
                "id": "m", "instanceId": "i1", "status": "online", "_createdAt": now,
                "_updatedAt": now}}}, upsert=True)
            wait(lambda: (db.users.find_one({"_id": "marker"}) or {}).get("status") == "online",
                 600, "the storm to be processed")
            storm_s = time.monotonic() - t_storm
            after = ops(client)
            online = db.users.count_documents({"status": "online"})
        finally:
            stop(daemon)
            client.close()

    events = 2 * n
    rc_writes = 2 * n + 1 + 1  # the storm's statements, the marker's insert and push
    presenced_ops = (after["query"] - before["query"]) + (after["getmore"] - before["getmore"]) \
        + (after["update"] - before["update"]) - (rc_writes - 1)
    rocketchat_ops = 3 * events
    print(f"users={n}")
    print(f"start-up reconciliation: {n} users online in {startup:.1f} s ({n / startup:.0f}"
          " users/s)")
    print(f"reconnect storm: {events} connection events; Rocket.Chat's writes took "
          f"{writes_s:.1f} s on the emulator (bulk writes of 1000, with Rocket.Chat's "
          f"indexes), presenced had processed all of them {storm_s - writes_s:.1f} s after the"
          f" last write; {online - 1} of {n} users online after it")
    print(f"MongoDB operations for the storm: presenced {presenced_ops} "
          f"({presenced_ops / events:.3f} per event) | Rocket.Chat's presence {rocketchat_ops} "
          f"(3 per event) | ratio {presenced_ops / rocketchat_ops:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
