"""Traffic log lines in HAProxy's formats, and where they go.

Owns the three things HAProxy's logging does for a TCP proxy (configuration.txt 8.2):

- **Formats.** `option tcplog` is HAProxy's
  `%ci:%cp [%t] %ft %b/%s %Tw/%Tc/%Tt %B %ts %ac/%fc/%bc/%sc/%rc %sq/%bq`, emitted once per
  session when it ends (8.2.2). `log-format` takes the same variables plus the `%[fetch]`
  samples we have (8.2.4); `LogFormat` compiles the string once and renders a
  `SessionRecord`. A missing value renders as `-`, as HAProxy does.
- **Targets** (section 4.2 `log`): `stdout`/`stderr`/`fd@N` write a line to a descriptor,
  `/dev/log` (any path) sends a datagram on a unix socket, `host:port` sends a UDP datagram.
  Framing is `raw` (the bare line), `rfc3164` (`<134>Nov 26 00:01:06 haproxy[pid]: line`) or
  `rfc5424` (`<134>1 2026-11-26T00:01:06.519617+00:00 - haproxy pid - - line`), byte for byte
  what HAProxy 2.6 sends. Sending never blocks: a datagram the kernel refuses is dropped and
  counted (HAProxy's DroppedLogs).
- **Refused handshakes.** A refused TLS handshake never becomes a session; it gets one line
  of its own, `<ip>:<port> [<date>] <frontend>/<bind>: <reason>`, where HAProxy says only
  "SSL handshake failure" and we say why. A token bucket (`lb.ratelimit.RateLimiter`) keeps
  a flood of bad clients from flooding the log; what it held back is reported as
  "N similar lines suppressed".

Lines from other modules that an operator expects among the traffic lines (server state
changes from the health checks) reach the global targets through `GlobalLogHandler`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Literal

from lb.config.model import LogTarget
from lb.log_format import (
    MONTHS,
    TCPLOG,
    TCPLOG_FORMAT,
    LogFormat,
    LogFormatError,
    SessionRecord,
    haproxy_date,
)
from lb.ratelimit import (
    DEFAULT_BURST,
    DEFAULT_RATE,
    REPORT_INTERVAL,
    RateLimiter,
    SuppressedLines,
)

__all__ = [
    "TCPLOG",
    "TCPLOG_FORMAT",
    "GlobalLogHandler",
    "LogFormat",
    "LogFormatError",
    "LogSink",
    "RateLimiter",
    "SessionRecord",
    "TrafficLog",
    "connection_error_log",
    "format_connection_error",
    "frame",
    "haproxy_date",
    "install_global_handler",
    "remove_global_handler",
]

logger = logging.getLogger(__name__)
traffic_logger = logging.getLogger("lb.traffic")


#: syslog facilities in code order (RFC 5424 6.2.1; HAProxy's log_facilities).
FACILITIES = (
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news",
    "uucp", "cron", "auth2", "ftp", "ntp", "audit", "alert", "cron2",
    "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
)  # fmt: skip
#: syslog severities in code order (RFC 5424 6.2.1; HAProxy's log_levels).
LEVELS = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
Level = Literal["emerg", "alert", "crit", "err", "warning", "notice", "info", "debug"]

#: HAProxy's tag in syslog headers (global `log-tag`, default the program name "haproxy"):
#: we keep "haproxy" so that log pipelines written for HAProxy parse our lines unchanged.
DEFAULT_TAG = "haproxy"


#: Refused-handshake lines: a burst of this many, then this many per second (lb.ratelimit).
ERROR_LINE_BURST = DEFAULT_BURST
ERROR_LINE_RATE = DEFAULT_RATE
#: How often the count of suppressed lines is reported while a flood lasts (seconds).
SUPPRESSED_REPORT_INTERVAL = REPORT_INTERVAL


def format_connection_error(
    client_ip: str, client_port: int, accept_date: float, frontend: str, bind: str, message: str
) -> str:
    return f"{client_ip}:{client_port} [{haproxy_date(accept_date)}] {frontend}/{bind}: {message}"


# --------------------------------------------------------------------------------------------
# Syslog framing


def priority(facility: str, level: str) -> int:
    return FACILITIES.index(facility) * 8 + LEVELS.index(level)


def frame(
    line: str,
    *,
    framing: str,
    facility: str,
    level: str,
    now: float,
    pid: int,
    tag: str = DEFAULT_TAG,
    hostname: str = "-",
) -> str:
    """One message as HAProxy 2.6 sends it (src/log.c, update_log_hdr*), newline included."""
    if framing == "raw":
        return line + "\n"
    pri = priority(facility, level)
    if framing == "rfc5424":
        stamp = dt.datetime.fromtimestamp(now).astimezone().isoformat(timespec="microseconds")
        return f"<{pri}>1 {stamp} {hostname} {tag} {pid} - - {line}\n"
    if framing in ("rfc3164", "local", "short", "priority", "timed", "iso"):
        moment = time.localtime(now)
        if framing == "short":
            return f"<{pri}>{line}\n"
        stamp = (
            f"{MONTHS[moment.tm_mon - 1]} {moment.tm_mday:2d} "
            f"{moment.tm_hour:02d}:{moment.tm_min:02d}:{moment.tm_sec:02d}"
        )
        return f"<{pri}>{stamp} {tag}[{pid}]: {line}\n"
    return line + "\n"


# --------------------------------------------------------------------------------------------
# Targets


class LogSink:
    """One `log` target: where its datagrams or lines go, and its framing and filters."""

    __slots__ = ("destination", "dropped", "fd", "level_limit", "sock", "target")

    def __init__(self, target: LogTarget) -> None:
        self.target = target
        self.dropped = 0
        self.sock: socket.socket | None = None
        self.fd: int | None = None
        self.destination: str | tuple[str, int] | None = None
        self.level_limit = LEVELS.index(target.level) if target.level in LEVELS else len(LEVELS)
        if target.kind == "stdout":
            self.fd = 1
        elif target.kind == "stderr":
            self.fd = 2
        elif target.kind == "fd":
            self.fd = int(target.address)
        elif target.kind == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.setblocking(False)
            self.destination = target.address
        else:
            family = socket.AF_INET6 if ":" in target.address else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
            self.sock.setblocking(False)
            self.destination = (target.address, target.port or 514)

    @property
    def framing(self) -> str:
        return self.target.format

    def send(self, line: str, level: str, now: float, pid: int) -> None:
        if LEVELS.index(level) > self.level_limit:
            return
        message = frame(
            line[: max(self.target.length - 1, 1)] if self.fd is None else line,
            framing=self.framing,
            facility=self.target.facility,
            level=level,
            now=now,
            pid=pid,
        )
        data = message.encode("utf-8", "replace")
        try:
            if self.fd is not None:
                os.write(self.fd, data)
            else:
                assert self.sock is not None and self.destination is not None
                self.sock.sendto(data, self.destination)
        except OSError:
            # A full socket buffer, a syslog daemon that is not running: never block the
            # data path for a log line (HAProxy counts these as DroppedLogs).
            self.dropped += 1

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


class TrafficLog:
    """Sends traffic lines to the configured targets."""

    def __init__(self, targets: Sequence[LogTarget]) -> None:
        self.sinks = [LogSink(target) for target in targets]
        self.pid = os.getpid()

    @property
    def enabled(self) -> bool:
        return bool(self.sinks)

    @property
    def dropped(self) -> int:
        return sum(sink.dropped for sink in self.sinks)

    def emit(self, line: str, level: str = "info") -> None:
        now = time.time()
        pid = os.getpid()  # workers are forked after the config is loaded
        for sink in self.sinks:
            sink.send(line, level, now, pid)
        if not self.sinks:
            traffic_logger.info(line)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


# --------------------------------------------------------------------------------------------
# Rate limiting of refused-handshake lines


def connection_error_log(
    log: TrafficLog,
    frontend: str,
    clock: Callable[[], float],
    schedule: Callable[[float, Callable[[], None]], object],
    *,
    rate: float = ERROR_LINE_RATE,
    burst: int = ERROR_LINE_BURST,
) -> SuppressedLines:
    """Refused-handshake lines of one frontend, rate limited: to the traffic log (info; the
    report "N similar lines suppressed" a warning), or, without one, to the process log.

    `schedule(delay, callback)` is the event loop's call_later; while lines are being
    suppressed the report comes every SUPPRESSED_REPORT_INTERVAL seconds, and once more when
    the flood is over."""

    def write(line: str, level: str = "info") -> None:
        if log.enabled:
            log.emit(line, level)
        else:
            logger.warning("%s", line)

    return SuppressedLines(
        write,
        f"frontend {frontend}",
        "refused TLS handshakes",
        clock,
        schedule,
        rate=rate,
        burst=burst,
        interval=SUPPRESSED_REPORT_INTERVAL,
        write_report=lambda line: write(line, "warning"),
    )


# --------------------------------------------------------------------------------------------
# Python logging records (health checks, server state) to the global targets

#: Loggers whose records an operator expects among HAProxy's own lines.
FORWARDED_LOGGERS = ("lb.health", "lb.checks", "lb.server", "lb.balance")


def syslog_level(levelno: int) -> str:
    if levelno >= logging.CRITICAL:
        return "alert"
    if levelno >= logging.ERROR:
        return "err"
    if levelno >= logging.WARNING:
        return "warning"
    if levelno >= logging.INFO:
        return "notice"
    return "debug"


class GlobalLogHandler(logging.Handler):
    """Sends the records of FORWARDED_LOGGERS to the global `log` targets."""

    def __init__(self, log: TrafficLog) -> None:
        super().__init__(logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.log.emit(record.getMessage(), syslog_level(record.levelno))
        except Exception:  # a log handler must never raise into the caller
            self.handleError(record)


def install_global_handler(targets: Sequence[LogTarget]) -> GlobalLogHandler | None:
    """Forward health and server-state records to the global targets (none: do nothing)."""
    if not targets:
        return None
    handler = GlobalLogHandler(TrafficLog(targets))
    for name in FORWARDED_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    return handler


def remove_global_handler(handler: GlobalLogHandler | None) -> None:
    if handler is None:
        return
    for name in FORWARDED_LOGGERS:
        logging.getLogger(name).removeHandler(handler)
    handler.log.close()
