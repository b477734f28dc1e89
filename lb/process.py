"""One lb process at run time: the frontends and backends of a configuration, started and
stopped together. The CLI runs one directly; the master of lb.workers runs one per worker.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from lb.config.model import Config
from lb.frontend import FrontendRuntime, ProcessLimit
from lb.log import TrafficLog
from lb.server import BackendState

logger = logging.getLogger(__name__)


class Runtime:
    """Everything a configuration starts, and the counters it keeps."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.process = ProcessLimit(config.global_.maxconn)
        self.backends = {b.name: BackendState(b) for b in config.backends}
        self.frontends: list[FrontendRuntime] = []
        global_targets = config.global_.log
        for frontend in config.frontends:
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

    def stop_accepting(self) -> None:
        for frontend in self.frontends:
            frontend.stop_accepting()

    @property
    def active_sessions(self) -> int:
        return sum(f.current for f in self.frontends)
