"""broker.replica's bookkeeping, pure (the processes are in test_broker_cluster_replication.py):
the owner's promises wait for the backup's REPLICA_ACK in the order they were made, and for
a snapshot's end; the backup's copies follow the owner's writes, take failover messages
within the session bounds, hand over with a message that reached them twice once, and expire.
"""

from __future__ import annotations

import time

import pytest

from broker import cluster_codec as codec
from broker import replica as replica_module
from broker.cluster_codec import ReplicaOp, ReplicaOpKind
from broker.config import MQTTSettings
from broker.core import MOVED_GRACE, Broker
from broker.message import Message
from broker.mqtt import Properties
from broker.replica import (
    FAILOVER_KEY_BASE,
    PARKED_SECONDS,
    REPLICA_FRAME_BYTES,
    Delivered,
    Forwarded,
    Replicas,
    ReplicatedStore,
    Replicator,
    backup_of,
)
from broker.store import MemoryStore
from broker.subscriptions import SubscriptionOptions

V = codec.Version(1, "node-1")


def message(
    seq: int, topic: str = "cmd/dev", payload: bytes = b"x", qos: int = 1
) -> codec.WireMessage:
    return codec.WireMessage(topic, payload, qos, False, Properties(), "node-3", "pub", seq)


def save(
    client_id: str = "dev", filters: tuple[str, ...] = ("cmd/dev",), expiry: int = 60
) -> ReplicaOp:
    record = codec.SessionRecord(
        client_id,
        expiry,
        None,
        V,
        subscriptions=tuple((f, SubscriptionOptions(qos=1)) for f in filters),
    )
    return ReplicaOp(ReplicaOpKind.SAVE, client_id, data=codec.encode_session(record))


def add(key: int, seq: int, client_id: str = "dev") -> ReplicaOp:
    data = codec.encode_delivery(codec.DeliveryRecord(message(seq), 1, False))
    return ReplicaOp(ReplicaOpKind.DELIVERY_ADD, client_id, key, data=data)


def test_the_backup_is_the_next_node_in_a_ring() -> None:
    nodes = ["node-2", "node-3", "node-1"]
    assert [backup_of(n, nodes) for n in ("node-1", "node-2", "node-3")] == [
        "node-2",
        "node-3",
        "node-1",
    ]
    assert backup_of("solo", ["solo"]) is None
    assert backup_of("a", ["b"]) == "b" and backup_of("b", ["a"]) == "a"


def test_promises_wait_for_the_ack_of_their_writes_in_order() -> None:
    replicator = Replicator()
    flushes: list[bool | None] = []
    replicator.on_pending = flushes.append
    ran: list[str] = []
    # Inactive (no link to the backup): nothing is kept, nothing waits.
    replicator.add(add(1, 1))
    assert replicator.target() is None and not replicator.ops
    replicator.when_acked(replicator.target(), lambda: ran.append("idle"))
    assert ran == ["idle"]

    replicator.start()
    reset = replicator.frame((), reset=True)
    assert reset.reset and reset.seq == 1
    replicator.snapshot_sent()  # an empty snapshot, no frame after the reset
    replicator.add(add(1, 1))
    replicator.add(add(2, 2))
    assert flushes == [True]  # one flush per batch, after the linger
    first = replicator.target()
    replicator.when_acked(first, lambda: ran.append("first"))
    (frame,) = replicator.frames()
    assert frame.seq == 2 and len(frame.ops) == 2
    replicator.add(add(3, 3))
    replicator.when_acked(replicator.target(), lambda: ran.append("second"))
    # A promise with nothing of its own still waits behind the ones before it.
    replicator.when_acked(None, lambda: ran.append("third"))
    for callback in replicator.ack(1):  # the reset: not the writes
        callback()
    assert ran == ["idle"]
    for callback in replicator.ack(2):
        callback()
    assert ran == ["idle", "first"]
    (frame,) = replicator.frames()
    for callback in replicator.ack(frame.seq):
        callback()
    assert ran == ["idle", "first", "second", "third"]
    assert replicator.ack(frame.seq) == []  # a repeated ACK
    assert replicator.ack(99) == []  # one for a frame never sent
    assert replicator.target() is None


def test_nothing_is_promised_before_the_snapshot_is_acked() -> None:
    """A write to a session the snapshot has not reached is skipped by the backup (the
    session comes whole later): its promise waits for the snapshot's last frame."""
    replicator = Replicator()
    ran: list[str] = []
    replicator.start()
    replicator.frame((), reset=True)
    snapshot = replicator.frame((save(),))  # as Cluster._snapshot numbers its frames
    replicator.add(add(1, 1))
    replicator.when_acked(replicator.target(), lambda: ran.append("live"))
    (live,) = replicator.frames()
    assert replicator.ack(live.seq) == []  # acked, but the snapshot is not over
    last = replicator.frame((save("other"),))
    replicator.snapshot_sent()
    assert snapshot.seq < live.seq < last.seq
    replicator.when_acked(replicator.target(), lambda: ran.append("after"))
    for callback in replicator.ack(last.seq):
        callback()
    assert ran == ["live", "after"]
    assert not replicator.waiters


def test_a_link_lost_releases_every_promise() -> None:
    replicator = Replicator()
    ran: list[int] = []
    replicator.start()
    replicator.snapshot_sent()
    for number in range(3):
        replicator.add(add(number + 1, number + 1))
        replicator.when_acked(replicator.target(), lambda n=number: ran.append(n))
    for callback in replicator.stop():
        callback()
    assert ran == [0, 1, 2]
    assert not replicator.active and replicator.target() is None
    replicator.add(add(9, 9))  # kept by nobody: the next snapshot carries it
    assert not replicator.ops


def test_large_batches_are_cut_into_frames() -> None:
    replicator = Replicator()
    replicator.start()
    replicator.snapshot_sent()
    big = codec.encode_delivery(codec.DeliveryRecord(message(1, payload=b"p" * 100_000), 1, False))
    for key in range(1, 8):
        replicator.add(ReplicaOp(ReplicaOpKind.DELIVERY_ADD, "dev", key, data=big))
    frames = list(replicator.frames())
    assert len(frames) == 3  # ~100 KB ops, about REPLICA_FRAME_BYTES a frame
    assert all(len(codec.encode(f)) < 2 * REPLICA_FRAME_BYTES for f in frames)
    assert sum(len(f.ops) for f in frames) == 7
    assert [f.seq for f in frames] == [1, 2, 3]


def test_the_replicated_store_counts_writes_and_waits_for_both() -> None:
    replicator = Replicator()
    store = ReplicatedStore(MemoryStore(), replicator)
    assert store.durable
    before = store.generation
    store.save_session(codec.SessionRecord("dev", 60, None, V))
    store.add_delivery("dev", 1, codec.DeliveryRecord(message(1), 1, False))
    assert store.generation == before + 2
    ran: list[str] = []
    store.after_commit(lambda: ran.append("inactive"))
    assert ran == ["inactive"]
    replicator.start()
    replicator.snapshot_sent()
    store.update_delivery("dev", 1, 4, True, False)
    store.remove_incoming("dev", 4)
    store.after_commit(lambda: ran.append("replicated"))
    assert ran == ["inactive"] and store.pending()
    frames = list(replicator.frames())
    assert [op.kind for op in frames[0].ops] == [
        ReplicaOpKind.DELIVERY_UPDATE,
        ReplicaOpKind.INCOMING_REMOVE,
    ]
    for callback in replicator.ack(frames[-1].seq):
        callback()
    assert ran == ["inactive", "replicated"]
    store.set_meta("k", b"v")  # a node write: not replicated
    assert not replicator.ops


def test_copies_follow_the_owners_writes() -> None:
    replicas = Replicas(max_queued_messages=10, max_queued_bytes=1000)
    replicas.apply("node-1", codec.Replica(1, True, (save(), add(1, 1), add(2, 2))))
    replicas.apply(
        "node-1",
        codec.Replica(
            2,
            False,
            (
                ReplicaOp(ReplicaOpKind.DELIVERY_REMOVE, "dev", 1),
                ReplicaOp(ReplicaOpKind.DELIVERY_UPDATE, "dev", 2, 7, True, False),
                ReplicaOp(ReplicaOpKind.INCOMING_ADD, "dev", packet_id=3),
                add(5, 5, client_id="unknown"),  # not in the snapshot yet: skipped
            ),
        ),
    )
    assert replicas.find("dev") == "node-1" and replicas.find("unknown") is None
    assert len(replicas) == 1 and replicas.bytes > 0
    record = replicas.take("node-1", "dev")
    assert record is not None
    assert record.incoming_qos2 == (3,)
    (delivery,) = record.deliveries
    assert (delivery.message.seq, delivery.packet_id, delivery.inflight) == (2, 7, True)
    assert replicas.bytes == 0 and len(replicas) == 0
    assert replicas.take("node-1", "dev") is None
    # DELETE, and a reset: the owner's snapshot starts over.
    replicas.apply("node-1", codec.Replica(3, False, (save("a"), save("b"))))
    replicas.apply("node-1", codec.Replica(4, False, (ReplicaOp(ReplicaOpKind.DELETE, "a"),)))
    assert replicas.status()["sessions"] == {"node-1": 1}
    replicas.apply("node-1", codec.Replica(5, True, ()))
    assert len(replicas) == 0 and replicas.bytes == 0
    assert replicas.counters.resets == 2


def test_failover_messages_queue_within_bounds_and_hand_over_once() -> None:
    replicas = Replicas(max_queued_messages=3, max_queued_bytes=1000)
    replicas.apply(
        "node-1",
        codec.Replica(1, True, (save("dev", ("cmd/#",)), save("other", ("else",)), add(1, 1))),
    )
    # The owner had seq 1 already: the copy of it is queued, and handed over once.
    assert replicas.failover("node-1", message(1), 0.0) == (1, [])
    assert replicas.failover("node-1", message(2, qos=2), 0.0) == (1, [])
    assert replicas.failover("node-1", message(3, topic="nobody"), 0.0) == (0, [])
    assert replicas.failover("node-1", message(4), 0.0) == (0, ["dev"])  # 3 queued: full
    assert replicas.failover("node-9", message(5), 0.0) == (0, [])
    record = replicas.take("node-1", "dev")
    assert record is not None
    assert [(d.message.seq, d.qos) for d in record.deliveries] == [(1, 1), (2, 1)]
    counters = replicas.counters
    assert (counters.failover_deliveries, counters.failover_dropped) == (2, 1)
    # The trie follows SAVE and take: "dev" is gone, a new subscriber of "else" is found.
    replicas.apply("node-1", codec.Replica(2, False, (save("other", ("else", "cmd/x")),)))
    assert replicas.failover("node-1", message(6, topic="cmd/x"), 0.0) == (1, [])
    assert replicas.failover("node-1", message(7, topic="cmd/dev"), 0.0) == (0, [])
    assert max(replicas.origins["node-1"]["other"].deliveries) >= FAILOVER_KEY_BASE


@pytest.mark.parametrize("trie_before", [True, False])
def test_a_copy_handed_over_sends_on_what_still_arrives_for_it_for_a_grace(
    trie_before: bool,
) -> None:
    """A failover message for a copy already handed over (routed to the down owner before
    its sender knew the session moved) is sent on to the session's node, for its plain and
    shared subscriptions, until MOVED_GRACE is over; then the stub and its routes go. The
    owner's trie is built when the first failover message needs it: before or after the
    handover, the stub is in it."""
    replicas = Replicas(max_queued_messages=10, max_queued_bytes=1000)
    replicas.apply("node-1", codec.Replica(1, True, (save("dev", ("cmd/dev", "$share/g/jobs")),)))
    if trie_before:
        assert replicas.failover("node-1", message(1), 0.0) == (1, [])
    record = replicas.take("node-1", "dev", moved_to="node-3", now=100.0)
    assert record is not None and len(record.deliveries) == int(trie_before)
    assert replicas.find("dev") is None and replicas.status()["moved"] == {"node-1": 1}
    assert replicas.failover("node-1", message(2), 101.0) == (0, [])
    shared = replicas.failover_shared(
        "node-1", message(3, topic="jobs"), (("$share/g/jobs", "dev"),), 102.0
    )
    assert shared == (0, [], [])
    assert replicas.failover("node-1", message(4, topic="nobody"), 102.0) == (0, [])
    forwards = replicas.take_forwards()
    assert [(node, client_id, d.message.seq, d.qos) for node, client_id, d in forwards] == [
        ("node-3", "dev", 2, 1),
        ("node-3", "dev", 3, 1),
    ]
    assert replicas.take_forwards() == [] and replicas.counters.failover_forwarded == 2
    # The grace is over: nothing is sent on; the member is handed back for another member.
    late = 100.0 + MOVED_GRACE
    assert replicas.failover("node-1", message(5), late) == (0, [])
    assert replicas.failover_shared(
        "node-1", message(6, topic="jobs"), (("$share/g/jobs", "dev"),), late
    ) == (0, [], [("$share/g/jobs", "dev")])
    assert replicas.take_forwards() == []
    assert replicas.forget_moved(late) == 1 and replicas.moved == {}
    assert list(replicas.tries["node-1"].match("cmd/dev", None, shared=False)) == []


def test_a_clean_start_ends_the_stub_of_a_copy_handed_over() -> None:
    replicas = Replicas(max_queued_messages=10, max_queued_bytes=1000)
    replicas.apply("node-1", codec.Replica(1, True, (save(),)))
    assert replicas.take("node-1", "dev", moved_to="node-2", now=0.0) is not None
    replicas.drop_moved("dev")
    assert replicas.failover("node-1", message(1), 1.0) == (0, [])
    assert replicas.take_forwards() == [] and replicas.moved == {}


def test_a_failover_message_counts_against_the_byte_bound() -> None:
    replicas = Replicas(max_queued_messages=100, max_queued_bytes=300)
    replicas.apply("node-1", codec.Replica(1, True, (save(),)))
    assert replicas.failover("node-1", message(1, payload=b"p" * 200), 0.0) == (1, [])
    assert replicas.failover("node-1", message(2, payload=b"p" * 200), 0.0) == (0, ["dev"])


@pytest.mark.parametrize(
    ("expiry", "expires_in", "gone"),
    [(60, None, True), (7200, None, False), (0xFFFFFFFF, None, False), (7200, 30.0, True)],
)
def test_copies_of_a_node_that_is_down_expire(
    expiry: int, expires_in: float | None, gone: bool
) -> None:
    """A connected session's expiry counts from when its owner went down; an offline one's
    deadline is its own; 0xFFFFFFFF never expires."""
    replicas = Replicas(10, 1000)
    now = 1_000_000.0
    record = codec.SessionRecord(
        "dev", expiry, None if expires_in is None else now - 3600 + expires_in, V
    )
    op = ReplicaOp(ReplicaOpKind.SAVE, "dev", data=codec.encode_session(record))
    replicas.apply("node-1", codec.Replica(1, True, (op,)))
    down_since = now - 3600
    assert replicas.expire("node-1", down_since, now) == (1 if gone else 0)
    assert (replicas.find("dev") is None) == gone


def test_parked_failover_messages_are_queued_if_the_owner_goes_down_in_time() -> None:
    """The sender lost the owner, this node has not (yet): the messages wait PARKED_SECONDS
    for our link to drop too; after that they were the owner's, and go."""
    replicas = Replicas(10, 1000)
    replicas.apply("node-1", codec.Replica(1, True, (save(),)))
    replicas.park("node-1", message(1), now=100.0)
    replicas.park("node-1", message(2), now=125.0)
    assert replicas.status()["parked"] == {"node-1": 2}
    queued, dropped, elsewhere = replicas.owner_down("node-1", now=100.0 + PARKED_SECONDS + 1)
    assert (queued, dropped, elsewhere) == (1, [], [])  # the first one waited too long
    assert replicas.counters.parked_discarded == 1
    record = replicas.take("node-1", "dev")
    assert record is not None and [d.message.seq for d in record.deliveries] == [2]
    assert replicas.parked == {}


def test_parked_messages_of_an_owner_that_stays_up_are_discarded_and_bounded() -> None:
    replicas = Replicas(10, 250)
    replicas.apply("node-1", codec.Replica(1, True, (save(),)))
    for seq in range(1, 4):
        replicas.park("node-1", message(seq, payload=b"p" * 100), now=float(seq))
    assert len(replicas.parked["node-1"]) == 2  # 300 bytes > max_queued_bytes 250
    assert replicas.counters.parked_dropped == 1
    replicas.discard_parked("node-1", now=2.5 + PARKED_SECONDS)  # seq 2 is old, 3 is not
    assert [m.seq for _, m, _ in replicas.parked["node-1"]] == [3]
    replicas.apply("node-1", codec.Replica(2, True, ()))  # the owner's new snapshot
    assert replicas.parked == {} and replicas.parked_bytes == {}


def test_copies_of_an_owner_that_restarted_empty_are_kept_apart() -> None:
    replicas = Replicas(10, 1000)
    replicas.apply("node-1", codec.Replica(1, True, (save(), add(1, 1))), incarnation=7)
    assert replicas.orphan("node-1", 7) is None  # the same life (it kept its store)
    assert replicas.orphan("node-2", 9) is None  # no copies of that node
    name = replicas.orphan("node-1", 8)
    assert name == "node-1#7"
    replicas.apply("node-1", codec.Replica(1, True, ()), incarnation=8)  # its empty snapshot
    assert replicas.status()["sessions"] == {"node-1#7": 1}
    assert replicas.find("dev") == "node-1#7"
    assert replicas.failover("node-1#7", message(2), 0.0) == (1, [])  # its trie came along
    record = replicas.take("node-1#7", "dev")
    assert record is not None and [d.message.seq for d in record.deliveries] == [1, 2]


def test_a_delivery_that_does_not_decode_is_dropped_at_the_handover_and_counted() -> None:
    """Delivery records are kept as the owner sent them and decoded when used (one per
    message: not checked on arrival); one that does not decode then is dropped, not the
    session."""
    replicas = Replicas(10, 1000)
    broken = ReplicaOp(ReplicaOpKind.DELIVERY_ADD, "dev", 2, data=b"\x03")
    replicas.apply("node-1", codec.Replica(1, True, (save(), add(1, 1), broken, add(3, 3))))
    record = replicas.take("node-1", "dev")
    assert record is not None and [d.message.seq for d in record.deliveries] == [1, 3]
    assert replicas.counters.undecodable == 1
    replicas.apply("node-1", codec.Replica(2, False, (save(), broken)))
    update = ReplicaOp(ReplicaOpKind.DELIVERY_UPDATE, "dev", 2, 5, True, False)
    replicas.apply("node-1", codec.Replica(3, False, (update,)))
    assert replicas.counters.undecodable == 2 and replicas.bytes == len(save().data)


def remove(key: int, client_id: str = "dev") -> ReplicaOp:
    return ReplicaOp(ReplicaOpKind.DELIVERY_REMOVE, client_id, key)


def test_a_delivery_acknowledged_within_the_linger_is_never_sent() -> None:
    """The add and its remove cancel out before the batch leaves: no frame, no encoding,
    and the promise that waited for the add runs when the client acknowledges."""
    replicator = Replicator()
    calls: list[bool | None] = []
    replicator.on_pending = calls.append
    replicator.start()
    replicator.snapshot_sent()
    ran: list[str] = []
    record = codec.DeliveryRecord(message(1), 1, False)
    replicator.add(ReplicaOp(ReplicaOpKind.DELIVERY_ADD, "dev", 1, record=record))
    replicator.when_acked(replicator.target(), lambda: ran.append("puback"))
    assert ran == [] and calls == [True]
    replicator.add(remove(1))
    assert calls == [True, None]  # promises may be due
    for callback in replicator.due():
        callback()
    assert ran == ["puback"]
    assert list(replicator.frames()) == []
    assert replicator.cancelled == 1 and replicator.ops_sent == 0
    assert replicator.target() is None
    # A remove of an add already sent goes as a remove.
    replicator.add(add(2, 2))
    (sent,) = replicator.frames()
    assert [op.kind for op in sent.ops] == [ReplicaOpKind.DELIVERY_ADD]
    replicator.add(remove(2))
    (removal,) = replicator.frames()
    assert [op.kind for op in removal.ops] == [ReplicaOpKind.DELIVERY_REMOVE]
    assert replicator.ack(removal.seq) == [] and replicator.target() is None


def test_cancelled_ops_after_a_frame_in_flight_wait_for_its_ack() -> None:
    replicator = Replicator()
    replicator.start()
    replicator.snapshot_sent()
    ran: list[str] = []
    replicator.add(add(1, 1))
    (first,) = replicator.frames()
    replicator.add(add(2, 2))
    replicator.when_acked(replicator.target(), lambda: ran.append("both"))
    replicator.add(remove(2))  # cancelled, but the add of 1 is not acked yet
    assert replicator.due() == []
    assert list(replicator.frames()) == []
    for callback in replicator.ack(first.seq):
        callback()
    assert ran == ["both"]


def test_a_live_op_behind_a_cancelled_one_still_holds_its_promise() -> None:
    replicator = Replicator()
    replicator.start()
    replicator.snapshot_sent()
    ran: list[str] = []
    replicator.add(add(1, 1))
    replicator.add(add(2, 2))
    replicator.when_acked(replicator.target(), lambda: ran.append("p"))
    replicator.add(remove(1))
    assert replicator.due() == []  # the add of 2 is not settled
    (frame,) = replicator.frames()
    assert [op.key for op in frame.ops] == [2]
    for callback in replicator.ack(frame.seq):
        callback()
    assert ran == ["p"]


def test_a_record_saved_again_within_the_linger_goes_once() -> None:
    """A connect and its SUBSCRIBE write the record twice within a round trip: the later
    SAVE takes the earlier one's place while it is still here, and the copy ends as it would
    have with both (the ops between them leave the record alone). A DELETE between two saves
    ends it: the session is deleted, then made again."""
    writes = [
        save("dev", ("cmd/dev",)),
        add(1, 1),
        ReplicaOp(ReplicaOpKind.INCOMING_ADD, "dev", packet_id=3),
        save("dev", ("cmd/dev", "cfg/dev")),
        save("gone"),
        ReplicaOp(ReplicaOpKind.DELETE, "gone"),
        save("gone", ("cfg/gone",)),
    ]
    replicator = Replicator()
    replicator.start()
    replicator.snapshot_sent()
    ran: list[str] = []
    replicator.add(writes[0])
    replicator.when_acked(replicator.target(), lambda: ran.append("connack"))
    for op in writes[1:]:
        replicator.add(op)
    replicator.when_acked(replicator.target(), lambda: ran.append("suback"))
    assert replicator.status()["saves_coalesced"] == 1
    (frame,) = replicator.frames()
    assert frame.ops == (writes[3], *writes[1:3], *writes[4:])
    assert ran == []
    for callback in replicator.ack(frame.seq):
        callback()
    assert ran == ["connack", "suback"]

    # The copy is the one the writes one by one make.
    coalesced = Replicas(max_queued_messages=10, max_queued_bytes=10_000)
    coalesced.apply("node-1", codec.Replica(1, True, frame.ops))
    one_by_one = Replicas(max_queued_messages=10, max_queued_bytes=10_000)
    one_by_one.apply("node-1", codec.Replica(1, True, ()))
    for seq, op in enumerate(writes, 2):
        one_by_one.apply("node-1", codec.Replica(seq, False, (op,)))
    assert coalesced.bytes == one_by_one.bytes
    for client_id in ("dev", "gone"):
        assert coalesced.take("node-1", client_id) == one_by_one.take("node-1", client_id)

    # A save after its batch left is sent again.
    replicator.add(save("dev"))
    (later,) = replicator.frames()
    assert later.ops == (save("dev"),)


def test_acknowledgements_wait_for_the_peers_their_messages_went_to_in_order() -> None:
    """A publisher's PUBACK waits for the frames sent for its message (taken when it was
    routed) to be acknowledged by their peers, and after the PUBACKs of its connection made
    before it (one connection's acknowledgements keep the order of its PUBLISHes), not after
    other connections': a peer that does not answer holds only what went to it."""
    forwarded = Forwarded()
    ran: list[str] = []
    forwarded.when_forwarded("a", forwarded.take(), lambda: ran.append("a: nothing sent"))
    assert ran == ["a: nothing sent"]
    forwarded.sent_frame("node-1", 10)
    to_node_1 = forwarded.take()
    forwarded.sent_frame("node-2", 4)
    to_node_2 = forwarded.take()
    # Made after the commit, in the order of the publishes.
    forwarded.when_forwarded("a", to_node_1, lambda: ran.append("a: to node-1"))
    forwarded.when_forwarded("b", to_node_2, lambda: ran.append("b: to node-2"))
    forwarded.when_forwarded("a", forwarded.take(), lambda: ran.append("a: local"))
    forwarded.when_forwarded("c", forwarded.take(), lambda: ran.append("c: local"))
    assert ran == ["a: nothing sent", "c: local"]  # c waits for nobody
    for callback in forwarded.acked_frame("node-2", 4):
        callback()
    assert ran[-1] == "b: to node-2"  # node-1 is silent: only a waits for it
    assert forwarded.acked_frame("node-1", 9) == []
    for callback in forwarded.acked_frame("node-1", 10):
        callback()
    assert ran[-2:] == ["a: to node-1", "a: local"]
    assert forwarded.acked_frame("node-1", 10) == []  # the same ACK again
    assert forwarded.status() == {"waiting": 0, "connections_waiting": 0, "waited": 3}
    # Frames acknowledged before their wait is made are not waited for.
    forwarded.sent_frame("node-1", 11)
    targets = forwarded.take()
    for callback in forwarded.acked_frame("node-1", 11):
        callback()
    forwarded.when_forwarded("a", targets, lambda: ran.append("a: acked already"))
    assert ran[-1] == "a: acked already"
    # A message that sent nothing waits for nothing sent after it was routed.
    forwarded.sent_frame("node-1", 12)
    first = forwarded.take()
    second = forwarded.take()
    forwarded.sent_frame("node-2", 5)
    forwarded.when_forwarded("b", first, lambda: ran.append("b: first"))
    forwarded.when_forwarded("b", second, lambda: ran.append("b: second"))
    for callback in forwarded.acked_frame("node-1", 12):
        callback()
    assert ran[-2:] == ["b: first", "b: second"]


def test_a_lost_link_moves_the_waits_to_the_backup_or_ends_them() -> None:
    """node-1's link drops with frames unacknowledged: they were sent to its backup (node-2)
    meanwhile, so the waits on node-1 wait for node-2's frames sent by then; with no backup
    to send to (down, or this node is it) they end."""
    forwarded = Forwarded()
    ran: list[str] = []
    forwarded.sent_frame("node-1", 7)
    forwarded.when_forwarded("a", forwarded.take(), lambda: ran.append("to node-1"))
    forwarded.sent_frame("node-3", 5)
    forwarded.when_forwarded("b", forwarded.take(), lambda: ran.append("to node-3"))
    forwarded.sent_frame("node-2", 3)  # the failover copy of node-1's frame 7
    assert forwarded.link_lost("node-1", "node-2") == []
    assert forwarded.acked_frame("node-2", 2) == []
    assert [callback() for callback in forwarded.acked_frame("node-2", 3)] == [None]
    assert ran == ["to node-1"]
    # node-3 drops with nowhere to send its frames: what waited for it ends.
    for callback in forwarded.link_lost("node-3", None):
        callback()
    assert ran == ["to node-1", "to node-3"]
    # node-1 and node-3 are forgotten; node-2 acknowledged everything sent to it.
    assert forwarded.acked == {"node-2": 3} and not forwarded.outstanding
    assert not forwarded.waiting


def test_a_wait_made_after_its_link_dropped_follows_the_frames_to_the_backup() -> None:
    """A message routed to node-1 before its link dropped, whose commit (the disk, the
    backup's REPLICA_ACK) ends after: its wait is made after link_lost, so it waits for
    where node-1's unacknowledged frames went by then (node-2's failover copies), along a
    chain of drops (node-2 lost too: node-3), or not at all (node-1 had the frame, or they
    went nowhere). Before, it waited for node-1, gone for good, and the publisher's PUBACK
    never came (a stop-evacuation test, 1 run in 12 on a loaded machine)."""
    forwarded = Forwarded()
    ran: list[str] = []
    forwarded.sent_frame("node-1", 7)
    had_it = forwarded.take()
    for callback in forwarded.acked_frame("node-1", 7):
        callback()
    forwarded.sent_frame("node-1", 8)
    routed = forwarded.take()
    forwarded.sent_frame("node-1", 9)
    routed_later = forwarded.take()
    forwarded.sent_frame("node-2", 3)  # the failover copies of node-1's frames 8 and 9
    assert forwarded.link_lost("node-1", "node-2") == []
    # The commits end now.
    forwarded.when_forwarded("a", had_it, lambda: ran.append("a"))
    assert ran == ["a"]
    forwarded.when_forwarded("b", routed, lambda: ran.append("b"))
    assert ran == ["a"]  # for node-2's frame 3
    # node-2 drops too, its frames (node-1's with them) sent to node-3.
    forwarded.sent_frame("node-3", 20)
    assert forwarded.link_lost("node-2", "node-3") == []
    forwarded.when_forwarded("c", routed_later, lambda: ran.append("c"))
    assert ran == ["a"]
    for callback in forwarded.acked_frame("node-3", 20):
        callback()
    assert ran == ["a", "b", "c"]
    # Frames sent to node-1 on a new link are waited for as before.
    forwarded.sent_frame("node-1", 10)
    forwarded.when_forwarded("d", forwarded.take(), lambda: ran.append("d"))
    assert ran[-1] == "c"
    for callback in forwarded.acked_frame("node-1", 10):
        callback()
    assert ran[-1] == "d"
    # node-1 drops again with nowhere to send its frames: a wait made after ends at once.
    forwarded.sent_frame("node-1", 11)
    routed = forwarded.take()
    assert forwarded.link_lost("node-1", None) == []
    forwarded.when_forwarded("e", routed, lambda: ran.append("e"))
    assert ran[-1] == "e"
    assert not forwarded.waiting


def test_qos2_deliveries_wait_for_the_replicated_key() -> None:
    replicator = Replicator()
    assert replicator.replicated_key() == 1 << 62  # no backup: nothing to wait for
    replicator.start()
    assert replicator.replicated_key() == 0  # the snapshot is not through
    replicator.snapshot_sent()
    replicator.add(add(7, 1))
    (frame,) = replicator.frames()
    assert replicator.replicated_key() == 0
    replicator.ack(frame.seq)
    assert replicator.replicated_key() == 7
    replicator.stop()
    assert replicator.replicated_key() == 1 << 62


def test_a_replicated_session_costs_no_empty_queue_or_id_set() -> None:
    """A persistent session is written (and copied) whole on connect, subscribe and
    disconnect; reading its empty queue and QoS 2 ids for that must not make them (760 and
    216 bytes a session: the fleet's brokers grew 1.4 KiB a device before this was seen)."""
    replicator = Replicator()
    replicator.start()
    replicator.snapshot_sent()
    broker = Broker(
        MQTTSettings(),
        "node-1",
        time.monotonic,
        time.time,
        store=ReplicatedStore(MemoryStore(), replicator),
    )
    session = broker._new_session("dev")
    session.durable = True
    session.expiry_interval = 60
    broker._store_everything(session)
    record = broker.session_record(session, deliveries=True)
    broker._unstore_everything(session)
    assert record.deliveries == () and record.incoming_qos2 == ()
    assert session._queue is None and session._incoming_qos2 is None
    assert [op.kind for op in replicator.ops if op is not None] == [
        ReplicaOpKind.SAVE,
        ReplicaOpKind.DELETE,
    ]


def test_a_message_for_shared_members_of_a_node_that_is_down_is_queued_for_their_copies() -> None:
    """REPLICA_SHARED: each named member's copy with that shared subscription gets the
    message with the subscription's options (QoS, identifier, retain as published); a member
    without a copy here, or whose copy lacks the subscription, is handed back for another
    member; a full copy drops it and says whose."""
    replicas = Replicas(max_queued_messages=2, max_queued_bytes=1000)
    worker = codec.SessionRecord(
        "w1",
        60,
        None,
        V,
        subscriptions=(("$share/g/jobs/+", SubscriptionOptions(qos=2, subscription_identifier=7)),),
    )
    replicas.apply(
        "node-1",
        codec.Replica(
            1,
            True,
            (ReplicaOp(ReplicaOpKind.SAVE, "w1", data=codec.encode_session(worker)), save("w2")),
        ),
    )
    shared = message(1, topic="jobs/a", qos=2)
    queued, dropped, missing = replicas.failover_shared(
        "node-1",
        shared,
        (("$share/g/jobs/+", "w1"), ("$share/g/jobs/+", "w2"), ("$share/g/jobs/+", "w3")),
        0.0,
    )
    assert (queued, dropped) == (1, [])
    assert missing == [("$share/g/jobs/+", "w2"), ("$share/g/jobs/+", "w3")]
    # Not matched as a plain subscription: a plain failover leaves the member alone.
    assert replicas.failover("node-1", message(2, topic="jobs/a"), 0.0) == (0, [])
    assert replicas.failover_shared(
        "node-1", message(3, topic="jobs/a"), (("$share/g/jobs/+", "w1"),), 0.0
    )[:2] == (1, [])
    assert replicas.failover_shared(
        "node-1", message(4, topic="jobs/a"), (("$share/g/jobs/+", "w1"),), 0.0
    )[:2] == (0, ["w1"])
    record = replicas.take("node-1", "w1")
    assert record is not None
    assert [(d.message.seq, d.qos, d.subscription_identifiers) for d in record.deliveries] == [
        (1, 2, (7,)),
        (3, 1, (7,)),
    ]
    # The owner's copies gone altogether (none kept): every member is handed back.
    assert replicas.failover_shared("node-9", shared, (("$share/g/jobs/+", "w1"),), 0.0) == (
        0,
        [],
        [("$share/g/jobs/+", "w1")],
    )


def test_parked_messages_for_shared_members_keep_their_members() -> None:
    """Parked while the owner is still reached here, then the owner goes down: queued for
    the member's copy, and the member without one is handed back with its message."""
    replicas = Replicas(10, 1000)
    replicas.apply("node-1", codec.Replica(1, True, (save("w1", ("$share/g/jobs/#",)),)))
    replicas.park("node-1", message(1, topic="jobs/x"), 100.0, (("$share/g/jobs/#", "w1"),))
    replicas.park("node-1", message(2, topic="jobs/x"), 100.0, (("$share/g/jobs/#", "gone"),))
    replicas.park("node-1", message(3, topic="cmd/dev"), 100.0)
    queued, dropped, elsewhere = replicas.owner_down("node-1", now=101.0)
    assert (queued, dropped) == (1, [])
    assert [(m.seq, members) for m, members in elsewhere] == [(2, [("$share/g/jobs/#", "gone")])]
    record = replicas.take("node-1", "w1")
    assert record is not None and [d.message.seq for d in record.deliveries] == [1]


def test_a_delivery_for_a_session_of_a_node_that_is_down_is_queued_for_its_copy() -> None:
    """REPLICA_DELIVER: a DELIVER for one session (a stub passed it on to the owner, which
    is down) goes into that session's copy whatever its subscriptions match, with the
    delivery's QoS and subscription identifiers, within the copy's bounds; for a copy handed
    over it is sent on; without a copy (a session that is not persistent) nothing."""
    replicas = Replicas(max_queued_messages=2, max_queued_bytes=1000)
    replicas.apply("node-1", codec.Replica(1, True, (save("dev"), save("other"))))
    delivery = codec.DeliveryRecord(message(1, topic="elsewhere", qos=2), 1, True, (7,))
    assert replicas.failover_delivery("node-1", "dev", delivery, 0.0) == (True, False)
    assert replicas.failover_delivery("node-1", "nobody", delivery, 0.0) == (False, False)
    assert replicas.failover_delivery("node-9", "dev", delivery, 0.0) == (False, False)
    second = codec.DeliveryRecord(message(2), 2, False)
    assert replicas.failover_delivery("node-1", "dev", second, 0.0) == (True, False)
    third = codec.DeliveryRecord(message(3), 1, False)
    assert replicas.failover_delivery("node-1", "dev", third, 0.0) == (False, True)  # full
    record = replicas.take("node-1", "dev")
    assert record is not None
    assert [
        (d.message.seq, d.message.topic, d.qos, d.retain, d.subscription_identifiers)
        for d in record.deliveries
    ] == [(1, "elsewhere", 1, True, (7,)), (2, "cmd/dev", 2, False, ())]
    counters = replicas.counters
    assert (counters.failover_deliveries, counters.failover_dropped) == (2, 1)
    assert replicas.take("node-1", "other", moved_to="node-3", now=10.0) is not None
    assert replicas.failover_delivery("node-1", "other", third, 11.0) == (True, False)
    assert [(n, c, d.message.seq) for n, c, d in replicas.take_forwards()] == [
        ("node-3", "other", 3)
    ]
    late = 10.0 + MOVED_GRACE
    assert replicas.failover_delivery("node-1", "other", third, late) == (False, False)


def test_a_parked_delivery_is_queued_for_its_session_if_the_owner_goes_down() -> None:
    replicas = Replicas(10, 1000)
    replicas.apply("node-1", codec.Replica(1, True, (save("dev"),)))
    delivery = codec.DeliveryRecord(message(1, topic="x"), 1, False)
    replicas.park("node-1", delivery.message, 100.0, Delivered("dev", delivery))
    replicas.park("node-1", delivery.message, 100.0, Delivered("gone", delivery))
    assert replicas.status()["parked"] == {"node-1": 2}
    assert replicas.owner_down("node-1", now=101.0) == (1, [], [])
    record = replicas.take("node-1", "dev")
    assert record is not None and [d.message.seq for d in record.deliveries] == [1]


def test_a_session_handed_to_a_lost_node_is_adopted_as_its_copy_unless_it_has_one() -> None:
    """REPLICA_TRANSFER: a session handed over to node-1 that node-1 did not acknowledge
    before its sender lost it becomes our copy of node-1's session (record, QoS 2 packet
    ids, queued deliveries in order, within the copy's bounds), failover messages for its
    subscriptions reach it, and a take hands it over whole. A session node-1 replicated to
    us already is its own, newer: not replaced. While we still reach node-1 it is parked
    PARKED_SECONDS (adopted if node-1 goes down then, forgotten otherwise)."""
    replicas = Replicas(max_queued_messages=2, max_queued_bytes=1000)
    queued = tuple(codec.DeliveryRecord(message(seq), 1, False) for seq in (1, 2, 3))
    record = codec.SessionRecord(
        "dev",
        3600,
        None,
        V,
        subscriptions=(("cmd/dev", SubscriptionOptions(qos=1)),),
        incoming_qos2=(5,),
        deliveries=queued,
    )
    assert replicas.adopt("node-1", record) == (True, 1)  # the third past max_queued_messages
    assert replicas.find("dev") == "node-1"
    assert replicas.failover("node-1", message(4), 0.0) == (0, ["dev"])  # full already
    taken = replicas.take("node-1", "dev")
    assert taken is not None
    assert [d.message.seq for d in taken.deliveries] == [1, 2]
    assert taken.incoming_qos2 == (5,)
    assert taken.subscriptions == record.subscriptions
    replicas.apply("node-1", codec.Replica(1, True, (save("dev"),)))
    assert replicas.adopt("node-1", record) == (False, 0)  # node-1's own copy stays
    assert (replicas.counters.adopted, replicas.counters.adopted_known) == (1, 1)
    other = codec.SessionRecord("other", 60, None, V)
    replicas.park_session("node-2", other, 100.0)
    assert replicas.status()["parked_sessions"] == {"node-2": 1}
    assert [r.client_id for r, _ in replicas.adopt_parked("node-2", 101.0)] == ["other"]
    assert replicas.find("other") == "node-2"
    replicas.park_session("node-3", other, 100.0)
    replicas.discard_parked("node-3", 100.0 + PARKED_SECONDS + 1)
    assert replicas.adopt_parked("node-3", 100.0 + PARKED_SECONDS + 1) == []
    assert replicas.status()["parked_sessions"] == {}


def test_parked_sessions_are_bounded_in_bytes_the_oldest_dropped_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PARKED_SESSIONS_BYTES of client ids and queued payloads per owner: past it the
    oldest parked session goes, counted; a session parked again replaces its old weight."""
    monkeypatch.setattr(replica_module, "PARKED_SESSIONS_BYTES", 250)
    replicas = Replicas(10, 1000)

    def session(client_id: str) -> codec.SessionRecord:
        queued = (codec.DeliveryRecord(message(1, payload=b"p" * 100), 1, False),)
        return codec.SessionRecord(client_id, 60, None, V, deliveries=queued)

    replicas.park_session("node-2", session("aa"), 1.0)  # 102 bytes
    replicas.park_session("node-2", session("aa"), 2.0)  # again: still 102
    replicas.park_session("node-2", session("bb"), 3.0)  # 204
    assert replicas.counters.sessions_parked_dropped == 0
    replicas.park_session("node-2", session("cc"), 4.0)  # 306: "aa" goes
    assert replicas.counters.sessions_parked_dropped == 1
    assert replicas.parked_sessions_bytes == {"node-2": 204}
    assert [r.client_id for r, _ in replicas.adopt_parked("node-2", 5.0)] == ["bb", "cc"]
    assert replicas.parked_sessions_bytes == {}


def will_op(client_id: str, delay: int = 0) -> ReplicaOp:
    live = codec.LiveWill(delay, None, message(1, topic=f"status/{client_id}"))
    return ReplicaOp(ReplicaOpKind.WILL_SET, client_id, data=codec.encode_live_will(live))


def test_the_wills_of_connected_clients_are_kept_apart_from_the_copies_and_due_with_the_owner() -> (
    None
):
    """WILL_SET/WILL_CLEAR keep the wills of the owner's connected clients (clean sessions
    too: no copy needed), weighed in ``bytes``; a reset forgets them. When the owner is
    lost, wills_due hands them over once, with the delayed wills of its offline copies."""
    replicas = Replicas(10, 1000)
    offline = codec.SessionRecord(
        "parked",
        600,
        None,
        V,
        will=codec.WillRecord(1234.5, 30, message(2, topic="status/parked")),
    )
    replicas.apply(
        "node-1",
        codec.Replica(
            1,
            True,
            (
                will_op("a"),
                will_op("b", delay=5),
                will_op("c"),
                ReplicaOp(ReplicaOpKind.SAVE, "parked", data=codec.encode_session(offline)),
                save("plain"),
            ),
        ),
    )
    replicas.apply("node-1", codec.Replica(2, False, (ReplicaOp(ReplicaOpKind.WILL_CLEAR, "c"),)))
    assert replicas.status()["wills"] == {"node-1": 2}
    live, delayed = replicas.wills_due("node-1")
    assert [(client_id, will.delay) for client_id, will in live] == [("a", 0), ("b", 5)]
    assert live[0][1].message.topic == "status/a"
    assert [(client_id, will.publish_at) for client_id, will in delayed] == [("parked", 1234.5)]
    assert replicas.wills_due("node-1")[0] == []  # handed over once
    assert replicas.status()["wills"] == {}
    replicas.reset("node-1")
    assert replicas.bytes == 0
    replicas.apply("node-2", codec.Replica(1, True, (will_op("x"),)))
    replicas.reset("node-2")
    assert replicas.bytes == 0 and replicas.status()["wills"] == {}


def test_a_will_taken_over_from_a_lost_node_waits_its_delay_unless_the_client_is_back() -> None:
    """Broker.schedule_will (the backup publishing a lost node's wills): delay 0 at once,
    else at its time; claimed_elsewhere drops it (the client is back) or publishes it now
    (a clean start ends the session, MQTT 5.0 section 3.1.2.5); a will of a session of this
    node waiting for the same client id wins. Published wills enter the cluster here: this
    node's name and seq, not the lost node's."""
    now = [100.0]
    broker = Broker(MQTTSettings(), "node-2", lambda: now[0], time.time)
    published: list[Message] = []
    broker.publish = published.append  # type: ignore[method-assign,assignment]

    def will(client_id: str) -> Message:
        return Message(
            f"status/{client_id}", b"gone", 1, False, Properties(), None, client_id, "node-1", 7
        )

    assert broker.schedule_will("a", will("a"), 0, None) is None
    for client_id in ("b", "c", "d"):
        assert broker.schedule_will(client_id, will(client_id), 5, 30) is not None
    assert broker.schedule_will("d", will("d"), 0, None) is None  # "d" waits already
    assert [m.topic for m in published] == ["status/a"]
    broker.claimed_elsewhere("b", clean_start=False)
    broker.claimed_elsewhere("c", clean_start=True)
    assert [m.topic for m in published] == ["status/a", "status/c"]
    now[0] = 106.0
    broker.tick()
    assert [m.topic for m in published] == ["status/a", "status/c", "status/d"]
    assert {m.origin_node for m in published} == {"node-2"}
    assert all(m.seq != 7 for m in published)
    assert published[-1].expires_at == 136.0
