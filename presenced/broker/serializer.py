"""Moleculer packet serializers: Rocket.Chat's EJSON (its default) and plain JSON.

Owns the bytes of a packet on NATS. Rocket.Chat's broker (``ee/packages/network-broker``)
serializes with Meteor's EJSON: JSON in which a date is ``{"$date": <ms since epoch>}``,
bytes are ``{"$binary": "<base64>"}``, NaN and the infinities are ``{"$InfNaN": 0|1|-1}``,
and an object whose keys would read as one of those is wrapped in ``{"$escape": {...}}``.
``SERIALIZER=JSON`` is Moleculer's JSON serializer (dates become ISO strings).

Pure: no I/O. Decoding is strict about the outer shape only: a packet that is not JSON, or
not an object, raises :class:`BadPacket`; unknown ``$``-keys are kept as plain objects.
"""

from __future__ import annotations

import base64
import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

__all__ = ["SERIALIZERS", "BadPacket", "EjsonSerializer", "JsonSerializer", "Serializer"]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)
_EJSON_SHAPES: Final = (
    frozenset({"$date"}), frozenset({"$binary"}), frozenset({"$InfNaN"}),
    frozenset({"$escape"}), frozenset({"$type", "$value"}), frozenset({"$regexp", "$flags"}),
)
"""Key sets EJSON reads as a typed value: a plain object with one of them is escaped."""


class BadPacket(ValueError):
    """Bytes that are not a packet: not UTF-8 JSON, or not a JSON object."""


class Serializer(Protocol):
    name: str

    def encode(self, packet: dict[str, Any]) -> bytes: ...

    def decode(self, data: bytes) -> dict[str, Any]: ...


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadPacket(f"not JSON: {exc}") from None


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadPacket(f"a packet is a JSON object, not {type(value).__name__}")
    return value


def _ms(value: datetime) -> int:
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return (aware - _EPOCH) // _MS


class JsonSerializer:
    """Moleculer's ``JSON`` serializer: dates as ISO 8601 text, as ``JSON.stringify``."""

    name = "JSON"

    def encode(self, packet: dict[str, Any]) -> bytes:
        return json.dumps(packet, separators=(",", ":"), default=self._default).encode()

    @staticmethod
    def _default(value: object) -> Any:
        if isinstance(value, datetime):
            aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
            return aware.astimezone(UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"
            )
        if isinstance(value, bytes | bytearray):
            return {"type": "Buffer", "data": list(value)}
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    def decode(self, data: bytes) -> dict[str, Any]:
        return _object(_loads(data))


class EjsonSerializer:
    """Meteor's EJSON, as Rocket.Chat's broker uses it (its default serializer)."""

    name = "EJSON"

    def encode(self, packet: dict[str, Any]) -> bytes:
        return json.dumps(
            to_ejson(packet), separators=(",", ":"), allow_nan=False
        ).encode()

    def decode(self, data: bytes) -> dict[str, Any]:
        return _object(from_ejson(_loads(data)))


def to_ejson(value: Any) -> Any:
    """A Python value as EJSON's JSON form."""
    if isinstance(value, datetime):
        return {"$date": _ms(value)}
    if isinstance(value, bytes | bytearray):
        return {"$binary": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, float) and not math.isfinite(value):
        return {"$InfNaN": 0 if math.isnan(value) else (1 if value > 0 else -1)}
    if isinstance(value, dict):
        converted = {str(k): to_ejson(v) for k, v in value.items()}
        if frozenset(converted) in _EJSON_SHAPES:
            return {"$escape": converted}
        return converted
    if isinstance(value, list | tuple):
        return [to_ejson(v) for v in value]
    return value


def from_ejson(value: Any) -> Any:
    """EJSON's JSON form as a Python value: dates as aware UTC datetimes, bytes as bytes."""
    if isinstance(value, list):
        return [from_ejson(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((key, inner),) = value.items()
        if key == "$date" and isinstance(inner, int | float) and math.isfinite(inner):
            try:
                return _EPOCH + inner * _MS
            except OverflowError:
                return value
        if key == "$binary" and isinstance(inner, str):
            try:
                return base64.b64decode(inner, validate=True)
            except ValueError:
                return value
        if key == "$InfNaN" and inner in (0, 1, -1):
            return math.nan if inner == 0 else math.copysign(math.inf, inner)
        if key == "$escape" and isinstance(inner, dict):
            return {k: from_ejson(v) for k, v in inner.items()}
    return {k: from_ejson(v) for k, v in value.items()}


SERIALIZERS: Final[dict[str, type[EjsonSerializer] | type[JsonSerializer]]] = {
    "EJSON": EjsonSerializer,
    "JSON": JsonSerializer,
}
