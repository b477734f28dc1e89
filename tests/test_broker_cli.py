"""The `broker` command as a process, driven by Debian's mosquitto_pub / mosquitto_sub."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.ports import free_port

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.mosquitto,
    pytest.mark.skipif(
        shutil.which("mosquitto_pub") is None, reason="needs Debian's mosquitto-clients"
    ),
]


def wait_listening(port: int, process: subprocess.Popen[str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"broker exited: {process.communicate()[1]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("broker did not start listening")


def start(*arguments: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "broker", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    return stderr


@pytest.fixture
def port_broker() -> Iterator[tuple[int, subprocess.Popen[str]]]:
    port = free_port()
    process = start("-p", str(port))
    try:
        wait_listening(port, process)
        yield port, process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def mosquitto_sub(port: int, *arguments: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def mosquitto_pub(port: int, *arguments: str) -> None:
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), *arguments],
        check=True,
        timeout=10,
    )


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
@pytest.mark.parametrize("qos", ["0", "1", "2"])
def test_mosquitto_clients_publish_subscribe(
    port_broker: tuple[int, subprocess.Popen[str]], version: str, qos: str
) -> None:
    port, _ = port_broker
    subscriber = mosquitto_sub(port, "-V", version, "-q", qos, "-t", "sensors/#", "-C", "3", "-v")
    time.sleep(0.5)
    for index in range(3):
        mosquitto_pub(port, "-V", version, "-q", qos, "-t", f"sensors/{index}", "-m", f"v{index}")
    output, _ = subscriber.communicate(timeout=10)
    assert output.splitlines() == ["sensors/0 v0", "sensors/1 v1", "sensors/2 v2"]


def test_mosquitto_retained_and_will(port_broker: tuple[int, subprocess.Popen[str]]) -> None:
    port, _ = port_broker
    mosquitto_pub(port, "-t", "config/mode", "-m", "eco", "-r", "-q", "1")
    retained = mosquitto_sub(port, "-t", "config/#", "-C", "1", "-v")
    assert retained.communicate(timeout=10)[0].strip() == "config/mode eco"

    watcher = mosquitto_sub(port, "-t", "wills/#", "-C", "1", "-v")
    time.sleep(0.3)
    dying = mosquitto_sub(
        port, "-t", "nothing", "--will-topic", "wills/dev1", "--will-payload", "offline"
    )
    time.sleep(0.5)
    dying.kill()  # no DISCONNECT: the will is due
    dying.communicate()
    assert watcher.communicate(timeout=10)[0].strip() == "wills/dev1 offline"


def test_sigterm_stops_cleanly_and_logs_connects(
    port_broker: tuple[int, subprocess.Popen[str]],
) -> None:
    port, process = port_broker
    mosquitto_pub(port, "-i", "logged-client", "-t", "t", "-m", "x")
    stderr = stop(process)
    assert "client connected: client_id=logged-client" in stderr
    assert "client disconnected: client_id=logged-client" in stderr
    assert "reason=client sent DISCONNECT" in stderr


def test_missing_proxy_header_is_explained_in_the_log(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(
        f'[listeners.tcp.default]\nbind = "127.0.0.1:{port}"\nproxy_protocol = true\n'
    )
    process = start("-c", str(config))
    try:
        wait_listening(port, process)
        result = subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", "t", "-m", "x"],
            capture_output=True,
            check=False,
            timeout=10,
        )
        assert result.returncode != 0
    finally:
        stderr = stop(process)
    assert "MQTT CONNECT received without PROXY header from 127.0.0.1:" in stderr
    assert "is send-proxy-v2 set on the balancer?" in stderr


def test_bad_config_exits_1_with_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[listeners.tcp.default]\nbind = "127.0.0.1:1"\nmax_connections = -1\n')
    result = subprocess.run(
        [sys.executable, "-m", "broker", "-c", str(config)],
        capture_output=True,
        check=False,
        text=True,
        timeout=20,
    )
    assert result.returncode == 1
    assert f"{config}: 'listeners.tcp.default.max_connections'" in result.stderr
