"""balance static-rr: weighted round robin over the weights of the configuration.

HAProxy's lb_map.c builds a static map where each server appears as often as its weight,
interleaved, and walks it; "changing a server's weight on the fly will have no effect"
(configuration.txt, balance static-rr) apart from 0 (no traffic) and back. The same
interleaving comes from smooth weighted round robin over the weight each server had when
it was added. A server without a free slot is skipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from lb.balance.roundrobin import RoundRobin

if TYPE_CHECKING:
    from lb.balance import Weighted

S = TypeVar("S", bound="Weighted")


class StaticRoundRobin(RoundRobin[S]):
    """RoundRobin over the weights servers had when added (0 at run time still stops one)."""

    __slots__ = ("_static_weight",)

    dynamic: bool = False

    def __init__(self) -> None:
        super().__init__()
        self._static_weight: dict[str, int] = {}

    def add(self, server: S) -> None:
        super().add(server)
        self._static_weight[server.name] = server.weight

    def remove(self, server: S) -> None:
        super().remove(server)
        self._static_weight.pop(server.name, None)

    def _weight_of(self, server: S) -> int:
        # Only 0 and back counts: the weight at pick time is 0 or the static one.
        return self._static_weight[server.name] if server.weight > 0 else 0
