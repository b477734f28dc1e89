"""balance first: fill the first server up to its maxconn, then the next.

HAProxy's lb_fas.c: "The first server with available connection slots receives the
connection. The servers are chosen from the lowest numeric identifier to the highest ...
which defaults to the server's position in the farm" (configuration.txt, balance first).
The weight is ignored except that weight 0 takes no traffic. Without maxconn the first up
server takes everything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from lb.balance import Weighted

S = TypeVar("S", bound="Weighted")


class First(Generic[S]):
    __slots__ = ("_servers", "_up")

    dynamic: bool = True
    hashed: bool = False

    def __init__(self) -> None:
        self._servers: list[S] = []  # in configuration order, the server's id
        self._up: set[str] = set()

    def add(self, server: S) -> None:
        self._servers.append(server)

    def remove(self, server: S) -> None:
        self._servers = [s for s in self._servers if s.name != server.name]
        self._up.discard(server.name)

    def set_up(self, server: S) -> None:
        self._up.add(server.name)

    def set_down(self, server: S) -> None:
        self._up.discard(server.name)

    def set_weight(self, server: S) -> None:
        del server

    def pick(self, key: bytes | None = b"", exclude: frozenset[str] = frozenset()) -> S | None:
        del key
        for server in self._servers:
            name = server.name
            if name not in self._up or name in exclude or server.effective_weight <= 0:
                continue
            if server.has_room():
                return server
        return None
