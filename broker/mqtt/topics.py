"""Topic Names and Topic Filters: validation, shared subscriptions, and matching.

MQTT 5.0 section 4.7 (3.1.1 section 4.7): levels split on "/", "+" fills exactly one whole
level, "#" fills the last level and everything below it (and the parent level itself),
Topic Names hold no wildcards, and a filter starting with a wildcard never matches a Topic Name
starting with "$" [MQTT-4.7.2-1]. Shared Subscriptions are "$share/{ShareName}/{filter}"
with a non-empty ShareName free of "/", "+" and "#" (5.0 section 4.8.2).
Pure functions, and the one place these rules are written: the codec, the subscription trie
(broker/subscriptions.py), the cluster's routes, the state store and the authorization
policy all call them.
"""

from __future__ import annotations

from typing import Final

from .packets import MQTTProtocolError, ReasonCode

__all__ = [
    "SHARED_SUBSCRIPTION_PREFIX",
    "check_no_wildcards",
    "matches",
    "misplaced_wildcard",
    "parse_shared",
    "split_shared",
    "validate_topic_filter",
    "validate_topic_name",
]

SHARED_SUBSCRIPTION_PREFIX: Final = "$share/"
# 5.0 section 1.5.4: a UTF-8 Encoded String is at most 65,535 bytes.
_MAX_TOPIC_BYTES: Final = 65_535


def _check_string(text: str, kind: str, reason: ReasonCode) -> None:
    if not text:
        raise MQTTProtocolError(reason, f"empty {kind}")  # [MQTT-4.7.3-1]
    if "\x00" in text:
        raise MQTTProtocolError(reason, f"{kind} contains U+0000")  # [MQTT-4.7.3-2]
    # A character is at most 4 bytes in UTF-8, so short strings skip the encode.
    if len(text) * 4 > _MAX_TOPIC_BYTES and len(text.encode("utf-8", "surrogatepass")) > (
        _MAX_TOPIC_BYTES
    ):
        raise MQTTProtocolError(reason, f"{kind} longer than {_MAX_TOPIC_BYTES} bytes")


def check_no_wildcards(topic: str) -> None:
    """Raise MQTTProtocolError(TOPIC_NAME_INVALID) if the Topic Name holds "+" or "#"
    [MQTT-3.3.2-2]; the codec calls this alone, as a PUBLISH may carry an empty name."""
    if "+" in topic or "#" in topic:
        raise MQTTProtocolError(
            ReasonCode.TOPIC_NAME_INVALID, f"topic name {topic!r} contains a wildcard"
        )


def validate_topic_name(topic: str) -> None:
    """Raise MQTTProtocolError(TOPIC_NAME_INVALID) unless `topic` may be published to."""
    _check_string(topic, "topic name", ReasonCode.TOPIC_NAME_INVALID)
    check_no_wildcards(topic)


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """Split "$share/group/filter" into ("group", "filter"); (None, filter) if not shared.

    No checks: for filters `validate_topic_filter` has accepted (or `parse_shared`, which
    checks). A filter held by a session or announced by a peer has been.
    """
    if not topic_filter.startswith(SHARED_SUBSCRIPTION_PREFIX):
        return None, topic_filter
    group, _, plain = topic_filter[len(SHARED_SUBSCRIPTION_PREFIX) :].partition("/")
    return group, plain


def parse_shared(topic_filter: str) -> tuple[str | None, str]:
    """`split_shared`, raising MQTTProtocolError(TOPIC_FILTER_INVALID) for a malformed share
    name or a missing filter; the filter itself is checked by `validate_topic_filter`."""
    group, plain = split_shared(topic_filter)
    if group is None:
        return None, plain
    if not group or "+" in group or "#" in group:
        raise MQTTProtocolError(
            ReasonCode.TOPIC_FILTER_INVALID, f"invalid share name in {topic_filter!r}"
        )
    if not plain:
        raise MQTTProtocolError(
            ReasonCode.TOPIC_FILTER_INVALID, f"shared subscription {topic_filter!r} has no filter"
        )
    return group, plain


def misplaced_wildcard(plain_filter: str) -> str | None:
    """Why the wildcards of a non-shared filter are misplaced, or None when they are not:
    "#" is a whole last level [MQTT-4.7.1-2], "+" a whole level [MQTT-4.7.1-1]."""
    if "+" not in plain_filter and "#" not in plain_filter:
        return None
    levels = plain_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            return "'#' must be a whole last level"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def validate_topic_filter(topic_filter: str) -> None:
    """Raise MQTTProtocolError(TOPIC_FILTER_INVALID) unless `topic_filter` may be subscribed
    to; "$share/group/filter" is accepted when both its parts are valid."""
    _, plain = parse_shared(topic_filter)
    _check_string(plain, "topic filter", ReasonCode.TOPIC_FILTER_INVALID)
    if misplaced_wildcard(plain) is not None:
        raise MQTTProtocolError(
            ReasonCode.TOPIC_FILTER_INVALID, f"wildcard misplaced in topic filter {topic_filter!r}"
        )


def matches(topic_filter: str, topic: str) -> bool:
    """Whether the (valid, non-shared) `topic_filter` matches the Topic Name `topic`."""
    if topic[:1] == "$" and topic_filter[:1] in ("+", "#"):
        return False
    if "+" not in topic_filter and "#" not in topic_filter:
        return topic_filter == topic
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels) or (level != "+" and level != topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)
