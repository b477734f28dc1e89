"""lb in front of a broker nobody here wrote: RabbitMQ with its MQTT plugin (Debian's 3.10).

The seed's bind line (mutual TLS through the intermediate to the root) and ``send-proxy-v2``
to RabbitMQ's MQTT listener with ``mqtt.proxy_protocol = true``. A device connects from
127.0.0.2 with its certificate, subscribes and publishes; RabbitMQ delivers, and reports the
device's own address and port (``rabbitmqctl list_mqtt_connections``), not lb's. Then two
RabbitMQ nodes clustered on this machine behind lb's round robin: a device on one node
receives what a device on the other publishes, both ways. That is how lb serves a fleet
that outgrows our own brokers: in front of an existing clustered broker.

RabbitMQ starts slowly, so both parts share one two-node cluster (tests/rabbitmq.py) in one
test. RabbitMQ 3.10 cannot take the PROXY v2 LOCAL command that health checks send by
default with ``send-proxy-v2`` (each check crashes a reader process: ``no match of right hand
side value #{command => local, version => 2}``), so the configuration has HAProxy's global
``pp2-never-send-local``: checks send a PROXY command with their own addresses instead, which
RabbitMQ takes. README says so; the test checks RabbitMQ logged no error.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bench.ports import free_port
from tests import rabbitmq
from tests.harness import run_lb
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(300)

DEVICE_ADDRESS = "127.0.0.2"  # devices connect from here; lb and RabbitMQ see 127.0.0.1
MQTT_TIMEOUT = 20.0
CONNECTION_PID = re.compile(r"<(?P<node>[^.@>]+@[^.>]+)\.")


def lb_config(pki: TestPKI, port: int, servers: Sequence[tuple[str, int]]) -> str:
    lines = "".join(
        f"    server {name} 127.0.0.1:{mqtt_port} send-proxy-v2 check inter 2s fall 2 rise 5\n"
        for name, mqtt_port in servers
    )
    return (
        "global\n    maxconn 5000\n    log stdout format raw local0\n"
        "    pp2-never-send-local\n"
        "defaults\n    mode tcp\n    log global\n    option tcplog\n"
        "    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n"
        "    timeout check 5s\n"
        "frontend emqx-tls\n"
        # seed 004's bind line, with the test PKI's files
        f"    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} ca-file {pki.intermediate} "
        f"ca-verify-file {pki.root} verify required\n"
        "    default_backend rabbitmq\n"
        "backend rabbitmq\n    balance roundrobin\n"
        "    default-server inter 10s downinter 5s rise 2 fall 2 slowstart 60s maxconn 500000 "
        "maxqueue 10000 weight 100\n" + lines
    )


class Device:
    """A paho client with a device certificate, connected through lb from DEVICE_ADDRESS."""

    def __init__(self, pki: TestPKI, number: int, port: int) -> None:
        files = pki.device(number)
        self.name = files.cn
        self.received: list[tuple[str, bytes]] = []
        self.heard = threading.Event()
        self.subscribed = threading.Event()
        self.connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.name, protocol=mqtt.MQTTv311
        )
        self.client.tls_set(
            ca_certs=str(pki.root), certfile=str(files.cert), keyfile=str(files.key)
        )
        self.client.on_connect = lambda *args: self.connected.set()
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30, bind_address=DEVICE_ADDRESS)
        self.client.loop_start()
        assert self.connected.wait(MQTT_TIMEOUT), f"{self.name}: no CONNACK through lb"
        socket = self.client.socket()
        assert socket is not None
        host, self.port = socket.getsockname()[:2]
        assert host == DEVICE_ADDRESS

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self.received.append((message.topic, message.payload))
        self.heard.set()

    @property
    def topic(self) -> str:
        return f"fleet/{self.name}/commands"

    def subscribe(self) -> None:
        self.subscribed.clear()
        self.client.subscribe(self.topic, qos=1)
        assert self.subscribed.wait(MQTT_TIMEOUT), f"{self.name}: no SUBACK"

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(MQTT_TIMEOUT)
        assert info.is_published(), f"{self.name}: no PUBACK for {topic}"

    def wait_for(self, payload: bytes) -> None:
        deadline = time.monotonic() + MQTT_TIMEOUT
        while (self.topic, payload) not in self.received:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{self.name} did not receive {payload!r}: {self.received}"
            self.heard.clear()
            self.heard.wait(min(remaining, 0.5))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def devices(pki: TestPKI, port: int, numbers: Sequence[int]) -> Iterator[list[Device]]:
    connected: list[Device] = []
    try:
        for number in numbers:
            connected.append(Device(pki, number, port))
        yield connected
    finally:
        for device in connected:
            device.close()


def rabbit_sees(node: rabbitmq.Node, device: Device) -> dict[str, str]:
    """The row of list_mqtt_connections for ``device``, as RabbitMQ reports it."""
    deadline = time.monotonic() + MQTT_TIMEOUT
    while True:
        rows = {row["client_id"]: row for row in node.mqtt_connections()}
        if device.name in rows:
            return rows[device.name]
        assert time.monotonic() < deadline, f"RabbitMQ does not list {device.name}: {rows}"
        time.sleep(0.5)


def single_node_through_lb(pki: TestPKI, node: rabbitmq.Node, directory: Path) -> None:
    port = free_port()
    with (
        run_lb(lb_config(pki, port, [("rabbit-1", node.mqtt_port)]), directory, port, "lb-one"),
        devices(pki, port, [1]) as (device,),
    ):
        device.subscribe()
        device.publish(device.topic, b'{"temperature": 21.5}')
        device.wait_for(b'{"temperature": 21.5}')
        row = rabbit_sees(node, device)
        # The device's own socket, from lb's PROXY v2 header; lb connects from 127.0.0.1.
        assert (row["peer_host"], int(row["peer_port"])) == (DEVICE_ADDRESS, device.port)
        assert row["conn_name"] == f"{DEVICE_ADDRESS}:{device.port} -> 127.0.0.1:{port}"


def cluster_through_lb(pki: TestPKI, nodes: Sequence[rabbitmq.Node], directory: Path) -> None:
    port = free_port()
    servers = [(f"rabbit-{n}", node.mqtt_port) for n, node in enumerate(nodes, start=1)]
    with (
        run_lb(lb_config(pki, port, servers), directory, port, "lb-cluster") as lb,
        devices(pki, port, [2, 3]) as (first, second),
    ):
        # Round robin put them on different nodes: each connection's process lives there.
        homes = []
        for device in (first, second):
            row = rabbit_sees(nodes[0], device)
            assert (row["peer_host"], int(row["peer_port"])) == (DEVICE_ADDRESS, device.port)
        for device in (first, second):
            pid = nodes[0].ctl("list_mqtt_connections", "client_id", "connection").stdout
            (line,) = [line for line in pid.splitlines() if line.startswith(device.name + "\t")]
            match = CONNECTION_PID.search(line)
            assert match is not None, line
            homes.append(match["node"])
        assert sorted(homes) == sorted(node.node for node in nodes), homes
        first.subscribe()
        second.subscribe()
        second.publish(first.topic, b"from the other node")
        first.wait_for(b"from the other node")
        first.publish(second.topic, b"and back")
        second.wait_for(b"and back")
    # lb's session lines name the server each device went to.
    servers_used = set(re.findall(r"rabbitmq/(rabbit-\d)", lb.stdout + lb.stderr))
    assert servers_used == {"rabbit-1", "rabbit-2"}, lb.stdout + lb.stderr


def test_lb_in_front_of_rabbitmq(pki: TestPKI, tmp_path: Path) -> None:
    problem = rabbitmq.available()
    if problem is not None:
        pytest.skip(problem)
    started = time.monotonic()
    with rabbitmq.cluster(tmp_path / "rabbitmq", 2) as nodes:
        cluster_seconds = time.monotonic() - started
        # (Joining the cluster logs errors of its own about the node being restarted.)
        marks = [len(node.log_text()) for node in nodes]
        single_node_through_lb(pki, nodes[0], tmp_path)
        cluster_through_lb(pki, nodes, tmp_path)
        # Nothing lb sent made RabbitMQ log an error (a LOCAL header would, see above).
        for node, mark in zip(nodes, marks, strict=True):
            assert rabbitmq.log_errors(node, mark) == [], node.log_text()[mark:][-3000:]
    print(
        f"RabbitMQ {rabbitmq.version()}: two-node cluster up in {cluster_seconds:.1f}s, "
        f"whole test {time.monotonic() - started:.1f}s"
    )
