"""The control channel between the master and its workers, and the state they share.

lb.workers runs a master and `nbthread` worker processes; each worker has one socketpair to
the master. What HAProxy's threads share by living in one process, lb's workers share
through the master, which relays and remembers:

- **Server state.** One worker, the *lead*, runs every health check (once per server per
  interval for the whole process tree, as HAProxy's threads do) and serves the `stats
  socket` and Prometheus. Each change of a server's health (check status, rise/fall count,
  UP/DOWN) or of its runtime settings (`set server ... state|weight`) is sent as a full
  `ServerRecord`; the master keeps the latest record of every server and relays it to every
  other worker, which applies it to its own balancer (with HAProxy's side effects, such as
  `on-marked-down shutdown-sessions`, on its own sessions). Only the lead logs transitions.
- **Committed certificates** (`commit ssl cert`) and `reload ssl` likewise.
- **Counters** stay in each worker; the lead asks the master to `gather` them and sums.

Reload: the master forks new workers with its records in their memory (fork inherits them)
and they apply the records before they accept, so a server that is DOWN stays DOWN and one in
maintenance stays in maintenance; the master then hands the lead role to the new worker #1
and soft-stops the old ones. HAProxy itself keeps such state across a reload only with
`server-state-file` (and `load-server-state-from-file`); lb always keeps it, in memory, with
HAProxy's rules for a configuration that changed (see `apply_server_record`). A committed
certificate is kept while its file on disk is the one it replaced; once the file changes on
disk (or after `reload ssl`) the file wins.

Framing (lb.control_codec): a 4-byte big-endian length, then a UTF-8 JSON object whose "t"
names the message.

    worker -> master   ready                      the worker serves
                       server {record}            a server's shared state changed
                       cert {record}              a certificate was committed
                       reload_ssl                 every TLS file is to be re-read
                       gather {id, what}          collect `what` from the other workers
                       reply {id, data}           this worker's answer to `collect`
    master -> worker   server, cert, reload_ssl   relayed from another worker: apply
                       lead {on}                  take (or give up) the lead role
                       collect {id, what}         answer with `reply`
                       gathered {id, replies, missing}
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from lb.control_codec import NEED_DATA, ControlProtocolError, FrameDecoder, Message, encode
from lb.pem import TLSFileError, bundle_from_pem, file_signature

if TYPE_CHECKING:
    from lb.server import BackendState, ServerState
    from lb.shared_counts import SharedCounts
    from lb.tls import BindContext

logger = logging.getLogger(__name__)

#: How long the master waits for the workers' answers to a `gather`.
GATHER_TIMEOUT = 2.0


# --------------------------------------------------------------------------------------------
# Shared state


def server_target(server: ServerState) -> str:
    """What a server's health is about: its address and its check's address."""
    config = server.config
    return f"{config.host}:{config.port}/{config.check_addr or ''}:{config.check_port or ''}"


@dataclass(frozen=True, slots=True)
class ServerRecord:
    """Everything about one server that every worker must agree on."""

    backend: str
    server: str
    target: str  # server_target() when recorded
    initial_weight: int  # the configuration's weight when recorded
    disabled: bool  # the configuration's `disabled` when recorded
    up: bool
    health: int | None  # rise/fall counter (lb.health); None without `check`
    check_status: str | None
    admin: str  # ready | drain | maint
    weight: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.backend, self.server)

    def to_message(self) -> Message:
        return {
            "t": "server",
            "backend": self.backend,
            "server": self.server,
            "target": self.target,
            "initial_weight": self.initial_weight,
            "disabled": self.disabled,
            "up": self.up,
            "health": self.health,
            "check_status": self.check_status,
            "admin": self.admin,
            "weight": self.weight,
        }

    @classmethod
    def from_message(cls, message: Message) -> ServerRecord:
        try:
            record = cls(
                backend=str(message["backend"]),
                server=str(message["server"]),
                target=str(message["target"]),
                initial_weight=int(message["initial_weight"]),
                disabled=bool(message["disabled"]),
                up=bool(message["up"]),
                health=None if message["health"] is None else int(message["health"]),
                check_status=(
                    None if message["check_status"] is None else str(message["check_status"])
                ),
                admin=str(message["admin"]),
                weight=int(message["weight"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ControlProtocolError(f"bad server record: {error!r}") from None
        if record.admin not in ("ready", "drain", "maint"):
            raise ControlProtocolError(f"bad admin state {record.admin!r}")
        return record


@dataclass(frozen=True, slots=True)
class CertRecord:
    """A certificate committed through the runtime API, and the file it replaced."""

    path: str
    pem: bytes
    signature: tuple[tuple[str, int, int], ...]  # lb.pem.file_signature of the file then

    def to_message(self) -> Message:
        return {
            "t": "cert",
            "path": self.path,
            "pem": base64.b64encode(self.pem).decode(),
            "signature": [list(item) for item in self.signature],
        }

    @classmethod
    def from_message(cls, message: Message) -> CertRecord:
        try:
            return cls(
                path=str(message["path"]),
                pem=base64.b64decode(message["pem"], validate=True),
                signature=tuple(
                    (str(path), int(mtime), int(size)) for path, mtime, size in message["signature"]
                ),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ControlProtocolError(f"bad certificate record: {error!r}") from None


@dataclass
class SharedState:
    """The master's memory of what every worker shares; new workers inherit it by fork."""

    servers: dict[tuple[str, str], ServerRecord] = field(default_factory=dict)
    certs: dict[str, CertRecord] = field(default_factory=dict)

    def record(self, message: Message) -> None:
        """Remember a `server`, `cert` or `reload_ssl` message."""
        kind = message["t"]
        if kind == "server":
            record = ServerRecord.from_message(message)
            self.servers[record.key] = record
        elif kind == "cert":
            cert = CertRecord.from_message(message)
            self.certs[cert.path] = cert
        elif kind == "reload_ssl":
            self.certs.clear()

    def keep_only(self, servers: Iterable[tuple[str, str]]) -> None:
        """Forget the servers a new configuration no longer has."""
        wanted = set(servers)
        self.servers = {key: r for key, r in self.servers.items() if key in wanted}


def server_record(backend: BackendState, server: ServerState) -> ServerRecord:
    return ServerRecord(
        backend=backend.name,
        server=server.name,
        target=server_target(server),
        initial_weight=server.config.weight,
        disabled=server.config.disabled,
        up=server.up,
        health=server.health.health if server.health is not None else None,
        check_status=server.check_status,
        admin=server.admin_state,
        weight=server.weight,
    )


def apply_server_record(backends: Mapping[str, BackendState], record: ServerRecord) -> None:
    """Make this worker's view of a server what `record` says, with HAProxy's rules for a
    configuration that changed since (srv_state_srv_update, server-state-file):

    - health (UP/DOWN, rise/fall count, check status) only when the server and its check
      still point at the same address;
    - the runtime weight only when the configured weight is still the one it replaced;
    - the administrative state only when `disabled` is still what it was.
    """
    backend = backends.get(record.backend)
    if backend is None:
        return
    try:
        server = backend.server(record.server)
    except KeyError:
        return
    if record.target == server_target(server):
        health = server.health
        if health is not None and record.health is not None:
            # Within this configuration's rise/fall, on the side of rise that `up` says.
            if record.up:
                health.health = max(health.rise, min(record.health, health.top))
            else:
                health.health = max(0, min(record.health, health.rise - 1))
        server.check_status = record.check_status
        for line in backend.set_up(server, record.up, slowstart=True):
            logger.debug("relayed: %s", line)  # the lead logged it
    if record.initial_weight == server.config.weight and record.weight != server.weight:
        backend.set_weight(server, record.weight)
    if record.disabled == server.config.disabled and record.admin != server.admin_state:
        backend.set_admin_state(server, record.admin)


def apply_cert(contexts: Iterable[BindContext], record: CertRecord, *, at_start: bool) -> int:
    """Serve a committed certificate on every bind that loads its file; how many took it.

    At a worker's start, only while the file on disk is still the one it replaced."""
    if at_start and file_signature([Path(record.path)]) != record.signature:
        logger.info("committed certificate %s not kept: the file changed on disk", record.path)
        return 0
    try:
        bundle = bundle_from_pem(record.pem, record.path)
    except TLSFileError as error:
        logger.error("committed certificate %s cannot be used: %s", record.path, error)
        return 0
    return sum(1 for context in contexts if context.replace_bundle(bundle))


# --------------------------------------------------------------------------------------------
# The worker's end


@dataclass
class WorkerSetup:
    """What a forked worker gets from its master (lb.workers)."""

    control: socket.socket
    number: int
    lead: bool
    shared: SharedState
    counts: SharedCounts | None = None  # this generation's shared session counts


class MasterLink(asyncio.Protocol):
    """A worker's end of its control socket: frames in and out, `gather` futures."""

    def __init__(
        self,
        on_message: Callable[[Message], None],
        on_master_gone: Callable[[], None],
    ) -> None:
        self.on_message = on_message
        self.on_master_gone = on_master_gone
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.waiting: dict[int, asyncio.Future[list[Any]]] = {}
        self.next_id = 0

    @classmethod
    async def open(
        cls,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_message: Callable[[Message], None],
        on_master_gone: Callable[[], None],
    ) -> MasterLink:
        sock.setblocking(False)
        _transport, link = await loop.create_unix_connection(
            lambda: cls(on_message, on_master_gone), sock=sock
        )
        return link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.decoder.feed(data)
            while True:
                message = self.decoder.next_event()
                if message is NEED_DATA:
                    return
                self._dispatch(message)
        except ControlProtocolError as error:
            logger.error("control channel: %s; closing it", error)
            if self.transport is not None:
                self.transport.close()

    def _dispatch(self, message: Message) -> None:
        if message["t"] == "gathered":
            future = self.waiting.pop(int(message["id"]), None)
            if future is not None and not future.done():
                missing = int(message.get("missing", 0))
                if missing:
                    logger.warning("%d worker(s) did not answer in time", missing)
                future.set_result(list(message["replies"]))
            return
        try:
            self.on_message(message)
        except ControlProtocolError as error:
            logger.error("control channel: %s", error)
        except Exception:  # a bad message must not take the worker down
            logger.exception("control message %r failed", message.get("t"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for future in self.waiting.values():
            if not future.done():
                future.set_result([])
        self.waiting.clear()
        self.on_master_gone()

    def send(self, message: Message) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode(message))

    async def gather(self, what: str) -> list[Any]:
        """What every other serving worker answers to `collect what` (lb.process)."""
        if self.transport is None:
            return []
        self.next_id += 1
        ident = self.next_id
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.waiting[ident] = future
        self.send({"t": "gather", "id": ident, "what": what})
        try:
            return await asyncio.wait_for(future, GATHER_TIMEOUT * 2)
        except TimeoutError:
            logger.warning("the master did not answer a gather in time")
            return []
        finally:
            self.waiting.pop(ident, None)
