"""A pipeline's leading ``$match`` stages, run by the storage itself for speed (every
change event of every stream goes through them), keep mongomock-ng's answers exactly:
mongomock-ng compares a document with its datetimes made naive and cut to the
millisecond, and the storage does too, copying a document only when that changes it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mongomock_ng import aggregate

from presenced.testing.mongo._mongomock import CaptureSlot, new_client
from presenced.testing.mongo.pipelines import PreparedFilters, run_pipeline

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
    assert first.prepared == {"at": {"$lt": NOON}}
    assert filters.get(spec) is first
    assert filters.get(dict(spec)) is not first  # another object: prepared on its own


# The remembered verdicts: any sequence of documents gets, from one filter object, the
# verdicts mongomock-ng gives each document afresh; values that Python's equality merges
# but mongomock-ng tells apart ($type, ranges) must not share a verdict.
VALUES = [None, True, False, 0, 1, 1.0, 2, "a", "b", "1", NOON, NOON.replace(tzinfo=dt.UTC),
          NOON.replace(microsecond=500), [1, "a"], [], {"x": 1}, {"x": True}, [{"x": 1}]]
TYPES = ["bool", "int", "double", "string", "date", "array", "object"]
FIELDS = ["a", "b", "ns.coll", "ns.db", "a.x", "ns"]


def vocabulary(pool: list[Any]) -> tuple[Any, Any]:
    """(events, filters) drawn from a few values, so that documents meet."""
    values = st.sampled_from(pool)
    events = st.fixed_dictionaries({}, optional={
        "a": values, "b": values, "ns": st.fixed_dictionaries(
            {}, optional={"coll": values, "db": values})})
    conditions = st.one_of(
        values,
        st.builds(lambda v: {"$in": [v, "zz"]}, values),
        st.builds(lambda t: {"$type": t}, st.sampled_from(TYPES)),
        st.builds(lambda op, v: {op: v},
                  st.sampled_from(["$gt", "$gte", "$lt", "$lte", "$ne"]), values),
        st.builds(lambda b: {"$exists": b}, st.booleans()),
        st.builds(lambda v: {"$not": {"$eq": v}}, values),
        st.builds(lambda v: {"$elemMatch": {"x": v}}, values),
    )
    clauses = st.dictionaries(st.sampled_from(FIELDS), conditions, min_size=1, max_size=2)
    filters = st.one_of(clauses, st.builds(lambda op, cs: {op: cs}, st.sampled_from(
        ["$or", "$and", "$nor"]), st.lists(clauses, min_size=1, max_size=3)))
    return events, filters


def fresh_verdict(spec: Doc, doc: Doc) -> bool | type:
    from mongomock_ng.filtering import filter_applies
    from mongomock_ng.helpers import patch_datetime_awareness_in_document as patch

    try:
        return bool(filter_applies(patch(spec), patch(doc)))
    except Exception as exc:
        return type(exc)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), pool=st.lists(st.sampled_from(VALUES), min_size=1, max_size=4,
                                     unique_by=repr))
def test_remembered_verdicts_are_mongomocks_verdicts(data: st.DataObject,
                                                     pool: list[Any]) -> None:
    events, filters = vocabulary(pool)
    spec = data.draw(filters)
    match = PreparedFilters().get(spec)
    for doc in data.draw(st.lists(events, min_size=2, max_size=25)):
        expected = fresh_verdict(spec, doc)
        try:
            got: bool | type = match.matches(doc)
        except Exception as exc:
            got = type(exc)
        assert got == expected, (spec, doc)


@pytest.mark.parametrize(("spec", "docs"), [
    ({"a": {"$type": "bool"}}, [{"a": 1}, {"a": True}]),
    ({"a": {"$type": "double"}}, [{"a": 1}, {"a": 1.0}]),
    ({"a": {"$gt": 0}}, [{"a": True}, {"a": 1}]),
    ({"ns.coll": {"$type": "int"}}, [{"ns": {"coll": 1.0}}, {"ns": {"coll": 1}}]),
    ({"a": {"$elemMatch": {"x": {"$type": "bool"}}}}, [{"a": [{"x": 1}]}, {"a": [{"x": True}]}]),
], ids=["1 and true", "1 and 1.0", "true is not a number", "nested", "in an array"])
def test_values_python_finds_equal_do_not_share_a_verdict(spec: Doc, docs: list[Doc]) -> None:
    match = PreparedFilters().get(spec)
    assert [match.matches(d) for d in docs] == [fresh_verdict(spec, d) for d in docs]
    assert len({fresh_verdict(spec, d) for d in docs}) == 2, "the case tells them apart"
