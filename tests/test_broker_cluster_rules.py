"""The sans-IO rules behind issue 12, without sockets or clocks: claims and versions
(broker/registry.py), reliable frame bookkeeping (broker/reliable.py), shared subscription
strategies (broker/subscriptions.py), message ids (broker/message.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from broker.message import MessageIds
from broker.registry import (
    ClaimDecision,
    LamportClock,
    PendingClaim,
    Version,
    decide,
    merges_into,
)
from broker.reliable import Inbox, InboxVerdict, Outbox
from broker.session import SeenIds
from broker.subscriptions import SubscriptionOptions, SubscriptionTrie

pytestmark = pytest.mark.timeout(30)


# --- claims -----------------------------------------------------------------------------------


def test_versions_order_by_counter_then_node() -> None:
    assert Version(2, "a") > Version(1, "z")
    assert Version(1, "b") > Version(1, "a")
    assert sorted([Version(3, "a"), Version(1, "c"), Version(1, "b")]) == [
        Version(1, "b"),
        Version(1, "c"),
        Version(3, "a"),
    ]


def test_lamport_clock_ticks_past_what_it_saw_and_the_floor() -> None:
    clock = LamportClock("node-1")
    assert clock.claim() == Version(1, "node-1")
    clock.observe(Version(41, "node-2"))
    assert clock.claim() == Version(42, "node-1")
    clock.observe(Version(7, "node-3"))  # older: changes nothing
    assert clock.claim() == Version(43, "node-1")
    # A restarted node without its counter still claims above its old claims (wall ms).
    assert LamportClock("node-1").claim(floor=1_700_000_000_000).counter == 1_700_000_000_000


@pytest.mark.parametrize(
    ("owned", "pending", "incoming", "decision"),
    [
        (None, None, Version(5, "b"), ClaimDecision.NONE),
        (Version(4, "a"), None, Version(5, "b"), ClaimDecision.HAND_OVER),
        (Version(6, "a"), None, Version(5, "b"), ClaimDecision.REJECT),
        (Version(5, "a"), None, Version(5, "b"), ClaimDecision.HAND_OVER),  # tie: node name
        (Version(5, "c"), None, Version(5, "b"), ClaimDecision.REJECT),
        # We wait for our own claim: a newer one is handed over once ours completes.
        (None, Version(4, "a"), Version(5, "b"), ClaimDecision.DEFER),
        (Version(1, "a"), Version(6, "a"), Version(5, "b"), ClaimDecision.REJECT),
    ],
)
def test_claim_decisions(
    owned: Version | None, pending: Version | None, incoming: Version, decision: ClaimDecision
) -> None:
    assert decide(owned, pending, incoming) is decision


def test_two_connects_at_once_leave_exactly_one_owner() -> None:
    """Node A and node B claim the same client id at once; each sees the other's claim."""
    a, b = Version(10, "node-a"), Version(10, "node-b")
    # A, waiting for its claim, sees B's: B's is newer (same counter, larger name): defer.
    assert decide(None, a, b) is ClaimDecision.DEFER
    # B, waiting for its own, sees A's older claim: reject it.
    assert decide(None, b, a) is ClaimDecision.REJECT
    # So A's connect is rejected by B, and once A is done it hands over to B: one owner.


def test_the_older_copy_merges_into_the_newer_after_a_split() -> None:
    assert merges_into(Version(3, "a"), Version(4, "b"))
    assert not merges_into(Version(4, "b"), Version(3, "a"))


def test_pending_claim_completes_when_every_peer_answered() -> None:
    claim = PendingClaim("dev", Version(1, "a"), False, {"b", "c"})
    claim.answered("b")
    assert not claim.complete
    claim.answered("c")
    assert claim.complete


# --- reliable frames --------------------------------------------------------------------------


def test_outbox_numbers_keeps_and_forgets_on_ack() -> None:
    outbox = Outbox(limit=1000)
    for _ in range(5):
        seq = outbox.next_seq()
        assert outbox.add(seq, b"x" * 10) == []
    assert (len(outbox), outbox.bytes) == (5, 50)
    assert list(outbox.after(3)) == [b"x" * 10] * 2
    assert outbox.ack(3) == 3
    assert [seq for seq, _ in outbox.entries] == [4, 5]
    assert outbox.ack(3) == 0  # an old ACK again: nothing
    assert outbox.ack(9) == 2
    assert outbox.bytes == 0


def test_outbox_drops_the_oldest_past_its_byte_bound() -> None:
    outbox = Outbox(limit=25)
    dropped: list[int] = []
    for _ in range(5):
        dropped += outbox.add(outbox.next_seq(), b"y" * 10)
    assert dropped == [1, 2, 3]
    assert [seq for seq, _ in outbox.entries] == [4, 5]
    assert (outbox.dropped, outbox.dropped_bytes) == (3, 30)


def test_inbox_applies_once_in_order() -> None:
    inbox = Inbox(incarnation=7, applied=2)
    assert inbox.check(2) is InboxVerdict.DUPLICATE
    assert inbox.check(3) is InboxVerdict.APPLY
    assert inbox.check(3) is InboxVerdict.DUPLICATE
    # The sender's bounded outbox dropped 4..5: applied, and said.
    assert inbox.check(6) is InboxVerdict.GAP
    assert inbox.applied == 6


def test_a_new_incarnation_of_the_peer_starts_over() -> None:
    inbox = Inbox(incarnation=7, applied=100)
    assert not inbox.peer_incarnation(7)
    assert inbox.peer_incarnation(8)
    assert inbox.applied == 0
    # Its numbering starts wherever it stands: the first frame is applied without a gap.
    assert inbox.check(41) is InboxVerdict.APPLY
    assert inbox.check(42) is InboxVerdict.APPLY


def test_seen_ids_remember_a_window() -> None:
    seen = SeenIds()
    assert seen.first_time(("n", 1))
    assert not seen.first_time(("n", 1))
    for seq in range(2, 2000):
        seen.first_time(("n", seq))
    assert seen.first_time(("n", 1))  # long forgotten


def test_message_ids_never_repeat_across_restarts() -> None:
    first = MessageIds(0, 1_000.0)
    used = [first.next() for _ in range(3)]
    # A restart with the reserved block, or without a store a second later.
    assert MessageIds(used[-1] + 10_000, 1_000.0).next() > used[-1]
    assert MessageIds(0, 1_001.0).next() > used[-1]


# --- shared subscription strategies -----------------------------------------------------------


def _group(strategy: str, members: int = 3) -> SubscriptionTrie:
    trie = SubscriptionTrie(strategy)
    for number in range(members):
        trie.subscribe(f"m{number}", "$share/g/t/#", SubscriptionOptions(1))
    return trie


def _picks(
    trie: SubscriptionTrie, publisher: str, count: int, online: set[str] | None = None
) -> Counter[str]:
    picks: Counter[str] = Counter()
    for _ in range(count):
        (delivery,) = trie.match("t/x", publisher, lambda c: online is None or c in online)
        picks[delivery.client_id] += 1
    return picks


def test_round_robin_takes_turns_preferring_connected_members() -> None:
    assert _picks(_group("round_robin"), "p", 9) == Counter({"m0": 3, "m1": 3, "m2": 3})
    assert _picks(_group("round_robin"), "p", 6, {"m1", "m2"}) == Counter({"m1": 3, "m2": 3})
    # Nobody connected: offline members still get their turn (their sessions queue).
    assert sum(_picks(_group("round_robin"), "p", 6, set()).values()) == 6


def test_hash_clientid_sends_one_publisher_to_one_member() -> None:
    trie = _group("hash_clientid")
    for publisher in ("device-1", "device-2", "device-3"):
        assert len(_picks(trie, publisher, 10)) == 1
    spread = {next(iter(_picks(trie, f"device-{n}", 1))) for n in range(40)}
    assert len(spread) > 1


def test_sticky_keeps_its_member_while_it_is_connected() -> None:
    trie = _group("sticky")
    picks = _picks(trie, "p", 10)
    assert len(picks) == 1
    (first,) = picks
    others = {"m0", "m1", "m2"} - {first}
    assert set(_picks(trie, "p", 10, others)) <= others
    assert len(_picks(trie, "p", 10, others)) == 1


def test_random_spreads() -> None:
    assert len(_picks(_group("random"), "p", 60)) == 3


def test_shared_groups_name_their_filter_for_the_cluster() -> None:
    trie = SubscriptionTrie()
    trie.subscribe("a", "$share/g1/t/+", SubscriptionOptions(1))
    trie.subscribe("b", "$share/g2/t/#", SubscriptionOptions(1))
    trie.subscribe("c", "t/x", SubscriptionOptions(1))
    assert sorted(name for name, _ in trie.shared_groups("t/x")) == [
        "$share/g1/t/+",
        "$share/g2/t/#",
    ]
    # shared=False leaves the groups to the cluster.
    assert [d.client_id for d in trie.match("t/x", shared=False)] == ["c"]
