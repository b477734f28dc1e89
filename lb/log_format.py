"""HAProxy's log-format language, compiled once and rendered per session (sans-IO).

Owns `SessionRecord` (the fields of one session a line can show) and `LogFormat`, the
compiler of configuration.txt section 8.2.4: `%var` and `%[fetch]` nodes, `%{+X}` flags
(`%{+X}o` for every later variable), `%%`. As in HAProxy's sess_build_logline, spaces are
separators: a run of them prints one space, and none at the start of the line (so the
documented `unique-id-format %{+X}o\\ %ci:%cp_...` begins with the address). The same
compiler renders `unique-id-format` (section 4.2, `%ID` in a log-format). lb.log sends the
lines; lb.config compiles the formats at parse time, so a bad one is a config error.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MONTHS",
    "TCPLOG",
    "TCPLOG_FORMAT",
    "LogFormat",
    "LogFormatError",
    "SessionRecord",
    "haproxy_date",
]

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
TCPLOG_FORMAT = "%ci:%cp [%t] %ft %b/%s %Tw/%Tc/%Tt %B %ts %ac/%fc/%bc/%sc/%rc %sq/%bq"
#: A separator node (a run of spaces), told apart from text by identity.
_SEPARATOR: Final = " "


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


@dataclass(slots=True)
class SessionRecord:
    """The fields of one session's log line (the log-format variables).

    Made and rendered at once for every session, so not frozen: a frozen dataclass sets each
    of its 33 fields with object.__setattr__ (~170 Python opcodes and 33 C calls a session,
    bench/lb_opcodes.py)."""

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
    unique_id: str | None = None  # %ID: unique-id-format's, or lb's random one
    session_number: int = 0  # %rt: the process's count of sessions at this one's accept


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
    "ID": lambda r: _dash(r.unique_id),
    "Ts": lambda r: str(int(r.accept_date)),
    "ms": lambda r: f"{int(r.accept_date * 1000) % 1000:03d}",
    "rt": lambda r: str(r.session_number),
}


def _hex_address(text: str) -> str:
    """`%{+X}ci`: the address bytes in hex, most significant first (HAProxy's lf_ip)."""
    try:
        return ipaddress.ip_address(text).packed.hex().upper()
    except ValueError:
        return text


#: What `%{+X}` changes (lf_ip, lf_port and lf_int print "%02X" bytes, "%04X" numbers).
HEX_VARIABLES: dict[str, Renderer] = {
    "ci": lambda r: _hex_address(r.client_ip),
    "fi": lambda r: _hex_address(r.frontend_ip),
    "cp": lambda r: f"{r.client_port:04X}",
    "fp": lambda r: f"{r.frontend_port:04X}",
    "Ts": lambda r: f"{int(r.accept_date):04X}",
    "rt": lambda r: f"{r.session_number:04X}",
    "pid": lambda r: f"{r.pid or os.getpid():04X}",
}

#: The variables that print a number (in decimal, or in hex with %{+X}).
_NUMBERS = (
    *("cp", "fp", "Tw", "Tc", "Tt", "B", "U", "ac", "fc", "bc", "sc", "rc", "sq", "bq"),
    *("pid", "Ts", "rt"),
)
#: Renderers whose output is never empty and never ends with a space (numbers, the date, the
#: termination state): a separator after one is a plain space in the template.
_NEVER_SPACED: frozenset[Renderer] = frozenset(
    [
        *(VARIABLES[name] for name in (*_NUMBERS, "t", "ts", "ms")),
        *(HEX_VARIABLES[name] for name in _NUMBERS if name in HEX_VARIABLES),
    ]
)

#: Sample fetches that read the client certificate's names.
PEER_NAME_FETCHES = ("ssl_c_s_dn", "ssl_c_i_dn")
_FETCH = re.compile(r"(?P<name>[a-z0-9_.]+)(?:\((?P<args>[^)]*)\))?")


def _compile_fetch(text: str) -> Renderer:
    """A `%[fetch]` sample; converters (`,lower`) are not supported."""
    match = _FETCH.fullmatch(text.strip())
    if match is None:
        raise LogFormatError(f"unsupported sample expression '%[{text}]'")
    name = match["name"]
    args = [a.strip() for a in (match["args"] or "").split(",") if a.strip()]
    if name in PEER_NAME_FETCHES:
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
    """A compiled `log-format` (or `unique-id-format`) string (configuration.txt 8.2.4)."""

    __slots__ = ("parts", "renderers", "template", "text", "uses_peer_names", "variables")

    def __init__(self, text: str) -> None:
        self.text = text
        self.parts: list[str | Renderer] = []
        self.variables: set[str] = set()  # the %names used, for callers that care (%ID)
        # Whether a fetch reads the client certificate's subject or issuer (the record's
        # ssl_client_subject/issuer are then worth reading from the certificate).
        self.uses_peer_names = False
        literal: list[str] = []
        hex_all = False
        index = 0

        def end_literal() -> None:
            if literal:
                self.parts.append("".join(literal))
                literal.clear()

        while index < len(text):
            char = text[index]
            if char == " ":
                end_literal()
                while index < len(text) and text[index] == " ":
                    index += 1
                if not self.parts or self.parts[-1] is not _SEPARATOR:
                    self.parts.append(_SEPARATOR)
                continue
            if char != "%":
                literal.append(char)
                index += 1
                continue
            index += 1
            if index < len(text) and text[index] == "%":
                literal.append("%")
                index += 1
                continue
            flags = ""
            if index < len(text) and text[index] == "{":
                end = text.find("}", index)
                if end < 0:
                    raise LogFormatError("unterminated '%{' flags")
                flags = text[index + 1 : end]
                index = end + 1
            end_literal()
            if index < len(text) and text[index] == "[":
                end = text.find("]", index)
                if end < 0:
                    raise LogFormatError("unterminated '%[' sample expression")
                fetch = text[index + 1 : end]
                self.parts.append(_compile_fetch(fetch))
                self.uses_peer_names |= fetch.strip().startswith(PEER_NAME_FETCHES)
                index = end + 1
                continue
            match = re.match(r"[A-Za-z]+", text[index:])
            if match is None:
                raise LogFormatError(f"'%' at column {index} is not followed by a variable")
            name = match.group()
            hex_here = "+X" in flags.split(",") or hex_all
            if name == "o":  # `%{+X}o`: flags for every following variable; not rendered
                hex_all = hex_all or "+X" in flags.split(",")
                index += 1
                continue
            if name not in VARIABLES:
                raise LogFormatError(f"unsupported log-format variable '%{name}'")
            self.variables.add(name)
            self.parts.append(
                HEX_VARIABLES.get(name, VARIABLES[name]) if hex_here else VARIABLES[name]
            )
            index += len(name)
        end_literal()
        self._compile()

    def render(self, record: SessionRecord) -> str:
        return self.template.format(*[render(record) for render in self.renderers])

    def _compile(self) -> None:
        """`parts` as one str.format template and its renderers, the separators decided here
        where they can be: as sess_build_logline's last_isspace, a separator prints a space
        unless nothing was printed before it or what was printed last ends with one. After a
        literal or a number that is known now; after a text renderer (a name, a DN entry)
        the renderer itself adds the space when its output does not end with one. Rendering
        is then one format call (a loop over the parts cost ~860 Python opcodes a session
        for the demo's tcplog line)."""
        template: list[str] = []
        renderers: list[Renderer] = []
        last: str | Renderer | None = None  # what the line printed last, so far
        for part in self.parts:
            if part is _SEPARATOR:
                if last is None or (isinstance(last, str) and last.endswith(" ")):
                    continue
                if isinstance(last, str) or last in _NEVER_SPACED:
                    template.append(" ")
                    last = " "
                else:
                    renderers[-1] = _spaced(renderers[-1])
                    last = " "  # the renderer's output ends with one now
            elif isinstance(part, str):
                template.append(part.replace("{", "{{").replace("}", "}}"))
                last = part
            else:
                template.append("{}")
                renderers.append(part)
                last = part
        self.template = "".join(template)
        self.renderers = tuple(renderers)


def _spaced(render: Renderer) -> Renderer:
    """`render` followed by a separator: one space unless its output ends with one."""

    def spaced(record: SessionRecord) -> str:
        text = render(record)
        return text if text.endswith(" ") else text + " "

    return spaced


TCPLOG = LogFormat(TCPLOG_FORMAT)
