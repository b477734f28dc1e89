"""``python -m demo.devices``: a fleet of simulated devices in front of lb, and what it saw.

Each device is a paho-mqtt client with its own certificate (CN = device id) that connects
over mutual TLS to lb, subscribes to ``fleet/<own id>/commands`` and publishes QoS 1
messages to the next device's topic (a ring: device-0001 -> device-0002 -> ... -> the first).
lb balances round robin, so neighbours sit on different broker nodes and every message
crosses the cluster link. A warm-up of QoS 0 pings runs first, until every device has heard
its neighbour, so the counted messages do not race the cluster's route propagation.

While the fleet is connected it asks every node's admin endpoint (``--admin
NAME=HOST:PORT``, ``GET /api/clients``) which devices it holds, with the address and CN the
node learned from lb's PROXY v2 header. Then two devices lb must refuse try to connect: one
with a revoked certificate and one whose certificate (device-0001's id) comes from a rogue
CA. Their TLS handshakes are made by hand on a socket whose local port is known, so the
caller can find lb's log line about each one.

It prints the report, writes it as JSON (``--report``) and exits 1 when anything is wrong:
a device that did not connect, an undelivered message, a refusal that did not happen.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from demo import summary, topology

KEEPALIVE = 60
CONNECT_RETRY_INTERVAL = 0.5
POLL_INTERVAL = 0.05
PING_INTERVAL = 0.2
ADMIN_TIMEOUT = 3.0
# MQTT 3.1.1 section 3.2.2.3: CONNACK return code 0 is "Connection Accepted".
CONNACK_ACCEPTED = 0


def command_topic(device: str) -> str:
    return f"fleet/{device}/commands"


@dataclass
class Device:
    """One simulated device: its client, and what it sent and heard."""

    name: str
    successor: str
    predecessor: str
    client: mqtt.Client
    connected: threading.Event = field(default_factory=threading.Event)
    subscribed: threading.Event = field(default_factory=threading.Event)
    pinged: threading.Event = field(default_factory=threading.Event)
    local_address: str | None = None
    error: str | None = None
    counted: set[int] = field(default_factory=set)  # message ids of the QoS 1 messages
    acknowledged: set[int] = field(default_factory=set)  # message ids paho saw completed
    received: set[int] = field(default_factory=set)
    duplicates: int = 0
    strangers: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def sent(self) -> int:
        """Counted messages whose PUBACK came back."""
        with self.lock:
            return len(self.counted & self.acknowledged)


def _on_connect(device: Device) -> Callable[..., None]:
    def callback(
        client: mqtt.Client, userdata: object, flags: object, reason: Any, properties: object
    ) -> None:
        if reason == CONNACK_ACCEPTED:
            device.connected.set()
        else:
            device.error = f"CONNACK refused: {reason}"

    return callback


def _on_subscribe(device: Device) -> Callable[..., None]:
    def callback(
        client: mqtt.Client, userdata: object, mid: int, reasons: list[Any], properties: object
    ) -> None:
        if all(not reason.is_failure for reason in reasons):
            device.subscribed.set()
        else:
            device.error = f"SUBACK refused: {reasons}"

    return callback


def _on_publish(device: Device) -> Callable[..., None]:
    def callback(
        client: mqtt.Client, userdata: object, mid: int, reason: Any, properties: object
    ) -> None:
        # paho calls this holding its own lock: take ours only briefly, never the reverse.
        with device.lock:
            device.acknowledged.add(mid)

    return callback


def _on_message(device: Device) -> Callable[..., None]:
    def callback(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(message.payload)
        except ValueError:
            body = {}
        with device.lock:
            if body.get("from") != device.predecessor:
                device.strangers += 1
            elif body.get("ping"):
                device.pinged.set()
            elif body.get("seq") in device.received:
                device.duplicates += 1
            else:
                device.received.add(int(body["seq"]))

    return callback


def _client(name: str, certs: Path) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
    client.tls_set(
        ca_certs=str(certs / f"{topology.ROOT_CA}.pem"),
        certfile=str(certs / f"{name}.pem"),
        keyfile=str(certs / f"{name}-key.pem"),
    )
    return client


def _wait_all(events: Sequence[threading.Event], deadline: float) -> bool:
    return all(event.wait(max(0.0, deadline - time.monotonic())) for event in events)


def _connect(device: Device, host: str, port: int, deadline: float) -> None:
    """Connect, retrying while lb is not up yet (containers start in any order)."""
    while True:
        try:
            device.client.connect(host, port, keepalive=KEEPALIVE)
            break
        except OSError as error:
            if isinstance(error, ssl.SSLError) or time.monotonic() > deadline:
                device.error = f"connect to {host}:{port} failed: {error}"
                return
            time.sleep(CONNECT_RETRY_INTERVAL)
    sock = device.client.socket()
    if isinstance(sock, socket.socket):
        address = sock.getsockname()
        device.local_address = f"{address[0]}:{address[1]}"
    device.client.loop_start()


@dataclass
class Fleet:
    """The devices, run through connect, subscribe, warm-up, exchange and disconnect."""

    host: str
    port: int
    certs: Path
    count: int
    messages: int
    timeout: float
    devices: list[Device] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def build(self) -> None:
        names = [topology.device_name(number) for number in range(1, self.count + 1)]
        for index, name in enumerate(names):
            device = Device(
                name=name,
                successor=names[(index + 1) % len(names)],
                predecessor=names[index - 1],
                client=_client(name, self.certs),
            )
            device.client.on_connect = _on_connect(device)
            device.client.on_subscribe = _on_subscribe(device)
            device.client.on_publish = _on_publish(device)
            device.client.on_message = _on_message(device)
            self.devices.append(device)

    def connect(self) -> bool:
        deadline = time.monotonic() + self.timeout
        for device in self.devices:
            _connect(device, self.host, self.port, deadline)
        ready = _wait_all([d.connected for d in self.devices if d.error is None], deadline)
        if not ready or not all(d.connected.is_set() for d in self.devices):
            return False  # each device says why in its error
        for device in self.devices:
            device.client.subscribe(command_topic(device.name), qos=1)
        if not _wait_all([d.subscribed for d in self.devices], deadline):
            self.problems.append("not every subscription was acknowledged")
            return False
        return True

    def warm_up(self) -> bool:
        """QoS 0 pings around the ring until every device has heard its neighbour."""
        by_name = {device.name: device for device in self.devices}
        deadline = time.monotonic() + self.timeout
        payloads = {d.name: json.dumps({"from": d.name, "ping": True}) for d in self.devices}
        while time.monotonic() < deadline:
            waiting = [d for d in self.devices if not by_name[d.successor].pinged.is_set()]
            if not waiting:
                return True
            for device in waiting:
                device.client.publish(command_topic(device.successor), payloads[device.name])
            time.sleep(PING_INTERVAL)
        deaf = [d.name for d in self.devices if not d.pinged.is_set()]
        self.problems.append(f"no route after {self.timeout:.0f}s to: {', '.join(deaf)}")
        return False

    def exchange(self) -> None:
        for seq in range(self.messages):
            for device in self.devices:
                payload = json.dumps({"from": device.name, "seq": seq})
                info = device.client.publish(command_topic(device.successor), payload, qos=1)
                device.counted.add(info.mid)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if all(self._done(device) for device in self.devices):
                return
            time.sleep(POLL_INTERVAL)

    def _done(self, device: Device) -> bool:
        sent = device.sent
        with device.lock:
            return len(device.received) >= self.messages and sent >= self.messages

    def disconnect(self) -> None:
        for device in self.devices:
            device.client.disconnect()
        for device in self.devices:
            device.client.loop_stop()


def admin_clients(address: str) -> tuple[list[dict[str, Any]], str | None]:
    """A node's ``GET /api/clients``: (records, None) or ([], why it failed)."""
    try:
        with urllib.request.urlopen(
            f"http://{address}/api/clients", timeout=ADMIN_TIMEOUT
        ) as response:
            body = json.load(response)
    except (OSError, urllib.error.URLError, ValueError) as error:
        return [], f"GET http://{address}/api/clients failed: {error}"
    if not isinstance(body, list):
        return [], f"GET http://{address}/api/clients: not a list"
    return body, None


def connect_packet(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT (section 3.1) with a clean session and no credentials."""
    identifier = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02" + KEEPALIVE.to_bytes(2, "big")
    payload = len(identifier).to_bytes(2, "big") + identifier
    remaining = len(variable) + len(payload)  # < 128: one length byte
    return bytes([0x10, remaining]) + variable + payload


def try_refused(
    name: str, client_id: str, host: str, port: int, certs: Path, timeout: float
) -> dict[str, Any]:
    """Connect with certificate ``name`` and say whether lb refused it, and how it looked."""
    context = ssl.create_default_context(cafile=str(certs / f"{topology.ROOT_CA}.pem"))
    context.load_cert_chain(str(certs / f"{name}.pem"), str(certs / f"{name}-key.pem"))
    record: dict[str, Any] = {
        "device": name,
        "client_id": client_id,
        "local_address": None,
        "refused": False,
        "client_error": None,
    }
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            break
        except OSError as error:
            if time.monotonic() > deadline:
                record["client_error"] = f"connect failed: {error}"
                return record
            time.sleep(CONNECT_RETRY_INTERVAL)
    local = sock.getsockname()
    record["local_address"] = f"{local[0]}:{local[1]}"
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            # TLS 1.3: the server judges the client certificate after the client's handshake
            # is done, so the refusal arrives as an alert on the first read.
            tls.sendall(connect_packet(client_id))
            answer = tls.recv(4)
        if len(answer) == 4 and answer[0] == 0x20 and answer[3] == CONNACK_ACCEPTED:
            record["client_error"] = "accepted: CONNACK 0"
        else:
            record["refused"] = True
            record["client_error"] = "connection closed before CONNACK"
    except ssl.SSLError as error:
        record["refused"] = True
        record["client_error"] = (
            f"TLS alert: {error.reason.lower().replace('_', ' ')}" if error.reason else str(error)
        )
    except OSError as error:
        record["refused"] = True
        record["client_error"] = str(error) or type(error).__name__
    finally:
        sock.close()
    return record


def run(arguments: argparse.Namespace) -> dict[str, Any]:
    certs = Path(arguments.certs)
    fleet = Fleet(
        arguments.host,
        arguments.port,
        certs,
        arguments.devices,
        arguments.messages,
        arguments.timeout,
    )
    fleet.build()
    nodes: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    try:
        if fleet.connect() and fleet.warm_up():
            fleet.exchange()
        for node_name, address in arguments.admin:
            clients, error = admin_clients(address)
            nodes[node_name] = {"admin": address, "error": error, "clients": clients}
    finally:
        fleet.disconnect()
    exchange_seconds = time.monotonic() - started
    refusals = [
        try_refused(
            topology.REVOKED_DEVICE,
            topology.REVOKED_DEVICE,
            arguments.host,
            arguments.port,
            certs,
            arguments.timeout,
        ),
        try_refused(
            topology.ROGUE_DEVICE,
            topology.device_name(1),
            arguments.host,
            arguments.port,
            certs,
            arguments.timeout,
        ),
    ]
    devices = [
        {
            "name": device.name,
            "local_address": device.local_address,
            "connected": device.connected.is_set(),
            "error": device.error,
            "sent": device.sent,
            "received": len(device.received),
            "expected": arguments.messages,
            "duplicates": device.duplicates,
            "strangers": device.strangers,
            "from": device.predecessor,
            "to": device.successor,
        }
        for device in fleet.devices
    ]
    report: dict[str, Any] = {
        "lb": f"{arguments.host}:{arguments.port}",
        "messages_per_device": arguments.messages,
        "exchange_seconds": round(exchange_seconds, 2),
        "devices": devices,
        "nodes": nodes,
        "refusals": refusals,
        "fleet_problems": fleet.problems,
    }
    report["problems"] = summary.problems(report)
    report["ok"] = not report["problems"]
    return report


def _admin(value: str) -> tuple[str, str]:
    name, separator, address = value.partition("=")
    if not separator or not name or ":" not in address:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NODE=HOST:PORT")
    return name, address


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demo.devices", description="simulated devices in front of lb"
    )
    parser.add_argument("--host", default=topology.LOCAL_HOST, help="lb's address")
    parser.add_argument("--port", type=int, default=topology.LB_PORT)
    parser.add_argument("--certs", default=topology.CERTS_DIR, help="lb-pki demo's folder")
    parser.add_argument("--devices", type=int, default=topology.DEFAULT_DEVICES)
    parser.add_argument("--messages", type=int, default=topology.DEFAULT_MESSAGES)
    parser.add_argument(
        "--admin",
        type=_admin,
        action="append",
        default=[],
        metavar="NODE=HOST:PORT",
        help="a broker node's admin endpoint (repeat per node)",
    )
    parser.add_argument("--report", default=None, help="write the report as JSON here")
    parser.add_argument("--timeout", type=float, default=20.0, help="bound of every wait (s)")
    arguments = parser.parse_args(argv)
    if arguments.devices < 1:
        parser.error("--devices must be at least 1")
    last = Path(arguments.certs) / f"{topology.device_name(arguments.devices)}.pem"
    if not last.is_file():
        parser.error(f"--devices {arguments.devices}: no {last} (make the PKI with that many)")
    if arguments.messages < 1:
        parser.error("--messages must be at least 1")
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    report = run(arguments)
    if arguments.report:
        path = Path(arguments.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(summary.render(report)))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
