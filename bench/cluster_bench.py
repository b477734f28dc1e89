"""What issue 12 costs: takeover latency across nodes, and the throughput price of durability
against the in-memory mode and against mosquitto with ``persistence true``, in one run.

    .venv/bin/python bench/cluster_bench.py                       # every figure, 3 repeats
    .venv/bin/python bench/cluster_bench.py --only durability --repeats 5 --messages 5000

Figures (MQTT 3.1.1 over raw sockets from this process, 64-byte payloads):

- ``takeover``: a persistent client (clean session 0) with a QoS 1 subscription is
  connected to node A of a 3-node cluster (mutual TLS links, certificates made here); the
  same client id connects to node B: milliseconds from CONNECT sent to CONNACK received
  (session_present=1), against a reconnect to node A itself (the session is there) and a
  reconnect to mosquitto (its session is in memory). ``--takeovers`` connects in all, split
  over the repeats, both kinds interleaved; the median of the repeats' medians, and the p90
  of every connect.
- ``durability``: one publisher keeps ``--window`` QoS 1 messages in flight to one topic,
  one persistent subscriber (clean session 0, QoS 1) acknowledges everything it gets:
  messages per second delivered end to end and the broker's CPU µs per message (utime+stime
  of the broker process over the run), for our broker with ``[store] mode = "memory"``,
  ``"disk"`` (WAL, synchronous normal), ``"disk"`` with synchronous full, and mosquitto 2.0
  with ``persistence true`` (which writes its database only every ``autosave_interval``,
  1,800 s by default, and at shutdown: it acknowledges from memory). Ratios against memory
  mode and against mosquitto are printed beside.
- ``cluster``: the same flow with the publisher on node A and the subscriber on node B of a
  2-node cluster, memory mode against disk mode (the outbox, the receiver's commit before
  its ACK), each with session replication (the default: B's writes for the subscriber's
  session go to A, its backup, and its ACKs wait for A's) and without it
  (``session_replicas = 0``): messages per second and the CPU µs per message of both nodes
  together.

Each number is the median of ``--repeats``; variants run interleaved, their order
alternating. Every process started here runs in its own process group and is killed in
``finally``. Results are printed as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402
    Started,
    cpu_seconds,
    source_span,
    source_tree,
    start,
    stop,
)
from broker.mqtt import (  # noqa: E402
    NEED_DATA,
    Connack,
    Connect,
    MQTTDecoder,
    Puback,
    Publish,
    Subscribe,
    Subscription,
    encode,
)
from lb.pki.certs import make_intermediate, make_node, make_root, write_certs, write_key  # noqa: E402

VENV_BIN = Path(sys.executable).parent
MOSQUITTO = "/usr/sbin/mosquitto"
LEVEL = 4
PAYLOAD = b"p" * 64


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_port(port: int, process: Started, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{process.name} does not listen on {port}")


# -- processes ---------------------------------------------------------------------------------


def node_config(
    work: Path, name: str, port: int, store: str, cluster: list[tuple[str, int]] | None
) -> Path:
    """``store``: memory, disk or disk-full, and "-noreplica" for ``session_replicas = 0``."""
    store, unreplicated, _ = store.partition("-noreplica")
    text = f'[node]\nname = "{name}"\ncookie = "bench"\n\n'
    text += "[mqtt]\nmax_queued_messages = 100000\nmax_inflight = 64\n\n"
    text += f'[listeners.tcp.default]\nbind = "127.0.0.1:{port}"\n\n'
    if store == "memory":
        text += '[store]\nmode = "memory"\n\n'
    else:
        synchronous = "full" if store == "disk-full" else "normal"
        text += f'[store]\nmode = "disk"\npath = "{work / (name + ".db")}"\n'
        text += f'synchronous = "{synchronous}"\n\n'
    if cluster is not None:
        own = dict(cluster)[name]
        peers = ", ".join(f'"{n}@127.0.0.1:{p}"' for n, p in cluster)
        text += f'[cluster]\nbind = "127.0.0.1:{own}"\npeers = [{peers}]\n'
        text += "session_replicas = 0\n\n" if unreplicated else "\n"
        text += "[cluster.ssl_options]\n"
        text += f'cacertfile = "{work / "root.pem"}"\n'
        text += f'certfile = "{work / (name + ".pem")}"\nkeyfile = "{work / (name + "-key.pem")}"\n'
        text += 'verify = "verify_peer"\nfail_if_no_peer_cert = true\n'
    path = work / f"{name}.toml"
    path.write_text(text)
    return path


def make_certificates(work: Path, names: list[str]) -> None:
    root = make_root("Bench Cluster Root", key_type="ec")
    intermediate = make_intermediate(root, "Bench Cluster CA", key_type="ec")
    write_certs(work / "root.pem", [root.cert])
    for name in names:
        issued = make_node(intermediate, name, ip_addresses=["127.0.0.1"], key_type="ec")
        write_certs(work / f"{name}.pem", issued.certs)
        write_key(work / f"{name}-key.pem", issued.key)


@contextlib.contextmanager
def brokers(
    work: Path, store: str, count: int, cpus: set[int] | None
) -> Iterator[list[tuple[Started, int]]]:
    names = [f"node-{n}" for n in range(1, count + 1)]
    cluster = [(name, free_port()) for name in names] if count > 1 else None
    if cluster is not None and not (work / "root.pem").exists():
        make_certificates(work, names)
    for name in names:
        for leftover in work.glob(f"{name}.db*"):
            leftover.unlink()
    started: list[tuple[Started, int]] = []
    try:
        for name in names:
            port = free_port()
            config = node_config(work, name, port, store, cluster)
            process = start(
                f"{name}-{store}", [str(VENV_BIN / "broker"), "-c", str(config)], work, cpus
            )
            started.append((process, port))
            wait_port(port, process)
        if cluster is not None:
            time.sleep(1.5)  # the links come up (a dialer starts at once)
        yield started
    finally:
        for process, _ in started:
            stop(process)


@contextlib.contextmanager
def mosquitto(work: Path, cpus: set[int] | None) -> Iterator[tuple[Started, int]]:
    port = free_port()
    config = work / "mosquitto.conf"
    persistence = work / "mosquitto-data"
    shutil.rmtree(persistence, ignore_errors=True)
    persistence.mkdir()
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
        f"persistence_location {persistence}/\nmax_queued_messages 100000\n"
        f"max_inflight_messages 64\nlog_dest file {work / 'mosquitto.file.log'}\n"
    )
    process = start("mosquitto", [MOSQUITTO, "-c", str(config)], work, cpus)
    try:
        wait_port(port, process)
        yield process, port
    finally:
        stop(process)


# -- a raw MQTT 3.1.1 client -------------------------------------------------------------------


class Raw:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = MQTTDecoder(protocol_level=LEVEL)

    @classmethod
    async def connect(cls, port: int, client_id: str, clean: bool) -> tuple[Raw, Connack]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        writer.write(encode(Connect("MQTT", LEVEL, clean, 60, client_id), LEVEL))
        connack = await client.packet()
        assert isinstance(connack, Connack) and connack.reason_code == 0, connack
        return client, connack

    async def packet(self) -> Any:
        while True:
            event = self.decoder.next_event()
            if event is not NEED_DATA:
                return event
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("closed")
            self.decoder.feed(data)

    async def close(self) -> None:
        self.writer.write(b"\xe0\x00")
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()
        self.writer.close()


# -- figures -----------------------------------------------------------------------------------


async def flow(publish_port: int, subscribe_port: int, messages: int, window: int) -> float:
    """Seconds to get ``messages`` QoS 1 messages from a publisher to a persistent subscriber."""
    subscriber, _ = await Raw.connect(subscribe_port, "bench-subscriber", clean=False)
    subscriber.writer.write(encode(Subscribe(1, (Subscription("bench/t", 1),)), LEVEL))
    await subscriber.packet()
    await asyncio.sleep(0.5)  # the route reaches the other node
    publisher, _ = await Raw.connect(publish_port, "bench-publisher", clean=True)
    received = 0
    done = asyncio.Event()

    async def subscribe() -> None:
        nonlocal received
        while received < messages:
            packet = await subscriber.packet()
            if isinstance(packet, Publish):
                received += 1
                assert packet.packet_id is not None
                subscriber.writer.write(encode(Puback(packet.packet_id), LEVEL))
        done.set()

    async def publish() -> None:
        credit = asyncio.Semaphore(window)
        sent = 0

        async def acks() -> None:
            while True:
                packet = await publisher.packet()
                if isinstance(packet, Puback):
                    credit.release()

        ack_task = asyncio.create_task(acks())
        try:
            while sent < messages:
                await credit.acquire()
                sent += 1
                publisher.writer.write(
                    encode(Publish("bench/t", PAYLOAD, 1, False, False, sent % 65535 + 1), LEVEL)
                )
            await done.wait()
        finally:
            ack_task.cancel()

    started = time.perf_counter()
    receiving = asyncio.create_task(subscribe())
    await asyncio.wait_for(asyncio.gather(publish(), receiving), 300)
    elapsed = time.perf_counter() - started
    await publisher.close()
    await subscriber.close()
    return elapsed


def durability_figures(
    args: argparse.Namespace, work: Path, cpus: set[int] | None
) -> dict[str, Any]:
    variants = ["memory", "disk", "disk-full", "mosquitto"]
    if not Path(MOSQUITTO).exists():
        variants.remove("mosquitto")
    runs: dict[str, dict[str, list[float]]] = {v: {"rate": [], "cpu": []} for v in variants}
    for repeat in range(args.repeats):
        order = variants if repeat % 2 == 0 else list(reversed(variants))
        for variant in order:
            messages = args.messages if variant != "disk-full" else max(500, args.messages // 5)
            if variant == "mosquitto":
                context: Any = mosquitto(work, cpus)
            else:
                context = brokers(work, variant, 1, cpus)
            with context as started:
                process, port = started if variant == "mosquitto" else started[0]
                before = cpu_seconds(process.pid)
                elapsed = asyncio.run(flow(port, port, messages, args.window))
                cpu = cpu_seconds(process.pid) - before
            runs[variant]["rate"].append(messages / elapsed)
            runs[variant]["cpu"].append(cpu / messages * 1e6)
            print(f"durability {variant} #{repeat}: {messages / elapsed:,.0f}/s", file=sys.stderr)
    result: dict[str, Any] = {}
    for variant, values in runs.items():
        result[variant] = {
            "messages_per_second": round(statistics.median(values["rate"])),
            "cpu_us_per_message": round(statistics.median(values["cpu"]), 1),
        }
    memory = result["memory"]
    for figures in result.values():
        figures["rate_vs_memory"] = round(
            figures["messages_per_second"] / memory["messages_per_second"], 2
        )
        if "mosquitto" in result:
            figures["rate_vs_mosquitto"] = round(
                figures["messages_per_second"] / result["mosquitto"]["messages_per_second"], 2
            )
    return result


def cluster_figures(args: argparse.Namespace, work: Path, cpus: set[int] | None) -> dict[str, Any]:
    variants = ["memory", "memory-noreplica", "disk", "disk-noreplica"]
    runs: dict[str, dict[str, list[float]]] = {v: {"rate": [], "cpu": []} for v in variants}
    for repeat in range(args.repeats):
        order = variants if repeat % 2 == 0 else list(reversed(variants))
        for variant in order:
            with brokers(work, variant, 2, cpus) as started:
                (first, a), (second, b) = started
                before = cpu_seconds(first.pid) + cpu_seconds(second.pid)
                elapsed = asyncio.run(flow(a, b, args.messages, args.window))
                cpu = cpu_seconds(first.pid) + cpu_seconds(second.pid) - before
            runs[variant]["rate"].append(args.messages / elapsed)
            runs[variant]["cpu"].append(cpu / args.messages * 1e6)
            print(f"cluster {variant} #{repeat}: {args.messages / elapsed:,.0f}/s", file=sys.stderr)
    result: dict[str, dict[str, float]] = {
        v: {
            "messages_per_second": round(statistics.median(r["rate"])),
            "cpu_us_per_message": round(statistics.median(r["cpu"]), 1),
        }
        for v, r in runs.items()
    }
    result["disk"]["rate_vs_memory"] = round(
        result["disk"]["messages_per_second"] / result["memory"]["messages_per_second"], 2
    )
    for store in ("memory", "disk"):
        replicated, alone = result[store], result[f"{store}-noreplica"]
        replicated["rate_vs_noreplica"] = round(
            replicated["messages_per_second"] / alone["messages_per_second"], 2
        )
        replicated["cpu_vs_noreplica"] = round(
            replicated["cpu_us_per_message"] / alone["cpu_us_per_message"], 2
        )
    return result


async def takeovers(ports: list[int], count: int) -> dict[str, list[float]]:
    """Connect ``count`` times with one persistent client id, alternating a connect on the
    other node (a takeover with transfer) and a reconnect on the node that has the session;
    with one port (mosquitto) every connect is a reconnect."""
    a, b = ports[0], ports[-1]
    client, _ = await Raw.connect(a, "roaming", clean=False)
    client.writer.write(encode(Subscribe(1, (Subscription("roam/t", 1),)), LEVEL))
    await client.packet()
    await client.close()
    here = a
    times: dict[str, list[float]] = {"same node": [], "other node": []}
    for number in range(count):
        kind = "other node" if number % 2 == 0 and a != b else "same node"
        target = (b if here == a else a) if kind == "other node" else here
        started = time.perf_counter()
        client, connack = await Raw.connect(target, "roaming", clean=False)
        times[kind].append((time.perf_counter() - started) * 1000)
        assert connack.session_present, "the session did not come over"
        here = target
        await client.close()
        await asyncio.sleep(0.05)
    return times


def takeover_figures(args: argparse.Namespace, work: Path, cpus: set[int] | None) -> dict[str, Any]:
    variants = ["memory", "disk", "mosquitto"]
    if not Path(MOSQUITTO).exists():
        variants.remove("mosquitto")
    samples: dict[str, list[float]] = {}
    medians: dict[str, list[float]] = {}
    per_repeat = max(2, args.takeovers // args.repeats)
    for repeat in range(args.repeats):
        order = variants if repeat % 2 == 0 else list(reversed(variants))
        for variant in order:
            if variant == "mosquitto":
                with mosquitto(work, cpus) as (_, port):
                    times = asyncio.run(takeovers([port], per_repeat))
            else:
                with brokers(work, variant, 3, cpus) as started:
                    times = asyncio.run(takeovers([port for _, port in started], per_repeat))
            for kind, values in times.items():
                if values:
                    key = f"{variant}, {kind}"
                    samples.setdefault(key, []).extend(values)
                    medians.setdefault(key, []).append(statistics.median(values))
            print(f"takeover {variant} #{repeat} done", file=sys.stderr)
    result: dict[str, Any] = {}
    for key, values in samples.items():
        values.sort()
        result[key] = {
            "median_ms": round(statistics.median(medians[key]), 2),
            "p90_ms": round(values[int(len(values) * 0.9)], 2),
            "connects": len(values),
        }
    if "mosquitto, same node" in result:
        reference = result["mosquitto, same node"]["median_ms"]
        for figures in result.values():
            figures["vs_mosquitto_reconnect"] = round(figures["median_ms"] / reference, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="takeover latency and the cost of durability")
    parser.add_argument("--only", default="takeover,durability,cluster")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--window", type=int, default=64, help="QoS 1 messages in flight")
    parser.add_argument("--takeovers", type=int, default=200, help="connects in all")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="no CPU pinning")
    args = parser.parse_args(argv)
    cpus = {0} if args.pin else None
    figures = [f for f in args.only.split(",") if f]
    work = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    results: dict[str, Any] = {"settings": vars(args)}
    source = source_tree()
    try:
        if "takeover" in figures:
            results["takeover"] = takeover_figures(args, work, cpus)
        if "durability" in figures:
            results["durability"] = durability_figures(args, work, cpus)
        if "cluster" in figures:
            results["cluster"] = cluster_figures(args, work, cpus)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["source"] = source_span(source, "cluster bench")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
