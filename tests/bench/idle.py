"""Idle daemon: presenced's CPU while it tracks N connected users and nothing happens.

Runs the emulator and ``presenced run`` as their own processes, seeds N users each with
one live connection on a live instance (stored online, Rocket.Chat's ``usersSessions``
indexes, no TTL index on ``instances`` so nothing writes during the window), starts
presenced with ``CACHE_TTL`` and ``INSTANCE_TIMEOUT`` of an hour (every user held in its
engine with a timer, none due in the window), waits for ``/ready`` and until its
``presenced_users_tracked`` gauge holds every user, lets it settle, then measures its
process's CPU time (utime + stime from /proc/<pid>/stat) over ``--seconds`` with no
traffic at all, as a percentage of one core. The emulator's own CPU over the same window
is printed beside it (its idle floor: the change stream presenced keeps open).

Emits ``idle.cpu_percent`` (target < 1% of a core). With ``--profile FILE``, py-spy
samples presenced over the window too (``py-spy record --nonblocking``, collapsed stacks
in FILE; the busiest stacks are printed): the CPU figure then includes a little of the
sampling. Exits 0 once measured, 2 when it could not measure. Stops every process it
started, on failure, SIGTERM and Ctrl-C too.

Usage: .venv/bin/python tests/bench/idle.py [--users 100000] [--seconds 60] [--smoke]
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from pymongo import ASCENDING, MongoClient

from presenced.testing.processes import Failed, budget, cpu_seconds, daemon, emulator, stop
from presenced.testing.scoreboard import Score, emit, verdict

Doc = dict[str, Any]
DB = "rocketchat"
TARGET_PERCENT = 1.0
SETTLE_S = 5.0
SMOKE_SETTLE_S = 0.5


def seed(url: str, n: int) -> None:
    client: MongoClient[Doc] = MongoClient(url)
    try:
        db = client[DB]
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        db.instances.insert_one({"_id": "i1", "name": "rc", "pid": 1, "_createdAt": now,
                                 "_updatedAt": now,
                                 "extraInformation": {"host": "127.0.0.1", "port": 3000}})
        for first in range(0, n, 10_000):
            ids = range(first, min(n, first + 10_000))
            db.users.insert_many([
                {"_id": f"u{i:06d}", "username": f"user{i}", "type": "user", "active": True,
                 "roles": ["user"], "status": "online", "statusConnection": "online",
                 "_updatedAt": now} for i in ids], ordered=False)
            db.usersSessions.insert_many([
                {"_id": f"u{i:06d}", "connections": [
                    {"id": f"c{i}", "instanceId": "i1", "status": "online",
                     "_createdAt": now, "_updatedAt": now}]} for i in ids], ordered=False)
        # Rocket.Chat's UsersSessions model indexes.
        db.usersSessions.create_index([("connections.id", ASCENDING)], sparse=True)
        db.usersSessions.create_index([("connections.instanceId", ASCENDING)], sparse=True)
    finally:
        client.close()


def tracked(port: int) -> int:
    """presenced's ``presenced_users_tracked`` gauge (-1 when it cannot be read)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return -1
    found = re.search(r"^presenced_users_tracked (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else -1


def measure(url: str, args: argparse.Namespace, workdir: Path,
            started: list[subprocess.Popen[Any]], emulator_pid: int) -> tuple[float, float]:
    seed(url, args.users)
    env = {"CACHE_TTL": "3600", "INSTANCE_TIMEOUT": "3600"}
    env.update(item.split("=", 1) for item in args.set)
    t = time.monotonic()
    with daemon(url, DB, workdir, env=env, started=started,
                ready_timeout=args.budget) as (proc, port):
        print(f"presenced ready in {time.monotonic() - t:.1f} s", flush=True)
        deadline = time.monotonic() + 60
        while (held := tracked(port)) < args.users:
            if time.monotonic() > deadline:
                raise Failed(f"presenced tracks {held} users, not {args.users}")
            time.sleep(0.2)
        time.sleep(SMOKE_SETTLE_S if args.smoke else SETTLE_S)
        print(f"presenced tracks {held} users; measuring {args.seconds:g} s of idle",
              flush=True)
        spy = None
        if args.profile:
            spy = subprocess.Popen(
                [str(Path(sys.executable).with_name("py-spy")), "record", "--nonblocking",
                 "--format", "raw", "--rate", "200", "--duration", str(int(args.seconds)),
                 "--pid", str(proc.pid), "--output", str(args.profile)],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            started.append(spy)
        p0, e0, t0 = cpu_seconds(proc.pid), cpu_seconds(emulator_pid), time.monotonic()
        time.sleep(args.seconds)
        p1, e1, t1 = cpu_seconds(proc.pid), cpu_seconds(emulator_pid), time.monotonic()
        if spy is not None:
            spy.wait(30)
            hottest(args.profile)
        if proc.poll() is not None:
            raise Failed(f"presenced exited with {proc.returncode} during the window")
        if (held := tracked(port)) < args.users:
            raise Failed(f"presenced tracks {held} users after the window, not {args.users}")
    elapsed = t1 - t0
    return 100 * (p1 - p0) / elapsed, 100 * (e1 - e0) / elapsed


def hottest(profile: Path, top: int = 12) -> None:
    """The functions with the most samples in py-spy's collapsed stacks: where each sample
    was (self) and what it was under (inclusive)."""
    own: dict[str, int] = {}
    under: dict[str, int] = {}
    total = 0
    for line in profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            under[frame] = under.get(frame, 0) + n
    print(f"py-spy: {total} samples of a busy presenced (idle threads not sampled)")
    for title, table in (("self", own), ("inclusive", under)):
        print(f"  hottest ({title}):")
        for frame, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            print(f"    {n:6d} {100 * n / max(total, 1):5.1f}%  {frame}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--smoke", action="store_true", help="a tiny run: 200 users, 2 s")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run")
    ap.add_argument("--profile", type=Path, help="py-spy's collapsed stacks of the window")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting of presenced's environment (an experiment)")
    args = ap.parse_args()
    if args.smoke:
        args.users, args.seconds = 200, 2.0
    started: list[subprocess.Popen[Any]] = []
    t = time.monotonic()
    try:
        with budget(args.budget), tempfile.TemporaryDirectory(prefix="presenced-idle-") as tmp, \
                emulator("--oplog-size", str(3 * args.users + 10_000), started=started) as url:
            cpu, floor = measure(url, args, Path(tmp), started, started[0].pid)
    except Failed as exc:
        print(f"idle benchmark could not measure: {exc}", file=sys.stderr)
        return 2
    finally:
        for proc in reversed(started):
            stop(proc)
    print(f"idle: presenced {cpu:.2f}% of a core over {args.seconds:g} s with {args.users} "
          f"users tracked; the emulator {floor:.2f}% over the same window")
    emit(Score(
        key="idle.cpu_percent", measure=f"idle daemon, {args.users:,} users, {args.seconds:g} s",
        target=f"< {TARGET_PERCENT:g}% of a core", measured=f"{cpu:.2f}% of a core",
        reference="-", ratio="-", verdict=verdict(cpu < TARGET_PERCENT, smoke=args.smoke),
        note=f"emulator beside it: {floor:.2f}% of a core"
             + (f"; set {' '.join(args.set)}" if args.set else "")))
    print(f"(measured in {time.monotonic() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
