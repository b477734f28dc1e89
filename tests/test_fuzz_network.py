"""The network mutator's short pass (tests/fuzz/network.py) and what it found in lb.

Real ``broker`` and ``lb`` processes on 127.0.0.1 take a few rounds of mutated MQTT
streams, malformed PROXY headers, TLS garbage, slowloris and half-closed sockets; both must
stay up and keep serving real clients, close what they refuse with a log line naming the
client, close what stalls, and keep their memory.
"""

from __future__ import annotations

import random
import select
import socket
import time
from pathlib import Path

import pytest

from bench.ports import free_port
from tests.fuzz.network import ROUND_CONNECTIONS, client_hello, run_campaign
from tests.harness import run_lb
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(180)

#: The trickle test's bound: eight times lb's `timeout client` of 1 s.
GIVE_UP_AFTER = 8.0


def test_processes_survive_hostile_bytes_and_log_every_refusal(tmp_path: Path) -> None:
    outcome = run_campaign(tmp_path, seconds=0, min_rounds=2, seed=1)
    report = outcome.as_dict()
    assert outcome.rounds >= 2 and sum(outcome.attempts.values()) >= 2 * ROUND_CONNECTIONS, report
    assert sum(outcome.refused.values()) > 0, report  # the attacks did reach the parsers
    assert not outcome.down, report
    assert not outcome.probe_failures, report
    assert not outcome.unlogged, report
    assert not outcome.unbounded, report
    assert not outcome.hung, report


@pytest.mark.parametrize("listener", ["tls", "accept-proxy"])
def test_lb_closes_a_trickled_handshake_after_timeout_client(
    listener: str, pki: TestPKI, tmp_path: Path
) -> None:
    tls_port, relay_port = free_port(), free_port()
    config = f"""
global
    maxconn 100

defaults
    mode tcp
    timeout connect 1s
    timeout client 1s
    timeout server 10s

frontend devices
    bind 127.0.0.1:{tls_port} ssl crt {pki.server_allinone} ca-file {pki.ca_bundle} verify required
    default_backend nowhere

frontend relay
    bind 127.0.0.1:{relay_port} accept-proxy
    default_backend nowhere

backend nowhere
    server none 127.0.0.1:{free_port()}
"""
    if listener == "tls":
        port, data = tls_port, client_hello(random.Random(1))
    else:
        port, data = relay_port, b"PROXY TCP4 " + b"1" * 96
    with (
        run_lb(config, tmp_path, relay_port),
        socket.create_connection(("127.0.0.1", port)) as sock,
    ):
        started = time.monotonic()
        closed = False
        for index in range(len(data)):
            try:
                sock.sendall(data[index : index + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            readable, _, _ = select.select([sock], [], [], 0.25)
            if readable:
                try:
                    closed = not sock.recv(4096)
                except ConnectionResetError:
                    closed = True
                if closed:
                    break
            if time.monotonic() - started > GIVE_UP_AFTER:
                break
        # timeout client is 1 s: closed long before, whatever the load.
        assert closed, f"lb still holds a handshake trickled for {GIVE_UP_AFTER:.0f} s"
