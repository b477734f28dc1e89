"""The opcode-counting bench's plumbing, with tiny counts: both scenarios run against a
counting broker (plain connect churn at both protocol levels, the fleet's PROXY reconnect to a
persistent session), every figure is there, and the counts name the broker's own code. No
thresholds: what a count means comes from a full `bench/broker_opcodes.py` run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import run_bench

pytestmark = pytest.mark.timeout(180)


def test_counts_python_work_per_connection(tmp_path: Path) -> None:
    output = tmp_path / "opcodes.json"
    run_bench(
        "broker_opcodes.py",
        "--connections",
        "20",
        "--output",
        str(output),
        timeout=150,
    )
    results = json.loads(output.read_text())["results"]
    assert set(results) == {"connect", "connect_v5", "reconnect"}
    for label, by_tree in results.items():
        figure = by_tree["broker"]
        # every connection runs the CONNECT handling at least once
        assert figure["opcodes"] > 100 and figure["python_calls"] > 10, (label, figure)
        functions = dict(figure["functions"])
        assert any("ClientConnection._handle_connect" in name for name in functions), functions
    # the reconnect's PROXY header is decoded (lb's codec) and its session is taken up again
    reconnect = dict(results["reconnect"]["broker"]["functions"])
    assert any(name.startswith("lb/proxyproto.py") for name in reconnect), reconnect
