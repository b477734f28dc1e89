"""A rolling upgrade of the broker cluster (cluster protocol versions 2 to 10): real nodes over
their real mutual TLS link (tests/cluster_harness.py).

A node speaks versions 2 to 10 and announces ``[cluster] protocol_version`` (default 10) in its
HELLO; each link speaks the lower of its two nodes' (broker.cluster_codec.link_version), as
Kafka's inter.broker.protocol.version does. A node announcing 3 and one announcing 10 form a
cluster and route both ways, without session replication (version 4's); set back to 10 and
restarted, the link speaks 10 and sessions are copied. A HELLO of version 1, or above what
this node speaks, is refused with a line that names the peer, both versions and what to do.
(The fan-in load over a link of version 2 is in tests/test_broker_backpressure.py.)
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from broker import cluster_codec as codec
from tests.cluster_harness import (
    COOKIE,
    ClusterNode,
    Device,
    make_nodes,
    offline_session,
    running_cluster,
    wait_for,
)
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(90)


def _link_versions(node: ClusterNode) -> tuple[int, int | None]:
    """What a node announces, and what its link to the other node speaks."""
    status = node.admin("/api/cluster")
    return status["protocol_version"], status["members"][1]["protocol_version"]


def _route_both_ways(first_port: int, second_port: int, tag: str) -> None:
    """QoS 1 from a device on each node to a subscriber on the other: each arrives once."""
    near = Device(f"{tag}-near", clean=True)
    far = Device(f"{tag}-far", clean=True)
    try:
        near.connect(first_port)
        far.connect(second_port)
        near.subscribe([(f"{tag}/to-first", 1)])
        far.subscribe([(f"{tag}/to-second", 1)])
        # A route is known on the other node within a second (SUBSCRIBE over the link): a
        # message published before it would not be forwarded, so publish until one arrives.
        for device, topic, receiver in (
            (far, f"{tag}/to-first", near),
            (near, f"{tag}/to-second", far),
        ):
            got: list[str] = []
            for attempt in range(20):
                device.publish(topic, f"probe-{attempt}", 1)
                got = receiver.received(quiet=0.25, timeout=0.5)
                if got:
                    break
            assert got, f"nothing routed to {topic}"
            receiver.received(quiet=0.5)  # late probes
            payloads = [f"{tag}-{index}" for index in range(50)]
            for payload in payloads:
                device.publish(topic, payload, 1)
            assert sorted(receiver.received(want=len(payloads))) == sorted(payloads)
    finally:
        near.stop()
        far.stop()


def test_a_node_announcing_3_and_one_announcing_10_form_a_cluster_then_upgrade(
    pki: TestPKI, tmp_path: Path
) -> None:
    """The operator's procedure: node-1 runs the new release with protocol_version = 3 while
    node-2 announces 10 (as it would once upgraded): the link speaks 3, messages cross it both
    ways, no session is replicated over it, and node-1 says at start what version 3 lacks.
    protocol_version removed and node-1 restarted: the link speaks 10 and node-1's
    persistent sessions are copied to node-2."""
    with running_cluster(pki, tmp_path, 2, cluster=["protocol_version = 3", ""]) as nodes:
        first, second = nodes
        assert _link_versions(first) == (3, 3)
        assert _link_versions(second) == (10, 3)
        assert "is up (" in first.log_text() and "protocol version 3)" in first.log_text()
        assert (
            "announces cluster protocol version 3 ([cluster] protocol_version): its "
            "persistent sessions are not copied to another node" in first.log_text()
        )
        assert "announces cluster protocol version" not in second.log_text()
        _route_both_ways(first.mqtt_port, second.mqtt_port, "v3")
        offline_session(first, "before-upgrade")
        offline_session(second, "before-upgrade-2")
        for node in nodes:
            replication = node.admin("/api/cluster")["replication"]
            assert not replication["sending"]["active"]
            assert replication["copies"]["sessions"] == {}

        first.stop()
        first.cluster = ""
        first.write_config(nodes)
        first.start()
        wait_for(lambda: all(node.all_links_up() for node in nodes), 20, "links up again")
        assert _link_versions(first) == (10, 10)
        assert _link_versions(second) == (10, 10)
        _route_both_ways(first.mqtt_port, second.mqtt_port, "v10")
        # The disk store kept node-1's session: the snapshot copies it to node-2, and
        # node-2's session goes the other way.
        wait_for(
            lambda: (
                second.admin("/api/cluster")["replication"]["copies"]["sessions"] == {"node-1": 1}
            ),
            10,
            "node-1's session copied to node-2",
        )
        wait_for(
            lambda: (
                first.admin("/api/cluster")["replication"]["copies"]["sessions"] == {"node-2": 1}
            ),
            10,
            "node-2's session copied to node-1",
        )
        for node in nodes:
            assert "protocol error" not in node.log_text()


def _hello_of_version(pki: TestPKI, port: int, name: str, version: int) -> list[codec.Frame]:
    """Dial a node's cluster port with ``name``'s real node certificate and send a HELLO of
    ``version``; returns the frames the node sent before it closed the link."""
    files = pki.node(name)
    context = ssl.create_default_context(cafile=str(pki.root))
    context.load_cert_chain(str(files.cert), str(files.key))
    frames: list[codec.Frame] = []
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(codec.encode(codec.Hello(version, name, "chaos", COOKIE.encode())))
        decoder = codec.ClusterDecoder()
        for _ in range(100):
            data = tls.recv(65536)
            if not data:
                break
            decoder.feed(data)
            while not isinstance(event := decoder.next_event(), codec.NeedData):
                frames.append(event)
    return frames


@pytest.mark.parametrize(
    ("version", "advice"),
    [
        (1, "upgrade node 'node-2' to a release that speaks version 2 or later"),
        (
            11,
            "upgrade this node, or set [cluster] protocol_version = 10 on node 'node-2' until "
            "every node is upgraded",
        ),
    ],
)
def test_a_hello_of_a_version_this_node_does_not_speak_is_refused_with_what_to_do(
    pki: TestPKI, tmp_path: Path, version: int, advice: str
) -> None:
    """node-2 (its real certificate) says HELLO with version 1 (before CLAIM and reliable
    frames) or 11 (newer than this release): node-1 refuses it before reading further, logs
    a line naming the peer, both versions and what to do, and tells the peer only
    "refused"."""
    nodes = make_nodes(tmp_path, pki, 2)
    first = nodes[0]
    try:
        first.start()
        frames = _hello_of_version(pki, first.cluster_port, "node-2", version)
        assert frames == [codec.Close("refused")]
        expected = (
            f"(node 'node-2') refused: node 'node-2' speaks cluster protocol version {version}, "
            f"this node 2 to 10: {advice}"
        )
        wait_for(lambda: expected in first.log_text(), 10, "the refusal logged")
        member = first.admin("/api/cluster")["members"][1]
        assert member["name"] == "node-2" and member["counters"]["refused"] >= 1
    finally:
        first.stop()
