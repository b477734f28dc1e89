"""Issue 12's proof over real processes: the demo's topology (lb in front of three broker
nodes with disk stores, devices with their own certificates through lb's mutual TLS, round
robin, PROXY v2) behaves as one broker.

- A device with a persistent session (3.1.1 clean_session=0; 5.0 clean_start=0 with Session
  Expiry 3600) subscribes at QoS 1 and 2 and goes away; another device publishes; the first
  comes back through lb, which sends it to the next node: every queued message arrives,
  session_present says the session is there, nothing arrives twice. Several rounds.
- A shared subscription spread over three nodes gets each message once, cluster-wide.
- The state store answers the same on every node.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from tests.cluster_harness import (
    V5,
    V311,
    ClusterNode,
    Device,
    running_cluster,
    running_lb,
    state_request,
)
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def topology(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[ClusterNode], int]]:
    directory = tmp_path_factory.mktemp("cluster-lb")
    with running_cluster(pki, directory) as nodes, running_lb(pki, directory, nodes) as front:
        yield nodes, front


def holder(nodes: list[ClusterNode], client_id: str) -> str | None:
    for node in nodes:
        if client_id in node.clients():
            return node.name
    return None


@pytest.mark.parametrize("protocol", [V311, V5], ids=["3.1.1", "5.0"])
def test_reconnect_through_lb_finds_the_session_on_another_node(
    topology: tuple[list[ClusterNode], int], pki: TestPKI, protocol: MQTTProtocolVersion
) -> None:
    nodes, front = topology
    level = "5" if protocol == V5 else "311"
    subscriber_files = pki.device(1 if protocol == V5 else 2)
    publisher_files = pki.device(3 if protocol == V5 else 4)
    client_id = f"{subscriber_files.cn}-{level}"
    topic = f"fleet/{client_id}/commands"
    publisher = Device(f"pub-{level}", protocol, publisher_files, pki.root, clean=True)
    publisher.connect(front)
    homes: list[str | None] = []
    try:
        for round_number in range(4):
            device = Device(client_id, protocol, subscriber_files, pki.root)
            present = device.connect(front)
            homes.append(holder(nodes, client_id))
            assert present == (round_number > 0), f"round {round_number}: session_present"
            if round_number == 0:
                device.subscribe([(f"{topic}/1", 1), (f"{topic}/2", 2)])
                time.sleep(0.5)  # the routes reach the other nodes
            device.stop()
            time.sleep(0.2)
            sent = []
            for number in range(5):
                for qos in (1, 2):
                    payload = f"{round_number}-{qos}-{number}"
                    publisher.publish(f"{topic}/{qos}", payload, qos)
                    sent.append(payload)
            deadline = time.monotonic() + 10
            while len(publisher.acked) < len(sent) * (round_number + 1):
                assert time.monotonic() < deadline, "publisher not acknowledged"
                time.sleep(0.05)
            device = Device(client_id, protocol, subscriber_files, pki.root)
            assert device.connect(front), f"round {round_number}: session not present"
            homes.append(holder(nodes, client_id))
            got = device.received(want=len(sent))
            device.stop()
            counts = Counter(got)
            assert sorted(counts) == sorted(sent), f"round {round_number}: {got}"
            assert set(counts.values()) == {1}, f"round {round_number}: duplicates {got}"
    finally:
        publisher.stop()
    # Round robin took the device to more than one node: the sessions really moved.
    assert len(set(homes)) > 1, homes


def test_a_device_from_the_node_ca_is_warned_about(
    topology: tuple[list[ClusterNode], int], pki: TestPKI
) -> None:
    """Issue 14 item 7: the test PKI's intermediate signs devices and nodes (as the demo's
    does); lb sends the verified chain (chain-subjects), and the node says so, once."""
    nodes, front = topology
    device = Device("ca-check", V5, pki.device(6), pki.root, clean=True)
    device.connect(front)
    device.stop()
    logs = [node.log_text() for node in nodes]
    assert any("use a CA for the cluster alone (seed 002)" in log for log in logs)
    assert all(log.count("the CA that signs this node's cluster certificate") <= 1 for log in logs)


def test_shared_subscription_gets_each_message_once_cluster_wide(
    topology: tuple[list[ClusterNode], int], pki: TestPKI
) -> None:
    nodes, front = topology
    members = []
    try:
        for index, node in enumerate(nodes):
            member = Device(f"worker-{index}", V5, clean=True)
            member.connect(node.mqtt_port)
            member.subscribe([("$share/workers/jobs/#", 1)])
            members.append(member)
        time.sleep(0.5)
        publisher = Device("jobs-pub", V5, pki.device(5), pki.root, clean=True)
        publisher.connect(front)
        sent = [f"job-{n}" for n in range(60)]
        for payload in sent:
            publisher.publish("jobs/new", payload, 1)
        got = [payload for member in members for payload in member.received(want=20)]
        publisher.stop()
        counts = Counter(got)
        assert sorted(counts) == sorted(sent)
        assert set(counts.values()) == {1}, "a message reached two members of the group"
    finally:
        for member in members:
            member.stop()


def test_shared_strategies_spread_or_stick(pki: TestPKI, tmp_path: Path) -> None:
    for strategy, spread in (("round_robin", True), ("hash_clientid", False)):
        directory = tmp_path / strategy
        directory.mkdir()
        extra = f'shared_subscription_strategy = "{strategy}"'
        with running_cluster(pki, directory, 2, extra) as nodes:
            members = []
            try:
                for index, node in enumerate(nodes):
                    member = Device(f"m-{index}", V5, clean=True)
                    member.connect(node.mqtt_port)
                    member.subscribe([("$share/g/s/#", 1)])
                    members.append(member)
                time.sleep(0.5)
                publisher = Device("one-publisher", V5, clean=True)
                publisher.connect(nodes[0].mqtt_port)
                for number in range(20):
                    publisher.publish("s/x", f"m{number}", 1)
                counts = [len(member.received(want=1, timeout=5)) for member in members]
                publisher.stop()
            finally:
                for member in members:
                    member.stop()
        assert sum(counts) == 20, (strategy, counts)
        if spread:
            assert all(count == 10 for count in counts), (strategy, counts)
        else:
            assert sorted(counts) == [0, 20], (strategy, counts)


def test_state_store_answers_the_same_on_every_node(
    topology: tuple[list[ClusterNode], int],
) -> None:
    nodes, _ = topology
    devices = []
    try:
        for index, node in enumerate(nodes):
            device = Device(f"state-{index}", V5, clean=True)
            device.connect(node.mqtt_port)
            device.subscribe([(f"answers/state-{index}", 1)])
            devices.append(device)
        writer, *readers = devices
        assert state_request(writer, [b"SET", b"site", b"north"], b"1") == b"+OK\r\n"
        # Answered after every node applied it: a read anywhere sees it at once.
        for number, reader in enumerate(readers):
            answer = state_request(reader, [b"GET", b"site"], b"g%d" % number)
            assert answer == b"$5\r\nnorth\r\n"
        assert state_request(readers[0], [b"DEL", b"site"], b"d") == b":1\r\n"
        assert state_request(writer, [b"GET", b"site"], b"g") == b"$-1\r\n"
    finally:
        for device in devices:
            device.stop()
