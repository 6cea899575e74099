"""Command handlers: MongoDB 7.0's commands, reply shapes and error codes.

Owns: turning one decoded command into one reply document, under the store's lock
(``Storage.lock``), so every command is atomic; and the session rules for ``txnNumber``,
``autocommit: false`` / ``startTransaction`` (which transaction a command runs in) and
``commitTransaction`` / ``abortTransaction``. Failpoints are applied by the server before
a handler runs. Never touches sockets.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bson import Int64, ObjectId, Timestamp
from bson.binary import Binary
from mongomock_ng.filtering import filter_applies
from pymongo.errors import DuplicateKeyError, OperationFailure

from presenced.testing.mongo.cursors import (
    ChangeStreamCursor,
    Cursor,
    CursorRegistry,
    History,
    ListCursor,
    OplogCursor,
    StreamScope,
    parse_change_stream_stage,
)
from presenced.testing.mongo.errors import CommandError
from presenced.testing.mongo.storage import (
    OPLOG_NS,
    Storage,
    WriteOutcome,
)
from presenced.testing.mongo.topology import Topology
from presenced.testing.mongo.transactions import Transaction
from presenced.testing.mongo.wire import MAX_MESSAGE_SIZE

if TYPE_CHECKING:  # they belong with the server, which imports this module
    from presenced.testing.mongo.server import ConnectionInfo, FailPoint, ServerIdentity

Document = dict[str, Any]

VERSION = "7.0.14"
MAX_WIRE_VERSION = 21
MAX_BSON_SIZE = 16 * 1024 * 1024
MAX_WRITE_BATCH = 100_000
ELECTION_ID = ObjectId("7fffffff0000000000000001")


@dataclass
class SessionFields:
    """The generic session fields of one command (the server strips them from it)."""

    lsid: Document | None = None
    txn_number: int | None = None
    autocommit: Any = None  # None when absent
    start_transaction: Any = None  # None when absent

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> SessionFields:
        lsid = raw.get("lsid")
        txn = raw.get("txnNumber")
        return cls(
            lsid=dict(lsid) if isinstance(lsid, Mapping) else None,
            txn_number=int(txn) if isinstance(txn, int) and not isinstance(txn, bool) else None,
            autocommit=raw.get("autocommit"),
            start_transaction=raw.get("startTransaction"),
        )

    @property
    def session_id(self) -> bytes | None:
        if self.lsid is None:
            return None
        value = self.lsid.get("id")
        return bytes(value) if isinstance(value, bytes) else None

    @property
    def in_transaction(self) -> bool:
        return self.autocommit is not None or self.start_transaction is not None


@dataclass
class Context:
    storage: Storage
    cursors: CursorRegistry
    identity: ServerIdentity
    fail_point: FailPoint
    stopping: Callable[[], bool]
    connection_stats: Callable[[], Document]
    topology: Topology
    #: The change history this store holds (which resume tokens it accepts).
    history: History
    #: Whether the data outlives the process (a snapshot file is kept).
    persistent: bool = False


Handler = Callable[[Context, "ConnectionInfo", str, Document], Document]
HANDLERS: dict[str, Handler] = {}

#: Command names the server accepts in any letter case (legacy spellings).
ALIASES = {"ismaster": "isMaster", "buildinfo": "buildInfo", "findandmodify": "findAndModify"}


def command(*names: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for n in names:
            HANDLERS[n] = fn
        return fn

    return deco


def command_name(cmd: Mapping[str, Any]) -> str:
    if not cmd:
        raise CommandError(59, "no such command: ''")
    name = next(iter(cmd))
    return ALIASES.get(name.lower(), name) if name.lower() in ALIASES else name


def cluster_time_fields(storage: Storage) -> Document:
    """``$clusterTime`` and ``operationTime`` for a reply (none from a standalone)."""
    if not storage.replicated:
        return {}
    ts = storage.operation_time
    return {
        "$clusterTime": {
            "clusterTime": ts,
            "signature": {"hash": Binary(b"\x00" * 20, 0), "keyId": Int64(0)},
        },
        "operationTime": ts,
    }


def run(
    ctx: Context, conn: ConnectionInfo, db: str, cmd: Document,
    session: SessionFields | None = None, *, secondary_ok: bool = False,
) -> Document:
    """Execute one command and return its reply (without cluster time fields).

    ``session`` carries the command's lsid / txnNumber / autocommit / startTransaction;
    ``secondary_ok`` whether its read preference lets a secondary answer.
    """
    name = command_name(cmd)
    storage = ctx.storage
    session = session or SessionFields()
    if session.txn_number is not None and not storage.replicated:
        raise CommandError(
            20, "Transaction numbers are only allowed on a replica set member or mongos"
        )
    if storage.replicated and not ctx.topology.primary:
        _refuse_on_a_secondary(name, secondary_ok)
    if name in ("commitTransaction", "abortTransaction"):
        storage.opcounters["command"] += 1
        return _finish_transaction(ctx, db, name, session)
    handler = HANDLERS.get(name)
    if handler is None:
        raise CommandError(59, f"no such command: '{next(iter(cmd))}'")
    txn = _transaction_for(storage, session) if session.in_transaction else None
    if txn is None and session.txn_number is not None:
        _retryable_write_number(storage, session)
    counter = {"find": "query", "getMore": "getmore"}.get(name)
    if counter:
        storage.opcounters[counter] += 1
    elif name not in ("insert", "update", "delete"):
        storage.opcounters["command"] += 1
    _count_for_app(storage, conn, name, cmd)
    if txn is None:
        reply = handler(ctx, conn, db, cmd)
        if name in ("find", "getMore", "aggregate"):
            _count_returned(storage, conn, name, reply)
        return reply
    storage.active_txn = txn
    try:
        reply = handler(ctx, conn, db, cmd)
    except Exception:
        # MongoDB aborts a transaction when one of its statements fails.
        storage.abort_transaction(txn)
        raise
    finally:
        storage.active_txn = None
    errors = reply.get("writeErrors")
    if errors:
        # In a transaction a write error fails the whole command and aborts it.
        storage.abort_transaction(txn)
        first = dict(errors[0])
        raise CommandError(
            int(first.pop("code", 2)), str(first.pop("errmsg", "write error")),
            extra={k: v for k, v in first.items() if k != "index"},
        )
    return reply


#: Statements of a write command, by command name: the field that lists them.
_STATEMENTS = {"insert": "documents", "update": "updates", "delete": "deletes"}


def _count_for_app(storage: Storage, conn: ConnectionInfo, name: str, cmd: Document) -> None:
    """``opcounters`` again, per client ``appName`` (emulator only: a benchmark tells the
    operations of the process it measures from those of its load generator). Counted from
    the command as received, as MongoDB counts: a find or getMore is one, a write command
    one per statement, anything else one ``command``; and the commands (round trips) by
    name."""
    app = conn.app_name or ""
    commands = storage.commands_by_app.setdefault(app, {})
    commands[name] = commands.get(name, 0) + 1
    counts = storage.opcounters_by_app.get(app)
    if counts is None:
        counts = storage.opcounters_by_app[app] = dict.fromkeys(storage.opcounters, 0)
    field = _STATEMENTS.get(name)
    if name == "find":
        counts["query"] += 1
    elif name == "getMore":
        counts["getmore"] += 1
    elif field is not None:
        statements = cmd.get(field)
        counts[name] += len(statements) if isinstance(statements, list) else 0
    else:
        counts["command"] += 1


def _count_returned(storage: Storage, conn: ConnectionInfo, name: str, reply: Document) -> None:
    """The documents a cursor command returned, per client ``appName`` and command
    (emulator only, for benchmarks: what a process read, beside its round trips)."""
    cursor = reply.get("cursor")
    if not isinstance(cursor, dict):
        return
    batch = cursor.get("firstBatch", cursor.get("nextBatch"))
    if isinstance(batch, list):
        counts = storage.returned_by_app.setdefault(conn.app_name or "", {})
        counts[name] = counts.get(name, 0) + len(batch)


# -- replica set state -----------------------------------------------------------------
#: What a secondary refuses: every write (10107 NotWritablePrimary), and reads unless the
#: read preference allows a secondary (13435 NotPrimaryNoSecondaryOk). The rest (hello,
#: serverStatus, getMore of an open cursor, killCursors...) it answers.
_PRIMARY_WRITES = frozenset(
    {"insert", "update", "delete", "findAndModify", "create", "drop", "dropDatabase",
     "createIndexes", "dropIndexes", "deleteIndexes", "renameCollection", "collMod",
     "commitTransaction", "abortTransaction"}
)
_PRIMARY_READS = frozenset(
    {"find", "aggregate", "count", "distinct", "listCollections", "listIndexes",
     "listDatabases", "dbStats", "collStats"}
)


def _refuse_on_a_secondary(name: str, secondary_ok: bool) -> None:
    if name in _PRIMARY_WRITES:
        raise CommandError(10107, "not primary")
    if name in _PRIMARY_READS and not secondary_ok:
        raise CommandError(13435, "not primary and secondaryOk=false")


def step_down(ctx: Context, seconds: float) -> None:
    """The member steps down for ``seconds``: its transactions in progress abort (as
    MongoDB's do at a stepdown), then it answers as a secondary until it steps up."""
    storage = ctx.storage
    for state in list(storage.sessions.values()):
        if state.txn is not None and state.txn.in_progress:
            storage.abort_transaction(state.txn)
    ctx.topology.step_down(seconds)


# -- transactions ----------------------------------------------------------------------
def _no_such_transaction(number: int | None, why: str) -> CommandError:
    return CommandError(
        251, f"Transaction with {{ txnNumber: {number} }} {why}",
        labels=["TransientTransactionError"],
    )


def _session_state_ids(session: SessionFields) -> tuple[bytes, int]:
    sid = session.session_id
    if sid is None:
        raise CommandError(
            50768, "Transaction numbers and autocommit may only be given with a session id"
        )
    if session.txn_number is None:
        raise CommandError(
            50768, "'autocommit' field requires a transaction number to also be specified"
        )
    return sid, session.txn_number


def _transaction_for(storage: Storage, session: SessionFields) -> Transaction:
    """The transaction a command with autocommit: false runs in (starting it if asked)."""
    sid, number = _session_state_ids(session)
    if session.autocommit is not False:
        raise CommandError(50768, "Specifying autocommit=true is not allowed.")
    if session.start_transaction is not None and session.start_transaction is not True:
        raise CommandError(50768, "Specifying startTransaction=false is not allowed.")
    state = storage.session(sid)
    if state is not None and number < state.txn_number:
        raise CommandError(
            225, f"Cannot start transaction {number} on session because a newer transaction"
                 f" {state.txn_number} has already started."
        )
    if session.start_transaction:
        if state is not None and number == state.txn_number:
            raise CommandError(
                225, f"txnNumber {number} for this session has already been used"
            )
        new = storage.use_txn_number(sid, session.lsid or {}, number, start=True)
        assert new.txn is not None
        return new.txn
    if state is None or number != state.txn_number or state.txn is None:
        active = state.txn_number if state is not None else -1
        raise CommandError(
            251, f"Given transaction number {number} does not match any in-progress"
                 f" transactions. The active transaction number is {active}",
            labels=["TransientTransactionError"],
        )
    txn = state.txn
    if txn.aborted:
        raise _no_such_transaction(number, "has been aborted.")
    if txn.committed:
        raise CommandError(256, f"Transaction {number} has been committed.")
    return txn


def _retryable_write_number(storage: Storage, session: SessionFields) -> None:
    """A txnNumber outside a transaction (a retryable write) newer than the session's
    supersedes its transaction, which rolls back."""
    sid = session.session_id
    number = session.txn_number
    if sid is None or number is None:
        return
    state = storage.session(sid)
    if state is None or number > state.txn_number:
        storage.use_txn_number(sid, session.lsid or {}, number, start=False)


def _finish_transaction(
    ctx: Context, db: str, name: str, session: SessionFields
) -> Document:
    if db != "admin":
        raise CommandError(13, f"{name} may only be run against the admin database.")
    storage = ctx.storage
    sid, number = _session_state_ids(session)
    state = storage.session(sid)
    if state is not None and number < state.txn_number:
        raise CommandError(
            225, f"Cannot {name} of transaction {number} on session because a newer"
                 f" transaction {state.txn_number} has already started."
        )
    if state is None or state.txn is None or state.txn_number != number:
        active = state.txn_number if state is not None else -1
        raise CommandError(
            251, f"Given transaction number {number} does not match any in-progress"
                 f" transactions. The active transaction number is {active}",
            labels=["TransientTransactionError"],
        )
    txn = state.txn
    if name == "commitTransaction":
        if txn.aborted:
            raise _no_such_transaction(number, "has been aborted.")
        storage.commit_transaction(txn)  # again after a commit: ok, nothing more written
        return {"ok": 1.0}
    if txn.committed:
        raise CommandError(256, f"Transaction {number} has been committed.")
    if txn.aborted:
        raise _no_such_transaction(number, "has been aborted.")
    storage.abort_transaction(txn)
    return {"ok": 1.0}


# -- helpers -------------------------------------------------------------------------
def _coll_name(cmd: Document, name: str) -> str:
    value = cmd[name]
    if not isinstance(value, str) or not value:
        raise CommandError(
            73, f"collection name has invalid type {type(value).__name__}"
        )
    return value


def _opt_int(cmd: Mapping[str, Any], key: str, default: int | None = None) -> int | None:
    value = cmd.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandError(14, f"BSON field '{key}' is the wrong type, expected a number")
    return int(value)


def _sort_spec(value: Any) -> list[tuple[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise CommandError(14, "sort must be an object")
    return list(value.items())


def _cursor_reply(cursor: Cursor, batch: list[Any], first: bool, keep: bool) -> Document:
    body: Document = {"id": Int64(cursor.id if keep else 0), "ns": cursor.ns}
    body["firstBatch" if first else "nextBatch"] = batch
    body.update(cursor.extra_reply())
    return {"cursor": body, "ok": 1.0}


def _start_cursor(
    ctx: Context, cursor: Cursor, batch_size: int | None, single_batch: bool = False
) -> Document:
    batch = cursor.first_batch(ctx.storage, batch_size)
    keep = not cursor.exhausted and not single_batch
    if keep:
        ctx.cursors.add(cursor)
    return _cursor_reply(cursor, batch, True, keep)


def _list_result(ctx: Context, ns: str, docs: list[Any], cmd: Document) -> Document:
    spec = cmd.get("cursor") or {}
    batch_size = _opt_int(spec, "batchSize") if isinstance(spec, Mapping) else None
    return _start_cursor(ctx, ListCursor(ns, docs), batch_size)


def _write_error(index: int, exc: Exception) -> Document:
    if isinstance(exc, CommandError):
        return {"index": index, "code": exc.code, "errmsg": exc.errmsg, **exc.extra}
    if isinstance(exc, DuplicateKeyError):
        details = exc.details or {}
        doc = {"index": index, "code": 11000, "errmsg": f"E11000 duplicate key error {details}"}
        for k in ("keyPattern", "keyValue"):
            if k in details:
                doc[k] = details[k]
        return doc
    if isinstance(exc, OperationFailure):
        return {"index": index, "code": exc.code or 2, "errmsg": str(exc)}
    if isinstance(exc, NotImplementedError):
        return {"index": index, "code": 115, "errmsg": f"not supported by the emulator: {exc}"}
    return {"index": index, "code": 2, "errmsg": f"{type(exc).__name__}: {exc}"}


def as_command_error(exc: Exception) -> CommandError:
    if isinstance(exc, CommandError):
        return exc
    err = _write_error(0, exc)
    return CommandError(err["code"], err["errmsg"])


def _statements(cmd: Document, key: str) -> list[Document]:
    items = cmd.get(key)
    if not isinstance(items, list):
        raise CommandError(
            40414, f"BSON field '{next(iter(cmd))}.{key}' is missing but a required field"
        )
    if len(items) > MAX_WRITE_BATCH:
        raise CommandError(10334, f"Write batch sizes must be between 1 and {MAX_WRITE_BATCH}")
    return items


def _finish_write(reply: Document, errors: list[Document]) -> Document:
    if errors:
        reply["writeErrors"] = errors
    reply["ok"] = 1.0
    return reply


# -- handshake and server information --------------------------------------------------
def hello_reply(ctx: Context, conn: ConnectionInfo, legacy: bool, cmd: Document) -> Document:
    storage = ctx.storage
    ts = storage.operation_time
    now = storage.now()
    ident = ctx.identity
    version, primary = ctx.topology.state()
    reply: Document = {}
    if cmd.get("helloOk"):
        reply["helloOk"] = True
    reply["ismaster" if legacy else "isWritablePrimary"] = primary
    reply["topologyVersion"] = version.document()
    if ident.replica_set is not None:
        member: Document = {
            "hosts": [ident.address],
            "setName": ident.replica_set,
            "setVersion": 1,
            "secondary": not primary,
        }
        if primary:  # a secondary of a set without a primary names none
            member["primary"] = ident.address
        member["me"] = ident.address
        if primary:
            member["electionId"] = ELECTION_ID
        member["lastWrite"] = {
            "opTime": {"ts": ts, "t": Int64(1)},
            "lastWriteDate": now,
            "majorityOpTime": {"ts": ts, "t": Int64(1)},
            "majorityWriteDate": now,
        }
        reply.update(member)
    reply.update(
        {
            "maxBsonObjectSize": MAX_BSON_SIZE,
            "maxMessageSizeBytes": MAX_MESSAGE_SIZE,
            "maxWriteBatchSize": MAX_WRITE_BATCH,
            "localTime": now,
            "logicalSessionTimeoutMinutes": 30,
            "connectionId": conn.id,
            "minWireVersion": 0,
            "maxWireVersion": MAX_WIRE_VERSION,
            "readOnly": False,
            "ok": 1.0,
        }
    )
    client = cmd.get("client")
    if isinstance(client, Mapping):
        app = client.get("application")
        if isinstance(app, Mapping) and isinstance(app.get("name"), str):
            conn.app_name = app["name"]
    return reply


@command("hello")
def _hello(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    return hello_reply(ctx, conn, False, cmd)


@command("isMaster")
def _is_master(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    return hello_reply(ctx, conn, True, cmd)


@command("endSessions", "killSessions")
def _end_sessions(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    """Ending (or killing) a session rolls back its transaction in progress."""
    ids = cmd.get(next(iter(cmd)))
    if not isinstance(ids, list):
        raise CommandError(14, f"BSON field '{next(iter(cmd))}' is the wrong type, expected"
                               " array")
    for lsid in ids:
        value = lsid.get("id") if isinstance(lsid, Mapping) else None
        if isinstance(value, bytes):
            ctx.storage.end_session(bytes(value))
    return {"ok": 1.0}


@command("killAllSessions")
def _kill_all_sessions(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    ctx.storage.end_all_sessions()
    return {"ok": 1.0}


@command("ping", "refreshSessions", "logout")
def _ok(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    return {"ok": 1.0}


@command("buildInfo")
def _build_info(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    return {
        "version": VERSION,
        "gitVersion": "presenced-emulator",
        "versionArray": [7, 0, 14, 0],
        "bits": 64,
        "debug": False,
        "maxBsonObjectSize": MAX_BSON_SIZE,
        "storageEngines": ["devnull", "wiredTiger"],
        "javascriptEngine": "none",
        "modules": [],
        "ok": 1.0,
    }


@command("whatsmyuri")
def _whatsmyuri(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    return {"you": "127.0.0.1", "ok": 1.0}


@command("connectionStatus")
def _conn_status(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    return {"authInfo": {"authenticatedUsers": [], "authenticatedUserRoles": []}, "ok": 1.0}


@command("getParameter")
def _get_parameter(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    return {"featureCompatibilityVersion": {"version": "7.0"}, "ok": 1.0}


@command("serverStatus")
def _server_status(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    ident = ctx.identity
    uptime = time.time() - ident.started
    reply: Document = {
        "host": ident.address,
        "version": VERSION,
        "process": "mongod",
        "pid": Int64(os.getpid()),
        "uptime": float(int(uptime)),
        "uptimeMillis": Int64(int(uptime * 1000)),
        "uptimeEstimate": Int64(int(uptime)),
        "localTime": ctx.storage.now(),
        "connections": ctx.connection_stats(),
        "opcounters": {k: Int64(v) for k, v in ctx.storage.opcounters.items()},
        # Not MongoDB's: the same counters per client appName ("" for none), for benchmarks.
        "opcountersByAppName": {
            app: {k: Int64(v) for k, v in counts.items()}
            for app, counts in ctx.storage.opcounters_by_app.items()
        },
        "commandsByAppName": {
            app: {k: Int64(v) for k, v in counts.items()}
            for app, counts in ctx.storage.commands_by_app.items()
        },
        "documentsReturnedByAppName": {
            app: {k: Int64(v) for k, v in counts.items()}
            for app, counts in ctx.storage.returned_by_app.items()
        },
        # As MongoDB 7.0's WiredTiger reports it (Rocket.Chat shows storageEngine.name);
        # persistent only when a snapshot keeps the data across restarts.
        "storageEngine": {
            "name": "wiredTiger",
            "supportsCommittedReads": True,
            "oldestRequiredTimestampForCrashRecovery": (
                ctx.storage.operation_time if ctx.storage.replicated else Timestamp(0, 0)
            ),
            "supportsPendingDrops": True,
            "dropPendingIdents": Int64(0),
            "supportsSnapshotReadConcern": True,
            "readOnly": False,
            "persistent": ctx.persistent,
            "backupCursorOpen": False,
        },
    }
    if ident.replica_set is not None:
        primary = ctx.topology.primary
        repl: Document = {
            "setName": ident.replica_set,
            "setVersion": 1,
            "isWritablePrimary": primary,
            "secondary": not primary,
            "hosts": [ident.address],
        }
        if primary:
            repl["primary"] = ident.address
        repl["me"] = ident.address
        if primary:
            repl["electionId"] = ELECTION_ID
        reply["repl"] = repl
    reply["metrics"] = {"cursor": {"open": {"total": Int64(len(ctx.cursors))}}}
    reply["ok"] = 1.0
    return reply


@command("replSetGetStatus")
def _repl_status(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    if db != "admin":
        raise CommandError(13, "replSetGetStatus may only be run against the admin database.")
    ident = ctx.identity
    if ident.replica_set is None:
        raise CommandError(76, "not running with --replSet")
    ts = ctx.storage.operation_time
    state = 1 if ctx.topology.primary else 2
    return {
        "set": ident.replica_set,
        "date": ctx.storage.now(),
        "myState": state,
        "term": Int64(1),
        "members": [
            {"_id": 0, "name": ident.address, "health": 1.0, "state": state,
             "stateStr": "PRIMARY" if state == 1 else "SECONDARY",
             "optime": {"ts": ts, "t": Int64(1)}, "self": True}
        ],
        "ok": 1.0,
    }


@command("replSetStepDown")
def _repl_set_step_down(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    if db != "admin":
        raise CommandError(13, "replSetStepDown may only be run against the admin database.")
    if ctx.identity.replica_set is None:
        raise CommandError(76, "not running with --replSet")
    seconds = cmd["replSetStepDown"]
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
        seconds = 60
    catch_up = cmd.get("secondaryCatchUpPeriodSecs", 10)
    if isinstance(catch_up, int | float) and not isinstance(catch_up, bool) and (
        seconds < catch_up
    ):
        raise CommandError(2, "stepdown period must be longer than secondaryCatchUpPeriodSecs")
    if not ctx.topology.primary:
        raise CommandError(10107, "not primary so can't step down")
    if not cmd.get("force"):
        # MongoDB first waits secondaryCatchUpPeriodSecs for a secondary that never comes.
        raise CommandError(
            262, f"No electable secondaries caught up as of {ctx.storage.now().isoformat()}Z."
                 " Please use the replSetStepDown command with the argument {force: true} to"
                 " force node to step down."
        )
    step_down(ctx, float(seconds))
    return {"ok": 1.0}


@command("configureFailPoint")
def _configure_fail_point(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    if db != "admin":
        raise CommandError(13, "configureFailPoint may only be run against the admin database.")
    name = cmd["configureFailPoint"]
    if name != "failCommand":
        raise CommandError(2, f"Cannot find failpoint with name: {name}; the emulator has only"
                              " failCommand")
    mode = cmd.get("mode")
    data = cmd.get("data") or {}
    fp = ctx.fail_point
    fp.remaining = None
    fp.skip = 0
    if mode in ("off", "alwaysOn"):
        fp.mode = mode
    elif isinstance(mode, Mapping) and "times" in mode:
        fp.mode = "times"
        fp.remaining = int(mode["times"])
        if fp.remaining <= 0:
            fp.mode = "off"
    elif isinstance(mode, Mapping) and "skip" in mode:
        fp.mode = "skip"
        fp.skip = int(mode["skip"])
    else:
        raise CommandError(9, f"unsupported failpoint mode {mode!r}")
    if not isinstance(data, Mapping):
        raise CommandError(14, "failpoint data must be an object")
    fp.data = dict(data)
    return {"count": 0, "ok": 1.0}


# -- catalog ---------------------------------------------------------------------------
@command("listDatabases")
def _list_databases(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    storage = ctx.storage
    dbs = []
    for name in storage.database_names():
        entry: Document = {"name": name}
        if not cmd.get("nameOnly"):
            entry["sizeOnDisk"] = Int64(4096 * max(1, len(storage.collections(name))))
            entry["empty"] = False
        flt = cmd.get("filter")
        if flt and not filter_applies(flt, entry):
            continue
        dbs.append(entry)
    reply: Document = {"databases": dbs}
    if not cmd.get("nameOnly"):
        reply["totalSize"] = Int64(sum(d.get("sizeOnDisk", 0) for d in dbs))
        reply["totalSizeMb"] = Int64(0)
    reply["ok"] = 1.0
    return reply


@command("listCollections")
def _list_collections(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    out = []
    for name, info in sorted(ctx.storage.collections(db).items()):
        entry: Document = {"name": name, "type": "collection"}
        if not cmd.get("nameOnly"):
            entry["options"] = dict(info.options)
            entry["info"] = {"readOnly": False, "uuid": info.uuid}
            entry["idIndex"] = {"v": 2, "key": {"_id": 1}, "name": "_id_"}
        flt = cmd.get("filter")
        if flt and not filter_applies(flt, entry):
            continue
        out.append(entry)
    return _list_result(ctx, f"{db}.$cmd.listCollections", out, cmd)


_CREATE_OPTIONS = frozenset(
    {"capped", "size", "max", "changeStreamPreAndPostImages", "validator", "validationLevel",
     "validationAction", "collation", "storageEngine", "indexOptionDefaults", "comment"}
)


@command("create")
def _create(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    coll = _coll_name(cmd, "create")
    options: Document = {}
    for key, value in cmd.items():
        if key == "create" or key.startswith("$") or key in ("lsid", "writeConcern", "txnNumber"):
            continue
        if key in ("viewOn", "pipeline", "timeseries", "clusteredIndex", "encryptedFields"):
            raise CommandError(115, f"the MongoDB emulator does not support create.{key}")
        if key not in _CREATE_OPTIONS:
            raise CommandError(40415, f"BSON field 'create.{key}' is an unknown field.")
        options[key] = value
    if options.get("capped") and not isinstance(options.get("size"), int | float):
        raise CommandError(72, "the 'size' field is required when 'capped' is true")
    ctx.storage.create_collection(db, coll, options, implicit=False)
    return {"ok": 1.0}


@command("drop")
def _drop(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    coll = _coll_name(cmd, "drop")
    if (db, coll) == OPLOG_NS and ctx.storage.replicated:
        raise CommandError(20, "can't drop live oplog while replicating")
    info = ctx.storage.info(db, coll)
    n = len(ctx.storage.list_indexes(db, coll)) if info else 0
    ctx.storage.drop_collection(db, coll)
    reply: Document = {"ok": 1.0}
    if info is not None:
        reply = {"nIndexesWas": n, "ns": f"{db}.{coll}", "ok": 1.0}
    return reply


@command("renameCollection")
def _rename_collection(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    if db != "admin":
        raise CommandError(13, "renameCollection may only be run against the admin database.")
    source, target = cmd.get("renameCollection"), cmd.get("to")
    if not isinstance(source, str) or not isinstance(target, str):
        raise CommandError(14, "'renameCollection' and 'to' must be namespace strings")
    source_db, _, source_coll = source.partition(".")
    target_db, _, target_coll = target.partition(".")
    if not source_coll or not target_coll:
        bad = source if not source_coll else target
        raise CommandError(73, f"Invalid namespace specified '{bad}'")
    ctx.storage.rename_collection(
        source_db, source_coll, target_db, target_coll, drop_target=bool(cmd.get("dropTarget"))
    )
    return {"ok": 1.0}


@command("dropDatabase")
def _drop_database(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    if db == "local" and ctx.storage.replicated:
        raise CommandError(20, "Cannot drop 'local' database while replication is active")
    ctx.storage.drop_database(db)
    return {"dropped": db, "ok": 1.0}


@command("createIndexes")
def _create_indexes(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    coll = _coll_name(cmd, "createIndexes")
    specs = cmd.get("indexes")
    if not isinstance(specs, list) or not specs:
        raise CommandError(9, "Must specify at least one index to create")
    storage = ctx.storage
    created_coll = storage.info(db, coll) is None
    before = 1 if created_coll else len(storage.list_indexes(db, coll))
    created = 0
    for spec in specs:
        if not isinstance(spec, Mapping):
            raise CommandError(14, "each index specification must be an object")
        if storage.create_index(db, coll, spec):
            created += 1
    after = len(storage.list_indexes(db, coll))
    reply: Document = {
        "numIndexesBefore": before,
        "numIndexesAfter": after,
        "createdCollectionAutomatically": created_coll,
    }
    if not created:
        reply["note"] = "all indexes already exist"
    reply["ok"] = 1.0
    return reply


@command("listIndexes")
def _list_indexes(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    coll = _coll_name(cmd, "listIndexes")
    if (db, coll) == OPLOG_NS and ctx.storage.replicated:
        return _list_result(ctx, f"{db}.{coll}", [], cmd)
    return _list_result(ctx, f"{db}.{coll}", ctx.storage.list_indexes(db, coll), cmd)


@command("dropIndexes", "deleteIndexes")
def _drop_indexes(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    coll = _coll_name(cmd, next(iter(cmd)))
    was = ctx.storage.drop_indexes(db, coll, cmd.get("index"))
    return {"nIndexesWas": was, "ok": 1.0}


# -- writes ----------------------------------------------------------------------------
def _each_statement(
    cmd: Document, key: str, apply: Callable[[int, Any], None]
) -> list[Document]:
    """Run a write command's statements; each fails on its own, as in MongoDB, and an
    ordered batch stops at the first failure. Returns the writeErrors."""
    ordered = cmd.get("ordered", True)
    errors: list[Document] = []
    for i, statement in enumerate(_statements(cmd, key)):
        try:
            apply(i, statement)
        except Exception as exc:
            errors.append(_write_error(i, exc))
            if ordered:
                break
    return errors


@command("insert")
def _insert(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    coll = _coll_name(cmd, "insert")
    reply: Document = {"n": 0}

    def apply(i: int, doc: Any) -> None:
        if not isinstance(doc, Mapping):
            raise CommandError(14, "each document to insert must be an object")
        ctx.storage.insert(db, coll, dict(doc))
        reply["n"] += 1

    return _finish_write(reply, _each_statement(cmd, "documents", apply))


@command("update")
def _update(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    coll = _coll_name(cmd, "update")
    reply: Document = {"n": 0, "nModified": 0}
    upserted: list[Document] = []
    no_upsert = WriteOutcome().upserted_id

    def apply(i: int, st: Any) -> None:
        if not isinstance(st, Mapping) or "q" not in st or "u" not in st:
            raise CommandError(40414, "update statement must have 'q' and 'u'")
        out = ctx.storage.update(
            db, coll, dict(st["q"]), st["u"],
            multi=bool(st.get("multi", False)),
            upsert=bool(st.get("upsert", False)),
            array_filters=st.get("arrayFilters"),
        )
        reply["n"] += out.matched
        reply["nModified"] += out.modified
        if out.upserted_id is not no_upsert:
            upserted.append({"index": i, "_id": out.upserted_id})
            reply["n"] += 1

    errors = _each_statement(cmd, "updates", apply)
    if upserted:
        reply["upserted"] = upserted
    return _finish_write(reply, errors)


@command("delete")
def _delete(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    coll = _coll_name(cmd, "delete")
    reply: Document = {"n": 0}

    def apply(i: int, st: Any) -> None:
        if not isinstance(st, Mapping) or "q" not in st or "limit" not in st:
            raise CommandError(40414, "delete statement must have 'q' and 'limit'")
        if st["limit"] not in (0, 1):
            raise CommandError(9, "The limit field in delete objects must be 0 or 1.")
        reply["n"] += ctx.storage.delete(db, coll, dict(st["q"]), multi=st["limit"] == 0).deleted

    return _finish_write(reply, _each_statement(cmd, "deletes", apply))


@command("findAndModify")
def _find_and_modify(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    coll = _coll_name(cmd, next(iter(cmd)))
    remove = bool(cmd.get("remove", False))
    update = cmd.get("update")
    if remove == (update is not None):
        raise CommandError(9, "Either an update or remove=true must be specified")
    if remove and cmd.get("upsert"):
        raise CommandError(9, "Cannot specify both an upsert and remove=true")
    try:
        value, last = ctx.storage.find_and_modify(
            db, coll,
            query=dict(cmd.get("query") or {}),
            sort=_sort_spec(cmd.get("sort")),
            remove=remove,
            update=update,
            new=bool(cmd.get("new", False)),
            fields=cmd.get("fields"),
            upsert=bool(cmd.get("upsert", False)),
            array_filters=cmd.get("arrayFilters"),
        )
    except CommandError:
        raise
    except Exception as exc:
        raise as_command_error(exc) from exc
    return {"lastErrorObject": last, "value": value, "ok": 1.0}


# -- reads -----------------------------------------------------------------------------
@command("find")
def _find(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    coll = _coll_name(cmd, "find")
    flt = cmd.get("filter") or {}
    if not isinstance(flt, Mapping):
        raise CommandError(14, "BSON field 'find.filter' is the wrong type, expected object")
    projection = cmd.get("projection")
    sort = _sort_spec(cmd.get("sort"))
    skip = _opt_int(cmd, "skip", 0) or 0
    limit = _opt_int(cmd, "limit", 0) or 0
    batch_size = _opt_int(cmd, "batchSize")
    if skip < 0 or limit < 0 or (batch_size is not None and batch_size < 0):
        raise CommandError(51024, "skip, limit and batchSize must be non-negative")
    single = bool(cmd.get("singleBatch", False))
    tailable = bool(cmd.get("tailable", False))
    await_data = bool(cmd.get("awaitData", False))
    storage = ctx.storage
    if (db, coll) == OPLOG_NS and storage.replicated:
        if tailable and sort and sort != [("$natural", 1)]:
            raise CommandError(2, "cannot use tailable option with a sort other than {$natural: 1}")
        cursor: Cursor = OplogCursor(
            storage, dict(flt), tailable=tailable, await_data=await_data, sort=sort,
            projection=projection, skip=skip, limit=limit,
        )
        return _start_cursor(ctx, cursor, batch_size if batch_size else None, single)
    if tailable:
        info = storage.info(db, coll)
        if info is None or not info.options.get("capped"):
            raise CommandError(2, f"error processing query: ns={db}.{coll} tailable cursor"
                                  " requested on non capped collection")
    docs = storage.find(db, coll, dict(flt), projection=projection, sort=sort, skip=skip,
                        limit=limit)
    if limit and batch_size:
        batch_size = min(batch_size, limit)
    return _start_cursor(ctx, ListCursor(f"{db}.{coll}", docs), batch_size, single)


@command("getMore")
def _get_more(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    cursor_id = cmd["getMore"]
    if not isinstance(cursor_id, int):
        raise CommandError(14, "getMore cursor id must be a long")
    cursor = ctx.cursors.get(int(cursor_id))
    batch_size = _opt_int(cmd, "batchSize")
    max_time = _opt_int(cmd, "maxTimeMS")
    try:
        batch = cursor.next_batch(ctx.storage, batch_size, max_time, ctx.stopping)
    except CommandError:
        ctx.cursors.remove(cursor.id)
        raise
    if ctx.stopping():
        raise CommandError(11600, "interrupted at shutdown")
    keep = not cursor.exhausted
    if not keep:
        ctx.cursors.remove(cursor.id)
    return _cursor_reply(cursor, batch, False, keep)


@command("killCursors")
def _kill_cursors(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    killed: list[Any] = []
    not_found: list[Any] = []
    for cid in cmd.get("cursors") or []:
        (killed if ctx.cursors.remove(int(cid)) else not_found).append(cid)
    return {"cursorsKilled": killed, "cursorsNotFound": not_found, "cursorsAlive": [],
            "cursorsUnknown": [], "ok": 1.0}


@command("count")
def _count(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    coll = _coll_name(cmd, "count")
    flt = cmd.get("query") or {}
    skip = _opt_int(cmd, "skip", 0) or 0
    limit = abs(_opt_int(cmd, "limit", 0) or 0)
    if (db, coll) == OPLOG_NS and ctx.storage.replicated:
        n = sum(1 for r in ctx.storage.oplog.records_from(0) if filter_applies(flt, r.entry))
    elif not flt:
        n = ctx.storage.count(db, coll)
    else:
        n = len(ctx.storage.find(db, coll, dict(flt)))
    n = max(0, n - skip)
    if limit:
        n = min(n, limit)
    return {"n": n, "ok": 1.0}


@command("distinct")
def _distinct(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    coll = _coll_name(cmd, "distinct")
    key = cmd.get("key")
    if not isinstance(key, str):
        raise CommandError(14, "distinct 'key' must be a string")
    if ctx.storage.info(db, coll) is None:
        return {"values": [], "ok": 1.0}
    try:
        values = ctx.storage.distinct(db, coll, key, cmd.get("query") or {})
    except Exception as exc:
        raise as_command_error(exc) from exc
    return {"values": list(values), "ok": 1.0}


@command("aggregate")
def _aggregate(ctx: Context, conn: ConnectionInfo, db: str, cmd: Document) -> Document:
    target = cmd["aggregate"]
    pipeline = cmd.get("pipeline")
    if not isinstance(pipeline, list):
        raise CommandError(14, "'pipeline' option must be specified as an array")
    spec = cmd.get("cursor")
    if not isinstance(spec, Mapping):
        raise CommandError(9, "The 'cursor' option is required, except for aggregate with"
                              " the explain argument")
    batch_size = _opt_int(spec, "batchSize")
    if pipeline and isinstance(pipeline[0], Mapping) and "$changeStream" in pipeline[0]:
        if not ctx.storage.replicated:
            raise CommandError(40573, "The $changeStream stage is only supported on replica"
                                      " sets")
        if ctx.storage.active_txn is not None:
            raise CommandError(263, "Operation not permitted in transaction :: caused by ::"
                                    " $changeStream")
        return _change_stream(ctx, db, target, pipeline, batch_size)
    for stage in pipeline[1:]:
        if isinstance(stage, Mapping) and "$changeStream" in stage:
            raise CommandError(40602, "$changeStream is only valid as the first stage in a"
                                      " pipeline")
    if target == 1:
        raise CommandError(115, "the emulator supports database-level aggregate only for"
                                " $changeStream")
    if not isinstance(target, str):
        raise CommandError(14, "aggregate target must be a collection name or 1")
    if (db, target) == OPLOG_NS and ctx.storage.replicated:
        docs = [dict(r.entry) for r in ctx.storage.oplog.records_from(0)]
        result = ctx.storage.apply_pipeline(db, docs, pipeline)
    else:
        try:
            result = ctx.storage.aggregate(db, target, pipeline)
        except CommandError:
            raise
        except Exception as exc:
            raise as_command_error(exc) from exc
    return _start_cursor(ctx, ListCursor(f"{db}.{target}", result), batch_size)


def _change_stream(
    ctx: Context, db: str, target: Any, pipeline: list[Any], batch_size: int | None
) -> Document:
    cluster = db == "admin" and target == 1
    opts = parse_change_stream_stage(pipeline[0]["$changeStream"], cluster=cluster)
    if cluster:
        scope = StreamScope(None, None)
        ns = "admin.$cmd.aggregate"
    elif target == 1:
        if db in ("admin", "config", "local"):
            raise CommandError(73, f"$changeStream may not be opened on the internal {db}"
                                   " database")
        scope = StreamScope(db, None)
        ns = f"{db}.$cmd.aggregate"
    else:
        if not isinstance(target, str):
            raise CommandError(14, "aggregate target must be a collection name or 1")
        if db in ("admin", "config", "local") or target.startswith("system."):
            raise CommandError(73, f"cannot open a change stream on {db}.{target}")
        scope = StreamScope(db, target)
        ns = f"{db}.{target}"
    for stage in pipeline[1:]:
        if not isinstance(stage, Mapping) or len(stage) != 1:
            raise CommandError(40323, "A pipeline stage specification object must contain"
                                      " exactly one field.")
        name = next(iter(stage))
        if name not in ("$match", "$project", "$addFields", "$set", "$unset", "$replaceRoot",
                        "$replaceWith", "$redact"):
            raise CommandError(
                ErrorCodeIllegalStage, f"Stage {name} is not permitted in a $changeStream pipeline"
            )
    cursor = ChangeStreamCursor(ctx.storage, ns, scope, opts, list(pipeline[1:]), ctx.history)
    batch = cursor.first_batch(ctx.storage, batch_size)
    keep = not cursor.exhausted
    if keep:
        ctx.cursors.add(cursor)
    return _cursor_reply(cursor, batch, True, keep)


ErrorCodeIllegalStage = 5491300


__all__ = [
    "Context",
    "cluster_time_fields",
    "command_name",
    "hello_reply",
    "run",
]
