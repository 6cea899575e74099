"""Shared by the feed integration suites (the contract both feeds keep, and each feed's
own): Rocket.Chat-shaped writes, and polling a source for keys against a deadline.
Nothing here sleeps."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import pytest
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import ConnectionFailure

from presenced.feed.keys import InstancesChanged, Key

Doc = dict[str, Any]
TIMEOUT = 15.0  # seconds: upper bound for any expected key to show up
AWAIT_MS = 200  # max_await_ms of the sources in these suites
SENTINEL = InstancesChanged("sentinel")


class Polls(Protocol):
    def poll(self, max_events: int = 1000) -> list[Key]: ...


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def connect(db: Database[Doc], uid: str, cid: str, instance: str = "inst-1") -> None:
    """What Rocket.Chat does when a DDP connection logs in."""
    db.usersSessions.update_one(
        {"_id": uid},
        {
            "$push": {
                "connections": {
                    "id": cid,
                    "instanceId": instance,
                    "status": "online",
                    "_createdAt": now(),
                    "_updatedAt": now(),
                }
            }
        },
        upsert=True,
    )


def write_sentinel(db: Database[Doc]) -> None:
    db.instances.insert_one({"_id": "sentinel", "name": "sentinel", "_updatedAt": now()})


def keys_until(
    source: Polls,
    last: Callable[[Key], bool] = lambda k: k == SENTINEL,
    *,
    timeout: float = TIMEOUT,
    tolerate: tuple[type[BaseException], ...] = (),
) -> list[Key]:
    """Keys polled from ``source`` up to and including the first for which ``last`` is true."""
    keys: list[Key] = []
    deadline = time.monotonic() + timeout
    while not any(last(k) for k in keys):
        if time.monotonic() > deadline:
            pytest.fail(f"terminating key not seen before the deadline; got {keys!r}")
        try:
            keys.extend(source.poll())
        except tolerate:
            continue
    return keys


def n_keys(source: Polls, n: int, timeout: float = TIMEOUT) -> list[Key]:
    """Exactly the next ``n`` keys (polling at most ``n`` events' worth at a time; every
    write these suites count this way is one event with one key)."""
    keys: list[Key] = []
    deadline = time.monotonic() + timeout
    while len(keys) < n:
        if time.monotonic() > deadline:
            pytest.fail(f"only {len(keys)} of {n} keys before the deadline: {keys!r}")
        keys.extend(source.poll(max_events=n - len(keys)))
    return keys


def empty_poll(source: Polls, timeout: float = TIMEOUT) -> None:
    """Polls until a poll comes back empty (the source has caught up)."""
    deadline = time.monotonic() + timeout
    while source.poll():
        if time.monotonic() > deadline:
            pytest.fail("the feed never went quiet")


def fresh_db(client: MongoClient[Doc]) -> Database[Doc]:
    """A database no other test uses (on a private emulator, which is closed after)."""
    return client[f"t_{uuid.uuid4().hex[:12]}"]


def retrying(write: Callable[[], None], timeout: float = TIMEOUT) -> None:
    """Runs a write until it gets past the connections a restart cut."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            write()
            return
        except ConnectionFailure:
            if time.monotonic() > deadline:
                raise
