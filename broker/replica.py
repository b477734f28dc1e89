"""Session replication: each node's persistent sessions copied to one other node, so that a
node lost for good does not take with it what its sessions held (issue 13: "lose nothing it
acknowledged", for messages TO devices).

Who keeps whose copy: the *backup* of a node is the next node after it in the sorted list of
the cluster's node names (a ring; every node computes the same from ``[cluster] peers``),
leaving out the nodes forgotten (broker.cluster.Cluster.forget: a node lost for good; the
ring closes over it, and opens again when it is back without its store).
``[cluster] session_replicas = 0`` turns replication off; the default 1 keeps one copy, so
the cluster survives the loss of any one node (HiveMQ's replication factor 2, counting the
owner; EMQX 5's open-source edition keeps none).

What is copied: exactly what the node's store writes for a persistent session (its record,
its QoS 2 packet ids not yet released, its queued and in-flight deliveries, each under its
store key), as REPLICA frames over the cluster link (:mod:`broker.cluster_codec`). The owner
wraps its store in :class:`ReplicatedStore`: every write also becomes an op for the backup,
batched once per loop turn, and ``after_commit`` (the PUBACK, PUBREC, SUBACK or cluster ACK
that promises the write) waits for the backup's REPLICA_ACK as well as for the disk. When the
link comes up the owner sends a reset and then a snapshot of every persistent session,
generated as the link drains (so it reflects the sessions as they are when sent, and writes
after each one apply on top); promises made meanwhile wait for the snapshot's end. While the
link to the backup is down nothing waits for it: one copy, as on a single node.

The backup keeps the copies as the owner's encoded records (:class:`Replicas`), and acts on
them only when the owner is down (its link to it is down):

- a device of the owner reconnects elsewhere: the claim for its client id reaches the backup,
  which hands the copy over as a TRANSFER (as the owner would have), or installs it itself
  when the device reconnected to it. The copy stays behind as a forwarding stub for
  MOVED_GRACE (:class:`MovedCopy`, as the owner's stub of a session it hands over): a
  failover message for it that arrives after the handover (routed to the down owner before
  its sender had the session's new route: the claim, the TRANSFER and the SUBSCRIBE that
  follows are round trips) goes on to the session's node, which delivers a message it had
  already once (by message id);
- a QoS 1/2 message for the owner's plain subscribers while it is down: the publishing node
  sends it to the owner's outbox as before AND to the backup (REPLICA_PUBLISH), which queues it
  for the copies whose subscriptions match; when the link to a node drops, the frames it had
  not acknowledged go to its backup the same way. Copies of one message reaching a session
  twice are delivered once (by message id, when the copy is handed over). A backup that
  still reaches the owner (only the sender lost it) parks such messages for PARKED_SECONDS:
  if its own link to the owner drops by then they are queued, else the owner had them and
  they are discarded (so a live owner's copies do not fill with what it delivered);
- a DELIVER for the owner (a forwarding stub on a session's old node passing a message on
  to the session's new node, the owner) while it is down, or unacknowledged when the link
  dropped: the same, as REPLICA_DELIVER naming the session; it is queued for that session's
  copy (sent on when the copy was handed over; nothing when there is none: a session that
  is not persistent ends with its node);
- a QoS 1/2 message for a member of a shared subscription on the owner (the only members of
  its group are there, or the frame was unacknowledged when the link dropped): the same, as
  REPLICA_SHARED naming the member; it is queued for the member's copy, or, when the backup
  has none (a session that ended with its node), sent to another member of the group (MQTT
  5.0 section 4.8.2: "If the Client's Session terminates before the Client reconnects, the
  Server SHOULD send the Application Message to another Client").

Wills: the owner also copies the will of each connected client (any session, clean ones
too: WILL_SET when it connects, WILL_CLEAR when its connection ends and the will is the
owner's to publish or drop). When the backup's link to the owner drops, those wills are due
(the connections ended without DISCONNECT): the backup publishes them, at once or after
their Will Delay Interval, and the delayed wills of the offline sessions it keeps copies of
at their time; a client that connects again meanwhile (its claim reaches the backup) cancels
its delayed will, and so does the owner coming back (its snapshot copies the will of a client
still connected there; the same incarnation has its offline sessions' wills). An owner with a
disk store also keeps its connected clients' wills there (broker.store): restarted after a
crash, it publishes them itself unless its backup says in its HELLO that it did when their
link dropped (``wills_taken``: the owner's boot then; kept in the backup's store, so a backup
that published and then died too still says so). A whole-cluster kill takes the backups'
copies with them: each owner publishes its own.

Messages FROM devices: a QoS 1/2 message a device published here that went to a peer (its
subscribers there, or a shared member) left in a reliable frame of that peer's outbox; in
memory mode nothing else held it. Its PUBACK or PUBREC now waits until the peers the node was
sending to have acknowledged those frames (:class:`Forwarded`), so a node lost for good right
after acknowledging loses nothing: the peer has it. When a link drops meanwhile, its frames go
to its backup as above and the acknowledgement waits for the backup instead.

Copies of an owner that is gone are dropped when they expire (their Session Expiry Interval
counted from when the owner went down, or their own deadline). Pure state here; the link
I/O is :mod:`broker.cluster`'s.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from broker import cluster_codec as codec
from broker.cluster_codec import ReplicaOp, ReplicaOpKind
from broker.core import MOVED_GRACE
from broker.session import SESSION_NEVER_EXPIRES
from broker.store import Store, StoredState
from broker.subscriptions import SubscriptionOptions, SubscriptionTrie

__all__ = [
    "LINGER_SECONDS",
    "PARKED_MESSAGES",
    "REPLICA_FRAME_BYTES",
    "Delivered",
    "MovedCopy",
    "Replicas",
    "ReplicatedStore",
    "Replicator",
    "backup_of",
    "op_size",
]

#: Ops are cut into REPLICA frames of about this many bytes (far below any frame limit; a
#: single op may be larger: a delivery of a message up to max_packet_size); a batch this
#: large is sent at once rather than after LINGER_SECONDS.
REPLICA_FRAME_BYTES = 256 * 1024
#: How long ops wait before they are sent: a delivery acknowledged by its client within it is
#: never copied (Kafka's linger.ms is 5 ms by default). A promise waits at most this plus a
#: round trip to the backup; one whose ops were all cancelled, no longer than the client.
LINGER_SECONDS = 0.005
#: Failover deliveries are keyed above the owner's keys (which count up from 1), so that a
#: handed-over copy lists the owner's deliveries first, in its order, then these.
FAILOVER_KEY_BASE = 1 << 62
#: Failover messages that arrive while this node still reaches their owner (the sender lost
#: its link to it first) wait this long for our link to drop too; then they are the owner's
#: (it got them from the sender, or will: it is alive) and are discarded. Twice the link's
#: silence timeout: a dead owner is noticed by then.
PARKED_SECONDS = 30.0
#: At most this many parked messages per owner (and max_queued_bytes of payload).
PARKED_MESSAGES = 10_000
#: At most this many sessions parked per owner (REPLICA_TRANSFER while we reach it): the
#: TRANSFERs of one round trip, a claim's or an evacuation's (session_rate per second); and
#: this many bytes of them (client ids and queued payloads).
PARKED_SESSIONS = 10_000
PARKED_SESSIONS_BYTES = 64 * 1024 * 1024

#: Shared members a failover message is for: (shared filter, client id).
Targets = tuple[tuple[str, str], ...]
#: A failover message for a copy handed over: (the session's node, client id, delivery).
Forward = tuple[str, str, codec.DeliveryRecord]


@dataclass(frozen=True, slots=True)
class Delivered:
    """A failover delivery for one session (REPLICA_DELIVER), parked."""

    client_id: str
    delivery: codec.DeliveryRecord


#: A parked failover message: (monotonic time, message, the shared members it is for; () for
#: the plain subscribers; or the one session it is for).
Parked = tuple[float, codec.WireMessage, Targets | Delivered]


def _record_size(record: codec.SessionRecord) -> int:
    """What a parked session weighs: its client id and its queued payloads."""
    return len(record.client_id) + sum(len(d.message.payload) for d in record.deliveries)


def backup_of(node: str, nodes: Iterable[str]) -> str | None:
    """The node that keeps ``node``'s copies: the next name after it, sorted, in a ring."""
    ring = sorted(set(nodes) | {node})
    if len(ring) < 2:
        return None
    return ring[(ring.index(node) + 1) % len(ring)]


def op_size(op: ReplicaOp) -> int:
    """About what an op weighs in a REPLICA frame (a record to be encoded: its payload and
    a delivery's overhead)."""
    record = op.record
    size = len(op.data) if record is None else len(record.message.payload) + 64
    return size + len(op.client_id) + 16


# --- the owner's side --------------------------------------------------------------------


class Replicator:
    """Writes waiting to go to the backup, and the promises waiting for its REPLICA_ACK.

    Ops wait LINGER_SECONDS before they are sent (or less, past REPLICA_FRAME_BYTES): a
    delivery the client acknowledges meanwhile (DELIVERY_REMOVE of an add still here) cancels
    its add, and neither is sent nor encoded. A subscriber that keeps up (the fleet's
    collector) then costs its backup nothing per message; one that does not has its queue
    copied after LINGER_SECONDS. A session record saved again while its last save is still
    here takes that save's place (a connect and its SUBSCRIBE write the record twice within
    a round trip): one SAVE goes, with the newer record. The ops between them touch the
    session's deliveries and packet ids, which a SAVE leaves alone, so the copy ends the
    same; a DELETE between them ends the coalescing (the later save then follows it).

    ``added`` counts every op taken (its index); a promise made when ``added`` was N runs
    once every op before N is acknowledged by the backup or cancelled (``settled``). Each
    frame records how many ops had been cut into frames when it was cut (``sent``: seq, that
    count, the highest delivery key in it). While a snapshot is being sent (``syncing``, then
    until its last frame is acked) no promise runs: the ops of a session the snapshot has not
    reached yet are not kept by the backup. Promises run in the order they were made (they
    are the PUBACKs of one connection, among others: MQTT 5.0 section 4.6)."""

    __slots__ = (
        "acked",
        "acked_key",
        "acked_seq",
        "active",
        "added",
        "adds",
        "bytes",
        "cancelled",
        "coalesced",
        "first_live",
        "frames_sent",
        "on_pending",
        "ops",
        "ops_sent",
        "saves",
        "sent",
        "seq",
        "sync_end",
        "syncing",
        "taken",
        "waiters",
        "wills",
    )

    def __init__(self) -> None:
        # The link to the backup is up (and speaks version 4): ops are kept and sent.
        self.active = False
        # ... and speaks version 5: the wills of connected clients go too (WILL_SET/CLEAR).
        self.wills = False
        # Ops not sent yet (None: cancelled); ops[i] has index taken + i.
        self.ops: list[ReplicaOp | None] = []
        # DELIVERY_ADD ops not sent yet: (client id, key) -> position in ops.
        self.adds: dict[tuple[str, int], int] = {}
        # SAVE ops not sent yet: client id -> position in ops.
        self.saves: dict[str, int] = {}
        # The index of the first op not sent and not cancelled (added when there is none).
        self.first_live = 0
        # Bytes taken since the last batch left (cancelled ones too): past
        # REPLICA_FRAME_BYTES the batch leaves at once.
        self.bytes = 0
        self.added = 0
        self.taken = 0
        self.acked = 0
        self.acked_key = 0
        self.seq = 0
        self.acked_seq = 0
        self.sent: deque[tuple[int, int, int]] = deque()
        self.waiters: deque[tuple[int, Callable[[], None]]] = deque()
        self.syncing = False
        self.sync_end = 0
        # Called with True when the first op of a batch is taken (send within the linger),
        # False when the batch should go now (it is large), None when an add was cancelled
        # (promises may be due).
        self.on_pending: Callable[[bool | None], None] | None = None
        self.frames_sent = 0
        self.ops_sent = 0
        self.cancelled = 0
        self.coalesced = 0

    def add(self, op: ReplicaOp) -> None:
        if not self.active:
            return  # the snapshot after the link comes back carries it
        ops = self.ops
        if op.kind == ReplicaOpKind.DELIVERY_REMOVE:
            position = self.adds.pop((op.client_id, op.key), None)
            if position is not None:
                self._cancel(position, op)
                return
        elif op.kind == ReplicaOpKind.DELIVERY_ADD:
            self.adds[(op.client_id, op.key)] = len(ops)
        elif op.kind == ReplicaOpKind.SAVE:
            position = self.saves.get(op.client_id)
            if position is not None:
                earlier = ops[position]
                assert earlier is not None
                ops[position] = op
                self.bytes += op_size(op) - op_size(earlier)
                self.coalesced += 1
                return
            self.saves[op.client_id] = len(ops)
        elif op.kind == ReplicaOpKind.DELETE:
            self.saves.pop(op.client_id, None)
        if not ops or self.first_live == self.added:
            self.first_live = self.added
        ops.append(op)
        self.added += 1
        self.bytes += op_size(op)
        if self.on_pending is not None:
            if len(ops) == 1:
                self.on_pending(True)
            elif self.bytes >= REPLICA_FRAME_BYTES:
                self.on_pending(False)

    def _cancel(self, position: int, remove: ReplicaOp) -> None:
        """The delivery was acknowledged before its add was sent: neither goes."""
        ops = self.ops
        added = ops[position]
        assert added is not None
        ops[position] = None
        self.cancelled += 1
        record = added.record
        if record is not None and record.qos == 2:
            # Updates of it still here go too (PUBREL sent; only QoS 2 has them).
            for index in range(position + 1, len(ops)):
                later = ops[index]
                if (
                    later is not None
                    and later.kind == ReplicaOpKind.DELIVERY_UPDATE
                    and later.key == remove.key
                    and later.client_id == remove.client_id
                ):
                    ops[index] = None
        if self.taken + position == self.first_live:
            index = position
            while index < len(ops) and ops[index] is None:
                index += 1
            self.first_live = self.taken + index if index < len(ops) else self.added
            if self.waiters and self.on_pending is not None:
                self.on_pending(None)

    def frames(self, reset: bool = False) -> Iterator[codec.Replica]:
        """The ops taken so far cut into frames (at least one frame when ``reset``)."""
        ops = [op for op in self.ops if op is not None]
        self.taken += len(self.ops)
        self.ops, self.bytes = [], 0
        self.adds.clear()
        self.saves.clear()
        self.first_live = self.added
        if not ops and not reset:
            # Every op was cancelled: settled once what was sent before is acked.
            if self.sent:
                seq, _, key = self.sent[-1]
                self.sent[-1] = (seq, self.taken, key)
            else:
                self.acked = self.taken
            return
        start = 0
        while start < len(ops) or reset:
            size = 0
            end = start
            while end < len(ops) and (end == start or size < REPLICA_FRAME_BYTES):
                size += op_size(ops[end])
                end += 1
            yield self.frame(tuple(ops[start:end]), reset)
            reset = False
            start = end

    def frame(self, ops: tuple[ReplicaOp, ...], reset: bool = False) -> codec.Replica:
        """Number a frame (a snapshot's frames carry ops that were never ``add``-ed)."""
        self.seq += 1
        key = max((op.key for op in ops if op.kind == ReplicaOpKind.DELIVERY_ADD), default=0)
        self.sent.append((self.seq, self.taken, key))
        self.frames_sent += 1
        self.ops_sent += len(ops)
        return codec.Replica(self.seq, reset, ops)

    def start(self, wills: bool = False) -> None:
        """The link to the backup is up: a reset and a snapshot follow (``wills``: the link
        carries the WILL ops)."""
        self.active = True
        self.syncing = True
        self.wills = wills

    def snapshot_sent(self) -> None:
        self.syncing = False
        self.sync_end = self.seq

    def stop(self) -> list[Callable[[], None]]:
        """The link to the backup is down: nothing waits for it (returned to be run)."""
        self.active = False
        self.wills = False
        self.syncing = False
        self.ops.clear()
        self.adds.clear()
        self.saves.clear()
        self.bytes = 0
        self.sent.clear()
        self.taken = self.acked = self.first_live = self.added
        released = [callback for _, callback in self.waiters]
        self.waiters.clear()
        return released

    def _ready(self) -> bool:
        return not self.syncing and self.acked_seq >= self.sync_end

    def settled(self) -> int:
        """Every op before this index is acknowledged by the backup or cancelled."""
        if self.acked < self.taken:
            return self.acked
        return self.first_live if self.ops else self.added

    def replicated_key(self) -> int:
        """Every delivery key up to this one is with the backup (or nobody waits for it)."""
        if not self.active:
            return 1 << 62
        return self.acked_key if self._ready() else 0

    def when_acked(self, target: int | None, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the ops before ``target`` are settled (None: at once, but
        not before the promises waiting already)."""
        waiters = self.waiters
        if target is None or (self._ready() and target <= self.settled()):
            if not waiters:
                callback()
                return
            target = waiters[-1][0]
        waiters.append((target, callback))

    def target(self) -> int | None:
        """What a promise made now waits for: every op taken so far, or nothing."""
        if not self.active or (self._ready() and self.added <= self.settled()):
            return None
        return self.added

    def ack(self, seq: int) -> list[Callable[[], None]]:
        """A REPLICA_ACK; returns the promises now due, in order."""
        if seq <= self.acked_seq or seq > self.seq:
            return []
        self.acked_seq = seq
        sent = self.sent
        while sent and sent[0][0] <= seq:
            _, through, key = sent.popleft()
            self.acked = max(self.acked, through)
            self.acked_key = max(self.acked_key, key)
        return self.due()

    def due(self) -> list[Callable[[], None]]:
        """The promises whose ops are all settled now, in order."""
        due: list[Callable[[], None]] = []
        if not self._ready():
            return due
        settled = self.settled()
        waiters = self.waiters
        while waiters and waiters[0][0] <= settled:
            due.append(waiters.popleft()[1])
        return due

    def status(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "syncing": self.syncing,
            "seq": self.seq,
            "acked_seq": self.acked_seq,
            "frames_sent": self.frames_sent,
            "ops_sent": self.ops_sent,
            "ops_cancelled": self.cancelled,
            "saves_coalesced": self.coalesced,
            "ops_waiting": sum(1 for op in self.ops if op is not None),
            "promises_waiting": len(self.waiters),
        }


class Forwarded:
    """The acknowledgements to publishers that wait for peers to have what this node sent
    them (reliable frames, numbered per peer). Each waits for the frames sent since the last
    wait was made (the frames of its own message, and whatever went out just before it) to
    be acknowledged, while their peer's link is up, and after the acknowledgements of the
    same connection made before it (MQTT 5.0 section 4.6: PUBACKs in the order of their
    PUBLISHes). So a peer that stops answering holds the acknowledgements of the messages
    sent to it, and those of their connections behind them, until its link times out; not
    every publisher's. When a link drops, its waits move to the frames sent to its backup by
    then (the frames it had not acknowledged were sent there: broker.cluster), or end (no
    backup, or we are it). A wait made after the drop for frames sent before it (its
    message was routed before, its commit ended after) goes the same way.

    Only a client's acknowledgements wait here, never the link's own ACK: two nodes sending
    each other messages would otherwise each wait for the other's ACK before sending theirs."""

    __slots__ = ("acked", "lost", "outstanding", "recent", "waited", "waiting")

    def __init__(self) -> None:
        # The last frame each peer acknowledged while its link was up.
        self.acked: dict[str, int] = {}
        # Each peer whose link dropped: the last frame it had acknowledged and the last one
        # sent to it by then, and where the waits on the rest went (its backup's last frame
        # by then; None: they ended).
        self.lost: dict[str, tuple[int, int, tuple[str, int] | None]] = {}
        # The peers with frames sent and not acked yet: their last frame.
        self.outstanding: dict[str, int] = {}
        # The last frame sent to each peer since the last wait was made.
        self.recent: dict[str, int] = {}
        # Per connection (any key), its waits in order: (peer -> frame, callback).
        self.waiting: dict[object, deque[tuple[dict[str, int], Callable[[], None]]]] = {}
        self.waited = 0

    def sent_frame(self, peer: str, seq: int) -> None:
        self.outstanding[peer] = seq
        self.recent[peer] = seq

    def take(self) -> dict[str, int]:
        """The frames a wait made now waits for (taken when the message was routed: the
        wait itself is made after the commit, when others may have been sent)."""
        recent = self.recent
        if not recent:
            return {}
        self.recent = {}
        return recent

    def when_forwarded(
        self, key: object, targets: dict[str, int], callback: Callable[[], None]
    ) -> None:
        """Run ``callback`` once ``targets`` (from take()) are acknowledged and ``key``'s
        earlier waits have run (at once if nothing is left to wait for)."""
        if self.lost:
            targets = self._since_lost(targets)
        queue = self.waiting.get(key)
        if queue is None and self._reached(targets):
            callback()
            return
        self.waited += 1
        if queue is None:
            self.waiting[key] = deque(((targets, callback),))
        else:
            queue.append((targets, callback))

    def _since_lost(self, targets: dict[str, int]) -> dict[str, int]:
        """``targets`` with each frame sent to a peer before its link dropped replaced by
        where link_lost moved the waits on it (following later drops), or left out if the
        peer had acknowledged it or nothing went anywhere."""
        lost = self.lost
        if not any(peer in lost and seq <= lost[peer][1] for peer, seq in targets.items()):
            return targets
        moved: dict[str, int] = {}
        for peer, seq in targets.items():
            target: tuple[str, int] | None = (peer, seq)
            for _ in range(len(lost)):  # a chain of drops (each peer once: no cycle)
                if target is None or target[0] not in lost:
                    break
                acked, sent, backup = lost[target[0]]
                if target[1] > sent:
                    break
                target = None if target[1] <= acked else backup
            if target is not None:
                moved[target[0]] = max(moved.get(target[0], 0), target[1])
        return moved

    def _reached(self, targets: dict[str, int]) -> bool:
        """Whether every peer in ``targets`` acknowledged its frame."""
        acked = self.acked
        return all(acked.get(peer, 0) >= seq for peer, seq in targets.items())

    def acked_frame(self, peer: str, seq: int) -> list[Callable[[], None]]:
        """A peer's link ACK: the waits now over, each connection's in order."""
        if seq <= self.acked.get(peer, 0):
            return []
        self.acked[peer] = seq
        if seq >= self.outstanding.get(peer, seq + 1):
            del self.outstanding[peer]
        return self._due() if self.waiting else []

    def link_lost(self, peer: str, backup: str | None) -> list[Callable[[], None]]:
        """``peer``'s link dropped, after its unacknowledged frames were sent to ``backup``
        (None: nowhere, or here): the waits on it move there, or end (nothing went there,
        or the peer had acknowledged their frames)."""
        acked = self.acked.pop(peer, 0)
        sent = self.outstanding.pop(peer, acked)
        self.recent.pop(peer, None)
        moved = None if backup is None else self.outstanding.get(backup)
        self.lost[peer] = (acked, sent, None if backup is None or not moved else (backup, moved))
        # The waits made already go where a wait made from now on goes (_since_lost).
        for key, queue in self.waiting.items():
            if any(peer in targets for targets, _ in queue):
                self.waiting[key] = deque((self._since_lost(t), call) for t, call in queue)
        return self._due()

    def _due(self) -> list[Callable[[], None]]:
        due: list[Callable[[], None]] = []
        emptied = []
        for key, queue in self.waiting.items():
            while queue and self._reached(queue[0][0]):
                due.append(queue.popleft()[1])
            if not queue:
                emptied.append(key)
        for key in emptied:
            del self.waiting[key]
        return due

    def status(self) -> dict[str, Any]:
        return {
            "waiting": sum(len(queue) for queue in self.waiting.values()),
            "connections_waiting": len(self.waiting),
            "waited": self.waited,
        }


class ReplicatedStore(Store):
    """The node's store with every session write also sent to the backup; a promise
    (``after_commit``) waits for both. Sessions are replicated whether or not the node has
    a disk, so ``durable`` is true: a persistent session's writes are made either way."""

    durable = True

    def __init__(
        self, inner: Store, replicator: Replicator, forwarded: Forwarded | None = None
    ) -> None:
        # Not Store.__init__: generation, waiting, congested and committed_key are the
        # inner store's (with the replicated writes and outbox entries counted in
        # generation: a publish that made either waits for its promise).
        self.inner = inner
        self.replicator = replicator
        self.forwarded = forwarded if forwarded is not None else Forwarded()
        self._writes = 0

    # The inner store's state, as the core and the connections read it.
    @property
    def generation(self) -> int:  # type: ignore[override]
        return self.inner.generation + self._writes

    @property
    def waiting(self) -> set[Any]:  # type: ignore[override]
        return self.inner.waiting

    @property
    def congested(self) -> bool:  # type: ignore[override]
        return self.inner.congested

    @property
    def committed_key(self) -> int:
        return self.inner.committed_key

    @committed_key.setter
    def committed_key(self, key: int) -> None:
        self.inner.committed_key = key

    @property
    def errors(self) -> int:  # type: ignore[override]
        return self.inner.errors

    @property
    def commits(self) -> int:  # type: ignore[override]
        return self.inner.commits

    def load(self) -> StoredState:
        return self.inner.load()

    def start(self, loop: Any) -> None:
        self.inner.start(loop)

    async def close(self) -> None:
        await self.inner.close()

    @property
    def replicated_key(self) -> int:  # type: ignore[override]
        return self.replicator.replicated_key()

    def after_local_commit(self, callback: Callable[[], None]) -> None:
        self.inner.after_commit(callback)

    def after_commit(self, callback: Callable[[], None]) -> None:
        replicator = self.replicator
        target = replicator.target()
        if target is None and not replicator.waiters:
            self.inner.after_commit(callback)
            return
        self.inner.after_commit(lambda: replicator.when_acked(target, callback))

    def after_acknowledged(self, callback: Callable[[], None], key: object = None) -> None:
        forwarded = self.forwarded
        targets = forwarded.take()
        self.after_commit(lambda: forwarded.when_forwarded(key, targets, callback))

    def pending(self) -> bool:
        return self.inner.pending() or bool(self.replicator.waiters) or bool(self.forwarded.waiting)

    def status(self) -> dict[str, Any]:
        status = self.inner.status()
        status["replication"] = self.replicator.status()
        return status

    def _write(self, op: ReplicaOp) -> None:
        self._writes += 1
        self.replicator.add(op)

    # Session writes: the inner store's, and the backup's.
    def save_session(self, record: codec.SessionRecord) -> None:
        self.inner.save_session(record)
        self._write(
            ReplicaOp(ReplicaOpKind.SAVE, record.client_id, data=codec.encode_session(record))
        )

    def delete_session(self, client_id: str) -> None:
        self.inner.delete_session(client_id)
        self._write(ReplicaOp(ReplicaOpKind.DELETE, client_id))

    def add_incoming(self, client_id: str, packet_id: int) -> None:
        self.inner.add_incoming(client_id, packet_id)
        self._write(ReplicaOp(ReplicaOpKind.INCOMING_ADD, client_id, packet_id=packet_id))

    def remove_incoming(self, client_id: str, packet_id: int) -> None:
        self.inner.remove_incoming(client_id, packet_id)
        self._write(ReplicaOp(ReplicaOpKind.INCOMING_REMOVE, client_id, packet_id=packet_id))

    def add_delivery(self, client_id: str, key: int, record: codec.DeliveryRecord) -> None:
        self.inner.add_delivery(client_id, key, record)
        self._write(ReplicaOp(ReplicaOpKind.DELIVERY_ADD, client_id, key, record=record))

    def update_delivery(
        self, client_id: str, key: int, packet_id: int, inflight: bool, released: bool
    ) -> None:
        self.inner.update_delivery(client_id, key, packet_id, inflight, released)
        self._write(
            ReplicaOp(ReplicaOpKind.DELIVERY_UPDATE, client_id, key, packet_id, inflight, released)
        )

    def remove_delivery(self, client_id: str, key: int, message_id: str) -> None:
        self.inner.remove_delivery(client_id, key, message_id)
        self._write(ReplicaOp(ReplicaOpKind.DELIVERY_REMOVE, client_id, key))

    # Node writes: the inner store's alone (a connected client's will reaches the backup as
    # WILL_SET from broker.cluster, whether or not the node has a disk).
    @property
    def keeps_wills(self) -> bool:  # type: ignore[override]
        return self.inner.keeps_wills

    def set_meta(self, key: str, value: bytes) -> None:
        self.inner.set_meta(key, value)

    def set_will(self, client_id: str, data: bytes) -> None:
        self.inner.set_will(client_id, data)

    def clear_will(self, client_id: str) -> None:
        self.inner.clear_will(client_id)

    def set_retained(
        self, topic: str, message: codec.WireMessage | None, changed_at: float
    ) -> None:
        self.inner.set_retained(topic, message, changed_at)

    def add_outbox(self, peer: str, seq: int, data: bytes) -> None:
        self.inner.add_outbox(peer, seq, data)
        self._writes += 1  # a publish that sent a frame waits for the peer (Forwarded)

    def ack_outbox(self, peer: str, seq: int) -> None:
        self.inner.ack_outbox(peer, seq)

    def drop_outbox(self, peer: str, seqs: Iterable[int]) -> None:
        self.inner.drop_outbox(peer, seqs)

    def set_route(self, peer: str, topic_filter: str, present: bool) -> None:
        self.inner.set_route(peer, topic_filter, present)

    def clear_routes(self, peer: str) -> None:
        self.inner.clear_routes(peer)

    def set_state(
        self, key: bytes, value: bytes | None, expires_at: float | None, version: codec.Version
    ) -> None:
        self.inner.set_state(key, value, expires_at, version)


# --- the backup's side -------------------------------------------------------------------


def _filters(record: bytes) -> tuple[tuple[str, SubscriptionOptions], ...]:
    """A copy's subscriptions, read from its record when a failover message needs them
    (the copies do not keep them decoded: ~200 bytes a session)."""
    return codec.decode_session(record).subscriptions


class ReplicaSession:
    """The copy of one session: its record (as the owner encoded it), QoS 2 packet ids,
    deliveries by store key (encoded), and what they weigh."""

    __slots__ = ("deliveries", "expires_at", "expiry_interval", "incoming", "record", "will")

    def __init__(self, record: bytes, decoded: codec.SessionRecord) -> None:
        self.record = record
        self.expiry_interval = decoded.expiry_interval
        self.expires_at = decoded.expires_at
        # The session's delayed will (its client gone, the delay running), from the record.
        self.will = decoded.will
        self.incoming: set[int] | None = None
        self.deliveries: dict[int, bytes] = {}

    def size(self) -> int:
        """The bytes it keeps: its record and its deliveries."""
        return len(self.record) + sum(len(data) for data in self.deliveries.values())


class MovedCopy:
    """A copy handed over (or installed here): where its session went, until when failover
    messages for it are sent on there, and its record (its subscriptions)."""

    __slots__ = ("node", "record", "until")

    def __init__(self, node: str, record: bytes, until: float) -> None:
        self.node = node
        self.record = record
        self.until = until


def _live(stub: MovedCopy | None, now: float) -> MovedCopy | None:
    """``stub`` while its MOVED_GRACE lasts."""
    return stub if stub is not None and stub.until > now else None


@dataclass(slots=True)
class ReplicaCounters:
    frames_applied: int = 0
    ops_applied: int = 0
    resets: int = 0
    handed_over: int = 0
    # Copies given back to their node, restarted without its sessions (Cluster._hand_back).
    handed_back: int = 0
    installed_here: int = 0
    merged: int = 0  # into a fresh session made where the claim could not reach us
    undecodable: int = 0  # delivery records that did not decode when used (dropped)
    dropped_clean_start: int = 0
    expired: int = 0
    failover_messages: int = 0
    failover_deliveries: int = 0
    failover_dropped: int = 0
    # Failover messages for a copy handed over, sent on to its session's node (MovedCopy).
    failover_forwarded: int = 0
    # Shared members' messages sent on to another member (their session ended with their node).
    failover_redispatched: int = 0
    failover_parked: int = 0
    parked_discarded: int = 0  # the owner stayed up: it had them
    parked_dropped: int = 0  # past PARKED_MESSAGES or max_queued_bytes
    # Sessions handed over to an owner that was lost before it acknowledged them
    # (REPLICA_TRANSFER), kept as its copies; those we had a copy of already (it had them).
    adopted: int = 0
    adopted_known: int = 0
    # Such sessions held while we still reached the owner, and those past PARKED_SESSIONS
    # or PARKED_SESSIONS_BYTES (the oldest).
    sessions_parked: int = 0
    sessions_parked_dropped: int = 0


class Replicas:
    """The copies this node keeps, by owner and client id."""

    def __init__(self, max_queued_messages: int, max_queued_bytes: int) -> None:
        self.max_queued_messages = max_queued_messages
        self.max_queued_bytes = max_queued_bytes
        self.origins: dict[str, dict[str, ReplicaSession]] = {}
        # Built when a failover message first needs it (owner down), kept up to date after.
        self.tries: dict[str, SubscriptionTrie] = {}
        self.bytes = 0
        self.next_failover_key = FAILOVER_KEY_BASE
        self.counters = ReplicaCounters()
        # The owner's incarnation the copies are of (broker.reliable: a node that restarts
        # without its store starts a new one, and its old sessions are only here).
        self.incarnations: dict[str, int] = {}
        # The wills of the owners' connected clients (encoded codec.LiveWill), by client id.
        self.wills: dict[str, dict[str, bytes]] = {}
        # Failover messages for owners this node still reaches.
        self.parked: dict[str, deque[Parked]] = {}
        self.parked_bytes: dict[str, int] = {}
        # Sessions handed over to owners this node still reaches (REPLICA_TRANSFER), by
        # owner and client id: (monotonic time, record), oldest first.
        self.parked_sessions: dict[str, dict[str, tuple[float, codec.SessionRecord]]] = {}
        self.parked_sessions_bytes: dict[str, int] = {}
        # Copies handed over lately, by owner and client id (their filters stay in the
        # owner's trie until they are forgotten), and what failover sent on to them, for the
        # cluster to send (take_forwards()).
        self.moved: dict[str, dict[str, MovedCopy]] = {}
        self.forwards: list[Forward] = []

    def __len__(self) -> int:
        return sum(len(sessions) for sessions in self.origins.values())

    # --- REPLICA frames -----------------------------------------------------------------

    def apply(self, origin: str, frame: codec.Replica, incarnation: int = 0) -> None:
        counters = self.counters
        counters.frames_applied += 1
        if frame.reset:
            counters.resets += 1
            self.reset(origin)
            self.incarnations[origin] = incarnation
        sessions = self.origins.setdefault(origin, {})
        for op in frame.ops:
            counters.ops_applied += 1
            kind = op.kind
            if kind == ReplicaOpKind.SAVE:
                self._save(origin, sessions, op)
                continue
            if kind == ReplicaOpKind.WILL_SET:
                wills = self.wills.setdefault(origin, {})
                old_will = wills.get(op.client_id)
                wills[op.client_id] = op.data
                self.bytes += len(op.data) - (0 if old_will is None else len(old_will))
                continue
            if kind == ReplicaOpKind.WILL_CLEAR:
                kept = self.wills.get(origin, {}).pop(op.client_id, None)
                if kept is not None:
                    self.bytes -= len(kept)
                continue
            copy = sessions.get(op.client_id)
            if copy is None:
                # Not sent yet in the snapshot under way: it comes whole, with this write.
                continue
            if kind == ReplicaOpKind.DELIVERY_ADD:
                old = copy.deliveries.get(op.key)
                copy.deliveries[op.key] = op.data
                self.bytes += len(op.data) - (0 if old is None else len(old))
            elif kind == ReplicaOpKind.DELIVERY_REMOVE:
                data = copy.deliveries.pop(op.key, None)
                if data is not None:
                    self.bytes -= len(data)
            elif kind == ReplicaOpKind.DELIVERY_UPDATE:
                data = copy.deliveries.get(op.key)
                if data is not None:
                    try:
                        delivery = codec.decode_delivery(data)
                    except codec.ClusterProtocolError:
                        self.counters.undecodable += 1
                        del copy.deliveries[op.key]
                        self.bytes -= len(data)
                        continue
                    updated = codec.encode_delivery(
                        codec.DeliveryRecord(
                            delivery.message,
                            delivery.qos,
                            delivery.retain,
                            delivery.subscription_identifiers,
                            op.packet_id,
                            op.inflight,
                            op.released,
                        )
                    )
                    copy.deliveries[op.key] = updated
                    self.bytes += len(updated) - len(data)
            elif kind == ReplicaOpKind.INCOMING_ADD:
                if copy.incoming is None:
                    copy.incoming = set()
                copy.incoming.add(op.packet_id)
            elif kind == ReplicaOpKind.INCOMING_REMOVE:
                if copy.incoming is not None:
                    copy.incoming.discard(op.packet_id)
            elif kind == ReplicaOpKind.DELETE:
                self._remove(origin, op.client_id)

    def _save(self, origin: str, sessions: dict[str, ReplicaSession], op: ReplicaOp) -> None:
        decoded = codec.decode_session(op.data)
        copy = sessions.get(op.client_id)
        if copy is None:
            copy = sessions[op.client_id] = ReplicaSession(op.data, decoded)
            self.bytes += len(op.data)
            self._index(origin, op.client_id, (), decoded.subscriptions)
            return
        self.bytes += len(op.data) - len(copy.record)
        if origin in self.tries:
            self._index(origin, op.client_id, _filters(copy.record), decoded.subscriptions)
        copy.record = op.data
        copy.expiry_interval = decoded.expiry_interval
        copy.expires_at = decoded.expires_at
        copy.will = decoded.will

    def _index(
        self,
        origin: str,
        client_id: str,
        old: tuple[tuple[str, Any], ...],
        new: tuple[tuple[str, Any], ...],
    ) -> None:
        trie = self.tries.get(origin)
        if trie is None or old == new:
            return
        for topic_filter, _ in old:
            trie.unsubscribe(client_id, topic_filter)
        for topic_filter, options in new:
            if not topic_filter.startswith("$share/"):
                trie.subscribe(client_id, topic_filter, options)

    def _remove(
        self, origin: str, client_id: str, keep_index: bool = False
    ) -> ReplicaSession | None:
        sessions = self.origins.get(origin)
        if sessions is None:
            return None
        copy = sessions.pop(client_id, None)
        if copy is None:
            return None
        self.bytes -= copy.size()
        if origin in self.tries and not keep_index:
            self._index(origin, client_id, _filters(copy.record), ())
        return copy

    def reset(self, origin: str) -> None:
        """The owner starts its snapshot: forget every copy of its sessions."""
        sessions = self.origins.pop(origin, None)
        self.tries.pop(origin, None)
        self.moved.pop(origin, None)
        self.discard_parked(origin)
        self.parked_sessions.pop(origin, None)
        self.parked_sessions_bytes.pop(origin, None)
        if sessions:
            for copy in sessions.values():
                self.bytes -= copy.size()
        wills = self.wills.pop(origin, None)
        if wills:
            self.bytes -= sum(len(data) for data in wills.values())

    def take_all(self, origin: str) -> list[codec.SessionRecord]:
        """Remove every copy of ``origin`` as session records (take()), and ``origin`` with
        them."""
        records = []
        for client_id in list(self.origins.get(origin) or ()):
            record = self.take(origin, client_id)
            if record is not None:
                records.append(record)
        if not self.origins.get(origin):
            self.origins.pop(origin, None)
            self.tries.pop(origin, None)
        return records

    def orphan(self, origin: str, incarnation: int) -> str | None:
        """``origin`` is back as a new incarnation (it restarted without its store): its
        copies are put apart, under "origin#old incarnation", as the sessions of a node that
        is gone (its new life resets ``origin``; broker.cluster hands them back to it at
        once: Cluster._hand_back). Returns that name, or None."""
        old = self.incarnations.get(origin)
        if old is None or old == incarnation or not self.origins.get(origin):
            return None
        name = f"{origin}#{old}"
        self.origins[name] = self.origins.pop(origin)
        trie = self.tries.pop(origin, None)
        if trie is not None:
            self.tries[name] = trie
        del self.incarnations[origin]
        return name

    # --- when the owner is down ---------------------------------------------------------

    def wills_due(
        self, origin: str
    ) -> tuple[list[tuple[str, codec.LiveWill]], list[tuple[str, codec.WillRecord]]]:
        """Our link to ``origin`` dropped: the wills of its clients that were connected (now
        due: their connections ended without a DISCONNECT), taken out; and the delayed
        wills of its offline sessions we keep copies of (due at their time, unless the
        session is claimed first). A will that does not decode is counted and skipped."""
        live: list[tuple[str, codec.LiveWill]] = []
        for client_id, data in (self.wills.pop(origin, None) or {}).items():
            self.bytes -= len(data)
            try:
                live.append((client_id, codec.decode_live_will(data)))
            except codec.ClusterProtocolError:
                self.counters.undecodable += 1
        delayed = [
            (client_id, copy.will)
            for client_id, copy in (self.origins.get(origin) or {}).items()
            if copy.will is not None
        ]
        return live, delayed

    def find(self, client_id: str) -> str | None:
        """The owner whose copy of ``client_id`` this node keeps, if any."""
        for origin, sessions in self.origins.items():
            if client_id in sessions:
                return origin
        return None

    def take(
        self, origin: str, client_id: str, moved_to: str | None = None, now: float = 0.0
    ) -> codec.SessionRecord | None:
        """Remove the copy and make it a session record (deliveries in key order, a message
        that reached it twice once). ``moved_to``: the node the session goes to (a claim);
        the copy stays a forwarding stub for MOVED_GRACE from ``now`` (monotonic)."""
        copy = self._remove(origin, client_id, keep_index=moved_to is not None)
        if copy is None:
            return None
        if moved_to is not None:
            self.moved.setdefault(origin, {})[client_id] = MovedCopy(
                moved_to, copy.record, now + MOVED_GRACE
            )
        record = codec.decode_session(copy.record)
        deliveries: list[codec.DeliveryRecord] = []
        seen: set[tuple[str, int]] = set()
        for key in sorted(copy.deliveries):
            try:
                delivery = codec.decode_delivery(copy.deliveries[key])
            except codec.ClusterProtocolError:
                self.counters.undecodable += 1  # the owner's bug; the cluster logs the count
                continue
            message = delivery.message
            if message.seq:
                message_id = (message.origin_node, message.seq)
                if message_id in seen:
                    continue
                seen.add(message_id)
            deliveries.append(delivery)
        return codec.SessionRecord(
            record.client_id,
            record.expiry_interval,
            record.expires_at,
            record.version,
            record.next_packet_id,
            record.subscriptions,
            tuple(sorted(copy.incoming or ())),
            record.will,
            record.diverged,
            tuple(deliveries),
        )

    def drop(self, client_id: str) -> bool:
        """A clean start of ``client_id`` somewhere: its copies go."""
        origin = self.find(client_id)
        if origin is None:
            return False
        self._remove(origin, client_id)
        self.counters.dropped_clean_start += 1
        return True

    def failover(
        self, origin: str, message: codec.WireMessage, now: float
    ) -> tuple[int, list[str]]:
        """A QoS 1/2 message for ``origin``'s plain subscribers while it is down: queued for
        the copies whose subscriptions match (and sent on for the copies handed over: see
        take_forwards()). Returns (deliveries queued, client ids whose bounds dropped it)."""
        sessions = self.origins.get(origin) or {}
        moved = self.moved.get(origin) or {}
        self.counters.failover_messages += 1
        if not sessions and not moved:
            return 0, []
        trie = self.tries.get(origin)
        if trie is None:
            trie = self.tries[origin] = SubscriptionTrie()
            records = {client_id: copy.record for client_id, copy in sessions.items()}
            records.update((client_id, stub.record) for client_id, stub in moved.items())
            for client_id, record in records.items():
                for topic_filter, options in _filters(record):
                    if not topic_filter.startswith("$share/"):
                        trie.subscribe(client_id, topic_filter, options)
        queued = 0
        dropped: list[str] = []
        for delivery in trie.match(message.topic, message.publisher_client_id, shared=False):
            qos = min(delivery.qos, message.qos)
            retain = message.retain and delivery.retain_as_published
            identifiers = tuple(delivery.subscription_identifiers)
            copy = sessions.get(delivery.client_id)
            if copy is None:
                stub = _live(moved.get(delivery.client_id), now)
                if stub is not None:
                    self._forward(stub, delivery.client_id, message, qos, retain, identifiers)
                continue
            if not self._queue(copy, message, qos, retain, identifiers):
                dropped.append(delivery.client_id)
            elif delivery.qos:
                queued += 1
        self.counters.failover_deliveries += queued
        return queued, dropped

    def failover_shared(
        self, origin: str, message: codec.WireMessage, targets: Targets, now: float
    ) -> tuple[int, list[str], list[tuple[str, str]]]:
        """A QoS 1/2 message for shared members on ``origin`` while it is down: queued for
        each member's copy with that subscription (or sent on to a member whose copy was
        handed over). Returns (deliveries queued, client ids whose bounds dropped it, the
        targets without a copy here: for another member)."""
        sessions = self.origins.get(origin) or {}
        moved = self.moved.get(origin) or {}
        self.counters.failover_messages += 1
        queued = 0
        dropped: list[str] = []
        missing: list[tuple[str, str]] = []
        for shared_filter, client_id in targets:
            kept: ReplicaSession | MovedCopy | None = sessions.get(client_id)
            if kept is None:
                kept = _live(moved.get(client_id), now)
            options = None if kept is None else dict(_filters(kept.record)).get(shared_filter)
            if kept is None or options is None:
                missing.append((shared_filter, client_id))
                continue
            identifier = options.subscription_identifier
            qos = min(options.qos, message.qos)
            retain = message.retain and options.retain_as_published
            identifiers = () if identifier is None else (identifier,)
            if isinstance(kept, MovedCopy):
                self._forward(kept, client_id, message, qos, retain, identifiers)
                continue
            if not self._queue(kept, message, qos, retain, identifiers):
                dropped.append(client_id)
            elif options.qos:
                queued += 1
        self.counters.failover_deliveries += queued
        return queued, dropped, missing

    def failover_delivery(
        self, origin: str, client_id: str, delivery: codec.DeliveryRecord, now: float
    ) -> tuple[bool, bool]:
        """A DELIVER for ``client_id``, whose session moved to ``origin``, while ``origin`` is
        down (REPLICA_DELIVER): queued for its copy (or sent on, when the copy was handed
        over). Returns (queued or sent on, dropped by the copy's bounds); (False, False):
        no copy of that session here."""
        self.counters.failover_messages += 1
        copy = (self.origins.get(origin) or {}).get(client_id)
        qos, retain = delivery.qos, delivery.retain
        identifiers = delivery.subscription_identifiers
        if copy is None:
            stub = _live((self.moved.get(origin) or {}).get(client_id), now)
            if stub is None:
                return False, False
            self._forward(stub, client_id, delivery.message, qos, retain, identifiers)
            return True, False
        if not self._queue(copy, delivery.message, qos, retain, identifiers):
            return False, True
        self.counters.failover_deliveries += 1
        return True, False

    def _forward(
        self,
        stub: MovedCopy,
        client_id: str,
        message: codec.WireMessage,
        qos: int,
        retain: bool,
        identifiers: tuple[int, ...],
    ) -> None:
        """A failover delivery for a copy handed over: to its session's node (a QoS 0
        subscription gets none, as a copy keeps none)."""
        if not qos:
            return
        self.counters.failover_forwarded += 1
        record = codec.DeliveryRecord(message, qos, retain, identifiers)
        self.forwards.append((stub.node, client_id, record))

    def take_forwards(self) -> list[Forward]:
        """The failover messages for copies handed over since the last call: (the session's
        node, client id, delivery), to send there as DELIVER (or deliver here)."""
        forwards, self.forwards = self.forwards, []
        return forwards

    def forget_moved(self, now: float) -> int:
        """Forget the stubs of copies handed over whose MOVED_GRACE is over; how many."""
        gone = [
            (origin, client_id)
            for origin, moved in self.moved.items()
            for client_id, stub in moved.items()
            if stub.until <= now
        ]
        for origin, client_id in gone:
            self._forget_moved(origin, client_id)
        return len(gone)

    def drop_moved(self, client_id: str) -> None:
        """A clean start of ``client_id`` somewhere: the session a stub sends on to ends."""
        for origin, moved in self.moved.items():
            if client_id in moved:
                self._forget_moved(origin, client_id)
                return

    def _forget_moved(self, origin: str, client_id: str) -> None:
        moved = self.moved[origin]
        stub = moved.pop(client_id)
        if not moved:
            del self.moved[origin]
        if origin in self.tries and client_id not in self.origins.get(origin, {}):
            self._index(origin, client_id, _filters(stub.record), ())

    def _queue(
        self,
        copy: ReplicaSession,
        message: codec.WireMessage,
        qos: int,
        retain: bool,
        identifiers: tuple[int, ...],
    ) -> bool:
        """One failover delivery into a copy; False when its bounds drop it."""
        held = sum(len(data) for data in copy.deliveries.values())
        if (
            len(copy.deliveries) >= self.max_queued_messages
            or held + len(message.payload) > self.max_queued_bytes
        ):
            self.counters.failover_dropped += 1
            return False
        if not qos:
            return True  # a QoS 0 subscription: a copy keeps no QoS 0 delivery
        data = codec.encode_delivery(codec.DeliveryRecord(message, qos, retain, identifiers))
        key = self.next_failover_key
        self.next_failover_key = key + 1
        copy.deliveries[key] = data
        self.bytes += len(data)
        return True

    def park(
        self,
        origin: str,
        message: codec.WireMessage,
        now: float,
        targets: Targets | Delivered = (),
    ) -> None:
        """A failover message for an owner this node still reaches (for its plain
        subscribers, the shared ``targets``, or one session's delivery): kept
        PARKED_SECONDS in case our link to it drops too (it died: :meth:`owner_down` queues
        them)."""
        parked = self.parked.setdefault(origin, deque())
        parked.append((now, message, targets))
        size = self.parked_bytes.get(origin, 0) + len(message.payload)
        self.counters.failover_parked += 1
        while parked and (len(parked) > PARKED_MESSAGES or size > self.max_queued_bytes):
            _, old, _ = parked.popleft()
            size -= len(old.payload)
            self.counters.parked_dropped += 1
        self.parked_bytes[origin] = size

    def owner_down(
        self, origin: str, now: float
    ) -> tuple[int, list[str], list[tuple[codec.WireMessage, list[tuple[str, str]]]]]:
        """Our link to ``origin`` dropped: the messages parked for it lately are queued.
        Returns (deliveries queued, client ids whose bounds dropped one, and the messages
        for shared members without a copy here, with those members)."""
        parked = self.parked.pop(origin, None)
        self.parked_bytes.pop(origin, None)
        queued = 0
        dropped: list[str] = []
        elsewhere: list[tuple[codec.WireMessage, list[tuple[str, str]]]] = []
        for when, message, targets in parked or ():
            if now - when > PARKED_SECONDS:
                self.counters.parked_discarded += 1
                continue
            if isinstance(targets, Delivered):
                client_id = targets.client_id
                done, full_copy = self.failover_delivery(origin, client_id, targets.delivery, now)
                count, full = int(done), [client_id] if full_copy else []
            elif targets:
                count, full, missing = self.failover_shared(origin, message, targets, now)
                if missing:
                    elsewhere.append((message, missing))
            else:
                count, full = self.failover(origin, message, now)
            queued += count
            dropped.extend(full)
        return queued, dropped, elsewhere

    def adopt(self, origin: str, record: codec.SessionRecord) -> tuple[bool, int]:
        """A session handed over to ``origin`` (a claim's or a migration's TRANSFER) that
        ``origin`` had not acknowledged when its sender lost its link to it
        (REPLICA_TRANSFER; ``origin`` may have died with it): kept as a copy of ``origin``'s
        session, as if ``origin`` had installed and replicated it, unless we keep a copy of
        it already (``origin`` did install it: its copy is the newer). Its deliveries queue
        as failover ones, within the copy's bounds. Returns (adopted, deliveries dropped)."""
        sessions = self.origins.setdefault(origin, {})
        client_id = record.client_id
        if client_id in sessions:
            self.counters.adopted_known += 1
            return False, 0
        bare = replace(record, deliveries=(), incoming_qos2=())
        data = codec.encode_session(bare)
        copy = sessions[client_id] = ReplicaSession(data, bare)
        copy.incoming = set(record.incoming_qos2) or None
        self.bytes += len(data)
        self._index(origin, client_id, (), bare.subscriptions)
        dropped = 0
        for delivery in record.deliveries:
            message, identifiers = delivery.message, delivery.subscription_identifiers
            if not self._queue(copy, message, delivery.qos, delivery.retain, identifiers):
                dropped += 1
        self.counters.adopted += 1
        return True, dropped

    def park_session(self, origin: str, record: codec.SessionRecord, now: float) -> None:
        """A REPLICA_TRANSFER for an owner this node still reaches (only its sender lost
        it): kept PARKED_SECONDS in case our link to it drops too (:meth:`adopt_parked`),
        PARKED_SESSIONS per owner at most (the oldest go first)."""
        parked = self.parked_sessions.setdefault(origin, {})
        size = self.parked_sessions_bytes.get(origin, 0)
        old = parked.pop(record.client_id, None)
        if old is not None:
            size -= _record_size(old[1])
        parked[record.client_id] = (now, record)
        size += _record_size(record)
        self.counters.sessions_parked += 1
        while parked and (len(parked) > PARKED_SESSIONS or size > PARKED_SESSIONS_BYTES):
            oldest = next(iter(parked))
            size -= _record_size(parked.pop(oldest)[1])
            self.counters.sessions_parked_dropped += 1
        self.parked_sessions_bytes[origin] = size

    def adopt_parked(self, origin: str, now: float) -> list[tuple[codec.SessionRecord, int]]:
        """Our link to ``origin`` dropped: the sessions parked for it lately are adopted
        (:meth:`adopt`). Returns each adopted record with the deliveries its bounds dropped."""
        adopted = []
        self.parked_sessions_bytes.pop(origin, None)
        for when, record in (self.parked_sessions.pop(origin, None) or {}).values():
            if now - when > PARKED_SECONDS:
                continue
            done, dropped = self.adopt(origin, record)
            if done:
                adopted.append((record, dropped))
        return adopted

    def discard_parked(self, origin: str, now: float | None = None) -> None:
        """Forget what was parked for ``origin`` (older than PARKED_SECONDS, or all)."""
        sessions = self.parked_sessions.get(origin)
        if sessions:
            for client_id, (when, record) in list(sessions.items()):
                if now is not None and now - when <= PARKED_SECONDS:
                    break
                del sessions[client_id]
                self.parked_sessions_bytes[origin] -= _record_size(record)
        if sessions is not None and not sessions:
            del self.parked_sessions[origin]
            del self.parked_sessions_bytes[origin]
        parked = self.parked.get(origin)
        if not parked:
            return
        while parked and (now is None or now - parked[0][0] > PARKED_SECONDS):
            _, message, _ = parked.popleft()
            self.parked_bytes[origin] -= len(message.payload)
            self.counters.parked_discarded += 1
        if not parked:
            del self.parked[origin]
            del self.parked_bytes[origin]

    def expire(self, origin: str, down_since: float, now: float) -> int:
        """Drop the copies of a node that is down whose session has expired (wall clock):
        a connected session's expiry counts from when the owner went down."""
        sessions = self.origins.get(origin)
        if not sessions:
            return 0
        gone = []
        for client_id, copy in sessions.items():
            if copy.expiry_interval == SESSION_NEVER_EXPIRES:
                continue
            deadline = copy.expires_at or down_since + copy.expiry_interval
            if deadline <= now:
                gone.append(client_id)
        for client_id in gone:
            self._remove(origin, client_id)
        self.counters.expired += len(gone)
        return len(gone)

    def status(self) -> dict[str, Any]:
        return {
            "sessions": {
                origin: len(sessions) for origin, sessions in self.origins.items() if sessions
            },
            "deliveries": sum(
                len(copy.deliveries)
                for sessions in self.origins.values()
                for copy in sessions.values()
            ),
            "bytes": self.bytes,
            "parked": {origin: len(parked) for origin, parked in self.parked.items()},
            "parked_sessions": {
                origin: len(sessions) for origin, sessions in self.parked_sessions.items()
            },
            "moved": {origin: len(moved) for origin, moved in self.moved.items()},
            "wills": {origin: len(wills) for origin, wills in self.wills.items() if wills},
            "counters": {
                name: getattr(self.counters, name) for name in ReplicaCounters.__dataclass_fields__
            },
        }
