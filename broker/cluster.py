"""The cluster: node-to-node links over mutual TLS (seed 002), and the rules that make the
nodes behind a round-robin balancer behave as one broker (issue 12).

Links (seed 002: cluster RPC over TLS with ``verify = verify_peer`` and
``fail_if_no_peer_cert = true``, node certificates from one CA, key files mode 600, a secret
node cookie, RPC ports 5370+N):

- Every pair of nodes shares one link. The node whose name sorts first dials, the other
  accepts. Both ends verify the other's chain; the dialer checks the peer's address against
  the certificate's SAN, the acceptor that the certificate names the node. The frames are
  those of :mod:`broker.cluster_codec`; the first one each way is HELLO, whose cookie is
  compared in constant time. A refused peer gets a bare CLOSE ("refused"); the reason (wrong
  cookie, unknown node, ...) is logged only here (issue 14 item 7: never tell an
  unauthenticated peer the configuration).
- A dialer that loses its link redials with capped exponential backoff and jitter. Idle links
  exchange PING/PONG and a silent one is closed. An operator can cut and restore one link
  (``POST /api/cluster/peers/NAME/disconnect`` and ``/connect`` on the admin API).
- Start and stop (issue 13, rolling restarts): at link up each side sends its SYNC, MEMBERS
  and OWNED, then a PING; the peer's PONG comes after its own, so the peer is *synced*.
  A starting node opens its MQTT listeners (broker.node) once every peer is synced or known
  to be unreachable (our dial failed, a HELLO was refused), at most ``join_timeout``
  (join()). A node back without its store (a new incarnation) gets its sessions back from
  its backup (TRANSFERs, before the backup's PONG); until that PONG (or the backup is
  unreachable, or the join is over) a node that started without sessions sends no SYNC,
  MEMBERS or OWNED (the peers keep its old routes) and holds the peers' reliable frames and
  PUBLISHes unapplied (backup_settled() applies them in order; past HELD_BYTES_MAX held it
  stops reading the links they come on, and TCP holds the rest). A stopping node closes its
  clients first, then waits until its peers and its backup have acknowledged what it sent
  (drain(), bounded by the caller), then the links; it does not take its peers for lost.

Routing: each node announces its non-shared filters (SYNC, SUBSCRIBE, UNSUBSCRIBE) and its
shared subscription members (MEMBERS). A message accepted from a local client is delivered
to local subscribers, sent once to each node with a matching filter, and for each matching
shared group cluster-wide one member is picked (``[mqtt] shared_subscription_strategy``:
round_robin, random, sticky, hash_clientid, preferring connected members) and the message
goes to that member's node tagged with it. A message from the cluster is never forwarded
again: no loops, no duplicates. The routes of a peer that is down are kept (and stored), so
messages for its persistent sessions wait in its outbox, until it is *forgotten* (forget():
``POST /api/cluster/peers/NAME/forget``, or ``[cluster] autoclean`` after it was down that
long, as EMQX's force-leave and autoclean): then its outbox goes and nothing more is kept
for it (its backup's copies get what is for its sessions, and without a backup its routes
go), the backups close the ring over it (_reform_ring), and it may link again only as a new
incarnation (its HELLO's incarnation differs).

QoS 1/2 across links (:mod:`broker.reliable`): QoS 1/2 PUBLISH, TRANSFER, DELIVER and state
store writes are *reliable frames*: numbered per directed pair, kept in the sender's outbox
(and store) until the receiver ACKs them, resent after a reconnect from the seq the
receiver's HELLO names, applied once by the receiver (high-water committed with the effects,
then ACKed). The outbox is bounded (``outbox_max_bytes``): past it the oldest frames are
dropped, counted and logged. Unacknowledged bytes to a peer above ``link_high_water`` pause
the QoS 1/2 publishers feeding it while its link is up until they are under half of it
(issue 14 item 2; a peer that is down drains nothing, its outbox's bound holds), and a
session behind with a peer's publisher's messages pauses it there with HOLD; both resume
their publishers oldest first, each with its share (broker.session.HeldPublishers). A
session's share crosses the link in HOLD(resume) and the publisher's node enforces it,
counting the publisher's QoS 1/2 messages to that node as the session's node does
(RemoteShare): paused a round trip later, a resumed publisher would have sent all it had.
A link speaks the lower of its two nodes' protocol versions (``[cluster] protocol_version``,
for rolling upgrades); at version 2 the share stays here: the session counts it alone and
pauses the publisher again with HOLD, as before version 3.
QoS 0 is best effort: dropped (and counted) while a link is down or its send buffer is full.

One owner per client id (:mod:`broker.registry` has the rules and why): a connect claims the
client id (CLAIM to every up peer) and, with clean start 0 and no session here, waits for
every up peer's answer: a TRANSFER of the session (the old node closes its connection with
DISCONNECT 0x8E, serialises the session and keeps a forwarding stub that passes on what still
arrives for the client, as DELIVER), or CLAIM_REPLY none/rejected. A peer that does not
answer within ``takeover_timeout`` (or whose link is down) leaves a fresh session marked
diverged; when the links are back, OWNED lists are exchanged and the older copy merges its
queued and in-flight messages into the newer (de-duplicated by message id: QoS 1 may arrive
twice at such a heal, QoS 2 not, within the last 1,000 messages of that session).

Sessions are replicated (issue 13, :mod:`broker.replica`): each node's persistent sessions
are copied to its backup (the next node by name) as REPLICA frames, and what promises a
session write waits for the backup's REPLICA_ACK. A claim for a client id whose owner is
down is answered by the backup with a TRANSFER of its copy (or the copy is installed when
the device reconnected to the backup); QoS 1/2 messages for a down node's plain subscribers
also go to its backup (REPLICA_PUBLISH), as do the unacknowledged ones in our outbox to it
when its link drops; so do the DELIVERs a forwarding stub passes on to a session's new node
(REPLICA_DELIVER, queued for the backup's copy of that session), and a TRANSFER the node had
not acknowledged when its link dropped (REPLICA_TRANSFER: the backup keeps the session as a
copy of that node's, as if it had installed and replicated it). The backup of a node whose
link drops publishes the wills of its clients (_peer_lost), unless another node still
reaches it (REACH, protocol 9: each node tells the others what its links reach; only our
link broke) or this node is in a minority with ``partition_handling = "pause_minority"``
(broker.partition): then they wait until no node reaches it, or a majority is back.

Retained messages are replicated with their wall-clock change time; on a resync the newer
one wins. The asyncio part (protocols, timers, TLS) lives here; the frame codec is sans-IO
in :mod:`broker.cluster_codec`, the claim rules in :mod:`broker.registry`, the seq/ack
bookkeeping in :mod:`broker.reliable`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hmac
import logging
import math
import random
import re
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from broker import cluster_codec as codec
from broker import coalesce
from broker.config import BrokerConfig, ClusterConfig, SSLOptions
from broker.hooks import ClaimOutcome
from broker.message import Message
from broker.mqtt import MQTTProtocolError, split_shared, validate_topic_filter
from broker.registry import ClaimDecision, PendingClaim, Version, decide, merges_into
from broker.reliable import Inbox, InboxVerdict, Outbox
from broker.replica import (
    LINGER_SECONDS,
    PARKED_MESSAGES,
    PARKED_SESSIONS,
    PARKED_SESSIONS_BYTES,
    REPLICA_FRAME_BYTES,
    Delivered,
    Forwarded,
    Replicas,
    ReplicatedStore,
    Replicator,
    Targets,
    backup_of,
    op_size,
)
from broker.session import HeldPublishers, Holder, Pending, Session
from broker.store import Store, StoredState
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
from lb import pem
from lb.pem import TLSFileError

if TYPE_CHECKING:
    from broker.connection import ClientConnection
    from broker.core import Broker, PendingWill
    from broker.partition import MinorityPause

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
#: Send queue (the transport's buffer): above HIGH, QoS 0 messages are dropped and resends
#: wait; past SEND_QUEUE_LIMIT the link is closed (it resyncs and resends on reconnect).
WRITE_BUFFER_HIGH = 1024 * 1024
WRITE_BUFFER_LOW = 256 * 1024
SEND_QUEUE_LIMIT = 32 * 1024 * 1024
#: A link's frames of one loop turn go to the TLS transport as one write (one TLS record and
#: send per turn, not per frame), or at once past this many bytes (the transport's buffer
#: limits then pause the writers as before).
COALESCE_BYTES = 64 * 1024
#: Frames of protocol overhead on top of the node's max_packet_size (a TRANSFER carries a
#: whole session: its queue is bounded by max_queued_bytes, which the limit adds).
FRAME_OVERHEAD = 4 * 65_536
#: Retained deletions remembered (topic -> time) so a resync does not bring them back.
RETAINED_TOMBSTONES = 10_000
#: What a node announcing an older protocol version lacks: the version that brought it,
#: whether it is about replication (said only of a version that replicates at all), what.
_OLDER_VERSIONS_LACK: Final = (
    (codec.REPLICA_VERSION, False, "its persistent sessions are not copied to another node"),
    (
        codec.FAILOVER_VERSION,
        True,
        "shared members' messages for a node that is down miss its backup",
    ),
    (
        codec.DELIVER_FAILOVER_VERSION,
        True,
        "messages passed on to a session's new node miss that node's backup while it is down",
    ),
    (
        codec.TRANSFER_FAILOVER_VERSION,
        True,
        "a session handed over to a node that dies before acknowledging it misses that node's "
        "backup",
    ),
    (codec.FORGET_VERSION, False, "a node forgotten on one node is not forgotten on the others"),
    (
        codec.REACH_VERSION,
        True,
        "a backup that lost only its own link to a node publishes its clients' wills",
    ),
    (
        codec.BOOT_VERSION,
        True,
        "a node restarted on its store publishes the wills of the clients connected at its "
        "crash even when its backup already did",
    ),
    (codec.SHARE_VERSION, False, "sessions' shares do not cross its links"),
)
#: What a refused peer is told (issue 14 item 7): nothing about our configuration.
BARE_REFUSAL = "refused"
#: A publisher paused for a session on another node (HOLD) is resumed after this long even
#: without the peer's word: a cycle of publishers and subscribers across nodes, which the
#: single-node cycle check cannot see, must not stall forever.
REMOTE_HOLD_LIMIT = 5.0
#: Shares given to publishers on peers with HOLD(resume) and not used up yet, remembered at
#: most this many (the oldest forgotten: should that publisher still use its share, its node
#: pauses it and nobody here resumes it before REMOTE_HOLD_LIMIT). A publisher that left its
#: node with its share unused stays here until then, or until its node's link goes down.
REMOTE_SHARES_MAX = 65_536
#: A publisher whose client id is longer than this (UTF-8 bytes) is resumed without a share
#: (the session counts it alone, as on a link of version 2): with REMOTE_SHARES_MAX, the
#: shares kept take at most ~65,536 x (256 + ~250) bytes, ~32 MiB, whatever the client ids.
REMOTE_SHARE_CLIENT_ID_MAX = 256
#: Outbox drops are logged at most this often per peer.
DROP_LOG_INTERVAL = 5.0
#: Seconds between two looks for expired copies of sessions of nodes that are down.
REPLICA_SWEEP_INTERVAL = 30.0
#: Peers' frames held unapplied while our backup hands our sessions back (held_frames,
#: claims_before_sync: at most join_timeout) past this many bytes, or this many frames (a
#: small frame costs ~300 bytes held as objects): we stop reading the links they come on
#: (TCP pushes back; the peers keep them in their outboxes) until it is done.
HELD_BYTES_MAX = 16 * 1024 * 1024
HELD_FRAMES_MAX = 65_536
#: Claims this node answered "no session here" are remembered this long (seconds), at most
#: this many and this many bytes of client ids: a session migrated here unasked (an
#: evacuation) that arrives after such a claim goes on to the claimer
#: (Cluster._migrated_to_claimer). Past either bound the oldest is forgotten (counted on its
#: claimer, logged).
CLAIMS_ANSWERED_SECONDS = 10.0
CLAIMS_ANSWERED_MAX = 10_000
CLAIMS_ANSWERED_BYTES = 1024 * 1024
_NODE_SUFFIX = re.compile(r"(\d+)(?:@.*)?$")
#: A shared member's key in the cluster-wide trie: node and client id.
_MEMBER_SEPARATOR = "\x00"
#: A peer's route in the cluster trie (one object for all: ~190 B per route, and a route is
#: held by every other node for every device, bench/broker_memory.py).
ROUTE_OPTIONS = SubscriptionOptions(qos=2)
#: Member states on the wire (MEMBERS).
MEMBER_GONE, MEMBER_OFFLINE, MEMBER_ONLINE = 0, 1, 2


class ClusterError(Exception):
    """A cluster that cannot start (bad ssl_options, key permissions, port in use)."""


def default_rpc_port(node_name: str) -> int:
    """Seed 002: 5370 + N for a node named ``emqx-N`` / ``emqxN`` (5370 without a suffix)."""
    match = _NODE_SUFFIX.search(node_name.split("@", 1)[0])
    return RPC_BASE_PORT + (int(match.group(1)) if match else 0)


def startup_problems(config: BrokerConfig) -> list[str]:
    """Why this node must not start: cluster TLS settings, key files readable by others."""
    return list(dict.fromkeys([*Cluster.check(config), *key_permission_problems(config)]))


def node_issuers(config: BrokerConfig) -> dict[bytes, str]:
    """DER subject -> readable name of the CAs above this node's certificate (the CA that
    issued it, and what issued that, as far as certfile and cacertfile show)."""
    cluster = config.cluster
    if cluster is None or cluster.ssl_options is None:
        return {}
    options = cluster.ssl_options
    try:
        chain = pem.load_certificates(options.certfile)
        anchors = pem.load_certificates(options.cacertfile) if options.cacertfile else []
    except TLSFileError:
        return {}
    if not chain:
        return {}
    issuers: dict[bytes, str] = {}
    names = {c.subject.public_bytes(): c for c in [*chain, *anchors]}
    current = chain[0]
    for _ in range(10):
        issuer = current.issuer
        issuers[issuer.public_bytes()] = issuer.rfc4514_string()
        parent = names.get(issuer.public_bytes())
        if parent is None or pem.is_self_signed(parent):
            break
        current = parent
    return issuers


def cluster_ca_warnings(config: BrokerConfig) -> list[str]:
    """Issue 14 item 7 (seed 002): a CA that signs node certificates should sign nothing else.
    Warned when a CA above this node's certificate also verifies MQTT clients here (an ssl
    listener's cacertfile) or names their attributes ([authorization] x509_attributes)."""
    issuers = node_issuers(config)
    if not issuers:
        return []
    warnings = []
    for listener in config.listeners:
        options = listener.ssl_options
        if options is None or options.cacertfile is None or options.verify != "verify_peer":
            continue
        try:
            client_cas = pem.load_certificates(options.cacertfile)
        except TLSFileError:
            continue
        for ca in client_cas:
            if ca.subject.public_bytes() in issuers:
                warnings.append(
                    f"the CA {ca.subject.rfc4514_string()!r} signs this node's cluster "
                    f"certificate and also verifies MQTT clients on listener {listener.label}: "
                    "a device certificate from it is one name away from a node identity; use a "
                    "CA for the cluster alone (seed 002)"
                )
    if config.authorization is not None:
        for _, subject, _ in config.authorization.x509_attributes:
            for name in issuers.values():
                if _same_name(subject, name):
                    warnings.append(
                        f"the CA {name!r} signs this node's cluster certificate and also "
                        "client certificates ([authorization] x509_attributes names it): use a "
                        "CA for the cluster alone (seed 002)"
                    )
    return list(dict.fromkeys(warnings))


def _same_name(written: str, rfc4514: str) -> bool:
    def parts(text: str) -> set[str]:
        return {part.strip().replace(" ", "").lower() for part in text.split(",")}

    return parts(written) == parts(rfc4514)


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
    # Writes to the TLS transport: a loop turn's frames go in one (ClusterLink._flush).
    writes: int = 0
    messages_forwarded: int = 0
    messages_received: int = 0
    messages_dropped_qos0_queue_full: int = 0
    messages_not_forwarded_link_down: int = 0
    send_queue_overflows: int = 0
    subscriptions_received: int = 0
    retained_sent: int = 0
    retained_received: int = 0
    claims_sent: int = 0
    claims_received: int = 0
    transfers_sent: int = 0
    transfers_received: int = 0
    merges_sent: int = 0
    deliveries_forwarded: int = 0
    reliable_sent: int = 0
    reliable_resent: int = 0
    reliable_received: int = 0
    reliable_duplicates: int = 0
    reliable_gaps: int = 0
    outbox_dropped: int = 0
    acks_sent: int = 0
    acks_received: int = 0
    publishers_paused: int = 0
    remote_pauses_sent: int = 0
    remote_pauses_received: int = 0
    remote_pauses_expired: int = 0
    remote_shares_forgotten: int = 0  # past REMOTE_SHARES_MAX, the oldest (logged)
    # Its claims we answered "none" forgotten within CLAIMS_ANSWERED_SECONDS, past
    # CLAIMS_ANSWERED_MAX or CLAIMS_ANSWERED_BYTES (logged).
    claims_answered_forgotten: int = 0
    pings_sent: int = 0
    # Times we stopped reading this peer's link: past HELD_BYTES_MAX or HELD_FRAMES_MAX held
    # for our backup.
    held_paused: int = 0
    failover_sent: int = 0  # REPLICA_PUBLISH: messages for a node that is down, to its backup
    # Forgotten (Cluster.forget): reliable frames not kept for it (messages for its
    # sessions among them: replicating, their QoS 1/2 ones went to its backup).
    forgotten_not_kept: int = 0


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


class Awaited:
    """A condition a start or a stop waits for (``await wait()``), without polling: the
    events that may make it true call ``check()``."""

    __slots__ = ("condition", "event")

    def __init__(self, condition: Callable[[], bool]) -> None:
        self.condition = condition
        self.event: asyncio.Event | None = None

    async def wait(self) -> None:
        if self.condition():
            return
        self.event = asyncio.Event()
        try:
            await self.event.wait()
        finally:
            self.event = None

    def check(self) -> None:
        if self.event is not None and self.condition():
            self.event.set()


class Peer:
    """One configured peer node, its (at most one) link, and what we keep for it."""

    __slots__ = (
        "ack_due",
        "ack_scheduled",
        "attempts",
        "autoclean_handle",
        "boot",
        "counters",
        "dial_handle",
        "dial_task",
        "dials",
        "filters",
        "forgotten",
        "forgotten_at",
        "held_publishers",
        "host",
        "inbox",
        "last_drop_log",
        "last_error",
        "link",
        "link_failed",
        "members",
        "name",
        "nobody_listening",
        "outbox",
        "port",
        "state",
        "state_since",
        "suspended",
        "synced",
        "took_our_wills",
        "unlogged_drops",
    )

    def __init__(self, name: str, host: str, port: int, dials: bool, outbox_limit: int) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.dials = dials
        self.state = LinkState.DOWN
        self.state_since = time.time()
        self.link: ClusterLink | None = None
        # Non-shared filters the peer announced (kept while it is down).
        self.filters: set[str] = set()
        # Shared members on the peer: (shared filter, client id).
        self.members: set[tuple[str, str]] = set()
        self.counters = LinkCounters()
        self.attempts = 0
        self.last_error: str | None = None
        self.dial_handle: asyncio.TimerHandle | None = None
        self.dial_task: asyncio.Task[None] | None = None
        self.outbox = Outbox(outbox_limit)
        self.inbox = Inbox()
        # The highest seq applied and not yet ACKed, and whether an ACK is on its way.
        self.ack_due = 0
        self.ack_scheduled = False
        # Publishers paused while too much to this peer is unacknowledged (session.Holder),
        # served in the order they were paused, each with its share of the room when the
        # link drains (the same rule as a session's, broker.session.HeldPublishers).
        self.held_publishers = HeldPublishers()
        # Cut by an operator: no dialing, inbound links refused.
        self.suspended = False
        # The link is up and the peer's routes, members and owned sessions are here (its
        # PONG to the PING we sent at link up came after them); and the last try at a link
        # failed (our dial, or a HELLO refused either way): Cluster.join waits for neither.
        self.synced = False
        self.link_failed = False
        # Our last dial found nobody there (refused, timed out; not a TLS failure nor a
        # refused HELLO): a node restarting on its store waits for it all the same (join).
        self.nobody_listening = False
        self.unlogged_drops = 0
        self.last_drop_log = 0.0
        # Forgotten (Cluster.forget: an operator, or autoclean): the incarnation it had
        # then (0: never met), which may not link again, and when; None: not forgotten.
        self.forgotten: int | None = None
        self.forgotten_at = 0.0
        self.autoclean_handle: asyncio.TimerHandle | None = None
        # Its HELLO's boot (0: none yet, or a version 9 link): which run of its process; and
        # its wills_taken: our boot whose connected clients' wills it published.
        self.boot = 0
        self.took_our_wills = 0

    def cancel_autoclean(self) -> None:
        """It is back, forgotten, or we stop: no autoclean timer runs for it."""
        if self.autoclean_handle is not None:
            self.autoclean_handle.cancel()
            self.autoclean_handle = None

    @property
    def connection(self) -> ClientConnection | None:
        return None  # session.Holder: a peer is never a subscriber connection

    @property
    def up(self) -> bool:
        link = self.link
        return link is not None and link.established

    @property
    def address_text(self) -> str:
        return f"{self.host}:{self.port}"

    def release_publishers(self, room: int | None = None) -> None:
        """Resume the paused publishers; ``room``: the unacknowledged bytes the link takes
        before its high-water mark, shared among them (None: the link went down)."""
        self.held_publishers.release(self, room)


class PeerHold:
    """A session on a peer is behind with a local publisher's messages (HOLD): the
    publisher's connection waits on this (session.Holder) until the peer says resume."""

    __slots__ = ("held_publishers",)

    def __init__(self) -> None:
        self.held_publishers = HeldPublishers()

    @property
    def connection(self) -> ClientConnection | None:
        return None

    def release_publishers(self) -> None:
        self.held_publishers.release(self)


class RemoteShare:
    """The share a session here gave a publisher on a peer (HOLD(resume) with a share): its
    QoS 1/2 messages to this node are counted as the peer counts them, since the peer pauses
    it itself once the share is used (cross-link fairness, issue 13)."""

    __slots__ = ("left", "session")

    def __init__(self, left: int, session: Session) -> None:
        self.left = left
        self.session = session


class RemotePublisher:
    """A publisher on another node as a local session sees it (session.Publisher): held, it
    sends HOLD(pause) to that node, released by every session, HOLD(resume) with the share
    of the last one (the publisher's node enforces it: a resumed publisher would otherwise
    send everything it has until the next HOLD(pause) crossed the link, a round trip later,
    and the session's shares would pace nobody)."""

    __slots__ = ("client_id", "cluster", "held_by", "peer")

    def __init__(self, cluster: Cluster, peer: Peer, client_id: str) -> None:
        self.cluster = cluster
        self.peer = peer
        self.client_id = client_id
        self.held_by: set[Holder] = set()

    # One per message is made (_apply); equal by node and client id, so that a session's
    # HeldPublishers knows the publisher again by any of them (its share after a release).
    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RemotePublisher)
            and other.client_id == self.client_id
            and other.peer is self.peer
        )

    def __hash__(self) -> int:
        return hash((self.peer.name, self.client_id))

    def hold_for(self, session: Holder, peer: bool = False) -> None:
        key = (self.peer.name, self.client_id)
        proxy = self.cluster.remote_publishers.get(key)
        if proxy is None:
            proxy = self.cluster.remote_publishers[key] = self
        if session in proxy.held_by:
            return
        # Paused again: a share it still had is over (its node forgets it at HOLD(pause)).
        self.cluster.remote_shares.pop(key, None)
        proxy.held_by.add(session)
        session.held_publishers.add(proxy)
        if len(proxy.held_by) == 1:
            self.peer.counters.remote_pauses_sent += 1
            self.cluster.send_hold(self.peer, self.client_id, True)

    def session_released(self, session: Holder, share: int = 0) -> None:
        self.held_by.discard(session)
        if not self.held_by:
            cluster = self.cluster
            key = (self.peer.name, self.client_id)
            cluster.remote_publishers.pop(key, None)
            if not cluster.shares_cross(self.peer):
                share = 0  # a link of version 2: the peer would refuse it (no share is kept)
            elif len(self.client_id.encode()) > REMOTE_SHARE_CLIENT_ID_MAX:
                share = 0  # kept by the session alone (REMOTE_SHARE_CLIENT_ID_MAX)
            if share and isinstance(session, Session):
                shares = cluster.remote_shares
                shares.pop(key, None)
                shares[key] = RemoteShare(share, session)
                if len(shares) > REMOTE_SHARES_MAX:
                    cluster.forget_oldest_share()
            cluster.send_hold(self.peer, self.client_id, False, share)


@dataclass(slots=True)
class Waiting:
    """A connect waiting for the answers to its claim."""

    claim: PendingClaim
    done: Callable[[ClaimOutcome], None]
    timer: asyncio.TimerHandle | None
    # A peer was down when we claimed: the session may exist there (diverged).
    unreachable: bool


class Cluster:
    """The :class:`broker.hooks.ClusterHook` of a clustered node, plus its links.

    Build it from the config, :meth:`attach` the :class:`~broker.core.Broker` (the core
    takes this object as its ``cluster``), :meth:`restore` what the store kept, then
    ``await start()``; ``await stop()`` closes every link. All methods run on the event
    loop thread.
    """

    def __init__(self, config: BrokerConfig) -> None:
        if config.cluster is None:
            raise ClusterError("no [cluster] section")
        self.config = config
        self.cluster_config: ClusterConfig = config.cluster
        # Announced in HELLO; a link speaks the lower of its two nodes' (codec.link_version).
        self.protocol_version = self.cluster_config.protocol_version
        self.node_name = config.node_name
        self.cookie = (config.cookie or "").encode("utf-8")
        self.broker: Broker | None = None
        self.peers: dict[str, Peer] = {}
        for name, host, port in self.cluster_config.peers:
            if name == self.node_name:
                continue  # one peers list shared by every node's config is fine
            self.peers[name] = Peer(
                name,
                host,
                port,
                dials=self.node_name < name,
                outbox_limit=self.cluster_config.outbox_max_bytes,
            )
        # Peer name -> non-shared filter; a trie keyed by peer name answers "which nodes".
        self.routes = SubscriptionTrie()
        # Every shared member in the cluster, this node's too, keyed node\0client.
        self.shared = SubscriptionTrie(config.mqtt.shared_subscription_strategy)
        self.members_online: dict[str, bool] = {}
        self.retained_tombstones: OrderedDict[str, float] = OrderedDict()
        self.waiting: dict[str, Waiting] = {}
        self.incarnation = secrets.randbits(63) or 1
        # This run of the process (HELLO, version 10): the incarnation outlives a restart on
        # the store, the boot does not; the last run's, read back from the store.
        self.boot = secrets.randbits(63) or 1
        self.previous_boot = 0
        # Peer -> its boot whose connected clients' wills we published as its backup (kept in
        # the store's meta as "wills_taken:NAME", told in our HELLO to it).
        self.wills_taken: dict[str, int] = {}
        # When (broker clock) our first reset in this run went to our backup: from then on it
        # leaves the delayed wills of our offline sessions to us (_owner_back).
        self.first_reset_at: float | None = None
        self.server: TLSServer | None = None
        self.server_contexts: ReloadingContext | None = None
        self.client_contexts: ReloadingContext | None = None
        self.accepting: set[ClusterLink] = set()
        self.refused_inbound = 0
        self.max_frame_size = (
            config.mqtt.max_packet_size + config.mqtt.max_queued_bytes + FRAME_OVERHEAD
        )
        self.stopping = False
        # What join() waits for (a start, before the listeners open) and drain() (a stop,
        # after the clients are gone); the link events that may end them check them.
        self.joined = Awaited(lambda: not self.unjoined())
        # Started on a disk store a run of this node wrote (restore()): the join waits for
        # the peers that are not up yet too (unjoined()).
        self.restarted_on_store = False
        # Peers' claims that came while our backup's link was up and not yet synced.
        self.claims_before_sync: list[tuple[Peer, codec.Claim]] = []
        # The last TRANSFER's seq per peer we migrated sessions to (broker.evacuation).
        self.migrated: dict[str, int] = {}
        # Claims we answered with no session here: client id -> (claimer, version, when),
        # oldest first; the bytes of their client ids; those forgotten since the last line.
        self.claims_answered: OrderedDict[str, tuple[str, Version, float]] = OrderedDict()
        self.claims_answered_bytes = 0
        self.claims_forgotten = 0
        self.claims_forgotten_logged = 0.0
        # Started without sessions (memory mode, a new store), replicating: until our backup
        # has handed back the copies of our sessions (its PONG; or it is unreachable, or the
        # join is over) our routes are not announced (the peers keep the old ones: their
        # messages for our sessions keep coming here), and the peers' reliable frames and
        # messages wait (the sessions they are for are not here yet). See _hand_back.
        self.awaiting_backup = False
        self.state_deferred: set[str] = set()
        self.held_frames: list[tuple[ClusterLink, codec.Frame]] = []
        # DELIVERs from our backup, before its PONG, for sessions not here (yet): its outbox
        # resent before its hand-back; delivered after its PONG (_deliver_received).
        self.delivers_before_hand_back: list[tuple[str, codec.DeliveryRecord]] = []
        self.delivers_before_hand_back_bytes = 0
        # What held_frames and claims_before_sync weigh, and the links we stopped reading
        # past HELD_BYTES_MAX.
        self.held_bytes = 0
        self.held_paused: set[ClusterLink] = set()
        self.drained_all = Awaited(self.drained)
        # Received STATE writes go to the state store, and a new incarnation of a peer gets
        # its keys and tombstones as STATE writes (both set by broker.statestore).
        self.state_handler: Callable[[codec.StateWrite], None] | None = None
        self.state_snapshot: Callable[[], list[codec.StateWrite]] | None = None
        # Reliable frames whose application waits for every up peer's ACK: seq per peer.
        self.ack_waiters: dict[str, list[tuple[int, Callable[[], None]]]] = {}
        # Issue 14 item 2: publishers on peers held by sessions here, and local publishers
        # held by sessions on peers, by (peer name, client id).
        self.remote_publishers: dict[tuple[str, str], RemotePublisher] = {}
        self.peer_holds: dict[tuple[str, str], PeerHold] = {}
        # Issue 13, fair service across the link: the shares sessions here gave publishers on
        # peers (counted here as there), and what local publishers may still send to a peer
        # before they pause themselves, by (peer name, client id).
        self.remote_shares: dict[tuple[str, str], RemoteShare] = {}
        self.local_shares: dict[tuple[str, str], int] = {}
        self.shares_forgotten = 0  # since the last log line (forget_oldest_share)
        self.shares_forgotten_logged = 0.0
        # Issue 14 item 7: the CAs above our node certificate, checked once against a
        # client's verified chain (PP2 chain-subjects from lb, or the broker's own TLS).
        self.node_issuers: dict[bytes, str] = {}
        self.client_ca_warned = False
        # Issue 13, session replication (broker.replica): our backup keeps copies of our
        # persistent sessions; we keep those of the nodes whose backup we are.
        self.replicating = (
            self.cluster_config.session_replicas > 0
            and self.protocol_version >= codec.REPLICA_VERSION
            and bool(self.peers)
        )
        names = [self.node_name, *self.peers]
        self.backups = {name: backup_of(name, names) for name in names}
        self.backup = self.backups[self.node_name] if self.replicating else None
        self.replicator = Replicator()
        self.replicator.on_pending = self._replica_pending
        # Publishers' acknowledgements waiting for peers to have what we sent them.
        self.forwarded = Forwarded()
        self.replica_flush: asyncio.Handle | None = None
        # Bumped at each link to the backup: a snapshot of an older link stops.
        self.replica_epoch = 0
        self.replicas = Replicas(config.mqtt.max_queued_messages, config.mqtt.max_queued_bytes)
        # Wall clock when each peer's link went down (a copy's expiry counts from it).
        self.down_since: dict[str, float] = {}
        self.replica_sweeper: asyncio.TimerHandle | None = None
        self.parked_drop_logged = 0.0
        # Inside _failover_delivery_here's sending on (a loop guard).
        self.delivering_failover = False
        # Delayed wills of a lost node's clients we publish unless they come back, or the
        # node does: client id -> (node, the will, whether it was an offline session's).
        self.lost_wills: dict[str, tuple[str, PendingWill, bool]] = {}
        # partition_handling pause_minority (broker.partition, set by broker.node): whether
        # this node reaches no more than half the cluster, and the lost peers whose clients'
        # wills wait for it to reach a majority again.
        self.pause: MinorityPause | None = None
        self.minority = False
        self.lost_in_minority: set[str] = set()
        self.lost_in_minority_handle: asyncio.TimerHandle | None = None
        # REACH (protocol 9): node -> the peers whose links reach it, by their word; the
        # nodes we lost that another still reaches (their clients' wills wait for that).
        self.reached_by: dict[str, set[str]] = {}
        self.lost_but_reached: set[str] = set()

    # --- lifecycle ---------------------------------------------------------------------------

    def attach(self, broker: Broker) -> None:
        self.broker = broker

    def replicated(self, store: Store) -> Store:
        """The node's store, wrapped so that session writes reach the backup too (or the
        store itself when this node keeps no copies elsewhere)."""
        if self.backup is None:
            return store
        return ReplicatedStore(store, self.replicator, self.forwarded)

    def restore(self, state: StoredState) -> None:
        """Outboxes, inbox high-waters, routes and our incarnation from the store."""
        broker = self.broker
        assert broker is not None
        store = broker.store
        incarnation = state.meta.get("incarnation")
        if incarnation:
            self.incarnation = int(incarnation)
            self.restarted_on_store = True
        elif store.durable:
            store.set_meta("incarnation", str(self.incarnation).encode())
        self.previous_boot = int(state.meta.get("boot", b"0") or 0)
        store.set_meta("boot", str(self.boot).encode())
        for peer in self.peers.values():
            peer.outbox.seq = int(state.meta.get(f"outbox:{peer.name}", b"0") or 0)
            for seq, data in state.outbox.get(peer.name, []):
                peer.outbox.restore(seq, data)
            seen = state.meta.get(f"inbox:{peer.name}")
            if seen:
                peer_incarnation, applied = seen.decode().split(":")
                peer.inbox = Inbox(int(peer_incarnation), int(applied))
            for topic_filter in state.routes.get(peer.name, ()):
                self._add_route(peer, topic_filter, store_it=False)
            taken = state.meta.get(f"wills_taken:{peer.name}")
            if taken:
                self.wills_taken[peer.name] = int(taken)
            forgotten = state.meta.get(f"forgotten:{peer.name}")
            if forgotten:
                incarnation_text, at = forgotten.decode().split(":")
                peer.forgotten, peer.forgotten_at = int(incarnation_text), float(at)
            if peer.outbox:
                logger.info(
                    "cluster: %d reliable frames (%d bytes) for %s wait in the outbox",
                    len(peer.outbox),
                    peer.outbox.bytes,
                    peer.name,
                )
        for session in broker.sessions.values():
            for topic_filter in session.subscriptions:
                if split_shared(topic_filter)[0] is not None:
                    self._set_member(self.node_name, topic_filter, session.client_id, False)
        self._reform_ring()  # over the peers forgotten, read back above

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
        for warning in cluster_ca_warnings(self.config):
            logger.warning("cluster: %s", warning)
        self.node_issuers = node_issuers(self.config)
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
        if self.protocol_version < codec.PROTOCOL_VERSION:
            version = self.protocol_version
            replicates = version >= codec.REPLICA_VERSION
            lacks = [
                text
                for since, replication, text in _OLDER_VERSIONS_LACK
                if version < since and (replicates or not replication)
            ]
            logger.warning(
                "cluster %s: node %s announces cluster protocol version %d ([cluster] "
                "protocol_version): %s; once every node runs a release that speaks %d, set %d "
                "(or remove it) and restart the nodes one by one",
                self.cluster_config.name,
                self.node_name,
                self.protocol_version,
                ", ".join(lacks),
                codec.PROTOCOL_VERSION,
                codec.PROTOCOL_VERSION,
            )
        if self.backup is not None:
            logger.info(
                "cluster %s: node %s replicates its persistent sessions to %s",
                self.cluster_config.name,
                self.node_name,
                self.backup,
            )
            broker = self.broker
            self.awaiting_backup = broker is not None and not broker.sessions
        self._check_majority()  # pause_minority: paused until the peers are reached
        now = time.time()
        for peer in self.peers.values():
            self.down_since[peer.name] = now
            self._autoclean_later(peer)
            if peer.dials:
                self._dial_soon(peer, 0.0)
        self.replica_sweeper = asyncio.get_running_loop().call_later(
            REPLICA_SWEEP_INTERVAL, self._sweep_replicas
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def backup_peer(self) -> Peer | None:
        """The peer that keeps copies of our sessions (None when not replicating)."""
        return None if self.backup is None else self.peers.get(self.backup)

    def drained(self) -> bool:
        """Every peer that is up has acknowledged our reliable frames, and the backup (when
        up) every replica op: closing the links now leaves nothing only this node holds."""
        if any(peer.up and peer.outbox for peer in self.peers.values()):
            return False
        backup = self.backup_peer
        return backup is None or not backup.up or self.replicator.target() is None

    def unjoined(self) -> list[str]:
        """Peers a starting node waits for before it serves clients: not synced, not known
        to be unreachable (our dial failed: nobody listens there; or a HELLO was refused),
        not cut by an operator. A peer that dials us is waited for until it does (or
        join_timeout).

        A node restarting on its disk store also waits for a peer where nobody listens yet
        (not forgotten): after a whole-cluster stop (a power loss, ``docker compose up``) the
        nodes start within a moment of each other, and the first one up, serving at once,
        made fresh sessions (session present 0) for the devices whose sessions are in the
        stores of the nodes not up yet (seen in the fleet's blackout: 90 of 6,000)."""
        return [peer.name for peer in self.peers.values() if self._joins_wait_for(peer)]

    def _joins_wait_for(self, peer: Peer) -> bool:
        if peer.synced or peer.suspended:
            return False
        if not peer.link_failed:
            return True
        return self.restarted_on_store and peer.nobody_listening and peer.forgotten is None

    async def join(self) -> None:
        """At start, before the listeners open: until unjoined() is empty (the caller bounds
        it with join_timeout)."""
        await self.joined.wait()

    async def drain(self) -> None:
        """At a stop, once the clients are gone: until drained() (the caller bounds it)."""
        await self.drained_all.wait()

    def log_undrained(self, seconds: float) -> None:
        """drain() did not end within ``seconds``: what the links take with them."""
        waiting = {
            peer.name: len(peer.outbox) for peer in self.peers.values() if peer.up and peer.outbox
        }
        logger.warning(
            "cluster: stopping with reliable frames unacknowledged after %gs: %s; replica ops %s",
            seconds,
            ", ".join(f"{name} {count}" for name, count in sorted(waiting.items())) or "none",
            "acknowledged" if self.replicator.target() is None else "waiting",
        )

    async def stop(self) -> None:
        self.stopping = True
        if self.replica_sweeper is not None:
            self.replica_sweeper.cancel()
            self.replica_sweeper = None
        if self.lost_in_minority_handle is not None:
            self.lost_in_minority_handle.cancel()
            self.lost_in_minority_handle = None
        for contexts in (self.server_contexts, self.client_contexts):
            if contexts is not None:
                contexts.stop()
        if self.server is not None:
            self.server.close()
        for waiting in list(self.waiting.values()):
            if waiting.timer is not None:
                waiting.timer.cancel()
        self.waiting.clear()
        for peer in self.peers.values():
            peer.cancel_autoclean()
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

    # --- operators: cut and restore a link -----------------------------------------------------

    def suspend(self, name: str) -> dict[str, Any]:
        """Close the link to ``name`` and keep it down (admin API)."""
        peer = self.peers.get(name)
        if peer is None:
            raise KeyError(name)
        peer.suspended = True
        if peer.dial_handle is not None:
            peer.dial_handle.cancel()
            peer.dial_handle = None
        if peer.link is not None:
            peer.link.close("link suspended by an operator")
        logger.warning("cluster link to %s suspended by an operator", name)
        return {"peer": name, "suspended": True}

    def resume(self, name: str) -> dict[str, Any]:
        peer = self.peers.get(name)
        if peer is None:
            raise KeyError(name)
        peer.suspended = False
        peer.attempts = 0
        logger.warning("cluster link to %s resumed by an operator", name)
        if peer.dials and peer.link is None:
            self._dial_soon(peer, 0.0)
        return {"peer": name, "suspended": False}

    def forget(self, name: str, by: str = "an operator") -> dict[str, Any]:
        """Forget ``name``, a peer that is down for good (EMQX's ``cluster force-leave``; the
        admin API, or ``autoclean``), here and on the other nodes (FORGET, on links of
        version 8: each forgets it too unless it still reaches it): what waits in its outbox
        goes, and nothing more is kept for it. Replicating, its routes stay and the QoS 1/2
        messages for its sessions go on to its backup (whose copies are its sessions now);
        without a backup its routes and shared members go too. It may link again only as a
        new incarnation (started without its store: its backup hands its sessions back), as
        what it missed is gone. Raises KeyError (no such peer) or ValueError (it is up)."""
        peer = self.peers.get(name)
        if peer is None:
            raise KeyError(name)
        if peer.up:
            raise ValueError(
                f"node {name!r} is up: only a node that is down (for good) can be forgotten"
            )
        if peer.forgotten is None:
            self._forget(peer, by)
        return {"peer": name, "forgotten": True, "since": peer.forgotten_at}

    def _forget(self, peer: Peer, by: str, tell: bool = True) -> None:
        """Forget ``peer`` (forget()); ``tell``: the other nodes too (not when one of them
        told us)."""
        broker = self.broker
        assert broker is not None
        outbox = peer.outbox
        frames, size = len(outbox), outbox.bytes
        outbox.ack(outbox.seq)
        broker.store.ack_outbox(peer.name, outbox.seq)
        peer.forgotten, peer.forgotten_at = peer.inbox.incarnation, time.time()
        broker.store.set_meta(
            f"forgotten:{peer.name}", f"{peer.forgotten}:{peer.forgotten_at}".encode()
        )
        peer.cancel_autoclean()
        backup = self.backups.get(peer.name) if self.replicating else None
        if backup is None:
            routes = len(peer.filters)
            self._drop_routes(peer)
            self._drop_members(peer)
            kept = f"its {routes} routes dropped: messages for its sessions are not kept"
        elif backup == self.node_name:
            kept = "messages for its sessions go to our copies of them only"
        else:
            kept = f"messages for its sessions go to its backup {backup} only"
        since = self.down_since.get(peer.name)
        logger.warning(
            "cluster: node %s forgotten by %s (down since %s): %d reliable frames (%d bytes) "
            "that waited for it discarded; %s; it may link again only as a new incarnation "
            "(started without its store)",
            peer.name,
            by,
            "?" if since is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)),
            frames,
            size,
            kept,
        )
        if tell:
            frame = codec.encode(codec.Forget(peer.name))
            for _, link in self._up_links():
                if link.protocol_version >= codec.FORGET_VERSION:
                    link.send(frame)
        self._reform_ring()
        self._check_majority()
        self.drained_all.check()

    def _send_forgotten(self, link: ClusterLink) -> None:
        """At link up: the nodes we have forgotten (FORGET), for a peer that was away when
        we did (or whose link dropped before it had the frame)."""
        if link.protocol_version < codec.FORGET_VERSION:
            return
        for peer in self.peers.values():
            if peer.forgotten is not None:
                link.send(codec.encode(codec.Forget(peer.name)))

    def _forget_received(self, peer: Peer, frame: codec.Forget) -> None:
        """``peer`` has forgotten ``frame.node``: so do we, unless our link to it is up (it
        is not lost; logged) or it is us (the peer took us for lost while its link to us was
        down; that link is up now)."""
        target = self.peers.get(frame.node)
        if target is None or target.forgotten is not None:
            return
        if target.up:
            logger.warning(
                "cluster: node %s has forgotten node %s, whose link is up here: not forgotten here",
                peer.name,
                target.name,
            )
            return
        self._forget(target, f"node {peer.name}", tell=False)

    def _reform_ring(self, start_now: bool = True) -> None:
        """The backups over the nodes not forgotten (broker.replica.backup_of; a forgotten
        node keeps the backup it had, which holds its copies): after a node is forgotten the
        node before it gets a backup again, so the cluster survives the loss of another node;
        when it is back, the ring is as configured again. Our backup may move
        (_backup_moved; ``start_now``: start replicating to it here, else the caller does)."""
        if not self.replicating:
            return
        names = [self.node_name]
        names.extend(peer.name for peer in self.peers.values() if peer.forgotten is None)
        for name in names:
            self.backups[name] = backup_of(name, names)
        backup = self.backups[self.node_name]
        if backup != self.backup:
            self._backup_moved(backup, start_now)

    def _backup_moved(self, backup: str | None, start_now: bool) -> None:
        """Our backup is now ``backup``: the old one, when up, is told to drop our copies (a
        REPLICA reset with no ops: it keeps nothing of ours that would go stale), and the new
        one gets a reset and a snapshot once its link is up. Promises waiting for the old one
        wait for the new one's snapshot (broker.replica.Replicator) when its link is up, else
        nothing waits for a backup (as when its link drops)."""
        old = self.backup_peer
        if old is not None and old.link is not None and old.up:
            old.link.send(codec.encode(codec.Replica(0, True, ())))
        previous, self.backup = self.backup, backup
        peer = self.backup_peer
        # The link to the new backup, when it is up and carries replication.
        link = peer.link if peer is not None and peer.up else None
        if link is not None and link.protocol_version < codec.REPLICA_VERSION:
            link = None
        if link is None and self.replicator.active:
            for callback in self.replicator.stop():
                callback()
        logger.warning(
            "cluster: our backup is now %s (was %s)%s",
            backup or "none",
            previous,
            "" if link is None else ": our sessions are copied to it",
        )
        if link is not None and start_now:
            link.start_snapshot(self._start_replication(link))

    def _autoclean_later(self, peer: Peer) -> None:
        """``peer`` is down: forgotten after ``autoclean`` unless it is back first."""
        delay = self.cluster_config.autoclean
        if not delay or peer.forgotten is not None or peer.autoclean_handle is not None:
            return

        def autoclean() -> None:
            peer.autoclean_handle = None
            if peer.up or peer.forgotten is not None or self.stopping:
                return
            if self.minority:
                # A minority forgetting the majority would make itself one.
                logger.warning(
                    "cluster: autoclean of node %s waits: this node is in a minority",
                    peer.name,
                )
                self._autoclean_later(peer)
                return
            self._forget(peer, f"autoclean (down for {delay:g} s)")

        peer.autoclean_handle = asyncio.get_running_loop().call_later(delay, autoclean)

    # --- dialing -----------------------------------------------------------------------------

    def _dial_soon(self, peer: Peer, delay: float) -> None:
        if self.stopping or peer.suspended:
            return
        loop = asyncio.get_running_loop()

        def dial() -> None:
            peer.dial_handle = None
            peer.dial_task = loop.create_task(self._dial(peer))

        peer.dial_handle = loop.call_later(delay, dial)

    def _redial(self, peer: Peer) -> None:
        if self.stopping or not peer.dials or peer.dial_handle is not None or peer.suspended:
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
            peer.link_failed = True
            peer.nobody_listening = not isinstance(error, ssl.SSLError)
            peer.dial_task = None  # this task is ending: let _redial schedule the next one
            self._redial(peer)
            self.joined.check()
            if peer.name == self.backup:
                self._backup_news()

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

    def hello_received(self, link: ClusterLink, hello: codec.Hello) -> tuple[str, str] | None:
        """Validate a peer's HELLO; returns the refusal (the reason, logged here, and what
        the peer is told), or None when accepted. Issue 14 item 7: a peer is told nothing
        about our configuration, but a forgotten one, checked after it passed every other
        check, learns what to do."""
        refusal = self._hello_refusal(link, hello)
        if refusal is not None:
            return refusal, BARE_REFUSAL
        peer = self.peers[hello.node]
        if peer.forgotten is not None and hello.incarnation == peer.forgotten:
            at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(peer.forgotten_at))
            refusal = (
                f"node {peer.name!r} was forgotten by node {self.node_name!r} at {at} and kept "
                "its store (the same incarnation): what was kept for it is gone; start it "
                "without its store to rejoin (its backup hands its sessions back)"
            )
            return refusal, refusal
        return None

    def _hello_refusal(self, link: ClusterLink, hello: codec.Hello) -> str | None:
        """Why a peer's HELLO is refused (nothing of it is told to the peer), or None."""
        if codec.link_version(self.protocol_version, hello.version) is None:
            return self._version_refusal(hello)
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
        if peer.suspended:
            return f"the link to node {hello.node!r} is suspended by an operator"
        # The shared CA also signs devices: the certificate must be one issued for this node,
        # naming it or its configured address, not just any certificate from that CA.
        if hello.node not in link.peer_names and peer.host not in link.peer_names:
            names = ", ".join(sorted(link.peer_names)) or "none"
            return (
                f"the certificate of node {hello.node!r} names neither it nor its address "
                f"{peer.host} (subjectAltName/CN: {names})"
            )
        return None

    def _version_refusal(self, hello: codec.Hello) -> str:
        """A peer of a version this node does not speak: both versions, and what to do."""
        speaks = f"{codec.MIN_PROTOCOL_VERSION} to {codec.PROTOCOL_VERSION}"
        if hello.version < codec.MIN_PROTOCOL_VERSION:
            advice = (
                f"upgrade node {hello.node!r} to a release that speaks version "
                f"{codec.MIN_PROTOCOL_VERSION} or later"
            )
        else:
            advice = (
                f"upgrade this node, or set [cluster] protocol_version = "
                f"{codec.PROTOCOL_VERSION} on node {hello.node!r} until every node is upgraded"
            )
        return (
            f"node {hello.node!r} speaks cluster protocol version {hello.version}, "
            f"this node {speaks}: {advice}"
        )

    def hello_for(self, peer: Peer) -> bytes:
        inbox = peer.inbox
        return codec.encode(
            codec.Hello(
                self.protocol_version,
                self.node_name,
                self.cluster_config.name,
                self.cookie,
                self.incarnation,
                inbox.incarnation,
                inbox.applied,
                self.boot,
                self.wills_taken.get(peer.name, 0),
            )
        )

    def link_up(self, link: ClusterLink, peer: Peer, hello: codec.Hello) -> None:
        old = peer.link
        if old is not None and old is not link:
            # The peer restarted while the old connection looked alive: the new one wins.
            old.replaced = True
            old.close("replaced by a new link")
        self.accepting.discard(link)
        peer.link = link
        peer.boot = hello.boot
        peer.took_our_wills = hello.wills_taken
        peer.attempts = 0
        peer.counters.connects += 1
        broker = self.broker
        assert broker is not None
        peer.cancel_autoclean()
        if peer.forgotten is not None:
            # A new incarnation (hello_received refused the one forgotten).
            peer.forgotten = None
            broker.store.set_meta(f"forgotten:{peer.name}", b"")
            logger.warning(
                "cluster: node %s, forgotten, is back as a new incarnation: a member again",
                peer.name,
            )
            self._reform_ring(start_now=False)
        new_life = peer.inbox.peer_incarnation(hello.incarnation)
        if new_life:
            # A new life of the peer (it started without its store, or for the first
            # time): its seqs start over.
            peer.ack_due = 0
            self._save_inbox(peer)
        orphans = self.replicas.orphan(peer.name, hello.incarnation)
        # Where the peer stands with our frames: everything up to last_applied is applied,
        # if it speaks of this incarnation of ours; otherwise it has none of them.
        applied = hello.last_applied if hello.peer_incarnation == self.incarnation else 0
        if applied:
            self._acked(peer, applied)
        resend = sum(1 for seq, _ in peer.outbox.entries if seq > applied)
        logger.info(
            "cluster link to %s (%s) is up (%s, %s, protocol version %d)%s",
            peer.name,
            link.address_text,
            link.direction,
            link.tls_version or "?",
            link.protocol_version,
            f", resending {resend} reliable frames" if resend else "",
        )
        peer.last_error = None
        self._set_state(peer, LinkState.UP)
        if self.awaiting_backup:
            self.state_deferred.add(peer.name)
        else:
            self._send_state(link)
        self._send_forgotten(link)
        self._send_reach(link)
        # The peer's PONG comes after its own SYNC, MEMBERS and OWNED (it sent them when it
        # read our HELLO, before this PING): then it is synced (join).
        peer.synced = False
        peer.link_failed = False
        peer.nobody_listening = False
        link.send(codec.encode(codec.Ping()))
        self.down_since.pop(peer.name, None)
        snapshot: Iterator[bytes] = iter(())
        if peer.name == self.backup and link.protocol_version >= codec.REPLICA_VERSION:
            snapshot = self._start_replication(link)
        link.start_backlog(applied, self._retained_frames(), snapshot)
        # After the outbox's frames in seq order (a new inbox takes its first frame's seq as
        # its count: sent ahead, these would have made the older ones duplicates), and before
        # our PONG (ClusterLink.pong): the peer has them when it joins.
        if orphans is not None:
            self._hand_back(peer, orphans)
        if new_life and self.state_snapshot is not None:
            self._send_state_store(peer)
        self._claim_from_late_peer(peer)

    def _claim_from_late_peer(self, peer: Peer) -> None:
        """``peer`` is up while connects here wait for the answers to their claims: it was
        down when they claimed (or its link went since it answered), and it may hold their
        sessions (restarted, its backup handed them back to it; or its link was cut). Each
        claim goes to it too and waits for its answer. Before, such a claim settled without
        it (a fresh session), and the peer's OWNED at link up was skipped for a client id
        whose claim was under way: the session there, with what was queued for it, stayed
        behind (found in the fleet's rolling restart: QoS 1 commands acknowledged, queued on
        the restarted node, never delivered)."""
        link = peer.link
        if not self.waiting or link is None:
            return
        for waiting in self.waiting.values():
            claim = waiting.claim
            if peer.name in claim.waiting:
                continue
            claim.waiting.add(peer.name)
            peer.counters.claims_sent += 1
            link.send(codec.encode(codec.Claim(claim.client_id, claim.version, claim.clean_start)))
            # Unreachable only if some peer still is (each that comes up is asked).
            waiting.unreachable = any(not other.up for other in self.peers.values())

    def _send_state_store(self, peer: Peer) -> None:
        """``peer`` is a new incarnation (it restarted without its store, or is new): it
        has none of the state store's keys but those written while it was down (our
        outbox), so it gets every key and tombstone as a STATE write, applied only where
        newer (a rolling restart in memory mode lost the keys node by node)."""
        assert self.state_snapshot is not None
        writes = self.state_snapshot()
        for write in writes:
            self.send_reliable(peer, write)
        if writes:
            logger.info(
                "cluster: %d state store keys and tombstones sent to %s (a new incarnation)",
                len(writes),
                peer.name,
            )

    def link_lost(self, link: ClusterLink, reason: str) -> None:
        self.accepting.discard(link)
        peer = link.peer
        if peer is None or peer.link is not link:
            # Never established (refused either way, timed out) or replaced.
            if peer is not None and peer.link is None:
                peer.link_failed = True
                peer.nobody_listening = False  # it answered: refused, or the TLS failed
                if link.direction == "outbound":
                    self._link_failed(peer, link.refusal or reason)
                    self._redial(peer)
                self.joined.check()
                if peer.name == self.backup:
                    self._backup_news()
            return
        peer.link = None
        peer.synced = False
        peer.counters.disconnects += 1
        if peer.name == self.backup:
            self._backup_news()
        if self.stopping:
            # We close the link: the peer is not lost (no failover, no wills of its clients).
            logger.info("cluster link to %s (%s) closed: %s", peer.name, link.address_text, reason)
            self._set_state(peer, LinkState.DOWN)
            return
        self.down_since[peer.name] = time.time()
        self._autoclean_later(peer)
        if peer.name == self.backup and self.replicator.active:
            # One copy from now on, as on a single node: nothing waits for the backup.
            for callback in self.replicator.stop():
                callback()
        self._release_waiters(peer)
        self._tell_reach(peer.name, False)
        self._check_majority()
        self._peer_lost(peer.name)
        # What it told us it reaches counts no more.
        for name in [name for name, seen in self.reached_by.items() if peer.name in seen]:
            self.reached_by[name].discard(peer.name)
            if name in self.lost_but_reached and not self.reached_by[name]:
                self._peer_lost(name)
        if self.replicating:
            self._failover_outbox(peer)
            # Acknowledgements waiting for it now wait for its backup, which got its frames.
            backup = self.backups.get(peer.name)
            target = None if backup is None else self.peers.get(backup)
            moved = target.name if target is not None and target.up else None
            for callback in self.forwarded.link_lost(peer.name, moved):
                callback()
        for record, dropped_here in self.replicas.adopt_parked(peer.name, time.monotonic()):
            self._adopted(peer.name, record, dropped_here)
        if peer.name in self.replicas.parked:
            queued, dropped, elsewhere = self.replicas.owner_down(peer.name, time.monotonic())
            self._failover_dropped(peer.name, dropped)
            for message, members in elsewhere:
                self._redispatch(peer.name, message, members)
            self._forward_moved()
            if queued:
                logger.info(
                    "cluster: %d messages for sessions of %s, parked while only their sender "
                    "had lost it, queued for our copies",
                    queued,
                    peer.name,
                )
        self._forget_holds(peer)
        # Routes stay: messages for the peer's persistent sessions wait in its outbox. Its
        # shared members stay too, but are picked only when no other member is reachable
        # (replicating, what they are sent also goes to the peer's backup: REPLICA_SHARED).
        peer.release_publishers()
        for waiting in list(self.waiting.values()):
            if peer.name in waiting.claim.waiting:
                waiting.claim.answered(peer.name)
                waiting.unreachable = True
                self._maybe_settled(waiting.claim.client_id)
        if link.established:
            logger.warning("cluster link to %s (%s) lost: %s", peer.name, link.address_text, reason)
            peer.last_error = reason
            self._set_state(peer, LinkState.DOWN)
        else:
            self._link_failed(peer, link.refusal or reason)
        self._redial(peer)
        self.drained_all.check()

    def _announced_filters(self) -> list[str]:
        assert self.broker is not None
        return sorted(f for f in self.broker.local_filters() if split_shared(f)[0] is None)

    def _local_members(self) -> list[tuple[int, str, str]]:
        broker = self.broker
        assert broker is not None
        entries = []
        for session in broker.sessions.values():
            if session.moved_to is not None:
                continue
            state = MEMBER_ONLINE if session.connection is not None else MEMBER_OFFLINE
            for topic_filter in session.subscriptions:
                if split_shared(topic_filter)[0] is not None:
                    entries.append((state, topic_filter, session.client_id))
        return entries

    def _owned(self) -> list[tuple[str, Version]]:
        broker = self.broker
        assert broker is not None
        return [
            (session.client_id, session.version)
            for session in broker.sessions.values()
            if session.moved_to is None and session.version is not None
        ]

    def _retained_frames(self) -> Iterator[bytes]:
        broker = self.broker
        assert broker is not None
        now = broker.clock()
        for topic, message in broker.retained.items():
            if message.is_expired(now):
                continue
            changed_at = broker.retained_changed_at.get(topic, 0.0)
            yield codec.encode(
                codec.Retain(
                    topic,
                    codec.WireMessage.from_message(message, now, self.node_name),
                    changed_at,
                )
            )
        # Deletions too: a peer that was down while a retained message was deleted still
        # has it, and drops it on the newer deletion (its copy is older).
        for topic, changed_at in list(self.retained_tombstones.items()):
            yield codec.encode(codec.Retain(topic, None, changed_at))

    # --- session replication (broker.replica) -------------------------------------------------

    def _start_replication(self, link: ClusterLink) -> Iterator[bytes]:
        """The link to our backup is up: a reset now, then (as the link drains) a snapshot of
        every persistent session; writes from now on go as they are made."""
        replicator = self.replicator
        replicator.start(wills=link.protocol_version >= codec.FAILOVER_VERSION)
        if self.first_reset_at is None and self.broker is not None:
            self.first_reset_at = self.broker.clock()
        self.replica_epoch += 1
        link.send(codec.encode(replicator.frame((), reset=True)))
        return self._snapshot(self.replica_epoch)

    def _snapshot(self, epoch: int) -> Iterator[bytes]:
        broker = self.broker
        assert broker is not None
        replicator = self.replicator
        client_ids = list(broker.sessions)
        ops: list[codec.ReplicaOp] = []
        size = sessions = 0
        started = time.monotonic()
        for client_id in client_ids:
            if epoch != self.replica_epoch:
                return
            session = broker.sessions.get(client_id)
            if session is None or session.moved_to is not None:
                continue
            will = self._will_op(session) if replicator.wills else None
            if will is not None:
                ops.append(will)
                size += op_size(will)
            if not session.durable:
                continue
            sessions += 1
            for op in self._session_ops(session):
                ops.append(op)
                size += op_size(op)
            if size >= REPLICA_FRAME_BYTES:
                yield codec.encode(replicator.frame(tuple(ops)))
                ops, size = [], 0
        if epoch != self.replica_epoch:
            return
        if ops:
            yield codec.encode(replicator.frame(tuple(ops)))
        replicator.snapshot_sent()
        logger.info(
            "cluster: %d persistent sessions sent to %s (our backup) in %.1fs",
            sessions,
            self.backup,
            time.monotonic() - started,
        )

    def _session_ops(self, session: Session) -> Iterator[codec.ReplicaOp]:
        """The writes that make ``session`` on the backup (as broker.core stores it)."""
        broker = self.broker
        assert broker is not None
        client_id = session.client_id
        record = broker.session_record(session, deliveries=False)
        yield codec.ReplicaOp(
            codec.ReplicaOpKind.SAVE, client_id, data=codec.encode_session(record)
        )
        for packet_id in session.incoming_ids():
            yield codec.ReplicaOp(codec.ReplicaOpKind.INCOMING_ADD, client_id, packet_id=packet_id)
        for outgoing in session.inflight.values():
            pending = outgoing.pending
            if pending.key:
                record_bytes = codec.encode_delivery(
                    broker.delivery_record(pending, outgoing.packet_id, True, outgoing.released)
                )
                yield codec.ReplicaOp(
                    codec.ReplicaOpKind.DELIVERY_ADD, client_id, pending.key, data=record_bytes
                )
        for pending in session.queued():
            if pending.key:
                record_bytes = codec.encode_delivery(
                    broker.delivery_record(pending, pending.packet_id)
                )
                yield codec.ReplicaOp(
                    codec.ReplicaOpKind.DELIVERY_ADD, client_id, pending.key, data=record_bytes
                )

    def _will_op(self, session: Session) -> codec.ReplicaOp | None:
        """WILL_SET for the will of ``session``'s connection, when it has one its client may
        publish (the backup publishes it if we are lost while the client is connected)."""
        broker = self.broker
        assert broker is not None
        will = broker.live_will(session)
        return None if will is None else self._will_set(session, will)

    @staticmethod
    def _will_set(session: Session, will: bytes) -> codec.ReplicaOp:
        """WILL_SET of ``session``'s will (Broker.live_will), noted as copied."""
        session.will_copied = True
        return codec.ReplicaOp(codec.ReplicaOpKind.WILL_SET, session.client_id, data=will)

    def crash_wills_holder(self) -> tuple[str, float] | None:
        """After the join: the node that took our wills over when we last stopped without
        ending our clients' connections (broker.core.Broker.settle_wills_at_crash), and until
        when; None when none did. Our backup then took them, when their link dropped, if it
        says so in its HELLO (wills_taken: our last boot): it published the wills of the
        clients connected then, and those of our offline sessions that fell due until our
        first reset reached it (from then on it leaves them to us, _owner_back; for ever if
        it is not our backup now). A backup that died with us (the whole cluster went down)
        published nothing, and one not linked now cannot say (we publish: at worst twice)."""
        if not self.previous_boot:
            return None
        for peer in self.peers.values():
            if peer.up and peer.took_our_wills == self.previous_boot:
                until = self.first_reset_at if peer.name == self.backup else None
                return peer.name, math.inf if until is None else until
        return None

    def _peer_lost(self, name: str) -> None:
        """Our link to ``name`` is down (or its last other link is, by their word): if we are
        its backup, the wills of its clients are due (_publish_lost_wills), unless we are in
        a minority (broker.partition: more likely we are cut off than it is dead) or another
        node still reaches it (REACH: only our link broke); then they wait."""
        if name not in self.replicas.wills and name not in self.replicas.origins:
            return
        peer = self.peers.get(name)
        if peer is None or peer.up:
            return
        if self.minority:
            why = f"node {name} is down, but this node is in a minority"
            self._wills_wait(name, self.lost_in_minority, why, "it reaches a majority again")
            return
        seen = self.reached_by.get(name)
        if seen:
            why = f"our link to node {name} is down, but {', '.join(sorted(seen))} still "
            why += "reach it" if len(seen) > 1 else "reaches it"
            self._wills_wait(name, self.lost_but_reached, why, "no node does")
            return
        self.lost_but_reached.discard(name)
        self._publish_lost_wills(name)

    def _wills_wait(self, name: str, waiting: set[str], why: str, until: str) -> None:
        """The wills of ``name``'s clients wait (in ``waiting``), said once."""
        if name not in waiting:
            waiting.add(name)
            logger.warning("cluster: %s: the wills of its clients wait until %s", why, until)

    def _tell_reach(self, name: str, up: bool) -> None:
        """REACH (protocol 9): our link to ``name`` is up (synced) or down, told to every
        other peer whose link is up."""
        frame = codec.encode(codec.Reach(name, up))
        for other, link in self._up_links():
            if other.name != name and link.protocol_version >= codec.REACH_VERSION:
                link.send(frame)

    def _send_reach(self, link: ClusterLink) -> None:
        """At link up: the peers we reach, for the new link's peer."""
        if link.protocol_version < codec.REACH_VERSION:
            return
        for peer in self.peers.values():
            if peer.link is not link and peer.up and peer.synced:
                link.send(codec.encode(codec.Reach(peer.name, True)))

    def _reach_received(self, peer: Peer, frame: codec.Reach) -> None:
        """``peer``'s link to ``frame.node`` is up or down; a node we lost that nobody
        reaches any more is lost (its clients' wills, when we are its backup)."""
        if frame.node == self.node_name or frame.node not in self.peers:
            return
        seen = self.reached_by.setdefault(frame.node, set())
        if frame.up:
            seen.add(peer.name)
            return
        seen.discard(peer.name)
        if not seen and frame.node in self.lost_but_reached:
            self._peer_lost(frame.node)

    def _check_majority(self) -> None:
        """partition_handling pause_minority (broker.partition): does this node reach more
        than half the nodes not forgotten, itself included (each peer linked and synced)?
        Tells the pause. Back in a majority, the wills of the peers lost meanwhile are
        published for those still down ``join_timeout`` later (the links of a heal come up
        one by one: the first may make the majority while the others are on their way)."""
        pause = self.pause
        if pause is None or self.stopping:
            return
        members = [peer for peer in self.peers.values() if peer.forgotten is None]
        reached = sorted(peer.name for peer in members if peer.up and peer.synced)
        minority = (len(reached) + 1) * 2 <= len(members) + 1
        why = f"{len(reached) + 1} of {len(members) + 1} nodes" + (
            f" ({', '.join(reached)} and itself)" if reached else " (itself)"
        )
        regained = self.minority and not minority
        self.minority = minority
        pause.update(minority, why, self._wills_are_ours)
        handle = self.lost_in_minority_handle
        if minority and handle is not None:
            handle.cancel()
            self.lost_in_minority_handle = None
        elif regained and self.lost_in_minority and handle is None:
            self.lost_in_minority_handle = asyncio.get_running_loop().call_later(
                self.cluster_config.join_timeout, self._lost_in_minority_due
            )

    def _lost_in_minority_due(self) -> None:
        """Back in a majority for ``join_timeout``: the peers lost while we were in a
        minority and still down are taken for lost now (their clients' wills)."""
        self.lost_in_minority_handle = None
        lost, self.lost_in_minority = sorted(self.lost_in_minority), set()
        for name in lost:
            peer = self.peers.get(name)
            if peer is not None and not peer.up:
                logger.warning(
                    "cluster: node %s, lost while this node was in a minority, is still down",
                    name,
                )
                self._peer_lost(name)

    def _wills_are_ours(self) -> bool:
        """Are the wills of our clients ours to publish when a pause closes them? Not when
        our backup is down: it took us for lost and published them."""
        backup = self.backup_peer
        return backup is None or backup.up

    def _publish_lost_wills(self, origin: str) -> None:
        """Our link to ``origin``, whose backup we are, dropped: the wills of its clients
        that were connected are due (their connections ended without DISCONNECT), at once or
        after their Will Delay Interval, as ``origin`` would have published them; so are the
        delayed wills of its offline sessions, at their time. A client that connects again
        first (anywhere: its claim reaches us) cancels its delayed will."""
        broker = self.broker
        assert broker is not None
        live, delayed = self.replicas.wills_due(origin)
        boot = self.peers[origin].boot if origin in self.peers else 0
        if boot and self.wills_taken.get(origin) != boot:
            # Told to it when it is back (HELLO), also after our own restart: it does not
            # publish them again from its store.
            self.wills_taken[origin] = boot
            broker.store.set_meta(f"wills_taken:{origin}", str(boot).encode())
        now = broker.clock()
        wall = time.time()
        due = [
            (cid, will.message, float(will.delay), will.expiry_interval, False)
            for cid, will in live
        ]
        due.extend(
            (cid, will.message, max(0.0, will.publish_at - wall), will.expiry_interval, True)
            for cid, will in delayed
        )
        before = broker.counters.wills_published
        waiting = 0
        for client_id, message, delay, expiry, offline in due:
            if self._schedule_lost_will(origin, client_id, message, now, delay, expiry, offline):
                waiting += 1
        published = broker.counters.wills_published - before
        if published or waiting:
            logger.info(
                "cluster: node %s is down: %d wills of its clients published, %d to be "
                "published after their delay unless the client comes back",
                origin,
                published,
                waiting,
            )

    def _schedule_lost_will(
        self,
        origin: str,
        client_id: str,
        message: codec.WireMessage,
        now: float,
        delay: float,
        expiry: int | None,
        offline: bool,
    ) -> bool:
        """A will of a client of ``origin`` (lost), published in ``delay`` seconds unless
        the client comes back first (then True: it waits, in lost_wills); False when it was
        published now, or a will of a session of ours waits already (it wins)."""
        broker = self.broker
        assert broker is not None
        pending = broker.schedule_will(client_id, message.to_message(now), delay, expiry)
        if pending is None:
            return False
        self.lost_wills[client_id] = (origin, pending, offline)
        return True

    def _owner_back(self, origin: str, frame: codec.Replica, same_life: bool) -> None:
        """``origin``, whose delayed wills we hold since its link dropped, replicates to us
        again. Not ours to publish: the wills of offline sessions when it is the same life
        (it kept its store, or never died: it has them), and a will it copies again (that
        client is connected there)."""
        broker = self.broker
        assert broker is not None
        back: list[str] = []
        if frame.reset and same_life:
            back = [
                client_id
                for client_id, (node, _, offline) in self.lost_wills.items()
                if node == origin and offline
            ]
        back.extend(op.client_id for op in frame.ops if op.kind == codec.ReplicaOpKind.WILL_SET)
        for client_id in back:
            held = self.lost_wills.get(client_id)
            if held is not None and held[0] == origin:
                del self.lost_wills[client_id]
                if broker.pending_wills.get(client_id) is held[1]:
                    del broker.pending_wills[client_id]

    def _replica_pending(self, linger: bool | None) -> None:
        """broker.replica.Replicator.on_pending: send the batch after the linger (True) or
        now (False, it is large), or run the promises a cancelled add let through (None)."""
        loop = asyncio.get_running_loop()
        if linger is None:
            loop.call_soon(self._replica_due)
            return
        flush = self.replica_flush
        if flush is not None:
            if linger:
                return
            flush.cancel()
        if linger:
            self.replica_flush = loop.call_later(LINGER_SECONDS, self._flush_replica)
        else:
            self.replica_flush = loop.call_soon(self._flush_replica)

    def _replica_due(self) -> None:
        for callback in self.replicator.due():
            callback()

    def _flush_replica(self) -> None:
        """The session writes of the last LINGER_SECONDS, to the backup."""
        self.replica_flush = None
        replicator = self.replicator
        peer = self.backup_peer
        link = None if peer is None else peer.link
        if link is None or not link.established or not replicator.active:
            return
        for frame in replicator.frames():
            if not link.send(codec.encode(frame)):
                return  # the link closed (link_lost stopped the replicator)
        self._replica_due()  # promises whose ops were all cancelled

    def _failover_outbox(self, peer: Peer) -> None:
        """The link to ``peer`` dropped: the messages it had not acknowledged may have died
        with it, so they go to its backup too (the copies are de-duplicated there)."""
        if not peer.outbox or self.backups.get(peer.name) is None:
            return
        messages = sessions = 0
        # A copy of the entries: a failover here passes messages on to where our copies'
        # sessions went (broker.replica.MovedCopy), which adds to an outbox (to this peer's,
        # should a stub point at it) while we go through them.
        for _, data in list(peer.outbox.entries):
            decoder = codec.ClusterDecoder(len(data))
            decoder.feed(data)
            frame = decoder.next_event()
            if not isinstance(frame, codec.Reliable):
                continue
            inner = frame.frame
            if isinstance(inner, codec.Publish) and inner.message.qos:
                self._send_failover(peer.name, inner.message, inner.plain, inner.targets)
                messages += 1
            elif isinstance(inner, codec.Deliver) and inner.delivery.qos:
                self._send_failover_delivery(peer.name, inner.client_id, inner.delivery)
                messages += 1
            elif isinstance(inner, codec.Transfer):
                # A session handed over to it (a claim's, a migration's, a merge): removed
                # here when sent, it would end with the peer.
                self._send_failover_transfer(peer.name, inner.session)
                sessions += 1
        copied = [f"{messages} unacknowledged messages"] if messages else []
        if sessions:
            copied.append(f"{sessions} unacknowledged sessions (TRANSFER)")
        if copied:
            logger.info(
                "cluster: %s for %s also sent to its backup %s",
                " and ".join(copied),
                peer.name,
                self.backups[peer.name],
            )

    def _send_failover(
        self,
        origin: str,
        message: codec.WireMessage,
        plain: bool = True,
        targets: Targets = (),
    ) -> None:
        """A QoS 1/2 message for ``origin``'s plain subscribers (``plain``) and shared
        members (``targets``) while it is down: to its backup."""
        backup = self.backups.get(origin)
        if backup is None:
            return
        if backup == self.node_name:
            self._failover_here(origin, message, plain, targets)
            return
        peer = self.peers.get(backup)
        if peer is None or peer.link is None or not peer.link.established:
            return  # the backup is down too: the message waits in origin's outbox alone
        version = peer.link.protocol_version
        if plain and version >= codec.REPLICA_VERSION:
            peer.counters.failover_sent += 1
            self.send_reliable(peer, codec.ReplicaPublish(origin, message))
        if targets and version >= codec.FAILOVER_VERSION:
            peer.counters.failover_sent += 1
            self.send_reliable(peer, codec.ReplicaShared(origin, targets, message))

    def _send_failover_delivery(
        self, origin: str, client_id: str, delivery: codec.DeliveryRecord
    ) -> None:
        """A DELIVER for ``client_id``'s session, which moved to ``origin``, while ``origin``
        is down: to its backup (REPLICA_DELIVER), which keeps a copy of the session."""
        peer = self._failover_backup(origin, codec.DELIVER_FAILOVER_VERSION)
        if peer is self:
            self._failover_delivery_here(origin, client_id, delivery)
        elif isinstance(peer, Peer):
            self.send_reliable(peer, codec.ReplicaDeliver(origin, client_id, delivery))

    def _send_failover_transfer(self, origin: str, record: codec.SessionRecord) -> None:
        """A TRANSFER to ``origin`` that it had not acknowledged when our link to it
        dropped: to its backup (REPLICA_TRANSFER), which keeps the session as a copy of
        ``origin``'s, as if ``origin`` had installed and replicated it."""
        peer = self._failover_backup(origin, codec.TRANSFER_FAILOVER_VERSION)
        if peer is self:
            self._failover_transfer_here(origin, record)
        elif isinstance(peer, Peer):
            self.send_reliable(peer, codec.ReplicaTransfer(origin, record))

    def _failover_backup(self, origin: str, version: int) -> Peer | Cluster | None:
        """Where a frame for ``origin`` (down, or its link dropped) goes instead: to us
        (``self``: we are its backup), to its backup's peer (counted) when that link is up
        and speaks ``version``, or nowhere (None: it waits in origin's outbox alone)."""
        backup = self.backups.get(origin)
        if backup is None:
            return None
        if backup == self.node_name:
            return self
        peer = self.peers.get(backup)
        link = None if peer is None else peer.link
        if peer is None or link is None or not link.established:
            return None
        if link.protocol_version < version:
            return None
        peer.counters.failover_sent += 1
        return peer

    def _failover_transfer_here(self, origin: str, record: codec.SessionRecord) -> None:
        """A session handed over to ``origin`` (whose backup we are) that its sender lost
        before ``origin`` acknowledged it: parked while we still reach ``origin`` (it has it,
        or will: the sender's outbox resends it), else kept as a copy of ``origin``'s."""
        peer = self.peers.get(origin)
        if peer is not None and peer.up:
            counters = self.replicas.counters
            before = counters.sessions_parked_dropped
            now = time.monotonic()
            self.replicas.park_session(origin, record, now)
            bound = f"{PARKED_SESSIONS} or {PARKED_SESSIONS_BYTES} bytes"
            self._parked_dropped(
                now, origin, "sessions", bound, before, counters.sessions_parked_dropped
            )
            return
        adopted, dropped = self.replicas.adopt(origin, record)
        if adopted:
            self._adopted(origin, record, dropped)

    def _adopted(self, origin: str, record: codec.SessionRecord, dropped: int) -> None:
        """``record`` is now our copy of a session of ``origin`` (down): its delayed will is
        scheduled as for ``origin``'s other offline sessions, and a claim we answered "none"
        meanwhile (its device reconnected elsewhere first) gets it merged in."""
        broker = self.broker
        assert broker is not None
        client_id = record.client_id
        if dropped:
            self._failover_dropped(origin, [client_id] * dropped)
        logger.info(
            "client_id=%s: its session, handed over to node %s, which was lost before it "
            "acknowledged it, kept here as a copy (%d queued or in flight)",
            client_id,
            origin,
            len(record.deliveries),
        )
        will = record.will
        if will is not None:
            delay = max(0.0, will.publish_at - time.time())
            self._schedule_lost_will(
                origin, client_id, will.message, broker.clock(), delay, will.expiry_interval, True
            )
        newer = self._newer_claim_answered(client_id, record.version)
        if newer is not None:
            claimer, claimed = newer
            self._merge_copy(claimer, client_id, claimed)

    def _failover_delivery_here(
        self, origin: str, client_id: str, delivery: codec.DeliveryRecord
    ) -> None:
        """A DELIVER for ``origin`` (down) that its sender sent us, its backup: queued for
        our copy of the session (or sent on, when we handed the copy over)."""
        now = time.monotonic()
        if self._park(origin, delivery.message, now, [Delivered(client_id, delivery)]):
            return
        if self.delivering_failover:
            # Sent on to a session here that is itself a stub for ``origin`` (it came back,
            # took the session and died again before copying it to us): it would come back
            # here. It waits in origin's outbox, as it would without a backup.
            return
        # Neither queued nor sent on when we keep no copy of the session: one that is not
        # persistent ends with its node, and so does what was for it.
        _, full = self.replicas.failover_delivery(origin, client_id, delivery, now)
        if full:
            self._failover_dropped(origin, [client_id])
        self.delivering_failover = True
        try:
            self._forward_moved()
        finally:
            self.delivering_failover = False

    def _park(
        self,
        origin: str,
        message: codec.WireMessage,
        now: float,
        targets: Iterable[Targets | Delivered],
    ) -> bool:
        """Park a failover message (for each of ``targets``: () the plain subscribers,
        shared members or one session) when we still reach its owner (only the sender lost
        its link to it, so far: broker.replica); False otherwise."""
        peer = self.peers.get(origin)
        if peer is None or not peer.up:
            return False
        counters = self.replicas.counters
        before = counters.parked_dropped
        for target in targets:
            self.replicas.park(origin, message, now, target)
        bound = f"{PARKED_MESSAGES} or max_queued_bytes"
        self._parked_dropped(now, origin, "messages", bound, before, counters.parked_dropped)
        return True

    def _parked_dropped(
        self, now: float, origin: str, what: str, bound: str, before: int, dropped: int
    ) -> None:
        """Parked ``what`` for ``origin`` went past ``bound`` (``dropped`` in all, ``before``
        until now): a line at most once per DROP_LOG_INTERVAL."""
        if dropped <= before or now - self.parked_drop_logged < DROP_LOG_INTERVAL:
            return
        self.parked_drop_logged = now
        logger.warning(
            "cluster: %s parked for %s (the sender lost it, we have not) past %s: the oldest "
            "dropped (%d in all)",
            what,
            origin,
            bound,
            dropped,
        )

    def _failover_here(
        self,
        origin: str,
        message: codec.WireMessage,
        plain: bool = True,
        targets: Targets = (),
    ) -> None:
        replicas = self.replicas
        now = time.monotonic()
        kinds: list[Targets | Delivered] = [()] if plain else []
        if targets:
            kinds.append(targets)
        if self._park(origin, message, now, kinds):
            return
        if plain:
            self._failover_dropped(origin, replicas.failover(origin, message, now)[1])
        if targets:
            _, dropped, missing = replicas.failover_shared(origin, message, targets, now)
            self._failover_dropped(origin, dropped)
            self._redispatch(origin, message, missing)
        self._forward_moved()

    def _forward_moved(self) -> None:
        """Failover messages for copies we handed over (broker.replica.MovedCopy): on to
        the node the session went to, after its TRANSFER (or to it here)."""
        for node, client_id, delivery in self.replicas.take_forwards():
            if node == self.node_name:
                self._deliver_here(client_id, delivery)
                continue
            self._send_deliver(node, client_id, delivery)

    def _send_deliver(self, node: str, client_id: str, delivery: codec.DeliveryRecord) -> None:
        """A QoS 1/2 delivery for a session that moved to ``node``; while ``node`` is down
        also to its backup (it may be gone for good, and the session's copy with it)."""
        peer = self.peers.get(node)
        if peer is None:
            return
        if self.replicating and not peer.up:
            self._send_failover_delivery(node, client_id, delivery)
        self.send_reliable(peer, codec.Deliver(client_id, delivery))

    def _redispatch(
        self, origin: str, message: codec.WireMessage, members: Iterable[tuple[str, str]]
    ) -> None:
        """A message for shared members of ``origin`` (down) of which we keep no copy: their
        session ended with their node, so it goes to another member of each group that is
        reachable, or else to another member on ``origin`` whose copy we keep (MQTT 5.0
        section 4.8.2); with neither it is dropped, counted and recorded."""
        broker = self.broker
        assert broker is not None
        for shared_filter, client_id in members:
            picked = self.shared.pick_member(
                shared_filter, message.publisher_client_id, self._member_available
            )
            if picked is not None and self._member_available(picked[0]):
                node, member = picked[0].split(_MEMBER_SEPARATOR, 1)
                peer = self.peers.get(node)
                if node == self.node_name:
                    broker.deliver_shared(
                        shared_filter, member, message.to_message(broker.clock()), None
                    )
                elif peer is not None:
                    frame = codec.Publish(message, False, ((shared_filter, member),))
                    self.send_reliable(peer, frame)
                self.replicas.counters.failover_redispatched += 1
                continue
            if self._queue_for_another_copy(origin, shared_filter, client_id, message):
                continue
            broker.counters.messages_dropped_no_member += 1
            broker.drops.record(
                f"{shared_filter} ({client_id} gone with {origin})", "no shared member left"
            )

    def _queue_for_another_copy(
        self, origin: str, shared_filter: str, client_id: str, message: codec.WireMessage
    ) -> bool:
        group = self.shared.group(shared_filter)
        prefix = f"{origin}{_MEMBER_SEPARATOR}"
        for key in () if group is None else list(group.members):
            member = key[len(prefix) :]
            if not key.startswith(prefix) or member == client_id:
                continue
            _, dropped, missing = self.replicas.failover_shared(
                origin, message, ((shared_filter, member),), time.monotonic()
            )
            if not missing:
                self._failover_dropped(origin, dropped)
                return True
        return False

    def _failover_dropped(self, origin: str, dropped: list[str]) -> None:
        broker = self.broker
        assert broker is not None
        for client_id in dropped:
            broker.counters.messages_dropped_queue_full += 1
            broker.counters.messages_dropped_acknowledged += 1
            broker.drops.record(client_id, f"queue full: the copy of its session ({origin} down)")

    def _send_state(self, link: ClusterLink) -> None:
        """Our routes, shared members and owned client ids, as at link up."""
        for frame in codec.encode_sync(self._announced_filters()):
            link.send(frame)
        for frame in codec.encode_members(self._local_members()):
            link.send(frame)
        for frame in codec.encode_owned(self._owned()):
            link.send(frame)

    def _backup_news(self) -> None:
        """Our backup's PONG, or its link failed or went: what waited on it goes on."""
        if self.awaiting_backup:
            self.backup_settled()
        else:
            self._answer_claims_before_sync()
        early, self.delivers_before_hand_back = self.delivers_before_hand_back, []
        self.delivers_before_hand_back_bytes = 0
        for client_id, delivery in early:
            self._deliver_here(client_id, delivery)

    def backup_settled(self) -> None:
        """Our backup has handed back what it had of our sessions (its PONG), or will not
        (unreachable, the join is over): our routes go out, the peers' frames that waited
        are applied in order, then the claims that waited are answered."""
        if not self.awaiting_backup:
            return
        self.awaiting_backup = False
        deferred, self.state_deferred = self.state_deferred, set()
        for name in sorted(deferred):
            link = self.peers[name].link
            if link is not None and link.established:
                self._send_state(link)
        held, self.held_frames = self.held_frames, []
        applied: set[str] = set()
        for link, frame in held:
            sender = link.peer
            if sender is None or sender.link is not link or link.closed:
                continue  # its link went: the peer resends what we did not acknowledge
            try:
                if self.frame_received(link, sender, frame):
                    applied.add(sender.name)
            except codec.ClusterProtocolError as error:
                link.protocol_error(error)
        for name in sorted(applied):
            self.applied_batch(self.peers[name])
        if held or deferred:
            logger.info(
                "cluster: our backup has handed back our sessions: routes sent to %d peers, "
                "%d of their frames that waited applied",
                len(deferred),
                len(held),
            )
        self._answer_claims_before_sync()

    def _hand_back(self, peer: Peer, orphans: str) -> None:
        """``peer`` is back as a new incarnation (restarted without its store, as in memory
        mode) and we keep copies of its sessions (now under ``orphans``): each goes back to
        it as a TRANSFER, so its devices find their sessions there and the other nodes route
        their messages to it again (its SUBSCRIBEs as it installs them). Sent as reliable
        frames after what our outbox resends to it (messages routed to it while it was
        down, which reached the copies too): those find no session there yet and are
        dropped, the copies deliver them once. Before, the copies stayed here until their
        devices came back, and nothing published meanwhile was routed to them (the peer's
        SYNC had reset its routes). Their delayed wills stay scheduled here (the device's
        claim, wherever it connects, cancels them)."""
        records = self.replicas.take_all(orphans)
        for record in records:
            peer.counters.transfers_sent += 1
            # Without its delayed will, which stays scheduled here (an unsolicited TRANSFER
            # with a will is a migration's: the receiver schedules it).
            without_will = dataclasses.replace(record, will=None)
            self.send_reliable(peer, codec.Transfer(record.version, False, without_will))
        self.replicas.counters.handed_back += len(records)
        logger.warning(
            "cluster: node %s restarted without its sessions (a new incarnation): our %d "
            "copies of them (%d queued or in flight) handed back to it",
            peer.name,
            len(records),
            sum(len(record.deliveries) for record in records),
        )

    def _orphaned_copy(
        self, client_id: str, claimer: str | None, clean_start: bool = False
    ) -> tuple[str, codec.SessionRecord] | None:
        """Our copy of ``client_id`` when its owner is down (the copy is then the session;
        ``claimer`` is not that owner, None for us): its owner and its record, taken out of
        the copies (a stub stays, which sends on to the claimer what still arrives for the
        copy). A clean start ends the copy instead (None)."""
        replicas = self.replicas
        if clean_start:
            replicas.drop_moved(client_id)
        if not replicas.origins:
            return None
        origin = replicas.find(client_id)
        if origin is None or origin == claimer:
            return None
        peer = self.peers.get(origin)
        if peer is not None and peer.up:
            return None
        if clean_start:
            replicas.drop(client_id)
            return None
        before = replicas.counters.undecodable
        record = replicas.take(origin, client_id, claimer or self.node_name, now=time.monotonic())
        broker = self.broker
        stub = None if broker is None else broker.sessions.get(client_id)
        if claimer is not None and stub is not None and stub.moved_to == origin:
            # Our own forwarding stub for it (we handed the session to ``origin`` before)
            # follows it to its new node: it sent to ``origin``, which, back without its
            # sessions, dropped each as "forwarded to a session that is gone" (the fleet's
            # rolling restart, for as long as the stub lasted).
            stub.moved_to = claimer
        if replicas.counters.undecodable > before:
            logger.error(
                "client_id=%s: %d deliveries of the copy of node %s did not decode and are "
                "dropped (a bug on that node: please report it)",
                client_id,
                replicas.counters.undecodable - before,
                origin,
            )
        return None if record is None else (origin, record)

    def _sweep_replicas(self) -> None:
        if self.lost_wills:
            broker = self.broker
            assert broker is not None
            for client_id, (_, pending, _) in list(self.lost_wills.items()):
                if broker.pending_wills.get(client_id) is not pending:
                    del self.lost_wills[client_id]  # published, or the client came back
        now = time.time()
        for origin in list(self.replicas.parked.keys() | self.replicas.parked_sessions.keys()):
            self.replicas.discard_parked(origin, time.monotonic())
        self.replicas.forget_moved(time.monotonic())
        for origin in list(self.replicas.origins):
            since = self.down_since.get(origin)
            if since is None:
                continue  # up: its copies end when it deletes them
            expired = self.replicas.expire(origin, since, now)
            if expired:
                logger.info(
                    "cluster: %d copies of sessions of %s (down since %s) expired",
                    expired,
                    origin,
                    time.strftime("%H:%M:%S", time.localtime(since)),
                )
        self.replica_sweeper = asyncio.get_running_loop().call_later(
            REPLICA_SWEEP_INTERVAL, self._sweep_replicas
        )

    # --- reliable frames ---------------------------------------------------------------------

    def send_reliable(self, peer: Peer, frame: codec.Frame) -> int:
        """Number, keep (and store) and send ``frame``; returns its seq (0: not kept, the
        peer is forgotten)."""
        broker = self.broker
        assert broker is not None
        if peer.forgotten is not None:
            peer.counters.forgotten_not_kept += 1
            return 0
        outbox = peer.outbox
        seq = outbox.next_seq()
        data = codec.encode(codec.Reliable(seq, frame))
        dropped = outbox.add(seq, data)
        store = broker.store
        store.add_outbox(peer.name, seq, data)
        # The seq survives a restart even when every frame was acknowledged and deleted:
        # the peer would take frames numbered from 1 again for duplicates.
        store.set_meta(f"outbox:{peer.name}", str(seq).encode())
        peer.counters.reliable_sent += 1
        if dropped:
            store.drop_outbox(peer.name, dropped)
            peer.counters.outbox_dropped += len(dropped)
            peer.unlogged_drops += len(dropped)
            now = time.monotonic()
            if now - peer.last_drop_log >= DROP_LOG_INTERVAL:
                backup = self.backups.get(peer.name) if self.replicating else None
                logger.warning(
                    "cluster outbox to %s over outbox_max_bytes %d: %d oldest reliable frames "
                    "dropped (%d in all): messages for its sessions lost%s",
                    peer.name,
                    outbox.limit,
                    peer.unlogged_drops,
                    peer.counters.outbox_dropped,
                    ""
                    if backup is None or peer.up
                    else f" unless its backup {backup} has them (sent there while {peer.name} "
                    f"is down); if {peer.name} is gone for good, forget it (POST "
                    f"/api/cluster/peers/{peer.name}/forget, or [cluster] autoclean)",
                )
                peer.last_drop_log = now
                peer.unlogged_drops = 0
        link = peer.link
        if link is not None and link.established:
            if self.replicating:
                self.forwarded.sent_frame(peer.name, seq)
            if not link.replaying:
                link.send(data)
        return seq

    def _acked(self, peer: Peer, seq: int) -> None:
        broker = self.broker
        assert broker is not None
        if peer.outbox.ack(seq):
            broker.store.ack_outbox(peer.name, seq)
        high_water = self.cluster_config.link_high_water
        if peer.held_publishers and peer.outbox.bytes <= high_water // 2:
            peer.release_publishers(high_water - peer.outbox.bytes)
        waiters = self.ack_waiters.get(peer.name)
        while waiters and waiters[0][0] <= seq:
            _, callback = waiters.pop(0)
            callback()
        if self.replicating:
            for callback in self.forwarded.acked_frame(peer.name, seq):
                callback()
        self.drained_all.check()

    def when_applied(self, seqs: dict[str, int], callback: Callable[[], None]) -> None:
        """Call ``callback`` once every named peer has ACKed its seq (or its link dropped)."""
        remaining = set(seqs)
        if not remaining:
            callback()
            return

        def one(peer_name: str) -> Callable[[], None]:
            def applied() -> None:
                remaining.discard(peer_name)
                if not remaining:
                    callback()

            return applied

        for peer_name, seq in seqs.items():
            self.ack_waiters.setdefault(peer_name, []).append((seq, one(peer_name)))

    def _release_waiters(self, peer: Peer) -> None:
        for _, callback in self.ack_waiters.pop(peer.name, []):
            callback()

    def _save_inbox(self, peer: Peer) -> None:
        assert self.broker is not None
        inbox = peer.inbox
        self.broker.store.set_meta(
            f"inbox:{peer.name}", f"{inbox.incarnation}:{inbox.applied}".encode()
        )

    def applied_batch(self, peer: Peer) -> None:
        """A read's reliable frames are applied: store the high-water with their effects
        (same transaction), then ACK once it is committed."""
        assert self.broker is not None
        self._save_inbox(peer)
        peer.ack_due = peer.inbox.applied
        if not peer.ack_scheduled:
            peer.ack_scheduled = True
            self.broker.store.after_commit(lambda: self._send_ack(peer))

    def _send_ack(self, peer: Peer) -> None:
        peer.ack_scheduled = False
        link = peer.link
        if link is not None and link.established:
            peer.counters.acks_sent += 1
            link.send(codec.encode(codec.Ack(peer.ack_due)))

    # --- routes --------------------------------------------------------------------------------

    def _add_route(self, peer: Peer, topic_filter: str, store_it: bool = True) -> None:
        if topic_filter in peer.filters:
            return
        peer.filters.add(topic_filter)
        self.routes.subscribe(peer.name, topic_filter, ROUTE_OPTIONS)
        if store_it and self.broker is not None:
            self.broker.store.set_route(peer.name, topic_filter, True)

    def _remove_route(self, peer: Peer, topic_filter: str) -> None:
        if topic_filter not in peer.filters:
            return
        peer.filters.discard(topic_filter)
        self.routes.unsubscribe(peer.name, topic_filter)
        if self.broker is not None:
            self.broker.store.set_route(peer.name, topic_filter, False)

    def _drop_routes(self, peer: Peer) -> None:
        for topic_filter in peer.filters:
            self.routes.unsubscribe(peer.name, topic_filter)
        peer.filters.clear()
        if self.broker is not None:
            self.broker.store.clear_routes(peer.name)

    def _set_member(
        self, node: str, shared_filter: str, client_id: str, online: bool | None
    ) -> None:
        key = f"{node}{_MEMBER_SEPARATOR}{client_id}"
        if online is None:
            self.shared.unsubscribe(key, shared_filter)
            if not any(True for _ in self._member_filters(key)):
                self.members_online.pop(key, None)
            return
        self.shared.subscribe(key, shared_filter, ROUTE_OPTIONS)
        self.members_online[key] = online

    def _member_filters(self, key: str) -> Iterator[str]:
        node, client_id = key.split(_MEMBER_SEPARATOR, 1)
        if node == self.node_name:
            assert self.broker is not None
            session = self.broker.sessions.get(client_id)
            if session is not None:
                yield from (f for f in session.subscriptions if split_shared(f)[0] is not None)
            return
        peer = self.peers.get(node)
        if peer is not None:
            yield from (f for f, c in peer.members if c == client_id)

    def _member_available(self, key: str) -> bool:
        if not self.members_online.get(key, False):
            return False
        node = key.split(_MEMBER_SEPARATOR, 1)[0]
        if node == self.node_name:
            return True
        peer = self.peers.get(node)
        return peer is not None and peer.up

    def _drop_members(self, peer: Peer) -> None:
        for shared_filter, client_id in peer.members:
            key = f"{peer.name}{_MEMBER_SEPARATOR}{client_id}"
            self.shared.unsubscribe(key, shared_filter)
            self.members_online.pop(key, None)
        peer.members.clear()

    def _broadcast(self, data: bytes) -> None:
        for _, link in self._up_links():
            link.send(data)

    # --- inbound frames ------------------------------------------------------------------------

    def frame_received(self, link: ClusterLink, peer: Peer, frame: codec.Frame) -> bool:
        """Handle one frame; True when it was a reliable frame that was applied."""
        broker = self.broker
        assert broker is not None
        if (
            self.awaiting_backup
            and peer.name != self.backup
            and isinstance(frame, codec.Reliable | codec.Publish)
        ):
            self.held_frames.append((link, frame))  # backup_settled() applies them
            self._held(link, peer)
            return False
        counters = peer.counters
        if isinstance(frame, codec.Reliable):
            counters.reliable_received += 1
            verdict = peer.inbox.check(frame.seq)
            if verdict is InboxVerdict.DUPLICATE:
                counters.reliable_duplicates += 1
                peer.ack_due = peer.inbox.applied
                return True  # ACK again: the peer may have missed the last one
            if verdict is InboxVerdict.GAP:
                counters.reliable_gaps += 1
                logger.warning(
                    "cluster link %s: reliable frames before seq %d never arrived (the peer's "
                    "outbox overflowed and dropped them; it counts them)",
                    peer.name,
                    frame.seq,
                )
            self._apply(link, peer, frame.frame)
            return True
        if isinstance(frame, codec.Ack):
            counters.acks_received += 1
            self._acked(peer, frame.seq)
        elif isinstance(frame, codec.Hold):
            self._hold_received(peer, frame)
        elif isinstance(frame, codec.Publish):
            self._apply(link, peer, frame)
        elif isinstance(frame, codec.Claim):
            self._claim_received(peer, frame)
        elif isinstance(frame, codec.ClaimReply):
            self._claim_reply_received(peer, frame)
        elif isinstance(frame, codec.Owned):
            self._owned_received(peer, frame)
        elif isinstance(frame, codec.Members):
            self._members_received(peer, frame)
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
        elif isinstance(frame, codec.Replica):
            same_life = self.replicas.incarnations.get(peer.name) == peer.inbox.incarnation
            self.replicas.apply(peer.name, frame, peer.inbox.incarnation)
            if self.lost_wills:
                self._owner_back(peer.name, frame, same_life)
            link.send(codec.encode(codec.ReplicaAck(frame.seq)))
        elif isinstance(frame, codec.ReplicaAck):
            if peer.name == self.backup:
                for callback in self.replicator.ack(frame.seq):
                    callback()
                self.drained_all.check()
        elif isinstance(frame, codec.Ping):
            link.pong()
        elif isinstance(frame, codec.Pong):
            if not peer.synced:
                peer.synced = True
                self.joined.check()
                self.lost_but_reached.discard(peer.name)
                self._tell_reach(peer.name, True)
                self._check_majority()
                if peer.name == self.backup:
                    self._backup_news()
        elif isinstance(frame, codec.Forget):
            self._forget_received(peer, frame)
        elif isinstance(frame, codec.Reach):
            self._reach_received(peer, frame)
        elif isinstance(frame, codec.Close):
            link.close(f"closed by {peer.name}: {frame.reason}", send_close=False)
        else:  # HELLO after the handshake, or a frame that only travels as RELIABLE
            raise codec.ClusterProtocolError(f"unexpected {type(frame).__name__} frame")
        return False

    def _apply(self, link: ClusterLink, peer: Peer, frame: codec.Frame) -> None:
        """A frame whose effects must happen exactly once (inside RELIABLE, or QoS 0)."""
        broker = self.broker
        assert broker is not None
        if isinstance(frame, codec.Publish):
            peer.counters.messages_received += 1
            message = frame.message.to_message(broker.clock())
            for shared_filter, _ in frame.targets:
                _check_shared_filter(shared_filter, "PUBLISH")
            publisher = None
            if message.qos and message.publisher_client_id is not None:
                publisher = RemotePublisher(self, peer, message.publisher_client_id)
            broker.deliver_from_cluster(message, frame.plain, frame.targets, publisher)
            if publisher is not None and self.remote_shares:
                self._share_used(publisher)
        elif isinstance(frame, codec.Transfer):
            peer.counters.transfers_received += 1
            self._transfer_received(peer, frame)
        elif isinstance(frame, codec.Deliver):
            self._deliver_received(peer, frame)
        elif isinstance(frame, codec.StateWrite):
            broker.lamport.observe(frame.version)
            if self.state_handler is not None:
                self.state_handler(frame)
        elif isinstance(frame, codec.ReplicaPublish):
            self._failover_here(frame.origin, frame.message)
        elif isinstance(frame, codec.ReplicaShared):
            for shared_filter, _ in frame.targets:
                _check_shared_filter(shared_filter, "REPLICA_SHARED")
            self._failover_here(frame.origin, frame.message, False, frame.targets)
        elif isinstance(frame, codec.ReplicaDeliver):
            self._failover_delivery_here(frame.origin, frame.client_id, frame.delivery)
        elif isinstance(frame, codec.ReplicaTransfer):
            self._failover_transfer_here(frame.origin, frame.session)
        else:
            raise codec.ClusterProtocolError(
                f"{type(frame).__name__} is not sent as a reliable frame"
            )

    def _retained_received(self, frame: codec.Retain) -> None:
        broker = self.broker
        assert broker is not None
        topic = frame.topic
        known = broker.retained_changed_at.get(topic)
        if known is None:
            known = self.retained_tombstones.get(topic)
        if known is not None and frame.changed_at <= known:
            return  # ours is as new or newer (a resync after a partition)
        if frame.message is None:
            self._remember_deletion(topic, frame.changed_at)
            broker.set_retained_from_cluster(topic, None, frame.changed_at)
            broker.retained_changed_at.pop(topic, None)
        else:
            self.retained_tombstones.pop(topic, None)
            broker.set_retained_from_cluster(
                topic, frame.message.to_message(broker.clock()), frame.changed_at
            )

    def _remember_deletion(self, topic: str, changed_at: float) -> None:
        self.retained_tombstones[topic] = changed_at
        self.retained_tombstones.move_to_end(topic)
        while len(self.retained_tombstones) > RETAINED_TOMBSTONES:
            self.retained_tombstones.popitem(last=False)

    def _share_used(self, publisher: RemotePublisher) -> None:
        """One more QoS 1/2 message of ``publisher`` arrived: counted against the share it
        was resumed with, as its node counts it. Used up, its node has paused it: the session
        that gave it holds it until its next round, as it holds a local publisher, and starts
        that round now when it is below low water (its messages may have gone to other
        sessions here, and then no acknowledgement would bring it). Only a session gone
        offline resumes it without a share: nothing paces its publishers then."""
        key = (publisher.peer.name, publisher.client_id)
        shared = self.remote_shares.get(key)
        if shared is None:
            return
        shared.left -= 1
        if shared.left > 0:
            return
        del self.remote_shares[key]
        proxy = self.remote_publishers.get(key)
        session = shared.session
        if proxy is not None and session in proxy.held_by:
            return  # paused again by the session itself (its mark or its own share)
        if session.connection is None:
            session.forget_share(publisher)
            self.send_hold(publisher.peer, publisher.client_id, False)
            return
        # Before, a session below low water resumed it without a share: it then ran free
        # until the next HOLD(pause) crossed the link, and took ~60 deliveries in a row
        # while the others waited for their rounds (the fairness test's tail, 400 against
        # 170 once).
        publisher.hold_for(session)
        broker = self.broker
        assert broker is not None
        if session.below_low_water(broker.settings.max_queued_bytes):
            session.release_publishers(drained=True)

    def forget_oldest_share(self) -> None:
        """Past REMOTE_SHARES_MAX: the oldest share is forgotten (should its publisher still
        use it, its node pauses it and REMOTE_HOLD_LIMIT resumes it), counted on its peer and
        logged at most once per DROP_LOG_INTERVAL."""
        key = next(iter(self.remote_shares))
        del self.remote_shares[key]
        self.shares_forgotten += 1
        peer = self.peers.get(key[0])
        if peer is not None:
            peer.counters.remote_shares_forgotten += 1
        now = time.monotonic()
        if now - self.shares_forgotten_logged >= DROP_LOG_INTERVAL:
            logger.warning(
                "cluster %s: more than %d shares given to publishers on peers and not used "
                "up: the oldest forgotten (%d since the last line; a publisher may wait up to "
                "%.0f s to be resumed)",
                self.cluster_config.name,
                REMOTE_SHARES_MAX,
                self.shares_forgotten,
                REMOTE_HOLD_LIMIT,
            )
            self.shares_forgotten_logged = now
            self.shares_forgotten = 0

    def shares_cross(self, peer: Peer) -> bool:
        """Whether the link to ``peer`` is up and carries HOLD's share (version 3)."""
        link = peer.link
        return (
            link is not None and link.established and link.protocol_version >= codec.SHARE_VERSION
        )

    def send_hold(self, peer: Peer, client_id: str, pause: bool, share: int = 0) -> None:
        link = peer.link
        if link is not None and link.established:
            link.send(codec.encode(codec.Hold(client_id, pause, share)))

    def _hold_received(self, peer: Peer, frame: codec.Hold) -> None:
        broker = self.broker
        assert broker is not None
        key = (peer.name, frame.client_id)
        if not frame.pause:
            hold = self.peer_holds.pop(key, None)
            session = broker.sessions.get(frame.client_id)
            if frame.share and session is not None and session.connection is not None:
                self.local_shares[key] = frame.share
            else:
                self.local_shares.pop(key, None)
            if hold is not None:
                hold.release_publishers()
            return
        self.local_shares.pop(key, None)
        session = broker.sessions.get(frame.client_id)
        connection = None if session is None else session.connection
        if connection is None:
            return  # gone meanwhile: nothing to pause
        peer.counters.remote_pauses_received += 1
        self._pause_for_peer(peer, key, connection)

    def _pause_for_peer(
        self, peer: Peer, key: tuple[str, str], connection: ClientConnection
    ) -> None:
        """Pause a local publisher for a session on ``peer`` (its HOLD, or its share used)."""
        hold = self.peer_holds.get(key)
        if hold is None:
            hold = self.peer_holds[key] = PeerHold()

            def expire(hold: PeerHold = hold) -> None:
                if self.peer_holds.get(key) is hold:
                    peer.counters.remote_pauses_expired += 1
                    del self.peer_holds[key]
                    hold.release_publishers()

            asyncio.get_running_loop().call_later(REMOTE_HOLD_LIMIT, expire)
        connection.hold_for(hold, peer=True)

    def _forget_holds(self, peer: Peer) -> None:
        """A link went down: its pauses and shares end both ways (they would never be
        resumed, and an unused share would keep its session's next round waiting)."""
        _take_peers(self.local_shares, peer)
        for client_id, shared in _take_peers(self.remote_shares, peer):
            shared.session.forget_share(RemotePublisher(self, peer, client_id))
        for _, hold in _take_peers(self.peer_holds, peer):
            hold.release_publishers()
        for _, proxy in _take_peers(self.remote_publishers, peer):
            for session in proxy.held_by:
                session.held_publishers.discard(proxy)
            proxy.held_by.clear()

    def _members_received(self, peer: Peer, frame: codec.Members) -> None:
        if frame.reset:
            self._drop_members(peer)
        for state, shared_filter, client_id in frame.entries:
            _check_shared_filter(shared_filter, "MEMBERS")
            if state == MEMBER_GONE:
                peer.members.discard((shared_filter, client_id))
                self._set_member(peer.name, shared_filter, client_id, None)
            else:
                peer.members.add((shared_filter, client_id))
                self._set_member(peer.name, shared_filter, client_id, state == MEMBER_ONLINE)

    # --- claims (broker.registry has the rules) ------------------------------------------------

    def claim(
        self,
        client_id: str,
        clean_start: bool,
        local: bool,
        done: Callable[[ClaimOutcome], None],
    ) -> None:
        broker = self.broker
        assert broker is not None
        version = broker.claim_version()
        earlier = self.waiting.pop(client_id, None)
        if earlier is not None:
            # The same client id connected again here while its first connect waited: the
            # newer connect wins, as on one broker.
            if earlier.timer is not None:
                earlier.timer.cancel()
            earlier.done(ClaimOutcome(earlier.claim.version, rejected=True))
        copy = None if local else self._orphaned_copy(client_id, None, clean_start)
        if copy is not None:
            origin, record = copy
            if broker.install_session(record, merge=False):
                self.replicas.counters.installed_here += 1
                local = True
                logger.info(
                    "session of client_id=%s taken from our copy (its node %s is down; "
                    "%d queued or in flight)",
                    client_id,
                    origin,
                    len(record.deliveries),
                )
        up = [peer for peer in self.peers.values() if peer.up]
        unreachable = len(up) < len(self.peers)
        data = codec.encode(codec.Claim(client_id, version, clean_start))
        for peer in up:
            assert peer.link is not None
            peer.counters.claims_sent += 1
            peer.link.send(data)
        if clean_start or local or not up:
            # Nothing to wait for: a clean start ends the old session wherever it is (the
            # others act on CLAIM), and a session that is here is ours already.
            done(ClaimOutcome(version, diverged=unreachable and not clean_start and not local))
            return
        claim = PendingClaim(client_id, version, clean_start, {peer.name for peer in up})
        timer = asyncio.get_running_loop().call_later(
            self.cluster_config.takeover_timeout, self._claim_timed_out, client_id, version
        )
        self.waiting[client_id] = Waiting(claim, done, timer, unreachable)

    def _claim_timed_out(self, client_id: str, version: Version) -> None:
        waiting = self.waiting.get(client_id)
        if waiting is None or waiting.claim.version != version:
            return
        waiting.timer = None
        logger.warning(
            "client_id=%s: no answer to its claim from %s within %gs: it gets a fresh session "
            "(merged with the old one when that node is back)",
            client_id,
            ", ".join(sorted(waiting.claim.waiting)),
            self.cluster_config.takeover_timeout,
        )
        waiting.unreachable = True
        waiting.claim.waiting.clear()
        self._maybe_settled(client_id)

    def _maybe_settled(self, client_id: str) -> None:
        waiting = self.waiting.get(client_id)
        if waiting is None or not waiting.claim.complete:
            return
        del self.waiting[client_id]
        if waiting.timer is not None:
            waiting.timer.cancel()
        claim = waiting.claim
        outcome = ClaimOutcome(
            claim.version,
            rejected=bool(claim.rejected_by),
            diverged=waiting.unreachable and not claim.transferred,
        )
        waiting.done(outcome)
        # Newer claims that arrived meanwhile: hand over now that ours is settled.
        for peer_name, frame in claim.deferred:
            peer = self.peers.get(peer_name)
            if peer is not None:
                self._claim_received(peer, frame)

    def _claim_received(self, peer: Peer, frame: codec.Claim) -> None:
        broker = self.broker
        assert broker is not None
        peer.counters.claims_received += 1
        broker.lamport.observe(frame.version)
        backup = self.backup_peer
        if self.awaiting_backup or (backup is not None and backup.up and not backup.synced):
            # Our backup's link just came up: when we restarted without our sessions it is
            # handing them back (TRANSFERs, before its PONG). Answered now, a claim for one
            # of them would find none here, and the session would be left behind here.
            self.claims_before_sync.append((peer, frame))
            if peer.link is not None:
                self._held(peer.link, peer)
            return
        self._answer_claim(peer, frame)

    def _held(self, link: ClusterLink, peer: Peer) -> None:
        """The frame ``link`` just read (decoder.frame_size) waits for our backup: past
        HELD_BYTES_MAX or HELD_FRAMES_MAX in all, the link is not read until it is done
        (_answer_claims_before_sync). Never our backup's: its PONG is what we wait for."""
        self.held_bytes += link.decoder.frame_size
        held = len(self.held_frames) + len(self.claims_before_sync)
        if (
            (self.held_bytes <= HELD_BYTES_MAX and held <= HELD_FRAMES_MAX)
            or peer.name == self.backup
            or link in self.held_paused
            or link.closed
            or link.transport is None
        ):
            return
        link.transport.pause_reading()
        self.held_paused.add(link)
        peer.counters.held_paused += 1
        logger.warning(
            "cluster: %d bytes of our peers' frames wait for our backup to hand back our "
            "sessions (%d frames, %d claims; at most %d bytes or %d frames): not reading "
            "from %s until it is done",
            self.held_bytes,
            len(self.held_frames),
            len(self.claims_before_sync),
            HELD_BYTES_MAX,
            HELD_FRAMES_MAX,
            peer.name,
        )

    def _answer_claims_before_sync(self) -> None:
        """Our backup's PONG (or its link went): the claims that waited are answered, in
        order, and the links we stopped reading meanwhile are read again."""
        claims, self.claims_before_sync = self.claims_before_sync, []
        for peer, frame in claims:
            if peer.up:
                self._answer_claim(peer, frame)
        self.held_bytes = 0
        paused, self.held_paused = self.held_paused, set()
        for link in paused:
            if not link.closed and link.transport is not None:
                link.last_received = asyncio.get_running_loop().time()
                link.transport.resume_reading()

    def _answer_claim(self, peer: Peer, frame: codec.Claim) -> None:
        broker = self.broker
        assert broker is not None
        client_id = frame.client_id
        waiting = self.waiting.get(client_id)
        session = broker.sessions.get(client_id)
        if (session is None or session.moved_to is not None) and client_id in broker.pending_wills:
            # A will we hold for a lost node (its backup): the client is back.
            self.lost_wills.pop(client_id, None)
            broker.claimed_elsewhere(client_id, frame.clean_start)
        owned = None
        if session is not None and session.moved_to is None:
            owned = session.version or Version(0, "")
        elif waiting is None:
            copy = self._orphaned_copy(client_id, peer.name, frame.clean_start)
            if copy is not None:
                origin, copied = copy
                self.replicas.counters.handed_over += 1
                peer.counters.transfers_sent += 1
                logger.info(
                    "session of client_id=%s handed over to node %s from our copy (its node "
                    "%s is down; %d queued or in flight)",
                    client_id,
                    peer.name,
                    origin,
                    len(copied.deliveries),
                )
                self.send_reliable(peer, codec.Transfer(frame.version, False, copied))
                return
        decision = decide(owned, None if waiting is None else waiting.claim.version, frame.version)
        if decision is ClaimDecision.DEFER:
            assert waiting is not None
            waiting.claim.deferred.append((peer.name, frame))
            return
        if decision is ClaimDecision.REJECT:
            self._reply(peer, frame, rejected=True)
            return
        if decision is ClaimDecision.HAND_OVER:
            if frame.clean_start:
                broker.end_session(client_id, f"clean start on node {peer.name}")
            else:
                record = broker.hand_over(client_id, peer.name)
                if record is not None:
                    peer.counters.transfers_sent += 1
                    logger.info(
                        "session of client_id=%s handed over to node %s (%d queued or in flight)",
                        client_id,
                        peer.name,
                        len(record.deliveries),
                    )
                    self.send_reliable(peer, codec.Transfer(frame.version, False, record))
                    return
        if owned is None and not frame.clean_start:
            self._note_claim_answered(peer, frame)
        self._reply(peer, frame, rejected=False)

    # --- migration (broker.evacuation) ----------------------------------------------------

    def migration_targets(self) -> list[str]:
        """The peers an evacuated node's offline sessions may go to: those that are up and
        synced, by name."""
        return sorted(name for name, peer in self.peers.items() if peer.up and peer.synced)

    def migrate_session(self, client_id: str, node: str) -> bool:
        """Give the offline session ``client_id`` to ``node`` unasked (an evacuation: no
        device came back for it): a TRANSFER with its queue and delayed will, and a
        forwarding stub here, as for a claim. The other nodes route to it once ``node``
        announces its subscriptions; what still reaches us meanwhile the stub sends on. False
        when it cannot go now (``node`` is not up, a claim for it is under way, the session
        is connected, not here, or a stub)."""
        broker = self.broker
        assert broker is not None
        peer = self.peers.get(node)
        session = broker.sessions.get(client_id)
        if (
            peer is None
            or not peer.up
            or client_id in self.waiting
            or session is None
            or session.moved_to is not None
            or session.connection is not None
        ):
            return False
        record = broker.hand_over(client_id, node, with_will=True)
        if record is None:
            return False
        peer.counters.transfers_sent += 1
        self.migrated[node] = self.send_reliable(
            peer, codec.Transfer(record.version, False, record)
        )
        return True

    def migrations_acknowledged(self) -> bool:
        """Every node we migrated sessions to has acknowledged their TRANSFERs (or is down:
        its outbox keeps them)."""
        for name, seq in self.migrated.items():
            peer = self.peers[name]
            entries = peer.outbox.entries
            if peer.up and entries and entries[0][0] <= seq:
                return False
        return True

    def _note_claim_answered(self, peer: Peer, frame: codec.Claim) -> None:
        """We answer ``peer``'s claim with no session here: remembered a while (see
        _migrated_to_claimer)."""
        now = time.monotonic()
        self._forget_claim_answered(frame.client_id)
        self.claims_answered[frame.client_id] = (peer.name, frame.version, now)
        self.claims_answered_bytes += len(frame.client_id.encode())
        answered = self.claims_answered
        while answered:
            client_id, (name, _, when) = next(iter(answered.items()))
            expired = now - when > CLAIMS_ANSWERED_SECONDS
            if not expired and (
                len(answered) <= CLAIMS_ANSWERED_MAX
                and self.claims_answered_bytes <= CLAIMS_ANSWERED_BYTES
            ):
                break
            self._forget_claim_answered(client_id)
            if not expired:
                self._claim_answered_forgotten(name, now)

    def _newer_claim_answered(
        self, client_id: str, version: Version
    ) -> tuple[Peer, Version] | None:
        """A claim for ``client_id`` newer than ``version`` that we answered "none" within
        CLAIMS_ANSWERED_SECONDS, its claimer still up: (the claimer, the claim's version).
        Taken out of claims_answered either way."""
        answered = self._forget_claim_answered(client_id)
        if answered is None:
            return None
        name, claimed, when = answered
        claimer = self.peers.get(name)
        if (
            time.monotonic() - when > CLAIMS_ANSWERED_SECONDS
            or not claimed > version
            or claimer is None
            or not claimer.up
        ):
            return None
        return claimer, claimed

    def _forget_claim_answered(self, client_id: str) -> tuple[str, Version, float] | None:
        """Take ``client_id`` out of claims_answered (and its bytes); what it was."""
        answered = self.claims_answered.pop(client_id, None)
        if answered is not None:
            self.claims_answered_bytes -= len(client_id.encode())
        return answered

    def _claim_answered_forgotten(self, name: str, now: float) -> None:
        """Past CLAIMS_ANSWERED_MAX or CLAIMS_ANSWERED_BYTES: the oldest answered claim (of
        ``name``) was forgotten before its time; counted on its peer, logged at most once per
        DROP_LOG_INTERVAL."""
        self.claims_forgotten += 1
        peer = self.peers.get(name)
        if peer is not None:
            peer.counters.claims_answered_forgotten += 1
        if now - self.claims_forgotten_logged >= DROP_LOG_INTERVAL:
            logger.warning(
                "cluster: more than %d claims (or %d bytes of client ids) answered with no "
                "session here within %gs: the oldest forgotten (%d since the last line; a "
                "session migrated here after one of them stays here instead of following "
                "its device)",
                CLAIMS_ANSWERED_MAX,
                CLAIMS_ANSWERED_BYTES,
                CLAIMS_ANSWERED_SECONDS,
                self.claims_forgotten,
            )
            self.claims_forgotten_logged = now
            self.claims_forgotten = 0

    def _migrated_to_claimer(self, peer: Peer, record: codec.SessionRecord) -> bool:
        """A session ``peer`` migrated here unasked (an evacuation), when a newer claim for
        it came here first (its device reconnected on a third node while the TRANSFER was on
        its way: we answered "none", the claimer made a fresh session). It goes on to the
        claimer, merged into that session as after a split (its queued messages; the device
        resubscribed on session_present 0), and the will is dropped (the client is back).
        True when sent on."""
        newer = self._newer_claim_answered(record.client_id, record.version)
        if newer is None:
            return False
        claimer, version = newer
        name = claimer.name
        broker = self.broker
        assert broker is not None
        # Installed, then handed over: a stub stays here for what the migrating node's stub
        # still sends on to us (DELIVER), as for any session that moved.
        broker.install_session(record, merge=False)
        moved = broker.hand_over(record.client_id, name)
        if moved is None:
            return True  # ended at once (expiry 0): nothing to send
        claimer.counters.merges_sent += 1
        logger.info(
            "client_id=%s: its session, migrated here by node %s, went on to node %s, whose "
            "newer claim came first (%d messages merged into its session there)",
            record.client_id,
            peer.name,
            name,
            len(moved.deliveries),
        )
        self.send_reliable(claimer, codec.Transfer(version, True, moved))
        return True

    def _reply(self, peer: Peer, frame: codec.Claim, rejected: bool) -> None:
        link = peer.link
        if link is not None and link.established:
            link.send(codec.encode(codec.ClaimReply(frame.client_id, frame.version, rejected)))

    def _claim_reply_received(self, peer: Peer, frame: codec.ClaimReply) -> None:
        broker = self.broker
        assert broker is not None
        waiting = self.waiting.get(frame.client_id)
        if waiting is not None and waiting.claim.version == frame.version:
            if frame.rejected:
                waiting.claim.rejected_by.add(peer.name)
            waiting.claim.answered(peer.name)
            self._maybe_settled(frame.client_id)
            return
        if frame.rejected:
            # A claim we did not wait for (clean start, or the session was here) lost to a
            # newer one: its connection goes, as the older of two connections on one broker.
            session = broker.sessions.get(frame.client_id)
            if session is not None and session.version == frame.version:
                broker.counters.claims_rejected += 1
                if broker.take_over(frame.client_id):
                    logger.info(
                        "client_id=%s: a newer connection on node %s holds it; closed here",
                        frame.client_id,
                        peer.name,
                    )

    def _transfer_received(self, peer: Peer, frame: codec.Transfer) -> None:
        broker = self.broker
        assert broker is not None
        record = frame.session
        client_id = record.client_id
        waiting = self.waiting.get(client_id)
        here = broker.sessions.get(client_id)
        if here is not None and here.moved_to is not None:
            here = None
        if frame.merge or here is not None:
            broker.install_session(record, merge=True)
            logger.info(
                "client_id=%s: %d messages of its copy on node %s merged in",
                client_id,
                len(record.deliveries),
                peer.name,
            )
        else:
            # Not answering a claim of ours: a migration (an evacuated node's offline
            # session, with its delayed will) or a hand-back (without).
            migrated = waiting is None
            if migrated and self._migrated_to_claimer(peer, record):
                return
            broker.install_session(record, merge=False, with_will=migrated)
            logger.info(
                "session of client_id=%s %s node %s (%d queued or in flight)",
                client_id,
                "moved here by" if migrated else "taken over from",
                peer.name,
                len(record.deliveries),
            )
        if waiting is not None and waiting.claim.version == frame.version:
            waiting.claim.transferred = True
            waiting.claim.answered(peer.name)
            self._maybe_settled(client_id)

    def _owned_received(self, peer: Peer, frame: codec.Owned) -> None:
        """After a split: the older owner of a client id merges into the newer."""
        broker = self.broker
        assert broker is not None
        for client_id, theirs in frame.entries:
            broker.lamport.observe(theirs)
            session = broker.sessions.get(client_id)
            if session is None or session.moved_to is not None:
                self._merge_copy(peer, client_id, theirs)
                continue
            if session.version is None:
                continue
            if client_id in self.waiting or not merges_into(session.version, theirs):
                continue
            record = broker.hand_over(client_id, peer.name)
            if record is None:
                continue
            peer.counters.merges_sent += 1
            logger.info(
                "client_id=%s: node %s holds a newer session (after a split): %d messages of "
                "ours merged into it",
                client_id,
                peer.name,
                len(record.deliveries),
            )
            self.send_reliable(peer, codec.Transfer(theirs, True, record))

    def _merge_copy(self, peer: Peer, client_id: str, theirs: Version) -> None:
        """``peer`` owns ``client_id`` and we keep a copy of it whose owner is down (or
        restarted without it): the device came back where its claim could not reach us (a
        fresh session), so the copy's messages are merged into that session."""
        copy = self._orphaned_copy(client_id, peer.name)
        if copy is None:
            return
        origin, record = copy
        self.replicas.counters.merged += 1
        peer.counters.merges_sent += 1
        logger.info(
            "client_id=%s: node %s holds a fresh session; the %d messages of our copy (its node "
            "%s is down) merged into it",
            client_id,
            peer.name,
            len(record.deliveries),
            origin,
        )
        self.send_reliable(peer, codec.Transfer(theirs, True, record))

    def _deliver_received(self, peer: Peer, frame: codec.Deliver) -> None:
        peer.counters.deliveries_forwarded += 1
        broker = self.broker
        assert broker is not None
        if (
            peer.name == self.backup
            and not peer.synced
            and frame.client_id not in broker.sessions
            and len(self.delivers_before_hand_back) < HELD_FRAMES_MAX
            and self.delivers_before_hand_back_bytes < HELD_BYTES_MAX
        ):
            # Before its PONG our backup resends its outbox (what its forwarding stubs passed
            # on to us while we were down), then, if we restarted without our sessions, it
            # hands them back, its copies holding the same messages: delivered after the
            # PONG, where the session drops the second of each. Before, each was
            # dropped here as "forwarded to a session that is gone" (counted, a WARNING):
            # a false alarm at a rolling restart (seen in the fleet's).
            # Past HELD_FRAMES_MAX or HELD_BYTES_MAX, delivered at once (as before: dropped
            # when the session is not here, counted and logged).
            self.delivers_before_hand_back.append((frame.client_id, frame.delivery))
            self.delivers_before_hand_back_bytes += len(frame.delivery.message.payload)
            return
        self._deliver_here(frame.client_id, frame.delivery)

    def _deliver_here(self, client_id: str, delivery: codec.DeliveryRecord) -> None:
        broker = self.broker
        assert broker is not None
        session = broker.sessions.get(client_id)
        if session is None:
            broker.counters.messages_dropped_queue_full += 1
            if delivery.qos:
                broker.drops.record(client_id, "forwarded to a session that is gone")
            return
        message = delivery.message.to_message(broker.clock())
        broker.deliver_to_session(
            session,
            Pending(message, delivery.qos, delivery.retain, delivery.subscription_identifiers),
        )

    # --- ClusterHook -------------------------------------------------------------------------

    def _up_links(self) -> Iterator[tuple[Peer, ClusterLink]]:
        for peer in self.peers.values():
            link = peer.link
            if link is not None and link.established:
                yield peer, link

    def route(self, message: Message, publisher: ClientConnection | None) -> int:
        broker = self.broker
        assert broker is not None
        count = broker.deliver_local(message, publisher, shared=False)
        targets: dict[str, list[tuple[str, str]]] = {}
        for shared_filter, group in self.shared.shared_groups(message.topic):
            picked = group.pick(
                self._member_available, self.shared.strategy, message.publisher_client_id
            )
            if picked is None:
                continue
            node, client_id = picked[0].split(_MEMBER_SEPARATOR, 1)
            if node == self.node_name:
                count += broker.deliver_shared(shared_filter, client_id, message, publisher)
            else:
                targets.setdefault(node, []).append((shared_filter, client_id))
        if not self.peers:
            return count
        plain = {delivery.client_id for delivery in self.routes.match(message.topic)}
        if not plain and not targets:
            return count
        wire: codec.WireMessage | None = None
        for name in plain | set(targets):
            peer = self.peers.get(name)
            if peer is None:
                continue
            if wire is None:
                wire = codec.WireMessage.from_message(message, broker.clock(), self.node_name)
            members = tuple(targets.get(name, ()))
            if message.qos and self.replicating and not peer.up:
                # Issue 13: the node may be gone for good; its backup keeps its sessions.
                self._send_failover(name, wire, name in plain, members)
            if peer.forgotten is not None:
                peer.counters.forgotten_not_kept += 1
                continue
            frame = codec.Publish(wire, name in plain, members)
            if message.qos == 0:
                link = peer.link
                if link is None or not link.established:
                    peer.counters.messages_not_forwarded_link_down += 1
                    continue
                if link.send_message(codec.encode(frame)):
                    peer.counters.messages_forwarded += 1
                    count += 1
                continue
            self.send_reliable(peer, frame)
            peer.counters.messages_forwarded += 1
            count += 1
            if publisher is not None and self.local_shares:
                key = (name, publisher.client_id)
                left = self.local_shares.get(key)
                if left is not None:
                    # The peer resumed it with this share and counts the same messages.
                    if left > 1:
                        self.local_shares[key] = left - 1
                    else:
                        del self.local_shares[key]
                        self._pause_for_peer(peer, key, publisher)
            if (
                publisher is not None
                and peer.up
                and (
                    peer.outbox.bytes > self.cluster_config.link_high_water
                    or peer.held_publishers.spent(publisher, len(wire.payload))
                )
                and peer not in publisher.held_by
            ):
                # Issue 14 item 2: the backpressure crosses the link. Not to a peer that is
                # down: nothing drains its outbox until it is back, maybe never (its
                # sessions' copies are with its backup); the outbox's own bound holds.
                peer.counters.publishers_paused += 1
                publisher.hold_for(peer, peer=True)
        return count

    def forward_delivery(self, node: str, client_id: str, pending: Pending) -> None:
        broker = self.broker
        assert broker is not None
        peer = self.peers.get(node)
        if peer is None:
            return
        record = broker.delivery_record(pending)
        if pending.qos == 0:
            link = peer.link
            if link is not None and link.established:
                link.send(codec.encode(codec.Deliver(client_id, record)))
            return
        self._send_deliver(node, client_id, record)

    def subscription_added(self, topic_filter: str) -> None:
        if split_shared(topic_filter)[0] is None:
            self._broadcast(codec.encode(codec.Subscribe(topic_filter)))

    def subscription_removed(self, topic_filter: str) -> None:
        if split_shared(topic_filter)[0] is None:
            self._broadcast(codec.encode(codec.Unsubscribe(topic_filter)))

    def member_changed(self, topic_filter: str, client_id: str, connected: bool | None) -> None:
        if split_shared(topic_filter)[0] is None:
            return
        self._set_member(self.node_name, topic_filter, client_id, connected)
        state = MEMBER_GONE if connected is None else MEMBER_ONLINE if connected else MEMBER_OFFLINE
        self._broadcast(codec.encode(codec.Members(False, ((state, topic_filter, client_id),))))

    def _member_states(self, client_id: str, connected: bool) -> None:
        broker = self.broker
        assert broker is not None
        session = broker.sessions.get(client_id)
        if session is None:
            return
        for topic_filter in session.subscriptions:
            if split_shared(topic_filter)[0] is not None:
                self.member_changed(topic_filter, client_id, connected)

    def client_connected(self, client_id: str, version: Version, will: bytes | None) -> None:
        self._member_states(client_id, True)
        if will is not None and self.replicator.wills:
            broker = self.broker
            assert broker is not None
            session = broker.sessions.get(client_id)
            if session is not None:
                self.replicator.add(self._will_set(session, will))

    def check_client_chain(self, client_id: str, chain_subjects: tuple[bytes, ...]) -> None:
        """Warn once when a client's certificate comes from a CA that signs our node."""
        if self.client_ca_warned or not self.node_issuers:
            return
        for subject in chain_subjects[1:]:
            name = self.node_issuers.get(subject)
            if name is not None:
                self.client_ca_warned = True
                logger.warning(
                    "cluster: client %s has a certificate from %r, the CA that signs this "
                    "node's cluster certificate: a device certificate is one name away from "
                    "a node identity; use a CA for the cluster alone (seed 002)",
                    client_id,
                    name,
                )
                return

    def client_disconnected(self, client_id: str) -> None:
        self._member_states(client_id, False)
        broker = self.broker
        session = None if broker is None else broker.sessions.get(client_id)
        if session is not None and session.will_copied:
            # Published or kept by us now (or dropped with a DISCONNECT): not the backup's.
            session.will_copied = False
            self.replicator.add(codec.ReplicaOp(codec.ReplicaOpKind.WILL_CLEAR, client_id))
        if self.local_shares:
            for name in self.peers:
                self.local_shares.pop((name, client_id), None)

    def session_ended(self, client_id: str) -> None:
        pass

    def retained_changed(self, topic: str, message: Message | None, changed_at: float) -> None:
        broker = self.broker
        if broker is None:
            return
        if message is None:
            self._remember_deletion(topic, changed_at)
            broker.retained_changed_at.pop(topic, None)
            wire = None
        else:
            self.retained_tombstones.pop(topic, None)
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
                    "suspended": peer.suspended,
                    "forgotten": peer.forgotten is not None,
                    # REACH (protocol 9): the other peers whose links reach it, by their word.
                    "reached_by": sorted(self.reached_by.get(peer.name, ())),
                    "link_address": None if link is None else link.address_text,
                    "tls_version": None if link is None else link.tls_version,
                    "protocol_version": None if link is None else link.protocol_version,
                    "last_error": peer.last_error,
                    "remote_filters": len(peer.filters),
                    "remote_shared_members": len(peer.members),
                    "send_queue_bytes": 0 if link is None else link.queued_bytes(),
                    "outbox_frames": len(peer.outbox),
                    "outbox_bytes": peer.outbox.bytes,
                    "inbox_applied": peer.inbox.applied,
                    "publishers_paused_current": len(peer.held_publishers),
                    "counters": asdict(peer.counters),
                }
            )
        broker = self.broker
        return {
            "node": self.node_name,
            "cluster": self.cluster_config.name,
            "incarnation": self.incarnation,
            "protocol_version": self.protocol_version,
            "members": members,
            "claims_waiting": len(self.waiting),
            "claims_answered": len(self.claims_answered),
            "claims_answered_bytes": self.claims_answered_bytes,
            "inbound_refused": self.refused_inbound,
            "store": None if broker is None else broker.store.status(),
            "replication": {
                "backup": self.backup,
                "sending": self.replicator.status(),
                "copies": self.replicas.status(),
                "forwarded": self.forwarded.status(),
            },
            "tls": None if self.server_contexts is None else self.server_contexts.status(),
            "partition": {"partition_handling": "ignore"}
            if self.pause is None
            else self.pause.status(),
        }

    def _listen_text(self) -> str:
        port = self.port if self.server is not None else self.cluster_config.port
        return f"{self.cluster_config.host}:{port}"


_V = TypeVar("_V")


def _take_peers(entries: dict[tuple[str, str], _V], peer: Peer) -> list[tuple[str, _V]]:
    """The entries of ``peer`` (keyed by peer name and client id) taken out of ``entries``:
    (client id, value) each (a link that went down ends its holds and shares)."""
    keys = [key for key in entries if key[0] == peer.name]
    return [(key[1], entries.pop(key)) for key in keys]


def _check_filter(topic_filter: str) -> None:
    try:
        validate_topic_filter(topic_filter)
    except MQTTProtocolError as error:
        raise codec.ClusterProtocolError(f"invalid topic filter from peer: {error}") from None


def _check_shared_filter(shared_filter: str, frame: str) -> None:
    """A filter a peer's ``frame`` names as a shared subscription's: valid, $share/group/."""
    _check_filter(shared_filter)
    if split_shared(shared_filter)[0] is None:
        raise codec.ClusterProtocolError(f"{frame} with a plain filter {shared_filter!r}")


class ClusterLink(asyncio.Protocol):
    """One TLS connection between two nodes, either direction, after the TLS handshake."""

    __slots__ = (
        "_flush_handle",
        "_loop",
        "_out",
        "_out_bytes",
        "_ping_handle",
        "_retained",
        "_snapshot",
        "address_text",
        "closed",
        "cluster",
        "decoder",
        "direction",
        "established",
        "last_received",
        "peer",
        "peer_names",
        "pong_due",
        "protocol_version",
        "refusal",
        "replaced",
        "replaying",
        "resend_from",
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
        # Both HELLOs' lower version, once they are known (codec.link_version).
        self.protocol_version = cluster.protocol_version
        self.established = False
        self.closed = False
        self.replaced = False
        self.refusal: str | None = None
        self.writing_paused = False
        self.last_received = 0.0
        self.pong_due = False
        self._ping_handle: asyncio.TimerHandle | None = None
        # After HELLO: the outbox is resent from this seq, then the retained messages,
        # paced by the transport's buffer; new reliable frames wait in the outbox meanwhile.
        self.replaying = False
        self.resend_from = 0
        self._retained: Iterator[bytes] | None = None
        self._snapshot: Iterator[bytes] | None = None
        # This turn's frames, written at its end (_flush) or past COALESCE_BYTES.
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

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
        loop = self._loop = asyncio.get_running_loop()
        self.last_received = loop.time()
        if self.peer is None:
            self.cluster.accepting.add(self)
        else:
            self.cluster._set_state(self.peer, LinkState.HANDSHAKE)
            self.send(self.cluster.hello_for(self.peer))
        self._ping_handle = loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_received = asyncio.get_running_loop().time()
        if self.peer is not None:
            self.peer.counters.bytes_received += len(data)
        applied = False
        try:
            self.decoder.feed(data)
            while not self.closed:
                frame = self.decoder.next_event()
                if frame is codec.NEED_DATA:
                    break
                assert not isinstance(frame, codec.NeedData)
                applied |= self._frame(frame)
        except codec.ClusterProtocolError as error:
            self.protocol_error(error)
        except Exception:
            logger.exception("cluster link %s: internal error", self._who())
            self.close("internal error")
        if applied and self.peer is not None:
            self.cluster.applied_batch(self.peer)

    def protocol_error(self, error: codec.ClusterProtocolError) -> None:
        """A frame of the peer's broke the protocol: logged, and this link closes."""
        logger.warning("cluster link %s: protocol error: %s", self._who(), error)
        self.close(f"protocol error: {error}")

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._retained = self._snapshot = None
        coalesce.drop_unwritten(self)
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
        self._pump_backlog()

    # --- sending -----------------------------------------------------------------------------

    def queued_bytes(self) -> int:
        if self.transport is None:
            return 0
        return self.transport.get_write_buffer_size() + self._out_bytes

    def send(self, data: bytes) -> bool:
        transport = self.transport
        if transport is None or self.closed:
            return False
        if transport.get_write_buffer_size() + self._out_bytes + len(data) > SEND_QUEUE_LIMIT:
            if self.peer is not None:
                self.peer.counters.send_queue_overflows += 1
            logger.warning(
                "cluster link %s: send queue over %d bytes (peer not reading); closing it "
                "(reliable frames are resent on reconnect)",
                self._who(),
                SEND_QUEUE_LIMIT,
            )
            self.close("send queue overflow")
            return False
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= COALESCE_BYTES:
            self._flush()
        elif self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)
        if self.peer is not None:
            self.peer.counters.frames_sent += 1
            self.peer.counters.bytes_sent += len(data)
        return True

    def _flush(self) -> bool:
        """The frames sent since the last flush, in one write (broker.coalesce; a burst's
        pacing, pause_writing, comes from that write as it did per frame), counted."""
        wrote = coalesce.flush(self)
        if wrote and self.peer is not None:
            self.peer.counters.writes += 1
        return wrote

    def send_message(self, data: bytes) -> bool:
        """A QoS 0 PUBLISH frame: dropped (and counted) while the queue is above HIGH."""
        if self.writing_paused or self.replaying:
            if self.peer is not None:
                self.peer.counters.messages_dropped_qos0_queue_full += 1
            return False
        return self.send(data)

    def start_backlog(
        self, applied: int, retained: Iterator[bytes], snapshot: Iterator[bytes]
    ) -> None:
        """Resend the outbox after ``applied``, then the retained messages, then (to our
        backup) the snapshot of our sessions."""
        self.replaying = True
        self.resend_from = applied + 1
        self._retained = retained
        self._snapshot = snapshot
        self._pump_backlog()

    def start_snapshot(self, snapshot: Iterator[bytes]) -> None:
        """A snapshot of our sessions on a link that is up (our backup moved to its peer),
        sent as the link drains, after what the backlog still has to send."""
        self._snapshot = snapshot
        self._pump_backlog()

    def _pump_backlog(self) -> None:
        peer = self.peer
        if peer is None or self.closed:
            return
        if self.replaying:
            outbox = peer.outbox
            entries = outbox.entries
            while not self.writing_paused and not self.closed:
                if not entries:
                    break
                first = entries[0][0]
                index = max(0, self.resend_from - first)
                if index >= len(entries):
                    break
                seq, data = entries[index]
                self.resend_from = seq + 1
                peer.counters.reliable_resent += 1
                self.send(data)
            if self.writing_paused or self.closed:
                return
            self.replaying = False
        while self._retained is not None and not self.writing_paused and not self.closed:
            retained = next(self._retained, None)
            if retained is None:
                self._retained = None
                if self.pong_due:
                    self.pong()
                break
            self.send(retained)
            peer.counters.retained_sent += 1
        while self._snapshot is not None and not self.writing_paused and not self.closed:
            frame = next(self._snapshot, None)
            if frame is None:
                self._snapshot = None
                return
            self.send(frame)

    def pong(self) -> None:
        """Answer a PING, after the reliable frames we resend at link up and our retained
        messages: a peer is synced (Cluster.join, backup_settled) once it has our outbox
        and our retained messages (a device subscribing the moment the restarted node serves
        gets them), and a restarted node's backup has handed its sessions back by then."""
        if self.replaying or self._retained is not None:
            self.pong_due = True
            return
        self.pong_due = False
        self.send(codec.encode(codec.Pong()))

    def close(self, reason: str, send_close: bool = True, told: str | None = None) -> None:
        """Close the link; the peer is sent CLOSE with ``told`` (default: ``reason``)."""
        if self.closed:
            return
        self._flush()  # what was sent before the CLOSE goes first
        if send_close and self.transport is not None:
            self.transport.write(codec.encode(codec.Close(told or reason)))
        self.refusal = self.refusal or reason
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    # --- internals ---------------------------------------------------------------------------

    def _who(self) -> str:
        name = self.peer.name if self.peer is not None else "?"
        return f"{name} ({self.address_text})"

    def _frame(self, frame: codec.Frame) -> bool:
        if self.peer is not None:
            self.peer.counters.frames_received += 1
        if self.established:
            assert self.peer is not None
            return self.cluster.frame_received(self, self.peer, frame)
        if isinstance(frame, codec.Close):
            self.refusal = f"refused by the peer: {frame.reason}"
            self.close(self.refusal, send_close=False)
            return False
        if not isinstance(frame, codec.Hello):
            raise codec.ClusterProtocolError(
                f"expected HELLO first, got {type(frame).__name__.upper()}"
            )
        refused = self.cluster.hello_received(self, frame)
        if refused is not None:
            refusal, told = refused
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
            self.close(self.refusal, told=told)
            return False
        self.protocol_version = min(self.cluster.protocol_version, frame.version)
        self.decoder.version = self.protocol_version
        if self.peer is None:
            self.peer = self.cluster.peers[frame.node]
            self.send(self.cluster.hello_for(self.peer))
        self.established = True
        self._cancel_timer()
        self._schedule_ping()
        self.cluster.link_up(self, self.peer, frame)
        return False

    def _handshake_timeout(self) -> None:
        self._ping_handle = None
        if not self.established:
            self.refusal = f"no HELLO within {HANDSHAKE_TIMEOUT:g}s"
            logger.warning("cluster link %s: %s", self._who(), self.refusal)
            self.close(self.refusal, told=BARE_REFUSAL)

    def _schedule_ping(self) -> None:
        self._ping_handle = asyncio.get_running_loop().call_later(PING_INTERVAL, self._ping)

    def _ping(self) -> None:
        self._ping_handle = None
        if self.closed:
            return
        silent = asyncio.get_running_loop().time() - self.last_received
        if silent > LINK_TIMEOUT and self not in self.cluster.held_paused:
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
