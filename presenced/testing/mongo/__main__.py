"""``python -m presenced.testing.mongo``: run the emulator as a process.

Prints ``ready mongodb://127.0.0.1:PORT/?replicaSet=NAME`` (``ready
mongodb://127.0.0.1:PORT/`` with ``--standalone``) as its first line on stdout, then serves
until SIGINT or SIGTERM (saving the snapshot, if one was named).
"""

from __future__ import annotations

import argparse
import signal
import sys

from presenced.testing.mongo.emulator import MongoEmulator


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m presenced.testing.mongo",
                                description="MongoDB 7.0 emulator (one-node replica set)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument("--replica-set", default="rs0", help="replica set name (default rs0)")
    p.add_argument("--standalone", action="store_true",
                   help="behave as a standalone mongod (no replica set, oplog, change"
                        " streams or transactions)")
    p.add_argument("--oplog-size", type=int, default=100_000,
                   help="oplog (and change stream history) size in entries")
    p.add_argument("--ttl-monitor-interval", type=float, default=60.0,
                   help="seconds between TTL monitor passes (MongoDB: 60)")
    p.add_argument("--snapshot", default=None,
                   help="file to load the data from at start and save it to at exit")
    args = p.parse_args(argv)
    if args.oplog_size < 1:
        p.error("--oplog-size must be at least 1")
    if args.ttl_monitor_interval <= 0:
        p.error("--ttl-monitor-interval must be > 0")
    emu = MongoEmulator(
        args.port, host=args.host,
        replica_set=None if args.standalone else args.replica_set,
        oplog_size=args.oplog_size,
        ttl_monitor_interval=args.ttl_monitor_interval, snapshot_path=args.snapshot,
    )
    # Only the main thread takes the stop signals, in sigwait: the serving threads inherit
    # this mask. A signal the kernel handed to one of them could not wake a main thread
    # blocked on a lock, and the emulator would not stop until killed.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        try:
            url = emu.start()
        except OSError as exc:
            print(f"cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"ready {url}", flush=True)
        signal.sigwait(stop_signals)
        emu.close()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
