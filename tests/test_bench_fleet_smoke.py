"""The fleet benchmark's plumbing end to end with a tiny fleet: 20 devices with their own
certificates through lb and through HAProxy into a 2-node cluster, a reconnect storm, and
the JSON's counts (not its timings: those only mean something from a full run).

The storm scenario exercises every part: the ramp, telemetry with PUBACK accounting and the
collector, commands, every device dropping at once and coming back with backoff, the
samples, and the teardown of every process it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench.fleet import balancer_config, combined_storms, hard_stop_after
from demo import topology
from tests.harness import ROOT, run_bench, running_from

HAPROXY = Path("/usr/sbin/haproxy")
DEVICES = 20

pytestmark = [pytest.mark.haproxy, pytest.mark.timeout(300)]


def run_fleet(tmp_path: Path, scenario: str, *flags: str) -> dict[str, Any]:
    """bench/fleet.py SCENARIO with DEVICES devices, the short settle, telemetry, commands
    and bounds every smoke run here uses, and ``flags``; its JSON result."""
    output = tmp_path / "fleet.json"
    run_bench(
        "fleet.py",
        scenario,
        "--devices",
        str(DEVICES),
        "--settle",
        "3",
        "--telemetry-interval",
        "0.5",
        "--command-rate",
        "20",
        "--storm-timeout",
        "60",
        "--ramp-timeout",
        "60",
        *flags,
        "--workdir",
        str(tmp_path),
        "--output",
        str(output),
        "--no-plots",
        timeout=280,
    )
    result: dict[str, Any] = json.loads(output.read_text())
    return result


@pytest.mark.skipif(not HAPROXY.exists(), reason="needs Debian's haproxy package")
def test_storm_through_both_balancers_counts_every_device_and_message(tmp_path: Path) -> None:
    result = run_fleet(tmp_path, "storm", "--nodes", "2", "--backoff-base", "0.5", "--storms", "2")
    assert result["scenario"] == "storm"
    assert list(result["phases"]) == ["lb", "haproxy"]
    for kind, phase in result["phases"].items():
        figures = phase["figures"]
        assert figures["ramp_connected"] == DEVICES, (kind, figures)
        assert figures["held"] == DEVICES, (kind, figures)
        assert figures["storm_devices"] == DEVICES, (kind, figures)
        assert figures["storm_back_connected"] == DEVICES, (kind, figures)
        assert [r["storm_back_connected"] for r in figures["storm_runs"]] == [DEVICES] * 2
        assert figures["storm_handshakes"] >= DEVICES, (kind, figures)
        assert figures["after_storm_held"] == DEVICES, (kind, figures)
        # Every acknowledged telemetry message reached the collector (no node was lost).
        assert figures["telemetry_acked"] > 0, (kind, figures)
        assert figures["telemetry_acked_lost"] == 0, (kind, figures["telemetry_lost_examples"])
        assert figures["telemetry_acked_delivered"] == figures["telemetry_acked"]
        assert figures["telemetry_sent"] >= figures["telemetry_acked"]
        assert figures["commands_acked"] > 0, (kind, figures)
        assert figures["commands_acked"] <= figures["commands_sent"]
        assert figures["commands_acked_delivered"] <= figures["commands_acked"]
        samples = phase["samples"]
        assert samples and max(s["connected"] for s in samples) == DEVICES
        assert all(len(s["broker_rss_kib"]) == 2 for s in samples)
        assert phase["log"]["counts"]["lines"] > 0
        assert [e["event"] for e in phase["events"]][:2] == ["ramp", "ramp done"]
    assert result["phases"]["haproxy"]["balancer"]["instances"] == 1
    assert "storm_back_connected" in result["ratios"]
    # The code the processes ran: recorded at the start and the end (an edit in between
    # would have changed the phases started after it).
    source = result["source"]
    assert set(source["start"]) == set(source["end"]) == {"commit", "changed", "pythonpath"}
    assert source["start"]["commit"] == source["end"]["commit"]
    # every process the suite started is gone
    assert running_from(tmp_path) == []


def test_storms_combine_as_medians_and_sums() -> None:
    storms = [
        {"storm_back_100_seconds": 20.0, "storm_attempts": 10, "storm_refusals": {"a": 1}},
        {"storm_back_100_seconds": 30.0, "storm_attempts": 12, "storm_refusals": {"a": 2}},
        {"storm_back_100_seconds": 24.0, "storm_attempts": 11, "storm_refusals": {"b": 5}},
    ]
    assert combined_storms(storms) == {
        "storm_back_100_seconds": 24.0,
        "storm_attempts": 11,
        "storm_refusals": {"a": 3, "b": 5},
    }
    # a storm that never came back to 100% has no time: no median is made up for them
    storms[1]["storm_back_100_seconds"] = None
    assert combined_storms(storms)["storm_back_100_seconds"] is None


def test_a_killed_run_stops_what_it_started(tmp_path: Path) -> None:
    """SIGTERM to the bench mid-run: lb, the brokers and the device processes stop too."""
    log = tmp_path / "fleet.log"
    with log.open("wb") as output:
        bench = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "fleet.py"),
                "ramp",
                "--devices",
                "10",
                "--nodes",
                "2",
                "--balancers",
                "lb",
                "--hold",
                "60",
                "--workdir",
                str(tmp_path),
                "--no-plots",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while b"ramp done" not in log.read_bytes():
            assert bench.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert running_from(tmp_path) != []
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 20
        while running_from(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert running_from(tmp_path) == []
    finally:  # a failure here leaks nothing either
        if bench.poll() is None:
            bench.kill()
            bench.wait(10)
        for pid in _pids_from(tmp_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _pids_from(directory: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and str(directory).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    return pids


def test_maxsslrate_is_one_limit_for_lb_and_shared_by_haproxys_instances(tmp_path: Path) -> None:
    """`--maxsslrate N`: lb's global line says N (one limit over its workers); each of
    HAProxy's instances (one process each on the port) gets its share, rounded up."""
    nodes = tuple(
        topology.node(number, 1883 + number, 18083 + number, 5370 + number) for number in (1, 2)
    )
    lb_text = balancer_config("lb", 8883, tmp_path, nodes, 2, maxsslrate=301, instances=2)
    haproxy_text = balancer_config("haproxy", 8883, tmp_path, nodes, 2, maxsslrate=301, instances=2)
    assert [
        words for words in map(str.split, lb_text.splitlines()) if words[:1] == ["maxsslrate"]
    ] == [["maxsslrate", "301"]]
    assert [
        words for words in map(str.split, haproxy_text.splitlines()) if words[:1] == ["maxsslrate"]
    ] == [["maxsslrate", "151"]]
    assert "\n    maxsslrate" not in balancer_config("lb", 8883, tmp_path, nodes, 2)


def test_reload_configs_lose_hard_stop_after_unless_kept(tmp_path: Path) -> None:
    """The demo's `hard-stop-after 20s` ends an old process's sessions 20 s after a reload:
    the reload scenario takes it out (both balancers alike) unless asked to keep it, and
    then counts the disconnects that come that much later against the reload."""
    nodes = (topology.node(1, 1884, 18084, 5371),)
    kept = balancer_config("lb", 8883, tmp_path, nodes, 2)
    assert hard_stop_after(kept) == 20.0
    for kind in ("lb", "haproxy"):
        assert (
            hard_stop_after(balancer_config(kind, 8883, tmp_path, nodes, 2, hard_stop=False)) == 0
        )


@pytest.mark.parametrize(
    "evacuate", ["", "api", "stop"], ids=["stop", "evacuate-then-stop", "stop-evacuation"]
)
def test_a_rolling_restart_of_the_brokers_loses_nothing_acknowledged(
    tmp_path: Path, evacuate: str
) -> None:
    """The restart scenario through lb: node-3 then node-2 stopped (SIGTERM) and started
    again under telemetry and commands; every device back after each, every acknowledged
    telemetry message delivered, and each restart's figures in the JSON. With
    --evacuate-rate, each node is evacuated first (10 devices a second, the admin API) and
    stopped once empty; with --stop-evacuation too, the brokers evacuate themselves at the
    SIGTERM (``[cluster] stop_evacuation``)."""
    flags = {
        "": [],
        "api": ["--evacuate-rate", "10"],
        "stop": ["--evacuate-rate", "10", "--stop-evacuation", "20"],
    }[evacuate]
    # --keep: the brokers' logs stay in tmp_path (pytest keeps the last runs' folders), so a
    # failure below can be traced.
    result = run_fleet(
        tmp_path,
        "restart",
        "--nodes",
        "3",
        "--balancers",
        "lb",
        "--hold",
        "3",
        "--wills",
        "--keep",
        *flags,
    )
    assert result["scenario"] == "restart"
    phase = result["phases"]["lb"]
    figures = phase["figures"]
    assert phase["error"] is None, phase["error"]
    restarts = figures["restarts"]
    assert [r["node"] for r in restarts] == ["broker-3", "broker-2"]
    for restart in restarts:
        assert restart["devices_dropped"] > 0, restart
        assert (restart["evacuate_seconds"] is not None) == (evacuate == "api"), restart
        if evacuate == "stop":
            line = restart["stop_evacuation"]
            assert line.startswith(f"stop: node {restart['node']} evacuated in"), restart
        assert restart["back_connected"] == DEVICES, restart
        assert restart["rejoined_seconds"] is not None, restart
        # 3.1.1 devices without a Will Delay: each dropped device's will, once (those the
        # collector reports after the restart's last sample count in the next window; a
        # busy machine moves some there, so no more than one each here).
        assert restart["wills"] <= restart["devices_dropped"], restart
    assert figures["after_restarts_held"] == DEVICES
    assert figures["drain_connected"] == figures["drain_connected_before"] == DEVICES
    assert figures["telemetry_acked"] > 0
    assert figures["telemetry_acked_lost"] == 0, figures["telemetry_lost_examples"]
    assert figures["commands_acked"] > 0
    # Every acknowledged command reached its device. Until 9c18333 about one loaded run in
    # six left one or a few undelivered, sent during broker-2's restart: a device that
    # reconnected on another node while broker-2 restarted claimed its session without
    # asking broker-2, to which its backup had just handed the session back with the
    # commands queued in it (test_broker_cluster_peer_frames'
    # test_a_claim_under_way_goes_to_a_peer_that_comes_up_meanwhile; bench/README "A rolling
    # restart of the brokers": 2 of 18 runs of 600 devices before, 0 of 24 after).
    assert figures["commands_acked_delivered"] > 0
    assert figures["commands_acked_undelivered"] == 0, figures["commands_undelivered_examples"]
    # The fleet ends with DISCONNECTs, as devices that are shut down: node-1, never
    # restarted, loses no device before that, so it published no will. Before, the end's
    # wills (every device's at once) overflowed the collector's queues in 20,000-device runs
    # and node-1 counted thousands of acknowledged messages dropped.
    assert phase["broker_counters"]["broker-1"]["wills_published"] == 0
    assert running_from(tmp_path) == []


@pytest.mark.parametrize("handling", ["ignore", "pause_minority"])
def test_a_partition_of_one_node_heals_and_loses_nothing_acknowledged(
    tmp_path: Path, handling: str
) -> None:
    """The partition scenario through lb: node-3 cut off from both other nodes for 6 s
    (its links suspended by the admin API) under telemetry and commands, half the devices
    dropping in the middle of it and coming back through lb (many on the other side of
    their session), then the links restored: the cluster forms again, every device is back,
    and every acknowledged telemetry message and command was delivered (the sessions that
    diverged merged at the heal). With "ignore" wills are published for devices that never
    disconnected (node-3's by its backup, node-2's by node-3); with "pause_minority" node-3
    closes its devices' connections and a will is published for each connection that
    ended, none for a device still connected."""
    result = run_fleet(
        tmp_path,
        "partition",
        "--nodes",
        "3",
        "--balancers",
        "lb",
        "--hold",
        "3",
        "--split",
        "6",
        "--split-drop",
        "0.5",
        "--partition-handling",
        handling,
        "--wills",
        "--keep",
    )
    phase = result["phases"]["lb"]
    figures = phase["figures"]
    assert phase["error"] is None, phase["error"]
    assert figures["split_nodes"] == "broker-3"
    assert figures["split_devices_dropped"] > 0
    assert figures["heal_seconds"] is not None
    assert figures["heal_back_connected"] == DEVICES
    assert figures["drain_connected"] == figures["drain_connected_before"] == DEVICES
    assert figures["telemetry_acked"] > 0
    assert figures["telemetry_acked_lost"] == 0, figures["telemetry_lost_examples"]
    assert figures["commands_acked_delivered"] > 0
    assert figures["commands_acked_undelivered"] == 0, figures["commands_undelivered_examples"]
    if handling == "ignore":
        assert figures["split_devices_closed"] == 0, figures
        assert figures["partition_wills_without_disconnect"] > 0, figures
    else:
        # node-3's devices, closed by its pause, all back through lb on the others.
        assert figures["split_devices_closed"] > 0, figures
        assert figures["split_back_seconds"] is not None, figures
        assert figures["partition_wills_without_disconnect"] == 0, figures
    assert running_from(tmp_path) == []


def test_a_blackout_of_every_broker_with_disk_stores_loses_nothing_acknowledged(
    tmp_path: Path,
) -> None:
    """The blackout scenario through lb: every node SIGKILLed at once under telemetry and
    commands, 3 s without a broker, every node started again on its disk store. The cluster
    forms, every device is back with its session, the collector back on its persistent
    sessions (it resends the commands it had not seen acknowledged), and every acknowledged
    telemetry message and command was delivered."""
    result = run_fleet(
        tmp_path,
        "blackout",
        "--nodes",
        "3",
        "--balancers",
        "lb",
        "--store",
        "disk",
        "--outage",
        "3",
        "--hold",
        "3",
        "--backoff-base",
        "0.5",
        "--backoff-cap",
        "4",
        "--keep",
    )
    phase = result["phases"]["lb"]
    figures = phase["figures"]
    assert phase["error"] is None, phase["error"]
    assert figures["blackout_devices_dropped"] >= DEVICES, figures
    assert figures["blackout_formed_seconds"] is not None, figures
    assert figures["blackout_back_connected"] == DEVICES, figures
    # Every device found its session on the store of the node that had it.
    assert figures["blackout_sessions_present"] == DEVICES, figures
    assert figures["blackout_collector_relinked"] == 8, figures
    assert figures["after_blackout_held"] == DEVICES
    assert figures["telemetry_acked"] > 0
    assert figures["telemetry_acked_lost"] == 0, figures["telemetry_lost_examples"]
    assert figures["commands_acked_delivered"] > 0
    assert figures["commands_acked_undelivered"] == 0, figures["commands_undelivered_examples"]
    assert running_from(tmp_path) == []
