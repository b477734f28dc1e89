"""lb and the broker as systemd services: packaging/lb.service, packaging/broker@.service, and
the notify protocol (lb.sd_notify) both programs speak.

systemd is not PID 1 here, so the units are checked with ``systemd-analyze verify`` and
``systemd-analyze security --offline`` in a scratch root (this machine's unit tree, stub
executables where the units expect the installed programs), and the protocol against a real
``$NOTIFY_SOCKET``: a unix datagram socket this test opens, which reads each message with the
sender's credentials, as systemd does for ``NotifyAccess=main``. The processes run the
units' own ExecStart and ExecReload command lines (the paths mapped to this checkout) through
start, reload, a refused reload, soft stop and stop.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.ports import free_port
from lb import sd_notify
from tests.harness import VENV_BIN, EchoBackend, apt_install, wait_port

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
LB_UNIT = ROOT / "packaging" / "lb.service"
BROKER_UNIT = ROOT / "packaging" / "broker@.service"
INSTALLED_BIN = "/opt/iot-edge-lb/bin/"  # where the units expect the programs (README)
UNIT_TREES = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
MESSAGE_TIMEOUT = 30.0
# The most a unit's `systemd-analyze security` exposure may be (0 best, 10 worst; "OK" < 4).
MAX_EXPOSURE = 2.0
SESSIONS_PER_FD = 2  # a session holds the device's and the broker's descriptor
SEED_MAXCONN = 500000  # seed 004: maxconn 500000 on the servers, max_connections on brokers


def unit_values(path: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file (all sections), in order, repeated keys kept."""
    values: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith(("#", ";", "[")):
            continue
        key, _, value = text.partition("=")
        values.setdefault(key.strip(), []).append(value.strip())
    return values


def command_line(
    line: str, environment: dict[str, str], instance: str = "", mainpid: int = 0
) -> list[str]:
    """An Exec*= line as systemd runs it: ``${VAR}`` in a word, a bare ``$VAR`` word split
    into words, %i, $MAINPID; the installed programs mapped to this checkout's venv."""
    words: list[str] = []
    variables = {**environment, "MAINPID": str(mainpid)}
    for written in shlex.split(line.replace("%i", instance)):
        if re.fullmatch(r"\$[A-Z_]+", written):
            words += variables.get(written[1:], "").split()
            continue
        word = re.sub(r"\$\{([A-Z_]+)\}", lambda m: variables.get(m[1], ""), written)
        if word.startswith(INSTALLED_BIN):
            word = str(VENV_BIN / word.removeprefix(INSTALLED_BIN))
        words.append(word)
    return words


def run(command: list[str]) -> int:
    """Run an Exec*= command line to its end; its exit code."""
    return subprocess.run(command, capture_output=True, check=False, timeout=60).returncode


def unit_environment(values: dict[str, list[str]]) -> dict[str, str]:
    environment: dict[str, str] = {}
    for line in values.get("Environment", []):
        for assignment in shlex.split(line):
            key, _, value = assignment.partition("=")
            environment[key] = value
    return environment


# -- the units -----------------------------------------------------------------------------------


def systemd_analyze() -> str:
    program = shutil.which("systemd-analyze")
    if program is None:
        problem = apt_install("systemd")
        program = shutil.which("systemd-analyze")
        if program is None:
            pytest.skip(f"no systemd-analyze: {problem}")
    return program


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with this machine's unit tree, the two units and stub programs at their paths:
    verify checks that every Exec*= program exists there."""
    root = tmp_path_factory.mktemp("systemd-root")
    tree = next((tree for tree in UNIT_TREES if (tree / "sysinit.target").exists()), None)
    if tree is None:
        pytest.skip("no systemd unit tree on this machine")
    shutil.copytree(tree, root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in (LB_UNIT, BROKER_UNIT):
        shutil.copy(unit, units / unit.name)
        for key, lines in unit_values(unit).items():
            if not key.startswith("Exec"):
                continue
            for line in lines:
                program = shlex.split(line)[0].lstrip("-@:+!")
                stub = root / program.lstrip("/")
                stub.parent.mkdir(parents=True, exist_ok=True)
                stub.write_text("#!/bin/sh\n")
                stub.chmod(0o755)
    return root


@pytest.mark.parametrize("unit", ["lb.service", "broker@broker-1.service"])
def test_units_verify(scratch_root: Path, unit: str) -> None:
    result = subprocess.run(
        [systemd_analyze(), "verify", f"--root={scratch_root}", unit],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    # verify exits 0 for an unknown key or a bad value too, and says so: nothing to say, then.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize("unit", ["lb.service", "broker@broker-1.service"])
def test_units_are_hardened(scratch_root: Path, unit: str) -> None:
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", f"--root={scratch_root}", unit],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match[1]) <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize("unit", [LB_UNIT, BROKER_UNIT], ids=lambda path: path.name)
def test_units_have_the_shape_of_debians_haproxy_service(unit: Path) -> None:
    values = unit_values(unit)

    def one(key: str) -> str:
        (value,) = values[key]
        return value

    assert one("Type") == "notify" and one("NotifyAccess") == "main"
    assert one("KillMode") == "mixed"
    assert int(one("LimitNOFILE")) >= SESSIONS_PER_FD * SEED_MAXCONN
    assert one("CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert one("AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one("NoNewPrivileges") == "yes" and one("ProtectSystem") == "strict"
    assert values["RuntimeDirectory"] and one("User") != "root"
    assert "WantedBy" in values
    if unit == LB_UNIT:
        assert "-Ws" in one("ExecStart").split()
        check, kill = values["ExecReload"]
        assert " -c " in check and kill == "/bin/kill -USR2 $MAINPID"
        assert values["ExecStartPre"] == [check]


# -- the protocol --------------------------------------------------------------------------------


def test_encode_is_one_assignment_per_line() -> None:
    assert sd_notify.encode({"READY": 1, "STATUS": "two\nlines"}) == b"READY=1\nSTATUS=two lines\n"
    for bad in ("ready", "", "A=B", "A B"):
        with pytest.raises(ValueError, match="not a notification field"):
            sd_notify.encode({bad: 1})


def test_socket_addresses() -> None:
    assert sd_notify.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert sd_notify.socket_address("@abstract/name") == b"\0abstract/name"
    for unusable in ("", "@", "relative", "vsock:2:1234"):
        assert sd_notify.socket_address(unusable) is None


@dataclass
class Notification:
    fields: dict[str, str]
    pid: int
    received_usec: int


class NotifySocket:
    """What systemd listens on: a unix datagram socket; each message with its sender's pid."""

    def __init__(self, address: str) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        bind_to = b"\0" + address[1:].encode() if address.startswith("@") else address
        self.socket.bind(bind_to)
        self.address = address
        self.seen: list[Notification] = []

    def receive(self, timeout: float = MESSAGE_TIMEOUT) -> Notification:
        self.socket.settimeout(timeout)
        credentials_size = struct.calcsize("3i")
        data, ancillary, _, _ = self.socket.recvmsg(4096, socket.CMSG_SPACE(credentials_size))
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:credentials_size])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        notification = Notification(fields, pid, sd_notify.monotonic_usec())
        self.seen.append(notification)
        return notification

    def wait_for(self, key: str, timeout: float = MESSAGE_TIMEOUT) -> Notification:
        deadline = time.monotonic() + timeout
        while True:
            notification = self.receive(max(0.1, deadline - time.monotonic()))
            if key in notification.fields:
                return notification

    def close(self) -> None:
        self.socket.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notifier_sends_to_a_real_socket(tmp_path: Path, kind: str) -> None:
    address = str(tmp_path / "notify") if kind == "path" else f"@lbtest-notify-{os.getpid()}"
    listener = NotifySocket(address)
    environment = {sd_notify.ENVIRONMENT_VARIABLE: address, "OTHER": "kept"}
    notifier = sd_notify.Notifier.from_environment(environment)
    try:
        # Taken out of the environment, so that no child speaks in the service's name.
        assert environment == {"OTHER": "kept"}
        before = sd_notify.monotonic_usec()
        assert notifier.reloading("reloading x.cfg")
        message = listener.receive()
        assert message.pid == os.getpid()
        assert message.fields["RELOADING"] == "1" and message.fields["STATUS"] == "reloading x.cfg"
        assert before <= int(message.fields["MONOTONIC_USEC"]) <= message.received_usec
        assert notifier.ready("serving")
        assert listener.receive().fields == {"READY": "1", "STATUS": "serving"}
    finally:
        notifier.close()
        listener.close()


def test_notifier_without_systemd_does_nothing(tmp_path: Path) -> None:
    notifier = sd_notify.Notifier.from_environment({})
    assert not notifier.enabled and not notifier.ready("serving")
    # A socket that went away is logged once, never raised.
    gone = sd_notify.Notifier.from_environment(
        {sd_notify.ENVIRONMENT_VARIABLE: str(tmp_path / "gone")}
    )
    assert gone.enabled and not gone.ready("serving") and not gone.stopping("stopping")


# -- lb's master and the broker under a NOTIFY_SOCKET ---------------------------------------------


@contextmanager
def service(
    command: list[str], directory: Path, notify: NotifySocket
) -> Iterator[subprocess.Popen[bytes]]:
    environment = {**os.environ, sd_notify.ENVIRONMENT_VARIABLE: notify.address}
    process = subprocess.Popen(
        command,
        cwd=directory,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=(directory / "service.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        notify.close()


def lb_config(port: int, backend_port: int, extra: str = "") -> str:
    return (
        "global\n    log stdout format raw local0\n    nbthread 2\n    hard-stop-after 10s\n"
        "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 10s\n"
        "    timeout server 10s\n"
        f"frontend front\n    bind 127.0.0.1:{port}\n    default_backend back\n"
        f"backend back\n    server echo 127.0.0.1:{backend_port}\n" + extra
    )


def echo(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"ping")
        return client.recv(4)


def test_lb_master_notifies_start_reload_and_stop(tmp_path: Path) -> None:
    values = unit_values(LB_UNIT)
    config = tmp_path / "haproxy.cfg"
    environment = {
        **unit_environment(values),
        "CONFIG": str(config),
        "PIDFILE": str(tmp_path / "lb.pid"),
    }
    port, backend = free_port(), EchoBackend(proxy=False)
    config.write_text(lb_config(port, backend.port))
    notify = NotifySocket(str(tmp_path / "notify"))
    (start,) = values["ExecStart"]
    (start_pre,) = values["ExecStartPre"]
    assert run(command_line(start_pre, environment)) == 0
    try:
        with service(command_line(start, environment), tmp_path, notify) as master:
            ready = notify.wait_for("READY")
            # From the main process (NotifyAccess=main), once both workers accept.
            assert ready.pid == master.pid
            assert ready.fields["STATUS"] == "serving: 2 worker(s), generation 1"
            assert echo(port) == b"ping"
            assert (tmp_path / "lb.pid").read_text().strip() == str(master.pid)

            # systemctl reload: the unit's ExecReload lines, in order.
            check, kill = (
                command_line(line, environment, mainpid=master.pid) for line in values["ExecReload"]
            )
            assert run(check) == 0
            before = sd_notify.monotonic_usec()
            assert run(kill) == 0
            reloading = notify.wait_for("RELOADING")
            assert reloading.pid == master.pid
            assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= reloading.received_usec
            assert reloading.fields["STATUS"] == f"reloading {config}"
            reloaded = notify.wait_for("READY")
            assert reloaded.fields["STATUS"].startswith("serving: 2 worker(s), generation 2")
            assert echo(port) == b"ping"

            # A configuration with an error: ExecReload's check stops systemctl reload...
            config.write_text(lb_config(port, backend.port, "    nosuchkeyword\n"))
            assert run(check) == 1
            # ... and a SIGHUP sent anyway is refused, the old workers serve, systemd hears so.
            master.send_signal(signal.SIGHUP)
            assert "RELOADING" in notify.wait_for("RELOADING").fields
            refused = notify.wait_for("READY")
            assert refused.fields["STATUS"].startswith("reload failed, see the log; the previous")
            assert echo(port) == b"ping"

            # systemctl stop: SIGTERM to the main process (KillMode=mixed).
            master.send_signal(signal.SIGTERM)
            stopping = notify.wait_for("STOPPING")
            assert (stopping.pid, stopping.fields["STATUS"]) == (master.pid, "stopping")
            assert master.wait(30) == 0
            assert all(message.pid == master.pid for message in notify.seen)
    finally:
        backend.close()


def test_lb_master_notifies_a_soft_stop(tmp_path: Path) -> None:
    port, backend = free_port(), EchoBackend(proxy=False)
    config = tmp_path / "haproxy.cfg"
    config.write_text(lb_config(port, backend.port))
    notify = NotifySocket(str(tmp_path / "notify"))
    try:
        with service([str(VENV_BIN / "lb"), "-Ws", "-f", str(config)], tmp_path, notify) as master:
            notify.wait_for("READY")
            master.send_signal(signal.SIGUSR1)
            stopping = notify.wait_for("STOPPING")
            assert stopping.fields["STATUS"] == "soft stop: workers finish their sessions"
            assert master.wait(30) == 0
    finally:
        backend.close()


def test_lb_without_ws_does_not_notify(tmp_path: Path) -> None:
    """As HAProxy: -W (or no flag) is a master without systemd's protocol."""
    port, backend = free_port(), EchoBackend(proxy=False)
    config = tmp_path / "haproxy.cfg"
    config.write_text(lb_config(port, backend.port))
    notify = NotifySocket(str(tmp_path / "notify"))
    try:
        with service([str(VENV_BIN / "lb"), "-W", "-f", str(config)], tmp_path, notify) as master:
            wait_port(port, 15)
            master.send_signal(signal.SIGTERM)
            assert master.wait(30) == 0
            with pytest.raises(TimeoutError):
                notify.receive(timeout=0.5)
    finally:
        backend.close()


def test_broker_notifies_start_and_stop(tmp_path: Path) -> None:
    values = unit_values(BROKER_UNIT)
    port = free_port()
    (tmp_path / "broker-1.toml").write_text(
        f'[node]\nname = "broker-1"\n[listeners.tcp.default]\nbind = "127.0.0.1:{port}"\n'
    )
    (start,) = values["ExecStart"]
    command = command_line(start, {}, instance="broker-1")
    command = [word.replace("/etc/broker/", f"{tmp_path}/") for word in command]
    notify = NotifySocket(str(tmp_path / "notify"))
    with service(command, tmp_path, notify) as broker:
        ready = notify.wait_for("READY")
        assert ready.pid == broker.pid
        assert ready.fields["STATUS"] == f"node broker-1: MQTT on 127.0.0.1:{port}"
        # Ready means serving: an MQTT CONNECT is answered at once.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(bytes.fromhex("100c00044d5154540402003c0000"))
            assert client.recv(4) == bytes.fromhex("20020000")
        broker.send_signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING")
        assert stopping.fields["STATUS"] == "node broker-1: stopping"
        assert broker.wait(30) == 0
