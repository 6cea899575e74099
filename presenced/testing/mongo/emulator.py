"""MongoEmulator: start, stop and restart the emulated replica set from Python.

Owns: the lifetime of one emulated server (its storage survives stop/start, and is
saved to / loaded from a snapshot file when one is given, with the lineage of change
history it holds), a new replica set's "initiating set" oplog entry, and whether it is a
one-node replica set (the default) or, with ``replica_set=None``, a standalone mongod (no
oplog, no change streams, no transactions, no cluster time). Never used by the daemon.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from pathlib import Path
from types import TracebackType

from presenced.testing.mongo.cursors import History
from presenced.testing.mongo.server import MongoServer
from presenced.testing.mongo.storage import Storage

#: The snapshot's entry for the History lineage (beside what Storage.dump() writes).
_HISTORY_KEY = "history_lineage"


class MongoEmulator:
    """An emulated one-node replica set on 127.0.0.1, served from threads in this process.

    ``with MongoEmulator() as url:`` starts it and yields its connection string.
    ``replica_set=None`` makes it a standalone server instead (url without replicaSet).
    """

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        replica_set: str | None = "rs0",
        oplog_size: int = 100_000,
        ttl_monitor_interval: float = 60.0,
        noop_interval: float | None = 10.0,
        cursor_timeout: float = 600.0,
        transaction_lifetime: float = 60.0,
        snapshot_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if ttl_monitor_interval <= 0:
            raise ValueError("ttl_monitor_interval must be > 0 seconds")
        if transaction_lifetime <= 0:
            raise ValueError("transaction_lifetime must be > 0 seconds")
        self.host = host
        self.replica_set = replica_set
        self.snapshot_path = Path(snapshot_path) if snapshot_path is not None else None
        self.storage = Storage(oplog_size, replicated=replica_set is not None)
        if self.snapshot_path is not None and self.snapshot_path.exists():
            with self.snapshot_path.open("rb") as f:
                data = pickle.load(f)
            self.storage.load(data)
            # A new branch of history that holds what the snapshot's lives held.
            history = History.descended_from(data.get(_HISTORY_KEY))
        else:
            history = History()
            if self.storage.replicated:
                # As rs.initiate() does: the new set's oldest entry, newer than any
                # position another replica set (or an earlier emulator) gave out, so a
                # reader resuming from one sees its history is not here.
                with self.storage.lock:
                    self.storage.noop("initiating set")
        self.history = history
        self._server = MongoServer(
            self.storage, host=host, port=port, replica_set=replica_set,
            ttl_monitor_interval=ttl_monitor_interval, noop_interval=noop_interval,
            cursor_timeout=cursor_timeout, transaction_lifetime=transaction_lifetime,
            history=history, persistent=self.snapshot_path is not None,
        )
        self.running = False

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        if self.replica_set is None:
            return f"mongodb://{self.host}:{self.port}/"
        return f"mongodb://{self.host}:{self.port}/?replicaSet={self.replica_set}"

    def start(self) -> str:
        if not self.running:
            self._server.start()
            self.running = True
        return self.url

    def stop(self) -> None:
        """Close the listener and every client connection; keep the data (and save it)."""
        if self.running:
            self._server.stop()
            self.running = False
        if self.snapshot_path is not None:
            self.save_snapshot(self.snapshot_path)

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        if down_seconds > 0:
            time.sleep(down_seconds)
        self.start()

    def close(self) -> None:
        self.stop()

    def step_down(self, seconds: float = 10.0) -> None:
        """As ``replSetStepDown: seconds, force: true``: the member is a secondary (writes
        fail with NotWritablePrimary, primary reads with NotPrimaryNoSecondaryOk, its
        transactions in progress abort, awaiting hellos are answered) until it steps up
        again after ``seconds``, being the only member that can win an election."""
        self._server.step_down(seconds)

    def step_up(self) -> None:
        """End a stepdown now."""
        self._server.step_up()

    def save_snapshot(self, path: str | os.PathLike[str]) -> None:
        target = Path(path)
        with self.storage.lock:
            data = self.storage.dump()
            data[_HISTORY_KEY] = self.history.lineage(
                self.storage.clock.last, self.storage.oplog.last_evicted_ts
            )
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, target)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
