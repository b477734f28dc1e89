"""OCSP stapling from `<crt>.ocsp`, seen by `openssl s_client -status`, next to HAProxy 2.6.

Both balancers load the same `server-allinone.pem` and the DER response beside it and must
staple the same response. A new response reaches lb through `reload ssl` on its runtime API
or its file watcher (`tune.ssl.reload-interval`), and HAProxy 2.6 through
`set ssl ocsp-response <base64>` (it does not watch files). A response that is expired or
for another certificate is refused at load by both (a warning from `-c`, a log line at
start) and not stapled.
"""

from __future__ import annotations

import base64
import datetime
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from bench.ports import free_port
from lb.pki.certs import Issued
from tests.harness import HAPROXY, VENV_BIN, Process, run_haproxy, run_lb, socat
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(120)

ONE_DAY = datetime.timedelta(days=1)


def ocsp_response(
    pki: TestPKI,
    status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
    *,
    certificate: x509.Certificate | None = None,
    issuer: Issued | None = None,
    this_update: datetime.datetime | None = None,
    next_update: datetime.datetime | None = None,
) -> bytes:
    """A DER OCSPResponse for the server certificate (or `certificate`), signed by the
    intermediate that issued it; certificate id hashed with SHA-1 as HAProxy computes it."""
    now = datetime.datetime.now(datetime.UTC)
    responder = pki.intermediate_issued
    revoked = status == ocsp.OCSPCertStatus.REVOKED
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=certificate or pki.server_issued.cert,
        issuer=(issuer or responder).cert,
        algorithm=hashes.SHA1(),
        cert_status=status,
        this_update=this_update or now,
        next_update=next_update or now + ONE_DAY,
        revocation_time=now - datetime.timedelta(hours=1) if revoked else None,
        revocation_reason=x509.ReasonFlags.key_compromise if revoked else None,
    )
    builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, responder.cert)
    response = builder.sign(responder.key, hashes.SHA256())
    return response.public_bytes(serialization.Encoding.DER)


def s_client_status(port: int, pki: TestPKI) -> str:
    """What `openssl s_client -status` prints about the stapled response."""
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            "localhost",
            "-status",
            "-CAfile",
            str(pki.root),
        ],
        input=b"",
        capture_output=True,
        timeout=20,
        check=False,
    )
    text = result.stdout.decode(errors="replace")
    assert "BEGIN CERTIFICATE" in text or "Server certificate" in text, text
    return text


def stapled(text: str) -> dict[str, str]:
    """The fields of the stapled response that s_client printed ({} when none was sent)."""
    if "OCSP response: no response sent" in text or "OCSP Response Data:" not in text:
        return {}
    section = text.split("OCSP Response Data:")[1].split("=====", maxsplit=1)[0]
    fields: dict[str, str] = {}
    for line in section.splitlines():
        name, colon, value = line.strip().partition(": ")
        if colon and name in (
            "OCSP Response Status",
            "Cert Status",
            "Serial Number",
            "Issuer Key Hash",
            "This Update",
            "Next Update",
            "Revocation Time",
        ):
            fields[name] = value.strip()
    return fields


def config_text(crt: Path, port: int, socket_path: Path, extra_global: str = "") -> str:
    """One bind with `ssl crt` only (no client certificates: this is about the server side)."""
    return (
        f"global\n    log stdout format raw local0\n"
        f"    stats socket {socket_path} mode 600 level admin\n{extra_global}"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n"
        f"frontend tls\n    bind 127.0.0.1:{port} ssl crt {crt}\n    default_backend none\n"
        f"backend none\n    server s1 127.0.0.1:{free_port()}\n"
    )


@dataclass
class Files:
    """A private copy of the server's crt (so its `.ocsp` touches no other test)."""

    crt: Path

    @property
    def ocsp(self) -> Path:
        return Path(f"{self.crt}.ocsp")


@pytest.fixture
def files(pki: TestPKI, tmp_path: Path) -> Files:
    crt = tmp_path / "server-allinone.pem"
    shutil.copy(pki.server_allinone, crt)
    return Files(crt)


@dataclass
class Running:
    process: Process
    port: int
    socket: Path


@pytest.fixture
def both(files: Files, pki: TestPKI, tmp_path: Path) -> Iterator[dict[str, Running]]:
    files.ocsp.write_bytes(ocsp_response(pki))
    ports = {"lb": free_port(), "haproxy": free_port()}
    sockets = {name: tmp_path / f"{name}.sock" for name in ports}
    with (
        run_haproxy(
            config_text(files.crt, ports["haproxy"], sockets["haproxy"]),
            tmp_path,
            ports["haproxy"],
        ) as haproxy,
        run_lb(config_text(files.crt, ports["lb"], sockets["lb"]), tmp_path, ports["lb"]) as lb,
    ):
        lb.wait_output("stats socket listening", stream="stderr")
        yield {
            "lb": Running(lb, ports["lb"], sockets["lb"]),
            "haproxy": Running(haproxy, ports["haproxy"], sockets["haproxy"]),
        }


@pytest.mark.haproxy
def test_staples_like_haproxy_and_reloads(
    both: dict[str, Running], files: Files, pki: TestPKI
) -> None:
    seen = {name: stapled(s_client_status(r.port, pki)) for name, r in both.items()}
    assert seen["haproxy"]["OCSP Response Status"] == "successful (0x0)", seen
    assert seen["haproxy"]["Cert Status"] == "good", seen
    assert seen["lb"] == seen["haproxy"]  # the same response, field by field
    assert seen["lb"]["Serial Number"].lower().lstrip("0") == (
        f"{pki.server_issued.cert.serial_number:x}"
    )

    revoked = ocsp_response(pki, ocsp.OCSPCertStatus.REVOKED)
    files.ocsp.write_bytes(revoked)
    # lb re-reads the files on demand; HAProxy 2.6 takes the response over its socket.
    answer = socat(both["lb"].socket, "reload ssl")
    assert f"frontend tls bind 127.0.0.1:{both['lb'].port}: reloaded" in answer, answer
    answer = socat(
        both["haproxy"].socket, f"set ssl ocsp-response {base64.b64encode(revoked).decode()}"
    )
    assert "OCSP Response updated" in answer, answer
    seen = {name: stapled(s_client_status(r.port, pki)) for name, r in both.items()}
    assert seen["haproxy"]["Cert Status"] == "revoked", seen
    assert seen["lb"] == seen["haproxy"]
    assert "Revocation Time" in seen["lb"]


def test_reload_interval_picks_up_a_new_response(
    files: Files, pki: TestPKI, tmp_path: Path
) -> None:
    """With `tune.ssl.reload-interval 1s` (lb; HAProxy 2.6 has no file watcher) a replaced
    `.ocsp` is stapled within the interval, without a command."""
    files.ocsp.write_bytes(ocsp_response(pki))
    port = free_port()
    config = config_text(files.crt, port, tmp_path / "lb.sock", "    tune.ssl.reload-interval 1s\n")
    with run_lb(config, tmp_path, port):
        assert stapled(s_client_status(port, pki))["Cert Status"] == "good"
        files.ocsp.write_bytes(ocsp_response(pki, ocsp.OCSPCertStatus.REVOKED))
        status = ""
        for _ in range(50):  # 10 s at most
            status = stapled(s_client_status(port, pki)).get("Cert Status", "")
            if status == "revoked":
                break
            time.sleep(0.2)
        assert status == "revoked"


Maker = Callable[[TestPKI, datetime.datetime], bytes]
BAD_RESPONSES: dict[str, tuple[Maker, str, str]] = {
    # name: (how to make it, what lb logs, what HAProxy 2.6 warns)
    "expired": (
        lambda pki, now: ocsp_response(
            pki, this_update=now - 2 * ONE_DAY, next_update=now - ONE_DAY
        ),
        "OCSP response expired on",
        "OCSP single response: no longer valid",
    ),
    "other certificate": (
        lambda pki, now: ocsp_response(pki, certificate=pki.device(23).issued.cert),
        "OCSP response is for serial",
        "Certificate ID does not match certificate and issuer",
    ),
    "other issuer": (
        # The server's serial number, but the certificate id names the root as issuer.
        lambda pki, now: ocsp_response(pki, issuer=pki.root_issued),
        "certificate id names another issuer",
        "Certificate ID does not match certificate and issuer",
    ),
}


@pytest.mark.haproxy
@pytest.mark.parametrize("kind", list(BAD_RESPONSES))
def test_bad_response_refused_at_load(
    files: Files, pki: TestPKI, tmp_path: Path, kind: str
) -> None:
    make, ours_says, theirs_says = BAD_RESPONSES[kind]
    files.ocsp.write_bytes(make(pki, datetime.datetime.now(datetime.UTC)))
    ports = {"lb": free_port(), "haproxy": free_port()}
    configs = {
        name: config_text(files.crt, port, tmp_path / f"{name}.sock")
        for name, port in ports.items()
    }
    # -c: both warn, both still valid (the certificate is served without a staple).
    for name, executable in (("haproxy", HAPROXY), ("lb", str(VENV_BIN / "lb"))):
        path = tmp_path / f"{name}-check.cfg"
        path.write_text(configs[name])
        checked = subprocess.run(
            [executable, "-c", "-f", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert checked.returncode == 0, checked.stderr
        assert (theirs_says if name == "haproxy" else ours_says) in checked.stderr, checked.stderr
        if name == "lb":
            assert "[WARNING]" in checked.stderr and str(files.ocsp) in checked.stderr
    with (
        run_haproxy(configs["haproxy"], tmp_path, ports["haproxy"]),
        run_lb(configs["lb"], tmp_path, ports["lb"]) as lb,
    ):
        output = lb.wait_output("not stapled", 10)
        line = next(line for line in output.splitlines() if "not stapled" in line)
        assert str(files.ocsp) in line and ours_says in line, line
        for port in ports.values():
            text = s_client_status(port, pki)
            assert "OCSP response: no response sent" in text
            assert stapled(text) == {}
