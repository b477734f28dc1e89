"""Free TCP ports for the real processes of tests and benchmarks.

A port is checked free by binding it, then handed to a server that binds it later. With
bind(0) the kernel picks from its ephemeral range, where the source port of any outgoing
connection on the machine can take the port in between; so ports come from below that
range instead, and each pytest-xdist worker draws from its own slice.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


PORT_LOW = 10000
PORT_HIGH = min(_ephemeral_low(), 32768)


def _worker_slice() -> tuple[int, int]:
    """(first port, number of ports) of this pytest-xdist worker's slice."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), index + 1)
    span = (PORT_HIGH - PORT_LOW) // count
    return PORT_LOW + index * span, span


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))  # also fails when 127.0.0.1:port is bound
        except OSError:
            return False
    return True


# Ports this process handed out: a test that asks for three ports before starting the
# server that binds them must not get one port twice (seen: a node's admin port equal to its
# MQTT port, "address already in use").
_GIVEN: set[int] = set()


def free_port() -> int:
    """A TCP port that nothing on this machine is bound to right now (any address), and that
    this process has not handed out before."""
    low, span = _worker_slice()
    for _ in range(1000):
        port = random.randrange(low, low + span)
        if port not in _GIVEN and _is_free(port):
            if len(_GIVEN) > span // 2:
                _GIVEN.clear()
            _GIVEN.add(port)
            return port
    raise RuntimeError(f"no free port in {low}..{low + span}")


def free_port_block(span: int) -> int:
    """The first of ``span`` consecutive TCP ports that are all free right now, from this
    worker's slice (for a process that listens on a block, like the demo's --base-port)."""
    low, slice_span = _worker_slice()
    for _ in range(200):
        base = random.randrange(low, low + slice_span - span)
        if all(_is_free(port) for port in range(base, base + span)):
            return base
    raise RuntimeError(f"no {span} free consecutive ports in {low}..{low + slice_span}")
