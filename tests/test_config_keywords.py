"""Every keyword: what it stores, its defaults, inheritance, and its errors."""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.config import LoadResult, keywords, load_config_text
from lb.config.errors import Origin
from lb.config.keywords import (
    BIND_OPTIONS,
    GLOBAL_KEYWORDS,
    PROXY_KEYWORDS,
    SERVER_OPTIONS,
    OptionSpec,
)
from lb.config.model import Backend, Bind, Config, Frontend, Server, User

FILE = "/cfg/t.cfg"
TAIL = """
frontend fe
    bind 127.0.0.1:8091
    default_backend be

backend be
    server s1 127.0.0.1:1883
"""


BACKEND = "\nbackend be\n    server s1 127.0.0.1:1883\n"
FRONTEND_END = "    default_backend be\n" + BACKEND


def load(text: str, environ: dict[str, str] | None = None) -> LoadResult:
    return load_config_text(textwrap.dedent(text), FILE, environ=environ)


def valid(text: str) -> Config:
    result = load(text)
    assert [d.text for d in result.errors] == []
    assert result.config is not None
    return result.config


def errors(text: str) -> list[str]:
    result = load(text)
    assert result.config is None
    return [d.text for d in result.errors]


def warnings(text: str) -> list[str]:
    return [d.text for d in load(text).warnings]


def server(options: str, prefix: str = "") -> Server:
    config = valid(
        prefix
        + f"""
frontend fe
    bind :1
    default_backend be
backend be
    server s1 127.0.0.1:1883 {options}
"""
    )
    return config.backend("be").servers[0]


def bind(options: str, prefix: str = "") -> Bind:
    config = valid(prefix + f"\nfrontend fe\n    bind :8091 {options}\n" + FRONTEND_END)
    return config.frontend("fe").binds[0]


# --------------------------------------------------------------------------- global


def test_global_defaults() -> None:
    config = valid(TAIL)
    global_ = config.global_
    assert global_.maxconn is None
    assert global_.nbthread is None
    assert global_.tune_bufsize == 16384
    assert global_.tune_ssl_cachesize == 20000
    assert global_.tune_ssl_lifetime == 300.0
    assert global_.log == ()


def test_global_keywords() -> None:
    config = valid(
        """
        global
            maxconn 100000
            nbthread 4
            daemon
            log stdout format raw local0
            log 127.0.0.1:5514 len 2048 format rfc5424 local1 info notice
            log /dev/log daemon
            log stderr local2 err
            stats socket /run/lb.sock mode 600 level admin
            pidfile /run/lb.pid
            hard-stop-after 30s
            tune.bufsize 32k
            tune.ssl.cachesize 1000
            tune.ssl.lifetime 600
            ssl-default-bind-options ssl-min-ver TLSv1.3 no-tls-tickets
            ssl-default-bind-ciphers ECDHE+AESGCM
            ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256
            ssl-default-server-options no-tlsv10
            ca-base /etc/ssl/ca
            crt-base /etc/ssl/crt
            pp2-never-send-local
        """
        + TAIL
    )
    global_ = config.global_
    assert global_.origin == Origin(FILE, 2)
    assert global_.maxconn == 100000
    assert global_.nbthread == 4
    assert global_.daemon is True
    stdout, udp, unix, stderr = global_.log
    assert (stdout.kind, stdout.format, stdout.facility, stdout.level) == (
        "stdout",
        "raw",
        "local0",
        None,
    )
    assert (udp.kind, udp.address, udp.port, udp.length, udp.format) == (
        "udp",
        "127.0.0.1",
        5514,
        2048,
        "rfc5424",
    )
    assert (udp.facility, udp.level, udp.minlevel) == ("local1", "info", "notice")
    assert (unix.kind, unix.address, unix.facility) == ("unix", "/dev/log", "daemon")
    assert (stderr.kind, stderr.level) == ("stderr", "err")
    (socket,) = global_.stats_socket
    assert (socket.path, socket.mode, socket.level) == ("/run/lb.sock", 0o600, "admin")
    assert global_.pidfile == "/run/lb.pid"
    assert global_.hard_stop_after == 30.0
    assert global_.tune_bufsize == 32768
    assert global_.tune_ssl_cachesize == 1000
    assert global_.tune_ssl_lifetime == 600.0  # seconds by default
    assert global_.ssl_default_bind_options == ("ssl-min-ver", "TLSv1.3", "no-tls-tickets")
    assert global_.ssl_default_bind_ciphers == "ECDHE+AESGCM"
    assert global_.ssl_default_bind_ciphersuites == "TLS_AES_128_GCM_SHA256"
    assert global_.ssl_default_server_options == ("no-tlsv10",)
    assert (global_.ca_base, global_.crt_base) == ("/etc/ssl/ca", "/etc/ssl/crt")
    assert global_.pp2_never_send_local is True


def test_syslog_default_port() -> None:
    config = valid("global\n    log 10.0.0.1 local0\n" + TAIL)
    assert config.global_.log[0].port == 514


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("maxconn lots", "'maxconn' : expects an integer >= 1, got 'lots'"),
        ("maxconn", "'maxconn' : expects an integer"),
        ("nbthread 0", "'nbthread' : expects an integer from 1 to 4096, got '0'"),
        ("daemon now", "'daemon' : expects no argument"),
        ("log stdout local9", "'log' : expects one of"),
        ("log stdout format json local0", "'log' : expects one of 'raw'"),
        ("log stdout", "'log' : missing facility"),
        ("log global", "'log' : 'log global' is only valid in a proxy section"),
        ("stats socket /s mode rw", "'mode' expects an octal mode like 600, got 'rw'"),
        (
            "stats socket /s levl admin",
            "'stats socket' : unknown option 'levl'; did you mean 'level'?",
        ),
        ("stats timeout 10s", "'stats' : unknown or unsupported 'stats timeout'"),
        ("tune.bufsize 16kb", "'tune.bufsize' : expects a size like 16384, 16k, 1m, got '16kb'"),
        ("hard-stop-after soon", "'hard-stop-after' : expects a time like 10s, 500ms"),
        ("ssl-default-bind-options ssl-min-ver TLSv1.4", "got 'TLSv1.4'; did you mean 'TLSv1.3'?"),
        ("ssl-default-bind-options no-tls-tikets", "did you mean 'no-tls-tickets'?"),
        ("chroot /var/empty", "'chroot' : not supported: lb does not chroot"),
        ("nbproc 2", "'nbproc' : not supported"),
        ("global extra", "'global' : takes no argument"),
    ],
)
def test_global_errors(line: str, message: str) -> None:
    (text,) = errors(f"global\n    {line}\n" + TAIL)
    assert text.startswith("parsing [/cfg/t.cfg:2] : ")
    assert message in text


def test_user_and_group_are_ignored_with_a_warning() -> None:
    result = load("global\n    user haproxy\n    group haproxy\n" + TAIL)
    assert result.config is not None
    assert result.config.global_.user == "haproxy"
    assert [d.text for d in result.warnings] == [
        "parsing [/cfg/t.cfg:2] : 'user' : ignored: lb does not switch user; "
        "start it as the wanted user",
        "parsing [/cfg/t.cfg:3] : 'group' : ignored: lb does not switch group; "
        "start it as the wanted group",
    ]


# --------------------------------------------------------------------------- proxies


def test_proxy_keywords_and_defaults_inheritance() -> None:
    config = valid(
        """
        defaults
            mode tcp
            log global
            option tcplog
            option dontlognull
            option redispatch 2
            option allbackups
            option log-health-checks
            log-format "%ci:%cp %ft %b/%s"
            timeout connect 5s
            timeout client 1m
            timeout server 1m
            timeout check 2s
            timeout queue 3s
            timeout tunnel 1h
            timeout client-fin 1s
            timeout server-fin 1s
            retries 5
            maxconn 3000
            balance leastconn
            hash-type consistent
            fullconn 1000
            default_backend be
            default-server inter 3s

        frontend fe
            bind :8091
            timeout client 30s
            no option dontlognull

        backend be
            balance first
            server s1 127.0.0.1:1883
        """
    )
    (defaults,) = config.defaults
    assert defaults.name is None
    assert defaults.retries == 5
    assert defaults.default_backend == "be"
    frontend = config.frontend("fe")
    backend = config.backend("be")
    assert frontend.default_backend == "be"  # inherited
    assert frontend.maxconn == 3000
    assert frontend.log.global_ is True
    assert frontend.log.format == "%ci:%cp %ft %b/%s"
    assert frontend.timeout.client == 30.0  # overridden
    assert frontend.timeout.connect == 5.0
    assert frontend.option.tcplog is True
    assert frontend.option.dontlognull is False  # `no option`
    assert backend.option.dontlognull is True
    assert backend.option.redispatch is True
    assert backend.option.redispatch_interval == 2
    assert backend.option.allbackups is True
    assert backend.option.log_health_checks is True
    assert backend.timeout == frontend.timeout.__class__(
        connect=5.0,
        client=60.0,
        server=60.0,
        check=2.0,
        queue=3.0,
        tunnel=3600.0,
        client_fin=1.0,
        server_fin=1.0,
    )
    assert backend.retries == 5
    assert backend.balance == "first"
    assert backend.hash_type == "consistent"
    assert backend.fullconn == 1000
    assert backend.servers[0].inter == 3.0  # default-server from defaults


def test_proxy_defaults() -> None:
    config = valid(TAIL)
    frontend, backend = config.frontend("fe"), config.backend("be")
    assert isinstance(frontend, Frontend) and isinstance(backend, Backend)
    assert frontend.mode == backend.mode == "tcp"
    assert backend.balance == "roundrobin"
    assert backend.retries == 3
    assert backend.timeout.connect is None
    assert frontend.log.global_ is False
    assert backend.option.redispatch_interval == -1


def test_the_last_defaults_section_applies_and_named_defaults_with_from() -> None:
    config = valid(
        """
        defaults base
            timeout connect 1s
        defaults
            timeout connect 2s
        frontend fe
            bind :1
            default_backend be
        backend be from base
            server s1 127.0.0.1:1
        backend other
            server s1 127.0.0.1:1
        """
    )
    assert config.backend("be").timeout.connect == 1.0
    assert config.backend("other").timeout.connect == 2.0
    assert [d.name for d in config.defaults] == ["base", None]


def test_unknown_from_defaults() -> None:
    (text,) = errors("backend be from nope\n    server s1 127.0.0.1:1\n")
    assert text == "parsing [/cfg/t.cfg:1] : 'backend' : unable to find defaults section 'nope'"


def test_listen_becomes_frontend_and_backend() -> None:
    config = valid(
        """
        listen mqtt
            bind 127.0.0.1:1883
            balance static-rr
            server s1 127.0.0.1:1884
        """
    )
    frontend, backend = config.frontend("mqtt"), config.backend("mqtt")
    assert frontend.listen and backend.listen
    assert frontend.default_backend == "mqtt"
    assert backend.balance == "static-rr"
    assert frontend.binds[0].port == 1883


def test_use_backend_and_prometheus_and_stats() -> None:
    config = valid(
        """
        frontend fe
            bind 127.0.0.1:1
            use_backend be
            stats enable
            http-request use-service prometheus-exporter if { path /metrics }
        backend be
            server s1 127.0.0.1:1
        """
    )
    frontend = config.frontend("fe")
    assert frontend.use_backend == ("be",)
    assert frontend.stats_enable is True
    assert frontend.http_request_use_service == "prometheus-exporter"


EXPORTER = """
frontend prometheus
    bind {bind}
    mode http
    {auth}
    http-request use-service prometheus-exporter
"""


def test_exporter_off_loopback_needs_http_request_auth() -> None:
    """HAProxy's way to protect its exporter: a userlist and basic auth. lb refuses an
    exporter reachable from the network without it (its page names every server)."""
    [problem] = errors(EXPORTER.format(bind=":8405", auth=""))
    assert problem.startswith(
        "parsing [/cfg/t.cfg:3] : 'bind' : ':8405' makes the Prometheus exporter reachable "
        "from the network without authentication"
    )
    assert "'http-request auth realm <realm> unless { http_auth(<userlist>) }'" in problem
    config = valid(
        "userlist metrics\n"
        "    user prometheus password $6$salt$"
        + "x" * 86
        + "\n    user probe insecure-password s3cret\n"
        + EXPORTER.format(
            bind="0.0.0.0:8405",
            auth="http-request auth realm metrics unless { http_auth(metrics) }",
        )
    )
    assert config.frontend("prometheus").http_request_auth == ("metrics", "metrics")
    userlist = config.userlist("metrics")
    assert [user.name for user in userlist.users] == ["prometheus", "probe"]
    assert userlist.user("probe") == User("probe", "s3cret", insecure=True)
    negated = valid(
        "userlist u\n    user a insecure-password b\n"
        + EXPORTER.format(bind=":8405", auth="http-request auth if !{ http_auth(u) }")
    )
    assert negated.frontend("prometheus").http_request_auth == ("prometheus", "u")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            EXPORTER.format(bind=":1", auth="http-request auth unless { http_auth(nobody) }"),
            "'http-request' : unable to find userlist 'nobody'",
        ),
        (
            EXPORTER.format(bind=":1", auth="http-request auth realm x if { path /metrics }"),
            "'http-request' : not supported: condition 'if { path /metrics }'",
        ),
        (
            "userlist u\n    user a password plain\n"
            + EXPORTER.format(bind=":1", auth="http-request auth unless { http_auth(u) }"),
            "'user' : user 'a': 'plain...' is not a crypt(3) hash",
        ),
        (
            "userlist u\n    group admins\n",
            "'group' : not supported: groups",
        ),
        (
            "frontend fe\n    bind :1\n    http-request auth unless { http_auth(u) }\n"
            "    default_backend be\nbackend be\n    server s 127.0.0.1:1\n"
            "userlist u\n    user a insecure-password b\n",
            "'http-request' : 'auth' applies to 'http-request use-service prometheus-exporter'",
        ),
    ],
)
def test_http_request_auth_errors(text: str, message: str) -> None:
    assert any(message in problem for problem in errors(text)), errors(text)


def test_no_log_drops_inherited_logging() -> None:
    config = valid(
        "defaults\n    log global\n"
        + TAIL.replace("default_backend be", "no log\n    default_backend be")
    )
    assert config.frontend("fe").log.global_ is False
    assert config.backend("be").log.global_ is True


@pytest.mark.parametrize(
    ("section", "line", "message"),
    [
        (
            "defaults",
            "mode http",
            "'mode' : 'http' not supported: lb is a TCP balancer (use 'mode tcp')",
        ),
        ("defaults", "mode udp", "'mode' : expects one of 'tcp', got 'udp'"),
        ("defaults", "option httplog", "'option httplog' : not supported: HTTP logs"),
        (
            "defaults",
            "option tcplg",
            "'option' : unknown option 'tcplg' in 'defaults' section; did you mean 'tcplog'?",
        ),
        ("defaults", "option tcplog now", "'option tcplog' : takes no argument"),
        (
            "defaults",
            "option redispatch soon",
            "'option redispatch' : expects an integer, got 'soon'",
        ),
        (
            "defaults",
            "timeout conect 5s",
            "'timeout' : unknown timeout 'conect'; did you mean 'connect'?",
        ),
        ("defaults", "timeout connect", "'timeout connect' : expects a time like 10s, 500ms"),
        ("defaults", "timeout http-request 5s", "'timeout http-request' : not supported"),
        ("defaults", "retries many", "'retries' : expects an integer >= 0, got 'many'"),
        ("defaults", "balance roundrobinn", "did you mean 'roundrobin'?"),
        (
            "defaults",
            "balance uri",
            "'balance' : unknown or unsupported algorithm 'uri'; lb supports 'roundrobin', "
            "'static-rr', 'leastconn', 'source', 'first'",
        ),
        ("defaults", "balance source extra", "'balance' : 'source' takes no argument"),
        (
            "defaults",
            "hash-type sometimes",
            "'hash-type' : expects one of 'map-based', 'consistent'",
        ),
        (
            "defaults",
            "log-format a b",
            "'log-format' : expects one format string (quote it if it has spaces)",
        ),
        ("defaults", "no way", "'no' : expects 'no option <name>' or 'no log'"),
        ("defaults", "use_backend be", "'use_backend' : not allowed in 'defaults' section"),
        ("defaults", "bind :1", "'bind' : not allowed in 'defaults' section"),
        ("defaults", "acl is_local src 127.0.0.1", "'acl' : not supported: ACLs"),
        ("defaults", "stats uri /stats", "'stats' : not supported: 'stats uri'"),
        (
            "frontend f2",
            "use_backend be if { src 10.0.0.0/8 }",
            "'use_backend' : ACL conditions not supported",
        ),
        (
            "frontend f2",
            "http-request deny",
            "'http-request' : not supported: lb is a TCP balancer",
        ),
        ("frontend f2", "tcp-request connection reject", "'tcp-request' : not supported"),
        (
            "frontend f2",
            "defualt_backend be",
            "unknown keyword 'defualt_backend' in 'frontend f2' section; "
            "did you mean 'default_backend'?",
        ),
    ],
)
def test_proxy_errors(section: str, line: str, message: str) -> None:
    texts = errors(f"{section}\n    {line}\n" + TAIL)
    assert len(texts) == 1, texts
    assert texts[0].startswith("parsing [/cfg/t.cfg:2] : ")
    assert message in texts[0]


def test_keywords_for_the_other_side_are_ignored_with_a_warning_as_haproxy() -> None:
    result = load(
        TAIL
        + "frontend f2\n    bind :2\n    balance roundrobin\n    retries 3\n"
        + "    server x 127.0.0.1:1\n    default-server inter 1s\n    default_backend be\n"
        + "backend b2\n    bind :3\n    maxconn 5\n    server s 127.0.0.1:1\n"
    )
    assert [(d.line, d.severity.value, d.keyword, d.message) for d in result.diagnostics] == [
        (10, "WARNING", "balance", "ignored because frontend 'f2' has no backend capability"),
        (11, "WARNING", "retries", "ignored because frontend 'f2' has no backend capability"),
        (12, "ALERT", "server", "not allowed because frontend 'f2' has no backend capability"),
        (
            13,
            "ALERT",
            "default-server",
            "not allowed because frontend 'f2' has no backend capability",
        ),
        (16, "WARNING", "bind", "ignored because backend 'b2' has no frontend capability"),
        (17, "WARNING", "maxconn", "ignored because backend 'b2' has no frontend capability"),
    ]


def test_unknown_default_backend_names_the_line() -> None:
    texts = errors(TAIL.replace("default_backend be", "default_backend bee"))
    assert texts == [
        "parsing [/cfg/t.cfg:4] : 'default_backend' : unable to find required backend 'bee' "
        "for frontend fe; did you mean 'be'?"
    ]


def test_unknown_use_backend() -> None:
    texts = errors(TAIL + "frontend f2\n    bind :2\n    use_backend zzz\n")
    assert texts == [
        "parsing [/cfg/t.cfg:10] : 'use_backend' : unable to find required backend 'zzz' "
        "for frontend f2"
    ]


def test_duplicate_names() -> None:
    texts = errors(TAIL + "backend be\n    server s1 127.0.0.1:1\n    server s1 127.0.0.1:2\n")
    assert texts == [
        "parsing [/cfg/t.cfg:8] : 'backend' : backend 'be' has the same name as backend 'be' "
        "declared at /cfg/t.cfg:6",
        "parsing [/cfg/t.cfg:10] : 'server' : 'backend be' has two servers named 's1' "
        "(the other is at /cfg/t.cfg:9)",
    ]


def test_frontend_and_backend_may_share_a_name() -> None:
    config = valid("frontend be\n    bind :1\n    default_backend be\n" + BACKEND)
    assert config.frontend("be").default_backend == "be"


def test_bad_proxy_name() -> None:
    assert (
        "character '/' is not permitted in backend name 'a/b'"
        in errors(TAIL + "backend a/b\n    server s 127.0.0.1:1\n")[0]
    )


def test_sections_out_of_place() -> None:
    assert errors("maxconn 10\n" + TAIL) == [
        "parsing [/cfg/t.cfg:1] : unknown keyword 'maxconn' out of section"
    ]
    assert errors("resolvers dns\n    nameserver ns1 1.1.1.1:53\n" + TAIL) == [
        "parsing [/cfg/t.cfg:1] : section 'resolvers' is not supported by lb"
    ]


# --------------------------------------------------------------------------- bind


def test_bind_defaults() -> None:
    result = bind("")
    assert (result.host, result.port, result.family) == ("0.0.0.0", 8091, "ipv4")
    assert result.ssl is False
    assert result.verify == "none"
    assert result.ssl_min_ver == "TLSv1.2"
    assert result.origin == Origin(FILE, 3)


def test_bind_options() -> None:
    result = bind(
        "ssl crt a.pem crt /abs/b.pem ca-file ca.pem ca-verify-file root.pem verify optional "
        "verify-depth 3 crl-file crl.pem ca-ignore-err all crt-ignore-err 10,23 "
        "ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3 ciphers HIGH ciphersuites TLS_AES_256_GCM_SHA384 "
        "alpn mqtt,x-amzn-mqtt-ca name tls accept-proxy maxconn 500 close-revoked strict-sni "
        "tls-ticket-keys keys.txt no-tls-tickets no-tlsv13 no-sslv3 no-tlsv10 no-tlsv11 no-tlsv12"
    )
    assert result.ssl is True
    assert result.crt == ("/cfg/a.pem", "/abs/b.pem")
    assert result.ca_file == "/cfg/ca.pem"
    assert result.ca_verify_file == "/cfg/root.pem"
    assert result.verify == "optional"
    assert result.verify_depth == 3
    assert result.crl_file == "/cfg/crl.pem"
    assert result.ca_ignore_err == "all"
    assert result.crt_ignore_err == frozenset({10, 23})
    assert (result.ssl_min_ver, result.ssl_max_ver) == ("TLSv1.3", "TLSv1.3")
    assert (result.ciphers, result.ciphersuites) == ("HIGH", "TLS_AES_256_GCM_SHA384")
    assert result.alpn == ("mqtt", "x-amzn-mqtt-ca")
    assert result.name == "tls"
    assert result.accept_proxy and result.close_revoked and result.strict_sni
    assert result.maxconn == 500
    assert result.tls_ticket_keys == "/cfg/keys.txt"
    assert result.no_tls_tickets and result.no_tlsv13 and result.no_sslv3
    assert result.no_tlsv10 and result.no_tlsv11 and result.no_tlsv12


def test_bind_ipv6() -> None:
    result = bind("").__class__  # keep the import used
    assert result is Bind
    config = valid("frontend fe\n    bind [::1]:8091\n    bind :::8092\n" + FRONTEND_END)
    first, second = config.frontend("fe").binds
    assert (first.host, first.family) == ("::1", "ipv6")
    assert (second.host, second.port, second.family) == ("::", 8092, "ipv6")


def test_bind_paths_use_bases() -> None:
    result = bind(
        "ssl crt server.pem ca-file ca.pem crl-file crl.pem",
        prefix="global\n    crt-base /etc/crt\n    ca-base ca\n",
    )
    assert result.crt == ("/etc/crt/server.pem",)
    assert result.ca_file == "/cfg/ca/ca.pem"  # a relative base is relative to the config
    assert result.crl_file == "/cfg/ca/crl.pem"


def test_bind_takes_global_ssl_defaults() -> None:
    prefix = (
        "global\n    ssl-default-bind-options ssl-min-ver TLSv1.3 no-tls-tickets\n"
        "    ssl-default-bind-ciphers HIGH\n    ssl-default-bind-ciphersuites TLS_X\n"
    )
    result = bind("ssl crt s.pem", prefix=prefix)
    assert (result.ssl_min_ver, result.no_tls_tickets) == ("TLSv1.3", True)
    assert (result.ciphers, result.ciphersuites) == ("HIGH", "TLS_X")
    explicit = bind("ssl crt s.pem ssl-min-ver TLSv1.2 ciphers LOW", prefix=prefix)
    assert (explicit.ssl_min_ver, explicit.ciphers) == ("TLSv1.2", "LOW")
    plain = bind("", prefix=prefix)
    assert plain.ssl_min_ver == "TLSv1.2"  # defaults only apply to ssl binds


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            "vrify none",
            "'bind' : unknown option 'vrify' in 'frontend fe' section; did you mean 'verify'?",
        ),
        (
            "ssl crt s.pem ca-file c.pem verify maybe",
            "'bind' : 'verify' : expects one of 'none', 'optional', 'required', got 'maybe'",
        ),
        ("ssl crt s.pem ssl-min-ver TLSv1.4", "'bind' : 'ssl-min-ver' : expects one of 'SSLv3'"),
        (
            "ssl crt s.pem ca-ignore-err 10,x",
            "'bind' : 'ca-ignore-err' : expects an integer from 1 to 94, got 'x'",
        ),
        (
            "ssl crt s.pem alpn mqtt,,h2",
            "'bind' : 'alpn' : expects a comma-separated protocol list",
        ),
        ("crt", "'bind' : 'crt' : expects a value"),
        ("ssl", "'bind' : 'ssl' needs a certificate: add 'crt <file>' to 'bind :8091'"),
        ("ssl crt s.pem verify required", "'bind' : 'verify required' needs 'ca-file'"),
        ("ssl crt s.pem ca-verify-file r.pem", "'bind' : 'ca-verify-file' needs 'ca-file'"),
        (
            "ssl crt s.pem ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.2",
            "'bind' : 'ssl-max-ver TLSv1.2' is below 'ssl-min-ver TLSv1.3'",
        ),
        ("maxconn 0", "'bind' : 'maxconn' : expects an integer >= 1, got '0'"),
        ("npn mqtt", "'bind' : 'npn' : not supported: NPN (use 'alpn')"),
        ("verify-depth x", "'bind' : 'verify-depth' : expects an integer from 0 to 100"),
    ],
)
def test_bind_errors(options: str, message: str) -> None:
    texts = errors(f"frontend fe\n    bind :8091 {options}\n" + FRONTEND_END)
    assert len(texts) == 1, texts
    assert texts[0].startswith("parsing [/cfg/t.cfg:2] : ")
    assert message in texts[0]


def test_bind_address_errors() -> None:
    texts = errors(
        "frontend fe\n    bind localhost:1\n    bind 127.0.0.1\n    bind\n" + FRONTEND_END
    )
    assert texts == [
        "parsing [/cfg/t.cfg:2] : 'bind' : expects an IP address, got 'localhost'",
        "parsing [/cfg/t.cfg:3] : 'bind' : missing port in address '127.0.0.1' (expects host:port)",
        "parsing [/cfg/t.cfg:4] : 'bind' : expects an address like *:8091",
    ]


def test_bind_process_is_ignored_with_a_warning() -> None:
    result = load("frontend fe\n    bind :1 process 1\n" + FRONTEND_END)
    assert result.config is not None
    assert "'bind' : 'process' : ignored" in result.warnings[0].text


def test_tls_options_without_ssl_warn() -> None:
    texts = warnings("frontend fe\n    bind :1 crt s.pem verify required\n" + FRONTEND_END)
    assert texts == [
        "parsing [/cfg/t.cfg:2] : 'bind' : 'crt', 'verify' ignored: this bind has no 'ssl', "
        "it accepts plain TCP"
    ]


# --------------------------------------------------------------------------- server


def test_server_defaults() -> None:
    result = server("")
    assert (result.name, result.address, result.host, result.port) == (
        "s1",
        "127.0.0.1:1883",
        "127.0.0.1",
        1883,
    )
    assert (result.inter, result.rise, result.fall, result.weight) == (2.0, 2, 3, 1)
    assert result.check is False and result.send_proxy_v2 is False
    assert result.maxconn is None and result.maxqueue == 0
    assert result.fastinter is None and result.downinter is None


def test_server_options() -> None:
    result = server(
        "check check-send-proxy send-proxy send-proxy-v2 proxy-v2-options crc32c,chain-subjects "
        "inter 10s fastinter 1s downinter 5s rise 5 fall 2 slowstart 60s maxconn 500000 "
        "maxqueue 10000 minconn 10 weight 100 backup disabled port 9000 addr 127.0.0.2 "
        "on-marked-down shutdown-sessions on-marked-up shutdown-backup-sessions"
    )
    assert result.check and result.check_send_proxy and result.send_proxy and result.send_proxy_v2
    assert result.proxy_v2_options == frozenset({"crc32c", "chain-subjects"})
    assert (result.inter, result.fastinter, result.downinter) == (10.0, 1.0, 5.0)
    assert (result.rise, result.fall, result.slowstart) == (5, 2, 60.0)
    assert (result.maxconn, result.maxqueue, result.minconn, result.weight) == (
        500000,
        10000,
        10,
        100,
    )
    assert result.backup and result.disabled
    assert (result.check_port, result.check_addr) == (9000, "127.0.0.2")
    assert result.on_marked_down == "shutdown-sessions"
    assert result.on_marked_up == "shutdown-backup-sessions"


def test_send_proxy_v2_ssl_variants() -> None:
    ssl = server("send-proxy-v2-ssl")
    assert ssl.send_proxy_v2 and ssl.proxy_v2_options == frozenset({"ssl"})
    cn = server("send-proxy-v2-ssl-cn proxy-v2-options authority")
    assert cn.send_proxy_v2
    assert cn.proxy_v2_options == frozenset({"ssl", "cert-cn", "authority"})


def test_server_name_without_port_and_names() -> None:
    result = server("").__class__
    assert result is Server
    config = valid(
        "frontend fe\n    bind :1\n    default_backend be\nbackend be\n"
        "    server a broker-1.local:1883\n    server b 10.0.0.1\n    server c [::1]:1883\n"
    )
    a, b, c = config.backend("be").servers
    assert (a.host, a.port) == ("broker-1.local", 1883)
    assert (b.host, b.port) == ("10.0.0.1", None)
    assert (c.host, c.port) == ("::1", 1883)


def test_default_server_applies_to_later_servers_only() -> None:
    config = valid(
        """
        defaults
            default-server rise 4
        frontend fe
            bind :1
            default_backend be
        backend be
            server early 127.0.0.1:1
            default-server inter 10s downinter 5s check send-proxy-v2-ssl
            server late 127.0.0.1:2 inter 1s no-check
            server later 127.0.0.1:3 proxy-v2-options crc32c
        backend other
            server plain 127.0.0.1:4
        """
    )
    early, late, later = config.backend("be").servers
    assert (early.inter, early.rise, early.check) == (2.0, 4, False)
    assert (late.inter, late.downinter, late.rise, late.check) == (1.0, 5.0, 4, False)
    assert later.check is True and later.inter == 10.0
    assert later.proxy_v2_options == frozenset({"ssl", "crc32c"})
    (plain,) = config.backend("other").servers
    assert (plain.inter, plain.rise, plain.check) == (2.0, 4, False)


def test_enabled_undoes_disabled() -> None:
    config = valid(
        "frontend fe\n    bind :1\n    default_backend be\nbackend be\n"
        "    default-server disabled\n    server a 127.0.0.1:1 enabled\n    server b 127.0.0.1:2\n"
    )
    a, b = config.backend("be").servers
    assert (a.disabled, b.disabled) == (False, True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("weight 300", "'server' : 'weight' : expects an integer from 0 to 256, got '300'"),
        ("inter ten", "'server' : 'inter' : expects a time like 10s, 500ms, got 'ten'"),
        ("rise 0", "'server' : 'rise' : expects an integer >= 1, got '0'"),
        ("fall", "'server' : 'fall' : expects a value"),
        ("chek", "'server' : unknown option 'chek' in 'backend be' section; did you mean 'check'?"),
        (
            "proxy-v2-options ssl,cert-cm",
            "'server' : 'proxy-v2-options' : unknown proxy-v2-options value 'cert-cm'; "
            "did you mean 'cert-cn'?",
        ),
        ("port 70000", "'server' : 'port' : expects an integer from 1 to 65535, got '70000'"),
        (
            "on-marked-down shutdown",
            "'server' : 'on-marked-down' : expects one of 'shutdown-sessions'",
        ),
        ("ssl", "'server' : 'ssl' : not supported: TLS towards servers: lb forwards plain TCP"),
        ("resolvers dns", "'server' : 'resolvers' : not supported: DNS resolvers"),
        ("observe layer4", "'server' : 'observe' : not supported"),
    ],
)
def test_server_errors(options: str, message: str) -> None:
    texts = errors(
        f"frontend fe\n    bind :1\n    default_backend be\nbackend be\n"
        f"    server s1 127.0.0.1:1883 {options}\n"
    )
    assert len(texts) == 1, texts
    assert texts[0].startswith("parsing [/cfg/t.cfg:5] : ")
    assert message in texts[0]


def test_server_errors_are_all_reported() -> None:
    texts = errors(
        "frontend fe\n    bind :1\n    default_backend be\nbackend be\n"
        "    server s1 127.0.0.1:99999 weight 300 inter x\n    server s2\n"
    )
    assert texts == [
        "parsing [/cfg/t.cfg:5] : 'server' : expects an integer from 1 to 65535, got '99999'",
        "parsing [/cfg/t.cfg:5] : 'server' : 'weight' : expects an integer from 0 to 256, "
        "got '300'",
        "parsing [/cfg/t.cfg:5] : 'server' : 'inter' : expects a time like 10s, 500ms, got 'x'",
        "parsing [/cfg/t.cfg:6] : 'server' : expects <name> <address> [options...]",
    ]


# --------------------------------------------------------------------------- lints


def test_lint_check_with_port_override_without_check_send_proxy() -> None:
    base = (
        "global\n    maxconn 10000\nfrontend fe\n    bind :1\n    default_backend be\nbackend be\n"
    )
    texts = warnings(base + "    server s1 127.0.0.1:1883 check send-proxy-v2 port 9000\n")
    assert texts == [
        "parsing [/cfg/t.cfg:7] : 'server' : 's1' sends a PROXY header but its checks go to a "
        "'port'/'addr' override without one; add 'check-send-proxy' if the server requires "
        "the header"
    ]
    assert (
        warnings(
            base + "    server s1 127.0.0.1:1883 check send-proxy-v2 port 9000 check-send-proxy\n"
        )
        == []
    )
    assert warnings(base + "    server s1 127.0.0.1:1883 check send-proxy-v2\n") == []


def test_lint_global_maxconn_below_server_maxconn() -> None:
    tail = (
        "frontend fe\n    bind :1\n    default_backend be\nbackend be\n"
        "    server s1 127.0.0.1:1 maxconn 500000\n    server s2 127.0.0.1:2 maxconn 500000\n"
    )
    assert warnings("global\n    maxconn 1000\n" + tail) == [
        "parsing [/cfg/t.cfg:7] : 'server' : 's1' allows maxconn 500000 but global maxconn is "
        "1000: the whole balancer accepts no more than that; raise 'maxconn' in 'global' (or "
        "leave it out: then it is what the file limit allows)"
    ]
    # Unset, it is what the file limit allows (lb.limits), as in HAProxy 2.6.
    assert warnings(tail) == []
    assert warnings("global\n    maxconn 100000\n" + tail) == []


def test_lint_frontend_without_backend_and_backend_without_server() -> None:
    texts = warnings(
        "frontend fe\n    bind :1\nbackend be\nfrontend nobind\n    default_backend be\n"
    )
    assert texts == [
        "parsing [/cfg/t.cfg:1] : 'frontend' : 'fe' has no 'default_backend': its connections "
        "will be closed",
        "parsing [/cfg/t.cfg:3] : 'backend' : 'be' has no server",
        "parsing [/cfg/t.cfg:4] : 'frontend' : 'nobind' has no 'bind' line",
    ]


def test_environment_variables_in_keywords() -> None:
    result = load(
        'frontend fe\n    bind "${ADDRESS}:${PORT}"\n' + FRONTEND_END,
        environ={"ADDRESS": "127.0.0.1", "PORT": "9443"},
    )
    assert result.config is not None
    assert result.config.frontend("fe").binds[0].port == 9443


def test_config_lookup_errors() -> None:
    config = valid(TAIL)
    with pytest.raises(KeyError):
        config.backend("nope")
    with pytest.raises(KeyError):
        config.frontend("nope")


# --------------------------------------------------------------------------- tables


def test_global_keyword_given_twice() -> None:
    texts = errors("global\n    maxconn 10\n    maxconn 20\n" + TAIL)
    assert texts == ["parsing [/cfg/t.cfg:3] : 'maxconn' : already specified at /cfg/t.cfg:2"]


UNSUPPORTED_GLOBAL = [k for k, p in GLOBAL_KEYWORDS.items() if "unsupported" in p.__qualname__]
UNSUPPORTED_PROXY = [
    k for k, spec in PROXY_KEYWORDS.items() if "unsupported" in spec.parse.__qualname__
]


@pytest.mark.parametrize("keyword", UNSUPPORTED_GLOBAL)
def test_every_unsupported_global_keyword_is_an_error(keyword: str) -> None:
    (text,) = errors(f"global\n    {keyword} x\n" + TAIL)
    assert f"'{keyword}' : not supported: " in text


@pytest.mark.parametrize("keyword", UNSUPPORTED_PROXY)
def test_every_unsupported_proxy_keyword_is_an_error(keyword: str) -> None:
    (text,) = errors(f"defaults\n    {keyword} x\n" + TAIL)
    assert f"'{keyword}' : not supported: " in text


@pytest.mark.parametrize(
    ("table", "keyword", "line"),
    [
        *[
            (BIND_OPTIONS, name, "frontend f2\n    bind :2 {}\n")
            for name, spec in BIND_OPTIONS.items()
            if spec.unsupported
        ],
        *[
            (SERVER_OPTIONS, name, "backend b2\n    server s 127.0.0.1:1 {}\n")
            for name, spec in SERVER_OPTIONS.items()
            if spec.unsupported
        ],
    ],
)
def test_every_unsupported_option_is_an_error(
    table: dict[str, OptionSpec], keyword: str, line: str
) -> None:
    option = f"{keyword} x" if table[keyword].takes_value else keyword
    texts = errors(TAIL + line.format(option))
    assert len(texts) == 1, texts
    assert f"'{keyword}' : not supported: " in texts[0]


@pytest.mark.parametrize(
    "flag", [name for name in SERVER_OPTIONS if name.startswith("no-")], ids=str
)
def test_server_no_flags_undo_default_server(flag: str) -> None:
    name = flag.removeprefix("no-")
    config = valid(
        "frontend fe\n    bind :1\n    default_backend be\nbackend be\n"
        f"    default-server {name}\n    server a 127.0.0.1:1 {flag}\n    server b 127.0.0.1:2\n"
    )
    a, b = config.backend("be").servers
    field_name = name.replace("-", "_")
    assert (getattr(a, field_name), getattr(b, field_name)) == (False, True)


def test_balance_registry_can_be_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keywords, "BALANCE_ALGORITHMS", ("roundrobin", "random"))
    config = valid(TAIL.replace("\nbackend be\n", "\nbackend be\n    balance random\n"))
    assert config.backend("be").balance == "random"
    assert (
        "'balance' : unknown or unsupported algorithm 'leastconn'"
        in errors(TAIL.replace("\nbackend be\n", "\nbackend be\n    balance leastconn\n"))[0]
    )


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(" \t\n#'\"\\${}-xab:1*")), max_size=200))
def test_arbitrary_text_only_yields_diagnostics(text: str) -> None:
    result = load_config_text(text, FILE, environ={"a": "1"})
    assert (result.config is None) == any(d.is_error for d in result.diagnostics)
