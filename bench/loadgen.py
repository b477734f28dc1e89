"""The load generator: one job runs in several worker processes (fork), each with threads
(blocking `ssl` sockets: handshakes, resumption, bulk, idle) or a uvloop loop (small
request/response), against one balancer address.

Every worker follows the same steps so that the caller measures only the timed window:
prepare (e.g. connect), report "ready", wait for "go", run until its deadline or its count,
report its result, wait for "release", clean up. Every wait is bounded. A worker reports its
own CPU time, which states the generator's ceiling: ops per generator CPU-second.
"""

from __future__ import annotations

import array
import asyncio
import multiprocessing
import os
import queue
import socket
import ssl
import struct
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from typing import Any

import uvloop

from bench.backend import BULK_MAGIC

#: The longest any worker waits for the coordinator between steps.
STEP_TIMEOUT = 600.0
RR_MESSAGE = b"m" * 64


@dataclass(frozen=True)
class ClientFiles:
    """What a device presents and trusts."""

    cert: str  # device certificate followed by the intermediate
    key: str
    ca: str  # the root, to verify the balancer


@dataclass(frozen=True)
class Job:
    """One measurement: `kind` is handshake | resume | bulk | rr | idle."""

    kind: str
    host: str
    port: int
    files: ClientFiles
    workers: int = 2
    threads: int = 8  # per worker; for rr and idle: connections per worker
    duration: float = 3.0
    count: int = 1_000_000  # upper bound of operations per worker
    tls_version: str = "1.3"
    tickets: bool = True
    bulk_bytes: int = 1 << 34  # per connection, upper bound
    sources: tuple[str, ...] = ("127.0.0.1",)
    extra: dict[str, Any] = field(default_factory=dict)


def client_context(
    files: ClientFiles, version: str = "1.3", tickets: bool = True
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(files.ca)
    context.load_cert_chain(files.cert, files.key)
    if version == "1.2":
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    if not tickets:
        context.options |= ssl.OP_NO_TICKET
    return context


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def _recv_exactly(tls: ssl.SSLSocket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = tls.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed by the balancer")
        data += chunk
    return data


def _connect(
    job: Job, context: ssl.SSLContext, session: ssl.SSLSession | None, source: str
) -> ssl.SSLSocket:
    raw = socket.socket()
    raw.settimeout(30)
    try:
        if source != "127.0.0.1":
            raw.bind((source, 0))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.connect((job.host, job.port))
        tls = context.wrap_socket(raw, server_hostname="lb.local", session=session)
    except BaseException:
        raw.close()
        raise
    return tls


# -- thread jobs ------------------------------------------------------------------------------


def _session_loop(
    job: Job, context: ssl.SSLContext, deadline: float, budget: list[int], result: dict[str, float]
) -> None:
    """handshake / resume: connect, handshake, 4-byte echo, close; repeat."""
    session: ssl.SSLSession | None = None
    resume = job.kind == "resume"
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        try:
            tls = _connect(job, context, session if resume else None, job.host)
            with tls:
                tls.sendall(b"ping")
                _recv_exactly(tls, 4)
                if tls.session_reused:
                    result["reused"] += 1
                if resume:
                    session = tls.session
        except (OSError, ssl.SSLError):
            result["errors"] += 1
            continue
        result["ops"] += 1


def _bulk_prepare(job: Job, context: ssl.SSLContext) -> ssl.SSLSocket:
    tls = _connect(job, context, None, job.host)
    tls.sendall(BULK_MAGIC + struct.pack(">Q", job.bulk_bytes))
    return tls


def _bulk_loop(tls: ssl.SSLSocket, deadline: float, result: dict[str, float]) -> None:
    buffer = bytearray(256 * 1024)
    received = 0
    try:
        while time.monotonic() < deadline:
            count = tls.recv_into(buffer)
            if not count:
                break
            received += count
    except (OSError, ssl.SSLError):
        result["errors"] += 1
    result["bytes"] += received
    result["ops"] += 1


def _idle_open(
    job: Job,
    context: ssl.SSLContext,
    index: int,
    share: int,
    held: list[ssl.SSLSocket],
    result: dict[str, float],
    deadline: float,
) -> None:
    for number in range(share):
        if time.monotonic() > deadline:
            return
        source = job.sources[(index + number) % len(job.sources)]
        try:
            tls = _connect(job, context, None, source)
            tls.sendall(b"ping")
            _recv_exactly(tls, 4)
        except (OSError, ssl.SSLError):
            result["errors"] += 1
            continue
        held.append(tls)
        result["ops"] += 1


# -- small request/response on uvloop -----------------------------------------------------------


class _RoundTrip(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = 0
        self.waiter: asyncio.Future[None] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received >= len(RR_MESSAGE) and self.waiter is not None and not self.waiter.done():
            self.received -= len(RR_MESSAGE)
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("lost"))


def _run_rr(
    job: Job,
    ready: Callable[[], None],
    go: Event,
    report: Callable[[dict[str, Any]], None],
    release: Event,
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        context = client_context(job.files, job.tls_version, job.tickets)
        connections: list[_RoundTrip] = []
        for _ in range(job.threads):
            _transport, protocol = await loop.create_connection(
                _RoundTrip, job.host, job.port, ssl=context, server_hostname="lb.local"
            )
            connections.append(protocol)
        ready()
        await loop.run_in_executor(None, go.wait, STEP_TIMEOUT)
        latencies = array.array("d")
        errors = 0
        start_cpu, start = _cpu(), time.monotonic()
        deadline = start + job.duration

        async def one(protocol: _RoundTrip) -> None:
            nonlocal errors
            transport = protocol.transport
            assert transport is not None
            for _ in range(job.count):
                if time.monotonic() >= deadline or protocol.lost:
                    return
                protocol.waiter = loop.create_future()
                sent = time.perf_counter()
                transport.write(RR_MESSAGE)
                try:
                    await asyncio.wait_for(protocol.waiter, 10)
                except (TimeoutError, ConnectionError):
                    errors += 1
                    return
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(one(p) for p in connections))
        elapsed = time.monotonic() - start
        report(
            {
                "ops": len(latencies),
                "elapsed": elapsed,
                "cpu": _cpu() - start_cpu,
                "errors": errors,
                "latencies": latencies.tobytes(),
            }
        )
        await loop.run_in_executor(None, release.wait, STEP_TIMEOUT)
        for protocol in connections:
            if protocol.transport is not None:
                protocol.transport.close()

    uvloop.run(main())


# -- the worker process ---------------------------------------------------------------------------


def worker(
    job: Job,
    index: int,
    ready_queue: multiprocessing.Queue[Any],
    go: Event,
    results: multiprocessing.Queue[Any],
    release: Event,
) -> None:
    try:
        _worker(job, index, ready_queue, go, results, release)
    except BaseException:
        results.put({"error": traceback.format_exc()})
        ready_queue.put(index)  # never leave the coordinator waiting


def _worker(
    job: Job,
    index: int,
    ready_queue: multiprocessing.Queue[Any],
    go: Event,
    results: multiprocessing.Queue[Any],
    release: Event,
) -> None:
    if job.extra.get("cpus"):
        os.sched_setaffinity(0, job.extra["cpus"])
    if job.kind == "rr":
        _run_rr(job, lambda: ready_queue.put(index), go, results.put, release)
        return
    context = client_context(job.files, job.tls_version, job.tickets)
    result: dict[str, float] = {"ops": 0, "errors": 0, "reused": 0, "bytes": 0}
    threads: list[threading.Thread] = []
    held: list[ssl.SSLSocket] = []
    bulk_sockets = (
        [_bulk_prepare(job, context) for _ in range(job.threads)] if job.kind == "bulk" else []
    )
    ready_queue.put(index)
    if not go.wait(STEP_TIMEOUT):
        raise TimeoutError("no go signal")
    start_cpu, start = _cpu(), time.monotonic()
    deadline = start + job.duration
    budget = [job.count]
    for thread_index in range(job.threads):
        arguments: tuple[Any, ...]
        if job.kind in ("handshake", "resume"):
            function: Callable[..., None] = _session_loop
            arguments = (job, context, deadline, budget, result)
        elif job.kind == "bulk":
            function, arguments = _bulk_loop, (bulk_sockets[thread_index], deadline, result)
        elif job.kind == "idle":
            share = job.count // job.threads + (1 if thread_index < job.count % job.threads else 0)
            first = index * job.threads + thread_index
            function = _idle_open
            arguments = (job, context, first, share, held, result, deadline)
        else:
            raise ValueError(f"unknown job kind {job.kind}")
        thread = threading.Thread(target=function, args=arguments, daemon=True)
        threads.append(thread)
        thread.start()
    for thread in threads:
        thread.join(job.duration + 60)
    elapsed = time.monotonic() - start
    results.put({**result, "elapsed": elapsed, "cpu": _cpu() - start_cpu})
    release.wait(STEP_TIMEOUT)
    for tls in [*held, *bulk_sockets]:
        try:
            tls.close()
        except OSError:
            pass


def run_job(
    job: Job,
    on_ready: Callable[[], None],
    on_done: Callable[[], None],
    hold: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Run `job` in `job.workers` processes. `on_ready` runs when every worker is prepared
    (then the window opens), `on_done` when every worker has reported; `hold` (optional)
    runs after that while idle connections are still open."""
    context = multiprocessing.get_context("fork")
    ready_queue: multiprocessing.Queue[Any] = context.Queue()
    results: multiprocessing.Queue[Any] = context.Queue()
    go, release = context.Event(), context.Event()
    processes = [
        context.Process(
            target=worker, args=(job, index, ready_queue, go, results, release), daemon=True
        )
        for index in range(job.workers)
    ]
    collected: list[dict[str, Any]] = []
    try:
        for process in processes:
            process.start()
        for _ in processes:
            ready_queue.get(timeout=STEP_TIMEOUT)
        on_ready()
        go.set()
        limit = job.duration + 120
        for _ in processes:
            collected.append(results.get(timeout=limit))
        on_done()
        if hold is not None:
            hold()
        release.set()
        for process in processes:
            process.join(60)
    except queue.Empty:
        raise TimeoutError(f"{job.kind}: a load generator worker did not answer") from None
    finally:
        release.set()
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    failures = [r["error"] for r in collected if "error" in r]
    if failures:
        raise RuntimeError(f"{job.kind}: load generator failed:\n{failures[0]}")
    return collected
