"""Reconnect storm: presenced beside Rocket.Chat's own presence service, on one emulator.

Runs the emulator and ``presenced run`` as their own processes, seeds N users each
connected once (Rocket.Chat's writes, Rocket.Chat's ``usersSessions`` indexes), waits
until presenced has them all online, then every user disconnects and reconnects: 2N
connection events written as Rocket.Chat writes them (the verbatim ``updateMany
{"connections.id": c} $pull`` and ``updateOne {_id} $push upsert`` of
:class:`~presenced.testing.simulator.RocketChatSimulator`), by ``--writers`` threads, each
a Rocket.Chat instance with its share of the users; every user disconnects first, then
every user reconnects (a proxy restart).

Measured, each phase from its first storm write:
- presenced: the MongoDB commands (round trips) its process sent per connection event
  (the emulator's counters per client ``appName``: presenced's own, the load generator's
  are not in them), and the time until it has processed the storm (a marker user's
  connection, written last, is online) and every user is online;
- the reference, with presenced stopped: the same storm again, each event followed, in
  the thread that wrote it, by Rocket.Chat's ``updateUserPresence`` (read the user, read
  the sessions, write the user if its status changed: 3 commands), through its own
  client; the same figures, measured, not assumed.

The unit is the command, a round trip: Rocket.Chat's 3 per event are 3 commands
(findOne, findOne, updateOne). MongoDB's ``opcounters`` count each statement of a bulk
write as one operation, and every user here is really offline for about 1.7 s, so both
designs write one update statement per real transition (6,000 at the default size):
statements cannot fall below the transitions, whatever the batching. The output shows
beside the commands the operations as opcounters count them, the update statements,
the transitions presenced announced (its ``/metrics``) and the documents it read
(``serverStatus.documentsReturnedByAppName``, emulator only: users and sessions by
``find``, change events by ``getMore``).

Emits ``storm.ops_per_event`` (commands per event, target <= 0.1) and
``storm.converge_ratio`` (presenced's time over the reference's: target <= 1) as SCORE
lines. Exits 0 once measured, 2 when it
could not measure. Stops every process it started, on failure, SIGTERM and Ctrl-C too.

Usage: .venv/bin/python tests/bench/daemon.py [--users 3000] [--writers 4] [--smoke]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import PyMongoError

from presenced.testing.processes import Failed, budget, daemon, emulator, stop
from presenced.testing.scoreboard import Score, emit, verdict
from presenced.testing.simulator import RocketChatSimulator, SimulatedUser, utc_now_ms

Doc = dict[str, Any]
DB = "rocketchat"
LOAD_APP = "storm-load"
REFERENCE_APP = "rocketchat-presence-reference"
PRESENCED_APP = "presenced"  # the appname presenced's clients give (daemon.py)
OPS_TARGET = 0.1
CONVERGE_LIMIT_S = 300.0


Counts = tuple[Counter[str], Counter[str], Counter[str]]


def app_ops(client: MongoClient[Doc], app: str) -> Counts:
    """What the emulator counted for clients named ``app`` so far: the operations by kind
    (as ``opcounters`` counts: a write one per statement), the commands (round trips) by
    name, and the documents returned by cursor commands by name."""
    status = client.admin.command("serverStatus")
    if "opcountersByAppName" not in status:
        raise Failed("the server keeps no opcounters per appName (the emulator does)")

    def of(field: str) -> Counter[str]:
        return Counter({k: int(v) for k, v in status.get(field, {}).get(app, {}).items()})

    return (of("opcountersByAppName"), of("commandsByAppName"),
            of("documentsReturnedByAppName"))


def since(now: Counts, before: Counts) -> Counts:
    return now[0] - before[0], now[1] - before[1], now[2] - before[2]


def transitions_announced(port: int) -> int:
    """presenced's ``presenced_transitions_total``, every reason and status, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("presenced_transitions_total{")))


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise Failed(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def user_presence(db: Database[Doc], uid: str) -> None:
    """Rocket.Chat's ``Presence.updateUserPresence``: read the user, read its sessions,
    write its status when it changed (the ``$or`` filter writes nothing otherwise)."""
    user = db.users.find_one({"_id": uid}, {"username": 1, "statusDefault": 1,
                                            "statusConnection": 1, "status": 1})
    if user is None:
        return
    sessions = db.usersSessions.find_one({"_id": uid}) or {}
    statuses = [c.get("status", "online") for c in sessions.get("connections", [])]
    connection = ("online" if "online" in statuses else "away" if "away" in statuses
                  else "busy" if "busy" in statuses else "offline")
    default = user.get("statusDefault") or "online"
    status = connection if connection == "offline" or default == "online" else default
    db.users.update_one({"_id": uid, "$or": [{"status": {"$ne": status}},
                                             {"statusConnection": {"$ne": connection}}]},
                        {"$set": {"status": status, "statusConnection": connection}})


@dataclass
class Writer:
    """One Rocket.Chat instance: a simulator over its share of the users."""

    sim: RocketChatSimulator
    users: list[str]
    connection: dict[str, str]


def in_threads(writers: list[Writer], work: Callable[[Writer], None]) -> None:
    errors: list[BaseException] = []

    def run(w: Writer) -> None:
        try:
            work(w)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise Failed(f"a writer failed: {errors[0]!r}")


def storm(writers: list[Writer], reference: Database[Doc] | None) -> None:
    """Every user disconnects, then every user reconnects; with ``reference``, each event
    is followed by Rocket.Chat's presence update through that database's client."""

    def work(w: Writer) -> None:
        for uid in w.users:
            w.sim.disconnect(w.connection.pop(uid))
            if reference is not None:
                user_presence(reference, uid)
        for uid in w.users:
            w.connection[uid] = w.sim.connect(uid)
            if reference is not None:
                user_presence(reference, uid)

    in_threads(writers, work)


@dataclass
class Phase:
    counted: Counts
    writes_s: float
    converge_s: float
    transitions: int | None = None

    @property
    def ops(self) -> int:
        return sum(self.counted[0].values())

    @property
    def round_trips(self) -> int:
        return sum(self.counted[1].values())

    @property
    def statements(self) -> int:
        return self.counted[0]["update"]

    def kinds(self) -> str:
        return (f"{self.round_trips} commands {dict(+self.counted[1])}; operations as "
                f"opcounters count them {dict(+self.counted[0])}; documents returned "
                f"{dict(+self.counted[2])}")


def all_online(db: Database[Doc], n: int) -> bool:
    return db.users.count_documents({"status": "online"}) >= n


def run(url: str, n: int, n_writers: int, workdir: Path,
        started: list[subprocess.Popen[Any]]) -> tuple[Phase, Phase]:
    load: MongoClient[Doc] = MongoClient(url, appname=LOAD_APP)
    ref_client: MongoClient[Doc] = MongoClient(url, appname=REFERENCE_APP)
    try:
        db = load[DB]
        now = utc_now_ms()
        users = [f"u{i:05d}" for i in range(n)]
        db.users.insert_many([SimulatedUser(uid, f"user{uid}", None, None).to_document(now)
                              for uid in [*users, "marker"]])
        writers = [Writer(RocketChatSimulator(db, users=0, instances=1, seed=k + 1),
                          users[k::n_writers], {}) for k in range(n_writers)]
        for w in writers:
            w.sim.setup()  # the instance's document, Rocket.Chat's indexes

        def connect_all(w: Writer) -> None:
            for uid in w.users:
                w.connection[uid] = w.sim.connect(uid)

        in_threads(writers, connect_all)
        beat = threading.Event()

        def heartbeat() -> None:  # the instances must outlive their 60 s TTL index
            while not beat.wait(10):
                for w in writers:
                    for instance in w.sim.live_instance_ids():
                        with suppress(PyMongoError):  # the run is ending: no matter
                            db.instances.update_one({"_id": instance},
                                                    {"$set": {"_updatedAt": utc_now_ms()}})

        beating = threading.Thread(target=heartbeat, daemon=True)
        beating.start()
        try:
            env = {"CACHE_TTL": "3600", "INSTANCE_TIMEOUT": "3600"}
            with daemon(url, DB, workdir, env=env, started=started,
                        ready_timeout=120) as (_, port):
                wait(lambda: all_online(db, n), 120, "presenced to bring every user online")
                before = app_ops(load, PRESENCED_APP)
                transitions = transitions_announced(port)
                t0 = time.monotonic()
                storm(writers, None)
                writes_s = time.monotonic() - t0
                writers[0].sim.connect("marker")  # written last: processed last
                wait(lambda: all_online(db, n + 1), CONVERGE_LIMIT_S,
                     "presenced to process the storm")
                converge_s = time.monotonic() - t0
                ops = since(app_ops(load, PRESENCED_APP), before)
                transitions = transitions_announced(port) - transitions
            presenced = Phase(ops, writes_s, converge_s, transitions)

            before = app_ops(load, REFERENCE_APP)
            t0 = time.monotonic()
            storm(writers, ref_client[DB])
            writes_s = time.monotonic() - t0
            wait(lambda: all_online(db, n), 10, "the reference to leave every user online")
            converge_s = time.monotonic() - t0
            reference = Phase(since(app_ops(load, REFERENCE_APP), before), writes_s,
                              converge_s)
        finally:
            beat.set()
            beating.join(10)
        return presenced, reference
    finally:
        load.close()
        ref_client.close()


def report(n: int, presenced: Phase, reference: Phase, smoke: bool, writers: int) -> None:
    events = 2 * n
    p_cmd, r_cmd = presenced.round_trips / events, reference.round_trips / events
    print(f"reconnect storm: {n} users x 2 = {events} connection events, {writers} writers")
    print(f"  presenced: {presenced.round_trips} MongoDB commands ({p_cmd:.3f}/event), "
          f"{presenced.statements} update statements for {presenced.transitions} "
          f"transitions announced; storm written in {presenced.writes_s:.2f} s, converged "
          f"{presenced.converge_s:.2f} s after its first write;\n    {presenced.kinds()}")
    print(f"  reference (Rocket.Chat's updateUserPresence per event): "
          f"{reference.round_trips} commands ({r_cmd:.2f}/event), {reference.statements} "
          f"update statements; storm and updates done in {reference.writes_s:.2f} s, "
          f"converged {reference.converge_s:.2f} s;\n    {reference.kinds()}")
    read = presenced.counted[2]
    note = (f"{n} users x 2, {writers} writers; unit: commands (round trips), Rocket.Chat's "
            f"3 = findOne, findOne, updateOne. presenced: {presenced.statements} update "
            f"statements ({presenced.ops / events:.3f} opcounter ops/event) for "
            f"{presenced.transitions} transitions announced, {read['find']} documents read "
            f"by find, {read['getMore']} change events by getMore; reference: "
            f"{reference.statements} update statements ({reference.ops / events:.2f} ops/event)")
    emit(Score(
        key="storm.ops_per_event",
        measure="reconnect storm: MongoDB commands (round trips) per connection event",
        target=f"<= {OPS_TARGET:g} commands/event", measured=f"{p_cmd:.3f} commands/event",
        reference=f"{r_cmd:.2f} commands/event (Rocket.Chat's 3, run)",
        ratio=f"{p_cmd / r_cmd:.3f}x" if r_cmd else "-",
        verdict=verdict(p_cmd <= OPS_TARGET, smoke=smoke), note=note))
    ratio = presenced.converge_s / reference.converge_s
    emit(Score(
        key="storm.converge_ratio", measure="reconnect storm: time to converge",
        target="no later than the reference", measured=f"{presenced.converge_s:.2f} s",
        reference=f"{reference.converge_s:.2f} s (Rocket.Chat's 3, run)",
        ratio=f"{ratio:.2f}x", verdict=verdict(ratio <= 1.0, smoke=smoke),
        note=f"{n} users x 2, {writers} writers"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--writers", type=int, default=4, help="Rocket.Chat instances writing")
    ap.add_argument("--smoke", action="store_true", help="a tiny run: 50 users, 2 writers")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the whole run")
    args = ap.parse_args()
    if args.smoke:
        args.users, args.writers = 50, 2
    started: list[subprocess.Popen[Any]] = []
    t = time.monotonic()
    try:
        with budget(args.budget), tempfile.TemporaryDirectory(prefix="presenced-storm-") as tmp, \
                emulator("--oplog-size", str(20 * args.users + 10_000), started=started) as url:
            presenced, reference = run(url, args.users, args.writers, Path(tmp), started)
    except Failed as exc:
        print(f"storm benchmark could not measure: {exc}", file=sys.stderr)
        return 2
    finally:
        for proc in reversed(started):
            stop(proc)
    report(args.users, presenced, reference, args.smoke, args.writers)
    print(f"(measured in {time.monotonic() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
