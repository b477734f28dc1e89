"""Python work per connection in the broker, counted rather than timed.

CPU figures on this shared 2-core machine move by 10-30% between runs (mosquitto's own
connect figure ranged 24-60 µs in one afternoon), so a change of a few percent on the connect
path cannot be shown by timing alone. This bench counts what the interpreter does instead:
the broker runs under ``sys.settrace`` with opcode events (and ``sys.setprofile`` for calls
into C) switched on only while the measured connections run, and reports per connection the
Python bytecode instructions executed, the Python calls and the C calls, with the functions
that executed the most. The counts do not depend on the machine's load; they do not see time
spent in C (uvloop, OpenSSL, the kernel), which the timed benches measure
(bench/broker_bench.py ``connect``, against mosquitto).

Scenarios (``--only``):

- ``connect``: connect churn on a plain listener, as broker_bench's ``connect``: a new TCP
  connection, CONNECT (clean, no keep alive), CONNACK, DISCONNECT, close; MQTT 3.1.1 and 5.0.
- ``reconnect``: the fleet's path. A PROXY v2 listener (``peer_cert_as_username = "cn"``)
  gets lb's header (TLS flags, version and CN TLVs, a unique id) and a persistent device
  (clean session 0, keep alive 60, one QoS 1 subscription). Every device connects and
  subscribes first; they all drop (TCP close); then they reconnect, under the counter, and
  get their sessions back (session present), as in a reconnect storm. A reconnect here counts
  the new connection and the drop of the old one's TCP connection.

``--baseline DIR`` runs another source tree's broker the same way (an A/B of the counts).
Every process is stopped by its pid in ``finally``; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import opcodes  # noqa: E402
from bench.broker_memory import device_bytes  # noqa: E402
from bench.ports import free_port  # noqa: E402
from bench.run import start, stop, wait_listening  # noqa: E402
from broker.mqtt import Connect, encode  # noqa: E402

SCENARIOS = ("connect", "reconnect")
#: Connections opened at once by the driver.
BATCH = 50
#: Bound of every wait (a broker's start, a connection's answer, the counts file).
STEP_TIMEOUT = 30.0
#: Functions listed per scenario.
TOP = 25

DISCONNECT = b"\xe0\x00"


def broker_config(port: int, proxy: bool) -> str:
    listener = (
        'proxy_protocol = true\nproxy_protocol_trusted = ["127.0.0.1/32"]\n'
        'peer_cert_as_username = "cn"\n'
        if proxy
        else ""
    )
    return (
        f'[node]\nname = "opcodes"\n\n[listeners.tcp.default]\nbind = "127.0.0.1:{port}"\n'
        f"{listener}"
    )


async def _churn(port: int, number: int, version: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(encode(Connect("MQTT", version, True, 0, f"churn-{number}"), version))
        connack = await asyncio.wait_for(reader.readexactly(4 if version == 4 else 3), 30)
        if connack[0] != 0x20:
            raise ConnectionError(f"CONNACK {connack.hex()}")
        writer.write(DISCONNECT)
        await writer.drain()
    finally:
        writer.close()


async def _device(port: int, packets: tuple[bytes, bytes], subscribe: bool) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        hello, subscription = packets
        writer.write(hello)
        connack = await asyncio.wait_for(reader.readexactly(4), 30)
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"CONNACK {connack.hex()}")
        if subscribe:
            if connack[2] != 0:
                raise ConnectionError("a first connection found a session")
            writer.write(subscription)
            await asyncio.wait_for(reader.readexactly(5), 30)
        elif connack[2] != 1:
            raise ConnectionError("the reconnect did not get its session back")
    finally:
        writer.close()


async def _in_batches(count: int, make: Any) -> None:
    for first in range(0, count, BATCH):
        await asyncio.wait_for(
            asyncio.gather(*(make(number) for number in range(first, min(count, first + BATCH)))),
            STEP_TIMEOUT,
        )


def measure(source: Path, scenario: str, version: int, count: int, work: Path) -> dict[str, Any]:
    """Run one scenario against a counting broker of ``source``; counts per connection."""
    port = free_port()
    config = work / f"{scenario}.toml"
    config.write_text(broker_config(port, proxy=scenario == "reconnect"))
    output = work / f"{scenario}-{version}-{os.getpid()}-{time.monotonic_ns()}.json"
    boot = opcodes.boot(
        source,
        output,
        module="broker.cli",
        program="broker",
        start_signal=signal.SIGUSR1,
        stop_signal=signal.SIGUSR2,
        top=TOP,
    )
    process = start(
        f"broker-{scenario}-{version}", [sys.executable, "-c", boot, "-c", str(config)], work, None
    )
    try:
        wait_listening(port, process, STEP_TIMEOUT)
        if scenario == "reconnect":
            # the fleet device of broker_memory: lb's PROXY v2 header, CONNECT, SUBSCRIBE
            packets = [device_bytes(number, proxy=True, chain=False)[:2] for number in range(count)]
            asyncio.run(_in_batches(count, lambda n: _device(port, packets[n], True)))
            time.sleep(0.5)  # the drops are handled before the counter starts
            process.popen.send_signal(signal.SIGUSR1)
            time.sleep(0.2)
            asyncio.run(_in_batches(count, lambda n: _device(port, packets[n], False)))
        else:
            process.popen.send_signal(signal.SIGUSR1)
            time.sleep(0.2)
            asyncio.run(_in_batches(count, lambda n: _churn(port, n, version)))
        time.sleep(0.5)  # the last closes are handled
        process.popen.send_signal(signal.SIGUSR2)
        counts = opcodes.read_counts(output, STEP_TIMEOUT)
    finally:
        stop(process)
    return opcodes.per_unit(counts, count)


def run(args: argparse.Namespace) -> dict[str, Any]:
    trees = {"broker": ROOT}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="broker-opcodes-") as scratch:
        work = Path(scratch)
        for scenario in args.only:
            versions = args.mqtt if scenario == "connect" else [4]
            for version in versions:
                label = scenario if version == 4 else f"{scenario}_v5"
                for name, source in trees.items():
                    figure = measure(source, scenario, version, args.connections, work)
                    results.setdefault(label, {})[name] = figure
                    print(
                        f"{label:13s} {name:9s} {figure['opcodes']:7.0f} opcodes "
                        f"{figure['python_calls']:6.1f} Python calls "
                        f"{figure['c_calls']:6.1f} C calls per connection",
                        flush=True,
                    )
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", default=",".join(SCENARIOS), help=",".join(SCENARIOS))
    parser.add_argument("--mqtt", default="4,5", help="connect: protocol levels 4 and/or 5")
    parser.add_argument("--connections", type=int, default=1000, help="per scenario")
    parser.add_argument("--baseline", type=Path, help="another source tree, counted the same way")
    parser.add_argument("--output", type=Path, help="JSON file (default bench/results/)")
    parser.add_argument("--top", action="store_true", help="print the busiest functions")
    args = parser.parse_args(argv)
    args.only = [name for name in args.only.split(",") if name]
    for name in args.only:
        if name not in SCENARIOS:
            parser.error(f"--only: unknown scenario {name!r}")
    args.mqtt = [int(level) for level in args.mqtt.split(",")]
    if not set(args.mqtt) <= {4, 5}:
        parser.error("--mqtt: 4 and/or 5")
    if not 1 <= args.connections <= 20_000:
        parser.error("--connections: 1 to 20,000")
    if args.baseline is not None and not (args.baseline / "broker" / "cli.py").exists():
        parser.error(f"--baseline {args.baseline}: no broker/cli.py there")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    if args.top:
        for label, by_tree in results.items():
            for name, figure in by_tree.items():
                print(f"\n{label} {name}: opcodes per connection by function")
                for function, count in figure["functions"]:
                    print(f"  {count:7.1f} {function}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output = args.output or ROOT / "bench" / "results" / f"broker-opcodes-{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps({"date": stamp, "connections": args.connections, "results": results}, indent=1)
        + "\n"
    )
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
