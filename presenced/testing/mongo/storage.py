"""The emulator's data: databases, collections, the writes' oplog entries, transactions.

Owns: the catalog (which collections exist, their UUIDs and options), every write
statement (run on mongomock-ng through :mod:`._mongomock`, its before/after images
captured and turned into one oplog entry each, ``$v: 2`` diffs for updates), the
opcounters, index definitions (their contents live in each collection's
:class:`~presenced.testing.mongo.indexes.DocumentTable`), the TTL monitor's pass,
multi-document transactions (per-session state, and their isolation: a transaction's
writes are applied at once but logged as one ``applyOps`` entry at commit; its first
before-images let an abort put every touched document back, let readers outside see the
committed documents, and refuse (WriteConflict) or hold back (a plain write waits)
other writers; reads inside see its snapshot; see :mod:`.transactions`), and snapshots.
The clock and the oplog itself are :mod:`.oplog`'s.

Must never: touch sockets or know the wire protocol; print (errors go to the command's
reply, or to logging). Every public method is called with ``Storage.lock`` held by the
caller (the command layer takes it once per command), so a command is atomic with
respect to every other.
"""

from __future__ import annotations

import copy
import datetime as dt
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bson import Int64, Timestamp
from bson.binary import Binary
from mongomock_ng import filtering as mm_filtering
from mongomock_ng import helpers as mm_helpers
from mongomock_ng.filtering import filter_applies
from pymongo.errors import DuplicateKeyError

from presenced.testing.mongo._mongomock import (
    MISSING,
    Capture,
    CaptureSlot,
    new_client,
    sort_documents,
    store_key,
)
from presenced.testing.mongo.diff import compute_v2_diff
from presenced.testing.mongo.errors import CommandError
from presenced.testing.mongo.indexes import (
    DocumentTable,
    DuplicateKey,
    UniqueIndex,
    duplicate_key_message,
)
from presenced.testing.mongo.oplog import LogicalClock, Oplog, OplogRecord
from presenced.testing.mongo.pipelines import PreparedFilters, run_pipeline
from presenced.testing.mongo.transactions import (
    ABORT,
    COMMIT,
    DocKey,
    SessionState,
    Transaction,
    WriteBlocked,
)

Document = dict[str, Any]
_MISSING = MISSING
_T = TypeVar("_T")


def _filter_paths(filter: Any) -> set[str]:
    paths: set[str] = set()
    if isinstance(filter, Mapping):
        for key, value in filter.items():
            if key in ("$and", "$or", "$nor") and isinstance(value, list):
                for sub in value:
                    paths |= _filter_paths(sub)
            elif not key.startswith("$"):
                paths.add(key)
    return paths


def _check_positional(filter: Any, update: Mapping[str, Any]) -> None:
    """MongoDB refuses ``a.$`` unless the query matched an element of ``a``."""
    queried = _filter_paths(filter)
    for fields in update.values():
        if not isinstance(fields, Mapping):
            continue
        for path in fields:
            parts = str(path).split(".")
            if "$" not in parts:
                continue
            prefix = ".".join(parts[: parts.index("$")])
            if not any(q == prefix or q.startswith(prefix + ".") for q in queried):
                raise CommandError(
                    2, "The positional operator did not find the match needed from the query."
                )


# --------------------------------------------------------------------------------------
# Catalog and storage
# --------------------------------------------------------------------------------------

SYSTEM_DATABASES = frozenset({"admin", "config", "local"})
OPLOG_NS = ("local", "oplog.rs")


@dataclass
class CollectionInfo:
    uuid: Binary
    options: Document = field(default_factory=dict)

    @property
    def images_enabled(self) -> bool:
        opt = self.options.get("changeStreamPreAndPostImages")
        return isinstance(opt, Mapping) and bool(opt.get("enabled"))


@dataclass
class WriteOutcome:
    """What one write statement did, for the command's reply."""

    matched: int = 0
    modified: int = 0
    deleted: int = 0
    inserted: int = 0
    upserted_id: Any = _MISSING
    value: Any = None  # findAndModify's document


#: How many idle sessions' states are kept (MongoDB keeps them for 30 minutes).
MAX_SESSIONS = 10_000


def validate_collection_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise CommandError(73, f"Invalid namespace specified: collection name {name!r}")
    if "$" in name or "\x00" in name or name.startswith(".") or name.endswith("."):
        raise CommandError(73, f"Invalid collection name: {name}")
    return name


def validate_database_name(name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > 63:
        raise CommandError(73, f"Invalid database name: {name!r}")
    if any(c in name for c in '/\\. "$\x00'):
        raise CommandError(73, f"Invalid database name: {name!r}")
    return name


class Storage:
    def __init__(
        self, oplog_size: int = 100_000, wall: Callable[[], float] = time.time, *,
        replicated: bool = True,
    ) -> None:
        #: False for a standalone server: nothing is written to the oplog.
        self.replicated = replicated
        self.lock = threading.RLock()
        #: Notified (with lock held) after every write: awaitData cursors wait on it.
        self.changed = threading.Condition(self.lock)
        self._wall = wall
        self.clock = LogicalClock(wall)
        self.oplog = Oplog(oplog_size)
        self.catalog: dict[str, dict[str, CollectionInfo]] = {}
        self.opcounters = dict.fromkeys(
            ("insert", "query", "update", "delete", "getmore", "command"), 0
        )
        #: The same, per client appName (commands.py counts them; emulator only).
        self.opcounters_by_app: dict[str, dict[str, int]] = {}
        #: The commands (round trips) per client appName, by command name.
        self.commands_by_app: dict[str, dict[str, int]] = {}
        #: Documents returned by cursor commands (find, getMore, aggregate), per client
        #: appName and command (serverStatus.documentsReturnedByAppName, emulator only).
        self.returned_by_app: dict[str, dict[str, int]] = {}
        #: The write statement running on each thread of this storage (its capture).
        self._captures = CaptureSlot()
        self._mm: Any = new_client(self._captures)
        self._filters = PreparedFilters()
        self._index_extra: dict[tuple[str, str, str], Document] = {}
        #: Sessions that used a txnNumber, by lsid id bytes (oldest first).
        self.sessions: dict[bytes, SessionState] = {}
        self._local = threading.local()
        #: Transactions in progress (by id()), and the documents each holds: per
        #: collection life (db, coll, uuid bytes), store key -> the transaction.
        self._open: dict[int, Transaction] = {}
        self._held: dict[tuple[str, str, bytes], dict[Any, Transaction]] = {}
        #: How long a write outside a transaction waits for a transaction holding one of
        #: its documents to end (the transaction's lifetime bounds it anyway).
        self.write_wait_limit = 60.0

    # -- time ------------------------------------------------------------------------
    def now(self) -> dt.datetime:
        """Wall time with millisecond precision, naive UTC (as BSON dates decode)."""
        ms = int(self._wall() * 1000)
        return dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=ms)

    @property
    def operation_time(self) -> Timestamp:
        return self.clock.last

    # -- catalog ---------------------------------------------------------------------
    def database_names(self) -> list[str]:
        names = {db for db, colls in self.catalog.items() if colls}
        # A replica-set member always has admin (system.version) and local (the oplog).
        names.update(("admin", "local"))
        return sorted(names)

    def collections(self, db: str) -> dict[str, CollectionInfo]:
        colls = dict(self.catalog.get(db, {}))
        if db == "local" and self.replicated:
            colls.setdefault(
                "oplog.rs",
                CollectionInfo(_OPLOG_UUID, {"capped": True, "size": self.oplog.max_entries}),
            )
        return colls

    def info(self, db: str, coll: str) -> CollectionInfo | None:
        return self.catalog.get(db, {}).get(coll)

    def mm(self, db: str, coll: str) -> Any:
        return self._mm[db][coll]

    def create_collection(
        self, db: str, coll: str, options: Mapping[str, Any] | None = None, *, implicit: bool
    ) -> CollectionInfo:
        validate_database_name(db)
        validate_collection_name(coll)
        if (db, coll) == OPLOG_NS:
            raise CommandError(48, "Collection local.oplog.rs already exists.")
        existing = self.info(db, coll)
        if existing is not None:
            # MongoDB 7.0: an explicit create with the same options is a no-op.
            if implicit or dict(existing.options) == dict(options or {}):
                return existing
            raise CommandError(48, f"Collection {db}.{coll} already exists.")
        info = CollectionInfo(
            Binary(uuid.uuid4().bytes, 4), {k: v for k, v in (options or {}).items()}
        )
        self.catalog.setdefault(db, {})[coll] = info
        self._mm[db]._store.create_collection(coll)
        o: Document = {"create": coll}
        o.update(info.options)
        o["idIndex"] = {"v": 2, "key": {"_id": 1}, "name": "_id_"}
        self._log_command(db, o, info.uuid)
        return info

    def drop_collection(self, db: str, coll: str) -> bool:
        info = self.catalog.get(db, {}).pop(coll, None)
        if info is None:
            return False
        self._mm[db].drop_collection(coll)
        self._log_command(db, {"drop": coll}, info.uuid)
        return True

    def rename_collection(
        self, db: str, source: str, target_db: str, target: str, *, drop_target: bool
    ) -> None:
        """``renameCollection`` within one database: the documents, indexes and options
        move to ``target`` (dropped first with ``drop_target``, else 48); logged as one
        command entry, as MongoDB logs it (a dropped target's uuid in ``dropTarget``)."""
        if target_db != db:
            raise CommandError(20, "the emulator renames a collection within its database only")
        validate_collection_name(target)
        if OPLOG_NS in ((db, source), (db, target)):
            raise CommandError(20, "can't rename live oplog while replicating")
        info = self.info(db, source)
        if info is None:
            raise CommandError(26, f"Source collection {db}.{source} does not exist")
        if source == target:
            raise CommandError(20, "Can't rename a collection to itself")
        dropped = self.catalog.get(db, {}).get(target)
        if dropped is not None:
            if not drop_target:
                raise CommandError(48, "target namespace exists")
            self.catalog[db].pop(target)
            self._mm[db].drop_collection(target)
        self.catalog[db][target] = self.catalog[db].pop(source)
        mdb = self._mm[db]
        mdb._store.rename(source, target)
        for name in (source, target):  # mongomock-ng's cached Collection objects
            mdb._collection_accesses.pop(name, None)
        for (d, c, name) in [k for k in self._index_extra if k[:2] == (db, source)]:
            self._index_extra[(d, target, name)] = self._index_extra.pop((d, c, name))
        o: Document = {
            "renameCollection": f"{db}.{source}", "to": f"{db}.{target}", "stayTemp": False,
        }
        if dropped is not None:
            o["dropTarget"] = dropped.uuid
        self._log_command(db, o, info.uuid)

    def drop_database(self, db: str) -> None:
        for coll in list(self.catalog.get(db, {})):
            self.drop_collection(db, coll)
        self.catalog.pop(db, None)
        self._mm.drop_database(db)
        self._log_command(db, {"dropDatabase": 1}, None)

    def create_index(self, db: str, coll: str, spec: Mapping[str, Any]) -> bool:
        """Create one index; False if an identical one exists already."""
        info = self.create_collection(db, coll, implicit=True)
        key = spec.get("key")
        name = spec.get("name")
        if not isinstance(key, Mapping) or not key:
            raise CommandError(9, "Error in specification: 'key' must be a non-empty object")
        if not isinstance(name, str) or not name:
            raise CommandError(9, "Error in specification: 'name' must be a non-empty string")
        options = {k: v for k, v in spec.items() if k not in ("key", "name", "v")}
        existing = self._mm[db][coll].index_information()
        for ename, einfo in existing.items():
            same_key = list(einfo["key"]) == list(key.items())
            if ename == name or same_key:
                wanted = {"key": list(key.items()), **options}
                have = {k: v for k, v in einfo.items() if k not in ("v", "ns")}
                if ename == name and same_key and _norm_index(have) == _norm_index(wanted):
                    return False
                if ename == name:
                    raise CommandError(
                        86, f"An existing index has the same name as the requested index: {name}"
                    )
                raise CommandError(
                    85,
                    f"An equivalent index already exists with a different name and options:"
                    f" {ename}",
                )
        self._install_index(db, coll, name, list(key.items()), options)
        extra = {k: v for k, v in options.items() if k not in _MM_INDEX_OPTIONS}
        if extra:
            self._index_extra.setdefault((db, coll, name), {}).update(extra)
        self._log_command(db, {"createIndexes": coll, "v": 2, "key": dict(key), "name": name,
                               **options}, info.uuid)
        return True

    def _install_index(
        self, db: str, coll: str, name: str, spec: list[tuple[str, Any]], options: Document
    ) -> None:
        config: Document = {"key": spec}
        for flag in ("unique", "sparse"):
            if options.get(flag):
                config[flag] = True
        for opt in ("expireAfterSeconds", "partialFilterExpression"):
            if options.get(opt) is not None:
                config[opt] = options[opt]
        mmc: Any = self._mm[db][coll]
        if config.get("unique"):
            _check_no_duplicates(f"{db}.{coll}", name, config, mmc._store._documents)
        mmc._store.create_index(name, config)

    def list_indexes(self, db: str, coll: str) -> list[Document]:
        if self.info(db, coll) is None:
            raise CommandError(26, f"ns does not exist: {db}.{coll}")
        out = []
        for ix in self._mm[db][coll].list_indexes():
            doc: Document = {"v": 2, "key": ix["key"], "name": ix["name"]}
            for k, v in ix.items():
                if k not in ("v", "key", "name", "ns"):
                    doc[k] = v
            doc.update(self._index_extra.get((db, coll, ix["name"]), {}))
            out.append(doc)
        return out

    def drop_indexes(self, db: str, coll: str, which: Any) -> int:
        if self.info(db, coll) is None:
            raise CommandError(26, f"ns not found {db}.{coll}")
        mmc = self._mm[db][coll]
        before = len(mmc.index_information())
        if which == "*":
            names = [n for n in mmc.index_information() if n != "_id_"]
        elif isinstance(which, str):
            names = [which]
        elif isinstance(which, list):
            names = list(which)
        elif isinstance(which, Mapping):
            key = list(which.items())
            names = [n for n, i in mmc.index_information().items() if list(i["key"]) == key]
            if not names:
                raise CommandError(27, f"can't find index with key: {dict(which)}")
        else:
            raise CommandError(14, "dropIndexes 'index' must be a string, list or object")
        for name in names:
            if name == "_id_":
                raise CommandError(72, "cannot drop _id index")
            if name not in mmc.index_information():
                raise CommandError(27, f"index not found with name [{name}]")
        info = self.info(db, coll)
        for name in names:
            mmc.drop_index(name)
            self._index_extra.pop((db, coll, name), None)
            self._log_command(db, {"dropIndexes": coll, "index": name}, info.uuid if info else None)
        return before

    def ttl_indexes(self) -> Iterator[tuple[str, str, str, float]]:
        for db, colls in self.catalog.items():
            for coll in colls:
                for ix in self._mm[db][coll].index_information().values():
                    after = ix.get("expireAfterSeconds")
                    key = ix.get("key") or []
                    if after is not None and len(key) == 1:
                        yield db, coll, key[0][0], float(after)

    def expire_ttl(self) -> int:
        """One pass of the TTL monitor: delete expired documents as MongoDB would."""
        now = self.now()
        removed = 0
        for db, coll, field_name, after in list(self.ttl_indexes()):
            cutoff = now - dt.timedelta(seconds=after)
            documents = self._mm[db][coll]._store._documents
            info = self.catalog[db][coll]
            held = self._held.get((db, coll, bytes(info.uuid)), {})
            expired: list[Any] = []
            for key, doc in list(documents.items()):
                if key in held:
                    continue  # a transaction holds it: a later pass sees how it ended
                value: Any = mm_helpers.get_value_by_dot(doc, field_name)
                dates = value if isinstance(value, list) else [value]
                dates = [d for d in dates if isinstance(d, dt.datetime)]
                if dates and min(_naive(d) for d in dates) < cutoff:
                    expired.append(doc["_id"])
            for _id in expired:
                removed += self.delete(db, coll, {"_id": _id}, multi=False).deleted
        return removed

    # -- writes ----------------------------------------------------------------------
    def insert(self, db: str, coll: str, doc: Document) -> Any:
        return self._blocking(lambda: self._insert(db, coll, doc))

    def _insert(self, db: str, coll: str, doc: Document) -> Any:
        if (db, coll) == OPLOG_NS:
            raise CommandError(20, "cannot insert into the oplog")
        self.create_collection(db, coll, implicit=True)
        if "_id" not in doc:
            from bson import ObjectId

            doc = {"_id": ObjectId(), **doc}
        mmc = self._mm[db][coll]
        self._check_insert(db, coll, doc["_id"])
        with self._capturing(mmc, f"{db}.{coll}", in_place=False) as cap:
            mmc.insert_one(doc)
        self._record(db, coll, cap, replacement=False)
        self.opcounters["insert"] += 1
        self._enforce_capped(db, coll)
        return doc["_id"]

    def update(
        self,
        db: str,
        coll: str,
        filter: Document,
        update: Any,
        *,
        multi: bool,
        upsert: bool,
        array_filters: list[Document] | None = None,
    ) -> WriteOutcome:
        return self._blocking(lambda: self._update(
            db, coll, filter, update, multi=multi, upsert=upsert, array_filters=array_filters
        ))

    def _update(
        self,
        db: str,
        coll: str,
        filter: Document,
        update: Any,
        *,
        multi: bool,
        upsert: bool,
        array_filters: list[Document] | None = None,
    ) -> WriteOutcome:
        if (db, coll) == OPLOG_NS:
            raise CommandError(20, "cannot update the oplog")
        replacement = isinstance(update, Mapping) and not any(
            str(k).startswith("$") for k in update
        )
        if replacement and multi:
            raise CommandError(9, "multi update is not supported for replacement-style update")
        if not replacement and isinstance(update, Mapping) and not update:
            raise CommandError(9, "Update document requires atomic operators")
        if isinstance(update, Mapping) and not replacement:
            _check_positional(filter, update)
        self.opcounters["update"] += 1
        if self.info(db, coll) is None:
            if not upsert:
                return WriteOutcome()
            self.create_collection(db, coll, implicit=True)
        mmc: Any = self._mm[db][coll]
        self._check_snapshot_matches(db, coll, filter)
        with self._capturing(mmc, f"{db}.{coll}", first_only=not multi) as cap:
            result = mmc._update(
                filter, update, upsert=upsert, multi=multi, array_filters=array_filters
            )
        self._record(db, coll, cap, replacement=replacement,
                     pipeline=isinstance(update, list))
        out = WriteOutcome(matched=0 if result.get("upserted") is not None else result["n"],
                           modified=result.get("nModified", 0))
        if result.get("upserted") is not None:
            out.upserted_id = result["upserted"]
        return out

    def delete(self, db: str, coll: str, filter: Document, *, multi: bool) -> WriteOutcome:
        return self._blocking(lambda: self._delete(db, coll, filter, multi=multi))

    def _delete(self, db: str, coll: str, filter: Document, *, multi: bool) -> WriteOutcome:
        if (db, coll) == OPLOG_NS:
            raise CommandError(20, "cannot delete from the oplog")
        self.opcounters["delete"] += 1
        if self.info(db, coll) is None:
            return WriteOutcome()
        mmc: Any = self._mm[db][coll]
        self._check_snapshot_matches(db, coll, filter)
        with self._capturing(mmc, f"{db}.{coll}", in_place=False) as cap:
            result = mmc._delete(filter, multi=multi)
        self._record(db, coll, cap, replacement=False)
        return WriteOutcome(deleted=result["n"])

    def find_and_modify(
        self,
        db: str,
        coll: str,
        *,
        query: Document,
        sort: list[tuple[str, Any]] | None,
        remove: bool,
        update: Any,
        new: bool,
        fields: Document | None,
        upsert: bool,
        array_filters: list[Document] | None,
    ) -> tuple[Document | None, Document]:
        """Returns (value, lastErrorObject)."""
        return self._blocking(lambda: self._find_and_modify(
            db, coll, query=query, sort=sort, remove=remove, update=update, new=new,
            fields=fields, upsert=upsert, array_filters=array_filters,
        ))

    def _find_and_modify(
        self,
        db: str,
        coll: str,
        *,
        query: Document,
        sort: list[tuple[str, Any]] | None,
        remove: bool,
        update: Any,
        new: bool,
        fields: Document | None,
        upsert: bool,
        array_filters: list[Document] | None,
    ) -> tuple[Document | None, Document]:
        from pymongo import ReturnDocument

        if self.info(db, coll) is None:
            if remove or not upsert:
                return None, {"n": 0, "updatedExisting": False} if not remove else {"n": 0}
            self.create_collection(db, coll, implicit=True)
        mmc = self._mm[db][coll]
        replacement = isinstance(update, Mapping) and not any(
            str(k).startswith("$") for k in update
        )
        if isinstance(update, list):
            raise CommandError(115, "the MongoDB emulator does not support pipeline updates")
        self._check_snapshot_matches(db, coll, query)
        with self._capturing(mmc, f"{db}.{coll}") as cap:
            if remove:
                value = mmc.find_one_and_delete(query, projection=fields, sort=sort)
            elif replacement:
                value = mmc.find_one_and_replace(
                    query, update, projection=fields, sort=sort, upsert=upsert,
                    return_document=ReturnDocument.AFTER if new else ReturnDocument.BEFORE,
                )
            else:
                value = mmc.find_one_and_update(
                    query, update, projection=fields, sort=sort, upsert=upsert,
                    return_document=ReturnDocument.AFTER if new else ReturnDocument.BEFORE,
                    array_filters=array_filters,
                )
        events = self._record(db, coll, cap, replacement=replacement)
        if remove:
            return value, {"n": 1 if value is not None else 0}
        inserted = [k for k, kind in events if kind == "i"]
        last: Document = {"n": 1 if (value is not None or inserted) else 0,
                          "updatedExisting": bool(cap.before) and not inserted}
        if inserted:
            last["upserted"] = inserted[0]
            last["updatedExisting"] = False
            last["n"] = 1
        elif not cap.before:
            last["n"] = 0
        return value, last

    # -- reads -----------------------------------------------------------------------
    def find(
        self,
        db: str,
        coll: str,
        filter: Document,
        *,
        projection: Document | None = None,
        sort: list[tuple[str, Any]] | None = None,
        skip: int = 0,
        limit: int = 0,
    ) -> list[Document]:
        if self.info(db, coll) is None:
            filter_applies(filter, {})
            return []
        sort = [(k, v) for k, v in (sort or []) if k != "$natural"] or None
        mmc: Any = self._mm[db][coll]
        overlay = self._overlay(db, coll)
        if overlay:
            return _select_from(mmc, self._visible(db, coll, overlay), filter, projection,
                                sort, skip, abs(limit))
        docs: list[Document] = mmc.select(filter, projection, sort, skip, abs(limit))
        return docs

    def get_document(self, db: str, coll: str, _id: Any) -> Document | None:
        if self.info(db, coll) is None:
            return None
        key = store_key(_id)
        doc: Any = self._overlay(db, coll).get(key, _MISSING)
        if doc is _MISSING:
            doc = self._mm[db][coll]._store._documents.get(key)
        return copy.deepcopy(doc) if doc is not None else None

    def aggregate(self, db: str, coll: str, pipeline: list[Document]) -> list[Document]:
        for stage in pipeline:
            if "$out" in stage or "$merge" in stage:
                raise CommandError(115, "the MongoDB emulator does not support $out / $merge")
        if self.info(db, coll) is None:
            docs: list[Document] = []
        else:
            docs = [copy.deepcopy(d)
                    for d in self._visible(db, coll, self._overlay(db, coll))]
        return list(mm_aggregate_process(docs, self._mm[db], pipeline))

    def distinct(self, db: str, coll: str, key: str, query: Document) -> list[Any]:
        """distinct's values over the documents the current reader sees."""
        if self.info(db, coll) is None:
            return []
        if not self._overlay(db, coll):
            return list(self._mm[db][coll].distinct(key, query))
        unique: set[Any] = set()
        for doc in self.find(db, coll, query):
            for values in mm_filtering.iter_key_candidates(key, doc):
                if values is mm_filtering.NOTHING:
                    continue
                for value in values if isinstance(values, tuple | list) else [values]:
                    unique.add(mm_helpers.hashdict(value) if isinstance(value, dict) else value)
        return [dict(v) if isinstance(v, mm_helpers.hashdict) else v for v in unique]

    def apply_pipeline(self, db: str, docs: list[Document], pipeline: list[Document]) -> list[Any]:
        return run_pipeline(docs, self._mm[db], pipeline, self._filters)

    def count(self, db: str, coll: str) -> int:
        if self.info(db, coll) is None:
            return 0
        documents: Any = self._mm[db][coll]._store._documents
        n = len(documents)
        for key, image in self._overlay(db, coll).items():
            n += (image is not _MISSING) - (key in documents)
        return n

    # -- isolation -------------------------------------------------------------------
    def _overlay(self, db: str, coll: str) -> dict[Any, Any]:
        """What the current reader sees differently from the store in (db, coll), by
        store key (``MISSING``: absent): the committed image of documents other
        transactions in progress wrote, and, inside a transaction, the images as of its
        snapshot of documents others changed since."""
        info = self.info(db, coll)
        if info is None:
            return {}
        ui = bytes(info.uuid)
        reader = self.active_txn
        overlay: dict[Any, Any] = {}
        for key, holder in self._held.get((db, coll, ui), {}).items():
            if holder is not reader:
                overlay[key] = holder.before[(db, coll, ui, key)]
        if reader is not None:
            for (d, c, u, key), image in reader.snapshot.items():
                if (d, c, u) == (db, coll, ui):
                    overlay[key] = image
        return overlay

    def _visible(self, db: str, coll: str, overlay: Mapping[Any, Any]) -> list[Document]:
        """The collection's documents as the current reader sees them (not copies)."""
        documents: Any = self._mm[db][coll]._store._documents
        if not overlay:
            return list(documents.values())
        out = [overlay.get(key, doc) for key, doc in documents.items()]
        out = [doc for doc in out if doc is not _MISSING]
        out.extend(image for key, image in overlay.items()
                   if key not in documents and image is not _MISSING)
        return out

    def _blocking(self, write: Callable[[], _T]) -> _T:
        """Run one write statement. One that meets a document another transaction in
        progress holds: in a transaction, fails with WriteConflict (112; the command
        layer then aborts it); outside, waits (the lock released) until that
        transaction ends, then runs again, as mongod's write would block."""
        deadline = time.monotonic() + self.write_wait_limit
        while True:
            try:
                return write()
            except WriteBlocked as blocked:
                if self.active_txn is not None:
                    raise CommandError(
                        112, "WriteConflict error: this operation conflicted with another"
                             " operation. Please retry your operation or multi-document"
                             " transaction.",
                        labels=["TransientTransactionError"],
                    ) from None
                holder = blocked.holder
                while holder is not None and holder.in_progress:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise CommandError(
                            50, "operation exceeded time limit: waited for a transaction"
                                " in progress holding a document it writes"
                        ) from None
                    self.changed.wait(min(left, 0.5))

    def _blocker(self, dk: DocKey) -> WriteBlocked | None:
        """Why the current writer may not write document ``dk``, if it may not."""
        txn = self.active_txn
        holder = self._held.get(dk[:3], {}).get(dk[3])
        if holder is not None and holder is not txn:
            return WriteBlocked(holder)
        if txn is not None and dk in txn.snapshot:
            return WriteBlocked(None)  # changed by another writer after its snapshot
        return None

    def _check_snapshot_matches(self, db: str, coll: str, filter: Any) -> None:
        """A transaction's write selects from the current data; one its snapshot would
        have matched but another writer changed (or deleted) since is a conflict too."""
        txn = self.active_txn
        if txn is None or not txn.snapshot:
            return
        info = self.catalog[db][coll]
        where = (db, coll, bytes(info.uuid))
        for dk, image in txn.snapshot.items():
            if dk[:3] == where and image is not _MISSING and filter_applies(filter, image):
                raise WriteBlocked(None)

    def _check_insert(self, db: str, coll: str, _id: Any) -> None:
        info = self.catalog[db][coll]
        blocked = self._blocker((db, coll, bytes(info.uuid), store_key(_id)))
        if blocked is not None:
            raise blocked

    def _committed(self, dk: DocKey, before: Any, writer: Transaction | None) -> None:
        """Document ``dk``, whose committed image was ``before``, changed (a plain write,
        or ``writer``'s commit): every other transaction in progress keeps its image."""
        for txn in self._open.values():
            if txn is not writer:
                txn.snapshot.setdefault(dk, before)

    # -- transactions ----------------------------------------------------------------
    @property
    def active_txn(self) -> Transaction | None:
        """The transaction the current thread's command runs in (writes are collected)."""
        txn: Transaction | None = getattr(self._local, "txn", None)
        return txn

    @active_txn.setter
    def active_txn(self, txn: Transaction | None) -> None:
        self._local.txn = txn

    def session(self, sid: bytes) -> SessionState | None:
        return self.sessions.get(sid)

    def use_txn_number(self, sid: bytes, lsid: Document, txn_number: int,
                       start: bool) -> SessionState:
        """The session moves to ``txn_number`` (it is newer than the one it had): an
        in-progress transaction of the older number rolls back. ``start`` begins a
        transaction with that number."""
        state = self.sessions.pop(sid, None)
        if state is not None and state.txn is not None:
            self.abort_transaction(state.txn)
        state = SessionState(txn_number, Transaction(dict(lsid), txn_number) if start else None)
        if state.txn is not None:
            self._open[id(state.txn)] = state.txn  # its snapshot starts now
        self.sessions[sid] = state  # newest last
        if len(self.sessions) > MAX_SESSIONS:
            for old in list(self.sessions)[: len(self.sessions) - MAX_SESSIONS]:
                old_state = self.sessions[old]
                if old_state.txn is None or not old_state.txn.in_progress:
                    del self.sessions[old]
        return state

    def end_session(self, sid: bytes) -> None:
        """A session ends: its in-progress transaction rolls back."""
        state = self.sessions.pop(sid, None)
        if state is not None and state.txn is not None:
            self.abort_transaction(state.txn)

    def end_all_sessions(self) -> None:
        for sid in list(self.sessions):
            self.end_session(sid)

    def expire_transactions(self, lifetime_s: float) -> int:
        """Abort transactions older than ``lifetime_s`` (transactionLifetimeLimitSeconds)."""
        limit = time.monotonic() - lifetime_s
        n = 0
        for state in self.sessions.values():
            txn = state.txn
            if txn is not None and txn.in_progress and txn.started < limit:
                self.abort_transaction(txn)
                n += 1
        return n

    def commit_transaction(self, txn: Transaction) -> None:
        """Write the transaction's one ``applyOps`` oplog entry (none if it wrote nothing).
        Committing a committed transaction again does nothing (commit is retryable)."""
        if not txn.in_progress:
            txn.fire(COMMIT)  # raises unless committed already
            return
        txn.fire(COMMIT)
        if txn.entries:
            ops = [entry for entry, _pre, _post in txn.entries]
            entry: Document = {
                "lsid": copy.deepcopy(txn.lsid),
                "txnNumber": Int64(txn.txn_number),
                "op": "c",
                "ns": "admin.$cmd",
                "o": {"applyOps": ops},
            }
            pres = [pre for _e, pre, _p in txn.entries]
            posts = [post for _e, _p, post in txn.entries]
            self._append(
                entry,
                pre=pres if any(p is not None for p in pres) else None,
                post=posts if any(p is not None for p in posts) else None,
                tail={"prevOpTime": {"ts": Timestamp(0, 0), "t": Int64(-1)}},
            )
        for dk, before in txn.before.items():
            self._committed(dk, before, txn)
        self._release(txn)
        self.changed.notify_all()

    def abort_transaction(self, txn: Transaction) -> None:
        """Put every document the transaction changed back as it was before its first
        write (reinsert deleted, delete inserted, restore updated); no oplog entry."""
        if not txn.in_progress:
            txn.fire(ABORT)  # raises unless it ended already (then nothing to undo)
            return
        txn.fire(ABORT)
        for (db, coll, ui, key), before in reversed(list(txn.before.items())):
            info = self.info(db, coll)
            if info is None or bytes(info.uuid) != ui:
                continue  # the collection was dropped since: nothing to restore into
            documents: Any = self._mm[db][coll]._store._documents
            if before is _MISSING:
                documents.pop(key, None)
            else:
                documents[key] = before
        self._release(txn)
        self.changed.notify_all()

    def _release(self, txn: Transaction) -> None:
        """An ended transaction holds no document, and keeps no snapshot."""
        self._open.pop(id(txn), None)
        for (db, coll, ui, key) in txn.before:
            held = self._held.get((db, coll, ui))
            if held is not None and held.get(key) is txn:
                del held[key]
                if not held:
                    del self._held[(db, coll, ui)]
        txn.entries = []
        txn.before = {}
        txn.snapshot = {}

    # -- snapshot --------------------------------------------------------------------
    def dump(self) -> dict[str, Any]:
        data: dict[str, Any] = {"catalog": {}, "oplog": self.oplog.dump(),
                                "clock": self.clock.last, "index_extra": dict(self._index_extra)}
        for db, colls in self.catalog.items():
            for coll, info in colls.items():
                mmc = self._mm[db][coll]
                indexes = [ix for ix in mmc.list_indexes() if ix["name"] != "_id_"]
                data["catalog"][(db, coll)] = {
                    "uuid": info.uuid,
                    "options": info.options,
                    "indexes": indexes,
                    # Committed documents only (a transaction in progress is lost, as
                    # at a restart).
                    "documents": self._visible(db, coll, self._overlay(db, coll)),
                }
        return data

    def load(self, data: Mapping[str, Any]) -> None:
        for (db, coll), c in data["catalog"].items():
            self.catalog.setdefault(db, {})[coll] = CollectionInfo(c["uuid"], c["options"])
            self._mm[db]._store.create_collection(coll)
            mmc = self._mm[db][coll]
            for doc in c["documents"]:
                mmc._store._documents[store_key(doc["_id"])] = doc
            for ix in c["indexes"]:
                opts = {k: v for k, v in ix.items() if k in _MM_INDEX_OPTIONS}
                self._install_index(db, coll, ix["name"], list(ix["key"].items()), opts)
        self._index_extra.update(data.get("index_extra", {}))
        self.oplog.load(data["oplog"])
        self.clock.last = max(self.clock.last, data["clock"])

    # -- internals -------------------------------------------------------------------
    class _CaptureScope:
        """One write statement: its capture is this thread's for this storage while it
        runs; on the way out the touched documents' indexes are settled, and a refused
        duplicate becomes MongoDB's E11000 error."""

        def __init__(self, slot: CaptureSlot, cap: Capture, ns: str, in_place: bool) -> None:
            self.slot = slot
            self.cap = cap
            self.ns = ns
            self.in_place = in_place

        def __enter__(self) -> Capture:
            if self.slot.active is not None:
                raise RuntimeError("a write statement is already capturing on this thread")
            self.slot.active = self.cap
            return self.cap

        def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
            self.slot.active = None
            if self.in_place:
                self.cap.settle()
            if isinstance(exc, DuplicateKeyError):
                raise _duplicate_key_error(exc, self.ns) from None

    def _capturing(self, mmc: Any, ns: str, *, first_only: bool = False,
                   in_place: bool = True) -> Storage._CaptureScope:
        """A write statement's scope. ``in_place``: it may change stored documents in
        place (updates do; inserts and deletes only store and remove whole documents),
        so their indexes are settled when it ends."""
        table: DocumentTable = mmc._store._documents
        cap = Capture(table)
        cap.first_only = first_only
        return Storage._CaptureScope(self._captures, cap, ns, in_place)

    def _record(
        self, db: str, coll: str, cap: Capture, *, replacement: bool, pipeline: bool = False
    ) -> list[tuple[Any, str]]:
        """Turn a capture into oplog entries, in the order documents were touched."""
        info = self.catalog[db][coll]
        documents: Any = cap.documents
        ui = bytes(info.uuid)
        for key in cap.before:
            blocked = self._blocker((db, coll, ui, key))
            if blocked is not None:
                # Undo the statement (nothing of it was logged) before giving way.
                for k, image in cap.before.items():
                    if image is _MISSING:
                        documents.pop(k, None)
                    else:
                        documents[k] = image
                raise blocked
        txn = self.active_txn
        done: list[tuple[Any, str]] = []
        for key, before in cap.before.items():
            after = documents.get(key)
            if before is _MISSING and after is None:
                continue
            ns = f"{db}.{coll}"
            images = info.images_enabled
            if before is _MISSING:
                entry: Document = {"op": "i", "ns": ns, "ui": info.uuid,
                                   "o": copy.deepcopy(after), "o2": {"_id": after["_id"]}}
                kind = "i"
            elif after is None:
                entry = {"op": "d", "ns": ns, "ui": info.uuid, "o": {"_id": before["_id"]}}
                kind = "d"
            else:
                diff = compute_v2_diff(before, after, pipeline=pipeline)
                if diff is None:
                    continue
                o = copy.deepcopy(after) if replacement else {"$v": 2, "diff": diff}
                entry = {"op": "u", "ns": ns, "ui": info.uuid, "o": o,
                         "o2": {"_id": after["_id"]}}
                kind = "u"
            pre = copy.deepcopy(before) if images and before is not _MISSING else None
            post = copy.deepcopy(after) if images and after is not None else None
            dk = (db, coll, ui, key)
            if txn is not None:
                txn.before.setdefault(dk, before)
                self._held.setdefault((db, coll, ui), {})[key] = txn
                txn.entries.append((entry, pre, post))
            else:
                if self._open:
                    self._committed(dk, before, None)
                self._append(entry, pre=pre, post=post)
            done.append((after["_id"] if after is not None else before["_id"], kind))
        return done

    def _log_command(self, db: str, o: Document, ui: Binary | None) -> None:
        entry: Document = {"op": "c", "ns": f"{db}.$cmd"}
        if ui is not None:
            entry["ui"] = ui
        entry["o"] = o
        self._append(entry)

    def append_oplog_entry(self, entry: Document) -> None:
        """Append a raw oplog entry (``op``, ``ns``, ``o``...; ts/t/v/wall are added), as
        an ``applyOps`` from elsewhere would: for tests of oplog readers."""
        self._append(dict(entry))

    def noop(self, msg: str = "periodic noop") -> None:
        self._append({"op": "n", "ns": "", "o": {"msg": msg}})

    def _append(
        self, entry: Document, pre: Any = None, post: Any = None, tail: Document | None = None
    ) -> None:
        ts = self.clock.tick()
        entry["ts"] = ts
        entry["t"] = 1
        entry["v"] = 2
        entry["wall"] = self.now()
        if tail:
            entry.update(tail)
        if self.replicated:
            self.oplog.append(ts, entry, pre, post)
        self.changed.notify_all()

    def _enforce_capped(self, db: str, coll: str) -> None:
        info = self.info(db, coll)
        if info is None or not info.options.get("capped"):
            return
        cap_max = info.options.get("max")
        if not isinstance(cap_max, int) or cap_max <= 0:
            return
        documents: Any = self._mm[db][coll]._store._documents
        while len(documents) > cap_max:
            first: Any = next(iter(documents.values()))
            self.delete(db, coll, {"_id": first["_id"]}, multi=False)


_MM_INDEX_OPTIONS = frozenset({"unique", "sparse", "expireAfterSeconds", "partialFilterExpression"})
_OPLOG_UUID = Binary(uuid.UUID("00000000-0000-4000-8000-00000000000f").bytes, 4)


def _norm_index(spec: Mapping[str, Any]) -> Document:
    out = dict(spec)
    out["key"] = [tuple(k) for k in out["key"]]
    for flag in ("unique", "sparse"):
        if not out.get(flag):
            out.pop(flag, None)
    return out


def _check_no_duplicates(ns: str, name: str, config: Mapping[str, Any],
                         documents: Mapping[Any, Document]) -> None:
    """A unique index cannot be built over documents that already share a key."""
    unique = UniqueIndex(name, list(config["key"]), sparse=bool(config.get("sparse")),
                         partial=config.get("partialFilterExpression"))
    for key, doc in documents.items():
        values = unique.clash(key, doc)
        if values is not None:
            err = DuplicateKey(ns, name, unique.spec, values)
            raise CommandError(11000, err.errmsg, extra={"keyPattern": err.key_pattern,
                                                         "keyValue": err.key_value})
        unique.reindex(key, doc)


def _duplicate_key_error(exc: DuplicateKeyError, ns: str) -> CommandError:
    """MongoDB's E11000 reply for a duplicate a unique index refused."""
    if isinstance(exc, DuplicateKey):
        return CommandError(11000, exc.errmsg, extra={"keyPattern": exc.key_pattern,
                                                      "keyValue": exc.key_value})
    details = exc.details or {}
    pattern = dict(details.get("keyPattern") or {"_id": 1})
    value = dict(details.get("keyValue") or {})
    name = "_".join(f"{k}_{v}" for k, v in pattern.items()) if pattern != {"_id": 1} else "_id_"
    return CommandError(11000, duplicate_key_message(ns, name, value),
                        extra={"keyPattern": pattern, "keyValue": value})


def _naive(d: dt.datetime) -> dt.datetime:
    return d.astimezone(dt.UTC).replace(tzinfo=None) if d.tzinfo else d


def _select_from(mmc: Any, docs: list[Document], filter: Document, projection: Any,
                 sort: list[tuple[str, Any]] | None, skip: int, limit: int) -> list[Document]:
    """find over a list of documents (a reader's view differing from the store): the
    same matching, sort and projection as the store's, without its indexes."""
    spec = mm_helpers.patch_datetime_awareness_in_document(filter)
    matched = [doc for doc in docs if filter_applies(spec, doc)]
    if not matched:
        filter_applies(spec, {})  # raises on an invalid filter, as a scan does
    if sort:
        matched = sort_documents(matched, sort)
    matched = matched[skip: skip + limit if limit else None]
    out = []
    for doc in matched:
        fields = dict(projection) if isinstance(projection, Mapping) else projection
        result = mmc._copy_only_fields(doc, fields, dict, filter=spec)  # it pops "_id"
        if result is not None:
            out.append(result)
    return out


def mm_aggregate_process(docs: list[Document], database: Any, pipeline: list[Document]) -> Any:
    from mongomock_ng import aggregate

    return aggregate.process_pipeline(docs, database, pipeline, None)


__all__ = [
    "OPLOG_NS", "SYSTEM_DATABASES",
    "CollectionInfo", "LogicalClock", "Oplog", "OplogRecord", "SessionState", "Storage",
    "Transaction", "WriteOutcome", "sort_documents",
]
