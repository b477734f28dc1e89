"""bench/broker_memory.py's plumbing, with tiny counts: a 2-node cluster, devices with lb's
PROXY v2 TLS TLVs and the chain-subjects TLV, both placements, mosquitto, and a tracemalloc
run; every device is held and each node receives the other's routes. No figure is asserted:
the numbers only mean something from a full run (bench/README.md). (--baseline is left out:
it doubles the clusters started, about 4 minutes on the loaded machine.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.harness import run_bench, running_from

MOSQUITTO = Path("/usr/sbin/mosquitto")
DEVICES = 24

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not MOSQUITTO.exists(), reason="needs Debian's mosquitto package"),
]


def test_memory_bench_holds_every_device_on_every_broker(tmp_path: Path) -> None:
    output = tmp_path / "result.json"
    run_bench(
        "broker_memory.py",
        "--nodes",
        "2",
        "--devices",
        str(DEVICES),
        "--repeats",
        "1",
        "--chain-subjects",
        "--tracemalloc",
        "--top",
        "5",
        "--workdir",
        str(tmp_path),
        "--output",
        str(output),
        timeout=280,
    )
    result = json.loads(output.read_text())
    medians = result["medians"]
    # The code it ran: the commit and changed files at its start and its end.
    assert result["source"]["start"]["commit"] == result["source"]["end"]["commit"]
    for placement in ("node1", "spread"):
        figures = medians[placement]["broker"]
        assert figures["held"] == DEVICES and figures["errors"] == 0
        assert math.isfinite(figures["kib_per_device"])
    assert {"local_kib", "route_kib", "fleet_kib_6_nodes"} <= set(medians["node1"]["broker"])
    assert medians["single"]["mosquitto"]["held"] == DEVICES
    traced = [run for run in result["runs"] if run["figure"] == "traced"]
    assert [run["broker"] for run in traced] == ["broker"]
    for run in traced:
        for part in ("local", "route"):
            assert run["tracemalloc"][part]["sites"], f"{run['broker']} {part}: no sites"
    # every process the bench started is gone
    assert running_from(tmp_path) == []
