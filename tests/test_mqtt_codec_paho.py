"""MQTT codec against a real peer: a paho-mqtt client talks to a throwaway server on
127.0.0.1 that decodes with MQTTDecoder and answers with encode(), at levels 3, 4 and 5.

What paho sends (CONNECT with will and credentials, SUBSCRIBE with options, PUBLISH with
properties, PUBACK, DISCONNECT) must decode to the expected packets, and what we send back
(CONNACK, SUBACK, PUBLISH, PUBACK) must be accepted by paho.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker.mqtt import (
    NEED_DATA,
    Connack,
    Connect,
    Disconnect,
    MQTTDecoder,
    Packet,
    Properties,
    Puback,
    Publish,
    Suback,
    Subscribe,
    encode,
)

pytestmark = pytest.mark.timeout(30)
WAIT = 10.0


class CaptureServer:
    """Accepts one connection, decodes everything, and plays a minimal broker."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.received: list[Packet] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.listener.settimeout(WAIT)
            connection, _ = self.listener.accept()
            with connection:
                connection.settimeout(WAIT)
                self._serve(connection)
        except BaseException as error:  # reported by the test thread
            self.error = error
        finally:
            self.listener.close()

    def _serve(self, connection: socket.socket) -> None:
        decoder = MQTTDecoder()
        level = 4
        while data := connection.recv(65536):
            decoder.feed(data)
            while (packet := decoder.next_event()) is not NEED_DATA:
                self.received.append(packet)
                replies: list[Packet] = []
                if isinstance(packet, Connect):
                    level = packet.protocol_level
                    replies.append(Connack(False, 0, Properties(receive_maximum=10)))
                elif isinstance(packet, Subscribe):
                    granted = tuple(s.qos for s in packet.subscriptions)
                    replies.append(Suback(packet.packet_id, granted))
                    replies.append(
                        Publish(
                            "dev/cmd",
                            b"reboot",
                            1,
                            packet_id=7,
                            properties=Properties(
                                content_type="text/plain", user_properties=(("from", "ours"),)
                            ),
                        )
                    )
                elif isinstance(packet, Publish) and packet.qos == 1:
                    assert packet.packet_id is not None
                    replies.append(Puback(packet.packet_id))
                elif isinstance(packet, Disconnect):
                    return
                connection.sendall(b"".join(encode(reply, level) for reply in replies))


PROTOCOLS = [
    pytest.param(mqtt.MQTTv31, 3, id="3.1"),
    pytest.param(mqtt.MQTTv311, 4, id="3.1.1"),
    pytest.param(mqtt.MQTTv5, 5, id="5.0"),
]


@pytest.mark.parametrize(("protocol", "level"), PROTOCOLS)
def test_paho_client_session(protocol: Any, level: int) -> None:
    server = CaptureServer()
    v5 = level == 5
    connected = threading.Event()
    subscribed = threading.Event()
    got_message = threading.Event()
    messages: list[Any] = []

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id="device-17",
        protocol=protocol,
        clean_session=None if v5 else True,  # 5.0 sets clean start on connect() instead
    )
    client.username_pw_set("device-17", "secret")
    will_properties = None
    if v5:
        will_properties = PahoProperties(PacketTypes.WILLMESSAGE)
        will_properties.WillDelayInterval = 5
    client.will_set("dev/status", b"offline", qos=1, retain=True, properties=will_properties)
    client.on_connect = lambda *args: connected.set()
    client.on_subscribe = lambda *args: subscribed.set()

    def on_message(_client: Any, _userdata: Any, message: Any) -> None:
        messages.append(message)
        got_message.set()

    client.on_message = on_message
    connect_properties = None
    if v5:
        connect_properties = PahoProperties(PacketTypes.CONNECT)
        connect_properties.SessionExpiryInterval = 300
        connect_properties.UserProperty = ("site", "lab")
    client.connect("127.0.0.1", server.port, keepalive=30, properties=connect_properties)
    client.loop_start()
    try:
        assert connected.wait(WAIT), server.error
        if v5:
            options = SubscribeOptions(
                qos=1, noLocal=True, retainAsPublished=True, retainHandling=2
            )
            client.subscribe([("dev/cmd", options), ("dev/+/cfg", SubscribeOptions(qos=2))])
        else:
            client.subscribe([("dev/cmd", 1), ("dev/+/cfg", 2)])
        assert subscribed.wait(WAIT), server.error
        assert got_message.wait(WAIT), server.error
        publish_properties = None
        if v5:
            publish_properties = PahoProperties(PacketTypes.PUBLISH)
            publish_properties.MessageExpiryInterval = 60
            publish_properties.ResponseTopic = "dev/reply"
            publish_properties.CorrelationData = b"\x01\x02"
            publish_properties.UserProperty = [("a", "1"), ("a", "2")]
        info = client.publish("dev/telemetry", b"t=21.5", qos=1, properties=publish_properties)
        info.wait_for_publish(WAIT)
        client.disconnect()
    finally:
        client.loop_stop()
    server.thread.join(WAIT)
    assert server.error is None, server.error

    # What paho sent, as we decoded it.
    connect, subscribe, puback, publish, disconnect = server.received
    assert isinstance(connect, Connect)
    assert connect.protocol_level == level
    assert connect.protocol_name == ("MQIsdp" if level == 3 else "MQTT")
    assert (connect.client_id, connect.username, connect.password) == (
        "device-17",
        "device-17",
        b"secret",
    )
    assert connect.keep_alive == 30
    assert connect.clean_start
    assert connect.will is not None
    assert (connect.will.topic, connect.will.payload) == ("dev/status", b"offline")
    assert (connect.will.qos, connect.will.retain) == (1, True)
    if v5:
        assert connect.properties.session_expiry_interval == 300
        assert connect.properties.user_properties == (("site", "lab"),)
        assert connect.will.properties.will_delay_interval == 5

    assert isinstance(subscribe, Subscribe)
    assert [(s.topic_filter, s.qos) for s in subscribe.subscriptions] == [
        ("dev/cmd", 1),
        ("dev/+/cfg", 2),
    ]
    if v5:
        first = subscribe.subscriptions[0]
        assert (first.no_local, first.retain_as_published, first.retain_handling) == (
            True,
            True,
            2,
        )

    assert puback == Puback(7)  # paho acknowledged the PUBLISH we encoded

    assert isinstance(publish, Publish)
    assert (publish.topic, publish.payload, publish.qos) == ("dev/telemetry", b"t=21.5", 1)
    assert publish.packet_id is not None
    if v5:
        assert publish.properties.message_expiry_interval == 60
        assert publish.properties.response_topic == "dev/reply"
        assert publish.properties.correlation_data == b"\x01\x02"
        assert publish.properties.user_properties == (("a", "1"), ("a", "2"))

    assert disconnect == Disconnect()

    # What we sent, as paho decoded it.
    (message,) = messages
    assert (message.topic, message.payload, message.qos) == ("dev/cmd", b"reboot", 1)
    if v5:
        assert message.properties.ContentType == "text/plain"
        assert message.properties.UserProperty == [("from", "ours")]
