"""The emulated member's place in its replica set, as ``hello`` reports it.

Owns: whether the member is primary (a stepdown makes it a secondary for a while, after
which, being the only electable member, it steps up again), the ``topologyVersion``
(``processId``, new at every start as a restarted mongod's is, and ``counter``, bumped on
every change of state), and waking the awaitable hellos that wait for such a change
(SDAM's streaming protocol). Thread-safe; never touches a socket or the store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bson import Int64, ObjectId

from presenced.testing.mongo.errors import CommandError

#: How often a waiting hello looks up from the condition to ask whether its client is
#: still there (the only thing it can't be woken for).
_PROBE_INTERVAL = 0.5


@dataclass(frozen=True)
class TopologyVersion:
    process_id: ObjectId
    counter: int

    def document(self) -> dict[str, Any]:
        return {"processId": self.process_id, "counter": Int64(self.counter)}


@dataclass(frozen=True)
class AwaitableHello:
    """The ``topologyVersion`` and ``maxAwaitTimeMS`` of an awaitable hello."""

    seen: TopologyVersion
    max_await_ms: int


def parse_awaitable_hello(cmd: Mapping[str, Any]) -> AwaitableHello | None:
    """The awaitable part of a hello command, None for a plain hello; raises a
    CommandError (MongoDB's codes) for a malformed one."""
    has_tv = "topologyVersion" in cmd
    has_wait = "maxAwaitTimeMS" in cmd
    if not has_tv and not has_wait:
        return None
    if has_tv != has_wait:
        raise CommandError(
            31368, "A request to hello that specifies topologyVersion must also specify"
                   " maxAwaitTimeMS, and vice versa"
        )
    tv = cmd["topologyVersion"]
    if not isinstance(tv, Mapping):
        raise CommandError(10065, "topologyVersion must be an object")
    for key in tv:
        if key not in ("processId", "counter"):
            raise CommandError(40415, f"BSON field 'TopologyVersion.{key}' is an unknown field.")
    for key in ("processId", "counter"):
        if key not in tv:
            raise CommandError(
                40414, f"BSON field 'TopologyVersion.{key}' is missing but a required field"
            )
    process_id, counter = tv["processId"], tv["counter"]
    if not isinstance(process_id, ObjectId):
        raise CommandError(14, "BSON field 'TopologyVersion.processId' is the wrong type,"
                               " expected type 'objectId'")
    # MongoDB wants a long; pymongo decodes one as Int64, the Node driver sends a Long.
    if not isinstance(counter, Int64):
        raise CommandError(14, "BSON field 'TopologyVersion.counter' is the wrong type,"
                               " expected type 'long'")
    if counter < 0:
        raise CommandError(31372, "topologyVersion must have a non-negative counter")
    wait = cmd["maxAwaitTimeMS"]
    if isinstance(wait, bool) or not isinstance(wait, int | float):
        raise CommandError(14, "BSON field 'maxAwaitTimeMS' is the wrong type, expected a"
                               " number")
    if wait < 0:
        raise CommandError(31373, "maxAwaitTimeMS must be a non-negative integer")
    return AwaitableHello(TopologyVersion(process_id, int(counter)), int(wait))


class Topology:
    """One server life's topologyVersion, and the awaitable hellos waiting on it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._version = TopologyVersion(ObjectId(), 0)
        self._primary = True
        self._step_up: threading.Timer | None = None
        self._closed = False
        #: Connections waiting in an awaitable hello right now (serverStatus
        #: connections.awaitingTopologyChanges).
        self.waiting = 0

    @property
    def version(self) -> TopologyVersion:
        with self._cond:
            return self._version

    @property
    def primary(self) -> bool:
        with self._cond:
            return self._primary

    def state(self) -> tuple[TopologyVersion, bool]:
        """(topologyVersion, primary), read together: what one hello reply reports."""
        with self._cond:
            return self._version, self._primary

    def _changed(self) -> None:
        """A change of state: bump the counter and answer every waiting hello at once.
        Called with the condition held."""
        self._version = TopologyVersion(self._version.process_id, self._version.counter + 1)
        self._cond.notify_all()

    def step_down(self, seconds: float) -> None:
        """Become a secondary, and primary again after ``seconds`` (replSetStepDown with
        force on a one-member set: no other member can win the election meanwhile)."""
        with self._cond:
            if self._closed or not self._primary:
                return
            self._primary = False
            self._changed()
            timer = threading.Timer(max(0.0, seconds), self.step_up)
            timer.daemon = True
            self._step_up = timer
            timer.start()

    def step_up(self) -> None:
        """Win the election: primary again (nothing to do while already primary)."""
        with self._cond:
            if self._step_up is not None:
                self._step_up.cancel()
                self._step_up = None
            if self._closed or self._primary:
                return
            self._primary = True
            self._changed()

    def close(self) -> None:
        """The server is stopping: release every waiting hello."""
        with self._cond:
            self._closed = True
            if self._step_up is not None:
                self._step_up.cancel()
                self._step_up = None
            self._cond.notify_all()

    def await_change(
        self, hello: AwaitableHello, gone: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> bool:
        """Hold an awaitable hello as MongoDB does: no wait when its processId is not this
        life's, else until the counter moves past the one it saw or maxAwaitTimeMS elapses.

        Returns False when the hello should not be answered: the server is stopping, or
        ``gone()`` says its client has left. Raises 31382 for a counter from the future.
        """
        deadline = clock() + hello.max_await_ms / 1000
        with self._cond:
            current = self._version
            if hello.seen.process_id != current.process_id:
                return not self._closed
            if hello.seen.counter > current.counter:
                raise CommandError(
                    31382, f"Received a topology version with the same process ID and a higher"
                           f" counter than the server's: {hello.seen.counter} >"
                           f" {current.counter}"
                )
            self.waiting += 1
            try:
                while not self._closed and self._version.counter == hello.seen.counter:
                    remaining = deadline - clock()
                    if remaining <= 0:
                        break
                    self._cond.wait(min(remaining, _PROBE_INTERVAL))
                    if gone():
                        return False
            finally:
                self.waiting -= 1
            return not self._closed
