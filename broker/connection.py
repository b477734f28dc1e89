"""One client connection's MQTT protocol handling (MQTT 3.1.1 and 5.0, server side).

:class:`ClientConnection` is sans-IO: it is fed bytes, decodes them with
:class:`broker.mqtt.MQTTDecoder`, drives the :class:`~broker.core.Broker` and its
:class:`~broker.session.Session`, and writes encoded packets through a small
:class:`ConnectionIO` the net layer implements (write, close, "is the write buffer full",
"arm the idle timer"). It owns what lives exactly as long as the network connection:

- CONNECT validation and CONNACK (5.0 section 3.1/3.2; 3.1.1 section 3.1/3.2): zero-length
  client ids, Server Keep Alive from ``max_keepalive``, session expiry, will checks,
  authorization, ``peer_cert_as_username``;
- topic aliases in both directions (5.0 section 3.3.2.3.4), the client's Maximum Packet Size
  (section 3.1.2.11.4: a packet that would exceed it is not sent) and Receive Maximum
  (section 4.9: outgoing QoS 1/2 in flight), our Receive Maximum for QoS 2 (0x93);
- QoS 1 and 2 flows both ways (section 4.3) with redelivery (DUP) on session resumption;
- protocol errors: 5.0 gets DISCONNECT with the reason code, then the connection closes;
- input pacing: at most ``PACKETS_PER_TURN`` packets are handled per call, and none while a
  subscriber session this connection published QoS 1/2 to is past its high-water mark
  (:mod:`broker.session`), a cluster peer it publishes to has too much unacknowledged, or
  the store's writer is behind; the net layer stops reading meanwhile (``pause_input``);
- issue 12: CONNECT claims the client id cluster-wide before CONNACK (the session may come
  from another node; input waits meanwhile); a PUBACK, PUBREC or PUBCOMP that promises
  durable work is sent once the store has committed it, and every acknowledgement after it
  waits its turn, so they stay in order (MQTT 5.0 section 4.6); a delivery to a durable
  session leaves only once it is stored (:mod:`broker.core`).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Callable
from typing import Any, NoReturn, Protocol, cast

from broker.config import ListenerConfig
from broker.core import Broker
from broker.hooks import ClaimOutcome, PeerIdentity, Principal
from broker.logline import log_line
from broker.message import Message
from broker.mqtt import (
    EMPTY_PROPERTIES,
    NEED_DATA,
    Auth,
    Connack,
    Connect,
    Disconnect,
    MQTTDecoder,
    MQTTProtocolError,
    Packet,
    Pingreq,
    Pingresp,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    connack_code_for,
    encode,
    parse_shared,
    publish_forward_parts,
    validate_topic_filter,
)
from broker.session import SESSION_NEVER_EXPIRES, Holder, Outgoing, Pending, Session
from broker.subscriptions import SubscriptionOptions

__all__ = ["ClientConnection", "ConnectionIO"]

logger = logging.getLogger(__name__)

MQTT_5 = 5
# MQTT 5.0 section 3.1.2.10: keep alive is a two byte integer.
KEEP_ALIVE_LIMIT = 65535
# MQTT 5.0 section 3.3.4: Receive Maximum defaults to 65,535 when absent.
DEFAULT_RECEIVE_MAXIMUM = 65535
# MQTT 5.0 section 3.1.2.10: the server closes after one and a half keep alive periods.
KEEP_ALIVE_FACTOR = 1.5
# Packets handled per data_received / handle_buffered call: the rest waits in the decoder for
# the next event-loop turn, so one flooding client cannot starve the others (mosquitto reads
# one packet per client per turn; 1,024 keeps fan-out batching: 64 cost QoS 0 fan-out 2.6x
# CPU per delivery, bench/README.md).
PACKETS_PER_TURN = 1024
#: A connection with this many acknowledgements waiting (for the store's commit, the backup,
#: the peers its messages went to: Store.after_acknowledged) is not read until half of them
#: have gone, so the waits stay bounded when the disk or a peer stops answering (a frozen
#: peer holds them until its link times out). A 5.0 client keeps within Receive Maximum
#: anyway; a 3.1.1 client has no such limit.
ACKS_WAITING_MAX = 1024
#: At most one log line per this many seconds for such pauses (each is counted).
ACKS_PAUSE_LOG_INTERVAL = 5.0
# The protocol levels' names in the "client connected" line.
PROTOCOL_NAMES = {3: "3.1", 4: "3.1.1", 5: "5.0"}
# MQTT 5.0 section 3.2.2.2: the reason codes a CONNACK may carry.
CONNACK_REASON_CODES = frozenset(
    {0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97}
    | {0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
)


class ConnectionIO(Protocol):
    """What the net layer provides to one connection."""

    def write(self, data: bytes) -> None: ...

    def close(self, linger: bool = True) -> None:
        """Close after what was written; ``linger``: read and drop what the client still
        sends for a while, so that it reads our last packet rather than a reset."""
        ...

    def admit(self) -> bool:
        """Take one of the listener's ``max_connections`` slots for this client (kept until
        the connection closes); False when none is left."""
        ...

    def write_congested(self) -> bool:
        """True while the transport's write buffer is above its high-water mark."""
        ...

    def set_idle_timeout(self, seconds: float | None) -> None:
        """Close-after-silence timer (keep alive); replaces the CONNECT deadline."""
        ...

    def pause_input(self) -> None:
        """Stop reading from the client (a subscriber it publishes to is behind)."""
        ...

    def resume_input(self) -> None:
        """Read again, and call ``handle_buffered`` for packets already received."""
        ...


class _ConnectionClosedError(Exception):
    """Raised inside packet handling to stop processing after a close."""


class ClientConnection:
    __slots__ = (
        "_acks_waiting",
        "_decoder",
        "_held_by",
        "_inbound_aliases",
        "_outbound_aliases",
        "_pump_scheduled",
        "_shared_by",
        "acks_held",
        "address_text",
        "broker",
        "clean_start",
        "client_id",
        "client_maximum_packet_size",
        "client_topic_alias_maximum",
        "close_reason",
        "connected_at",
        "identity",
        "input_paused",
        "io",
        "keep_alive",
        "listener",
        "principal",
        "problem_information",
        "protocol_level",
        "send_quota",
        "session",
        "state",
        "store_held",
        "username",
        "will",
        "will_delay",
        "will_expiry",
    )

    def __init__(
        self,
        broker: Broker,
        io: ConnectionIO,
        identity: PeerIdentity,
        listener: ListenerConfig,
    ) -> None:
        self.broker = broker
        self.io = io
        self.identity = identity
        host, port = identity.address
        # The client's address as every log line about it names it ([v6]:port).
        self.address_text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.listener = listener
        self._decoder = MQTTDecoder(max_packet_size=broker.settings.max_packet_size)
        self.state = "connecting"
        self.protocol_level = 0
        self.client_id = ""
        self.username: str | None = None
        self.principal: Principal | None = None
        self.session: Session | None = None
        self.clean_start = True
        self.keep_alive = 0
        self.connected_at = 0.0
        self.send_quota = DEFAULT_RECEIVE_MAXIMUM
        self.client_maximum_packet_size = 0
        self.client_topic_alias_maximum = 0
        self.problem_information = True
        # Topic aliases (5.0 section 3.3.2.3.4), made when the first is used: most clients
        # never use one, and two empty dicts are 128 bytes per device.
        self._inbound_aliases: dict[int, str] | None = None
        self._outbound_aliases: dict[str, int] | None = None
        self.will: Message | None = None
        self.will_delay = 0
        # The will's Message Expiry Interval starts when it is published.
        self.will_expiry: int | None = None
        self.close_reason = ""
        # Backpressure: the subscriber sessions this connection waits on; input is paused
        # while there is any (pause_input/resume_input are called once per transition).
        # Made when first used (held_by): an empty set is 216 bytes per device.
        self._held_by: set[Holder] | None = None
        # The holders that resumed it with a share it has not used up (HeldPublishers): a
        # share left by a closed connection would keep its holder's next round waiting.
        self._shared_by: set[Holder] | None = None
        self.input_paused = False
        # Paused while the store's writer is behind (Store.congested).
        self.store_held = False
        # Acknowledgements waiting for a store commit: later ones queue behind them.
        self._acks_waiting = 0
        # Paused with ACKS_WAITING_MAX of them waiting.
        self.acks_held = False
        # A _pump is already asked for after the next commit (durable deliveries).
        self._pump_scheduled = False
        broker.connections.add(self)

    # --- properties for logs and the admin API ----------------------------------------------

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    @property
    def connection_id(self) -> str:
        """The id lb sent (PP2_TYPE_UNIQUE_ID, its %ID) or the listener made: in every log
        line about this connection, so that lb's and the brokers' lines can be matched."""
        return self.identity.connection_id

    @property
    def v5(self) -> bool:
        return self.protocol_level >= MQTT_5

    # --- input from the net layer -----------------------------------------------------------

    def data_received(self, data: bytes) -> bool:
        """Feed bytes and handle packets; True when more may wait (see handle_buffered)."""
        if self.state == "closed":
            return False
        self.broker.counters.bytes_received += len(data)
        self._decoder.feed(data)
        return self.handle_buffered()

    def handle_buffered(self) -> bool:
        """Handle up to PACKETS_PER_TURN received packets.

        True when the budget ran out with bytes still buffered: the net layer calls again on
        the next loop turn. False when they are all handled, the connection closed, or input
        is paused (``resume_input`` will ask for the rest).
        """
        budget = PACKETS_PER_TURN
        decoder = self._decoder
        try:
            while self.state != "closed" and not self.input_paused:
                if not budget:
                    return True
                try:
                    packet = decoder.next_event()
                except MQTTProtocolError as error:
                    self._protocol_error(error)
                    return False
                if packet is NEED_DATA:
                    return False
                budget -= 1
                self._handle(packet)
        except _ConnectionClosedError:
            pass
        return False

    def writable(self) -> None:
        """The transport's write buffer drained below the low-water mark."""
        if self.state == "connected":
            try:
                self._pump()
            except _ConnectionClosedError:
                pass

    def timed_out(self) -> None:
        """The CONNECT deadline or the keep alive (1.5x) passed without a packet."""
        if self.state == "claiming":
            logger.info(
                "connection closed: client_id=%s address=%s: its client id was not settled "
                "within %gs",
                self.client_id,
                self.address_text,
                self.broker.settings.connect_timeout,
            )
            self._finish("client id claim not settled in time", send_will=False)
        elif self.state == "connecting":
            logger.info(
                "connection closed: address=%s connection_id=%s: no CONNECT within %gs",
                self.address_text,
                self.connection_id,
                self.broker.settings.connect_timeout,
            )
            self._finish("no CONNECT in time", send_will=False)
        elif self.state == "connected":
            self.broker.counters.keepalive_timeouts += 1
            self._send_disconnect(ReasonCode.KEEP_ALIVE_TIMEOUT)
            self._finish(f"keepalive timeout ({self.keep_alive}s x 1.5)", send_will=True)

    def connection_lost(self, error: str | None = None) -> None:
        if self.state != "closed":
            self._finish(error or "connection closed by client", send_will=True, close=False)

    # --- commands from the core -------------------------------------------------------------

    def take_over(self) -> None:
        """Another connection with the same client id arrived (here or on another node)."""
        self._send_disconnect(ReasonCode.SESSION_TAKEN_OVER)
        self._finish("session taken over", send_will=True)

    def disconnect(self, reason_code: int, reason: str, send_will: bool = True) -> None:
        """Close the connection from the server's side (5.0: DISCONNECT ``reason_code``);
        its will is due unless ``send_will`` is False (broker.partition: another node
        publishes it)."""
        self._send_disconnect(reason_code, reason)
        self._finish(reason, send_will=send_will)

    def deliver(self, pending: Pending, counted: bool = True) -> None:
        """Route a message to this connection: send now, or queue for later (bounded; without
        ``counted``, by bytes only: see Session.enqueue)."""
        session = self.session
        assert session is not None
        if pending.qos == 0:
            if session.queue or self.io.write_congested():
                if not session.enqueue(pending, self.broker.settings.max_queued_bytes):
                    self.broker.counters.messages_dropped_queue_full += 1
                return
            self._send_publish(pending, None, dup=False)
            return
        if session.queue or self.io.write_congested() or len(session.inflight) >= self.send_quota:
            if not session.enqueue(pending, self.broker.settings.max_queued_bytes, counted):
                self.broker.dropped(session, pending)
            return
        self._send_inflight(session, pending, queued=False)

    def pump_after_commit(self, replicated: bool = False) -> None:
        """Durable deliveries were queued: send them once the store has them (and, with
        ``replicated``, the backup node too: broker.replica)."""
        if not self._pump_scheduled:
            self._pump_scheduled = True
            store = self.broker.store
            if replicated:
                store.after_commit(self._pump_committed)
            else:
                store.after_local_commit(self._pump_committed)

    def _pump_committed(self) -> None:
        self._pump_scheduled = False
        if self.state == "connected":
            try:
                self._pump()
            except _ConnectionClosedError:
                pass

    # --- backpressure (broker.session has the marks) ----------------------------------------

    @property
    def held_by(self) -> set[Holder]:
        held_by = self._held_by
        if held_by is None:
            held_by = self._held_by = set()
        return held_by

    def hold_for(self, session: Holder, peer: bool = False) -> None:
        """This connection routed QoS 1/2 to ``session``, whose queue passed high water (or
        to a cluster peer, ``peer``, with too much unacknowledged)."""
        if self.state == "closed" or session in self.held_by:
            return
        subscriber = session.connection
        if not peer and (subscriber is None or self._waited_on_by(subscriber)):
            # Pausing would wait on ourselves (we subscribe to what we publish, or a chain of
            # paused publishers leads back here, so nobody would read the PUBACKs that drain
            # the queue): not paced; the queue's bound still holds, overflow is dropped.
            self.broker.counters.backpressure_cycles_skipped += 1
            return
        self.held_by.add(session)
        session.held_publishers.add(self)  # forgets its share there, if any
        if self._shared_by is not None:
            self._shared_by.discard(session)
        self._pause_input()

    def session_released(self, session: Holder, share: int = 0) -> None:
        """``session`` drained to low water, went offline or ended; resume when none is left."""
        self.held_by.discard(session)
        if share:
            if self._shared_by is None:
                self._shared_by = set()
            self._shared_by.add(session)
        self._resume_if_free()

    def _waited_on_by(self, subscriber: ClientConnection) -> bool:
        """True when ``subscriber`` is this connection or waits on it through held publishers."""
        stack = [subscriber]
        seen: set[ClientConnection] = set()
        while stack:
            connection = stack.pop()
            if connection is self:
                return True
            if connection in seen:
                continue
            seen.add(connection)
            for session in connection.held_by:
                if session.connection is not None:
                    stack.append(session.connection)
        return False

    def _release_holds(self) -> None:
        """Closing: leave every session's waiting set and shares (a share would otherwise keep
        the session's next round waiting until its queue is empty); no resume_input for a
        closed input."""
        for session in self.held_by:
            session.held_publishers.discard(self)
        self.held_by.clear()
        shared_by = self._shared_by
        if shared_by is not None:
            self._shared_by = None
            for session in shared_by:
                session.held_publishers.discard(self)
        if self.input_paused:
            self.input_paused = False
            self.broker.counters.publishers_paused_current -= 1
        if self.store_held:
            self.store_held = False
            self.broker.store.waiting.discard(self)
        self.acks_held = False

    def _hold_for_acks(self) -> None:
        """ACKS_WAITING_MAX acknowledgements wait: read nothing more until half have gone."""
        if self.state == "closed":
            return
        self.acks_held = True
        broker = self.broker
        broker.counters.publishers_paused_acks += 1
        self._pause_input()
        now = broker.clock()
        if now - broker.acks_pause_logged >= ACKS_PAUSE_LOG_INTERVAL:
            broker.acks_pause_logged = now
            logger.warning(
                "client_id=%s address=%s: %d acknowledgements wait (for the disk, the backup "
                "or a peer that is not answering): not read until half have gone (%d such "
                "pauses in all)",
                self.client_id,
                self.address_text,
                self._acks_waiting,
                broker.counters.publishers_paused_acks,
            )

    def _ack_done(self) -> None:
        self._acks_waiting -= 1
        if self.acks_held and self._acks_waiting <= ACKS_WAITING_MAX // 2:
            self.acks_held = False
            self._resume_if_free()

    def _pause_input(self) -> None:
        """Read nothing more (a session's queue, the store or the acknowledgements hold
        this connection); _resume_if_free undoes it when none holds it any more."""
        if not self.input_paused:
            self.input_paused = True
            counters = self.broker.counters
            counters.publishers_paused += 1
            counters.publishers_paused_current += 1
            self.io.pause_input()

    def _resume_if_free(self) -> None:
        """Resume reading once nothing holds this connection any more."""
        if self.input_paused and not self._held_by and not self.store_held and not self.acks_held:
            self.input_paused = False
            self.broker.counters.publishers_paused_current -= 1
            if self.state != "closed":
                self.io.resume_input()

    def _hold_for_store(self) -> None:
        """The store's writer is behind: read nothing more until it catches up."""
        if self.state == "closed" or self.store_held:
            return
        self.store_held = True
        self.broker.store.waiting.add(self)
        self._pause_input()

    def store_released(self) -> None:
        self.store_held = False
        self._resume_if_free()

    # --- acknowledgements after the store committed --------------------------------------

    def _ack(self, data: bytes, wait: bool) -> None:
        """Write an acknowledgement now, or (``wait``, or one is already waiting) once the
        store has committed everything queued so far, and the peers have the messages sent
        to them (Store.after_acknowledged): they stay in order."""
        if wait or self._acks_waiting:
            self._acks_waiting += 1
            self.broker.counters.acks_after_commit += 1
            self.broker.store.after_acknowledged(lambda: self._ack_committed(data), self)
            if self._acks_waiting >= ACKS_WAITING_MAX and not self.acks_held:
                self._hold_for_acks()
            return
        self.broker.counters.bytes_sent += len(data)
        self.io.write(data)

    def _ack_committed(self, data: bytes) -> None:
        self._ack_done()
        if self.state != "closed":
            self.broker.counters.bytes_sent += len(data)
            self.io.write(data)

    # --- closing ----------------------------------------------------------------------------

    def _finish(
        self, reason: str, send_will: bool, close: bool = True, linger: bool = True
    ) -> None:
        if self.state == "closed":
            return
        was_connected = self.state == "connected"
        self.state = "closed"
        self.close_reason = reason
        broker = self.broker
        broker.connections.discard(self)
        if self._held_by or self._shared_by or self.input_paused or self.store_held:
            self._release_holds()
        if close:
            self.io.close(linger)
        if was_connected:
            will = self.will if send_will else None
            broker.detach(self, will, self.will_delay, self.will_expiry, self.principal)
            level = logging.DEBUG if self.identity.health_check else logging.INFO
            if logger.isEnabledFor(level):
                duration = broker.clock() - self.connected_at
                log_line(
                    logger,
                    level,
                    f"client disconnected: client_id={self.client_id} "
                    f"address={self.address_text} connection_id={self.connection_id} "
                    f"reason={reason} duration={duration:.1f}s",
                )
        self.will = None

    def _send_disconnect(self, reason_code: int, reason: str | None = None) -> None:
        if self.state == "connected" and self.v5:
            properties = EMPTY_PROPERTIES
            if reason and self.problem_information:
                properties = Properties(reason_string=reason)
            self._send(Disconnect(reason_code, properties))

    def _protocol_error(self, error: MQTTProtocolError) -> None:
        counters = self.broker.counters
        reason_code = error.reason_code
        if reason_code == ReasonCode.MALFORMED_PACKET:
            counters.malformed_packets += 1
        else:
            counters.protocol_errors += 1
        logger.warning(
            "%s from %s (client_id=%s connection_id=%s): %s",
            "malformed packet" if reason_code == ReasonCode.MALFORMED_PACKET else "protocol error",
            self.address_text,
            self.client_id or "-",
            self.connection_id,
            error,
        )
        if self.state == "connecting":
            level = error.protocol_level
            if reason_code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
                # 3.1.1 section 3.1.2.2: CONNACK 0x01; 5.0: CONNACK 0x84. Unknown levels get
                # the 3.1.1 form, which every version of the protocol can read.
                answer_level = MQTT_5 if level == MQTT_5 else 4
                self.io.write(
                    encode(
                        Connack(False, connack_code_for(answer_level, reason_code)),
                        answer_level,
                    )
                )
            elif level == MQTT_5 and reason_code in CONNACK_REASON_CODES:
                self.io.write(encode(Connack(False, reason_code), MQTT_5))
            elif level in (3, 4) and reason_code == ReasonCode.CLIENT_IDENTIFIER_NOT_VALID:
                self.io.write(encode(Connack(False, connack_code_for(level, reason_code)), level))
            self._finish(f"bad CONNECT: {error}", send_will=False)
            return
        self._send_disconnect(reason_code, str(error))
        self._finish(f"protocol error: {error}", send_will=True)

    def _violation(self, reason_code: ReasonCode, message: str) -> NoReturn:
        self._protocol_error(MQTTProtocolError(reason_code, message, self.protocol_level))
        raise _ConnectionClosedError

    # --- output -----------------------------------------------------------------------------

    def _send(self, packet: Packet) -> bool:
        """Encode and write; False when the packet would exceed the client's maximum size."""
        data = encode(packet, self.protocol_level or 4)
        limit = self.client_maximum_packet_size
        if limit and len(data) > limit:
            # 5.0 section 3.1.2.11.4: drop reason string and user properties first, and never
            # send a packet bigger than the client accepts.
            properties = getattr(packet, "properties", None)
            if isinstance(properties, Properties) and not isinstance(packet, Publish):
                stripped = dataclasses.replace(properties, reason_string=None, user_properties=())
                smaller = cast(Packet, dataclasses.replace(cast(Any, packet), properties=stripped))
                data = encode(smaller, self.protocol_level)
            if len(data) > limit:
                return False
        self.broker.counters.bytes_sent += len(data)
        self.io.write(data)
        return True

    def _ack_properties(self, reason: str | None) -> Properties:
        if reason is None or not self.v5 or not self.problem_information:
            return EMPTY_PROPERTIES
        return Properties(reason_string=reason)

    def _send_inflight(self, session: Session, pending: Pending, queued: bool) -> None:
        """Send a QoS 1/2 delivery with a packet id; ``queued``: it comes from the queue
        (its bytes are counted already)."""
        packet_id = pending.packet_id
        if packet_id:
            # Given when it was stored (a durable QoS 2 delivery): on disk already.
            reserved = session.reserved
            if reserved is not None:
                reserved.discard(packet_id)
        else:
            allocated = session.allocate_packet_id()
            if allocated is None:
                if queued:
                    session.queue.appendleft(pending)
                elif not session.enqueue(pending, self.broker.settings.max_queued_bytes):
                    self.broker.dropped(session, pending)
                return
            packet_id = allocated
        if self._send_publish(pending, packet_id, dup=False):
            session.inflight[packet_id] = Outgoing(packet_id, pending)
            if not queued:
                session.add_bytes(len(pending.message.payload))
        else:
            if queued:
                session.remove_bytes(len(pending.message.payload))
            if pending.key:
                self.broker.unstore_pending(session, pending)

    def _inflight_done(self, session: Session, outgoing: Outgoing) -> None:
        """PUBACK, PUBCOMP or a failed PUBREC: the delivery is over."""
        del session.inflight[outgoing.packet_id]
        pending = outgoing.pending
        session.remove_bytes(len(pending.message.payload))
        if pending.key:
            self.broker.unstore_pending(session, pending)

    def _send_publish(self, pending: Pending, packet_id: int | None, dup: bool) -> bool:
        """Send one PUBLISH; False when it was not sent (expired or too large)."""
        broker = self.broker
        message = pending.message
        if (
            packet_id is None
            and not message.qos
            and not pending.subscription_identifiers
            and self._forward_raw(message, pending.retain)
        ):
            return True
        now = broker.clock()
        if message.is_expired(now) and not dup:
            broker.counters.messages_expired += 1
            return False
        if not dup and self._send_shared_publish(pending, message, packet_id):
            return True
        topic = message.topic
        properties = message.properties
        if self.v5:
            alias: int | None = None
            new_alias = False
            if self.client_topic_alias_maximum:
                aliases = self._outbound_aliases
                if aliases is None:
                    aliases = self._outbound_aliases = {}
                alias = aliases.get(topic)
                if alias is None and len(aliases) < self.client_topic_alias_maximum:
                    alias = len(aliases) + 1
                    aliases[topic] = alias
                    new_alias = True
            properties = dataclasses.replace(
                properties,
                message_expiry_interval=message.remaining_expiry(now),
                subscription_identifiers=pending.subscription_identifiers,
                topic_alias=alias,
            )
            send_topic = "" if alias is not None and not new_alias else topic
        else:
            send_topic = topic
            new_alias = False
        packet = Publish(
            send_topic,
            message.payload,
            pending.qos,
            pending.retain,
            dup,
            packet_id,
            properties,
        )
        if not self._send(packet):
            if new_alias and self._outbound_aliases is not None:
                del self._outbound_aliases[topic]
            broker.counters.messages_dropped_too_large += 1
            logger.debug(
                "message to client_id=%s connection_id=%s dropped: larger than its Maximum "
                "Packet Size %d",
                self.client_id,
                self.connection_id,
                self.client_maximum_packet_size,
            )
            return False
        broker.counters.messages_sent += 1
        return True

    def _send_shared_publish(
        self, pending: Pending, message: Message, packet_id: int | None
    ) -> bool:
        """Send a PUBLISH whose bytes every subscriber shares; False to take the slow path.

        Fan-out: a message is encoded once per (protocol level, QoS, RETAIN) and the bytes are
        reused for every subscriber; only the packet identifier is spliced in at QoS > 0.
        Not for what differs per subscriber: 5.0 topic aliases, subscription identifiers,
        a counting-down Message Expiry Interval (bench/README.md has the effect).
        """
        if self.v5:
            properties = message.properties
            if (
                self.client_topic_alias_maximum
                or pending.subscription_identifiers
                or message.expires_at is not None
                or properties.topic_alias is not None
                or properties.subscription_identifiers
                or properties.message_expiry_interval is not None
            ):
                return False
        broker = self.broker
        qos = pending.qos
        if broker.publish_memo_message is not message:
            broker.publish_memo_message = message
            broker.publish_memo.clear()
        key = (self.protocol_level, qos, pending.retain)
        parts = broker.publish_memo.get(key)
        raw = message.raw
        if (
            parts is None
            and raw is not None
            and qos == message.qos
            and self._takes_raw(message.raw_level)
        ):
            # The received PUBLISH at its own QoS: DUP and RETAIN set as this delivery needs
            # them, the packet identifier spliced in below; no encode.
            parts = publish_forward_parts(raw, pending.retain)
            broker.publish_memo[key] = parts
        if parts is None:
            data = encode(
                Publish(
                    message.topic,
                    message.payload,
                    qos,
                    pending.retain,
                    False,
                    1 if qos else None,
                    message.properties,
                ),
                self.protocol_level,
            )
            if qos:
                # Fixed header (type byte + Remaining Length), then the topic name; the
                # packet identifier follows it (section 3.3.2).
                index = 1
                while data[index] & 0x80:
                    index += 1
                split = index + 1 + 2 + len(message.topic.encode())
                parts = (data[:split], data[split + 2 :])
            else:
                parts = (data, b"")
            broker.publish_memo[key] = parts
        head, tail = parts
        data = head if packet_id is None else b"".join((head, packet_id.to_bytes(2, "big"), tail))
        limit = self.client_maximum_packet_size
        if limit and len(data) > limit:
            return False
        counters = broker.counters
        counters.bytes_sent += len(data)
        self.io.write(data)
        counters.messages_sent += 1
        return True

    def forward(self, message: Message, retain: bool) -> bool:
        """The core's shortcut for a QoS 0 message delivered at QoS 0 with no subscription
        identifier (Broker.deliver_local): its received bytes written now, without a
        Pending. False when it has to take deliver(): something is queued or the transport
        is full, or the bytes are not this subscriber's PUBLISH."""
        session = self.session
        if session is None or session.queue or self.io.write_congested():
            return False
        return self._forward_raw(message, retain)

    def _forward_raw(self, message: Message, retain: bool) -> bool:
        """Write a QoS 0 message's received PUBLISH (Message.raw: no properties, no expiry)
        as the QoS 0 delivery with RETAIN ``retain``, when those bytes are exactly that
        delivery here; False otherwise (nothing written)."""
        raw = message.raw
        if raw is None or retain != message.retain or not self._takes_raw(message.raw_level):
            return False
        limit = self.client_maximum_packet_size
        if limit and len(raw) > limit:
            return False  # the slow path counts the drop
        counters = self.broker.counters
        counters.bytes_sent += len(raw)
        self.io.write(raw)
        counters.messages_sent += 1
        return True

    def _takes_raw(self, raw_level: int) -> bool:
        """Whether a PUBLISH received at ``raw_level`` is byte for byte the one to send here
        (Message.raw): the same PUBLISH encoding (3.1 and 3.1.1 share one), and in 5.0 only
        while we give this client no topic aliases (section 3.3.2.3.4: the publisher's own
        alias never reaches a subscriber; Message.raw has none)."""
        level = self.protocol_level
        if level >= MQTT_5:
            return raw_level >= MQTT_5 and not self.client_topic_alias_maximum
        return raw_level < MQTT_5

    def _pump(self) -> None:
        """Send queued messages while the transport and the client's quota allow."""
        session = self.session
        if session is None or session.idle:  # idle: without making an empty queue
            return
        queue = session.queue
        now = self.broker.clock()
        while queue and self.state == "connected" and not self.io.write_congested():
            pending = queue[0]
            if pending.message.is_expired(now):
                queue.popleft()
                self.broker.counters.messages_expired += 1
                session.remove_bytes(len(pending.message.payload))
                if pending.key:
                    self.broker.unstore_pending(session, pending)
                continue
            if pending.qos == 0:
                queue.popleft()
                session.remove_bytes(len(pending.message.payload))
                self._send_publish(pending, None, dup=False)
                continue
            if len(session.inflight) >= self.send_quota:
                break
            store = self.broker.store
            if pending.key > store.committed_key:
                # Stored but not on disk yet: it leaves once the store has it.
                self.pump_after_commit()
                break
            if pending.qos == 2 and pending.key > store.replicated_key:
                # Issue 13: a QoS 2 packet id reaches the client once the backup node has it
                # too. A device holding an id its session's copy never had would take the
                # next message with that id for a duplicate, once the session moved.
                self.pump_after_commit(replicated=True)
                break
            queue.popleft()
            self._send_inflight(session, pending, queued=True)
        if session.held_publishers and session.below_low_water(
            self.broker.settings.max_queued_bytes
        ):
            session.release_publishers(drained=True)

    # --- packets ----------------------------------------------------------------------------

    def _handle(self, packet: Packet) -> None:
        if self.state == "connecting":
            if not isinstance(packet, Connect):
                self._violation(ReasonCode.PROTOCOL_ERROR, "first packet is not CONNECT")
            self._handle_connect(packet)
            return
        # The decoder makes exactly these classes; one lookup instead of an isinstance chain
        # (a DISCONNECT was the ninth test).
        handler = _HANDLERS.get(type(packet))
        if handler is None:
            self._violation(
                ReasonCode.PROTOCOL_ERROR, f"{type(packet).__name__} is not sent by clients"
            )
        handler(self, packet)

    def _handle_puback(self, packet: Puback) -> None:
        self._handle_delivered(packet.packet_id, 1)

    def _handle_pubrel_packet(self, packet: Pubrel) -> None:
        self._handle_pubrel(packet.packet_id)

    def _handle_pubcomp(self, packet: Pubcomp) -> None:
        self._handle_delivered(packet.packet_id, 2)

    def _handle_pingreq(self, packet: Pingreq) -> None:
        self._send(Pingresp())

    def _handle_auth(self, packet: Auth) -> None:
        # No Authentication Method was accepted in CONNECT (5.0 section 4.12).
        self._violation(ReasonCode.PROTOCOL_ERROR, "AUTH without an authentication method")

    def _refuse(self, connect: Connect, reason_code: ReasonCode, why: str) -> NoReturn:
        self.broker.counters.connects_refused += 1
        level = connect.protocol_level
        properties = EMPTY_PROPERTIES
        if level >= MQTT_5 and connect.properties.request_problem_information != 0:
            properties = Properties(reason_string=why)
        self.io.write(
            encode(Connack(False, connack_code_for(level, reason_code), properties), level)
        )
        logger.info(
            "connection refused: client_id=%s username=%s address=%s connection_id=%s: %s "
            "(CONNACK 0x%02X)",
            connect.client_id or "-",
            self.username or "-",
            self.address_text,
            self.connection_id,
            why,
            connack_code_for(level, reason_code),
        )
        self._finish(why, send_will=False)
        raise _ConnectionClosedError

    def _handle_connect(self, connect: Connect) -> None:
        broker = self.broker
        settings = broker.settings
        level = connect.protocol_level
        properties = connect.properties
        self.protocol_level = level
        self.username = connect.username
        identity = self.identity
        if self.listener.peer_cert_as_username == "cn":
            # The verified certificate CN replaces what the client claims; without one the
            # client stays anonymous, so a username is only ever a verified identity.
            self.username = identity.certificate_cn if identity.certificate_verified else None

        if broker.refusing_connects is not None:
            # A connection accepted before the node paused (broker.partition).
            self._refuse(connect, ReasonCode.USE_ANOTHER_SERVER, broker.refusing_connects)
        if properties.authentication_method is not None:
            self._refuse(
                connect,
                ReasonCode.BAD_AUTHENTICATION_METHOD,
                f"authentication method {properties.authentication_method!r} not supported",
            )
        password_check = broker.password_checks.get(self.listener.label)
        if password_check is not None and not password_check(connect.username, connect.password):
            self._refuse(connect, ReasonCode.BAD_USER_NAME_OR_PASSWORD, "bad username or password")

        client_id = connect.client_id
        assigned: str | None = None
        if not client_id:
            if level < 4 or (level == 4 and not connect.clean_start):
                self._refuse(
                    connect,
                    ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                    "zero-length client id needs clean session (MQTT 3.1.1 section 3.1.3.1)",
                )
            client_id = f"auto-{secrets.token_hex(8)}"
            if level >= MQTT_5:
                assigned = client_id
        self.client_id = client_id

        keep_alive = connect.keep_alive
        server_keep_alive: int | None = None
        max_keepalive = settings.max_keepalive
        if (
            max_keepalive
            and max_keepalive < KEEP_ALIVE_LIMIT
            and (keep_alive > max_keepalive or keep_alive == 0)
        ):
            if level < MQTT_5:
                # mosquitto's rule: 3.1.1 has no way to tell the client, so refuse it.
                self._refuse(
                    connect,
                    ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                    f"keep alive {keep_alive}s exceeds max_keepalive {max_keepalive}s",
                )
            keep_alive = server_keep_alive = max_keepalive
        self.keep_alive = keep_alive

        will = connect.will
        if will is not None:
            if will.qos > settings.maximum_qos:
                self._refuse(connect, ReasonCode.QOS_NOT_SUPPORTED, "will QoS not supported")
            if will.retain and not settings.retain_available:
                self._refuse(
                    connect, ReasonCode.RETAIN_NOT_SUPPORTED, "retained will not supported"
                )

        attributes = broker.authorization.principal_attributes(identity)
        principal = Principal(client_id, self.username, attributes, identity)
        if not broker.authorization.authorize_connect(principal):
            broker.counters.authorization_denied += 1
            self._refuse(connect, ReasonCode.NOT_AUTHORIZED, "not authorized to connect")
        self.principal = principal
        # max_connections counts connected clients: the slot is taken last, once nothing
        # else refuses this CONNECT, and kept until the connection closes.
        if not self.io.admit():
            broker.counters.connections_refused_max_connections += 1
            self._refuse(
                connect,
                ReasonCode.SERVER_BUSY,
                f"listener {self.listener.label} is full "
                f"(max_connections {self.listener.max_connections})",
            )

        # Session expiry (5.0 section 3.1.2.11.2; 3.1.1 Clean Session = 0 keeps the session).
        if level >= MQTT_5:
            requested_expiry = properties.session_expiry_interval or 0
        else:
            requested_expiry = 0 if connect.clean_start else SESSION_NEVER_EXPIRES
        expiry = min(requested_expiry, settings.session_expiry_max)
        self.clean_start = connect.clean_start

        if will is not None:
            will_message = Message(
                will.topic,
                bytes(will.payload),
                will.qos,
                will.retain,
                dataclasses.replace(
                    will.properties, will_delay_interval=None, message_expiry_interval=None
                ),
                None,
                client_id,
                broker.node_name,
            )
            self.will = will_message
            self.will_expiry = will.properties.message_expiry_interval
            self.will_delay = (will.properties.will_delay_interval or 0) if level >= MQTT_5 else 0

        if level >= MQTT_5:
            self.send_quota = min(
                properties.receive_maximum or DEFAULT_RECEIVE_MAXIMUM, settings.max_inflight
            )
            self.client_maximum_packet_size = properties.maximum_packet_size or 0
            self.client_topic_alias_maximum = properties.topic_alias_maximum or 0
            self.problem_information = properties.request_problem_information != 0
        else:
            self.send_quota = settings.max_inflight

        # Issue 12: the client id is claimed cluster-wide first; the session may be handed
        # over by another node, and CONNACK waits for it (input waits too).
        self.state = "claiming"
        broker.connect(
            self,
            connect.clean_start,
            lambda outcome: self._claimed(
                outcome, connect, expiry, requested_expiry, assigned, server_keep_alive
            ),
        )
        if self.state == "claiming":
            self.input_paused = True
            self.io.pause_input()

    def _claimed(
        self,
        outcome: ClaimOutcome,
        connect: Connect,
        expiry: int,
        requested_expiry: int,
        assigned: str | None,
        server_keep_alive: int | None,
    ) -> None:
        """The claim on the client id is settled: CONNACK, then resume the session."""
        if self.state != "claiming":
            return  # closed while it waited
        waited = self.input_paused
        self.input_paused = False
        try:
            self._connected(outcome, connect, expiry, requested_expiry, assigned, server_keep_alive)
        except _ConnectionClosedError:
            return
        if waited and self.state == "connected":
            self.io.resume_input()

    def _connected(
        self,
        outcome: ClaimOutcome,
        connect: Connect,
        expiry: int,
        requested_expiry: int,
        assigned: str | None,
        server_keep_alive: int | None,
    ) -> None:
        broker = self.broker
        level = self.protocol_level
        identity = self.identity
        client_id = self.client_id
        keep_alive = self.keep_alive
        if outcome.rejected:
            broker.counters.claims_rejected += 1
            logger.info(
                "connection closed: client_id=%s address=%s: a newer connection with this "
                "client id holds it on another node",
                client_id,
                self.address_text,
            )
            self._finish("a newer connection holds the client id", send_will=False)
            raise _ConnectionClosedError
        session, session_present = broker.attach(self, connect.clean_start, expiry, outcome)
        self.session = session
        self.state = "connected"
        self.connected_at = broker.clock()
        broker.counters.connects_accepted += 1

        data: bytes | None = None
        if level < MQTT_5 or (
            expiry == requested_expiry and assigned is None and server_keep_alive is None
        ):
            # Nothing about this client in it: the same bytes for every client of this level
            # (the 5.0 property encode was ~5% of a connection, bench/README.md issue 13).
            memo_key = (level, session_present)
            data = broker.connack_memo.get(memo_key)
            if data is None:
                properties = self._connack_properties(expiry, requested_expiry, None, None)
                data = encode(Connack(session_present, 0, properties), level)
                broker.connack_memo[memo_key] = data
        limit = self.client_maximum_packet_size
        if data is None or (limit and len(data) > limit):
            # _send shortens or refuses what exceeds the client's Maximum Packet Size.
            properties = self._connack_properties(
                expiry, requested_expiry, assigned, server_keep_alive
            )
            self._send(Connack(session_present, 0, properties))
        else:
            broker.counters.bytes_sent += len(data)
            self.io.write(data)
        self.io.set_idle_timeout(keep_alive * KEEP_ALIVE_FACTOR if keep_alive else None)
        log_level = logging.DEBUG if identity.health_check else logging.INFO
        if logger.isEnabledFor(log_level):
            log_line(
                logger,
                log_level,
                f"client connected: client_id={client_id} username={self.username or '-'} "
                f"address={self.address_text} connection_id={self.connection_id} "
                f"cn={identity.certificate_cn or '-'} "
                f"protocol={PROTOCOL_NAMES.get(level, str(level))} keepalive={keep_alive} "
                f"clean_start={connect.clean_start} session_present={session_present} "
                f"listener={self.listener.label}",
            )

        # Resume: resend unacknowledged PUBLISH (DUP) and PUBREL (5.0 section 4.4).
        for outgoing in list(session.inflight.values()):
            if self.state != "connected":
                return
            if outgoing.released:
                self._send(Pubrel(outgoing.packet_id))
            elif not self._send_publish(outgoing.pending, outgoing.packet_id, dup=True):
                self._inflight_done(session, outgoing)
        self._pump()

    def _connack_properties(
        self,
        expiry: int,
        requested_expiry: int,
        assigned: str | None,
        server_keep_alive: int | None,
    ) -> Properties:
        """A CONNACK's properties (5.0 section 3.2.2.3): what differs from the defaults."""
        if self.protocol_level < MQTT_5:
            return EMPTY_PROPERTIES
        settings = self.broker.settings
        return Properties(
            session_expiry_interval=expiry if expiry != requested_expiry else None,
            receive_maximum=settings.receive_maximum
            if settings.receive_maximum != DEFAULT_RECEIVE_MAXIMUM
            else None,
            maximum_qos=settings.maximum_qos if settings.maximum_qos < 2 else None,
            retain_available=None if settings.retain_available else 0,
            maximum_packet_size=settings.max_packet_size,
            assigned_client_identifier=assigned,
            topic_alias_maximum=settings.topic_alias_maximum or None,
            wildcard_subscription_available=None if settings.wildcard_subscription_available else 0,
            subscription_identifier_available=None
            if settings.subscription_identifier_available
            else 0,
            shared_subscription_available=None if settings.shared_subscription_available else 0,
            server_keep_alive=server_keep_alive,
        )

    def _handle_publish(self, publish: Publish) -> None:
        raw = publish.raw
        if raw is not None and not publish.qos:
            self._handle_plain_publish(publish, raw)
            return
        broker = self.broker
        settings = broker.settings
        session = self.session
        assert session is not None and self.principal is not None
        qos = publish.qos
        if qos > settings.maximum_qos:
            self._violation(ReasonCode.QOS_NOT_SUPPORTED, f"QoS {qos} not supported")
        if publish.retain and not settings.retain_available:
            self._violation(ReasonCode.RETAIN_NOT_SUPPORTED, "retain not supported")
        properties = publish.properties
        topic = publish.topic
        alias = properties.topic_alias
        if alias is not None:
            if alias == 0 or alias > settings.topic_alias_maximum:
                self._violation(
                    ReasonCode.TOPIC_ALIAS_INVALID,
                    f"topic alias {alias} outside 1..{settings.topic_alias_maximum}",
                )
            inbound = self._inbound_aliases
            if topic:
                if inbound is None:
                    inbound = self._inbound_aliases = {}
                inbound[alias] = topic
            else:
                known = inbound.get(alias) if inbound is not None else None
                if known is None:
                    self._violation(ReasonCode.PROTOCOL_ERROR, f"unknown topic alias {alias}")
                topic = known
        if properties.subscription_identifiers:
            self._violation(ReasonCode.PROTOCOL_ERROR, "PUBLISH from a client with subscription id")
        packet_id = publish.packet_id
        if qos == 2:
            assert packet_id is not None
            if packet_id in session.incoming_qos2:
                # A resend of a message we already have: acknowledge, do not deliver twice.
                self._ack(encode(Pubrec(packet_id), self.protocol_level), False)
                return
            if len(session.incoming_qos2) >= settings.receive_maximum:
                self._violation(
                    ReasonCode.RECEIVE_MAXIMUM_EXCEEDED,
                    f"more than {settings.receive_maximum} QoS 2 messages unacknowledged",
                )

        reason_code: int = ReasonCode.SUCCESS
        reason: str | None = None
        store = broker.store
        generation = store.generation
        if properties.payload_format_indicator == 1 and not _is_utf8(publish.payload):
            reason_code, reason = ReasonCode.PAYLOAD_FORMAT_INVALID, "payload is not UTF-8"
        elif not broker.authorization.authorize_publish(self.principal, topic, qos, publish.retain):
            self._publish_denied(topic)
            reason_code, reason = ReasonCode.NOT_AUTHORIZED, "not authorized"
        else:
            if properties.topic_alias is None and properties.message_expiry_interval is None:
                # Nothing per-hop to strip (subscription ids were refused above): skips
                # from_publish's dataclasses.replace, ~20% of a QoS 0 publish (bench/README.md).
                message = Message(
                    topic,
                    bytes(publish.payload),
                    qos,
                    publish.retain,
                    properties,
                    None,
                    self.client_id,
                    broker.node_name,
                    broker.next_seq(),
                )
                if raw is not None:
                    # The decoder keeps the bytes of a PUBLISH without properties: they are
                    # this message exactly, forwarded as they are (_send_shared_publish).
                    message.raw = raw  # type: ignore[misc]
                    message.raw_level = self.protocol_level  # type: ignore[misc]
            else:
                message = Message.from_publish(
                    publish,
                    topic,
                    broker.clock(),
                    self.client_id,
                    broker.node_name,
                    broker.next_seq(),
                )
            if not broker.publish(message, self):
                reason_code = ReasonCode.NO_MATCHING_SUBSCRIBERS
        if not self.v5:
            # 3.1.1 has no reason codes: a denied message still gets a plain acknowledgement
            # (seed 003).
            reason_code, reason = ReasonCode.SUCCESS, None
        if qos == 1:
            assert packet_id is not None
            # Issue 12: when the message created durable work (a stored delivery, a retained
            # change, a cluster outbox entry), the PUBACK promises it: sent after the commit.
            wait = store.generation != generation
            if reason_code == ReasonCode.SUCCESS:
                # The common PUBACK is four fixed bytes in 3.1.1 and 5.0 (5.0 section 3.4.2.1).
                self._ack(b"\x40\x02" + packet_id.to_bytes(2, "big"), wait)
            else:
                self._ack(
                    encode(
                        Puback(packet_id, reason_code, self._ack_properties(reason)),
                        self.protocol_level,
                    ),
                    wait,
                )
        elif qos == 2:
            assert packet_id is not None
            if reason_code < ReasonCode.UNSPECIFIED_ERROR:
                session.incoming_qos2.add(packet_id)
                if session.durable:
                    store.add_incoming(session.client_id, packet_id)
            wait = store.generation != generation
            self._ack(
                encode(
                    Pubrec(packet_id, reason_code, self._ack_properties(reason)),
                    self.protocol_level,
                ),
                wait,
            )
        if store.congested and store.generation != generation:
            self._hold_for_store()

    def _handle_plain_publish(self, publish: Publish, raw: bytes) -> None:
        """A QoS 0 PUBLISH whose bytes the decoder kept (Publish.raw: no properties, so no
        alias, payload format or subscription identifier to check) and that nobody
        acknowledges: what is left of _handle_publish for the most common packet, with
        fewer lookups (bench/README.md, issue 13)."""
        broker = self.broker
        principal = self.principal
        assert principal is not None
        topic = publish.topic
        retain = publish.retain
        if retain and not broker.settings.retain_available:
            self._violation(ReasonCode.RETAIN_NOT_SUPPORTED, "retain not supported")
        if not broker.authorization.authorize_publish(principal, topic, 0, retain):
            self._publish_denied(topic)
            return
        store = broker.store
        generation = store.generation
        message = Message(
            topic,
            publish.payload,
            0,
            retain,
            EMPTY_PROPERTIES,
            None,
            self.client_id,
            broker.node_name,
            broker.next_seq(),
        )
        # These bytes are this message exactly: forwarded as they are (_send_publish).
        message.raw = raw  # type: ignore[misc]
        message.raw_level = self.protocol_level  # type: ignore[misc]
        broker.publish(message, self)
        if store.congested and store.generation != generation:
            # A retained message went to the store; the writer is behind.
            self._hold_for_store()

    def _publish_denied(self, topic: str) -> None:
        self.broker.counters.authorization_denied += 1
        logger.info(
            "publish denied: client_id=%s username=%s address=%s connection_id=%s topic=%s",
            self.client_id,
            self.username or "-",
            self.address_text,
            self.connection_id,
            topic,
        )

    def _handle_delivered(self, packet_id: int, qos: int) -> None:
        """PUBACK (QoS 1) or PUBCOMP (QoS 2): the delivery is done and frees its packet id;
        an acknowledgement for an unknown id or of the other QoS is ignored."""
        session = self.session
        assert session is not None
        outgoing = session.inflight.get(packet_id)
        if outgoing is not None and outgoing.pending.qos == qos:
            self._inflight_done(session, outgoing)
            self._pump()

    def _handle_pubrec(self, pubrec: Pubrec) -> None:
        session = self.session
        assert session is not None
        outgoing = session.inflight.get(pubrec.packet_id)
        if outgoing is None or outgoing.pending.qos != 2:
            if self.v5:
                self._send(Pubrel(pubrec.packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND))
            else:
                self._send(Pubrel(pubrec.packet_id))
            return
        if pubrec.reason_code >= ReasonCode.UNSPECIFIED_ERROR:
            self._inflight_done(session, outgoing)
            self._pump()
            return
        if outgoing.released:
            self._send(Pubrel(pubrec.packet_id))  # a repeated PUBREC
            return
        outgoing.released = True
        pending = outgoing.pending
        if pending.key:
            # Once the client has PUBREL it may forget the packet id: PUBREL sent must be on
            # disk first, or a restart would send the PUBLISH again (a duplicate).
            broker = self.broker
            broker.store.update_delivery(
                session.client_id, pending.key, pubrec.packet_id, True, True
            )
            self._ack(encode(Pubrel(pubrec.packet_id), self.protocol_level), True)
        else:
            self._send(Pubrel(pubrec.packet_id))

    def _handle_pubrel(self, packet_id: int) -> None:
        session = self.session
        assert session is not None
        if packet_id in session.incoming_qos2:
            session.incoming_qos2.discard(packet_id)
            if session.durable:
                # The packet id may be reused by the client once it has PUBCOMP.
                self.broker.store.remove_incoming(session.client_id, packet_id)
                self._ack(encode(Pubcomp(packet_id), self.protocol_level), True)
            else:
                self._ack(encode(Pubcomp(packet_id), self.protocol_level), False)
        elif self.v5:
            self._send(Pubcomp(packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND))
        else:
            self._send(Pubcomp(packet_id))

    def _handle_subscribe(self, subscribe: Subscribe) -> None:
        broker = self.broker
        settings = broker.settings
        session = self.session
        assert session is not None and self.principal is not None
        identifiers = subscribe.properties.subscription_identifiers
        identifier = identifiers[0] if identifiers else None
        reason_codes: list[int] = []
        retained_to_send: list[tuple[Message, int, int | None]] = []
        generation = broker.store.generation
        for subscription in subscribe.subscriptions:
            topic_filter = subscription.topic_filter
            try:
                validate_topic_filter(topic_filter)
                group, plain = parse_shared(topic_filter)
            except MQTTProtocolError:
                reason_codes.append(
                    ReasonCode.TOPIC_FILTER_INVALID if self.v5 else ReasonCode.UNSPECIFIED_ERROR
                )
                continue
            wildcard = "+" in plain or "#" in plain
            if group is not None and not settings.shared_subscription_available:
                code: int = ReasonCode.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED
            elif wildcard and not settings.wildcard_subscription_available:
                code = ReasonCode.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED
            elif identifier is not None and not settings.subscription_identifier_available:
                code = ReasonCode.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED
            elif not broker.authorization.authorize_subscribe(
                self.principal, topic_filter, subscription.qos
            ):
                broker.counters.authorization_denied += 1
                logger.info(
                    "subscribe denied: client_id=%s username=%s address=%s connection_id=%s "
                    "filter=%s",
                    self.client_id,
                    self.username or "-",
                    self.address_text,
                    self.connection_id,
                    topic_filter,
                )
                code = ReasonCode.NOT_AUTHORIZED
            else:
                qos = min(subscription.qos, settings.maximum_qos)
                options = SubscriptionOptions(
                    qos,
                    subscription.no_local,
                    subscription.retain_as_published,
                    subscription.retain_handling,
                    identifier,
                )
                existed = broker.subscribe(session, topic_filter, options)
                handling = subscription.retain_handling
                if group is None and (handling == 0 or (handling == 1 and not existed)):
                    for message in broker.retained_for(plain):
                        retained_to_send.append((message, qos, identifier))
                code = qos
            if code >= ReasonCode.UNSPECIFIED_ERROR and not self.v5:
                code = ReasonCode.UNSPECIFIED_ERROR
            reason_codes.append(code)
        suback = Suback(subscribe.packet_id, tuple(reason_codes))
        if broker.store.generation != generation or self._acks_waiting:
            # A durable session's subscriptions are on disk before SUBACK says so.
            self._acks_waiting += 1
            broker.store.after_commit(lambda: self._subscribed(suback, retained_to_send, True))
            return
        self._subscribed(suback, retained_to_send, False)

    def _subscribed(
        self,
        suback: Suback,
        retained_to_send: list[tuple[Message, int, int | None]],
        waited: bool,
    ) -> None:
        if waited:
            self._ack_done()
            if self.state != "connected":
                return
        try:
            self._send(suback)
            # 5.0 section 3.8.4: retained messages follow the SUBACK, with RETAIN set.
            for message, qos, identifier in retained_to_send:
                self.deliver(
                    Pending(
                        message,
                        min(message.qos, qos),
                        True,
                        () if identifier is None else (identifier,),
                    )
                )
        except _ConnectionClosedError:
            pass

    def _handle_unsubscribe(self, unsubscribe: Unsubscribe) -> None:
        session = self.session
        assert session is not None
        reason_codes: list[int] = []
        for topic_filter in unsubscribe.topic_filters:
            try:
                validate_topic_filter(topic_filter)
            except MQTTProtocolError:
                reason_codes.append(ReasonCode.TOPIC_FILTER_INVALID)
                continue
            if self.broker.unsubscribe(session, topic_filter):
                reason_codes.append(ReasonCode.SUCCESS)
            else:
                reason_codes.append(ReasonCode.NO_SUBSCRIPTION_EXISTED)
        self._ack(
            encode(Unsuback(unsubscribe.packet_id, tuple(reason_codes)), self.protocol_level),
            session.durable,
        )

    def _handle_disconnect(self, disconnect: Disconnect) -> None:
        session = self.session
        assert session is not None
        expiry = disconnect.properties.session_expiry_interval
        if expiry is not None:
            if session.expiry_interval == 0 and expiry != 0:
                # 5.0 section 3.14.2.2.2: cannot turn a non-persistent session persistent.
                self._violation(
                    ReasonCode.PROTOCOL_ERROR, "session expiry set at DISCONNECT after 0"
                )
            session.expiry_interval = min(expiry, self.broker.settings.session_expiry_max)
        with_will = disconnect.reason_code == ReasonCode.DISCONNECT_WITH_WILL_MESSAGE
        reason = "client sent DISCONNECT"
        if disconnect.reason_code:
            reason += f" 0x{disconnect.reason_code:02X}"
        # No lingering close: the client said it is done (it sends nothing after DISCONNECT,
        # 5.0 section 3.14.4) and nothing of ours follows it. A shutdown, a timer and a last
        # read saved per connection (bench/README.md issue 13); mosquitto closes at once too.
        self._finish(reason, send_will=with_will, linger=False)


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


#: ClientConnection._handle's packets after CONNECT, by class (a second CONNECT is refused by
#: the decoder; CONNACK, SUBACK, UNSUBACK and PINGRESP are not sent by clients).
_HANDLERS: dict[type[Packet], Callable[[ClientConnection, Any], None]] = {
    Publish: ClientConnection._handle_publish,
    Puback: ClientConnection._handle_puback,
    Pubrec: ClientConnection._handle_pubrec,
    Pubrel: ClientConnection._handle_pubrel_packet,
    Pubcomp: ClientConnection._handle_pubcomp,
    Subscribe: ClientConnection._handle_subscribe,
    Unsubscribe: ClientConnection._handle_unsubscribe,
    Pingreq: ClientConnection._handle_pingreq,
    Disconnect: ClientConnection._handle_disconnect,
    Auth: ClientConnection._handle_auth,
}
