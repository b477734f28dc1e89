"""docker-compose.yml runs the demo's topology: the same commands, paths and ports.

No Docker engine runs here, so the file is validated with ``docker-compose config`` (Debian's
docker-compose) and its normalized form is compared with demo/topology.py, which the local
demo runs. Container host names (lb, broker-N) stand for 127.0.0.1 and the configs/docker/
variants stand for their configs/ originals; the variants themselves must differ from the
originals in addresses only.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import load_config as load_broker_config
from demo import topology
from lb.config import load_config as load_lb_config

ROOT = topology.ROOT
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ADMIN_ARGUMENT = re.compile(r"^(?P<node>[^=]+)=(?P<host>[^:]+):(?P<port>\d+)$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    program = shutil.which("docker-compose")
    if program is None:
        pytest.skip("docker-compose is not installed (./dev setup installs it as root)")
    result = subprocess.run(
        [program, "-f", str(COMPOSE), "config"],
        cwd=ROOT,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = yaml.safe_load(result.stdout)
    return document


def to_local(command: tuple[str, ...]) -> tuple[str, ...]:
    """A container command as the local demo spells it: hosts, then config paths."""
    local: list[str] = []
    for index, argument in enumerate(command):
        text = topology.docker_config_to_local(argument)
        flag = command[index - 1] if index else ""
        if flag == "--host":
            text = topology.docker_host_to_local(text)
        elif flag == "--admin" and (match := ADMIN_ARGUMENT.match(text)):
            host = topology.docker_host_to_local(match["host"])
            text = f"{match['node']}={host}:{match['port']}"
        local.append(text)
    return tuple(local)


def test_services_are_the_demo_processes(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == set(topology.local_commands())


def test_commands_are_the_demo_commands(compose: dict[str, Any]) -> None:
    local = topology.local_commands()
    docker = topology.docker_commands()
    for name, service in compose["services"].items():
        command = tuple(service["command"])
        assert command == docker[name], name
        assert to_local(command) == local[name], name


def test_paths_are_the_demo_paths(compose: dict[str, Any]) -> None:
    workdir = topology.DOCKER_WORKDIR
    assert f"WORKDIR {workdir}" in DOCKERFILE.read_text().splitlines()
    for name, service in compose["services"].items():
        assert service["working_dir"] == workdir, name
        assert service["volumes"] == [f"certs:{workdir}/{topology.CERTS_DIR}:rw"], name
        for argument in service["command"]:
            if argument.startswith("configs/") and argument != topology.CERTS_DIR:
                assert (ROOT / argument).is_file(), f"{name}: {argument} does not exist"
    assert "certs" in compose["volumes"]


def test_ports_are_the_demo_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    (published,) = services["lb"]["ports"]
    if isinstance(published, str):  # the short syntax, as some docker-compose versions print
        host_port, container_port = published.split("/")[0].split(":")
        published = {"published": host_port, "target": container_port}
    assert int(published["published"]) == topology.PUBLISHED_PORT
    assert int(published["target"]) == topology.LB_PORT
    for name, service in services.items():
        if name != "lb":
            assert "ports" not in service, f"{name} publishes ports; only lb should"
    devices = services["devices"]["command"]
    assert devices[devices.index("--port") + 1] == str(topology.LB_PORT)
    admins = [devices[i + 1] for i, argument in enumerate(devices) if argument == "--admin"]
    assert admins == [f"{n.name}={n.name}:{n.admin_port}" for n in topology.NODES]


def test_network_aliases_are_the_node_certificates(compose: dict[str, Any]) -> None:
    """Peers dial node-N and check it against the node certificate's DNS SAN."""
    services = compose["services"]
    subnet = compose["networks"]["fleet"]["ipam"]["config"][0]["subnet"]
    assert subnet == topology.DOCKER_NETWORK_SUBNET
    lb_address = services["lb"]["networks"]["fleet"]["ipv4_address"]
    assert lb_address == topology.DOCKER_LB_ADDRESS
    assert ipaddress.ip_address(lb_address) in ipaddress.ip_network(subnet)
    for node in topology.NODES:
        assert services[node.name]["networks"]["fleet"]["aliases"] == [node.certificate]
    # The devices reach lb by its service name, which the server certificate must carry.
    assert topology.LB_HOST in services and topology.LB_HOST in topology.SERVER_DNS


def test_pki_runs_before_everything(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name in {"pki", "devices"}:
            continue
        condition = service["depends_on"]["pki"]["condition"]
        assert condition == "service_completed_successfully", name


def _haproxy_lines(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            lines.append(" ".join(text.split()))
    return lines


def test_docker_haproxy_cfg_differs_in_addresses_only() -> None:
    local = _haproxy_lines(ROOT / topology.LB_CONFIG)
    docker = _haproxy_lines(ROOT / topology.docker_config(topology.LB_CONFIG))
    replacements = [
        (f"bind *:{topology.LB_PORT} ", f"bind {topology.LOCAL_HOST}:{topology.LB_PORT} "),
        ("../certs/", "certs/"),
        *(
            (f" {node.name}:{node.mqtt_port} ", f" {topology.LOCAL_HOST}:{node.mqtt_port} ")
            for node in topology.NODES
        ),
    ]
    normalized = []
    for line in docker:
        text = line
        for docker_text, local_text in replacements:
            text = text.replace(docker_text, local_text)
        normalized.append(text)
    assert normalized == local


def _localize_broker(document: dict[str, Any]) -> dict[str, Any]:
    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: walk(item) for key, item in value.items()}
        if isinstance(value, list):
            return [walk(item) for item in value]
        if isinstance(value, str):
            value = value.replace("0.0.0.0:", f"{topology.LOCAL_HOST}:")
            value = value.replace("../certs/", "certs/")
            for node in topology.NODES:
                value = value.replace(f"@{node.certificate}:", f"@{topology.LOCAL_HOST}:")
        return value

    localized: dict[str, Any] = walk(document)
    return localized


@pytest.mark.parametrize("node", topology.NODES, ids=lambda node: node.name)
def test_docker_broker_configs_differ_in_addresses_only(node: topology.Node) -> None:
    local = tomllib.loads((ROOT / node.config).read_text())
    docker = tomllib.loads((ROOT / node.docker_config).read_text())
    # Trust is explicit: in the containers, PROXY headers only from lb's fixed address.
    listener = docker["listeners"]["tcp"]["default"]
    assert listener.pop("proxy_protocol_trusted") == [f"{topology.DOCKER_LB_ADDRESS}/32"]
    del local["listeners"]["tcp"]["default"]["proxy_protocol_trusted"]
    assert _localize_broker(docker) == local


def test_docker_configs_load() -> None:
    result = load_lb_config([ROOT / topology.docker_config(topology.LB_CONFIG)], environ={})
    assert [d.text for d in result.diagnostics] == []
    for node in topology.NODES:
        config = load_broker_config(ROOT / node.docker_config)
        assert config.node_name == node.name
        assert config.cluster is not None and config.cluster.ssl_options is not None
        assert config.cluster.ssl_options.certfile.resolve() == (
            ROOT / topology.CERTS_DIR / f"{node.certificate}.pem"
        )
