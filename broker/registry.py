"""Who owns a client id in the cluster: claims, versions and the rules that pick one owner.

Issue 12 asks for one owner per client id cluster-wide, kept right when links drop and come
back. The rules (pure functions and small state, no I/O, no clock: tests drive them):

- A client connecting on node B makes a *claim*: a :class:`Version` ``(counter, B)`` from a
  Lamport clock (:class:`LamportClock`: one more than the highest counter B has seen), sent
  to every up peer as CLAIM. Versions compare as tuples, so two claims never tie.
- A node that receives CLAIM(X, v) answers by :func:`decide`: it *hands over* a session it
  owns for X at a lower version (closing its connection: 5.0 DISCONNECT 0x8E; TRANSFER of the
  session when clean start is 0, the session ended with its will when it is 1), *rejects* a
  claim lower than what it owns (the claimer's client is closed: exactly one connection
  remains), *defers* a higher claim while it waits for its own claim to complete (it hands
  the session over as soon as its own transfer is in), and answers *none* otherwise.
- The claimer waits (:class:`PendingClaim`) until every peer that was up has answered, or
  ``takeover_timeout`` passes. A peer that did not answer is *unreachable*: with clean start
  0 the client gets a fresh session (session_present 0), marked *diverged*, so that when the
  old owner is back its stale copy is merged in (:func:`merges_into`) and de-duplicated by
  message id.
- When a link comes up, each side sends the client ids it owns with their versions (OWNED).
  For a client id both own, the lower version merges into the higher (:func:`merges_into`):
  queued and unacknowledged messages move, the older copy and its connection end.

Why ask every peer instead of replicating a registry of every session to every node (the
lead's first frame): the answer comes from the node that holds the session, so it is never
stale, there is no registry to sync, bound or persist, and a node's memory does not grow
with the sessions of the others. The price is one cluster round trip on a connect with clean
start 0 (measured in bench/cluster_bench.py), which a takeover needs anyway.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from broker.cluster_codec import Claim, Version

__all__ = [
    "ClaimDecision",
    "LamportClock",
    "PendingClaim",
    "Version",
    "decide",
    "merges_into",
]


class LamportClock:
    """Counter for claims: ``claim`` ticks past everything ``observe``d."""

    __slots__ = ("counter", "node")

    def __init__(self, node: str, counter: int = 0) -> None:
        self.node = node
        self.counter = counter

    def observe(self, version: Version) -> None:
        self.counter = max(self.counter, version.counter)

    def claim(self, floor: int = 0) -> Version:
        """A new version; ``floor`` (the wall clock in milliseconds) keeps a node that
        restarted without its counter above the claims it made before."""
        self.counter = max(self.counter + 1, floor)
        return Version(self.counter, self.node)


class ClaimDecision(enum.Enum):
    NONE = "none"  # nothing here for this client id
    HAND_OVER = "hand over"  # the claim is newer than our session: close, transfer or end it
    REJECT = "reject"  # our session or our own pending claim is newer
    DEFER = "defer"  # we wait for our own (older) claim; hand over once it completes


def decide(owned: Version | None, pending: Version | None, incoming: Version) -> ClaimDecision:
    """What a node does with CLAIM(``incoming``) given what it owns and what it waits for."""
    if pending is not None:
        return ClaimDecision.DEFER if incoming > pending else ClaimDecision.REJECT
    if owned is not None:
        return ClaimDecision.HAND_OVER if incoming > owned else ClaimDecision.REJECT
    return ClaimDecision.NONE


def merges_into(mine: Version, theirs: Version) -> bool:
    """Both sides own a client id after a split: True when ours is the older copy."""
    return mine < theirs


@dataclass(slots=True)
class PendingClaim:
    """A connect waiting for the answers of the peers that were up when it claimed."""

    client_id: str
    version: Version
    clean_start: bool
    waiting: set[str]
    # Peers that rejected the claim (a newer claim or session holds the client id).
    rejected_by: set[str] = field(default_factory=set)
    # Claims of other nodes that arrived while we waited and are newer: (node, claim).
    deferred: list[tuple[str, Claim]] = field(default_factory=list)
    # Set when a TRANSFER came in: the session to install.
    transferred: bool = False

    def answered(self, peer: str) -> None:
        self.waiting.discard(peer)

    @property
    def complete(self) -> bool:
        return not self.waiting
