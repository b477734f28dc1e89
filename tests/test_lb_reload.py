"""CRL and certificate files re-read on an interval while lb runs: a device revoked by the
new CRL is refused from then on, and with `close-revoked` its live session is closed; a
file that fails to load keeps the old one in force."""

from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
import signal
import socket
import ssl
import time
import urllib.request
from pathlib import Path

import pytest

from bench.ports import free_port
from lb.pki.certs import make_crl, write_crls
from tests.harness import (
    VENV_BIN,
    EchoBackend,
    client_context,
    run_lb,
    start_process,
    tls_outcome,
)
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


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_revoked_device_cannot_resume_or_stay(
    pki: TestPKI, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    """A resumed session is not verified again by OpenSSL. A CRL reload makes a new context,
    but with a tls-ticket-keys file its tickets stay valid: lb checks the session's
    certificate against the CRLs loaded now, and close-revoked finds resumed sessions by
    their leaf. The refusal is counted as "revoked", as a full handshake's would be."""
    port, metrics_port = free_port(), free_port()
    backend = EchoBackend(proxy=False)
    crl = tmp_path / "crl.pem"
    shutil.copy(pki.crl, crl)
    keys = tmp_path / "ticket-keys"
    keys.write_text("".join(base64.b64encode(os.urandom(80)).decode() + "\n" for _ in range(3)))
    config = (
        "global\n    tune.ssl.reload-interval 1s\n    log stdout format raw local0\n"
        "defaults\n    mode tcp\n    log global\n    timeout connect 5s\n"
        "    timeout client 60s\n    timeout server 60s\n"
        f"frontend stats\n    bind 127.0.0.1:{metrics_port}\n"
        "    http-request use-service prometheus-exporter\n"
        f"frontend mqtts\n    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} "
        f"ca-file {pki.intermediate} ca-verify-file {pki.root} verify required "
        f"crl-file {crl} close-revoked tls-ticket-keys {keys}\n"
        "    default_backend brokers\n"
        f"backend brokers\n    server broker1 127.0.0.1:{backend.port}\n"
    )
    device = pki.device(19 if version is ssl.TLSVersion.TLSv1_2 else 18)
    context = client_context(device.cert, device.key, pki.root)
    context.minimum_version = context.maximum_version = version

    def connect(session: ssl.SSLSession | None) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        tls = context.wrap_socket(raw, server_hostname="localhost", session=session)
        tls.sendall(b"hi")
        assert tls.recv(8) == b"hi"  # TLS 1.3 tickets arrive with the first read
        return tls

    try:
        with run_lb(config, tmp_path, port) as lb:
            first = connect(None)
            session = first.session
            first.close()
            live = connect(session)
            assert live.session_reused
            write_crls(
                crl,
                [
                    make_crl(pki.intermediate_issued, [device.issued.cert]),
                    make_crl(pki.root_issued),
                ],
            )
            lb.wait_output("is revoked by the reloaded CRL", timeout=20, stream="stderr")
            with pytest.raises((ssl.SSLError, OSError)):  # the live resumed session was closed
                live.sendall(b"still there?")
                if not live.recv(8):
                    raise ConnectionResetError("closed by lb")
            live.close()
            mark = lb.mark("stdout")
            # Resumption offered, then refused: an alert, or (TLS 1.2, where the client's side
            # of an abbreviated handshake is done first) the connection closed unanswered.
            try:
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                    context.wrap_socket(raw, server_hostname="localhost", session=session) as again,
                ):
                    again.sendall(b"hi")
                    assert again.recv(8) == b""
            except (ssl.SSLError, OSError):
                pass
            line = lb.wait_output("(resumed session)", timeout=10, stream="stdout", since=mark)
            assert "client certificate revoked on" in line
            assert f'subject="CN={device.cn}"' in line
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            metrics = urllib.request.urlopen(url, timeout=10).read().decode()
            failures = [
                line
                for line in metrics.splitlines()
                if line.startswith("haproxy_frontend_ssl_handshake_failures_total{")
            ]
            assert failures == [
                'haproxy_frontend_ssl_handshake_failures_total{proxy="mqtts",reason="revoked"} 1'
            ]
    finally:
        backend.close()


def _expired_crls(pki: TestPKI, path: Path) -> str:
    """Write CRLs for both CA levels whose nextUpdate passed yesterday; return that date."""
    last_update = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    crls = [
        make_crl(issuer, next_update_days=-1, last_update=last_update)
        for issuer in (pki.intermediate_issued, pki.root_issued)
    ]
    write_crls(path, crls)
    next_update = crls[0].next_update_utc
    assert next_update is not None
    return next_update.strftime("%Y-%m-%d")


def _crl_config(pki: TestPKI, port: int, backend: EchoBackend, crl: Path, interval: str) -> str:
    return (
        f"global\n    tune.ssl.reload-interval {interval}\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n"
        "    timeout server 60s\n"
        f"frontend mqtts\n    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} "
        f"ca-file {pki.intermediate} ca-verify-file {pki.root} verify required "
        f"crl-file {crl}\n"
        "    default_backend brokers\n"
        f"backend brokers\n    server broker1 127.0.0.1:{backend.port}\n"
    )


def test_hot_reload_of_an_expired_crl_warns(pki: TestPKI, tmp_path: Path) -> None:
    """The file watcher loads a CRL that has already expired: it still says 'reloaded' (the
    file is valid), and then a WARNING names the file and its nextUpdate, since from now on
    every device is refused (issue 14 item 10)."""
    port = free_port()
    backend = EchoBackend(proxy=False)
    crl = tmp_path / "crl.pem"
    shutil.copy(pki.crl, crl)
    device = pki.device(13)
    context = client_context(device.cert, device.key, pki.root)
    try:
        with run_lb(_crl_config(pki, port, backend, crl, "1s"), tmp_path, port) as lb:
            assert tls_outcome(port, context) == "ok"
            expired_on = _expired_crls(pki, crl)
            output = lb.wait_output("(nextUpdate)", timeout=20, stream="stderr")
            line = next(line for line in output.splitlines() if "(nextUpdate)" in line)
            assert "WARNING" in line and str(crl) in line and f"expired on {expired_on}" in line
            assert "files reloaded" in output
            assert tls_outcome(port, context).startswith("refused")
    finally:
        backend.close()


def test_master_reload_with_an_expired_crl_warns(pki: TestPKI, tmp_path: Path) -> None:
    """The same CRL brought in by a reload of the whole configuration (SIGHUP): the checks
    of `lb -c` run then, and their warnings reach the log."""
    port = free_port()
    backend = EchoBackend(proxy=False)
    crl = tmp_path / "crl.pem"
    shutil.copy(pki.crl, crl)
    path = tmp_path / "lb.cfg"
    path.write_text(_crl_config(pki, port, backend, crl, "0"))
    master = start_process([str(VENV_BIN / "lb"), "-f", str(path)], tmp_path, "master")
    try:
        master.wait_output("ready", timeout=30)
        expired_on = _expired_crls(pki, crl)
        os.kill(master.popen.pid, signal.SIGHUP)
        output = master.wait_output("reloaded: ", timeout=30)
        line = next(line for line in output.splitlines() if "(nextUpdate)" in line)
        assert "reload: parsing [" in line and str(crl) in line
        assert f"expired on {expired_on}" in line
    finally:
        master.stop(signal.SIGTERM, timeout=20)
        backend.close()
