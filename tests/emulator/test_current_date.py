"""``$currentDate`` stores what MongoDB stores: a date to the millisecond, which range
queries compare like any other date. Rocket.Chat bumps each instance's ``_updatedAt``
this way every 10 seconds.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from bson import Timestamp
from pymongo.database import Database


def test_current_date_is_a_date_to_the_millisecond(db: Database[Any]) -> None:
    db.instances.insert_one({"_id": "i1"})
    before = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(seconds=1)
    db.instances.update_one({"_id": "i1"}, {"$currentDate": {"_updatedAt": True}})
    stored = db.instances.find_one({"_id": "i1"})
    assert stored is not None
    at = stored["_updatedAt"]
    assert isinstance(at, dt.datetime)
    assert at.microsecond % 1000 == 0
    assert at > before


def test_a_range_query_compares_current_dates(db: Database[Any]) -> None:
    db.instances.insert_many([{"_id": "i1"}, {"_id": "i2"}])
    db.instances.update_many({}, {"$currentDate": {"_updatedAt": {"$type": "date"}}})
    cutoff = dt.datetime(2000, 1, 1)
    assert {d["_id"] for d in db.instances.find({"_updatedAt": {"$gt": cutoff}})} == {
        "i1", "i2"}
    assert list(db.instances.find({"_updatedAt": {"$lt": cutoff}})) == []


def test_current_date_as_a_timestamp_is_a_timestamp(db: Database[Any]) -> None:
    db.instances.insert_one({"_id": "i1"})
    db.instances.update_one({"_id": "i1"}, {"$currentDate": {"ts": {"$type": "timestamp"}}})
    stored = db.instances.find_one({"_id": "i1"})
    assert stored is not None
    assert isinstance(stored["ts"], Timestamp)
    assert stored["ts"].time > 0
