"""The broker benchmark's plumbing, with tiny counts: it starts mosquitto and our broker,
measures every figure (fan-in and fan-out at QoS 0 and 1, latency, connect churn, QoS 1 under
backpressure, idle and device RSS; the load figures in MQTT 3.1.1 and 5.0) and writes JSON
with each figure for each broker. No timing assertions: the numbers only mean something
from a full `bench/broker_bench.py` run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.harness import run_bench, running_from

MOSQUITTO = Path("/usr/sbin/mosquitto")

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not MOSQUITTO.exists(), reason="needs Debian's mosquitto package"),
]

#: figure -> metrics every broker must have in the medians (bench/broker_bench.py REQUIRED)
FIGURES = {
    "fanin_q0": ("rate", "cpu_us", "gen_ceiling"),
    "fanout_q0": ("rate", "cpu_us", "gen_ceiling"),
    "fanin_q1": ("rate", "cpu_us", "delivered", "gen_ceiling"),
    "fanout_q1": ("rate", "cpu_us", "delivered", "gen_ceiling"),
    "latency": ("p50_ms", "p99_ms", "samples"),
    "connect": ("rate", "cpu_us", "gen_ceiling"),
    "backpressure": ("p50_ms", "p99_ms", "samples", "rate", "delivered"),
    "idle": ("kib_per_conn", "held"),
    "devices": ("kib_per_conn", "held"),
    "fanin_q1_v5": ("rate", "cpu_us", "delivered", "gen_ceiling"),
    "connect_v5": ("rate", "cpu_us", "gen_ceiling"),
}
BROKERS = ("mosquitto", "broker")


def test_suite_measures_every_figure_for_both_brokers(tmp_path: Path) -> None:
    output = tmp_path / "result.json"
    run_bench(
        "broker_bench.py",
        "--repeats",
        "1",
        "--duration",
        "0.4",
        "--warmup",
        "0.2",
        "--publishers",
        "2",
        "--subscribers",
        "2",
        "--latency-rate",
        "200",
        "--idle",
        "20",
        "--connectors",
        "2",
        "--mqtt",
        "4,5",
        "--no-pin",
        "--workdir",
        str(tmp_path),
        "--output",
        str(output),
        timeout=280,
    )
    result = json.loads(output.read_text())
    medians = result["medians"]
    for figure, metrics in FIGURES.items():
        assert figure in medians, f"{figure} missing: {sorted(medians)}"
        for metric in metrics:
            values = medians[figure].get(metric, {})
            for broker in BROKERS:
                assert broker in values, f"{figure}.{metric} has no value for {broker}"
                assert isinstance(values[broker], float | int)
    for broker in BROKERS:
        assert medians["idle"]["held"][broker] == 20
        assert medians["devices"]["held"][broker] == 20
        assert medians["latency"]["samples"][broker] > 0
        assert medians["backpressure"]["samples"][broker] > 0
        for figure in (
            "fanin_q0",
            "fanout_q0",
            "fanin_q1",
            "fanout_q1",
            "connect",
            "fanin_q0_v5",
            "fanout_q1_v5",
            "connect_v5",
        ):
            rate = medians[figure]["rate"][broker]
            assert math.isfinite(rate) and rate > 0, f"{figure}: nothing delivered by {broker}"
    assert "broker / mosquitto" in result["table"]
    # The code it ran: the commit and changed files at its start and its end.
    assert result["source"]["start"]["commit"] == result["source"]["end"]["commit"]
    # every process the suite started is gone
    assert running_from(tmp_path) == []
