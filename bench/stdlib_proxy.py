"""The same balancer job on the standard library's TLS engine, for comparison only: what
would lb cost if it terminated TLS with `ssl.SSLContext` on uvloop (loop.create_server with
ssl=...) instead of pyOpenSSL over memory BIOs?

    .venv/bin/python bench/run.py --balancers haproxy,lb,stdlib

It reads the same haproxy.cfg through lb.config (bind ssl crt / ca-file / ca-verify-file /
verify required; round robin over the backend's servers; send-proxy-v2) and keeps lb's
data-path shape: one Protocol per side, PROXY v2 header built once per connection, symmetric
pause/resume. It lacks everything pyOpenSSL is there for (per-depth verify errors and
refusal explanations, the client CA list from ca-file only, OCSP), so it is a yardstick,
not an alternative.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import resource
import signal
import ssl
from collections.abc import Iterator

import uvloop

from lb import proxyproto
from lb.config import load_config
from lb.config.model import Bind, Server


class Client(asyncio.Protocol):
    """The TLS side: uvloop's SSL transport hands us plaintext."""

    def __init__(self, servers: Iterator[Server], proxy_v2: bool) -> None:
        self.servers = servers
        self.proxy_v2 = proxy_v2
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        assert self.transport is not None
        server = next(self.servers)
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(
                lambda: Upstream(self), server.host, server.port or 0
            )
        except OSError:
            self.transport.close()
            return
        self.upstream = upstream
        assert upstream.transport is not None
        parts = []
        if self.proxy_v2:
            peer = self.transport.get_extra_info("peername")
            sock = self.transport.get_extra_info("sockname")
            parts.append(proxyproto.encode_v2(proxyproto.Command.PROXY, peer[:2], sock[:2]))
        parts.extend(self.pending)
        self.pending = []
        upstream.transport.write(b"".join(parts))

    def data_received(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            self.pending.append(data)
            return
        upstream.transport.write(data)

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.client.transport is not None:
            self.client.transport.write(data)

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client.transport is not None:
            self.client.transport.close()


def context_for(bind: Bind) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(bind.crt[0])
    for path in (bind.ca_file, bind.ca_verify_file):
        if path:
            context.load_verify_locations(path)
    context.verify_mode = ssl.CERT_REQUIRED if bind.verify == "required" else ssl.CERT_OPTIONAL
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


async def serve(path: str) -> None:
    result = load_config([path])
    if result.config is None:
        raise SystemExit("\n".join(str(d) for d in result.diagnostics))
    config = result.config
    loop = asyncio.get_running_loop()
    listeners = []
    for frontend in config.frontends:
        backend = next(b for b in config.backends if b.name == frontend.default_backend)
        servers = itertools.cycle(backend.servers)
        proxy_v2 = any(s.send_proxy_v2 for s in backend.servers)
        for bind in frontend.binds:
            listeners.append(
                await loop.create_server(
                    lambda servers=servers, proxy_v2=proxy_v2: Client(servers, proxy_v2),  # type: ignore[misc]
                    bind.host,
                    bind.port,
                    ssl=context_for(bind),
                    backlog=4096,
                )
            )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for listener in listeners:
        listener.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(serve(args.config))


if __name__ == "__main__":
    main()
