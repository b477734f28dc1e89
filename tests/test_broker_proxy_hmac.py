"""An authenticated PROXY header (issue 17 part 1): real lb in front of a real broker, both
holding the same 0600 key file. lb signs every header (health checks' LOCAL ones too); the
broker refuses, before any MQTT byte, a forged header from a trusted address: without a MAC,
with a wrong key, too old, replayed. A key rotation under load refuses no good device."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bench.ports import free_port
from broker.config import ConfigError, config_warnings
from broker.mqtt import Connack, Connect, encode
from lb.cli import check
from lb.config import load_config_text
from lb.proxy_hmac import parse_key_file, signing_key
from lb.proxyproto import Command, encode_v2
from tests.broker_harness import RawClient, make_config, running_broker, wait_for
from tests.harness import EchoBackend, client_context, run_lb, tls_roundtrip
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(120)

OLD = "a1" * 32
NEW = "b2" * 32
CLIENT = ("203.0.113.7", 50123)
BROKER = ("10.0.0.5", 1883)


def write_keys(path: Path, text: str) -> Path:
    """Replace the key file in one rename, as an operator's tooling would (mode 0600)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)
    return path


def hmac_broker(keys: Path, **listener: Any) -> Any:
    settings: dict[str, Any] = {
        "bind": "127.0.0.1:0",
        "proxy_protocol": True,
        "proxy_protocol_hmac_keys": str(keys),
        **listener,
    }
    return make_config({"default": settings})


def lb_text(pki: TestPKI, port: int, broker_port: int, keys: Path, check: bool = True) -> str:
    checks = "check inter 300 rise 1 fall 1 check-send-proxy " if check else ""
    return f"""
global
    log stdout format raw local0
defaults
    mode tcp
    log global
    option log-health-checks
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend devices
    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} ca-file {pki.intermediate} ca-verify-file {pki.root} verify required
    default_backend brokers
backend brokers
    server broker1 127.0.0.1:{broker_port} {checks}send-proxy-v2 proxy-v2-options ssl,cert-cn,hmac proxy-v2-hmac-keys {keys}
"""  # noqa: E501


def mqtt_through(port: int, context: ssl.SSLContext, client_id: str) -> bool:
    """CONNECT through lb; True when the broker accepts (CONNACK 0)."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(encode(Connect("MQTT", 4, True, 30, client_id), 4))
            return tls.recv(4) == b"\x20\x02\x00\x00"
    except (OSError, ssl.SSLError):
        return False


def broker_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("broker") and record.levelno >= logging.WARNING
    ]


def test_lb_signs_and_the_broker_checks(pki: TestPKI, tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "pp2.keys", f"k1 {OLD}\n")
    port = free_port()
    device = pki.device(26)
    context = client_context(device.cert, device.key, pki.root)
    with running_broker(hmac_broker(keys)) as node:
        with run_lb(lb_text(pki, port, node.port(), keys), tmp_path, port) as lb:
            assert mqtt_through(port, context, "signed-1")
            # The checks' LOCAL headers are signed too, or the server would go DOWN.
            wait_for(lambda: node.counters()["proxy_health_checks"] >= 3, timeout=10)
            assert "is DOWN" not in lb.output()
        counters = node.counters()
    assert counters["proxy_hmac_verified"] >= 4
    refused = [name for name in counters if name.startswith("proxy_hmac_") and counters[name]]
    assert refused == ["proxy_hmac_verified"], counters


def test_forged_headers_from_a_trusted_address_are_refused(
    pki: TestPKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """127.0.0.1 is in proxy_protocol_trusted, so before this any process there could claim
    any device. Each forgery is refused before its CONNECT is read, with its reason."""
    keys = write_keys(tmp_path / "pp2.keys", f"k1 {OLD}\n")
    # A header lb really sent, captured on its way to a backend that only records it.
    recorder = EchoBackend()
    port = free_port()
    device = pki.device(27)
    context = client_context(device.cert, device.key, pki.root)
    text = lb_text(pki, port, recorder.port, keys, check=False)
    with run_lb(text, tmp_path, port):
        assert tls_roundtrip(port, context, b"x") == b"x"
    captured = recorder.wait_connections(1)[0].raw_header
    recorder.close()
    now = time.time()
    wrong = parse_key_file(f"k1 {NEW}\n", "attacker")
    forgeries = {
        "missing": encode_v2(Command.PROXY, CLIENT, BROKER),
        "bad_mac": encode_v2(
            Command.PROXY, CLIENT, BROKER, mac=signing_key(wrong, now, os.urandom(16))
        ),
        "unknown_key": encode_v2(
            Command.PROXY,
            CLIENT,
            BROKER,
            mac=signing_key(parse_key_file(f"k9 {OLD}\n", "x"), now, os.urandom(16)),
        ),
        "stale": encode_v2(
            Command.PROXY,
            CLIENT,
            BROKER,
            mac=signing_key(parse_key_file(f"k1 {OLD}\n", "x"), now - 60, os.urandom(16)),
        ),
    }
    words = {
        "missing": "no HMAC TLV",
        "bad_mac": "HMAC does not match with key 'k1'",
        "unknown_key": "HMAC key id 'k9' is not in",
        "stale": "s old, outside the 30 s window",
        "replayed": "already seen within the 30 s window",
    }
    with running_broker(hmac_broker(keys)) as node:
        first = RawClient(node.port(), level=4, prefix=captured)
        assert isinstance(first.connect(Connect("MQTT", 4, True, 30, "real")), Connack)
        forgeries["replayed"] = captured
        for reason, header in forgeries.items():
            caplog.clear()
            forged = RawClient(node.port(), level=4, prefix=header)
            forged.send(Connect("MQTT", 4, True, 30, f"forged-{reason}"))
            assert forged.closed_by_server(), reason
            [message] = broker_warnings(caplog)
            assert "refused on listener tcp:default" in message
            assert words[reason] in message, message
            assert node.counters()[f"proxy_hmac_{reason}"] == 1
        clients = [c["client_id"] for c in node.admin_get("/api/clients")]
    assert clients == ["real"]


def test_rotation_under_load_refuses_no_good_device(pki: TestPKI, tmp_path: Path) -> None:
    """The three steps of a rotation while devices keep connecting: the brokers learn the new
    key, lb signs with it, the brokers forget the old one. No device is refused."""
    broker_keys = write_keys(tmp_path / "broker.keys", f"old {OLD}\n")
    lb_keys = write_keys(tmp_path / "lb.keys", f"old {OLD}\n")
    port = free_port()
    contexts = [client_context(d.cert, d.key, pki.root) for d in pki.devices(4)]
    results = {"ok": 0, "refused": 0}
    stop = threading.Event()

    def device_loop(index: int) -> None:
        while not stop.is_set():
            if mqtt_through(port, contexts[index], f"rotating-{index}"):
                results["ok"] += 1
            else:
                results["refused"] += 1

    with running_broker(hmac_broker(broker_keys)) as node:
        with run_lb(lb_text(pki, port, node.port(), lb_keys), tmp_path, port) as lb:
            threads = [threading.Thread(target=device_loop, args=(i,)) for i in range(4)]
            for thread in threads:
                thread.start()
            try:

                def more(count: int = 10) -> None:
                    target = results["ok"] + count
                    wait_for(lambda: results["ok"] >= target, timeout=30)

                def broker_keys_are(*ids: str) -> None:
                    authenticator = node.server.header_authenticators["tcp:default"]  # type: ignore[union-attr]
                    wait_for(lambda: node.call(lambda: authenticator.key_file.ring.ids) == ids, 10)

                more()
                write_keys(broker_keys, f"old {OLD}\nnew {NEW}\n")
                broker_keys_are("old", "new")
                more()
                write_keys(lb_keys, f"new {NEW}\nold {OLD}\n")
                lb.wait_output("signing with 'new'", 10, stream="stderr")
                more()
                write_keys(broker_keys, f"new {NEW}\n")
                broker_keys_are("new")
                more()
            finally:
                stop.set()
                for thread in threads:
                    thread.join(30)
        counters = node.counters()
    assert results["refused"] == 0, results
    assert results["ok"] >= 40
    assert counters["proxy_hmac_unknown_key"] == 0 and counters["proxy_hmac_bad_mac"] == 0


def test_unchecked_hmac_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    """lb signs but the broker has no key: the one case a broker can tell that one side has
    a key and the other not."""
    ring = parse_key_file(f"k1 {OLD}\n", "x")
    listener = {"bind": "127.0.0.1:0", "proxy_protocol": True}
    with running_broker(make_config({"default": listener})) as node:
        for number in range(3):
            header = encode_v2(
                Command.PROXY, CLIENT, BROKER, mac=signing_key(ring, time.time(), os.urandom(16))
            )
            raw = RawClient(node.port(), level=4, prefix=header)
            assert isinstance(raw.connect(Connect("MQTT", 4, True, 30, f"u{number}")), Connack)
        assert node.counters()["proxy_hmac_unchecked"] == 3
    [message] = broker_warnings(caplog)
    assert "carry an HMAC (key 'k1') that nothing checks" in message


def test_broker_config_checks(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "pp2.keys", f"k1 {OLD}\n")
    with pytest.raises(ConfigError, match="set proxy_protocol = true"):
        make_config({"default": {"bind": "127.0.0.1:0", "proxy_protocol_hmac_keys": str(keys)}})
    mixed = make_config(
        {
            "keyed": {
                "bind": "127.0.0.1:0",
                "proxy_protocol": True,
                "proxy_protocol_hmac_keys": str(keys),
            },
            "open": {"bind": "127.0.0.1:0", "proxy_protocol": True},
        }
    )
    [warning] = config_warnings(mixed)
    assert "tcp:keyed" in warning and "tcp:open" in warning
    os.chmod(keys, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"), running_broker(hmac_broker(keys)):
        pass
    with (
        pytest.raises(ConfigError, match="cannot read"),
        running_broker(hmac_broker(tmp_path / "none")),
    ):
        pass


def test_lb_check_of_hmac_options(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "pp2.keys", f"k1 {OLD}\n")
    base = (
        "defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1s\n"
        "    timeout server 1s\nfrontend fe\n    bind 127.0.0.1:8443\n    default_backend be\n"
        "backend be\n"
    )

    def diagnostics(servers: str) -> list[str]:
        return [
            d.text for d in load_config_text(base + servers, str(tmp_path / "x.cfg")).diagnostics
        ]

    signed = f"send-proxy-v2 proxy-v2-options hmac proxy-v2-hmac-keys {keys}"
    assert diagnostics(f"    server a 127.0.0.1:1 {signed}\n") == []
    [error] = diagnostics("    server a 127.0.0.1:1 send-proxy-v2 proxy-v2-options hmac\n")
    assert "needs the key file" in error
    [warning] = diagnostics(f"    server a 127.0.0.1:1 send-proxy-v2 proxy-v2-hmac-keys {keys}\n")
    assert "has no 'hmac'" in warning
    [mixed] = diagnostics(
        f"    server a 127.0.0.1:1 send-proxy-v2 proxy-v2-options hmac proxy-v2-hmac-keys {keys}\n"
        "    server b 127.0.0.1:2 send-proxy-v2\n"
    )
    assert "servers a get an HMAC" in mixed and "b do not" in mixed


def test_lb_check_loads_the_key_file(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "pp2.keys", f"k1 {OLD}\n")
    os.chmod(keys, 0o644)
    config = tmp_path / "lb.cfg"
    config.write_text(
        "defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1s\n"
        "    timeout server 1s\nfrontend fe\n    bind 127.0.0.1:8443\n    default_backend be\n"
        "backend be\n"
        "    server a 127.0.0.1:1 send-proxy-v2 proxy-v2-options hmac proxy-v2-hmac-keys pp2.keys\n"
    )
    model, found = check([str(config)])
    assert model is None
    [error] = [d.text for d in found]
    assert "lb.cfg:10" in error and "mode 0644" in error and "chmod 600" in error
    os.chmod(keys, 0o600)
    model, found = check([str(config)])
    assert model is not None and found == []
