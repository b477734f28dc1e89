"""``python -m tests.fuzz`` (``./dev fuzz``): the long fuzz campaign, one target at a time.

    ./dev fuzz                               every codec target, then the network mutator
    ./dev fuzz --target mqtt --seconds 1200  one target for 20 minutes
    ./dev fuzz --target network --seconds 300

Targets run one after the other (the machine is shared), each bounded by --seconds. The
corpus grows in build/fuzz/corpus/TARGET between runs; a summary (executions, libFuzzer's
edge coverage, lines reached in the target's own modules, findings) is printed and written
to build/fuzz/report.json. A finding's input is in build/fuzz/artifacts/TARGET/; --save
copies it to tests/fuzz/regressions/TARGET/, which tests/test_fuzz.py replays on every run.
The exit status is 1 when anything was found.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.fuzz.network import run_campaign
from tests.fuzz.runner import ROOT, line_coverage, regression_inputs, run_target, save_regression
from tests.fuzz.targets import TARGETS

NETWORK = "network"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev fuzz", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--target",
        action="append",
        choices=[*TARGETS, NETWORK],
        help="a target (repeatable; default: all, network last)",
    )
    parser.add_argument("--seconds", type=float, default=600.0, help="per target (600)")
    parser.add_argument("--runs", type=int, default=-1, help="inputs per target (unbounded)")
    parser.add_argument("--seed", type=int, default=0, help="libFuzzer seed (0: random)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "fuzz")
    parser.add_argument("--save", action="store_true", help="copy findings to regressions/")
    options = parser.parse_args(argv)
    targets = options.target or [*TARGETS, NETWORK]
    workdir: Path = options.workdir.resolve()
    report: dict[str, dict[str, object]] = {}
    found = False
    for target in targets:
        if target == NETWORK:
            outcome = run_campaign(workdir / "network", seconds=options.seconds)
            report[target] = outcome.as_dict()
            found |= not outcome.ok
            print(json.dumps({target: report[target]}, indent=1), flush=True)
            continue
        result = run_target(
            target,
            workdir,
            corpus=workdir / "corpus",
            seconds=options.seconds,
            runs=options.runs,
            seed=options.seed,
        )
        inputs = [
            *sorted((workdir / "corpus" / target).iterdir()),
            *sorted((workdir / "seeds" / target).iterdir()),
            *regression_inputs(target),
        ]
        coverage = line_coverage(target, inputs)
        entry = result.as_dict()
        entry["lines"] = {name: f"{hit}/{total}" for name, (hit, total) in coverage.items()}
        if options.save:
            entry["saved"] = [str(save_regression(target, Path(a))) for a in result.artifacts]
        report[target] = entry
        found |= result.found
        print(
            f"{target:13} {result.seconds:7.0f} s {result.executions:>11,} runs "
            f"cov {result.coverage:5} ft {result.features:6} corpus {result.corpus:5} "
            f"lines {' '.join(f'{n}={v}' for n, v in entry['lines'].items())} "  # type: ignore[union-attr]
            f"{'FOUND ' + ' '.join(result.artifacts) if result.found else 'nothing found'}",
            flush=True,
        )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
