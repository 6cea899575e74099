"""A pipeline's leading ``$match`` stages, run by the storage itself for speed (every
change event of every stream goes through them), keep mongomock-ng's answers exactly:
mongomock-ng compares a document with its datetimes made naive and cut to the
millisecond, and the storage does too, copying a document only when that changes it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from mongomock_ng import aggregate

from presenced.testing.mongo._mongomock import (
    CaptureSlot,
    PreparedFilters,
    new_client,
    run_pipeline,
)

Doc = dict[str, Any]

NOON = dt.datetime(2024, 1, 1, 12, 0, 0)
DOCS: list[Doc] = [
    {"_id": 1, "at": NOON},
    {"_id": 2, "at": NOON.replace(microsecond=500)},  # cut to NOON
    {"_id": 3, "at": dt.datetime(2024, 1, 1, 13, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))},
    {"_id": 4, "at": [NOON + dt.timedelta(hours=1)], "ns": {"coll": "users"}},
    {"_id": 5, "ns": {"coll": "usersSessions"}, "nested": {"at": NOON}},
]
PIPELINES: list[list[Doc]] = [
    [{"$match": {"at": NOON}}],
    [{"$match": {"at": {"$lt": NOON + dt.timedelta(minutes=1)}}}],
    [{"$match": {"at": {"$gte": NOON.replace(tzinfo=dt.UTC)}}}],
    [{"$match": {"ns.coll": {"$in": ["users", "usersSessions"]}}}, {"$project": {"_id": 1}}],
    [{"$match": {"$or": [{"nested.at": NOON}, {"_id": 1}]}}, {"$match": {"_id": {"$gt": 0}}}],
    [{"$project": {"at": 1}}, {"$match": {"at": {"$exists": True}}}],
]


@pytest.mark.parametrize("pipeline", PIPELINES, ids=[str(p) for p in PIPELINES])
def test_a_leading_match_gives_what_mongomock_gives(pipeline: list[Doc]) -> None:
    database = new_client(CaptureSlot())["db"]
    expected = list(aggregate.process_pipeline([dict(d) for d in DOCS], database, pipeline,
                                               None))
    got = run_pipeline([dict(d) for d in DOCS], database, pipeline, PreparedFilters())
    assert got == expected


def test_a_prepared_filter_is_reused_for_the_same_stage() -> None:
    filters = PreparedFilters()
    spec = {"at": {"$lt": NOON.replace(tzinfo=dt.UTC)}}
    first = filters.get(spec)
    assert first == {"at": {"$lt": NOON}}
    assert filters.get(spec) is first
    assert filters.get(dict(spec)) is not first  # another object: prepared on its own
