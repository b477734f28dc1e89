"""One connection id across lb, the PROXY header and the broker (issue 17 part 2): lb's
`unique-id-format` / `%ID` / `proxy-v2-options unique-id` (PP2_TYPE_UNIQUE_ID, 0x05), the
broker's log lines and /api/clients; HAProxy 2.6 doing the same in front of the broker."""

from __future__ import annotations

import logging
import re
import socket
import threading
from pathlib import Path

import pytest

from bench.ports import free_port
from broker.mqtt import Connack, Connect, encode
from lb.config import load_config_text
from lb.log_format import LogFormat, SessionRecord
from lb.proxyproto import NEED_DATA, ProxyHeader, ProxyProtocolDecoder
from tests.broker_harness import RawClient, make_config, running_broker, wait_for
from tests.harness import client_context, run_haproxy, run_lb
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(90)

TCPLOG_WITH_ID = "%ci:%cp [%t] %ft %b/%s %Tw/%Tc/%Tt %B %ts %ac/%fc/%bc/%sc/%rc %sq/%bq id=%ID"
HAPROXY_EXAMPLE = r"%{+X}o\ %ci:%cp_%fi:%fp_%Ts_%rt:%pid"  # configuration.txt's example


class Tap:
    """A TCP relay between the balancer and the broker that keeps the first bytes it relays
    towards the broker: the PROXY header as it went on the wire."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.first_bytes: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            self.first_bytes.append(b"")
            index = len(self.first_bytes) - 1
            threading.Thread(target=self._pipe, args=(client, server, index), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, None), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, index: int | None) -> None:
        try:
            while data := source.recv(65536):
                if index is not None and len(self.first_bytes[index]) < 4096:
                    self.first_bytes[index] += data
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def header(self, index: int = -1) -> ProxyHeader:
        decoder = ProxyProtocolDecoder()
        decoder.feed(self.first_bytes[index])
        event = decoder.next_event()
        assert event is not NEED_DATA and isinstance(event, ProxyHeader)
        return event

    def close(self) -> None:
        self.sock.close()


def proxy_broker() -> object:
    return make_config({"default": {"bind": "127.0.0.1:0", "proxy_protocol": True}})


def broker_lines(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("broker") and needle in record.getMessage()
    ]


def test_one_device_one_id_from_lb_to_the_broker(
    pki: TestPKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    device = pki.device(28)
    context = client_context(device.cert, device.key, pki.root)
    with running_broker(proxy_broker()) as node:  # type: ignore[arg-type]
        tap = Tap(node.port())
        config = f"""
global
    log stdout format raw local0
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend devices
    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} ca-file {pki.intermediate} ca-verify-file {pki.root} verify required
    log-format "{TCPLOG_WITH_ID}"
    default_backend brokers
backend brokers
    server broker1 127.0.0.1:{tap.port} send-proxy-v2-ssl-cn proxy-v2-options unique-id
"""  # noqa: E501
        with run_lb(config, tmp_path, port) as lb:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.sendall(encode(Connect("MQTT", 4, True, 30, "one-id"), 4))
                assert tls.recv(4) == b"\x20\x02\x00\x00"
                [record] = node.admin_get("/api/clients")
            output = lb.wait_output(" id=", 10, stream="stdout")
        tap.close()
    header_id = tap.header(0).unique_id
    assert header_id is not None and re.fullmatch(rb"[0-9a-f]{32}", header_id)  # lb's default
    connection_id = header_id.decode()
    [log_line] = [line for line in output.splitlines() if " id=" in line]
    assert log_line.endswith(f" id={connection_id}")
    assert record["connection_id"] == connection_id
    assert record["connection_id_source"] == "proxy"
    for needle in ("client connected: client_id=one-id", "client disconnected: client_id=one-id"):
        [line] = broker_lines(caplog, needle)
        assert f"connection_id={connection_id}" in line


@pytest.mark.haproxy
def test_broker_behind_haproxy_takes_haproxys_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """HAProxy 2.6 with its own unique-id-format and `proxy-v2-options unique-id`: the broker
    logs and shows HAProxy's %ID, the same one HAProxy logs."""
    caplog.set_level(logging.INFO)
    port = free_port()
    with running_broker(proxy_broker()) as node:  # type: ignore[arg-type]
        config = f"""
global
    log stdout format raw local0
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend devices
    bind 127.0.0.1:{port}
    unique-id-format {HAPROXY_EXAMPLE}
    log-format "{TCPLOG_WITH_ID}"
    default_backend brokers
backend brokers
    server broker1 127.0.0.1:{node.port()} send-proxy-v2 proxy-v2-options unique-id
"""
        with run_haproxy(config, tmp_path, port) as haproxy:
            client = RawClient(port, level=4)
            # HAProxy logs the harness's port probe too: the device's line is found by its port.
            source = f"127.0.0.1:{client.sock.getsockname()[1]} "
            assert isinstance(client.connect(Connect("MQTT", 4, True, 30, "via-haproxy")), Connack)
            [record] = [
                c for c in node.admin_get("/api/clients") if c["client_id"] == "via-haproxy"
            ]
            client.close()
            wait_for(lambda: bool(broker_lines(caplog, "client disconnected")))
            output = haproxy.wait_output(source, 10, stream="stdout")
    [line] = [line for line in output.splitlines() if line.startswith(source)]
    haproxy_id = line.rsplit(" id=", 1)[1]
    assert re.fullmatch(
        r"7F000001:[0-9A-F]{4}_7F000001:[0-9A-F]{4}_[0-9A-F]{8}_[0-9A-F]{4}:[0-9A-F]{4,}",
        haproxy_id,
    )
    assert record["connection_id"] == haproxy_id and record["connection_id_source"] == "proxy"
    [line] = broker_lines(caplog, "client connected: client_id=via-haproxy")
    assert f"connection_id={haproxy_id}" in line


def test_lb_renders_unique_id_format_as_haproxy(tmp_path: Path) -> None:
    """The documented format, lb's rendering: the same shape as HAProxy's id above."""
    format_ = LogFormat(HAPROXY_EXAMPLE.replace("\\ ", " "))
    record = SessionRecord(
        "127.0.0.1", 39226, 1_796_000_000.25, "devices", False, "brokers", "b1",
        0, 0, 0, 0, "--", 1, 1, 1, 1, 0, 0, 0, "127.0.0.1", 48485,
        pid=0x4170, session_number=0,
    )  # fmt: skip
    assert format_.render(record) == "7F000001:993A_7F000001:BD65_6B0CC900_0000:4170"
    assert LogFormat("%ci  %cp").render(record) == "127.0.0.1 39226"  # separators collapse
    text = (
        "defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1s\n"
        "    timeout server 1s\nfrontend fe\n    bind 127.0.0.1:8443\n"
        "    unique-id-format %ci:%nope\n    default_backend be\nbackend be\n"
        "    server s 127.0.0.1:1883\n"
    )
    [error] = load_config_text(text, "x.cfg").errors
    assert "x.cfg:8" in error.text and "'unique-id-format'" in error.text and "%nope" in error.text
    del tmp_path


def test_broker_without_an_id_makes_its_own(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with running_broker() as node:
        client = RawClient(node.port(), level=4)
        assert isinstance(client.connect(Connect("MQTT", 4, True, 30, "direct")), Connack)
        [record] = node.admin_get("/api/clients")
        client.close()
        wait_for(lambda: bool(broker_lines(caplog, "client disconnected")))
    assert re.fullmatch(r"[0-9a-f]{32}", record["connection_id"])
    assert record["connection_id_source"] == "broker"
    for needle in ("client connected: client_id=direct", "client disconnected: client_id=direct"):
        [line] = broker_lines(caplog, needle)
        assert f"connection_id={record['connection_id']}" in line
