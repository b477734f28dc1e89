"""Subscription trie and retained store (MQTT 5.0 sections 4.7, 4.8.2, 3.3.4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.mqtt import matches
from broker.subscriptions import (
    MATCH_CACHE_TOPICS,
    RetainedStore,
    SubscriptionOptions,
    SubscriptionTrie,
)

pytestmark = pytest.mark.timeout(30)


def clients(trie: SubscriptionTrie, topic: str, publisher: str | None = None) -> set[str]:
    return {delivery.client_id for delivery in trie.match(topic, publisher)}


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("sport/tennis/player1/#", "sport/tennis/player1", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
        ("sport/#", "sport", True),
        ("#", "sport/tennis", True),
        ("sport/tennis/+", "sport/tennis/player1", True),
        ("sport/tennis/+", "sport/tennis/player1/ranking", False),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        ("#", "$SYS/broker", False),
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),
        ("$SYS/#", "$SYS/monitor/Clients", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ],
)
def test_spec_examples(topic_filter: str, topic: str, expected: bool) -> None:
    assert matches(topic_filter, topic) is expected
    trie = SubscriptionTrie()
    trie.subscribe("c", topic_filter, SubscriptionOptions(0))
    assert (clients(trie, topic) == {"c"}) is expected


levels = st.sampled_from(["a", "b", "", "$x", "c"])
filter_levels = st.sampled_from(["a", "b", "", "+", "$x"])


@given(
    st.lists(levels, min_size=1, max_size=4),
    st.lists(filter_levels, min_size=1, max_size=4),
    st.booleans(),
)
def test_trie_agrees_with_codec_matches(
    topic_levels: list[str], filter_parts: list[str], hash_end: bool
) -> None:
    topic = "/".join(topic_levels)
    topic_filter = "/".join(filter_parts + (["#"] if hash_end else []))
    trie = SubscriptionTrie()
    trie.subscribe("c", topic_filter, SubscriptionOptions(0))
    assert (clients(trie, topic) == {"c"}) == matches(topic_filter, topic)


def test_overlapping_subscriptions_merge_with_highest_qos_and_all_identifiers() -> None:
    trie = SubscriptionTrie()
    trie.subscribe("c", "a/#", SubscriptionOptions(0, subscription_identifier=1))
    trie.subscribe("c", "a/+", SubscriptionOptions(2, subscription_identifier=2))
    trie.subscribe("c", "a/b", SubscriptionOptions(1))
    [delivery] = trie.match("a/b")
    assert delivery.qos == 2
    assert sorted(delivery.subscription_identifiers) == [1, 2]


def test_no_local_skips_the_publisher_only() -> None:
    trie = SubscriptionTrie()
    trie.subscribe("me", "t", SubscriptionOptions(1, no_local=True))
    trie.subscribe("other", "t", SubscriptionOptions(1, no_local=True))
    assert clients(trie, "t", publisher="me") == {"other"}


def test_shared_subscription_round_robin_prefers_available_members() -> None:
    trie = SubscriptionTrie()
    for name in ("x", "y", "z"):
        trie.subscribe(name, "$share/g/jobs/+", SubscriptionOptions(1))
    trie.subscribe("plain", "jobs/#", SubscriptionOptions(0))
    picked = [
        next(d.client_id for d in trie.match("jobs/1") if d.client_id != "plain") for _ in range(6)
    ]
    assert picked == ["x", "y", "z", "x", "y", "z"]
    only_z = [
        next(
            d.client_id
            for d in trie.match("jobs/1", available=lambda c: c == "z")
            if d.client_id != "plain"
        )
        for _ in range(3)
    ]
    assert only_z == ["z", "z", "z"]


def test_two_groups_each_get_one_copy() -> None:
    trie = SubscriptionTrie()
    trie.subscribe("a1", "$share/a/t", SubscriptionOptions(0))
    trie.subscribe("a2", "$share/a/t", SubscriptionOptions(0))
    trie.subscribe("b1", "$share/b/t", SubscriptionOptions(0))
    deliveries = trie.match("t")
    assert len(deliveries) == 2


def test_unsubscribe_prunes_and_counts_filters() -> None:
    trie = SubscriptionTrie()
    assert trie.subscribe("c", "a/b/c", SubscriptionOptions(0)) is False
    assert trie.subscribe("c", "a/b/c", SubscriptionOptions(1)) is True
    trie.subscribe("d", "a/b/c", SubscriptionOptions(1))
    assert trie.count_for("a/b/c") == 2
    assert trie.unsubscribe("c", "a/b/c") is True
    assert trie.unsubscribe("c", "a/b/c") is False
    assert trie.unsubscribe("d", "a/b/c") is True
    assert trie.filters() == []
    assert trie._root.is_empty()


def test_retained_store_matching_and_delete() -> None:
    store: RetainedStore[str] = RetainedStore()
    store.set("a/b", "1")
    store.set("a/c", "2")
    store.set("$SYS/x", "3")
    assert sorted(store.matching("a/+")) == ["1", "2"]
    assert store.matching("#") == ["1", "2"] or sorted(store.matching("#")) == ["1", "2"]
    assert store.matching("a/b") == ["1"]
    store.set("a/b", None)
    assert store.matching("a/b") == []


def test_match_stays_current_while_topics_are_remembered() -> None:
    # SubscriptionTrie remembers the matching nodes per topic; every change of the trie's
    # shape (a new node, a pruned branch) and of its subscribers must still show.
    trie = SubscriptionTrie()
    trie.subscribe("a", "x/y", SubscriptionOptions(qos=0))
    assert [d.client_id for d in trie.match("x/y")] == ["a"]
    trie.subscribe("b", "x/+", SubscriptionOptions(qos=1))  # new node
    assert sorted(d.client_id for d in trie.match("x/y")) == ["a", "b"]
    trie.subscribe("c", "x/y", SubscriptionOptions(qos=0))  # existing node
    assert sorted(d.client_id for d in trie.match("x/y")) == ["a", "b", "c"]
    trie.unsubscribe("b", "x/+")  # pruned
    trie.unsubscribe("a", "x/y")
    assert [d.client_id for d in trie.match("x/y")] == ["c"]
    trie.subscribe("d", "$share/g/x/#", SubscriptionOptions(qos=1))
    assert sorted(d.client_id for d in trie.match("x/y")) == ["c", "d"]
    for number in range(MATCH_CACHE_TOPICS + 5):  # past the bound: cleared, still right
        assert trie.match(f"other/{number}") == []
    assert sorted(d.client_id for d in trie.match("x/y")) == ["c", "d"]


def test_exact_filters_shared_by_sessions_count_and_merge() -> None:
    # Filters without wildcards live in a table apart from the trie: one subscriber as a
    # tuple, several as a dict, back to a tuple when one is left.
    trie = SubscriptionTrie()
    assert trie.subscribe("a", "fleet/1/commands", SubscriptionOptions(1)) is False
    assert trie.subscribe("b", "fleet/1/commands", SubscriptionOptions(0)) is False
    assert trie.subscribe("b", "fleet/1/commands", SubscriptionOptions(2)) is True
    trie.subscribe("a", "fleet/+/commands", SubscriptionOptions(2, subscription_identifier=7))
    assert trie.count_for("fleet/1/commands") == 2
    assert sorted(trie.filters()) == ["fleet/+/commands", "fleet/1/commands"]
    assert len(trie) == 3
    deliveries = {d.client_id: d for d in trie.match("fleet/1/commands")}
    assert (deliveries["a"].qos, deliveries["a"].subscription_identifiers) == (2, [7])
    assert (deliveries["b"].qos, deliveries["b"].subscription_identifiers) == (2, [])
    assert trie.unsubscribe("a", "fleet/1/commands") is True
    assert trie.unsubscribe("a", "fleet/1/commands") is False
    assert trie.count_for("fleet/1/commands") == 1
    assert sorted(d.client_id for d in trie.match("fleet/1/commands")) == ["a", "b"]
    assert trie.unsubscribe("b", "fleet/1/commands") is True
    assert trie.count_for("fleet/1/commands") == 0
    assert trie.filters() == ["fleet/+/commands"]
    # "$" topics: an exact filter names them; wildcards at the first level do not.
    trie.subscribe("s", "$SYS/x", SubscriptionOptions(0))
    assert clients(trie, "$SYS/x") == {"s"}
    assert clients(trie, "$SYS/y") == set()


operations = st.lists(
    st.tuples(
        st.booleans(),
        st.sampled_from(["c1", "c2", "c3"]),
        st.sampled_from(["a", "a/b", "a/+", "#", "$share/g/a/b", "a/b/", "/a"]),
        st.integers(0, 2),
    ),
    max_size=30,
)


@given(operations, st.sampled_from(["a", "a/b", "a/c", "a/b/", "/a", "b"]))
def test_trie_agrees_with_a_table_of_subscriptions(
    steps: list[tuple[bool, str, str, int]], topic: str
) -> None:
    trie = SubscriptionTrie()
    model: dict[tuple[str, str], int] = {}
    for add, client_id, topic_filter, qos in steps:
        if add:
            existed = trie.subscribe(client_id, topic_filter, SubscriptionOptions(qos))
            assert existed == ((client_id, topic_filter) in model)
            model[client_id, topic_filter] = qos
        else:
            removed = trie.unsubscribe(client_id, topic_filter)
            assert removed == (model.pop((client_id, topic_filter), None) is not None)
    held = {topic_filter for _, topic_filter in model}
    assert sorted(trie.filters()) == sorted(held)
    assert len(trie) == len(model)
    for topic_filter in held:
        assert trie.count_for(topic_filter) == sum(f == topic_filter for _, f in model)
    expected: dict[str, int] = {}
    for (client_id, topic_filter), qos in model.items():
        if not topic_filter.startswith("$share/") and matches(topic_filter, topic):
            expected[client_id] = max(qos, expected.get(client_id, 0))
    plain = {d.client_id: d.qos for d in trie.match(topic, shared=False)}
    assert plain == expected
