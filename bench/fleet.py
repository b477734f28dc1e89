"""Fleet scale: N devices with their own certificates through lb (or HAProxy 2.6) into a
K-node broker cluster, in one of seven scenarios, with a JSON result and PNG plots.

    ./dev bench --suite fleet ramp --devices 20000 --nodes 3 --hold 60
    ./dev bench --suite fleet storm --devices 50000 --nodes 6 --drop devices
    ./dev bench --suite fleet node-loss --devices 20000 --nodes 3
    ./dev bench --suite fleet reload --devices 20000 --nodes 3 --hold 120 --reload-every 30
    ./dev bench --suite fleet restart --devices 20000 --nodes 3 --hold 30
    ./dev bench --suite fleet partition --devices 6000 --nodes 3 --split 30 --split-drop 0.3
    ./dev bench --suite fleet blackout --devices 6000 --nodes 3 --store disk --outage 10

Scenarios (each runs for every balancer in --balancers, one after the other, on the same
certificates, the same simulator processes and a fresh broker cluster of the same config):

- ramp: every device connects (at most --ramp-concurrency connects in flight per simulator
  process), then the fleet is held for --hold seconds with telemetry (QoS 1, one message per
  device per --telemetry-interval) and commands (--command-rate per second, QoS 1, to the
  devices' command topics).
- storm: ramp, then every device drops at once (--drop devices: each closes its connection;
  --drop balancer: the balancer is stopped and started again) and comes back with
  exponential backoff and full jitter. Time to 99% and 100% back, handshakes/s, refusals by
  reason (as the devices saw them). --storms N: N storms in a row (a settle before each),
  the figures the medians (one storm's time moves by half from run to run here).
- node-loss: ramp, telemetry, then SIGKILL of the last broker node. When the balancer marks
  it down (its log line), how many devices came back, and how many QoS 1 messages were
  acknowledged (PUBACK to the device) but never delivered to the collector, and how many
  commands were acknowledged to the collector but never reached their device. With
  --wills every device sets a QoS 1 will and the collector counts what is published: the
  killed node's devices' wills come from its backup (broker.replica).
  With --forget the killed node is then forgotten (POST /api/cluster/peers/NAME/forget on
  one node, which tells the others) and the fleet held again: what each node kept for it
  before and after, and that nothing acknowledged was lost meanwhile. With --lose-again the
  node before it (whose sessions it kept copies of) is then killed too: with --forget its
  backup has moved and its devices find their sessions; without, they are lost with it.
- restart: ramp, telemetry, then a rolling restart of the brokers as an upgrade does it:
  each node from the last to node-2 in turn is stopped (SIGTERM, as systemd or docker stop
  do) and started again on the same config, and the next waits until the cluster has formed
  again and every device is back. Per restart: how long the stop took, the devices it
  dropped, time to 99% and 100% back, when the node rejoined, the wills published (with
  --wills), and whether the balancer marked it down; the telemetry and commands figures
  cover the whole roll. node-1 is not restarted: it carries the collector (the fleet's
  backend, connected straight to it), whose own reconnects would be measured instead.
  With --evacuate-rate R each node is first evacuated (POST /api/evacuation?rate=R,
  broker.evacuation: its devices told to use another server, R per second) and stopped once
  empty; the restart's figures then count from the evacuation's start, with how long it
  took and the peak handshake rate (what the evacuation spreads out). With --stop-evacuation
  S the brokers do that themselves at SIGTERM (``[cluster] stop_evacuation = S``, at
  --evacuate-rate or the brokers' default rate): the stop's time includes the evacuation.
- partition: ramp, telemetry, then the last node (--split-nodes K: the last K, which still
  reach each other) cut off from every other node for --split seconds (on it, each link
  suspended: POST /api/cluster/peers/NAME/disconnect), as a
  network split between the brokers while the balancer still reaches them all; then the
  links restored (.../connect), the time until the cluster has formed again, and a hold.
  The other nodes take it for lost (its backup publishes the wills of its clients, still
  connected: counted with --wills, as split_wills). With --split-drop F, at the split's
  middle a fraction F of the devices drop and come back through the balancer, many on the
  side of the split their session is not on (claimed from the isolated node's backup, or a
  fresh session there): at the heal the nodes merge the sessions. Telemetry and commands
  are counted across all of it. With --partition-handling pause_minority the isolated node
  closes its devices' connections and its listeners instead (broker.partition): they
  reconnect through the balancer to the others with their sessions, and their wills are
  true.
- blackout: ramp, telemetry, then every broker node SIGKILLed at once (a power loss of the
  brokers' rack; the balancer stays up and marks them down), --outage seconds without a
  broker (the devices keep retrying with their backoff, refused), then every node started
  again on its config (--stagger S apart, node-1 first). With --store disk (each node's
  store in the run's folder, `synchronous = "normal"`: what survives a SIGKILL) the devices
  find their sessions, and nothing acknowledged is lost; in memory mode (the demo's) the
  sessions and what was queued died with the nodes. Figures: when the balancer marked every
  node down, when the nodes listened and the cluster had formed again (from their start),
  time to 99% and 100% back, sessions found, refusals by reason, wills (with --wills and
  disk stores, one for each device connected at the kill: each node publishes the wills its
  store kept, as their connections ended with it; wills_devices: how many devices). The collector
  (connected straight to node-1) connects again to its persistent sessions and sends the
  commands it had not seen acknowledged again.
- reload: ramp, then the hold with a reload (SIGUSR2 to lb's master, or to each HAProxy
  master) every --reload-every seconds; device disconnects during the hold, and near each
  reload, are counted. The demo's `hard-stop-after 20s` is taken out (old processes keep
  their sessions, as a seamless reload does) unless --keep-hard-stop: with it, both
  balancers end an old process's sessions 20 s after each reload, and those disconnects
  count against the reload too.

Processes: the devices run in --simulators forked processes (bench/fleet_devices.py, uvloop,
stdlib ssl, the project's MQTT codec), spread over source addresses 127.0.0.2... (one per
--devices-per-source devices, bound before connect). lb runs `lb -f` with `nbthread
--lb-nbthread` worker processes (default --processes). HAProxy runs as --processes
instances of `haproxy -W -db` (nbthread 1 each) on the same port (HAProxy sets
SO_REUSEPORT, so the kernel spreads connections over them as it does over lb's workers),
each with the largest maxconn its file limit allows. Both read the demo's configs/haproxy.cfg
with only the port, certificate paths, server lines (one per node), nbthread and, for
HAProxy, maxconn changed. Every process started here has its own process group and is
stopped by its pid (SIGTERM, then SIGKILL) in `finally`; every wait is bounded.

Sampled every --sample-interval: connected devices, handshakes and refusals, telemetry
counts, RSS and CPU of the balancer (all its processes), of each broker, of the simulators.
The result (bench/results/fleet-<scenario>-<time>.json) holds the figures per balancer, the
ratio lb / HAProxy for each, the samples, and excerpts of each balancer's log; the plots
(bench/fleet_plots.py) go beside it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import itertools
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.fleet_devices import (  # noqa: E402
    DeviceSettings,
    Slice,
    collector_main,
    process_main,
    read_report,
    simulator_main,
    sources_for,
)
from bench.ports import free_port  # noqa: E402
from bench.run import (  # noqa: E402
    HAPROXY,
    Started,
    haproxy_version,
    source_span,
    source_tree,
    start,
    stop,
    wait_listening,
)
from demo import topology  # noqa: E402
from lb.config.keywords import parse_time  # noqa: E402

VENV_BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"
DEMO_CONFIG = ROOT / topology.LB_CONFIG
SCENARIOS = ("ramp", "storm", "node-loss", "reload", "restart", "partition", "blackout")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
#: Connections one HAProxy process takes before its file limit (two descriptors each).
FD_RESERVE = 200
#: Poll period of the coordinator's loop (pipes, scenario events).
POLL = 0.25
#: Bounds of the setup steps.
PKI_TIMEOUT = 900.0
PREPARE_TIMEOUT = 900.0
START_TIMEOUT = 60.0
REPORT_TIMEOUT = 300.0
#: After telemetry stops: wait until the collector's count is still for this long.
DRAIN_QUIET = 3.0
DRAIN_TIMEOUT = 60.0
#: At the drain: wait this long at most (and --storm-timeout) for every device to be back.
DRAIN_BACK_TIMEOUT = 120.0
#: A disconnect within this many seconds after a reload is counted against the reload.
RELOAD_WINDOW = 10.0
#: A progress line every this many samples.
PROGRESS_EVERY = 30
#: Seconds between a balancer's start and the first sample (its workers finish starting).
SETTLE = 2.0
#: Log lines kept as excerpts per kind.
EXCERPTS = 6
SERVER_STATE = re.compile(r"Server (?P<backend>[^/\s]+)/(?P<server>\S+) is (?P<state>UP|DOWN)")


# -- processes -----------------------------------------------------------------------------


def process_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, cpu ticks, rss KiB) for every process, from one pass over /proc."""
    table: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is state (field 3): ppid 4, utime 14, stime 15, rss 24 (in pages)
        table[int(entry)] = (
            int(fields[1]),
            int(fields[11]) + int(fields[12]),
            int(fields[21]) * PAGE_KIB,
        )
    return table


#: The kernel's TCP counters that say a listening socket's queue was full (/proc/net/netstat,
#: this network namespace, every listener in it): ListenOverflows counts a SYN or a
#: handshake's last ACK dropped because the listener's accept queue was full, ListenDrops
#: those and every other drop at a listener, TCPSynRetrans the SYNs clients sent again. A
#: device whose SYN or ACK was dropped waits 1, 2, 4, 8... s to send it again, inside its
#: connect timeout: "timeout (TCP+TLS)" with no handshake work spent on it by the balancer.
KERNEL_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPSynRetrans")


def kernel_counters() -> dict[str, int]:
    """The KERNEL_COUNTERS now (missing ones are left out, e.g. outside Linux)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    found: dict[str, int] = {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if not names.startswith("TcpExt:"):
            continue
        for name, value in zip(names.split()[1:], values.split()[1:], strict=False):
            if name in KERNEL_COUNTERS:
                found[name] = int(value)
    return found


def tree_usage(table: dict[int, tuple[int, int, int]], roots: list[int]) -> tuple[float, int, int]:
    """(CPU seconds, RSS KiB, process count) of `roots` and all their descendants."""
    seen = tree_pids(table, roots)
    cpu = sum(table[pid][1] for pid in seen) / CLOCK_TICKS
    return cpu, sum(table[pid][2] for pid in seen), len(seen)


def open_files(pid: int) -> int:
    """Descriptors a process holds (how close it is to its file limit)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def tree_pids(table: dict[int, tuple[int, int, int]], roots: list[int]) -> set[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (ppid, _, _) in table.items():
        children[ppid].append(pid)
    seen: set[int] = set()
    todo = [root for root in roots if root in table]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children.get(pid, []))
    return seen


@dataclass
class Worker:
    """A forked simulator or collector process and its pipe."""

    name: str
    process: multiprocessing.process.BaseProcess
    pipe: Connection
    status: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[Any, ...]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def poll(self) -> None:
        for _ in range(10_000):
            try:
                if not self.pipe.poll():
                    return
                message = self.pipe.recv()
            except (EOFError, OSError) as error:
                self.process.join(2)
                raise RuntimeError(
                    f"{self.name}: pipe closed ({error!r}); exit code {self.process.exitcode}"
                ) from None
            if message[0] == "status":
                self.status = message[1]
            elif message[0] == "error":
                raise RuntimeError(f"{self.name} failed: {message[1]}")
            else:
                self.events.append(message)

    def wait_event(self, name: str, timeout: float) -> tuple[Any, ...]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            for index, event in enumerate(self.events):
                if event[0] == name:
                    return self.events.pop(index)
            if not self.process.is_alive():
                self.poll()
                raise RuntimeError(f"{self.name} exited ({self.process.exitcode})")
            self.pipe.poll(min(0.2, max(0.0, deadline - time.monotonic())))
        raise TimeoutError(f"{self.name}: no {name!r} within {timeout:.0f}s")

    def send(self, *message: Any) -> None:
        self.pipe.send(message)

    def stop(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.pipe.send(("stop",))
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.pipe.close()


def fork(name: str, target: Callable[..., Any], *args: Any) -> Worker:
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    process = context.Process(target=process_main, args=(target, theirs, *args), daemon=True)
    process.start()
    theirs.close()
    return Worker(name, process, ours)


# -- the PKI, the cluster, the balancers ---------------------------------------------------


def make_pki(directory: Path, devices: int, nodes: int) -> float:
    """lb-pki's demo set (CAs, server, node certificates) and `devices` device certificates,
    unless `directory` already holds them; returns the seconds `lb-pki device` took."""
    lb_pki = str(VENV_BIN / "lb-pki")
    if not (directory / "CaRoot-key.pem").exists():
        subprocess.run(
            [lb_pki, "demo", "--dir", str(directory), "--devices", "0", "--nodes", str(nodes)],
            check=True,
            capture_output=True,
            timeout=PKI_TIMEOUT,
        )
    if not (directory / f"node-{nodes}.pem").exists():
        names = [f"node-{n}" for n in range(1, nodes + 1)]
        subprocess.run(
            [
                lb_pki,
                "node",
                *names,
                "--dir",
                str(directory),
                "--dns",
                "localhost",
                "--ip",
                "127.0.0.1",
                "--force",
            ],
            check=True,
            capture_output=True,
            timeout=PKI_TIMEOUT,
        )
    have = 0
    while have < devices and (directory / f"device-{have + 1:04d}-key.pem").exists():
        have += 1
    if have >= devices:
        return 0.0
    started = time.monotonic()
    # --force only over a partial set: it writes each file beside and renames (slower)
    force = ["--force"] if have else []
    subprocess.run(
        [lb_pki, "device", "--dir", str(directory), "--count", str(devices), *force],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=PKI_TIMEOUT,
    )
    return time.monotonic() - started


def cluster_nodes(count: int) -> tuple[topology.Node, ...]:
    return tuple(
        topology.node(number, free_port(), free_port(), free_port())
        for number in range(1, count + 1)
    )


def admin_json(node: topology.Node, path: str, method: str = "GET") -> Any:
    url = f"http://127.0.0.1:{node.admin_port}{path}"
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=2.0) as r:
        return json.load(r)


#: Each node's cluster link counters summed over its peers, at the end of a phase: what the
#: cluster's own traffic cost (frames and TLS writes per device).
LINK_COUNTERS = (
    "frames_sent",
    "writes",
    "bytes_sent",
    "acks_sent",
    "reliable_sent",
    "claims_sent",
    "transfers_sent",
)


def broker_counters(nodes: tuple[topology.Node, ...]) -> dict[str, Any]:
    """Each node's /api/stats at the end of a phase (its drops, takeovers and forwards: what
    a figure like commands_acked_undelivered is traced with) with its cluster links'
    LINK_COUNTERS (as ``links``), or the error reading them."""
    counters: dict[str, Any] = {}
    for node in nodes:
        try:
            stats = admin_json(node, "/api/cluster")
            links = collections.Counter[str]()
            for member in stats.get("members", []):
                for key in LINK_COUNTERS:
                    links[key] += int(member.get("counters", {}).get(key, 0))
            counters[node.name] = {**admin_json(node, "/api/stats"), "links": dict(links)}
        except (OSError, ValueError) as error:
            counters[node.name] = {"error": str(error)}
    return counters


def cluster_formed(nodes: tuple[topology.Node, ...]) -> bool:
    for node in nodes:
        try:
            members = admin_json(node, "/api/cluster").get("members", [])
        except (OSError, urllib.error.URLError, ValueError):
            return False
        up = {m.get("name") for m in members if isinstance(m, dict) and m.get("state") == "up"}
        if not {other.name for other in nodes if other != node} <= up:
            return False
    return True


def start_cluster(
    nodes: tuple[topology.Node, ...],
    certs: Path,
    work: Path,
    started: list[Started],
    session_replicas: int | None = None,
    stop_evacuation: tuple[float, int | None] | None = None,
    partition_handling: str | None = None,
    disk: bool = False,
) -> list[Started]:
    """Every node on its config in `work` (with `disk`, each a disk store there), until
    they listen and the cluster has formed."""
    brokers = []
    for node in nodes:
        config = work / f"{node.name}.toml"
        config.write_text(
            topology.broker_config(
                node,
                nodes,
                certs=str(certs),
                session_replicas=session_replicas,
                stop_evacuation=stop_evacuation,
                partition_handling=partition_handling,
                store_path=str(work / f"{node.name}.db") if disk else None,
            )
        )
        broker = start(node.name, [str(VENV_BIN / "broker"), "-c", str(config)], work, None)
        started.append(broker)
        brokers.append(broker)
    for node, broker in zip(nodes, brokers, strict=True):
        wait_listening(node.mqtt_port, broker, START_TIMEOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while not cluster_formed(nodes):
        if time.monotonic() > deadline:
            raise TimeoutError("the broker cluster did not form")
        time.sleep(0.2)
    return brokers


def balancer_config(
    kind: str,
    port: int,
    certs: Path,
    nodes: tuple[topology.Node, ...],
    nbthread: int,
    maxsslrate: int | None = None,
    instances: int = 1,
    hard_stop: bool = True,
) -> str:
    """configs/haproxy.cfg (the demo's) with this run's port, certificates and nodes; lb
    gets `nbthread`, HAProxy one thread and the maxconn its file limit allows. With
    `maxsslrate` (TLS handshakes per second in all): lb's one limit over its workers, each
    of HAProxy's `instances` (one process each on the port) its share, rounded up. Without
    `hard_stop`, the demo's `hard-stop-after` goes: after a reload the old processes keep
    their sessions until the devices leave (both balancers end every session of an old
    process that many seconds after the reload, which a device on a long-lived connection
    counts as a disconnect)."""
    text = DEMO_CONFIG.read_text()
    bind = f"bind {topology.LOCAL_HOST}:{topology.LB_PORT} "
    if bind not in text:
        raise ValueError(f"{DEMO_CONFIG}: no '{bind.strip()}' line")
    text = text.replace(bind, f"bind 127.0.0.1:{port} ").replace(" certs/", f" {certs}/")
    lines = text.splitlines()
    for index, line in enumerate(lines):
        # Other binds (the Prometheus exporter's fixed 8405): a free port of this run's, so
        # that a demo or another run on this machine does not stop the balancer.
        words = line.split()
        if words[:1] == ["bind"] and words[1] != f"127.0.0.1:{port}":
            host = words[1].rsplit(":", 1)[0]
            lines[index] = line.replace(words[1], f"{host}:{free_port()}", 1)
    servers = [i for i, line in enumerate(lines) if line.strip().startswith("server ")]
    if not servers:
        raise ValueError(f"{DEMO_CONFIG}: no server line")
    template = lines[servers[0]].split()
    indent = lines[servers[0]][: len(lines[servers[0]]) - len(lines[servers[0]].lstrip())]
    made = [
        indent + " ".join(["server", node.server, f"127.0.0.1:{node.mqtt_port}", *template[3:]])
        for node in nodes
    ]
    lines = lines[: servers[0]] + made + lines[servers[-1] + 1 :]
    if not hard_stop:
        lines = [line for line in lines if line.split()[:1] != ["hard-stop-after"]]
    global_at = lines.index("global")
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if kind == "haproxy":
        # HAProxy refuses to start when maxconn needs more files than it may open: give
        # each instance what fits (two descriptors per session), as an operator would.
        for index in range(global_at + 1, len(lines)):
            if lines[index] and not lines[index][0].isspace():
                break  # the next section
            if lines[index].split()[:1] == ["maxconn"]:
                lines[index] = f"    maxconn {(limit - FD_RESERVE) // 2}"
        lines.insert(global_at + 1, "    nbthread 1")
        if maxsslrate is not None:
            lines.insert(global_at + 1, f"    maxsslrate {-(-maxsslrate // instances)}")
    else:
        if nbthread > 1:
            lines.insert(global_at + 1, f"    nbthread {nbthread}")
        if maxsslrate is not None:
            lines.insert(global_at + 1, f"    maxsslrate {maxsslrate}")
    return "\n".join(lines) + "\n"


def hard_stop_after(config: str) -> float:
    """The config's `hard-stop-after` in seconds (0 without one)."""
    for line in config.splitlines():
        words = line.split()
        if words[:1] == ["hard-stop-after"] and len(words) == 2:
            return parse_time(words[1])
    return 0.0


@dataclass
class Balancer:
    """lb (one master) or HAProxy (several masters on one port) and how to reach them."""

    kind: str
    port: int
    config: Path
    work: Path
    count: int
    processes: list[Started] = field(default_factory=list)
    generation: int = 0

    def command(self) -> list[str]:
        if self.kind == "lb":
            return [str(VENV_BIN / "lb"), "-f", str(self.config)]
        return [HAPROXY, "-W", "-db", "-f", str(self.config)]

    def start(self, started: list[Started]) -> None:
        self.generation += 1
        instances = 1 if self.kind == "lb" else self.count
        for index in range(instances):
            name = f"{self.kind}-{index + 1}-g{self.generation}"
            process = start(name, self.command(), self.work, None)
            started.append(process)
            self.processes.append(process)
        for process in self.processes:
            wait_listening(self.port, process, START_TIMEOUT)
        # Each HAProxy instance binds its own SO_REUSEPORT socket: wait for all of them.
        deadline = time.monotonic() + START_TIMEOUT
        while listeners(self.port) < instances and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self, started: list[Started]) -> None:
        for process in self.processes:
            stop(process)
            if process in started:
                started.remove(process)
        self.processes = []

    def reload(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGUSR2)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def logs(self) -> list[Path]:
        return sorted(self.work.glob(f"{self.kind}-*.log"))


def listeners(port: int) -> int:
    """Listening TCP sockets on 127.0.0.1:`port` (one per SO_REUSEPORT member)."""
    wanted = f"0100007F:{port:04X}"
    count = 0
    with contextlib.suppress(OSError), open("/proc/net/tcp") as table:
        for line in table:
            fields = line.split()
            if len(fields) > 3 and fields[1] == wanted and fields[3] == "0A":
                count += 1
    return count


def log_summary(paths: list[Path]) -> dict[str, Any]:
    """Line counts of the balancer's logs by kind, and a few excerpts of each kind."""
    counts: collections.Counter[str] = collections.Counter()
    excerpts: dict[str, list[str]] = collections.defaultdict(list)
    states: list[str] = []
    tracebacks: list[list[str]] = []
    for path in paths:
        with path.open(errors="replace") as stream:
            in_traceback = False
            for raw in stream:
                line = raw.rstrip("\n")
                counts["lines"] += 1
                if line.startswith("Traceback"):
                    in_traceback = len(tracebacks) < 3
                    if in_traceback:
                        tracebacks.append([f"{path.name}:"])
                if in_traceback:  # the whole block, up to the exception's own line
                    tracebacks[-1].append(line[:300])
                    in_traceback = line.startswith((" ", "Traceback"))
                kind = None
                if SERVER_STATE.search(line):
                    kind = "server state"
                    states.append(f"{path.name}: {line[:300]}")
                elif "Too many open files" in line:
                    kind = "too many open files"
                elif "SSL handshake failure" in line:
                    kind = "ssl handshake failure"
                elif "handshake queue:" in line:
                    kind = "handshake queue"
                elif "heap trimmed" in line:
                    kind = "heap trim"
                elif "ALERT" in line:
                    kind = "alert"
                elif "WARNING" in line or "[WARNING]" in line:
                    kind = "warning"
                elif "Traceback" in line or "Error" in line:
                    kind = "error"
                if kind is not None:
                    counts[kind] += 1
                    if len(excerpts[kind]) < EXCERPTS:
                        excerpts[kind].append(f"{path.name}: {line[:400]}")
    return {
        "counts": dict(counts),
        "excerpts": dict(excerpts),
        "server_states": states[:40],
        "tracebacks": ["\n".join(block) for block in tracebacks],
    }


# -- sampling and the scenario loop --------------------------------------------------------


class Run:
    """One balancer's phase: its processes, the workers, the samples and the figures."""

    def __init__(
        self,
        args: argparse.Namespace,
        balancer: Balancer,
        brokers: list[Started],
        nodes: tuple[topology.Node, ...],
        simulators: list[Worker],
        collector: Worker,
        started: list[Started],
    ) -> None:
        self.args = args
        self.balancer = balancer
        self.brokers = brokers
        self.nodes = nodes
        self.simulators = simulators
        self.collector = collector
        self.samples: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.figures: dict[str, Any] = {}
        self.t0 = time.monotonic()
        self.next_sample = 0.0
        self.started = started
        self.directory = balancer.work
        self.before_ramp: dict[str, Any] = {}
        self.reload_times: list[float] = []
        self.disconnect_times: list[float] = []

    # -- reading the workers

    def poll(self) -> None:
        for worker in [*self.simulators, self.collector]:
            worker.poll()
        if time.monotonic() >= self.next_sample:
            self.sample()
            self.next_sample = time.monotonic() + self.args.sample_interval
            if len(self.samples) % PROGRESS_EVERY == 0:
                latest = self.latest()
                # per process: shows how evenly the balancer's processes share the fleet
                pids = tree_pids(process_table(), self.balancer.pids)
                latest["balancer_fds"] = sorted((open_files(pid) for pid in pids), reverse=True)
                latest["broker_fds"] = [open_files(b.pid) for b in self.brokers]
                self.mark(
                    "progress",
                    connected=latest["connected"],
                    handshakes=latest["handshakes"],
                    refusals=latest["refusals"],
                    balancer_mib=latest["balancer_rss_kib"] // 1024,
                    most_fds=latest["balancer_fds"][:3],
                )

    def total(self, key: str) -> int:
        return sum(int(w.status.get(key, 0)) for w in self.simulators)

    def counter(self, key: str) -> collections.Counter[str]:
        result: collections.Counter[str] = collections.Counter()
        for worker in self.simulators:
            result.update(worker.status.get(key, {}))
        return result

    def sample(self) -> None:
        table = process_table()
        cpu, rss, count = tree_usage(table, self.balancer.pids)
        brokers = [tree_usage(table, [b.pid]) for b in self.brokers]
        sims_cpu, sims_rss, _ = tree_usage(table, [w.pid for w in self.simulators])
        collector = self.collector.status
        self.samples.append(
            {
                "t": round(time.monotonic() - self.t0, 2),
                "connected": self.total("connected"),
                "handshakes": self.total("handshakes"),
                "attempts": self.total("attempts"),
                "refusals": sum(self.counter("refusals").values()),
                "disconnects": sum(self.counter("disconnects").values()),
                "published": self.total("published"),
                "acked": self.total("acked"),
                "delivered": int(collector.get("telemetry_received", 0)),
                "wills": int(collector.get("wills", 0)),
                "wills_devices": int(collector.get("wills_devices", 0)),
                "commands_received": self.total("commands_received"),
                "balancer_cpu_s": round(cpu, 2),
                "balancer_rss_kib": rss,
                "balancer_processes": count,
                "broker_cpu_s": [round(b[0], 2) for b in brokers],
                "broker_rss_kib": [b[1] for b in brokers],
                "simulators_cpu_s": round(sims_cpu, 2),
                "simulators_rss_kib": sims_rss,
                "kernel": kernel_counters(),
            }
        )

    def wait(self, seconds: float, until: Callable[[], bool] | None = None) -> bool:
        """Poll for `seconds`, or until `until()` holds (then True)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.poll()
            if until is not None and until():
                return True
            time.sleep(POLL)
        return until() if until is not None else False

    def mark(self, what: str, **extra: Any) -> None:
        event = {"t": round(time.monotonic() - self.t0, 2), "event": what, **extra}
        self.events.append(event)
        print(f"  [{self.balancer.kind} {event['t']:7.1f}s] {what} {extra or ''}", flush=True)

    def broadcast(self, *message: Any) -> None:
        for worker in self.simulators:
            worker.send(*message)

    def latest(self) -> dict[str, Any]:
        return self.samples[-1] if self.samples else {}

    # -- the steps every scenario shares

    def ramp(self) -> None:
        args = self.args
        self.poll()
        self.sample()
        before = self.latest()
        self.mark("ramp", devices=args.devices)
        self.broadcast("connect", args.ramp_concurrency)
        started = time.monotonic()
        reached = self.wait(args.ramp_timeout, lambda: self.total("connected") >= args.devices)
        self.sample()
        after = self.latest()
        seconds = time.monotonic() - started
        self.mark("ramp done", connected=after["connected"], seconds=round(seconds, 1))
        handshakes = after["handshakes"] - before["handshakes"]
        cpu = after["balancer_cpu_s"] - before["balancer_cpu_s"]
        self.figures.update(
            {
                "ramp_seconds": round(seconds, 1) if reached else None,
                "ramp_connected": after["connected"],
                "ramp_handshakes_per_s": round(handshakes / seconds, 1) if seconds else None,
                "ramp_balancer_cpu_us_per_handshake": round(cpu / handshakes * 1e6)
                if handshakes
                else None,
                "ramp_refusals": dict(self.counter("refusals")),
            }
        )
        self.before_ramp = before

    def hold(
        self, seconds: float, hooks: Callable[[float], None] | None = None, prefix: str = ""
    ) -> None:
        """Telemetry and commands on, for `seconds`; `hooks(elapsed)` on every poll. The
        figures get `prefix` (a second hold must not overwrite the first one's)."""
        self.broadcast("telemetry", True)
        self.collector.send("commands", self.args.command_rate)
        self.sample()
        start_sample = self.latest()
        low = start_sample["connected"]
        self.mark("hold", seconds=seconds)
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            self.poll()
            low = min(low, self.total("connected"))
            if hooks is not None:
                hooks(time.monotonic() - started)
            time.sleep(POLL)
        self.sample()
        end = self.latest()
        held = end["connected"]
        ramp = self.before_ramp
        figures = {
            "held": held,
            "held_min": low,
            "hold_seconds": seconds,
            "balancer_rss_kib": end["balancer_rss_kib"],
            "balancer_kib_per_device": round(
                (end["balancer_rss_kib"] - ramp["balancer_rss_kib"]) / held, 2
            )
            if held
            else None,
            "broker_rss_kib": end["broker_rss_kib"],
            "broker_kib_per_device": round(
                (sum(end["broker_rss_kib"]) - sum(ramp["broker_rss_kib"])) / held, 2
            )
            if held
            else None,
            "simulator_kib_per_device": round(
                (end["simulators_rss_kib"] - ramp["simulators_rss_kib"]) / held, 2
            )
            if held
            else None,
            "hold_messages": end["acked"] - start_sample["acked"],
            "hold_balancer_cpu_percent": round(
                (end["balancer_cpu_s"] - start_sample["balancer_cpu_s"]) / seconds * 100, 1
            ),
            "hold_broker_cpu_percent": round(
                (sum(end["broker_cpu_s"]) - sum(start_sample["broker_cpu_s"])) / seconds * 100,
                1,
            ),
            "hold_disconnects": end["disconnects"] - start_sample["disconnects"],
        }
        self.figures.update({prefix + key: value for key, value in figures.items()})

    def finish(self) -> dict[str, Any]:
        """Telemetry off, every device back (bounded), drain, the reports, then every device
        closes."""
        self.broadcast("telemetry", False)
        self.collector.send("commands", 0)
        self.mark("drain")
        # The devices a restart or a storm dropped last may still be in their backoff (or a
        # loaded simulator has not noticed them gone yet): the commands queued in their
        # sessions reach them once they are back, and would otherwise count as undelivered
        # (seen: three 2,000-device restart fleets at once, the simulators saturated, ended
        # with hundreds of devices still away and as many commands "undelivered").
        reached = max((sample["connected"] for sample in self.samples), default=0)
        asked = time.time()

        def back() -> bool:
            fresh = all(w.status.get("time", 0) > asked for w in self.simulators)
            return fresh and self.total("connected") >= reached

        self.wait(min(self.args.storm_timeout, DRAIN_BACK_TIMEOUT), back)
        self.figures["drain_connected"] = self.total("connected")
        self.figures["drain_connected_before"] = reached
        last, still_since = -1, time.monotonic()
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline:
            self.poll()
            now = (
                int(self.collector.status.get("telemetry_received", 0))
                + self.total("acked")
                + self.total("commands_received")
            )
            if now != last:
                last, still_since = now, time.monotonic()
            elif time.monotonic() - still_since >= DRAIN_QUIET:
                break
            time.sleep(POLL)
        self.sample()
        reports = []
        for worker in [*self.simulators, self.collector]:
            worker.send("report", str(self.directory / f"{worker.name}.report"))
        for worker in self.simulators:
            reports.append(read_report(worker.wait_event("report", REPORT_TIMEOUT)[1]))
        collected = read_report(self.collector.wait_event("report", REPORT_TIMEOUT)[1])
        self.broadcast("close")
        for worker in self.simulators:
            worker.wait_event("closed", REPORT_TIMEOUT)
        self.wait(2.0)
        self.figures.update(accounting(reports, collected))
        self.figures["refusals_total"] = dict(self.counter("refusals"))
        self.figures["disconnects_total"] = dict(self.counter("disconnects"))
        self.disconnect_times = sorted(t for r in reports for t in r["disconnect_times"])
        return collected


def accounting(reports: list[dict[str, Any]], collected: dict[str, Any]) -> dict[str, Any]:
    """Acknowledged vs delivered, both ways, from the per-device sequences. A command sent
    before its device first subscribed had no session to go to (MQTT drops it): counted
    apart, not as undelivered."""
    received: dict[int, list[int]] = collected["received"]
    commands_acked: dict[int, list[int]] = collected["commands"]
    command_times: dict[int, float] = collected.get("command_times", {})
    sent = acked = delivered = lost = 0
    lost_devices = 0
    commands_received: dict[int, list[int]] = {}
    subscribed_at: dict[int, float | None] = {}
    lost_examples: list[str] = []
    for report in reports:
        for number, count, unacked, commands, first_connected in report["devices"]:
            commands_received[number] = commands
            subscribed_at[number] = first_connected
            sent += count
            acknowledged = set(range(count)) - set(unacked)
            acked += len(acknowledged)
            seen = set(received.get(number, ()))
            delivered += len(acknowledged & seen)
            missing = acknowledged - seen
            if missing:
                lost += len(missing)
                lost_devices += 1
                if len(lost_examples) < 10:
                    lost_examples.append(f"device-{number:04d}: {sorted(missing)[:5]}")
    commands_acked_total = commands_delivered = commands_early = 0
    undelivered_examples: list[str] = []
    for number, sequences in commands_acked.items():
        got = set(commands_received.get(number, ()))
        since = subscribed_at.get(number)
        for sequence in sequences:
            if sequence in got:
                commands_acked_total += 1
                commands_delivered += 1
            elif since is None or command_times.get(sequence, 0.0) < since:
                commands_early += 1
            else:
                commands_acked_total += 1
                if len(undelivered_examples) < 20:
                    sent_at = command_times.get(sequence, 0.0)
                    undelivered_examples.append(
                        f"device-{number:04d}: command {sequence} sent at {sent_at:.3f}"
                    )
    return {
        "telemetry_sent": sent,
        "telemetry_acked": acked,
        "telemetry_acked_delivered": delivered,
        "telemetry_acked_lost": lost,
        "telemetry_lost_devices": lost_devices,
        "telemetry_lost_examples": lost_examples,
        "telemetry_duplicates": collected.get("duplicates", 0),
        "commands_sent": collected.get("commands_sent", 0),
        "commands_before_subscription": commands_early,
        "commands_acked": commands_acked_total,
        "commands_acked_delivered": commands_delivered,
        "commands_acked_undelivered": commands_acked_total - commands_delivered,
        "commands_undelivered_examples": undelivered_examples,
    }


# -- scenarios -----------------------------------------------------------------------------


def scenario_ramp(run: Run) -> None:
    run.ramp()
    run.hold(run.args.hold)


def time_back(run: Run, since: float, target: int, timeout: float) -> dict[str, Any]:
    """Seconds from `since` until 99% and 100% of `target` devices are connected again."""
    marks: dict[str, float | None] = {"99": None, "100": None}
    wall = time.time() - (time.monotonic() - since)

    def check() -> bool:
        if any(w.status.get("time", 0) <= wall for w in run.simulators):
            return False  # a status from before the event says nothing about it
        connected = run.total("connected")
        now = time.monotonic() - since
        if marks["99"] is None and connected >= math.ceil(target * 0.99):
            marks["99"] = now
        if marks["100"] is None and connected >= target:
            marks["100"] = now
        return marks["100"] is not None

    run.wait(timeout, check)
    return {
        "back_99_seconds": round(marks["99"], 1) if marks["99"] is not None else None,
        "back_100_seconds": round(marks["100"], 1) if marks["100"] is not None else None,
        "back_connected": run.total("connected"),
    }


def scenario_storm(run: Run) -> None:
    """Ramp, then --storms storms, each after a settle; the storm_* figures are the medians
    over the storms (counts of refusals and kernel events: their sums), each storm's own in
    storm_runs. One storm's time to 100% moved 18-36 s for HAProxy here (bench/README.md)."""
    args = run.args
    run.ramp()
    storms = []
    for number in range(1, args.storms + 1):
        run.hold(args.settle, prefix="" if number == 1 else f"before_storm_{number}_")
        storms.append(one_storm(run, number))
    run.figures["storm_runs"] = storms
    run.figures.update(combined_storms(storms))
    run.hold(args.settle, prefix="after_storm_")


def combined_storms(storms: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each number over the storms, the sum of each count by reason."""
    combined: dict[str, Any] = {}
    for key, value in storms[0].items():
        values = [storm[key] for storm in storms]
        if isinstance(value, dict):
            summed: collections.Counter[str] = collections.Counter()
            for counts in values:
                summed.update(counts)
            combined[key] = dict(summed)
        elif all(isinstance(v, int | float) for v in values):
            middle = statistics.median(values)
            combined[key] = round(middle, 1) if isinstance(middle, float) else middle
        else:  # a storm that did not end: no median says how long they take
            combined[key] = None
    return combined


def peak_handshakes(run: Run, since: dict[str, Any]) -> float | None:
    """The highest handshake rate between two samples after the sample ``since``."""
    samples = [s for s in run.samples if s["t"] >= since["t"]]
    rates = [
        (b["handshakes"] - a["handshakes"]) / (b["t"] - a["t"])
        for a, b in itertools.pairwise(samples)
        if b["t"] > a["t"]
    ]
    return round(max(rates), 1) if rates else None


def one_storm(run: Run, number: int) -> dict[str, Any]:
    args = run.args
    run.sample()
    before = run.latest()
    refusals_before = run.counter("refusals")
    target = before["connected"]
    since = time.monotonic()
    if args.drop == "devices":
        run.mark(f"storm {number}: every device closes", devices=target)
        run.broadcast("drop")
        for worker in run.simulators:
            worker.status = worker.wait_event("dropped", START_TIMEOUT)[2]
    else:
        run.mark(f"storm {number}: balancer restart", devices=target)
        balancer = run.balancer
        balancer.stop(run.started)
        balancer.start(run.started)
        run.mark("balancer listening again")
    back = time_back(run, since, target, args.storm_timeout)
    run.sample()
    after = run.latest()
    seconds = time.monotonic() - since
    handshakes = after["handshakes"] - before["handshakes"]
    peak = peak_handshakes(run, before)
    refusals = run.counter("refusals") - refusals_before
    run.mark(f"storm {number} done", **back)
    return {
        "storm_devices": target,
        **{f"storm_{k}": v for k, v in back.items()},
        "storm_handshakes": handshakes,
        "storm_handshakes_per_s": round(handshakes / seconds, 1) if seconds else None,
        "storm_peak_handshakes_per_s": peak,
        "storm_refusals": dict(refusals),
        "storm_refusals_total": sum(refusals.values()),
        "storm_attempts": after["attempts"] - before["attempts"],
        "storm_wills": after["wills"] - before["wills"],
        # Namespace-wide: other processes' listeners (a test suite beside) count too.
        "storm_kernel": {
            name: after["kernel"][name] - before["kernel"][name]
            for name in after.get("kernel", {})
            if name in before.get("kernel", {})
        },
        "storm_balancer_cpu_us_per_handshake": round(
            (after["balancer_cpu_s"] - before["balancer_cpu_s"]) / handshakes * 1e6
        )
        if handshakes
        else None,
    }


class LogWatch:
    """Finds a text in log files that are still growing (reads only what is new)."""

    def __init__(self, paths: list[Path], text: str) -> None:
        self.offsets = dict.fromkeys(paths, 0)
        self.text = text
        self.found = False

    def __call__(self) -> bool:
        for path, offset in self.offsets.items():
            if self.found:
                break
            with contextlib.suppress(OSError), path.open("rb") as stream:
                stream.seek(offset)
                data = stream.read()
                # keep a line's worth of overlap so a match across two reads is found
                self.offsets[path] = max(offset, offset + len(data) - len(self.text))
                self.found = self.text.encode() in data
        return self.found


def scenario_node_loss(run: Run) -> None:
    args = run.args
    run.ramp()
    run.hold(args.settle)
    lose_node(run, len(run.nodes) - 1)
    run.hold(args.hold, prefix="after_loss_")
    if args.forget:
        forget_node(run, run.nodes[-1])
    if args.lose_again:
        # The node whose backup the first one was: with --forget its sessions were copied
        # to the next node since; without, they have no copy but its own.
        lose_node(run, len(run.nodes) - 2, "second_")
        run.hold(args.hold, prefix="after_second_loss_")


def lose_node(run: Run, index: int, prefix: str = "") -> None:
    """SIGKILL broker ``index`` under load; when the balancer marks it down and its devices
    are back (figures under ``prefix``)."""
    args = run.args
    victim_node, victim = run.nodes[index], run.brokers[index]
    run.sample()
    before = run.latest()
    present_before = run.total("sessions_present")
    run.mark("SIGKILL", node=victim_node.name, pid=victim.pid)
    since = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(victim.pid, signal.SIGKILL)
    victim.popen.wait(10)
    watch = LogWatch(run.balancer.logs(), f"/{victim_node.server} is DOWN")
    marked: float | None = None
    marks: dict[str, float | None] = {"99": None, "100": None}
    target = before["connected"]
    wall = time.time()

    def check() -> bool:
        nonlocal marked
        if any(w.status.get("time", 0) <= wall for w in run.simulators):
            return False  # a status from before the kill says nothing about it
        now = time.monotonic() - since
        if marked is None and watch():
            marked = now
            run.mark("marked down", node=victim_node.name)
        connected = run.total("connected")
        if marks["99"] is None and connected >= math.ceil(target * 0.99):
            marks["99"] = now
        if marks["100"] is None and connected >= target:
            marks["100"] = now
        return marks["100"] is not None and marked is not None

    run.wait(args.storm_timeout, check)
    run.sample()
    run.mark("after the loss", connected=run.total("connected"))
    figures = {
        "node_killed": victim_node.name,
        "node_devices_dropped": run.latest()["disconnects"] - before["disconnects"],
        "node_marked_down_seconds": round(marked, 1) if marked is not None else None,
        "node_back_99_seconds": round(marks["99"], 1) if marks["99"] is not None else None,
        "node_back_100_seconds": round(marks["100"], 1) if marks["100"] is not None else None,
        "node_refusals": dict(run.counter("refusals")),
        # --wills: published for the killed node's devices (by its backup) and for any
        # other connection that ended without DISCONNECT meanwhile.
        "node_wills": run.latest()["wills"] - before["wills"],
        # Devices back with session_present=1 (their session found): the killed node's
        # devices, when its backup had their sessions.
        "node_sessions_present": run.total("sessions_present") - present_before,
    }
    run.figures.update({prefix + key: value for key, value in figures.items()})


def forget_node(run: Run, victim: topology.Node) -> None:
    """--forget: ``victim`` (killed) forgotten (POST /api/cluster/peers/NAME/forget on one
    node, which tells the others: its outbox there discarded, nothing more kept for it),
    then another hold: what each node kept for it before and after, and what it did not
    keep since (the commands for its former devices; they go to its backup and their new
    nodes). The run's undelivered and lost figures cover both holds."""

    def entries() -> dict[str, dict[str, Any]]:
        """The victim's entry in each survivor's /api/cluster members."""
        found: dict[str, dict[str, Any]] = {}
        for node in run.nodes:
            if node != victim:
                members = admin_json(node, "/api/cluster").get("members", [])
                found[node.name] = next(m for m in members if m.get("name") == victim.name)
        return found

    def kept() -> dict[str, dict[str, Any]]:
        return {
            name: {
                "outbox_frames": member["outbox_frames"],
                "outbox_bytes": member["outbox_bytes"],
                "forgotten_not_kept": member["counters"].get("forgotten_not_kept", 0),
            }
            for name, member in entries().items()
        }

    def forgotten_everywhere() -> bool:
        return all(member.get("forgotten") for member in entries().values())

    before = kept()
    # On one node: it tells the others (FORGET, cluster protocol 8).
    told_by = next(node for node in run.nodes if node != victim)
    run.mark("forget", node=victim.name, on=told_by.name)
    since = time.monotonic()
    admin_json(told_by, f"/api/cluster/peers/{victim.name}/forget", "POST")
    everywhere = run.wait(START_TIMEOUT, forgotten_everywhere)
    run.figures["forget_everywhere_seconds"] = (
        round(time.monotonic() - since, 2) if everywhere else None
    )
    run.figures["forget_kept_before"] = before
    run.figures["forget_kept_after"] = kept()
    run.hold(run.args.hold, prefix="after_forget_")
    run.figures["forget_kept_end"] = kept()


def start_again(run: Run, node: topology.Node) -> Started:
    """Broker ``node`` started again on its config in the run's folder (its log appended)."""
    command = [str(VENV_BIN / "broker"), "-c", str(run.directory / f"{node.name}.toml")]
    return start(node.name, command, run.directory, None, append=True)


def restart_node(run: Run, index: int) -> dict[str, Any]:
    """SIGTERM broker ``index``, start it again on its config, wait for the cluster and the
    devices (bounded by --storm-timeout); the figures of this restart."""
    args = run.args
    node, old = run.nodes[index], run.brokers[index]
    run.sample()
    before = run.latest()
    refusals_before = run.counter("refusals")
    target = before["connected"]
    watch = LogWatch(run.balancer.logs(), f"/{node.server} is DOWN")
    since = time.monotonic()
    evacuated: float | None = None
    evacuation: dict[str, Any] = {}
    if args.evacuate_rate and not args.stop_evacuation:
        # broker.evacuation: its devices moved off at the rate, then the stop finds none.
        run.mark("evacuation", node=node.name, rate=args.evacuate_rate)
        admin_json(node, f"/api/evacuation?rate={args.evacuate_rate:g}", "POST")

        def done() -> bool:
            nonlocal evacuation
            try:
                evacuation = admin_json(node, "/api/evacuation")
            except (OSError, ValueError):
                return False
            return evacuation.get("state") == "done"

        if run.wait(args.storm_timeout, done):
            evacuated = time.monotonic() - since
        run.mark("evacuated", node=node.name, seconds=evacuated)
    run.mark("SIGTERM", node=node.name, pid=old.pid)
    stopping = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(old.pid, signal.SIGTERM)
    # Polled (sampled) while it stops: with --stop-evacuation the devices move during the
    # stop, and the handshake peak is in it.
    if not run.wait(START_TIMEOUT + args.stop_evacuation, lambda: old.popen.poll() is not None):
        stop(old)  # SIGKILL: said in the figures as a stop that took the whole bound
    stop_seconds = time.monotonic() - stopping
    if args.stop_evacuation:
        # The node's own account of its evacuation at the stop (broker.node), its last one.
        lines = [
            line
            for line in old.log.read_text(errors="replace").splitlines()
            if "stop: node " in line or "stop: the evacuation of node" in line
        ]
        evacuation = {"stop_line": lines[-1].split(": ", 1)[-1] if lines else None}
    if old in run.started:
        run.started.remove(old)
    new = start_again(run, node)
    run.started.append(new)
    run.brokers[index] = new
    wait_listening(node.mqtt_port, new, START_TIMEOUT)
    run.mark("started again", node=node.name, pid=new.pid)
    rejoined: float | None = None

    def check() -> bool:
        nonlocal rejoined
        if rejoined is None and cluster_formed(run.nodes):
            rejoined = time.monotonic() - since
            run.mark("cluster formed", node=node.name)
        return rejoined is not None

    run.wait(args.storm_timeout, check)
    left = max(0.0, args.storm_timeout - (time.monotonic() - since))
    back = time_back(run, since, target, left)
    run.sample()
    after = run.latest()
    run.mark("restart done", node=node.name, **back)
    return {
        "node": node.name,
        "evacuate_seconds": round(evacuated, 1) if evacuated is not None else None,
        # Offline sessions the evacuation migrated to other nodes, and those it left; with
        # --stop-evacuation, the node's log line on it instead.
        "sessions_migrated": evacuation.get("sessions_migrated"),
        "sessions_left": evacuation.get("sessions_left"),
        "stop_evacuation": evacuation.get("stop_line"),
        "stop_seconds": round(stop_seconds, 1),
        "rejoined_seconds": round(rejoined, 1) if rejoined is not None else None,
        "marked_down": watch(),
        "devices_dropped": after["disconnects"] - before["disconnects"],
        **back,
        "wills": after["wills"] - before["wills"],
        "refusals": dict(run.counter("refusals") - refusals_before),
        "peak_handshakes_per_s": peak_handshakes(run, before),
    }


def scenario_restart(run: Run) -> None:
    args = run.args
    run.ramp()
    run.hold(args.settle)
    restarts = []
    for index in range(len(run.nodes) - 1, 0, -1):
        restarts.append(restart_node(run, index))
        run.hold(args.settle, prefix=f"after_{run.nodes[index].name}_")
    run.figures["restarts"] = restarts
    for key in (
        "evacuate_seconds",
        "stop_seconds",
        "back_100_seconds",
        "devices_dropped",
        "wills",
        "peak_handshakes_per_s",
    ):
        values = [r[key] for r in restarts]
        if values and all(isinstance(v, int | float) for v in values):
            run.figures[f"restart_{key}_max"] = max(values)
    run.hold(args.hold, prefix="after_restarts_")


def scenario_partition(run: Run) -> None:
    args = run.args
    run.ramp()
    run.hold(args.settle)
    # The last --split-nodes nodes, cut off from the others (they still reach each other).
    isolated = run.nodes[len(run.nodes) - args.split_nodes :]
    others = run.nodes[: len(run.nodes) - args.split_nodes]
    names = ",".join(node.name for node in isolated)
    run.sample()
    before = run.latest()
    present_before = run.total("sessions_present")
    run.mark("split", nodes=names)
    split_wall = time.time()
    for node in isolated:
        for other in others:
            admin_json(node, f"/api/cluster/peers/{other.name}/disconnect", "POST")
    dropped: list[int] = []
    wills_before_drop: list[int] = []
    # pause_minority: the devices the isolated nodes closed (before the drop), and when all
    # were back.
    closed = 0
    all_back: float | None = None

    def drop_at_half(elapsed: float) -> None:
        nonlocal closed, all_back
        if all(w.status.get("time", 0) > split_wall for w in run.simulators) and not dropped:
            closed = sum(run.counter("disconnects").values()) - before["disconnects"]
            if closed and all_back is None and run.total("connected") >= before["connected"]:
                all_back = elapsed
        if args.split_drop and not dropped and elapsed >= args.split / 2:
            run.sample()
            wills_before_drop.append(run.latest()["wills"] - before["wills"])
            run.broadcast("drop", args.split_drop)
            for worker in run.simulators:
                count, worker.status = worker.wait_event("dropped", START_TIMEOUT)[1:3]
                dropped.append(count)
            run.mark("devices dropped", devices=sum(dropped), fraction=args.split_drop)

    run.hold(args.split, drop_at_half, prefix="split_")
    run.sample()
    during = run.latest()
    run.mark("heal", nodes=names)
    since = time.monotonic()
    for node in isolated:
        for other in others:
            admin_json(node, f"/api/cluster/peers/{other.name}/connect", "POST")
    formed = run.wait(args.storm_timeout, lambda: cluster_formed(run.nodes))
    healed = time.monotonic() - since
    run.mark("cluster formed", seconds=round(healed, 2))
    back = time_back(run, since, before["connected"], args.storm_timeout)
    run.figures.update(
        {
            "split_nodes": names,
            "split_seconds": args.split,
            # pause_minority: the devices away at most before the drop (those the isolated
            # nodes closed), and seconds from the split until all were back.
            "split_devices_closed": closed,
            "split_back_seconds": round(all_back, 1) if all_back is not None else None,
            # The isolated node's backup takes it for lost and publishes its clients'
            # wills (--wills; README "the backup takes the loss of its link to a node for
            # the node's death"): those clients were still connected.
            "split_wills": wills_before_drop[0]
            if wills_before_drop
            else during["wills"] - before["wills"],
            "split_devices_dropped": sum(dropped),
            "split_sessions_present": run.total("sessions_present") - present_before,
            "heal_seconds": round(healed, 2) if formed else None,
            **{f"heal_{key}": value for key, value in back.items()},
        }
    )
    run.hold(args.hold, prefix="after_heal_")
    # --wills: over the split, the heal and the hold after it, the wills the collector got
    # against the device connections that ended (closed by a broker, or dropped by the
    # simulator): the wills beyond them were published for devices still connected.
    run.sample()
    end = run.latest()
    wills = end["wills"] - before["wills"]
    ended = end["disconnects"] - before["disconnects"] + sum(dropped)
    run.figures.update(
        {
            "partition_wills": wills,
            "partition_disconnects": ended,
            "partition_wills_without_disconnect": max(0, wills - ended),
        }
    )


def scenario_blackout(run: Run) -> None:
    """Every broker node SIGKILLed at once (the brokers' rack loses power; the balancer
    stays), --outage seconds without a broker, then every node started again on its config
    (with --store disk, on its store): when the balancer marked them all down, when the
    cluster had formed again, when the devices were back and how many found their sessions.
    The run's telemetry and commands figures say what acknowledged message was lost."""
    args = run.args
    run.ramp()
    run.hold(args.settle)
    run.sample()
    before = run.latest()
    present_before = run.total("sessions_present")
    refusals_before = run.counter("refusals")
    target = before["connected"]
    watches = [LogWatch(run.balancer.logs(), f"/{node.server} is DOWN") for node in run.nodes]
    run.mark("SIGKILL every node", pids=[broker.pid for broker in run.brokers])
    killed = time.monotonic()
    for broker in run.brokers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(broker.pid, signal.SIGKILL)
    for broker in run.brokers:
        broker.popen.wait(10)
        if broker in run.started:
            run.started.remove(broker)
    marked: float | None = None

    def all_down() -> bool:
        nonlocal marked
        if marked is None and all(watch() for watch in watches):
            marked = time.monotonic() - killed
            run.mark("every node marked down")
        return False  # the outage lasts its time

    run.wait(args.outage, all_down)
    run.mark("start every node", stagger=args.stagger)
    restarted = time.monotonic()
    for index, node in enumerate(run.nodes):
        if index:
            run.wait(args.stagger)  # as a host's services come up, one after the other
        broker = start_again(run, node)
        run.started.append(broker)
        run.brokers[index] = broker
    for node, broker in zip(run.nodes, run.brokers, strict=True):
        wait_listening(node.mqtt_port, broker, START_TIMEOUT)
    listening = time.monotonic() - restarted
    formed = run.wait(START_TIMEOUT, lambda: cluster_formed(run.nodes))
    formed_seconds = time.monotonic() - restarted
    run.mark("cluster formed" if formed else "cluster not formed", seconds=round(formed_seconds, 1))
    left = max(0.0, args.storm_timeout - (time.monotonic() - restarted))
    back = time_back(run, restarted, target, left)
    run.sample()
    after = run.latest()
    run.mark("blackout done", **back)
    figures = {
        "marked_down_seconds": round(marked, 1) if marked is not None else None,
        "outage_seconds": args.outage,
        "stagger_seconds": args.stagger,
        "listening_seconds": round(listening, 1),
        "formed_seconds": round(formed_seconds, 1) if formed else None,
        **back,
        "devices_dropped": after["disconnects"] - before["disconnects"],
        # Devices back with session_present=1: with --store disk every one; in memory mode
        # the sessions died with the nodes.
        "sessions_present": run.total("sessions_present") - present_before,
        "refusals": dict(run.counter("refusals") - refusals_before),
        # --wills: with disk stores every device connected at the kill, once (each node
        # publishes the wills its store kept for its clients: their backups died too).
        "wills": after["wills"] - before["wills"],
        "wills_devices": after["wills_devices"] - before["wills_devices"],
        "peak_handshakes_per_s": peak_handshakes(run, before),
        "collector_relinked": int(run.collector.status.get("links_relinked", 0)),
    }
    run.figures.update({"blackout_" + key: value for key, value in figures.items()})
    run.hold(args.hold, prefix="after_blackout_")


def scenario_reload(run: Run) -> None:
    args = run.args
    run.ramp()
    reloads: list[float] = []
    next_reload = [args.reload_every]

    def hook(elapsed: float) -> None:
        if elapsed >= next_reload[0]:
            next_reload[0] += args.reload_every
            run.balancer.reload()
            reloads.append(time.time())
            run.mark("reload", number=len(reloads))

    run.hold(args.hold, hook)
    run.reload_times = reloads
    run.figures["balancer_processes_at_end"] = run.latest()["balancer_processes"]
    run.figures["reloads"] = len(reloads)


SCENARIO_STEPS: dict[str, Callable[[Run], None]] = {
    "ramp": scenario_ramp,
    "storm": scenario_storm,
    "node-loss": scenario_node_loss,
    "reload": scenario_reload,
    "restart": scenario_restart,
    "partition": scenario_partition,
    "blackout": scenario_blackout,
}


# -- the run -------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> None:
    """Fill in what the flags left to us, and refuse what cannot work here."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    per_simulator = limit - 500
    if args.simulators is None:
        args.simulators = max(1, math.ceil(args.devices / min(12_000, per_simulator)))
    if args.devices / args.simulators > per_simulator:
        raise SystemExit(
            f"{args.devices} devices in {args.simulators} simulator processes is more than "
            f"{per_simulator} each (file limit {limit}); use --simulators"
        )
    if args.processes is None:
        args.processes = max(1, math.ceil(args.devices / 7_000))
    if args.lb_nbthread is None:
        args.lb_nbthread = args.processes
    args.fd_limit = limit


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan(args)
    source = source_tree()
    work = Path(tempfile.mkdtemp(prefix="lb-fleet-", dir=args.workdir))
    certs = args.certs or work / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    print(f"fleet: {args.scenario}, {args.devices} devices, {args.nodes} nodes, work {work}")
    pki_seconds = make_pki(certs, args.devices, args.nodes)
    print(f"  certificates in {certs} ({pki_seconds:.1f}s for lb-pki device)", flush=True)
    settings = DeviceSettings(
        certs=str(certs),
        protocol_level=args.mqtt,
        keep_alive=args.keepalive,
        clean_start=args.clean_start,
        telemetry_interval=args.telemetry_interval,
        payload_size=args.payload_size,
        connect_timeout=args.connect_timeout,
        backoff_base=args.backoff_base,
        backoff_cap=args.backoff_cap,
        ramp_concurrency=args.ramp_concurrency,
        wills=args.wills,
    )
    sources = sources_for(args.devices, args.devices_per_source)
    simulators: list[Worker] = []
    started: list[Started] = []
    phases: dict[str, Any] = {}
    try:
        per = math.ceil(args.devices / args.simulators)
        for index in range(args.simulators):
            first = 1 + index * per
            count = min(per, args.devices - first + 1)
            if count <= 0:
                break
            part = Slice(index, first, count, sources[index :: args.simulators] or sources)
            simulators.append(fork(f"simulator-{index}", simulator_main, settings, part))
        prepare = max(w.wait_event("ready", PREPARE_TIMEOUT)[1] for w in simulators)
        print(f"  {len(simulators)} simulators ready ({prepare:.1f}s for the contexts)")
        for kind in args.balancers:
            phases[kind] = phase(args, kind, certs, work, settings, simulators, started)
    finally:
        for process in reversed(started):
            stop(process)
        for worker in simulators:
            worker.stop()
        if not args.keep:
            # The logs were summarised. The certificates go too (150 MB at 20,000 devices,
            # left in /tmp by every run before) unless they are --certs DIR's, to reuse.
            for kind in phases:
                shutil.rmtree(work / kind, ignore_errors=True)
            if args.certs is None:
                shutil.rmtree(work, ignore_errors=True)
    return report(args, phases, pki_seconds, work, source)


def phase(
    args: argparse.Namespace,
    kind: str,
    certs: Path,
    work: Path,
    settings: DeviceSettings,
    simulators: list[Worker],
    started: list[Started],
) -> dict[str, Any]:
    directory = work / kind
    directory.mkdir()
    nodes = cluster_nodes(args.nodes)
    print(f"  {kind}: starting {args.nodes} brokers", flush=True)
    stop_evacuation = None
    if args.stop_evacuation:
        # Without --evacuate-rate, the brokers' own default rate.
        rate = int(args.evacuate_rate) if args.evacuate_rate else None
        stop_evacuation = (args.stop_evacuation, rate)
    brokers = start_cluster(
        nodes,
        certs,
        directory,
        started,
        args.session_replicas,
        stop_evacuation,
        args.partition_handling,
        args.store == "disk",
    )
    collector = fork(
        f"collector-{kind}", collector_main, settings, args.devices, nodes[0].mqtt_port
    )
    balancer: Balancer | None = None
    try:
        collector.wait_event("ready", START_TIMEOUT)
        port = free_port()
        config = directory / f"{kind}.cfg"
        config.write_text(
            balancer_config(
                kind,
                port,
                certs,
                nodes,
                args.lb_nbthread,
                args.maxsslrate,
                args.processes,
                hard_stop=args.scenario != "reload" or args.keep_hard_stop,
            )
        )
        balancer = Balancer(kind, port, config, directory, args.processes)
        balancer.start(started)
        for worker in simulators:
            worker.status = {}
            worker.send("phase", port)
        for worker in simulators:
            worker.status = worker.wait_event("phased", START_TIMEOUT)[1]
        time.sleep(SETTLE)  # the balancer's workers finish starting before RSS is taken
        run_ = Run(args, balancer, brokers, nodes, simulators, collector, started)
        error = None
        try:
            SCENARIO_STEPS[args.scenario](run_)
            run_.finish()
        except (RuntimeError, TimeoutError, OSError) as failure:
            # Keep what was measured; the devices let go of this balancer before the next.
            error = f"{failure!r}"
            print(f"  {kind}: FAILED: {error}", flush=True)
            with contextlib.suppress(RuntimeError, TimeoutError, OSError):
                run_.broadcast("close")
                for worker in simulators:
                    worker.wait_event("closed", REPORT_TIMEOUT)
        figures = run_.figures
        disconnects, reloads = run_.disconnect_times, run_.reload_times
        if reloads:
            # A reload's disconnects come at once or, with hard-stop-after, that much later.
            window = RELOAD_WINDOW + hard_stop_after(config.read_text())
            figures["reload_disconnects"] = sum(
                1 for t in disconnects if any(0 <= t - r <= window for r in reloads)
            )
        result = {
            "error": error,
            "broker_counters": broker_counters(nodes),
            "figures": figures,
            "events": run_.events,
            "samples": run_.samples,
            "balancer": {
                "kind": kind,
                "instances": 1 if kind == "lb" else args.processes,
                "nbthread": args.lb_nbthread if kind == "lb" else 1,
                "config": config.read_text(),
            },
        }
    finally:
        if balancer is not None:
            balancer.stop(started)
        collector.stop()
        for broker in brokers:
            stop(broker)
            if broker in started:
                started.remove(broker)
    result["log"] = log_summary(balancer.logs())
    result["broker_logs"] = log_summary([directory / f"{node.name}.log" for node in nodes])
    return result


def report(
    args: argparse.Namespace,
    phases: dict[str, Any],
    pki_seconds: float,
    work: Path,
    source: dict[str, Any],
) -> dict[str, Any]:
    ratios: dict[str, float] = {}
    if "lb" in phases and "haproxy" in phases:
        ours, theirs = phases["lb"]["figures"], phases["haproxy"]["figures"]
        for key, value in ours.items():
            if "simulator_kib" in key:
                # The device processes are the same for both balancers, run one after the
                # other (lb first): what the first run allocated and freed stays in them, so
                # the second balancer's growth is measured on top of it (lb's storm: 243 ->
                # 772 MiB, then HAProxy's from 772). Not comparable; no ratio.
                continue
            other = theirs.get(key)
            numbers = isinstance(value, int | float) and isinstance(other, int | float)
            if numbers and other and not isinstance(value, bool):
                ratios[key] = round(value / other, 3)
    span = source_span(source, "fleet")
    return {
        "suite": "fleet",
        "scenario": args.scenario,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "uname": " ".join(platform.uname()),
            "nproc": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "nofile_limit": args.fd_limit,
            "ephemeral_ports": Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split(),
            "haproxy": haproxy_version(),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "source": span,
        "pki_seconds": round(pki_seconds, 1),
        "work": str(work),
        "phases": phases,
        "ratios": ratios,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="./dev bench --suite fleet",
        description="N devices with their own certificates through lb / HAProxy into a cluster",
    )
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--devices", type=int, default=2_000)
    parser.add_argument("--nodes", type=int, default=3, help="broker nodes (3 or 6)")
    parser.add_argument("--balancers", default="lb,haproxy", help="lb,haproxy (in this order)")
    parser.add_argument(
        "--processes",
        type=int,
        help="HAProxy instances on the port (and lb's nbthread unless --lb-nbthread); "
        "default: one per 7,000 devices",
    )
    parser.add_argument(
        "--lb-nbthread", type=int, help="lb worker processes (1 = the demo's config as it is)"
    )
    parser.add_argument("--simulators", type=int, help="device processes (default: 12,000 each)")
    parser.add_argument("--devices-per-source", type=int, default=5_000)
    parser.add_argument("--hold", type=float, default=60.0, help="seconds held with telemetry")
    parser.add_argument("--settle", type=float, default=15.0, help="hold before/after a storm")
    parser.add_argument("--ramp-concurrency", type=int, default=32, help="per simulator")
    parser.add_argument("--ramp-timeout", type=float, default=600.0)
    parser.add_argument("--storm-timeout", type=float, default=600.0)
    parser.add_argument("--drop", choices=("devices", "balancer"), default="devices")
    parser.add_argument(
        "--storms", type=int, default=1, help="storms in a row per balancer (medians reported)"
    )
    parser.add_argument("--reload-every", type=float, default=30.0)
    parser.add_argument(
        "--evacuate-rate",
        type=float,
        default=0.0,
        help="restart: evacuate each node first at this many clients per second "
        "(POST /api/evacuation), then stop it; 0: stop it at once",
    )
    parser.add_argument(
        "--stop-evacuation",
        type=float,
        default=0.0,
        help="restart: the brokers' [cluster] stop_evacuation in seconds (each evacuates "
        "itself at SIGTERM, at --evacuate-rate or the brokers' default); 0: not set",
    )
    parser.add_argument(
        "--forget",
        action="store_true",
        help="node-loss: after the hold, forget the killed node on the others (POST "
        "/api/cluster/peers/NAME/forget) and hold again",
    )
    parser.add_argument(
        "--lose-again",
        action="store_true",
        help="node-loss: then SIGKILL the node before the first in the ring too (the one "
        "whose backup it was; with --forget its backup has moved)",
    )
    parser.add_argument(
        "--split", type=float, default=20.0, help="partition: seconds the node is cut off"
    )
    parser.add_argument(
        "--partition-handling",
        choices=("ignore", "pause_minority"),
        help="the brokers' [cluster] partition_handling (default: theirs, ignore)",
    )
    parser.add_argument(
        "--split-nodes",
        type=int,
        default=1,
        help="partition: how many nodes (the last ones) are cut off from the others",
    )
    parser.add_argument(
        "--split-drop",
        type=float,
        default=0.0,
        help="partition: the fraction of the devices that drop at the split's middle (0-1)",
    )
    parser.add_argument(
        "--outage", type=float, default=10.0, help="blackout: seconds without any broker"
    )
    parser.add_argument(
        "--stagger",
        type=float,
        default=0.0,
        help="blackout: seconds between the nodes' starts (node-1 first)",
    )
    parser.add_argument(
        "--store",
        choices=("memory", "disk"),
        default="memory",
        help="the brokers' [store]: memory (the demo's) or disk (each node's in the run's "
        "folder; sessions and acknowledged messages survive a SIGKILL)",
    )
    parser.add_argument(
        "--keep-hard-stop",
        action="store_true",
        help="reload: keep the demo's hard-stop-after (old processes end their sessions "
        "that long after each reload); by default it goes, as for seamless reloads",
    )
    parser.add_argument(
        "--maxsslrate",
        type=int,
        help="TLS handshakes per second in all (lb: global maxsslrate; each HAProxy "
        "instance its share)",
    )
    parser.add_argument("--telemetry-interval", type=float, default=60.0)
    parser.add_argument("--payload-size", type=int, default=64)
    parser.add_argument("--command-rate", type=float, default=10.0, help="commands/s in all")
    parser.add_argument("--keepalive", type=int, default=60, help="PINGREQ after 0.75 of it")
    parser.add_argument("--mqtt", type=int, choices=(4, 5), default=4, help="4 = 3.1.1, 5 = 5.0")
    parser.add_argument("--clean-start", action="store_true", help="clean sessions instead")
    parser.add_argument(
        "--wills",
        action="store_true",
        help="every device sets a QoS 1 will (fleet/<id>/status); the collector counts them",
    )
    parser.add_argument(
        "--session-replicas",
        type=int,
        choices=(0, 1),
        help="the brokers' [cluster] session_replicas (default: theirs, 1)",
    )
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument("--backoff-base", type=float, default=1.0)
    parser.add_argument("--backoff-cap", type=float, default=60.0)
    parser.add_argument("--sample-interval", type=float, default=1.0)
    parser.add_argument("--certs", type=Path, help="reuse this PKI folder (made if missing)")
    parser.add_argument("--workdir", type=Path, help="parent of the scratch folder (/tmp)")
    parser.add_argument("--output", type=Path, help="JSON file (default bench/results/...)")
    parser.add_argument("--no-plots", dest="plots", action="store_false")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the work folder: the processes' logs, the certificates",
    )
    args = parser.parse_args(argv)
    args.balancers = [b for b in args.balancers.split(",") if b]
    unknown = set(args.balancers) - {"lb", "haproxy"}
    if unknown or not args.balancers:
        parser.error(f"--balancers: lb and/or haproxy, not {','.join(sorted(unknown))}")
    if args.devices < 1 or (
        args.nodes < 2 and args.scenario in ("node-loss", "restart", "partition")
    ):
        parser.error(f"{args.scenario} needs at least 2 nodes and 1 device")
    if args.scenario == "partition" and not 1 <= args.split_nodes < args.nodes:
        parser.error("--split-nodes: 1 to --nodes - 1")
    if not 0.0 <= args.split_drop <= 1.0:
        parser.error("--split-drop: a fraction, 0 to 1")
    if not 1 <= args.storms <= 5:
        parser.error("--storms: 1 to 5")
    return args


def summary_lines(result: dict[str, Any]) -> Iterator[str]:
    keys = sorted({k for phase in result["phases"].values() for k in phase["figures"]})
    kinds = list(result["phases"])
    yield "| figure | " + " | ".join(kinds) + (" | lb / haproxy |" if result["ratios"] else " |")
    yield "| --- |" + " --- |" * (len(kinds) + (1 if result["ratios"] else 0))
    for key in keys:
        values = [result["phases"][kind]["figures"].get(key) for kind in kinds]
        if any(isinstance(v, list | dict) for v in values):
            continue
        row = [key, *("" if v is None else str(v) for v in values)]
        if result["ratios"]:
            ratio = result["ratios"].get(key)
            row.append("" if ratio is None else f"{ratio:.2f}")
        yield "| " + " | ".join(row) + " |"


def _unwind(signum: int, _frame: object) -> None:
    """SIGTERM (a `kill` of the bench): unwind like Ctrl-C, so that every `finally` stops
    the processes it started (the default action left lb, HAProxy and the brokers running)."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _unwind)
    result = run(args)
    output = args.output
    if output is None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        output = RESULTS / f"fleet-{args.scenario}-{args.devices}-{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1, default=str) + "\n")
    for line in summary_lines(result):
        print(line)
    if args.plots:
        try:
            from bench import fleet_plots  # noqa: PLC0415 (matplotlib is optional)
        except ImportError as error:  # matplotlib is in the bench extra
            print(f"no plots ({error}); pip install -e .[bench]", file=sys.stderr)
        else:
            for path in fleet_plots.plot(result, output.with_suffix("")):
                print(f"plot: {path}", file=sys.stderr)
    print(f"results: {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
