"""The demo's topology as data: node names, ports, paths and the command of every process.

The local demo (:mod:`demo.__main__`), docker-compose.yml and the tests all read this module,
so the three cannot drift: the demo runs exactly these commands from the repository root,
and tests/test_compose.py checks that every command, path and port of the compose file is one
of these (after mapping the container host names and the ``configs/docker/`` variants of the
config files back to their local counterparts). tests/test_demo.py checks that
configs/haproxy.cfg and configs/broker-N.toml say the same as this module.

Paths are relative to the repository root (the working directory of every process here, and
``/app`` in the image). Commands name programs as a shell would (``python``, ``lb``,
``broker``); the local demo resolves them in the virtualenv it runs from.

The seed's ports are the default. ``./dev demo --base-port B`` moves every port into a block
from B (a :class:`Layout`, with the configs rewritten under demo/out/configs/), and
``python -m demo.compose --nodes N`` makes a compose file for N nodes (:func:`nodes`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CERTS_DIR = "configs/certs"
OUT_DIR = "demo/out"
DEVICES_REPORT = f"{OUT_DIR}/devices.json"
LB_CONFIG = "configs/haproxy.cfg"

LOCAL_HOST = "127.0.0.1"
LB_HOST = "lb"  # the lb container's name; also a DNS SAN of the server certificate
LB_PORT = 8091  # seed 004: bind *:8091 ssl crt server-allinone.pem ...
PROMETHEUS_PORT = 8405  # lb's /metrics on loopback (HAProxy's usual port); the health check
PUBLISHED_PORT = 8883  # the MQTT over TLS port (seed 000), published by the lb container
PUBLISHED_PORT_VARIABLE = "LB_PUBLISHED_PORT"  # docker-compose.yml: "${LB_PUBLISHED_PORT:-8883}"
LB_FRONTEND = "emqx-tls"
LB_BACKEND = "emqx-backend"

ROOT_CA = "CaRoot"
INTERMEDIATE_CA = "CaIntermediate"
SERVER_ALLINONE = "server-allinone.pem"
CRL = "crl.pem"
REVOKED_DEVICE = "device-revoked"  # in crl.pem: lb must refuse it
ROGUE_DEVICE = "rogue-device-0001"  # device-0001's id, signed by a CA nobody trusts
PKI_DEVICES = 24  # device-0001 .. device-0024 made by lb-pki demo
SERVER_DNS = (LB_HOST,)  # SANs beyond localhost and 127.0.0.1, for the containers

DEFAULT_NODES = 3
DEFAULT_DEVICES = 24
DEFAULT_MESSAGES = 5
FAST_DEVICES = 20
FAST_MESSAGES = 2

# In docker-compose.yml: the image's working directory, the certificate volume's mount point,
# the fleet network and lb's fixed address in it (the only PROXY source the brokers trust).
DOCKER_WORKDIR = "/app"
DOCKER_NETWORK_SUBNET = "172.28.0.0/24"
DOCKER_LB_ADDRESS = "172.28.0.10"
# An image built from this repository's Dockerfile; BASE_IMAGE is its FROM (python:3.11-slim
# by default, or the one packaging/image.py makes from Debian's packages).
DOCKER_IMAGE = "iot-edge-lb:demo"
BASE_IMAGE_VARIABLE = "BASE_IMAGE"
DEFAULT_BASE_IMAGE = "python:3.11-slim"


@dataclass(frozen=True, slots=True)
class Node:
    """One broker node and the lb server line that points at it."""

    name: str  # [node] name, the compose service and cluster member name
    config: str  # broker -c FILE
    mqtt_port: int  # plain TCP listener with proxy_protocol = true
    admin_port: int  # GET /api/clients
    cluster_port: int  # seed 002: cluster RPC over mutual TLS, 5370 + N
    server: str  # lb's `server` name for it in configs/haproxy.cfg
    certificate: str  # lb-pki demo's node certificate (NAME.pem + NAME-key.pem)

    @property
    def docker_config(self) -> str:
        return docker_config(self.config)


# seed 004's server names (after the nodes' addresses); nodes past the third get emqx-N.
SEED_SERVERS = ("emqx-165", "emqx-171", "emqx-172")
MQTT_PORT_BASE = 1882  # node N: 1882 + N (1883, 1884, 1885)
ADMIN_PORT_BASE = 18082  # node N: 18082 + N
CLUSTER_PORT_BASE = 5370  # seed 002: cluster RPC on 5370 + N
MAX_NODES = 9  # ports stay in their decade, and a --base-port block stays 40 wide


CLUSTER_NAME = "mqtt-cluster"
CLUSTER_COOKIE = "change-me-shared-cluster-cookie"


def node(
    number: int,
    mqtt_port: int | None = None,
    admin_port: int | None = None,
    cluster_port: int | None = None,
) -> Node:
    """Broker node ``number`` (from 1) on the seed's ports, or on the ports given (bench/fleet.py
    takes free ones)."""
    if not 1 <= number <= MAX_NODES:
        raise ValueError(f"node {number}: the topology has nodes 1..{MAX_NODES}")
    server = SEED_SERVERS[number - 1] if number <= len(SEED_SERVERS) else f"emqx-{number}"
    return Node(
        name=f"broker-{number}",
        config=f"configs/broker-{number}.toml",
        mqtt_port=MQTT_PORT_BASE + number if mqtt_port is None else mqtt_port,
        admin_port=ADMIN_PORT_BASE + number if admin_port is None else admin_port,
        cluster_port=CLUSTER_PORT_BASE + number if cluster_port is None else cluster_port,
        server=server,
        certificate=f"node-{number}",
    )


def nodes(count: int = DEFAULT_NODES) -> tuple[Node, ...]:
    return tuple(node(number) for number in range(1, count + 1))


NODES: tuple[Node, ...] = nodes()


# -- where the local demo listens ---------------------------------------------------------------

MOVED_CONFIG_DIR = f"{OUT_DIR}/configs"  # the configs of a --base-port run
BASE_PORT_SPAN = 40  # B: lb, B+1: /metrics, B+10+N: mqtt, B+20+N: admin, B+30+N: cluster


@dataclass(frozen=True, slots=True)
class Layout:
    """The ports of one local run and the config files that say them."""

    lb_port: int
    prometheus_port: int
    nodes: tuple[Node, ...]
    lb_config: str
    base_port: int | None = None  # None: the seed's ports and the configs/ files as they are

    def ports(self) -> list[int]:
        ports = [self.lb_port, self.prometheus_port]
        for member in self.nodes:
            ports += [member.mqtt_port, member.admin_port, member.cluster_port]
        return ports

    def moved_ports(self) -> dict[int, int]:
        """Each port of the seed's layout -> this layout's port for the same listener."""
        seed = [LB_PORT, PROMETHEUS_PORT]
        for member in nodes(len(self.nodes)):
            seed += [member.mqtt_port, member.admin_port, member.cluster_port]
        return dict(zip(seed, self.ports(), strict=True))


SEED_LAYOUT = Layout(LB_PORT, PROMETHEUS_PORT, NODES, LB_CONFIG)


def layout(base_port: int | None = None, count: int = DEFAULT_NODES) -> Layout:
    """The seed's layout, or every port moved into ``base_port .. base_port + 39``."""
    if base_port is None:
        return SEED_LAYOUT if count == len(NODES) else replace(SEED_LAYOUT, nodes=nodes(count))
    if not 1024 <= base_port <= 65535 - BASE_PORT_SPAN:
        raise ValueError(f"--base-port {base_port}: must be 1024..{65535 - BASE_PORT_SPAN}")
    moved = tuple(
        replace(
            member,
            config=f"{MOVED_CONFIG_DIR}/{Path(member.config).name}",
            mqtt_port=base_port + 10 + number,
            admin_port=base_port + 20 + number,
            cluster_port=base_port + 30 + number,
        )
        for number, member in enumerate(nodes(count), start=1)
    )
    config = f"{MOVED_CONFIG_DIR}/{Path(LB_CONFIG).name}"
    return Layout(base_port, base_port + 1, moved, config, base_port)


def broker_config(
    member: Node,
    members: Sequence[Node],
    *,
    certs: str = "certs",
    host: str = LOCAL_HOST,
    max_connections: int = 500_000,
    trusted: Sequence[str] = ("127.0.0.0/8", "::1/128"),
    peer_host: Callable[[Node], str] | None = None,
    header: str | None = None,
    session_replicas: int | None = None,
    stop_evacuation: tuple[float, int | None] | None = None,
    partition_handling: str | None = None,
    store_path: str | None = None,
) -> str:
    """The TOML of one node of a cluster of `members` (configs/broker-N.toml for NODES):
    MQTT with PROXY protocol from `trusted`, the cluster over mutual TLS, the admin API, all
    bound on `host`. `certs` is where the node certificates are, relative to the file or
    absolute; peers are dialled at `peer_host(peer)` (default: `host`). demo/compose.py makes
    the container variant with other addresses and its own `header` comment.
    `session_replicas` is written when given (the broker's default, 1, otherwise), and
    `stop_evacuation` as (seconds, clients per second or None: the broker's default) when
    given, `partition_handling` when given, and with `store_path` a disk store there
    (`[store] mode = "disk"`, bench/fleet.py)."""
    number = member.certificate.rsplit("-", 1)[1]
    peers = ", ".join(
        f'"{other.name}@{peer_host(other) if peer_host else host}:{other.cluster_port}"'
        for other in members
        if other != member
    )
    if header is None:
        header = (
            f"# Broker node {number} of a {len(members)}-node cluster behind lb "
            "(demo/topology.py)\n# (seed 004: proxy_protocol = true, max_connections; "
            "seed 002: cluster RPC over mutual TLS).\n"
        )
    trusted_list = ", ".join(f'"{network}"' for network in trusted)
    replicas = "" if session_replicas is None else f"session_replicas = {session_replicas}\n"
    if stop_evacuation is not None:
        seconds, rate = stop_evacuation
        replicas += f'stop_evacuation = "{seconds:g}s"\n'
        if rate is not None:
            replicas += f"stop_evacuation_rate = {rate}\n"
    if partition_handling is not None:
        replicas += f'partition_handling = "{partition_handling}"\n'
    return f"""{header}
[node]
name = "{member.name}"
cookie = "{CLUSTER_COOKIE}"

[mqtt]
max_keepalive = 65535
max_packet_size = 1048576
receive_maximum = 32
max_inflight = 32
max_queued_messages = 1000
retain_available = true
topic_alias_maximum = 10
session_expiry_max = 7200

[listeners.tcp.default]
bind = "{host}:{member.mqtt_port}"
max_connections = {max_connections}
proxy_protocol = true
proxy_protocol_timeout = "3s"
proxy_protocol_trusted = [{trusted_list}]
peer_cert_as_username = "cn"

[cluster]
name = "{CLUSTER_NAME}"
bind = "{host}:{member.cluster_port}"
peers = [{peers}]
{replicas}
[cluster.ssl_options]
cacertfile = "{certs}/{ROOT_CA}.pem"
certfile = "{certs}/{member.certificate}.pem"
keyfile = "{certs}/{member.certificate}-key.pem"
verify = "verify_peer"
fail_if_no_peer_cert = true
versions = ["tlsv1.3", "tlsv1.2"]
depth = 10

[admin]
bind = "{host}:{member.admin_port}"
{_admin_anonymous(host)}{_store(store_path)}"""


def _store(path: str | None) -> str:
    """A disk store at `path` (broker.store: sessions and messages survive a SIGKILL)."""
    if path is None:
        return ""
    return f'\n[store]\nmode = "disk"\npath = "{path}"\n'


def _admin_anonymous(host: str) -> str:
    """Off loopback (the container network) the admin API needs credentials or this."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return ""
    return (
        "# The compose network only: the stack publishes lb's port alone, and the devices\n"
        "# container reads /api/clients (broker/admin.py; token_file would need a secret).\n"
        "anonymous = true\n"
    )


def docker_config(path: str) -> str:
    """configs/X -> configs/docker/X: the container variant (0.0.0.0 binds, service names)."""
    prefix = "configs/"
    if not path.startswith(prefix):
        raise ValueError(f"{path} is not under configs/")
    return f"{prefix}docker/{path[len(prefix) :]}"


def device_name(number: int) -> str:
    return f"device-{number:04d}"


def pki_command(devices: int = PKI_DEVICES, count: int = DEFAULT_NODES) -> tuple[str, ...]:
    """Reuse the PKI in CERTS_DIR if it is complete and valid, else make it with lb-pki demo."""
    command = ["python", "-m", "demo.pki", "--dir", CERTS_DIR, "--devices", str(devices)]
    if count != DEFAULT_NODES:
        command += ["--nodes", str(count)]
    for name in SERVER_DNS:
        command += ["--dns", name]
    return tuple(command)


def broker_command(node: Node, config: str | None = None) -> tuple[str, ...]:
    return ("broker", "-c", config or node.config)


def lb_command(config: str = LB_CONFIG) -> tuple[str, ...]:
    return ("lb", "-f", config)


def devices_command(
    host: str,
    admin_hosts: Sequence[str],
    devices: int = DEFAULT_DEVICES,
    messages: int = DEFAULT_MESSAGES,
    port: int = LB_PORT,
    members: Sequence[Node] = NODES,
) -> tuple[str, ...]:
    """The device simulator: ``admin_hosts[i]`` is where members[i]'s admin endpoint answers."""
    command = [
        "python",
        "-m",
        "demo.devices",
        "--host",
        host,
        "--port",
        str(port),
        "--certs",
        CERTS_DIR,
        "--devices",
        str(devices),
        "--messages",
        str(messages),
        "--report",
        DEVICES_REPORT,
    ]
    for member, admin_host in zip(members, admin_hosts, strict=True):
        command += ["--admin", f"{member.name}={admin_host}:{member.admin_port}"]
    return tuple(command)


def local_commands(
    devices: int = DEFAULT_DEVICES,
    messages: int = DEFAULT_MESSAGES,
    where: Layout = SEED_LAYOUT,
) -> dict[str, tuple[str, ...]]:
    """Every command the local demo runs, by the name of its process (= compose service)."""
    commands = {"pki": pki_command()}
    commands.update({member.name: broker_command(member) for member in where.nodes})
    commands["lb"] = lb_command(where.lb_config)
    commands["devices"] = devices_command(
        LOCAL_HOST,
        [LOCAL_HOST] * len(where.nodes),
        devices,
        messages,
        where.lb_port,
        where.nodes,
    )
    return commands


def docker_commands(
    count: int = DEFAULT_NODES,
    devices: int = DEFAULT_DEVICES,
    messages: int = DEFAULT_MESSAGES,
) -> dict[str, tuple[str, ...]]:
    """The same commands as docker-compose.yml runs them (service names for hosts)."""
    members = nodes(count)
    commands = {"pki": pki_command(max(devices, PKI_DEVICES), count)}
    commands.update(
        {member.name: broker_command(member, member.docker_config) for member in members}
    )
    commands["lb"] = lb_command(docker_config(LB_CONFIG))
    commands["devices"] = devices_command(
        LB_HOST, [member.name for member in members], devices, messages, LB_PORT, members
    )
    return commands


def docker_host_to_local(host: str) -> str:
    """A compose service name as the local demo spells it (everything runs on 127.0.0.1)."""
    if host == LB_HOST or host in {node(number).name for number in range(1, MAX_NODES + 1)}:
        return LOCAL_HOST
    return host


def docker_config_to_local(path: str) -> str:
    for local in (LB_CONFIG, *(member.config for member in nodes(MAX_NODES))):
        if path == docker_config(local):
            return local
    return path
