"""Traffic log lines in HAProxy's formats, and where they go.

`option tcplog` is HAProxy's
    %ci:%cp [%t] %ft %b/%s %Tw/%Tc/%Tt %B %ts %ac/%fc/%bc/%sc/%rc %sq/%bq
emitted once per session when it ends (configuration.txt 8.2.2). A refused TLS handshake
never becomes a session; it gets one line of its own, `<ip>:<port> [<date>] <frontend>/<bind>:
<reason>`, where HAProxy says only "SSL handshake failure" and we say why.
Targets: `log stdout|stderr ... format raw` write the bare line; anything else goes
through Python logging under the `lb.traffic` logger.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from lb.config.model import LogTarget

traffic_logger = logging.getLogger("lb.traffic")

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def haproxy_date(epoch: float) -> str:
    """HAProxy's %t: 25/Nov/2026:23:59:01.123 (local time, milliseconds)."""
    moment = time.localtime(epoch)
    milliseconds = int((epoch - int(epoch)) * 1000)
    return (
        f"{moment.tm_mday:02d}/{MONTHS[moment.tm_mon - 1]}/{moment.tm_year}:"
        f"{moment.tm_hour:02d}:{moment.tm_min:02d}:{moment.tm_sec:02d}.{milliseconds:03d}"
    )


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """The fields of one tcplog line."""

    client_ip: str
    client_port: int
    accept_date: float
    frontend: str
    ssl: bool
    backend: str
    server: str | None
    queue_ms: int
    connect_ms: int
    total_ms: int
    bytes_read: int
    termination: str
    process_connections: int
    frontend_connections: int
    backend_connections: int
    server_connections: int
    retries: int
    server_queue: int
    backend_queue: int


def format_tcplog(record: SessionRecord) -> str:
    frontend = record.frontend + ("~" if record.ssl else "")
    server = record.server or "<NOSRV>"
    return (
        f"{record.client_ip}:{record.client_port} [{haproxy_date(record.accept_date)}] "
        f"{frontend} {record.backend}/{server} "
        f"{record.queue_ms}/{record.connect_ms}/{record.total_ms} {record.bytes_read} "
        f"{record.termination} {record.process_connections}/{record.frontend_connections}/"
        f"{record.backend_connections}/{record.server_connections}/{record.retries} "
        f"{record.server_queue}/{record.backend_queue}"
    )


def format_connection_error(
    client_ip: str, client_port: int, accept_date: float, frontend: str, bind: str, message: str
) -> str:
    return f"{client_ip}:{client_port} [{haproxy_date(accept_date)}] {frontend}/{bind}: {message}"


class TrafficLog:
    """Sends traffic lines to the configured targets."""

    def __init__(self, targets: tuple[LogTarget, ...]) -> None:
        self.streams: list[TextIO] = []
        self.use_logging = False
        for target in targets:
            if target.kind == "stdout":
                self.streams.append(sys.stdout)
            elif target.kind == "stderr":
                self.streams.append(sys.stderr)
            else:
                self.use_logging = True

    @property
    def enabled(self) -> bool:
        return bool(self.streams) or self.use_logging

    def emit(self, line: str) -> None:
        for stream in self.streams:
            stream.write(line + "\n")
            stream.flush()
        if self.use_logging:
            traffic_logger.info(line)
