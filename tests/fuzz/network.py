"""The network mutator: hostile bytes against real lb and broker processes on 127.0.0.1.

One ``broker -c`` process (a plain MQTT listener, a PROXY-protocol listener trusted for
127.0.0.1, a mutual-TLS listener) and one ``lb -f`` process (a mutual-TLS frontend and an
``accept-proxy`` frontend, both sending PROXY v2 to the broker) are started, then attacked
from a bounded number of connections, a few at a time:

- ``mqtt``: a valid MQTT session (3.1, 3.1.1 or 5.0), mutated (bit flips, inserted, deleted,
  repeated and truncated bytes, random Remaining Lengths), sent in random chunks;
- ``proxy-broker`` / ``proxy-lb``: PROXY v1 and v2 headers from the spec vectors, mutated,
  followed by an MQTT CONNECT;
- ``tls-lb`` / ``tls-broker``: a real TLS ClientHello, mutated, or random records;
- ``slowloris``: a byte every half second to any listener, until the server gives up;
- ``half-close``: part of a packet or header, then shutdown(SHUT_WR).

After each round the campaign checks that both processes are up and still serve a real
client (an MQTT CONNECT straight to the broker and a device through lb's mutual TLS), and
at the end that every connection the server closed is in a log line (by the client's
port, or counted in a rate limiter's "N similar lines suppressed"), that no connection was
left hanging past the server's own timeouts, and that memory came back: RSS after the
attack stays within a bound of RSS before it.
"""

from __future__ import annotations

import contextlib
import random
import re
import select
import socket
import ssl
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.ports import free_port
from broker.mqtt import (
    NEED_DATA,
    Connack,
    Connect,
    MQTTDecoder,
    Properties,
    Publish,
    Subscribe,
    Subscription,
    Unsubscribe,
    Will,
    encode,
)
from broker.tls_listener import HANDSHAKE_TIMEOUT
from lb.proxyproto import (
    Command,
    ProxyHeader,
    ProxyProtocolDecoder,
    ProxyProtocolError,
    SSLInfo,
    encode_v1,
    encode_v2,
)
from tests.harness import VENV_BIN, Process, rss_kib, start_process
from tests.pki import TestPKI

#: The servers' own timeouts, kept short so that slow connections resolve within a round.
CONNECT_TIMEOUT = 2  # broker [mqtt] connect_timeout and proxy_protocol_timeout, seconds
LB_CLIENT_TIMEOUT = 3  # lb `timeout client`, seconds
#: The deadline of each listener for a client that never completes its first packet,
#: header or handshake: the broker's connect_timeout and proxy_protocol_timeout, its own TLS
#: handshake_timeout (EMQX's 15 s), lb's `timeout client`.
DEADLINES = {
    "plain": CONNECT_TIMEOUT,
    "proxied": CONNECT_TIMEOUT,
    "tls": HANDSHAKE_TIMEOUT,
    "lb_tls": LB_CLIENT_TIMEOUT,
    "lb_relay": LB_CLIENT_TIMEOUT,
}
#: A connection still open this long after its listener's deadline is hung (slack for a
#: loaded machine).
HANG_SLACK = 5.0
#: RSS may grow this much over the attack (KiB) before it counts as not bounded: caches
#: (TLS sessions, the allocator's arenas) settle in the first rounds.
RSS_SLACK_KIB = 48 * 1024
ROUND_CONNECTIONS = 24
ATTACKS = ("mqtt", "proxy-broker", "proxy-lb", "tls-lb", "tls-broker", "slowloris", "half-close")


@dataclass
class Attempt:
    attack: str
    port: int  # the client's own port, as it appears in the servers' log lines
    target: str  # "broker" or "lb"
    listener: str = ""  # which of the target's listeners (a key of DEADLINES)
    closed_by_server: bool = False
    hung: bool = False
    sent: int = 0
    data: bytes = b""  # what it sent (or meant to)

    @property
    def head(self) -> bytes:
        return self.data[:64]


@dataclass
class CampaignOutcome:
    seconds: float = 0.0
    rounds: int = 0
    attempts: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    hung: list[str] = field(default_factory=list)
    unlogged: list[str] = field(default_factory=list)
    down: list[str] = field(default_factory=list)
    probe_failures: list[str] = field(default_factory=list)
    rss_kib: dict[str, dict[str, int]] = field(default_factory=dict)
    unbounded: list[str] = field(default_factory=list)
    log_lines: dict[str, int] = field(default_factory=dict)
    #: listener -> {logged: count} of half-closed connections the server then closed.
    after_eof: defaultdict[str, Counter[bool]] = field(default_factory=lambda: defaultdict(Counter))

    @property
    def ok(self) -> bool:
        return not (
            self.hung or self.unlogged or self.down or self.probe_failures or self.unbounded
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 1),
            "rounds": self.rounds,
            "connections": sum(self.attempts.values()),
            "attempts": dict(self.attempts),
            "refused_by_server": dict(self.refused),
            "hung": self.hung[:20],
            "unlogged": self.unlogged[:20],
            "down": self.down,
            "probe_failures": self.probe_failures[:20],
            "rss_kib": self.rss_kib,
            "unbounded": self.unbounded,
            "log_lines": self.log_lines,
            "closed_after_client_eof": {
                listener: {"logged": counts[True], "silent": counts[False]}
                for listener, counts in sorted(self.after_eof.items())
            },
        }


# --- the deployment -------------------------------------------------------------------------


@dataclass
class Deployment:
    broker: Process
    lb: Process
    pki: TestPKI
    ports: dict[str, int]

    def processes(self) -> dict[str, Process]:
        return {"broker": self.broker, "lb": self.lb}


def broker_config(pki: TestPKI, ports: dict[str, int]) -> str:
    return f"""
[node]
name = "fuzz-node"

[mqtt]
connect_timeout = {CONNECT_TIMEOUT}
max_packet_size = 65536

[listeners.tcp.plain]
bind = "127.0.0.1:{ports["plain"]}"

[listeners.tcp.proxied]
bind = "127.0.0.1:{ports["proxied"]}"
proxy_protocol = true
proxy_protocol_timeout = {CONNECT_TIMEOUT}
proxy_protocol_trusted = ["127.0.0.1/32"]
peer_cert_as_username = "cn"

[listeners.ssl.tls]
bind = "127.0.0.1:{ports["tls"]}"
[listeners.ssl.tls.ssl_options]
cacertfile = "{pki.ca_bundle}"
certfile = "{pki.server_cert}"
keyfile = "{pki.server_key}"
verify = "verify_peer"
fail_if_no_peer_cert = true

[admin]
bind = "127.0.0.1:{ports["admin"]}"
"""


def lb_config(pki: TestPKI, ports: dict[str, int]) -> str:
    tls = f"ssl crt {pki.server_allinone} ca-file {pki.ca_bundle} verify required"
    return f"""
global
    maxconn 2000
    log stderr format raw local0

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client {LB_CLIENT_TIMEOUT}s
    timeout server 30s

frontend devices
    bind 127.0.0.1:{ports["lb_tls"]} {tls}
    default_backend brokers

frontend relay
    bind 127.0.0.1:{ports["lb_relay"]} accept-proxy
    default_backend brokers

backend brokers
    server fuzz-node 127.0.0.1:{ports["proxied"]} send-proxy-v2 proxy-v2-options ssl,cert-cn
"""


@contextlib.contextmanager
def deploy(directory: Path) -> Iterator[Deployment]:
    directory.mkdir(parents=True, exist_ok=True)
    pki = TestPKI(directory / "pki")
    ports = {
        name: free_port() for name in ("plain", "proxied", "tls", "admin", "lb_tls", "lb_relay")
    }
    (directory / "broker.toml").write_text(broker_config(pki, ports))
    (directory / "lb.cfg").write_text(lb_config(pki, ports))
    broker = start_process(
        [str(VENV_BIN / "broker"), "-c", str(directory / "broker.toml")], directory, "broker"
    )
    lb = None
    try:
        broker.wait_output("started", 20, stream="stderr")
        lb = start_process(
            [str(VENV_BIN / "lb"), "-db", "-f", str(directory / "lb.cfg")], directory, "lb"
        )
        lb.wait_output(f"listening on 127.0.0.1:{ports['lb_relay']}", 20, stream="stderr")
        yield Deployment(broker, lb, pki, ports)
    finally:
        if lb is not None:
            lb.stop()
        broker.stop()


# --- inputs ---------------------------------------------------------------------------------

_INTERESTING = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\x7f", b"\x00\x00", b"\r\n")


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four of: flip a bit, set a byte, insert random or interesting bytes, delete a
    range, repeat a range, truncate."""
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not buffer:
            buffer.extend(rng.randbytes(rng.randint(1, 16)))
            continue
        position = rng.randrange(len(buffer))
        operation = rng.randrange(7)
        if operation == 0:
            buffer[position] ^= 1 << rng.randrange(8)
        elif operation == 1:
            buffer[position] = rng.randrange(256)
        elif operation == 2:
            buffer[position:position] = rng.randbytes(rng.randint(1, 32))
        elif operation == 3:
            buffer[position:position] = rng.choice(_INTERESTING)
        elif operation == 4:
            del buffer[position : position + rng.randint(1, 16)]
        elif operation == 5:
            end = min(len(buffer), position + rng.randint(1, 64))
            buffer[position:position] = buffer[position:end] * rng.randint(2, 8)
        else:
            del buffer[position:]
    return bytes(buffer)


def mqtt_session(rng: random.Random) -> bytes:
    level = rng.choice((3, 4, 5))
    name = "MQIsdp" if level == 3 else "MQTT"
    properties = Properties(message_expiry_interval=60) if level == 5 else Properties()
    will = Will("fuzz/will", b"gone", 1, False) if rng.random() < 0.3 else None
    packets = [
        Connect(name, level, True, rng.choice((0, 5, 60)), f"fuzz-{rng.randrange(10**6)}",
                will=will),
        Subscribe(1, (Subscription(rng.choice(("a/+", "#", "$share/g/t", "a/b")), 1),)),
        Publish("a/b", rng.randbytes(rng.randint(0, 64)), 1, False, False, 2, properties),
        Publish("a/c", b"x", 0, rng.random() < 0.5, False, None),
        Unsubscribe(3, ("a/+",)),
    ]  # fmt: skip
    return b"".join(encode(packet, level) for packet in packets)


def proxy_header(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return encode_v1(("192.0.2.1", rng.randrange(65536)), ("127.0.0.1", 1883))
    if kind == 1:
        return (
            encode_v1(("2001:db8::1", 1), ("::1", 1883))
            if rng.random() < 0.5
            else (b"PROXY UNKNOWN\r\n")
        )
    ssl_info = SSLInfo(0x07, 0, "TLSv1.3", "device-001", "TLS_AES_128_GCM_SHA256")
    return encode_v2(
        Command.PROXY if kind == 2 else Command.LOCAL,
        ("198.51.100.7", rng.randrange(65536)),
        ("127.0.0.1", 1883),
        ssl=ssl_info if rng.random() < 0.7 else None,
        authority="broker.example" if rng.random() < 0.3 else None,
        unique_id=rng.randbytes(16) if rng.random() < 0.3 else None,
        crc32c=rng.random() < 0.5,
    )


def client_hello(rng: random.Random) -> bytes:
    """The first flight of a real TLS client (OpenSSL through the ssl module)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if rng.random() < 0.5:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        connection.do_handshake()
    return outgoing.read()


CONNECT_311 = encode(Connect("MQTT", 4, True, 30, "fuzz"), 4)


def _split(data: bytes, rng: random.Random) -> list[bytes]:
    chunks: list[bytes] = []
    position = 0
    while position < len(data):
        size = rng.choice((1, 2, 7, 64, 4096))
        chunks.append(data[position : position + size])
        position += size
    return chunks or [b""]


# --- one connection -------------------------------------------------------------------------


def exchange(
    attempt: Attempt,
    port: int,
    chunks: list[bytes],
    *,
    delay: float = 0.0,
    half_close: bool = False,
    wait: float = 1.0,
    must_close: bool = False,
    hang_after: float = 0.0,
) -> Attempt:
    """Send the chunks (``delay`` apart), maybe half-close, then read until the server closes
    or ``wait`` passes. A connection that must close and is still open ``hang_after`` seconds
    after it was opened is hung."""
    started = time.monotonic()
    attempt.data = b"".join(chunks)
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    attempt.port = sock.getsockname()[1]
    try:
        for chunk in chunks:
            sock.sendall(chunk)
            attempt.sent += len(chunk)
            if delay:
                if _closed_within(sock, delay):
                    attempt.closed_by_server = True
                    return attempt
                if time.monotonic() - started > hang_after:
                    attempt.hung = True
                    return attempt
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        limit = hang_after - (time.monotonic() - started) if must_close else wait
        attempt.closed_by_server = _closed_within(sock, max(0.0, limit))
        attempt.hung = must_close and not attempt.closed_by_server
    except (ConnectionResetError, BrokenPipeError):
        attempt.closed_by_server = True
    finally:
        sock.close()
    return attempt


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            return False
        try:
            if not sock.recv(65536):
                return True
        except ConnectionResetError:
            return True


# --- the attacks ----------------------------------------------------------------------------


def plan(attack: str, deployment: Deployment, rng: random.Random) -> Callable[[], Attempt]:
    """One connection of ``attack``, ready to run in a worker thread."""
    ports = deployment.ports
    if attack == "mqtt":
        data = mutate(mqtt_session(rng), rng)
        return lambda: exchange(Attempt(attack, 0, "broker"), ports["plain"], _split(data, rng))
    if attack in ("proxy-broker", "proxy-lb"):
        data = mutate(proxy_header(rng), rng) + CONNECT_311
        port, target = (
            (ports["proxied"], "broker") if attack == "proxy-broker" else (ports["lb_relay"], "lb")
        )
        # A header cut short is refused only when the server's timeout fires.
        wait = (CONNECT_TIMEOUT if target == "broker" else LB_CLIENT_TIMEOUT) + 1.5
        return lambda: exchange(Attempt(attack, 0, target), port, _split(data, rng), wait=wait)
    if attack in ("tls-lb", "tls-broker"):
        hello = client_hello(rng)
        data = mutate(hello, rng) if rng.random() < 0.85 else rng.randbytes(rng.randint(1, 600))
        port, target = (ports["lb_tls"], "lb") if attack == "tls-lb" else (ports["tls"], "broker")
        return lambda: exchange(
            Attempt(attack, 0, target), port, _split(data, rng), wait=LB_CLIENT_TIMEOUT + 1.5
        )
    if attack == "slowloris":
        # Something that never completes, a byte every half second: the server must give up.
        choice = rng.choice(("plain", "proxied", "tls", "lb_tls", "lb_relay"))
        if choice == "plain":
            data = b"\x10\xe8\x07" + rng.randbytes(60)  # a CONNECT of 1,000 bytes
        elif choice in ("proxied", "lb_relay"):
            data = b"PROXY TCP4 " + b"1" * 96 if rng.random() < 0.5 else proxy_header(rng)[:-1]
        else:
            data = client_hello(rng)
        target = "lb" if choice.startswith("lb") else "broker"
        chunks = [data[index : index + 1] for index in range(len(data))]
        return lambda: exchange(
            Attempt(attack, 0, target, choice),
            ports[choice],
            chunks,
            delay=0.5,
            must_close=True,
            hang_after=DEADLINES[choice] + HANG_SLACK,
        )
    if attack == "half-close":
        choice = rng.choice(("plain", "proxied", "tls", "lb_tls", "lb_relay"))
        if choice == "plain":
            source = mqtt_session(rng)
        elif choice in ("proxied", "lb_relay"):
            source = proxy_header(rng) + CONNECT_311
        else:
            source = client_hello(rng)
        data = source[: rng.randrange(len(source))]
        target = "lb" if choice.startswith("lb") else "broker"
        return lambda: exchange(
            Attempt(attack, 0, target, choice),
            ports[choice],
            [data],
            half_close=True,
            must_close=True,
            hang_after=DEADLINES[choice] + HANG_SLACK,
        )
    raise ValueError(f"unknown attack {attack!r}")


# --- checks ---------------------------------------------------------------------------------


def tree_rss_kib(pid: int) -> int:
    """RSS of a process and its children (lb's workers), from /proc."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError, ValueError):
            total += rss_kib(current)
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                pending.extend(int(child) for child in children)
    return total


def probe_broker(port: int) -> str | None:
    """None when a real MQTT client still gets a CONNACK 0, else what went wrong."""
    return _probe(lambda: socket.create_connection(("127.0.0.1", port), timeout=5))


def probe_device(deployment: Deployment) -> str | None:
    """None when a device with a good certificate still connects through lb to the broker."""
    device = deployment.pki.device(1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(deployment.pki.ca_bundle))
    context.check_hostname = False
    context.load_cert_chain(str(device.cert), str(device.key))

    def connect() -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", deployment.ports["lb_tls"]), timeout=5)
        return context.wrap_socket(raw, server_hostname="localhost")

    return _probe(connect)


def _probe(connect: Callable[[], socket.socket]) -> str | None:
    try:
        with connect() as sock:
            sock.settimeout(10)
            sock.sendall(encode(Connect("MQTT", 4, True, 30, f"probe-{time.monotonic_ns()}"), 4))
            decoder = MQTTDecoder(protocol_level=4)
            while (event := decoder.next_event()) is NEED_DATA:
                data = sock.recv(4096)
                if not data:
                    return "closed before CONNACK"
                decoder.feed(data)
            if not isinstance(event, Connack) or event.reason_code != 0:
                return f"answered {event!r}"
    except (OSError, ssl.SSLError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def client_names(attempt: Attempt) -> list[str]:
    """How a log line may name the client: its socket address, or the source address of the
    PROXY header it sent, when that header was valid (the real client, as HAProxy logs it)."""
    names = [f"127.0.0.1:{attempt.port}"]
    if attempt.attack.startswith("proxy"):
        decoder = ProxyProtocolDecoder()
        decoder.feed(attempt.data)
        with contextlib.suppress(ProxyProtocolError):
            header = decoder.next_event()
            if isinstance(header, ProxyHeader) and header.source is not None:
                host, port = header.source
                names += [f"{host}:{port}", f"[{host}]:{port}"]
    return names


_SUPPRESSED = re.compile(r"(\d+) similar lines? (?:were )?suppressed")


def unlogged(attempts: list[Attempt], logs: dict[str, str]) -> list[Attempt]:
    """The refusals (server closed, client had not ended its side) that no log line names;
    a rate limiter's "N similar lines suppressed" accounts for N of them."""
    missing: dict[str, list[Attempt]] = {"broker": [], "lb": []}
    for attempt in attempts:
        if not attempt.closed_by_server or attempt.attack == "half-close":
            continue
        if not any(name in logs[attempt.target] for name in client_names(attempt)):
            missing[attempt.target].append(attempt)
    result: list[Attempt] = []
    for target, found in missing.items():
        suppressed = sum(int(count) for count in _SUPPRESSED.findall(logs[target]))
        result.extend(found[suppressed:])
    return result


# --- the campaign ---------------------------------------------------------------------------


def run_campaign(
    directory: Path,
    *,
    seconds: float,
    min_rounds: int = 2,
    seed: int | None = None,
    threads: int = 8,
) -> CampaignOutcome:
    """Attack a fresh lb and broker for about ``seconds`` and at least ``min_rounds`` rounds
    (a round lasts as long as its slowest connection: at most 20 s), checking the processes,
    their logs and their memory after every round; memory is measured first after round one
    (the warm-up)."""
    rng = random.Random(seed)
    outcome = CampaignOutcome()
    with deploy(directory) as deployment, ThreadPoolExecutor(threads) as pool:
        started = time.monotonic()  # the attack's time; starting the processes is apart
        processes = deployment.processes()
        baseline: dict[str, int] = {}
        peak: dict[str, int] = dict.fromkeys(processes, 0)
        while True:
            marks = {name: process.mark("stderr") for name, process in processes.items()}
            attacks = [*ATTACKS, *ATTACKS]
            attacks += rng.choices(ATTACKS, k=max(0, ROUND_CONNECTIONS - len(attacks)))
            planned = [plan(attack, deployment, rng) for attack in attacks]
            attempts = list(pool.map(lambda run: run(), planned))
            outcome.rounds += 1
            for attempt in attempts:
                outcome.attempts[attempt.attack] += 1
                outcome.refused[attempt.attack] += attempt.closed_by_server
                if attempt.hung:
                    outcome.hung.append(
                        f"{attempt.attack} -> {attempt.target}:{attempt.listener} from port "
                        f"{attempt.port} after {attempt.sent} bytes: {attempt.head!r}"
                    )
            for name, process in processes.items():
                if process.popen.poll() is not None:
                    outcome.down.append(f"{name} exited with {process.popen.returncode}")
            if outcome.down:
                break
            for name, failure in (
                ("broker", probe_broker(deployment.ports["plain"])),
                ("lb", probe_device(deployment)),
            ):
                if failure is not None:
                    outcome.probe_failures.append(f"round {outcome.rounds}: {name}: {failure}")
            time.sleep(0.3)  # the last log lines of the round
            logs = {name: process.stderr[marks[name] :] for name, process in processes.items()}
            for attempt in unlogged(attempts, logs):
                outcome.unlogged.append(
                    f"{attempt.attack} -> {attempt.target}: 127.0.0.1:{attempt.port} closed "
                    f"after {attempt.sent} bytes, no log line: {attempt.head!r}"
                )
            for attempt in attempts:
                # Not a refusal (the client ended the stream), but worth knowing which
                # listeners drop a cut packet or handshake without a word.
                if attempt.attack == "half-close" and attempt.closed_by_server:
                    logged = any(name in logs[attempt.target] for name in client_names(attempt))
                    outcome.after_eof[f"{attempt.target}:{attempt.listener}"][logged] += 1
            for name, process in processes.items():
                rss = tree_rss_kib(process.popen.pid)
                peak[name] = max(peak[name], rss)
                if outcome.rounds == 1:
                    baseline[name] = rss  # after a warm-up round: caches and arenas settled
            if outcome.rounds >= min_rounds and time.monotonic() - started >= seconds:
                break
        time.sleep(1.0)
        for name, process in processes.items():
            final = tree_rss_kib(process.popen.pid)
            outcome.rss_kib[name] = {
                "after_warmup": baseline.get(name, 0),
                "peak": peak[name],
                "final": final,
            }
            if final - baseline.get(name, final) > RSS_SLACK_KIB:
                outcome.unbounded.append(
                    f"{name}: RSS {baseline[name]} KiB after the first round, {final} KiB at "
                    "the end"
                )
            outcome.log_lines[name] = process.stderr.count("\n")
        outcome.seconds = time.monotonic() - started
    return outcome
