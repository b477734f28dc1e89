"""Three broker nodes as real processes (`broker -c FILE`) clustered over mutual TLS (seed 002),
driven by paho-mqtt and mosquitto_pub/mosquitto_sub on 127.0.0.1.

Covers: links up between every pair; QoS 0/1/2 across nodes with no loss and no duplicates;
retained messages cluster-wide; a subscription known to the other nodes within a second;
client id takeover across nodes; a node killed with SIGKILL and restarted rejoins; a wrong
cookie and a node certificate from a rogue CA are refused and logged; a key readable by
group/others stops the node with a message naming the file and `chmod 600`.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from bench.ports import free_port
from broker.cluster import default_rpc_port
from broker.config import load_config
from broker.mqtt import Connack, Connect, Properties, Publish, Subscribe, Subscription, encode
from lb.pki.certs import make_intermediate, make_node, make_root, write_certs, write_key
from tests.broker_harness import RawClient, WireClient
from tests.cluster_harness import BROKER, V5, V311, NodeProcess, wait_for
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(120)

COOKIE = "test-cluster-cookie"


class Node(NodeProcess):
    """One `broker -c FILE` process with its ports and log file."""

    WAIT = 10.0

    def __init__(
        self,
        directory: Path,
        name: str,
        cert: Path,
        key: Path,
        ca: Path,
        cookie: str = COOKIE,
    ) -> None:
        self.directory = directory
        self.name = name
        self.cert, self.key, self.ca, self.cookie = cert, key, ca, cookie
        self.mqtt_port = free_port()
        self.cluster_port = free_port()
        self.admin_port = free_port()
        self.config = directory / f"{name}.toml"
        self.log = directory / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.store_mode = "disk"
        self.join_timeout = "10s"

    def write_config(self, peers: list[Node]) -> None:
        peer_list = ", ".join(f'"{p.name}@127.0.0.1:{p.cluster_port}"' for p in peers)
        self.config.write_text(
            f"""
[node]
name = "{self.name}"
cookie = "{self.cookie}"

[listeners.tcp.default]
bind = "127.0.0.1:{self.mqtt_port}"

[cluster]
name = "test-cluster"
bind = "127.0.0.1:{self.cluster_port}"
peers = [{peer_list}]
join_timeout = "{self.join_timeout}"

[cluster.ssl_options]
cacertfile = "{self.ca}"
certfile = "{self.cert}"
keyfile = "{self.key}"
verify = "verify_peer"
fail_if_no_peer_cert = true

[admin]
bind = "127.0.0.1:{self.admin_port}"

[store]
mode = "{self.store_mode}"
path = "{self.directory / (self.name + ".db")}"
"""
        )


class Client:
    """paho-mqtt 2.x with queues for messages and disconnects."""

    def __init__(self, port: int, client_id: str = "", protocol: MQTTProtocolVersion = V5) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol
        )
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.disconnects: queue.Queue[Any] = queue.Queue()
        connected: queue.Queue[Any] = queue.Queue()
        self.client.on_message = lambda client, userdata, message: self.messages.put(message)
        self.client.on_connect = lambda client, userdata, flags, reason, props: connected.put(
            reason
        )
        self.client.on_disconnect = lambda client, userdata, flags, reason, props: (
            self.disconnects.put(reason)
        )
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        reason = connected.get(timeout=5)
        assert not reason.is_failure, reason

    def subscribe(self, topic: str, qos: int) -> None:
        done: queue.Queue[Any] = queue.Queue()
        self.client.on_subscribe = lambda *args: done.put(args)
        self.client.subscribe(topic, qos)
        done.get(timeout=5)

    def publish(self, topic: str, payload: bytes, qos: int, **kwargs: Any) -> None:
        self.client.publish(topic, payload, qos, **kwargs).wait_for_publish(5)

    def drain(self, quiet: float = 0.5) -> list[mqtt.MQTTMessage]:
        messages = []
        while True:
            try:
                messages.append(self.messages.get(timeout=quiet))
            except queue.Empty:
                return messages

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def make_cluster(directory: Path, pki: TestPKI, names: list[str]) -> list[Node]:
    nodes = []
    for name in names:
        files = pki.node(name)
        nodes.append(Node(directory, name, files.cert, files.key, pki.root))
    for node in nodes:
        node.write_config(nodes)
    return nodes


@pytest.fixture(scope="module")
def cluster(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Node]]:
    nodes = make_cluster(tmp_path_factory.mktemp("cluster"), pki, ["node-1", "node-2", "node-3"])
    try:
        for node in nodes:
            node.start()
        wait_for(lambda: all(node.all_links_up() for node in nodes), 15, "all links up")
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        client.stop()


def test_every_pair_has_one_mutual_tls_link(cluster: list[Node]) -> None:
    for node in cluster:
        status = node.admin("/api/cluster")
        assert status["node"] == node.name
        peers = [m for m in status["members"] if m["state"] != "self"]
        assert {m["name"] for m in peers} == {n.name for n in cluster} - {node.name}
        for member in peers:
            assert member["state"] == "up"
            assert member["tls_version"] in ("TLSv1.3", "TLSv1.2")
            # The node whose name sorts first dials: one link per pair.
            assert member["direction"] == ("dial" if node.name < member["name"] else "accept")


@pytest.mark.parametrize("protocol", [V311, V5], ids=["3.1.1", "5.0"])
def test_qos_0_1_2_across_three_nodes_no_loss_no_duplicates(
    cluster: list[Node], clients: list[Client], protocol: MQTTProtocolVersion
) -> None:
    topic_root = f"across/{protocol.name}"
    subscribers = []
    for index, node in enumerate(cluster):
        subscriber = Client(node.mqtt_port, f"sub-{protocol.name}-{index}", protocol)
        clients.append(subscriber)
        # Overlapping filters on one node: still one delivery per message.
        subscriber.subscribe(f"{topic_root}/#", 2)
        subscriber.subscribe(f"{topic_root}/+/x", 1)
        subscribers.append(subscriber)
    time.sleep(0.3)  # subscriptions travel to the other nodes
    publishers = [
        Client(node.mqtt_port, f"pub-{protocol.name}-{i}", protocol)
        for i, node in enumerate(cluster)
    ]
    clients.extend(publishers)
    sent: list[tuple[str, int]] = []
    for origin, publisher in enumerate(publishers):
        for qos in (0, 1, 2):
            for number in range(20):
                payload = f"{origin}-{qos}-{number}"
                publisher.publish(f"{topic_root}/{qos}/x", payload.encode(), qos)
                sent.append((payload, qos))
    for subscriber in subscribers:
        wanted = len(sent)
        got: list[mqtt.MQTTMessage] = []
        deadline = time.monotonic() + 10
        while len(got) < wanted and time.monotonic() < deadline:
            got.extend(subscriber.drain(0.2))
        got.extend(subscriber.drain(0.3))
        counts = Counter(message.payload.decode() for message in got)
        assert sorted(counts) == sorted(payload for payload, _ in sent)
        assert set(counts.values()) == {1}, "duplicates"
        for message in got:
            origin, qos, number = message.payload.decode().split("-")
            assert message.qos == int(qos)


def test_mqtt5_properties_survive_the_link(cluster: list[Node], clients: list[Client]) -> None:
    subscriber = Client(cluster[2].mqtt_port, "props-sub")
    publisher = Client(cluster[0].mqtt_port, "props-pub")
    clients.extend([subscriber, publisher])
    subscriber.subscribe("props/t", 1)
    time.sleep(0.3)
    properties = PahoProperties(PacketTypes.PUBLISH)
    properties.UserProperty = [("a", "1"), ("b", "2")]
    properties.ContentType = "application/json"
    properties.ResponseTopic = "props/reply"
    properties.CorrelationData = b"\x01\x02"
    properties.PayloadFormatIndicator = 1
    properties.MessageExpiryInterval = 60
    publisher.publish("props/t", b"{}", 1, properties=properties)
    message = subscriber.messages.get(timeout=5)
    received: Any = message.properties
    assert received.UserProperty == [("a", "1"), ("b", "2")]
    assert received.ContentType == "application/json"
    assert received.ResponseTopic == "props/reply"
    assert received.CorrelationData == b"\x01\x02"
    assert received.PayloadFormatIndicator == 1
    assert 58 <= received.MessageExpiryInterval <= 60


def test_publish_crossing_the_link_arrives_as_each_subscriber_must_see_it(
    cluster: list[Node],
) -> None:
    """Issue 13: a node forwards a received PUBLISH as its own bytes when it can. A message
    from another node has no such bytes; subscribers there get exactly the PUBLISH the spec
    asks for, and those on the publisher's node the same."""
    subscribers = []
    for node in (cluster[0], cluster[1]):
        for level in (4, 5):
            client = WireClient(node.mqtt_port, level)
            client.connect(f"bytes-{node.name}-{level}")
            client.send(Subscribe(1, (Subscription("bytes/#", 1),)))
            assert client.packet()[0] == 0x90  # SUBACK
            subscribers.append((client, level))
    try:
        # until node-1 routes to node-2's subscribers: probes, then drain them everywhere
        probe = WireClient(cluster[0].mqtt_port, 4)
        probe.connect("bytes-probe")
        for client, _ in subscribers[2:]:
            deadline = time.monotonic() + 5
            while client.nothing(0.1):
                assert time.monotonic() < deadline, "subscription not known on node-1"
                probe.send_bytes(encode(Publish("bytes/probe", b""), 4))
        probe.close()
        for client, _ in subscribers:
            while not client.nothing(0.3):
                pass
        for level in (4, 5):
            publisher = WireClient(cluster[0].mqtt_port, level)
            publisher.connect(f"bytes-pub-{level}")
            publisher.send_bytes(
                encode(Publish("bytes/t", b"zero", retain=False), level)
                + encode(Publish("bytes/t", b"one", 1, dup=True, packet_id=500), level)
            )
            assert publisher.packet()[0] == 0x40  # PUBACK
            for client, subscriber_level in subscribers:
                assert client.packet() == encode(Publish("bytes/t", b"zero"), subscriber_level)
                one = client.packet()
                packet_id = int.from_bytes(one[11:13], "big")
                assert one == encode(
                    Publish("bytes/t", b"one", 1, packet_id=packet_id), subscriber_level
                )
                client.send_bytes(b"\x40\x02" + one[11:13])  # PUBACK
            publisher.close()
    finally:
        for client, _ in subscribers:
            client.close()


def test_a_turns_frames_cross_the_link_in_one_write_in_order(cluster: list[Node]) -> None:
    """200 QoS 0 PUBLISHes read by node-1 in one go become 200 frames to node-2 written
    together (a TLS record and a send per loop turn, not per frame: ClusterLink._flush),
    and node-2's subscriber gets every one, in order."""
    subscriber = WireClient(cluster[1].mqtt_port, 4)
    subscriber.connect("coalesce-sub")
    subscriber.send(Subscribe(1, (Subscription("coalesce/#", 0),)))
    assert subscriber.packet()[0] == 0x90  # SUBACK
    publisher = WireClient(cluster[0].mqtt_port, 4)
    publisher.connect("coalesce-pub")
    try:
        deadline = time.monotonic() + 5
        while subscriber.nothing(0.1):  # until node-1 routes to node-2's subscriber
            assert time.monotonic() < deadline, "subscription not known on node-1"
            publisher.send_bytes(encode(Publish("coalesce/probe", b""), 4))
        while not subscriber.nothing(0.3):
            pass

        def link() -> dict[str, int]:
            counters: dict[str, int] = cluster[0].member(cluster[1].name)["counters"]
            return counters

        before = link()
        publisher.send_bytes(
            b"".join(encode(Publish("coalesce/t", b"%d" % n), 4) for n in range(200))
        )
        got = [subscriber.packet() for _ in range(200)]
        assert got == [encode(Publish("coalesce/t", b"%d" % n), 4) for n in range(200)]
        after = link()
        frames = after["frames_sent"] - before["frames_sent"]
        writes = after["writes"] - before["writes"]
        assert frames >= 200, (before, after)
        assert 1 <= writes <= frames // 4, (before, after)
    finally:
        publisher.close()
        subscriber.close()


def test_mosquitto_clients_across_nodes(cluster: list[Node]) -> None:
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto-clients not installed")
    subscriber = subprocess.Popen(
        [
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            str(cluster[2].mqtt_port),
            "-t",
            "mosq/#",
            "-q",
            "2",
            "-C",
            "10",
            "-W",
            "20",
            "-i",
            "mosq-sub",
            "-V",
            "mqttv5",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        wait_for(
            lambda: any(c["client_id"] == "mosq-sub" for c in cluster[2].admin("/api/clients")),
            5,
            "mosquitto_sub connected",
        )
        time.sleep(0.3)
        for number in range(10):
            subprocess.run(
                [
                    "mosquitto_pub",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(cluster[1].mqtt_port),
                    "-t",
                    f"mosq/{number}",
                    "-m",
                    f"m{number}",
                    "-q",
                    str(number % 3),
                ],
                check=True,
                timeout=10,
            )
        output, _ = subscriber.communicate(timeout=20)
    finally:
        subscriber.kill()
        subscriber.wait()
    assert sorted(output.decode().split()) == sorted(f"m{number}" for number in range(10))


def test_retained_message_visible_from_another_node(
    cluster: list[Node], clients: list[Client]
) -> None:
    publisher = Client(cluster[0].mqtt_port, "retain-pub")
    clients.append(publisher)
    publisher.publish("retained/status", b"online", 1, retain=True)
    for node in cluster[1:]:

        def arrived(node: Node = node) -> bool:
            subscriber = Client(node.mqtt_port, f"retain-sub-{node.name}")
            try:
                subscriber.subscribe("retained/#", 1)
                messages = subscriber.drain(0.3)
            finally:
                subscriber.stop()
            return [(m.topic, m.payload, m.retain) for m in messages] == [
                ("retained/status", b"online", True)
            ]

        wait_for(arrived, 5, f"retained message on {node.name}")
    # Deleting it on another node deletes it everywhere.
    deleter = Client(cluster[2].mqtt_port, "retain-del")
    clients.append(deleter)
    deleter.publish("retained/status", b"", 1, retain=True)
    time.sleep(0.3)
    checker = Client(cluster[0].mqtt_port, "retain-check")
    clients.append(checker)
    checker.subscribe("retained/#", 1)
    assert checker.drain(0.5) == []


def test_subscription_known_to_other_nodes_within_a_second(
    cluster: list[Node], clients: list[Client]
) -> None:
    publisher = Client(cluster[0].mqtt_port, "prop-pub")
    subscriber = Client(cluster[2].mqtt_port, "prop-sub")
    clients.extend([publisher, subscriber])
    subscriber.subscribe("propagation/t", 0)
    subscribed_at = time.monotonic()
    while time.monotonic() - subscribed_at < 1.0:
        publisher.publish("propagation/t", b"ping", 0)
        try:
            subscriber.messages.get(timeout=0.05)
            break
        except queue.Empty:
            continue
    else:
        raise AssertionError("subscription not known on node-1 within a second")


def test_client_id_takeover_across_nodes(cluster: list[Node], clients: list[Client]) -> None:
    first = Client(cluster[0].mqtt_port, "roaming-device")
    clients.append(first)
    second = Client(cluster[1].mqtt_port, "roaming-device")
    clients.append(second)
    reason = first.disconnects.get(timeout=5)
    assert reason.value == 0x8E  # Session taken over
    # The new connection stays.
    assert second.disconnects.empty()
    records = cluster[0].admin("/api/clients")
    assert all(record["client_id"] != "roaming-device" for record in records)


def test_killed_node_rejoins_and_others_keep_serving(
    cluster: list[Node], clients: list[Client]
) -> None:
    node_1, node_2, node_3 = cluster
    node_2.kill()
    wait_for(lambda: node_1.link_states()[node_2.name] != "up", 5, "node-1 sees node-2 down")
    wait_for(lambda: node_3.link_states()[node_2.name] != "up", 5, "node-3 sees node-2 down")
    # The survivors keep routing between themselves.
    subscriber = Client(node_3.mqtt_port, "survivor-sub")
    publisher = Client(node_1.mqtt_port, "survivor-pub")
    clients.extend([subscriber, publisher])
    subscriber.subscribe("survive/t", 1)
    time.sleep(0.3)
    publisher.publish("survive/t", b"still here", 1)
    assert subscriber.messages.get(timeout=5).payload == b"still here"

    node_2.start()
    wait_for(lambda: all(node.all_links_up() for node in cluster), 15, "node-2 rejoined")
    rejoined = Client(node_2.mqtt_port, "rejoined-sub")
    clients.append(rejoined)
    rejoined.subscribe("survive/t", 1)
    time.sleep(0.3)
    publisher.publish("survive/t", b"welcome back", 1)
    assert rejoined.messages.get(timeout=5).payload == b"welcome back"
    assert subscriber.messages.get(timeout=5).payload == b"welcome back"
    assert "cluster link to node-2" in node_1.log_text()


def test_wrong_cookie_is_refused_and_logged(pki: TestPKI, tmp_path: Path) -> None:
    nodes = make_cluster(tmp_path, pki, ["node-a", "node-b"])
    dialer, acceptor = nodes
    dialer.cookie = "not-the-cookie"
    dialer.write_config(nodes)
    try:
        for node in nodes:
            node.start()
        wait_for(lambda: "wrong cookie" in acceptor.log_text(), 10, "refusal logged")
        assert "refused" in acceptor.log_text()
        # Issue 14 item 7: the peer gets a bare refusal, the reason stays in our log.
        wait_for(lambda: "refused by the peer: refused" in dialer.log_text(), 10, "dialer refused")
        assert "wrong cookie" not in dialer.log_text()
        assert acceptor.link_states() == {"node-a": "down"}
        assert dialer.link_states()["node-b"] != "up"
        assert "not-the-cookie" not in acceptor.log_text()
    finally:
        for node in nodes:
            node.stop()


def test_node_certificate_from_a_rogue_ca_is_refused(pki: TestPKI, tmp_path: Path) -> None:
    rogue_root = make_root("Rogue Root CA", key_type="ec")
    rogue_intermediate = make_intermediate(rogue_root, "Test Intermediate CA", key_type="ec")
    rogue = make_node(
        rogue_intermediate,
        "node-a",
        dns_names=["node-a", "localhost"],
        ip_addresses=["127.0.0.1"],
        key_type="ec",
    )
    cert = write_certs(tmp_path / "rogue-node-a.pem", rogue.certs)
    key = write_key(tmp_path / "rogue-node-a-key.pem", rogue.key)
    nodes = make_cluster(tmp_path, pki, ["node-a", "node-b"])
    dialer, acceptor = nodes
    dialer.cert, dialer.key = cert, key
    # node-b cannot tell whose TLS handshake failed: it waits join_timeout for node-a.
    acceptor.join_timeout = "1s"
    for node in nodes:
        node.write_config(nodes)
    try:
        for node in nodes:
            node.start()
        wait_for(lambda: "cluster link from 127.0.0.1" in acceptor.log_text(), 10, "refusal logged")
        line = next(
            line for line in acceptor.log_text().splitlines() if "cluster link from" in line
        )
        assert "TLS handshake failed" in line
        assert "unable to get local issuer certificate" in line
        time.sleep(0.5)
        assert acceptor.link_states() == {"node-a": "down"}
        assert dialer.link_states()["node-b"] != "up"
    finally:
        for node in nodes:
            node.stop()


def test_key_readable_by_others_stops_the_node(pki: TestPKI, tmp_path: Path) -> None:
    files = pki.node("node-p")
    key = tmp_path / "node-p-key.pem"
    shutil.copy(files.key, key)
    os.chmod(key, 0o644)
    node = Node(tmp_path, "node-p", files.cert, key, pki.root)
    node.write_config([node])
    result = subprocess.run(
        [str(BROKER), "-c", str(node.config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(key) in lines[0]
    assert f"chmod 600 {key}" in lines[0]
    os.chmod(key, 0o600)
    assert node.process is None


def test_demo_configs_use_the_seed_rpc_ports() -> None:
    root = Path(__file__).resolve().parent.parent / "configs"
    for number in (1, 2, 3):
        config = load_config(root / f"broker-{number}.toml")
        assert config.cluster is not None
        assert config.cluster.port == default_rpc_port(config.node_name) == 5370 + number
        assert {port for _, _, port in config.cluster.peers} <= {5371, 5372, 5373}


def test_a_device_certificate_from_the_same_ca_cannot_join(pki: TestPKI, tmp_path: Path) -> None:
    """Devices and nodes share the CA: a device's certificate and key, even with the right
    cookie, are not a node's identity (the certificate must name the node or its address)."""
    device = pki.device(25)
    nodes = make_cluster(tmp_path, pki, ["node-a", "node-b"])
    dialer, acceptor = nodes
    dialer.cert, dialer.key = device.chain, device.key
    dialer.write_config(nodes)
    try:
        for node in nodes:
            node.start()
        wait_for(lambda: "names neither" in acceptor.log_text(), 10, "refusal logged")
        assert "device-025" in acceptor.log_text()
        assert acceptor.link_states() == {"node-a": "down"}
        assert dialer.link_states()["node-b"] != "up"
    finally:
        for node in nodes:
            node.stop()


def _persistent(
    port: int, client_id: str, protocol: MQTTProtocolVersion, clean: bool = False
) -> tuple[mqtt.Client, queue.Queue[mqtt.MQTTMessage], bool]:
    """A paho client with a persistent session (3.1.1 clean_session=0, 5.0 clean_start=0 with
    Session Expiry 3600); returns it with its message queue and CONNACK session_present."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    connected: queue.Queue[Any] = queue.Queue()
    client.on_message = lambda c, u, message: messages.put(message)
    client.on_connect = lambda c, u, flags, reason, props: connected.put((flags, reason))
    if protocol == V5:
        properties = PahoProperties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        client.connect("127.0.0.1", port, keepalive=30, clean_start=clean, properties=properties)
    else:
        client.reinitialise(client_id=client_id, clean_session=clean)
        client.on_message = lambda c, u, message: messages.put(message)
        client.on_connect = lambda c, u, flags, reason, props: connected.put((flags, reason))
        client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    flags, reason = connected.get(timeout=10)
    assert not reason.is_failure, reason
    return client, messages, bool(flags.session_present)


def _stop(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


@pytest.mark.parametrize("protocol", [V311, V5], ids=["3.1.1", "5.0"])
def test_persistent_session_follows_the_device_to_another_node(
    cluster: list[Node], clients: list[Client], protocol: MQTTProtocolVersion
) -> None:
    """Issue 12's round, node by node: subscribe QoS 1 and 2 on one node, go away, messages
    are published on another, come back on a third: everything queued arrives, once."""
    device = f"roamer-{protocol.name}"
    topic = f"roam/{protocol.name}"
    publisher = Client(cluster[1].mqtt_port, f"roam-pub-{protocol.name}", protocol)
    clients.append(publisher)
    for round_number in range(3):
        home = cluster[round_number % 3]
        away = cluster[(round_number + 2) % 3]
        client, messages, present = _persistent(home.mqtt_port, device, protocol)
        assert present == (round_number > 0), f"round {round_number}: session_present"
        if round_number == 0:
            client.subscribe([(f"{topic}/1", 1), (f"{topic}/2", 2)])
            time.sleep(0.5)  # the routes reach the other nodes
        _stop(client)
        time.sleep(0.2)
        sent = []
        for number in range(5):
            for qos in (1, 2):
                payload = f"{round_number}-{qos}-{number}"
                publisher.publish(f"{topic}/{qos}", payload.encode(), qos)
                sent.append(payload)
        client, messages, present = _persistent(away.mqtt_port, device, protocol)
        assert present, f"round {round_number}: the session came over"
        got: list[str] = []
        deadline = time.monotonic() + 10
        while len(got) < len(sent) and time.monotonic() < deadline:
            try:
                got.append(messages.get(timeout=0.2).payload.decode())
            except queue.Empty:
                pass
        time.sleep(0.3)
        while not messages.empty():
            got.append(messages.get().payload.decode())
        _stop(client)
        assert sorted(got) == sorted(sent), f"round {round_number} on {away.name}"


def test_startup_warns_when_the_cluster_ca_verifies_clients(pki: TestPKI, tmp_path: Path) -> None:
    """Issue 14 item 7 (seed 002): the node certificate's CA also verifies MQTT clients on an
    ssl listener: the node starts, and says to use a CA for the cluster alone."""
    (node,) = make_cluster(tmp_path, pki, ["node-w"])
    server = pki.node("node-w")
    node.config.write_text(
        node.config.read_text()
        + f"""
[listeners.ssl.devices]
bind = "127.0.0.1:{free_port()}"
[listeners.ssl.devices.ssl_options]
cacertfile = "{pki.intermediate}"
certfile = "{server.cert}"
keyfile = "{server.key}"
verify = "verify_peer"
fail_if_no_peer_cert = true
"""
    )
    try:
        node.start()
        wait_for(lambda: "use a CA for the cluster alone" in node.log_text(), 10, "warning")
        assert "listener ssl:devices" in node.log_text()
    finally:
        node.stop()


def test_clean_start_on_another_node_ends_the_session_everywhere(
    cluster: list[Node], clients: list[Client]
) -> None:
    """Clean start on node 3 ends the session node 1 holds: its queued messages are gone
    (session_present=0, nothing delivered) and its delayed will is published at once."""
    topic = "clean/elsewhere"
    watcher = Client(cluster[1].mqtt_port, "clean-watcher")
    clients.append(watcher)
    watcher.subscribe("clean/will", 1)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="clean-device", protocol=V5)
    will = PahoProperties(PacketTypes.WILLMESSAGE)
    will.WillDelayInterval = 600
    client.will_set("clean/will", b"gone", 1, properties=will)
    connect_properties = PahoProperties(PacketTypes.CONNECT)
    connect_properties.SessionExpiryInterval = 3600
    connected: queue.Queue[Any] = queue.Queue()
    client.on_connect = lambda c, u, flags, reason, props: connected.put(reason)
    client.connect("127.0.0.1", cluster[0].mqtt_port, 30, properties=connect_properties)
    client.loop_start()
    connected.get(timeout=5)
    client.subscribe(topic, 1)
    time.sleep(0.5)
    client.loop_stop()
    client.socket().close()  # gone without DISCONNECT: the will waits for its delay
    time.sleep(0.3)
    publisher = Client(cluster[1].mqtt_port, "clean-pub")
    clients.append(publisher)
    publisher.publish(topic, b"queued", 1)
    assert watcher.drain(0.5) == []  # the will is delayed (600 s)
    again, messages, present = _persistent(cluster[2].mqtt_port, "clean-device", V5, clean=True)
    try:
        assert not present
        assert messages.empty()
        will_message = watcher.messages.get(timeout=5)
        assert will_message.payload == b"gone"
    finally:
        _stop(again)


def _connect_at_once(sockets: list[RawClient], client_id: str) -> list[Any]:
    """Send CONNECT (5.0, clean start 0) on every socket at the same moment; the first packet
    each gets back (CONNACK, or None when closed without one)."""
    barrier = threading.Barrier(len(sockets))
    first: list[Any] = [None] * len(sockets)

    def connect(index: int) -> None:
        barrier.wait(5)
        packet = Connect(
            "MQTT", 5, False, 60, client_id, properties=Properties(session_expiry_interval=60)
        )
        try:
            first[index] = sockets[index].connect(packet)
        except OSError as error:
            first[index] = error

    threads = [threading.Thread(target=connect, args=(i,)) for i in range(len(sockets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    return first


def test_two_connects_at_once_on_two_nodes_leave_exactly_one(cluster: list[Node]) -> None:
    """The same client id connects to node-1 and node-2 at the same moment (clean start 0,
    5.0): whatever order the claims cross in, one connection remains, on one node (the
    higher claim; broker.registry.decide), the other is closed. Five rounds."""
    for round_number in range(5):
        client_id = f"twin-{round_number}"
        sockets = [RawClient(cluster[index].mqtt_port, level=5) for index in (0, 1)]
        try:
            first = _connect_at_once(sockets, client_id)
            open_ = [not raw.closed_by_server(timeout=1.5) for raw in sockets]
            assert open_.count(True) == 1, (round_number, first, open_)
            survivor = open_.index(True)
            assert isinstance(first[survivor], Connack), first
            holders = [
                node.name
                for node in cluster
                if any(r["client_id"] == client_id for r in node.admin("/api/clients"))
            ]
            assert holders == [cluster[survivor].name], holders
        finally:
            for raw in sockets:
                raw.close()
