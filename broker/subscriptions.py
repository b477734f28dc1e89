"""Subscription trie and retained message store (MQTT 5.0 section 4.7, 4.8.2; 3.1.1 section 4.7).

This module owns *who receives what*: a trie keyed by topic levels holds every subscription
of every session on this node, including shared subscriptions (``$share/GROUP/FILTER``,
MQTT 5.0 section 4.8.2) whose members are served round robin. Matching follows the spec:

- ``+`` matches exactly one level, ``#`` matches the parent level and any number of children;
- a topic starting with ``$`` is not matched by a filter whose first level is a wildcard
  (section 4.7.2);
- overlapping subscriptions of one session yield a single delivery at the highest granted
  QoS carrying every matching Subscription Identifier (section 3.3.4);
- No Local (section 3.8.3.1) is applied at match time, given the publisher's client id.

The retained store keeps the last retained message per topic name (a zero-length payload
deletes it, section 3.3.1.3) and answers "which retained messages match this filter".

Pure data structures: no I/O, no clock (expiry is decided by the caller).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from broker.mqtt import SHARED_SUBSCRIPTION_PREFIX, matches, split_shared

__all__ = [
    "SHARED_STRATEGIES",
    "Delivery",
    "RetainedStore",
    "SubscriptionOptions",
    "SubscriptionTrie",
]


SHARED_STRATEGIES = ("round_robin", "random", "sticky", "hash_clientid")
# Shared-subscription choices need no cryptographic quality, only spread.
_RANDOM = random.Random()


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """What a session asked for with one topic filter (MQTT 5.0 section 3.8.3.1)."""

    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    subscription_identifier: int | None = None


@dataclass(slots=True)
class Delivery:
    """One delivery of one published message to one session, after merging overlaps."""

    client_id: str
    qos: int
    retain_as_published: bool
    subscription_identifiers: list[int] = field(default_factory=list)


#: Topics whose matching nodes SubscriptionTrie keeps (cleared at once when full).
MATCH_CACHE_TOPICS = 10_000


class _SharedGroup:
    """Members of one ``$share/group/filter``, and where the strategy stands.

    Strategies as EMQX names them (``broker.shared_subscription_strategy``): round_robin
    (each member in turn), random, sticky (the last member picked while it stays available),
    hash_clientid (the publisher's client id hashed onto the members, so one publisher's
    messages go to one member). Every strategy prefers members for which ``available`` is
    true (connected ones) and falls back to the others (offline persistent members queue).
    """

    __slots__ = ("last", "members", "next_index")

    def __init__(self) -> None:
        self.members: dict[str, SubscriptionOptions] = {}
        self.next_index = 0
        self.last: str | None = None

    def pick(
        self,
        available: Callable[[str], bool],
        strategy: str = "round_robin",
        publisher: str | None = None,
    ) -> tuple[str, SubscriptionOptions] | None:
        """The member to deliver to, or None when the group is empty."""
        if not self.members:
            return None
        names = list(self.members)
        if strategy == "round_robin":
            count = len(names)
            for offset in range(count):
                index = (self.next_index + offset) % count
                if available(names[index]):
                    self.next_index = (index + 1) % count
                    return names[index], self.members[names[index]]
            index = self.next_index % count
            self.next_index = (index + 1) % count
            return names[index], self.members[names[index]]
        candidates = [name for name in names if available(name)] or names
        if strategy == "sticky":
            if self.last not in candidates:
                self.last = _RANDOM.choice(candidates)
            name = self.last
        elif strategy == "hash_clientid":
            key = (publisher or "").encode("utf-8")
            name = candidates[zlib.crc32(key) % len(candidates)]
        else:
            name = _RANDOM.choice(candidates)
        assert name is not None
        return name, self.members[name]


#: One subscriber of an exact filter, or several (SubscriptionTrie._exact).
_Subscribers = tuple[str, SubscriptionOptions] | dict[str, SubscriptionOptions]


def _is_exact(topic_filter: str) -> bool:
    """A filter that matches one topic name only: no wildcard, not shared."""
    return (
        "+" not in topic_filter
        and "#" not in topic_filter
        and not topic_filter.startswith(SHARED_SUBSCRIPTION_PREFIX)
    )


def _merge(
    merged: dict[str, Delivery],
    subscribers: Iterable[tuple[str, SubscriptionOptions]],
    publisher_client_id: str | None,
) -> None:
    """Fold matching subscriptions into each session's delivery (section 3.3.4); one call per
    node or exact filter, the loop inline (a call per subscriber cost fan-out ~5%)."""
    for client_id, options in subscribers:
        if options.no_local and client_id == publisher_client_id:
            continue
        delivery = merged.get(client_id)
        if delivery is None:
            delivery = merged[client_id] = Delivery(client_id, options.qos, False)
        elif options.qos > delivery.qos:
            delivery.qos = options.qos
        delivery.retain_as_published |= options.retain_as_published
        if options.subscription_identifier is not None:
            delivery.subscription_identifiers.append(options.subscription_identifier)


class _Node:
    __slots__ = ("children", "shared", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.subscribers: dict[str, SubscriptionOptions] = {}
        self.shared: dict[str, _SharedGroup] = {}

    def is_empty(self) -> bool:
        return not (self.children or self.subscribers or self.shared)


class SubscriptionTrie:
    """Every subscription on this node, keyed by topic filter level.

    A filter without wildcards (and not shared) matches one topic name only, so it lives in a
    dict keyed by the filter (``_exact``) instead of a branch of trie nodes: a fleet's
    ``fleet/<id>/commands`` cost two nodes with three dicts each (~0.9 KiB, per device and
    again per replicated cluster route) and costs one dict slot and a tuple now
    (bench/broker_memory.py). A filter one session holds is kept as the tuple
    ``(client_id, options)``; a dict of them only when several sessions share it.
    """

    __slots__ = ("_exact", "_filter_counts", "_matches", "_root", "strategy")

    def __init__(self, strategy: str = "round_robin") -> None:
        self.strategy = strategy
        self._root = _Node()
        # Filters without wildcards -> their subscriber, or a dict of subscribers (see above).
        self._exact: dict[str, _Subscribers] = {}
        # topic -> the nodes whose filters match it (_matching_nodes), while no node is added
        # or pruned: publishers repeat topics, and the walk was ~6% of fan-in CPU. Bounded by
        # MATCH_CACHE_TOPICS; subscribers are read from the nodes, so they are always current.
        self._matches: dict[str, list[_Node]] = {}
        # Full filter (with $share prefix) -> number of sessions holding it; lets the node
        # announce a filter to the cluster once, when the first session takes it. Exact
        # filters are counted by their entry in _exact.
        self._filter_counts: dict[str, int] = {}

    def __len__(self) -> int:
        exact = sum(1 if isinstance(entry, tuple) else len(entry) for entry in self._exact.values())
        return exact + sum(self._filter_counts.values())

    def filters(self) -> list[str]:
        """Every distinct filter held by at least one session (shared ones with prefix)."""
        return [*self._exact, *self._filter_counts]

    def subscribe(self, client_id: str, topic_filter: str, options: SubscriptionOptions) -> bool:
        """Add or replace; returns True when the session already had this filter."""
        if _is_exact(topic_filter):
            return self._subscribe_exact(client_id, topic_filter, options)
        group, inner = split_shared(topic_filter)
        node = self._root
        for level in inner.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
                self._matches.clear()
            node = child
        if group is None:
            existed = client_id in node.subscribers
            node.subscribers[client_id] = options
        else:
            shared = node.shared.get(group)
            if shared is None:
                shared = node.shared[group] = _SharedGroup()
            existed = client_id in shared.members
            shared.members[client_id] = options
        if not existed:
            self._filter_counts[topic_filter] = self._filter_counts.get(topic_filter, 0) + 1
        return existed

    def _subscribe_exact(
        self, client_id: str, topic_filter: str, options: SubscriptionOptions
    ) -> bool:
        exact = self._exact
        entry = exact.get(topic_filter)
        if entry is None:
            exact[topic_filter] = (client_id, options)
            return False
        if isinstance(entry, tuple):
            if entry[0] == client_id:
                exact[topic_filter] = (client_id, options)
                return True
            exact[topic_filter] = {entry[0]: entry[1], client_id: options}
            return False
        existed = client_id in entry
        entry[client_id] = options
        return existed

    def unsubscribe(self, client_id: str, topic_filter: str) -> bool:
        """Remove; returns True when the session had this filter."""
        if _is_exact(topic_filter):
            return self._unsubscribe_exact(client_id, topic_filter)
        group, inner = split_shared(topic_filter)
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in inner.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if group is None:
            if node.subscribers.pop(client_id, None) is None:
                return False
        else:
            shared = node.shared.get(group)
            if shared is None or shared.members.pop(client_id, None) is None:
                return False
            if not shared.members:
                del node.shared[group]
        count = self._filter_counts[topic_filter] - 1
        if count:
            self._filter_counts[topic_filter] = count
        else:
            del self._filter_counts[topic_filter]
        # Prune empty branches so a churn of unique topics does not grow memory.
        for parent, level in reversed(path):
            child = parent.children[level]
            if not child.is_empty():
                break
            del parent.children[level]
            self._matches.clear()
        return True

    def _unsubscribe_exact(self, client_id: str, topic_filter: str) -> bool:
        exact = self._exact
        entry = exact.get(topic_filter)
        if entry is None:
            return False
        if isinstance(entry, tuple):
            if entry[0] != client_id:
                return False
            del exact[topic_filter]
            return True
        if entry.pop(client_id, None) is None:
            return False
        if len(entry) == 1:
            exact[topic_filter] = next(iter(entry.items()))
        return True

    def count_for(self, topic_filter: str) -> int:
        entry = self._exact.get(topic_filter)
        if entry is not None:
            return 1 if isinstance(entry, tuple) else len(entry)
        return self._filter_counts.get(topic_filter, 0)

    def _matching_nodes(self, topic: str) -> Iterator[_Node]:
        levels = topic.split("/")
        dollar = topic.startswith("$")
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            first_level = depth == 0
            if not (dollar and first_level):
                hash_child = node.children.get("#")
                if hash_child is not None:
                    yield hash_child
            if depth == len(levels):
                yield node
                continue
            exact = node.children.get(levels[depth])
            if exact is not None:
                stack.append((exact, depth + 1))
            if not (dollar and first_level):
                plus = node.children.get("+")
                if plus is not None:
                    stack.append((plus, depth + 1))

    def match(
        self,
        topic: str,
        publisher_client_id: str | None = None,
        available: Callable[[str], bool] = lambda client_id: True,
        shared: bool = True,
    ) -> list[Delivery]:
        """Deliveries for a message published to ``topic``.

        Non-shared subscriptions of one session merge into one delivery (highest QoS, all
        identifiers). Each shared group yields one delivery to the member the strategy picks,
        preferring members for which ``available(client_id)`` is true (connected ones);
        ``shared=False`` leaves shared groups out (the cluster picks those).
        """
        merged: dict[str, Delivery] = {}
        shared_deliveries: list[Delivery] = []
        entry = self._exact.get(topic)
        if entry is not None:
            _merge(
                merged,
                (entry,) if isinstance(entry, tuple) else entry.items(),
                publisher_client_id,
            )
        nodes = self._matches.get(topic)
        if nodes is None:
            if len(self._matches) >= MATCH_CACHE_TOPICS:
                self._matches.clear()
            nodes = self._matches[topic] = list(self._matching_nodes(topic))
        for node in nodes:
            if node.subscribers:
                _merge(merged, node.subscribers.items(), publisher_client_id)
            if not shared:
                continue
            for group in node.shared.values():
                picked = group.pick(available, self.strategy, publisher_client_id)
                if picked is None:
                    continue
                client_id, options = picked
                identifiers = []
                if options.subscription_identifier is not None:
                    identifiers.append(options.subscription_identifier)
                shared_deliveries.append(
                    Delivery(client_id, options.qos, options.retain_as_published, identifiers)
                )
        return [*merged.values(), *shared_deliveries]

    def group(self, shared_filter: str) -> _SharedGroup | None:
        """The members of ``$share/group/filter``."""
        group, inner = split_shared(shared_filter)
        if group is None:
            return None
        node = self._root
        for level in inner.split("/"):
            child = node.children.get(level)
            if child is None:
                return None
            node = child
        return node.shared.get(group)

    def pick_member(
        self,
        shared_filter: str,
        publisher_client_id: str | None,
        available: Callable[[str], bool] = lambda client_id: True,
    ) -> tuple[str, SubscriptionOptions] | None:
        """A member of one shared group by the strategy (a re-dispatch when the one picked
        elsewhere has left)."""
        group = self.group(shared_filter)
        if group is None:
            return None
        return group.pick(available, self.strategy, publisher_client_id)

    def shared_groups(self, topic: str) -> Iterator[tuple[str, _SharedGroup]]:
        """(``$share/group/filter``, members) for every shared group matching ``topic``."""
        for node, inner in self._matching_nodes_with_filter(topic):
            for group, shared_group in node.shared.items():
                if shared_group.members:
                    yield f"$share/{group}/{inner}", shared_group

    def _matching_nodes_with_filter(self, topic: str) -> Iterator[tuple[_Node, str]]:
        levels = topic.split("/")
        dollar = topic.startswith("$")
        stack: list[tuple[_Node, int, tuple[str, ...]]] = [(self._root, 0, ())]
        while stack:
            node, depth, path = stack.pop()
            first_level = depth == 0
            if not (dollar and first_level):
                hash_child = node.children.get("#")
                if hash_child is not None:
                    yield hash_child, "/".join((*path, "#"))
            if depth == len(levels):
                yield node, "/".join(path)
                continue
            exact = node.children.get(levels[depth])
            if exact is not None:
                stack.append((exact, depth + 1, (*path, levels[depth])))
            if not (dollar and first_level):
                plus = node.children.get("+")
                if plus is not None:
                    stack.append((plus, depth + 1, (*path, "+")))


MessageT = TypeVar("MessageT")


class RetainedStore(Generic[MessageT]):
    """The last retained message per topic name."""

    __slots__ = ("_messages",)

    def __init__(self) -> None:
        self._messages: dict[str, MessageT] = {}

    def __len__(self) -> int:
        return len(self._messages)

    def set(self, topic: str, message: MessageT | None) -> None:
        """Store, or delete with ``None`` (a retained PUBLISH with an empty payload)."""
        if message is None:
            self._messages.pop(topic, None)
        else:
            self._messages[topic] = message

    def remove(self, topic: str) -> None:
        self._messages.pop(topic, None)

    def get(self, topic: str) -> MessageT | None:
        return self._messages.get(topic)

    def matching(self, topic_filter: str) -> list[MessageT]:
        """Retained messages whose topic matches a non-shared filter."""
        if "+" not in topic_filter and "#" not in topic_filter:
            message = self._messages.get(topic_filter)
            return [] if message is None else [message]
        return [
            message for topic, message in self._messages.items() if matches(topic_filter, topic)
        ]

    def items(self) -> list[tuple[str, MessageT]]:
        return list(self._messages.items())
