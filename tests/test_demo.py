"""The demo end to end (``python -m demo --fast``), and the configs it runs against its topology.

The demo runs the real processes (configs/haproxy.cfg, configs/broker-N.toml): the PKI in
configs/certs, three clustered broker nodes, lb, twenty devices. The test moves it to free
ports with ``--base-port`` (the seed's 1883 or 8091 may well be taken on this machine, by
Debian's mosquitto for one) and reads the summary it prints, as a person would: the devices
each node holds with the real address and CN it learned from the PROXY header, every message
delivered, and the revoked and rogue devices refused by lb with the reason from lb's own log
line. A taken port is named, with who holds it, before anything starts.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from bench.ports import free_port_block
from broker.config import load_config as load_broker_config
from demo import pki, ports, summary, topology
from lb.config import load_config as load_lb_config

ROOT = topology.ROOT
CERTS = ROOT / topology.CERTS_DIR

NODE_HEADING = re.compile(r"^(?P<node>broker-\d): (?P<count>\d+) devices \((?P<note>[^)]*)")
DEVICE_LINE = re.compile(
    r"^  (?P<device>device-\d{4})\s+(?P<address>\S+)\s+CN=(?P<cn>\S+)\s+id=(?P<id>\S+)\s+"
    r"sent (?P<sent>\d+)\s+"
    r"received (?P<received>\d+)/(?P<expected>\d+) from (?P<sender>device-\d{4})$"
)
MESSAGES_LINE = re.compile(
    r"^messages: (?P<sent>\d+) sent, (?P<received>\d+) received of (?P<expected>\d+), "
    r"(?P<crossed>\d+) crossed nodes: (?P<verdict>.+)$"
)
REFUSAL_LINE = re.compile(
    r"^  (?P<device>\S+) \(client id (?P<client_id>\S+)\) from (?P<address>\S+): (?P<reason>.+)$"
)


@pytest.fixture(scope="module")
def demo_pki() -> Path:
    """The demo's PKI in configs/certs (reused when valid), as ``./dev demo`` makes it."""
    assert (
        pki.main(
            ["--dir", str(CERTS), "--devices", str(topology.PKI_DEVICES)]
            + [arg for name in topology.SERVER_DNS for arg in ("--dns", name)]
        )
        == 0
    )
    return CERTS


def test_haproxy_cfg_is_the_demo_topology() -> None:
    config = load_lb_config([ROOT / topology.LB_CONFIG], environ={}).config_or_raise()
    metrics, frontend = config.frontends
    assert frontend.name == topology.LB_FRONTEND
    (metrics_bind,) = metrics.binds
    assert (metrics_bind.host, metrics_bind.port) == (topology.LOCAL_HOST, topology.PROMETHEUS_PORT)
    assert metrics.http_request_use_service == "prometheus-exporter"
    (bind,) = frontend.binds
    assert (bind.host, bind.port, bind.verify) == (
        topology.LOCAL_HOST,
        topology.LB_PORT,
        "required",
    )
    assert bind.crt == (str(CERTS / topology.SERVER_ALLINONE),)
    assert bind.ca_file == str(CERTS / f"{topology.INTERMEDIATE_CA}.pem")
    assert bind.ca_verify_file == str(CERTS / f"{topology.ROOT_CA}.pem")
    assert bind.crl_file == str(CERTS / topology.CRL)
    backend = config.backend(topology.LB_BACKEND)
    assert backend.balance == "roundrobin"
    assert [(s.name, s.host, s.port) for s in backend.servers] == [
        (node.server, topology.LOCAL_HOST, node.mqtt_port) for node in topology.NODES
    ]
    for server in backend.servers:
        assert server.send_proxy_v2 and server.check_send_proxy
        assert "cert-cn" in server.proxy_v2_options  # the brokers learn the CN


@pytest.mark.parametrize("node", topology.NODES, ids=lambda node: node.name)
def test_broker_configs_are_the_demo_topology(node: topology.Node) -> None:
    config = load_broker_config(ROOT / node.config)
    assert config.node_name == node.name
    (listener,) = config.listeners
    assert (listener.host, listener.port) == (topology.LOCAL_HOST, node.mqtt_port)
    assert listener.proxy_protocol and listener.peer_cert_as_username == "cn"
    assert config.admin is not None
    assert (config.admin.host, config.admin.port) == (topology.LOCAL_HOST, node.admin_port)
    cluster = config.cluster
    assert cluster is not None and cluster.port == node.cluster_port
    assert sorted(cluster.peers) == [
        (other.name, topology.LOCAL_HOST, other.cluster_port)
        for other in topology.NODES
        if other is not node
    ]
    assert cluster.ssl_options is not None
    assert cluster.ssl_options.certfile == CERTS / f"{node.certificate}.pem"
    assert cluster.ssl_options.keyfile == CERTS / f"{node.certificate}-key.pem"
    assert cluster.ssl_options.cacertfile == CERTS / f"{topology.ROOT_CA}.pem"


@pytest.mark.parametrize("node", topology.NODES, ids=lambda node: node.name)
def test_broker_configs_are_what_the_topology_renders(node: topology.Node) -> None:
    """bench/fleet.py renders K-node clusters with topology.broker_config: for the demo's three
    nodes it says exactly what configs/broker-N.toml says."""
    rendered = tomllib.loads(topology.broker_config(node, topology.NODES))
    assert rendered == tomllib.loads((ROOT / node.config).read_text())


def test_more_nodes_keep_the_seed_server_names() -> None:
    six = topology.nodes(6)
    assert six[:3] == topology.NODES
    assert [n.server for n in six[3:]] == ["emqx-4", "emqx-5", "emqx-6"]
    assert len({n.mqtt_port for n in six} | {n.admin_port for n in six}) == 12


def test_lb_checks_the_demo_config_without_warnings(demo_pki: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lb", "-c", "-f", topology.LB_CONFIG],
        cwd=ROOT,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "Configuration file is valid" in result.stdout


def test_demo_pki_is_reused_when_valid(demo_pki: Path) -> None:
    assert pki.problems(demo_pki, topology.PKI_DEVICES, topology.SERVER_DNS) == []
    # A device too many is a PKI that cannot serve: it would be made anew.
    assert pki.problems(demo_pki, topology.PKI_DEVICES + 1, topology.SERVER_DNS)


def _run_demo(*arguments: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "demo", *arguments],
        cwd=ROOT,
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
    )


def test_a_taken_port_is_named_with_its_holder_before_anything_starts() -> None:
    base = free_port_block(topology.BASE_PORT_SPAN)
    where = topology.layout(base)
    taken = where.nodes[1].mqtt_port
    with socket.socket() as squatter:
        # As the demo's own listeners: a connection of the port's left in TIME_WAIT by an
        # earlier test does not stop it (seen in CI: EADDRINUSE on this bind).
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((topology.LOCAL_HOST, taken))
        squatter.listen()
        result = _run_demo("--base-port", str(base), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if "FAILED" in line]
    assert f"port(s) in use on {topology.LOCAL_HOST}: {taken} (" in line
    assert f"(pid {os.getpid()})" in line  # this test holds it
    assert f"The demo needs {ports.ranges(where.ports())}" in line
    assert "--base-port" in line
    assert "stopped" not in result.stdout  # nothing was started


def test_moved_configs_differ_in_ports_only(demo_pki: Path) -> None:
    base = free_port_block(topology.BASE_PORT_SPAN)
    where = topology.layout(base)
    moved = ports.write_moved_configs(where)
    assert [path.relative_to(ROOT).as_posix() for path in moved] == [
        where.lb_config,
        *(node.config for node in where.nodes),
    ]
    config = load_lb_config([ROOT / where.lb_config], environ={}).config_or_raise()
    _, frontend = config.frontends
    assert frontend.binds[0].port == where.lb_port
    assert frontend.binds[0].crt == (
        str(ROOT / topology.MOVED_CONFIG_DIR / "certs" / topology.SERVER_ALLINONE),
    )
    backend = config.backend(topology.LB_BACKEND)
    assert [s.port for s in backend.servers] == [node.mqtt_port for node in where.nodes]
    for node, original in zip(where.nodes, topology.NODES, strict=True):
        broker = load_broker_config(ROOT / node.config)
        assert broker.admin is not None and broker.admin.port == node.admin_port
        assert broker.cluster is not None and broker.cluster.port == node.cluster_port
        assert sorted(port for _, _, port in broker.cluster.peers) == sorted(
            other.cluster_port for other in where.nodes if other is not node
        )
        text = (ROOT / node.config).read_text()
        for seed, port in where.moved_ports().items():
            text = text.replace(f":{port}", f":{seed}")
        assert text == (ROOT / original.config).read_text()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_demo_fast_mode_summary(demo_pki: Path) -> None:
    base = free_port_block(topology.BASE_PORT_SPAN)
    where = topology.layout(base)
    result = subprocess.run(
        [sys.executable, "-m", "demo", "--fast", "--base-port", str(base)],
        cwd=ROOT,
        capture_output=True,
        check=False,
        text=True,
        timeout=150,
    )
    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    lines = output.splitlines()

    # Devices per node, with the real address and CN learned from the PROXY header.
    holders: dict[str, str] = {}
    ids: dict[str, str] = {}  # device -> the connection id its broker learned from lb
    node = None
    for line in lines:
        if heading := NODE_HEADING.match(line):
            node = heading["node"]
            server = where.nodes[int(node[-1]) - 1]
            assert (
                f"lb server {server.server} -> {topology.LOCAL_HOST}:{server.mqtt_port}"
                in (heading["note"])
            )
            continue
        if (device := DEVICE_LINE.match(line)) and node is not None:
            assert device["device"] not in holders, f"{device['device']} on two nodes"
            holders[device["device"]] = node
            assert device["cn"] == device["device"]
            host, port = device["address"].rsplit(":", 1)
            assert host == topology.LOCAL_HOST and 1024 <= int(port) <= 65535
            assert int(port) not in {n.mqtt_port for n in where.nodes}
            assert device["sent"] == device["received"] == device["expected"]
            assert int(device["expected"]) == topology.FAST_MESSAGES
            ids[device["device"]] = device["id"]
    expected_devices = {topology.device_name(n) for n in range(1, topology.FAST_DEVICES + 1)}
    assert set(holders) == expected_devices
    # Each id is lb's (128 random bits), one per device, and lb's session line ends with it.
    lb_log = (ROOT / topology.OUT_DIR / "lb.log").read_text()
    assert len(set(ids.values())) == len(ids)
    for connection_id in ids.values():
        assert re.fullmatch(r"[0-9a-f]{32}", connection_id)
        assert f" {connection_id}\n" in lb_log
    # Round robin over three nodes: 20 devices land 7/7/6.
    counts = sorted(list(holders.values()).count(n.name) for n in topology.NODES)
    assert counts == [6, 7, 7]

    # Every message delivered; neighbours sit on different nodes, so all crossed the cluster.
    (messages,) = [m for line in lines if (m := MESSAGES_LINE.match(line))]
    total = topology.FAST_DEVICES * topology.FAST_MESSAGES
    assert (int(messages["sent"]), int(messages["received"]), int(messages["expected"])) == (
        total,
        total,
        total,
    )
    assert int(messages["crossed"]) == total
    assert messages["verdict"] == "all delivered"

    # The two refusals, each with the reason from lb's log line.
    start = lines.index("refused by lb:")
    refusals = {m["device"]: m for line in lines[start + 1 :] if (m := REFUSAL_LINE.match(line))}
    revoked = refusals[topology.REVOKED_DEVICE]
    assert "client certificate revoked" in revoked["reason"]
    assert "X509_V_ERR_CERT_REVOKED" in revoked["reason"]
    assert 'subject="CN=device-revoked"' in revoked["reason"]
    rogue = refusals[topology.ROGUE_DEVICE]
    assert rogue["client_id"] == "device-0001"
    assert "unknown CA" in rogue["reason"]
    assert "Rogue" in rogue["reason"]
    for refusal in (revoked, rogue):
        assert refusal["address"].startswith(f"{topology.LOCAL_HOST}:")

    assert "result: OK" in lines
    assert f"ports from {base}: lb {where.lb_port}" in output
    assert "stopped" in lines[-1]
    assert ports.busy(where.ports()) == [], "the demo left processes behind"


def _report() -> dict[str, Any]:
    """A report as demo.devices writes it: two devices on two nodes, both refusals seen."""
    devices = [
        {
            "name": name,
            "local_address": address,
            "connected": True,
            "error": None,
            "sent": 2,
            "received": 2,
            "expected": 2,
            "duplicates": 0,
            "strangers": 0,
            "from": sender,
            "to": sender,
        }
        for name, address, sender in (
            ("device-0001", "127.0.0.1:40001", "device-0002"),
            ("device-0002", "127.0.0.1:40002", "device-0001"),
        )
    ]
    nodes = {
        node: {
            "admin": f"127.0.0.1:{port}",
            "error": None,
            "clients": [
                {
                    "client_id": name,
                    "address": address,
                    "certificate_cn": name,
                    "via_proxy": True,
                    "connection_id": f"{port:032x}",
                    "connection_id_source": "proxy",
                }
            ],
        }
        for node, port, name, address in (
            ("broker-1", 18083, "device-0001", "127.0.0.1:40001"),
            ("broker-2", 18084, "device-0002", "127.0.0.1:40002"),
        )
    }
    refusals = [
        {"device": name, "client_id": name, "local_address": "127.0.0.1:40009", "refused": True}
        | {"client_error": "TLS alert: sslv3 alert certificate revoked"}
        for name in (topology.REVOKED_DEVICE, topology.ROGUE_DEVICE)
    ]
    return {
        "lb": "127.0.0.1:8091",
        "messages_per_device": 2,
        "devices": devices,
        "nodes": nodes,
        "refusals": refusals,
        "fleet_problems": [],
    }


LB_REASONS = {topology.REVOKED_DEVICE: "revoked", topology.ROGUE_DEVICE: "unknown CA"}


def test_summary_of_a_good_run_is_ok() -> None:
    report = _report()
    assert summary.problems(report, LB_REASONS) == []
    assert summary.crossed_nodes(report) == 4
    lines = summary.render(report, LB_REASONS)
    assert lines[-1] == "result: OK"
    assert "messages: 4 sent, 4 received of 4, 4 crossed nodes: all delivered" in lines


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (lambda r: r["devices"][0].update(received=1), "device-0001: received 1 of 2"),
        (lambda r: r["devices"][1].update(sent=0), "device-0002: sent 0 of 2"),
        (
            lambda r: r["refusals"][0].update(refused=False),
            "device-revoked: not refused (TLS alert: sslv3 alert certificate revoked)",
        ),
        (
            lambda r: r["nodes"]["broker-1"]["clients"][0].update(certificate_cn=None),
            "device-0001: broker-1 learned CN None",
        ),
        (
            lambda r: r["nodes"]["broker-2"]["clients"][0].update(address="127.0.0.1:9"),
            "device-0002: broker-2 says it comes from 127.0.0.1:9, its socket is 127.0.0.1:40002",
        ),
        (
            lambda r: r["devices"][0].update(connected=False, error="connect failed"),
            "device-0001: connect failed",
        ),
        (
            lambda r: r["nodes"]["broker-1"]["clients"][0].update(connection_id_source="broker"),
            "device-0001: broker-1 got no connection id from lb (unique-id)",
        ),
    ],
)
def test_summary_names_what_went_wrong(spoil: Any, expected: str) -> None:
    report = _report()
    spoil(report)
    assert expected in summary.problems(report, LB_REASONS)
    assert summary.render(report, LB_REASONS)[-1].startswith("  - ")


def test_summary_needs_lb_log_lines_for_the_refusals() -> None:
    reasons = {topology.REVOKED_DEVICE: "revoked", topology.ROGUE_DEVICE: None}
    assert summary.problems(_report(), reasons) == [
        "rogue-device-0001: no refusal line in lb's log"
    ]
