"""The broker's small key-value state store, reached over MQTT (seed 003 "状態ストア").

Azure IoT Operations' state store protocol, as its documentation and SDKs describe it:

- A client PUBLISHes a request (MQTT 5, QoS 1) to :data:`STATE_STORE_REQUEST_TOPIC` with a
  Response Topic and Correlation Data. The payload is a RESP3 array of bulk strings:
  ``*3\\r\\n$3\\r\\nSET\\r\\n$3\\r\\nkey\\r\\n$5\\r\\nvalue\\r\\n``.
- The answer is published to the Response Topic with the same Correlation Data:
  ``SET key value [NX|NEX] [PX ms]`` -> ``+OK`` (``:-1`` when NX/NEX stopped it);
  ``GET key`` -> ``$N\\r\\nvalue`` or ``$-1``; ``DEL key`` -> ``:1`` / ``:0``;
  ``VDEL key value`` -> ``:1`` / ``:0`` (no key) / ``:-1`` (other value);
  ``KEYNOTIFY key [STOP]`` -> ``+OK``; errors are ``-ERR text``.
- After ``KEYNOTIFY key`` the client gets ``*4 NOTIFY SET VALUE value`` or
  ``*2 NOTIFY DELETE`` on ``clients/statestore/v1/<id>/{HEX(clientId)}/command/notify/
  {HEX(key)}`` (upper-case hex, as the SDKs build it) whenever another request changes it.

Authorization is per key (seed 003 stateStoreResources): Read covers GET and KEYNOTIFY,
Write covers SET, DEL and VDEL; a refused request is answered ``-ERR not authorized``. The
hook is the authorization's ``authorize_state_store(principal, access, key)`` when it has one
(:class:`broker.authz.PolicyAuthorization`); without it every key is open, as every topic is.

The store hooks into :class:`broker.core.Broker` as the handler of the request topic
(``broker.request_handlers``): requests are never routed to subscribers, and answers and
notifications go only to the requesting (or registered) client, and only when that client
has a subscription matching the topic. The RESP3 codec functions are pure.

Cluster-wide (issue 12: the same answer on every node): every write (SET, DEL, VDEL) gets a
version (the node's claim clock, :mod:`broker.registry`), is applied here, written to the
node's store, and sent to every peer as a reliable STATE frame (kept in the outbox for a
peer that is down). The answer to the writer goes out once the local store has committed it
and every peer that was up has applied it (its ACK), so a read on any node after the answer
sees the write. A node applies a write only if its version is newer than what it has for
the key (deletions leave a versioned tombstone), so concurrent writes to one key end with
the same value everywhere: the highest version wins. A node that starts without its store
(memory mode, a new node) gets every key and tombstone from each peer at link up, before it
joins (:meth:`StateStore.snapshot`, ``Cluster._send_state_store``), so the keys survive a
rolling restart in memory mode. KEYNOTIFY fires on the node where the
watcher is registered, for writes made on any node. NX/NEX and VDEL compare against this
node's copy: two writers racing on two nodes can both see their condition hold; the highest
version still wins everywhere. Expiry (PX) is a wall-clock deadline, so nodes agree on it
as far as their clocks do.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from broker.cluster_codec import StateWrite, Version
from broker.hooks import Principal
from broker.message import Message
from broker.mqtt import SHARED_SUBSCRIPTION_PREFIX, Properties, matches
from broker.session import Pending

if TYPE_CHECKING:
    from broker.cluster import Cluster
    from broker.core import Broker
    from broker.store import StoredState

__all__ = [
    "MAX_ARGUMENTS",
    "MAX_KEYS",
    "STATE_STORE_NOTIFY_PREFIX",
    "STATE_STORE_REQUEST_TOPIC",
    "RESPError",
    "StateStore",
    "StateStoreAccess",
    "decode_request",
    "encode_array",
    "encode_bulk",
    "notification_topic",
]

logger = logging.getLogger(__name__)

STATE_STORE_REQUEST_TOPIC: Final = (
    "statestore/v1/FA9AE35F-2F64-47CD-9BFF-08E2B32A0FE8/command/invoke"
)
STATE_STORE_NOTIFY_PREFIX: Final = "clients/statestore/v1/FA9AE35F-2F64-47CD-9BFF-08E2B32A0FE8"
# Response topics a request may not use (Azure's protocol reserves them).
FORBIDDEN_RESPONSE_PREFIXES: Final = (STATE_STORE_REQUEST_TOPIC, STATE_STORE_NOTIFY_PREFIX)
# The longest request is SET key value NEX PX ms: 6 items.
MAX_ARGUMENTS: Final = 8
# Bounded memory: a full store refuses new keys.
MAX_KEYS: Final = 100_000
# Versions of deleted keys remembered, so an older write arriving late does not revive them.
MAX_TOMBSTONES: Final = 100_000

OK: Final = b"+OK\r\n"
NOT_FOUND_BULK: Final = b"$-1\r\n"
NOT_APPLIED: Final = b":-1\r\n"
NOT_AUTHORIZED: Final = b"-ERR not authorized\r\n"

StateStoreAccess = Literal["Read", "Write"]
COMMAND_ACCESS: Final[dict[bytes, StateStoreAccess]] = {
    b"GET": "Read",
    b"KEYNOTIFY": "Read",
    b"SET": "Write",
    b"DEL": "Write",
    b"VDEL": "Write",
}


class RESPError(Exception):
    """A request payload that is not a RESP3 array of bulk strings."""


# --- RESP3 codec (pure) -------------------------------------------------------------------


def _read_line(data: bytes, offset: int) -> tuple[bytes, int]:
    end = data.find(b"\r\n", offset)
    if end == -1:
        raise RESPError("missing CRLF")
    return data[offset:end], end + 2


def _read_count(line: bytes, prefix: bytes) -> int:
    if not line.startswith(prefix) or not line[1:].isdigit() or len(line) > 12:
        raise RESPError(f"expected {prefix.decode()}<count>")
    return int(line[1:])


def decode_request(payload: bytes) -> list[bytes]:
    """``*N`` then N ``$len`` bulk strings, nothing after. Raises RESPError."""
    line, offset = _read_line(payload, 0)
    count = _read_count(line, b"*")
    if not 1 <= count <= MAX_ARGUMENTS:
        raise RESPError(f"array of {count} items")
    items: list[bytes] = []
    for _ in range(count):
        line, offset = _read_line(payload, offset)
        length = _read_count(line, b"$")
        end = offset + length
        if payload[end : end + 2] != b"\r\n":
            raise RESPError("bulk string length does not match")
        items.append(payload[offset:end])
        offset = end + 2
    if offset != len(payload):
        raise RESPError("trailing bytes after the array")
    return items


def encode_bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def encode_array(items: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(encode_bulk(item) for item in items)


def encode_number(number: int) -> bytes:
    return b":%d\r\n" % number


def encode_error(text: str) -> bytes:
    return b"-ERR " + text.encode() + b"\r\n"


def notification_topic(client_id: str, key: bytes) -> str:
    return (
        f"{STATE_STORE_NOTIFY_PREFIX}/{client_id.encode().hex().upper()}"
        f"/command/notify/{key.hex().upper()}"
    )


# --- the store ----------------------------------------------------------------------------


@dataclass(slots=True)
class Entry:
    value: bytes
    # Wall clock (the deadline travels to the other nodes).
    expires_at: float | None = None
    version: Version | None = None


class StateStore:
    """Keys and values, served on the request topic of each node, the same on every node."""

    def __init__(
        self,
        broker: Broker,
        clock: Callable[[], float] | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        self.broker = broker
        self.clock = clock if clock is not None else broker.wall_clock
        self.cluster = cluster
        self.entries: dict[bytes, Entry] = {}
        self.tombstones: OrderedDict[bytes, Version] = OrderedDict()
        self.watchers: dict[bytes, set[str]] = {}
        self.requests = 0
        self.denied = 0
        # Set while a request runs: the peers' seqs of the write it replicated.
        self._replicated: dict[str, int] | None = None
        if cluster is not None:
            cluster.state_handler = self.apply_remote
            cluster.state_snapshot = self.snapshot

    def restore(self, state: StoredState) -> None:
        now = self.clock()
        for key, (value, expires_at, version) in state.state.items():
            if expires_at is None or expires_at > now:
                self.entries[key] = Entry(value, expires_at, version)

    def install(self) -> None:
        self.broker.request_handlers[STATE_STORE_REQUEST_TOPIC] = self.handle

    # --- requests ---------------------------------------------------------------------------

    def handle(self, message: Message) -> int:
        """A PUBLISH to the request topic; returns 1 (the store took it)."""
        self.requests += 1
        client_id = message.publisher_client_id
        principal = self._principal(client_id)
        response_topic = message.properties.response_topic
        if principal is None or client_id is None:
            logger.info("state store request without a connected client dropped")
            return 1
        if not response_topic or response_topic.startswith(FORBIDDEN_RESPONSE_PREFIXES):
            logger.info(
                "state store request from client_id=%s dropped: %s",
                client_id,
                "no Response Topic" if not response_topic else "reserved Response Topic",
            )
            return 1
        self._replicated = None
        try:
            arguments = decode_request(message.payload)
            response = self.execute(principal, arguments)
        except RESPError as error:
            logger.info("state store request from client_id=%s: %s", client_id, error)
            response = encode_error("syntax error")
        replicated, self._replicated = self._replicated, None
        correlation = message.properties.correlation_data

        def answer() -> None:
            self._send(client_id, response_topic, response, correlation)

        if replicated is None:
            answer()
            return 1
        # A write: answered once it is on disk here and applied by every peer that was up.
        store = self.broker.store
        if self.cluster is not None:
            self.cluster.when_applied(replicated, lambda: store.after_commit(answer))
        else:
            store.after_commit(answer)
        return 1

    def execute(self, principal: Principal, arguments: list[bytes]) -> bytes:
        command = arguments[0].upper()
        access = COMMAND_ACCESS.get(command)
        if access is None:
            return encode_error("unknown command")
        if len(arguments) < 2 or not arguments[1]:
            return encode_error("wrong number of arguments")
        key = arguments[1]
        authorizer = getattr(self.broker.authorization, "authorize_state_store", None)
        if authorizer is not None and not authorizer(principal, access, key):
            self.denied += 1
            self.broker.counters.authorization_denied += 1
            logger.info(
                "state store %s denied: client_id=%s key=%r (no %s access)",
                command.decode(),
                principal.client_id,
                key,
                access,
            )
            return NOT_AUTHORIZED
        if command == b"GET":
            return self._get(arguments)
        if command == b"SET":
            return self._set(principal, arguments)
        if command == b"DEL":
            return self._delete(principal, arguments, None)
        if command == b"VDEL":
            if len(arguments) != 3:
                return encode_error("wrong number of arguments")
            return self._delete(principal, arguments, arguments[2])
        return self._keynotify(principal, arguments)

    def _entry(self, key: bytes) -> Entry | None:
        entry = self.entries.get(key)
        if entry is not None and entry.expires_at is not None and entry.expires_at <= self.clock():
            del self.entries[key]
            return None
        return entry

    def _get(self, arguments: list[bytes]) -> bytes:
        if len(arguments) != 2:
            return encode_error("wrong number of arguments")
        entry = self._entry(arguments[1])
        return NOT_FOUND_BULK if entry is None else encode_bulk(entry.value)

    def _set(self, principal: Principal, arguments: list[bytes]) -> bytes:
        if len(arguments) < 3:
            return encode_error("wrong number of arguments")
        key, value = arguments[1], arguments[2]
        condition: bytes | None = None
        expires_at: float | None = None
        options = [option.upper() for option in arguments[3:]]
        index = 0
        while index < len(options):
            option = options[index]
            if option in (b"NX", b"NEX") and condition is None:
                condition = option
            elif option == b"PX" and index + 1 < len(options) and options[index + 1].isdigit():
                expires_at = self.clock() + int(options[index + 1]) / 1000
                index += 1
            else:
                return encode_error("syntax error")
            index += 1
        existing = self._entry(key)
        if condition == b"NX" and existing is not None:
            return NOT_APPLIED
        if condition == b"NEX" and existing is not None and existing.value != value:
            return NOT_APPLIED
        if existing is None and len(self.entries) >= MAX_KEYS:
            return encode_error("state store full")
        self._write(key, value, expires_at)
        return OK

    def _delete(self, principal: Principal, arguments: list[bytes], value: bytes | None) -> bytes:
        if value is None and len(arguments) != 2:
            return encode_error("wrong number of arguments")
        key = arguments[1]
        entry = self._entry(key)
        if entry is None:
            return encode_number(0)
        if value is not None and entry.value != value:
            return NOT_APPLIED
        self._write(key, None, None)
        return encode_number(1)

    # --- replication --------------------------------------------------------------------------

    def _write(self, key: bytes, value: bytes | None, expires_at: float | None) -> None:
        """A local write: apply, store, replicate (the answer waits, see handle)."""
        version = self.broker.claim_version()
        self._apply(key, value, expires_at, version)
        cluster = self.cluster
        replicated: dict[str, int] = {}
        if cluster is not None:
            frame = StateWrite(version, key, value, expires_at)
            for peer in cluster.peers.values():
                seq = cluster.send_reliable(peer, frame)
                if peer.up:
                    replicated[peer.name] = seq
        self._replicated = replicated

    def snapshot(self) -> list[StateWrite]:
        """Every live key and every tombstone as a STATE write, for a node that starts
        without them (broker.cluster sends them at link up)."""
        now = self.clock()
        writes = [
            StateWrite(entry.version or Version(0, ""), key, entry.value, entry.expires_at)
            for key, entry in self.entries.items()
            if entry.expires_at is None or entry.expires_at > now
        ]
        writes.extend(
            StateWrite(version, key, None, None) for key, version in self.tombstones.items()
        )
        return writes

    def apply_remote(self, write: StateWrite) -> None:
        """A write made on another node (a STATE frame): applied if it is the newest."""
        entry = self.entries.get(write.key)
        known = entry.version if entry is not None else self.tombstones.get(write.key)
        if known is not None and write.version <= known:
            return
        self._apply(write.key, write.value, write.expires_at, write.version)

    def _apply(
        self, key: bytes, value: bytes | None, expires_at: float | None, version: Version
    ) -> None:
        self.broker.store.set_state(key, value, expires_at, version)
        if value is None:
            self.entries.pop(key, None)
            self.tombstones[key] = version
            self.tombstones.move_to_end(key)
            while len(self.tombstones) > MAX_TOMBSTONES:
                self.tombstones.popitem(last=False)
            self._notify(key, [b"NOTIFY", b"DELETE"])
            return
        self.tombstones.pop(key, None)
        self.entries[key] = Entry(value, expires_at, version)
        self._notify(key, [b"NOTIFY", b"SET", b"VALUE", value])

    def _keynotify(self, principal: Principal, arguments: list[bytes]) -> bytes:
        key = arguments[1]
        if len(arguments) == 3 and arguments[2].upper() == b"STOP":
            watchers = self.watchers.get(key)
            if watchers is not None:
                watchers.discard(principal.client_id)
                if not watchers:
                    del self.watchers[key]
            return OK
        if len(arguments) != 2:
            return encode_error("syntax error")
        self.watchers.setdefault(key, set()).add(principal.client_id)
        return OK

    # --- delivery ---------------------------------------------------------------------------

    def _principal(self, client_id: str | None) -> Principal | None:
        if client_id is None:
            return None
        session = self.broker.sessions.get(client_id)
        if session is None or session.connection is None:
            return None
        return session.connection.principal

    def _notify(self, key: bytes, items: list[bytes]) -> None:
        watchers = self.watchers.get(key)
        if not watchers:
            return
        payload = encode_array(items)
        authorizer = getattr(self.broker.authorization, "authorize_state_store", None)
        for client_id in sorted(watchers):
            principal = self._principal(client_id)
            if principal is None:
                continue
            # Read access is checked again: the policy may have changed since KEYNOTIFY.
            if authorizer is not None and not authorizer(principal, "Read", key):
                continue
            self._send(client_id, notification_topic(client_id, key), payload, None)

    def _send(
        self, client_id: str, topic: str, payload: bytes, correlation_data: bytes | None
    ) -> bool:
        """Deliver to ``client_id`` only, at the QoS of its best matching subscription."""
        broker = self.broker
        session = broker.sessions.get(client_id)
        if session is None or session.connection is None:
            return False
        qos = -1
        identifiers: list[int] = []
        for topic_filter, options in session.subscriptions.items():
            shared = topic_filter.startswith(SHARED_SUBSCRIPTION_PREFIX)
            if shared or not matches(topic_filter, topic):
                continue
            qos = max(qos, options.qos)
            if options.subscription_identifier is not None:
                identifiers.append(options.subscription_identifier)
        if qos < 0:
            logger.info(
                "state store answer for client_id=%s not sent: no subscription matches %s",
                client_id,
                topic,
            )
            return False
        message = Message(
            topic,
            payload,
            1,
            False,
            Properties(correlation_data=correlation_data),
            None,
            None,
            broker.node_name,
            broker.next_seq(),
        )
        broker.deliver_to_session(session, Pending(message, min(1, qos), False, tuple(identifiers)))
        return True
