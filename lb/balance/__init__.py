"""Balancing algorithms: one module per algorithm behind one small interface.

As HAProxy's lb_fwrr.c / lb_fwlc.c / lb_chash.c, each algorithm is told about servers
(`add`, `remove`), their state (`set_up`, `set_down`) and weight (`set_weight`), and
`pick(key)` returns the server for a new connection, or None when no server can take one.
The `balance` keyword is validated against `ALGORITHMS`.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from lb.balance.roundrobin import RoundRobin


class Weighted(Protocol):
    """What an algorithm needs to know of a server."""

    @property
    def name(self) -> str: ...

    @property
    def effective_weight(self) -> int: ...

    @property
    def active_connections(self) -> int: ...

    def has_room(self) -> bool: ...


S = TypeVar("S", bound=Weighted)


class Balancer(Protocol[S]):
    def add(self, server: S) -> None: ...

    def remove(self, server: S) -> None: ...

    def set_up(self, server: S) -> None: ...

    def set_down(self, server: S) -> None: ...

    def set_weight(self, server: S) -> None: ...

    def pick(self, key: bytes = b"", exclude: frozenset[str] = frozenset()) -> S | None: ...


ALGORITHMS: dict[str, type] = {
    "roundrobin": RoundRobin,
}

__all__ = ["ALGORITHMS", "Balancer", "RoundRobin", "Weighted"]
