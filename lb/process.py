"""One lb process at run time: the frontends and backends of a configuration, started and
stopped together. The CLI runs one directly; the master of lb.workers runs one per worker.

Besides the traffic frontends a Runtime serves what lb.prometheus and lb.runtime_api offer (the
Prometheus endpoint of a `use-service prometheus-exporter` frontend, the `stats socket`
runtime API) and runs the certificate/CA/CRL reload watcher of lb.reload.

Under a master (lb.workers) a Runtime is one of several workers, linked to the master by
lb.control: only the *lead* worker runs the health checks and serves the runtime API and
Prometheus; every worker applies the server states, certificates and `reload ssl` the others
publish, and answers the lead's requests for its counters and sessions. Without a master
(`lb -db`), the one Runtime is the lead and has no link.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable, Sequence
from typing import Any

import uvloop

from lb import limits, shared_counts
from lb.checks import HealthChecks
from lb.config.model import Config, Frontend
from lb.control import (
    CertRecord,
    MasterLink,
    ServerRecord,
    WorkerSetup,
    apply_cert,
    apply_server_record,
    server_record,
)
from lb.control_codec import Message
from lb.counters import CounterSnapshot, ProcessCounters, take_snapshot
from lb.event_rate import EventRate
from lb.frontend import FrontendRuntime, ProcessLimit, open_listening_socket
from lb.log import GlobalLogHandler, TrafficLog, install_global_handler, remove_global_handler
from lb.prometheus import PrometheusEndpoint
from lb.proxy_hmac import HeaderKeys
from lb.reload import TLSReloader
from lb.runtime_api import RuntimeAPI, open_stats_socket, session_lines
from lb.server import BackendState, ServerState
from lb.shared_counts import SharedCounts
from lb.tls import BindContext

#: Key of the inherited socket of the n-th `stats socket` line in `Runtime.start(sockets=)`.
STATS_SOCKET_KEY = "@stats"

logger = logging.getLogger(__name__)
#: The process's start, stop and soft-stop lines, under the name `lb` (as when lb.cli ran them).
lifecycle_logger = logging.getLogger("lb")


class Runtime:
    """Everything a configuration starts, and the counters it keeps."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.config: Config = config
        self.loop = loop
        # What this worker may hold: the global maxconn within the files it may open (with
        # several workers, their sum is bounded too: share_counts).
        self.files = limits.plan(config, limits.soft_limit())
        self.process = ProcessLimit(self.files.worker_maxconn, loop)
        self.backends = {b.name: BackendState(b, clock=loop.time) for b in config.backends}
        # proxy-v2-hmac-keys files, read now (lb -c has checked them) and reread on change.
        self.key_files = HeaderKeys(loop.time)
        self.key_files.load(server for backend in config.backends for server in backend.servers)
        self.health_checks = HealthChecks(
            loop,
            self.backends.values(),
            config.global_,
            on_change=self.publish_server,
            key_files=self.key_files,
        )
        self.frontends: list[FrontendRuntime] = []
        self.counters: ProcessCounters = ProcessCounters()
        self.stopping = False
        self.worker_number = 1
        self.queue_poll: asyncio.TimerHandle | None = None  # lb.shared_counts
        # The lead runs the health checks and serves the runtime API and Prometheus.
        self.lead = True
        self.link: MasterLink | None = None
        self.sockets: dict[tuple[str, int], socket.socket] = {}
        self.prometheus_frontends: list[Frontend] = []
        self.services: list[PrometheusEndpoint | RuntimeAPI] = []
        self.log_handler: GlobalLogHandler | None = None
        self.reloader: TLSReloader | None = None
        global_targets = config.global_.log
        for frontend in config.frontends:
            if frontend.http_request_use_service == "prometheus-exporter":
                self.prometheus_frontends.append(frontend)
                continue
            if frontend.default_backend is None:
                logger.warning("frontend %s has no default_backend: not started", frontend.name)
                continue
            backend = self.backends[frontend.default_backend]
            targets = frontend.log.targets + (global_targets if frontend.log.global_ else ())
            self.frontends.append(
                FrontendRuntime(
                    loop,
                    frontend,
                    config.global_,
                    backend,
                    self.process,
                    TrafficLog(targets),
                    retries=backend.config.retries,
                    counters=self.counters,
                    key_files=self.key_files,
                )
            )

        self.use_rates(None)

    def use_rates(self, counts: SharedCounts | None) -> None:
        """Count accepts per second where every worker's are summed (`counts`), or in this
        worker's own windows, and set the process's rate limits: `maxconnrate` and
        `maxsessrate` over every listener (one count: every connection lb accepts is a
        session), `maxsslrate` over the SSL ones (lb.event_rate)."""
        global_ = self.config.global_
        windows = []
        ssl_windows = []
        for frontend in self.frontends:
            if counts is not None:
                frontend.use_rate_windows(
                    [
                        counts.rate_window(
                            shared_counts.listener_rate(frontend.name, index), self.worker_number
                        )
                        for index in range(len(frontend.binds))
                    ]
                )
            windows += frontend.bind_windows
            ssl_windows += [
                window
                for index, window in enumerate(frontend.bind_windows)
                if frontend.contexts[index] is not None
            ]
        limits = [
            (limit, f"'{name} {limit}'")
            for name, limit in (
                ("maxconnrate", global_.maxconnrate),
                ("maxsessrate", global_.maxsessrate),
            )
            if limit is not None
        ]
        limit, label = min(limits) if limits else (None, "")
        self.process.conn_rate = EventRate(windows, limit, label)
        self.process.ssl_rate = EventRate(
            ssl_windows, global_.maxsslrate, f"'maxsslrate {global_.maxsslrate}'"
        )

    def start(
        self,
        sockets: dict[tuple[str, int], socket.socket] | None = None,
        reuse_port: bool = False,
    ) -> None:
        for frontend in self.frontends:
            inherited = None
            if sockets is not None:
                inherited = {
                    index: sockets[(frontend.name, index)]
                    for index in range(len(frontend.binds))
                    if (frontend.name, index) in sockets
                }
            frontend.start(inherited, reuse_port=reuse_port)
            for listener in frontend.listeners:
                host, port = listener.address[:2]
                logger.info(
                    "frontend %s listening on %s:%d%s",
                    frontend.name,
                    host,
                    port,
                    " (ssl)" if listener.context else "",
                )

        self.log_handler = install_global_handler(self.config.global_.log)
        self.sockets = dict(sockets or {})
        if self.lead:
            self.loop.create_task(self._start_services(self.sockets))
        self.reloader = TLSReloader(self, self.config.global_.tune_ssl_reload_interval)
        self.reloader.start()
        self.health_checks.start(run_checks=self.lead)

    async def _start_services(self, sockets: dict[tuple[str, int], socket.socket]) -> None:
        """Prometheus and the runtime API (the lead's); their answers cover every worker."""
        for frontend in self.prometheus_frontends:
            endpoint = PrometheusEndpoint(self, frontend.name)
            bound = [
                sockets.get((frontend.name, index)) or open_listening_socket(bind)
                for index, bind in enumerate(frontend.binds)
            ]
            await endpoint.start(bound)
            self.services.append(endpoint)
            for sock in bound:
                host, port = sock.getsockname()[:2]
                logger.info(
                    "frontend %s listening on %s:%d (prometheus)", frontend.name, host, port
                )
        stats_sockets = []
        for index, config in enumerate(self.config.global_.stats_socket):
            sock = sockets.get((STATS_SOCKET_KEY, index)) or open_stats_socket(config)
            stats_sockets.append((config, sock))
        if stats_sockets:
            api = RuntimeAPI(self)
            await api.start(stats_sockets)
            self.services.append(api)
            for config, _sock in stats_sockets:
                logger.info("stats socket listening on %s", config.path)

    # -- the other workers (lb.control) -----------------------------------------------------

    async def attach_master(self, setup: WorkerSetup, on_master_gone: Callable[[], None]) -> None:
        """Join the master's workers, before start(): take the state they share (a server
        that is DOWN or in maintenance stays so across a reload) and open the link."""
        self.worker_number = setup.number
        self.lead = setup.lead
        if setup.counts is not None:
            self.share_counts(setup.counts)
        for record in setup.shared.servers.values():
            apply_server_record(self.backends, record)
        for cert in setup.shared.certs.values():
            apply_cert(self.bind_contexts(), cert, at_start=True)
        self.link = await MasterLink.open(
            self.loop, setup.control, self.on_master_message, on_master_gone
        )

    def share_counts(self, counts: SharedCounts) -> None:
        """Count this worker's sessions and server connections where every worker's are
        summed, so that the global, frontend and server maxconn bound all of them
        (lb.shared_counts)."""
        number = self.worker_number
        self.use_rates(counts)
        maxconn = self.config.global_.maxconn
        if maxconn is not None:
            self.process.shared = counts.count(shared_counts.GLOBAL, number, maxconn)
        for frontend in self.frontends:
            if frontend.maxconn is not None:
                name = shared_counts.frontend_count(frontend.name)
                frontend.shared = counts.count(name, number, frontend.maxconn)
        for backend in self.backends.values():
            for server in backend.servers:
                if server.config.maxconn is not None:
                    name = shared_counts.server_count(backend.name, server.name)
                    server.shared = counts.count(name, number, server.config.maxconn)
                    backend.on_queued = self._watch_queues

    def _watch_queues(self) -> None:
        """A connection waits for a server slot: slots that other workers free do not
        reach this one, so look again every POLL_INTERVAL while any connection waits."""
        if self.queue_poll is None:
            self.queue_poll = self.loop.call_later(shared_counts.POLL_INTERVAL, self._poll_queues)

    def _poll_queues(self) -> None:
        self.queue_poll = None
        waiting = False
        for backend in self.backends.values():
            if backend.queued:
                for server in backend.servers:
                    backend.serve_queues(server)
                waiting = waiting or backend.queued > 0
        if waiting:
            self._watch_queues()

    def detach_master(self) -> None:
        if self.link is not None and self.link.transport is not None:
            self.link.transport.close()

    def announce_ready(self) -> None:
        if self.link is not None:
            self.link.send({"t": "ready"})
            if self.lead:
                logger.info(
                    "worker #%d leads: health checks, runtime API, Prometheus", self.worker_number
                )

    def on_master_message(self, message: Message) -> None:
        kind = message["t"]
        if kind == "server":
            apply_server_record(self.backends, ServerRecord.from_message(message))
        elif kind == "cert":
            apply_cert(self.bind_contexts(), CertRecord.from_message(message), at_start=False)
        elif kind == "reload_ssl":
            self.reload_tls_files(force=True)
        elif kind == "lead":
            self.set_lead(bool(message["on"]))
        elif kind == "collect":
            data: Any
            if message["what"] == "sessions":
                data = session_lines(self)
            else:
                data = take_snapshot(self).to_json()
            if self.link is not None:
                self.link.send({"t": "reply", "id": message["id"], "data": data})
        else:
            logger.warning("unknown control message %r", kind)

    def set_lead(self, lead: bool) -> None:
        """Take or give up the lead role (the master moves it to a new worker on reload)."""
        if lead == self.lead:
            return
        self.lead = lead
        if lead:
            logger.info(
                "worker #%d leads: health checks, runtime API, Prometheus", self.worker_number
            )
            if not self.stopping:
                self.loop.create_task(self._start_services(self.sockets))
            self.health_checks.start_checks()
        else:
            self.health_checks.stop_checks()
            for service in self.services:
                service.close()
            self.services.clear()

    def publish_server(self, backend: BackendState, server: ServerState) -> None:
        """A server's health or runtime settings changed here: tell the other workers."""
        if self.link is not None:
            self.link.send(server_record(backend, server).to_message())

    def publish_cert(self, record: CertRecord) -> None:
        if self.link is not None:
            self.link.send(record.to_message())

    def reload_tls_everywhere(self) -> str:
        """`reload ssl`: here (the report) and in every other worker."""
        if self.link is not None:
            self.link.send({"t": "reload_ssl"})
        return self.reload_tls_files(force=True)

    async def gather_counters(self) -> list[CounterSnapshot]:
        """This worker's counters and every other serving worker's."""
        mine = take_snapshot(self)
        if self.link is None:
            return [mine]
        others = [CounterSnapshot.from_json(data) for data in await self.link.gather("counters")]
        return [mine, *others]

    async def gather_sessions(self) -> list[str]:
        lines = session_lines(self)
        if self.link is not None:
            for data in await self.link.gather("sessions"):
                lines.extend(str(line) for line in data)
        return lines

    def stop_accepting(self) -> None:
        self.stopping = True
        for frontend in self.frontends:
            frontend.stop_accepting()
        for service in self.services:
            service.close()
        if self.reloader is not None:
            self.reloader.stop()
        remove_global_handler(self.log_handler)
        self.log_handler = None

    def close_all_sessions(self) -> None:
        """Hard stop: close every session now (SIGTERM, hard-stop-after)."""
        for frontend in self.frontends:
            for client in list(frontend.sessions):
                client.kill("K")

    def proxy_ids(self) -> dict[tuple[str, str], int]:
        """HAProxy-like proxy ids (iid) in configuration order, frontends and backends."""
        proxies: list[tuple[tuple[str, int], tuple[str, str]]] = []
        for frontend in self.config.frontends:
            proxies.append(
                ((frontend.origin.file, frontend.origin.line), ("frontend", frontend.name))
            )
        for backend in self.config.backends:
            proxies.append(((backend.origin.file, backend.origin.line), ("backend", backend.name)))
        proxies.sort(key=lambda item: item[0])
        return {key: index for index, (_, key) in enumerate(proxies, start=2)}

    def bind_contexts(self) -> list[BindContext]:
        return [
            context
            for frontend in self.frontends
            for context in frontend.contexts.values()
            if context is not None
        ]

    def reload_tls_files(self, *, force: bool = False) -> str:
        """Re-read changed certificate, CA and CRL files now; the report in words."""
        if self.reloader is None:
            return "no TLS bind lines\n"
        return self.reloader.check(force=force)

    @property
    def active_sessions(self) -> int:
        # Counted from accept(), not from connection_made: a soft-stopping worker must not
        # exit under a connection it accepted and is still adopting (a dropped connection
        # during reloads, seen by tests/test_lb_workers.py).
        return sum(f.reserved for f in self.frontends)


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

    async def run() -> int:
        loop = asyncio.get_running_loop()
        runtime = Runtime(config, loop)
        soft = asyncio.Event()
        finishing = False
        if worker is not None:

            def master_gone() -> None:
                if not finishing and not soft.is_set():
                    lifecycle_logger.warning("master is gone: soft stop")
                    soft.set()

            await runtime.attach_master(worker, master_gone)
        runtime.start(sockets, reuse_port=sockets is None)
        for pid, signum in old_pids:
            try:
                os.kill(pid, signum)
            except OSError as error:
                lifecycle_logger.warning("cannot signal old process %d: %s", pid, error)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, soft.set)
        runtime.announce_ready()
        waiters = [loop.create_task(stop.wait()), loop.create_task(soft.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        runtime.stop_accepting()
        if soft.is_set() and not stop.is_set():
            lifecycle_logger.info(
                "soft stop: waiting for %d sessions to end", runtime.active_sessions
            )
            limit = config.global_.hard_stop_after
            deadline = None if limit is None else loop.time() + limit
            while runtime.active_sessions and not stop.is_set():
                if deadline is not None and loop.time() > deadline:
                    lifecycle_logger.warning(
                        "hard-stop-after: closing %d sessions", runtime.active_sessions
                    )
                    break
                await asyncio.sleep(0.1)
        if runtime.active_sessions:
            runtime.close_all_sessions()
            await asyncio.sleep(0)
        for waiter in waiters:
            waiter.cancel()
        finishing = True
        runtime.health_checks.stop()
        runtime.detach_master()
        lifecycle_logger.info("stopped")
        return 0

    return uvloop.run(run())
