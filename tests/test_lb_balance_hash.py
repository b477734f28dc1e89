"""`balance hash <expression>` with `hash-type map-based|consistent`, beside HAProxy 2.6.

The same haproxy.cfg text runs in lb and in HAProxy, with three echo servers that greet with
their name; 30 devices (their own certificates, CN device-001..030) connect through each,
and `src` is tried from 30 source addresses (127.0.0.10...).

What is comparable, and asserted: with `hash-type map-based` the server is a pure function
of the key (the sdbm hash of the sample's bytes, modulo the total weight, into HAProxy's
interleaved weight table), so lb must pick exactly HAProxy's server for every key, for
`ssl_c_s_dn(cn)` and for `src`. With `hash-type consistent` the server depends on the
ring's points, built as lb_chash.c builds them, and on the lookup of the nearest one; the
choice is expected but not promised to match HAProxy's, so the test asserts what consistent
hashing is for (a device reconnecting lands on the same server; when a server goes down only
its own devices move) and reports how many keys agree with HAProxy (`-s`) without asserting.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from bench.ports import free_port
from lb.balance.source import hash_crc32, hash_djb2, hash_sdbm
from lb.config import load_config_text
from tests.harness import EchoBackend, client_context, haproxy_available, run_haproxy, run_lb
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(180)

SERVERS = ("s1", "s2", "s3")
DEVICES = 30


def _config(pki: TestPKI, port: int, backends: dict[str, EchoBackend], balance: str) -> str:
    servers = "".join(f"    server {n} 127.0.0.1:{b.port}\n" for n, b in backends.items())
    return (
        "global\n    maxconn 200\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n"
        f"frontend mqtts\n    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} "
        f"ca-file {pki.intermediate} ca-verify-file {pki.root} verify required\n"
        "    default_backend brokers\n"
        f"backend brokers\n{balance}{servers}"
    )


def _served_by(port: int, context: ssl.SSLContext, source: str = "127.0.0.1") -> str:
    """The greeting of the server lb or HAProxy chose for one TLS session."""
    with (
        socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(source, 0)
        ) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        greeting = b""
        while not greeting.endswith(b"\n"):
            chunk = tls.recv(64)
            if not chunk:
                break
            greeting += chunk
    return greeting.decode().strip()


def _picks(pki: TestPKI, port: int, expression: str) -> dict[str, str]:
    """Key -> server name for every device (cn) or source address (src)."""
    picks: dict[str, str] = {}
    if expression == "ssl_c_s_dn(cn)":
        for number in range(1, DEVICES + 1):
            device = pki.device(number)
            context = client_context(device.cert, device.key, pki.root)
            picks[f"device-{number:03d}"] = _served_by(port, context)
    else:
        device = pki.device(1)
        context = client_context(device.cert, device.key, pki.root)
        for host in range(10, 10 + DEVICES):
            source = f"127.0.0.{host}"
            picks[source] = _served_by(port, context, source)
    return picks


@pytest.fixture
def backends() -> dict[str, EchoBackend]:
    made = {n: EchoBackend(proxy=False, name=n, greeting=f"{n}\n".encode()) for n in SERVERS}
    yield made  # type: ignore[misc]
    for backend in made.values():
        backend.close()


def _both(
    pki: TestPKI, tmp_path: Path, backends: dict[str, EchoBackend], balance: str, expression: str
) -> tuple[dict[str, str], dict[str, str]]:
    ports = {"lb": free_port(), "haproxy": free_port()}
    with (
        run_lb(_config(pki, ports["lb"], backends, balance), tmp_path, ports["lb"]),
        run_haproxy(_config(pki, ports["haproxy"], backends, balance), tmp_path, ports["haproxy"]),
    ):
        return _picks(pki, ports["lb"], expression), _picks(pki, ports["haproxy"], expression)


needs_haproxy = pytest.mark.skipif(not haproxy_available(), reason="haproxy 2.6 not installed")


@needs_haproxy
@pytest.mark.haproxy
@pytest.mark.parametrize("expression", ["ssl_c_s_dn(cn)", "src"])
@pytest.mark.parametrize("function", ["", " djb2", " crc32 avalanche"])
def test_map_based_picks_haproxys_server(
    pki: TestPKI,
    tmp_path: Path,
    backends: dict[str, EchoBackend],
    expression: str,
    function: str,
) -> None:
    balance = f"    balance hash {expression}\n    hash-type map-based{function}\n"
    lb_picks, haproxy_picks = _both(pki, tmp_path, backends, balance, expression)
    assert lb_picks == haproxy_picks
    assert len(set(lb_picks.values())) == len(SERVERS)  # the keys do spread


@needs_haproxy
@pytest.mark.haproxy
@pytest.mark.parametrize("expression", ["ssl_c_s_dn(cn)", "src"])
def test_consistent_is_sticky_and_moves_only_a_lost_servers_keys(
    pki: TestPKI,
    tmp_path: Path,
    backends: dict[str, EchoBackend],
    expression: str,
) -> None:
    balance = f"    balance hash {expression}\n    hash-type consistent sdbm avalanche\n"
    port = free_port()
    with run_lb(_config(pki, port, backends, balance), tmp_path, port):
        first = _picks(pki, port, expression)
        assert _picks(pki, port, expression) == first  # every key reconnects to its server
    assert len(set(first.values())) >= 2
    # s3 goes away: only the keys that were on it move, and they move to the others.
    lost = {n: b for n, b in backends.items() if n != "s3"}
    port = free_port()
    with run_lb(_config(pki, port, lost, balance), tmp_path, port, name="lb-without-s3"):
        after = _picks(pki, port, expression)
    for key, server in first.items():
        if server != "s3":
            assert after[key] == server, (key, first, after)
        else:
            assert after[key] != "s3"
    # Beside HAProxy: reported, not asserted (see the module docstring).
    ports = free_port()
    with run_haproxy(_config(pki, ports, backends, balance), tmp_path, ports):
        haproxy_first = _picks(pki, ports, expression)
    same = sum(1 for key in first if first[key] == haproxy_first[key])
    print(f"consistent {expression}: {same} of {len(first)} keys on HAProxy's server")


def test_hash_functions_are_haproxys() -> None:
    # src/hash.c's loops over `const char *`: bytes above 127 count as negative.
    assert hash_sdbm(b"") == 0
    assert hash_sdbm(b"a") == 97
    assert hash_sdbm(b"ab") == (98 + 97 * 65599) & 0xFFFFFFFF
    assert hash_sdbm(b"\xc0") == (-64) & 0xFFFFFFFF
    assert hash_djb2(b"") == 5381
    assert hash_djb2(b"a") == 5381 * 33 + 97
    assert hash_crc32(b"123456789") == 0xCBF43926  # the CRC-32 check value


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("    balance hash\n", "'balance' : 'hash' expects one sample expression"),
        (
            "    balance hash req.hdr(host)\n",
            "'balance hash' : sample expression 'req.hdr(host)' not supported",
        ),
        ("    balance hash srcc\n", "did you mean 'src'?"),
        ("    balance hash src,lower\n", "converter 'lower' in 'src,lower' not supported"),
        (
            "    balance hash src\n    hash-type consistent wt6\n",
            "'hash-type' : hash function 'wt6' not supported",
        ),
        (
            "    balance hash src\n    hash-type consistent sdbm sideways\n",
            "unknown hash modifier 'sideways'",
        ),
        ("    balance source src\n", "'source' takes no argument"),
    ],
)
def test_config_refuses_what_lb_cannot_hash(lines: str, message: str) -> None:
    text = (
        "defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1s\n"
        f"    timeout server 1s\nbackend b\n{lines}    server s1 127.0.0.1:1\n"
    )
    result = load_config_text(text)
    assert result.config is None
    report = "\n".join(str(d) for d in result.diagnostics)
    assert message in report
    assert "[<string>:" in report  # file:line


def test_config_reads_hash_and_defaults_inherit_it() -> None:
    text = (
        "defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1s\n"
        "    timeout server 1s\n    balance hash ssl_c_s_dn(CN)\n"
        "    hash-type consistent djb2 avalanche\n"
        "backend b\n    server s1 127.0.0.1:1\n"
        "backend rr\n    balance roundrobin\n    server s1 127.0.0.1:1\n"
    )
    result = load_config_text(text)
    assert result.config is not None, result.diagnostics
    hashed, plain = result.config.backends
    assert (hashed.balance, hashed.hash_expr, hashed.hash_type) == (
        "hash",
        "ssl_c_s_dn(cn)",
        "consistent",
    )
    assert (hashed.hash_function, hashed.hash_avalanche) == ("djb2", True)
    assert (plain.balance, plain.hash_expr) == ("roundrobin", None)
