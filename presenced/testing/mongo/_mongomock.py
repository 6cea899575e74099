"""mongomock-ng adapted to the emulator: indexed documents, write capture, BSON order.

Owns: the subclasses of mongomock-ng's stores and collection that a :class:`Storage`
runs on (:func:`new_client`): each collection keeps its documents in a
:class:`~presenced.testing.mongo.indexes.DocumentTable`; a read proposes candidates from
the indexes and runs the full filter on them; results are produced in one pass (no
per-document re-slicing of the result list); unique indexes are checked through their
keys; every document a write statement touches is reported to the capture active on
this thread for this storage (:class:`CaptureSlot`: one per storage, per thread, so two
emulators in one process never see each other's writes); TTL expiry is left to the
storage's monitor; BSON's comparison order for the types mongomock-ng does not rank;
and ``$currentDate`` storing what MongoDB stores. The process-wide patches (collection
class, compare order, ``$currentDate``) carry no state.

Must never: know about the oplog, the catalog, transactions or the wire; decide which
documents match (mongomock-ng's ``filter_applies`` does); print.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import mongomock_ng
from bson import MaxKey, MinKey, Timestamp
from mongomock_ng import collection as mm_collection
from mongomock_ng import database as mm_database
from mongomock_ng import filtering as mm_filtering
from mongomock_ng import helpers as mm_helpers
from mongomock_ng import store as mm_store
from mongomock_ng.filtering import filter_applies
from mongomock_ng.geospatial import extract_near_specs

from presenced.testing.mongo.indexes import DocumentTable, DuplicateKey

Document = dict[str, Any]

#: A document a capture saw before it existed (an insert).
MISSING: Any = object()


def store_key(value: Any) -> Any:
    """The key mongomock-ng stores a document under, from its ``_id``."""
    return mm_helpers.hashdict(value) if isinstance(value, dict) else value


class Capture:
    """The before-image of every document one write statement touched, in touch order
    (``MISSING`` for a document the statement created)."""

    def __init__(self, documents: DocumentTable) -> None:
        self.documents = documents
        self.before: dict[Any, Any] = {}
        #: > 0 while the statement only reads (findAndModify's lookup): nothing is seen.
        self.paused = 0
        #: The statement writes one document at most (updateOne, no sort): its lookup
        #: stops at the first match instead of reading (and copying) every one.
        self.first_only = False

    def see(self, key: Any) -> None:
        if key not in self.before:
            doc = self.documents.get(key, MISSING)
            self.before[key] = MISSING if doc is MISSING else copy.deepcopy(doc)

    def settle(self) -> None:
        """Bring the indexes of every touched document up to date: mongomock-ng changes a
        document in place before it stores it, and a write that failed in between, or
        that changed it into an "equal" document (1 -> True), never stores it."""
        for key in self.before:
            self.documents.refresh(key)


class CaptureSlot(threading.local):
    """The capture of the write statement running on this thread, for one storage."""

    active: Capture | None = None


class _CollectionStore(mm_store.CollectionStore):  # type: ignore[misc]
    """One collection's documents in a DocumentTable; writes reported to the capture.

    Callers hold the storage's lock, so mongomock-ng's own reader/writer lock is not
    taken, and TTL expiry does not run on reads (the storage's monitor runs it)."""

    def __init__(self, name: str, slot: CaptureSlot) -> None:
        super().__init__(name)
        self._documents: DocumentTable = DocumentTable()
        self._slot = slot

    def _remove_expired_documents(self) -> None:
        """Disabled: Storage.expire_ttl runs on the TTL monitor's period, like MongoDB."""

    def _see(self, key: Any) -> None:
        cap = self._slot.active
        if cap is not None and cap.documents is self._documents:
            cap.see(key)

    def __setitem__(self, key: Any, val: Any) -> None:
        self._see(key)
        self._documents[key] = val

    def __delitem__(self, key: Any) -> None:
        self._see(key)
        del self._documents[key]

    def __contains__(self, key: Any) -> bool:
        return key in self._documents

    def __getitem__(self, key: Any) -> Any:
        return self._documents[key]

    def __len__(self) -> int:
        return len(self._documents)

    @property
    def is_empty(self) -> bool:
        return not self._documents

    @property
    def documents(self) -> Iterator[Document]:
        yield from list(self._documents.values())

    def drop(self) -> None:
        super().drop()
        self._documents = DocumentTable()

    def create_index(self, index_name: str, index_dict: Mapping[str, Any]) -> None:
        super().create_index(index_name, index_dict)
        self._documents.add_index(index_name, index_dict)

    def drop_index(self, index_name: str) -> None:
        config = self.indexes[index_name]
        super().drop_index(index_name)
        self._documents.drop_index(index_name, config)


class _DatabaseStore(mm_store.DatabaseStore):  # type: ignore[misc]
    def __init__(self, slot: CaptureSlot) -> None:
        super().__init__()
        self._slot = slot

    def __getitem__(self, col_name: str) -> _CollectionStore:
        col: _CollectionStore | None = self._collections.get(col_name)
        if col is None:
            col = self._collections[col_name] = _CollectionStore(col_name, self._slot)
        return col

    def rename(self, name: str, new_name: str) -> None:
        col = self._collections.pop(name, None) or _CollectionStore(new_name, self._slot)
        col.name = new_name
        self._collections[new_name] = col


class _ServerStore(mm_store.ServerStore):  # type: ignore[misc]
    def __init__(self, slot: CaptureSlot) -> None:
        super().__init__()
        self._slot = slot

    def __getitem__(self, db_name: str) -> _DatabaseStore:
        db: _DatabaseStore | None = self._databases.get(db_name)
        if db is None:
            db = self._databases[db_name] = _DatabaseStore(self._slot)
        return db


def new_client(slot: CaptureSlot) -> Any:
    """A mongomock-ng client whose collections are indexed and report their writes to
    ``slot``."""
    return mongomock_ng.MongoClient(_store=_ServerStore(slot))


class _Collection(mm_collection.Collection):  # type: ignore[misc]
    """Reads through the indexes, unique checks by key, MongoDB's E11000 messages."""

    def _capture(self) -> Capture | None:
        store = self._store
        slot: CaptureSlot | None = getattr(store, "_slot", None)
        cap = slot.active if slot is not None else None
        if cap is None or cap.paused or cap.documents is not store._documents:
            return None
        return cap

    def _apply_update_document(
        self, existing_document: Document, spec: Any, document: Any, was_insert: bool
    ) -> None:
        # mongomock-ng puts the update's own values ($push, $addToSet, $set of a document)
        # into every document a multi-update touches: one object shared by several
        # documents, which a later write to one of them changes in all (and the indexes
        # of only the one written). MongoDB gives each document its own copy.
        super()._apply_update_document(
            existing_document, spec, copy.deepcopy(document), was_insert
        )

    def _iter_documents(self, filter: Any) -> Iterator[Document]:
        table = self._store._documents
        if not isinstance(table, DocumentTable):  # a plain mongomock-ng client
            yield from super()._iter_documents(filter)
            return
        if isinstance(filter, Mapping):
            docs, residual = table.plan(filter)
        else:
            docs, residual = list(table.values()), filter
        if not docs:
            filter_applies(filter, {})  # raises on an invalid filter, as MongoDB does
            return
        cap = self._capture()
        for doc in docs:
            if residual is None or filter_applies(residual, doc):
                if cap is not None:
                    cap.see(store_key(doc["_id"]))
                yield doc
                if cap is not None and cap.first_only:
                    return

    def _ensure_uniques(self, new_data: Document) -> None:
        table = self._store._documents
        if not isinstance(table, DocumentTable):
            super()._ensure_uniques(new_data)
            return
        clash = table.unique_clash(store_key(new_data.get("_id")), new_data)
        if clash is not None:
            unique, values = clash
            raise DuplicateKey(self.full_name, unique.name, unique.spec, values)

    def _insert(self, data: Any, session: Any = None, ordered: bool = True,
                validate: bool = True) -> Any:
        if isinstance(data, Mapping) and "_id" in data and isinstance(
                self._store._documents, DocumentTable) and store_key(data["_id"]) in self._store:
            raise DuplicateKey(self.full_name, "_id_", [("_id", 1)], [data["_id"]])
        return super()._insert(data, session=session, ordered=ordered, validate=validate)

    def _delete(self, filter: Any, collation: Any = None, hint: Any = None,
                multi: bool = False, session: Any = None) -> Document:
        if hint or collation or session is not None or not isinstance(
                self._store._documents, DocumentTable):
            done: Document = super()._delete(filter, collation=collation, hint=hint,
                                             multi=multi, session=session)
            return done
        filter = mm_helpers.patch_datetime_awareness_in_document(filter)
        if filter is None:
            filter = {}
        if not isinstance(filter, Mapping):
            filter = {"_id": filter}
        keys = []
        for doc in self._iter_documents(filter):
            keys.append(store_key(doc["_id"]))
            if not multi:
                break
        for key in keys:
            del self._store[key]
        return {"connectionId": self.database.client._id, "n": len(keys), "ok": 1.0,
                "err": None}

    def find_one(self, filter: Any = None, *args: Any, **kwargs: Any) -> Any:
        """The first match, without reading (or copying) the others unless sorted;
        never reported to a capture (findAndModify reads, then writes by ``_id``)."""
        if len(args) == 1 and "projection" not in kwargs:
            kwargs["projection"], args = args[0], ()
        if args or set(kwargs) - {"sort", "projection"} or not isinstance(
                self._store._documents, DocumentTable):
            return super().find_one(filter, *args, **kwargs)
        if filter is None:
            filter = {}
        if not isinstance(filter, Mapping):
            filter = {"_id": filter}
        cap = self._capture()
        if cap is not None:
            cap.paused += 1
        try:
            return next(iter(self.select(filter, kwargs.get("projection"), kwargs.get("sort"),
                                         0, 1)), None)
        finally:
            if cap is not None:
                cap.paused -= 1

    def select(self, filter: Mapping[str, Any], projection: Any, sort: Any, skip: int,
               limit: int) -> list[Document]:
        """find's documents (copies, projected), in one pass: skip and limit stop the
        copying early; a sort on ``_id`` alone walks the ``_id`` index (and stops at the
        limit), any other sort reads every match."""
        spec = mm_helpers.patch_datetime_awareness_in_document(filter)
        dataset = self._by_id(spec, sort, projection)
        if dataset is None:
            dataset = self._get_dataset(spec, sort, projection, dict)
        return list(itertools.islice(dataset, skip, skip + limit if limit else None))

    def _by_id(self, spec: Any, sort: Any, projection: Any) -> Iterator[Document] | None:
        table = self._store._documents
        if not isinstance(table, DocumentTable) or not isinstance(spec, Mapping):
            return None
        keys = list(sort.items()) if isinstance(sort, Mapping) else list(sort or ())
        if len(keys) != 1 or not isinstance(keys[0], tuple | list) or keys[0][0] != "_id":
            return None
        direction = keys[0][1]
        if direction not in (1, -1) or extract_near_specs(spec)[0]:
            return None
        walk = table.by_id(spec, descending=direction == -1)
        if walk is None:
            return None
        return self._project_matches(walk, spec, projection)

    def _project_matches(self, docs: Iterator[Document], spec: Mapping[str, Any],
                         projection: Any) -> Iterator[Document]:
        matched = False
        for doc in docs:
            if filter_applies(spec, doc):
                matched = True
                result = self._copy_only_fields(doc, projection, dict, filter=spec)
                if result is not None:
                    yield result
        if not matched:
            filter_applies(spec, {})  # raises on an invalid filter, as a scan does


# -------------------------------------------------------------------------- BSON order

_mm_compare_type = mm_filtering._get_compare_type


def _compare_type(value: Any) -> int:
    """BSON comparison order for the types mongomock-ng does not rank (Timestamp is
    between Date and RegEx; MinKey and MaxKey bound everything)."""
    if isinstance(value, Timestamp):
        return 47
    if isinstance(value, MinKey):
        return -1
    if isinstance(value, MaxKey):
        return 127
    return int(_mm_compare_type(value))


def sort_documents(docs: list[Document], sort: list[tuple[str, Any]]) -> list[Document]:
    """Sort as MongoDB does (BSON order), for results mongomock does not sort for us."""
    out = list(docs)
    for key, direction in reversed(sort):
        if key == "$natural":
            if direction < 0:
                out.reverse()
            continue

        def sort_key(doc: Document, path: str = key) -> Any:
            return mm_filtering.resolve_sort_key(path, doc)

        out.sort(key=sort_key, reverse=direction < 0)
    return out


def _current_date_updater(doc: Any, field_name: str, value: Any,
                          codec_options: Any = None) -> None:
    """``$currentDate`` as MongoDB stores it: a UTC date to the millisecond (mongomock-ng
    stores an aware datetime to the microsecond, which every range query with a naive
    bound then fails to compare)."""
    if isinstance(doc, MutableMapping):
        if value == {"$type": "timestamp"}:
            doc[field_name] = mm_helpers.get_current_timestamp()
        else:
            doc[field_name] = mm_helpers.patch_datetime_awareness_in_document(
                mm_helpers.utcnow())


mm_filtering._get_compare_type = _compare_type
mm_collection._current_date_updater = _current_date_updater
mm_database.Collection = _Collection


__all__ = ["MISSING", "Capture", "CaptureSlot", "new_client", "sort_documents", "store_key"]
