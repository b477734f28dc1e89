"""A node stopped and started again (SIGTERM, as systemd, docker stop and a rolling upgrade
do), over real processes: three nodes clustered over mutual TLS, paho-mqtt clients.

At a stop the node closes its clients first, while its cluster links are up: their wills
reach every node (not only the stopping node's own, departing, subscribers), once; then it
waits until its peers and its backup have acknowledged what it sent, and closes the links.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from tests.cluster_harness import V5, V311, Device, running_cluster
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("replicas", [0, 1])
def test_the_wills_of_a_stopping_nodes_clients_reach_the_cluster_once(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory, replicas: int
) -> None:
    """Five clients with a will on node-3, a subscriber to the wills on node-1; node-3 gets
    SIGTERM. Every will arrives, once: published by node-3 while its links are up (with
    session_replicas = 0 there is no backup to publish them; with 1 the backup has their
    copies cleared before the links close, so it publishes none again)."""
    directory = tmp_path_factory.mktemp(f"stop-wills-{replicas}")
    with running_cluster(pki, directory, cluster=f"session_replicas = {replicas}") as nodes:
        watcher_node, backup, stopping = nodes
        watcher = Device("will-watcher", V5, clean=True)
        watcher.connect(watcher_node.mqtt_port)
        watcher.subscribe([("status/#", 1)])
        devices = [
            Device(f"stop-{n}", V311, clean=True, will=(f"status/stop-{n}", f"gone-{n}"))
            for n in range(5)
        ]
        for device in devices:
            device.connect(stopping.mqtt_port)
        # node-1 knows node-3's routes for the watcher's filter before anything is published
        time.sleep(1.0)
        stopping.stop()
        got = watcher.received(quiet=3.0, timeout=20)
        watcher.stop()
        assert Counter(got) == Counter(f"gone-{n}" for n in range(5)), got
        log = stopping.log_text()
        assert log.count("will published: client_id=stop-") == 5
        assert "stopping with reliable frames unacknowledged" not in log
        assert "will published" not in backup.log_text()
