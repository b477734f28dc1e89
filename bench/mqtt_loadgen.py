"""MQTT 3.1.1 / 5.0 load generator for the broker benchmark: raw packets, pre-encoded, on uvloop.

No MQTT library runs in the hot loop. CONNECT, SUBSCRIBE and PUBLISH are encoded once per
connection with the few lines below (MQTT 3.1.1 sections 3.1, 3.3, 3.8); a flooding publisher
writes one pre-joined batch of identical PUBLISH packets per call, a QoS 0 subscriber counts
bytes (every PUBLISH it receives has the same size), and only QoS 1 and latency subscribers
parse packets (PUBACKs for one read go out in one write). A 5.0 QoS 1 publisher keeps no
more in flight than the broker's Receive Maximum, as the spec requires of a client (the
CONNACK is decoded with broker.mqtt, once per connection).

A :class:`Role` is one worker process holding ``connections`` connections. Every worker
follows the same steps so the coordinator measures only the timed window: connect (and
subscribe), report "ready", wait for the window (start, window_start, window_end), run until
window_end, report counts for the window, close. Every wait is bounded by a deadline and
every loop by a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import struct
import time
import traceback
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

import uvloop

from broker.mqtt import Connack, MQTTDecoder

#: How long a worker waits for the coordinator or the broker at any step.
STEP_TIMEOUT = 120.0
#: PUBLISH packets joined into one write by a flooding publisher.
FLOOD_BATCH = 128
#: Writes per event-loop turn before a flooding publisher yields (bounds each callback).
FLOOD_WRITES_PER_TURN = 32
#: QoS 1 packet identifiers a publisher cycles through (its window must stay below this).
PACKET_ID_RING = 1024
#: Connections opened at once by one worker.
CONNECT_CONCURRENCY = 100
#: Pacing tick of a rate-limited publisher (latency figure).
PACE_TICK = 0.002
#: Latency samples kept per subscriber (bounded memory).
MAX_SAMPLES = 200_000
WRITE_BUFFER_HIGH = 256 * 1024
TIMESTAMP = struct.Struct(">q")  # time.monotonic_ns() in the first 8 payload bytes


# -- MQTT 3.1.1 encoding (sections 2.2.3, 3.1, 3.3, 3.4, 3.8) ----------------------------------


def remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def connect_packet(
    client_id: str, keep_alive: int = 0, version: int = 4, clean: bool = True
) -> bytes:
    # 5.0 (section 3.1.2.11): an empty property list, one zero byte, after the keep alive
    # a persistent 5.0 session needs a Session Expiry Interval (0x11, 4 bytes): one hour
    properties = (b"\x00" if clean else b"\x05\x11\x00\x00\x0e\x10") if version == 5 else b""
    body = (
        utf8("MQTT")
        + bytes([version, 0x02 if clean else 0x00])
        + keep_alive.to_bytes(2, "big")
        + properties
        + utf8(client_id)
    )
    return b"\x10" + remaining_length(len(body)) + body


def subscribe_packet(topic_filter: str, qos: int, packet_id: int = 1, version: int = 4) -> bytes:
    properties = b"\x00" if version == 5 else b""
    body = packet_id.to_bytes(2, "big") + properties + utf8(topic_filter) + bytes([qos])
    return b"\x82" + remaining_length(len(body)) + body


def publish_packet(
    topic: str, payload: bytes, qos: int, packet_id: int = 0, version: int = 4
) -> bytes:
    properties = b"\x00" if version == 5 else b""
    body = utf8(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + properties + payload
    return bytes([0x30 | (qos << 1)]) + remaining_length(len(body)) + body


DISCONNECT = b"\xe0\x00"


def packet_end(buffer: bytes | bytearray, index: int) -> int:
    """End of the complete packet at `index`, or -1 while it is incomplete (2.2.3)."""
    size = len(buffer)
    length = 0
    shift = 0
    cursor = index + 1
    while cursor < size and shift <= 21:
        byte = buffer[cursor]
        cursor += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            end = cursor + length
            return end if end <= size else -1
    return -1


def connack_accepted(packet: bytes) -> bool:
    # 3.1.1: 20 02 flags 00; 5.0: 20 len flags 00 properties (a broker may add properties)
    return len(packet) >= 4 and packet[0] == 0x20 and packet[3] == 0


def receive_maximum(connack: bytes, version: int) -> int | None:
    """The broker's Receive Maximum (5.0 section 3.2.2.3.3), if its CONNACK says one: a 5.0
    client keeps no more QoS 1/2 PUBLISH than that unacknowledged [MQTT-3.3.4-9]."""
    if version != 5:
        return None
    decoder = MQTTDecoder(protocol_level=5)
    decoder.feed(connack)
    packet = decoder.next_event()
    return packet.properties.receive_maximum if isinstance(packet, Connack) else None


# -- roles and results -----------------------------------------------------------------------


@dataclass(frozen=True)
class Role:
    """One worker process: `kind` is pub | sub | idle | device | connect.

    device: an idle connection as the fleet's devices hold it: persistent session (clean
    session 0, keep alive 60 s), SUBSCRIBE to fleet/<client id>/commands at QoS 1.

    connect: `connections` loops, each CONNECT -> CONNACK -> DISCONNECT -> close on a new TCP
    connection, over and over until the window ends (`sent` counts CONNACKs in the window).
    """

    kind: str
    connections: int
    topic: str = "bench/t"
    qos: int = 0
    payload_size: int = 64
    rate: float = 0.0  # per connection, messages/s; 0 floods (publishers)
    window: int = 64  # QoS 1 publisher: PUBLISH in flight per connection
    latency: bool = False  # subscribers: parse the timestamp of every message
    cpus: tuple[int, ...] = ()
    name: str = "w"
    version: int = 4  # MQTT protocol level: 4 (3.1.1) or 5 (5.0)
    stamp: bool = False  # QoS 1 publisher: monotonic_ns() in every payload (latency)


@dataclass
class Counts:
    sent: int = 0
    acked: int = 0
    received: int = 0
    errors: int = 0
    connected: int = 0
    latencies_us: array[float] = field(default_factory=lambda: array("d"))


@dataclass
class Window:
    start: float
    window_start: float
    window_end: float

    def inside(self, now: float) -> bool:
        return self.window_start <= now < self.window_end


# -- protocols -------------------------------------------------------------------------------


class _Client(asyncio.Protocol):
    """Connection setup: CONNECT -> CONNACK (-> SUBSCRIBE -> SUBACK) as byte counts."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self.transport: asyncio.Transport | None = None
        self.window: Window | None = None
        self.setup = bytearray()
        self.setup_done: asyncio.Future[bytes] | None = None
        self.paused = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def expect(self) -> asyncio.Future[bytes]:
        """The next whole packet from the broker (CONNACK, SUBACK)."""
        self.setup.clear()
        self.setup_done = asyncio.get_running_loop().create_future()
        return self.setup_done

    def data_received(self, data: bytes) -> None:
        if self.setup_done is not None:
            self.setup += data
            end = packet_end(self.setup, 0)
            if end > 0:
                done, self.setup_done = self.setup_done, None
                extra = bytes(self.setup[end:])
                if not done.done():
                    done.set_result(bytes(self.setup[:end]))
                if extra:
                    self.received(extra)
            return
        self.received(data)

    def received(self, data: bytes) -> None:
        pass

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.setup_done is not None and not self.setup_done.done():
            self.setup_done.set_exception(ConnectionError("closed by the broker"))
        if self.window is not None and time.monotonic() < self.window.window_end:
            self.counts.errors += 1


class Publisher(_Client):
    """Floods (rate 0) or paces PUBLISH to one topic; QoS 1 keeps `window` in flight."""

    def __init__(self, counts: Counts, role: Role, client_index: int) -> None:
        super().__init__(counts)
        self.role = role
        payload = bytes(role.payload_size)
        self.batch = publish_packet(role.topic, payload, 0, version=role.version) * FLOOD_BATCH
        self.packets = [
            publish_packet(role.topic, payload, 1, packet_id, role.version)
            for packet_id in range(1, PACKET_ID_RING + 1)
        ]
        # stamped QoS 1: the payload (with its timestamp) starts this many bytes from the end
        self.payload_offset = len(self.packets[0]) - role.payload_size
        self.next_id = 0
        self.in_flight = 0
        # QoS 1 in flight: the role's window, or the broker's Receive Maximum (5.0) if lower
        self.in_flight_limit = role.window
        self.ack_bytes = 0
        self.header = b""
        self.client_index = client_index

    def begin(self, window: Window) -> None:
        self.window = window
        loop = asyncio.get_running_loop()
        if self.role.rate:
            loop.call_at(_loop_time_for(loop, window.start), self._pace, window.start, 0)
        elif self.role.qos:
            loop.call_at(_loop_time_for(loop, window.start), self._send_qos1, self.in_flight_limit)
        else:
            loop.call_at(_loop_time_for(loop, window.start), self._flood)

    def _running(self) -> bool:
        assert self.window is not None
        return not self.lost and time.monotonic() < self.window.window_end

    def _flood(self) -> None:
        transport, window, counts = self.transport, self.window, self.counts
        assert transport is not None and window is not None
        for _ in range(FLOOD_WRITES_PER_TURN):
            if self.paused or not self._running():
                return
            transport.write(self.batch)
            if window.inside(time.monotonic()):
                counts.sent += FLOOD_BATCH
        if self._running() and not self.paused:
            asyncio.get_running_loop().call_soon(self._flood)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.window is not None and not self.role.rate and not self.role.qos:
            self._flood()

    def _send_qos1(self, count: int) -> None:
        if count <= 0 or not self._running():
            return
        start = self.next_id
        end = start + count
        packets = self.packets
        if self.role.stamp:
            stamp = TIMESTAMP.pack(time.monotonic_ns())
            offset = self.payload_offset
            for index in range(start, end):
                packet = packets[index % PACKET_ID_RING]
                packets[index % PACKET_ID_RING] = (
                    packet[:offset] + stamp + packet[offset + TIMESTAMP.size :]
                )
        if end <= PACKET_ID_RING:
            data = b"".join(packets[start:end])
        else:
            data = b"".join(packets[start:]) + b"".join(packets[: end - PACKET_ID_RING])
        self.next_id = end % PACKET_ID_RING
        self.in_flight += count
        assert self.transport is not None
        self.transport.write(data)
        assert self.window is not None
        if self.window.inside(time.monotonic()):
            self.counts.sent += count

    def received(self, data: bytes) -> None:
        # A publisher receives only PUBACKs (4 bytes each in 3.1.1, and in 5.0 when the
        # reason is Success without properties, as both brokers send them).
        if not self.role.qos:
            return
        self.ack_bytes += len(data)
        acked, self.ack_bytes = divmod(self.ack_bytes, 4)
        self.in_flight -= acked
        if self.window is not None and self.window.inside(time.monotonic()):
            self.counts.acked += acked
        self._send_qos1(acked)

    def _pace(self, start: float, sent: int) -> None:
        if not self._running():
            return
        now = time.monotonic()
        due = min(int((now - start) * self.role.rate) - sent, 10_000)
        assert self.transport is not None and self.window is not None
        if due > 0:
            rest = bytes(self.role.payload_size - TIMESTAMP.size)
            packets = []
            for _ in range(due):
                stamp = TIMESTAMP.pack(time.monotonic_ns())
                packets.append(
                    publish_packet(
                        self.role.topic, stamp + rest, self.role.qos, 0, self.role.version
                    )
                )
            self.transport.write(b"".join(packets))
            if self.window.inside(now):
                self.counts.sent += due
            sent += due
        asyncio.get_running_loop().call_later(PACE_TICK, self._pace, start, sent)


class Subscriber(_Client):
    """Counts deliveries in the window; QoS 1 answers PUBACK; latency parses timestamps."""

    def __init__(self, counts: Counts, role: Role) -> None:
        super().__init__(counts)
        self.role = role
        # QoS 0 without timestamps: every PUBLISH has this size, so count bytes.
        self.packet_size = len(
            publish_packet(role.topic, bytes(role.payload_size), 0, version=role.version)
        )
        self.count_bytes = role.qos == 0 and not role.latency
        self.window_bytes = 0
        self.buffer = bytearray()

    def received(self, data: bytes) -> None:
        window = self.window
        if self.count_bytes:
            if window is not None and window.inside(time.monotonic()):
                self.window_bytes += len(data)
            return
        self.buffer += data
        self._parse(window)

    def _parse(self, window: Window | None) -> None:
        buffer = self.buffer
        size = len(buffer)
        index = 0
        acks: list[bytes] = []
        latencies = self.counts.latencies_us
        now_ns = time.monotonic_ns()
        inside = window is not None and window.inside(now_ns / 1e9)
        messages = 0
        while index + 2 <= size:
            first = buffer[index]
            length = 0
            shift = 0
            cursor = index + 1
            complete = False
            while cursor < size and shift <= 21:  # remaining length: at most 4 bytes (2.2.3)
                byte = buffer[cursor]
                cursor += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    complete = True
                    break
            if not complete:
                break
            end = cursor + length
            if end > size:
                break
            if first >> 4 == 3:  # PUBLISH
                messages += 1
                topic_length = int.from_bytes(buffer[cursor : cursor + 2], "big")
                body = cursor + 2 + topic_length
                if (first >> 1) & 3:
                    acks.append(b"\x40\x02" + bytes(buffer[body : body + 2]))
                    body += 2
                if self.role.version == 5:
                    body += 1 + buffer[body]  # property length (< 128 here) and properties
                if self.role.latency and inside and len(latencies) < MAX_SAMPLES:
                    (stamp,) = TIMESTAMP.unpack_from(buffer, body)
                    latencies.append((now_ns - stamp) / 1000)
            index = end
        del buffer[:index]
        if acks and self.transport is not None:
            self.transport.write(b"".join(acks))
        if inside:
            self.counts.received += messages

    def finish(self) -> None:
        if self.count_bytes:
            self.counts.received += self.window_bytes // self.packet_size


def _loop_time_for(loop: asyncio.AbstractEventLoop, monotonic: float) -> float:
    return loop.time() + (monotonic - time.monotonic())


# -- the worker process ----------------------------------------------------------------------


async def _open(
    port: int, role: Role, index: int, counts: Counts, deadline: float
) -> list[_Client]:
    loop = asyncio.get_running_loop()
    clients: list[_Client] = []
    pid = os.getpid()

    async def one(number: int) -> None:
        factory: Callable[[], _Client]
        if role.kind == "pub":
            factory = lambda: Publisher(counts, role, number)  # noqa: E731
        else:
            factory = lambda: Subscriber(counts, role)  # noqa: E731
        try:
            _transport, client = await asyncio.wait_for(
                loop.create_connection(factory, "127.0.0.1", port),
                max(1.0, deadline - time.monotonic()),
            )
            assert client.transport is not None
            ack = client.expect()
            client_id = f"{role.name}-{pid}-{index}-{number}"
            device = role.kind == "device"
            client.transport.write(
                connect_packet(
                    client_id,
                    keep_alive=60 if device else 0,
                    version=role.version,
                    clean=not device,
                )
            )
            answer = await asyncio.wait_for(ack, max(1.0, deadline - time.monotonic()))
            if not connack_accepted(answer):
                raise ConnectionError(f"CONNACK {answer.hex()}")
            limit = receive_maximum(answer, role.version)
            if isinstance(client, Publisher) and limit is not None:
                client.in_flight_limit = min(client.in_flight_limit, limit)
            if role.kind in ("sub", "device"):
                topic = f"fleet/{client_id}/commands" if device else role.topic
                qos = 1 if device else role.qos
                ack = client.expect()
                client.transport.write(subscribe_packet(topic, qos, version=role.version))
                answer = await asyncio.wait_for(ack, max(1.0, deadline - time.monotonic()))
                if answer[0] != 0x90 or answer[-1] != qos:
                    raise ConnectionError(f"SUBACK {answer.hex()}")
        except (OSError, TimeoutError, ConnectionError):
            counts.errors += 1
            return
        clients.append(client)
        counts.connected += 1

    numbers = list(range(role.connections))
    for offset in range(0, len(numbers), CONNECT_CONCURRENCY):
        await asyncio.gather(*(one(n) for n in numbers[offset : offset + CONNECT_CONCURRENCY]))
    return clients


async def _connect_loop(
    port: int, role: Role, index: int, counts: Counts, window: Window, loop_number: int
) -> None:
    """One connect-churn loop (see Role): until window_end, bounded by time. Client ids are
    unique, so no connection takes over another's session."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, window.start - time.monotonic()))
    number = 0
    pid = os.getpid()
    while time.monotonic() < window.window_end:
        number += 1
        client: _Client | None = None
        try:
            _transport, opened = await asyncio.wait_for(
                loop.create_connection(lambda: _Client(counts), "127.0.0.1", port), STEP_TIMEOUT
            )
            client = opened
            assert opened.transport is not None
            ack = opened.expect()
            opened.transport.write(
                connect_packet(
                    f"{role.name}-{pid}-{index}-{loop_number}-{number}", version=role.version
                )
            )
            answer = await asyncio.wait_for(ack, STEP_TIMEOUT)
            if not connack_accepted(answer):
                raise ConnectionError(f"CONNACK {answer.hex()}")
            opened.transport.write(DISCONNECT)
            opened.transport.close()
            if window.inside(time.monotonic()):
                counts.sent += 1
        except (OSError, TimeoutError, ConnectionError):
            counts.errors += 1
            if client is not None and client.transport is not None:
                client.transport.abort()
            await asyncio.sleep(0.01)


async def _work(port: int, role: Role, index: int, pipe: Connection) -> dict[str, Any]:
    counts = Counts()
    loop = asyncio.get_running_loop()
    clients: list[_Client] = []
    try:
        if role.kind != "connect":
            clients = await _open(port, role, index, counts, time.monotonic() + STEP_TIMEOUT)
        pipe.send(("ready", counts.connected, counts.errors))
        # wait for the window (or the release of idle connections), bounded
        ready = await loop.run_in_executor(None, pipe.poll, STEP_TIMEOUT)
        if not ready:
            raise TimeoutError("no window from the coordinator")
        window = Window(*pipe.recv())
        if role.kind == "connect":
            await asyncio.gather(
                *(
                    _connect_loop(port, role, index, counts, window, number)
                    for number in range(role.connections)
                )
            )
        for client in clients:
            client.window = window
            if isinstance(client, Publisher):
                client.begin(window)
        await asyncio.sleep(max(0.0, window.window_end - time.monotonic()) + 0.05)
        for client in clients:
            if isinstance(client, Subscriber):
                client.finish()
    finally:
        for client in clients:
            if client.transport is not None:
                client.transport.abort()
    return {
        "sent": counts.sent,
        "acked": counts.acked,
        "received": counts.received,
        "errors": counts.errors,
        "connected": counts.connected,
        "latencies_us": counts.latencies_us.tolist(),
    }


def worker_main(port: int, role: Role, index: int, pipe: Connection) -> None:
    """Entry point of one worker process (fork)."""
    if role.cpus:
        os.sched_setaffinity(0, role.cpus)
    try:
        result = uvloop.run(_work(port, role, index, pipe))
        pipe.send(("result", result))
    except BaseException as error:  # report, never hang the coordinator
        with contextlib.suppress(OSError):
            pipe.send(("error", f"{error!r}\n{traceback.format_exc()}"))
    finally:
        pipe.close()


@dataclass
class Worker:
    role: Role
    process: multiprocessing.process.BaseProcess
    pipe: Connection
    ready: tuple[int, int] = (0, 0)

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid


def start_workers(port: int, roles: list[Role]) -> list[Worker]:
    context = multiprocessing.get_context("fork")
    workers = []
    for index, role in enumerate(roles):
        ours, theirs = context.Pipe()
        process = context.Process(target=worker_main, args=(port, role, index, theirs), daemon=True)
        process.start()
        theirs.close()
        workers.append(Worker(role, process, ours))
    return workers


def wait_ready(workers: list[Worker], timeout: float = STEP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    for worker in workers:
        if not worker.pipe.poll(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"worker {worker.role.name} not ready")
        message = worker.pipe.recv()
        if message[0] == "error":
            raise RuntimeError(f"worker {worker.role.name} failed: {message[1]}")
        worker.ready = (message[1], message[2])


def send_window(workers: list[Worker], window: Window) -> None:
    for worker in workers:
        worker.pipe.send((window.start, window.window_start, window.window_end))


def collect(workers: list[Worker], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    results = []
    for worker in workers:
        if not worker.pipe.poll(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"worker {worker.role.name} sent no result")
        message = worker.pipe.recv()
        if message[0] == "error":
            raise RuntimeError(f"worker {worker.role.name} failed: {message[1]}")
        results.append(message[1])
    return results


def stop_workers(workers: list[Worker]) -> None:
    for worker in workers:
        if worker.process.is_alive():
            worker.process.kill()
    for worker in workers:
        worker.process.join(5)
        worker.pipe.close()
