"""docker-compose.yml runs the demo's topology: the same commands, paths and ports; and it runs.

The file is validated with ``docker-compose config`` (Debian's docker-compose) and its
normalized form is compared with demo/topology.py, which the local demo runs. Container host
names (lb, broker-N) stand for 127.0.0.1 and the configs/docker/ variants stand for their
configs/ originals; the variants themselves must differ from the originals in addresses only.
The compose file and the variants are what ``python -m demo.compose`` makes.

Then the stack is built and run for real (tests/docker_engine.py finds or starts a Docker
engine, as root; without one these tests are skipped with the reason): the base image made
from Debian's packages, the image built offline from the wheels of requirements/image.lock,
the devices' report, lb's refusal lines, health checks, reloads on SIGUSR2 and SIGHUP, a
device through the published port, and soft stops; and once more with 4 nodes and 30
devices from a generated compose file.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from bench.ports import free_port
from broker.config import load_config as load_broker_config
from demo import compose as demo_compose
from demo import topology
from lb.config import load_config as load_lb_config
from tests.docker_engine import Engine, engine
from tests.harness import apt_install

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
    # The admin API off loopback (the devices container asks it) says it is anonymous.
    assert docker["admin"].pop("anonymous") is True
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


def test_compose_files_are_what_demo_compose_makes() -> None:
    """docker-compose.yml and configs/docker/ are python -m demo.compose's defaults."""
    for path, text in demo_compose.files(ROOT).items():
        assert path.read_text() == text, f"{path}: run python -m demo.compose --out ."


def test_generated_compose_scales_nodes_and_devices(tmp_path: Path) -> None:
    written = demo_compose.files(tmp_path, count=5, devices=40, messages=2)
    document = yaml.safe_load(written[tmp_path / "docker-compose.yml"])
    services = document["services"]
    assert {f"broker-{n}" for n in range(1, 6)} <= set(services)
    lb_config = written[tmp_path / topology.docker_config(topology.LB_CONFIG)]
    assert [line.split()[1] for line in lb_config.splitlines() if "    server " in line] == [
        node.server for node in topology.nodes(5)
    ]
    five = tomllib.loads(written[tmp_path / topology.nodes(5)[4].docker_config])
    assert five["cluster"]["peers"] == [
        f"broker-{n}@node-{n}:{topology.CLUSTER_PORT_BASE + n}" for n in range(1, 5)
    ]
    pki = services["pki"]["command"]
    assert pki[pki.index("--devices") + 1] == "40" and pki[pki.index("--nodes") + 1] == "5"
    devices = services["devices"]["command"]
    assert devices[devices.index("--devices") + 1] == "40"
    # The image is built from the repository, with this directory's configs mounted over it.
    assert (tmp_path / document["x-fleet"]["build"]["context"]).resolve() == ROOT
    assert "./configs/docker:/app/configs/docker:ro" in document["x-fleet"]["volumes"]


# -- the stack, built and run --------------------------------------------------------------------

STACK_TIMEOUT = 900  # a cold run installs the engine, debootstraps the base image and builds
COMMAND_TIMEOUT = 600.0
DEVICES_TIMEOUT = 240.0
HEALTH_TIMEOUT = 60.0
LOG_TIMEOUT = 30.0
SCALED = (4, 30, 2)  # nodes, devices, messages of the second run
BUILD_STAGE_TAG = "iot-edge-lb:build-stage"
LOG_PREFIX = re.compile(r"^\S+\s+\| ?")
DEVICE_ROUNDTRIP_TIMEOUT = 20.0
# The stack's network has a fixed subnet (the brokers trust lb's fixed address in it), so two
# test runs on one engine (two checkouts' suites at once) take turns, and a network a killed
# run left behind (its project names a pid that is gone) is removed before ours is made.
STACK_LOCK = Path("/tmp/iot-edge-lb-compose-test.lock")
STACK_LOCK_TIMEOUT = 900.0
PROJECT_PREFIX = "iotedgelbtest"
OUR_PROJECT = re.compile(rf"^{PROJECT_PREFIX}(\d+)(?:scaled)?$")


@dataclass
class Run:
    """One `up devices` of a compose file: the devices' exit code, report and output."""

    code: int
    report: dict[str, Any]
    output: str


@dataclass
class Stack:
    engine: Engine
    project: str
    file: Path
    environment: dict[str, str]
    published_port: int
    base_image: str
    run: Run | None = None
    scaled: Run | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def compose(
        self, *arguments: str, file: Path | None = None, project: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = [
            *self.engine.compose,
            "-p",
            project or self.project,
            "-f",
            str(file or self.file),
            *arguments,
        ]
        return subprocess.run(
            command,
            cwd=ROOT,
            env=self.environment,
            capture_output=True,
            check=False,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )

    def docker(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.engine.docker, *arguments],
            capture_output=True,
            check=False,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )

    def container(self, service: str, project: str | None = None, file: Path | None = None) -> str:
        result = self.compose("ps", "-q", service, file=file, project=project)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[0]

    def logs(self, service: str) -> list[str]:
        result = self.compose("logs", "--no-color", service)
        return [LOG_PREFIX.sub("", line) for line in result.stdout.splitlines()]

    def inspect(self, service: str) -> dict[str, Any]:
        result = self.docker("inspect", self.container(service))
        assert result.returncode == 0, result.stderr
        document: list[dict[str, Any]] = json.loads(result.stdout)
        return document[0]

    def up_devices(self, file: Path, project: str, directory: Path) -> Run:
        """`up -d --build devices`, wait for the simulator, collect what it reported."""
        result = self.compose("up", "-d", "--build", "devices", file=file, project=project)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        devices = self.container("devices", project, file)
        waited = subprocess.run(
            [self.engine.docker, "wait", devices],
            capture_output=True,
            check=False,
            text=True,
            timeout=DEVICES_TIMEOUT,
        )
        code = int(waited.stdout.strip() or -1)
        output = self.compose("logs", "--no-color", "devices", file=file, project=project).stdout
        copied = self.docker("cp", f"{devices}:/app/{topology.DEVICES_REPORT}", str(directory))
        assert copied.returncode == 0, copied.stderr + output[-3000:]
        report: dict[str, Any] = json.loads((directory / "devices.json").read_text())
        return Run(code, report, output)


@contextlib.contextmanager
def _stack_turn() -> Iterator[None]:
    """Hold the machine-wide turn to run a stack (flock; released when the process dies)."""
    with STACK_LOCK.open("a") as lock:
        deadline = time.monotonic() + STACK_LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test run held {STACK_LOCK} for {STACK_LOCK_TIMEOUT:g} s")
                time.sleep(1.0)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_stacks(docker: str) -> None:
    """Containers and networks of our test projects whose test process is gone (a run that
    was killed before its teardown); a live run's, or anyone else's, are left alone. Another
    network on the stack's subnet is reported by `up` itself ("Pool overlaps")."""

    def run(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [docker, *arguments], capture_output=True, check=False, text=True, timeout=120
        )

    listed = run("network", "ls", "--format", '{{.Name}} {{.Label "com.docker.compose.project"}}')
    for line in listed.stdout.splitlines():
        name, _, project = line.partition(" ")
        match = OUR_PROJECT.match(project.strip())
        if match is None or _pid_alive(int(match.group(1))):
            continue
        containers = run(
            "ps", "-aq", "--filter", f"label=com.docker.compose.project={project.strip()}"
        ).stdout.split()
        if containers:
            run("rm", "-f", "-v", *containers)
        removed = run("network", "rm", name)
        print(f"removed the stale network {name} of a dead test run: {removed.returncode}")


def _make_base_image() -> str:
    command = [sys.executable, str(ROOT / "packaging" / "image.py"), "base"]
    result = subprocess.run(
        command, capture_output=True, check=False, text=True, timeout=COMMAND_TIMEOUT
    )
    if result.returncode != 0 and "debootstrap is not installed" in result.stderr:
        problem = apt_install("debootstrap")
        if problem is not None:
            pytest.skip(f"no base image: {problem}")
        result = subprocess.run(
            command, capture_output=True, check=False, text=True, timeout=COMMAND_TIMEOUT
        )
    if result.returncode != 0 and "needs root" in result.stderr:
        pytest.skip("the base image is made with debootstrap, which needs root")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The default stack, up after its devices finished; a 4-node run before it, torn down.

    The two runs are one after the other: both use the compose network's fixed subnet.
    """
    if os.geteuid() != 0:
        pytest.skip("building and running the stack needs root (Docker engine, debootstrap)")
    directory = tmp_path_factory.mktemp("compose")
    with engine(directory) as docker_engine, _stack_turn():
        _remove_stale_stacks(docker_engine.docker)
        started = time.monotonic()
        base_image = _make_base_image()
        seconds = {"base image": time.monotonic() - started}
        wheels = subprocess.run(
            [sys.executable, str(ROOT / "packaging" / "image.py"), "wheels"],
            capture_output=True,
            check=False,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
        assert wheels.returncode == 0, wheels.stderr
        published = free_port()
        environment = {
            **os.environ,
            topology.BASE_IMAGE_VARIABLE: base_image,
            topology.PUBLISHED_PORT_VARIABLE: str(published),
        }
        project = f"{PROJECT_PREFIX}{os.getpid()}"
        result = Stack(docker_engine, project, COMPOSE, environment, published, base_image)
        scaled_project = f"{project}scaled"
        scaled_dir = directory / "scaled"
        nodes, devices, messages = SCALED
        scaled_file = next(
            path
            for path in _write(demo_compose.files(scaled_dir, nodes, devices, messages))
            if path.name == "docker-compose.yml"
        )
        try:
            mark = time.monotonic()
            result.scaled = result.up_devices(scaled_file, scaled_project, scaled_dir)
            result.seconds["scaled run (build included)"] = time.monotonic() - mark
            down = result.compose("down", "-v", file=scaled_file, project=scaled_project)
            assert down.returncode == 0, down.stderr
            mark = time.monotonic()
            result.run = result.up_devices(COMPOSE, project, directory)
            result.seconds["default run"] = time.monotonic() - mark
            result.seconds.update(seconds)
            yield result
        finally:
            result.compose(
                "down", "-v", "--remove-orphans", file=scaled_file, project=scaled_project
            )
            result.compose("down", "-v", "--remove-orphans")
            _forget_old_builds(result)
            print(f"compose stack timings: {result.seconds}")


def _forget_old_builds(stack: Stack) -> None:
    """Keep the build cache, drop what earlier builds left: every build of changed sources
    leaves the previous image and build stage untagged (40 MB each). The build stage is
    tagged (all cached, nothing is built again), then untagged images of ours are removed."""
    subprocess.run(
        [
            stack.engine.docker,
            "build",
            "--quiet",
            "--target",
            "build",
            "--build-arg",
            f"{topology.BASE_IMAGE_VARIABLE}={stack.base_image}",
            "-t",
            BUILD_STAGE_TAG,
            str(ROOT),
        ],
        env={**os.environ, "DOCKER_BUILDKIT": "0"},  # the builder compose used, its cache
        capture_output=True,
        check=False,
        timeout=COMMAND_TIMEOUT,
    )
    stack.docker("image", "prune", "--force", "--filter", "label=iot-edge-lb.stage")


def _write(written: dict[Path, str]) -> list[Path]:
    for path, text in written.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(written)


def _wait_log(stack: Stack, service: str, pattern: str, after: int = 0) -> list[str]:
    deadline = time.monotonic() + LOG_TIMEOUT
    while True:
        lines = stack.logs(service)[after:]
        if any(re.search(pattern, line) for line in lines):
            return lines
        if time.monotonic() > deadline:
            tail = "\n".join(lines[-20:])
            raise AssertionError(f"{service}: no line matching {pattern!r}:\n{tail}")
        time.sleep(0.5)


def _wait_healthy(stack: Stack, service: str) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT
    while True:
        health = stack.inspect(service)["State"].get("Health", {})
        if health.get("Status") == "healthy":
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{service} is {health.get('Status')}: {health.get('Log')}")
        time.sleep(0.5)


def check_devices_report(run: Run, nodes: int, devices: int, messages: int) -> None:
    assert run.code == 0, run.output[-4000:]
    assert "result: OK" in run.output
    report = run.report
    assert report["ok"], report["problems"]
    assert len(report["devices"]) == devices
    assert set(report["nodes"]) == {node.name for node in topology.nodes(nodes)}
    total = devices * messages
    assert sum(device["received"] for device in report["devices"]) == total
    # Every node holds its share, each device with the address of its socket in the devices
    # container and its CN, as lb's PROXY v2 header told the node (lb is 172.28.0.10).
    sockets = {device["name"]: device["local_address"] for device in report["devices"]}
    subnet = ipaddress.ip_network(topology.DOCKER_NETWORK_SUBNET)
    for name, node in report["nodes"].items():
        fleet = [c for c in node["clients"] if c["client_id"].startswith("device-")]
        assert len(fleet) in {devices // nodes, devices // nodes + 1}, name
        for client in fleet:
            assert client["address"] == sockets[client["client_id"]]
            host = ipaddress.ip_address(client["address"].rpartition(":")[0])
            assert host in subnet and str(host) != topology.DOCKER_LB_ADDRESS
            assert client["certificate_cn"] == client["client_id"]
            assert client["via_proxy"]


def check_image_is_small_unprivileged_and_has_no_compiler(stack: Stack) -> None:
    image = json.loads(stack.docker("image", "inspect", topology.DOCKER_IMAGE).stdout)[0]
    config = image["Config"]
    assert config["User"] == "fleet"
    assert config["StopSignal"] == "SIGUSR1"
    assert config["Healthcheck"]["Test"] == ["CMD", "healthcheck"]
    assert config["Cmd"] == list(topology.lb_command(topology.docker_config(topology.LB_CONFIG)))
    # Multi-stage: the virtualenv came over, the compilers, pip and the sources did not.
    probe = stack.docker(
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        topology.DOCKER_IMAGE,
        "-c",
        "for p in gcc cc c++ make pip pip3; do command -v $p; done; ls -d /src /wheels; "
        "id -u; python -c 'import lb, broker, paho.mqtt, uvloop'",
    )
    lines = probe.stdout.split()
    assert lines == ["10001"], probe.stdout + probe.stderr
    size = image["Size"]
    print(f"image {topology.DOCKER_IMAGE}: {size / 1e6:.0f} MB on {stack.base_image}")
    assert size < 300e6


def check_lb_logs_why_it_refused(stack: Stack) -> None:
    assert stack.run is not None
    refusals = {r["device"]: r for r in stack.run.report["refusals"]}
    lines = stack.logs("lb")
    for device, words in (
        (topology.REVOKED_DEVICE, ("client certificate revoked", "X509_V_ERR_CERT_REVOKED")),
        (topology.ROGUE_DEVICE, ("unknown CA", 'subject="CN=device-0001"')),
    ):
        address = refusals[device]["local_address"]
        (line,) = [line for line in lines if line.startswith(f"{address} ")]
        assert "SSL handshake failure" in line
        for word in words:
            assert word in line, line


def check_services_are_healthy(stack: Stack) -> None:
    for service in ("lb", *(node.name for node in topology.NODES)):
        _wait_healthy(stack, service)


def _certificates(stack: Stack, directory: Path) -> Path:
    pki = stack.container("pki")
    result = stack.docker(
        "cp", f"{pki}:{topology.DOCKER_WORKDIR}/{topology.CERTS_DIR}", str(directory)
    )
    assert result.returncode == 0, result.stderr
    return directory / Path(topology.CERTS_DIR).name


def _roundtrip(port: int, certs: Path, device: str) -> None:
    """A device through the published port: subscribe to its own topic, publish, receive."""
    received, subscribed = threading.Event(), threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv311)
    client.tls_set(
        ca_certs=str(certs / f"{topology.ROOT_CA}.pem"),
        certfile=str(certs / f"{device}.pem"),
        keyfile=str(certs / f"{device}-key.pem"),
    )
    client.on_message = lambda *_: received.set()
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect(topology.LOCAL_HOST, port, keepalive=30)
    client.loop_start()
    try:
        topic = f"fleet/{device}/commands"
        client.subscribe(topic, qos=1)
        assert subscribed.wait(DEVICE_ROUNDTRIP_TIMEOUT), f"{device}: no SUBACK through lb"
        deadline = time.monotonic() + DEVICE_ROUNDTRIP_TIMEOUT
        while not received.is_set() and time.monotonic() < deadline:
            client.publish(topic, b'{"hello": 1}', qos=1).wait_for_publish(5)
            received.wait(1.0)
        assert received.is_set(), f"{device}: nothing came back through lb"
    finally:
        client.disconnect()
        client.loop_stop()


def check_lb_reloads_on_sigusr2_and_sighup(stack: Stack, tmp_path: Path) -> None:
    certs = _certificates(stack, tmp_path)
    _roundtrip(stack.published_port, certs, topology.device_name(5))
    lb = stack.container("lb")
    for signal_name, generation in (("SIGUSR2", 2), ("SIGHUP", 3)):
        mark = len(stack.logs("lb"))
        assert stack.docker("kill", "--signal", signal_name, lb).returncode == 0
        lines = _wait_log(stack, "lb", r"reloaded: \d+ new worker", mark)
        assert any(f"(generation {generation})" in line for line in lines), lines
        _roundtrip(stack.published_port, certs, topology.device_name(6))
    _wait_healthy(stack, "lb")
    assert stack.inspect("lb")["RestartCount"] == 0


def check_stop_is_soft_and_within_the_grace_period(stack: Stack) -> None:
    """Last: it stops the services."""
    result = stack.compose("stop", "lb")
    assert result.returncode == 0, result.stderr
    state = stack.inspect("lb")["State"]
    # 137 would be docker's SIGKILL at the end of the grace period.
    assert (state["Status"], state["ExitCode"], state["OOMKilled"]) == ("exited", 0, False)
    lines = stack.logs("lb")
    assert any("soft stop: workers finish their sessions" in line for line in lines)
    assert "master 1 stopped" in lines[-1]
    for node in topology.NODES:
        result = stack.compose("stop", node.name)
        assert result.returncode == 0, result.stderr
        assert stack.inspect(node.name)["State"]["ExitCode"] == 0
        assert any(f"node {node.name} stopped" in line for line in stack.logs(node.name))


@pytest.mark.slow
@pytest.mark.timeout(STACK_TIMEOUT)
def test_stack_builds_runs_reloads_and_stops(stack: Stack, tmp_path: Path) -> None:
    """One test, one stack: the steps share it, in order (a stop comes last)."""
    check_image_is_small_unprivileged_and_has_no_compiler(stack)
    assert stack.scaled is not None and stack.run is not None
    check_devices_report(stack.scaled, *SCALED)
    check_devices_report(
        stack.run, topology.DEFAULT_NODES, topology.DEFAULT_DEVICES, topology.DEFAULT_MESSAGES
    )
    check_lb_logs_why_it_refused(stack)
    check_services_are_healthy(stack)
    check_lb_reloads_on_sigusr2_and_sighup(stack, tmp_path)
    check_stop_is_soft_and_within_the_grace_period(stack)
