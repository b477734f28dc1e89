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
from broker.subscriptions import SubscriptionOptions

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
    seq=7,
)
# MESSAGE's encoding: flags (QoS 1 | RETAIN | publisher), seq, topic, origin, publisher,
# property length 0, payload as a blob.
MESSAGE_BYTES = (
    bytes((0x01 | 0x04 | 0x08,))
    + struct.pack(">Q", 7)
    + b"\x00\x03a/b"
    + b"\x00\x02n1"
    + b"\x00\x01c"
    + b"\x00"
    + b"\x00\x00\x00\x02hi"
)
V = codec.Version(5, "n2")
V_BYTES = struct.pack(">Q", 5) + b"\x00\x02n2"


def framed(frame_type: int, body: bytes) -> bytes:
    return struct.pack(">I", len(body) + 1) + bytes((frame_type,)) + body


# (frame, exact encoding)
VECTORS: list[tuple[codec.Frame, bytes]] = [
    (codec.Ping(), b"\x00\x00\x00\x01\x03"),
    (codec.Pong(), b"\x00\x00\x00\x01\x04"),
    (codec.Subscribe("a/+"), b"\x00\x00\x00\x06\x06\x00\x03a/+"),
    (codec.Unsubscribe("#"), b"\x00\x00\x00\x04\x07\x00\x01#"),
    (codec.Close("no"), b"\x00\x00\x00\x05\x02\x00\x02no"),
    (
        codec.Hello(3, "n1", "c", b"k", 9, 8, 3),
        framed(
            1,
            b"\x03\x00\x02n1\x00\x01c\x00\x01k" + struct.pack(">QQQ", 9, 8, 3),
        ),
    ),
    (codec.Sync(True, ("x", "y/#")), b"\x00\x00\x00\x0a\x05\x01\x00\x01x\x00\x03y/#"),
    (codec.Sync(False, ()), b"\x00\x00\x00\x02\x05\x00"),
    (codec.Publish(MESSAGE), framed(8, b"\x01\x00\x00" + MESSAGE_BYTES)),
    (
        codec.Publish(MESSAGE, False, (("$share/g/a/#", "dev"),)),
        framed(8, b"\x00\x00\x01\x00\x0c$share/g/a/#\x00\x03dev" + MESSAGE_BYTES),
    ),
    (
        codec.Retain("t", None, 1.5),
        framed(9, struct.pack(">d", 1.5) + b"\x00" + b"\x00\x01t"),
    ),
    (codec.Ack(258), framed(12, struct.pack(">Q", 258))),
    (
        codec.Reliable(3, codec.Ack(1)),
        framed(11, struct.pack(">Q", 3) + framed(12, struct.pack(">Q", 1))),
    ),
    (codec.Claim("dev", V, True), framed(13, V_BYTES + b"\x01\x00\x03dev")),
    (codec.ClaimReply("dev", V, False), framed(14, V_BYTES + b"\x00\x00\x03dev")),
    (codec.Owned((("dev", V),)), framed(17, b"\x00\x01\x00\x03dev" + V_BYTES)),
    (
        codec.Members(True, ((2, "$share/g/t", "dev"),)),
        framed(18, b"\x01\x00\x01\x02\x00\x0a$share/g/t\x00\x03dev"),
    ),
    (codec.StateWrite(V, b"k", None, None), framed(19, V_BYTES + b"\x00\x01k\x00")),
    (codec.Hold("dev", True), framed(20, b"\x01\x00\x03dev")),
    (codec.Hold("dev", False), framed(20, b"\x00\x00\x03dev")),
    (codec.Hold("dev", False, 8), framed(20, b"\x02\x00\x03dev" + struct.pack(">I", 8))),
    # Version 4: session replication (broker.replica).
    (
        codec.Replica(
            9,
            True,
            (
                codec.ReplicaOp(codec.ReplicaOpKind.DELETE, "dev"),
                codec.ReplicaOp(codec.ReplicaOpKind.INCOMING_ADD, "dev", packet_id=5),
                codec.ReplicaOp(codec.ReplicaOpKind.DELIVERY_UPDATE, "dev", 3, 7, True, True),
                codec.ReplicaOp(codec.ReplicaOpKind.DELIVERY_REMOVE, "dev", 4),
            ),
        ),
        framed(
            21,
            struct.pack(">QBI", 9, 1, 4)
            + b"\x02\x00\x03dev"
            + b"\x03\x00\x03dev\x00\x05"
            + b"\x06\x00\x03dev"
            + struct.pack(">QHB", 3, 7, 3)
            + b"\x07\x00\x03dev"
            + struct.pack(">Q", 4),
        ),
    ),
    (codec.ReplicaAck(9), framed(22, struct.pack(">Q", 9))),
    (
        codec.Reliable(2, codec.ReplicaPublish("n3", MESSAGE)),
        framed(11, struct.pack(">Q", 2) + framed(23, b"\x00\x02n3" + MESSAGE_BYTES)),
    ),
    # Version 5: a will (delay 2 s, no expiry) copied, then cleared.
    (
        codec.Replica(
            10,
            False,
            (
                codec.ReplicaOp(
                    codec.ReplicaOpKind.WILL_SET,
                    "dev",
                    data=codec.encode_live_will(codec.LiveWill(2, None, MESSAGE)),
                ),
                codec.ReplicaOp(codec.ReplicaOpKind.WILL_CLEAR, "dev"),
            ),
        ),
        framed(
            21,
            struct.pack(">QBI", 10, 0, 2)
            + b"\x08\x00\x03dev"
            + struct.pack(">III", 8 + len(MESSAGE_BYTES), 2, 0xFFFFFFFF)
            + MESSAGE_BYTES
            + b"\x09\x00\x03dev",
        ),
    ),
    (
        codec.Reliable(3, codec.ReplicaShared("n3", (("$share/g/t/+", "w1"),), MESSAGE)),
        framed(
            11,
            struct.pack(">Q", 3)
            + framed(24, b"\x00\x02n3\x00\x01\x00\x0c$share/g/t/+\x00\x02w1" + MESSAGE_BYTES),
        ),
    ),
    # Version 6: a DELIVER for node n3 (down), to its backup: QoS 1, subscription id 7.
    (
        codec.Reliable(
            4, codec.ReplicaDeliver("n3", "dev", codec.DeliveryRecord(MESSAGE, 1, False, (7,)))
        ),
        framed(
            11,
            struct.pack(">Q", 4)
            + framed(25, b"\x00\x02n3\x00\x03dev\x01\x00\x00\x01\x00\x00\x00\x07" + MESSAGE_BYTES),
        ),
    ),
    # Version 10's HELLO has the sender's boot and wills_taken after version 9's fields.
    (
        codec.Hello(10, "n1", "c", b"k", 9, 8, 3, 77, 66),
        framed(
            1,
            b"\x0a\x00\x02n1\x00\x01c\x00\x01k" + struct.pack(">QQQQQ", 9, 8, 3, 77, 66),
        ),
    ),
    # Version 2's HELLO is version 3's (a node speaks both: rolling upgrades).
    (
        codec.Hello(2, "n1", "c", b"k", 9, 8, 3),
        framed(
            1,
            b"\x02\x00\x02n1\x00\x01c\x00\x01k" + struct.pack(">QQQ", 9, 8, 3),
        ),
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


def test_the_decoder_tells_each_frames_size() -> None:
    """Read whole, each frame's bytes (length field included): what a node holding frames
    for its backup counts (broker.cluster HELD_BYTES_MAX)."""
    decoder = codec.ClusterDecoder()
    decoder.feed(b"".join(data for _, data in VECTORS))
    for _, data in VECTORS:
        assert not isinstance(decoder.next_event(), codec.NeedData)
        assert decoder.frame_size == len(data)


def test_hello_repr_hides_the_cookie() -> None:
    assert "secret" not in repr(codec.Hello(2, "n", "c", b"secret"))


def test_hello_of_another_version_is_read_far_enough_to_refuse_it() -> None:
    version_1 = framed(1, b"\x01\x00\x02n1\x00\x01c\x00\x01k")
    (hello,), _ = decode_all(version_1)
    assert isinstance(hello, codec.Hello)
    assert (hello.version, hello.node) == (1, "n1")
    # encode is decode's inverse for it too: the fields every version has (fuzz finding).
    assert codec.encode(hello) == version_1
    version_11 = framed(1, b"\x0b\x00\x03n11\x00\x01c\x00\x01k")
    (hello,), _ = decode_all(version_11)
    assert isinstance(hello, codec.Hello)
    assert (hello.version, hello.node, hello.incarnation) == (11, "n11", 0)
    assert codec.encode(hello) == version_11


@pytest.mark.parametrize(
    ("announced", "theirs", "spoken"),
    [
        (10, 10, 10),  # both upgraded
        (10, 9, 9),  # a node of version 9: no boot in its HELLO
        (9, 10, 9),  # this node announces 9 during the upgrade
        (9, 9, 9),
        (9, 8, 8),  # a node of version 8: no REACH on that link
        (8, 9, 8),  # this node announces 8 during the upgrade
        (8, 8, 8),
        (8, 7, 7),  # a node of version 7: no FORGET on that link
        (7, 8, 7),  # this node announces 7 during the upgrade
        (7, 7, 7),
        (7, 6, 6),  # a node of version 6: no REPLICA_TRANSFER on that link
        (6, 7, 6),  # this node announces 6 during the upgrade
        (6, 6, 6),
        (6, 5, 5),  # a node of version 5: no REPLICA_DELIVER on that link
        (5, 6, 5),  # this node announces 5 during the upgrade
        (5, 5, 5),
        (5, 4, 4),  # a node of version 4: no REPLICA_SHARED on that link
        (4, 5, 4),  # this node announces 4 during the upgrade
        (4, 4, 4),
        (4, 3, 3),  # a node of version 3: no session replication on that link
        (3, 4, 3),  # this node announces 3 during the upgrade
        (3, 3, 3),
        (3, 2, 2),  # a node of version 2 (old, or upgraded with protocol_version = 2)
        (2, 3, 2),  # this node announces 2 during the upgrade
        (2, 2, 2),
        (3, 1, None),  # version 1: TAKEOVER, no reliable frames
        (2, 1, None),
        (10, 11, None),  # newer than this release
        (2, 11, None),
        (3, 0, None),
        (3, 255, None),
    ],
)
def test_a_link_speaks_the_lower_version_of_its_two_hellos(
    announced: int, theirs: int, spoken: int | None
) -> None:
    """Kafka's inter.broker.protocol.version: each side computes the same version from both
    HELLOs; a peer of a version this node does not speak is refused (None)."""
    assert codec.link_version(announced, theirs) == spoken
    if spoken is not None:
        # Both ends agree, whichever announced which.
        assert codec.link_version(theirs, announced) == spoken


def test_a_link_of_version_2_refuses_a_hold_with_a_share_as_a_node_of_version_2_does() -> None:
    share = codec.encode(codec.Hold("dev", False, 8))
    plain = codec.encode(codec.Hold("dev", False)) + codec.encode(codec.Hold("dev", True))
    decoder = codec.ClusterDecoder()
    decoder.version = 2
    decoder.feed(plain)
    assert decoder.next_event() == codec.Hold("dev", False)
    assert decoder.next_event() == codec.Hold("dev", True)
    decoder.feed(share)
    with pytest.raises(codec.ClusterProtocolError, match=r"reserved hold flags set: 0x02 .*2\)"):
        decoder.next_event()
    decoder = codec.ClusterDecoder()
    decoder.version = 3
    decoder.feed(share)
    assert decoder.next_event() == codec.Hold("dev", False, 8)


def test_publish_carries_mqtt5_properties_and_expiry_time_left() -> None:
    properties = Properties(
        payload_format_indicator=1,
        content_type="text/plain",
        response_topic="reply/1",
        correlation_data=b"\x01\x02",
        user_properties=(("k", "v"), ("k", "w")),
    )
    message = Message("t/1", b"payload", 2, False, properties, expires_at=110.2, seq=42)
    wire = codec.WireMessage.from_message(message, now=100.0, origin_node="node-a")
    assert wire.expiry_ms == 10_200
    assert wire.properties.message_expiry_interval is None
    assert (wire.origin_node, wire.seq) == ("node-a", 42)
    (decoded,), _ = decode_all(codec.encode(codec.Publish(wire)))
    assert isinstance(decoded, codec.Publish)
    received = decoded.message.to_message(now=5000.0)
    assert received.expires_at == 5010.2
    assert received.properties == properties
    assert (received.topic, received.payload, received.qos, received.retain) == (
        "t/1",
        b"payload",
        2,
        False,
    )
    assert received.id == ("node-a", 42)


def test_expiry_never_grows_from_hop_to_hop() -> None:
    """Issue 12: 60 s sent as whole seconds rounded up arrived as 61 two hops later."""
    message = Message("t", b"", 1, False, Properties(), expires_at=60.0)
    now = 0.0
    for _ in range(5):
        now += 0.0004  # each hop takes a little time
        wire = codec.WireMessage.from_message(message, now=now, origin_node="n")
        (decoded,), _ = decode_all(codec.encode(codec.Publish(wire)))
        assert isinstance(decoded, codec.Publish)
        message = decoded.message.to_message(now)
        assert message.expires_at is not None and message.expires_at <= 60.0
        assert message.remaining_expiry(now) <= 60


def test_session_record_round_trip() -> None:
    options = SubscriptionOptions(2, True, True, 1, 77)
    delivery = codec.DeliveryRecord(MESSAGE, 2, True, (1, 2), 513, True, True)
    will = codec.WillRecord(1234.5, 30, MESSAGE)
    record = codec.SessionRecord(
        "dev",
        3600,
        99.5,
        V,
        12,
        (("a/#", options), ("$share/g/b", SubscriptionOptions(1))),
        (3, 4),
        will,
        True,
        (delivery, codec.DeliveryRecord(MESSAGE, 1, False)),
    )
    assert codec.decode_session(codec.encode_session(record)) == record
    frame = codec.Transfer(V, False, record)
    assert decode_all(codec.encode(frame)) == ([frame], b"")
    frame2 = codec.Deliver("dev", delivery)
    assert decode_all(codec.encode(frame2)) == ([frame2], b"")
    # Version 7: a TRANSFER that node n3 did not acknowledge, to n3's backup.
    frame3 = codec.Reliable(5, codec.ReplicaTransfer("n3", record))
    assert decode_all(codec.encode(frame3)) == ([frame3], b"")
    assert codec.encode(frame3)[4] == codec.FrameType.RELIABLE
    assert codec.encode(frame3)[17:22] == bytes([26]) + b"\x00\x02n3"  # length, type, origin


def test_owned_and_members_are_split_into_bounded_frames() -> None:
    entries = [(f"device-{n:05d}", codec.Version(n, "node-1")) for n in range(5000)]
    frames = codec.encode_owned(entries)
    assert len(frames) > 1
    decoded, _ = decode_all(b"".join(frames))
    assert [e for f in decoded if isinstance(f, codec.Owned) for e in f.entries] == entries
    assert codec.encode_owned([]) == []
    members = [(1, f"$share/g/t/{n}", f"dev-{n}") for n in range(5000)]
    frames = codec.encode_members(members)
    decoded, _ = decode_all(b"".join(frames))
    resets = [f.reset for f in decoded if isinstance(f, codec.Members)]
    assert resets[0] and not any(resets[1:])
    assert [e for f in decoded if isinstance(f, codec.Members) for e in f.entries] == members


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
        (b"\x00\x00\x00\x05\x08\x01\x00\x00\x03", "QoS 3"),
        (b"\x00\x00\x00\x04\x09\x00\x00\x00", "RETAIN timestamp"),
        (b"\x00\x00\x00\x03\x05\x02\x00", "reserved sync flags"),
        (framed(11, struct.pack(">Q", 1) + framed(11, struct.pack(">Q", 2))), "inside"),
        (framed(11, struct.pack(">Q", 1) + b"\x00\x00"), "without an inner frame"),
        (framed(14, V_BYTES + b"\x07\x00\x01x"), "unknown claim outcome"),
        (framed(18, b"\x00\x00\x01\x03\x00\x01x\x00\x01y"), "unknown member state"),
        (framed(20, b"\x04\x00\x01x"), "reserved hold flags"),
        (framed(20, b"\x03\x00\x01x\x00\x00\x00\x08"), "pause with a share"),
        (framed(20, b"\x02\x00\x01x\x00\x00\x00\x00"), "share of 0"),
        (framed(20, b"\x02\x00\x01x\x00\x00"), "malformed frame"),
        (framed(21, struct.pack(">QBI", 1, 2, 0)), "reserved replica flags"),
        (framed(21, struct.pack(">QBI", 1, 0, 1) + b"\x0a\x00\x01x"), "unknown replica op kind 10"),
        (
            framed(
                21, struct.pack(">QBI", 1, 0, 1) + b"\x06\x00\x01x" + struct.pack(">QHB", 1, 1, 4)
            ),
            "reserved delivery update flags",
        ),
        (framed(21, struct.pack(">QBI", 1, 0, 2) + b"\x02\x00\x01x"), "malformed frame"),
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
    with pytest.raises(ValueError, match="expiry_ms"):
        codec.encode_message(
            codec.WireMessage("t", b"", 0, False, Properties(message_expiry_interval=3), "n")
        )


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
    expiry=st.none() | st.integers(0, 0xFFFFFFFF),
    seq=st.integers(0, 2**64 - 1),
    targets=st.lists(st.tuples(topics, topics), max_size=3),
)
def test_publish_round_trip(
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    publisher: str | None,
    user: list[tuple[str, str]],
    expiry: int | None,
    seq: int,
    targets: list[tuple[str, str]],
) -> None:
    properties = Properties(user_properties=tuple(user))
    frame = codec.Publish(
        codec.WireMessage(topic, payload, qos, retain, properties, "n", publisher, seq, expiry),
        bool(seq % 2),
        tuple(targets),
    )
    assert decode_all(codec.encode(frame)) == ([frame], b"")
    reliable = codec.Reliable(seq, frame)
    assert decode_all(codec.encode(reliable)) == ([reliable], b"")


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


def test_a_replicated_session_record_is_checked_when_it_arrives() -> None:
    """A SAVE op's record is decoded by the receiving codec: a bad one (or one of another
    client id, or one carrying deliveries) closes the link then, not at a handover later."""
    record = codec.SessionRecord("dev", 60, None, V)
    good = codec.ReplicaOp(codec.ReplicaOpKind.SAVE, "dev", data=codec.encode_session(record))
    (frame,), _ = decode_all(codec.encode(codec.Replica(1, False, (good,))))
    assert frame == codec.Replica(1, False, (good,))
    other = codec.ReplicaOp(codec.ReplicaOpKind.SAVE, "eve", data=good.data)
    with_delivery = codec.SessionRecord(
        "dev", 60, None, V, deliveries=(codec.DeliveryRecord(MESSAGE, 1, False),)
    )
    full = codec.ReplicaOp(
        codec.ReplicaOpKind.SAVE, "dev", data=codec.encode_session(with_delivery)
    )
    truncated = codec.ReplicaOp(codec.ReplicaOpKind.SAVE, "dev", data=good.data[:-1])
    for op in (other, full, truncated):
        decoder = codec.ClusterDecoder()
        decoder.feed(codec.encode(codec.Replica(1, False, (op,))))
        with pytest.raises(codec.ClusterProtocolError):
            decoder.next_event()


@pytest.mark.parametrize("version", [2, 3])
def test_a_link_below_version_4_refuses_replica_frames_as_an_old_node_does(version: int) -> None:
    frames = [
        (codec.Replica(1, True, ()), 21),
        (codec.ReplicaAck(1), 22),
        (codec.Reliable(1, codec.ReplicaPublish("n1", MESSAGE)), 23),
        (codec.Reliable(1, codec.ReplicaShared("n1", (("$share/g/t", "w"),), MESSAGE)), 24),
        (
            codec.Reliable(
                1, codec.ReplicaDeliver("n1", "dev", codec.DeliveryRecord(MESSAGE, 1, False))
            ),
            25,
        ),
    ]
    for frame, frame_type in frames:
        decoder = codec.ClusterDecoder()
        decoder.version = version
        decoder.feed(codec.encode(frame))
        with pytest.raises(codec.ClusterProtocolError, match=f"unknown frame type {frame_type}"):
            decoder.next_event()


def test_a_link_of_version_4_refuses_replica_shared_and_carries_the_rest() -> None:
    """Version 5 added REPLICA_SHARED only: a link of version 4 refuses it as a node of
    version 4 does (an unknown type), and still carries the other replica frames."""
    shared = codec.Reliable(1, codec.ReplicaShared("n1", (("$share/g/t", "w"),), MESSAGE))
    decoder = codec.ClusterDecoder()
    decoder.version = 4
    decoder.feed(codec.encode(codec.Reliable(1, codec.ReplicaPublish("n1", MESSAGE))))
    assert isinstance(decoder.next_event(), codec.Reliable)
    decoder.feed(codec.encode(shared))
    with pytest.raises(codec.ClusterProtocolError, match="unknown frame type 24"):
        decoder.next_event()
    decoder = codec.ClusterDecoder()
    decoder.version = 5
    decoder.feed(codec.encode(shared))
    assert decoder.next_event() == shared


def _decoder(version: int, *frames: codec.Frame) -> codec.ClusterDecoder:
    """A decoder of a link of ``version``, fed ``frames``."""
    decoder = codec.ClusterDecoder()
    decoder.version = version
    decoder.feed(b"".join(codec.encode(frame) for frame in frames))
    return decoder


@pytest.mark.parametrize(
    ("frame", "frame_type", "since"),
    [
        (
            codec.Reliable(
                1, codec.ReplicaDeliver("n1", "dev", codec.DeliveryRecord(MESSAGE, 1, False))
            ),
            25,
            6,
        ),
        (
            codec.Reliable(1, codec.ReplicaTransfer("n1", codec.SessionRecord("dev", 60, None, V))),
            26,
            7,
        ),
        (codec.Forget("node-3"), 27, 8),
        (codec.Reach("node-3", True), 28, 9),
    ],
)
def test_a_link_below_a_frames_version_refuses_it_as_an_old_node_does(
    frame: codec.Frame, frame_type: int, since: int
) -> None:
    """Version 6 added REPLICA_DELIVER only, version 7 REPLICA_TRANSFER only, version 8 FORGET
    only, version 9 REACH only: a link of a lower version (down to 4, the first with
    replication) refuses it as such a node does (an unknown type); a link of its version
    carries it."""
    for version in range(codec.REPLICA_VERSION, since):
        with pytest.raises(codec.ClusterProtocolError, match=f"unknown frame type {frame_type}"):
            _decoder(version, frame).next_event()
    assert _decoder(since, frame).next_event() == frame


def test_the_version_before_a_new_frame_still_carries_the_older_ones() -> None:
    """Version 5 carries REPLICA_SHARED and the will ops; version 6 carries REPLICA_DELIVER."""
    will = codec.Replica(1, False, (codec.ReplicaOp(codec.ReplicaOpKind.WILL_CLEAR, "dev"),))
    shared = codec.Reliable(2, codec.ReplicaShared("n1", (("$share/g/t", "w"),), MESSAGE))
    decoder = _decoder(5, will, shared)
    assert decoder.next_event() == will
    assert decoder.next_event() == shared
    deliver = codec.Reliable(
        2, codec.ReplicaDeliver("n1", "dev", codec.DeliveryRecord(MESSAGE, 1, False))
    )
    assert _decoder(6, deliver).next_event() == deliver


def test_a_link_of_version_4_refuses_will_ops_as_a_node_of_version_4_does() -> None:
    will = codec.ReplicaOp(
        codec.ReplicaOpKind.WILL_SET,
        "dev",
        data=codec.encode_live_will(codec.LiveWill(0, 60, MESSAGE)),
    )
    for op, kind in ((will, 8), (codec.ReplicaOp(codec.ReplicaOpKind.WILL_CLEAR, "dev"), 9)):
        decoder = codec.ClusterDecoder()
        decoder.version = 4
        decoder.feed(codec.encode(codec.Replica(1, False, (op,))))
        with pytest.raises(codec.ClusterProtocolError, match=f"unknown replica op kind {kind}"):
            decoder.next_event()
    decoder = codec.ClusterDecoder()
    decoder.feed(codec.encode(codec.Replica(1, False, (will,))))
    assert decoder.next_event() == codec.Replica(1, False, (will,))
    assert codec.decode_live_will(will.data) == codec.LiveWill(0, 60, MESSAGE)


def test_a_live_will_that_does_not_decode_closes_the_link() -> None:
    broken = codec.ReplicaOp(codec.ReplicaOpKind.WILL_SET, "dev", data=b"\x00\x00\x00\x01")
    decoder = codec.ClusterDecoder()
    decoder.feed(codec.encode(codec.Replica(1, False, (broken,))))
    with pytest.raises(codec.ClusterProtocolError):
        decoder.next_event()


def test_replica_shared_names_at_least_one_member() -> None:
    with pytest.raises(ValueError, match="without a member"):
        codec.encode(codec.ReplicaShared("n1", (), MESSAGE))
    decoder = codec.ClusterDecoder()
    decoder.feed(framed(24, b"\x00\x02n1\x00\x00" + MESSAGE_BYTES))
    with pytest.raises(codec.ClusterProtocolError, match="REPLICA_SHARED without a member"):
        decoder.next_event()


def test_forget_names_a_node_and_nothing_else() -> None:
    """FORGET: the node's name as a string; bytes after it are a protocol error."""
    frame = codec.Forget("node-3")
    assert codec.encode(frame) == framed(27, b"\x00\x06node-3")
    assert _decoder(codec.PROTOCOL_VERSION, frame).next_event() == frame
    decoder = codec.ClusterDecoder()
    decoder.feed(framed(27, b"\x00\x06node-3\x00"))
    with pytest.raises(codec.ClusterProtocolError, match="1 unexpected bytes after a FORGET"):
        decoder.next_event()


def test_reach_says_up_or_down_and_nothing_else() -> None:
    """REACH: a flags byte (bit 0: up) and the node's name; another flag, or bytes after the
    name, are a protocol error."""
    for up, flags in ((True, b"\x01"), (False, b"\x00")):
        frame = codec.Reach("node-3", up)
        assert codec.encode(frame) == framed(28, flags + b"\x00\x06node-3")
        assert _decoder(codec.PROTOCOL_VERSION, frame).next_event() == frame
    for body, error in (
        (b"\x03\x00\x06node-3", "REACH with unknown flags 0x03"),
        (b"\x01\x00\x06node-3\x00", "1 unexpected bytes after a REACH"),
    ):
        decoder = codec.ClusterDecoder()
        decoder.feed(framed(28, body))
        with pytest.raises(codec.ClusterProtocolError, match=error):
            decoder.next_event()
