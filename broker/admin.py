"""The node's admin HTTP endpoint (JSON) and Prometheus metrics.

HTTP/1.1 parsed by h11 (sans-IO, the style anchor of STYLE.md), one request per connection
(``Connection: close``), served with asyncio streams (admin traffic is not the hot path,
STYLE.md rule 6):

- ``/api/clients``: connected clients: client id, the connection id (the balancer's %ID
  from the PROXY header, ``connection_id_source`` "proxy", or the node's own, "broker"),
  username, the real address (from the PROXY header when a balancer sent one), the socket
  address, certificate CN, protocol version, node, listener, keepalive, connected_at (UTC,
  ISO 8601), subscriptions, queues;
- ``/api/stats``: the node's counters plus gauges (connections, sessions, retained, ...);
- ``/api/listeners``: each MQTT listener's figures (clients, pending sockets, max_conn_rate,
  the accept rate under it, pauses for it, failed accepts), also in /metrics as
  ``broker_listener_*{listener="tcp:default"}``;
- ``/api/cluster``: whatever the cluster hook reports (``status()`` when it has one);
- ``/metrics``: the same numbers in Prometheus text format, and each cluster peer's link
  counters and gauges as ``broker_cluster_peer_*{peer="NAME"}``, and with
  ``partition_handling = "pause_minority"`` whether the node is paused
  (``broker_cluster_partition_*``, broker.partition);
- ``POST /api/authz/reload``: reload the authorization policy file now (seed 003); answers
  {changed, error, rules, disconnected}; 404 when the node has no ``[authorization]``.
- ``POST /api/cluster/peers/NAME/disconnect`` and ``.../connect``: cut the cluster link to
  one peer and keep it down, or let it come back (issue 12: operators, and the chaos test).
- ``POST /api/cluster/peers/NAME/forget``: forget a peer that is down for good (EMQX's
  ``cluster force-leave``; broker.cluster.Cluster.forget); 409 while it is up.
- ``POST /api/evacuation?rate=N&wait_takeover=S&session_rate=M&migrate_to=NODE,...``: move
  this node's clients to the other nodes, N per second (default 500), listeners closed, then
  wait at most S seconds (default 60) for their sessions to follow them, then migrate the
  sessions still here to the other nodes (or those named), M per second (default 500)
  (broker.evacuation); ``GET`` tells how far it is, ``DELETE`` ends it (the listeners open
  again).

What it shows (client addresses and CNs) and what it does (a policy reload disconnects
clients) is not for everyone: with ``token_file`` (``Authorization: Bearer TOKEN``) or
``password_file`` (``Authorization: Basic``, mosquitto_passwd's format, broker.authentication)
every request must authenticate (401 otherwise), the files readable by their owner only
(mode 600, checked at start). A bind that is not loopback-only needs one of them
(broker.config refuses it without). A request head over ``MAX_REQUEST_HEAD`` bytes gets 431,
a body over ``MAX_REQUEST_BODY`` 413, at most ``MAX_CONNECTIONS`` are served at once (503
beyond), and each has ``REQUEST_TIMEOUT`` seconds. Refusals are logged, rate limited.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import http
import json
import logging
import urllib.parse
from collections.abc import Callable
from typing import Any

import h11

from broker.authentication import PasswordFile, PasswordFileError
from broker.config import AdminConfig, ConfigError, is_loopback_host
from broker.connection import ClientConnection
from broker.core import Broker
from broker.evacuation import MAX_RATE, MAX_WAIT_TAKEOVER
from broker.stats import render_prometheus, render_prometheus_rows
from broker.tls_listener import address_text
from lb import http11, pem
from lb.ratelimit import SuppressedLines

__all__ = ["AdminServer", "client_record", "stats_record"]

logger = logging.getLogger(__name__)

# Requests are tiny; anything bigger is not an admin client.
MAX_REQUEST_HEAD = 8192
MAX_REQUEST_BODY = 4096
MAX_CONNECTIONS = 64
REQUEST_TIMEOUT = 10.0
#: A bearer token shorter than this is guessable.
MIN_TOKEN_LENGTH = 16
REALM = "broker admin"
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
        "queued_bytes": 0 if session is None else session.queued_bytes,
        # QoS 1/2 messages this client lost to max_queued_messages/bytes (issue 14 item 2).
        "dropped": 0 if session is None else session.dropped,
    }


def stats_record(broker: Broker) -> dict[str, int]:
    values = broker.counters.as_dict()
    values["connections_current"] = len(broker.connections)
    values["clients_connected_current"] = sum(1 for _ in broker.connected_clients())
    values["sessions_current"] = len(broker.sessions)
    values["subscriptions_current"] = len(broker.subscriptions)
    values["retained_messages_current"] = len(broker.retained)
    values["pending_wills_current"] = len(broker.pending_wills)
    values["queued_bytes_current"] = broker.budget.bytes
    return values


class AdminServer:
    def __init__(
        self,
        broker: Broker,
        host: str,
        port: int,
        cluster_status: Callable[[], Any] | None = None,
        config: AdminConfig | None = None,
        origin: str = "<config>",
    ) -> None:
        self.broker = broker
        self.host = host
        self.port = port
        self.cluster_status = cluster_status
        self.config = config or AdminConfig(host, port)
        self.origin = origin
        # Set by the server when an [authorization] section exists (POST /api/authz/reload).
        self.authorization_reload: Callable[[], dict[str, Any]] | None = None
        # Set by the server: each listener's figures (broker.listener.Listener.status).
        self.listener_status: Callable[[], list[dict[str, Any]]] | None = None
        # Set by the server on a clustered node: command -> function(peer name).
        self.cluster_commands: dict[str, Callable[[str], dict[str, Any]]] = {}
        # Set by the server: /api/evacuation (method, the POST's parameters given: rate,
        # wait_takeover, session_rate as floats, migrate_to as a list of node names) ->
        # status; ValueError (its text the answer's error) for a value it refuses.
        self.evacuation: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None
        self.server: asyncio.Server | None = None
        self.token: bytes | None = None
        self.passwords: PasswordFile | None = None
        self.connections = 0
        self.refusals: SuppressedLines | None = None

    async def start(self) -> None:
        self._load_credentials()
        loop = asyncio.get_running_loop()
        self.refusals = SuppressedLines(
            logger.warning, "admin API", "refused requests", loop.time, loop.call_later
        )
        self.server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = int(self.server.sockets[0].getsockname()[1])
        methods = [
            name
            for name, present in (("bearer token", self.token), ("basic", self.passwords))
            if present is not None
        ]
        if not methods and not is_loopback_host(self.host):
            logger.warning(
                "admin API on http://%s:%d/ reachable from the network WITHOUT authentication "
                "([admin] anonymous = true): anyone who reaches it sees client addresses and "
                "certificate names and can reload the authorization policy",
                self.host,
                self.port,
            )
        logger.info(
            "admin API on http://%s:%d/ (%s)",
            self.host,
            self.port,
            "authentication: " + " or ".join(methods) if methods else "no authentication",
        )

    def _load_credentials(self) -> None:
        """The token and password files, which only their owner may read (mode 600)."""
        config = self.config
        for key, path in (
            ("token_file", config.token_file),
            ("password_file", config.password_file),
        ):
            if path is None:
                continue
            try:
                problem = pem.check_key_permissions(path)
            except OSError as error:
                raise ConfigError(
                    self.origin, f"admin.{key}", f"{path}: {error.strerror}"
                ) from None
            if problem is not None:
                raise ConfigError(
                    self.origin, f"admin.{key}", problem.replace("private key", "credentials file")
                )
        if config.token_file is not None:
            token = config.token_file.read_text(encoding="utf-8").strip()
            if len(token) < MIN_TOKEN_LENGTH:
                raise ConfigError(
                    self.origin,
                    "admin.token_file",
                    f"{config.token_file}: the token must have at least {MIN_TOKEN_LENGTH} "
                    "characters (e.g. python3 -c 'import secrets; print(secrets.token_urlsafe())')",
                )
            self.token = token.encode()
        if config.password_file is not None:
            try:
                self.passwords = PasswordFile(config.password_file)
            except PasswordFileError as error:
                raise ConfigError(self.origin, "admin.password_file", str(error)) from None

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        if self.refusals is not None:
            self.refusals.flush()

    def _route(self, method: str, path: str, query: str = "") -> tuple[int, str, bytes]:
        broker = self.broker
        if method == "POST" and path == "/api/authz/reload":
            if self.authorization_reload is None:
                return 404, "application/json", b'{"error": "no [authorization] on this node"}'
            return (
                200,
                "application/json",
                json.dumps(self.authorization_reload(), indent=1).encode(),
            )
        if method == "POST" and path.startswith("/api/cluster/peers/"):
            return self._cluster_command(path)
        if path == "/api/evacuation" and self.evacuation is not None:
            return self._evacuation_command(method, query)
        if method not in ("GET", "HEAD"):
            return 405, "application/json", b'{"error": "GET only"}'
        if path == "/api/clients":
            body: Any = [client_record(broker, c) for c in broker.connected_clients()]
        elif path == "/api/stats":
            body = {"node": broker.node_name, **stats_record(broker)}
        elif path == "/api/cluster":
            body = {"node": broker.node_name, "members": []}
            if self.cluster_status is not None:
                body = self.cluster_status()
        elif path == "/api/listeners":
            body = {"node": broker.node_name, "listeners": self._listeners()}
        elif path == "/metrics":
            text = render_prometheus("broker", stats_record(broker), {"node": broker.node_name})
            text += render_prometheus_rows(
                "broker_listener",
                [
                    (
                        {"node": broker.node_name, "listener": record["listener"]},
                        # Figures only; the limits (not counters or gauges) are in the JSON.
                        {
                            name: value
                            for name, value in record.items()
                            if name not in ("listener", "bind", "max_connections", "max_conn_rate")
                        },
                    )
                    for record in self._listeners()
                ],
            )
            if self.cluster_status is not None:
                status = self.cluster_status()
                text += render_prometheus_rows(
                    "broker_cluster_peer", _peer_rows(broker.node_name, status)
                )
                text += render_prometheus_rows(
                    "broker_cluster_partition", _partition_rows(broker.node_name, status)
                )
            return 200, "text/plain; version=0.0.4", text.encode()
        else:
            return 404, "application/json", b'{"error": "not found"}'
        return 200, "application/json", json.dumps(body, indent=1).encode()

    def _listeners(self) -> list[dict[str, Any]]:
        return [] if self.listener_status is None else self.listener_status()

    def _authenticated(self, headers: http11.Headers) -> bool:
        if self.token is None and self.passwords is None:
            return True
        value = http11.header(headers, b"authorization")
        if value is None:
            return False
        scheme, _, credentials = value.strip().partition(b" ")
        if scheme.lower() == b"bearer" and self.token is not None:
            return hmac.compare_digest(credentials.strip(), self.token)
        basic = http11.basic_credentials(headers)
        if basic is not None and self.passwords is not None:
            return self.passwords.check(*basic)
        return False

    def _challenge(self) -> list[tuple[str, str]]:
        headers = []
        if self.token is not None:
            headers.append(("www-authenticate", f'Bearer realm="{REALM}"'))
        if self.passwords is not None:
            headers.append(("www-authenticate", f'Basic realm="{REALM}", charset="UTF-8"'))
        return headers

    def _refused(self, peer: tuple[str, int], what: str) -> None:
        if self.refusals is not None:
            self.refusals.emit(f"admin API: {what} from {address_text(peer)}")

    def _cluster_command(self, path: str) -> tuple[int, str, bytes]:
        pieces = path.split("?", 1)[0].split("/")
        # "", "api", "cluster", "peers", NAME, COMMAND
        command = self.cluster_commands.get(pieces[5]) if len(pieces) == 6 else None
        if command is None:
            return 404, "application/json", b'{"error": "not found"}'
        try:
            return 200, "application/json", json.dumps(command(pieces[4])).encode()
        except KeyError:
            return 404, "application/json", b'{"error": "no such peer"}'
        except ValueError as error:
            return _error(409, str(error))

    def _evacuation_command(self, method: str, query: str) -> tuple[int, str, bytes]:
        assert self.evacuation is not None
        if method not in ("GET", "HEAD", "POST", "DELETE"):
            return 405, "application/json", b'{"error": "GET, POST or DELETE"}'
        fields = urllib.parse.parse_qs(query) if method == "POST" else {}
        values: dict[str, Any] = {}
        bounds = {
            "rate": (False, MAX_RATE, "clients per second, more than 0"),
            "wait_takeover": (True, MAX_WAIT_TAKEOVER, "seconds, 0"),
            "session_rate": (False, MAX_RATE, "sessions per second, more than 0"),
        }
        for name, (zero, highest, words) in bounds.items():
            if name not in fields:
                continue
            try:
                value = float(fields[name][-1])
            except ValueError:
                value = -1.0
            above_lowest = value >= 0 if zero else value > 0
            if not above_lowest or value > highest:
                return _error(400, f"{name}: {words} to {highest:g}")
            values[name] = value
        if "migrate_to" in fields:
            values["migrate_to"] = [
                name.strip() for name in fields["migrate_to"][-1].split(",") if name.strip()
            ]
        try:
            body = self.evacuation(method, values)
        except ValueError as error:
            return _error(400, str(error))
        return 200, "application/json", json.dumps(body, indent=1).encode()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = (str(peername[0]), int(peername[1])) if peername else ("?", 0)
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self.connections += 1
        try:
            if self.connections > MAX_CONNECTIONS:
                self._refused(peer, f"503, {MAX_CONNECTIONS} connections served already")
                await self._respond(writer, connection, 503, b'{"error": "busy"}')
                return
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    request = await http11.read_request(
                        reader, connection, MAX_REQUEST_HEAD, MAX_REQUEST_BODY
                    )
            except h11.RemoteProtocolError as error:
                status = error.error_status_hint
                self._refused(peer, f"{status} {http.HTTPStatus(status).phrase}: {error}")
                await http11.respond_error(writer, connection, error)
                return
            if request is None:
                return
            target, _, query = request.target.decode("ascii", "replace").partition("?")
            method = request.method.decode("ascii", "replace")
            if not self._authenticated(request.headers):
                self._refused(peer, f"401 for {method} {target}")
                body = b'{"error": "authentication required"}'
                await self._respond(writer, connection, 401, body, self._challenge())
                return
            status, content_type, body = self._route(method, target, query)
            await http11.respond(
                writer,
                connection,
                status,
                content_type,
                body,
                (("connection", "close"),),
                send_body=method != "HEAD",
            )
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self.connections -= 1
            writer.close()

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        connection: h11.Connection,
        status: int,
        body: bytes,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        await http11.respond(
            writer,
            connection,
            status,
            "application/json",
            body,
            [*(headers or []), ("connection", "close")],
        )


def _peer_rows(
    node: str, status: dict[str, Any]
) -> list[tuple[dict[str, str], dict[str, int | None]]]:
    """/metrics' ``broker_cluster_peer_*``: each peer's link counters (/api/cluster's members)
    and gauges: up, forgotten, what its outbox and send queue hold, its routes."""
    rows: list[tuple[dict[str, str], dict[str, int | None]]] = []
    for member in status.get("members", []):
        if member.get("state") == "self":
            continue
        values: dict[str, int | None] = {
            "up_current": int(member["state"] == "up"),
            "forgotten_current": int(bool(member.get("forgotten"))),
            "outbox_frames_current": member["outbox_frames"],
            "outbox_bytes_current": member["outbox_bytes"],
            "send_queue_bytes_current": member["send_queue_bytes"],
            "remote_filters_current": member["remote_filters"],
            "publishers_paused_current": member["publishers_paused_current"],
        }
        values.update(member["counters"])
        rows.append(({"node": node, "peer": member["name"]}, values))
    return rows


def _partition_rows(
    node: str, status: dict[str, Any]
) -> list[tuple[dict[str, str], dict[str, int | None]]]:
    """/metrics' ``broker_cluster_partition_*`` with pause_minority (broker.partition):
    whether the node is paused, how often it was, the clients a pause closed."""
    partition = status.get("partition") or {}
    if "paused" not in partition:
        return []
    values: dict[str, int | None] = {
        "paused_current": int(partition["paused"]),
        "pauses": partition["pauses"],
        "clients_closed": partition["clients_closed"],
    }
    return [({"node": node}, values)]


def _error(status: int, text: str) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps({"error": text}).encode()
