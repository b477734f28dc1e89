"""The fleet's devices and its collector: forked worker processes driven by bench/fleet.py.

A simulator process holds one slice of the fleet (a few thousand to ~15,000 devices, below
the per-process file limit), all on one uvloop loop. Each device is one `asyncio.Protocol`
over the standard library's TLS (uvloop's SSL transport): its own certificate and key
(`lb-pki device --count N`), a source address in 127.0.0.0/8 bound before connect (so
devices are not limited by one address's ephemeral port range), then MQTT with the project's
codec (`broker.mqtt.codec`): CONNECT with a keepalive and a persistent session (clean start
0 by default), SUBSCRIBE to its own `fleet/<id>/commands` unless the session was present,
then QoS 1 telemetry to `fleet/<id>/telemetry` at a set interval, counting PUBACKs. Every
PUBLISH carries (device number, sequence) so the collector can say which acknowledged
messages it never received. A device that loses its connection comes back as device SDKs
do: exponential backoff with full jitter (AWS's "Exponential Backoff And Jitter"), resending
what was not acknowledged.

The collector is one plain-TCP MQTT client on a broker node (with a PROXY v2 header, as the
balancer would send): it subscribes to `fleet/+/telemetry` at QoS 1 with a persistent
session, records every (device, sequence) it receives, and publishes QoS 1 commands to the
devices' command topics at a set rate, recording which ones the broker acknowledged.

Both talk to the coordinator over a multiprocessing pipe: commands in (`connect`, `drop`,
`telemetry`, `commands`, `report`, `stop`), a status dict out every STATUS_INTERVAL, and
a final report with the per-device sequences. Every wait is bounded by a deadline and every
loop by a count.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import pickle
import random
import resource
import ssl
import struct
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import uvloop

from broker.mqtt.codec import NEED_DATA, MQTTDecoder, encode
from broker.mqtt.packets import (
    Connack,
    Connect,
    Disconnect,
    MQTTProtocolError,
    Pingreq,
    Properties,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
    Will,
)
from lb.proxyproto import Command, encode_v2

#: Seconds between two status messages to the coordinator.
STATUS_INTERVAL = 1.0
#: Telemetry payload head: device number, sequence, send time (ns since the epoch).
TELEMETRY = struct.Struct(">IIQ")
#: Command payload head: device number, command sequence.
COMMAND = struct.Struct(">II")
#: Will payload: device number.
WILL = struct.Struct(">I")
#: How long a process waits for anything from the coordinator before giving up.
IDLE_LIMIT = 3600.0
#: Seconds between two batches of the collector's commands.
COMMAND_TICK = 0.05
#: Packet identifiers are 1..65535 (MQTT 3.1.1 section 2.3.1).
MAX_PACKET_ID = 65535


def device_name(number: int) -> str:
    """lb-pki's name for device `number` (`lb-pki device --count`: device-0001...)."""
    return f"device-{number:04d}"


@dataclass(frozen=True)
class DeviceSettings:
    """What every device of the fleet does (the same in every process)."""

    certs: str  # folder with device-NNNN.pem / -key.pem and CaRoot.pem
    server_name: str = "localhost"  # SNI and the name checked in the server certificate
    protocol_level: int = 4  # 4 = MQTT 3.1.1, 5 = MQTT 5.0
    keep_alive: int = 60  # seconds; a PINGREQ after 0.75 of it idle (lb closes at 60 s)
    clean_start: bool = False  # persistent sessions, as fleets use them
    session_expiry: int = 7200  # MQTT 5 Session Expiry Interval (3.1.1: the broker's)
    telemetry_interval: float = 60.0  # seconds between two messages of one device
    payload_size: int = 64
    connect_timeout: float = 30.0  # TCP + TLS + CONNACK + SUBACK, as an SDK's
    backoff_base: float = 1.0  # first retry within [0, base] s
    backoff_cap: float = 60.0  # retries within [0, min(cap, base * 2**n)] s
    max_inflight: int = 32  # unacknowledged QoS 1 telemetry per device
    ramp_concurrency: int = 32  # connects in flight per process during a ramp
    wills: bool = False  # a QoS 1 will to fleet/<id>/status (delay 0), counted by the collector


@dataclass(frozen=True)
class Slice:
    """The devices one process simulates: numbers first..first+count-1."""

    index: int
    first: int
    count: int
    sources: tuple[str, ...]  # source addresses in 127.0.0.0/8, devices spread over them


@dataclass
class Stats:
    """Counters of one process for the current phase (reset at each `phase`)."""

    connected: int = 0
    ever_connected: int = 0
    attempts: int = 0
    handshakes: int = 0
    connacks: int = 0
    refusals: collections.Counter[str] = field(default_factory=collections.Counter)
    disconnects: collections.Counter[str] = field(default_factory=collections.Counter)
    published: int = 0
    acked: int = 0
    skipped: int = 0  # telemetry due while offline or with the in-flight window full
    resent: int = 0
    commands_received: int = 0
    sessions_present: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "ever_connected": self.ever_connected,
            "attempts": self.attempts,
            "handshakes": self.handshakes,
            "connacks": self.connacks,
            "refusals": dict(self.refusals),
            "disconnects": dict(self.disconnects),
            "published": self.published,
            "acked": self.acked,
            "skipped": self.skipped,
            "resent": self.resent,
            "commands_received": self.commands_received,
            "sessions_present": self.sessions_present,
        }


# -- one device ----------------------------------------------------------------------------

IDLE, CONNECTING, CONNECTED, WAITING = range(4)


class Link(asyncio.Protocol):
    """One connection of a device. A device outlives its connections: a late
    connection_lost of an old one must not touch the device's new connection."""

    __slots__ = ("connacked", "decoder", "device", "lost", "transport", "waiter")

    def __init__(self, device: Device) -> None:
        self.device = device
        self.transport: asyncio.Transport | None = None
        self.decoder = MQTTDecoder(protocol_level=device.fleet.settings.protocol_level)
        self.waiter: asyncio.Future[Any] | None = None
        self.lost = False
        # After CONNACK the server sends the session's queued messages at once, before the
        # device has taken this link as its own (that waits for the coroutine, and SUBACK):
        # they are the device's from then on, not dropped.
        self.connacked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.decoder.feed(data)
            for _ in range(10_000):  # bounded: a read holds at most a few packets
                packet = self.decoder.next_event()
                if packet is NEED_DATA:
                    return
                if self.waiter is not None and isinstance(packet, Connack | Suback):
                    self.connacked = True
                    if not self.waiter.done():
                        self.waiter.set_result(packet)
                elif self.device.link is self or self.connacked:
                    self.device.packet(packet, self)
        except MQTTProtocolError as error:
            self.device.fleet.stats.disconnects[f"bad packet from server: {error}"] += 1
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed before"))
        if self.device.link is self:
            self.device.link = None
            self.device.lost(exc)


class Device:
    """One device's identity and session state (sequences, unacknowledged telemetry)."""

    __slots__ = (
        "attempt",
        "commands",
        "context",
        "first_connected",
        "fleet",
        "inflight",
        "last_write",
        "link",
        "name",
        "next_packet_id",
        "next_publish",
        "next_seq",
        "number",
        "source",
        "state",
        "timer",
    )

    def __init__(self, fleet: Simulator, number: int, source: str) -> None:
        self.fleet = fleet
        self.number = number
        self.name = device_name(number)
        self.source = source
        self.context: ssl.SSLContext | None = None
        self.link: Link | None = None
        self.state = IDLE
        self.attempt = 0
        self.next_seq = 0
        self.next_packet_id = 0
        self.next_publish = 0.0
        self.inflight: dict[int, tuple[int, bytes]] = {}  # packet id -> (seq, PUBLISH)
        self.commands: set[int] = set()
        self.timer: asyncio.TimerHandle | None = None
        self.last_write = 0.0
        self.first_connected: float | None = None  # wall clock, this phase

    def lost(self, exc: Exception | None) -> None:
        """The connection went away without the device asking for it."""
        if self.state != CONNECTED:
            return  # a failed attempt: connect() counts it and retries
        fleet = self.fleet
        self.cancel_timer()
        fleet.stats.connected -= 1
        self.state = IDLE
        cause = "closed by peer" if exc is None else f"lost: {type(exc).__name__}"
        fleet.stats.disconnects[cause] += 1
        fleet.disconnect_times.append(time.time())
        fleet.retry(self)

    def close_now(self, graceful: bool = False) -> None:
        """The device closes its connection itself (drop, stop): not a disconnect. Dropped
        (the default) it just goes, and the broker publishes its will; ``graceful`` (the
        fleet's end) it sends DISCONNECT first, as a device that is shut down does: no will.
        Before, the end's 20,000 wills at once overflowed the collector's queues after the
        accounting, and the brokers counted thousands of acknowledged messages dropped."""
        self.cancel_timer()
        link, self.link = self.link, None
        connected = self.state == CONNECTED
        if connected:
            self.fleet.stats.connected -= 1
        if self.state in (CONNECTED, WAITING):
            self.state = IDLE
        if link is None or link.transport is None:
            return
        if graceful and connected:
            link.transport.write(encode(Disconnect(), self.fleet.settings.protocol_level))
            link.transport.close()  # after the DISCONNECT, with TLS close_notify
        else:
            link.transport.abort()

    # -- MQTT

    def packet(self, packet: Any, link: Link) -> None:
        if isinstance(packet, Puback):
            if self.inflight.pop(packet.packet_id, None) is not None:
                self.fleet.stats.acked += 1
        elif isinstance(packet, Publish):
            if packet.qos and packet.packet_id is not None and link.transport is not None:
                # On the link it came by: it may not be the device's own yet (see Link).
                link.transport.write(
                    encode(Puback(packet.packet_id), self.fleet.settings.protocol_level)
                )
            if len(packet.payload) >= COMMAND.size:
                _number, sequence = COMMAND.unpack_from(packet.payload)
                if sequence not in self.commands:
                    self.commands.add(sequence)
                    self.fleet.stats.commands_received += 1
        elif isinstance(packet, Disconnect):
            self.fleet.stats.disconnects[f"DISCONNECT 0x{packet.reason_code:02X}"] += 1

    def write(self, data: bytes) -> None:
        link = self.link
        if link is not None and link.transport is not None:
            link.transport.write(data)
            self.last_write = time.monotonic()

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def packet_id(self) -> int:
        for _ in range(MAX_PACKET_ID):
            self.next_packet_id = self.next_packet_id % MAX_PACKET_ID + 1
            if self.next_packet_id not in self.inflight:
                return self.next_packet_id
        raise RuntimeError("no free packet identifier")

    def tick(self) -> None:
        """The one timer of a connected device: telemetry when due, PINGREQ when idle."""
        self.timer = None
        if self.state != CONNECTED:
            return
        fleet = self.fleet
        settings = fleet.settings
        now = time.monotonic()
        idle_limit = settings.keep_alive * 0.75
        telemetry = fleet.telemetry and settings.telemetry_interval > 0
        if telemetry and now >= self.next_publish:
            self.publish()
            self.next_publish = max(self.next_publish + settings.telemetry_interval, now)
        if now - self.last_write >= idle_limit:
            self.write(fleet.pingreq)
        due = self.last_write + idle_limit
        if telemetry:
            due = min(due, self.next_publish)
        self.timer = fleet.loop.call_later(max(0.01, due - time.monotonic()), self.tick)

    def publish(self) -> None:
        fleet = self.fleet
        if len(self.inflight) >= fleet.settings.max_inflight:
            fleet.stats.skipped += 1
            return
        sequence = self.next_seq
        self.next_seq += 1
        payload = TELEMETRY.pack(self.number, sequence, time.time_ns()) + fleet.padding
        packet_id = self.packet_id()
        data = encode(
            Publish(f"fleet/{self.name}/telemetry", payload, qos=1, packet_id=packet_id),
            fleet.settings.protocol_level,
        )
        self.inflight[packet_id] = (sequence, data)
        self.write(data)
        fleet.stats.published += 1

    def resend(self) -> None:
        """After a reconnect: what was not acknowledged goes again (DUP set), in order."""
        for _sequence, data in sorted(self.inflight.values()):
            self.write(bytes([data[0] | 0x08]) + data[1:])
            self.fleet.stats.resent += 1

    def report(self) -> tuple[int, int, list[int], list[int], float | None]:
        """(number, sequences sent, sequences not acknowledged, commands received, when it
        first had its subscription in this phase)."""
        unacked = sorted(sequence for sequence, _ in self.inflight.values())
        return self.number, self.next_seq, unacked, sorted(self.commands), self.first_connected


# -- one simulator process -----------------------------------------------------------------


class Simulator:
    """The devices of one slice on one loop, and the pipe to the coordinator."""

    def __init__(self, settings: DeviceSettings, part: Slice, pipe: Connection) -> None:
        self.settings = settings
        self.part = part
        self.pipe = pipe
        self.loop = asyncio.get_running_loop()
        self.stats = Stats()
        self.devices = [
            Device(self, number, part.sources[offset % len(part.sources)])
            for offset, number in enumerate(range(part.first, part.first + part.count))
        ]
        self.address = ("127.0.0.1", 0)
        self.telemetry = False
        self.reconnect = True
        self.pingreq = encode(Pingreq(), settings.protocol_level)
        self.padding = bytes(max(0, settings.payload_size - TELEMETRY.size))
        self.disconnect_times: list[float] = []
        self.refusal_times: list[float] = []
        self.pending: set[asyncio.Task[None]] = set()
        self.done = asyncio.Event()
        self.last_message = time.monotonic()
        self.root = (Path(settings.certs) / "CaRoot.pem").read_text()

    def prepare(self) -> float:
        """Every device's SSLContext (its own certificate), before any phase: seconds taken."""
        started = time.monotonic()
        for device in self.devices:
            device.context = self.context_for(device)
        return time.monotonic() - started

    def context_for(self, device: Device) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cadata=self.root)
        certs = Path(self.settings.certs)
        context.load_cert_chain(certs / f"{device.name}.pem", certs / f"{device.name}-key.pem")
        return context

    # -- connecting

    async def connect(self, device: Device) -> bool:
        """One connection attempt: TCP, TLS, CONNECT/CONNACK, SUBSCRIBE/SUBACK, resend."""
        settings, stats = self.settings, self.stats
        device.state = CONNECTING
        stats.attempts += 1
        phase = "tcp connect"
        link = Link(device)
        try:
            async with asyncio.timeout(settings.connect_timeout):
                assert device.context is not None
                await self.loop.create_connection(
                    lambda: link,
                    *self.address,
                    ssl=device.context,
                    server_hostname=settings.server_name,
                    local_addr=(device.source, 0),
                    ssl_handshake_timeout=settings.connect_timeout,
                )
                stats.handshakes += 1
                phase = "CONNACK"
                connack = await self.request(link, self.connect_packet(device))
                if not isinstance(connack, Connack):
                    raise ConnectionError(f"{type(connack).__name__} instead of CONNACK")
                if connack.reason_code != 0:
                    raise ConnectionError(f"CONNACK refused 0x{connack.reason_code:02X}")
                stats.connacks += 1
                if connack.session_present:
                    stats.sessions_present += 1
                else:
                    phase = "SUBACK"
                    subscribe = Subscribe(1, (Subscription(f"fleet/{device.name}/commands", 1),))
                    suback = await self.request(link, encode(subscribe, settings.protocol_level))
                    if not isinstance(suback, Suback):
                        raise ConnectionError(f"{type(suback).__name__} instead of SUBACK")
                    if suback.reason_codes[0] >= 0x80:
                        raise ConnectionError(f"SUBACK refused 0x{suback.reason_codes[0]:02X}")
        except (OSError, TimeoutError, ConnectionError, ssl.SSLError) as error:
            stats.refusals[refusal_reason(phase, error)] += 1
            self.refusal_times.append(time.time())
            if link.transport is not None:
                link.transport.abort()
            device.state = IDLE
            return False
        device.link = link
        device.state = CONNECTED
        if device.first_connected is None:
            device.first_connected = time.time()
        device.attempt = 0
        stats.connected += 1
        stats.ever_connected += 1
        device.last_write = time.monotonic()
        device.resend()
        # Spread the devices' telemetry over the interval, as a real fleet's clocks are.
        now = time.monotonic()
        device.next_publish = now + random.uniform(0, settings.telemetry_interval)
        due = min(device.next_publish, now + settings.keep_alive * 0.75)
        device.timer = self.loop.call_later(due - now, device.tick)
        return True

    def connect_packet(self, device: Device) -> bytes:
        settings = self.settings
        properties = Properties()
        if settings.protocol_level == 5:
            properties = Properties(session_expiry_interval=settings.session_expiry)
        will = None
        if settings.wills:
            will = Will(f"fleet/{device.name}/status", WILL.pack(device.number), 1)
        connect = Connect(
            "MQTT",
            settings.protocol_level,
            settings.clean_start,
            settings.keep_alive,
            device.name,
            will=will,
            properties=properties,
        )
        return encode(connect, settings.protocol_level)

    async def request(self, link: Link, data: bytes) -> Any:
        if link.lost or link.transport is None:
            raise ConnectionError("closed before")
        link.waiter = self.loop.create_future()
        link.transport.write(data)
        try:
            return await link.waiter
        finally:
            link.waiter = None

    def retry(self, device: Device) -> None:
        """Come back later, as an SDK does: full jitter over an exponential window."""
        if not self.reconnect:
            return
        settings = self.settings
        window = min(settings.backoff_cap, settings.backoff_base * 2**device.attempt)
        device.attempt = min(device.attempt + 1, 30)
        device.state = WAITING
        device.timer = self.loop.call_later(random.uniform(0, window), self.start, device)

    def start(self, device: Device) -> None:
        device.timer = None
        if device.state not in (IDLE, WAITING) or not self.reconnect:
            return
        task = self.loop.create_task(self.attempt(device))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def attempt(self, device: Device) -> None:
        if not await self.connect(device):
            self.retry(device)

    async def ramp(self, concurrency: int) -> None:
        """Bring every idle device in, at most `concurrency` connects in flight; a device
        that fails goes on by itself with backoff."""
        gate = asyncio.Semaphore(concurrency)

        async def one(device: Device) -> None:
            async with gate:
                if device.state == IDLE and self.reconnect:
                    await self.attempt(device)

        tasks = [self.loop.create_task(one(d)) for d in self.devices if d.state == IDLE]
        await asyncio.gather(*tasks)

    def spread_telemetry(self) -> None:
        """Telemetry starts: each connected device's first message at a random point of
        the interval (a fleet's clocks are not in step), not at its next keepalive tick."""
        now = time.monotonic()
        idle_limit = self.settings.keep_alive * 0.75
        for device in self.devices:
            if device.state == CONNECTED:
                device.cancel_timer()
                device.next_publish = now + random.uniform(0, self.settings.telemetry_interval)
                # the keepalive still holds: a PINGREQ may be due before the first message
                due = min(device.next_publish, device.last_write + idle_limit)
                device.timer = self.loop.call_later(max(0.0, due - now), device.tick)

    def drop(self, fraction: float = 1.0) -> int:
        """Every connected device (or each with probability ``fraction``) closes its
        connection now, then comes back with backoff."""
        dropped = 0
        for device in self.devices:
            if device.state == CONNECTED and (fraction >= 1.0 or random.random() < fraction):
                device.close_now()
                device.attempt = 0
                self.retry(device)
                dropped += 1
        return dropped

    # -- the pipe to the coordinator

    def status(self) -> dict[str, Any]:
        return {
            "index": self.part.index,
            "time": time.time(),
            **self.stats.snapshot(),
            "states": collections.Counter(d.state for d in self.devices),
        }

    async def serve(self) -> None:
        readable = asyncio.Event()
        self.loop.add_reader(self.pipe.fileno(), readable.set)
        next_status = time.monotonic()
        ramp: asyncio.Task[None] | None = None
        try:
            while not self.done.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, next_status - time.monotonic())):
                        await readable.wait()
                readable.clear()
                while self.pipe.poll():
                    self.last_message = time.monotonic()
                    ramp = self.command(self.pipe.recv(), ramp)
                if time.monotonic() >= next_status:
                    self.pipe.send(("status", self.status()))
                    next_status = time.monotonic() + STATUS_INTERVAL
                if time.monotonic() - self.last_message > IDLE_LIMIT:
                    raise TimeoutError("no word from the coordinator")
        finally:
            self.loop.remove_reader(self.pipe.fileno())
            if ramp is not None:
                ramp.cancel()

    def command(self, message: tuple[Any, ...], ramp: asyncio.Task[None] | None) -> Any:
        name = message[0]
        if name == "phase":  # a new balancer: its port, fresh counters
            self.address = ("127.0.0.1", int(message[1]))
            self.stats = Stats()
            self.disconnect_times.clear()
            self.refusal_times.clear()
            self.reconnect = True
            for device in self.devices:
                device.next_seq = 0
                device.inflight.clear()
                device.commands.clear()
                device.attempt = 0
                device.first_connected = None
            self.pipe.send(("phased", self.status()))
        elif name == "connect":
            self.reconnect = True
            ramp = self.loop.create_task(self.ramp(int(message[1])))
        elif name == "telemetry":
            self.telemetry = bool(message[1])
            if self.telemetry and self.settings.telemetry_interval > 0:
                self.spread_telemetry()
        elif name == "drop":
            fraction = float(message[1]) if len(message) > 1 else 1.0
            self.pipe.send(("dropped", self.drop(fraction), self.status()))
        elif name == "report":  # big: through a file, the pipe gets its name
            self.pipe.send(("report", write_report(message[1], self.final_report())))
        elif name == "close":  # stop reconnecting and close every connection
            self.reconnect = False
            self.telemetry = False
            for device in self.devices:
                device.close_now(graceful=True)
            self.pipe.send(("closed", len(self.pending)))
        elif name == "stop":
            self.done.set()
        return ramp

    def final_report(self) -> dict[str, Any]:
        return {
            "index": self.part.index,
            **self.stats.snapshot(),
            "devices": [device.report() for device in self.devices],
            "disconnect_times": self.disconnect_times[-200_000:],
            "refusal_times": self.refusal_times[-200_000:],
        }


def refusal_reason(phase: str, error: BaseException) -> str:
    """A short, stable reason for a failed connection attempt (what an SDK would log)."""
    if isinstance(error, TimeoutError):
        return f"timeout before {phase}" if phase != "tcp connect" else "timeout (TCP+TLS)"
    if isinstance(error, ssl.SSLError):
        return f"TLS: {error.reason or type(error).__name__}"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ConnectionResetError):
        return f"reset before {phase}" if phase != "tcp connect" else "reset during TLS"
    if isinstance(error, OSError) and error.errno is not None:
        return f"{phase}: {os.strerror(error.errno)}"
    text = str(error) or type(error).__name__
    if "closed before" in text:
        return f"closed before {phase}" if phase != "tcp connect" else "closed during TLS"
    return f"{phase}: {text[:80]}"


# -- the collector -------------------------------------------------------------------------


class CollectorLink(asyncio.Protocol):
    """One of the collector's connections (a member of its shared subscription)."""

    def __init__(self, collector: Collector, index: int) -> None:
        self.collector = collector
        self.index = index
        self.transport: asyncio.Transport | None = None
        self.decoder = MQTTDecoder(protocol_level=collector.settings.protocol_level)
        self.waiter: asyncio.Future[Any] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        connected, self.transport = self.transport is not None, None
        self.collector.lost += 1
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("collector connection closed"))
        if connected and self in self.collector.links:
            self.collector.relink(self.index)

    def data_received(self, data: bytes) -> None:
        self.decoder.feed(data)
        acks = []
        level = self.collector.settings.protocol_level
        for _ in range(100_000):
            packet = self.decoder.next_event()
            if packet is NEED_DATA:
                break
            if isinstance(packet, Publish):
                if packet.packet_id is not None:
                    acks.append(encode(Puback(packet.packet_id), level))
                if packet.topic.endswith("/status"):
                    self.collector.will_received(packet.payload)
                else:
                    self.collector.telemetry_received(packet.payload)
            elif isinstance(packet, Puback):
                self.collector.command_acked(packet.packet_id)
            elif self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(packet)
        if acks and self.transport is not None:
            self.transport.write(b"".join(acks))

    async def request(self, data: bytes) -> Any:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        try:
            return await asyncio.wait_for(self.waiter, STEP_TIMEOUT)
        finally:
            self.waiter = None


class Collector:
    """The fleet's backend: COLLECTOR_LINKS connections to one broker node, members of one
    shared subscription to every device's telemetry (one QoS 1 session would cap the
    fleet at its in-flight window per round trip: the broker's max_inflight is 32, and a
    backed-up subscriber pauses the publishers); the first link also publishes commands."""

    def __init__(self, settings: DeviceSettings, devices: int) -> None:
        self.settings = settings
        self.devices = devices
        self.links: list[CollectorLink] = []
        self.port = 0
        self.relinks: dict[int, asyncio.Task[None]] = {}
        self.relinked = 0
        self.received: dict[int, set[int]] = collections.defaultdict(set)
        self.duplicates = 0
        self.telemetry = 0
        self.command_rate = 0.0
        self.command_seq = 0
        self.next_packet_id = 0
        self.commands_inflight: dict[int, tuple[int, int]] = {}
        self.commands_acked: dict[int, set[int]] = collections.defaultdict(set)
        self.command_times: dict[int, float] = {}  # sequence -> when it was sent
        self.commands_sent = 0
        self.lost = 0
        # Wills received (devices' connections that ended without DISCONNECT), per device.
        self.wills: collections.Counter[int] = collections.Counter()
        self.done = asyncio.Event()

    def telemetry_received(self, payload: bytes) -> None:
        if len(payload) < TELEMETRY.size:
            return
        number, sequence, _sent = TELEMETRY.unpack_from(payload)
        seen = self.received[number]
        if sequence in seen:
            self.duplicates += 1
        else:
            seen.add(sequence)
            self.telemetry += 1

    def will_received(self, payload: bytes) -> None:
        if len(payload) == WILL.size:
            self.wills[WILL.unpack(payload)[0]] += 1

    def command_acked(self, packet_id: int) -> None:
        entry = self.commands_inflight.pop(packet_id, None)
        if entry is not None:
            self.commands_acked[entry[0]].add(entry[1])

    async def start(self, port: int) -> None:
        self.port = port
        for index in range(1, COLLECTOR_LINKS + 1):
            self.links.append(await self.connect(index))

    async def connect(self, index: int) -> CollectorLink:
        """Link `index` (1..COLLECTOR_LINKS): its persistent session (client id
        fleet-collector-INDEX), subscribed when the broker had none for it."""
        loop = asyncio.get_running_loop()
        level = self.settings.protocol_level
        properties = Properties(session_expiry_interval=7200) if level == 5 else Properties()
        link = CollectorLink(self, index)
        await asyncio.wait_for(
            loop.create_connection(lambda: link, "127.0.0.1", self.port), STEP_TIMEOUT
        )
        try:
            assert link.transport is not None
            # the header lb would send; the node trusts 127.0.0.0/8 (demo config)
            link.transport.write(
                encode_v2(Command.PROXY, ("127.0.0.1", index), ("127.0.0.1", self.port))
            )
            client_id = f"fleet-collector-{index}"
            connect = Connect("MQTT", level, False, 0, client_id, properties=properties)
            connack = await link.request(encode(connect, level))
            if not isinstance(connack, Connack) or connack.reason_code != 0:
                raise ConnectionError(f"collector refused: {connack}")
            if not connack.session_present:
                subscriptions = [Subscription(f"$share/{SHARE_GROUP}/fleet/+/telemetry", 1)]
                if self.settings.wills:
                    subscriptions.append(Subscription(f"$share/{SHARE_GROUP}/fleet/+/status", 1))
                suback = await link.request(encode(Subscribe(1, tuple(subscriptions)), level))
                if not isinstance(suback, Suback) or any(
                    code >= 0x80 for code in suback.reason_codes
                ):
                    raise ConnectionError(f"collector subscription refused: {suback}")
        except BaseException:
            if link.transport is not None:
                link.transport.abort()
            raise
        return link

    def relink(self, index: int) -> None:
        """Link `index` dropped (its broker node stopped): connect it again, every
        RELINK_INTERVAL for at most RELINK_TIMEOUT, as a backend with a persistent session
        does; the commands it had not seen acknowledged go again (DUP set)."""
        if self.done.is_set() or index in self.relinks:
            return

        async def again() -> None:
            deadline = time.monotonic() + RELINK_TIMEOUT
            try:
                while not self.done.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(RELINK_INTERVAL)
                    try:
                        link = await self.connect(index)
                    except (OSError, ConnectionError, TimeoutError, MQTTProtocolError):
                        continue
                    self.links[index - 1] = link
                    self.relinked += 1
                    if index == 1:
                        self.resend_commands(link)
                    return
            finally:
                del self.relinks[index]

        self.relinks[index] = asyncio.get_running_loop().create_task(again())

    def resend_commands(self, link: CollectorLink) -> None:
        level = self.settings.protocol_level
        packets = []
        for packet_id, (number, sequence) in self.commands_inflight.items():
            payload = COMMAND.pack(number, sequence) + b"reboot"
            topic = f"fleet/{device_name(number)}/commands"
            packet = Publish(topic, payload, qos=1, packet_id=packet_id, dup=True)
            packets.append(encode(packet, level))
        if packets and link.transport is not None:
            link.transport.write(b"".join(packets))

    async def publish_commands(self) -> None:
        """Commands at `command_rate` per second to random devices (bounded by `done`)."""
        level = self.settings.protocol_level
        started, sent = time.monotonic(), 0
        while not self.done.is_set():
            await asyncio.sleep(COMMAND_TICK)
            transport = self.links[0].transport if self.links else None
            if not self.command_rate or transport is None:
                started, sent = time.monotonic(), 0
                continue
            due = int((time.monotonic() - started) * self.command_rate) - sent
            packets = []
            for _ in range(min(due, 10_000)):
                if len(self.commands_inflight) >= MAX_PACKET_ID - 1:
                    break
                number = random.randint(1, self.devices)
                self.command_seq += 1
                self.next_packet_id = self.next_packet_id % MAX_PACKET_ID + 1
                while self.next_packet_id in self.commands_inflight:
                    self.next_packet_id = self.next_packet_id % MAX_PACKET_ID + 1
                payload = COMMAND.pack(number, self.command_seq) + b"reboot"
                topic = f"fleet/{device_name(number)}/commands"
                packets.append(
                    encode(Publish(topic, payload, qos=1, packet_id=self.next_packet_id), level)
                )
                self.commands_inflight[self.next_packet_id] = (number, self.command_seq)
                self.command_times[self.command_seq] = time.time()
                self.commands_sent += 1
                sent += 1
            if packets:
                transport.write(b"".join(packets))

    def close(self) -> None:
        for task in self.relinks.values():
            task.cancel()
        for link in self.links:
            if link.transport is not None:
                link.transport.abort()

    def status(self) -> dict[str, Any]:
        return {
            "time": time.time(),
            "telemetry_received": self.telemetry,
            "duplicates": self.duplicates,
            "commands_sent": self.commands_sent,
            "commands_acked": sum(len(s) for s in self.commands_acked.values()),
            "links_lost": self.lost,
            "links_relinked": self.relinked,
            "wills": sum(self.wills.values()),
            "wills_devices": len(self.wills),
        }

    def final_report(self) -> dict[str, Any]:
        return {
            **self.status(),
            "received": {number: sorted(seen) for number, seen in self.received.items()},
            "commands": {number: sorted(seen) for number, seen in self.commands_acked.items()},
            "command_times": self.command_times,
        }


#: The collector's connections (members of one shared subscription) and their group.
COLLECTOR_LINKS = 8
SHARE_GROUP = "fleet-collector"
#: How long the collector waits for its broker at any step.
STEP_TIMEOUT = 30.0
#: A dropped collector link is connected again every RELINK_INTERVAL seconds, for at most
#: RELINK_TIMEOUT (its node stopped: the blackout scenario's outage and restart).
RELINK_INTERVAL = 0.5
RELINK_TIMEOUT = 900.0


async def collector_main(
    settings: DeviceSettings, devices: int, port: int, pipe: Connection
) -> None:
    collector = Collector(settings, devices)
    await collector.start(port)
    pipe.send(("ready", 0.0))
    commands = asyncio.get_running_loop().create_task(collector.publish_commands())
    readable = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(pipe.fileno(), readable.set)
    last_message = time.monotonic()
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATUS_INTERVAL):
                    await readable.wait()
            readable.clear()
            while pipe.poll():
                last_message = time.monotonic()
                message = pipe.recv()
                if message[0] == "commands":
                    collector.command_rate = float(message[1])
                elif message[0] == "report":  # big: through a file, the pipe gets its name
                    pipe.send(("report", write_report(message[1], collector.final_report())))
                elif message[0] == "stop":
                    return
            pipe.send(("status", collector.status()))
            if time.monotonic() - last_message > IDLE_LIMIT:
                raise TimeoutError("no word from the coordinator")
    finally:
        collector.done.set()
        commands.cancel()
        loop.remove_reader(pipe.fileno())
        collector.close()


async def simulator_main(settings: DeviceSettings, part: Slice, pipe: Connection) -> None:
    simulator = Simulator(settings, part, pipe)
    seconds = simulator.prepare()
    pipe.send(("ready", seconds))
    try:
        await simulator.serve()
    finally:
        simulator.reconnect = False
        for device in simulator.devices:
            device.close_now()
        for task in list(simulator.pending):
            task.cancel()


def process_main(target: Callable[..., Any], pipe: Connection, *args: Any) -> None:
    """Entry point of a forked process: run `target` on uvloop, report a failure."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        uvloop.run(target(*args, pipe))
    except BaseException as error:  # report, never leave the coordinator waiting
        with contextlib.suppress(OSError):
            pipe.send(("error", f"{error!r}\n{traceback.format_exc()}"))
    finally:
        pipe.close()


def write_report(path: str, report: dict[str, Any]) -> str:
    """A final report (per-device sequences: megabytes for a large fleet) as a pickle file;
    a pipe message that size blocked both ends of the pipe."""
    with open(path, "wb") as stream:
        pickle.dump(report, stream, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def read_report(path: str) -> dict[str, Any]:
    with open(path, "rb") as stream:
        report: dict[str, Any] = pickle.load(stream)
    os.unlink(path)
    return report


def sources_for(count: int, per_source: int, first: int = 2) -> tuple[str, ...]:
    """Source addresses 127.0.0.<first>... enough for `count` devices, `per_source` each."""
    needed = max(1, -(-count // per_source))
    addresses = []
    for index in range(needed):
        value = first + index
        addresses.append(f"127.0.{value // 254}.{value % 254 + 1}")
    return tuple(addresses)
