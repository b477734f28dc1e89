"""The runtime API (`stats socket`): the socket, its commands and their answers.

`stats socket <path> mode 600 level admin` (management.txt 9.3): one command line per
connection (or `prompt` for an interactive session), commands separated by `;`, a payload
after `<<` ending with an empty line, each answer followed by an empty line, so
`echo "show stat" | socat - UNIX:/path/lb.sock` works as it does with HAProxy. `show stat`
prints HAProxy 2.6's CSV columns; server state changes go through the backend's balancer.
`open_stats_socket` binds the socket (the master does, before it forks; see lb.workers).

With `nbthread` > 1 (lb.workers), one worker, the lead, answers; every answer covers the
whole process tree: counters are every worker's (lb.counters), `show sess` lists every
worker's sessions, and each change (`set server`, `commit ssl cert`, `reload ssl`) is made
here and then relayed to every other worker and kept for the workers of the next reload
(lb.control).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lb import __version__
from lb.config.model import StatsSocket
from lb.control import CertRecord, apply_cert
from lb.counters import (
    CounterSnapshot,
    admin_state,
    backend_up,
    check_status,
    merge_snapshots,
    server_state,
)
from lb.pem import TLSFileError, bundle_from_pem, file_signature
from lb.tls import describe_certificate

if TYPE_CHECKING:
    from lb.process import Runtime
    from lb.server import BackendState, ServerState

logger = logging.getLogger(__name__)

#: How long a non-interactive runtime API client may take to send its command.
COMMAND_TIMEOUT = 10.0
#: A `set ssl cert` payload larger than this is refused.
MAX_PAYLOAD = 1024 * 1024
#: Idle timeout of an interactive (`prompt`) session, as HAProxy's `stats timeout` default.
PROMPT_TIMEOUT = 10.0

#: HAProxy 2.6 `show stat` columns (management.txt 9.1), in order.
STAT_COLUMNS: tuple[str, ...] = tuple(
    """
pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,
eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,
qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,
check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,
hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,
comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,
ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,
check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,
conn_rate,conn_rate_max,conn_tot,intercepted,dcon,dses,wrew,connect,reuse,
cache_lookups,cache_hits,srv_icur,src_ilim,qtime_max,ctime_max,rtime_max,ttime_max,
eint,idle_conn_cur,safe_conn_cur,used_conn_cur,need_conn_est,uweight,
agg_server_status,agg_server_check_status,agg_check_status,-,ssl_sess,
ssl_reused_sess,ssl_failed_handshake,h2_headers_rcvd,h2_data_rcvd,h2_settings_rcvd,
h2_rst_stream_rcvd,h2_goaway_rcvd,h2_detected_conn_protocol_errors,
h2_detected_strm_protocol_errors,h2_rst_stream_resp,h2_goaway_resp,h2_open_connections,
h2_backend_open_streams,h2_total_connections,h2_backend_total_streams,
h1_open_connections,h1_open_streams,h1_total_connections,h1_total_streams,h1_bytes_in,
h1_bytes_out,h1_spliced_bytes_in,h1_spliced_bytes_out
""".replace("\n", "").split(",")
)  # fmt: skip

#: Codes of `show servers state` srv_check_status (HCHK_STATUS_*).
CHECK_STATUS_CODES = {
    "UNK": 0, "INI": 1, "START": 2, "HANA": 3, "SOCKERR": 4, "L4OK": 5, "L4TOUT": 6,
    "L4CON": 7, "L6OK": 8, "L6TOUT": 9, "L6RSP": 10, "L7TOUT": 11, "L7RSP": 12, "L7OK": 13,
    "L7OKC": 14, "L7STS": 15, "PROCERR": 16, "PROCTOUT": 17, "PROCOK": 18,
}  # fmt: skip


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


class CommandError(Exception):
    """A runtime API command that cannot be done; the message is the answer."""


@dataclass(slots=True)
class CertificateTransaction:
    """`set ssl cert` staged a new PEM for a file; `commit ssl cert` makes it live."""

    path: str
    payload: bytes


HELP = """The following commands are valid at this level:
  help                                    : this message
  prompt                                  : toggle interactive mode with prompt
  quit                                    : disconnect
  show info                               : report information about the running process
  show stat                               : report counters for each proxy and server (CSV)
  show servers state [<backend>]          : dump volatile server information
  show sess                               : report the list of current sessions
  show activity                           : report accepted connections per worker
  show ssl cert [<certfile>]              : display the SSL certificates used in memory
  set ssl cert <certfile> <payload>       : replace a certificate file (then commit)
  commit ssl cert <certfile>              : commit a certificate file
  abort ssl cert <certfile>               : abort a transaction for a certificate file
  reload ssl [files]                      : re-read every crt, ca-file and crl-file now (lb)
  set server <bk>/<srv> state ready|drain|maint : change a server's state
  set server <bk>/<srv> weight <w>        : change a server's weight
  set weight <bk>/<srv> <w>               : change a server's weight
  get weight <bk>/<srv>                   : report a server's current weight
  disable server <bk>/<srv>               : put a server in maintenance
  enable server <bk>/<srv>                : take a server out of maintenance
"""

ADMIN_COMMANDS = ("set", "commit", "abort", "disable", "enable", "reload")


class RuntimeAPI:
    """The commands of `stats socket`, answered from one process's runtime objects."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.transactions: dict[str, CertificateTransaction] = {}
        self.servers: list[asyncio.AbstractServer] = []

    async def start(self, sockets: list[tuple[StatsSocket, socket.socket]]) -> None:
        for config, sock in sockets:

            async def handle(
                reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter,
                level: str = config.level,
            ) -> None:
                await self.session(reader, writer, level)

            if sock.family == socket.AF_UNIX:
                server = await asyncio.start_unix_server(handle, sock=sock, limit=MAX_PAYLOAD)
            else:
                server = await asyncio.start_server(handle, sock=sock, limit=MAX_PAYLOAD)
            self.servers.append(server)

    def close(self) -> None:
        for server in self.servers:
            server.close()

    async def session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, level: str
    ) -> None:
        interactive = False
        try:
            while True:
                timeout = PROMPT_TIMEOUT if interactive else COMMAND_TIMEOUT
                try:
                    raw = await asyncio.wait_for(reader.readline(), timeout)
                except (TimeoutError, ValueError, asyncio.LimitOverrunError):
                    return
                if not raw:
                    return
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                payload: bytes | None = None
                if line.rstrip().endswith("<<"):
                    line = line.rstrip()[:-2].rstrip()
                    payload = await self._read_payload(reader)
                answers: list[str] = []
                for command in (c.strip() for c in line.split(";")):
                    if not command:
                        continue
                    if command == "prompt":
                        interactive = not interactive
                        continue
                    if command == "quit":
                        writer.write("".join(answers).encode())
                        await writer.drain()
                        return
                    answers.append(await self.answer(command, payload, level))
                out = "".join(answers)
                if interactive:
                    out += "> "
                writer.write(out.encode())
                await writer.drain()
                if not interactive:
                    return
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()

    async def _read_payload(self, reader: asyncio.StreamReader) -> bytes:
        lines: list[bytes] = []
        size = 0
        while True:
            raw = await asyncio.wait_for(reader.readline(), COMMAND_TIMEOUT)
            if not raw or raw in (b"\n", b"\r\n"):
                return b"".join(lines)
            size += len(raw)
            if size > MAX_PAYLOAD:
                raise CommandError("payload too large")
            lines.append(raw)

    async def answer(self, command: str, payload: bytes | None, level: str) -> str:
        words = command.split()
        if words[0] in ADMIN_COMMANDS and level != "admin":
            return "Permission denied\n\n"
        try:
            text = await self.dispatch(words, payload)
        except CommandError as error:
            text = f"{error}\n"
        except Exception as error:  # an operator's command must never kill the worker
            logger.exception("runtime API command %r failed", command)
            text = f"Internal error: {error}\n"
        if text and not text.endswith("\n"):
            text += "\n"
        return text + "\n"

    async def dispatch(self, words: list[str], payload: bytes | None) -> str:
        match words:
            case ["help"]:
                return HELP
            case ["show", "info", *_]:
                return self.show_info(merge_snapshots(await self.runtime.gather_counters()))
            case ["show", "stat", *_]:
                return self.show_stat(merge_snapshots(await self.runtime.gather_counters()))
            case ["show", "activity", *_]:
                return self.show_activity(await self.runtime.gather_counters())
            case ["show", "servers", "state", *rest]:
                return self.show_servers_state(rest[0] if rest else None)
            case ["show", "sess", *_]:
                lines = await self.runtime.gather_sessions()
                return "".join(f"{line}\n" for line in lines)
            case ["show", "ssl", "cert", *rest]:
                return self.show_ssl_cert(rest[0] if rest else None)
            case ["set", "ssl", "cert", path]:
                return self.set_ssl_cert(path, payload)
            case ["commit", "ssl", "cert", path]:
                return self.commit_ssl_cert(path)
            case ["abort", "ssl", "cert", path]:
                if self.transactions.pop(path, None) is None:
                    raise CommandError("No ongoing transaction!")
                return f"Transaction aborted for certificate '{path}'!\n"
            case ["reload", "ssl", *_]:
                return self.runtime.reload_tls_everywhere()
            case ["set", "server", name, "state", state]:
                return self.set_server_state(name, state)
            case ["set", "server", name, "weight", weight]:
                return self.set_server_weight(name, weight)
            case ["set", "weight", name, weight]:
                return self.set_server_weight(name, weight)
            case ["get", "weight", name]:
                _backend, server = self.find_server(name)
                return f"{server.weight} (initial {server.config.weight})\n"
            case ["disable", "server", name]:
                return self.set_server_state(name, "maint")
            case ["enable", "server", name]:
                return self.set_server_state(name, "ready")
        raise CommandError(
            "Unknown command. Please enter one of the following commands only :\n" + HELP
        )

    # -- servers -------------------------------------------------------------------------------

    def find_server(self, name: str) -> tuple[BackendState, ServerState]:
        backend_name, _, server_name = name.partition("/")
        if not server_name:
            raise CommandError("Require 'backend/server'.")
        backend = self.runtime.backends.get(backend_name)
        if backend is None:
            raise CommandError("No such backend.")
        for server in backend.servers:
            if server.name == server_name:
                return backend, server
        raise CommandError("No such server.")

    def set_server_state(self, name: str, state: str) -> str:
        if state not in ("ready", "drain", "maint"):
            raise CommandError("'set server <srv> state' expects 'ready', 'drain' and 'maint'.")
        backend, server = self.find_server(name)
        before = server_state(server)
        backend.set_admin_state(server, state)
        self.runtime.publish_server(backend, server)
        after = server_state(server)
        if before != after:
            logging.getLogger("lb.server").warning(
                "Server %s/%s is %s (runtime API, was %s).",
                backend.name,
                server.name,
                after,
                before,
            )
        return ""

    def set_server_weight(self, name: str, value: str) -> str:
        backend, server = self.find_server(name)
        text = value.rstrip("%")
        if not text.isdigit():
            raise CommandError("Require <weight> or <weight%>.")
        weight = int(text)
        if value.endswith("%"):
            weight = server.config.weight * weight // 100
        if not 0 <= weight <= 256:
            raise CommandError("Weight must be between 0 and 256.")
        backend.set_weight(server, weight)
        self.runtime.publish_server(backend, server)
        return ""

    def show_servers_state(self, only: str | None) -> str:
        columns = (
            "be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
            "srv_iweight srv_time_since_last_change srv_check_status srv_check_result "
            "srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id "
            "srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr "
            "srv_agent_addr srv_agent_port"
        )
        lines = ["1", f"# {columns}"]
        backend_ids = self.runtime.proxy_ids()
        for backend in self.runtime.backends.values():
            if only is not None and backend.name != only:
                continue
            for index, server in enumerate(backend.servers, start=1):
                admin = {"ready": 0, "maint": 0x01, "drain": 0x08}[admin_state(server)]
                status = check_status(server)
                check_code = CHECK_STATUS_CODES.get(status or "", 0) if status else 0
                config = server.config
                lines.append(
                    " ".join(
                        str(v)
                        for v in (
                            backend_ids.get(("backend", backend.name), 0),
                            backend.name,
                            index,
                            server.name,
                            server.host,
                            2 if server.up else 0,
                            admin,
                            server.weight,
                            config.weight,
                            int(time.time() - self.runtime.counters.started),
                            check_code,
                            0,
                            config.rise if server.up else 0,
                            6 if config.check else 0,
                            0,
                            0,
                            0,
                            "-",
                            server.port or 0,
                            "-",
                            0,
                            config.check_port or 0,
                            config.check_addr or "-",
                            "-",
                            0,
                        )
                    )
                )
        return "\n".join(lines) + "\n"

    # -- statistics ------------------------------------------------------------------------------

    def show_info(self, totals: CounterSnapshot) -> str:
        runtime = self.runtime
        process = totals.process
        global_ = runtime.config.global_
        started = runtime.counters.started
        uptime = int(time.time() - started)
        days, rest = divmod(uptime, 86400)
        hours, rest = divmod(rest, 3600)
        minutes, seconds = divmod(rest, 60)
        fields = [
            ("Name", "lb"),
            ("Version", __version__),
            ("Nbthread", runtime.config.global_.nbthread or 1),
            ("Nbproc", 1),
            ("Process_num", runtime.worker_number),
            ("Pid", os.getpid()),
            ("Uptime", f"{days}d {hours}h{minutes:02d}m{seconds:02d}s"),
            ("Uptime_sec", uptime),
            # Every worker's share together (HAProxy's process is all its threads); Maxsock
            # and Ulimit-n are one worker's (lb.limits).
            ("Maxconn", runtime.files.total_maxconn),
            ("Hard_maxconn", runtime.files.total_maxconn),
            ("Maxsock", runtime.files.fixed + 2 * runtime.files.worker_maxconn),
            ("Ulimit-n", runtime.files.limit),
            ("CurrConns", process["current"]),
            ("CumConns", process["total"]),
            ("CurrSslConns", process["ssl_current"]),
            ("CumSslConns", process["handshakes"]),
            ("SslFrontendHandshakeFailures", process["handshake_failures"]),
            # Every connection lb accepts is a session: one count for ConnRate and SessRate.
            ("ConnRate", process["conn_rate"]),
            ("ConnRateLimit", global_.maxconnrate or 0),
            ("MaxConnRate", process["conn_rate_max"]),
            ("SessRate", process["conn_rate"]),
            ("SessRateLimit", global_.maxsessrate or 0),
            ("MaxSessRate", process["conn_rate_max"]),
            ("SslRate", process["ssl_rate"]),
            ("SslRateLimit", global_.maxsslrate or 0),
            ("MaxSslRate", process["ssl_rate_max"]),
            ("Stopping", process["stopping"]),
            ("Listeners", process["listeners"]),
            ("DroppedLogs", process["dropped_logs"]),
            ("node", socket.gethostname()),
            ("Start_time_sec", int(started)),
        ]
        return "".join(f"{name}: {value}\n" for name, value in fields)

    def show_activity(self, snapshots: list[CounterSnapshot]) -> str:
        """HAProxy's `show activity` rows that lb has, one column per worker (HAProxy's
        columns are threads): `accepted: total [ worker1 worker2 ... ]`."""
        workers = sorted(snapshots, key=lambda snapshot: snapshot.worker)
        now = time.time()

        def row(name: str, values: list[int]) -> str:
            return f"{name}: {sum(values)} [ {' '.join(str(v) for v in values)} ]\n"

        return (
            f"thread_id: {self.runtime.worker_number} (1..{len(workers)})\n"
            f"date_now: {now:.6f}\n"
            f"uptime_now: {now - self.runtime.counters.started:.6f}\n"
            f"pid: {' '.join(str(s.pid) for s in workers)}\n"
            + row("accepted", [s.process["total"] for s in workers])
            + row("curr_conns", [s.process["current"] for s in workers])
            # lb's own: accepts and server connects that failed for want of files or
            # memory (lb.frontend.ProcessLimit); sizing by lb.limits keeps it at 0.
            + row("resource_errors", [s.process["resource_errors"] for s in workers])
            # lb's own: listener pauses at maxconnrate/maxsessrate/maxsslrate/rate-limit.
            + row("rate_paused", [s.process["rate_pauses"] for s in workers])
        )

    def show_stat(self, totals: CounterSnapshot) -> str:
        runtime = self.runtime
        ids = runtime.proxy_ids()
        pid = runtime.worker_number
        rows: list[dict[str, object]] = []
        frontends = {f.name: f for f in runtime.frontends}
        for kind, name in sorted(ids, key=lambda key: ids[key]):
            if kind == "frontend" and name in frontends:
                f = frontends[name]
                fe = totals.frontend(name)
                rows.append(
                    {
                        "pxname": name,
                        "svname": "FRONTEND",
                        "scur": fe["current"],
                        "smax": fe["max_sessions"],
                        "slim": f.maxconn or runtime.config.global_.maxconn or "",
                        "stot": fe["total"],
                        "bin": fe["bytes_in"],
                        "bout": fe["bytes_out"],
                        "dreq": 0,
                        "dresp": 0,
                        "ereq": 0,
                        "status": "OPEN" if f.accepting_enabled else "STOP",
                        "pid": pid,
                        "iid": ids[(kind, name)],
                        "sid": 0,
                        "type": 0,
                        "mode": "tcp",
                        "rate": fe["rate"],
                        "rate_lim": f.config.rate_limit_sessions or "",
                        "rate_max": fe["rate_max"],
                        "conn_rate": fe["rate"],
                        "conn_rate_max": fe["rate_max"],
                        "conn_tot": fe["connections_total"],
                        "ssl_sess": fe["handshakes"] if f.has_ssl else "",
                        "ssl_failed_handshake": (fe["handshake_failures"] if f.has_ssl else ""),
                    }
                )
            elif kind == "backend" and name in runtime.backends:
                backend = runtime.backends[name]
                total = totals.backend(name)
                for index, server in enumerate(backend.servers, start=1):
                    per = totals.server(name, server.name)
                    status = check_status(server)
                    state = server_state(server)
                    rows.append(
                        {
                            "pxname": name,
                            "svname": server.name,
                            "qcur": per["queue"],
                            "qmax": 0,
                            "scur": per["current"],
                            "smax": per["max_sessions"],
                            "slim": server.config.maxconn or "",
                            "stot": per["sessions_total"],
                            "bin": per["bytes_in"],
                            "bout": per["bytes_out"],
                            "dresp": 0,
                            "econ": per["failed"],
                            "eresp": 0,
                            "wretr": 0,
                            "wredis": 0,
                            "status": state if server.config.check or state != "UP" else "no check",
                            "weight": server.effective_weight,
                            "act": 0 if server.config.backup else 1,
                            "bck": 1 if server.config.backup else 0,
                            "pid": pid,
                            "iid": ids[(kind, name)],
                            "sid": index,
                            "lbtot": per["lbtot"],
                            "type": 2,
                            "check_status": status or "",
                            "check_rise": server.config.rise if server.config.check else "",
                            "check_fall": server.config.fall if server.config.check else "",
                            "addr": f"{server.host}:{server.port or ''}",
                            "mode": "tcp",
                            "uweight": server.weight,
                        }
                    )
                rows.append(
                    {
                        "pxname": name,
                        "svname": "BACKEND",
                        "qcur": total["queue"],
                        "qmax": 0,
                        "scur": total["current"],
                        "smax": total["max_sessions"],
                        "slim": backend.config.fullconn or "",
                        "stot": total["sessions_total"],
                        "bin": total["bytes_in"],
                        "bout": total["bytes_out"],
                        "dreq": 0,
                        "dresp": 0,
                        "econ": total["failed"],
                        "eresp": 0,
                        "wretr": 0,
                        "wredis": 0,
                        "status": "UP" if backend_up(backend) else "DOWN",
                        "weight": sum(s.effective_weight for s in backend.servers if s.usable),
                        "act": sum(1 for s in backend.servers if s.usable and not s.config.backup),
                        "bck": sum(1 for s in backend.servers if s.usable and s.config.backup),
                        "pid": pid,
                        "iid": ids[(kind, name)],
                        "sid": 0,
                        "lbtot": total["lbtot"],
                        "type": 1,
                        "mode": "tcp",
                        "algo": backend.config.balance,
                    }
                )
        lines = ["# " + ",".join(STAT_COLUMNS) + ","]
        for row in rows:
            lines.append(",".join(_csv(row.get(column, "")) for column in STAT_COLUMNS) + ",")
        return "\n".join(lines) + "\n"

    # -- certificates ------------------------------------------------------------------------

    def show_ssl_cert(self, path: str | None) -> str:
        contexts = self.runtime.bind_contexts()
        if path is None:
            lines = ["# transaction"]
            lines.extend(f"*{p}" for p in self.transactions)
            lines.append("# filename")
            seen: set[str] = set()
            for context in contexts:
                for bundle in context.bundles:
                    name = str(bundle.path)
                    if name not in seen:
                        seen.add(name)
                        lines.append(name)
            return "\n".join(lines) + "\n"
        transaction = self.transactions.get(path.lstrip("*"))
        if path.startswith("*"):
            if transaction is None:
                raise CommandError("No ongoing transaction!")
            bundle = bundle_from_pem(transaction.payload, transaction.path)
            return f"Filename: *{transaction.path}\nStatus: Uncommitted\n" + describe_certificate(
                bundle
            )
        for context in contexts:
            for bundle in context.bundles:
                if str(bundle.path) == path:
                    return f"Filename: {path}\nStatus: Used\n" + describe_certificate(bundle)
        raise CommandError(
            "Can't display the certificate: Not found or the certificate is a bundle!"
        )

    def set_ssl_cert(self, path: str, payload: bytes | None) -> str:
        if not payload:
            raise CommandError("'set ssl cert' expects a filename and a certificate as a payload")
        if not any(
            str(bundle.path) == path
            for context in self.runtime.bind_contexts()
            for bundle in context.bundles
        ):
            unknown = "Can't replace a certificate which is not referenced by the configuration!"
            raise CommandError(f"{unknown} ({path})")
        try:
            bundle_from_pem(payload, path)
        except TLSFileError as error:
            raise CommandError(f"Can't update {path}: {error.reason}") from None
        self.transactions[path] = CertificateTransaction(path, payload)
        return f"Transaction created for certificate {path}!\n"

    def commit_ssl_cert(self, path: str) -> str:
        transaction = self.transactions.pop(path, None)
        if transaction is None:
            raise CommandError("No ongoing transaction!")
        record = CertRecord(path, transaction.payload, file_signature([Path(path)]))
        bundle_from_pem(record.pem, path)  # validated by `set ssl cert`; raises if not
        updated = apply_cert(self.runtime.bind_contexts(), record, at_start=False)
        self.runtime.publish_cert(record)
        logger.warning("runtime API: certificate %s replaced on %d bind line(s)", path, updated)
        return f"Committing {path}\nSuccess!\n"


def session_lines(runtime: Runtime) -> list[str]:
    """`show sess`: one line per session of this process. `proto` is the listener's, as
    HAProxy's (a bind on an IPv6 address is tcpv6, also for IPv4-mapped clients)."""
    lines = []
    now = runtime.loop.time()
    for frontend in runtime.frontends:
        for client in list(frontend.sessions):
            server = client.server
            proto = "tcpv6" if frontend.binds[client.bind_index].family == "ipv6" else "tcpv4"
            lines.append(
                f"0x{id(client):x}: proto={proto} src={client.peer[0]}:{client.peer[1]} "
                f"fe={frontend.name} be={frontend.backend.name} "
                f"srv={server.name if server is not None else '<none>'} "
                f"age={int(now - client.accept_time)}s "
                f"ssl={'1' if client.tls is not None else '0'} "
                f"cn={(client.ssl_info.cn if client.ssl_info else None) or '-'} "
                f"bytes_in={client.bytes_in} bytes_out={client.bytes_out} "
                f"pid={os.getpid()}"
            )
    return lines


def _csv(value: object) -> str:
    text = str(value)
    if "," in text or '"' in text:
        return '"' + text.replace('"', '""') + '"'
    return text
