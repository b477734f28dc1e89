"""Topic rules: the examples of MQTT 5.0 section 4.7 (3.1.1 section 4.7) and 4.8.2, and
`matches` checked against a regular-expression model under hypothesis."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.mqtt import (
    MQTTProtocolError,
    ReasonCode,
    matches,
    misplaced_wildcard,
    parse_shared,
    split_shared,
    validate_topic_filter,
    validate_topic_name,
)

pytestmark = pytest.mark.timeout(60)

# 4.7.1.2, 4.7.1.3 and 4.7.2 examples, plus the empty-level cases.
MATCHING = [
    ("sport/tennis/player1/#", "sport/tennis/player1"),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking"),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon"),
    ("sport/#", "sport"),
    ("#", "sport/tennis"),
    ("#", "/"),
    ("sport/tennis/+", "sport/tennis/player1"),
    ("sport/tennis/+", "sport/tennis/player2"),
    ("sport/+", "sport/"),
    ("+/+", "/finance"),
    ("/+", "/finance"),
    ("+/tennis/#", "sport/tennis/player1"),
    ("$SYS/#", "$SYS/monitor/Clients"),
    ("$SYS/monitor/+", "$SYS/monitor/Clients"),
    ("a//b", "a//b"),
    ("a/+/b", "a//b"),
    ("ACCOUNTS", "ACCOUNTS"),
]
NOT_MATCHING = [
    ("sport/tennis/+", "sport/tennis/player1/ranking"),
    ("sport/+", "sport"),
    ("+", "/finance"),
    ("#", "$SYS/monitor/Clients"),
    ("+/monitor/Clients", "$SYS/monitor/Clients"),
    ("ACCOUNTS", "Accounts"),
    ("sport/tennis", "sport/tennis/"),
    ("sport/tennis/player1/#", "sport/tennis"),
]


@pytest.mark.parametrize(("topic_filter", "topic"), MATCHING)
def test_matches(topic_filter: str, topic: str) -> None:
    validate_topic_filter(topic_filter)
    validate_topic_name(topic)
    assert matches(topic_filter, topic)


@pytest.mark.parametrize(("topic_filter", "topic"), NOT_MATCHING)
def test_does_not_match(topic_filter: str, topic: str) -> None:
    assert not matches(topic_filter, topic)


@pytest.mark.parametrize(
    "topic_filter",
    ["#", "+", "+/+", "/", "sport/#", "+/tennis/#", "sport/+/player1", "$share/g/a/#", "a//b"],
)
def test_valid_filters(topic_filter: str) -> None:
    validate_topic_filter(topic_filter)


@pytest.mark.parametrize(
    "topic_filter",
    [
        "",
        "sport/tennis#",
        "sport/tennis/#/ranking",
        "sport+",
        "#/a",
        "a/b+/c",
        "a\x00b",
        "$share/g",
        "$share/g/",
        "$share//a",
        "$share/g+/a",
        "$share/g#/a",
        "$share/g/a/#/b",
        "a" * 65_536,
    ],
)
def test_invalid_filters(topic_filter: str) -> None:
    with pytest.raises(MQTTProtocolError) as caught:
        validate_topic_filter(topic_filter)
    assert caught.value.reason_code == ReasonCode.TOPIC_FILTER_INVALID


@pytest.mark.parametrize("topic", ["", "a/+", "a/#", "#", "+", "a\x00", "\u00e9" * 40_000])
def test_invalid_topic_names(topic: str) -> None:
    with pytest.raises(MQTTProtocolError) as caught:
        validate_topic_name(topic)
    assert caught.value.reason_code == ReasonCode.TOPIC_NAME_INVALID


def test_parse_shared() -> None:
    assert parse_shared("$share/group/a/+/c") == ("group", "a/+/c")
    assert parse_shared("$share/g/#") == ("g", "#")
    assert parse_shared("a/b") == (None, "a/b")
    assert parse_shared("$SYS/x") == (None, "$SYS/x")
    assert parse_shared("$shared/g/a") == (None, "$shared/g/a")
    with pytest.raises(MQTTProtocolError, match="has no filter"):
        parse_shared("$share/g")
    with pytest.raises(MQTTProtocolError, match="invalid share name"):
        parse_shared("$share//a")


@pytest.mark.parametrize(
    "topic_filter", ["$share/group/a/+/c", "$share/g/#", "a/b", "$SYS/x", "$shared/g/a", "#"]
)
def test_split_shared_agrees_with_parse_shared_on_valid_filters(topic_filter: str) -> None:
    validate_topic_filter(topic_filter)
    assert split_shared(topic_filter) == parse_shared(topic_filter)


@pytest.mark.parametrize(
    ("topic_filter", "problem"),
    [
        ("sport/tennis/#", None),
        ("+/+", None),
        ("a//b", None),
        ("sport/tennis#", "'#' must be a whole last level"),
        ("#/a", "'#' must be a whole last level"),
        ("sport+", "'+' must be a whole level"),
        ("a/b+/c", "'+' must be a whole level"),
    ],
)
def test_misplaced_wildcard(topic_filter: str, problem: str | None) -> None:
    assert misplaced_wildcard(topic_filter) == problem


def _model(topic_filter: str, topic: str) -> bool:
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    pattern = "/".join(
        "[^/]*" if level == "+" else ".*" if level == "#" else re.escape(level)
        for level in topic_filter.split("/")
    )
    if pattern.endswith("/.*"):
        pattern = pattern[:-3] + "(/.*)?"
    return re.fullmatch(pattern, topic, re.DOTALL) is not None


levels = st.sampled_from(["a", "b", "", "$x", "c d"])
topics = st.lists(levels, min_size=1, max_size=5).map("/".join).filter(bool)
filters = st.tuples(st.lists(levels | st.just("+"), min_size=1, max_size=5), st.booleans()).map(
    lambda pair: "/".join(pair[0] + (["#"] if pair[1] else []))
)


@settings(max_examples=500, deadline=None)
@given(topic_filter=filters, topic=topics)
def test_matches_agrees_with_a_regular_expression_model(topic_filter: str, topic: str) -> None:
    assert matches(topic_filter, topic) == _model(topic_filter, topic)
