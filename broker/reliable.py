"""Reliable frames between two nodes: sequence numbers, acknowledgements, resend, de-duplication.

Issue 12 (QoS 1/2 across links without loss or duplication). Per directed pair of nodes:

- the sender numbers each reliable frame (QoS 1/2 PUBLISH, TRANSFER, DELIVER, state store
  writes) and keeps it in its :class:`Outbox` until the receiver ACKs it; the outbox is
  written to the node's store, so a restarted sender resends too;
- the receiver applies each frame once, in order (:class:`Inbox`: seq <= the high-water is
  a duplicate and is skipped), commits the effects and its high-water in one store
  transaction, then ACKs cumulatively, once per loop turn;
- a link that comes up starts with HELLO, which carries the last seq the sender applied from
  the receiver (of the receiver's *incarnation*: a node that lost its store starts a new
  one, and its peers forget the old high-water); the receiver resends everything after it;
- the outbox is bounded in bytes: past the bound the oldest frames are dropped, counted and
  logged by the caller (never silently); unacknowledged bytes above ``high_water`` pause the
  publishers that feed the peer, below ``low_water`` they resume (issue 14 item 2).

Pure bookkeeping: no I/O, no clock.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator

__all__ = ["Inbox", "InboxVerdict", "Outbox"]


class Outbox:
    """Unacknowledged reliable frames to one peer, in seq order."""

    __slots__ = ("bytes", "dropped", "dropped_bytes", "entries", "limit", "seq")

    def __init__(self, limit: int, seq: int = 0) -> None:
        self.limit = limit
        # The last seq given out; a new incarnation starts at 0.
        self.seq = seq
        self.entries: deque[tuple[int, bytes]] = deque()
        self.bytes = 0
        self.dropped = 0
        self.dropped_bytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def add(self, seq: int, data: bytes) -> list[int]:
        """Keep ``data`` (the encoded RELIABLE frame) until acked; returns the seqs dropped
        to stay within ``limit`` (oldest first; the caller counts and logs them)."""
        self.entries.append((seq, data))
        self.bytes += len(data)
        dropped: list[int] = []
        while self.bytes > self.limit and len(self.entries) > 1:
            old_seq, old = self.entries.popleft()
            self.bytes -= len(old)
            self.dropped += 1
            self.dropped_bytes += len(old)
            dropped.append(old_seq)
        return dropped

    def restore(self, seq: int, data: bytes) -> None:
        """An entry read back from the store at start (already in seq order)."""
        self.entries.append((seq, data))
        self.bytes += len(data)
        self.seq = max(self.seq, seq)

    def ack(self, seq: int) -> int:
        """Forget every entry up to ``seq``; returns how many."""
        entries = self.entries
        count = 0
        while entries and entries[0][0] <= seq:
            _, data = entries.popleft()
            self.bytes -= len(data)
            count += 1
        return count

    def after(self, seq: int) -> Iterator[bytes]:
        """The frames to resend to a peer that applied everything up to ``seq``."""
        for entry_seq, data in self.entries:
            if entry_seq > seq:
                yield data


class InboxVerdict(enum.Enum):
    APPLY = "apply"
    DUPLICATE = "duplicate"
    GAP = "gap"


class Inbox:
    """What this node applied from one peer: the high-water of its seqs."""

    __slots__ = ("applied", "fresh", "incarnation")

    def __init__(self, incarnation: int = 0, applied: int = 0) -> None:
        self.incarnation = incarnation
        self.applied = applied
        # Nothing applied from this incarnation yet: its first frame sets the count, wherever
        # its numbering stands (a peer that kept its store and met us without ours).
        self.fresh = applied == 0

    def peer_incarnation(self, incarnation: int) -> bool:
        """The peer's HELLO named its incarnation; True when it is a new one (reset)."""
        if incarnation == self.incarnation:
            return False
        self.incarnation = incarnation
        self.applied = 0
        self.fresh = True
        return True

    def check(self, seq: int) -> InboxVerdict:
        """DUPLICATE: skip it. APPLY: the next one. GAP: apply it too, but frames before it
        were dropped by the sender's bounded outbox (it counted them; the caller logs)."""
        if seq <= self.applied:
            return InboxVerdict.DUPLICATE
        fresh, self.fresh = self.fresh, False
        verdict = InboxVerdict.APPLY if fresh or seq == self.applied + 1 else InboxVerdict.GAP
        self.applied = seq
        return verdict
