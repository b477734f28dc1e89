"""balance roundrobin: smooth weighted round robin with dynamic weights.

HAProxy's lb_fwrr.c spreads picks by weight so that a server of weight 3 among weights
3/1/1 is picked 3 times in 5, interleaved rather than in a burst. The smooth weighted
algorithm (as nginx's) gives the same interleaving: each pick adds every candidate's
weight to its running score, takes the highest score and subtracts the total. Weight 0
takes no new connections; a weight change (runtime `set weight`, slowstart's ramp, read
from `effective_weight` at each pick) applies from the next pick. A server without a free
slot is skipped (fwrr_get_next_server), so the caller queues when all are full.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from lb.balance import Weighted

S = TypeVar("S", bound="Weighted")


class RoundRobin(Generic[S]):
    __slots__ = ("_score", "_servers", "_up")

    dynamic: bool = True
    hashed: bool = False

    def __init__(self) -> None:
        self._servers: list[S] = []
        self._up: set[str] = set()
        self._score: dict[str, int] = {}

    def add(self, server: S) -> None:
        self._servers.append(server)
        self._score[server.name] = 0

    def remove(self, server: S) -> None:
        self._servers = [s for s in self._servers if s.name != server.name]
        self._up.discard(server.name)
        self._score.pop(server.name, None)

    def set_up(self, server: S) -> None:
        self._up.add(server.name)

    def set_down(self, server: S) -> None:
        self._up.discard(server.name)
        self._score[server.name] = 0

    def set_weight(self, server: S) -> None:
        # Scores stay; the new weight shapes the following picks.
        del server

    def _weight_of(self, server: S) -> int:
        return server.effective_weight

    def pick(self, key: bytes | None = b"", exclude: frozenset[str] = frozenset()) -> S | None:
        del key
        best: S | None = None
        best_score = 0
        total = 0
        score = self._score
        for server in self._servers:
            name = server.name
            if name not in self._up or name in exclude:
                continue
            weight = self._weight_of(server)
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
