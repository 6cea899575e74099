"""The emulator's TCP server: connections, framing, failpoints, dispatch.

Owns: the listening socket, one thread per client connection, the housekeeping thread
(TTL monitor, idle cursor reaper, transaction lifetime limit, periodic no-op), applying
``failCommand`` before a command runs, and wrapping replies in OP_MSG / OP_REPLY with
cluster time (none from a standalone). A malformed message closes only the connection
that sent it. Never interprets a command itself.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import sys
import threading
import time
import traceback
from typing import Any

from presenced.testing.mongo import commands, wire
from presenced.testing.mongo.commands import (
    ConnectionInfo,
    Context,
    FailPoint,
    ServerIdentity,
    SessionFields,
)
from presenced.testing.mongo.cursors import CursorRegistry
from presenced.testing.mongo.errors import CommandError
from presenced.testing.mongo.storage import Storage

#: Fields every command may carry that no handler needs to see.
GENERIC_FIELDS = frozenset(
    {"$db", "lsid", "txnNumber", "$clusterTime", "$readPreference", "readConcern",
     "writeConcern", "apiVersion", "apiStrict", "apiDeprecationErrors", "comment",
     "$audit", "mayBypassWriteBlocking", "$client", "$configServerState", "autocommit",
     "startTransaction"}
)


class MongoServer:
    def __init__(
        self,
        storage: Storage,
        *,
        host: str,
        port: int,
        replica_set: str | None,
        ttl_monitor_interval: float,
        noop_interval: float | None,
        cursor_timeout: float,
        transaction_lifetime: float = 60.0,
    ) -> None:
        self.storage = storage
        self.host = host
        self.port = port
        self.replica_set = replica_set
        self.ttl_monitor_interval = ttl_monitor_interval
        self.noop_interval = noop_interval
        self.cursors = CursorRegistry(cursor_timeout)
        #: transactionLifetimeLimitSeconds: an older transaction in progress is aborted.
        self.transaction_lifetime = transaction_lifetime
        self.fail_point = FailPoint()
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._clients: dict[int, socket.socket] = {}
        self._clients_lock = threading.Lock()
        self._conn_ids = itertools.count(1)
        self._total_created = 0
        self._request_ids = itertools.count(1)
        self._retried: dict[tuple[Any, ...], dict[str, Any]] = {}

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> int:
        """Bind and serve; returns the port (a free one is chosen when port is 0)."""
        self._stopping.clear()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self.identity = ServerIdentity(self.host, self.port, self.replica_set)
        self.context = Context(
            storage=self.storage,
            cursors=self.cursors,
            identity=self.identity,
            fail_point=self.fail_point,
            stopping=self._stopping.is_set,
            connection_stats=self._connection_stats,
        )
        for target, name in ((self._accept_loop, "accept"), (self._housekeeping, "housekeeping")):
            t = threading.Thread(target=target, name=f"mongo-emulator-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self.port

    def stop(self) -> None:
        """Stop serving: close the listener and every client connection. Data stays."""
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._clients_lock:
            clients = list(self._clients.values())
        for sock in clients:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self.storage.lock:
            self.storage.changed.notify_all()
            # A real restart loses every cursor; getMore then answers CursorNotFound.
            self.cursors.clear()
            # ... and every transaction in progress: their writes were never committed.
            self.storage.end_all_sessions()
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []

    def _connection_stats(self) -> dict[str, Any]:
        with self._clients_lock:
            current = len(self._clients)
        return {"current": current, "available": 838_860 - current,
                "totalCreated": self._total_created, "active": current}

    # -- threads ----------------------------------------------------------------------
    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = ConnectionInfo(next(self._conn_ids))
            with self._clients_lock:
                self._clients[conn.id] = sock
                self._total_created += 1
            threading.Thread(
                target=self._serve, args=(sock, conn), name=f"mongo-emulator-conn{conn.id}",
                daemon=True,
            ).start()

    def _housekeeping(self) -> None:
        """TTL monitor, cursor timeouts and the periodic no-op, each on its own period."""
        next_ttl = time.monotonic() + self.ttl_monitor_interval
        next_noop = time.monotonic() + (self.noop_interval or 0)
        next_cursor = time.monotonic() + 60
        txn_period = max(0.1, min(5.0, self.transaction_lifetime / 4))
        next_txn = time.monotonic() + txn_period
        while True:
            deadlines = [next_ttl, next_cursor, next_txn]
            if self.noop_interval:
                deadlines.append(next_noop)
            if self._stopping.wait(max(0.0, min(deadlines) - time.monotonic())):
                return
            now = time.monotonic()
            try:
                with self.storage.lock:
                    if now >= next_ttl:
                        self.storage.expire_ttl()
                        next_ttl = now + self.ttl_monitor_interval
                    if now >= next_cursor:
                        self.cursors.expire_idle()
                        next_cursor = now + 60
                    if now >= next_txn:
                        self.storage.expire_transactions(self.transaction_lifetime)
                        next_txn = now + txn_period
                    if self.noop_interval and now >= next_noop:
                        self.storage.noop()
                        next_noop = now + self.noop_interval
            except Exception:  # housekeeping must never die
                traceback.print_exc(file=sys.stderr)

    def _serve(self, sock: socket.socket, conn: ConnectionInfo) -> None:
        try:
            while not self._stopping.is_set():
                header = _recv_exact(sock, wire.HEADER.size)
                if header is None:
                    return
                length, request_id, _, op_code = wire.parse_header(header)
                rest = _recv_exact(sock, length - wire.HEADER.size)
                if rest is None:
                    return  # disconnected mid-message: nothing was executed
                request = wire.parse_body(request_id, op_code, header + rest)
                out = self._handle(request, conn)
                if out is _CLOSE:
                    return
                if isinstance(out, bytes):
                    sock.sendall(out)
        except wire.ProtocolError as exc:
            print(f"mongo emulator: closing connection {conn.id}: {exc}", file=sys.stderr)
        except OSError:
            pass
        finally:
            with self._clients_lock:
                self._clients.pop(conn.id, None)
            with contextlib.suppress(OSError):
                sock.close()

    # -- requests ---------------------------------------------------------------------
    def _handle(self, request: wire.Request, conn: ConnectionInfo) -> bytes | object | None:
        cmd = request.command
        if request.op_code == wire.OP_QUERY:
            db = (request.legacy_namespace or "admin").partition(".")[0]
            name = next(iter(cmd), "")
            reply: dict[str, Any] | object
            if name.lower() not in ("ismaster", "hello"):
                reply = CommandError(
                    352,
                    f"Unsupported OP_QUERY command: {name}. The client driver may require an"
                    " upgrade.",
                ).reply()
            else:
                reply = self._execute(db, cmd, conn)
                if reply is _CLOSE:
                    return _CLOSE
            assert isinstance(reply, dict)
            return wire.encode_op_reply(next(self._request_ids), request.request_id, reply)
        target = cmd.get("$db")
        if not isinstance(target, str):
            reply = CommandError(40571, "OP_MSG requests require a $db argument").reply()
        else:
            result = self._execute(target, cmd, conn)
            if result is _CLOSE:
                return _CLOSE
            assert isinstance(result, dict)
            reply = result
        if request.more_to_come:
            return None
        return wire.encode_op_msg(next(self._request_ids), request.request_id, reply)

    def _execute(
        self, db: str, raw: dict[str, Any], conn: ConnectionInfo
    ) -> dict[str, Any] | object:
        cmd = {k: v for k, v in raw.items() if k not in GENERIC_FIELDS}
        session = SessionFields.of(raw)
        storage = self.storage
        try:
            name = commands.command_name(cmd)
            if name in ("hello", "isMaster") and self._await_hello(cmd):
                return _CLOSE
            retry_key = self._retry_key(name, raw)
            if retry_key is not None:
                with storage.lock:
                    done = self._retried.get(retry_key)
                    if done is not None:
                        return {**done, **commands.cluster_time_fields(storage)}
            if name != "configureFailPoint":
                with storage.lock:
                    fired = self.fail_point.trigger(name, conn)
                if fired is not None:
                    if fired.get("blockConnection"):
                        time.sleep(float(fired.get("blockTimeMS", 0)) / 1000)
                    if fired.get("closeConnection"):
                        return _CLOSE
                    if "errorCode" in fired:
                        raise CommandError(
                            int(fired["errorCode"]),
                            f"Failing command {name} via 'failCommand' failpoint",
                            labels=list(fired.get("errorLabels") or []),
                        )
                    if "writeConcernError" in fired:
                        with storage.lock:
                            reply = commands.run(self.context, conn, db, cmd, session)
                            reply["writeConcernError"] = fired["writeConcernError"]
                            reply.update(commands.cluster_time_fields(storage))
                        return reply
            with storage.lock:
                reply = commands.run(self.context, conn, db, cmd, session)
                if retry_key is not None:
                    self._remember_retry(retry_key, reply)
                reply.update(commands.cluster_time_fields(storage))
            return reply
        except CommandError as exc:
            reply = exc.reply()
        except Exception as exc:
            err = commands.as_command_error(exc)
            if not isinstance(exc, NotImplementedError | ValueError | TypeError | KeyError):
                traceback.print_exc(file=sys.stderr)
            reply = err.reply()
        with storage.lock:
            reply.update(commands.cluster_time_fields(storage))
        return reply


    def _await_hello(self, cmd: dict[str, Any]) -> bool:
        """Awaitable hello: hold the reply for maxAwaitTimeMS while the topology is unchanged
        (it never changes here, short of a restart). True if the server is stopping."""
        tv = cmd.get("topologyVersion")
        wait_ms = cmd.get("maxAwaitTimeMS")
        if not isinstance(tv, dict) or not isinstance(wait_ms, int | float):
            return False
        if tv.get("processId") != self.identity.process_id:
            return False
        return self._stopping.wait(max(0.0, float(wait_ms)) / 1000)

    _RETRYABLE = frozenset({"insert", "update", "delete", "findAndModify"})
    _RETRY_MEMORY = 10_000

    def _retry_key(self, name: str, raw: dict[str, Any]) -> tuple[Any, ...] | None:
        """Retryable writes: a repeated (lsid, txnNumber) returns the first reply."""
        lsid = raw.get("lsid")
        txn = raw.get("txnNumber")
        if name not in self._RETRYABLE or not isinstance(lsid, dict) or txn is None:
            return None
        if "autocommit" in raw or "startTransaction" in raw:
            return None  # a statement of a transaction: every one shares the txnNumber
        try:
            return (bytes(lsid.get("id", b"")), int(txn), name)
        except (TypeError, ValueError):
            return None

    def _remember_retry(self, key: tuple[Any, ...], reply: dict[str, Any]) -> None:
        if reply.get("ok") != 1.0:
            return
        self._retried[key] = dict(reply)
        while len(self._retried) > self._RETRY_MEMORY:
            self._retried.pop(next(iter(self._retried)))


_CLOSE = object()


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
