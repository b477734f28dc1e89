"""The `lb` command, with HAProxy's flags: -f FILE (repeatable), -c (check), -db, -W, -Ws, -p
PIDFILE, -sf/-st PID..., -V/-q, -dW (zero warning).

`lb -f FILE` runs a master and `nbthread` workers (lb.workers: SIGUSR2/SIGHUP reload,
SIGUSR1 soft stop, SIGTERM stop). As with HAProxy, `-db` runs one process in the foreground
without a master (unless `-W` asks for one); that process soft-stops on SIGUSR1 and stops on
SIGTERM too. `-sf PID...` / `-st PID...` tell a previous lb to finish (SIGUSR1) or stop
(SIGTERM) once this one listens (its sockets use SO_REUSEPORT so both can bind). `-Ws` is
the master with systemd's notify protocol (lb.sd_notify), for `Type=notify` units."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from lb import __version__, limits
from lb.config import Diagnostic, load_config
from lb.config.errors import format_report
from lb.config.model import Config
from lb.process import serve
from lb.proxy_hmac import KeyFileError, load_key_file
from lb.sd_notify import Notifier
from lb.tls import bind_tls, check_bind_files
from lb.workers import Master, signal_old_processes


def tls_diagnostics(
    config: Config, skip: frozenset[tuple[str, int]] = frozenset()
) -> list[Diagnostic]:
    """Load every certificate, CA and CRL file of the configuration, as `haproxy -c` does,
    and warn about the traps of chains and CRLs. Bind lines at the (file, line) positions in
    `skip` already have an error of their own and are not loaded."""
    diagnostics: list[Diagnostic] = []
    for frontend in config.frontends:
        for bind in frontend.binds:
            if not bind.ssl or (bind.origin.file, bind.origin.line) in skip:
                continue
            options = bind_tls(bind, config.global_, frontend.name)
            for finding in check_bind_files(options):
                make = Diagnostic.error if finding.severity == "error" else Diagnostic.warning
                diagnostics.append(
                    make(
                        bind.origin.file,
                        bind.origin.line,
                        "bind",
                        f"{finding.option}: {finding.message}",
                        f"frontend {frontend.name}",
                    )
                )
    return diagnostics


def key_file_diagnostics(
    config: Config, skip: frozenset[tuple[str, int]] = frozenset()
) -> list[Diagnostic]:
    """Load the key file of every `proxy-v2-hmac-keys`, as the certificates are loaded: a
    missing file, a mode open to others or a bad line is an error of its server line."""
    diagnostics: list[Diagnostic] = []
    for backend in config.backends:
        for server in backend.servers:
            path = server.proxy_v2_hmac_keys
            if path is None or (server.origin.file, server.origin.line) in skip:
                continue
            try:
                load_key_file(path)
            except KeyFileError as error:
                diagnostics.append(
                    Diagnostic.error(
                        server.origin.file,
                        server.origin.line,
                        "server",
                        f"'{server.name}': proxy-v2-hmac-keys: {error}",
                        f"backend {backend.name}",
                    )
                )
    return diagnostics


def check(
    paths: Sequence[str], *, file_limit: int | None = None
) -> tuple[Config | None, list[Diagnostic]]:
    """Parse and check the configuration, then load its files: every problem of both steps
    in one report, in file and line order (HAProxy 2.6 loads a `crt` while it parses, so a
    typo, a bad time and a missing certificate are three errors of one run). With
    `file_limit` (`-c`, a start, a reload), also warn when that many files per process
    cannot serve its maxconn (lb.limits)."""
    result = load_config(list(paths))
    diagnostics = list(result.diagnostics)
    model = result.config or result.partial
    if model is not None:
        broken = frozenset(
            (d.file, d.line) for d in diagnostics if d.is_error and d.file and d.line
        )
        diagnostics.extend(tls_diagnostics(model, broken))
        diagnostics.extend(key_file_diagnostics(model, broken))
        if file_limit is not None and result.config is not None:
            diagnostics.extend(limits.check_diagnostics(result.config, file_limit))
        diagnostics.sort(key=lambda d: d.position)
    has_errors = any(d.is_error for d in diagnostics)
    return (None if has_errors else result.config), diagnostics


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lb", description="Edge TCP/TLS load balancer configured like HAProxy."
    )
    parser.add_argument("-f", dest="files", action="append", required=True, metavar="FILE")
    parser.add_argument("-c", dest="check", action="store_true", help="check the configuration")
    parser.add_argument("-db", dest="foreground", action="store_true", help="foreground (default)")
    parser.add_argument("-p", dest="pidfile", help="write the pid to this file")
    parser.add_argument("-W", dest="master_worker", action="store_true", help="master-worker")
    parser.add_argument(
        "-Ws", dest="systemd", action="store_true", help="master-worker, notifying systemd"
    )
    parser.add_argument(
        "-sf",
        dest="finish_pids",
        nargs="+",
        type=int,
        default=[],
        metavar="PID",
        help="soft-stop these processes once listening",
    )
    parser.add_argument(
        "-st",
        dest="terminate_pids",
        nargs="+",
        type=int,
        default=[],
        metavar="PID",
        help="stop these processes once listening",
    )
    parser.add_argument("-dW", dest="zero_warning", action="store_true")
    parser.add_argument("-q", dest="quiet", action="store_true")
    parser.add_argument("-V", dest="verbose", action="store_true")
    parser.add_argument("-v", "--version", action="version", version=f"lb {__version__}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # -c warns about a maxconn this limit cannot serve; a start says it in HAProxy's words
    # (and refuses under strict-limits) once the soft limit is raised, below.
    config, diagnostics = check(args.files, file_limit=limits.hard_limit() if args.check else None)
    stderr, stdout, code = format_report(diagnostics, os.getpid())
    has_warnings = any(d.is_warning for d in diagnostics)
    if args.zero_warning and has_warnings and code == 0:
        stderr += "Some warnings were found and 'zero-warning' is set. Aborting.\n"
        code = 1
    if args.check:
        sys.stderr.write(stderr)
        sys.stdout.write(stdout)
        return code
    if config is None or code != 0:
        sys.stderr.write(stderr)
        return 1
    if stderr and not args.quiet:
        sys.stderr.write(stderr)
    files = limits.plan(config, limits.raise_soft_limit(config.global_.fd_hard_limit))
    if not files.fits:
        sys.stderr.write(limits.start_report(files, os.getpid()))
        if files.strict:
            return 1
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    pidfile = args.pidfile or config.global_.pidfile
    old_pids = [(pid, signal.SIGUSR1) for pid in args.finish_pids] + [
        (pid, signal.SIGTERM) for pid in args.terminate_pids
    ]
    if args.foreground and not (args.master_worker or args.systemd):
        if pidfile:
            Path(pidfile).write_text(f"{os.getpid()}\n")
        return serve(config, old_pids=old_pids)
    notifier = Notifier.from_environment() if args.systemd else Notifier(None)
    master = Master(args.files, config, check, pidfile=pidfile, notifier=notifier)
    for pid, signum in old_pids:
        signal_old_processes([pid], signum)
    return master.run()
