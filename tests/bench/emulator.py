"""Emulator throughput and write-to-event latency.

Runs the emulator as its own process (as `make demo` and the daemon's tests see it) and
prints, on this machine:
- single-update throughput (one `update_one` round trip per Rocket.Chat heartbeat),
- bulk-update throughput (`bulk_write` of 1000 heartbeats per call),
- write-to-event latency p50/p99 through a change stream,
each beside in-process mongomock-ng doing the same updates (the engine underneath),
so the ratio is the cost of the wire protocol, capture and oplog.

Usage: .venv/bin/python tests/bench/emulator.py [--users 2000] [--updates 5000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import mongomock_ng
from pymongo import MongoClient, UpdateOne
from pymongo.collection import Collection


def start_emulator() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "presenced.testing.mongo", "--port", "0"],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("ready "):
        proc.kill()
        raise SystemExit(f"emulator did not start: {line!r}")
    return proc, line.split(" ", 1)[1]


def seed(coll: Any, users: int) -> None:
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0)
    coll.insert_many([
        {"_id": f"u{i}", "connections": [
            {"id": f"c{i}", "instanceId": "i1", "status": "online", "_createdAt": now,
             "_updatedAt": now}]}
        for i in range(users)
    ])


def heartbeat(i: int) -> tuple[dict[str, Any], dict[str, Any]]:
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    return ({"_id": f"u{i}", "connections.id": f"c{i}"},
            {"$set": {"connections.$._updatedAt": now}})


def single_updates(coll: Any, users: int, n: int) -> float:
    t = time.perf_counter()
    for k in range(n):
        coll.update_one(*heartbeat(k % users))
    return n / (time.perf_counter() - t)


def bulk_updates(coll: Any, users: int, n: int) -> float:
    t = time.perf_counter()
    done = 0
    while done < n:
        coll.bulk_write([UpdateOne(*heartbeat((done + j) % users)) for j in range(1000)],
                        ordered=False)
        done += 1000
    return done / (time.perf_counter() - t)


def event_latency(client: MongoClient[dict[str, Any]], samples: int) -> tuple[float, float]:
    coll = client.bench.latency
    coll.insert_one({"_id": "x", "n": 0})
    lat: list[float] = []
    with coll.watch(max_await_time_ms=1000) as stream:
        got = threading.Event()
        for k in range(samples):
            got.clear()
            t = time.perf_counter()
            coll.update_one({"_id": "x"}, {"$set": {"n": k + 1}})
            ev = stream.next()
            lat.append((time.perf_counter() - t) * 1000)
            assert ev["updateDescription"]["updatedFields"]["n"] == k + 1
    lat.sort()
    return statistics.median(lat), lat[int(len(lat) * 0.99) - 1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--updates", type=int, default=5000)
    ap.add_argument("--samples", type=int, default=500)
    args = ap.parse_args()

    proc, url = start_emulator()
    try:
        client: MongoClient[dict[str, Any]] = MongoClient(url)
        coll = client.bench.usersSessions
        seed(coll, args.users)
        single = single_updates(coll, args.users, args.updates)
        bulk = bulk_updates(coll, args.users, args.updates * 4)
        p50, p99 = event_latency(client, args.samples)
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    base: Collection[dict[str, Any]] = mongomock_ng.MongoClient().bench.usersSessions
    seed(base, args.users)
    base_single = single_updates(base, args.users, args.updates)

    print(f"users={args.users}")
    print(f"single update_one:  {single:9.0f} updates/s over the wire "
          f"| in-process mongomock-ng {base_single:9.0f}/s | ratio {single / base_single:.2f}")
    print(f"bulk_write x1000:   {bulk:9.0f} updates/s over the wire "
          f"| ratio to single {bulk / single:.2f}")
    print(f"write-to-event latency: p50 {p50:.2f} ms, p99 {p99:.2f} ms ({args.samples} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
