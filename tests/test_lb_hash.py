"""`balance hash <expr>` (HAProxy 2.6) keeps a device on one broker node (issue 12): the
certificate's CN (`ssl_c_s_dn(cn)`) or the address (`src`), mapped by `hash-type consistent`,
so that a reconnect returns to the node that has the session and takeovers happen only when
a node goes away. lb and HAProxy 2.6 run the same configuration over real mutual TLS; their
mappings differ (lb avalanches every key on the ring), the behaviour must not.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.ports import free_port
from tests.harness import (
    HAPROXY,
    VENV_BIN,
    EchoBackend,
    client_context,
    haproxy_available,
    run_haproxy,
    run_lb,
    tls_roundtrip,
)
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(120)

ROUNDS = 3
DEVICES = 12


def hash_config(pki: TestPKI, port: int, backends: list[EchoBackend], expression: str) -> str:
    servers = "".join(
        f"    server node{index} 127.0.0.1:{backend.port}\n"
        for index, backend in enumerate(backends, 1)
    )
    return (
        "defaults\n    mode tcp\n"
        "    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n"
        "frontend mqtts\n"
        f"    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} ca-file {pki.intermediate} "
        f"ca-verify-file {pki.root} verify required\n"
        "    default_backend brokers\n"
        "backend brokers\n"
        f"    balance hash {expression}\n"
        "    hash-type consistent\n"
        f"{servers}"
    )


def landing(port: int, backends: list[EchoBackend], pki: TestPKI) -> dict[str, list[int]]:
    """For each device, the backend (1-based) each of its ROUNDS connections reached."""
    seen: dict[str, list[int]] = {}
    for _ in range(ROUNDS):
        for device in pki.devices(DEVICES):
            before = [len(backend.connections) for backend in backends]
            context = client_context(device.cert, device.key, pki.root)
            assert tls_roundtrip(port, context, b"hello") == b"hello"
            after = [len(backend.connections) for backend in backends]
            reached = [i for i, (a, b) in enumerate(zip(before, after, strict=True), 1) if b > a]
            assert len(reached) == 1, reached
            seen.setdefault(device.cn, []).append(reached[0])
    return seen


@contextlib.contextmanager
def three_backends() -> Iterator[list[EchoBackend]]:
    backends = [EchoBackend(proxy=False, name=f"node{i}") for i in range(1, 4)]
    try:
        yield backends
    finally:
        for backend in backends:
            backend.close()


def balancers() -> list[str]:
    return ["lb", "haproxy"] if haproxy_available() else ["lb"]


@pytest.mark.parametrize("balancer", balancers())
def test_a_device_returns_to_its_node_by_certificate_cn(
    balancer: str, pki: TestPKI, tmp_path: Path
) -> None:
    """12 devices, 3 rounds each: every device reaches the same node every time, and the
    devices are spread over more than one node."""
    port = free_port()
    with three_backends() as backends:
        config = hash_config(pki, port, backends, "ssl_c_s_dn(cn)")
        run = run_lb if balancer == "lb" else run_haproxy
        with run(config, tmp_path, port):
            seen = landing(port, backends, pki)
    assert all(len(set(nodes)) == 1 for nodes in seen.values()), seen
    assert len({nodes[0] for nodes in seen.values()}) > 1, seen


def test_src_hashes_every_device_of_one_address_to_one_node(pki: TestPKI, tmp_path: Path) -> None:
    """`balance hash src`: all devices here come from 127.0.0.1, so all reach one node."""
    port = free_port()
    with (
        three_backends() as backends,
        run_lb(hash_config(pki, port, backends, "src"), tmp_path, port),
    ):
        seen = landing(port, backends, pki)
    assert len({node for nodes in seen.values() for node in nodes}) == 1, seen


@pytest.mark.parametrize(
    ("expression", "accepted"),
    [
        ("ssl_c_s_dn(cn)", True),
        ("ssl_c_s_dn(CN)", True),
        ("src", True),
        ("req.hdr(host)", False),  # HAProxy 2.6 accepts it; lb refuses it by name
    ],
)
def test_lb_c_accepts_the_expressions_it_evaluates_and_names_the_rest(
    expression: str, accepted: bool, pki: TestPKI, tmp_path: Path
) -> None:
    with three_backends() as backends:
        config = tmp_path / "hash.cfg"
        config.write_text(hash_config(pki, free_port(), backends, expression))
        lb = subprocess.run(
            [str(VENV_BIN / "lb"), "-c", "-f", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if haproxy_available():
            haproxy = subprocess.run(
                [HAPROXY, "-c", "-f", str(config)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert haproxy.returncode == 0, haproxy.stdout + haproxy.stderr
    output = lb.stdout + lb.stderr
    if accepted:
        assert lb.returncode == 0, output
    else:
        assert lb.returncode != 0, output
        refusal = f"sample expression '{expression}' not supported: lb supports 'src' and "
        assert refusal + "'ssl_c_s_dn(cn)'" in output, output


@pytest.mark.skipif(not haproxy_available(), reason="HAProxy 2.6 is not installed")
def test_a_bare_consistent_hash_type_maps_every_device_as_haproxy(
    pki: TestPKI, tmp_path: Path
) -> None:
    """`hash-type consistent` without a function is sdbm with avalanche in HAProxy 2.6
    (cfgparse-listen.c); the ring's points depend on the server ids, not their ports, so lb
    and HAProxy send each device to the same node (before: lb left out the avalanche and
    sent all twelve to node 1)."""
    landed = {}
    for name, run in (("lb", run_lb), ("haproxy", run_haproxy)):
        port = free_port()
        with three_backends() as backends:
            directory = tmp_path / name
            directory.mkdir()
            with run(hash_config(pki, port, backends, "ssl_c_s_dn(cn)"), directory, port):
                landed[name] = {cn: nodes[0] for cn, nodes in landing(port, backends, pki).items()}
    assert landed["lb"] == landed["haproxy"], landed
    assert len(set(landed["lb"].values())) > 1, landed
