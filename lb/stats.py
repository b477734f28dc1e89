"""Served sockets: the `stats socket` listener and the Prometheus endpoint.

Owns what an operator connects to while lb runs:

- **The stats socket** of `stats socket <path> mode 600 level admin` (management.txt 9.3),
  whose commands lb.runtime_api answers.
- **Prometheus** (HAProxy's `http-request use-service prometheus-exporter`,
  addons/promex): `GET /metrics` on the binds of a frontend that names the service; the page
  is rendered by lb.prometheus.

With `nbthread` > 1 (lb.workers), one worker, the lead, serves both; every answer covers
the whole process tree (lb.counters, lb.control).

Every served socket is handed in already bound (the master opens them; see lb.workers), or
opened here when lb runs without a master.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from typing import TYPE_CHECKING

from lb.config.model import StatsSocket
from lb.counters import merge_snapshots
from lb.prometheus import render_prometheus

if TYPE_CHECKING:
    from lb.process import Runtime

#: How long a non-interactive runtime API client may take to send its command.
COMMAND_TIMEOUT = 10.0


def open_stats_socket(config: StatsSocket) -> socket.socket:
    """Bind the unix socket of `stats socket <path> mode <octal>` (replacing a stale one)."""
    path = config.path
    if path.startswith("unix@"):
        path = path[len("unix@") :]
    if path.startswith("ipv4@") or (":" in path and not path.startswith("/")):
        host, _, port = path.removeprefix("ipv4@").rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host or "127.0.0.1", int(port)))
    else:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Created with the final mode: no window in which another user can connect.
        old_umask = os.umask(0o777 & ~(config.mode if config.mode is not None else 0o600))
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        if config.mode is not None:
            os.chmod(path, config.mode)
    sock.listen(64)
    sock.setblocking(False)
    return sock


class PrometheusEndpoint:
    """A minimal HTTP/1.1 responder: `GET /metrics` (or `/`) answers the exporter's page."""

    def __init__(self, runtime: Runtime, name: str) -> None:
        self.runtime = runtime
        self.name = name
        self.servers: list[asyncio.AbstractServer] = []

    async def start(self, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            server = await asyncio.start_server(self.handle, sock=sock)
            self.servers.append(server)

    def close(self) -> None:
        for server in self.servers:
            server.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), COMMAND_TIMEOUT)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                    return
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                parts = request_line.split()
                headers = head.decode("latin-1").lower()
                keep_alive = "connection: close" not in headers and request_line.endswith("1.1")
                if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
                    status, body = "405 Method Not Allowed", b"only GET\n"
                elif parts[1].split("?")[0] not in ("/metrics", "/"):
                    status, body = "404 Not Found", b"not found: try /metrics\n"
                else:
                    totals = merge_snapshots(await self.runtime.gather_counters())
                    status, body = "200 OK", render_prometheus(self.runtime, totals).encode()
                content_type = (
                    "text/plain; version=0.0.4" if status.startswith("200") else ("text/plain")
                )
                writer.write(
                    (
                        f"HTTP/1.1 {status}\r\ncache-control: no-cache\r\n"
                        f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
                        f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
                    ).encode()
                    + (body if parts and parts[0] != "HEAD" else b"")
                )
                await writer.drain()
                if not keep_alive:
                    return
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()
