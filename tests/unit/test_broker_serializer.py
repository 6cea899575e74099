"""Rocket.Chat's EJSON and Moleculer's JSON packet serializers."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from presenced.broker.serializer import BadPacket, EjsonSerializer, JsonSerializer

WHEN = datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)


def test_ejson_writes_dates_as_milliseconds_and_bytes_as_base64() -> None:
    packet = {"sender": "n", "data": [{"at": WHEN, "blob": b"\x00\xff", "n": math.inf}]}
    wire = json.loads(EjsonSerializer().encode(packet))
    assert wire == {"sender": "n", "data": [{"at": {"$date": 1700000000123},
                                             "blob": {"$binary": "AP8="},
                                             "n": {"$InfNaN": 1}}]}


def test_ejson_reads_what_meteor_writes() -> None:
    wire = (b'{"a":{"$date":1700000000123},"b":{"$binary":"AP8="},"c":{"$InfNaN":-1},'
            b'"d":{"$escape":{"$date":"not a date"}},"e":{"$type":"oid","$value":"x"}}')
    packet = EjsonSerializer().decode(wire)
    assert packet["a"] == WHEN
    assert packet["b"] == b"\x00\xff"
    assert packet["c"] == -math.inf
    assert packet["d"] == {"$date": "not a date"}
    assert packet["e"] == {"$type": "oid", "$value": "x"}


def test_ejson_escapes_plain_objects_that_would_read_as_typed_values() -> None:
    s = EjsonSerializer()
    packet = {"x": {"$date": 5}, "y": {"$date": 5, "other": 1}}
    assert json.loads(s.encode(packet))["x"] == {"$escape": {"$date": 5}}
    assert json.loads(s.encode(packet))["y"] == {"$date": 5, "other": 1}
    assert s.decode(s.encode(packet)) == packet


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text()
    | st.floats(allow_nan=False) | st.datetimes(timezones=st.just(UTC)).map(
        lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000)
    ) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.sampled_from(["$date", "$binary", "$escape"]),
                      inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_ejson_round_trips_every_value(packet: dict[str, Any]) -> None:
    s = EjsonSerializer()
    assert s.decode(s.encode(packet)) == packet


def test_json_serializer_writes_dates_as_iso_text() -> None:
    wire = json.loads(JsonSerializer().encode({"at": WHEN}))
    assert wire == {"at": "2023-11-14T22:13:20.123Z"}


@pytest.mark.parametrize("bad", [b"", b"{", b"\xff", b"[]", b"null", b"3", b'"x"'])
@pytest.mark.parametrize("serializer", [EjsonSerializer(), JsonSerializer()])
def test_bytes_that_are_not_a_json_object_are_a_bad_packet(
    bad: bytes, serializer: EjsonSerializer | JsonSerializer
) -> None:
    with pytest.raises(BadPacket):
        serializer.decode(bad)


def test_odd_typed_values_are_kept_as_plain_objects() -> None:
    s = EjsonSerializer()
    infinite = s.decode(b'{"a":{"$date":1e400}}')["a"]
    assert list(infinite) == ["$date"] and math.isinf(infinite["$date"])
    assert s.decode(b'{"a":{"$date":1e20}}')["a"] == {"$date": 1e20}  # past year 9999
    assert s.decode(b'{"a":{"$binary":"***"}}')["a"] == {"$binary": "***"}
    assert s.decode(b'{"a":{"$date":"x"}}')["a"] == {"$date": "x"}
