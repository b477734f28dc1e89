"""Python work per session in an lb worker, counted rather than timed.

The fleet's storm figure that is lb's own, CPU per storm handshake, reads 0.95-1.18x
HAProxy's from run to run on this shared machine (bench/README.md), so a change of a few
percent cannot be shown by timing it. This bench counts what the interpreter does instead,
as bench/broker_opcodes.py does for the broker: lb's worker runs under ``sys.settrace`` with
opcode events (and ``sys.setprofile`` for calls into C), switched on by a signal only while
the measured sessions run, and the bench reports per session the Python bytecode
instructions executed, the Python calls and the C calls, with the functions that executed
the most. The counts do not depend on the machine's load; they do not see time spent in C
(OpenSSL's handshake, uvloop, the kernel), which the timed benches measure (bench/run.py
``handshake``, bench/fleet.py ``storm``, both against HAProxy).

The session is the fleet's (``storm``): lb runs the demo's configs/haproxy.cfg (seed 004's
bind line with the CRL, ``send-proxy-v2 send-proxy-v2-ssl-cn``, ``proxy-v2-options
unique-id``, the tcplog line per session on stdout) with this run's port, certificates
(``lb-pki demo``) and one server, bench/backend.py, which strips the PROXY header and echoes.
A device opens TCP, completes mutual TLS 1.3 (a full handshake: the stdlib client does not
resume), sends an MQTT CONNECT and reads it back from the echo; then every device closes,
as in a storm's drop. A session counts its accept, handshake, server connect, PROXY header,
the two relayed messages, the log line and the teardown of both sides.

``--messages K``: once every session is up, K rounds in which each device sends an MQTT
PUBLISH (64-byte payload, QoS 0) and reads it back from the echo, BATCH devices at a time:
the relay of a fleet's steady telemetry through established sessions. (counts(K) -
counts(0)) / K / sessions is the work per message, a record each way; with ``--timed
--haproxy``, the CPU of each. With more sessions than lb keeps record ciphers for
(lb.tls_records.ActiveKeys: 256 to 512 connections) every message finds its connection's
cipher objects gone, as a fleet's quiet devices do; with fewer, they are kept.

``--baseline DIR`` runs another source tree's lb the same way (an A/B of the counts).
``--timed`` measures instead of counting: the worker's CPU time per session, untraced, lb
pinned to CPU 0 and the devices and backend to CPU 1; with ``--repeats`` and a baseline the
trees alternate and the medians are printed (OpenSSL's handshake included, so the Python
part's change is diluted, and the machine's noise is in it).
Every process is stopped by its pid in ``finally``; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import opcodes  # noqa: E402
from bench.ports import free_port  # noqa: E402
from bench.run import HAPROXY, Pki, children_of, cpu_seconds, make_pki, start, stop, wait_listening  # noqa: E402
from broker.mqtt import Connect, Publish, encode  # noqa: E402

#: Sessions opened (and messages sent) at once by the driver.
BATCH = 50
#: A device's streams and its number.
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter, int]
#: Bound of every wait (a process's start, a session's answer, the counts file).
STEP_TIMEOUT = 60.0
#: Functions listed.
TOP = 30
#: The signals that switch the counter on and off in lb's worker (lb uses neither).
COUNT_START = signal.SIGRTMIN + 4
COUNT_STOP = signal.SIGRTMIN + 5
DEMO_CONFIG = ROOT / "configs" / "haproxy.cfg"


def lb_config(port: int, server_port: int, pki: Pki) -> str:
    """The demo's config with this run's port, certificates and one server (no health check:
    its timer would fall in the counted window or not, by chance)."""
    lines = []
    for original in DEMO_CONFIG.read_text().splitlines():
        line = original
        words = line.split()
        if words[:1] == ["bind"]:
            if "ssl" not in words:
                continue  # the Prometheus exporter: not on the session's path
            line = line.replace(words[1], f"127.0.0.1:{port}", 1)
            line = line.replace(" certs/", f" {pki.directory}/")
        if words[:1] == ["server"]:
            if "emqx-165" not in words:
                continue
            kept = [word for word in words[3:] if word not in ("check", "check-send-proxy")]
            line = "    " + " ".join(["server", "s1", f"127.0.0.1:{server_port}", *kept])
        lines.append(line)
    text = "\n".join(lines) + "\n"
    if f"127.0.0.1:{port}" not in text or "server s1" not in text:
        raise ValueError(f"{DEMO_CONFIG}: no ssl bind or no emqx-165 server line")
    return text


async def _device(port: int, context: ssl.SSLContext, number: int, opened: list[Stream]) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    opened.append((reader, writer, number))
    hello = encode(Connect("MQTT", 4, False, 60, f"device-{number:05d}"), 4)
    await _echo(reader, writer, hello)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, packet: bytes) -> None:
    writer.write(packet)
    echoed = await asyncio.wait_for(reader.readexactly(len(packet)), STEP_TIMEOUT)
    if echoed != packet:
        raise ConnectionError("the echo differs from what was sent")


async def _sessions(port: int, context: ssl.SSLContext, count: int, messages: int = 0) -> None:
    """`count` sessions, BATCH at a time; then `messages` rounds in which every session
    echoes one PUBLISH (BATCH at a time), so that between two messages of a session the
    others send theirs, as in a fleet; then every device closes."""
    opened: list[Stream] = []
    try:
        for first in range(0, count, BATCH):
            numbers = range(first, min(count, first + BATCH))
            await asyncio.wait_for(
                asyncio.gather(*(_device(port, context, n, opened) for n in numbers)),
                STEP_TIMEOUT,
            )
        for _ in range(messages):
            for first in range(0, len(opened), BATCH):
                await asyncio.wait_for(
                    asyncio.gather(
                        *(
                            _echo(reader, writer, _telemetry(number))
                            for reader, writer, number in opened[first : first + BATCH]
                        )
                    ),
                    STEP_TIMEOUT,
                )
    finally:
        for _, writer, _ in opened:  # the storm's drop: every device closes
            writer.close()
        await asyncio.gather(*(w.wait_closed() for _, w, _ in opened), return_exceptions=True)


def _telemetry(number: int) -> bytes:
    return encode(Publish(f"fleet/device-{number:05d}/telemetry", bytes(64), 0), 4)


def _worker(master: int) -> int:
    deadline = time.monotonic() + STEP_TIMEOUT
    while time.monotonic() < deadline:
        workers = [pid for pid in children_of(master) if pid != master]
        if workers:
            return workers[0]
        time.sleep(0.05)
    raise TimeoutError("lb forked no worker")


def measure(
    source: Path | None, pki: Pki, count: int, work: Path, timed: bool, messages: int = 0
) -> dict[str, Any]:
    """Count ``count`` sessions through a counting lb of ``source``; counts per session. Or,
    ``timed``, the worker's CPU time per session (utime + stime), untraced, lb on CPU 0 and
    the devices and the backend on CPU 1. Without ``source``: HAProxy (timed only), same config."""
    port, server_port = free_port(), free_port()
    config = work / "lb.cfg"
    config.write_text(lb_config(port, server_port, pki))
    output = work / f"counts-{os.getpid()}-{time.monotonic_ns()}.json"
    boot = opcodes.boot(
        source or ROOT,
        output,
        module="lb.cli",
        program="lb",
        start_signal=COUNT_START,
        stop_signal=COUNT_STOP,
        top=TOP,
    )
    cpus = os.sched_getaffinity(0)
    pinned = timed and {0, 1} <= cpus
    backend = start(
        "backend",
        [sys.executable, str(ROOT / "bench" / "backend.py"), "--ports", str(server_port)],
        work,
        {1} if pinned else None,
    )
    balancer = None
    try:
        wait_listening(server_port, backend, STEP_TIMEOUT)
        command = (
            [HAPROXY, "-db", "-f", str(config)]
            if source is None
            else [sys.executable, "-c", boot, "-f", str(config)]
        )
        balancer = start("balancer", command, work, {0} if pinned else None)
        wait_listening(port, balancer, STEP_TIMEOUT)
        worker = balancer.pid if source is None else _worker(balancer.pid)
        context = ssl.create_default_context(cafile=pki.client.ca)
        context.load_cert_chain(pki.client.cert, pki.client.key)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        if pinned:
            os.sched_setaffinity(0, {1})
        asyncio.run(_sessions(port, context, min(BATCH, count)))  # warm: imports, caches
        time.sleep(0.5)
        if timed:
            before = cpu_seconds(worker)
            asyncio.run(_sessions(port, context, count, messages))
            time.sleep(1.0)  # the last closes are handled
            return {"cpu_us": (cpu_seconds(worker) - before) / count * 1e6, "pinned": pinned}
        os.kill(worker, COUNT_START)
        time.sleep(0.2)
        asyncio.run(_sessions(port, context, count, messages))
        time.sleep(1.0)  # the last closes are handled
        os.kill(worker, COUNT_STOP)
        counts = opcodes.read_counts(output, STEP_TIMEOUT)
    finally:
        os.sched_setaffinity(0, cpus)
        if balancer is not None:
            stop(balancer)
        stop(backend)
    return opcodes.per_unit(counts, count)


def run(args: argparse.Namespace) -> dict[str, Any]:
    trees: dict[str, Path | None] = {"lb": ROOT}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    if args.haproxy:
        trees["haproxy"] = None
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lb-opcodes-") as scratch:
        work = Path(scratch)
        pki = make_pki(work / "pki", args.key_type)
        for repeat in range(args.repeats):
            for name, source in trees.items():
                figure = measure(source, pki, args.sessions, work, args.timed, args.messages)
                results.setdefault(name, []).append(figure)
                if args.timed:
                    print(f"[{repeat + 1}] {name:9s} {figure['cpu_us']:7.0f} us CPU per session")
                    continue
                print(
                    f"[{repeat + 1}] {name:9s} {figure['opcodes']:7.0f} opcodes "
                    f"{figure['python_calls']:6.1f} Python calls "
                    f"{figure['c_calls']:6.1f} C calls per session",
                    flush=True,
                )
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1, help="the counts barely move")
    parser.add_argument("--key-type", choices=("ec", "rsa2048"), default="ec")
    parser.add_argument(
        "--messages", type=int, default=0, help="PUBLISH echoed per session after CONNECT"
    )
    parser.add_argument("--baseline", type=Path, help="another source tree, counted the same way")
    parser.add_argument("--output", type=Path, help="JSON file (default bench/results/)")
    parser.add_argument("--top", action="store_true", help="print the busiest functions")
    parser.add_argument(
        "--haproxy", action="store_true", help="with --timed: HAProxy too, on the same config"
    )
    parser.add_argument(
        "--timed",
        action="store_true",
        help="CPU time per session instead of counts (untraced, pinned; use --repeats)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 5_000:
        parser.error("--sessions: 1 to 5,000 (one worker, two descriptors a session)")
    if args.haproxy and not args.timed:
        parser.error("--haproxy: with --timed (HAProxy's work is not Python)")
    if not 0 <= args.messages <= 1_000:
        parser.error("--messages: 0 to 1,000")
    if not 1 <= args.repeats <= 10:
        parser.error("--repeats: 1 to 10")
    if args.baseline is not None and not (args.baseline / "lb" / "cli.py").exists():
        parser.error(f"--baseline {args.baseline}: no lb/cli.py there")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    if args.timed:
        for name, figures in results.items():
            median = statistics.median(f["cpu_us"] for f in figures)
            line = f"{name}: median {median:.0f} us CPU per session over {len(figures)} runs"
            if name != "haproxy" and "haproxy" in results:
                theirs = statistics.median(f["cpu_us"] for f in results["haproxy"])
                line += f", {median / theirs:.2f}x HAProxy's"
            print(line)
    elif args.top:
        for name, figures in results.items():
            print(f"\n{name}: opcodes per session by function (first repeat)")
            for function, count in figures[0]["functions"]:
                print(f"  {count:7.1f} {function}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output = args.output or ROOT / "bench" / "results" / f"lb-opcodes-{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps({"date": stamp, "sessions": args.sessions, "results": results}, indent=1) + "\n"
    )
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
