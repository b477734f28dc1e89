"""Balancing algorithms: one module per algorithm behind one small interface.

As HAProxy's lb_fwrr.c / lb_fwlc.c / lb_map.c / lb_chash.c / lb_fas.c, each algorithm is
told about servers (`add`, `remove`), their state (`set_up`, `set_down`) and weight
(`set_weight`), and `pick(key, exclude)` returns the server for a new connection, or None.

Weights. A server's user `weight` is 0..256 (configuration.txt 5.2 "weight"). Dynamic
algorithms read `effective_weight`, in 1/16 of a weight unit as HAProxy's BE_WEIGHT_SCALE,
so that slowstart can ramp even a weight-1 server by small steps; static algorithms
(`static-rr`, `source` with `hash-type map-based`) use the weight a server had when added
and honour only 0 / non-0 changes later, as HAProxy refuses other runtime weights for them.

Room. Round-robin-like algorithms (roundrobin, static-rr, first, leastconn) skip a server
that has no free connection slot (`has_room()`: below its maxconn with nothing queued);
when all are full the caller queues the connection on the backend. Hashing algorithms
(`source`) return the server the key maps to, full or not: the caller queues on that server
(HAProxy's assign_server_and_queue). leastconn also returns a full server whose own queue is
below its explicit maxqueue (`accepts_queued()`), as HAProxy's fwlc does.

Backup servers live in a second balancer of their own (lb.server), as HAProxy keeps
separate active and backup trees.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from lb.balance.first import First
from lb.balance.leastconn import LeastConn
from lb.balance.roundrobin import RoundRobin
from lb.balance.source import Source
from lb.balance.static_rr import StaticRoundRobin

#: HAProxy's BE_WEIGHT_SCALE: effective weights count sixteenths of a user weight.
WEIGHT_SCALE = 16
#: Largest user weight (configuration.txt: "weight <weight> ... between 0 and 256").
MAX_WEIGHT = 256


class Weighted(Protocol):
    """What an algorithm needs to know of a server."""

    @property
    def name(self) -> str: ...

    @property
    def weight(self) -> int: ...

    @property
    def effective_weight(self) -> int: ...

    @property
    def active_connections(self) -> int: ...

    @property
    def queued_connections(self) -> int: ...

    def has_room(self) -> bool: ...

    def accepts_queued(self) -> bool: ...


S = TypeVar("S", bound=Weighted)


class Balancer(Protocol[S]):
    #: Weights change at run time (runtime weight, slowstart), as HAProxy's BE_LB_PROP_DYN.
    dynamic: bool
    #: The server follows from the key (source hash): a retry on it is deterministic.
    hashed: bool

    def add(self, server: S) -> None: ...

    def remove(self, server: S) -> None: ...

    def set_up(self, server: S) -> None: ...

    def set_down(self, server: S) -> None: ...

    def set_weight(self, server: S) -> None: ...

    def pick(self, key: bytes | None = b"", exclude: frozenset[str] = frozenset()) -> S | None:
        """`key`: the hashing algorithms' key; None when the session has no sample for it."""
        ...


#: `balance <algorithm>` -> the class; lb.config validates `balance` against these names.
ALGORITHMS: dict[str, type] = {
    "roundrobin": RoundRobin,
    "static-rr": StaticRoundRobin,
    "leastconn": LeastConn,
    "source": Source,
    "first": First,
    "hash": Source,  # `balance hash <expression>`: Source with the hash-type function
}


def create_balancer(
    algorithm: str,
    hash_type: str = "map-based",
    hash_function: str = "sdbm",
    hash_avalanche: bool = False,
) -> Balancer[S]:
    """A new balancer for `balance <algorithm>` (and `hash-type` for hashing ones)."""
    cls = ALGORITHMS[algorithm]
    if algorithm == "hash":
        hashed: Balancer[S] = Source(hash_type, hash_function, hash_avalanche)
        return hashed
    if cls is Source:
        balancer: Balancer[S] = Source(hash_type)
        return balancer
    created: Balancer[S] = cls()
    return created


__all__ = [
    "ALGORITHMS",
    "MAX_WEIGHT",
    "WEIGHT_SCALE",
    "Balancer",
    "First",
    "LeastConn",
    "RoundRobin",
    "Source",
    "StaticRoundRobin",
    "Weighted",
    "create_balancer",
]
