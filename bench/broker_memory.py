"""Broker memory per connected device in a cluster, as the fleet sees it, without the fleet.

    .venv/bin/python bench/broker_memory.py                          # 3 nodes, 3,000 devices
    .venv/bin/python bench/broker_memory.py --devices 2000 --tracemalloc
    .venv/bin/python bench/broker_memory.py --baseline /tmp/main-tree --repeats 3

The fleet run (bench/README.md, 100,000 devices on 6 nodes behind lb) measured 12.9 KiB of
broker RSS per device, against 6.28 KiB in broker_bench.py's one-node `devices` figure. This
bench starts a K-node cluster (mutual TLS links, `demo/topology.py`'s node configuration:
`proxy_protocol = true`, `peer_cert_as_username = "cn"`, the demo's [mqtt] limits, memory
store) and connects --devices plain-TCP devices to it from this process. Each device sends
the PROXY v2 header lb sends with the demo's `send-proxy-v2 send-proxy-v2-ssl-cn
proxy-v2-options unique-id` (PP2_TYPE_SSL with TLS version and the verified CN, a 32-hex
unique id; `--chain-subjects` adds the 0xE1 TLV with leaf, intermediate and root names),
then as in bench/fleet_devices.py: MQTT 3.1.1 CONNECT with clean session 0 and keep alive
60 s, SUBSCRIBE to `fleet/<id>/commands` at QoS 1, one QoS 1 telemetry PUBLISH to
`fleet/<id>/telemetry` (acknowledged), and holds the connection.

Two placements, each on fresh nodes:

- ``node1``: every device on node 1. Node 1's RSS growth per device is what a *local* device
  costs (L: connection, session, subscription); each other node's growth per device is what
  one replicated *route* costs (R: node 1's filter, announced over the link). A device of a
  K-node fleet costs L on its node and R on each of the K - 1 others: the fleet figure (RSS
  of all nodes / devices) is L + (K - 1) R, which is how the 6-node projection is made.
- ``spread``: devices round robin over the nodes, as lb spreads them; the sum of the nodes'
  growth per device checks the projection at K nodes.

RSS is VmRSS before the first device and after the last one's PUBACK, once every node has
every route (`/api/cluster`'s remote_filters) and is quiet. mosquitto (2.0, one process, no
PROXY protocol, no cluster) holds the same devices in the same run: its figure is a device's
whole cost on a single broker. ``--baseline DIR`` runs another source tree's broker as
"baseline", interleaved with this one (the order alternates between repeats); each figure
is the median of --repeats.

``--tracemalloc`` adds one run per placement with the nodes under tracemalloc (``--frames``
deep), snapshots taken before and after the devices, and prints the growth per device by
allocation site (lines of our code; library and generated frames are shown with their
caller), split local (node 1) and route (node 2). Every process is stopped by its pid in
``finally``; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from bench.broker_bench import MOSQUITTO, mosquitto_version, raise_nofile, wait_quiet  # noqa: E402
from bench.ports import free_port  # noqa: E402
from bench.run import (  # noqa: E402
    Started,
    rss_kib,
    source_span,
    source_tree,
    start,
    stop,
    wait_listening,
)
from broker.mqtt import Connect, Publish, Subscribe, Subscription, encode  # noqa: E402
from demo import topology  # noqa: E402
from lb.pki.certs import make_intermediate, make_node, make_root, write_certs, write_key  # noqa: E402
from lb.proxyproto import ClientFlags, Command, SSLInfo, encode_v2  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LEVEL = 4  # MQTT 3.1.1, as the fleet run
KEEP_ALIVE = 60
PAYLOAD = b"t" * 32
#: Devices connecting at once (each is a handful of round trips).
CONCURRENCY = 64
DEVICE_TIMEOUT = 30.0
START_TIMEOUT = 90.0  # under tracemalloc, on a loaded machine, a node starts slowly
ROUTES_TIMEOUT = 60.0
SETTLE = 1.0
#: What lb's demo server line sends: TLSv1.3, a client certificate that verified.
SSL_FLAGS = ClientFlags.SSL | ClientFlags.CERT_CONN | ClientFlags.CERT_SESS


# -- processes -------------------------------------------------------------------------------


def make_certificates(directory: Path, count: int) -> None:
    """The files demo/topology.py's node configuration names: CaRoot.pem, node-N(-key).pem."""
    root = make_root("Bench Memory Root", key_type="ec")
    intermediate = make_intermediate(root, "Bench Memory CA", key_type="ec")
    write_certs(directory / f"{topology.ROOT_CA}.pem", [root.cert])
    for number in range(1, count + 1):
        issued = make_node(
            intermediate, f"node-{number}", dns_names=["localhost"], ip_addresses=["127.0.0.1"]
        )
        write_certs(directory / f"node-{number}.pem", issued.certs)
        write_key(directory / f"node-{number}-key.pem", issued.key)


#: Runs a broker from a source tree; with a snapshot directory, under tracemalloc, dumping a
#: snapshot when a request file appears (a thread: the broker's loop is left alone).
BOOT = """
import gc, sys, threading, time, tracemalloc
from pathlib import Path
sys.path.insert(0, {source!r})
snapshots = {snapshots!r}
if snapshots:
    tracemalloc.start({frames})
    def watch():
        directory = Path(snapshots)
        while True:
            for request in directory.glob("*.request"):
                gc.collect()
                target = request.with_suffix(".snapshot")
                tracemalloc.take_snapshot().dump(str(target) + ".part")
                Path(str(target) + ".part").rename(target)
                request.unlink()
            time.sleep(0.1)
    threading.Thread(target=watch, daemon=True).start()
from broker.cli import main
raise SystemExit(main())
"""


@dataclass
class Node:
    node: topology.Node
    process: Started
    snapshots: Path | None

    def snapshot(self, label: str) -> tracemalloc.Snapshot:
        assert self.snapshots is not None
        stem = self.snapshots / label
        Path(f"{stem}.request").touch()
        deadline = time.monotonic() + 120
        while not Path(f"{stem}.snapshot").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.node.name}: no tracemalloc snapshot")
            time.sleep(0.1)
        return tracemalloc.Snapshot.load(f"{stem}.snapshot")


def admin_json(node: topology.Node, path: str) -> Any:
    url = f"http://127.0.0.1:{node.admin_port}{path}"
    with urllib.request.urlopen(url, timeout=2.0) as response:
        return json.load(response)


def remote_filters(node: topology.Node) -> dict[str, tuple[str, int]]:
    """Each peer's link state and the filters this node holds for it."""
    try:
        members = admin_json(node, "/api/cluster").get("members", [])
    except (OSError, urllib.error.URLError, ValueError):
        return {}
    return {
        member["name"]: (member["state"], member.get("remote_filters", 0))
        for member in members
        if member.get("state") != "self"
    }


def wait_until(what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


@contextlib.contextmanager
def cluster(
    work: Path, count: int, source: Path, tag: str, frames: int, traced: bool
) -> Iterator[list[Node]]:
    members = tuple(
        topology.Node(
            name=f"node-{number}",
            config="",
            mqtt_port=free_port(),
            admin_port=free_port(),
            cluster_port=free_port(),
            server=f"emqx-{number}",
            certificate=f"node-{number}",
        )
        for number in range(1, count + 1)
    )
    nodes: list[Node] = []
    try:
        for member in members:
            # one directory per node: each node's thread answers the requests in its own
            snapshots = work / f"snapshots-{tag}-{member.name}" if traced else None
            if snapshots is not None:
                snapshots.mkdir()
            config = work / f"{tag}-{member.name}.toml"
            text = topology.broker_config(member, members, certs=str(work), max_connections=50_000)
            config.write_text(text)
            boot = BOOT.format(source=str(source), snapshots=str(snapshots or ""), frames=frames)
            process = start(
                f"{tag}-{member.name}", [sys.executable, "-c", boot, "-c", str(config)], work, None
            )
            nodes.append(Node(member, process, snapshots))
        for node in nodes:
            wait_listening(node.node.mqtt_port, node.process, START_TIMEOUT)
        peers = count - 1
        wait_until(
            "the cluster did not form",
            lambda: all(
                sum(state == "up" for state, _ in remote_filters(node.node).values()) == peers
                for node in nodes
            ),
            START_TIMEOUT,
        )
        yield nodes
    finally:
        for node in reversed(nodes):
            stop(node.process)


@contextlib.contextmanager
def mosquitto(work: Path) -> Iterator[tuple[Started, int]]:
    port = free_port()
    config = work / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"max_connections -1\nlog_dest file {work / 'mosquitto.file.log'}\n"
    )
    process = start("mosquitto", [MOSQUITTO, "-c", str(config)], work, None)
    try:
        wait_listening(port, process, START_TIMEOUT)
        yield process, port
    finally:
        stop(process)


# -- devices ---------------------------------------------------------------------------------


def chain_subjects(name: str) -> tuple[bytes, ...]:
    """DER Names of leaf, intermediate and root (what lb's 0xE1 TLV carries)."""

    def der(common_name: str) -> bytes:
        name_ = x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Contoso"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        return name_.public_bytes()

    return der(name), der("CaIntermediate"), der("CaRoot")


def device_bytes(number: int, proxy: bool, chain: bool) -> tuple[bytes, bytes, bytes]:
    """(PROXY header + CONNECT, SUBSCRIBE, PUBLISH) of device `number`."""
    name = f"device-{number:06d}"
    header = b""
    if proxy:
        header = encode_v2(
            Command.PROXY,
            (f"127.0.{number // 250 % 250}.{number % 250 + 2}", 30000 + number % 30000),
            ("127.0.0.1", 8091),
            ssl=SSLInfo(client=SSL_FLAGS, verify=0, version="TLSv1.3", cn=name),
            unique_id=secrets.token_hex(16).encode("ascii"),
            chain_subjects=chain_subjects(name) if chain else (),
        )
    connect = encode(Connect("MQTT", LEVEL, False, KEEP_ALIVE, name), LEVEL)
    subscribe = encode(Subscribe(1, (Subscription(f"fleet/{name}/commands", 1),)), LEVEL)
    publish = encode(Publish(f"fleet/{name}/telemetry", PAYLOAD, qos=1, packet_id=2), LEVEL)
    return header + connect, subscribe, publish


async def device(
    port: int, packets: tuple[bytes, bytes, bytes], held: list[asyncio.StreamWriter]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    held.append(writer)
    hello, subscribe, publish = packets
    writer.write(hello)
    connack = await reader.readexactly(4)
    if connack[0] != 0x20 or connack[3] != 0:
        raise ConnectionError(f"CONNACK {connack.hex()}")
    writer.write(subscribe)
    suback = await reader.readexactly(5)
    if suback[0] != 0x90 or suback[4] != 1:
        raise ConnectionError(f"SUBACK {suback.hex()}")
    writer.write(publish)
    puback = await reader.readexactly(4)
    if puback[0] != 0x40:
        raise ConnectionError(f"PUBACK {puback.hex()}")


async def connect_devices(
    ports: list[int], devices: int, proxy: bool, chain: bool
) -> tuple[list[asyncio.StreamWriter], int]:
    """Connect `devices` round robin over `ports`; (the held writers, errors)."""
    held: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(CONCURRENCY)
    errors = 0

    async def one(number: int) -> None:
        nonlocal errors
        async with gate:
            packets = device_bytes(number, proxy, chain)
            try:
                await asyncio.wait_for(
                    device(ports[number % len(ports)], packets, held), DEVICE_TIMEOUT
                )
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as error:
                errors += 1
                if errors <= 3:
                    print(f"device {number}: {error!r}", file=sys.stderr)

    await asyncio.gather(*(one(number) for number in range(1, devices + 1)))
    return held, errors


def close_devices(loop: asyncio.AbstractEventLoop, held: list[asyncio.StreamWriter]) -> None:
    for writer in held:
        writer.transport.abort()
    loop.run_until_complete(asyncio.sleep(0.2))


# -- one run ---------------------------------------------------------------------------------


def placement_ports(nodes: list[Node], placement: str) -> list[int]:
    if placement == "node1":
        return [nodes[0].node.mqtt_port]
    return [node.node.mqtt_port for node in nodes]


def cluster_run(
    loop: asyncio.AbstractEventLoop,
    work: Path,
    args: argparse.Namespace,
    name: str,
    source: Path,
    placement: str,
    tag: str,
    traced: bool = False,
) -> dict[str, Any]:
    with cluster(work, args.nodes, source, tag, args.frames, traced) as nodes:
        time.sleep(SETTLE)
        for node in nodes:
            wait_quiet(node.process.pid, 15)
        before = [rss_kib(node.process.pid) for node in nodes]
        snapshots_before = [node.snapshot("before") for node in nodes[:2]] if traced else []
        ports = placement_ports(nodes, placement)
        began = time.monotonic()
        held, errors = loop.run_until_complete(
            connect_devices(ports, args.devices, proxy=True, chain=args.chain_subjects)
        )
        ramp = time.monotonic() - began
        try:
            local = [0] * len(nodes)
            for number in range(1, args.devices + 1):
                local[number % len(ports)] += 1
            connected = len(held)

            def replicated() -> bool:
                for node in nodes:
                    for peer, (_state, filters) in remote_filters(node.node).items():
                        number = int(peer.rsplit("-", 1)[1]) - 1
                        if filters < local[number] - errors:
                            return False
                return True

            wait_until("routes were not replicated", replicated, ROUTES_TIMEOUT)
            time.sleep(SETTLE)
            for node in nodes:
                wait_quiet(node.process.pid, 15)
            after = [rss_kib(node.process.pid) for node in nodes]
            snapshots_after = [node.snapshot("after") for node in nodes[:2]] if traced else []
        finally:
            close_devices(loop, held)
    growth = [a - b for a, b in zip(after, before, strict=True)]
    values: dict[str, Any] = {
        "held": float(connected),
        "errors": float(errors),
        "ramp_s": ramp,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_device": sum(growth) / connected,
    }
    if placement == "node1":
        values["local_kib"] = growth[0] / connected
        values["route_kib"] = statistics.mean(growth[1:]) / connected if len(growth) > 1 else 0.0
        values["fleet_kib_6_nodes"] = values["local_kib"] + 5 * values["route_kib"]
    else:
        values["per_node_kib"] = [g / max(1, n) for g, n in zip(growth, local, strict=False)]
    if traced:
        values["tracemalloc"] = {
            "local": top_sites(snapshots_before[0], snapshots_after[0], connected, args.top),
            "route": top_sites(snapshots_before[1], snapshots_after[1], connected, args.top),
        }
    return values


def mosquitto_run(
    loop: asyncio.AbstractEventLoop, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    with mosquitto(work) as (process, port):
        time.sleep(SETTLE)
        before = rss_kib(process.pid)
        held, errors = loop.run_until_complete(
            connect_devices([port], args.devices, proxy=False, chain=False)
        )
        try:
            time.sleep(SETTLE)
            after = rss_kib(process.pid)
        finally:
            close_devices(loop, held)
    return {
        "held": float(len(held)),
        "errors": float(errors),
        "kib_per_device": (after - before) / max(1, len(held)),
    }


# -- tracemalloc -----------------------------------------------------------------------------

OUR_CODE = (str(ROOT / "broker"), str(ROOT / "lb"), "/broker/", "/lb/")


def _site(traceback: tracemalloc.Traceback) -> str:
    """The innermost frame in our code, with the frame it allocated in when that is not."""
    frames = list(reversed(traceback))  # iteration goes oldest first; most recent first here
    inner = frames[0]
    for frame in frames:
        if any(part in frame.filename for part in OUR_CODE):
            text = f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno}"
            if frame is not inner:
                text += f" <- {Path(inner.filename).name}:{inner.lineno}"
            return text
    return f"{inner.filename}:{inner.lineno}"


def top_sites(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, devices: int, top: int
) -> dict[str, Any]:
    """Growth per device by allocation site, largest first (bytes per device)."""
    sites: dict[str, float] = {}
    for stat in after.compare_to(before, "traceback"):
        key = _site(stat.traceback)
        sites[key] = sites.get(key, 0.0) + stat.size_diff
    total = sum(sites.values())
    ranked = sorted(sites.items(), key=lambda item: -item[1])
    return {
        "total_bytes_per_device": total / devices,
        "sites": [(site, size / devices) for site, size in ranked[:top]],
    }


# -- the suite -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    hard = raise_nofile()
    if args.devices + 500 > hard:
        raise SystemExit(f"--devices {args.devices} needs RLIMIT_NOFILE > {args.devices + 500}")
    sources = {"broker": ROOT}
    if args.baseline:
        sources["baseline"] = Path(args.baseline).resolve()
    runs: list[dict[str, Any]] = []
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory(prefix="broker-memory-", dir=args.workdir) as scratch:
        work = Path(scratch)
        make_certificates(work, args.nodes)
        try:
            for repeat in range(args.repeats):
                order = list(sources) if repeat % 2 == 0 else list(sources)[::-1]
                for placement in args.placements:
                    for name in order:
                        tag = f"{name}-{placement}-{repeat}"
                        values = cluster_run(loop, work, args, name, sources[name], placement, tag)
                        runs.append(
                            {"repeat": repeat, "figure": placement, "broker": name, **values}
                        )
                        progress(placement, name, repeat, values)
                if args.mosquitto:
                    values = mosquitto_run(loop, work, args)
                    runs.append(
                        {"repeat": repeat, "figure": "single", "broker": "mosquitto", **values}
                    )
                    progress("single", "mosquitto", repeat, values)
            if args.tracemalloc:
                for name, source in sources.items():
                    tag = f"{name}-traced"
                    values = cluster_run(loop, work, args, name, source, "node1", tag, traced=True)
                    runs.append({"repeat": 0, "figure": "traced", "broker": name, **values})
                    print_sites(name, values["tracemalloc"])
        finally:
            loop.close()
    return report(runs, args)


def progress(figure: str, broker: str, repeat: int, values: dict[str, Any]) -> None:
    extra = ""
    if "local_kib" in values:
        extra = (
            f" local {values['local_kib']:.2f} route {values['route_kib']:.2f}"
            f" -> 6 nodes {values['fleet_kib_6_nodes']:.2f}"
        )
    elif "per_node_kib" in values:
        extra = " per node " + " ".join(f"{value:.2f}" for value in values["per_node_kib"])
    print(
        f"{figure:7} {broker:9} #{repeat}: {values['kib_per_device']:.2f} KiB/device "
        f"(held {values['held']:.0f}, errors {values['errors']:.0f}){extra}",
        file=sys.stderr,
        flush=True,
    )


def print_sites(name: str, traced: dict[str, Any]) -> None:
    for part in ("local", "route"):
        figures = traced[part]
        print(
            f"\n{name}, {part}: {figures['total_bytes_per_device']:.0f} B/device traced",
            file=sys.stderr,
        )
        for site, size in figures["sites"]:
            print(f"  {size:8.1f}  {site}", file=sys.stderr)


MEDIAN_KEYS = ("kib_per_device", "local_kib", "route_kib", "fleet_kib_6_nodes", "held", "errors")


def report(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for entry in runs:
        if entry["figure"] == "traced":
            continue
        group = medians.setdefault(entry["figure"], {}).setdefault(entry["broker"], {})
        for key in MEDIAN_KEYS:
            if key in entry:
                values = [
                    r[key]
                    for r in runs
                    if r["figure"] == entry["figure"] and r["broker"] == entry["broker"]
                ]
                group[key] = statistics.median(values)
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.system()} {platform.release()} "
        f"{platform.machine()}, {os.cpu_count()} CPUs",
        "mosquitto": mosquitto_version() if args.mosquitto else None,
        "arguments": {key: value for key, value in vars(args).items() if key != "output"},
        "medians": medians,
        "runs": runs,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=3000)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--placements",
        type=lambda text: text.split(","),
        default=["node1", "spread"],
        help="node1 (all devices on node 1: local and route cost apart), spread",
    )
    parser.add_argument("--chain-subjects", action="store_true", help="send the 0xE1 TLV")
    parser.add_argument("--baseline", help="another source tree's broker, run as 'baseline'")
    parser.add_argument("--no-mosquitto", dest="mosquitto", action="store_false")
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--frames", type=int, default=10, help="tracemalloc frames")
    parser.add_argument("--top", type=int, default=30, help="allocation sites printed")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--output", help="write the JSON here (default: stdout only)")
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error("--nodes must be at least 2 (the route cost needs a peer)")
    for placement in args.placements:
        if placement not in ("node1", "spread"):
            parser.error(f"unknown placement {placement!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = source_tree()
    result = run(args)
    result["source"] = source_span(source, "broker memory")
    text = json.dumps(result, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(json.dumps(result["medians"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
