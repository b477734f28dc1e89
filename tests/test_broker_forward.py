"""Forwarding a received PUBLISH as its own bytes (issue 13), checked byte for byte.

The broker keeps the bytes of a PUBLISH without properties (``Publish.raw``,
``Message.raw``) and sends them unchanged, or with the packet identifier spliced in, when a
subscriber's encoding is the publisher's. Every case where that would be wrong is here, over
real sockets: each test reads the exact bytes a subscriber gets and compares them with what
the spec asks for (our encoder's output for the PUBLISH the subscriber must see). Topic
aliases, subscription identifiers, retain-as-published, DUP, QoS downgrade, 3.1.1 <-> 5.0,
retained and queued deliveries, wills, the client's Maximum Packet Size; messages that crossed
the cluster link are in test_broker_cluster.py. paho-mqtt and mosquitto_pub/mosquitto_sub
check that real clients read what we forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker.mqtt import (
    RAW_PUBLISH_MAX,
    Disconnect,
    MQTTDecoder,
    Properties,
    Publish,
    Subscribe,
    Subscription,
    Will,
    encode,
)
from broker.mqtt.codec import _decode_publish_fast, publish_forward_parts
from tests.broker_harness import (
    BrokerThread,
    WireClient,
    make_config,
    running_broker,
    wait_for,
)

pytestmark = pytest.mark.timeout(30)

MOSQUITTO_PUB = shutil.which("mosquitto_pub")
MOSQUITTO_SUB = shutil.which("mosquitto_sub")


@pytest.fixture
def node() -> Iterator[BrokerThread]:
    with running_broker() as node:
        yield node


def wire(node: BrokerThread, level: int, client_id: str, **fields: Any) -> WireClient:
    client = WireClient(node.port(), level)
    client.connect(client_id, **fields)
    return client


def published(level: int, publish: Publish) -> bytes:
    """The bytes a subscriber at `level` must get for `publish` (our encoder, checked
    against the spec by test_mqtt_codec.py)."""
    return encode(publish, level)


# --- the codec's part ---------------------------------------------------------------------


@pytest.mark.parametrize("level", [3, 4, 5])
def test_decoded_publish_keeps_its_bytes_only_when_they_can_be_forwarded(level: int) -> None:
    plain = encode(Publish("a/b", b"x", qos=1, packet_id=9, dup=True), level)
    large = encode(Publish("a/b", bytes(RAW_PUBLISH_MAX)), level)
    decoder = MQTTDecoder(protocol_level=level)
    decoder.feed(plain + large)
    first, second = decoder.next_event(), decoder.next_event()
    assert isinstance(first, Publish) and first.raw == plain
    # above the bound the packet decodes from the buffer and keeps nothing
    assert (
        isinstance(second, Publish)
        and second.raw is None
        and second.payload == bytes(RAW_PUBLISH_MAX)
    )
    if level == 5:
        with_properties = encode(Publish("a", b"", properties=Properties(topic_alias=1)), 5)
        decoder.feed(with_properties)
        third = decoder.next_event()
        assert isinstance(third, Publish) and third.raw is None


def test_a_changed_copy_of_a_publish_drops_its_bytes() -> None:
    raw = encode(Publish("a/b", b"x"), 4)
    publish = _decode_publish_fast(raw, 2, False)
    assert publish is not None and publish.raw == raw
    assert dataclasses.replace(publish, topic="c").raw is None
    assert Publish("a/b", b"x").raw is None


@pytest.mark.parametrize("level", [4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("retain", [False, True])
@pytest.mark.parametrize("dup", [False, True])
def test_forward_parts_are_the_encoded_publish(
    level: int, qos: int, retain: bool, dup: bool
) -> None:
    if dup and not qos:
        return
    for topic, payload in (("a/b", b"x"), ("t" * 200, bytes(300))):
        received = encode(
            Publish(topic, payload, qos, not retain, dup, 777 if qos else None), level
        )
        head, tail = publish_forward_parts(received, retain)
        sent = head if not qos else head + (5).to_bytes(2, "big") + tail
        assert sent == encode(
            Publish(topic, payload, qos, retain, False, 5 if qos else None), level
        )


# --- over sockets -------------------------------------------------------------------------


@pytest.mark.parametrize(("publisher_level", "subscriber_level"), [(4, 4), (3, 4), (5, 5), (4, 3)])
def test_qos0_same_encoding_arrives_byte_for_byte(
    node: BrokerThread, publisher_level: int, subscriber_level: int
) -> None:
    subscriber = wire(node, subscriber_level, "sub")
    subscriber.subscribe(Subscription("f/#", 0))
    publisher = wire(node, publisher_level, "pub")
    sent = encode(Publish("f/1", b"\x00\xffpayload"), publisher_level)
    publisher.send_bytes(sent * 3)
    for _ in range(3):
        assert subscriber.packet() == sent


@pytest.mark.parametrize(("publisher_level", "subscriber_level"), [(5, 4), (4, 5), (3, 5)])
def test_other_level_gets_its_own_encoding(
    node: BrokerThread, publisher_level: int, subscriber_level: int
) -> None:
    subscriber = wire(node, subscriber_level, "sub")
    subscriber.subscribe(Subscription("f/#", 1))
    publisher = wire(node, publisher_level, "pub")
    publisher.send(Publish("f/1", b"p"))
    publisher.send(Publish("f/1", b"q", 1, packet_id=300))
    assert subscriber.packet() == published(subscriber_level, Publish("f/1", b"p"))
    assert subscriber.packet() == published(subscriber_level, Publish("f/1", b"q", 1, packet_id=1))


@pytest.mark.parametrize("level", [4, 5])
def test_same_qos_gets_its_own_packet_id_and_dup_cleared(node: BrokerThread, level: int) -> None:
    subscriber = wire(node, level, "sub")
    subscriber.subscribe(Subscription("q/#", 2))
    publisher = wire(node, level, "pub")
    # the publisher's resend (DUP=1) of its packet 4242 is our first delivery: DUP=0, our id
    publisher.send(Publish("q/1", b"one", 1, dup=True, packet_id=4242))
    publisher.send(Publish("q/2", b"two", 2, packet_id=4243))
    assert subscriber.packet() == published(level, Publish("q/1", b"one", 1, packet_id=1))
    assert subscriber.packet() == published(level, Publish("q/2", b"two", 2, packet_id=2))


@pytest.mark.parametrize("level", [4, 5])
def test_downgraded_to_the_granted_qos(node: BrokerThread, level: int) -> None:
    subscriber = wire(node, level, "sub")
    subscriber.subscribe(Subscription("d/#", 0))
    publisher = wire(node, level, "pub")
    publisher.send(Publish("d/1", b"x", 2, packet_id=17))
    publisher.send(Publish("d/1", b"y", 1, packet_id=18))
    assert subscriber.packet() == published(level, Publish("d/1", b"x"))
    assert subscriber.packet() == published(level, Publish("d/1", b"y"))


def test_retain_flag_as_each_subscriber_must_see_it(node: BrokerThread) -> None:
    old = wire(node, 4, "v311")
    old.subscribe(Subscription("r/#", 0))
    as_published = wire(node, 5, "rap")
    as_published.subscribe(Subscription("r/#", 0, retain_as_published=True))
    cleared = wire(node, 5, "norap")
    cleared.subscribe(Subscription("r/#", 0))
    publisher = wire(node, 4, "pub")
    publisher.send(Publish("r/1", b"kept", retain=True))
    # a live delivery has RETAIN 0 unless the subscription asked for it (5.0 section 3.3.1.3)
    assert old.packet() == published(4, Publish("r/1", b"kept"))
    assert cleared.packet() == published(5, Publish("r/1", b"kept"))
    assert as_published.packet() == published(5, Publish("r/1", b"kept", retain=True))
    # a new subscription gets the retained message with RETAIN 1, in its own encoding
    for level in (4, 5):
        late = wire(node, level, f"late{level}")
        late.send(Subscribe(1, (Subscription("r/#", 0),)))
        assert late.packet()[0] == 0x90
        assert late.packet() == published(level, Publish("r/1", b"kept", retain=True))
        late.close()


def test_publisher_topic_alias_never_reaches_a_subscriber() -> None:
    with running_broker(make_config(mqtt={"topic_alias_maximum": 4})) as node:
        v5 = wire(node, 5, "s5")
        v5.subscribe(Subscription("alias/#", 0))
        v311 = wire(node, 4, "s4")
        v311.subscribe(Subscription("alias/#", 0))
        publisher = wire(node, 5, "pub")
        publisher.send(Publish("alias/topic", b"1", properties=Properties(topic_alias=2)))
        publisher.send(Publish("", b"2", properties=Properties(topic_alias=2)))
        for payload in (b"1", b"2"):
            assert v5.packet() == published(5, Publish("alias/topic", payload))
            assert v311.packet() == published(4, Publish("alias/topic", payload))


def test_subscriber_topic_aliases_are_ours() -> None:
    with running_broker(make_config()) as node:
        subscriber = wire(node, 5, "s", properties=Properties(topic_alias_maximum=2))
        subscriber.subscribe(Subscription("t/#", 0))
        publisher = wire(node, 5, "pub")
        publisher.send(Publish("t/1", b"a"))
        publisher.send(Publish("t/1", b"b"))
        assert subscriber.packet() == published(
            5, Publish("t/1", b"a", properties=Properties(topic_alias=1))
        )
        assert subscriber.packet() == published(
            5, Publish("", b"b", properties=Properties(topic_alias=1))
        )


def test_subscription_identifier_is_added(node: BrokerThread) -> None:
    subscriber = wire(node, 5, "s")
    subscriber.subscribe(Subscription("id/#", 1), identifier=12)
    plain = wire(node, 5, "plain")
    plain.subscribe(Subscription("id/#", 1))
    publisher = wire(node, 5, "pub")
    publisher.send(Publish("id/1", b"x"))
    publisher.send(Publish("id/1", b"y", 1, packet_id=5))
    with_id = Properties(subscription_identifiers=(12,))
    assert subscriber.packet() == published(5, Publish("id/1", b"x", properties=with_id))
    assert subscriber.packet() == published(
        5, Publish("id/1", b"y", 1, packet_id=1, properties=with_id)
    )
    assert plain.packet() == published(5, Publish("id/1", b"x"))
    assert plain.packet() == published(5, Publish("id/1", b"y", 1, packet_id=1))


def test_message_expiry_is_counted_down_not_forwarded(node: BrokerThread) -> None:
    session = Properties(session_expiry_interval=300)
    offline = wire(node, 5, "off", properties=session)
    offline.subscribe(Subscription("e/#", 1))
    offline.close()
    wait_for(lambda: node.call(lambda: node.broker.sessions["off"].connection is None))
    publisher = wire(node, 5, "pub")
    publisher.send(
        Publish("e/1", b"x", 1, packet_id=3, properties=Properties(message_expiry_interval=60))
    )
    assert publisher.packet()[0] == 0x40  # PUBACK
    time.sleep(1.1)
    back = WireClient(node.port(), 5)
    back.connect("off", clean=False, properties=session)
    data = back.packet()
    decoder = MQTTDecoder(protocol_level=5)
    decoder.feed(data)
    message = decoder.next_event()
    assert isinstance(message, Publish) and message.payload == b"x"
    remaining = message.properties.message_expiry_interval
    assert remaining is not None and 1 <= remaining <= 59
    assert data == published(
        5,
        Publish(
            "e/1", b"x", 1, packet_id=1, properties=Properties(message_expiry_interval=remaining)
        ),
    )


@pytest.mark.parametrize("level", [4, 5])
def test_queued_while_offline_then_delivered_with_a_fresh_packet_id(
    node: BrokerThread, level: int
) -> None:
    fields: dict[str, Any] = (
        {"properties": Properties(session_expiry_interval=300)} if level == 5 else {}
    )
    offline = wire(node, level, "off", clean=False, **fields)
    offline.subscribe(Subscription("o/#", 1))
    offline.close()
    wait_for(lambda: node.call(lambda: node.broker.sessions["off"].connection is None))
    publisher = wire(node, level, "pub")
    publisher.send(Publish("o/1", b"queued", 1, dup=True, retain=True, packet_id=999))
    assert publisher.packet()[0] == 0x40
    back = WireClient(node.port(), level)
    back.connect("off", clean=False, **fields)
    assert back.packet() == published(level, Publish("o/1", b"queued", 1, packet_id=1))


def test_client_maximum_packet_size_still_applies(node: BrokerThread) -> None:
    small = wire(node, 5, "small", properties=Properties(maximum_packet_size=20))
    small.subscribe(Subscription("m/#", 0))
    publisher = wire(node, 5, "pub")
    too_big = encode(Publish("m/1", bytes(16)), 5)
    fits = encode(Publish("m/1", b"ok"), 5)
    assert len(too_big) > 20 >= len(fits)
    publisher.send_bytes(too_big + fits)
    assert small.packet() == fits
    assert small.nothing()


@pytest.mark.parametrize("level", [4, 5])
def test_will_is_encoded_for_each_subscriber(node: BrokerThread, level: int) -> None:
    v311 = wire(node, 4, "s4")
    v311.subscribe(Subscription("will/#", 1))
    v5 = wire(node, 5, "s5")
    v5.subscribe(Subscription("will/#", 0))
    dying = wire(node, level, "dying", will=Will("will/dying", b"gone", 1, False))
    dying.close()  # no DISCONNECT: the will is published
    assert v311.packet() == published(4, Publish("will/dying", b"gone", 1, packet_id=1))
    assert v5.packet() == published(5, Publish("will/dying", b"gone"))


def test_one_message_to_subscribers_of_every_kind(node: BrokerThread) -> None:
    """Fan-out: the bytes made for one subscriber (forwarded or encoded) are shared with the
    next one of the same kind, and never given to one of another kind."""
    kinds = [
        (4, Subscription("k/#", 0), None),
        (4, Subscription("k/#", 1), None),
        (5, Subscription("k/#", 0), None),
        (5, Subscription("k/#", 1, retain_as_published=True), None),
        (5, Subscription("k/#", 2), 3),
        (3, Subscription("k/#", 2), None),
    ]
    subscribers = []
    for index, (level, subscription, identifier) in enumerate(kinds * 2):
        client = wire(node, level, f"s{index}")
        client.subscribe(subscription, identifier=identifier)
        subscribers.append((client, level, subscription, identifier))
    publisher = wire(node, 5, "pub")
    publisher.send(Publish("k/1", b"m", 2, retain=True, dup=True, packet_id=77))
    for client, level, subscription, identifier in subscribers:
        qos = subscription.qos
        properties = Properties(
            subscription_identifiers=() if identifier is None else (identifier,)
        )
        expected = Publish(
            "k/1",
            b"m",
            qos,
            subscription.retain_as_published,
            False,
            1 if qos else None,
            properties if level == 5 else Properties(),
        )
        assert client.packet() == published(level, expected), (level, subscription)


def test_paho_reads_what_is_forwarded(node: BrokerThread) -> None:
    got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    clients = []
    for protocol in (MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5):
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
        client.on_message = lambda c, u, message: got.put(message)
        client.connect("127.0.0.1", node.port())
        client.loop_start()
        clients.append(client)
    try:
        wait_for(lambda: all(client.is_connected() for client in clients))
        for client in clients:
            if client.protocol == MQTTProtocolVersion.MQTTv5:
                client.subscribe("p/#", options=SubscribeOptions(qos=1, retainAsPublished=True))
            else:
                client.subscribe("p/#", 1)
        wait_for(lambda: node.call(lambda: node.broker.subscriptions.count_for("p/#") == 2))
        for level in (4, 5):
            publisher = wire(node, level, f"pub{level}")
            publisher.send(Publish("p/x", b"zero"))
            publisher.send(Publish("p/x", b"one", 1, retain=True, packet_id=9))
            assert publisher.packet()[0] == 0x40
            received = sorted(
                (message.payload, message.qos, message.retain)
                for message in (got.get(timeout=5) for _ in range(4))
            )
            # 3.1.1 sees RETAIN 0 on a live delivery, 5.0 with retain-as-published sees 1
            assert received == [
                (b"one", 1, False),
                (b"one", 1, True),
                (b"zero", 0, False),
                (b"zero", 0, False),
            ]
            publisher.close()
    finally:
        for client in clients:
            client.disconnect()
            client.loop_stop()


@pytest.mark.skipif(MOSQUITTO_SUB is None or MOSQUITTO_PUB is None, reason="mosquitto clients")
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_clients_read_what_is_forwarded(node: BrokerThread, version: str) -> None:
    assert MOSQUITTO_SUB is not None and MOSQUITTO_PUB is not None
    port = str(node.port())
    subscriber = subprocess.Popen(
        [MOSQUITTO_SUB, "-h", "127.0.0.1", "-p", port, "-V", version, "-t", "mq/#", "-v",
         "-C", "3", "-W", "10", "-q", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for(lambda: node.call(lambda: node.broker.subscriptions.count_for("mq/#") == 1))
        for qos, text in ((0, "zero"), (1, "one"), (2, "two")):
            subprocess.run(
                [MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", port, "-V", version, "-t", "mq/t",
                 "-m", text, "-q", str(qos)],
                check=True,
                timeout=10,
            )  # fmt: skip
        out, err = subscriber.communicate(timeout=15)
    finally:
        if subscriber.poll() is None:
            subscriber.kill()
            subscriber.wait(5)
    assert out.decode().splitlines() == ["mq/t zero", "mq/t one", "mq/t two"], err


@pytest.mark.parametrize("qos", [0, 1])
def test_retained_publish_refused_when_retain_is_not_available(qos: int) -> None:
    with running_broker(make_config(mqtt={"retain_available": False})) as node:
        subscriber = wire(node, 5, "s")
        subscriber.subscribe(Subscription("n/#", 0))
        publisher = wire(node, 5, "pub")
        publisher.send(Publish("n/1", b"plain", qos, packet_id=1 if qos else None))
        assert subscriber.packet() == published(5, Publish("n/1", b"plain"))
        publisher.send(Publish("n/1", b"kept", qos, retain=True, packet_id=2 if qos else None))
        received = []
        with contextlib.suppress(AssertionError):  # until the broker closes
            for _ in range(3):
                received.append(publisher.packet())
        # 5.0 section 3.3.1.3: DISCONNECT with Retain not supported (0x9A), then the close
        assert received[:qos] == [b"\x40\x02\x00\x01"] * qos and len(received) == qos + 1
        decoder = MQTTDecoder(protocol_level=5)
        decoder.feed(received[-1])
        disconnect = decoder.next_event()
        assert isinstance(disconnect, Disconnect) and disconnect.reason_code == 0x9A
        assert subscriber.nothing()
