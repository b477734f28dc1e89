"""HAProxy's Prometheus frontend, word for word: `mode http` is accepted there and only there.

HAProxy 2.6 serves `http-request use-service prometheus-exporter` only in `mode http`, so an
operator's stats frontend has that line; lb is a TCP balancer and refuses `mode http`
everywhere else with the same clear error. One configuration text passes `haproxy -c` and
`lb -c` without a warning, and both serve /metrics on it with the exporter's metric names.
"""

from __future__ import annotations

import base64
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from bench.ports import free_port
from lb.config import load_config_text
from tests.harness import HAPROXY, VENV_BIN, EchoBackend, run_haproxy, run_lb
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(120)

STATS_FRONTEND = (
    "frontend stats\n"
    "    bind 127.0.0.1:{port}\n"
    "    mode http\n"
    "    http-request use-service prometheus-exporter\n"
    "    no log\n"
)

#: Metric families both exporters must show for this configuration.
SHARED_METRICS = (
    "haproxy_frontend_current_sessions",
    "haproxy_frontend_sessions_total",
    "haproxy_backend_current_sessions",
    "haproxy_server_status",
)


def config_text(pki: TestPKI, port: int, metrics_port: int, backend_port: int) -> str:
    return (
        "global\n    log stdout format raw local0\n"
        # option tcplog on the TCP frontend only: in defaults HAProxy would warn that the
        # stats frontend's (`no log`) log format is ignored.
        "defaults\n    mode tcp\n    log global\n"
        "    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n"
        + STATS_FRONTEND.format(port=metrics_port)
        + f"frontend mqtts\n    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} "
        f"ca-file {pki.intermediate} ca-verify-file {pki.root} verify required\n"
        "    option tcplog\n    default_backend brokers\n"
        f"backend brokers\n    server broker1 127.0.0.1:{backend_port}\n"
    )


def check(executable: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [executable, "-c", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/plain")
        return str(response.read().decode())


@pytest.mark.haproxy
def test_one_config_for_both(pki: TestPKI, tmp_path: Path) -> None:
    backend = EchoBackend(proxy=False)
    ports = {name: (free_port(), free_port()) for name in ("lb", "haproxy")}
    texts = {name: config_text(pki, *ports[name], backend.port) for name in ports}
    try:
        path = tmp_path / "same.cfg"
        path.write_text(texts["lb"])
        for executable in (HAPROXY, str(VENV_BIN / "lb")):
            checked = check(executable, path)
            assert checked.returncode == 0, checked.stderr
            assert "Configuration file is valid" in checked.stdout
            assert "WARNING" not in checked.stderr, checked.stderr
        with (
            run_haproxy(texts["haproxy"], tmp_path, ports["haproxy"][1]),
            run_lb(texts["lb"], tmp_path, ports["lb"][0]) as lb,
        ):
            lb.wait_output(f"listening on 127.0.0.1:{ports['lb'][1]} (prometheus)", 10)
            pages = {name: metrics(ports[name][1]) for name in ports}
            for name in SHARED_METRICS:
                for balancer, page in pages.items():
                    assert f"\n{name}{{" in page, (balancer, name)
            assert 'haproxy_frontend_current_sessions{proxy="mqtts"} 0' in pages["lb"]
            assert (
                'haproxy_server_status{proxy="brokers",server="broker1",state="UP"} 1'
                in (pages["lb"])
            )
    finally:
        backend.close()


TAIL = "backend be\n    server s1 127.0.0.1:1\n"


def errors(text: str) -> list[str]:
    return [d.text for d in load_config_text(text, "t.cfg").errors]


def test_stats_frontend_needs_no_backend_and_draws_no_warning() -> None:
    result = load_config_text(STATS_FRONTEND.format(port=8404) + TAIL, "t.cfg")
    assert result.config is not None and result.diagnostics == ()
    frontend = result.config.frontend("stats")
    assert frontend.http_request_use_service == "prometheus-exporter"
    assert frontend.default_backend is None and frontend.log.global_ is False


def test_stats_frontend_with_mode_tcp_is_still_accepted() -> None:
    text = STATS_FRONTEND.format(port=8404).replace("    mode http\n", "") + TAIL
    assert load_config_text(text, "t.cfg").diagnostics == ()


REFUSED = "'mode' : 'http' not supported: lb is a TCP balancer (use 'mode tcp')"


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        ("defaults\n    mode http\n" + TAIL, 2, ""),
        (TAIL + "    mode http\n", 3, ""),
        ("listen web\n    bind :1\n    mode http\n    server s1 127.0.0.1:1\n", 3, ""),
        (
            "frontend web\n    bind :1\n    mode http\n    default_backend be\n" + TAIL,
            3,
            " (this frontend has no 'http-request use-service prometheus-exporter')",
        ),
        (
            STATS_FRONTEND.format(port=1) + "    default_backend be\n" + TAIL,
            3,
            " (this frontend also forwards to a backend)",
        ),
        (
            STATS_FRONTEND.format(port=1) + "    use_backend be\n" + TAIL,
            3,
            " (this frontend also forwards to a backend)",
        ),
    ],
    ids=["defaults", "backend", "listen", "plain frontend", "default_backend", "use_backend"],
)
def test_mode_http_refused_elsewhere(text: str, line: int, why: str) -> None:
    message = (
        f"parsing [t.cfg:{line}] : {REFUSED}; 'mode http' is accepted only on a frontend whose "
        f"only job is 'http-request use-service prometheus-exporter'{why}"
    )
    assert errors(text) == [message]


def test_mode_tcp_after_mode_http_wins() -> None:
    text = "frontend web\n    bind :1\n    mode http\n    mode tcp\n    default_backend be\n"
    assert errors(text + TAIL) == []


def test_default_backend_inherited_from_defaults_is_no_reason_to_refuse() -> None:
    text = "defaults\n    default_backend be\n" + STATS_FRONTEND.format(port=1) + TAIL
    assert errors(text) == []


def protected_config(metrics_port: int, password_hash: str) -> str:
    """HAProxy's way to protect its exporter, which lb reads the same: a userlist (a crypt(3)
    hash and a plain insecure-password) and basic auth unless the request carries a user."""
    return (
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n"
        f"userlist scrapers\n    user prometheus password {password_hash}\n"
        "    user probe insecure-password probe-secret\n"
        f"frontend stats\n    bind 127.0.0.1:{metrics_port}\n    mode http\n"
        "    http-request auth realm metrics unless { http_auth(scrapers) }\n"
        "    http-request use-service prometheus-exporter\n    no log\n"
        "frontend plain\n    bind 127.0.0.1:1\n    default_backend be\n" + TAIL
    )


def fetch(port: int, authorization: str | None = None, extra: str = "") -> tuple[int, str, bytes]:
    """(status, WWW-Authenticate, body) of GET /metrics over a raw socket."""
    head = f"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}"
    if authorization is not None:
        head += f"Authorization: {authorization}\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    status = int(answer.split(b" ", 2)[1])
    challenge = ""
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.decode().partition(":")
        if name.lower() == "www-authenticate":
            challenge = value.strip()
    return status, challenge, answer


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.haproxy
def test_exporter_behind_basic_auth_like_haproxy(tmp_path: Path) -> None:
    password_hash = subprocess.run(
        ["openssl", "passwd", "-6", "scrape me"], capture_output=True, text=True, check=True
    ).stdout.strip()
    ports = {"lb": free_port(), "haproxy": free_port()}
    texts = {name: protected_config(port, password_hash) for name, port in ports.items()}
    path = tmp_path / "protected.cfg"
    path.write_text(texts["lb"])
    for executable in (HAPROXY, str(VENV_BIN / "lb")):
        checked = check(executable, path)
        assert checked.returncode == 0, checked.stderr
    with (
        run_haproxy(texts["haproxy"], tmp_path, ports["haproxy"]),
        run_lb(texts["lb"], tmp_path, ports["lb"]) as lb,
    ):
        lb.wait_output(f"listening on 127.0.0.1:{ports['lb']} (prometheus)", 10)
        for name, port in ports.items():
            status, challenge, _ = fetch(port)
            assert (status, challenge) == (401, 'Basic realm="metrics"'), name
            assert fetch(port, basic("prometheus", "wrong"))[0] == 401, name
            assert fetch(port, basic("nobody", "scrape me"))[0] == 401, name
            status, _, page = fetch(port, basic("prometheus", "scrape me"))
            assert status == 200 and b"haproxy_frontend_current_sessions" in page, name
            assert fetch(port, basic("probe", "probe-secret"))[0] == 200, name


def test_exporter_answers_431_and_keeps_alive(tmp_path: Path) -> None:
    port = free_port()
    with run_lb(STATS_FRONTEND.format(port=port) + TAIL, tmp_path, port) as lb:
        lb.wait_output(f"listening on 127.0.0.1:{port} (prometheus)", 10)
        status, _, answer = fetch(port, extra="X-Padding: " + "a" * 10_000 + "\r\n")
        assert status == 431, answer[:100]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            sock.sendall(request + request)  # pipelined, keep-alive
            data = b""
            while data.count(b"HTTP/1.1 200 OK") < 2:
                chunk = sock.recv(65536)
                assert chunk, data[-200:]
                data += chunk
