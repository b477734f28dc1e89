"""The fleet benchmark's plumbing end to end with a tiny fleet: 20 devices with their own
certificates through lb and through HAProxy into a 2-node cluster, a reconnect storm, and
the JSON's counts (not its timings: those only mean something from a full run).

The storm scenario exercises every part: the ramp, telemetry with PUBACK accounting and the
collector, commands, every device dropping at once and coming back with backoff, the
samples, and the teardown of every process it started.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT, running_from

HAPROXY = Path("/usr/sbin/haproxy")
DEVICES = 20

pytestmark = [pytest.mark.haproxy, pytest.mark.timeout(300)]


@pytest.mark.skipif(not HAPROXY.exists(), reason="needs Debian's haproxy package")
def test_storm_through_both_balancers_counts_every_device_and_message(tmp_path: Path) -> None:
    output = tmp_path / "fleet.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "fleet.py"),
            "storm",
            "--devices",
            str(DEVICES),
            "--nodes",
            "2",
            "--settle",
            "3",
            "--telemetry-interval",
            "0.5",
            "--command-rate",
            "20",
            "--backoff-base",
            "0.5",
            "--storm-timeout",
            "60",
            "--ramp-timeout",
            "60",
            "--workdir",
            str(tmp_path),
            "--output",
            str(output),
            "--no-plots",
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-4000:]
    result = json.loads(output.read_text())
    assert result["scenario"] == "storm"
    assert list(result["phases"]) == ["lb", "haproxy"]
    for kind, phase in result["phases"].items():
        figures = phase["figures"]
        assert figures["ramp_connected"] == DEVICES, (kind, figures)
        assert figures["held"] == DEVICES, (kind, figures)
        assert figures["storm_devices"] == DEVICES, (kind, figures)
        assert figures["storm_back_connected"] == DEVICES, (kind, figures)
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
    # every process the suite started is gone
    assert running_from(tmp_path) == []
