"""balance leastconn: the server with the fewest connections per unit of weight.

HAProxy's lb_fwlc.c keys each server by (served + queued) / effective weight and takes the
smallest key; servers with equal keys sit in the tree in the order they were last
repositioned (each time their count changed), so ties go round robin (configuration.txt:
"Round-robin is performed within groups of servers of the same load"). Here the key is
compared exactly by cross-multiplication, and a server is "repositioned" (sent to the back
of its tie group) whenever its load is seen to change or it is picked.

A full server is skipped unless it has an explicit maxqueue with room (`accepts_queued`):
fwlc then queues on it "up to this value ... which often allows to better smooth the load
when dealing with single-digit maxconn values" (configuration.txt, maxqueue).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from lb.balance import Weighted

S = TypeVar("S", bound="Weighted")


class LeastConn(Generic[S]):
    __slots__ = ("_last_load", "_order", "_sequence", "_servers", "_up")

    dynamic: bool = True
    hashed: bool = False

    def __init__(self) -> None:
        self._servers: list[S] = []
        self._up: set[str] = set()
        self._order: dict[str, int] = {}  # position in the tie group: lower goes first
        self._last_load: dict[str, int] = {}
        self._sequence = 0

    def _reposition(self, name: str) -> None:
        self._sequence += 1
        self._order[name] = self._sequence

    def add(self, server: S) -> None:
        self._servers.append(server)
        self._reposition(server.name)
        self._last_load[server.name] = 0

    def remove(self, server: S) -> None:
        self._servers = [s for s in self._servers if s.name != server.name]
        self._up.discard(server.name)
        self._order.pop(server.name, None)
        self._last_load.pop(server.name, None)

    def set_up(self, server: S) -> None:
        self._up.add(server.name)
        self._reposition(server.name)

    def set_down(self, server: S) -> None:
        self._up.discard(server.name)

    def set_weight(self, server: S) -> None:
        self._reposition(server.name)

    def pick(self, key: bytes | None = b"", exclude: frozenset[str] = frozenset()) -> S | None:
        del key
        best: S | None = None
        best_load = 0
        best_weight = 1
        best_order = 0
        order = self._order
        last_load = self._last_load
        for server in self._servers:
            name = server.name
            if name not in self._up or name in exclude:
                continue
            weight = server.effective_weight
            if weight <= 0:
                continue
            load = server.active_connections + server.queued_connections
            if load != last_load[name]:
                last_load[name] = load
                self._reposition(name)
            if not server.has_room() and not server.accepts_queued():
                continue
            position = order[name]
            if best is None:
                better = True
            else:
                left, right = load * best_weight, best_load * weight
                better = left < right or (left == right and position < best_order)
            if better:
                best, best_load, best_weight, best_order = server, load, weight, position
        if best is not None:
            # Taking a connection moves the server to the back of its (new) tie group.
            last_load[best.name] = best_load + 1
            self._reposition(best.name)
        return best
