"""MQTT codec under hypothesis: every packet type round-trips at levels 3, 4 and 5, and any
bytes at all (random, or a valid stream with bytes changed) raise only MQTTProtocolError."""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.mqtt import (
    EMPTY_PROPERTIES,
    NEED_DATA,
    Auth,
    Connack,
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
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
    codec,
    encode,
)
from broker.mqtt.codec import _REASONS
from broker.mqtt.properties import PROPERTY_TABLE, WILL_PROPERTIES
from broker.mqtt.wire import Reader

pytestmark = pytest.mark.timeout(120)
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
level_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00/+#"), max_size=6)
topic_names = st.lists(level_text, min_size=1, max_size=4).map("/".join).filter(bool)
topic_filters = st.lists(level_text | st.just("+"), min_size=1, max_size=4).map("/".join)
topic_filters = st.tuples(topic_filters, st.booleans()).map(
    lambda pair: (pair[0] + "/#" if pair[1] else pair[0]) or "#"
)
packet_ids = st.integers(1, 0xFFFF)
qos = st.integers(0, 2)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
_BY_KIND: dict[int, st.SearchStrategy[Any]] = {
    0: st.integers(0, 1),
    1: u16,
    2: u32,
    3: st.integers(1, 268_435_455),
    4: text,
    5: st.binary(max_size=8),
}
ACKS: dict[int, type[Puback | Pubrec | Pubrel | Pubcomp]] = {
    PacketType.PUBACK: Puback,
    PacketType.PUBREC: Pubrec,
    PacketType.PUBREL: Pubrel,
    PacketType.PUBCOMP: Pubcomp,
}
_NON_ZERO = {"receive_maximum", "topic_alias", "maximum_packet_size"}


@cache
def properties_for(key: int) -> st.SearchStrategy[Properties]:
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, kind, allowed in PROPERTY_TABLE.values():
        if key not in allowed:
            continue
        if kind == 6:
            fields[name] = st.lists(st.tuples(text, text), max_size=3).map(tuple)
        elif kind == 3:
            most = 5 if key == PacketType.PUBLISH else 1
            fields[name] = st.lists(_BY_KIND[kind], max_size=most).map(tuple)
        else:
            value = _BY_KIND[kind]
            if name in _NON_ZERO:
                value = value.filter(bool)
            fields[name] = st.none() | value

    def fix(properties: Properties) -> Properties:
        if properties.authentication_data is not None and properties.authentication_method is None:
            return Properties(
                **{
                    name: getattr(properties, name)
                    for name in Properties.__slots__
                    if name != "authentication_data"
                }
            )
        return properties

    return st.one_of(st.just(EMPTY_PROPERTIES), st.builds(Properties, **fields).map(fix))


def reasons(packet_type: PacketType) -> st.SearchStrategy[int]:
    return st.sampled_from(sorted(_REASONS[packet_type]))


@st.composite
def packets(draw: st.DrawFn, level: int, only: PacketType | None = None) -> Packet:
    v5 = level == 5

    def props(key: int) -> Properties:
        return draw(properties_for(key)) if v5 else EMPTY_PROPERTIES

    kinds = list(PacketType) if v5 else [t for t in PacketType if t != PacketType.AUTH]
    kind = only or draw(st.sampled_from(kinds))
    if kind == PacketType.CONNECT:
        will = None
        if draw(st.booleans()):
            will = Will(
                draw(topic_names),
                draw(st.binary(max_size=20)),
                draw(qos),
                draw(st.booleans()),
                props(WILL_PROPERTIES),
            )
        username = draw(st.none() | text)
        password = draw(st.none() | st.binary(max_size=10))
        if not v5 and username is None:
            password = None
        client_id = draw(text)
        clean_start = draw(st.booleans())
        if level == 3:
            client_id = client_id or "c"
        elif level == 4 and not client_id:
            clean_start = True
        name = "MQIsdp" if level == 3 else "MQTT"
        return Connect(
            name,
            level,
            clean_start,
            draw(u16),
            client_id,
            username,
            password,
            will,
            props(PacketType.CONNECT),
        )
    if kind == PacketType.CONNACK:
        code = draw(reasons(kind)) if v5 else draw(st.integers(0, 5))
        return Connack(draw(st.booleans()) and code == 0, code, props(kind))
    if kind == PacketType.PUBLISH:
        level_qos = draw(qos)
        properties = props(kind)
        topic = draw(topic_names)
        if properties.topic_alias is not None and draw(st.booleans()):
            topic = ""
        return Publish(
            topic,
            draw(st.binary(max_size=300)),
            level_qos,
            draw(st.booleans()),
            draw(st.booleans()) and level_qos > 0,
            draw(packet_ids) if level_qos else None,
            properties,
        )
    if kind in ACKS:
        return ACKS[kind](draw(packet_ids), draw(reasons(kind)) if v5 else 0, props(kind))
    if kind == PacketType.SUBSCRIBE:
        subscriptions = []
        for topic_filter in draw(st.lists(topic_filters, min_size=1, max_size=4)):
            if v5:
                subscriptions.append(
                    Subscription(
                        topic_filter,
                        draw(qos),
                        draw(st.booleans()),
                        draw(st.booleans()),
                        draw(st.integers(0, 2)),
                    )
                )
            else:
                subscriptions.append(Subscription(topic_filter, draw(qos)))
        return Subscribe(draw(packet_ids), tuple(subscriptions), props(kind))
    if kind == PacketType.SUBACK:
        codes = reasons(kind) if v5 else st.sampled_from([0, 1, 2, 0x80])
        return Suback(draw(packet_ids), tuple(draw(st.lists(codes, min_size=1))), props(kind))
    if kind == PacketType.UNSUBSCRIBE:
        filters = tuple(draw(st.lists(topic_filters, min_size=1, max_size=4)))
        return Unsubscribe(draw(packet_ids), filters, props(kind))
    if kind == PacketType.UNSUBACK:
        if not v5:
            return Unsuback(draw(packet_ids))
        unsuback_codes = tuple(draw(st.lists(reasons(kind), min_size=1)))
        return Unsuback(draw(packet_ids), unsuback_codes, props(kind))
    if kind == PacketType.PINGREQ:
        return Pingreq()
    if kind == PacketType.PINGRESP:
        return Pingresp()
    if kind == PacketType.DISCONNECT:
        return Disconnect(draw(reasons(kind)) if v5 else 0, props(kind))
    return Auth(draw(reasons(kind)), props(kind))


def decode_stream(data: bytes, level: int | None, chunk: int) -> list[Packet]:
    decoder = MQTTDecoder(protocol_level=level)
    out: list[Packet] = []
    for start in range(0, len(data), chunk):
        decoder.feed(data[start : start + chunk])
        while (event := decoder.next_event()) is not NEED_DATA:
            out.append(event)
    assert decoder.trailing_data == b""
    return out


@pytest.mark.parametrize("level", [3, 4, 5])
@SETTINGS
@given(data=st.data())
def test_round_trip(level: int, data: st.DataObject) -> None:
    sequence = data.draw(st.lists(packets(level), min_size=1, max_size=5))
    sequence = [p for p in sequence if not isinstance(p, Connect)]
    # The server decodes a stream opened by CONNECT; the level comes from it.
    connect = data.draw(packets(level, PacketType.CONNECT))
    wire = b"".join(encode(packet, level) for packet in [connect, *sequence])
    chunk = data.draw(st.sampled_from([len(wire), 1, 5]))
    assert decode_stream(wire, None, chunk) == [connect, *sequence]
    # A client-side decoder created at the level gets the same packets.
    if sequence:
        tail = b"".join(encode(packet, level) for packet in sequence)
        assert decode_stream(tail, level, len(tail)) == sequence


def _only_protocol_errors(data: bytes, level: int | None, chunk: int) -> None:
    decoder = MQTTDecoder(protocol_level=level, max_packet_size=4096)
    try:
        for start in range(0, len(data), chunk):
            decoder.feed(data[start : start + chunk])
            while decoder.next_event() is not NEED_DATA:
                pass
    except MQTTProtocolError as error:
        assert isinstance(error.reason_code, int)
        with pytest.raises(MQTTProtocolError):
            decoder.feed(b"\x00")


@settings(max_examples=500, deadline=None)
@given(
    data=st.binary(max_size=200),
    level=st.sampled_from([None, 3, 4, 5]),
    chunk=st.sampled_from([1, 3, 1000]),
)
def test_random_bytes_raise_only_protocol_errors(
    data: bytes, level: int | None, chunk: int
) -> None:
    _only_protocol_errors(data, level, chunk)


@pytest.mark.parametrize("level", [3, 4, 5])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_streams_raise_only_protocol_errors(level: int, data: st.DataObject) -> None:
    # Valid packets with a few bytes overwritten, inserted or dropped reach deep into parsing.
    sequence = data.draw(st.lists(packets(level), min_size=1, max_size=3))
    wire = bytearray(b"".join(encode(packet, level) for packet in sequence))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(wire)))
        action = data.draw(st.sampled_from(["set", "insert", "delete"]))
        if action == "insert":
            wire.insert(position, data.draw(st.integers(0, 255)))
        elif position < len(wire):
            if action == "set":
                wire[position] = data.draw(st.integers(0, 255))
            else:
                del wire[position]
    _only_protocol_errors(bytes(wire), level, data.draw(st.sampled_from([1, 7, len(wire) + 1])))


def _general_connect(packet: bytes, pos: int) -> Connect | MQTTProtocolError:
    with memoryview(packet) as view:
        try:
            return codec._decode_connect(Reader(view, pos, len(packet)))
        except MQTTProtocolError as error:
            return error


def _fast_connect(packet: bytes, pos: int) -> Connect | MQTTProtocolError | None:
    try:
        return codec._decode_connect_fast(packet, pos)
    except MQTTProtocolError as error:
        return error


def _same(fast: Connect | MQTTProtocolError | None, general: Connect | MQTTProtocolError) -> None:
    """The fast CONNECT decoder gives the general one's record or error, or defers (None)."""
    if fast is None:
        return
    if isinstance(general, MQTTProtocolError):
        assert isinstance(fast, MQTTProtocolError), fast
        assert (fast.reason_code, str(fast), fast.protocol_level) == (
            general.reason_code,
            str(general),
            general.protocol_level,
        )
    else:
        assert fast == general


@pytest.mark.parametrize("level", [3, 4, 5])
@SETTINGS
@given(data=st.data())
def test_connect_fast_path_agrees_with_the_general_one(level: int, data: st.DataObject) -> None:
    connect = data.draw(packets(level, PacketType.CONNECT))
    wire = bytearray(encode(connect, level))
    pos = 2 if wire[1] < 0x80 else 3 if wire[2] < 0x80 else 4
    # Valid as encoded: the fast path gives the same record (3.1 and will properties defer).
    fast = _fast_connect(bytes(wire), pos)
    assert fast is None or fast == connect
    if level != 3 and connect.will is None:
        assert fast == connect
    # Changed bytes: the same record or the same error as the general path, or a deferral.
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(pos, len(wire) - 1))
        wire[position] = data.draw(st.integers(0, 255))
    _same(_fast_connect(bytes(wire), pos), _general_connect(bytes(wire), pos))
