"""The change-stream feed: MongoDB change events in, presence keys out.

Owns:

- :func:`decode` / :func:`decode_change_event`, the pure decoder of one change event (the
  documented MongoDB 7.0 shapes) into :mod:`presenced.feed.keys` keys. Sans-io: no pymongo
  call, no clock, tested on recorded documents;
- :func:`pipeline`, the aggregation stages that keep the server from sending events (and
  fields) the decoder would throw away;
- :class:`ChangeStreamSource`, the blocking wrapper around one pymongo database change
  stream: open from a saved position, poll for keys, report the position to checkpoint.

Must never:

- decide a status, or read the documents an event names (the loader re-reads them; a key
  only says *which* document changed);
- run on the event loop: every :class:`ChangeStreamSource` method blocks on the network and
  is called from a worker thread (``trio.to_thread.run_sync``). Nothing here imports trio;
- raise from the decoder: a malformed event is counted (``Decoded.malformed``,
  ``ChangeStreamSource.malformed``) and skipped.

Malformed events: :func:`decode` returns a :class:`Decoded` whose ``malformed`` flag is set
when the event lacks what its operation type documents (``ns``, ``documentKey._id``, ...).
Such an event yields no key, with one conservative exception: a ``users`` update whose
``updateDescription`` has the wrong shape still yields :class:`UserChanged`, because a
re-read is always safe and a missed change is not. :func:`decode_change_event` is the same
decoder returning only the keys.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from pymongo import MongoClient
from pymongo.change_stream import ChangeStream
from pymongo.errors import OperationFailure, PyMongoError

from presenced.feed.keys import (
    Decoded,
    InstancesChanged,
    Key,
    ResyncAll,
    SessionsChanged,
    UserChanged,
    status_pair_written,
    touches_presence_fields,
)
from presenced.feed.source import HistoryLost
from presenced.presence import Collections

DOCUMENT_OPERATIONS: tuple[str, ...] = ("insert", "update", "replace", "delete")
"""Events about one document: they become a per-document key."""

RESYNC_OPERATIONS: tuple[str, ...] = ("drop", "dropDatabase", "rename", "invalidate")
"""Events no per-document key can describe: they become :class:`ResyncAll`."""

OPERATIONS: tuple[str, ...] = DOCUMENT_OPERATIONS + RESYNC_OPERATIONS

# Server error codes meaning "the position you asked for cannot be resumed from".
_HISTORY_LOST = 286  # ChangeStreamHistoryLost (4.4+)
_INVALID_RESUME_TOKEN = 260  # InvalidResumeToken (also: resumeAfter an invalidate token)
_CHANGE_STREAM_FATAL = 280  # ChangeStreamFatalError; before 4.4 also "resume point ... lost"


# --------------------------------------------------------------------------------------------
# decoder (pure)


_NOTHING = Decoded()
_MALFORMED = Decoded(malformed=True)


def decode_change_event(event: Mapping[str, Any], watched: Collections) -> list[Key]:
    """The keys of one change event (``[]`` for an event presence ignores or can't read).

    Never raises. Use :func:`decode` to also learn whether the event was malformed.
    """
    return list(decode(event, watched).keys)


def decode(event: object, watched: Collections) -> Decoded:
    """Decodes one change event; never raises, whatever ``event`` is."""
    try:
        return _decode(event, watched)
    except Exception:  # a shape no check below foresaw: count it, don't crash the feed
        return _MALFORMED


def _decode(event: object, watched: Collections) -> Decoded:
    if not isinstance(event, Mapping):
        return _MALFORMED
    op = event.get("operationType")
    if not isinstance(op, str):
        return _MALFORMED
    if op == "invalidate":
        # Carries no ns: it ends the stream it belongs to, whatever that watches.
        return Decoded((ResyncAll("invalidate"),))
    if op == "dropDatabase":
        ns = event.get("ns")
        if not isinstance(ns, Mapping) or not isinstance(ns.get("db"), str):
            return _MALFORMED
        if ns["db"] != watched.database:
            return _NOTHING
        return Decoded((ResyncAll("dropDatabase"),))
    if op not in OPERATIONS:
        return _NOTHING  # create, createIndexes, modify, ...: nothing presence reads changed
    coll = _watched_collection(event.get("ns"), watched)
    if coll is None:
        return _MALFORMED
    if op == "drop":
        return Decoded((ResyncAll("drop"),)) if coll else _NOTHING
    if op == "rename":
        if coll:
            return Decoded((ResyncAll("rename"),))
        # A collection renamed *onto* a watched name replaces it just the same.
        to = _watched_collection(event.get("to"), watched)
        if to is None:
            return _MALFORMED
        return Decoded((ResyncAll("rename"),)) if to else _NOTHING
    if not coll:
        return _NOTHING
    key = event.get("documentKey")
    if not isinstance(key, Mapping) or "_id" not in key:
        return _MALFORMED
    doc_id = key["_id"]
    if coll == watched.sessions:
        return Decoded((SessionsChanged(doc_id),))
    if coll == watched.instances:
        return Decoded((InstancesChanged(doc_id),))
    # users
    description = event.get("updateDescription")
    if op != "update" or description is None:
        # Inserted, replaced, deleted, or an update that doesn't say what it changed.
        return Decoded((UserChanged(doc_id),))
    fields = _updated_fields(description)
    if fields is None:
        return Decoded((UserChanged(doc_id),), malformed=True)
    if not touches_presence_fields(fields):
        return _NOTHING
    # _updated_fields checked the shape: updatedFields, when present, is a mapping.
    updated = description.get("updatedFields", {})
    return Decoded((UserChanged(doc_id, status_pair_written(updated, fields)),))


def _watched_collection(ns: object, watched: Collections) -> str | None:
    """The watched collection ``ns`` names, ``""`` for any other one, None if malformed."""
    if not isinstance(ns, Mapping):
        return None
    db, coll = ns.get("db"), ns.get("coll")
    if not isinstance(db, str) or not isinstance(coll, str):
        return None
    if db != watched.database or coll not in watched.names:
        return ""
    return coll


def _updated_fields(description: object) -> list[str] | None:
    """Every path an ``updateDescription`` names; None if it has the wrong shape.

    Parts a server version does not send (``truncatedArrays`` before 5.0) count as empty.
    """
    if not isinstance(description, Mapping):
        return None
    updated = description.get("updatedFields", {})
    removed = description.get("removedFields", [])
    truncated = description.get("truncatedArrays", [])
    if not isinstance(updated, Mapping) or not isinstance(removed, list):
        return None
    if not isinstance(truncated, list):
        return None
    fields: list[str] = [*updated.keys(), *removed]
    for entry in truncated:
        field = entry.get("field") if isinstance(entry, Mapping) else None
        if not isinstance(field, str):
            return None
        fields.append(field)
    if not all(isinstance(f, str) for f in fields):
        return None
    return fields


# --------------------------------------------------------------------------------------------
# server-side pipeline


def pipeline(watched: Collections) -> list[dict[str, Any]]:
    """Stages for a database change stream on ``watched.database``.

    ``$match`` keeps the document events of the three watched collections, their drops and
    renames (either way), the database's drop and ``invalidate`` (which has no ``ns``).
    ``$project`` keeps the resume token (``_id``: dropping or changing it makes the server
    fail the stream) and what :func:`decode` reads; it drops ``fullDocument`` and keeps
    ``updateDescription`` only for ``users`` (``$project`` can't keep only an object's
    keys, and a ``$pull`` on ``usersSessions`` reports the whole remaining array).
    """
    db, names = watched.database, list(watched.names)
    in_watched = {"ns.db": db, "ns.coll": {"$in": names}}
    return [
        {
            "$match": {
                "$or": [
                    {"operationType": {"$in": [*DOCUMENT_OPERATIONS, "drop"]}, **in_watched},
                    {
                        "operationType": "rename",
                        "$or": [in_watched, {"to.db": db, "to.coll": {"$in": names}}],
                    },
                    {"operationType": "dropDatabase", "ns.db": db},
                    {"operationType": "invalidate"},
                ]
            }
        },
        {
            "$project": {
                "_id": 1,
                "operationType": 1,
                "ns": 1,
                "to": 1,
                "documentKey": 1,
                "updateDescription": {
                    "$cond": [
                        {"$eq": ["$ns.coll", watched.users]},
                        "$updateDescription",
                        "$$REMOVE",
                    ]
                },
            }
        },
    ]


# --------------------------------------------------------------------------------------------
# the source (blocking; worker threads only)


def is_history_lost(exc: OperationFailure) -> bool:
    """True if the server refused to resume because the position can't be resumed from."""
    if exc.code in (_HISTORY_LOST, _INVALID_RESUME_TOKEN):
        return True
    details = exc.details or {}
    if details.get("codeName") in ("ChangeStreamHistoryLost", "InvalidResumeToken"):
        return True
    return exc.code == _CHANGE_STREAM_FATAL and "resume point" in str(exc).lower()


def _history_lost(exc: OperationFailure) -> HistoryLost:
    return HistoryLost(
        "the saved change-stream position can't be resumed from (server error"
        f" {exc.code}: {exc}); presenced was stopped for longer than the oplog window"
        " or the token is not from this replica set. Reconcile every user and open the"
        " feed from now; a larger oplog (replSetResizeOplog) widens the window."
    )


def _has_buffered_events(stream: ChangeStream[Any]) -> bool | None:
    """Whether pymongo holds events of the last batch that ``try_next`` has not returned
    yet (``try_next`` hands those on without asking the server); None if it can't tell.

    pymongo has no public way to ask: ``Cursor.retrieved`` (what the oplog source counts)
    has no counterpart on the ``CommandCursor`` under a change stream. This is the one
    place that reads pymongo's private state: ``ChangeStream._cursor._has_next()``, the
    call ``ChangeStream.try_next`` itself makes to find the last event of a batch (read
    in pymongo 4.20). Without it (a pymongo release that changed it, or a stand-in stream)
    the answer is None and ``poll`` reads on as it did before: nothing is lost, but its
    last ``getMore`` waits up to ``max_await_ms`` with keys in hand.
    ``test_changestream_feed.py::test_pymongo_still_reports_the_events_it_has_buffered``
    fails if pymongo changes it.
    """
    has_next = getattr(getattr(stream, "_cursor", None), "_has_next", None)
    if not callable(has_next):
        return None
    return bool(has_next())


class ChangeStreamSource:
    """One database change stream over the watched collections, read in polls.

    Blocking: call every method from a worker thread, one call at a time.

    ``position()`` is what the caller checkpoints once the writes caused by every key
    returned so far have landed; ``open(position)`` continues with exactly the events after
    it. Resumable errors (a lost connection, a primary stepping down) are handled by
    pymongo, which reopens the stream from its last token; if that fails too (the server
    is still down after server selection), ``poll`` raises and the next ``poll`` tries again
    from the same position. After an ``invalidate`` (the watched database was dropped) the
    next ``poll`` opens a new stream after it (``startAfter``).
    """

    def __init__(
        self,
        client: MongoClient[Any],
        watched: Collections,
        *,
        max_await_ms: int = 1000,
        batch_size: int = 1000,
    ) -> None:
        self._client = client
        self._watched = watched
        self._max_await_ms = max_await_ms
        self._batch_size = batch_size
        self._pipeline = pipeline(watched)
        self._stream: ChangeStream[Any] | None = None
        self._position: Mapping[str, Any] | None = None
        self.malformed = 0
        """Events the decoder refused since this source was made."""

    def open(self, resume_token: Mapping[str, Any] | None) -> None:
        """Starts the stream after ``resume_token`` (None: from now).

        Uses ``startAfter``, which resumes like ``resumeAfter`` and also accepts the token
        of an ``invalidate`` event. Raises :class:`HistoryLost` if the server refuses the
        token.
        """
        self.close()
        self._stream = self._watch(resume_token)
        self._position = self._stream.resume_token or resume_token

    def _watch(self, token: Mapping[str, Any] | None) -> ChangeStream[Any]:
        try:
            return self._client[self._watched.database].watch(
                self._pipeline,
                start_after=token,
                full_document="default",
                max_await_time_ms=self._max_await_ms,
                batch_size=self._batch_size,
            )
        except OperationFailure as exc:
            if is_history_lost(exc):
                raise _history_lost(exc) from exc
            raise

    def position(self) -> Mapping[str, Any] | None:
        """The resume token covering every event whose keys ``poll`` has returned.

        Advances to the server's postBatchResumeToken after an empty poll, so an idle
        feed's checkpoint stays inside the oplog window.
        """
        return self._position

    def poll(self, max_events: int = 1000) -> list[Key]:
        """The keys of the next events, at most ``max_events`` events' worth, in order.

        Returns the events of the batch already received from the server at once; only
        when none is left does it wait on the server (one awaitData ``getMore``, up to
        ``max_await_ms``), and returns ``[]`` if that brings nothing. (Should pymongo not
        say what it has buffered, it reads on, returning within about ``max_await_ms``.)
        Raises :class:`HistoryLost` if the stream had to resume from a lost position;
        other non-resumable errors propagate (the next ``poll`` reopens from
        ``position()``). If events were already read when an error strikes, their keys
        are returned and the error surfaces on the next ``poll``.
        """
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        stream = self._stream
        if stream is None:
            raise RuntimeError("ChangeStreamSource.poll() called before open() or after close()")
        if not stream.alive:  # invalidated, or closed by a fatal error: start after it
            stream = self._stream = self._watch(self._position)
        keys: list[Key] = []
        events = 0
        # Only when pymongo can't say what it has buffered does a poll with keys in hand
        # ask the server again; this bounds how long those keys wait then.
        deadline = time.monotonic() + self._max_await_ms / 1000
        while events < max_events and stream.alive:
            if events and _has_buffered_events(stream) is False:
                break  # the batch in hand is used up: hand its keys on rather than wait
            try:
                event = stream.try_next()
            except OperationFailure as exc:
                if keys:
                    break
                if is_history_lost(exc):
                    raise _history_lost(exc) from exc
                raise
            except PyMongoError:
                if keys:
                    break
                raise
            # After the last event of a batch (or an empty one) pymongo reports the
            # batch's postBatchResumeToken: every event up to it has been returned.
            token = stream.resume_token
            if token is not None:
                self._position = token
            if event is None:
                break
            events += 1
            decoded = decode(event, self._watched)
            if decoded.malformed:
                self.malformed += 1
            keys.extend(decoded.keys)
            if time.monotonic() >= deadline:
                break
        return keys

    def lag_seconds(self, now: float | None = None) -> float:
        """Always 0: a change event carries no wall time before MongoDB 6.0, so the daemon
        measures this feed's lag as the time since it last answered."""
        return 0.0

    def close(self) -> None:
        """Closes the stream; ``position()`` still answers. Safe to call twice."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
