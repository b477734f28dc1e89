"""The cluster link's frame codec (broker/cluster_codec.py): exact bytes, whole, byte by byte,
with trailing data; limits checked before buffering; errors are the codec's own."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import cluster_codec as codec
from broker.message import Message
from broker.mqtt import Properties

pytestmark = pytest.mark.timeout(60)

EMPTY = Properties()
MESSAGE = codec.WireMessage(
    topic="a/b",
    payload=b"hi",
    qos=1,
    retain=True,
    properties=EMPTY,
    origin_node="n1",
    publisher_client_id="c",
)

# (frame, exact encoding)
VECTORS: list[tuple[codec.Frame, bytes]] = [
    (codec.Ping(), b"\x00\x00\x00\x01\x03"),
    (codec.Pong(), b"\x00\x00\x00\x01\x04"),
    (codec.Subscribe("a/+"), b"\x00\x00\x00\x06\x06\x00\x03a/+"),
    (codec.Unsubscribe("#"), b"\x00\x00\x00\x04\x07\x00\x01#"),
    (codec.Takeover("dev"), b"\x00\x00\x00\x06\x0a\x00\x03dev"),
    (codec.Close("no"), b"\x00\x00\x00\x05\x02\x00\x02no"),
    (
        codec.Hello(1, "n1", "c", b"k"),
        b"\x00\x00\x00\x0c\x01" + b"\x01" + b"\x00\x02n1" + b"\x00\x01c" + b"\x00\x01k",
    ),
    (codec.Sync(True, ("x", "y/#")), b"\x00\x00\x00\x0a\x05\x01\x00\x01x\x00\x03y/#"),
    (codec.Sync(False, ()), b"\x00\x00\x00\x02\x05\x00"),
    (
        codec.Publish(MESSAGE),
        b"\x00\x00\x00\x11\x08"
        + bytes((0x01 | 0x04 | 0x08,))
        + b"\x00\x03a/b"
        + b"\x00\x02n1"
        + b"\x00\x01c"
        + b"\x00"  # property length 0
        + b"hi",
    ),
    (
        codec.Retain("t", None, 1.5),
        b"\x00\x00\x00\x0d\x09" + struct.pack(">d", 1.5) + b"\x00" + b"\x00\x01t",
    ),
]


def decode_all(data: bytes, chunk: int | None = None) -> tuple[list[codec.Frame], bytes]:
    decoder = codec.ClusterDecoder()
    frames: list[codec.Frame] = []
    pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(len(data))]
    for piece in pieces:
        decoder.feed(piece)
        while True:
            event = decoder.next_event()
            if isinstance(event, codec.NeedData):
                break
            frames.append(event)
    return frames, decoder.trailing_data


@pytest.mark.parametrize(("frame", "data"), VECTORS, ids=lambda v: type(v).__name__)
def test_vectors_whole_byte_by_byte_and_with_trailing_data(frame: codec.Frame, data: bytes) -> None:
    assert codec.encode(frame) == data
    assert decode_all(data) == ([frame], b"")
    assert decode_all(data, chunk=1) == ([frame], b"")
    # The next frame's first bytes stay untouched.
    assert decode_all(data + b"\x00\x00") == ([frame], b"\x00\x00")


def test_all_vectors_in_one_stream() -> None:
    stream = b"".join(data for _, data in VECTORS)
    assert decode_all(stream)[0] == [frame for frame, _ in VECTORS]


def test_hello_repr_hides_the_cookie() -> None:
    assert "secret" not in repr(codec.Hello(1, "n", "c", b"secret"))


def test_publish_carries_mqtt5_properties_and_expiry_time_left() -> None:
    properties = Properties(
        payload_format_indicator=1,
        content_type="text/plain",
        response_topic="reply/1",
        correlation_data=b"\x01\x02",
        user_properties=(("k", "v"), ("k", "w")),
    )
    message = Message("t/1", b"payload", 2, False, properties, expires_at=110.2)
    wire = codec.WireMessage.from_message(message, now=100.0, origin_node="node-a")
    assert wire.properties.message_expiry_interval == 11  # rounded up
    assert wire.origin_node == "node-a"
    (decoded,), _ = decode_all(codec.encode(codec.Publish(wire)))
    assert isinstance(decoded, codec.Publish)
    received = decoded.message.to_message(now=5000.0)
    assert received.expires_at == 5011.0
    assert received.properties == properties
    assert (received.topic, received.payload, received.qos, received.retain) == (
        "t/1",
        b"payload",
        2,
        False,
    )
    assert received.origin_node == "node-a"


def test_sync_is_split_into_reset_and_continuation_frames() -> None:
    filters = [f"devices/{number:05d}/+/telemetry" for number in range(5000)]
    frames = codec.encode_sync(filters)
    assert len(frames) > 1
    decoded, _ = decode_all(b"".join(frames))
    assert [frame.reset for frame in decoded if isinstance(frame, codec.Sync)] == [True] + [
        False
    ] * (len(frames) - 1)
    assert [f for frame in decoded if isinstance(frame, codec.Sync) for f in frame.filters] == (
        filters
    )
    assert codec.encode_sync([]) == [codec.encode(codec.Sync(True, ()))]


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\x00\x00\x00\x00", "length 0"),
        (b"\x00\x00\x00\x01\x63", "unknown frame type 99"),
        (b"\x00\x00\x00\x02\x03\x00", "unexpected bytes after a PING"),
        (b"\x00\x00\x00\x03\x06\x00\x05", "malformed frame"),
        (b"\x00\x00\x00\x05\x06\x00\x02\xff\xfe", "UTF-8"),
        (b"\x00\x00\x00\x05\x08\x03\x00\x00\x00", "QoS 3"),
        (b"\x00\x00\x00\x04\x09\x00\x00\x00", "shorter than its timestamp"),
        (b"\x00\x00\x00\x03\x05\x02\x00", "reserved sync flags"),
    ],
)
def test_malformed_frames_raise_the_codec_error(data: bytes, words: str) -> None:
    decoder = codec.ClusterDecoder()
    decoder.feed(data)
    with pytest.raises(codec.ClusterProtocolError, match=words):
        decoder.next_event()
    # A decoder that raised accepts no more input.
    with pytest.raises(codec.ClusterProtocolError):
        decoder.feed(b"\x00")


def test_oversized_length_is_refused_before_the_body_arrives() -> None:
    decoder = codec.ClusterDecoder(max_frame_size=1000)
    decoder.feed(struct.pack(">I", 1001))
    with pytest.raises(codec.ClusterProtocolError, match="exceeds the limit of 1000"):
        decoder.next_event()


def test_per_hop_properties_are_refused() -> None:
    message = codec.WireMessage("t", b"", 0, False, Properties(topic_alias=3), "n")
    decoder = codec.ClusterDecoder()
    decoder.feed(codec.encode(codec.Publish(message)))
    with pytest.raises(codec.ClusterProtocolError, match="per-hop"):
        decoder.next_event()


topics = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"),
    min_size=1,
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(
    topic=topics,
    payload=st.binary(max_size=200),
    qos=st.integers(0, 2),
    retain=st.booleans(),
    publisher=st.none() | st.text(max_size=10).filter(lambda t: "\x00" not in t),
    user=st.lists(st.tuples(topics, topics), max_size=3),
    expiry=st.none() | st.integers(1, 0xFFFFFFFF),
)
def test_publish_round_trip(
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    publisher: str | None,
    user: list[tuple[str, str]],
    expiry: int | None,
) -> None:
    properties = Properties(user_properties=tuple(user), message_expiry_interval=expiry)
    frame = codec.Publish(
        codec.WireMessage(topic, payload, qos, retain, properties, "n", publisher)
    )
    assert decode_all(codec.encode(frame)) == ([frame], b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_raise_only_the_codec_error(data: bytes) -> None:
    decoder = codec.ClusterDecoder(max_frame_size=4096)
    try:
        decoder.feed(data)
        while not isinstance(decoder.next_event(), codec.NeedData):
            pass
    except codec.ClusterProtocolError:
        pass
