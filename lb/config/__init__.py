"""Loading haproxy.cfg-style files into the frozen model (`load_config`).

Owns the walk over sections (global, defaults, frontend, backend, listen),
inheritance (a proxy starts from the last `defaults` section before it, or
the one named with `from`; `default-server` applies to later servers), the
post-parse checks that need the whole configuration (backend references,
duplicate names, TLS option consistency) and the lint warnings that point at
known traps (HAProxy 2.6 semantics; see doc/configuration.txt sections 2-5).

Every problem becomes a `Diagnostic`; parsing never stops at the first one.

    result = load_config(["configs/haproxy.cfg"])
    if result.config is None: ...          # errors in result.diagnostics
    config = result.config_or_raise()      # or raise ConfigError
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from lb.config.errors import ConfigError, Diagnostic, Origin, Severity, format_report
from lb.config.keywords import (
    GLOBAL_KEYWORDS,
    GLOBAL_SINGLE_KEYWORDS,
    MODE_HTTP_ONLY_FOR_PROMETHEUS,
    PROXY_KEYWORDS,
    SECTIONS,
    UNSUPPORTED_SECTIONS,
    GlobalDraft,
    KeywordError,
    PendingBind,
    PendingServer,
    ProxyDraft,
    ProxyKind,
    Report,
    UserlistDraft,
    did_you_mean,
    parse_userlist_line,
)
from lb.config.lexer import Line, tokenize
from lb.config.model import (
    NOWHERE,
    Backend,
    Bind,
    Config,
    Defaults,
    Frontend,
    Global,
    Logging,
    Options,
    Server,
    Timeouts,
    User,
    Userlist,
)
from lb.mqtt_check import MQTT_CHECK_KEEPALIVE, connack_rule, encode_connect
from lb.proxyproto import DEFAULT_MAX_HEADER_SIZE
from lb.tls_codes import TLS_VERSIONS

__all__ = [
    "ConfigError",
    "Diagnostic",
    "LoadResult",
    "Origin",
    "Severity",
    "format_report",
    "load_config",
    "load_config_text",
]

# HAProxy's `invalid_char` rule for proxy and server names.
_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
# Seed 004: "maxconn defaults to 2000, raise it or devices are capped there". HAProxy 2.6
# (and lb, lb.limits) compute an unset global maxconn from the file limit instead; a global
# maxconn set this low below a server's is what the seed warned about.
_DEFAULT_GLOBAL_MAXCONN = 2000


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What `load_config` found: the model (None on errors) and every diagnostic."""

    config: Config | None
    diagnostics: tuple[Diagnostic, ...]
    #: The model built in spite of errors (None when there are none: see `config`), so that
    #: `lb -c` can still load the certificate files of the lines that parsed and report
    #: every problem in one run, as `haproxy -c` does. A line with an error is missing from
    #: it or incomplete.
    partial: Config | None = None

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.is_error)

    @property
    def warnings(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.is_warning)

    def config_or_raise(self) -> Config:
        if self.config is None:
            raise ConfigError(self.diagnostics)
        return self.config


def load_config(
    paths: Sequence[str | os.PathLike[str]], *, environ: Mapping[str, str] | None = None
) -> LoadResult:
    """Read and check configuration files, in order, as one configuration.

    `environ` supplies `${VAR}` values (default: `os.environ`).
    """
    texts: list[tuple[str, str]] = []
    diagnostics: list[Diagnostic] = []
    for path in paths:
        file = os.fspath(path)
        try:
            with open(file, encoding="utf-8") as stream:
                texts.append((file, stream.read()))
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else str(error)
            diagnostics.append(
                Diagnostic.error(
                    None, None, None, f"Could not open configuration file {file} : {reason}"
                )
            )
    result = _load(texts, os.environ if environ is None else environ)
    if diagnostics:
        return LoadResult(None, (*diagnostics, *result.diagnostics))
    return result


def load_config_text(
    text: str, file: str = "<string>", *, environ: Mapping[str, str] | None = None
) -> LoadResult:
    """Like `load_config` for text already in memory; `file` names it in messages
    and its directory anchors relative paths."""
    return _load([(file, text)], {} if environ is None else environ)


# --------------------------------------------------------------------------- parsing


@dataclass(slots=True)
class _Drafts:
    global_: GlobalDraft
    defaults: list[ProxyDraft]
    proxies: list[ProxyDraft]
    userlists: list[UserlistDraft] = dataclasses.field(default_factory=list)


def _load(texts: Sequence[tuple[str, str]], environ: Mapping[str, str]) -> LoadResult:
    report = Report()
    drafts = _Drafts(GlobalDraft(NOWHERE), [], [])
    for file, text in texts:
        lines, lex_errors = tokenize(text, file, environ)
        report.diagnostics.extend(lex_errors)
        _parse_lines(lines, drafts, report)
    config = _build(drafts, report, tuple(file for file, _ in texts))
    diagnostics = tuple(sorted(report.diagnostics, key=lambda d: d.position))
    if any(d.is_error for d in diagnostics):
        return LoadResult(None, diagnostics, partial=config)
    return LoadResult(config, diagnostics)


def _parse_lines(lines: Sequence[Line], drafts: _Drafts, report: Report) -> None:
    section: GlobalDraft | ProxyDraft | UserlistDraft | None = None
    skipping = False  # inside a section we do not support
    seen_global = drafts.global_.origin is not NOWHERE
    for line in lines:
        keyword = line.words[0]
        if keyword in SECTIONS or keyword in UNSUPPORTED_SECTIONS:
            skipping = False
            if keyword in UNSUPPORTED_SECTIONS:
                report.error(line, None, f"section '{keyword}' is not supported by lb")
                skipping, section = True, None
            elif keyword == "global":
                if len(line.words) > 1:
                    report.error(line, "global", "takes no argument")
                if not seen_global:
                    drafts.global_.origin = Origin(line.file, line.lineno)
                    seen_global = True
                section = drafts.global_
            elif keyword == "userlist":
                section = _open_userlist(line, drafts, report)
            else:
                section = _open_proxy(line, drafts, report)
            continue
        if skipping:
            continue
        if section is None:
            report.error(
                line,
                None,
                f"unknown keyword '{keyword}' out of section{did_you_mean(keyword, SECTIONS)}",
            )
        elif isinstance(section, GlobalDraft):
            _parse_global_line(line, section, report)
        elif isinstance(section, UserlistDraft):
            try:
                parse_userlist_line(line, section)
            except KeywordError as error:
                report.error(line, keyword, error.message, f"userlist {section.name}")
        else:
            _parse_proxy_line(line, section, report)


def _parse_global_line(line: Line, draft: GlobalDraft, report: Report) -> None:
    keyword = line.words[0]
    parser = GLOBAL_KEYWORDS.get(keyword)
    if parser is None:
        candidates = (*GLOBAL_KEYWORDS, *SECTIONS)
        report.error(
            line,
            None,
            f"unknown keyword '{keyword}' in 'global' section{did_you_mean(keyword, candidates)}",
            "global",
        )
        return
    if keyword in GLOBAL_SINGLE_KEYWORDS and keyword in draft.seen:
        report.error(line, keyword, f"already specified at {draft.seen[keyword]}", "global")
        return
    draft.seen.setdefault(keyword, Origin(line.file, line.lineno))
    try:
        parser(line, draft, report)
    except KeywordError as error:
        report.error(line, error.keyword or keyword, error.message, "global")


def _parse_proxy_line(line: Line, draft: ProxyDraft, report: Report) -> None:
    keyword = line.words[0]
    spec = PROXY_KEYWORDS.get(keyword)
    if spec is None:
        candidates = (*PROXY_KEYWORDS, *SECTIONS)
        report.error(
            line,
            None,
            f"unknown keyword '{keyword}' in '{draft.label}' section"
            f"{did_you_mean(keyword, candidates)}",
            draft.label,
        )
        return
    if not spec.allowed_in(draft.kind):
        if draft.kind == "defaults":
            report.error(line, keyword, "not allowed in 'defaults' section", draft.label)
        else:
            # As HAProxy: a keyword for the other side is ignored with a warning,
            # except servers, which a frontend cannot hold at all.
            missing = "backend" if draft.kind == "frontend" else "frontend"
            message = f"{draft.kind} '{draft.name}' has no {missing} capability"
            if keyword in ("server", "default-server"):
                report.error(line, keyword, f"not allowed because {message}", draft.label)
            else:
                report.warning(line, keyword, f"ignored because {message}", draft.label)
        return
    try:
        spec.parse(line, draft, report)
    except KeywordError as error:
        report.error(line, error.keyword or keyword, error.message, draft.label)


def _open_userlist(line: Line, drafts: _Drafts, report: Report) -> UserlistDraft:
    name = line.words[1] if len(line.words) > 1 else f"<unnamed line {line.lineno}>"
    if len(line.words) != 2:
        report.error(line, "userlist", "expects exactly one name")
    previous = next((draft for draft in drafts.userlists if draft.name == name), None)
    if previous is not None:
        report.error(
            line,
            "userlist",
            f"userlist '{name}' has the same name as another userlist declared at "
            f"{previous.origin.file}:{previous.origin.line}",
        )
    draft = UserlistDraft(name, Origin(line.file, line.lineno))
    drafts.userlists.append(draft)
    return draft


def _open_proxy(line: Line, drafts: _Drafts, report: Report) -> ProxyDraft:
    kind: ProxyKind
    keyword = line.words[0]
    kind = (
        "defaults"
        if keyword == "defaults"
        else (
            "frontend" if keyword == "frontend" else "backend" if keyword == "backend" else "listen"
        )
    )
    arguments = list(line.words[1:])
    parent_name: str | None = None
    if len(arguments) >= 2 and arguments[-2] == "from":
        parent_name = arguments[-1]
        del arguments[-2:]
    name: str | None = arguments[0] if arguments else None
    if len(arguments) > 1:
        report.error(line, keyword, f"unexpected '{arguments[1]}' after the name")
    if name is None and kind != "defaults":
        report.error(line, keyword, f"expects a name for the {kind}")
        name = f"<unnamed line {line.lineno}>"
    if name is not None and not set(name) <= _NAME_CHARACTERS:
        bad = next(character for character in name if character not in _NAME_CHARACTERS)
        report.error(line, keyword, f"character '{bad}' is not permitted in {kind} name '{name}'")
    draft = ProxyDraft(kind, name, Origin(line.file, line.lineno))
    parent: ProxyDraft | None = drafts.defaults[-1] if drafts.defaults else None
    if parent_name is not None:
        named = [d for d in drafts.defaults if d.name == parent_name]
        if named:
            parent = named[-1]
        else:
            report.error(line, keyword, f"unable to find defaults section '{parent_name}'")
    if parent is not None:
        draft.inherit(parent)
    if kind == "defaults":
        drafts.defaults.append(draft)
    else:
        drafts.proxies.append(draft)
    return draft


# --------------------------------------------------------------------------- building

_Model = TypeVar("_Model")


def _replace(instance: _Model, *changes: Mapping[str, object]) -> _Model:
    """`dataclasses.replace` with fields collected by the keyword parsers.

    The parsers have already converted every value to its field's type; the
    dictionaries are typed `object` only because they hold many fields.
    """
    merged: dict[str, Any] = {}
    for change in changes:
        merged.update(change)
    return dataclasses.replace(instance, **merged)  # type: ignore[type-var]


def _build(drafts: _Drafts, report: Report, files: tuple[str, ...]) -> Config:
    global_ = _build_global(drafts.global_)
    defaults = tuple(_build_defaults(draft) for draft in drafts.defaults)
    frontends: list[Frontend] = []
    backends: list[Backend] = []
    for draft in drafts.proxies:
        if draft.kind in ("frontend", "listen"):
            frontends.append(_build_frontend(draft, global_, report))
        if draft.kind in ("backend", "listen"):
            backends.append(_build_backend(draft, report))
    _check_names(drafts, report)
    _check_mode_http(drafts, report)
    _check_backend_references(drafts, {backend.name for backend in backends}, report)
    userlists = tuple(
        Userlist(
            draft.origin,
            draft.name,
            tuple(User(name, secret, insecure) for name, secret, insecure, _ in draft.users),
        )
        for draft in drafts.userlists
    )
    _check_exporter_auth(drafts, frontends, userlists, report)
    _lint(global_, frontends, backends, report)
    return Config(global_, defaults, tuple(frontends), tuple(backends), files, userlists)


def _build_global(draft: GlobalDraft) -> Global:
    return _replace(
        Global(origin=draft.origin, log=tuple(draft.log), stats_socket=tuple(draft.stats_socket)),
        draft.values,
    )


def _common(draft: ProxyDraft) -> dict[str, object]:
    return {
        "timeout": _replace(Timeouts(), draft.timeout),
        "option": _replace(Options(), draft.option),
        "log": Logging(draft.log_global, tuple(draft.log_targets), draft.log_format),
    }


_DEFAULTS_FIELDS = frozenset(field.name for field in dataclasses.fields(Defaults))
_FRONTEND_FIELDS = frozenset(field.name for field in dataclasses.fields(Frontend))
_BACKEND_FIELDS = frozenset(field.name for field in dataclasses.fields(Backend))


def _pick(values: Mapping[str, object], names: frozenset[str]) -> dict[str, object]:
    return {name: value for name, value in values.items() if name in names}


def _build_defaults(draft: ProxyDraft) -> Defaults:
    return _replace(
        Defaults(draft.origin, draft.name),
        {"default_backend": draft.default_backend[0] if draft.default_backend else None},
        _common(draft),
        _pick(draft.values, _DEFAULTS_FIELDS),
    )


def _build_frontend(draft: ProxyDraft, global_: Global, report: Report) -> Frontend:
    assert draft.name is not None
    binds = tuple(
        bind
        for pending in draft.binds
        if (bind := _build_bind(pending, global_, draft.label, report)) is not None
    )
    if draft.kind == "listen":
        default_backend: str | None = draft.name
    else:
        default_backend = draft.default_backend[0] if draft.default_backend else None
    return _replace(
        Frontend(
            draft.origin,
            draft.name,
            binds=binds,
            default_backend=default_backend,
            use_backend=tuple(name for name, _ in draft.use_backend),
            listen=draft.kind == "listen",
        ),
        _common(draft),
        _pick(draft.values, _FRONTEND_FIELDS),
    )


def _build_backend(draft: ProxyDraft, report: Report) -> Backend:
    assert draft.name is not None
    servers: list[Server] = []
    seen: dict[str, Origin] = {}
    for pending in draft.servers:
        if pending.name in seen:
            report.diagnostics.append(
                Diagnostic.error(
                    pending.origin.file,
                    pending.origin.line,
                    "server",
                    f"'{draft.label}' has two servers named '{pending.name}' "
                    f"(the other is at {seen[pending.name]})",
                    draft.label,
                )
            )
        seen.setdefault(pending.name, pending.origin)
        servers.append(_build_server(pending, draft.label, report))
    return _replace(
        Backend(draft.origin, draft.name, servers=tuple(servers), listen=draft.kind == "listen"),
        _common(draft),
        _pick(draft.values, _BACKEND_FIELDS),
    )


def _build_server(pending: PendingServer, section: str, report: Report) -> Server:
    settings = dict(pending.settings)
    origin = pending.origin
    keys = settings.get("proxy_v2_hmac_keys")
    if isinstance(keys, str):
        settings["proxy_v2_hmac_keys"] = _resolve_path(keys, None, origin)
    options = settings.get("proxy_v2_options", frozenset())
    assert isinstance(options, frozenset)

    def error(message: str) -> None:
        report.diagnostics.append(
            Diagnostic.error(origin.file, origin.line, "server", message, section)
        )

    if "hmac" in options and not keys:
        error(
            f"'{pending.name}': 'proxy-v2-options hmac' needs the key file it signs with: "
            "add 'proxy-v2-hmac-keys <file>' (lb.proxy_hmac's format, shared with the brokers)"
        )
    elif "hmac" in options and not settings.get("send_proxy_v2"):
        error(
            f"'{pending.name}': 'proxy-v2-options hmac' authenticates a PROXY v2 header: add "
            "'send-proxy-v2'"
        )
    elif keys and "hmac" not in options:
        report.diagnostics.append(
            Diagnostic.warning(
                origin.file,
                origin.line,
                "server",
                f"'{pending.name}': 'proxy-v2-hmac-keys' is set but 'proxy-v2-options' has no "
                "'hmac': the headers go unauthenticated, and a broker that holds the key refuses "
                "them",
                section,
            )
        )
    return _replace(Server(origin, pending.name, "", "", None), settings)


def _resolve_path(path: str, base: str | None, origin: Origin) -> str:
    """Relative paths: against `base` (crt-base/ca-base), then the config's directory."""
    config_directory = os.path.dirname(os.path.abspath(origin.file))
    if base is not None and not os.path.isabs(base):
        base = os.path.join(config_directory, base)
    anchor = base if base is not None else config_directory
    return os.path.normpath(os.path.join(anchor, path))


def _default_bind_options(global_: Global) -> dict[str, object]:
    """Bind fields implied by `ssl-default-bind-options` and friends."""
    defaults: dict[str, object] = {}
    words = list(global_.ssl_default_bind_options)
    while words:
        word = words.pop(0)
        if word in ("ssl-min-ver", "ssl-max-ver"):
            defaults[word.replace("-", "_")] = words.pop(0)
        elif word != "prefer-client-ciphers":
            defaults[word.replace("-", "_")] = True
    if global_.ssl_default_bind_ciphers is not None:
        defaults["ciphers"] = global_.ssl_default_bind_ciphers
    if global_.ssl_default_bind_ciphersuites is not None:
        defaults["ciphersuites"] = global_.ssl_default_bind_ciphersuites
    return defaults


def _build_bind(pending: PendingBind, global_: Global, section: str, report: Report) -> Bind | None:
    settings = dict(pending.settings)
    origin = pending.origin

    def error(message: str) -> None:
        report.diagnostics.append(
            Diagnostic.error(origin.file, origin.line, "bind", message, section)
        )

    def warning(message: str) -> None:
        report.diagnostics.append(
            Diagnostic.warning(origin.file, origin.line, "bind", message, section)
        )

    if "port" not in settings:
        return None  # the address was already reported
    if settings.get("ssl"):
        settings = {**_default_bind_options(global_), **settings}
        if not settings.get("crt"):
            error(f"'ssl' needs a certificate: add 'crt <file>' to 'bind {settings['address']}'")
        verify = settings.get("verify")
        if verify in ("optional", "required") and not settings.get("ca_file"):
            error(f"'verify {verify}' needs 'ca-file' (the CAs that sign client certificates)")
        if settings.get("ca_verify_file") and not settings.get("ca_file"):
            error("'ca-verify-file' needs 'ca-file' (ca-verify-file only completes chains)")
        minimum = settings.get("ssl_min_ver", "TLSv1.2")
        maximum = settings.get("ssl_max_ver")
        if (
            isinstance(maximum, str)
            and isinstance(minimum, str)
            and tuple(TLS_VERSIONS).index(maximum) < tuple(TLS_VERSIONS).index(minimum)
        ):
            error(f"'ssl-max-ver {maximum}' is below 'ssl-min-ver {minimum}'")
    else:
        tls_options = [
            option
            for option in ("crt", "ca_file", "ca_verify_file", "crl_file", "verify")
            if option in settings
        ]
        if tls_options:
            named = ", ".join(f"'{option.replace('_', '-')}'" for option in tls_options)
            warning(f"{named} ignored: this bind has no 'ssl', it accepts plain TCP")
    crt = settings.get("crt", ())
    assert isinstance(crt, tuple)
    settings["crt"] = tuple(_resolve_path(path, global_.crt_base, origin) for path in crt)
    for name in ("ca_file", "ca_verify_file", "crl_file"):
        value = settings.get(name)
        if isinstance(value, str):
            settings[name] = _resolve_path(value, global_.ca_base, origin)
    keys = settings.get("tls_ticket_keys")
    if isinstance(keys, str):
        settings["tls_ticket_keys"] = _resolve_path(keys, None, origin)
    return _replace(Bind(origin, "", "", 0), settings)


def _check_names(drafts: _Drafts, report: Report) -> None:
    frontends: dict[str, ProxyDraft] = {}
    backends: dict[str, ProxyDraft] = {}
    for draft in drafts.proxies:
        assert draft.name is not None
        tables = []
        if draft.kind in ("frontend", "listen"):
            tables.append(frontends)
        if draft.kind in ("backend", "listen"):
            tables.append(backends)
        for table in tables:
            other = table.get(draft.name)
            if other is not None and other is not draft:
                report.diagnostics.append(
                    Diagnostic.error(
                        draft.origin.file,
                        draft.origin.line,
                        draft.kind,
                        f"{draft.kind} '{draft.name}' has the same name as {other.kind} "
                        f"'{other.name}' declared at {other.origin}",
                        draft.label,
                    )
                )
                break
            table[draft.name] = draft


def _check_mode_http(drafts: _Drafts, report: Report) -> None:
    """`mode http` is HAProxy's price for its Prometheus exporter; lb accepts it on a frontend
    that does nothing else (no backend of its own: lb serves only /metrics there)."""
    for draft in drafts.proxies:
        origin = draft.mode_http
        if origin is None:
            continue
        own_default_backend = draft.default_backend is not None and (
            draft.default_backend[1].file == draft.origin.file
            and draft.default_backend[1].line > draft.origin.line
        )
        if draft.values.get("http_request_use_service") != "prometheus-exporter":
            why = "this frontend has no 'http-request use-service prometheus-exporter'"
        elif draft.use_backend or own_default_backend:
            why = "this frontend also forwards to a backend"
        else:
            continue
        report.diagnostics.append(
            Diagnostic.error(
                origin.file,
                origin.line,
                "mode",
                "'http' not supported: lb is a TCP balancer (use 'mode tcp'); "
                f"{MODE_HTTP_ONLY_FOR_PROMETHEUS} ({why})",
                draft.label,
            )
        )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _check_exporter_auth(
    drafts: _Drafts,
    frontends: Sequence[Frontend],
    userlists: Sequence[Userlist],
    report: Report,
) -> None:
    """The exporter's `http-request auth` names a userlist that exists (with a user), and an
    exporter reachable from the network has one: its page names every backend and server."""
    names = {userlist.name: userlist for userlist in userlists}
    origins = {draft.name: draft.http_request_auth for draft in drafts.proxies}
    for frontend in frontends:
        section = f"frontend {frontend.name}"
        auth = frontend.http_request_auth
        origin = origins.get(frontend.name)
        if auth is not None and origin is not None:
            userlist = auth[1]
            problem = None
            if frontend.http_request_use_service != "prometheus-exporter":
                problem = "'auth' applies to 'http-request use-service prometheus-exporter' only"
            elif userlist not in names:
                problem = (
                    f"unable to find userlist '{userlist}'{did_you_mean(userlist, tuple(names))}"
                )
            elif not names[userlist].users:
                problem = f"userlist '{userlist}' has no user"
            if problem is not None:
                report.diagnostics.append(
                    Diagnostic.error(origin.file, origin.line, "http-request", problem, section)
                )
            continue
        if frontend.http_request_use_service != "prometheus-exporter":
            continue
        for bind in frontend.binds:
            if _is_loopback(bind.host):
                continue
            report.diagnostics.append(
                Diagnostic.error(
                    bind.origin.file,
                    bind.origin.line,
                    "bind",
                    f"'{bind.address}' makes the Prometheus exporter reachable from the network "
                    "without authentication (its page names every backend and server): add "
                    "a 'userlist' section with 'user <name> password <crypt(3) hash>' and "
                    "'http-request auth realm <realm> unless { http_auth(<userlist>) }' to "
                    "this frontend, as for HAProxy, or bind it to 127.0.0.1",
                    section,
                )
            )


def _lint_checks(
    backend: Backend,
    warn: Callable[[Origin, str, str, str], None],
    notice: Callable[[Origin, str, str, str], None],
) -> None:
    """tcp-check rules that will not run (HAProxy's warning), and what `option mqtt-chk`
    (ours) does, with the HAProxy 2.6 rules that do the same."""
    section = f"backend {backend.name}"
    mqtt = backend.mqtt_check
    rules = backend.tcp_check_rules
    if rules and not backend.option.tcp_check:
        why = "'option mqtt-chk' replaces them" if mqtt else "'option tcp-check' is not set"
        warn(
            rules[0].origin,
            "tcp-check",
            f"backend '{backend.name}' uses tcp-check rules without 'option tcp-check', so the "
            f"rules are ignored ({why})",
            section,
        )
    if mqtt is not None:
        level = 5 if mqtt.version == "5.0" else 4
        example = encode_connect(level, mqtt.client_id or "lb-check", MQTT_CHECK_KEEPALIVE)
        notice(
            mqtt.origin,
            "option mqtt-chk",
            f"lb's own check (HAProxy 2.6 has no MQTT check): after the check's PROXY header "
            f"(check-send-proxy), an MQTT {mqtt.version} CONNECT (clean start, keep alive "
            f"{MQTT_CHECK_KEEPALIVE} s, client id '{mqtt.client_id or 'lb-check-<8 hex digits>'}'"
            "), a CONNACK that accepts, then DISCONNECT; a refusing CONNACK is 'Layer7 wrong "
            "status' with its code in words. With HAProxy: 'option tcp-check', 'tcp-check "
            f"send-binary {example.hex()}', 'tcp-check expect {connack_rule(level)}'",
            section,
        )


def _check_backend_references(drafts: _Drafts, names: set[str], report: Report) -> None:
    for draft in drafts.proxies:
        references: list[tuple[str, str, Origin]] = [
            ("use_backend", name, origin) for name, origin in draft.use_backend
        ]
        if draft.kind == "frontend" and draft.default_backend is not None:
            references.insert(0, ("default_backend", *draft.default_backend))
        for keyword, name, origin in references:
            if name not in names:
                report.diagnostics.append(
                    Diagnostic.error(
                        origin.file,
                        origin.line,
                        keyword,
                        f"unable to find required backend '{name}' for {draft.label}"
                        f"{did_you_mean(name, sorted(names))}",
                        draft.label,
                    )
                )


def _lint(
    global_: Global, frontends: list[Frontend], backends: list[Backend], report: Report
) -> None:
    """Warnings for configurations that are valid but probably not meant."""

    def warn(origin: Origin, keyword: str, message: str, section: str) -> None:
        report.diagnostics.append(
            Diagnostic.warning(origin.file, origin.line, keyword, message, section)
        )

    for frontend in frontends:
        section = f"frontend {frontend.name}"
        if (
            not frontend.listen
            and frontend.default_backend is None
            and not frontend.use_backend
            and frontend.http_request_use_service != "prometheus-exporter"
        ):
            warn(
                frontend.origin,
                "frontend",
                f"'{frontend.name}' has no 'default_backend': its connections will be closed",
                section,
            )
        if not frontend.binds and not frontend.listen:
            warn(frontend.origin, "frontend", f"'{frontend.name}' has no 'bind' line", section)
        for bind in frontend.binds:
            if bind.accept_proxy and not bind.accept_proxy_from:
                warn(
                    bind.origin,
                    "bind",
                    f"'accept-proxy' on {bind.address} takes the client address from any "
                    "sender's PROXY header, and the brokers trust what lb passes on; limit it "
                    "with 'accept-proxy-from <networks>' (or a firewall)",
                    section,
                )

    def notice(origin: Origin, keyword: str, message: str, section: str) -> None:
        report.diagnostics.append(
            Diagnostic.notice(origin.file, origin.line, keyword, message, section)
        )

    global_limit = global_.maxconn
    for backend in backends:
        signed = [s.name for s in backend.servers if "hmac" in s.proxy_v2_options]
        unsigned = [
            s.name for s in backend.servers if s.send_proxy_v2 and "hmac" not in s.proxy_v2_options
        ]
        if signed and unsigned:
            warn(
                backend.origin,
                "backend",
                f"'{backend.name}': servers {', '.join(signed)} get an HMAC in their PROXY "
                f"header and {', '.join(unsigned)} do not: a broker that holds the key refuses "
                "the latter, and one that does not trusts any header from a trusted address",
                f"backend {backend.name}",
            )
    maxconn_warned = False
    for backend in backends:
        section = f"backend {backend.name}"
        if not backend.servers:
            warn(backend.origin, "backend", f"'{backend.name}' has no server", section)
        _lint_checks(backend, warn, notice)
        for server in backend.servers:
            if server.send_proxy_v2 and "chain-subjects" in server.proxy_v2_options:
                notice(
                    server.origin,
                    "server",
                    f"'{server.name}': 'proxy-v2-options chain-subjects' (ours) sends the "
                    "subject names of each client's verified chain, so the header grows with "
                    "them (one 746-byte subject made a 1,070-byte header); a broker refuses a "
                    "header longer than its limit (proxy_protocol_max_size, "
                    f"{DEFAULT_MAX_HEADER_SIZE} bytes by default) and the device sees only a "
                    "close. lb logs every header it builds over 'proxy-v2-max-size' "
                    f"({server.proxy_v2_max_size} bytes here): keep the two equal",
                    section,
                )
            if (
                server.check
                and (server.send_proxy or server.send_proxy_v2)
                and (server.check_port is not None or server.check_addr is not None)
                and not server.check_send_proxy
            ):
                warn(
                    server.origin,
                    "server",
                    f"'{server.name}' sends a PROXY header but its checks go to a "
                    "'port'/'addr' override without one; add 'check-send-proxy' if the "
                    "server requires the header",
                    section,
                )
            if (
                not maxconn_warned
                and server.maxconn is not None
                and global_limit is not None
                and global_limit <= _DEFAULT_GLOBAL_MAXCONN
                and server.maxconn > global_limit
            ):
                maxconn_warned = True
                warn(
                    server.origin,
                    "server",
                    f"'{server.name}' allows maxconn {server.maxconn} but global maxconn is "
                    f"{global_limit}: the whole balancer accepts no more than that; raise "
                    "'maxconn' in 'global' (or leave it out: then it is what the file limit "
                    "allows)",
                    section,
                )
