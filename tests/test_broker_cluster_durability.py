"""Issue 12, durability, over real processes killed with SIGKILL: what a publisher got PUBACK
or PUBREC for is on disk, and so are persistent sessions, their queued and in-flight
messages, retained messages and the cluster outboxes.

- A node with offline persistent sessions (3.1.1 and 5.0; QoS 1 and 2 queued, a retained
  message) is killed and restarted: the sessions are there (session_present=1), every queued
  message arrives once, the retained message too.
- Frames a node acknowledged to its publisher but could not send (its link to the
  subscriber's node is cut) wait in its outbox on disk: the node is killed, restarted, the
  link restored, and the subscriber gets them.
- A link dropped while messages flow: nothing lost, nothing twice at QoS 2.
- Every node killed at once and started again one after the other (a whole-cluster restart):
  the first one up waits for the others before it serves, so a device whose session is in
  another node's store finds it there; a peer that never comes back delays it by
  join_timeout. The wills of the clients connected at the kill are published once after it,
  and so are those of a single node's clients (no cluster) when it starts again.
"""

from __future__ import annotations

import queue
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.ports import free_port
from tests.cluster_harness import (
    V5,
    V311,
    ClusterNode,
    Device,
    NodeProcess,
    running_cluster,
    wait_for,
)
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def nodes(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ClusterNode]]:
    with running_cluster(pki, tmp_path_factory.mktemp("durable")) as running:
        yield running


def _acked(device: Device, count: int) -> None:
    wait_for(lambda: len(device.acked) >= count, 15, f"{count} acknowledgements")


def test_sessions_queues_and_retained_survive_sigkill(nodes: list[ClusterNode]) -> None:
    node = nodes[0]
    subscribers = {
        "keeper-311": Device("keeper-311", V311),
        "keeper-5": Device("keeper-5", V5),
    }
    for device in subscribers.values():
        assert not device.connect(node.mqtt_port)
        device.subscribe([(f"keep/{device.client_id}/1", 1), (f"keep/{device.client_id}/2", 2)])
        device.stop()
    publisher = Device("keep-pub", V5, clean=True)
    publisher.connect(node.mqtt_port)
    sent: dict[str, list[str]] = {client_id: [] for client_id in subscribers}
    for client_id in subscribers:
        for number in range(10):
            qos = 1 + number % 2
            payload = f"{client_id}-{number}"
            publisher.publish(f"keep/{client_id}/{qos}", payload, qos)
            sent[client_id].append(payload)
    publisher.client.publish("keep/status", b"retained-before-kill", 1, retain=True)
    _acked(publisher, 20)
    time.sleep(0.2)  # the retained publish is acknowledged too (not counted above)
    publisher.stop()

    node.kill()
    node.start()
    wait_for(node.all_links_up, 20, "links back")
    for client_id, device in subscribers.items():
        again = Device(client_id, device.protocol)
        assert again.connect(node.mqtt_port), f"{client_id}: session lost"
        got = again.received(want=10)
        again.stop()
        counts = Counter(got)
        assert sorted(counts) == sorted(sent[client_id]), client_id
        assert set(counts.values()) == {1}, f"{client_id}: duplicates {got}"
    checker = Device("keep-check", V5, clean=True)
    checker.connect(nodes[1].mqtt_port)
    checker.subscribe([("keep/status", 1)])
    assert checker.received(want=1) == ["retained-before-kill"]
    checker.stop()
    assert "restored from the store: " in node.log_text()


def test_the_outbox_survives_sigkill_of_the_publishing_node(nodes: list[ClusterNode]) -> None:
    sender, receiver, _ = nodes
    subscriber = Device("outbox-sub", V5)
    subscriber.connect(receiver.mqtt_port)
    subscriber.subscribe([("outbox/#", 2)])
    time.sleep(0.5)
    # Cut the link between the two nodes: what the sender acknowledges waits in its outbox.
    sender.admin(f"/api/cluster/peers/{receiver.name}/disconnect", "POST")
    wait_for(lambda: sender.link_states()[receiver.name] != "up", 10, "link cut")
    publisher = Device("outbox-pub", V5, clean=True)
    publisher.connect(sender.mqtt_port)
    sent = [f"o{number}" for number in range(30)]
    for number, payload in enumerate(sent):
        publisher.publish(f"outbox/{number % 3}", payload, 1 + number % 2)
    _acked(publisher, len(sent))
    publisher.stop()
    outbox = [m for m in sender.admin("/api/cluster")["members"] if m["name"] == receiver.name]
    assert outbox[0]["outbox_frames"] >= len(sent)

    sender.kill()
    sender.start()  # the operator's cut does not survive a restart: the link comes back
    wait_for(lambda: sender.link_states()[receiver.name] == "up", 20, "link back")
    got = subscriber.received(want=len(sent))
    subscriber.stop()
    counts = Counter(got)
    assert sorted(counts) == sorted(sent)
    assert set(counts.values()) == {1}, f"duplicates: {got}"


def test_a_dropped_link_loses_nothing_and_duplicates_no_qos2(nodes: list[ClusterNode]) -> None:
    sender, receiver, _ = nodes
    subscriber = Device("flap-sub", V5)
    subscriber.connect(receiver.mqtt_port)
    subscriber.subscribe([("flap/#", 2)])
    time.sleep(0.5)
    publisher = Device("flap-pub", V5, clean=True)
    publisher.connect(sender.mqtt_port)
    sent = []
    for number in range(120):
        payload = f"f{number}"
        publisher.publish("flap/t", payload, 2)
        sent.append(payload)
        if number in (30, 80):
            sender.admin(f"/api/cluster/peers/{receiver.name}/disconnect", "POST")
        if number in (50, 100):
            sender.admin(f"/api/cluster/peers/{receiver.name}/connect", "POST")
        time.sleep(0.005)
    _acked(publisher, len(sent))
    publisher.stop()
    wait_for(lambda: sender.link_states()[receiver.name] == "up", 20, "link back")
    got = subscriber.received(want=len(sent))
    subscriber.stop()
    counts = Counter(got)
    assert sorted(counts) == sorted(sent)
    assert set(counts.values()) == {1}, f"duplicates: {got}"


def test_after_a_whole_cluster_kill_the_first_node_up_waits_for_the_others(
    pki: TestPKI, tmp_path: Path
) -> None:
    """The fleet's blackout: node-1 started first on its store does not serve while node-2,
    which holds a device's session, is not up yet (it used to: nobody listening there was
    "not running", and the device got a fresh session on node-1); once node-2 is up the
    device finds its session and its queued message through node-1. Then node-3 is lost for
    good and node-1 restarted: it serves after join_timeout, and says without which peer."""
    with running_cluster(pki, tmp_path, cluster='join_timeout = "4s"') as nodes:
        first, owner, third = nodes
        device = Device("blackout-device", V311)
        device.connect(owner.mqtt_port)
        device.subscribe([("blackout/cmd", 1)])
        device.stop()
        publisher = Device("blackout-pub", V5, clean=True)
        publisher.connect(third.mqtt_port)
        publisher.publish("blackout/cmd", "queued-before-the-blackout", 1)
        _acked(publisher, 1)
        publisher.stop()

        for node in nodes:
            node.kill()
        first.launch()
        time.sleep(1.5)
        # Its dials to node-2 and node-3 are refused: it waits for them all the same.
        assert not first.admin_ready(), first.log_text()[-2000:]
        owner.launch()
        third.launch()
        for node in nodes:
            node.wait_ready()
        assert "joined in" in first.log_text().rsplit("restored from the store", 1)[-1]
        again = Device("blackout-device", V311)
        assert again.connect(first.mqtt_port), "the session in node-2's store was not found"
        assert again.received(want=1) == ["queued-before-the-blackout"]
        again.stop()

        third.kill()  # lost for good
        first.kill()
        since = time.monotonic()
        first.start()
        assert time.monotonic() - since >= 3.5, "node-1 did not wait for node-3"
        assert "serving clients after join_timeout 4s without node-3" in first.log_text()


def _kill_at_once(nodes: list[ClusterNode]) -> None:
    """SIGKILL to every node before any is waited for (their power lost)."""
    for node in nodes:
        assert node.process is not None
        node.process.send_signal(signal.SIGKILL)
    for node in nodes:
        node.kill()  # reaped


def _retained(node: ClusterNode, topic_filter: str, quiet: float = 1.0) -> dict[str, str]:
    """The retained messages under ``topic_filter``, as a new subscriber on ``node`` gets them."""
    return _retained_on(node.mqtt_port, topic_filter, quiet)


def _retained_on(port: int, topic_filter: str, quiet: float = 1.0) -> dict[str, str]:
    reader = Device(f"reader-{time.monotonic_ns()}", V5, clean=True)
    reader.connect(port)
    reader.subscribe([(topic_filter, 1)])
    got: dict[str, str] = {}
    try:
        while True:
            message = reader.messages.get(timeout=quiet)
            got[message.topic] = message.payload.decode()
    except queue.Empty:
        pass
    reader.stop()
    return got


def test_the_wills_of_clients_connected_at_a_whole_cluster_kill_are_published_after_it(
    pki: TestPKI, tmp_path: Path
) -> None:
    """Every node killed with clients connected that set a retained will, then started
    again. Their backups died too, so each node publishes the wills its store kept for its
    own clients (as their connections ended with it; mosquitto 2.0 and the nodes before
    this publish none): a 3.1.1 client's at once, a 5.0 client's after its Will Delay of 2
    s; not that of a client back within its delay of 60 s, nor that of one that left with
    DISCONNECT before the kill. Each once, on one node."""
    with running_cluster(pki, tmp_path) as nodes:
        first, second, third = nodes
        sudden = Device(
            "crash-sudden", V311, clean=True, will=("wills/sudden", "off"), will_retain=True
        )
        slow = Device("crash-slow", V5, will=("wills/slow", "off"), will_delay=2, will_retain=True)
        back = Device("crash-back", V5, will=("wills/back", "off"), will_delay=60, will_retain=True)
        polite = Device(
            "crash-polite", V5, clean=True, will=("wills/polite", "off"), will_retain=True
        )
        for device, node in ((sudden, first), (slow, second), (back, third), (polite, first)):
            device.connect(node.mqtt_port)
        polite.stop()  # DISCONNECT: no will
        wait_for(
            lambda: sum(node.copied_wills() for node in nodes) == 3,
            10,
            "three wills copied to the backups",
        )
        time.sleep(0.3)  # ... and committed to the owners' stores (the same loop turn)
        for device in (sudden, slow, back):
            device.client.loop_stop()
        _kill_at_once(nodes)
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready()
        again = Device("crash-back", V5)
        assert again.connect(second.mqtt_port), "its session in node-3's store"
        again.stop()
        wait_for(lambda: "wills/slow" in _retained(first, "wills/#", 0.5), 15, "the slow will")
        time.sleep(1.0)
        assert _retained(third, "wills/#") == {"wills/sudden": "off", "wills/slow": "off"}
        logs = "".join(node.log_text() for node in nodes)
        for client_id, count in (("sudden", 1), ("slow", 1), ("back", 0), ("polite", 0)):
            assert logs.count(f"will published: client_id=crash-{client_id} ") == count
        assert (
            "1 wills of clients connected when this node stopped (their connections ended "
            "with it): 1 published, 0 to be published after their delay" in first.log_text()
        )
        assert "0 published, 1 to be published after their delay" in second.log_text()


def test_a_backup_that_published_a_nodes_wills_and_died_too_still_says_so(
    pki: TestPKI, tmp_path: Path
) -> None:
    """node-1 is killed with a client connected that set a retained will; its backup, node-2,
    publishes it, and then node-2 and node-3 are killed too. All three start again: node-1
    finds the will in its store, and node-2 (a new run, with the word in its store: HELLO's
    wills_taken) tells it that it published it. Once in all."""
    with running_cluster(pki, tmp_path) as nodes:
        first, second, _ = nodes
        device = Device(
            "taken-once", V311, clean=True, will=("wills/taken", "off"), will_retain=True
        )
        device.connect(first.mqtt_port)
        wait_for(
            lambda: second.copied_wills("node-1") == 1,
            10,
            "the will copied to node-2",
        )
        time.sleep(0.3)  # ... and committed to node-1's store (the same loop turn)
        device.client.loop_stop()
        first.kill()
        wait_for(
            lambda: "will published: client_id=taken-once " in second.log_text(),
            10,
            "node-2 publishes the will",
        )
        time.sleep(0.5)  # its word committed to its store
        _kill_at_once(nodes[1:])
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready()
        assert _retained(first, "wills/#") == {"wills/taken": "off"}
        logs = "".join(node.log_text() for node in nodes)
        assert logs.count("will published: client_id=taken-once ") == 1
        assert (
            "1 wills of clients connected when this node stopped: left to node node-2"
            in first.log_text()
        )


class SingleNode(NodeProcess):
    """A node without a cluster, on a disk store."""

    def __init__(self, directory: Path) -> None:
        self.name = "single"
        self.mqtt_port = free_port()
        self.admin_port = free_port()
        self.config = directory / "single.toml"
        self.log = directory / "single.log"
        self.process = None
        self.config.write_text(
            f"""
[node]
name = "single"

[listeners.tcp.default]
bind = "127.0.0.1:{self.mqtt_port}"

[admin]
bind = "127.0.0.1:{self.admin_port}"

[store]
mode = "disk"
path = "{directory / "single.db"}"
"""
        )


def test_a_single_node_killed_publishes_its_clients_wills_when_it_starts_again(
    tmp_path: Path,
) -> None:
    """No cluster, no backup: the node killed with a client connected that set a retained
    will publishes it once it is started again on its store (the connection ended with the
    process); a client that had left with DISCONNECT gets none."""
    node = SingleNode(tmp_path)
    try:
        node.start()
        sudden = Device(
            "single-sudden", V311, clean=True, will=("single/sudden", "off"), will_retain=True
        )
        polite = Device(
            "single-polite", V5, clean=True, will=("single/polite", "off"), will_retain=True
        )
        for device in (sudden, polite):
            device.connect(node.mqtt_port)
        polite.stop()
        time.sleep(0.3)  # the will row committed (the CONNECT's loop turn)
        sudden.client.loop_stop()
        node.kill()
        node.start()
        assert _retained_on(node.mqtt_port, "single/#") == {"single/sudden": "off"}
        assert (
            "1 wills of clients connected when this node stopped (their connections ended "
            "with it): 1 published" in node.log_text()
        )
    finally:
        node.stop()
