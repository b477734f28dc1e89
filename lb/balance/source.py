"""balance source: the client's address picks the server (configuration.txt, balance
source; HAProxy's get_server_sh in backend.c, lb_map.c and lb_chash.c).

The key is the packed client address; its hash is the XOR of its 32-bit big-endian words
(the IPv4 address itself), as get_server_sh computes it. Two ways to map a hash to a
server, chosen by `hash-type`:

- `map-based` (the default, static): a table where each up server appears as many times as
  its weight, interleaved; the server is `table[hash % total_weight]`. One address always
  reaches the same server while the set of up servers is unchanged, but a change of that set
  moves most addresses. Weights are those of the configuration; a runtime change counts only
  as 0 or not 0, as for static-rr.
- `consistent` (dynamic): a ring of points, `effective_weight` of them per server (sixteen
  per unit of weight at full weight, as lb_chash.c's one node per eweight step), each at
  `full_hash(server_id * WEIGHT_RANGE + node)`; the hash goes to the nearest point. A server
  going down moves only the addresses that were on its points: about 1/N of them. Unlike
  HAProxy, which applies Bob Jenkins' `full_hash` to the key only with the `avalanche`
  modifier, the key is always avalanched here: raw IPv4 addresses of one subnet would
  otherwise all fall between the same two points of the ring.

`balance hash <expression>` (`Source(hash_type, function=...)`) maps a sample the same way,
as get_server_expr and get_server_hash do: the sample's bytes go through the `hash-type`
function (sdbm by default, djb2 or crc32; each byte read as a signed char, as HAProxy's
`const char *` loops do), then through `full_hash` only with the `avalanche` modifier, as in
HAProxy. A session without the sample (no client certificate for `ssl_c_s_dn(cn)`) takes the
next server in turn instead, as HAProxy falls back to map_get_server_rr and
chash_get_next_server.

A full server is still returned (the caller queues on it); `exclude` (a server that just
failed) moves on to the next server of the table or the ring, as the chash `avoid` does.
"""

from __future__ import annotations

import bisect
import zlib
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from lb.balance import Weighted

S = TypeVar("S", bound="Weighted")

#: lb_chash.c's SRV_EWGHT_RANGE: room for every node of one server (256 weights x 16).
WEIGHT_RANGE = 256 * 16
HASH_TYPES = ("map-based", "consistent")
#: `hash-type <method> <function>`: HAProxy 2.6's functions lb computes (not wt6, none).
HASH_FUNCTIONS = ("sdbm", "djb2", "crc32")
MASK32 = 0xFFFFFFFF


def full_hash(value: int) -> int:
    """HAProxy's full_hash() (include/haproxy/hash.h): Bob Jenkins' 32-bit avalanche,
    then a multiplication by a large prime "to better spread values all around the tree"."""
    a = value & MASK32
    a = ((a + 0x7ED55D16) + (a << 12)) & MASK32
    a = ((a ^ 0xC761C23C) ^ (a >> 19)) & MASK32
    a = ((a + 0x165667B1) + (a << 5)) & MASK32
    a = ((a + 0xD3A2646C) ^ (a << 9)) & MASK32
    a = ((a + 0xFD7046C5) + (a << 3)) & MASK32
    a = ((a ^ 0xB55A4F09) ^ (a >> 16)) & MASK32
    return (a * 3221225473) & MASK32


def address_hash(key: bytes) -> int:
    """XOR of the key's 32-bit big-endian words, as get_server_sh hashes an address."""
    value = 0
    for offset in range(0, len(key) - 3, 4):
        value ^= int.from_bytes(key[offset : offset + 4], "big")
    return value


def _signed(byte: int) -> int:
    return byte - 256 if byte > 127 else byte


def hash_sdbm(key: bytes) -> int:
    """HAProxy's hash_sdbm (src/hash.c): hash = c + (hash << 6) + (hash << 16) - hash."""
    value = 0
    for byte in key:
        value = (_signed(byte) + (value << 6) + (value << 16) - value) & MASK32
    return value


def hash_djb2(key: bytes) -> int:
    """HAProxy's hash_djb2: hash = hash * 33 + c, from 5381."""
    value = 5381
    for byte in key:
        value = ((value << 5) + value + _signed(byte)) & MASK32
    return value


def hash_crc32(key: bytes) -> int:
    """HAProxy's hash_crc32: the IEEE CRC-32 (reflected 0xEDB88320, inverted), zlib's."""
    return zlib.crc32(key) & MASK32


SAMPLE_HASHES = {"sdbm": hash_sdbm, "djb2": hash_djb2, "crc32": hash_crc32}


class Source(Generic[S]):
    __slots__ = (
        "_avalanche",
        "_dirty",
        "_ids",
        "_points",
        "_ring_keys",
        "_ring_servers",
        "_rr",
        "_sample_hash",
        "_servers",
        "_static_weight",
        "_table",
        "_up",
        "consistent",
        "dynamic",
        "hashed",
    )

    def __init__(
        self, hash_type: str = "map-based", function: str | None = None, avalanche: bool = False
    ) -> None:
        """`balance source` without `function`; `balance hash` with the `hash-type`
        function (and its `avalanche` modifier)."""
        if hash_type not in HASH_TYPES:
            raise ValueError(f"unknown hash-type {hash_type!r}")
        self.consistent = hash_type == "consistent"
        self._sample_hash = SAMPLE_HASHES[function] if function is not None else None
        # balance source: always on the ring (see the module docstring); hash: as HAProxy.
        self._avalanche = avalanche if function is not None else self.consistent
        self._rr = 0  # the next server in turn for a session without a sample
        self.hashed = True
        self.dynamic = self.consistent  # map-based is static, consistent dynamic
        self._servers: list[S] = []
        self._up: set[str] = set()
        self._ids: dict[str, int] = {}
        self._static_weight: dict[str, int] = {}
        self._points: dict[str, list[int]] = {}  # node keys per server, grown on demand
        self._table: list[S] = []
        self._ring_keys: list[int] = []
        self._ring_servers: list[S] = []
        self._dirty = True

    def add(self, server: S) -> None:
        self._servers.append(server)
        self._ids[server.name] = len(self._ids) + 1
        self._static_weight[server.name] = server.weight
        self._points[server.name] = []
        self._dirty = True

    def remove(self, server: S) -> None:
        self._servers = [s for s in self._servers if s.name != server.name]
        self._up.discard(server.name)
        self._static_weight.pop(server.name, None)
        self._points.pop(server.name, None)
        self._dirty = True

    def set_up(self, server: S) -> None:
        self._up.add(server.name)
        self._dirty = True

    def set_down(self, server: S) -> None:
        self._up.discard(server.name)
        self._dirty = True

    def set_weight(self, server: S) -> None:
        del server
        self._dirty = True

    # -- building -------------------------------------------------------------------------

    def _rebuild(self) -> None:
        self._dirty = False
        if self.consistent:
            self._build_ring()
        else:
            self._build_table()

    def _build_table(self) -> None:
        """lb_map.c recalc_server_map: each server `weight` times, smoothly interleaved."""
        weights = [
            (server, self._static_weight[server.name])
            for server in self._servers
            if server.name in self._up and server.weight > 0
        ]
        weights = [(server, weight) for server, weight in weights if weight > 0]
        total = sum(weight for _, weight in weights)
        score = [0] * len(weights)
        table: list[S] = []
        for _ in range(total):
            best = 0
            for index, (_, weight) in enumerate(weights):
                score[index] += weight
                if score[index] > score[best]:
                    best = index
            score[best] -= total
            table.append(weights[best][0])
        self._table = table

    def _build_ring(self) -> None:
        entries: list[tuple[int, int, S]] = []
        for server in self._servers:
            name = server.name
            if name not in self._up:
                continue
            count = server.effective_weight
            if count <= 0:
                continue
            points = self._points[name]
            base = self._ids[name] * WEIGHT_RANGE
            while len(points) < count:
                points.append(full_hash(base + len(points)))
            entries.extend((point, self._ids[name], server) for point in points[:count])
        entries.sort(key=lambda entry: (entry[0], entry[1]))
        self._ring_keys = [entry[0] for entry in entries]
        self._ring_servers = [entry[2] for entry in entries]

    # -- picking --------------------------------------------------------------------------

    def pick(self, key: bytes | None = b"", exclude: frozenset[str] = frozenset()) -> S | None:
        if self._dirty:
            self._rebuild()
        if key is None:  # no sample: the next server in turn
            self._rr += 1
            if self.consistent:
                size = len(self._ring_keys)
                return self._walk_ring(self._rr % size, exclude) if size else None
            return self._pick_table(self._rr, exclude)
        value = address_hash(key) if self._sample_hash is None else self._sample_hash(key)
        if self._avalanche:
            value = full_hash(value)
        if self.consistent:
            return self._pick_ring(value, exclude)
        return self._pick_table(value, exclude)

    def _pick_table(self, value: int, exclude: frozenset[str]) -> S | None:
        table = self._table
        if not table:
            return None
        start = value % len(table)
        for step in range(len(table)):
            server = table[(start + step) % len(table)]
            if server.name not in exclude:
                return server
        return None

    def _pick_ring(self, value: int, exclude: frozenset[str]) -> S | None:
        keys = self._ring_keys
        if not keys:
            return None
        size = len(keys)
        after = bisect.bisect_left(keys, value) % size
        before = (after - 1) % size
        # chash_get_server_hash: the closer of the points around the hash.
        distance_before = (value - keys[before]) & MASK32
        distance_after = (keys[after] - value) & MASK32
        index = before if distance_before <= distance_after else after
        return self._walk_ring(index, exclude)

    def _walk_ring(self, index: int, exclude: frozenset[str]) -> S | None:
        size = len(self._ring_keys)
        for step in range(size):
            server = self._ring_servers[(index + step) % size]
            if server.name not in exclude:
                return server
        return None
