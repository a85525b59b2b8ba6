"""Frames and message validation, including hypothesis fuzzing of the decoder."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dfs.net.handshake  # noqa: F401 - registers the handshake schemas
from dfs.net.frames import (
    HEADER,
    MAX_FRAME,
    FrameBuffer,
    MessageType,
    ProtocolError,
    decode,
    encode,
)


def test_round_trip_and_split_delivery() -> None:
    body = {"proto": 1, "cluster": "c", "node": "n1", "nonce": b"x" * 32}
    data = encode(MessageType.HELLO, 7, body) + encode(MessageType.WELCOME, 8, {})
    fb = FrameBuffer()
    got = []
    for i in range(len(data)):  # one byte at a time
        fb.feed(data[i : i + 1])
        got.extend(fb.frames())
    msgs = [decode(p) for p in got]
    assert [(m.type, m.request_id) for m in msgs] == [
        (MessageType.HELLO, 7),
        (MessageType.WELCOME, 8),
    ]
    assert msgs[0].body == body
    assert fb.pending == 0


def test_oversize_frame_refused_before_payload() -> None:
    fb = FrameBuffer(max_frame=1024)
    with pytest.raises(ProtocolError, match="exceeds"):
        fb.feed(HEADER.pack(1025))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xc1", "undecodable"),
        (msgpack.packb({"a": 1}), r"not \[type"),
        (msgpack.packb([99, 1, {}]), "unknown message type 99"),
        (msgpack.packb([True, 1, {}]), "not an integer"),
        (msgpack.packb([4, -1, {}]), "request id"),
        (msgpack.packb([4, 1, []]), "not a map"),
        (msgpack.packb([4, 1, {"x": 1}]), "unexpected field"),
        (msgpack.packb([3, 1, {}]), "missing field 'proof'"),
        (msgpack.packb([3, 1, {"proof": "text"}]), "expected bytes"),
        (msgpack.packb([3, 1, {"proof": b"x" * 65}]), "longer than 64"),
        (msgpack.packb([1, 1, {"proto": True, "cluster": "c", "node": "n", "nonce": b""}]), "int"),
    ],
)
def test_malformed_messages(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode(payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_decoder_never_crashes_on_garbage(data: bytes) -> None:
    fb = FrameBuffer(max_frame=4096)
    try:
        fb.feed(data)
        for p in fb.frames():
            decode(p, 4096)
    except ProtocolError:
        pass


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10), st.integers(-5, 2**40), msgpack_values)
def test_structured_fuzz_is_accepted_only_when_valid(mtype: int, rid: int, body: object) -> None:
    payload = msgpack.packb([mtype, rid, body], use_bin_type=True)
    try:
        msg = decode(payload)
    except ProtocolError:
        return
    # Whatever got through is exactly what the schema allows.
    assert isinstance(msg.body, dict) and msg.request_id >= 0
    assert len(encode(msg.type, msg.request_id, msg.body)) <= MAX_FRAME + HEADER.size
