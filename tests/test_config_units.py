"""Value parsers: times, sizes, integers, choices, addresses, did-you-mean."""

from __future__ import annotations

import pytest

from lb.config.keywords import (
    KeywordError,
    did_you_mean,
    parse_choice,
    parse_integer,
    parse_size,
    parse_time,
    split_host_port,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1500", 1.5),  # milliseconds by default
        ("0", 0.0),
        ("500ms", 0.5),
        ("250us", 0.00025),
        ("10s", 10.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
    ],
)
def test_time(text: str, seconds: float) -> None:
    assert parse_time(text) == pytest.approx(seconds)


def test_time_default_unit_seconds() -> None:
    assert parse_time("300", "s") == 300.0


@pytest.mark.parametrize("text", ["ten", "10x", "1.5s", "-1s", "", "10 s", "s"])
def test_bad_time(text: str) -> None:
    with pytest.raises(KeywordError) as raised:
        parse_time(text)
    assert raised.value.message == f"expects a time like 10s, 500ms, got '{text}'"


@pytest.mark.parametrize(
    ("text", "size"),
    [("16384", 16384), ("16k", 16384), ("16K", 16384), ("1m", 1 << 20), ("2g", 2 << 30)],
)
def test_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["16kb", "1.5k", "k", "-1"])
def test_bad_size(text: str) -> None:
    with pytest.raises(KeywordError):
        parse_size(text)


def test_integer_ranges() -> None:
    assert parse_integer("256", 0, 256) == 256
    assert parse_integer("-1") == -1
    with pytest.raises(KeywordError, match="expects an integer from 0 to 256, got '300'"):
        parse_integer("300", 0, 256)
    with pytest.raises(KeywordError, match="expects an integer >= 1, got '0'"):
        parse_integer("0", 1)
    with pytest.raises(KeywordError, match="expects an integer, got '1e3'"):
        parse_integer("1e3")


def test_choice_suggests() -> None:
    assert parse_choice("required", ("none", "optional", "required")) == "required"
    with pytest.raises(KeywordError) as raised:
        parse_choice("requird", ("none", "optional", "required"))
    assert raised.value.message == (
        "expects one of 'none', 'optional', 'required', got 'requird'; did you mean 'required'?"
    )


def test_did_you_mean() -> None:
    assert did_you_mean("vrify", ["verify", "crt"]) == "; did you mean 'verify'?"
    assert did_you_mean("zzz", ["verify", "crt"]) == ""


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("*:8091", ("0.0.0.0", 8091, "ipv4")),
        (":8091", ("0.0.0.0", 8091, "ipv4")),
        ("127.0.0.1:8091", ("127.0.0.1", 8091, "ipv4")),
        ("[::1]:8091", ("::1", 8091, "ipv6")),
        (":::8091", ("::", 8091, "ipv6")),
        ("ipv6@:8091", ("::", 8091, "ipv6")),
        ("ipv4@127.0.0.1:1", ("127.0.0.1", 1, "ipv4")),
        ("broker-1.local:1883", ("broker-1.local", 1883, "ipv4")),
    ],
)
def test_addresses(address: str, expected: tuple[str, int, str]) -> None:
    assert split_host_port(address, need_port=True) == expected


def test_server_address_without_port() -> None:
    assert split_host_port("10.0.0.1", need_port=False) == ("10.0.0.1", None, "ipv4")


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1", "missing port in address '127.0.0.1' (expects host:port)"),
        ("*:0", "expects an integer from 1 to 65535, got '0'"),
        ("*:70000", "expects an integer from 1 to 65535, got '70000'"),
        ("*:8000-8010", "port ranges are not supported, got '8000-8010'"),
        ("/run/lb.sock", "only TCP addresses (host:port) are supported, got '/run/lb.sock'"),
        (
            "unix@/run/lb.sock",
            "only TCP addresses (host:port) are supported, got 'unix@/run/lb.sock'",
        ),
        ("*:1,*:2", "address lists are not supported, got '*:1,*:2'"),
        ("[::1:80", "missing ']' in address '[::1:80'"),
        ("ipv6@127.0.0.1:80", "address '127.0.0.1' is not an ipv6 address"),
    ],
)
def test_bad_addresses(address: str, message: str) -> None:
    with pytest.raises(KeywordError) as raised:
        split_host_port(address, need_port=True)
    assert raised.value.message == message
