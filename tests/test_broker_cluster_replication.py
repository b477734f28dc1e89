"""Issue 13, session replication, over real processes: a node killed with SIGKILL and never
restarted does not take its persistent sessions with it.

Three nodes; the backup of node-1 is node-2 (the next name, broker.replica.backup_of). A
device's session lives on node-1 with QoS 1 and 2 messages queued; node-1 is killed; more
messages are published for the device while node-1 is down; the device comes back on another
node with clean start 0 and finds its session (session_present 1) with every message, once:
through node-2's copy, handed over (device on node-3) or taken there (device on node-2).
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster_harness import (
    V5,
    V311,
    ClusterNode,
    Device,
    offline_session,
    running_cluster,
    wait_for,
)
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def nodes(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ClusterNode]]:
    with running_cluster(pki, tmp_path_factory.mktemp("replica")) as running:
        yield running


def _replication(node: ClusterNode) -> dict[str, Any]:
    status: dict[str, Any] = node.admin("/api/cluster")["replication"]
    return status


def _copies(node: ClusterNode, origin: str) -> int:
    sessions: dict[str, int] = _replication(node)["copies"]["sessions"]
    return sessions.get(origin, 0)


def _publish(node: ClusterNode, messages: list[tuple[str, str, int]]) -> None:
    publisher = Device(f"pub-{time.monotonic_ns()}", V5, clean=True)
    publisher.connect(node.mqtt_port)
    for topic, payload, qos in messages:
        publisher.publish(topic, payload, qos)
    wait_for(lambda: len(publisher.acked) >= len(messages), 15, "publisher acknowledged")
    publisher.stop()


def _kill(lost: ClusterNode, *seen_by: ClusterNode) -> None:
    """SIGKILL ``lost`` and wait until each of ``seen_by`` has its link to it down."""
    lost.kill()
    down = lost.name
    for node in seen_by:
        wait_for(lambda node=node: node.link_states().get(down) == "down", 10, f"{down} down")


@pytest.mark.parametrize(
    ("protocol", "comes_back_on"), [(V5, "node-3"), (V311, "node-2"), (V5, "node-2")]
)
def test_a_session_outlives_its_node(
    nodes: list[ClusterNode], protocol: Any, comes_back_on: str
) -> None:
    owner, backup, other = nodes
    assert _replication(owner)["backup"] == "node-2"
    assert _replication(other)["backup"] == "node-1"
    client_id = f"dev-{comes_back_on}-{protocol.value}"
    device = Device(client_id, protocol)
    assert not device.connect(owner.mqtt_port)
    device.subscribe([(f"cmd/{client_id}/1", 1), (f"cmd/{client_id}/2", 2)])
    device.stop()
    wait_for(lambda: _copies(backup, "node-1") == 1, 10, "the copy on node-2")

    before = [(f"cmd/{client_id}/{1 + n % 2}", f"before-{n}", 1 + n % 2) for n in range(6)]
    _publish(other, before)
    wait_for(lambda: _replication(backup)["copies"]["deliveries"] == 6, 10, "six deliveries copied")
    owner.kill()
    wait_for(lambda: other.link_states().get("node-1") == "down", 10, "node-1 down on node-3")
    wait_for(lambda: backup.link_states().get("node-1") == "down", 10, "node-1 down on node-2")
    after = [(f"cmd/{client_id}/{1 + n % 2}", f"after-{n}", 1 + n % 2) for n in range(4)]
    _publish(other, after)

    target = backup if comes_back_on == "node-2" else other
    again = Device(client_id, protocol)
    assert again.connect(target.mqtt_port), "the session was lost with its node"
    got = again.received(want=10)
    again.stop()
    counts = Counter(got)
    assert sorted(counts) == sorted(payload for _, payload, _ in before + after)
    assert set(counts.values()) == {1}, f"duplicates: {got}"
    assert _copies(backup, "node-1") == 0
    copies = _replication(backup)["copies"]["counters"]
    if comes_back_on == "node-2":
        assert copies["installed_here"] == 1
        assert "taken from our copy (its node node-1 is down" in backup.log_text()
    else:
        assert copies["handed_over"] == 1
        assert "handed over to node node-3 from our copy" in backup.log_text()
    assert copies["failover_deliveries"] == 4


def test_a_connected_device_loses_nothing_published_while_it_moves(
    nodes: list[ClusterNode],
) -> None:
    """The device is connected to node-1 when it dies; what is published for it before it
    is back (on node-3) reaches it there."""
    owner, backup, other = nodes
    device = Device("mover", V5, subscriptions=[("cmd/mover", 1)])
    assert not device.connect(owner.mqtt_port)
    device.subscribe([("cmd/mover", 1)])
    wait_for(lambda: _copies(backup, "node-1") == 1, 10, "the copy on node-2")
    _publish(other, [("cmd/mover", f"live-{n}", 1) for n in range(3)])
    assert sorted(device.received(want=3)) == ["live-0", "live-1", "live-2"]
    device.client.loop_stop()  # the device sees nothing more of node-1
    owner.kill()
    wait_for(lambda: backup.link_states().get("node-1") == "down", 10, "node-1 down")
    _publish(other, [("cmd/mover", f"moving-{n}", 1) for n in range(5)])
    again = Device("mover", V5)
    assert again.connect(other.mqtt_port)
    got = again.received(want=5)
    again.stop()
    assert sorted(got) == [f"moving-{n}" for n in range(5)]


@pytest.mark.parametrize("comes_back_on", ["node-2", "node-3"])
def test_what_is_published_while_the_copy_is_handed_over_reaches_the_session(
    nodes: list[ClusterNode], comes_back_on: str
) -> None:
    """node-1 is down; its device comes back on node-3 (or on node-2, its backup) while
    publishers on node-2 and node-3 send it a command every half millisecond. Messages
    routed to node-1 before their node had the session's new route go to node-1's outbox and
    to node-2; node-2 had handed the copy over (or installed it) by then, so they went
    nowhere: before the forwarding stub (broker.replica.MovedCopy) 2-19 of ~1,500 acknowledged
    commands were never delivered. Each is delivered, once."""
    owner, backup, other = nodes
    offline_session(owner, "handover", V5)
    wait_for(lambda: _copies(backup, "node-1") == 1, 10, "the copy on node-2")
    owner.kill()
    wait_for(lambda: other.link_states().get("node-1") == "down", 10, "node-1 down on node-3")
    wait_for(lambda: backup.link_states().get("node-1") == "down", 10, "node-1 down on node-2")
    publishers = []
    for node in (backup, other):
        publisher = Device(f"commander-{node.name}", V5, clean=True)
        publisher.connect(node.mqtt_port)
        publishers.append(publisher)
    stop = threading.Event()

    def command(publisher: Device) -> None:
        for n in range(3_000):
            if stop.is_set():
                break
            publisher.publish("cmd/handover", f"{publisher.client_id}-{n}", 1)
            time.sleep(0.0005)

    threads = [threading.Thread(target=command, args=(publisher,)) for publisher in publishers]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        again = Device("handover", V5)
        target = backup if comes_back_on == "node-2" else other
        assert again.connect(target.mqtt_port), "the session was lost with its node"
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    for publisher in publishers:
        wait_for(lambda publisher=publisher: not publisher.pending, 15, "commands acknowledged")
        publisher.stop()
    acknowledged = [payload for publisher in publishers for payload in publisher.acked]
    got = Counter(again.received(want=len(acknowledged), quiet=1.0))
    again.stop()
    assert sorted(set(acknowledged) - set(got)) == []
    assert [payload for payload, count in got.items() if count > 1] == []
    assert _replication(backup)["copies"]["counters"]["failover_forwarded"] > 0


def test_a_session_outlives_two_nodes_lost_one_after_the_other(
    nodes: list[ClusterNode],
) -> None:
    """One node lost at a time, twice: node-1 dies, its device comes back on node-2 (node-1's
    backup: the copy is installed there, and copied on to node-3, node-2's backup) and goes
    offline; commands are queued for it on node-2; node-2 dies too. The device, back on
    node-3 (the last node), finds its session with every command published for it since it
    left node-2, before node-2's loss and after it, each once."""
    first, second, last = nodes
    offline_session(first, "twice", V5)
    wait_for(lambda: _copies(second, "node-1") == 1, 10, "the copy on node-2")
    _publish(last, [("cmd/twice", f"first-{n}", 1) for n in range(3)])
    _kill(first, second, last)
    device = Device("twice", V5)
    assert device.connect(second.mqtt_port), "the session was lost with node-1"
    assert sorted(device.received(want=3)) == [f"first-{n}" for n in range(3)]
    device.stop()
    wait_for(lambda: _copies(last, "node-2") == 1, 10, "the session copied on to node-3")
    _publish(last, [("cmd/twice", f"second-{n}", 1) for n in range(3)])
    wait_for(lambda: _replication(last)["copies"]["deliveries"] == 3, 10, "queued on node-2")
    second.kill()
    wait_for(lambda: last.link_states().get("node-2") == "down", 10, "node-2 down")
    _publish(last, [("cmd/twice", f"third-{n}", 1) for n in range(3)])
    again = Device("twice", V5)
    assert again.connect(last.mqtt_port), "the session was lost with node-2"
    got = again.received(want=6)
    again.stop()
    assert sorted(got) == [f"second-{n}" for n in range(3)] + [f"third-{n}" for n in range(3)]
    assert _replication(last)["copies"]["counters"]["installed_here"] == 1


def test_a_publish_for_another_node_is_acknowledged_once_a_node_other_than_ours_has_it(
    nodes: list[ClusterNode],
) -> None:
    """Messages FROM devices (broker.replica.Forwarded): a device on node-3 publishes for a
    session on node-1, and in memory mode node-3's outbox was the message's only home when the
    PUBACK went (node-3 lost for good then would have lost it). The PUBACK now waits for
    node-1's link ACK. node-1 frozen (SIGSTOP: the link stays up, nothing is acknowledged):
    no PUBACK. node-1 killed: node-3 sends the frame to node-1's backup, node-2, and the
    PUBACK follows node-2's ACK. The device finds the message there, once. Meanwhile another
    device's message for node-2 was acknowledged: node-1's silence holds only what went to
    it."""
    owner, backup, other = nodes
    offline_session(owner, "forwarded", V5)
    offline_session(backup, "elsewhere", V5)
    wait_for(lambda: _copies(backup, "node-1") == 1, 10, "the copy on node-2")
    neighbour = Device("neighbouring-publisher", V5, clean=True)
    neighbour.connect(other.mqtt_port)
    publisher = Device("forwarding-publisher", V5, clean=True)
    publisher.connect(other.mqtt_port)
    publisher.publish("cmd/forwarded", "before", 1)
    wait_for(lambda: publisher.acked == ["before"], 10, "acknowledged while node-1 answers")
    assert owner.process is not None
    owner.process.send_signal(signal.SIGSTOP)
    try:
        publisher.publish("cmd/forwarded", "frozen", 1)
        # Another device's message for node-2 is not held by node-1's silence.
        neighbour.publish("cmd/elsewhere", "meanwhile", 1)
        wait_for(lambda: neighbour.acked == ["meanwhile"], 10, "acknowledged by node-2")
        time.sleep(1.0)
        assert publisher.acked == ["before"]  # node-1 has not acknowledged it
        assert _replication(other)["forwarded"]["waiting"] >= 1
    finally:
        owner.kill()  # a stopped process dies too; its sockets close
    wait_for(lambda: publisher.acked == ["before", "frozen"], 15, "acknowledged via node-2")
    publisher.stop()
    neighbour.stop()
    again = Device("forwarded", V5)
    assert again.connect(backup.mqtt_port)
    assert sorted(again.received(want=2)) == ["before", "frozen"]
    again.stop()


def _shared_members(node: ClusterNode, peer: str) -> int:
    for member in node.admin("/api/cluster")["members"]:
        if member.get("name") == peer:
            return int(member.get("remote_shared_members", 0))
    return 0


@pytest.mark.parametrize("comes_back_on", ["node-2", "node-3"])
def test_a_shared_group_whose_members_were_on_the_lost_node_keeps_its_messages(
    nodes: list[ClusterNode], comes_back_on: str
) -> None:
    """The only member of $share/workers/jobs/# has its persistent session on node-1, which
    is killed. What a device on node-3 publishes for the group meanwhile is acknowledged
    (by node-2, node-1's backup, which queues it for its copy of the member's session: MQTT
    5.0 section 4.8.2, the server waits for the member to reconnect) and the member finds
    every message, once, when it comes back on node-2 or node-3. Before REPLICA_SHARED the
    messages waited in node-3's outbox to node-1 and were lost with it."""
    owner, backup, other = nodes
    worker = Device(f"worker-{comes_back_on}", V5)
    assert not worker.connect(owner.mqtt_port)
    worker.subscribe([("$share/workers/jobs/#", 1)])
    worker.stop()
    wait_for(lambda: _copies(backup, "node-1") == 1, 10, "the copy on node-2")
    wait_for(lambda: _shared_members(other, "node-1") == 1, 10, "the member known on node-3")
    _publish(other, [("jobs/a", "before", 1)])
    owner.kill()
    wait_for(lambda: other.link_states().get("node-1") == "down", 10, "node-1 down on node-3")
    wait_for(lambda: backup.link_states().get("node-1") == "down", 10, "node-1 down on node-2")
    _publish(other, [(f"jobs/{n}", f"after-{n}", 1) for n in range(5)])
    target = backup if comes_back_on == "node-2" else other
    again = Device(worker.client_id, V5)
    assert again.connect(target.mqtt_port), "the session was lost with its node"
    got = again.received(want=6)
    again.stop()
    assert sorted(got) == ["after-0", "after-1", "after-2", "after-3", "after-4", "before"]
    copies = _replication(backup)["copies"]["counters"]
    assert copies["failover_deliveries"] == 5
    assert copies["failover_redispatched"] == 0


def test_unacknowledged_messages_for_a_member_whose_session_died_go_to_another_member(
    nodes: list[ClusterNode],
) -> None:
    """$share/pool/tasks has a member with a clean session on node-1 and one on node-3; a
    device on node-3 publishes while node-1 is frozen (SIGSTOP: the link stays up), so round
    robin sends every other message into node-3's outbox to node-1, unacknowledged, and
    their PUBACKs (and, in order, the later ones) wait. node-1 killed: those frames go to
    node-2, its backup, which keeps no copy of a clean session (it ended with its node) and
    sends each message to the other member (MQTT 5.0 section 4.8.2: "If the Client's
    Session terminates before the Client reconnects, the Server SHOULD send the Application
    Message to another Client"). Every message is acknowledged and the member on node-3 gets
    all of them, once."""
    owner, backup, other = nodes
    doomed = Device("pool-doomed", V5, clean=True)
    doomed.connect(owner.mqtt_port)
    doomed.subscribe([("$share/pool/tasks", 1)])
    survivor = Device("pool-survivor", V5, clean=True)
    survivor.connect(other.mqtt_port)
    survivor.subscribe([("$share/pool/tasks", 1)])
    wait_for(lambda: _shared_members(other, "node-1") == 1, 10, "the member known on node-3")
    publisher = Device("pool-publisher", V5, clean=True)
    publisher.connect(other.mqtt_port)
    assert owner.process is not None
    owner.process.send_signal(signal.SIGSTOP)
    try:
        for n in range(10):
            publisher.publish("tasks", f"task-{n}", 1)
        got = survivor.received(want=5, timeout=10)
        assert len(got) == 5
        # PUBACKs go in order (MQTT 4.6): from the first message for node-1 on, they wait.
        assert len(publisher.acked) <= 1
    finally:
        owner.kill()
    wait_for(lambda: len(publisher.acked) == 10, 15, "all acknowledged once node-2 has them")
    got += survivor.received(want=5)
    publisher.stop()
    survivor.stop()
    doomed.client.loop_stop()
    assert sorted(got) == sorted(f"task-{n}" for n in range(10))
    copies = _replication(backup)["copies"]["counters"]
    assert copies["failover_redispatched"] == 5
    assert "unacknowledged messages for node-1 also sent to its backup node-2" in other.log_text()


def _status_watcher(publishing: ClusterNode, watching: ClusterNode) -> Device:
    """A subscriber to status/# on ``watching`` whose route ``publishing`` knows."""
    watcher = Device(f"watcher-{time.monotonic_ns()}", V5, clean=True)
    watcher.connect(watching.mqtt_port)
    watcher.subscribe([("status/#", 1)])
    prober = Device(f"prober-{time.monotonic_ns()}", V5, clean=True)
    prober.connect(publishing.mqtt_port)
    for attempt in range(20):  # the route crosses the link within a second
        prober.publish("status/probe", f"probe-{attempt}", 1)
        if watcher.received(quiet=0.25, timeout=0.5):
            break
    prober.stop()
    watcher.received(quiet=0.5)
    return watcher


def _drop(device: Device) -> None:
    """The device's connection ends without DISCONNECT (its loop stopped first)."""
    device.client.loop_stop()
    sock = device.client.socket()
    assert sock is not None
    sock.close()


def test_the_wills_of_a_lost_nodes_clients_are_published_by_its_backup(
    nodes: list[ClusterNode],
) -> None:
    """node-1 is killed with four clients that set a will: its backup, node-2, publishes
    what node-1 would have (their connections ended without DISCONNECT): a 3.1.1 clean
    session's at once; a 5.0 session's with Will Delay 2 two seconds later; not that of a
    client that connects again (on node-3) within its 5 s delay; not that of one that had
    left with DISCONNECT; and the delayed will of an offline session node-1 kept (its
    client dropped 4 s before) at its time. Each once, seen by a subscriber on node-3."""
    owner, backup, other = nodes
    watcher = _status_watcher(backup, other)
    sudden = Device("will-sudden", V311, clean=True, will=("status/sudden", "sudden-gone"))
    slow = Device("will-slow", V5, will=("status/slow", "slow-gone"), will_delay=2)
    back = Device("will-back", V5, will=("status/back", "back-gone"), will_delay=5)
    polite = Device("will-polite", V5, clean=True, will=("status/polite", "polite-gone"))
    dropped = Device("will-dropped", V5, will=("status/dropped", "dropped-gone"), will_delay=6)
    for device in (sudden, slow, back, polite, dropped):
        device.connect(owner.mqtt_port)
    wait_for(lambda: backup.copied_wills("node-1") == 5, 10, "five wills copied to node-2")
    polite.stop()  # DISCONNECT: no will, and its copy goes
    _drop(dropped)  # node-1 waits 6 s
    wait_for(lambda: backup.copied_wills("node-1") == 3, 10, "two wills cleared on node-2")
    time.sleep(2)
    for device in (sudden, slow, back):
        device.client.loop_stop()  # they see nothing more of node-1
    owner.kill()
    wait_for(lambda: backup.link_states().get("node-1") == "down", 10, "node-1 down on node-2")
    again = Device("will-back", V5)
    assert again.connect(other.mqtt_port)  # within its 5 s: no will
    got = watcher.received(quiet=7.0, timeout=30)
    again.stop()
    watcher.stop()
    assert sorted(got) == ["dropped-gone", "slow-gone", "sudden-gone"]
    assert (
        "node node-1 is down: 1 wills of its clients published, 3 to be published after "
        "their delay unless the client comes back" in backup.log_text()
    )
    assert backup.copied_wills("node-1") == 0


def _dropped_with_a_delayed_will(
    owner: ClusterNode, backup: ClusterNode, client_id: str, topic: str, payload: str
) -> None:
    """A 5.0 client with a will delayed 4 s drops from ``owner``: its session waits offline
    there with the will due in 4 s, and the copy of its live will on ``backup`` is cleared."""
    device = Device(client_id, V5, will=(topic, payload), will_delay=4)
    device.connect(owner.mqtt_port)
    wait_for(lambda: backup.copied_wills(owner.name) == 1, 10, "the will copied to the backup")
    _drop(device)
    wait_for(lambda: backup.copied_wills(owner.name) == 0, 10, "the live will cleared")


def test_a_delayed_will_is_published_once_when_its_node_comes_back_with_its_store(
    nodes: list[ClusterNode],
) -> None:
    """An offline session's delayed will (its client dropped) is due on node-1 in 4 s.
    node-1 is killed, and node-2 takes the will over from its copy; node-1 restarts at once
    with its store (the same incarnation: it has the will again) and its snapshot reaches
    node-2, which then leaves the will to it. Published once, by node-1 (by node-2 when the
    restart outlasts the delay on a loaded machine: the test below)."""
    owner, backup, other = nodes
    watcher = _status_watcher(owner, other)
    _dropped_with_a_delayed_will(owner, backup, "will-restart", "status/restart", "restart-gone")
    owner.kill()
    wait_for(lambda: backup.link_states().get("node-1") == "down", 10, "node-1 down on node-2")
    assert "1 to be published after their delay" in backup.log_text()
    owner.start()
    wait_for(lambda: all(node.all_links_up() for node in nodes), 20, "links up again")
    got = watcher.received(quiet=6.0, timeout=30)
    watcher.stop()
    assert got == ["restart-gone"]
    logs = owner.log_text() + backup.log_text()
    assert logs.count("will published: client_id=will-restart") == 1


def test_a_delayed_will_that_fell_due_while_its_node_was_down_is_published_once(
    nodes: list[ClusterNode],
) -> None:
    """As above, but node-1 stays down past the will's delay: node-2 publishes it at its
    time. node-1 then restarts with its store, where the will still waits, overdue; node-2
    says in its HELLO that it took node-1's wills over, so node-1 leaves it to node-2 (it
    published it twice before). Once, by node-2."""
    owner, backup, other = nodes
    watcher = _status_watcher(owner, other)
    _dropped_with_a_delayed_will(owner, backup, "will-late", "status/late", "late-gone")
    owner.kill()
    assert watcher.received(quiet=1.0, timeout=20, want=1) == ["late-gone"]
    owner.start()
    wait_for(lambda: all(node.all_links_up() for node in nodes), 20, "links up again")
    got = watcher.received(quiet=3.0, timeout=10)
    watcher.stop()
    assert got == []
    assert "will published: client_id=will-late" in backup.log_text()
    assert "will published: client_id=will-late" not in owner.log_text()
    assert (
        "1 delayed wills of offline sessions fell due while this node was down: left to node "
        "node-2" in owner.log_text()
    )


def test_a_crashed_nodes_client_will_is_published_once_when_the_node_restarts_on_its_store(
    nodes: list[ClusterNode],
) -> None:
    """node-1 is killed with a client connected that set a will: its backup, node-2,
    publishes it. node-1 restarts on its store, which also kept that will (the wills of
    connected clients outlive a crash there, for when no backup has them): node-2 is still
    the same process it copied the will to, so node-1 leaves it to node-2. Once, by
    node-2."""
    owner, backup, other = nodes
    watcher = _status_watcher(backup, other)
    device = Device("crash-once", V311, clean=True, will=("status/crash-once", "crash-gone"))
    device.connect(owner.mqtt_port)
    wait_for(lambda: backup.copied_wills("node-1") == 1, 10, "the will copied to node-2")
    time.sleep(0.3)  # and committed to node-1's store (the same loop turn)
    device.client.loop_stop()
    owner.kill()
    assert watcher.received(quiet=2.0, timeout=20) == ["crash-gone"]
    owner.start()
    wait_for(lambda: all(node.all_links_up() for node in nodes), 20, "links up again")
    got = watcher.received(quiet=3.0, timeout=10)
    watcher.stop()
    assert got == []
    assert (
        "1 wills of clients connected when this node stopped: left to node node-2"
        in owner.log_text()
    )
    assert "will published: client_id=crash-once" not in owner.log_text()


def test_a_publisher_whose_acknowledgements_wait_on_a_frozen_node_is_paused(
    nodes: list[ClusterNode],
) -> None:
    """A 3.1.1 publisher with no in-flight limit on node-3 sends one message for a session on
    node-1, frozen (SIGSTOP), then 3,000 for a subscriber on node-2. Its PUBACKs go in
    order, so all wait behind the first; with ACKS_WAITING_MAX (1,024) waiting node-3 stops
    reading it (the waits stay bounded: without the cap all 3,000 would cross while node-1
    is frozen, their PUBACKs held until its link times out). node-1 killed: the first goes
    to its backup, every PUBACK comes, and the subscriber gets all 3,000 once."""
    owner, backup, other = nodes
    offline_session(owner, "frozen-session", V311)
    wait_for(lambda: _copies(backup, "node-1") == 1, 10, "the copy on node-2")
    subscriber = Device("bulk-subscriber", V311, clean=True)
    subscriber.connect(backup.mqtt_port)
    subscriber.subscribe([("bulk", 1)])
    publisher = Device("bulk-publisher", V311, clean=True)
    publisher.client.max_inflight_messages_set(0)  # no limit
    publisher.client.max_queued_messages_set(0)
    publisher.connect(other.mqtt_port)
    for attempt in range(20):  # node-2's route reaches node-3 within a second
        publisher.publish("bulk", f"probe-{attempt}", 1)
        if subscriber.received(quiet=0.25, timeout=0.5):
            break
    subscriber.received(quiet=0.5)
    acked_before = len(publisher.acked)
    assert owner.process is not None
    owner.process.send_signal(signal.SIGSTOP)
    try:
        publisher.publish("cmd/frozen-session", "frozen", 1)
        for n in range(3000):
            publisher.publish("bulk", f"bulk-{n}", 1)
        got = subscriber.received(quiet=2.0, timeout=30)
        stats = other.admin("/api/stats")
        assert stats["publishers_paused_acks"] >= 1, stats
        assert "client_id=bulk-publisher address=" in other.log_text()
        assert "acknowledgements wait (for the disk, the backup" in other.log_text()
        assert 1000 <= len(got) < 3000, len(got)
        assert len(publisher.acked) == acked_before
    finally:
        owner.kill()
    wait_for(lambda: len(publisher.acked) == acked_before + 3001, 30, "every PUBACK")
    got += subscriber.received(want=3000 - len(got), timeout=30)
    publisher.stop()
    subscriber.stop()
    assert sorted(got) == sorted(f"bulk-{n}" for n in range(3000))


def test_a_lost_node_does_not_pause_the_publishers_of_its_sessions(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``link_high_water`` (64 KiB here) paces publishers to a peer that is slow to
    acknowledge; a peer that is down acknowledges nothing until it is back, maybe never. A
    publisher on node-3 sends 300 commands of 1 KiB for a session of node-1, killed: each
    waits in node-3's outbox for node-1 and goes to node-1's backup, so every one is
    acknowledged, and the device back on node-3 gets them all. Before, the publisher was
    paused for good once 64 KiB waited for node-1 (61 acknowledged, 239 never)."""
    with running_cluster(
        pki, tmp_path_factory.mktemp("lost-pause"), cluster="link_high_water = 65536"
    ) as (owner, backup, other):
        offline_session(owner, "asleep")
        wait_for(lambda: _copies(backup, "node-1") == 1, 10, "the copy on node-2")
        owner.kill()
        wait_for(lambda: other.link_states().get("node-1") == "down", 10, "node-1 down")
        commands = [("cmd/asleep", f"{n}:".ljust(1024, "."), 1) for n in range(300)]
        _publish(other, commands)
        member = other.member("node-1")
        assert member["outbox_bytes"] > 300 * 1024
        assert member["counters"]["publishers_paused"] == 0
        device = Device("asleep", V5)
        assert device.connect(other.mqtt_port), "the session was lost with its node"
        got = device.received(want=300)
        device.stop()
        assert sorted(got) == sorted(payload for _, payload, _ in commands)


def _forget(node: ClusterNode, peer: str) -> dict[str, Any]:
    result: dict[str, Any] = node.admin(f"/api/cluster/peers/{peer}/forget", "POST")
    return result


def test_a_node_forgotten_keeps_nothing_for_it_and_rejoins_only_without_its_store(
    nodes: list[ClusterNode],
) -> None:
    """node-1 is killed for good; commands for its offline session wait in node-3's outbox
    to node-1 (and go to node-2, its backup). Forgotten on node-3 (EMQX's ``cluster
    force-leave``; refused for a node that is up), and so on node-2 (FORGET), node-3
    discards that outbox and keeps nothing more for node-1, also after its own restart: the
    commands published since reach only the backup, and the device, back, gets every one.
    node-1 restarted with its store is refused (what was kept for it is gone); started
    without it, it is a member again and its routes work."""
    owner, backup, other = nodes
    offline_session(owner, "forgotten")
    wait_for(lambda: _copies(backup, "node-1") == 1, 10, "the copy on node-2")
    _kill(owner, backup, other)
    _publish(other, [("cmd/forgotten", f"before-{n}", 1) for n in range(3)])
    assert other.member("node-1")["outbox_frames"] >= 3
    with pytest.raises(urllib.error.HTTPError) as refused:
        _forget(other, "node-2")
    assert refused.value.code == 409
    assert not other.member("node-2")["forgotten"]
    assert _forget(other, "node-1")["forgotten"]
    member = other.member("node-1")
    assert (member["forgotten"], member["outbox_frames"], member["outbox_bytes"]) == (True, 0, 0)
    assert "node node-1 forgotten by an operator" in other.log_text()
    assert "messages for its sessions go to its backup node-2 only" in other.log_text()
    wait_for(lambda: backup.member("node-1")["forgotten"], 10, "node-2 told (FORGET)")
    assert "node node-1 forgotten by node node-3" in backup.log_text()
    metrics = other.admin("/metrics")
    labels = '{node="node-3",peer="node-1"}'
    for sample in (
        f"broker_cluster_peer_forgotten_current{labels} 1",
        f"broker_cluster_peer_up_current{labels} 0",
        f"broker_cluster_peer_outbox_bytes_current{labels} 0",
        'broker_cluster_peer_up_current{node="node-3",peer="node-2"} 1',
    ):
        assert sample in metrics, sample
    assert metrics.count("# TYPE broker_cluster_peer_messages_forwarded_total counter") == 1
    other.stop()
    other.start()
    wait_for(lambda: other.link_states().get("node-2") == "up", 20, "node-3 back")
    assert other.member("node-1")["forgotten"], "forgotten is kept in the store"
    assert _replication(other)["backup"] == "node-2", "the ring closed over node-1"
    _publish(other, [("cmd/forgotten", f"after-{n}", 1) for n in range(3)])
    member = other.member("node-1")
    assert member["outbox_frames"] == 0
    assert member["counters"]["forgotten_not_kept"] >= 3
    device = Device("forgotten", V5)
    assert device.connect(other.mqtt_port), "the session was lost with its node"
    got = device.received(want=6)
    device.stop()
    assert sorted(got) == [f"after-{n}" for n in range(3)] + [f"before-{n}" for n in range(3)]
    owner.start()
    wait_for(lambda: "kept its store (the same incarnation)" in backup.log_text(), 15, "refused")
    assert owner.link_states() == {"node-2": "down", "node-3": "down"}
    told = "refused by the peer: node 'node-1' was forgotten by node 'node-2' at "
    wait_for(lambda: told in owner.log_text(), 10, "node-1 told why")
    owner.kill()
    owner.database.unlink()
    owner.start()
    wait_for(lambda: all(node.all_links_up() for node in nodes), 20, "node-1 a member again")
    assert not other.member("node-1")["forgotten"]
    assert "node node-1, forgotten, is back as a new incarnation" in other.log_text()
    device = Device("fresh", V5, clean=True)
    device.connect(owner.mqtt_port)
    device.subscribe([("cmd/fresh", 1)])
    wait_for(lambda: other.member("node-1")["remote_filters"] >= 1, 10, "its route on node-3")
    _publish(other, [("cmd/fresh", "routed", 1)])
    assert device.received(want=1) == ["routed"]
    device.stop()


def test_once_a_lost_node_is_forgotten_the_node_it_backed_up_survives_a_loss_too(
    nodes: list[ClusterNode],
) -> None:
    """node-3 is node-2's backup (and node-1 node-3's). node-3 dies: node-2's sessions have
    no copy elsewhere. Forgotten (on node-1, which tells node-2), the ring closes over them:
    node-1 is node-2's backup now and gets its snapshot. node-2 dies too: its device, back
    on node-1, finds its session with every command queued on node-2, before node-3's loss
    and after. (Before, node-2 stayed without a backup while node-3 was away: its session
    went with it.)"""
    first, second, third = nodes
    offline_session(second, "second", V5)
    wait_for(lambda: _copies(third, "node-2") == 1, 10, "the copy on node-3")
    _publish(first, [("cmd/second", f"before-{n}", 1) for n in range(3)])
    _kill(third, first, second)
    _forget(first, "node-3")  # and node-2 is told
    wait_for(lambda: _copies(first, "node-2") == 1, 10, "node-2's session copied to node-1")
    assert _replication(second)["backup"] == "node-1"
    assert "our backup is now node-1 (was node-3): our sessions are copied to it" in (
        second.log_text()
    )
    _publish(first, [("cmd/second", f"after-{n}", 1) for n in range(3)])
    second.kill()
    wait_for(lambda: first.link_states().get("node-2") == "down", 10, "node-2 down")
    device = Device("second", V5)
    assert device.connect(first.mqtt_port), "the session was lost with node-2"
    got = device.received(want=6)
    device.stop()
    assert sorted(got) == [f"after-{n}" for n in range(3)] + [f"before-{n}" for n in range(3)]


def test_a_forgotten_node_back_without_its_store_is_a_backup_again(
    nodes: list[ClusterNode],
) -> None:
    """node-3 forgotten, node-2's copies go to node-1; node-3 back as a new incarnation: the
    ring is as configured again, node-2 copies its sessions to node-3 and node-1 drops the
    ones it kept (they would go stale)."""
    first, second, third = nodes
    offline_session(second, "ring", V5)
    wait_for(lambda: _copies(third, "node-2") == 1, 10, "the copy on node-3")
    _kill(third, first, second)
    _forget(first, "node-3")  # and node-2 is told
    wait_for(lambda: _copies(first, "node-2") == 1, 10, "node-2's session copied to node-1")
    third.database.unlink()
    third.start()
    wait_for(lambda: all(node.all_links_up() for node in nodes), 20, "node-3 a member again")
    wait_for(lambda: _copies(third, "node-2") == 1, 10, "node-2's session copied to node-3")
    wait_for(lambda: _copies(first, "node-2") == 0, 10, "node-1's copy dropped")
    assert _replication(second)["backup"] == "node-3"
    assert "our backup is now node-3 (was node-1)" in second.log_text()
    _publish(first, [("cmd/ring", "queued", 1)])
    wait_for(lambda: _replication(third)["copies"]["deliveries"] == 1, 10, "copied to node-3")
    assert _replication(first)["copies"]["deliveries"] == 0


def test_a_node_is_not_forgotten_where_its_link_is_up(nodes: list[ClusterNode]) -> None:
    """node-3's link to node-1 is cut (an operator) and node-3 forgets node-1; node-2, told,
    still reaches node-1: it keeps it, and says so."""
    _, second, third = nodes
    third.admin("/api/cluster/peers/node-1/disconnect", "POST")
    wait_for(lambda: third.link_states().get("node-1") == "down", 10, "node-3 cut from node-1")
    _forget(third, "node-1")
    told = "node node-3 has forgotten node node-1, whose link is up here: not forgotten here"
    wait_for(lambda: told in second.log_text(), 10, "node-2 told")
    assert not second.member("node-1")["forgotten"]
    assert _replication(second)["backup"] == "node-3"
    assert second.link_states() == {"node-1": "up", "node-3": "up"}


def test_autoclean_forgets_a_lost_node_and_without_a_backup_its_routes(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``session_replicas = 0``, and node-3 with ``autoclean = "2s"``: node-1, killed, is
    forgotten by node-3 two seconds later, and by node-2 when node-3 tells it; with no backup
    to send its messages to, its routes go too."""
    plain = "session_replicas = 0"
    cluster = [plain, plain, f'{plain}\nautoclean = "2s"']
    with running_cluster(pki, tmp_path_factory.mktemp("autoclean"), cluster=cluster) as nodes:
        owner, told, other = nodes
        offline_session(owner, "cleaned")
        wait_for(lambda: other.member("node-1")["remote_filters"] == 1, 10, "its route")
        owner.kill()
        wait_for(lambda: other.member("node-1")["forgotten"], 15, "node-1 forgotten")
        assert other.member("node-1")["remote_filters"] == 0
        assert "node node-1 forgotten by autoclean (down for 2 s)" in other.log_text()
        assert "its 1 routes dropped: messages for its sessions are not kept" in other.log_text()
        _publish(other, [("cmd/cleaned", "nowhere", 1)])
        assert other.member("node-1")["outbox_frames"] == 0
        wait_for(lambda: told.member("node-1")["forgotten"], 10, "node-2 told (FORGET)")
        assert "node node-1 forgotten by node node-3" in told.log_text()
        assert told.member("node-1")["remote_filters"] == 0


def test_a_message_for_a_node_only_its_sender_lost_waits_at_the_backup(
    nodes: list[ClusterNode],
) -> None:
    """node-3 loses node-1 (an operator cuts the link) while node-2 still reaches it: what
    node-3 publishes for node-1's session is parked on node-2. node-1 then dies: node-2's
    link drops too and the parked message joins the copy, which the device finds on node-3.
    (Had node-1 lived, it would have had the message from node-3's outbox.)"""
    owner, backup, other = nodes
    offline_session(owner, "parked", V5)
    wait_for(lambda: _copies(backup, "node-1") == 1, 10, "the copy on node-2")
    other.admin("/api/cluster/peers/node-1/disconnect", "POST")
    wait_for(lambda: other.link_states().get("node-1") == "down", 10, "node-3 cut from node-1")
    _publish(other, [("cmd/parked", "while-cut", 1)])
    wait_for(lambda: _replication(backup)["copies"]["parked"] == {"node-1": 1}, 10, "parked")
    assert _replication(backup)["copies"]["deliveries"] == 0
    owner.kill()
    wait_for(lambda: backup.link_states().get("node-1") == "down", 10, "node-1 down")
    wait_for(lambda: _replication(backup)["copies"]["deliveries"] == 1, 10, "queued")
    assert "parked while only their sender had lost it" in backup.log_text()
    again = Device("parked", V5)
    assert again.connect(other.mqtt_port)
    assert again.received(want=1) == ["while-cut"]
    again.stop()


def test_parked_messages_are_bounded_in_bytes_logged_and_counted(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """max_queued_bytes 4096: of three 1,500-byte messages parked for node-1, the oldest
    goes (counted, one warning line), the two newest stay."""
    directory = tmp_path_factory.mktemp("parked-bound")
    with running_cluster(pki, directory, extra="max_queued_bytes = 4096") as nodes:
        owner, backup, other = nodes
        offline_session(owner, "bounded", V5)
        wait_for(lambda: _copies(backup, "node-1") == 1, 10, "the copy on node-2")
        other.admin("/api/cluster/peers/node-1/disconnect", "POST")
        wait_for(lambda: other.link_states().get("node-1") == "down", 10, "cut from node-1")
        _publish(other, [("cmd/bounded", f"{n}" * 1500, 1) for n in range(3)])
        wait_for(
            lambda: _replication(backup)["copies"]["counters"]["parked_dropped"] == 1,
            10,
            "one parked message dropped",
        )
        assert _replication(backup)["copies"]["parked"] == {"node-1": 2}
        assert "the oldest dropped (1 in all)" in backup.log_text()


def test_an_owner_restarted_without_its_store_gets_its_sessions_back(
    nodes: list[ClusterNode],
) -> None:
    """node-1 is killed and comes back empty (its database gone: a new incarnation, as a
    memory-mode node's restart). node-2, its backup, hands its copies back: node-1 has the
    session again (and copies it to node-2 again), so a message published for it on node-3
    after the restart, before the device is back, is routed there; the device back on
    node-3 finds all five, once. (Before, the copies stayed on node-2 until their devices
    came back, and node-1's empty SYNC had taken their routes: "after" was lost.) The one
    published on node-2 while node-1 was down waits in node-2's outbox to node-1 too: it is
    resent before the hand-back, and each of node-2's frames reaches node-1 once (the
    TRANSFER went ahead of the outbox, and again in it, and the older frames were taken for
    duplicates)."""
    owner, backup, other = nodes
    offline_session(owner, "reborn", V311)
    _publish(other, [("cmd/reborn", f"r{n}", 1) for n in range(3)])
    wait_for(lambda: _replication(backup)["copies"]["deliveries"] == 3, 10, "copied")
    owner.kill()
    wait_for(lambda: backup.link_states().get("node-1") == "down", 10, "node-1 down on node-2")
    _publish(backup, [("cmd/reborn", "down", 1)])
    owner.database.unlink()
    owner.start()
    wait_for(lambda: all(node.all_links_up() for node in nodes), 20, "links up again")
    assert (
        "restarted without its sessions (a new incarnation): our 1 copies of them (4 queued "
        "or in flight) handed back to it" in backup.log_text()
    )
    from_backup = next(
        member["counters"]
        for member in owner.admin("/api/cluster")["members"]
        if member["name"] == "node-2"
    )
    assert from_backup["reliable_duplicates"] == 0, from_backup
    assert from_backup["transfers_received"] == 1, from_backup
    wait_for(lambda: _copies(backup, "node-1") == 1, 10, "node-1's session copied again")
    copies = _replication(backup)["copies"]
    assert not any(name.startswith("node-1#") for name in copies["sessions"]), copies
    assert copies["counters"]["handed_back"] == 1
    _publish(other, [("cmd/reborn", "after", 1)])
    again = Device("reborn", V311)
    assert again.connect(other.mqtt_port)
    assert sorted(again.received(want=5)) == ["after", "down", "r0", "r1", "r2"]
    again.stop()


def test_a_copy_merges_into_a_fresh_session_its_claim_did_not_reach(
    nodes: list[ClusterNode],
) -> None:
    """node-1 dies while node-3 cannot reach node-2 either: the device reconnecting to node-3
    gets a fresh session; once node-3 and node-2 meet, the copy's messages are merged in."""
    owner, backup, other = nodes
    offline_session(owner, "merger", V5)
    _publish(other, [("cmd/merger", f"q{n}", 1) for n in range(3)])
    wait_for(lambda: _replication(backup)["copies"]["deliveries"] == 3, 10, "copied")
    owner.kill()
    other.admin("/api/cluster/peers/node-2/disconnect", "POST")
    wait_for(lambda: other.link_states().get("node-2") == "down", 10, "node-3 cut from node-2")
    again = Device("merger", V5, subscriptions=[("cmd/merger", 1)])
    assert not again.connect(other.mqtt_port)  # nobody reachable had it: fresh
    other.admin("/api/cluster/peers/node-2/connect", "POST")
    assert sorted(again.received(want=3, timeout=30)) == ["q0", "q1", "q2"]
    again.stop()
    assert _replication(backup)["copies"]["counters"]["merged"] == 1


def test_a_clean_start_ends_the_copy(nodes: list[ClusterNode]) -> None:
    owner, backup, other = nodes
    offline_session(owner, "cleaner", V5)
    _publish(other, [("cmd/cleaner", "old", 1)])
    wait_for(lambda: _copies(backup, "node-1") == 1, 10, "the copy on node-2")
    owner.kill()
    wait_for(lambda: backup.link_states().get("node-1") == "down", 10, "node-1 down")
    fresh = Device("cleaner", V5, clean=True)
    assert not fresh.connect(other.mqtt_port)
    assert fresh.received(quiet=1.0) == []
    fresh.stop()
    wait_for(lambda: _copies(backup, "node-1") == 0, 10, "the copy dropped")
    assert _replication(backup)["copies"]["counters"]["dropped_clean_start"] == 1


def test_the_copy_follows_the_owner_while_it_lives(nodes: list[ClusterNode]) -> None:
    """Delivered and acknowledged messages leave the copy; a session that moves between live
    nodes is deleted from its old owner's backup and copied to its new owner's."""
    owner, backup, other = nodes
    offline_session(owner, "follower", V5)
    _publish(other, [("cmd/follower", f"m{n}", 1) for n in range(4)])
    wait_for(lambda: _replication(backup)["copies"]["deliveries"] == 4, 10, "4 copied")
    again = Device("follower", V5)
    assert again.connect(owner.mqtt_port)
    assert sorted(again.received(want=4)) == ["m0", "m1", "m2", "m3"]
    again.stop()
    wait_for(lambda: _replication(backup)["copies"]["deliveries"] == 0, 10, "acked: gone")
    # Moved to node-3 (a live takeover): node-3's backup, node-1, keeps it now.
    moved = Device("follower", V5)
    assert moved.connect(other.mqtt_port)
    moved.stop()
    wait_for(lambda: _copies(backup, "node-1") == 0, 10, "node-2's copy deleted")
    wait_for(lambda: _copies(owner, "node-3") == 1, 10, "node-1 keeps node-3's copy")
    sending = _replication(other)["sending"]
    assert sending["active"] and not sending["syncing"]


def test_a_backup_that_restarts_gets_the_snapshot(nodes: list[ClusterNode]) -> None:
    owner, backup, other = nodes
    for number in range(20):
        offline_session(owner, f"snap-{number}", V311)
    _publish(other, [(f"cmd/snap-{n}", "queued", 1) for n in range(20)])
    wait_for(lambda: _copies(backup, "node-1") == 20, 10, "20 copies")
    backup.kill()
    backup.database.unlink()  # a new life without its store: it knows nothing
    backup.start()
    wait_for(lambda: _copies(backup, "node-1") == 20, 20, "the snapshot")
    assert _replication(backup)["copies"]["deliveries"] == 20
    assert "persistent sessions sent to node-2 (our backup)" in owner.log_text()


def test_no_copies_when_turned_off(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> None:
    directory = tmp_path_factory.mktemp("no-replica")
    with running_cluster(pki, directory, count=2, cluster="session_replicas = 0") as nodes:
        owner, other = nodes
        offline_session(owner, "solo", V5)
        _publish(other, [("cmd/solo", "one", 1)])
        status = _replication(other)
        assert status["backup"] is None
        assert status["copies"]["sessions"] == {}
        owner.kill()
        wait_for(lambda: other.link_states().get("node-1") == "down", 10, "node-1 down")
        again = Device("solo", V5)
        assert not again.connect(other.mqtt_port)  # as before replication: a fresh session
        again.stop()
