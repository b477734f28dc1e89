"""One lb process at run time: the frontends and backends of a configuration, started and
stopped together. The CLI runs one directly; the master of lb.workers runs one per worker.

Besides the traffic frontends a Runtime serves what lb.stats offers (the Prometheus
endpoint of a `use-service prometheus-exporter` frontend, the `stats socket` runtime API) and
runs the certificate/CA/CRL reload watcher of lb.reload.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from lb.checks import HealthChecks
from lb.config.model import Config, Frontend
from lb.frontend import FrontendRuntime, ProcessLimit
from lb.log import GlobalLogHandler, TrafficLog, install_global_handler, remove_global_handler
from lb.reload import TLSReloader
from lb.server import BackendState
from lb.stats import ProcessCounters, PrometheusEndpoint, RuntimeAPI, open_stats_socket
from lb.tls import BindContext

#: Key of the inherited socket of the n-th `stats socket` line in `Runtime.start(sockets=)`.
STATS_SOCKET_KEY = "@stats"

logger = logging.getLogger(__name__)


class Runtime:
    """Everything a configuration starts, and the counters it keeps."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.process = ProcessLimit(config.global_.maxconn)
        self.backends = {b.name: BackendState(b, clock=loop.time) for b in config.backends}
        self.health_checks = HealthChecks(loop, self.backends.values(), config.global_)
        self.frontends: list[FrontendRuntime] = []
        self.counters = ProcessCounters()
        self.stopping = False
        self.worker_number = 1
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
                )
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
        self.loop.create_task(self._start_services(sockets or {}))
        self.reloader = TLSReloader(self, self.config.global_.tune_ssl_reload_interval)
        self.reloader.start()
        self.health_checks.start()

    async def _start_services(self, sockets: dict[tuple[str, int], socket.socket]) -> None:
        """Prometheus and the runtime API, served by worker 1 only: each worker has its own
        counters, and one answer must describe one process. (Not yet done: relaying runtime
        API commands that change state to the other workers of an `nbthread` > 1 setup.)"""
        from lb.frontend import open_listening_socket

        if self.worker_number != 1:
            return

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
        return sum(f.current for f in self.frontends)
