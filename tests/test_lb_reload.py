"""CRL and certificate files re-read on an interval while lb runs: a device revoked by the
new CRL is refused from then on, and with `close-revoked` its live session is closed; a
file that fails to load keeps the old one in force."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from bench.ports import free_port
from lb.pki.certs import make_crl, write_crls
from tests.harness import EchoBackend, client_context, run_lb, tls_outcome
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(120)


def test_crl_reload_refuses_and_closes_revoked(pki: TestPKI, tmp_path: Path) -> None:
    port = free_port()
    backend = EchoBackend(proxy=False)
    crl = tmp_path / "crl.pem"
    shutil.copy(pki.crl, crl)
    config = (
        "global\n    tune.ssl.reload-interval 1s\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n"
        "    timeout server 60s\n"
        f"frontend mqtts\n    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} "
        f"ca-file {pki.intermediate} ca-verify-file {pki.root} verify required "
        f"crl-file {crl} close-revoked\n"
        "    default_backend brokers\n"
        f"backend brokers\n    server broker1 127.0.0.1:{backend.port}\n"
    )
    device = pki.device(11)
    context = client_context(device.cert, device.key, pki.root)
    try:
        with run_lb(config, tmp_path, port) as lb:
            import socket

            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            live = context.wrap_socket(raw, server_hostname="localhost")
            live.sendall(b"hi")
            assert live.recv(8) == b"hi"
            # A broken file first: the old CRL stays in force.
            crl.write_text("not a crl\n")
            lb.wait_output("previous ones stay in force", timeout=20, stream="stderr")
            assert tls_outcome(port, context) == "ok"
            # Then a CRL that revokes the device.
            write_crls(
                crl,
                [
                    make_crl(
                        pki.intermediate_issued, [pki.revoked.issued.cert, device.issued.cert]
                    ),
                    make_crl(pki.root_issued),
                ],
            )
            lb.wait_output("is revoked by the reloaded CRL", timeout=20, stream="stderr")
            deadline = time.monotonic() + 20
            while tls_outcome(port, context) == "ok":
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert "revoked" in lb.output()
            live.settimeout(10)
            try:
                closed = live.recv(8) == b""
            except OSError:
                closed = True
            assert closed
            assert (
                tls_outcome(port, client_context(pki.device(12).cert, pki.device(12).key, pki.root))
                == "ok"
            )
    finally:
        backend.close()
