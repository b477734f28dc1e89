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
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lb import __version__
from lb.config import Diagnostic, load_config
from lb.config.errors import format_report
from lb.config.model import Config
from lb.tls import bind_tls, check_bind_files

if TYPE_CHECKING:
    from lb.control import WorkerSetup

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
    pidfile = args.pidfile or config.global_.pidfile
    old_pids = [(pid, signal.SIGUSR1) for pid in args.finish_pids] + [
        (pid, signal.SIGTERM) for pid in args.terminate_pids
    ]
    if args.foreground and not (args.master_worker or args.systemd):
        if pidfile:
            Path(pidfile).write_text(f"{os.getpid()}\n")
        return serve(config, old_pids=old_pids)
    from lb.sd_notify import Notifier
    from lb.workers import Master, signal_old_processes

    notifier = Notifier.from_environment() if args.systemd else Notifier(None)
    master = Master(args.files, config, check, pidfile=pidfile, notifier=notifier)
    for pid, signum in old_pids:
        signal_old_processes([pid], signum)
    return master.run()


def serve(
    config: Config,
    *,
    sockets: dict[tuple[str, int], socket.socket] | None = None,
    worker: WorkerSetup | None = None,
    old_pids: Sequence[tuple[int, int]] = (),
) -> int:
    """Run one process's Runtime until SIGTERM (stop now) or SIGUSR1 (finish sessions).

    In a worker, `sockets` are the master's and `worker` holds the master's line and the
    state the workers share (lb.control); EOF on that line means the master is gone, and
    the worker soft-stops."""
    import uvloop

    from lb.process import Runtime

    async def run() -> int:
        loop = asyncio.get_running_loop()
        runtime = Runtime(config, loop)
        soft = asyncio.Event()
        finishing = False
        if worker is not None:

            def master_gone() -> None:
                if not finishing and not soft.is_set():
                    logger.warning("master is gone: soft stop")
                    soft.set()

            await runtime.attach_master(worker, master_gone)
        runtime.start(sockets, reuse_port=sockets is None)
        for pid, signum in old_pids:
            try:
                os.kill(pid, signum)
            except OSError as error:
                logger.warning("cannot signal old process %d: %s", pid, error)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, soft.set)
        runtime.announce_ready()
        waiters = [loop.create_task(stop.wait()), loop.create_task(soft.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        runtime.stop_accepting()
        if soft.is_set() and not stop.is_set():
            logger.info("soft stop: waiting for %d sessions to end", runtime.active_sessions)
            limit = config.global_.hard_stop_after
            deadline = None if limit is None else loop.time() + limit
            while runtime.active_sessions and not stop.is_set():
                if deadline is not None and loop.time() > deadline:
                    logger.warning("hard-stop-after: closing %d sessions", runtime.active_sessions)
                    break
                await asyncio.sleep(0.1)
        if runtime.active_sessions:
            runtime.close_all_sessions()
            await asyncio.sleep(0)
        for waiter in waiters:
            waiter.cancel()
        finishing = True
        runtime.detach_master()
        logger.info("stopped")
        return 0

    return uvloop.run(run())
