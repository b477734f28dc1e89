"""Health check scheduling: TCP connect checks, tcp-check rules and mqtt-chk on the event
loop (HAProxy's check.c and tcpcheck.c).

The counting and the words live in lb.health and lb.server, the rules' logic in lb.tcpcheck
(`option tcp-check`, `option mqtt-chk`: `_run_rules` connects, sends, reads and times what it
asks for); this module only runs checks.
For each server with `check`: connect to `addr`:`port` (the server's own address and port
unless overridden), optionally send a PROXY header, close. Connected: L4OK; refused or
unreachable: L4CON with the errno text as info; no answer in time: L4TOUT. The time allowed
is `inter`, or min(`inter`, `timeout connect`) when `timeout check` is set (process_chk_conn:
"we allow up to min(inter, timeout.connect) for a connection to establish but only when
timeout.check is set"); a TCP check ends at the connection, so `timeout check` itself, the
read timeout, has nothing to bound.

PROXY header on checks (configuration.txt 5.2 `check-send-proxy`, `send-proxy-v2`, and
`pp2-never-send-local`): sent when the server has `check-send-proxy`, or has `send-proxy` /
`send-proxy-v2` and neither `port` nor `addr` overrides the check target. A v2 server gets a
LOCAL header (no addresses) with only the TLVs a check can fill (CRC32C, an empty SSL TLV
with `proxy-v2-options ssl`), byte-identical to HAProxy 2.6's, or a PROXY header with the
check's own addresses under `pp2-never-send-local`; otherwise a v1 line with the check
connection's real addresses.

Timing: the first checks are spread over the smallest first interval (start_checks: server
i of n starts after mininter * i / n); each next check comes `srv_getinter()` after the end
of the previous one. While a slowstart ramp runs, backends are ticked about once a second.

With several workers (lb.workers) only the lead worker runs checks (`start(run_checks=)`,
`start_checks`, `stop_checks`): once per server per interval for the whole process tree.
Every change a check makes to a server (health count, status, UP/DOWN) is reported to
`on_change`, which lb.process relays to the other workers (lb.control); they apply it
without checking, and only the lead logs it. Slowstart ticks run in every worker, since
each has its own balancers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import select
import socket
from collections.abc import Callable, Iterable

from lb import proxyproto, tcpcheck
from lb.config.model import Global, Server, TcpCheckRule
from lb.health import CheckResult, CheckStatus
from lb.limits import RESOURCE_ERRNOS, resource_words
from lb.proxy_hmac import HeaderKeys
from lb.server import BackendState, ServerState

logger = logging.getLogger(__name__)

#: How often a slowstart ramp is recomputed at most (HAProxy works in whole seconds).
SLOWSTART_TICK = 1.0
#: Closing a check connection never waits longer than this.
CLOSE_WAIT = 1.0


def check_target(server: Server) -> tuple[str, int] | None:
    """Where the check connects: `addr`/`port` overrides, else the server's address."""
    port = server.check_port if server.check_port is not None else server.port
    if port is None:
        return None
    return (server.check_addr or server.host, port)


def sends_proxy_header(server: Server) -> bool:
    if server.check_send_proxy:
        return True
    overridden = server.check_port is not None or server.check_addr is not None
    return (server.send_proxy or server.send_proxy_v2) and not overridden


def check_header(
    server: Server,
    global_: Global,
    local: tuple[str, int] | None,
    remote: tuple[str, int] | None,
    mac: proxyproto.MACKey | None = None,
    *,
    force: bool = False,
) -> bytes | None:
    """The PROXY header a health check of `server` starts with, if any (`force`: a
    `tcp-check connect send-proxy`); `mac` signs a v2 one (`proxy-v2-options hmac`: a
    broker that holds the key refuses checks without it)."""
    if not force and not sends_proxy_header(server):
        return None
    if not server.send_proxy_v2:
        return proxyproto.encode_v1(local, remote)
    options = server.proxy_v2_options
    ssl = proxyproto.SSLInfo(proxyproto.ClientFlags(0), 0) if "ssl" in options else None
    crc32c = "crc32c" in options
    if global_.pp2_never_send_local and local is not None and remote is not None:
        return proxyproto.encode_v2(
            proxyproto.Command.PROXY, local, remote, ssl=ssl, crc32c=crc32c, mac=mac
        )
    return proxyproto.encode_v2(
        proxyproto.Command.LOCAL, None, None, ssl=ssl, crc32c=crc32c, mac=mac
    )


def connect_timeout(backend: BackendState, server: ServerState) -> float:
    inter = server.config.inter
    timeouts = backend.config.timeout
    if timeouts.check is not None and timeouts.connect is not None:
        return min(inter, timeouts.connect)
    return inter


class HealthChecks:
    """Runs the checks of every `check` server of some backends."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        backends: Iterable[BackendState],
        global_: Global,
        on_change: Callable[[BackendState, ServerState], None] | None = None,
        key_files: HeaderKeys | None = None,
    ) -> None:
        self.loop = loop
        self.backends = list(backends)
        self.global_ = global_
        self.on_change = on_change
        self.key_files = key_files if key_files is not None else HeaderKeys(loop.time)
        # mqtt-chk's client id without `client-id`: one per process, so that two balancers
        # checking the same broker do not take each other's session over.
        self.mqtt_client_id = f"lb-check-{secrets.token_hex(4)}"
        self.tasks: list[asyncio.Task[None]] = []
        self.tick_task: asyncio.Task[None] | None = None

    def start(self, *, run_checks: bool = True) -> None:
        if any(s.config.slowstart > 0 for backend in self.backends for s in backend.servers):
            self.tick_task = self.loop.create_task(self._tick())
        if run_checks:
            self.start_checks()

    def start_checks(self) -> None:
        if self.tasks:
            return
        checked: list[tuple[BackendState, ServerState]] = []
        for backend in self.backends:
            for server in backend.servers:
                if server.health is None:
                    continue
                if check_target(server.config) is None:
                    logger.warning(
                        "backend %s: server %s has no port to check: health check disabled",
                        backend.name,
                        server.name,
                    )
                    continue
                checked.append((backend, server))
        if checked:
            first = min(self._interval(server) for _, server in checked)
            for position, (backend, server) in enumerate(checked):
                delay = first * position / len(checked)
                self.tasks.append(self.loop.create_task(self._run(backend, server, delay)))

    def stop_checks(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.tasks.clear()

    def stop(self) -> None:
        self.stop_checks()
        if self.tick_task is not None:
            self.tick_task.cancel()
            self.tick_task = None

    @staticmethod
    def _interval(server: ServerState) -> float:
        config = server.config
        assert server.health is not None
        return server.health.interval(config.inter, config.fastinter, config.downinter)

    async def _run(self, backend: BackendState, server: ServerState, delay: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        await asyncio.sleep(delay)
        while True:
            if task.cancelling():
                # A cancel that asyncio.wait_for swallowed: in Python 3.11 it returns the
                # inner result when the cancel arrives as that completes (gh-86296), and the
                # loop went on checking. Seen once: a stopped worker left behind, stuck in
                # asyncio's final cancel of its tasks, checking every 200 ms for good.
                raise asyncio.CancelledError
            try:
                result = await self.check_once(backend, server)
                before = _shared_health(server)
                if result.status is CheckStatus.SOCKERR:
                    self._not_run(backend, server, result)
                else:
                    for line in backend.check_done(server, result):
                        logger.warning("%s", line)
                if self.on_change is not None and _shared_health(server) != before:
                    self.on_change(backend, server)
            except Exception:
                # A failure while acting on one result must not end this server's checks
                # (its state would freeze for the life of the worker).
                logger.exception("health check of %s/%s failed", backend.name, server.name)
            await asyncio.sleep(self._interval(server))

    async def check_once(self, backend: BackendState, server: ServerState) -> CheckResult:
        config = backend.config
        if config.mqtt_check is not None:
            check = config.mqtt_check
            run = tcpcheck.mqtt_check(check, check.client_id or self.mqtt_client_id)
            return await self._run_rules(backend, server, run)
        if config.option.tcp_check:
            return await self._run_rules(backend, server, tcpcheck.TcpCheck(config.tcp_check_rules))
        target = check_target(server.config)
        assert target is not None
        started = self.loop.time()
        try:
            _reader, writer = await open_checked(
                self.loop, target[0], target[1], connect_timeout(backend, server)
            )
        except TimeoutError:
            return CheckResult(CheckStatus.L4TOUT, "", self.loop.time() - started)
        except OSError as error:
            info = os.strerror(error.errno) if error.errno else str(error)
            if error.errno in RESOURCE_ERRNOS:
                # No socket for the check: lb is short, the server may be fine.
                info = f"{resource_words(error.errno)} ({info})"
                return CheckResult(CheckStatus.SOCKERR, info, self.loop.time() - started)
            return CheckResult(CheckStatus.L4CON, info, self.loop.time() - started)
        duration = self.loop.time() - started
        try:
            local = writer.get_extra_info("sockname")
            remote = writer.get_extra_info("peername")
            header = check_header(
                server.config,
                self.global_,
                (local[0], local[1]) if isinstance(local, tuple) else None,
                (remote[0], remote[1]) if isinstance(remote, tuple) else None,
                self.key_files.mac_key(server.config),
            )
            if header:
                writer.write(header)
                await asyncio.wait_for(writer.drain(), CLOSE_WAIT)
        except (OSError, TimeoutError):
            pass  # connected is what a TCP check asks; the rest is courtesy
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), CLOSE_WAIT)
        return CheckResult(CheckStatus.L4OK, "", duration)

    async def _run_rules(
        self, backend: BackendState, server: ServerState, run: tcpcheck.TcpCheck
    ) -> CheckResult:
        """Drive a tcp-check (or mqtt-chk) run: its connects, sends and reads, with
        HAProxy's timeouts: `inter` for each connect (or `timeout connect` when `timeout
        check` is set), then `timeout check` from the connection on (else what is left of
        `inter`)."""
        loop = self.loop
        started = loop.time()
        timeouts = backend.config.timeout
        inter = server.config.inter
        writer: asyncio.StreamWriter | None = None
        reader: asyncio.StreamReader | None = None
        deadline = started + inter
        try:
            while True:
                action = run.next()
                if isinstance(action, tcpcheck.Finished):
                    if action.farewell and writer is not None:
                        with contextlib.suppress(OSError, TimeoutError):
                            writer.write(action.farewell)
                            await asyncio.wait_for(writer.drain(), CLOSE_WAIT)
                    return dataclasses.replace(action.result, duration=loop.time() - started)
                remaining = max(deadline - loop.time(), 0.0)
                if isinstance(action, tcpcheck.Connect):
                    if writer is not None:
                        await _close(writer)
                        writer = reader = None
                    connect_started = loop.time()
                    deadline = connect_started + inter
                    limit = inter
                    if timeouts.check is not None and timeouts.connect is not None:
                        limit = min(inter, timeouts.connect)
                    host, port = _rule_target(server.config, action.rule)
                    try:
                        opened = await open_checked(loop, host, port, limit)
                    except TimeoutError:
                        run.timed_out()
                        continue
                    except OSError as error:
                        if error.errno in RESOURCE_ERRNOS:
                            # No socket for the check (as the plain check above): not a
                            # failure of the server's.
                            info = f"{resource_words(error.errno)} ({_words(error)})"
                            return CheckResult(CheckStatus.SOCKERR, info, loop.time() - started)
                        run.connect_failed(_words(error))
                        continue
                    reader, writer = opened
                    if timeouts.check is not None:
                        deadline = loop.time() + timeouts.check
                    header = self._rule_header(server, opened[1], action.rule)
                    if header:
                        opened[1].write(header)
                    run.connected()
                elif isinstance(action, tcpcheck.Send):
                    assert writer is not None
                    try:
                        writer.write(action.data)
                        await asyncio.wait_for(writer.drain(), remaining)
                    except TimeoutError:
                        run.timed_out()
                        continue
                    except OSError as error:
                        run.send_failed(_words(error))
                        continue
                    run.sent()
                else:
                    assert reader is not None
                    try:
                        data = await asyncio.wait_for(reader.read(65536), remaining)
                    except TimeoutError:
                        run.timed_out()
                        continue
                    except OSError as error:
                        run.read_failed(_words(error))
                        continue
                    if data:
                        run.received(data)
                    else:
                        run.closed()
        finally:
            if writer is not None:
                await _close(writer)

    def _rule_header(
        self,
        server: ServerState,
        writer: asyncio.StreamWriter,
        rule: TcpCheckRule | None,
    ) -> bytes | None:
        """The PROXY header of a check connection: the server's check settings for the
        implicit connect and `connect default`, only `send-proxy` for an explicit one."""
        config = server.config
        if rule is not None and not rule.default and not rule.send_proxy:
            return None
        local = writer.get_extra_info("sockname")
        remote = writer.get_extra_info("peername")
        return check_header(
            config,
            self.global_,
            (local[0], local[1]) if isinstance(local, tuple) else None,
            (remote[0], remote[1]) if isinstance(remote, tuple) else None,
            self.key_files.mac_key(config),
            force=rule is not None and rule.send_proxy,
        )

    @staticmethod
    def _not_run(backend: BackendState, server: ServerState, result: CheckResult) -> None:
        """The check could not open its socket (out of files or memory here): neither a
        pass nor a failure. The server keeps its state, `show stat` says SOCKERR, and the
        log says so once until a check runs again. HAProxy 2.6 counts it as a failed check
        ("Layer4 connection problem, info: \"Too many sockets on the process (Too many open
        files)\"") and marks a healthy server DOWN, seen with 2.6.12 at a 64-file limit;
        so did lb, which sent every new device to the one broker left in the fleet run."""
        if server.check_status != result.status.name:
            logger.warning(
                "Health check for %sserver %s/%s not run%s; the server keeps its state.",
                "backup " if server.config.backup else "",
                backend.name,
                server.name,
                result.describe(),
            )
        server.check_status = result.status.name
        server.last_check = result

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(SLOWSTART_TICK)
            for backend in self.backends:
                try:
                    if backend.ramping():
                        backend.tick()
                except Exception:
                    logger.exception("slowstart tick of backend %s failed", backend.name)


def _rule_target(server: Server, rule: TcpCheckRule | None) -> tuple[str, int]:
    """tcpcheck_eval_connect: the rule's addr and port, else the check's (`addr`, `port`),
    else the server's."""
    target = check_target(server)
    assert target is not None
    host, port = target
    if rule is not None:
        host = rule.addr or host
        port = rule.port or port
    return host, port


def _words(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else str(error)


async def open_checked(
    loop: asyncio.AbstractEventLoop, host: str, port: int, limit: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A check's connection, within `limit` seconds: TimeoutError (L4TOUT) only when the
    kernel has not completed it when lb looks.

    On a loaded machine the loop can run its timers seconds late, and libuv runs expired
    timers before it polls for I/O: a connection that the server accepted in time was
    then reported as a timeout. In the 100,000-device ramp (load average 35 on 2 cores) the
    lead worker's checks of all six brokers "timed out" after 9 s at once (connect timeout
    5 s), the backend had no server for 3 minutes and 9,532 devices were refused. So when
    the timer fires, the socket is asked (poll, then SO_ERROR) before a timeout is
    declared: connected is L4OK and refused is L4CON, however late lb looked."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, address), limit)
        except TimeoutError:
            poller = select.poll()  # not select(): a worker's descriptors pass 1024
            poller.register(sock, select.POLLOUT)
            if not poller.poll(0):
                raise
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code)) from None
        return await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), CLOSE_WAIT)


def _shared_health(server: ServerState) -> tuple[bool, int | None, str | None]:
    """What a check changes that the other workers must learn (lb.control.ServerRecord)."""
    health = server.health.health if server.health is not None else None
    return (server.up, health, server.check_status)
