"""Real HAProxy 2.6 in front of a broker node, as seed 004 runs it: HAProxy verifies the device
certificate, terminates TLS and sends PROXY v2 (with the SSL TLV and CN) to a listener with
proxy_protocol = true; its health checks (check-send-proxy: LOCAL headers) stay quiet."""

from __future__ import annotations

import logging
import queue
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bench.ports import free_port
from tests.broker_harness import make_config, running_broker, wait_for
from tests.harness import run_haproxy
from tests.pki import TestPKI

pytestmark = [pytest.mark.timeout(60), pytest.mark.haproxy]


def haproxy_config(pki: TestPKI, front: int, broker_port: int) -> str:
    verify = f"ca-file {pki.intermediate} ca-verify-file {pki.root} verify required"
    return f"""
global
    maxconn 1000

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend emqx-tls
    bind 127.0.0.1:{front} ssl crt {pki.server_allinone} {verify}
    option tcplog
    default_backend emqx-backend

backend emqx-backend
    balance roundrobin
    default-server inter 200ms downinter 200ms rise 1 fall 2 maxconn 500000 weight 100
    server node-1 127.0.0.1:{broker_port} check-send-proxy send-proxy-v2-ssl-cn check
"""


def test_haproxy_passes_real_address_and_cn(
    pki: TestPKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(
        {
            "default": {
                "bind": "127.0.0.1:0",
                "proxy_protocol": True,
                "peer_cert_as_username": "cn",
                "proxy_protocol_trusted": ["127.0.0.1/32"],
            }
        }
    )
    device = pki.device(7)
    front = free_port()
    with (
        running_broker(config) as node,
        run_haproxy(haproxy_config(pki, front, node.port()), tmp_path, front),
    ):
        # Health checks (PROXY v2 LOCAL headers, then a reset) run every 200 ms meanwhile.
        wait_for(lambda: node.counters()["connections_closed"] >= 3, timeout=10)

        connected: queue.Queue[object] = queue.Queue()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-7", protocol=mqtt.MQTTv5)
        client.tls_set(ca_certs=str(pki.root), certfile=str(device.cert), keyfile=str(device.key))
        client.tls_insecure_set(True)
        client.on_connect = lambda *args: connected.put(args[3])
        client.username_pw_set("someone-else")
        client.connect("127.0.0.1", front, keepalive=30)
        client.loop_start()
        try:
            reason = connected.get(timeout=10)
            assert not reason.is_failure  # type: ignore[attr-defined]
            local_port = client.socket().getsockname()[1]  # type: ignore[union-attr]
            [record] = [c for c in node.admin_get("/api/clients") if c["client_id"] == "dev-7"]
        finally:
            client.disconnect()
            client.loop_stop()
    assert record["certificate_cn"] == device.cn
    assert record["username"] == device.cn
    assert record["address"] == f"127.0.0.1:{local_port}"
    assert record["via_proxy"] is True
    assert record["tls_version"] in ("TLSv1.3", "TLSv1.2")
    noisy = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("broker") and r.levelno >= logging.WARNING
    ]
    assert noisy == []
