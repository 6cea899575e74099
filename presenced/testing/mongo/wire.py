"""MongoDB wire protocol framing, without sockets (sans-io).

Owns: parsing requests (OP_MSG with kind-0 and kind-1 sections, the checksum,
moreToCome and exhaustAllowed flags; the legacy OP_QUERY that drivers use for the first
handshake) and encoding replies (OP_MSG, with moreToCome for an exhaust stream;
OP_REPLY). It must never touch a socket, a lock or the store: the server feeds it bytes
and sends what it returns.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions, DatetimeConversion

OP_REPLY = 1
OP_QUERY = 2004
OP_COMPRESSED = 2012
OP_MSG = 2013

FLAG_CHECKSUM_PRESENT = 1 << 0
FLAG_MORE_TO_COME = 1 << 1
FLAG_EXHAUST_ALLOWED = 1 << 16
_KNOWN_MSG_FLAGS = FLAG_CHECKSUM_PRESENT | FLAG_MORE_TO_COME | FLAG_EXHAUST_ALLOWED

HEADER = struct.Struct("<iiii")
MAX_MESSAGE_SIZE = 48_000_000

#: How documents are decoded: plain dicts, naive UTC datetimes (what the store keeps),
#: UUIDs left as Binary so they round-trip byte for byte, out-of-range dates kept.
CODEC = CodecOptions(
    document_class=dict,
    tz_aware=False,
    uuid_representation=UuidRepresentation.UNSPECIFIED,
    datetime_conversion=DatetimeConversion.DATETIME_AUTO,
)


class ProtocolError(Exception):
    """The peer sent something that is not a valid message: close its connection."""


@dataclass
class Request:
    request_id: int
    op_code: int
    command: dict[str, Any]
    more_to_come: bool = False
    exhaust_allowed: bool = False
    #: For OP_QUERY: the namespace the legacy query was sent to (e.g. "admin.$cmd").
    legacy_namespace: str | None = None
    sequences: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum OP_MSG uses."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def parse_header(data: bytes) -> tuple[int, int, int, int]:
    """(length, request_id, response_to, op_code); checks the length is sane."""
    length, request_id, response_to, op_code = HEADER.unpack(data)
    if length < HEADER.size + 4 or length > MAX_MESSAGE_SIZE:
        raise ProtocolError(f"message length {length} out of range")
    return length, request_id, response_to, op_code


def _cstring(body: bytes, pos: int) -> tuple[str, int]:
    end = body.find(b"\x00", pos)
    if end < 0:
        raise ProtocolError("unterminated cstring")
    return body[pos:end].decode("utf-8", errors="strict"), end + 1


def _bson_at(body: bytes, pos: int, limit: int) -> tuple[dict[str, Any], int]:
    if pos + 4 > limit:
        raise ProtocolError("truncated document")
    (size,) = struct.unpack_from("<i", body, pos)
    if size < 5 or pos + size > limit:
        raise ProtocolError("document size out of range")
    try:
        doc = bson.decode(body[pos : pos + size], CODEC)
    except Exception as exc:  # bson raises several types for garbage
        raise ProtocolError(f"invalid BSON: {exc}") from exc
    return doc, pos + size


def parse_body(request_id: int, op_code: int, whole: bytes) -> Request:
    """Parse one complete message (header included) into a Request."""
    body = whole[HEADER.size :]
    if op_code == OP_MSG:
        return _parse_op_msg(request_id, whole, body)
    if op_code == OP_QUERY:
        return _parse_op_query(request_id, body)
    raise ProtocolError(f"unsupported opCode {op_code}")


def _parse_op_msg(request_id: int, whole: bytes, body: bytes) -> Request:
    (flags,) = struct.unpack_from("<I", body, 0)
    if flags & 0xFFFF & ~_KNOWN_MSG_FLAGS:
        # Unknown required bits (0-15) must make the server error out.
        raise ProtocolError(f"unknown required OP_MSG flag bits {flags:#x}")
    limit = len(body)
    if flags & FLAG_CHECKSUM_PRESENT:
        if limit < 8:
            raise ProtocolError("checksum flag set but no checksum")
        limit -= 4
        (expected,) = struct.unpack_from("<I", body, limit)
        if crc32c(whole[: len(whole) - 4]) != expected:
            raise ProtocolError("OP_MSG checksum mismatch")
    pos = 4
    command: dict[str, Any] | None = None
    sequences: dict[str, list[dict[str, Any]]] = {}
    while pos < limit:
        kind = body[pos]
        pos += 1
        if kind == 0:
            if command is not None:
                raise ProtocolError("more than one kind-0 section")
            command, pos = _bson_at(body, pos, limit)
        elif kind == 1:
            if pos + 4 > limit:
                raise ProtocolError("truncated kind-1 section")
            (size,) = struct.unpack_from("<i", body, pos)
            end = pos + size
            if size < 5 or end > limit:
                raise ProtocolError("kind-1 section size out of range")
            ident, p = _cstring(body, pos + 4)
            docs = []
            while p < end:
                doc, p = _bson_at(body, p, end)
                docs.append(doc)
            sequences.setdefault(ident, []).extend(docs)
            pos = end
        else:
            raise ProtocolError(f"unknown OP_MSG section kind {kind}")
    if command is None:
        raise ProtocolError("OP_MSG without a kind-0 section")
    for ident, docs in sequences.items():
        if ident in command:
            raise ProtocolError(f"field {ident!r} given both in the body and as a sequence")
        command[ident] = docs
    return Request(
        request_id=request_id,
        op_code=OP_MSG,
        command=command,
        more_to_come=bool(flags & FLAG_MORE_TO_COME),
        exhaust_allowed=bool(flags & FLAG_EXHAUST_ALLOWED),
        sequences=sequences,
    )


def _parse_op_query(request_id: int, body: bytes) -> Request:
    if len(body) < 4:
        raise ProtocolError("truncated OP_QUERY")
    pos = 4  # flags
    namespace, pos = _cstring(body, pos)
    pos += 8  # numberToSkip, numberToReturn
    query, pos = _bson_at(body, pos, len(body))
    # Drivers wrap the command as {$query: {...}, $readPreference: ...} sometimes.
    if "$query" in query and isinstance(query["$query"], dict):
        query = query["$query"]
    return Request(
        request_id=request_id, op_code=OP_QUERY, command=query, legacy_namespace=namespace
    )


def encode_op_msg(
    request_id: int, response_to: int, reply: dict[str, Any], *, more_to_come: bool = False
) -> bytes:
    """An OP_MSG reply; ``more_to_come`` marks one of an exhaust stream that another
    follows (whose ``response_to`` is then this one's ``request_id``)."""
    flags = FLAG_MORE_TO_COME if more_to_come else 0
    payload = struct.pack("<I", flags) + b"\x00" + bson.encode(reply, codec_options=CODEC)
    return HEADER.pack(HEADER.size + len(payload), request_id, response_to, OP_MSG) + payload


def encode_op_reply(request_id: int, response_to: int, reply: dict[str, Any]) -> bytes:
    doc = bson.encode(reply, codec_options=CODEC)
    payload = struct.pack("<iqii", 0, 0, 0, 1) + doc
    return HEADER.pack(HEADER.size + len(payload), request_id, response_to, OP_REPLY) + payload
