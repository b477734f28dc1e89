"""Connection queues: where a connection waits for a server slot (HAProxy's queue.c).

A server with `maxconn` that is full makes new connections wait: in that server's own queue
when the server was chosen for them (hashing algorithms, bounded by `maxqueue`), or in the
backend's queue when every server is full (unbounded, as HAProxy's proxy queue). When a
slot frees, the server takes the oldest connection of either queue (process_srv_queue);
`timeout queue` ends a wait in the data path (lb.datapath), which then abandons its place.

Log positions follow configuration.txt 8.2.2 (%sq / %bq, "srv_queue" / "backend_queue"):
0 for a connection that never waited in that queue, else 1 plus the number of connections
that left the queue ahead of it while it waited (HAProxy counts `queue.idx - queue_idx`).

Pure bookkeeping: no asyncio, no clock; the waiter is a plain callback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lb.server import ServerState


class PendingConnection:
    """One connection waiting for a slot; `waiter(server)` is called once a slot is its."""

    __slots__ = (
        "backend_queue_position",
        "enqueued_at",
        "granted",
        "key",
        "mark",
        "queue",
        "sequence",
        "server_queue_position",
        "waiter",
    )

    def __init__(
        self, waiter: Callable[[ServerState], None], key: bytes | None, sequence: int
    ) -> None:
        self.waiter = waiter
        self.key = key
        self.sequence = sequence  # arrival order across the backend and server queues
        self.queue: ConnectionQueue | None = None
        self.mark = 0
        self.granted: ServerState | None = None
        self.enqueued_at = 0.0  # the data path's clock, for %Tw
        self.server_queue_position = 0
        self.backend_queue_position = 0

    @property
    def server(self) -> ServerState | None:
        """The server whose own queue holds this connection (None: the backend's queue)."""
        return self.queue.server if self.queue is not None else None


class ConnectionQueue:
    """A FIFO of pending connections that also removes from the middle in O(1)."""

    __slots__ = ("_entries", "left", "server")

    def __init__(self, server: ServerState | None = None) -> None:
        self.server = server
        self._entries: dict[PendingConnection, None] = {}
        self.left = 0  # connections served from this queue so far (HAProxy's queue.idx)

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __iter__(self) -> Iterator[PendingConnection]:
        return iter(list(self._entries))

    def push(self, pending: PendingConnection) -> None:
        pending.queue = self
        pending.mark = self.left
        self._entries[pending] = None

    def first(self) -> PendingConnection | None:
        return next(iter(self._entries), None)

    def remove(self, pending: PendingConnection, *, served: bool) -> None:
        """Take `pending` out: `served` when it got a slot, else it gave up or moved."""
        del self._entries[pending]
        position = self.left - pending.mark + 1
        if self.server is None:
            pending.backend_queue_position += position
        else:
            pending.server_queue_position += position
        if served:
            self.left += 1
        pending.queue = None
