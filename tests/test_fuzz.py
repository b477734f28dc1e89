"""The short pass of the fuzz campaign (tests/fuzz), run by ./dev test on every change.

- Every seed, every prefix of it, and every saved regression input goes through each
  target's contract check in this process (a few milliseconds per target).
- Each target then runs under atheris for a fixed number of inputs with a fixed seed: the
  same inputs on every run, so a failure here is a change in the code, never luck. The long,
  random campaign is ``./dev fuzz``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.runner import regression_inputs, run_target
from tests.fuzz.seeds import SEEDS
from tests.fuzz.targets import TARGETS

pytestmark = pytest.mark.timeout(180)

#: Inputs per target in the short pass: one to two seconds each on an idle core here.
SHORT_RUNS = {
    "proxy": 8_000,
    "mqtt": 10_000,
    "cluster": 15_000,
    "control": 10_000,
    "haproxy-cfg": 400,
    "broker-toml": 1_000,
    "authz-policy": 4_000,
}


def test_every_target_has_seeds_and_a_short_pass() -> None:
    assert set(SEEDS) == set(TARGETS) == set(SHORT_RUNS)


@pytest.mark.parametrize("target", list(TARGETS))
def test_seeds_their_prefixes_and_regressions_keep_the_contract(target: str) -> None:
    check = TARGETS[target].check
    seeds = [data for _, data in SEEDS[target]()]
    assert len(seeds) >= 8, "a target needs seeds from the spec vectors"
    for data in seeds:
        check(data)
        step = max(1, len(data) // 64)  # every prefix of a frame, some of a config file
        for end in range(0, len(data), step):
            check(data[:end])
    for path in regression_inputs(target):
        check(path.read_bytes())


@pytest.mark.parametrize("target", list(TARGETS))
def test_short_coverage_guided_pass(target: str, tmp_path: Path) -> None:
    result = run_target(
        target,
        tmp_path,
        corpus=tmp_path / "corpus",
        seconds=60,  # a bound for a very loaded machine; the pass stops on runs
        runs=SHORT_RUNS[target],
        seed=1,
    )
    log = Path(result.log).read_text(errors="replace")
    assert not result.found, f"{target}: {result.artifacts}\n{log[-4000:]}"
    # The harness really ran, instrumented: inputs executed and edges of the target reached.
    assert result.executions > 0 and result.coverage > 0, log[-2000:]
