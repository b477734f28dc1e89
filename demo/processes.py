"""The demo's child processes: started in their own process groups, logged to files, stopped.

Each child runs in a new session (its own process group), so a Ctrl-C at the terminal reaches
only the demo, which then stops the children in order: SIGTERM to each group, a bounded
wait, SIGKILL for what is left. ``--keep`` records the groups in ``demo/out/pids.json`` so
that ``python -m demo --stop`` can end them later; it only signals a recorded process whose
command line is still the one recorded (a pid may have been reused since).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from demo import topology

STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.05
PIDS_FILE = "pids.json"

# Programs the topology names, and the module that is the same program where no script is.
MODULES = {"lb": "lb", "broker": "broker", "lb-pki": "lb.pki.cli"}


def resolve(command: Sequence[str]) -> list[str]:
    """A topology command as this interpreter runs it (the venv's python and scripts)."""
    program, *arguments = command
    if program == "python":
        return [sys.executable, *arguments]
    script = Path(sys.executable).parent / program
    if script.exists():
        return [str(script), *arguments]
    found = shutil.which(program)
    if found is not None:
        return [found, *arguments]
    if program in MODULES:
        return [sys.executable, "-m", MODULES[program], *arguments]
    return list(command)


@dataclass
class Child:
    """One started process and where its output goes."""

    name: str
    command: tuple[str, ...]
    log: Path
    popen: subprocess.Popen[bytes]
    log_file: IO[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start(name: str, command: tuple[str, ...], out_dir: Path) -> Child:
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / f"{name}.log"
    log_file = log.open("wb")
    popen = subprocess.Popen(
        resolve(command),
        cwd=topology.ROOT,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Child(name, command, log, popen, log_file)


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop(children: Sequence[Child], timeout: float = STOP_TIMEOUT) -> tuple[list[str], list[str]]:
    """SIGTERM every child's group, wait, SIGKILL the rest: (names stopped, names killed)."""
    running = [child for child in children if child.alive()]
    for child in running:
        _signal_group(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    killed: list[str] = []
    for child in running:
        try:
            child.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(child.pid, signal.SIGKILL)
            child.popen.wait()
            killed.append(child.name)
    for child in children:
        child.log_file.close()
    return [child.name for child in running], killed


def save(children: Iterable[Child], out_dir: Path) -> Path:
    path = out_dir / PIDS_FILE
    records = [
        {"name": child.name, "pid": child.pid, "command": list(child.command)} for child in children
    ]
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def stop_saved(out_dir: Path, timeout: float = STOP_TIMEOUT) -> list[str]:
    """Stop the processes a ``--keep`` run recorded; returns what was stopped."""
    path = out_dir / PIDS_FILE
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    stopped: list[tuple[str, int]] = []
    for record in records:
        pid = int(record["pid"])
        arguments = record["command"][1:]
        cmdline = _cmdline(pid)
        # Still ours: the recorded arguments end the live command line.
        if arguments and cmdline[-len(arguments) :] == arguments:
            _signal_group(pid, signal.SIGTERM)
            stopped.append((record["name"], pid))
    deadline = time.monotonic() + timeout
    for _, pid in stopped:
        while _cmdline(pid) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        if _cmdline(pid):
            _signal_group(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return [f"{name} (pid {pid})" for name, pid in stopped]
