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
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from lb.config.model import LogTarget
from lb.ratelimit import DEFAULT_BURST, DEFAULT_RATE, REPORT_INTERVAL, RateLimiter

logger = logging.getLogger(__name__)
traffic_logger = logging.getLogger("lb.traffic")

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

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

TCPLOG_FORMAT = "%ci:%cp [%t] %ft %b/%s %Tw/%Tc/%Tt %B %ts %ac/%fc/%bc/%sc/%rc %sq/%bq"

#: Refused-handshake lines: a burst of this many, then this many per second (lb.ratelimit).
ERROR_LINE_BURST = DEFAULT_BURST
ERROR_LINE_RATE = DEFAULT_RATE
#: How often the count of suppressed lines is reported while a flood lasts (seconds).
SUPPRESSED_REPORT_INTERVAL = REPORT_INTERVAL


def haproxy_date(epoch: float) -> str:
    """HAProxy's %t: 25/Nov/2026:23:59:01.123 (local time, milliseconds)."""
    seconds, milliseconds = divmod(round(epoch * 1000), 1000)
    moment = time.localtime(seconds)
    return (
        f"{moment.tm_mday:02d}/{MONTHS[moment.tm_mon - 1]}/{moment.tm_year}:"
        f"{moment.tm_hour:02d}:{moment.tm_min:02d}:{moment.tm_sec:02d}.{milliseconds:03d}"
    )


# --------------------------------------------------------------------------------------------
# Session records and log-format


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """The fields of one session's log line (the log-format variables)."""

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
    frontend_ip: str = "-"
    frontend_port: int = 0
    server_ip: str | None = None
    server_port: int | None = None
    bytes_uploaded: int = 0
    bind_name: str = "-"
    ssl_protocol: str | None = None
    ssl_cipher: str | None = None
    ssl_verify: int | None = None  # None without TLS; 0 = verified or no certificate
    ssl_client_used: bool = False
    ssl_client_subject: tuple[tuple[str, str], ...] = ()  # (short name, value), in order
    ssl_client_issuer: tuple[tuple[str, str], ...] = ()
    pid: int = 0


class LogFormatError(ValueError):
    """A log-format string we cannot render (unknown variable or fetch)."""


Renderer = Callable[[SessionRecord], str]


def _dash(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _one_line_dn(parts: tuple[tuple[str, str], ...]) -> str | None:
    """OpenSSL's X509_NAME_oneline form (/C=CN/O=emqx/CN=device-001), as HAProxy's
    ssl_c_s_dn without an argument."""
    if not parts:
        return None
    return "".join(f"/{name}={value}" for name, value in parts)


def _dn_entry(parts: tuple[tuple[str, str], ...], wanted: str, occurrence: int) -> str | None:
    values = [value for name, value in parts if name.lower() == wanted.lower()]
    if not values:
        return None
    index = occurrence - 1 if occurrence > 0 else len(values) + occurrence
    return values[index] if 0 <= index < len(values) else None


VARIABLES: dict[str, Renderer] = {
    "ci": lambda r: r.client_ip,
    "cp": lambda r: str(r.client_port),
    "fi": lambda r: r.frontend_ip,
    "fp": lambda r: str(r.frontend_port),
    "f": lambda r: r.frontend,
    "ft": lambda r: r.frontend + ("~" if r.ssl else ""),
    "b": lambda r: r.backend,
    "s": lambda r: r.server or "<NOSRV>",
    "si": lambda r: _dash(r.server_ip),
    "sp": lambda r: _dash(r.server_port),
    "t": lambda r: haproxy_date(r.accept_date),
    "Tw": lambda r: str(r.queue_ms),
    "Tc": lambda r: str(r.connect_ms),
    "Tt": lambda r: str(r.total_ms),
    "B": lambda r: str(r.bytes_read),
    "U": lambda r: str(r.bytes_uploaded),
    "ts": lambda r: r.termination,
    "ac": lambda r: str(r.process_connections),
    "fc": lambda r: str(r.frontend_connections),
    "bc": lambda r: str(r.backend_connections),
    "sc": lambda r: str(r.server_connections),
    "rc": lambda r: str(r.retries),
    "sq": lambda r: str(r.server_queue),
    "bq": lambda r: str(r.backend_queue),
    "pid": lambda r: str(r.pid or os.getpid()),
    "sslv": lambda r: _dash(r.ssl_protocol),
    "sslc": lambda r: _dash(r.ssl_cipher),
}

_FETCH = re.compile(r"(?P<name>[a-z0-9_.]+)(?:\((?P<args>[^)]*)\))?")


def _compile_fetch(text: str) -> Renderer:
    """A `%[fetch]` sample; converters (`,lower`) are not supported."""
    match = _FETCH.fullmatch(text.strip())
    if match is None:
        raise LogFormatError(f"unsupported sample expression '%[{text}]'")
    name = match["name"]
    args = [a.strip() for a in (match["args"] or "").split(",") if a.strip()]
    if name in ("ssl_c_s_dn", "ssl_c_i_dn"):
        field_name = "ssl_client_subject" if name == "ssl_c_s_dn" else "ssl_client_issuer"
        if not args:
            return lambda r: _dash(_one_line_dn(getattr(r, field_name)))
        wanted = args[0]
        occurrence = int(args[1]) if len(args) > 1 else 1
        return lambda r: _dash(_dn_entry(getattr(r, field_name), wanted, occurrence))
    if args:
        raise LogFormatError(f"sample fetch '{name}' takes no argument")
    simple: dict[str, Renderer] = {
        "ssl_fc_protocol": lambda r: _dash(r.ssl_protocol),
        "ssl_fc_cipher": lambda r: _dash(r.ssl_cipher),
        "ssl_c_verify": lambda r: _dash(r.ssl_verify),
        "ssl_c_used": lambda r: "-" if not r.ssl else str(int(r.ssl_client_used)),
        "ssl_fc": lambda r: str(int(r.ssl)),
        "src": lambda r: r.client_ip,
        "src_port": lambda r: str(r.client_port),
        "dst": lambda r: r.frontend_ip,
        "dst_port": lambda r: str(r.frontend_port),
        "fe_name": lambda r: r.frontend,
        "be_name": lambda r: r.backend,
        "srv_name": lambda r: _dash(r.server),
    }
    if name not in simple:
        known = ", ".join(sorted([*simple, "ssl_c_s_dn", "ssl_c_i_dn"]))
        raise LogFormatError(f"unsupported sample fetch '{name}' (known: {known})")
    return simple[name]


class LogFormat:
    """A compiled `log-format` string (configuration.txt 8.2.4)."""

    __slots__ = ("parts", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.parts: list[str | Renderer] = []
        literal: list[str] = []
        index = 0
        while index < len(text):
            char = text[index]
            if char != "%":
                literal.append(char)
                index += 1
                continue
            index += 1
            if index < len(text) and text[index] == "%":
                literal.append("%")
                index += 1
                continue
            if index < len(text) and text[index] == "{":  # flags such as %{+Q}: not rendered
                end = text.find("}", index)
                if end < 0:
                    raise LogFormatError("unterminated '%{' flags")
                index = end + 1
            if literal:
                self.parts.append("".join(literal))
                literal = []
            if index < len(text) and text[index] == "[":
                end = text.find("]", index)
                if end < 0:
                    raise LogFormatError("unterminated '%[' sample expression")
                self.parts.append(_compile_fetch(text[index + 1 : end]))
                index = end + 1
                continue
            match = re.match(r"[A-Za-z]+", text[index:])
            if match is None:
                raise LogFormatError(f"'%' at column {index} is not followed by a variable")
            name = match.group()
            if name == "o":  # `%{+Q}o`: flags for every following variable; not rendered
                index += 1
                continue
            if name not in VARIABLES:
                raise LogFormatError(f"unsupported log-format variable '%{name}'")
            self.parts.append(VARIABLES[name])
            index += len(name)
        if literal:
            self.parts.append("".join(literal))

    def render(self, record: SessionRecord) -> str:
        return "".join(part if isinstance(part, str) else part(record) for part in self.parts)


TCPLOG = LogFormat(TCPLOG_FORMAT)


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


class ConnectionErrorLog:
    """Refused-handshake lines of one frontend, rate limited.

    `schedule(delay, callback)` is the event loop's call_later; while lines are being
    suppressed a report "N similar lines suppressed" is logged every
    SUPPRESSED_REPORT_INTERVAL seconds, and once more when the flood is over."""

    def __init__(
        self,
        log: TrafficLog,
        frontend: str,
        clock: Callable[[], float],
        schedule: Callable[[float, Callable[[], None]], object],
        *,
        rate: float = ERROR_LINE_RATE,
        burst: int = ERROR_LINE_BURST,
    ) -> None:
        self.log = log
        self.frontend = frontend
        self.limiter = RateLimiter(rate, burst, clock)
        self.schedule = schedule
        self.report_pending = False
        self.total_suppressed = 0

    def emit(self, line: str) -> None:
        if self.limiter.allow():
            self._write(line)
            return
        self.total_suppressed += 1
        if not self.report_pending:
            self.report_pending = True
            self.schedule(SUPPRESSED_REPORT_INTERVAL, self.report)

    def report(self) -> None:
        self.report_pending = False
        count = self.limiter.take_suppressed()
        if count:
            self._write(
                f"frontend {self.frontend}: {count} similar lines suppressed "
                f"(refused TLS handshakes over {self.limiter.rate:g}/s)",
                level="warning",
            )

    def _write(self, line: str, level: str = "info") -> None:
        if self.log.enabled:
            self.log.emit(line, level)
        else:
            logger.warning("%s", line)


# --------------------------------------------------------------------------------------------
# Python logging records (health checks, server state) to the global targets

#: Loggers whose records an operator expects among HAProxy's own lines.
FORWARDED_LOGGERS = ("lb.health", "lb.server", "lb.balance")


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
