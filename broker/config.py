"""Broker configuration: a TOML file (EMQX-like names) parsed once into frozen dataclasses.

Shape (every table and key optional except where noted)::

    [node]
    name = "broker-1"              # shown in the admin API and cluster
    cookie = "secret"              # shared by the cluster's nodes (seed 002)

    [mqtt]
    max_keepalive = 65535          # Server Keep Alive cap, as mosquitto's max_keepalive
    max_packet_size = 1048576      # bytes, both directions
    receive_maximum = 32           # QoS 2 messages a client may have unreleased
    max_inflight = 32              # outgoing QoS 1/2 in flight (3.1.1; caps 5.0 Receive Maximum)
    max_queued_messages = 1000     # per session (offline; online, QoS 1/2 of paced publishers
                                   # in transit may pass it within max_queued_bytes)
    retain_available = true
    topic_alias_maximum = 10
    session_expiry_max = 7200      # seconds; also the expiry of 3.1.1 persistent sessions
    maximum_qos = 2
    shared_subscription_available = true
    subscription_identifier_available = true
    wildcard_subscription_available = true
    connect_timeout = 10           # seconds to receive CONNECT
    max_queued_bytes = 16777216    # per session: payload bytes queued and in flight (mosquitto)
    max_node_queued_bytes = 1073741824  # the node's budget for all sessions' payload bytes
    shared_subscription_strategy = "round_robin"   # random, sticky, hash_clientid (EMQX)

    [listeners.tcp.default]
    bind = "0.0.0.0:1883"
    max_connections = 500000       # connected MQTT clients; unset: what the file limit allows
    max_pending_connections = 4096 # sockets not yet clients (TLS, PROXY header, CONNECT)
    max_pending_bytes = 16777216   # what those sockets sent, in bytes (>= max_packet_size)
    max_conn_rate = 1000           # accepts per second (or "1000/s"); unset: no limit. Past
                                   # it accepts pause: connections wait in the kernel's queue
    proxy_protocol = true
    proxy_protocol_timeout = 3     # seconds (or "3s", "500ms")
    proxy_protocol_trusted = ["127.0.0.0/8", "::1/128"]
    proxy_protocol_max_size = 8192 # bytes, whole header (lb: proxy-v2-max-size)
    proxy_protocol_hmac_keys = "keys/pp2-hmac.keys"  # headers must carry lb's HMAC TLV
    proxy_protocol_hmac_window = "30s"              # their timestamp within this of now
    proxy_protocol_hmac_replay_cache = 100000       # nonces remembered (~200 bytes each)
    peer_cert_as_username = "cn"
    authorization = true           # seed 003: apply [authorization] here (needs authentication)
    password_file = "passwd"       # username/password authentication (mosquitto_passwd format)

    [listeners.ssl.default]
    bind = "0.0.0.0:8883"
    max_conn_rate = "500/s"        # counted at accept, before the TLS handshake
    [listeners.ssl.default.ssl_options]
    cacertfile = "certs/ca.pem"    # relative paths are relative to the config file
    certfile = "certs/server.pem"
    keyfile = "certs/server.key"
    password = ""
    verify = "verify_peer"         # or "verify_none"
    fail_if_no_peer_cert = true
    versions = ["tlsv1.3", "tlsv1.2"]
    depth = 10
    crl_file = "certs/crl.pem"
    reload_interval = 120          # seconds (EMQX rereads certificates every 120 s)

    [cluster]
    name = "mqtt-cluster"
    bind = "127.0.0.1:5371"
    peers = ["broker-2@127.0.0.1:5372"]
    takeover_timeout = "5s"        # a connect waits this long for the other nodes' answers
    join_timeout = "10s"           # at start, clients wait (listeners closed) this long at most
                                   # for the links to the running peers (restarted
                                   # on a disk store: to every peer); "0s": no wait
    outbox_max_bytes = 268435456   # per peer: reliable frames kept until acknowledged
    link_high_water = 8388608      # unacknowledged bytes to a peer (up) that pause its publishers
    protocol_version = 10          # announced in HELLO; the old one while a rolling upgrade
                                   # has nodes that speak only it
    session_replicas = 1           # copies of each persistent session on other nodes (0 or 1;
                                   # broker/replica.py): survives the loss of a node
    stop_evacuation = "0s"         # a stop (SIGTERM) first evacuates the node for at most this
                                   # long (broker/evacuation.py); "0s": clients dropped at once
    stop_evacuation_rate = 500     # clients (and then sessions) moved off per second
    autoclean = "0s"               # a peer down this long is forgotten (EMQX's cluster.autoclean;
                                   # broker/cluster.py Cluster.forget); "0s": never, the default
    partition_handling = "ignore"  # "pause_minority": a node that reaches no more than half
                                   # the cluster closes its clients and listeners until it
                                   # does (broker/partition.py; 3 nodes or more)
    [cluster.ssl_options]          # as above

    [store]                        # issue 12: what survives a SIGKILL (broker/store.py)
    mode = "disk"                  # or "memory" (nothing written; the default without [store])
    path = "data/broker-1.db"      # default data/<node name>.db beside the config file
    synchronous = "normal"         # "full": also survives a power loss (fsync per commit)
    max_pending_bytes = 67108864   # waiting for the writer; above it publishers are paused

    [admin]
    bind = "127.0.0.1:18083"       # not loopback: token_file or password_file is required
    token_file = "admin.token"     # Authorization: Bearer <the file's token>; mode 600
    password_file = "admin.passwd" # Authorization: Basic (mosquitto_passwd format); mode 600
    anonymous = false              # true: off loopback without credentials (logged loudly)

    [authorization]                # seed 003 (broker/authz.py)
    policy_file = "authz/policy.yaml"   # JSON or YAML rules, or a BrokerAuthorization resource
    reload_interval = "5s"         # poll the file; a change disconnects the linked clients
    [authorization.x509_attributes.root]   # Azure's authorizationAttributes, by subject
    subject = "CN = Contoso Root CA Cert, OU = Engineering, C = US"
    attributes = { organization = "contoso" }

A listener with ``authorization = true`` must authenticate its clients: ``password_file``,
X.509 from the balancer (``proxy_protocol = true`` and ``peer_cert_as_username = "cn"``) or
its own mutual TLS (``verify = "verify_peer"``, ``fail_if_no_peer_cert = true``).

Errors raise :class:`ConfigError` naming the file, the dotted key and what was expected.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from broker.cluster_codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
from broker.subjects import parse_distinguished_name
from lb.proxy_hmac import DEFAULT_REPLAY_CACHE, DEFAULT_WINDOW
from lb.proxyproto import DEFAULT_MAX_HEADER_SIZE, V2_HEADER_LENGTH, V2_MAX_LENGTH

__all__ = [
    "AdminConfig",
    "AuthorizationConfig",
    "BrokerConfig",
    "ClusterConfig",
    "ConfigError",
    "ListenerConfig",
    "MQTTSettings",
    "SSLOptions",
    "StoreConfig",
    "config_warnings",
    "default_config",
    "is_loopback_host",
    "load_config",
    "parse_config",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_TRUSTED: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
# MQTT 5.0 section 2.2.3: Maximum Packet Size is a four byte integer, the remaining length
# at most 268,435,455 (+5 bytes of fixed header).
MAX_PACKET_SIZE_LIMIT = 268_435_460
TLS_VERSION_NAMES = ("tlsv1.3", "tlsv1.2", "tlsv1.1", "tlsv1")
#: max_pending_bytes: the default, and what it must hold beside one CONNECT of
#: max_packet_size (a PROXY v2 header with its TLVs, HAProxy's limit is 64 KiB).
DEFAULT_PENDING_BYTES = 16 * 1024 * 1024
PENDING_HEADROOM = 65536
# The smallest proxy_protocol_max_size: a v2 header with the largest address block (AF_UNIX,
# 216 bytes) and no TLV must fit (proxy-protocol.txt section 2.2).
MIN_PROXY_HEADER_SIZE = V2_HEADER_LENGTH + 216
# EMQX's names (broker.shared_subscription_strategy); round_robin is our default, as EMQX 5's.
DEFAULT_STORE_PENDING_BYTES = 64 * 1024 * 1024
SHARED_SUBSCRIPTION_STRATEGIES = ("round_robin", "random", "sticky", "hash_clientid")
#: The largest max_conn_rate: lb.event_rate counts a second's events in 32 bits.
MAX_CONN_RATE = (1 << 31) - 1
#: EMQX 5's rate periods (emqx_limiter_schema), in seconds: "N/s", "N/10s", "N/m", ...
RATE_PERIOD_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names file and key."""

    def __init__(self, origin: str, key: str, message: str) -> None:
        super().__init__(f"{origin}: '{key}': {message}")
        self.origin = origin
        self.key = key
        self.message = message


@dataclass(frozen=True, slots=True)
class MQTTSettings:
    max_keepalive: int = 65535
    max_packet_size: int = 1_048_576
    receive_maximum: int = 32
    max_inflight: int = 32
    max_queued_messages: int = 1000
    retain_available: bool = True
    topic_alias_maximum: int = 10
    session_expiry_max: int = 7200
    maximum_qos: int = 2
    shared_subscription_available: bool = True
    subscription_identifier_available: bool = True
    wildcard_subscription_available: bool = True
    connect_timeout: float = 10.0
    # Issue 14 item 1: bytes as well as counts. Payload bytes one session may hold queued and
    # in flight, and all sessions of the node together; past either, deliveries to offline or
    # lagging sessions are dropped, counted per client and logged (rate-limited).
    max_queued_bytes: int = 16 * 1024 * 1024
    max_node_queued_bytes: int = 1024 * 1024 * 1024
    shared_subscription_strategy: str = "round_robin"


@dataclass(frozen=True, slots=True)
class SSLOptions:
    """EMQX's ssl_options (seed 000); paths already resolved against the config file."""

    certfile: Path
    keyfile: Path
    cacertfile: Path | None = None
    password: str | None = None
    verify: Literal["verify_peer", "verify_none"] = "verify_none"
    fail_if_no_peer_cert: bool = False
    versions: tuple[str, ...] = ("tlsv1.3", "tlsv1.2")
    depth: int = 10
    crl_file: Path | None = None
    reload_interval: float = 120.0


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    kind: Literal["tcp", "ssl"]
    host: str
    port: int
    # Connected MQTT clients (CONNACK 0x89 / 3 past it); None: what the file limit allows,
    # worked out at start (broker.accept.plan_file_limit), as HAProxy derives maxconn.
    max_connections: int | None = None
    # Accepted sockets that are not clients yet (broker.accept.PendingConnections).
    max_pending_connections: int = 4096
    max_pending_bytes: int = DEFAULT_PENDING_BYTES
    # EMQX's max_conn_rate: connections accepted per second over a sliding second (HAProxy's
    # maxconnrate, lb.event_rate), on this listener of this node; None: no limit.
    max_conn_rate: int | None = None
    proxy_protocol: bool = False
    proxy_protocol_timeout: float = 3.0
    proxy_protocol_trusted: tuple[Network, ...] = DEFAULT_TRUSTED
    # The longest PROXY header accepted, in bytes, all of it (v2: 16 + len).
    proxy_protocol_max_size: int = DEFAULT_MAX_HEADER_SIZE
    # lb.proxy_hmac: headers must carry a valid HMAC TLV made with a key of this file.
    proxy_protocol_hmac_keys: Path | None = None
    proxy_protocol_hmac_window: float = DEFAULT_WINDOW
    proxy_protocol_hmac_replay_cache: int = DEFAULT_REPLAY_CACHE
    peer_cert_as_username: Literal["cn"] | None = None
    ssl_options: SSLOptions | None = None
    authorization: bool = False
    password_file: Path | None = None
    #: "kind:name", as log lines and the admin API name the listener (made once: it is in
    #: every connection's lines).
    label: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", f"{self.kind}:{self.name}")

    @property
    def authentication(self) -> frozenset[Literal["x509", "password"]]:
        """How this listener authenticates clients (seed 003 links authorization to it)."""
        methods: set[Literal["x509", "password"]] = set()
        if self.password_file is not None:
            methods.add("password")
        if self.proxy_protocol and self.peer_cert_as_username == "cn":
            methods.add("x509")
        options = self.ssl_options
        if options is not None and options.verify == "verify_peer" and options.fail_if_no_peer_cert:
            methods.add("x509")
        return frozenset(methods)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    name: str = "mqtt-cluster"
    host: str = "127.0.0.1"
    port: int = 0
    peers: tuple[tuple[str, str, int], ...] = ()  # (node name, host, port)
    ssl_options: SSLOptions | None = None
    # Issue 12: how long a connect waits for the other nodes' answers to its claim.
    takeover_timeout: float = 5.0
    # Issue 13: at start the listeners open once every running peer is linked and has sent
    # its routes, members and owned sessions (a restarted node that served clients first
    # made fresh sessions for them, and dropped their messages for want of routes), or
    # after this long.
    join_timeout: float = 10.0
    # Reliable frames kept per peer until acknowledged (also while it is down).
    outbox_max_bytes: int = 256 * 1024 * 1024
    # Issue 14 item 2: unacknowledged bytes to a peer above this pause the QoS 1/2
    # publishers feeding it; they resume below half of it.
    link_high_water: int = 8 * 1024 * 1024
    # The cluster protocol version announced in HELLO (each link speaks the lower of its two
    # nodes'): the previous one while a rolling upgrade has nodes that speak only it.
    protocol_version: int = PROTOCOL_VERSION
    # Issue 13: copies of each persistent session kept on other nodes (broker.replica).
    session_replicas: int = 1
    # Issue 13: a stop first evacuates the node (broker.evacuation) for at most this long
    # (0: off), moving clients and then sessions off at this rate.
    stop_evacuation: float = 0.0
    stop_evacuation_rate: int = 500
    # Issue 13: a peer down this long is forgotten (Cluster.forget), as EMQX's
    # cluster.autoclean; 0: never (the default: EMQX's is 24h, but a node forgotten here
    # rejoins only without its store, so after a long split each side would keep refusing
    # the other until an operator acts).
    autoclean: float = 0.0
    # What a node does when it reaches no more than half the cluster (RabbitMQ's
    # cluster_partition_handling): "ignore" serves on (both sides of a split serve and
    # merge at the heal), "pause_minority" closes its clients and listeners until it
    # reaches a majority again (broker.partition).
    partition_handling: Literal["ignore", "pause_minority"] = "ignore"


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """``[store]`` (issue 12, broker/store.py): where sessions and messages survive a restart."""

    mode: Literal["disk", "memory"] = "memory"
    path: Path | None = None
    synchronous: Literal["normal", "full"] = "normal"
    max_pending_bytes: int = DEFAULT_STORE_PENDING_BYTES


@dataclass(frozen=True, slots=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 18083
    # Credentials (broker.admin): a bearer token, or users in mosquitto_passwd's format for
    # basic auth; required when the bind is not loopback-only.
    token_file: Path | None = None
    password_file: Path | None = None
    # Off loopback without credentials only when said so (a private container network).
    anonymous: bool = False


@dataclass(frozen=True, slots=True)
class AuthorizationConfig:
    """``[authorization]`` (seed 003): the policy file and Azure-style X.509 attributes."""

    policy_file: Path
    reload_interval: float = 5.0
    # (name, subject as written, ((attribute, value), ...))
    x509_attributes: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    origin: str = "<defaults>"
    node_name: str = "broker@127.0.0.1"
    cookie: str | None = None
    mqtt: MQTTSettings = field(default_factory=MQTTSettings)
    listeners: tuple[ListenerConfig, ...] = ()
    cluster: ClusterConfig | None = None
    admin: AdminConfig | None = None
    authorization: AuthorizationConfig | None = None
    store: StoreConfig = field(default_factory=StoreConfig)


def default_config(port: int, host: str = "127.0.0.1") -> BrokerConfig:
    """What ``broker -p PORT`` runs: one anonymous plain listener on the loopback address
    (mosquitto 2.0's "local only mode"), no admin, no cluster."""
    return BrokerConfig(listeners=(ListenerConfig("default", "tcp", host, port),))


def load_config(path: str | Path) -> BrokerConfig:
    path = Path(path)
    origin = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(origin, "-c", f"cannot read file: {error.strerror}") from None
    except UnicodeDecodeError as error:
        # TOML is UTF-8 (TOML 1.0, "Spec"); say where the first bad byte is.
        raise ConfigError(
            origin,
            "(syntax)",
            f"not UTF-8: byte 0x{error.object[error.start]:02x} at offset {error.start}",
        ) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(origin, "(syntax)", f"not valid TOML: {error}") from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables by recursion (CPython 3.11).
        raise ConfigError(origin, "(syntax)", "not valid TOML: nested too deeply") from None
    return parse_config(document, origin, base_directory=path.parent)


def _parse_protocol_version(reader: _Reader) -> int:
    """``[cluster] protocol_version``: one of the versions this release speaks."""
    value = reader.get("protocol_version")
    if value is None:
        return PROTOCOL_VERSION
    versions = range(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION + 1)
    if isinstance(value, bool) or not isinstance(value, int) or value not in versions:
        allowed = " or ".join(str(version) for version in versions)
        raise reader.fail(
            "protocol_version",
            f"expected {allowed} (the cluster protocol versions this node speaks; "
            f"{MIN_PROTOCOL_VERSION} while a rolling upgrade has nodes that speak only it), "
            f"got {value!r}",
        )
    return value


def _parse_session_replicas(reader: _Reader) -> int:
    """``[cluster] session_replicas``: 0 (none) or 1 (one copy, on the next node)."""
    value = reader.get("session_replicas")
    if value is None:
        return 1  # the default: one copy
    if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1):
        raise reader.fail(
            "session_replicas",
            f"expected 0 (no copies) or 1 (each persistent session also kept by the next "
            f"node; more copies are not supported), got {value!r}",
        )
    return value


def _parse_partition_handling(reader: _Reader) -> Literal["ignore", "pause_minority"]:
    """``[cluster] partition_handling``: "ignore" (the default) or "pause_minority"."""
    value = reader.string("partition_handling", "ignore")
    if value == "pause_minority":
        return "pause_minority"
    if value != "ignore":
        raise reader.fail(
            "partition_handling",
            f'expected "ignore" (both sides of a split serve) or "pause_minority" (a node '
            f"that reaches no more than half the cluster stops serving), got {value!r}",
        )
    return "ignore"


class _Reader:
    """Typed access to one TOML table with errors that name the dotted key."""

    def __init__(self, origin: str, prefix: str, table: Mapping[str, Any]) -> None:
        self.origin = origin
        self.prefix = prefix
        self.table = table
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.origin, self.key(name), message)

    def get(self, name: str) -> Any:
        self.used.add(name)
        return self.table.get(name)

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.fail(name, f"expected a string, got {value!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(name, f"expected true or false, got {value!r}")
        return value

    def integer(self, name: str, default: int, minimum: int = 0, maximum: int = 2**63) -> int:
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"expected an integer, got {value!r}")
        if not minimum <= value <= maximum:
            raise self.fail(name, f"expected an integer from {minimum} to {maximum}, got {value}")
        return value

    def duration(self, name: str, default: float, zero: bool = False) -> float:
        """Seconds as a number, or a string with a unit: "500ms", "3s", "2m", "1h"; more
        than 0 unless ``zero`` (then 0 means "none")."""
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            raise self.fail(name, f'expected a duration such as 3 or "3s", got {value!r}')
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
            if match is None:
                raise self.fail(name, f'expected a duration such as "3s", got {value!r}')
            scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2) or "s"]
            seconds = float(match.group(1)) * scale
        else:
            raise self.fail(name, f'expected a duration such as 3 or "3s", got {value!r}')
        if seconds < 0 or (seconds == 0 and not zero):
            expected = "a duration of 0 or more" if zero else "a positive duration"
            raise self.fail(name, f"expected {expected}, got {value!r}")
        return seconds

    def table_at(self, name: str) -> _Reader | None:
        value = self.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(name, f"expected a table, got {value!r}")
        return _Reader(self.origin, self.key(name), value)

    def string_list(self, name: str) -> list[str] | None:
        value = self.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.fail(name, f"expected a list of strings, got {value!r}")
        return list(value)

    def reject_unknown(self) -> None:
        for name in self.table:
            if name not in self.used:
                raise self.fail(name, "unknown key")


def _parse_bind(reader: _Reader, name: str, default: str | None) -> tuple[str, int]:
    value = reader.get(name)
    if value is None:
        if default is None:
            raise reader.fail(name, 'missing; expected "HOST:PORT" such as "0.0.0.0:1883"')
        value = default
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"0.0.0.0:{value}"
    if not isinstance(value, str):
        raise reader.fail(name, f'expected "HOST:PORT" such as "0.0.0.0:1883", got {value!r}')
    match = re.fullmatch(r"\[?([^\[\]]*?)\]?:(\d+)", value)
    if match is None or int(match.group(2)) > 65535:
        raise reader.fail(name, f'expected "HOST:PORT" such as "0.0.0.0:1883", got {value!r}')
    return match.group(1) or "0.0.0.0", int(match.group(2))


def is_loopback_host(host: str) -> bool:
    """A bind host that only this machine reaches ("localhost", 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _parse_path(reader: _Reader, name: str, base: Path, required: bool) -> Path | None:
    value = reader.string(name)
    if value is None or value == "":
        if required:
            raise reader.fail(name, "missing; expected a file path")
        return None
    path = Path(value)
    return path if path.is_absolute() else base / path


def _parse_ssl_options(reader: _Reader, base: Path) -> SSLOptions:
    verify = reader.string("verify", "verify_none")
    if verify not in ("verify_peer", "verify_none"):
        raise reader.fail("verify", f'expected "verify_peer" or "verify_none", got {verify!r}')
    versions = reader.string_list("versions") or ["tlsv1.3", "tlsv1.2"]
    for version in versions:
        if version not in TLS_VERSION_NAMES:
            raise reader.fail(
                "versions", f"expected a list of {', '.join(TLS_VERSION_NAMES)}, got {version!r}"
            )
    certfile = _parse_path(reader, "certfile", base, required=True)
    keyfile = _parse_path(reader, "keyfile", base, required=True)
    assert certfile is not None and keyfile is not None
    options = SSLOptions(
        certfile=certfile,
        keyfile=keyfile,
        cacertfile=_parse_path(reader, "cacertfile", base, required=False),
        password=reader.string("password") or None,
        verify="verify_peer" if verify == "verify_peer" else "verify_none",
        fail_if_no_peer_cert=reader.boolean("fail_if_no_peer_cert", False),
        versions=tuple(versions),
        depth=reader.integer("depth", 10, minimum=0, maximum=100),
        crl_file=_parse_path(reader, "crl_file", base, required=False),
        reload_interval=reader.duration("reload_interval", 120.0),
    )
    if options.verify == "verify_peer" and options.cacertfile is None:
        raise reader.fail("cacertfile", 'missing; verify = "verify_peer" needs the CA file')
    reader.reject_unknown()
    return options


def _parse_networks(reader: _Reader, name: str) -> tuple[Network, ...]:
    values = reader.string_list(name)
    if values is None:
        return DEFAULT_TRUSTED
    networks: list[Network] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise reader.fail(
                name, f'expected CIDR networks such as "10.0.0.0/8", got {value!r}'
            ) from None
    return tuple(networks)


def _parse_listener(
    reader: _Reader, name: str, kind: Literal["tcp", "ssl"], base: Path, mqtt: MQTTSettings
) -> ListenerConfig:
    host, port = _parse_bind(reader, "bind", None)
    peer_cert_as_username = reader.string("peer_cert_as_username")
    if peer_cert_as_username not in (None, "cn", "disabled"):
        raise reader.fail(
            "peer_cert_as_username", f'expected "cn" or "disabled", got {peer_cert_as_username!r}'
        )
    ssl_reader = reader.table_at("ssl_options")
    ssl_options = None
    if kind == "ssl":
        if ssl_reader is None:
            raise reader.fail("ssl_options", "missing; an ssl listener needs certfile and keyfile")
        ssl_options = _parse_ssl_options(ssl_reader, base)
    elif ssl_reader is not None:
        raise reader.fail("ssl_options", "only [listeners.ssl.NAME] listeners take ssl_options")
    max_connections = None
    if reader.table.get("max_connections") is not None:
        max_connections = reader.integer("max_connections", 0, minimum=1)
    listener = ListenerConfig(
        name=name,
        kind=kind,
        host=host,
        port=port,
        max_connections=max_connections,
        max_pending_connections=reader.integer("max_pending_connections", 4096, minimum=1),
        max_conn_rate=_parse_conn_rate(reader),
        # At least one CONNECT of max_packet_size and a PROXY header must fit.
        max_pending_bytes=reader.integer(
            "max_pending_bytes",
            max(DEFAULT_PENDING_BYTES, mqtt.max_packet_size + PENDING_HEADROOM),
            minimum=mqtt.max_packet_size + PENDING_HEADROOM,
        ),
        proxy_protocol=reader.boolean("proxy_protocol", False),
        proxy_protocol_timeout=reader.duration("proxy_protocol_timeout", 3.0),
        proxy_protocol_trusted=_parse_networks(reader, "proxy_protocol_trusted"),
        proxy_protocol_max_size=reader.integer(
            "proxy_protocol_max_size",
            DEFAULT_MAX_HEADER_SIZE,
            minimum=MIN_PROXY_HEADER_SIZE,
            maximum=V2_HEADER_LENGTH + V2_MAX_LENGTH,
        ),
        peer_cert_as_username="cn" if peer_cert_as_username == "cn" else None,
        proxy_protocol_hmac_keys=_parse_path(
            reader, "proxy_protocol_hmac_keys", base, required=False
        ),
        proxy_protocol_hmac_window=reader.duration("proxy_protocol_hmac_window", DEFAULT_WINDOW),
        proxy_protocol_hmac_replay_cache=reader.integer(
            "proxy_protocol_hmac_replay_cache", DEFAULT_REPLAY_CACHE, minimum=1, maximum=10**8
        ),
        ssl_options=ssl_options,
        authorization=reader.boolean("authorization", False),
        password_file=_parse_path(reader, "password_file", base, required=False),
    )
    if listener.proxy_protocol_hmac_keys is not None and not listener.proxy_protocol:
        raise reader.fail(
            "proxy_protocol_hmac_keys",
            "authenticates PROXY headers: set proxy_protocol = true on this listener",
        )
    reader.reject_unknown()
    return listener


def _parse_conn_rate(reader: _Reader) -> int | None:
    """``max_conn_rate``: EMQX 4's number per second, EMQX 5's ``"N/s"``, or ``"infinity"``
    (EMQX 5's default: no limit). EMQX 5's other periods (``"N/m"``, ``"N/10s"``) are refused:
    the limit is a rate over a sliding second (lb.event_rate), which has no room for a longer
    period's burst, so converting them would change what they mean."""
    value = reader.get("max_conn_rate")
    if value is None or value == "infinity":
        return None
    expected = (
        f"expected connections per second, an integer from 1 to {MAX_CONN_RATE} or a string "
        f'such as "1000/s" (unset or "infinity": no limit), got {value!r}'
    )
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*", value)
        if match is None:
            raise reader.fail("max_conn_rate", expected)
        count, interval, unit = int(match.group(1)), match.group(2), match.group(3)
        seconds = int(interval or "1") * RATE_PERIOD_UNITS.get(unit, 0)
        if seconds == 0 or count == 0:
            raise reader.fail("max_conn_rate", expected)
        if seconds != 1:
            raise reader.fail(
                "max_conn_rate",
                f"{value!r} is {count} connections per {interval or 1}{unit}, a period EMQX "
                "accepts but this broker does not: the limit holds over a sliding second "
                "(HAProxy's maxconnrate); write a rate per second such as "
                f'"{max(count // seconds, 1)}/s"',
            )
        value = count
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONN_RATE:
        raise reader.fail("max_conn_rate", expected)
    return value


def _parse_mqtt(reader: _Reader | None) -> MQTTSettings:
    if reader is None:
        return MQTTSettings()
    defaults = MQTTSettings()
    settings = MQTTSettings(
        max_keepalive=reader.integer("max_keepalive", defaults.max_keepalive, 0, 65535),
        max_packet_size=reader.integer(
            "max_packet_size", defaults.max_packet_size, 64, MAX_PACKET_SIZE_LIMIT
        ),
        receive_maximum=reader.integer("receive_maximum", defaults.receive_maximum, 1, 65535),
        max_inflight=reader.integer("max_inflight", defaults.max_inflight, 1, 65535),
        max_queued_messages=reader.integer(
            "max_queued_messages", defaults.max_queued_messages, 0, 10_000_000
        ),
        retain_available=reader.boolean("retain_available", defaults.retain_available),
        topic_alias_maximum=reader.integer(
            "topic_alias_maximum", defaults.topic_alias_maximum, 0, 65535
        ),
        session_expiry_max=reader.integer(
            "session_expiry_max", defaults.session_expiry_max, 0, 0xFFFFFFFF
        ),
        maximum_qos=reader.integer("maximum_qos", defaults.maximum_qos, 0, 2),
        shared_subscription_available=reader.boolean(
            "shared_subscription_available", defaults.shared_subscription_available
        ),
        subscription_identifier_available=reader.boolean(
            "subscription_identifier_available", defaults.subscription_identifier_available
        ),
        wildcard_subscription_available=reader.boolean(
            "wildcard_subscription_available", defaults.wildcard_subscription_available
        ),
        connect_timeout=reader.duration("connect_timeout", defaults.connect_timeout),
        max_queued_bytes=reader.integer("max_queued_bytes", defaults.max_queued_bytes, 1024, 2**40),
        max_node_queued_bytes=reader.integer(
            "max_node_queued_bytes", defaults.max_node_queued_bytes, 1024, 2**44
        ),
        shared_subscription_strategy=_parse_strategy(reader),
    )
    reader.reject_unknown()
    return settings


def _parse_strategy(reader: _Reader) -> str:
    value = reader.string("shared_subscription_strategy", "round_robin") or "round_robin"
    if value not in SHARED_SUBSCRIPTION_STRATEGIES:
        raise reader.fail(
            "shared_subscription_strategy",
            f"expected one of {', '.join(SHARED_SUBSCRIPTION_STRATEGIES)}, got {value!r}",
        )
    return value


def _parse_store(reader: _Reader | None, node_name: str, base: Path) -> StoreConfig:
    if reader is None:
        return StoreConfig()
    mode = reader.string("mode", "disk")
    if mode not in ("disk", "memory"):
        raise reader.fail("mode", f'expected "disk" or "memory", got {mode!r}')
    synchronous = reader.string("synchronous", "normal")
    if synchronous not in ("normal", "full"):
        raise reader.fail("synchronous", f'expected "normal" or "full", got {synchronous!r}')
    path = _parse_path(reader, "path", base, required=False)
    if path is None and mode == "disk":
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", node_name)
        path = base / "data" / f"{safe}.db"
    store = StoreConfig(
        mode="disk" if mode == "disk" else "memory",
        path=path,
        synchronous="full" if synchronous == "full" else "normal",
        max_pending_bytes=reader.integer(
            "max_pending_bytes", DEFAULT_STORE_PENDING_BYTES, 1024 * 1024, 2**40
        ),
    )
    reader.reject_unknown()
    return store


def _parse_peer(reader: _Reader, value: str) -> tuple[str, str, int]:
    match = re.fullmatch(r"([^@\s]+)@\[?([^\[\]@]+?)\]?:(\d+)", value)
    if match is None or int(match.group(3)) > 65535:
        raise reader.fail("peers", f'expected "NAME@HOST:PORT" entries, got {value!r}')
    return match.group(1), match.group(2), int(match.group(3))


def parse_config(
    document: Mapping[str, Any], origin: str, base_directory: Path = Path(".")
) -> BrokerConfig:
    root = _Reader(origin, "", document)
    node = root.table_at("node")
    node_name = "broker@127.0.0.1"
    cookie = None
    if node is not None:
        node_name = node.string("name", node_name) or node_name
        cookie = node.string("cookie")
        node.reject_unknown()
    mqtt = _parse_mqtt(root.table_at("mqtt"))

    listeners: list[ListenerConfig] = []
    listeners_reader = root.table_at("listeners")
    if listeners_reader is not None:
        for kind in ("tcp", "ssl"):
            kind_reader = listeners_reader.table_at(kind)
            if kind_reader is None:
                continue
            for name in list(kind_reader.table):
                listener_reader = kind_reader.table_at(name)
                assert listener_reader is not None
                listeners.append(_parse_listener(listener_reader, name, kind, base_directory, mqtt))
        listeners_reader.reject_unknown()
    if not listeners:
        raise ConfigError(origin, "listeners", "no listener; add [listeners.tcp.default] bind")
    seen: dict[tuple[str, int], str] = {}
    for listener in listeners:
        address = (listener.host, listener.port)
        if listener.port and address in seen:
            raise ConfigError(
                origin,
                f"listeners.{listener.kind}.{listener.name}.bind",
                f"{listener.host}:{listener.port} is already used by listener {seen[address]}",
            )
        seen[address] = listener.label

    cluster = None
    cluster_reader = root.table_at("cluster")
    if cluster_reader is not None:
        host, port = _parse_bind(cluster_reader, "bind", "127.0.0.1:0")
        peers = tuple(
            _parse_peer(cluster_reader, value)
            for value in cluster_reader.string_list("peers") or []
        )
        ssl_reader = cluster_reader.table_at("ssl_options")
        defaults = ClusterConfig()
        cluster = ClusterConfig(
            name=cluster_reader.string("name", "mqtt-cluster") or "mqtt-cluster",
            host=host,
            port=port,
            peers=peers,
            ssl_options=None
            if ssl_reader is None
            else _parse_ssl_options(ssl_reader, base_directory),
            takeover_timeout=cluster_reader.duration("takeover_timeout", defaults.takeover_timeout),
            join_timeout=cluster_reader.duration("join_timeout", defaults.join_timeout, zero=True),
            outbox_max_bytes=cluster_reader.integer(
                "outbox_max_bytes", defaults.outbox_max_bytes, 1024 * 1024, 2**44
            ),
            link_high_water=cluster_reader.integer(
                "link_high_water", defaults.link_high_water, 64 * 1024, 2**40
            ),
            protocol_version=_parse_protocol_version(cluster_reader),
            session_replicas=_parse_session_replicas(cluster_reader),
            stop_evacuation=cluster_reader.duration(
                "stop_evacuation", defaults.stop_evacuation, zero=True
            ),
            stop_evacuation_rate=cluster_reader.integer(
                "stop_evacuation_rate", defaults.stop_evacuation_rate, 1, 100_000
            ),
            autoclean=cluster_reader.duration("autoclean", defaults.autoclean, zero=True),
            partition_handling=_parse_partition_handling(cluster_reader),
        )
        cluster_reader.reject_unknown()
        if peers and cookie is None:
            raise ConfigError(origin, "node.cookie", "missing; a cluster needs a shared cookie")

    admin = None
    admin_reader = root.table_at("admin")
    if admin_reader is not None:
        host, port = _parse_bind(admin_reader, "bind", "127.0.0.1:18083")
        admin = AdminConfig(
            host,
            port,
            token_file=_parse_path(admin_reader, "token_file", base_directory, required=False),
            password_file=_parse_path(
                admin_reader, "password_file", base_directory, required=False
            ),
            anonymous=admin_reader.boolean("anonymous", False),
        )
        admin_reader.reject_unknown()
        if (
            admin.token_file is None
            and admin.password_file is None
            and not admin.anonymous
            and not is_loopback_host(host)
        ):
            raise ConfigError(
                origin,
                "admin.bind",
                f"{host}:{port} is reachable from the network, and the admin API shows client "
                "addresses and certificate names and reloads the authorization policy: set "
                "token_file (Authorization: Bearer) or password_file (basic auth, "
                'mosquitto_passwd format), each readable by its owner only, or bind "127.0.0.1" '
                "(or, on a network nobody else reaches, say anonymous = true)",
            )
    authorization = _parse_authorization(root.table_at("authorization"), base_directory)
    _check_authorization_links(origin, listeners, authorization)
    store = _parse_store(root.table_at("store"), node_name, base_directory)
    root.reject_unknown()
    return BrokerConfig(
        origin=origin,
        node_name=node_name,
        cookie=cookie,
        mqtt=mqtt,
        listeners=tuple(listeners),
        cluster=cluster,
        admin=admin,
        authorization=authorization,
        store=store,
    )


def config_warnings(config: BrokerConfig) -> list[str]:
    """What is valid but probably not meant, said at start: PROXY listeners of which some
    check lb's HMAC and others do not (a forger uses the latter)."""
    warnings = []
    proxied = [listener for listener in config.listeners if listener.proxy_protocol]
    keyed = [listener.label for listener in proxied if listener.proxy_protocol_hmac_keys]
    open_ = [listener.label for listener in proxied if not listener.proxy_protocol_hmac_keys]
    if keyed and open_:
        warnings.append(
            f"{config.origin}: listeners {', '.join(keyed)} require an HMAC in the PROXY header "
            f"(proxy_protocol_hmac_keys) but {', '.join(open_)} do not: a host in "
            "proxy_protocol_trusted can still claim any device there"
        )
    cluster = config.cluster
    if cluster is not None and cluster.partition_handling == "pause_minority":
        # The peers may name this node too (one list for every node's config).
        nodes = len({name for name, _, _ in cluster.peers} | {config.node_name})
        if nodes < 3:
            warnings.append(
                f'{config.origin}: [cluster] partition_handling = "pause_minority" in a '
                f"cluster of {nodes} nodes: half is not a majority, so a node stops serving "
                "whenever another is down (a restart too); it needs 3 nodes or more"
            )
        elif nodes % 2 == 0:
            warnings.append(
                f'{config.origin}: [cluster] partition_handling = "pause_minority" in a '
                f"cluster of {nodes} nodes: a split into two halves stops every node (half "
                "is not a majority); an odd number of nodes avoids it"
            )
    return warnings


def _parse_authorization(reader: _Reader | None, base: Path) -> AuthorizationConfig | None:
    if reader is None:
        return None
    policy_file = _parse_path(reader, "policy_file", base, required=True)
    assert policy_file is not None
    entries: list[tuple[str, str, tuple[tuple[str, str], ...]]] = []
    table = reader.table_at("x509_attributes")
    if table is not None:
        for name in list(table.table):
            entry = table.table_at(name)
            assert entry is not None
            subject = entry.string("subject")
            if not subject:
                raise entry.fail("subject", 'missing; expected a subject such as "CN = device"')
            try:
                parse_distinguished_name(subject)
            except ValueError as error:
                raise entry.fail("subject", f"{subject!r}: {error}") from None
            attributes = entry.table_at("attributes")
            if attributes is None or not attributes.table:
                raise entry.fail("attributes", 'missing; expected a table such as { city = "x" }')
            pairs: list[tuple[str, str]] = []
            for key, value in attributes.table.items():
                if isinstance(value, bool) or not isinstance(value, str | int):
                    raise attributes.fail(key, f"expected a string, got {value!r}")
                pairs.append((key, str(value)))
            entry.reject_unknown()
            entries.append((name, subject, tuple(pairs)))
    settings = AuthorizationConfig(
        policy_file=policy_file,
        reload_interval=reader.duration("reload_interval", 5.0),
        x509_attributes=tuple(entries),
    )
    reader.reject_unknown()
    return settings


def _check_authorization_links(
    origin: str, listeners: list[ListenerConfig], authorization: AuthorizationConfig | None
) -> None:
    """Seed 003: authorization applies only on a listener that also authenticates."""
    for listener in listeners:
        if not listener.authorization:
            continue
        key = f"listeners.{listener.kind}.{listener.name}.authorization"
        if authorization is None:
            raise ConfigError(
                origin,
                key,
                f"listener {listener.label} links authorization, but there is no "
                "[authorization] section with a policy_file",
            )
        if not listener.authentication:
            raise ConfigError(
                origin,
                key,
                f"listener {listener.label} links authorization but does not authenticate "
                "its clients (seed 003: authorization applies only on a listener that also "
                "has authentication): set password_file, or proxy_protocol = true with "
                'peer_cert_as_username = "cn" (X.509 from the balancer), or make it an ssl '
                'listener with verify = "verify_peer" and fail_if_no_peer_cert = true',
            )
