"""The demo's ports: which are taken and by whom, a free block for ``--base-port``, and the
configs of a run whose ports were moved.

The seed's ports (1883, 8091, 18083, 5371, ...) are ones people already use: Debian's
mosquitto listens on 1883 as soon as it is installed. So the demo checks every port before it
starts anything, names the ones that are taken (with the process that holds each, where
/proc tells), and offers ``--base-port``, which moves the whole topology into a block of
:data:`topology.BASE_PORT_SPAN` ports. Nothing here stops another process: they are not ours.
"""

from __future__ import annotations

import os
import random
import re
import socket
from collections.abc import Iterable
from pathlib import Path

from demo import topology

# A block is looked for below the kernel's ephemeral range, where outgoing connections take
# their source ports (see bench/ports.py for the same reasoning).
SEARCH_LOW = 20000
SEARCH_TRIES = 200
TCP_LISTEN = "0A"  # /proc/net/tcp state of a listening socket
ADDRESS = re.compile(r"(?P<host>[0-9.]+):(?P<port>\d+)")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def is_free(port: int, host: str = topology.LOCAL_HOST) -> bool:
    with socket.socket() as probe:
        # As a server binds: connections in TIME_WAIT do not make a port busy.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def busy(ports: Iterable[int]) -> list[int]:
    return [port for port in ports if not is_free(port)]


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != TCP_LISTEN:
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def holder(port: int) -> str | None:
    """``"mosquitto (pid 812)"`` for the process listening on ``port``, if /proc says."""
    inodes = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for descriptor in (entry / "fd").iterdir():
                if os.readlink(descriptor) in inodes:
                    name = (entry / "comm").read_text().strip()
                    return f"{name} (pid {entry.name})"
        except OSError:  # gone, or not ours to look at
            continue
    return None


def describe(port: int) -> str:
    who = holder(port)
    return f"{port} ({who})" if who else str(port)


def ranges(ports: Iterable[int]) -> str:
    """1883-1885, 8091, ...: the ports as a person reads them."""
    ordered = sorted(set(ports))
    parts: list[str] = []
    start = previous = ordered[0] if ordered else 0
    for port in [*ordered[1:], None]:
        if port is not None and port == previous + 1:
            previous = port
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if port is not None:
            start = previous = port
    return ", ".join(parts) if ordered else ""


def free_base_port(rng: random.Random | None = None) -> int:
    """A base port whose whole block is free now (it may be taken before the demo binds)."""
    chooser = rng or random.Random()
    high = _ephemeral_low() - topology.BASE_PORT_SPAN
    for _ in range(SEARCH_TRIES):
        base = chooser.randrange(SEARCH_LOW, high, 100)
        if not busy(topology.layout(base).ports()):
            return base
    raise RuntimeError(f"no free block of {topology.BASE_PORT_SPAN} ports in {SEARCH_LOW}..{high}")


def taken_message(where: topology.Layout, taken: list[int]) -> str:
    """What to say when some of the layout's ports are taken, and how to choose others."""
    text = f"port(s) in use on {topology.LOCAL_HOST}: {', '.join(describe(p) for p in taken)}. "
    text += f"The demo needs {ranges(where.ports())}; "
    try:
        suggestion = free_base_port()
    except RuntimeError:
        return text + "choose others with --base-port PORT."
    block = topology.layout(suggestion)
    return text + (
        f"choose others with --base-port PORT (e.g. --base-port {suggestion}: "
        f"{ranges(block.ports())}, free now), or --base-port auto."
    )


def write_moved_configs(where: topology.Layout) -> list[Path]:
    """configs/haproxy.cfg and broker-N.toml with the layout's ports, in MOVED_CONFIG_DIR.

    Each ``127.0.0.1:PORT`` of the originals becomes the same listener's port in ``where``;
    the certificates stay where they are (a ``certs`` link next to the moved files), so the
    files differ from the originals in their ports only.
    """
    ports = where.moved_ports()
    directory = topology.ROOT / topology.MOVED_CONFIG_DIR
    directory.mkdir(parents=True, exist_ok=True)
    certs = directory / "certs"
    if not certs.is_symlink():
        certs.symlink_to(os.path.relpath(topology.ROOT / topology.CERTS_DIR, directory))

    unknown: list[int] = []

    def move(match: re.Match[str]) -> str:
        port = int(match["port"])
        if match["host"] != topology.LOCAL_HOST:
            return match[0]
        if port not in ports:
            unknown.append(port)
            return match[0]
        return f"{match['host']}:{ports[port]}"

    written = []
    originals = zip(
        [topology.LB_CONFIG, *(member.config for member in topology.nodes(len(where.nodes)))],
        [where.lb_config, *(member.config for member in where.nodes)],
        strict=True,
    )
    for original, moved in originals:
        text = ADDRESS.sub(move, (topology.ROOT / original).read_text())
        if unknown:
            raise ValueError(f"{original}: port(s) {unknown} are not the topology's")
        path = topology.ROOT / moved
        path.write_text(text)
        written.append(path)
    return written
