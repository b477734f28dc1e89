"""The lb opcode-counting bench's plumbing, with a tiny count: sessions through a counting lb
worker (the demo's config: mutual TLS, PROXY v2 with the TLS TLVs, a log line per session),
every figure is there, and the counts name lb's own session path. No thresholds: what a
count means comes from a full `bench/lb_opcodes.py` run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import run_bench

pytestmark = pytest.mark.timeout(180)


def test_counts_python_work_per_session(tmp_path: Path) -> None:
    output = tmp_path / "opcodes.json"
    run_bench(
        "lb_opcodes.py",
        "--sessions",
        "20",
        "--messages",  # and the steady relay's path: telemetry echoed through each session
        "3",
        "--output",
        str(output),
        timeout=150,
    )
    [figure] = json.loads(output.read_text())["results"]["lb"]
    assert figure["opcodes"] > 1000 and figure["python_calls"] > 50, figure
    functions = dict(figure["functions"])
    # every session is handed to a server with its PROXY header and ends with a log line
    assert any("FrontendRuntime._proxy_v2" in name for name in functions), functions
    assert any("FrontendRuntime._record" in name for name in functions), functions
    # and the records each way, on their fast path (one record per read, one per write)
    assert any(name.endswith(" Records.open") for name in functions), functions
    assert any(name.endswith(" Records.seal") for name in functions), functions
