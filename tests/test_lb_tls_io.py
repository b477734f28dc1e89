"""lb.tls_io beyond the data path: HAProxy's tls-ticket-keys file format, the session cache
size and the ticket key reaching pyOpenSSL's OpenSSL through SSL_CTX_ctrl, dropping a
client's presented chain, and TLS 1.2 / 1.3 resumption across two worker processes that
share a ticket key file."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from OpenSSL import SSL, crypto

from bench.ports import free_port
from lb import tls_io
from lb.config import load_config
from lb.tls import BindContext, bind_tls
from tests.harness import VENV_BIN, EchoBackend, client_context, start_process
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(120)


def _key(number: int, size: int = 80) -> bytes:
    return bytes((number * 7 + i) % 256 for i in range(size))


def _key_file(path: Path, keys: list[bytes], extra: str = "") -> Path:
    path.write_text(extra + "".join(base64.b64encode(k).decode() + "\n" for k in keys))
    return path


# -- the key file ------------------------------------------------------------------------------


def test_penultimate_80_byte_key_reordered_for_openssl(tmp_path: Path) -> None:
    keys = [_key(1), _key(2), _key(3)]
    path = _key_file(tmp_path / "keys", keys, extra="# rotated daily\n\n")
    loaded = tls_io.load_ticket_keys(path)
    name, aes, hmac = keys[1][:16], keys[1][16:48], keys[1][48:]
    # HAProxy's file: name, AES key, HMAC key; OpenSSL's blob: name, HMAC key, AES key.
    assert loaded == name + hmac + aes
    assert len(loaded) == tls_io.OPENSSL_TICKET_KEY_SIZE


def test_48_byte_keys_are_stretched_the_same_way_everywhere(tmp_path: Path) -> None:
    keys = [_key(1, 48), _key(2, 48), _key(3, 48), _key(4, 48)]
    path = _key_file(tmp_path / "keys", keys)
    loaded = tls_io.load_ticket_keys(path)
    assert len(loaded) == 80
    assert loaded == tls_io.load_ticket_keys(_key_file(tmp_path / "copy", keys))
    stretched = hashlib.sha512(b"lb tls-ticket-keys" + keys[2]).digest()[:64]
    assert loaded[:16] == keys[2][:16]
    assert loaded[16:48] == stretched[32:]  # HMAC half (OpenSSL order)
    assert loaded[48:] == stretched[:32]  # AES half


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        (["not base64 at all!"], "line 1: not base64"),
        ([base64.b64encode(b"x" * 64).decode()], "line 1: a key is 48 or 80 bytes, not 64"),
        (
            [base64.b64encode(_key(1)).decode(), base64.b64encode(_key(2, 48)).decode()],
            "line 2: 48- and 80-byte keys cannot be mixed",
        ),
        ([base64.b64encode(_key(1)).decode()] * 2, "2 keys; at least 3 are needed"),
        ([], "0 keys; at least 3 are needed"),
    ],
)
def test_bad_key_files_are_refused_with_the_line(
    tmp_path: Path, lines: list[str], reason: str
) -> None:
    path = tmp_path / "keys"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(tls_io.TicketKeyError) as caught:
        tls_io.load_ticket_keys(path)
    assert reason in caught.value.reason
    assert str(path) in str(caught.value)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(tls_io.TicketKeyError, match="No such file"):
        tls_io.load_ticket_keys(tmp_path / "absent")


# -- SSL_CTX_ctrl in pyOpenSSL's OpenSSL ---------------------------------------------------------


def test_ctrl_is_found_and_validated() -> None:
    # If this fails, tune.ssl.cachesize and tls-ticket-keys silently fall back (a warning):
    # the symbol lookup did not survive a cryptography/OpenSSL upgrade.
    assert tls_io.available()


def test_cache_size_and_ticket_key_reach_the_context() -> None:
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    assert tls_io.session_cache_size(context) == tls_io.OPENSSL_DEFAULT_CACHE_SIZE
    assert tls_io.set_session_cache_size(context, 1234)
    assert tls_io.session_cache_size(context) == 1234
    key = _key(9)
    assert tls_io.set_ticket_key(context, key)
    assert tls_io.ticket_key(context) == key
    with pytest.raises(ValueError, match="80 bytes"):
        tls_io.set_ticket_key(context, key[:48])


def _bind_context(pki: TestPKI, tmp_path: Path, global_lines: str, bind_extra: str) -> BindContext:
    path = tmp_path / "lb.cfg"
    path.write_text(
        f"global\n{global_lines}"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 5s\n"
        "    timeout server 5s\n"
        f"frontend fe\n    bind 127.0.0.1:{free_port()} ssl crt {pki.server_allinone} "
        f"ca-file {pki.intermediate} ca-verify-file {pki.root} verify required{bind_extra}\n"
        "    default_backend be\n"
        "backend be\n    server s1 127.0.0.1:1\n"
    )
    result = load_config([str(path)])
    assert result.config is not None, result.diagnostics
    frontend = result.config.frontends[0]
    return BindContext(bind_tls(frontend.binds[0], result.config.global_, frontend.name))


def test_config_applies_cache_size_and_ticket_keys(pki: TestPKI, tmp_path: Path) -> None:
    keys = _key_file(tmp_path / "keys", [_key(1), _key(2), _key(3)])
    bind = _bind_context(pki, tmp_path, "    tune.ssl.cachesize 777\n", f" tls-ticket-keys {keys}")
    assert tls_io.session_cache_size(bind.context) == 777
    assert tls_io.ticket_key(bind.context) == tls_io.load_ticket_keys(keys)


# -- dropping the presented chain ------------------------------------------------------------------


def _handshake(bind: BindContext, client: ssl.SSLContext) -> SSL.Connection:
    """An in-memory handshake and one message: pyOpenSSL server, stdlib client."""
    server = SSL.Connection(bind.context, None)
    server.set_accept_state()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client.wrap_bio(incoming, outgoing, server_hostname="localhost")
    for _ in range(10):
        try:
            tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        if outgoing.pending:
            server.bio_write(outgoing.read())
        try:
            server.do_handshake()
        except SSL.WantReadError:
            pass
        while True:
            try:
                incoming.write(server.bio_read(65536))
            except SSL.WantReadError:
                break
        if done:
            break
    tls.write(b"ping")
    server.bio_write(outgoing.read())
    assert server.recv(16) == b"ping"
    return server


def test_drop_peer_chain_keeps_leaf_and_verified_chain(pki: TestPKI, tmp_path: Path) -> None:
    bind = _bind_context(pki, tmp_path, "", "")
    device = pki.device(3)
    server = _handshake(bind, client_context(device.chain, device.key, pki.root))
    presented = server.get_peer_cert_chain() or []
    verified = server.get_verified_chain() or []
    assert len(presented) == 1  # the intermediate; OpenSSL keeps the leaf apart
    assert len(verified) == 3
    assert tls_io.drop_peer_chain(server) == len(presented)
    assert server.get_peer_cert_chain() in (None, [])
    certificate = server.get_peer_certificate()
    assert certificate is not None
    assert "device-003" in certificate.to_cryptography().subject.rfc4514_string()
    still = server.get_verified_chain() or []
    assert [c.to_cryptography().subject for c in still] == [
        c.to_cryptography().subject for c in verified
    ]
    assert tls_io.drop_peer_chain(server) == 0


# -- the handshake's callbacks ---------------------------------------------------------------


def _refusal(context: SSL.Context, client: ssl.SSLContext) -> SSL.Error | None:
    """An in-memory handshake; the server's error, or None when it completed."""
    server = SSL.Connection(context, None)
    server.set_accept_state()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client.wrap_bio(incoming, outgoing, server_hostname="localhost")
    for _ in range(10):
        with contextlib.suppress(ssl.SSLError):
            tls.do_handshake()
        if outgoing.pending:
            server.bio_write(outgoing.read())
        try:
            server.do_handshake()
            return None
        except SSL.WantReadError:
            pass
        except SSL.Error as error:
            return error
        with contextlib.suppress(SSL.WantReadError):
            incoming.write(server.bio_read(65536))
    raise AssertionError("the handshake neither completed nor failed")


def test_the_verify_callback_hears_only_of_failures(
    pki: TestPKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """tls_io.set_verify: certificates OpenSSL verified never reach the Python callback; one
    that failed does, with its connection, certificate, error and depth, and the answer
    decides; a callback that raises refuses the certificate, with a log line."""
    context = _bind_context(pki, tmp_path, "", "").context
    heard: list[tuple[SSL.Connection, str, int, int]] = []
    answer: list[bool | None] = [False]

    def failed(connection: SSL.Connection, certificate: crypto.X509, code: int, depth: int) -> bool:
        subject = certificate.to_cryptography().subject.rfc4514_string()
        heard.append((connection, subject, code, depth))
        if answer[0] is None:
            raise RuntimeError("broken callback")
        return answer[0]

    mode = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    tls_io.set_verify(context, mode, failed)
    device, expired = pki.device(4), pki.expired
    assert _refusal(context, client_context(device.chain, device.key, pki.root)) is None
    assert heard == []
    assert _refusal(context, client_context(expired.chain, expired.key, pki.root)) is not None
    [(connection, subject, code, depth)] = heard
    assert isinstance(connection, SSL.Connection)
    assert "CN=device-expired" in subject
    assert (code, depth) == (10, 0)  # X509_V_ERR_CERT_HAS_EXPIRED, the leaf
    answer[0] = True
    assert _refusal(context, client_context(expired.chain, expired.key, pki.root)) is None
    answer[0] = None
    with caplog.at_level(logging.ERROR, logger="lb.tls_io"):
        assert _refusal(context, client_context(expired.chain, expired.key, pki.root)) is not None
    assert "certificate verify callback failed" in caplog.text
    assert "broken callback" in caplog.text


def test_the_keylog_callback_hears_only_its_labels(pki: TestPKI, tmp_path: Path) -> None:
    context = _bind_context(pki, tmp_path, "", "").context
    lines: list[bytes] = []
    tls_io.set_keylog(context, (b"SERVER_TRAFFIC_SECRET_0",), lambda _c, line: lines.append(line))
    device = pki.device(5)
    assert _refusal(context, client_context(device.chain, device.key, pki.root)) is None
    [line] = lines
    label, random, secret = line.split(b" ")
    assert label == b"SERVER_TRAFFIC_SECRET_0"
    assert len(bytes.fromhex(random.decode())) == 32
    assert len(bytes.fromhex(secret.decode())) in (32, 48)


# -- resumption across two workers -------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _serving_process(pids: list[int], lb_port: int, client_port: int) -> int:
    """Which of `pids` holds the accepted socket of the connection from `client_port`.

    The socket's inode comes from `ss` (sock_diag, filtered in the kernel), not from
    /proc/net/tcp, which the kernel writes out across several read() calls on a machine
    with many sockets, each resuming at an offset into its hash table (a socket can be
    skipped when others come and go in between); a few tries more, bounded, cover an
    interrupted dump. This lookup once found nothing in loaded runs; should it again, the
    failure says what it saw."""
    seen = ""
    for _ in range(20):
        seen = subprocess.run(
            [
                "ss",
                "-Htne",
                "state",
                "established",
                f"( sport = :{lb_port} and dport = :{client_port} )",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        match = re.search(r"\bino:(\d+)", seen)
        if match is not None:
            owner = _holder(pids, f"socket:[{match.group(1)}]")
            if owner is not None:
                return owner
        time.sleep(0.05)
    sockets = {pid: _socket_links(pid) for pid in pids}
    raise AssertionError(
        f"no worker of {pids} holds the connection 127.0.0.1:{lb_port} <- :{client_port}; "
        f"ss: {seen.strip() or 'nothing'}; the workers' sockets: {sockets}"
    )


def _socket_links(pid: int) -> list[str]:
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError as error:
        return [f"({error})"]
    links = []
    for descriptor in descriptors:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{descriptor}")
        except OSError:
            continue
        if link.startswith("socket:"):
            links.append(link)
    return links


def _holder(pids: list[int], link: str) -> int | None:
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                if os.readlink(f"/proc/{pid}/fd/{descriptor}") == link:
                    return pid
            except OSError:
                continue
    return None


@pytest.fixture(params=["tls-ticket-keys file", "key shared by the master"])
def two_workers(
    pki: TestPKI, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[int, list[int]]]:
    """lb with nbthread 2 (two worker processes sharing the listening socket), with a
    tls-ticket-keys file or without one (then the master's key is shared)."""
    keys = _key_file(tmp_path / "ticket.keys", [_key(1), _key(2), _key(3)])
    ticket_keys = f" tls-ticket-keys {keys}" if request.param == "tls-ticket-keys file" else ""
    backend = EchoBackend(proxy=False)
    port = free_port()
    path = tmp_path / "lb.cfg"
    path.write_text(
        "global\n    nbthread 2\n    hard-stop-after 5s\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n"
        f"frontend fe\n    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} "
        f"ca-file {pki.intermediate} ca-verify-file {pki.root} verify required"
        f"{ticket_keys}\n"
        "    default_backend be\n"
        f"backend be\n    server s1 127.0.0.1:{backend.port}\n"
    )
    master = start_process([str(VENV_BIN / "lb"), "-f", str(path)], tmp_path, "master")
    try:
        master.wait_output("ready", timeout=30)
        workers: list[int] = []
        for _ in range(100):
            workers = _children(master.popen.pid)
            if len(workers) == 2:
                break
            time.sleep(0.1)
        assert len(workers) == 2, master.output()
        yield port, workers
    finally:
        master.stop()
        backend.close()


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_tickets_resume_on_either_worker(
    pki: TestPKI, two_workers: tuple[int, list[int]], version: str
) -> None:
    port, workers = two_workers
    device = pki.device(4)
    context = client_context(device.chain, device.key, pki.root)
    if version == "1.2":
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    session: ssl.SSLSession | None = None
    issued_by: int | None = None
    served: list[tuple[int, bool]] = []
    crossed = 0
    for _ in range(60):  # bounded: SO_REUSEPORT spreads by hash, both appear quickly
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
        ):
            tls.sendall(b"ping")
            assert tls.recv(16) == b"ping"
            worker = _serving_process(workers, port, tls.getsockname()[1])
            served.append((worker, tls.session_reused))
            if tls.session_reused and issued_by is not None and issued_by != worker:
                crossed += 1
            session = tls.session
            issued_by = worker
        if len({w for w, _ in served}) == 2 and crossed >= 2:
            break
    assert served[0][1] is False  # the first one is a full handshake
    assert all(reused for _, reused in served[1:]), served
    assert len({w for w, _ in served}) == 2, served
    assert crossed >= 1, served
