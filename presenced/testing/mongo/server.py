"""The emulator's TCP server: connections, framing, failpoints, dispatch.

Owns: the listening socket, one thread per client connection, the housekeeping thread
(TTL monitor, idle cursor reaper, transaction lifetime limit, periodic no-op), applying
``failCommand`` before a command runs, holding awaitable hellos until the topology changes,
exhaust streams (a hello or getMore sent with exhaustAllowed is answered by replies with
moreToCome, one after another, until one without), what mongod adds to a failed reply
(error labels, topologyVersion), and wrapping replies in OP_MSG / OP_REPLY with cluster
time (none from a standalone). A malformed message closes only the connection that sent
it; errors go to the ``presenced.testing.mongo`` logger. Never interprets a command itself.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bson import Timestamp

from presenced.testing.mongo import commands, wire
from presenced.testing.mongo.commands import (
    Context,
    SessionFields,
)
from presenced.testing.mongo.cursors import CursorRegistry, History
from presenced.testing.mongo.errors import (
    NOT_PRIMARY_CODES,
    CommandError,
    error_labels,
    merge_labels,
)
from presenced.testing.mongo.storage import Storage
from presenced.testing.mongo.topology import Topology, parse_awaitable_hello

logger = logging.getLogger("presenced.testing.mongo")

Document = dict[str, Any]


@dataclass
class ServerIdentity:
    host: str
    port: int
    replica_set: str | None  # None: a standalone server
    started: float = field(default_factory=time.time)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class ConnectionInfo:
    id: int
    app_name: str | None = None
    #: "hello" or "isMaster" when its last request was that command with exhaustAllowed
    #: (a driver's streaming monitor), else None.
    exhaust: str | None = None
    #: The cluster time of the last write it made (MongoDB's per-client lastOp): a
    #: retryable write that fails without moving it gets NoWritesPerformed.
    last_op: Timestamp | None = None


@dataclass
class FailPoint:
    """MongoDB's ``failCommand`` fail point."""

    mode: Any = "off"
    data: Document = field(default_factory=dict)
    remaining: int | None = None  # for {times: n}
    skip: int = 0

    def trigger(self, command: str, conn: ConnectionInfo) -> Document | None:
        """The failpoint's data if it fires for this command, consuming one activation."""
        if self.mode == "off":
            return None
        names = self.data.get("failCommands") or []
        if command not in names and command.lower() not in [n.lower() for n in names]:
            return None
        app = self.data.get("appName")
        if app is not None and app != conn.app_name:
            return None
        if self.skip > 0:
            self.skip -= 1
            return None
        if self.remaining is not None:
            if self.remaining <= 0:
                return None
            self.remaining -= 1
            if self.remaining == 0:
                self.mode = "off"
        return self.data


#: Fields every command may carry that no handler needs to see.
GENERIC_FIELDS = frozenset(
    {"$db", "lsid", "txnNumber", "$clusterTime", "$readPreference", "readConcern",
     "writeConcern", "apiVersion", "apiStrict", "apiDeprecationErrors", "comment",
     "$audit", "mayBypassWriteBlocking", "$client", "$configServerState", "autocommit",
     "startTransaction"}
)
_HELLO = ("hello", "isMaster")


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
        history: History | None = None,
        persistent: bool = False,
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
        #: The change history the store holds: which resume tokens it accepts.
        self.history = history if history is not None else History()
        self.persistent = persistent
        self.fail_point = FailPoint()
        #: This life's topologyVersion; a new one (new processId) at every start.
        self.topology = Topology()
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._clients: dict[int, tuple[socket.socket, ConnectionInfo]] = {}
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
        self.topology = Topology()
        self.identity = ServerIdentity(self.host, self.port, self.replica_set)
        self.context = Context(
            storage=self.storage,
            cursors=self.cursors,
            identity=self.identity,
            fail_point=self.fail_point,
            stopping=self._stopping.is_set,
            connection_stats=self._connection_stats,
            topology=self.topology,
            history=self.history,
            persistent=self.persistent,
        )
        for target, name in ((self._accept_loop, "accept"), (self._housekeeping, "housekeeping")):
            t = threading.Thread(target=target, name=f"mongo-emulator-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self.port

    def stop(self) -> None:
        """Stop serving: close the listener and every client connection. Data stays."""
        self._stopping.set()
        self.topology.close()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._clients_lock:
            clients = [sock for sock, _ in self._clients.values()]
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

    def step_down(self, seconds: float) -> None:
        """replSetStepDown with force: a secondary for ``seconds``, then primary again."""
        if self._listener is None:
            raise RuntimeError("the emulator is not running: start() it before step_down()")
        if self.replica_set is None:
            raise RuntimeError("a standalone emulator (replica_set=None) cannot step down")
        with self.storage.lock:
            commands.step_down(self.context, seconds)

    def step_up(self) -> None:
        """End a stepdown now (the member wins the election at once)."""
        self.topology.step_up()

    def _connection_stats(self) -> dict[str, Any]:
        with self._clients_lock:
            conns = [conn for _, conn in self._clients.values()]
        current = len(conns)
        return {
            "current": current,
            "available": 838_860 - current,
            "totalCreated": self._total_created,
            "active": current,
            "threaded": current,
            "exhaustIsMaster": sum(1 for c in conns if c.exhaust == "isMaster"),
            "exhaustHello": sum(1 for c in conns if c.exhaust == "hello"),
            "awaitingTopologyChanges": self.topology.waiting,
        }

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
                self._clients[conn.id] = (sock, conn)
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
            # A secondary deletes nothing and writes no no-op: its primary would.
            primary = self.topology.primary
            try:
                with self.storage.lock:
                    if now >= next_ttl:
                        if primary:
                            self.storage.expire_ttl()
                        next_ttl = now + self.ttl_monitor_interval
                    if now >= next_cursor:
                        self.cursors.expire_idle()
                        next_cursor = now + 60
                    if now >= next_txn:
                        self.storage.expire_transactions(self.transaction_lifetime)
                        next_txn = now + txn_period
                    if self.noop_interval and now >= next_noop:
                        if primary:
                            self.storage.noop()
                        next_noop = now + self.noop_interval
            except Exception:  # housekeeping must never die
                logger.exception("mongo emulator: housekeeping failed")

    def _serve(self, sock: socket.socket, conn: ConnectionInfo) -> None:
        gone = _departure_probe(sock)
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
                if not self._respond(sock, request, conn, gone):
                    return
        except wire.ProtocolError as exc:
            logger.warning("mongo emulator: closing connection %d: %s", conn.id, exc)
        except OSError:
            pass
        finally:
            with self._clients_lock:
                self._clients.pop(conn.id, None)
            with contextlib.suppress(OSError):
                sock.close()

    # -- requests ---------------------------------------------------------------------
    def _respond(
        self, sock: socket.socket, request: wire.Request, conn: ConnectionInfo,
        gone: Callable[[], bool],
    ) -> bool:
        """Answer one request: with one reply, or, for a hello or getMore sent with
        exhaustAllowed, with a stream of moreToCome replies (each answering the one before)
        until one without. False when the connection is to be closed."""
        cmd = request.command
        if request.op_code == wire.OP_QUERY:
            reply = self._legacy_reply(request, conn, gone)
            if reply is None:
                return False
            sock.sendall(wire.encode_op_reply(next(self._request_ids), request.request_id, reply))
            return True
        db = cmd.get("$db")
        if not isinstance(db, str):
            if not request.more_to_come:
                error = CommandError(40571, "OP_MSG requests require a $db argument").reply()
                sock.sendall(wire.encode_op_msg(next(self._request_ids), request.request_id,
                                                error))
            return True
        exhaust = request.exhaust_allowed and not request.more_to_come
        name = next(iter(cmd), "")
        if name.lower() in ("hello", "ismaster"):
            conn.exhaust = commands.command_name(cmd) if exhaust else None
        response_to = request.request_id
        while True:
            result = self._execute(db, cmd, conn, gone, exhaust=exhaust)
            if result is None:
                return False
            if request.more_to_come:
                return True  # the client asked for no reply
            then = _exhaust_next(cmd, result) if exhaust else None
            reply_id = next(self._request_ids)
            sock.sendall(
                wire.encode_op_msg(reply_id, response_to, result, more_to_come=then is not None)
            )
            if then is None:
                return True
            cmd, response_to = then, reply_id

    def _legacy_reply(
        self, request: wire.Request, conn: ConnectionInfo, gone: Callable[[], bool]
    ) -> dict[str, Any] | None:
        cmd = request.command
        db = (request.legacy_namespace or "admin").partition(".")[0]
        name = next(iter(cmd), "")
        if name.lower() not in ("ismaster", "hello"):
            return CommandError(
                352,
                f"Unsupported OP_QUERY command: {name}. The client driver may require an"
                " upgrade.",
            ).reply()
        return self._execute(db, cmd, conn, gone)

    def _execute(
        self, db: str, raw: dict[str, Any], conn: ConnectionInfo, gone: Callable[[], bool],
        *, exhaust: bool = False,
    ) -> dict[str, Any] | None:
        """Run one command as mongod does around its handler: failCommand, the wait of an
        awaitable hello, retryable-write memory, then labels on a failure. ``exhaust``: it
        came with exhaustAllowed. None: close the connection without a reply."""
        cmd = {k: v for k, v in raw.items() if k not in GENERIC_FIELDS}
        session = SessionFields.of(raw)
        storage = self.storage
        name = ""
        #: failCommand's errorLabels, which replace the ones mongod would add.
        labels_override: list[str] | None = None
        last_op_before = conn.last_op
        try:
            name = commands.command_name(cmd)
            write_concern_error: Any = None
            if name != "configureFailPoint":
                with storage.lock:
                    fired = self.fail_point.trigger(name, conn)
                if fired is not None:
                    labels = fired.get("errorLabels")
                    if isinstance(labels, list):
                        labels_override = [str(label) for label in labels]
                    if fired.get("blockConnection"):
                        time.sleep(float(fired.get("blockTimeMS", 0)) / 1000)
                    if fired.get("closeConnection"):
                        return None
                    if "errorCode" in fired:
                        raise CommandError(
                            int(fired["errorCode"]),
                            f"Failing command {name} via 'failCommand' failpoint",
                        )
                    write_concern_error = fired.get("writeConcernError")
            if name in _HELLO:
                awaitable = parse_awaitable_hello(cmd)
                if exhaust and awaitable is None:
                    raise CommandError(
                        51756, "An isMaster or hello request with exhaust must specify"
                               " 'maxAwaitTimeMS'"
                    )
                if awaitable is not None and not self.topology.await_change(awaitable, gone):
                    return None
            retry_key = self._retry_key(name, raw)
            with storage.lock:
                done = self._retried.get(retry_key) if retry_key is not None else None
                if done is not None:
                    reply = dict(done)
                else:
                    before = storage.operation_time
                    reply = commands.run(self.context, conn, db, cmd, session,
                                         secondary_ok=_secondary_ok(raw))
                    if storage.operation_time != before:
                        conn.last_op = storage.operation_time
                    if retry_key is not None:
                        self._remember_retry(retry_key, reply)
                if isinstance(write_concern_error, Mapping):
                    reply["writeConcernError"] = dict(write_concern_error)
                reply.update(commands.cluster_time_fields(storage))
            if "writeConcernError" in reply:
                self._label_failure(reply, name, session, labels_override, conn, last_op_before)
            return reply
        except CommandError as exc:
            reply = exc.reply()
        except Exception as exc:
            err = commands.as_command_error(exc)
            if not isinstance(exc, NotImplementedError | ValueError | TypeError | KeyError):
                logger.exception("mongo emulator: command %r failed", name)
            reply = err.reply()
        self._label_failure(reply, name, session, labels_override, conn, last_op_before)
        with storage.lock:
            reply.update(commands.cluster_time_fields(storage))
        return reply

    def _label_failure(
        self, reply: dict[str, Any], name: str, session: SessionFields,
        labels_override: list[str] | None, conn: ConnectionInfo,
        last_op_before: Any,
    ) -> None:
        """What mongod adds to a failed reply (ok: 0, or a writeConcernError): its error
        labels (failCommand's errorLabels instead, when given), and for a "not primary"
        error the topologyVersion, by which drivers tell a stale error from a new one."""
        code = reply.get("code") if reply.get("ok") != 1.0 else None
        wce = reply.get("writeConcernError")
        wc_code = wce.get("code") if isinstance(wce, Mapping) else None
        code = code if isinstance(code, int) else None
        wc_code = wc_code if isinstance(wc_code, int) else None
        if labels_override is not None:
            labels = labels_override
        else:
            no_writes = last_op_before is not None and conn.last_op == last_op_before
            labels = merge_labels(
                reply.get("errorLabels") or [],
                error_labels(
                    name, code, wc_code,
                    txn_number=session.txn_number is not None,
                    autocommit=session.autocommit is not None,
                    no_writes_performed=no_writes,
                ),
            )
        reply.pop("errorLabels", None)
        if labels:
            reply["errorLabels"] = labels
        if self.replica_set is not None and (
            code in NOT_PRIMARY_CODES or wc_code in NOT_PRIMARY_CODES
        ):
            reply["topologyVersion"] = self.topology.version.document()

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


def _exhaust_next(cmd: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any] | None:
    """The command whose reply follows ``reply`` in an exhaust stream, None if ``reply``
    is the last: an awaitable hello is asked again with the topologyVersion just sent; a
    getMore again while its cursor lives. A failed reply always ends the stream."""
    if reply.get("ok") != 1.0 or not cmd:
        return None
    name = commands.ALIASES.get(next(iter(cmd)).lower(), next(iter(cmd)))
    if name in _HELLO:
        tv = reply.get("topologyVersion")
        if "topologyVersion" in cmd and "maxAwaitTimeMS" in cmd and tv is not None:
            return {**cmd, "topologyVersion": tv}
    elif name == "getMore":
        cursor = reply.get("cursor")
        if isinstance(cursor, Mapping) and cursor.get("id"):
            return cmd
    return None


def _secondary_ok(raw: Mapping[str, Any]) -> bool:
    """Whether the command's $readPreference lets a secondary answer (any mode but
    primary; none given means primary)."""
    pref = raw.get("$readPreference")
    return isinstance(pref, Mapping) and pref.get("mode", "primary") != "primary"


def _departure_probe(sock: socket.socket) -> Callable[[], bool]:
    """A check whether the peer has closed the connection (or stop() shut it down), for
    a reply held back: an awaiting hello's client must send nothing meanwhile, so a
    readable socket with nothing to read is one whose peer has gone."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI)

    def gone() -> bool:
        try:
            if not poller.poll(0):
                return False
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    return gone


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
