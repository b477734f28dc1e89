"""Real RabbitMQ nodes (Debian's rabbitmq-server) with the MQTT plugin, for tests of lb in front
of a broker nobody here wrote.

Each node runs from its own directory (config, plugins, Mnesia, logs, cookie) on free ports,
with its own epmd on a free port that this module starts and stops, so nothing here touches
a RabbitMQ, an epmd or a port that Debian's package or a user started. Every wait is bounded;
nodes are stopped by their process group, epmd by its pid.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.ports import free_port

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
START_TIMEOUT = 90.0
CTL_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
POLL_INTERVAL = 0.2
STARTED = "Server startup complete"
COOKIE = "IOTEDGELBTESTCOOKIE"


def available() -> str | None:
    """None when RabbitMQ and epmd can run here, else why not."""
    if not (RABBITMQ_BIN / "rabbitmq-server").exists():
        return "rabbitmq-server is not installed (./dev setup installs it as root)"
    if shutil.which("epmd") is None:
        return "epmd (erlang-base) is not installed"
    return None


def version() -> str:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"],
        capture_output=True,
        check=False,
        text=True,
        timeout=10,
    )
    return result.stdout.strip() or "?"


@dataclass
class Node:
    """One RabbitMQ node: its name, ports, files and process group."""

    name: str  # short name, e.g. lbtest1-4242 (the Erlang node is name@localhost)
    directory: Path
    amqp_port: int
    mqtt_port: int
    dist_port: int
    environment: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def node(self) -> str:
        return f"{self.name}@localhost"

    @property
    def log(self) -> Path:
        return self.directory / "log" / f"{self.node}.log"

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def ctl(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """rabbitmqctl -n NODE ... (with the plugins file, so plugin commands are found)."""
        result = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-q", "-n", self.node, *arguments],
            capture_output=True,
            check=False,
            text=True,
            timeout=CTL_TIMEOUT,
            env=self.environment,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(arguments)}: {result.stderr}")
        return result

    def wait_started(self, occurrence: int = 1, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.log_text().count(STARTED) < occurrence:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.node} exited:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.node}: not started after {timeout:.0f}s")
            time.sleep(POLL_INTERVAL)

    def mqtt_connections(self) -> list[dict[str, str]]:
        """``list_mqtt_connections``: client id, the address RabbitMQ believes, and more."""
        columns = ("client_id", "peer_host", "peer_port", "conn_name", "user")
        result = self.ctl("list_mqtt_connections", *columns)
        rows = []
        for line in result.stdout.splitlines():
            values = line.split("\t")
            if len(values) == len(columns) and values[0] != columns[0]:
                rows.append(dict(zip(columns, values, strict=True)))
        return rows

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # The launcher script, beam.smp and its port programs share the group.
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT)


def _config(node: Node) -> str:
    return (
        f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}\n"
        f"mqtt.listeners.tcp.default = 127.0.0.1:{node.mqtt_port}\n"
        # The peer address comes from lb's PROXY header (v1 or v2), required on the listener.
        "mqtt.proxy_protocol = true\n"
        "mqtt.allow_anonymous = true\n"
        # guest may connect from anywhere: with the header, "anywhere" is the device.
        "loopback_users = none\n"
        "log.console = false\n"
        "log.file.level = info\n"
    )


def _environment(node: Node, epmd_port: int, home: Path) -> dict[str, str]:
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RABBITMQ_", "ERL_")) and key != "NOTIFY_SOCKET"
    }
    directory = node.directory
    environment.update(
        {
            "HOME": str(home),
            "ERL_EPMD_PORT": str(epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODENAME": node.node,
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
            "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"),
            "RABBITMQ_PID_FILE": str(directory / "pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
    )
    return environment


@contextmanager
def cluster(directory: Path, count: int) -> Iterator[Sequence[Node]]:
    """``count`` nodes started in parallel; nodes 2.. joined to node 1 (one cluster)."""
    home = directory / "home"
    home.mkdir(mode=0o700, parents=True)
    cookie = home / ".erlang.cookie"
    cookie.write_text(COOKIE)
    cookie.chmod(0o400)
    epmd_port = free_port()
    epmd = subprocess.Popen(
        ["epmd", "-port", str(epmd_port), "-address", "127.0.0.1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    nodes: list[Node] = []
    try:
        for number in range(1, count + 1):
            node_dir = directory / f"node{number}"
            node_dir.mkdir()
            node = Node(
                name=f"lbtest{number}-{os.getpid()}",
                directory=node_dir,
                amqp_port=free_port(),
                mqtt_port=free_port(),
                dist_port=free_port(),
                environment={},
            )
            node.environment = _environment(node, epmd_port, home)
            (node_dir / "rabbitmq.conf").write_text(_config(node))
            (node_dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
            (node_dir / "rabbitmq-env.conf").write_text("")
            node.process = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                cwd=node_dir,
                env=node.environment,
                stdin=subprocess.DEVNULL,
                stdout=(node_dir / "stdout.log").open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            nodes.append(node)
        for node in nodes:
            node.wait_started()
        first, *others = nodes
        for node in others:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.node)
            node.ctl("start_app")
            node.wait_started(occurrence=2)
        if others:
            status = first.ctl("cluster_status", "--formatter", "json").stdout
            for node in nodes:
                assert node.node in status, status
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        epmd.terminate()
        try:
            epmd.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            epmd.kill()
            epmd.wait(STOP_TIMEOUT)


def log_errors(node: Node, since: int = 0) -> list[str]:
    """The first line of each error report in the node's log after character ``since``."""
    lines = node.log_text()[since:].splitlines()
    return [line for line in lines if re.search(r"\[error\] <[^>]+> \S", line)]
