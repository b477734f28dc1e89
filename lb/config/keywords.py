"""Keyword tables of the haproxy.cfg language, and the units they use.

Owns, per section, the table `keyword -> parser` (HAProxy 2.6
doc/configuration.txt sections 3 (global), 4 (proxies) and 5 (bind and
server options)) and the value parsers: times (`us`, `ms`, `s`, `m`, `h`, `d`;
milliseconds when no unit is given, except where HAProxy says seconds),
sizes (`k`, `m`, `g`, powers of 1024), integers, choices.

Each keyword parser is a small typed function that reads one `Line` and
records what it found into a mutable draft (`GlobalDraft`, `ProxyDraft`);
the loader (`lb.config.__init__`) turns drafts into the frozen model.
A parser signals one bad value by raising `KeywordError`; a line that can
hold several problems (bind, server) reports each through `Report` and goes
on. A keyword we know but do not support is an error saying so, never
silently ignored.

`BALANCE_ALGORITHMS` (what `balance` validates against) is the names of lb.balance's
registry.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from lb.balance import ALGORITHMS
from lb.config.errors import Diagnostic, Origin
from lb.config.lexer import Line
from lb.config.model import (
    PROXY_V2_OPTIONS,
    LogTarget,
    MqttCheck,
    StatsSocket,
    TcpCheckMatch,
    TcpCheckRule,
)
from lb.log_format import LogFormat, LogFormatError
from lb.proxyproto import V2_HEADER_LENGTH, V2_MAX_LENGTH
from lb.tls_codes import TLS_VERSIONS, X509_V_ERROR_IDS

BALANCE_ALGORITHMS: tuple[str, ...] = tuple(ALGORITHMS)
#: `proxy-v2-max-size` bounds: the largest address block (AF_UNIX) must fit, and a v2 header
#: is at most 16 + 65535 bytes (proxy-protocol.txt section 2.2).
MIN_PROXY_HEADER_SIZE = V2_HEADER_LENGTH + 216
MAX_PROXY_HEADER_SIZE = V2_HEADER_LENGTH + V2_MAX_LENGTH
HASH_TYPES = ("map-based", "consistent")
HASH_FUNCTIONS = ("sdbm", "djb2", "crc32")
SECTIONS = ("global", "defaults", "frontend", "backend", "listen", "userlist")
UNSUPPORTED_SECTIONS = (
    "peers",
    "resolvers",
    "mailers",
    "program",
    "http-errors",
    "ring",
    "cache",
    "fcgi-app",
)
ProxyKind = Literal["defaults", "frontend", "backend", "listen"]

LOG_FACILITIES = (
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news",
    "uucp", "cron", "auth2", "ftp", "ntp", "audit", "alert", "cron2",
    "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
)  # fmt: skip
LOG_LEVELS = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
LOG_FORMATS = ("raw", "rfc3164", "rfc5424", "short", "timed", "iso", "local", "priority")

_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TIME_PATTERN = re.compile(r"([0-9]+)(us|ms|s|m|h|d)?")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_SIZE_PATTERN = re.compile(r"([0-9]+)([kKmMgG]?)")
_INTEGER_PATTERN = re.compile(r"-?[0-9]+")


class KeywordError(Exception):
    """One bad keyword or value; `keyword` overrides the line's first word."""

    def __init__(self, message: str, keyword: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.keyword = keyword


# --------------------------------------------------------------------------- values


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`"; did you mean 'x'?"` for the closest candidate, or `""`."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{matches[0]}'?" if matches else ""


def parse_time(value: str, default_unit: str = "ms") -> float:
    """`10s`, `500ms`, `2m`, `1500` (default unit) -> seconds."""
    match = _TIME_PATTERN.fullmatch(value)
    if match is None:
        raise KeywordError(f"expects a time like 10s, 500ms, got '{value}'")
    return int(match.group(1)) * _TIME_UNITS[match.group(2) or default_unit]


def parse_size(value: str) -> int:
    """`16384`, `16k`, `1m`, `2g` -> bytes (powers of 1024, as HAProxy)."""
    match = _SIZE_PATTERN.fullmatch(value)
    if match is None:
        raise KeywordError(f"expects a size like 16384, 16k, 1m, got '{value}'")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def parse_integer(value: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if _INTEGER_PATTERN.fullmatch(value) is None:
        raise KeywordError(f"expects {_integer_range(minimum, maximum)}, got '{value}'")
    number = int(value)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise KeywordError(f"expects {_integer_range(minimum, maximum)}, got '{value}'")
    return number


def _integer_range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer from {minimum} to {maximum}"
    if minimum is not None:
        return f"an integer >= {minimum}"
    return "an integer"


def parse_choice(value: str, choices: Iterable[str]) -> str:
    options = tuple(choices)
    if value in options:
        return value
    listed = ", ".join(f"'{option}'" for option in options)
    raise KeywordError(f"expects one of {listed}, got '{value}'{did_you_mean(value, options)}")


def parse_port(value: str) -> int:
    if "-" in value and value.replace("-", "").isdigit():
        raise KeywordError(f"port ranges are not supported, got '{value}'")
    return parse_integer(value, 1, 65535)


def split_host_port(address: str, *, need_port: bool) -> tuple[str, int | None, str]:
    """`[::1]:80`, `::1:80` (last colon), `*:80`, `:80`, `host:80`, `host`.

    Returns (host, port, family) where family is "ipv4" or "ipv6" ("ipv4"
    also for names). An `ipv4@` / `ipv6@` prefix forces the family.
    """
    family = ""
    for prefix in ("ipv4@", "ipv6@"):
        if address.startswith(prefix):
            family = prefix[:4]
            address = address[len(prefix) :]
    if address.startswith(("unix@", "abns@", "fd@", "sockpair@", "udp@", "quic")) or (
        address.startswith("/")
    ):
        raise KeywordError(f"only TCP addresses (host:port) are supported, got '{address}'")
    if "," in address:
        raise KeywordError(f"address lists are not supported, got '{address}'")
    port: int | None = None
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket:
            raise KeywordError(f"missing ']' in address '{address}'")
        if rest:
            if not rest.startswith(":"):
                raise KeywordError(f"expects host:port, got '{address}'")
            port = parse_port(rest[1:])
    elif ":" in address:
        host, _, port_text = address.rpartition(":")
        port = None if port_text == "" and not need_port else parse_port(port_text)
    else:
        host = address
    if need_port and port is None:
        raise KeywordError(f"missing port in address '{address}' (expects host:port)")
    if host in ("", "*"):
        host = "::" if family == "ipv6" else "0.0.0.0"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not family:
            family = "ipv4"
    else:
        actual = "ipv6" if ip.version == 6 else "ipv4"
        if family and family != actual:
            raise KeywordError(f"address '{host}' is not an {family} address")
        family = actual
    return host, port, family


# --------------------------------------------------------------------------- drafts


@dataclass(slots=True)
class Report:
    """Collects diagnostics while parsing; never stops at the first error."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def error(self, line: Line, keyword: str | None, message: str, section: str = "") -> None:
        self.diagnostics.append(
            Diagnostic.error(line.file, line.lineno, keyword, message, section or None)
        )

    def warning(self, line: Line, keyword: str | None, message: str, section: str = "") -> None:
        self.diagnostics.append(
            Diagnostic.warning(line.file, line.lineno, keyword, message, section or None)
        )


# Global keywords HAProxy refuses to see twice ("'maxconn' already specified").
GLOBAL_SINGLE_KEYWORDS = frozenset(
    (
        "maxconn",
        "maxconnrate",
        "maxsessrate",
        "maxsslrate",
        "nbthread",
        "pidfile",
        "hard-stop-after",
        "ca-base",
        "crt-base",
    )
)


@dataclass(slots=True)
class GlobalDraft:
    origin: Origin
    values: dict[str, object] = field(default_factory=dict)
    seen: dict[str, Origin] = field(default_factory=dict)
    log: list[LogTarget] = field(default_factory=list)
    stats_socket: list[StatsSocket] = field(default_factory=list)


@dataclass(slots=True)
class PendingBind:
    """A bind line whose paths and TLS defaults are completed after parsing."""

    origin: Origin
    settings: dict[str, object]


@dataclass(slots=True)
class PendingServer:
    origin: Origin
    name: str
    settings: dict[str, object]


@dataclass(slots=True)
class ProxyDraft:
    """Everything one defaults/frontend/backend/listen section set.

    `values` holds fields of the model's proxy classes by name; `timeout`,
    `option` the Timeouts/Options fields; `default_server` the server fields
    set by default-server lines so far (copied from the defaults section
    this proxy inherits from).
    """

    kind: ProxyKind
    name: str | None
    origin: Origin
    values: dict[str, object] = field(default_factory=dict)
    timeout: dict[str, float] = field(default_factory=dict)
    option: dict[str, object] = field(default_factory=dict)
    log_global: bool = False
    log_targets: list[LogTarget] = field(default_factory=list)
    log_format: str | None = None
    default_backend: tuple[str, Origin] | None = None
    use_backend: list[tuple[str, Origin]] = field(default_factory=list)
    binds: list[PendingBind] = field(default_factory=list)
    servers: list[PendingServer] = field(default_factory=list)
    default_server: dict[str, object] = field(default_factory=dict)
    # Where a frontend said `mode http`: allowed only on a Prometheus exporter frontend.
    mode_http: Origin | None = None
    # Where it said `http-request auth` (checked against the userlists and the service).
    http_request_auth: Origin | None = None
    # Whether this section wrote tcp-check rules of its own: the first one replaces the
    # rules it inherited from its defaults section, as in HAProxy.
    tcp_check_own: bool = False

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}" if self.name else self.kind

    def inherit(self, parent: ProxyDraft) -> None:
        """Start from a defaults section, as HAProxy copies it into the proxy."""
        self.values = dict(parent.values)
        self.timeout = dict(parent.timeout)
        self.option = dict(parent.option)
        self.log_global = parent.log_global
        self.log_targets = list(parent.log_targets)
        self.log_format = parent.log_format
        self.default_backend = parent.default_backend
        self.default_server = dict(parent.default_server)


def _expect_arguments(line: Line, count: int, usage: str, start: int = 1) -> tuple[str, ...]:
    arguments = line.words[start:]
    if len(arguments) != count:
        raise KeywordError(f"expects {usage}")
    return arguments


def _one(line: Line, usage: str, start: int = 1) -> str:
    return _expect_arguments(line, 1, usage, start)[0]


# --------------------------------------------------------------------------- log lines


def parse_log_target(line: Line, arguments: tuple[str, ...]) -> LogTarget:
    """`<target> [len <n>] [format <fmt>] <facility> [<level> [<minlevel>]]`."""
    usage = "<target> [len <length>] [format <format>] <facility> [<level> [<minlevel>]]"
    if not arguments:
        raise KeywordError(f"expects {usage}")
    target, rest = arguments[0], list(arguments[1:])
    origin = Origin(line.file, line.lineno)
    kind: Literal["stdout", "stderr", "unix", "udp", "fd"]
    port: int | None = None
    address = target
    if target in ("stdout", "stderr"):
        kind = target  # type: ignore[assignment]  # narrowed by the test above
    elif target.startswith("fd@"):
        kind, address = "fd", target[3:]
    elif target.startswith("/") or target.startswith("unix@"):
        kind, address = "unix", target.removeprefix("unix@")
    else:
        kind = "udp"
        address, port, _ = split_host_port(target.removeprefix("udp@"), need_port=False)
        port = port or 514
    length = 1024
    log_format = "rfc3164"
    while rest and rest[0] in ("len", "format", "sample"):
        word = rest.pop(0)
        if not rest:
            raise KeywordError(f"'{word}' expects a value")
        value = rest.pop(0)
        if word == "len":
            length = parse_integer(value, 80, 65535)
        elif word == "format":
            log_format = parse_choice(value, LOG_FORMATS)
        else:
            raise KeywordError("'sample' is not supported")
    if not rest:
        raise KeywordError(f"missing facility; expects {usage}")
    facility = parse_choice(rest[0], LOG_FACILITIES)
    level = parse_choice(rest[1], LOG_LEVELS) if len(rest) > 1 else None
    minlevel = parse_choice(rest[2], LOG_LEVELS) if len(rest) > 2 else None
    if len(rest) > 3:
        raise KeywordError(f"unexpected '{rest[3]}'; expects {usage}")
    return LogTarget(
        origin, target, kind, address, port, facility, log_format, length, level, minlevel
    )


# --------------------------------------------------------------------------- global

GlobalParser = Callable[[Line, GlobalDraft, Report], None]


def _global_integer(name: str, minimum: int, maximum: int | None = None) -> GlobalParser:
    def parse(line: Line, draft: GlobalDraft, report: Report) -> None:
        value = _one(line, "an integer")
        draft.values[name] = parse_integer(value, minimum, maximum)

    return parse


def _global_rate(name: str) -> GlobalParser:
    """`maxconnrate` and the like: events per second; 0 (HAProxy's default) is no limit."""

    def parse(line: Line, draft: GlobalDraft, report: Report) -> None:
        draft.values[name] = parse_integer(_one(line, "an integer (per second)"), 0) or None

    return parse


def _global_time(name: str, default_unit: str = "ms") -> GlobalParser:
    def parse(line: Line, draft: GlobalDraft, report: Report) -> None:
        draft.values[name] = parse_time(_one(line, "a time like 10s, 500ms"), default_unit)

    return parse


def _global_string(name: str, usage: str) -> GlobalParser:
    def parse(line: Line, draft: GlobalDraft, report: Report) -> None:
        draft.values[name] = _one(line, usage)

    return parse


def _global_flag(name: str) -> GlobalParser:
    def parse(line: Line, draft: GlobalDraft, report: Report) -> None:
        _expect_arguments(line, 0, "no argument")
        draft.values[name] = True

    return parse


def _global_unsupported(reason: str) -> GlobalParser:
    def parse(line: Line, draft: GlobalDraft, report: Report) -> None:
        raise KeywordError(f"not supported: {reason}")

    return parse


def _global_size(name: str) -> GlobalParser:
    def parse(line: Line, draft: GlobalDraft, report: Report) -> None:
        draft.values[name] = parse_size(_one(line, "a size like 16k"))

    return parse


def _global_log(line: Line, draft: GlobalDraft, report: Report) -> None:
    if line.words[1:2] == ("global",):
        raise KeywordError("'log global' is only valid in a proxy section")
    draft.log.append(parse_log_target(line, line.words[1:]))


def _global_stats(line: Line, draft: GlobalDraft, report: Report) -> None:
    subkeywords = ("socket",)
    if len(line.words) < 2:
        raise KeywordError("expects 'socket <path> [mode <octal>] [level <level>]'")
    if line.words[1] not in subkeywords:
        raise KeywordError(
            f"unknown or unsupported 'stats {line.words[1]}'"
            f"{did_you_mean(line.words[1], subkeywords)}",
        )
    if len(line.words) < 3:
        raise KeywordError("expects a path or address", "stats socket")
    path = line.words[2]
    mode: int | None = None
    level: Literal["user", "operator", "admin"] = "operator"
    rest = list(line.words[3:])
    while rest:
        word = rest.pop(0)
        if word not in ("mode", "level"):
            raise KeywordError(
                f"unknown option '{word}'{did_you_mean(word, ('mode', 'level'))}",
                "stats socket",
            )
        if not rest:
            raise KeywordError(f"'{word}' expects a value", "stats socket")
        value = rest.pop(0)
        if word == "mode":
            if re.fullmatch(r"[0-7]{1,4}", value) is None:
                raise KeywordError(f"'mode' expects an octal mode like 600, got '{value}'")
            mode = int(value, 8)
        else:
            chosen = parse_choice(value, ("user", "operator", "admin"))
            level = "user" if chosen == "user" else "admin" if chosen == "admin" else "operator"
    draft.stats_socket.append(StatsSocket(Origin(line.file, line.lineno), path, mode, level))


SSL_BIND_DEFAULT_OPTIONS = (
    "ssl-min-ver",
    "ssl-max-ver",
    "no-sslv3",
    "no-tlsv10",
    "no-tlsv11",
    "no-tlsv12",
    "no-tlsv13",
    "no-tls-tickets",
    "prefer-client-ciphers",
)


def _ssl_default_options(name: str) -> GlobalParser:
    def parse(line: Line, draft: GlobalDraft, report: Report) -> None:
        words = list(line.words[1:])
        if not words:
            raise KeywordError("expects at least one option")
        checked: list[str] = []
        while words:
            word = words.pop(0)
            if word not in SSL_BIND_DEFAULT_OPTIONS:
                raise KeywordError(
                    f"unknown option '{word}'{did_you_mean(word, SSL_BIND_DEFAULT_OPTIONS)}"
                )
            checked.append(word)
            if word in ("ssl-min-ver", "ssl-max-ver"):
                if not words:
                    raise KeywordError(f"'{word}' expects a TLS version")
                checked.append(parse_choice(words.pop(0), TLS_VERSIONS))
        draft.values[name] = tuple(checked)

    return parse


def _global_user(name: str) -> GlobalParser:
    def parse(line: Line, draft: GlobalDraft, report: Report) -> None:
        draft.values[name] = _one(line, f"a {name} name")
        report.warning(
            line, name, f"ignored: lb does not switch {name}; start it as the wanted {name}"
        )

    return parse


def _global_maxconn(line: Line, draft: GlobalDraft, report: Report) -> None:
    _global_integer("maxconn", 1)(line, draft, report)
    draft.values["maxconn_origin"] = Origin(line.file, line.lineno)


#: Global keywords that take HAProxy's `no` prefix (cfgparse-global.c, KWM_NO).
GLOBAL_NO_KEYWORDS = ("strict-limits",)


def _global_no(line: Line, draft: GlobalDraft, report: Report) -> None:
    keyword = line.words[1] if len(line.words) > 1 else ""
    if keyword not in GLOBAL_NO_KEYWORDS:
        raise KeywordError(
            f"'no {keyword}' is not supported; 'no' applies to "
            f"{', '.join(repr(k) for k in GLOBAL_NO_KEYWORDS)}"
            f"{did_you_mean(keyword, GLOBAL_NO_KEYWORDS)}",
            "no",
        )
    _expect_arguments(line, 1, "no argument after the keyword")
    draft.values[keyword.replace("-", "_")] = False


def _global_strict_limits(line: Line, draft: GlobalDraft, report: Report) -> None:
    _expect_arguments(line, 0, "no argument")
    draft.values["strict_limits"] = True


GLOBAL_KEYWORDS: dict[str, GlobalParser] = {
    "maxconn": _global_maxconn,
    "strict-limits": _global_strict_limits,
    "fd-hard-limit": _global_integer("fd_hard_limit", 1),
    "no": _global_no,
    "nbthread": _global_integer("nbthread", 1, 4096),
    # Accepts per second of the whole lb (all workers), as HAProxy's per process: at the
    # limit the listeners pause (lb.event_rate). maxsslrate counts the SSL binds' only.
    "maxconnrate": _global_rate("maxconnrate"),
    "maxsessrate": _global_rate("maxsessrate"),
    "maxsslrate": _global_rate("maxsslrate"),
    "daemon": _global_flag("daemon"),
    "log": _global_log,
    "stats": _global_stats,
    "pidfile": _global_string("pidfile", "a file path"),
    "hard-stop-after": _global_time("hard_stop_after"),
    "tune.bufsize": _global_size("tune_bufsize"),
    "tune.ssl.cachesize": _global_integer("tune_ssl_cachesize", 0),
    # HAProxy: tune.ssl.lifetime counts in seconds when no unit is given.
    "tune.ssl.lifetime": _global_time("tune_ssl_lifetime", "s"),
    # Our own (seed 000: EMQX re-reads certificates every 120 s); seconds without a unit.
    "tune.ssl.reload-interval": _global_time("tune_ssl_reload_interval", "s"),
    "ssl-default-bind-options": _ssl_default_options("ssl_default_bind_options"),
    "ssl-default-bind-ciphers": _global_string("ssl_default_bind_ciphers", "a cipher list"),
    "ssl-default-bind-ciphersuites": _global_string(
        "ssl_default_bind_ciphersuites", "a TLSv1.3 cipher suite list"
    ),
    "ssl-default-server-options": _ssl_default_options("ssl_default_server_options"),
    "ca-base": _global_string("ca_base", "a directory"),
    "crt-base": _global_string("crt_base", "a directory"),
    "user": _global_user("user"),
    "group": _global_user("group"),
    "pp2-never-send-local": _global_flag("pp2_never_send_local"),
    "chroot": _global_unsupported("lb does not chroot; use your service manager's sandboxing"),
    "uid": _global_unsupported("lb does not switch user"),
    "gid": _global_unsupported("lb does not switch group"),
    "nbproc": _global_unsupported("use 'nbthread' (removed in HAProxy 2.5 too)"),
    "cpu-map": _global_unsupported("lb does not pin threads"),
    "setenv": _global_unsupported("set variables in the environment of lb"),
    "presetenv": _global_unsupported("set variables in the environment of lb"),
    "ulimit-n": _global_unsupported("set the limit in the environment of lb"),
    "master-worker": _global_unsupported("lb always runs a master and its workers"),
}


# --------------------------------------------------------------------------- bind / server options


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """One bind or server option: how many values it takes and where it goes."""

    apply: Callable[[dict[str, object], str], None]
    takes_value: bool = True
    unsupported: str | None = None  # an error: we know the option and refuse it
    ignored: str | None = None  # a warning: accepted, but it means nothing for lb


def _set(field_name: str, convert: Callable[[str], object]) -> OptionSpec:
    def apply(settings: dict[str, object], value: str) -> None:
        settings[field_name] = convert(value)

    return OptionSpec(apply)


def _flag(field_name: str, value: bool = True) -> OptionSpec:
    def apply(settings: dict[str, object], _: str) -> None:
        settings[field_name] = value

    return OptionSpec(apply, takes_value=False)


def _unsupported(reason: str, takes_value: bool = True) -> OptionSpec:
    return OptionSpec(lambda settings, value: None, takes_value, unsupported=reason)


def _ignored(reason: str, takes_value: bool = True) -> OptionSpec:
    # Accepted with a warning (HAProxy options with no meaning for lb).
    return OptionSpec(lambda settings, value: None, takes_value, ignored=reason)


def _text(value: str) -> str:
    if not value:
        raise KeywordError("expects a non-empty value")
    return value


#: HAProxy 2.6 refuses ids outside 1..94 ("ID '0' out of range (1..94) in error IDs list").
X509_V_ERROR_ID_RANGE = (1, 94)


def _ignore_errors(value: str) -> object:
    """`all`, or a comma list of X509_V_ERR ids or names: `10,X509_V_ERR_CERT_REVOKED`."""
    if value == "all":
        return "all"
    codes: set[int] = set()
    for item in value.split(","):
        if item.upper().startswith("X509_V_ERR_"):
            code = X509_V_ERROR_IDS.get(item.upper())
            if code is None:
                hint = did_you_mean(item.upper(), X509_V_ERROR_IDS)
                raise KeywordError(f"unknown verify error name '{item}'{hint}")
            codes.add(code)
        else:
            codes.add(parse_integer(item, *X509_V_ERROR_ID_RANGE))
    return frozenset(codes)


def _alpn(value: str) -> tuple[str, ...]:
    protocols = tuple(value.split(","))
    if any(not protocol or len(protocol) > 255 for protocol in protocols):
        raise KeywordError(
            f"expects a comma-separated protocol list like h2,http/1.1, got '{value}'"
        )
    return protocols


def _networks(value: str) -> tuple[str, ...]:
    """A comma-separated list of networks (10.0.0.0/8,192.0.2.7), kept as normalized text."""
    networks: list[str] = []
    for item in value.split(","):
        try:
            networks.append(str(ipaddress.ip_network(item.strip(), strict=False)))
        except ValueError:
            raise KeywordError(
                f"expects comma-separated networks like 10.0.0.0/8,192.0.2.7, got '{item}'"
            ) from None
    return tuple(networks)


def _crt(settings: dict[str, object], value: str) -> None:
    previous = settings.get("crt", ())
    assert isinstance(previous, tuple)
    settings["crt"] = (*previous, _text(value))


BIND_OPTIONS: dict[str, OptionSpec] = {
    "ssl": _flag("ssl"),
    "crt": OptionSpec(_crt),
    "ca-file": _set("ca_file", _text),
    "ca-verify-file": _set("ca_verify_file", _text),
    "verify": _set("verify", lambda value: parse_choice(value, ("none", "optional", "required"))),
    "verify-depth": _set("verify_depth", lambda value: parse_integer(value, 0, 100)),
    "crl-file": _set("crl_file", _text),
    "ca-ignore-err": _set("ca_ignore_err", _ignore_errors),
    "crt-ignore-err": _set("crt_ignore_err", _ignore_errors),
    "ssl-min-ver": _set("ssl_min_ver", lambda value: parse_choice(value, TLS_VERSIONS)),
    "ssl-max-ver": _set("ssl_max_ver", lambda value: parse_choice(value, TLS_VERSIONS)),
    "ciphers": _set("ciphers", _text),
    "ciphersuites": _set("ciphersuites", _text),
    "alpn": _set("alpn", _alpn),
    "name": _set("name", _text),
    "accept-proxy": _flag("accept_proxy"),
    "accept-proxy-from": _set("accept_proxy_from", _networks),  # ours: trusted senders
    "maxconn": _set("maxconn", lambda value: parse_integer(value, 1)),
    "close-revoked": _flag("close_revoked"),
    "strict-sni": _flag("strict_sni"),
    "tls-ticket-keys": _set("tls_ticket_keys", _text),
    "no-tls-tickets": _flag("no_tls_tickets"),
    "no-sslv3": _flag("no_sslv3"),
    "no-tlsv10": _flag("no_tlsv10"),
    "no-tlsv11": _flag("no_tlsv11"),
    "no-tlsv12": _flag("no_tlsv12"),
    "no-tlsv13": _flag("no_tlsv13"),
    "process": _ignored("lb has no processes to bind to"),
    "thread": _ignored("every lb worker listens on every bind"),
    "ocsp-update": _unsupported("OCSP updates"),
    "generate-certificates": _unsupported("certificate generation", takes_value=False),
    "npn": _unsupported("NPN (use 'alpn')"),
    "crt-list": _unsupported("crt-list files (repeat 'crt')"),
    "transparent": _unsupported("transparent proxying", takes_value=False),
    "interface": _unsupported("binding to an interface"),
    "defer-accept": _unsupported("TCP_DEFER_ACCEPT", takes_value=False),
    "tfo": _unsupported("TCP fast open", takes_value=False),
    "v4v6": _unsupported("dual-stack binds (add an IPv4 and an IPv6 bind)", takes_value=False),
    "v6only": _unsupported("v6only (IPv6 binds are v6-only already)", takes_value=False),
    "user": _unsupported("socket ownership"),
    "group": _unsupported("socket ownership"),
    "mode": _unsupported("socket modes"),
    "level": _unsupported("stats levels on bind lines"),
}


def _weight(value: str) -> int:
    return parse_integer(value, 0, 256)


def _proxy_v2_options(settings: dict[str, object], value: str) -> None:
    chosen = set()
    for option in value.split(","):
        if option not in PROXY_V2_OPTIONS:
            raise KeywordError(
                f"unknown proxy-v2-options value '{option}'{did_you_mean(option, PROXY_V2_OPTIONS)}"
            )
        chosen.add(option)
    _add_proxy_v2_options(settings, chosen)


def _add_proxy_v2_options(settings: dict[str, object], options: Iterable[str]) -> None:
    previous = settings.get("proxy_v2_options", frozenset())
    assert isinstance(previous, frozenset)
    settings["proxy_v2_options"] = previous | frozenset(options)


def _send_proxy_v2_with(*options: str) -> OptionSpec:
    def apply(settings: dict[str, object], _: str) -> None:
        settings["send_proxy_v2"] = True
        _add_proxy_v2_options(settings, options)

    return OptionSpec(apply, takes_value=False)


def _proxy_header_size(value: str) -> int:
    size = parse_size(value)
    if not MIN_PROXY_HEADER_SIZE <= size <= MAX_PROXY_HEADER_SIZE:
        raise KeywordError(
            f"expects a size from {MIN_PROXY_HEADER_SIZE} to {MAX_PROXY_HEADER_SIZE} bytes "
            f"(a whole PROXY v2 header), got '{value}'"
        )
    return size


def _server_time(field_name: str) -> OptionSpec:
    return _set(field_name, parse_time)


def _check_address(value: str) -> str:
    if not value:
        raise KeywordError("expects an address")
    return value


SERVER_OPTIONS: dict[str, OptionSpec] = {
    "check": _flag("check"),
    "check-send-proxy": _flag("check_send_proxy"),
    "send-proxy": _flag("send_proxy"),
    "send-proxy-v2": _flag("send_proxy_v2"),
    "send-proxy-v2-ssl": _send_proxy_v2_with("ssl"),
    "send-proxy-v2-ssl-cn": _send_proxy_v2_with("ssl", "cert-cn"),
    "proxy-v2-options": OptionSpec(_proxy_v2_options),
    "proxy-v2-max-size": _set("proxy_v2_max_size", _proxy_header_size),  # ours
    "proxy-v2-hmac-keys": _set("proxy_v2_hmac_keys", _text),  # ours
    "inter": _server_time("inter"),
    "fastinter": _server_time("fastinter"),
    "downinter": _server_time("downinter"),
    "rise": _set("rise", lambda value: parse_integer(value, 1)),
    "fall": _set("fall", lambda value: parse_integer(value, 1)),
    "slowstart": _server_time("slowstart"),
    "maxconn": _set("maxconn", lambda value: parse_integer(value, 0) or None),
    "maxqueue": _set("maxqueue", lambda value: parse_integer(value, 0)),
    "minconn": _set("minconn", lambda value: parse_integer(value, 0)),
    "weight": _set("weight", _weight),
    "backup": _flag("backup"),
    "disabled": _flag("disabled"),
    "enabled": _flag("disabled", False),
    "port": _set("check_port", parse_port),
    "addr": _set("check_addr", _check_address),
    "on-marked-down": _set(
        "on_marked_down", lambda value: parse_choice(value, ("shutdown-sessions",))
    ),
    "on-marked-up": _set(
        "on_marked_up", lambda value: parse_choice(value, ("shutdown-backup-sessions",))
    ),
    "observe": _unsupported("observing traffic to mark servers down (use 'check')"),
    "ssl": _unsupported("TLS towards servers: lb forwards plain TCP", takes_value=False),
    "verify": _unsupported("TLS towards servers: lb forwards plain TCP"),
    "sni": _unsupported("TLS towards servers: lb forwards plain TCP"),
    "ca-file": _unsupported("TLS towards servers: lb forwards plain TCP"),
    "crt": _unsupported("TLS towards servers: lb forwards plain TCP"),
    "check-ssl": _unsupported("TLS health checks", takes_value=False),
    "resolvers": _unsupported("DNS resolvers (names are resolved once at start)"),
    "init-addr": _unsupported("init-addr (names are resolved once at start)"),
    "agent-check": _unsupported("agent checks", takes_value=False),
    "track": _unsupported("tracking another server's checks"),
    "redir": _unsupported("HTTP redirection"),
    "cookie": _unsupported("HTTP cookies"),
    "id": _ignored("server ids are not used"),
}

# `no-<flag>` undoes a boolean set by default-server, as in HAProxy.
for _name in (
    "check",
    "check-send-proxy",
    "send-proxy",
    "send-proxy-v2",
    "backup",
):
    SERVER_OPTIONS["no-" + _name] = _flag(_name.replace("-", "_"), False)


def parse_options(
    line: Line,
    words: tuple[str, ...],
    table: dict[str, OptionSpec],
    report: Report,
    section: str,
) -> dict[str, object]:
    """Apply `words` (options of a bind/server line) through `table`.

    Every faulty option is reported; parsing goes on with the next one.
    """
    keyword = line.words[0]
    settings: dict[str, object] = {}
    index = 0
    while index < len(words):
        name = words[index]
        index += 1
        spec = table.get(name)
        if spec is None:
            report.error(
                line,
                keyword,
                f"unknown option '{name}' in '{section}' section{did_you_mean(name, table)}",
                section,
            )
            # A misspelt option that takes a value: skip its value too, so
            # `vrify none` is one error, not two.
            guesses = difflib.get_close_matches(name, list(table), n=1, cutoff=0.6)
            if (
                guesses
                and table[guesses[0]].takes_value
                and index < len(words)
                and words[index] not in table
            ):
                index += 1
            continue
        value = ""
        if spec.takes_value:
            if index >= len(words):
                report.error(line, keyword, f"'{name}' : expects a value", section)
                break
            value = words[index]
            index += 1
        if spec.ignored is not None:
            report.warning(line, keyword, f"'{name}' : ignored: {spec.ignored}", section)
            continue
        if spec.unsupported is not None:
            report.error(line, keyword, f"'{name}' : not supported: {spec.unsupported}", section)
            continue
        try:
            spec.apply(settings, value)
        except KeywordError as error:
            report.error(line, keyword, f"'{name}' : {error.message}", section)
    return settings


# --------------------------------------------------------------------------- proxies

ProxyParser = Callable[[Line, ProxyDraft, Report], None]


@dataclass(frozen=True, slots=True)
class ProxyKeyword:
    """A proxy keyword and where HAProxy allows it (its capabilities)."""

    parse: ProxyParser
    frontend: bool = True
    backend: bool = True
    defaults: bool = True

    def allowed_in(self, kind: ProxyKind) -> bool:
        if kind == "defaults":
            return self.defaults
        if kind == "frontend":
            return self.frontend
        if kind == "backend":
            return self.backend
        return self.frontend or self.backend


def _proxy_value(name: str, convert: Callable[[str], object], usage: str) -> ProxyParser:
    def parse(line: Line, draft: ProxyDraft, report: Report) -> None:
        draft.values[name] = convert(_one(line, usage))

    return parse


MODE_HTTP_ONLY_FOR_PROMETHEUS = (
    "'mode http' is accepted only on a frontend whose only job is "
    "'http-request use-service prometheus-exporter'"
)


def _mode(line: Line, draft: ProxyDraft, report: Report) -> None:
    value = _one(line, "'tcp'")
    if value == "http" and draft.kind == "frontend":
        # HAProxy needs it on its Prometheus frontend; whether this frontend is one is known
        # only at the end of the section (lb.config checks it there, see mode_http).
        draft.mode_http = Origin(line.file, line.lineno)
        return
    if value in ("http", "health"):
        hint = f"; {MODE_HTTP_ONLY_FOR_PROMETHEUS}" if value == "http" else ""
        raise KeywordError(f"'{value}' not supported: lb is a TCP balancer (use 'mode tcp'){hint}")
    draft.mode_http = None
    draft.values["mode"] = parse_choice(value, ("tcp",))


def _proxy_log(line: Line, draft: ProxyDraft, report: Report) -> None:
    if line.words[1:] == ("global",):
        draft.log_global = True
        return
    draft.log_targets.append(parse_log_target(line, line.words[1:]))


def _compiled(text: str) -> str:
    """A log-format string that lb can render, or KeywordError saying why not."""
    try:
        LogFormat(text)
    except LogFormatError as error:
        raise KeywordError(str(error)) from None
    return text


def _log_format(line: Line, draft: ProxyDraft, report: Report) -> None:
    draft.log_format = _compiled(_one(line, "one format string (quote it if it has spaces)"))


def _unique_id_format(line: Line, draft: ProxyDraft, report: Report) -> None:
    """`unique-id-format <fmt>` (configuration.txt 4.2): the connection id `%ID` shows and
    `proxy-v2-options unique-id` sends. HAProxy's words; lb renders what its log-format
    knows (%ci %cp %fi %fp %Ts %ms %rt %pid %ft %b ... and %{+X} hex)."""
    draft.values["unique_id_format"] = _compiled(
        _one(line, "one format string (quote it if it has spaces)")
    )


OPTION_NAMES = (
    "tcplog",
    "dontlognull",
    "redispatch",
    "allbackups",
    "log-health-checks",
    "tcp-check",
    "mqtt-chk",  # ours
)
UNSUPPORTED_OPTIONS = {
    "httplog": "HTTP logs: lb is a TCP balancer",
    "httpchk": "HTTP checks: lb checks by TCP connect",
    "forwardfor": "X-Forwarded-For: use send-proxy-v2",
    "http-server-close": "HTTP: lb is a TCP balancer",
    "http-keep-alive": "HTTP: lb is a TCP balancer",
    "ssl-hello-chk": "SSL hello checks",
    "mysql-check": "MySQL checks",
    "pgsql-check": "PostgreSQL checks",
    "redis-check": "Redis checks",
    "smtpchk": "SMTP checks",
    "ldap-check": "LDAP checks",
    "tcpka": "TCP keepalive settings",
    "clitcpka": "TCP keepalive settings",
    "srvtcpka": "TCP keepalive settings",
    "splice-auto": "splicing",
    "logasap": "early logging",
    "abortonclose": "abortonclose",
}


def _option(line: Line, draft: ProxyDraft, report: Report, enable: bool = True) -> None:
    if len(line.words) < 2:
        raise KeywordError("expects an option name")
    name = line.words[1]
    keyword = f"option {name}"
    if name in UNSUPPORTED_OPTIONS:
        raise KeywordError(f"not supported: {UNSUPPORTED_OPTIONS[name]}", keyword)
    if name not in OPTION_NAMES:
        raise KeywordError(
            f"unknown option '{name}' in '{draft.label}' section{did_you_mean(name, OPTION_NAMES)}",
            "option",
        )
    arguments = line.words[2:]
    field_name = name.replace("-", "_")
    if name == "mqtt-chk":
        draft.values["mqtt_check"] = _mqtt_check(line, arguments) if enable else None
        if enable:
            draft.option["tcp_check"] = False  # one check type per backend, the last said
        return
    if name == "tcp-check" and enable:
        draft.values["mqtt_check"] = None
    if name == "redispatch" and arguments and enable:
        if len(arguments) > 1:
            raise KeywordError("expects at most one interval", keyword)
        try:
            draft.option["redispatch_interval"] = parse_integer(arguments[0])
        except KeywordError as error:
            raise KeywordError(error.message, keyword) from None
    elif arguments:
        raise KeywordError("takes no argument", keyword)
    draft.option[field_name] = enable


MQTT_CHECK_VERSIONS = ("3.1.1", "5.0")
#: MQTT 3.1.1 section 3.1.3.1: a server must allow client ids of 1 to 23 of these characters.
_MQTT_CLIENT_ID = re.compile(r"[0-9a-zA-Z]{1,23}|[0-9a-zA-Z._:-]{1,64}")


def _mqtt_check(line: Line, arguments: tuple[str, ...]) -> MqttCheck:
    """`option mqtt-chk [3.1.1|5.0] [client-id <id>]` (ours)."""
    keyword = "option mqtt-chk"
    version: Literal["3.1.1", "5.0"] = "3.1.1"
    client_id: str | None = None
    rest = list(arguments)
    if rest and rest[0] not in ("client-id",):
        chosen = rest.pop(0)
        try:
            parse_choice(chosen, MQTT_CHECK_VERSIONS)
        except KeywordError as error:
            raise KeywordError(error.message, keyword) from None
        version = "5.0" if chosen == "5.0" else "3.1.1"
    if rest and rest[0] == "client-id":
        if len(rest) < 2:
            raise KeywordError("'client-id' expects a value", keyword)
        client_id = rest[1]
        if _MQTT_CLIENT_ID.fullmatch(client_id) is None:
            raise KeywordError(
                f"client id '{client_id}': 1 to 64 letters, digits or . _ : - (1 to 23 letters "
                "and digits for brokers that take no more, MQTT 3.1.1 section 3.1.3.1)",
                keyword,
            )
        rest = rest[2:]
    if rest:
        raise KeywordError(f"unexpected '{rest[0]}'; expects [3.1.1|5.0] [client-id <id>]", keyword)
    return MqttCheck(Origin(line.file, line.lineno), version, client_id)


TCP_CHECK_ACTIONS = ("connect", "send", "send-binary", "expect", "comment")
TCP_CHECK_UNSUPPORTED = {
    "send-lf": "log-format sends",
    "send-binary-lf": "log-format sends",
    "set-var": "variables",
    "unset-var": "variables",
}
TCP_CHECK_MATCHES = ("string", "binary", "rstring", "rbinary")
_MATCHES: dict[str, TcpCheckMatch] = {
    "string": "string",
    "binary": "binary",
    "rstring": "rstring",
    "rbinary": "rbinary",
}
_TCP_CHECK_UNSUPPORTED_OPTIONS = {
    "connect": {
        "ssl": "TLS health checks",
        "sni": "TLS health checks",
        "alpn": "TLS health checks",
        "proto": "multiplexers",
        "via-socks4": "SOCKS4",
    },
    "expect": {
        "string-lf": "log-format patterns",
        "binary-lf": "log-format patterns",
        "ok-status": "custom check statuses",
        "error-status": "custom check statuses",
        "tout-status": "custom check statuses",
        "on-success": "log-format messages",
        "on-error": "log-format messages",
        "status-code": "status code expressions",
    },
}


def _hex_bytes(value: str) -> bytes:
    if len(value) % 2 or re.fullmatch(r"[0-9a-fA-F]*", value) is None or not value:
        raise KeywordError(f"expects an even number of hex digits, got '{value}'")
    return bytes.fromhex(value)


def _tcp_check(line: Line, draft: ProxyDraft, report: Report) -> None:
    """`tcp-check <action> ...` (HAProxy 2.6 configuration.txt 4.2), the subset lb runs:
    connect, send, send-binary, expect string/binary/rstring/rbinary, comment."""
    if len(line.words) < 2:
        raise KeywordError(f"expects one of {', '.join(TCP_CHECK_ACTIONS)}")
    action = line.words[1]
    keyword = f"tcp-check {action}"
    if action in TCP_CHECK_UNSUPPORTED:
        raise KeywordError(f"not supported: {TCP_CHECK_UNSUPPORTED[action]}", keyword)
    if action not in TCP_CHECK_ACTIONS:
        raise KeywordError(
            f"unknown action '{action}'{did_you_mean(action, TCP_CHECK_ACTIONS)}", "tcp-check"
        )
    if not draft.tcp_check_own:
        draft.values["tcp_check_rules"] = ()
        draft.tcp_check_own = True
    rules = draft.values["tcp_check_rules"]
    assert isinstance(rules, tuple)
    origin = Origin(line.file, line.lineno)
    try:
        rule = _tcp_check_rule(origin, action, line.words[2:], len(rules), rules)
    except KeywordError as error:
        raise KeywordError(error.message, keyword) from None
    draft.values["tcp_check_rules"] = (*rules, rule)


def _tcp_check_rule(
    origin: Origin,
    action: str,
    words: tuple[str, ...],
    index: int,
    previous: tuple[TcpCheckRule, ...],
) -> TcpCheckRule:
    if action == "comment":
        if len(words) != 1:
            raise KeywordError("expects one comment (quote it if it has spaces)")
        return TcpCheckRule(origin, "comment", index, comment=words[0])
    if action in ("send", "send-binary"):
        if not words:
            raise KeywordError("expects the data to send")
        data = words[0].encode("latin-1") if action == "send" else _hex_bytes(words[0])
        extra = words[1:]
        if extra and (extra[0] != "comment" or len(extra) != 2):
            raise KeywordError(f"unexpected '{extra[0]}' (quote the data if it has spaces)")
        return TcpCheckRule(origin, "send", index, comment=extra[1] if extra else None, data=data)
    unsupported = _TCP_CHECK_UNSUPPORTED_OPTIONS[action]
    if action == "connect":
        first = next((rule for rule in previous if rule.action != "comment"), None)
        if first is not None and first.action != "connect":
            raise KeywordError(
                "first step MUST also be a 'connect', optionally preceded by a 'comment', "
                "when there is a 'connect' step in the tcp-check ruleset"
            )
        port: int | None = None
        addr: str | None = None
        comment: str | None = None
        flags: set[str] = set()
        rest = list(words)
        while rest:
            word = rest.pop(0)
            if word in unsupported:
                raise KeywordError(f"'{word}' not supported: {unsupported[word]}")
            if word in ("default", "send-proxy", "linger"):
                flags.add(word)  # linger: lb always closes gracefully
                continue
            if word not in ("port", "addr", "comment"):
                known = ("default", "port", "addr", "send-proxy", "linger", "comment")
                raise KeywordError(f"unknown option '{word}'{did_you_mean(word, known)}")
            if not rest:
                raise KeywordError(f"'{word}' expects a value")
            value = rest.pop(0)
            if word == "port":
                port = parse_port(value)
            elif word == "addr":
                addr, addr_port, _ = split_host_port(value, need_port=False)
                port = port if port is not None else addr_port
            else:
                comment = value
        return TcpCheckRule(
            origin,
            "connect",
            index,
            comment=comment,
            port=port,
            addr=addr,
            send_proxy="send-proxy" in flags,
            default="default" in flags,
        )
    # expect
    inverse = False
    min_recv = -1
    comment = None
    match: TcpCheckMatch | None = None
    pattern = b""
    rest = list(words)
    while rest:
        word = rest.pop(0)
        if word in unsupported:
            raise KeywordError(f"'{word}' not supported: {unsupported[word]}")
        if word == "!":
            inverse = True
        elif word in ("min-recv", "comment"):
            if not rest:
                raise KeywordError(f"'{word}' expects a value")
            value = rest.pop(0)
            if word == "min-recv":
                min_recv = parse_integer(value, -1)
            else:
                comment = value
        elif word in TCP_CHECK_MATCHES:
            if match is not None:
                raise KeywordError(f"only one match per expect ('{match}' and '{word}')")
            if not rest:
                raise KeywordError(f"'{word}' expects a pattern")
            match, value = _MATCHES[word], rest.pop(0)
            if word == "binary":
                pattern = _hex_bytes(value)
            else:
                pattern = value.encode("latin-1")
                if word in ("rstring", "rbinary"):
                    try:
                        re.compile(pattern)
                    except re.error as error:
                        raise KeywordError(f"bad regex '{value}': {error}") from None
        else:
            raise KeywordError(
                f"unknown option '{word}'; expects [min-recv <n>] [comment <msg>] [!] "
                f"<match> <pattern> with <match> one of {', '.join(TCP_CHECK_MATCHES)}"
                f"{did_you_mean(word, (*TCP_CHECK_MATCHES, 'min-recv', 'comment'))}"
            )
    if match is None:
        raise KeywordError(f"expects a match: one of {', '.join(TCP_CHECK_MATCHES)}")
    return TcpCheckRule(
        origin,
        "expect",
        index,
        comment=comment,
        match=match,
        pattern=pattern,
        inverse=inverse,
        min_recv=min_recv,
    )


def _no(line: Line, draft: ProxyDraft, report: Report) -> None:
    words = line.words[1:]
    if words[:1] == ("option",):
        _option(Line(line.file, line.lineno, words), draft, report, enable=False)
    elif words == ("log",):
        draft.log_global = False
        draft.log_targets = []
    else:
        raise KeywordError("expects 'no option <name>' or 'no log'")


TIMEOUT_NAMES = (
    "connect",
    "client",
    "server",
    "check",
    "queue",
    "tunnel",
    "client-fin",
    "server-fin",
)


def _timeout(line: Line, draft: ProxyDraft, report: Report) -> None:
    if len(line.words) < 2:
        raise KeywordError(f"expects one of {', '.join(TIMEOUT_NAMES)} and a time")
    name = line.words[1]
    if name in ("http-request", "http-keep-alive", "tarpit"):
        raise KeywordError("not supported: HTTP timeouts; lb is a TCP balancer", f"timeout {name}")
    if name not in TIMEOUT_NAMES:
        raise KeywordError(
            f"unknown timeout '{name}'{did_you_mean(name, TIMEOUT_NAMES)}", "timeout"
        )
    keyword = f"timeout {name}"
    if len(line.words) != 3:
        raise KeywordError("expects a time like 10s, 500ms", keyword)
    try:
        draft.timeout[name.replace("-", "_")] = parse_time(line.words[2])
    except KeywordError as error:
        raise KeywordError(error.message, keyword) from None


#: `balance hash <expression>`: the sample expressions lb computes, as written (lower case).
HASH_EXPRESSIONS = ("src", "ssl_c_s_dn(cn)")
#: `hash-type <method> <function>`: HAProxy 2.6 also has these, which lb does not compute.
UNSUPPORTED_HASH_FUNCTIONS = ("wt6", "none")


def _hash_expression(expression: str) -> str:
    """`src` or `ssl_c_s_dn(cn)` (the entry's case does not matter: HAProxy compares it
    case-insensitively); anything else is refused by name."""
    supported = " and ".join(f"'{e}'" for e in HASH_EXPRESSIONS)
    if "," in expression:
        fetch, converter = expression.split(",", 1)
        raise KeywordError(
            f"converter '{converter.split('(')[0]}' in '{expression}' not supported: "
            f"lb supports the expressions {supported} without converters",
            "balance hash",
        )
    normalized = expression.lower() if expression.lower().startswith("ssl_c_s_dn(") else expression
    if normalized not in HASH_EXPRESSIONS:
        fetch = expression.split("(", maxsplit=1)[0]
        raise KeywordError(
            f"sample expression '{expression}' not supported: lb supports {supported}"
            f"{did_you_mean(fetch, ('src', 'ssl_c_s_dn'))}",
            "balance hash",
        )
    return normalized


def _balance(line: Line, draft: ProxyDraft, report: Report) -> None:
    if len(line.words) < 2:
        raise KeywordError(f"expects an algorithm: {', '.join(BALANCE_ALGORITHMS)}")
    algorithm = line.words[1]
    if algorithm not in BALANCE_ALGORITHMS:
        known = ", ".join(f"'{name}'" for name in BALANCE_ALGORITHMS)
        raise KeywordError(
            f"unknown or unsupported algorithm '{algorithm}'; lb supports {known}"
            f"{did_you_mean(algorithm, BALANCE_ALGORITHMS)}"
        )
    expression: str | None = None
    if algorithm == "hash":
        if len(line.words) != 3:
            raise KeywordError(
                "'hash' expects one sample expression: "
                + " or ".join(f"'{e}'" for e in HASH_EXPRESSIONS)
            )
        expression = _hash_expression(line.words[2])
    elif len(line.words) > 2:
        raise KeywordError(f"'{algorithm}' takes no argument")
    draft.values["balance"] = algorithm
    draft.values["hash_expr"] = expression


def _hash_type(line: Line, draft: ProxyDraft, report: Report) -> None:
    if not 2 <= len(line.words) <= 4:
        raise KeywordError("expects 'map-based' or 'consistent' [<function> [<modifier>]]")
    draft.values["hash_type"] = parse_choice(line.words[1], HASH_TYPES)
    function = line.words[2] if len(line.words) > 2 else "sdbm"
    if function in UNSUPPORTED_HASH_FUNCTIONS:
        raise KeywordError(
            f"hash function '{function}' not supported: lb computes "
            + ", ".join(f"'{f}'" for f in HASH_FUNCTIONS)
        )
    draft.values["hash_function"] = parse_choice(function, HASH_FUNCTIONS)
    modifier = line.words[3] if len(line.words) > 3 else None
    if modifier is not None and modifier != "avalanche":
        raise KeywordError(f"unknown hash modifier '{modifier}': the one modifier is 'avalanche'")
    # HAProxy 2.6 (cfgparse-listen.c): 'hash-type consistent' with no function is sdbm with
    # the avalanche modifier; with a function, avalanche only when it is written.
    bare_consistent = len(line.words) == 2 and draft.values["hash_type"] == "consistent"
    draft.values["hash_avalanche"] = modifier == "avalanche" or bare_consistent


def _backend_name(line: Line, usage: str) -> str:
    name = line.words[1] if len(line.words) > 1 else ""
    if not name:
        raise KeywordError(f"expects {usage}")
    rest = line.words[2:]
    if rest and rest[0] in ("if", "unless"):
        raise KeywordError("ACL conditions not supported: only an unconditional backend")
    if rest:
        raise KeywordError(f"unexpected '{rest[0]}' after the backend name")
    return name


def _default_backend(line: Line, draft: ProxyDraft, report: Report) -> None:
    draft.default_backend = (_backend_name(line, "a backend name"), Origin(line.file, line.lineno))


def _use_backend(line: Line, draft: ProxyDraft, report: Report) -> None:
    draft.use_backend.append(
        (_backend_name(line, "a backend name"), Origin(line.file, line.lineno))
    )


def _bind(line: Line, draft: ProxyDraft, report: Report) -> None:
    if len(line.words) < 2:
        raise KeywordError("expects an address like *:8091")
    address = line.words[1]
    settings: dict[str, object] = {"address": address}
    try:
        host, port, family = split_host_port(address, need_port=True)
    except KeywordError as error:
        report.error(line, "bind", error.message, draft.label)
    else:
        if family == "ipv4" and host != "0.0.0.0":
            try:
                ipaddress.ip_address(host)
            except ValueError:
                report.error(line, "bind", f"expects an IP address, got '{host}'", draft.label)
        settings.update(host=host, port=port, family=family)
    settings.update(parse_options(line, line.words[2:], BIND_OPTIONS, report, draft.label))
    draft.binds.append(PendingBind(Origin(line.file, line.lineno), settings))


def _server(line: Line, draft: ProxyDraft, report: Report) -> None:
    if len(line.words) < 3:
        raise KeywordError("expects <name> <address> [options...]")
    name, address = line.words[1], line.words[2]
    settings: dict[str, object] = dict(draft.default_server)
    settings["address"] = address
    try:
        host, port, _ = split_host_port(address, need_port=False)
    except KeywordError as error:
        report.error(line, "server", error.message, draft.label)
        host, port = address, None
    settings.update(host=host, port=port)
    options = parse_options(line, line.words[3:], SERVER_OPTIONS, report, draft.label)
    if "proxy_v2_options" in options and "proxy_v2_options" in settings:
        # proxy-v2-options adds to what default-server chose, like send-proxy-v2-ssl.
        inherited = settings["proxy_v2_options"]
        assert isinstance(inherited, frozenset)
        _add_proxy_v2_options(options, inherited)
    settings.update(options)
    draft.servers.append(PendingServer(Origin(line.file, line.lineno), name, settings))


def _default_server(line: Line, draft: ProxyDraft, report: Report) -> None:
    draft.default_server.update(
        parse_options(line, line.words[1:], SERVER_OPTIONS, report, draft.label)
    )


def _stats(line: Line, draft: ProxyDraft, report: Report) -> None:
    if line.words[1:] == ("enable",):
        draft.values["stats_enable"] = True
        return
    what = " ".join(line.words[1:2])
    raise KeywordError(
        f"not supported: 'stats {what}' (only 'stats enable'; "
        "metrics come from 'http-request use-service prometheus-exporter')"
    )


HTTP_REQUEST_AUTH_USAGE = (
    "'http-request auth [realm <realm>] unless { http_auth(<userlist>) }' "
    "(or 'if !{ http_auth(<userlist>) }')"
)


def _http_request(line: Line, draft: ProxyDraft, report: Report) -> None:
    if line.words[1:2] == ("auth",):
        draft.values["http_request_auth"] = _http_request_auth(line.words[2:], draft)
        draft.http_request_auth = Origin(line.file, line.lineno)
        return
    if line.words[1:3] != ("use-service", "prometheus-exporter"):
        raise KeywordError(
            "not supported: lb is a TCP balancer; only "
            "'http-request use-service prometheus-exporter' and "
            f"{HTTP_REQUEST_AUTH_USAGE} are accepted"
        )
    draft.values["http_request_use_service"] = "prometheus-exporter"


def _http_request_auth(words: tuple[str, ...], draft: ProxyDraft) -> tuple[str, str]:
    """HAProxy's way to protect its exporter: basic auth against a userlist, asked for
    unless the request already carries a user of it. Only that condition is understood."""
    realm = draft.name or "lb"
    if words[:1] == ("realm",):
        if len(words) < 2:
            raise KeywordError(f"'realm' expects a name; usage: {HTTP_REQUEST_AUTH_USAGE}")
        realm, words = words[1], words[2:]
    condition = " ".join(words)
    for prefix, suffix in (("unless { http_auth(", ") }"), ("if !{ http_auth(", ") }")):
        if condition.startswith(prefix) and condition.endswith(suffix):
            userlist = condition[len(prefix) : -len(suffix)]
            if userlist and " " not in userlist:
                return realm, userlist
    raise KeywordError(
        f"not supported: condition '{condition or '(none)'}'; usage: {HTTP_REQUEST_AUTH_USAGE}"
    )


@dataclass(slots=True)
class UserlistDraft:
    """A `userlist` section while it is parsed: (name, password, insecure, origin) per user."""

    name: str
    origin: Origin
    users: list[tuple[str, str, bool, Origin]] = field(default_factory=list)


def parse_userlist_line(line: Line, draft: UserlistDraft) -> None:
    """`user <name> password <crypt hash> | insecure-password <password>` (no groups)."""
    keyword = line.words[0]
    if keyword == "group" or (keyword == "user" and "groups" in line.words):
        raise KeywordError("not supported: groups (lb checks users only)")
    if keyword != "user":
        raise KeywordError(
            f"unknown keyword '{keyword}' in 'userlist' section{did_you_mean(keyword, ('user',))}"
        )
    words = line.words[1:]
    if len(words) != 3 or words[1] not in ("password", "insecure-password"):
        raise KeywordError(
            "expects '<name> password <crypt(3) hash>' or '<name> insecure-password <password>'"
        )
    name, kind, secret = words
    if any(user[0] == name for user in draft.users):
        raise KeywordError(f"user '{name}' already defined in userlist '{draft.name}'")
    if kind == "password" and not _looks_like_crypt(secret):
        raise KeywordError(
            f"user '{name}': '{secret[:12]}...' is not a crypt(3) hash such as "
            "'$6$salt$...' (mkpasswd -m sha-512); use insecure-password for plain text"
        )
    draft.users.append((name, secret, kind == "insecure-password", Origin(line.file, line.lineno)))


def _looks_like_crypt(value: str) -> bool:
    # $id$[params$]salt$hash (glibc/libxcrypt: 1, 5, 6, y, gy, 7, 2b...) or 13-char DES.
    return (value.startswith("$") and value.count("$") >= 3) or len(value) == 13


def _unsupported_proxy(reason: str) -> ProxyParser:
    def parse(line: Line, draft: ProxyDraft, report: Report) -> None:
        raise KeywordError(f"not supported: {reason}")

    return parse


def _rate_limit(line: Line, draft: ProxyDraft, report: Report) -> None:
    """`rate-limit sessions <rate>`: new sessions per second on the frontend (0: none)."""
    words = line.words[1:]
    if len(words) != 2 or words[0] != "sessions":
        raise KeywordError(
            "expects 'sessions <rate>' (new sessions per second, the only kind HAProxy has too)"
        )
    draft.values["rate_limit_sessions"] = parse_integer(words[1], 0) or None


def _integer_value(name: str, minimum: int) -> ProxyParser:
    return _proxy_value(name, lambda value: parse_integer(value, minimum), "an integer")


PROXY_KEYWORDS: dict[str, ProxyKeyword] = {
    "mode": ProxyKeyword(_mode),
    "log": ProxyKeyword(_proxy_log),
    "no": ProxyKeyword(_no),
    "log-format": ProxyKeyword(_log_format, backend=False),
    "unique-id-format": ProxyKeyword(_unique_id_format, backend=False),
    "unique-id-header": ProxyKeyword(
        _unsupported_proxy(
            "HTTP headers: lb is a TCP balancer (send the id with 'proxy-v2-options unique-id')"
        )
    ),
    "option": ProxyKeyword(_option),
    "timeout": ProxyKeyword(_timeout),
    "retries": ProxyKeyword(_integer_value("retries", 0), frontend=False),
    "maxconn": ProxyKeyword(_integer_value("maxconn", 0), backend=False),
    "rate-limit": ProxyKeyword(_rate_limit, backend=False),
    "fullconn": ProxyKeyword(_integer_value("fullconn", 1), frontend=False),
    "balance": ProxyKeyword(_balance, frontend=False),
    "hash-type": ProxyKeyword(_hash_type, frontend=False),
    "default_backend": ProxyKeyword(_default_backend, backend=False),
    "use_backend": ProxyKeyword(_use_backend, backend=False, defaults=False),
    "bind": ProxyKeyword(_bind, backend=False, defaults=False),
    "server": ProxyKeyword(_server, frontend=False, defaults=False),
    "default-server": ProxyKeyword(_default_server, frontend=False),
    "stats": ProxyKeyword(_stats),
    "http-request": ProxyKeyword(_http_request, backend=False, defaults=False),
    "acl": ProxyKeyword(_unsupported_proxy("ACLs")),
    "tcp-request": ProxyKeyword(_unsupported_proxy("tcp-request rules")),
    "tcp-response": ProxyKeyword(_unsupported_proxy("tcp-response rules")),
    "http-response": ProxyKeyword(_unsupported_proxy("lb is a TCP balancer")),
    "stick-table": ProxyKeyword(_unsupported_proxy("stick tables")),
    "stick": ProxyKeyword(_unsupported_proxy("stickiness")),
    "tcp-check": ProxyKeyword(_tcp_check, frontend=False),
    "http-check": ProxyKeyword(_unsupported_proxy("HTTP checks")),
    "cookie": ProxyKeyword(_unsupported_proxy("HTTP cookies")),
    "capture": ProxyKeyword(_unsupported_proxy("captures")),
    "errorfile": ProxyKeyword(_unsupported_proxy("lb is a TCP balancer")),
    "server-template": ProxyKeyword(_unsupported_proxy("server templates")),
}
