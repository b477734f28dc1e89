"""The frozen configuration model produced by `lb.config.load_config`.

Owns the shape of a parsed configuration: frozen, slotted dataclasses whose
field names are HAProxy's keyword words with '-' turned into '_' (`inter`,
`send_proxy_v2`, `ca_verify_file`). Every object keeps its `origin`
(file:line). The model holds no runtime state and does no I/O.

Units, everywhere in the model:
- times are float **seconds** (`inter=10.0` for `inter 10s`); the config
  language's default unit for times is milliseconds, as in HAProxy;
- sizes are int **bytes** (`tune.bufsize 16k` -> 16384);
- file paths (crt, ca-file, ca-verify-file, crl-file, tls-ticket-keys) are
  absolute: a relative path is joined to crt-base/ca-base when set, else to
  the directory of the configuration file that names it. (HAProxy resolves
  relative paths against its working directory; we do not, so that
  configs/haproxy.cfg works from any directory.)

A `listen` section becomes a `Frontend` and a `Backend` with the same name;
the frontend's `default_backend` is that backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lb.config.errors import Origin
from lb.proxyproto import DEFAULT_MAX_HEADER_SIZE
from lb.tls_codes import TlsVersion

NOWHERE = Origin("<builtin>", 0)

Mode = Literal["tcp"]
Verify = Literal["none", "optional", "required"]
IgnoreErrors = frozenset[int] | Literal["all"]


@dataclass(frozen=True, slots=True)
class LogTarget:
    """One `log <target> [len N] [format F] <facility> [level [minlevel]]` line.

    `kind` is "stdout", "stderr", "unix" (address is a path), "udp" (host and
    port) or "fd" (address is the descriptor number).
    """

    origin: Origin
    target: str
    kind: Literal["stdout", "stderr", "unix", "udp", "fd"]
    address: str
    port: int | None
    facility: str
    format: str = "rfc3164"
    length: int = 1024
    level: str | None = None
    minlevel: str | None = None


@dataclass(frozen=True, slots=True)
class StatsSocket:
    """`stats socket <path> [mode <octal>] [level user|operator|admin]`."""

    origin: Origin
    path: str
    mode: int | None = None
    level: Literal["user", "operator", "admin"] = "operator"


@dataclass(frozen=True, slots=True)
class Global:
    """The `global` section (HAProxy defaults where one exists)."""

    origin: Origin = NOWHERE
    maxconn: int | None = None  # None: what the file limit allows (lb.limits)
    maxconn_origin: Origin | None = None  # where `maxconn` was set, for lb.limits' words
    nbthread: int | None = None  # None: one per CPU
    # Accepts per second over all workers (None: no limit); maxsslrate: the SSL binds'
    maxconnrate: int | None = None
    maxsessrate: int | None = None
    maxsslrate: int | None = None
    strict_limits: bool = True  # HAProxy 2.6: refuse to start when maxconn cannot be met
    fd_hard_limit: int | None = None  # at most this many files per process
    daemon: bool = False
    log: tuple[LogTarget, ...] = ()
    stats_socket: tuple[StatsSocket, ...] = ()
    pidfile: str | None = None
    hard_stop_after: float | None = None
    tune_bufsize: int = 16384
    tune_ssl_cachesize: int = 20000
    tune_ssl_lifetime: float = 300.0
    # our own: how often crt/ca-file/crl-file are checked for changes (EMQX: 120 s); 0 = never
    tune_ssl_reload_interval: float = 120.0
    ssl_default_bind_options: tuple[str, ...] = ()
    ssl_default_bind_ciphers: str | None = None
    ssl_default_bind_ciphersuites: str | None = None
    ssl_default_server_options: tuple[str, ...] = ()
    ca_base: str | None = None
    crt_base: str | None = None
    user: str | None = None
    group: str | None = None
    pp2_never_send_local: bool = False


@dataclass(frozen=True, slots=True)
class Timeouts:
    """`timeout <name> <time>`; None when unset (HAProxy: no timeout)."""

    connect: float | None = None
    client: float | None = None
    server: float | None = None
    check: float | None = None
    queue: float | None = None
    tunnel: float | None = None
    client_fin: float | None = None
    server_fin: float | None = None


@dataclass(frozen=True, slots=True)
class Options:
    """`option <name>` flags."""

    tcplog: bool = False
    dontlognull: bool = False
    redispatch: bool = False
    redispatch_interval: int = -1  # HAProxy: -1 = redispatch on the last retry
    allbackups: bool = False
    log_health_checks: bool = False
    tcp_check: bool = False  # `option tcp-check`: the backend's tcp-check rules run


@dataclass(frozen=True, slots=True)
class Logging:
    """`log global`, `log ...` lines and `log-format` of one proxy."""

    global_: bool = False
    targets: tuple[LogTarget, ...] = ()
    format: str | None = None  # log-format


@dataclass(frozen=True, slots=True)
class Bind:
    """One `bind <address> [options...]` line of a frontend or listen."""

    origin: Origin
    address: str  # as written, e.g. "*:8091"
    host: str  # "0.0.0.0" for "*" or an empty host, "::" for "[::]"
    port: int
    family: Literal["ipv4", "ipv6"] = "ipv4"
    ssl: bool = False
    crt: tuple[str, ...] = ()
    ca_file: str | None = None
    ca_verify_file: str | None = None
    verify: Verify = "none"
    verify_depth: int | None = None  # our own keyword; None = OpenSSL's default
    crl_file: str | None = None
    ca_ignore_err: IgnoreErrors = frozenset()
    crt_ignore_err: IgnoreErrors = frozenset()
    ssl_min_ver: TlsVersion = "TLSv1.2"
    ssl_max_ver: TlsVersion | None = None
    ciphers: str | None = None
    ciphersuites: str | None = None
    alpn: tuple[str, ...] = ()
    name: str | None = None
    accept_proxy: bool = False
    # Our own: the networks allowed to send the PROXY header (empty: anyone, as HAProxy).
    accept_proxy_from: tuple[str, ...] = ()
    maxconn: int | None = None
    close_revoked: bool = False  # our own: drop live sessions whose cert a CRL reload revokes
    strict_sni: bool = False
    tls_ticket_keys: str | None = None
    no_tls_tickets: bool = False
    no_sslv3: bool = False
    no_tlsv10: bool = False
    no_tlsv11: bool = False
    no_tlsv12: bool = False
    no_tlsv13: bool = False


PROXY_V2_OPTIONS = (
    "ssl",
    "cert-cn",
    "ssl-cipher",
    "cert-sig",
    "cert-key",
    "authority",
    "crc32c",
    "unique-id",
    "chain-subjects",  # our own: subjects of the verified client chain
    "hmac",  # our own: an HMAC-SHA256 of the header (keys: proxy-v2-hmac-keys)
)


@dataclass(frozen=True, slots=True)
class Server:
    """One `server <name> <address> [options...]` line, default-server applied.

    The `port` and `addr` options (health-check overrides) are stored as
    `check_port` and `check_addr`, since `port` is the service port of the
    address. `send-proxy-v2-ssl` and `send-proxy-v2-ssl-cn` are stored as
    `send_proxy_v2=True` plus "ssl" (and "cert-cn") in `proxy_v2_options`.
    """

    origin: Origin
    name: str
    address: str  # as written, e.g. "10.0.1.165:1883"
    host: str  # a name or an IP; resolved at start, not at parse time
    port: int | None  # None: same port as the client connected to
    check: bool = False
    check_send_proxy: bool = False
    send_proxy: bool = False
    send_proxy_v2: bool = False
    proxy_v2_options: frozenset[str] = frozenset()
    # Our own: a v2 header built longer than this (bytes, all of it) is logged and counted.
    proxy_v2_max_size: int = DEFAULT_MAX_HEADER_SIZE
    # Our own: the key file of `proxy-v2-options hmac` (lb.proxy_hmac), an absolute path.
    proxy_v2_hmac_keys: str | None = None
    inter: float = 2.0
    fastinter: float | None = None  # None: inter
    downinter: float | None = None  # None: inter
    rise: int = 2
    fall: int = 3
    slowstart: float = 0.0
    maxconn: int | None = None  # None: unlimited
    maxqueue: int = 0  # 0: unlimited
    minconn: int | None = None
    weight: int = 1
    backup: bool = False
    disabled: bool = False
    check_port: int | None = None  # the `port` option: health-check port override
    check_addr: str | None = None  # the `addr` option: health-check address override
    on_marked_down: Literal["shutdown-sessions"] | None = None
    on_marked_up: Literal["shutdown-backup-sessions"] | None = None


TcpCheckAction = Literal["connect", "send", "expect", "comment"]
TcpCheckMatch = Literal["string", "binary", "rstring", "rbinary"]


@dataclass(frozen=True, slots=True)
class TcpCheckRule:
    """One `tcp-check` line (configuration.txt 4.2, HAProxy 2.6): `connect`, `send` and
    `send-binary` (both as `send`, the bytes in `data`), `expect`, `comment`. `index` is
    its place among the section's tcp-check lines, comments included: HAProxy names a
    step "step index + 1" in its messages."""

    origin: Origin
    action: TcpCheckAction
    index: int
    comment: str | None = None
    # connect
    port: int | None = None
    addr: str | None = None
    send_proxy: bool = False
    default: bool = False  # `default`: the server's check options (check-send-proxy)
    # send / send-binary
    data: bytes = b""
    # expect
    match: TcpCheckMatch | None = None
    pattern: bytes = b""  # the string or the bytes (binary), or the regex source (r*)
    inverse: bool = False  # `!`
    min_recv: int = -1  # -1: wait for more while there is no match


@dataclass(frozen=True, slots=True)
class MqttCheck:
    """`option mqtt-chk [3.1.1|5.0] [client-id <id>]`, our own: a real MQTT CONNECT after
    the check's PROXY header, a CONNACK that accepts, then DISCONNECT (lb.tcpcheck)."""

    origin: Origin
    version: Literal["3.1.1", "5.0"] = "3.1.1"
    client_id: str | None = None  # None: "lb-check-" and 8 random hex digits per process


@dataclass(frozen=True, slots=True)
class Defaults:
    """A `defaults [name]` section as written (after its own inheritance)."""

    origin: Origin
    name: str | None
    mode: Mode = "tcp"
    timeout: Timeouts = Timeouts()
    option: Options = Options()
    log: Logging = Logging()
    retries: int = 3
    maxconn: int | None = None
    rate_limit_sessions: int | None = None  # `rate-limit sessions <rate>` (per second)
    balance: str = "roundrobin"
    hash_expr: str | None = None  # `balance hash <expr>`: "src" or "ssl_c_s_dn(cn)"
    hash_type: str = "map-based"
    hash_function: str = "sdbm"  # `hash-type <method> <function>`
    hash_avalanche: bool = False  # `hash-type <method> <function> avalanche`
    fullconn: int | None = None
    default_backend: str | None = None


@dataclass(frozen=True, slots=True)
class Frontend:
    """A `frontend` (or the front half of a `listen`)."""

    origin: Origin
    name: str
    binds: tuple[Bind, ...] = ()
    mode: Mode = "tcp"
    timeout: Timeouts = Timeouts()
    option: Options = Options()
    log: Logging = Logging()
    maxconn: int | None = None
    rate_limit_sessions: int | None = None  # `rate-limit sessions <rate>` (per second)
    default_backend: str | None = None  # checked: names a Backend of the Config
    use_backend: tuple[str, ...] = ()  # unconditional only, checked like default_backend
    stats_enable: bool = False
    http_request_use_service: str | None = None  # "prometheus-exporter"
    # `http-request auth [realm R] unless { http_auth(L) }`: (realm, userlist name).
    http_request_auth: tuple[str, str] | None = None
    listen: bool = False
    # `unique-id-format`; None: lb makes a random 128-bit id (HAProxy leaves %ID empty)
    unique_id_format: str | None = None


@dataclass(frozen=True, slots=True)
class Backend:
    """A `backend` (or the back half of a `listen`)."""

    origin: Origin
    name: str
    servers: tuple[Server, ...] = ()
    mode: Mode = "tcp"
    timeout: Timeouts = Timeouts()
    option: Options = Options()
    log: Logging = Logging()
    balance: str = "roundrobin"
    hash_expr: str | None = None  # `balance hash <expr>`: "src" or "ssl_c_s_dn(cn)"
    hash_type: str = "map-based"
    hash_function: str = "sdbm"  # `hash-type <method> <function>`
    hash_avalanche: bool = False  # `hash-type <method> <function> avalanche`
    retries: int = 3
    fullconn: int | None = None
    listen: bool = False
    tcp_check_rules: tuple[TcpCheckRule, ...] = ()
    mqtt_check: MqttCheck | None = None


@dataclass(frozen=True, slots=True)
class User:
    """A `user` line of a `userlist`: a crypt(3) hash (`password`) or, with
    `insecure-password`, the password itself."""

    name: str
    password: str
    insecure: bool = False


@dataclass(frozen=True, slots=True)
class Userlist:
    """A `userlist` section (HAProxy's users for `http_auth`, configuration.txt 3.4)."""

    origin: Origin
    name: str
    users: tuple[User, ...] = ()

    def user(self, name: str) -> User | None:
        return next((user for user in self.users if user.name == name), None)


@dataclass(frozen=True, slots=True)
class Config:
    """A whole configuration: one or more files, parsed and checked."""

    global_: Global
    defaults: tuple[Defaults, ...]
    frontends: tuple[Frontend, ...]
    backends: tuple[Backend, ...]
    files: tuple[str, ...] = ()
    userlists: tuple[Userlist, ...] = ()

    def userlist(self, name: str) -> Userlist:
        for userlist in self.userlists:
            if userlist.name == name:
                return userlist
        raise KeyError(name)

    def backend(self, name: str) -> Backend:
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise KeyError(name)

    def frontend(self, name: str) -> Frontend:
        for frontend in self.frontends:
            if frontend.name == name:
                return frontend
        raise KeyError(name)
