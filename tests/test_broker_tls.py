"""The broker's own TLS listener (seed 000's first mode) with real TLS and real clients.

A good device connects (its CN becomes the username with peer_cert_as_username = "cn", and
its chain subjects are there for authorization); expired, rogue-CA and certificate-less
clients are refused with one log line naming the address and the reason; a replaced CRL
is picked up within ssl_options.reload_interval, and a broken file keeps the old context.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import shutil
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from broker.config import BrokerConfig, parse_config
from broker.tls_listener import TLSServer
from lb.pki.certs import make_crl, write_crls
from tests.broker_harness import BrokerThread, running_broker, wait_for
from tests.pki import DeviceFiles, TestPKI, load_cert

pytestmark = pytest.mark.timeout(60)


def tls_node(pki: TestPKI, crl: Path | None = None, **ssl_options: Any) -> BrokerConfig:
    options: dict[str, Any] = {
        "cacertfile": str(pki.ca_bundle),
        "certfile": str(pki.server_chain),
        "keyfile": str(pki.server_key),
        "verify": "verify_peer",
        "fail_if_no_peer_cert": True,
    }
    if crl is not None:
        options["crl_file"] = str(crl)
    options.update(ssl_options)
    document = {
        "node": {"name": "tls-node"},
        "listeners": {
            "ssl": {
                "default": {
                    "bind": "127.0.0.1:0",
                    "peer_cert_as_username": "cn",
                    "ssl_options": options,
                }
            }
        },
        "admin": {"bind": "127.0.0.1:0"},
    }
    return parse_config(document, "<test>")


@pytest.fixture
def node(pki: TestPKI) -> Iterator[BrokerThread]:
    with running_broker(tls_node(pki)) as node:
        yield node


def client_context(pki: TestPKI, device: DeviceFiles | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.root))
    if device is not None:
        context.load_cert_chain(str(device.chain), str(device.key))
    return context


def handshake(port: int, context: ssl.SSLContext) -> bool:
    """True when the server completed the handshake and answered a CONNECT."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            # MQTT 3.1.1 CONNECT, client id "t": a CONNACK proves the server took us.
            tls.sendall(bytes.fromhex("100d00044d5154540402003c000174"))
            return tls.recv(4)[:1] == b"\x20"
    except (ssl.SSLError, OSError):
        return False


def refusal_line(caplog: pytest.LogCaptureFixture) -> str:
    lines = [r.getMessage() for r in caplog.records if "TLS handshake from" in r.getMessage()]
    assert len(lines) == 1, lines
    return lines[0]


def test_good_device_cn_becomes_username_with_chain_subjects(
    node: BrokerThread, pki: TestPKI
) -> None:
    device = pki.device(1)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="tls-client", protocol=MQTTProtocolVersion.MQTTv5
    )
    client.tls_set(ca_certs=str(pki.root), certfile=str(device.chain), keyfile=str(device.key))
    connected: queue.Queue[Any] = queue.Queue()
    client.on_connect = lambda c, u, flags, reason, props: connected.put(reason)
    client.connect("localhost", node.port(), keepalive=30)
    client.loop_start()
    try:
        assert not connected.get(timeout=5).is_failure
        (record,) = node.admin_get("/api/clients")
        assert record["username"] == "device-001"
        assert record["certificate_cn"] == "device-001"
        assert record["certificate_verified"] is True
        assert record["tls_version"] in ("TLSv1.3", "TLSv1.2")

        def subjects() -> tuple[bytes, ...]:
            (connection,) = [c for c in node.broker.connections if c.client_id == "tls-client"]
            return tuple(connection.identity.chain_subjects)

        expected = (
            device.issued.cert.subject.public_bytes(),
            load_cert(pki.intermediate).subject.public_bytes(),
            load_cert(pki.root).subject.public_bytes(),
        )
        assert node.call(subjects) == expected
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("expired", "certificate has expired"),
        ("rogue", "unable to get local issuer certificate"),
        ("none", "no client certificate"),
    ],
)
def test_bad_clients_are_refused_with_one_log_line(
    node: BrokerThread, pki: TestPKI, caplog: pytest.LogCaptureFixture, case: str, words: str
) -> None:
    device = {"expired": pki.expired, "rogue": pki.rogue, "none": None}[case]
    with caplog.at_level(logging.WARNING, logger="broker.tls_listener"):
        assert not handshake(node.port(), client_context(pki, device))
        wait_for(lambda: any("TLS handshake from" in r.getMessage() for r in caplog.records))
    line = refusal_line(caplog)
    assert "127.0.0.1:" in line and "ssl:default" in line
    assert words in line
    assert node.admin_get("/api/clients") == []


@pytest.mark.parametrize("cacertfile", ["bundle", "root"])
def test_depth_is_enforced_on_the_verified_chain(
    pki: TestPKI, caplog: pytest.LogCaptureFixture, cacertfile: str
) -> None:
    """ssl_options.depth counts the CA certificates between the client's and the trust
    anchor (OpenSSL's and EMQX's meaning). It was parsed and ignored; the standard library
    has no depth setting, so the verified chain decides (intermediates the client sent
    count too: with only the root trusted, the device sends its intermediate)."""
    trusted = str(pki.ca_bundle if cacertfile == "bundle" else pki.root)
    with running_broker(tls_node(pki, depth=0, cacertfile=trusted)) as node:
        assert handshake(node.port(), client_context(pki, pki.by_root))
        assert not handshake(node.port(), client_context(pki, pki.device(3)))
        wait_for(lambda: node.counters()["tls_chain_too_deep"] == 1)
    [line] = [r.getMessage() for r in caplog.records if "ssl_options.depth" in r.getMessage()]
    assert "refused on listener ssl:default" in line
    assert (
        "certificate chain has 1 intermediate CA certificates, more than ssl_options.depth = 0"
        in line
    )
    with running_broker(tls_node(pki, depth=1, cacertfile=trusted)) as node:
        assert handshake(node.port(), client_context(pki, pki.device(3)))


def test_verify_none_accepts_a_client_without_certificate(pki: TestPKI) -> None:
    config = tls_node(pki, verify="verify_none", fail_if_no_peer_cert=False)
    with running_broker(config) as node:
        assert handshake(node.port(), client_context(pki, None))


def test_replaced_crl_is_picked_up_within_the_reload_interval(
    pki: TestPKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = pki.device(2)
    crl = tmp_path / "crl.pem"
    write_crls(crl, [make_crl(pki.intermediate_issued), make_crl(pki.root_issued)])
    config = tls_node(pki, crl=crl, reload_interval="300ms")
    with running_broker(config) as node:
        assert handshake(node.port(), client_context(pki, device))
        # A broken file keeps the old context, and says why.
        with caplog.at_level(logging.WARNING, logger="broker.tls_listener"):
            crl.write_text("not a CRL\n")
            wait_for(lambda: any("reload failed" in r.getMessage() for r in caplog.records), 5)
        assert handshake(node.port(), client_context(pki, device))
        # The revocation arrives: new connections are refused within the interval.
        replacement = tmp_path / "crl-new.pem"
        write_crls(
            replacement,
            [make_crl(pki.intermediate_issued, [device.issued.cert]), make_crl(pki.root_issued)],
        )
        os.replace(replacement, crl)
        with caplog.at_level(logging.WARNING, logger="broker.tls_listener"):
            # Bounded, not timed: the 300 ms interval makes this quick on any machine.
            wait_for(lambda: not handshake(node.port(), client_context(pki, device)), 10)
            # The client may see the alert before the broker has logged the refusal.
            wait_for(
                lambda: any("certificate revoked" in r.getMessage() for r in caplog.records), 5
            )


def test_key_password_is_used(pki: TestPKI, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    encrypted = tmp_path / "server-key-encrypted.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    os.chmod(encrypted, 0o600)
    shutil.copy(pki.server_chain, tmp_path / "server-chain.pem")
    config = tls_node(pki, keyfile=str(encrypted), password="s3cret")
    with running_broker(config) as node:
        assert handshake(node.port(), client_context(pki, pki.device(3)))


def test_handshakes_in_flight_are_capped(pki: TestPKI) -> None:
    """A ClientHello flood cannot make unbounded handshakes: past the cap, connections wait
    in the kernel's backlog and are taken as slots free."""

    async def run() -> tuple[int, int]:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(pki.server_chain), str(pki.server_key))
        server = TLSServer(
            lambda: context, asyncio.Protocol, "capped", handshake_timeout=30, max_handshakes=2
        )
        await server.start("127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        for _ in range(100):  # bounded: the two slots fill at once
            await asyncio.sleep(0.02)
            if len(server._handshakes) == 2:
                break
        capped = len(server._handshakes)
        silent[0].close()  # its handshake fails, its slot goes to a waiting connection
        for _ in range(100):
            await asyncio.sleep(0.02)
            if server.handshakes_refused >= 1 and len(server._handshakes) == 2:
                break
        after = len(server._handshakes)
        for sock in silent[1:]:
            sock.close()
        server.close()
        return capped, after

    capped, after = asyncio.run(run())
    assert capped == 2
    assert after == 2  # the third connection took the freed slot; the fourth still waits
