"""lb.proxy_hmac without sockets: the key file, its reload, and the broker's checks (MAC,
window, replay cache) on headers made by lb.proxyproto, with the clock passed in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lb.proxy_hmac import (
    CHECK_INTERVAL,
    HeaderAuthenticator,
    KeyFile,
    KeyFileError,
    ReplayCache,
    load_key_file,
    parse_key_file,
    signing_key,
)
from lb.proxyproto import (
    Command,
    ProxyHeader,
    ProxyProtocolDecoder,
    encode_v2,
)

OLD = "11" * 32
NEW = "22" * 32
NOW = 1_800_000_000.0


def write_keys(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def decode(data: bytes) -> ProxyHeader:
    decoder = ProxyProtocolDecoder()
    decoder.feed(data)
    event = decoder.next_event()
    assert isinstance(event, ProxyHeader)
    return event


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def signed(
    keys: Path, now: float, nonce: bytes = b"n" * 16, command: Command = Command.PROXY
) -> ProxyHeader:
    ring = load_key_file(keys)
    source, destination = (
        (("192.0.2.1", 1), ("192.0.2.2", 2)) if command is Command.PROXY else (None, None)
    )
    return decode(encode_v2(command, source, destination, mac=signing_key(ring, now, nonce)))


def test_key_file_format() -> None:
    ring = parse_key_file(f"# rotation\n2026-12 {NEW}  # new\n\n2026-11 {OLD}\n", "k")
    assert ring.ids == ("2026-12", "2026-11")
    assert ring.signing == ("2026-12", bytes.fromhex(NEW))
    assert ring.secret("2026-11") == bytes.fromhex(OLD)
    assert ring.secret("nope") is None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "no key"),
        ("# only a comment\n", "no key"),
        (f"k1 {OLD} extra\n", "k:1: expected"),
        (f"k/1 {OLD}\n", "key id 'k/1'"),
        (f"{'k' * 33} {OLD}\n", "key id"),
        ("k1 xyz\n", "not hex"),
        ("k1 abc\n", "not hex"),  # odd digits
        ("k1 " + "ab" * 31 + "\n", "31 bytes"),
        (f"k1 {OLD}\nk1 {NEW}\n", "k:2: key id 'k1' is listed twice"),
    ],
)
def test_key_file_errors_name_the_line(text: str, words: str) -> None:
    with pytest.raises(KeyFileError, match=words):
        parse_key_file(text, "k")


def test_key_file_must_be_private(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "keys", f"k1 {OLD}\n", 0o640)
    with pytest.raises(KeyFileError, match=r"mode 0640.*chmod 600"):
        load_key_file(keys)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_key_file(tmp_path / "missing")
    os.chmod(keys, 0o600)
    assert load_key_file(keys).ids == ("k1",)


def test_key_file_reloads_on_change_and_keeps_old_keys_on_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = write_keys(tmp_path / "keys", f"old {OLD}\n")
    clock = Clock()
    key_file = KeyFile(keys, clock)
    assert key_file.keys().ids == ("old",)
    write_keys(keys, f"old {OLD}\nnew {NEW}\n")
    assert key_file.keys().ids == ("old",)  # not looked at again yet
    clock.now += CHECK_INTERVAL
    assert key_file.keys().ids == ("old", "new")
    assert "reloaded: keys 'old', 'new', signing with 'old'" in caplog.text
    write_keys(keys, "broken\n")
    clock.now += CHECK_INTERVAL
    assert key_file.keys().ids == ("old", "new")
    assert "not reloaded, the previous ones stay" in caplog.text


def test_authenticator_refusals_in_order(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "keys", f"old {OLD}\n")
    authenticator = HeaderAuthenticator(KeyFile(keys, Clock()), window=30.0, replay_cache=10)
    good = signed(keys, NOW)
    assert authenticator.check(good, NOW + 1) is None
    refusal = authenticator.check(good, NOW + 2)
    assert refusal is not None and refusal.reason == "replayed"
    assert "already seen" in refusal.text
    plain = decode(encode_v2(Command.PROXY, ("192.0.2.1", 1), ("192.0.2.2", 2)))
    refusal = authenticator.check(plain, NOW)
    assert refusal is not None and refusal.reason == "missing"
    assert "proxy-v2-options hmac" in refusal.text
    other = write_keys(tmp_path / "other", f"old {NEW}\nx {NEW}\n")
    forged = signed(other, NOW, b"f" * 16)
    refusal = authenticator.check(forged, NOW)
    assert refusal is not None and refusal.reason == "bad_mac"
    unknown = decode(
        encode_v2(
            Command.PROXY,
            ("192.0.2.1", 1),
            ("192.0.2.2", 2),
            mac=signing_key(parse_key_file(f"x {NEW}", "o"), NOW, b"u" * 16),
        )
    )
    refusal = authenticator.check(unknown, NOW)
    assert refusal is not None and refusal.reason == "unknown_key" and "'x'" in refusal.text
    for age, words in ((31.0, "31.0 s old"), (-31.0, "31.0 s in the future")):
        refusal = authenticator.check(signed(keys, NOW - age, os.urandom(16)), NOW)
        assert refusal is not None and refusal.reason == "stale" and words in refusal.text
    local = signed(keys, NOW, b"l" * 16, Command.LOCAL)
    assert authenticator.check(local, NOW) is None


def test_rotation_keeps_both_keys_valid(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "keys", f"old {OLD}\n")
    lb_keys = write_keys(tmp_path / "lb-keys", f"old {OLD}\n")
    clock = Clock()
    authenticator = HeaderAuthenticator(KeyFile(keys, clock))
    write_keys(keys, f"old {OLD}\nnew {NEW}\n")  # 1. brokers learn the new key
    clock.now += CHECK_INTERVAL
    assert authenticator.check(signed(lb_keys, clock.now, os.urandom(16)), clock.now) is None
    write_keys(lb_keys, f"new {NEW}\nold {OLD}\n")  # 2. lb signs with it
    assert authenticator.check(signed(lb_keys, clock.now, os.urandom(16)), clock.now) is None
    write_keys(keys, f"new {NEW}\n")  # 3. the old key goes
    clock.now += CHECK_INTERVAL
    assert authenticator.check(signed(lb_keys, clock.now, os.urandom(16)), clock.now) is None
    stale_signer = write_keys(tmp_path / "old-lb", f"old {OLD}\n")
    refusal = authenticator.check(signed(stale_signer, clock.now, os.urandom(16)), clock.now)
    assert refusal is not None and refusal.reason == "unknown_key"


def test_replay_cache_is_bounded_and_never_lets_a_replay_through() -> None:
    cache = ReplayCache(capacity=3)
    window = 30.0
    for index in range(3):
        assert cache.check_and_add(bytes([index]) * 16, NOW + index, NOW + index, window) == ""
    assert len(cache) == 3
    # Full: the oldest (timestamp NOW) is forgotten, the floor rises to its timestamp.
    assert cache.check_and_add(b"\x09" * 16, NOW + 3, NOW + 3, window) == ""
    assert len(cache) == 3 and cache.evicted == 1
    assert cache.check_and_add(b"\x00" * 16, NOW, NOW + 4, window) == "floor"  # its replay
    assert cache.check_and_add(b"\x01" * 16, NOW + 1, NOW + 4, window) == "seen"
    # Entries leave once their header's timestamp is out of the window.
    assert cache.check_and_add(b"\x0a" * 16, NOW + 40, NOW + 40, window) == ""
    assert len(cache) == 1
    with pytest.raises(ValueError):
        ReplayCache(0)
