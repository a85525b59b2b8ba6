"""Wire frames: a 4-byte big-endian length, then a msgpack message, bounded and validated.

A message is ``[type, request_id, body]``: ``type`` a small int naming the
message (see ``MessageType``), ``request_id`` the caller's id for matching a
reply to its request (pipelining), ``body`` a map checked against the type's
``Schema`` before anyone reads it. The length is checked against ``max_frame``
before a single payload byte is buffered; msgpack is decoded with limits on
every container and string size. Anything wrong is a ``ProtocolError``: the
connection's owner closes the connection and logs it, nothing else happens.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

HEADER = struct.Struct(">I")
MAX_FRAME = 16 << 20  # a 1 MiB data write plus metadata fits many times over
MAX_ITEMS = 100_000


class ProtocolError(Exception):
    """A peer sent something malformed; close the connection."""


class MessageType(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    WELCOME = 4
    ERROR = 5
    PING = 6
    PONG = 7
    REQUEST = 8  # {"m": method, "a": args}; schema in dfs/net/rpc.py
    RESPONSE = 9  # {"r": result}


@dataclass(frozen=True, slots=True)
class Message:
    type: MessageType
    request_id: int
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Field:
    typ: type
    max_len: int | None = None  # for str/bytes/list
    optional: bool = False


Schema = dict[str, Field]

SCHEMAS: dict[MessageType, Schema] = {}


def register(mtype: MessageType, schema: Schema) -> None:
    SCHEMAS[mtype] = schema


def validate(mtype: MessageType, body: Any) -> dict[str, Any]:
    """Check ``body`` against the schema of ``mtype``: exact keys, types and sizes."""
    schema = SCHEMAS.get(mtype)
    if schema is None:
        raise ProtocolError(f"message type {mtype.name} has no schema")
    return validate_fields(mtype.name, schema, body)


def validate_fields(where: str, schema: Schema, body: Any) -> dict[str, Any]:
    """Check a map against ``schema`` (exact keys, types, sizes); ``where`` names it in errors."""
    if not isinstance(body, dict):
        raise ProtocolError(f"{where}: body is not a map")
    extra = set(body) - set(schema)
    if extra:
        raise ProtocolError(f"{where}: unexpected field(s) {sorted(map(str, extra))}")
    for name, f in schema.items():
        if name not in body:
            if f.optional:
                continue
            raise ProtocolError(f"{where}: missing field {name!r}")
        v: Any = body[name]
        if f.typ is int and isinstance(v, bool) or not isinstance(v, f.typ):
            got = type(v).__name__
            raise ProtocolError(f"{where}.{name}: expected {f.typ.__name__}, got {got}")
        if f.max_len is not None and isinstance(v, str | bytes | list) and len(v) > f.max_len:
            raise ProtocolError(f"{where}.{name}: longer than {f.max_len}")
    return body


def encode(mtype: MessageType, request_id: int, body: dict[str, Any]) -> bytes:
    payload: bytes = msgpack.packb([int(mtype), request_id, body], use_bin_type=True)
    if len(payload) > MAX_FRAME:
        raise ValueError(f"message of {len(payload)} bytes exceeds the frame limit")
    return HEADER.pack(len(payload)) + payload


@dataclass(frozen=True, slots=True)
class Packed:
    """A request's args map, packed once (``pack_args``) to be sent in several frames."""

    data: bytes


def pack_args(args: dict[str, Any]) -> Packed:
    return Packed(msgpack.packb(args, use_bin_type=True))


_REQUEST_HEAD = bytes([0x93, int(MessageType.REQUEST)])  # [type, id, body]: an array of 3
_M = msgpack.packb("m")
_A = msgpack.packb("a")


def encode_request(request_id: int, method: str, args: Packed) -> bytes:
    """A REQUEST frame, byte for byte what ``encode`` makes of ``{"m": method, "a": args}``,
    around args packed beforehand."""
    payload = b"".join(
        (
            _REQUEST_HEAD,
            msgpack.packb(request_id),
            b"\x82",  # the body: a map of 2
            _M,
            msgpack.packb(method, use_bin_type=True),
            _A,
            args.data,
        )
    )
    if len(payload) > MAX_FRAME:
        raise ValueError(f"message of {len(payload)} bytes exceeds the frame limit")
    return HEADER.pack(len(payload)) + payload


def decode(payload: bytes, max_frame: int = MAX_FRAME) -> Message:
    """Decode and validate one frame's payload."""
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=max_frame,
            max_bin_len=max_frame,
            max_array_len=MAX_ITEMS,
            max_map_len=MAX_ITEMS,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types for bad input
        raise ProtocolError(f"undecodable frame: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, list) or len(obj) != 3:
        raise ProtocolError("frame is not [type, request_id, body]")
    mtype_raw, request_id, body = obj
    if isinstance(mtype_raw, bool) or not isinstance(mtype_raw, int):
        raise ProtocolError("message type is not an integer")
    try:
        mtype = MessageType(mtype_raw)
    except ValueError:
        raise ProtocolError(f"unknown message type {mtype_raw}") from None
    if isinstance(request_id, bool) or not isinstance(request_id, int) or request_id < 0:
        raise ProtocolError("request id is not a non-negative integer")
    return Message(mtype, request_id, validate(mtype, body))


class FrameBuffer:
    """Incremental frame splitter: feed bytes as they arrive, take whole payloads out.

    The declared length is checked as soon as the 4-byte header is complete,
    so an oversize frame is refused before its payload is buffered.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data
        if len(self._buf) >= HEADER.size:
            (n,) = HEADER.unpack_from(self._buf)
            if n > self.max_frame:
                raise ProtocolError(f"frame of {n} bytes exceeds the limit of {self.max_frame}")

    def frames(self) -> Iterator[bytes]:
        while len(self._buf) >= HEADER.size:
            (n,) = HEADER.unpack_from(self._buf)
            if n > self.max_frame:
                raise ProtocolError(f"frame of {n} bytes exceeds the limit of {self.max_frame}")
            if len(self._buf) < HEADER.size + n:
                return
            payload = bytes(self._buf[HEADER.size : HEADER.size + n])
            del self._buf[: HEADER.size + n]
            yield payload

    @property
    def pending(self) -> int:
        return len(self._buf)
