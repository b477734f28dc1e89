"""Issue 14 item 1, measured: how much memory subscribers that stop reading pin in a broker,
and whether it comes back once they are gone.

    .venv/bin/python bench/queue_memory.py                       # this tree's broker
    .venv/bin/python bench/queue_memory.py --broker /work/main/.venv/bin/broker   # another

One broker process (``broker -c``, MQTT 3.1.1, defaults but ``max_queued_messages``), three
subscribers that subscribe at QoS 1 and then read nothing (4 KiB receive buffers), and one
publisher that writes ``--messages`` QoS 1 messages of ``--payload`` bytes as fast as the
broker reads them (it stops when the broker stops reading it for 2 s: backpressure). RSS of
the broker: before, at the peak (all queues full), and ``--settle`` seconds after the three
subscribers closed their connections (their sessions end: clean session). The same run
against mosquitto 2.0 with the same bounds (``max_queued_messages 1000``, ``max_queued_bytes``
16 MiB), interleaved, ``--repeats`` times; medians printed as JSON, in MiB, with KiB per
message written at the peak (each queued for three subscribers) and the drops our broker
counted.
"""

from __future__ import annotations

import argparse
import json
import select
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.run import rss_kib, start, stop  # noqa: E402
from broker.mqtt import Connect, Publish, Subscribe, Subscription, encode  # noqa: E402

LEVEL = 4
MOSQUITTO = "/usr/sbin/mosquitto"
MAX_QUEUED_BYTES = 16 * 1024 * 1024  # both brokers: mosquitto's name, our default


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def raw(port: int, client_id: str, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", port))
    sock.sendall(encode(Connect("MQTT", LEVEL, True, 600, client_id), LEVEL))
    sock.settimeout(5)
    assert sock.recv(4)[:1] == b"\x20"
    return sock


def one_run(
    kind: str, broker: str, messages: int, payload_size: int, settle: float
) -> dict[str, Any]:
    """One broker (ours, or mosquitto with the same bounds): RSS in KiB before, at the peak
    and after the clients left, the messages written, and our broker's drop counters."""
    work = Path(tempfile.mkdtemp(prefix="queue-memory-"))
    port, admin = free_port(), free_port()
    if kind == "mosquitto":
        config = work / "mosquitto.conf"
        config.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000\n"
            f"max_queued_bytes {MAX_QUEUED_BYTES}\nmax_packet_size 1048576\n"
        )
        process = start("mosquitto", [MOSQUITTO, "-c", str(config)], work, None)
    else:
        config = work / "broker.toml"
        config.write_text(
            f"[mqtt]\nmax_queued_messages = 1000\nmax_packet_size = 1048576\n"
            f"max_queued_bytes = {MAX_QUEUED_BYTES}\n\n"
            f'[listeners.tcp.default]\nbind = "127.0.0.1:{port}"\n\n'
            f'[admin]\nbind = "127.0.0.1:{admin}"\n'
        )
        process = start("broker", [broker, "-c", str(config)], work, None)
    stats: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        time.sleep(0.5)
        baseline = rss_kib(process.pid)
        subscribers = []
        for number in range(3):
            sock = raw(port, f"stuck-{number}", receive_buffer=4096)
            sock.sendall(encode(Subscribe(1, (Subscription("memory/t", 1),)), LEVEL))
            sock.recv(5)
            subscribers.append(sock)
        publisher = raw(port, "flood")
        publisher.setblocking(False)
        payload = b"m" * payload_size
        written = 0
        for number in range(messages):
            data = encode(Publish("memory/t", payload, 1, False, False, number % 65535 + 1), LEVEL)
            view = memoryview(data)
            while view:
                _, ready, _ = select.select([], [publisher], [], 2.0)
                if not ready:
                    break  # the broker stopped reading us: paused by backpressure
                try:
                    sent = publisher.send(view)
                except BlockingIOError:
                    continue
                view = view[sent:]
                try:
                    while publisher.recv(65536):
                        pass
                except (BlockingIOError, OSError):
                    pass
            if view:
                break
            written += 1
        time.sleep(1.0)
        peak = rss_kib(process.pid)
        queued_at_peak = None
        if kind != "mosquitto":
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/api/stats", timeout=5) as reply:
                queued_at_peak = json.loads(reply.read())["queued_bytes_current"]
        for sock in subscribers:
            sock.close()
        publisher.close()
        time.sleep(settle)
        after = rss_kib(process.pid)
        if kind != "mosquitto":
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/api/stats", timeout=5) as reply:
                stats = json.loads(reply.read())
    finally:
        stop(process)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "messages_written": written,
        "baseline": baseline,
        "peak": peak,
        "after": after,
        "queued_at_peak": queued_at_peak,
        "messages_dropped_queue_full": stats.get("messages_dropped_queue_full"),
        "messages_dropped_acknowledged": stats.get("messages_dropped_acknowledged"),
        "memory_releases": stats.get("memory_releases"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="memory pinned by slow subscribers")
    parser.add_argument("--broker", default=str(Path(sys.executable).parent / "broker"))
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--payload", type=int, default=65536)
    parser.add_argument("--settle", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-mosquitto", dest="mosquitto", action="store_false")
    args = parser.parse_args(argv)
    kinds = ["broker"]
    if args.mosquitto and Path(MOSQUITTO).exists():
        kinds.append("mosquitto")
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for repeat in range(args.repeats):
        for kind in kinds if repeat % 2 == 0 else list(reversed(kinds)):
            runs[kind].append(one_run(kind, args.broker, args.messages, args.payload, args.settle))
    result: dict[str, Any] = {"broker": args.broker, "payload": args.payload}
    for kind, values in runs.items():

        def median(key: str, values: list[dict[str, Any]] = values) -> float:
            return float(statistics.median(v[key] for v in values))

        written = median("messages_written")
        figures: dict[str, Any] = {
            "messages_written": written,
            "rss_mib": {
                "baseline": round(median("baseline") / 1024, 1),
                "peak": round(median("peak") / 1024, 1),
                "after_clients_left": round(median("after") / 1024, 1),
            },
            # Each message is queued for three subscribers; its payload is held once. Our
            # broker pauses the publisher (nothing dropped), mosquitto drops past its bound:
            # the messages written differ, so this is not a like-for-like ratio.
            "kib_per_message_written": round(
                statistics.median(
                    (v["peak"] - v["baseline"]) / max(1, v["messages_written"]) for v in values
                ),
                1,
            ),
            "kib_kept_after_clients_left": round(
                statistics.median(v["after"] - v["baseline"] for v in values)
            ),
        }
        if kind == "broker":
            last = values[-1]
            queued = statistics.median(v["queued_at_peak"] for v in values)
            figures["payload_mib_queued_and_in_flight_at_peak"] = round(queued / (1 << 20), 1)
            for key in (
                "messages_dropped_queue_full",
                "messages_dropped_acknowledged",
                "memory_releases",
            ):
                figures[key] = last[key]
        result[kind] = figures
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
