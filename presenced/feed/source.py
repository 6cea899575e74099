"""What every feed offers the daemon: the blocking source interface, and its one error.

Owns: :class:`FeedSource`, the interface both sources implement
(:class:`~presenced.feed.changestream.ChangeStreamSource` and
:class:`~presenced.feed.oplog.OplogSource`), and :class:`HistoryLost`, the one error a
source raises that the daemon must treat differently from a network blip.

Must never: do I/O or import pymongo, trio or loguru. The sources themselves block; the
daemon calls ``open``, ``poll`` and ``close`` from a worker thread, one call at a time.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["FeedSource", "HistoryLost"]


class HistoryLost(Exception):
    """The saved position is no longer in MongoDB's history (or the server refuses it).

    The caller must reconcile every user and open the feed again from now (``open(None)``).
    """


class FeedSource(Protocol):
    """A feed, read in polls: MongoDB changes in, :mod:`presenced.feed.keys` keys out.

    ``open``, ``poll`` and ``close`` block on the network (worker threads only, one call at
    a time); ``position``, ``lag_seconds`` and ``malformed`` only read attributes.
    """

    malformed: int
    """Events or entries the decoder refused since the source was made."""

    def open(self, position: Any) -> None:
        """Start after ``position`` (None: from now). Raises :class:`HistoryLost` when the
        server no longer holds the history after it."""

    def position(self) -> Any:
        """What to checkpoint once the writes caused by every key returned so far landed."""

    def poll(self, max_events: int = 1000) -> list[Any]:
        """The keys of the next events. Returns the events already received at once; waits
        on the server (up to the source's ``max_await_ms``) only when nothing is buffered."""

    def lag_seconds(self, now: float) -> float:
        """How far behind MongoDB's writes the source is at ``now`` (epoch seconds) by its
        own measure; 0 when it cannot tell or is caught up."""

    def close(self) -> None:
        """Stop reading; ``position()`` still answers. Safe to call twice."""
