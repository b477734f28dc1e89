"""Authenticated PROXY v2 headers: the shared key file, signing (lb), checking (broker).

A broker believes a PROXY header from any address in ``proxy_protocol_trusted``; any process
on a trusted host could claim to be any device. With a secret shared by lb and the brokers,
lb adds our HMAC TLV (lb.proxyproto ``TLVType.HMAC``: key id, timestamp, nonce and an
HMAC-SHA256 over the whole header) and the broker refuses a header whose MAC does not check,
whose timestamp is outside a window, or whose nonce it has seen within that window.

The key file, one key a line, ``#`` comments::

    # <key id> <secret: 64 or more hex digits (32 bytes or more)>
    2026-12 4f6c1d0e...
    2026-11 9a0b7c33...

The first key signs; every key listed verifies. A rotation needs no restart: add the new key
second on every broker, then move it first (lb signs with it, brokers take both), then drop
the old one. Both sides re-read the file when it changes (``KeyFile``, checked at most once a
second, when a header is built or checked). A file that group or others may read is refused
(seed 002's rule for private keys); so is a secret shorter than 32 bytes.

``HeaderAuthenticator`` holds the broker's policy, pure but for the file: keys, window and the
replay cache (``ReplayCache``, bounded in entries; when full, it forgets the oldest nonces and
refuses any header not newer than them, so that a replay never passes for lack of room).
lb (lb.frontend, lb.checks) and the broker (broker.listener) both import this module: it is a
leaf and imports nothing of lb but leaves.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Protocol

from lb.pem import file_signature
from lb.proxyproto import HMAC_KEY_ID_MAX_LENGTH, HMAC_NONCE_LENGTH, MACKey, ProxyHeader

__all__ = [
    "DEFAULT_REPLAY_CACHE",
    "DEFAULT_WINDOW",
    "HeaderAuthenticator",
    "HeaderKeys",
    "KeyFile",
    "KeyFileError",
    "KeyRing",
    "MACRefusal",
    "ReplayCache",
    "load_key_file",
    "parse_key_file",
]

logger = logging.getLogger(__name__)

#: HMAC-SHA256 keys shorter than its block output add no strength (RFC 2104 section 3).
MIN_SECRET_BYTES: Final = 32
#: Key ids as they may appear in the TLV and in a log line.
_KEY_ID: Final = re.compile(rf"[A-Za-z0-9._:@-]{{1,{HMAC_KEY_ID_MAX_LENGTH}}}")
_HEX: Final = re.compile(r"(?:[0-9a-fA-F]{2})+")
#: How often a key file is looked at for changes, at most (on use: no timer).
CHECK_INTERVAL: Final = 1.0
#: The broker's defaults: a header older (or newer) than 30 s is refused; the replay cache
#: holds 100,000 nonces (about 200 bytes each, 20 MB at most: ~3,300 new connections a
#: second for the whole window before it starts refusing headers as not new enough).
DEFAULT_WINDOW: Final = 30.0
DEFAULT_REPLAY_CACHE: Final = 100_000


class KeyFileError(Exception):
    """A key file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The keys of one file, in order: ``keys[0]`` signs."""

    path: str
    keys: tuple[tuple[str, bytes], ...]

    @property
    def signing(self) -> tuple[str, bytes]:
        return self.keys[0]

    def secret(self, key_id: str) -> bytes | None:
        for name, secret in self.keys:
            if name == key_id:
                return secret
        return None

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.keys)


def parse_key_file(text: str, path: str) -> KeyRing:
    """Read the text of a key file (see the module docstring); KeyFileError names the line."""
    keys: list[tuple[str, bytes]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if len(words) != 2:
            raise KeyFileError(f"{path}:{number}: expected '<key id> <hex secret>'")
        key_id, secret_text = words
        if _KEY_ID.fullmatch(key_id) is None:
            raise KeyFileError(
                f"{path}:{number}: key id '{key_id}' must be 1 to {HMAC_KEY_ID_MAX_LENGTH} "
                "letters, digits or . _ : @ -"
            )
        if _HEX.fullmatch(secret_text) is None:
            raise KeyFileError(f"{path}:{number}: key '{key_id}': the secret is not hex digits")
        secret = bytes.fromhex(secret_text)
        if len(secret) < MIN_SECRET_BYTES:
            raise KeyFileError(
                f"{path}:{number}: key '{key_id}' is {len(secret)} bytes; at least "
                f"{MIN_SECRET_BYTES} are needed (openssl rand -hex 32)"
            )
        if any(name == key_id for name, _ in keys):
            raise KeyFileError(f"{path}:{number}: key id '{key_id}' is listed twice")
        keys.append((key_id, secret))
    if not keys:
        raise KeyFileError(f"{path}: no key in the file")
    return KeyRing(path, tuple(keys))


def load_key_file(path: str | Path) -> KeyRing:
    """Read and check a key file: it exists, only its owner may read it, its keys parse."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as stream:
            mode = os.fstat(stream.fileno()).st_mode
            data = stream.read()
    except OSError as error:
        raise KeyFileError(f"{name}: cannot read the key file: {error.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{name}: the key file is open to group or others (mode {stat.S_IMODE(mode):04o}); "
            f"it holds secrets: chmod 600 {name}"
        )
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{name}: the key file is not ASCII text") from None
    return parse_key_file(text, name)


class KeyFile:
    """A key file kept current: re-read when its mtime or size changes, looked at no more
    than once per CHECK_INTERVAL, when the keys are asked for. A changed file that does not
    load keeps the previous keys in force, and the log says why (once per change)."""

    __slots__ = ("_next_check", "_signature", "clock", "path", "ring")

    def __init__(self, path: str | Path, clock: Callable[[], float]) -> None:
        self.path = os.fspath(path)
        self.clock = clock
        self._signature = file_signature([Path(self.path)])
        self.ring = load_key_file(self.path)
        self._next_check = clock() + CHECK_INTERVAL

    def keys(self) -> KeyRing:
        now = self.clock()
        if now >= self._next_check:
            self._next_check = now + CHECK_INTERVAL
            self._reload_if_changed()
        return self.ring

    def _reload_if_changed(self) -> None:
        signature = file_signature([Path(self.path)])
        if signature == self._signature:
            return
        self._signature = signature
        try:
            ring = load_key_file(self.path)
        except KeyFileError as error:
            logger.error("PROXY HMAC keys not reloaded, the previous ones stay: %s", error)
            return
        self.ring = ring
        logger.warning(
            "PROXY HMAC key file %s reloaded: keys %s, signing with '%s'",
            self.path,
            ", ".join(f"'{key_id}'" for key_id in ring.ids),
            ring.signing[0],
        )


class HeaderKeys:
    """lb's key files, one KeyFile per path that servers name, shared by a process's
    frontends and health checks."""

    __slots__ = ("clock", "files", "wall_clock")

    def __init__(
        self, clock: Callable[[], float], wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.clock = clock
        self.wall_clock = wall_clock
        self.files: dict[str, KeyFile] = {}

    def load(self, servers: Iterable[HMACServer]) -> None:
        """Read every key file the servers name, now (KeyFileError if one cannot be)."""
        for server in servers:
            path = server.proxy_v2_hmac_keys
            if path is not None and path not in self.files:
                self.files[path] = KeyFile(path, self.clock)

    def mac_key(self, server: HMACServer) -> MACKey | None:
        """What to sign a header for `server` with: None without `proxy-v2-options hmac`."""
        path = server.proxy_v2_hmac_keys
        if "hmac" not in server.proxy_v2_options or path is None:
            return None
        key_file = self.files.get(path)
        if key_file is None:
            key_file = self.files[path] = KeyFile(path, self.clock)
        return signing_key(key_file.keys(), self.wall_clock(), new_nonce())


class HMACServer(Protocol):
    """The two fields of lb.config.model.Server that HeaderKeys reads."""

    @property
    def proxy_v2_options(self) -> frozenset[str]: ...

    @property
    def proxy_v2_hmac_keys(self) -> str | None: ...


def signing_key(keys: KeyRing, now: float, nonce: bytes) -> MACKey:
    """What lb signs one header with: the first key, the time (wall clock) and a nonce."""
    key_id, secret = keys.signing
    return MACKey(key_id, secret, int(now * 1000), nonce)


def new_nonce() -> bytes:
    return os.urandom(HMAC_NONCE_LENGTH)


# --------------------------------------------------------------------------------------------
# The broker's side

Reason = Literal["missing", "unknown_key", "bad_mac", "stale", "replayed"]


@dataclass(frozen=True, slots=True)
class MACRefusal:
    """Why a header was refused: a stable ``reason`` for counters, ``text`` for the log."""

    reason: Reason
    text: str


class ReplayCache:
    """Nonces seen within the window, bounded by ``capacity`` entries.

    A nonce is kept until its header's timestamp leaves the window (after that, the window
    refuses the header by itself). When full, the oldest arrival is forgotten and ``floor``
    rises to its timestamp: a header not newer than the floor is refused as a possible
    replay, so that forgetting never lets one through.
    """

    __slots__ = ("capacity", "evicted", "expiries", "floor", "order")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("the replay cache needs room for at least one nonce")
        self.capacity = capacity
        self.expiries: dict[bytes, float] = {}
        self.order: collections.deque[tuple[float, bytes]] = collections.deque()
        self.floor = float("-inf")
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.expiries)

    def check_and_add(self, nonce: bytes, timestamp: float, now: float, window: float) -> str:
        """ "" when new (and now remembered), else why not: "seen" or "floor"."""
        order, expiries = self.order, self.expiries
        while order and order[0][0] < now:
            _, old = order.popleft()
            expiries.pop(old, None)
        if nonce in expiries:
            return "seen"
        if timestamp <= self.floor:
            return "floor"
        if len(expiries) >= self.capacity:
            expiry, old = order.popleft()
            del expiries[old]
            self.floor = max(self.floor, expiry - window)
            self.evicted += 1
        expiry = timestamp + window
        expiries[nonce] = expiry
        order.append((expiry, nonce))
        return ""


class HeaderAuthenticator:
    """The checks of ``proxy_protocol_hmac_keys`` on one key file (broker.listener)."""

    __slots__ = ("key_file", "replay", "window")

    def __init__(
        self,
        key_file: KeyFile,
        window: float = DEFAULT_WINDOW,
        replay_cache: int = DEFAULT_REPLAY_CACHE,
    ) -> None:
        self.key_file = key_file
        self.window = window
        self.replay = ReplayCache(replay_cache)

    def check(self, header: ProxyHeader, now: float) -> MACRefusal | None:
        """None when the header is authentic, fresh and new; else why it is refused. The
        MAC is checked before anything is remembered, so a forger cannot fill the cache."""
        mac = header.mac
        keys = self.key_file.keys()
        if mac is None:
            return MACRefusal(
                "missing",
                "no HMAC TLV, and this listener requires one (proxy_protocol_hmac_keys = "
                f"{keys.path!r}): is 'proxy-v2-options hmac' set on the balancer?",
            )
        secret = keys.secret(mac.key_id)
        if secret is None:
            return MACRefusal(
                "unknown_key",
                f"HMAC key id '{mac.key_id}' is not in {keys.path} (it holds "
                f"{', '.join(repr(key_id) for key_id in keys.ids)})",
            )
        if not mac.matches(secret):
            return MACRefusal(
                "bad_mac",
                f"HMAC does not match with key '{mac.key_id}': a forged or altered header, or "
                "another secret under the same key id",
            )
        timestamp = mac.timestamp_ms / 1000
        age = now - timestamp
        if abs(age) > self.window:
            when = f"{age:.1f} s old" if age > 0 else f"{-age:.1f} s in the future"
            return MACRefusal(
                "stale",
                f"HMAC timestamp {when}, outside the {self.window:g} s window (a replay, or "
                "clocks apart)",
            )
        seen = self.replay.check_and_add(mac.nonce, timestamp, now, self.window)
        if seen == "seen":
            return MACRefusal(
                "replayed",
                f"HMAC nonce {mac.nonce.hex()} already seen within the {self.window:g} s "
                "window: a replayed header",
            )
        if seen == "floor":
            return MACRefusal(
                "replayed",
                f"HMAC timestamp not newer than nonces the full replay cache forgot "
                f"({self.replay.capacity} entries, proxy_protocol_hmac_replay_cache): "
                "refused as a possible replay",
            )
        return None
