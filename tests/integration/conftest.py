"""Fixtures shared by the feed integration suites."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.database import Database

from presenced.presence import Collections

from .feed_support import Doc
from .rocketchat_double import RocketChatDouble, serve_rocketchat


@pytest.fixture
def watched(db: Database[Doc]) -> Collections:
    return Collections(db.name)


@pytest.fixture
def own_emulator() -> Iterator[Callable[..., tuple[Any, MongoClient[Doc]]]]:
    """Makes a private MongoEmulator (and a client on it); both closed after the test."""
    from presenced.testing.mongo import MongoEmulator

    made: list[tuple[Any, MongoClient[Doc]]] = []

    def make(**kwargs: Any) -> tuple[Any, MongoClient[Doc]]:
        emu = MongoEmulator(**kwargs)
        url = emu.start()
        c: MongoClient[Doc] = MongoClient(url, serverSelectionTimeoutMS=10_000)
        made.append((emu, c))
        return emu, c

    yield make
    for emu, c in made:
        c.close()
        emu.close()


@pytest.fixture
def rocketchat() -> Iterator[RocketChatDouble]:
    """A Rocket.Chat double answering its REST API on 127.0.0.1 (``.url``)."""
    with serve_rocketchat() as double:
        yield double
