"""balance static-rr: weighted round robin over the weights of the configuration.

HAProxy's lb_map.c builds a static map where each server appears as often as its weight,
interleaved, and walks it; "changing a server's weight on the fly will have no effect"
(configuration.txt, balance static-rr) apart from 0 (no traffic) and back. The same
interleaving comes from smooth weighted round robin over the weight each server had when
it was added. A server without a free slot is skipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from lb.balance import Weighted

S = TypeVar("S", bound="Weighted")


class StaticRoundRobin(Generic[S]):
    __slots__ = ("_score", "_servers", "_static_weight", "_up")

    dynamic: bool = False
    hashed: bool = False

    def __init__(self) -> None:
        self._servers: list[S] = []
        self._up: set[str] = set()
        self._score: dict[str, int] = {}
        self._static_weight: dict[str, int] = {}

    def add(self, server: S) -> None:
        self._servers.append(server)
        self._score[server.name] = 0
        self._static_weight[server.name] = server.weight

    def remove(self, server: S) -> None:
        self._servers = [s for s in self._servers if s.name != server.name]
        self._up.discard(server.name)
        self._score.pop(server.name, None)
        self._static_weight.pop(server.name, None)

    def set_up(self, server: S) -> None:
        self._up.add(server.name)

    def set_down(self, server: S) -> None:
        self._up.discard(server.name)
        self._score[server.name] = 0

    def set_weight(self, server: S) -> None:
        # Only 0 and back counts: the weight read at pick time is 0 or the static one.
        del server

    def pick(self, key: bytes = b"", exclude: frozenset[str] = frozenset()) -> S | None:
        del key
        best: S | None = None
        best_score = 0
        total = 0
        score = self._score
        static = self._static_weight
        for server in self._servers:
            name = server.name
            if name not in self._up or name in exclude or server.weight <= 0:
                continue
            weight = static[name]
            if weight <= 0 or not server.has_room():
                continue
            total += weight
            current = score[name] + weight
            score[name] = current
            if best is None or current > best_score:
                best, best_score = server, current
        if best is not None:
            score[best.name] -= total
        return best
