"""The `lb` command, with HAProxy's flags: -f FILE (repeatable), -c (check), -db (foreground,
the default here), -p PIDFILE, -V/-q, -dW (zero warning)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from lb import __version__
from lb.config import Diagnostic, load_config
from lb.config.errors import format_report
from lb.config.model import Config
from lb.tls import bind_tls, check_bind_files

logger = logging.getLogger("lb")


def tls_diagnostics(config: Config) -> list[Diagnostic]:
    """Load every certificate, CA and CRL file of the configuration, as `haproxy -c` does,
    and warn about the traps of chains and CRLs."""
    diagnostics: list[Diagnostic] = []
    for frontend in config.frontends:
        for bind in frontend.binds:
            if not bind.ssl:
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


def check(paths: Sequence[str]) -> tuple[Config | None, list[Diagnostic]]:
    result = load_config(list(paths))
    diagnostics = list(result.diagnostics)
    if result.config is not None:
        diagnostics.extend(tls_diagnostics(result.config))
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
    parser.add_argument("-dW", dest="zero_warning", action="store_true")
    parser.add_argument("-q", dest="quiet", action="store_true")
    parser.add_argument("-V", dest="verbose", action="store_true")
    parser.add_argument("-v", "--version", action="version", version=f"lb {__version__}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config, diagnostics = check(args.files)
    stderr, stdout, code = format_report(diagnostics, os.getpid())
    has_warnings = any(not d.is_error for d in diagnostics)
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
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.pidfile:
        Path(args.pidfile).write_text(f"{os.getpid()}\n")
    return serve(config)


def serve(config: Config) -> int:
    import uvloop

    from lb.process import Runtime

    async def run() -> int:
        loop = asyncio.get_running_loop()
        runtime = Runtime(config, loop)
        runtime.start()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        soft = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, soft.set)
        waiters = [loop.create_task(stop.wait()), loop.create_task(soft.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        runtime.stop_accepting()
        if soft.is_set() and not stop.is_set():
            logger.info("soft stop: waiting for %d sessions to end", runtime.active_sessions)
            while runtime.active_sessions and not stop.is_set():
                await asyncio.sleep(0.2)
        for waiter in waiters:
            waiter.cancel()
        logger.info("stopped")
        return 0

    return uvloop.run(run())
