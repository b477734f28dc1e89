"""Counting the Python work of a server process (bench/broker_opcodes.py, bench/lb_opcodes.py).

The process under count is started as ``python -c BOOT ARGS``: BOOT (``boot()``) installs a
``sys.settrace`` tracer with opcode events and a ``sys.setprofile`` profiler for calls into C,
both switched on by one signal and off by another, and then runs the server's own ``main()``.
Forked workers inherit the handlers. At the stop signal the counts (opcodes by code object,
Python calls, C calls, the busiest functions) go to a JSON file, read with ``read_counts``.
The counts do not depend on the machine's load; they do not see time spent in C.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

__all__ = ["boot", "per_unit", "read_counts"]

_BOOT = """
import collections, json, os, signal, sys
sys.path.insert(0, {source!r})
opcodes = collections.Counter()
totals = [0, 0]  # Python calls, C calls

def local(frame, event, arg):
    if event == "opcode":
        opcodes[frame.f_code] += 1
    return local

def tracer(frame, event, arg):
    frame.f_trace_opcodes = True
    totals[0] += 1
    return local

def profiler(frame, event, arg):
    if event == "c_call":
        totals[1] += 1

def start(signum, frame):
    opcodes.clear()
    totals[:] = [0, 0]
    sys.settrace(tracer)
    sys.setprofile(profiler)

def stop(signum, frame):
    sys.settrace(None)
    sys.setprofile(None)
    functions = collections.Counter()
    for code, count in opcodes.items():
        name = code.co_filename.replace({source!r} + "/", "")
        functions[f"{{name}}:{{code.co_firstlineno}} {{code.co_qualname}}"] += count
    with open({output!r} + ".tmp", "w") as file:
        json.dump({{"opcodes": sum(opcodes.values()), "python_calls": totals[0],
                   "c_calls": totals[1], "functions": functions.most_common({top})}}, file)
    os.replace({output!r} + ".tmp", {output!r})

signal.signal({start_signal}, start)
signal.signal({stop_signal}, stop)
sys.argv[0] = {program!r}
from {module} import main
raise SystemExit(main())
"""


def boot(
    source: Path,
    output: Path,
    *,
    module: str,
    program: str,
    start_signal: int,
    stop_signal: int,
    top: int,
) -> str:
    """The ``python -c`` text that runs ``module``'s main() (from the tree ``source``) under
    the counter, with ``program`` as its argv[0]; counts go to ``output``."""
    return _BOOT.format(
        source=str(source),
        output=str(output),
        module=module,
        program=program,
        start_signal=int(start_signal),
        stop_signal=int(stop_signal),
        top=top,
    )


def read_counts(output: Path, timeout: float) -> dict[str, Any]:
    """The counts the process wrote at the stop signal (waited for up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if output.exists():
            result: dict[str, Any] = json.loads(output.read_text())
            return result
        time.sleep(0.05)
    raise TimeoutError(f"no counts in {output}")


def per_unit(counts: dict[str, Any], units: int) -> dict[str, Any]:
    """Counts per connection (or session): opcodes, Python calls, C calls, by function."""
    return {
        "opcodes": counts["opcodes"] / units,
        "python_calls": counts["python_calls"] / units,
        "c_calls": counts["c_calls"] / units,
        "functions": [(name, opcodes / units) for name, opcodes in counts["functions"]],
    }
