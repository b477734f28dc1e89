"""What lb puts in the PROXY v2 header beyond HAProxy's TLVs, and how it says so: the size
of a chain-subjects header against `proxy-v2-max-size` (issue 14 item 8)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from bench.ports import free_port
from broker.mqtt import Connect, encode
from lb.config import load_config_text
from lb.pki.certs import Names, make_device, write_certs, write_key
from tests.broker_harness import make_config, running_broker
from tests.harness import client_context, run_lb
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(60)


def client_verification(pki: TestPKI) -> str:
    return f"ca-file {pki.intermediate} ca-verify-file {pki.root} verify required"


def lb_config(pki: TestPKI, port: int, server_port: int, server_options: str) -> str:
    return f"""
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend devices
    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} {client_verification(pki)}
    default_backend brokers
backend brokers
    server broker1 127.0.0.1:{server_port} {server_options}
"""


def long_subject_device(pki: TestPKI, directory: Path) -> ssl.SSLContext:
    """A device whose subject is 900 bytes long, signed by the intermediate: with the test
    PKI's short CA names its header passes 1,024 bytes as the probe's 746-byte subject did
    with longer ones."""
    names = Names(organization="O" * 60, organizational_unit="U" * 755, locality="L" * 20)
    issued = make_device(pki.intermediate_issued, "device-long", names=names)
    assert len(issued.cert.subject.public_bytes()) == 900
    cert = write_certs(directory / "long.pem", [issued.cert])
    key = write_key(directory / "long-key.pem", issued.key)
    return client_context(cert, key, pki.root)


def mqtt_connect(port: int, context: ssl.SSLContext, client_id: str) -> bytes:
    """CONNECT through lb; the broker's answer (b"" when it closed instead)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(encode(Connect("MQTT", 4, True, 30, client_id), 4))
        try:
            return tls.recv(4)
        except (OSError, ssl.SSLError):
            return b""


def test_long_chain_reaches_a_default_broker_and_oversize_is_logged(
    pki: TestPKI, tmp_path: Path
) -> None:
    """The probe of issue 14 item 8: chain-subjects with a 746-byte subject makes a header
    over 1,024 bytes. A broker with the default proxy_protocol_max_size takes it; one
    limited to 1,024 bytes refuses it, and lb, told the same limit, logs the header it built
    past it (the device itself sees only a close)."""
    port = free_port()
    context = long_subject_device(pki, tmp_path)
    options = "send-proxy-v2 proxy-v2-options ssl,cert-cn,chain-subjects"
    listener = {"bind": "127.0.0.1:0", "proxy_protocol": True}
    with running_broker(make_config({"default": listener})) as node:
        config = lb_config(pki, port, node.port(), options)
        with run_lb(config, tmp_path, port, name="lb-default") as lb:
            assert mqtt_connect(port, context, "long-1") == b"\x20\x02\x00\x00"
        assert "is over its proxy-v2-max-size" not in lb.stderr
    limited = {**listener, "proxy_protocol_max_size": 1024}
    with running_broker(make_config({"default": limited})) as node:
        config = lb_config(pki, port, node.port(), options + " proxy-v2-max-size 1024")
        with run_lb(config, tmp_path, port, name="lb-limited") as lb:
            assert mqtt_connect(port, context, "long-2") == b""
            output = lb.wait_output("is over its proxy-v2-max-size", 10, stream="stderr")
        assert node.counters()["proxy_header_errors"] == 1
    line = next(line for line in output.splitlines() if "is over its" in line)
    size = int(line.split("PROXY v2 header of ")[1].split()[0])
    assert size > 1024
    assert "for server brokers/broker1 is over its proxy-v2-max-size (1024 bytes)" in line
    assert "(client CN=device-long)" in line and "proxy_protocol_max_size" in line


def test_check_explains_chain_subjects_as_ours(tmp_path: Path) -> None:
    text = (
        "defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1s\n"
        "    timeout server 1s\n"
        "frontend fe\n    bind 127.0.0.1:8443\n    default_backend be\n"
        "backend be\n"
        "    server s 127.0.0.1:1883 send-proxy-v2 proxy-v2-options ssl,chain-subjects\n"
    )
    result = load_config_text(text, str(tmp_path / "x.cfg"))
    assert result.config is not None and not result.warnings
    [notice] = [d for d in result.diagnostics if not d.is_error and not d.is_warning]
    assert "x.cfg:10" in notice.text
    assert "(ours)" in notice.text and "proxy_protocol_max_size" in notice.text
    assert "8192 bytes here" in notice.text
    small = text.replace("chain-subjects\n", "chain-subjects proxy-v2-max-size 1k\n")
    [notice] = load_config_text(small, "x.cfg").diagnostics
    assert "1024 bytes here" in notice.text
    for bad in ("100", "65k", "big"):
        broken = text.replace("chain-subjects\n", f"chain-subjects proxy-v2-max-size {bad}\n")
        [error] = load_config_text(broken, "x.cfg").errors
        assert "'proxy-v2-max-size'" in error.text
