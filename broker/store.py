"""The node's on-disk store: what survives a SIGKILL and restart (issue 12, durability).

One SQLite database per node (stdlib ``sqlite3``, WAL mode), chosen over LMDB by
``bench/store_bench.py`` (bench/README.md has the numbers): at the batch sizes this broker
commits, both are bound by the per-statement cost in Python, SQLite needs no dependency,
and its WAL gives crash safety without a fixed map size to tune.

What is stored (only for *persistent* sessions: Session Expiry Interval > 0, or 3.1.1 Clean
Session 0; a clean session with expiry 0 is never written):

- ``sessions``: one record per session (:class:`broker.cluster_codec.SessionRecord`:
  subscriptions with options and identifiers, expiry with its wall-clock deadline, pending
  will, next packet id, the claim version), ``incoming``: its QoS 2 packet ids not yet
  released by the client;
- ``deliveries``: its queued and in-flight QoS 1/2 deliveries in order (message id, QoS,
  RETAIN, subscription identifiers, the packet id of a QoS 2 delivery, PUBREL sent), and
  ``messages``: each message once, however many sessions it is queued for (the store counts
  references and deletes a message with its last delivery);
- ``retained`` messages with their changed_at, ``state``: the seed 003 state store;
- ``wills``: the will of each connected client (any session, clean ones too; the encoded
  :class:`broker.cluster_codec.LiveWill`, authorized), written at its CONNECT and removed
  when its connection ends: what is left at a start are the wills of the clients connected
  when the node died, due then (broker.core.Broker.settle_wills_at_crash);
- ``outbox``: reliable cluster frames not yet acknowledged by each peer, ``routes``: the
  filters of each peer (kept while it is down, so its persistent sessions' messages wait in
  the outbox), ``meta``: the node's incarnation, its message id block, the inbox high-water
  per peer.

Group commit: the core calls the operation methods from the event loop; they only append to
a list. Once per loop turn the list goes to one writer thread, which runs it in ONE
transaction (the loop never waits on the disk). ``after_commit(callback)`` runs the callback
on the loop once everything queued before it is committed: the broker sends a PUBACK/PUBREC
that promises durable work, a QoS 2 PUBLISH whose packet id is written, a PUBREL, or a cluster
ACK from there. Work that wrote nothing is answered at once, as before. While one batch is
being written, the next one grows: commits get larger, not more frequent, under load.

``synchronous = "normal"`` (WAL + NORMAL) survives the process being killed at any point;
``"full"`` also survives a power loss or kernel crash (an fsync per commit). Operations
waiting for the writer are bounded by ``max_pending_bytes``: above it ``congested`` is true
and publishers are paused (never dropped) until the writer catches up. A failing disk is
logged and counted (``errors``); the broker keeps serving from memory.

The loop side and the writer thread share nothing but a queue of batches and
``loop.call_soon_threadsafe``. :class:`MemoryStore` is the same interface writing nothing
(``[store] mode = "memory"``, and every node without a ``[store]`` section).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import cluster_codec as codec
from broker.config import StoreConfig

__all__ = ["DiskStore", "MemoryStore", "Store", "StoreError", "StoredState"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (client_id TEXT PRIMARY KEY, record BLOB) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS incoming (
    client_id TEXT, packet_id INTEGER, PRIMARY KEY (client_id, packet_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    client_id TEXT, key INTEGER, message TEXT, flags INTEGER, packet_id INTEGER,
    identifiers TEXT, PRIMARY KEY (client_id, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY, record BLOB, saved_at REAL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY, record BLOB, changed_at REAL, saved_at REAL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    peer TEXT, seq INTEGER, frame BLOB, PRIMARY KEY (peer, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS routes (peer TEXT, filter TEXT, PRIMARY KEY (peer, filter))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (
    key BLOB PRIMARY KEY, value BLOB, expires_at REAL, counter INTEGER, node TEXT)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS wills (client_id TEXT PRIMARY KEY, will BLOB) WITHOUT ROWID;
"""
# Delivery flags (the deliveries.flags column).
_QOS_MASK = 0x03
_RETAIN = 0x04
_INFLIGHT = 0x08
_RELEASED = 0x10
# Oldest-first warnings about a slow disk: at most one line per interval.
SLOW_COMMIT_SECONDS = 1.0


class StoreError(Exception):
    """The store cannot be opened (path, permissions, another node's schema)."""


Operation = tuple[str, tuple[Any, ...]]


@dataclass(slots=True)
class StoredDelivery:
    key: int
    record: codec.DeliveryRecord


@dataclass(slots=True)
class StoredSession:
    record: codec.SessionRecord
    incoming: list[int]
    deliveries: list[StoredDelivery]


@dataclass(slots=True)
class StoredState:
    """Everything read back at start."""

    meta: dict[str, bytes] = field(default_factory=dict)
    sessions: list[StoredSession] = field(default_factory=list)
    # (topic, message with expiry counted from now, changed_at)
    retained: list[tuple[str, codec.WireMessage, float]] = field(default_factory=list)
    outbox: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    routes: dict[str, set[str]] = field(default_factory=dict)
    # key -> (value, expires_at wall clock, version)
    state: dict[bytes, tuple[bytes, float | None, codec.Version]] = field(default_factory=dict)
    # client id -> encoded codec.LiveWill: the clients connected when the node stopped.
    wills: dict[str, bytes] = field(default_factory=dict)


def _message_id(message: codec.WireMessage) -> str:
    return f"{message.origin_node}:{message.seq}"


def _aged(message: codec.WireMessage, saved_at: float, now: float) -> codec.WireMessage:
    """A stored message with its expiry counted down by the time it spent on disk."""
    if message.expiry_ms is None:
        return message
    left = max(0, message.expiry_ms - int((now - saved_at) * 1000))
    return codec.WireMessage(
        message.topic,
        message.payload,
        message.qos,
        message.retain,
        message.properties,
        message.origin_node,
        message.publisher_client_id,
        message.seq,
        left,
    )


class Store:
    """The interface the core and the cluster write through (the memory store's no-ops)."""

    durable = False
    # Whether set_will writes anything (a disk): the wills of connected clients are kept
    # only where they outlive the process.
    keeps_wills = False
    errors = 0
    commits = 0
    congested = False
    # Every delivery key up to this one is on disk (deliveries are keyed in order).
    committed_key = 1 << 62
    # ... and with the backup node (broker.replica.ReplicatedStore; no backup here).
    replicated_key = 1 << 62

    def __init__(self) -> None:
        # Bumped by every operation: the connection compares it around a publish to learn
        # whether the message created durable work (then its PUBACK waits for the commit).
        self.generation = 0
        # Publishers paused while the writer is behind (see congested).
        self.waiting: set[Any] = set()

    def load(self) -> StoredState:
        return StoredState()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    async def close(self) -> None:
        pass

    def after_commit(self, callback: Callable[[], None]) -> None:
        callback()

    def after_local_commit(self, callback: Callable[[], None]) -> None:
        """After this node's own commit only (not a backup's: broker.replica)."""
        self.after_commit(callback)

    def after_acknowledged(self, callback: Callable[[], None], key: object = None) -> None:
        """For a client's PUBACK, PUBREC or PUBCOMP: after the commit, and (broker.replica)
        once the peers its message went to have it, after the earlier ones of ``key`` (its
        connection)."""
        self.after_commit(callback)

    def pending(self) -> bool:
        return False

    def status(self) -> dict[str, Any]:
        return {"mode": "memory"}

    # Operations (all no-ops here).
    def set_meta(self, key: str, value: bytes) -> None:
        pass

    def save_session(self, record: codec.SessionRecord) -> None:
        pass

    def delete_session(self, client_id: str) -> None:
        pass

    def add_incoming(self, client_id: str, packet_id: int) -> None:
        pass

    def remove_incoming(self, client_id: str, packet_id: int) -> None:
        pass

    def add_delivery(self, client_id: str, key: int, record: codec.DeliveryRecord) -> None:
        pass

    def update_delivery(
        self, client_id: str, key: int, packet_id: int, inflight: bool, released: bool
    ) -> None:
        pass

    def remove_delivery(self, client_id: str, key: int, message_id: str) -> None:
        pass

    def set_retained(
        self, topic: str, message: codec.WireMessage | None, changed_at: float
    ) -> None:
        pass

    def add_outbox(self, peer: str, seq: int, data: bytes) -> None:
        pass

    def ack_outbox(self, peer: str, seq: int) -> None:
        pass

    def drop_outbox(self, peer: str, seqs: Iterable[int]) -> None:
        pass

    def set_route(self, peer: str, topic_filter: str, present: bool) -> None:
        pass

    def clear_routes(self, peer: str) -> None:
        pass

    def set_state(
        self, key: bytes, value: bytes | None, expires_at: float | None, version: codec.Version
    ) -> None:
        pass

    def set_will(self, client_id: str, data: bytes) -> None:
        pass

    def clear_will(self, client_id: str) -> None:
        pass


class MemoryStore(Store):
    """``mode = "memory"``: nothing is written; every callback runs at once."""


class DiskStore(Store):
    """SQLite in WAL mode, written by one thread, one transaction per loop turn."""

    durable = True
    keeps_wills = True

    def __init__(self, config: StoreConfig) -> None:
        super().__init__()
        assert config.path is not None
        self.path = Path(config.path)
        self.synchronous = config.synchronous
        self.max_pending_bytes = config.max_pending_bytes
        self._ops: list[Operation] = []
        self._callbacks: list[Callable[[], None]] = []
        self.committed_key = 0
        # The highest delivery key among the operations not yet handed to the writer.
        self._batch_key = 0
        self._pending_bytes = 0
        self._in_flight = False
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.Queue[
            tuple[list[Operation], list[Callable[[], None]], int, int] | None
        ] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        # Reference counts of stored messages, by id, from the deliveries that name them.
        self._references: dict[str, int] = {}
        self.errors = 0
        self.commits = 0
        self.operations = 0
        self.largest_batch = 0
        self.last_error: str | None = None
        self._last_slow_warning = 0.0
        self._connection = self._open()

    # --- opening and loading ----------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fresh = not self.path.exists()
            if fresh:
                # Created 0600: it holds messages and session state.
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            connection = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=5.0
            )
            mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: WAL mode not available (journal_mode={mode})")
            connection.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            connection.executescript(SCHEMA)
            row = connection.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                connection.execute(
                    "INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION).encode(),)
                )
            elif bytes(row[0]) != str(SCHEMA_VERSION).encode():
                raise StoreError(
                    f"{self.path}: schema version {bytes(row[0]).decode()} is not "
                    f"{SCHEMA_VERSION}; move the file away to start empty"
                )
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {error}") from None
        except OSError as error:
            raise StoreError(f"{self.path}: {error.strerror or error}") from None
        return connection

    def load(self) -> StoredState:
        """Read everything back (at start, before the loop serves anyone)."""
        connection = self._connection
        now = time.time()
        state = StoredState()
        for key, value in connection.execute("SELECT key, value FROM meta"):
            state.meta[key] = bytes(value)
        messages: dict[str, codec.WireMessage] = {}
        for message_id, record, saved_at in connection.execute(
            "SELECT id, record, saved_at FROM messages"
        ):
            messages[message_id] = _aged(codec.decode_message(bytes(record)), saved_at, now)
        incoming: dict[str, list[int]] = {}
        for client_id, packet_id in connection.execute(
            "SELECT client_id, packet_id FROM incoming ORDER BY client_id, packet_id"
        ):
            incoming.setdefault(client_id, []).append(packet_id)
        deliveries: dict[str, list[StoredDelivery]] = {}
        orphans: list[tuple[str, int]] = []
        for client_id, key, message_id, flags, packet_id, identifiers in connection.execute(
            "SELECT client_id, key, message, flags, packet_id, identifiers FROM deliveries "
            "ORDER BY client_id, key"
        ):
            message = messages.get(message_id)
            if message is None:
                orphans.append((client_id, key))
                continue
            self._references[message_id] = self._references.get(message_id, 0) + 1
            record = codec.DeliveryRecord(
                message,
                flags & _QOS_MASK,
                bool(flags & _RETAIN),
                tuple(int(part) for part in identifiers.split(",")) if identifiers else (),
                packet_id,
                bool(flags & _INFLIGHT),
                bool(flags & _RELEASED),
            )
            deliveries.setdefault(client_id, []).append(StoredDelivery(key, record))
        for client_id, record in connection.execute("SELECT client_id, record FROM sessions"):
            session = codec.decode_session(bytes(record))
            state.sessions.append(
                StoredSession(session, incoming.get(client_id, []), deliveries.pop(client_id, []))
            )
        # Deliveries of a session that is gone and messages nobody references: a crash
        # between two statements cannot leave them (one transaction per batch), but an older
        # file might; they are removed rather than kept forever.
        unreferenced = [m for m in messages if m not in self._references]
        for client_id in deliveries:
            self._ops.append(("DELETE FROM deliveries WHERE client_id=?", (client_id,)))
        for client_id, key in orphans:
            self._ops.append(
                ("DELETE FROM deliveries WHERE client_id=? AND key=?", (client_id, key))
            )
        for message_id in unreferenced:
            self._ops.append(("DELETE FROM messages WHERE id=?", (message_id,)))
        for topic, record, changed_at, saved_at in connection.execute(
            "SELECT topic, record, changed_at, saved_at FROM retained"
        ):
            message = _aged(codec.decode_message(bytes(record)), saved_at, now)
            state.retained.append((topic, message, changed_at))
        for peer, seq, frame in connection.execute(
            "SELECT peer, seq, frame FROM outbox ORDER BY peer, seq"
        ):
            state.outbox.setdefault(peer, []).append((seq, bytes(frame)))
        for peer, topic_filter in connection.execute("SELECT peer, filter FROM routes"):
            state.routes.setdefault(peer, set()).add(topic_filter)
        for key, value, expires_at, counter, node in connection.execute(
            "SELECT key, value, expires_at, counter, node FROM state"
        ):
            state.state[bytes(key)] = (
                bytes(value),
                expires_at or None,
                codec.Version(counter, node),
            )
        for client_id, will in connection.execute("SELECT client_id, will FROM wills"):
            state.wills[client_id] = bytes(will)
        return state

    # --- the writer -------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._thread.start()
        if self._ops:
            self._schedule()

    async def close(self) -> None:
        """Write what is queued, stop the thread, close the file."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            deadline = time.monotonic() + 10
            while (self._ops or self._in_flight) and time.monotonic() < deadline:
                if not self._in_flight:
                    self._flush()
                await asyncio.sleep(0.01)
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)
        self._connection.close()

    def _schedule(self) -> None:
        if not self._flush_scheduled and self._loop is not None and not self._in_flight:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._in_flight:
            return  # the batch being written comes back through _committed
        if not self._ops:
            callbacks, self._callbacks = self._callbacks, []
            for callback in callbacks:
                _run(callback)
            return
        ops, self._ops = self._ops, []
        callbacks, self._callbacks = self._callbacks, []
        self._pending_bytes = 0
        key, self._batch_key = self._batch_key, 0
        self._in_flight = True
        self.largest_batch = max(self.largest_batch, len(ops))
        self._queue.put((ops, callbacks, len(ops), key))

    def _write_loop(self) -> None:
        connection = self._connection
        loop = self._loop
        assert loop is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            ops, callbacks, _, key = item
            started = time.monotonic()
            error: str | None = None
            try:
                connection.execute("BEGIN")
                for statement, parameters in ops:
                    connection.execute(statement, parameters)
                connection.execute("COMMIT")
            except sqlite3.Error as failure:
                error = str(failure)
                try:
                    connection.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            elapsed = time.monotonic() - started
            try:
                loop.call_soon_threadsafe(self._committed, callbacks, len(ops), key, error, elapsed)
            except RuntimeError:
                return  # the loop is closed: the node is gone

    def _committed(
        self,
        callbacks: list[Callable[[], None]],
        count: int,
        key: int,
        error: str | None,
        elapsed: float,
    ) -> None:
        self._in_flight = False
        self.committed_key = max(self.committed_key, key)
        self.commits += 1
        self.operations += count
        if error is not None:
            self.errors += 1
            self.last_error = error
            logger.error(
                "store %s: a batch of %d writes failed and was rolled back: %s "
                "(the node keeps serving from memory; what the batch held is not on disk)",
                self.path,
                count,
                error,
            )
        elif elapsed > SLOW_COMMIT_SECONDS:
            now = time.monotonic()
            if now - self._last_slow_warning > 60:
                self._last_slow_warning = now
                logger.warning(
                    "store %s: a commit of %d writes took %.1fs (slow disk?)",
                    self.path,
                    count,
                    elapsed,
                )
        for callback in callbacks:
            _run(callback)
        if self.congested and self._pending_bytes < self.max_pending_bytes // 2:
            self.congested = False
            waiting, self.waiting = self.waiting, set()
            for publisher in waiting:
                publisher.store_released()
        if self._ops or self._callbacks:
            self._flush()

    def _add(self, statement: str, parameters: tuple[Any, ...], size: int = 0) -> None:
        self._ops.append((statement, parameters))
        self.generation += 1
        if size:
            self._pending_bytes += size
            if self._pending_bytes > self.max_pending_bytes and not self.congested:
                self.congested = True
                logger.warning(
                    "store %s: %d bytes wait for the disk (max_pending_bytes %d): publishers "
                    "are paused until it catches up",
                    self.path,
                    self._pending_bytes,
                    self.max_pending_bytes,
                )
        self._schedule()

    def after_commit(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)
        self._schedule()

    def pending(self) -> bool:
        return bool(self._ops) or self._in_flight

    def status(self) -> dict[str, Any]:
        return {
            "mode": "disk",
            "path": str(self.path),
            "synchronous": self.synchronous,
            "commits": self.commits,
            "operations": self.operations,
            "largest_batch": self.largest_batch,
            "pending_operations": len(self._ops),
            "pending_bytes": self._pending_bytes,
            "congested": self.congested,
            "errors": self.errors,
            "last_error": self.last_error,
            "messages": len(self._references),
        }

    # --- operations -------------------------------------------------------------------------

    def set_meta(self, key: str, value: bytes) -> None:
        self._add("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def save_session(self, record: codec.SessionRecord) -> None:
        data = codec.encode_session(record)
        self._add(
            "INSERT OR REPLACE INTO sessions VALUES (?, ?)", (record.client_id, data), len(data)
        )

    def delete_session(self, client_id: str) -> None:
        # Its deliveries were removed one by one by the caller (message references).
        self._add("DELETE FROM sessions WHERE client_id=?", (client_id,))
        self._add("DELETE FROM incoming WHERE client_id=?", (client_id,))

    def add_incoming(self, client_id: str, packet_id: int) -> None:
        self._add("INSERT OR IGNORE INTO incoming VALUES (?, ?)", (client_id, packet_id))

    def remove_incoming(self, client_id: str, packet_id: int) -> None:
        self._add("DELETE FROM incoming WHERE client_id=? AND packet_id=?", (client_id, packet_id))

    def add_delivery(self, client_id: str, key: int, record: codec.DeliveryRecord) -> None:
        message = record.message
        message_id = _message_id(message)
        references = self._references.get(message_id, 0)
        size = 0
        if not references:
            data = codec.encode_message(message)
            size = len(data)
            self._add(
                "INSERT OR REPLACE INTO messages VALUES (?, ?, ?)",
                (message_id, data, time.time()),
                size,
            )
        self._references[message_id] = references + 1
        flags = record.qos
        if record.retain:
            flags |= _RETAIN
        if record.inflight:
            flags |= _INFLIGHT
        if record.released:
            flags |= _RELEASED
        identifiers = ",".join(str(i) for i in record.subscription_identifiers)
        self._batch_key = max(self._batch_key, key)
        self._add(
            "INSERT OR REPLACE INTO deliveries VALUES (?, ?, ?, ?, ?, ?)",
            (client_id, key, message_id, flags, record.packet_id, identifiers),
            64,
        )

    def update_delivery(
        self, client_id: str, key: int, packet_id: int, inflight: bool, released: bool
    ) -> None:
        flags = (_INFLIGHT if inflight else 0) | (_RELEASED if released else 0)
        self._add(
            "UPDATE deliveries SET packet_id=?, flags=(flags & 7) | ? WHERE client_id=? AND key=?",
            (packet_id, flags, client_id, key),
        )

    def remove_delivery(self, client_id: str, key: int, message_id: str) -> None:
        self._add("DELETE FROM deliveries WHERE client_id=? AND key=?", (client_id, key))
        references = self._references.get(message_id, 0) - 1
        if references > 0:
            self._references[message_id] = references
        else:
            self._references.pop(message_id, None)
            self._add("DELETE FROM messages WHERE id=?", (message_id,))

    def set_retained(
        self, topic: str, message: codec.WireMessage | None, changed_at: float
    ) -> None:
        if message is None:
            self._add("DELETE FROM retained WHERE topic=?", (topic,))
            return
        data = codec.encode_message(message)
        self._add(
            "INSERT OR REPLACE INTO retained VALUES (?, ?, ?, ?)",
            (topic, data, changed_at, time.time()),
            len(data),
        )

    def add_outbox(self, peer: str, seq: int, data: bytes) -> None:
        self._add("INSERT OR REPLACE INTO outbox VALUES (?, ?, ?)", (peer, seq, data), len(data))

    def ack_outbox(self, peer: str, seq: int) -> None:
        self._add("DELETE FROM outbox WHERE peer=? AND seq<=?", (peer, seq))

    def drop_outbox(self, peer: str, seqs: Iterable[int]) -> None:
        for seq in seqs:
            self._add("DELETE FROM outbox WHERE peer=? AND seq=?", (peer, seq))

    def set_route(self, peer: str, topic_filter: str, present: bool) -> None:
        if present:
            self._add("INSERT OR IGNORE INTO routes VALUES (?, ?)", (peer, topic_filter))
        else:
            self._add("DELETE FROM routes WHERE peer=? AND filter=?", (peer, topic_filter))

    def clear_routes(self, peer: str) -> None:
        self._add("DELETE FROM routes WHERE peer=?", (peer,))

    def set_state(
        self, key: bytes, value: bytes | None, expires_at: float | None, version: codec.Version
    ) -> None:
        if value is None:
            self._add("DELETE FROM state WHERE key=?", (key,))
            return
        self._add(
            "INSERT OR REPLACE INTO state VALUES (?, ?, ?, ?, ?)",
            (key, value, expires_at or 0.0, version.counter, version.node),
            len(key) + len(value),
        )

    def set_will(self, client_id: str, data: bytes) -> None:
        self._add("INSERT OR REPLACE INTO wills VALUES (?, ?)", (client_id, data), len(data))

    def clear_will(self, client_id: str) -> None:
        self._add("DELETE FROM wills WHERE client_id=?", (client_id,))


def _run(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:
        logger.exception("store: an after-commit callback failed")


def open_store(config: StoreConfig) -> Store:
    """The store ``[store]`` asks for (a MemoryStore without a disk path)."""
    if config.mode == "disk" and config.path is not None:
        return DiskStore(config)
    return MemoryStore()
