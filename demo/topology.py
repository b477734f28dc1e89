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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CERTS_DIR = "configs/certs"
OUT_DIR = "demo/out"
DEVICES_REPORT = f"{OUT_DIR}/devices.json"
LB_CONFIG = "configs/haproxy.cfg"

LOCAL_HOST = "127.0.0.1"
LB_HOST = "lb"  # the lb container's name; also a DNS SAN of the server certificate
LB_PORT = 8091  # seed 004: bind *:8091 ssl crt server-allinone.pem ...
PUBLISHED_PORT = 8883  # the MQTT over TLS port (seed 000), published by the lb container
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

DEFAULT_DEVICES = 24
DEFAULT_MESSAGES = 5
FAST_DEVICES = 20
FAST_MESSAGES = 2

# In docker-compose.yml: the image's working directory, the certificate volume's mount point,
# the fleet network and lb's fixed address in it (the only PROXY source the brokers trust).
DOCKER_WORKDIR = "/app"
DOCKER_NETWORK_SUBNET = "172.28.0.0/24"
DOCKER_LB_ADDRESS = "172.28.0.10"


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


#: lb's server names for the seed's three nodes (seed 004's backend); a fourth node and on
#: are emqx-N.
SEED_SERVERS = ("emqx-165", "emqx-171", "emqx-172")
CLUSTER_NAME = "mqtt-cluster"
CLUSTER_COOKIE = "change-me-shared-cluster-cookie"
MQTT_PORT_BASE = 1883
ADMIN_PORT_BASE = 18083
CLUSTER_PORT_BASE = 5371  # seed 002: 5370 + N


def node(
    number: int,
    mqtt_port: int | None = None,
    admin_port: int | None = None,
    cluster_port: int | None = None,
) -> Node:
    """Broker node `number` (1-based); ports default to the demo's (1883 + N - 1, ...)."""
    server = SEED_SERVERS[number - 1] if number <= len(SEED_SERVERS) else f"emqx-{number}"
    return Node(
        f"broker-{number}",
        f"configs/broker-{number}.toml",
        mqtt_port if mqtt_port is not None else MQTT_PORT_BASE + number - 1,
        admin_port if admin_port is not None else ADMIN_PORT_BASE + number - 1,
        cluster_port if cluster_port is not None else CLUSTER_PORT_BASE + number - 1,
        server,
        f"node-{number}",
    )


def nodes(count: int) -> tuple[Node, ...]:
    """`count` nodes on the demo's ports (bench/fleet.py makes its own with free ports)."""
    return tuple(node(number) for number in range(1, count + 1))


NODES: tuple[Node, ...] = nodes(3)


def broker_config(
    member: Node,
    members: Sequence[Node],
    *,
    certs: str = "certs",
    host: str = LOCAL_HOST,
    max_connections: int = 500_000,
) -> str:
    """The TOML of one node of a cluster of `members` (configs/broker-N.toml for NODES):
    MQTT with PROXY protocol from 127.0.0.0/8, the cluster over mutual TLS, the admin API.
    `certs` is where the node certificates are, relative to the file or absolute."""
    number = member.certificate.rsplit("-", 1)[1]
    peers = ", ".join(
        f'"{other.name}@{host}:{other.cluster_port}"' for other in members if other != member
    )
    return f"""# Broker node {number} of a {len(members)}-node cluster behind lb (demo/topology.py)
# (seed 004: proxy_protocol = true, max_connections; seed 002: cluster RPC over mutual TLS).

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
proxy_protocol_trusted = ["127.0.0.0/8", "::1/128"]
peer_cert_as_username = "cn"

[cluster]
name = "{CLUSTER_NAME}"
bind = "{host}:{member.cluster_port}"
peers = [{peers}]

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
"""


def docker_config(path: str) -> str:
    """configs/X -> configs/docker/X: the container variant (0.0.0.0 binds, service names)."""
    prefix = "configs/"
    if not path.startswith(prefix):
        raise ValueError(f"{path} is not under configs/")
    return f"{prefix}docker/{path[len(prefix) :]}"


def device_name(number: int) -> str:
    return f"device-{number:04d}"


def pki_command() -> tuple[str, ...]:
    """Reuse the PKI in CERTS_DIR if it is complete and valid, else make it with lb-pki demo."""
    command = ["python", "-m", "demo.pki", "--dir", CERTS_DIR, "--devices", str(PKI_DEVICES)]
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
) -> tuple[str, ...]:
    """The device simulator: ``admin_hosts[i]`` is where NODES[i]'s admin endpoint answers."""
    command = [
        "python",
        "-m",
        "demo.devices",
        "--host",
        host,
        "--port",
        str(LB_PORT),
        "--certs",
        CERTS_DIR,
        "--devices",
        str(devices),
        "--messages",
        str(messages),
        "--report",
        DEVICES_REPORT,
    ]
    for node, admin_host in zip(NODES, admin_hosts, strict=True):
        command += ["--admin", f"{node.name}={admin_host}:{node.admin_port}"]
    return tuple(command)


def local_commands(
    devices: int = DEFAULT_DEVICES, messages: int = DEFAULT_MESSAGES
) -> dict[str, tuple[str, ...]]:
    """Every command the local demo runs, by the name of its process (= compose service)."""
    commands = {"pki": pki_command()}
    commands.update({node.name: broker_command(node) for node in NODES})
    commands["lb"] = lb_command()
    commands["devices"] = devices_command(LOCAL_HOST, [LOCAL_HOST] * len(NODES), devices, messages)
    return commands


def docker_commands() -> dict[str, tuple[str, ...]]:
    """The same commands as docker-compose.yml runs them (service names for hosts)."""
    commands = {"pki": pki_command()}
    commands.update({node.name: broker_command(node, node.docker_config) for node in NODES})
    commands["lb"] = lb_command(docker_config(LB_CONFIG))
    commands["devices"] = devices_command(LB_HOST, [node.name for node in NODES])
    return commands


def docker_host_to_local(host: str) -> str:
    """A compose service name as the local demo spells it (everything runs on 127.0.0.1)."""
    if host == LB_HOST or host in {node.name for node in NODES}:
        return LOCAL_HOST
    return host


def docker_config_to_local(path: str) -> str:
    for local in (LB_CONFIG, *(node.config for node in NODES)):
        if path == docker_config(local):
            return local
    return path
