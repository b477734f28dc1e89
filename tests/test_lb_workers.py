"""The master and its workers: 20 reloads under steady TLS load drop nothing; a bad
configuration is refused and the old workers keep serving; SIGUSR1 lets a live session
finish; the pidfile holds the master's pid."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from bench.ports import free_port
from lb.config import load_config_text
from lb.config.model import Config
from lb.workers import SocketPool
from tests.harness import VENV_BIN, EchoBackend, client_context, start_process
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(240)


def _config(pki: TestPKI, port: int, backend_port: int, workers: int) -> str:
    return (
        f"global\n    nbthread {workers}\n    hard-stop-after 30s\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n"
        f"frontend mqtts\n    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} "
        f"ca-file {pki.intermediate} ca-verify-file {pki.root} verify required\n"
        "    default_backend brokers\n"
        f"backend brokers\n    server broker1 127.0.0.1:{backend_port}\n"
    )


def _wait(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


def test_reloads_under_load_drop_nothing(pki: TestPKI, tmp_path: Path) -> None:
    port = free_port()
    backend = EchoBackend(proxy=False)
    path = tmp_path / "lb.cfg"
    path.write_text(_config(pki, port, backend.port, 2))
    pidfile = tmp_path / "lb.pid"
    master = start_process(
        [str(VENV_BIN / "lb"), "-f", str(path), "-p", str(pidfile)], tmp_path, "master"
    )
    context = client_context(pki.device(9).cert, pki.device(9).key, pki.root)
    results = {"ok": 0, "failed": 0}
    errors: list[str] = []
    stop = threading.Event()

    def client_loop() -> None:
        while not stop.is_set():
            try:
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                    context.wrap_socket(raw, server_hostname="localhost") as tls,
                ):
                    tls.sendall(b"ping")
                    if tls.recv(16) != b"ping":
                        raise OSError("no echo")
                results["ok"] += 1
            except (OSError, ssl.SSLError) as error:
                results["failed"] += 1
                errors.append(repr(error))

    try:
        master.wait_output("master", timeout=20)
        master.wait_output("ready", timeout=20)
        assert pidfile.read_text().strip() == str(master.popen.pid)
        threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        _wait(lambda: results["ok"] >= 20)
        for number in range(20):
            before = results["ok"]
            os.kill(master.popen.pid, signal.SIGUSR2 if number % 2 else signal.SIGHUP)
            _wait(lambda count=number + 1: master.output().count("reloaded: ") == count, 30)
            _wait(lambda before=before: results["ok"] > before + 5)
        stop.set()
        for thread in threads:
            thread.join(30)
        assert master.output().count("reloaded: ") == 20
        assert results["failed"] == 0, errors[:5]
        assert results["ok"] > 100

        # A bad configuration is refused with the -c messages; the old workers keep serving.
        path.write_text(_config(pki, port, backend.port, 1) + "    bogus-keyword 1\n")
        os.kill(master.popen.pid, signal.SIGUSR2)
        master.wait_output("reload refused", timeout=30)
        assert "parsing [" in master.stderr
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"still")
            assert tls.recv(16) == b"still"
    finally:
        stop.set()
        code = master.stop(signal.SIGTERM, timeout=20)
        backend.close()
    assert code == 0
    assert not pidfile.exists()


def test_soft_stop_lets_a_session_finish(pki: TestPKI, tmp_path: Path) -> None:
    port = free_port()
    backend = EchoBackend(proxy=False)
    path = tmp_path / "lb.cfg"
    path.write_text(_config(pki, port, backend.port, 1))
    master = start_process([str(VENV_BIN / "lb"), "-W", "-db", "-f", str(path)], tmp_path, "m")
    context = client_context(pki.device(10).cert, pki.device(10).key, pki.root)
    try:
        master.wait_output("ready", timeout=20)
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        tls = context.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(b"one")
        assert tls.recv(16) == b"one"
        os.kill(master.popen.pid, signal.SIGUSR1)
        master.wait_output("soft stop", timeout=20)
        # Not accepting any more, but the live session still works.
        _wait(lambda: _refused(port))
        tls.sendall(b"two")
        assert tls.recv(16) == b"two"
        assert master.popen.poll() is None
        tls.close()
        master.popen.wait(30)
        assert master.popen.returncode == 0
    finally:
        master.stop()
        backend.close()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def _pool_config(frontends: dict[str, int], workers: int = 1) -> Config:
    text = f"global\n    nbthread {workers}\n"
    text += "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
    text += "    timeout server 30s\n"
    for name, port in frontends.items():
        text += f"frontend {name}\n    bind 127.0.0.1:{port}\n    default_backend brokers\n"
    text += "backend brokers\n    server broker1 127.0.0.1:1\n"
    result = load_config_text(text)
    assert result.config is not None, result.diagnostics
    return result.config


def _accepts(port: int) -> bool:
    return not _refused(port)


@pytest.mark.timeout(30)
def test_socket_pool_reload_is_two_phase() -> None:
    """A refused reload leaves every old socket open and closes only what it opened; a
    committed one closes only the sockets of the binds it dropped. (No configuration that
    passes the master's check makes a new worker fail deterministically, so the master's
    rollback is covered here, where the sockets are.)"""
    port_a, port_b, port_c = free_port(), free_port(), free_port()
    old = _pool_config({"a": port_a, "b": port_b})
    new = _pool_config({"a": port_a, "c": port_c})
    pool = SocketPool()
    try:
        serving = pool.for_config(old)[0]
        old_addresses = dict(pool.by_address)

        # Prepare: the shared bind keeps its socket, the dropped one stays open.
        pending = pool.prepare(new)
        assert pending.sockets[0][("a", 0)] is serving[("a", 0)]
        assert pending.opened == [pending.sockets[0][("c", 0)]]
        assert pool.by_address == old_addresses
        assert _accepts(port_a) and _accepts(port_b) and _accepts(port_c)

        # Abort: only the socket the new configuration opened is closed.
        pool.abort(pending)
        assert pending.sockets[0][("c", 0)].fileno() == -1
        assert pool.by_address == old_addresses
        assert all(sock.fileno() != -1 for sock in serving.values())
        assert _accepts(port_a) and _accepts(port_b) and _refused(port_c)

        # Commit: only the socket the old configuration alone used is closed.
        pending = pool.prepare(new)
        pool.commit(pending)
        assert serving[("b", 0)].fileno() == -1
        assert pending.sockets[0][("a", 0)] is serving[("a", 0)]
        assert set(pool.by_address.values()) == set(pending.sockets[0].values())
        assert _accepts(port_a) and _refused(port_b) and _accepts(port_c)
    finally:
        pool.close()
    assert _refused(port_a) and _refused(port_c)


@pytest.mark.timeout(30)
def test_socket_pool_one_socket_per_worker() -> None:
    """Each worker has its own SO_REUSEPORT socket for a traffic bind, on one port; a reload
    keeps worker #k's socket for the new worker #k (its accept queue is not lost), and one
    that drops a worker closes only that worker's socket."""
    port = free_port()
    pool = SocketPool()
    try:
        serving = pool.for_config(_pool_config({"a": port}, workers=2))
        first, second = serving[0][("a", 0)], serving[1][("a", 0)]
        assert first is not second
        for sock in (first, second):
            assert sock.getsockname() == ("127.0.0.1", port)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1

        same = pool.prepare(_pool_config({"a": port}, workers=2))
        assert same.opened == []
        assert [s[("a", 0)] for s in same.sockets] == [first, second]
        pool.commit(same)

        fewer = pool.prepare(_pool_config({"a": port}, workers=1))
        pool.commit(fewer)
        assert fewer.sockets[0][("a", 0)] is first
        assert second.fileno() == -1 and first.fileno() != -1
        assert _accepts(port)
    finally:
        pool.close()
    assert _refused(port)
