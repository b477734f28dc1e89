"""MQTT codec: byte vectors from the 3.1.1 and 5.0 specs, replayed whole, byte by byte and
with trailing data; malformed inputs and the reason code each must raise; decoder limits."""

from __future__ import annotations

import pytest

from broker.mqtt import (
    EMPTY_PROPERTIES,
    MAX_PACKET_SIZE,
    NEED_DATA,
    Auth,
    Connack,
    ConnackReturnCode311,
    Connect,
    Disconnect,
    MQTTDecoder,
    MQTTProtocolError,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
    codec,
    connack_code_for,
    encode,
)
from broker.mqtt.wire import Reader, encode_variable_byte_integer

pytestmark = pytest.mark.timeout(30)


def h(text: str) -> bytes:
    """Hex with spaces and '|' separators, as the spec figures lay bytes out."""
    return bytes.fromhex(text.replace("|", " "))


def string(text: str) -> str:
    """A UTF-8 Encoded String as hex (5.0 section 1.5.4)."""
    data = text.encode()
    return f"{len(data):04x} {data.hex()}"


def decode_all(
    data: bytes, level: int | None, chunk: int | None = None, **kwargs: int
) -> tuple[list[Packet], MQTTDecoder]:
    decoder = MQTTDecoder(protocol_level=level, **kwargs)
    packets: list[Packet] = []
    step = chunk or max(len(data), 1)
    for start in range(0, len(data), step):
        decoder.feed(data[start : start + step])
        while (event := decoder.next_event()) is not NEED_DATA:
            packets.append(event)
    return packets, decoder


# 3.1.1 section 3.1.2.10, Figure 3.6 and 5.0 section 3.1.2.12, Figure 3-7: the variable header
# "MQTT", level, flags 0xCE (user name, password, will QoS 1, will flag, clean), Keep Alive 10.
CONNECT_311 = h(
    f"10 25 | {string('MQTT')} 04 ce 000a | {string('cid')} | {string('w/t')} {string('bye')}"
    f" | {string('user')} {string('pass')}"
)
CONNECT_5 = h(
    f"10 31 | {string('MQTT')} 05 ce 000a | 05 11 0000000a | {string('cid')}"
    f" | 05 18 0000001e {string('w/t')} {string('bye')} | {string('user')} {string('pass')}"
)

# (id, level, wire bytes, packet). Every vector is canonical: encode(packet) gives it back.
VECTORS: list[tuple[str, int, bytes, Packet]] = [
    (
        "connect-311-spec-example",
        4,
        CONNECT_311,
        Connect("MQTT", 4, True, 10, "cid", "user", b"pass", Will("w/t", b"bye", 1, False)),
    ),
    (
        "connect-311-minimal",
        4,
        h(f"10 0c {string('MQTT')} 04 02 003c 0000"),
        Connect("MQTT", 4, True, 60, ""),
    ),
    (
        "connect-31",
        3,
        h(f"10 11 {string('MQIsdp')} 03 02 003c {string('abc')}"),
        Connect("MQIsdp", 3, True, 60, "abc"),
    ),
    (
        "connect-5-spec-example",
        5,
        CONNECT_5,
        Connect(
            "MQTT",
            5,
            True,
            10,
            "cid",
            "user",
            b"pass",
            Will("w/t", b"bye", 1, False, Properties(will_delay_interval=30)),
            Properties(session_expiry_interval=10),
        ),
    ),
    (
        "connect-5-password-only-will-retain-qos2",
        5,
        h(f"10 18 {string('MQTT')} 05 74 0000 00 {string('c')} 00 {string('t')} 0000 0002 7077"),
        Connect("MQTT", 5, False, 0, "c", None, b"pw", Will("t", b"", 2, True)),
    ),
    ("connack-311", 4, h("20 02 00 00"), Connack(False, 0)),
    ("connack-311-session-present", 4, h("20 02 01 00"), Connack(True, 0)),
    ("connack-311-not-authorized", 4, h("20 02 00 05"), Connack(False, 5)),
    ("connack-5", 5, h("20 03 00 00 00"), Connack(False, 0)),
    (
        "connack-5-properties",
        5,
        h(f"20 0e 01 00 0b 12 {string('id1')} 22 000a 24 01"),
        Connack(
            True,
            0,
            Properties(assigned_client_identifier="id1", topic_alias_maximum=10, maximum_qos=1),
        ),
    ),
    ("connack-5-refused", 5, h("20 03 00 87 00"), Connack(False, ReasonCode.NOT_AUTHORIZED)),
    # 3.1.1 section 3.3.2.3, Figure 3.11: topic "a/b", Packet Identifier 10.
    ("publish-311-qos0", 4, h(f"30 0a {string('a/b')} 68656c6c6f"), Publish("a/b", b"hello")),
    (
        "publish-311-qos1-spec-example",
        4,
        h(f"32 07 {string('a/b')} 000a"),
        Publish("a/b", b"", 1, packet_id=10),
    ),
    (
        "publish-311-qos2-dup-retain",
        4,
        h(f"3d 08 {string('a/b')} 000a ff"),
        Publish("a/b", b"\xff", 2, True, True, 10),
    ),
    ("publish-5-qos0", 5, h(f"30 08 {string('a/b')} 00 6869"), Publish("a/b", b"hi")),
    (
        "publish-5-properties",
        5,
        h(
            f"32 37 {string('a/b')} 000a 28 | 01 01 | 02 0000003c | 03 {string('text')}"
            f" | 08 {string('r/t')} | 09 0002 abcd | 0b 05 | 0b ac02 | 23 0001"
            f" | 26 {string('k')} {string('v')} | 7061796c6f6164"
        ),
        Publish(
            "a/b",
            b"payload",
            1,
            packet_id=10,
            properties=Properties(
                payload_format_indicator=1,
                message_expiry_interval=60,
                content_type="text",
                response_topic="r/t",
                correlation_data=b"\xab\xcd",
                subscription_identifiers=(5, 300),
                topic_alias=1,
                user_properties=(("k", "v"),),
            ),
        ),
    ),
    (
        "publish-5-topic-alias-only",
        5,
        h("30 07 0000 03 230007 78"),
        Publish("", b"x", properties=Properties(topic_alias=7)),
    ),
    ("puback-311", 4, h("40 02 000a"), Puback(10)),
    ("pubrec-311", 4, h("50 02 000a"), Pubrec(10)),
    ("pubrel-311", 4, h("62 02 000a"), Pubrel(10)),
    ("pubcomp-311", 4, h("70 02 000a"), Pubcomp(10)),
    ("puback-5-short", 5, h("40 02 000a"), Puback(10)),
    ("puback-5-reason", 5, h("40 03 000a 10"), Puback(10, ReasonCode.NO_MATCHING_SUBSCRIBERS)),
    (
        "pubrec-5-reason-string",
        5,
        h(f"50 09 000a 80 05 1f {string('no')}"),
        Pubrec(10, 0x80, Properties(reason_string="no")),
    ),
    ("pubrel-5-not-found", 5, h("62 03 000a 92"), Pubrel(10, 0x92)),
    ("pubcomp-5", 5, h("70 02 000a"), Pubcomp(10)),
    # 3.1.1 section 3.8.3.1, Figure 3.22: "a/b" at QoS 1 and "c/d" at QoS 2.
    (
        "subscribe-311-spec-example",
        4,
        h(f"82 0e 000a {string('a/b')} 01 {string('c/d')} 02"),
        Subscribe(10, (Subscription("a/b", 1), Subscription("c/d", 2))),
    ),
    (
        "subscribe-5-options",
        5,
        h(f"82 18 000a 02 0b05 {string('a/+')} 2d {string('$share/g/#')} 1a"),
        Subscribe(
            10,
            (
                Subscription("a/+", 1, True, True, 2),
                Subscription("$share/g/#", 2, False, True, 1),
            ),
            Properties(subscription_identifiers=(5,)),
        ),
    ),
    # 3.1.1 section 3.9.3, Figure 3.26: granted QoS 0, 1, 2 and a failure.
    ("suback-311-spec-example", 4, h("90 06 000a 00 01 02 80"), Suback(10, (0, 1, 2, 0x80))),
    (
        "suback-5",
        5,
        h(f"90 0b 000a 04 1f {string('x')} 00 01 02 8f"),
        Suback(10, (0, 1, 2, 0x8F), Properties(reason_string="x")),
    ),
    # 3.1.1 section 3.10.3.1, Figure 3.30: "a/b" and "c/d".
    (
        "unsubscribe-311-spec-example",
        4,
        h(f"a2 0c 000a {string('a/b')} {string('c/d')}"),
        Unsubscribe(10, ("a/b", "c/d")),
    ),
    (
        "unsubscribe-5",
        5,
        h(f"a2 0f 000a 07 26 {string('k')} {string('v')} {string('a/b')}"),
        Unsubscribe(10, ("a/b",), Properties(user_properties=(("k", "v"),))),
    ),
    ("unsuback-311", 4, h("b0 02 000a"), Unsuback(10)),
    ("unsuback-5", 5, h("b0 05 000a 00 00 11"), Unsuback(10, (0, 0x11))),
    ("pingreq-311", 4, h("c0 00"), Pingreq()),
    ("pingresp-311", 4, h("d0 00"), Pingresp()),
    ("pingreq-5", 5, h("c0 00"), Pingreq()),
    ("pingresp-5", 5, h("d0 00"), Pingresp()),
    ("disconnect-311", 4, h("e0 00"), Disconnect()),
    ("disconnect-5", 5, h("e0 00"), Disconnect()),
    ("disconnect-5-with-will", 5, h("e0 01 04"), Disconnect(4)),
    (
        "disconnect-5-taken-over",
        5,
        h(f"e0 0b 8e 09 1c {string('host:1')}"),
        Disconnect(0x8E, Properties(server_reference="host:1")),
    ),
    ("auth-5", 5, h("f0 00"), Auth()),
    (
        "auth-5-continue",
        5,
        h(f"f0 0e 18 0c 15 {string('SCRAM')} 16 0001 ff"),
        Auth(0x18, Properties(authentication_method="SCRAM", authentication_data=b"\xff")),
    ),
]
IDS = [vector[0] for vector in VECTORS]


def _decoder_level(packet: Packet, level: int) -> int | None:
    # The server side decodes CONNECT with no level yet; everything else at a known level.
    return None if isinstance(packet, Connect) else level


@pytest.mark.parametrize(("name", "level", "wire", "packet"), VECTORS, ids=IDS)
def test_vector_encodes_exactly(name: str, level: int, wire: bytes, packet: Packet) -> None:
    assert encode(packet, level) == wire


@pytest.mark.parametrize("chunk", [None, 1, 3], ids=["whole", "byte-by-byte", "chunks-of-3"])
@pytest.mark.parametrize(("name", "level", "wire", "packet"), VECTORS, ids=IDS)
def test_vector_decodes(name: str, level: int, wire: bytes, packet: Packet, chunk: int) -> None:
    packets, decoder = decode_all(wire, _decoder_level(packet, level), chunk)
    assert packets == [packet]
    assert decoder.trailing_data == b""
    if isinstance(packet, Connect):
        assert decoder.protocol_level == packet.protocol_level


@pytest.mark.parametrize(("name", "level", "wire", "packet"), VECTORS, ids=IDS)
def test_vector_with_trailing_data(name: str, level: int, wire: bytes, packet: Packet) -> None:
    following = encode(Publish("a/b", b"xy"), level)
    trailing = following[:-2]  # the next packet, all but its last two bytes
    packets, decoder = decode_all(wire + trailing, _decoder_level(packet, level))
    assert packets == [packet]
    assert decoder.trailing_data == trailing
    decoder.feed(b"xy")
    assert decoder.next_event() == Publish("a/b", b"xy")
    assert decoder.next_event() is NEED_DATA


def test_a_whole_session_in_one_buffer_and_byte_by_byte() -> None:
    connect = next(v[3] for v in VECTORS if v[0] == "connect-5-spec-example")
    rest: list[Packet] = [
        packet for _, level, _, packet in VECTORS if level == 5 and not isinstance(packet, Connect)
    ]
    rest += [Pingreq()] * 3
    stream = CONNECT_5 + b"".join(encode(packet, 5) for packet in rest)
    for chunk in (None, 1, 7):
        packets, decoder = decode_all(stream, None, chunk)
        assert packets == [connect, *rest]
        assert decoder.protocol_level == 5
        assert decoder.trailing_data == b""


# (id, decoder level, wire bytes, reason code). Level None means "server, before CONNECT".
MALFORMED: list[tuple[str, int | None, bytes, ReasonCode]] = [
    ("reserved-packet-type-0", 4, h("00 00"), ReasonCode.MALFORMED_PACKET),
    ("auth-in-311", 4, h("f0 00"), ReasonCode.MALFORMED_PACKET),
    ("connect-fixed-flags", None, h("11 00"), ReasonCode.MALFORMED_PACKET),
    ("pubrel-flags-0", 4, h("60 02 000a"), ReasonCode.MALFORMED_PACKET),
    ("subscribe-flags-0", 4, h(f"80 08 000a {string('a/b')} 00"), ReasonCode.MALFORMED_PACKET),
    ("unsubscribe-flags-0", 4, h(f"a0 07 000a {string('a/b')}"), ReasonCode.MALFORMED_PACKET),
    ("puback-flags", 4, h("41 02 000a"), ReasonCode.MALFORMED_PACKET),
    ("publish-before-connect", None, h(f"30 05 {string('a/b')}"), ReasonCode.PROTOCOL_ERROR),
    ("pingreq-before-connect", None, h("c0 00"), ReasonCode.PROTOCOL_ERROR),
    ("remaining-length-5-bytes", 4, h("30 ff ff ff ff 7f"), ReasonCode.MALFORMED_PACKET),
    ("remaining-length-not-shortest", 4, h("c0 80 00"), ReasonCode.MALFORMED_PACKET),
    ("pingreq-with-body", 4, h("c0 01 00"), ReasonCode.MALFORMED_PACKET),
    ("disconnect-311-with-body", 4, h("e0 01 00"), ReasonCode.MALFORMED_PACKET),
    (
        "connect-reserved-flag",
        None,
        h(f"10 0d {string('MQTT')} 04 03 003c {string('a')}"),
        ReasonCode.MALFORMED_PACKET,
    ),
    (
        "connect-unsupported-level",
        None,
        h(f"10 0d {string('MQTT')} 06 02 003c {string('a')}"),
        ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
    ),
    (
        "connect-wrong-protocol-name",
        None,
        h(f"10 0d {string('MQTX')} 04 02 003c {string('a')}"),
        ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
    ),
    (
        "connect-31-name-with-level-4",
        None,
        h(f"10 0f {string('MQIsdp')} 04 02 003c {string('a')}"),
        ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
    ),
    (
        "connect-will-qos-3",
        None,
        h(f"10 13 {string('MQTT')} 04 1e 003c {string('a')} {string('t')} 0001 78"),
        ReasonCode.MALFORMED_PACKET,
    ),
    (
        "connect-will-retain-without-will",
        None,
        h(f"10 0d {string('MQTT')} 04 22 003c {string('a')}"),
        ReasonCode.MALFORMED_PACKET,
    ),
    (
        "connect-will-qos-without-will",
        None,
        h(f"10 0d {string('MQTT')} 04 0a 003c {string('a')}"),
        ReasonCode.MALFORMED_PACKET,
    ),
    (
        "connect-311-password-without-user-name",
        None,
        h(f"10 11 {string('MQTT')} 04 42 003c {string('a')} 0002 7077"),
        ReasonCode.MALFORMED_PACKET,
    ),
    (
        "connect-311-empty-client-id-persistent",
        None,
        h(f"10 0c {string('MQTT')} 04 00 003c 0000"),
        ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
    ),
    (
        "connect-31-empty-client-id",
        None,
        h(f"10 0e {string('MQIsdp')} 03 02 003c 0000"),
        ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
    ),
    (
        "connect-trailing-bytes",
        None,
        h(f"10 0e {string('MQTT')} 04 02 003c {string('a')} 00"),
        ReasonCode.MALFORMED_PACKET,
    ),
    (
        "connect-truncated-client-id",
        None,
        h(f"10 0d {string('MQTT')} 04 02 003c 0005 61"),
        ReasonCode.MALFORMED_PACKET,
    ),
    (
        "connect-will-topic-wildcard",
        None,
        h(f"10 13 {string('MQTT')} 04 0e 003c {string('a')} {string('#')} 0001 78"),
        ReasonCode.TOPIC_NAME_INVALID,
    ),
    (
        "connect-5-receive-maximum-0",
        None,
        h(f"10 11 {string('MQTT')} 05 02 003c 03 210000 {string('a')}"),
        ReasonCode.PROTOCOL_ERROR,
    ),
    (
        "connect-5-maximum-packet-size-0",
        None,
        h(f"10 13 {string('MQTT')} 05 02 003c 05 2700000000 {string('a')}"),
        ReasonCode.PROTOCOL_ERROR,
    ),
    (
        "connect-5-request-problem-information-2",
        None,
        h(f"10 10 {string('MQTT')} 05 02 003c 02 1702 {string('a')}"),
        ReasonCode.PROTOCOL_ERROR,
    ),
    (
        "connect-5-duplicate-session-expiry",
        None,
        h(f"10 18 {string('MQTT')} 05 02 003c 0a 1100000001 1100000001 {string('a')}"),
        ReasonCode.PROTOCOL_ERROR,
    ),
    (
        "connect-5-topic-alias-not-allowed",
        None,
        h(f"10 11 {string('MQTT')} 05 02 003c 03 230001 {string('a')}"),
        ReasonCode.MALFORMED_PACKET,
    ),
    (
        "connect-5-authentication-data-without-method",
        None,
        h(f"10 11 {string('MQTT')} 05 02 003c 03 160000 {string('a')}"),
        ReasonCode.PROTOCOL_ERROR,
    ),
    (
        "connect-5-will-delay-outside-will",
        None,
        h(f"10 13 {string('MQTT')} 05 02 003c 05 1800000001 {string('a')}"),
        ReasonCode.MALFORMED_PACKET,
    ),
    (
        "connect-5-unknown-property",
        None,
        h(f"10 10 {string('MQTT')} 05 02 003c 02 7f00 {string('a')}"),
        ReasonCode.MALFORMED_PACKET,
    ),
    (
        "connect-5-property-length-past-end",
        None,
        h(f"10 0e {string('MQTT')} 05 02 003c 7f {string('a')}"),
        ReasonCode.MALFORMED_PACKET,
    ),
    ("connack-311-reserved-flags", 4, h("20 02 02 00"), ReasonCode.MALFORMED_PACKET),
    ("connack-311-unknown-code", 4, h("20 02 00 06"), ReasonCode.MALFORMED_PACKET),
    ("connack-session-present-refused", 4, h("20 02 01 05"), ReasonCode.PROTOCOL_ERROR),
    ("connack-5-bad-reason", 5, h("20 03 00 10 00"), ReasonCode.PROTOCOL_ERROR),
    ("connack-5-no-properties", 5, h("20 02 00 00"), ReasonCode.MALFORMED_PACKET),
    ("publish-qos-3", 4, h(f"36 07 {string('a/b')} 000a"), ReasonCode.MALFORMED_PACKET),
    ("publish-dup-at-qos-0", 4, h(f"38 05 {string('a/b')}"), ReasonCode.MALFORMED_PACKET),
    ("publish-packet-id-0", 4, h(f"32 07 {string('a/b')} 0000"), ReasonCode.PROTOCOL_ERROR),
    ("publish-topic-plus", 4, h(f"30 05 {string('a/+')}"), ReasonCode.TOPIC_NAME_INVALID),
    ("publish-topic-hash", 5, h(f"30 06 {string('a/#')} 00"), ReasonCode.TOPIC_NAME_INVALID),
    ("publish-topic-invalid-utf8", 4, h("30 03 0001 ff"), ReasonCode.MALFORMED_PACKET),
    ("publish-topic-surrogate", 4, h("30 05 0003 eda080"), ReasonCode.MALFORMED_PACKET),
    ("publish-topic-nul", 4, h("30 05 0003 610062"), ReasonCode.MALFORMED_PACKET),
    ("publish-topic-past-end", 4, h("30 04 0005 6162"), ReasonCode.MALFORMED_PACKET),
    ("publish-311-empty-topic", 4, h("30 03 0000 78"), ReasonCode.TOPIC_NAME_INVALID),
    ("publish-5-empty-topic-no-alias", 5, h("30 03 0000 00"), ReasonCode.PROTOCOL_ERROR),
    (
        "publish-5-topic-alias-0",
        5,
        h(f"30 09 {string('a/b')} 03 230000"),
        ReasonCode.TOPIC_ALIAS_INVALID,
    ),
    (
        "publish-5-session-expiry-not-allowed",
        5,
        h(f"30 0b {string('a/b')} 05 1100000001"),
        ReasonCode.MALFORMED_PACKET,
    ),
    (
        "publish-5-duplicate-content-type",
        5,
        h(f"30 0e {string('a/b')} 08 03 {string('x')} 03 {string('y')}"),
        ReasonCode.PROTOCOL_ERROR,
    ),
    (
        "publish-5-payload-format-2",
        5,
        h(f"30 08 {string('a/b')} 02 0102"),
        ReasonCode.PROTOCOL_ERROR,
    ),
    (
        "publish-5-subscription-identifier-0",
        5,
        h(f"30 08 {string('a/b')} 02 0b00"),
        ReasonCode.PROTOCOL_ERROR,
    ),
    (
        "publish-5-vbi-not-shortest",
        5,
        h(f"30 09 {string('a/b')} 03 0b8100"),
        ReasonCode.MALFORMED_PACKET,
    ),
    ("puback-311-with-reason", 4, h("40 03 000a 00"), ReasonCode.MALFORMED_PACKET),
    ("puback-packet-id-0", 4, h("40 02 0000"), ReasonCode.PROTOCOL_ERROR),
    ("puback-short", 4, h("40 01 00"), ReasonCode.MALFORMED_PACKET),
    ("puback-5-bad-reason", 5, h("40 03 000a 05"), ReasonCode.PROTOCOL_ERROR),
    ("pubrel-5-bad-reason", 5, h("62 03 000a 10"), ReasonCode.PROTOCOL_ERROR),
    ("subscribe-empty", 4, h("82 02 000a"), ReasonCode.PROTOCOL_ERROR),
    ("subscribe-5-empty", 5, h("82 03 000a 00"), ReasonCode.PROTOCOL_ERROR),
    ("subscribe-packet-id-0", 4, h(f"82 08 0000 {string('a/b')} 00"), ReasonCode.PROTOCOL_ERROR),
    ("subscribe-qos-3", 4, h(f"82 08 000a {string('a/b')} 03"), ReasonCode.MALFORMED_PACKET),
    (
        "subscribe-311-option-bits",
        4,
        h(f"82 08 000a {string('a/b')} 04"),
        ReasonCode.MALFORMED_PACKET,
    ),
    (
        "subscribe-5-reserved-bits",
        5,
        h(f"82 09 000a 00 {string('a/b')} 40"),
        ReasonCode.MALFORMED_PACKET,
    ),
    (
        "subscribe-5-retain-handling-3",
        5,
        h(f"82 09 000a 00 {string('a/b')} 30"),
        ReasonCode.PROTOCOL_ERROR,
    ),
    (
        "subscribe-5-no-local-shared",
        5,
        h(f"82 12 000a 00 {string('$share/g/a/b')} 04"),
        ReasonCode.PROTOCOL_ERROR,
    ),
    (
        "subscribe-5-two-subscription-identifiers",
        5,
        h(f"82 0d 000a 04 0b01 0b02 {string('a/b')} 00"),
        ReasonCode.PROTOCOL_ERROR,
    ),
    (
        "subscribe-5-topic-alias-not-allowed",
        5,
        h(f"82 0c 000a 03 230001 {string('a/b')} 00"),
        ReasonCode.MALFORMED_PACKET,
    ),
    ("subscribe-missing-options", 4, h(f"82 07 000a {string('a/b')}"), ReasonCode.MALFORMED_PACKET),
    ("suback-311-bad-code", 4, h("90 03 000a 03"), ReasonCode.PROTOCOL_ERROR),
    ("suback-5-bad-code", 5, h("90 04 000a 00 11"), ReasonCode.PROTOCOL_ERROR),
    ("suback-empty", 4, h("90 02 000a"), ReasonCode.PROTOCOL_ERROR),
    ("unsubscribe-empty", 4, h("a2 02 000a"), ReasonCode.PROTOCOL_ERROR),
    ("unsuback-311-with-codes", 4, h("b0 03 000a 00"), ReasonCode.MALFORMED_PACKET),
    ("unsuback-5-bad-code", 5, h("b0 04 000a 00 01"), ReasonCode.PROTOCOL_ERROR),
    ("disconnect-5-bad-reason", 5, h("e0 01 01"), ReasonCode.PROTOCOL_ERROR),
    ("auth-5-bad-reason", 5, h("f0 01 87"), ReasonCode.PROTOCOL_ERROR),
    (
        "disconnect-5-topic-alias-not-allowed",
        5,
        h("e0 05 00 03 230001"),
        ReasonCode.MALFORMED_PACKET,
    ),
]


@pytest.mark.parametrize("chunk", [None, 1], ids=["whole", "byte-by-byte"])
@pytest.mark.parametrize(
    ("name", "level", "wire", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED]
)
def test_malformed(
    name: str, level: int | None, wire: bytes, reason: ReasonCode, chunk: int | None
) -> None:
    with pytest.raises(MQTTProtocolError) as caught:
        decode_all(wire, level, chunk)
    assert caught.value.reason_code == reason, str(caught.value)


def test_unsupported_level_carries_the_level_for_the_connack() -> None:
    with pytest.raises(MQTTProtocolError) as caught:
        decode_all(h(f"10 0d {string('MQTT')} 07 02 003c {string('a')}"), None)
    assert caught.value.reason_code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION
    assert caught.value.protocol_level == 7
    # A 3.1.1 client learns about it as return code 1, a 5.0 client as reason 0x84.
    assert connack_code_for(4, caught.value.reason_code) == 1
    assert encode(Connack(False, caught.value.reason_code), 4) == h("20 02 00 01")
    assert encode(Connack(False, caught.value.reason_code), 5) == h("20 03 00 84 00")


def test_connect_errors_carry_the_connect_level() -> None:
    with pytest.raises(MQTTProtocolError) as caught:
        decode_all(h(f"10 0c {string('MQTT')} 04 00 003c 0000"), None)
    assert caught.value.protocol_level == 4
    with pytest.raises(MQTTProtocolError) as caught:
        decode_all(h(f"10 10 {string('MQTT')} 05 02 003c 02 1702 {string('a')}"), None)
    assert caught.value.protocol_level == 5


def test_connect_5_allows_what_311_forbids() -> None:
    # Password without user name, empty client id without clean start (5.0 section 3.1.3.1).
    wire = h(f"10 11 {string('MQTT')} 05 40 003c 00 0000 0002 7077")
    packets, _ = decode_all(wire, None)
    assert packets == [Connect("MQTT", 5, False, 60, "", None, b"pw")]


def test_second_connect_is_a_protocol_error() -> None:
    decoder = MQTTDecoder()
    decoder.feed(CONNECT_311 + CONNECT_311)
    assert isinstance(decoder.next_event(), Connect)
    with pytest.raises(MQTTProtocolError) as caught:
        decoder.next_event()
    assert caught.value.reason_code == ReasonCode.PROTOCOL_ERROR
    assert caught.value.protocol_level == 4


def test_packet_too_large_is_raised_from_the_fixed_header() -> None:
    decoder = MQTTDecoder(max_packet_size=100, protocol_level=4)
    decoder.feed(h("30 62"))  # 2 + 98 = 100 bytes: allowed, waits for the body
    assert decoder.next_event() is NEED_DATA
    decoder = MQTTDecoder(max_packet_size=100, protocol_level=4)
    decoder.feed(h("30 63"))  # 101 bytes, and not one body byte buffered
    with pytest.raises(MQTTProtocolError) as caught:
        decoder.next_event()
    assert caught.value.reason_code == ReasonCode.PACKET_TOO_LARGE
    decoder = MQTTDecoder(protocol_level=5)
    decoder.feed(h("30 ff ff ff 7f"))  # the largest remaining length is not an error
    assert decoder.next_event() is NEED_DATA
    assert MAX_PACKET_SIZE == 268_435_455 + 5


def test_first_byte_is_checked_before_the_rest_arrives() -> None:
    # A TLS ClientHello (0x16) or an HTTP request at a plain MQTT port fails on byte one.
    for first in (b"\x16", b"G"):
        decoder = MQTTDecoder()
        decoder.feed(first)
        with pytest.raises(MQTTProtocolError):
            decoder.next_event()


def test_a_decoder_that_raised_accepts_nothing_more() -> None:
    decoder = MQTTDecoder(protocol_level=4)
    decoder.feed(h("36 00"))
    with pytest.raises(MQTTProtocolError) as first:
        decoder.next_event()
    with pytest.raises(MQTTProtocolError) as again:
        decoder.feed(h("c0 00"))
    assert again.value is first.value
    with pytest.raises(MQTTProtocolError):
        decoder.next_event()


def test_remaining_length_examples() -> None:
    # 3.1.1 section 2.2.3, Table 2.4 / 5.0 section 1.5.5, Table 1-1.
    examples = {
        0: "00",
        127: "7f",
        128: "80 01",
        16_383: "ff 7f",
        16_384: "80 80 01",
        2_097_151: "ff ff 7f",
        2_097_152: "80 80 80 01",
        268_435_455: "ff ff ff 7f",
    }
    for value, wire in examples.items():
        assert encode_variable_byte_integer(value) == h(wire)
        data = h(wire)
        assert Reader(memoryview(data), 0, len(data)).variable_byte_integer() == value
    with pytest.raises(ValueError):
        encode_variable_byte_integer(268_435_456)


def test_large_publish_byte_by_byte_is_linear() -> None:
    payload = bytes(range(256)) * 256  # 64 KiB
    wire = encode(Publish("big", payload, 1, packet_id=1), 4) * 2
    decoder = MQTTDecoder(protocol_level=4)
    packets = []
    # No timing assertion (the machine is noisy): quadratic buffering would take minutes
    # here, and the test's timeout fails it.
    for index in range(len(wire)):
        decoder.feed(wire[index : index + 1])
        if (event := decoder.next_event()) is not NEED_DATA:
            packets.append(event)
    assert [p.payload for p in packets if isinstance(p, Publish)] == [payload, payload]


def test_3_1_1_encoding_drops_what_the_wire_cannot_carry() -> None:
    properties = Properties(reason_string="why", user_properties=(("a", "b"),))
    assert encode(Puback(1, 0x80, properties), 4) == h("40 02 0001")
    assert encode(Disconnect(0x8E, properties), 4) == h("e0 00")
    assert encode(Unsuback(1, (0, 0x11)), 4) == h("b0 02 0001")
    assert encode(Suback(1, (0, 1, 2, 0x87, 0x8F)), 4) == h("90 07 0001 00 01 02 80 80")
    assert encode(Connack(False, ReasonCode.BAD_USER_NAME_OR_PASSWORD), 4) == h("20 02 00 04")
    assert encode(Connack(False, ReasonCode.SERVER_BUSY), 4) == h("20 02 00 03")
    sub = Subscription("a", 1, no_local=True, retain_as_published=True, retain_handling=2)
    assert encode(Subscribe(1, (sub,)), 4) == h(f"82 06 0001 {string('a')} 01")


def test_puback_5_with_properties_and_success_keeps_the_reason_byte() -> None:
    packet = Puback(1, 0, Properties(reason_string="ok"))
    assert encode(packet, 5) == h(f"40 09 0001 00 05 1f {string('ok')}")


def test_non_canonical_5_acks_decode() -> None:
    # A reason code of 0 and an empty property list may both be sent explicitly.
    packets, _ = decode_all(h("40 04 000a 00 00 e0 02 00 00 f0 01 00"), 5)
    assert packets == [Puback(10), Disconnect(), Auth()]


@pytest.mark.parametrize(
    ("packet", "level"),
    [
        (Publish("a", b"", 1), 4),
        (Publish("a", b"", 0, packet_id=1), 4),
        (Publish("a", b"", 3, packet_id=1), 4),
        (Publish("a", b"", 0, dup=True), 4),
        (Puback(0), 4),
        (Puback(70000), 4),
        (Subscribe(1, ()), 4),
        (Unsubscribe(1, ()), 4),
        (Auth(), 4),
        (Connect("MQTT", 4, True, 0, "a"), 5),
        (Connect("MQTT", 4, True, 0, "a", None, b"pw"), 4),
        (Publish("a", b"", properties=Properties(session_expiry_interval=1)), 5),
        (Publish("a\x00", b""), 4),
        (Pingreq(), 6),
    ],
)
def test_encode_rejects_misuse(packet: Packet, level: int) -> None:
    with pytest.raises(ValueError):
        encode(packet, level)


def test_connack_code_for() -> None:
    assert connack_code_for(4, ReasonCode.SUCCESS) == ConnackReturnCode311.ACCEPTED
    assert connack_code_for(4, ReasonCode.UNSUPPORTED_PROTOCOL_VERSION) == 1
    assert connack_code_for(4, ReasonCode.CLIENT_IDENTIFIER_NOT_VALID) == 2
    assert connack_code_for(4, ReasonCode.SERVER_UNAVAILABLE) == 3
    assert connack_code_for(4, ReasonCode.SERVER_BUSY) == 3
    assert connack_code_for(4, ReasonCode.MALFORMED_PACKET) == 3
    assert connack_code_for(4, ReasonCode.BAD_USER_NAME_OR_PASSWORD) == 4
    assert connack_code_for(4, ReasonCode.NOT_AUTHORIZED) == 5
    assert connack_code_for(3, ReasonCode.NOT_AUTHORIZED) == 5
    assert connack_code_for(5, ReasonCode.NOT_AUTHORIZED) == 0x87


def test_enumerations_follow_the_spec() -> None:
    assert [t.name for t in PacketType][:3] == ["CONNECT", "CONNACK", "PUBLISH"]
    assert int(PacketType.AUTH) == 15
    assert ReasonCode["NORMAL_DISCONNECTION"] is ReasonCode.SUCCESS
    assert ReasonCode["GRANTED_QOS_0"] is ReasonCode.SUCCESS
    assert ReasonCode(0xA2) is ReasonCode.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED
    assert len({int(code) for code in ReasonCode}) == 43
    assert repr(EMPTY_PROPERTIES) == "Properties()"
    assert "session_expiry_interval=5" in repr(Properties(session_expiry_interval=5))


# --- the PUBLISH fast paths (decode without a Reader, encode in one join) -------------------


@pytest.mark.parametrize("level", [3, 4, 5])
@pytest.mark.parametrize(
    "publish",
    [
        Publish("a/b", b"payload"),
        Publish("a/b", b"", qos=1, packet_id=7, retain=True),
        Publish("t" * 300, bytes(200), qos=2, packet_id=65535, dup=True),
        Publish("a", b"x", properties=Properties(content_type="text/plain")),
        Publish("a", b"x", qos=1, packet_id=1, properties=Properties(topic_alias=3)),
    ],
)
def test_publish_fast_paths_match_the_general_ones(level: int, publish: Publish) -> None:
    v5 = level == 5
    if not v5:
        publish = Publish(
            publish.topic, publish.payload, publish.qos, publish.retain, publish.dup,
            publish.packet_id,
        )  # fmt: skip
    flags, parts = codec._encode_publish(publish, v5)
    body = b"".join(parts)
    general = bytes((0x30 | flags,)) + encode_variable_byte_integer(len(body)) + body
    assert encode(publish, level) == general
    fast = codec._decode_publish_fast(general, len(general) - len(body), v5)
    # 5.0 with properties defers to the general path (None); otherwise the same record,
    # which keeps its wire bytes
    if v5 and publish.properties != EMPTY_PROPERTIES:
        assert fast is None
    else:
        assert fast == publish
        assert fast is not None and fast.raw == general
    decoder = MQTTDecoder(protocol_level=level)
    decoder.feed(general + b"\xc0\x00")  # a PINGREQ after it: raw is this packet only
    decoded = decoder.next_event()
    assert decoded == publish
    assert isinstance(decoded, Publish)
    assert decoded.raw == (general if fast is not None else None)


def test_publish_fast_encoder_raises_as_the_general_one() -> None:
    with pytest.raises(ValueError, match="packet identifier exactly when QoS > 0"):
        encode(Publish("a", b"", qos=1), 4)
    with pytest.raises(ValueError, match="DUP must be 0 at QoS 0"):
        encode(Publish("a", b"", dup=True), 5)
    with pytest.raises(ValueError, match="U\\+0000"):
        encode(Publish("a\x00", b""), 4)


def test_publish_fast_path_topic_names_are_remembered_within_bounds() -> None:
    first = encode(Publish("cache/a", b"1"), 4)
    second = encode(Publish("cache/a", b"2"), 4)
    one = codec._decode_publish_fast(first, 2, False)
    two = codec._decode_publish_fast(second, 2, False)
    assert one is not None and two is not None and one.topic is two.topic == "cache/a"
    long_name = "l" * (codec.TOPIC_NAME_CACHE_BYTES + 1)
    assert codec._decode_publish_fast(encode(Publish(long_name, b""), 4), 3, False) is not None
    assert long_name.encode() not in codec._TOPIC_NAMES
    for index in range(codec.TOPIC_NAME_CACHE_ENTRIES + 10):
        codec._decode_publish_fast(encode(Publish(f"n/{index}", b""), 4), 2, False)
        assert len(codec._TOPIC_NAMES) <= codec.TOPIC_NAME_CACHE_ENTRIES
    # names that fail a check are not remembered, and fail again
    wildcard = encode(Publish("a", b""), 4).replace(b"\x01a", b"\x01+")
    assert codec._decode_publish_fast(wildcard, 2, False) is None
    assert codec._decode_publish_fast(wildcard, 2, False) is None
    assert b"+" not in codec._TOPIC_NAMES
