"""lb in a reconnect storm: the order in which waiting handshakes are answered.

lb.datapath.HandshakeQueue answers new ClientHellos first come first served while it
keeps up, and newest first once the oldest waiting one was accepted NEWEST_FIRST_AFTER ago:
a device that has waited long is about to give up, and a handshake begun for it is thrown
away. lb runs in this process on a uvloop in a thread, so that the test can hold its loop in
a callback of its own (a loop busy with a storm) while clients send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import selectors
import socket
import ssl
import threading
import time

import pytest
import uvloop

from bench.ports import free_port
from lb.config import load_config_text
from lb.datapath import NEWEST_FIRST_AFTER
from lb.process import Runtime
from tests.harness import EchoBackend, client_context
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(90)

#: Clients accepted long before their ClientHello is read: more than one turn's budget of
#: handshakes (4 ms), so that lb is still answering them when the newest one comes.
OLD_CLIENTS = 150


def _client_hello(context: ssl.SSLContext) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_when_lb_falls_behind_the_newest_handshake_goes_first(
    pki: TestPKI, caplog: pytest.LogCaptureFixture
) -> None:
    """150 clients are accepted and wait (no ClientHello yet) past NEWEST_FIRST_AFTER; lb's
    loop is then held in a callback while they all send their ClientHello and one more
    client connects and sends its own. Once the loop goes on, lb is behind by more than a
    second: the newest client gets its ServerHello while old ones still wait (first come
    first served, it came last of 151), and lb says so in one line, then one more when the
    queue is empty again. Every client gets its answer in the end."""
    backend = EchoBackend(proxy=False)
    port = free_port()
    text = (
        "global\n    maxconn 1000\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n"
        "    timeout server 60s\n"
        f"frontend mqtts\n    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} "
        f"ca-file {pki.intermediate} ca-verify-file {pki.root} verify required\n"
        "    default_backend echo\n"
        f"backend echo\n    server echo1 127.0.0.1:{backend.port}\n"
    )
    result = load_config_text(text)
    assert result.config is not None, result.diagnostics
    loop = uvloop.new_event_loop()
    started = threading.Event()
    holding = threading.Event()
    release = threading.Event()
    runtimes: list[Runtime] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        runtime = Runtime(result.config, loop)  # type: ignore[arg-type]
        runtimes.append(runtime)
        runtime.start()
        started.set()
        loop.run_forever()
        runtime.stop_accepting()
        runtime.close_all_sessions()
        loop.run_until_complete(asyncio.sleep(0.1))

    poke, hold = socket.socketpair()

    def held() -> None:  # the loop's turn that a storm's work would take
        hold.recv(1)
        holding.set()
        release.wait(30)

    loop.add_reader(hold.fileno(), held)
    device = pki.device(5)
    context = client_context(device.cert, device.key, pki.root)
    hellos = [_client_hello(context) for _ in range(OLD_CLIENTS + 1)]
    old: list[socket.socket] = []
    thread = threading.Thread(target=serve, daemon=True)
    caplog.set_level(logging.INFO, logger="lb.datapath")
    thread.start()
    try:
        assert started.wait(10)
        for _ in range(OLD_CLIENTS):
            old.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        deadline = time.monotonic() + 20
        while runtimes[0].process.current < OLD_CLIENTS and time.monotonic() < deadline:
            time.sleep(0.02)
        assert runtimes[0].process.current == OLD_CLIENTS, "lb did not accept them all"
        time.sleep(NEWEST_FIRST_AFTER + 0.3)  # they are old now
        poke.send(b"!")
        assert holding.wait(10), "the loop did not take the hold"
        for conn, hello in zip(old, hellos, strict=False):
            conn.sendall(hello)
        newest = socket.create_connection(("127.0.0.1", port), timeout=10)
        newest.sendall(hellos[-1])
        release.set()

        # The order in which the clients' answers come.
        answered: list[socket.socket] = []
        waiting = {*old, newest}
        with selectors.DefaultSelector() as selector:
            for conn in waiting:
                selector.register(conn, selectors.EVENT_READ)
            deadline = time.monotonic() + 60
            while waiting and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=1):
                    ready = key.fileobj
                    assert isinstance(ready, socket.socket)
                    assert ready.recv(1, socket.MSG_PEEK), "lb closed a client it should answer"
                    selector.unregister(ready)
                    waiting.discard(ready)
                    answered.append(ready)
        assert not waiting, f"{len(waiting)} clients got no ServerHello"
        position = answered.index(newest)
        assert position < OLD_CLIENTS - 1, (
            f"the newest client was answered after {position} of {OLD_CLIENTS} older ones"
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
            "empty again" in r.getMessage() for r in caplog.records
        ):
            time.sleep(0.05)
        lines = [r.getMessage() for r in caplog.records if "handshake queue" in r.getMessage()]
        assert len(lines) == 2, lines
        assert "newest first until the queue is empty" in lines[0]
        assert f"{OLD_CLIENTS + 1} ClientHellos answered" in lines[1], lines[1]
        newest.close()
    finally:
        release.set()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        for conn in old:
            conn.close()
        backend.close()
        poke.close()
        hold.close()
