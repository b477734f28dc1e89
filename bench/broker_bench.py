"""Our MQTT broker against mosquitto 2.0 (Debian's package) on this machine, in the same run:
one table with the ratio broker / mosquitto.

    .venv/bin/python bench/broker_bench.py                 # every figure, 3 repeats, < 5 min
    .venv/bin/python bench/broker_bench.py --only fanin,fanout --qos 0 --repeats 5
    ./dev bench --suite broker                             # the same, through bench/run.py

Figures (MQTT 3.1.1, 64-byte payloads, raw pre-encoded packets from bench/mqtt_loadgen.py):

- fanin_qN: --publishers connections (in 2 processes) flood one topic at QoS N, one subscriber
  (its own process) receives: messages/s delivered to the subscriber, broker CPU µs per
  delivered message, and the delivered fraction of what the publishers wrote in the window.
- fanout_qN: one publisher floods one topic, --subscribers connections (2 processes) receive:
  deliveries/s (summed), broker CPU µs per delivery, delivered fraction (of sent x subscribers).
- latency: one publisher paced at --latency-rate messages/s, one subscriber, QoS 0: p50/p99
  end to end (the publisher's monotonic_ns in the payload, read by the subscriber).
- idle: RSS KiB per idle connection (CONNECT done, nothing else) at --idle connections, on a
  fresh broker process each repeat.
- devices: as idle, but each connection as a fleet device holds it: persistent session, keep
  alive 60 s, one QoS 1 subscription to its own fleet/<id>/commands (RSS KiB per device; in
  the last --mqtt level).
- connect: --connectors loops (2 processes), each CONNECT -> CONNACK -> DISCONNECT -> close on
  a new TCP connection, again and again: connections/s and broker CPU µs per connection.
- backpressure: fan-in at QoS 1 (as fanin_q1) with the send time in every payload: p50/p99
  from publisher to subscriber, delivered fraction and rate. The single subscriber is the
  bottleneck, so this measures how long the broker lets its queue grow.

--mqtt 4,5 runs every load figure in MQTT 3.1.1 and in 5.0 (the 5.0 figures are suffixed
"_v5"; empty property lists, so the bytes differ by one per packet).

CPU is utime+stime from /proc/PID/stat of the broker process over the timed window; RSS is
VmRSS. The brokers run side by side and are measured in turn (the order alternates between
repeats); each number is the median of --repeats. The broker under test runs on CPU 0 and the
generator on the other CPUs (--no-pin to turn off). The generator's ceiling is its own ops per
generator CPU-second (its processes' CPU over the same window), printed beside each rate.
Every process started here has its own process group (workers are our children) and is
killed in `finally`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mqtt_loadgen import (  # noqa: E402
    STEP_TIMEOUT,
    Role,
    Window,
    collect,
    send_window,
    start_workers,
    stop_workers,
    wait_ready,
)
from bench.run import (  # noqa: E402
    Started,
    _number,
    cpu_seconds,
    rss_kib,
    source_span,
    source_tree,
    start,
    stop,
    write_table,
)

VENV_BIN = Path(sys.executable).parent
MOSQUITTO = "/usr/sbin/mosquitto"
RESULTS = ROOT / "bench" / "results"
TABLE_BEGIN = "<!-- broker table begin -->"
TABLE_END = "<!-- broker table end -->"
FIGURES = ("fanin", "fanout", "latency", "connect", "backpressure", "idle", "devices")
BROKERS = ("mosquitto", "broker", "baseline")
#: --baseline DIR: the source tree whose broker runs as "baseline" (an A/B in the same run)
BASELINE: list[Path] = []


# -- brokers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_mqtt(port: int, process: Started, timeout: float = 30.0) -> None:
    """Listening and answering CONNECT (mosquitto binds before it serves)."""
    deadline = time.monotonic() + timeout
    hello = b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x00\x00\x02up"
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.settimeout(2)
            s.sendall(hello)
            if s.recv(4) == b"\x20\x02\x00\x00":
                return
        time.sleep(0.05)
    raise TimeoutError(f"{process.name} does not answer on {port}:\n{process.log.read_text()}")


def launch(name: str, tag: str, work: Path, cpus: set[int] | None) -> tuple[Started, int]:
    """Start one broker on a free port; a few tries (another process may take the port)."""
    for attempt in range(3):
        port = free_port()
        if name == "mosquitto":
            config = work / f"mosquitto-{tag}.conf"
            config.write_text(
                f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                f"log_dest file {work / f'mosquitto-{tag}.file.log'}\n"
            )
            command = [MOSQUITTO, "-c", str(config)]
        elif name == "baseline":
            # another checkout's broker package, first on sys.path, same interpreter and deps
            boot = (
                f"import sys; sys.path.insert(0, {str(BASELINE[0])!r}); "
                "from broker.cli import main; raise SystemExit(main())"
            )
            command = [sys.executable, "-c", boot, "-p", str(port)]
        else:
            command = [str(VENV_BIN / "broker"), "-p", str(port)]
        process = start(f"{name}-{tag}", command, work, cpus)
        try:
            wait_mqtt(port, process)
        except (RuntimeError, TimeoutError):
            stop(process)
            if attempt == 2:
                raise
            continue
        return process, port
    raise AssertionError("unreachable")


# -- one measurement -------------------------------------------------------------------------

#: A broker is quiet once it used less than this share of a core over QUIET_SAMPLE seconds.
QUIET_SHARE = 0.1
QUIET_SAMPLE = 0.25
QUIET_TIMEOUT = 60.0


def wait_quiet(pid: int, timeout: float = QUIET_TIMEOUT) -> float:
    """Wait (bounded) until the broker is done with the previous figure; the seconds waited.

    A QoS 0 flood leaves the broker seconds of publishes in its socket buffers that it still
    routes after the publishers are gone (they were received, so they are delivered); the
    next figure measured in that time would pay for them.
    """
    began = time.monotonic()
    deadline = began + timeout
    before = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(QUIET_SAMPLE)
        now = cpu_seconds(pid)
        if now - before < QUIET_SHARE * QUIET_SAMPLE:
            break
        before = now
    return time.monotonic() - began


def measure(
    port: int,
    broker_pid: int,
    roles: list[Role],
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    """Run the roles against the broker; broker and generator CPU over the window."""
    quiet_wait = wait_quiet(broker_pid)
    workers = start_workers(port, roles)
    try:
        wait_ready(workers)
        connected = sum(worker.ready[0] for worker in workers)
        errors = sum(worker.ready[1] for worker in workers)
        begin = time.monotonic() + 0.1
        window = Window(begin, begin + warmup, begin + warmup + duration)
        send_window(workers, window)
        time.sleep(max(0.0, window.window_start - time.monotonic()))
        broker_cpu = cpu_seconds(broker_pid)
        generator_cpu = sum(cpu_seconds(worker.pid) for worker in workers)
        time.sleep(max(0.0, window.window_end - time.monotonic()))
        broker_cpu = cpu_seconds(broker_pid) - broker_cpu
        generator_cpu = sum(cpu_seconds(worker.pid) for worker in workers) - generator_cpu
        results = collect(workers, STEP_TIMEOUT)
    finally:
        stop_workers(workers)
    latencies = sorted(value for result in results for value in result["latencies_us"])
    by_kind: dict[str, dict[str, int]] = {}
    for worker, result in zip(workers, results, strict=True):
        totals = by_kind.setdefault(worker.role.kind, {"sent": 0, "acked": 0, "received": 0})
        for key in totals:
            totals[key] += result[key]
        errors += result["errors"]
    return {
        "connected": connected,
        "errors": errors,
        "broker_cpu": broker_cpu,
        "generator_cpu": generator_cpu,
        "duration": duration,
        "pub": by_kind.get("pub", {}),
        "connect": by_kind.get("connect", {}),
        "sub": by_kind.get("sub", {}),
        "latencies_us": latencies,
        "quiet_wait": quiet_wait,
    }


def flow_figure(raw: dict[str, Any], subscribers: int, qos: int) -> dict[str, float]:
    received = raw["sub"]["received"]
    sent = raw["pub"]["sent"]
    acked = raw["pub"]["acked"]
    duration = raw["duration"]
    # QoS 1: of the messages the broker acknowledged in the window, the fraction delivered
    # (x subscribers). QoS 0 floods have no such count: what the publishers wrote sits in
    # socket buffers for seconds, so only the delivered rate means something.
    delivered = received / (acked * subscribers) if qos and acked else float("nan")
    return {
        "rate": received / duration,
        "cpu_us": raw["broker_cpu"] / received * 1e6 if received else float("nan"),
        "delivered": delivered,
        "acked_rate": acked / duration,
        "cpu_us_acked": raw["broker_cpu"] / acked * 1e6 if acked else float("nan"),
        "written_rate": sent / duration,
        # messages the generator handled on its busier side, per generator CPU-second
        "gen_ceiling": max(received, acked) / raw["generator_cpu"]
        if raw["generator_cpu"]
        else float("nan"),
        "broker_cpu_share": raw["broker_cpu"] / duration,
        "errors": float(raw["errors"]),
        "quiet_wait": raw["quiet_wait"],
    }


def connect_figure(raw: dict[str, Any]) -> dict[str, float]:
    done = raw["connect"]["sent"]
    return {
        "rate": done / raw["duration"],
        "cpu_us": raw["broker_cpu"] / done * 1e6 if done else float("nan"),
        "gen_ceiling": done / raw["generator_cpu"] if raw["generator_cpu"] else float("nan"),
        "errors": float(raw["errors"]),
        "quiet_wait": raw["quiet_wait"],
    }


def latency_figure(raw: dict[str, Any]) -> dict[str, float]:
    values = raw["latencies_us"]
    if not values:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "samples": 0.0}
    return {
        "p50_ms": values[len(values) // 2] / 1000,
        "p99_ms": values[min(len(values) - 1, int(len(values) * 0.99))] / 1000,
        "samples": float(len(values)),
        "cpu_us": raw["broker_cpu"] / len(values) * 1e6,
        "errors": float(raw["errors"]),
        "quiet_wait": raw["quiet_wait"],
    }


def roles_for(
    figure: str, qos: int, args: argparse.Namespace, cpus: tuple[int, ...], version: int = 4
) -> list[Role]:
    topic = f"bench/{figure}"
    common = {
        "topic": topic,
        "qos": qos,
        "payload_size": args.payload,
        "cpus": cpus,
        "version": version,
    }
    if figure == "connect":
        half = args.connectors // 2
        return [
            Role("connect", half, name="conA", **common),
            Role("connect", args.connectors - half, name="conB", **common),
        ]
    if figure == "backpressure":
        half = args.publishers // 2
        common["qos"] = 1
        return [
            Role("sub", 1, name="sub", latency=True, **common),
            Role("pub", half, name="pubA", stamp=True, **common),
            Role("pub", args.publishers - half, name="pubB", stamp=True, **common),
        ]
    if figure == "fanin":
        half = args.publishers // 2
        return [
            Role("sub", 1, name="sub", **common),
            Role("pub", half, name="pubA", **common),
            Role("pub", args.publishers - half, name="pubB", **common),
        ]
    if figure == "fanout":
        half = args.subscribers // 2
        return [
            Role("sub", half, name="subA", **common),
            Role("sub", args.subscribers - half, name="subB", **common),
            Role("pub", 1, name="pub", **common),
        ]
    return [  # latency
        Role("sub", 1, name="sub", latency=True, **common),
        Role("pub", 1, name="pub", rate=args.latency_rate, **common),
    ]


def idle_run(
    name: str, tag: str, args: argparse.Namespace, work: Path, cpus: Any, kind: str = "idle"
) -> dict[str, float]:
    process, port = launch(name, tag, work, cpus)
    roles = []
    per_worker = max(1, args.idle // 2)
    for index, count in enumerate((per_worker, args.idle - per_worker)):
        if count:
            roles.append(Role(kind, count, name=f"{kind}{index}", version=args.mqtt[-1]))
    time.sleep(0.3)
    before = rss_kib(process.pid)
    workers = start_workers(port, roles)
    try:
        wait_ready(workers)
        held = sum(worker.ready[0] for worker in workers)
        errors = sum(worker.ready[1] for worker in workers)
        time.sleep(1.0)
        after = rss_kib(process.pid)
        now = time.monotonic()
        send_window(workers, Window(now, now, now))
        with contextlib.suppress(TimeoutError, RuntimeError):
            collect(workers, 30)
    finally:
        stop_workers(workers)
        stop(process)
    return {
        "held": float(held),
        "errors": float(errors),
        "rss_before_kib": float(before),
        "rss_kib": float(after),
        "kib_per_conn": (after - before) / held if held else float("nan"),
    }


# -- the suite -------------------------------------------------------------------------------


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def run(args: argparse.Namespace) -> dict[str, Any]:
    hard = raise_nofile()
    if args.idle + 200 > hard:
        raise SystemExit(
            f"--idle {args.idle} needs RLIMIT_NOFILE > {args.idle + 200} (hard {hard})"
        )
    cpus = sorted(os.sched_getaffinity(0))
    pin = args.pin and len(cpus) >= 2
    broker_cpus = {cpus[0]} if pin else None
    generator_cpus = tuple(cpus[1:]) if pin else ()
    runs: list[dict[str, Any]] = []
    started: list[Started] = []
    with tempfile.TemporaryDirectory(prefix="broker-bench-", dir=args.workdir) as scratch:
        work = Path(scratch)
        try:
            ports: dict[str, int] = {}
            pids: dict[str, int] = {}
            load = [f for f in args.only if f not in ("idle", "devices")]
            if load:
                for name in args.brokers:
                    process, port = launch(name, "main", work, broker_cpus)
                    started.append(process)
                    ports[name], pids[name] = port, process.pid
            jobs: list[tuple[str, str, int, int]] = []
            for version in args.mqtt:
                suffix = "_v5" if version == 5 else ""
                for figure in load:
                    if figure in ("latency", "connect", "backpressure"):
                        jobs.append((figure + suffix, figure, 0, version))
                    else:
                        jobs.extend(
                            (f"{figure}_q{qos}{suffix}", figure, qos, version) for qos in args.qos
                        )
            for repeat in range(args.repeats):
                order = args.brokers if repeat % 2 == 0 else args.brokers[::-1]
                for label, figure, qos, version in jobs:
                    for name in order:
                        roles = roles_for(figure, qos, args, generator_cpus, version)
                        raw = measure(ports[name], pids[name], roles, args.warmup, args.duration)
                        if figure == "latency":
                            values = latency_figure(raw)
                        elif figure == "connect":
                            values = connect_figure(raw)
                        elif figure == "backpressure":
                            values = latency_figure(raw)
                            values.update(flow_figure(raw, 1, 1))
                        else:
                            receivers = args.subscribers if figure == "fanout" else 1
                            values = flow_figure(raw, receivers, qos)
                        runs.append({"repeat": repeat, "figure": label, "broker": name, **values})
                        progress(label, name, repeat, values)
                for kind in ("idle", "devices"):
                    if kind not in args.only:
                        continue
                    for name in order:
                        values = idle_run(
                            name, f"{kind}{repeat}", args, work, broker_cpus, kind.rstrip("s")
                        )
                        runs.append({"repeat": repeat, "figure": kind, "broker": name, **values})
                        progress(kind, name, repeat, values)
        finally:
            for process in reversed(started):
                stop(process)
    return report(runs, args)


def progress(figure: str, broker: str, repeat: int, values: dict[str, float]) -> None:
    shown = {k: round(v, 3) for k, v in values.items()}
    print(f"[{repeat}] {figure:10} {broker:9} {shown}", file=sys.stderr, flush=True)


# -- reporting -------------------------------------------------------------------------------

#: figure -> metrics shown in the table, with units
FLOW = [
    ("rate", "messages/s"),
    ("cpu_us", "CPU µs/message"),
    ("delivered", "delivered fraction"),
]
SHOWN: dict[str, list[tuple[str, str]]] = {
    "fanin_q0": FLOW[:2],
    "fanout_q0": [("rate", "deliveries/s"), ("cpu_us", "CPU µs/delivery")],
    "fanin_q1": [*FLOW, ("acked_rate", "publishes acked/s"), ("cpu_us_acked", "CPU µs/publish")],
    "fanout_q1": [("rate", "deliveries/s"), ("cpu_us", "CPU µs/delivery"), FLOW[2]],
    "latency": [("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")],
    "connect": [("rate", "connections/s"), ("cpu_us", "CPU µs/connection")],
    "backpressure": [
        ("p50_ms", "p50 ms"),
        ("p99_ms", "p99 ms"),
        ("rate", "messages/s"),
        FLOW[2],
    ],
    "idle": [("kib_per_conn", "RSS KiB/conn"), ("held", "connections held")],
    "devices": [("kib_per_conn", "RSS KiB/device"), ("held", "devices held")],
}
#: what every figure's medians must hold (the smoke test checks this)
REQUIRED = {
    "fanin_q0": ("rate", "cpu_us", "gen_ceiling"),
    "fanout_q0": ("rate", "cpu_us", "gen_ceiling"),
    "fanin_q1": ("rate", "cpu_us", "delivered", "gen_ceiling"),
    "fanout_q1": ("rate", "cpu_us", "delivered", "gen_ceiling"),
    "latency": ("p50_ms", "p99_ms", "samples"),
    "connect": ("rate", "cpu_us", "gen_ceiling"),
    "backpressure": ("p50_ms", "p99_ms", "samples", "rate", "delivered"),
    "idle": ("kib_per_conn", "held"),
    "devices": ("kib_per_conn", "held"),
}


def medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run_ in runs:
        for key, value in run_.items():
            if isinstance(value, (int, float)) and key != "repeat":
                by = table.setdefault(run_["figure"], {}).setdefault(key, {})
                by.setdefault(run_["broker"], []).append(float(value))
    return {
        figure: {
            key: {broker: statistics.median(values) for broker, values in by.items()}
            for key, by in metrics.items()
        }
        for figure, metrics in table.items()
    }


def format_table(result: dict[str, Any]) -> str:
    brokers: list[str] = result["brokers"]
    others = [b for b in brokers if b != "mosquitto"]
    header = ["figure", "metric", *brokers, *(f"{b} / mosquitto" for b in others), "gen ceiling"]
    rows = [header, ["---"] * len(header)]
    shown = [
        (figure + suffix, metrics)
        for suffix in ("", "_v5")
        for figure, metrics in SHOWN.items()
        if figure + suffix in result["medians"]
    ]
    for figure, metrics in shown:
        for metric, label in metrics:
            values = result["medians"][figure].get(metric, {})
            row = [figure, label, *(_number(values.get(b)) for b in brokers)]
            base = values.get("mosquitto")
            for other in others:
                value = values.get(other)
                row.append(f"{value / base:.2f}" if value is not None and base else "")
            # the generator's ceiling as measured against mosquitto (the faster peer)
            ceiling = result["medians"][figure].get("gen_ceiling", {})
            limit = ceiling.get("mosquitto", min(ceiling.values())) if ceiling else None
            row.append(_number(limit) if metric == "rate" else "")
            rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def mosquitto_version() -> str:
    try:
        output = subprocess.run(
            [MOSQUITTO, "-h"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return "not installed"
    return output.splitlines()[0] if output else ""


def report(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    for run_ in runs:  # derived, so older result files can be re-tabled (--table-from)
        if run_.get("acked_rate") and "cpu_us_acked" not in run_:
            run_["cpu_us_acked"] = run_["broker_cpu_share"] / run_["acked_rate"] * 1e6
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "uname": " ".join(platform.uname()),
            "nproc": os.cpu_count(),
            "mosquitto": mosquitto_version(),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "brokers": args.brokers,
        "runs": runs,
        "medians": medians(runs),
    }
    result["table"] = format_table(result)
    return result


def update_readme(result: dict[str, Any]) -> None:
    settings = result["settings"]
    write_table(
        TABLE_BEGIN,
        TABLE_END,
        f"{result['date']} — `{result['machine']['uname']}`, nproc "
        f"{result['machine']['nproc']}, {result['machine']['mosquitto']}; medians of "
        f"{settings['repeats']} repeats, {settings['duration']} s each; "
        f"{settings['publishers']} publishers / {settings['subscribers']} subscribers, "
        f"{settings['payload']}-byte payloads, latency at {settings['latency_rate']:g} msg/s, "
        f"idle at {settings['idle']} connections.\n\n{result['table']}",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="our MQTT broker vs mosquitto 2.0")
    parser.add_argument("--only", default=",".join(FIGURES), help=",".join(FIGURES))
    parser.add_argument("--qos", default="0,1", help="QoS levels of fanin/fanout (0,1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before the window")
    parser.add_argument("--publishers", type=int, default=16, help="fan-in publishers")
    parser.add_argument("--subscribers", type=int, default=16, help="fan-out subscribers")
    parser.add_argument("--payload", type=int, default=64, help="payload bytes (>= 8)")
    parser.add_argument("--latency-rate", type=float, default=2000.0, help="messages/s")
    parser.add_argument("--idle", type=int, default=5000, help="idle connections (RSS figure)")
    parser.add_argument("--connectors", type=int, default=16, help="connect figure: loops")
    parser.add_argument("--mqtt", default="4", help="protocol levels: 4 (3.1.1) and/or 5")
    parser.add_argument("--brokers", default="mosquitto,broker", help="mosquitto,broker")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="source tree (e.g. `git archive main` unpacked) whose broker runs as a third "
        "broker, 'baseline', interleaved with the others: an A/B in one run",
    )
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="no CPU pinning")
    parser.add_argument("--output", type=Path, help="JSON file (default bench/results/)")
    parser.add_argument("--workdir", type=Path, help="parent of the scratch folder")
    parser.add_argument("--readme", action="store_true", help="write the table into README")
    parser.add_argument(
        "--table-from", type=Path, help="print the table of a results file (runs nothing)"
    )
    args = parser.parse_args(argv)
    args.only = [f for f in args.only.split(",") if f]
    unknown = set(args.only) - set(FIGURES)
    if unknown:
        parser.error(f"unknown figures: {', '.join(sorted(unknown))}")
    args.qos = [int(q) for q in args.qos.split(",") if q]
    if set(args.qos) - {0, 1}:
        parser.error("--qos takes 0 and/or 1")
    args.mqtt = [int(v) for v in str(args.mqtt).split(",") if v]
    if not args.mqtt or set(args.mqtt) - {4, 5}:
        parser.error("--mqtt takes 4 and/or 5")
    args.brokers = [b for b in args.brokers.split(",") if b]
    if args.baseline is not None:
        if not (args.baseline / "broker" / "cli.py").exists():
            parser.error(f"--baseline {args.baseline}: no broker/cli.py there")
        BASELINE[:] = [args.baseline.resolve()]
        if "baseline" not in args.brokers:
            args.brokers.append("baseline")
    if set(args.brokers) - set(BROKERS):
        parser.error(f"--brokers takes {','.join(BROKERS)}")
    if "baseline" in args.brokers and not BASELINE:
        parser.error("the baseline broker needs --baseline DIR")
    if args.payload < 8:
        parser.error("--payload must hold the 8-byte timestamp")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table_from:
        saved = json.loads(args.table_from.read_text())
        print(report(saved["runs"], argparse.Namespace(**saved["settings"]))["table"])
        return 0
    source = source_tree()
    result = run(args)
    result["source"] = source_span(source, "broker bench")
    output = args.output
    if output is None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        output = RESULTS / f"broker-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"])
    print(f"\nresults: {output}", file=sys.stderr)
    if args.readme:
        update_readme(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
