"""A fast benchmark backend: uvloop Protocols on several ports that strip the PROXY header
(v1 or v2) the balancer sends, then either echo or stream.

    .venv/bin/python bench/backend.py --ports 9001,9002 [--ready-file F]

After the header, a payload that starts with BULK_MAGIC followed by an 8-byte big-endian
count makes the backend send that many bytes (from one preallocated buffer, with flow
control) and close; anything else is echoed back as it arrives. The backend does no
per-byte work beyond the kernel copies, so it is never the bottleneck of a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import socket
import struct
from pathlib import Path

import uvloop

#: A payload that starts with this asks for a stream (then 8 bytes: how many bytes).
BULK_MAGIC = b"\x00BULK\x00"
BULK_REQUEST_SIZE = len(BULK_MAGIC) + 8
#: Size of one write while streaming.
STREAM_CHUNK = 256 * 1024
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V1_MAX = 107  # proxy-protocol.txt 2.1: a v1 line is at most 107 bytes

_PAYLOAD = memoryview(b"x" * STREAM_CHUNK)


class Backend(asyncio.Protocol):
    """One connection: header, then echo or stream."""

    __slots__ = ("header_done", "pending", "remaining", "transport", "writable")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.header_done = False
        self.pending = b""
        self.remaining = 0
        self.writable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=1024 * 1024)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.header_done:
            data = self.pending + data
            length = header_length(data)
            if length is None:
                self.pending = data
                return
            self.header_done = True
            self.pending = b""
            data = data[length:]
            if not data:
                return
        if self.remaining:
            return  # streaming: ignore what the client sends
        if data[: len(BULK_MAGIC)] == BULK_MAGIC and len(data) >= BULK_REQUEST_SIZE:
            (self.remaining,) = struct.unpack_from(">Q", data, len(BULK_MAGIC))
            self.stream()
            return
        assert self.transport is not None
        self.transport.write(data)

    def stream(self) -> None:
        transport = self.transport
        assert transport is not None
        while self.remaining > 0 and self.writable and not transport.is_closing():
            size = min(self.remaining, STREAM_CHUNK)
            transport.write(_PAYLOAD[:size])
            self.remaining -= size
        if self.remaining <= 0:
            transport.close()

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        if self.remaining:
            self.stream()

    def eof_received(self) -> bool:
        return False  # close when the client is done


def header_length(data: bytes) -> int | None:
    """Length of a complete PROXY header at the start of `data` (0 if there is none)."""
    if data[:12] == PROXY_V2_SIGNATURE[: len(data[:12])] and len(data) < 16:
        return None
    if data[:12] == PROXY_V2_SIGNATURE:
        (length,) = struct.unpack_from(">H", data, 14)
        return 16 + length if len(data) >= 16 + length else None
    if data[:6] == b"PROXY "[: len(data[:6])]:
        end = data.find(b"\r\n", 0, PROXY_V1_MAX)
        if end < 0:
            return None if len(data) < PROXY_V1_MAX else 0
        return end + 2
    return 0


async def serve(ports: list[int], ready_file: Path | None) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for port in ports:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(4096)
        servers.append(await loop.create_server(Backend, sock=sock, backlog=4096))
    if ready_file is not None:
        os.write(os.open(ready_file, os.O_WRONLY | os.O_CREAT, 0o644), f"{os.getpid()}\n".encode())
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ports", required=True, help="comma-separated ports")
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(serve([int(p) for p in args.ports.split(",")], args.ready_file))


if __name__ == "__main__":
    main()
