"""``python -m demo.compose``: the demo's topology for docker-compose, for any node count.

It writes docker-compose.yml and the container configs (configs/docker/haproxy.cfg and one
broker-N.toml per node) from :mod:`demo.topology`. With the defaults (3 nodes, 24 devices,
5 messages each) and ``--out .`` that is exactly the files in the repository, which
tests/test_compose.py checks with ``--check``; any other count goes to its own directory
(``demo/out/compose-<nodes>n-<devices>d/`` by default), whose compose file builds the same
image from the repository and mounts its own configs/docker/ over the image's::

    python -m demo.compose --nodes 5 --devices 40
    docker-compose -f demo/out/compose-5n-40d/docker-compose.yml up --build devices

``./dev compose --nodes 5 --devices 40 up --build devices`` does both, with the wheels and
the base image the build needs (packaging/image.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from demo import topology
from demo.topology import Node

COMPOSE_FILE = "docker-compose.yml"
CONFIG_DIR = "configs/docker"
# Compose's own health checks: every few seconds, so that the services waiting for a healthy
# one start soon (Docker runs the first check one interval after the start).
HEALTH_INTERVAL = "3s"
HEALTH_RETRIES = 10
LB_STOP_GRACE = "30s"  # above hard-stop-after (20s) in haproxy.cfg
HEADER = """\
# The demo's topology (./dev demo) where Docker runs: {nodes} broker nodes and {devices} devices,
# made by `python -m demo.compose --nodes {nodes} --devices {devices} --messages {messages}`
# from demo/topology.py. A one-shot pki service makes the certificates into a volume, the
# broker nodes cluster over mutual TLS, lb terminates the devices' mutual TLS and balances
# them round robin with PROXY v2, and a device simulator runs the fleet and prints what each
# node saw. lb is published on {published} (MQTT over TLS; ${variable} moves it).
#
# The image builds offline from build/wheels (and, where no registry serves python:3.11-slim,
# from a base image made of Debian's packages: $BASE_IMAGE); ./dev compose makes both:
#
#   ./dev compose up --build devices         # everything, then the simulator's report
#   ./dev compose logs lb                    # the refused revoked and rogue devices, why
#   ./dev compose down -v
#   docker cp "$(./dev compose ps -q pki):{certificates}" .      # the certificates, then:
#   mosquitto_sub -h 127.0.0.1 -p {published} --cafile certs/CaRoot.pem \\
#       --cert certs/device-0002.pem --key certs/device-0002-key.pem -i device-0002 -t 'fleet/#' -v
#
# Every command, path and port here is one the local demo uses; the configs/docker/ variants
# differ from configs/ only in addresses. tests/test_compose.py checks both, and runs it.
"""
ALIAS_NOTE = "  # the DNS SAN of its node certificate, which peers verify"


def default_out(count: int, devices: int, messages: int) -> Path:
    if (count, devices, messages) == (
        topology.DEFAULT_NODES,
        topology.DEFAULT_DEVICES,
        topology.DEFAULT_MESSAGES,
    ):
        return topology.ROOT
    return topology.ROOT / topology.OUT_DIR / f"compose-{count}n-{devices}d-{messages}m"


# -- configs/docker/ -----------------------------------------------------------------------------


def haproxy_cfg(members: Sequence[Node]) -> str:
    servers = "\n".join(
        f"    server {member.server} {member.name}:{member.mqtt_port} check-send-proxy "
        "send-proxy-v2 send-proxy-v2-ssl-cn check inter 10s fall 2 rise 5"
        for member in members
    )
    return f"""\
# The seed 004 configuration of configs/haproxy.cfg, for docker-compose.yml: the same
# frontend, backend, servers, ports and certificates; only the addresses differ. lb binds
# every interface of its container, the servers are the broker containers by service name,
# and the certificates are the pki service's volume, mounted on configs/certs/ (hence
# ../certs/ from this directory). Made by `python -m demo.compose`; tests/test_compose.py
# checks that nothing else differs.

global
    # No 'maxconn': as HAProxy 2.6 does, lb takes what its file limit allows, two
    # descriptors per session (9,976 under 20,000 files, ~524,000 under the systemd
    # unit's LimitNOFILE=1048576). An explicit maxconn that the limit cannot serve stops
    # the start ("Cannot raise FD limit ..."); 'nbthread N' spreads it over N worker
    # processes, each with a limit of its own. (The seed's "default 2000" predates that.)
    log stdout format raw local0
    # A soft stop (SIGUSR1, `docker stop`) lets sessions finish, but MQTT sessions last:
    # close what is left after this long (below the container's stop grace period).
    hard-stop-after 20s

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout check 5s

# Prometheus metrics (HAProxy's exporter names) on loopback; the container's health check.
frontend prometheus
    bind {topology.LOCAL_HOST}:{topology.PROMETHEUS_PORT}
    mode http
    http-request use-service prometheus-exporter
    no log

frontend {topology.LB_FRONTEND}
    bind *:{topology.LB_PORT} ssl crt ../certs/{topology.SERVER_ALLINONE} \
ca-file ../certs/{topology.INTERMEDIATE_CA}.pem ca-verify-file ../certs/{topology.ROOT_CA}.pem \
verify required crl-file ../certs/{topology.CRL}
    mode tcp
    log global
    # tcplog and the connection id (%ID) that proxy-v2-options unique-id sends the brokers:
    # one grep finds a device in lb's log and in its broker's (lb makes 128 random bits).
    log-format "%ci:%cp [%t] %ft %b/%s %Tw/%Tc/%Tt %B %ts %ac/%fc/%bc/%sc/%rc %sq/%bq %ID"
    default_backend {topology.LB_BACKEND}

backend {topology.LB_BACKEND}
    mode tcp
    option tcplog
    balance roundrobin
    # send-proxy-v2-ssl-cn adds the TLS TLVs with the verified client CN to the PROXY v2
    # header: the brokers take it as the username (peer_cert_as_username = "cn");
    # proxy-v2-options unique-id adds the connection id (PP2_TYPE_UNIQUE_ID).
    default-server inter 10s downinter 5s rise 2 fall 2 slowstart 60s maxconn 500000 \
maxqueue 10000 weight 100 proxy-v2-options unique-id
{servers}
"""


def broker_toml(member: Node, members: Sequence[Node]) -> str:
    number = member.name.rsplit("-", 1)[1]
    header = f"""\
# Broker node {number} of configs/broker-{number}.toml, for docker-compose.yml (service \
{member.name}):
# the same node, ports and certificates; only the addresses differ. It listens on every
# interface of its container, trusts PROXY headers only from lb's fixed address on the
# compose network, and dials its peers by the DNS names of their node certificates
# (node-N, network aliases of the broker services). Made by `python -m demo.compose`;
# tests/test_compose.py checks that nothing else differs. Certificates: the pki service's
# volume on configs/certs/.
"""
    return topology.broker_config(
        member,
        members,
        certs="../certs",
        host="0.0.0.0",
        trusted=(f"{topology.DOCKER_LB_ADDRESS}/32",),
        peer_host=lambda other: other.certificate,
        header=header,
    )


# -- docker-compose.yml --------------------------------------------------------------------------


def _command(command: Sequence[str], indent: str = "    ") -> str:
    """A command as a YAML flow list when short, a block list when long."""
    quoted = ", ".join(f'"{word}"' for word in command)
    flow = f"{indent}command: [{quoted}]"
    if len(flow) <= 100:
        return flow
    words = (f'"{word}"' if word.isdigit() else word for word in command)
    return f"{indent}command:\n" + "\n".join(f"{indent}  - {word}" for word in words)


def compose_yaml(
    count: int = topology.DEFAULT_NODES,
    devices: int = topology.DEFAULT_DEVICES,
    messages: int = topology.DEFAULT_MESSAGES,
    context: str = ".",
    mount_configs: bool = False,
) -> str:
    members = topology.nodes(count)
    commands = topology.docker_commands(count, devices, messages)
    workdir = topology.DOCKER_WORKDIR
    volumes = [f"certs:{workdir}/{topology.CERTS_DIR}"]
    if mount_configs:
        volumes.append(f"./{CONFIG_DIR}:{workdir}/{CONFIG_DIR}:ro")
    base = topology.BASE_IMAGE_VARIABLE
    published = f"${{{topology.PUBLISHED_PORT_VARIABLE}:-{topology.PUBLISHED_PORT}}}"
    certificates = f"{workdir}/{topology.CERTS_DIR}"
    header = HEADER.format(
        nodes=count,
        devices=devices,
        messages=messages,
        published=topology.PUBLISHED_PORT,
        variable=topology.PUBLISHED_PORT_VARIABLE,
        certificates=certificates,
    )
    lines = [
        *header.splitlines(),
        "",
        "x-fleet: &fleet",
        "  build:",
        f"    context: {context}",
        "    args:",
        f"      {base}: ${{{base}:-{topology.DEFAULT_BASE_IMAGE}}}",
        f"  image: {topology.DOCKER_IMAGE}",
        f"  working_dir: {workdir}",
        "  volumes:",
        *(f"    - {volume}" for volume in volumes),
        "  networks:",
        "    - fleet",
        "",
        "x-after-pki: &after-pki",
        "  pki:",
        "    condition: service_completed_successfully",
        "",
        "x-one-shot: &one-shot",
        "  disable: true",
        "",
        "services:",
        "  pki:",
        "    <<: *fleet",
        _command(commands["pki"]),
        "    healthcheck: *one-shot",
        "    stop_signal: SIGTERM",
    ]
    for member in members:
        admin = f"http://{topology.LOCAL_HOST}:{member.admin_port}/api/stats"
        lines += [
            "",
            f"  {member.name}:",
            "    <<: *fleet",
            _command(commands[member.name]),
            "    depends_on: *after-pki",
            "    networks:",
            "      fleet:",
            f"        aliases: [{member.certificate}]"
            + (ALIAS_NOTE if member is members[0] else ""),
            "    healthcheck:  # its admin API answers",
            f'      test: ["CMD", "healthcheck", "{admin}"]',
            f"      interval: {HEALTH_INTERVAL}",
            f"      retries: {HEALTH_RETRIES}",
            "    stop_signal: SIGTERM  # a clean stop: 5.0 clients get DISCONNECT 0x8B",
            "    restart: on-failure",
        ]
    lines += [
        "",
        "  lb:",
        "    <<: *fleet",
        _command(commands["lb"]),
        "    depends_on:",
        "      pki:",
        "        condition: service_completed_successfully",
        *(
            line
            for member in members
            for line in (f"      {member.name}:", "        condition: service_healthy")
        ),
        "    ports:",
        f'      - "{published}:{topology.LB_PORT}"',
        "    networks:",
        "      fleet:",
        f"        ipv4_address: {topology.DOCKER_LB_ADDRESS}  # the only PROXY v2 source the "
        "brokers trust",
        "    healthcheck:  # the image's: its Prometheus frontend answers",
        f"      interval: {HEALTH_INTERVAL}",
        f"      retries: {HEALTH_RETRIES}",
        f"    stop_grace_period: {LB_STOP_GRACE}  # the image's STOPSIGNAL SIGUSR1 is a soft stop",
        "    restart: on-failure",
        "",
        "  devices:",
        "    <<: *fleet",
        _command(commands["devices"]),
        "    depends_on:",
        "      lb:",
        "        condition: service_healthy",
        "    healthcheck: *one-shot",
        "    stop_signal: SIGTERM",
        "",
        "networks:",
        "  fleet:",
        "    ipam:",
        "      config:",
        f"        - subnet: {topology.DOCKER_NETWORK_SUBNET}",
        "",
        "volumes:",
        "  certs:",
    ]
    return "\n".join(lines) + "\n"


def files(
    out: Path,
    count: int = topology.DEFAULT_NODES,
    devices: int = topology.DEFAULT_DEVICES,
    messages: int = topology.DEFAULT_MESSAGES,
) -> dict[Path, str]:
    """Every file ``--out`` gets, with its text."""
    members = topology.nodes(count)
    in_repository = out.resolve() == topology.ROOT
    context = "." if in_repository else os.path.relpath(topology.ROOT, out)
    written = {
        out / COMPOSE_FILE: compose_yaml(
            count, devices, messages, context=context, mount_configs=not in_repository
        ),
        out / topology.docker_config(topology.LB_CONFIG): haproxy_cfg(members),
    }
    for member in members:
        written[out / member.docker_config] = broker_toml(member, members)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.compose",
        description="write docker-compose.yml and configs/docker/ for N nodes and D devices",
    )
    parser.add_argument("--nodes", type=int, default=topology.DEFAULT_NODES)
    parser.add_argument("--devices", type=int, default=topology.DEFAULT_DEVICES)
    parser.add_argument("--messages", type=int, default=topology.DEFAULT_MESSAGES)
    parser.add_argument("--out", type=Path, default=None, help="default: see the module doc")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a file differs"
    )
    arguments = parser.parse_args(argv)
    if not 1 <= arguments.nodes <= topology.MAX_NODES:
        parser.error(f"--nodes must be 1..{topology.MAX_NODES}")
    if arguments.devices < 1 or arguments.messages < 1:
        parser.error("--devices and --messages must be at least 1")
    out = arguments.out or default_out(arguments.nodes, arguments.devices, arguments.messages)
    wanted = files(out, arguments.nodes, arguments.devices, arguments.messages)
    if arguments.check:
        stale = [
            path for path, text in wanted.items() if not path.is_file() or path.read_text() != text
        ]
        for path in stale:
            print(f"{path}: differs from what python -m demo.compose makes", file=sys.stderr)
        return 1 if stale else 0
    for path, text in wanted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(out / COMPOSE_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
