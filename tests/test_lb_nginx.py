"""lb in front of nginx's stream module as the receiving side of the PROXY protocol.

nginx (Debian's, with libnginx-mod-stream) listens with ``listen ... proxy_protocol`` and
answers each connection with what it read from lb's header (``$proxy_protocol_addr``,
``$proxy_protocol_port``, ``$proxy_protocol_server_addr``, ``$proxy_protocol_server_port``),
and logs the same in its access log. A device connects to lb with its certificate from
127.0.0.2; nginx must name the device's own address and port and lb's frontend address, for
``send-proxy-v2`` and for ``send-proxy`` (v1). Health checks go to the same listener, with
the LOCAL header (v2) or a PROXY line (v1), and nginx must take those too.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.ports import free_port
from demo import ports
from tests.harness import client_context, run_lb
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(120)

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
DEVICE_ADDRESS = "127.0.0.2"
ANSWER = "$proxy_protocol_addr:$proxy_protocol_port $proxy_protocol_server_addr:$proxy_protocol_server_port $remote_addr"  # noqa: E501
START_TIMEOUT = 15.0
READ_TIMEOUT = 10.0
LOG_TIMEOUT = 10.0


def nginx_missing() -> str | None:
    if not Path(NGINX).exists():
        return "nginx is not installed (./dev setup installs it as root)"
    if not STREAM_MODULE.exists():
        return "nginx's stream module is not installed (libnginx-mod-stream)"
    return None


def nginx_version() -> str:
    result = subprocess.run([NGINX, "-v"], capture_output=True, check=False, text=True, timeout=10)
    return result.stderr.strip().removeprefix("nginx version: ")


@dataclass
class Nginx:
    port: int
    access_log: Path
    process: subprocess.Popen[bytes]


@contextmanager
def run_nginx(directory: Path) -> Iterator[Nginx]:
    """nginx in the foreground, one process, everything in ``directory``."""
    port = free_port()
    access_log = directory / "access.log"
    config = directory / "nginx.conf"
    config.write_text(
        f"load_module {STREAM_MODULE};\n"
        "daemon off;\nmaster_process off;\n"
        f"pid {directory / 'nginx.pid'};\n"
        f"error_log {directory / 'error.log'} info;\n"
        "events { worker_connections 64; }\n"
        "stream {\n"
        f"    log_format proxied '{ANSWER}';\n"
        "    server {\n"
        f"        listen 127.0.0.1:{port} proxy_protocol;\n"
        f"        access_log {access_log} proxied;\n"
        "        proxy_protocol_timeout 5s;\n"
        f'        return "{ANSWER}\\n";\n'
        "    }\n"
        "}\n"
    )
    process = subprocess.Popen(
        [NGINX, "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=(directory / "nginx.stdout").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        # Not a probe connection: nginx would log it as a broken header.
        deadline = time.monotonic() + START_TIMEOUT
        while ports.is_free(port):
            if process.poll() is not None or time.monotonic() > deadline:
                error_log = (directory / "error.log").read_text(errors="replace")
                raise AssertionError(f"nginx did not start:\n{error_log}")
            time.sleep(0.05)
        yield Nginx(port, access_log, process)
    finally:
        process.send_signal(signal.SIGQUIT)  # nginx's graceful stop
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def lb_config(pki: TestPKI, port: int, nginx_port: int, send_proxy: str) -> str:
    return (
        "global\n    log stdout format raw local0\n"
        "defaults\n    mode tcp\n    log global\n    option tcplog\n"
        "    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n"
        "    timeout check 5s\n"
        "frontend emqx-tls\n"
        f"    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} ca-file {pki.intermediate} "
        f"ca-verify-file {pki.root} verify required\n"
        "    default_backend nginx\n"
        "backend nginx\n"
        f"    server nginx-1 127.0.0.1:{nginx_port} {send_proxy} check inter 1s\n"
    )


def device_asks(pki: TestPKI, port: int) -> tuple[str, tuple[str, int]]:
    """Connect through lb from DEVICE_ADDRESS with a device certificate; nginx's answer."""
    device = pki.device(7)
    context = client_context(device.cert, device.key, pki.root)
    with socket.create_connection(
        ("127.0.0.1", port), timeout=READ_TIMEOUT, source_address=(DEVICE_ADDRESS, 0)
    ) as raw:
        local = raw.getsockname()[:2]
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            answer = bytearray()
            while chunk := tls.recv(4096):
                answer.extend(chunk)
    return answer.decode().strip(), (local[0], local[1])


@pytest.mark.parametrize("send_proxy", ["send-proxy-v2", "send-proxy"])
def test_nginx_reads_the_device_address_from_lb(
    pki: TestPKI, tmp_path: Path, send_proxy: str
) -> None:
    problem = nginx_missing()
    if problem is not None:
        pytest.skip(problem)
    port = free_port()
    with (
        run_nginx(tmp_path) as nginx,
        run_lb(lb_config(pki, port, nginx.port, send_proxy), tmp_path, port),
    ):
        answer, (host, device_port) = device_asks(pki, port)
        expected = f"{host}:{device_port} 127.0.0.1:{port} 127.0.0.1"
        assert host == DEVICE_ADDRESS
        # nginx's own $remote_addr is lb (127.0.0.1); the header names the device.
        assert answer == expected
        deadline = time.monotonic() + LOG_TIMEOUT
        while expected not in nginx.access_log.read_text():
            assert time.monotonic() < deadline, nginx.access_log.read_text()
            time.sleep(0.1)
        # lb's checks (a LOCAL header for v2, a PROXY line with the check's own addresses
        # for v1) reach nginx too: wait for one in its access log.
        deadline = time.monotonic() + LOG_TIMEOUT
        while not [line for line in nginx.access_log.read_text().splitlines() if line != expected]:
            assert time.monotonic() < deadline, "no health check reached nginx"
            time.sleep(0.1)
    # ... and nginx took every header without a complaint (it logs a broken one as an error).
    error_log = (tmp_path / "error.log").read_text()
    assert "broken header" not in error_log and "[error]" not in error_log, error_log
    print(f"nginx {nginx_version()}: {send_proxy} read as {answer!r}")
