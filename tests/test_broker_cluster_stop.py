"""A node stopped and started again (SIGTERM, as systemd, docker stop and a rolling upgrade
do), over real processes: three nodes clustered over mutual TLS, paho-mqtt and raw clients.

At a stop the node closes its clients first, while its cluster links are up: their wills
reach every node (not only the stopping node's own, departing, subscribers), once; then it
waits until its peers and its backup have acknowledged what it sent, and closes the links.
At a start it opens its listeners once it has joined: every running peer linked and synced
(routes, shared members, owned sessions), at most [cluster] join_timeout.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter

import pytest

from broker.mqtt import Connack, Connect, Puback, Publish, Suback, Subscribe, Subscription
from tests.broker_harness import RawClient
from tests.cluster_harness import (
    V5,
    V311,
    ClusterNode,
    Device,
    make_nodes,
    running_cluster,
    state_request,
    wait_for,
)
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("replicas", [0, 1])
def test_the_wills_of_a_stopping_nodes_clients_reach_the_cluster_once(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory, replicas: int
) -> None:
    """Five clients with a will on node-3, a subscriber to the wills on node-1; node-3 gets
    SIGTERM. Every will arrives, once: published by node-3 while its links are up (with
    session_replicas = 0 there is no backup to publish them; with 1 the backup has their
    copies cleared before the links close, so it publishes none again). node-3, the backup
    of node-2, does not take node-2 for lost when it closes their link: the will of a
    client on node-2 is not published."""
    directory = tmp_path_factory.mktemp(f"stop-wills-{replicas}")
    with running_cluster(pki, directory, cluster=f"session_replicas = {replicas}") as nodes:
        watcher_node, backup, stopping = nodes
        watcher = Device("will-watcher", V5, clean=True)
        watcher.connect(watcher_node.mqtt_port)
        watcher.subscribe([("status/#", 1)])
        devices = [
            Device(f"stop-{n}", V311, clean=True, will=(f"status/stop-{n}", f"gone-{n}"))
            for n in range(5)
        ]
        for device in devices:
            device.connect(stopping.mqtt_port)
        # node-3 is node-2's backup: it keeps this client's will, and must not publish it
        # when it closes its own link to node-2.
        bystander = Device("bystander", V311, clean=True, will=("status/bystander", "false"))
        bystander.connect(backup.mqtt_port)
        # node-1 knows node-3's routes for the watcher's filter before anything is published
        time.sleep(1.0)
        stopping.stop()
        got = watcher.received(quiet=3.0, timeout=20)
        watcher.stop()
        bystander.stop()
        assert Counter(got) == Counter(f"gone-{n}" for n in range(5)), got
        log = stopping.log_text()
        assert log.count("will published: client_id=stop-") == 5
        assert "client_id=bystander" not in log
        assert "stopping with reliable frames unacknowledged" not in log
        assert "will published" not in backup.log_text()


def connect_when_listening(port: int, client_id: str, timeout: float = 30.0) -> RawClient:
    """A 3.1.1 client connected as soon as the port accepts (refused until it listens)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client = RawClient(port, level=4)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    connack = client.connect(Connect("MQTT", 4, True, 60, client_id))
    assert isinstance(connack, Connack) and connack.reason_code == 0, connack
    return client


def test_a_restarted_node_serves_clients_once_it_has_the_clusters_routes(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """node-3 (memory store, as the demo's) stops and starts again (node-1 and node-2 dial
    it, with their backoff). A publisher connects to node-3 the moment its port accepts and
    at once publishes a QoS 1 message for a subscriber on node-1: node-3 opens its
    listeners only once both peers are linked and have sent their routes, so the message
    reaches the subscriber. (Serving first, node-3 acknowledged it and dropped it: no route
    to node-1 yet.)"""
    directory = tmp_path_factory.mktemp("join")
    with running_cluster(pki, directory, store="memory") as nodes:
        subscriber_node, _, restarted = nodes
        subscriber = Device("join-subscriber", V5)
        subscriber.connect(subscriber_node.mqtt_port)
        subscriber.subscribe([("join/#", 1)])
        restarted.stop()
        time.sleep(1.0)  # the dialers back off a little
        restarted.launch()
        publisher = connect_when_listening(restarted.mqtt_port, "join-publisher")
        publisher.send(Publish("join/first", b"first", 1, packet_id=1))
        assert isinstance(publisher.receive(), Puback)
        publisher.close()
        assert subscriber.received(quiet=2.0, timeout=10) == ["first"]
        subscriber.stop()
        restarted.wait_ready()
        assert "cluster: joined in" in restarted.log_text()
        assert "2 of 2 peers linked and synced" in restarted.log_text()


def test_the_state_store_keeps_its_keys_through_a_rolling_restart(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Memory mode (the demo's): a key set on node-1, another set and deleted; then node-3,
    node-2 and node-1 stop and start again in turn, each once the one before serves. A read
    on each node the moment it serves finds the key, and not the deleted one; after the
    last restart (no node has run since the key was written) every node still answers it.
    A node that starts without its store gets every key and tombstone from each peer at
    link up, before it joins. (Before, a restarted node had only what was written while it
    was down: the first read after a restart answered $-1, and after the last restart the
    key was gone everywhere.)"""
    directory = tmp_path_factory.mktemp("state-restart")
    with running_cluster(pki, directory, store="memory") as nodes:

        def reader(node: ClusterNode, name: str) -> Device:
            device = Device(name, V5, clean=True)
            device.connect(node.mqtt_port)
            device.subscribe([(f"answers/{name}", 1)])
            return device

        writer = reader(nodes[0], "state-writer")
        assert state_request(writer, [b"SET", b"site", b"north"], b"s") == b"+OK\r\n"
        assert state_request(writer, [b"SET", b"gone", b"x"], b"t") == b"+OK\r\n"
        assert state_request(writer, [b"DEL", b"gone"], b"u") == b":1\r\n"
        writer.stop()
        for number, node in enumerate(reversed(nodes)):
            node.stop()
            node.start()
            device = reader(node, f"state-reader-{number}")
            try:
                assert state_request(device, [b"GET", b"site"], b"g") == b"$5\r\nnorth\r\n"
                assert state_request(device, [b"GET", b"gone"], b"h") == b"$-1\r\n"
            finally:
                device.stop()
        for number, node in enumerate(nodes):
            device = reader(node, f"state-after-{number}")
            assert state_request(device, [b"GET", b"site"], b"a") == b"$5\r\nnorth\r\n"
            device.stop()


def test_a_node_whose_peers_do_not_run_serves_after_join_timeout_or_at_once(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Alone, node-3 (whose peers dial it) serves after join_timeout, and says which peers
    it did not hear from; node-1 (which dials them: refused) serves at once."""
    directory = tmp_path_factory.mktemp("join-alone")
    nodes = make_nodes(directory, pki, count=3, cluster='join_timeout = "2s"')
    first, _, last = nodes
    try:
        started = time.monotonic()
        last.start()
        waited = time.monotonic() - started
        connect_when_listening(last.mqtt_port, "alone").close()
        assert (
            "serving clients after join_timeout 2s without node-1, node-2 (no link yet)"
            in last.log_text()
        )
        assert waited >= 2.0
        last.stop()
        first.start()
        connect_when_listening(first.mqtt_port, "first").close()
        assert (
            "0 of 2 peers linked and synced (no link to the others: not running)"
            in first.log_text()
        )
    finally:
        for node in nodes:
            node.stop()


def test_messages_for_a_restarted_nodes_sessions_published_during_its_return_are_kept(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """node-3 (memory store) holds 100 offline sessions, each subscribed to its own
    cmd/<id> at QoS 1; node-1 (its backup) keeps their copies. node-3 stops and starts
    again while a publisher on node-2 sends QoS 1 messages round the 100 topics, before,
    during and after node-3's return; node-2's link to node-3 comes up 2 s before node-1's
    (the hand-back). Every message node-2 acknowledged is in its session: the devices
    reconnect on node-3, which has their sessions back, and get them all. (node-3 sent
    node-2 its empty SYNC at once, and node-2's messages went nowhere until node-3 had its
    sessions back; now node-3 announces its routes and takes node-2's frames only then.)"""
    directory = tmp_path_factory.mktemp("return")
    with running_cluster(pki, directory, store="memory") as nodes:
        backup, publisher_node, restarted = nodes
        names = [f"ret-{n:03d}" for n in range(100)]
        for name in names:
            client = RawClient(restarted.mqtt_port, level=4)
            client.connect(Connect("MQTT", 4, False, 60, name))
            client.send(Subscribe(1, (Subscription(f"cmd/{name}", 1),)))
            assert isinstance(client.receive(), Suback)
            client.close()
        wait_for(
            lambda: (
                backup.admin("/api/cluster")["replication"]["copies"]["sessions"].get("node-3")
                == 100
            ),
            10,
            "100 copies on node-1",
        )
        publisher = Device("ret-publisher", V5, clean=True)
        publisher.client.max_inflight_messages_set(100)
        publisher.connect(publisher_node.mqtt_port)
        stop_publishing = threading.Event()

        def publish() -> None:
            for n in itertools.count():
                if stop_publishing.is_set() or n >= 20_000:
                    return
                publisher.publish(f"cmd/{names[n % 100]}", f"{n}", 1)
                time.sleep(0.002)

        thread = threading.Thread(target=publish)
        thread.start()
        try:
            time.sleep(0.5)
            restarted.stop()
            # node-1 does not dial the restarted node-3 until told: node-2's link to it comes
            # up first and the hand-back comes 2 s later.
            backup.admin("/api/cluster/peers/node-3/disconnect", "POST")
            restarted.launch()
            wait_for(
                lambda: publisher_node.link_states().get("node-3") == "up", 15, "node-2 to node-3"
            )
            time.sleep(2.0)
            backup.admin("/api/cluster/peers/node-3/connect", "POST")
            restarted.wait_ready()
            time.sleep(1.0)
        finally:
            stop_publishing.set()
            thread.join()
        wait_for(lambda: not publisher.pending, 15, "every message acknowledged")
        acked = set(publisher.acked)
        publisher.stop()
        got: set[str] = set()
        for name in names:
            client = RawClient(restarted.mqtt_port, level=4)
            connack = client.connect(Connect("MQTT", 4, False, 60, name))
            assert isinstance(connack, Connack) and connack.session_present, (name, connack)
            while True:
                try:
                    packet = client.receive(timeout=0.3)
                except TimeoutError:
                    break
                assert isinstance(packet, Publish), packet
                got.add(packet.payload.decode())
                if packet.packet_id is not None:
                    client.send(Puback(packet.packet_id))
            client.close()
        assert len(acked) > 300, len(acked)
        assert acked <= got, sorted(acked - got, key=int)[:20]
