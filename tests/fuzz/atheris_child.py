"""The process atheris runs in: ``python -m tests.fuzz.atheris_child TARGET MODULES [flags]``.

It imports the targets under atheris's import hook, which instruments the bytecode of the
target's own modules (MODULES, comma-separated; every other lb and broker module is left
alone, which keeps startup short and libFuzzer's edge count about the code under test) for
coverage feedback, then hands the target's check to libFuzzer with the flags. Nothing of the
project may be imported before that, or it would run uninstrumented: hence this module of
its own, started by runner.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent.parent


def _all_modules() -> set[str]:
    names = set()
    for package in ("lb", "broker"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def main() -> None:
    name, instrumented, flags = sys.argv[1], set(sys.argv[2].split(",")), sys.argv[3:]
    excluded = sorted(_all_modules() - instrumented)
    with atheris.instrument_imports(include=["lb", "broker"], exclude=excluded):
        from tests.fuzz.targets import TARGETS  # noqa: PLC0415 (instrumented: see above)
    check = TARGETS[name].check
    atheris.Setup([sys.argv[0], *flags], check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
