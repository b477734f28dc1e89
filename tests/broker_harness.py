"""Test harness for the broker: a real node on 127.0.0.1 in a background event loop thread,
plus a small blocking raw MQTT client built on the project's codec.

The node runs on uvloop in its own thread so that blocking clients (paho-mqtt, sockets,
subprocesses) can drive it from the test thread; ``BrokerThread.call`` runs a function on
the loop thread (the core is single-threaded) and returns its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import uvloop

from broker.config import BrokerConfig, parse_config
from broker.mqtt import (
    NEED_DATA,
    Connect,
    MQTTDecoder,
    Packet,
    Properties,
    Publish,
    Subscribe,
    Subscription,
    encode,
)
from broker.node import BrokerServer

T = TypeVar("T")


def make_config(
    listeners: dict[str, dict[str, Any]] | None = None,
    mqtt: dict[str, Any] | None = None,
    admin: bool = True,
    node: str = "test-node",
) -> BrokerConfig:
    document: dict[str, Any] = {
        "node": {"name": node},
        "listeners": {"tcp": listeners or {"default": {"bind": "127.0.0.1:0"}}},
    }
    if mqtt:
        document["mqtt"] = mqtt
    if admin:
        document["admin"] = {"bind": "127.0.0.1:0"}
    return parse_config(document, "<test>")


class BrokerThread:
    def __init__(self, config: BrokerConfig, use_uvloop: bool = True) -> None:
        self.config = config
        self.loop = uvloop.new_event_loop() if use_uvloop else asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: BrokerServer | None = None

    def start(self) -> None:
        self.thread.start()

        async def start() -> BrokerServer:
            server = BrokerServer(self.config)
            await server.start()
            return server

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def call(self, function: Callable[[], T]) -> T:
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(function())
            except BaseException as error:
                future.set_exception(error)

        self.loop.call_soon_threadsafe(run)
        return future.result(10)

    def port(self, name: str = "default") -> int:
        assert self.server is not None
        return self.server.listener(name).port

    @property
    def broker(self) -> Any:
        assert self.server is not None
        return self.server.broker

    def admin_get(self, path: str) -> Any:
        assert self.server is not None and self.server.admin is not None
        url = f"http://127.0.0.1:{self.server.admin.port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read()
        return json.loads(body) if path.startswith("/api/") else body.decode()

    def counters(self) -> dict[str, int]:
        return self.call(self.broker.counters.as_dict)


@contextlib.contextmanager
def running_broker(
    config: BrokerConfig | None = None, use_uvloop: bool = True
) -> Iterator[BrokerThread]:
    node = BrokerThread(config or make_config(), use_uvloop)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not met in time")


class RawClient:
    """A blocking MQTT client speaking exactly the packets a test gives it."""

    def __init__(
        self,
        port: int,
        level: int = 5,
        source: str | None = None,
        prefix: bytes = b"",
        host: str = "127.0.0.1",
    ) -> None:
        self.level = level
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.connect((host, port))
        if prefix:
            self.sock.sendall(prefix)
        self.decoder = MQTTDecoder(protocol_level=level)

    def send(self, packet: Packet) -> None:
        self.sock.sendall(encode(packet, self.level))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self, timeout: float = 5.0) -> Packet | None:
        """The next packet, or None when the server closed the connection."""
        self.sock.settimeout(timeout)
        while True:
            event = self.decoder.next_event()
            if event is not NEED_DATA:
                return event
            data = self.sock.recv(65536)
            if not data:
                return None
            self.decoder.feed(data)

    def connect(self, packet: Connect) -> Packet | None:
        self.send(packet)
        return self.receive()

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True when the server closes (packets before the close are skipped)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


class WireClient:
    """A blocking MQTT client that reads whole packets as the bytes the broker wrote (for
    byte-exact checks; RawClient decodes them)."""

    def __init__(self, port: int, level: int, host: str = "127.0.0.1") -> None:
        self.level = level
        self.sock = socket.create_connection((host, port), timeout=5)
        self.buffer = b""

    def connect(self, client_id: str, clean: bool = True, **fields: Any) -> None:
        name = "MQIsdp" if self.level == 3 else "MQTT"
        self.send(Connect(name, self.level, clean, 60, client_id, **fields))
        assert self.packet()[0] == 0x20  # CONNACK

    def send(self, packet: Publish | Subscribe | Connect) -> None:
        self.sock.sendall(encode(packet, self.level))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def subscribe(self, *subscriptions: Subscription, identifier: int | None = None) -> None:
        properties = Properties(
            subscription_identifiers=() if identifier is None else (identifier,)
        )
        self.send(Subscribe(1, subscriptions, properties))
        assert self.packet()[0] == 0x90  # SUBACK

    def packet(self, timeout: float = 5.0) -> bytes:
        """The next whole packet, exactly as the broker wrote it."""
        self.sock.settimeout(timeout)
        while True:
            if len(self.buffer) >= 2:
                length, index, shift = 0, 1, 0
                while index < len(self.buffer):
                    byte = self.buffer[index]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    index += 1
                    if not byte & 0x80:
                        if len(self.buffer) >= index + length:
                            packet = self.buffer[: index + length]
                            self.buffer = self.buffer[index + length :]
                            return packet
                        break
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError("connection closed by the broker")
            self.buffer += data

    def nothing(self, wait: float = 0.3) -> bool:
        try:
            self.packet(wait)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()
