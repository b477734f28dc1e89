"""Node-to-node routing over mutually authenticated TLS links (seed 002, EMQX cluster security).

Seed 002 asks for cluster RPC over TLS with ``verify = verify_peer`` and
``fail_if_no_peer_cert = true``, node certificates from one CA, key files readable only by
the service user (mode 600), a secret node cookie, and RPC ports 5370+N. Here:

- Every pair of nodes shares one link. The node whose name sorts first dials, the other
  accepts, so the direction is deterministic and there is never a second link per pair.
  Both ends verify the other's certificate chain (the dialer also checks the peer's address
  against the certificate's SAN). The frames are those of :mod:`broker.cluster_codec`; the
  first one each way is HELLO, whose cookie is compared in constant time. A wrong cookie,
  an unknown node name or another cluster name is refused with CLOSE and one log line.
- Once up, each end sends SYNC (its complete filter list) and its retained messages; after
  that SUBSCRIBE/UNSUBSCRIBE follow the first/last local subscriber of a filter, so a
  subscription made on one node is known to the others within a round trip.
- A message accepted from a local client is sent once to each node that has a matching
  filter (the same matching as :class:`broker.subscriptions.SubscriptionTrie`), and delivered
  there to local subscribers only (:meth:`broker.core.Broker.deliver_from_cluster`): a
  message that came from the cluster is never forwarded again, so there are no loops and no
  duplicates. Retained changes are replicated with their wall-clock time; on a resync the
  newer one wins. A client connecting on one node makes the others close their connection
  with that client id (TAKEOVER).
- A dialer that loses its link (or never got one) redials with capped exponential backoff
  and jitter; the other nodes keep serving meanwhile. Idle links exchange PING/PONG and a
  silent one is closed.
- Flow control: the TLS transport's buffer is the link's send queue. Above its high-water
  mark QoS 0 messages are dropped and counted; past a hard limit the link is closed (it
  resyncs on reconnect), so a stuck peer never grows memory without bound.

The asyncio part (protocols, timers, TLS) lives here; the frame codec is sans-IO in
:mod:`broker.cluster_codec`.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import logging
import random
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, cast

from broker import cluster_codec as codec
from broker.config import BrokerConfig, ClusterConfig, SSLOptions
from broker.message import Message
from broker.mqtt import MQTTProtocolError, split_shared, validate_topic_filter
from broker.subscriptions import SubscriptionOptions, SubscriptionTrie
from broker.tls_listener import (
    ReloadingContext,
    TLSServer,
    build_client_ssl_context,
    build_server_ssl_context,
    handshake_failure_reason,
    key_permission_problems,
    serve_tls,
)
from lb.pem import TLSFileError

if TYPE_CHECKING:
    from broker.core import Broker

__all__ = [
    "RPC_BASE_PORT",
    "Cluster",
    "ClusterError",
    "LinkCounters",
    "LinkState",
    "default_rpc_port",
    "startup_problems",
]

logger = logging.getLogger(__name__)

#: Seed 002: the cluster RPC port is 5370 plus the node name's numeric suffix.
RPC_BASE_PORT = 5370
#: Redial delays: BASE * 2**attempt, capped, times a random factor in [0.5, 1].
DIAL_BACKOFF_BASE = 0.2
DIAL_BACKOFF_CAP = 5.0
#: TLS handshake plus HELLO exchange.
HANDSHAKE_TIMEOUT = 10.0
#: An idle link sends PING this often; a link silent for LINK_TIMEOUT is closed.
PING_INTERVAL = 5.0
LINK_TIMEOUT = 15.0
#: Send queue (the transport's buffer): above HIGH, QoS 0 messages are dropped; past
#: SEND_QUEUE_LIMIT the link is closed and resynced.
WRITE_BUFFER_HIGH = 1024 * 1024
WRITE_BUFFER_LOW = 256 * 1024
SEND_QUEUE_LIMIT = 32 * 1024 * 1024
#: Frames of protocol overhead on top of the node's max_packet_size.
FRAME_OVERHEAD = 4 * 65_536
#: Retained deletions remembered (topic -> time) so a resync does not bring them back.
RETAINED_TOMBSTONES = 10_000
#: Filters are announced and routed without their ``$share/group/`` prefix: shared groups
#: are served per node.
_NODE_SUFFIX = re.compile(r"(\d+)(?:@.*)?$")


class ClusterError(Exception):
    """A cluster that cannot start (bad ssl_options, key permissions, port in use)."""


def default_rpc_port(node_name: str) -> int:
    """Seed 002: 5370 + N for a node named ``emqx-N`` / ``emqxN`` (5370 without a suffix)."""
    match = _NODE_SUFFIX.search(node_name.split("@", 1)[0])
    return RPC_BASE_PORT + (int(match.group(1)) if match else 0)


def startup_problems(config: BrokerConfig) -> list[str]:
    """Why this node must not start: cluster TLS settings, key files readable by others."""
    return list(dict.fromkeys([*Cluster.check(config), *key_permission_problems(config)]))


class LinkState(enum.Enum):
    DOWN = "down"
    CONNECTING = "connecting"
    HANDSHAKE = "handshake"
    UP = "up"


@dataclass(slots=True)
class LinkCounters:
    connects: int = 0
    disconnects: int = 0
    dial_failures: int = 0
    refused: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_forwarded: int = 0
    messages_received: int = 0
    messages_dropped_qos0_queue_full: int = 0
    messages_not_forwarded_link_down: int = 0
    send_queue_overflows: int = 0
    subscriptions_received: int = 0
    retained_sent: int = 0
    retained_received: int = 0
    takeovers_sent: int = 0
    takeovers_received: int = 0
    pings_sent: int = 0


def certificate_names(certificate: dict[str, Any] | None) -> frozenset[str]:
    """The DNS names and IP addresses of a verified peer certificate (ssl.getpeercert()),
    and its CN when it has no subjectAltName."""
    if not certificate:
        return frozenset()
    names = {
        value
        for kind, value in certificate.get("subjectAltName", ())
        if kind in ("DNS", "IP Address")
    }
    if not names:
        for rdn in certificate.get("subject", ()):
            names.update(value for key, value in rdn if key == "commonName")
    return frozenset(names)


class Peer:
    """One configured peer node and its (at most one) link."""

    __slots__ = (
        "attempts",
        "counters",
        "dial_handle",
        "dial_task",
        "dials",
        "filters",
        "host",
        "last_error",
        "link",
        "name",
        "port",
        "routes",
        "state",
        "state_since",
    )

    def __init__(self, name: str, host: str, port: int, dials: bool) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.dials = dials
        self.state = LinkState.DOWN
        self.state_since = time.time()
        self.link: ClusterLink | None = None
        # Full filters the peer announced, and how many of them map to each routed filter.
        self.filters: set[str] = set()
        self.routes: dict[str, int] = {}
        self.counters = LinkCounters()
        self.attempts = 0
        self.last_error: str | None = None
        self.dial_handle: asyncio.TimerHandle | None = None
        self.dial_task: asyncio.Task[None] | None = None

    @property
    def address_text(self) -> str:
        return f"{self.host}:{self.port}"


class Cluster:
    """The :class:`broker.hooks.ClusterHook` of a clustered node, plus its links.

    Build it from the config, :meth:`attach` the :class:`~broker.core.Broker` (the core
    takes this object as its ``cluster``), then ``await start()``; ``await stop()`` closes
    every link. All methods run on the event loop thread.
    """

    def __init__(self, config: BrokerConfig) -> None:
        if config.cluster is None:
            raise ClusterError("no [cluster] section")
        self.config = config
        self.cluster_config: ClusterConfig = config.cluster
        self.node_name = config.node_name
        self.cookie = (config.cookie or "").encode("utf-8")
        self.broker: Broker | None = None
        self.peers: dict[str, Peer] = {}
        for name, host, port in self.cluster_config.peers:
            if name == self.node_name:
                continue  # one peers list shared by every node's config is fine
            self.peers[name] = Peer(name, host, port, dials=self.node_name < name)
        # Peer name -> inner filter; a trie keyed by peer name answers "which nodes want it".
        self.routes = SubscriptionTrie()
        self.retained_changed_at: dict[str, float] = {}
        self.retained_tombstones: OrderedDict[str, float] = OrderedDict()
        self.server: TLSServer | None = None
        self.server_contexts: ReloadingContext | None = None
        self.client_contexts: ReloadingContext | None = None
        self.accepting: set[ClusterLink] = set()
        self.refused_inbound = 0
        self.max_frame_size = config.mqtt.max_packet_size + FRAME_OVERHEAD
        self.stopping = False

    # --- lifecycle ---------------------------------------------------------------------------

    def attach(self, broker: Broker) -> None:
        self.broker = broker

    @staticmethod
    def check(config: BrokerConfig) -> list[str]:
        """What stops a clustered node from starting, one message per problem."""
        cluster = config.cluster
        if cluster is None:
            return []
        problems: list[str] = []
        options = cluster.ssl_options
        if options is None:
            if cluster.peers:
                problems.append(
                    "[cluster] has peers but no [cluster.ssl_options]: cluster links run over "
                    "mutual TLS (seed 002: cacertfile, certfile, keyfile, verify_peer)"
                )
            return problems
        if options.verify != "verify_peer" or not options.fail_if_no_peer_cert:
            problems.append(
                '[cluster.ssl_options] must set verify = "verify_peer" and '
                "fail_if_no_peer_cert = true: cluster links are mutually authenticated (seed 002)"
            )
        # Key file permissions: tls_listener.key_permission_problems (every key, once).
        if cluster.peers and not config.cookie:
            problems.append("[node] cookie is missing: the cluster's nodes share a cookie")
        return problems

    def _ssl_options(self) -> SSLOptions:
        options = self.cluster_config.ssl_options
        assert options is not None
        return options

    async def start(self) -> None:
        problems = self.check(self.config)
        if problems:
            raise ClusterError(problems[0])
        options = self._ssl_options()
        label = f"cluster {self.node_name}"
        try:
            self.server_contexts = ReloadingContext(label, options, build_server_ssl_context)
            # The dialer checks the peer's address against the SAN of its certificate.
            self.client_contexts = ReloadingContext(
                label,
                options,
                lambda o: build_client_ssl_context(o, check_hostname=True),
            )
        except (TLSFileError, ssl.SSLError) as error:
            raise ClusterError(f"[cluster.ssl_options]: {error}") from None
        self.server = await serve_tls(
            self.server_contexts,
            lambda: ClusterLink(self, None, "inbound"),
            label,
            self.cluster_config.host,
            self.cluster_config.port,
            self._inbound_refused,
        )
        self.server_contexts.start()
        self.client_contexts.start()
        logger.info(
            "cluster %s: node %s listening on %s:%d, peers: %s",
            self.cluster_config.name,
            self.node_name,
            self.cluster_config.host,
            self.port,
            ", ".join(
                f"{peer.name}@{peer.address_text} ({'dial' if peer.dials else 'accept'})"
                for peer in self.peers.values()
            )
            or "none",
        )
        for peer in self.peers.values():
            if peer.dials:
                self._dial_soon(peer, 0.0)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.stopping = True
        for contexts in (self.server_contexts, self.client_contexts):
            if contexts is not None:
                contexts.stop()
        if self.server is not None:
            self.server.close()
        for peer in self.peers.values():
            if peer.dial_handle is not None:
                peer.dial_handle.cancel()
                peer.dial_handle = None
            if peer.dial_task is not None and not peer.dial_task.done():
                peer.dial_task.cancel()
            if peer.link is not None:
                peer.link.close("node stopping")
        for link in list(self.accepting):
            link.close("node stopping")
        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
            except TimeoutError:
                pass

    # --- dialing -----------------------------------------------------------------------------

    def _dial_soon(self, peer: Peer, delay: float) -> None:
        if self.stopping:
            return
        loop = asyncio.get_running_loop()

        def dial() -> None:
            peer.dial_handle = None
            peer.dial_task = loop.create_task(self._dial(peer))

        peer.dial_handle = loop.call_later(delay, dial)

    def _redial(self, peer: Peer) -> None:
        if self.stopping or not peer.dials or peer.dial_handle is not None:
            return
        if peer.dial_task is not None and not peer.dial_task.done():
            return
        delay = min(DIAL_BACKOFF_CAP, DIAL_BACKOFF_BASE * 2**peer.attempts)
        delay *= random.uniform(0.5, 1.0)
        peer.attempts = min(peer.attempts + 1, 16)
        self._dial_soon(peer, delay)

    async def _dial(self, peer: Peer) -> None:
        assert self.client_contexts is not None
        loop = asyncio.get_running_loop()
        self._set_state(peer, LinkState.CONNECTING)
        try:
            await loop.create_connection(
                lambda: ClusterLink(self, peer, "outbound"),
                peer.host,
                peer.port,
                ssl=self.client_contexts.context,
                server_hostname=peer.host,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            peer.counters.dial_failures += 1
            if isinstance(error, ssl.SSLError | TimeoutError):
                reason = f"TLS handshake failed: {handshake_failure_reason(error)}"
            elif isinstance(error, OSError):
                reason = error.strerror or str(error)
            else:
                reason = str(error)
            self._link_failed(peer, reason)
            peer.dial_task = None  # this task is ending: let _redial schedule the next one
            self._redial(peer)

    def _link_failed(self, peer: Peer, reason: str) -> None:
        """Log a failure once per distinct reason: a peer that is down does not spam."""
        self._set_state(peer, LinkState.DOWN)
        if reason != peer.last_error:
            logger.warning(
                "cluster link to %s at %s failed: %s", peer.name, peer.address_text, reason
            )
        else:
            logger.debug(
                "cluster link to %s at %s failed again: %s", peer.name, peer.address_text, reason
            )
        peer.last_error = reason

    def _inbound_refused(self, address: tuple[str, int], reason: str) -> None:
        self.refused_inbound += 1
        logger.warning(
            "cluster link from %s:%d refused: TLS handshake failed: %s",
            address[0],
            address[1],
            reason,
        )

    def _set_state(self, peer: Peer, state: LinkState) -> None:
        if peer.state is not state:
            peer.state = state
            peer.state_since = time.time()

    # --- link events (called by ClusterLink) ---------------------------------------------------

    def hello_received(self, link: ClusterLink, hello: codec.Hello) -> str | None:
        """Validate a peer's HELLO; returns the refusal reason, or None when accepted."""
        if hello.version != codec.PROTOCOL_VERSION:
            return (
                f"protocol version {hello.version} not supported "
                f"(this node speaks {codec.PROTOCOL_VERSION})"
            )
        # Constant time, and checked before anything about the peer is revealed.
        if not hmac.compare_digest(hello.cookie, self.cookie):
            return "wrong cookie"
        if hello.cluster != self.cluster_config.name:
            return (
                f"cluster name {hello.cluster!r} differs from ours ({self.cluster_config.name!r})"
            )
        peer = self.peers.get(hello.node)
        if peer is None:
            return f"node {hello.node!r} is not in [cluster] peers"
        if link.peer is not None:
            if link.peer is not peer:
                return f"expected node {link.peer.name!r}, got {hello.node!r}"
        elif peer.dials:
            return f"node {hello.node!r} must accept links from {self.node_name!r}, not dial"
        # The shared CA also signs devices: the certificate must be one issued for this node,
        # naming it or its configured address, not just any certificate from that CA.
        if hello.node not in link.peer_names and peer.host not in link.peer_names:
            names = ", ".join(sorted(link.peer_names)) or "none"
            return (
                f"the certificate of node {hello.node!r} names neither it nor its address "
                f"{peer.host} (subjectAltName/CN: {names})"
            )
        return None

    def link_up(self, link: ClusterLink, peer: Peer) -> None:
        old = peer.link
        if old is not None and old is not link:
            # The peer restarted while the old connection looked alive: the new one wins.
            old.replaced = True
            old.close("replaced by a new link")
            self._drop_routes(peer)
        self.accepting.discard(link)
        peer.link = link
        peer.attempts = 0
        peer.counters.connects += 1
        if peer.last_error is not None or peer.state is not LinkState.UP:
            logger.info(
                "cluster link to %s (%s) is up (%s, %s)",
                peer.name,
                link.address_text,
                link.direction,
                link.tls_version or "?",
            )
        peer.last_error = None
        self._set_state(peer, LinkState.UP)
        broker = self.broker
        if broker is None:
            return
        for frame in codec.encode_sync(self._announced_filters()):
            link.send(frame)
        link.start_retained_sync(self._retained_frames())

    def link_lost(self, link: ClusterLink, reason: str) -> None:
        self.accepting.discard(link)
        peer = link.peer
        if peer is None or peer.link is not link:
            # Never established (refused either way, timed out) or replaced.
            if peer is not None and peer.link is None and link.direction == "outbound":
                self._link_failed(peer, link.refusal or reason)
                self._redial(peer)
            return
        peer.link = None
        self._drop_routes(peer)
        peer.counters.disconnects += 1
        if link.established:
            logger.warning("cluster link to %s (%s) lost: %s", peer.name, link.address_text, reason)
            peer.last_error = reason
            self._set_state(peer, LinkState.DOWN)
        else:
            self._link_failed(peer, link.refusal or reason)
        self._redial(peer)

    def _announced_filters(self) -> list[str]:
        assert self.broker is not None
        return sorted({_routed_filter(f) for f in self.broker.local_filters()})

    def _retained_frames(self) -> Iterator[bytes]:
        broker = self.broker
        assert broker is not None
        now = broker.clock()
        for topic, message in broker.retained.items():
            if message.is_expired(now):
                continue
            changed_at = self.retained_changed_at.get(topic, 0.0)
            yield codec.encode(
                codec.Retain(
                    topic,
                    codec.WireMessage.from_message(message, now, self.node_name),
                    changed_at,
                )
            )

    # --- routes --------------------------------------------------------------------------------

    def _add_route(self, peer: Peer, topic_filter: str) -> None:
        if topic_filter in peer.filters:
            return
        peer.filters.add(topic_filter)
        routed = _routed_filter(topic_filter)
        count = peer.routes.get(routed, 0)
        peer.routes[routed] = count + 1
        if count == 0:
            self.routes.subscribe(peer.name, routed, SubscriptionOptions(qos=2))

    def _remove_route(self, peer: Peer, topic_filter: str) -> None:
        if topic_filter not in peer.filters:
            return
        peer.filters.discard(topic_filter)
        routed = _routed_filter(topic_filter)
        count = peer.routes.get(routed, 0) - 1
        if count > 0:
            peer.routes[routed] = count
        else:
            peer.routes.pop(routed, None)
            self.routes.unsubscribe(peer.name, routed)

    def _drop_routes(self, peer: Peer) -> None:
        for routed in peer.routes:
            self.routes.unsubscribe(peer.name, routed)
        peer.routes.clear()
        peer.filters.clear()

    # --- inbound frames ------------------------------------------------------------------------

    def frame_received(self, link: ClusterLink, peer: Peer, frame: codec.Frame) -> None:
        broker = self.broker
        assert broker is not None
        counters = peer.counters
        if isinstance(frame, codec.Publish):
            counters.messages_received += 1
            message = frame.message.to_message(broker.clock())
            broker.deliver_from_cluster(message)
        elif isinstance(frame, codec.Subscribe):
            counters.subscriptions_received += 1
            _check_filter(frame.topic_filter)
            self._add_route(peer, frame.topic_filter)
        elif isinstance(frame, codec.Unsubscribe):
            self._remove_route(peer, frame.topic_filter)
        elif isinstance(frame, codec.Sync):
            if frame.reset:
                self._drop_routes(peer)
            for topic_filter in frame.filters:
                _check_filter(topic_filter)
                self._add_route(peer, topic_filter)
        elif isinstance(frame, codec.Retain):
            counters.retained_received += 1
            self._retained_received(frame)
        elif isinstance(frame, codec.Takeover):
            counters.takeovers_received += 1
            if broker.take_over(frame.client_id):
                logger.info(
                    "client %s taken over by a connection on node %s", frame.client_id, peer.name
                )
        elif isinstance(frame, codec.Ping):
            link.send(codec.encode(codec.Pong()))
        elif isinstance(frame, codec.Pong):
            pass
        elif isinstance(frame, codec.Close):
            link.close(f"closed by {peer.name}: {frame.reason}", send_close=False)
        else:  # HELLO after the handshake
            raise codec.ClusterProtocolError(f"unexpected {type(frame).__name__} frame")

    def _retained_received(self, frame: codec.Retain) -> None:
        broker = self.broker
        assert broker is not None
        topic = frame.topic
        known = self.retained_changed_at.get(topic)
        if known is None:
            known = self.retained_tombstones.get(topic)
        if known is not None and frame.changed_at <= known:
            return  # ours is as new or newer (a resync after a partition)
        if frame.message is None:
            self._remember_deletion(topic, frame.changed_at)
            broker.set_retained_from_cluster(topic, None)
        else:
            self.retained_tombstones.pop(topic, None)
            self.retained_changed_at[topic] = frame.changed_at
            broker.set_retained_from_cluster(topic, frame.message.to_message(broker.clock()))

    def _remember_deletion(self, topic: str, changed_at: float) -> None:
        self.retained_changed_at.pop(topic, None)
        self.retained_tombstones[topic] = changed_at
        self.retained_tombstones.move_to_end(topic)
        while len(self.retained_tombstones) > RETAINED_TOMBSTONES:
            self.retained_tombstones.popitem(last=False)

    # --- ClusterHook -------------------------------------------------------------------------

    def _up_links(self) -> Iterator[tuple[Peer, ClusterLink]]:
        for peer in self.peers.values():
            link = peer.link
            if link is not None and link.established:
                yield peer, link

    def publish_forwarded(self, message: Message) -> int:
        broker = self.broker
        if broker is None or not self.peers:
            return 0
        if message.origin_node not in (None, self.node_name):
            return 0  # came from the cluster: never forwarded again
        deliveries = self.routes.match(message.topic)
        if not deliveries:
            return 0
        data: bytes | None = None
        sent = 0
        for delivery in deliveries:
            peer = self.peers.get(delivery.client_id)
            if peer is None:
                continue
            link = peer.link
            if link is None or not link.established:
                peer.counters.messages_not_forwarded_link_down += 1
                continue
            if data is None:
                wire = codec.WireMessage.from_message(message, broker.clock(), self.node_name)
                data = codec.encode(codec.Publish(wire))
            if link.send_message(data, message.qos):
                peer.counters.messages_forwarded += 1
                sent += 1
        return sent

    def subscription_added(self, topic_filter: str) -> None:
        self._announce_change(topic_filter, added=True)

    def subscription_removed(self, topic_filter: str) -> None:
        self._announce_change(topic_filter, added=False)

    def _announce_change(self, topic_filter: str, added: bool) -> None:
        if not self.peers or self.broker is None:
            return
        routed = _routed_filter(topic_filter)
        # Several local filters map to one routed filter ("x" and "$share/g/x"): announce
        # the first and withdraw after the last.
        holders = sum(1 for f in self.broker.local_filters() if _routed_filter(f) == routed)
        if holders != (1 if added else 0):
            return
        frame = codec.Subscribe(routed) if added else codec.Unsubscribe(routed)
        data = codec.encode(frame)
        for _, link in self._up_links():
            link.send(data)

    def client_connected(self, client_id: str) -> None:
        if not self.peers:
            return
        data = codec.encode(codec.Takeover(client_id))
        for peer, link in self._up_links():
            peer.counters.takeovers_sent += 1
            link.send(data)

    def retained_changed(self, topic: str, message: Message | None) -> None:
        broker = self.broker
        if broker is None:
            return
        changed_at = time.time()
        # Two changes within the clock's resolution still order correctly.
        previous = self.retained_changed_at.get(topic) or self.retained_tombstones.get(topic)
        if previous is not None and changed_at <= previous:
            changed_at = previous + 1e-6
        if message is None:
            self._remember_deletion(topic, changed_at)
            wire = None
        else:
            self.retained_tombstones.pop(topic, None)
            self.retained_changed_at[topic] = changed_at
            wire = codec.WireMessage.from_message(message, broker.clock(), self.node_name)
        if not self.peers:
            return
        data = codec.encode(codec.Retain(topic, wire, changed_at))
        for peer, link in self._up_links():
            peer.counters.retained_sent += 1
            link.send(data)

    # --- admin -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The admin endpoint's /api/cluster: members and their link state."""
        members: list[dict[str, Any]] = [
            {"name": self.node_name, "state": "self", "address": self._listen_text()}
        ]
        for peer in self.peers.values():
            link = peer.link
            members.append(
                {
                    "name": peer.name,
                    "address": peer.address_text,
                    "state": peer.state.value,
                    "since": peer.state_since,
                    "direction": "dial" if peer.dials else "accept",
                    "link_address": None if link is None else link.address_text,
                    "tls_version": None if link is None else link.tls_version,
                    "last_error": peer.last_error,
                    "remote_filters": len(peer.filters),
                    "send_queue_bytes": 0 if link is None else link.queued_bytes(),
                    "counters": asdict(peer.counters),
                }
            )
        return {
            "node": self.node_name,
            "cluster": self.cluster_config.name,
            "members": members,
            "inbound_refused": self.refused_inbound,
            "tls": None if self.server_contexts is None else self.server_contexts.status(),
        }

    def _listen_text(self) -> str:
        port = self.port if self.server is not None else self.cluster_config.port
        return f"{self.cluster_config.host}:{port}"


def _routed_filter(topic_filter: str) -> str:
    return split_shared(topic_filter)[1]


def _check_filter(topic_filter: str) -> None:
    try:
        validate_topic_filter(topic_filter)
    except MQTTProtocolError as error:
        raise codec.ClusterProtocolError(f"invalid topic filter from peer: {error}") from None


class ClusterLink(asyncio.Protocol):
    """One TLS connection between two nodes, either direction, after the TLS handshake."""

    __slots__ = (
        "_ping_handle",
        "_retained_backlog",
        "address_text",
        "closed",
        "cluster",
        "decoder",
        "direction",
        "established",
        "last_received",
        "peer",
        "peer_names",
        "refusal",
        "replaced",
        "tls_version",
        "transport",
        "writing_paused",
    )

    def __init__(self, cluster: Cluster, peer: Peer | None, direction: str) -> None:
        self.cluster = cluster
        self.peer = peer
        self.direction = direction
        self.decoder = codec.ClusterDecoder(cluster.max_frame_size)
        self.transport: asyncio.Transport | None = None
        self.address_text = "?"
        self.tls_version: str | None = None
        self.peer_names: frozenset[str] = frozenset()  # from the verified peer certificate
        self.established = False
        self.closed = False
        self.replaced = False
        self.refusal: str | None = None
        self.writing_paused = False
        self.last_received = 0.0
        self._ping_handle: asyncio.TimerHandle | None = None
        self._retained_backlog: Iterator[bytes] | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer_address = transport.get_extra_info("peername")
        if peer_address:
            self.address_text = f"{peer_address[0]}:{peer_address[1]}"
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.tls_version = ssl_object.version()
            self.peer_names = certificate_names(ssl_object.getpeercert())
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        loop = asyncio.get_running_loop()
        self.last_received = loop.time()
        if self.peer is None:
            self.cluster.accepting.add(self)
        else:
            self.cluster._set_state(self.peer, LinkState.HANDSHAKE)
            self.send(self._hello())
        self._ping_handle = loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_received = asyncio.get_running_loop().time()
        if self.peer is not None:
            self.peer.counters.bytes_received += len(data)
        try:
            self.decoder.feed(data)
            while not self.closed:
                frame = self.decoder.next_event()
                if frame is codec.NEED_DATA:
                    break
                assert not isinstance(frame, codec.NeedData)
                self._frame(frame)
        except codec.ClusterProtocolError as error:
            logger.warning("cluster link %s: protocol error: %s", self._who(), error)
            self.close(f"protocol error: {error}")
        except Exception:
            logger.exception("cluster link %s: internal error", self._who())
            self.close("internal error")

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._retained_backlog = None
        was_closed = self.closed
        self.closed = True
        self.transport = None
        if exc is not None:
            reason = f"connection error: {exc}"
        elif was_closed and self.refusal:
            reason = self.refusal
        else:
            reason = "closed by peer" if not was_closed else "closed"
        if not self.replaced:
            self.cluster.link_lost(self, reason)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._pump_retained()

    # --- sending -----------------------------------------------------------------------------

    def queued_bytes(self) -> int:
        return 0 if self.transport is None else self.transport.get_write_buffer_size()

    def send(self, data: bytes) -> bool:
        transport = self.transport
        if transport is None or self.closed:
            return False
        if transport.get_write_buffer_size() + len(data) > SEND_QUEUE_LIMIT:
            if self.peer is not None:
                self.peer.counters.send_queue_overflows += 1
            logger.warning(
                "cluster link %s: send queue over %d bytes (peer not reading); closing it",
                self._who(),
                SEND_QUEUE_LIMIT,
            )
            self.close("send queue overflow")
            return False
        transport.write(data)
        if self.peer is not None:
            self.peer.counters.frames_sent += 1
            self.peer.counters.bytes_sent += len(data)
        return True

    def send_message(self, data: bytes, qos: int) -> bool:
        """A PUBLISH frame: QoS 0 is dropped (and counted) while the queue is above HIGH."""
        if qos == 0 and self.writing_paused:
            if self.peer is not None:
                self.peer.counters.messages_dropped_qos0_queue_full += 1
            return False
        return self.send(data)

    def start_retained_sync(self, frames: Iterator[bytes]) -> None:
        self._retained_backlog = frames
        self._pump_retained()

    def _pump_retained(self) -> None:
        # Retained messages go out while the transport has room, so a large store does not
        # fill the send queue in one go.
        backlog = self._retained_backlog
        while backlog is not None and not self.writing_paused and not self.closed:
            data = next(backlog, None)
            if data is None:
                self._retained_backlog = None
                return
            self.send(data)
            if self.peer is not None:
                self.peer.counters.retained_sent += 1

    def close(self, reason: str, send_close: bool = True) -> None:
        if self.closed:
            return
        if send_close and self.transport is not None:
            self.transport.write(codec.encode(codec.Close(reason)))
        self.refusal = self.refusal or reason
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    # --- internals ---------------------------------------------------------------------------

    def _hello(self) -> bytes:
        cluster = self.cluster
        return codec.encode(
            codec.Hello(
                codec.PROTOCOL_VERSION,
                cluster.node_name,
                cluster.cluster_config.name,
                cluster.cookie,
            )
        )

    def _who(self) -> str:
        name = self.peer.name if self.peer is not None else "?"
        return f"{name} ({self.address_text})"

    def _frame(self, frame: codec.Frame) -> None:
        if self.peer is not None:
            self.peer.counters.frames_received += 1
        if self.established:
            assert self.peer is not None
            self.cluster.frame_received(self, self.peer, frame)
            return
        if isinstance(frame, codec.Close):
            self.refusal = f"refused by the peer: {frame.reason}"
            self.close(self.refusal, send_close=False)
            return
        if not isinstance(frame, codec.Hello):
            raise codec.ClusterProtocolError(
                f"expected HELLO first, got {type(frame).__name__.upper()}"
            )
        refusal = self.cluster.hello_received(self, frame)
        if refusal is not None:
            if self.peer is None and frame.node in self.cluster.peers:
                self.peer = self.cluster.peers[frame.node]
                self.peer.counters.refused += 1
            logger.warning(
                "cluster link %s from %s (node %r) refused: %s",
                self.direction,
                self.address_text,
                frame.node,
                refusal,
            )
            self.refusal = f"refused: {refusal}"
            self.close(refusal)
            return
        if self.peer is None:
            self.peer = self.cluster.peers[frame.node]
            self.send(self._hello())
        self.established = True
        self._cancel_timer()
        self._schedule_ping()
        self.cluster.link_up(self, self.peer)

    def _handshake_timeout(self) -> None:
        self._ping_handle = None
        if not self.established:
            self.refusal = f"no HELLO within {HANDSHAKE_TIMEOUT:g}s"
            logger.warning("cluster link %s: %s", self._who(), self.refusal)
            self.close(self.refusal)

    def _schedule_ping(self) -> None:
        self._ping_handle = asyncio.get_running_loop().call_later(PING_INTERVAL, self._ping)

    def _ping(self) -> None:
        self._ping_handle = None
        if self.closed:
            return
        silent = asyncio.get_running_loop().time() - self.last_received
        if silent > LINK_TIMEOUT:
            logger.warning("cluster link %s: nothing received for %.0fs", self._who(), silent)
            self.close(f"nothing received for {silent:.0f}s")
            return
        if self.peer is not None:
            self.peer.counters.pings_sent += 1
        self.send(codec.encode(codec.Ping()))
        self._schedule_ping()

    def _cancel_timer(self) -> None:
        if self._ping_handle is not None:
            self._ping_handle.cancel()
            self._ping_handle = None
