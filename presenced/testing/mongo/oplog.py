"""The emulator's logical clock and its oplog: the ordered history of writes.

Owns: cluster time (``Timestamp(seconds, increment)``, strictly increasing), and
``local.oplog.rs`` as a bounded list of records (one per write, MongoDB's entry format,
with the pre/post images kept for collections that enable them), addressed by sequence
number and by timestamp, and its snapshot form.

Must never: build entries (the storage turns each write's before/after images into one),
know about collections or documents, or block: callers hold ``Storage.lock``.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from bson import Timestamp

Document = dict[str, Any]


class LogicalClock:
    """Cluster time: Timestamp(seconds, increment), strictly increasing per tick."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self.last = Timestamp(int(wall()), 0)

    def tick(self) -> Timestamp:
        now = int(self._wall())
        if now > self.last.time:
            self.last = Timestamp(now, 1)
        else:
            self.last = Timestamp(self.last.time, self.last.inc + 1)
        return self.last


@dataclass(slots=True)
class OplogRecord:
    seq: int
    ts: Timestamp
    entry: Document
    #: Images kept only for collections with changeStreamPreAndPostImages enabled. For a
    #: transaction's applyOps entry: one image (or None) per inner operation, in order.
    pre: Any = None
    post: Any = None


class Oplog:
    """A bounded, ordered history of writes: the emulator's ``local.oplog.rs``.

    Records have a sequence number; the list keeps a logical head so eviction is
    amortised O(1). ``last_evicted_ts`` tells readers whether history they need is gone.
    """

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("oplog_size must be at least 1")
        self.max_entries = max_entries
        self._items: list[OplogRecord] = []
        self._offset = 0  # seq of _items[0]
        self._head = 0  # index of the first retained record
        self.last_evicted_ts: Timestamp | None = None

    @property
    def first_seq(self) -> int:
        return self._offset + self._head

    @property
    def next_seq(self) -> int:
        return self._offset + len(self._items)

    def __len__(self) -> int:
        return len(self._items) - self._head

    def append(self, ts: Timestamp, entry: Document, pre: Any = None, post: Any = None) -> None:
        self._items.append(OplogRecord(self.next_seq, ts, entry, pre, post))
        while len(self) > self.max_entries:
            self.last_evicted_ts = self._items[self._head].ts
            self._head += 1
        if self._head > 1024 and self._head * 2 > len(self._items):
            del self._items[: self._head]
            self._offset += self._head
            self._head = 0

    def get(self, seq: int) -> OplogRecord | None:
        i = seq - self._offset
        if self._head <= i < len(self._items):
            return self._items[i]
        return None

    def records_from(self, seq: int) -> Iterator[OplogRecord]:
        i = max(seq - self._offset, self._head)
        items = self._items
        while i < len(items):
            yield items[i]
            i += 1

    def seq_after(self, ts: Timestamp, inclusive: bool = False) -> int:
        """Seq of the first record with ts > ts (>= when inclusive)."""
        find = bisect.bisect_left if inclusive else bisect.bisect_right
        i = find(self._items, ts, lo=self._head, key=lambda r: r.ts)
        return self._offset + i

    def last_ts(self) -> Timestamp | None:
        return self._items[-1].ts if len(self) else None

    def dump(self) -> dict[str, Any]:
        return {
            "records": [(r.ts, r.entry, r.pre, r.post) for r in self._items[self._head :]],
            "first_seq": self.first_seq,
            "last_evicted_ts": self.last_evicted_ts,
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self._offset = state["first_seq"]
        self._head = 0
        self.last_evicted_ts = state["last_evicted_ts"]
        self._items = [
            OplogRecord(self._offset + i, ts, entry, pre, post)
            for i, (ts, entry, pre, post) in enumerate(state["records"])
        ]


__all__ = ["LogicalClock", "Oplog", "OplogRecord"]
