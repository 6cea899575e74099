"""Wire protocol conformance (MongoDB 7.0).

The pymongo tests run against any server. The raw-socket tests build messages by hand with
``struct`` and check the framing rules of the MongoDB wire protocol:

- OP_MSG (opcode 2013): header, uint32 flagBits, sections (kind 0: one BSON body; kind 1:
  int32 size, cstring identifier, BSON documents), then a CRC-32C checksum when flagBits
  bit 0 (checksumPresent) is set. Bit 1 (moreToCome) on a request means the server sends
  no reply.
- OP_QUERY (opcode 2004) is still accepted for the ``isMaster``/``hello`` handshake and is
  answered with OP_REPLY (opcode 1).
- A message with an unsupported opcode or an impossible length is not answered: mongod logs
  it and closes that connection (service_entry_point: "This exception will not be returned
  to the caller, but will be logged and will close the connection"). Other connections are
  unaffected.
"""

from __future__ import annotations

import datetime
import itertools
import re
import socket
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import bson
import pytest
from bson import Binary, Decimal128, Int64, ObjectId, Regex
from bson.codec_options import CodecOptions
from pymongo import MongoClient
from pymongo.database import Database

from tests.emulator.raw_wire import recv_exact

OP_REPLY = 1
OP_QUERY = 2004
OP_MSG = 2013

CHECKSUM_PRESENT = 1 << 0
MORE_TO_COME = 1 << 1

HEADER = struct.Struct("<iiii")  # messageLength, requestID, responseTo, opCode

_ids = itertools.count(1000)


# --------------------------------------------------------------------------- CRC-32C


def _make_crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum OP_MSG uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --------------------------------------------------------------------------- framing


def op_msg(
    body: dict[str, Any],
    *,
    request_id: int,
    flags: int = 0,
    sequences: dict[str, list[dict[str, Any]]] | None = None,
) -> bytes:
    payload = struct.pack("<I", flags) + b"\x00" + bson.encode(body)
    for identifier, docs in (sequences or {}).items():
        seq = identifier.encode() + b"\x00" + b"".join(bson.encode(d) for d in docs)
        payload += b"\x01" + struct.pack("<i", 4 + len(seq)) + seq
    length = HEADER.size + len(payload) + (4 if flags & CHECKSUM_PRESENT else 0)
    message = HEADER.pack(length, request_id, 0, OP_MSG) + payload
    if flags & CHECKSUM_PRESENT:
        message += struct.pack("<I", crc32c(message))
    return message


def op_query(ns: str, query: dict[str, Any], *, request_id: int) -> bytes:
    payload = (
        struct.pack("<i", 0)
        + ns.encode()
        + b"\x00"
        + struct.pack("<ii", 0, -1)
        + bson.encode(query)
    )
    return HEADER.pack(HEADER.size + len(payload), request_id, 0, OP_QUERY) + payload


def recv_message(sock: socket.socket) -> tuple[int, int, int, bytes]:
    """Returns (requestID, responseTo, opCode, body) of the next message."""
    length, request_id, response_to, opcode = HEADER.unpack(recv_exact(sock, HEADER.size))
    assert HEADER.size <= length <= 48_000_000
    return request_id, response_to, opcode, recv_exact(sock, length - HEADER.size)


def parse_op_msg(header_and_body: bytes, body: bytes) -> tuple[int, dict[str, Any]]:
    """(flagBits, body document) of an OP_MSG reply; verifies a checksum if present."""
    (flags,) = struct.unpack_from("<I", body, 0)
    end = len(body)
    if flags & CHECKSUM_PRESENT:
        end -= 4
        (checksum,) = struct.unpack_from("<I", body, end)
        assert checksum == crc32c(header_and_body[:-4])
    pos = 4
    doc: dict[str, Any] | None = None
    while pos < end:
        kind = body[pos]
        pos += 1
        if kind == 0:
            (size,) = struct.unpack_from("<i", body, pos)
            doc = bson.decode(body[pos : pos + size])
            pos += size
        else:
            (size,) = struct.unpack_from("<i", body, pos)
            pos += size
    assert doc is not None, "OP_MSG reply without a kind-0 body section"
    return flags, doc


def read_op_msg(sock: socket.socket) -> tuple[int, int, dict[str, Any]]:
    """Reads the next message, which must be an OP_MSG: (responseTo, flagBits, body)."""
    request_id, response_to, opcode, body = recv_message(sock)
    assert opcode == OP_MSG, f"expected an OP_MSG reply, got opcode {opcode}"
    header = HEADER.pack(HEADER.size + len(body), request_id, response_to, opcode)
    flags, doc = parse_op_msg(header + body, body)
    return response_to, flags, doc


def roundtrip(sock: socket.socket, message: bytes) -> tuple[int, dict[str, Any]]:
    """Sends an OP_MSG and returns the reply's (flagBits, body); checks responseTo."""
    (_, sent_id, _, _) = HEADER.unpack_from(message, 0)
    sock.sendall(message)
    response_to, flags, doc = read_op_msg(sock)
    assert response_to == sent_id
    return flags, doc


def command(sock: socket.socket, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return roundtrip(sock, op_msg(body, request_id=next(_ids), **kwargs))[1]


def wait_closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the server closes the connection within timeout without replying."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(1)
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return data == b""


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def raw(emulator: Any) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", emulator.port), timeout=5.0)
    yield sock
    sock.close()


@pytest.fixture
def raw_factory(emulator: Any) -> Iterator[Any]:
    socks: list[socket.socket] = []

    def make() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", emulator.port), timeout=5.0)
        socks.append(s)
        return s

    yield make
    for s in socks:
        s.close()


# --------------------------------------------------------------------------- helper self-test


def test_crc32c_helper_matches_the_castagnoli_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


# --------------------------------------------------------------------------- pymongo (OP_MSG)


def test_server_advertises_op_msg_capable_wire_version(client: MongoClient[Any]) -> None:
    hello = client.admin.command("hello")
    # OP_MSG exists since wire version 6 (3.6); pymongo 4 requires it.
    assert hello["maxWireVersion"] >= 6


def test_pymongo_command_round_trip(client: MongoClient[Any]) -> None:
    reply = client.admin.command("ping")
    assert reply["ok"] == 1.0


def test_pymongo_document_round_trip_preserves_bson_types(db: Database[Any]) -> None:
    when = datetime.datetime(2024, 5, 6, 7, 8, 9, 123000)
    doc = {
        "_id": ObjectId(),
        "s": "héllo wörld ✓",
        "i32": 2**31 - 1,
        "i64": Int64(2**40),
        "f": 1.5,
        "dec": Decimal128("1.10"),
        "b": True,
        "n": None,
        "dt": when,
        "bin": Binary(b"\x00\x01\xff", 0),
        "uuid": Binary.from_uuid(uuid.UUID("12345678-1234-5678-1234-567812345678")),
        "re": Regex("^a.c$", "i"),
        "arr": [1, "two", {"three": [3]}, []],
        "nested": {"a": {"b": {"c": [{"d": 1}]}}},
    }
    db.types.insert_one(doc)
    opts = CodecOptions(document_class=dict)
    back = db.get_collection("types", codec_options=opts).find_one({"_id": doc["_id"]})
    assert back is not None
    assert back["s"] == doc["s"]
    assert back["i32"] == 2**31 - 1 and type(back["i32"]) is int
    assert back["i64"] == 2**40
    assert back["f"] == 1.5
    assert back["dec"] == Decimal128("1.10")
    assert back["b"] is True
    assert back["n"] is None
    assert back["dt"] == when
    assert back["bin"] == b"\x00\x01\xff"
    assert back["uuid"] == doc["uuid"]
    assert isinstance(back["re"], Regex)
    assert back["re"].pattern == "^a.c$" and back["re"].flags == re.IGNORECASE
    assert back["arr"] == [1, "two", {"three": [3]}, []]
    assert back["nested"] == {"a": {"b": {"c": [{"d": 1}]}}}


def test_pymongo_large_document_round_trip(db: Database[Any]) -> None:
    big = "x" * (4 * 1024 * 1024)
    db.big.insert_one({"_id": 1, "payload": big})
    back = db.big.find_one({"_id": 1})
    assert back is not None and back["payload"] == big


# --------------------------------------------------------------------------- raw OP_MSG


@pytest.mark.emulator_only
def test_raw_op_msg_body_only_gets_op_msg_reply(raw: socket.socket) -> None:
    flags, reply = roundtrip(raw, op_msg({"ping": 1, "$db": "admin"}, request_id=next(_ids)))
    assert reply["ok"] == 1.0
    assert not flags & MORE_TO_COME


@pytest.mark.emulator_only
def test_raw_op_msg_document_sequence_section_is_applied(
    raw: socket.socket, db: Database[Any]
) -> None:
    docs = [{"_id": i, "v": f"seq-{i}"} for i in range(3)]
    reply = command(
        raw,
        {"insert": "seq", "$db": db.name},
        sequences={"documents": docs},
    )
    assert reply["ok"] == 1.0
    assert reply["n"] == 3
    assert list(db.seq.find({}, sort=[("_id", 1)])) == docs


@pytest.mark.emulator_only
def test_raw_op_msg_document_sequence_for_update_statements(
    raw: socket.socket, db: Database[Any]
) -> None:
    db.seq.insert_many([{"_id": 1, "v": 0}, {"_id": 2, "v": 0}])
    reply = command(
        raw,
        {"update": "seq", "$db": db.name},
        sequences={
            "updates": [
                {"q": {"_id": 1}, "u": {"$set": {"v": 10}}},
                {"q": {"_id": 2}, "u": {"$set": {"v": 20}}},
            ]
        },
    )
    assert reply["ok"] == 1.0
    assert reply["n"] == 2 and reply["nModified"] == 2
    assert {d["_id"]: d["v"] for d in db.seq.find()} == {1: 10, 2: 20}


@pytest.mark.emulator_only
def test_raw_op_msg_with_valid_checksum_is_accepted(raw: socket.socket, db: Database[Any]) -> None:
    reply = command(
        raw,
        {"insert": "crc", "documents": [{"_id": "checked"}], "$db": db.name},
        flags=CHECKSUM_PRESENT,
    )
    assert reply["ok"] == 1.0
    assert reply["n"] == 1
    assert db.crc.count_documents({"_id": "checked"}) == 1


@pytest.mark.emulator_only
def test_raw_op_msg_more_to_come_gets_no_reply_and_write_happens(
    raw: socket.socket, db: Database[Any]
) -> None:
    fire_and_forget = op_msg(
        {
            "insert": "mtc",
            "documents": [{"_id": "unacked"}],
            "writeConcern": {"w": 0},
            "$db": db.name,
        },
        request_id=next(_ids),
        flags=MORE_TO_COME,
    )
    raw.sendall(fire_and_forget)
    # The next reply on this connection must answer the find, not the insert; messages on one
    # connection are processed in order, so the insert is visible to the find.
    _flags, reply = roundtrip(
        raw,
        op_msg(
            {"find": "mtc", "filter": {"_id": "unacked"}, "$db": db.name},
            request_id=next(_ids),
        ),
    )
    assert reply["ok"] == 1.0
    assert reply["cursor"]["firstBatch"] == [{"_id": "unacked"}]


@pytest.mark.emulator_only
def test_raw_op_query_is_master_gets_op_reply(raw: socket.socket) -> None:
    request_id = next(_ids)
    raw.sendall(op_query("admin.$cmd", {"isMaster": 1}, request_id=request_id))
    _, response_to, opcode, body = recv_message(raw)
    assert opcode == OP_REPLY
    assert response_to == request_id
    _flags, cursor_id, _starting_from, number_returned = struct.unpack_from("<iqii", body, 0)
    assert cursor_id == 0
    assert number_returned == 1
    doc = bson.decode(body[20:])
    assert doc["ok"] == 1.0
    assert doc["ismaster"] is True
    assert doc["maxWireVersion"] == 21
    assert doc["setName"]


@pytest.mark.emulator_only
def test_raw_unknown_opcode_closes_only_that_connection(
    raw_factory: Any, client: MongoClient[Any]
) -> None:
    bystander = raw_factory()
    assert command(bystander, {"ping": 1, "$db": "admin"})["ok"] == 1.0

    bad = raw_factory()
    payload = b"\x00" * 16
    bad.sendall(HEADER.pack(HEADER.size + len(payload), next(_ids), 0, 9999) + payload)
    assert wait_closed(bad), "server kept the connection open after an unknown opcode"

    assert command(bystander, {"ping": 1, "$db": "admin"})["ok"] == 1.0
    assert client.admin.command("ping")["ok"] == 1.0


@pytest.mark.emulator_only
def test_raw_message_length_below_header_size_closes_connection(
    raw_factory: Any, client: MongoClient[Any]
) -> None:
    bad = raw_factory()
    bad.sendall(HEADER.pack(8, next(_ids), 0, OP_MSG))
    assert wait_closed(bad)
    assert client.admin.command("ping")["ok"] == 1.0


@pytest.mark.emulator_only
def test_raw_message_length_above_max_message_size_closes_connection(
    raw_factory: Any, client: MongoClient[Any]
) -> None:
    bystander = raw_factory()
    bad = raw_factory()
    # maxMessageSizeBytes is 48,000,000; the server must refuse rather than wait for 100 MB.
    bad.sendall(HEADER.pack(100_000_000, next(_ids), 0, OP_MSG) + b"\x00" * 64)
    assert wait_closed(bad)
    assert command(bystander, {"ping": 1, "$db": "admin"})["ok"] == 1.0
    assert client.admin.command("ping")["ok"] == 1.0


@pytest.mark.emulator_only
def test_raw_op_msg_with_unknown_section_kind_is_refused(
    raw_factory: Any, client: MongoClient[Any]
) -> None:
    """mongod either answers ok:0 or drops the connection; it never executes the command."""
    bad = raw_factory()
    body = bson.encode({"ping": 1, "$db": "admin"})
    payload = struct.pack("<I", 0) + b"\x07" + body
    request_id = next(_ids)
    bad.sendall(HEADER.pack(HEADER.size + len(payload), request_id, 0, OP_MSG) + payload)
    try:
        response_to, _flags, reply = read_op_msg(bad)
    except TimeoutError:
        pytest.fail("server neither answered nor closed the connection")
    except OSError:
        pass  # connection dropped: accepted
    else:
        assert response_to == request_id
        assert reply["ok"] == 0
    assert client.admin.command("ping")["ok"] == 1.0
