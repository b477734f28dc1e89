"""The benchmark suite's plumbing, with tiny counts: it starts both balancers, measures
every figure and writes JSON with each figure for each balancer. No timing assertions:
the numbers themselves only mean something from a full `./dev bench` run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import run_bench, running_from

pytestmark = [pytest.mark.haproxy, pytest.mark.timeout(300)]

FIGURES = (
    "handshake_ecdsa",
    "handshake_rsa",
    "resume_tls13",
    "resume_tls12_tickets",
    "resume_tls12_ids",
    "bulk_1",
    "bulk_16",
    "rr_200",
    "idle",
)


def test_suite_measures_every_figure_for_both_balancers(tmp_path: Path) -> None:
    output = tmp_path / "result.json"
    completed = run_bench(
        "run.py",
        "--repeats",
        "1",
        "--duration",
        "0.3",
        "--idle",
        "20",
        "--no-pin",
        "--output",
        str(output),
        "--workdir",
        str(tmp_path),
        timeout=280,
    )
    result = json.loads(output.read_text())
    assert result["balancers"] == ["haproxy", "lb"]
    # The code it ran: the commit and changed files at its start and its end.
    assert result["source"]["start"]["commit"] == result["source"]["end"]["commit"]
    for figure in FIGURES:
        assert set(result["medians"][figure]["errors"]) == {"haproxy", "lb"}, figure
    for balancer in ("haproxy", "lb"):
        assert result["medians"]["handshake_ecdsa"]["ops"][balancer] > 0
        assert result["medians"]["bulk_1"]["mb_s"][balancer] > 0
        assert result["medians"]["rr_200"]["p99_ms"][balancer] > 0
        assert result["medians"]["idle"]["held"][balancer] == 20
    assert "| figure |" in completed.stdout
    # Nothing it started is left running.
    assert not running_from(tmp_path)
