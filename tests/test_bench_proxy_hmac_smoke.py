"""bench/proxy_hmac_bench.py's plumbing with tiny counts: both figures for both variants,
as JSON. No timing assertion: the numbers mean something only from a full run."""

from __future__ import annotations

import json

import pytest

from tests.harness import run_bench

pytestmark = pytest.mark.timeout(120)


def test_hmac_bench_measures_both_variants() -> None:
    completed = run_bench(
        "proxy_hmac_bench.py",
        "--rounds",
        "1",
        "--number",
        "200",
        "--connections",
        "20",
        timeout=110,
    )
    result = json.loads(completed.stdout)
    for figure in ("codec", "end_to_end"):
        medians = result[figure]["medians"]
        assert set(medians) == {"no_mac", "mac"}
        for variant in ("no_mac", "mac"):  # CPU ticks are 10 ms: 20 connections may read 0
            assert {"lb_us", "broker_us"} <= set(medians[variant])
            assert medians[variant]["lb_us"] >= 0 and medians[variant]["broker_us"] >= 0
    assert "lb_us" in result["codec"]["ratio_mac_over_no_mac"]
