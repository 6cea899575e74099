"""Fixtures shared by every suite.

Integration and conformance tests talk to MongoDB only through pymongo. They run against
the embedded emulator (``presenced.testing.mongo``) by default, and unchanged against a
real replica set when ``PRESENCED_TEST_MONGO_URL`` is set (e.g.
``mongodb://127.0.0.1:27017/?replicaSet=rs0``).

Markers:
- ``emulator_only``: uses controls only the emulator has (restart, tuning); skipped on a
  real server.
- ``failpoints``: uses ``configureFailPoint``; skipped when the server refuses it (a real
  server needs ``--setParameter enableTestCommands=1``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.database import Database

REAL_MONGO_URL = os.environ.get("PRESENCED_TEST_MONGO_URL", "").strip()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not REAL_MONGO_URL:
        return
    skip = pytest.mark.skip(reason="emulator-only control; PRESENCED_TEST_MONGO_URL is set")
    for item in items:
        if "emulator_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def emulator_session() -> Iterator[Any]:
    """The session's emulator (None against a real server)."""
    if REAL_MONGO_URL:
        yield None
        return
    from presenced.testing.mongo import MongoEmulator

    emu = MongoEmulator()
    with emu:
        yield emu


@pytest.fixture(scope="session")
def mongo_url(emulator_session: Any) -> str:
    if REAL_MONGO_URL:
        return REAL_MONGO_URL
    return str(emulator_session.url)


@pytest.fixture
def emulator(emulator_session: Any) -> Any:
    """The emulator object, for emulator-only controls. Skips against a real server."""
    if emulator_session is None:
        pytest.skip("emulator-only control; PRESENCED_TEST_MONGO_URL is set")
    return emulator_session


@pytest.fixture(scope="session")
def client(mongo_url: str) -> Iterator[MongoClient[dict[str, Any]]]:
    c: MongoClient[dict[str, Any]] = MongoClient(mongo_url, serverSelectionTimeoutMS=10_000)
    yield c
    c.close()


@pytest.fixture
def db(client: MongoClient[dict[str, Any]]) -> Iterator[Database[dict[str, Any]]]:
    """A fresh database per test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield client[name]
    client.drop_database(name)


@pytest.fixture
def failpoints(client: MongoClient[dict[str, Any]]) -> Iterator[None]:
    """Skips unless the server accepts configureFailPoint; turns failCommand off after."""
    from pymongo.errors import OperationFailure

    try:
        client.admin.command("configureFailPoint", "failCommand", mode="off")
    except OperationFailure:
        pytest.skip("server does not accept configureFailPoint (enableTestCommands is off)")
    yield
    client.admin.command("configureFailPoint", "failCommand", mode="off")
