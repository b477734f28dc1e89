"""The node's admin HTTP endpoint (JSON) and Prometheus metrics.

GET only, HTTP/1.1 with ``Connection: close``, served with asyncio streams (admin traffic is
not the hot path, STYLE.md rule 6):

- ``/api/clients``: connected clients: client id, the connection id (the balancer's %ID
  from the PROXY header, ``connection_id_source`` "proxy", or the node's own, "broker"),
  username, the real address (from the PROXY header when a balancer sent one), the socket
  address, certificate CN, protocol version, node, listener, keepalive, connected_at (UTC,
  ISO 8601), subscriptions, queues;
- ``/api/stats``: the node's counters plus gauges (connections, sessions, retained, ...);
- ``/api/cluster``: whatever the cluster hook reports (``status()`` when it has one);
- ``/metrics``: the same numbers in Prometheus text format;
- ``POST /api/authz/reload``: reload the authorization policy file now (seed 003); answers
  {changed, error, rules, disconnected}; 404 when the node has no ``[authorization]``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Callable
from typing import Any

from broker.connection import ClientConnection
from broker.core import Broker
from broker.stats import render_prometheus

__all__ = ["AdminServer", "client_record", "stats_record"]

logger = logging.getLogger(__name__)

# Requests are tiny; anything bigger is not an admin client.
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 10.0
PROTOCOL_NAMES = {3: "3.1", 4: "3.1.1", 5: "5.0"}


def client_record(broker: Broker, connection: ClientConnection) -> dict[str, Any]:
    identity = connection.identity
    session = connection.session
    wall_now = broker.wall_clock()
    connected_at = wall_now - (broker.clock() - connection.connected_at)
    return {
        "client_id": connection.client_id,
        "connection_id": identity.connection_id,
        "connection_id_source": identity.connection_id_source,
        "username": connection.username,
        "address": connection.address_text,
        "ip": identity.address[0],
        "port": identity.address[1],
        "socket_address": f"{identity.socket_address[0]}:{identity.socket_address[1]}",
        "via_proxy": identity.via_proxy,
        "certificate_cn": identity.certificate_cn,
        "certificate_verified": identity.certificate_verified,
        "tls_version": identity.tls_version,
        "protocol_version": PROTOCOL_NAMES.get(connection.protocol_level),
        "node": broker.node_name,
        "listener": identity.listener,
        "keepalive": connection.keep_alive,
        "clean_start": connection.clean_start,
        "connected_at": dt.datetime.fromtimestamp(connected_at, dt.UTC).isoformat(),
        "subscriptions": 0 if session is None else len(session.subscriptions),
        "inflight": 0 if session is None else len(session.inflight),
        "queued": 0 if session is None else len(session.queue),
    }


def stats_record(broker: Broker) -> dict[str, int]:
    values = broker.counters.as_dict()
    values["connections_current"] = len(broker.connections)
    values["clients_connected_current"] = sum(1 for _ in broker.connected_clients())
    values["sessions_current"] = len(broker.sessions)
    values["subscriptions_current"] = len(broker.subscriptions)
    values["retained_messages_current"] = len(broker.retained)
    values["pending_wills_current"] = len(broker.pending_wills)
    return values


class AdminServer:
    def __init__(
        self,
        broker: Broker,
        host: str,
        port: int,
        cluster_status: Callable[[], Any] | None = None,
    ) -> None:
        self.broker = broker
        self.host = host
        self.port = port
        self.cluster_status = cluster_status
        # Set by the server when an [authorization] section exists (POST /api/authz/reload).
        self.authorization_reload: Callable[[], dict[str, Any]] | None = None
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = int(self.server.sockets[0].getsockname()[1])
        logger.info("admin API on http://%s:%d/", self.host, self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def _route(self, path: str) -> tuple[int, str, bytes]:
        broker = self.broker
        if path == "/api/clients":
            body: Any = [client_record(broker, c) for c in broker.connected_clients()]
        elif path == "/api/stats":
            body = {"node": broker.node_name, **stats_record(broker)}
        elif path == "/api/cluster":
            body = {"node": broker.node_name, "members": []}
            if self.cluster_status is not None:
                body = self.cluster_status()
        elif path == "/metrics":
            text = render_prometheus("broker", stats_record(broker), {"node": broker.node_name})
            return 200, "text/plain; version=0.0.4", text.encode()
        else:
            return 404, "application/json", b'{"error": "not found"}'
        return 200, "application/json", json.dumps(body, indent=1).encode()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_REQUEST_HEAD:
                raise ValueError("request head too large")
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            if len(parts) != 3:
                status, content_type, body = 400, "application/json", b'{"error": "bad request"}'
            elif parts[0] == "POST" and parts[1].split("?", 1)[0] == "/api/authz/reload":
                if self.authorization_reload is None:
                    status, content_type = 404, "application/json"
                    body = b'{"error": "no [authorization] on this node"}'
                else:
                    status, content_type = 200, "application/json"
                    body = json.dumps(self.authorization_reload(), indent=1).encode()
            elif parts[0] != "GET":
                status, content_type, body = 405, "application/json", b'{"error": "GET only"}'
            else:
                status, content_type, body = self._route(parts[1].split("?", 1)[0])
            reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
            writer.write(
                f"HTTP/1.1 {status} {reason[status]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except ConnectionError:
            pass
        finally:
            writer.close()
