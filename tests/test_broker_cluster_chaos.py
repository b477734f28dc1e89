"""Issue 12's chaos test: 50 devices through lb (mutual TLS, round robin over three nodes
with disk stores), 40 subscribers with persistent sessions at QoS 1 and 2 (3.1.1 and 5.0)
and 10 publishers running, while one node is killed with SIGKILL and restarted, and then a
cluster link is cut and restored (the admin API's operator commands).

Counted at the end: every message a publisher got PUBACK (QoS 1) or PUBCOMP (QoS 2) for
reached its subscriber at least once, and a QoS 2 subscriber got it exactly once. The one
exception is stated in the README's guarantees: a QoS 2 PUBLISH whose PUBREC the publisher
never saw because its node died, and which it resent after reconnecting to another node, may
arrive twice (the publisher's QoS 2 state was on the dead node); those are counted apart and
may arrive at most twice. Devices resubscribe when CONNACK says session_present=0 (a session
whose node is down), as devices do.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from tests.cluster_harness import V5, V311, Device, running_cluster, running_lb, wait_for
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(240)

SUBSCRIBERS = 40
PUBLISHERS = 10
RATE = 8.0  # messages per second per publisher
DURATION = 14.0  # seconds of publishing
KILL_AT, RESTART_AT, CUT_AT, RESTORE_AT = 2.5, 5.0, 8.0, 11.0


def test_chaos_kill_restart_and_link_cut(pki: TestPKI, tmp_path: Path) -> None:
    with running_cluster(pki, tmp_path) as nodes, running_lb(pki, tmp_path, nodes) as front:
        # The test PKI has 30 device certificates; without authorization the client id is
        # free, so devices share certificates and have ids of their own.
        certificates = pki.devices(30)
        subscribers: list[Device] = []
        qos_of: dict[str, int] = {}
        for index in range(SUBSCRIBERS):
            files = certificates[index % len(certificates)]
            client_id = f"sub-{index:02d}"
            qos = 1 + index % 2
            topic = f"chaos/{client_id}"
            protocol = V5 if index % 4 < 2 else V311
            device = Device(client_id, protocol, files, pki.root, subscriptions=[(topic, qos)])
            device.connect(front)
            device.subscribe([(topic, qos)])
            subscribers.append(device)
            qos_of[client_id] = qos
        publishers = []
        for index in range(PUBLISHERS):
            files = certificates[(SUBSCRIBERS + index) % len(certificates)]
            publisher = Device(f"pub-{index:02d}", V5, files, pki.root, clean=True)
            publisher.connect(front)
            publishers.append(publisher)
        time.sleep(1.0)  # routes everywhere

        destination: dict[str, str] = {}
        started = time.monotonic()
        events = [
            (KILL_AT, nodes[1].kill),
            (RESTART_AT, nodes[1].start),
            (
                CUT_AT,
                lambda: nodes[0].admin(f"/api/cluster/peers/{nodes[2].name}/disconnect", "POST"),
            ),
            (
                RESTORE_AT,
                lambda: nodes[0].admin(f"/api/cluster/peers/{nodes[2].name}/connect", "POST"),
            ),
        ]
        step = 0
        while (elapsed := time.monotonic() - started) < DURATION:
            while events and events[0][0] <= elapsed:
                events.pop(0)[1]()
            for index, publisher in enumerate(publishers):
                target = subscribers[(step * PUBLISHERS + index) % SUBSCRIBERS].client_id
                payload = f"{publisher.client_id}/{step}"
                destination[payload] = target
                publisher.publish(f"chaos/{target}", payload, qos_of[target])
            step += 1
            time.sleep(1.0 / RATE)
        for _, action in events:
            action()
        wait_for(lambda: all(node.all_links_up() for node in nodes), 30, "links back")

        acked = {payload for publisher in publishers for payload in publisher.acked}
        resent = {payload for publisher in publishers for payload in publisher.resent}
        expected: dict[str, set[str]] = {}
        for payload in acked:
            expected.setdefault(destination[payload], set()).add(payload)
        got: dict[str, Counter[str]] = {device.client_id: Counter() for device in subscribers}
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            for device in subscribers:
                counter = got[device.client_id]
                while not device.messages.empty():
                    counter[device.messages.get().payload.decode()] += 1
            if all(expected.get(c, set()) <= set(got[c]) for c in got):
                break
            time.sleep(0.2)
        time.sleep(1.0)  # late duplicates, if any, would arrive now
        for device in subscribers:
            counter = got[device.client_id]
            while not device.messages.empty():
                counter[device.messages.get().payload.decode()] += 1
        for device in [*subscribers, *publishers]:
            device.stop()
        report = {}
        for node in nodes:
            stats = node.stats()
            report[node.name] = {
                key: stats[key]
                for key in (
                    "sessions_transferred_in",
                    "sessions_merged",
                    "messages_duplicates_dropped",
                    "messages_dropped_acknowledged",
                    "claims_rejected",
                    "acks_after_commit",
                )
            }
            peers = node.admin("/api/cluster")["members"][1:]
            report[node.name]["resent"] = sum(p["counters"]["reliable_resent"] for p in peers)
        print("chaos:", report, "resent by publishers:", len(resent))

    missing = {c: sorted(expected.get(c, set()) - set(got[c])) for c in got}
    missing = {c: m for c, m in missing.items() if m}
    assert not missing, f"acknowledged and never delivered: {missing}"
    twice = {
        client_id: {p: n for p, n in counter.items() if n > 1 and p not in resent}
        for client_id, counter in got.items()
        if qos_of[client_id] == 2
    }
    twice = {c: d for c, d in twice.items() if d}
    assert not twice, f"QoS 2 delivered more than once: {twice}"
    for client_id, counter in got.items():
        if qos_of[client_id] == 2:
            assert all(n <= 2 for n in counter.values()), client_id
    total = sum(len(expected.get(c, ())) for c in got)
    assert total > 500, f"only {total} acknowledged messages: the test measured too little"
