"""The runtime API over its unix socket (driven with socat, as operators do) and the
Prometheus endpoint, on a running lb with real TLS clients; `show sess` on IPv4 and IPv6
listeners."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest

from bench.ports import free_port
from lb.runtime_api import STAT_COLUMNS
from tests.harness import EchoBackend, client_context, run_lb, socat, tls_outcome
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(120)


def test_runtime_api_and_prometheus(pki: TestPKI, tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    sock = tmp_path / "lb.sock"
    backend = EchoBackend(proxy=False)
    config = (
        f"global\n    stats socket {sock} mode 600 level admin\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n"
        f"frontend stats\n    bind 127.0.0.1:{metrics_port}\n"
        "    http-request use-service prometheus-exporter\n"
        f"frontend mqtts\n    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} "
        f"ca-file {pki.intermediate} ca-verify-file {pki.root} verify required\n"
        "    default_backend brokers\n"
        f"backend brokers\n    server broker1 127.0.0.1:{backend.port}\n"
    )
    good = client_context(pki.device(8).cert, pki.device(8).key, pki.root)
    expired = client_context(pki.expired.cert, pki.expired.key, pki.root)
    try:
        with run_lb(config, tmp_path, port) as lb:
            lb.wait_output("stats socket listening", stream="stderr")
            assert oct(sock.stat().st_mode & 0o777) == "0o600"
            assert tls_outcome(port, good) == "ok"
            assert tls_outcome(port, expired).startswith("refused")

            info = socat(sock, "show info")
            assert "Name: lb" in info and "CumConns: 2" in info

            stat = socat(sock, "show stat").splitlines()
            assert stat[0] == "# " + ",".join(STAT_COLUMNS) + ","
            rows = {tuple(line.split(",")[:2]): line.split(",") for line in stat[1:] if line}
            column = {name: index for index, name in enumerate(STAT_COLUMNS)}
            frontend = rows[("mqtts", "FRONTEND")]
            assert frontend[column["stot"]] == "2"
            assert frontend[column["ssl_sess"]] == "1"
            assert frontend[column["ssl_failed_handshake"]] == "1"
            assert rows[("brokers", "broker1")][column["stot"]] == "1"
            assert rows[("brokers", "broker1")][column["bin"]] == "5"

            assert socat(sock, "set server brokers/broker1 state maint").strip() == ""
            assert tls_outcome(port, good) != "ok"
            state = socat(sock, "show servers state brokers").splitlines()
            assert state[0] == "1" and state[1].startswith("# be_id be_name srv_id")
            assert state[2].split()[3] == "broker1" and state[2].split()[6] == "1"
            metrics = (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
                .read()
                .decode()
            )
            assert 'haproxy_server_status{proxy="brokers",server="broker1",state="MAINT"} 1' in (
                metrics
            )
            assert 'haproxy_frontend_sessions_total{proxy="mqtts"}' in metrics
            assert (
                'haproxy_frontend_ssl_handshake_failures_total{proxy="mqtts",reason="expired"} 1'
                in metrics
            )
            assert socat(sock, "enable server brokers/broker1").strip() == ""
            assert tls_outcome(port, good) == "ok"
            assert socat(sock, "set server brokers/broker1 weight 7").strip() == ""
            assert socat(sock, "get weight brokers/broker1").startswith("7 (initial 1)")
            assert "No such server." in socat(sock, "set server brokers/nope state ready")
            assert "Unknown command" in socat(sock, "frobnicate")
            assert "show stat" in socat(sock, "help")
            assert str(pki.server_allinone) in socat(sock, "show ssl cert")
            # Hot-swap the served certificate: new handshakes see the new one.
            other = pki.node("swap")
            payload = other.key.read_text() + other.cert.read_text()
            answer = socat(sock, f"set ssl cert {pki.server_allinone} <<\n{payload}\n")
            assert "Transaction created" in answer
            assert "Success!" in socat(sock, f"commit ssl cert {pki.server_allinone}")
            shown = socat(sock, f"show ssl cert {pki.server_allinone}")
            assert "CN=swap" in shown or "swap" in shown
    finally:
        backend.close()


def test_show_sess_names_the_listener_protocol(tmp_path: Path) -> None:
    """proto= is the listener's protocol, as HAProxy prints it: tcpv4, or tcpv6 for a bind on
    an IPv6 address (here the IPv4-mapped loopback, so the traffic stays on 127.0.0.1)."""
    port, port6 = free_port(), free_port()
    sock = tmp_path / "lb.sock"
    backend = EchoBackend(proxy=False)
    config = (
        f"global\n    stats socket {sock} mode 600 level admin\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n"
        f"frontend plain\n    bind 127.0.0.1:{port}\n    bind [::ffff:127.0.0.1]:{port6}\n"
        "    default_backend echo\n"
        f"backend echo\n    server e1 127.0.0.1:{backend.port}\n"
    )
    try:
        with (
            run_lb(config, tmp_path, port) as lb,
            socket.create_connection(("127.0.0.1", port), timeout=10) as four,
            socket.create_connection(("127.0.0.1", port6), timeout=10) as six,
        ):
            lb.wait_output("stats socket listening", stream="stderr")
            for client in (four, six):
                client.sendall(b"hi")
                assert client.recv(2) == b"hi"
            lines = [line for line in socat(sock, "show sess").splitlines() if line]
            protos = sorted(
                (line.split(" proto=")[1].split()[0], line.split(" src=")[1].split()[0])
                for line in lines
            )
            assert protos == [
                ("tcpv4", f"127.0.0.1:{four.getsockname()[1]}"),
                ("tcpv6", f"::ffff:127.0.0.1:{six.getsockname()[1]}"),
            ]
    finally:
        backend.close()
