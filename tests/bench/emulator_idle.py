"""Idle CPU of the MongoDB emulator while a change stream and an oplog tail sit waiting.

Run: ``.venv/bin/python tests/bench/emulator_idle.py [--seconds 10] [--target 2.0]``

Starts ``python -m presenced.testing.mongo --port 0`` in a subprocess, opens one idle change
stream (``db.c.watch(max_await_time_ms=1000)`` polled with ``try_next()``) and one idle oplog
tail (tailable-await cursor) in this process, and measures the emulator process's CPU time
(utime + stime from /proc/<pid>/stat) over the window. Emits ``emulator.idle_cpu_percent``
(a SCORE line); exits 0 once measured (1 on a miss with --fail-on-miss), 2 when it could
not measure. Stops the emulator on failure, SIGTERM and Ctrl-C too.
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pymongo import CursorType, MongoClient
from pymongo.errors import OperationFailure

from presenced.testing.processes import budget
from presenced.testing.scoreboard import Score, emit, verdict

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 30.0
POLLS: Counter[str] = Counter()  # completed getMores per waiter


def python_executable() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is parenthesised and may contain spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def start_emulator() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [python_executable(), "-m", "presenced.testing.mongo", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    result: list[str] = []

    def read_ready() -> None:
        assert proc.stdout is not None
        result.append(proc.stdout.readline())

    reader = threading.Thread(target=read_ready, daemon=True)
    reader.start()
    try:
        reader.join(READY_TIMEOUT)
    except BaseException:  # out of budget, SIGTERM, Ctrl-C: not left running
        proc.kill()
        proc.wait()
        raise
    line = result[0].strip() if result else ""
    if not line.startswith("ready "):
        proc.kill()
        proc.wait()
        raise SystemExit(f"emulator did not report ready (got {line!r})")
    # Keep draining stdout so the emulator never blocks on a full pipe.
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, line.split(" ", 1)[1]


def stop_emulator(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            return proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def idle_change_stream(
    client: MongoClient[Any], stop: threading.Event, ready: threading.Event
) -> None:
    with client.bench.c.watch(max_await_time_ms=1000) as stream:
        while not stop.is_set() and stream.alive:
            stream.try_next()
            POLLS["change stream"] += 1
            ready.set()  # one awaited getMore has completed


def idle_oplog_tail(
    client: MongoClient[Any], stop: threading.Event, ready: threading.Event
) -> None:
    oplog = client.local["oplog.rs"]
    last = oplog.find_one({}, sort=[("$natural", -1)])
    query: dict[str, Any] = {"ts": {"$gt": last["ts"]}} if last else {}
    empty_batches = 0
    while not stop.is_set():
        cursor = oplog.find(query, cursor_type=CursorType.TAILABLE_AWAIT).max_await_time_ms(1000)
        try:
            while not stop.is_set() and cursor.alive:
                try:
                    cursor.next()
                except StopIteration:
                    POLLS["oplog tail"] += 1
                    empty_batches += 1
                    if empty_batches >= 2:  # the initial find and one awaited getMore
                        ready.set()
        except OperationFailure as exc:
            if not query:
                raise
            # Keep the bench usable if the server rejects the ts filter: tail everything.
            print(f"warning: ts-filtered oplog tail failed (code {exc.code}); tailing unfiltered")
            query, empty_batches = {}, 0
        finally:
            cursor.close()


def run_recording_failure(
    target: Any, failures: list[BaseException], *args: Any
) -> threading.Thread:
    def run() -> None:
        try:
            target(*args)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, name=target.__name__, daemon=True)
    thread.start()
    return thread


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--target", type=float, default=2.0, help="percent of one core")
    parser.add_argument("--smoke", action="store_true", help="a tiny run: 2 s")
    parser.add_argument("--fail-on-miss", action="store_true", help="exit 1 on a miss")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds for the run")
    args = parser.parse_args()
    if args.smoke:
        args.seconds = 2.0
    with budget(args.budget):
        return measure(args)


def measure(args: argparse.Namespace) -> int:
    proc, url = start_emulator()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    failures: list[BaseException] = []
    client: MongoClient[Any] = MongoClient(url, serverSelectionTimeoutMS=10_000)
    try:
        print(f"emulator pid {proc.pid} at {url}", flush=True)
        client.bench.c.insert_one({"_id": "seed"})  # the watched collection exists
        stream_ready, tail_ready = threading.Event(), threading.Event()
        threads = [
            run_recording_failure(idle_change_stream, failures, client, stop, stream_ready),
            run_recording_failure(idle_oplog_tail, failures, client, stop, tail_ready),
        ]
        if not (stream_ready.wait(READY_TIMEOUT) and tail_ready.wait(READY_TIMEOUT)):
            print(f"the change stream or the oplog tail did not open: {failures!r}")
            return 2
        polls_before = POLLS.copy()
        before, started = cpu_seconds(proc.pid), time.monotonic()
        stop.wait(args.seconds)
        after, elapsed = cpu_seconds(proc.pid), time.monotonic() - started
        polls = POLLS - polls_before
        alive = all(thread.is_alive() for thread in threads)
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
        client.close()
        code = stop_emulator(proc)
        print(f"emulator exited with {code}", flush=True)

    if failures or not alive:
        print(f"a waiter failed during the measurement, figure not valid: {failures!r}")
        return 2
    print(f"empty awaited batches in {elapsed:.1f} s: {dict(polls)}")
    percent = 100.0 * (after - before) / elapsed
    print(f"idle CPU: {percent:.2f}% of a core (target < {args.target:g}%)")
    emit(Score(key="emulator.idle_cpu_percent",
               measure=f"emulator idle, a change stream and an oplog tail, {elapsed:.0f} s",
               target=f"< {args.target:g}% of a core", measured=f"{percent:.2f}% of a core",
               reference="-", ratio="-",
               verdict=verdict(percent < args.target, smoke=args.smoke)))
    return 1 if args.fail_on_miss and percent >= args.target else 0


if __name__ == "__main__":
    sys.exit(main())
