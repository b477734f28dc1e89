"""Real processes for the cluster tests of issue 12: broker nodes (`broker -c FILE`) with a
disk store, clustered over mutual TLS, and lb in front of them (seed 004's topology: mutual
TLS with device certificates, round robin, PROXY v2 with the CN), plus paho-mqtt devices
with persistent sessions.

Every port comes from bench.ports.free_port(); every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from bench.ports import free_port
from broker.statestore import STATE_STORE_REQUEST_TOPIC, encode_array
from tests.harness import VENV_BIN, Process, start_process
from tests.pki import DeviceFiles, TestPKI

BROKER = Path(sys.executable).parent / "broker"
SLOW_DISK_BROKER = Path(__file__).with_name("slow_disk_broker.py")
COOKIE = "chaos-cluster-cookie"
V311 = MQTTProtocolVersion.MQTTv311
V5 = MQTTProtocolVersion.MQTTv5


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not met within {timeout}s: {what}")


class NodeProcess:
    """A `broker -c FILE` process with its admin API: started, asked, killed, stopped by
    the pid it holds. Subclasses make the configuration file."""

    #: Seconds to wait for the admin endpoint, and for a stop before SIGKILL.
    WAIT = 15.0
    name: str
    config: Path
    log: Path
    admin_port: int
    process: subprocess.Popen[bytes] | None
    #: Seconds each store commit's callbacks run late (tests/slow_disk_broker.py); 0: none.
    commit_delay = 0.0

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        log = self.log.open("ab")
        command = [str(BROKER), "-c", str(self.config)]
        if self.commit_delay:
            command[:1] = [sys.executable, str(SLOW_DISK_BROKER), str(self.commit_delay)]
        self.process = subprocess.Popen(command, stdout=log, stderr=log)
        log.close()

    def wait_ready(self) -> None:
        """The admin endpoint answers: the node has joined its cluster (or join_timeout
        passed) and its listeners are open (broker.node starts the admin endpoint last)."""
        wait_for(self.admin_ready, self.WAIT, f"{self.name} admin endpoint")

    def admin_ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited: {self.log_text()[-3000:]}")
        try:
            self.admin("/api/stats")
        except OSError:
            return False
        return True

    def admin(self, path: str, method: str = "GET") -> Any:
        """The admin API's answer: JSON under /api/, text elsewhere (/metrics), as
        tests/broker_harness.py's admin_get."""
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        request = urllib.request.Request(url, method=method)
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read()
        return json.loads(body) if path.startswith("/api/") else body.decode()

    def link_states(self) -> dict[str, str]:
        members = self.admin("/api/cluster")["members"]
        return {m["name"]: m["state"] for m in members if m["state"] != "self"}

    def member(self, name: str) -> dict[str, Any]:
        """Peer ``name``'s entry in /api/cluster's members (its link, counters, outbox)."""
        members = self.admin("/api/cluster")["members"]
        return next(member for member in members if member["name"] == name)

    def copied_wills(self, origin: str | None = None) -> int:
        """Wills of ``origin``'s connected clients this node keeps as its backup (of every
        node's when None): /api/cluster's replication copies."""
        wills: dict[str, int] = self.admin("/api/cluster")["replication"]["copies"]["wills"]
        return sum(wills.values()) if origin is None else wills.get(origin, 0)

    def all_links_up(self) -> bool:
        states = self.link_states()
        return bool(states) and all(state == "up" for state in states.values())

    def stats(self) -> dict[str, int]:
        result: dict[str, int] = self.admin("/api/stats")
        return result

    def clients(self) -> list[str]:
        return [record["client_id"] for record in self.admin("/api/clients")]

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(self.WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class ClusterNode(NodeProcess):
    """One `broker -c FILE` process: a direct listener, a PROXY listener for lb, admin,
    cluster link, disk store."""

    def __init__(
        self, directory: Path, name: str, pki: TestPKI, extra: str = "", cluster: str = ""
    ) -> None:
        self.directory = directory
        self.name = name
        files = pki.node(name)
        self.cert, self.key, self.ca = files.cert, files.key, pki.root
        self.mqtt_port = free_port()
        self.lb_port = free_port()
        self.cluster_port = free_port()
        self.admin_port = free_port()
        self.config = directory / f"{name}.toml"
        self.log = directory / f"{name}.log"
        self.database = directory / f"{name}.db"
        self.process: subprocess.Popen[bytes] | None = None
        self.extra = extra
        self.cluster = cluster
        # "memory": the demo's mode (a restart loses what the node had; its backup has it).
        self.store_mode = "disk"

    def write_config(self, peers: list[ClusterNode]) -> None:
        peer_list = ", ".join(f'"{p.name}@127.0.0.1:{p.cluster_port}"' for p in peers)
        self.config.write_text(
            f"""
[node]
name = "{self.name}"
cookie = "{COOKIE}"

[mqtt]
session_expiry_max = 7200
{self.extra}

[listeners.tcp.direct]
bind = "127.0.0.1:{self.mqtt_port}"

[listeners.tcp.lb]
bind = "127.0.0.1:{self.lb_port}"
proxy_protocol = true
proxy_protocol_trusted = ["127.0.0.1/32"]
peer_cert_as_username = "cn"

[cluster]
name = "chaos"
bind = "127.0.0.1:{self.cluster_port}"
peers = [{peer_list}]
takeover_timeout = "3s"
{self.cluster}

[cluster.ssl_options]
cacertfile = "{self.ca}"
certfile = "{self.cert}"
keyfile = "{self.key}"
verify = "verify_peer"
fail_if_no_peer_cert = true

[admin]
bind = "127.0.0.1:{self.admin_port}"

[store]
mode = "{self.store_mode}"
path = "{self.database}"
"""
        )


def make_nodes(
    directory: Path,
    pki: TestPKI,
    count: int = 3,
    extra: str = "",
    cluster: str | list[str] = "",
    store: str = "disk",
) -> list[ClusterNode]:
    """``extra`` goes into each node's [mqtt] table, ``cluster`` into its [cluster] table (a
    list: one for each node, in order), ``store`` is their [store] mode."""
    tables = [cluster] * count if isinstance(cluster, str) else cluster
    assert len(tables) == count, tables
    nodes = [
        ClusterNode(directory, f"node-{n}", pki, extra, table)
        for n, table in enumerate(tables, start=1)
    ]
    for node in nodes:
        node.store_mode = store
        node.write_config(nodes)
    return nodes


def lb_config(pki: TestPKI, front: int, nodes: list[ClusterNode]) -> str:
    servers = "\n".join(
        f"    server {node.name} 127.0.0.1:{node.lb_port} send-proxy-v2 "
        "proxy-v2-options ssl,cert-cn,chain-subjects"
        for node in nodes
    )
    verify = f"ca-file {pki.intermediate} ca-verify-file {pki.root} verify required"
    return f"""
global
    maxconn 2000

defaults
    mode tcp
    timeout connect 2s
    timeout client 120s
    timeout server 120s

frontend devices
    bind 127.0.0.1:{front} ssl crt {pki.server_allinone} {verify}
    default_backend brokers

backend brokers
    balance roundrobin
{servers}
"""


@contextlib.contextmanager
def running_lb(pki: TestPKI, directory: Path, nodes: list[ClusterNode]) -> Iterator[int]:
    front = free_port()
    path = directory / "lb.cfg"
    path.write_text(lb_config(pki, front, nodes))
    process: Process = start_process(
        [str(VENV_BIN / "lb"), "-db", "-f", str(path)], directory, "lb"
    )
    try:
        process.wait_output(f"listening on 127.0.0.1:{front}", 15, stream="stderr")
        yield front
    finally:
        process.stop()


@contextlib.contextmanager
def running_cluster(
    pki: TestPKI,
    directory: Path,
    count: int = 3,
    extra: str = "",
    cluster: str | list[str] = "",
    store: str = "disk",
    commit_delay: float = 0.0,
) -> Iterator[list[ClusterNode]]:
    """``commit_delay``: each node on a slow disk (tests/slow_disk_broker.py)."""
    nodes = make_nodes(directory, pki, count, extra, cluster, store)
    for node in nodes:
        node.commit_delay = commit_delay
    try:
        # All at once, as a cluster comes up (a node waits at start for the peers that
        # dial it: started one by one, each would wait for the backoff of the ones before).
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready()
        wait_for(lambda: all(node.all_links_up() for node in nodes), 20, "all links up")
        yield nodes
    finally:
        for node in nodes:
            node.stop()


class Device:
    """A paho-mqtt device through lb (mutual TLS with its certificate), or straight to a
    node; persistent session (3.1.1 clean_session=0, 5.0 clean_start=0 + Session Expiry 3600)
    unless ``clean``. It resubscribes when CONNACK says session_present=0, as devices do."""

    def __init__(
        self,
        client_id: str,
        protocol: MQTTProtocolVersion = V5,
        device: DeviceFiles | None = None,
        server_ca: Path | None = None,
        clean: bool = False,
        subscriptions: list[tuple[str, int]] | None = None,
        will: tuple[str, str] | None = None,
        will_delay: int = 0,
        will_retain: bool = False,
    ) -> None:
        """``will``: (topic, payload) at QoS 1, with ``will_delay`` seconds (5.0), retained
        with ``will_retain``."""
        self.client_id = client_id
        self.protocol = protocol
        self.clean = clean
        self.subscriptions = subscriptions or []
        if protocol == V5:
            self.client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol
            )
        else:
            self.client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=protocol,
                clean_session=clean,
            )
        if device is not None:
            assert server_ca is not None
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_ca))
            context.load_cert_chain(str(device.cert), str(device.key))
            self.client.tls_set_context(context)
        if will is not None:
            properties = None
            if protocol == V5:
                properties = PahoProperties(PacketTypes.WILLMESSAGE)
                properties.WillDelayInterval = will_delay
            self.client.will_set(will[0], will[1], 1, will_retain, properties)
        self.client.reconnect_delay_set(0.1, 1.0)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connacks: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self.acked: list[str] = []
        self.lock = threading.Lock()
        self.pending: dict[int, str] = {}
        # Acknowledged before publish() could note the mid (the loop thread is fast).
        self.early: set[int] = set()
        self.resent: set[str] = set()
        self.connected = threading.Event()
        self.client.on_message = lambda c, u, message: self.messages.put(message)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.max_inflight_messages_set(20)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        present = bool(flags.session_present)
        self.connacks.put((present, reason))
        if reason.is_failure:
            return
        if not present and self.subscriptions:
            client.subscribe(self.subscriptions)
        self.connected.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.connected.clear()
        with self.lock:
            # What was not acknowledged is sent again after the reconnect (paho resends it).
            self.resent.update(self.pending.values())

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        if getattr(reason, "is_failure", False):
            return
        with self.lock:
            payload = self.pending.pop(mid, None)
            if payload is None:
                self.early.add(mid)
            else:
                self.acked.append(payload)

    def connect(self, port: int, timeout: float = 15.0) -> bool:
        """Connect (loop started); returns CONNACK's session_present."""
        if self.protocol == V5:
            properties = PahoProperties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 0 if self.clean else 3600
            self.client.connect(
                "127.0.0.1", port, keepalive=20, clean_start=self.clean, properties=properties
            )
        else:
            self.client.connect("127.0.0.1", port, keepalive=20)
        self.client.loop_start()
        present, reason = self.connacks.get(timeout=timeout)
        assert not reason.is_failure, reason
        return present

    def subscribe(self, subscriptions: list[tuple[str, int]]) -> None:
        done: queue.Queue[Any] = queue.Queue()
        self.client.on_subscribe = lambda *args: done.put(args)
        self.subscriptions = subscriptions
        self.client.subscribe(subscriptions)
        done.get(timeout=10)

    def publish(self, topic: str, payload: str, qos: int) -> None:
        # Not under self.lock: paho calls on_publish holding its own lock, and publish()
        # takes that lock too (a deadlock when both are held crosswise).
        info = self.client.publish(topic, payload.encode(), qos)
        if qos:
            with self.lock:
                if info.mid in self.early:
                    self.early.discard(info.mid)
                    self.acked.append(payload)
                else:
                    self.pending[info.mid] = payload

    def received(
        self, quiet: float = 0.5, timeout: float = 20.0, want: int | None = None
    ) -> list[str]:
        got: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got.append(self.messages.get(timeout=quiet).payload.decode())
            except queue.Empty:
                if want is None or len(got) >= want:
                    break
        return got

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def state_request(device: Device, command: list[bytes], correlation: bytes) -> bytes:
    """A state store request (RESP3 ``command``) from ``device``, which subscribed to
    ``answers/<its client id>``; the answer's payload."""
    properties = PahoProperties(PacketTypes.PUBLISH)
    properties.ResponseTopic = f"answers/{device.client_id}"
    properties.CorrelationData = correlation
    device.client.publish(
        STATE_STORE_REQUEST_TOPIC, encode_array(command), 1, properties=properties
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            message = device.messages.get(timeout=0.5)
        except queue.Empty:
            continue
        if message.properties.CorrelationData == correlation:  # type: ignore[union-attr]
            return bytes(message.payload)
    raise AssertionError(f"no answer to {command}")


def offline_session(node: ClusterNode, client_id: str, protocol: MQTTProtocolVersion = V5) -> None:
    """A persistent session on ``node`` subscribed to ``cmd/<client_id>`` at QoS 1, its device
    gone (the session waits offline)."""
    device = Device(client_id, protocol)
    device.connect(node.mqtt_port)
    device.subscribe([(f"cmd/{client_id}", 1)])
    device.stop()
