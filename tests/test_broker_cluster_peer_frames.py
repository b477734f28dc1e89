"""What a real node does with frames from a peer, over a real cluster link: frames a peer
should never send, a claim that comes while its backup hands its sessions back, frames past
what a node holds while it waits for that, the PONG that comes after a node's retained
messages, what a forwarding stub passes on to a session's new node once that node dies, a
claim under way when the session's node comes up, and a session handed over to a node that
dies before acknowledging it (REPLICA_TRANSFER).

node-2 is a real `broker -c FILE` process; node-1 is this test, holding node-1's certificate
and the cookie, speaking the cluster protocol with broker.cluster_codec over mutual TLS (node-1
dials: its name sorts first). A frame naming a plain filter where a shared subscription's
belongs (PUBLISH's targets, MEMBERS, REPLICA_SHARED) closes that link with a CLOSE and a log
line naming the frame and the filter; node-2 keeps running and takes the next link. The same
frames with a $share/ filter keep the link (a PING after them gets its PONG).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest

from broker import cluster_codec as codec
from broker.cluster import CLAIMS_ANSWERED_BYTES, HELD_BYTES_MAX, HELD_FRAMES_MAX
from broker.mqtt import Connack, Connect, Properties, Puback, Publish
from broker.subscriptions import SubscriptionOptions
from tests.broker_harness import RawClient
from tests.cluster_harness import (
    COOKIE,
    ClusterNode,
    Device,
    make_nodes,
    offline_session,
    wait_for,
)
from tests.harness import wait_port
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(60)

MESSAGE = codec.WireMessage("a/b", b"x", 1, False, Properties(), "node-1", "pub", 1)
_incarnations = itertools.count(int(time.time()))


@pytest.fixture(scope="module")
def cluster(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ClusterNode, ClusterNode]]:
    """node-2 running; node-1's files (certificate, configured port) for the fake peer."""
    # join_timeout 0: node-2 would otherwise wait for node-1 (it dials) before serving.
    directory = tmp_path_factory.mktemp("peer-frames")
    fake, node = make_nodes(directory, pki, count=2, cluster='join_timeout = "0s"')
    node.start()
    try:
        yield fake, node
    finally:
        node.stop()


def _session(
    version: codec.Version, topic: str = "cmd/dev", *payloads: bytes
) -> codec.SessionRecord:
    """The record of the persistent session "dev" (Session Expiry 3600) at ``version``,
    subscribed to ``topic`` at QoS 1, a QoS 1 message queued for each of ``payloads``."""
    queued = tuple(
        codec.DeliveryRecord(dataclasses.replace(MESSAGE, topic=topic, payload=payload), 1, False)
        for payload in payloads
    )
    return codec.SessionRecord(
        "dev",
        3600,
        None,
        version,
        subscriptions=((topic, SubscriptionOptions(1)),),
        deliveries=queued,
    )


@contextlib.contextmanager
def _real_node(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPKI, name: str, count: int
) -> Iterator[list[ClusterNode]]:
    """``count`` nodes' files in a fresh folder ``name``: the last one running for real
    (memory mode, join_timeout 0: it serves without waiting for the others, whom the test
    plays with FakePeer), stopped at the end."""
    nodes = make_nodes(
        tmp_path_factory.mktemp(name),
        pki,
        count=count,
        cluster='join_timeout = "0s"',
        store="memory",
    )
    nodes[-1].start()
    try:
        yield nodes
    finally:
        nodes[-1].stop()


class FakePeer:
    """``fake``'s side of a link to ``node`` (node-1's, by default): HELLO both ways, then
    frames as the test writes them."""

    def __init__(self, fake: ClusterNode, node: ClusterNode) -> None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(fake.ca))
        context.check_hostname = False
        context.load_cert_chain(str(fake.cert), str(fake.key))
        raw = socket.create_connection(("127.0.0.1", node.cluster_port), timeout=5)
        self.sock = context.wrap_socket(raw)
        self.name = fake.name
        self.decoder = codec.ClusterDecoder()
        hello = codec.Hello(
            codec.PROTOCOL_VERSION, fake.name, "chaos", COOKIE.encode(), next(_incarnations)
        )
        self.send(hello)
        first = self.frame(codec.Hello)
        assert isinstance(first, codec.Hello) and first.node == node.name, first

    def send(self, frame: codec.Frame) -> None:
        self.sock.sendall(codec.encode(frame))

    def frame(self, wanted: type) -> codec.Frame | None:
        """The next frame of type ``wanted`` or CLOSE, skipping the rest (node-2's SYNC,
        OWNED, ...); None when node-2 closed the connection."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            event = self.decoder.next_event()
            if isinstance(event, codec.NeedData):
                data = self.sock.recv(65536)
                if not data:
                    return None
                self.decoder.feed(data)
                continue
            if isinstance(event, (wanted, codec.Close)):
                return event
        raise AssertionError("no frame within 10 s")

    def frames_for(self, seconds: float) -> list[codec.Frame]:
        """Every frame node-2 sends within ``seconds``."""
        got: list[codec.Frame] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            event = self.decoder.next_event()
            if not isinstance(event, codec.NeedData):
                got.append(event)
                continue
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            finally:
                self.sock.settimeout(5)
            if not data:
                break
            self.decoder.feed(data)
        return got

    def close(self) -> None:
        self.sock.close()


def frames_naming(shared_filter: str, seq: int) -> dict[str, codec.Frame]:
    """Each frame naming ``shared_filter``; a reliable one with ``seq`` (node-2 skips a seq
    it applied already)."""
    return {
        "PUBLISH": codec.Publish(MESSAGE, False, ((shared_filter, "member"),)),
        "MEMBERS": codec.Members(False, ((1, shared_filter, "member"),)),
        "REPLICA_SHARED": codec.Reliable(
            seq, codec.ReplicaShared("node-1", ((shared_filter, "member"),), MESSAGE)
        ),
    }


@pytest.mark.parametrize("name", ["PUBLISH", "MEMBERS", "REPLICA_SHARED"])
def test_a_plain_filter_where_a_shared_one_belongs_closes_only_that_link(
    cluster: tuple[ClusterNode, ClusterNode], name: str
) -> None:
    fake, node = cluster
    peer = FakePeer(fake, node)
    peer.send(frames_naming("$share/group/a/b", 1)[name])
    peer.send(codec.Ping())
    assert isinstance(peer.frame(codec.Pong), codec.Pong)  # accepted: the link stays
    peer.send(frames_naming("a/b", 2)[name])
    close = peer.frame(codec.Close)
    peer.close()
    assert isinstance(close, codec.Close) and "protocol error" in close.reason, close
    line = f"protocol error: {name} with a plain filter 'a/b'"
    wait_for(lambda: line in node.log_text(), 5, line)
    # node-2 is up and takes node-1's next link.
    again = FakePeer(fake, node)
    again.send(codec.Ping())
    assert isinstance(again.frame(codec.Pong), codec.Pong)
    again.close()


def test_a_claim_waits_until_the_backup_has_handed_the_sessions_back(
    cluster: tuple[ClusterNode, ClusterNode],
) -> None:
    """node-1 (this test) is node-2's backup. At link up node-2 sends its PING; until
    node-1's PONG, node-1 may be handing node-2's sessions back (node-2 restarted without
    them: TRANSFERs come before the PONG). A claim for "dev" that comes then is not
    answered at once (node-2 has no "dev" yet: it would answer "none" and the session handed
    back would be left behind on node-2); once "dev" is handed back and the PONG comes,
    node-2 answers by handing "dev" over to the claimer, its queued message with it."""
    fake, node = cluster
    peer = FakePeer(fake, node)
    peer.send(codec.Claim("dev", codec.Version(1_000_000, "node-1"), False))
    early = peer.frames_for(1.0)
    assert not any(isinstance(frame, codec.ClaimReply) for frame in early), early
    record = _session(codec.Version(5, "node-2"), "a/b", MESSAGE.payload)
    peer.send(codec.Reliable(10, codec.Transfer(record.version, False, record)))
    peer.send(codec.Pong())
    answers = [
        frame.frame
        for frame in peer.frames_for(3.0)
        if isinstance(frame, codec.Reliable) and isinstance(frame.frame, codec.Transfer)
    ]
    peer.close()
    assert len(answers) == 1, answers
    transfer = answers[0]
    assert transfer.session.client_id == "dev"
    assert [d.message.payload for d in transfer.session.deliveries] == [MESSAGE.payload]
    wait_for(lambda: "session of client_id=dev handed over to node node-1" in node.log_text(), 5)


def test_what_the_backup_resends_before_its_hand_back_is_delivered_after_it_once(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """node-2 is real and starts without sessions (memory mode); node-1 (this test) is its
    backup. At link up node-1 resends its outbox first: a DELIVER its forwarding stub passed
    on for "dev" while node-2 was down; then it hands "dev" back, its copy holding the same
    message; then its PONG. node-2 delivers the DELIVER after the hand-back, where the
    session drops it as the second of that message: the device gets the command once, and
    nothing is counted or logged as dropped. Before, the DELIVER was dropped on arrival as
    "forwarded to a session that is gone" (a WARNING, a drop counted) at every such restart."""
    with _real_node(tmp_path_factory, pki, "deliver-before-hand-back", 2) as (fake, node):
        peer = FakePeer(fake, node)
        command = dataclasses.replace(MESSAGE, topic="cmd/dev", payload=b"command")
        peer.send(codec.Reliable(1, codec.Deliver("dev", codec.DeliveryRecord(command, 1, False))))
        record = _session(codec.Version(5, "node-2"), "cmd/dev", b"command")
        peer.send(codec.Reliable(2, codec.Transfer(record.version, False, record)))
        peer.send(codec.Pong())
        wait_for(lambda: "session of client_id=dev" in node.log_text(), 10, "dev handed back")
        _session_back(node, "command", quiet=1.0)
        peer.close()
        counters = node.stats()
        assert counters["messages_dropped_queue_full"] == 0
        assert counters["messages_duplicates_dropped"] == 1
        assert "forwarded to a session that is gone" not in node.log_text()


def test_the_backups_deliveries_held_for_its_pong_are_bounded_in_bytes(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """node-2 is real; node-1 (this test) is its backup. Before its PONG node-1 sends
    HELD_BYTES_MAX / 512 KiB + 1 DELIVERs of 512 KiB for a session node-2 does not have:
    node-2 holds them until the PONG up to HELD_BYTES_MAX and delivers the one past it at
    once (dropped, counted, logged: the session is not there); after the PONG the held ones
    are delivered too (dropped the same way)."""
    size = 512 * 1024
    count = HELD_BYTES_MAX // size + 1
    with _real_node(tmp_path_factory, pki, "deliver-before-pong-bytes", 2) as (fake, node):
        peer = FakePeer(fake, node)
        big = dataclasses.replace(MESSAGE, topic="cmd/gone", payload=b"x" * size)
        for seq in range(1, count + 1):
            delivery = codec.DeliveryRecord(dataclasses.replace(big, seq=seq), 1, False)
            peer.send(codec.Reliable(seq, codec.Deliver("gone", delivery)))
        wait_for(lambda: node.stats()["messages_dropped_queue_full"] == 1, 10, "one at once")
        peer.send(codec.Pong())
        wait_for(lambda: node.stats()["messages_dropped_queue_full"] == count, 10, "the rest")
        wait_for(lambda: "forwarded to a session that is gone" in node.log_text(), 10, "logged")
        peer.close()


@pytest.mark.parametrize("size", ["bytes", "frames"])
def test_frames_held_for_the_backup_past_the_bound_stop_the_reading_and_lose_nothing(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory, size: str
) -> None:
    """node-3 is real and starts without sessions (memory mode); node-1 (its backup) and
    node-2 are this test. Until node-1's PONG, node-3 holds node-2's reliable frames
    unapplied (node-1 may be handing sessions back). node-2 sends 40 MiB of them (or
    HELD_FRAMES_MAX + 10,000 small ones): past HELD_BYTES_MAX (HELD_FRAMES_MAX) held, node-3
    stops reading node-2's link (a log line, a counter) and the rest waits in the sockets,
    not in node-3's memory; node-2's sending of the 40 MiB stalls. A claim from
    node-1 then waits as well, but node-1's link is never paused. node-1's PONG: node-3
    answers the claim, applies what it held, reads again, and acknowledges every frame."""
    directory = tmp_path_factory.mktemp("held")
    backup, sender, node = make_nodes(
        directory, pki, count=3, cluster='join_timeout = "30s"', store="memory"
    )
    node.launch()
    try:
        wait_port(node.cluster_port)
        holder = FakePeer(backup, node)
        peer = FakePeer(sender, node)
        payload, count = (
            (b"p" * 65_536, 640) if size == "bytes" else (b"p", HELD_FRAMES_MAX + 10_000)
        )
        frames = [
            codec.encode(
                codec.Reliable(
                    seq,
                    codec.Publish(
                        codec.WireMessage(
                            "nobody/listens", payload, 1, False, Properties(), "node-2", "p", seq
                        ),
                        True,
                    ),
                )
            )
            for seq in range(1, count + 1)
        ]
        sent = _send_until_stalled(peer.sock, b"".join(frames), stall=2.0)
        if size == "bytes":
            assert sum(map(len, frames)) > 2 * HELD_BYTES_MAX
            assert sent < sum(map(len, frames)), "node-3 read everything it was sent"
        else:
            assert sum(map(len, frames)) < HELD_BYTES_MAX
        line = "not reading from node-2 until it is done"
        wait_for(lambda: line in node.log_text(), 5, line)
        # A claim from node-1 waits too, past the bound, but node-1's link is still read:
        # its PONG is what node-3 waits for.
        holder.send(codec.Claim("somebody", codec.Version(1_000_000, "node-1"), False))
        holder.send(codec.Pong())  # node-1 has handed back what it had (nothing)
        answers = []
        for frame in holder.frames_for(1.0):
            if isinstance(frame, codec.Replica):  # node-3's (empty) snapshot: acknowledged
                holder.send(codec.ReplicaAck(frame.seq))
            elif isinstance(frame, codec.ClaimReply):
                answers.append(frame.client_id)
        assert answers == ["somebody"]
        peer.sock.sendall(b"".join(frames)[sent:])
        acked = 0
        deadline = time.monotonic() + 30
        while acked < len(frames) and time.monotonic() < deadline:
            frame = peer.frame(codec.Ack)
            assert isinstance(frame, codec.Ack), frame
            acked = frame.seq
        assert acked == len(frames)
        for fake in (holder, peer):
            fake.send(codec.Pong())  # answers node-3's PING: node-3 has joined
        wait_for(node.admin_ready, 10, "node-3 serving")
        counters: dict[str, Any] = {
            member["name"]: member.get("counters")
            for member in node.admin("/api/cluster")["members"]
        }
        assert counters["node-2"]["held_paused"] == 1
        assert counters["node-2"]["messages_received"] == len(frames)
        holder.close()
        peer.close()
    finally:
        node.stop()


def test_a_ping_at_link_up_is_answered_after_the_retained_messages(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """node-2 keeps 20,000 retained messages of 1 KB (20 MB: more than the link's buffer
    and the sockets' take at once). At link up it sends them all to node-1 (this test),
    which sends its PING at once: the PONG comes after the last of them, so a node that
    joins on its peers' PONGs has their retained messages before it serves (a device
    subscribing on it at once gets them). Before, the PONG went out as soon as the PING was
    read, ahead of what the link had still to send (here ~2,000 of them)."""
    with _real_node(tmp_path_factory, pki, "retained-pong", 2) as (fake, node):
        count = 20_000
        publisher = RawClient(node.mqtt_port, level=4)
        publisher.connect(Connect("MQTT", 4, True, 60, "retainer"))
        for n in range(count - 1):
            publisher.send(Publish(f"kept/{n}", b"r" * 1_000, 0, retain=True))
        publisher.send(Publish(f"kept/{count - 1}", b"r" * 1_000, 1, retain=True, packet_id=1))
        assert isinstance(publisher.receive(timeout=30), Puback)  # after the others
        publisher.close()
        peer = FakePeer(fake, node)
        peer.send(codec.Ping())
        retained = 0
        while not isinstance(frame := peer.frame(codec.Retain | codec.Pong), codec.Pong):
            assert isinstance(frame, codec.Retain), frame
            retained += 1
        assert retained == count
        peer.close()


def _next(peer: FakePeer, wanted: type) -> codec.Frame:
    """The next frame of type ``wanted`` (a RELIABLE one: whose inner frame is of that type),
    answering the PINGs and acknowledging the REPLICA frames before it as a peer does."""
    while True:
        frame = peer.frame(codec.Replica | codec.Reliable | codec.Ping)
        assert frame is not None and not isinstance(frame, codec.Close), frame
        if isinstance(frame, codec.Ping):
            peer.send(codec.Pong())
        elif isinstance(frame, codec.Replica):
            peer.send(codec.ReplicaAck(frame.seq))
        elif isinstance(frame, codec.Reliable) and isinstance(frame.frame, wanted):
            return frame


def _take_over(peer: FakePeer, client_id: str) -> codec.SessionRecord:
    """``peer`` claims ``client_id``'s session (its device reconnected there): the real node
    hands it over and keeps a forwarding stub; ``peer`` acknowledges the TRANSFER."""
    # Newer than the session's version (node-2's Lamport clock starts at its wall clock).
    peer.send(codec.Claim(client_id, codec.Version(1 << 60, peer.name), False))
    reliable = _next(peer, codec.Transfer)
    assert isinstance(reliable, codec.Reliable) and isinstance(reliable.frame, codec.Transfer)
    peer.send(codec.Ack(reliable.seq))
    return reliable.frame.session


def _command(node: ClusterNode) -> None:
    """A QoS 1 "command" to cmd/dev, published on ``node`` and acknowledged."""
    publisher = Device("publisher", clean=True)
    publisher.connect(node.mqtt_port)
    try:
        publisher.publish("cmd/dev", "command", 1)
        wait_for(lambda: publisher.acked == ["command"], 10, "the command acknowledged")
    finally:
        publisher.stop()


def _session_back(node: ClusterNode, *payloads: str, quiet: float = 0.5) -> None:
    """The device "dev" connects to ``node``: its session is there (session_present) and it
    gets ``payloads``, in order, and nothing more within ``quiet`` seconds."""
    device = Device("dev")
    try:
        assert device.connect(node.mqtt_port) is True
        assert device.received(quiet=quiet, timeout=10, want=len(payloads)) == list(payloads)
    finally:
        device.stop()


def _lose(peer: FakePeer, node: ClusterNode) -> None:
    """``peer`` dies: its link closes, and ``node`` has seen it."""
    peer.close()
    wait_for(lambda: node.link_states()[peer.name] != "up", 10, f"{peer.name} down")


@pytest.mark.parametrize("when", ["down", "unacknowledged"])
def test_a_delivery_for_a_session_whose_new_node_dies_is_kept_by_its_backup(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory, when: str
) -> None:
    """node-2 is real (memory mode); node-1 is this test, and each is the other's backup.
    A device's session on node-2 moves to node-1 (its device reconnected there: node-1
    claims it, node-2 hands it over and keeps a forwarding stub) and node-1 copies it back to
    node-2, its backup. Then node-1 dies for good, and a QoS 1 command for the device is
    published on node-2 while it is down (``down``; or just before, its DELIVER still
    unacknowledged: ``unacknowledged``). node-1 never announced the device's filter, so the
    only way the command goes is the stub's DELIVER, to node-1's outbox, where nothing
    would ever take it. Now it also goes to node-1's backup (here node-2 itself), which
    queues it for its copy: the device, back on node-2, gets its session and the command.
    Before, the session came back without it: acknowledged to the publisher, lost."""
    with _real_node(tmp_path_factory, pki, f"deliver-{when}", 2) as (fake, node):
        offline_session(node, "dev")
        peer = FakePeer(fake, node)
        moved = _take_over(peer, "dev")
        assert [topic for topic, _ in moved.subscriptions] == ["cmd/dev"]
        # node-1 copies the session to its backup, node-2 (REPLICA: a reset, then the record).
        saved = dataclasses.replace(moved, deliveries=())
        op = codec.ReplicaOp(codec.ReplicaOpKind.SAVE, "dev", data=codec.encode_session(saved))
        peer.send(codec.Replica(1, True, (op,)))
        assert peer.frame(codec.ReplicaAck) == codec.ReplicaAck(1)
        publisher = Device("publisher", clean=True)
        publisher.connect(node.mqtt_port)
        try:
            if when == "down":
                _lose(peer, node)
                publisher.publish("cmd/dev", "command", 1)
            else:
                publisher.publish("cmd/dev", "command", 1)
                deliver = _next(peer, codec.Deliver)  # not acknowledged: node-1 dies
                assert isinstance(deliver, codec.Reliable)
                assert isinstance(deliver.frame, codec.Deliver)
                assert deliver.frame.delivery.message.payload == b"command"
                _lose(peer, node)
            wait_for(lambda: publisher.acked == ["command"], 10, "the command acknowledged")
        finally:
            publisher.stop()
        _session_back(node, "command")  # the copy, installed here
        copies = node.admin("/api/cluster")["replication"]["copies"]["counters"]
        assert copies["installed_here"] == 1
        assert copies["failover_deliveries"] == 1
        if when == "unacknowledged":
            line = "1 unacknowledged messages for node-1 also sent to its backup node-2"
            assert line in node.log_text()


def test_a_stub_that_points_back_at_its_own_node_does_not_loop(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """node-2 is real, node-1 (this test) dies twice. node-1's session "dev" is copied to
    node-2; node-1 dies and the device comes back on node-2, which installs the copy (and
    keeps a stub of it, to send on there what still comes for it). node-1 comes back, takes
    the session (node-2 keeps a stub pointing at node-1) and dies before copying it. A
    command published on node-2 then goes by the stub to node-1, down, so to node-1's backup,
    node-2, whose copy's stub sends it on to node-2, whose stub... The chain stops there: the
    command waits in node-1's outbox, the node and the publisher go on."""
    with _real_node(tmp_path_factory, pki, "deliver-loop", 2) as (fake, node):
        peer = FakePeer(fake, node)
        record = _session(codec.Version(1 << 59, "node-1"))
        op = codec.ReplicaOp(codec.ReplicaOpKind.SAVE, "dev", data=codec.encode_session(record))
        peer.send(codec.Replica(1, True, (op,)))
        assert peer.frame(codec.ReplicaAck) == codec.ReplicaAck(1)
        _lose(peer, node)
        device = Device("dev")
        assert device.connect(node.mqtt_port) is True  # the copy, installed on node-2
        device.stop()
        peer = FakePeer(fake, node)
        _take_over(peer, "dev")
        _lose(peer, node)
        _command(node)
        assert node.admin_ready()
        assert "Traceback" not in node.log_text()


def test_a_transfer_for_a_node_still_reached_waits_and_is_kept_once_that_node_is_lost(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """node-3 is real and node-2's backup; node-1 and node-2 are this test. node-1 lost its
    link to node-2 with a TRANSFER of "dev" unacknowledged and sends it to node-3 as
    REPLICA_TRANSFER; node-3 still reaches node-2 (it may have it, or get it when node-1's
    link is back), so it parks the session. Then node-2 is lost to node-3 too: the parked
    session becomes node-3's copy of node-2's, and the device, back on node-3, gets it with
    its queued command."""
    with _real_node(tmp_path_factory, pki, "transfer-parked", 3) as (sender, owner, node):
        owner_peer = FakePeer(owner, node)
        sender_peer = FakePeer(sender, node)
        record = _session(codec.Version(1 << 59, "node-1"), "cmd/dev", b"command")
        sender_peer.send(codec.Reliable(1, codec.ReplicaTransfer("node-2", record)))
        # node-1 is node-3's backup too: node-3's ACK waits for its REPLICA_ACKs.
        while (frame := sender_peer.frame(codec.Replica | codec.Ack | codec.Ping)) != codec.Ack(1):
            assert frame is not None and not isinstance(frame, codec.Close), frame
            if isinstance(frame, codec.Replica):
                sender_peer.send(codec.ReplicaAck(frame.seq))
            elif isinstance(frame, codec.Ping):
                sender_peer.send(codec.Pong())
        copies = node.admin("/api/cluster")["replication"]["copies"]
        assert copies["parked_sessions"] == {"node-2": 1}
        assert copies["counters"]["sessions_parked"] == 1
        _lose(owner_peer, node)
        line = (
            "client_id=dev: its session, handed over to node node-2, which was lost before it "
            "acknowledged it, kept here as a copy (1 queued or in flight)"
        )
        wait_for(lambda: line in node.log_text(), 10, "the parked session adopted")
        _session_back(node, "command")
        sender_peer.close()


def test_a_stub_follows_its_session_when_the_backup_hands_the_copy_on(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """node-3 is real; node-1 and node-2 are this test, and node-3 is node-2's backup. The
    session "dev" moves from node-3 to node-2 (a stub stays on node-3, pointing at node-2),
    node-2 copies it to node-3 and dies; the device reconnects on node-1, which claims the
    session: node-3 hands its copy over to node-1. node-2 comes back without its sessions. A
    command published on node-3 then goes by the stub to node-1, where the session is.
    Before, the stub still pointed at node-2, which dropped it ("forwarded to a session that
    is gone")."""
    with _real_node(tmp_path_factory, pki, "stub-follows", 3) as (claimer_files, owner_files, node):
        offline_session(node, "dev")
        owner = FakePeer(owner_files, node)
        moved = _take_over(owner, "dev")
        saved = dataclasses.replace(moved, deliveries=())
        op = codec.ReplicaOp(codec.ReplicaOpKind.SAVE, "dev", data=codec.encode_session(saved))
        owner.send(codec.Replica(1, True, (op,)))
        assert owner.frame(codec.ReplicaAck) == codec.ReplicaAck(1)
        _lose(owner, node)
        claimer = FakePeer(claimer_files, node)
        handed = _take_over(claimer, "dev")
        assert handed.client_id == "dev"
        owner = FakePeer(owner_files, node)  # back, a new incarnation
        wait_for(lambda: node.link_states()["node-2"] == "up", 10, "node-2 back")
        publisher = Device("publisher", clean=True)
        publisher.connect(node.mqtt_port)
        try:
            publisher.publish("cmd/dev", "command", 1)
            reliable = _next(claimer, codec.Deliver)
            assert isinstance(reliable, codec.Reliable)
            assert isinstance(reliable.frame, codec.Deliver)
            assert reliable.frame.client_id == "dev"
            assert reliable.frame.delivery.message.payload == b"command"
            claimer.send(codec.Ack(reliable.seq))
            wait_for(lambda: publisher.acked == ["command"], 10, "the command acknowledged")
        finally:
            publisher.stop()
        owner.close()
        claimer.close()


def test_a_delivery_for_a_node_that_is_down_goes_to_its_backup_over_the_link(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """node-3 is real; node-1 and node-2 (node-1's backup) are this test. A session on
    node-3 moves to node-1, which dies; a QoS 1 command published on node-3 for it then goes
    by the stub's DELIVER to node-1's outbox and, as REPLICA_DELIVER naming node-1 and the
    client id, to node-2, which acknowledges it."""
    with _real_node(tmp_path_factory, pki, "deliver-backup", 3) as (owner, backup, node):
        offline_session(node, "dev")
        keeper = FakePeer(backup, node)
        peer = FakePeer(owner, node)
        _take_over(peer, "dev")
        _lose(peer, node)
        publisher = Device("publisher", clean=True)
        publisher.connect(node.mqtt_port)
        try:
            publisher.publish("cmd/dev", "command", 1)
            reliable = _next(keeper, codec.ReplicaDeliver)
            assert isinstance(reliable, codec.Reliable)
            frame = reliable.frame
            assert isinstance(frame, codec.ReplicaDeliver)
            assert (frame.origin, frame.client_id) == ("node-1", "dev")
            assert (frame.delivery.message.topic, frame.delivery.message.payload) == (
                "cmd/dev",
                b"command",
            )
            assert frame.delivery.qos == 1
            keeper.send(codec.Ack(reliable.seq))
            wait_for(lambda: publisher.acked == ["command"], 10, "the command acknowledged")
        finally:
            publisher.stop()
        member = node.member("node-2")
        assert member["counters"]["failover_sent"] == 1
        keeper.close()


def _hand_over_unacknowledged(peer: FakePeer, client_id: str) -> codec.SessionRecord:
    """``peer`` claims ``client_id``'s session and reads the TRANSFER without acknowledging
    it (it dies next)."""
    peer.send(codec.Claim(client_id, codec.Version(1 << 60, peer.name), False))
    reliable = _next(peer, codec.Transfer)
    assert isinstance(reliable, codec.Reliable) and isinstance(reliable.frame, codec.Transfer)
    return reliable.frame.session


def test_a_session_handed_to_a_node_that_dies_before_acknowledging_it_is_kept_by_its_backup(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """node-2 is real (memory mode); node-1 is this test, and each is the other's backup.
    A device's offline session on node-2 holds a QoS 1 command; node-1 claims the session
    (its device reconnected there), node-2 hands it over (TRANSFER, removed here, a stub
    kept) and node-1 dies before acknowledging it. node-2, node-1's backup, keeps the session
    as a copy of node-1's; a second command, sent on by the stub, queues there too; the
    device, back on node-2, gets its session and both commands. Before, the TRANSFER waited
    in node-1's outbox and went nowhere: a fresh session, both commands lost."""
    with _real_node(tmp_path_factory, pki, "transfer-lost", 2) as (fake, node):
        offline_session(node, "dev")
        publisher = Device("publisher", clean=True)
        publisher.connect(node.mqtt_port)
        try:
            publisher.publish("cmd/dev", "first", 1)
            wait_for(lambda: publisher.acked == ["first"], 10, "the first command acknowledged")
            peer = FakePeer(fake, node)
            handed = _hand_over_unacknowledged(peer, "dev")
            assert [d.message.payload for d in handed.deliveries] == [b"first"]
            _lose(peer, node)
            publisher.publish("cmd/dev", "second", 1)
            wait_for(lambda: publisher.acked == ["first", "second"], 10, "the second one")
        finally:
            publisher.stop()
        line = (
            "client_id=dev: its session, handed over to node node-1, which was lost before it "
            "acknowledged it, kept here as a copy (1 queued or in flight)"
        )
        wait_for(lambda: line in node.log_text(), 10, "the session adopted")
        _session_back(node, "first", "second")  # the copy, installed here
        copies = node.admin("/api/cluster")["replication"]["copies"]["counters"]
        assert copies["adopted"] == 1
        assert copies["installed_here"] == 1


def test_a_transfer_a_node_did_not_acknowledge_goes_to_its_backup_over_the_link(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """node-3 is real; node-1 and node-2 (node-1's backup) are this test. node-3 hands a
    session with a queued command over to node-1, which dies before acknowledging the
    TRANSFER: the session goes to node-2 as REPLICA_TRANSFER naming node-1, with the
    command, and node-2 acknowledges it."""
    with _real_node(tmp_path_factory, pki, "transfer-backup", 3) as (owner, backup, node):
        offline_session(node, "dev")
        _command(node)
        keeper = FakePeer(backup, node)
        peer = FakePeer(owner, node)
        handed = _hand_over_unacknowledged(peer, "dev")
        _lose(peer, node)
        reliable = _next(keeper, codec.ReplicaTransfer)
        assert isinstance(reliable, codec.Reliable)
        frame = reliable.frame
        assert isinstance(frame, codec.ReplicaTransfer)
        assert frame.origin == "node-1"
        assert frame.session == handed
        assert [d.message.payload for d in frame.session.deliveries] == [b"command"]
        keeper.send(codec.Ack(reliable.seq))
        member = node.member("node-2")
        assert member["counters"]["failover_sent"] == 1
        line = "1 unacknowledged sessions (TRANSFER) for node-1 also sent to its backup node-2"
        assert line in node.log_text()
        keeper.close()


def _send_until_stalled(sock: ssl.SSLSocket, data: bytes, stall: float) -> int:
    """Send ``data`` until it is all sent or nothing more goes for ``stall`` seconds; how
    many bytes went."""
    sent = 0
    sock.settimeout(stall)
    try:
        while sent < len(data):
            sent += sock.send(data[sent : sent + 65_536])
    except TimeoutError:
        pass
    finally:
        sock.settimeout(5)
    return sent


def test_a_claim_under_way_goes_to_a_peer_that_comes_up_meanwhile(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """node-3 is real; node-1 and node-2 are this test. node-1 is down when the device
    connects on node-3, so node-3 claims "dev" from node-2 only, which takes its time to
    answer. node-1 comes up meanwhile holding the session, a queued command in it (as a node
    restarted while its backup handed its sessions back to it). node-3 claims "dev" from
    node-1 too: node-1 hands the session over, and the device gets it (session_present) and
    the command. Found in the fleet's rolling restart (3 commands of a device queued on the
    restarted broker-2, never delivered): before, the claim settled on node-2's answer alone
    as a fresh session, node-1 was never asked, and node-1's OWNED at link up was skipped
    because the claim was under way."""
    with _real_node(tmp_path_factory, pki, "late-claim", 3) as (owner, slow, node):
        keeper = FakePeer(slow, node)
        client = RawClient(node.mqtt_port, 5)
        properties = Properties(session_expiry_interval=3600)
        client.send(Connect("MQTT", 5, False, 60, "dev", properties=properties))
        asked = keeper.frame(codec.Claim)
        assert isinstance(asked, codec.Claim) and asked.client_id == "dev", asked
        peer = FakePeer(owner, node)
        claim = peer.frame(codec.Claim)
        assert isinstance(claim, codec.Claim), claim
        assert (claim.client_id, claim.version) == ("dev", asked.version)
        record = _session(codec.Version(5, "node-1"), "cmd/dev", b"command")
        peer.send(codec.Reliable(1, codec.Transfer(claim.version, False, record)))
        keeper.send(codec.ClaimReply("dev", asked.version, False))
        connack = client.receive(timeout=10)
        assert isinstance(connack, Connack) and connack.reason_code == 0, connack
        assert connack.session_present
        publish = client.receive(timeout=10)
        assert isinstance(publish, Publish) and publish.payload == b"command", publish
        client.close()
        peer.close()
        keeper.close()


def test_a_session_migrated_after_a_newer_claim_goes_on_to_the_claimer(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """node-3 is real; node-1 (an evacuated node migrating its sessions) and node-2 (where
    the device reconnected) are this test. node-2's claim for "dev" reaches node-3 before
    node-1's TRANSFER of the session (migrated unasked, with a queued command): node-3 answers
    "none" (node-2 made a fresh session). When the TRANSFER comes, node-3 sends the session
    on to node-2, merged into the fresh one (its version: node-2's claim's), the command in
    it, and keeps a stub that sends on what node-1's stub still sends here. Before, node-3
    installed it and kept it: two sessions, the command never delivered."""
    with _real_node(tmp_path_factory, pki, "migrated-late", 3) as (migrating, claimer, node):
        device_node = FakePeer(claimer, node)
        version = codec.Version(1 << 60, "node-2")
        device_node.send(codec.Claim("dev", version, False))
        reply = device_node.frame(codec.ClaimReply)
        assert reply == codec.ClaimReply("dev", version, False), reply
        evacuated = FakePeer(migrating, node)
        record = _session(codec.Version(5, "node-1"), "cmd/dev", MESSAGE.payload)
        evacuated.send(codec.Reliable(1, codec.Transfer(record.version, False, record)))
        reliable = _next(device_node, codec.Transfer)
        assert isinstance(reliable, codec.Reliable) and isinstance(reliable.frame, codec.Transfer)
        transfer = reliable.frame
        assert (transfer.version, transfer.merge) == (version, True)
        assert transfer.session.client_id == "dev"
        assert [d.message.payload for d in transfer.session.deliveries] == [MESSAGE.payload]
        device_node.send(codec.Ack(reliable.seq))
        line = "client_id=dev: its session, migrated here by node node-1, went on to node node-2"
        wait_for(lambda: line in node.log_text(), 5, line)
        # What node-1's stub still sends on to us for "dev" goes on to node-2 (our stub).
        later = dataclasses.replace(MESSAGE, topic="cmd/dev", payload=b"later")
        delivery = codec.DeliveryRecord(later, 1, False)
        evacuated.send(codec.Reliable(2, codec.Deliver("dev", delivery)))
        reliable = _next(device_node, codec.Deliver)
        assert isinstance(reliable, codec.Reliable) and isinstance(reliable.frame, codec.Deliver)
        assert reliable.frame.client_id == "dev"
        assert reliable.frame.delivery.message.payload == b"later"
        evacuated.close()
        device_node.close()


def test_claims_answered_none_are_remembered_within_a_byte_bound(
    cluster: tuple[ClusterNode, ClusterNode],
) -> None:
    """A node remembers the claims it answered with no session (for a session migrated to it
    after one): at most CLAIMS_ANSWERED_BYTES of client ids. node-1 claims 20 client ids of
    60,000 bytes each: all are answered, the node keeps the 17 that fit in 1 MiB, the 3
    oldest beyond it are forgotten, counted on node-1 and logged."""
    fake, node = cluster
    before = node.member("node-1")
    peer = FakePeer(fake, node)
    peer.send(codec.Pong())  # node-1 is node-2's backup: synced, so claims are answered
    version = codec.Version(1 << 61, "node-1")
    names = [f"long-{n:02d}-" + "x" * (60_000 - 8) for n in range(20)]
    for name in names:
        peer.send(codec.Claim(name, version, False))
    for name in names:
        assert peer.frame(codec.ClaimReply) == codec.ClaimReply(name, version, False)
    status = node.admin("/api/cluster")
    member = {m["name"]: m for m in status["members"]}["node-1"]
    forgotten = member["counters"]["claims_answered_forgotten"]
    assert forgotten - before["counters"]["claims_answered_forgotten"] == 3
    assert status["claims_answered_bytes"] <= CLAIMS_ANSWERED_BYTES
    line = "claims (or 1048576 bytes of client ids) answered with no session here"
    wait_for(lambda: line in node.log_text(), 5, line)
    peer.close()
