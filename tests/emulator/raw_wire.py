"""A minimal MongoDB wire client for tests that need what drivers hide: OP_MSG flag bits
(exhaustAllowed on a request, moreToCome on a reply) and the requestID / responseTo
chain of an exhaust stream. Built by hand with ``struct``, independent of the emulator's
own ``wire`` module, so the two can't agree on a mistake.
"""

from __future__ import annotations

import itertools
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import bson

OP_MSG = 2013
MORE_TO_COME = 1 << 1
EXHAUST_ALLOWED = 1 << 16
HEADER = struct.Struct("<iiii")  # messageLength, requestID, responseTo, opCode

_ids = itertools.count(50_000)


@dataclass
class Reply:
    request_id: int
    response_to: int
    flags: int
    body: dict[str, Any]

    @property
    def more_to_come(self) -> bool:
        return bool(self.flags & MORE_TO_COME)


def send(sock: socket.socket, body: dict[str, Any], *, flags: int = 0) -> int:
    """Sends ``body`` as an OP_MSG with ``flags``; returns its requestID."""
    request_id = next(_ids)
    payload = struct.pack("<I", flags) + b"\x00" + bson.encode(body)
    sock.sendall(HEADER.pack(HEADER.size + len(payload), request_id, 0, OP_MSG) + payload)
    return request_id


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock`` (ConnectionError if it closes first)."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by the server")
        buf += chunk
    return buf


def receive(sock: socket.socket) -> Reply:
    """The next message, which must be an OP_MSG with one kind-0 section."""
    length, request_id, response_to, op_code = HEADER.unpack(recv_exact(sock, HEADER.size))
    body = recv_exact(sock, length - HEADER.size)
    assert op_code == OP_MSG, f"expected an OP_MSG, got opcode {op_code}"
    (flags,) = struct.unpack_from("<I", body, 0)
    assert body[4] == 0, "expected a kind-0 section first"
    return Reply(request_id, response_to, flags, bson.decode(body[5:]))


def command(sock: socket.socket, body: dict[str, Any]) -> dict[str, Any]:
    """One request, one reply (checked to answer it)."""
    sent = send(sock, body)
    reply = receive(sock)
    assert reply.response_to == sent
    assert not reply.more_to_come
    return reply.body


def stream(sock: socket.socket, body: dict[str, Any]) -> Iterator[Reply]:
    """Sends ``body`` with exhaustAllowed and yields the replies as they come, up to and
    including the first without moreToCome."""
    send(sock, body, flags=EXHAUST_ALLOWED)
    while True:
        reply = receive(sock)
        yield reply
        if not reply.more_to_come:
            return
