"""The master process and its workers: seamless reload, soft stop, hard stop.

As HAProxy's master-worker mode (management.txt 4.4): the master parses the configuration,
opens every listening socket (frontend binds, the Prometheus binds, `stats socket`) and
forks `nbthread` workers (default 1) that inherit them. Each worker has its own socket for
every traffic bind, all of them bound with SO_REUSEPORT, so the kernel spreads connections
evenly over the workers by a hash of their addresses: with one shared socket, the worker
that woke first took a whole burst (one worker held 2 to 3 times the other's sessions in
the fleet runs). HAProxy 2.6 shares one socket among its threads and evens them out in user
space (each accepted connection goes to the least loaded thread's queue), which processes
cannot do cheaply; HAProxy 1.8's nbproc and 2.7's `shards` open one socket per process or
thread as lb does. The Prometheus binds and `stats socket` stay shared (the lead serves
them). The master never touches traffic and runs no event loop, so forking from it is safe.

Signals to the master:
- SIGUSR2 or SIGHUP: reload. The configuration is read and checked again first; a bad one
  is refused with the `-c` messages and the old workers keep serving. Otherwise the sockets
  of binds that did not change are kept, worker slot by worker slot (a connection waiting in
  their accept queue is never lost: the new worker #k takes over worker #k's sockets), new
  ones are opened, new workers are forked and, once every new worker says it is
  ready, the old ones are told to soft-stop: they stop accepting and finish their sessions.
  `hard-stop-after` bounds how long they may take (then SIGTERM). Only then are the sockets
  of dropped binds closed; if the new workers fail, the sockets the new configuration opened
  are closed and everything else stays as it was (SocketPool's prepare, commit, abort).
- SIGUSR1: soft stop of every worker; the master exits when the last one has.
- SIGTERM / SIGINT: every worker stops now; the master exits.

Under systemd (`lb -Ws`, lb.sd_notify) the master says READY=1 once its workers accept,
RELOADING=1 when a reload starts and READY=1 when it is over (done or refused), STOPPING=1
on a stop, and a STATUS= line with each.

A worker that dies unexpectedly is replaced. A worker notices that its master is gone
(the control socket reaches EOF) and soft-stops.

The control sockets carry lb.control's messages, and the master is their hub (it still
runs no event loop: one select() over the signal pipe and the control sockets, with a
buffer per worker for what could not be written yet). One worker, the *lead* (worker #1),
runs every health check and serves the `stats socket` and Prometheus; the master relays the
server states, certificates and `reload ssl` it publishes to every other worker, keeps the
latest of each (`SharedState`), and collects every serving worker's counters when the lead
asks (`gather`). New workers inherit that memory by fork, so a reload keeps what the old
workers knew; once they are ready the master moves the lead role to the new worker #1 and
only then soft-stops the old ones, so that exactly one worker checks at any time.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from lb import limits, tls, tls_io
from lb.config.errors import Diagnostic, format_report
from lb.config.model import Config
from lb.control import GATHER_TIMEOUT, SharedState, WorkerSetup
from lb.control_codec import (
    MAX_FRAME,
    NEED_DATA,
    ControlProtocolError,
    FrameDecoder,
    Message,
    encode,
)
from lb.frontend import open_listening_socket
from lb.process import STATS_SOCKET_KEY, serve
from lb.runtime_api import open_stats_socket
from lb.sd_notify import Notifier
from lb.shared_counts import SharedCounts

logger = logging.getLogger(__name__)

#: How long new workers may take to report ready before a reload is abandoned.
READY_TIMEOUT = 30.0
#: How long the master waits for workers after SIGTERM before SIGKILL.
KILL_TIMEOUT = 10.0
#: What the master buffers for a worker that does not read; beyond it messages are dropped.
MAX_OUTBOX = 4 * MAX_FRAME
#: How long the master sleeps in select() when nothing happens.
IDLE_POLL = 0.5

SocketKey = tuple[str, int]
Checker = Callable[[Sequence[str]], tuple[Config | None, list[Diagnostic]]]


@dataclass
class Worker:
    pid: int
    number: int
    generation: int
    control: socket.socket  # master's end of the lb.control channel
    ready: bool = False
    stopping_since: float | None = None
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    outbox: bytearray = field(default_factory=bytearray)
    closed: bool = False  # the worker's end reached EOF: it is exiting


@dataclass
class Gather:
    """A `gather` of the lead's: the workers still to answer `collect` and the answers."""

    requester: int  # pid
    ident: int  # the requester's id
    waiting: set[int]  # pids
    replies: list[object]
    deadline: float


SocketAddress = tuple[object, ...]


@dataclass
class PendingSockets:
    """The sockets of a configuration a reload is trying, before it is committed or aborted."""

    sockets: list[dict[SocketKey, socket.socket]]  # the sockets of worker #k at [k - 1]
    by_address: dict[SocketAddress, socket.socket]
    opened: list[socket.socket]  # not in the pool before: an abort closes only these


@dataclass
class SocketPool:
    """Listening sockets by what they are bound to, reused across reloads.

    A reload takes two phases: `prepare` opens what the new configuration adds and closes
    nothing, because the old workers keep serving until the new ones are ready; `commit` then
    closes what only the old configuration used, while `abort` closes what only the new one
    opened and leaves the pool as it was."""

    by_address: dict[SocketAddress, socket.socket] = field(default_factory=dict)

    def for_config(self, config: Config) -> list[dict[SocketKey, socket.socket]]:
        """The sockets for every bind of `config`, committed at once (the first start)."""
        pending = self.prepare(config)
        self.commit(pending)
        return pending.sockets

    def prepare(self, config: Config) -> PendingSockets:
        """The sockets for every bind of `config`, reusing those of the same address.

        A traffic bind gets one socket per worker (SO_REUSEPORT, see the module docstring),
        keyed by the worker's number, so that a reload hands worker #k's accept queue to
        the new worker #k; a Prometheus bind and a stats socket get one, shared."""
        workers = config.global_.nbthread or 1
        wanted: list[dict[SocketKey, socket.socket]] = [{} for _ in range(workers)]
        kept: dict[SocketAddress, socket.socket] = {}
        opened: list[socket.socket] = []

        def get(address: SocketAddress) -> socket.socket | None:
            sock = kept.get(address) or self.by_address.get(address)
            if sock is not None:
                kept[address] = sock
            return sock

        def new(address: SocketAddress, sock: socket.socket) -> socket.socket:
            opened.append(sock)
            kept[address] = sock
            return sock

        try:
            for frontend in config.frontends:
                traffic = frontend.default_backend is not None
                if not traffic and frontend.http_request_use_service != "prometheus-exporter":
                    continue
                for index, bind in enumerate(frontend.binds):
                    if not traffic:
                        address: SocketAddress = ("tcp", bind.family, bind.host, bind.port)
                        sock = get(address) or new(address, open_listening_socket(bind))
                        for per_worker in wanted:
                            per_worker[(frontend.name, index)] = sock
                        continue
                    # Port 0: the kernel's pick for the first slot is every slot's port.
                    target = bind
                    for slot, per_worker in enumerate(wanted):
                        address = ("tcp", bind.family, bind.host, bind.port, "reuseport", slot)
                        sock = get(address) or new(
                            address, open_listening_socket(target, reuse_port=True)
                        )
                        if target.port == 0:
                            target = replace(bind, port=sock.getsockname()[1])
                        per_worker[(frontend.name, index)] = sock
            for index, stats in enumerate(config.global_.stats_socket):
                address = ("stats", stats.path, stats.mode)
                sock = get(address) or new(address, open_stats_socket(stats))
                for per_worker in wanted:
                    per_worker[(STATS_SOCKET_KEY, index)] = sock
        except OSError:
            for sock in opened:
                sock.close()
            raise
        return PendingSockets(wanted, kept, opened)

    def commit(self, pending: PendingSockets) -> None:
        """The new configuration serves: close the sockets only the old one used."""
        for address, sock in self.by_address.items():
            if address not in pending.by_address:
                sock.close()
        self.by_address = pending.by_address

    def abort(self, pending: PendingSockets) -> None:
        """The new configuration was refused: close what it opened, keep the rest."""
        for sock in pending.opened:
            sock.close()

    def close(self) -> None:
        for sock in self.by_address.values():
            sock.close()
        self.by_address = {}


def worker_main(
    config: Config,
    sockets: dict[SocketKey, socket.socket],
    setup: WorkerSetup,
) -> int:
    """The body of one forked worker: serve until told to stop (lb.process.serve)."""

    for signum in (signal.SIGUSR2, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # reloads are the master's business
    return serve(config, sockets=sockets, worker=setup)


class Master:
    """See the module docstring."""

    def __init__(
        self,
        paths: Sequence[str],
        config: Config,
        checker: Checker,
        *,
        pidfile: str | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.paths = list(paths)
        self.notifier = notifier or Notifier(None)
        self.config = config
        self.checker = checker
        self.pidfile = pidfile
        self.pool = SocketPool()
        self.workers: dict[int, Worker] = {}
        self.generation = 0
        self.pending_signals: list[int] = []
        self.stopping: str | None = None  # "soft" or "hard"
        self.hard_stop_deadline: float | None = None
        self.shared = SharedState()
        # Each generation's shared session counts (lb.shared_counts), by generation.
        self.counts: dict[int, SharedCounts] = {}
        # One ticket key for every worker of every generation (see lb.tls.share_ticket_key).
        tls.share_ticket_key(os.urandom(tls_io.OPENSSL_TICKET_KEY_SIZE))
        self.lead_pid: int | None = None
        self.gathers: dict[int, Gather] = {}
        self.next_gather = 0
        self.wakeup: socket.socket | None = None

    # -- signals -------------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.pending_signals.append(signum)

    def _install_signals(self) -> None:
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        signal.set_wakeup_fd(writer.fileno())
        self._wakeup_writer = writer
        self.wakeup = reader
        for signum in (
            signal.SIGUSR1,
            signal.SIGUSR2,
            signal.SIGHUP,
            signal.SIGTERM,
            signal.SIGINT,
            signal.SIGCHLD,
        ):
            signal.signal(signum, self._on_signal)

    # -- workers ---------------------------------------------------------------------------------

    def _spawn(
        self,
        config: Config,
        sockets: dict[SocketKey, socket.socket],
        number: int,
        *,
        lead: bool = False,
    ) -> None:
        master_end, worker_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                master_end.close()
                signal.set_wakeup_fd(-1)
                for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(signum, signal.SIG_DFL)
                for worker in self.workers.values():
                    worker.control.close()
                if self.wakeup is not None:
                    self.wakeup.close()
                    self._wakeup_writer.close()
                # The shared state as the master knows it now is the worker's by fork.
                counts = self.counts.get(self.generation)
                setup = WorkerSetup(worker_end, number, lead, self.shared, counts)
                code = worker_main(config, sockets, setup)
            except BaseException:
                logger.exception("worker %d failed", number)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        worker_end.close()
        master_end.setblocking(False)
        self.workers[pid] = Worker(pid, number, self.generation, master_end)
        if lead:
            self.lead_pid = pid
        logger.info("worker #%d (%d) started (generation %d)", number, pid, self.generation)

    def _spawn_generation(
        self, config: Config, sockets: list[dict[SocketKey, socket.socket]], *, lead: bool
    ) -> None:
        """Fork `nbthread` workers; with `lead`, worker #1 leads from its start."""
        self.generation += 1
        live = {worker.generation for worker in self.workers.values()}
        self.counts = {g: counts for g, counts in self.counts.items() if g in live}
        counts = SharedCounts.for_config(config)
        if counts is not None:
            self.counts[self.generation] = counts
        self.current_sockets = sockets
        for number in range(1, (config.global_.nbthread or 1) + 1):
            self._spawn(config, sockets[number - 1], number, lead=lead and number == 1)

    def _current(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.generation == self.generation]

    def _signal_workers(self, workers: Sequence[Worker], signum: int) -> None:
        for worker in workers:
            try:
                os.kill(worker.pid, signum)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            self._forget(worker)
            code = os.waitstatus_to_exitcode(status)
            if worker.generation == self.generation and self.stopping is None:
                logger.error(
                    "worker #%d (%d) exited with code %d; starting a new one",
                    worker.number,
                    pid,
                    code,
                )
                lead = pid == self.lead_pid
                counts = self.counts.get(worker.generation)
                if counts is not None:  # its sessions died with it
                    counts.clear_worker(worker.number)
                self._spawn(
                    self.config, self.current_sockets[worker.number - 1], worker.number, lead=lead
                )
            else:
                logger.info("worker #%d (%d) exited with code %d", worker.number, pid, code)

    def _wait_ready(self, workers: Sequence[Worker], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not all(w.ready for w in workers):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or any(w.pid not in self.workers or w.closed for w in workers):
                return False
            self._poll(min(remaining, IDLE_POLL))
            self._reap_only_dead(workers)
        return True

    def _discard(self, workers: Sequence[Worker]) -> None:
        """Kill and reap workers of a refused generation now, so that none of them is left
        behind carrying a generation number that the next reload gives out again."""
        self._signal_workers(workers, signal.SIGKILL)
        for worker in workers:
            try:
                os.waitpid(worker.pid, 0)
            except ChildProcessError:
                pass  # already reaped by _reap_only_dead
            if self.workers.pop(worker.pid, None) is not None:
                self._forget(worker)

    def _reap_only_dead(self, workers: Sequence[Worker]) -> None:
        for worker in workers:
            try:
                pid, _status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                pid = worker.pid
            if pid == worker.pid:
                self.workers.pop(worker.pid, None)
                self._forget(worker)

    # -- the control channels (lb.control) ------------------------------------------------------

    def _poll(self, timeout: float) -> None:
        """One select(): read and handle what workers sent, write what waits for them."""
        live = [w for w in self.workers.values() if not w.closed]
        readers: list[socket.socket] = [w.control for w in live]
        if self.wakeup is not None:
            readers.append(self.wakeup)
        writers = [w.control for w in live if w.outbox]
        if self.gathers:
            soonest = min(g.deadline for g in self.gathers.values())
            timeout = max(0.0, min(timeout, soonest - time.monotonic()))
        readable, writable, _ = select.select(readers, writers, [], timeout)
        if self.wakeup is not None and self.wakeup in readable:
            try:
                while self.wakeup.recv(512):
                    pass
            except BlockingIOError:
                pass
        for worker in live:
            if worker.control in readable:
                self._read(worker)
            if worker.control in writable:
                self._flush(worker)
        self._expire_gathers()

    def _read(self, worker: Worker) -> None:
        try:
            data = worker.control.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            worker.closed = True  # exiting; reaped on SIGCHLD
            return
        try:
            worker.decoder.feed(data)
            while True:
                message = worker.decoder.next_event()
                if message is NEED_DATA:
                    return
                assert isinstance(message, dict)
                try:
                    self._on_message(worker, message)
                except (ControlProtocolError, KeyError, TypeError, ValueError) as error:
                    # One bad message is dropped; the master never dies of one.
                    logger.error(
                        "worker #%d (%d): bad %r message: %r",
                        worker.number,
                        worker.pid,
                        message.get("t"),
                        error,
                    )
        except ControlProtocolError as error:
            logger.error("worker #%d (%d): %s", worker.number, worker.pid, error)
            worker.closed = True

    def _send(self, worker: Worker, message: Message) -> None:
        if worker.closed:
            return
        frame = encode(message)
        if len(worker.outbox) + len(frame) > MAX_OUTBOX:
            logger.error(
                "worker #%d (%d) reads nothing: %r message dropped",
                worker.number,
                worker.pid,
                message.get("t"),
            )
            return
        worker.outbox.extend(frame)
        self._flush(worker)

    def _flush(self, worker: Worker) -> None:
        while worker.outbox:
            try:
                sent = worker.control.send(worker.outbox)
            except BlockingIOError:
                return
            except OSError:
                worker.outbox.clear()
                worker.closed = True
                return
            del worker.outbox[:sent]

    def _on_message(self, worker: Worker, message: Message) -> None:
        kind = message["t"]
        if kind == "ready":
            worker.ready = True
        elif kind in ("server", "cert", "reload_ssl"):
            self.shared.record(message)
            for other in self.workers.values():
                if other is not worker:
                    self._send(other, message)
        elif kind == "gather":
            self._start_gather(worker, int(message["id"]), str(message["what"]))
        elif kind == "reply":
            gather = self.gathers.get(int(message["id"]))
            if gather is not None and worker.pid in gather.waiting:
                gather.waiting.discard(worker.pid)
                gather.replies.append(message["data"])
                self._finish_gather_if_done(int(message["id"]))
        else:
            logger.warning("worker #%d: unknown control message %r", worker.number, kind)

    def _start_gather(self, requester: Worker, ident: int, what: str) -> None:
        """Ask every other serving worker (not the old ones finishing their sessions)."""
        targets = [
            w
            for w in self.workers.values()
            if w is not requester and w.ready and w.stopping_since is None and not w.closed
        ]
        self.next_gather += 1
        key = self.next_gather
        self.gathers[key] = Gather(
            requester.pid, ident, {w.pid for w in targets}, [], time.monotonic() + GATHER_TIMEOUT
        )
        for target in targets:
            self._send(target, {"t": "collect", "id": key, "what": what})
        self._finish_gather_if_done(key)

    def _finish_gather_if_done(self, key: int, *, expired: bool = False) -> None:
        gather = self.gathers[key]
        if gather.waiting and not expired:
            return
        del self.gathers[key]
        requester = self.workers.get(gather.requester)
        if requester is not None:
            self._send(
                requester,
                {
                    "t": "gathered",
                    "id": gather.ident,
                    "replies": gather.replies,
                    "missing": len(gather.waiting),
                },
            )

    def _expire_gathers(self) -> None:
        now = time.monotonic()
        for key, gather in list(self.gathers.items()):
            if gather.deadline <= now:
                self._finish_gather_if_done(key, expired=True)

    def _forget(self, worker: Worker) -> None:
        """A worker is gone: close its line, stop waiting for its answers."""
        worker.control.close()
        worker.closed = True
        for key, gather in list(self.gathers.items()):
            if gather.requester == worker.pid:
                del self.gathers[key]
            elif worker.pid in gather.waiting:
                gather.waiting.discard(worker.pid)
                self._finish_gather_if_done(key)

    def _hand_lead(self, new: Sequence[Worker]) -> None:
        """Move the lead role (checks, runtime API) from the old lead to the new worker #1."""
        old = self.workers.get(self.lead_pid) if self.lead_pid is not None else None
        if old is not None:
            self._send(old, {"t": "lead", "on": False})
        lead = min(new, key=lambda w: w.number)
        self._send(lead, {"t": "lead", "on": True})
        self.lead_pid = lead.pid

    # -- reload and stop ------------------------------------------------------------------------

    def _serving(self) -> str:
        finishing = sum(1 for w in self.workers.values() if w.stopping_since is not None)
        text = f"serving: {len(self._current())} worker(s), generation {self.generation}"
        return text + (f"; {finishing} old worker(s) finishing" if finishing else "")

    def reload(self) -> bool:
        """Re-read the configuration; start new workers, then soft-stop the old ones."""
        self.notifier.reloading(f"reloading {', '.join(self.paths)}")
        done = self._reload()
        failed = "" if done else "reload failed, see the log; the previous configuration: "
        self.notifier.ready(failed + self._serving())
        return done

    def _reload(self) -> bool:
        logger.warning("reloading: checking %s", ", ".join(self.paths))
        config, diagnostics = self.checker(self.paths)
        stderr, _stdout, code = format_report(diagnostics, os.getpid())
        if config is None or code != 0:
            sys.stderr.write(stderr)
            sys.stderr.flush()
            logger.error("reload refused: the configuration has errors; old workers keep serving")
            return False
        for diagnostic in diagnostics:
            # Warnings do not stop a reload, but they are why it may not do what was meant
            # (an expired CRL refuses every device): the log says them, as `lb -c` does.
            level = logging.WARNING if diagnostic.is_warning else logging.INFO
            logger.log(level, "reload: %s", diagnostic.text)
        files = limits.plan(config, limits.soft_limit())
        if not files.fits:
            sys.stderr.write(limits.start_report(files, os.getpid()))
            sys.stderr.flush()
            if files.strict:
                logger.error(
                    "reload refused: maxconn needs more files than a worker may open "
                    "(strict-limits); old workers keep serving"
                )
                return False
        try:
            pending = self.pool.prepare(config)
        except OSError as error:
            logger.error("reload refused: cannot listen: %s; old workers keep serving", error)
            return False
        old = [w for w in self.workers.values() if w.stopping_since is None]
        old_sockets = self.current_sockets
        self._spawn_generation(config, pending.sockets, lead=False)
        new = self._current()
        if not self._wait_ready(new, READY_TIMEOUT):
            logger.error("reload failed: new workers did not start; old workers keep serving")
            # Roll back completely: an old worker that dies later is replaced with the old
            # configuration, so it needs the old sockets, every one of them still open.
            self._discard(new)
            self.generation -= 1
            self.current_sockets = old_sockets
            self.pool.abort(pending)
            return False
        self.pool.commit(pending)
        self.config = config
        self.shared.keep_only((b.name, s.name) for b in config.backends for s in b.servers)
        self._hand_lead(new)
        now = time.monotonic()
        for worker in old:
            worker.stopping_since = now
        self._signal_workers(old, signal.SIGUSR1)
        logger.warning(
            "reloaded: %d new worker(s) serving; %d old worker(s) finishing their sessions",
            len(new),
            len(old),
        )
        return True

    def _hard_stop_overdue(self) -> None:
        limit = self.config.global_.hard_stop_after
        if limit is None:
            return
        now = time.monotonic()
        overdue = [
            w
            for w in self.workers.values()
            if w.stopping_since is not None and now - w.stopping_since > limit
        ]
        if overdue:
            logger.warning("hard-stop-after %.1fs: stopping %d old worker(s)", limit, len(overdue))
            self._signal_workers(overdue, signal.SIGTERM)
            for worker in overdue:
                worker.stopping_since = float("inf")

    def run(self) -> int:
        self._install_signals()
        if self.pidfile:
            with open(self.pidfile, "w") as handle:
                handle.write(f"{os.getpid()}\n")
        try:
            sockets = self.pool.for_config(self.config)
        except OSError as error:
            logger.error("cannot listen: %s", error)
            self.notifier.status(f"cannot listen: {error}")
            return 1
        self._spawn_generation(self.config, sockets, lead=True)
        if not self._wait_ready(self._current(), READY_TIMEOUT):
            logger.error("workers did not start")
            self.notifier.status("workers did not start, see the log")
            self._signal_workers(list(self.workers.values()), signal.SIGKILL)
            return 1
        logger.info("master %d ready, %d worker(s)", os.getpid(), len(self.workers))
        self.notifier.ready(self._serving())
        kill_deadline: float | None = None
        while True:
            self._poll(IDLE_POLL)
            signals, self.pending_signals = self.pending_signals, []
            for signum in signals:
                if signum == signal.SIGCHLD:
                    self._reap()
                elif signum in (signal.SIGUSR2, signal.SIGHUP) and self.stopping is None:
                    self.reload()
                elif signum == signal.SIGUSR1 and self.stopping is None:
                    logger.warning("soft stop: workers finish their sessions")
                    self.notifier.stopping("soft stop: workers finish their sessions")
                    self.stopping = "soft"
                    now = time.monotonic()
                    for worker in self.workers.values():
                        worker.stopping_since = worker.stopping_since or now
                    self._signal_workers(list(self.workers.values()), signal.SIGUSR1)
                    self.pool.close()
                elif signum in (signal.SIGTERM, signal.SIGINT) and self.stopping != "hard":
                    logger.warning("stopping")
                    self.notifier.stopping("stopping")
                    self.stopping = "hard"
                    self._signal_workers(list(self.workers.values()), signal.SIGTERM)
                    self.pool.close()
                    kill_deadline = time.monotonic() + KILL_TIMEOUT
            self._reap()
            self._hard_stop_overdue()
            if kill_deadline is not None and time.monotonic() > kill_deadline:
                self._signal_workers(list(self.workers.values()), signal.SIGKILL)
                kill_deadline = time.monotonic() + KILL_TIMEOUT
            if self.stopping is not None and not self.workers:
                break
        self.pool.close()
        if self.pidfile:
            try:
                os.unlink(self.pidfile)
            except OSError:
                pass
        logger.info("master %d stopped", os.getpid())
        return 0


def signal_old_processes(pids: Sequence[int], signum: int) -> None:
    """-sf / -st: tell the processes of a previous lb to finish (SIGUSR1) or stop (SIGTERM)."""
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            logger.warning("-sf/-st: no process %d", pid)
        except PermissionError:
            logger.warning("-sf/-st: not allowed to signal process %d", pid)
