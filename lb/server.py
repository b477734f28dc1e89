"""Runtime state of backends and servers: up/down, weights, connection counts.

The config model (lb.config.model) is frozen; what changes while lb runs lives here,
beside it (DESIGN.md). A `BackendState` owns its servers and its balancer; the data path
asks it for a server and tells each server when a connection starts and ends.
"""

from __future__ import annotations

from lb.balance import ALGORITHMS, Balancer
from lb.config.model import Backend, Server


class ServerState:
    """One server of a backend at run time."""

    __slots__ = (
        "active_connections",
        "backend_name",
        "config",
        "failed_connections",
        "host",
        "maintenance",
        "name",
        "port",
        "total_connections",
        "up",
        "weight",
    )

    def __init__(self, config: Server, backend_name: str) -> None:
        self.config = config
        self.name = config.name
        self.backend_name = backend_name
        self.host = config.host
        self.port = config.port
        self.weight = config.weight
        # HAProxy starts a server UP (its health at `rise`), so that the first failed checks
        # need `fall` of them to take it down; `disabled` starts it in maintenance.
        self.up = True
        self.maintenance = config.disabled
        self.active_connections = 0
        self.total_connections = 0
        self.failed_connections = 0

    @property
    def effective_weight(self) -> int:
        return self.weight

    def has_room(self) -> bool:
        maxconn = self.config.maxconn
        return maxconn is None or self.active_connections < maxconn

    def connection_started(self) -> None:
        self.active_connections += 1
        self.total_connections += 1

    def connection_ended(self, *, failed: bool) -> None:
        self.active_connections -= 1
        if failed:
            self.failed_connections += 1

    @property
    def usable(self) -> bool:
        return self.up and not self.maintenance


class BackendState:
    """A backend's servers and the balancer that picks among them."""

    def __init__(self, config: Backend) -> None:
        self.config = config
        self.name = config.name
        self.servers = [ServerState(server, config.name) for server in config.servers]
        self.balancer: Balancer[ServerState] = ALGORITHMS[config.balance]()
        for server in self.servers:
            self.balancer.add(server)
            if server.usable:
                self.balancer.set_up(server)

    def server(self, name: str) -> ServerState:
        for server in self.servers:
            if server.name == name:
                return server
        raise KeyError(name)

    def pick(self, key: bytes, exclude: frozenset[str]) -> ServerState | None:
        return self.balancer.pick(key, exclude)

    def set_weight(self, server: ServerState, weight: int) -> None:
        server.weight = weight
        self.balancer.set_weight(server)

    def set_up(self, server: ServerState, up: bool) -> None:
        server.up = up
        if server.usable:
            self.balancer.set_up(server)
        else:
            self.balancer.set_down(server)
