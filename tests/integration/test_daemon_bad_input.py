"""Malformed documents get a clear message and a metric, never a crash."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from presenced.testing.processes import with_database

from .daemon_harness import DaemonProcess, Db, RocketChat, wait_for

ONLINE = ("online", "online")


@pytest.fixture
def d(tmp_path: Path, mongo_url: str, db: Db) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(tmp_path, with_database(mongo_url, db.name))
    yield proc
    proc.close()


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return str(r.read().decode())


def test_a_malformed_connection_is_counted_logged_and_the_good_ones_still_count(
    d: DaemonProcess, db: Db
) -> None:
    rc = RocketChat(db)
    uid = rc.add_user()
    d.start()
    rc.connect(uid)
    db.usersSessions.update_one(
        {"_id": uid},
        {"$push": {"connections": {"id": "bad", "instanceId": rc.instance_ids[0],
                                   "status": "online", "_updatedAt": "yesterday"}}},
    )
    rc.wait_presence(uid, ONLINE, daemon=d)
    wait_for(
        lambda: 'reason="connection_bad_updated_at"' in metrics(d.port), 10,
        "the malformed connection in /metrics", daemon=d,
    )
    assert f"usersSessions document malformed _id={uid!r} (connection_bad_updated_at)" in (
        d.output()
    )
    # Re-read on every event about the user, counted once: one bad document.
    assert 'presenced_malformed_documents_total{reason="connection_bad_updated_at"} 1.0' in (
        metrics(d.port)
    )
    assert d.ready() is not None and d.ready()[0] == 200  # type: ignore[index]


def test_a_user_document_with_a_garbage_status_default_is_treated_as_online(
    d: DaemonProcess, db: Db
) -> None:
    rc = RocketChat(db)
    uid = rc.add_user()
    db.users.update_one({"_id": uid}, {"$set": {"statusDefault": ["not", "a", "status"]}})
    d.start()
    rc.connect(uid)
    rc.wait_presence(uid, ONLINE, daemon=d)
    wait_for(lambda: 'reason="user_bad_status_default"' in metrics(d.port), 10,
             "the garbage statusDefault in /metrics", daemon=d)
