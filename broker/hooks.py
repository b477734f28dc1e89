"""The two extension points of the broker core: cluster routing and authorization.

Both are small :class:`typing.Protocol` classes. The core (:mod:`broker.core`) calls them
synchronously from the event loop thread; an implementation must not block (queue network
work on its own transports and return). The defaults, :class:`LocalOnlyCluster` and
:class:`AllowAll`, make a standalone anonymous node.

Cluster (seed 002, issue 12; implemented by ``broker/cluster.py``)
-------------------------------------------------------------------
The core calls the :class:`ClusterHook` when something local must reach other nodes:

``claim(client_id, clean_start, local, done)``
    A client is connecting with this id. Claim it cluster-wide (:mod:`broker.registry`):
    other nodes close their connection with that id, end their session (clean start) or hand
    it over (TRANSFER, installed with :meth:`Broker.install_session` before ``done`` runs).
    ``local`` says a session for the id is already here (no need to wait for a transfer).
    Call ``done(ClaimOutcome)`` once the id is ours (at once on a single node).
``client_connected(client_id, version, will)`` / ``client_disconnected(client_id)`` /
``session_ended(client_id)``
    A connection took the session / left it / the session is gone (shared group members
    are preferred while connected). ``will`` is the connection's will, authorized and
    encoded (:meth:`Broker.live_will`), or None.
``route(message, publisher) -> int``
    Deliver a message accepted here (from a local client, or a will): to local subscribers
    (:meth:`Broker.deliver_local`) and to every other node with a matching subscription; one
    member per shared group cluster-wide. Return local deliveries plus nodes sent to (used
    only for PUBACK 0x10 No Matching Subscribers). QoS handling towards remote subscribers
    is the remote node's job (it delivers with :meth:`Broker.deliver_from_cluster`).
``forward_delivery(node, client_id, pending)``
    A delivery for a session that moved to ``node`` (a forwarding stub got it).
``subscription_added(topic_filter)`` / ``subscription_removed(topic_filter)``
    The first local session took ``topic_filter`` / the last one dropped it. Shared
    filters keep their ``$share/group/`` prefix. Use :meth:`Broker.local_filters` for the
    full list when a link (re)connects.
``member_changed(topic_filter, client_id, connected)``
    A local session subscribed (``connected`` True/False) or unsubscribed (None); the cluster
    tracks shared group members with it.
``retained_changed(topic, message, changed_at)``
    The retained message for ``topic`` changed (``None``: deleted) at wall-clock
    ``changed_at``. Replicate it; the other nodes call
    :meth:`Broker.set_retained_from_cluster`.

Inbound side, methods of :class:`broker.core.Broker` the cluster calls:
``deliver_from_cluster(message, plain, targets)`` (local delivery only, never forwarded
again), ``set_retained_from_cluster(topic, message, changed_at)``, ``take_over(client_id)``,
``end_session``, ``hand_over``, ``install_session``, ``local_filters()``, ``node_name``.

Authorization (seed 003; implemented by ``broker/authz.py``)
------------------------------------------------------------
:class:`AuthorizationHook` answers allow (True) / deny (False) for the three methods of
seed 003. The core turns a denial into the protocol's outcome:

- connect denied: CONNACK 0x87 Not authorized (5.0) / return code 5 (3.1.1), then close;
- publish denied: QoS 1 PUBACK 0x87 (5.0) or a plain PUBACK (3.1.1, which has no error
  code), QoS 2 PUBREC 0x87 (5.0) or a plain PUBREC, QoS 0 dropped; counted and logged;
- subscribe denied: SUBACK 0x87 (5.0) / 0x80 (3.1.1) for that filter;
- a will message whose publish is denied is dropped when it would be sent.

``principal_attributes(identity)`` is called once per CONNECT, before
``authorize_connect``, to derive the principal's attributes (e.g. from the certificate
chain subjects the balancer sent); the result is stored in :attr:`Principal.attributes`.
Topic arguments are topic names (publish) or full filters with any ``$share/group/``
prefix (subscribe). When policies change at runtime, call
:meth:`broker.core.Broker.disconnect_clients` to drop clients connected under the old ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import field
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from broker.cluster_codec import Version
from broker.message import Message
from broker.mqtt.packets import record

if TYPE_CHECKING:
    from broker.connection import ClientConnection
    from broker.core import Broker
    from broker.session import Pending

__all__ = [
    "NO_ATTRIBUTES",
    "AllowAll",
    "AuthorizationHook",
    "ClaimOutcome",
    "ClusterHook",
    "LocalOnlyCluster",
    "PeerIdentity",
    "Principal",
]


@record  # built per connection: see broker.mqtt.packets.record
class PeerIdentity:
    """Who is on the other end of a connection, as far as the transport can tell.

    ``address`` is the client's real address: the PROXY header's source when a trusted
    balancer sent one, else the socket's peer. ``certificate_cn`` is set only when the
    certificate was verified (by the balancer, per the PP2_TYPE_SSL verify field, or by the
    broker's own TLS listener). ``chain_subjects`` are DER-encoded X.509 Names, leaf first.
    """

    address: tuple[str, int]
    socket_address: tuple[str, int]
    listener: str
    via_proxy: bool = False
    tls: bool = False
    tls_version: str | None = None
    certificate_cn: str | None = None
    certificate_verified: bool = False
    chain_subjects: tuple[bytes, ...] = ()
    authority: str | None = None
    # A balancer health check (PROXY LOCAL): logged at debug level only.
    health_check: bool = False
    # The connection's id: the PROXY header's PP2_TYPE_UNIQUE_ID (lb's or HAProxy's %ID)
    # when one came, else the listener's own (64 random bits and a count); "broker" tells
    # which.
    connection_id: str = ""
    connection_id_source: str = "broker"


#: A principal without attributes (most of them): one shared read-only mapping, not an empty
#: dict per connection.
NO_ATTRIBUTES: Mapping[str, str] = MappingProxyType({})


@record  # built per connection: see broker.mqtt.packets.record
class Principal:
    """The identity authorization decides on (seed 003): client id, username, attributes."""

    client_id: str
    username: str | None
    # (a factory that hands out the shared mapping: dataclasses refuse it as a plain default)
    attributes: Mapping[str, str] = field(default_factory=lambda: NO_ATTRIBUTES)
    identity: PeerIdentity | None = None


class AuthorizationHook(Protocol):
    def principal_attributes(self, identity: PeerIdentity) -> Mapping[str, str]: ...

    def authorize_connect(self, principal: Principal) -> bool: ...

    def authorize_publish(
        self, principal: Principal, topic: str, qos: int, retain: bool
    ) -> bool: ...

    def authorize_subscribe(self, principal: Principal, topic_filter: str, qos: int) -> bool: ...


@record  # built per connection: see broker.mqtt.packets.record
class ClaimOutcome:
    """How a claim on a client id ended (see ``ClusterHook.claim``)."""

    version: Version
    # A newer claim holds the client id: the connecting client is closed.
    rejected: bool = False
    # A node that may hold an older copy of the session did not answer (link down or too
    # slow): a fresh session is marked so that the copy is merged in when it is back.
    diverged: bool = False


class ClusterHook(Protocol):
    def claim(
        self,
        client_id: str,
        clean_start: bool,
        local: bool,
        done: Callable[[ClaimOutcome], None],
    ) -> None: ...

    def client_connected(self, client_id: str, version: Version, will: bytes | None) -> None: ...

    def client_disconnected(self, client_id: str) -> None: ...

    def session_ended(self, client_id: str) -> None: ...

    def route(self, message: Message, publisher: ClientConnection | None) -> int: ...

    def forward_delivery(self, node: str, client_id: str, pending: Pending) -> None: ...

    def subscription_added(self, topic_filter: str) -> None: ...

    def subscription_removed(self, topic_filter: str) -> None: ...

    def member_changed(self, topic_filter: str, client_id: str, connected: bool | None) -> None: ...

    def retained_changed(self, topic: str, message: Message | None, changed_at: float) -> None: ...


class AllowAll:
    """Default authorization: everything allowed (an anonymous node, like ``mosquitto -p``)."""

    def principal_attributes(self, identity: PeerIdentity) -> Mapping[str, str]:
        return NO_ATTRIBUTES

    def authorize_connect(self, principal: Principal) -> bool:
        return True

    def authorize_publish(self, principal: Principal, topic: str, qos: int, retain: bool) -> bool:
        return True

    def authorize_subscribe(self, principal: Principal, topic_filter: str, qos: int) -> bool:
        return True


class LocalOnlyCluster:
    """Default cluster: a single node; nothing leaves it, every claim is granted at once."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def claim(
        self,
        client_id: str,
        clean_start: bool,
        local: bool,
        done: Callable[[ClaimOutcome], None],
    ) -> None:
        done(ClaimOutcome(self.broker.claim_version()))

    def client_connected(self, client_id: str, version: Version, will: bytes | None) -> None:
        pass

    def client_disconnected(self, client_id: str) -> None:
        pass

    def session_ended(self, client_id: str) -> None:
        pass

    def route(self, message: Message, publisher: ClientConnection | None) -> int:
        return self.broker.deliver_local(message, publisher)

    def forward_delivery(self, node: str, client_id: str, pending: Pending) -> None:
        pass

    def subscription_added(self, topic_filter: str) -> None:
        pass

    def subscription_removed(self, topic_filter: str) -> None:
        pass

    def member_changed(self, topic_filter: str, client_id: str, connected: bool | None) -> None:
        pass

    def retained_changed(self, topic: str, message: Message | None, changed_at: float) -> None:
        pass
