"""What the authenticated PROXY header costs per connection, as a ratio against no MAC (JSON).

    .venv/bin/python bench/proxy_hmac_bench.py [--rounds 5] [--connections 2000] [--number 20000]

Two figures, each measured in interleaved rounds (no MAC, MAC, no MAC, MAC, ...) and reported
as medians and the ratio MAC / no MAC:

- ``codec``: CPU microseconds per header, in this process: lb's side (lb.frontend's work:
  ``encode_v2`` with the SSL TLV and a unique id, plus the MAC: key ring, clock, nonce,
  HMAC-SHA256) and the broker's (decode, plus ``HeaderAuthenticator.check``: MAC, window,
  replay cache).
- ``end_to_end``: CPU time (user + system, from /proc) of the lb and broker processes per
  MQTT connection: a client connects to lb (plain TCP, so that TLS does not drown the
  difference), lb sends the PROXY v2 header to the broker, the broker answers CONNECT with
  CONNACK, the client disconnects. One process pair per round, ``--connections`` each.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.ports import free_port  # noqa: E402
from lb.proxy_hmac import (  # noqa: E402
    HeaderAuthenticator,
    KeyFile,
    new_nonce,
    signing_key,
)
from lb.proxyproto import (  # noqa: E402
    ClientFlags,
    Command,
    ProxyProtocolDecoder,
    SSLInfo,
    encode_v2,
)

SOURCE = ("203.0.113.7", 51234)
DESTINATION = ("10.0.0.5", 8883)
SSL = SSLInfo(
    ClientFlags.SSL | ClientFlags.CERT_CONN | ClientFlags.CERT_SESS,
    0,
    version="TLSv1.3",
    cn="device-0001",
)
SECRET_LINE = "bench " + "5a" * 32 + "\n"
BIN = Path(sys.executable).parent
CONNECT = bytes.fromhex("101200044d5154540402003c0006") + b"bench1"  # 3.1.1, client "bench1"


def cpu_us(function: Callable[[], object], number: int) -> float:
    started = time.process_time()
    for _ in range(number):
        function()
    return (time.process_time() - started) / number * 1e6


def codec_round(key_file: KeyFile, number: int, mac: bool) -> dict[str, float]:
    authenticator = HeaderAuthenticator(key_file, window=30.0, replay_cache=number * 2)

    def build() -> bytes:
        key = signing_key(key_file.keys(), time.time(), new_nonce()) if mac else None
        return encode_v2(Command.PROXY, SOURCE, DESTINATION, unique_id=b"0" * 32, ssl=SSL, mac=key)

    headers = [build() for _ in range(number)]
    iterator = iter(headers)

    def check() -> None:
        decoder = ProxyProtocolDecoder()
        decoder.feed(next(iterator))
        header = decoder.next_event()
        if mac:
            assert authenticator.check(header, time.time()) is None  # type: ignore[arg-type]

    return {"lb_us": cpu_us(build, number), "broker_us": cpu_us(check, number)}


def proc_cpu(pid: int) -> float:
    """user + system seconds of a process and its children that exited (lb's master too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(value) for value in fields[11:15]) / ticks


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def end_to_end_round(directory: Path, keys: Path, connections: int, mac: bool) -> dict[str, float]:
    broker_port, lb_port = free_port(), free_port()
    hmac_line = f'proxy_protocol_hmac_keys = "{keys}"\n' if mac else ""
    (directory / "broker.toml").write_text(
        f'[listeners.tcp.default]\nbind = "127.0.0.1:{broker_port}"\nproxy_protocol = true\n'
        f"{hmac_line}"
    )
    options = f" proxy-v2-options hmac proxy-v2-hmac-keys {keys}" if mac else ""
    (directory / "lb.cfg").write_text(
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n"
        f"frontend fe\n    bind 127.0.0.1:{lb_port}\n    default_backend be\n"
        f"backend be\n    server b 127.0.0.1:{broker_port} send-proxy-v2{options}\n"
    )
    log_path = directory / "processes.log"
    log = open(log_path, "ab")  # noqa: SIM115
    start_of_round = log_path.stat().st_size  # earlier rounds' lines are in the file too
    broker = subprocess.Popen(
        [str(BIN / "broker"), "-c", str(directory / "broker.toml")], stdout=log, stderr=log
    )
    lb = subprocess.Popen(
        [str(BIN / "lb"), "-db", "-f", str(directory / "lb.cfg")], stdout=log, stderr=log
    )
    try:
        wait_port(broker_port)
        time.sleep(0.3)
        deadline = time.monotonic() + 15
        while b"listening on" not in log_path.read_bytes()[start_of_round:]:
            if time.monotonic() > deadline:
                raise TimeoutError("lb did not start")
            time.sleep(0.05)
        before = proc_cpu(lb.pid), proc_cpu(broker.pid)
        started = time.monotonic()
        for _ in range(connections):
            with socket.create_connection(("127.0.0.1", lb_port), timeout=10) as client:
                client.sendall(CONNECT)
                answer = client.recv(4)
                if answer != b"\x20\x02\x00\x00":
                    raise RuntimeError(f"CONNACK expected, got {answer!r}")
                client.sendall(b"\xe0\x00")
        elapsed = time.monotonic() - started
        time.sleep(0.2)  # let both finish closing
        after = proc_cpu(lb.pid), proc_cpu(broker.pid)
    finally:
        for process in (lb, broker):
            process.terminate()
            process.wait(10)
        log.close()
    return {
        "lb_us": (after[0] - before[0]) / connections * 1e6,
        "broker_us": (after[1] - before[1]) / connections * 1e6,
        "connections_per_s": connections / elapsed,
    }


def summarize(rounds: dict[str, list[dict[str, float]]]) -> dict[str, object]:
    medians = {
        variant: {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]}
        for variant, runs in rounds.items()
    }
    ratios = {
        key: round(medians["mac"][key] / medians["no_mac"][key], 3)  # type: ignore[index]
        for key in medians["no_mac"]
        if medians["no_mac"][key]  # type: ignore[index]
    }
    return {"medians": medians, "ratio_mac_over_no_mac": ratios, "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--number", type=int, default=20000, help="headers per codec round")
    parser.add_argument("--connections", type=int, default=2000, help="per end-to-end round")
    parser.add_argument("--no-end-to-end", action="store_true")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="proxy-hmac-bench-") as temporary:
        directory = Path(temporary)
        keys = directory / "keys"
        keys.write_text(SECRET_LINE)
        keys.chmod(0o600)
        key_file = KeyFile(keys, time.monotonic)
        codec: dict[str, list[dict[str, float]]] = {"no_mac": [], "mac": []}
        end_to_end: dict[str, list[dict[str, float]]] = {"no_mac": [], "mac": []}
        for _ in range(arguments.rounds):
            for variant in ("no_mac", "mac"):
                codec[variant].append(codec_round(key_file, arguments.number, variant == "mac"))
            if arguments.no_end_to_end:
                continue
            for variant in ("no_mac", "mac"):
                end_to_end[variant].append(
                    end_to_end_round(directory, keys, arguments.connections, variant == "mac")
                )
    result: dict[str, object] = {"codec": summarize(codec)}
    if not arguments.no_end_to_end:
        result["end_to_end"] = summarize(end_to_end)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
