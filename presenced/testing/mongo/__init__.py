"""A MongoDB emulator that pymongo can't tell from a one-node replica set.

Public API (stable; tests and ``presenced demo`` use it)::

    with MongoEmulator() as url:             # url = "mongodb://127.0.0.1:PORT/?replicaSet=rs0"
        ...

    emu = MongoEmulator(port=0, replica_set="rs0",   # None: a standalone mongod
                        oplog_size=100_000,
                        ttl_monitor_interval=60.0, transaction_lifetime=60.0,
                        snapshot_path=None)
    url = emu.start()      # binds 127.0.0.1:port (0 = a free port, kept across restarts)
    emu.stop()             # closes the listener and every client connection; data is kept
    emu.start()            # serves again on the same port with the same data
    emu.restart(down_seconds=0.5)
    emu.step_down(10.0)    # replSetStepDown with force: a secondary for 10 s, then primary
    emu.step_up()          # ... or primary again now
    emu.close()            # stop for good
    emu.port, emu.url

Also a CLI: ``python -m presenced.testing.mongo --port 27017 [--standalone]``, which
prints ``ready mongodb://127.0.0.1:PORT/?replicaSet=NAME`` (standalone:
``ready mongodb://127.0.0.1:PORT/``) as its first line on stdout.
"""

from presenced.testing.mongo.emulator import MongoEmulator

__all__ = ["MongoEmulator"]
