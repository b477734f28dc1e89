"""lb.tls_io.take_over: after a real TLS 1.3 handshake (lb's own server context, the
standard library's client on the system OpenSSL, or pyOpenSSL's), OpenSSL's connection is
freed and lb.tls_records carries the records; where it cannot (TLS 1.2, CCM, a negotiated
max_fragment_length) OpenSSL stays. Then through a running lb: openssl s_client asking for
KeyUpdates both ways, max_fragment_length, and a large transfer both ways with close_notify."""

from __future__ import annotations

import gc
import os
import select
import socket
import ssl
import subprocess
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
from OpenSSL import SSL

from bench.ports import free_port
from lb import tls_io
from lb.config import load_config
from lb.tls import BindContext, VerifyState, bind_tls
from tests.harness import EchoBackend, client_context, run_lb
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(60)


def bind_context(pki: TestPKI, tmp_path: Path, bind_extra: str = "") -> BindContext:
    path = tmp_path / "lb.cfg"
    path.write_text(
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


class Client:
    """The standard library's TLS client over memory BIOs."""

    def __init__(
        self, context: ssl.SSLContext, session: ssl.SSLSession | None = None, sni: str = "lb.local"
    ) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self.incoming, self.outgoing, server_hostname=sni, session=session
        )

    def step(self) -> bool:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def read_all(self) -> bytes:
        data = b""
        while True:
            try:
                chunk = self.tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                return data
            if not chunk:
                return data
            data += chunk


Step = Callable[[], bool]


def handshake(
    bind: BindContext,
    client_step: Step,
    client_out: Callable[[], bytes],
    client_in: Callable[[bytes], None],
) -> tuple[SSL.Connection, VerifyState, bytes]:
    """lb's server side as the data path drives it, against any client; returns the server
    connection, its VerifyState and what its completing step wrote (the tickets)."""
    server = SSL.Connection(bind.context, None)
    state = VerifyState()
    server.set_app_data(state)
    server.set_accept_state()
    for _ in range(20):
        client_step()
        data = client_out()
        if data:
            tls_io.feed(server, data)
        done = tls_io.handshake(server)
        output = tls_io.take_output(server)
        if done:
            return server, state, output
        if output:
            client_in(output)
    raise AssertionError("no handshake")


def take_over(
    bind: BindContext, server: SSL.Connection, state: VerifyState, tickets: bytes
) -> tuple[tls_io.Session, bytes] | None:
    return tls_io.take_over(
        server, tickets, state.client_secret, state.server_secret, bind.served_algorithms(server)
    )


def test_tls13_session_replaces_openssl(pki: TestPKI, tmp_path: Path) -> None:
    bind = bind_context(pki, tmp_path)
    device = pki.device(21)
    client = Client(client_context(device.chain, device.key, pki.root))
    done = False

    def step() -> bool:
        nonlocal done
        done = client.step()
        if done:
            client.tls.write(b"right behind Finished")  # the same flight as Finished
        return done

    server, state, tickets = handshake(bind, step, client.outgoing.read, client.incoming.write)
    names = tls_io.peer_name_parts(server)
    subjects = tls_io.verified_chain_subjects(server)
    assert len(subjects) == 3
    taken = take_over(bind, server, state, tickets)
    assert taken is not None
    session, unread = taken
    assert session.suite.name == server.get_cipher_name()
    # The unread bytes are records for the session; OpenSSL's connection goes.
    watch = weakref.ref(server)
    del server
    gc.collect()
    assert watch() is None
    assert session.open(unread) == b"right behind Finished"
    client.incoming.write(tickets)  # the tickets, then our first record: counted right
    client.incoming.write(session.seal(b"first from the server"))
    assert client.read_all() == b"first from the server"
    client.tls.write(os.urandom(16) * 5000)
    assert len(session.open(client.outgoing.read())) == 80000
    # What the log line, the PROXY header and close-revoked read, from the Session.
    assert tls_io.peer_name_parts(session) == names
    assert tls_io.verified_chain_subjects(session) == subjects
    certificates = tls_io.peer_certificates(session)
    assert device.cn in certificates[0].subject.rfc4514_string()
    assert len(certificates) == 4  # the leaf, then the verified chain (leaf, intermediate, root)
    assert tls_io.servername(session) == b"lb.local"
    assert tls_io.alpn(session) is None
    # close_notify, both ways
    try:
        client.tls.unwrap()
    except ssl.SSLWantReadError:
        pass
    assert session.open(client.outgoing.read()) == b""
    assert session.peer_closed
    client.incoming.write(session.close_notify())
    client.tls.unwrap()


def test_resumed_session_keeps_the_leaf_and_no_chain(pki: TestPKI, tmp_path: Path) -> None:
    bind = bind_context(pki, tmp_path)
    device = pki.device(22)
    context = client_context(device.chain, device.key, pki.root)
    first = Client(context)
    server, state, tickets = handshake(bind, first.step, first.outgoing.read, first.incoming.write)
    taken = take_over(bind, server, state, tickets)
    assert taken is not None
    session = taken[0]
    first.incoming.write(tickets + session.seal(b"x"))
    assert first.read_all() == b"x"
    second = Client(context, session=first.tls.session)
    server, state, tickets = handshake(
        bind, second.step, second.outgoing.read, second.incoming.write
    )
    assert tls_io.lib.SSL_session_reused(server._ssl)
    taken = take_over(bind, server, state, tickets)
    assert taken is not None
    resumed = taken[0]
    assert resumed.verified == ()
    assert tls_io.verified_chain_subjects(resumed) == ()
    assert tls_io.peer_name_parts(resumed) == tls_io.peer_name_parts(session)
    second.incoming.write(tickets + resumed.seal(b"resumed"))
    assert second.read_all() == b"resumed"


def test_tls12_keeps_openssl(pki: TestPKI, tmp_path: Path) -> None:
    bind = bind_context(pki, tmp_path)
    device = pki.device(23)
    context = client_context(device.chain, device.key, pki.root)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    client = Client(context)
    server, state, tickets = handshake(
        bind, client.step, client.outgoing.read, client.incoming.write
    )
    assert take_over(bind, server, state, tickets) is None


@pytest.mark.parametrize(
    ("suites", "kept"),
    [
        (b"TLS_CHACHA20_POLY1305_SHA256", False),
        (b"TLS_AES_128_GCM_SHA256", False),
        (b"TLS_AES_128_CCM_SHA256", True),  # no CCM in lb.tls_records: OpenSSL stays
    ],
)
def test_cipher_suites(pki: TestPKI, tmp_path: Path, suites: bytes, kept: bool) -> None:
    bind = bind_context(pki, tmp_path, f" ciphersuites {suites.decode()}")
    device = pki.device(24)
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_tls13_ciphersuites(suites)
    context.use_certificate_chain_file(str(device.chain))
    context.use_privatekey_file(str(device.key))
    client = SSL.Connection(context, None)
    client.set_connect_state()

    def step() -> bool:
        try:
            client.do_handshake()
        except SSL.WantReadError:
            return False
        return True

    def out() -> bytes:
        try:
            return client.bio_read(65536)
        except SSL.WantReadError:
            return b""

    server, state, tickets = handshake(bind, step, out, client.bio_write)
    assert server.get_cipher_name() == suites.decode()
    taken = take_over(bind, server, state, tickets)
    assert (taken is None) == kept
    if taken is not None:
        client.bio_write(tickets + taken[0].seal(b"pyopenssl"))
        assert client.recv(100) == b"pyopenssl"
        client.send(b"back")
        assert taken[0].open(client.bio_read(65536)) == b"back"


# -- through lb -----------------------------------------------------------------------------------


def lb_config(port: int, pki: TestPKI, backend: EchoBackend) -> str:
    bind = (
        f"ssl crt {pki.server_allinone} ca-file {pki.intermediate} "
        f"ca-verify-file {pki.root} verify required"
    )
    return f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{port} {bind}
    default_backend be
backend be
    server echo 127.0.0.1:{backend.port} send-proxy-v2
"""


def s_client(
    port: int, pki: TestPKI, number: int, *extra: str, messages: bool = False
) -> subprocess.Popen[bytes]:
    """openssl s_client with device `number`'s certificate; with `messages`, what it says
    on stderr (KEYUPDATE) comes with the data on stdout."""
    device = pki.device(number)
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(pki.root)]
    command += ["-cert", str(device.cert), "-key", str(device.key), "-verify_return_error"]
    command += [*extra, "-no_ign_eof"]  # after -quiet, which turns ign_eof on
    return subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if messages else subprocess.DEVNULL,
    )


class Output:
    """s_client's output, read from its pipe's descriptor. select() sees only what is still
    in the pipe, so no line may wait in a Python buffer between two waits (readline() on
    process.stdout reads ahead: a line it buffered was never seen again)."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        self.fd = process.stdout.fileno()
        self.pending = b""

    def until(self, wanted: bytes, timeout: float = 20.0) -> bytes:
        """The output up to and including the first `wanted` not returned before."""
        deadline = time.monotonic() + timeout
        while wanted not in self.pending:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(left, 0.0))
            assert ready, f"no {wanted!r} from s_client; got {self.pending[-2000:]!r}"
            chunk = os.read(self.fd, 65536)
            assert chunk, f"s_client ended before {wanted!r}: {self.pending[-2000:]!r}"
            self.pending += chunk
        end = self.pending.index(wanted) + len(wanted)
        seen, self.pending = self.pending[:end], self.pending[end:]
        return seen


def test_s_client_key_updates_both_ways(pki: TestPKI, tmp_path: Path) -> None:
    backend = EchoBackend()
    port = free_port()
    with run_lb(lb_config(port, pki, backend), tmp_path, port) as lb:
        # Interactive s_client: a line "k" sends a KeyUpdate, "K" one that asks for ours.
        client = s_client(port, pki, 25, "-tls1_3", messages=True)
        try:
            assert client.stdin is not None
            output = Output(client)
            client.stdin.write(b"before\n")
            client.stdin.flush()
            output.until(b"before\n")
            for command, text in ((b"k\n", b"after-k\n"), (b"K\n", b"after-K\n")):
                # One read of s_client's is one command: the text goes after it is done.
                client.stdin.write(command)
                client.stdin.flush()
                output.until(b"KEYUPDATE\n")
                client.stdin.write(text)
                client.stdin.flush()
                output.until(text)
            client.stdin.close()  # close_notify: lb passes the EOF on, the echo ends
            assert client.wait(20) == 0
        finally:
            client.kill()
            client.wait(5)
        assert "TLS error" not in lb.output()
    received = backend.wait_connections(1)[0].data
    assert received == b"before\nafter-k\nafter-K\n"
    backend.close()


@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_max_fragment_length_keeps_openssl(pki: TestPKI, tmp_path: Path, version: str) -> None:
    """Records of at most 512 bytes each way: OpenSSL stays (TLS 1.2 keeps it anyway), and
    none of the echo is lost (SSL_write takes one record at a time then, tls_io.encrypt)."""
    backend = EchoBackend()
    port = free_port()
    payload = (b"0123456789" * 300)[:2999] + b"\n"
    with run_lb(lb_config(port, pki, backend), tmp_path, port):
        client = s_client(port, pki, 26, version, "-maxfraglen", "512", "-quiet")
        try:
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write(payload)
            client.stdin.flush()
            echoed = b""
            while len(echoed) < len(payload):
                ready, _, _ = select.select([client.stdout], [], [], 20)
                assert ready, f"echo stopped at {len(echoed)} bytes"
                chunk = os.read(client.stdout.fileno(), 65536)
                assert chunk, f"s_client ended at {len(echoed)} bytes"
                echoed += chunk
            assert echoed == payload
            client.stdin.close()
            assert client.wait(20) == 0
        finally:
            client.kill()
            client.wait(5)
    backend.close()


def test_large_transfer_and_close_notify(pki: TestPKI, tmp_path: Path) -> None:
    backend = EchoBackend()
    port = free_port()
    device = pki.device(27)
    payload = os.urandom(1 << 20)
    with run_lb(lb_config(port, pki, backend), tmp_path, port):
        context = client_context(device.chain, device.key, pki.root)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=20) as raw,
            context.wrap_socket(raw, server_hostname="lb.local") as tls,
        ):
            assert tls.version() == "TLSv1.3"
            tls.sendall(payload)
            received = bytearray()
            while len(received) < len(payload):
                chunk = tls.recv(1 << 16)
                assert chunk
                received += chunk
            assert received == payload
            tls.unwrap()  # our close_notify, then lb's (after the backend's EOF)
    assert bytes(backend.wait_connections(1)[0].data) == payload
    backend.close()


def test_tampered_record_is_refused_with_an_alert(pki: TestPKI, tmp_path: Path) -> None:
    backend = EchoBackend()
    port = free_port()
    device = pki.device(28)
    with run_lb(lb_config(port, pki, backend), tmp_path, port) as lb:
        client = Client(client_context(device.chain, device.key, pki.root))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            while not client.step():
                raw.sendall(client.outgoing.read())
                client.incoming.write(raw.recv(65536))
            raw.sendall(client.outgoing.read())  # the client's Finished
            client.tls.write(b"fine")
            raw.sendall(client.outgoing.read())
            received = b""
            while b"fine" not in received:
                client.incoming.write(raw.recv(65536))
                received += client.read_all()
            client.tls.write(b"tampered")
            record = bytearray(client.outgoing.read())
            record[-1] ^= 0x01
            raw.sendall(record)
            answer = b""
            while chunk := raw.recv(65536):  # lb's alert, then the end of the connection
                answer += chunk
            client.incoming.write(answer)
            with pytest.raises(ssl.SSLError, match=r"(?i)bad.record.mac"):
                client.read_all()
        lb.wait_output("TLS error from client: record failed authentication", 10)
    assert bytes(backend.wait_connections(1)[0].data) == b"fine"
    backend.close()
